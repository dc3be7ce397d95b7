"""BPTT through rolled loops: grad(loop) == grad(unroll(loop)) to float64 round-off for hand-written
RNN/LSTM/GRU cells, random cells and random graphs with (nested) loops; the three save policies
give the same gradients; a Hessian-vector product matches finite differences of the gradient."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import graphs, random_feeds, rnn_cells

import unroll as ur
from unroll.backends import numpy_ref
from unroll.ir.node import Graph, all_nodes
from unroll.ir.ops import Op

F64 = "float64"
POLICIES = [ur.SaveAll(), ur.Recompute(), ur.Checkpoint(1), ur.Checkpoint(2), ur.Checkpoint(3)]


def run(nodes, feeds):
    graph = Graph.of(list(nodes))
    ur.verify(graph)
    return numpy_ref.evaluate(graph, [feeds[name] for name in graph.input_names])


def assert_rel(got, want, rtol):
    for g, w in zip(got, want):
        assert g.shape == w.shape
        scale = max(np.abs(w).max(initial=0.0), 1e-300)
        assert np.abs(g - w).max(initial=0.0) <= rtol * scale, (np.abs(g - w).max(), scale)


# ---- hand-written cells ------------------------------------------------------------------------------

def rnn_model(T, B, I, H, reverse):
    W, U, bias = ur.param("W", (I, H), 0.5, F64), ur.param("U", (H, H), 0.5, F64), ur.param("b", (H,), 0.5, F64)
    x, h0 = ur.input("x", (T, B, I), F64), ur.input("h0", (B, H), F64)
    h_T, ys = ur.scan(lambda h, x_t: (ur.tanh(x_t @ W + h @ U + bias),) * 2, h0, x, reverse=reverse)
    return [W, U, bias, x, h0], ys, [h_T]


def lstm_model(T, B, I, H, reverse):
    W, U, bias = ur.param("W", (I, 4 * H), 0.5, F64), ur.param("U", (H, 4 * H), 0.5, F64), ur.param("b", (4 * H,), 0.5, F64)
    x, h0, c0 = ur.input("x", (T, B, I), F64), ur.input("h0", (B, H), F64), ur.input("c0", (B, H), F64)

    def step(state, x_t):
        h, c = state
        i, f, g, o = ur.split(x_t @ W + h @ U + bias, 4, axis=-1)
        c = ur.sigmoid(f) * c + ur.sigmoid(i) * ur.tanh(g)
        h = ur.sigmoid(o) * ur.tanh(c)
        return (h, c), h
    (h_T, c_T), ys = ur.scan(step, (h0, c0), x, reverse=reverse)
    return [W, U, bias, x, h0, c0], ys, [h_T, c_T]


def gru_model(T, B, I, H, reverse):
    W = [ur.param(f"W{k}", (I, H), 0.5, F64) for k in range(3)]
    U = [ur.param(f"U{k}", (H, H), 0.5, F64) for k in range(3)]
    bias = [ur.param(f"b{k}", (H,), 0.5, F64) for k in range(3)]
    x, h0 = ur.input("x", (T, B, I), F64), ur.input("h0", (B, H), F64)

    def step(h, x_t):
        z = ur.sigmoid(x_t @ W[0] + h @ U[0] + bias[0])
        r = ur.sigmoid(x_t @ W[1] + h @ U[1] + bias[1])
        n = ur.tanh(x_t @ W[2] + r * (h @ U[2] + bias[2]))
        h = (1.0 - z) * n + z * h
        return h, h
    h_T, ys = ur.scan(step, h0, x, reverse=reverse)
    return [*W, *U, *bias, x, h0], ys, [h_T]


MODELS = {"rnn": rnn_model, "lstm": lstm_model, "gru": gru_model}


def model_loss(kind, T, B, I, H, reverse):
    wrt, ys, finals = MODELS[kind](T, B, I, H, reverse)
    r = ur.input("r", ys.shape, F64)  # random weights make every output element matter differently
    loss = ur.sum(ys * r) + sum(ur.sum(f * f) for f in finals)
    return loss, wrt


SHAPE = st.tuples(st.integers(1, 6), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))


@pytest.mark.parametrize("kind", sorted(MODELS))
@settings(max_examples=10)
@given(shape=SHAPE, reverse=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_grad_of_loop_equals_grad_of_unrolled(kind, shape, reverse, seed):
    loss, wrt = model_loss(kind, *shape, reverse)
    feeds = random_feeds(Graph.of([loss]), seed)
    rolled = run(ur.grad(loss, wrt), feeds)
    unrolled_loss = ur.unroll(loss)
    assert not any(n.op is Op.LOOP for n in Graph.of([unrolled_loss]).nodes())
    assert_rel(run(ur.grad(unrolled_loss, wrt), feeds), rolled, 1e-12)
    factor = max(1, shape[0] // 2)
    assert_rel(run(ur.grad(ur.unroll(loss, factor), wrt), feeds), rolled, 1e-12)


@pytest.mark.parametrize("kind", sorted(MODELS))
@settings(max_examples=6)
@given(shape=SHAPE, reverse=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_policies_give_identical_gradients(kind, shape, reverse, seed):
    loss, wrt = model_loss(kind, *shape, reverse)
    feeds = random_feeds(Graph.of([loss]), seed)
    want = run(ur.grad(loss, wrt), feeds)
    for policy in POLICIES[1:]:
        value, grads = ur.value_and_grad(loss, wrt, policy=policy)
        got = run([value, *grads], feeds)
        assert_rel(got[1:], want, 1e-12)
        np.testing.assert_allclose(got[0], run([loss], feeds)[0], rtol=1e-14)


def test_lstm_gradient_matches_finite_differences():
    loss, wrt = model_loss("lstm", 4, 2, 3, 2, False)
    feeds = random_feeds(Graph.of([loss]), 7)
    grads = run(ur.grad(loss, wrt), feeds)
    f = ur.compile(loss, backend="numpy")
    rng, eps = np.random.default_rng(1), 1e-6
    for node, g in zip(wrt, grads):
        v = rng.standard_normal(node.shape)
        plus, minus = dict(feeds), dict(feeds)
        plus[node.name], minus[node.name] = feeds[node.name] + eps * v, feeds[node.name] - eps * v
        fd = (f(**plus) - f(**minus)) / (2 * eps)
        assert float(np.sum(g * v)) == pytest.approx(float(fd), rel=1e-7, abs=1e-9)


# ---- random cells and random graphs ------------------------------------------------------------------

def _scalar_loss(graph: Graph):
    """A scalar that weighs every float output element differently (weights are inputs)."""
    terms = []
    for i, out in enumerate(graph.outputs):
        if out.dtype == F64:
            terms.append(ur.sum(out * ur.input(f"weight{i}", out.shape, F64)))
    return sum(terms[1:], terms[0]) if terms else None


@settings(max_examples=20)
@given(cell=rnn_cells(dtype=F64))
def test_random_cells_grad_of_loop_equals_grad_of_unrolled(cell):
    graph, feeds = cell
    loss = _scalar_loss(graph)
    wrt = [n for n in Graph.of([loss]).inputs if n.dtype == F64 and not n.name.startswith("weight")]
    feeds = {**feeds, **random_feeds(Graph.of([loss]), 3)}
    feeds.update({k: v for k, v in cell[1].items()})
    want = run(ur.grad(loss, wrt), feeds)
    assert_rel(run(ur.grad(ur.unroll(loss), wrt), feeds), want, 1e-11)
    assert_rel(run(ur.grad(loss, wrt, policy=ur.Recompute()), feeds), want, 1e-12)


@settings(max_examples=30)
@given(graph=graphs(dtype=F64, min_loops=1, max_loops=2), seed=st.integers(0, 2**32 - 1))
def test_random_graphs_with_loops_grad_equals_grad_of_unrolled(graph, seed):
    loss = _scalar_loss(graph)
    if loss is None:
        return
    inputs = Graph.of([loss]).inputs
    wrt = [n for n in inputs if n.dtype == F64 and not n.name.startswith("weight")]
    if not wrt:
        return
    feeds = random_feeds(Graph.of([loss]), seed)
    grads = ur.grad(loss, wrt)
    ur.verify(Graph.of(grads))
    want = run(grads, feeds)
    # a cast to float32 inside the float64 graph rounds its cotangent to float32 too: sums that
    # differ in the last float64 bit (the unrolled graph adds in another order) may round to
    # neighbouring float32 values there, 6e-8 apart (found: a cast f64 -> f32 -> f64 in a step)
    rounded = any(n.op is Op.CAST and n.dtype == "float32" for n, _ in all_nodes(Graph.of([loss])))
    rtol = 1e-6 if rounded else 1e-9
    assert_rel(run(ur.grad(ur.unroll(loss), wrt), feeds), want, rtol)
    assert_rel(run(ur.grad(loss, wrt, policy=ur.Checkpoint(2)), feeds), want, rtol)


# ---- nesting, merging, second order -----------------------------------------------------------------

def test_nested_scans():
    T, S, B, H = 3, 2, 2, 3
    x = ur.input("x", (T, S, B, H), F64)
    W, U = ur.param("W", (H, H), 0.5, F64), ur.param("U", (H, H), 0.5, F64)

    def outer(h, x_t):
        def inner(c, x_ts):
            c = ur.tanh(x_ts @ W + c @ U)
            return c, c * h
        c, cs = ur.scan(inner, h, x_t)
        return ur.sigmoid(c + h), ur.sum(cs, 0)
    h_T, ys = ur.scan(outer, ur.input("h0", (B, H), F64), x, reverse=True)
    loss = ur.sum(ys * ys) + ur.mean(h_T)
    wrt = [W, U, x]
    feeds = random_feeds(Graph.of([loss]), 5)
    want = run(ur.grad(ur.unroll(loss), wrt), feeds)
    for policy in POLICIES:
        assert_rel(run(ur.grad(loss, wrt, policy=policy), feeds), want, 1e-12)
    value, grads = ur.value_and_grad(loss, wrt)
    loops = [n for n in Graph.of([value, *grads]).nodes() if n.op is Op.LOOP]
    assert len(loops) == 2  # one forward (with the residuals of its inner loop), one backward
    # the forward body runs its inner loop once: the residuals come from the same inner loop
    forward = next(n for n in loops if n.arg.reverse)
    assert sum(1 for n in forward.arg.body.nodes() if n.op is Op.LOOP) == 1


def test_stacked_layers_share_every_forward_loop():
    T, B, H = 4, 2, 3
    x = ur.input("x", (T, B, H), F64)
    Ws = [ur.param(f"W{k}", (H, H), 0.5, F64) for k in range(3)]
    seq = x
    for W in Ws:
        _, seq = ur.scan(lambda h, x_t, W=W: (ur.tanh(x_t @ W + h),) * 2, ur.zeros((B, H), F64), seq)
    loss = ur.mean(seq * seq)
    value, grads = ur.value_and_grad(loss, Ws)
    forward = [n for n in Graph.of([value, *grads]).nodes() if n.op is Op.LOOP and not n.arg.reverse]
    assert len(forward) == 3
    feeds = random_feeds(Graph.of([loss]), 2)
    assert_rel(run(grads, feeds), run(ur.grad(ur.unroll(loss), Ws), feeds), 1e-12)


def test_hessian_vector_product_matches_finite_differences_of_the_gradient():
    T, B, I, H = 5, 2, 3, 3
    loss, wrt = model_loss("rnn", T, B, I, H, False)
    theta = wrt[:3]  # W, U, b
    vs = [ur.input(f"v{k}", p.shape, F64) for k, p in enumerate(theta)]
    grads = ur.grad(loss, theta)
    hvp = ur.grad(sum((ur.sum(g * v) for g, v in zip(grads, vs)), ur.const(0.0, (), F64)), theta)
    ur.verify(Graph.of(hvp))
    feeds = random_feeds(Graph.of([loss, *vs]), 11)
    got = run(hvp, feeds)
    grad_fn = ur.compile(grads, backend="numpy")
    eps = 1e-5

    def grads_at(sign):
        shifted = {k: v for k, v in feeds.items() if k in grad_fn.input_names}
        for p, v in zip(theta, vs):
            shifted[p.name] = feeds[p.name] + sign * eps * feeds[v.name]
        return grad_fn(**shifted)
    fd = [(a - b) / (2 * eps) for a, b in zip(grads_at(1), grads_at(-1))]
    assert_rel(got, fd, 1e-7)
    # second order through both loops of the first-order graph: the forward and the backward loop
    loops = [n for n, _ in all_nodes(Graph.of(hvp)) if n.op is Op.LOOP]
    assert len({n.arg.reverse for n in loops}) == 2


@pytest.mark.parametrize("policy", POLICIES[:3], ids=lambda p: type(p).__name__)
def test_gradient_graphs_unroll_and_verify(policy):
    """The backward pass is ordinary IR: other passes (here unroll) take it as it is."""
    loss, wrt = model_loss("lstm", 4, 2, 2, 3, True)
    grads = ur.grad(loss, wrt, policy=policy)
    feeds = random_feeds(Graph.of([loss]), 9)
    unrolled = ur.unroll(Graph.of(grads))
    ur.verify(unrolled)
    assert not any(n.op is Op.LOOP for n, _ in all_nodes(unrolled))
    assert_rel(run(unrolled.outputs, feeds), run(grads, feeds), 1e-12)
