"""The index maps of `backends/lower/index.py` against numpy itself, and the two algebras against
each other, on random shapes (hypothesis).

For each op: the node is built over inputs holding distinct values (np.arange, or random values
where a reduction needs them), evaluated with the reference interpreter (`numpy_ref.IMPLS`, the
spec), and the numpy algebra's map (`numpy_source_map`, what the CUDA planner traces with) must
reproduce the result from the source values it points at. Then the source-text algebra (what the
code generators emit) is evaluated with Python's `eval` at concrete indices and must give the same
indices and conditions as the numpy algebra.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import unroll as ur
from unroll.backends.lower import index as ix
from unroll.backends.numpy_ref import IMPLS
from unroll.ir.node import Node
from unroll.ir.ops import BINARY, COMPARE, Op

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
DIMS = st.integers(1, 4)
SHAPES = st.lists(DIMS, min_size=0, max_size=4).map(tuple)
_names = itertools.count()


def _input(shape, dtype="float64") -> Node:
    return ur.input(f"s{next(_names)}", tuple(shape), dtype)


def _values(node: Node, rng: np.random.Generator | None = None, offset: int = 0) -> np.ndarray:
    """Distinct values (arange + offset), or random small integers as floats when rng is given."""
    size = node.tensor_type.size
    if rng is None:
        return (np.arange(size) + offset).astype(node.dtype).reshape(node.shape)
    return rng.integers(-50, 50, size).astype(node.dtype).reshape(node.shape)


def _evaluate(node: Node, values: list[np.ndarray]) -> np.ndarray:
    return np.asarray(IMPLS[node.op](node, *values), dtype=node.dtype)


# ---- the string algebra at concrete indices ---------------------------------------------------------

class _Env:
    """A SourceAlgebra whose shared sub-expressions are bound (as the emitter binds them) to names
    evaluated at the concrete index."""

    def __init__(self, values: dict[str, int]) -> None:
        self.env = dict(values)
        self.alg = ix.SourceAlgebra(bind=self.bind)

    def bind(self, expr: str, stem: str) -> str:
        name = f"{stem}_{len(self.env)}"
        self.env[name] = eval(expr, {}, self.env)
        return name

    def eval(self, expr: str):
        return eval(expr, {}, self.env)


def _string_agrees(node: Node, out_flat: np.ndarray, red: tuple[int, ...] | None = None) -> None:
    """At a few output elements (and reduced indices), every Read of the source-text algebra
    evaluates to the numpy algebra's index and condition."""
    if not len(out_flat):
        return
    n = len(out_flat)
    alg = ix.NumpyAlgebra(n)
    np_idx = ix.unravel(alg, out_flat, node.shape)
    for k in sorted({0, n // 2, n - 1}):
        names = {f"i{a}": int(np_idx[a][k]) for a in range(node.ndim)}
        env = _Env(names)
        s_idx = list(names)
        if red is None:
            s_reads = ix.sources(env.alg, node, s_idx)
            n_reads = ix.sources(alg, node, np_idx)
        else:
            red_names = {f"r{a}": v for a, v in enumerate(red)}
            env.env.update(red_names)
            n_red = [alg.const(v) for v in red]
            if node.op is Op.MATMUL:
                s_reads = ix.matmul_sources(env.alg, node, s_idx, "r0")
                n_reads = ix.matmul_sources(alg, node, np_idx, n_red[0])
            else:
                s_reads = [ix.Read(node.src[0], ix.reduce_sources(env.alg, node, s_idx, list(red_names)))]
                n_reads = [ix.Read(node.src[0], ix.reduce_sources(alg, node, np_idx, n_red))]
        assert len(s_reads) == len(n_reads)
        for s_read, n_read in zip(s_reads, n_reads):
            assert [env.eval(e) for e in s_read.idx] == [int(a[k]) for a in n_read.idx], (node, k)
            if n_read.valid is not None:
                assert bool(env.eval(s_read.valid)) == bool(n_read.valid[k])
            s_flat = env.eval(ix.flat_offset(env.alg, s_read.idx, s_read.node.shape))
            n_flat = ix.flat_offset(alg, n_read.idx, s_read.node.shape)
            if n_read.valid is None or n_read.valid[k]:
                assert s_flat == int(n_flat[k])


def _in_bounds(reads: list[ix.Read]) -> None:
    """Every index a map gives (where valid) lies inside its source: flat offsets alone would not
    show a size-1 axis left unpinned."""
    for r in reads:
        ok = np.ones(len(r.idx[0]) if r.idx else 0, bool) if r.valid is None else r.valid
        for i, d in zip(r.idx, r.node.shape):
            assert np.all((i[ok] >= 0) & (i[ok] < d)), (r.node, d, i[ok])


def _check_gather(node: Node, values: list[np.ndarray]) -> None:
    """Ops whose element reads one element per source: rebuild the result from the gathered values."""
    out = _evaluate(node, values)
    flat = np.arange(out.size)
    alg = ix.NumpyAlgebra(out.size)
    _in_bounds(ix.sources(alg, node, ix.unravel(alg, flat, node.shape)))
    reads = ix.numpy_source_map(node, flat)
    by_src = {}
    for src, pos, src_flat in reads:
        by_src.setdefault(src, []).append((pos, src_flat))
    vals = dict(zip(node.src, values))
    if node.op in BINARY | COMPARE or node.op in (Op.WHERE, Op.NEG, Op.CAST):
        gathered = []
        for s, (pos, src_flat) in zip(node.src, reads and [(p, f) for _, p, f in reads]):
            assert np.array_equal(pos, flat)
            gathered.append(vals[s].reshape(-1)[src_flat])
        if node.op is Op.CAST:
            expected = gathered[0].astype(node.dtype)
        else:
            expected = IMPLS[node.op](node, *gathered)
        np.testing.assert_array_equal(out.reshape(-1), expected)
    elif node.op is Op.ONEHOT:
        ((_, pos, src_flat),) = reads
        ids = values[0].reshape(-1)[src_flat]
        np.testing.assert_array_equal(out.reshape(-1)[pos], ids == pos % node.shape[-1])
    else:  # movement: the value is the source value (pad: zero where no part is read)
        covered = np.zeros(out.size, int)
        for src, pos, src_flat in reads:
            np.testing.assert_array_equal(out.reshape(-1)[pos], vals[src].reshape(-1)[src_flat])
            covered[pos] += 1
        assert covered.max(initial=0) <= 1
        if node.op is Op.PAD:  # sources hold arange + 1: zero exactly where padded
            np.testing.assert_array_equal(covered == 0, out.reshape(-1) == 0)
        else:
            assert covered.min(initial=1) == 1
    _string_agrees(node, flat)


# ---- per op ------------------------------------------------------------------------------------------

@st.composite
def broadcastable(draw, count: int):
    """`count` shapes that broadcast together, and the result shape."""
    out = draw(st.lists(DIMS, min_size=0, max_size=4))
    shapes = []
    for _ in range(count):
        rank = draw(st.integers(0, len(out)))
        tail = out[len(out) - rank:]
        shapes.append(tuple(d if draw(st.booleans()) else 1 for d in tail))
    return shapes, tuple(out)


@SETTINGS
@given(broadcastable(3), st.sampled_from(["where", "add", "lt", "neg", "cast"]))
def test_elementwise_and_broadcast(shapes_out, kind) -> None:
    shapes, out = shapes_out
    a, c = _input(shapes[0]), _input(shapes[1])
    if kind == "where":
        cond = _input(shapes[2], "bool")
        node = Node.make(Op.WHERE, (cond, a, c))
        values = [(_values(_input(shapes[2])) % 2).astype(bool), _values(a), _values(c, offset=1000)]
    elif kind in ("neg", "cast"):
        node = Node.make(Op.NEG, (a,)) if kind == "neg" else Node.make(Op.CAST, (a,), "int64")
        values = [_values(a)]
    else:
        node = Node.make(Op.ADD if kind == "add" else Op.LT, (a, c))
        values = [_values(a), _values(c, offset=1000)]
    _check_gather(node, values)
    b_node = Node.make(Op.BROADCAST, (a,), tuple(out)) if shapes[0] != out else a
    if b_node is not a:
        _check_gather(b_node, [_values(a)])


@SETTINGS
@given(SHAPES, st.randoms(use_true_random=False))
def test_transpose(shape, rnd) -> None:
    perm = list(range(len(shape)))
    rnd.shuffle(perm)
    x = _input(shape)
    _check_gather(Node.make(Op.TRANSPOSE, (x,), tuple(perm)), [_values(x)])


@st.composite
def _triple(draw) -> tuple[int, tuple[int, int, int]]:
    """A dim and a non-empty (start, stop, step) on it; sometimes an empty one."""
    d = draw(st.integers(1, 6))
    start = draw(st.integers(0, d - 1))
    if draw(st.integers(0, 9)) == 0:
        return d, (start, start, 1)
    return d, slice(start, draw(st.integers(start + 1, d)), draw(st.integers(1, 3))).indices(d)


@SETTINGS
@given(st.lists(_triple(), min_size=0, max_size=4))
def test_slice(axes) -> None:
    shape = tuple(d for d, _ in axes)
    triples = tuple(t for _, t in axes)
    x = _input(shape)
    _check_gather(Node.make(Op.SLICE, (x,), triples), [_values(x)])


@SETTINGS
@given(st.lists(st.tuples(DIMS, st.integers(0, 3), st.integers(0, 3)), min_size=0, max_size=4))
def test_pad(axes) -> None:
    shape = tuple(d for d, _, _ in axes)
    x = _input(shape)
    _check_gather(Node.make(Op.PAD, (x,), tuple((lo, hi) for _, lo, hi in axes)), [_values(x, offset=1)])


@SETTINGS
@given(st.lists(DIMS, min_size=1, max_size=4), st.data())
def test_concat(shape, data) -> None:
    axis = data.draw(st.integers(0, len(shape) - 1))
    sizes = data.draw(st.lists(DIMS, min_size=1, max_size=4))
    parts = [_input(shape[:axis] + [d] + shape[axis + 1:]) for d in sizes]
    values = [_values(p, offset=1000 * k) for k, p in enumerate(parts)]
    _check_gather(Node.make(Op.CONCAT, tuple(parts), axis), values)


@SETTINGS
@given(SHAPES, st.data())
def test_reshape(shape, data) -> None:
    size = math.prod(shape)
    # a target shape: size split into random factors, with size-1 axes sprinkled in
    dims, rest = [], size
    while rest > 1:
        d = data.draw(st.sampled_from([k for k in range(2, rest + 1) if rest % k == 0]))
        dims.append(d)
        rest //= d
    for _ in range(data.draw(st.integers(0, 2))):
        dims.insert(data.draw(st.integers(0, len(dims))), 1)
    dims = data.draw(st.permutations(dims)) if data.draw(st.booleans()) else dims
    x = _input(shape)
    node = Node.make(Op.RESHAPE, (x,), tuple(dims))
    _check_gather(node, [_values(x)])
    # the numpy driver's shortcut (same flat offsets) agrees with the maps themselves
    flat = np.arange(node.tensor_type.size)
    alg = ix.NumpyAlgebra(len(flat))
    ((_, _, via_driver),) = ix.numpy_source_map(node, flat)
    via_maps = ix.flat_offset(alg, ix.reshape(alg, ix.unravel(alg, flat, node.shape), node.shape, shape), shape)
    np.testing.assert_array_equal(via_driver, via_maps)


@SETTINGS
@given(SHAPES, st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_onehot(shape, depth, seed) -> None:
    ids = _input(shape, "int32")
    values = [np.random.default_rng(seed).integers(0, depth, shape).astype(np.int32)]
    _check_gather(Node.make(Op.ONEHOT, (ids,), depth), values)


def _check_reduction(node: Node, values: list[np.ndarray], dims: list[int]) -> None:
    """Gather the source values each output element reads, one row per element, reduced indices
    in row-major order: numpy's sum / max / argmax / matmul of the rows must be the result."""
    out = _evaluate(node, values).reshape(-1)
    flat = np.arange(out.size)
    count = math.prod(dims)
    reads = ix.numpy_source_map(node, flat)
    rows = []
    for (src, pos, src_flat), v in zip(reads, values):
        np.testing.assert_array_equal(pos, np.repeat(flat, count))
        rows.append(v.reshape(-1)[src_flat].reshape(out.size, count))
    if node.op is Op.SUM:
        np.testing.assert_array_equal(out, rows[0].sum(axis=1))
    elif node.op is Op.REDUCE_MAX:
        np.testing.assert_array_equal(out, rows[0].max(axis=1, initial=-np.inf))
    elif node.op is Op.ARGMAX:
        np.testing.assert_array_equal(out, rows[0].argmax(axis=1))
    else:
        np.testing.assert_array_equal(out, (rows[0] * rows[1]).sum(axis=1))
    for red in {tuple(0 for _ in dims), tuple(d - 1 for d in dims)}:
        _string_agrees(node, flat, red)
        alg = ix.NumpyAlgebra(out.size)
        idx, rix = ix.unravel(alg, flat, node.shape), [alg.const(v) for v in red]
        _in_bounds(ix.matmul_sources(alg, node, idx, rix[0]) if node.op is Op.MATMUL else
                   [ix.Read(node.src[0], ix.reduce_sources(alg, node, idx, rix))])


@SETTINGS
@given(st.lists(DIMS, min_size=1, max_size=4), st.data(), st.sampled_from([Op.SUM, Op.REDUCE_MAX]),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_reductions(shape, data, op, keepdims, seed) -> None:
    axes = tuple(sorted(data.draw(st.sets(st.integers(0, len(shape) - 1), min_size=1))))
    x = _input(shape)
    node = Node.make(op, (x,), (axes, keepdims))
    _check_reduction(node, [_values(x, np.random.default_rng(seed))], [shape[a] for a in axes])


@SETTINGS
@given(st.lists(DIMS, min_size=1, max_size=4), st.data(), st.integers(0, 2**31 - 1))
def test_argmax(shape, data, seed) -> None:
    axis = data.draw(st.integers(0, len(shape) - 1))
    x = _input(shape)
    values = np.random.default_rng(seed).integers(-3, 3, shape).astype(np.float64)  # ties: the first wins
    _check_reduction(Node.make(Op.ARGMAX, (x,), axis), [values], [shape[axis]])


@SETTINGS
@given(broadcastable(2), DIMS, DIMS, DIMS, st.integers(0, 2**31 - 1))
def test_matmul(batch, m, k, n, seed) -> None:
    (sa, sb), _ = batch
    a, b = _input(sa + (m, k)), _input(sb + (k, n))
    rng = np.random.default_rng(seed)
    _check_reduction(Node.make(Op.MATMUL, (a, b)), [_values(a, rng), _values(b, rng)], [k])


# ---- the source-text algebra's folding ----------------------------------------------------------------

def test_source_algebra_folds_constants() -> None:
    alg = ix.SOURCE
    assert alg.add("0", "i") == "i" and alg.add("2", "3") == "5" and alg.add("i", "-1") == "(i + -1)"
    assert alg.mul("i", 0) == "0" and alg.mul("i", 1) == "i" and alg.mul("3", 4) == "12"
    assert alg.div("e", 1) == "e" and alg.div("7", 2) == "3" and alg.div("e", 4) == "(e // 4)"
    assert alg.mod("e", 1) == "0" and alg.mod("7", 4) == "3" and alg.mod("e", 4) == "(e % 4)"
    assert alg.all_([]) == "True" and alg.in_range("j", 0, 3) == "j >= 0 and j < 3"
    assert ix.flat_offset(alg, ["i", "0", "k"], (2, 1, 5)) == "((i * 5) + k)"
    assert ix.unravel(alg, "e", (2, 1, 5)) == ["(e // 5)", "0", "(e % 5)"]


def test_shared_flat_offset_is_bound_once() -> None:
    bound = []
    alg = ix.SourceAlgebra(bind=lambda expr, stem: bound.append(expr) or f"{stem}{len(bound)}")
    assert ix.reshape(alg, ["i", "j"], (2, 3), (3, 2)) == ["(f1 // 2)", "(f1 % 2)"]
    assert bound == ["((i * 3) + j)"]
    assert ix.reshape(alg, ["i", "j"], (2, 3), (1, 2, 1, 3)) == ["0", "i", "0", "j"]  # axis to axis
    assert len(bound) == 1


def test_ops_without_an_index_map_say_so() -> None:
    x = _input((2, 2))
    loop_like = Node.make(Op.SUM, (x,), ((0,), False))
    with pytest.raises(NotImplementedError, match="sum"):
        ix.sources(ix.SOURCE, loop_like, ["i"])


# ---- the inverse maps the Numba emitter writes through, and named integers ----------------------

@SETTINGS
@given(SHAPES, st.data())
def test_reduce_dest_scatters_like_sum(shape, data) -> None:
    """Adding every source element into the output element reduce_dest names is numpy's sum."""
    axes = tuple(a for a in range(len(shape)) if data.draw(st.booleans()))
    keepdims = data.draw(st.booleans())
    src = np.arange(math.prod(shape), dtype=np.float64).reshape(shape) + 1
    expected = np.sum(src, axis=axes, keepdims=keepdims)
    flat = np.arange(src.size)
    alg = ix.NumpyAlgebra(src.size)
    dest = ix.reduce_dest(alg, ix.unravel(alg, flat, shape), axes, keepdims)
    out = np.zeros(expected.size)
    np.add.at(out, ix.flat_offset(alg, dest, expected.shape) if expected.ndim else np.zeros(src.size, int),
              src.reshape(-1))
    np.testing.assert_array_equal(out.reshape(expected.shape), expected)


@SETTINGS
@given(st.lists(DIMS, min_size=1, max_size=3), st.data())
def test_concat_dest_writes_like_concatenate(shape, data) -> None:
    axis = data.draw(st.integers(0, len(shape) - 1))
    sizes = data.draw(st.lists(DIMS, min_size=1, max_size=4))
    parts = [np.arange(math.prod(shape[:axis] + [d] + shape[axis + 1:])).reshape(shape[:axis] + [d] + shape[axis + 1:])
             + 100 * k for k, d in enumerate(sizes)]
    expected = np.concatenate(parts, axis)
    out = np.full(expected.shape, -1)
    for start, part in zip(ix.concat_bounds(sizes), parts):
        alg = ix.NumpyAlgebra(part.size)
        dest = ix.concat_dest(alg, ix.unravel(alg, np.arange(part.size), part.shape), axis, start)
        out.reshape(-1)[ix.flat_offset(alg, dest, expected.shape)] = part.reshape(-1)
    np.testing.assert_array_equal(out, expected)


def test_named_integers_are_spelled_not_folded() -> None:
    """The Numba emitter passes sizes and offsets as names of run-time integers: the maps must keep
    them symbolic and give the same indices once the names are bound."""
    alg = ix.SOURCE
    env = {"i0": 3, "i1": 2, "n0": 4, "n1": 2, "n2": 5}
    sliced = ix.slice_(alg, ["i0", "i1"], [("n0", 0, "n1"), (0, 0, 1)])
    assert sliced[1] == "i1" and "n0" in sliced[0] and "n1" in sliced[0]
    assert [eval(e, {}, env) for e in sliced] == [4 + 2 * 3, 2]
    src, valid = ix.pad(alg, ["i0", "i1"], [("n1", 0), (0, 0)], ["n2", 7])
    assert eval(src[0], {}, env) == 1 and src[1] == "i1" and eval(valid, {}, env) is True
    assert eval(ix.pad(alg, ["i1"], [("n0", 1)], ["n2"])[1], {}, env) is False   # 2 - 4 < 0


def test_targets_derive_their_scalar_tables_from_the_shared_one() -> None:
    """The CPU and CUDA tables are `derive(overrides)` of SCALAR_EXPRS: every base op, and any
    difference an explicit override; an override for an op the base lacks is refused."""
    from unroll.backends.cpu.scalars import CPU_EXPRS
    from unroll.backends.cuda.codegen import CUDA_EXPRS
    from unroll.backends.lower import scalar
    for table in (CPU_EXPRS, CUDA_EXPRS):
        assert set(table) == set(scalar.SCALAR_EXPRS)
    assert scalar.derive({Op.TANH: "t({0})"})[Op.TANH] == "t({0})"
    assert scalar.derive({Op.TANH: "t({0})"})[Op.EXP] == scalar.SCALAR_EXPRS[Op.EXP]
    with pytest.raises(AssertionError, match="base table lacks"):
        scalar.derive({Op.TANH: "t({0})"}, base={Op.EXP: "e({0})"})


def test_one_spelling_writes_every_typed_literal() -> None:
    """lower.scalar.Spelling: float32 literals typed (a bare 1.0 would promote float32 math to
    float64), infinities and NaN spelled, ints and bools exact, names containing digits untouched."""
    from unroll.backends.lower.scalar import Spelling
    np_spelling, cuda = Spelling("np."), Spelling("")
    assert np_spelling.literal(0.5, "float32") == "np.float32(0.5)"
    assert cuda.literal(-np.inf, "float32") == "float32(-math.inf)"
    assert cuda.literal(np.nan, "float64") == "float64(math.nan)"
    assert cuda.literal(7, "int8") == "int8(7)" and cuda.literal(1, "bool") == "True"
    assert cuda.typed("(1.0 - x1) * 0.5e-3", "float32") == "(float32(1.0) - x1) * float32(0.5e-3)"
    assert cuda.typed("(1.0 - x1)", "int32") == "(1.0 - x1)"
    assert cuda.render({Op.RECIP: "(1.0 / {0})"}, Op.RECIP, ["v"], "float32") == "(float32(1.0) / v)"
