"""`unroll bench`: one float32 training step per cell and size, unroll against PyTorch and JAX.

A training step is forward + BPTT with an MSE loss on every time step, returning the loss and the
gradient of every parameter. Cells: RNN (tanh), LSTM, GRU and a TCN (4 levels, kernel 3, dilations
1, 2, 4, 8, H channels). Configurations (T, B, I, H) are `CONFIGS` plus any given as `T,B,I,H`.

Each row (one implementation of one cell at one size) is measured in a process of its own, so no
framework's thread pools, allocator state or JIT caches sit beside another's (timed in one process,
PyTorch's LSTM medium step took 101.8 ms against 59.9 ms alone). In that process: the first call,
which includes compilation (unroll's code generation and Numba, JAX's jit), is reported separately,
then a short rest, a warm-up and the median of repeats. `--load N` runs N busy processes beside the
benchmark for the whole run (a loaded laptop, a CI runner, other MPI ranks). `isolate=False` measures
in the calling process (tests):
  numpy          unroll's reference interpreter
  numba          unroll's Numba CPU backend with the default passes (ur.optimize)
  numba-<pass>   the same with one pass of the pipeline switched off (--ablations), numba-O0 with none
  torch          torch.nn.RNN / LSTM / GRU, and a Conv1d TCN (PyTorch CPU)
  jax            jax.jit(jax.value_and_grad(...)) over lax.scan, and lax.conv for the TCN (if installed)
Peak memory is the peak resident-set growth during one warm step (Linux /proc/self/clear_refs resets
the high-water mark; freed heap is trimmed first), so it counts every allocator alike: numpy, Numba's
NRT, PyTorch and XLA. Where /proc is not writable it falls back to tracemalloc (Python/numpy only).

    python -m unroll.bench --cells lstm gru --configs tiny small 32,8,16,64 --out benchmarks/results
    run_bench(cells=("lstm",), configs=("tiny",))   -> dict with "header" and "rows"

From the command line the results always land on disk: bench.json, bench.md and bench.png in --out
(default ./unroll_bench), and the last line says where. run_bench writes only when given out_dir.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

CONFIGS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (50, 1, 16, 32),
    "small": (50, 16, 32, 64),
    "medium": (100, 32, 128, 256),
    "large": (100, 64, 256, 512),
    "long": (1000, 8, 32, 128),
}
GPU_CONFIGS: dict[str, tuple[int, int, int, int]] = {"xl": (100, 256, 512, 1024)}  # with --backend cuda
BACKENDS = ("numba", "cuda")
CELLS = ("rnn", "lstm", "gru", "tcn")
TCN_LEVELS, TCN_KERNEL = 4, 3
PEERS = ("torch", "jax")
DEFAULT_OUT = "unroll_bench"  # the command line's --out: a run's numbers are never only on the screen
BENCH_EXTRA = 'pip install -e ".[bench]"'  # the extra that brings PyTorch and JAX (pyproject.toml)

Step = Callable[[], Any]


@dataclass
class Row:
    """One measurement: an implementation of one cell at one configuration."""

    cell: str
    config: str
    T: int
    B: int
    I: int  # noqa: E741 - the usual name of the input size
    H: int
    impl: str
    median_ms: float | None = None
    first_ms: float | None = None      # the first call: compile (+ cache load) and one step
    peak_mb: float | None = None
    repeats: int = 0
    note: str = ""
    extra: dict = field(default_factory=dict)


# ---- environment ---------------------------------------------------------------------------------

def header() -> dict[str, Any]:
    """Thread counts and BLAS settings that decide the numbers (printed above the table)."""
    info: dict[str, Any] = {
        "machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "numpy": np.__version__,
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "(unset: one per core)"),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE", "(unset)"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        import numba
        info["numba"] = numba.__version__
        info["numba_threads"] = numba.config.NUMBA_NUM_THREADS
        from unroll.backends.cpu import backend as numba_cpu
        from unroll.backends.cpu.kernels_ir import PACKED_MAX_MACS
        info["numba_generated_code"] = (
            "single-threaded (no prange); per-step products by a weight up to "
            f"{PACKED_MAX_MACS // 2 ** 20}M multiply-adds: packed-weight micro-kernel, "
            "other large ones: scipy's OpenBLAS")
        from unroll.backends.cpu import threads
        info["BLAS threads of numba code (scipy OpenBLAS)"] = (
            "as set: %d outside / %d inside time loops" % threads.user_threads() if threads.user_threads()
            else f"per call: 1 below {threads.MIN_MACS_FOR_THREADS // 2 ** 20}M multiply-adds, else the free cores")
        info["glibc keeps freed memory (UNROLL_MALLOC_TUNING, process-wide)"] = numba_cpu.MALLOC_TUNED
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_info
        info["blas_pools"] = [f"{p.get('internal_api')} {p.get('version')} threads={p.get('num_threads')} "
                              f"({os.path.basename(p.get('filepath', ''))})" for p in threadpool_info()]
    except ImportError:
        pass
    torch = _try_import("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    jax = _try_import("jax")
    if jax is not None:
        info["jax"] = jax.__version__
        info["jax_devices"] = [str(d) for d in jax.devices()]
    return info


def _try_import(name: str):
    try:
        return __import__(name)
    except Exception:  # an absent or broken optional peer is skipped, never fatal
        return None


# ---- peak memory ---------------------------------------------------------------------------------

def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(field_name)


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_memory_mb(step: Step) -> tuple[float, str]:
    """Peak memory growth of one call of `step` in MB, and the method used."""
    _trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS high-water mark (Linux >= 4.0)
        before = _rss_kb("VmRSS")
        step()
        return max(0, _rss_kb("VmHWM") - before) / 1024, "rss"
    except OSError:
        tracemalloc.start()
        try:
            step()
            return tracemalloc.get_traced_memory()[1] / 2 ** 20, "tracemalloc"
        finally:
            tracemalloc.stop()


# ---- data ----------------------------------------------------------------------------------------

def make_data(T: int, B: int, I: int, H: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:  # noqa: E741
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((T, B, I)).astype(np.float32),
            rng.standard_normal((T, B, H)).astype(np.float32))


# ---- unroll --------------------------------------------------------------------------------------

def unroll_model(cell: str, T: int, B: int, I: int, H: int):  # noqa: E741
    """(graph of [loss, *grads], the module) for one training step."""
    import unroll as ur
    from unroll.ir.autodiff import grad
    x = ur.input("x", (T, B, I))
    y = ur.input("y", (T, B, H))
    if cell == "tcn":
        model = ur.nn.TCN(I, [H] * TCN_LEVELS, kernel_size=TCN_KERNEL)
        out = model(x)
    else:
        model = {"rnn": ur.nn.RNN, "lstm": ur.nn.LSTM, "gru": ur.nn.GRU}[cell](I, H)
        out, _ = model(x)
    loss = ur.mean((out - y) ** 2)
    params = list(model.parameters())
    return ur.graph([loss, *grad(loss, params)]), model


def unroll_step(cell: str, T: int, B: int, I: int, H: int, backend: str, **options: Any  # noqa: E741
                ) -> tuple[Step, dict]:
    import unroll as ur
    graph, model = unroll_model(cell, T, B, I, H)
    xv, yv = make_data(T, B, I, H)
    feeds = {"x": xv, "y": yv, **model.state_dict()}
    compiled = ur.compile(graph, backend=backend, **options)
    if backend == "cuda":  # inputs and parameters live on the device, as in a training loop
        from numba import cuda
        feeds = {k: cuda.to_device(np.ascontiguousarray(v)) for k, v in feeds.items()}
        info = {"device": str(getattr(cuda.get_current_device(), "name", "cuda"))}

        def step() -> Any:
            out = compiled(**feeds)
            cuda.synchronize()
            return out
        return step, info
    info = {}
    impl = getattr(compiled, "impl", None)
    if hasattr(impl, "from_cache"):
        info["from_cache"] = impl.from_cache
    return (lambda: compiled(**feeds)), info


# ---- PyTorch -------------------------------------------------------------------------------------

def torch_step(cell: str, T: int, B: int, I: int, H: int, device: str = "cpu") -> tuple[Step, dict]:  # noqa: E741
    import torch
    xv, yv = make_data(T, B, I, H)
    x, y = torch.from_numpy(xv).to(device), torch.from_numpy(yv).to(device)
    if cell == "tcn":
        model = torch_tcn(torch, I, [H] * TCN_LEVELS, TCN_KERNEL)
        x = x.permute(1, 2, 0).contiguous()   # (B, C, T) for Conv1d
        y = y.permute(1, 2, 0).contiguous()

        def forward() -> Any:
            return model(x)
    else:
        model = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](I, H)

        def forward() -> Any:
            return model(x)[0]
    model = model.to(device)
    params = list(model.parameters())

    def step() -> Any:
        for p in params:
            p.grad = None
        loss = torch.mean((forward() - y) ** 2)
        loss.backward()
        return loss.item(), [p.grad for p in params]
    return step, {}


def torch_tcn(torch: Any, n_in: int, channels: Sequence[int], kernel: int, seq_first: bool = False) -> Any:
    """Bai, Kolter & Koltun's TCN in PyTorch, without weight_norm and dropout: the peer in this
    benchmark and the reference in the tests (its state_dict names are ur.nn.TCN's). Input
    (B, C, T), or (T, B, C) like ur.nn.TCN with `seq_first`."""
    nn = torch.nn

    class TemporalBlock(nn.Module):
        """Conv1d padded by (k-1)*d on both sides, then the last (k-1)*d steps chomped."""

        def __init__(self, cin: int, cout: int, dilation: int) -> None:
            super().__init__()
            self.pad = (kernel - 1) * dilation
            self.conv1 = nn.Conv1d(cin, cout, kernel, padding=self.pad, dilation=dilation)
            self.conv2 = nn.Conv1d(cout, cout, kernel, padding=self.pad, dilation=dilation)
            self.downsample = nn.Conv1d(cin, cout, 1) if cin != cout else None

        def chomp(self, x: Any) -> Any:
            return x[..., :-self.pad] if self.pad else x

        def forward(self, x: Any) -> Any:
            out = torch.relu(self.chomp(self.conv1(x)))
            out = torch.relu(self.chomp(self.conv2(out)))
            return torch.relu(out + (x if self.downsample is None else self.downsample(x)))

    class TCN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = nn.Sequential(*[TemporalBlock(n_in if i == 0 else channels[i - 1], c, 2 ** i)
                                           for i, c in enumerate(channels)])

        def forward(self, x: Any) -> Any:
            if seq_first:
                return self.network(x.permute(1, 2, 0)).permute(2, 0, 1)
            return self.network(x)

    return TCN()


# ---- JAX -----------------------------------------------------------------------------------------

def jax_step(cell: str, T: int, B: int, I: int, H: int) -> tuple[Step, dict]:  # noqa: E741
    import jax
    import jax.numpy as jnp
    xv, yv = make_data(T, B, I, H)
    rng = np.random.default_rng(1)
    x, y = jnp.asarray(xv), jnp.asarray(yv)
    if cell == "tcn":
        params = []
        for level in range(TCN_LEVELS):
            cin = I if level == 0 else H
            params.append({"w1": rng.normal(0, 0.01, (H, cin, TCN_KERNEL)), "b1": np.zeros(H),
                           "w2": rng.normal(0, 0.01, (H, H, TCN_KERNEL)), "b2": np.zeros(H),
                           **({"wd": rng.normal(0, 0.01, (H, cin, 1)), "bd": np.zeros(H)} if cin != H else {})})
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)

        def conv(v: Any, w: Any, bias: Any, dilation: int) -> Any:   # v: (B, C, T), causal
            pad = (w.shape[-1] - 1) * dilation
            out = jax.lax.conv_general_dilated(v, w, (1,), [(pad, 0)], rhs_dilation=(dilation,),
                                               dimension_numbers=("NCH", "OIH", "NCH"))
            return out + bias[None, :, None]

        def forward(p: Any, v: Any) -> Any:
            v = jnp.transpose(v, (1, 2, 0))
            for level, blk in enumerate(p):
                d = 2 ** level
                out = jax.nn.relu(conv(jax.nn.relu(conv(v, blk["w1"], blk["b1"], d)), blk["w2"], blk["b2"], d))
                v = jax.nn.relu(out + (conv(v, blk["wd"], blk["bd"], 1) if "wd" in blk else v))
            return jnp.transpose(v, (2, 0, 1))
    else:
        gates = {"rnn": 1, "lstm": 4, "gru": 3}[cell]
        k = 1 / np.sqrt(H)
        params = {n: jnp.asarray(rng.uniform(-k, k, s), jnp.float32) for n, s in
                  (("w_ih", (gates * H, I)), ("w_hh", (gates * H, H)), ("b_ih", (gates * H,)), ("b_hh", (gates * H,)))}

        def forward(p: Any, v: Any) -> Any:
            xs = v @ p["w_ih"].T + p["b_ih"]            # input projection for all steps at once
            h0 = jnp.zeros((B, H), jnp.float32)

            def rnn(h: Any, xt: Any) -> Any:
                h = jnp.tanh(xt + h @ p["w_hh"].T + p["b_hh"])
                return h, h

            def lstm(hc: Any, xt: Any) -> Any:
                h, c = hc
                i, f, g, o = jnp.split(xt + h @ p["w_hh"].T + p["b_hh"], 4, axis=-1)
                c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
                h = jax.nn.sigmoid(o) * jnp.tanh(c)
                return (h, c), h

            def gru(h: Any, xt: Any) -> Any:
                xr, xz, xn = jnp.split(xt, 3, axis=-1)
                hr, hz, hn = jnp.split(h @ p["w_hh"].T + p["b_hh"], 3, axis=-1)
                r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
                n = jnp.tanh(xn + r * hn)
                h = (1 - z) * n + z * h
                return h, h

            fn = {"rnn": rnn, "lstm": lstm, "gru": gru}[cell]
            init = (h0, h0) if cell == "lstm" else h0
            return jax.lax.scan(fn, init, xs)[1]

    def loss_fn(p: Any, v: Any, target: Any) -> Any:
        return jnp.mean((forward(p, v) - target) ** 2)

    train = jax.jit(jax.value_and_grad(loss_fn))

    def step() -> Any:
        loss, grads = train(params, x, y)
        return jax.block_until_ready((loss, grads))
    return step, {}


# ---- measuring -----------------------------------------------------------------------------------

SETTLE_S = 0.3  # seconds of rest before each implementation's warm-up (see measure)


def measure(row: Row, make: Callable[[], tuple[Step, dict]], repeats: int, budget_s: float,
            memory: bool = True) -> Row:
    """Build (timed as part of the first call), warm up, then time `repeats` calls (fewer when one
    call is slow: at least 3 within `budget_s`); median in ms."""
    try:
        t0 = time.perf_counter()
        step, info = make()
        step()
        row.first_ms = 1e3 * (time.perf_counter() - t0)
        row.extra.update(info)
        # let the previous implementation's idle threads stop spinning first (OpenBLAS workers spin
        # for about 0.1 s after a call, OpenMP's for a while too): on a 2-core machine they take
        # the core that this implementation's own threads, or its caller, needs
        time.sleep(SETTLE_S)
        step()  # warm-up
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < repeats and (len(times) < 3 or time.perf_counter() - started < budget_s):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        row.median_ms = 1e3 * statistics.median(times)
        row.repeats = len(times)
        if memory:
            row.peak_mb, method = peak_memory_mb(step)
            row.extra["memory"] = method
    except Exception as err:  # one failing implementation must not stop the run
        row.note = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    return row


def implementations(cell: str, ablations: bool, have: dict[str, bool], backend: str = "numba"
                    ) -> dict[str, Callable[..., tuple[Step, dict]]]:
    impls: dict[str, Callable[..., tuple[Step, dict]]] = {
        "numpy": lambda *s: unroll_step(cell, *s, backend="numpy"),
        backend: lambda *s: unroll_step(cell, *s, backend=backend),
    }
    if backend == "cuda":  # peers on the GPU too (cuDNN), where their build has CUDA
        if have.get("torch"):
            impls["torch"] = lambda *s: torch_step(cell, *s, device="cuda")
        if have.get("jax"):
            impls["jax"] = lambda *s: jax_step(cell, *s)
        return impls
    if ablations:
        from unroll.ir.optimize import PASSES
        for name in PASSES:
            impls[f"numba-{name}"] = (lambda n: lambda *s: unroll_step(
                cell, *s, backend="numba", passes={"disable": (n,)}))(name)
        impls["numba-O0"] = lambda *s: unroll_step(cell, *s, backend="numba", optimize=False)
    if have.get("torch"):
        impls["torch"] = lambda *s: torch_step(cell, *s)
    if have.get("jax"):
        impls["jax"] = lambda *s: jax_step(cell, *s)
    return impls


def _row_spec(row: Row, ablations: bool, backend: str, repeats: int, budget_s: float, memory: bool) -> dict:
    return {"row": asdict(row), "ablations": ablations, "backend": backend, "repeats": repeats,
            "budget_s": budget_s, "memory": memory}


def measure_spec(spec: dict, have: dict[str, bool] | None = None) -> Row:
    """Measure the row a spec describes (in this process)."""
    row = Row(**spec["row"])
    have = have or {"torch": _try_import("torch") is not None, "jax": _try_import("jax") is not None}
    make = implementations(row.cell, spec["ablations"], have, spec["backend"])[row.impl]
    row.extra["pid"] = os.getpid()
    return measure(row, lambda: make(row.T, row.B, row.I, row.H), spec["repeats"], spec["budget_s"],
                   spec["memory"])


_RESULT_MARK = "UNROLL_BENCH_ROW "


def measure_isolated(spec: dict, timeout_s: float = 900.0, cold: bool = False) -> Row:
    """Measure the row in a fresh Python process (`python -m unroll.bench --worker SPEC`). With
    `cold`, that process starts with empty unroll and Numba caches (a temporary directory for both),
    so its first call is a cold compile, as JAX's first call (in-memory jit cache) always is."""
    import subprocess
    import tempfile
    row = Row(**spec["row"])
    with (tempfile.TemporaryDirectory(prefix="unroll-bench-cold-") if cold else contextlib.nullcontext()) as empty:
        env = dict(os.environ)
        if cold:
            env.update(UNROLL_CACHE_DIR=empty, NUMBA_CACHE_DIR=empty)
        try:
            done = subprocess.run([sys.executable, "-m", "unroll.bench", "--worker", json.dumps(spec)],
                                  capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            row.note = f"timed out after {timeout_s:.0f} s"
            return row
    for line in done.stdout.splitlines():
        if line.startswith(_RESULT_MARK):
            return Row(**json.loads(line[len(_RESULT_MARK):]))
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    row.note = f"worker failed (exit {done.returncode}): {tail[:160]}"
    return row


class BusyLoad:
    """N processes spinning on a core each while the benchmark runs (`with BusyLoad(2): ...`)."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._procs: list = []

    def __enter__(self) -> "BusyLoad":
        import subprocess
        self._procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.processes)]
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self._procs:
            p.kill()
        for p in self._procs:
            p.wait()


def parse_config(text: str) -> tuple[str, tuple[int, int, int, int]]:
    named = {**CONFIGS, **GPU_CONFIGS}
    if text in named:
        return text, named[text]
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise ValueError(f"config {text!r}: expected one of {', '.join(named)} or T,B,I,H (positive ints)")
    return text, dims  # type: ignore[return-value]


def run_bench(cells: Sequence[str] = CELLS, configs: Sequence[str] | None = None,
              impls: Sequence[str] | None = None, ablations: bool = False, repeats: int = 20,
              budget_s: float = 3.0, numpy_max_steps: int = 20_000, out_dir: str | None = None,
              plot: bool = True, memory: bool = True, quiet: bool = False,
              backend: str = "numba", isolate: bool = True, load: int = 0, cold: bool = False
              ) -> dict[str, Any]:
    """Run the benchmark; returns {"header", "rows", "table"} and writes JSON/markdown/PNG to out_dir.

    `impls` restricts implementations by name (e.g. ("numba", "torch")). The numpy reference is
    skipped where T*B*H exceeds `numpy_max_steps` * 1000 (minutes per step). `backend="cuda"` times
    unroll's CUDA backend against PyTorch on the GPU (cuDNN) and JAX instead, configs plus xl.
    `isolate` measures every row in a process of its own; `load` busy processes run beside it;
    `cold` gives each row's process empty caches (its first call is a cold compile; needs isolate).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if configs is None:
        configs = tuple(CONFIGS) + (tuple(GPU_CONFIGS) if backend == "cuda" else ())
    memory = memory and backend != "cuda"  # resident-set growth says nothing about GPU memory
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    have = {"torch": _try_import("torch") is not None, "jax": _try_import("jax") is not None}
    head = header()
    head["rows measured"] = "each in its own process" if isolate else "in one process"
    head["busy processes beside the benchmark (--load)"] = load
    head["first call"] = ("cold: empty unroll/Numba caches per row (--cold)" if cold and isolate
                          else "unroll's cache as found (a cached step loads instead of compiling)")
    say(format_header(head))
    missing = missing_peers_line(have)
    if missing:
        say(missing)
    rows: list[Row] = []
    with BusyLoad(load):
        _run_rows(rows, cells, configs, impls, ablations, repeats, budget_s, numpy_max_steps, memory, backend,
                  isolate, have, say, cold)
    result = {"header": head, "rows": [asdict(r) for r in rows]}
    result["table"] = format_table(result["rows"])
    say("\n" + result["table"])
    if out_dir:
        written = write_results(result, out_dir, plot)
        say(f"results written to {', '.join(written)}")
    return result


def missing_peers_line(have: dict[str, bool]) -> str | None:
    """One line naming the peers that are not installed and the extra that installs them, or None."""
    missing = [p for p in PEERS if not have.get(p)]
    if not missing:
        return None
    return f"{' and '.join(missing)}: not installed, skipped; {BENCH_EXTRA} adds them"


def _run_rows(rows: list[Row], cells: Sequence[str], configs: Sequence[str], impls: Sequence[str] | None,
              ablations: bool, repeats: int, budget_s: float, numpy_max_steps: int, memory: bool,
              backend: str, isolate: bool, have: dict[str, bool], say: Callable[..., None],
              cold: bool = False) -> None:
    for cell in cells:
        if cell not in CELLS:
            raise ValueError(f"unknown cell {cell!r}; expected one of {', '.join(CELLS)}")
        for config in configs:
            name, (T, B, I, H) = parse_config(config)  # noqa: E741
            for impl, make in implementations(cell, ablations, have, backend).items():
                if impls is not None and impl not in impls:
                    continue
                row = Row(cell, name, T, B, I, H, impl)
                if impl == "numpy" and T * B * H > numpy_max_steps * 1000:
                    row.note = "skipped (too slow)"
                elif isolate:
                    row = measure_isolated(_row_spec(row, ablations, backend, repeats, budget_s, memory), cold=cold)
                else:
                    measure(row, lambda m=make: m(T, B, I, H), repeats, budget_s, memory)
                rows.append(row)
                say(f"  {cell:5s} {name:8s} {impl:18s} " + (
                    f"{row.median_ms:9.3f} ms  first {row.first_ms:9.1f} ms" if row.median_ms is not None
                    else row.note))


# ---- output --------------------------------------------------------------------------------------

def format_header(head: dict[str, Any]) -> str:
    return "\n".join(f"# {k}: {v}" for k, v in head.items())


def _by_row(rows: Sequence[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    table: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        table.setdefault((r["cell"], r["config"]), {})[r["impl"]] = r
    return table


def _ours(rows: Sequence[dict]) -> str:
    """The unroll backend a run compares: cuda where it has cuda rows, else numba."""
    return "cuda" if any(r["impl"] == "cuda" for r in rows) else "numba"


def ratios(rows: Sequence[dict]) -> dict[tuple[str, str], float | None]:
    """unroll numba's (or cuda's) time over the best peer's (PyTorch, JAX) per (cell, config)."""
    out = {}
    name = _ours(rows)
    for key, impls in _by_row(rows).items():
        ours = impls.get(name, {}).get("median_ms")
        peers = [impls[p]["median_ms"] for p in PEERS if p in impls and impls[p].get("median_ms")]
        out[key] = ours / min(peers) if ours and peers else None
    return out


def format_table(rows: Sequence[dict]) -> str:
    """Markdown: one line per (cell, config), ms per step per implementation, ratio to best peer."""
    table = _by_row(rows)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    rs = ratios(rows)
    ours = _ours(rows)
    lines = ["| cell | config (T,B,I,H) | " + " | ".join(f"{i} ms" for i in impls)
             + f" | first call ms {ours} / torch / jax | {ours} / best peer | peak MB {ours} / torch |",
             "|" + "---|" * (len(impls) + 5)]
    for (cell, config), by_impl in table.items():
        any_row = next(iter(by_impl.values()))
        dims = f"{config} ({any_row['T']},{any_row['B']},{any_row['I']},{any_row['H']})"
        cells = []
        for i in impls:
            r = by_impl.get(i)
            cells.append("-" if r is None or r.get("median_ms") is None else f"{r['median_ms']:.3f}")
        first = " / ".join(f"{by_impl[i]['first_ms']:.0f}" if by_impl.get(i, {}).get("first_ms") is not None
                           else "-" for i in (ours, "torch", "jax"))
        ratio = rs[(cell, config)]
        mem = "/".join(f"{by_impl[i]['peak_mb']:.1f}" if by_impl.get(i, {}).get("peak_mb") is not None else "-"
                       for i in (ours, "torch"))
        lines.append(f"| {cell} | {dims} | " + " | ".join(cells) + f" | {first} | "
                     + (f"{ratio:.2f}x" if ratio else "-") + f" | {mem} |")
    return "\n".join(lines)


def write_results(result: dict[str, Any], out_dir: str, plot: bool = True) -> list[str]:
    """Write bench.json, bench.md and (with matplotlib) bench.png into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = [os.path.join(out_dir, "bench.json"), os.path.join(out_dir, "bench.md")]
    with open(written[0], "w") as f:
        json.dump({k: v for k, v in result.items() if k != "table"}, f, indent=1, default=str)
    with open(written[1], "w") as f:
        f.write("# unroll bench: one float32 training step (forward + BPTT, MSE on every step)\n\n")
        f.write("```\n" + format_header(result["header"]) + "\n```\n\n" + result["table"] + "\n")
    if plot:
        try:
            plot_results(result["rows"], os.path.join(out_dir, "bench.png"))
            written.append(os.path.join(out_dir, "bench.png"))
        except ImportError:
            pass
    return written


def plot_results(rows: Sequence[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    table = _by_row(rows)
    keys = list(table)
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows) if i in ("numpy", "numba", "cuda", "torch", "jax")]
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(keys) + 2), 4.5))
    width = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        vals = [table[k].get(impl, {}).get("median_ms") or np.nan for k in keys]
        ax.bar(np.arange(len(keys)) + j * width, vals, width, label=impl)
    ax.set_yscale("log")
    ax.set_ylabel("ms per training step (log)")
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{c}\n{k}" for c, k in keys], fontsize=7)
    ax.legend(fontsize=8)
    ax.set_title("unroll bench: float32 training step, lower is better")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unroll bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=CELLS)
    parser.add_argument("--configs", nargs="+", default=None,
                        help=f"names ({', '.join(CONFIGS)}; xl with --backend cuda) or T,B,I,H "
                             f"(default: all, xl only on cuda)")
    parser.add_argument("--backend", default="numba", choices=BACKENDS,
                        help="unroll backend to time (cuda: against PyTorch/cuDNN on the GPU)")
    parser.add_argument("--impls", nargs="+", default=None, help="only these implementations")
    parser.add_argument("--ablations", action="store_true", help="also numba with each pass switched off")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed calls per row")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"directory for bench.json, bench.md, bench.png (default: ./{DEFAULT_OUT})")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--load", type=int, default=0, metavar="N",
                        help="run N busy processes beside the benchmark (a loaded machine)")
    parser.add_argument("--same-process", action="store_true",
                        help="measure every row in this process (default: each in its own)")
    parser.add_argument("--cold", action="store_true",
                        help="each row's process starts with empty unroll/Numba caches: the first-call "
                             "column is a cold compile, beside JAX's jit")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one row, for measure_isolated
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.worker:
        print(_RESULT_MARK + json.dumps(asdict(measure_spec(json.loads(args.worker))), default=str), flush=True)
        return 0
    try:
        for c in args.configs or ():
            parse_config(c)
    except ValueError as err:
        parser.error(str(err))
    run_bench(args.cells, args.configs, args.impls, args.ablations, args.repeats, args.budget,
              out_dir=args.out, plot=not args.no_plot, memory=not args.no_memory, backend=args.backend,
              isolate=not args.same_process, load=args.load, cold=args.cold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
