"""The Numba CPU backend equals the numpy reference, caches across processes and does not recompile
for a new sequence length or batch size."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("numba")
pytest.importorskip("scipy")

import unroll as ur  # noqa: E402
from unroll.backends import numpy_ref
from unroll.backends.cpu import backend as numba_cpu  # noqa: E402
from unroll.ir import Op  # noqa: E402
from unroll.ir.autodiff import grad  # noqa: E402

from strategies import random_feeds  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def cache_dirs(tmp_path_factory):
    """Generated modules and Numba's cache in a temporary directory for this module's tests."""
    base = tmp_path_factory.mktemp("unroll_cache")
    old = {k: os.environ.get(k) for k in ("UNROLL_CACHE_DIR",)}
    os.environ["UNROLL_CACHE_DIR"] = str(base)
    yield base
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def assert_same(graph: ur.Graph, feeds: dict[str, np.ndarray], optimize: bool = True, rtol: float = 2e-4,
                atol: float = 2e-5) -> None:
    args = [feeds[n] for n in graph.input_names]
    expected = numpy_ref.compile_graph(graph)(args)
    got = numba_cpu.compile_graph(graph, passes=numba_cpu.PASSES if optimize else ())(args)
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert g.shape == e.shape and g.dtype == e.dtype, (g.shape, g.dtype, e.shape, e.dtype)
        if e.dtype.kind == "f":
            scale = max(1.0, float(np.max(np.abs(e)))) if e.size else 1.0
            np.testing.assert_allclose(g, e, rtol=rtol, atol=atol * scale)
        else:
            np.testing.assert_array_equal(g, e)


def feeds_for(graph: ur.Graph, seed: int = 0) -> dict[str, np.ndarray]:
    return random_feeds(graph, seed)


# ---- hand-built graphs: every op family ----------------------------------------------------------

def test_elementwise_reductions_and_movement_ops():
    x = ur.input("x", (3, 4, 5))
    w = ur.param("w", (5, 6))
    v = ur.input("v", (5,))
    y = ur.tanh(x * 2.0 + v) - ur.sigmoid(x) / (ur.exp(-ur.abs(x)) + 1.0)
    outs = [
        y,
        ur.sum(y, axis=(0, 2)), ur.max(y, axis=1, keepdims=True), ur.sum(y), ur.mean(y, axis=-1),
        ur.reshape(y, (12, 5)) @ w, ur.transpose(y, (2, 0, 1)), y[1:, ::2, 3],
        ur.concat([y, x], axis=1), ur.pad(y, ((1, 0), (0, 2), (0, 0))), ur.broadcast_to(v, (2, 5)),
        ur.where(ur.greater(x, 0.1), x, ur.relu(-x)), ur.cast(ur.argmax(y, -1), "float32"),
        ur.onehot(ur.argmax(y, 1), 7), ur.maximum(x, v) ** 2.0, ur.log1p(ur.sqrt(ur.abs(x))),
        ur.sign(x) * ur.recip(ur.abs(x) + 1.0), ur.reshape(ur.transpose(ur.reshape(y, (12, 5))), (5, 12)),
    ]
    g = ur.graph(outs)
    assert_same(g, feeds_for(g), optimize=False)


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("m,k,n", [(3, 4, 5), (40, 50, 60)])  # loops and BLAS paths
def test_matmul_layouts(ta, tb, m, k, n):
    a = ur.input("a", (k, m) if ta else (m, k))
    c = ur.input("c", (n, k) if tb else (k, n))
    acc = ur.input("acc", (m, n))
    prod = (a.T if ta else a) @ (c.T if tb else c)
    g = ur.graph([prod, acc + prod * 1.0, acc + (a.T if ta else a) @ (c.T if tb else c)])
    assert_same(g, feeds_for(g), optimize=False)


def test_blas_operands_stay_alive_during_the_call(tmp_path):
    """BLAS operands are passed as arrays, so Numba keeps them alive until BLAS has read them. When
    they were passed as `.ctypes.data` ints, this LSTM step (per-step and stacked activations of many
    MB) read unmapped memory and crashed the process; run in a subprocess so a crash is a failure."""
    code = textwrap.dedent("""
        import numpy as np
        from unroll.bench import unroll_step
        step, _ = unroll_step("lstm", 100, 64, 8, 512, backend="numba")
        loss = [float(np.asarray(step()[0])) for _ in range(2)]
        assert np.isfinite(loss).all() and loss[0] == loss[1], loss
        print("ok")
    """)
    env = {**os.environ, "UNROLL_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, (done.returncode, done.stderr[-2000:])


def test_batched_matmul_and_scalars():
    a = ur.input("a", (2, 3, 4))
    c = ur.input("c", (4, 5))
    s = ur.input("s", ())
    g = ur.graph([a @ c, ur.sum(a) * s, s + 1.0])
    assert_same(g, feeds_for(g), optimize=False)


def test_int_and_bool_values():
    i = ur.input("i", (3, 4), "int32")
    f = ur.input("f", (3, 4))
    m = ur.less(f, 0.0)
    g = ur.graph([ur.cast(i, "float32") * f, ur.where(m, i, i * 2), ur.cast(f, "int32"), m,
                  ur.sum(i, axis=0)])
    assert_same(g, feeds_for(g), optimize=False)


# ---- loops ---------------------------------------------------------------------------------------

def _cell_graph(kind: str, T: int, B: int, I: int, H: int, seed: int = 0):  # noqa: E741
    x = ur.input("x", (T, B, I))
    y = ur.input("y", (T, B, H))
    model = {"rnn": ur.nn.RNN, "lstm": ur.nn.LSTM, "gru": ur.nn.GRU}[kind](I, H, seed=seed)
    out, _ = model(x)
    loss = ur.mean((out - y) ** 2)
    g = ur.graph([loss, *grad(loss, list(model.parameters()))])
    rng = np.random.default_rng(seed)
    feeds = {"x": rng.standard_normal((T, B, I)).astype(np.float32),
             "y": rng.standard_normal((T, B, H)).astype(np.float32), **model.state_dict()}
    return g, feeds


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("optimize", [True, False])
def test_training_step_equals_reference(kind, optimize):
    g, feeds = _cell_graph(kind, 6, 3, 4, 5)
    assert_same(g, feeds, optimize=optimize)


@pytest.mark.parametrize("packed_max_macs", [None, 0])
def test_per_step_products_by_a_weight_use_the_packed_kernel(monkeypatch, packed_max_macs):
    """The recurrent products pack W_hh once before each loop and call the micro-kernel; above
    PACKED_MAX_MACS (here: 0, every product) the same code calls BLAS instead. Both equal the
    reference."""
    from unroll.backends.cpu import emitters
    if packed_max_macs is not None:
        monkeypatch.setattr(emitters, "PACKED_MAX_MACS", packed_max_macs)
    g, feeds = _cell_graph("rnn", 7, 9, 5, 18)   # 9 rows: blocks 5 + 4; 18 columns: a partial panel
    source = numba_cpu.compile_graph(g).source
    assert source.count("pack_panels(") == 2 and source.count("packed_gemm(") == 2
    assert_same(g, feeds)


def test_tcn_training_step():
    x = ur.input("x", (9, 2, 3))
    y = ur.input("y", (9, 2, 4))
    tcn = ur.nn.TCN(3, [4, 4], kernel_size=3)
    loss = ur.mean((tcn(x) - y) ** 2)
    g = ur.graph([loss, *grad(loss, list(tcn.parameters()))])
    feeds = {**feeds_for(ur.graph([x, y])), **tcn.state_dict()}
    assert_same(g, feeds)


def _allocations(source: str, dims: list[int]) -> list[tuple[str, int, int]]:
    """(buffer, elements, bytes) of every array the generated function allocates, its shape read
    with the run-time sizes `dims` (n<k> is dims[k])."""
    import math
    sizes = {f"n{k}": v for k, v in enumerate(dims)}
    out = []
    for name, shape, dtype in re.findall(r"(\w+) = np\.(?:empty|full)\(\(([^)]*)\),.*?np\.(\w+)\)", source):
        count = math.prod(int(sizes.get(d.strip(), d.strip())) for d in shape.split(",") if d.strip())
        out.append((name, count, count * np.dtype(dtype).itemsize))
    return out


def test_tcn_step_accumulates_shifted_products_without_im2col():
    """A causal conv is a sum of row-shifted products (nn/conv.py) that BLAS accumulates into one
    buffer per conv, forward and backward: the training step allocates no (T, B, k*C) im2col copy
    (no buffer is larger than T*B*max(C)), and all its buffers together hold at most 30 (T, B, H)
    float32 arrays' worth (the im2col form allocated 44: its columns, their gradient and copies)."""
    from unroll.backends.cpu import codegen as numba_codegen
    T, B, I, H, k = 11, 3, 5, 7, 3
    x, y = ur.input("x", (T, B, I)), ur.input("y", (T, B, H))
    tcn = ur.nn.TCN(I, [H, H], kernel_size=k)
    loss = ur.mean((tcn(x) - y) ** 2)
    g = ur.graph([loss, *grad(loss, list(tcn.parameters()))])
    cg = numba_codegen.generate(numba_cpu.prepare_graph(g))
    allocations = _allocations(cg.source, cg.dim_values)
    assert max(count for _, count, _ in allocations) <= T * B * max(I, H), allocations
    assert sum(size for _, _, size in allocations) <= 30 * T * B * H * 4, allocations
    # the taps' input rows and accumulator rows are views BLAS reads and writes in place
    assert re.search(r"= rs\d+\[:n\d+\]", cg.source) and re.search(r"= acc\d+\[:n\d+\]", cg.source)
    assert_same(g, {**feeds_for(ur.graph([x, y])), **tcn.state_dict()})


@pytest.mark.parametrize("T,k,d,causal", [(9, 3, 2, True), (5, 4, 3, False), (7, 2, 3, False), (1, 4, 3, False)])
def test_conv1d_gradients_match_the_reference(T, k, d, causal):
    """Causal and "same" padding (taps that look ahead: rows padded at the end; the last case
    shifts every tap out of a 1-step sequence: an empty product), input and weight gradients."""
    x = ur.input("x", (T, 2, 3), "float64")
    conv = ur.nn.Conv1d(3, 4, k, dilation=d, causal=causal, dtype="float64")
    out = conv(x)
    loss = ur.sum(out * out)
    g = ur.graph([out, *grad(loss, [x, conv.weight, conv.bias])])
    assert_same(g, {**feeds_for(ur.graph([x]), seed=T), **conv.state_dict()}, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("optimize", [False, True])
def test_sums_of_row_padded_products_in_a_loop_body(optimize):
    """The accumulations a conv's taps use, inside a time loop (buffers per step, carries swapped):
    c + pad_rows(a @ w) and pad_rows(a @ w1) + pad_rows(b @ w2), both row offsets at the ends."""
    x = ur.input("x", (4, 3, 2), "float64")
    w1, w2 = ur.param("w1", (2, 5), 0.5, dtype="float64"), ur.param("w2", (2, 5), 0.5, dtype="float64")

    def step(h, x_t):
        top = ur.pad(x_t[1:] @ w1, ((2, 0), (0, 0)))           # rows 2.. of the (4, 5) sum
        bottom = ur.pad(x_t[:2] @ w2, ((0, 2), (0, 0)))        # rows ..2
        both = top + bottom
        h = h + ur.pad(ur.tanh(x_t) @ w2, ((1, 0), (0, 0)))
        return h, both
    h, ys = ur.scan(step, ur.zeros((4, 5), "float64"), x)
    g = ur.graph([h, ys])
    assert_same(g, {**feeds_for(ur.graph([x])), "w1": np.full((2, 5), 0.3), "w2": np.arange(10.0).reshape(2, 5)},
                optimize=optimize, rtol=1e-12, atol=1e-12)


def test_empty_products_outside_loops():
    """BLAS is called for empty products too (no size test in the source): no rows or columns
    write nothing, an empty contraction gives zeros, and added to c leaves c."""
    a, w = ur.input("a", (0, 3), "float64"), ur.input("w", (3, 4), "float64")
    p, q, c = ur.input("p", (2, 0), "float64"), ur.input("q", (0, 3), "float64"), ur.input("c", (2, 3), "float64")
    g = ur.graph([a @ w, p @ q, c + p @ (q + 1.0), ur.exp(c) @ (w[:, :0])])
    assert_same(g, feeds_for(g), optimize=False, rtol=0, atol=0)


def test_truncated_bptt_graph():
    from unroll.ir.truncate import truncate
    x = ur.input("x", (10, 2, 3))
    y = ur.input("y", (10, 2, 4))
    lstm = ur.nn.LSTM(3, 4)
    out, _ = lstm(x)
    loss = truncate(ur.mean((out - y) ** 2), 3)
    g = ur.graph([loss, *grad(loss, list(lstm.parameters()))])
    feeds = {**feeds_for(ur.graph([x, y])), **lstm.state_dict()}
    assert_same(g, feeds)


def test_encoder_decoder_and_greedy_decode():
    src = ur.input("src", (7, 2, 3))
    tgt = ur.input("tgt", (5, 2, 3))
    enc = ur.nn.GRU(3, 4, name="enc")
    dec = ur.nn.GRU(3, 4, name="dec")
    head = ur.nn.Linear(4, 6, name="head")
    emb = ur.nn.Embedding(6, 3, name="emb")
    out = ur.nn.teacher_forcing(enc, dec, head, src, tgt)
    loss = ur.mean(out ** 2)
    params = [*enc.parameters(), *dec.parameters(), *head.parameters()]
    _, state = enc(src)
    logits, ids = ur.nn.greedy_decode(dec, head, emb, state, ur.input("start", (2,), "int32"), 4)
    g = ur.graph([loss, *grad(loss, params), logits, ids])
    feeds = {**feeds_for(ur.graph([src, tgt])), "start": np.array([1, 4], np.int32),
             **enc.state_dict(), **dec.state_dict(), **head.state_dict(), **emb.state_dict()}
    assert_same(g, feeds)


def test_hand_written_scan_with_reverse_nested_and_no_sequences():
    w = ur.param("w", (3, 3))
    x = ur.input("x", (4, 2, 3))
    h0 = ur.input("h0", (2, 3))

    def inner(c, xt):
        return ur.tanh(c @ w + xt), c * 2.0

    def outer(h, xt):
        c, ys = ur.scan(inner, h, ur.stack([xt, xt * 0.5]))
        return c, ur.sum(ys, axis=0)
    hT, ys = ur.scan(outer, h0, x, reverse=True)
    (a, bb), _ = ur.scan(lambda c, _: ((c[1], c[0] + 1.0), None), (h0, h0 * 2.0), length=3)  # swapped carries
    g = ur.graph([hT, ys, a, bb])
    assert_same(g, feeds_for(g), optimize=False)
    assert_same(g, feeds_for(g), optimize=True)


# random graphs and random DSL cells (and their gradients): tests/test_properties.py

# ---- regressions ---------------------------------------------------------------------------------

def test_stop_gradient_of_an_op_that_could_be_inlined():
    """An elementwise op whose only user is a stop_gradient was inlined into it, but stop_gradient
    emits no loop (it aliases its source), so the op was never computed: KeyError: <abs f32[]>."""
    w = ur.param("w", ())
    step = ur.compile(ur.stop_gradient(ur.abs(w)), backend="numba", optimize=False)
    assert float(step(w=np.float32(-2.0))) == 2.0
    x = ur.input("x", (3, 4))
    g = ur.graph([ur.tanh(ur.stop_gradient(ur.abs(x) * 2.0)), ur.sum(ur.stop_gradient(ur.exp(x)), axis=0),
                  ur.stop_gradient(ur.sigmoid(x)) + 1.0])
    assert_same(g, feeds_for(g), optimize=False)


@pytest.mark.parametrize("optimize", [True, False])
def test_onehot_of_an_id_out_of_range_raises(optimize):
    """An id outside [0, depth) raises IndexError naming onehot and the depth (it gave a row of
    zeros), for a onehot as for the Embedding built on it."""
    ids = ur.input("ids", (2, 3), "int32")
    step = ur.compile(ur.onehot(ids, 5) * 2.0, backend="numba", optimize=optimize)
    good = np.array([[0, 4, 2], [1, 1, 3]], np.int32)
    np.testing.assert_array_equal(step(ids=good), 2.0 * (good[..., None] == np.arange(5)))
    for bad in (5, -1, 2**31 - 1):
        with pytest.raises(IndexError, match=rf"onehot: id {bad} is out of range for depth 5"):
            step(ids=np.where(good == 3, bad, good).astype(np.int32))
    emb = ur.nn.Embedding(4, 3, name="emb")
    tokens = ur.input("tokens", (3,), "int64")
    lookup = ur.compile(emb(tokens), backend="numba", optimize=optimize)
    with pytest.raises(IndexError, match="onehot: id 4 is out of range for depth 4"):
        lookup(tokens=np.array([0, 4, 1]), **emb.state_dict())


@pytest.mark.parametrize("optimize", [True, False])
def test_integer_and_bool_products_and_max_reductions(optimize):
    """Integer/bool matmuls run as loops (BLAS' gemm read the int arrays as floats), and a max
    reduction starts from its dtype's lowest value (bool: False, not True; int64: its minimum)."""
    a = ur.input("a", (2, 3), "int32")
    c = ur.input("c", (3, 4), "int32")
    p = ur.input("p", (3, 2), "bool")
    m = ur.input("m", (4, 2), "bool")
    big = ur.input("big", (2, 3), "int64")
    acc = ur.input("acc", (2, 4), "int32")
    g = ur.graph([a @ c, acc + a @ c, ur.transpose(c) @ ur.transpose(a), ur.cast(ur.transpose(p) @ p, "int32"),
                  ur.max(m, axis=1), ur.max(m, axis=0, keepdims=True), ur.max(big, axis=1), ur.max(a)])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.integers(-5, 5, (2, 3)).astype(np.int32), "c": rng.integers(-5, 5, (3, 4)).astype(np.int32),
             "p": np.array([[1, 0], [0, 0], [1, 0]], bool), "m": np.array([[1, 0], [0, 0], [0, 1], [0, 0]], bool),
             "big": np.array([[-2**62, -2**61, -2**60], [-5, -2**62, -7]], np.int64),
             "acc": rng.integers(-5, 5, (2, 4)).astype(np.int32)}
    assert_same(g, feeds, optimize=optimize)


def _at_offset(a: np.ndarray, offset: int) -> np.ndarray:
    """A copy of `a` that starts `offset` bytes after a 64-byte boundary (np.frombuffer on a bytearray)."""
    buf = bytearray(a.nbytes + 64 + offset)
    start = (-np.frombuffer(buf, np.uint8).ctypes.data) % 64 + offset
    view = np.frombuffer(buf, a.dtype, count=a.size, offset=start).reshape(a.shape)
    view[...] = a
    return view


@pytest.mark.parametrize("codegen", ["native", "numba"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_results_do_not_depend_on_the_alignment_of_the_inputs(kind, codegen, monkeypatch, tmp_path):
    """One compiled training step fed the same values at different byte offsets (float32: every
    4-byte position in and across cache lines) gives bitwise equal results, compiled by the native
    renderer (checked: an object file, no fallback) and by Numba (UNROLL_CPU_CODEGEN=numba)."""
    monkeypatch.setenv("UNROLL_CPU_CODEGEN", codegen)
    g, feeds = _cell_graph(kind, 20, 16, 32, 64)
    step = numba_cpu.compile_graph(g, cache_dir=str(tmp_path))   # a cache record names its compiler
    assert step.path.endswith(".o" if codegen == "native" else ".py"), step.path
    names = g.input_names
    reference = step([_at_offset(feeds[n], 0) for n in names])
    for offset in (4, 8, 12, 16, 20, 28, 32, 44, 60):
        got = step([_at_offset(feeds[n], offset) for n in names])
        for r, o in zip(reference, got):
            assert r.tobytes() == o.tobytes(), f"offset {offset}: max difference {np.abs(r - o).max()}"


def test_scalar_intrinsics_of_the_decompositions():
    """cpu.intrinsics: powers of two from exponent bits (subnormal results rounded once, 2**128 * p
    reached without inf, NaN kept), and a multiply-add that fast-math does not reassociate."""
    from numba import njit

    from unroll.backends.cpu.intrinsics import fmuladd, ldexp, pow2, scale
    fast = {"nsz", "arcp", "contract", "afn", "reassoc"}   # the generated code's flags

    @njit(fastmath=fast)
    def run(p, n, out):
        for i in range(p.shape[0]):
            out[0, i] = ldexp(p[i], n[i])
            out[1, i] = scale(p[i], n[i])
            out[2, i] = pow2(n[i])
            out[3, i] = fmuladd(n[i], np.float32(-0.693359375), p[i])

    p = np.array([1.5, 0.75, 1.25, 1.0, 0.6, 1.9, np.nan], np.float32)
    n = np.array([-149.0, -140.0, 127.0, 0.0, 128.0, -125.0, 3.0], np.float32)
    out = np.empty((4, p.size), np.float32)
    run(p, n, out)
    exact = p.astype(np.float64) * 2.0 ** n.astype(np.float64)
    np.testing.assert_array_equal(out[0, :6], exact[:6].astype(np.float32))   # subnormals rounded once
    np.testing.assert_array_equal(out[1, 2:6], exact[2:6].astype(np.float32))  # up to 0.6 * 2**128
    np.testing.assert_array_equal(out[2, [2, 3, 5]], 2.0 ** n[[2, 3, 5]])              # 2**127, 1, 2**-125
    assert np.isnan(out[1, 6]) and np.isnan(out[3, 6])
    np.testing.assert_array_equal(out[3, :6], (n[:6] * np.float32(-0.693359375) + p[:6]).astype(np.float32))


# ---- source, shapes, caching ---------------------------------------------------------------------

def test_source_is_inspectable_and_shape_free():
    g1, _ = _cell_graph("lstm", 7, 3, 4, 6)
    g2, _ = _cell_graph("lstm", 13, 5, 4, 6)
    c1 = ur.compile(g1, backend="numba")
    c2 = ur.compile(g2, backend="numba")
    assert "def kernel(" in c1.source and "for t0 in range(" in c1.source
    assert c1.source == c2.source          # T and B are run-time values: same module
    assert c1.impl.path == c2.impl.path


def test_no_recompilation_for_new_sequence_length_or_batch():
    # sizes chosen without coincidences (equal sizes share one name in the source, so T == I would
    # give another valid source and one more compile)
    g1, f1 = _cell_graph("gru", 11, 2, 3, 7)
    numba_cpu.compile_graph(g1)([f1[n] for n in g1.input_names])
    compiles = _compiles_and_loads()
    for T, B in [(13, 2), (11, 4), (17, 5)]:
        g, feeds = _cell_graph("gru", T, B, 3, 7)
        args = [feeds[n] for n in g.input_names]
        got = numba_cpu.compile_graph(g)(args)
        expected = numpy_ref.compile_graph(g)(args)
        for e, o in zip(expected, got):
            np.testing.assert_allclose(o, e, rtol=2e-4, atol=2e-5)
    assert _compiles_and_loads() == compiles


def _compiles_and_loads() -> int:
    """Kernels compiled or loaded from the cache so far, by either code path (native, Numba)."""
    stats = numba_cpu.STATS
    return stats["numba_compiles"] + stats["cache_loads"] + stats["native_compiles"] + stats["native_loads"]


_CACHE_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np
    import unroll as ur
    from unroll.backends.cpu import backend as numba_cpu
    from unroll.ir.autodiff import grad
    x = ur.input("x", (6, 2, 3)); y = ur.input("y", (6, 2, 4))
    lstm = ur.nn.LSTM(3, 4)
    out, _ = lstm(x)
    loss = ur.mean((out - y) ** 2)
    step = ur.compile([loss, *grad(loss, list(lstm.parameters()))], backend="numba")
    vals = step(x=np.ones((6, 2, 3), np.float32), y=np.zeros((6, 2, 4), np.float32), **lstm.state_dict())
    print(json.dumps({"from_cache": step.impl.from_cache, "stats": dict(numba_cpu.STATS),
                      "loss": float(vals[0]), "path": step.impl.path}))
""")


def test_cache_reused_across_processes(tmp_path):
    env = {**os.environ, "UNROLL_CACHE_DIR": str(tmp_path / "gen"), "NUMBA_CACHE_DIR": str(tmp_path / "nb"),
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    import json
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert not first["from_cache"] and first["stats"].get("native_compiles") == 1
    assert second["from_cache"] and second["stats"].get("native_loads") == 1
    assert second["stats"].get("native_compiles", 0) == 0 and second["stats"].get("numba_compiles", 0) == 0
    # the second process recognised the graph: no passes, no code generation
    assert second["stats"].get("recorded") == 1 and second["stats"].get("codegen", 0) == 0
    assert first["path"] == second["path"] and first["loss"] == pytest.approx(second["loss"])


def test_import_unroll_does_not_import_numba():
    code = "import sys, unroll; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


# ---- errors --------------------------------------------------------------------------------------

def test_numba_failure_names_the_op_and_source_line(monkeypatch):
    from unroll.backends.cpu import emitters
    real = emitters.scalar_statements

    def broken(op, dtype, in_dtype, operands, name):
        lines = real(op, dtype, in_dtype, operands, name)
        return lines + [f"{name} = undefined_helper({name})"] if op is Op.LOG1P else lines
    monkeypatch.setattr(emitters, "scalar_statements", broken)
    x = ur.input("x", (3,))
    g = ur.graph([ur.log1p(ur.abs(x)) * 2.0])
    with pytest.raises(numba_cpu.NumbaBackendError) as info:
        numba_cpu.compile_graph(g, passes=())
    message = str(info.value)
    assert "log1p" in message and "test_numba_backend.py" in message and ".py:" in message
    assert "Traceback" not in message


def test_unknown_option_is_rejected():
    x = ur.input("x", (2,))
    with pytest.raises(TypeError, match="unknown options"):
        ur.compile(x * 2.0, backend="numba", fastest=True)


def test_feeds_of_other_layouts_and_dtypes_are_converted():
    x = ur.input("x", (3, 4))
    step = ur.compile(ur.sum(x * 2.0, axis=0), backend="numba")
    data = np.arange(24, dtype=np.float64).reshape(4, 6)[:3, ::-1][:, :4]  # strided, reversed, float64
    np.testing.assert_allclose(step(x=data), (data * 2).sum(0), rtol=1e-6)
    ro = np.ones((3, 4), np.float32)
    ro.setflags(write=False)
    np.testing.assert_allclose(step(x=ro), np.full(4, 6.0))


def test_kernel_b_is_independent_of_shapes_but_one_is_literal():
    # B = 1 is literal (size-1 axes broadcast), so it is its own module; other sizes share one
    g1, _ = _cell_graph("rnn", 4, 1, 3, 5)
    g2, _ = _cell_graph("rnn", 4, 2, 3, 5)
    assert numba_cpu.compile_graph(g1).source != numba_cpu.compile_graph(g2).source


@pytest.mark.filterwarnings("ignore:.*share it")
def test_tcn_source_does_not_depend_on_offsets_equal_to_sizes():
    """Paddings of 2 and 4 (kernel 3, dilations 1, 2) equal B in two graphs and not in the third: the
    offsets are named per use, so all get one source (no second compile). Sizes avoid coincidences
    among themselves (T == 3 * 5 would give another, equally valid, source)."""
    from unroll.backends.cpu import codegen as numba_codegen

    def source(T: int, B: int) -> str:
        x = ur.input("x", (T, B, 3))
        model = ur.nn.TCN(3, [5, 5], kernel_size=3, name="tcn")
        g = ur.graph([ur.mean(model(x) ** 2)])
        return numba_codegen.generate(numba_cpu.prepare_graph(g)).source

    assert source(50, 4) == source(61, 6) == source(37, 2)


def test_dims_helper_keeps_simple_constants_literal():
    from unroll.backends.cpu.codegen import Dims
    d = Dims()
    assert d.f(0.5, "float32") == "np.float32(0.5)"
    assert d.f(1 / 6400, "float32") == "k0"
    assert d.n(1) == "1" and d.n(50) == "n0" and d.n(50) == "n0"



def test_blas_thread_policy_is_read_from_the_environment():
    """The user's thread counts win (threads.py has the adaptive default); generated code switches
    between the outside and the in-loop count around its loops."""
    code = ("from unroll.backends.cpu import threads; print(*threads.choose(1), *threads.choose(2 ** 40))")
    env = {**os.environ, "UNROLL_NUMBA_BLAS_THREADS": "2", "UNROLL_NUMBA_BLAS_LOOP_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["2", "1", "2", "1"]
    g, _ = _cell_graph("rnn", 5, 3, 4, 6)
    source = numba_cpu.compile_graph(g).source
    assert "blas_threads(blas[0], blas[2])" in source and "blas_threads(blas[0], blas[1])" in source
