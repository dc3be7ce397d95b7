"""Tests for unroll.viz: DOT text of the rolled and unrolled views, summarization, networkx export,
rendering with Graphviz, and the error when Graphviz is missing."""

from __future__ import annotations

import ast
import re
import shutil
import sys
from pathlib import Path

import networkx as nx
import pytest

import unroll as ur
from unroll import viz
from unroll.ir.node import Graph, Node, proj, toposort
from unroll.ir.ops import Op

HAS_DOT = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not HAS_DOT, reason="Graphviz's `dot` is not installed")


# ---- a tiny DOT reader for the writer's own output -----------------------------------------------

ATTR = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
NODE = re.compile(r'^\s*"([^"]+)" \[(.*)\];$')
EDGE = re.compile(r'^\s*"([^"]+)" -> "([^"]+)"(?: \[(.*)\])?;$')
SUBGRAPH = re.compile(r'^\s*subgraph "([^"]+)" \{$')
CLUSTER_ATTR = re.compile(r'^\s*(\w+)="((?:[^"\\]|\\.)*)";$')


class Dot:
    """Nodes (attrs and the innermost cluster holding them), edges, clusters (attrs and parent)."""

    def __init__(self, text: str) -> None:
        self.nodes: dict[str, dict[str, str]] = {}
        self.cluster_of: dict[str, str | None] = {}
        self.edges: list[tuple[str, str, dict[str, str]]] = []
        self.clusters: dict[str, dict[str, str]] = {}
        self.parent: dict[str, str | None] = {}
        stack: list[str] = []
        for line in text.splitlines()[1:-1]:
            if m := SUBGRAPH.match(line):
                self.parent[m.group(1)] = stack[-1] if stack else None
                self.clusters[m.group(1)] = {}
                stack.append(m.group(1))
            elif line.strip() == "}":
                stack.pop()
            elif m := EDGE.match(line):
                self.edges.append((m.group(1), m.group(2), dict(ATTR.findall(m.group(3) or ""))))
            elif m := NODE.match(line):
                self.nodes[m.group(1)] = dict(ATTR.findall(m.group(2)))
                self.cluster_of[m.group(1)] = stack[-1] if stack else None
            elif (m := CLUSTER_ATTR.match(line)) and stack:
                self.clusters[stack[-1]][m.group(1)] = m.group(2)
        assert not stack

    def labelled(self, prefix: str) -> list[str]:
        return [n for n, a in self.nodes.items() if a.get("label", "").startswith(prefix)]

    def real_nodes(self) -> list[str]:
        """Nodes that stand for graph nodes (not per-use constants, anchors or the ellipsis)."""
        return [n for n, a in self.nodes.items() if a.get("shape") not in ("plaintext", "point")]

    def inside(self, node: str, cluster: str) -> bool:
        c = self.cluster_of[node]
        while c is not None:
            if c == cluster:
                return True
            c = self.parent[c]
        return False

    def step_clusters(self) -> list[str]:
        return [c for c in self.clusters if re.fullmatch(r"cluster_t\d+", c)]


# ---- models ---------------------------------------------------------------------------------------

def rnn(T: int = 5, B: int = 2, I: int = 3, H: int = 4, tag: str = "x", reverse: bool = False,
        truncate: bool = False) -> Graph:
    """h_t = tanh(x_t @ Wx + h @ Wh + b); loss = mean(ys ** 2). `tag` names the input so tests that
    mark nodes (roles are side data of interned nodes) do not share nodes with other tests."""
    x = ur.input(tag, (T, B, I))
    Wx = ur.param("Wx", (I, H), 0.1)
    Wh = ur.param("Wh", (H, H), 0.1)
    b = ur.param("b", (H,))

    def step(h, x_t):
        if truncate:
            h = ur.stop_gradient(h)
        h = ur.tanh(x_t @ Wx + h @ Wh + b)
        return h, h
    _, ys = ur.scan(step, ur.zeros((B, H)), x, reverse=reverse)
    return ur.graph(ur.mean(ys ** 2), names=["loss"])


def fused_add_tanh(a: Node, b: Node) -> tuple[Node, Node]:
    """A hand-built FUSED node computing (tanh(a + b), a + b)."""
    args = [Node.leaf(Op.ARG, a.tensor_type, 0), Node.leaf(Op.ARG, b.tensor_type, 1)]
    s = args[0] + args[1]
    f = Node.make(Op.FUSED, [a, b], Graph(tuple(args), (ur.tanh(s), s)))
    return proj(f, 0), proj(f, 1)


def loop_of(g: Graph) -> Node:
    (loop,) = [n for n in g.nodes() if n.op is Op.LOOP]
    return loop


# ---- rolled view ----------------------------------------------------------------------------------

def test_rolled_view_draws_the_loop_as_a_cluster_with_a_carry_back_edge():
    g = rnn(T=5)
    dot = Dot(ur.to_dot(g))
    (cluster,) = [c for c in dot.clusters if dot.clusters[c].get("label") == "loop ×5"]
    body_ops = [n for n in dot.nodes if dot.cluster_of[n] == cluster]
    assert {dot.nodes[n]["label"].split("\\n")[0] for n in body_ops} == {
        "matmul", "add", "tanh", "carry 0", "x[t]"}
    (tanh,) = [n for n in body_ops if dot.nodes[n]["label"] == "tanh\\nf32[2,4]"]
    (carry,) = [n for n in body_ops if dot.nodes[n]["label"].startswith("carry 0")]
    back = [e for e in dot.edges if e[:2] == (tanh, carry)]
    assert len(back) == 1 and back[0][2]["label"] == "carry" and back[0][2]["constraint"] == "false"
    # the initial carry and the sequence enter the cluster through their argument nodes
    (x,) = dot.labelled("x\\nf32[5,2,3]")
    assert dot.cluster_of[x] is None
    assert any(a == x and dot.nodes[b]["label"].startswith("x[t]") and e["label"] == "x[t]"
               for a, b, e in dot.edges)
    assert any(b == carry and e.get("label") == "init" for a, b, e in dot.edges)
    # the stacked outputs leave the cluster
    assert dot.labelled("ys 0\\nf32[5,2,4]")


def test_rolled_view_draws_each_param_once_as_a_yellow_ellipse_entering_the_loop():
    g = rnn(T=5)
    dot = Dot(ur.to_dot(g))
    cluster = next(iter(dot.clusters))
    for name, shape in (("Wx", "3,4"), ("Wh", "4,4"), ("b", "4")):
        (p,) = dot.labelled(f"{name}\\nf32[{shape}]")
        assert dot.nodes[p]["shape"] == "ellipse" and dot.nodes[p]["fillcolor"] == viz.NODE_STYLE[
            "param"]["fillcolor"]
        assert dot.cluster_of[p] is None
        users = [b for a, b, _ in dot.edges if a == p]
        assert users and all(dot.cluster_of[u] == cluster for u in users)


def test_labels_show_op_and_type_and_reverse_loops_say_so():
    text = ur.to_dot(rnn(T=7, reverse=True))
    assert 'label="matmul\\nf32[2,4]"' in text
    assert 'label="loop ×7 (reverse)"' in text
    assert 'xlabel="loss"' in text


def test_nested_loops_are_nested_clusters():
    X = ur.input("X_nested", (3, 4, 2, 5))
    W = ur.param("W", (5, 5))

    def outer(h, xs):
        def inner(h2, x_t):
            h2 = ur.tanh(x_t @ W + h2)
            return h2, h2
        return ur.scan(inner, h, xs)
    _, ys = ur.scan(outer, ur.zeros((2, 5)), X)
    dot = Dot(ur.to_dot(ur.graph(ur.sum(ys))))
    (outer_c,) = [c for c, a in dot.clusters.items() if a["label"] == "loop ×3"]
    (inner_c,) = [c for c, a in dot.clusters.items() if a["label"] == "loop ×4"]
    assert dot.parent[inner_c] == outer_c
    assert sum(1 for e in dot.edges if e[2].get("label") == "carry") == 2


# ---- unrolled view --------------------------------------------------------------------------------

def test_unrolled_view_has_one_column_per_step_and_params_once_outside():
    T = 6
    g = rnn(T=T)
    dot = Dot(ur.to_dot(g, view="unrolled", detail=True))  # every op (the default is compact)
    assert sorted(dot.step_clusters()) == sorted(f"cluster_t{t}" for t in range(T))
    for t in range(T):
        column = [n for n in dot.real_nodes() if dot.cluster_of[n] == f"cluster_t{t}"]
        labels = sorted(dot.nodes[n]["label"].split("\\n")[0] for n in column)
        # the cell, plus the x[t] slice and the reshape that stacks y_t
        assert labels == sorted([f"slice [{t},:,:]", "reshape", "matmul", "matmul", "add", "add",
                                 "tanh", "reshape"])
    for name in ("Wx", "Wh", "b"):
        (p,) = dot.labelled(name + "\\n")
        assert dot.cluster_of[p] is None
        steps = {dot.cluster_of[b] for a, b, _ in dot.edges if a == p}
        assert steps == {f"cluster_t{t}" for t in range(T)}
    # carried state: one red edge from each step to the next (written head -> tail, dir=back)
    carries = [(a, b) for a, b, e in dot.edges if e.get("dir") == "back"]
    assert len(carries) == T - 1
    assert {(dot.cluster_of[b], dot.cluster_of[a]) for a, b in carries} == {
        (f"cluster_t{t}", f"cluster_t{t + 1}") for t in range(T - 1)}
    # compact (the default): the x[t] slice and the stacking reshape are edges, the cell's
    # elementwise math one fused box per step
    dot = Dot(ur.to_dot(g, view="unrolled"))
    assert sorted(dot.step_clusters()) == sorted(f"cluster_t{t}" for t in range(T))
    for t in range(T):
        column = [n for n in dot.real_nodes() if dot.cluster_of[n] == f"cluster_t{t}"]
        assert sorted(dot.nodes[n]["label"].split("\\n")[0] for n in column) == [
            "add×2, tanh", "matmul", "matmul"]


def test_unrolled_view_unrolls_rolled_graphs_first():
    g = rnn(T=4)
    assert ur.to_dot(g, view="unrolled") == ur.to_dot(ur.unroll(g), view="unrolled")
    assert "loop ×" not in ur.to_dot(g, view="unrolled")


def test_long_sequences_are_summarized_above_max_nodes():
    T = 40
    g = ur.unroll(rnn(T=T))
    dot = Dot(ur.to_dot(g, view="unrolled", max_nodes=100))
    (ellipsis,) = dot.labelled("… ")
    hidden = int(re.search(r"… (\d+) steps …", dot.nodes[ellipsis]["label"]).group(1))
    shown = dot.step_clusters()
    assert "cluster_t0" in shown and f"cluster_t{T - 1}" in shown
    assert len(shown) + hidden == T and hidden > 0
    assert len(dot.real_nodes()) <= 100
    # the carried state runs into the ellipsis and out of it again; params reach hidden steps too
    assert any(b == ellipsis for a, b, _ in dot.edges)
    assert any(a == ellipsis for a, b, _ in dot.edges)
    (wx,) = dot.labelled("Wx\\n")
    assert (wx, ellipsis) in {(a, b) for a, b, _ in dot.edges}
    # raising max_nodes shows every step
    full = Dot(ur.to_dot(g, view="unrolled", max_nodes=10_000))
    assert len(full.step_clusters()) == T and not full.labelled("… ")


def test_stop_gradient_and_truncate_edges_are_dashed():
    dot = Dot(ur.to_dot(rnn(T=3, tag="x_sg", truncate=True), view="unrolled", detail=True))
    cuts = dot.labelled("stop_gradient")
    assert len(cuts) == 3
    for c in cuts:  # edges between columns are written head -> tail with dir=back
        into = [e for a, b, e in dot.edges if (b == c) != (e.get("dir") == "back" and a == c)]
        assert len(into) == 1 and into[0]["style"] == "dashed"
    # the rolled view dashes it too
    assert any(e.get("style") == "dashed" for _, _, e in Dot(ur.to_dot(rnn(T=3, tag="x_sg",
                                                                         truncate=True))).edges)
    # a node marked by the truncate pass: its incoming edges are dashed
    a = ur.input("a_trunc", (2, 2))
    cut = ur.neg(a)
    cut.role = "truncate"
    dot = Dot(ur.to_dot(ur.graph(ur.exp(cut))))
    (neg,) = dot.labelled("neg")
    assert [e["style"] for a_, b, e in dot.edges if b == neg] == ["dashed"]


def test_backward_nodes_have_their_own_colour():
    g = rnn(T=3, tag="x_bwd", reverse=True)
    for n in loop_of(g).arg.body.nodes():
        if n.op not in (Op.ARG, Op.CONST):
            n.role = "backward"
    for view in ("rolled", "unrolled"):
        dot = Dot(ur.to_dot(g, view=view, detail=True))  # compact puts tanh in a fused box
        tanh = dot.labelled("tanh")
        mul = dot.labelled("mul")  # the loss, built by the user: forward
        assert tanh and all(dot.nodes[n]["fillcolor"] == viz.ROLE_FILL["backward"] for n in tanh)
        assert all(dot.nodes[n]["fillcolor"] == viz.ROLE_FILL[None] for n in mul)


def test_fused_nodes_are_boxes_around_their_ops():
    a, b = ur.input("a_fused", (2, 3)), ur.input("b_fused", (2, 3))
    h, pre = fused_add_tanh(a, b)
    dot = Dot(ur.to_dot(ur.graph([ur.exp(h), pre])))
    (box,) = [c for c, at in dot.clusters.items() if at["label"].startswith("fused kernel (2 ops)")]
    (add,) = dot.labelled("add")
    (tanh,) = dot.labelled("tanh")
    assert dot.cluster_of[add] == box and dot.cluster_of[tanh] == box
    (na,) = dot.labelled("a_fused")
    (exp,) = dot.labelled("exp")
    edges = {(x, y) for x, y, _ in dot.edges}
    assert (na, add) in edges and (tanh, exp) in edges  # outside values wire straight to the ops
    assert dot.nodes[add].get("peripheries") is None  # the proj output is not drawn on its own


def test_fused_nodes_inside_loops_and_steps():
    x = ur.input("x_fused", (4, 2, 3))
    Wx, Wh = ur.param("Wx", (3, 4), 0.1), ur.param("Wh", (4, 4), 0.1)

    def step(h, x_t):
        h, pre = fused_add_tanh(x_t @ Wx, h @ Wh)
        return h, pre
    hT, ys = ur.scan(step, ur.zeros((2, 4)), x)
    g = ur.graph(ur.sum(ys) + ur.sum(hT))
    rolled = Dot(ur.to_dot(g))
    (loop_c,) = [c for c, at in rolled.clusters.items() if at["label"] == "loop ×4"]
    (box,) = [c for c, at in rolled.clusters.items() if at["label"].startswith("fused")]
    assert rolled.parent[box] == loop_c
    (tanh,) = rolled.labelled("tanh")
    (carry,) = rolled.labelled("carry 0")
    assert any(e[:2] == (tanh, carry) and e[2].get("label") == "carry" for e in rolled.edges)
    unrolled = Dot(ur.to_dot(g, view="unrolled", detail=True))
    boxes = [c for c, at in unrolled.clusters.items() if at["label"].startswith("fused")]
    assert sorted(unrolled.parent[c] for c in boxes) == [f"cluster_t{t}" for t in range(4)]
    # compact (the default): a fused kernel is one box in its step
    compact = Dot(ur.to_dot(g, view="unrolled"))
    boxes = compact.labelled("fused kernel (2 ops)")
    assert sorted(compact.cluster_of[b] for b in boxes) == [f"cluster_t{t}" for t in range(4)]
    assert not [c for c, at in compact.clusters.items() if at.get("label", "").startswith("fused")]


# ---- networkx -------------------------------------------------------------------------------------

def test_to_networkx_counts_and_attributes():
    g = rnn(T=5)
    G = ur.to_networkx(g)
    loop = loop_of(g)
    info = loop.arg
    top = toposort(list(g.inputs) + list(g.outputs))
    body = toposort(list(info.body.inputs) + list(info.body.outputs))
    assert G.number_of_nodes() == len(top) + len(body)
    kinds: dict[str, int] = {}
    for _, _, d in G.edges(data=True):
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    assert kinds["const"] == info.n_consts == 3
    assert kinds["carry"] == kinds["recurrence"] == info.n_carry == 1
    assert kinds["xs"] == info.n_xs == 1
    assert kinds["yield"] == 1  # h is both the new carry and y_t: one edge, positions (0, 1)
    n_data = sum(len(n.src) for n in top + body)
    assert sum(len(d["positions"]) for *_, d in G.edges(data=True) if d["kind"] == "data") == n_data

    loop_key = next(k for k, d in G.nodes(data=True) if d["op"] == "loop")
    (wx,) = [k for k, d in G.nodes(data=True) if d["name"] == "Wx"]
    assert G.nodes[wx] == {**G.nodes[wx], "op": "param", "shape": (3, 4), "dtype": "float32",
                           "depth": 0, "parent": None, "step": None, "role": None}
    assert G.nodes[loop_key]["shape"] == ((2, 4), (5, 2, 4))
    tanh = next(k for k, d in G.nodes(data=True) if d["op"] == "tanh")
    assert tanh.startswith(loop_key + "/")
    assert G.nodes[tanh]["depth"] == 1 and G.nodes[tanh]["parent"] == loop_key
    assert G.nodes[tanh]["label"] == "tanh\nf32[2,4]"
    (yield_edge,) = [(a, b, d) for a, b, d in G.edges(data=True) if d["kind"] == "yield"]
    assert yield_edge == (tanh, loop_key, {"kind": "yield", "positions": (0, 1)})
    assert {d["group"] for k, d in G.nodes(data=True) if d["op"] == "arg"} == {"const", "carry", "xs"}
    (wx_arg,) = [b for a, b, d in G.edges(data=True) if a == wx and d["kind"] == "const"]
    assert G.nodes[wx_arg]["group"] == "const"
    # dropping the recurrence edges leaves a DAG
    dag = nx.DiGraph((a, b) for a, b, d in G.edges(data=True) if d["kind"] != "recurrence")
    assert nx.is_directed_acyclic_graph(dag) and not nx.is_directed_acyclic_graph(G)
    assert G.graph["output_names"] == ("loss",) and len(G.graph["outputs"]) == 1
    assert sorted(G.nodes[k]["name"] for k in G.graph["inputs"]) == ["Wh", "Wx", "b", "x"]


def test_to_networkx_of_an_unrolled_graph_has_steps():
    T = 4
    G = ur.to_networkx(ur.unroll(rnn(T=T)))
    assert all(d["depth"] == 0 for _, d in G.nodes(data=True))
    tanh_steps = sorted(d["step"] for _, d in G.nodes(data=True) if d["op"] == "tanh")
    assert tanh_steps == list(range(T))
    assert nx.is_directed_acyclic_graph(G)
    # stable keys: the same graph gives the same keys
    assert list(G.nodes) == list(ur.to_networkx(ur.unroll(rnn(T=T))).nodes)


# ---- long graphs: iterative walks ------------------------------------------------------------------

def test_deep_graphs_do_not_recurse():
    x = ur.input("x_deep", (2,))
    y = x
    for _ in range(3000):
        y = ur.tanh(y)
    g = ur.graph(y)
    assert ur.to_dot(g).count("tanh") >= 3000
    assert ur.to_networkx(g).number_of_nodes() == 3001
    dot = Dot(ur.to_dot(rnn(T=300), view="unrolled"))
    assert len(dot.real_nodes()) <= 400 and dot.labelled("… ")


# ---- rendering -------------------------------------------------------------------------------------

@needs_dot
@pytest.mark.parametrize("suffix, magic", [(".svg", b"<svg"), (".png", b"\x89PNG")])
def test_draw_renders_files(tmp_path: Path, suffix: str, magic: bytes):
    g = rnn(T=3)
    for view in ("rolled", "unrolled"):
        out = ur.draw(g, tmp_path / f"{view}{suffix}", view=view)
        assert out == tmp_path / f"{view}{suffix}"
        assert magic in out.read_bytes()[:400]


@needs_dot
def test_draw_format_argument_and_graphviz_source(tmp_path: Path):
    g = rnn(T=3)
    out = ur.draw(g, tmp_path / "picture", format="svg")
    assert b"<svg" in out.read_bytes()[:400]
    source = ur.draw(g, view="unrolled")
    assert b"<svg" in source.pipe()[:400]


def test_draw_dot_suffix_writes_text_without_a_renderer(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    out = ur.draw(rnn(T=3), tmp_path / "g.dot")
    assert out.read_text(encoding="utf-8") == ur.to_dot(rnn(T=3))


def test_draw_without_dot_raises_a_clear_error(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no `dot`
    monkeypatch.setitem(sys.modules, "pygraphviz", None)  # and no bundled Graphviz
    with pytest.raises(RuntimeError, match="apt-get install graphviz") as err:
        ur.draw(rnn(T=3), tmp_path / "g.svg")
    assert "pip install pygraphviz" in str(err.value) and "to_dot" in str(err.value)
    assert not (tmp_path / "g.svg").exists()
    # the same without the graphviz Python package (dot is called directly)
    monkeypatch.setitem(sys.modules, "graphviz", None)
    with pytest.raises(RuntimeError, match="apt-get install graphviz"):
        ur.draw(rnn(T=3), tmp_path / "g.png")


def test_draw_falls_back_to_pygraphviz(tmp_path: Path, monkeypatch):
    class FakeAGraph:
        def __init__(self, string: str) -> None:
            self.string = string

        def draw(self, format: str, prog: str) -> bytes:
            return f"{prog}:{format}:{len(self.string)}".encode()

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "pygraphviz", type(sys)("pygraphviz"))
    sys.modules["pygraphviz"].AGraph = FakeAGraph  # type: ignore[attr-defined]
    out = ur.draw(rnn(T=3), tmp_path / "g.png")
    assert out.read_bytes().startswith(b"dot:png:")


@needs_dot
def test_render_without_the_graphviz_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "graphviz", None)
    assert b"<svg" in viz.render(ur.to_dot(rnn(T=2)), "svg")[:400]


def test_bad_arguments():
    with pytest.raises(ValueError, match="view must be one of"):
        ur.to_dot(rnn(T=2), view="sideways")
    with pytest.raises(ValueError, match="suffix"):
        ur.draw(rnn(T=2), "no_suffix")
    with pytest.raises(TypeError):
        ur.to_dot([1, 2])


def test_accepts_nodes_and_lists():
    x = ur.input("x_small", (3,))
    y = ur.exp(x)
    assert ur.to_dot(y) == ur.to_dot([y]) == ur.to_dot(ur.graph(y))
    assert ur.to_networkx(y).number_of_nodes() == 2


# ---- the module is a leaf --------------------------------------------------------------------------

def test_viz_imports_only_the_ir():
    tree = ast.parse(Path(viz.__file__).read_text())
    local = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
    assert local and all(m.split(".")[0] == "ir" for m in local), local
    absolute = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    absolute |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module}
    assert "numba" not in absolute and "unroll" not in absolute
