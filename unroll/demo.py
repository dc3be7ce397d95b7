"""`unroll demo`: the whole story in one command, with no arguments needed.

1. builds an LSTM regressor for the adding problem and prints its IR (the time loop stays rolled:
   the IR is the same size for T=20 or T=2000);
2. draws it: rolled, unrolled (one cell per time step) and the backward pass (BPTT) as pictures;
3. trains it on the adding problem with a progress bar and reports the test MSE against the
   trivial predictor's 0.167, plus the gradient flow ‖∂L/∂h_t‖ before and after training;
4. times one training step (forward + BPTT) of each implementation: unroll's numpy reference,
   unroll's Numba backend, PyTorch (when installed), with ratios.

Everything goes to an output folder (default ./unroll_demo/). `quick=True` runs every section with
tiny settings (a few training steps, few timing repetitions) and still writes every file.
"""

from __future__ import annotations

import functools
import gc
import importlib
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from . import dsl, nn
from .compile import compile
from .data import ADDING_BASELINE_MSE, adding_problem
from .ir.node import Graph, Node

INSTALL_GRAPHVIZ = ("Graphviz's `dot` program was not found, so the pictures were written as .dot "
                    "text. Install it (`apt-get install graphviz`, `brew install graphviz`, `conda "
                    "install graphviz`, or `pip install pygraphviz`, whose wheels bundle it) and run "
                    "`unroll demo` again, or render a file yourself: dot -Tsvg {example} -o picture.svg")


@dataclass
class DemoConfig:
    out: Path = Path("unroll_demo")
    quick: bool = False
    backend: str = "auto"        # "auto" (numba when it works, else numpy), "numpy" or "numba"
    T: int = 20                  # adding-problem sequence length
    batch: int = 64
    hidden: int = 32
    steps: int | None = None     # training steps (default: 600, quick: 8)
    lr: float = 1e-2
    fmt: str = "svg"             # picture format: svg, png or pdf (dot: text only)
    bench: bool = True
    seed: int = 0
    picture_T: int = 4           # sequence length of the unrolled pictures (readable)

    @property
    def train_steps(self) -> int:
        return self.steps if self.steps is not None else (8 if self.quick else 600)


@dataclass
class DemoResult:
    files: list[Path] = field(default_factory=list)
    backend: str = "numpy"
    test_mse: float = math.nan
    train_seconds: float = math.nan
    bench: dict[str, float] = field(default_factory=dict)   # implementation -> ms per step
    rendered: bool = True


class _Out:
    """Printing with section headers."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, *parts: Any) -> None:
        print(*parts, file=self.stream, flush=True)

    def section(self, title: str) -> None:
        self(f"\n== {title} " + "=" * max(3, 76 - len(title)))


# ---- the model ---------------------------------------------------------------------------------


@dataclass
class AddingModel:
    """An LSTM over (T, B, 2) and a Linear head on its last output: the adding-problem regressor."""

    lstm: nn.LSTM
    head: nn.Linear
    x: Node
    y: Node
    loss: Node

    @property
    def modules(self) -> list[nn.Module]:
        return [self.lstm, self.head]

    def values(self) -> dict[str, np.ndarray]:
        return {**self.lstm.state_dict(), **self.head.state_dict()}

    def predict(self, x: Node) -> Node:
        out, _ = self.lstm(x)
        return self.head(nn.many_to_one(out))


def build_adding_model(T: int, batch: int, hidden: int, seed: int = 0, dtype: str = "float32") -> AddingModel:
    lstm = nn.LSTM(2, hidden, name="lstm", seed=seed, dtype=dtype)
    head = nn.Linear(hidden, 1, name="head", seed=seed + 1, dtype=dtype)
    x = dsl.input("x", (T, batch, 2), dtype)
    y = dsl.input("y", (batch, 1), dtype)
    out, _ = lstm(x)
    loss = nn.mse(head(nn.many_to_one(out)), y)
    return AddingModel(lstm, head, x, y, loss)


# ---- pictures -----------------------------------------------------------------------------------


def draw_pictures(cfg: DemoConfig, say: _Out, result: DemoResult) -> None:
    """Rolled and unrolled forward graphs and the backward graph, rendered or as .dot text."""
    from .ir.autodiff import grad
    from .viz import draw

    small = build_adding_model(cfg.picture_T, 1, 3, seed=cfg.seed)
    forward = dsl.graph(small.loss)
    backward = dsl.graph(small.loss, grad(small.loss, small.lstm.parameters()))
    pictures: list[tuple[str, Graph, str, str]] = [
        ("lstm_rolled", forward, "rolled",
         "the model as written: one LSTM cell in a loop, (h, c) carried on red back-edges"),
        ("lstm_unrolled", forward, "unrolled",
         f"the same graph unrolled: one cell per time step (T={cfg.picture_T})"),
        ("lstm_backward_rolled", backward, "rolled",
         "forward loop + BPTT: the gradient is a reversed loop"),
        ("lstm_backward_unrolled", backward, "unrolled",
         "BPTT unrolled: forward (blue) and backward (red) ops of each step"),
    ]
    fmt = cfg.fmt.lower().lstrip(".")
    rendered = fmt not in ("dot", "gv")
    for stem, graph, view, what in pictures:
        path = cfg.out / f"{stem}.{fmt if rendered else 'dot'}"
        if rendered:
            try:
                draw(graph, path, view=view)
            except RuntimeError as err:
                if "not found" not in str(err):
                    raise
                rendered = False
                path = cfg.out / f"{stem}.dot"
        if not rendered:
            draw(graph, path, view=view)
        result.files.append(path)
        say(f"  {path!s:<42} {what}")
    if not rendered and fmt not in ("dot", "gv"):
        result.rendered = False
        say("  " + INSTALL_GRAPHVIZ.format(example=cfg.out / "lstm_rolled.dot"))


# ---- training -------------------------------------------------------------------------------------


def pick_backend(requested: str, say: _Out) -> str:
    """"auto": numba when its backend imports (it compiles on first use), else numpy."""
    if requested != "auto":
        return requested
    try:
        importlib.import_module("unroll.backends.cpu")  # imports numba
    except Exception as err:  # noqa: BLE001 - any failure (missing, broken install): use the reference
        say(f"  (numba backend unavailable: {type(err).__name__}: {err}; using numpy)")
        return "numpy"
    return "numba"


def _make_trainer(model: AddingModel, backend: str, lr: float, seed: int):
    from .train import Adam, TrainStep
    return TrainStep(model.loss, model.modules, optimizer=Adam(lr=lr), clip=1.0, backend=backend, seed=seed)


def train(cfg: DemoConfig, model: AddingModel, say: _Out, result: DemoResult) -> None:
    from .diagnostics import gradient_flow, plot_gradient_flow
    from .train import fit, save_params

    T, B = cfg.T, cfg.batch
    steps = cfg.train_steps
    x_train, y_train = adding_problem(B * steps, T, seed=cfg.seed + 1)  # fresh examples every step
    n_test = 256 if cfg.quick else 2000
    x_test, y_test = adding_problem(n_test, T, seed=cfg.seed + 2)
    probe_x, probe_y = x_train[:, :B], y_train[:B]

    def flow(name: str):
        return gradient_flow(model.lstm, lambda out: nn.mse(model.head(nn.many_to_one(out)), model.y),
                             model.x, {"x": probe_x, "y": probe_y}, values=model.values(), name=name)

    before = flow("LSTM before training")
    # quick runs skip the Numba compile (seconds) unless numba is asked for by name
    backend = "numpy" if cfg.quick and cfg.backend == "auto" else pick_backend(cfg.backend, say)
    say(f"  task: y = the sum of the 2 marked values among T={T} (x: (T, B, 2) values and markers)")
    say(f"  model: {model.lstm!r} -> Linear({cfg.hidden}, 1) on the last step; Adam lr={cfg.lr}, "
        f"clip 1.0, batch {B}, {steps} steps ({B * steps} fresh sequences), backend {backend}")
    start = time.perf_counter()
    try:
        trainer = _make_trainer(model, backend, cfg.lr, cfg.seed)
    except Exception as err:  # a backend that cannot compile this graph: fall back to the reference
        if backend == "numpy" or cfg.backend != "auto":
            raise
        say(f"  ({backend} backend failed, using numpy: {str(err).splitlines()[0]})")
        backend = "numpy"
        trainer = _make_trainer(model, backend, cfg.lr, cfg.seed)
    compile_s = time.perf_counter() - start
    res = fit(model.loss, model.modules, {"x": x_train, "y": y_train}, steps=steps, trainer=trainer,
              progress=True, seed=cfg.seed)
    result.train_seconds = res.history.seconds
    result.backend = backend
    trainer.write_back()
    if res.history.stopped:
        say(f"  stopped early: {res.history.stopped}")

    test_x = dsl.input("x_test", x_test.shape)
    predict = compile(model.predict(test_x), backend="numpy")
    pred = predict(x_test=x_test, **model.values())
    mse = float(np.mean((pred - y_test) ** 2))
    result.test_mse = mse
    losses = res.history.loss
    tail = losses[-max(1, len(losses) // 10):]
    say(f"  trained in {res.history.seconds:.1f} s (+{compile_s:.1f} s to build and compile), "
        f"{1e3 * res.history.seconds / max(1, len(losses)):.1f} ms/step; last-10% training loss "
        f"{np.mean(tail):.4f}")
    verdict = (f"{ADDING_BASELINE_MSE / mse:.0f}x lower" if mse < ADDING_BASELINE_MSE / 2
               else "not yet better: train longer (--steps)")
    say(f"  test MSE {mse:.4f} on {n_test} new sequences  vs  trivial predictor (always 1.0) "
        f"{ADDING_BASELINE_MSE:.3f}: {verdict}")
    for i in range(3):
        marked = np.flatnonzero(x_test[:, i, 1])
        a, b = (float(x_test[t, i, 0]) for t in marked)
        say(f"    steps {marked[0]:>2} and {marked[1]:>2}: {a:.3f} + {b:.3f} = {a + b:.3f}, "
            f"the LSTM says {float(pred[i, 0]):.3f}")
    params_path = cfg.out / "adding_lstm.npz"
    save_params(params_path, model.values())
    result.files.append(params_path)
    after = flow("LSTM after training")
    png = plot_gradient_flow([before, after], cfg.out / "gradient_flow.png",
                             title=f"‖∂L/∂h_t‖ of the adding-problem LSTM (T={T})")
    result.files.append(png)
    say(f"  {params_path!s:<42} trained parameters (ur.load_params)")
    say(f"  {png!s:<42} gradient flow: {before}")
    say(f"  {'':<42}                {after}")


# ---- benchmark ------------------------------------------------------------------------------------


def _time(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of `reps` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _blas_threads() -> str:
    """numpy's BLAS thread count as threadpoolctl sees it (else the environment variable)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return os.environ.get("OPENBLAS_NUM_THREADS", "default")
    counts = sorted({str(pool["num_threads"]) for pool in threadpool_info()
                     if pool.get("user_api") == "blas"})
    return "/".join(counts) or "unknown"


def _torch_step(cfg: DemoConfig, x: np.ndarray, y: np.ndarray) -> Callable[[], Any] | None:
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(cfg.seed)
    lstm, head = torch.nn.LSTM(2, cfg.hidden), torch.nn.Linear(cfg.hidden, 1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    params = list(lstm.parameters()) + list(head.parameters())

    def step() -> Any:
        for p in params:
            p.grad = None
        out, _ = lstm(xt)
        loss = torch.nn.functional.mse_loss(head(out[-1]), yt)
        loss.backward()
        return loss
    return step


def bench(cfg: DemoConfig, model: AddingModel, say: _Out, result: DemoResult) -> None:
    from .ir.autodiff import value_and_grad

    x, y = adding_problem(cfg.batch, cfg.T, seed=cfg.seed + 3)
    # the nodes TrainStep compiled (interned: the same graph, so Numba reuses its compiled module)
    loss, grads = value_and_grad(model.loss, model.lstm.parameters() + model.head.parameters())
    feeds = {"x": x, "y": y, **model.values()}
    reps = 3 if cfg.quick else 20
    say(f"  one training step = forward + BPTT + all gradients, T={cfg.T} B={cfg.batch} I=2 "
        f"H={cfg.hidden}, float32, median of {reps}; {os.cpu_count()} CPUs ({platform.machine()}), "
        f"numpy BLAS threads: {_blas_threads()}")
    rows: list[tuple[str, float, str]] = []
    backends = ["numpy"] + ([] if cfg.quick and cfg.backend != "numba" else ["numba"])
    for backend in backends:
        name = f"unroll {backend}" + (" (reference)" if backend == "numpy" else "")
        try:
            start = time.perf_counter()
            step = compile([loss, *grads], backend=backend)
            build = time.perf_counter() - start
        except Exception as err:  # noqa: BLE001 - report and go on: the demo must finish
            say(f"  {name:<24} skipped: {str(err).splitlines()[0]}")
            continue
        note = f"ur.compile took {build:.1f} s" if backend != "numpy" else ""
        rows.append((name, _time(functools.partial(step, **feeds), reps), note))
    torch_step = _torch_step(cfg, x, y)
    if torch_step is None:
        say("  PyTorch not installed: skipped (pip install torch==2.13.0 for a CPU build)")
    else:
        import torch
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread like unroll's backends: on a busy machine more threads
        try:                      # oversubscribe the cores and time the contention, not the work
            rows.append((f"PyTorch {torch.__version__.split('+')[0]}", _time(torch_step, reps),
                         "nn.LSTM (oneDNN), 1 thread"))
        finally:
            torch.set_num_threads(threads)
    if not rows:
        return
    ref = rows[0][1]
    say(f"  {'implementation':<24} {'ms/step':>9} {'vs numpy':>10}")
    for name, seconds, note in rows:
        result.bench[name] = 1e3 * seconds
        ratio = ref / seconds
        say(f"  {name:<24} {1e3 * seconds:>9.2f} {ratio:>9.1f}x  {note}")
    say("  (`unroll bench --help` for the full benchmark: more sizes, GRU and RNN, JAX)")


# ---- the whole demo ------------------------------------------------------------------------------


def run_demo(cfg: DemoConfig, stream: TextIO = sys.stdout) -> DemoResult:
    say = _Out(stream)
    result = DemoResult()
    cfg.out.mkdir(parents=True, exist_ok=True)

    # Each section builds its own model: modules with the same parameter names must not be alive
    # at the same time (they would share parameters), and the picture model is a small one.
    say.section("1. The model and its IR")
    model = build_adding_model(cfg.T, cfg.batch, cfg.hidden, seed=cfg.seed)
    say(f"  {model.lstm!r} over x: (T={cfg.T}, B={cfg.batch}, I=2), {model.head!r} on the last step, "
        f"MSE loss")
    say("  The IR keeps the time loop rolled: one `loop` node whose body is one LSTM step.\n")
    say(str(dsl.graph(model.loss)))
    del model
    gc.collect()

    say.section(f"2. Pictures -> {cfg.out}/")
    draw_pictures(cfg, say, result)
    gc.collect()

    say.section("3. Training on the adding problem")
    model = build_adding_model(cfg.T, cfg.batch, cfg.hidden, seed=cfg.seed)
    train(cfg, model, say, result)

    if cfg.bench:
        say.section("4. Benchmark: one training step")
        bench(cfg, model, say, result)
    say(f"\nDone. Files in {cfg.out}/: " + ", ".join(p.name for p in result.files))
    return result


__all__ = ["DemoConfig", "DemoResult", "build_adding_model", "run_demo"]
