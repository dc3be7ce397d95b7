"""Scheduling decisions for one scope: which nodes are inlined into their user's loop nest, which
sums accumulate a product in place, and where results are written (ys[t], concat parts, carries).

Accumulation: `c + a @ b` (2-D, the product read only by the sum) runs as one BLAS call with beta=1
on c's buffer. So does `c + pad(a @ b)` where the pad adds rows only (a convolution tap's shifted
product, nn/conv.py): the product accumulates into the row range of c that the pad leaves nonzero.
When c is itself such a padded product, its product is written (beta=0) straight into those rows
of the sum's buffer, and the sum only zeroes the rows outside them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...ir.node import Graph, LoopInfo, Node
from ...ir.ops import ELEMENTWISE, Op
from .values import Val, offset_view, row_view, step_view

if TYPE_CHECKING:
    from .emit import Block, Codegen


@dataclass
class Scope:
    """One graph being emitted: the top level or a loop body (closed: it sees only its ARGs)."""

    graph: Graph
    env: dict[Node, Val]
    block: Block
    indent: int
    alloc: Block | None = None     # where per-step buffers go (before the outermost loop)
    alloc_indent: int = 0
    targets: dict[Node, Val] = field(default_factory=dict)  # write destinations (ys[t])
    order: list[Node] = field(default_factory=list)
    users: dict[Node, list[Node]] = field(default_factory=dict)
    inline: set[Node] = field(default_factory=set)
    accumulate: dict[Node, Node] = field(default_factory=dict)  # add node -> its matmul operand
    owned: dict[Node, str] = field(default_factory=dict)   # node -> buffer allocated for it here
    in_place: dict[Node, Val] = field(default_factory=dict)  # node -> carry buffer it updates
    virtual: set[Node] = field(default_factory=set)   # concats read through index arithmetic
    row_pads: dict[Node, Node] = field(default_factory=dict)  # add -> the row pad of its accumulated product
    row_targets: dict[Node, Node] = field(default_factory=dict)  # matmul -> add whose rows it writes
    zero_rows: dict[Node, Node] = field(default_factory=dict)  # add -> its padded operand written in place
    sums: dict[Node, Val] = field(default_factory=dict)   # such an add -> its buffer (allocated by that product)


# users an elementwise producer may be inlined into: those whose emitter runs a loop nest that
# computes it. Not stop_gradient: its emitter makes no loop (it aliases its source's value), so a
# producer inlined into it was never computed (ur.stop_gradient(ur.abs(w)) raised KeyError)
INLINE_INTO = (ELEMENTWISE - {Op.STOP_GRADIENT}) | {Op.SUM, Op.REDUCE_MAX}

VIEW_OPS = frozenset({Op.TRANSPOSE, Op.SLICE, Op.BROADCAST, Op.RESHAPE, Op.STOP_GRADIENT, Op.PAD})


def is_writer(node: Node) -> bool:
    """Nodes whose emitter writes its result into a given target (see Codegen.out_for)."""
    if node.op is Op.PROJ:
        return node.src[0].op is Op.FUSED
    return node.op in ELEMENTWISE and node.op is not Op.STOP_GRADIENT or node.op in (
        Op.MATMUL, Op.SUM, Op.REDUCE_MAX, Op.CONCAT, Op.ARGMAX, Op.ONEHOT)


# ---- one scope: use lists, accumulation, inlining, concat targets --------------------------------

def prepare(cg: Codegen, scope: Scope) -> None:
    """Use lists, inlining and accumulation decisions for one scope."""
    scope.order = scope.graph.nodes()
    outputs = set(scope.graph.outputs)
    no_inline: set[Node] = set()
    for node in scope.order:
        for s in node.src:
            scope.users.setdefault(s, []).append(node)
    for node in scope.order:
        if node.op is Op.ADD and node.ndim == 2 and node.src[0].shape == node.src[1].shape:
            for term, other in ((node.src[1], node.src[0]), (node.src[0], node.src[1])):
                mm = accumulable(scope, term, outputs)
                if mm is not None and term is not other:
                    scope.accumulate[node] = mm
                    if term is not mm:
                        scope.row_pads[node] = term
                    no_inline.add(other)   # read from memory by the accumulating product
                    break
    concat_targets(cg, scope, outputs, no_inline)
    row_targets(scope, outputs)
    for node in scope.order:
        users = scope.users.get(node, [])
        if node in scope.accumulate or node in no_inline:
            continue
        if node.op in ELEMENTWISE and node.op is not Op.STOP_GRADIENT and node not in outputs \
                and len(users) == 1 and users[0].op in INLINE_INTO and node.src:
            user = users[0]
            loop_shape = user.src[0].shape if user.op in (Op.SUM, Op.REDUCE_MAX) else user.shape
            if node.shape == loop_shape:
                scope.inline.add(node)


def row_padded(node: Node) -> bool:
    """A pad of a 2-D value along its rows only."""
    return node.op is Op.PAD and node.ndim == 2 and node.arg[1] == (0, 0)  # type: ignore[index]


def accumulable(scope: Scope, term: Node, outputs: set[Node]) -> Node | None:
    """The product of a term a sum can accumulate in place: a 2-D matmul, or its row pad, read
    only there (None: the term is computed on its own)."""
    if term in outputs or len(scope.users.get(term, [])) != 1:
        return None
    if row_padded(term):
        term = term.src[0]
        if term in outputs or len(scope.users.get(term, [])) != 1:
            return None
    return term if term.op is Op.MATMUL and term.ndim == 2 else None


def row_targets(scope: Scope, outputs: set[Node]) -> None:
    """An accumulating sum whose other operand is a padded product too (pad(a1 @ b1) + pad(a2 @ b2),
    a convolution's input gradient): the first product is written into the sum's rows directly.
    Its buffer must be a plain array (not a concat part or a carry updated in place)."""
    for node, mm in scope.accumulate.items():
        term = scope.row_pads.get(node, mm)
        other = node.src[0] if node.src[1] is term else node.src[1]
        first = accumulable(scope, other, outputs) if other.op is Op.PAD else None
        if first is None or first in scope.targets or node in scope.in_place \
                or (node in scope.targets and not scope.targets[node].plain):
            continue
        scope.row_targets[first] = node
        scope.zero_rows[node] = other


def concat_targets(cg: Codegen, scope: Scope, outputs: set[Node], no_inline: set[Node]) -> None:
    """Sources of a concat that are computed only for it write straight into its output (the
    gate gradients of an LSTM backward step): its buffer is chosen now, before they run."""
    for node in reversed(scope.order):
        if node.op is not Op.CONCAT or node in scope.in_place:
            continue
        writes = [src for src in node.src if len(scope.users.get(src, [])) == 1 and src not in outputs
                  and src not in scope.targets and is_writer(src) and node.src.count(src) == 1]
        if not writes and node not in scope.targets and node not in outputs:
            scope.virtual.add(node)   # read through index arithmetic, never stored
            continue
        out = scope.targets.get(node)
        if out is None:
            out = cg.alloc(scope, node.shape, node.dtype, "cat", node)
            scope.owned[node] = out.base  # type: ignore[assignment]
        scope.targets[node] = out
        axis: int = node.arg  # type: ignore[assignment]
        extents = [src.shape[axis] for src in node.src]
        for k, src in enumerate(node.src):
            if src in writes:
                start = cg.dims.part_offset(extents, k)
                if axis == 0 and out.plain:   # a row range: plain, so BLAS writes it in place
                    stop = cg.dims.part_offset(extents, k + 1) if k + 1 < len(extents) else None
                    scope.targets[src] = row_view(out, src.shape, start or 0, stop)
                else:
                    scope.targets[src] = offset_view(out, src.shape, axis, start)
                no_inline.add(src)


# ---- a loop step: per-step outputs and carries written in place ----------------------------------


def loop_step_targets(step: Scope, info: LoopInfo, carries: list[Val], ys: list[Val], t: str) -> set[int]:
    """Where a loop step writes: per-step outputs computed only for ys straight into ys[t], and
    a carry c_new = c + a @ b whose c is read nowhere else accumulated into its carried buffer
    (BPTT weight gradients). Returns the indices of the carries updated in place."""
    body = info.body
    n_c, n_h = info.n_consts, info.n_carry
    carry_outs = list(body.outputs[:n_h])
    y_outs = list(body.outputs[n_h:])
    counts: dict[Node, int] = {}
    for o in body.outputs:
        counts[o] = counts.get(o, 0) + 1
    for j, o in enumerate(y_outs):
        if counts[o] == 1 and o.op not in (Op.ARG, Op.CONST, Op.PROJ) and o.op not in VIEW_OPS:
            step.targets[o] = step_view(ys[j], t, plain=True)
        elif o.op is Op.PROJ and o.src[0].op is Op.FUSED and counts[o] == 1:
            step.targets[o] = step_view(ys[j], t, plain=True)
    users: dict[Node, int] = {}
    for n in body.nodes():
        for s in n.src:
            users[s] = users.get(s, 0) + 1
    in_place_carries = set()
    for k, o in enumerate(carry_outs):
        arg = body.inputs[n_c + k]
        if o.op is Op.ADD and arg in o.src and users.get(arg, 0) == 1 and counts[o] == 1 \
                and o.src[0].shape == o.src[1].shape and o.ndim == 2 and any(
                    s.op is Op.MATMUL for s in o.src if s is not arg):
            step.in_place[o] = carries[k]
            in_place_carries.add(k)
    return in_place_carries
