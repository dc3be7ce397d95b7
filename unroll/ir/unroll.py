"""The unroll pass: expand rolled loops into explicit per-step nodes, fully or by a factor.

Full unrolling gives the picture the lecture draws (one copy of the cell per time step, each node
tagged with `node.step`) and the oracle for autodiff: grad(loop) == grad(unroll(loop)).
Unrolling by a factor k keeps a rolled loop whose body runs k steps (the remainder steps are expanded
after or, for reverse loops, before it).
"""

from __future__ import annotations

from typing import Sequence

from . import build as b
from .node import Graph, LoopInfo, Node, proj, rewrite, substitute, toposort
from .ops import Op, TensorType


def unroll(graph: Graph | Node | Sequence[Node], factor: int | None = None):
    """Unroll every loop of `graph` (nested loops too). Returns the same kind it was given."""
    if isinstance(graph, Graph):
        outs = unroll_nodes(list(graph.outputs), factor)
        # keep the declared inputs (and their order) even if an unused sequence is no longer reached
        return Graph(graph.inputs, tuple(outs), graph.output_names)
    if isinstance(graph, Node):
        return unroll_nodes([graph], factor)[0]
    return unroll_nodes(list(graph), factor)


def unroll_loop(loop: Node, factor: int) -> list[Node]:
    """The outputs of one LOOP node with `factor` steps per iteration (all of them when factor >=
    its length); loops nested in its body stay as they are (lax.scan's `unroll=`)."""
    info: LoopInfo = loop.arg  # type: ignore[assignment]
    if factor >= info.length:
        return _expand(info, list(loop.src), loop.loc)
    return _by_factor(info, list(loop.src), factor, loop.loc)


def unroll_nodes(roots: list[Node], factor: int | None) -> list[Node]:
    if factor is not None and factor < 1:
        raise ValueError(f"unroll: factor must be >= 1, found {factor}")
    expanded: dict[Node, list[Node]] = {}

    def visit(node: Node, src: tuple[Node, ...]) -> Node | None:
        if node.op is Op.LOOP:
            info: LoopInfo = node.arg  # type: ignore[assignment]
            body = Graph(info.body.inputs, tuple(unroll_nodes(list(info.body.outputs), factor)))
            info = LoopInfo(body, info.length, info.n_consts, info.n_carry, info.reverse)
            if factor is None or factor >= info.length:
                expanded[node] = _expand(info, list(src), node.loc)
            else:
                expanded[node] = _by_factor(info, list(src), factor, node.loc)
            return expanded[node][0] if expanded[node] else node
        if node.op is Op.PROJ and node.src[0] in expanded:
            return expanded[node.src[0]][node.arg]  # type: ignore[index]
        return None

    return rewrite(roots, visit)


def _inline(body: Graph, args: Sequence[Node], step: int | None, n_consts: int = 0) -> list[Node]:
    """The body's outputs computed on `args` (consts first); nodes that depend on the step's
    carries or slices are tagged with the time step."""
    outs = substitute(list(body.outputs), dict(zip(body.inputs, args)))
    if step is not None:
        # Tag only new nodes that depend on this step's carries or slices. Nodes are interned and
        # shared: step-invariant ones (constant leaves above all) belong to no step, and when the
        # args are the body's own ARG leaves (nested or chunked loops) the body's own nodes come back.
        varying, own = set(args[n_consts:]), set(toposort(body.outputs))
        for node in toposort(outs, stop=set(args)):
            if node not in args and any(s in varying for s in node.src):
                varying.add(node)
                if node.step is None and node not in own:
                    node.step = step
    return outs


def _steps(length: int, reverse: bool) -> range:
    return range(length - 1, -1, -1) if reverse else range(length)


def _expand(info: LoopInfo, src: list[Node], loc: str | None, steps: Sequence[int] | None = None,
            tag: bool = True) -> list[Node]:
    """Outputs of the loop with every step explicit: final carries, then per-step outputs stacked
    over the steps run (all of them unless `steps` names some), in time order. `tag=False` leaves
    step tags alone (a chunk body's steps are no fixed time steps)."""
    n_c, n_h = info.n_consts, info.n_carry
    consts, carry, xs = src[:n_c], src[n_c:n_c + n_h], src[n_c + n_h:]
    per_step: dict[int, list[Node]] = {}
    for t in (steps if steps is not None else _steps(info.length, info.reverse)):
        outs = _inline(info.body, consts + carry + [x[t] for x in xs], t if tag else None, n_c)
        carry, per_step[t] = outs[:n_h], outs[n_h:]
    ys = []
    for k in range(info.n_ys):
        column = [b.reshape(per_step[t][k], (1,) + per_step[t][k].shape) for t in sorted(per_step)]
        ys.append(b.concat(column, 0))
    return carry + ys


def _by_factor(info: LoopInfo, src: list[Node], k: int, loc: str | None) -> list[Node]:
    """A loop of length T // k whose body runs k steps, plus the T % k remaining steps expanded."""
    n_c, n_h = info.n_consts, info.n_carry
    consts, carry, xs = src[:n_c], src[n_c:n_c + n_h], src[n_c + n_h:]
    chunks, rest = divmod(info.length, k)
    main = chunks * k
    # the chunked body: args are consts, carries, and one (k, ...) slice per sequence
    args = [Node.leaf(Op.ARG, a.tensor_type, i) for i, a in enumerate(info.body.inputs[:n_c + n_h])]
    x_args = [Node.leaf(Op.ARG, TensorType((k,) + x.shape[1:], x.dtype), n_c + n_h + i)
              for i, x in enumerate(xs)]
    inner = LoopInfo(info.body, k, n_c, n_h, info.reverse)
    # untagged: the chunk body's nodes on the original body args are the original body's own nodes
    body_outs = _expand(inner, args + x_args, loc, tag=False)
    chunk_body = Graph(tuple(args + x_args), tuple(body_outs))
    chunk_xs = [b.reshape(x[:main], (chunks, k) + x.shape[1:]) for x in xs]
    chunk_info = LoopInfo(chunk_body, chunks, n_c, n_h, info.reverse)

    rest_steps = range(main, info.length)
    rest_ys: list[list[Node]] = []
    if info.reverse and rest:  # the last steps run first
        rest_outs = _expand(info, src, loc, steps=list(reversed(rest_steps)))
        carry, rest_ys = rest_outs[:n_h], [[y] for y in rest_outs[n_h:]]
    loop = Node.make(Op.LOOP, consts + carry + chunk_xs, chunk_info, loc=loc)
    outs = [proj(loop, i) for i in range(n_h + info.n_ys)]
    carry = outs[:n_h]
    ys = [b.reshape(y, (main,) + y.shape[2:]) for y in outs[n_h:]]
    if not info.reverse and rest:
        rest_outs = _expand(info, consts + carry + xs, loc, steps=list(rest_steps))
        carry, rest_ys = rest_outs[:n_h], [[y] for y in rest_outs[n_h:]]
    if rest:
        ys = [b.concat([y] + r, 0) for y, r in zip(ys, rest_ys)]
    return carry + ys
