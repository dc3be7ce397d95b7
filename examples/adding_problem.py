"""The adding problem with a TCN, an LSTM and a GRU side by side (many-to-one regression).

Each sequence holds T random values and two markers; the target is the sum of the two marked values
(unroll.data.adding_problem, after Bai, Kolter & Koltun 2018). Predicting 1.0 always gives MSE 0.167;
a model has learnt the task when its test MSE is far below that. All three models see the same
batches and are trained with Adam and gradient clipping by ur.fit; the TCN is a causal dilated
convolution stack whose receptive field covers the whole sequence, the RNNs read the sequence with
one rolled loop each.

Measured (2-core x86 machine shared with other jobs, numpy backend, one BLAS thread, T=20, 9600
training sequences, batch 64, 6 epochs = 900 steps, H=32, TCN kernel 7 x 2 levels,
`python examples/adding_problem.py`, 48 s in all):
    TCN   test MSE 0.0008 (213x below the trivial 0.167)   28 s of training
    LSTM  test MSE 0.0008 (202x below)                      11 s
    GRU   test MSE 0.0002 (1012x below)                      8 s
(the numpy interpreter runs the TCN's large im2col matmuls slower than the RNNs' small steps; all
three sit on the trivial 0.167 plateau for the first few hundred steps before they find the markers)

Re-derived by tests/test_examples.py with the same seeds: the default tests run the quick size (T=8,
64 training sequences, batch 16, 1 epoch = 4 steps, H=8: too short to learn anything), `pytest -m
slow` the full run above:
    main(quick=True) -> TCN_mse=0.8918 LSTM_mse=0.8687 GRU_mse=0.4526
    main()           -> TCN_mse=0.0008 LSTM_mse=0.0008 GRU_mse=0.0002

    python examples/adding_problem.py [--quick] [--backend numba] [--epochs N] [--hidden H] [--T T]
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

TCN_KERNEL = 7  # as in the TCN paper's adding-problem runs: few levels, many paths to every step



class Regressor(ur.nn.Module):
    """A sequence body (TCN, LSTM or GRU) and a Linear head on its last time step."""

    def __init__(self, kind: str, hidden: int, T: int, seed: int = 0) -> None:
        super().__init__(name=kind.lower(), seed=seed)
        self.kind = kind
        if kind == "TCN":
            levels = ur.nn.tcn_levels(T, TCN_KERNEL)
            self.body = ur.nn.TCN(2, [hidden] * levels, kernel_size=TCN_KERNEL, seed=self.child_seed())
        else:
            self.body = getattr(ur.nn, kind)(2, hidden, seed=self.child_seed())
        self.head = ur.nn.Linear(hidden, 1, seed=self.child_seed())

    def forward(self, x: ur.Node) -> ur.Node:
        out = self.body(x) if self.kind == "TCN" else self.body(x)[0]
        return ur.nn.many_to_one(out, self.head)      # (B, 1) from the last step


def main(quick: bool = False, backend: str = "numpy", epochs: int | None = None, hidden: int | None = None,
         seed: int = 0, T: int | None = None, kinds: tuple[str, ...] = ("TCN", "LSTM", "GRU")) -> dict:
    T = T or (8 if quick else 20)
    hidden = hidden or (8 if quick else 32)
    epochs = epochs or (1 if quick else 6)
    batch = 16 if quick else 64
    n_train, n_test = (64, 64) if quick else (9600, 2000)
    x_train, y_train = adding_problem(n_train, T, seed=seed + 1)
    x_test, y_test = adding_problem(n_test, T, seed=seed + 2)

    x = ur.input("x", (T, batch, 2))
    y = ur.input("y", (batch, 1))
    x_eval = ur.input("x_eval", (T, n_test, 2))
    print(f"adding problem: T={T}, {n_train} training sequences, batch {batch}, {epochs} epochs, "
          f"hidden {hidden}, backend {backend}; trivial MSE {ADDING_BASELINE_MSE:.3f}")
    results: dict[str, float] = {}
    for kind in kinds:
        model = Regressor(kind, hidden, T, seed=seed)
        loss = ur.nn.mse(model(x), y)
        start = time.perf_counter()
        ur.fit(loss, model, {"x": x_train, "y": y_train}, epochs=epochs, optimizer=ur.Adam(lr=1e-2),
               clip=1.0, backend=backend, seed=seed)
        seconds = time.perf_counter() - start
        predict = ur.compile(model(x_eval), backend=backend)
        mse = float(np.mean((predict(x_eval=x_test, **model.state_dict()) - y_test) ** 2))
        results[f"{kind}_mse"] = mse
        results[f"{kind}_seconds"] = seconds
        print(f"  {kind:<5} test MSE {mse:.4f} ({ADDING_BASELINE_MSE / mse:.0f}x below trivial)  "
              f"{seconds:.0f} s")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--T", type=int)
    a = parser.parse_args()
    main(quick=a.quick, backend=a.backend, epochs=a.epochs, hidden=a.hidden, T=a.T)
