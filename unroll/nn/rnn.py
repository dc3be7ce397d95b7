"""Recurrent layers RNN, LSTM and GRU and their cells: PyTorch's arguments, names, layouts, gate
orders, equations and errors, one ur.scan over time per layer and direction.

The cells are written as the textbook equations, h_t = f(h_{t-1}, x_t; W), with the weights used by
closure (they become loop constants) and one matmul per weight matrix:

    gates = x_t @ W_ih.T + b_ih + h @ W_hh.T + b_hh          then ur.split into gates

The input projection does not depend on the carry; later passes may hoist it out of the loop.
PyTorch's equations (torch.nn.RNN / LSTM / GRU documentation):

    RNN   h' = tanh|relu(x W_ih^T + b_ih + h W_hh^T + b_hh)
    LSTM  i, f, g, o = split(x W_ih^T + b_ih + h W_hh^T + b_hh, 4)
          c' = sigmoid(f) * c + sigmoid(i) * tanh(g);  h' = sigmoid(o) * tanh(c')
          with proj_size > 0:  h' = (sigmoid(o) * tanh(c')) W_hr^T   (h is proj_size wide)
    GRU   r, z, n gates:  r = sigmoid(x_r + h_r);  z = sigmoid(x_z + h_z)
          n = tanh(x_n + r * h_n)  (h_n = h W_hn^T + b_hn, inside the product, as torch)
          h' = (1 - z) * n + z * h

The constructors take torch's positional order, `RNN(input_size, hidden_size, num_layers,
nonlinearity, bias, batch_first, dropout, bidirectional)` and `LSTM/GRU(input_size, hidden_size,
num_layers, bias, batch_first, dropout, bidirectional, proj_size)`, then keyword-only `name`,
`dtype` (a string, numpy or torch dtype) and `seed`, and check them with torch's messages. Bad
inputs raise what torch raises (ValueError for a wrong rank, RuntimeError for wrong sizes, as
`InputShapeError`, which is also an `ur.ShapeError`), with torch's text, then ours (module, expected
and found types, the caller's line).

`dropout` acts between layers in training mode (`module.train()`, the default, like torch) through
an explicit mask input; see `ur.nn.dropout_feeds`. In eval mode (`module.eval()`) it is the identity.

Variable lengths: `lstm(x, lengths=lens)` (lens an int (B,) input) or a sequence packed by
`ur.nn.utils.rnn.pack_padded_sequence` compute what torch computes on a PackedSequence: each
sequence's carries freeze after its last step (h_n is the state at that step), outputs past it are
zero, and the reverse direction starts at each sequence's own last step. Lengths fed for an input
are checked when the compiled graph is called, on every backend (`ir/checks.py`): a length outside
1..T raises `ur.FeedValueError` naming the input, the value and its index (torch's
pack_padded_sequence rejects lengths <= 0 too; a packed sequence built with enforce_sorted=True
also needs decreasing lengths).
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from .. import dsl
from ..ir import build as b
from ..ir.node import Node, user_location
from ..ir.ops import DTYPE_SHORT, INT_DTYPES, ShapeError
from .module import Module

State = Any  # a Node (RNN, GRU) or a tuple (h, c) (LSTM)
Step = Callable[[State, Node], tuple[State, Node]]


class InputShapeError(ShapeError, RuntimeError):
    """A recurrent module's input or state has the wrong size. torch raises RuntimeError there;
    this is both that and an ur.ShapeError (a ValueError)."""


@dataclass(frozen=True)
class CellWeights:
    """One layer and direction's parameters (biases None when bias=False; w_hr only for an LSTM
    with proj_size > 0)."""

    w_ih: Node
    w_hh: Node
    b_ih: Node | None
    b_hh: Node | None
    w_hr: Node | None = None


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
        if w.w_hr is not None:
            h = h @ w.w_hr.T
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


def masked(step: Step) -> Callable[[State, tuple[Node, Node]], tuple[State, Node]]:
    """A step that runs only where `valid` (a (B, 1) bool per step) holds: elsewhere the carry
    stays as it was and the output is zero. With valid = t < length this is torch's packed
    sequence: forward carries freeze after each sequence's end; in a reverse loop the carry stays
    at its initial value until the sequence's own last step."""
    def run(state: State, inputs: tuple[Node, Node]) -> tuple[State, Node]:
        x, valid = inputs
        new, y = step(state, x)
        if isinstance(state, tuple):
            kept: State = tuple(b.where(valid, n, o) for n, o in zip(new, state))
        else:
            kept = b.where(valid, new, state)
        return kept, b.where(valid, y, 0.0)
    return run


def _check_positive(cls: str, what: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} should be of type int, got: {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{what} must be greater than zero ({cls}: {what} must be a positive int, "
                         f"found {value!r})")


def _torch_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


class RNNBase(Module):
    """Shared by RNN, LSTM and GRU: parameters, input checks, the layer/direction loops.

    Called on x of shape (T, B, input_size) ((B, T, input_size) with batch_first=True, or unbatched
    (T, input_size)) with an optional initial state, it returns what PyTorch returns: `(output,
    h_n)`, for LSTM `(output, (h_n, c_n))`; output is (T, B, num_directions * H_out) (batch-first
    when batch_first), h_n is (num_layers * num_directions, B, H_out) and c_n (..., B, hidden_size),
    ordered layer-major (layer 0 forward, layer 0 reverse, layer 1 forward, ...); H_out is
    proj_size for an LSTM with projections, else hidden_size.
    """

    gates = 1
    has_cell_state = False

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, *, name: str | None = None, dtype: object = "float32",
                 seed: int = 0) -> None:
        super().__init__(name, dtype, seed)
        cls = type(self).__name__
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) \
                or not 0 <= dropout <= 1:  # type: ignore[operator]
            raise ValueError("dropout should be a number in range [0, 1] representing the probability "
                             "of an element being zeroed")
        if dropout > 0 and num_layers == 1:  # type: ignore[operator]
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero "
                          f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                          f"num_layers={num_layers}", UserWarning, stacklevel=_user_stacklevel())
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first should be of type bool, got: {type(batch_first).__name__}")
        _check_positive(cls, "input_size", input_size)
        _check_positive(cls, "hidden_size", hidden_size)
        _check_positive(cls, "num_layers", num_layers)
        if not isinstance(proj_size, int) or isinstance(proj_size, bool):
            raise TypeError(f"proj_size should be of type int, got: {type(proj_size).__name__}")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)  # type: ignore[arg-type]
        self.bidirectional, self.proj_size = bool(bidirectional), proj_size
        self.num_directions = 2 if bidirectional else 1
        self.output_size = proj_size or hidden_size  # H_out: the width of h and of each output
        bound = f"uniform:{1.0 / math.sqrt(hidden_size)!r}"  # torch: U(-1/sqrt(H), 1/sqrt(H)) for all
        rows = self.gates * hidden_size
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else self.output_size * self.num_directions
            for direction in range(self.num_directions):
                sfx = self._suffix(layer, direction)
                self.add_param(f"weight_ih{sfx}", (rows, layer_in), bound)
                self.add_param(f"weight_hh{sfx}", (rows, self.output_size), bound)
                if self.bias:
                    self.add_param(f"bias_ih{sfx}", (rows,), bound)
                    self.add_param(f"bias_hh{sfx}", (rows,), bound)
                if proj_size:
                    self.add_param(f"weight_hr{sfx}", (proj_size, hidden_size), bound)

    @staticmethod
    def _suffix(layer: int, direction: int) -> str:
        return f"_l{layer}" + ("_reverse" if direction else "")

    def extra_repr(self) -> str:
        parts = [str(self.input_size), str(self.hidden_size)]
        if self.proj_size:
            parts.append(f"proj_size={self.proj_size}")
        if self.num_layers != 1:
            parts.append(f"num_layers={self.num_layers}")
        if not self.bias:
            parts.append("bias=False")
        if self.batch_first:
            parts.append("batch_first=True")
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        if self.bidirectional:
            parts.append("bidirectional=True")
        return ", ".join(parts)

    # ---- cells ---------------------------------------------------------------------------------

    def weights(self, layer: int, direction: int = 0) -> CellWeights:
        sfx, p = self._suffix(layer, direction), self.param_node
        b_ih, b_hh = (p(f"bias_ih{sfx}"), p(f"bias_hh{sfx}")) if self.bias else (None, None)
        w_hr = p(f"weight_hr{sfx}") if self.proj_size else None
        return CellWeights(p(f"weight_ih{sfx}"), p(f"weight_hh{sfx}"), b_ih, b_hh, w_hr)

    def make_cell(self, w: CellWeights) -> Step:
        raise NotImplementedError

    def cell(self, layer: int = 0, direction: int = 0) -> Step:
        """The step function `(state, x_t) -> (state, h_t)` of one layer and direction."""
        return self.make_cell(self.weights(layer, direction))

    # ---- whole sequences -----------------------------------------------------------------------

    def forward(self, input: Any, hx: State | None = None, lengths: Node | None = None) -> tuple[Any, State]:  # noqa: A002
        """torch's forward. `input` may also be a PackedSequence from
        `ur.nn.utils.rnn.pack_padded_sequence` (then the output is one too); `lengths`, an int
        (B,) input, gives each sequence's length in a padded batch (see the module docstring)."""
        from .utils.rnn import PackedSequence  # late: utils imports this module
        packed = input if isinstance(input, PackedSequence) else None
        enforce_sorted = False  # lengths=: any order, as torch with enforce_sorted=False
        if packed is not None:
            if lengths is not None:
                raise ValueError(f"{self._describe()}: a PackedSequence carries its lengths; do not pass "
                                 f"lengths= too\n  at {user_location()}")
            if packed.batch_first != self.batch_first:
                packed = packed.with_layout(self.batch_first)
            x, lengths = packed.data, packed.lengths
            enforce_sorted = packed.enforce_sorted
        else:
            x = input
        x, batched = self._check_sequence(x)
        if self.batch_first and batched:
            x = b.transpose(x, (1, 0, 2))
        if not batched:
            x = b.reshape(x, (x.shape[0], 1, self.input_size))
        steps, batch = x.shape[0], x.shape[1]
        states = self._initial_states(hx, batch, batched)
        valid = None
        if lengths is not None:
            valid = self._valid_steps(lengths, steps, batch if batched else None, enforce_sorted)
        masks = None
        if self.training and self.dropout > 0 and self.num_layers > 1:
            masks = self.dropout_mask((self.num_layers - 1, steps, batch,
                                       self.num_directions * self.output_size), self.dropout)
        layer_in, finals = x, []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                cell = self.cell(layer, direction)
                if valid is None:
                    final, ys = dsl.scan(cell, init=states[index], xs=layer_in, reverse=direction == 1)
                else:
                    final, ys = dsl.scan(masked(cell), init=states[index], xs=(layer_in, valid),
                                         reverse=direction == 1)
                finals.append(final)
                outputs.append(ys)
            layer_in = b.concat(outputs, -1)
            if masks is not None and layer < self.num_layers - 1:
                layer_in = layer_in * masks[layer]
        output = layer_in
        if not batched:
            output = b.reshape(output, (output.shape[0], output.shape[2]))
        elif self.batch_first:
            output = b.transpose(output, (1, 0, 2))
        final_state = self._stack(finals, batched)
        if packed is not None:
            return PackedSequence(output, packed.lengths, self.batch_first, packed.enforce_sorted), final_state
        return output, final_state

    def step(self, state: State, x_t: Node) -> tuple[State, Node]:
        """One time step through all layers (unidirectional modules): state in the layout of h_n
        (or (h_n, c_n)), x_t of shape (B, input_size). Returns (new state, top layer's h_t).
        Use it inside ur.scan for decoders that feed outputs back."""
        if self.bidirectional:
            raise ValueError(f"{self._describe()}.step: a bidirectional module has no single step"
                             f"\n  at {user_location()}")
        if self.training and self.dropout > 0 and self.num_layers > 1:
            raise ValueError(f"{self._describe()}.step: dropout between layers needs a mask per step, "
                             f"which step() cannot draw; call .eval() (or build with dropout=0) for "
                             f"decoding\n  at {user_location()}")
        self.check_input(x_t, (None, self.input_size), "step input x_t")
        states = self._initial_states(state, x_t.shape[0], True)
        new, inp = [], x_t
        for layer in range(self.num_layers):
            s, inp = self.cell(layer)(states[layer], inp)
            new.append(s)
        return self._stack(new, True), inp

    # ---- checks and states ---------------------------------------------------------------------

    def _fail(self, error: type[Exception], torch_text: str, ours: str = "") -> Exception:
        extra = f" ({ours})" if ours else ""
        return error(f"{self._describe()}: {torch_text}{extra}\n  at {user_location()}")

    def _check_sequence(self, x: Any) -> tuple[Node, bool]:
        """torch's input checks, in torch's order; returns (x, batched)."""
        cls = type(self).__name__
        if not isinstance(x, Node):
            raise TypeError(f"{self._describe()}: expected a symbolic input x (ur.input, ...), found "
                            f"{type(x).__name__}\n  at {user_location()}")
        size, found = self.input_size, x.tensor_type
        expected = (f"input x expected shape {DTYPE_SHORT[self.dtype]}[*,*,{size}] or "
                    f"{DTYPE_SHORT[self.dtype]}[*,{size}], found {found}")
        if x.ndim not in (2, 3):
            tensor = " tensor" if cls == "RNN" else ""
            raise self._fail(ValueError, f"{cls}: Expected input to be 2D or 3D, got {x.ndim}D{tensor} "
                             f"instead", expected)
        if x.dtype != self.dtype:
            raise self._fail(ShapeError, f"input dtype {x.dtype} does not match weight dtype {self.dtype}; "
                             f"cast the input (ur.cast) or build the module with dtype={x.dtype!r}",
                             expected)
        if x.shape[-1] != size:
            raise self._fail(InputShapeError, f"input.size(-1) must be equal to input_size. Expected "
                             f"{size}, got {x.shape[-1]}", expected)
        time_axis = 1 if self.batch_first and x.ndim == 3 else 0
        if x.shape[time_axis] == 0:
            raise self._fail(InputShapeError, "Expected sequence length to be larger than 0 in RNN",
                             expected)
        return x, x.ndim == 3

    def _valid_steps(self, lengths: Node, steps: int, batch: int | None, enforce_sorted: bool = False) -> Node:
        """(T, B, 1) bool: t < lengths[b]. `batch` None: an unbatched sequence (lengths () or (1,)).
        Input lengths are checked when the compiled graph runs: each in 1..T (and decreasing when
        `enforce_sorted`, from a PackedSequence), the mask being the check's anchor."""
        from .utils.rnn import SequenceLengths, check_lengths, time_mask
        if not isinstance(lengths, Node) or lengths.dtype not in INT_DTYPES:
            found = lengths.type_str() if isinstance(lengths, Node) else type(lengths).__name__
            raise TypeError(f"{self._describe()}: lengths must be a symbolic int32 or int64 input of "
                            f"one length per sequence, found {found}\n  at {user_location()}")
        allowed = [(batch,)] if batch is not None else [(), (1,)]
        if lengths.shape not in allowed:
            want = " or ".join(str(list(a)) for a in allowed)
            raise self._fail(InputShapeError, f"lengths expected shape {want} (one length per sequence), "
                             f"found {list(lengths.shape)}")
        size = batch if batch is not None else 1
        mask = time_mask(lengths, steps, (1, size, 1), enforce_sorted)
        check_lengths(mask, lengths, SequenceLengths(steps, enforce_sorted, f"{self._describe()} lengths"))
        return mask

    def _initial_states(self, hx: State | None, batch: int, batched: bool) -> list[State]:
        """Per (layer, direction) carries from torch's (L*D, B, H) layout; zeros when hx is None.
        Checks what torch checks, with torch's messages."""
        count, out_size = self.num_layers * self.num_directions, self.output_size
        if hx is None:
            h = dsl.zeros((batch, out_size), self.dtype)
            c = dsl.zeros((batch, self.hidden_size), self.dtype)
            return [(h, c) if self.has_cell_state else h] * count
        if self.has_cell_state and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError(f"{self._describe()}: expected the initial state as a tuple (h0, c0), found "
                            f"{type(hx).__name__}\n  at {user_location()}")
        parts = list(hx) if self.has_cell_state else [hx]
        for name, part in zip(("h0", "c0"), parts):
            if not isinstance(part, Node):
                raise TypeError(f"{self._describe()}: expected a symbolic initial state {name} "
                                f"(ur.input, ...), found {type(part).__name__}\n  at {user_location()}")
        dims = 3 if batched else 2
        kind = "batched 3-D" if batched else "unbatched 2-D"
        if any(p.ndim != dims for p in parts):
            if self.has_cell_state:
                text = (f"For {kind} input, hx and cx should also be {dims}-D but got "
                        f"({parts[0].ndim}-D, {parts[1].ndim}-D) tensors")
            else:
                text = f"For {kind} input, hx should also be {dims}-D but got {parts[0].ndim}-D tensor"
            raise self._fail(InputShapeError, text)
        split_parts = []
        for index, (name, part, width) in enumerate(zip(("h0", "c0"), parts, (out_size, self.hidden_size))):
            shape = (count, batch, width) if batched else (count, width)
            ours = f"initial state {name} expected shape {_pattern(shape, self.dtype)}, found {part.tensor_type}"
            if part.dtype != self.dtype:
                raise self._fail(ShapeError, f"initial state dtype {part.dtype} does not match weight "
                                 f"dtype {self.dtype}", ours)
            if part.shape != shape:
                found = list(part.shape) if batched else [part.shape[0], 1, part.shape[1]]
                label = f"hidden[{index}] size" if self.has_cell_state else "hidden size"
                raise self._fail(InputShapeError, f"Expected {label} {_torch_shape((count, batch, width))}, "
                                 f"got {found}", ours)
            if not batched:
                part = b.reshape(part, (count, 1, width))
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


def _pattern(shape: tuple[int, ...], dtype: str) -> str:
    return f"{DTYPE_SHORT[dtype]}[{','.join(map(str, shape))}]"


def _user_stacklevel() -> int:
    """The stacklevel of warnings.warn that points at the user's line (past our constructors)."""
    import sys
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        level += 1
        frame = frame.f_back  # type: ignore[assignment]
    return level


_NO_PROJ = "proj_size argument is only supported for LSTM, not RNN or GRU"


class RNN(RNNBase):
    """torch.nn.RNN: h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh) (or relu).
    Positional order as torch: (input_size, hidden_size, num_layers, nonlinearity, bias,
    batch_first, dropout, bidirectional)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, *, proj_size: int | None = None, name: str | None = None,
                 dtype: object = "float32", seed: int = 0) -> None:
        if proj_size is not None:
            raise ValueError(_NO_PROJ)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         name=name, dtype=dtype, seed=seed)
        self.nonlinearity = nonlinearity

    def make_cell(self, w: CellWeights) -> Step:
        return rnn_cell(w, b.tanh if self.nonlinearity == "tanh" else b.relu)

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        return extra + (", nonlinearity='relu'" if self.nonlinearity == "relu" else "")


class LSTM(RNNBase):
    """torch.nn.LSTM (gate order i, f, g, o; proj_size adds weight_hr_l{k}); returns
    (output, (h_n, c_n))."""

    gates = 4
    has_cell_state = True

    def make_cell(self, w: CellWeights) -> Step:
        return lstm_cell(w)


class GRU(RNNBase):
    """torch.nn.GRU (gate order r, z, n; r multiplies h W_hn^T + b_hn)."""

    gates = 3

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int | None = None, *, name: str | None = None, dtype: object = "float32",
                 seed: int = 0) -> None:
        if proj_size is not None:
            raise ValueError(_NO_PROJ)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         name=name, dtype=dtype, seed=seed)

    def make_cell(self, w: CellWeights) -> Step:
        return gru_cell(w)


# ---- cells --------------------------------------------------------------------------------------

class RNNCellBase(Module):
    """torch's RNNCell / LSTMCell / GRUCell: one step, parameters weight_ih (G*H, I), weight_hh
    (G*H, H), bias_ih, bias_hh, all U(-1/sqrt(H), 1/sqrt(H)). Called as torch calls them:
    `cell(input, hx=None)` with input (B, I) or unbatched (I,); returns h' (LSTMCell: (h', c'))."""

    gates = 1
    has_cell_state = False

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, *, name: str | None = None,
                 dtype: object = "float32", seed: int = 0) -> None:
        super().__init__(name, dtype, seed)
        cls = type(self).__name__
        _check_positive(cls, "input_size", input_size)
        _check_positive(cls, "hidden_size", hidden_size)
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bool(bias)
        bound = f"uniform:{1.0 / math.sqrt(hidden_size)!r}"
        rows = self.gates * hidden_size
        self.add_param("weight_ih", (rows, input_size), bound)
        self.add_param("weight_hh", (rows, hidden_size), bound)
        if self.bias:
            self.add_param("bias_ih", (rows,), bound)
            self.add_param("bias_hh", (rows,), bound)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")

    def weights(self) -> CellWeights:
        p = self.param_node
        b_ih, b_hh = (p("bias_ih"), p("bias_hh")) if self.bias else (None, None)
        return CellWeights(p("weight_ih"), p("weight_hh"), b_ih, b_hh)

    def make_cell(self, w: CellWeights) -> Step:
        raise NotImplementedError

    def _fail(self, error: type[Exception], text: str) -> Exception:
        return error(f"{self._describe()}: {text}\n  at {user_location()}")

    def forward(self, input: Node, hx: State | None = None) -> State:  # noqa: A002
        cls, x = type(self).__name__, input
        if not isinstance(x, Node):
            raise TypeError(f"{self._describe()}: expected a symbolic input (ur.input, ...), found "
                            f"{type(x).__name__}\n  at {user_location()}")
        if x.ndim not in (1, 2):
            raise self._fail(ValueError, f"{cls}: Expected input to be 1D or 2D, got {x.ndim}D instead")
        if self.has_cell_state and hx is not None and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError(f"{self._describe()}: expected the state as a tuple (h, c), found "
                            f"{type(hx).__name__}\n  at {user_location()}")
        parts = [] if hx is None else list(hx) if self.has_cell_state else [hx]
        for idx, part in enumerate(parts):
            if not isinstance(part, Node):
                raise TypeError(f"{self._describe()}: expected a symbolic state, found {type(part).__name__}"
                                f"\n  at {user_location()}")
            if part.ndim not in (1, 2):
                what = f"hx[{idx}]" if self.has_cell_state else "hidden"
                raise self._fail(ValueError, f"{cls}: Expected {what} to be 1D or 2D, got {part.ndim}D instead")
        for what, value in (("input", x), *((f"hidden{i}", p) for i, p in enumerate(parts))):
            if value.dtype != self.dtype:
                raise self._fail(ShapeError, f"{what} dtype {value.dtype} does not match weight dtype "
                                 f"{self.dtype} (found {value.tensor_type})")
        batched = x.ndim == 2
        if not batched:
            x = b.reshape(x, (1,) + x.shape)
        if x.shape[1] != self.input_size:
            raise self._fail(InputShapeError, f"input has inconsistent input_size: got {x.shape[1]} "
                             f"expected {self.input_size}")
        for i, part in enumerate(parts):
            if part.ndim != input.ndim:
                raise self._fail(InputShapeError, f"hidden{i} has {part.ndim} dimensions but the input "
                                 f"has {input.ndim}; give both a batch dimension or neither")
        parts = [p if batched else b.reshape(p, (1,) + p.shape) for p in parts]
        for i, part in enumerate(parts):
            if part.shape[0] != x.shape[0]:
                raise self._fail(InputShapeError, f"Input batch size {x.shape[0]} doesn't match hidden{i} "
                                 f"batch size {part.shape[0]}")
            if part.shape[1] != self.hidden_size:
                raise self._fail(InputShapeError, f"hidden{i} has inconsistent hidden_size: got "
                                 f"{part.shape[1]}, expected {self.hidden_size}")
        if not parts:
            zero = dsl.zeros((x.shape[0], self.hidden_size), self.dtype)
            parts = [zero, zero] if self.has_cell_state else [zero]
        state = tuple(parts) if self.has_cell_state else parts[0]
        new, _ = self.make_cell(self.weights())(state, x)
        leaves = list(new) if self.has_cell_state else [new]
        if not batched:
            leaves = [b.reshape(v, v.shape[1:]) for v in leaves]
        return tuple(leaves) if self.has_cell_state else leaves[0]


class RNNCell(RNNCellBase):
    """torch.nn.RNNCell(input_size, hidden_size, bias=True, nonlinearity='tanh')."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 *, name: str | None = None, dtype: object = "float32", seed: int = 0) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(input_size, hidden_size, bias, name=name, dtype=dtype, seed=seed)
        self.nonlinearity = nonlinearity

    def extra_repr(self) -> str:
        return super().extra_repr() + (", nonlinearity=relu" if self.nonlinearity == "relu" else "")

    def make_cell(self, w: CellWeights) -> Step:
        return rnn_cell(w, b.tanh if self.nonlinearity == "tanh" else b.relu)


class LSTMCell(RNNCellBase):
    """torch.nn.LSTMCell(input_size, hidden_size, bias=True): `cell(x, (h, c)) -> (h', c')`."""

    gates = 4
    has_cell_state = True

    def make_cell(self, w: CellWeights) -> Step:
        return lstm_cell(w)


class GRUCell(RNNCellBase):
    """torch.nn.GRUCell(input_size, hidden_size, bias=True): `cell(x, h) -> h'`."""

    gates = 3

    def make_cell(self, w: CellWeights) -> Step:
        return gru_cell(w)


__all__ = ["CellWeights", "GRU", "GRUCell", "InputShapeError", "LSTM", "LSTMCell", "RNN", "RNNBase",
           "RNNCell", "RNNCellBase", "gru_cell", "lstm_cell", "masked", "rnn_cell"]
