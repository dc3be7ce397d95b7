"""Gradient-flow diagnostics: ‖∂L/∂h_t‖ per step, checked against finite differences; the PNG plot."""

from __future__ import annotations

import numpy as np
import pytest

import unroll as ur
from unroll import nn
from unroll.data import adding_problem
from unroll.diagnostics import (
    PROBE_NAME,
    GradientFlow,
    compare_gradient_flow,
    gradient_flow,
    plot_gradient_flow,
    probed_outputs,
)

T, B, I, H = 6, 3, 2, 4


def _setup(kind: type, dtype: str = "float64", layers: int = 1, name: str = "rnn"):
    rnn = kind(I, H, num_layers=layers, dtype=dtype, name=name, seed=1)
    head = nn.Linear(H, 1, dtype=dtype, name=f"{name}_head", seed=2)
    x = ur.input("x", (T, B, I), dtype)
    y = ur.input("y", (B, 1), dtype)
    xv, yv = adding_problem(B, T, seed=3, dtype=np.dtype(dtype))
    return rnn, head, x, y, {"x": xv, "y": yv}


@pytest.mark.parametrize("kind", [nn.RNN, nn.LSTM, nn.GRU])
def test_flow_has_one_norm_per_step_and_matches_finite_differences(kind):
    rnn, head, x, y, feeds = _setup(kind)
    values = {**rnn.state_dict(), **head.state_dict()}

    def loss_fn(out):
        return nn.mse(head(out[T - 1]), y) + 0.1 * ur.mean(out * out)  # a loss on every step too

    flow = gradient_flow(rnn, loss_fn, x, feeds, values=values, name=kind.__name__, backend="numpy")
    assert isinstance(flow, GradientFlow) and flow.name == kind.__name__
    assert flow.norms.shape == (T,) and np.all(np.isfinite(flow.norms)) and np.all(flow.norms > 0)
    assert flow.gradient.shape == (T, B, H)
    np.testing.assert_allclose(flow.norms, np.sqrt((flow.gradient ** 2).sum(axis=(1, 2))))

    # ∂L/∂h_t is the total derivative: perturb h_t (and so every later step) along a direction
    probe = ur.input(PROBE_NAME, (T, B, H), "float64")
    loss = ur.compile(loss_fn(probed_outputs(rnn, x, probe)), backend="numpy")
    rng = np.random.default_rng(0)
    eps = 1e-6
    for t in (0, T // 2, T - 1):
        d = np.zeros((T, B, H))
        d[t] = rng.normal(size=(B, H))
        plus = loss(**feeds, **values, **{PROBE_NAME: eps * d})
        minus = loss(**feeds, **values, **{PROBE_NAME: -eps * d})
        numeric = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(numeric, np.sum(flow.gradient[t] * d[t]), rtol=1e-6, atol=1e-12)
    assert flow.loss == pytest.approx(float(loss(**feeds, **values, **{PROBE_NAME: np.zeros((T, B, H))})))


def test_zero_probe_leaves_the_forward_pass_unchanged_multilayer():
    rnn, head, x, y, feeds = _setup(nn.LSTM, layers=2, name="deep")
    values = {**rnn.state_dict(), **head.state_dict()}
    out, _ = rnn(x)
    reference = ur.compile(nn.mse(head(out[T - 1]), y), backend="numpy")(**feeds, **values)
    flow = gradient_flow(rnn, lambda o: nn.mse(head(o[T - 1]), y), x, feeds, values=values, backend="numpy")
    assert flow.loss == pytest.approx(float(reference), rel=1e-12)
    assert flow.norms.shape == (T,)


def test_loss_on_the_last_step_vanishes_backwards_for_a_tanh_rnn():
    rnn, head, x, y, feeds = _setup(nn.RNN, dtype="float32", name="van")
    flow = gradient_flow(rnn, lambda o: nn.mse(head(o[T - 1]), y), x, feeds,
                         values={**rnn.state_dict(), **head.state_dict()}, backend="numpy")
    assert flow.norms[0] < flow.norms[-1]
    assert 0 < flow.decay_per_step < 1
    assert "per step back" in str(flow)


def test_errors_are_clear():
    rnn, head, x, y, feeds = _setup(nn.GRU, name="err")
    with pytest.raises(KeyError, match="values="):
        gradient_flow(rnn, lambda o: nn.mse(head(o[T - 1]), y), x, feeds)       # head's values missing
    with pytest.raises(ur.ShapeError, match="scalar"):
        gradient_flow(rnn, lambda o: o, x, feeds, values=rnn.state_dict())
    bi = nn.GRU(I, H, bidirectional=True, dtype="float64", name="bi")
    with pytest.raises(ValueError, match="bidirectional"):
        gradient_flow(bi, lambda o: ur.mean(o), x, feeds, values=bi.state_dict())
    with pytest.raises(TypeError, match="RNN, LSTM or GRU"):
        gradient_flow(head, lambda o: ur.mean(o), x, feeds)  # type: ignore[arg-type]


def test_compare_and_plot_write_a_png(tmp_path):
    flows = compare_gradient_flow(T=5, batch=2, hidden=3, backend="numpy")
    assert [f.name for f in flows] == ["RNN", "LSTM", "GRU"]
    assert all(f.norms.shape == (5,) for f in flows)
    path = plot_gradient_flow(flows, tmp_path / "sub" / "flow.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="unknown kinds"):
        compare_gradient_flow(kinds=("LSTM", "Transformer"))


def test_compare_after_training_steps():
    (flow,) = compare_gradient_flow(kinds=("GRU",), T=4, batch=2, hidden=3, train_steps=2, backend="numpy")
    assert flow.extra["train_steps"] == 2 and np.all(np.isfinite(flow.norms))
