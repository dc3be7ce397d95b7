"""Every elementwise op at the edge values of tests/edge_cases.py, on the reference interpreter and
on the CPU backend (its native renderer, and Numba's compiler, its fallback), within MAX_ULPS of
numpy's result; and the float32 decompositions of
lower/decompose.py within their documented bounds of the correctly rounded result on a dense sweep.

The ops come from `unroll.ir.ops.ELEMENTWISE` (a new op without a case here fails
`test_every_elementwise_op_has_a_case`). Each family is one small graph computing the op for every
operand pair at once, compiled without passes (each op its own loop nest) and with the backend's
passes (all of them fused into one nest):
  unary     float32 at UNARY_X; float64 too for the inexact ops (those with MAX_ULPS > 0), against
            numpy's float64 result, within as many float64 ulps
  binary    float32 at every pair of BINARY_VALUES (pow/max/min/div included), compares too (exact);
            int32 at integer edge values for the ops the IR types on integers (wrap-around included);
            float64 for pow
  where     exact, NaN and signed zeros in both branches
  cast      exact, between every pair of dtypes, at the edge values the target type can hold
            (a float -> int cast of NaN, inf or an out-of-range value is undefined in C, numpy and
            LLVM alike, so it is not compared)

The expected value is numpy's result in the operands' dtype: the reference interpreter's tables
(ir/semantics.py), sigmoid being scipy's expit, whose float32 loop is 1 / (1 + exp(-x)) in float32
(exactly 0 below x = -88.72, where exp(-x) overflows; the backends' sigmoid saturates there too).

`python tests/test_edge_values.py` prints `edge_table()`: op x dtype -> max ulps per backend.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from edge_cases import MAX_ULPS, UNARY_X, binary_operands, ulp_distance  # noqa: E402

from unroll.ir import Graph, Node, Op  # noqa: E402
from unroll.ir.ops import BINARY, COMPARE, DTYPES, ELEMENTWISE, UNARY, ShapeError, TensorType  # noqa: E402

pytest.importorskip("numba")
scipy_special = pytest.importorskip("scipy.special")

import unroll as ur  # noqa: E402
from unroll.backends import numpy_ref  # noqa: E402
from unroll.backends.cpu import backend as numba_cpu  # noqa: E402
from unroll.backends.cpu import native  # noqa: E402

@pytest.fixture(autouse=True, scope="module")
def cache_dir(fresh_cache_dir):
    """Generated modules (and Numba's cache beside them) in a fresh directory (CI's cold cache)."""
    yield


INEXACT = frozenset(op for op, ulps in MAX_ULPS.items() if ulps > 0)   # exp, log, tanh, sqrt, pow ...
INT_VALUES = np.array([0, 1, -1, 2, -7, 100, 2**31 - 1, -2**31, 2**30, -2**30 + 3], np.int32)
FAMILIES = ("unary", "binary", "where", "cast", "identity")


def family(op: Op) -> str:
    """Which edge test covers `op` (every ELEMENTWISE op must have one)."""
    if op in UNARY:
        return "unary"
    if op in BINARY or op in COMPARE:
        return "binary"
    return {Op.WHERE: "where", Op.CAST: "cast", Op.STOP_GRADIENT: "identity"}[op]


def ulps(got: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Elementwise distance in ulps of the arrays' dtype (float32 via edge_cases.ulp_distance);
    booleans and integers: 0 or 2**40."""
    got, expected = np.asarray(got), np.asarray(expected)
    if expected.dtype.kind in "biu" or got.dtype.kind in "biu":
        return np.where(got == expected, 0, 2**40)
    if expected.dtype == np.float32:
        return ulp_distance(got, expected)
    a, b = got.astype(np.float64), expected.astype(np.float64)

    def ordered(x: np.ndarray) -> np.ndarray:  # monotone map of float64 onto int64 (+0 == -0)
        i = x.view(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFFFFFFFFFF), i).astype(object)   # exact differences

    dist = np.abs(ordered(a) - ordered(b))
    dist = np.minimum(dist, 2**40).astype(np.int64)
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    dist = np.where(nan_a & nan_b, 0, np.where(nan_a ^ nan_b, 2**40, dist))
    return np.where((np.isinf(a) | np.isinf(b)) & (a != b) & ~(nan_a | nan_b), 2**40, dist)


def expected_value(op: Op, xs: list[np.ndarray]) -> np.ndarray:
    """numpy's result in the operands' dtype (the reference interpreter's meaning of `op`)."""
    with np.errstate(all="ignore"):
        return np.asarray(numpy_ref.ELEMENTWISE_IMPLS[op](*xs))


# ---- the graphs: one per family and dtype --------------------------------------------------------

def _cases(name: str, dtype: str) -> tuple[list[tuple[str, Node]], dict[str, np.ndarray], list[Node]]:
    """(labelled outputs, feeds, inputs) of one family's graph. Labels are "op" or "op->dtype"."""
    def inp(label: str, values: np.ndarray, dt: str) -> Node:
        return Node.leaf(Op.INPUT, TensorType(values.shape, dt), label)

    if name == "unary":
        x = UNARY_X.astype(dtype)
        ops = sorted(UNARY if dtype == "float32" else UNARY & INEXACT, key=lambda o: o.value)
        node = inp("x", x, dtype)
        return [(op.value, Node.make(op, [node])) for op in ops], {"x": x}, [node]
    if name == "identity":
        x = UNARY_X.astype(dtype)
        node = inp("x", x, dtype)
        return [("stop_gradient", Node.make(Op.STOP_GRADIENT, [node]))], {"x": x}, [node]
    if name == "binary":
        if dtype == "int32":
            a, b = (v.ravel().copy() for v in np.meshgrid(INT_VALUES, INT_VALUES, indexing="ij"))
        else:
            a, b = (v.astype(dtype) for v in binary_operands())
        na, nb = inp("a", a, dtype), inp("b", b, dtype)
        ops = sorted(BINARY | COMPARE, key=lambda o: o.value)
        if dtype == "float64":
            ops = [op for op in ops if op in INEXACT]
        outs = []
        for op in ops:
            try:
                outs.append((op.value, Node.make(op, [na, nb])))
            except ShapeError:   # the IR types this op on floats only (integer div, pow)
                continue
        return outs, {"a": a, "b": b}, [na, nb]
    if name == "where":
        a, b = (v.astype(dtype) for v in binary_operands())
        cond = (np.arange(a.size) % 3 == 0) ^ (a > b)
        nc, na, nb = inp("c", cond, "bool"), inp("a", a, dtype), inp("b", b, dtype)
        return [("where", Node.make(Op.WHERE, [nc, na, nb]))], {"c": cond, "a": a, "b": b}, [nc, na, nb]
    if name == "cast":
        x = cast_sources(dtype)
        node = inp("x", x, dtype)
        return [(f"cast->{to}", Node.make(Op.CAST, [node], to)) for to in DTYPES], {"x": x}, [node]
    raise ValueError(name)


def cast_sources(dtype: str) -> np.ndarray:
    """Values of `dtype` a cast is tested on: the edge values, for floats also float64-only ones
    (rounding to float32, overflow to inf, underflow to zero and to subnormals)."""
    if dtype == "bool":
        return np.array([True, False, True, True, False])
    if dtype in ("int32", "int64"):
        return INT_VALUES.astype(dtype)
    extra = [1e-50, -1e-50, 1e300, -1e300, 3.4028235677973366e38, 3.40282357e38, 1e-45, 7e-46, 1.4e-45,
             2.0**-149 * 1.5, 0.1, 1 / 3, 2.0**31 - 1, 2.0**31, -2.0**31, 2.0**62, 16777217.0]
    return np.concatenate([UNARY_X.astype(dtype), np.array(extra if dtype == "float64" else [], dtype)])


def cast_defined(x: np.ndarray, to: str) -> np.ndarray:
    """Where a cast of x to `to` has one meaning (float -> int: finite and in range)."""
    if x.dtype.kind != "f" or to == "bool" or np.dtype(to).kind not in "iu":
        return np.ones(x.shape, bool)
    info = np.iinfo(to)
    with np.errstate(invalid="ignore"):
        return np.isfinite(x) & (x > float(info.min) - 1) & (x < float(info.max))


_GRAPHS: dict[tuple[str, str], tuple[Graph, list[tuple[str, Node]], dict[str, np.ndarray]]] = {}
_KERNELS: dict[tuple[str, str, str], object] = {}
# numba / numba-O0: the CPU backend's default path, the native renderer (cpu/native.py; run() checks
# that it compiled the kernel rather than falling back); numba-codegen: the same source through
# Numba's compiler (UNROLL_CPU_CODEGEN=numba, the fallback), with the backend's passes
BACKENDS = ("numpy_ref", "numba", "numba-O0", "numba-codegen")


def compile_cpu(backend: str, g: Graph):
    """The CPU backend's kernel for `g` on the path `backend` names, checked to be that path (an
    object file from the native renderer, or a generated module compiled by Numba)."""
    if backend == "numba-codegen":
        old = os.environ.get(native.CODEGEN_ENV)
        os.environ[native.CODEGEN_ENV] = "numba"
        try:   # a directory of its own: a cache record names the path that compiled the graph
            kernel = numba_cpu.compile_graph(g, cache_dir=os.path.join(os.environ["UNROLL_CACHE_DIR"], "numba"))
        finally:
            if old is None:
                os.environ.pop(native.CODEGEN_ENV)
            else:
                os.environ[native.CODEGEN_ENV] = old
        assert kernel.path.endswith(".py"), kernel.path
        return kernel
    kernel = numba_cpu.compile_graph(g, passes=() if backend == "numba-O0" else numba_cpu.PASSES)
    assert native.enabled() and kernel.path.endswith(".o"), \
        f"not compiled by the native renderer ({kernel.path}): {native.LAST_UNSUPPORTED[0]}"
    return kernel


def graph_of(name: str, dtype: str):
    key = (name, dtype)
    if key not in _GRAPHS:
        outs, feeds, inputs = _cases(name, dtype)
        _GRAPHS[key] = (Graph(tuple(inputs), tuple(n for _, n in outs)), outs, feeds)
    return _GRAPHS[key]


def run(backend: str, name: str, dtype: str) -> dict[str, tuple[np.ndarray, np.ndarray, list[np.ndarray]]]:
    """label -> (got, expected, operands) for one family's graph on one backend."""
    g, outs, feeds = graph_of(name, dtype)
    key = (backend, name, dtype)
    if key not in _KERNELS:
        if backend == "numpy_ref":
            _KERNELS[key] = numpy_ref.compile_graph(g)
        else:
            _KERNELS[key] = compile_cpu(backend, g)
    args = [feeds[n.arg] for n in g.inputs]
    table = {}
    with np.errstate(all="ignore"):   # the casts of NaN and inf that max_ulps does not compare
        results = _KERNELS[key](args)   # type: ignore[operator]
        for (label, node), got in zip(outs, results):
            xs = [feeds[s.arg] for s in node.src]
            expected = xs[0].astype(node.dtype) if node.op is Op.CAST else expected_value(node.op, xs)
            table[label] = (np.asarray(got), expected.astype(node.dtype), xs)
    return table


def max_ulps(label: str, got: np.ndarray, expected: np.ndarray, xs: list[np.ndarray]) -> tuple[int, str]:
    """(max distance, the worst input) for one output; casts only where they are defined."""
    dist = ulps(got, expected)
    if label.startswith("cast->"):
        dist = np.where(cast_defined(xs[0], label[6:]), dist, 0)
    k = int(np.argmax(dist)) if dist.size else 0
    where = ", ".join(repr(x[k]) for x in xs)
    return int(dist[k]), f"{label}({where}) = {got[k]!r}, expected {expected[k]!r}"


def bound(label: str) -> int:
    return 0 if "->" in label or label in ("where", "stop_gradient") else MAX_ULPS[Op(label)]


# ---- tests ---------------------------------------------------------------------------------------

def test_every_elementwise_op_has_a_case():
    for op in ELEMENTWISE:
        assert family(op) in FAMILIES
    labels = set()
    for name, dtype in CASES:
        labels |= {label.split("->")[0] for label, _ in graph_of(name, dtype)[1]}
    assert {op.value for op in ELEMENTWISE} <= labels | {"cast"}


CASES = ([("unary", "float32"), ("unary", "float64"), ("binary", "float32"), ("binary", "float64"),
          ("binary", "int32"), ("where", "float32"), ("identity", "float32")]
         + [("cast", dt) for dt in DTYPES])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,dtype", CASES)
def test_edge_values_within_max_ulps(backend, name, dtype):
    failures = []
    for label, (got, expected, xs) in run(backend, name, dtype).items():
        assert got.dtype == expected.dtype, (label, got.dtype, expected.dtype)
        dist, where = max_ulps(label, got, expected, xs)
        if dist > bound(label):
            failures.append(f"{dist} ulps > {bound(label)}: {where}")
    assert not failures, "\n".join(failures)


# correctly rounded float32 results, for the sweep: float64 math rounded once
_CORRECT = {Op.EXP: np.exp, Op.TANH: np.tanh, Op.SIGMOID: scipy_special.expit}
# the error bounds decompose.py documents, in ulps of the correctly rounded result (sigmoid: where
# numpy's float32 sigmoid does not saturate to 0, x > -88.72)
SWEEP_ULPS = {Op.EXP: 1, Op.SIGMOID: 2, Op.TANH: 3}
SATURATED = {Op.EXP: (0.0, np.inf), Op.SIGMOID: (0.0, 1.0), Op.TANH: (-1.0, 1.0)}


def sweep_values(n: int = 2_000_000, seed: int = 0) -> np.ndarray:
    """Random float32 bit patterns (every exponent, subnormals included) below 200 in magnitude,
    uniform samples of the interesting ranges, and the thresholds the decompositions switch at."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = x[np.isfinite(x) & (np.abs(x) < 200)]
    marks = [0.625, 9.0, 9.0109, 16.6, 16.7, 87.3, 88.72, 88.73, 89.0, 103.97, 104.0]
    near = np.array([np.nextafter(np.float32(m), np.float32(s * np.inf)) for m in marks for s in (-1, 1)]
                    + marks, np.float32)
    return np.concatenate([x, rng.uniform(-110, 110, n // 2).astype(np.float32),
                           rng.uniform(-2, 2, n // 2).astype(np.float32), near, -near])


def test_decompositions_within_their_bounds_on_a_dense_sweep():
    """The decompositions the CPU opted into, over a dense sweep, against the correctly rounded
    result: the bounds decompose.py documents; saturation exactly where numpy's float32 saturates."""
    x = sweep_values()
    xn = Node.leaf(Op.INPUT, TensorType(x.shape, "float32"), "x")
    ops = [op for op, dtype in numba_cpu.codegen.CPU_DECOMPOSITIONS if dtype == "float32"]
    assert set(ops) == set(SWEEP_ULPS)
    kernel = numba_cpu.compile_graph(Graph((xn,), tuple(Node.make(op, [xn]) for op in ops)), passes=())
    with np.errstate(all="ignore"):
        results = dict(zip(ops, kernel([x])))
        correct = {op: _CORRECT[op](x.astype(np.float64)).astype(np.float32) for op in ops}
        numpy32 = {op: expected_value(op, [x]) for op in ops}
    in_range = {Op.EXP: x == x, Op.TANH: x == x, Op.SIGMOID: x > np.float32(-88.72284)}
    for op in ops:
        dist = np.where(in_range[op], ulp_distance(results[op], correct[op]), 0)
        k = int(np.argmax(dist))
        assert dist[k] <= SWEEP_ULPS[op], f"{op.value}({x[k]!r}) = {results[op][k]!r}, correct {correct[op][k]!r}"
        for saturated in SATURATED[op]:   # exactly where numpy's float32 result is
            where = numpy32[op] == saturated
            assert np.all(results[op][where] == saturated), (op.value, saturated, x[where & (results[op] != saturated)][:5])
    tanh, sig = results[Op.TANH], results[Op.SIGMOID]
    assert np.all(tanh[x > 9.0110] == 1.0) and np.all(tanh[x < -9.0110] == -1.0)
    assert np.all(sig[x >= 16.7] == 1.0) and np.all(sig[x <= -88.72284] == 0.0)
    tail = (x < -87.5) & (x > -88.7)                        # subnormal results, not flushed
    assert np.all((sig[tail] > 0) & (sig[tail] < np.finfo(np.float32).tiny))
    exp_tail = (x < -87.5) & (x > -103)
    assert np.all((results[Op.EXP][exp_tail] > 0) & (results[Op.EXP][exp_tail] < np.finfo(np.float32).tiny))


def test_decompositions_saturate_and_pass_specials():
    x = np.array([20.0, -20.0, 100.0, -100.0, 1e30, -1e30, np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-45, -1e-40,
                  -88.0], np.float32)
    xn = Node.leaf(Op.INPUT, TensorType(x.shape, "float32"), "x")
    kernel = numba_cpu.compile_graph(Graph((xn,), (ur.tanh(xn), ur.sigmoid(xn), ur.exp(xn))), passes=())
    tanh, sig, exp = kernel([x])
    np.testing.assert_array_equal(tanh[:8], [1, -1, 1, -1, 1, -1, 1, -1])
    np.testing.assert_array_equal(sig[[0, 2, 3, 4, 5, 6, 7]], [1, 1, 0, 1, 0, 1, 0])   # numpy's float32 sigmoid
    assert ulp_distance(sig[1], scipy_special.expit(np.float32(-20.0))) <= 2
    assert np.isnan(tanh[8]) and np.isnan(sig[8]) and np.isnan(exp[8])
    np.testing.assert_array_equal(tanh[9:13], x[9:13])           # odd and exact near 0, subnormals too
    assert sig[9] == sig[10] == 0.5
    assert ulp_distance(sig[13], scipy_special.expit(np.float32(-88.0))) <= 1 and sig[13] < 1e-38   # subnormal
    np.testing.assert_array_equal(exp[[6, 7, 2]], [np.inf, 0, np.inf])
    assert ulp_distance(exp[3], np.float32(np.exp(-100.0))) <= 1 and 0 < exp[3] < 1e-43   # subnormal


def test_decompositions_vectorise():
    """The reason for the decompositions: a loop computing float32 tanh, sigmoid and exp compiles
    to vector arithmetic with no libm call per element."""
    import re
    xn = Node.leaf(Op.INPUT, TensorType((64,), "float32"), "x")
    kernel = numba_cpu.compile_graph(Graph((xn,), (ur.tanh(xn), ur.sigmoid(xn), ur.exp(xn))), passes=())
    kernel([np.linspace(-5, 5, 64, dtype=np.float32)])
    llvm_ir = kernel.llvm_ir()
    assert re.search(r"<\d+ x float>", llvm_ir), "no vector arithmetic on float32"
    calls = set(re.findall(r"call [^@\n]*@\"?([\w.]*(?:exp|tanh)[\w.]*)", llvm_ir))
    assert not calls, f"libm calls left in the loop: {calls}"


# ---- the table for the lead's note ---------------------------------------------------------------

def edge_table(backends: tuple[str, ...] = BACKENDS) -> str:
    """op x dtype -> max ulps against numpy's result per backend, with each op's bound. A text
    table."""
    rows = []
    for name, dtype in CASES:
        per_backend = {b: run(b, name, dtype) for b in backends}
        for label in per_backend[backends[0]]:
            cells = [max_ulps(label, *per_backend[b][label])[0] for b in backends]
            rows.append((label, dtype, bound(label), cells))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'op':{width}s}  {'dtype':7s}  {'bound':>5s}  " + "  ".join(f"{b:>9s}" for b in backends)]
    for label, dtype, limit, cells in rows:
        lines.append(f"{label:{width}s}  {dtype:7s}  {limit:5d}  "
                     + "  ".join(f"{c:9d}" if c < 2**40 else f"{'mismatch':>9s}" for c in cells))
    return "\n".join(lines)


if __name__ == "__main__":
    print(edge_table())
