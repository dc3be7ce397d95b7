"""Shared tools of the rewrite passes: node matchers, use counts, rebuilds, and loops opened for editing.

The passes (simplify, hoist, fuse_matmuls, fuse_cells) rewrite loops by adding or removing consts,
carries, sequences and per-step outputs. Doing that on a body whose arguments are positional ARG
indices is error-prone (every insertion renumbers), so a loop is *opened* into an `OpenLoop`: its body
values refer to unique placeholder leaves instead of indices, the lists of consts / carries /
sequences / outputs are edited freely, and `close()` renumbers once and builds the new LOOP node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from .node import Graph, LoopInfo, Node, fresh_scope, proj, rewrite, substitute, toposort
from .ops import Op, TensorType

# ---- matchers -----------------------------------------------------------------------------------


def const_value(node: Node) -> float | int | bool | None:
    """The fill value of a CONST leaf (None for anything else)."""
    return node.arg if node.op is Op.CONST else None  # type: ignore[return-value]


def is_const(node: Node, value: float) -> bool:
    v = const_value(node)
    return v is not None and not isinstance(v, bool) and v == value


def is_swap_transpose(node: Node) -> bool:
    """`x.T` of a matrix: a transpose swapping the two axes of a 2-D tensor."""
    return node.op is Op.TRANSPOSE and node.arg == (1, 0)


def make(op: Op, src: Sequence[Node], arg: object = None, like: Node | None = None) -> Node:
    """Node.make for passes: the new node keeps the source line, step tag and role of `like`
    (the node it replaces), so errors and printed IR still point at the user's code."""
    node = Node.make(op, src, arg, loc=like.loc if like is not None else "<pass>")
    if like is not None:
        if node.step is None:
            node.step = like.step
        if node.role is None:
            node.role = like.role
    return node


def users(roots: Sequence[Node]) -> dict[Node, list[Node]]:
    """node -> the nodes (of this graph, not of nested bodies) that read it, in dependency order;
    a node read twice by one user is listed twice."""
    out: dict[Node, list[Node]] = {}
    for node in toposort(roots):
        out.setdefault(node, [])
        for s in node.src:
            out.setdefault(s, []).append(node)
    return out


def tree_leaves(root: Node, internal: Callable[[Node, Node], bool]) -> list[Node]:
    """The leaves of an operator tree under `root`, left to right: a source `n` of `parent` is
    walked through when `internal(n, parent)` (e.g. an add whose only user is the parent add)."""
    leaves: list[Node] = []
    stack = [(s, root) for s in reversed(root.src)]
    while stack:
        n, parent = stack.pop()
        if internal(n, parent):
            stack.extend((s, n) for s in reversed(n.src))
        else:
            leaves.append(n)
    return leaves


def depends_on(roots: Sequence[Node], leaves: Sequence[Node]) -> set[Node]:
    """The nodes below roots whose value depends on any of `leaves` (the leaves included)."""
    found = set(leaves)
    for node in toposort(roots):
        if node not in found and any(s in found for s in node.src):
            found.add(node)
    return found


def rebuild(roots: Sequence[Node], fn: Callable[[Node, Callable[[Node], Node]], "Node | None"]) -> list[Node]:
    """Like node.rewrite, but `fn(node, new)` may ask for the rebuilt version `new(n)` of any node
    below it (not only its direct sources), so a replacement built from deeper nodes (a tree's
    leaves, a group's shared operand) composes with replacements made below it."""
    done: dict[Node, Node] = {}
    new = done.__getitem__
    for node in toposort(roots):
        out = fn(node, new)
        if out is None:
            src = tuple(done[s] for s in node.src)
            out = node if all(a is b for a, b in zip(src, node.src)) else node.replace(src=src)
        done[node] = out
    return [done[r] for r in roots]


def map_loops(roots: Sequence[Node], loop_fn: Callable[[Node], list[Node] | None]) -> list[Node]:
    """Rebuild the graph below roots bottom-up; each LOOP (already rebuilt on its new sources) goes to
    `loop_fn`, which returns new values for all of its outputs (by output index) or None to keep it.
    Projections of a replaced loop are redirected. A loop that is itself a root is never replaced."""
    roots = list(roots)
    replaced: dict[Node, list[Node]] = {}

    def visit(node: Node, src: tuple[Node, ...]) -> Node | None:
        if node.op is Op.PROJ and node.src[0] in replaced:
            return replaced[node.src[0]][node.arg]  # type: ignore[index]
        if node.op is Op.LOOP and not any(node is r for r in roots):
            loop = node if all(a is b for a, b in zip(src, node.src)) else node.replace(src=src)
            outs = loop_fn(loop)
            if outs is not None:
                replaced[node] = outs
            return loop
        return None

    return rewrite(roots, visit)


def graph_like(graph: Graph, outputs: Sequence[Node]) -> Graph:
    """`graph` with new outputs (same inputs and names)."""
    return Graph(graph.inputs, tuple(outputs), graph.output_names)


# ---- loops opened for editing -------------------------------------------------------------------


@dataclass
class OpenLoop:
    """A loop taken apart: outer sources, body placeholders and body outputs in named lists.

    Body values refer to the placeholders (`const_args`, `carry_args`, `x_args`): unique leaves that
    stand for the loop's arguments while the loop is being edited. Invariant: the i-th const
    placeholder stands for `consts[i]`, and so on; `carry_outs[k]` is the new value of carry k.
    """

    consts: list[Node]
    const_args: list[Node]
    inits: list[Node]
    carry_args: list[Node]
    carry_outs: list[Node]
    xs: list[Node]
    x_args: list[Node]
    ys: list[Node]
    length: int
    reverse: bool
    like: Node | None = None
    scope: int = field(default_factory=fresh_scope)
    _count: int = 0

    @staticmethod
    def open(loop: Node) -> "OpenLoop":
        info: LoopInfo = loop.arg  # type: ignore[assignment]
        n_c, n_h = info.n_consts, info.n_carry
        body = info.body
        ol = OpenLoop([], [], [], [], [], [], [], [], info.length, info.reverse, like=loop)
        holders = [ol.placeholder(a.tensor_type, a.loc) for a in body.inputs]
        outs = substitute(list(body.outputs), dict(zip(body.inputs, holders)))
        src = list(loop.src)
        ol.consts, ol.const_args = src[:n_c], holders[:n_c]
        ol.inits, ol.carry_args, ol.carry_outs = src[n_c:n_c + n_h], holders[n_c:n_c + n_h], outs[:n_h]
        ol.xs, ol.x_args, ol.ys = src[n_c + n_h:], holders[n_c + n_h:], outs[n_h:]
        return ol

    def placeholder(self, type_: TensorType, loc: str | None = None) -> Node:
        """A new unique leaf standing for a loop argument while the loop is open."""
        self._count += 1
        return Node.leaf(Op.ARG, type_, (self.scope, self._count), loc=loc or "<pass>")

    @property
    def body_outputs(self) -> list[Node]:
        return self.carry_outs + self.ys

    def set_body_outputs(self, outs: Sequence[Node]) -> None:
        n_h = len(self.carry_outs)
        self.carry_outs, self.ys = list(outs[:n_h]), list(outs[n_h:])

    def substitute(self, mapping: dict[Node, Node]) -> None:
        """Replace body values everywhere in the body."""
        if mapping:
            self.set_body_outputs(substitute(self.body_outputs, mapping))

    def add_const(self, outer: Node) -> Node:
        """The placeholder of const `outer`, added if the loop does not take it yet."""
        for value, holder in zip(self.consts, self.const_args):
            if value is outer:
                return holder
        holder = self.placeholder(outer.tensor_type)
        self.consts.append(outer)
        self.const_args.append(holder)
        return holder

    def add_x(self, outer: Node) -> Node:
        """The placeholder of sequence `outer` (length, ...), added if not taken yet."""
        for value, holder in zip(self.xs, self.x_args):
            if value is outer:
                return holder
        holder = self.placeholder(TensorType(outer.shape[1:], outer.dtype))
        self.xs.append(outer)
        self.x_args.append(holder)
        return holder

    def add_y(self, value: Node) -> int:
        """The output index (among all loop outputs) of per-step output `value`, added if new."""
        for j, y in enumerate(self.ys):
            if y is value:
                return len(self.carry_outs) + j
        self.ys.append(value)
        return len(self.carry_outs) + len(self.ys) - 1

    def remove_carry(self, k: int) -> None:
        for lst in (self.inits, self.carry_args, self.carry_outs):
            del lst[k]

    def lift(self, nodes: Sequence[Node]) -> list[Node]:
        """Body values that depend only on consts, computed outside the loop."""
        return substitute(list(nodes), dict(zip(self.const_args, self.consts)))

    def close(self) -> Node:
        """The LOOP node for the current lists (placeholders renumbered to ARG indices)."""
        holders = self.const_args + self.carry_args + self.x_args
        args = [Node.leaf(Op.ARG, h.tensor_type, i, loc=h.loc) for i, h in enumerate(holders)]
        outs = substitute(self.body_outputs, dict(zip(holders, args)))
        info = LoopInfo(Graph(tuple(args), tuple(outs)), self.length, len(self.consts),
                        len(self.inits), self.reverse)
        return make(Op.LOOP, self.consts + self.inits + self.xs, info, like=self.like)

    def outputs(self, loop: Node) -> list[Node]:
        return [proj(loop, i) for i in range(len(self.body_outputs))]

