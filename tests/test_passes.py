"""The optimizing passes one by one: their rewrites on small hand-built graphs, and semantic
preservation (numpy reference before == after, ur.verify after) on random graphs and random cells,
forward and forward + backward, for each pass alone and for the whole pipeline."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import unroll as ur
from strategies import evaluate, graphs, random_feeds, rnn_cells
from unroll.backends import numpy_ref
from unroll.ir.fuse_cells import fuse_cells
from unroll.ir.fuse_matmuls import fuse_matmuls
from unroll.ir.hoist import hoist
from unroll.ir.node import Graph, Node, all_nodes
from unroll.ir.ops import BINARY, COMPARE, ELEMENTWISE, Op
from unroll.ir.optimize import PASSES
from unroll.ir.simplify import FOLD, simplify

ALL_PASSES = list(PASSES.items()) + [("pipeline", ur.optimize)]


# ---- helpers ------------------------------------------------------------------------------------

def loops(graph: Graph) -> list[Node]:
    return [n for n, _ in all_nodes(graph) if n.op is Op.LOOP]


def body_count(loop: Node, op: Op) -> int:
    """Nodes of `op` directly in the loop's body (not in nested bodies)."""
    return sum(1 for n in loop.arg.body.nodes() if n.op is op)


def top_count(graph: Graph, op: Op) -> int:
    return sum(1 for n in graph.nodes() if n.op is op)


def assert_same_values(before: Graph, after: Graph, feeds: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    ur.verify(after)
    for i, (want, got) in enumerate(zip(evaluate(before, feeds), evaluate(after, feeds))):
        assert got.shape == want.shape and got.dtype == want.dtype, i
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"output {i}")


def training_graph(outputs: Graph) -> Graph:
    """Forward outputs plus the gradients of a loss on them w.r.t. every float input."""
    floats = [o for o in outputs.outputs if o.dtype in ("float32", "float64")]
    loss = ur.sum(floats[0])
    for o in floats[1:]:
        loss = loss + ur.sum(o * o)
    wrt = [n for n in outputs.inputs if n.dtype in ("float32", "float64")]
    return ur.graph(loss, *ur.grad(loss, wrt))


# ---- semantic preservation (hypothesis) ---------------------------------------------------------

def check_all_passes(graph: Graph, feeds: dict) -> None:
    for name, fn in ALL_PASSES:
        out = fn(graph)
        assert isinstance(out, Graph), name
        assert out.inputs == graph.inputs or set(out.inputs) <= set(graph.inputs), name
        try:
            assert_same_values(graph, out, feeds, rtol=1e-7, atol=1e-9)
        except AssertionError as err:
            raise AssertionError(f"pass {name}: {err}") from None


@given(graphs(dtype="float64", min_loops=1), st.integers(0, 2**16))
def test_random_graphs_forward(graph, seed):
    check_all_passes(graph, random_feeds(graph, seed))


@given(graphs(dtype="float64", min_loops=1, max_ops=4), st.integers(0, 2**16))
def test_random_graphs_forward_backward(graph, seed):
    train = training_graph(graph)
    check_all_passes(train, random_feeds(train, seed))


@given(rnn_cells(dtype="float64"))
def test_random_cells_forward(cell):
    graph, feeds = cell
    check_all_passes(graph, feeds)


@given(rnn_cells(dtype="float64"), st.integers(0, 2**16))
def test_random_cells_forward_backward(cell, seed):
    graph, _ = cell
    train = training_graph(graph)
    check_all_passes(train, random_feeds(train, seed))


@given(rnn_cells(dtype="float32"))
def test_random_cells_float32_pipeline(cell):
    graph, feeds = cell
    train = training_graph(graph)
    assert_same_values(train, ur.optimize(train), random_feeds(train, 3), rtol=1e-4, atol=1e-5)


# ---- simplify ---------------------------------------------------------------------------------------

def test_fold_table_matches_the_reference_interpreter():
    assert set(FOLD) == set(numpy_ref.ELEMENTWISE_IMPLS)
    a, c = np.asarray(-1.5, np.float32), np.asarray(0.25, np.float32)
    for op, fn in FOLD.items():
        args = [np.asarray(True), a, c] if op is Op.WHERE else [a, c] if op in BINARY | COMPARE else [a]
        with np.errstate(all="ignore"):
            np.testing.assert_array_equal(np.asarray(fn(*args)), np.asarray(numpy_ref.ELEMENTWISE_IMPLS[op](*args)),
                                          err_msg=op.name)


def test_constant_folding_makes_constant_leaves():
    c = ur.exp(ur.const(0.0, (2, 3))) * 3.0 + ur.sum(ur.const(1.0, (4,)))
    out = simplify(ur.graph(c))
    (node,) = out.outputs
    assert node.op is Op.CONST and node.arg == 7.0 and node.shape == (2, 3)


@pytest.mark.parametrize("build", [
    lambda x: x * 1.0, lambda x: 1.0 * x, lambda x: x + 0.0, lambda x: x - 0.0, lambda x: x / 1.0,
    lambda x: x ** 1.0, lambda x: -(-x), lambda x: ur.stop_gradient(x), lambda x: x.T.T,
    lambda x: ur.transpose(ur.transpose(x, (1, 0, 2)), (1, 0, 2)),
    lambda x: ur.reshape(ur.reshape(x, (6, 4)), (2, 3, 4)), lambda x: ur.concat(ur.split(x, 2, -1), -1),
    lambda x: ur.concat([x[:1], x[1:]], 0), lambda x: ur.maximum(x, x),
    lambda x: ur.where(ur.const(True, (), "bool"), x, -x), lambda x: ur.slice_axis(x[:, 1:], 1, 0, 2),
])
def test_identities_give_back_the_value(build):
    x = ur.input("x", (2, 3, 4))
    out = simplify(ur.graph(build(x))).outputs[0]
    assert out is x or (out.op is Op.SLICE and out.src[0] is x)


def test_reshape_of_reshape_is_one_reshape_and_pow2_is_mul():
    x = ur.input("x", (2, 3, 4))
    r = simplify(ur.graph(ur.reshape(ur.reshape(x, (6, 4)), (24,)))).outputs[0]
    assert r.op is Op.RESHAPE and r.src[0] is x
    p = simplify(ur.graph(x ** 2.0)).outputs[0]
    assert p.op is Op.MUL and p.src == (x, x)


def test_times_zero_only_with_finite_semantics():
    x = ur.input("x", (2, 3))
    w = ur.input("w", (3, 4))
    g = ur.graph(x * 0.0 + ur.sum(ur.matmul(x * 0.0, w).T.T))
    out = simplify(g).outputs[0]
    assert out.op is Op.CONST and out.arg == 0.0
    kept = simplify(g, assume_finite=False).outputs[0]
    assert kept.op is not Op.CONST


def test_sum_of_disjoint_pads_is_one_concat():
    parts = [ur.input(f"g{i}", (2, 3)) for i in range(4)]
    padded = [ur.pad(p, [(0, 0), (3 * i, 9 - 3 * i)]) for i, p in enumerate(parts)]
    out = simplify(ur.graph(padded[2] + padded[0] + padded[3] + padded[1])).outputs[0]
    assert out.op is Op.CONCAT and list(out.src) == parts


def test_invariant_carries_become_consts():
    x = ur.input("x", (4, 2, 3))
    w = ur.param("w", (3, 3), 0.5)
    zero = ur.zeros((2, 3))

    def step(carry, x_t):
        h, same, acc = carry
        h = ur.tanh(x_t @ w + h + same + acc)
        return (h, same, acc * 0.0), h
    (h, same, acc), ys = ur.scan(step, (zero, ur.input("s", (2, 3)), zero), x)
    g = ur.graph(ys, same, acc)
    out = simplify(g)
    (loop,) = loops(out)
    assert loop.arg.n_carry == 1
    assert out.outputs[1] is g.inputs[-1] or out.outputs[1].name == "s"
    assert out.outputs[2].op is Op.CONST
    assert_same_values(g, out, random_feeds(g))


def test_loops_with_the_same_carry_updates_merge():
    x = ur.input("x", (4, 2, 3))
    h0 = ur.input("h0", (2, 3))
    _, ys1 = ur.scan(lambda h, x_t: (ur.tanh(h + x_t), ur.tanh(h + x_t)), h0, x)
    _, ys2 = ur.scan(lambda h, x_t: (ur.tanh(h + x_t), ur.sigmoid(h)), h0, x)
    g = ur.graph(ys1, ys2)
    assert len(loops(g)) == 2
    out = simplify(g)
    assert len(loops(out)) == 1
    assert_same_values(g, out, random_feeds(g))


def test_per_step_outputs_that_are_slices_or_invariant_move_out():
    x = ur.input("x", (4, 2, 3))
    w = ur.param("w", (2, 3), 0.5)
    _, (ys_x, ys_w) = ur.scan(lambda h, x_t: (h + x_t, (x_t, ur.tanh(w))), ur.zeros((2, 3)), x)
    g = ur.graph(ys_x, ys_w)
    out = simplify(g)
    assert out.outputs[0] is x
    assert not loops(out)
    assert_same_values(g, out, random_feeds(g))


# ---- hoist ----------------------------------------------------------------------------------------

def rnn(T=5, B=2, I=3, H=4, reverse=False):
    x = ur.input("x", (T, B, I))
    w_x = ur.param("w_x", (I, H), 0.5)
    w_h = ur.param("w_h", (H, H), 0.5)
    bias = ur.param("b", (H,), 0.5)
    _, ys = ur.scan(lambda h, x_t: (ur.tanh(x_t @ w_x + bias + h @ w_h),) * 2, ur.zeros((B, H)), x,
                    reverse=reverse)
    return ur.graph(ys)


@pytest.mark.parametrize("reverse", [False, True])
def test_input_projection_is_one_matmul_before_the_loop(reverse):
    g = rnn(reverse=reverse)
    out = hoist(g)
    (loop,) = loops(out)
    assert body_count(loop, Op.MATMUL) == 1
    (mm,) = [n for n in out.nodes() if n.op is Op.MATMUL]
    assert mm.src[0].shape == (10, 3) and mm.src[0].op is Op.RESHAPE  # (T*B, I) @ (I, H)
    assert_same_values(g, out, random_feeds(g))


def test_invariant_subexpressions_become_consts():
    x = ur.input("x", (5, 2, 3))
    w = ur.param("w", (3, 3), 0.5)

    def step(h, x_t):
        # written as a body computation on purpose: W.T * 2 depends on the consts only
        return ur.tanh(h @ (ur.transpose(w) * 2.0) + x_t), h
    g = ur.graph(ur.scan(step, ur.zeros((2, 3)), x)[1])
    out = hoist(g)
    (loop,) = loops(out)
    assert body_count(loop, Op.TRANSPOSE) == 0 and body_count(loop, Op.MUL) == 0
    assert_same_values(g, out, random_feeds(g))


def test_weight_gradient_accumulations_become_sums_after_the_loop():
    T, B, I, G = 6, 2, 3, 4
    xs = ur.input("xs", (T, B, I))
    ds = ur.input("ds", (T, B, G))
    w = ur.param("w", (I, G), 0.5)

    def step(carry, inp):
        dw, db, other = carry
        x_t, d_t = inp
        dz = d_t * ur.tanh(x_t @ w)
        return (dw + ur.transpose(x_t) @ dz, db + ur.sum(dz, 0), other * 0.5 + dz), dz
    (dw, db, other), _ = ur.scan(step, (ur.zeros((I, G)), ur.zeros((G,)), ur.zeros((B, G))), (xs, ds),
                                 reverse=True)
    g = ur.graph(dw, db, other)
    out = simplify(hoist(g))
    (loop,) = loops(out)
    assert loop.arg.n_carry == 1  # only `other`, whose carry is read by its own update
    assert body_count(loop, Op.MATMUL) == 0  # x_t @ w hoisted, x_t.T @ dz summed after the loop
    dw_mm = [n for n in out.nodes() if n.op is Op.MATMUL and n.shape == (I, G)]
    assert len(dw_mm) == 1 and dw_mm[0].src[0].shape == (I, T * B)
    sums = [n for n in out.nodes() if n.op is Op.SUM]
    assert any(s.arg[0] == (0, 1) for s in sums)
    assert_same_values(g, out, random_feeds(g))


def test_per_step_output_matmuls_move_after_the_loop():
    xs = ur.input("xs", (5, 2, 3))
    w = ur.param("w", (3, 3), 0.5)
    v = ur.param("v", (3, 7), 0.5)
    _, dx = ur.scan(lambda h, x_t: (ur.tanh(h @ w + x_t), ur.tanh(h @ w + x_t) @ v), ur.zeros((2, 3)), xs,
                    reverse=True)
    g = ur.graph(dx)
    out = hoist(g)
    (loop,) = loops(simplify(out))
    assert body_count(loop, Op.MATMUL) == 1
    assert_same_values(g, out, random_feeds(g))


# ---- fuse_matmuls ---------------------------------------------------------------------------------

@pytest.mark.parametrize("transposed", [False, True])
def test_gate_matmuls_sharing_h_become_one(transposed):
    H, B = 4, 2
    ws = [ur.param(f"w{k}", (H, H), 0.5) for k in range(4)]
    x = ur.input("x", (5, B, H))

    def step(h, x_t):
        gates = [h @ (w.T if transposed else w) + x_t for w in ws]
        h = ur.sigmoid(gates[0]) * ur.tanh(gates[1]) + ur.sigmoid(gates[2]) * gates[3]
        return h, h
    g = ur.graph(ur.scan(step, ur.zeros((B, H)), x)[1])
    out = fuse_matmuls(g)
    (loop,) = loops(out)
    assert body_count(loop, Op.MATMUL) == 1
    (mm,) = [n for n in loop.arg.body.nodes() if n.op is Op.MATMUL]
    assert mm.shape == (B, 4 * H)
    hoisted = simplify(hoist(out))
    (loop,) = loops(hoisted)
    assert body_count(loop, Op.CONCAT) == 0  # the weight concat is computed once, before the loop
    assert_same_values(g, hoisted, random_feeds(g))


def test_summed_matmuls_become_one_but_x_and_h_stay_apart():
    H, B = 3, 2
    wx = [ur.param(f"wx{k}", (H, H), 0.5) for k in range(2)]
    wh = [ur.param(f"wh{k}", (H, H), 0.5) for k in range(2)]
    x = ur.input("x", (5, B, H))

    def step(carry, x_t):
        h, d = carry
        dh = ur.tanh(d) @ wh[0].T + ur.sigmoid(d) @ wh[1].T + x_t @ wx[0] + h
        return (ur.tanh(dh), d * 0.5 + x_t @ wx[1]), dh
    g = ur.graph(ur.scan(step, (ur.zeros((B, H)), ur.zeros((B, H))), x)[1])
    out = fuse_matmuls(g)
    (loop,) = loops(out)
    mms = [n for n in loop.arg.body.nodes() if n.op is Op.MATMUL]
    assert len(mms) == 2  # the two d-matmuls joined; x_t's shared-operand pair joined
    assert any(m.src[0].op is Op.CONCAT for m in mms)
    assert_same_values(g, out, random_feeds(g))


# ---- fuse_cells -----------------------------------------------------------------------------------

def test_fused_bodies_hold_only_elementwise_ops_of_one_shape():
    g = rnn()
    out = fuse_cells(hoist(g))
    (loop,) = loops(out)
    fused = [n for n in loop.arg.body.nodes() if n.op is Op.FUSED]
    assert len(fused) == 1
    body = fused[0].arg
    shapes = set()
    for n in body.nodes():
        assert n.op in ELEMENTWISE or n.op in (Op.ARG, Op.CONST), n
        if n.op in ELEMENTWISE:
            shapes.add(n.shape)
    assert len(shapes) == 1
    assert sum(1 for n in loop.arg.body.nodes() if n.op in ELEMENTWISE) == 0
    assert_same_values(g, out, random_feeds(g))


def test_no_group_crosses_a_matmul_both_ways():
    x = ur.input("x", (3, 2, 2))
    w = ur.param("w", (2, 2), 0.5)

    def step(h, x_t):
        a = ur.tanh(h + x_t)
        m = a @ w           # a -> matmul -> c: a and c cannot be one kernel with b between them
        c = ur.sigmoid(m) * a
        return c, c
    g = ur.graph(ur.scan(step, ur.zeros((2, 2)), x)[1])
    out = fuse_cells(g)
    (loop,) = loops(out)
    assert body_count(loop, Op.FUSED) == 2
    assert_same_values(g, out, random_feeds(g))


def test_carry_sum_after_a_matmul_moves_into_the_next_steps_kernel():
    x = ur.input("x", (4, 2, 3))
    w = ur.param("w", (3, 3), 0.5)

    def step(d, x_t):
        z = ur.sigmoid(d + x_t)
        return d * z + (z * x_t) @ w, z
    g = ur.graph(*ur.scan(step, ur.input("d0", (2, 3)), x))
    out = fuse_cells(g)
    (loop,) = loops(out)
    assert body_count(loop, Op.FUSED) == 1
    assert sum(1 for n in loop.arg.body.nodes() if n.op in ELEMENTWISE) == 0
    assert loop.arg.n_carry == 2
    assert_same_values(g, out, random_feeds(g))


def test_top_level_sums_of_products_stay_out_of_fused_groups():
    """fuse_top_level leaves `c + a @ b` and `c + pad_rows(a @ b)` (a conv's taps, nn/conv.py)
    unfused, so the Numba backend accumulates them in place with BLAS; bias and relu still fuse."""
    x = ur.input("x", (6, 2, 3))
    g = ur.graph(ur.relu(ur.nn.Conv1d(3, 4, 3, dilation=2)(x)))
    out = PASSES["fuse_top_level"](g)
    sums = [n for n in out.nodes() if n.op is Op.ADD]
    assert len(sums) == 2 and all(n.src[1].op is Op.PAD and n.src[1].src[0].op is Op.MATMUL for n in sums)
    assert top_count(out, Op.FUSED) == 1
    assert_same_values(g, out, random_feeds(g))


def test_passes_leave_loop_free_graphs_valid():
    x = ur.input("x", (3, 4))
    g = ur.graph(ur.tanh(x) * 2.0 + 0.0)
    for _, fn in ALL_PASSES:
        assert_same_values(g, fn(g), random_feeds(g))


def test_each_backend_declares_its_passes_and_compile_reads_them(monkeypatch):
    """ur.compile's passes come from one place: `pass_pipeline(backend)` = the backend module's
    PASSES (numpy none), minus `passes={"disable": ...}`, none with optimize=False; the pipeline is
    what the backend's compile_graph receives."""
    import importlib

    from unroll.compile import BACKENDS, pass_pipeline
    for name in ("numpy", "numba", "cuda"):
        assert pass_pipeline(name) == tuple(importlib.import_module(BACKENDS[name]).PASSES)
        assert pass_pipeline(name, optimize=False) == ()
    assert "hoist" not in pass_pipeline("numba", passes={"disable": ("hoist",)})
    with pytest.raises(ValueError, match="unknown pass"):
        pass_pipeline("numba", passes={"disable": ("no_such_pass",)})
    from unroll.backends import numpy_ref
    seen = []
    real = numpy_ref.compile_graph
    monkeypatch.setattr(numpy_ref, "PASSES", ("simplify", "hoist"))
    monkeypatch.setattr(numpy_ref, "compile_graph", lambda g, passes, **kw: seen.append(passes) or real(g, passes))
    x = ur.input("x", (2,))
    ur.compile(ur.tanh(x) * 2.0, backend="numpy")
    ur.compile(ur.tanh(x) * 2.0, backend="numpy", optimize=False)
    assert seen == [("simplify", "hoist"), ()]
