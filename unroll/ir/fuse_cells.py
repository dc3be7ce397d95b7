"""The fuse_cells pass: maximal groups of elementwise ops in a loop body become one FUSED node.

In every loop body (nested ones too; the top level is left to the backends):

1. Slices sink through elementwise ops: when every reader of an elementwise value is a slice (the
   gate split of `x_proj + h @ W + b`), each slice is pushed to the op's operands (`slice(a + b)`
   becomes `slice(a) + slice(b)`, a broadcast operand sliced only on its own axes), until the
   slices sit on the matmul result, the sequence slice and the bias: views a kernel can read.
2. Elementwise ops (ops.ELEMENTWISE) are grouped greedily in dependency order: a node joins the
   group of an operand when it has the same shape and joining creates no cycle (no path that leaves
   the group and comes back, e.g. gate math -> matmul -> more gate math stays two groups).
3. Each group of two or more ops becomes `Node.make(Op.FUSED, inputs, Graph(args, outputs))`, a
   multi-output node reached with proj. Conditions (what backends may rely on): the body holds only
   elementwise ops, its ARG leaves and constant leaves; every body node and output has the group's
   one shape; every input broadcasts to it (numpy rules); inputs are whatever the ops read outside
   the group (slices, broadcasts, reshapes and matmul results stay outside as the kernel's inputs).
   Outputs are the group's values read outside it, in dependency order.

One FUSED node per step is one kernel per step for the Numba/CUDA backends.
"""

from __future__ import annotations

from typing import Callable, Collection, Sequence

from . import build as b
from .node import Graph, LoopInfo, Node, proj, substitute, toposort
from .ops import ELEMENTWISE, Op
from .patterns import OpenLoop, graph_like, make, map_loops, users

MIN_GROUP = 2


def fuse_cells(graph: Graph) -> Graph:
    """The graph with each loop body's elementwise groups fused. A pure Graph -> Graph pass."""
    return graph_like(graph, _in_loops(list(graph.outputs)))


def fuse_top_level(graph: Graph) -> Graph:
    """The graph with its top level's elementwise groups fused (loop bodies untouched): for a
    backend that lowers each top-level op to its own loop nest, where every nest costs compile
    time (a TCN step has hundreds). A pure Graph -> Graph pass.

    Sums that add a product (`c + a @ b`, `c + pad_rows(a @ b)`: a convolution's taps, nn/conv.py)
    stay out of the groups: the Numba backend runs each as BLAS accumulating into c's buffer
    (cpu/schedule.py), where a fused sum would read every product from a buffer of its own."""
    return graph_like(graph, fuse_body(list(graph.outputs), apart=accumulations))


def accumulations(outputs: Sequence[Node]) -> set[Node]:
    """The 2-D sums `c + t` whose term t is a matmul, or a pad of a matmul's rows only, read only
    by the sum (the pattern cpu/schedule.py accumulates in place)."""
    use = users(outputs)
    out_set = set(outputs)

    def only_here(n: Node) -> bool:
        return n not in out_set and len(use[n]) == 1

    def product(t: Node) -> bool:
        if t.op is Op.PAD and t.ndim == 2 and t.arg[1] == (0, 0) and only_here(t):  # type: ignore[index]
            t = t.src[0]
        return t.op is Op.MATMUL and t.ndim == 2 and only_here(t)

    return {n for n in use if n.op is Op.ADD and n.ndim == 2 and n.src[0].shape == n.src[1].shape
            and any(product(t) for t in n.src)}


def _in_loops(roots: list[Node]) -> list[Node]:
    def loop_fn(loop: Node) -> list[Node] | None:
        info: LoopInfo = loop.arg  # type: ignore[assignment]
        body = Graph(info.body.inputs, tuple(_in_loops(list(info.body.outputs))))
        loop = make(Op.LOOP, loop.src, LoopInfo(body, info.length, info.n_consts, info.n_carry,
                                                info.reverse), like=loop)
        ol = OpenLoop.open(loop)
        finals = defer_carry_sums(ol)
        ol.set_body_outputs(fuse_body(ol.body_outputs))
        new = ol.close()
        outs = ol.outputs(new)
        return [f(outs) for f in finals] + outs[len(ol.carry_outs):]
    return map_loops(roots, loop_fn)


def defer_carry_sums(ol: OpenLoop) -> list[Callable[[list[Node]], Node]]:
    """A carry updated as `p + m` (or `p - m`) with m a matmul and the carry read only by
    elementwise ops is carried as the two parts p and m (m's part starting at zero); the body adds
    them where it reads the carry, inside the next step's fused kernel, instead of in a kernel of
    its own after the matmul (the GRU backward's dh = dh * z + dz @ W). Returns, per old carry, how
    to get its final value from the new loop's outputs."""
    finals: list[Callable[[list[Node]], Node]] = []
    k_new = 0
    for _ in range(len(ol.carry_args)):
        arg, out = ol.carry_args[k_new], ol.carry_outs[k_new]
        readers = users(ol.body_outputs).get(arg, [])
        if out.op is Op.ADD and out.src[0].op is Op.MATMUL and out.src[1].op is not Op.MATMUL:
            out = make(Op.ADD, out.src[::-1], like=out)  # m + p -> p + m
        split = (out.op in (Op.ADD, Op.SUB) and out.src[1].op is Op.MATMUL and out.type == arg.type
                 and out.src[0].type == arg.type and out.src[1].type == arg.type and readers
                 and all(r.op in ELEMENTWISE for r in readers) and arg not in set(ol.body_outputs))
        if not split:
            finals.append(lambda outs, i=k_new: outs[i])
            k_new += 1
            continue
        op = out.op
        part_arg = ol.placeholder(arg.tensor_type, arg.loc)
        zero = b.const(0, arg.shape, arg.dtype)
        joined = make(op, (arg, part_arg), like=out)
        ol.carry_outs[k_new] = out.src[0]
        ol.inits.insert(k_new + 1, zero)
        ol.carry_args.insert(k_new + 1, part_arg)
        ol.carry_outs.insert(k_new + 1, out.src[1])
        ol.substitute({arg: joined})  # joined itself still reads arg: substitute does not re-enter it
        finals.append(lambda outs, i=k_new, op=op: make(op, (outs[i], outs[i + 1])))
        k_new += 2
    return finals


def fuse_body(outputs: Sequence[Node], apart: Callable[[Sequence[Node]], set[Node]] | None = None) -> list[Node]:
    """A body's outputs recomputed with its elementwise groups as FUSED nodes; `apart(outputs)`
    names elementwise nodes to leave unfused."""
    outputs = sink_slices(list(outputs))
    groups = group_elementwise(outputs, apart(outputs) if apart is not None else set())
    mapping: dict[Node, Node] = {}
    use = users(outputs)
    out_set = set(outputs)
    for members in groups:
        member_set = set(members)
        inputs: list[Node] = []
        for m in members:
            for s in m.src:
                if s not in member_set and s.op is not Op.CONST and not any(s is i for i in inputs):
                    inputs.append(s)
        results = [m for m in members if m in out_set or any(u not in member_set for u in use[m])]
        args = [Node.leaf(Op.ARG, s.tensor_type, i, loc=s.loc) for i, s in enumerate(inputs)]
        body = Graph(tuple(args), tuple(substitute(results, dict(zip(inputs, args)))))
        new_inputs = substitute(inputs, mapping) if mapping else inputs
        fused = Node.make(Op.FUSED, new_inputs, body, loc=results[-1].loc)
        roles = {m.role for m in members}
        if fused.role is None and len(roles) == 1:
            fused.role = roles.pop()
        for k, r in enumerate(results):
            mapping[r] = proj(fused, k)
    return substitute(outputs, mapping) if mapping else outputs


# ---- slices through elementwise ops ---------------------------------------------------------------

def _slice_operand(x: Node, triples: tuple[tuple[int, int, int], ...], shape: tuple[int, ...]) -> Node:
    """Operand x of an elementwise op of `shape`, sliced like the op's result by `triples`."""
    lead = len(shape) - x.ndim
    own = []
    for axis, dim in enumerate(x.shape):
        t = triples[axis + lead]
        own.append((0, 1, 1) if dim == 1 and shape[axis + lead] != 1 else t)
    if all(t == (0, d, 1) for t, d in zip(own, x.shape)):
        return x
    return make(Op.SLICE, (x,), tuple(own), like=x)


def sink_slices(outputs: list[Node]) -> list[Node]:
    for _ in range(64):
        use = users(outputs)
        out_set = set(outputs)
        mapping: dict[Node, Node] = {}
        for node in toposort(outputs):
            e = node.src[0] if node.op is Op.SLICE else None
            if e is None or e.op not in ELEMENTWISE or e in out_set:
                continue
            readers = use[e]
            if not all(r.op is Op.SLICE for r in readers):
                continue
            if sum(r.tensor_type.size for r in set(readers)) > e.tensor_type.size:
                continue  # overlapping slices would compute elements twice
            triples: tuple = node.arg  # type: ignore[assignment]
            src = [_slice_operand(s, triples, e.shape) for s in e.src]
            mapping[node] = make(e.op, src, e.arg, like=e)
        if not mapping:
            return outputs
        outputs = substitute(outputs, mapping)
    return outputs


# ---- grouping -------------------------------------------------------------------------------------

def group_elementwise(outputs: Sequence[Node], apart: Collection[Node] = ()) -> list[list[Node]]:
    """Groups (members in dependency order) of two or more elementwise ops (not those in `apart`),
    in an order where a group comes after every group it reads from."""
    order = toposort(outputs)
    index = {n: i for i, n in enumerate(order)}
    anc: list[int] = []  # bitmask of each node's ancestors, itself included
    for n in order:
        mask = 1 << index[n]
        for s in n.src:
            mask |= anc[index[s]]
        anc.append(mask)
    group_of: dict[int, int] = {}     # node index -> group id
    masks: dict[int, int] = {}        # group id -> member bitmask

    def cyclic(mask: int) -> bool:
        """Would a group with these members have a path that leaves it and comes back?"""
        reach = 0
        m = mask
        while m:
            low = m & -m
            reach |= anc[low.bit_length() - 1]
            m ^= low
        outside = reach & ~mask
        while outside:
            low = outside & -outside
            if anc[low.bit_length() - 1] & mask & ~low:
                return True
            outside ^= low
        return False

    for n in order:
        i = index[n]
        if n.op not in ELEMENTWISE or n in apart:
            continue
        bit = 1 << i
        joined: int | None = None
        for s in n.src:
            gid = group_of.get(index[s])
            if gid is None or gid == joined or order[index[s]].shape != n.shape:
                continue
            if joined is None:
                if not cyclic(masks[gid] | bit):
                    masks[gid] |= bit
                    group_of[i] = joined = gid
            elif not cyclic(masks[gid] | masks[joined]):
                masks[joined] |= masks.pop(gid)
                for j, g in list(group_of.items()):
                    if g == gid:
                        group_of[j] = joined
        if joined is None:
            group_of[i] = i
            masks[i] = bit
    groups = [m for m in masks.values() if bin(m).count("1") >= MIN_GROUP]
    # a group that reads another group's output comes after it (groups are convex, so this is a DAG)
    reads = {g: 0 for g in groups}
    for g in groups:
        m = g
        while m:
            low = m & -m
            reads[g] |= anc[low.bit_length() - 1]
            m ^= low
    # Each group is convex, but two can still read each other (a1 -> b1 and b2 -> a2 with a1 -> a2
    # and b2 -> b1): as FUSED nodes they would form a cycle. Then the smallest group still waiting
    # is not fused (its members stay ordinary nodes), which removes every cycle through it.
    ordered: list[int] = []
    pending = list(groups)
    while pending:
        for g in pending:
            if all(h == g or not (reads[g] & h & ~g) for h in pending):
                ordered.append(g)
                pending.remove(g)
                break
        else:
            pending.remove(min(pending, key=lambda g: bin(g).count("1")))
    return [[order[i] for i in range(len(order)) if g >> i & 1] for g in ordered]
