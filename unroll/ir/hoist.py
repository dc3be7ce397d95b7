"""The hoist pass: move loop-invariant and sequence-only work out of loops, before or after them.

For every loop (innermost first), in this order:

1. Invariants -> consts. A body value that depends only on consts (e.g. W.T of a const W, a concat
   of gate weights made by fuse_matmuls) is computed once before the loop and passed as a new
   const. Cheap views (reshape, broadcast) of invariants stay in the body so fused kernels read the
   small tensor; constant-only expressions are left to simplify's folding.
2. Sums regrouped: an add tree mixing carried, per-step and invariant terms is reordered so that its
   carry-free part is one value: `x_t @ W + b_ih + h @ U + b_hh` -> `(x_t @ W + b_ih + b_hh) + h @ U`
   (float addition is reassociated: results may differ in the last bits).
3. Accumulators -> sums after the loop (weight gradients of a backward loop). A carry updated as
   `acc + term_1 + ... - term_k`, whose value is read nowhere else in the body, where each term is a
   matmul, a reduction, or a linear combination of them (scaled by invariants): the terms' inputs
   become per-step outputs and the final value is `init + sum over t of the terms`, computed after the
   loop: `sum_t transpose(a_t) @ b_t` is one matmul `transpose(A) @ B` of the stacked (T*B, I) and
   (T*B, G) sequences, `sum_t sum(d_t, axis 0)` one reduction over (T, B, G).
4. Sequence-only work -> sequences (the input projection of Appleyard et al.). A body value that
   depends on consts and per-step slices but not on carried state, is read by carried work (or is an
   output), and involves a matmul or reduction is computed for all steps at once before the loop and
   passed as a new sequence: `x_t @ W + b` becomes one (T*B, I) @ (I, G) matmul (via reshape) plus
   one broadcast add. The batched form of each op is one entry of BATCH_RULES.
5. Per-step outputs whose own work (not needed by the carried state) contains a matmul are
   computed after the loop from per-step values of what they read, batched over time (a backward
   loop's input gradient `dx_t = dz_t @ W` becomes one (T*B, G) @ (G, I) matmul after the loop).

Accumulators go before sequences so that a per-step term with no carried input (a degenerate
backward loop) is first turned into a per-step output, which step 4 then moves out whole. Results
are exact up to float summation order. Dead leftovers are simplify's job.

Memory. Steps 3-5 stack per-step values over the whole loop ((T, B, 4H) for an LSTM's input
projection or its gate gradients): speed bought with memory. A loop whose memory the policy bounds
(roles in `loops.BOUNDED_ROLES`: checkpoint segments and their remainders, Recompute's forward
loops), a backward loop reading what such a loop saved, and every loop nested in their bodies get
steps 1-2 only. Under SaveAll a loop gets steps 3-5 only while what they add to the step's predicted
peak (ir/memory.py) stays within STACK_ALLOWANCE: a constant, so for long sequences SaveAll's peak
is the unoptimized one (at T = 20 000 the stacks doubled it: benchmarks/memory_budget.py), while
short ones keep the batched products.
The cap holds only where a step's share of the stacks is under STEP_BYTES_THAT_PAY (64 KiB): there
each step's product is small and batching it buys little; with large per-step products (a GRU at
B = 64, H = 512, the `large` row of `unroll bench`) the batched products are what makes the step
fast, and SaveAll is the policy that chose speed over memory.
tests/test_memory_budget.py checks every pass under every policy.
"""

from __future__ import annotations

from typing import Callable, Sequence

from . import build as b
from .loops import BOUNDED_ROLES
from .memory import predict
from .node import Graph, LoopInfo, Node, proj, substitute, toposort
from .ops import (BINARY, COMPARE, ELEMENTWISE, LEAVES, UNARY, Op, TensorType)
from .patterns import tree_leaves, OpenLoop, depends_on, graph_like, is_swap_transpose, make, map_loops, rebuild, users

# ops worth moving out of a loop body (a batched elementwise chain alone is left to fuse)
EXPENSIVE = frozenset({Op.MATMUL, Op.SUM, Op.REDUCE_MAX})
VIEWS = frozenset({Op.RESHAPE, Op.BROADCAST})

# the most a SaveAll loop's per-step stacks may add to the step's predicted peak (bytes)
STACK_ALLOWANCE = 64 * 2 ** 20
# ... for loops whose stacks add less than this per step (small per-step products)
STEP_BYTES_THAT_PAY = 64 * 1024

INVARIANT, SEQ, CARRY = 0, 1, 2  # dependency flags of a body value (SEQ | CARRY when both)


def hoist(graph: Graph) -> Graph:
    """The graph with loop-invariant and sequence-only work moved out of loops. Graph -> Graph."""
    return graph_like(graph, hoist_nodes(graph.outputs))


def hoist_any_size(graph: Graph) -> Graph:
    """hoist without SaveAll's STACK_ALLOWANCE: what `ur.compile` runs for a graph with named sizes.
    Its one compiled step serves every size, so the choice cannot depend on the sizes of one
    specialisation (the canonical sizes it is first compiled at are ~1000 for each name, where the
    allowance would turn batching off for every size). Policies still bound their loops."""
    return graph_like(graph, hoist_nodes(graph.outputs, allowance=None))


def bounded(loop: Node) -> bool:
    """Whether the policy bounds this loop's memory: a loop it marked, or a backward loop that reads
    per-step values such a loop saved (see the module docstring)."""
    if loop.role in BOUNDED_ROLES:
        return True
    info: LoopInfo = loop.arg  # type: ignore[assignment]
    xs = loop.src[info.n_consts + info.n_carry:]
    return any(x.op is Op.PROJ and x.src[0].op is Op.LOOP and x.src[0].role in BOUNDED_ROLES for x in xs)


def hoist_nodes(roots: Sequence[Node], within_bounded: bool = False,
                allowance: int | None = STACK_ALLOWANCE) -> list[Node]:
    """hoist on the graph below roots; `within_bounded`: the roots are the body of a loop whose
    memory a policy bounds (no per-step stacks anywhere inside); `allowance`: the most a SaveAll
    loop's stacks may add (None: no cap)."""
    def loop_fn(loop: Node) -> list[Node] | None:
        info: LoopInfo = loop.arg  # type: ignore[assignment]
        limited = within_bounded or bounded(loop)
        body = Graph(info.body.inputs, tuple(hoist_nodes(info.body.outputs, limited, allowance)))
        new = make(Op.LOOP, loop.src, LoopInfo(body, info.length, info.n_consts, info.n_carry,
                                               info.reverse), like=loop)
        outs = hoist_loop(new, stacks=not limited, allowance=allowance)
        if outs is None and new is not loop:
            outs = [proj(new, i) for i in range(len(new.type))]  # type: ignore[arg-type]
        return outs
    return map_loops(roots, loop_fn)


# ---- batching: a body expression evaluated for all steps at once ----------------------------------

Outer = tuple[Node, bool]  # an outer value and whether it has a leading time axis
BatchRule = Callable[[Node, list[Node], list[bool], int], Node]


def _expand(v: Node, rank: int) -> Node:
    """A batched (T, *s) value with 1s inserted after T so that it has rank 1 + rank."""
    missing = rank + 1 - v.ndim
    return v if missing <= 0 else b.reshape(v, v.shape[:1] + (1,) * missing + v.shape[1:])


def _stacked(u: Node, t: int) -> Node:
    """An unbatched value repeated over time: (T, *shape)."""
    return b.broadcast_to(b.reshape(u, (1,) + u.shape), (t,) + u.shape)


def _batch_elementwise(node: Node, vals: list[Node], batched: list[bool], t: int) -> Node:
    return make(node.op, [_expand(v, node.ndim) if bt else v for v, bt in zip(vals, batched)],
                node.arg, like=node)


def _batch_matmul(node: Node, vals: list[Node], batched: list[bool], t: int) -> Node:
    (a, c), (ba, bc) = vals, batched
    if ba and not bc and c.ndim == 2:
        # the input projection: all steps' rows in one 2-D matmul
        rows = b.reshape(a, (-1, a.shape[-1]))
        return b.reshape(make(Op.MATMUL, (rows, c), like=node), (t,) + node.shape)
    return make(Op.MATMUL, [_expand(v, node.ndim) if bt else v for v, bt in zip(vals, batched)],
                like=node)


def _shift_axes(node: Node, vals: list[Node], batched: list[bool], t: int) -> Node:
    axes, keepdims = node.arg  # type: ignore[misc]
    return make(node.op, vals, (tuple(a + 1 for a in axes), keepdims), like=node)


def _batch_argmax(node: Node, vals: list[Node], batched: list[bool], t: int) -> Node:
    return make(Op.ARGMAX, vals, int(node.arg) + 1, like=node)  # type: ignore[call-overload]


def _same_arg(node: Node, vals: list[Node], batched: list[bool], t: int) -> Node:
    return make(node.op, vals, node.arg, like=node)


def _batch_reshape(node: Node, vals: list[Node], batched: list[bool], t: int) -> Node:
    return make(Op.RESHAPE, vals, (t,) + node.shape, like=node)


def _batch_transpose(node: Node, vals: list[Node], batched: list[bool], t: int) -> Node:
    return make(Op.TRANSPOSE, vals, (0,) + tuple(p + 1 for p in node.arg), like=node)  # type: ignore[union-attr]


def _batch_broadcast(node: Node, vals: list[Node], batched: list[bool], t: int) -> Node:
    return make(Op.BROADCAST, [_expand(vals[0], node.ndim)], (t,) + node.shape, like=node)


def _batch_concat(node: Node, vals: list[Node], batched: list[bool], t: int) -> Node:
    parts = [v if bt else _stacked(v, t) for v, bt in zip(vals, batched)]
    return make(Op.CONCAT, parts, int(node.arg) + 1, like=node)  # type: ignore[call-overload]


def _batch_slice(node: Node, vals: list[Node], batched: list[bool], t: int) -> Node:
    return make(Op.SLICE, vals, ((0, t, 1),) + tuple(node.arg), like=node)  # type: ignore[arg-type]


def _batch_pad(node: Node, vals: list[Node], batched: list[bool], t: int) -> Node:
    return make(Op.PAD, vals, ((0, 0),) + tuple(node.arg), like=node)  # type: ignore[arg-type]


BATCH_RULES: dict[Op, BatchRule] = {
    **{op: _batch_elementwise for op in ELEMENTWISE},
    Op.MATMUL: _batch_matmul,
    Op.SUM: _shift_axes,
    Op.REDUCE_MAX: _shift_axes,
    Op.ARGMAX: _batch_argmax,
    Op.ONEHOT: _same_arg,
    Op.RESHAPE: _batch_reshape,
    Op.TRANSPOSE: _batch_transpose,
    Op.BROADCAST: _batch_broadcast,
    Op.CONCAT: _batch_concat,
    Op.SLICE: _batch_slice,
    Op.PAD: _batch_pad,
}
assert UNARY | BINARY | COMPARE <= set(BATCH_RULES)


def vectorize(roots: Sequence[Node], env: dict[Node, Outer], length: int) -> list[Outer]:
    """Outer values of body values `roots` for all steps at once. `env` gives the outer values of
    the body values where the walk stops (sequence slices, consts, per-step outputs)."""
    env = dict(env)
    for node in toposort(roots, stop=env):
        if node in env:
            continue
        if node.op is Op.CONST:
            env[node] = (node, False)
            continue
        vals = [env[s][0] for s in node.src]
        flags = [env[s][1] for s in node.src]
        if not any(flags):
            env[node] = (node if all(v is s for v, s in zip(vals, node.src)) else node.replace(src=vals), False)
            continue
        out = BATCH_RULES[node.op](node, vals, flags, length)
        assert out.shape == (length,) + node.shape and out.dtype == node.dtype, (node, out)
        env[node] = (out, True)
    return [env[r] for r in roots]


# ---- the loop rewrite -----------------------------------------------------------------------------

class _Hoister:
    """One loop being rewritten: its open form, value flags, and per-step outputs added for use
    after the loop (outer placeholders resolved to the new loop's outputs at the end)."""

    def __init__(self, loop: Node) -> None:
        self.ol = OpenLoop.open(loop)
        self.n_h, self.n_y = len(self.ol.carry_outs), len(self.ol.ys)
        self.carry_keys = list(self.ol.carry_args)
        self.replacement: list[Node | None] = [None] * (self.n_h + self.n_y)
        self.removed_ys: set[int] = set()
        # body value -> (outer placeholder for its stacked values, its position in ol.ys)
        self.pending: dict[Node, tuple[Node, int]] = {}
        self.changed = False

    @property
    def length(self) -> int:
        return self.ol.length

    def flags(self) -> dict[Node, int]:
        ol = self.ol
        flag: dict[Node, int] = {}
        for a in ol.x_args:
            flag[a] = SEQ
        for a in ol.carry_args:
            flag[a] = CARRY
        for node in toposort(ol.body_outputs):
            if node not in flag:
                flag[node] = 0
                for s in node.src:
                    flag[node] |= flag[s]
        return flag

    # -- 1: invariants
    def hoist_invariants(self) -> None:
        ol, flag = self.ol, self.flags()
        use = users(ol.body_outputs)
        outputs = set(ol.body_outputs)
        holders = set(ol.const_args)
        targets: list[Node] = []
        for node in toposort(ol.body_outputs):
            if flag[node] != INVARIANT or node.op in LEAVES:
                continue
            if not (node in outputs or any(flag[u] != INVARIANT for u in use[node])):
                continue
            while node.op in VIEWS:
                node = node.src[0]
            if node.op in LEAVES or not (depends_on([node], list(holders)) & holders):
                continue
            if not any(node is t for t in targets):
                targets.append(node)
        if targets:
            lifted = ol.lift(targets)
            ol.substitute({t: ol.add_const(v) for t, v in zip(targets, lifted)})
            self.changed = True

    # -- 2: sums regrouped so that their carry-free part is one value
    def regroup_sums(self) -> None:
        """`x_t @ W + b_x + h @ U + b_h` is regrouped as `(x_t @ W + b_x + b_h) + h @ U` so that the
        whole carry-free part (both biases included) is hoisted as one sequence. Only add trees
        (internal adds read once, same type as the root) with carry, sequence and invariant leaves
        are touched; the sum is the same up to float rounding order."""
        ol, flag = self.ol, self.flags()
        use = users(ol.body_outputs)
        outputs = set(ol.body_outputs)

        def internal(n: Node, parent: Node) -> bool:
            return n.op is Op.ADD and n.type == parent.type and n not in outputs and len(use[n]) == 1

        plans: dict[Node, list[Node]] = {}  # tree root -> leaves, carry-free ones first
        for node in toposort(ol.body_outputs):
            if node.op is not Op.ADD or any(internal(node, u) for u in use[node] if u.op is Op.ADD):
                continue
            leaves = tree_leaves(node, internal)
            kinds = [flag[leaf] for leaf in leaves]
            if any(k & CARRY for k in kinds) and SEQ in kinds and INVARIANT in kinds:
                plans[node] = ([leaf for leaf, k in zip(leaves, kinds) if not k & CARRY]
                               + [leaf for leaf, k in zip(leaves, kinds) if k & CARRY])
        if not plans:
            return

        def visit(node: Node, new: Callable[[Node], Node]) -> Node | None:
            if node not in plans:
                return None
            leaves = plans[node]
            total = new(leaves[0])
            for leaf in leaves[1:]:
                total = make(Op.ADD, (total, new(leaf)), like=node)
            return total if total.type == node.type else None

        ol.set_body_outputs(rebuild(ol.body_outputs, visit))
        self.changed = True

    # -- 4: sequence-only work
    def hoist_sequences(self) -> None:
        ol, flag = self.ol, self.flags()
        use = users(ol.body_outputs)
        outputs = set(ol.body_outputs)
        work = [n for n in toposort(ol.body_outputs) if flag[n] == SEQ and n.op not in LEAVES
                and (n in outputs or any(flag[u] & CARRY for u in use[n]))]
        chosen: list[Node] = []
        seen: set[Node] = set()
        while work:
            node = work.pop(0)
            if node in seen:
                continue
            seen.add(node)
            cone = [n for n in toposort([node], stop=set(ol.x_args) | set(ol.const_args))
                    if n.op not in LEAVES and flag[n] == SEQ]
            blocked = [n for n in cone if n.op not in BATCH_RULES]
            if blocked:
                work.extend(s for n in blocked for s in n.src if flag.get(s) == SEQ and s.op not in LEAVES)
            elif any(n.op in EXPENSIVE for n in cone):
                chosen.append(node)
        if not chosen:
            return
        env: dict[Node, Outer] = {h: (x, True) for h, x in zip(ol.x_args, ol.xs)}
        env.update({h: (c, False) for h, c in zip(ol.const_args, ol.consts)})
        outer = vectorize(chosen, env, self.length)
        ol.substitute({node: ol.add_x(v) for node, (v, _) in zip(chosen, outer)})
        self.changed = True

    # -- per-step values wanted after the loop
    def per_step(self, value: Node, flag: dict[Node, int]) -> Outer:
        ol = self.ol
        for h, x in zip(ol.x_args, ol.xs):
            if value is h:
                return x, True
        if flag.get(value, INVARIANT) == INVARIANT:
            return ol.lift([value])[0], False
        if value not in self.pending:  # a new per-step output, kept in ol.ys so later edits see it
            ol.ys.append(value)
            holder = ol.placeholder(TensorType((self.length,) + value.shape, value.dtype))
            self.pending[value] = (holder, len(ol.ys) - 1)
        return self.pending[value][0], True

    def stacked(self, value: Node, flag: dict[Node, int]) -> Node:
        v, batched = self.per_step(value, flag)
        return v if batched else _stacked(v, self.length)

    # -- 3: accumulators
    def sink_accumulators(self) -> None:
        ol = self.ol
        k = 0
        while k < len(ol.carry_args):
            flag = self.flags()
            terms = self.accumulation(k)
            total = None
            if terms is not None:
                sums = [self.time_sum(t, flag, top=True) for _, t in terms]
                if all(s is not None for s in sums):
                    total = ol.inits[k]
                    for (sign, _), s in zip(terms, sums):
                        total = b.add(total, s) if sign > 0 else b.sub(total, s)
            if total is None:
                k += 1
                continue
            key = ol.carry_args[k]
            self.replacement[next(i for i, c in enumerate(self.carry_keys) if c is key)] = total
            ol.remove_carry(k)
            self.changed = True

    def accumulation(self, k: int) -> list[tuple[int, Node]] | None:
        """The signed terms of carry k's update if it is `acc + terms` and acc is read nowhere else."""
        ol = self.ol
        arg, out = ol.carry_args[k], ol.carry_outs[k]
        outs = ol.body_outputs
        if sum(o is out for o in outs) != 1 or any(o is arg for o in outs):
            return None
        use = users(outs)
        if use.get(out):
            return None
        on_path = depends_on([out], [arg])
        terms: list[tuple[int, Node]] = []
        node, sign = out, 1
        while node is not arg:
            if node is not out and len(use.get(node, ())) != 1:
                return None
            x, y = node.src if node.op in (Op.ADD, Op.SUB) else (None, None)
            if x is None or (x in on_path) == (y in on_path):
                return None
            if x in on_path:
                terms.append((sign if node.op is Op.ADD else -sign, y))  # type: ignore[arg-type]
                node = x  # type: ignore[assignment]
            elif node.op is Op.ADD:
                terms.append((sign, x))
                node = y  # type: ignore[assignment]
            else:
                return None  # term - acc
            if node.type != arg.type:
                return None
        if len(use.get(arg, ())) != 1:
            return None
        return terms

    def time_sum(self, term: Node, flag: dict[Node, int], top: bool = False) -> Node | None:
        """sum over t of body value `term`, computed after the loop; None if `top` and the term is
        not a matmul/reduction (then keeping the accumulation in the loop is cheaper)."""
        t = self.length
        if flag.get(term, INVARIANT) == INVARIANT:
            return b.mul(self.ol.lift([term])[0], float(t))
        if term.op is Op.MATMUL and term.src[0].ndim == 2 and term.src[1].ndim == 2:
            a, c = term.src
            if flag.get(a, INVARIANT) == INVARIANT:
                inner = self.time_sum(c, flag)
                return None if inner is None else b.matmul(self.ol.lift([a])[0], inner)
            if flag.get(c, INVARIANT) == INVARIANT:
                inner = self.time_sum(a, flag)
                return None if inner is None else b.matmul(inner, self.ol.lift([c])[0])
            (m, kk), n = a.shape, c.shape[1]
            cs = b.reshape(self.stacked(c, flag), (t * kk, n))
            if is_swap_transpose(a):  # sum_t a0_t.T @ c_t = A0.T @ C with A0 (T*K, M)
                a0 = b.reshape(self.stacked(a.src[0], flag), (t * kk, m))
                return b.matmul(b.transpose(a0), cs)
            rows = b.reshape(b.transpose(self.stacked(a, flag), (1, 0, 2)), (m, t * kk))
            return b.matmul(rows, cs)
        if term.op is Op.SUM:
            axes, _ = term.arg  # type: ignore[misc]
            stacked = self.stacked(term.src[0], flag)
            return b.reshape(b.sum(stacked, (0,) + tuple(a + 1 for a in axes)), term.shape)
        if term.op is Op.NEG:
            inner = self.time_sum(term.src[0], flag, top)
            return None if inner is None else b.neg(inner)
        if term.op in (Op.ADD, Op.SUB) and all(s.type == term.type for s in term.src):
            x, y = (self.time_sum(s, flag, top) for s in term.src)
            if x is None or y is None:
                return None
            return b.add(x, y) if term.op is Op.ADD else b.sub(x, y)
        if term.op is Op.MUL:
            for var, inv in (term.src, term.src[::-1]):
                if flag.get(inv, INVARIANT) == INVARIANT and var.type == term.type:
                    inner = self.time_sum(var, flag, top)
                    return None if inner is None else b.mul(inner, self.ol.lift([inv])[0])
        if top:
            return None
        return b.sum(self.stacked(term, flag), 0)

    # -- 5: per-step outputs with their own matmuls
    def sink_outputs(self) -> None:
        ol, flag = self.ol, self.flags()
        needed = set(toposort(ol.carry_outs))
        for j in range(self.n_y):
            y = ol.ys[j]
            if y in needed or y.op in LEAVES or flag[y] == INVARIANT:
                continue
            own = [n for n in toposort([y], stop=needed) if n not in needed and n.op not in LEAVES]
            if any(n.op not in BATCH_RULES for n in own) or not any(n.op in EXPENSIVE for n in own):
                continue
            own_set = set(own)
            env: dict[Node, Outer] = {}
            for n in own:
                for s in n.src:
                    if s not in own_set and s not in env and s.op is not Op.CONST:
                        env[s] = self.per_step(s, flag)
            (value, batched), = vectorize([y], env, self.length)
            self.replacement[self.n_h + j] = value if batched else _stacked(value, self.length)
            self.removed_ys.add(j)
            self.changed = True

    # -- the new loop
    def finish(self) -> list[Node]:
        ol = self.ol
        keep = [j for j in range(len(ol.ys)) if j not in self.removed_ys]
        new_index = {j: i for i, j in enumerate(keep)}
        ol.ys = [ol.ys[j] for j in keep]
        loop = ol.close()
        outs = ol.outputs(loop)
        n_h = len(ol.carry_outs)
        resolve = {holder: outs[n_h + new_index[pos]] for holder, pos in self.pending.values()}
        result = []
        for i, r in enumerate(self.replacement):
            if r is not None:
                result.append(substitute([r], resolve)[0] if resolve else r)
            elif i < self.n_h:
                result.append(outs[next(k for k, a in enumerate(ol.carry_args) if a is self.carry_keys[i])])
            else:
                result.append(outs[n_h + new_index[i - self.n_h]])
        return result




def hoist_loop(loop: Node, stacks: bool = True, allowance: int | None = STACK_ALLOWANCE) -> list[Node] | None:
    """New values of the loop's outputs after hoisting (module docstring), or None if unchanged.
    `stacks=False`: only the steps that add no per-step sequence (invariants, regrouped sums);
    `allowance`: the most the stacks may add to the predicted peak (None: no cap)."""
    if loop.arg.length == 0:  # type: ignore[union-attr]
        return None
    if stacks:
        outs = _hoist_loop(loop, True)
        if outs is None:
            return None
        if allowance is None:
            return outs
        added = _added_bytes(loop, outs)
        if added <= allowance or added >= STEP_BYTES_THAT_PAY * loop.arg.length:   # type: ignore[union-attr]
            return outs
    return _hoist_loop(loop, False)


def _hoist_loop(loop: Node, stacks: bool) -> list[Node] | None:
    h = _Hoister(loop)
    h.hoist_invariants()
    h.regroup_sums()
    if stacks:
        h.sink_accumulators()
        h.hoist_sequences()
        h.sink_outputs()
    return h.finish() if h.changed else None


def _added_bytes(loop: Node, outs: list[Node]) -> int:
    """What replacing the loop's outputs by `outs` adds to the predicted peak (what both share
    upstream cancels)."""
    before = [proj(loop, i) for i in range(len(loop.type))]  # type: ignore[arg-type]
    return predict(Graph((), tuple(outs))).total - predict(Graph((), tuple(before))).total
