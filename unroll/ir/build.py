"""Builder functions: the one way to make IR nodes, used by the DSL, the model library and the passes.

Python scalars become `const` nodes of the other operand's dtype. Every function checks shapes at
construction (see ops.TYPE_RULES) and errors name the op, the shapes and the user's line.
"""

from __future__ import annotations

import builtins
import math
from typing import Sequence

import numpy as np

from .node import Node, user_location
from .ops import FLOAT_DTYPES, Op, ShapeError, TensorType, normalize_dtype

Value = Node | float | int


def const(value: float, shape: Sequence[int] = (), dtype: str = "float32") -> Node:
    """A tensor of the given shape filled with one value."""
    dtype = normalize_dtype(dtype)
    value = bool(value) if dtype == "bool" else int(value) if dtype.startswith("int") else float(value)
    return Node.leaf(Op.CONST, TensorType(tuple(shape), dtype), value)


def _lift(x: Value, like: Node) -> Node:
    if isinstance(x, Node):
        return x
    if isinstance(x, (int, float, np.number)) and not isinstance(x, bool):
        return const(float(x) if like.dtype in FLOAT_DTYPES else int(x), (), like.dtype)
    raise TypeError(f"expected an unroll value or a Python number, found {type(x).__name__} at "
                    f"{user_location()}")


def _pair(a: Value, b: Value) -> tuple[Node, Node]:
    if not isinstance(a, Node) and not isinstance(b, Node):
        raise TypeError("at least one operand must be an unroll value")
    like = a if isinstance(a, Node) else b
    return _lift(a, like), _lift(b, like)  # type: ignore[arg-type]


def unary(op: Op, x: Node) -> Node:
    return Node.make(op, (x,))


def binary(op: Op, a: Value, b: Value) -> Node:
    return Node.make(op, _pair(a, b))


def neg(x: Node) -> Node: return unary(Op.NEG, x)
def exp(x: Node) -> Node: return unary(Op.EXP, x)
def log(x: Node) -> Node: return unary(Op.LOG, x)
def tanh(x: Node) -> Node: return unary(Op.TANH, x)
def sigmoid(x: Node) -> Node: return unary(Op.SIGMOID, x)
def relu(x: Node) -> Node: return unary(Op.RELU, x)
def sqrt(x: Node) -> Node: return unary(Op.SQRT, x)
def abs(x: Node) -> Node: return unary(Op.ABS, x)  # noqa: A001 - mirrors numpy's name
def sign(x: Node) -> Node: return unary(Op.SIGN, x)
def recip(x: Node) -> Node: return unary(Op.RECIP, x)
def log1p(x: Node) -> Node: return unary(Op.LOG1P, x)
def stop_gradient(x: Node) -> Node: return unary(Op.STOP_GRADIENT, x)


def add(a: Value, b: Value) -> Node: return binary(Op.ADD, a, b)
def sub(a: Value, b: Value) -> Node: return binary(Op.SUB, a, b)
def mul(a: Value, b: Value) -> Node: return binary(Op.MUL, a, b)
def div(a: Value, b: Value) -> Node: return binary(Op.DIV, a, b)
def pow(a: Value, b: Value) -> Node: return binary(Op.POW, a, b)  # noqa: A001
def maximum(a: Value, b: Value) -> Node: return binary(Op.MAX, a, b)
def minimum(a: Value, b: Value) -> Node: return binary(Op.MIN, a, b)
def less(a: Value, b: Value) -> Node: return binary(Op.LT, a, b)
def less_equal(a: Value, b: Value) -> Node: return binary(Op.LE, a, b)
def greater(a: Value, b: Value) -> Node: return binary(Op.GT, a, b)
def greater_equal(a: Value, b: Value) -> Node: return binary(Op.GE, a, b)
def equal(a: Value, b: Value) -> Node: return binary(Op.EQ, a, b)
def not_equal(a: Value, b: Value) -> Node: return binary(Op.NE, a, b)


def where(cond: Node, a: Value, b: Value) -> Node:
    a, b = _pair(a, b)
    return Node.make(Op.WHERE, (cond, a, b))


def cast(x: Node, dtype: object) -> Node:
    dtype = normalize_dtype(dtype)
    return x if x.dtype == dtype else Node.make(Op.CAST, (x,), dtype)


def matmul(a: Node, b: Node) -> Node:
    return Node.make(Op.MATMUL, (a, b))


def _axes(x: Node, axis: int | Sequence[int] | None) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(x.ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % x.ndim if -x.ndim <= a < x.ndim else a for a in axes))


def sum(x: Node, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Node:  # noqa: A001
    return Node.make(Op.SUM, (x,), (_axes(x, axis), bool(keepdims)))


def max(x: Node, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Node:  # noqa: A001
    return Node.make(Op.REDUCE_MAX, (x,), (_axes(x, axis), bool(keepdims)))


def mean(x: Node, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Node:
    axes = _axes(x, axis)
    count = math.prod(x.shape[a] for a in axes if 0 <= a < x.ndim)
    return sum(x, axes, keepdims) * (1.0 / count if count else 0.0)


def argmax(x: Node, axis: int = -1) -> Node:
    return Node.make(Op.ARGMAX, (x,), axis % x.ndim if -x.ndim <= axis < x.ndim else axis)


def onehot(ids: Node, depth: int) -> Node:
    return Node.make(Op.ONEHOT, (ids,), int(depth))


def reshape(x: Node, *shape: int | Sequence[int]) -> Node:
    dims = list(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else list(shape)
    if dims.count(-1) == 1:
        known = math.prod(d for d in dims if d != -1)
        dims[dims.index(-1)] = x.tensor_type.size // known if known else 0
    dims_t = tuple(int(d) for d in dims)  # type: ignore[arg-type]
    return x if dims_t == x.shape else Node.make(Op.RESHAPE, (x,), dims_t)


def transpose(x: Node, perm: Sequence[int] | None = None) -> Node:
    perm_t = tuple(reversed(range(x.ndim))) if perm is None else tuple(p % x.ndim for p in perm)
    return x if perm_t == tuple(range(x.ndim)) else Node.make(Op.TRANSPOSE, (x,), perm_t)


def broadcast_to(x: Node, shape: Sequence[int]) -> Node:
    shape_t = tuple(int(d) for d in shape)
    return x if shape_t == x.shape else Node.make(Op.BROADCAST, (x,), shape_t)


def concat(xs: Sequence[Node], axis: int = 0) -> Node:
    xs = list(xs)
    if not xs:
        raise ShapeError(f"concat: expected at least one tensor\n  at {user_location()}")
    if len(xs) == 1:
        return xs[0]
    ndim = xs[0].ndim
    return Node.make(Op.CONCAT, xs, axis % ndim if -ndim <= axis < ndim else axis)


def slice_axis(x: Node, axis: int, start: int, stop: int, step: int = 1) -> Node:
    """x[..., start:stop:step, ...] on one axis (Python slice rules for negative/oversized bounds)."""
    axis = axis % x.ndim
    start, stop, step = slice(start, stop, step).indices(x.shape[axis])
    if step < 0:
        raise ShapeError(f"slice: negative steps are not supported, found {step}\n  at {user_location()}")
    triples = tuple((start, stop, step) if i == axis else (0, d, 1) for i, d in enumerate(x.shape))
    return Node.make(Op.SLICE, (x,), triples)


def split(x: Node, sections: int | Sequence[int], axis: int = -1) -> list[Node]:
    """Split into `sections` equal parts, or parts of the given sizes (the gate split)."""
    axis = axis % x.ndim
    dim = x.shape[axis]
    if isinstance(sections, int):
        if dim % sections:
            raise ShapeError(f"split: axis {axis} of {x.type} does not divide into {sections} equal parts"
                             f"\n  at {user_location()}")
        sizes = [dim // sections] * sections
    else:
        sizes = list(sections)
        if builtins.sum(sizes) != dim:
            raise ShapeError(f"split: sizes {sizes} do not add up to axis {axis} of {x.type}"
                             f"\n  at {user_location()}")
    out, start = [], 0
    for size in sizes:
        out.append(slice_axis(x, axis, start, start + size))
        start += size
    return out


def pad(x: Node, pads: Sequence[tuple[int, int]]) -> Node:
    pads_t = tuple((int(lo), int(hi)) for lo, hi in pads)
    return x if all(p == (0, 0) for p in pads_t) else Node.make(Op.PAD, (x,), pads_t)


def getitem(x: Node, index: object) -> Node:
    """Basic indexing: ints (drop the axis), slices with step > 0, Ellipsis."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(item is None for item in items):  # numpy's newaxis: index without it, then reshape
        kept = [item for item in items if item is not None]
        out = getitem(x, tuple(kept))
        if Ellipsis in kept:
            raise ShapeError(f"index: None together with ... is not supported\n  at {user_location()}")
        shape, dims = [], iter(out.shape)
        for item in items:
            if item is None:
                shape.append(1)
            elif not isinstance(item, (int, np.integer)):
                shape.append(next(dims))
        shape.extend(dims)
        return reshape(out, tuple(shape))
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (x.ndim - len(items) + 1)
    if len(items) > x.ndim:
        raise ShapeError(f"index: too many indices for {x.type}: {index!r}\n  at {user_location()}")
    items += [slice(None)] * (x.ndim - len(items))
    triples, keep = [], []
    for axis, (item, dim) in enumerate(zip(items, x.shape)):
        if isinstance(item, slice):
            start, stop, step = item.indices(dim)
            if step <= 0:
                raise ShapeError(f"index: negative steps are not supported\n  at {user_location()}")
            triples.append((start, stop, step))
            keep.append(len(range(start, stop, step)))
        elif isinstance(item, (int, np.integer)):
            if not -dim <= item < dim:
                raise ShapeError(f"index: {item} out of range for axis {axis} of {x.type}"
                                 f"\n  at {user_location()}")
            i = int(item) % dim
            triples.append((i, i + 1, 1))
        else:
            raise TypeError(f"index: unsupported index {item!r}; use ints and slices")
    out = x
    if any(t != (0, d, 1) for t, d in zip(triples, x.shape)):
        out = Node.make(Op.SLICE, (x,), tuple(triples))
    return reshape(out, tuple(keep))

