"""The simplify pass: constant folding, algebraic identities, loop-level CSE and cleanup, and DCE.

`simplify(graph)` repeats, until nothing changes, one round of:

1. Local rules, bottom-up in every graph and loop body (RULES below, one list per op): ops on
   constant leaves fold to a constant leaf, computed with ir/semantics.py's numpy tables (the ones
   the reference interpreter runs; an array constant folds only where the result stores no more
   elements than the arrays it reads); identities such as x*1, x+0, x**1, x**2 -> x*x,
   transpose(transpose(x)), (a.T @ c).T -> c.T @ a, reshape(reshape(x)), broadcast to the same
   shape, a full slice, slice of slice / of a concat part / of a pad's interior, a concat of
   consecutive slices of one tensor (the gate split undone), nested concats, double negation,
   stop_gradient (see below), and a sum of disjoint pads -> one concat (a gate split's backward).
2. Loop rules (`simplify_loop`): a const or sequence passed twice is taken once; a constant leaf
   passed as const/sequence moves into the body (so it folds there; an array constant only as a
   const: as a sequence the body needs its step's slice); a sequence read only through slices is
   passed pre-sliced; a carried value that is loop-invariant (passed through unchanged,
   or initialised to c and updated to the same c, e.g. a gradient carry made zero by truncation)
   becomes a const and its final value is its initial value; a per-step output that is a sequence
   slice or loop-invariant is computed outside.
3. Loop CSE (`merge_loops`): loops with the same sources, length, direction and signature whose
   carried updates are the same nodes become one loop with the union of their per-step outputs
   (autodiff's forward loop with extra residual outputs and the user's forward loop). Identical
   loops are already one node (nodes are interned), as is every other common subexpression.
   Then `narrow_outputs`: a per-step output read outside only through slices is saved sliced.
4. Dead-code elimination through loops (`dce`), which drops what the rules above left unused.

Semantics: every rule is exact on finite values, except the ones marked [finite], which assume
finite values (x*0 -> 0 and matmul with a zero operand -> 0 are wrong for inf/nan; training math is
finite, and these rules are what makes truncated backward work vanish). Pass assume_finite=False to
keep them off. stop_gradient -> x is exact for values; run ur.grad before optimizing (gradients of an
optimized graph would ignore the removed stop_gradient). The pass never changes an output's type.
"""

from __future__ import annotations

import builtins
import math
from typing import Callable, Sequence

import numpy as np

from . import build as b
from .dce import dce_nodes
from .node import Graph, LoopInfo, Node, proj, rewrite, toposort
from .ops import ELEMENTWISE, FLOAT_DTYPES, FrozenArray, Op
from . import patterns
from .patterns import OpenLoop, graph_like, is_const, is_swap_transpose, make, rebuild, users
from .semantics import ELEMENTWISE_IMPLS, STRUCTURAL_IMPLS

MAX_ROUNDS = 20


def simplify(graph: Graph, assume_finite: bool = True) -> Graph:
    """The graph folded, simplified and with dead code removed. A pure Graph -> Graph pass."""
    rules = dict(RULES)
    if not assume_finite:
        rules = {op: [r for r in rs if r not in FINITE_ONLY] for op, rs in rules.items()}
    outs = list(graph.outputs)
    for _ in range(MAX_ROUNDS):
        new = dce_nodes(simplify_nodes(outs, rules))
        if all(a is c for a, c in zip(new, outs)):
            break
        outs = new
    return graph_like(graph, outs)


def simplify_nodes(roots: Sequence[Node], rules: dict[Op, list["Rule"]] | None = None) -> list[Node]:
    """One round of local rules and loop rules on roots (bodies included), then loop CSE."""
    rules = RULES if rules is None else rules
    replaced: dict[Node, list[Node]] = {}

    def visit(node: Node, src: tuple[Node, ...]) -> Node | None:
        if node.op is Op.PROJ and node.src[0] in replaced:
            return replaced[node.src[0]][node.arg]  # type: ignore[index]
        if node.op is Op.LOOP:
            info: LoopInfo = node.arg  # type: ignore[assignment]
            body = Graph(info.body.inputs, tuple(simplify_nodes(info.body.outputs, rules)))
            loop = make(Op.LOOP, src, LoopInfo(body, info.length, info.n_consts, info.n_carry,
                                               info.reverse), like=node)
            if not any(node is r for r in roots):
                outs = simplify_loop(loop)
                if outs is not None:
                    replaced[node] = outs
            return loop
        new = node if all(a is c for a, c in zip(src, node.src)) else node.replace(src=src)
        return apply_rules(new, rules)

    return narrow_outputs(merge_loops(rewrite(list(roots), visit)))


# ---- local rules ----------------------------------------------------------------------------------

Rule = Callable[[Node], "Node | None"]


def apply_rules(node: Node, rules: dict[Op, list[Rule]]) -> Node:
    """Apply the node's rules until none fires (each firing returns a node of the same type)."""
    for _ in range(16):
        for rule in rules.get(node.op, ()):
            out = rule(node)
            if out is not None and out is not node:
                assert out.type == node.type, (rule.__name__, node, out)
                node = out
                break
        else:
            return node
    return node


def _fit(x: Node, like: Node) -> Node | None:
    """x as a value of like's type (broadcasting x up if needed), or None if it cannot be."""
    if x.type == like.type:
        return x
    if x.dtype != like.dtype:
        return None
    try:
        return b.broadcast_to(x, like.shape)
    except ValueError:
        return None


def const_value(node: Node) -> float | int | bool | None:
    """The one fill value of a constant leaf; None for anything else, array constants included
    (the rules below that read one value do not apply to them)."""
    value = patterns.const_value(node)
    return None if isinstance(value, FrozenArray) else value


def _const(value: object, like: Node) -> Node:
    """A constant leaf of like's type holding a scalar or an array of like's shape."""
    return b.const(value, like.shape, like.dtype)


# constant folding: the numpy meaning of each op is ir/semantics.py's, the table the reference
# interpreter runs, so a folded value is exactly what the reference computes
FOLD = ELEMENTWISE_IMPLS  # the elementwise table under the name tests/test_passes.py checks


def _fold_value(node: Node, values: list[np.ndarray]) -> np.ndarray:
    with np.errstate(all="ignore"):
        if node.op in ELEMENTWISE_IMPLS:
            value = ELEMENTWISE_IMPLS[node.op](*values)
        else:
            value = STRUCTURAL_IMPLS[node.op](node.arg, *values)
    return np.asarray(value).astype(node.dtype)


def _array_fold(node: Node) -> np.ndarray | None:
    """node's value computed from its constant sources when one of them is an array constant and the
    result stores no more elements than those arrays together (folding must not blow a small array
    up into a big one: broadcast(array) stays a broadcast). None otherwise."""
    if not node.src or not all(s.op is Op.CONST for s in node.src):
        return None
    stored = builtins.sum(s.tensor_type.size for s in node.src if isinstance(s.arg, FrozenArray))
    if not stored or node.tensor_type.size > stored:
        return None
    values = [np.asarray(s.arg, s.dtype) if isinstance(s.arg, FrozenArray) else
              np.full(s.shape, s.arg, s.dtype) for s in node.src]
    return np.broadcast_to(_fold_value(node, values), node.shape)


def fold_arrays(node: Node) -> Node | None:
    """An op on constant leaves at least one of which is an array constant (the first rule of every
    foldable op; the scalar rules below see array constants as non-constants)."""
    if not any(s.op is Op.CONST and isinstance(s.arg, FrozenArray) for s in node.src):
        return None
    array = _array_fold(node)
    return None if array is None else _const(array, node)


def fold_elementwise(node: Node) -> Node | None:
    if not node.src or any(const_value(s) is None for s in node.src):
        return None
    return _const(_fold_value(node, [np.asarray(s.arg, dtype=s.dtype) for s in node.src]).item(), node)


def fold_movement(node: Node) -> Node | None:
    """reshape/transpose/broadcast/slice of a constant leaf; pad of a zero; concat of equal fills."""
    v = const_value(node.src[0])
    if node.op in (Op.RESHAPE, Op.TRANSPOSE, Op.BROADCAST, Op.SLICE) and v is not None:
        return _const(v, node)
    if node.op is Op.PAD and v is not None and v == 0:
        return _const(v, node)
    if node.op is Op.CONCAT and all(const_value(s) is not None for s in node.src) \
            and len({repr(s.arg) for s in node.src}) == 1:
        return _const(v, node)
    return None


def fold_reduce(node: Node) -> Node | None:
    v = const_value(node.src[0])
    if v is None or isinstance(v, bool):
        return None
    axes, _ = node.arg  # type: ignore[misc]
    count = math.prod(node.src[0].shape[a] for a in axes)
    if node.op is Op.REDUCE_MAX:
        return _const(v, node) if count else None
    if count > 1 << 20:
        return _const(np.asarray(v * count, dtype=node.dtype).item(), node)
    # summed like numpy sums an array of that value (pairwise), so the rounding matches
    return _const(np.sum(np.full(count, v, dtype=node.dtype)).item(), node)


def fold_argmax(node: Node) -> Node | None:
    # every element of a filled tensor is the first maximum
    return _const(0, node) if const_value(node.src[0]) is not None else None


def fold_matmul(node: Node) -> Node | None:
    a, c = (const_value(s) for s in node.src)
    if a is None or c is None:
        return None
    k = node.src[0].shape[-1]
    with np.errstate(all="ignore"):
        prod = np.asarray(a, dtype=node.dtype) * np.asarray(c, dtype=node.dtype)
        return _const(np.sum(np.full(k, prod, dtype=node.dtype)).item(), node)


# [finite] zero rules
def mul_zero(node: Node) -> Node | None:
    if node.dtype in FLOAT_DTYPES and any(is_const(s, 0) for s in node.src):
        return _const(0, node)
    return None


def matmul_zero(node: Node) -> Node | None:
    if any(is_const(s, 0) for s in node.src):
        return _const(0, node)
    return None


FINITE_ONLY = {mul_zero, matmul_zero}


def add_zero(node: Node) -> Node | None:
    x, y = node.src
    if x.op in (Op.PAD, Op.CONCAT) and y.op in (Op.PAD, Op.CONCAT):
        joined = add_pads(node)
        if joined is not None:
            return joined
    if is_const(y, 0):
        return _fit(x, node)
    if is_const(x, 0):
        return _fit(y, node)
    if y.op is Op.NEG:
        return b.sub(x, y.src[0])
    if x.op is Op.NEG:
        return b.sub(y, x.src[0])
    return None


def add_pads(node: Node) -> Node | None:
    """pad(a) + pad(b) (or concats with zero parts) along one axis where the data ranges do not
    overlap -> one pad of a concat, zeros filling the holes: the backward of a gate split (each
    gate's gradient padded to the full width, then summed) becomes one concat of the gradients."""
    x, y = node.src
    if x.type != node.type or y.type != node.type:
        return None
    axes = {_segment_axis(x), _segment_axis(y)}
    if len(axes) != 1 or None in axes:
        return None
    (axis,) = axes
    segments = sorted(_segments(x, axis) + _segments(y, axis), key=lambda s: s[0])
    if not segments:
        return None
    parts: list[Node] = []
    end = segments[0][0]
    for start, part in segments:
        if start < end:
            return None  # overlapping data: a real sum
        if start > end:
            parts.append(b.const(0, part.shape[:axis] + (start - end,) + part.shape[axis + 1:], part.dtype))
        parts.append(part)
        end = start + part.shape[axis]
    pads = [(0, 0)] * node.ndim
    pads[axis] = (segments[0][0], node.shape[axis] - end)
    return b.pad(b.concat(parts, axis), pads)


def _segment_axis(node: Node) -> int | None:
    """The one axis a pad pads or a concat joins along (None for other nodes)."""
    if node.op is Op.CONCAT:
        return node.arg  # type: ignore[return-value]
    if node.op is Op.PAD:
        axes = [i for i, pair in enumerate(node.arg) if pair != (0, 0)]  # type: ignore[union-attr]
        return axes[0] if len(axes) == 1 else None
    return None


def _segments(node: Node, axis: int) -> list[tuple[int, Node]]:
    """The non-zero pieces of a pad or concat along `axis` with their offsets (zero-constant concat
    parts are holes)."""
    offset = 0
    if node.op is Op.PAD:
        offset = node.arg[axis][0]  # type: ignore[index]
        node = node.src[0]
    parts = node.src if node.op is Op.CONCAT and node.arg == axis else (node,)
    out = []
    for part in parts:
        if not is_const(part, 0):
            out.append((offset, part))
        offset += part.shape[axis]
    return out


def sub_zero(node: Node) -> Node | None:
    x, y = node.src
    if is_const(y, 0):
        return _fit(x, node)
    if is_const(x, 0):
        return _fit(b.neg(y), node) if y.dtype in FLOAT_DTYPES else None
    if y.op is Op.NEG:
        return b.add(x, y.src[0])
    return None


def mul_one(node: Node) -> Node | None:
    x, y = node.src
    if is_const(y, 1):
        return _fit(x, node)
    if is_const(x, 1):
        return _fit(y, node)
    if node.dtype in FLOAT_DTYPES:
        if is_const(y, -1):
            return _fit(b.neg(x), node)
        if is_const(x, -1):
            return _fit(b.neg(y), node)
        if x.op is Op.NEG and y.op is Op.NEG:
            return b.mul(x.src[0], y.src[0])
    return None


def div_one(node: Node) -> Node | None:
    x, y = node.src
    return _fit(x, node) if is_const(y, 1) else None


def pow_small(node: Node) -> Node | None:
    """x**1 -> x, x**0 -> 1 (numpy gives 1 even for nan), x**2 -> x*x (both correctly rounded)."""
    x, y = node.src
    if is_const(y, 1):
        return _fit(x, node)
    if is_const(y, 0):
        return _const(1, node)
    if is_const(y, 2):
        return _fit(b.mul(x, x), node)
    return None


def neg_neg(node: Node) -> Node | None:
    x = node.src[0]
    if x.op is Op.NEG:
        return x.src[0]
    if x.op is Op.SUB:
        return b.sub(x.src[1], x.src[0])
    return None


def same_operands(node: Node) -> Node | None:
    """max(x, x) = min(x, x) = x."""
    x, y = node.src
    return x if x is y else None


def where_known(node: Node) -> Node | None:
    cond, x, y = node.src
    if x is y:
        return _fit(x, node)
    v = const_value(cond)
    if v is not None:
        return _fit(x if v else y, node)
    return None


def drop_stop_gradient(node: Node) -> Node | None:
    return node.src[0]


def transpose_transpose(node: Node) -> Node | None:
    """Transposes compose; (a.T @ c).T = c.T @ a when that removes a transpose."""
    x = node.src[0]
    perm: tuple[int, ...] = node.arg  # type: ignore[assignment]
    if perm == tuple(range(len(perm))):
        return x
    if is_swap_transpose(node) and x.op is Op.MATMUL and x.src[0].ndim == 2 and x.src[1].ndim == 2 \
            and (is_swap_transpose(x.src[0]) or is_swap_transpose(x.src[1])):
        a, c = x.src
        return make(Op.MATMUL, (b.transpose(c), b.transpose(a)), like=x)
    if x.op is Op.TRANSPOSE:
        inner: tuple[int, ...] = x.arg  # type: ignore[assignment]
        return b.transpose(x.src[0], tuple(inner[p] for p in perm))
    return None


def _shape_op_rule(op: Op, rebuild: Callable[[Node, tuple[int, ...]], Node],
                   name: str) -> Callable[[Node], Node | None]:
    """The rule for a reshape-like op (reshape, broadcast): gone when it keeps the shape, and two
    in a row are one from the inner one's source."""
    def rule(node: Node) -> Node | None:
        x = node.src[0]
        if node.shape == x.shape:
            return x
        if x.op is op:
            return rebuild(x.src[0], node.shape)
        return None
    rule.__name__ = rule.__qualname__ = name
    return rule


reshape_reshape = _shape_op_rule(Op.RESHAPE, b.reshape, "reshape_reshape")
broadcast_broadcast = _shape_op_rule(Op.BROADCAST, b.broadcast_to, "broadcast_broadcast")


def canonical(triple: tuple[int, int, int]) -> tuple[int, int, int]:
    """One spelling per set of indices: (start, last + 1, step), (s, s+1, 1) for one, (0, 0, 1) for none."""
    start, stop, step = triple
    n = len(range(start, stop, step))
    if n == 0:
        return (0, 0, 1)
    if n == 1:
        return (start, start + 1, 1)
    return (start, start + step * (n - 1) + 1, step)


def _is_full(triples: Sequence[tuple[int, int, int]], shape: Sequence[int]) -> bool:
    return all(canonical(t) == canonical((0, d, 1)) for t, d in zip(triples, shape))


def slice_rules(node: Node) -> Node | None:
    """Full slice -> x; slice of slice -> one slice; slice inside one part of a concat -> slice of
    that part; slice of a pad's interior -> slice of its source."""
    x = node.src[0]
    triples: tuple[tuple[int, int, int], ...] = node.arg  # type: ignore[assignment]
    canon = tuple(canonical(t) for t in triples)
    if _is_full(triples, x.shape):
        return x
    if x.op is Op.SLICE:
        composed = []
        for (s1, _, k1), (s2, e2, k2) in zip(x.arg, canon):  # type: ignore[misc]
            n = len(range(s2, e2, k2))
            start = s1 + k1 * s2
            composed.append(canonical((start, start + k1 * k2 * (n - 1) + 1, k1 * k2)) if n else (0, 0, 1))
        return make(Op.SLICE, (x.src[0],), tuple(composed), like=node)
    if x.op is Op.CONCAT:
        axis: int = x.arg  # type: ignore[assignment]
        start, stop, step = canon[axis]
        offset = 0
        for part in x.src:
            size = part.shape[axis]
            if offset <= start and stop <= offset + size and stop > start:
                inner = list(canon)
                inner[axis] = (start - offset, stop - offset, step)
                return make(Op.SLICE, (part,), tuple(inner), like=node)
            offset += size
        return None
    if x.op is Op.PAD:
        pads: tuple[tuple[int, int], ...] = x.arg  # type: ignore[assignment]
        inner = []
        for (start, stop, step), (lo, _), dim in zip(canon, pads, x.src[0].shape):
            if stop > start and not (lo <= start and stop - lo <= dim):
                return None
            inner.append((start - lo, stop - lo, step) if stop > start else (0, 0, 1))
        return make(Op.SLICE, (x.src[0],), tuple(inner), like=node)
    if canon != triples:
        return make(Op.SLICE, (x,), canon, like=node)
    return None


def concat_rules(node: Node) -> Node | None:
    """Consecutive slices of one tensor along the concat axis merge into one slice (a concat of all
    gate slices of a tensor is that tensor); a concat of matrix transposes is a transpose of the
    concat along the other axis."""
    axis: int = node.arg  # type: ignore[assignment]
    parts = list(node.src)
    if any(p.op is Op.CONCAT and p.arg == axis for p in parts):  # flatten nested concats
        flat = [q for p in parts for q in (p.src if p.op is Op.CONCAT and p.arg == axis else (p,))]
        return make(Op.CONCAT, flat, axis, like=node)
    if all(is_swap_transpose(p) for p in parts):
        return b.transpose(b.concat([p.src[0] for p in parts], 1 - axis))
    merged: list[Node] = [parts[0]]
    changed = False
    for part in parts[1:]:
        prev = merged[-1]
        joined = _join_slices(prev, part, axis)
        if joined is not None:
            merged[-1] = joined
            changed = True
        else:
            merged.append(part)
    if not changed:
        return None
    return merged[0] if len(merged) == 1 else make(Op.CONCAT, merged, axis, like=node)


def _slice_view(x: Node) -> tuple[Node, tuple[tuple[int, int, int], ...]]:
    """x as (base, triples): a slice, or the whole of x."""
    if x.op is Op.SLICE:
        return x.src[0], tuple(canonical(t) for t in x.arg)  # type: ignore[union-attr]
    return x, tuple((0, d, 1) for d in x.shape)


def _join_slices(a: Node, c: Node, axis: int) -> Node | None:
    if a.op is not Op.SLICE and c.op is not Op.SLICE:
        return None
    base_a, ta = _slice_view(a)
    base_c, tc = _slice_view(c)
    if base_a is not base_c:
        return None
    if any(x != y for i, (x, y) in enumerate(zip(ta, tc)) if i != axis):
        return None
    (s1, e1, k1), (s2, e2, k2) = ta[axis], tc[axis]
    if k1 != 1 or k2 != 1 or e1 != s2:
        return None
    triples = list(ta)
    triples[axis] = (s1, e2, 1)
    return b.reshape(make(Op.SLICE, (base_a,), tuple(triples), like=a), a.shape[:axis] + (
        a.shape[axis] + c.shape[axis],) + a.shape[axis + 1:])


def sum_trivial(node: Node) -> Node | None:
    x = node.src[0]
    axes, keepdims = node.arg  # type: ignore[misc]
    if all(x.shape[a] == 1 for a in axes):
        return b.reshape(x, node.shape)
    return None


RULES: dict[Op, list[Rule]] = {
    **{op: [fold_arrays, fold_elementwise] for op in ELEMENTWISE},
    Op.ADD: [fold_arrays, fold_elementwise, add_zero],
    Op.SUB: [fold_arrays, fold_elementwise, sub_zero],
    Op.MUL: [fold_arrays, fold_elementwise, mul_zero, mul_one],
    Op.DIV: [fold_arrays, fold_elementwise, div_one],
    Op.POW: [fold_arrays, fold_elementwise, pow_small],
    Op.NEG: [fold_arrays, fold_elementwise, neg_neg],
    Op.MAX: [fold_arrays, fold_elementwise, same_operands],
    Op.MIN: [fold_arrays, fold_elementwise, same_operands],
    Op.WHERE: [fold_arrays, fold_elementwise, where_known],
    Op.STOP_GRADIENT: [drop_stop_gradient],
    Op.MATMUL: [fold_arrays, fold_matmul, matmul_zero],
    Op.SUM: [fold_arrays, fold_reduce, sum_trivial],
    Op.REDUCE_MAX: [fold_arrays, fold_reduce, sum_trivial],
    Op.ARGMAX: [fold_arrays, fold_argmax],
    Op.RESHAPE: [fold_arrays, fold_movement, reshape_reshape],
    Op.TRANSPOSE: [fold_arrays, fold_movement, transpose_transpose],
    Op.BROADCAST: [fold_arrays, fold_movement, broadcast_broadcast],
    Op.SLICE: [fold_arrays, fold_movement, slice_rules],
    Op.PAD: [fold_arrays, fold_movement],
    Op.CONCAT: [fold_arrays, fold_movement, concat_rules],
}


# ---- loop rules -----------------------------------------------------------------------------------

def simplify_loop(loop: Node) -> list[Node] | None:
    """New values for the loop's outputs after the loop rules (module docstring), or None."""
    info: LoopInfo = loop.arg  # type: ignore[assignment]
    ol = OpenLoop.open(loop)
    n_h = info.n_carry
    carry_keys = list(ol.carry_args)
    replacement: list[Node | None] = [None] * (n_h + info.n_ys)
    changed = _dedupe_sources(ol)
    changed |= _constant_sources(ol)
    changed |= _sliced_sequences(ol)
    changed |= _invariant_carries(ol, carry_keys, replacement)
    changed |= _outer_ys(ol, n_h, replacement)
    if not changed:
        return None
    new_loop = ol.close()
    outs = ol.outputs(new_loop)
    result = []
    for i, r in enumerate(replacement):
        if r is not None:
            result.append(r)
        elif i < n_h:
            k = next(j for j, a in enumerate(ol.carry_args) if a is carry_keys[i])
            result.append(outs[k])
        else:
            result.append(outs[len(ol.carry_outs) + i - n_h])
    return result


def _dedupe_sources(ol: OpenLoop) -> bool:
    mapping: dict[Node, Node] = {}
    for values, holders in ((ol.consts, ol.const_args), (ol.xs, ol.x_args)):
        first: dict[Node, Node] = {}
        keep = []
        for i, (v, h) in enumerate(zip(values, holders)):
            if v in first:
                mapping[h] = first[v]
            else:
                first[v] = h
                keep.append(i)
        values[:] = [values[i] for i in keep]
        holders[:] = [holders[i] for i in keep]
    ol.substitute(mapping)
    return bool(mapping)


def _constant_sources(ol: OpenLoop) -> bool:
    """A constant leaf passed as a const or a sequence becomes a constant leaf in the body."""
    mapping: dict[Node, Node] = {}
    for values, holders in ((ol.consts, ol.const_args), (ol.xs, ol.x_args)):
        keep = []
        for i, (v, h) in enumerate(zip(values, holders)):
            # an array constant passed as a sequence stays one: the body needs its step's slice
            if v.op is Op.CONST and not (holders is ol.x_args and isinstance(v.arg, FrozenArray)):
                mapping[h] = b.const(v.arg, h.shape, h.dtype)
            else:
                keep.append(i)
        values[:] = [values[i] for i in keep]
        holders[:] = [holders[i] for i in keep]
    ol.substitute(mapping)
    return bool(mapping)


def _sliced_sequences(ol: OpenLoop) -> bool:
    """A sequence the body reads only through slices is passed pre-sliced (outer views), so the
    body reads only the part it needs and the producer may narrow it (see narrow_outputs)."""
    use = users(ol.body_outputs)
    outputs = set(ol.body_outputs)
    mapping: dict[Node, Node] = {}
    for x, h in list(zip(ol.xs, ol.x_args)):
        readers = use.get(h, [])
        if not readers or h in outputs or not all(r.op is Op.SLICE for r in readers):
            continue
        for r in readers:
            if r not in mapping:
                outer = make(Op.SLICE, (x,), ((0, ol.length, 1),) + tuple(r.arg), like=r)  # type: ignore[arg-type]
                mapping[r] = ol.add_x(outer)
    ol.substitute(mapping)
    return bool(mapping)


def _varying(ol: OpenLoop) -> set[Node]:
    """Body values that depend on a carry or a sequence slice."""
    found: set[Node] = set(ol.carry_args) | set(ol.x_args)
    for node in toposort(ol.body_outputs):
        if node not in found and any(s in found for s in node.src):
            found.add(node)
    return found


def _invariant_carries(ol: OpenLoop, keys: list[Node], replacement: list[Node | None]) -> bool:
    changed = False
    k = 0
    while k < len(ol.carry_args):
        arg, out, init = ol.carry_args[k], ol.carry_outs[k], ol.inits[k]
        varying = _varying(ol)
        invariant = out is arg or (out not in varying and ol.lift([out])[0] is init)
        if not invariant:
            k += 1
            continue
        holder = init if init.op is Op.CONST else ol.add_const(init)
        ol.remove_carry(k)
        ol.substitute({arg: holder})
        replacement[next(i for i, key in enumerate(keys) if key is arg)] = init
        changed = True
    return changed


def _outer_ys(ol: OpenLoop, n_h_old: int, replacement: list[Node | None]) -> bool:
    """Per-step outputs that are a sequence's slice, or loop-invariant, are computed outside."""
    varying = _varying(ol)
    changed = False
    for j, y in enumerate(ol.ys):
        outer = next((x for x, h in zip(ol.xs, ol.x_args) if y is h), None)
        if outer is None and y not in varying:
            (value,) = ol.lift([y])
            outer = b.broadcast_to(b.reshape(value, (1,) + value.shape), (ol.length,) + value.shape)
        if outer is not None:
            replacement[n_h_old + j] = outer
            changed = True
    return changed


# ---- narrowing per-step outputs ------------------------------------------------------------------

def narrow_outputs(roots: Sequence[Node]) -> list[Node]:
    """A per-step output read outside only through slices that keep the whole time axis becomes
    those slices, taken per step in the body (the rest of it is then dead): the forward loop saves
    only the part of a value that the backward loop reads."""
    roots = list(roots)
    use = users(roots)
    plans: dict[Node, list[tuple[Node, Node]]] = {}  # loop -> (outer slice, per-step slice in body)
    for loop in toposort(roots):
        if loop.op is not Op.LOOP or any(loop is r for r in roots):
            continue
        info: LoopInfo = loop.arg  # type: ignore[assignment]
        full_time = canonical((0, info.length, 1))
        for p in use[loop]:
            if p.op is not Op.PROJ or p.arg < info.n_carry or any(p is r for r in roots):  # type: ignore[operator]
                continue
            readers = use[p]
            if not readers or not all(r.op is Op.SLICE and canonical(r.arg[0]) == full_time  # type: ignore[index]
                                      for r in readers):
                continue
            y = info.body.outputs[p.arg]  # type: ignore[index]
            for r in readers:
                if not any(r is w for w, _ in plans.get(loop, [])):
                    part = make(Op.SLICE, (y,), tuple(r.arg)[1:], like=r)  # type: ignore[arg-type]
                    plans.setdefault(loop, []).append((r, part))
    if not plans:
        return roots
    index: dict[Node, tuple[Node, int]] = {}  # outer slice -> (its loop, output index)
    built: dict[Node, Node] = {}

    def visit(node: Node, new: Callable[[Node], Node]) -> Node | None:
        if node in plans:
            info: LoopInfo = node.arg  # type: ignore[assignment]
            extra = [part for _, part in plans[node]]
            body = Graph(info.body.inputs, info.body.outputs + tuple(extra))
            built[node] = make(Op.LOOP, [new(s) for s in node.src],
                               LoopInfo(body, info.length, info.n_consts, info.n_carry, info.reverse), like=node)
            for k, (r, _) in enumerate(plans[node]):
                index[r] = (node, len(info.body.outputs) + k)
            return built[node]
        if node in index:
            loop, k = index[node]
            return proj(built[loop], k)
        return None

    return rebuild(roots, visit)


# ---- loop CSE -------------------------------------------------------------------------------------

def merge_loops(roots: Sequence[Node]) -> list[Node]:
    """Loops with equal sources, signature and carried updates become one (module docstring)."""
    roots = list(roots)
    groups: dict[tuple, list[Node]] = {}
    for node in toposort(roots):
        if node.op is Op.LOOP and not any(node is r for r in roots):
            info: LoopInfo = node.arg  # type: ignore[assignment]
            key = (tuple(map(id, node.src)), info.length, info.reverse, info.n_consts, info.n_carry,
                   tuple(map(id, info.body.inputs)), tuple(map(id, info.body.outputs[:info.n_carry])))
            groups.setdefault(key, []).append(node)
    members = {id(n): g for g in groups.values() if len(g) > 1 for n in g}
    if not members:
        return roots
    merged: dict[int, tuple[Node, dict[Node, dict[int, int]]]] = {}

    def visit(node: Node, src: tuple[Node, ...]) -> Node | None:
        if node.op is Op.PROJ and id(node.src[0]) in members:
            loop, index = merged[id(members[id(node.src[0])][0])]
            return proj(loop, index[node.src[0]][node.arg])  # type: ignore[index]
        if node.op is Op.LOOP and id(node) in members:
            group = members[id(node)]
            lead = id(group[0])
            if lead not in merged:
                merged[lead] = _merge(group, src)
            return merged[lead][0]
        return None

    return rewrite(roots, visit)


def _merge(group: list[Node], src: tuple[Node, ...]) -> tuple[Node, dict[Node, dict[int, int]]]:
    info: LoopInfo = group[0].arg  # type: ignore[assignment]
    n_h = info.n_carry
    ys: list[Node] = []
    index: dict[Node, dict[int, int]] = {}
    for loop in group:
        body = loop.arg.body  # type: ignore[union-attr]
        index[loop] = {k: k for k in range(n_h)}
        for j, y in enumerate(body.outputs[n_h:]):
            pos = next((i for i, z in enumerate(ys) if z is y), None)
            if pos is None:
                ys.append(y)
                pos = len(ys) - 1
            index[loop][n_h + j] = n_h + pos
    body = Graph(info.body.inputs, info.body.outputs[:n_h] + tuple(ys))
    new = make(Op.LOOP, src, LoopInfo(body, info.length, info.n_consts, n_h, info.reverse), like=group[0])
    return new, index
