"""Index maps of the movement, reduction and matmul ops, written once over an index algebra.

An element of a node at the output multi-index I is computed from elements of its sources; the
maps here say which: `transpose(alg, I, perm)` is the source index an element of a transpose reads,
`pad(alg, I, pads, src_shape)` the source index and whether it is inside the source (else the
element is zero), and so on. Each map is written once and runs on any *algebra* of index values:

- `SourceAlgebra`: index values are Python source strings, constant-folded as the generated code
  wants them (`add("i0", "0") == "i0"`, `mul("3", 4) == "12"`, `div("e", 1) == "e"`); conditions
  are source strings (`"j >= 0 and j < 5"`). The CUDA emitter uses it with `share` bound to its
  `bind` (a flat offset a reshape reads twice becomes one local).
- `NumpyAlgebra(n)`: index values are int64 arrays of n elements (n elements mapped at once);
  conditions are bool masks. The CUDA persistent-loop planner traces dependencies with it
  (`numpy_source_map`), and the tests check every map against numpy itself.

Integers that come from shapes or args enter an index only through `const(k)`, `mul(a, k)`,
`div(a, k)`, `mod(a, k)` and `in_range(a, lo, hi)`, so an algebra controls how they are spelled.

The maps (`idx`, `red`, `row`, `col` are sequences or values of the algebra's index type):

    broadcast(alg, idx, src_shape, out_shape)     numpy broadcasting (also elementwise operands)
    transpose(alg, idx, perm)
    slice_(alg, idx, triples)                    triples: normalised (start, stop, step) per axis
    pad(alg, idx, pads, src_shape)               -> (src_idx, valid)
    concat(alg, idx, axis, bounds)               -> [(src_idx, valid) per part]; bounds = concat_bounds(sizes)
    concat_part / concat_dest(alg, idx, axis, start)   into a part / where a part's element lands
    reshape(alg, idx, shape, src_shape)          row-major; shares the flat offset when it unravels
    reduce_(alg, idx, red, src_ndim, axes, keepdims)   sum / max / argmax (keepdims=False)
    reduce_dest(alg, src_idx, axes, keepdims)    the inverse: the output element src_idx reduces into
    onehot_ids(alg, idx)                         the ids element of onehot(ids)[idx]; the class is idx[-1]
    matmul_operand(alg, idx, operand_shape, out_shape, row, col)
    flat_offset(alg, idx, shape) / unravel(alg, flat, shape)

and per node: `sources(alg, node, idx)` (the ops whose element reads one element of each source:
elementwise, movement, onehot) -> [Read(src, idx, valid)], `reduce_sources(alg, node, idx, red)`,
`matmul_sources(alg, node, idx, k)`. The IR has no gather: onehot is its only data-dependent op,
and it reads its ids at idx[:-1]; a gather would be one more map here (its source index is a value
the algebra would read through a callback).

Users: the CUDA emitter (`cuda/codegen.py`, `cuda/kernels.py`) and the CUDA persistent-loop
planner (numpy algebra); the Numba CPU emitter (`cpu/values.py`, `cpu/emitters.py`), whose views
compose these maps as callables (`Val.idx`: logical index -> the base array's index; a transpose is
`lambda index: src_idx(transpose(SOURCE, index, perm))`). Its sizes and offsets are run-time
integers (`cpu/values.Dims`), passed to the maps as names (`K`), taken once per node: the only
index arithmetic the CPU emitter writes itself is the loop's per-step slice `[t, *index]`.
The reshape of a materialised array is numpy's own `.reshape` there (a view, no index map).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np

from ...ir.node import Node
from ...ir.ops import ELEMENTWISE, Op

I = TypeVar("I")  # noqa: E741  an index value of an algebra
C = TypeVar("C")  # a condition of an algebra


K = int | str
"""An integer a map takes from a shape or an arg: a constant, or, for a source algebra, the name of
a run-time integer holding it (the Numba emitter names sizes and offsets so that its source does
not depend on them). Only constants fold."""


def is_zero(k: K) -> bool:
    return k == 0 or k == "0"


def _is_one(k: K) -> bool:
    return k == 1 or k == "1"


class IndexAlgebra(Generic[I, C]):
    """The operations the index maps use. Integer arguments named `k`, `lo`, `hi` are constants
    (`K`)."""

    def const(self, k: K) -> I:
        raise NotImplementedError

    def add(self, a: I, b: I) -> I:
        raise NotImplementedError

    def sub(self, a: I, b: I) -> I:
        raise NotImplementedError

    def mul(self, a: I, k: K) -> I:
        raise NotImplementedError

    def div(self, a: I, k: K) -> I:
        """Floor division by a positive constant (indices are non-negative where it is used)."""
        raise NotImplementedError

    def mod(self, a: I, k: K) -> I:
        raise NotImplementedError

    def in_range(self, a: I, lo: K, hi: K) -> C:
        """lo <= a < hi."""
        raise NotImplementedError

    def all_(self, conds: Sequence[C]) -> C:
        """The conjunction of `conds` (true when there are none)."""
        raise NotImplementedError

    def share(self, a: I, stem: str) -> I:
        """`a` is used more than once: an algebra that writes code may bind it to a name."""
        return a


# ---- the source-text algebra ------------------------------------------------------------------

def _is_int(a: K) -> bool:
    return isinstance(a, int) or a.lstrip("-").isdigit()


class SourceAlgebra(IndexAlgebra[str, str]):
    """Index expressions as Python source strings, constants folded; conditions as source strings.
    Integer arguments may be names of run-time integers (`K`): spelled, never folded.
    `bind(expr, stem) -> name`, when given, names shared sub-expressions (see `share`)."""

    def __init__(self, bind: Callable[[str, str], str] | None = None) -> None:
        self._bind = bind

    def const(self, k: K) -> str:
        return k if isinstance(k, str) else str(int(k))

    def add(self, a: str, b: str) -> str:
        if a == "0":
            return b
        if b == "0":
            return a
        if _is_int(a) and _is_int(b):
            return str(int(a) + int(b))
        return f"({a} + {b})"

    def sub(self, a: str, b: str) -> str:
        if b == "0":
            return a
        if _is_int(a) and _is_int(b):
            return str(int(a) - int(b))
        return f"({a} - {b})"

    def mul(self, a: str, k: K) -> str:
        if is_zero(k) or a == "0":
            return "0"
        if _is_one(k):
            return a
        if _is_int(a) and _is_int(k):
            return str(int(a) * int(k))
        return f"({a} * {k})"

    def div(self, a: str, k: K) -> str:
        if _is_one(k):
            return a
        return str(int(a) // int(k)) if _is_int(a) and _is_int(k) else f"({a} // {k})"

    def mod(self, a: str, k: K) -> str:
        if _is_one(k):
            return "0"
        return str(int(a) % int(k)) if _is_int(a) and _is_int(k) else f"({a} % {k})"

    def in_range(self, a: str, lo: K, hi: K) -> str:
        return f"{a} >= {lo} and {a} < {hi}"

    def all_(self, conds: Sequence[str]) -> str:
        return " and ".join(conds) or "True"

    def share(self, a: str, stem: str) -> str:
        return self._bind(a, stem) if self._bind is not None else a


SOURCE = SourceAlgebra()  # the algebra without binding (pure expressions)


# ---- the numpy algebra ---------------------------------------------------------------------------

class NumpyAlgebra(IndexAlgebra[np.ndarray, np.ndarray]):
    """Index values as int64 arrays of `n` elements (n indices mapped at once); conditions as bool
    masks of n elements."""

    def __init__(self, n: int) -> None:
        self.n = n

    def const(self, k: int) -> np.ndarray:
        return np.full(self.n, k, np.int64)

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a + b

    def sub(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a - b

    def mul(self, a: np.ndarray, k: int) -> np.ndarray:
        return a * k

    def div(self, a: np.ndarray, k: int) -> np.ndarray:
        return a // k if k != 1 else a

    def mod(self, a: np.ndarray, k: int) -> np.ndarray:
        return a % k

    def in_range(self, a: np.ndarray, lo: int, hi: int) -> np.ndarray:
        return (a >= lo) & (a < hi)

    def all_(self, conds: Sequence[np.ndarray]) -> np.ndarray:
        out = np.ones(self.n, bool)
        for c in conds:
            out &= c
        return out


# ---- flat offsets ----------------------------------------------------------------------------------

def strides(shape: Sequence[int]) -> list[int]:
    """Row-major strides in elements."""
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return out[::-1]


def flat_offset(alg: IndexAlgebra[I, Any], idx: Sequence[I], shape: Sequence[int]) -> I:
    """Row-major offset of idx in an array of `shape`; size-1 axes contribute nothing."""
    off = alg.const(0)
    for i, st, d in zip(idx, strides(shape), shape):
        if d != 1:
            off = alg.add(off, alg.mul(i, st))
    return off


def unravel(alg: IndexAlgebra[I, Any], flat: I, shape: Sequence[int]) -> list[I]:
    """The multi-index of a row-major flat offset (no bounds: the caller keeps flat in range)."""
    out = []
    for axis, (st, d) in enumerate(zip(strides(shape), shape)):
        if d == 1:
            out.append(alg.const(0))
        elif axis == 0:
            out.append(alg.div(flat, st))
        else:
            out.append(alg.mod(alg.div(flat, st), d))
    return out


# ---- the maps --------------------------------------------------------------------------------------

def broadcast(alg: IndexAlgebra[I, Any], idx: Sequence[I], src_shape: Sequence[int],
              out_shape: Sequence[int]) -> list[I]:
    """numpy broadcasting: drop leading axes, pin size-1 source axes to 0."""
    tail = idx[len(out_shape) - len(src_shape):] if src_shape else ()
    return [alg.const(0) if d == 1 else i for i, d in zip(tail, src_shape)]


def transpose(alg: IndexAlgebra[I, Any], idx: Sequence[I], perm: Sequence[int]) -> list[I]:
    """out[idx] = src[src_idx] with src_idx[perm[a]] = idx[a]."""
    src: list[Any] = [None] * len(perm)
    for a, p in enumerate(perm):
        src[p] = idx[a]
    return src


def slice_(alg: IndexAlgebra[I, Any], idx: Sequence[I], triples: Sequence[tuple[int, int, int]]) -> list[I]:
    return [alg.add(alg.const(start), alg.mul(i, step)) for i, (start, _, step) in zip(idx, triples)]


def pad(alg: IndexAlgebra[I, C], idx: Sequence[I], pads: Sequence[tuple[K, K]],
        src_shape: Sequence[K]) -> tuple[list[I], C]:
    """The source index and whether it lies inside the source (outside, the element is zero).
    Only the padded axes (`padded_axes`) are tested."""
    src, conds = [], []
    for i, (lo, hi), d in zip(idx, pads, src_shape):
        j = i if is_zero(lo) else alg.sub(i, alg.const(lo))
        src.append(j)
        if not (is_zero(lo) and is_zero(hi)):
            conds.append(alg.in_range(j, 0, d))
    return src, alg.all_(conds)


def padded_axes(pads: Sequence[tuple[int, int]]) -> list[int]:
    return [a for a, (lo, hi) in enumerate(pads) if lo or hi]


def concat_bounds(sizes: Sequence[int]) -> list[int]:
    """Where each part of a concatenation starts, then (last) the total extent."""
    return [sum(sizes[:k]) for k in range(len(sizes) + 1)]


def concat(alg: IndexAlgebra[I, C], idx: Sequence[I], axis: int, bounds: Sequence[K]
           ) -> list[tuple[list[I], C]]:
    """Per part k (bounds[k] <= idx[axis] < bounds[k + 1], see `concat_bounds`): its index and
    whether idx falls in it."""
    return [(concat_part(alg, idx, axis, start), alg.in_range(idx[axis], start, stop))
            for start, stop in zip(bounds, bounds[1:])]


def concat_part(alg: IndexAlgebra[I, Any], idx: Sequence[I], axis: int, start: K) -> list[I]:
    """The index into the part starting at `start` that a concatenation's element idx reads."""
    src = list(idx)
    if not is_zero(start):
        src[axis] = alg.sub(idx[axis], alg.const(start))
    return src


def concat_dest(alg: IndexAlgebra[I, Any], idx: Sequence[I], axis: int, start: K) -> list[I]:
    """The inverse of `concat_part`: where element idx of the part starting at `start` lands."""
    dst = list(idx)
    if not is_zero(start):
        dst[axis] = alg.add(alg.const(start), idx[axis])
    return dst


def reshape(alg: IndexAlgebra[I, Any], idx: Sequence[I], shape: Sequence[int],
            src_shape: Sequence[int]) -> list[I]:
    """Row-major reshape. Shapes equal but for size-1 axes map axis to axis; otherwise the flat
    offset is shared (bound once) and unravelled in the source shape."""
    if [d for d in shape if d != 1] == [d for d in src_shape if d != 1]:
        it = iter([i for i, d in zip(idx, shape) if d != 1])
        return [alg.const(0) if d == 1 else next(it) for d in src_shape]
    flat = alg.share(flat_offset(alg, idx, shape), "f")
    return unravel(alg, flat, src_shape)


def reduce_(alg: IndexAlgebra[I, Any], idx: Sequence[I], red: Sequence[I], src_ndim: int,
            axes: Sequence[int], keepdims: bool) -> list[I]:
    """Source index of a reduction's output idx combined with the reduced axes' indices `red`
    (one per axis of `axes`, in order; with keepdims the output's size-1 axes are skipped)."""
    out, it_out, it_red = [], iter(idx), iter(red)
    for a in range(src_ndim):
        if a in axes:
            out.append(next(it_red))
            if keepdims:
                next(it_out)
        else:
            out.append(next(it_out))
    return out


def reduce_dest(alg: IndexAlgebra[I, Any], src_idx: Sequence[I], axes: Sequence[int],
                keepdims: bool) -> list[I]:
    """The inverse direction of `reduce_`: the output element the source element src_idx is
    reduced into (reduced axes dropped, or pinned to 0 with keepdims)."""
    return [alg.const(0) if a in axes else i for a, i in enumerate(src_idx) if keepdims or a not in axes]


def onehot_ids(alg: IndexAlgebra[I, Any], idx: Sequence[I]) -> list[I]:
    """onehot(ids)[idx] is 1 where ids[idx[:-1]] == idx[-1]."""
    return list(idx[:-1])


def matmul_operand(alg: IndexAlgebra[I, Any], idx: Sequence[I], operand_shape: Sequence[int],
                   out_shape: Sequence[int], row: I, col: I) -> list[I]:
    """Index into a matmul operand at (row, col): its batch axes broadcast against the output's."""
    batch = broadcast(alg, idx[:-2], operand_shape[:-2], out_shape[:-2]) if len(operand_shape) > 2 else []
    return list(batch) + [row, col]


# ---- per node --------------------------------------------------------------------------------------

class Read(NamedTuple):
    """An element reads `node` at `idx` (when `valid`; None: always)."""

    node: Node
    idx: list
    valid: Any = None


def reduced_axes(node: Node) -> tuple[int, ...]:
    return tuple(node.arg[0]) if node.op in (Op.SUM, Op.REDUCE_MAX) else (int(node.arg),)  # type: ignore


def keeps_dims(node: Node) -> bool:
    return node.op in (Op.SUM, Op.REDUCE_MAX) and bool(node.arg[1])  # type: ignore[index]


# ops whose element reads exactly one element of each source (at most: pad and concat test `valid`)
POINTWISE_READS = ELEMENTWISE | frozenset({
    Op.BROADCAST, Op.TRANSPOSE, Op.SLICE, Op.RESHAPE, Op.PAD, Op.CONCAT, Op.ONEHOT, Op.CONST})


def sources(alg: IndexAlgebra[I, C], node: Node, idx: Sequence[I]) -> list[Read]:
    """The elements of `node`'s sources its element at idx reads (ops in POINTWISE_READS)."""
    op = node.op
    if op is Op.CONST:
        return []
    if op in ELEMENTWISE or op is Op.BROADCAST:
        return [Read(s, broadcast(alg, idx, s.shape, node.shape)) for s in node.src]
    src = node.src[0]
    if op is Op.TRANSPOSE:
        return [Read(src, transpose(alg, idx, node.arg))]  # type: ignore[arg-type]
    if op is Op.SLICE:
        return [Read(src, slice_(alg, idx, node.arg))]  # type: ignore[arg-type]
    if op is Op.RESHAPE:
        return [Read(src, reshape(alg, idx, node.shape, src.shape))]
    if op is Op.PAD:
        return [Read(src, *pad(alg, idx, node.arg, src.shape))]  # type: ignore[arg-type]
    if op is Op.CONCAT:
        axis: int = node.arg  # type: ignore[assignment]
        parts = concat(alg, idx, axis, concat_bounds([s.shape[axis] for s in node.src]))
        return [Read(s, i, valid) for s, (i, valid) in zip(node.src, parts)]
    if op is Op.ONEHOT:
        return [Read(src, onehot_ids(alg, idx))]
    raise NotImplementedError(f"index maps: {op.value} does not read one element per source")


def reduce_sources(alg: IndexAlgebra[I, Any], node: Node, idx: Sequence[I], red: Sequence[I]) -> list[I]:
    """SUM / REDUCE_MAX / ARGMAX: the source index read at output idx and reduced indices red."""
    return reduce_(alg, idx, red, node.src[0].ndim, reduced_axes(node), keeps_dims(node))


def matmul_sources(alg: IndexAlgebra[I, Any], node: Node, idx: Sequence[I], k: I) -> list[Read]:
    """The two operand elements output idx multiplies at contraction index k."""
    a, b = node.src
    return [Read(a, matmul_operand(alg, idx, a.shape, node.shape, idx[-2], k)),
            Read(b, matmul_operand(alg, idx, b.shape, node.shape, k, idx[-1]))]


# ---- dependency analysis: the numpy algebra over flat indices --------------------------------------

def numpy_source_map(node: Node, flat: np.ndarray) -> list[tuple[Node, np.ndarray, np.ndarray]]:
    """For the elements `flat` (flat row-major indices) of `node`: (source, positions into `flat`,
    source flat indices) for every element each source must supply. Reductions and matmuls repeat
    an element once per reduced index."""
    flat = np.asarray(flat, np.int64)
    n = len(flat)
    pos = np.arange(n)
    op = node.op
    if op is Op.RESHAPE:  # row-major both ways: the same flat offsets
        return [(node.src[0], pos, flat)]
    if op in (Op.SUM, Op.REDUCE_MAX, Op.ARGMAX, Op.MATMUL):
        if op is Op.MATMUL:
            dims = [node.src[0].shape[-1]]
        else:
            dims = [node.src[0].shape[a] for a in reduced_axes(node)]
        count = math.prod(dims)
        alg = NumpyAlgebra(n * count)
        idx = [np.repeat(i, count) for i in unravel(NumpyAlgebra(n), flat, node.shape)]
        red = [np.tile(r, n) for r in unravel(NumpyAlgebra(count), np.arange(count), dims)]
        reads = matmul_sources(alg, node, idx, red[0]) if op is Op.MATMUL else \
            [Read(node.src[0], reduce_sources(alg, node, idx, red))]
        rep = np.repeat(pos, count)
        return [(r.node, rep, flat_offset(alg, r.idx, r.node.shape)) for r in reads]
    if op not in POINTWISE_READS:
        raise NotImplementedError(f"dependency analysis: no index map for {op.value}")
    alg = NumpyAlgebra(n)
    out = []
    for r in sources(alg, node, unravel(alg, flat, node.shape)):
        src_flat = flat_offset(alg, r.idx, r.node.shape)
        out.append((r.node, pos, src_flat) if r.valid is None else (r.node, pos[r.valid], src_flat[r.valid]))
    return out


__all__ = [
    "K", "SOURCE", "IndexAlgebra", "NumpyAlgebra", "POINTWISE_READS", "Read", "SourceAlgebra", "broadcast",
    "concat", "concat_bounds", "concat_dest", "concat_part", "flat_offset", "is_zero", "padded_axes",
    "reduce_dest", "keeps_dims", "matmul_operand", "matmul_sources", "numpy_source_map",
    "onehot_ids", "pad", "reduce_", "reduce_sources", "reduced_axes", "reshape", "slice_", "sources",
    "strides", "transpose", "unravel",
]
