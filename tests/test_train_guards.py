"""Training never hands back non-finite parameters, optimizers refuse non-finite hyperparameters,
and a checkpoint save killed mid-write leaves nothing behind after the next save."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import unroll as ur
from unroll.train.io import load_params, save_params


def _lstm_problem():
    T, B, I, H = 5, 4, 3, 6
    x, y = ur.input("x", (T, B, I)), ur.input("y", (T, B, H))
    lstm = ur.nn.LSTM(I, H)
    out, _ = lstm(x)
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(T, 32, I)), "y": rng.normal(size=(T, 32, H))}
    return ur.nn.mse(out, y), lstm, data


@pytest.mark.parametrize("optimizer", ["rmsprop", "adam", "sgd"])
def test_fit_with_an_overflowing_lr_returns_and_writes_back_finite_parameters(optimizer):
    loss, lstm, data = _lstm_problem()
    before = {k: v.copy() for k, v in lstm.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ur.fit(loss, lstm, data, epochs=3, optimizer=optimizer, lr=1e38, progress=False, backend="numpy")
    if optimizer != "sgd":  # sgd's huge steps saturate the LSTM but stay finite
        assert result.history.stopped is not None and any("fit stopped" in str(w.message) for w in caught)
    for values in (result.params, lstm.state_dict()):
        assert all(np.isfinite(v).all() for v in values.values())
    if not result.history.loss:  # stopped on the first update: the values are the initial ones
        for k, v in before.items():
            np.testing.assert_array_equal(result.params[k], v)


@pytest.mark.parametrize("make", [
    lambda: ur.SGD(lr=float("nan")), lambda: ur.SGD(lr=-1.0), lambda: ur.SGD(lr=float("inf")),
    lambda: ur.SGD(lr=0.1, momentum=float("nan")), lambda: ur.Adam(eps=float("nan")),
    lambda: ur.Adam(betas=(0.9, 1.0)), lambda: ur.Adam(weight_decay=-1e-3),
    lambda: ur.RMSprop(alpha=1.5), lambda: ur.RMSprop(momentum=-0.1), lambda: ur.AdamW(lr=float("nan")),
])
def test_optimizers_reject_non_finite_or_negative_hyperparameters(make):
    with pytest.raises(ValueError, match="expected a finite"):
        make()


def test_a_killed_save_leaves_its_temporary_only_until_the_next_save(tmp_path):
    # a child that dies (SIGKILL-like: os._exit) in the middle of writing a checkpoint
    code = ("import os, tempfile; fd, tmp = tempfile.mkstemp(prefix=f'.params-{os.getpid()}-', "
            f"suffix='.npz.tmp', dir={str(tmp_path)!r}); os.write(fd, b'x' * 1000); os._exit(9)")
    subprocess.run([sys.executable, "-c", code], check=False)
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    save_params(tmp_path / "ckpt.npz", {"w": np.ones(3)})
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    np.testing.assert_array_equal(load_params(tmp_path / "ckpt.npz")["w"], np.ones(3))


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_fit_stopping_on_a_non_finite_loss_or_gradient_returns_and_writes_back_finite_parameters(poison):
    """A NaN in the data (a non-finite loss), or a finite loss whose gradient is not (sqrt at 0),
    partway through: fit stops, warns, and the values it returns and loads into the model are the
    finite ones of the last good update."""
    if poison == "loss":
        loss, model, data = _lstm_problem()
        data["x"][:, 20:] = np.nan           # batches of 4 in data order: steps 1-5 are clean
        clean = {k: v[:, :20] for k, v in data.items()}  # the batch axis is 1 (sequence-first)
    else:
        x = ur.input("x", (4, 1))
        w = ur.param("w", (1,), "ones")
        model = [w]
        # where x == 0 the loss sqrt(x w) is 0 and its gradient x / (2 sqrt(x w)) is 0 / 0
        loss = ur.mean(ur.sqrt(x * w))
        data = {"x": np.r_[np.full(20, 3.0), np.zeros(12)].reshape(32, 1)}
        clean = {"x": data["x"][:20]}
    initial = ({k: v.copy() for k, v in model.state_dict().items()} if hasattr(model, "state_dict")
               else {"w": np.ones(1, np.float32)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ur.fit(loss, model, data, epochs=1, batch_size=4, shuffle=False, optimizer="sgd", lr=1e-3,
                        progress=False, backend="numpy")
    assert result.history.stopped.startswith("step 6 (epoch 1)") and "not finite" in result.history.stopped
    assert any("fit stopped" in str(w.message) for w in caught)
    written = model.state_dict() if hasattr(model, "state_dict") else {w.name: result.trainer.values[w.name]}
    for values in (result.params, written):
        assert values and all(np.isfinite(v).all() for v in values.values())
    # the five clean updates happened and are kept: the same as training five steps alone
    assert len(result.history.loss) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # the clean steps alone train without a stop
        again = ur.fit(loss, None, clean, epochs=1, batch_size=4, shuffle=False, optimizer="sgd", lr=1e-3,
                       progress=False, backend="numpy", values=initial)
    for name, value in again.params.items():
        np.testing.assert_allclose(result.params[name], value, rtol=1e-6, atol=1e-7)


def test_a_failing_save_removes_its_temporary(tmp_path, monkeypatch):
    """A save that raises while writing (a full disk, an array that cannot be written) leaves neither
    a temporary nor a half-written checkpoint, and an existing checkpoint is kept as it was."""
    save_params(tmp_path / "ckpt.npz", {"w": np.ones(3)})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np.lib.format, "write_array", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_params(tmp_path / "ckpt.npz", {"w": np.zeros(3)})
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]
    monkeypatch.undo()
    np.testing.assert_array_equal(load_params(tmp_path / "ckpt.npz")["w"], np.ones(3))
