"""Semantics shared by the IR and the reference: the one numpy table, integer rules, numpy operands,
array constants, out-of-range ids, and the exported text API."""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest

import unroll as ur
from unroll.backends import numpy_ref
from unroll.ir import semantics
from unroll.ir.node import Node
from unroll.ir.ops import ELEMENTWISE, FrozenArray, Op, ShapeError, UnsupportedConstant
from unroll.ir.simplify import FOLD, simplify
from unroll.ir.text import ParseError, parse, print_graph
from unroll.ir.verify import verify


def run(outputs: object, **feeds: object) -> list[np.ndarray]:
    outs = outputs if isinstance(outputs, list) else [outputs]
    return ur.compile(outs, backend="numpy")(**feeds)


def assert_names_line(err: pytest.ExceptionInfo, *parts: str) -> None:
    """The message names every part and the test's own line that raised (the user's line)."""
    message = str(err.value)
    for part in parts:
        assert part in message, (part, message)
    entry = err.traceback[0]  # the statement in the test that raised
    assert f"{entry.path}:{entry.lineno + 1}" in message, message


# ---- one semantics table ---------------------------------------------------------------------------

def test_folding_and_the_reference_use_the_one_table() -> None:
    assert numpy_ref.ELEMENTWISE_IMPLS is semantics.ELEMENTWISE_IMPLS
    assert FOLD is semantics.ELEMENTWISE_IMPLS
    assert set(semantics.ELEMENTWISE_IMPLS) | {Op.CAST} == ELEMENTWISE
    assert set(semantics.STRUCTURAL_IMPLS) <= set(numpy_ref.IMPLS)


def test_changing_the_table_changes_both_folding_and_the_reference(monkeypatch) -> None:
    calls: list[str] = []

    def spy(x: np.ndarray) -> np.ndarray:
        calls.append("exp")
        return np.exp(x) + 1

    monkeypatch.setitem(semantics.ELEMENTWISE_IMPLS, Op.EXP, spy)
    x = ur.input("x", (2,))
    (value,) = run(ur.exp(x), x=np.zeros(2, np.float32))
    np.testing.assert_array_equal(value, [2.0, 2.0])
    folded = simplify(ur.graph(ur.exp(ur.const(0.0, (2,)))))
    assert folded.outputs[0].op is Op.CONST and folded.outputs[0].arg == 2.0
    assert calls == ["exp", "exp"]


def test_sigmoid_is_expit_and_folding_matches_the_reference_bit_for_bit() -> None:
    from scipy.special import expit
    values = np.array([-100.0, -3.5, 0.0, 2.25, 40.0], np.float32)
    np.testing.assert_array_equal(semantics.ELEMENTWISE_IMPLS[Op.SIGMOID](values), expit(values))
    c = ur.const(values)
    (reference,) = run(ur.sigmoid(c) * 3.0)
    folded = simplify(ur.graph(ur.sigmoid(c) * 3.0)).outputs[0]
    assert folded.op is Op.CONST
    np.testing.assert_array_equal(np.asarray(folded.arg), reference)


# ---- integer rules --------------------------------------------------------------------------------

def test_float_operand_with_an_int_tensor_is_an_error_naming_op_and_line() -> None:
    i = ur.input("i", (4,), "int32")
    with pytest.raises(ShapeError) as err:
        i + 1.5
    assert_names_line(err, "add: a float operand 1.5 with the int32 tensor i32[4]", "ur.cast(x, 'float32')")
    with pytest.raises(ShapeError) as err:
        2.0 * i  # integral, but a float literal: still an error
    assert_names_line(err, "mul:", "2.0")
    with pytest.raises(ShapeError) as err:
        ur.less(i, 1.5)  # comparisons too: 1.5 would become 1
    assert_names_line(err, "lt:", "1.5")
    with pytest.raises(ShapeError) as err:
        ur.where(ur.less(i, 2), i, 0.5)
    assert_names_line(err, "where:", "0.5")


def test_int_operands_with_int_and_float_tensors() -> None:
    i = ur.input("i", (4,), "int32")
    x = ur.input("x", (4,))
    iv, xv = np.array([1, 2, 3, 4], np.int32), np.arange(4, dtype=np.float32)
    a, c, d = run([i + 1, x * 2 + np.int64(1), i - np.array([1, 1, 2, 2])], i=iv, x=xv)
    assert a.dtype == np.int32 and d.dtype == np.int32
    np.testing.assert_array_equal(a, [2, 3, 4, 5])
    np.testing.assert_array_equal(c, xv * 2 + 1)
    np.testing.assert_array_equal(d, [0, 1, 1, 2])


def test_ints_that_do_not_fit_and_non_integral_int_constants_are_errors() -> None:
    i = ur.input("i", (4,), "int32")
    with pytest.raises(ShapeError) as err:
        i + 2 ** 40
    assert_names_line(err, "add: the value 1099511627776 does not fit int32")
    with pytest.raises(ShapeError) as err:
        ur.full((2,), 1.5, "int32")
    assert_names_line(err, "const:", "1.5", "not an integer")
    assert ur.full((2,), 2.0, "int32").arg == 2


def test_mean_of_an_int_tensor_is_float32_with_the_right_value() -> None:
    i = ur.input("i", (4,), "int32")
    m = ur.mean(i)
    assert m.dtype == "float32"
    mask = ur.input("mask", (4,), "bool")
    (value, share) = run([m, ur.mean(mask)], i=np.array([10, 20, 30, 40], np.int32),
                         mask=np.array([True, False, True, True]))
    assert value.dtype == np.float32 and value == 25.0
    assert share == 0.75


def test_integer_division_and_powers_are_type_errors() -> None:
    i = ur.input("i", (4,), "int32")
    with pytest.raises(ShapeError) as err:
        i / i
    assert_names_line(err, "div: integer division is not supported", "ur.cast(x, 'float32')", "i32[4]")
    with pytest.raises(ShapeError) as err:
        i / 2
    assert_names_line(err, "div:")
    with pytest.raises(ShapeError) as err:
        i ** 2
    assert_names_line(err, "pow: integer powers are not supported", "x * x")
    with np.errstate(divide="ignore", invalid="ignore"):  # float division by zero is defined
        (value,) = run(ur.cast(i, "float32") / 0, i=np.array([1, -1, 0, 2], np.int32))
    assert value[0] == np.inf and value[1] == -np.inf and np.isnan(value[2])


def test_bool_tensors_take_no_number_operands() -> None:
    mask = ur.input("mask", (3,), "bool")
    with pytest.raises(ShapeError) as err:
        ur.equal(mask, 1)
    assert_names_line(err, "eq:", "ur.cast(x, 'int32')")
    x = ur.input("x", (3,))
    with pytest.raises(ShapeError) as err:
        x + np.array([True, False, True])
    assert_names_line(err, "add: a bool operand")
    (same,) = run(ur.equal(mask, True), mask=np.array([True, False, True]))  # bools with bools are fine
    np.testing.assert_array_equal(same, [True, False, True])


# ---- numpy operands ---------------------------------------------------------------------------------

def test_numpy_array_on_the_left_defers_to_unroll() -> None:
    x = ur.input("x", (2, 3))
    y = np.ones((2, 3), np.float32) + x
    assert isinstance(y, Node) and y.op is Op.ADD
    assert y.src[0].op is Op.CONST and y.src[0].arg == 1.0  # uniform: an ordinary scalar constant
    xv = np.arange(6, dtype=np.float32).reshape(2, 3) + 1
    arr = np.linspace(0.5, 3.0, 6).reshape(2, 3)
    cases = {
        "add": (arr + x, arr + xv), "sub": (arr - x, arr - xv), "mul": (arr * x, arr * xv),
        "div": (arr / x, arr / xv), "pow": (arr ** x, arr ** xv),
        "matmul": (arr.T @ x, arr.T @ xv), "rmatmul": (x @ arr.T, xv @ arr.T),
        "lt": (arr < x, arr < xv), "gt": (arr > x, arr > xv),
    }
    values = run([node for node, _ in cases.values()], x=xv)
    for (name, (node, _)), value, (_, expected) in zip(cases.items(), values, cases.values()):
        assert isinstance(node, Node), name
        np.testing.assert_allclose(value, expected.astype(value.dtype), rtol=1e-6, err_msg=name)


def test_numpy_scalars_become_scalar_constants_of_the_nodes_dtype() -> None:
    x = ur.input("x", (3,))
    y = np.float64(0.9) * x
    assert isinstance(y, Node) and y.src[0].op is Op.CONST
    assert y.src[0].shape == () and y.src[0].dtype == "float32" and y.src[0].arg == 0.9
    z = np.float32(2.0) - x
    w = 2 ** x  # a Python number on the left of ** too
    xv = np.array([1.0, 2.0, 3.0], np.float32)
    a, c, d = run([y, z, w], x=xv)
    np.testing.assert_allclose(a, np.float32(0.9) * xv)
    np.testing.assert_array_equal(c, 2.0 - xv)
    np.testing.assert_allclose(d, 2.0 ** xv)


def test_numpy_operand_shape_errors_name_the_op_both_shapes_and_the_line() -> None:
    x = ur.input("x", (2, 3))
    with pytest.raises(ShapeError) as err:
        np.ones((3, 3)) + x
    assert_names_line(err, "add:", "[3, 3]", "[2, 3]")
    with pytest.raises(ShapeError) as err:
        x @ np.ones((2, 2))
    assert_names_line(err, "matmul:", "f32[2,3]", "f32[2,2]")


def test_numpy_functions_on_symbolic_values_are_refused() -> None:
    x = ur.input("x", (2,))
    with pytest.raises(TypeError):
        np.exp(x)
    with pytest.raises(TypeError, match="symbolic"):
        np.asarray(x)


# ---- array constants ---------------------------------------------------------------------------------

def test_array_constants_are_interned_by_content() -> None:
    a = ur.const(np.arange(6.0).reshape(2, 3))
    assert isinstance(a.arg, FrozenArray) and a.shape == (2, 3) and a.dtype == "float32"
    assert ur.const(np.arange(6.0).reshape(2, 3)) is a
    assert ur.const(np.arange(6.0).reshape(3, 2)) is not a
    assert ur.const(np.full((2, 2), 7.0)).arg == 7.0  # uniform: a scalar fill
    assert ur.const(np.array([0.0, -0.0])).arg != 0.0  # -0.0 differs from 0.0 (1 / x tells)
    assert not a.arg.array.flags.writeable
    assert pickle.loads(pickle.dumps(a.arg)) == a.arg


def _constants_graph() -> tuple[ur.Graph, dict[str, np.ndarray]]:
    x = ur.input("x", (4, 2, 3))
    ids = ur.input("ids", (3,), "int32")
    w = np.array([[0.5, -1.0, 2.0], [1e-7, np.inf, -0.0], [np.nan, 3.0, 0.25]])
    _, hs = ur.scan(lambda h, x_t: (ur.tanh(x_t @ w + h * np.array([1.0, 2.0, 3.0])),) * 2,
                    ur.zeros((2, 3)), x)
    picked = ur.where(ur.greater(ids + np.array([1, -2, 3]), 0), ids, np.array([7, 8, 9]))
    flags = ur.equal(ur.greater(ids, 0), np.array([True, False, True]))
    g = ur.graph(hs, picked, ur.cast(flags, "int32"))
    feeds = {"x": np.random.default_rng(0).uniform(-1, 1, (4, 2, 3)).astype(np.float32),
             "ids": np.array([0, 1, 2], np.int32)}
    return g, feeds


def test_array_constants_round_trip_through_text_and_evaluate() -> None:
    g, feeds = _constants_graph()
    verify(g)
    text = print_graph(g)
    assert "const [1.0, 2.0, 3.0] : f32[3]" in text
    # floats print as repr(float(element)): 1e-7 is the float32 nearest it, written exactly
    assert ("const [[0.5, -1.0, 2.0], [1.0000000116860974e-07, inf, -0.0], [nan, 3.0, 0.25]] : f32[3,3]"
            in text)
    assert "const [true, false, true] : bool[3]" in text and "const [7, 8, 9] : i32[3]" in text
    assert parse(text) == g
    hs, picked, flags = run(list(g.outputs), **feeds)
    w = np.array([[0.5, -1.0, 2.0], [1e-7, np.inf, -0.0], [np.nan, 3.0, 0.25]], np.float32)
    h = np.zeros((2, 3), np.float32)
    for t in range(4):
        h = np.tanh(feeds["x"][t] @ w + h * np.array([1, 2, 3], np.float32))
        np.testing.assert_allclose(hs[t], h, rtol=1e-6)
    np.testing.assert_array_equal(picked, [0, 8, 2])
    np.testing.assert_array_equal(flags, [0, 0, 1])


def test_array_constant_parse_errors_name_the_line() -> None:
    with pytest.raises(ParseError, match=r"line 1: expected an array constant of shape \[2\]"):
        parse("%0 = const [1.0, 2.0, 3.0] : f32[2]\nreturn %0\n")
    with pytest.raises(ParseError, match="rows of different lengths"):
        parse("%0 = const [[1.0, 2.0], [3.0]] : f32[2,2]\nreturn %0\n")
    with pytest.raises(ParseError, match="not an integer"):
        parse("%0 = const [1, 2.5] : i32[2]\nreturn %0\n")
    g = parse("%0 = const [2.0, 2.0] : f32[2]\nreturn %0\n")  # uniform: stored as one value
    assert g.outputs[0].arg == 2.0


def test_folding_array_constants_matches_the_reference_and_never_grows_them() -> None:
    a = ur.const(np.array([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]]))
    exprs = [ur.tanh(a) * 2.0 + a, ur.sum(a, 1), ur.max(a, 0, keepdims=True), ur.argmax(a, 1),
             ur.transpose(a), a[:, 1:], ur.reshape(a, (3, 2)), ur.cast(a, "int32"),
             a @ np.array([[1.0], [2.0], [3.0]])]
    reference = run(exprs)
    folded = simplify(ur.graph(*exprs))
    for out, expected in zip(folded.outputs, reference):
        assert out.op is Op.CONST, out
        np.testing.assert_array_equal(numpy_ref.evaluate(ur.graph(out), [])[0], expected)
    big = simplify(ur.graph(ur.broadcast_to(a, (100, 2, 3)) * 2.0)).outputs[0]
    assert big.op is not Op.CONST  # a broadcast array constant is not materialised


def test_array_constants_survive_optimize_unroll_and_grad() -> None:
    g, feeds = _constants_graph()
    expected = run(list(g.outputs), **feeds)
    for other in (ur.optimize(g), ur.unroll(g)):
        got = numpy_ref.evaluate(other, [feeds[n] for n in other.input_names])
        for a, b_ in zip(got, expected):
            np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-6)
    w = ur.param("w", (3,), 0.5)
    (grad,) = ur.grad(ur.sum(w * w * np.array([1.0, 2.0, 3.0])), [w])
    np.testing.assert_array_equal(run(grad, w=np.ones(3, np.float32))[0], [2.0, 4.0, 6.0])


def test_backends_reading_one_fill_value_fail_clearly() -> None:
    value = FrozenArray(np.arange(4.0, dtype=np.float32))
    for read in (float, int, bool):
        with pytest.raises(UnsupportedConstant, match=r"non-uniform array constant f32\[4\]"):
            read(value)
    assert issubclass(UnsupportedConstant, NotImplementedError)
    assert value != 0.0 and value not in (1.0, 2.0)  # comparisons with scalars are just False


# ---- out-of-range ids ----------------------------------------------------------------------------------

def test_onehot_out_of_range_raises_index_error_with_depth_id_and_line() -> None:
    ids = ur.input("ids", (2, 2), "int64")
    here = sys._getframe().f_lineno; oh = ur.onehot(ids, 5)  # noqa: E702 - the line errors name
    assert oh.loc == f"{__file__}:{here}"
    run_oh = ur.compile(oh, backend="numpy")
    np.testing.assert_array_equal(run_oh(ids=np.array([[0, 4], [2, 1]]))[1, 0], [0, 0, 1, 0, 0])
    for bad, first in ((np.array([[0, 7], [2, 9]]), 7), (np.array([[0, 1], [-1, 1]]), -1)):
        with pytest.raises(IndexError) as err:
            run_oh(ids=bad)
        message = str(err.value)
        assert "onehot:" in message and f"id {first} " in message and "depth 5" in message, message
        assert f"at {__file__}:{here}" in message


def test_embedding_out_of_range_raises_like_torch() -> None:
    emb = ur.nn.Embedding(4, 2)
    ids = ur.input("ids", (3,), "int32")
    here = sys._getframe().f_lineno; rows = emb(ids)  # noqa: E702 - the line errors name
    step = ur.compile(rows, backend="numpy")
    step(ids=np.array([0, 3, 1], np.int32), **emb.state_dict())
    with pytest.raises(IndexError, match="id 4 is out of range for depth 4") as err:
        step(ids=np.array([0, 4, 1], np.int32), **emb.state_dict())
    assert f"at {__file__}:{here}" in str(err.value)
    _, ys = ur.scan(lambda c, i_t: (c, emb(i_t)), ur.zeros(()), ur.input("seq", (2, 3), "int32"))
    with pytest.raises(IndexError, match="id -2 is out of range"):
        ur.compile(ys, backend="numpy")(seq=np.array([[0, 1, 2], [3, -2, 0]], np.int32), **emb.state_dict())


# ---- exported text API -------------------------------------------------------------------------------

def test_parse_and_print_graph_are_exported_and_the_readme_sentence_holds() -> None:
    assert ur.parse is parse and ur.print_graph is print_graph and ur.ParseError is ParseError
    x, y = ur.input("x", (5, 2, 3)), ur.input("y", (5, 2, 4))
    lstm = ur.nn.LSTM(3, 4)
    out, _ = lstm(x)
    g = ur.graph(ur.nn.mse(out, y))
    assert ur.print_graph(g) == str(g)
    assert ur.parse(str(g)) == g


def test_compiled_backends_read_array_constants_as_lifted_inputs() -> None:
    """Numba (and CUDA, in test_cuda_sim) get array constants as extra inputs that ur.compile feeds:
    at the top level, inside a loop body, and through the gradient."""
    pytest.importorskip("numba")
    from unroll.ir.constants import lift_array_constants
    m = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
    x = ur.input("x", (2, 3))
    xs = ur.input("xs", (4, 2, 3))
    _, hs = ur.scan(lambda h, x_t: ((h * 0.5 + x_t * m),) * 2, ur.zeros((2, 3)), xs)
    loss = ur.sum(ur.tanh(x * np.arange(6.0, dtype=np.float32).reshape(2, 3))) + ur.sum(hs * m)
    outs = [loss, *ur.grad(loss, [x, xs])]
    lifted, values = lift_array_constants(ur.graph(*outs))
    assert len(values) == 2 and all(n.arg.startswith("__const") for n in lifted.inputs[2:])
    rng = np.random.default_rng(0)
    feeds = {"x": rng.normal(size=(2, 3)).astype(np.float32), "xs": rng.normal(size=(4, 2, 3)).astype(np.float32)}
    expected = ur.compile(outs, backend="numpy")(**feeds)
    got = ur.compile(outs, backend="numba")(**feeds)
    assert ur.compile(outs, backend="numba").input_names == ["x", "xs"]
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=2e-5, atol=1e-6)


def test_matmul_takes_vectors_like_numpy() -> None:
    """matrix @ vector, vector @ matrix, vector @ vector and batched forms, values and gradients."""
    rng = np.random.default_rng(0)
    A, v, w, B = rng.normal(size=(2, 3)), rng.normal(size=3), rng.normal(size=2), rng.normal(size=(4, 2, 3))
    a, x, y, b = (ur.input(n, s.shape, "float64") for n, s in (("a", A), ("x", v), ("y", w), ("B", B)))
    outs = [a @ x, y @ a, x @ x, b @ x, y @ b]
    got = ur.compile(outs, backend="numpy")(a=A, x=v, y=w, B=B)
    for g, e in zip(got, [A @ v, w @ A, v @ v, B @ v, w @ B]):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-12)
    da, dx = ur.compile(ur.grad(ur.sum(a @ x), [a, x]), backend="numpy")(a=A, x=v)
    np.testing.assert_allclose(da, np.broadcast_to(v, (2, 3)), rtol=1e-12)
    np.testing.assert_allclose(dx, A.sum(0), rtol=1e-12)
    with pytest.raises(ShapeError, match="rank >= 1"):
        ur.matmul(ur.input("s0", (), "float64"), x)


@pytest.mark.parametrize("dtype", ["int8", "int16", "uint8"])
def test_small_integer_dtypes_wrap_like_numpy(dtype) -> None:
    """int8/int16/uint8 tensors: arithmetic wraps in the dtype, compares, casts and onehot ids, on
    the reference and on Numba alike."""
    info = np.iinfo(dtype)
    a = ur.input("a_small", (4,), dtype)
    b_ = ur.input("b_small", (4,), dtype)
    outs = [a + b_, a * b_, ur.maximum(a, b_), a < b_, ur.cast(a, "float32"), ur.sum(a),
            ur.onehot(b_ - b_, 3)]
    feeds = {"a_small": np.array([info.max, info.min, 3, 7], dtype), "b_small": np.array([1, 5, 2, 9], dtype)}
    want = ur.compile(outs, backend="numpy")(**feeds)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(want[0], feeds["a_small"] + feeds["b_small"])
    assert want[0].dtype == np.dtype(dtype) and str(a.type).startswith({"int8": "i8", "int16": "i16", "uint8": "u8"}[dtype])
    assert ur.parse(str(ur.graph(*outs))) == ur.graph(*outs)
    pytest.importorskip("numba")
    got = ur.compile(outs, backend="numba")(**feeds)
    for g, e in zip(got, want):
        np.testing.assert_array_equal(g, e)
        assert g.dtype == e.dtype


def test_builders_given_a_number_or_array_where_a_value_belongs_name_the_op() -> None:
    """ur.sin(np_array), ur.sum(0.5): a TypeError naming the op, the operand's type and the user's
    line (it was an AttributeError from inside the builder); ur.const makes such a value."""
    d = np.array([0.3, -0.2])
    for fn, op in [(ur.sin, "sin"), (ur.tanh, "tanh"), (ur.sum, "sum"), (ur.max, "max"), (ur.mean, "sum"),
                   (ur.argmax, "argmax")]:
        with pytest.raises(TypeError, match=rf"^{op}: expected unroll values as operands, found ndarray .*ur\.const"
                                            r"[\s\S]*test_semantics\.py"):
            fn(d)
    with pytest.raises(TypeError, match="exp: expected unroll values as operands, found float"):
        ur.exp(0.5)
    assert ur.sum(ur.const(d, dtype="float64")).type.dtype == "float64"
