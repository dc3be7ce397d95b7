"""LSTM and GRU gradients with saturated gates equal PyTorch's, on the Numba backend (float32).

Inputs of magnitude 1e6 or 1e20 drive every gate pre-activation far into saturation: PyTorch's
sigmoid is then exactly 0 or 1 and its tanh exactly +-1, so the gate derivatives s (1 - s) and
1 - t^2 are exactly 0 and so is every gradient that flows through them. A sigmoid that never
reached 0 (0.5 + 0.5 tanh(x / 2) with a clamped tanh: 1.2e-7 at -100) left them tiny but nonzero,
and a weight gradient multiplies them by the input: |dW_ih| was 0.042 at 1e6 and 5e12 at 1e20.

Each case feeds a batch whose first rows are saturated and whose last rows are ordinary
(standard normal): where PyTorch's gradient is exactly 0 (the saturated rows' input gradients)
ours must be exactly 0, and every gradient must be within 1e-4 (norm-wise relative) of PyTorch's,
which it cannot be if the saturated rows add anything to the weight gradients. A fully saturated
batch must give exactly PyTorch's all-zero gradients.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import unroll as ur  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("numba")
from torch_reference import KINDS  # noqa: E402

torch.set_num_threads(1)

T, B, I, H = 5, 4, 3, 6   # noqa: E741
TOL = 1e-4


def gradients(kind: str, x: np.ndarray, y: np.ndarray, seed: int, backend: str = "numba"):
    """(ours, torch's): name -> gradient of an MSE loss over every output, for the weights,
    biases and the input."""
    ours_cls, torch_cls = KINDS[kind]
    torch.manual_seed(seed)
    ref = torch_cls(I, H)
    model = ours_cls(I, H)
    model.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    xi, yi = ur.input("x", x.shape), ur.input("y", y.shape)
    out, _ = model(xi)
    params = dict(model.named_parameters())
    value, grads = ur.value_and_grad(ur.nn.mse(out, yi), [*params.values(), xi])
    got = ur.compile([value, *grads], backend=backend)(x=x, y=y, **model.state_dict())
    ours = dict(zip(["loss", *params, "x"], got))

    t_x = torch.tensor(x, requires_grad=True)
    t_out, _ = ref(t_x)
    t_loss = torch.nn.functional.mse_loss(t_out, torch.from_numpy(y))
    t_loss.backward()
    theirs = {"loss": t_loss.detach().numpy(), **{k: p.grad.numpy() for k, p in ref.named_parameters()},
              "x": t_x.grad.numpy()}
    return ours, theirs


def inputs(scale: float, saturated_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, I))
    x[:, :saturated_rows] *= scale
    return x.astype(np.float32), rng.standard_normal((T, B, H)).astype(np.float32)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("scale", [1e6, 1e20])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_saturated_gates_give_torchs_gradients(kind, scale, backend):
    x, y = inputs(scale, saturated_rows=2, seed=1)
    ours, theirs = gradients(kind, x, y, seed=1, backend=backend)
    assert theirs["x"][:, :2].any() == False  # noqa: E712 - the premise: torch's gates saturate
    for name, want in theirs.items():
        got = ours[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        zero = want == 0
        assert np.all(got[zero] == 0), f"{name}: {int(np.count_nonzero(got[zero]))} entries are nonzero " \
                                       f"where torch's are exactly 0 (max {np.abs(got[zero]).max():.3g})"
        err = np.abs(got - want).max(initial=0.0) / max(np.abs(want).max(initial=0.0), 1e-30)
        assert err <= TOL, f"{name}: relative error {err:.3g} > {TOL}"


@pytest.mark.parametrize("scale", [1e6, 1e20])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_fully_saturated_batch_has_exactly_zero_gradients(kind, scale):
    x, y = inputs(scale, saturated_rows=B, seed=2)
    ours, theirs = gradients(kind, x, y, seed=2)
    for name, want in theirs.items():
        if name == "loss":
            np.testing.assert_allclose(ours[name], want, rtol=1e-6)
            continue
        assert not want.any(), f"torch's {name} gradient is not 0: the inputs do not saturate"
        np.testing.assert_array_equal(ours[name], want, err_msg=name)
