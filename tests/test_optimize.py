"""ur.optimize on RNN training graphs: per-step matmul and kernel counts after the default pipeline
(ur.nn LSTM/GRU/RNN, a hand-written four-matmul LSTM cell), explain/report/diff, disabling passes,
and golden IR text before/after each pass (regenerate with UPDATE_GOLDEN=1)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

import unroll as ur
from strategies import evaluate, random_feeds
from unroll.ir.node import Graph, Node, all_nodes
from unroll.ir.ops import ELEMENTWISE, Op
from unroll.ir.text import print_graph

GOLDEN = Path(__file__).parent / "golden"
T, B, I, H = 4, 2, 5, 3


# ---- models -------------------------------------------------------------------------------------

def nn_training(kind: str, dtype: str = "float32") -> tuple[Graph, list[Node]]:
    """loss = mean((out - y)**2) of ur.nn.<kind>, and its gradients w.r.t. all parameters."""
    x = ur.input("x", (T, B, I), dtype)
    y = ur.input("y", (T, B, H), dtype)
    model = getattr(ur.nn, kind)(I, H, dtype=dtype)
    out, _ = model(x)
    loss, grads = ur.value_and_grad(ur.mean((out - y) ** 2), model.parameters())
    names = [n.name for n in model.parameters()]
    return ur.graph(loss, *grads, names=["loss"] + [f"d_{n}" for n in names]), model.parameters()


def hand_lstm(dtype: str = "float32", train: bool = True) -> tuple[Graph, list[Node]]:
    """An LSTM cell written by hand with four separate input and four separate recurrent matmuls."""
    x = ur.input("x", (T, B, I), dtype)
    y = ur.input("y", (T, B, H), dtype)
    gates = "ifgo"
    w_x = [ur.param(f"w_x{g}", (I, H), 0.5, dtype) for g in gates]
    w_h = [ur.param(f"w_h{g}", (H, H), 0.5, dtype) for g in gates]
    bias = [ur.param(f"b_{g}", (H,), 0.5, dtype) for g in gates]

    def cell(state, x_t):
        h, c = state
        i, f, g, o = (x_t @ w_x[k] + h @ w_h[k] + bias[k] for k in range(4))
        c = ur.sigmoid(f) * c + ur.sigmoid(i) * ur.tanh(g)
        h = ur.sigmoid(o) * ur.tanh(c)
        return (h, c), h
    zero = ur.zeros((B, H), dtype)
    _, out = ur.scan(cell, (zero, zero), x)
    params = w_x + w_h + bias
    if not train:
        return ur.graph(out, names=["out"]), params
    loss, grads = ur.value_and_grad(ur.mean((out - y) ** 2), params)
    return ur.graph(loss, *grads), params


# ---- helpers ------------------------------------------------------------------------------------

def loops(graph: Graph) -> list[Node]:
    return [n for n, _ in all_nodes(graph) if n.op is Op.LOOP]


def body_nodes(loop: Node, ops) -> list[Node]:
    return [n for n in loop.arg.body.nodes() if n.op in ops]


def split_loops(graph: Graph) -> tuple[Node, Node]:
    (fwd,) = [lp for lp in loops(graph) if not lp.arg.reverse]
    (bwd,) = [lp for lp in loops(graph) if lp.arg.reverse]
    return fwd, bwd


def assert_training_counts(graph: Graph, params: list[Node], x_shape=(T, B, I)) -> None:
    ur.verify(graph)
    fwd, bwd = split_loops(graph)
    for loop in (fwd, bwd):
        assert len(body_nodes(loop, {Op.MATMUL})) == 1, "one matmul per step"
        assert len(body_nodes(loop, {Op.FUSED})) == 1, "one fused kernel per step"
        assert not body_nodes(loop, ELEMENTWISE), "no elementwise op left outside the kernel"
    # the forward matmul is the recurrent one: it reads the carried h
    (mm,) = body_nodes(fwd, {Op.MATMUL})
    n_c, n_h = fwd.arg.n_consts, fwd.arg.n_carry
    assert mm.src[0].op is Op.ARG and n_c <= mm.src[0].arg < n_c + n_h
    # the input projection runs once, before the loop, on (T*B, I) rows
    top = [n for n in graph.nodes() if n.op is Op.MATMUL]
    rows = x_shape[0] * x_shape[1]
    assert any(m.src[0].shape == (rows, x_shape[2]) and m.src[0].op is Op.RESHAPE for m in top)
    # weight gradients are computed after the loop, not carried through it
    carried = {t.shape for t in bwd.type[:bwd.arg.n_carry]}
    assert not carried & {p.shape for p in params}
    assert all(len(m.src[0].shape) == 2 for m in top)


# ---- the default pipeline on training graphs ----------------------------------------------------

@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_nn_training_graph_counts(kind):
    graph, params = nn_training(kind)
    assert_training_counts(ur.optimize(graph), params)


def test_hand_written_lstm_counts():
    graph, params = hand_lstm()
    fwd, bwd = split_loops(graph)
    assert len(body_nodes(fwd, {Op.MATMUL})) == 8
    assert_training_counts(ur.optimize(graph), params)


@pytest.mark.parametrize("build", [lambda: nn_training("LSTM", "float64")[0],
                                   lambda: nn_training("GRU", "float64")[0],
                                   lambda: hand_lstm("float64")[0]])
def test_optimized_training_graphs_compute_the_same(build):
    graph = build()
    feeds = random_feeds(graph, 7)
    for want, got in zip(evaluate(graph, feeds), evaluate(ur.optimize(graph), feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_truncated_training_graph_keeps_its_values():
    x = ur.input("x", (7, B, I), "float64")
    y = ur.input("y", (7, B, H), "float64")
    model = ur.nn.LSTM(I, H, dtype="float64")
    out, _ = model(x)
    loss = ur.truncate(ur.mean((out - y) ** 2), 3)
    loss, grads = ur.value_and_grad(loss, model.parameters())
    graph = ur.graph(loss, *grads)
    optimized = ur.optimize(graph)
    feeds = random_feeds(graph, 1)
    for want, got in zip(evaluate(graph, feeds), evaluate(optimized, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert all(len(body_nodes(lp, ELEMENTWISE)) == 0 for lp in loops(optimized))


# ---- explain, report, diff, disable -------------------------------------------------------------

def test_explain_table_and_diffs():
    graph, _ = nn_training("LSTM")
    report = ur.explain(graph)
    text = str(report)
    for column in ("pass", "nodes", "mm/step", "fused/step", "flops/step", "bytes/step"):
        assert column in text
    names = [s.name for s in report.steps]
    assert names == ["input", "simplify", "fuse_matmuls", "hoist", "simplify", "fuse_cells", "simplify"]
    first, last = report.steps[0].stats, report.steps[-1].stats
    assert [c.matmuls for c in first.loops] == [2, 3] and [c.matmuls for c in last.loops] == [1, 1]
    assert [c.fused for c in last.loops] == [1, 1]
    assert sum(c.bytes for c in last.loops) < sum(c.bytes for c in first.loops)
    assert report.graph == ur.optimize(graph)
    diff = report.diff("hoist")
    assert diff.startswith("--- before hoist") and "\n+" in diff and "\n-" in diff
    assert "fused" in report.diff("fuse_cells")
    optimized, rep = ur.optimize(graph, report=True)
    assert optimized == rep.graph


def test_disable_and_custom_pipelines():
    graph, _ = nn_training("LSTM")
    no_fuse = ur.optimize(graph, disable=("fuse_cells",))
    assert not [n for n, _ in all_nodes(no_fuse) if n.op is Op.FUSED]
    no_hoist = ur.optimize(graph, disable=("hoist",))
    fwd, _ = split_loops(no_hoist)
    assert len(body_nodes(fwd, {Op.MATMUL})) == 2
    only = ur.optimize(graph, passes=["simplify", "hoist"])
    assert len(body_nodes(split_loops(only)[0], {Op.MATMUL})) == 1
    with pytest.raises(ValueError, match="unknown pass"):
        ur.optimize(graph, disable=("fuse_everything",))
    with pytest.raises(ValueError, match="unknown pass"):
        ur.optimize(graph, passes=["nope"])


def test_explain_without_loops():
    x = ur.input("x", (3, 4))
    report = ur.explain(ur.graph(ur.tanh(x) * 1.0))
    assert report.steps[-1].stats.nodes == 2
    assert " - " in str(report)


# ---- golden IR ----------------------------------------------------------------------------------

GOLDEN_MODELS = {
    "lstm_train": lambda: nn_training("LSTM")[0],
    "gru_train": lambda: nn_training("GRU")[0],
    "hand_lstm_forward": lambda: hand_lstm(train=False)[0],
}


def golden_text(graph: Graph) -> str:
    """Printed IR without trailing side-data comments (roles depend on which builder first made an
    interned node, so they may differ with test order)."""
    return "\n".join(re.sub(r"\s+# .*$", "", line) for line in print_graph(graph).splitlines()) + "\n"


@pytest.mark.parametrize("model", sorted(GOLDEN_MODELS))
def test_golden_ir_before_and_after_each_pass(model):
    report = ur.explain(GOLDEN_MODELS[model]())
    folder = GOLDEN / model
    update = os.environ.get("UPDATE_GOLDEN") == "1"
    if update:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.txt"):
            old.unlink()
    for i, step in enumerate(report.steps):
        path = folder / f"{i}_{step.name}.txt"
        text = golden_text(step.graph)
        if update:
            path.write_text(text)
        else:
            assert path.exists(), f"missing {path}; run with UPDATE_GOLDEN=1"
            assert text == path.read_text(), f"{path} differs; inspect, then UPDATE_GOLDEN=1"


def test_optimizing_twice_keeps_values_and_counts():
    graph, params = nn_training("GRU", "float64")
    once = ur.optimize(graph)
    twice = ur.optimize(once)
    assert_training_counts(twice, params)
    feeds = random_feeds(graph, 2)
    for want, got in zip(evaluate(graph, feeds), evaluate(twice, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
