"""Builder functions: the one way to make IR nodes, used by the DSL, the model library and the passes.

Python and numpy scalars become `const` nodes of the other operand's dtype, and numpy arrays become
array constants (a scalar `const` when all elements are equal, else a `FrozenArray` const). A float
scalar or array with an integer or bool tensor is an error (cast the tensor first): truncating 1.5
to 1 would silently change the math. Every function checks shapes at construction (see
ops.TYPE_RULES) and errors name the op, the shapes and the user's line.
"""

from __future__ import annotations

import builtins
import math
from typing import Sequence

import numpy as np

from .dims import (Dim, SizeRatio, SymbolicSizeError, assume_le, exact_quotient, is_symbolic, size,
                   slice_indices, slice_length)
from .node import Node, user_location
from .ops import FLOAT_DTYPES, INT_DTYPES, FrozenArray, Op, ShapeError, TensorType, normalize_dtype

Value = Node | float | int | np.number | np.ndarray
Scalar = float | int | bool


def _scalar(value: object, dtype: str, what: str) -> Scalar:
    """value as the Python scalar a CONST of `dtype` holds; `what` names the caller in errors."""
    if dtype == "bool":
        return bool(value)
    if dtype in INT_DTYPES:
        number = float(value) if isinstance(value, (float, np.floating)) else None  # type: ignore[arg-type]
        if number is not None and not number.is_integer():
            raise ShapeError(f"{what}: the value {number!r} is not an integer, but the constant is "
                             f"{dtype}; round it first or make the constant float\n  at {user_location()}")
        integer = int(value)  # type: ignore[call-overload]
        info = np.iinfo(dtype)
        if not info.min <= integer <= info.max:
            raise ShapeError(f"{what}: the value {integer} does not fit {dtype} (expected {info.min} .. "
                             f"{info.max})\n  at {user_location()}")
        return integer
    return float(value)  # type: ignore[arg-type]


def _array(value: np.ndarray, dtype: str, what: str) -> np.ndarray:
    """value converted to `dtype` with the rules of _scalar (no truncation, no wrap-around)."""
    if dtype in INT_DTYPES:
        with np.errstate(invalid="ignore"):  # inf % 1 is nan: not an integer either
            fractional = np.mod(value, 1) != 0 if value.dtype.kind == "f" else np.zeros(value.shape, bool)
        if fractional.any():
            bad = value[fractional].flat[0]
            raise ShapeError(f"{what}: the array holds {float(bad)!r}, not an integer, but the constant is "
                             f"{dtype}; round it first or make the constant float\n  at {user_location()}")
        if value.size and value.dtype.kind in "iuf":
            info = np.iinfo(dtype)
            lo, hi = value.min(), value.max()
            if lo < info.min or hi > info.max:
                raise ShapeError(f"{what}: the array holds values in {lo} .. {hi}, which do not fit {dtype}"
                                 f"\n  at {user_location()}")
    return value.astype(dtype)


def _uniform(arr: np.ndarray) -> bool:
    """Every element has the bytes of the first (so -0.0 and 0.0 differ, and NaNs of one kind agree)."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    if flat.size <= 1:
        return True
    data = flat.view(np.uint8).reshape(flat.size, -1)
    return bool(np.all(data == data[0]))


def const_arg(value: object, shape: Sequence[int], dtype: str, what: str = "const") -> object:
    """The arg of a CONST of `shape` and `dtype` holding `value` (a scalar, or an array broadcast to
    `shape`): a Python scalar when every element is equal, else a FrozenArray. The text parser uses
    it too, so `parse(print_graph(g))` builds the same nodes."""
    shape = tuple(shape)
    if not isinstance(value, (np.ndarray, FrozenArray, list, tuple)):
        return _scalar(value, dtype, what)
    arr = _array(np.asarray(value), dtype, what)
    try:
        arr = np.broadcast_to(arr, shape)
    except ValueError:
        raise ShapeError(f"{what}: an array of shape {list(arr.shape)} does not broadcast to the "
                         f"constant's shape {list(shape)}\n  at {user_location()}") from None
    if _uniform(arr):
        return _scalar(arr.reshape(-1)[0] if arr.size else 0, dtype, what)
    return FrozenArray(arr)


INIT_KINDS = "zeros, ones, glorot, uniform:a (a >= 0) or normal:std (std >= 0)"


def init_spec_error(spec: str) -> str | None:
    """Why `spec` is not a parameter init spec (INIT_KINDS), or None when it is one. ur.param and
    the text parser both check with it, so a typo never falls back to some default init."""
    kind, colon, value = spec.partition(":")
    if kind in ("zeros", "ones", "glorot"):
        return None if not colon else f"{kind} takes no value, found {spec!r}"
    if kind in ("uniform", "normal"):
        try:
            number = float(value)
        except ValueError:
            return f"{kind} needs a number after ':', found {spec!r}"
        if not (math.isfinite(number) and number >= 0):
            return f"{kind} needs a finite number >= 0 after ':', found {spec!r}"
        return None
    return f"unknown init kind {kind!r} in {spec!r}"


def const(value: object, shape: Sequence[int] | None = None, dtype: str = "float32", what: str = "const"
          ) -> Node:
    """A constant tensor: one value filling `shape` (default ()), or a numpy array (default shape: the
    array's; broadcast to `shape` if given). An integer dtype takes integral values only. `what`
    names the op in errors (an operand lifted for `add` reports as add)."""
    dtype = normalize_dtype(dtype)
    if shape is None:
        shape = np.shape(value) if isinstance(value, (np.ndarray, FrozenArray, list, tuple)) else ()
    shape_t = tuple(size(d) for d in shape)
    if isinstance(value, SizeRatio):   # a constant computed from symbolic sizes (a mean's 1/count)
        if dtype not in FLOAT_DTYPES:
            raise ShapeError(f"{what}: a ratio of sizes ({value}) needs a float constant, found {dtype}")
        return Node.leaf(Op.CONST, TensorType(shape_t, dtype), value)
    if is_symbolic(shape_t) and isinstance(value, (np.ndarray, FrozenArray, list, tuple)) and np.ndim(value):
        raise SymbolicSizeError(f"{what}: an array constant cannot fill the symbolic shape "
                                f"{tuple(str(d) for d in shape_t)}\n  at {user_location()}")
    return Node.leaf(Op.CONST, TensorType(shape_t, dtype), const_arg(value, shape_t, dtype, what))


def _lift(op: Op, x: Value, like: Node) -> Node:
    """An operand of `op` as a node: numbers and numpy arrays become constants of like's dtype."""
    if isinstance(x, Node):
        return x
    if isinstance(x, (np.ndarray, np.generic)) and x.dtype.kind in "biuf":
        arr = np.asarray(x)
        kind = arr.dtype.kind
    elif isinstance(x, (bool, int, float, SizeRatio)):
        arr, kind = None, "b" if isinstance(x, bool) else "i" if isinstance(x, int) else "f"
    else:
        raise TypeError(f"{op.value}: expected an unroll value, a number or a numpy array, found "
                        f"{type(x).__name__}\n  at {user_location()}")
    hint = _mixing_hint(kind, like.dtype)
    if hint is not None:
        found = {"f": "a float", "b": "a bool"}.get(kind, "an integer")
        shown = repr(x) if arr is None or arr.ndim == 0 else f"({arr.dtype} array of shape {list(arr.shape)})"
        raise ShapeError(f"{op.value}: {found} operand {shown} with the {like.dtype} tensor {like.type}; "
                         f"{hint}\n  at {user_location()}")
    if arr is None or arr.ndim == 0:
        return const(x if arr is None else arr.item(), (), like.dtype, op.value)
    return const(arr, arr.shape, like.dtype, op.value)


def _mixing_hint(kind: str, dtype: str) -> str | None:
    """What to do when an operand of numpy kind `kind` (b, i, u, f) meets a tensor of `dtype`, or
    None when they mix: ints convert to floats (as in numpy); anything else would truncate or
    reinterpret values silently."""
    if kind == "f" and dtype not in FLOAT_DTYPES:
        return "cast the tensor first with ur.cast(x, 'float32')"
    if kind in "iu" and dtype == "bool":
        return "cast the tensor first with ur.cast(x, 'int32')"
    if kind == "b" and dtype != "bool":
        return f"use a {dtype} operand (for an array: arr.astype('{dtype}'))"
    return None


def _pair(op: Op, a: Value, b: Value) -> tuple[Node, Node]:
    if not isinstance(a, Node) and not isinstance(b, Node):
        raise TypeError(f"{op.value}: at least one operand must be an unroll value\n  at {user_location()}")
    like = a if isinstance(a, Node) else b
    return _lift(op, a, like), _lift(op, b, like)  # type: ignore[arg-type]


def unary(op: Op, x: Node) -> Node:
    return Node.make(op, (x,))


def binary(op: Op, a: Value, b: Value) -> Node:
    return Node.make(op, _pair(op, a, b))


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
def sin(x: Node) -> Node: return unary(Op.SIN, x)
def cos(x: Node) -> Node: return unary(Op.COS, x)
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
    a, b = _pair(Op.WHERE, a, b)
    return Node.make(Op.WHERE, (cond, a, b))


def cast(x: Node, dtype: object) -> Node:
    dtype = normalize_dtype(dtype)
    return x if x.dtype == dtype else Node.make(Op.CAST, (x,), dtype)


def matmul(a: Value, b: Value) -> Node:
    """numpy's matmul, vectors included: a 1-D `b` is a column (its axis is dropped from the
    result), a 1-D `a` a row; the IR's MATMUL itself takes matrices (a reshape around it)."""
    x, y = _pair(Op.MATMUL, a, b)
    if x.ndim == 0 or y.ndim == 0:
        raise ShapeError(f"matmul: expected operands of rank >= 1 (use * for scalars), found a {x.type} "
                         f"and b {y.type}\n  at {user_location()}")
    if x.ndim >= 2 and y.ndim >= 2:
        return Node.make(Op.MATMUL, (x, y))
    rows = x if x.ndim >= 2 else reshape(x, (1,) + x.shape)
    cols = y if y.ndim >= 2 else reshape(y, y.shape + (1,))
    out = Node.make(Op.MATMUL, (rows, cols))
    shape = out.shape
    if y.ndim == 1:
        shape = shape[:-1]
    if x.ndim == 1:
        shape = shape[:-2] + shape[-1:] if y.ndim >= 2 else shape[:-1]
    return reshape(out, shape)


def _axes(x: Node, axis: int | Sequence[int] | None, what: str = "sum") -> tuple[int, ...]:
    if not isinstance(x, Node):
        Node.make(Op(what), (x,))   # the TypeError that names the op and the operand's type
    if axis is None:
        return tuple(range(x.ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % x.ndim if -x.ndim <= a < x.ndim else a for a in axes))


def sum(x: Node, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Node:  # noqa: A001
    return Node.make(Op.SUM, (x,), (_axes(x, axis), bool(keepdims)))


def max(x: Node, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Node:  # noqa: A001
    return Node.make(Op.REDUCE_MAX, (x,), (_axes(x, axis, Op.REDUCE_MAX.value), bool(keepdims)))


def mean(x: Node, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Node:
    """The average over `axis`. An integer or bool tensor is averaged in float32 (JAX's choice; numpy
    would give float64): summing first in the integer dtype could wrap, and the mean of ints is
    rarely an int."""
    _axes(x, axis)   # a number or an array: the error naming the op
    if x.dtype not in FLOAT_DTYPES:
        x = cast(x, "float32")
    axes = _axes(x, axis)
    count = math.prod(x.shape[a] for a in axes if 0 <= a < x.ndim)
    return sum(x, axes, keepdims) * (1.0 / count if count else 0.0)


def argmax(x: Node, axis: int = -1) -> Node:
    return Node.make(Op.ARGMAX, (x,), axis % x.ndim if -x.ndim <= axis < x.ndim else axis)


def onehot(ids: Node, depth: int) -> Node:
    return Node.make(Op.ONEHOT, (ids,), int(depth))


def reshape(x: Node, *shape: int | Sequence[int]) -> Node:
    """numpy's reshape: one dimension may be -1, inferred from the others. Errors show the shape as
    written, (-1, 5), not a resolved [6, 5] the user never wrote."""
    dims = list(shape[0]) if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)) else list(shape)
    written = tuple(size(d) for d in dims)
    count = x.tensor_type.size
    if written.count(-1) > 1 or any(isinstance(d, int) and d < -1 for d in written):
        raise ShapeError(f"reshape: expected dimensions >= 0 and at most one -1, found {written} for {x.type}"
                         f"\n  at {user_location()}")
    known = math.prod(d for d in written if d != -1)
    shown = tuple(str(d) if isinstance(d, Dim) else d for d in written)
    if -1 in written:
        whole = exact_quotient(count, known) if known != 0 else None
        if whole is None:
            why = "the others hold 0 elements" if known == 0 else f"{count} is not a multiple of {known}"
            raise ShapeError(f"reshape: expected a shape with {count} elements for {x.type}, found {shown}: "
                             f"the -1 has no whole size ({why})\n  at {user_location()}")
        dims_t = tuple(whole if d == -1 else d for d in written)
    else:
        if known != count:
            raise ShapeError(f"reshape: expected a shape with {count} elements for {x.type}, found {shown} "
                             f"({known} elements)\n  at {user_location()}")
        dims_t = written
    return x if dims_t == x.shape else Node.make(Op.RESHAPE, (x,), dims_t)


def transpose(x: Node, perm: Sequence[int] | None = None) -> Node:
    perm_t = tuple(reversed(range(x.ndim))) if perm is None else tuple(p % x.ndim for p in perm)
    return x if perm_t == tuple(range(x.ndim)) else Node.make(Op.TRANSPOSE, (x,), perm_t)


def broadcast_to(x: Node, shape: Sequence[int]) -> Node:
    shape_t = tuple(size(d) for d in shape)
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
    start, stop, step = slice_indices(start, stop, step, x.shape[axis])
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
    pads_t = tuple((size(lo), size(hi)) for lo, hi in pads)
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
            start, stop, step = slice_indices(item.start, item.stop, item.step, dim)
            if step <= 0:
                raise ShapeError(f"index: negative steps are not supported\n  at {user_location()}")
            triples.append((start, stop, step))
            keep.append(slice_length(start, stop, step) if assume_le(start, stop) else 0)
        elif isinstance(item, (int, np.integer)):
            if not (assume_le(-dim, int(item)) and assume_le(int(item) + 1, dim)):
                raise ShapeError(f"index: {item} out of range for axis {axis} of {x.type}"
                                 f"\n  at {user_location()}")
            i = dim + int(item) if item < 0 else int(item)
            triples.append((i, i + 1, 1))
        else:
            raise TypeError(f"index: unsupported index {item!r}; use ints and slices")
    out = x
    if any(t != (0, d, 1) for t, d in zip(triples, x.shape)):
        out = Node.make(Op.SLICE, (x,), tuple(triples))
    return reshape(out, tuple(keep))

