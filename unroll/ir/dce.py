"""Dead-code elimination through loops: drop unused per-step outputs, carried values and inputs.

At the top level a graph is what its outputs reach, so only loops hold dead code: a per-step output
nobody reads, a carried value whose final value is unused and that no live output depends on (found
by a fixed point, since carries feed each other), and consts/sequences the pruned body no longer
reads. Bodies are pruned recursively (nesting depth only; walks within a graph are iterative).
"""

from __future__ import annotations

from typing import Sequence

from .node import Graph, LoopInfo, Node, proj, rewrite, substitute, toposort
from .ops import Op


def dce(graph: Graph) -> Graph:
    """The graph with dead loop work removed. A pure Graph -> Graph pass."""
    outs = dce_nodes(list(graph.outputs))
    return Graph(graph.inputs, tuple(outs), graph.output_names)


def dce_nodes(roots: Sequence[Node]) -> list[Node]:
    roots = list(roots)
    used: dict[Node, set[int]] = {}
    for node in toposort(roots):
        if node.op is Op.PROJ and node.src[0].op is Op.LOOP:
            used.setdefault(node.src[0], set()).add(node.arg)  # type: ignore[arg-type]
    for root in roots:  # a loop returned whole keeps every output
        if root.op is Op.LOOP:
            used[root] = set(range(len(root.type)))  # type: ignore[arg-type]
    remaps: dict[Node, tuple[Node, dict[int, int]]] = {}

    def visit(node: Node, src: tuple[Node, ...]) -> Node | None:
        if node.op is Op.LOOP:
            new_loop, remap = prune_loop(node.arg, list(src), used.get(node, set()), node.loc)  # type: ignore[arg-type]
            if new_loop.role is None:  # a policy's mark (checkpoint, recompute) stays with the loop
                new_loop.role = node.role
            remaps[node] = (new_loop, remap)
            return new_loop
        if node.op is Op.PROJ and node.src[0] in remaps:
            new_loop, remap = remaps[node.src[0]]
            return proj(new_loop, remap[node.arg])  # type: ignore[index]
        return None

    return rewrite(roots, visit)


def _arg_indices(outputs: Sequence[Node]) -> set[int]:
    return {n.arg for n in toposort(outputs) if n.op is Op.ARG}  # type: ignore[misc]


def prune_loop(info: LoopInfo, src: list[Node], used: set[int], loc: str | None
               ) -> tuple[Node, dict[int, int]]:
    """A loop computing only the outputs in `used`; returns it and old -> new output indices."""
    n_c, n_h = info.n_consts, info.n_carry
    body = info.body
    used_ys = sorted(k - n_h for k in used if k >= n_h)
    live = {k for k in used if k < n_h}
    while True:  # fixed point: a live carry keeps alive the carries its update reads
        outs = dce_nodes([body.outputs[k] for k in sorted(live)] + [body.outputs[n_h + j] for j in used_ys])
        reads = _arg_indices(outs)
        grown = live | {i - n_c for i in reads if n_c <= i < n_c + n_h}
        if grown == live:
            break
        live = grown
    carries = sorted(live)
    keep_consts = [i for i in range(n_c) if i in reads]
    keep_xs = [i for i in range(n_c + n_h, len(body.inputs)) if i in reads]
    kept = keep_consts + [n_c + k for k in carries] + keep_xs
    args = [Node.leaf(Op.ARG, body.inputs[i].tensor_type, j, loc=body.inputs[i].loc) for j, i in enumerate(kept)]
    outs = substitute(outs, {body.inputs[i]: a for i, a in zip(kept, args)})
    new_info = LoopInfo(Graph(tuple(args), tuple(outs)), info.length, len(keep_consts), len(carries),
                        info.reverse)
    new_loop = Node.make(Op.LOOP, [src[i] for i in kept], new_info, loc=loc)
    remap = {k: j for j, k in enumerate(carries)}
    remap.update({n_h + y: len(carries) + j for j, y in enumerate(used_ys)})
    return new_loop, remap
