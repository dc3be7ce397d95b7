"""Compile times of the CPU backend, each measurement in a fresh process (seeded, no downloads).

    python benchmarks/compile_times.py [--runs 3] [--out benchmarks/results/compile_times]

Rows:
  cold      empty cache: import unroll, build a training step (RNN, LSTM, GRU, TCN; small config
            (50, 16, 32, 64)), compile, first call. Reported separately: the import, and compile +
            first call (what JAX's jit + first call is compared with).
  new graph the cold row in a fresh cache that holds only the runtime library (the packed-gemm code
            every kernel calls, compiled once per machine): what each new graph costs after the
            first one.
  cached    the same in a new process with the cache the cold run left: import + build + load +
            first call (the whole time from interpreter start to the first result, minus Python's
            own start-up).
  chain N   cold compile of a straight-line graph of N ops (N/3 layers of matmul, add, tanh).
Each row runs `--runs` times; the table gives the median and the range. UNROLL_CPU_CODEGEN=numba
measures the Numba path instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

CHILD = r'''
import sys, time, json
t0 = time.perf_counter()
import numpy as np
import unroll as ur
t_import = time.perf_counter()
kind, arg = sys.argv[1], sys.argv[2]
if kind == "chain":
    x = ur.input("x", (8, 16)); h = x
    for i in range(int(arg) // 3):
        h = ur.tanh(h @ ur.param(f"w{i}", (16, 16)) + ur.param(f"b{i}", (16,)))
    graph = ur.graph([ur.sum(h)])
    feeds = {n: np.full(v.shape, 0.01, np.float32) for n, v in zip(graph.input_names, graph.inputs)}
else:
    from unroll.bench import make_data, unroll_model
    graph, model = unroll_model(arg, 50, 16, 32, 64)
    x, y = make_data(50, 16, 32, 64)
    feeds = {"x": x, "y": y, **model.state_dict()}
t_built = time.perf_counter()
step = ur.compile(graph, backend="numba")
step(**feeds)
t_done = time.perf_counter()
print(json.dumps({"import": t_import - t0, "build": t_built - t_import, "compile_first_call": t_done - t_built,
                  "total": t_done - t0}))
'''


def measure(kind: str, arg: str, cache: str) -> dict:
    env = dict(os.environ, UNROLL_CACHE_DIR=cache, NUMBA_CACHE_DIR=os.path.join(cache, "numba"))
    done = subprocess.run([sys.executable, "-c", CHILD, kind, arg], env=env, capture_output=True, text=True,
                          timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cells", nargs="+", default=["rnn", "lstm", "gru", "tcn"])
    parser.add_argument("--chains", nargs="+", type=int, default=[100, 400, 1000])
    parser.add_argument("--out", default="benchmarks/results/compile_times")
    args = parser.parse_args()
    rows = []
    for cell in args.cells:
        cold, cached, fresh = [], [], []
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as other:
                cold.append(measure("model", cell, cache))
                cached.append(measure("model", cell, cache))
                for name in os.listdir(cache):
                    if name.startswith("unroll_runtime_"):
                        shutil.copy(os.path.join(cache, name), other)
                fresh.append(measure("model", cell, other))
        rows.append({"what": f"{cell} training step", "cold_import_s": [r["import"] for r in cold],
                     "cold_compile_first_call_s": [r["compile_first_call"] for r in cold],
                     "new_graph_compile_first_call_s": [r["compile_first_call"] for r in fresh],
                     "cached_total_s": [r["total"] for r in cached]})
        print(rows[-1]["what"], "cold compile+first call", spread(rows[-1]["cold_compile_first_call_s"]),
              "cached total", spread(rows[-1]["cached_total_s"]), flush=True)
    for n in args.chains:
        runs = []
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory() as cache:
                runs.append(measure("chain", str(n), cache))
        rows.append({"what": f"straight-line graph of {n} ops", "cold_compile_first_call_s":
                     [r["compile_first_call"] for r in runs]})
        print(rows[-1]["what"], spread(rows[-1]["cold_compile_first_call_s"]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    codegen = os.environ.get("UNROLL_CPU_CODEGEN", "native")
    with open(os.path.join(args.out, f"{codegen}.json"), "w") as f:
        json.dump({"codegen": codegen, "runs": args.runs, "load_average": os.getloadavg(), "rows": rows}, f, indent=1)
    lines = [f"# compile times, {codegen} code generation, {args.runs} runs each, each in a fresh process",
             f"# load average at the end: {os.getloadavg()}", "",
             "| what | cold: import s | cold: compile + first call s | new graph (runtime library cached): "
             "compile + first call s | cached: import + build + load + first call s |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {spread(r['cold_import_s']) if 'cold_import_s' in r else '-'} | "
                     f"{spread(r['cold_compile_first_call_s'])} | "
                     f"{spread(r['new_graph_compile_first_call_s']) if 'new_graph_compile_first_call_s' in r else '-'} | "
                     f"{spread(r['cached_total_s']) if 'cached_total_s' in r else '-'} |")
    with open(os.path.join(args.out, f"{codegen}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
