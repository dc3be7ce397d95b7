"""Core properties: unroll preserves meaning, verify accepts valid and rejects broken IR, walks are
iterative, nodes are interned, and bad DSL use gives errors that name the op, shapes and user line."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import unroll as ur
from strategies import evaluate, graphs, random_feeds, rnn_cells
from unroll.backends import numpy_ref
from unroll.ir import build as b
from unroll.ir.node import Graph, LoopInfo, Node, all_nodes, proj, rewrite, substitute, toposort
from unroll.ir.ops import Op, ShapeError, TensorType
from unroll.ir.text import parse, print_graph


def assert_same_values(g: Graph, h: Graph, feeds: dict[str, np.ndarray]) -> None:
    expected, found = evaluate(g, feeds), evaluate(h, feeds)
    assert len(expected) == len(found)
    for e, f in zip(expected, found):
        assert e.shape == f.shape and e.dtype == f.dtype
        np.testing.assert_allclose(f, e, rtol=1e-5, atol=1e-6)


# ---- unroll preserves meaning -------------------------------------------------------------------

@settings(max_examples=100)
@given(graphs(min_loops=1), st.integers(1, 5), st.integers(0, 2**16))
def test_unroll_preserves_values(g: Graph, factor: int, seed: int) -> None:
    ur.verify(g)
    feeds = random_feeds(g, seed)
    full = ur.unroll(g)
    ur.verify(full)
    assert not any(n.op is Op.LOOP for n in full.nodes())
    assert full.input_names == g.input_names and full.output_names == g.output_names
    assert_same_values(g, full, feeds)
    chunked = ur.unroll(g, factor=factor)
    ur.verify(chunked)
    assert chunked.input_names == g.input_names
    assert_same_values(g, chunked, feeds)


@given(graphs(dtype="float64", min_loops=1, max_loops=1), st.integers(2, 3))
def test_unroll_preserves_values_float64(g: Graph, factor: int) -> None:
    feeds = random_feeds(g, 1)
    assert_same_values(g, ur.unroll(g), feeds)
    assert_same_values(g, ur.unroll(g, factor=factor), feeds)


@given(rnn_cells(), st.integers(1, 4))
def test_unroll_rnn_cells(cell: tuple[Graph, dict], factor: int) -> None:
    g, feeds = cell
    ur.verify(g)
    for h in (ur.unroll(g), ur.unroll(g, factor=factor)):
        ur.verify(h)
        assert_same_values(g, h, feeds)
    ys, h_t = ur.compile(g, backend="numpy")(**feeds)
    T = g.outputs[0].shape[0]
    reverse = g.outputs[1].src[0].arg.reverse
    np.testing.assert_array_equal(h_t, ys[0 if reverse else T - 1])  # the cell returns h as y


@given(graphs(max_loops=0))
def test_verify_and_unroll_without_loops(g: Graph) -> None:
    ur.verify(g)
    assert ur.unroll(g) == g


def test_unroll_tags_steps_without_touching_shared_nodes() -> None:
    x = ur.input("tag_x", (3, 2))
    body_const = b.const(0.375, ())
    h, ys = ur.scan(lambda h, x_t: (ur.tanh(h * body_const + x_t),) * 2, ur.input("tag_h", (2,)), x)
    g = ur.graph(h, ys)
    before = print_graph(g)
    u = ur.unroll(g)
    steps = {n.step for n in u.nodes() if n.op is Op.TANH}
    assert steps == {0, 1, 2}
    assert body_const.step is None  # interned constants are shared: they belong to no step
    ur.unroll(g, factor=2)
    assert print_graph(g) == before  # the rolled graph's body nodes were not tagged


def test_unroll_keeps_unused_inputs() -> None:
    x = ur.input("keep_x", (3, 2))
    h, _ = ur.scan(lambda h, x_t: (h * 2.0, ()), ur.input("keep_h", (2,)), x)  # x_t unused
    g = ur.graph(h, names=["h"])
    u = ur.unroll(g)
    assert u.input_names == ["keep_h", "keep_x"] and u.output_names == ("h",)
    feeds = {"keep_x": np.ones((3, 2), np.float32), "keep_h": np.ones(2, np.float32)}
    np.testing.assert_array_equal(ur.compile(u, backend="numpy")(**feeds)[0], [8.0, 8.0])


# ---- verify rejects broken graphs ---------------------------------------------------------------

def arg(i: int, shape: tuple[int, ...]) -> Node:
    return Node.leaf(Op.ARG, TensorType(shape, "float32"), i)


def test_verify_rejects_body_closing_over_outer_value() -> None:
    x, outer = ur.input("cl_x", (2,)), ur.input("cl_outer", (2,))
    body = Graph((arg(0, (2,)),), (b.add(arg(0, (2,)), outer),))
    loop = Node.make(Op.LOOP, (x,), LoopInfo(body, 3, 0, 1))
    with pytest.raises(ur.VerifyError, match="a body uses a value from outside its loop") as info:
        ur.verify(ur.graph(proj(loop, 0)))
    assert "-->" in str(info.value) and '"cl_outer"' in str(info.value)


def test_verify_rejects_wrong_stored_type() -> None:
    x = ur.input("wt_x", (2, 3))
    bad = Node(Op.TANH, TensorType((3, 2), "float32"), (x,), None)  # bypasses Node.make
    bad.loc = "model.py:7"
    with pytest.raises(ur.VerifyError) as info:
        ur.verify(ur.graph(bad * 2.0))
    message = str(info.value)
    assert "stored type f32[3,2] differs from inferred f32[2,3]" in message
    assert "model.py:7" in message and "--> %1 = tanh %0 : f32[3,2]" in message


def test_verify_rejects_escaped_scan_placeholder() -> None:
    leaked: list[Node] = []

    def step(h: Node, x_t: Node) -> tuple[Node, Node]:
        leaked.append(h)
        return h + x_t, h

    x = ur.input("esc_x", (3, 2))
    ur.scan(step, ur.zeros((2,)), x)
    with pytest.raises(ur.VerifyError, match="placeholder escaped"):
        ur.verify(ur.graph(leaked[0] * 2.0))


def test_verify_rejects_bad_declarations() -> None:
    x, y = ur.input("decl_x", (2,)), ur.input("decl_y", (2,))
    with pytest.raises(ur.VerifyError, match="undeclared input"):
        ur.verify(Graph((x,), (x + y,)))
    with pytest.raises(ur.VerifyError, match="2 outputs but 1 output names"):
        ur.verify(Graph((x,), (x, x), ("a",)))
    body = Graph((arg(1, (2,)),), (arg(1, (2,)),))  # input 0 must be arg 0
    loop = Node.make(Op.LOOP, (x,), LoopInfo(body, 2, 0, 1))
    with pytest.raises(ur.VerifyError, match="body input 0 must be arg 0"):
        ur.verify(ur.graph(proj(loop, 0)))


def test_verify_error_shows_context_inside_a_body() -> None:
    x = ur.input("ctx_x", (2, 3))
    a0 = arg(0, (2, 3))
    bad = Node(Op.EXP, TensorType((6,), "float32"), (a0,), None)
    body = Graph((a0,), (a0, bad))
    loop = Node(Op.LOOP, (TensorType((2, 3), "float32"), TensorType((4, 6), "float32")), (x,),
                LoopInfo(body, 4, 0, 1))
    with pytest.raises(ur.VerifyError) as info:
        ur.verify(ur.graph(proj(loop, 1)))
    assert "--> %0 = exp %a0 : f32[6]" in str(info.value)


# ---- deep graphs: every walk is iterative -------------------------------------------------------

DEPTH = 20000


def test_deep_chain_walks_are_iterative() -> None:
    limit = sys.getrecursionlimit()
    x = ur.input("deep_x", (2,))
    node = x
    half = b.const(0.5, ())
    for i in range(DEPTH):  # Node.make with a loc: skips the (slow) user-line lookup of the DSL
        node = Node.make(Op.TANH, (node,), loc="chain") if i % 2 else Node.make(Op.MUL, (node, half), loc="chain")
    g = ur.graph(node)
    assert len(toposort(g.outputs)) == DEPTH + 2  # the input, the constant 0.5 and the chain
    ur.verify(g)
    y = ur.input("deep_y", (2,))
    (moved,) = substitute([node], {x: y})
    assert moved is not node and moved.src[0] is not node.src[0]
    (same,) = rewrite([node], lambda n, src: None)
    assert same is node
    assert ur.unroll(g) == g
    text = print_graph(g)
    assert text.count("\n") == DEPTH + 3  # and the return line
    assert parse(text) == g
    value = numpy_ref.evaluate(g, [np.ones(2, np.float32)])[0]
    assert np.all(np.isfinite(value))
    assert sys.getrecursionlimit() == limit


def test_deep_unrolled_loop() -> None:
    steps = 2000  # a chain of ~4000 nodes through the carries
    x = ur.input("long_x", (steps, 2))
    h, ys = ur.scan(lambda h, x_t: (ur.tanh(h + x_t),) * 2, ur.zeros((2,)), x)
    g = ur.graph(h, ys)
    u = ur.unroll(g)
    ur.verify(u)
    assert parse(print_graph(u)) == u
    feeds = {"long_x": np.full((steps, 2), 0.01, np.float32)}
    assert_same_values(g, u, feeds)


# ---- interning ----------------------------------------------------------------------------------

def test_interning_builds_one_node_per_expression() -> None:
    x, w = ur.input("int_x", (2, 3)), ur.param("int_w", (3, 4), init=0.5)
    first = ur.tanh(x @ w + 1.0)
    second = ur.tanh(x @ w + 1.0)
    assert first is second
    assert ur.input("int_x", (2, 3)) is x
    assert ur.tanh(x @ w + 2.0) is not first
    assert ur.input("int_x", (3, 2)) is not x  # the type is part of the identity
    assert ur.graph(first) == ur.graph(second)

    def cell(h: Node, x_t: Node) -> tuple[Node, Node]:
        return ur.tanh(h + x_t @ w), h

    xs = ur.input("int_xs", (5, 2, 3))
    loop_a = ur.scan(cell, ur.zeros((2, 4)), xs)[0]
    loop_b = ur.scan(cell, ur.zeros((2, 4)), xs)[0]
    assert loop_a is loop_b  # traced twice, the same loop node


# ---- errors of bad DSL use ----------------------------------------------------------------------

def test_wrong_matmul_in_scan_step_names_op_shapes_and_line() -> None:
    x, w = ur.input("bad_x", (5, 2, 3)), ur.param("bad_w", (4, 6))
    line = 0

    def step(h: Node, x_t: Node) -> tuple[Node, Node]:
        nonlocal line
        line = sys._getframe().f_lineno + 1
        y = x_t @ w
        return h, y

    with pytest.raises(ShapeError) as info:
        ur.scan(step, ur.zeros((2,)), x)
    message = str(info.value)
    assert "matmul" in message and "f32[2,3]" in message and "f32[4,6]" in message
    assert f"{__file__}:{line}" in message


def test_carry_changing_shape_is_reported() -> None:
    x = ur.input("cs_x", (5, 2))
    line = sys._getframe().f_lineno + 2
    with pytest.raises(ShapeError) as info:
        ur.scan(lambda h, x_t: (ur.concat([h, x_t]), h), ur.zeros((2,)), x)
    message = str(info.value)
    assert "carry 0 enters the step as f32[2] but step_fn returns f32[4]" in message
    assert f"{__file__}:{line}" in message


def test_mismatched_sequence_lengths_are_reported() -> None:
    a, c = ur.input("len_a", (5, 2)), ur.input("len_c", (4, 2))
    with pytest.raises(ShapeError, match=r"expected one sequence length, found \[4, 5\]") as info:
        ur.scan(lambda h, xs: (h, xs[0]), ur.zeros((2,)), (a, c))
    assert __file__ in str(info.value)
    with pytest.raises(ShapeError, match="pass length= when there are no sequences"):
        ur.scan(lambda h, _: (h, h), ur.zeros((2,)), None)
    with pytest.raises(ShapeError, match=r"found \[3, 5\]"):
        ur.scan(lambda h, x_t: (h, x_t), ur.zeros((2,)), a, length=3)


@pytest.mark.parametrize("shape,message", [
    ((-1, 5), "reshape: expected a shape with 32 elements for f32[4,8], found (-1, 5): the -1 has no whole "
              "size (32 is not a multiple of 5)"),
    ((5, 7), "reshape: expected a shape with 32 elements for f32[4,8], found (5, 7) (35 elements)"),
    ((0, -1), "found (0, -1): the -1 has no whole size (the others hold 0 elements)"),
    ((-1, -1), "reshape: expected dimensions >= 0 and at most one -1, found (-1, -1) for f32[4,8]"),
    ((-2, 16), "found (-2, 16) for f32[4,8]"),
])
def test_reshape_error_shows_the_shape_as_written(shape: tuple[int, ...], message: str) -> None:
    """Issue #18: the message shows what the user wrote, the element count and the input's shape,
    never the resolved [6, 5]."""
    x = ur.input("rs_x", (4, 8))
    line = sys._getframe().f_lineno + 2
    with pytest.raises(ShapeError) as info:
        ur.reshape(x, shape)
    text = str(info.value)
    assert message in text and "[6, 5]" not in text
    assert f"{__file__}:{line}" in text
    assert ur.reshape(x, (-1, 16)).shape == (2, 16) and x.reshape(np.int64(32)).shape == (32,)


def test_feed_errors_name_the_input() -> None:
    x, ids = ur.input("feed_x", (3, 2)), ur.input("feed_ids", (3,), "int32")
    fn = ur.compile(x * 2.0 + b.cast(ids, "float32").reshape(3, 1), backend="numpy")
    good = {"feed_x": np.ones((3, 2), np.float32), "feed_ids": np.arange(3, dtype=np.int32)}
    assert fn(**good).shape == (3, 2)
    with pytest.raises(ur.FeedError, match=r"missing 'feed_x' \(f32\[3,2\]\)"):
        fn(feed_ids=good["feed_ids"])
    with pytest.raises(ur.FeedError, match="unexpected 'feed_z'"):
        fn(**good, feed_z=1.0)
    with pytest.raises(ur.FeedError, match=r"input 'feed_x': expected shape \[3, 2\].*found \[2, 3\]"):
        fn(feed_x=np.ones((2, 3)), feed_ids=good["feed_ids"])
    with pytest.raises(ur.FeedError, match="input 'feed_ids': expected dtype int32.*found float64"):
        fn(feed_x=good["feed_x"], feed_ids=np.zeros(3))


KINKED_OPS = {Op.RELU, Op.ABS, Op.SIGN, Op.MAX, Op.MIN, Op.REDUCE_MAX, Op.STOP_GRADIENT, Op.WHERE,
              Op.CAST, Op.ARGMAX, Op.ONEHOT}


@given(graphs(smooth=True, min_loops=1))
def test_smooth_graphs_have_no_kinks(g: Graph) -> None:
    ops = {node.op for node, _ in all_nodes(g)}
    assert not ops & KINKED_OPS
    assert all(n.dtype.startswith("float") for n in g.inputs)
    feeds = random_feeds(g, 0)
    assert all(np.all(np.isfinite(v)) for v in evaluate(g, feeds))
