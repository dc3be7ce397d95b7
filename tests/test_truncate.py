"""Truncated BPTT: forward values unchanged, gradients equal PyTorch's detach-per-chunk idiom (and
Williams & Peng's (k1, k2) form), k >= T is full BPTT, and the cut backward work is really gone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import random_feeds

import unroll as ur
from unroll.backends import numpy_ref
from unroll.ir.dce import dce
from unroll.ir.node import Graph, all_nodes, nested_body
from unroll.ir.ops import Op

F64 = "float64"


def run(nodes, feeds):
    graph = Graph.of(list(nodes))
    ur.verify(graph)
    return numpy_ref.evaluate(graph, [feeds[name] for name in graph.input_names])


# ---- twin models: the same cell in unroll and in torch ----------------------------------------------

def ur_model(kind, T, B, I, H, reverse, final_loss=True):
    """loss = sum(ys * r) + sum(h_T^2) (the second term if final_loss); wrt = weights, x, h0(, c0)."""
    G = 4 if kind == "lstm" else 1
    W, U = ur.param("W", (I, G * H), 0.5, F64), ur.param("U", (H, G * H), 0.5, F64)
    x, h0, r = ur.input("x", (T, B, I), F64), ur.input("h0", (B, H), F64), ur.input("r", (T, B, H), F64)
    if kind == "lstm":
        c0 = ur.input("c0", (B, H), F64)

        def step(state, x_t):
            h, c = state
            i, f, g, o = ur.split(x_t @ W + h @ U, 4, axis=-1)
            c = ur.sigmoid(f) * c + ur.sigmoid(i) * ur.tanh(g)
            h = ur.sigmoid(o) * ur.tanh(c)
            return (h, c), h
        (h_T, _), ys = ur.scan(step, (h0, c0), x, reverse=reverse)
        wrt = [W, U, x, h0, c0]
    else:
        h_T, ys = ur.scan(lambda h, x_t: (ur.tanh(x_t @ W + h @ U),) * 2, h0, x, reverse=reverse)
        wrt = [W, U, x, h0]
    return (ur.sum(ys * r) + ur.sum(h_T * h_T) if final_loss else ur.sum(ys * r)), wrt


def torch_step(kind, W, U):
    if kind == "lstm":
        def step(state, x_t):
            h, c = state
            i, f, g, o = torch.chunk(x_t @ W + h @ U, 4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        return step
    return lambda h, x_t: torch.tanh(x_t @ W + h @ U)


def torch_truncated(kind, feeds, T, k1, k2, reverse):
    """Williams & Peng in PyTorch: chunk c's losses see the state at max(0, (c+1)*k1 - k2) detached
    ((k, k): the usual run-k-steps / h.detach() loop). Steps run in processing order."""
    t = {name: torch.tensor(value, requires_grad=True) for name, value in feeds.items()}
    step = torch_step(kind, t["W"], t["U"])
    state0 = (t["h0"], t["c0"]) if kind == "lstm" else t["h0"]
    hidden = (lambda s: s[0]) if kind == "lstm" else (lambda s: s)
    detach = (lambda s: tuple(v.detach() for v in s)) if kind == "lstm" else (lambda s: s.detach())
    time = (lambda p: T - 1 - p) if reverse else (lambda p: p)
    with torch.no_grad():  # the true states, as values
        states = [state0]
        for p in range(T):
            states.append(step(states[-1], t["x"][time(p)]))
    total = 0.0
    for c in range(math.ceil(T / k1)):
        start, end = max(0, c * k1 - (k2 - k1)), min((c + 1) * k1, T)
        state = state0 if start == 0 else detach(states[start])
        for p in range(start, end):
            state = step(state, t["x"][time(p)])
            if p >= c * k1:
                total = total + (hidden(state) * t["r"][time(p)]).sum()
        if end == T:
            total = total + (hidden(state) ** 2).sum()
    total.backward()
    return float(total.detach()), t


CASES = [(5, 2), (6, 3), (7, 3), (5, 1), (8, 3), (9, (2, 3)), (9, (2, 5)), (10, (3, 4)), (7, (1, 3))]


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
@pytest.mark.parametrize("T,k", CASES, ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_truncated_gradients_equal_pytorch_detach_per_chunk(kind, T, k, reverse):
    k1, k2 = (k, k) if isinstance(k, int) else k
    loss, wrt = ur_model(kind, T, 2, 3, 2, reverse)
    feeds = random_feeds(Graph.of([loss]), T * 31 + k1 * 7 + k2)
    truncated = ur.truncate(loss, k)
    value, *grads = run([truncated, *ur.grad(truncated, wrt)], feeds)
    want_value, tensors = torch_truncated(kind, feeds, T, k1, k2, reverse)
    assert value == pytest.approx(want_value, rel=1e-13)  # forward values unchanged
    for node, g in zip(wrt, grads):
        want = tensors[node.name].grad.numpy()
        np.testing.assert_allclose(g, want, rtol=1e-10, atol=1e-12, err_msg=node.name)


@settings(max_examples=20)
@given(T=st.integers(1, 9), k1=st.integers(1, 5), extra=st.integers(0, 4), reverse=st.booleans(),
       kind=st.sampled_from(["rnn", "lstm"]), seed=st.integers(0, 2**32 - 1))
def test_forward_values_are_unchanged_and_agree_with_unrolling(T, k1, extra, reverse, kind, seed):
    loss, wrt = ur_model(kind, T, 2, 2, 2, reverse)
    feeds = random_feeds(Graph.of([loss]), seed)
    truncated = ur.truncate(loss, (k1, k1 + extra))
    ur.verify(Graph.of([truncated]))
    assert run([truncated], feeds)[0] == pytest.approx(run([loss], feeds)[0], rel=1e-13)
    grads = run(ur.grad(truncated, wrt), feeds)
    unrolled = run(ur.grad(ur.unroll(truncated), wrt), feeds)
    for a, b_ in zip(grads, unrolled):
        np.testing.assert_allclose(a, b_, rtol=1e-11, atol=1e-13)


def test_k_at_least_T_is_full_bptt():
    loss, wrt = ur_model("rnn", 5, 2, 3, 2, False)
    assert ur.truncate(loss, 5) is loss
    assert ur.truncate(loss, 50) is loss
    assert ur.truncate(loss, (2, 6)) is loss  # every window reaches back to step 0
    feeds = random_feeds(Graph.of([loss]), 0)
    _, tensors = torch_truncated("rnn", feeds, 5, 5, 5, False)
    for node, g in zip(wrt, run(ur.grad(ur.truncate(loss, 5), wrt), feeds)):
        np.testing.assert_allclose(g, tensors[node.name].grad.numpy(), rtol=1e-10)


def test_returns_the_kind_it_was_given_and_marks_its_nodes():
    loss, _ = ur_model("rnn", 6, 1, 2, 2, False)
    graph = ur.graph(loss, names=["loss"])
    before = {n for n, _ in all_nodes(graph)}
    out = ur.truncate(graph, 2)
    assert isinstance(out, Graph) and out.output_names == ("loss",) and out.inputs == graph.inputs
    assert isinstance(ur.truncate([loss, loss], 2), list)
    made = [n for n, _ in all_nodes(out) if n not in before]
    assert {n.role for n in made} == {"truncate", None}  # None: the user's loss rebuilt on top
    assert out.outputs[0].role is None
    assert all(n.role == "truncate" for n in made if n.op in (Op.LOOP, Op.STOP_GRADIENT, Op.CONCAT))
    assert any(n.op is Op.STOP_GRADIENT for n in made)
    with pytest.raises(ValueError, match="k >= 1"):
        ur.truncate(loss, 0)
    with pytest.raises(ValueError, match="k1 <= k2"):
        ur.truncate(loss, (3, 2))


# ---- the dead backward work is gone -------------------------------------------------------------------

def executed(nodes, op):
    """How many times `op` runs: nodes in a loop body count once per step."""
    total = 0
    for node in Graph((), tuple(nodes)).nodes():
        total += node.op is op
        body = nested_body(node)
        if body is not None:
            total += node.arg.length * executed(list(body.outputs), op)
    return total


@pytest.mark.parametrize("T,k", [(7, 3), (8, 2), (9, 3), (6, 1)])
def test_truncation_removes_the_carry_cotangent_work_at_every_chunk_boundary(T, k):
    """tanh RNN, gradients w.r.t. W and U: per step the forward runs 2 matmuls, the backward 3
    (dW = x^T dz, dU = h^T dz, dh = dz U^T). Truncated, the first step of every chunk after the
    first computes no dh: exactly one matmul fewer per chunk boundary, and no loop carries dh
    across chunks."""
    loss, wrt = ur_model("rnn", T, 2, 3, 4, False, final_loss=False)
    weights = wrt[:2]

    def after_dce(target):
        value, grads = ur.value_and_grad(target, weights)
        return list(dce(Graph.of([value, *grads])).outputs)
    full = after_dce(loss)
    cut = after_dce(ur.truncate(loss, k))
    assert executed(full, Op.MATMUL) == 5 * T
    boundaries = math.ceil(T / k) - 1
    assert executed(cut, Op.MATMUL) == 5 * T - boundaries
    # full BPTT: the backward loop carries dW, dU and dh. Truncated: the first chunk's backward
    # loop does (k steps), the loop over the other chunks carries only dW and dU (each chunk's dh
    # lives in that chunk's own backward loop, nested in the body)
    def backward_loops(nodes):
        return sorted((n.arg.length, n.arg.n_carry) for n in Graph((), tuple(nodes)).nodes()
                      if n.op is Op.LOOP and n.role == "backward")
    assert backward_loops(full) == [(T, 3)]
    assert backward_loops(cut) == sorted([(k, 3), (T // k - 1, 2)])
    feeds = random_feeds(Graph.of([loss]), 3)
    for a, b_ in zip(run(full, feeds)[1:], run(ur.grad(ur.truncate(loss, T), weights), feeds)):
        np.testing.assert_allclose(a, b_, rtol=1e-12)


def test_truncation_bias_reports_relative_error_per_k():
    loss, wrt = ur_model("lstm", 8, 2, 3, 3, False)
    feeds = random_feeds(Graph.of([loss]), 4)
    bias = ur.truncation_bias(loss, wrt[:2], [1, 2, 4, 8, (2, 6)], feeds)
    assert set(bias) == {1, 2, 4, 8, (2, 6)}
    assert bias[8] == 0.0
    assert all(0.0 < bias[k] < 10.0 for k in (1, 2, 4))
    full = np.concatenate([g.ravel() for g in run(ur.grad(loss, wrt[:2]), feeds)])
    cut = np.concatenate([g.ravel() for g in run(ur.grad(ur.truncate(loss, 2), wrt[:2]), feeds)])
    assert bias[2] == pytest.approx(np.linalg.norm(cut - full) / np.linalg.norm(full), rel=1e-12)


def test_user_nodes_between_truncated_loops_keep_their_role():
    x = ur.input("x", (6, 2, 3), F64)
    W, U = ur.param("W", (3, 3), 0.5, F64), ur.param("U", (3, 3), 0.5, F64)
    _, ys1 = ur.scan(lambda h, x_t: (ur.tanh(x_t @ W + h),) * 2, ur.zeros((2, 3), F64), x)
    between = ur.sigmoid(ys1)
    _, ys2 = ur.scan(lambda h, x_t: (ur.tanh(x_t @ U + h),) * 2, ur.zeros((2, 3), F64), between)
    loss = ur.sum(ys2)
    out = ur.truncate(loss, 2)
    rebuilt = [n for n in Graph.of([out]).nodes() if n.op is Op.SIGMOID]
    assert len(rebuilt) == 1 and rebuilt[0] is not between and rebuilt[0].role is None
    feeds = random_feeds(Graph.of([loss]), 0)
    assert run([out], feeds)[0] == pytest.approx(run([loss], feeds)[0], rel=1e-14)
