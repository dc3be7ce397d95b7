"""Scalar code generation for the CUDA backend: a node's value at an index, as Python source lines.

`Emitter.value(node, idx)` writes the statements that compute `node` at the multi-index `idx` (index
expressions as source strings) and returns the name or literal that holds it. Materialized nodes are
read through an access function the kernel builder supplies; everything else is inlined:

- elementwise ops from the scalar expression table in `lower/scalar.py` (the Numba CPU backend renders the
  same templates: kernel math is written once), float literals typed to the node's dtype so float32
  kernels stay in float32;
- movement ops (reshape, transpose, broadcast, slice, pad, concat) as index arithmetic;
- reductions, argmax and matmul as loops.

Values are cached per (node, index) within a block scope, so a value used twice by one element is
computed once. This module imports no numba: it only writes source (the tests compile it to PTX).
Index maps for the dependency analysis of persistent kernels (`numpy_source_map`) live here too,
beside the string versions they must agree with.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from ...ir.node import Node
from ...ir.ops import BINARY, COMPARE, ELEMENTWISE, FLOAT_DTYPES, MOVEMENT, UNARY, Op
from ..lower.scalar import SCALAR_EXPRS

Index = tuple[str, ...]
Access = Callable[[Index], str]  # a materialized node's load expression at an index

NUMBA_TYPES = {"float32": "float32", "float64": "float64", "int32": "int32", "int64": "int64",
               "bool": "boolean"}
NP_DTYPES = {"float32": np.float32, "float64": np.float64, "int32": np.int32, "int64": np.int64,
             "bool": np.bool_}
MODULE_HEADER = "import math\nfrom numba import cuda, float32, float64, int32, int64, boolean\n"

# ops the emitter inlines; everything else must be materialized by the kernel builder
INLINE_OPS = ELEMENTWISE | MOVEMENT | frozenset({
    Op.CONST, Op.MATMUL, Op.SUM, Op.REDUCE_MAX, Op.ARGMAX, Op.ONEHOT})

_FLOAT_LITERAL = re.compile(r"(?<![\w.])(\d+\.\d*(?:e[-+]?\d+)?)")


def literal(value: object, dtype: str) -> str:
    """A typed constant: float32 literals must not promote float32 arithmetic to float64."""
    if dtype == "bool":
        return "True" if value else "False"
    if dtype in ("int32", "int64"):
        return f"{dtype}({int(value)})"  # type: ignore[call-overload]
    v = float(value)  # type: ignore[arg-type]
    text = ("math.inf" if v > 0 else "-math.inf") if math.isinf(v) else "math.nan" if math.isnan(v) \
        else repr(v)
    return f"{dtype}({text})"


def render_typed(op: Op, operands: Sequence[str], dtype: str) -> str:
    """The shared template of `op` with its float literals typed as `dtype`."""
    template = SCALAR_EXPRS[op]
    if dtype == "float32":
        template = _FLOAT_LITERAL.sub(lambda m: f"float32({m.group(1)})", template)
    return template.format(*operands)


# ---- index arithmetic on source strings ------------------------------------------------------

def _is_int(a: str) -> bool:
    return a.lstrip("-").isdigit()


def ix_add(a: str, b: str) -> str:
    if a == "0":
        return b
    if b == "0":
        return a
    if _is_int(a) and _is_int(b):
        return str(int(a) + int(b))
    return f"({a} + {b})"


def ix_mul(a: str, k: int) -> str:
    if k == 0 or a == "0":
        return "0"
    if k == 1:
        return a
    if _is_int(a):
        return str(int(a) * k)
    return f"({a} * {k})"


def ix_div(a: str, k: int) -> str:
    if k == 1:
        return a
    return str(int(a) // k) if _is_int(a) else f"({a} // {k})"


def ix_mod(a: str, k: int) -> str:
    if k == 1:
        return "0"
    return str(int(a) % k) if _is_int(a) else f"({a} % {k})"


def strides(shape: Sequence[int]) -> list[int]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return out[::-1]


def flat_offset(idx: Index, shape: Sequence[int]) -> str:
    """Row-major offset of idx in an array of `shape`; size-1 axes contribute nothing."""
    off = "0"
    for i, st, d in zip(idx, strides(shape), shape):
        if d != 1:
            off = ix_add(off, ix_mul(i, st))
    return off


def unravel(flat: str, shape: Sequence[int]) -> Index:
    """Index expressions of a flat row-major offset (no bounds: the caller keeps flat in range)."""
    out = []
    for axis, (st, d) in enumerate(zip(strides(shape), shape)):
        if d == 1:
            out.append("0")
        elif axis == 0:
            out.append(ix_div(flat, st))
        else:
            out.append(ix_mod(ix_div(flat, st), d))
    return tuple(out)


def broadcast_index(idx: Index, src_shape: Sequence[int], out_shape: Sequence[int]) -> Index:
    """numpy broadcasting: drop leading axes, pin size-1 source axes to 0."""
    tail = idx[len(out_shape) - len(src_shape):] if src_shape else ()
    return tuple("0" if d == 1 else i for i, d in zip(tail, src_shape))


def reduced_axes(node: Node) -> tuple[int, ...]:
    return tuple(node.arg[0]) if node.op in (Op.SUM, Op.REDUCE_MAX) else (int(node.arg),)  # type: ignore


def reduce_source_index(node: Node, idx: Index, red: Index) -> Index:
    """Source index of a reduction's output idx combined with the reduced axes' indices `red`."""
    src_nd = node.src[0].ndim
    axes = reduced_axes(node)
    keep = node.op in (Op.SUM, Op.REDUCE_MAX) and node.arg[1]  # type: ignore[index]
    out, it_out, it_red = [], iter(idx), iter(red)
    for a in range(src_nd):
        if a in axes:
            out.append(next(it_red))
            if keep:
                next(it_out)
        else:
            out.append(next(it_out))
    return tuple(out)


# ---- the emitter -------------------------------------------------------------------------------

class Emitter:
    """Writes the statements computing node values at indices. `access(node)` returns how to load
    a materialized node, or None to inline it."""

    def __init__(self, access: Callable[[Node], Access | None], level: int = 1) -> None:
        self.access = access
        self.lines: list[str] = []
        self.level = level
        self._scopes: list[dict[tuple[Node, Index], str]] = [{}]
        self._ids = itertools.count()

    # -- statements and scopes
    def line(self, text: str) -> None:
        self.lines.append("    " * self.level + text)

    def fresh(self, stem: str = "v") -> str:
        return f"{stem}{next(self._ids)}"

    def bind(self, expr: str, stem: str = "v") -> str:
        if expr.isidentifier() or _is_int(expr):
            return expr
        name = self.fresh(stem)
        self.line(f"{name} = {expr}")
        return name

    @contextmanager
    def block(self, header: str) -> Iterator[None]:
        """An indented block (if/for/while) whose cached values stay inside it."""
        self.line(header)
        self.level += 1
        self._scopes.append({})
        try:
            yield
        finally:
            self._scopes.pop()
            self.level -= 1

    @contextmanager
    def scope(self) -> Iterator[None]:
        """A cache scope without indentation (values computed here are not reused after it)."""
        self._scopes.append({})
        try:
            yield
        finally:
            self._scopes.pop()

    def _lookup(self, key: tuple[Node, Index]) -> str | None:
        for scope in reversed(self._scopes):
            if key in scope:
                return scope[key]
        return None

    def _store(self, key: tuple[Node, Index], name: str) -> None:
        self._scopes[-1][key] = name

    # -- values
    def value(self, node: Node, idx: Sequence[str]) -> str:
        """Emit node at idx; returns a name or literal. Iterative over elementwise/movement chains
        (they can be deep); ops with control flow recurse only through their own structure."""
        stack: list[tuple[Node, Index]] = [(node, tuple(idx))]
        pending: dict[tuple[Node, Index], list[tuple[Node, Index]]] = {}  # sources asked for once
        while stack:
            n, ix = stack[-1]
            key = (n, ix)
            if self._lookup(key) is not None:
                stack.pop()
                continue
            acc = self.access(n)
            if acc is not None:
                self._store(key, self.bind(acc(ix), "ld"))
                stack.pop()
                continue
            if n.op not in INLINE_OPS:
                raise NotImplementedError(f"cuda codegen: cannot inline {n.op.value} ({n!r}, built at "
                                          f"{n.loc}); it must be materialized")
            if n.op in _STRUCTURED:
                self._store(key, _STRUCTURED[n.op](self, n, ix))
                stack.pop()
                continue
            needs = pending.get(key)
            if needs is None:
                needs = pending[key] = self._simple_sources(n, ix)
            missing = [r for r in needs if self._lookup(r) is None]
            if missing:
                stack.extend(reversed(missing))
                continue
            self._store(key, self._simple(n, [self._lookup(r) for r in needs]))  # type: ignore[misc]
            stack.pop()
        result = self._lookup((node, tuple(idx)))
        assert result is not None
        return result

    def _simple_sources(self, n: Node, ix: Index) -> list[tuple[Node, Index]]:
        if n.op is Op.CONST:
            return []
        if n.op in ELEMENTWISE or n.op is Op.BROADCAST:
            return [(s, broadcast_index(ix, s.shape, n.shape)) for s in n.src]
        if n.op is Op.TRANSPOSE:
            src = [""] * n.ndim
            for a, p in enumerate(n.arg):  # type: ignore[arg-type]
                src[p] = ix[a]
            return [(n.src[0], tuple(src))]
        if n.op is Op.SLICE:
            return [(n.src[0], tuple(ix_add(str(start), ix_mul(i, step))
                                      for i, (start, _, step) in zip(ix, n.arg)))]  # type: ignore
        if n.op is Op.RESHAPE:
            return [(n.src[0], self.reshape_index(ix, n.shape, n.src[0].shape))]
        raise AssertionError(n.op)

    def reshape_index(self, ix: Index, shape: Sequence[int], src_shape: Sequence[int]) -> Index:
        squeezed = [i for i, d in zip(ix, shape) if d != 1]
        if [d for d in shape if d != 1] == [d for d in src_shape if d != 1]:
            it = iter(squeezed)
            return tuple("0" if d == 1 else next(it) for d in src_shape)
        flat = self.bind(flat_offset(ix, shape), "f")
        return unravel(flat, src_shape)

    def _simple(self, n: Node, vals: list[str]) -> str:
        if n.op is Op.CONST:
            return literal(n.arg, n.dtype)
        if n.op in MOVEMENT or n.op is Op.STOP_GRADIENT:
            return vals[0]
        if n.op is Op.CAST:
            if n.dtype == "bool":
                return self.bind(f"({vals[0]} != 0)")
            return self.bind(f"{NUMBA_TYPES[n.dtype]}({vals[0]})")
        if n.op is Op.POW and n.src[1].op is Op.CONST and n.src[1].arg in (1.0, 2.0):
            return vals[0] if n.src[1].arg == 1.0 else self.bind(f"({vals[0]} * {vals[0]})")
        dtype = n.src[0].dtype if n.op in COMPARE else n.dtype
        return self.bind(render_typed(n.op, vals, dtype))


# ---- ops with control flow -----------------------------------------------------------------------

def _emit_pad(em: Emitter, n: Node, ix: Index) -> str:
    src = n.src[0]
    conds, sidx = [], []
    for i, (lo, hi), d in zip(ix, n.arg, src.shape):  # type: ignore[misc]
        j = ix_add(i, str(-lo)) if lo else i
        sidx.append(j)
        if lo or hi:
            conds.append(f"{j} >= 0 and {j} < {d}")
    out = em.fresh("pad")
    em.line(f"{out} = {literal(0, n.dtype)}")
    with em.block(f"if {' and '.join(conds) or 'True'}:"):
        em.line(f"{out} = {em.value(src, tuple(sidx))}")
    return out


def _emit_concat(em: Emitter, n: Node, ix: Index) -> str:
    axis: int = n.arg  # type: ignore[assignment]
    out = em.fresh("cat")
    em.line(f"{out} = {literal(0, n.dtype)}")
    start = 0
    for k, s in enumerate(n.src):
        stop = start + s.shape[axis]
        sidx = list(ix)
        sidx[axis] = ix_add(ix[axis], str(-start))
        cond = f"{ix[axis]} >= {start} and {ix[axis]} < {stop}"
        with em.block(f"{'if' if k == 0 else 'elif'} {cond}:"):
            em.line(f"{out} = {em.value(s, tuple(sidx))}")
        start = stop
    return out


def _emit_onehot(em: Emitter, n: Node, ix: Index) -> str:
    ids = em.value(n.src[0], ix[:-1])
    return em.bind(f"({literal(1, n.dtype)} if {ids} == {ix[-1]} else {literal(0, n.dtype)})")


def _red_loops(em: Emitter, dims: Sequence[int]) -> tuple[list[str], list[str]]:
    names = [em.fresh("r") for _ in dims]
    headers = [f"for {r} in range({d}):" for r, d in zip(names, dims)]
    return names, headers


@contextmanager
def _nested(em: Emitter, headers: Sequence[str]) -> Iterator[None]:
    if not headers:
        with em.scope():
            yield
        return
    with em.block(headers[0]):
        with _nested(em, headers[1:]):
            yield


def _emit_reduce(em: Emitter, n: Node, ix: Index) -> str:
    src = n.src[0]
    axes = reduced_axes(n)
    dims = [src.shape[a] for a in axes]
    acc = em.fresh("acc")
    is_sum = n.op is Op.SUM
    em.line(f"{acc} = {literal(0 if is_sum else -math.inf, n.dtype)}")
    names, headers = _red_loops(em, dims)
    with _nested(em, headers):
        v = em.value(src, reduce_source_index(n, ix, tuple(names)))
        em.line(f"{acc} = {acc} + {v}" if is_sum else f"{acc} = max({acc}, {v})")
    return acc


def _emit_argmax(em: Emitter, n: Node, ix: Index) -> str:
    src = n.src[0]
    (axis,) = reduced_axes(n)
    best, arg = em.fresh("best"), em.fresh("am")
    em.line(f"{best} = {em.value(src, reduce_source_index(n, ix, ('0',)))}")
    em.line(f"{arg} = int32(0)")
    r = em.fresh("r")
    with em.block(f"for {r} in range(1, {src.shape[axis]}):"):
        v = em.value(src, reduce_source_index(n, ix, (r,)))
        with em.block(f"if {v} > {best}:"):
            em.line(f"{best} = {v}")
            em.line(f"{arg} = int32({r})")
    return arg


def matmul_operand_index(operand: Node, out: Node, ix: Index, row: str, col: str) -> Index:
    """Index into a matmul operand: its batch axes broadcast against the output's batch axes."""
    batch = broadcast_index(ix[:-2], operand.shape[:-2], out.shape[:-2]) if operand.ndim > 2 else ()
    return tuple(batch) + (row, col)


def _emit_matmul(em: Emitter, n: Node, ix: Index) -> str:
    a, b = n.src
    acc = em.fresh("acc")
    em.line(f"{acc} = {literal(0, n.dtype)}")
    k = em.fresh("k")
    with em.block(f"for {k} in range({a.shape[-1]}):"):
        av = em.value(a, matmul_operand_index(a, n, ix, ix[-2], k))
        bv = em.value(b, matmul_operand_index(b, n, ix, k, ix[-1]))
        em.line(f"{acc} = {acc} + {av} * {bv}")
    return acc


_STRUCTURED: dict[Op, Callable[[Emitter, Node, Index], str]] = {
    Op.PAD: _emit_pad, Op.CONCAT: _emit_concat, Op.ONEHOT: _emit_onehot, Op.SUM: _emit_reduce,
    Op.REDUCE_MAX: _emit_reduce, Op.ARGMAX: _emit_argmax, Op.MATMUL: _emit_matmul,
}


# ---- the same index maps on numpy arrays (dependency analysis of persistent kernels) ---------

def ravel(idx: Sequence[np.ndarray], shape: Sequence[int]) -> np.ndarray:
    flat = np.zeros(len(idx[0]) if idx else 1, np.int64)
    for i, st in zip(idx, strides(shape)):
        flat += i * st
    return flat


def unravel_np(flat: np.ndarray, shape: Sequence[int]) -> list[np.ndarray]:
    if not shape:
        return []
    return list(np.unravel_index(flat, tuple(shape))) if all(shape) else [flat.copy() for _ in shape]


def _bcast_np(idx: list[np.ndarray], src_shape: Sequence[int], out_shape: Sequence[int]) -> list[np.ndarray]:
    tail = idx[len(out_shape) - len(src_shape):] if src_shape else []
    return [np.zeros_like(i) if d == 1 else i for i, d in zip(tail, src_shape)]


def numpy_source_map(n: Node, flat: np.ndarray) -> list[tuple[Node, np.ndarray, np.ndarray]]:
    """For the elements `flat` of node n: (source, element positions into `flat`, source flat
    indices) for every element each source must supply. Reductions and matmuls repeat an element
    once per reduced index."""
    pos = np.arange(len(flat))
    if n.op is Op.CONST:
        return []
    if n.op is Op.RESHAPE:
        return [(n.src[0], pos, flat)]
    idx = unravel_np(flat, n.shape)
    if n.op in ELEMENTWISE or n.op is Op.BROADCAST:
        return [(s, pos, ravel(_bcast_np(idx, s.shape, n.shape), s.shape)) for s in n.src]
    if n.op is Op.TRANSPOSE:
        src = [idx[0]] * n.ndim
        for a, p in enumerate(n.arg):  # type: ignore[arg-type]
            src[p] = idx[a]
        return [(n.src[0], pos, ravel(src, n.src[0].shape))]
    if n.op is Op.SLICE:
        src = [start + step * i for i, (start, _, step) in zip(idx, n.arg)]  # type: ignore[misc]
        return [(n.src[0], pos, ravel(src, n.src[0].shape))]
    if n.op is Op.PAD:
        s = n.src[0]
        src = [i - lo for i, (lo, _) in zip(idx, n.arg)]  # type: ignore[misc]
        ok = np.ones(len(flat), bool)
        for i, d in zip(src, s.shape):
            ok &= (i >= 0) & (i < d)
        return [(s, pos[ok], ravel([i[ok] for i in src], s.shape))]
    if n.op is Op.CONCAT:
        axis: int = n.arg  # type: ignore[assignment]
        out, start = [], 0
        for s in n.src:
            stop = start + s.shape[axis]
            ok = (idx[axis] >= start) & (idx[axis] < stop)
            src = [i[ok] for i in idx]
            src[axis] = src[axis] - start
            out.append((s, pos[ok], ravel(src, s.shape)))
            start = stop
        return out
    if n.op is Op.ONEHOT:
        return [(n.src[0], pos, ravel(idx[:-1], n.src[0].shape))]
    if n.op in (Op.SUM, Op.REDUCE_MAX, Op.ARGMAX):
        s = n.src[0]
        axes = reduced_axes(n)
        keep = n.op is not Op.ARGMAX and n.arg[1]  # type: ignore[index]
        dims = [s.shape[a] for a in axes]
        count = math.prod(dims)
        red = unravel_np(np.arange(count), dims)
        rep = [np.repeat(i, count) for i in idx]
        src, it_out, it_red = [], iter(rep), iter(red)
        for a in range(s.ndim):
            if a in axes:
                src.append(np.tile(next(it_red), len(flat)))
                if keep:
                    next(it_out)
            else:
                src.append(next(it_out))
        return [(s, np.repeat(pos, count), ravel(src, s.shape))]
    if n.op is Op.MATMUL:
        a, b = n.src
        kdim = a.shape[-1]
        ks = np.tile(np.arange(kdim), len(flat))
        rep = [np.repeat(i, kdim) for i in idx]
        out = []
        for operand, rc in ((a, (rep[-2], ks)), (b, (ks, rep[-1]))):
            batch = _bcast_np(rep[:-2], operand.shape[:-2], n.shape[:-2]) if operand.ndim > 2 else []
            out.append((operand, np.repeat(pos, kdim), ravel(list(batch) + list(rc), operand.shape)))
        return out
    raise NotImplementedError(f"cuda dependency analysis: no index map for {n.op.value}")


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


__all__ = [
    "BINARY",
    "INLINE_OPS",
    "MODULE_HEADER",
    "NP_DTYPES",
    "NUMBA_TYPES",
    "UNARY",
    "Access",
    "Emitter",
    "flat_offset",
    "literal",
    "numpy_source_map",
    "ravel",
    "render_typed",
    "strides",
    "unravel",
    "unravel_np",
]


def inline_fused(roots: Sequence[Node]) -> list[Node]:
    """Replace each `proj(fused, i)` by the fused body's output i on the fused node's sources: the
    CUDA backend fuses elementwise work itself, across whatever FUSED groups the passes formed."""
    from ...ir.node import Graph, rewrite, substitute

    def visit(node: Node, src: tuple[Node, ...]) -> Node | None:
        if node.op is Op.PROJ and src[0].op is Op.FUSED:
            body: Graph = src[0].arg  # type: ignore[assignment]
            return substitute([body.outputs[int(node.arg)]], dict(zip(body.inputs, src[0].src)))[0]  # type: ignore
        return None
    return rewrite(list(roots), visit)
