"""Drawing graphs: DOT text (rolled or unrolled view), rendering with Graphviz, and networkx export.

A leaf module (micrograd's `draw_dot` lives outside the engine): it imports `unroll.ir` only.

    ur.to_dot(graph, view="rolled")            # DOT text; needs no renderer
    ur.draw(graph, "rnn.svg", view="unrolled") # renders with Graphviz's `dot`; format from the suffix
    ur.draw(graph, "rnn.svg", view="unrolled", detail=True)   # every op, no fused groups
    ur.to_networkx(graph)                      # a networkx.DiGraph of every node, bodies included

What is drawn is what runs: loops are merged first (`merge_loops`, as `ur.compile` does), so the
loss of `[loss, *ur.grad(loss, params)]` and the gradients share one forward loop in the picture.
Outputs are labelled by their names; without names, the gradients that `ur.grad` built are named
after what they are the gradient of ("∂L/∂weight_hh_l0", the loss "L": found by rebuilding
`grad(loss, params)` and matching nodes, which are interned) and the rest "output k".

Rolled view (top to bottom): each LOOP is a cluster labelled "loop ×T (reverse)" holding its body;
loop constants (weights) enter the cluster straight into the ops that use them, the initial carry and
the sequences enter through the body's carry / x[t] argument nodes, the new carry goes back to the
carry argument on a bold red back-edge, and the final carries / stacked outputs leave through
house-shaped nodes. Parameters are yellow ellipses, inputs green ellipses, constants small grey text
drawn once per use (so a shared `0.0` does not tie the picture into a knot).

Unrolled view: loops are unrolled first (`ur.unroll`), then one cluster per time step `node.step`,
in time order left to right. Edges between steps (carried state, carried gradients) are bold red;
forward ops are blue, ops with role "backward" red; edges into a STOP_GRADIENT node or a node with
role "truncate" (where truncation cuts the gradient) are dashed. Parameters are outside the steps,
drawn once, with an edge into every forward step that reads them. A graph that was unrolled before
drawing (its nodes carry step tags) is drawn with its steps in the rolled view too.

By default the steps are compact: the elementwise math of one step's cell (forward or backward:
adds, multiplies, activations, reductions) is one orange-edged box per connected group, data
movement (slices, reshapes, transposes, the stacking of per-step values and slicing them back) is
drawn as the edge it is, constants are left out, values nothing drawn reads are dropped, and output
names head their node's label (ops the truncate pass rebuilt count as forward ops: its cuts are its
stop_gradient nodes). Forward steps form a row; backward steps (role "backward") a second
row below, step t under step t, so that the carried gradient runs right to left; a backward step
names the parameters and inputs it reads instead of drawing long edges to them.
`detail=True` (or `compact=False`) draws every op, one column per step (forward ops above the
backward ones of the same step): pure data movement whose users, or whose sources, lie in one step
is drawn in that step, constants are small grey text, and FUSED nodes are orange boxes around their
ops (their argument and output plumbing is not drawn: edges go straight from the outside values to
the ops inside). A legend names the kinds of things a picture shows when it shows more than one
(forward op, backward op, truncated gradient edge, fused kernel).

Above `max_nodes` drawn nodes only the first and last steps are drawn and an ellipsis node
"… 42 steps …" stands for the rest (edges into or out of hidden steps go to it); raise `max_nodes` to
see everything. Nested loops are unrolled too; their nodes keep the step tags `unroll` gives them, so
steps then mix outer and inner steps.

Every walk is iterative (explicit stacks): unrolled graphs are thousands of nodes deep.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .ir.loops import merge_loops
from .ir.node import Graph, LoopInfo, Node, all_nodes, nested_body, toposort
from .ir.ops import ELEMENTWISE, MOVEMENT, REDUCE, Op, TensorType
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
    "fused": {"shape": "box", "style": "rounded,filled,bold", "color": "#e67e22", "penwidth": "2.5"},
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
    "step_backward": {"style": "rounded", "color": "#e6b0aa", "fontcolor": "#922b21"},
    "hidden": {"style": "rounded,dashed", "color": "#aab7b8", "fontcolor": "#7f8c8d"},
}
EDGE_STYLE: dict[str, dict[str, str]] = {
    "data": {},
    "backward": {"color": "#c0392b"},
    "cut": {"style": "dashed", "color": "#7f8c8d"},
    # between two steps of a row: written head -> tail with dir=back, so that for the layout the
    # user (top of the next step) sits above the source (bottom of this one): the steps line up
    # at one height instead of forming a staircase, and the edge runs straight across
    "carry_step": {"color": "#c0392b", "penwidth": "2", "dir": "back"},
    # between two backward steps, or two steps of the compact view (gradient accumulators and
    # fused cells read the previous step at their bottom: as ranks, that is a staircase); the
    # anchors and the parameters above keep the steps level
    "carry_back": {"color": "#c0392b", "penwidth": "2", "constraint": "false"},
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

# the compact view packs its boxes tighter
COMPACT_LAYOUT = {"nodesep": "0.15", "ranksep": "0.3"}
COMPACT_NODES = {"fontsize": "10", "width": "0.4", "height": "0.3", "margin": "0.06,0.03"}

# the legend's entries, in this order: (kind, label)
LEGEND = (("forward", "forward op"), ("backward", "backward op"),
          ("truncated", "truncated gradient"), ("fused", "fused kernel"))

# compact view: ops gathered into one box per step, and ops drawn as the edges they are
GROUPED = (ELEMENTWISE - {Op.STOP_GRADIENT}) | REDUCE


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


def _group_label(members: list[Node]) -> str:
    """A fused group's box: its ops with counts in order of first use ("add×3, tanh"), three to a
    line, then the type of its last op."""
    counts: dict[str, int] = {}
    for m in members:
        counts[m.op.value] = counts.get(m.op.value, 0) + 1
    parts = [op if k == 1 else f"{op}×{k}" for op, k in counts.items()]
    lines = [", ".join(parts[i:i + 3]) for i in range(0, len(parts), 3)]
    return "\n".join(lines + [members[-1].type_str()])


def _tooltip(node: Node) -> str:
    arg = "" if node.op in (Op.LOOP, Op.FUSED) else f" arg={node.arg!r}"
    extra = "".join(f" {k}={v}" for k, v in (("step", node.step), ("role", node.role)) if v is not None)
    return f"{node.op.value} {node.type_str()}{arg[:200]}{extra}\nbuilt at {node.loc}"


# ---- a small DOT writer -------------------------------------------------------------------------

def _quote(text: object) -> str:
    s = str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


class _Html(str):
    """An HTML-like label: written <...>, not quoted."""


def _attrs(attrs: dict[str, str]) -> str:
    return "[" + ", ".join(f"{k}=<{v}>" if isinstance(v, _Html) else f"{k}={_quote(v)}"
                           for k, v in attrs.items()) + "]"


@dataclass
class _Cluster:
    name: str
    attrs: dict[str, str]
    nodes: list[str] = field(default_factory=list)
    children: list[_Cluster] = field(default_factory=list)


class _Dot:
    """Clusters (nested) holding node statements, then every edge at the top level."""

    def __init__(self, graph_attrs: dict[str, str], node_attrs: dict[str, str] | None = None) -> None:
        self.graph_attrs = graph_attrs
        self.node_attrs = {"fontname": "Helvetica", "fontsize": "11", **(node_attrs or {})}
        self.root = _Cluster("root", {})
        self.edges: list[str] = []
        self.top_rank: list[str] = []  # nodes drawn in the first row (rank=min)
        self.same_rank: list[list[str]] = []  # groups of nodes drawn in one row each
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
        lines.append(f"  node {_attrs(self.node_attrs)};")
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
        for row in self.same_rank:
            lines.append('  { rank="same"; ' + " ".join(f"{_quote(n)};" for n in row) + " }")
        lines += ["  " + e for e in self.edges]
        lines.append("}")
        return "\n".join(lines) + "\n"




# ---- output names: what each gradient is the gradient of -----------------------------------------

def output_labels(graph: Graph) -> list[str]:
    """The name drawn beside each output: the graph's output names when it has them, else "L" for a
    loss and "∂L/∂weight_hh_l0" for the gradients `ur.grad` built from it, else "output k".

    A gradient is recognised exactly, not guessed from its shape: autodiff records what each
    gradient node it returns is the gradient of (`autodiff.GRADIENT_OF`; nodes are interned, so a
    node that is the gradient of two parameters carries both names). Gradients of a graph rebuilt
    after differentiating (unrolled, checkpoint segments) keep "output k"."""
    if graph.output_names is not None:
        return list(graph.output_names)
    from .ir.autodiff import GRADIENT_OF
    outs = list(graph.outputs)
    labels = [f"output {i}" for i in range(len(outs))]
    records = {i: GRADIENT_OF.get(o) for i, o in enumerate(outs)}
    found = {i: r for i, r in records.items() if r is not None}
    losses = sorted({i for r in found.values() for i, o in enumerate(outs) if any(o is loss for loss in r[0])})
    loss_name = {k: "L" if len(losses) == 1 else f"L{j}" for j, k in enumerate(losses)}
    for k in losses:
        labels[k] = loss_name[k]
    for node in {outs[i] for i in found}:
        where = [i for i in found if outs[i] is node]
        loss_ids, names = found[where[0]]
        k = next((j for j in losses if any(outs[j] is loss for loss in loss_ids)), None)
        top = loss_name[k] if k is not None else "L"
        for j, i in enumerate(where):  # the gradient of several wrt nodes, output as often: one each
            own = [names[j]] if len(names) == len(where) else list(names)
            labels[i] = " = ".join(f"∂{top}/∂{name}" for name in own)
    return labels


def _merged(graph: Graph) -> Graph:
    """The graph with loops merged as `ur.compile` merges them: the forward runs once."""
    merged = merge_loops(list(graph.outputs))
    if all(a is b for a, b in zip(merged, graph.outputs)):
        return graph
    return Graph(graph.inputs, tuple(merged), graph.output_names)


# ---- the compact view's plan: which ops are drawn, and as what ----------------------------------

FORWARD, BACKWARD = "fw", "bw"  # the two rows of steps
Place = tuple[int, str]  # where a top-level node is drawn: (step, row)


def _row(node: Node) -> str:
    return BACKWARD if node.role == "backward" else FORWARD


def _slice_part(node: Node) -> Node | None:
    """The concat part a slice takes back whole (the unrolled residuals: a value stacked over the
    steps, then sliced again per step), else None."""
    src = node.src[0]
    if node.op is not Op.SLICE or src.op is not Op.CONCAT:
        return None
    axis: int = src.arg  # type: ignore[assignment]
    ranges: tuple[tuple[int, int, int], ...] = node.arg  # type: ignore[assignment]
    if any(r != (0, d, 1) for i, (r, d) in enumerate(zip(ranges, src.shape)) if i != axis):
        return None
    start, stop, step = ranges[axis]
    offset = 0
    for part in src.src:
        size = part.shape[axis]
        if (start, stop, step) == (offset, offset + size, 1):
            return part
        offset += size
    return None


@dataclass
class _Compact:
    """Top-level nodes of a graph drawn with steps, compactly. A node is a unit (drawn as one node
    of the picture), a member of a group (drawn as its group's box), transparent (drawn as the edge
    it is: `alias` names the node drawn for its value, None for a constant, not drawn) or dead (no
    output reads it once movement is seen through: not drawn)."""

    alias: dict[Node, Node | None] = field(default_factory=dict)
    leader: dict[Node, Node] = field(default_factory=dict)       # grouped node -> its group's first
    members: dict[Node, list[Node]] = field(default_factory=dict)  # group's first -> its members
    live: set[Node] = field(default_factory=set)                 # units drawn
    stubs: dict[Node, int] = field(default_factory=dict)  # backward unit -> parameters it reads

    def unit(self, node: Node) -> Node | None:
        """The unit drawn for node's value; None for constants."""
        if node in self.alias:
            unit = self.alias[node]
            return None if unit is None else self.leader.get(unit, unit)
        return self.leader.get(node, node)

    def grouped(self, unit: Node) -> bool:
        return len(self.members.get(unit, ())) > 1


def _compact_plan(graph: Graph, place_of: dict[Node, Place]) -> _Compact:
    plan = _Compact()
    order = toposort(list(graph.inputs) + list(graph.outputs))  # the order _Drawer draws in
    outputs = set(graph.outputs)
    alias, leader, members = plan.alias, plan.leader, plan.members

    def rep(n: Node) -> Node | None:
        return alias[n] if n in alias else n

    # 1. transparent nodes: constants, data movement of one value, the projections of a fused box
    for n in order:
        if n.op is Op.PROJ and n.src[0].op is Op.FUSED:  # the box stands for its outputs
            alias[n] = n.src[0]
        elif n in outputs:
            continue
        elif n.op is Op.CONST:
            alias[n] = None
        elif n.op in MOVEMENT:
            part = _slice_part(n)
            if part is not None:
                alias[n] = rep(part)
                continue
            srcs = list(dict.fromkeys(r for r in map(rep, n.src) if r is not None))
            if len(srcs) <= 1:
                alias[n] = srcs[0] if srcs else None

    # 2. groups: the connected elementwise ops and reductions of one step and row (or of the
    # untagged top level) form one box, unless a path leaves the group and comes back into it
    # through another unit (the boxes would form a cycle): then they join one by one
    units = [n for n in order if n not in alias]
    bucket: dict[Node, tuple[int | None, str]] = {n: place_of.get(n, (None, _row(n))) for n in units}
    src_of = {n: [u for u in dict.fromkeys(map(rep, n.src)) if u is not None] for n in units}
    users_in: dict[Node, list[Node]] = {}  # users in the same bucket
    for n in units:
        for s in src_of[n]:
            if bucket.get(s) == bucket[n]:
                users_in.setdefault(s, []).append(n)
    groupable = {n for n in units if n.op in GROUPED}
    root = {n: n for n in groupable}

    def find(x: Node) -> Node:
        while root[x] is not x:
            root[x] = root[root[x]]
            x = root[x]
        return x
    for n in units:
        if n in groupable:
            for s in src_of[n]:
                if s in groupable and bucket[s] == bucket[n] and find(s) is not find(n):
                    root[find(n)] = find(s)
    components: dict[Node, list[Node]] = {}
    for n in units:
        if n in groupable:
            components.setdefault(find(n), []).append(n)
    split: set[Node] = set()
    for comp in components.values():
        if len(comp) == 1 or _convex(comp, users_in):
            members[comp[0]] = comp
            leader.update((m, comp[0]) for m in comp)
        else:
            split.update(comp)
    if split:
        _join_one_by_one(units, split, src_of, bucket, leader, members)

    # 3. the units' sources; keep what an output reads
    src_units = _unit_sources(plan, order)
    while True:  # a path that leaves a group and comes back through other steps: split it
        cycle = _find_cycle(src_units)
        if not cycle:
            break
        split_up = [u for u in cycle if len(members.get(u, ())) > 1]
        if not split_up:  # cannot happen: seeing through data movement keeps a DAG a DAG
            raise AssertionError("unroll.viz: a cycle without a fused group")
        for lead in split_up:
            for m in members.pop(lead):
                leader[m] = m
                members[m] = [m]
        src_units = _unit_sources(plan, order)
    _compact_live(plan, graph, src_units)
    for u in plan.live:  # the names of parameters and inputs drawn in backward steps
        if place_of.get(u, (None, FORWARD))[1] == BACKWARD:
            plan.stubs[u] = sum(1 for s in src_units.get(u, ()) if s.op in (Op.PARAM, Op.INPUT))
    return plan


def _unit_sources(plan: _Compact, order: list[Node]) -> dict[Node, set[Node]]:
    src_units: dict[Node, set[Node]] = {}
    for n in order:
        if n not in plan.alias:
            u = plan.leader.get(n, n)
            src_units.setdefault(u, set()).update(
                v for v in (plan.unit(s) for s in n.src) if v is not None and v is not u)
    return src_units


def _convex(comp: list[Node], users_in: dict[Node, list[Node]]) -> bool:
    """Does no path leave the group and come back into it (within its bucket)?"""
    inside = set(comp)
    stack = [u for m in comp for u in users_in.get(m, ()) if u not in inside]
    seen: set[Node] = set()
    while stack:
        u = stack.pop()
        if u in inside:
            return False
        if u not in seen:
            seen.add(u)
            stack.extend(users_in.get(u, ()))
    return True


def _join_one_by_one(units: list[Node], allowed: set[Node], src_of: dict[Node, list[Node]],
                     bucket: dict[Node, tuple[int | None, str]], leader: dict[Node, Node],
                     members: dict[Node, list[Node]]) -> None:
    """Groups for the ops of non-convex components: in dependency order, an op joins the group of
    one of its sources unless another of its sources is reached from that group."""
    above: dict[Node, set[Node]] = {}  # unit -> group leaders of its bucket that reach it
    for n in units:
        srcs = [s for s in src_of[n] if bucket.get(s) == bucket[n]]
        reach: set[Node] = set()
        for s in srcs:
            reach |= above.get(s, set())
            if s in leader:
                reach.add(leader[s])
        if n in allowed:
            for lead in dict.fromkeys(leader[s] for s in srcs if s in allowed and s in leader):
                if all(lead not in above.get(s, ()) for s in srcs if leader.get(s) is not lead):
                    leader[n] = lead
                    members[lead].append(n)
                    break
            else:
                leader[n] = n
                members[n] = [n]
        above[n] = reach


def _compact_live(plan: _Compact, graph: Graph, src_units: dict[Node, set[Node]]) -> None:
    stack = [u for u in (plan.unit(o) for o in graph.outputs) if u is not None]
    while stack:
        u = stack.pop()
        if u not in plan.live:
            plan.live.add(u)
            stack.extend(src_units.get(u, ()))


def _find_cycle(src_units: dict[Node, set[Node]]) -> list[Node]:
    """The units on one cycle of the unit graph, or [] (iterative depth-first search)."""
    state: dict[Node, int] = {}  # 1: on the current path, 2: done
    for start in src_units:
        if start in state:
            continue
        path: list[Node] = [start]
        its = [iter(src_units.get(start, ()))]
        state[start] = 1
        while its:
            nxt = next(its[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                its.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                its.append(iter(src_units.get(nxt, ())))
    return []


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
    def __init__(self, graph: Graph, place_of: dict[Node, Place], hidden: set[Node],
                 hidden_steps: list[int], dot: _Dot, labels: list[str] | None = None,
                 plan: _Compact | None = None) -> None:
        self.graph = graph
        self.place_of = place_of
        self.hidden = hidden
        self.dot = dot
        self.plan = plan
        self.step_clusters: dict[Place, _Cluster] = {}
        self.anchors: dict[Place, str] = {}
        self.kinds: set[str] = set()                  # what the legend lists
        self.legend = True
        self.above_bw: set[str] = set()               # drawn outside the steps, read by backward
        self.leaves: set[str] = set()                 # parameters and inputs drawn
        self.placed: dict[str, Place] = {}            # drawn name -> its step cluster
        self.fed: set[str] = set()                    # drawn names with a source in their own step
        self.feeds: set[str] = set()                  # drawn names with a user in their own step
        labels = labels or [f"output {i}" for i in range(len(graph.outputs))]
        self.outputs: dict[int, str] = {}
        for n, name in zip(graph.outputs, labels):  # a node output twice: both names
            self.outputs[id(n)] = f"{self.outputs[id(n)]}, {name}" if id(n) in self.outputs else name
        places = sorted({p for n, p in place_of.items() if n not in hidden and self._drawn(n)},
                        key=lambda p: (p[1] == BACKWARD, p[0]))
        self.rows = {row: [p for p in places if p[1] == row] for row in (FORWARD, BACKWARD)}
        # the steps, left to right: an invisible node with ordering=out points to an invisible
        # anchor in each step, in time order, and a low mclimit (set by to_dot) keeps that
        # initial order instead of letting crossing minimization shuffle them. The backward row's
        # ordering node hangs below every forward step (see _finish), so the rows stack.
        gap_row = FORWARD if self.rows[FORWARD] else BACKWARD  # the row "… k steps …" stands in
        for row in (FORWARD, BACKWARD):
            order: list[str] = []
            for place in self.rows[row]:
                step = place[0]
                if row == gap_row and hidden_steps and hidden_steps[0] < step \
                        and "hidden_anchor" not in order:
                    gap = dot.cluster(dot.root, "hidden", {
                        **CLUSTER_STYLE["hidden"], "label": f"t = {hidden_steps[0]}…{hidden_steps[-1]}"})
                    dot.node(gap, ELLIPSIS, {
                        **NODE_STYLE["ellipsis"], "label": f"… {len(hidden_steps)} steps …",
                        "tooltip": f"steps {hidden_steps[0]} to {hidden_steps[-1]} are not drawn; raise "
                                   f"max_nodes to see them"})
                    order.append(dot.node(gap, "hidden_anchor", NODE_STYLE["anchor"]))
                name = f"t{step}" if row == FORWARD else f"t{step}_bw"
                label = f"t = {step}" if row == FORWARD else f"t = {step} backward"
                cluster = dot.cluster(dot.root, name, {
                    **CLUSTER_STYLE["step" if row == FORWARD else "step_backward"], "label": label})
                self.step_clusters[place] = cluster
                self.anchors[place] = dot.node(cluster, f"{name}_anchor", NODE_STYLE["anchor"])
                order.append(self.anchors[place])
            if not order:
                continue
            head = "time" if row == FORWARD or not self.rows[FORWARD] else "time_bw"
            dot.node(dot.root, head, {**NODE_STYLE["anchor"], "ordering": "out"})
            if head == "time":
                dot.top_rank.append(head)
            for a in order:
                dot.edge(head, a, EDGE_STYLE["order"])

    def _drawn(self, node: Node) -> bool:
        """Is this top-level node with a step drawn as a node of its own (for the step clusters)?"""
        if self.plan is None:
            return node.op is not Op.CONST
        return node in self.plan.live

    # where a node of a scope is drawn: top-level nodes with a step go to their step
    def _cluster_of(self, scope: _Scope, node: Node) -> _Cluster:
        if scope.owner is None and node in self.place_of:
            return self.step_clusters[self.place_of[node]]
        return scope.cluster

    def _where(self, scope: _Scope, node: Node) -> Place | None:
        return self.place_of.get(node) if scope.owner is None else None

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
        self._finish()

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

    def _edge_kind(self, scope: _Scope, src: Node, node: Node) -> str:
        if node.op is Op.STOP_GRADIENT or node.role == "truncate":
            return "cut"
        owner = scope.owner
        if src.op is Op.ARG and owner is not None and owner.op is Op.LOOP \
                and _arg_group(owner.arg, src.arg) == "const":  # type: ignore[arg-type]
            return "const"  # a weight entering the loop
        return "backward" if node.role == "backward" else "data"

    def _link(self, a: str, b: str, kind: str, pa: Place | None, pb: Place | None) -> None:
        """An edge a -> b of `kind`; pa, pb: the steps they are drawn in (None: outside steps)."""
        if kind == "cut":
            self.kinds.add("truncated")
        if b == ELLIPSIS:
            self.dot.edge(a, b, EDGE_STYLE["ellipsis"], once=True)
            return
        once = self.plan is not None or a == ELLIPSIS
        if pa is not None and pa == pb:
            self.fed.add(b)
            self.feeds.add(a)
        if pa is None and pb is not None and pb[1] == BACKWARD and a not in self.leaves:
            self.above_bw.add(a)
        if pa is not None and pb is not None and pa != pb and pa[1] == pb[1]:
            cut = {"style": "dashed"} if kind == "cut" else {}
            if pa[1] == BACKWARD or self.plan is not None:  # no rank constraint (no staircase)
                self.dot.edge(a, b, {**EDGE_STYLE["carry_back"], **cut}, once=once)
            else:  # between two forward steps: written reversed, see EDGE_STYLE["carry_step"]
                self.dot.edge(b, a, {**EDGE_STYLE["carry_step"], **cut}, once=once)
        else:
            self.dot.edge(a, b, EDGE_STYLE[kind], once=once)

    def _node_attrs(self, node: Node, kind: str, label: str, top: bool = False) -> dict[str, str]:
        attrs = {**NODE_STYLE[kind], "label": label, "tooltip": _tooltip(node)}
        if kind in ("op", "cut", "fused"):
            role = node.role
            if self.plan is not None and role == "truncate" and kind != "cut":
                role = None  # compact: the truncate pass's forward ops are forward ops; its cuts
            attrs["fillcolor"] = ROLE_FILL.get(role, OTHER_ROLE_FILL)  # are its stop_gradients
            self.kinds.add("backward" if node.role == "backward" else "forward")
        if kind == "fused":
            self.kinds.add("fused")
        if top and id(node) in self.outputs:
            attrs["peripheries"] = "2"
            attrs["xlabel"] = self.outputs[id(node)]
        return attrs

    def _put(self, scope: _Scope, node: Node, name: str, cluster: _Cluster, attrs: dict[str, str]) -> str:
        self.dot.node(cluster, name, attrs)
        place = self._where(scope, node)
        if place is not None:
            self.placed[name] = place
        return name

    def _draw(self, scope: _Scope, node: Node) -> _Scope | None:
        """Draw one node; return the body scope to draw next for LOOP/FUSED nodes."""
        name = self._id(scope, node)
        if self.plan is not None and scope.owner is None and node.op is not Op.LOOP \
                and not (node.op is Op.PROJ and node.src[0].op is Op.LOOP):
            self._draw_compact(scope, node, name)
            return None
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
        scope.ep[node] = self._put(scope, node, name, cluster, self._node_attrs(
            node, kind, node_label(node), top=scope.owner is None))
        if self.place_of and kind in ("param", "input"):  # weights above the steps
            self.dot.top_rank.append(name)
            self.leaves.add(name)
        for pos, src in enumerate(node.src):
            a = self._endpoint(scope, src, name, pos, cluster)
            self._link(a, name, self._edge_kind(scope, src, node), self._src_place(scope, src, a),
                       self._where(scope, node))
        return None

    def _src_place(self, scope: _Scope, src: Node, ep: str) -> Place | None:
        if ep in self.placed:
            return self.placed[ep]
        return self._where(scope, src) if scope.ep.get(src) is not None else None

    def _draw_compact(self, scope: _Scope, node: Node, name: str) -> None:
        """A top-level node of the compact view (loops and their projections are drawn as usual)."""
        plan = self.plan
        assert plan is not None
        unit = plan.unit(node)
        if unit is None:  # a constant: not drawn (an output constant is a unit of its own)
            scope.ep[node] = None
            return
        if unit is not node:  # transparent, or a later member of a group
            scope.ep[node] = scope.ep.get(unit)
            if node in plan.alias:
                return
        if unit not in plan.live:
            scope.ep[node] = None
            return
        if unit in self.hidden:
            scope.ep[node] = ELLIPSIS
            for src in node.src:
                ep = scope.ep.get(src)
                if ep is not None and ep != ELLIPSIS:
                    self._link(ep, ELLIPSIS, "data", None, None)
            return
        if unit is node:  # a unit's first node: draw it
            cluster = self._cluster_of(scope, node)
            if plan.grouped(node):
                members = plan.members[node]
                attrs = self._node_attrs(node, "fused", _group_label(members))
                attrs["tooltip"] = (f"{len(members)} ops computed in one fused kernel: "
                                    + ", ".join(m.op.value for m in members)
                                    + (f" (step {node.step})" if node.step is not None else "")
                                    + f"\nbuilt at {node.loc}")
                outs = [o for o in self.graph.outputs if plan.unit(o) is node]
            elif node.op is Op.FUSED:
                body: Graph = node.arg  # type: ignore[assignment]
                n_ops = sum(1 for n in body.nodes() if n.op not in (Op.ARG, Op.CONST))
                attrs = self._node_attrs(node, "fused", f"fused kernel ({n_ops} ops)\n{node.type_str()}")
                outs = [o for o in self.graph.outputs if plan.unit(o) is node]
            else:
                kind = {Op.PARAM: "param", Op.INPUT: "input", Op.CONST: "const",
                        Op.STOP_GRADIENT: "cut"}.get(node.op, "op")
                attrs = self._node_attrs(node, kind, node_label(node))
                if self.place_of and kind in ("param", "input"):
                    self.dot.top_rank.append(name)
                    self.leaves.add(name)
                outs = [node] if node in self.graph.outputs else []
            if outs:  # outputs: their names head the label (xlabels would collide with the steps)
                names = dict.fromkeys(self.outputs[id(o)] for o in outs)
                attrs.update(peripheries="2", label="\n".join([*names, attrs["label"]]))
            scope.ep[node] = self._put(scope, node, name, cluster, attrs)
        me = scope.ep[unit]
        assert me is not None
        here = self.placed.get(me)
        for src in node.src:
            ep = scope.ep.get(src)
            if ep is None or ep == me:
                continue
            leaf = plan.unit(src)
            if here is not None and here[1] == BACKWARD and leaf is not None \
                    and leaf.op in (Op.PARAM, Op.INPUT):
                ep = self._stub(leaf, me, here)  # no long edge from the top: the name, in the step
            kind = "cut" if node.op is Op.STOP_GRADIENT else "backward" if node.role == "backward" \
                else "data"
            self._link(ep, me, kind, self.placed.get(ep), here)

    def _stub(self, leaf: Node, user: str, place: Place) -> str:
        """A parameter or input read by a backward step, drawn in that step as its name."""
        name = f"{user}_{leaf.name}"
        if name not in self.placed:
            kind = "param" if leaf.op is Op.PARAM else "input"
            self.dot.node(self.step_clusters[place], name, {
                **NODE_STYLE["const"], "fontsize": "10", "fontcolor": NODE_STYLE[kind]["color"],
                "label": leaf.name, "tooltip": f"{kind} {leaf.name} {leaf.type_str()} (drawn once above)"})
            self.placed[name] = place
        return name

    def _draw_owner(self, scope: _Scope, node: Node, name: str, cluster: _Cluster) -> _Scope:
        body = nested_body(node)
        assert body is not None
        if node.op is Op.LOOP:
            info: LoopInfo = node.arg  # type: ignore[assignment]
            attrs = {**CLUSTER_STYLE["loop"],
                     "label": loop_label(info) + (" · backward" if node.role == "backward" else ""),
                     "tooltip": f"{info.n_consts} consts, {info.n_carry} carried, {info.n_xs} "
                                f"sequences, {info.n_ys} outputs\nbuilt at {node.loc}"}
        else:
            n_ops = sum(1 for n in body.nodes() if n.op not in (Op.ARG, Op.CONST))
            attrs = {**CLUSTER_STYLE["fused"], "label": f"fused kernel ({n_ops} ops)",
                     "tooltip": f"fused kernel\nbuilt at {node.loc}"}
            self.kinds.add("fused")
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


    def _finish(self) -> None:
        """Stack the backward row below the forward one, then draw the legend."""
        dot = self.dot
        if self.rows[FORWARD] and self.rows[BACKWARD]:
            # every forward step's last nodes sit above the backward row's ordering node and above
            # the backward step of the same t (which puts it under them) ...
            for name, place in self.placed.items():
                if place[1] == FORWARD and name not in self.feeds:
                    dot.edge(name, "time_bw", EDGE_STYLE["order"])
                    below = self.anchors.get((place[0], BACKWARD))
                    if below is not None:
                        dot.edge(name, below, {**EDGE_STYLE["order"], "weight": "8"})
            for name in self.above_bw:  # values computed outside the steps for the backward row
                dot.edge(name, "time_bw", EDGE_STYLE["order"])
        for name, place in self.placed.items():  # ... and its anchors above its steps' first nodes
            if place[1] == BACKWARD and name not in self.fed and place in self.anchors:
                dot.edge(self.anchors[place], name, EDGE_STYLE["order"])
        kinds = [(k, text) for k, text in LEGEND if k in self.kinds]
        if not self.legend or len(kinds) < 2:
            return
        dot.node(dot.root, "legend", {"shape": "plaintext", "margin": "0", "label": _legend_html(kinds),
                                      "tooltip": "legend: " + ", ".join(text for _, text in kinds)})


def _legend_html(kinds: list[tuple[str, str]]) -> _Html:
    """The legend: one HTML-like table (one node, so it neither counts against max_nodes nor moves
    the steps), a cell per kind drawn like the thing it names."""
    cells = []
    for kind, text in kinds:
        if kind == "truncated":
            cut = EDGE_STYLE["cut"]["color"]
            cells.append(f'<TD BORDER="0"><FONT COLOR="{cut}">- - - &gt;</FONT> {text}</TD>')
        elif kind == "fused":
            cells.append(f'<TD BGCOLOR="{ROLE_FILL[None]}" COLOR="{NODE_STYLE["fused"]["color"]}" '
                         f'BORDER="3" STYLE="rounded">{text}</TD>')
        else:
            fill = ROLE_FILL["backward" if kind == "backward" else None]
            cells.append(f'<TD BGCOLOR="{fill}" STYLE="rounded">{text}</TD>')
    return _Html('<TABLE BORDER="1" COLOR="#d5d8dc" STYLE="rounded" CELLSPACING="6" CELLPADDING="4">'
                 '<TR><TD BORDER="0"><FONT COLOR="#7f8c8d">legend</FONT></TD>' + "".join(cells)
                 + "</TR></TABLE>")


# ---- steps: where each node goes, and summarization ---------------------------------------------

def _has_loops(graph: Graph) -> bool:
    return any(n.op is Op.LOOP for n, _ in all_nodes(graph))


def _has_steps(graph: Graph) -> bool:
    """Was the graph unrolled before drawing? (its top-level nodes carry step tags)"""
    return any(n.step is not None for n in graph.nodes())


FOLLOWERS = MOVEMENT | {Op.PROJ}  # untagged ops drawn in the step of their users or sources


def _columns(graph: Graph) -> dict[Node, Place]:
    """Where each top-level node is drawn: its step tag and its row (backward or forward, from its
    role); else (data movement and proj only) the one place all its users lie in (the x[t] slices),
    else the one place all its non-leaf sources lie in (the reshape that stacks y_t, the outputs of
    a fused kernel). Users or sources of one step in both rows: the forward row."""
    order = graph.nodes()
    # a node with role "backward" that the forward steps read is drawn with them (nodes are
    # interned: a backward pass that recomputes forward values can share nodes with the forward)
    needed: set[Node] = set()
    stack = [n for n in order if n.step is not None and n.role != "backward"]
    while stack:
        for s in stack.pop().src:
            if s not in needed:
                needed.add(s)
                stack.append(s)
    place_of: dict[Node, Place] = {n: (n.step, FORWARD if n in needed else _row(n))
                                   for n in order if n.step is not None}
    users: dict[Node, list[Node]] = {}
    for n in order:
        for s in n.src:
            users.setdefault(s, []).append(n)

    def only_place(nodes: list[Node]) -> Place | None:
        places = {place_of.get(n) for n in nodes}
        if len(places) == 1:
            return places.pop()
        steps = {p[0] if p is not None else None for p in places}
        if len(steps) == 1 and None not in steps:
            return steps.pop(), FORWARD  # type: ignore[return-value]
        return None

    for n in reversed(order):
        if n not in place_of and n.op in FOLLOWERS and n in users and n not in graph.outputs:
            place = only_place(users[n])
            if place is not None:
                place_of[n] = place
    for n in order:
        srcs = [s for s in n.src if s.src]
        if n not in place_of and n.op in FOLLOWERS and srcs:
            place = only_place(srcs)
            if place is not None:
                place_of[n] = place
    return place_of


def _summarize(graph: Graph, place_of: dict[Node, Place], max_nodes: int,
               plan: _Compact | None = None) -> tuple[set[Node], list[int]]:
    """Hide middle steps until the drawing has at most max_nodes nodes (first and last step always
    stay). Returns the hidden nodes and the hidden steps."""
    weight: dict[Node, int] = {}
    total = 0
    for n in graph.nodes():
        body = nested_body(n)
        if plan is not None and n.op is not Op.LOOP:
            weight[n] = int(n in plan.live) + plan.stubs.get(n, 0)  # compact: the nodes drawn
        else:
            weight[n] = 1 + (sum(1 for _ in all_nodes(body)) if body is not None else 0)
        total += weight[n]
    if total <= max_nodes:
        return set(), []
    per_step: dict[int, int] = {}
    for n, (s, _) in place_of.items():
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
    return {n for n, (s, _) in place_of.items() if s in hidden_set}, hidden_steps


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
           title: str | None = None, detail: bool = False, compact: bool | None = None,
           legend: bool = True) -> str:
    """The DOT text of `graph` in the rolled or unrolled view (see the module docstring).

    max_nodes: views with steps only (the rolled view draws every loop body): above this many
    drawn nodes only the first and last steps are drawn, with an ellipsis node for the rest.
    rankdir: Graphviz direction ("TB" by default, "LR"). title: a label for the whole picture.
    detail=True (the same as compact=False): steps show every op, no fused groups (the compact
    default draws each step's elementwise math as one box, data movement as edges). legend=False:
    no legend."""
    if view not in VIEWS:
        raise ValueError(f"to_dot: view must be one of {VIEWS}, found {view!r}")
    if compact is None:
        compact = not detail
    elif compact and detail:
        raise ValueError(f"to_dot: detail={detail} contradicts compact={compact}; pass one of them")
    g = _as_graph(graph)
    labels = output_labels(g)  # before merging: autodiff recorded the nodes it returned
    g = _merged(g)
    place_of: dict[Node, Place] = {}
    if view == "unrolled" and _has_loops(g):
        g = unroll(g)
    if view == "unrolled" or _has_steps(g):
        place_of = _columns(g)
    plan = _compact_plan(g, place_of) if compact and place_of else None
    if plan is None:  # the detailed view keeps one step per column, backward under forward
        place_of = {n: (step, FORWARD) for n, (step, _) in place_of.items()}
    hidden, hidden_steps = _summarize(g, place_of, max_nodes, plan) if place_of else (set(), [])
    attrs = {"rankdir": rankdir or "TB", "newrank": "true", "fontname": "Helvetica"}
    notes = [title] if title else []
    if hidden_steps:
        notes.append(f"steps {hidden_steps[0]}–{hidden_steps[-1]} hidden (above max_nodes={max_nodes})")
    if notes:
        attrs.update(label="\n".join(notes), labelloc="t")
    if place_of:
        attrs["mclimit"] = "0.01"  # keep the steps in time order (see _Drawer)
    if plan is not None:
        attrs.update(COMPACT_LAYOUT)
    dot = _Dot(attrs, COMPACT_NODES if plan is not None else None)
    drawer = _Drawer(g, place_of, hidden, hidden_steps, dot, labels, plan)
    drawer.legend = legend
    drawer.run()
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
    itself in notebooks; `.pipe()`, `.render()`). `options` go to `to_dot` (rankdir, title, detail,
    compact, legend)."""
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
