"""torch.nn.utils.rnn's pack_padded_sequence / pad_packed_sequence for ur.nn's recurrent modules.

Shapes in the IR are static, so a packed sequence stays padded: `PackedSequence` holds the padded
batch and a lengths node, and RNN/LSTM/GRU given one compute exactly what torch computes on a packed
batch (each sequence's carries freeze after its last step, h_n is the state there, outputs past it
are zero, the reverse direction starts at each sequence's own last step; see `ur.nn.rnn.masked`).

    lens = ur.input("lens", (B,), "int64")
    packed = ur.nn.utils.rnn.pack_padded_sequence(x, lens, enforce_sorted=False)
    out_packed, (h_n, c_n) = lstm(packed)
    out, out_lens = ur.nn.utils.rnn.pad_packed_sequence(out_packed, total_length=T)

Differences from torch, all from static shapes: `pad_packed_sequence` returns T steps (the padded
length, as torch with total_length=T) rather than max(lengths); lengths given as a graph input are
not checked when the graph runs (a length of 0 gives zero outputs and h_n = h0, a length above T
counts as T; torch raises for both), and the batch need not be sorted (as torch with
enforce_sorted=False, whose results equal the sorted case). Lengths given as a list or array are
constants, checked like torch checks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...ir import build as b
from ...ir.node import Node, user_location
from ...ir.ops import INT_DTYPES


@dataclass(frozen=True)
class PackedSequence:
    """A padded batch `data` ((T, B, *), or (B, T, *) when batch_first) with its `lengths` (B,)."""

    data: Node
    lengths: Node
    batch_first: bool = False

    def with_layout(self, batch_first: bool) -> "PackedSequence":
        """The same sequences with the batch axis first (True) or second (False)."""
        if batch_first == self.batch_first:
            return self
        perm = (1, 0) + tuple(range(2, self.data.ndim))
        return PackedSequence(b.transpose(self.data, perm), self.lengths, batch_first)

    def valid(self) -> Node:
        """(T, B) bool in the time-major layout: step t of sequence b is within its length."""
        steps = self.data.shape[1 if self.batch_first else 0]
        times = b.const(np.arange(steps).reshape(steps, 1), None, self.lengths.dtype)
        return b.less(times, b.reshape(self.lengths, (1, self.lengths.shape[0])))


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
    if enforce_sorted and np.any(np.diff(values) > 0):
        raise RuntimeError("`lengths` array must be sorted in decreasing order when `enforce_sorted` is "
                           "True. You can pass `enforce_sorted=False` to pack_padded_sequence and/or "
                           "pack_sequence to sidestep this requirement if you do not need ONNX exportability.")
    if np.any(values <= 0):
        raise RuntimeError("Length of all samples has to be greater than 0, but found an element in "
                           "'lengths' that is <= 0")
    if np.any(values > steps):
        raise RuntimeError(f"pack_padded_sequence: a length {int(values.max())} exceeds the padded length "
                           f"{steps}\n  at {user_location()}")
    return b.const(values.astype(np.int64), None, "int64")


def pack_padded_sequence(input: Node, lengths: Any, batch_first: bool = False,  # noqa: A002
                         enforce_sorted: bool = True) -> PackedSequence:
    """torch.nn.utils.rnn.pack_padded_sequence: `input` (T, B, *) ((B, T, *) with batch_first)
    and the lengths (an int (B,) input node, or a list/array of ints, a constant) -> PackedSequence.
    Sorting is only checked for constant lengths (unsorted batches compute the same either way)."""
    if not isinstance(input, Node) or input.ndim < 2:
        found = input.type_str() if isinstance(input, Node) else type(input).__name__
        raise TypeError(f"pack_padded_sequence: expected a symbolic (T, B, *) input, found {found}"
                        f"\n  at {user_location()}")
    batch, steps = (input.shape[0], input.shape[1]) if batch_first else (input.shape[1], input.shape[0])
    return PackedSequence(input, _lengths_node(lengths, batch, steps, enforce_sorted), bool(batch_first))


def pad_packed_sequence(sequence: PackedSequence, batch_first: bool = False, padding_value: float = 0.0,
                        total_length: int | None = None) -> tuple[Node, Node]:
    """torch.nn.utils.rnn.pad_packed_sequence: (padded (T, B, *) or (B, T, *), lengths). Steps past
    a sequence's length hold `padding_value`. T is the padded length (torch: max(lengths)), or
    `total_length` if given (at least T, as torch requires it to be at least the longest length)."""
    if not isinstance(sequence, PackedSequence):
        raise TypeError(f"pad_packed_sequence: expected a PackedSequence, found {type(sequence).__name__}"
                        f"\n  at {user_location()}")
    time_major = sequence.with_layout(False)
    data = time_major.data
    valid = time_major.valid()
    valid = b.reshape(valid, valid.shape + (1,) * (data.ndim - 2))
    padded = b.where(valid, data, float(padding_value) if data.dtype not in INT_DTYPES else int(padding_value))
    steps = data.shape[0]
    if total_length is not None:
        if total_length < steps:
            raise ValueError(f"Expected total_length to be at least the length of the longest sequence in "
                             f"input, but got total_length={total_length} and max sequence length being "
                             f"{steps} (the padded length; lengths are not known when the graph is built)"
                             f"\n  at {user_location()}")
        if total_length > steps:
            extra = b.const(padding_value, (total_length - steps,) + data.shape[1:], data.dtype)
            padded = b.concat([padded, extra], 0)
    if batch_first:
        padded = b.transpose(padded, (1, 0) + tuple(range(2, padded.ndim)))
    return padded, sequence.lengths


__all__ = ["PackedSequence", "pack_padded_sequence", "pad_packed_sequence"]
