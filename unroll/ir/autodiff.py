"""Reverse-mode autodiff as a Graph -> Graph transformation: one VJP table keyed by op, and the
loop's VJP as a reversed loop over its body's VJP (backpropagation through time).

    grads = ur.grad(loss, wrt=params)            # nodes, in wrt order
    step = ur.compile([loss, *grads])            # ordinary IR: print it, optimize it, compile it

Rules are written with the IR's own builder ops (autodidact's `defvjp` list), so the backward graph
can be printed, fused, compiled and differentiated again. Cotangents are tracked symbolically: None
means zero, and no node is built for a value that does not influence the loss or for a source that
no `wrt` node reaches ("relevant" below: a value that depends differentiably on a wrt node).

A loop's VJP (after JAX's scan transpose) is a loop over the same steps in the opposite order.
Forward loop (LoopInfo):  carry_{t+1}, y_t = body(consts, carry_t, x_t)
Backward loop: consts  = the forward consts the backward body reads,
               carry   = (dconst_acc..., dcarry...)   weight-gradient accumulators, then the
                         cotangents of the carried values that need one
               xs      = (dy..., residual..., x...)   cotangents of the per-step outputs, the values
                         the forward loop saved for step t, forward sequences the body reads
               body    : dconst_acc_i + dconst_i(t), dcarry_in(t)  |  per-step: dx_j(t)
               outputs = final accumulators (the consts' gradients), the gradient of carry_init,
                         stacked dx (the sequences' gradients).
What the forward loop saves (the residuals, extra per-step outputs appended after its own so its
projections keep their indices) is decided by a Policy passed in: SaveAll, Recompute, Checkpoint(k).
Under every policy, cheap arithmetic of a single saved value (the derivative factors 1 - y*y and
s*(1 - s)) is recomputed by the backward body rather than saved (`_cheap_of_one`).
The loss keeps using the original loop; `merge_loops` swaps it for the extended one, so that
`[loss, *grads]` runs the forward loop once (grad applies it to the gradients, value_and_grad to both).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import build as b
from .dce import dce_nodes
from .loops import known_nodes, mark_role, merge_loops, replace_loops, segment_loop
from .memory import LoopCost, least_memory, mb, nbytes, plan_levels, predict
from .node import Graph, LoopInfo, Node, fresh_scope, proj, substitute, toposort
from .ops import COMPARE, FLOAT_DTYPES, LEAVES, MOVEMENT, MULTI_OUTPUT, Op, TensorType

# ---- helpers used by the rules ------------------------------------------------------------------


def unbroadcast(g: Node, shape: tuple[int, ...]) -> Node:
    """The adjoint of numpy broadcasting: sum g over the axes broadcasting added or stretched."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(shape) if d == 1 and g.shape[lead + i] != 1)
    return b.reshape(b.sum(g, axes) if axes else g, shape)


def _swap(x: Node) -> Node:
    """x with its last two axes swapped (the matrix transpose of a batch of matrices)."""
    perm = list(range(x.ndim))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    return b.transpose(x, perm)


def _keepdims_shape(x: Node, axes: Sequence[int]) -> tuple[int, ...]:
    axes_set = {a % x.ndim for a in axes}
    return tuple(1 if i in axes_set else d for i, d in enumerate(x.shape))


def _sum_vjp(g: Node, ans: Node, x: Node) -> Node:
    axes, _ = ans.arg  # type: ignore[misc]
    return b.broadcast_to(b.reshape(g, _keepdims_shape(x, axes)), x.shape)


def _max_vjp(g: Node, ans: Node, x: Node) -> Node:
    """Split g equally among the maxima (ties share it, like JAX and torch.amax)."""
    axes, _ = ans.arg  # type: ignore[misc]
    keep = _keepdims_shape(x, axes)
    mask = b.cast(b.equal(x, b.reshape(ans, keep)), x.dtype)
    share = mask / b.sum(mask, axes, keepdims=True)
    return b.reshape(g, keep) * share


def _pow_slope(ans: Node, x: Node, y: Node) -> Node:
    """d(x**y)/dx = y * x**(y-1); a constant exponent gives a constant y-1 (simplify then folds
    x**1 and x**2)."""
    # np.asarray: the arg of an array constant is a FrozenArray (numpy operands, see ops.py)
    exponent = b.const(np.asarray(y.arg) - 1, y.shape, y.dtype) if y.op is Op.CONST else y - 1
    return y * b.pow(x, exponent)


def _slice_vjp(g: Node, ans: Node, x: Node) -> Node:
    """The adjoint of a strided slice: g's elements put back at start, start+step, ... (zeros
    between, built as reshape + pad per axis)."""
    out = g
    for axis, ((start, _stop, step), dim) in enumerate(zip(ans.arg, x.shape)):  # type: ignore[arg-type]
        n = out.shape[axis]
        if step > 1 and n > 0:  # (.., n, ..) -> (.., n, step, ..) with step-1 zeros -> (.., n*step, ..)
            shape = out.shape
            out = b.reshape(out, shape[:axis + 1] + (1,) + shape[axis + 1:])
            out = b.pad(out, [(0, 0)] * (axis + 1) + [(0, step - 1)] + [(0, 0)] * (len(shape) - axis - 1))
            out = b.reshape(out, shape[:axis] + (n * step,) + shape[axis + 1:])
        length = out.shape[axis]
        if start + length > dim:  # the zeros after the last element run past the axis
            out = b.slice_axis(out, axis, 0, dim - start)
            length = dim - start
        out = b.pad(out, [(0, 0)] * axis + [(start, dim - start - length)] + [(0, 0)] * (x.ndim - axis - 1))
    return out


def _pad_vjp(g: Node, ans: Node, x: Node) -> Node:
    pads = ans.arg  # type: ignore[assignment]
    triples = tuple((lo, lo + d, 1) for (lo, _hi), d in zip(pads, x.shape))  # type: ignore[misc]
    return Node.make(Op.SLICE, (g,), triples)


def _transpose_vjp(g: Node, ans: Node, x: Node) -> Node:
    perm = ans.arg  # type: ignore[assignment]
    inverse = [0] * len(perm)  # type: ignore[arg-type]
    for i, p in enumerate(perm):  # type: ignore[arg-type]
        inverse[p] = i
    return b.transpose(g, inverse)


def _concat_vjp(i: int, g: Node, ans: Node, *xs: Node) -> Node:
    axis = ans.arg  # type: ignore[assignment]
    start = sum(x.shape[axis] for x in xs[:i])  # type: ignore[index]
    return b.slice_axis(g, axis, start, start + xs[i].shape[axis])  # type: ignore[index, arg-type]


def _cast_vjp(g: Node, ans: Node, x: Node) -> Node | None:
    return b.cast(g, x.dtype) if x.dtype in FLOAT_DTYPES else None


# ---- the VJP table --------------------------------------------------------------------------------
# VJPS[op] = one rule per source, rule(g, ans, *src) -> cotangent of that source (or None for zero);
# g is the cotangent of ans = op(*src). A rule runs only for a source that needs a gradient. A
# variadic op maps to one rule(i, g, ans, *src). Factors that do not depend on g are grouped
# (g * (1 - ans*ans)) so that a loop's forward pass can save them as one value.

Rule = Callable[..., Node | None]

VJPS: dict[Op, tuple[Rule, ...] | Rule] = {
    Op.NEG: (lambda g, ans, x: -g,),
    Op.EXP: (lambda g, ans, x: g * ans,),
    Op.LOG: (lambda g, ans, x: g / x,),
    Op.TANH: (lambda g, ans, x: g * (1 - ans * ans),),
    Op.SIGMOID: (lambda g, ans, x: g * (ans * (1 - ans)),),
    Op.RELU: (lambda g, ans, x: b.where(b.greater(x, 0), g, 0),),
    Op.SQRT: (lambda g, ans, x: g * (0.5 / ans),),
    Op.ABS: (lambda g, ans, x: g * b.sign(x),),
    Op.RECIP: (lambda g, ans, x: g * -(ans * ans),),
    Op.LOG1P: (lambda g, ans, x: g / (x + 1),),
    # d sin = cos, d cos = -sin: recomputed from x (one more transcendental in the backward pass)
    # rather than saved, since nothing in the forward pass already holds them
    Op.SIN: (lambda g, ans, x: g * b.cos(x),),
    Op.COS: (lambda g, ans, x: g * -b.sin(x),),
    Op.ADD: (lambda g, ans, x, y: unbroadcast(g, x.shape),
             lambda g, ans, x, y: unbroadcast(g, y.shape)),
    Op.SUB: (lambda g, ans, x, y: unbroadcast(g, x.shape),
             lambda g, ans, x, y: unbroadcast(-g, y.shape)),
    Op.MUL: (lambda g, ans, x, y: unbroadcast(g * y, x.shape),
             lambda g, ans, x, y: unbroadcast(g * x, y.shape)),
    Op.DIV: (lambda g, ans, x, y: unbroadcast(g / y, x.shape),
             lambda g, ans, x, y: unbroadcast(-g * (ans / y), y.shape)),
    Op.POW: (lambda g, ans, x, y: unbroadcast(g * _pow_slope(ans, x, y), x.shape),
             lambda g, ans, x, y: unbroadcast(g * (ans * b.log(x)), y.shape)),
    # ties go to the first operand, so the two gradients still add up to g
    Op.MAX: (lambda g, ans, x, y: unbroadcast(b.where(b.greater_equal(x, y), g, 0), x.shape),
             lambda g, ans, x, y: unbroadcast(b.where(b.greater_equal(x, y), 0, g), y.shape)),
    Op.MIN: (lambda g, ans, x, y: unbroadcast(b.where(b.less_equal(x, y), g, 0), x.shape),
             lambda g, ans, x, y: unbroadcast(b.where(b.less_equal(x, y), 0, g), y.shape)),
    Op.WHERE: (lambda g, ans, c, x, y: None,
               lambda g, ans, c, x, y: unbroadcast(b.where(c, g, 0), x.shape),
               lambda g, ans, c, x, y: unbroadcast(b.where(c, 0, g), y.shape)),
    Op.CAST: (_cast_vjp,),
    Op.MATMUL: (lambda g, ans, x, y: unbroadcast(b.matmul(g, _swap(y)), x.shape),
                lambda g, ans, x, y: unbroadcast(b.matmul(_swap(x), g), y.shape)),
    Op.SUM: (_sum_vjp,),
    Op.REDUCE_MAX: (_max_vjp,),
    Op.RESHAPE: (lambda g, ans, x: b.reshape(g, x.shape),),
    Op.TRANSPOSE: (_transpose_vjp,),
    Op.BROADCAST: (lambda g, ans, x: unbroadcast(g, x.shape),),
    Op.CONCAT: _concat_vjp,
    Op.SLICE: (_slice_vjp,),
    Op.PAD: (_pad_vjp,),
}

# ops whose result carries no gradient to its sources
NON_DIFFERENTIABLE = frozenset({Op.CONST, Op.SIGN, Op.ARGMAX, Op.ONEHOT, Op.STOP_GRADIENT}) | COMPARE

# ops that `backprop` itself handles: gradient sinks (leaves) and multi-output nodes
STRUCTURAL = frozenset({Op.INPUT, Op.PARAM, Op.ARG, Op.PROJ, Op.LOOP, Op.FUSED})


def _rule(op: Op, i: int) -> Rule:
    rules = VJPS[op]
    if isinstance(rules, tuple):
        return rules[i]
    return lambda g, ans, *src: rules(i, g, ans, *src)  # type: ignore[operator]


# ---- policies: what a forward loop saves for its backward loop ------------------------------------

Saves = Callable[[Node], bool]


def _save_all(value: Node) -> bool:
    return True


def _save_carries(value: Node) -> bool:
    return value.op is Op.ARG  # sequence args are never saved (the backward loop reads them)


class _PerLoop:
    """A policy that only chooses what each loop saves: no forward rewrite, the same inside bodies."""

    forward_role: str | None = None  # marks the forward loops it extends (for the passes)

    def prepare(self, roots: list[Node]) -> list[Node]:
        return roots

    @property
    def inner(self) -> "Policy":
        return self  # type: ignore[return-value]


@dataclass(frozen=True)
class SaveAll(_PerLoop):
    """Save, per step, every body value the backward body reads (views such as slices and
    transposes are recomputed from the values under them). The default, as in PyTorch and JAX: the
    backward pass repeats no forward work and its body is only the VJP (elementwise math plus the
    matmuls), the best shape for fusion and hoisting; memory grows with T times those values, which
    is small next to the weights for the sequence lengths this library targets. It is also the one
    policy under which the passes may keep more per-step values still (hoisting's batched input
    projection and weight-gradient sums), within a constant (hoist.STACK_ALLOWANCE); under the
    others they add none."""

    def saves(self, loop: Node) -> Saves:
        return _save_all


@dataclass(frozen=True)
class Recompute(_PerLoop):
    """Save only the carried state entering each step; the backward body recomputes the forward
    body from it (one extra forward pass, memory T times the state)."""

    forward_role = "recompute"

    def saves(self, loop: Node) -> Saves:
        return _save_carries


def segment_levels(loop: Node, levels: tuple[int, ...], role: str = "checkpoint") -> list[Node] | None:
    """`loop` cut into segments of levels[0] steps, each segment's loop (and the remainder loop) cut
    again by the next levels: the outputs standing for the loop's, or None when it is short enough.
    Outer segment loops get `role` (they save only the state entering a segment), remainder loops
    "segment" (they save all, but the passes still treat their memory as bounded)."""
    if not levels or loop.arg.length <= levels[0]:  # type: ignore[union-attr]
        return None
    rest = levels[1:]
    return segment_loop(loop, levels[0], role=role, rest_role="segment",
                        expand=lambda inner: segment_levels(inner, rest, role))


@dataclass(frozen=True)
class Checkpoint:
    """Save the carried state every `every` steps. The forward loop becomes an outer loop over
    segments of `every` steps (the original loop over one segment inside, `segment_loop`), whose
    VJP saves only the state entering each segment: its backward body reruns the segment's forward
    loop (saving everything) and then the segment's reversed VJP loop. Loops of at most `every`
    steps and loops nested in bodies are handled by SaveAll."""

    every: int
    role: str = field(default="checkpoint", repr=False)  # marks the segment loops this policy made
    forward_role = None

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"Checkpoint: expected a segment length >= 1, found {self.every!r}")

    def prepare(self, roots: list[Node]) -> list[Node]:
        return replace_loops(roots, lambda loop: segment_levels(loop, (self.every,), self.role))

    def saves(self, loop: Node) -> Saves:
        return _save_carries if loop.role == self.role else _save_all

    @property
    def inner(self) -> "Policy":
        return SaveAll()


@dataclass(frozen=True)
class Segments:
    """Nested checkpoints: every loop longer than levels[0] steps is cut into segments of levels[0]
    steps, each segment into segments of levels[1], and so on (`segment_levels`); the innermost
    segments save everything. The plan `MemoryBudget` picks; one level is Checkpoint(levels[0])."""

    levels: tuple[int, ...]
    role: str = field(default="checkpoint", repr=False)
    forward_role = None

    def __post_init__(self) -> None:
        if any(not isinstance(k, int) or k < 1 for k in self.levels) or list(self.levels) != sorted(
                set(self.levels), reverse=True):
            raise ValueError(f"Segments: expected decreasing segment lengths >= 1, found {self.levels!r}")

    def prepare(self, roots: list[Node]) -> list[Node]:
        # per-step outputs nobody reads would be stacked (and copied once per level) for nothing
        return replace_loops(dce_nodes(roots), lambda loop: segment_levels(loop, self.levels, self.role))

    def saves(self, loop: Node) -> Saves:
        return _save_carries if loop.role == self.role else _save_all

    @property
    def inner(self) -> "Policy":
        return self  # nested levels are loops in bodies: their role decides


@dataclass(frozen=True)
class MemoryPlan:
    """What `MemoryBudget` chose for one gradient: printed by `ur.explain` and kept in MEMORY_PLANS."""

    budget: int
    policy: "SaveAll | Segments"
    loops: tuple[tuple[int, int, int], ...]   # per planned loop: (steps, saved bytes/step, carry bytes)
    recomputed: int                            # forward steps the backward pass reruns
    predicted: int                             # predicted peak bytes of [loss, *grads] (ir/memory.py)
    saveall: int                               # the same for SaveAll

    def lines(self) -> list[str]:
        head = (f"memory budget {mb(self.budget)}: SaveAll's predicted peak {mb(self.saveall)} "
                + ("fits, so SaveAll" if isinstance(self.policy, SaveAll) else "does not fit"))
        out = [head]
        if isinstance(self.policy, Segments):
            ks = self.policy.levels
            out.append(f"  plan: {len(ks)} level(s) of checkpoints, segments of {' > '.join(map(str, ks))} steps")
            for n, saved, carry in self.loops:
                counts, m = [], n
                for k in ks:
                    if m > k:
                        counts.append(f"{m // k} x {k}" + (f" + {m % k}" if m % k else ""))
                        m = k
                out.append(f"  loop of {n} steps ({saved} B saved per step, {carry} B of state): "
                           f"checkpoints {'; then '.join(counts) or 'none'}")
            # the optimum over all schedules, unequal segments included, keeping as much (ir/memory.py)
            optima = [LoopCost(n, saved, carry).optimum(ks) for n, saved, carry in self.loops]
            if len(optima) == 1:
                slots, tape, best = optima[0]
                same = f"the same {slots} state slots and {tape} saved steps"
            else:
                best, same = sum(o[2] for o in optima), "the same state slots and saved steps per loop"
            out.append(f"  recomputed forward steps: {self.recomputed}"
                       + (f" (Gruslys et al.'s optimum with {same}: {best})" if optima and ks else ""))
        out.append(f"  predicted peak: {mb(self.predicted)} ({self.predicted} B)")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


# the plan behind each gradient node a MemoryBudget made (for ur.explain), kept weakly
MEMORY_PLANS: "weakref.WeakKeyDictionary[Node, MemoryPlan]" = weakref.WeakKeyDictionary()


class BudgetError(ValueError):
    """A MemoryBudget below what the step needs under any plan; names the smallest that works."""


@dataclass(frozen=True)
class MemoryBudget:
    """Plan checkpoints so that the step's predicted peak memory (ir/memory.py: every buffer the
    CPU backend allocates for [loss, *grads], inputs excluded; the larger of the graph as built and
    after the default passes) stays within `budget` bytes, with
    the fewest recomputed forward steps. SaveAll when it fits; else nested segments (`Segments`)
    chosen by `memory.plan_levels` from each loop's bytes saved per step and bytes of state, then
    checked by predicting the built graph. A budget below what any plan needs raises BudgetError
    naming the smallest budget that works. `max_levels`: the deepest nesting tried."""

    budget: int
    max_levels: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, np.integer)) or self.budget < 1:
            raise ValueError(f"MemoryBudget: expected a budget in bytes (an int >= 1), found {self.budget!r}")
        if not isinstance(self.max_levels, int) or self.max_levels < 1:
            raise ValueError(f"MemoryBudget: max_levels must be an int >= 1, found {self.max_levels!r}")

    def plan(self, outputs: list[Node], cotangents: list[Node | None], wrt: list[Node], seeded: bool
             ) -> MemoryPlan:
        """The policy for this gradient (see the class docstring), with what it predicts."""
        from .optimize import optimize  # the passes import nothing from here; loaded on first plan

        def peak(policy: Policy) -> int:
            """The step's predicted peak as built and after the default passes (which may keep
            per-step values of the loops a policy leaves unbounded: hoist.STACK_ALLOWANCE)."""
            values, grads, _ = _vjp_graph(outputs, cotangents, wrt, policy, seeded)
            built = Graph.of(values + grads)
            return max(predict(built).total, predict(optimize(built, check=False)).total)

        saveall = peak(SaveAll())
        if saveall <= self.budget:
            return MemoryPlan(int(self.budget), SaveAll(), (), 0, saveall, saveall)
        # SaveAll on the graph without dead per-step outputs: the costs every plan starts from
        values, grads, sweep = _vjp_graph(outputs, cotangents, wrt, Segments(()), seeded)
        pruned = peak(Segments(()))
        forward = toposort(dce_nodes(outputs + wrt))
        costs = []
        for loop in forward:
            saved = sweep.saved.get(loop)
            if loop.op is Op.LOOP and saved:
                info: LoopInfo = loop.arg  # type: ignore[assignment]
                args, n_c, n_h = info.body.inputs, info.n_consts, info.n_carry
                carry = sum(_nbytes(a) for a in args[n_c:n_c + n_h])
                ys = sum(_nbytes(o) for o in info.body.outputs[n_h:])
                costs.append(LoopCost(info.length, saved, carry, ys))
        loops = tuple((c.length, c.saved, c.carry) for c in costs)
        fixed = pruned - sum(c.length * c.saved for c in costs)
        room = int(self.budget) - fixed
        if pruned <= self.budget:
            return MemoryPlan(int(self.budget), Segments(()), (), 0, pruned, saveall)
        for _attempt in range(4):  # the plan's costs are a model of the graph: check the graph itself
            found = plan_levels(costs, room, self.max_levels) if room > 0 else None
            if found is None:
                break
            policy = Segments(found[0])
            predicted = peak(policy)
            if predicted <= self.budget:
                recomputed = sum(c.recomputed(found[0]) for c in costs)
                return MemoryPlan(int(self.budget), policy, loops, recomputed, predicted, saveall)
            room -= predicted - int(self.budget)
        tried = {lv: peak(Segments(lv)) for lv in least_memory(costs, self.max_levels)}
        tried[()] = pruned
        levels, smallest = min(tried.items(), key=lambda kv: kv[1])
        if smallest <= self.budget:  # the model's choices overshot; the least-memory plan fits
            return MemoryPlan(int(self.budget), Segments(levels), loops, sum(c.recomputed(levels) for c in costs),
                              smallest, saveall)
        if smallest > saveall:
            levels, smallest = (), saveall
        raise BudgetError(
            f"MemoryBudget({int(self.budget)}): below what this step needs. The least predicted peak is "
            f"{smallest} bytes ({mb(smallest)}), with "
            + (f"{len(levels)} level(s) of checkpoints (segments of {', '.join(map(str, levels))} steps)"
               if levels else "no checkpoints (no loop to cut)")
            + f"; the part no checkpoint reduces (the loss, its per-step values, gradients, one step's "
            f"buffers) is about {mb(max(fixed, 0))}. Pass a budget of at least {smallest} bytes.")


def _nbytes(node: Node) -> int:
    return nbytes(node.tensor_type)


Policy = SaveAll | Recompute | Checkpoint | Segments


# ---- the reverse sweep ------------------------------------------------------------------------------


def _is_float(node: Node) -> bool:
    return isinstance(node.type, TensorType) and node.type.dtype in FLOAT_DTYPES


def relevant(order: Sequence[Node], wrt: Sequence[Node]) -> set[Node]:
    """The nodes of `order` (a toposort) that depend differentiably on a wrt node: only these need
    cotangents. For a loop, which outputs depend on which inputs is found through its body."""
    rel = {w for w in wrt if _is_float(w)}
    outputs_rel: dict[Node, list[bool]] = {}
    for node in order:
        if node in rel or node.op in LEAVES or node.op in NON_DIFFERENTIABLE:
            continue
        if node.op is Op.PROJ:
            flags = outputs_rel.get(node.src[0])
            if flags is not None and flags[node.arg]:  # type: ignore[index]
                rel.add(node)
        elif node.op is Op.LOOP:
            needs = [s in rel for s in node.src]
            if any(needs):
                outputs_rel[node] = loop_relevance(node.arg, needs)[1]  # type: ignore[arg-type]
                rel.add(node)
        elif node.op is Op.FUSED:
            if any(s in rel for s in node.src):
                outputs_rel[node] = [t.dtype in FLOAT_DTYPES for t in node.type]  # type: ignore[union-attr]
                rel.add(node)
        elif _is_float(node) and any(s in rel for s in node.src):
            rel.add(node)
    return rel


def loop_relevance(info: LoopInfo, needs: Sequence[bool]) -> tuple[list[bool], list[bool]]:
    """Which body args (consts, carries, slices) and which loop outputs are relevant, given which
    sources are. A carried value is relevant when its init is or when its update reads a relevant
    value (a fixed point: carries feed each other)."""
    n_c, n_h = info.n_consts, info.n_carry
    body = info.body
    order = body.nodes()
    args_rel = list(needs)
    while True:
        body_rel = relevant(order, [a for a, r in zip(body.inputs, args_rel) if r])
        grown = [k for k in range(n_h) if not args_rel[n_c + k] and body.outputs[k] in body_rel]
        if not grown:
            break
        for k in grown:
            args_rel[n_c + k] = True
    final_carry = [(body.outputs[k] in body_rel) if info.length else args_rel[n_c + k] for k in range(n_h)]
    return args_rel, final_carry + [o in body_rel for o in body.outputs[n_h:]]


@dataclass
class _Sweep:
    """What one grad call threads through nested loop VJPs."""

    policy: Policy
    augmented: set[Node] = field(default_factory=set)  # forward loops extended with residuals
    saved: dict[Node, int] = field(default_factory=dict)  # forward loop -> bytes it saves per step

    def inner(self) -> "_Sweep":
        return _Sweep(self.policy.inner, self.augmented, self.saved)


def backprop(outputs: Sequence[Node], cotangents: Sequence[Node | None], wrt: Sequence[Node],
             sweep: _Sweep) -> list[Node | None]:
    """Cotangents of the wrt nodes (None: zero) given cotangents of the outputs (None: zero)."""
    order = toposort(outputs)
    rel = relevant(order, wrt)
    grads: dict[Node, Node] = {}
    outputs_ct: dict[Node, list[Node | None]] = {}  # cotangents of a loop's / fused node's outputs

    def accumulate(node: Node, g: Node) -> None:
        if node not in rel:
            return
        if g.type != node.type:
            raise AssertionError(f"autodiff: cotangent {g.type_str()} for {node!r} (built at {node.loc})")
        prev = grads.get(node)
        grads[node] = g if prev is None else b.add(prev, g)

    for out, ct in zip(outputs, cotangents):
        if ct is not None:
            accumulate(out, ct)
    for node in reversed(order):
        if node.op in MULTI_OUTPUT:
            cts = outputs_ct.pop(node, None)
            if cts is not None:
                vjp = loop_vjp if node.op is Op.LOOP else fused_vjp
                needs = [s in rel for s in node.src]
                for s, g in zip(node.src, vjp(node, cts, needs, sweep)):
                    if g is not None:
                        accumulate(s, g)
            continue
        g = grads.get(node)
        if g is None or node.op in LEAVES or node.op in NON_DIFFERENTIABLE:
            continue
        if node.op is Op.PROJ:
            loop = node.src[0]
            outputs_ct.setdefault(loop, [None] * len(loop.type))[node.arg] = g  # type: ignore[arg-type, index]
            continue
        for i, s in enumerate(node.src):
            if s in rel:
                gs = _rule(node.op, i)(g, node, *node.src)
                if gs is not None:
                    accumulate(s, gs)
    return [grads.get(w) for w in wrt]


def _zeros(node: Node) -> Node:
    return b.const(0, node.shape, node.dtype)


def fused_vjp(node: Node, cts: list[Node | None], needs: list[bool], sweep: _Sweep) -> list[Node | None]:
    """A fused kernel's VJP: its body's VJP written out on the kernel's sources (fusion runs after
    autodiff, so this only meets kernels a user built; the forward values are recomputed)."""
    body: Graph = node.arg  # type: ignore[assignment]
    scope = fresh_scope()
    seeds = [None if ct is None else Node.leaf(Op.ARG, ct.tensor_type, ("vjp", scope, "dy", i))
             for i, ct in enumerate(cts)]
    wanted = [a for a, need in zip(body.inputs, needs) if need]
    arg_cts = dict(zip(wanted, backprop(body.outputs, seeds, wanted, sweep)))
    mapping = dict(zip(body.inputs, node.src))
    mapping.update({s: ct for s, ct in zip(seeds, cts) if s is not None})
    out: list[Node | None] = []
    for a in body.inputs:
        g = arg_cts.get(a)
        out.append(None if g is None else substitute([g], mapping)[0])
    return out


def loop_vjp(loop: Node, cts: list[Node | None], needs: list[bool], sweep: _Sweep) -> list[Node | None]:
    """The cotangents of a loop's sources, computed by a reversed loop (see the module docstring
    for its signature). `cts`: cotangents of the loop's outputs; `needs`: which sources need one."""
    info: LoopInfo = loop.arg  # type: ignore[assignment]
    body, n_c, n_h = info.body, info.n_consts, info.n_carry
    args, n_out, n_ys = body.inputs, len(body.outputs), info.n_ys
    x_args = args[n_c + n_h:]
    args_rel, outputs_rel = loop_relevance(info, needs)
    wanted = [a for a, r in zip(args, args_rel) if r]

    scope = fresh_scope()

    def placeholder(kind: str, i: int, like: Node) -> Node:
        return Node.leaf(Op.ARG, like.tensor_type, ("vjp", scope, kind, i))

    dy = {j: placeholder("dy", j, body.outputs[n_h + j]) for j in range(n_ys)
          if cts[n_h + j] is not None and outputs_rel[n_h + j]}
    # carries whose cotangent is carried: fixed point (a carry's cotangent feeds the others')
    carried = {k for k in range(n_h) if cts[k] is not None and args_rel[n_c + k]}
    while True:
        dc = {k: placeholder("dc", k, args[n_c + k]) for k in carried}
        seeds = [dc.get(k) for k in range(n_h)] + [dy.get(j) for j in range(n_ys)]
        g = dict(zip(wanted, backprop(body.outputs, seeds, wanted, sweep.inner())))
        grown = carried | {k for k in range(n_h) if g.get(args[n_c + k]) is not None}
        if grown == carried:
            break
        carried = grown
    carry_order = sorted(carried)
    dconst = {i: g[args[i]] for i in range(n_c) if g.get(args[i]) is not None}
    dxs = {j: g[a] for j, a in enumerate(x_args) if g.get(a) is not None}
    if not dconst and not carried and not dxs:
        return [None] * len(loop.src)
    acc = {i: placeholder("acc", i, args[i]) for i in dconst}
    dcarry_in = [g.get(args[n_c + k]) for k in carry_order]
    bw_outputs = ([b.add(acc[i], dconst[i]) for i in dconst]
                  + [_zeros(args[n_c + k]) if d is None else d for k, d in zip(carry_order, dcarry_in)]
                  + list(dxs.values()))

    # the residuals: values computed from this step's forward values alone, read by the backward body
    seeds_set = set(acc.values()) | set(dc.values()) | set(dy.values())
    residuals, reached = _residuals(bw_outputs, seeds_set, args, n_c, n_h, sweep.policy.saves(loop))
    reached_set = set(reached)
    for a in args[n_c:n_c + n_h]:
        if a in reached_set and a not in residuals:
            raise AssertionError(f"autodiff: the backward body reads carry {a!r} without saving it")
    if residuals:
        outs = merge_loops(list(body.outputs) + residuals)
        forward = Node.make(Op.LOOP, loop.src, LoopInfo(Graph(args, tuple(outs)), info.length, n_c, n_h,
                                                        info.reverse), loc=loop.loc)
        if forward.role is None:
            forward.role = loop.role or sweep.policy.forward_role
        sweep.augmented.add(forward)
        sweep.saved[loop] = sum(_nbytes(r) for r in residuals)
        saved = [proj(forward, n_out + m) for m in range(len(residuals))]
    else:
        saved = []

    const_idx = [i for i in range(n_c) if args[i] in reached_set]
    x_idx = [j for j, a in enumerate(x_args) if a in reached_set]
    old = ([args[i] for i in const_idx] + list(acc.values()) + [dc[k] for k in carry_order]
           + list(dy.values()) + residuals + [x_args[j] for j in x_idx])
    new = [Node.leaf(Op.ARG, o.tensor_type, i, loc=o.loc) for i, o in enumerate(old)]
    bw_body = Graph(tuple(new), tuple(merge_loops(substitute(bw_outputs, dict(zip(old, new))))))
    consts, xs = loop.src[:n_c], loop.src[n_c + n_h:]
    bw_src = ([consts[i] for i in const_idx] + [_zeros(args[i]) for i in acc]
              + [_zeros(args[n_c + k]) if cts[k] is None else cts[k] for k in carry_order]  # type: ignore[misc]
              + [cts[n_h + j] for j in dy] + saved + [xs[j] for j in x_idx])  # type: ignore[misc]
    bw = Node.make(Op.LOOP, bw_src, LoopInfo(bw_body, info.length, len(const_idx),
                                             len(acc) + len(carry_order), not info.reverse), loc=loop.loc)

    result: list[Node | None] = [None] * len(loop.src)
    for slot, i in enumerate(acc):
        result[i] = proj(bw, slot)
    for slot, (k, d) in enumerate(zip(carry_order, dcarry_in)):
        # a carry whose update reads no relevant carry passes its cotangent to nothing after step 1
        if d is not None or info.length == 0:
            result[n_c + k] = proj(bw, len(acc) + slot)
    for slot, j in enumerate(dxs):
        result[n_c + n_h + j] = proj(bw, len(acc) + len(carry_order) + slot)
    return result


_VIEWS = MOVEMENT | {Op.STOP_GRADIENT}  # cheap to recompute from what is under them


def _residuals(outputs: list[Node], seeds: set[Node], args: Sequence[Node], n_c: int, n_h: int,
               saves: Saves) -> tuple[list[Node], list[Node]]:
    """The forward values a backward body reads that the forward loop saves per step, and the nodes
    the backward body computes (a toposort that stops at the saved values).

    Candidates are values that depend on this step's carries or slices but not on a cotangent (so
    the forward body can compute them), are single tensors, and are no views (views are recomputed
    from what is under them); sequence slices are never saved (the backward loop reads the
    sequence). The policy picks among candidates; the walk recomputes what it does not pick."""
    per_step, x_args = set(args[n_c:]), set(args[n_c + n_h:])
    ct_dependent: set[Node] = set()
    varying: set[Node] = set()
    order = toposort(outputs)
    for node in order:
        if node in seeds or any(s in ct_dependent for s in node.src):
            ct_dependent.add(node)
        elif node in per_step or any(s in varying for s in node.src):
            varying.add(node)
    cheap = _cheap_of_one(order, varying)
    candidates = {n for n in varying if isinstance(n.type, TensorType) and n not in x_args
                  and n.op not in _VIEWS and n not in cheap and saves(n)}
    walk = toposort(outputs, stop=candidates)
    return [n for n in walk if n in candidates], walk


# arithmetic the backward body recomputes rather than the forward loop saving its result
_CHEAP = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.NEG})


def _cheap_of_one(order: list[Node], varying: set[Node]) -> set[Node]:
    """Per-step values that are cheap arithmetic of exactly one other per-step value: derivative
    factors such as 1 - y*y (tanh) or s*(1 - s) (sigmoid). Saving the one value they come from
    instead (usually saved anyway) never saves more arrays and often fewer: an LSTM step saved 13
    arrays of B x H, 5 of them such factors, and the memory traffic of writing and reading them cost
    more than recomputing them inside the backward loop's fused kernel. `order` is topological."""
    base: dict[Node, frozenset[Node]] = {}
    cheap: set[Node] = set()
    for node in order:
        if node not in varying:
            continue
        if node.op in _CHEAP and isinstance(node.type, TensorType):
            under = frozenset().union(*(base[s] for s in node.src if s in varying))
            if len(under) == 1:
                base[node] = under
                cheap.add(node)
                continue
        base[node] = frozenset((node,))
    return cheap


# ---- the public API ---------------------------------------------------------------------------------


def _single_output(x: Node | Graph, what: str) -> Node:
    if isinstance(x, Graph):
        if len(x.outputs) != 1:
            raise ValueError(f"{what}: expected a graph with one output, found {len(x.outputs)}")
        x = x.outputs[0]
    if not isinstance(x, Node) or not isinstance(x.type, TensorType):
        raise TypeError(f"{what}: expected one tensor value, found {x!r}")
    return x


def _wrt_list(wrt: Node | Sequence[Node], what: str) -> tuple[list[Node], bool]:
    single = isinstance(wrt, Node)
    nodes = [wrt] if single else list(wrt)  # type: ignore[list-item]
    for w in nodes:
        if not isinstance(w, Node) or not isinstance(w.type, TensorType):
            raise TypeError(f"{what}: wrt must be tensor values (pick a loop output with proj), found {w!r}")
        if w.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{what}: cannot differentiate with respect to {w!r} of dtype {w.dtype}; "
                            f"only float values have gradients")
    return nodes, single


# What each gradient node `vjp` returned is the gradient of: (the output differentiated, the wrt
# names), kept weakly beside the interned nodes for pictures and reports (`viz.output_labels`), so
# nothing has to rediscover it. Graphs rebuilt afterwards (unroll, checkpoint segments) lose it.
GRADIENT_OF: "weakref.WeakKeyDictionary[Node, tuple[tuple[Node, ...], tuple[str, ...]]]" = \
    weakref.WeakKeyDictionary()


def _record_gradients(losses: Sequence[Node], wrt: Sequence[Node], grads: Sequence[Node]) -> None:
    """`losses`: the nodes that stand for the differentiated output (the caller's, and the one
    value_and_grad returns)."""
    names: dict[Node, list[str]] = {}
    for w, g in zip(wrt, grads):
        if w.op in (Op.INPUT, Op.PARAM):
            names.setdefault(g, []).append(w.name)  # type: ignore[arg-type]
    for g, found in names.items():
        GRADIENT_OF[g] = (tuple(losses), tuple(found))


def vjp(outputs: Sequence[Node], cotangents: Sequence[Node | None], wrt: Node | Sequence[Node],
        policy: "Policy | MemoryBudget" = SaveAll(), *, _with_outputs: bool = False, _seeded: bool = False):
    """Gradients of sum_i <outputs[i], cotangents[i]> with respect to each wrt node (zeros where
    it does not depend on them), as IR nodes in wrt order (one node if wrt is one node).
    `_seeded`: the cotangents were made here (grad's seed), so they are backward nodes too."""
    outputs = [_single_output(o, "vjp") for o in outputs]
    wrt_nodes, single = _wrt_list(wrt, "vjp")
    if len(cotangents) != len(outputs):
        raise ValueError(f"vjp: {len(outputs)} outputs but {len(cotangents)} cotangents")
    for out, ct in zip(outputs, cotangents):
        if ct is not None and ct.type != out.type:
            raise ValueError(f"vjp: the cotangent of {out!r} must have its type {out.type}, found {ct.type_str()}")
    plan = None
    if isinstance(policy, MemoryBudget):
        plan = policy.plan(outputs, list(cotangents), wrt_nodes, _seeded)
        policy = plan.policy
    values, grads, _ = _vjp_graph(outputs, list(cotangents), wrt_nodes, policy, _seeded)
    if len(values) == 1:
        _record_gradients([outputs[0], values[0]], wrt_nodes, grads)
    if plan is not None:
        for g in grads:
            MEMORY_PLANS[g] = plan
    if _with_outputs:
        return values, grads
    return grads[0] if single else grads


def _vjp_graph(outputs: list[Node], cotangents: list[Node | None], wrt_nodes: list[Node], policy: Policy,
               seeded: bool) -> tuple[list[Node], list[Node], _Sweep]:
    """vjp's work: the outputs (sharing the extended forward loops) and the gradients under `policy`."""
    prepared = policy.prepare(outputs + wrt_nodes)
    outputs, wrt_nodes = prepared[:len(outputs)], prepared[len(outputs):]
    known = known_nodes(outputs + wrt_nodes + ([] if seeded else [c for c in cotangents if c is not None]))
    sweep = _Sweep(policy)
    grads = backprop(outputs, list(cotangents), wrt_nodes, sweep)
    grads = [_zeros(w) if g is None else g for g, w in zip(grads, wrt_nodes)]
    mark_role(grads, "backward", known, skip=sweep.augmented)
    merged = merge_loops(outputs + grads)
    return merged[:len(outputs)], merged[len(outputs):], sweep


def _seed(loss: Node, cotangent: Node | float | None) -> Node:
    if loss.dtype not in FLOAT_DTYPES:
        raise TypeError(f"grad: the loss must be a float value, found {loss!r}")
    if cotangent is None:
        if loss.shape != ():
            raise ValueError(f"grad: the loss has shape {list(loss.shape)} ({loss.type}), not a scalar; "
                             f"pass cotangent= (a value of shape {list(loss.shape)}) or reduce it first "
                             f"(ur.sum, ur.mean)")
        return b.const(1.0, (), loss.dtype)
    if not isinstance(cotangent, Node):
        return b.const(float(cotangent), loss.shape, loss.dtype)
    return cotangent


def grad(loss: Node | Graph, wrt: Node | Sequence[Node], cotangent: Node | float | None = None,
         policy: "Policy | MemoryBudget" = SaveAll()):
    """Reverse-mode gradients of `loss` (a scalar node, or a graph with one output) with respect
    to each wrt node (parameters, inputs or any other value), in wrt order: a list of IR nodes, or
    one node when wrt is one node. A non-scalar loss needs `cotangent` (a value of its shape).
    `policy` decides what loops save for the backward pass (SaveAll, Recompute, Checkpoint(k),
    MemoryBudget(bytes))."""
    out = _single_output(loss, "grad")
    return vjp([out], [_seed(out, cotangent)], wrt, policy, _seeded=not isinstance(cotangent, Node))


def value_and_grad(loss: Node | Graph, wrt: Node | Sequence[Node], cotangent: Node | float | None = None,
                   policy: "Policy | MemoryBudget" = SaveAll()) -> tuple[Node, Node | list[Node]]:
    """`(loss, grad(loss, wrt))` where the returned loss shares the forward loops the gradients
    use: compile `[loss, *grads]` from these and every forward loop runs once."""
    out = _single_output(loss, "value_and_grad")
    wrt_nodes, single = _wrt_list(wrt, "value_and_grad")
    (value,), grads = vjp([out], [_seed(out, cotangent)], wrt_nodes, policy, _with_outputs=True,
                          _seeded=not isinstance(cotangent, Node))
    return value, grads[0] if single else grads
