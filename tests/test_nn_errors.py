"""Bad input to ur.nn gives errors that name the op or module, the expected and found shapes, and
the user's line."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import unroll as ur
from unroll.nn import StateDictError

HERE = __file__


def next_line() -> str:
    """`this_file:N` for the line after the caller's."""
    return f"{HERE}:{sys._getframe(1).f_lineno + 1}"


def test_wrong_matmul_in_a_hand_written_cell_names_matmul_shapes_and_line() -> None:
    w = ur.param("W", (4, 5))
    where = f"{HERE}:{sys._getframe().f_lineno + 3}"

    def step(h, x_t):
        h = ur.tanh(x_t @ w + h)  # x_t is (2, 3): the contracted dims differ
        return h, h

    with pytest.raises(ur.ShapeError) as err:
        ur.scan(step, init=ur.zeros((2, 5)), xs=ur.input("xs", (6, 2, 3)))
    message = str(err.value)
    assert "matmul" in message and "f32[2,3]" in message and "f32[4,5]" in message
    assert where in message


def test_wrong_state_dict_shape_names_parameter_expected_and_found() -> None:
    lstm = ur.nn.LSTM(3, 4, name="enc")
    state = dict(lstm.state_dict())
    state["enc.weight_hh_l0"] = np.zeros((16, 3), np.float32)
    before = lstm.state_dict()["enc.weight_ih_l0"].copy()
    state["enc.weight_ih_l0"] = np.zeros((16, 3), np.float32)
    with pytest.raises(StateDictError) as err:
        lstm.load_state_dict(state)
    message = str(err.value)
    assert "'enc.weight_hh_l0'" in message and "[16, 4]" in message and "[16, 3]" in message
    assert np.array_equal(lstm.state_dict()["enc.weight_ih_l0"], before)  # nothing half-loaded


def test_missing_and_unexpected_state_dict_names() -> None:
    gru = ur.nn.GRU(2, 3)
    state = dict(gru.state_dict())
    del state["bias_hh_l0"]
    state["bias_hh_l9"] = np.zeros(9)
    with pytest.raises(StateDictError, match=r"missing 'bias_hh_l0'; unexpected 'bias_hh_l9'"):
        gru.load_state_dict(state)
    with pytest.raises(StateDictError, match="given twice"):
        ur.nn.Linear(2, 2, name="lin").load_state_dict(
            {"lin.weight": np.zeros((2, 2)), "weight": np.zeros((2, 2)), "bias": np.zeros(2)})


def test_missing_feed_names_the_input() -> None:
    lstm = ur.nn.LSTM(3, 4)
    out, _ = lstm(ur.input("x", (5, 2, 3)))
    with pytest.raises(ur.FeedError) as err:
        ur.compile(out, backend="numpy")(**lstm.state_dict())
    assert "missing 'x'" in str(err.value) and "f32[5,2,3]" in str(err.value)


def test_lstm_on_wrong_feature_size_names_module_shapes_and_line() -> None:
    lstm = ur.nn.LSTM(3, 4, name="enc")
    x = ur.input("x", (5, 2, 6))
    with pytest.raises(ur.ShapeError) as err:
        where = next_line()
        lstm(x)
    message = str(err.value)
    assert "LSTM(3, 4) 'enc'" in message and "f32[*,*,3]" in message and "f32[5,2,6]" in message
    assert where in message


def test_wrong_initial_state_and_dtype() -> None:
    lstm = ur.nn.LSTM(3, 4, num_layers=2)
    x = ur.input("x", (5, 2, 3))
    with pytest.raises(ur.ShapeError, match=r"state c0 expected shape f32\[2,2,4\], found f32\[1,2,4\]"):
        lstm(x, (ur.input("h0", (2, 2, 4)), ur.input("c0", (1, 2, 4))))
    with pytest.raises(TypeError, match=r"tuple \(h0, c0\)"):
        lstm(x, ur.input("h0", (2, 2, 4)))
    with pytest.raises(ur.ShapeError, match=r"found f64\[5,2,3\]"):
        lstm(ur.input("x64", (5, 2, 3), "float64"))
    with pytest.raises(TypeError, match="expected a symbolic input"):
        lstm(np.zeros((5, 2, 3), np.float32))


def test_layer_and_loss_errors() -> None:
    with pytest.raises(ur.ShapeError, match=r"Linear\(in_features=3.*found f32\[2,5\]"):
        ur.nn.Linear(3, 4)(ur.input("v", (2, 5)))
    with pytest.raises(ur.ShapeError, match=r"Embedding\(3, 2\): expected integer ids"):
        ur.nn.Embedding(3, 2)(ur.input("f", (4,)))
    with pytest.raises(ur.ShapeError, match=r"Conv1d\(3, 4, kernel_size=2\).*found f32\[5,3\]"):
        ur.nn.Conv1d(3, 4, 2)(ur.input("s", (5, 3)))
    with pytest.raises(ur.ShapeError, match=r"cross_entropy: .*targets of shape \[3\].*i32\[4\]"):
        ur.nn.cross_entropy(ur.input("l", (3, 4)), ur.input("t", (4,), "int32"))
    with pytest.raises(ur.ShapeError, match=r"mse: .*f32\[3,4\] and f32\[4\]"):
        ur.nn.mse(ur.input("p", (3, 4)), ur.input("q", (4,)))
    with pytest.raises(ValueError, match="reduction"):
        ur.nn.mse(ur.input("p", (3, 4)), ur.input("p", (3, 4)), reduction="avg")


def test_module_misuse() -> None:
    with pytest.raises(ValueError, match="bidirectional module has no single step"):
        ur.nn.GRU(3, 4, bidirectional=True).step(ur.zeros((2, 2, 4)), ur.input("x", (2, 3)))
    with pytest.raises(ValueError, match="nonlinearity"):
        ur.nn.RNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        ur.nn.LSTM(3, 0)
    gru = ur.nn.GRU(2, 3)
    gru(ur.input("x", (2, 1, 2)))
    parent = ur.nn.Module()
    with pytest.raises(ValueError, match=r"cannot take the names 'rnn\.\*'; assign it to its parent before"):
        parent.rnn = gru
    assert parent.state_dict() == {}

    class Forgetful(ur.nn.Module):
        def __init__(self) -> None:
            self.lin = ur.nn.Linear(2, 2)

    with pytest.raises(AttributeError, match=r"call super\(\).__init__\(\)"):
        Forgetful()
