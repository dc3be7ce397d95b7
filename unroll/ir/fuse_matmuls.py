"""The fuse_matmuls pass: matmuls that share an operand, or are summed, become one bigger matmul.

Rules, applied in every loop body (innermost first) and, for weights, at the top level:

1. Shared operand. `a @ W_1, ..., a @ W_n` with the same `a` and weights W_k (K, N_k) become
   `m = a @ concat(W_1..W_n, axis=1)` and the old values are slices of m's last axis (a hand-written
   cell's four gate matmuls `h @ W_i, h @ W_f, ...`). Transposed weights `a @ W_k.T` concatenate the
   W_k along axis 0 and transpose once. Likewise `W_1 @ b, ..., W_n @ b` share b: concat along
   axis 0, slices of the rows.
2. Sum of matmuls. `a_1 @ W_1 + ... + a_n @ W_n` (an add tree whose matmul leaves are read only by
   it, same result shape) becomes `concat(a_k, axis=-1) @ concat(W_k, axis=0)`: the backward of a
   hand-written cell computes dh as a sum over gates of `dz_k @ W_k.T`. Only leaves whose `a` has
   the same dependency class are joined (in a loop body: reads the carried state or not), so an
   input projection `x_t @ W_x` is never glued to the recurrent `h @ W_h` and can still be hoisted.

"Weights" are values the concatenation can be computed once for: in a loop body, values that depend
only on the loop's consts (hoist then moves the concat out of the loop); at the top level, params
and constants seen through transposes/reshapes.
"""

from __future__ import annotations

from typing import Callable

from . import build as b
from .node import Graph, LoopInfo, Node, rewrite, toposort
from .ops import Op
from .patterns import tree_leaves, graph_like, is_swap_transpose, make, rebuild, users

Classify = Callable[[Node], int]  # 0: invariant ("weight"), 1: varies without carried state, 2: with


def fuse_matmuls(graph: Graph) -> Graph:
    """The graph with shared-operand and summed matmuls fused. A pure Graph -> Graph pass."""
    return graph_like(graph, _fuse(list(graph.outputs), _top_level_class))


def _top_level_class(node: Node) -> int:
    while node.op in (Op.TRANSPOSE, Op.RESHAPE, Op.BROADCAST):
        node = node.src[0]
    return 0 if node.op in (Op.PARAM, Op.CONST) else 1


def _body_classes(info: LoopInfo) -> Classify:
    n_c, n_h = info.n_consts, info.n_carry
    cls: dict[Node, int] = {}
    for node in toposort(info.body.outputs):
        if node.op is Op.ARG:
            i: int = node.arg  # type: ignore[assignment]
            cls[node] = 0 if i < n_c else 2 if i < n_c + n_h else 1
        else:
            cls[node] = max((cls[s] for s in node.src), default=0)
    return lambda n: cls.get(n, 0)


def _fuse(roots: list[Node], classify: Classify) -> list[Node]:
    def visit(node: Node, src: tuple[Node, ...]) -> Node | None:
        if node.op is not Op.LOOP:
            return None
        info: LoopInfo = node.arg  # type: ignore[assignment]
        outs = _fuse(list(info.body.outputs), _body_classes(info))
        if all(a is c for a, c in zip(outs, info.body.outputs)) and all(a is c for a, c in zip(src, node.src)):
            return node
        body = Graph(info.body.inputs, tuple(outs))
        return make(Op.LOOP, src, LoopInfo(body, info.length, info.n_consts, info.n_carry, info.reverse),
                    like=node)

    roots = rewrite(roots, visit)
    roots = _shared_operand(roots, classify)
    return _summed(roots, classify)


# ---- rule 1: shared operand -----------------------------------------------------------------------

def _shared_operand(roots: list[Node], classify: Classify) -> list[Node]:
    groups: dict[tuple, list[Node]] = {}
    for node in toposort(roots):
        if node.op is not Op.MATMUL:
            continue
        a, w = node.src
        if w.ndim == 2 and classify(w) == 0 and classify(a) != 0:  # a @ W_k
            groups.setdefault(("lhs", id(a), w.shape[0], w.dtype), []).append(node)
        elif a.ndim == 2 and classify(a) == 0 and classify(w) != 0:  # W_k @ b
            groups.setdefault(("rhs", id(w), a.shape[1], a.dtype), []).append(node)
    plans: dict[Node, tuple[int, list[Node], list[Node]]] = {}  # member -> (side, weights, group)
    for key, group in groups.items():
        side = 1 if key[0] == "lhs" else 0
        weights: list[Node] = []
        for m in group:
            if not any(m.src[side] is w for w in weights):
                weights.append(m.src[side])
        if len(weights) >= 2:
            for m in group:
                plans[m] = (side, weights, group)
    if not plans:
        return roots
    fused: dict[int, Node] = {}

    def visit(node: Node, new: Callable[[Node], Node]) -> Node | None:
        if node not in plans:
            return None
        side, weights, group = plans[node]
        axis = 1 if side == 1 else 0
        if id(group[0]) not in fused:
            # weights are loop-invariant, which no rule of this pass rewrites: the old nodes stand
            if all(is_swap_transpose(w) for w in weights):
                wcat = b.transpose(b.concat([w.src[0] for w in weights], 1 - axis))
            else:
                wcat = b.concat(weights, axis)
            shared = new(group[0].src[1 - side])
            fused[id(group[0])] = make(Op.MATMUL, (shared, wcat) if side == 1 else (wcat, shared),
                                       like=group[0])
        whole = fused[id(group[0])]
        start = 0
        for w in weights:
            if w is node.src[side]:
                break
            start += w.shape[axis]
        out_axis = whole.ndim - 1 if side == 1 else whole.ndim - 2
        return b.slice_axis(whole, out_axis, start, start + node.src[side].shape[axis])

    return rebuild(roots, visit)


# ---- rule 2: sum of matmuls -----------------------------------------------------------------------

def _summed(roots: list[Node], classify: Classify) -> list[Node]:
    use = users(roots)
    root_set = set(roots)

    def internal(node: Node, parent: Node) -> bool:
        """node is an add inside parent's tree (read only by parent, same type)."""
        return (node.op is Op.ADD and node.type == parent.type and node not in root_set
                and len(use[node]) == 1 and use[node][0] is parent)

    plans: dict[Node, tuple[list[list[Node]], list[Node]]] = {}  # tree root -> (matmul groups, others)
    for node in toposort(roots):
        if node.op is not Op.ADD or any(internal(node, u) for u in use[node]):
            continue
        leaves = tree_leaves(node, internal)
        groups: dict[int, list[Node]] = {}
        others: list[Node] = []
        for leaf in leaves:
            ok = (leaf.op is Op.MATMUL and leaf.type == node.type and leaf.ndim == 2
                  and leaf.src[0].ndim == 2 and leaf not in root_set and len(use[leaf]) == 1
                  and classify(leaf.src[1]) == 0 and classify(leaf.src[0]) != 0)
            if ok:
                groups.setdefault(classify(leaf.src[0]), []).append(leaf)
            else:
                others.append(leaf)
        joined = [g for g in groups.values() if len(g) > 1]
        if joined:
            others += [m for g in groups.values() if len(g) == 1 for m in g]
            plans[node] = (joined, others)
    if not plans:
        return roots

    def visit(node: Node, new: Callable[[Node], Node]) -> Node | None:
        if node not in plans:
            return None
        joined, others = plans[node]
        terms = []
        for group in joined:
            lhs = b.concat([new(m.src[0]) for m in group], -1)
            rhs = b.concat([new(m.src[1]) for m in group], 0)
            terms.append(make(Op.MATMUL, (lhs, rhs), like=group[0]))
        total = terms[0]
        for t in terms[1:] + [new(o) for o in others]:
            total = make(Op.ADD, (total, t), like=node)
        return total

    return rebuild(roots, visit)
