"""The per-op emitters (`EMITTERS`): each writes one node's code at the current position of its scope
(elementwise clusters and reductions as loop nests, products, movement as views, argmax, onehot)."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ...ir.node import Graph, Node
from ...ir.ops import ELEMENTWISE, FLOAT_DTYPES, Op
from ..lower import index as maps
from ..lower.index import SOURCE
from .kernels_ir import LOOP_MAX_MACS, PACKED_MAX_MACS
from .loops import emit_loop
from .scalars import SPELLING, max_text, scalar_statements
from .schedule import Scope
from .values import Index, Val, bcast, broadcast_val, offset_view, plain_val, remap, row_view

if TYPE_CHECKING:
    from .emit import Codegen


class UnsupportedOp(NotImplementedError):
    """The Numba backend has no lowering for an op (the message names it and the user's line)."""


# ---- elementwise clusters and reductions ---------------------------------------------------------

def _cone(outputs: Sequence[Node], is_leaf: Callable[[Node], bool]) -> list[Node]:
    """Nodes needed for outputs, stopping at leaves, sources first (iterative post-order)."""
    order, seen = [], set()
    stack: list[tuple[Node, bool]] = [(o, False) for o in reversed(outputs)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        if not is_leaf(node):
            stack.extend((s, False) for s in reversed(node.src) if s not in seen)
    return order


def emit_cluster(cg: Codegen, scope: Scope, loop_shape: tuple[int, ...],
                 stores: Sequence[tuple[Node, Val]], leaf_val: Callable[[Node], Val | None],
                 node: Node, reduce: tuple[Node, Val] | None = None) -> None:
    """One loop nest over loop_shape computing every node in the cone of `stores` as scalar
    statements; `leaf_val(n)` gives the array of a node read from memory (None: compute it).
    With `reduce=(src, out)`, the single computed value is reduced into out instead of stored."""
    outs = [n for n, _ in stores] if reduce is None else [reduce[0]]
    cone = _cone(outs, lambda n: n.op is Op.CONST or leaf_val(n) is not None)
    if reduce is None:
        idx, indent = cg.nest(scope, loop_shape, node)
        _emit_statements(cg, scope, cone, idx, indent, loop_shape, leaf_val, node, stores)
        return
    src, out = reduce
    axes, keepdims = node.arg  # type: ignore[misc]
    kept = [k for k in range(len(loop_shape)) if k not in axes]
    split = (max(kept) + 1) if kept else 0   # trailing reduced axes use a scalar accumulator
    is_max = node.op is Op.REDUCE_MAX
    init = _lowest(node.dtype) if is_max else cg.dims.f(0, node.dtype)
    # initialise the output
    oidx, oindent = cg.nest(scope, out.shape, node)
    scope.block.add(oindent, f"{out.elem(oidx)} = {init}", node)
    idx, indent = cg.nest(scope, loop_shape[:split], node)
    acc = cg.fresh("acc")
    scope.block.add(indent, f"{acc} = {init}", node)
    inner = [f"i{k}" for k in range(split, len(loop_shape))]
    # the accumulator is stored outside the inner loops: the axes after split are all reduced,
    # so reduce_dest drops (or pins) their indices
    out_index = maps.reduce_dest(SOURCE, idx + inner, axes, keepdims)
    for k, name in enumerate(inner):
        scope.block.add(indent + k, f"for {name} in range({cg.dims.n(loop_shape[split + k])}):", node)
    full_idx = idx + inner
    value = _emit_statements(cg, scope, cone, full_idx, indent + len(inner), loop_shape, leaf_val, node, [])
    combine = max_text(acc, value, node.dtype) if is_max else f"{acc} + {value}"
    scope.block.add(indent + len(inner), f"{acc} = {combine}", node)
    target = out.elem(out_index)
    combine_out = max_text(target, acc, node.dtype) if is_max else f"{target} + {acc}"
    scope.block.add(indent, f"{target} = {combine_out}", node)


def _lowest(dtype: str) -> str:
    """The identity of max for `dtype`: -inf, False (it was True: an all-False row's max was True),
    or the integer type's minimum (int64's was -2**31), as a literal: it is no size."""
    if dtype in FLOAT_DTYPES:
        return SPELLING.literal(-math.inf, dtype)
    if dtype == "bool":
        return SPELLING.literal(False, dtype)
    return SPELLING.literal(int(np.iinfo(dtype).min), dtype)


def _emit_statements(cg: Codegen, scope: Scope, cone: list[Node], idx: list[str], indent: int,
                     loop_shape: tuple[int, ...], leaf_val: Callable[[Node], Val | None], node: Node,
                     stores: Sequence[tuple[Node, Val]]) -> str:
    names: dict[Node, str] = {}
    for n in cone:
        val = leaf_val(n) if n.op is not Op.CONST else None
        if n.op is Op.CONST:
            names[n] = cg.dims.f(n.arg, n.dtype)  # type: ignore[arg-type]
        elif val is not None:
            if val.const is not None:
                names[n] = val.const
            else:
                names[n] = cg.fresh("e")
                scope.block.add(indent, f"{names[n]} = {val.elem(bcast(idx, val.shape, loop_shape))}", n)
        elif n.op is Op.STOP_GRADIENT:
            names[n] = names[n.src[0]]
        else:
            names[n] = cg.fresh("s")
            in_dtype = n.src[-1].dtype
            for line in scalar_statements(n.op, n.dtype, in_dtype, [names[s] for s in n.src], names[n]):
                scope.block.add(indent, line, n)
    for n, out in stores:
        scope.block.add(indent, f"{out.elem(idx)} = {names[n]}", n)
    return names[cone[-1]] if cone else ""


def _scope_leaf(scope: Scope) -> Callable[[Node], Val | None]:
    def leaf(n: Node) -> Val | None:
        if n in scope.inline:
            return None
        return scope.env.get(n)
    return leaf


def emit_elementwise(cg: Codegen, scope: Scope, node: Node) -> None:
    if node.op is Op.STOP_GRADIENT:
        scope.env[node] = scope.env[node.src[0]]
        return
    out = cg.out_for(scope, node, "v")
    emit_cluster(cg, scope, node.shape, [(node, out)], _scope_leaf(scope), node)
    scope.env[node] = out


def emit_reduce(cg: Codegen, scope: Scope, node: Node) -> None:
    out = cg.out_for(scope, node, "r")
    src = node.src[0]
    leaf = _scope_leaf(scope)
    emit_cluster(cg, scope, src.shape, [], leaf, node, reduce=(src, out))
    scope.env[node] = out


def emit_fused(cg: Codegen, scope: Scope, node: Node) -> None:
    body: Graph = node.arg  # type: ignore[assignment]
    projs: dict[int, list[Node]] = {}
    for user in scope.users.get(node, []):
        if user.op is Op.PROJ:
            projs.setdefault(user.arg, []).append(user)  # type: ignore[arg-type]
    arg_vals = {a: scope.env[s] for a, s in zip(body.inputs, node.src)}
    body_nodes = _cone(list(body.outputs), lambda n: n.op in (Op.ARG, Op.CONST))
    if not all(n.op in ELEMENTWISE or n.op in (Op.ARG, Op.CONST) for n in body_nodes):
        # not purely elementwise: emit the body inline as a nested scope
        sub = Scope(body, dict(arg_vals), scope.block, scope.indent, scope.alloc, scope.alloc_indent)
        outs = cg.emit_scope(sub)
        for i, users in projs.items():
            for u in users:
                scope.env[u] = outs[i]
        return
    groups: dict[tuple[int, ...], list[tuple[Node, Val]]] = {}
    results: dict[int, Val] = {}
    for i, out_node in enumerate(body.outputs):
        users = projs.get(i)
        if not users:
            continue
        if out_node in arg_vals:   # an output that is an input passes through
            results[i] = arg_vals[out_node]
            continue
        if out_node.op is Op.CONST:
            results[i] = Val(out_node.shape, out_node.dtype, const=cg.dims.f(out_node.arg, out_node.dtype))  # type: ignore[arg-type]
            continue
        # proj nodes are interned: one per output; it gets its write target, else a new buffer
        owner = users[0]
        out = cg.out_for(scope, owner, "f")
        results[i] = out
        groups.setdefault(out_node.shape, []).append((out_node, out))
    for shape, stores in groups.items():
        emit_cluster(cg, scope, shape, stores, lambda n: arg_vals.get(n), node)
    for i, users in projs.items():
        if i in results:
            for u in users:
                scope.env[u] = results[i]


# ---- products ------------------------------------------------------------------------------------

def _blas_operand(cg: Codegen, scope: Scope, val: Val, node: Node) -> tuple[str, bool]:
    """A local variable holding a C-contiguous 2-D array, and whether the value is its transpose."""
    if val.plain:
        expr, trans = val.arr, False
    elif val.tbase is not None:
        expr, trans = val.tbase, True
    else:
        expr, trans = cg.materialize(scope, val, node).arr, False
    if not re.fullmatch(r"\w+", expr):  # type: ignore[arg-type]
        name = cg.fresh("op")
        scope.block.add(scope.indent, f"{name} = {expr}", node)
        expr = name
    return expr, trans  # type: ignore[return-value]


def emit_matmul(cg: Codegen, scope: Scope, node: Node, out: Val | None = None, accumulate: bool = False) -> None:
    """out (+)= a @ b: BLAS outside loops; inside one the packed micro-kernel for a packed weight,
    else generated loops for small products; BLAS above the run-time size limits."""
    a, b = (scope.env[s] for s in node.src)
    if out is None:
        out = _row_target(cg, scope, node) or cg.out_for(scope, node, "mm")
    if node.ndim != 2:
        emit_batched_matmul(cg, scope, node, a, b, out, accumulate)
        scope.env[node] = out
        return
    final = None
    if not out.plain:
        final, out = out, cg.alloc(scope, node.shape, node.dtype, "mm", node)
        if accumulate:
            cg.copy(scope, final, out, node)
    A, ta = _blas_operand(cg, scope, a, node)
    B, tb = _blas_operand(cg, scope, b, node)
    O, _ = _blas_operand(cg, scope, out, node)
    m, k, n = (cg.dims.n(d) for d in (node.shape[0], node.src[0].shape[1], node.shape[1]))
    dtype = node.dtype
    add = scope.block.add
    ind = scope.indent
    kind = ord("s" if dtype == "float32" else "d")
    beta = SPELLING.literal(1.0 if accumulate else 0.0, dtype)
    # row-major out = A @ B is column-major out^T = B^T A^T
    blas = (f"xxgemm({kind}, {ord('t' if tb else 'n')}, {ord('t' if ta else 'n')}, {n}, {m}, {k}, "
            f"{SPELLING.literal(1.0, dtype)}, {B}, max({B}.shape[1], 1), {A}, "
            f"max({A}.shape[1], 1), {beta}, {O}, max({n}, 1))")
    if dtype not in FLOAT_DTYPES:
        # integer and bool products: loops (BLAS' gemm is float only: it read int arrays as floats)
        _loop_matmul(cg, scope, node, (A, ta), (B, tb), O, (m, k, n), accumulate, ind)
    elif scope.alloc is None:
        # outside loops a product runs once per call: BLAS's call cost does not matter and one code
        # path compiles faster (every loop nest costs Numba/LLVM compile time)
        # no test of the sizes: gemm handles empty products as the standard defines (m or n = 0:
        # nothing to write; k = 0: C = beta * C, zeros for beta = 0), with every leading
        # dimension at least 1 (a branch and a fill per product cost compile time, ~100 in a TCN)
        add(ind, blas, node)
    elif b.packed is not None:
        # a packed loop-invariant weight: the micro-kernel up to PACKED_MAX_MACS (one thread, no
        # call or packing cost), BLAS's threads above it. Decided at run time (sizes are dims)
        add(ind, f"if {m} * {k} * {n} <= {PACKED_MAX_MACS}:", node)
        add(ind + 1, f"packed_gemm({A}, {int(ta)}, {b.packed}, {O}, {int(accumulate)})", node)
        add(ind, "else:", node)
        add(ind + 1, blas, node)
    else:
        # small products: loops (no call overhead); large: BLAS. Decided at run time (sizes are dims)
        add(ind, f"if {m} * {k} * {n} < {LOOP_MAX_MACS}:", node)
        _loop_matmul(cg, scope, node, (A, ta), (B, tb), O, (m, k, n), accumulate, ind + 1)
        add(ind, "else:", node)
        add(ind + 1, blas, node)
    _matmul_result(cg, scope, node, out, final)


def _loop_matmul(cg: Codegen, scope: Scope, node: Node, a: tuple[str, bool], b: tuple[str, bool], O: str,
                 sizes: tuple[str, str, str], accumulate: bool, indent: int) -> None:
    """O (+)= A @ B as loops at `indent`: i-k-j (unit stride over rows of B and O), or dot products
    over contiguous rows of both where B is a transpose."""
    (A, ta), (B, tb) = a, b
    m, k, n = sizes
    add = scope.block.add
    zero = SPELLING.literal(0.0, node.dtype)

    def a_el(i: str, kk: str) -> str:
        return f"{A}[{kk}, {i}]" if ta else f"{A}[{i}, {kk}]"

    if not tb:
        add(indent, f"for i0 in range({m}):", node)
        if not accumulate:
            add(indent + 1, f"for i2 in range({n}):", node)
            add(indent + 2, f"{O}[i0, i2] = {zero}", node)
        aik = cg.fresh("aik")
        add(indent + 1, f"for i1 in range({k}):", node)
        add(indent + 2, f"{aik} = {a_el('i0', 'i1')}", node)
        add(indent + 2, f"for i2 in range({n}):", node)
        add(indent + 3, f"{O}[i0, i2] += {aik} * {B}[i1, i2]", node)
    else:
        acc = cg.fresh("acc")
        add(indent, f"for i0 in range({m}):", node)
        add(indent + 1, f"for i2 in range({n}):", node)
        add(indent + 2, f"{acc} = {zero}", node)
        add(indent + 2, f"for i1 in range({k}):", node)
        add(indent + 3, f"{acc} += {a_el('i0', 'i1')} * {B}[i2, i1]", node)
        add(indent + 2, f"{O}[i0, i2] {'+' if accumulate else ''}= {acc}", node)


def _matmul_result(cg: Codegen, scope: Scope, node: Node, out: Val, final: Val | None) -> None:
    """The product is in `out`; where its destination is a view BLAS cannot write (`final`), copy it there."""
    if final is not None:
        cg.copy(scope, out, final, node)
        out = final
    scope.env[node] = out


def emit_batched_matmul(cg: Codegen, scope: Scope, node: Node, a: Val, b: Val, out: Val, accumulate: bool) -> None:
    """Batched products (rare in RNNs) as plain loops over broadcast batch indices."""
    kk = node.src[0].shape[-1]
    idx, indent = cg.nest(scope, node.shape, node)
    acc = cg.fresh("acc")
    scope.block.add(indent, f"{acc} = {SPELLING.literal(0.0, node.dtype)}", node)
    scope.block.add(indent, f"for j in range({cg.dims.n(kk)}):", node)
    a_read, b_read = maps.matmul_sources(SOURCE, node, idx, "j")
    scope.block.add(indent + 1, f"{acc} += {a.elem(a_read.idx)} * {b.elem(b_read.idx)}", node)
    scope.block.add(indent, f"{out.elem(idx)} {'+' if accumulate else ''}= {acc}", node)


def emit_add(cg: Codegen, scope: Scope, node: Node) -> None:
    """`other + a @ b` (or `other + pad_rows(a @ b)`) scheduled as an accumulation (schedule.py):
    out = other, then BLAS with beta=1 adds the product into out (or into the rows the pad leaves
    nonzero). `out = other` is free where other's buffer dies here (it becomes the sum's: a chain
    of convolution taps accumulates in one buffer) or other's product already sits in out's rows."""
    mm = scope.accumulate.get(node)
    if mm is None:
        emit_elementwise(cg, scope, node)
        return
    term = scope.row_pads.get(node, mm)
    other = node.src[0] if node.src[1] is term else node.src[1]
    other_val = scope.env[other]
    written = scope.zero_rows.get(node)
    if written is not None:
        out = scope.sums[node]   # the padded product `other` is in its rows already
        _zero_outside(cg, scope, out, written, node)
    elif _dies_here(scope, node, other, other_val):
        out = other_val
        scope.owned[node] = out.base  # type: ignore[assignment]
    else:
        out = cg.out_for(scope, node, "acc")
        if not (out.plain and other_val.plain and out.base == other_val.base and out.arr == other_val.arr):
            cg.copy(scope, other_val, out, node)   # out = other, then out += a @ b
    emit_matmul(cg, scope, mm, out=out if term is mm else _pad_rows(cg, out, term, mm.shape),
                accumulate=True)
    scope.env[node] = out
    scope.env.pop(mm, None)


def _dies_here(scope: Scope, node: Node, other: Node, val: Val) -> bool:
    """Whether the sum `node` may take over other's buffer: a plain array allocated for other, read
    only by this sum, at the top level (in a loop body buffers are per step and swapped as carries:
    left as they were), and the sum has no write target of its own."""
    return (scope.alloc is None and node not in scope.targets and node not in scope.in_place
            and val.plain and val.shape == node.shape and scope.owned.get(other) == val.base
            and val.arr == val.base and scope.users.get(other) == [node]
            and other not in scope.graph.outputs)


def _pad_rows(cg: Codegen, out: Val, pad: Node, shape: tuple[int, ...]) -> Val:
    """The rows of `out` where the row pad `pad` puts its source (a view: plain where out is)."""
    (lo, hi), total = pad.arg[0], pad.shape[0]  # type: ignore[index]
    start = cg.dims.offset(lo) if lo else 0
    if out.plain:
        return row_view(out, shape, start, cg.dims.offset(total - hi) if hi else None)
    return offset_view(out, shape, 0, start or None)


def _row_target(cg: Codegen, scope: Scope, node: Node) -> Val | None:
    """Where a padded product whose sum accumulates another product goes: straight into the sum's
    rows (the sum's buffer is allocated here, when first needed)."""
    add = scope.row_targets.get(node)
    if add is None:
        return None
    out = scope.sums[add] = cg.out_for(scope, add, "acc")
    return _pad_rows(cg, out, scope.zero_rows[add], node.shape)


def _zero_outside(cg: Codegen, scope: Scope, out: Val, pad: Node, node: Node) -> None:
    """Zero the rows of `out` that the row pad `pad` fills with zeros (its product is in the others)."""
    (lo, hi), total = pad.arg[0], pad.shape[0]  # type: ignore[index]
    zero = cg.dims.f(0, node.dtype)
    if lo:
        scope.block.add(scope.indent, f"{out.arr}[:{cg.dims.offset(lo)}] = {zero}", node)
    if hi:
        scope.block.add(scope.indent, f"{out.arr}[{cg.dims.offset(total - hi)}:] = {zero}", node)


# ---- movement: views -----------------------------------------------------------------------------

def emit_broadcast(cg: Codegen, scope: Scope, node: Node) -> None:
    scope.env[node] = broadcast_val(scope.env[node.src[0]], node.shape)


def emit_transpose(cg: Codegen, scope: Scope, node: Node) -> None:
    val = scope.env[node.src[0]]
    perm: tuple[int, ...] = node.arg  # type: ignore[assignment]
    if val.const is not None:
        scope.env[node] = Val(node.shape, node.dtype, const=val.const)
        return
    if val.fn is not None:
        scope.env[node] = remap(val, node.shape, lambda index: maps.transpose(SOURCE, index, perm))
        return
    src_idx = val.idx
    if len(perm) == 2 and val.tbase is not None:   # transpose of a transpose
        scope.env[node] = plain_val(val.tbase, node.shape, node.dtype, root=val.root)
        scope.env[node].base = val.base
        scope.env[node].idx = lambda index: src_idx([index[1], index[0]])  # type: ignore[misc]
        return
    arr = f"{val.arr}.T" if val.arr is not None and len(perm) == 2 else None
    scope.env[node] = Val(node.shape, node.dtype, base=val.base,
                          idx=lambda index: src_idx(maps.transpose(SOURCE, index, perm)),  # type: ignore[misc]
                          arr=arr, root=val.root, tbase=val.arr if val.plain and len(perm) == 2 else None)


def emit_slice(cg: Codegen, scope: Scope, node: Node) -> None:
    val = scope.env[node.src[0]]
    if val.const is not None:
        scope.env[node] = Val(node.shape, node.dtype, const=val.const)
        return
    triples: tuple[tuple[int, int, int], ...] = node.arg  # type: ignore[assignment]
    named = [(cg.dims.offset(start) if start else 0, stop, cg.dims.offset(step) if step != 1 else 1)
             for start, stop, step in triples]   # named once: the map runs per element read

    def index_map(index: Sequence[str], src_idx: Index = val.idx) -> list[str]:  # type: ignore[assignment]
        return src_idx(maps.slice_(SOURCE, index, named))

    if val.fn is not None:
        scope.env[node] = remap(val, node.shape, lambda index: index_map(index, lambda i: list(i)))
        return
    arr, plain = None, False
    rows = node.ndim and triples[0][2] == 1 and all(t == (0, d, 1) for t, d in zip(triples[1:], val.shape[1:]))
    if val.plain and rows:
        # a range of rows of a C-contiguous array: `arr[a:b]` is contiguous and Numba types it so
        # (a convolution tap's input rows go to BLAS without a copy)
        stop = triples[0][1]
        arr = f"{val.arr}[{named[0][0] or ''}:{cg.dims.offset(stop) if stop != val.shape[0] else ''}]"
        plain = True
    elif val.arr is not None and node.ndim:
        # (Numba types other slices as layout 'A' even where they are contiguous: not `plain`)
        arr = f"{val.arr}[{', '.join(_slice_text(cg, t, d) for t, d in zip(triples, val.shape))}]"
    scope.env[node] = Val(node.shape, node.dtype, base=val.base, idx=index_map, arr=arr, root=val.root,
                          plain=plain)


def _slice_text(cg: Codegen, triple: tuple[int, int, int], dim: int) -> str:
    start, stop, step = triple
    if (start, stop, step) == (0, dim, 1):
        return ":"
    text = f"{cg.dims.offset(start) if start else ''}:{cg.dims.offset(stop)}"
    return text + (f":{cg.dims.offset(step)}" if step != 1 else "")


def emit_reshape(cg: Codegen, scope: Scope, node: Node) -> None:
    val = scope.env[node.src[0]]
    if val.const is not None:
        scope.env[node] = Val(node.shape, node.dtype, const=val.const)
        return
    src = cg.materialize(scope, val, node)
    name = cg.fresh("rs")
    scope.block.add(scope.indent, f"{name} = {src.arr}.reshape({cg.dims.shape(node.shape)})", node)
    scope.env[node] = plain_val(name, node.shape, node.dtype, root=src.root)


def emit_const(cg: Codegen, scope: Scope, node: Node) -> None:
    scope.env[node] = Val(node.shape, node.dtype, const=cg.dims.f(node.arg, node.dtype))  # type: ignore[arg-type]


def emit_concat(cg: Codegen, scope: Scope, node: Node) -> None:
    axis: int = node.arg  # type: ignore[assignment]
    extents = [s.shape[axis] for s in node.src]
    if node in scope.virtual:
        vals = [scope.env[s] for s in node.src]
        starts = [cg.dims.part_offset(extents, k) for k in range(len(vals))]   # None: at 0
        bounds = [s or 0 for s in starts] + [cg.dims.n(sum(extents))]

        def fn(index: Sequence[str]) -> str:
            # the parts tested in order, so part k needs only its upper bound (the lower one
            # failed the test before it): a select chain LLVM keeps branch-free
            parts = maps.concat(SOURCE, index, axis, bounds)
            expr = vals[-1].elem(parts[-1][0])
            for k in range(len(vals) - 2, -1, -1):
                expr = f"({vals[k].elem(parts[k][0])} if {index[axis]} < {bounds[k + 1]} else {expr})"
            return expr
        scope.env[node] = Val(node.shape, node.dtype, fn=fn, parts=(axis, list(zip(starts, vals))))
        return
    out = cg.out_for(scope, node, "cat")
    for k, s in enumerate(node.src):
        val = scope.env[s]
        if val is scope.targets.get(s) and val.base == out.base:
            continue  # already written in place
        idx, indent = cg.nest(scope, s.shape, node)
        dst = maps.concat_dest(SOURCE, idx, axis, cg.dims.part_offset(extents, k) or 0)
        scope.block.add(indent, f"{out.elem(dst)} = {val.elem(idx)}", node)
    scope.env[node] = out


def emit_pad(cg: Codegen, scope: Scope, node: Node) -> None:
    """A virtual value: reads select the source or zero, so pad + slices + concat (a convolution's
    taps) become index arithmetic in whatever loop finally reads them."""
    if node in scope.row_pads.values():
        return   # a padded product accumulated by its sum (emit_add): the pad is a row offset there
    pads: tuple[tuple[int, int], ...] = node.arg  # type: ignore[assignment]
    src = scope.env[node.src[0]]
    zero = cg.dims.f(0, node.dtype)
    named = [(cg.dims.offset(lo) if lo else 0, hi) for lo, hi in pads]   # once, not per read
    extents = [cg.dims.n(d) for d in node.src[0].shape]
    padded = maps.padded_axes(pads)

    # reads are clamped into the source and always done, the condition only selects: a
    # conditional load kept loops scalar (a TCN's backward sums three such reads per element).
    # An empty source has nothing to clamp into: all reads are zeros, behind the condition.
    clamp = all(node.src[0].shape[k] > 0 for k in padded)

    def fn(index: Sequence[str]) -> str:
        shifted, cond = maps.pad(SOURCE, index, named, extents)
        if not padded:
            return src.elem(shifted)
        if clamp:
            shifted = [f"min(max({i}, 0), {extents[k]} - 1)" if k in padded else i for k, i in enumerate(shifted)]
        return f"({src.elem(shifted)} if {cond} else {zero})"
    scope.env[node] = Val(node.shape, node.dtype, fn=fn)


# ---- argmax, onehot, proj ------------------------------------------------------------------------

def emit_argmax(cg: Codegen, scope: Scope, node: Node) -> None:
    axis: int = node.arg  # type: ignore[assignment]
    src = node.src[0]
    val = scope.env[src]
    out = cg.out_for(scope, node, "am")
    idx, indent = cg.nest(scope, node.shape, node)
    best, arg = cg.fresh("best"), cg.fresh("arg")
    scope.block.add(indent, f"{best} = {val.elem(maps.reduce_sources(SOURCE, node, idx, ['0']))}", node)
    scope.block.add(indent, f"{arg} = 0", node)
    full = maps.reduce_sources(SOURCE, node, idx, ["j"])
    scope.block.add(indent, f"for j in range(1, {cg.dims.n(src.shape[axis])}):", node)
    scope.block.add(indent + 1, f"if {val.elem(full)} > {best}:", node)
    scope.block.add(indent + 2, f"{best} = {val.elem(full)}", node)
    scope.block.add(indent + 2, f"{arg} = j", node)
    scope.block.add(indent, f"{out.elem(idx)} = {arg}", node)
    scope.env[node] = out


# the first argument of the IndexError generated code raises for an id outside [0, depth); the id
# and the depth follow it (run-time values: the depth stays out of the source), and
# NumbaKernel.__call__ turns them into a sentence
ONEHOT_ERROR = "onehot: an id is out of range for the depth"


def emit_onehot(cg: Codegen, scope: Scope, node: Node) -> None:
    """Checks every id (an id outside [0, depth) raises IndexError, like the reference, instead of
    giving a row of zeros), then writes its row."""
    val = scope.env[node.src[0]]
    out = cg.out_for(scope, node, "oh")
    idx, indent = cg.nest(scope, node.shape[:-1], node)
    depth = cg.dims.n(node.shape[-1])
    ids, col = cg.fresh("id"), f"i{len(idx)}"
    add = scope.block.add
    (ids_read,) = maps.sources(SOURCE, node, idx + [col])
    add(indent, f"{ids} = {val.elem(ids_read.idx)}", node)
    add(indent, f"if {ids} < 0 or {ids} >= {depth}:", node)
    add(indent + 1, f'raise IndexError("{ONEHOT_ERROR}", {ids}, {depth})', node)
    add(indent, f"for {col} in range({depth}):", node)
    add(indent + 1, f"{out.elem(idx + [col])} = {SPELLING.literal(1.0, node.dtype)} if {ids} == {col} "
                    f"else {SPELLING.literal(0.0, node.dtype)}", node)
    scope.env[node] = out


def emit_proj(cg: Codegen, scope: Scope, node: Node) -> None:
    if node not in scope.env:
        raise UnsupportedOp(f"proj of {node.src[0]!r} has no value (built at {node.loc})")


Emitter = Callable[["Codegen", Scope, Node], None]
EMITTERS: dict[Op, Emitter] = {
    **{op: emit_elementwise for op in ELEMENTWISE},
    Op.ADD: emit_add,
    Op.CONST: emit_const,
    Op.SUM: emit_reduce,
    Op.REDUCE_MAX: emit_reduce,
    Op.MATMUL: emit_matmul,
    Op.BROADCAST: emit_broadcast,
    Op.TRANSPOSE: emit_transpose,
    Op.SLICE: emit_slice,
    Op.RESHAPE: emit_reshape,
    Op.CONCAT: emit_concat,
    Op.PAD: emit_pad,
    Op.ARGMAX: emit_argmax,
    Op.ONEHOT: emit_onehot,
    Op.PROJ: emit_proj,
    Op.LOOP: emit_loop,
    Op.FUSED: emit_fused,
}
