"""The op vocabulary of the IR: op names, op groups, dtypes, and shape/dtype rules as one table.

Ops and their `arg`:
  input    arg=name                      a graph input fed by the caller
  param    arg=(name, init)              a trainable input; `init` is a spec string ("uniform:0.125")
  arg      arg=index                     the index-th argument of a loop body (closed scope)
  const    arg=value                     a tensor filled with one float/int/bool value, or, for a
                                         non-uniform constant (a numpy operand), a FrozenArray of
                                         exactly the node's shape and dtype (build.const decides)
  unary    (neg exp log tanh sigmoid relu sqrt abs sign recip log1p sin cos)
  binary   (add sub mul div pow max min) numpy broadcasting
  compare  (lt le gt ge eq ne)           numpy broadcasting, result dtype bool
  where    src=(cond, a, b)              numpy broadcasting
  cast     arg=dtype
  matmul   (..., M, K) @ (..., K, N)     batch dims broadcast like numpy
  sum/max  arg=(axes, keepdims)
  argmax   arg=axis                      int32 result
  onehot   arg=depth                     int tensor -> float32 (..., depth); an id outside
                                         [0, depth) is an error when run (IndexError)
  reshape  arg=shape
  transpose arg=perm
  broadcast arg=shape                    numpy broadcast_to
  concat   arg=axis                      any number of sources
  slice    arg=((start, stop, step), ...) one triple per axis, normalised
  pad      arg=((lo, hi), ...)           zero padding, one pair per axis
  stop_gradient                          identity whose gradient is zero
  loop     arg=LoopInfo                  see `unroll.ir.node.LoopInfo`
  proj     arg=index                     one output of a multi-output node (loop, fused)
  fused    arg=Graph                     a fused elementwise kernel (built by ir/fuse_cells)

Integer and bool tensors (the rules every backend must agree on; numpy is the reference):
  - Operands of one op share one dtype; nothing is promoted implicitly (cast explicitly).
  - A Python or numpy int (or int array) with an int or float tensor becomes a constant of the
    tensor's dtype. A float scalar or array with an int or bool tensor is an error that names the
    op and says to cast (`i32 + 1.5` would otherwise truncate to `i32 + 1`), even when the float is
    integral: a float literal asks for float math. An int that does not fit the dtype is an error.
    `ur.const`/`ur.full` with an int dtype take integral values only (2.0 is fine, 2.5 is not).
  - Float-only: every unary op (neg, abs, sign, relu, exp, ...: write 0 - x to negate an int),
    div (integer division rounds and divides by zero differently in numpy, Numba and CUDA) and
    pow (a negative integer power has no integer result). See FLOAT_ONLY_BINARY.
  - add, sub, mul, maximum, minimum, sum, max wrap around on overflow in the tensor's dtype, as
    numpy's fixed-width ints do (sum does not widen int32 to int64).
  - `ur.mean` of an int or bool tensor is float32 (JAX's choice; numpy would give float64).
  - cast float -> int truncates toward zero; NaN, inf or an out-of-range float cast to int has no
    defined value (the backends differ), so keep such values out of integer casts.
  - Bool tensors take no binary arithmetic and no number operands (cast first); compares, where,
    cast, movement and reductions work on them (the sum or max of bools is their "any").
  - onehot (and so nn.Embedding) raises IndexError for an id outside [0, depth) (torch raises too);
    an all-zero row would silently train on nothing.

Adding an op: each place below is a table keyed by Op (tests/test_op_checklist.py derives the op
list from Op and fails, naming the table, until all exist; docs/ARCHITECTURE.md has the checklist; "auto" marks tables that take new elementwise ops from the group sets):
  unroll/ir/ops.py                 Op, its group set (UNARY, BINARY, ..., MOVEMENT), TYPE_RULES,
                                   ARITY (and FLOAT_ONLY_BINARY for a float-only binary op)
  unroll/ir/semantics.py           ELEMENTWISE_IMPLS or STRUCTURAL_IMPLS: its numpy meaning
  unroll/backends/numpy_ref.py     IMPLS: auto from semantics; an entry of its own only for ops that
                                   run graphs (loop, proj, fused) or need the node (const, onehot)
  unroll/ir/build.py               its builder function (exported in unroll/__init__.py)
  unroll/ir/autodiff.py            VJPS, or NON_DIFFERENTIABLE
  unroll/ir/simplify.py            RULES (auto: fold_elementwise; other ops need a fold rule to fold)
  unroll/ir/hoist.py               BATCH_RULES: batching it over the time steps (auto for elementwise)
  unroll/ir/text.py                ATTR_TEXT and ATTR_PARSE, when it has an arg
  unroll/viz.py                    ARG_TEXT, when its arg is worth a label
  unroll/ir/optimize.py            node_cost / COPIES (the cost report)
  unroll/backends/lower/scalar.py  SCALAR_EXPRS (every elementwise op), INT_OVERRIDES if ints differ
  unroll/backends/lower/index.py   POINTWISE_READS and sources(), for ops read element by element
  unroll/backends/cpu/emitters.py  EMITTERS (auto: emit_elementwise)
  unroll/backends/cuda/codegen.py  INLINE_OPS and _STRUCTURED (reductions are also special-cased in
                                   cuda/backend.py and cuda/loop.py)
  tests/test_autodiff.py           CASES: a finite-difference check for every op in VJPS
  tests/strategies.py              the random-graph generators (SMOOTH_/KINKED_UNARY,
                                   SMOOTH_/KINKED_BINARY, INT_BINARY, COMPARE)
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Callable, Sequence

from .dims import Dim, assume_le, size, slice_length

import numpy as np


class Op(enum.Enum):
    INPUT = "input"
    PARAM = "param"
    ARG = "arg"
    CONST = "const"
    # unary
    NEG = "neg"
    EXP = "exp"
    LOG = "log"
    TANH = "tanh"
    SIGMOID = "sigmoid"
    RELU = "relu"
    SQRT = "sqrt"
    ABS = "abs"
    SIGN = "sign"
    RECIP = "recip"
    LOG1P = "log1p"
    SIN = "sin"
    COS = "cos"
    # binary
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    POW = "pow"
    MAX = "maximum"
    MIN = "minimum"
    # comparisons
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    EQ = "eq"
    NE = "ne"
    WHERE = "where"
    CAST = "cast"
    MATMUL = "matmul"
    SUM = "sum"
    REDUCE_MAX = "max"
    ARGMAX = "argmax"
    ONEHOT = "onehot"
    RESHAPE = "reshape"
    TRANSPOSE = "transpose"
    BROADCAST = "broadcast"
    CONCAT = "concat"
    SLICE = "slice"
    PAD = "pad"
    STOP_GRADIENT = "stop_gradient"
    LOOP = "loop"
    PROJ = "proj"
    FUSED = "fused"

    def __repr__(self) -> str:
        return f"Op.{self.name}"


UNARY = frozenset({Op.NEG, Op.EXP, Op.LOG, Op.TANH, Op.SIGMOID, Op.RELU, Op.SQRT, Op.ABS, Op.SIGN,
                   Op.RECIP, Op.LOG1P, Op.SIN, Op.COS})
BINARY = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.MAX, Op.MIN})
COMPARE = frozenset({Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE})
ELEMENTWISE = UNARY | BINARY | COMPARE | frozenset({Op.WHERE, Op.CAST, Op.STOP_GRADIENT})
REDUCE = frozenset({Op.SUM, Op.REDUCE_MAX})
MOVEMENT = frozenset({Op.RESHAPE, Op.TRANSPOSE, Op.BROADCAST, Op.CONCAT, Op.SLICE, Op.PAD})
LEAVES = frozenset({Op.INPUT, Op.PARAM, Op.ARG, Op.CONST})
MULTI_OUTPUT = frozenset({Op.LOOP, Op.FUSED})

FLOAT_DTYPES = ("float32", "float64")
INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8")
DTYPES = FLOAT_DTYPES + INT_DTYPES + ("bool",)
DTYPE_SHORT = {"float32": "f32", "float64": "f64", "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64",
               "uint8": "u8", "bool": "bool"}
SHORT_DTYPE = {v: k for k, v in DTYPE_SHORT.items()}


@dataclass(frozen=True)
class TensorType:
    """A static shape and a dtype name (one of DTYPES)."""

    shape: tuple[int, ...]   # ints, or symbolic sizes (ir.dims.Dim) in a shape-polymorphic graph
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise TypeError(f"unknown dtype {self.dtype!r}; expected one of {DTYPES}")
        if not all(isinstance(d, Dim) or (isinstance(d, int) and d >= 0) for d in self.shape):
            raise TypeError(f"shape must be a tuple of non-negative ints or sizes, found {self.shape!r}")

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        return f"{DTYPE_SHORT[self.dtype]}[{','.join(map(str, self.shape))}]"


class ShapeError(ValueError):
    """A node cannot be built: wrong shapes or dtypes. The message names op, expected and found."""


class UnsupportedConstant(NotImplementedError):
    """A backend read a non-uniform array constant as one scalar (see FrozenArray)."""


class FrozenArray:
    """The arg of a non-uniform CONST: a read-only numpy array of exactly the node's shape and dtype.

    It is compared and hashed by content (dtype, shape and bytes), so equal constants intern to one
    node. It has no single fill value: `float()`, `int()`, `bool()` and `index()` raise
    UnsupportedConstant, so a backend that reads every CONST's arg as one scalar fails with a clear
    error instead of computing with a wrong value. `np.asarray(value)` gives the array.
    Build one with `build.const(array)`, which keeps constants whose elements are all equal as a scalar.
    """

    __slots__ = ("array", "_key", "_hash")

    def __init__(self, array: object) -> None:
        arr = np.array(array, order="C")  # a private copy
        arr.flags.writeable = False
        self.array = arr
        self._key = (arr.dtype.str, arr.shape, arr.tobytes())
        self._hash = hash(self._key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FrozenArray):
            return NotImplemented
        return self._hash == other._hash and self._key == other._key

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type, tuple[np.ndarray]]:
        return FrozenArray, (self.array,)  # unpickled through __init__: read-only again

    def __array__(self, dtype: object = None, copy: bool | None = None) -> np.ndarray:
        if dtype is not None and np.dtype(dtype) != self.array.dtype:  # type: ignore[call-overload]
            return self.array.astype(dtype)  # type: ignore[call-overload]
        return self.array.copy() if copy else self.array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def dtype(self) -> str:
        return str(self.array.dtype)

    def __str__(self) -> str:
        return np.array2string(self.array, separator=", ", threshold=16)

    def __repr__(self) -> str:
        return f"FrozenArray({self})"

    def _no_scalar(self, *_: object) -> None:
        raise UnsupportedConstant(
            f"const: a non-uniform array constant {TensorType(self.shape, self.dtype)} has no single fill "
            f"value; this backend supports only constants filled with one value (the numpy backend runs "
            f"array constants): {self}")

    __float__ = __int__ = __index__ = __bool__ = _no_scalar  # type: ignore[assignment]


def normalize_dtype(dtype: object) -> str:
    """Accept 'float32', 'f32', np.float32, np.dtype('float32')."""
    name = getattr(dtype, "__name__", None) or str(getattr(dtype, "name", dtype))
    name = SHORT_DTYPE.get(name, name)
    if name not in DTYPES:
        raise TypeError(f"unsupported dtype {dtype!r}; expected one of {DTYPES}")
    return name


def broadcast_shapes(op: Op, *shapes: tuple[int, ...]) -> tuple[int, ...]:
    """numpy's broadcasting rule, with an error that shows every operand's shape."""
    ndim = max(len(s) for s in shapes)
    out = []
    for axis in range(ndim):
        dims = {s[axis - ndim + len(s)] for s in shapes if axis - ndim + len(s) >= 0} - {1}
        if len(dims) > 1:
            raise ShapeError(f"{op.value}: operands do not broadcast; expected equal dims or 1 on every "
                             f"axis, found shapes {' and '.join(map(str, map(list, shapes)))}")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def _same_dtype(op: Op, types: Sequence[TensorType]) -> str:
    dtypes = {t.dtype for t in types}
    if len(dtypes) != 1:
        raise ShapeError(f"{op.value}: operands must share one dtype (cast explicitly), found "
                         f"{', '.join(str(t) for t in types)}")
    return dtypes.pop()


def _float_only(op: Op, t: TensorType) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ShapeError(f"{op.value}: expected a float tensor, found {t}")


def _norm_axes(op: Op, axes: Sequence[int], ndim: int) -> tuple[int, ...]:
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ShapeError(f"{op.value}: axis {a} out of range for a tensor of rank {ndim}")
        out.append(a % ndim)
    return tuple(sorted(set(out)))


# ---- type rules: op -> (source types, arg) -> result type ---------------------------------------

def _unary(op: Op, ts: Sequence[TensorType], arg: object) -> TensorType:
    _float_only(op, ts[0])
    return ts[0]


# binary ops without an integer meaning every backend shares: integer division rounds and divides by
# zero differently in numpy, Numba and CUDA, and a negative integer power has no integer result
FLOAT_ONLY_BINARY: dict[Op, str] = {
    Op.DIV: "integer division is not supported (backends disagree on rounding and on division by "
            "zero); cast to float first with ur.cast(x, 'float32')",
    Op.POW: "integer powers are not supported (a negative exponent has no integer result); cast to "
            "float first with ur.cast(x, 'float32'), or write x * x for a square",
}


def _binary(op: Op, ts: Sequence[TensorType], arg: object) -> TensorType:
    dtype = _same_dtype(op, ts)
    if dtype == "bool":
        raise ShapeError(f"{op.value}: arithmetic on bool tensors; cast first, found {ts[0]}, {ts[1]}")
    if op in FLOAT_ONLY_BINARY and dtype not in FLOAT_DTYPES:
        raise ShapeError(f"{op.value}: {FLOAT_ONLY_BINARY[op]}; found {ts[0]} and {ts[1]}")
    return TensorType(broadcast_shapes(op, ts[0].shape, ts[1].shape), dtype)


def _compare(op: Op, ts: Sequence[TensorType], arg: object) -> TensorType:
    _same_dtype(op, ts)
    return TensorType(broadcast_shapes(op, ts[0].shape, ts[1].shape), "bool")


def _where(op: Op, ts: Sequence[TensorType], arg: object) -> TensorType:
    if ts[0].dtype != "bool":
        raise ShapeError(f"where: expected a bool condition, found {ts[0]}")
    dtype = _same_dtype(op, ts[1:])
    return TensorType(broadcast_shapes(op, *(t.shape for t in ts)), dtype)


def _cast(op: Op, ts: Sequence[TensorType], arg: object) -> TensorType:
    return TensorType(ts[0].shape, normalize_dtype(arg))


def _matmul(op: Op, ts: Sequence[TensorType], arg: object) -> TensorType:
    a, b = ts
    dtype = _same_dtype(op, ts)
    if a.ndim < 2 or b.ndim < 2:
        raise ShapeError(f"matmul: expected operands of rank >= 2 (reshape vectors to matrices), "
                         f"found a {a} and b {b}")
    if a.shape[-1] != b.shape[-2]:
        raise ShapeError(f"matmul: expected a.shape[-1] == b.shape[-2] (the contracted dim), "
                         f"found a {a} and b {b} ({a.shape[-1]} != {b.shape[-2]})")
    batch = broadcast_shapes(op, a.shape[:-2], b.shape[:-2])
    return TensorType(batch + (a.shape[-2], b.shape[-1]), dtype)


def _reduce(op: Op, ts: Sequence[TensorType], arg: object) -> TensorType:
    axes, keepdims = arg  # type: ignore[misc]
    t = ts[0]
    axes = _norm_axes(op, axes, t.ndim)
    if keepdims:
        return TensorType(tuple(1 if i in axes else d for i, d in enumerate(t.shape)), t.dtype)
    return TensorType(tuple(d for i, d in enumerate(t.shape) if i not in axes), t.dtype)


def _argmax(op: Op, ts: Sequence[TensorType], arg: object) -> TensorType:
    t = ts[0]
    (axis,) = _norm_axes(op, (int(arg),), t.ndim)  # type: ignore[call-overload]
    return TensorType(tuple(d for i, d in enumerate(t.shape) if i != axis), "int32")


def _onehot(op: Op, ts: Sequence[TensorType], arg: object) -> TensorType:
    if ts[0].dtype not in INT_DTYPES:
        raise ShapeError(f"onehot: expected an integer tensor of class ids, found {ts[0]}")
    return TensorType(ts[0].shape + (size(arg),), "float32")


def _reshape(op: Op, ts: Sequence[TensorType], arg: object) -> TensorType:
    shape = tuple(arg)  # type: ignore[call-overload]
    if math.prod(shape) != ts[0].size:
        raise ShapeError(f"reshape: expected a shape with {ts[0].size} elements for {ts[0]}, "
                         f"found {list(shape)}")
    return TensorType(shape, ts[0].dtype)


def _transpose(op: Op, ts: Sequence[TensorType], arg: object) -> TensorType:
    perm = tuple(arg)  # type: ignore[call-overload]
    if sorted(perm) != list(range(ts[0].ndim)):
        raise ShapeError(f"transpose: expected a permutation of 0..{ts[0].ndim - 1}, found {perm}")
    return TensorType(tuple(ts[0].shape[p] for p in perm), ts[0].dtype)


def _broadcast(op: Op, ts: Sequence[TensorType], arg: object) -> TensorType:
    shape = tuple(arg)  # type: ignore[call-overload]
    if broadcast_shapes(op, ts[0].shape, shape) != shape:
        raise ShapeError(f"broadcast: cannot broadcast {ts[0]} to {list(shape)}")
    return TensorType(shape, ts[0].dtype)


def _concat(op: Op, ts: Sequence[TensorType], arg: object) -> TensorType:
    dtype = _same_dtype(op, ts)
    ndim = ts[0].ndim
    (axis,) = _norm_axes(op, (int(arg),), ndim)  # type: ignore[call-overload]
    for t in ts:
        if t.ndim != ndim or any(d != e for i, (d, e) in enumerate(zip(t.shape, ts[0].shape)) if i != axis):
            raise ShapeError(f"concat: expected equal shapes except on axis {axis}, found "
                             f"{', '.join(str(t) for t in ts)}")
    shape = list(ts[0].shape)
    shape[axis] = sum(t.shape[axis] for t in ts)
    return TensorType(tuple(shape), dtype)


def _slice(op: Op, ts: Sequence[TensorType], arg: object) -> TensorType:
    t = ts[0]
    triples = tuple(arg)  # type: ignore[call-overload]
    if len(triples) != t.ndim:
        raise ShapeError(f"slice: expected one (start, stop, step) per axis of {t}, found {triples}")
    shape = []
    for (start, stop, step), dim in zip(triples, t.shape):
        # symbolic bounds: what holds for every size is checked here, the rest on the concrete graph
        if step <= 0 or not (assume_le(0, start) and assume_le(start, dim) and assume_le(0, stop)
                             and assume_le(stop, dim)):
            raise ShapeError(f"slice: expected 0 <= start, stop <= {dim} and step > 0, "
                             f"found ({start}, {stop}, {step}) on {t}")
        shape.append(slice_length(start, stop, step) if assume_le(start, stop) else 0)
    return TensorType(tuple(shape), t.dtype)


def _pad(op: Op, ts: Sequence[TensorType], arg: object) -> TensorType:
    t = ts[0]
    pairs = tuple(arg)  # type: ignore[call-overload]
    if len(pairs) != t.ndim or any(lo < 0 or hi < 0 for lo, hi in pairs):
        raise ShapeError(f"pad: expected one non-negative (lo, hi) per axis of {t}, found {pairs}")
    return TensorType(tuple(d + lo + hi for d, (lo, hi) in zip(t.shape, pairs)), t.dtype)


def _identity(op: Op, ts: Sequence[TensorType], arg: object) -> TensorType:
    return ts[0]


TypeRule = Callable[[Op, Sequence[TensorType], object], TensorType]

# ops whose type needs more than the table (leaves, loop, proj, fused) are typed in node.py
TYPE_RULES: dict[Op, TypeRule] = {
    **{op: _unary for op in UNARY},
    **{op: _binary for op in BINARY},
    **{op: _compare for op in COMPARE},
    Op.WHERE: _where,
    Op.CAST: _cast,
    Op.MATMUL: _matmul,
    Op.SUM: _reduce,
    Op.REDUCE_MAX: _reduce,
    Op.ARGMAX: _argmax,
    Op.ONEHOT: _onehot,
    Op.RESHAPE: _reshape,
    Op.TRANSPOSE: _transpose,
    Op.BROADCAST: _broadcast,
    Op.CONCAT: _concat,
    Op.SLICE: _slice,
    Op.PAD: _pad,
    Op.STOP_GRADIENT: _identity,
}

# how many sources each op takes (None: any number >= 1)
ARITY: dict[Op, int | None] = {
    **{op: 1 for op in UNARY},
    **{op: 2 for op in BINARY | COMPARE},
    Op.WHERE: 3, Op.CAST: 1, Op.MATMUL: 2, Op.SUM: 1, Op.REDUCE_MAX: 1, Op.ARGMAX: 1, Op.ONEHOT: 1,
    Op.RESHAPE: 1, Op.TRANSPOSE: 1, Op.BROADCAST: 1, Op.CONCAT: None, Op.SLICE: 1, Op.PAD: 1,
    Op.STOP_GRADIENT: 1, Op.INPUT: 0, Op.PARAM: 0, Op.ARG: 0, Op.CONST: 0, Op.PROJ: 1,
    Op.LOOP: None, Op.FUSED: None,
}

