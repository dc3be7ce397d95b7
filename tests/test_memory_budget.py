"""Memory: the allocation model (ir/memory.py) against the generated kernel and the measured peak,
passes that never raise the peak of a memory-bounding policy, and ur.MemoryBudget (its plans give
SaveAll's gradients, its bad inputs, its report)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import unroll as ur
from unroll.backends import numpy_ref
from unroll.compile import pass_pipeline
from unroll.ir.autodiff import MEMORY_PLANS, BudgetError, Segments
from unroll.ir.memory import LoopCost, optimal_cost, optimal_recomputed, optimal_schedule, plan_levels, predict
from unroll.ir.node import Graph

F64 = "float64"


def run(nodes, feeds):
    graph = Graph.of(list(nodes))
    ur.verify(graph)
    return numpy_ref.evaluate(graph, [feeds[name] for name in graph.input_names])


def assert_close(got, want, rtol=1e-12):
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert np.abs(g - w).max(initial=0.0) <= rtol * max(np.abs(w).max(initial=0.0), 1e-300)


def model(cell, T, B=2, I=3, H=4, dtype=F64, last_state=False):
    """A training loss of an RNN/LSTM/GRU/TCN: mse over every output, or (last_state) over h_T only."""
    x = ur.input("x", (T, B, I), dtype)
    net = ur.nn.TCN(I, [H, H], dtype=dtype) if cell == "TCN" else getattr(ur.nn, cell)(I, H, dtype=dtype)
    if cell == "TCN":
        out = net(x)
    else:
        out, state = net(x)
    if last_state:
        h_n = state[0] if isinstance(state, tuple) else state
        target = ur.input("y", h_n.shape, dtype)
        loss = ur.nn.mse(h_n, target)
    else:
        target = ur.input("y", out.shape, dtype)
        loss = ur.nn.mse(out, target)
    return net, loss, target.shape


def feeds_for(net, T, target_shape, B=2, I=3, dtype=F64, seed=0):
    rng = np.random.default_rng(seed)
    return dict(x=rng.standard_normal((T, B, I)).astype(dtype), y=rng.standard_normal(target_shape).astype(dtype),
                **net.state_dict())


# ---- MemoryBudget's plans are checkpoints: SaveAll's gradients ----------------------------------------

@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("levels", [(5,), (9, 3), (17, 6, 2)])
def test_nested_segments_give_saveall_gradients(cell, levels):
    T = 41
    net, loss, yshape = model(cell, T)
    feeds = feeds_for(net, T, yshape)
    want = run(ur.grad(loss, net.parameters()), feeds)
    assert_close(run(ur.grad(loss, net.parameters(), policy=Segments(levels)), feeds), want)


def test_budgets_choose_deeper_plans_as_they_shrink_and_keep_the_gradients():
    T = 3000
    net, loss, yshape = model("LSTM", T, last_state=True)
    feeds = feeds_for(net, T, yshape)
    params = net.parameters()
    want = run(ur.grad(loss, params), feeds)
    saveall = MEMORY_PLANS[ur.grad(loss, params, policy=ur.MemoryBudget(2 ** 40))[0]].saveall
    depths = []
    for fraction in (1.0, 0.1, 0.02):
        budget = int(saveall * fraction)
        try:
            grads = ur.grad(loss, params, policy=ur.MemoryBudget(budget))
        except BudgetError:
            break
        plan = MEMORY_PLANS[grads[0]]
        assert plan.predicted <= budget
        depths.append(len(plan.policy.levels) if isinstance(plan.policy, Segments) else 0)
        assert_close(run(grads, feeds), want)
    assert depths[0] == 0 and max(depths) >= 2 and depths == sorted(depths), depths


def test_plan_levels_takes_the_fewest_recomputed_steps_that_fit():
    cost = LoopCost(length=10_000, saved=1000, carry=100)
    assert plan_levels([cost], 10_000 * 1000) == ((), 10_000_000)          # SaveAll fits
    levels, mem = plan_levels([cost], 1_000_000)
    assert len(levels) == 1 and mem <= 1_000_000                            # sqrt(T): one level
    assert 200 <= levels[0] <= 500                                          # near sqrt(T c / s) = 316
    levels2, mem2 = plan_levels([cost], 60_000)
    assert len(levels2) >= 2 and mem2 <= 60_000
    million = LoopCost(length=1_000_000, saved=8192, carry=2048)
    levels3, mem3 = plan_levels([million], 8 * 2 ** 20)
    assert mem3 <= 8 * 2 ** 20 and million.recomputed(levels3) <= len(levels3) * 1_000_000



# ---- the optimum over all schedules (Gruslys et al. 2016) -------------------------------------------

def _gruslys(t, m, memo={}):
    """Gruslys et al.'s recursion for BPTT-HSM, literally: total forward steps, m slots."""
    if t <= 1:
        return t
    if m == 1:
        return t * (t + 1) // 2
    if (t, m) not in memo:
        memo[t, m] = min(y + _gruslys(t - y, m - 1) + _gruslys(y, m) for y in range(1, t))
    return memo[t, m]


def _every_schedule(t, m, tape=1):
    """The fewest forward steps over every schedule, by a search over all of them: states
    (current state or None, stored states, steps not yet backpropagated); moves: advance (1),
    store (a slot), restore, free, and run the last j <= tape steps taped and backward (j)."""
    import heapq
    start = (0, frozenset({0}), t)
    dist, heap = {start: 0}, [(0, 0, start)]
    count = 0
    while heap:
        d, _, (p, stored, b) = heapq.heappop(heap)
        if d > dist[(p, stored, b)]:
            continue
        if b == 0:
            return d
        moves = []
        if p is not None and p < b - 1:
            moves.append((1, (p + 1, stored, b)))
        if p is not None and p not in stored and len(stored) < m:
            moves.append((0, (p, stored | {p}, b)))
        for q in stored:
            moves += [(0, (q, stored, b)), (0, (None if p == q else p, stored - {q}, b))]
        if p is not None and b - p <= tape:
            moves.append((b - p, (None, frozenset(q for q in stored if q < p), p)))
        for w, state in moves:
            if d + w < dist.get(state, 1 << 60):
                count += 1
                dist[state] = d + w
                heapq.heappush(heap, (d + w, count, state))
    return None


def test_gruslys_dp_is_the_optimum_over_every_schedule():
    for t in range(9):
        for m in range(1, t + 2):
            assert optimal_cost(t, m) == _gruslys(t, m) == _every_schedule(t, m), (t, m)
    for tape in (2, 3):  # whole segments taped at once (unroll's innermost level): the reach scales
        for t in range(8):
            for m in range(1, 5):
                assert optimal_recomputed(t, m, tape) + t == _every_schedule(t, m, tape), (t, m, tape)


def test_gruslys_closed_form_known_values_and_monotone_in_slots():
    for t in range(60):
        for m in range(1, 10):
            assert optimal_cost(t, m) == _gruslys(t, m), (t, m)
    for t in (1, 2, 7, 1000, 10 ** 6):
        assert optimal_cost(t, 1) == t * (t + 1) // 2
        assert optimal_cost(t, t) == optimal_cost(t, t + 5) == 2 * t - 1   # every step twice but the last
    for t in (5, 100, 20_000, 10 ** 6):
        costs = [optimal_cost(t, m) for m in range(1, 40)]
        assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1] >= 2 * t - 1
    # by hand: 4 steps, 2 slots: store state 2 (2), steps 4, 3 from it (1 + 2), 2, 1 from state 0 (1 + 2)
    assert optimal_cost(4, 2) == 8 and optimal_cost(3, 2) == 5
    # revolve: 5 slots advancing each step at most r = 10 times reach binom(15, 10) = 3003 steps
    assert optimal_cost(3003, 5) == 3003 + 10 * 3003 - 5005 and optimal_cost(3004, 5) == 3004 + 11 * 3004 - 8008
    assert optimal_recomputed(20_000, 250, 80) == 20_000 - 80      # one level: all but the last segment


def test_optimal_schedule_is_valid_and_costs_the_optimum():
    for t in range(1, 13):
        for m in range(1, 6):
            stored, current, pending, cost = {0}, 0, t, 0
            for action, i in optimal_schedule(t, m):
                if action == "advance":
                    assert current == i - 1 and i < pending
                    current, cost = i, cost + 1
                elif action == "store":
                    assert current == i and len(stored) < m
                    stored.add(i)
                elif action == "restore":
                    assert i in stored
                    current = i
                elif action == "free":
                    stored.remove(i)
                else:
                    assert action == "backward" and i == pending and current == i - 1
                    pending, current, cost = pending - 1, None, cost + 1
            assert pending == 0 and cost == optimal_cost(t, m), (t, m)


@pytest.mark.parametrize("levels", [(80,), (81,), (1000, 30), (5000, 400, 20), (7,)])
def test_equal_segment_plans_recompute_at_least_the_optimum(levels):
    cost = LoopCost(length=20_000, saved=7168, carry=2048)
    slots, tape, best = cost.optimum(levels)
    assert tape == levels[-1] and best <= cost.recomputed(levels) <= len(levels) * cost.length
    assert best == optimal_recomputed(cost.length, slots, tape)


def test_random_plans_recompute_at_least_the_optimum():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        n = int(rng.integers(2, 5000))
        levels = tuple(sorted({int(k) for k in rng.integers(1, n, size=int(rng.integers(1, 5)))}, reverse=True))
        cost = LoopCost(length=n, saved=10, carry=3)
        assert cost.optimum(levels)[2] <= cost.recomputed(levels), (n, levels)

# ---- bad input -------------------------------------------------------------------------------------

def test_a_budget_below_one_step_names_the_smallest_that_works():
    T = 60
    net, loss, _ = model("LSTM", T, last_state=True)
    with pytest.raises(BudgetError, match=r"at least (\d+) bytes") as err:
        ur.grad(loss, net.parameters(), policy=ur.MemoryBudget(1000))
    smallest = int(re.search(r"at least (\d+) bytes", str(err.value)).group(1))
    grads = ur.grad(loss, net.parameters(), policy=ur.MemoryBudget(smallest))
    assert MEMORY_PLANS[grads[0]].predicted <= smallest
    with pytest.raises(BudgetError):
        ur.grad(loss, net.parameters(), policy=ur.MemoryBudget(smallest - 1))


def test_a_budget_that_fits_saveall_is_saveall():
    T = 30
    net, loss, _ = model("GRU", T)
    params = net.parameters()
    grads = ur.grad(loss, params, policy=ur.MemoryBudget(2 ** 40))
    assert grads == ur.grad(loss, params)   # the very same nodes
    assert isinstance(MEMORY_PLANS[grads[0]].policy, ur.SaveAll)


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "1GB"])
def test_budget_values_are_checked(bad):
    with pytest.raises(ValueError, match="MemoryBudget"):
        ur.MemoryBudget(bad)


def test_explain_prints_the_plan_and_the_predicted_peak_per_pass():
    T = 200
    net, loss, _ = model("LSTM", T, last_state=True)
    value, grads = ur.value_and_grad(loss, net.parameters())
    budget = predict([value, *grads]).total // 3
    value, grads = ur.value_and_grad(loss, net.parameters(), policy=ur.MemoryBudget(budget))
    text = str(ur.explain([value, *grads]))
    assert "peak" in text and "memory budget" in text and "recomputed forward steps" in text
    assert "checkpoints" in text and "predicted peak" in text
    plan = MEMORY_PLANS[grads[0]]
    m = re.search(r"recomputed forward steps: (\d+) \(Gruslys et al.'s optimum with the same (\d+) state slots "
                  r"and (\d+) saved steps: (\d+)\)", text)
    assert m, text
    recomputed, slots, tape, best = map(int, m.groups())
    assert recomputed == plan.recomputed and best == optimal_recomputed(T, slots, tape) <= recomputed
    assert (slots, tape, best) == LoopCost(*plan.loops[0]).optimum(plan.policy.levels)


# ---- passes respect the policy -------------------------------------------------------------------------

POLICIES = {"Recompute": lambda: ur.Recompute(), "Checkpoint(7)": lambda: ur.Checkpoint(7),
            "Segments(20,5)": lambda: Segments((20, 5)), "MemoryBudget": None}


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_no_pass_raises_the_predicted_peak_of_a_bounding_policy(cell, name):
    T = 150
    net, loss, _ = model(cell, T, B=4, I=8, H=16, dtype="float32")
    params = net.parameters()
    if POLICIES[name] is None:
        full = predict(list(ur.value_and_grad(loss, params)[:1]) + ur.grad(loss, params)).total
        policy = ur.MemoryBudget(int(full * 0.7))
    else:
        policy = POLICIES[name]()
    value, grads = ur.value_and_grad(loss, params, policy=policy)
    # hoisted invariants (a transposed or concatenated weight) are one copy of the weights per
    # direction at most: independent of T, unlike the per-step sequences the policies bound
    weights = 2 * sum(p.type.size * 4 for p in params)
    # the model is the CPU backend's (the numba pipeline); the CUDA pipeline's per-step fused kernels
    # allocate per step there, so for it only the per-step sequences are checked
    for passes, whole in ((pass_pipeline("numba"), True), (pass_pipeline("cuda"), False)):
        report = ur.optimize([value, *grads], passes=list(passes), report=True)[1]
        peaks = [predict(step.graph) for step in report.steps]
        for before, after, step in zip(peaks, peaks[1:], report.steps[1:]):
            assert after.stacked <= before.stacked, (step.name, before.stacked, after.stacked)
            assert not whole or after.total <= before.total + weights, (step.name, before.total, after.total)
        assert not whole or peaks[-1].total <= peaks[0].total + weights


def test_saveall_gets_batched_products_only_within_the_allowance():
    from unroll.ir.hoist import STACK_ALLOWANCE
    for T, stacked in ((150, True), (20000, False)):
        net, loss, _ = model("LSTM", T, B=4, I=64, H=64, dtype="float32")
        value, grads = ur.value_and_grad(loss, net.parameters())
        weights = 2 * sum(p.type.size * 4 for p in net.parameters())
        report = ur.optimize([value, *grads], passes=list(pass_pipeline("numba")), report=True)[1]
        peaks = [predict(step.graph).total for step in report.steps]
        hoisted = peaks[[s.name for s in report.steps].index("hoist")]
        assert (hoisted > peaks[0] + weights) == stacked    # short: the input projection batched over T
        for before, after in zip(peaks, peaks[1:]):
            assert after <= before + 2 * STACK_ALLOWANCE + weights   # a forward and a backward loop
        assert stacked or peaks[-1] <= peaks[0] + weights   # long: SaveAll's own peak


# ---- prediction against the kernel and the measurement -------------------------------------------------

def _kernel_bytes(impl) -> int:
    """Bytes of every np.empty / np.full in a generated kernel, each site once."""
    env = {f"n{k}": int(d) & 0xFFFFFFFFFF for k, d in enumerate(impl.dims)}
    total = 0
    for line in impl.source.splitlines():
        m = re.search(r"= np\.(empty|full)\((.*), np\.(\w+)\)\s*$", line)
        if m:
            shape_text = m.group(2).rsplit(",", 1)[0] if m.group(1) == "full" else m.group(2)
            shape = eval(shape_text, {"max": max}, env)  # noqa: S307 - our own generated text
            total += int(np.prod(shape)) * np.dtype(m.group(3)).itemsize
    return total


def _lowered(step):
    from unroll.backends.cpu.backend import prepare_graph
    return prepare_graph(step.graph, pass_pipeline("numba"))


CASES = [("LSTM", "MemoryBudget"), ("LSTM", "SaveAll"), ("GRU", "Checkpoint"), ("TCN", "SaveAll")]


def _policy(kind, loss, params):
    if kind == "SaveAll":
        return ur.SaveAll()
    if kind == "Checkpoint":
        return ur.Checkpoint(45)
    full = predict(list(ur.value_and_grad(loss, params)[:1]) + ur.grad(loss, params)).total
    return ur.MemoryBudget(int(full * 0.6))


@pytest.mark.parametrize("cell,kind", CASES)
def test_predicted_peak_within_10_percent_of_the_kernel_and_the_measurement(cell, kind):
    pytest.importorskip("numba")
    from unroll.bench import peak_memory_mb
    T, B, I, H = 2000, 4, 32, 32
    net, loss, yshape = model(cell, T, B, I, H, dtype="float32")
    params = net.parameters()
    value, grads = ur.value_and_grad(loss, params, policy=_policy(kind, loss, params))
    step = ur.compile([value, *grads], backend="numba")
    predicted = predict(_lowered(step)).total
    assert abs(predicted - _kernel_bytes(step.impl)) <= 0.05 * predicted
    feeds = feeds_for(net, T, yshape, B, I, dtype="float32")
    step(**feeds)
    measured = min(peak_memory_mb(lambda: step(**feeds))[0] for _ in range(2)) * 2 ** 20
    assert abs(measured - predicted) <= 0.10 * predicted, (measured / 2 ** 20, predicted / 2 ** 20)
    assert predict([value, *grads]).total >= predicted or kind == "SaveAll"   # the passes did not raise it


@pytest.mark.slow
def test_lstm_100k_steps_under_256_mb():
    pytest.importorskip("numba")
    from unroll.bench import peak_memory_mb
    T, B, I, H = 100_000, 4, 64, 64
    net, loss, yshape = model("LSTM", T, B, I, H, dtype="float32", last_state=True)
    value, grads = ur.value_and_grad(loss, net.parameters(), policy=ur.MemoryBudget(256 * 2 ** 20))
    plan = MEMORY_PLANS[grads[0]]
    assert isinstance(plan.policy, Segments) and plan.predicted <= 256 * 2 ** 20
    step = ur.compile([value, *grads], backend="numba")
    feeds = feeds_for(net, T, yshape, B, I, dtype="float32")
    measured = peak_memory_mb(lambda: step(**feeds))[0]
    assert measured <= 256


def test_the_readme_block_prints_what_the_readme_shows():
    """The README's "Long sequences within a memory budget" block, run in a new interpreter as a
    reader runs it: its plan and its BudgetError, line for line."""
    import re
    import subprocess
    import sys
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Long sequences within a memory budget\n"):]
    code, shown = re.search(r"```python\n(.*?)```\n```\n(.*?)```", section, re.S).groups()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == shown
