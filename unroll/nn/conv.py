"""Causal dilated 1-D convolution on seq-first input and Bai, Kolter & Koltun's TCN built from it.

The IR has no conv op. A convolution is a sum of shifted products, one per tap: with x viewed as the
(T*B, C_in) matrix X (time-major rows, so a time shift of s steps is a shift of s*B rows),

    Y = sum_j shift_{s_j}(X) @ W_j.T        W_j = weight[:, :, j] (out, in),  s_j = left - j*d

and shift_s(X) @ W = pad_rows(X[rows that survive the shift] @ W, s*B): a row-wise product commutes
with shifting rows in and out. So each tap is `pad(slice(X) @ W_j.T)` along the rows and the
terms are added, the least shifted tap first. No (T, B, k*C_in) im2col copy exists in the graph, and a
backend that accumulates `acc + pad(a @ b)` into a row range of acc (the Numba backend does: BLAS
with beta=1 on a view of acc, reading slice(X) as a contiguous row range of X) materialises neither
the shifted inputs nor the per-tap products: one (T*B, C_out) buffer per conv. The backward pass of
this form has the same shape, which is why it is written this way: the gradient of a pad is a row
slice (a view), of a slice a pad, so dX = sum_j pad(dY[rows] @ W_j) accumulates the same way and
dW_j = X[rows].T @ dY[rows] is a product of two row ranges (no copies either). Measured on the
benchmark's TCN training step (`unroll bench --cells tcn`: 4 levels, k=3), peak memory went from
116 to 66 MB at (T, B, I, H) = (100, 32, 128, 256) and from 143 to 78 MB at (1000, 8, 32, 128);
PyTorch's was 72-84 and 82-96 MB in the same runs.

Sizes stay run-time values (the slice and pad bounds are offsets, cpu/values.Dims), so one
generated source serves every T and B, except that a tap shifted by |s| >= T steps is left out of
the graph: sequences no longer than the kernel's reach ((k-1)*d) get a graph, and a source, of
their own.

Why here and not in an IR pass that recognises im2col (pad + slices + concat + matmul): the sum of
shifted products is simply the definition of the convolution, as short to write as im2col, while
the pass would have to match the pad/slice/concat/reshape/transposed-weight pattern (and its
backward) exactly and break silently on any variation. Here every backend, the numpy reference
included, sees the cheap form, and nothing needs to be recognised.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

from ..ir import build as b
from ..ir.node import Node
from .module import Module, Sequential


class Conv1d(Module):
    """torch.nn.Conv1d's parameters (weight (out, in, k), bias (out,)) on seq-first input
    (T, B, in_channels) -> (T, B, out_channels), stride 1, output length T.

    causal=True pads (k-1)*dilation steps on the left, so out[t] sees x[t - (k-1)*d .. t] (torch
    Conv1d with padding=(k-1)*d followed by chomping the last (k-1)*d steps). causal=False pads like
    torch's padding="same" (floor half on the left, the rest on the right).
    Init like torch: U(-1/sqrt(in*k), 1/sqrt(in*k)) unless `weight_init` gives an ur.param spec.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1,
                 causal: bool = True, bias: bool = True, name: str | None = None, dtype: object = "float32",
                 seed: int = 0, weight_init: str | None = None) -> None:
        super().__init__(name, dtype, seed)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.dilation = kernel_size, dilation
        self.causal, self.has_bias = causal, bool(bias)
        bound = f"uniform:{1.0 / math.sqrt(in_channels * kernel_size)!r}"
        self.add_param("weight", (out_channels, in_channels, kernel_size), weight_init or bound)
        if bias:
            self.add_param("bias", (out_channels,), bound)

    def extra_repr(self) -> str:
        extra = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        if self.dilation != 1:
            extra += f", dilation={self.dilation}"
        return extra + ("" if self.causal else ", causal=False") + ("" if self.has_bias else ", bias=False")

    def forward(self, x: Node) -> Node:
        self.check_input(x, (None, None, self.in_channels), "input x (T, B, channels)")
        steps, batch = x.shape[0], x.shape[1]
        k, d = self.kernel_size, self.dilation
        span = (k - 1) * d
        left = span if self.causal else span // 2
        rows = b.reshape(x, (steps * batch, self.in_channels))      # time-major rows: X
        # out[t] += x[t - s] @ W_j.T for tap j, s = left - j*d (s > 0 looks back, s < 0 ahead).
        # Unshifted tap first: the sum starts from a plain product, the others accumulate into its
        # buffer. Taps that shift everything out (|s| >= T) contribute nothing and are left out,
        # but for the nearest one when all are (a "same" conv shorter than its reach): its product
        # is then empty, so the graph still reads x and the weight (both remain expected feeds)
        taps = sorted(range(k), key=lambda j: abs(left - j * d))
        weights = self._tap_weights()
        y = None
        for j in taps:
            s = left - j * d
            if abs(s) >= steps and y is not None:
                continue
            lo, hi = min(max(s, 0), steps), min(max(-s, 0), steps)   # zero rows at the start, end
            src = b.slice_axis(rows, 0, hi * batch, (steps - lo) * batch) if s else rows
            term = b.pad(src @ weights[j], ((lo * batch, hi * batch), (0, 0)))
            y = term if y is None else y + term
        y = b.reshape(y, (steps, batch, self.out_channels))
        return y + self.bias if self.has_bias else y

    def _tap_weights(self) -> list[Node]:
        """W_j.T (in, out) per tap: row blocks of the weight laid out tap-major as (k * in, out), a
        copy of the (small) weight made once per conv; each tap's block is a view of it."""
        k, n_in, n_out = self.kernel_size, self.in_channels, self.out_channels
        if k == 1:
            return [b.reshape(self.weight, (n_out, n_in)).T]
        stacked = b.reshape(b.transpose(self.weight, (2, 1, 0)), (k * n_in, n_out))
        return [b.slice_axis(stacked, 0, j * n_in, (j + 1) * n_in) for j in range(k)]


class TemporalBlock(Module):
    """Bai et al.'s residual block: relu(conv2(relu(conv1(x)))) + residual, then relu; the residual
    is a 1x1 conv ("downsample") when the channel counts differ, else x itself.

    Differences from the paper's code: plain weights instead of weight_norm (so the names are
    conv1.weight, not conv1.weight_g / weight_v), and no dropout. Weights start N(0, 0.01) as there.
    """

    def __init__(self, n_inputs: int, n_outputs: int, kernel_size: int, dilation: int,
                 name: str | None = None, dtype: object = "float32", seed: int = 0) -> None:
        super().__init__(name, dtype, seed)
        conv = dict(dtype=dtype, weight_init="normal:0.01")
        self.conv1 = Conv1d(n_inputs, n_outputs, kernel_size, dilation, seed=self.child_seed(), **conv)
        self.conv2 = Conv1d(n_outputs, n_outputs, kernel_size, dilation, seed=self.child_seed(), **conv)
        if n_inputs != n_outputs:
            self.downsample = Conv1d(n_inputs, n_outputs, 1, seed=self.child_seed(), **conv)
        else:
            self.downsample = None

    def forward(self, x: Node) -> Node:
        out = b.relu(self.conv2(b.relu(self.conv1(x))))
        res = x if self.downsample is None else self.downsample(x)
        return b.relu(out + res)


class TCN(Module):
    """Bai, Kolter & Koltun's TemporalConvNet on seq-first input: (T, B, input_size) ->
    (T, B, channels[-1]). Level i is a TemporalBlock with dilation 2**i; state_dict names follow
    their code without weight_norm: network.0.conv1.weight, network.0.downsample.bias, ...

    `dropout` is accepted for signature compatibility and ignored (a warning if nonzero): the IR has
    no random ops, so the graphs are deterministic.
    """

    def __init__(self, input_size: int, channels: Sequence[int], kernel_size: int = 2, dropout: float = 0.0,
                 name: str | None = None, dtype: object = "float32", seed: int = 0) -> None:
        super().__init__(name, dtype, seed)
        if dropout:
            warnings.warn("TCN: dropout is ignored (unroll graphs are deterministic)", stacklevel=2)
        self.input_size, self.channels, self.kernel_size = input_size, list(channels), kernel_size
        blocks = []
        for level, out_ch in enumerate(self.channels):
            in_ch = input_size if level == 0 else self.channels[level - 1]
            blocks.append(TemporalBlock(in_ch, out_ch, kernel_size, 2 ** level, dtype=dtype,
                                        seed=self.child_seed()))
        self.network = Sequential(*blocks)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.channels}, kernel_size={self.kernel_size}"

    def forward(self, x: Node) -> Node:
        self.check_input(x, (None, None, self.input_size), "input x (T, B, channels)")
        return self.network(x)


def tcn_levels(length: int, kernel_size: int) -> int:
    """The fewest TCN levels whose receptive field 1 + 2 (k-1) (2^L - 1) covers `length` steps (two
    convs per level, dilation 2^i at level i)."""
    levels = 1
    while 1 + 2 * (kernel_size - 1) * (2 ** levels - 1) < length:
        levels += 1
    return levels
