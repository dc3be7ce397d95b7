"""Training: optimizers against torch.optim, clipping against torch.nn.utils, .npz files, TrainStep
and fit (hand-written gradients, then ur.grad + ur.nn end to end on the adding problem)."""

import math
import os
import time
import warnings

import numpy as np
import pytest
import torch

import unroll as ur
from unroll import data
from unroll.train import (SGD, Adam, AdamW, RMSprop, TrainStep, clip_by_global_norm, clip_by_value, fit,
                          global_norm, load_params, make_optimizer, save_params)
from unroll.train.loop import _plan_feeds

torch.set_num_threads(1)

# ---- optimizers vs torch.optim -----------------------------------------------------------------

OPTIMIZER_CASES = [
    (SGD, torch.optim.SGD, dict(lr=0.1)),
    (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1)),
    (Adam, torch.optim.Adam, dict(lr=0.01)),
    (Adam, torch.optim.Adam, dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)),
    (Adam, torch.optim.Adam, dict(lr=0.01, amsgrad=True)),
    (AdamW, torch.optim.AdamW, dict(lr=0.01)),
    (AdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.3, amsgrad=True)),
    (RMSprop, torch.optim.RMSprop, dict(lr=0.01)),
    (RMSprop, torch.optim.RMSprop, dict(lr=0.01, alpha=0.9, momentum=0.5, weight_decay=0.01)),
    (RMSprop, torch.optim.RMSprop, dict(lr=0.003, centered=True, momentum=0.3, eps=1e-5)),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("ours, theirs, kwargs", OPTIMIZER_CASES,
                         ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(OPTIMIZER_CASES)])
def test_optimizer_matches_torch(ours, theirs, kwargs, dtype):
    rng = np.random.default_rng(0)
    shapes = {"lstm.weight_ih_l0": (8, 3), "head.bias": (4,), "scalar": ()}
    params = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    opt, topt = ours(**kwargs), theirs(list(tparams.values()), **kwargs)
    for _ in range(6):
        grads = {k: (rng.normal(size=s) * rng.choice([1e-3, 1.0, 30.0])).astype(dtype) for k, s in shapes.items()}
        opt.step(params, grads)
        for k, t in tparams.items():
            t.grad = torch.tensor(grads[k])
        topt.step()
        for k, t in tparams.items():
            expected = t.detach().numpy()
            assert params[k].dtype == dtype
            if dtype == np.float64:
                np.testing.assert_allclose(params[k], expected, rtol=1e-13, atol=1e-15, err_msg=k)
            else:
                np.testing.assert_allclose(params[k], expected, rtol=2e-6, atol=1e-7, err_msg=k)


def test_optimizer_lists_missing_grads_and_errors():
    params = [np.ones(3), np.ones(2)]
    opt = SGD(lr=0.5)
    opt.step(params, [np.ones(3), np.ones(2)])
    np.testing.assert_array_equal(params[0], 0.5)
    opt.step({"a": params[0], "b": params[1]}, {"a": np.ones(3)})  # "b" has no gradient: unchanged
    np.testing.assert_array_equal(params[1], 0.5)
    with pytest.raises(ValueError, match=r"shape \[2\], expected the parameter's \[3\]"):
        opt.step({"a": params[0]}, {"a": np.ones(2)})
    with pytest.raises(KeyError, match="has no parameter"):
        opt.step({"a": params[0]}, {"c": np.ones(3)})
    frozen = np.ones(3)
    frozen.flags.writeable = False
    with pytest.raises(TypeError, match="writable"):
        opt.step([frozen], [np.ones(3)])
    with pytest.raises(ValueError, match="nesterov"):
        SGD(nesterov=True)
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("adagrad")
    assert isinstance(make_optimizer("RMSprop", lr=0.1), RMSprop) and make_optimizer(None).lr == 1e-3


def test_optimizer_state_dict_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    params = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=2)}
    grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(4)]
    a = Adam(lr=0.1, amsgrad=True)
    for g in grads[:2]:
        a.step(params, g)
    save_params(tmp_path / "opt.npz", a.state_dict())
    resumed_params = {k: v.copy() for k, v in params.items()}
    b = Adam(lr=0.1, amsgrad=True)
    b.load_state_dict(load_params(tmp_path / "opt.npz"))
    for g in grads[2:]:
        a.step(params, g)
        b.step(resumed_params, g)
    for k in params:
        np.testing.assert_array_equal(params[k], resumed_params[k])


# ---- clipping -----------------------------------------------------------------------------------

@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e3])
def test_clip_by_global_norm_matches_torch(max_norm):
    rng = np.random.default_rng(2)
    grads = {"a": rng.normal(size=(4, 5)), "b": rng.normal(size=3) * 2, "c": np.array(0.7)}
    before = {k: v.copy() for k, v in grads.items()}
    clipped, norm = clip_by_global_norm(grads, max_norm)
    tensors = [torch.zeros(v.shape, dtype=torch.float64, requires_grad=True) for v in grads.values()]
    for t, v in zip(tensors, grads.values()):
        t.grad = torch.tensor(v)
    tnorm = torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    assert norm == pytest.approx(float(tnorm), rel=1e-12)
    assert norm == pytest.approx(math.sqrt(sum(float(np.sum(v ** 2)) for v in before.values())))
    for t, k in zip(tensors, grads):
        np.testing.assert_allclose(clipped[k], t.grad.numpy(), rtol=1e-12)
        np.testing.assert_array_equal(grads[k], before[k])  # inputs untouched
    assert global_norm(clipped) == pytest.approx(min(norm, max_norm), rel=1e-5)


def test_clip_containers_dtypes_and_value():
    grads32 = [np.full((2, 2), 3.0, np.float32), np.full(3, -4.0, np.float32)]
    clipped, norm = clip_by_global_norm(grads32, 1.0)
    assert isinstance(clipped, list) and clipped[0].dtype == np.float32
    assert norm == pytest.approx(math.sqrt(4 * 9 + 3 * 16))
    clipped_t, _ = clip_by_global_norm(tuple(grads32), 1e9)
    assert isinstance(clipped_t, tuple) and clipped_t[1] is not grads32[1]
    np.testing.assert_array_equal(clipped_t[1], grads32[1])
    rng = np.random.default_rng(3)
    grads = {"w": rng.normal(size=(5, 5)) * 3, "b": rng.normal(size=5)}
    by_value = clip_by_value(grads, 0.5)
    tensors = [torch.zeros(5, 5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)]
    for t, v in zip(tensors, grads.values()):
        t.grad = torch.tensor(v)
    torch.nn.utils.clip_grad_value_(tensors, 0.5)
    for t, k in zip(tensors, grads):
        np.testing.assert_array_equal(by_value[k], t.grad.numpy())
    assert np.abs(by_value["w"]).max() == 0.5
    _, inf_norm = clip_by_global_norm([np.array([np.inf, 1.0])], 1.0)
    assert inf_norm == math.inf
    with pytest.raises(ValueError, match="max_norm > 0"):
        clip_by_global_norm(grads, 0.0)
    with pytest.raises(ValueError, match="clip_value > 0"):
        clip_by_value(grads, -1)


# ---- parameter files ----------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    params = {
        "lstm.weight_ih_l0": np.arange(12, dtype=np.float32).reshape(4, 3),
        "head.bias": np.array([1.5], np.float64),
        "file": np.int64(7),               # np.savez's own argument name: must still work
        "empty": np.zeros((0, 3), np.float32),
        "a name with spaces.and:colons": np.ones(2, np.int32),
    }
    path = tmp_path / "ckpt.npz"
    save_params(path, params)
    loaded = load_params(path)
    assert list(loaded) == list(params)  # names and order exactly
    for k, v in params.items():
        assert loaded[k].dtype == np.asarray(v).dtype and loaded[k].shape == np.shape(v)
        np.testing.assert_array_equal(loaded[k], v)
    with np.load(path) as npz:  # a standard npz
        assert npz.files == list(params)
    save_params(tmp_path / "noext", {"x": np.ones(1)})  # written exactly where asked
    assert os.path.exists(tmp_path / "noext") and not os.path.exists(tmp_path / "noext.npz")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".params-")] == []


def test_load_refuses_pickles_and_save_refuses_objects(tmp_path):
    evil = tmp_path / "evil.npz"
    np.savez(evil, ok=np.ones(2), obj=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ValueError, match="'obj'.*pickled.*allow_pickle=False"):
        load_params(evil)
    with pytest.raises(ValueError, match="Python objects"):
        save_params(tmp_path / "x.npz", {"obj": np.array([object()], dtype=object)})
    with pytest.raises(ValueError, match="names must be"):
        save_params(tmp_path / "x.npz", {"a/b": np.ones(1)})
    np.save(tmp_path / "single.npy", np.ones(3))
    with pytest.raises(ValueError, match="single .npy"):
        load_params(tmp_path / "single.npy")


# ---- TrainStep and fit with hand-written gradients ------------------------------------------------

def _linear_regression(B=16, I=3, dtype="float32"):
    """A loss and its gradient written by hand in the DSL (no autodiff needed)."""
    x = ur.input("x", (B, I), dtype)
    y = ur.input("y", (B, 1), dtype)
    w = ur.param("w", (I, 1), "normal:0.1", dtype)
    b = ur.param("b", (1,), "zeros", dtype)
    err = x @ w + b - y
    loss = ur.mean(err * err)
    grads = [ur.matmul(ur.transpose(x), err) * (2.0 / B), ur.sum(err, 0) * (2.0 / B)]
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, I)).astype(dtype)
    Y = X @ np.array([[1.0], [-2.0], [0.5]], dtype) + np.asarray(0.3, dtype)
    return loss, [w, b], grads, {"x": X, "y": Y}


def test_fit_linear_regression_hand_written_gradients():
    loss, params, grads, dataset = _linear_regression()
    evals = []
    result = fit(loss, params, dataset, epochs=20, optimizer=Adam(lr=0.05), grads=grads, progress=False,
                 eval_fn=lambda v: evals.append(v["w"].copy()) or float(v["b"][0]), backend="numpy")
    hist = result.history
    assert hist.steps == 20 * (200 // 16) == len(hist.grad_norm)
    assert len(hist.epoch_loss) == 20 and len(hist.evals) == 20 and hist.evals[-1][0] == hist.steps
    assert hist.epoch_loss[-1] < 1e-4 < hist.epoch_loss[0]
    np.testing.assert_allclose(result.params["w"][:, 0], [1.0, -2.0, 0.5], atol=1e-2)
    params_out, history = result  # unpacks
    assert params_out is result.params and history is hist and hist.stopped is None
    assert result.params["w"] is not result.trainer.values["w"]  # copies
    # the same seed gives the same run
    again = fit(loss, params, dataset, epochs=20, optimizer=Adam(lr=0.05), grads=grads, progress=False, backend="numpy")
    assert again.history.loss == hist.loss


def test_train_step_matches_manual_update_and_clips():
    loss, params, grads, dataset = _linear_regression(dtype="float64")
    init = {"w": np.full((3, 1), 0.5), "b": np.zeros(1)}
    step = TrainStep(loss, params, optimizer=SGD(lr=0.1), clip=0.01, grads=grads, values=init, backend="numpy")
    init["w"][:] = 99.0  # the step holds its own copy
    batch = {"x": dataset["x"][:16], "y": dataset["y"][:16]}
    loss0, g = step.gradients(batch)
    assert loss0 == pytest.approx(step.evaluate(batch))
    stats = step(**batch)
    assert stats.applied and stats.loss == loss0 and stats.grad_norm == pytest.approx(global_norm(g))
    clipped, _ = clip_by_global_norm(g, 0.01)
    np.testing.assert_allclose(step.values["w"], 0.5 - 0.1 * clipped["w"], rtol=1e-12)
    by_value = TrainStep(loss, params, optimizer="sgd", lr=1.0, clip=("value", 1e-3), grads=grads,
                         values={"w": np.full((3, 1), 0.5), "b": np.zeros(1)}, backend="numpy")
    by_value.step(batch)
    np.testing.assert_allclose(np.abs(by_value.values["w"] - 0.5), 1e-3)
    assert "TrainStep numpy" in repr(step)


def test_fit_batch_axes_for_sequence_first_inputs():
    T, B, I = 5, 4, 2
    x = ur.input("x", (T, B, I))
    y = ur.input("y", (B, 1))
    mask = ur.input("mask", (T, 1, 1))
    inputs = {"x": x, "y": y, "mask": mask}
    N = 10
    feeds, n, batch = _plan_feeds(inputs, {"x": np.zeros((T, N, I)), "y": np.zeros((N, 1)),
                                           "mask": np.ones((T, 1, 1))}, None)
    assert (n, batch) == (N, B)
    assert {f.name: f.axis for f in feeds} == {"x": 1, "y": 0, "mask": None}
    # a data set of exactly one batch is ambiguous: fed whole unless batch_axes says otherwise
    feeds, n, batch = _plan_feeds(inputs, {"x": np.zeros((T, B, I)), "y": np.zeros((B, 1)),
                                           "mask": np.ones((T, 1, 1))}, None)
    assert (n, batch) == (1, 1) and all(f.axis is None for f in feeds)
    feeds, n, batch = _plan_feeds(inputs, {"x": np.zeros((T, B, I)), "y": np.zeros((B, 1)),
                                           "mask": np.ones((T, 1, 1))}, {"x": 1, "y": -2})
    assert (n, batch) == (B, B) and [f.axis for f in feeds] == [1, 0, None]
    with pytest.raises(ValueError, match=r"differ on axes \[0, 1\]"):
        _plan_feeds(inputs, {"x": np.zeros((T + 1, N, I)), "y": np.zeros((N, 1)), "mask": np.ones((T, 1, 1))}, None)
    with pytest.raises(ValueError, match="different numbers of examples"):
        _plan_feeds(inputs, {"x": np.zeros((T, N, I)), "y": np.zeros((N + 1, 1)), "mask": np.ones((T, 1, 1))}, None)
    with pytest.raises(ValueError, match="same rank"):
        _plan_feeds(inputs, {"x": np.zeros((T, N * I)), "y": np.zeros((N, 1)), "mask": np.ones((T, 1, 1))}, None)
    with pytest.raises(KeyError, match="missing 'mask'.*not graph inputs: 'z'"):
        _plan_feeds(inputs, {"x": np.zeros((T, N, I)), "y": np.zeros((N, 1)), "z": 1}, None)
    with pytest.raises(ValueError, match="fed whole"):
        _plan_feeds(inputs, {"x": np.zeros((T, N, I)), "y": np.zeros((N, 1)), "mask": np.ones((T, 1, 1))},
                    {"x": None})


def test_fit_sequence_data_batches_partial_batches_and_errors():
    T, B = 3, 4
    x = ur.input("x", (T, B, 1))
    w = ur.param("w", (1,), "zeros")
    loss = ur.mean((x - w) ** 2)
    grad_w = ur.reshape(ur.mean(w - x) * 2.0, (1,))
    seen = []

    class Spy(SGD):
        def step(self, params, grads):
            seen.append(1)
            super().step(params, grads)

    xs = np.arange(T * 10, dtype=np.float32).reshape(T, 10, 1)  # N = 10 examples along axis 1
    r = fit(loss, [w], {"x": xs}, epochs=3, optimizer=Spy(lr=0.1), grads=[grad_w], progress=False, backend="numpy")
    assert r.history.steps == 3 * 2 == len(seen)  # 10 // 4 batches per epoch, the rest dropped
    r = fit(loss, [w], {"x": xs}, epochs=3, optimizer="sgd", grads=[grad_w], drop_last=False, progress=False,
            backend="numpy")
    assert r.history.steps == 3 * 3 and len(r.history.epoch_loss) == 3
    r = fit(loss, [w], {"x": xs}, steps=5, epochs=100, grads=[grad_w], progress=False, batch_size=4, backend="numpy")
    assert r.history.steps == 5 and len(r.history.epoch_loss) == 3
    r = fit(loss, [w], {"x": xs[:, :2]}, steps=2, grads=[grad_w], drop_last=False, progress=False, backend="numpy")
    assert r.history.steps == 2  # 2 examples repeated into a batch of 4
    with pytest.raises(ValueError, match="fewer than one batch"):
        fit(loss, [w], {"x": xs[:, :2]}, grads=[grad_w], progress=False, backend="numpy")
    with pytest.raises(ValueError, match="batch_size=8.*batch size 4"):
        fit(loss, [w], {"x": xs}, grads=[grad_w], batch_size=8, progress=False, backend="numpy")
    with pytest.raises(ur.ShapeError, match="scalar loss"):
        TrainStep(x * 2.0, [w], grads=[grad_w], backend="numpy")
    with pytest.raises(TypeError, match="expected parameters"):
        TrainStep(loss, [x], grads=[grad_w], backend="numpy")
    with pytest.raises(ValueError, match="positive threshold"):
        TrainStep(loss, [w], grads=[grad_w], clip=("norm", 0), backend="numpy")
    with pytest.raises(KeyError, match="no entry for parameter"):
        TrainStep(loss, [w], grads=[grad_w], values={}, backend="numpy")


def test_fit_stops_on_non_finite_loss_and_keeps_finite_values():
    loss, params, grads, dataset = _linear_regression(dtype="float64")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(loss, params, dataset, epochs=50, optimizer=SGD(lr=10.0), grads=grads, progress=False,
                     backend="numpy")
    assert result.history.stopped is not None and "not finite" in result.history.stopped
    assert any("fit stopped" in str(w.message) for w in caught)
    assert all(np.all(np.isfinite(v)) for v in result.params.values())
    assert result.history.steps < 50 * 12


def test_fit_eval_every_and_continue_training():
    loss, params, grads, dataset = _linear_regression()
    calls = []
    first = fit(loss, params, dataset, steps=25, grads=grads, eval_every=10, progress=False,
                eval_fn=lambda v: calls.append(1) or {"mse": 0.5}, backend="numpy")
    assert [s for s, _ in first.history.evals] == [10, 20] and first.history.evals[0][1] == {"mse": 0.5}
    more = fit(loss, None, dataset, steps=5, trainer=first.trainer, progress=False)
    assert more.trainer is first.trainer and first.trainer.steps == 30

    def stop_at_30(values):
        raise ur.StopTraining("enough")
    stopped = fit(loss, params, dataset, epochs=10, grads=grads, eval_every=30, eval_fn=stop_at_30,
                  progress=False, backend="numpy")
    assert stopped.history.steps == 30 and stopped.history.stopped == "step 30: enough"
    with pytest.raises(ValueError, match="steps must be a positive int"):
        fit(loss, params, dataset, steps=0, grads=grads, backend="numpy")


# ---- end to end: ur.grad + ur.nn ------------------------------------------------------------------

def _lstm_regressor(T, B, H, dtype="float32", seed=0):
    """ur.nn.LSTM(2, H) + Linear(H, 1) on the last hidden state, MSE against y (B, 1)."""
    lstm = ur.nn.LSTM(2, H, name="lstm", dtype=dtype, seed=seed)
    head = ur.nn.Linear(H, 1, name="head", dtype=dtype, seed=seed + 1)

    def loss_for(batch):
        x = ur.input("x", (T, batch, 2), dtype)
        _, (h_n, _) = lstm(x)
        return head(h_n[0])

    y = ur.input("y", (B, 1), dtype)
    return lstm, head, loss_for, ur.nn.mse(loss_for(B), y)


def test_train_step_matches_torch_training_an_lstm():
    """Three Adam steps with global-norm clipping on an LSTM: the same values as torch."""
    T, B, H = 6, 3, 4
    lstm, head, _, loss = _lstm_regressor(T, B, H, dtype="float64")
    t_lstm, t_head = torch.nn.LSTM(2, H).double(), torch.nn.Linear(H, 1).double()
    t_lstm.load_state_dict({k[len("lstm."):]: torch.tensor(v) for k, v in lstm.state_dict().items()})
    t_head.load_state_dict({k[len("head."):]: torch.tensor(v) for k, v in head.state_dict().items()})
    step = TrainStep(loss, [lstm, head], optimizer=Adam(lr=0.05), clip=0.5, backend="numpy")
    t_params = list(t_lstm.parameters()) + list(t_head.parameters())
    t_opt = torch.optim.Adam(t_params, lr=0.05)
    xs, ys = data.adding_problem(3 * B, T, seed=4, dtype=np.float64)
    for k in range(3):
        xb, yb = xs[:, k * B:(k + 1) * B], ys[k * B:(k + 1) * B]
        stats = step(x=xb, y=yb)
        out, (h_n, _) = t_lstm(torch.tensor(xb))
        t_loss = ((t_head(h_n[0]) - torch.tensor(yb)) ** 2).mean()
        assert stats.loss == pytest.approx(t_loss.item(), rel=1e-12)
        t_opt.zero_grad()
        t_loss.backward()
        t_norm = torch.nn.utils.clip_grad_norm_(t_params, 0.5)
        t_opt.step()
        assert stats.grad_norm == pytest.approx(float(t_norm), rel=1e-10)
    expected = {**{"lstm." + k: v for k, v in t_lstm.state_dict().items()},
                **{"head." + k: v for k, v in t_head.state_dict().items()}}
    assert set(step.values) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(step.values[name], value.numpy(), rtol=1e-9, atol=1e-12, err_msg=name)


def test_lstm_learns_the_adding_problem():
    """ur.nn.LSTM(2, 32) + Linear on the last step, numpy backend, T=50: held-out MSE < 0.01
    (the trivial predictor scores 1/6). Stops as soon as the target is reached (~450 steps)."""
    T, B, H = 50, 64, 32
    lstm, head, predict_for, loss = _lstm_regressor(T, B, H)
    x_eval, y_eval = data.adding_problem(1000, T, seed=12345)
    predict = ur.compile(predict_for(1000), backend="numpy")
    x_train, y_train = data.adding_problem(20000, T, seed=1)

    def held_out_mse(values):
        mse = float(np.mean((predict(x=x_eval, **values) - y_eval) ** 2))
        if mse < 0.01:
            raise ur.train.StopTraining(f"held-out MSE {mse:.4f}")
        return {"mse": mse}

    start, cpu_start = time.perf_counter(), time.process_time()
    result = fit(loss, [lstm, head], {"x": x_train, "y": y_train}, steps=1500, optimizer=Adam(lr=0.02),
                 clip=1.0, eval_fn=held_out_mse, eval_every=25, progress=False, seed=0, backend="numpy")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    final = float(np.mean((predict(x=x_eval, **result.params) - y_eval) ** 2))
    print(f"\nadding problem T={T}: {result.history.steps} steps, {seconds:.1f} s ({cpu:.1f} s CPU), "
          f"held-out MSE {final:.4f} (trivial {data.ADDING_BASELINE_MSE:.3f})")
    assert final < 0.01, result.history.evals
    assert result.history.stopped is not None and "held-out MSE" in result.history.stopped
    # the models were updated in place, like torch modules
    for name, value in lstm.state_dict().items():
        np.testing.assert_array_equal(value, result.params[name])


def test_train_step_options_give_the_same_gradients_and_models_round_trip(tmp_path):
    """optimize=True and a memory policy change the compiled graph, not the gradients; trained
    values saved with save_params load back into a fresh model."""
    T, B, H = 7, 2, 3
    lstm, head, _, loss = _lstm_regressor(T, B, H, dtype="float64")
    xb, yb = data.adding_problem(B, T, seed=6, dtype=np.float64)
    plain = TrainStep(loss, [lstm, head], backend="numpy")
    loss0, grads0 = plain.gradients({"x": xb, "y": yb})
    for options in (dict(optimize=True), dict(policy=ur.Recompute()), dict(policy=ur.Checkpoint(3))):
        other = TrainStep(loss, [lstm, head], **options)
        loss1, grads1 = other.gradients({"x": xb, "y": yb})
        assert loss1 == pytest.approx(loss0, rel=1e-12), options
        for name in grads0:
            np.testing.assert_allclose(grads1[name], grads0[name], rtol=1e-9, atol=1e-12, err_msg=str(options))
    initial = {k: v.copy() for k, v in {**lstm.state_dict(), **head.state_dict()}.items()}
    result = fit(loss, [lstm, head], {"x": xb, "y": yb}, steps=3, progress=False, backend="numpy")
    save_params(tmp_path / "model.npz", result.params)
    lstm.load_state_dict({k: v for k, v in initial.items() if k.startswith("lstm.")})
    head.load_state_dict({k: v for k, v in initial.items() if k.startswith("head.")})
    assert TrainStep(loss, [lstm, head], backend="numpy").evaluate({"x": xb, "y": yb}) == pytest.approx(loss0)
    loaded = load_params(tmp_path / "model.npz")
    lstm.load_state_dict({k: v for k, v in loaded.items() if k.startswith("lstm.")})
    head.load_state_dict({k: v for k, v in loaded.items() if k.startswith("head.")})
    again = TrainStep(loss, [lstm, head], backend="numpy")
    assert again.evaluate({"x": xb, "y": yb}) == result.trainer.evaluate({"x": xb, "y": yb}) < loss0


def test_progress_bar_shows_running_loss(monkeypatch, capsys):
    import unroll.train.loop as loop_module
    monkeypatch.setattr(loop_module, "_show_progress", lambda progress: progress)
    loss, params, grads, dataset = _linear_regression()
    fit(loss, params, dataset, epochs=2, grads=grads, progress=True, eval_fn=lambda v: 0.25, backend="numpy")
    err = capsys.readouterr().err
    assert "24/24" in err and "loss=" in err and "eval=0.25" in err
    fit(loss, params, dataset, epochs=1, grads=grads, progress=False, backend="numpy")
    assert capsys.readouterr().err == ""


@pytest.mark.slow  # Numba compiles the LSTM's forward and backward loops (~10-30 s without a cache)
def test_train_step_numba_backend_matches_numpy():
    T, B, H = 7, 2, 3
    lstm, head, _, loss = _lstm_regressor(T, B, H, dtype="float64")
    xb, yb = data.adding_problem(B, T, seed=6, dtype=np.float64)
    loss0, grads0 = TrainStep(loss, [lstm, head], backend="numpy").gradients({"x": xb, "y": yb})
    numba_step = TrainStep(loss, [lstm, head], backend="numba")
    loss1, grads1 = numba_step.gradients({"x": xb, "y": yb})
    assert loss1 == pytest.approx(loss0, rel=1e-12)
    for name in grads0:
        np.testing.assert_allclose(grads1[name], grads0[name], rtol=1e-9, atol=1e-12, err_msg=name)
    result = fit(loss, [lstm, head], {"x": xb, "y": yb}, steps=3, trainer=numba_step, progress=False)
    assert result.history.steps == 3 and result.history.loss[-1] < loss0


def test_train_step_draws_fresh_dropout_masks_unless_the_batch_holds_them():
    """Like torch in train mode: a new mask per step. A mask the batch holds is used as given."""
    x, y = ur.input("x", ("T", 3, 4)), ur.input("y", ("T", 3, 8))   # named T: the mask is (1, T, 3, 8)
    lstm = ur.nn.LSTM(4, 8, num_layers=2, dropout=0.5)
    lstm.train()
    out, _ = lstm(x)
    step = ur.TrainStep(ur.mean((out - y) ** 2), lstm.parameters(), backend="numpy")
    (mask,) = step.dropout_masks
    rng = np.random.default_rng(0)
    batch = dict(x=rng.normal(size=(6, 3, 4)), y=rng.normal(size=(6, 3, 8)))
    first, second = step.gradients(batch)[0], step.gradients(batch)[0]
    assert first != second                              # fresh masks
    fixed = {**batch, mask.name: np.full((1, 6, 3, 8), 2.0, np.float32)}
    assert step.gradients(fixed)[0] == step.gradients(fixed)[0]
    lstm.eval()
    out_eval, _ = lstm(x)
    assert ur.TrainStep(ur.mean((out_eval - y) ** 2), lstm.parameters(), backend="numpy").dropout_masks == []


def _stream_rnn(T=5, B=2, I=3, H=4):
    x, y = ur.input("x", (T, B, I), "float64"), ur.input("y", (T, B, H), "float64")
    h0 = ur.input("h0", (1, B, H), "float64")
    rnn = ur.nn.RNN(I, H, dtype="float64")
    out, h_n = rnn(x, h0)
    return rnn, x, y, h0, ur.mean((out - y) ** 2), h_n


def test_carry_feeds_the_last_state_on_and_cuts_its_gradient():
    """Stateful truncated BPTT across calls: chunk 2 starts from chunk 1's final state, and its
    gradients are those of chunk 2 alone given that state (nothing flows into chunk 1)."""
    rnn, x, y, h0, loss, h_n = _stream_rnn()
    rng = np.random.default_rng(0)
    chunks = [(rng.normal(size=(5, 2, 3)), rng.normal(size=(5, 2, 4))) for _ in range(2)]
    stream = TrainStep(loss, rnn, optimizer="sgd", lr=0.0, backend="numpy", carry={"h0": h_n})
    plain = TrainStep(loss, rnn, optimizer="sgd", lr=0.0, backend="numpy")
    stream.step({"x": chunks[0][0], "y": chunks[0][1]})      # from zeros
    first_state = ur.compile([h_n], backend="numpy")(x=chunks[0][0], h0=np.zeros((1, 2, 4)), **rnn.state_dict())[0]
    np.testing.assert_allclose(stream.carried["h0"], first_state, rtol=1e-12)
    got_loss, got = stream.gradients({"x": chunks[1][0], "y": chunks[1][1]})
    want_loss, want = plain.gradients({"x": chunks[1][0], "y": chunks[1][1], "h0": first_state})
    assert got_loss == pytest.approx(want_loss, rel=1e-12)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12)
    stream.reset_carry()
    assert not stream.carried
    with pytest.raises(KeyError, match="not an input"):
        TrainStep(loss, rnn, backend="numpy", carry={"c0": h_n})


def test_fit_trains_on_a_stream_with_a_carried_state():
    """ur.fit with a TrainStep that carries its state: consecutive chunks (shuffle=False), the
    carried input taken from the previous step, not from the data."""
    rnn, x, y, h0, loss, h_n = _stream_rnn()
    rng = np.random.default_rng(1)
    xs, ys = rng.normal(size=(5, 8, 3)), rng.normal(size=(5, 8, 4)) * 0.1
    trainer = TrainStep(loss, rnn, optimizer="adam", lr=1e-2, backend="numpy", carry={"h0": h_n})
    result = fit(loss, rnn, {"x": xs, "y": ys}, trainer=trainer, batch_size=2, steps=6, shuffle=False,
                 progress=False)
    assert len(result.history.loss) == 6 and "h0" in trainer.carried
