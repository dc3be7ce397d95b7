"""A custom recurrent cell written in the DSL, end to end: declare, grad, optimize, compile, train.

The cell is the Minimal Gated Unit (Zhou et al. 2016), one gate instead of the GRU's two:
    f  = sigmoid([x, h] W_f + b_f)
    h~ = tanh([x, f * h] W_h + b_h)
    h' = (1 - f) * h + f * h~
It is written as a plain Python step function over symbolic values and traced by ur.scan into one
rolled loop; nothing in ur.nn is used. The steps:
  1. declare parameters (ur.param with init specs) and inputs (ur.input);
  2. ur.value_and_grad: the backward pass (BPTT) is more IR, a reversed loop;
  3. check that gradient against central finite differences in float64 on a tiny instance;
  4. ur.explain / ur.optimize: the pass pipeline and what each pass changes per time step;
  5. ur.compile the optimized graph, check it against the reference, and train with a hand-written
     loop: compiled step -> gradient clipping -> Adam update on the named arrays.

Measured (2-core x86 machine shared with other jobs, numpy backend, one BLAS thread, H=32, adding
problem T=20, batch 64, 600 steps, `python examples/custom_cell.py`, 8.5 s in all):
    finite-difference check: max relative error 2.5e-08
    optimized + compiled vs the unoptimized reference: max difference 5.4e-07 (float32)
    test MSE 0.0007 (trivial 0.167); 7 s of training

Re-derived by tests/test_examples.py with the same seeds: the default tests run the quick size (T=6,
H=8, batch 16, 3 training steps; the finite-difference check is the same at both sizes), `pytest -m
slow` the full run above. The two rounding errors are bounded rather than matched: they depend on
the BLAS build's summation order.
    main(quick=True) -> mse=0.6566 grad_check_error<1e-7 max_difference<1e-6
    main()           -> mse=0.0007 grad_check_error<1e-7 max_difference<2e-6

    python examples/custom_cell.py [--quick] [--backend numba] [--hidden H]
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


def mgu_model(T: int, batch: int, inputs: int, hidden: int, dtype: str = "float32"):
    """The adding-problem regressor with an MGU cell: returns (x, y, prediction, loss, params)."""
    x = ur.input("x", (T, batch, inputs), dtype)
    y = ur.input("y", (batch, 1), dtype)
    w_f = ur.param("W_f", (inputs + hidden, hidden), "glorot", dtype)
    b_f = ur.param("b_f", (hidden,), "ones", dtype)        # gates start open-ish: remember by default
    w_h = ur.param("W_h", (inputs + hidden, hidden), "glorot", dtype)
    b_h = ur.param("b_h", (hidden,), "zeros", dtype)
    w_o = ur.param("W_o", (hidden, 1), "glorot", dtype)
    b_o = ur.param("b_o", (1,), "zeros", dtype)

    def step(h: ur.Node, x_t: ur.Node) -> tuple[ur.Node, ur.Node]:
        f = ur.sigmoid(ur.concat([x_t, h], -1) @ w_f + b_f)
        candidate = ur.tanh(ur.concat([x_t, f * h], -1) @ w_h + b_h)
        h = (1.0 - f) * h + f * candidate
        return h, h

    h_last, _ = ur.scan(step, init=ur.zeros((batch, hidden), dtype), xs=x)
    prediction = h_last @ w_o + b_o
    loss = ur.mean((prediction - y) ** 2)
    return x, y, prediction, loss, [w_f, b_f, w_h, b_h, w_o, b_o]


def gradient_check(seed: int = 0) -> float:
    """Max relative error of ur.grad against central differences, float64, along random directions."""
    _, _, _, loss, params = mgu_model(T=5, batch=3, inputs=2, hidden=4, dtype="float64")
    f = ur.compile(loss, backend="numpy")
    df = ur.compile(ur.grad(loss, params), backend="numpy")
    rng = np.random.default_rng(seed)
    xv, yv = adding_problem(3, 5, seed=seed, dtype=np.float64)
    values = ur.init_values(params, seed)
    grads = df(x=xv, y=yv, **values)
    worst = 0.0
    for p, g in zip(params, grads):
        d = rng.normal(size=p.shape)
        eps = 1e-6
        plus = f(x=xv, y=yv, **{**values, p.name: values[p.name] + eps * d})
        minus = f(x=xv, y=yv, **{**values, p.name: values[p.name] - eps * d})
        numeric, analytic = (plus - minus) / (2 * eps), float(np.sum(g * d))
        worst = max(worst, abs(numeric - analytic) / max(1e-12, abs(numeric) + abs(analytic)))
    return worst


def main(quick: bool = False, backend: str = "numpy", epochs: int | None = None, hidden: int | None = None,
         seed: int = 0, T: int | None = None, steps: int | None = None) -> dict:
    T = T or (6 if quick else 20)
    hidden = hidden or (8 if quick else 32)
    batch = 16 if quick else 64
    steps = steps or (3 if quick else 600)
    start = time.perf_counter()

    # 1-2. declare the model, then differentiate it
    _, _, _, loss, params = mgu_model(T, batch, 2, hidden)
    loss_value, grads = ur.value_and_grad(loss, params)   # the loss shares the forward loop
    graph = ur.graph(loss_value, grads)
    print(f"MGU cell, H={hidden}, on the adding problem T={T}: {len(graph.nodes())} top-level nodes "
          f"for the loss and {len(params)} gradients")

    # 3. the gradient is right
    error = gradient_check(seed)
    print(f"  finite-difference check (float64): max relative error {error:.1e}")

    # 4. what the passes do, per time step of each loop (forward + backward)
    report = ur.explain(graph)
    print("\n" + str(report) + "\n")
    optimized = ur.optimize(graph)

    # 5. compile, check against the reference interpreter, train
    train_step = ur.compile(optimized, backend=backend)
    reference = ur.compile(graph, backend="numpy")
    values = ur.init_values(params, seed)
    xb, yb = adding_problem(batch, T, seed=seed + 3)
    got, want = train_step(x=xb, y=yb, **values), reference(x=xb, y=yb, **values)
    mismatch = max(float(np.max(np.abs(a - b))) for a, b in zip(got, want))
    print(f"  optimized + compiled ({backend}) vs the unoptimized reference: max difference {mismatch:.1e}")

    optimizer = ur.Adam(lr=1e-2)
    rng = np.random.default_rng(seed + 1)
    train_start = time.perf_counter()
    for i in range(steps):
        xb, yb = adding_problem(batch, T, seed=rng)
        loss_v, *grad_v = train_step(x=xb, y=yb, **values)
        clipped, _ = ur.clip_by_global_norm(dict(zip(values, grad_v)), 1.0)
        optimizer.step(values, clipped)
        if (i + 1) % max(1, steps // 5) == 0:
            print(f"  step {i + 1:>4}: loss {float(loss_v):.4f}")
    seconds = time.perf_counter() - train_start

    x_test, y_test = adding_problem(256 if quick else 2000, T, seed=seed + 2)
    # the same cell at another batch size: same parameter names, so the trained values fit
    _, _, test_prediction, _, _ = mgu_model(T, x_test.shape[1], 2, hidden)
    predict = ur.compile(test_prediction, backend=backend)
    mse = float(np.mean((predict(x=x_test, **values) - y_test) ** 2))
    print(f"  test MSE {mse:.4f} (trivial {ADDING_BASELINE_MSE:.3f}), {seconds:.0f} s of training, "
          f"{time.perf_counter() - start:.0f} s in all")
    return {"grad_check_error": error, "max_difference": mismatch, "mse": mse, "seconds": seconds}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--T", type=int)
    a = parser.parse_args()
    main(quick=a.quick, backend=a.backend, hidden=a.hidden, T=a.T)
