"""Data-parallel scaling on MPI, measured on this machine and modelled for 8, 64 and 512 ranks.

    python benchmarks/mpi_scaling.py                  # writes benchmarks/results/mpi/scaling.{json,md}
    python benchmarks/mpi_scaling.py --quick          # a smoke run (few steps), results not saved

Measured (each configuration is its own `mpiexec` job; seeded data and initial values):
  * training throughput of two LSTMs (`ur.TrainStep(comm=...)`, Numba backend, float32, Adam,
    global batch 64) as 1 rank x 1 thread, 1 rank x 2 threads and 2 ranks x 1 thread; each step's
    time split into compute (forward, backward, update), waiting for the slower rank (a Barrier the
    benchmark puts before each gradient Allreduce, to tell imbalance from communication) and the
    Allreduce itself; REPEATS runs of STEPS steps after a warm-up, median and min..max;
  * MPI_Allreduce on 2 ranks for messages of 8 B to 16 MB, fitted to the ring model below.

Modelled. A ring allreduce of n bytes over p ranks sends 2(p-1) messages of n/p bytes from every
rank: T_ring(n, p) = 2(p-1) alpha + 2(p-1)/p * n * beta (alpha: per-message latency, beta: seconds
per byte). For small messages MPI libraries switch to recursive doubling, log2(p) rounds of the
whole message: T_rd(n, p) = log2(p) (alpha + n beta). With the per-rank batch fixed (weak scaling),
a step on p ranks takes compute(b) + T(n, p), where compute(b) is the measured 1-thread compute.
alpha and beta come from the fit on this machine (shared memory: valid within one node), and, for
networks, from a link's nominal rate with an ASSUMED latency (this machine has no network to
measure): 25 Gbit/s Ethernet (the network of Horovod's published benchmark) with 10 us, and
100 Gbit/s InfiniBand (the network of PyTorch DDP's published benchmark) with 2 us.

The script also reprints the published figures it is compared with, as constants (PUBLISHED); the
README quotes them with their sources.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "mpi"
SEED = 0
GLOBAL_BATCH = 64
WARMUP, STEPS, REPEATS = 3, 10, 5
RANKS = (8, 64, 512)
MODELS = {  # name: (T, input, hidden)
    "small": (20, 2, 32),     # the adding problem's LSTM (examples/adding_problem.py)
    "medium": (50, 32, 256),
}
CONFIGS = [(1, 1), (1, 2), (2, 1)]  # (ranks, threads per rank)
NETWORKS = {  # name: (alpha seconds ASSUMED, beta seconds per byte from the nominal link rate)
    "25GbE": (10e-6, 8 / 25e9),
    "100Gb IB": (2e-6, 8 / 100e9),
}
PUBLISHED = {
    "pytorch_ddp_benchmark": {
        "source": "pytorch/pytorch benchmarks/distributed/ddp/README.md",
        "setup": "ResNet-50, batch 32 per GPU, V100 DGX machines, 4x 100 Gb/s InfiniBand each, "
                 "bucket_cap_mb=25 (the default)",
        "params": 25.6e6, "sec_per_iter_1gpu_no_ddp": 0.097, "sec_per_iter_16gpu": 0.104,
    },
    "horovod_readme": {
        "source": "horovod/horovod README",
        "setup": "128 servers x 4 Pascal GPUs, 25 Gbit/s RoCE; Tensor Fusion buffer 64 MB (default)",
        "scaling_efficiency": {"Inception V3": 0.90, "ResNet-101": 0.90, "VGG-16": 0.68},
    },
}


# ---- workers (run under mpiexec) -------------------------------------------------------------------


class _TimedComm:
    """The step's communicator with a timed Barrier before each Allreduce: `wait` is the time this
    rank waits for the slowest one (imbalance, a descheduled rank), `reduce` the Allreduce alone."""

    def __init__(self, comm) -> None:
        self.comm, self.wait, self.reduce = comm, 0.0, 0.0

    def Allreduce(self, *args, **kwargs) -> None:
        start = time.perf_counter()
        self.comm.Barrier()
        middle = time.perf_counter()
        self.comm.Allreduce(*args, **kwargs)
        self.wait += middle - start
        self.reduce += time.perf_counter() - middle

    def __getattr__(self, name: str):
        return getattr(self.comm, name)


def _worker_train(model: str, steps: int, repeats: int, warmup: int) -> dict | None:
    from mpi4py import MPI
    import unroll as ur

    comm = MPI.COMM_WORLD
    ranks, rank = comm.Get_size(), comm.Get_rank()
    T, I, H = MODELS[model]
    b = ur.distributed.local_batch(GLOBAL_BATCH, comm)
    lstm, head = ur.nn.LSTM(I, H, seed=SEED), ur.nn.Linear(H, 1, seed=SEED + 1)
    x, y = ur.input("x", (T, b, I)), ur.input("y", (b, 1))
    out, _ = lstm(x)
    loss = ur.nn.mse(ur.nn.many_to_one(out, head), y)
    step = ur.TrainStep(loss, [lstm, head], optimizer=ur.Adam(lr=1e-3), backend="numba", comm=comm)
    rng = np.random.default_rng(SEED + 2)
    xs = rng.normal(size=(T, GLOBAL_BATCH, I)).astype(np.float32)
    ys = rng.normal(size=(GLOBAL_BATCH, 1)).astype(np.float32)
    batch = {"x": xs[:, rank * b:(rank + 1) * b], "y": ys[rank * b:(rank + 1) * b]}
    timed = _TimedComm(comm)
    step._averager.comm = timed  # type: ignore[union-attr]
    for _ in range(warmup):
        step.step(batch)
    runs = []
    for _ in range(repeats):
        comm.Barrier()
        start, wait0, reduce0 = time.perf_counter(), timed.wait, timed.reduce
        for _ in range(steps):
            step.step(batch)
        wall = (time.perf_counter() - start) / steps
        wait, reduce = (timed.wait - wait0) / steps, (timed.reduce - reduce0) / steps
        # rank 0's split (every rank's step ends together, at the allreduce)
        runs.append({"step": wall, "wait": wait, "allreduce": reduce, "compute": wall - wait - reduce})
    n_params = sum(int(np.prod(p.shape)) for p in step.params)
    if rank:
        return None
    return {"model": model, "ranks": ranks, "per_rank_batch": b, "params": n_params,
            "message_bytes": step._averager.nbytes if step._averager else 0, "runs": runs}


def _worker_allreduce(quick: bool) -> dict | None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    points = []
    for power in range(3, 25, 1 if not quick else 4):
        n = 2 ** power
        buf = np.ones(n // 4, dtype=np.float32)
        reps = max(5, min(1000, int(2e8 / max(n, 1) ** 1.0))) if not quick else 5
        for _ in range(3):
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        times = []
        for _ in range(5 if not quick else 2):
            comm.Barrier()
            start = time.perf_counter()
            for _ in range(reps):
                comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            times.append((time.perf_counter() - start) / reps)
        worst = comm.allreduce(min(times), op=MPI.MAX)
        points.append({"bytes": n, "seconds": worst, "reps": reps})
    return {"ranks": comm.Get_size(), "points": points} if comm.Get_rank() == 0 else None


# ---- the launcher ----------------------------------------------------------------------------------


def _launch(ranks: int, threads: int, args: list[str], timeout: float = 900) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "UNROLL_NUMBA_BLAS_THREADS"):
        env[name] = str(threads)
    cmd = [shutil.which("mpiexec") or "mpiexec", "-n", str(ranks), sys.executable, __file__, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit_alpha_beta(points: list[dict], ranks: int) -> tuple[float, float]:
    """alpha, beta of the ring model from measured (bytes, seconds): least squares on
    t = 2(p-1) alpha + 2(p-1)/p n beta, weighted by 1/t (relative error: small messages count)."""
    n = np.array([p["bytes"] for p in points], float)
    t = np.array([p["seconds"] for p in points], float)
    A = np.stack([np.full_like(n, 2 * (ranks - 1)), 2 * (ranks - 1) / ranks * n], axis=1) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    return float(alpha), float(beta)


def t_ring(n: float, p: int, alpha: float, beta: float) -> float:
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * n * beta


def t_rd(n: float, p: int, alpha: float, beta: float) -> float:
    return math.log2(p) * (alpha + n * beta)


def _summary(runs: list[dict], key: str) -> dict:
    values = sorted(r[key] for r in runs)
    return {"median": float(np.median(values)), "min": values[0], "max": values[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, nothing saved")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    a = parser.parse_args()
    steps, repeats, warmup = (3, 2, 2) if a.quick else (STEPS, REPEATS, WARMUP)
    if a.worker:
        result = (_worker_train(a.model, steps, repeats, warmup) if a.worker == "train"
                  else _worker_allreduce(a.quick))
        if result is not None:
            print(json.dumps(result))
        return

    started = time.time()
    load = os.getloadavg()
    measured = []
    for model in MODELS:
        for ranks, threads in CONFIGS:
            print(f"measuring {model}: {ranks} rank(s) x {threads} thread(s) ...", flush=True)
            r = _launch(ranks, threads, ["--worker", "train", "--model", model] + (["--quick"] * a.quick))
            r["threads"] = threads
            for key in ("step", "compute", "wait", "allreduce"):
                r[key] = _summary(r["runs"], key)
            r["samples_per_s"] = GLOBAL_BATCH / r["step"]["median"]
            measured.append(r)
    print("measuring MPI_Allreduce on 2 ranks ...", flush=True)
    micro = _launch(2, 1, ["--worker", "allreduce"] + (["--quick"] * a.quick))
    alpha, beta = fit_alpha_beta(micro["points"], 2)

    predictions = []
    per_rank = GLOBAL_BATCH // 2
    for model in MODELS:
        one = next(r for r in measured if r["model"] == model and r["ranks"] == 2)
        compute = one["compute"]["median"]  # 1 thread, per-rank batch 32: fixed under weak scaling
        n = one["message_bytes"]
        networks = {"shared memory (fit)": ((2,), alpha, beta),  # the model against the measured 2 ranks
                    **{k: (RANKS, al, be) for k, (al, be) in NETWORKS.items()}}
        for name, (counts, al, be) in networks.items():
            for p in counts:
                ring, rd = t_ring(n, p, al, be), t_rd(n, p, al, be)
                predictions.append({
                    "model": model, "network": name, "ranks": p, "message_bytes": n,
                    "compute": compute, "allreduce_ring": ring, "allreduce_rd": rd,
                    "step_ring": compute + ring, "samples_per_s_ring": p * per_rank / (compute + ring),
                    "efficiency_ring": compute / (compute + ring),
                    "measured_allreduce": one["allreduce"]["median"] if p == 2 else None})
    ddp = PUBLISHED["pytorch_ddp_benchmark"]
    ddp_bytes = ddp["params"] * 4
    ddp_model = {name: t_ring(ddp_bytes, 16, al, be) for name, (al, be) in NETWORKS.items()}
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_at_start": load, "seconds": time.time() - started},
        "settings": {"seed": SEED, "global_batch": GLOBAL_BATCH, "warmup": warmup, "steps": steps,
                     "repeats": repeats, "models": MODELS, "backend": "numba", "dtype": "float32"},
        "measured": measured, "allreduce_points": micro["points"],
        "fit": {"alpha_s": alpha, "beta_s_per_byte": beta, "bandwidth_GBps": 1 / beta / 1e9 if beta > 0 else None},
        "networks_assumed": {k: {"alpha_s": v[0], "beta_s_per_byte": v[1]} for k, v in NETWORKS.items()},
        "predictions": predictions, "published": PUBLISHED,
        "ddp_compare": {"message_bytes": ddp_bytes, "ring_16_ranks_s": ddp_model,
                        "exposed_overhead_s": ddp["sec_per_iter_16gpu"] - ddp["sec_per_iter_1gpu_no_ddp"]},
    }
    text = report(result)
    print(text)
    if not a.quick:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "scaling.json").write_text(json.dumps(result, indent=1) + "\n")
        (OUT / "scaling.md").write_text(text + "\n")
        print(f"wrote {OUT / 'scaling.json'} and {OUT / 'scaling.md'}")


def _ms(x: float) -> str:
    return f"{x * 1e3:.2f}"


def report(r: dict) -> str:
    s = r["settings"]
    lines = ["# Data-parallel scaling (benchmarks/mpi_scaling.py)", "",
             f"{r['machine']['cpus']} CPUs, load average {r['machine']['loadavg_at_start'][0]:.2f} at start "
             f"(a shared machine); Numba backend, float32, Adam, global batch {s['global_batch']}; "
             f"{s['repeats']} runs of {s['steps']} steps after {s['warmup']} warm-up steps; "
             f"median (min..max) over the runs; seed {s['seed']}.", "",
             "| model (params, message) | ranks x threads | samples/s | step ms | compute ms | wait ms | allreduce ms |",
             "|---|---|---|---|---|---|---|"]
    for m in r["measured"]:
        st, co, wa, ar = m["step"], m["compute"], m["wait"], m["allreduce"]
        lines.append(f"| {m['model']} ({m['params']:,}, {m['message_bytes'] / 1e3:.1f} kB) | {m['ranks']} x "
                     f"{m['threads']} | {m['samples_per_s']:.0f} | {_ms(st['median'])} ({_ms(st['min'])}.."
                     f"{_ms(st['max'])}) | {_ms(co['median'])} | {_ms(wa['median'])} | {_ms(ar['median'])} "
                     f"({_ms(ar['min'])}..{_ms(ar['max'])}) |")
    f = r["fit"]
    lines += ["", f"MPI_Allreduce on 2 ranks (shared memory), fitted to the ring model: alpha = "
                  f"{f['alpha_s'] * 1e6:.2f} us, beta = {f['beta_s_per_byte'] * 1e9:.3f} ns/B "
                  f"({f['bandwidth_GBps']:.2f} GB/s); points (bytes: us): "
                  + ", ".join(f"{p['bytes']}: {p['seconds'] * 1e6:.1f}" for p in r["allreduce_points"]), "",
              "Predicted step time under weak scaling (per-rank batch 32, compute measured on 1 thread; "
              "ring allreduce; recursive doubling in brackets):", "",
              "| model | network (alpha, link) | ranks | allreduce ms ring [rd] | step ms | samples/s | efficiency |",
              "|---|---|---|---|---|---|---|"]
    nets = {"shared memory (fit)": (f["alpha_s"], f["beta_s_per_byte"]),
            **{k: (v["alpha_s"], v["beta_s_per_byte"]) for k, v in r["networks_assumed"].items()}}
    checks = [p for p in r["predictions"] if p["measured_allreduce"] is not None]
    for p in r["predictions"]:
        if p["measured_allreduce"] is not None:
            continue
        al, be = nets[p["network"]]
        lines.append(f"| {p['model']} | {p['network']} ({al * 1e6:.2g} us, {8 / be / 1e9:.3g} Gbit/s) | "
                     f"{p['ranks']} | {_ms(p['allreduce_ring'])} [{_ms(p['allreduce_rd'])}] | {_ms(p['step_ring'])} | "
                     f"{p['samples_per_s_ring']:.0f} | {p['efficiency_ring']:.0%} |")
    lines += ["", "The model on this machine, 2 ranks (shared-memory fit): ring allreduce "
              + "; ".join(f"{p['model']} predicted {_ms(p['allreduce_ring'])} ms, measured in training "
                          f"{_ms(p['measured_allreduce'])} ms" for p in checks)
              + "."]
    d = r["ddp_compare"]
    lines += ["", f"PyTorch DDP's published ResNet-50 benchmark ({r['published']['pytorch_ddp_benchmark']['source']}): "
                  f"{d['message_bytes'] / 1e6:.0f} MB of float32 gradients per step; 16 GPUs add "
                  f"{d['exposed_overhead_s'] * 1e3:.0f} ms per step over 1 GPU without DDP; this model's ring "
                  f"allreduce of that message on 16 ranks: "
                  + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in d["ring_16_ranks_s"].items())
                  + " (DDP overlaps its 25 MB buckets with the backward pass, so it exposes less)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
