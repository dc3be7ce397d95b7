"""Loop-level utilities for the passes: share one forward loop between a loss and its gradients
(`merge_loops`), run part of a loop, cut a loop into segments, and tag the nodes a pass created.

Steps are counted in *processing order*: step p of a loop of length T is time index p, or T-1-p for a
reverse loop. A range of processing steps [a, b) is one contiguous time slice of every sequence
(`proc_slice`), so any run of consecutive steps is an ordinary LOOP over slices, and per-step outputs
always come back in time order (LoopInfo's convention).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Iterable, Sequence

from . import build as b
from .node import Graph, LoopInfo, Node, all_nodes, nested_body, proj, rewrite, substitute, toposort
from .ops import Op, TensorType

# Roles of the loops whose memory a policy bounds (autodiff's Recompute, Checkpoint, MemoryBudget):
# the passes add no per-step sequences to them, to the backward loops reading what they saved, or
# inside their bodies (ir/hoist.py).
BOUNDED_ROLES = frozenset({"checkpoint", "segment", "recompute"})

# ---- sharing the forward loop -------------------------------------------------------------------


def _loop_key(loop: Node) -> tuple:
    """What two loops must share for one to stand in for the other: all but the body's outputs."""
    info: LoopInfo = loop.arg  # type: ignore[assignment]
    return (tuple(map(id, loop.src)), info.length, info.n_consts, info.n_carry, info.reverse,
            tuple(map(id, info.body.inputs)))


def extends(big: Node, small: Node) -> bool:
    """True when `big` computes everything `small` does: same key, and big's body outputs are
    small's followed by more (after merging the loops nested in both bodies, so a body whose inner
    loop was itself extended still counts)."""
    if big is small or _loop_key(big) != _loop_key(small):
        return False
    outs_big, outs_small = big.arg.body.outputs, small.arg.body.outputs  # type: ignore[union-attr]
    n = len(outs_small)
    if len(outs_big) < n:
        return False
    if all(x is y for x, y in zip(outs_big, outs_small)):
        return True
    merged = merge_loops(list(outs_small) + list(outs_big[n:]))
    return all(x is y for x, y in zip(merged, outs_big))


def merge_loops(roots: Sequence[Node]) -> list[Node]:
    """Rebuild `roots` so that a loop whose work another loop of the graph already does (see
    `extends`) is replaced by that loop: `proj(small, i)` becomes `proj(big, i)`. Autodiff extends a
    forward loop with per-step residual outputs; this makes `[loss, *grads]` run the forward once.
    Repeats until no pair is left (merging one loop can make the loops downstream of it mergeable)."""
    roots = list(roots)
    while True:
        groups: dict[tuple, list[Node]] = {}
        for node in toposort(roots):
            if node.op is Op.LOOP:
                groups.setdefault(_loop_key(node), []).append(node)
        replace: dict[Node, Node] = {}
        for group in groups.values():
            if len(group) < 2:
                continue
            group.sort(key=lambda loop: -len(loop.arg.body.outputs))  # type: ignore[union-attr]
            for small in group[1:]:
                big = next((g for g in group if extends(g, small)), None)
                if big is not None:
                    replace[small] = big
        if not replace:
            return roots
        roots = rewrite(roots, partial(_swap, replace))


def _swap(replace: dict[Node, Node], node: Node, src: tuple[Node, ...]) -> Node | None:
    """merge_loops' rewrite: big and small share their sources, so big rebuilt on small's new
    sources is big's own rebuilt version; projections of small keep their index (a prefix of big's)."""
    if node not in replace:
        return None
    big = replace[node]
    new = Node.make(Op.LOOP, src, big.arg, loc=big.loc)
    if new.role is None:
        new.role = big.role
    return new


# ---- running parts of a loop ---------------------------------------------------------------------


def split_src(info: LoopInfo, src: Sequence[Node]) -> tuple[list[Node], list[Node], list[Node]]:
    """A loop's sources as (consts, carry_init, xs)."""
    n_c, n_h = info.n_consts, info.n_carry
    return list(src[:n_c]), list(src[n_c:n_c + n_h]), list(src[n_c + n_h:])


def proc_slice(x: Node, start: int, stop: int, reverse: bool) -> Node:
    """The time slice of sequence x (axis 0) that processing steps [start, stop) read."""
    length = x.shape[0]
    lo, hi = (length - stop, length - start) if reverse else (start, stop)
    return x if (lo, hi) == (0, length) else b.slice_axis(x, 0, lo, hi)


def run_steps(info: LoopInfo, consts: list[Node], carry: list[Node], xs: list[Node], start: int,
              stop: int, loc: str | None = None) -> tuple[list[Node], list[Node] | None]:
    """Run processing steps [start, stop) of `info`'s body over sequences xs (any common length):
    returns the carry after them and their per-step outputs in time order (None for no steps)."""
    if stop <= start:
        return carry, None
    sub = LoopInfo(info.body, stop - start, info.n_consts, info.n_carry, info.reverse)
    loop = Node.make(Op.LOOP, consts + carry + [proc_slice(x, start, stop, info.reverse) for x in xs],
                     sub, loc=loc)
    outs = [proj(loop, i) for i in range(len(info.body.outputs))]
    return outs[:info.n_carry], outs[info.n_carry:]


def inline_step(info: LoopInfo, consts: list[Node], carry: list[Node], xs: list[Node], step: int
                ) -> tuple[list[Node], list[Node]]:
    """Processing step `step` of the body written out in place (no loop): the new carry and the
    per-step outputs, each with a leading axis of length 1 (a time slice of one step)."""
    t = xs[0].shape[0] - 1 - step if info.reverse and xs else step
    outs = substitute(list(info.body.outputs), dict(zip(info.body.inputs, consts + carry + [x[t] for x in xs])))
    n_h = info.n_carry
    return outs[:n_h], [b.reshape(y, (1,) + y.shape) for y in outs[n_h:]]


def concat_time(runs: Iterable[list[Node] | None], n_ys: int, reverse: bool) -> list[Node]:
    """Per-step outputs of consecutive runs (listed in processing order, each in time order) joined
    into whole sequences in time order."""
    pieces = [r for r in runs if r is not None]
    if reverse:
        pieces.reverse()
    return [b.concat([p[k] for p in pieces], 0) for k in range(n_ys)]


def windows(x: Node, first: int, count: int, stride: int, size: int, reverse: bool) -> Node:
    """Sequence x cut into `count` windows of `size` processing steps starting at processing steps
    first, first + stride, ...: a (count, size, ...) tensor in time order (window j is time slice
    [L0 + j*stride, L0 + j*stride + size)), the sequences of an outer loop over the windows."""
    length, rest = x.shape[0], x.shape[1:]
    lo = length - first - (count - 1) * stride - size if reverse else first
    if stride == size:
        return b.reshape(b.slice_axis(x, 0, lo, lo + count * size), (count, size) + rest)
    blocks = math.ceil(size / stride)  # window j = blocks j, j+1, ... of `stride` steps, trimmed
    end = lo + (count - 1 + blocks) * stride
    if end > length:  # the trimmed tail of the last window may run past the sequence: zeros there
        x = b.pad(x, [(0, end - length)] + [(0, 0)] * len(rest))
    parts = [b.reshape(b.slice_axis(x, 0, lo + j * stride, lo + (j + count) * stride),
                       (count, stride) + rest) for j in range(blocks)]
    return b.slice_axis(b.concat(parts, 1), 1, 0, size)


def body_args(info: LoopInfo, window: int, carry_copies: int = 1
              ) -> tuple[list[Node], list[Node], list[Node]]:
    """Fresh ARG leaves for an outer loop body that runs `info`'s body over windows of `window`
    steps: (const args, carry args (the carries `carry_copies` times over), window args)."""
    n_c, n_h = info.n_consts, info.n_carry
    inputs = info.body.inputs
    consts = [Node.leaf(Op.ARG, a.tensor_type, i, loc=a.loc) for i, a in enumerate(inputs[:n_c])]
    carries = [Node.leaf(Op.ARG, a.tensor_type, n_c + i, loc=a.loc)
               for i, a in enumerate(list(inputs[n_c:n_c + n_h]) * carry_copies)]
    start = n_c + len(carries)
    xs = [Node.leaf(Op.ARG, TensorType((window,) + a.shape, a.dtype), start + i, loc=a.loc)
          for i, a in enumerate(inputs[n_c + n_h:])]
    return consts, carries, xs


def segment_loop(loop: Node, k: int, role: str | None = None,
                 expand: Callable[[Node], list[Node] | None] | None = None,
                 rest_role: str | None = None) -> list[Node]:
    """The outputs of `loop` (final carries, then per-step outputs) computed by an outer loop over
    segments of k steps whose body is the original loop over one segment, plus a loop over the
    T mod k remaining steps (run last). The outer loop gets `role`, the remainder loop `rest_role`.
    `expand(L)` may replace the segment's loop and the remainder loop by what stands for their
    outputs (a further level of segments: `ur.MemoryBudget`'s nested plans). Values are unchanged."""
    info: LoopInfo = loop.arg  # type: ignore[assignment]
    consts, carry, xs = split_src(info, loop.src)
    count = info.length // k
    runs: list[list[Node] | None] = []

    def expanded(node: Node) -> list[Node]:
        outs = expand(node) if expand is not None else None
        return outs if outs is not None else [proj(node, i) for i in range(len(info.body.outputs))]

    if count:
        c_args, h_args, w_args = body_args(info, k)
        inner = LoopInfo(info.body, k, info.n_consts, info.n_carry, info.reverse)
        inner_loop = Node.make(Op.LOOP, c_args + h_args + w_args, inner, loc=loop.loc)
        outer_body = Graph(tuple(c_args + h_args + w_args), tuple(expanded(inner_loop)))
        outer = Node.make(Op.LOOP, consts + carry + [windows(x, 0, count, k, k, info.reverse) for x in xs],
                          LoopInfo(outer_body, count, info.n_consts, info.n_carry, info.reverse),
                          loc=loop.loc)
        if outer.role is None:
            outer.role = role
        outs = [proj(outer, i) for i in range(len(info.body.outputs))]
        carry = outs[:info.n_carry]
        runs.append([b.reshape(y, (count * k,) + y.shape[2:]) for y in outs[info.n_carry:]])
    start = count * k
    if start < info.length:
        sub = LoopInfo(info.body, info.length - start, info.n_consts, info.n_carry, info.reverse)
        rest_loop = Node.make(Op.LOOP, consts + carry + [proc_slice(x, start, info.length, info.reverse)
                                                         for x in xs], sub, loc=loop.loc)
        if rest_loop.role is None:
            rest_loop.role = rest_role
        outs = expanded(rest_loop)
        carry = outs[:info.n_carry]
        runs.append(outs[info.n_carry:])
    return carry + concat_time(runs, info.n_ys, info.reverse)


def replace_loops(roots: Sequence[Node], expand) -> list[Node]:
    """Rebuild roots with every top-level loop L replaced: `expand(L)` (called on L rebuilt on its
    new sources) returns the nodes standing for proj(L, 0), proj(L, 1), ..., or None to keep L."""
    expanded: dict[Node, list[Node]] = {}

    def visit(node: Node, src: tuple[Node, ...]) -> Node | None:
        if node.op is Op.LOOP:
            new = node if all(x is y for x, y in zip(src, node.src)) else node.replace(src=src)
            outs = expand(new)
            if outs is not None:
                expanded[node] = outs
            return new
        if node.op is Op.PROJ and node.src[0] in expanded:
            return expanded[node.src[0]][node.arg]  # type: ignore[index]
        return None
    return rewrite(roots, visit)


# ---- side data -----------------------------------------------------------------------------------


def known_nodes(roots: Sequence[Node]) -> set[Node]:
    """Every node below roots, nested loop bodies included (to tell later which ones a pass made)."""
    return {n for n, _ in all_nodes(Graph((), tuple(roots)))}


def mark_role(roots: Sequence[Node], role: str, known: set[Node], skip: Iterable[Node] = (),
              stop: Iterable[Node] = ()) -> None:
    """Set `role` on every node below roots (bodies included) that is not in `known` or `skip` and
    has no role yet (nodes are interned: the first maker's role stays). The walk does not go below
    the nodes in `stop` (values the pass built on, not made)."""
    skip, stop = set(skip), set(stop)
    for node in toposort(roots, stop=stop):
        if node in stop:
            continue
        body = nested_body(node)
        for n in [node] + ([m for m, _ in all_nodes(body)] if body is not None else []):
            if n.role is None and n not in known and n not in skip:
                n.role = role
