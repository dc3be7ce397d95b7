"""The numpy meaning of the ops, as tables keyed by op: the one definition the IR and the reference share.

`backends/numpy_ref.py` (the executable spec) evaluates nodes with these functions and
`ir/simplify.py` folds constants with the same ones, so a folded constant is bit-for-bit what the
reference computes. The tables live in the IR because ir must not import backends.

    ELEMENTWISE_IMPLS  op -> f(*values)       unary, binary, compare, where, stop_gradient
    STRUCTURAL_IMPLS   op -> f(arg, *values)  ops whose meaning reads the node's arg (cast, matmul,
                                              reductions, argmax, onehot, movement)

Results may come back in a wider dtype (np.sum of int32 is int64 on Linux); callers convert to the
node's dtype. Loops, proj and fused nodes are interpreted by numpy_ref itself (they run graphs).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .ops import Op

Impl = Callable[..., np.ndarray]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    from scipy.special import expit  # stable in both tails, and fast
    return expit(x)


ELEMENTWISE_IMPLS: dict[Op, Impl] = {
    Op.NEG: np.negative, Op.EXP: np.exp, Op.LOG: np.log, Op.TANH: np.tanh, Op.SIGMOID: _sigmoid,
    Op.RELU: lambda x: np.maximum(x, 0).astype(x.dtype), Op.SQRT: np.sqrt, Op.ABS: np.abs,
    Op.SIGN: np.sign, Op.RECIP: lambda x: (1 / x).astype(x.dtype), Op.LOG1P: np.log1p,
    Op.SIN: np.sin, Op.COS: np.cos,
    Op.ADD: np.add, Op.SUB: np.subtract, Op.MUL: np.multiply, Op.DIV: np.divide, Op.POW: np.power,
    Op.MAX: np.maximum, Op.MIN: np.minimum,
    Op.LT: np.less, Op.LE: np.less_equal, Op.GT: np.greater, Op.GE: np.greater_equal,
    Op.EQ: np.equal, Op.NE: np.not_equal, Op.WHERE: np.where, Op.STOP_GRADIENT: lambda x: x,
}


def onehot(depth: int, ids: np.ndarray) -> np.ndarray:
    """ids (...) -> bool (..., depth). An id outside [0, depth) is an IndexError (torch's Embedding
    and one_hot raise too) rather than an all-zero row, which would silently train on nothing."""
    bad = (ids < 0) | (ids >= depth)
    if bad.any():
        where = np.argwhere(bad)
        first = tuple(int(i) for i in where[0])
        raise IndexError(f"onehot: id {int(ids[first])} is out of range for depth {depth} (expected "
                         f"0 <= id < {depth}); {len(where)} such id(s), the first at index {list(first)}")
    return ids[..., None] == np.arange(depth)


def _pad(pads: Sequence[tuple[int, int]], x: np.ndarray) -> np.ndarray:
    # zeros + one assignment: np.pad's generality costs ~10x on the small arrays of a loop step
    out = np.zeros(tuple(d + lo + hi for d, (lo, hi) in zip(x.shape, pads)), x.dtype)
    out[tuple(slice(lo, lo + d) for d, (lo, _) in zip(x.shape, pads))] = x
    return out


def _slice(triples: Sequence[tuple[int, int, int]], x: np.ndarray) -> np.ndarray:
    return x[tuple(slice(*t) for t in triples)]


STRUCTURAL_IMPLS: dict[Op, Impl] = {
    Op.CAST: lambda dtype, x: x.astype(dtype),
    Op.MATMUL: lambda _, a, b: np.matmul(a, b),
    Op.SUM: lambda arg, x: np.sum(x, axis=arg[0], keepdims=arg[1]),
    Op.REDUCE_MAX: lambda arg, x: np.max(x, axis=arg[0], keepdims=arg[1]),
    Op.ARGMAX: lambda axis, x: np.argmax(x, axis=axis),
    Op.ONEHOT: onehot,
    Op.RESHAPE: lambda shape, x: np.reshape(x, shape),
    Op.TRANSPOSE: lambda perm, x: np.transpose(x, perm),
    Op.BROADCAST: lambda shape, x: np.broadcast_to(x, shape),
    Op.CONCAT: lambda axis, *xs: np.concatenate(xs, axis=axis),
    Op.SLICE: _slice,
    Op.PAD: _pad,
}
