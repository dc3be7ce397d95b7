"""torch.nn.utils.rnn's pack_padded_sequence / pad_packed_sequence for ur.nn's recurrent modules.

Shapes in the IR are static, so a packed sequence stays padded: `PackedSequence` holds the padded
batch and a lengths node, and RNN/LSTM/GRU given one compute exactly what torch computes on a packed
batch (each sequence's carries freeze after its last step, h_n is the state there, outputs past it
are zero, the reverse direction starts at each sequence's own last step; see `ur.nn.rnn.masked`).

    lens = ur.input("lens", (B,), "int64")
    packed = ur.nn.utils.rnn.pack_padded_sequence(x, lens, enforce_sorted=False)
    out_packed, (h_n, c_n) = lstm(packed)
    out, out_lens = ur.nn.utils.rnn.pad_packed_sequence(out_packed)

Lengths given as a list or array are constants, checked when the graph is built as torch checks
them. Lengths given as a graph input (an int (B,) `ur.input`) are checked when the compiled graph is
called (`ir/checks.py`, on every backend, before anything runs): what torch's pack_padded_sequence
rejects raises `ur.FeedValueError` (a RuntimeError, with torch's text where torch has one) naming
the input, the offending length and its index: a length <= 0, a batch not sorted in decreasing
order under enforce_sorted=True (the default), and, beyond torch, a length above the padded length
T (torch does not check it and reads past the data). Lengths computed inside the graph are not
checked.

The one difference from torch, from static shapes: `pad_packed_sequence` of a sequence with run-time
lengths returns T steps (the padded length) rather than max(lengths), which is not known when the
graph is built; steps from max(lengths) to T hold padding_value, so `padded[:max(lengths)]` is
torch's result. With constant lengths it returns max(lengths) steps, and with total_length exactly
total_length steps, as torch does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...ir import build as b
from ...ir.checks import attach, first_index
from ...ir.node import Node, user_location
from ...ir.ops import INT_DTYPES, Op

# torch's messages (torch/nn/utils/rnn.py and aten's _pack_padded_sequence), raised for the same values
UNSORTED = ("`lengths` array must be sorted in decreasing order when `enforce_sorted` is True. You can "
            "pass `enforce_sorted=False` to pack_padded_sequence and/or pack_sequence to sidestep this "
            "requirement if you do not need ONNX exportability.")
NOT_POSITIVE = ("Length of all samples has to be greater than 0, but found an element in 'lengths' that "
                "is <= 0")


def total_length_error(total_length: int, longest: int, ours: str = "") -> str:
    return (f"Expected total_length to be at least the length of the longest sequence in input, but got "
            f"total_length={total_length} and max sequence length being {longest}{ours}")


@dataclass(frozen=True)
class SequenceLengths:
    """A run-time condition on fed lengths (see ir/checks.py): every length in 1..steps, and the
    batch in decreasing order when `enforce_sorted`. `owner` names who takes the lengths in
    messages; with `total_length` set, `steps` is pad_packed_sequence's total_length and a longer
    sequence gets torch's total_length message."""

    steps: int
    enforce_sorted: bool = False
    owner: str = "lengths"
    total_length: bool = False

    def problem(self, value: np.ndarray) -> str | None:
        lens = np.asarray(value).reshape(-1)  # an unbatched sequence's length is 0-d
        expected = f"{self.owner} expects 1 <= length <= {self.steps}"
        rising = np.diff(lens) > 0
        if self.enforce_sorted and rising.any():
            (i,) = first_index(rising)
            return (f"{UNSORTED} ({self.owner}: found lengths[{i}] = {lens[i]} < lengths[{i + 1}] = "
                    f"{lens[i + 1]})")
        for bad, what in ((lens <= 0, None), (lens > self.steps, "exceeds")):
            if bad.any():
                (i,) = first_index(bad)
                found = f"found lengths[{i}] = {lens[i]}" if np.ndim(value) else f"found length {lens[i]}"
                if what is None:
                    return f"{NOT_POSITIVE} ({found}; {expected})"
                if self.total_length:
                    return total_length_error(self.steps, int(lens.max()), f" ({found}; {expected})")
                return (f"{found}, which exceeds the {self.steps} steps of the padded sequence "
                        f"({expected})")
        return None


def time_mask(lengths: Node, steps: int, shape: tuple[int, ...], enforce_sorted: bool) -> Node:
    """bool `t < lengths[b]` over `steps` time steps, time on axis 0 and the lengths reshaped to
    `shape` ((1, B) or (1, B, 1)). The mask is spelled `lengths > t` under enforce_sorted: the two
    spellings are two nodes, so the checks each one anchors (ir/checks.py) stay apart; a sorted
    packing's check never reaches an unsorted use of the same input."""
    times = b.const(np.arange(steps).reshape((steps,) + (1,) * (len(shape) - 1)), None, lengths.dtype)
    lens = b.reshape(lengths, shape)
    return b.greater(lens, times) if enforce_sorted else b.less(times, lens)


def check_lengths(anchor: Node, lengths: Node, condition: SequenceLengths) -> None:
    """Check the lengths fed for `lengths` (a graph input; constants were checked when built) each
    time a compiled graph containing `anchor` is called."""
    attach(anchor, lengths, condition, user_location())


@dataclass(frozen=True)
class PackedSequence:
    """A padded batch `data` ((T, B, *), or (B, T, *) when batch_first) with its `lengths` (B,);
    `enforce_sorted` as given to pack_padded_sequence (run-time lengths are checked against it)."""

    data: Node
    lengths: Node
    batch_first: bool = False
    enforce_sorted: bool = False

    @property
    def steps(self) -> int:
        """T, the padded length."""
        return self.data.shape[1 if self.batch_first else 0]

    def with_layout(self, batch_first: bool) -> "PackedSequence":
        """The same sequences with the batch axis first (True) or second (False)."""
        if batch_first == self.batch_first:
            return self
        perm = (1, 0) + tuple(range(2, self.data.ndim))
        return PackedSequence(b.transpose(self.data, perm), self.lengths, batch_first, self.enforce_sorted)

    def valid(self, steps: int | None = None) -> Node:
        """(steps, B) bool in the time-major layout (default steps: T): step t of sequence b is
        within its length."""
        return time_mask(self.lengths, self.steps if steps is None else steps, (1, self.lengths.shape[0]),
                         self.enforce_sorted)

    def max_length(self) -> int | None:
        """max(lengths) when the lengths are a constant, else None (known only at run time)."""
        if self.lengths.op is not Op.CONST:
            return None
        return int(np.max(np.asarray(self.lengths.arg)))


def _lengths_node(lengths: Any, batch: int, steps: int, enforce_sorted: bool) -> Node:
    if isinstance(lengths, Node):
        if lengths.dtype not in INT_DTYPES:
            raise TypeError(f"pack_padded_sequence: lengths must be int32 or int64, found {lengths.type_str()}"
                            f"\n  at {user_location()}")
        if lengths.shape != (batch,):
            raise RuntimeError(f"Expected `len(lengths)` to be equal to batch_size, but got "
                               f"{lengths.shape[0] if lengths.ndim else lengths.shape} (batch_size={batch})"
                               f"\n  at {user_location()}")
        return lengths
    values = np.asarray(lengths.detach().cpu().numpy() if hasattr(lengths, "detach") else lengths)
    if values.dtype.kind not in "iu" or values.ndim != 1:
        raise TypeError(f"pack_padded_sequence: lengths must be a 1-D list or array of ints or an int "
                        f"input, found {values.dtype} with shape {list(values.shape)}\n  at {user_location()}")
    if len(values) != batch:
        raise RuntimeError(f"Expected `len(lengths)` to be equal to batch_size, but got {len(values)} "
                           f"(batch_size={batch})\n  at {user_location()}")
    problem = SequenceLengths(steps, enforce_sorted, "pack_padded_sequence").problem(values)
    if problem is not None:
        raise RuntimeError(f"{problem}\n  at {user_location()}")
    return b.const(values.astype(np.int64), None, "int64")


def pack_padded_sequence(input: Node, lengths: Any, batch_first: bool = False,  # noqa: A002
                         enforce_sorted: bool = True) -> PackedSequence:
    """torch.nn.utils.rnn.pack_padded_sequence: `input` (T, B, *) ((B, T, *) with batch_first)
    and the lengths (an int (B,) input node, or a list/array of ints, a constant) -> PackedSequence.
    Constant lengths are checked here, input lengths when the compiled graph runs (by the module or
    pad_packed_sequence that uses them): each in 1..T, decreasing when enforce_sorted."""
    if not isinstance(input, Node) or input.ndim < 2:
        found = input.type_str() if isinstance(input, Node) else type(input).__name__
        raise TypeError(f"pack_padded_sequence: expected a symbolic (T, B, *) input, found {found}"
                        f"\n  at {user_location()}")
    batch, steps = (input.shape[0], input.shape[1]) if batch_first else (input.shape[1], input.shape[0])
    return PackedSequence(input, _lengths_node(lengths, batch, steps, enforce_sorted), bool(batch_first),
                          bool(enforce_sorted))


def pad_packed_sequence(sequence: PackedSequence, batch_first: bool = False, padding_value: float = 0.0,
                        total_length: int | None = None) -> tuple[Node, Node]:
    """torch.nn.utils.rnn.pad_packed_sequence: (padded (S, B, *) or (B, S, *), lengths as int64).
    Steps past a sequence's length hold `padding_value`. S is `total_length` when given (torch's
    ValueError if it is below the longest length: at build time for constant lengths, when the
    graph runs for input lengths), else max(lengths) for constant lengths, as torch; for input
    lengths, whose maximum is not known when the graph is built, S is T, the padded length (torch:
    max(lengths); the steps between hold padding_value)."""
    if not isinstance(sequence, PackedSequence):
        raise TypeError(f"pad_packed_sequence: expected a PackedSequence, found {type(sequence).__name__}"
                        f"\n  at {user_location()}")
    time_major = sequence.with_layout(False)
    data, steps = time_major.data, time_major.steps
    longest = time_major.max_length()
    if total_length is not None:
        if not isinstance(total_length, int) or isinstance(total_length, bool):
            raise TypeError(f"pad_packed_sequence: total_length must be an int, found "
                            f"{type(total_length).__name__}\n  at {user_location()}")
        if longest is not None and total_length < longest:
            raise ValueError(total_length_error(total_length, longest) + f"\n  at {user_location()}")
        out_steps = total_length
    else:
        out_steps = longest if longest is not None else steps
    if out_steps < steps:  # steps past every length: torch does not return them
        data = b.slice_axis(data, 0, 0, out_steps)
    elif out_steps > steps:
        extra = b.const(0, (out_steps - steps,) + data.shape[1:], data.dtype)
        data = b.concat([data, extra], 0)
    valid = time_major.valid(out_steps)
    valid = b.reshape(valid, valid.shape + (1,) * (data.ndim - 2))
    padded = b.where(valid, data, float(padding_value) if data.dtype not in INT_DTYPES else int(padding_value))
    if batch_first:
        padded = b.transpose(padded, (1, 0) + tuple(range(2, padded.ndim)))
    if longest is None:  # input lengths: pack_padded_sequence's checks, and total_length's
        condition = SequenceLengths(min(steps, out_steps), time_major.enforce_sorted, "pad_packed_sequence",
                                    total_length=out_steps < steps)
        check_lengths(padded, time_major.lengths, condition)
    lengths = time_major.lengths
    return padded, lengths if lengths.dtype == "int64" else b.cast(lengths, "int64")


__all__ = ["PackedSequence", "pack_padded_sequence", "pad_packed_sequence"]
