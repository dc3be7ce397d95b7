"""Variable-length sequences against torch (float64): run-time checks of fed lengths (ir/checks.py)
on the numpy and Numba backends, and pad_packed_sequence's lengths and time axis as
torch.nn.utils.rnn computes them.

A length fed for an input is checked when the compiled graph is called: outside 1..T, or unsorted
for a sequence packed with enforce_sorted=True, it raises ur.FeedValueError (a RuntimeError and a
ValueError) naming the input, the offending length and its index, with torch's text where torch
raises for the same value.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import unroll as ur
from unroll.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

torch = pytest.importorskip("torch")
from torch.nn.utils import rnn as trnn  # noqa: E402

torch.set_num_threads(1)
F64 = "float64"
T, B, I, H = 5, 3, 2, 4
BACKENDS = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(
    importlib.util.find_spec("numba") is None, reason="numba is not installed"))]


@pytest.fixture(autouse=True, scope="module")
def cache_dir(fresh_cache_dir):
    yield


def lstm_pair(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    ref = torch.nn.LSTM(I, H, **kwargs).double()
    model = ur.nn.LSTM(I, H, dtype=F64, **kwargs)
    model.load_state_dict(ref.state_dict())
    return model, ref


def torch_error(fn) -> str:
    """The message torch raises for the same values (the first line we must repeat)."""
    with pytest.raises((RuntimeError, ValueError)) as info:
        fn()
    return str(info.value)


# ---- lengths=: checked when the compiled step is called ------------------------------------------

@pytest.fixture(scope="module", params=BACKENDS)
def lstm_step(request):
    model, _ = lstm_pair()
    x, lens = ur.input("x", (T, B, I), F64), ur.input("lens", (B,), "int64")
    out, (h_n, _) = model(x, lengths=lens)
    run = ur.compile([out, h_n], backend=request.param)
    xv = np.random.default_rng(0).standard_normal((T, B, I))
    return lambda lengths: run(x=xv, lens=np.array(lengths), **model.state_dict())


@pytest.mark.parametrize("lengths, found, torch_text", [
    ([6, 2, 1], r"lengths\[0\] = 6, which exceeds the 5 steps", None),
    ([5, 2, 9], r"lengths\[2\] = 9, which exceeds the 5 steps", None),
    ([5, 0, 1], r"lengths\[1\] = 0", "Length of all samples has to be greater than 0"),
    ([5, 2, -3], r"lengths\[2\] = -3", "Length of all samples has to be greater than 0"),
])
def test_lengths_outside_1_to_T_raise_naming_input_value_and_index(lstm_step, lengths, found, torch_text):
    with pytest.raises(ur.FeedValueError, match=found) as info:
        lstm_step(lengths)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)
    assert "input 'lens'" in message and "LSTM(2, 4) lengths expects 1 <= length <= 5" in message
    assert "test_nn_lengths.py" in message  # the line that built the model call
    if torch_text is not None:  # torch raises for the same lengths, with this text
        x = torch.zeros(T, B, I, dtype=torch.float64)
        assert torch_text in torch_error(lambda: trnn.pack_padded_sequence(x, lengths, enforce_sorted=False))
        assert torch_text in message


def test_lengths_within_1_to_T_run_in_any_order(lstm_step):
    out, h_n = lstm_step([2, 5, 1])  # lengths= does not ask for sorted lengths (enforce_sorted=False)
    assert out.shape == (T, B, H) and not out[2:, 0].any() and not out[1:, 2].any()


def test_an_unbatched_length_is_checked():
    model, _ = lstm_pair()
    out, _ = model(ur.input("xu", (T, I), F64), lengths=ur.input("n", (), "int64"))
    run = ur.compile(out, backend="numpy")
    xv = np.zeros((T, I))
    assert run(xu=xv, n=np.array(T), **model.state_dict()).shape == (T, H)
    with pytest.raises(ur.FeedValueError, match=r"input 'n' \(i64\[\]\): found length 6, which exceeds"):
        run(xu=xv, n=np.array(6), **model.state_dict())


def test_gradient_graphs_and_train_steps_check_lengths_too():
    model, _ = lstm_pair()
    x, lens = ur.input("x", (T, B, I), F64), ur.input("lens", (B,), "int64")
    out, _ = model(x, lengths=lens)
    loss = ur.sum(out * out)
    step = ur.compile([loss, *ur.grad(loss, model.parameters())], backend="numpy")
    feeds = dict(x=np.ones((T, B, I)), **model.state_dict())
    step(lens=np.array([5, 4, 1]), **feeds)
    with pytest.raises(ur.FeedValueError, match=r"lengths\[1\] = 7"):
        step(lens=np.array([5, 7, 1]), **feeds)
    train = ur.TrainStep(loss, [model], optimizer="sgd", lr=0.1, backend="numpy")
    with pytest.raises(ur.FeedValueError, match=r"lengths\[0\] = 0"):
        train(x=np.ones((T, B, I)), lens=np.array([0, 1, 1]))


def test_checks_belong_to_the_graph_that_uses_them():
    """One input node (interned) used with two sequence lengths: each graph checks its own T."""
    model, _ = lstm_pair()
    lens = ur.input("lens", (B,), "int64")
    short, _ = model(ur.input("x3", (3, B, I), F64), lengths=lens)
    long, _ = model(ur.input("x8", (8, B, I), F64), lengths=lens)
    run_long = ur.compile(long, backend="numpy")
    assert len(run_long.checks) == 1  # the short model's T=3 is not applied here
    run_long(x8=np.ones((8, B, I)), lens=np.array([8, 7, 4]), **model.state_dict())
    model(ur.input("x8", (8, B, I), F64), lengths=lens)  # built again: the same check, kept once
    assert len(ur.compile(long, backend="numpy").checks) == 1
    with pytest.raises(ur.FeedValueError, match="exceeds the 3 steps"):
        ur.compile(short, backend="numpy")(x3=np.ones((3, B, I)), lens=np.array([8, 7, 4]),
                                           **model.state_dict())


# ---- pack_padded_sequence with input lengths: torch's checks, when the graph runs ----------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_input_lengths_follow_enforce_sorted(backend):
    model, ref = lstm_pair()
    x, lens = ur.input("x", (T, B, I), F64), ur.input("lens", (B,), "int64")
    xv = np.random.default_rng(1).standard_normal((T, B, I))
    for enforce_sorted in (True, False):
        out, _ = model(pack_padded_sequence(x, lens, enforce_sorted=enforce_sorted))
        padded, out_lens = pad_packed_sequence(out)
        run = ur.compile([padded, out_lens], backend=backend)
        unsorted = np.array([2, 5, 1])
        t_x = torch.from_numpy(xv)
        if enforce_sorted:
            text = torch_error(lambda: trnn.pack_padded_sequence(t_x, unsorted, enforce_sorted=True))
            with pytest.raises(ur.FeedValueError) as info:
                run(x=xv, lens=unsorted, **model.state_dict())
            assert str(info.value).startswith(f"input 'lens' (i64[3]): {text}")
            assert "lengths[0] = 2 < lengths[1] = 5" in str(info.value)
            unsorted = np.array([5, 2, 1])
        got, got_lens = run(x=xv, lens=unsorted, **model.state_dict())
        with torch.no_grad():
            t_out, _ = ref(trnn.pack_padded_sequence(t_x, unsorted, enforce_sorted=enforce_sorted))
            want, want_lens = trnn.pad_packed_sequence(t_out)
        # input lengths: T steps (max(lengths) is not known when the graph is built), then padding
        assert got.shape == (T, B, H) and want.shape == (int(unsorted.max()), B, H)
        np.testing.assert_allclose(got[:want.shape[0]], want.numpy(), rtol=1e-10, atol=1e-12)
        assert not got[want.shape[0]:].any()
        assert got_lens.dtype == np.int64 and np.array_equal(got_lens, want_lens.numpy())


# ---- pad_packed_sequence: torch's time axis, total_length, padding_value --------------------------

@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("total_length", [None, 4, 5, 7])
def test_pad_packed_sequence_of_constant_lengths_is_torchs(batch_first, total_length):
    """Constant lengths: max(lengths) steps (or total_length), values and lengths equal torch's."""
    model, ref = lstm_pair(batch_first=batch_first)
    shape = (B, T, I) if batch_first else (T, B, I)
    xv = np.random.default_rng(2).standard_normal(shape)
    lengths = [4, 3, 1]  # max(lengths) = 4 < T = 5
    x = ur.input("x", shape, F64)
    out, (h_n, c_n) = model(pack_padded_sequence(x, lengths, batch_first=batch_first))
    padded, out_lens = pad_packed_sequence(out, batch_first=batch_first, padding_value=-2.0,
                                           total_length=total_length)
    got = ur.compile([padded, out_lens, h_n, c_n], backend="numpy")(x=xv, **model.state_dict())
    with torch.no_grad():
        t_out, (t_h, t_c) = ref(trnn.pack_padded_sequence(torch.from_numpy(xv), lengths, batch_first=batch_first))
        want, want_lens = trnn.pad_packed_sequence(t_out, batch_first=batch_first, padding_value=-2.0,
                                                   total_length=total_length)
    assert got[0].shape == tuple(want.shape)
    np.testing.assert_allclose(got[0], want.numpy(), rtol=1e-10, atol=1e-12)
    assert got[1].dtype == np.int64 and np.array_equal(got[1], want_lens.numpy())
    np.testing.assert_allclose(got[2], t_h.numpy(), rtol=1e-10)
    np.testing.assert_allclose(got[3], t_c.numpy(), rtol=1e-10)


def test_total_length_below_the_longest_length_is_torchs_value_error():
    x = ur.input("x", (T, B, I), F64)
    t_x = torch.zeros(T, B, I, dtype=torch.float64)
    text = torch_error(lambda: trnn.pad_packed_sequence(trnn.pack_padded_sequence(t_x, [4, 3, 1]), total_length=3))
    with pytest.raises(ValueError) as info:  # constant lengths: when the graph is built
        pad_packed_sequence(pack_padded_sequence(x, [4, 3, 1]), total_length=3)
    assert str(info.value).startswith(text)
    # input lengths: total_length below T is allowed, and checked against the fed lengths
    lens = ur.input("lens", (B,), "int64")
    padded, _ = pad_packed_sequence(pack_padded_sequence(x, lens), total_length=3)
    run = ur.compile(padded, backend="numpy")
    xv = np.random.default_rng(3).standard_normal((T, B, I))
    got = run(x=xv, lens=np.array([3, 3, 1]))
    want, _ = trnn.pad_packed_sequence(trnn.pack_padded_sequence(torch.from_numpy(xv), [3, 3, 1]), total_length=3)
    np.testing.assert_array_equal(got, want.numpy())
    with pytest.raises(ur.FeedValueError) as info:
        run(x=xv, lens=np.array([4, 3, 1]))
    assert isinstance(info.value, ValueError) and text in str(info.value) and "lengths[0] = 4" in str(info.value)


def test_constant_lengths_are_checked_when_built():
    x = ur.input("x", (T, B, I), F64)
    with pytest.raises(RuntimeError, match=r"lengths\[0\] = 6, which exceeds the 5 steps"):
        pack_padded_sequence(x, [6, 2, 1])
    with pytest.raises(RuntimeError, match="Length of all samples has to be greater than 0"):
        pack_padded_sequence(x, [3, 2, 0])
    with pytest.raises(TypeError, match="total_length must be an int"):
        pad_packed_sequence(pack_padded_sequence(x, [3, 2, 1]), total_length=4.0)
