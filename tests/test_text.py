"""The textual IR: parse(print(g)) == g on random graphs, golden text, every op, side data, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import unroll as ur
from strategies import evaluate, graphs, random_feeds, rnn_cells
from unroll.ir import build as b
from unroll.ir.node import Graph, Node, all_nodes, proj
from unroll.ir.ops import Op, TensorType
from unroll.ir.text import ParseError, parse, print_graph, print_node_context


def roundtrip(g: Graph) -> None:
    text = print_graph(g)
    back = parse(text)
    assert back == g, text
    assert print_graph(back) == text  # stable
    assert parse(print_graph(g, locs=True)) == g


# ---- round trips over random graphs -------------------------------------------------------------

@settings(max_examples=80)
@given(graphs())
def test_roundtrip_random_graphs(g: Graph) -> None:
    roundtrip(g)


@settings(max_examples=40)
@given(graphs(min_loops=1, dtype="float64"))
def test_roundtrip_random_loops_float64(g: Graph) -> None:
    roundtrip(g)


@given(graphs(min_loops=1), st.integers(1, 3))
def test_roundtrip_after_unroll(g: Graph, factor: int) -> None:
    roundtrip(ur.unroll(g))
    roundtrip(ur.unroll(g, factor=factor))


@given(rnn_cells())
def test_roundtrip_rnn_cells(cell: tuple[Graph, dict]) -> None:
    g, feeds = cell
    roundtrip(g)
    for a, c in zip(evaluate(g, feeds), evaluate(parse(print_graph(g)), feeds)):
        np.testing.assert_array_equal(a, c)


# ---- golden text --------------------------------------------------------------------------------

def golden_rnn() -> Graph:
    x = ur.input("golden_x", (4, 2, 3))
    h0 = ur.input("golden_h0", (2, 5))
    w_ih = ur.param("weight_ih_l0", (3, 5), init=0.125)
    w_hh = ur.param("weight_hh_l0", (5, 5), init=0.125)
    bias = ur.param("bias_l0", (5,), init="zeros")

    def cell(h: Node, x_t: Node) -> tuple[Node, Node]:
        h_new = ur.tanh(x_t @ w_ih + h @ w_hh + bias)
        return h_new, h_new

    h_n, ys = ur.scan(cell, h0, x)
    return ur.graph(ur.mean(ys ** 2), h_n, names=["loss", "h_n"])


GOLDEN_RNN = """\
%0 = param "weight_ih_l0" init=uniform:0.125 : f32[3,5]
%1 = param "weight_hh_l0" init=uniform:0.125 : f32[5,5]
%2 = param "bias_l0" init=zeros : f32[5]
%3 = input "golden_h0" : f32[2,5]
%4 = input "golden_x" : f32[4,2,3]
%5 = loop length=4 reverse=false consts(%0, %1, %2) carry(%3) xs(%4) : (f32[2,5], f32[4,2,5]) {
  ^body(%a0: f32[3,5], %a1: f32[5,5], %a2: f32[5], %a3: f32[2,5], %a4: f32[2,3]):
    %6 = matmul %a4, %a0 : f32[2,5]
    %7 = matmul %a3, %a1 : f32[2,5]
    %8 = add %6, %7 : f32[2,5]
    %9 = add %8, %a2 : f32[2,5]
    %10 = tanh %9 : f32[2,5]
    return %10, %10
}
%11 = proj %5 #1 : f32[4,2,5]
%12 = const 2.0 : f32[]
%13 = pow %11, %12 : f32[4,2,5]
%14 = sum %13 axes=(0,1,2) keepdims=false : f32[]
%15 = const 0.025 : f32[]
%16 = mul %14, %15 : f32[]
%17 = proj %5 #0 : f32[2,5]
return %16 as "loss", %17 as "h_n"
"""


def _no_roles(text: str) -> str:
    """Role comments are side data on interned (shared) nodes: other tests may have set them."""
    import re
    return re.sub(r"  # role \w+", "", text)


def test_golden_rnn_loop() -> None:
    g = golden_rnn()
    assert _no_roles(print_graph(g)) == GOLDEN_RNN
    assert _no_roles(str(g)) == GOLDEN_RNN
    assert parse(GOLDEN_RNN) == g
    assert _no_roles(print_graph(golden_rnn())) == GOLDEN_RNN  # building twice prints the same text


GOLDEN_NESTED = """\
%0 = input "golden_s" : f32[3,2]
%1 = const 0.0 : f32[2]
%2 = loop length=3 reverse=true consts() carry(%1) xs(%0) : (f32[2], f32[3,2]) {
  ^body(%a0: f32[2], %a1: f32[2]):
    %3 = loop length=2 reverse=true consts(%a1) carry(%a0) xs() : (f32[2]) {
      ^body(%a0: f32[2], %a1: f32[2]):
        %4 = const 0.75 : f32[]
        %5 = mul %a1, %4 : f32[2]
        %6 = add %5, %a0 : f32[2]
        return %6
    }
    %7 = proj %3 #0 : f32[2]
    %8 = sigmoid %7 : f32[2]
    return %7, %8
}
%9 = proj %2 #0 : f32[2]
%10 = proj %2 #1 : f32[3,2]
%11 = loop length=3 reverse=false consts() carry() xs(%0) : (f32[3,2]) {
  ^body(%a0: f32[2]):
    %12 = const 1.25 : f32[]
    %13 = sub %a0, %12 : f32[2]
    %14 = relu %13 : f32[2]
    return %14
}
%15 = proj %11 #0 : f32[3,2]
return %9, %10, %15
"""


def test_golden_nested_reverse_no_xs_no_carry() -> None:
    s = ur.input("golden_s", (3, 2))

    def outer(c: Node, s_t: Node) -> tuple[Node, Node]:
        acc, _ = ur.scan(lambda acc, _: (acc * 0.75 + s_t, ()), c, None, length=2, reverse=True)
        return acc, ur.sigmoid(acc)

    c, ys = ur.scan(outer, ur.zeros((2,)), s, reverse=True)
    _, relus = ur.scan(lambda carry, s_t: ((), ur.relu(s_t - 1.25)), (), s)
    g = ur.graph(c, ys, relus)
    assert _no_roles(print_graph(g)) == GOLDEN_NESTED
    assert parse(GOLDEN_NESTED) == g


# ---- every op, dtypes, constants ----------------------------------------------------------------

def every_op_graph() -> Graph:
    x = ur.input("ops_x", (2, 3))
    ids = ur.input("ops_ids", (2,), "int64")
    mask = ur.input("ops_mask", (2, 3), "bool")
    w = ur.param("ops_w", (3, 3), init="glorot", dtype="float32")
    outs = [fn(x) for fn in (b.neg, b.exp, b.log, b.tanh, b.sigmoid, b.relu, b.sqrt, b.abs, b.sign,
                             b.recip, b.log1p, b.sin, b.cos, b.stop_gradient)]
    outs += [fn(x, 0.5) for fn in (b.add, b.sub, b.mul, b.div, b.pow, b.maximum, b.minimum)]
    outs += [b.where(fn(x, w[:2]), x, 0.0) for fn in (b.less, b.less_equal, b.greater, b.greater_equal,
                                                     b.equal, b.not_equal)]
    outs += [b.where(mask, x, -x), b.cast(b.cast(x, "int32"), "float32"), b.cast(ids, "float64")]
    outs += [x @ w, b.sum(x, 1, keepdims=True), b.max(x, (0, 1)), b.cast(b.argmax(x, 1), "float32"),
             b.onehot(ids, 4), x.reshape(3, 2), b.transpose(x), b.broadcast_to(x, (2, 2, 3)),
             b.concat([x, x, x], 1), x[:, 1::2], b.pad(x, [(1, 0), (0, 2)]), ids + 1, b.equal(ids, 2)]
    # a fused kernel (built by a later pass; made by hand here): two outputs over two args
    a0, a1 = (Node.leaf(Op.ARG, TensorType((2, 3), "float32"), i) for i in range(2))
    kernel = Graph((a0, a1), (b.tanh(a0 * a1), a0 + 1.0))
    fused = Node.make(Op.FUSED, (x, b.exp(x)), kernel)
    outs += [proj(fused, 0), proj(fused, 1)]
    h, ys = ur.scan(lambda h, x_t: (h + x_t, ur.cast(h, "float64")), ur.zeros((3,)), x)
    outs += [h, ys]
    return ur.graph(outs)


def test_every_op_roundtrips() -> None:
    g = every_op_graph()
    ops = {node.op for node, _ in all_nodes(g)}
    assert ops == set(Op), f"not covered: {set(Op) - ops}"
    text = print_graph(g)
    for op in Op:
        assert f" {op.value} " in text or f" {op.value}\n" in text or f"= {op.value}" in text
    for dtype in ("f32[", "f64[", "i32[", "i64[", "bool["):
        assert dtype in text
    roundtrip(g)


def test_every_op_parses_from_fresh_text() -> None:
    """Text whose nodes are not alive any more builds new nodes that compute the same values."""
    text = print_graph(every_op_graph()).replace('"ops_', '"fresh_')
    g = parse(text)
    assert print_graph(g) == text
    feeds = random_feeds(g, 3)
    feeds["fresh_x"] = np.abs(feeds["fresh_x"]) + 0.1  # log/sqrt stay real
    ref = ur.graph(every_op_graph().outputs)  # the same graph with the old names
    old_feeds = {k.replace("fresh_", "ops_"): v for k, v in feeds.items()}
    for a, c in zip(evaluate(g, feeds), evaluate(ref, old_feeds)):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("value", [0.1, 1 / 3, -2.5e-300, 5e-324, 1e300, 123456789.123, math.pi,
                                   float("inf"), float("-inf"), -0.0])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_float_constants_roundtrip_exactly(value: float, dtype: str) -> None:
    g = ur.graph(b.const(value, (2,), dtype) + ur.input("c", (2,), dtype))
    roundtrip(g)
    node = parse(print_graph(g)).outputs[0].src[0]
    assert node.op is Op.CONST and repr(node.arg) == repr(float(value)) or node.arg == value


def test_int_and_bool_constants() -> None:
    i = ur.input("int_in", (3,), "int32")
    g = ur.graph(i * 7, b.const(True, (3,), "bool"), b.const(-4, (), "int64"))
    text = print_graph(g)
    assert "const 7 : i32[]" in text and "const true : bool[3]" in text and "const -4 : i64[]" in text
    roundtrip(g)


def test_nan_constant_parses() -> None:
    g = ur.graph(b.const(float("nan"), (2,)) + ur.input("n", (2,)))
    back = parse(print_graph(g))  # NaN != NaN, so this is a new node, with the same text
    assert print_graph(back) == print_graph(g)
    assert math.isnan(back.outputs[0].src[0].arg)


# ---- inputs, outputs, names ---------------------------------------------------------------------

def test_input_order_unused_inputs_and_output_names() -> None:
    x, y, z = ur.input("io_x", (2,)), ur.input("io_y", (2,)), ur.param("io_z", (2,), init="normal:0.5")
    g = Graph((z, y, x), (x + y, x * 2.0), ("sum", 'we"ird name'))  # z is declared but unused
    text = print_graph(g)
    assert text.index('"io_z"') < text.index('"io_y"') < text.index('"io_x"')
    assert 'as "we\\"ird name"' in text
    roundtrip(g)
    assert parse(text).input_names == ["io_z", "io_y", "io_x"]


def test_body_printed_alone_roundtrips() -> None:
    loop = golden_rnn().outputs[1].src[0]
    body = loop.arg.body
    text = print_graph(body)
    assert text.startswith("^body(%a0: f32[3,5]")
    assert parse(text) == body


def test_zero_outputs_and_inputs() -> None:
    g = Graph((), ())
    assert print_graph(g) == "return\n"
    assert parse("return") == g
    c = ur.graph(b.const(1.5, (2,)))
    roundtrip(c)


# ---- side data ----------------------------------------------------------------------------------

def test_step_role_and_locs_are_comments() -> None:
    x = ur.input("side_x", (2,))
    h, _ = ur.scan(lambda h, _: (ur.tanh(h + x), ()), ur.input("side_h", (2,)), None, length=2)
    u = ur.unroll(ur.graph(h))
    text = print_graph(u)
    assert "  # step 0" in text and "  # step 1" in text
    assert " at " not in text and __file__ not in text  # no machine-dependent paths by default
    with_locs = print_graph(u, locs=True)
    # (the body's interned nodes keep the location of whichever test built them first)
    assert "# step 1, at " in with_locs and ".py:" in with_locs
    assert parse(with_locs) == u

    stopped = b.stop_gradient(x * 3.0)
    stopped.role = stopped.role or "truncate"
    assert f"# role {stopped.role}" in print_graph(ur.graph(stopped))


def test_parse_restores_side_data_on_new_nodes() -> None:
    text = """
        %0 = input "side_new" : f32[2]
        %1 = tanh %0 : f32[2]  # step 4, role backward, at model.py:12
        %2 = neg %1 : f32[2]   # a free-form comment
        return %2
    """
    g = parse(text)
    node = g.outputs[0].src[0]
    assert (node.step, node.role, node.loc) == (4, "backward", "model.py:12")
    assert g.outputs[0].step is None and g.outputs[0].loc == "<ir>:4"


def test_handwritten_text_with_custom_names() -> None:
    text = """
    # a cumulative sum, written by hand
    %xs = input "hand_xs" : f32[3,2]
    %zero = const 0.0 : f32[2]
    %loop = loop length=3 reverse=false consts() carry(%zero) xs(%xs) : (f32[2], f32[3,2]) {
      ^body(%acc: f32[2], %x: f32[2]):
        %next = add %acc, %x : f32[2]
        return %next, %next
    }
    %total = proj %loop #0 : f32[2]
    %run = proj %loop #1 : f32[3,2]
    return %total as "total", %run as "running"
    """
    g = parse(text)
    ur.verify(g)
    xs = np.arange(6, dtype=np.float32).reshape(3, 2)
    total, running = ur.compile(g, backend="numpy")(hand_xs=xs)
    np.testing.assert_array_equal(total, xs.sum(0))
    np.testing.assert_array_equal(running, np.cumsum(xs, 0))


# ---- context for verify errors ------------------------------------------------------------------

def test_print_node_context_marks_the_node() -> None:
    g = golden_rnn()
    loop = g.outputs[1].src[0]
    context = print_node_context(g, loop, radius=1)
    lines = context.splitlines()
    assert lines[0] == "    ..."
    assert lines[2].startswith("--> %5 = loop length=4")
    assert lines[1].startswith("    %4 = input") and lines[3].startswith("      ^body(")
    body_node = loop.arg.body.outputs[0]
    assert "--> " + " " * 4 + "%10 = tanh %9" in print_node_context(g, body_node)
    assert "does not appear" in print_node_context(g, ur.input("elsewhere", (1,)))
    assert "-->   ^body(" in print_node_context(g, loop.arg.body.inputs[2])


# ---- parse errors -------------------------------------------------------------------------------

HEAD = '%0 = input "err_x" : f32[2,3]\n'

PARSE_ERRORS = [
    (HEAD + "%1 = frobnicate %0 : f32[2,3]\nreturn %1", "line 2: expected an op name"),
    (HEAD + "%1 = tanh %7 : f32[2,3]\nreturn %1", "line 2: %7 is not defined"),
    (HEAD + "%1 = tanh %0 : f32[3,2]\nreturn %1",
     "line 2: the written type f32[3,2] differs from the type tanh gives, f32[2,3]"),
    (HEAD + "%1 = matmul %0, %0 : f32[2,3]\nreturn %1", "line 2: matmul: expected a.shape[-1] == b.shape[-2]"),
    (HEAD + "%1 = tanh %0 : q32[2,3]\nreturn %1", "line 2: expected a dtype (f32, f64, i32, i64, bool), found 'q32'"),
    (HEAD + "%1 = tanh %0 f32[2,3]\nreturn %1", "line 2: expected ':' and the node's type, found 'f32'"),
    (HEAD + "%1 = sum %0 axes=(1) : f32[2]\nreturn %1", "line 2: expected keepdims=, found ':'"),
    (HEAD + "%1 = slice %0 [0:2, 0:3:1] : f32[2,3]\nreturn %1", "line 2: expected ':' in start:stop:step, found ','"),
    (HEAD + "%1 = tanh %0 : f32[2,3]\n", "line 2: expected 'return' before the end of the text"),
    (HEAD + "return %0\n%1 = tanh %0 : f32[2,3]",
     "line 3: expected nothing (the graph ended with 'return') after 'return'"),
    (HEAD + "%0 = tanh %0 : f32[2,3]\nreturn %0", "line 2: %0 is defined twice"),
    (HEAD + "%1 = tanh %0 : f32[2,3] $\nreturn %1", "line 2: unexpected character '$'"),
    (HEAD + "%1 = proj %0 0 : f32[2,3]\nreturn %1", "line 2: expected an output index like #0"),
    (HEAD + "return %0 as loss", "line 2: expected an output name like \"loss\""),
    (HEAD + "}\n", "line 2: '}' without an open loop or fused body"),
    (HEAD + "%1 = loop length=2 reverse=false consts() carry() xs(%0) : (f32[2,3]) {\n"
            "  %2 = tanh %0 : f32[3]\n",
     "line 3: expected '^body(...):' as the first line of the body opened at line 2"),
    (HEAD + "%1 = loop length=2 reverse=false consts() carry() xs(%0) : (f32[2,3]) {\n"
            "  ^body(%a0: f32[3]):\n    %2 = tanh %0 : f32[2,3]\n",
     "line 4: %0 is not defined before its use in this scope (loop bodies are closed: pass outer values in as consts)"),
    (HEAD + "%1 = loop length=2 reverse=false consts() carry() xs(%0) : (f32[2,3]) {\n"
            "  ^body(%a0: f32[3]):\n    return %a0\n", "line 4: expected '}' closing the body opened at line 2"),
    (HEAD + "%1 = loop length=2 reverse=false consts() carry() xs(%0) : (f32[2,3]) {\n"
            "  ^body(%a0: f32[3]):\n}\n", "line 4: expected 'return' before '}' closing the body opened at line 2"),
    (HEAD + "%1 = loop length=3 reverse=false consts() carry() xs(%0) : (f32[3,3]) {\n"
            "  ^body(%a0: f32[3]):\n  return %a0\n}\nreturn %1",
     "line 2: loop: sequence 0 expected f32[3,3], found f32[2,3]"),
    (HEAD + "%1 = loop length=2 reverse=maybe consts() carry() xs(%0) : (f32[2,3]) {",
     "line 2: expected true or false, found 'maybe'"),
    # semantic errors carry the line too (issue #18): a text the builders would refuse is refused here
    (HEAD + '%1 = param "w" init=bogus:7 : f32[3]\nreturn %1',
     "line 2: param \"w\": unknown init kind 'bogus' in 'bogus:7'; expected zeros, ones, glorot"),
    (HEAD + '%1 = param "w" init=uniform:abc : f32[3]\nreturn %1',
     "line 2: param \"w\": uniform needs a number after ':', found 'uniform:abc'"),
    (HEAD + '%1 = param "w" init=glorot:2 : f32[3]\nreturn %1', "line 2: param \"w\": glorot takes no value"),
    (HEAD + '%1 = param "w" init=normal:-1 : f32[3]\nreturn %1',
     "line 2: param \"w\": normal needs a finite number >= 0 after ':', found 'normal:-1'"),
    (HEAD + '%1 = input "err_x" : f32[4]\nreturn %1',
     "line 2: input \"err_x\": the name is declared twice (first as input at line 1)"),
    (HEAD + '%1 = input "err_x" : f32[2,3]\nreturn %1',
     "line 2: input \"err_x\": the name is declared twice (first as input at line 1)"),
    (HEAD + '%1 = param "err_x" init=zeros : f32[2,3]\nreturn %1',
     "line 2: param \"err_x\": the name is declared twice (first as input at line 1)"),
    (HEAD + '%1 = input "y" : f32[2,-3]\nreturn %1', "line 2: expected a dimension >= 0, found -3"),
    (HEAD + "%1 = const 2.5 : i32[3]\nreturn %1",
     "line 2: const: the value 2.5 is not an integer, but the constant is int32"),
    (HEAD + "%1 = const 3000000000 : i32[]\nreturn %1", "line 2: const: the value 3000000000 does not fit int32"),
    (HEAD + "%1 = const abc : f32[]\nreturn %1",
     "line 2: expected a number, true, false or an array like [1.0, 2.0] after const, found 'abc'"),
    (HEAD + '%1 = const "a" : f32[]\nreturn %1', "line 2: expected a number, true, false or an array"),
    (HEAD + "%1 = const (1, 2) : f32[]\nreturn %1", "line 2: expected a number, true, false or an array"),
    (HEAD + "%1 = const 2 : bool[]\nreturn %1", "line 2: const: expected true or false for a bool constant, found 2"),
    (HEAD + "%1 = const true : f32[]\nreturn %1", "line 2: const: expected numbers for a f32 constant, found true"),
    (HEAD + "%1 = const [1.0, true] : f32[2]\nreturn %1", "line 2: const: expected numbers for a f32 constant"),
    (HEAD + "%1 = const [1.5, 2.0] : i32[2]\nreturn %1", "line 2: const: the array holds 1.5, not an integer"),
]


@pytest.mark.parametrize("text,message", PARSE_ERRORS, ids=[m[:40] for _, m in PARSE_ERRORS])
def test_parse_errors_name_line_and_expectation(text: str, message: str) -> None:
    with pytest.raises(ParseError) as info:
        parse(text)
    assert message in str(info.value)


@pytest.mark.parametrize("spec,message", [
    ("bogus:7", "param 'w': unknown init kind 'bogus' in 'bogus:7'; expected zeros, ones, glorot"),
    ("uniform:abc", "param 'w': uniform needs a number after ':'"),
    ("zeros:1", "param 'w': zeros takes no value"),
    ("uniform:nan", "param 'w': uniform needs a finite number >= 0"),
])
def test_param_rejects_unknown_init_specs(spec: str, message: str) -> None:
    """ur.param refuses what the parser refuses, and init_values never falls back to glorot."""
    with pytest.raises(ValueError) as info:
        ur.param("w", (3,), init=spec)
    assert message in str(info.value)
    broken = Node.leaf(Op.PARAM, TensorType((3,), "float32"), ("w", spec))  # around ur.param's check
    with pytest.raises(ValueError, match="init_values: param 'w' has the unknown init spec"):
        ur.init_values([broken])


def test_leaf_builders_reject_negative_dimensions() -> None:
    with pytest.raises(ur.ShapeError, match=r"input 'x': expected non-negative dimensions, found shape \(2, -3\)"):
        ur.input("x", (2, -3))
    with pytest.raises(ur.ShapeError, match=r"param 'w': expected non-negative dimensions"):
        ur.param("w", (-1,))


def test_valid_constants_and_inits_still_parse() -> None:
    """The new checks refuse only what never prints: integral floats in an int const, and every init."""
    text = ('%0 = param "w" init=normal:0.5 : f32[3]\n%1 = param "v" init=glorot : f32[3,3]\n'
            '%2 = const 2.0 : i32[]\n%3 = const [true, false] : bool[2]\n%4 = const -inf : f32[]\n'
            'return %0, %1, %2, %3, %4\n')
    g = parse(text)
    assert g.outputs[2].arg == 2 and g.outputs[4].arg == -math.inf
    assert [p.arg for p in g.params()] == [("w", "normal:0.5"), ("v", "glorot")]
