"""Pictures of gradient graphs (unroll.viz): gradient outputs named after their parameters, the
forward loop drawn once, the compact unrolled view (fused boxes per step, forward steps left to
right, backward steps under them right to left), step clusters for graphs unrolled before drawing,
and the legend. Also makes the README's pictures:

    python tests/test_viz_backward.py            # rewrites docs/images/rnn_*.png
"""

from __future__ import annotations

import re
import shutil
import struct
import sys
from pathlib import Path

import pytest

import unroll as ur
from unroll import cli, nn, viz
from unroll.ir.node import Graph
from unroll.ir.ops import Op

sys.path.insert(0, str(Path(__file__).parent))
from test_viz import Dot  # noqa: E402  (the DOT reader for the writer's own output)

HAS_DOT = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not HAS_DOT, reason="Graphviz's `dot` is not installed")
IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"
PARAMS = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


# ---- models ---------------------------------------------------------------------------------------

def torch_rnn(T: int = 4, B: int = 1, I: int = 2, H: int = 3, kind=nn.RNN, tag: str = "x"):
    """What `unroll draw rnn --view backward` draws: a PyTorch-style RNN, MSE on every step."""
    model = kind(I, H)
    x = ur.input(tag, (T, B, I))
    out, _ = model(x)
    loss = nn.mse(out, ur.input("y", out.shape))
    return model, x, loss


def backward_graph(T: int = 4, kind=nn.RNN, **kw) -> Graph:
    model, _, loss = torch_rnn(T, kind=kind)
    return Graph.of([loss, *ur.grad(loss, model.parameters(), **kw)])


def readme_rnn(T: int = 4, B: int = 1, I: int = 3, H: int = 4) -> tuple[Graph, Graph]:
    """The tanh RNN of the README's "Your own cell" with loss sum(h_t): the forward graph and the
    graph of the loss and its gradients, as the README's pictures draw them."""
    x = ur.input("x", (T, B, I))
    W_x, W_h, b = ur.param("W_x", (I, H), 0.1), ur.param("W_h", (H, H), 0.1), ur.param("b", (H,))

    def step(h, x_t):
        h = ur.tanh(x_t @ W_x + h @ W_h + b)
        return h, h
    _, hs = ur.scan(step, ur.zeros((B, H)), x)
    loss = ur.sum(hs)
    return ur.graph(loss, names=["L"]), ur.graph(loss, *ur.grad(loss, [W_x, W_h, b]))


# name, graph ("forward" or "backward"), view
README_PICTURES = (("rnn_rolled", "forward", "rolled"), ("rnn_unrolled", "forward", "unrolled"),
                   ("rnn_backward_unrolled", "backward", "unrolled"))


def write_readme_pictures(folder: Path = IMAGES) -> list[Path]:
    forward, backward = readme_rnn()
    graphs = {"forward": forward, "backward": backward}
    return [ur.draw(graphs[g], folder / f"{name}.png", view=view) for name, g, view in README_PICTURES]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def labels_of(dot: Dot) -> list[str]:
    return [a.get("label", "") for a in dot.nodes.values()]


def first_lines(dot: Dot, nodes: list[str]) -> list[str]:
    return sorted(dot.nodes[n]["label"].split("\\n")[0] for n in nodes)


# ---- gradient outputs are named after their parameters --------------------------------------------

@pytest.mark.parametrize("view", ["rolled", "unrolled"])
def test_gradient_outputs_are_named_after_their_parameters(view):
    text = ur.to_dot(backward_graph(), view=view)
    for p in PARAMS:
        assert f"∂L/∂{p}" in text
    assert "output 1" not in text and "output 4" not in text
    # the loss is L
    assert re.search(r'(xlabel="L"|label="L\\n)', text)


def test_output_labels_match_parameters_by_identity_not_shape():
    model, x, loss = torch_rnn(tag="x_labels")
    params = list(model.parameters())
    # bias_ih_l0 and bias_hh_l0 have one type: only the rebuilt gradient nodes tell them apart
    assert params[2].type == params[3].type
    named = ["L", *(f"∂L/∂{p}" for p in PARAMS)]
    assert viz.output_labels(Graph.of([loss, *ur.grad(loss, params)])) == named
    # any order of wrt, a subset, another policy, value_and_grad, an input
    shuffled = [params[3], params[0], params[2], params[1]]
    assert viz.output_labels(Graph.of([loss, *ur.grad(loss, shuffled)]))[1:] == [
        f"∂L/∂{p.name}" for p in shuffled]
    assert viz.output_labels(Graph.of([loss, *ur.grad(loss, params[2:])]))[1:] == [
        "∂L/∂bias_ih_l0", "∂L/∂bias_hh_l0"]
    assert viz.output_labels(Graph.of([loss, *ur.grad(loss, params, policy=ur.Recompute())]))[1:] == [
        f"∂L/∂{p}" for p in PARAMS]
    value, grads = ur.value_and_grad(loss, params)
    assert viz.output_labels(Graph.of([value, *grads])) == named
    assert viz.output_labels(Graph.of([loss, ur.grad(loss, x)])) == ["L", "∂L/∂x_labels"]
    # names the user gave win; graphs without gradients keep "output k"
    assert viz.output_labels(ur.graph(loss, *ur.grad(loss, params), names=list("abcde"))) == list("abcde")
    assert viz.output_labels(Graph.of([loss, ur.exp(loss)])) == ["output 0", "output 1"]


def test_one_node_that_is_the_gradient_of_two_parameters():
    a, b = ur.param("a_twice", (3,)), ur.param("b_twice", (3,))
    loss = ur.sum(ur.tanh(ur.input("x_twice", (3,)) + a + b))
    ga, gb = ur.grad(loss, [a, b])
    assert ga is gb  # interned: one node
    assert viz.output_labels(Graph.of([loss, ga, gb])) == ["L", "∂L/∂a_twice", "∂L/∂b_twice"]
    assert viz.output_labels(Graph.of([loss, ga])) == ["L", "∂L/∂a_twice = ∂L/∂b_twice"]


def test_the_cli_draws_gradient_names(tmp_path, capsys):
    path = tmp_path / "b.dot"
    assert cli.main(["draw", "rnn", "--view", "backward", "--unrolled", "-o", str(path)]) == 0
    text = path.read_text(encoding="utf-8")
    assert all(f"∂L/∂{p}" in text for p in PARAMS)


# ---- what runs: the forward loop once ----------------------------------------------------------------

def test_rolled_gradient_view_draws_the_forward_loop_once():
    g = backward_graph(T=4)
    forward_loops = [n for n in g.nodes() if n.op is Op.LOOP and not n.arg.reverse]
    assert len(forward_loops) == 2  # the loss reads the user's loop, the gradients its extension
    dot = Dot(ur.to_dot(g))
    loops = sorted(a["label"] for c, a in dot.clusters.items() if a.get("label", "").startswith("loop"))
    assert loops == ["loop ×4", "loop ×4 (reverse) · backward"]
    # as ur.compile runs it; a forward graph is unchanged
    forward, _ = readme_rnn()
    assert viz._merged(forward) is forward


# ---- the compact unrolled view ----------------------------------------------------------------------

def test_compact_backward_view_is_much_smaller_than_the_detailed_one():
    g = backward_graph(T=4)
    compact = Dot(ur.to_dot(g, view="unrolled"))
    detail = Dot(ur.to_dot(g, view="unrolled", detail=True))
    assert ur.to_dot(g, view="unrolled", compact=False) == ur.to_dot(g, view="unrolled", detail=True)
    visible = [e for e in compact.edges if e[2].get("style") != "invis"]
    visible_detail = [e for e in detail.edges if e[2].get("style") != "invis"]
    assert len(compact.real_nodes()) * 2 < len(detail.real_nodes())
    assert len(visible) * 2 < len(visible_detail)
    with pytest.raises(ValueError, match="contradicts"):
        ur.to_dot(g, view="unrolled", detail=True, compact=True)


def test_compact_steps_hold_the_cell_as_one_fused_box():
    dot = Dot(ur.to_dot(backward_graph(T=4), view="unrolled"))
    for t in range(4):
        forward = [n for n in dot.real_nodes() if dot.cluster_of[n] == f"cluster_t{t}"]
        # x_t W_ih^T, h W_hh^T, and the adds and tanh of the cell as one box
        assert first_lines(dot, forward) == ["add×3, tanh", "matmul", "matmul"]
        (box,) = [n for n in forward if dot.nodes[n]["label"].startswith("add×3")]
        assert dot.nodes[box]["color"] == viz.NODE_STYLE["fused"]["color"]
        assert dot.nodes[box]["fillcolor"] == viz.ROLE_FILL[None]
        backward = [n for n in dot.real_nodes() if dot.cluster_of[n] == f"cluster_t{t}_bw"]
        boxes = [n for n in backward if dot.nodes[n].get("color") == viz.NODE_STYLE["fused"]["color"]]
        assert len(boxes) == 1 and dot.nodes[boxes[0]]["fillcolor"] == viz.ROLE_FILL["backward"]
        # dW_ih, dW_hh, dh (none at t = 0: the initial state is a constant)
        assert [dot.nodes[n]["label"].split("\\n")[-2] for n in backward].count("matmul") == (3 if t else 2)
    # no data movement is drawn as a node, and nothing nobody reads (the stacked residuals)
    assert not [l for l in labels_of(dot) if l.startswith(("slice", "reshape", "transpose\\nf32[1"))]


def test_forward_reads_left_to_right_and_backward_right_to_left():
    dot = Dot(ur.to_dot(backward_graph(T=4), view="unrolled"))
    assert sorted(dot.step_clusters()) == [f"cluster_t{t}" for t in range(4)]
    assert sorted(c for c in dot.clusters if c.endswith("_bw")) == [f"cluster_t{t}_bw" for t in range(4)]

    def step(node: str) -> tuple[int, str] | None:
        m = re.fullmatch(r"cluster_t(\d+)(_bw)?", dot.cluster_of.get(node) or "")
        return (int(m.group(1)), "bw" if m.group(2) else "fw") if m else None

    across = []
    for a, b, e in dot.edges:
        if e.get("style") == "invis":
            continue
        src, dst = (b, a) if e.get("dir") == "back" else (a, b)  # dir=back: written reversed
        ps, pd = step(src), step(dst)
        if ps and pd and ps != pd and ps[1] == pd[1]:
            across.append((ps, pd))
    forward = {(s[0], d[0]) for s, d in across if s[1] == "fw"}
    backward = {(s[0], d[0]) for s, d in across if s[1] == "bw"}
    assert forward == {(t, t + 1) for t in range(3)}   # the hidden state: t -> t+1
    assert backward == {(t + 1, t) for t in range(3)}  # the carried gradients: t+1 -> t
    # the backward step t hangs under the forward step t (an invisible, weighted edge)
    for t in range(4):
        assert any(step(a) == (t, "fw") and b == f"t{t}_bw_anchor" and e.get("weight")
                   for a, b, e in dot.edges)


def test_backward_steps_name_the_weights_they_read():
    dot = Dot(ur.to_dot(backward_graph(T=4), view="unrolled"))
    (w,) = [n for n, a in dot.nodes.items() if a.get("label", "").startswith("weight_hh_l0\\n")]
    assert all(not (dot.cluster_of[b] or "").endswith("_bw") for a, b, _ in dot.edges if a == w)
    stubs = [n for n, a in dot.nodes.items() if a.get("label") == "weight_hh_l0"]
    assert {dot.cluster_of[n] for n in stubs} >= {f"cluster_t{t}_bw" for t in range(1, 4)}


def test_compact_truncation_edges_stay_dashed():
    x = ur.input("x_cut", (3, 1, 2))
    W, U = ur.param("W_cut", (2, 3), 0.1), ur.param("U_cut", (3, 3), 0.1)

    def step(h, x_t):
        h = ur.tanh(x_t @ W + ur.stop_gradient(h) @ U)
        return h, h
    _, hs = ur.scan(step, ur.zeros((1, 3)), x)
    loss = ur.sum(hs)
    dot = Dot(ur.to_dot(ur.graph(loss, *ur.grad(loss, [W, U])), view="unrolled"))
    forward = ("cluster_t0", "cluster_t1", "cluster_t2")
    cuts = [c for c in dot.labelled("stop_gradient") if dot.cluster_of[c] in forward]
    assert len(cuts) == 3  # (the backward steps recompute theirs from the saved state)
    into = [e for c in cuts for a, b, e in dot.edges if (b == c) != (e.get("dir") == "back" and a == c)]
    assert len(into) == 2 and all(e["style"] == "dashed" for e in into)  # t=0 reads the constant 0


def test_recomputing_policies_still_get_fused_boxes():
    # Recompute: the backward steps rebuild forward values; interned nodes are shared with the
    # forward steps, and grouping must not make a cycle of boxes
    dot = Dot(ur.to_dot(backward_graph(T=3, kind=nn.LSTM, policy=ur.Recompute()), view="unrolled"))
    for t in range(3):
        assert any(a.get("color") == viz.NODE_STYLE["fused"]["color"]
                   and dot.cluster_of[n] == f"cluster_t{t}_bw" for n, a in dot.nodes.items())


def test_compact_summary_of_long_backward_graphs():
    g = backward_graph(T=30, kind=nn.LSTM)
    dot = Dot(ur.to_dot(g, view="unrolled", max_nodes=120))
    (ellipsis,) = dot.labelled("… ")
    assert len(dot.real_nodes()) <= 120
    assert {"cluster_t0", "cluster_t29", "cluster_t0_bw", "cluster_t29_bw"} <= set(dot.clusters)
    assert any(b == ellipsis for _, b, _ in dot.edges)


# ---- graphs unrolled before drawing -----------------------------------------------------------------

def test_pre_unrolled_graphs_are_drawn_with_step_clusters():
    forward, backward = readme_rnn()
    for g in (forward, backward):
        unrolled = ur.unroll(g)
        text = ur.to_dot(unrolled)  # the default (rolled) view
        dot = Dot(text)
        assert sorted(dot.step_clusters()) == [f"cluster_t{t}" for t in range(4)]
        assert text == ur.to_dot(unrolled, view="unrolled")
    assert sorted(c for c in Dot(ur.to_dot(ur.unroll(backward))).clusters if c.endswith("_bw")) == [
        f"cluster_t{t}_bw" for t in range(4)]
    # detail=True keeps every op in the steps
    detail = Dot(ur.to_dot(ur.unroll(forward), detail=True))
    step2 = [n for n in detail.real_nodes() if detail.cluster_of[n] == "cluster_t2"]
    assert "tanh" in first_lines(detail, step2)


# ---- the legend ---------------------------------------------------------------------------------------

def legend_of(text: str) -> list[str] | None:
    m = re.search(r'"legend" \[.*label=<(.*)>', text)
    if m is None:
        return None
    cells = re.findall(r"<TD[^>]*>(.*?)</TD>", m.group(1))
    return [re.sub(r"<[^>]+>", "", c).replace("- - - &gt;", "").strip() for c in cells][1:]


def test_legend_lists_what_the_picture_shows():
    g = backward_graph(T=3)
    assert legend_of(ur.to_dot(g, view="unrolled")) == ["forward op", "backward op", "fused kernel"]
    assert legend_of(ur.to_dot(g, view="unrolled", detail=True)) == ["forward op", "backward op"]
    assert legend_of(ur.to_dot(g)) == ["forward op", "backward op"]
    assert legend_of(ur.to_dot(g, view="unrolled", legend=False)) is None
    forward, _ = readme_rnn()
    assert legend_of(ur.to_dot(forward)) is None  # one kind only: no legend
    assert legend_of(ur.to_dot(forward, view="unrolled")) == ["forward op", "fused kernel"]
    # truncation
    x = ur.input("x_legend", (3, 1, 2))
    W = ur.param("W_legend", (2, 2), 0.1)
    _, hs = ur.scan(lambda h, x_t: (ur.tanh(x_t @ W + ur.stop_gradient(h)),) * 2, ur.zeros((1, 2)), x)
    loss = ur.sum(hs)
    text = ur.to_dot(ur.graph(loss, ur.grad(loss, W)), view="unrolled")
    assert legend_of(text) == ["forward op", "backward op", "truncated gradient", "fused kernel"]


# ---- the README's pictures ----------------------------------------------------------------------------

@needs_dot
def test_readme_backward_picture_is_readable_at_a_glance():
    _, backward = readme_rnn()
    width, height = png_size(viz.render(ur.to_dot(backward, view="unrolled"), "png"))
    assert max(width, height) < 1600
    width, height = png_size(viz.render(ur.to_dot(backward_graph(T=4), view="unrolled"), "png"))
    assert max(width, height) < 1800  # `unroll draw rnn --view backward --unrolled`


def test_readme_pictures_exist_with_their_names():
    readme = (IMAGES.parent.parent / "README.md").read_text(encoding="utf-8")
    for name, _, _ in README_PICTURES:
        assert f"docs/images/{name}.png" in readme
        assert max(png_size((IMAGES / f"{name}.png").read_bytes())) < 2000


if __name__ == "__main__":
    for path in write_readme_pictures(Path(sys.argv[1]) if len(sys.argv) > 1 else IMAGES):
        print(path, "x".join(map(str, png_size(path.read_bytes()))))
