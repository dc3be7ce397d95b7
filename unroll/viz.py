"""Drawing graphs: DOT text (rolled or unrolled view), rendering with Graphviz, and networkx export.

A leaf module (micrograd's `draw_dot` lives outside the engine): it imports `unroll.ir` only.

    ur.to_dot(graph, view="rolled")            # DOT text; needs no renderer
    ur.draw(graph, "rnn.svg", view="unrolled") # renders with Graphviz's `dot`; format from the suffix
    ur.to_networkx(graph)                      # a networkx.DiGraph of every node, bodies included

Rolled view (top to bottom): each LOOP is a cluster labelled "loop ×T (reverse)" holding its body;
loop constants (weights) enter the cluster straight into the ops that use them, the initial carry and
the sequences enter through the body's carry / x[t] argument nodes, the new carry goes back to the
carry argument on a bold red back-edge, and the final carries / stacked outputs leave through
house-shaped nodes. Parameters are yellow ellipses, inputs green ellipses, constants small grey text
drawn once per use (so a shared `0.0` does not tie the picture into a knot).

Unrolled view: loops are unrolled first (`ur.unroll`), then one cluster per time step `node.step`,
drawn as columns left to right in time order, each running top to bottom (forward ops above the
backward ones of the same step). Pure data movement (the x[t] slice, the reshape that stacks y_t)
whose users, or whose sources, lie in one step is drawn in that step's column. Edges between columns
(carried state, carried gradients) are bold red; forward ops are blue, ops with role "backward" red;
edges into a STOP_GRADIENT node or a node with role "truncate" (where truncation cuts the gradient)
are dashed; FUSED nodes are orange boxes around their ops (their argument and output plumbing is not
drawn: edges go straight from the outside values to the ops inside). Parameters are outside the
columns, drawn once, with an edge into every step that reads them. Above `max_nodes` nodes only the
first and last steps are drawn and an ellipsis node "… 42 steps …" stands for the rest (edges into or
out of hidden steps go to it); raise `max_nodes` to see everything. Nested loops are unrolled too;
their nodes keep the step tags `unroll` gives them, so columns then mix outer and inner steps.

Every walk is iterative (explicit stacks): unrolled graphs are thousands of nodes deep.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .ir.node import Graph, LoopInfo, Node, all_nodes, nested_body, toposort
from .ir.ops import MOVEMENT, Op, TensorType
from .ir.unroll import unroll

if TYPE_CHECKING:  # networkx is imported only by to_networkx
    import networkx

GraphLike = Graph | Node | Sequence[Node]

VIEWS = ("rolled", "unrolled")
TEXT_FORMATS = ("dot", "gv")
NO_DOT_MESSAGE = ("unroll.draw: Graphviz's `dot` program was not found, so the graph cannot be "
                  "rendered to {fmt!r}. Install it with `apt-get install graphviz` (or `brew install "
                  "graphviz`), or `pip install pygraphviz` (its wheels bundle Graphviz). `ur.to_dot(graph)` "
                  "still works without it, and draw(graph, 'name.dot') writes the DOT text.")

# ---- looks: one table per kind of thing drawn ---------------------------------------------------

NODE_STYLE: dict[str, dict[str, str]] = {
    "op": {"shape": "box", "style": "rounded,filled"},
    "param": {"shape": "ellipse", "style": "filled", "fillcolor": "#fff2a8", "color": "#b7950b"},
    "input": {"shape": "ellipse", "style": "filled", "fillcolor": "#d4efdf", "color": "#1e8449"},
    "const": {"shape": "plaintext", "fontcolor": "#666666", "fontsize": "9"},
    "carry": {"shape": "box", "style": "rounded,filled", "fillcolor": "#e8daef", "color": "#7d3c98"},
    "xs": {"shape": "box", "style": "rounded,filled", "fillcolor": "#d5f5e3", "color": "#1e8449"},
    "loop_out": {"shape": "house", "style": "filled", "fillcolor": "#e8daef", "color": "#7d3c98"},
    "cut": {"shape": "octagon", "style": "dashed,filled"},
    "ellipsis": {"shape": "plaintext", "fontsize": "16"},
    "anchor": {"shape": "point", "style": "invis", "width": "0", "height": "0"},
}
ROLE_FILL: dict[str | None, str] = {None: "#dbe9f6", "backward": "#f5b7b1", "truncate": "#e5e7e9"}
OTHER_ROLE_FILL = "#eeeeee"
CLUSTER_STYLE: dict[str, dict[str, str]] = {
    "loop": {"style": "rounded", "color": "#7d3c98", "penwidth": "2", "fontcolor": "#7d3c98"},
    "fused": {"style": "filled,rounded", "fillcolor": "#fdebd0", "color": "#e67e22"},
    "step": {"style": "rounded", "color": "#aab7b8"},
    "hidden": {"style": "rounded,dashed", "color": "#aab7b8", "fontcolor": "#7f8c8d"},
}
EDGE_STYLE: dict[str, dict[str, str]] = {
    "data": {},
    "backward": {"color": "#c0392b"},
    "cut": {"style": "dashed", "color": "#7f8c8d"},
    # between two step columns: written head -> tail with dir=back, so that for the layout the
    # user (top of the next column) sits above the source (bottom of this one): the columns line up
    # at one height instead of forming a staircase, and the edge runs straight across
    "carry_step": {"color": "#c0392b", "penwidth": "2", "dir": "back"},
    "back": {"color": "#c0392b", "penwidth": "2", "style": "bold", "constraint": "false",
             "label": "carry"},                             # rolled loop: new carry -> carry arg
    "init": {"color": "#7d3c98", "label": "init"},
    "xs": {"color": "#1e8449", "label": "x[t]"},
    "const": {"color": "#b7950b"},
    "final": {"color": "#7d3c98", "label": "final"},
    "stack": {"color": "#1e8449", "label": "stack"},
    "ellipsis": {"style": "dotted", "constraint": "false"},
    "order": {"style": "invis"},
}


# ---- labels -------------------------------------------------------------------------------------

def _slice_text(node: Node) -> str:
    dims = node.src[0].shape
    parts = []
    for (start, stop, step), dim in zip(node.arg, dims):  # type: ignore[attr-defined]
        if (start, stop, step) == (0, dim, 1):
            parts.append(":")
        elif stop == start + 1:
            parts.append(str(start))
        else:
            parts.append(f"{start}:{stop}" + (f":{step}" if step != 1 else ""))
    return "[" + ",".join(parts) + "]"


def _axes_text(node: Node) -> str:
    axes, keepdims = node.arg  # type: ignore[misc]
    return f"axes={tuple(axes)}" + (" keepdims" if keepdims else "")


# the short argument text shown after an op's name (the full arg is in the tooltip)
ARG_TEXT: dict[Op, Callable[[Node], str]] = {
    Op.SUM: _axes_text,
    Op.REDUCE_MAX: _axes_text,
    Op.SLICE: _slice_text,
    Op.CAST: lambda n: str(n.arg),
    Op.CONCAT: lambda n: f"axis={n.arg}",
    Op.ARGMAX: lambda n: f"axis={n.arg}",
    Op.ONEHOT: lambda n: f"depth={n.arg}",
    Op.TRANSPOSE: lambda n: str(tuple(n.arg)),  # type: ignore[call-overload]
    Op.PAD: lambda n: str(tuple(n.arg)),  # type: ignore[call-overload]
}


def _const_text(node: Node) -> str:
    value = f"{node.arg:g}" if isinstance(node.arg, float) else str(node.arg)
    return value if node.shape == () else f"{value}\n{node.type}"


def node_label(node: Node) -> str:
    """Op name and type, e.g. "matmul\\nf32[16,256]"; names for inputs and params."""
    if node.op in (Op.INPUT, Op.PARAM):
        return f"{node.name}\n{node.type}"
    if node.op is Op.CONST:
        return _const_text(node)
    if node.op is Op.ARG:
        return f"arg {node.arg}\n{node.type}"
    if node.op is Op.LOOP:
        return loop_label(node.arg)  # type: ignore[arg-type]
    head = node.op.value
    text = ARG_TEXT.get(node.op)
    if text is not None:
        head += " " + text(node)
    return f"{head}\n{node.type_str()}"


def loop_label(info: LoopInfo) -> str:
    return f"loop ×{info.length}" + (" (reverse)" if info.reverse else "")


def _arg_group(info: LoopInfo | None, index: int) -> str:
    """Which input group a body argument belongs to: const, carry, xs (loops) or arg (fused)."""
    if info is None:
        return "arg"
    if index < info.n_consts:
        return "const"
    return "carry" if index < info.n_consts + info.n_carry else "xs"


def _arg_label(info: LoopInfo | None, index: int, outer: Node, arg: Node) -> str:
    group = _arg_group(info, index)
    name = f" {outer.name}" if outer.name else ""
    if group == "carry":
        return f"carry {index - info.n_consts}{name}\n{arg.type}"  # type: ignore[union-attr]
    if group == "xs":
        k = index - info.n_consts - info.n_carry  # type: ignore[union-attr]
        return f"{outer.name or f'xs[{k}]'}[t]\n{arg.type}"
    return f"{group} {index}{name}\n{arg.type}"


def _loop_out_label(info: LoopInfo, index: int, node: Node) -> str:
    if index < info.n_carry:
        return f"final carry {index}\n{node.type}"
    return f"ys {index - info.n_carry}\n{node.type}"


def _tooltip(node: Node) -> str:
    arg = "" if node.op in (Op.LOOP, Op.FUSED) else f" arg={node.arg!r}"
    extra = "".join(f" {k}={v}" for k, v in (("step", node.step), ("role", node.role)) if v is not None)
    return f"{node.op.value} {node.type_str()}{arg[:200]}{extra}\nbuilt at {node.loc}"


# ---- a small DOT writer -------------------------------------------------------------------------

def _quote(text: object) -> str:
    s = str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


def _attrs(attrs: dict[str, str]) -> str:
    return "[" + ", ".join(f"{k}={_quote(v)}" for k, v in attrs.items()) + "]"


@dataclass
class _Cluster:
    name: str
    attrs: dict[str, str]
    nodes: list[str] = field(default_factory=list)
    children: list[_Cluster] = field(default_factory=list)


class _Dot:
    """Clusters (nested) holding node statements, then every edge at the top level."""

    def __init__(self, graph_attrs: dict[str, str]) -> None:
        self.graph_attrs = graph_attrs
        self.root = _Cluster("root", {})
        self.edges: list[str] = []
        self.top_rank: list[str] = []  # nodes drawn in the first row (rank=min)
        self._seen_edges: set[tuple[str, str]] = set()

    def cluster(self, parent: _Cluster, name: str, attrs: dict[str, str]) -> _Cluster:
        child = _Cluster(f"cluster_{name}", attrs)
        parent.children.append(child)
        return child

    def node(self, cluster: _Cluster, name: str, attrs: dict[str, str]) -> str:
        cluster.nodes.append(f"{_quote(name)} {_attrs(attrs)};")
        return name

    def edge(self, a: str, b: str, attrs: dict[str, str], once: bool = False) -> None:
        if once:  # edges to the ellipsis: one per pair is enough
            if (a, b) in self._seen_edges or a == b:
                return
            self._seen_edges.add((a, b))
        self.edges.append(f"{_quote(a)} -> {_quote(b)}" + (f" {_attrs(attrs)}" if attrs else "") + ";")

    def text(self) -> str:
        lines = ["digraph unroll {"]
        lines += [f"  {k}={_quote(v)};" for k, v in self.graph_attrs.items()]
        lines.append('  node [fontname="Helvetica", fontsize="11"];')
        lines.append('  edge [fontname="Helvetica", fontsize="9"];')
        stack: list[tuple[_Cluster, int, bool]] = [(self.root, 1, False)]
        while stack:
            cluster, depth, closing = stack.pop()
            pad = "  " * depth
            if closing:
                lines.append(pad + "}")
                continue
            inner = pad
            if cluster is not self.root:
                lines.append(f"{pad}subgraph {_quote(cluster.name)} {{")
                inner = pad + "  "
                lines += [f"{inner}{k}={_quote(v)};" for k, v in cluster.attrs.items()]
                stack.append((cluster, depth, True))
            lines += [inner + n for n in cluster.nodes]
            stack += [(c, depth + (cluster is not self.root), False) for c in reversed(cluster.children)]
        if self.top_rank:
            lines.append('  { rank="min"; ' + " ".join(f"{_quote(n)};" for n in self.top_rank) + " }")
        lines += ["  " + e for e in self.edges]
        lines.append("}")
        return "\n".join(lines) + "\n"


# ---- the drawing walk ---------------------------------------------------------------------------

@dataclass
class _Scope:
    """One graph being drawn: the top level or a loop/fused body, with where its nodes went."""

    graph: Graph
    cluster: _Cluster
    prefix: str
    owner: Node | None = None              # the LOOP/FUSED node whose body this is
    outer: list[Node] = field(default_factory=list)   # the owner's sources
    outer_eps: list[str] = field(default_factory=list)  # where those sources are drawn
    ep: dict[Node, str | None] = field(default_factory=dict)  # None: a constant drawn per use
    order: list[Node] = field(default_factory=list)
    next: int = 0
    body_outs: dict[Node, list[str]] = field(default_factory=dict)  # LOOP/FUSED -> output endpoints


ELLIPSIS = "ellipsis"


class _Drawer:
    def __init__(self, graph: Graph, step_of: dict[Node, int], hidden: set[Node],
                 hidden_steps: list[int], dot: _Dot) -> None:
        self.graph = graph
        self.step_of = step_of
        self.hidden = hidden
        self.dot = dot
        self.step_clusters: dict[int, _Cluster] = {}
        self.outputs = {id(n): name for n, name in zip(
            graph.outputs, graph.output_names or [f"output {i}" for i in range(len(graph.outputs))])}
        # the columns, left to right: an invisible node with ordering=out points to an invisible
        # anchor in each column, in time order, and a low mclimit (set by to_dot) keeps that
        # initial order instead of letting crossing minimization shuffle the columns
        row: list[str] = []
        for step in sorted({s for n, s in step_of.items() if n not in hidden}):
            if hidden_steps and step > hidden_steps[0] and ELLIPSIS not in row:
                gap = dot.cluster(dot.root, "hidden", {
                    **CLUSTER_STYLE["hidden"], "label": f"t = {hidden_steps[0]}…{hidden_steps[-1]}"})
                dot.node(gap, ELLIPSIS, {
                    **NODE_STYLE["ellipsis"], "label": f"… {len(hidden_steps)} steps …",
                    "tooltip": f"steps {hidden_steps[0]} to {hidden_steps[-1]} are not drawn; raise "
                               f"max_nodes to see them"})
                row.append(dot.node(gap, "hidden_anchor", NODE_STYLE["anchor"]))
                row.append(ELLIPSIS)
            cluster = dot.cluster(dot.root, f"t{step}", {**CLUSTER_STYLE["step"], "label": f"t = {step}"})
            self.step_clusters[step] = cluster
            row.append(dot.node(cluster, f"t{step}_anchor", NODE_STYLE["anchor"]))
        if row:
            dot.top_rank.append(dot.node(dot.root, "time", {**NODE_STYLE["anchor"], "ordering": "out"}))
            for a in row:
                if a != ELLIPSIS:
                    dot.edge("time", a, EDGE_STYLE["order"])

    # where a node of a scope is drawn: top-level nodes of the unrolled view go to their column
    def _cluster_of(self, scope: _Scope, node: Node) -> _Cluster:
        if scope.owner is None and node in self.step_of:
            return self.step_clusters[self.step_of[node]]
        return scope.cluster

    def _step(self, scope: _Scope, node: Node) -> int | None:
        return self.step_of.get(node) if scope.owner is None else None

    def run(self) -> None:
        top = _Scope(self.graph, self.dot.root, "n")
        stack = [self._open(top)]
        while stack:  # a body is drawn as soon as its owner is met, so its outputs exist for users
            scope = stack[-1]
            if scope.next == len(scope.order):
                stack.pop()
                self._close(scope, stack[-1] if stack else None)
                continue
            node = scope.order[scope.next]
            scope.next += 1
            child = self._draw(scope, node)
            if child is not None:
                stack.append(self._open(child))

    def _open(self, scope: _Scope) -> _Scope:
        scope.order = toposort(list(scope.graph.inputs) + list(scope.graph.outputs))
        return scope

    def _id(self, scope: _Scope, node: Node) -> str:
        return f"{scope.prefix}{scope.next - 1}"  # the node being drawn is order[next - 1]

    def _endpoint(self, scope: _Scope, src: Node, user: str, pos: int, cluster: _Cluster) -> str:
        """Where an edge out of `src` starts; constants get a small node of their own per use."""
        ep = scope.ep[src]
        if ep is None:
            ep = self.dot.node(cluster, f"{user}_k{pos}", {**NODE_STYLE["const"],
                                                          "label": _const_text(src),
                                                          "tooltip": _tooltip(src)})
        return ep

    def _across(self, scope: _Scope, src: Node, node: Node) -> bool:
        """Does the edge run between two step columns?"""
        a, b = self._step(scope, src), self._step(scope, node)
        return a is not None and b is not None and a != b

    def _edge_kind(self, scope: _Scope, src: Node, node: Node) -> str:
        if node.op is Op.STOP_GRADIENT or node.role == "truncate":
            return "cut"
        owner = scope.owner
        if src.op is Op.ARG and owner is not None and owner.op is Op.LOOP \
                and _arg_group(owner.arg, src.arg) == "const":  # type: ignore[arg-type]
            return "const"  # a weight entering the loop
        return "backward" if node.role == "backward" else "data"

    def _node_attrs(self, node: Node, kind: str, label: str, top: bool = False) -> dict[str, str]:
        attrs = {**NODE_STYLE[kind], "label": label, "tooltip": _tooltip(node)}
        if kind in ("op", "cut"):
            attrs["fillcolor"] = ROLE_FILL.get(node.role, OTHER_ROLE_FILL)
        if top and id(node) in self.outputs:
            attrs["peripheries"] = "2"
            attrs["xlabel"] = self.outputs[id(node)]
        return attrs

    def _draw(self, scope: _Scope, node: Node) -> _Scope | None:
        """Draw one node; return the body scope to draw next for LOOP/FUSED nodes."""
        name = self._id(scope, node)
        if node in self.hidden or (node.op is Op.PROJ and node.src[0] in self.hidden):
            scope.ep[node] = ELLIPSIS
            for src in node.src:
                ep = scope.ep.get(src)
                if ep is not None:
                    self.dot.edge(ep, ELLIPSIS, EDGE_STYLE["ellipsis"], once=True)
            return None
        cluster = self._cluster_of(scope, node)
        if node.op is Op.CONST and not (scope.owner is None and node in self.graph.outputs):
            scope.ep[node] = None
            return None
        if node.op is Op.ARG and scope.owner is not None:
            self._draw_arg(scope, node, name)
            return None
        if node.op is Op.PROJ and node.src[0].op in (Op.LOOP, Op.FUSED):
            self._draw_proj(scope, node, name, cluster)
            return None
        if node.op in (Op.LOOP, Op.FUSED):
            return self._draw_owner(scope, node, name, cluster)
        kind = {Op.PARAM: "param", Op.INPUT: "input", Op.CONST: "const",
                Op.STOP_GRADIENT: "cut"}.get(node.op, "cut" if node.role == "truncate" else "op")
        scope.ep[node] = self.dot.node(cluster, name, self._node_attrs(node, kind, node_label(node),
                                                                       top=scope.owner is None))
        if self.step_of and kind in ("param", "input"):  # unrolled: weights above the columns
            self.dot.top_rank.append(name)
        for pos, src in enumerate(node.src):
            a = self._endpoint(scope, src, name, pos, cluster)
            kind = self._edge_kind(scope, src, node)
            if self._across(scope, src, node):  # written reversed: see EDGE_STYLE["carry_step"]
                self.dot.edge(name, a, {**EDGE_STYLE["carry_step"],
                                        **({"style": "dashed"} if kind == "cut" else {})})
            else:
                self.dot.edge(a, name, EDGE_STYLE[kind], once=a == ELLIPSIS)
        return None

    def _draw_owner(self, scope: _Scope, node: Node, name: str, cluster: _Cluster) -> _Scope:
        body = nested_body(node)
        assert body is not None
        if node.op is Op.LOOP:
            info: LoopInfo = node.arg  # type: ignore[assignment]
            attrs = {**CLUSTER_STYLE["loop"], "label": loop_label(info),
                     "tooltip": f"{info.n_consts} consts, {info.n_carry} carried, {info.n_xs} "
                                f"sequences, {info.n_ys} outputs\nbuilt at {node.loc}"}
        else:
            n_ops = sum(1 for n in body.nodes() if n.op not in (Op.ARG, Op.CONST))
            attrs = {**CLUSTER_STYLE["fused"], "label": f"fused kernel ({n_ops} ops)",
                     "tooltip": f"fused kernel\nbuilt at {node.loc}"}
        sub = self.dot.cluster(cluster, name, attrs)
        scope.ep[node] = None
        # sources that are constants get their own small node outside the cluster
        eps = [self._endpoint(scope, s, name, i, cluster) for i, s in enumerate(node.src)]
        return _Scope(body, sub, f"{name}_", owner=node, outer=list(node.src), outer_eps=eps)

    def _draw_arg(self, scope: _Scope, node: Node, name: str) -> None:
        owner = scope.owner
        assert owner is not None
        i: int = node.arg  # type: ignore[assignment]
        info = owner.arg if owner.op is Op.LOOP else None
        group = _arg_group(info, i)  # type: ignore[arg-type]
        if group in ("const", "arg"):  # constants and fused inputs: edges go straight to the users
            scope.ep[node] = scope.outer_eps[i]
            return
        scope.ep[node] = self.dot.node(scope.cluster, name, self._node_attrs(
            node, group, _arg_label(info, i, scope.outer[i], node)))  # type: ignore[arg-type]
        self.dot.edge(scope.outer_eps[i], name, EDGE_STYLE["init" if group == "carry" else "xs"])

    def _draw_proj(self, scope: _Scope, node: Node, name: str, cluster: _Cluster) -> None:
        owner, index = node.src[0], int(node.arg)  # type: ignore[call-overload]
        out_ep = scope.body_outs[owner][index]
        if owner.op is Op.FUSED:  # the fused body's output stands for it
            scope.ep[node] = out_ep
            return
        info: LoopInfo = owner.arg  # type: ignore[assignment]
        scope.ep[node] = self.dot.node(cluster, name, self._node_attrs(
            node, "loop_out", _loop_out_label(info, index, node), top=scope.owner is None))
        self.dot.edge(out_ep, name, EDGE_STYLE["final" if index < info.n_carry else "stack"])

    def _close(self, scope: _Scope, parent: _Scope | None) -> None:
        """A body is drawn: record its output endpoints and draw the carry back-edges."""
        owner = scope.owner
        if owner is None or parent is None:
            return
        eps = []
        for k, out in enumerate(scope.graph.outputs):
            ep = scope.ep[out]
            if ep is None:  # a constant output needs a node of its own
                ep = self.dot.node(scope.cluster, f"{scope.prefix}out{k}", {
                    **NODE_STYLE["const"], "label": _const_text(out), "tooltip": _tooltip(out)})
            eps.append(ep)
        parent.body_outs[owner] = eps
        if owner.op is Op.LOOP:
            info: LoopInfo = owner.arg  # type: ignore[assignment]
            for k in range(info.n_carry):
                carry_arg = scope.graph.inputs[info.n_consts + k]
                self.dot.edge(eps[k], scope.ep[carry_arg], EDGE_STYLE["back"])  # type: ignore[arg-type]


# ---- unrolled view: columns and summarization ---------------------------------------------------

def _has_loops(graph: Graph) -> bool:
    return any(n.op is Op.LOOP for n, _ in all_nodes(graph))


FOLLOWERS = MOVEMENT | {Op.PROJ}  # untagged ops drawn in the column of their users or sources


def _columns(graph: Graph) -> dict[Node, int]:
    """The time step of each top-level node: its tag, else (data movement and proj only) the one step
    all its users lie in (the x[t] slices), else the one step all its non-leaf sources lie in (the
    reshape that stacks y_t, the outputs of a fused kernel)."""
    order = graph.nodes()
    step_of = {n: n.step for n in order if n.step is not None}
    users: dict[Node, list[Node]] = {}
    for n in order:
        for s in n.src:
            users.setdefault(s, []).append(n)

    def only_step(nodes: list[Node]) -> int | None:
        steps = {step_of.get(n) for n in nodes}
        return steps.pop() if len(steps) == 1 else None

    for n in reversed(order):
        if n not in step_of and n.op in FOLLOWERS and n in users and n not in graph.outputs:
            step = only_step(users[n])
            if step is not None:
                step_of[n] = step
    for n in order:
        srcs = [s for s in n.src if s.src]
        if n not in step_of and n.op in FOLLOWERS and srcs:
            step = only_step(srcs)
            if step is not None:
                step_of[n] = step
    return step_of


def _summarize(graph: Graph, step_of: dict[Node, int], max_nodes: int) -> tuple[set[Node], list[int]]:
    """Hide middle steps until the drawing has at most max_nodes nodes (first and last step always
    stay). Returns the hidden nodes and the hidden steps."""
    weight: dict[Node, int] = {}
    total = 0
    for n in graph.nodes():
        body = nested_body(n)
        weight[n] = 1 + (sum(1 for _ in all_nodes(body)) if body is not None else 0)
        total += weight[n]
    if total <= max_nodes:
        return set(), []
    per_step: dict[int, int] = {}
    for n, s in step_of.items():
        per_step[s] = per_step.get(s, 0) + weight[n]
    steps = sorted(per_step)
    if len(steps) <= 2:
        return set(), []
    budget = max_nodes - (total - sum(per_step.values())) - 1  # the ellipsis node
    lo, hi = 1, len(steps) - 1  # steps[:lo] and steps[hi:] are kept
    used = per_step[steps[0]] + per_step[steps[-1]]
    while lo < hi:
        take_front = lo <= len(steps) - hi  # alternate: front, back, front, ...
        candidate = steps[lo] if take_front else steps[hi - 1]
        if used + per_step[candidate] > budget:
            break
        used += per_step[candidate]
        if take_front:
            lo += 1
        else:
            hi -= 1
    hidden_steps = steps[lo:hi]
    hidden_set = set(hidden_steps)
    return {n for n, s in step_of.items() if s in hidden_set}, hidden_steps


# ---- public API ---------------------------------------------------------------------------------

def _as_graph(graph: GraphLike) -> Graph:
    if isinstance(graph, Graph):
        return graph
    if isinstance(graph, Node):
        return Graph.of([graph])
    nodes = list(graph)
    if not all(isinstance(n, Node) for n in nodes):
        raise TypeError("expected a Graph, a Node or a sequence of Nodes")
    return Graph.of(nodes)


def to_dot(graph: GraphLike, view: str = "rolled", max_nodes: int = 400, rankdir: str | None = None,
           title: str | None = None) -> str:
    """The DOT text of `graph` in the rolled or unrolled view (see the module docstring).

    max_nodes: unrolled view only (the rolled view draws everything): above this many nodes only
    the first and last steps are drawn, with an ellipsis node for the rest. rankdir: Graphviz direction ("TB" by default, "LR").
    title: a label for the whole picture."""
    if view not in VIEWS:
        raise ValueError(f"to_dot: view must be one of {VIEWS}, found {view!r}")
    g = _as_graph(graph)
    step_of: dict[Node, int] = {}
    hidden: set[Node] = set()
    hidden_steps: list[int] = []
    if view == "unrolled":
        if _has_loops(g):
            g = unroll(g)
        step_of = _columns(g)
        hidden, hidden_steps = _summarize(g, step_of, max_nodes)
    attrs = {"rankdir": rankdir or "TB", "newrank": "true", "fontname": "Helvetica"}
    notes = [title] if title else []
    if hidden_steps:
        notes.append(f"steps {hidden_steps[0]}–{hidden_steps[-1]} hidden (above max_nodes={max_nodes})")
    if notes:
        attrs.update(label="\n".join(notes), labelloc="t")
    if step_of:
        attrs["mclimit"] = "0.01"  # keep the columns in time order (see _Drawer)
    dot = _Dot(attrs)
    _Drawer(g, step_of, hidden, hidden_steps, dot).run()
    return dot.text()


def _format_of(path: Path, format: str | None) -> str:
    if format:
        return format.lower().lstrip(".")
    if not path.suffix:
        raise ValueError(f"draw: cannot tell the format of {str(path)!r}; give the file a suffix "
                         f"(.svg, .png, .pdf, .dot) or pass format=")
    return path.suffix[1:].lower()


def render(dot_text: str, format: str = "svg") -> bytes:
    """Lay out and render DOT text with Graphviz's `dot` (or pygraphviz's bundled Graphviz).
    Raises RuntimeError with install instructions when neither is available."""
    try:
        return _render_with_dot(dot_text, format)
    except FileNotFoundError:
        pass
    try:
        import pygraphviz  # type: ignore[import-not-found]
    except ImportError:
        raise RuntimeError(NO_DOT_MESSAGE.format(fmt=format)) from None
    return pygraphviz.AGraph(string=dot_text).draw(format=format, prog="dot")


def _render_with_dot(dot_text: str, format: str) -> bytes:
    """Render with the `dot` program; FileNotFoundError when it is not on PATH."""
    try:
        import graphviz
    except ImportError:  # the Python package is optional here: call `dot` ourselves
        try:
            done = subprocess.run(["dot", f"-T{format}"], input=dot_text.encode(), capture_output=True,
                                  check=False)
        except (FileNotFoundError, PermissionError) as err:
            raise FileNotFoundError("dot") from err
        if done.returncode:
            raise RuntimeError(f"draw: dot failed: {done.stderr.decode(errors='replace')}")
        return done.stdout
    try:
        return graphviz.Source(dot_text).pipe(format=format)
    except graphviz.ExecutableNotFound as err:
        raise FileNotFoundError("dot") from err
    except graphviz.CalledProcessError as err:
        raise RuntimeError(f"draw: dot failed: {(err.stderr or b'').decode(errors='replace')}") from err


def draw(graph: GraphLike, path: str | Path | None = None, view: str = "rolled", max_nodes: int = 400,
         format: str | None = None, **options: Any) -> Any:
    """Draw `graph` (rolled or unrolled view, see the module docstring).

    With a path: writes the file and returns its Path. The format comes from the suffix (.svg,
    .png, .pdf, ... anything `dot -T` knows) unless `format` is given; .dot/.gv write the DOT text
    and need no renderer. Rendering needs Graphviz's `dot` (or pygraphviz); without it a
    RuntimeError says how to install it. Without a path: returns a `graphviz.Source` (it displays
    itself in notebooks; `.pipe()`, `.render()`). `options` go to `to_dot` (rankdir, title)."""
    text = to_dot(graph, view=view, max_nodes=max_nodes, **options)
    if path is None:
        import graphviz
        return graphviz.Source(text, format=format or "svg")
    path = Path(path)
    fmt = _format_of(path, format)
    if fmt in TEXT_FORMATS:
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(render(text, fmt))
    return path


# ---- networkx -----------------------------------------------------------------------------------

def _shape_dtype(node: Node) -> tuple[tuple, str | tuple[str, ...]]:
    """A tensor's shape and dtype; a tuple of each for multi-output nodes (loop, fused)."""
    if isinstance(node.type, TensorType):
        return node.type.shape, node.type.dtype
    return tuple(t.shape for t in node.type), tuple(t.dtype for t in node.type)


def to_networkx(graph: GraphLike) -> networkx.DiGraph:
    """Every node of `graph` and of its loop/fused bodies as a networkx.DiGraph.

    Node keys: stable strings. Top-level nodes are "n0", "n1", ... in dependency order (the order of
    `toposort(inputs + outputs)`); the body of node "n5" holds "n5/n0", "n5/n1", ... (nested bodies
    nest further: "n5/n3/n0"). Interned nodes shared by several bodies (ARG leaves, constants)
    appear once per body. Node attributes:
        op      the op name ("matmul", "loop", ...)
        shape   a tuple of ints; for multi-output nodes (loop, fused) a tuple of shapes
        dtype   a dtype name; for multi-output nodes a tuple of them
        step    node.step (the time step of an unrolled node) or None
        role    node.role (None, "backward", "truncate", ...)
        depth   nesting depth: 0 at top level, 1 inside a loop body, ...
        parent  the key of the LOOP/FUSED node whose body holds it, or None
        group   for body arguments: "const", "carry", "xs" (loops) or "arg" (fused); else None
        name    the feed name of inputs and params, else None
        label   the label `to_dot` draws;  loc  the user's file:line that built it
    Edge attributes: kind, and positions (a tuple: several uses of one source collapse into one
    edge of a DiGraph). Kinds:
        "data"        source -> user in the same graph; positions = operand indices
        "const", "carry", "xs", "arg"   a LOOP/FUSED node's source -> the body argument it feeds;
                      positions = source indices of the owner
        "yield"       body output -> its LOOP/FUSED node; positions = output indices
        "recurrence"  a loop body's new carry -> its carry argument (positions = carry indices).
                      The only edges that make cycles: drop them for DAG algorithms.
    Graph attributes: inputs, outputs (lists of keys), output_names."""
    import networkx as nx

    g = _as_graph(graph)
    out = nx.DiGraph()

    def add_edge(a: str, b: str, kind: str, pos: int) -> None:
        data = out.get_edge_data(a, b)
        if data is not None and data["kind"] == kind:
            data["positions"] += (pos,)
        else:
            out.add_edge(a, b, kind=kind, positions=(pos,))

    # (graph, key prefix, depth, owner node, owner key, keys of the owner's sources)
    stack: list[tuple[Graph, str, int, Node | None, str | None, list[str]]] = [
        (g, "n", 0, None, None, [])]
    top_keys: dict[Node, str] = {}
    while stack:
        body, prefix, depth, owner, owner_key, outer_keys = stack.pop()
        order = toposort(list(body.inputs) + list(body.outputs))
        keys = {n: f"{prefix}{i}" for i, n in enumerate(order)}
        info = owner.arg if owner is not None and owner.op is Op.LOOP else None
        for node in order:
            key = keys[node]
            group = None
            if owner is not None and node.op is Op.ARG:
                group = _arg_group(info, node.arg)  # type: ignore[arg-type]
            shape, dtype = _shape_dtype(node)
            out.add_node(key, op=node.op.value, shape=shape, dtype=dtype, step=node.step,
                         role=node.role, depth=depth, parent=owner_key, group=group, name=node.name,
                         label=node_label(node), loc=node.loc)
            for pos, src in enumerate(node.src):
                add_edge(keys[src], key, "data", pos)
            if group is not None:
                add_edge(outer_keys[node.arg], key, group, node.arg)  # type: ignore[index]
            inner = nested_body(node)
            if inner is not None:
                stack.append((inner, f"{key}/n", depth + 1, node, key, [keys[s] for s in node.src]))
        if owner_key is not None:
            for i, o in enumerate(body.outputs):
                add_edge(keys[o], owner_key, "yield", i)
            if info is not None:
                for k in range(info.n_carry):
                    new_carry, carry_arg = body.outputs[k], body.inputs[info.n_consts + k]
                    add_edge(keys[new_carry], keys[carry_arg], "recurrence", k)
        else:
            top_keys = keys
    out.graph["inputs"] = [top_keys[n] for n in g.inputs]
    out.graph["outputs"] = [top_keys[n] for n in g.outputs]
    out.graph["output_names"] = g.output_names
    return out
