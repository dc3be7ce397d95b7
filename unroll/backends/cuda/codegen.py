"""Scalar code generation for the CUDA backend: a node's value at an index, as Python source lines.

`Emitter.value(node, idx)` writes the statements that compute `node` at the multi-index `idx` (index
expressions as source strings) and returns the name or literal that holds it. Materialized nodes are
read through an access function the kernel builder supplies; everything else is inlined:

- elementwise ops from `CUDA_EXPRS`, the shared table of `lower/scalar.py` with CUDA's commented
  overrides (`derive`), rendered through one `Spelling("")`: float literals typed to the node's
  dtype (`float32(0.5)`) so float32 kernels stay in float32;
- movement ops (reshape, transpose, broadcast, slice, pad, concat) as index arithmetic;
- reductions, argmax and matmul as loops (max and argmax with numpy's NaN rules);
- onehot with a check of its ids: an id outside [0, depth) is recorded in an error buffer that the
  host reads after the launch (a kernel cannot raise).

Values are cached per (node, index) within a block scope, so a value used twice by one element is
computed once. This module imports no numba: it only writes source (the tests compile it to PTX).
Index arithmetic (movement ops, reductions, matmul operands) is `lower/index.py`'s maps on its
source-text algebra; the persistent-loop planner runs the same maps on numpy arrays.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from ...ir.node import Node
from ...ir.ops import BINARY, COMPARE, ELEMENTWISE, FLOAT_DTYPES, INT_DTYPES, MOVEMENT, UNARY, Op
from ..lower import index
from ..lower.scalar import Spelling, derive

Index = tuple[str, ...]
Access = Callable[[Index], str]  # a materialized node's load expression at an index

NUMBA_TYPES = {**{d: d for d in FLOAT_DTYPES + INT_DTYPES}, "bool": "boolean"}
NP_DTYPES = {d: np.dtype(d).type for d in FLOAT_DTYPES + INT_DTYPES + ("bool",)}
MODULE_HEADER = f"import math\nfrom numba import cuda, {', '.join(NUMBA_TYPES.values())}\n"

# an onehot's error buffer: [flag, an out-of-range id]
CHECK_DTYPE = "int64"
CHECK_SIZE = 2

# ops the emitter inlines; everything else must be materialized by the kernel builder
INLINE_OPS = ELEMENTWISE | MOVEMENT | frozenset({
    Op.CONST, Op.MATMUL, Op.SUM, Op.REDUCE_MAX, Op.ARGMAX, Op.ONEHOT})

# The CUDA table: lower/scalar.py's base table as it is (no overrides needed): math.* go to
# libdevice's IEEE functions, `**` to pow, `abs` to fabs, and the base MAX/MIN/RELU are already the
# NaN-propagating selects numpy requires. CAST is not rendered from a table: its spelling depends
# on the target dtype (see Emitter._simple).
CUDA_EXPRS = derive({})

# numba.cuda source imports the type names (MODULE_HEADER): literals are `float32(0.5)`
SPELLING = Spelling("")
literal = SPELLING.literal  # the shared typed-literal helper, as kernels.py and loop.py call it


def render(op: Op, operands: Sequence[str], dtype: str) -> str:
    """`op` from the CUDA table applied to operand names, literals typed for `dtype` (integer
    operands use the integer forms: no float literals, no NaN tests)."""
    return SPELLING.render(CUDA_EXPRS, op, operands, dtype)


def reduce_identity(op: Op, dtype: str) -> str:
    """The start value of a SUM or REDUCE_MAX accumulator."""
    if op is Op.SUM or dtype == "bool":
        return literal(0, dtype)
    if dtype in INT_DTYPES:
        return literal(np.iinfo(dtype).min, dtype)
    return literal(-math.inf, dtype)


def argmax_update(v: str, best: str, dtype: str) -> str:
    """When argmax replaces the best value by `v`: numpy's argmax returns the first maximum, or the
    first NaN if there is one (a NaN compares false, so it is tested for, and then never replaced)."""
    if dtype not in FLOAT_DTYPES:
        return f"{v} > {best}"
    return f"({v} > {best}) | (({v} != {v}) & ({best} == {best}))"


# ---- index maps: lower/index.py's, on source strings ---------------------------------------------

def flat_offset(idx: Sequence[str], shape: Sequence[int]) -> str:
    """Row-major offset of idx in an array of `shape` (source text)."""
    return index.flat_offset(index.SOURCE, idx, shape)


def unravel(flat: str, shape: Sequence[int]) -> Index:
    """Index expressions of a flat row-major offset (no bounds: the caller keeps flat in range)."""
    return tuple(index.unravel(index.SOURCE, flat, shape))


# ---- the emitter -------------------------------------------------------------------------------

class Emitter:
    """Writes the statements computing node values at indices. `access(node)` returns how to load
    a materialized node, or None to inline it. `check(node)` names the error buffer (CHECK_DTYPE,
    CHECK_SIZE elements) where an inlined onehot records an out-of-range id; the kernel builder
    registers it as a parameter and the host reads it after the launch (`kernels.raise_if_flagged`)."""

    def __init__(self, access: Callable[[Node], Access | None], level: int = 1,
                 check: Callable[[Node], str] | None = None) -> None:
        self.access = access
        self.check = check
        self.lines: list[str] = []
        self.level = level
        self._scopes: list[dict[tuple[Node, Index], str]] = [{}]
        self._ids = itertools.count()
        self.ix = index.SourceAlgebra(bind=self.bind)  # index maps; shared offsets become locals

    # -- statements and scopes
    def line(self, text: str) -> None:
        self.lines.append("    " * self.level + text)

    def fresh(self, stem: str = "v") -> str:
        return f"{stem}{next(self._ids)}"

    def bind(self, expr: str, stem: str = "v") -> str:
        if expr.isidentifier() or expr.lstrip("-").isdigit():
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
        reads = index.sources(self.ix, n, ix)
        assert all(r.valid is None for r in reads), n.op  # pad and concat are structured
        return [(r.node, tuple(r.idx)) for r in reads]

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
        return self.bind(render(n.op, vals, dtype))


# ---- ops with control flow -----------------------------------------------------------------------

def _emit_pad(em: Emitter, n: Node, ix: Index) -> str:
    ((src, sidx, valid),) = index.sources(em.ix, n, ix)
    out = em.fresh("pad")
    em.line(f"{out} = {literal(0, n.dtype)}")
    with em.block(f"if {valid}:"):
        em.line(f"{out} = {em.value(src, tuple(sidx))}")
    return out


def _emit_concat(em: Emitter, n: Node, ix: Index) -> str:
    out = em.fresh("cat")
    em.line(f"{out} = {literal(0, n.dtype)}")
    for k, (s, sidx, valid) in enumerate(index.sources(em.ix, n, ix)):
        with em.block(f"{'if' if k == 0 else 'elif'} {valid}:"):
            em.line(f"{out} = {em.value(s, tuple(sidx))}")
    return out


def _emit_onehot(em: Emitter, n: Node, ix: Index) -> str:
    """1 where the id equals the class index. A kernel cannot raise: an id outside [0, depth)
    sets the node's error buffer to (1, id), and the host raises IndexError after the launch."""
    ((src, ids_idx, _),) = index.sources(em.ix, n, ix)
    ids = em.value(src, tuple(ids_idx))
    if em.check is None:
        raise AssertionError("cuda codegen: an onehot needs an error buffer (Emitter(check=...))")
    err = em.check(n)
    with em.block(f"if {ids} < 0 or {ids} >= {int(n.arg)}:"):  # type: ignore[call-overload]
        em.line(f"{err}[0] = 1")
        em.line(f"{err}[1] = {ids}")
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
    dims = [src.shape[a] for a in index.reduced_axes(n)]
    acc = em.fresh("acc")
    em.line(f"{acc} = {reduce_identity(n.op, n.dtype)}")
    names, headers = _red_loops(em, dims)
    with _nested(em, headers):
        v = em.value(src, tuple(index.reduce_sources(em.ix, n, ix, names)))
        # max: the table's NaN-propagating select, as np.max propagates NaN
        em.line(f"{acc} = {acc} + {v}" if n.op is Op.SUM else f"{acc} = {render(Op.MAX, (acc, v), n.dtype)}")
    return acc


def _emit_argmax(em: Emitter, n: Node, ix: Index) -> str:
    src = n.src[0]
    (axis,) = index.reduced_axes(n)
    best, arg = em.fresh("best"), em.fresh("am")
    em.line(f"{best} = {em.value(src, tuple(index.reduce_sources(em.ix, n, ix, ('0',))))}")
    em.line(f"{arg} = {literal(0, 'int32')}")
    r = em.fresh("r")
    with em.block(f"for {r} in range(1, {src.shape[axis]}):"):
        v = em.value(src, tuple(index.reduce_sources(em.ix, n, ix, (r,))))
        with em.block(f"if {argmax_update(v, best, src.dtype)}:"):
            em.line(f"{best} = {v}")
            em.line(f"{arg} = int32({r})")
    return arg


def _emit_matmul(em: Emitter, n: Node, ix: Index) -> str:
    a, b = n.src
    acc = em.fresh("acc")
    em.line(f"{acc} = {literal(0, n.dtype)}")
    k = em.fresh("k")
    with em.block(f"for {k} in range({a.shape[-1]}):"):
        (_, a_idx, _), (_, b_idx, _) = index.matmul_sources(em.ix, n, ix, k)
        av = em.value(a, tuple(a_idx))
        bv = em.value(b, tuple(b_idx))
        em.line(f"{acc} = {acc} + {av} * {bv}")
    return acc


_STRUCTURED: dict[Op, Callable[[Emitter, Node, Index], str]] = {
    Op.PAD: _emit_pad, Op.CONCAT: _emit_concat, Op.ONEHOT: _emit_onehot, Op.SUM: _emit_reduce,
    Op.REDUCE_MAX: _emit_reduce, Op.ARGMAX: _emit_argmax, Op.MATMUL: _emit_matmul,
}


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
    "render",
    "unravel",
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
