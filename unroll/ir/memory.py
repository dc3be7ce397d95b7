"""Memory of a training step: the bytes a graph allocates when it runs, and checkpoint plans that keep
them under a budget (the planner behind `ur.MemoryBudget`).

The model (`predict`) follows the CPU backend's allocation, not an idealised one: the generated kernel
allocates one buffer per allocation site and frees it only when the site runs again or the call
ends, so a call's peak is the *sum* of its buffers, each counted once (a loop body's buffers are
allocated once, before the outermost loop). A node has no buffer of its own when the code generator
reads it through an index map or writes it into another buffer: views (reshape, transpose, slice,
broadcast, pad, stop_gradient), elementwise ops inlined into their only user, a product accumulated
into the sum that reads it, a per-step output written straight into its stacked sequence, a concat
read through index arithmetic. A loop costs its carried buffers, its stacked per-step outputs
(length x step) and its body's buffers once. Inputs are the caller's and not counted; outputs are.
Tests check the model against the generated kernel's `np.empty` sizes and against the measured peak
resident-set growth of a call.

Plans. A loop of length n saving s bytes per step for its backward pass (SaveAll) keeps n*s. Cut into
segments of k steps, only the c bytes of state entering each segment are kept, and the backward pass
reruns one segment's forward loop at a time, saving everything for it: (n//k)*c + k*s + the segment's
own plan, one extra forward pass (Chen et al. 2016; k = sqrt(n*c/s) is the minimum, the sqrt(T) rule).
Segments may be cut again inside (levels: (k1, k2, ...)), each level one more forward pass and
memory (n//k1 + k1//k2 + ...)*c + k_last*s, so T = 1 000 000 fits in a few MB per loop. `plan_levels`
is a dynamic programme over these nested uniform schedules (the shapes `segment_loop` builds), in
the spirit of Gruslys et al. 2016 but restricted to equal segments per level, which keeps every level
one rolled loop: it returns the schedule with the fewest recomputed steps whose predicted memory fits,
ties broken by less memory. The remainder loop of n mod k steps is planned with the next levels.

Equal segments, and how far they are from the optimum. Gruslys et al.'s optimal schedules (and
revolve's) place every checkpoint differently: no two segments share a length. In this IR a loop has
a static length and one body, so a level of equal segments is one rolled loop whose body is the next
level, and the graph, its passes and its compile time stay independent of T; unequal segments would
need a loop per distinct length (O(T) of them for the optimum) or loops with run-time trip counts.
So the plan keeps equal segments, and `ur.explain` prints, beside its recomputed steps, the optimum
over all schedules with the same state slots and saved steps (`LoopCost.optimum`, below). For an
LSTM (B = 4, I = H = 64, float32: 7168 B saved and 2048 B of state per step):
  T = 20 000, MemoryBudget(96 MiB) (the README's block): segments of 80, 20 000 recomputed; optimum
    with the same 250 slots and 80 saved steps 19 920, with the same bytes (1.04 MiB) at least
    19 849 (any schedule recomputes all but the steps taped in the first pass: T - (M - c) // s);
  T = 100 000, 256 MiB (loss on the last state): segments of 11 548, 92 384; same slots and steps
    88 452, same bytes at least 88 450 (4.3 % fewer);
  T = 1 000 000, 256 MiB: segments of 13 335, 986 790; same 986 665, at least 986 645 (0.01 %).
With the same bytes the plan is within one segment of the optimum. The budget's room is another
matter: one level recomputes n - n mod k whatever k, so the plan keeps the least memory with that
count, while the optimum with all the room (about 16.6, 254 and 254 MiB beside the part no checkpoint
reduces) recomputes about 17 580 (12 % fewer), 62 855 (32 %) and 962 862 (2.4 %): it tapes one long
final run during the first pass and the rest in long runs, each freed after its backward steps. That
is not expressible here: the runs differ in length, and the CPU backend frees a buffer only when its
allocation site runs again, so runs of different lengths would coexist. Gruslys et al.'s BPTT-HSM
(hidden states only, one step taped at a time) is worse than the plan at the same slots (39 748 for
the README's 250): rerunning a whole segment taped is what lets each step be recomputed once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

from .node import Graph, LoopInfo, Node
from .ops import ELEMENTWISE, LEAVES, Op, TensorType

# ---- the allocation model -------------------------------------------------------------------------

ITEMSIZE = {"bool": 1, "int8": 1, "uint8": 1, "float16": 2, "int16": 2, "float32": 4, "int32": 4,
            "float64": 8, "int64": 8}

# read through an index map, never stored (cpu/schedule.py VIEW_OPS)
VIEWS = frozenset({Op.TRANSPOSE, Op.SLICE, Op.BROADCAST, Op.RESHAPE, Op.STOP_GRADIENT, Op.PAD})
# users an elementwise producer is inlined into (cpu/schedule.py INLINE_INTO)
INLINE_INTO = (ELEMENTWISE - {Op.STOP_GRADIENT}) | {Op.SUM, Op.REDUCE_MAX}
# ops whose emitter writes into a given destination (cpu/schedule.py is_writer)
WRITERS = (ELEMENTWISE - {Op.STOP_GRADIENT}) | {Op.MATMUL, Op.SUM, Op.REDUCE_MAX, Op.CONCAT, Op.ARGMAX,
                                                Op.ONEHOT}


def nbytes(t: TensorType) -> int:
    return t.size * ITEMSIZE.get(t.dtype, 8)


@dataclass
class Memory:
    """Predicted bytes of one call: `total` (the peak: every buffer, each once), the part held by
    loops' stacked per-step outputs (`stacked`, what policies and passes trade), and per loop."""

    total: int = 0
    stacked: int = 0
    loops: list[tuple[Node, int]] = field(default_factory=list)  # (loop, bytes of its ys and carries)

    def __str__(self) -> str:
        return f"{mb(self.total)} predicted peak ({mb(self.stacked)} in per-step sequences of loops)"


def mb(n: float) -> str:
    """Bytes for people: MiB, or KiB / B when small."""
    for unit, scale in (("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _writer(node: Node) -> bool:
    if node.op is Op.PROJ:
        return node.src[0].op is Op.FUSED
    return node.op in WRITERS


def _scope_free(graph: Graph, targets: set[Node], top: bool = False) -> set[Node]:
    """Nodes of one scope that get no buffer of their own (besides views and leaves): inlined
    elementwise producers, accumulated products, concat parts and virtual concats. `targets`: nodes
    written into a buffer owned elsewhere (ys[t], a carry); `top`: the function's own scope, where
    a sum may take over the buffer of an operand that dies there (in a body buffers are per step)."""
    order = graph.nodes()
    outputs = set(graph.outputs)
    use: dict[Node, list[Node]] = {}
    for node in order:
        for s in node.src:
            use.setdefault(s, []).append(node)
    free: set[Node] = set()
    no_inline: set[Node] = set()

    def accumulable(term: Node) -> Node | None:
        if term in outputs or len(use.get(term, [])) != 1:
            return None
        if term.op is Op.PAD and term.ndim == 2 and term.arg[1] == (0, 0):  # type: ignore[index]
            term = term.src[0]
            if term in outputs or len(use.get(term, [])) != 1:
                return None
        return term if term.op is Op.MATMUL and term.ndim == 2 else None

    for node in order:
        if node.op is Op.ADD and node.ndim == 2 and node.src[0].shape == node.src[1].shape:
            for term, other in ((node.src[1], node.src[0]), (node.src[0], node.src[1])):
                mm = accumulable(term)
                if mm is not None and term is not other:
                    free.add(mm)  # the sum's BLAS call writes the product into its own buffer
                    no_inline.add(other)
                    first = accumulable(other) if other.op is Op.PAD else None
                    if first is not None and node not in targets:
                        free.add(first)  # a second padded product written into the sum's rows
                    elif top and node not in targets and node not in outputs and other not in outputs \
                            and other.op not in LEAVES and other.op not in VIEWS and other.op is not Op.PROJ \
                            and other not in free and len(use.get(other, [])) == 1:
                        free.add(node)  # the sum takes over its other operand's buffer (a chain of taps)
                    break
    for node in reversed(order):
        if node.op is not Op.CONCAT:
            continue
        writes = [s for s in node.src if len(use.get(s, [])) == 1 and s not in outputs and s not in targets
                  and _writer(s) and node.src.count(s) == 1]
        if not writes and node not in targets and node not in outputs:
            free.add(node)  # read through index arithmetic
            continue
        free.update(writes)
        no_inline.update(writes)
    for node in order:
        users = use.get(node, [])
        if node in no_inline or node in outputs or not node.src:
            continue
        if node.op in ELEMENTWISE and node.op is not Op.STOP_GRADIENT and len(users) == 1 \
                and users[0].op in INLINE_INTO:
            user = users[0]
            shape = user.src[0].shape if user.op in (Op.SUM, Op.REDUCE_MAX) else user.shape
            if node.shape == shape:
                free.add(node)
    return free


def _step_targets(info: LoopInfo) -> set[Node]:
    """Body values a loop step writes into buffers it does not own: per-step outputs computed only
    for their ys[t], and carries updated in place as `c + a @ b` (cpu/schedule.py loop_step_targets)."""
    body, n_c, n_h = info.body, info.n_consts, info.n_carry
    counts: dict[Node, int] = {}
    for o in body.outputs:
        counts[o] = counts.get(o, 0) + 1
    out: set[Node] = set()
    for o in body.outputs[n_h:]:
        if counts[o] == 1 and ((o.op not in (Op.ARG, Op.CONST, Op.PROJ) and o.op not in VIEWS)
                               or (o.op is Op.PROJ and o.src[0].op is Op.FUSED)):
            out.add(o)
    reads: dict[Node, int] = {}
    for n in body.nodes():
        for s in n.src:
            reads[s] = reads.get(s, 0) + 1
    for k, o in enumerate(body.outputs[:n_h]):
        arg = body.inputs[n_c + k]
        if o.op is Op.ADD and arg in o.src and reads.get(arg, 0) == 1 and counts[o] == 1 and o.ndim == 2 \
                and o.src[0].shape == o.src[1].shape and any(s.op is Op.MATMUL for s in o.src if s is not arg):
            out.add(o)
    return out


def predict(graph: Graph | Node | Sequence[Node]) -> Memory:
    """The bytes one call of `graph` allocates on the CPU backend (see the module docstring). Run it
    on the graph the backend compiles (after its passes) or on the graph before them: passes never
    raise it (tests/test_memory_budget.py checks every pass under every policy)."""
    if not isinstance(graph, Graph):
        graph = Graph.of([graph] if isinstance(graph, Node) else list(graph))
    mem = Memory()
    top_outputs = graph.outputs
    stack: list[tuple[Graph, set[Node], bool]] = [(graph, set(), True)]
    while stack:
        g, targets, top = stack.pop()
        free = _scope_free(g, targets, top)
        fused_outs: dict[Node, set[int]] = {}
        for node in g.nodes():
            if node.op is Op.PROJ and node.src[0].op is Op.FUSED and node not in targets and node not in free:
                fused_outs.setdefault(node.src[0], set()).add(node.arg)  # type: ignore[arg-type]
        for node in g.nodes():
            op = node.op
            if op in LEAVES or op in VIEWS or op is Op.PROJ or node in free or node in targets:
                continue
            if op is Op.LOOP:
                info: LoopInfo = node.arg  # type: ignore[assignment]
                body, n_c, n_h = info.body, info.n_consts, info.n_carry
                carries = sum(nbytes(a.tensor_type) for a in body.inputs[n_c:n_c + n_h])
                ys = sum(info.length * nbytes(o.tensor_type) for o in body.outputs[n_h:])
                mats = {n.src[1] for n in body.nodes() if n.op is Op.MATMUL and n.ndim == 2}
                packed = sum(nbytes(a.tensor_type) for a in body.inputs[:n_c] if a in mats)
                mem.total += carries + ys + packed
                mem.stacked += ys
                mem.loops.append((node, carries + ys))
                stack.append((body, _step_targets(info), False))
            elif op is Op.FUSED:
                types = node.type if isinstance(node.type, tuple) else (node.type,)
                mem.total += sum(nbytes(types[i]) for i in fused_outs.get(node, ()))  # type: ignore[arg-type]
            else:
                mem.total += nbytes(node.tensor_type)
        if top:  # outputs that are inputs, constants or views are returned as fresh copies
            for o in set(top_outputs):
                if o.op in LEAVES or o.op in VIEWS:
                    mem.total += nbytes(o.tensor_type)
    return mem


# ---- checkpoint plans -------------------------------------------------------------------------------

Levels = tuple[int, ...]  # segment lengths, outermost first: (k1, k2, ...) with k1 > k2 > ...


@dataclass(frozen=True)
class LoopCost:
    """What one loop costs under the policies: per step, the bytes SaveAll keeps for its backward
    pass (`saved`) and the bytes of the state carried into a step (`carry`); `ys`: bytes per step of
    its own per-step outputs (a segmented loop copies them once more when the last segment is short)."""

    length: int
    saved: int
    carry: int
    ys: int = 0

    def memory(self, levels: Levels) -> int:
        return _memory(self.length, levels, self.saved, self.carry, self.ys)

    def recomputed(self, levels: Levels) -> int:
        return _recomputed(self.length, levels)

    def optimum(self, levels: Levels) -> tuple[int, int, int]:
        """(state slots, saved steps, recomputed steps): the most states and saved steps `levels`
        keep at once, and the fewest recomputed steps any schedule needs with as many
        (`optimal_recomputed`; at most `recomputed(levels)`, the plan being one such schedule up to
        its remainder loops, which the tests check on random plans)."""
        slots, m = 0, self.length
        for k in levels:
            if m <= k:  # as segment_levels: a loop no longer than the level is not cut, nor inside
                break
            slots, m = slots + m // k, k
        if not slots:
            return 0, m, 0
        return slots, m, optimal_recomputed(self.length, slots, m)


@lru_cache(maxsize=None)
def _memory(n: int, levels: Levels, s: int, c: int, y: int) -> int:
    """Bytes kept for the backward pass of n steps under `levels` (segment_loop's structure: an
    outer loop saving the state per segment, the segment's loop planned with the next levels, and a
    remainder loop of n mod k steps planned with them too)."""
    if not levels or n <= levels[0]:
        return n * s
    k, rest = levels[0], levels[1:]
    count, r = divmod(n, k)
    copy = n * y if r else 0  # per-step outputs of the segments and the remainder joined by a concat
    return count * c + k * y + _memory(k, rest, s, c, y) + (_memory(r, rest, s, c, y) if r else 0) + copy


@lru_cache(maxsize=None)
def _recomputed(n: int, levels: Levels) -> int:
    """Forward steps the backward pass reruns: each segment once, plus what its own plan reruns."""
    if not levels or n <= levels[0]:
        return 0
    k, rest = levels[0], levels[1:]
    count, r = divmod(n, k)
    return count * (k + _recomputed(k, rest)) + (_recomputed(r, rest) if r else 0)


def _candidates(n: int) -> list[int]:
    """Segment lengths worth trying for n steps: a geometric grid and the divisors near sqrt-like
    points (equal segments avoid the remainder's copy)."""
    if n <= 2:
        return []
    found = {max(2, min(n - 1, round(n ** (j / 48)))) for j in range(1, 48)}
    root = math.isqrt(n)
    for d in range(1, min(root, 4096) + 1):
        if n % d == 0:
            found.update({d, n // d})
    return sorted(k for k in found if 2 <= k < n)


def plan_levels(costs: Sequence[LoopCost], budget: int, max_levels: int = 4) -> tuple[Levels, int] | None:
    """The levels (shared by every loop) with the fewest recomputed steps whose memory, summed over
    the loops, is at most `budget` (ties: less memory); None if no schedule of up to `max_levels`
    levels fits. Returns (levels, memory)."""
    n = max((c.length for c in costs), default=0)
    best: tuple[int, int, Levels] | None = None
    frontier: list[Levels] = [()]
    for _depth in range(max_levels + 1):
        grown: list[Levels] = []
        for levels in frontier:
            mem = sum(c.memory(levels) for c in costs)
            if mem <= budget:
                key = (sum(c.recomputed(levels) for c in costs), mem, levels)
                if best is None or key[:2] < best[:2]:
                    best = key
            inner = levels[-1] if levels else n
            grown.extend(levels + (k,) for k in _candidates(inner))
        if best is not None:
            break  # one more level reruns the forward pass once more: never fewer recomputed steps
        frontier = _prune(grown, costs)
    return None if best is None else (best[2], best[1])


def _prune(options: list[Levels], costs: Sequence[LoopCost], keep: int = 64) -> list[Levels]:
    """The `keep` schedules of one depth with the least memory (the next level only lowers it)."""
    return sorted(options, key=lambda lv: sum(c.memory(lv) for c in costs))[:keep]


def least_memory(costs: Sequence[LoopCost], max_levels: int = 4) -> list[Levels]:
    """For each depth 1..max_levels, the schedule with the least memory by the cost model (the
    caller predicts the graphs they build and keeps the smallest)."""
    n = max((c.length for c in costs), default=0)
    best: list[Levels] = []
    frontier: list[Levels] = [()]
    for _depth in range(max_levels):
        grown = [lv + (k,) for lv in frontier for k in _candidates(lv[-1] if lv else n)]
        if not grown:
            break
        frontier = _prune(grown, costs)
        best.append(frontier[0])
    return best



# ---- the optimum over all schedules (Gruslys et al. 2016) --------------------------------------------
#
# Counting. A backward step needs its forward step's internals, computed from the state entering it
# ("taped"); every step is taped exactly once, so schedules differ only in their untaped forward
# steps (advances). These are what `plan_levels` calls recomputed steps: a segmented loop's first
# pass stores only checkpoints (n advances), each level reruns its segments storing the next
# level's checkpoints (n advances more), and the innermost segments are rerun taped.
#
# Gruslys et al.'s BPTT-HSM keeps hidden states in m slots (the initial state holds one) and tapes
# one step at a time. Their cost counts every forward step, taped ones included: C(0, m) = 0,
# C(1, m) = 1, C(t, 1) = t(t+1)/2, C(t, m) = min_{1<=y<t} y + C(t-y, m-1) + C(y, m), so C(t, m) = 2t-1
# for m >= t (every step twice but the last). C(t, m) - t is Griewank and Walther's revolve count:
# advancing each step at most r times, m slots reach binom(m+r, r) steps, and
# C(t, m) = t + sum_{r>=0} max(0, t - binom(m+r, r)).
#
# unroll's plans tape a whole innermost segment at once (it is rerun saving everything). With runs
# of up to k taped steps (k * saved bytes) beside the m slots the same recursion holds with the base
# case "t <= k: no advance", the reach is k * binom(m+r, r), and the fewest advances are
# sum_r max(0, t - k * binom(m+r, r)) (`optimal_recomputed`; k = 1 is Gruslys's HSM). The tests
# check both closed forms against the recursions and against a search over every schedule.


def _least_r(t: int, reach) -> int:
    """The least r >= 0 with reach(r) >= t (reach increasing)."""
    lo, hi = -1, 1
    while reach(hi) < t:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if reach(mid) < t else (lo, mid)
    return hi


def optimal_recomputed(length: int, slots: int, tape: int = 1) -> int:
    """The fewest recomputed (untaped) forward steps of any checkpoint schedule, unequal and unrolled
    ones included, for a loop of `length` steps whose backward pass keeps at most `slots` states
    (the initial state's included) and `tape` steps' saved values at once (a segment rerun saving
    everything): sum_r max(0, length - tape * binom(slots + r, r)). Exact for any length (10**6 and
    one slot included): with r the least such that length <= tape * binom(slots+r, r), it is
    r * length - tape * binom(slots + r, r - 1). A one-level plan of k-step segments has
    slots = length // k, tape = k and recomputes `length`; the optimum for those is length - k."""
    if length < 0 or slots < 1 or tape < 1:
        raise ValueError(f"optimal_recomputed: expected length >= 0, slots >= 1, tape >= 1, found "
                         f"{length!r}, {slots!r}, {tape!r}")
    if length <= tape:
        return 0
    if slots == 1:  # tape the last `tape` steps, start again from the initial state
        q, rem = divmod(length, tape)
        return tape * q * (q - 1) // 2 + rem * q
    r = _least_r(length, lambda r: tape * math.comb(slots + r, r))
    return r * length - tape * math.comb(slots + r, r - 1)


def optimal_cost(t: int, m: int) -> int:
    """Gruslys et al. 2016's optimal cost of BPTT-HSM: forward steps computed in total (the first
    pass and the step recomputed before each backward step included) for t steps with m >= 1 slots of
    hidden states, the initial state in one of them. C(t, 1) = t(t+1)/2, C(t, m) = 2t - 1 for m >= t;
    t + optimal_recomputed(t, m) (see above), exact for t = 10**6 and any m."""
    if t < 0 or m < 1:
        raise ValueError(f"optimal_cost: expected t >= 0 and m >= 1, found t={t!r}, m={m!r}")
    return t + optimal_recomputed(t, m)


def optimal_schedule(t: int, m: int) -> list[tuple[str, int]]:
    """An optimal BPTT-HSM schedule (by the recursion: small t): actions on the current state,
    starting with state 0 stored and current. ("advance", i): compute step i from state i-1;
    ("store", i): keep state i in a slot; ("free", i): drop it; ("restore", i): continue from the
    stored state i; ("backward", i): compute step i from state i-1 keeping its internals, then its
    backward step. Advances and backward steps cost one forward step each: optimal_cost(t, m) in all."""
    if t < 0 or m < 1:
        raise ValueError(f"optimal_schedule: expected t >= 0 and m >= 1, found t={t!r}, m={m!r}")
    out: list[tuple[str, int]] = []

    def run(start: int, n: int, k: int) -> None:
        """Steps start+1 .. start+n, state `start` stored and current, k slots (its own included)."""
        if n == 1:
            out.append(("backward", start + 1))
        elif n > 1 and k == 1:
            for end in range(start + n, start, -1):
                out.extend(("advance", i) for i in range(start + 1, end))
                out.append(("backward", end))
                if end > start + 1:
                    out.append(("restore", start))
        elif n > 1:
            y = min(range(1, n), key=lambda y: y + optimal_cost(n - y, k - 1) + optimal_cost(y, k))
            out.extend(("advance", i) for i in range(start + 1, start + y + 1))
            out.append(("store", start + y))
            run(start + y, n - y, k - 1)
            out.extend((("free", start + y), ("restore", start)))
            run(start, y, k)

    run(0, t, m)
    return out
