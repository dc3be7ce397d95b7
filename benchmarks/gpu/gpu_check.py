"""GPU check and benchmark of unroll's CUDA backend: correctness first, then training-step timings
against PyTorch/cuDNN (and JAX when it sees the GPU). Run on the lent H100 through
run_gpu_checks.sh (see README.md); written to fit ~8 minutes of device time.

Phases (each guarded: an error is logged and the run goes on; a global deadline skips what is left):
  info      the card, its SM count, shared memory and L2, library versions
  warm      every program the later phases use is compiled once in parallel worker processes
            (numba compiles one kernel at a time per process; cache=True shares the machine code)
  check     RNN/LSTM/GRU/TCN training steps (loss + every gradient) against unroll's numpy
            reference (float64 copies of the inputs) and PyTorch on the GPU (TF32 off), by
            ||out - ref|| / ||ref||; outputs poisoned with NaN before a run (every element must be
            written); three runs must agree bit for bit (a moving error is a race); variants:
            multi-block, sync="cg", no CUDA graph, host loop instead of the persistent kernel
  bench     the CPU harness's configs (T, B, I, H) plus xl; one training step = forward + BPTT with
            an MSE loss on every step, inputs and parameters already on the GPU, outputs left
            there; wall time per step over a timed loop ending in a device synchronize, median of
            rounds; PyTorch nn.RNN/LSTM/GRU (cuDNN, its defaults: TF32 allowed) and JAX timed alike
  summary   a table with unroll / cuDNN per config and the targets (<= 1.0x tiny, small, long;
            <= 1.5x medium, large, xl), written as JSON and markdown with the card's name

    python benchmarks/gpu/gpu_check.py --out $OUT --results benchmarks/results [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

CONFIGS = {
    "tiny": (50, 1, 16, 32), "small": (50, 16, 32, 64), "medium": (100, 32, 128, 256),
    "large": (100, 64, 256, 512), "long": (1000, 8, 32, 128), "xl": (100, 256, 512, 1024),
}
TARGETS = {"tiny": 1.0, "small": 1.0, "long": 1.0, "medium": 1.5, "large": 1.5, "xl": 1.5}
CELLS = ("lstm", "gru", "rnn")
CHECK_CONFIGS = {"check_a": (20, 4, 8, 32), "check_b": (50, 16, 32, 64)}
TCN_LEVELS, TCN_KERNEL = 4, 3
# a dry run of this script's logic on a CPU machine: numba's simulator, tiny sizes, torch on the CPU
DRY = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
if DRY:
    CONFIGS = {k: (3, 2, 3, 4) for k in CONFIGS}
    CHECK_CONFIGS = {"check_a": (2, 1, 2, 3), "check_b": (3, 2, 3, 4)}
TORCH_DEVICE = "cpu" if DRY else "cuda"

LOG: list[str] = []
# the float64 reference model reuses the float32 model's parameter names on purpose
warnings.filterwarnings("ignore", message=".*both name a parameter.*")
STATE: dict[str, Any] = {"deadline": float("inf"), "out": None}


def say(*parts: Any) -> None:
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    LOG.append(line)


def left() -> float:
    return STATE["deadline"] - time.time()


def guarded(name: str, fn: Callable[[], Any]) -> Any:
    t0 = time.time()
    say(f"== {name} ({left():.0f} s left)")
    try:
        return fn()
    except Exception:
        say(f"!! {name} failed:\n{traceback.format_exc()}")
        return None
    finally:
        say(f"== {name} done in {time.time() - t0:.1f} s")


# ---- models ------------------------------------------------------------------------------------

def unroll_training(cell: str, T: int, B: int, I: int, H: int, dtype: str = "float32", seed: int = 0):
    """(graph of [loss, *grads], model, feeds) with seeded random data."""
    import unroll as ur
    from unroll.ir.autodiff import grad
    x = ur.input("x", (T, B, I), dtype)
    y = ur.input("y", (T, B, H), dtype)
    if cell == "tcn":
        model = ur.nn.TCN(I, [H] * TCN_LEVELS, kernel_size=TCN_KERNEL, dtype=dtype, seed=seed)
        out = model(x)
    else:
        model = {"rnn": ur.nn.RNN, "lstm": ur.nn.LSTM, "gru": ur.nn.GRU}[cell](I, H, dtype=dtype, seed=seed)
        out, _ = model(x)
    loss = ur.mean((out - y) ** 2)
    graph = ur.graph(loss, *grad(loss, list(model.parameters())))
    rng = np.random.default_rng(seed + 1)
    feeds = {"x": rng.standard_normal((T, B, I)).astype(dtype), "y": rng.standard_normal((T, B, H)).astype(dtype),
             **model.state_dict()}
    return graph, model, feeds


def compile_cuda(cell: str, dims: tuple, options: dict, seed: int = 0):
    import unroll as ur
    graph, model, feeds = unroll_training(cell, *dims, seed=seed)
    step = ur.compile(graph, backend="cuda", **options)
    return step, model, feeds


def torch_training(cell: str, model_state: dict, feeds: dict, device: str = TORCH_DEVICE):
    """PyTorch's nn.RNN/LSTM/GRU with the same weights; returns step() -> (loss, grads by name)."""
    import torch
    I, H = feeds["x"].shape[2], feeds["y"].shape[2]
    cls = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
    model = cls(I, H).to(device)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in model_state.items()})
    x = torch.from_numpy(feeds["x"]).to(device)
    y = torch.from_numpy(feeds["y"]).to(device)
    params = dict(model.named_parameters())

    def step():
        for p in params.values():
            p.grad = None
        loss = torch.mean((model(x)[0] - y) ** 2)
        loss.backward()
        return loss, {k: p.grad for k, p in params.items()}
    return step


def jax_training(cell: str, dims: tuple):
    import jax

    from unroll.bench import jax_step
    if jax.default_backend() != "gpu" and not DRY:
        raise RuntimeError(f"JAX runs on {jax.default_backend()}, not the GPU")
    step, _ = jax_step(cell, *dims)
    return step


# ---- phases --------------------------------------------------------------------------------------

def phase_info() -> dict:
    import numba
    from numba import cuda
    dev = cuda.get_current_device()
    name = getattr(dev, "name", "numba CUDA simulator")
    name = name.decode() if isinstance(name, bytes) else str(name)
    info = {"device": name, "numba": numba.__version__, "python": platform.python_version(),
            "numpy": np.__version__}
    for key, attr in (("cc", "compute_capability"), ("sms", "MULTIPROCESSOR_COUNT"),
                      ("smem_optin", "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN"), ("l2_bytes", "L2_CACHE_SIZE")):
        info[key] = getattr(dev, attr, None)
    try:
        from importlib.metadata import version
        info["numba_cuda"] = version("numba-cuda")
    except Exception:
        pass
    try:
        import torch
        info["torch"] = torch.__version__
        info["cudnn"] = torch.backends.cudnn.version()
        info["torch_sees_gpu"] = torch.cuda.is_available() or DRY
    except Exception as err:
        info["torch"] = f"unavailable: {err}"
    try:
        import jax
        info["jax"] = jax.__version__ + " on " + jax.default_backend()
    except Exception as err:
        info["jax"] = f"unavailable: {err}"
    say(json.dumps(info))
    return info


def _warm_one(task: tuple) -> tuple:
    cell, dims, options = task
    t0 = time.time()
    try:
        from unroll.backends.cuda import runtime as rt
        step, _, _ = compile_cuda(cell, dims, options)
        for spec in step.impl.program.specs():
            rt.kernel(spec)
        return task, time.time() - t0, None
    except Exception as err:
        return task, time.time() - t0, f"{type(err).__name__}: {err}"


def phase_warm(tasks: list[tuple], workers: int, budget: float) -> None:
    """Compile every program's kernels in parallel processes (cache=True): later phases load them."""
    ctx = mp.get_context("spawn")
    t0 = time.time()
    done = 0
    with ctx.Pool(workers) as pool:
        results = [pool.apply_async(_warm_one, (t,)) for t in tasks]
        for r in results:
            remaining = budget - (time.time() - t0)
            try:
                task, secs, err = r.get(timeout=max(1.0, remaining))
            except mp.TimeoutError:
                say(f"   warm: budget of {budget:.0f} s spent; {len(tasks) - done} programs compile on first use")
                pool.terminate()
                break
            done += 1
            say(f"   warm {task[0]} {task[1]} {task[2] or ''}: {secs:.1f} s{' ERROR ' + err if err else ''}")


def rel_err(a: Any, b: Any) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    denom = np.linalg.norm(b.ravel())
    return float(np.linalg.norm((a - b).ravel()) / (denom if denom else 1.0))


def _poison(step: Any) -> None:
    """NaN in every buffer the program owns: a result element nobody writes shows up."""
    from numba import cuda
    ex = step.impl._executor
    for buf in list(ex.buffers.values()):
        if np.dtype(buf.dtype).kind == "f":
            buf.copy_to_device(np.full(buf.shape, np.nan, buf.dtype))
    cuda.synchronize()


def check_one(cell: str, dims: tuple, options: dict, torch_ok: bool, results: list) -> None:
    import unroll as ur
    t0 = time.time()
    step, model, feeds = compile_cuda(cell, dims, options, seed=3)
    first = time.time() - t0
    outs = step(**feeds)
    _poison(step)
    runs = [step(**feeds) for _ in range(3)]
    names = ["loss"] + list(model.state_dict())
    graph64, _, _ = unroll_training(cell, *dims, dtype="float64", seed=3)
    ref = ur.compile(graph64, backend="numpy")(**{k: np.asarray(v, np.float64) for k, v in feeds.items()})
    errs = {n: rel_err(o, r) for n, o, r in zip(names, runs[0], ref)}
    nan = any(np.isnan(np.asarray(o)).any() for o in runs[0])
    stable = all(all(np.array_equal(a, b) for a, b in zip(runs[0], r)) for r in runs[1:]) and \
        all(np.array_equal(a, b) for a, b in zip(outs, runs[0]))
    row = {"cell": cell, "dims": dims, "options": options, "first_call_s": round(first, 2),
           "max_rel_err_vs_float64_ref": max(errs.values()), "worst": max(errs, key=errs.get),
           "unwritten_nan": nan, "bitwise_stable": stable, "plan": _plan_summary(step),
           "cuda_graph": step.impl.cuda_graph_status}
    if torch_ok and cell != "tcn":
        import torch
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        tloss, tgrads = torch_training(cell, model.state_dict(), feeds)()
        terrs = [rel_err(runs[0][0], tloss.item())] + [rel_err(o, tgrads[n].cpu().numpy())
                                                       for n, o in zip(names[1:], runs[0][1:])]
        row["max_rel_err_vs_torch"] = max(terrs)
        torch.backends.cudnn.allow_tf32 = True
    ok = row["max_rel_err_vs_float64_ref"] < 1e-4 and not nan and stable and \
        row.get("max_rel_err_vs_torch", 0.0) < 1e-3
    row["ok"] = ok
    results.append(row)
    say(f"   {'OK  ' if ok else 'FAIL'} {cell:4s} {dims} {options or ''}: err ref "
        f"{row['max_rel_err_vs_float64_ref']:.1e} ({row['worst']}) torch {row.get('max_rel_err_vs_torch', float('nan')):.1e} "
        f"nan={nan} stable={stable} first={first:.1f}s plan={row['plan']} graph={row['cuda_graph']}")


def _plan_summary(step: Any) -> list:
    out = []
    for p in step.impl.plan:
        if p["path"] == "persistent":
            out.append(f"persistent G={p['blocks']} syncs={p['grid_syncs_per_step']} smem={p['shared_bytes']}"
                       f"{' w:L2' if p['inlined_matmuls'] else ''}")
        else:
            out.append(f"host loop ({p['reason']})")
    return out


def check_variants() -> list[tuple]:
    v = []
    for cell in ("rnn", "lstm", "gru"):
        for key in CHECK_CONFIGS:
            v.append((cell, CHECK_CONFIGS[key], {}))
    v += [("lstm", CHECK_CONFIGS["check_b"], {"blocks": 8}),
          ("gru", CHECK_CONFIGS["check_b"], {"blocks": 16}),
          ("lstm", CHECK_CONFIGS["check_b"], {"sync": "cg", "blocks": 4}),
          ("lstm", CHECK_CONFIGS["check_b"], {"cuda_graph": False}),
          ("lstm", CHECK_CONFIGS["check_a"], {"persistent": False}),
          ("lstm", CHECK_CONFIGS["check_a"], {"smem_weights": False, "blocks": 4}),
          ("tcn", CHECK_CONFIGS["check_a"], {})]
    return v


def time_step(step: Callable[[], Any], sync: Callable[[], None], min_time: float = 0.25,
              rounds: int = 5) -> float:
    """Median over rounds of (wall time of n back-to-back steps, then a device sync) / n, in ms."""
    step()
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    one = max(time.perf_counter() - t0, 1e-6)
    n = max(1, min(200, int(min_time / one)))
    times = []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        times.append((time.perf_counter() - t0) / n)
    return 1e3 * statistics.median(times)


def bench_one(cell: str, config: str, dims: tuple, peers: dict, rows: list, options: dict | None = None) -> None:
    from numba import cuda
    options = dict(options or {})
    row: dict[str, Any] = {"cell": cell, "config": config, "dims": dims, "options": options}
    try:
        t0 = time.time()
        step, model, feeds = compile_cuda(cell, dims, {"device_outputs": True, **options})
        dev = step.impl.to_device(feeds)
        step(**dev)
        row["first_call_s"] = round(time.time() - t0, 2)
        row["unroll_ms"] = time_step(lambda: step(**dev), cuda.synchronize)
        row["plan"] = _plan_summary(step)
        row["cuda_graph"] = step.impl.cuda_graph_status
        row["kernels"] = len(step.impl.program.specs())
        res = []
        from unroll.backends.cuda import runtime as rt
        for spec in step.impl.program.specs():
            if spec.name.startswith("persistent"):
                res.append({spec.name: rt.kernel(spec).resources})
        row["persistent_resources"] = res
    except Exception as err:
        row["unroll_error"] = f"{type(err).__name__}: {str(err)[:300]}"
        say(traceback.format_exc())
        model, feeds = None, None
    if peers.get("torch") and cell != "tcn":
        try:
            import torch
            state = model.state_dict() if model is not None else None
            if state is None:
                _, model2, feeds = unroll_training(cell, *dims)
                state = model2.state_dict()
            tstep = torch_training(cell, state, feeds)
            row["cudnn_ms"] = time_step(tstep, torch.cuda.synchronize if not DRY else (lambda: None))
        except Exception as err:
            row["cudnn_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    if peers.get("jax") and cell != "tcn":
        try:
            row["jax_ms"] = time_step(jax_training(cell, dims), lambda: None)
        except Exception as err:
            row["jax_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    if row.get("unroll_ms") and row.get("cudnn_ms"):
        row["ratio_vs_cudnn"] = row["unroll_ms"] / row["cudnn_ms"]
        row["target"] = TARGETS.get(config)
        row["meets_target"] = row["target"] is not None and row["ratio_vs_cudnn"] <= row["target"]
    rows.append(row)
    say(f"   {cell:4s} {config:7s} {options or ''} unroll {row.get('unroll_ms', float('nan')):9.3f} ms  "
        f"cudnn {row.get('cudnn_ms', float('nan')):9.3f} ms  jax {row.get('jax_ms', float('nan')):9.3f} ms  "
        f"ratio {row.get('ratio_vs_cudnn', float('nan')):6.2f}  {row.get('plan', row.get('unroll_error', ''))}")


def table(rows: list[dict]) -> str:
    lines = ["| cell | config | T,B,I,H | unroll ms | cuDNN ms | JAX ms | unroll/cuDNN | target | plan |",
             "|---|---|---|---|---|---|---|---|---|"]
    def f(r: dict, k: str) -> str:
        v = r.get(k)
        return f"{v:.3f}" if isinstance(v, float) else (r.get(k.replace("_ms", "_error"), "-") or "-")[:40]
    for r in rows:
        ratio = r.get("ratio_vs_cudnn")
        mark = "" if ratio is None else (" ok" if r.get("meets_target") else " MISS")
        lines.append(f"| {r['cell']} | {r['config']}{' ' + str(r['options']) if r.get('options') else ''} | "
                     f"{','.join(map(str, r['dims']))} | {f(r, 'unroll_ms')} | {f(r, 'cudnn_ms')} | {f(r, 'jax_ms')} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}'}{mark} | {r.get('target', '-')} | "
                     f"{'; '.join(r.get('plan', []))} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run")
    ap.add_argument("--quick", action="store_true", help="checks plus tiny/small only")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--cells", nargs="*", default=list(CELLS))
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    STATE["out"], STATE["deadline"] = args.out, time.time() + args.budget
    configs = [c for c in args.configs if not args.quick or c in ("tiny", "small")]
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    report["info"] = guarded("info", phase_info) or {}
    peers = {"torch": bool(report["info"].get("torch_sees_gpu")),
             "jax": " on gpu" in str(report["info"].get("jax", ""))}

    # block counts and threads around the planner's choice, to tune its heuristic later
    sweep = [("lstm", "small", {"blocks": 1}), ("lstm", "small", {"blocks": 8}),
             ("lstm", "long", {"blocks": 1}), ("lstm", "long", {"blocks": 16}),
             ("lstm", "medium", {"blocks": 16}), ("lstm", "medium", {"blocks": 132}),
             ("lstm", "medium", {"sync": "cg"}), ("lstm", "large", {"blocks": 64}),
             ("lstm", "tiny", {"threads": 128}), ("lstm", "small", {"cuda_graph": False})]
    tasks = [(c, d, o) for c, d, o in check_variants()]
    tasks += [(cell, CONFIGS[cfg], {"device_outputs": True}) for cfg in configs for cell in args.cells]
    tasks += [(c, CONFIGS[cfg], {"device_outputs": True, **o}) for c, cfg, o in sweep if cfg in configs]
    guarded("warm", lambda: phase_warm(tasks, args.workers, min(200.0, 0.45 * left())))

    checks: list[dict] = []

    def run_checks() -> None:
        for cell, dims, options in check_variants():
            if left() < 0.4 * args.budget:  # keep the rest for timings
                say("   checks: out of time, skipping the rest")
                break
            try:
                check_one(cell, dims, options, peers["torch"], checks)
            except Exception:
                say(f"!! check {cell} {dims} {options}:\n{traceback.format_exc()}")
                checks.append({"cell": cell, "dims": dims, "options": options, "ok": False,
                               "error": traceback.format_exc()[-800:]})
    guarded("check", run_checks)
    report["checks"] = checks

    rows: list[dict] = []

    def run_bench() -> None:
        for cfg in configs:
            for cell in args.cells:
                if left() < 20:
                    say("   bench: out of time, skipping the rest")
                    return
                bench_one(cell, cfg, CONFIGS[cfg], peers, rows)
        for cell, cfg, options in sweep:
            if cfg in configs and left() > 30:
                bench_one(cell, cfg, CONFIGS[cfg], {"torch": False, "jax": False}, rows, options)
    guarded("bench", run_bench)
    report["bench"] = rows
    report["table"] = table(rows)
    report["checks_ok"] = all(c.get("ok") for c in checks) and bool(checks)
    say("\n" + report["table"])
    say(f"\nchecks: {sum(bool(c.get('ok')) for c in checks)}/{len(checks)} ok")

    card = report["info"].get("device", "unknown-gpu").replace(" ", "_").replace("/", "_")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for directory in (args.out, args.results):
        try:
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, f"gpu_{card}_{stamp}.json"), "w") as f:
                json.dump(report, f, indent=1, default=str)
            with open(os.path.join(directory, f"gpu_{card}_{stamp}.md"), "w") as f:
                f.write(f"# unroll CUDA backend on {report['info'].get('device')} ({stamp})\n\n")
                f.write("```\n" + json.dumps(report["info"], indent=1) + "\n```\n\n")
                f.write(f"checks: {sum(bool(c.get('ok')) for c in checks)}/{len(checks)} ok\n\n")
                f.write(report["table"] + "\n")
        except Exception as err:
            say(f"!! could not write results to {directory}: {err}")
    return 0 if report["checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
