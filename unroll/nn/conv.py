"""Causal dilated 1-D convolution on seq-first input and Bai, Kolter & Koltun's TCN built from it.

The IR has no conv op: a convolution is pad + one time-shifted slice per tap + one matmul
(im2col): with the taps stacked on the channel axis, out[t] = concat_j(x_pad[t + j*d]) @ W_flat.T,
where W_flat[o, j*C_in + c] = weight[o, c, j] (PyTorch's Conv1d layout (out, in, k)).
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

from ..ir import build as b
from ..ir.node import Node
from .layers import flat_matmul
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
        steps, k, d = x.shape[0], self.kernel_size, self.dilation
        span = (k - 1) * d
        left = span if self.causal else span // 2
        padded = b.pad(x, ((left, span - left), (0, 0), (0, 0)))
        taps = [b.slice_axis(padded, 0, j * d, j * d + steps) for j in range(k)]
        columns = b.concat(taps, -1)                                  # (T, B, k * in), tap-major
        w_flat = b.reshape(b.transpose(self.weight, (0, 2, 1)), (self.out_channels, k * self.in_channels))
        y = flat_matmul(columns, w_flat.T)
        return y + self.bias if self.has_bias else y


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
