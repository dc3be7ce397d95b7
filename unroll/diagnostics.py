"""Gradient-flow diagnostics: ‖∂L/∂h_t‖ for every time step t, and a plot comparing models.

The lecture's vanishing/exploding-gradient story made visible. How it is measured: the top layer's
hidden state gets an additive probe, h_t' = h_t + e_t, fed with e = 0 (so nothing changes in the
forward pass), and the probe is a graph input. Then ∂L/∂e_t is exactly the *total* derivative of
the loss with respect to the hidden state at step t: through the output at t and through every
later step that the recurrence carries h_t into. One `ur.grad(loss, [e])` gives all T of them in
one backward pass, with the loop still rolled (no unrolling, no per-step graphs).

    rnn, head = ur.nn.LSTM(2, 32), ur.nn.Linear(32, 1)
    y = ur.input("y", (B, 1))
    flow = ur.gradient_flow(rnn, lambda out: ur.nn.mse(head(out[-1]), y), x, {"x": xv, "y": yv},
                            values={**rnn.state_dict(), **head.state_dict()})
    flow.norms            # (T,) array: ‖∂L/∂h_t‖ (Frobenius norm over the batch and hidden units)
    flow.gradient         # (T, B, H) array: ∂L/∂h_t itself
    plot_gradient_flow([flow, ...], "flow.png")

For a loss on the last step only, norms[T-1] is the direct gradient and norms[t] for t < T-1 is
what survives T-1-t steps of backpropagation through time: a straight line on a log scale whose
slope is the per-step decay (vanishing, < 1) or growth (exploding, > 1).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import dsl
from .ir.node import Node, user_location
from .ir.ops import ShapeError
from .nn.losses import mse
from .nn.rnn import RNNBase

PROBE_NAME = "gradient_flow_probe"

LossFn = Callable[[Node], Node]


@dataclass
class GradientFlow:
    """‖∂L/∂h_t‖ per time step for one model and batch (see the module docstring)."""

    name: str
    norms: np.ndarray                 # (T,) float64
    loss: float
    gradient: np.ndarray | None = None  # (T, B, H): ∂L/∂h_t itself
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def decay_per_step(self) -> float:
        """Geometric mean factor by which the norm changes per step back in time (from the last
        step to the first): < 1 vanishing, > 1 exploding. NaN when a norm is zero or not finite."""
        first, last = float(self.norms[0]), float(self.norms[-1])
        steps = len(self.norms) - 1
        if steps < 1 or not (first > 0 and last > 0 and math.isfinite(first) and math.isfinite(last)):
            return float("nan")
        return (first / last) ** (1.0 / steps)

    def __str__(self) -> str:
        n = self.norms
        return (f"{self.name}: loss {self.loss:.4g}, ‖∂L/∂h_t‖ from {n[-1]:.3g} (t={len(n) - 1}) to "
                f"{n[0]:.3g} (t=0), ×{self.decay_per_step:.3g} per step back")


def _check_rnn(rnn: object) -> None:
    if not isinstance(rnn, RNNBase):
        raise TypeError(f"gradient_flow: expected an ur.nn.RNN, LSTM or GRU, found {type(rnn).__name__}")


def probed_outputs(rnn: RNNBase, x: Node, probe: Node) -> Node:
    """The top layer's outputs (T, B, H) of a unidirectional `rnn` on x (T, B, I), computed as
    `rnn(x)` does (zero initial state) but with `probe[t]` added to the top layer's hidden state at
    each step, carried on to the next step too."""
    _check_rnn(rnn)
    if rnn.bidirectional:
        raise ValueError(f"gradient_flow: {rnn._describe()} is bidirectional; the flow of one direction "
                         f"is measured with a unidirectional module\n  at {user_location()}")
    rnn.check_input(x, (None, None, rnn.input_size), "input x (T, B, I)")
    steps, batch, hidden = x.shape[0], x.shape[1], rnn.hidden_size
    if probe.shape != (steps, batch, hidden):
        raise ShapeError(f"gradient_flow: probe must be {[steps, batch, hidden]}, found {probe.type}")
    zero = dsl.zeros((batch, hidden), rnn.dtype)
    init = (zero, zero) if rnn.has_cell_state else zero
    layer_in = x
    for layer in range(rnn.num_layers - 1):
        _, layer_in = dsl.scan(rnn.cell(layer), init=init, xs=layer_in)
    cell = rnn.cell(rnn.num_layers - 1)

    def step(state, x_e):  # type: ignore[no-untyped-def]
        x_t, e_t = x_e
        state, h = cell(state, x_t)
        h = h + e_t
        return ((h, state[1]) if rnn.has_cell_state else h), h

    _, out = dsl.scan(step, init=init, xs=(layer_in, probe))
    return out


def gradient_flow(rnn: RNNBase, loss_fn: LossFn, x: Node, feeds: Mapping[str, np.ndarray],
                  values: Mapping[str, np.ndarray] | None = None, backend: str | None = None,
                  name: str | None = None) -> GradientFlow:
    """‖∂L/∂h_t‖ for t = 0..T-1 on one batch.

    rnn: a unidirectional ur.nn.RNN / LSTM / GRU (its top layer is probed). loss_fn(outputs) builds
    the scalar loss from the top layer's outputs (T, B, H); it may use other modules and inputs.
    x: the symbolic input (T, B, I). feeds: arrays for x and the loss's other inputs, by name.
    values: parameter values by name (default: rnn.state_dict(); pass the head's too, e.g.
    `{**rnn.state_dict(), **head.state_dict()}`). The norm at step t is the Frobenius norm of
    ∂L/∂h_t over the batch and hidden units.
    """
    from .compile import compile
    from .ir.autodiff import value_and_grad  # late: a heavier module

    _check_rnn(rnn)
    steps, batch = x.shape[0], x.shape[1]
    probe = dsl.input(PROBE_NAME, (steps, batch, rnn.hidden_size), rnn.dtype)
    loss = loss_fn(probed_outputs(rnn, x, probe))
    if not isinstance(loss, Node) or loss.shape != ():
        found = loss.type_str() if isinstance(loss, Node) else type(loss).__name__
        raise ShapeError(f"gradient_flow: loss_fn must return a scalar, found {found}"
                         f"\n  at {user_location()}")
    loss, (d_probe,) = value_and_grad(loss, [probe])  # one forward loop for both
    run = compile([loss, d_probe], backend=backend)
    known = dict(rnn.state_dict() if values is None else values)
    known.update(feeds)
    known[PROBE_NAME] = np.zeros(probe.shape, probe.dtype)
    missing = [n for n in run.input_names if n not in known]
    if missing:
        raise KeyError(f"gradient_flow: no value for {', '.join(map(repr, missing))}; pass parameter "
                       f"values in values= (e.g. {{**rnn.state_dict(), **head.state_dict()}}) and "
                       f"input arrays in feeds=")
    loss_v, g = run(**{n: known[n] for n in run.input_names})
    g = np.asarray(g, dtype=np.float64)
    norms = np.sqrt((g * g).sum(axis=tuple(range(1, g.ndim))))
    return GradientFlow(name or type(rnn).__name__, norms, float(loss_v), gradient=g)


def plot_gradient_flow(flows: Sequence[GradientFlow], path: str | Path, title: str | None = None,
                       dpi: int = 120) -> Path:
    """A PNG (or any format matplotlib knows from the suffix) of ‖∂L/∂h_t‖ against t, one line
    per flow, log-scale y. Uses matplotlib's Agg canvas directly (no pyplot, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.0, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for flow in flows:
        norms = np.where(np.asarray(flow.norms) > 0, flow.norms, np.nan)  # log scale: hide exact zeros
        ax.plot(np.arange(len(norms)), norms, marker="." if len(norms) <= 60 else None,
                label=f"{flow.name} (×{flow.decay_per_step:.2g}/step back)")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("time step t")
    ax.set_ylabel("‖∂L/∂h_t‖")
    ax.set_title(title or "Gradient flow through time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


# ---- the comparison the lecture draws: RNN vs LSTM vs GRU on one task ----------------------------

def _cells() -> dict[str, type[RNNBase]]:
    from .nn import GRU, LSTM, RNN
    return {"RNN": RNN, "LSTM": LSTM, "GRU": GRU}


def _last_step_mse(head: Callable[[Node], Node], y: Node, outputs: Node) -> Node:
    return mse(head(outputs[outputs.shape[0] - 1]), y)


def compare_gradient_flow(kinds: Sequence[str] = ("RNN", "LSTM", "GRU"), T: int = 100, batch: int = 32,
                          hidden: int = 32, seed: int = 0, backend: str | None = None,
                          train_steps: int = 0, lr: float = 1e-2) -> list[GradientFlow]:
    """Gradient flow of each kind of cell on one adding-problem batch (loss on the last step only,
    as the task asks), with PyTorch's initialisation; `train_steps` > 0 first trains each model
    that many Adam steps on fresh batches (same data for every kind). backend: as in ur.compile
    (default None: Numba when it imports, else the numpy reference)."""
    from . import nn
    from .data import adding_problem

    cells = _cells()
    unknown = [k for k in kinds if k not in cells]
    if unknown:
        raise ValueError(f"compare_gradient_flow: unknown kinds {unknown}; expected some of {list(cells)}")
    x = dsl.input("x", (T, batch, 2))
    y = dsl.input("y", (batch, 1))
    xv, yv = adding_problem(batch, T, seed=seed)
    flows = []
    for kind in kinds:
        rnn = cells[kind](2, hidden, name=kind.lower(), seed=seed)
        head = nn.Linear(hidden, 1, name=f"{kind.lower()}_head", seed=seed)
        if train_steps > 0:
            from .train import fit
            out, _ = rnn(x)
            loss = nn.mse(head(out[T - 1]), y)
            xs, ys = adding_problem(batch * train_steps, T, seed=seed + 1)
            fit(loss, [rnn, head], {"x": xs, "y": ys}, steps=train_steps, lr=lr, clip=1.0,
                backend=backend, progress=False, seed=seed)
        flow = gradient_flow(rnn, functools.partial(_last_step_mse, head, y), x, {"x": xv, "y": yv},
                             values={**rnn.state_dict(), **head.state_dict()}, backend=backend, name=kind)
        flow.extra["train_steps"] = train_steps
        flows.append(flow)
    return flows


__all__ = ["GradientFlow", "compare_gradient_flow", "gradient_flow", "plot_gradient_flow", "probed_outputs"]
