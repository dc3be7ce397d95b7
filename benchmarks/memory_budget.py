"""Peak memory and time of training steps per memory policy on the Numba backend, predicted (ir/memory.py)
against measured, and ur.MemoryBudget's long-sequence demonstration. Writes
benchmarks/results/memory_budget.{json,md,png}.

    python benchmarks/memory_budget.py                 # everything (about 10 minutes on 2 cores)
    python benchmarks/memory_budget.py --quick         # smaller sizes, no T = 1 000 000

Each configuration runs in a fresh process (so one run's heap never hides another's): build the
step, compile it, run it once, then measure one call's peak resident-set growth (unroll.bench.
peak_memory_mb: /proc/self/clear_refs resets the high-water mark) and time calls. "predicted" is the
model on the graph the backend runs (after its passes); "planned" is the model on the graph before
them (what MemoryBudget plans with; passes never raise it under a bounding policy). Inputs are
seeded (numpy default_rng(seed)); parameters are the modules' seeded initialisations.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MiB = 2 ** 20


# ---- one configuration, in its own process ------------------------------------------------------------

def build(cell: str, T: int, B: int, I: int, H: int, loss_kind: str):  # noqa: E741
    import unroll as ur
    x = ur.input("x", (T, B, I))
    if cell == "TCN":
        net = ur.nn.TCN(I, [H, H])
        out, state = net(x), None
    else:
        net = getattr(ur.nn, cell)(I, H)
        out, state = net(x)
    if loss_kind == "last":
        h_n = state[0] if isinstance(state, tuple) else state
        y = ur.input("y", h_n.shape)
        loss = ur.nn.mse(h_n, y)
    else:
        y = ur.input("y", out.shape)
        loss = ur.nn.mse(out, y)
    return net, loss, y.shape


def policy_of(name: str):
    import unroll as ur
    kind, _, arg = name.partition(":")
    if kind == "MemoryBudget":
        return ur.MemoryBudget(int(float(arg) * MiB))
    if kind == "Checkpoint":
        return ur.Checkpoint(int(arg))
    return getattr(ur, kind)()


def worker(cfg: dict) -> dict:
    import numpy as np

    import unroll as ur
    from unroll.backends.cpu.backend import prepare_graph
    from unroll.bench import peak_memory_mb
    from unroll.compile import pass_pipeline
    try:
        from unroll.ir.autodiff import MEMORY_PLANS, BudgetError
        from unroll.ir.memory import predict
    except ImportError:  # --baseline: a checkout from before the memory model (measured only)
        MEMORY_PLANS, BudgetError, predict = {}, ValueError, None
    T, B, I, H = cfg["T"], cfg["B"], cfg["I"], cfg["H"]  # noqa: E741
    net, loss, yshape = build(cfg["cell"], T, B, I, H, cfg["loss"])
    params = net.parameters()
    t0 = time.perf_counter()
    try:
        value, grads = ur.value_and_grad(loss, params, policy=policy_of(cfg["policy"]))
    except BudgetError as err:
        return dict(cfg, error=str(err))
    plan = MEMORY_PLANS.get(grads[0])
    build_s = time.perf_counter() - t0
    step = ur.compile([value, *grads], backend="numba", optimize=cfg["optimize"])
    lowered = prepare_graph(step.graph, pass_pipeline("numba", cfg["optimize"]))
    rng = np.random.default_rng(cfg["seed"])
    feeds = dict(x=rng.standard_normal((T, B, I), dtype=np.float32),
                 y=rng.standard_normal(yshape, dtype=np.float32), **net.state_dict())
    outs = step(**feeds)
    times = []
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        step(**feeds)
        times.append(time.perf_counter() - t0)
    measured = peak_memory_mb(lambda: step(**feeds))[0]
    # the fastest of the repeats: the machine is shared, and other work only ever adds time
    result = dict(cfg, measured_mib=measured, step_s=min(times),
                  plan_s=build_s, loss_value=float(outs[0]))
    if predict is not None:
        result.update(predicted_mib=predict(lowered).total / MiB, planned_mib=predict([value, *grads]).total / MiB)
    if plan is not None:
        result["plan"] = str(plan.policy)
        result["recomputed"] = plan.recomputed
        result["saveall_planned_mib"] = plan.saveall / MiB
        result["plan_text"] = str(plan)
    if cfg.get("save_grads"):
        np.savez(cfg["save_grads"], *[np.asarray(o) for o in outs])
    return result


def run_one(cfg: dict, timeout: float = 1800, baseline: str | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=baseline) if baseline else None  # that checkout's unroll first
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return dict(cfg, error=(proc.stderr.strip().splitlines() or ["no output"])[-1])
    out = json.loads(lines[-1])
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}), flush=True)
    return out


# ---- the suite ----------------------------------------------------------------------------------------

def configs(quick: bool) -> dict[str, list[dict]]:
    base = dict(B=4, I=64, H=64, seed=0, repeats=3, optimize=True, loss="all")
    repro_T = 5000 if quick else 20000
    k = int(math.sqrt(repro_T))
    repro = [dict(base, cell="LSTM", T=repro_T, policy=p, optimize=o, repeats=5)
             for p in ("SaveAll", "Recompute", f"Checkpoint:{k}", "MemoryBudget:96") for o in (True, False)]
    repro.append(dict(base, cell="LSTM", T=repro_T, policy="MemoryBudget:0.000001"))  # the error
    tradeoff = [dict(base, cell="LSTM", T=repro_T, policy=p, repeats=5)
                for p in [f"Checkpoint:{j}" for j in (20, 50, 500, 2000)]
                + [f"MemoryBudget:{m}" for m in (200, 128, 84)]]
    sizes = (1000, 10000) if quick else (1000, 10000, 100000)
    table = []
    for T in sizes:
        for cell in ("LSTM", "GRU"):
            for p in ("SaveAll", "Recompute", f"Checkpoint:{int(math.sqrt(T))}", "MemoryBudget:auto"):
                table.append(dict(base, cell=cell, T=T, policy=p, repeats=1 if T >= 100000 else 3))
        table.append(dict(base, cell="TCN", T=T, policy="SaveAll", repeats=1 if T >= 100000 else 3))
    demo_T = (10000, 100000) if quick else (100000, 1000000)
    demo = [dict(base, cell="LSTM", T=T, policy="MemoryBudget:256", loss="last", repeats=1) for T in demo_T]
    demo.append(dict(base, cell="LSTM", T=demo_T[0], policy="SaveAll", loss="last", repeats=1))
    return {"reproduction": repro, "tradeoff": tradeoff, "table": table, "demo": demo}


def resolve_auto(cfg: dict, saveall: dict | None) -> dict:
    """MemoryBudget:auto = half of what the same step takes under SaveAll (planned, before passes)."""
    if cfg["policy"] == "MemoryBudget:auto" and saveall is not None and "planned_mib" in saveall:
        return dict(cfg, policy=f"MemoryBudget:{saveall['planned_mib'] / 2:.2f}")
    return cfg


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", default=None, help="groups: reproduction tradeoff table demo")
    ap.add_argument("--baseline", help="a checkout of an earlier unroll (git archive): the reproduction's "
                    "default-pass rows measured with it too (group 'baseline')")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "memory_budget.json")
    results: dict[str, list[dict]] = {}
    if os.path.exists(path) and args.only is not None:
        with open(path) as f:
            results = json.load(f).get("groups", {})
    for group, cfgs in configs(args.quick).items():
        if args.only is not None and group not in args.only:
            continue
        out: list[dict] = []
        for cfg in cfgs:
            if group == "demo" and cfg["policy"] == "SaveAll":
                cfg = dict(cfg, save_grads=os.path.join("/tmp", f"mb_saveall_{cfg['T']}.npz"))
            if group == "demo" and cfg["policy"].startswith("MemoryBudget") and cfg["T"] == cfgs[-1]["T"]:
                cfg = dict(cfg, save_grads=os.path.join("/tmp", f"mb_budget_{cfg['T']}.npz"))
            saveall = next((r for r in out if r["cell"] == cfg["cell"] and r["T"] == cfg["T"]
                            and r["policy"] == "SaveAll"), None)
            out.append(run_one(resolve_auto(cfg, saveall)))
        results[group] = out
    if args.baseline:
        results["baseline"] = [run_one(dict(cfg, baseline=os.path.abspath(args.baseline)), baseline=args.baseline)
                               for cfg in configs(args.quick)["reproduction"]
                               if cfg["policy"] in ("SaveAll", "Recompute") or cfg["policy"].startswith("Checkpoint")]
    _compare_demo(results.get("demo", []))
    with open(path, "w") as f:
        json.dump({"machine": _machine(), "groups": results}, f, indent=1)
    write_md(results)
    plot(results)
    print(f"wrote {RESULTS}/memory_budget.{{json,md,png}}")


def _compare_demo(demo: list[dict]) -> None:
    """Gradients of the budgeted step against SaveAll's where SaveAll ran (same T)."""
    import numpy as np
    for r in demo:
        if r.get("policy", "").startswith("MemoryBudget"):
            a, b = f"/tmp/mb_saveall_{r['T']}.npz", f"/tmp/mb_budget_{r['T']}.npz"
            if os.path.exists(a) and os.path.exists(b):
                x, y = np.load(a), np.load(b)
                r["max_rel_grad_diff_vs_saveall"] = max(
                    float(np.abs(x[k] - y[k]).max() / max(np.abs(x[k]).max(), 1e-30)) for k in x.files)


def _machine() -> str:
    return f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}"


def write_md(results: dict[str, list[dict]]) -> None:
    lines = ["# Memory policies: predicted vs measured peak, and time (Numba backend)", "",
             "Peak = resident-set growth of one training-step call (inputs excluded); predicted = "
             "`unroll.ir.memory.predict` on the graph the backend runs; planned = the same on the graph "
             "before the passes; step s = the fastest of the repeated calls. B=4, I=H=64, float32, loss = MSE "
             "over every output unless noted.", ""]

    def table(rows: list[dict], title: str, extra: bool = False) -> None:
        lines.extend([f"## {title}", "",
                      "| cell | T | policy | optimize | predicted MiB | measured MiB | pred/meas | planned MiB | "
                      "step s |" + (" plan |" if extra else ""),
                      "|---|---|---|---|---|---|---|---|---|" + ("---|" if extra else "")])
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['cell']} | {r['T']} | {r['policy']} | {r['optimize']} | error: "
                             f"{r['error'][:120]} |||||" + ("|" if extra else ""))
                continue
            if "predicted_mib" not in r:  # a baseline run: measured only
                lines.append(f"| {r['cell']} | {r['T']} | {r['policy']} | {r['optimize']} | - | "
                             f"{r['measured_mib']:.1f} | - | - | {r['step_s']:.3f} |" + (" |" if extra else ""))
                continue
            ratio = r["predicted_mib"] / r["measured_mib"] if r["measured_mib"] else float("nan")
            lines.append(f"| {r['cell']} | {r['T']} | {r['policy']} | {r['optimize']} | {r['predicted_mib']:.1f} | "
                         f"{r['measured_mib']:.1f} | {ratio:.3f} | {r['planned_mib']:.1f} | {r['step_s']:.3f} |"
                         + (f" {r.get('plan', '')} |" if extra else ""))
        lines.append("")

    if "reproduction" in results:
        table(results["reproduction"], "The issue's step (LSTM), default passes vs optimize=False", True)
    if "baseline" in results:
        table(results["baseline"], "The same step before this change (--baseline: the parent commit's unroll)")
    if "table" in results:
        table(results["table"], "Predicted vs measured per policy (MemoryBudget: half of SaveAll's planned peak)", True)
    if "tradeoff" in results:
        table(results["tradeoff"], "Memory against time (LSTM)", True)
    shown = [r for g in ("reproduction", "demo") for r in results.get(g, []) if "plan_text" in r or "error" in r]
    if shown:
        lines.extend(["## Plans and errors, as `ur.explain` and `MemoryBudget` print them", ""])
        for r in shown:
            lines.extend([f"{r['cell']} T={r['T']} {r['policy']} (optimize={r['optimize']}):", "", "```",
                          r.get("plan_text") or r["error"], "```", ""])
    if "demo" in results:
        table(results["demo"], "Long sequences under MemoryBudget(256 MiB) (loss on the last hidden state)", True)
        for r in results["demo"]:
            if "max_rel_grad_diff_vs_saveall" in r:
                lines.append(f"T={r['T']}: max relative difference of the budgeted step's loss and gradients "
                             f"from SaveAll's: {r['max_rel_grad_diff_vs_saveall']:.2e}")
        lines.append("")
    with open(os.path.join(RESULTS, "memory_budget.md"), "w") as f:
        f.write("\n".join(lines))


def plot(results: dict[str, list[dict]]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for g in ("reproduction", "tradeoff") for r in results.get(g, [])
            if "error" not in r and r.get("optimize")]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds = {"SaveAll": "o", "Recompute": "s", "Checkpoint": "^", "MemoryBudget": "D"}
    for kind, marker in kinds.items():
        sel = [r for r in rows if r["policy"].split(":")[0] == kind]
        if not sel:
            continue
        ax.scatter([r["step_s"] for r in sel], [r["measured_mib"] for r in sel], marker=marker, s=50, label=kind)
        for r in sel:
            tag = r["policy"].split(":")[1] if ":" in r["policy"] else ""
            if tag:
                ax.annotate(tag + (" MiB" if kind == "MemoryBudget" else ""), (r["step_s"], r["measured_mib"]),
                            fontsize=7, xytext=(4, 3), textcoords="offset points")
    T = rows[0]["T"]
    ax.set_xlabel("training step time (s)")
    ax.set_ylabel("peak memory of the step (MiB, measured)")
    ax.set_title(f"LSTM training step, T={T}, B=4, I=H=64 (Numba backend)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "memory_budget.png"), dpi=120)


if __name__ == "__main__":
    main()
