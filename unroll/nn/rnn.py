"""Recurrent layers RNN, LSTM and GRU: PyTorch's names, layouts, gate orders and equations, one
ur.scan over time per layer and direction.

The cells are written as the textbook equations, h_t = f(h_{t-1}, x_t; W), with the weights used by
closure (they become loop constants) and one matmul per weight matrix:

    gates = x_t @ W_ih.T + b_ih + h @ W_hh.T + b_hh          then ur.split into gates

The input projection does not depend on the carry; later passes may hoist it out of the loop.
PyTorch's equations (torch.nn.RNN / LSTM / GRU documentation):

    RNN   h' = tanh|relu(x W_ih^T + b_ih + h W_hh^T + b_hh)
    LSTM  i, f, g, o = split(x W_ih^T + b_ih + h W_hh^T + b_hh, 4)
          c' = sigmoid(f) * c + sigmoid(i) * tanh(g);  h' = sigmoid(o) * tanh(c')
    GRU   r, z, n gates:  r = sigmoid(x_r + h_r);  z = sigmoid(x_z + h_z)
          n = tanh(x_n + r * h_n)  (h_n = h W_hn^T + b_hn, inside the product, as torch)
          h' = (1 - z) * n + z * h
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from .. import dsl
from ..ir import build as b
from ..ir.node import Node, user_location
from .module import Module

State = Any  # a Node (RNN, GRU) or a tuple (h, c) (LSTM)
Step = Callable[[State, Node], tuple[State, Node]]


@dataclass(frozen=True)
class CellWeights:
    """One layer and direction's parameters (biases None when bias=False)."""

    w_ih: Node
    w_hh: Node
    b_ih: Node | None
    b_hh: Node | None


def _affine(x: Node, w: Node, bias: Node | None) -> Node:
    """x @ w.T + bias, PyTorch's layout: w is (out, in)."""
    y = x @ w.T
    return y if bias is None else y + bias


def rnn_cell(w: CellWeights, activation: Callable[[Node], Node] = b.tanh) -> Step:
    def step(h: Node, x: Node) -> tuple[Node, Node]:
        h = activation(_affine(x, w.w_ih, w.b_ih) + _affine(h, w.w_hh, w.b_hh))
        return h, h
    return step


def lstm_cell(w: CellWeights) -> Step:
    def step(state: tuple[Node, Node], x: Node) -> tuple[tuple[Node, Node], Node]:
        h, c = state
        gates = _affine(x, w.w_ih, w.b_ih) + _affine(h, w.w_hh, w.b_hh)
        i, f, g, o = b.split(gates, 4, axis=-1)
        c = b.sigmoid(f) * c + b.sigmoid(i) * b.tanh(g)
        h = b.sigmoid(o) * b.tanh(c)
        return (h, c), h
    return step


def gru_cell(w: CellWeights) -> Step:
    def step(h: Node, x: Node) -> tuple[Node, Node]:
        x_r, x_z, x_n = b.split(_affine(x, w.w_ih, w.b_ih), 3, axis=-1)
        h_r, h_z, h_n = b.split(_affine(h, w.w_hh, w.b_hh), 3, axis=-1)
        r = b.sigmoid(x_r + h_r)
        z = b.sigmoid(x_z + h_z)
        n = b.tanh(x_n + r * h_n)
        h = (1.0 - z) * n + z * h
        return h, h
    return step


class RNNBase(Module):
    """Shared by RNN, LSTM and GRU: parameters, input checks, the layer/direction loops.

    Called on x of shape (T, B, input_size) (or unbatched (T, input_size)) with an optional initial
    state, it returns what PyTorch returns: `(output, h_n)`, for LSTM `(output, (h_n, c_n))`;
    output is (T, B, num_directions * hidden_size), h_n and c_n are (num_layers * num_directions,
    B, hidden_size) ordered layer-major (layer 0 forward, layer 0 reverse, layer 1 forward, ...).
    """

    gates = 1
    has_cell_state = False

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 bidirectional: bool = False, name: str | None = None, dtype: object = "float32",
                 seed: int = 0) -> None:
        super().__init__(name, dtype, seed)
        for what, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("num_layers", num_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}: {what} must be a positive int, found {value!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.bidirectional = bool(bias), bool(bidirectional)
        self.num_directions = 2 if bidirectional else 1
        bound = f"uniform:{1.0 / math.sqrt(hidden_size)!r}"  # torch: U(-1/sqrt(H), 1/sqrt(H)) for all
        rows = self.gates * hidden_size
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else hidden_size * self.num_directions
            for direction in range(self.num_directions):
                sfx = self._suffix(layer, direction)
                self.add_param(f"weight_ih{sfx}", (rows, layer_in), bound)
                self.add_param(f"weight_hh{sfx}", (rows, hidden_size), bound)
                if self.bias:
                    self.add_param(f"bias_ih{sfx}", (rows,), bound)
                    self.add_param(f"bias_hh{sfx}", (rows,), bound)

    @staticmethod
    def _suffix(layer: int, direction: int) -> str:
        return f"_l{layer}" + ("_reverse" if direction else "")

    def extra_repr(self) -> str:
        parts = [str(self.input_size), str(self.hidden_size)]
        if self.num_layers != 1:
            parts.append(f"num_layers={self.num_layers}")
        if not self.bias:
            parts.append("bias=False")
        if self.bidirectional:
            parts.append("bidirectional=True")
        return ", ".join(parts)

    # ---- cells ---------------------------------------------------------------------------------

    def weights(self, layer: int, direction: int = 0) -> CellWeights:
        sfx, p = self._suffix(layer, direction), self.param_node
        b_ih, b_hh = (p(f"bias_ih{sfx}"), p(f"bias_hh{sfx}")) if self.bias else (None, None)
        return CellWeights(p(f"weight_ih{sfx}"), p(f"weight_hh{sfx}"), b_ih, b_hh)

    def make_cell(self, w: CellWeights) -> Step:
        raise NotImplementedError

    def cell(self, layer: int = 0, direction: int = 0) -> Step:
        """The step function `(state, x_t) -> (state, h_t)` of one layer and direction."""
        return self.make_cell(self.weights(layer, direction))

    # ---- whole sequences -----------------------------------------------------------------------

    def forward(self, x: Node, hx: State | None = None) -> tuple[Node, State]:
        size = self.input_size
        self.check_input(x, ((None, None, size), (None, size)), "input x")
        batched = x.ndim == 3
        if not batched:
            x = b.reshape(x, (x.shape[0], 1, size))
        states = self._initial_states(hx, x.shape[1], batched)
        layer_in, finals = x, []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                final, ys = dsl.scan(self.cell(layer, direction), init=states[index], xs=layer_in,
                                     reverse=direction == 1)
                finals.append(final)
                outputs.append(ys)
            layer_in = b.concat(outputs, -1)
        output = layer_in
        if not batched:
            output = b.reshape(output, (output.shape[0], output.shape[2]))
        return output, self._stack(finals, batched)

    def step(self, state: State, x_t: Node) -> tuple[State, Node]:
        """One time step through all layers (unidirectional modules): state in the layout of h_n
        (or (h_n, c_n)), x_t of shape (B, input_size). Returns (new state, top layer's h_t).
        Use it inside ur.scan for decoders that feed outputs back."""
        if self.bidirectional:
            raise ValueError(f"{self._describe()}.step: a bidirectional module has no single step"
                             f"\n  at {user_location()}")
        self.check_input(x_t, (None, self.input_size), "step input x_t")
        states = self._initial_states(state, x_t.shape[0], True)
        new, inp = [], x_t
        for layer in range(self.num_layers):
            s, inp = self.cell(layer)(states[layer], inp)
            new.append(s)
        return self._stack(new, True), inp

    # ---- states --------------------------------------------------------------------------------

    def _initial_states(self, hx: State | None, batch: int, batched: bool) -> list[State]:
        """Per (layer, direction) carries from torch's (L*D, B, H) layout; zeros when hx is None."""
        count, hidden = self.num_layers * self.num_directions, self.hidden_size
        if hx is None:
            zero = dsl.zeros((batch, hidden), self.dtype)
            return [(zero, zero) if self.has_cell_state else zero] * count
        if self.has_cell_state and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError(f"{self._describe()}: expected the initial state as a tuple (h0, c0), found "
                            f"{type(hx).__name__}\n  at {user_location()}")
        parts = list(hx) if self.has_cell_state else [hx]
        names = ("h0", "c0")
        split_parts = []
        for name, part in zip(names, parts):
            shape = (count, batch, hidden) if batched else (count, hidden)
            self.check_input(part, shape, f"initial state {name}")
            if not batched:
                part = b.reshape(part, (count, 1, hidden))
            split_parts.append([part[i] for i in range(count)])
        if self.has_cell_state:
            return list(zip(*split_parts))
        return split_parts[0]

    def _stack(self, finals: list[State], batched: bool) -> State:
        def stacked(values: list[Node]) -> Node:
            out = dsl.stack(values, 0)
            return out if batched else b.reshape(out, (out.shape[0], out.shape[2]))
        if self.has_cell_state:
            return stacked([h for h, _ in finals]), stacked([c for _, c in finals])
        return stacked(finals)


class RNN(RNNBase):
    """torch.nn.RNN: h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh) (or relu)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, bidirectional: bool = False, name: str | None = None,
                 dtype: object = "float32", seed: int = 0) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: nonlinearity must be 'tanh' or 'relu', found {nonlinearity!r}")
        super().__init__(input_size, hidden_size, num_layers, bias, bidirectional, name, dtype, seed)
        self.nonlinearity = nonlinearity

    def make_cell(self, w: CellWeights) -> Step:
        return rnn_cell(w, b.tanh if self.nonlinearity == "tanh" else b.relu)

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        return extra + (", nonlinearity='relu'" if self.nonlinearity == "relu" else "")


class LSTM(RNNBase):
    """torch.nn.LSTM (gate order i, f, g, o); returns (output, (h_n, c_n))."""

    gates = 4
    has_cell_state = True

    def make_cell(self, w: CellWeights) -> Step:
        return lstm_cell(w)


class GRU(RNNBase):
    """torch.nn.GRU (gate order r, z, n; r multiplies h W_hn^T + b_hn)."""

    gates = 3

    def make_cell(self, w: CellWeights) -> Step:
        return gru_cell(w)


__all__ = ["CellWeights", "GRU", "LSTM", "RNN", "RNNBase", "gru_cell", "lstm_cell", "rnn_cell"]
