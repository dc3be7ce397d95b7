"""Value views: how generated code reads a tensor (`Val`), its run-time sizes and constants (`Dims`),
and views that compose the shared index maps (`lower/index.py`, as `maps`) so that transposes,
slices, broadcasts and per-step slices cost no code.

The maps run on the source-text algebra with sizes and offsets given as `Dims` names, which an
emitter takes once per node (`cg.dims.offset` names a new run-time integer per call, so it must not
be called per element read)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from ...ir.ops import FLOAT_DTYPES
from ..lower import index as maps
from ..lower.index import SOURCE
from .scalars import SPELLING

Index = Callable[[Sequence[str]], list[str]]


@dataclass
class Val:
    """A tensor value in generated code: `base[idx(I)]` is its element at logical index I.

    `const` marks a constant (its scalar expression; no array). `arr` is a Numba array expression
    for the whole value when one exists (a view), `plain` says `arr` is C-contiguous with exactly
    this shape, `tbase` is set when the value is the transpose of such a plain 2-D array (BLAS takes
    it without a copy), and `root` names the variable owning the memory (to avoid returning input
    views). Rank-0 values live in shape-(1,) arrays.
    """

    shape: tuple[int, ...]
    dtype: str
    base: str | None = None
    idx: Index | None = None
    const: str | None = None
    arr: str | None = None
    plain: bool = False
    root: str | None = None
    tbase: str | None = None   # for 2-D transposes of a plain array: that array's expression
    fn: Callable[[Sequence[str]], str] | None = None  # a virtual value (pad, concat): its element
    parts: tuple[int, list] | None = None  # a virtual concat: (axis, [(start or None, part Val)])
    packed: str | None = None  # a loop-invariant weight: its panels packed for gemm.packed_gemm

    def elem(self, index: Sequence[str]) -> str:
        if self.const is not None:
            return self.const
        if self.fn is not None:
            return self.fn(index)
        return f"{self.base}[{', '.join(self.idx(index))}]"  # type: ignore[misc]


def plain_val(name: str, shape: tuple[int, ...], dtype: str, root: str | None = None) -> Val:
    idx: Index = (lambda index: ["0"]) if not shape else (lambda index: list(index))
    return Val(shape, dtype, base=name, idx=idx, arr=name, plain=True, root=root or name)


class Dims:
    """Shape-dependent numbers become run-time parameters `n<k>` (ints) and `k<k>` (floats).

    Sizes (`n`) share one name per value, so a graph's loops over equal extents read one variable;
    offsets (`offset`: slice bounds, pads, concat positions) get a name per use. Otherwise an offset
    that happened to equal a size (a TCN's padding 8 and a batch of 8) changed the source for a new
    T or B: another module and, for a TCN, another 40 s compile. Equal sizes (T == I) still give
    another, equally valid, source. 0 and 1 stay literal (size-1 axes, unit steps), so B = 1 is a
    module of its own.

    Replay (shape-polymorphic graphs, `ir/specialize.py`): every call's result is logged. Given the
    log of another graph's generation (`replay`), each call returns what that one returned and, where
    it was a name, records this graph's value for it (`replayed`), so a graph that differs only in
    sizes gets that graph's source exactly, with its own run-time values, even where its sizes
    coincide (T == B) and would otherwise merge names. Any divergence -- another kind of call, a
    literal that differs, one name given two values -- raises ReplayMismatch; the caller then
    generates normally."""

    def __init__(self, replay: Sequence[tuple[str, str]] | None = None) -> None:
        self.ints: dict[object, str] = {}
        self.values: list[int] = []
        self.floats: dict[tuple[str, float], str] = {}
        self.log: list[tuple[str, str]] = []
        self._replay = replay
        self.replayed: dict[str, float] = {}

    def n(self, value: int) -> str:
        return self._logged("n", value, self._name(int(value), int(value)))

    def offset(self, value: int) -> str:
        return self._logged("offset", value, self._name(int(value), ("offset", len(self.ints))))

    def _logged(self, kind: str, value: float, text: str) -> str:
        if self._replay is not None:
            k = len(self.log)
            if k >= len(self._replay) or self._replay[k][0] != kind:
                raise ReplayMismatch(f"call {k}: {kind}, replayed {self._replay[k] if k < len(self._replay) else 'none'}")
            expected = self._replay[k][1]
            if _NAME.fullmatch(expected):
                if self.replayed.setdefault(expected, value) != value:
                    raise ReplayMismatch(f"{expected} is {self.replayed[expected]} and {value}")
                text = expected
            elif expected != text:
                raise ReplayMismatch(f"call {k}: {text} where the replayed generation wrote {expected}")
        self.log.append((kind, text))
        return text

    def parameters(self) -> tuple[int, list[tuple[str, str]]]:
        """How many int parameters (n0..) and which float ones (name, dtype) the function reads:
        its own, or in replay the replayed generation's (coinciding sizes must not drop names)."""
        if self._replay is None:
            return len(self.values), [(name, dtype) for (dtype, _), name in self.floats.items()]
        ints = {name for _, name in self._replay if _NAME.fullmatch(name) and name[0] == "n"}
        floats = {name: kind[2:] for kind, name in self._replay if _NAME.fullmatch(name) and name[0] == "k"}
        return len(ints), sorted(floats.items(), key=lambda item: int(item[0][1:]))

    def replayed_values(self) -> tuple[list[int], list[float]]:
        """The run-time ints and floats, in the replayed generation's order."""
        n_ints, floats = self.parameters()
        n_floats = len(floats)
        try:
            return ([int(self.replayed[f"n{i}"]) for i in range(n_ints)],
                    [float(self.replayed[f"k{i}"]) for i in range(n_floats)])
        except KeyError as missing:
            raise ReplayMismatch(f"{missing} was never given a value") from None

    def part_offset(self, extents: Sequence[int], k: int) -> str | None:
        """Where part k of a concatenation of parts with these extents starts (None: at 0). After
        parts of its own extent it is written `k * n` with n the part's extent (`2 * n3` for the
        third of equal gates): a loop over the part writes [k * n + i] for i < n, so LLVM can prove
        the parts' stores disjoint and vectorise a kernel that writes all gates (with an unrelated
        offset name it cannot, and kept it scalar)."""
        offset, part = sum(extents[:k]), extents[k]
        if not offset:
            return None
        if part > 1 and all(e == part for e in extents[:k]):  # k is structural, not a size
            return self.n(part) if k == 1 else f"{k} * {self.n(part)}"
        return self.offset(offset)

    def _name(self, value: int, key: object) -> str:
        if value in (0, 1):
            return str(value)
        if key not in self.ints:
            self.ints[key] = f"n{len(self.ints)}"
            self.values.append(value)
        return self.ints[key]

    def shape(self, shape: Sequence[int]) -> str:
        return "(" + "".join(f"{self.n(d)}, " for d in shape) + ")" if shape else "(1,)"

    def f(self, value: float, dtype: str) -> str:
        """A constant of `dtype`: a typed literal (SPELLING.literal) where it is simple, else a
        run-time parameter: `k<n>` for floats (a mean's 1/count), `n<k>` for larger integers, so
        that a constant computed from a size does not put that size into the source."""
        if dtype not in FLOAT_DTYPES:
            v = int(value)
            if dtype == "bool" or abs(v) <= 2:
                return self._logged("fi", v, SPELLING.literal(v, dtype))
            return f"np.{dtype}({'' if v > 0 else '-'}{self.n(abs(v))})"
        value = float(value)
        if math.isinf(value) or math.isnan(value) or _simple(value):
            return self._logged(f"f:{dtype}", value, SPELLING.literal(value, dtype))
        key = (dtype, value)
        if key not in self.floats:
            self.floats[key] = f"k{len(self.floats)}"
        return self._logged(f"f:{dtype}", value, self.floats[key])


class ReplayMismatch(Exception):
    """A replayed generation took another path (see Dims)."""


_NAME = re.compile(r"[nk]\d+")


def _simple(value: float) -> bool:
    """Constants that stay literal: small integers and quarters (not 1/count-like values)."""
    return abs(value) <= 64 and (value * 4).is_integer()


# ---- views: the shared index maps composed ------------------------------------------------------

def bcast(index: Sequence[str], shape: tuple[int, ...], loop_shape: tuple[int, ...]) -> list[str]:
    """Index into an operand of `shape` broadcast (numpy rules) to `loop_shape`."""
    return maps.broadcast(SOURCE, index, shape, loop_shape)


def remap(val: Val, shape: tuple[int, ...], index_map: Callable[[Sequence[str]], list[str]], arr: str | None = None,
          tbase: str | None = None) -> Val:
    """The value whose element at I is val's element at index_map(I) (a view, no code)."""
    if val.const is not None:
        return Val(shape, val.dtype, const=val.const)
    if val.fn is not None:
        fn = val.fn
        return Val(shape, val.dtype, fn=lambda index: fn(index_map(index)))
    src_idx = val.idx
    return Val(shape, val.dtype, base=val.base, idx=lambda index: src_idx(index_map(index)),  # type: ignore[misc]
               arr=arr, root=val.root, tbase=tbase)


def broadcast_val(val: Val, shape: tuple[int, ...]) -> Val:
    """`val` broadcast (numpy rules) to `shape`: a view, no code."""
    if val.shape == shape:
        return val
    if val.const is not None or val.fn is not None:
        src_shape = val.shape
        return remap(val, shape, lambda index: bcast(index, src_shape, shape))
    src_idx = val.idx
    src_shape = val.shape
    return Val(shape, val.dtype, base=val.base, idx=lambda index: src_idx(bcast(index, src_shape, shape)),  # type: ignore[misc]
               root=val.root)


def offset_view(out: Val, shape: tuple[int, ...], axis: int, offset: str | None) -> Val:
    """The part of `out` starting at `offset` along `axis`, with the given shape."""
    out_idx = out.idx
    start = 0 if offset is None else offset
    return Val(shape, out.dtype, base=out.base, root=out.root,
               idx=lambda i: out_idx(maps.concat_dest(SOURCE, i, axis, start)))  # type: ignore[misc]


def step_view(val: Val, t: str, plain: bool = False) -> Val:
    """The t-th slice along axis 0 of a (possibly viewed) array."""
    shape = val.shape[1:]
    if val.const is not None or val.fn is not None:
        return remap(val, shape, lambda index: [t] + list(index))
    src_idx = val.idx
    arr = f"{val.arr}[{t}]" if val.arr is not None and shape else (
        f"{val.arr}[{t}:{t} + 1]" if val.arr is not None else None)
    return Val(shape, val.dtype, base=val.base, idx=lambda index: src_idx([t] + list(index)),  # type: ignore[misc]
               arr=arr, plain=(val.plain or plain) and arr is not None, root=val.root)


def row_view(val: Val, shape: tuple[int, ...], start: str | int, stop: str | None) -> Val:
    """Rows [start, stop) of a plain array (stop None: to the end), as a plain array: `arr[a:b]`
    slices only the first axis, which Numba types as C-contiguous (`arr[a:b, :]` it types 'A'), so
    BLAS reads or writes the row range in place (a convolution's shifted rows, see nn/conv.py)."""
    assert val.plain and val.arr is not None, val
    src_idx = val.idx
    arr = f"{val.arr}[{start or ''}:{stop or ''}]"
    return Val(shape, val.dtype, base=val.base, root=val.root, arr=arr, plain=True,
               idx=lambda i: src_idx(maps.concat_dest(SOURCE, i, 0, start)))  # type: ignore[misc]
