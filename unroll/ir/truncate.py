"""Truncated BPTT as a rewrite before autodiff: cut the carried state's gradient at chunk boundaries.

`truncate(loss, k)` restructures every top-level loop into chunks of k steps and puts a
stop_gradient on the carried state entering each chunk after the first. Forward values are
unchanged; `grad` then builds no cotangent for the carry across a boundary (symbolic zeros), and
DCE removes what is left. This is PyTorch's idiom: run k steps, `h = h.detach()`, sum the chunks'
losses, one backward. Truncation is never a flag inside autodiff (Theano's scan had it there, and
other optimizations broke around it).

`truncate(loss, (k1, k2))` is Williams & Peng's BPTT(k2; k1): every k1 steps, the losses of those k1
steps are backpropagated through the last k2 >= k1 steps. Chunk c (output steps [c*k1, (c+1)*k1))
sees the state at its window start max(0, (c+1)*k1 - k2) as a constant; with k2 > k1 the windows
overlap, so the k2 - k1 steps before each chunk are computed again from the stopped state (a static
graph cannot give one forward value two gradient roles). (k, k) is the plain chunked form.

Structure of a truncated loop (steps in processing order, see ir/loops.py):
    prologue   chunks whose window starts at step 0: the original loop, untruncated
    main       an outer loop over the remaining whole chunks; its carry is the state at the window
               start, and its body runs the window from stop_gradient(carry): the first step
               written out in place (so its VJP has no carry cotangent to compute at all), then a
               loop over the rest; it outputs the state k1 steps later and the chunk's outputs
    tail       the last, partial chunk (T mod k1 steps), the same way without an outer loop
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from . import build as b
from .loops import (
    body_args,
    concat_time,
    inline_step,
    known_nodes,
    mark_role,
    proc_slice,
    replace_loops,
    run_steps,
    split_src,
    windows,
)
from .node import Graph, LoopInfo, Node, proj
from .ops import Op

ROLE = "truncate"


def _check(k: int | tuple[int, int]) -> tuple[int, int]:
    k1, k2 = (k, k) if isinstance(k, (int, np.integer)) else tuple(k)  # type: ignore[misc]
    if not all(isinstance(v, (int, np.integer)) for v in (k1, k2)) or k1 < 1 or k2 < k1:
        raise ValueError(f"truncate: expected k >= 1 or (k1, k2) with 1 <= k1 <= k2, found {k!r}")
    return int(k1), int(k2)


def truncate(x, k: int | tuple[int, int]):
    """Truncated BPTT for every top-level loop under x (an output node, a list of them, or a Graph;
    the same kind comes back). k: chunk length, or (k1, k2) for Williams & Peng's BPTT(k2; k1).
    Forward values are unchanged; k >= T leaves a loop as it is (full BPTT)."""
    k1, k2 = _check(k)
    if isinstance(x, Graph):
        return Graph(x.inputs, tuple(truncate_nodes(list(x.outputs), k1, k2)), x.output_names)
    if isinstance(x, Node):
        return truncate_nodes([x], k1, k2)[0]
    return truncate_nodes(list(x), k1, k2)


def truncate_nodes(roots: Sequence[Node], k1: int, k2: int) -> list[Node]:
    known = known_nodes(roots)

    def expand(loop: Node) -> list[Node] | None:
        outs = truncate_loop(loop, k1, k2)
        if outs is not None:  # tag what the rewrite made, not the loop's (rebuilt) sources
            mark_role(outs, ROLE, known, stop=loop.src)
        return outs
    return replace_loops(roots, expand)


def truncate_loop(loop: Node, k1: int, k2: int) -> list[Node] | None:
    """Nodes standing for the loop's outputs (final carries, then per-step outputs) with the
    gradient truncated; None when no chunk's window starts after step 0 (full BPTT already)."""
    info: LoopInfo = loop.arg  # type: ignore[assignment]
    T, d = info.length, k2 - k1
    first_cut = d // k1 + 1  # the first chunk whose window start c*k1 - d is > 0
    if first_cut * k1 >= T:
        return None
    consts, carry, xs = split_src(info, loop.src)
    n_full = T // k1
    runs: list[list[Node] | None] = []

    # prologue: chunks [0, first_cut), full BPTT; keep the state at the first cut window's start
    start = first_cut * k1 - d
    state, ys = run_steps(info, consts, carry, xs, 0, start, loop.loc)
    runs.append(ys)
    _, ys = run_steps(info, consts, state, xs, start, first_cut * k1, loop.loc)
    runs.append(ys)
    final = None

    count = n_full - first_cut
    if count > 0:
        state, final, ys = _main_loop(info, loop, consts, state, xs, start, count, k1, k2)
        runs.append(ys)
    if T > n_full * k1:  # tail: the partial last chunk, window [n_full*k1 - d, T)
        tail_start = n_full * k1 - d
        window = [proc_slice(x, tail_start, T, info.reverse) for x in xs]
        _, final, ys = _window(info, consts, state, window, T - tail_start, k1, d)
        runs.append(ys)
    return final + concat_time(runs, info.n_ys, info.reverse)


def _window(info: LoopInfo, consts: list[Node], state: list[Node], xs: list[Node], size: int, k1: int,
            d: int) -> tuple[list[Node], list[Node], list[Node]]:
    """Run a window of `size` steps over sequences xs (of that length) from the stopped state:
    returns the state after k1 steps, the state at the end, and the outputs of steps [d, size)."""
    stopped = [b.stop_gradient(s) for s in state]
    carry, first = inline_step(info, consts, stopped, xs, 0)
    after_k1, rest = run_steps(info, consts, carry, xs, 1, min(k1, size))
    end, tail = run_steps(info, consts, after_k1, xs, min(k1, size), size)
    ys = concat_time([first, rest, tail], info.n_ys, info.reverse)
    return after_k1, end, [proc_slice(y, d, size, info.reverse) for y in ys]


def _main_loop(info: LoopInfo, loop: Node, consts: list[Node], state: list[Node], xs: list[Node],
               start: int, count: int, k1: int, k2: int) -> tuple[list[Node], list[Node], list[Node]]:
    """An outer loop over `count` whole chunks whose windows start at processing step `start`.
    Carries: the state at the window start, then (when windows overlap, d > 0) the state at the
    window's end, for the final state. Returns (state at the next window start, final state,
    the chunks' outputs)."""
    d, n_h = k2 - k1, info.n_carry
    c_args, h_args, w_args = body_args(info, k2, carry_copies=2 if d else 1)
    next_start, end, ys = _window(info, c_args, h_args[:n_h], w_args, k2, k1, d)
    carries = next_start + (end if d else [])
    body = Graph(tuple(c_args + h_args + w_args), tuple(carries + ys))
    seqs = [windows(x, start, count, k1, k2, info.reverse) for x in xs]
    outer = Node.make(Op.LOOP, consts + state * (2 if d else 1) + seqs,
                      LoopInfo(body, count, len(c_args), len(carries), info.reverse), loc=loop.loc)
    outs = [proj(outer, i) for i in range(len(carries) + len(ys))]
    stacked = [b.reshape(y, (count * k1,) + y.shape[2:]) for y in outs[len(carries):]]
    final = outs[n_h:len(carries)] if d else outs[:n_h]
    return outs[:n_h], final, stacked


def truncation_bias(loss: Node, wrt: Sequence[Node], ks: Sequence[int | tuple[int, int]],
                    feeds: dict[str, np.ndarray]) -> dict:
    """How far truncated gradients are from full BPTT: {k: |g_k - g_full| / |g_full|} over all wrt
    gradients flattened together, evaluated with the numpy reference backend on `feeds`."""
    # an analysis helper above the passes: imported here so that the pass itself stays a leaf
    from ..backends.numpy_ref import evaluate
    from .autodiff import grad

    def gradients(target: Node) -> np.ndarray:
        graph = Graph.of(grad(target, list(wrt)))
        values = evaluate(graph, [feeds[name] for name in graph.input_names])
        return np.concatenate([np.ravel(v).astype(np.float64) for v in values])

    full = gradients(loss)
    scale = np.linalg.norm(full)
    return {k: float(np.linalg.norm(gradients(truncate(loss, k)) - full) / (scale if scale else 1.0))
            for k in ks}
