"""Truncated BPTT and its gradient bias, on an LSTM and the adding problem.

`ur.truncate(loss, k)` rewrites the graph so that the gradient flows back at most k steps (the
carried state entering each chunk of k steps is a stop_gradient; forward values are unchanged).
`ur.truncation_bias(loss, params, ks, feeds)` measures how far the truncated gradient is from the
full one: |g_k - g_full| / |g_full|. The adding problem puts its loss on the last step and its two
marked values anywhere, so a gradient truncated to k << T steps cannot see most markers: the bias is
large, shrinks as k grows and is 0 at k = T. (Chunks start at step 0, like PyTorch's detach every
k steps, so the last chunk holds (T-1) mod k + 1 steps; the k used here divide T.) Part 2 trains
the same LSTM twice, with full and with truncated gradients: the truncated one only learns to add
markers in the last k steps.

Measured (2-core x86 machine shared with other jobs, numpy backend, one BLAS thread, LSTM H=32,
T=20, batch 64, `python examples/truncated_bptt.py`, 14 s in all):
    bias at initialisation   k=1: 0.237  k=2: 0.142  k=5: 0.036  k=10: 0.004  k=20: 0
    bias after training      k=1: 0.871  k=2: 0.820  k=5: 0.659  k=10: 0.406  k=20: 0
    test MSE after 500 steps: full BPTT 0.0061, truncated k=4 0.0481 (trivial 0.167)
At initialisation the gradient vanishes anyway (the LSTM forgets), so cutting it costs little; once
the model has learnt to carry the markers, most of the gradient comes from far back and truncation
throws it away.

Re-derived by tests/test_examples.py with the same seeds: the default tests run the quick size (T=6,
H=8, batch 16, 3 training steps), `pytest -m slow` the full run above:
    main(quick=True) -> bias_init_k1=0.2256 bias_init_k2=0.1203 bias_init_k3=0.06144 bias_init_k6=0.000
    main(quick=True) -> mse_full=0.9617 mse_truncated=0.9631
    main()           -> bias_init_k1=0.237 bias_init_k2=0.142 bias_init_k5=0.036 bias_init_k10=0.004
    main()           -> bias_init_k20=0.000 bias_trained_k1=0.871 bias_trained_k2=0.820
    main()           -> bias_trained_k5=0.659 bias_trained_k10=0.406 bias_trained_k20=0.000
    main()           -> mse_full=0.0061 mse_truncated=0.0481

    python examples/truncated_bptt.py [--quick] [--backend numba] [--hidden H]
"""

from __future__ import annotations

import argparse
import os
import time

# Before numpy loads OpenBLAS: one thread is fastest for these small matrices, and more threads
# oversubscribe a shared 2-core machine (a 25 ms step took 5.5 s on one).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

import unroll as ur
from unroll.data import ADDING_BASELINE_MSE, adding_problem


class Model(ur.nn.Module):
    def __init__(self, hidden: int, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.lstm = ur.nn.LSTM(2, hidden, seed=self.child_seed())
        self.head = ur.nn.Linear(hidden, 1, seed=self.child_seed())

    def forward(self, x: ur.Node) -> ur.Node:
        out, _ = self.lstm(x)
        return ur.nn.many_to_one(out, self.head)


def biases(loss: ur.Node, model: Model, ks: list[int], feeds: dict) -> dict[int, float]:
    return ur.truncation_bias(loss, model.parameters(), ks, {**feeds, **model.state_dict()})


def main(quick: bool = False, backend: str = "numpy", epochs: int | None = None, hidden: int | None = None,
         seed: int = 0, T: int | None = None, k_train: int = 4, steps: int | None = None) -> dict:
    T = T or (6 if quick else 20)
    hidden = hidden or (8 if quick else 32)
    batch = 16 if quick else 64
    steps = steps or (3 if quick else 500)
    # chunks start at step 0, so the last chunk (the one the loss sits in) has (T-1) % k + 1 steps:
    # with k dividing T it has exactly k
    ks = sorted({k for k in (1, 2, 3, 5, 10, T) if T % k == 0})
    k_train = max(k for k in range(1, min(k_train, T) + 1) if T % k == 0)
    x = ur.input("x", (T, batch, 2))
    y = ur.input("y", (batch, 1))
    xb, yb = adding_problem(batch, T, seed=seed + 3)
    x_train, y_train = adding_problem(batch * steps, T, seed=seed + 1)
    x_test, y_test = adding_problem(256 if quick else 2000, T, seed=seed + 2)
    start = time.perf_counter()

    print(f"truncated BPTT: LSTM H={hidden} on the adding problem, T={T}, batch {batch}, backend {backend}")
    model = Model(hidden, seed=seed)
    loss = ur.nn.mse(model(x), y)
    at_init = biases(loss, model, ks, {"x": xb, "y": yb})
    print("  bias |g_k - g_full| / |g_full| at initialisation: "
          + ", ".join(f"k={k}: {v:.3f}" for k, v in at_init.items()))

    results: dict[str, float] = {f"bias_init_k{k}": v for k, v in at_init.items()}
    x_eval = ur.input("x_eval", x_test.shape)
    for name, k in (("full", None), (f"truncated k={k_train}", k_train)):
        model = Model(hidden, seed=seed)                          # same initial weights both times
        loss = ur.nn.mse(model(x), y)
        grads = None if k is None else ur.grad(ur.truncate(loss, k), model.parameters())
        ur.fit(loss, model, {"x": x_train, "y": y_train}, steps=steps, optimizer=ur.Adam(lr=1e-2), clip=1.0,
            backend=backend, grads=grads, seed=seed)
        mse = float(np.mean((ur.compile(model(x_eval), backend=backend)(x_eval=x_test, **model.state_dict())
                             - y_test) ** 2))
        results[f"mse_{'full' if k is None else 'truncated'}"] = mse
        print(f"  trained {steps} steps with {name:<15} gradients: test MSE {mse:.4f} "
              f"(trivial {ADDING_BASELINE_MSE:.3f})")
        if k is None:
            trained = biases(loss, model, ks, {"x": xb, "y": yb})
            results.update({f"bias_trained_k{k}": v for k, v in trained.items()})
            print("  bias after full-BPTT training:                  "
                  + ", ".join(f"k={k}: {v:.3f}" for k, v in trained.items()))
    results["seconds"] = time.perf_counter() - start
    print(f"  {results['seconds']:.0f} s in all")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--T", type=int)
    a = parser.parse_args()
    main(quick=a.quick, backend=a.backend, hidden=a.hidden, T=a.T)
