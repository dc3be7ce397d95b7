"""Loop emission: a LOOP node as a `for t` loop in the same function, its buffers allocated once before
the outermost loop, loop-invariant weights packed before it, carries swapped at the end of a step."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ...ir.node import LoopInfo, Node
from ...ir.ops import FLOAT_DTYPES, Op
from .kernels_ir import packed_size_text
from .schedule import Scope, loop_step_targets
from .values import Val, step_view

if TYPE_CHECKING:
    from .emit import Block, Codegen


def emit_loop(cg: Codegen, scope: Scope, node: Node) -> None:
    """`for t in range(T)` (or reversed) around the body emitted as a nested scope; the loop's
    results (carries, then ys) become the values of its proj users."""
    info: LoopInfo = node.arg  # type: ignore[assignment]
    body = info.body
    src_vals = [scope.env[s] for s in node.src]
    outer = scope.alloc is None
    alloc_block = scope.block.sub() if outer else scope.alloc
    alloc_indent = scope.indent if outer else scope.alloc_indent
    holder = Scope(scope.graph, {}, scope.block, scope.indent, alloc_block, alloc_indent)
    t = f"t{cg.loop_depth}"
    cg.loop_depth += 1
    carries, ys = _loop_buffers(cg, scope, holder, node, src_vals)
    env = _step_env(cg, scope, holder, node, src_vals, carries, t)
    header = (f"for {t} in range({cg.dims.n(info.length)} - 1, -1, -1):" if info.reverse
              else f"for {t} in range({cg.dims.n(info.length)}):")
    # BLAS threads for the per-step products (the policy: cpu.backend's module docstring)
    switch_threads = outer and any(n.op is Op.MATMUL for n in body.nodes())
    if switch_threads:
        scope.block.add(scope.indent, "blas_threads(blas[0], blas[2])", node)
    scope.block.add(scope.indent, header, node)
    step = Scope(body, env, scope.block, scope.indent + 1, alloc_block, alloc_indent)
    in_place_carries = loop_step_targets(step, info, carries, ys, t)
    outs = cg.emit_scope(step)
    _end_of_step(cg, step, node, outs, carries, ys, in_place_carries, t)
    if switch_threads:
        scope.block.add(scope.indent, "blas_threads(blas[0], blas[1])", node)
    cg.loop_depth -= 1
    results = carries + ys
    for user in scope.users.get(node, []):
        if user.op is Op.PROJ:
            scope.env[user] = results[user.arg]  # type: ignore[index]


def _loop_buffers(cg: Codegen, scope: Scope, holder: Scope, node: Node, src_vals: list[Val]
                  ) -> tuple[list[Val], list[Val]]:
    """The carried buffers, initialised here (every time this loop runs), and the stacked per-step
    outputs ys, both allocated with the outermost loop's buffers."""
    info: LoopInfo = node.arg  # type: ignore[assignment]
    body, n_c, n_h = info.body, info.n_consts, info.n_carry
    carries = []
    for k in range(n_h):
        arg = body.inputs[n_c + k]
        buf = cg.alloc(holder, arg.shape, arg.dtype, "c", node)
        cg.copy(scope, src_vals[n_c + k], buf, node)
        carries.append(buf)
    ys = []
    for out in body.outputs[n_h:]:
        ys.append(cg.alloc(holder, (info.length,) + out.shape, out.dtype, "ys", node))
    return carries, ys


def _step_env(cg: Codegen, scope: Scope, holder: Scope, node: Node, src_vals: list[Val], carries: list[Val],
              t: str) -> dict[Node, Val]:
    """The body's arguments: constants (weights the step multiplies packed once, here), carried
    buffers, and the t-th slices of the sequences."""
    info: LoopInfo = node.arg  # type: ignore[assignment]
    body, n_c, n_h = info.body, info.n_consts, info.n_carry
    env: dict[Node, Val] = {}
    weights = {n.src[1] for n in body.nodes() if n.op is Op.MATMUL and n.ndim == 2}
    for i, arg in enumerate(body.inputs[:n_c]):
        env[arg] = src_vals[i]
        if arg in weights and arg.dtype in FLOAT_DTYPES:
            # a weight every step multiplies: packed once, here, for the per-step micro-kernel
            env[arg] = _packed_weight(cg, scope, holder, src_vals[i], node)
    for k, arg in enumerate(body.inputs[n_c:n_c + n_h]):
        env[arg] = carries[k]
    for j, arg in enumerate(body.inputs[n_c + n_h:]):
        env[arg] = step_view(src_vals[n_c + n_h + j], t)
    return env


def _end_of_step(cg: Codegen, step: Scope, node: Node, outs: list[Val], carries: list[Val], ys: list[Val],
                 in_place_carries: set[int], t: str) -> None:
    """ys not written in place are copied into ys[t]; then the carries: copies first (through
    temporaries where a new value reads an old carry), then buffer swaps instead of copies."""
    info: LoopInfo = node.arg  # type: ignore[assignment]
    n_h = info.n_carry
    carry_outs = list(info.body.outputs[:n_h])
    for j, o in enumerate(info.body.outputs[n_h:]):
        # a target elsewhere (a concat returned twice writes into its own buffer) still needs the copy
        target = step.targets.get(o)
        if target is None or target.base != ys[j].base:
            cg.copy(step, outs[n_h + j], step_view(ys[j], t, plain=True), node)
    swaps, copies = [], []
    swapped: set[Node] = set()
    for k, o in enumerate(carry_outs):
        if k in in_place_carries or outs[k] is carries[k]:
            continue
        owned = step.owned.get(o)
        if owned is not None and o not in swapped and outs[k].base == owned and outs[k].plain:
            swaps.append((carries[k].base, owned))
            swapped.add(o)
        else:
            copies.append((outs[k], carries[k]))
    carry_roots = {c.base for c in carries}
    if any(v.root in carry_roots for v, _ in copies) and len(copies) > 1:
        temps = []
        for v, c in copies:
            tmp = cg.alloc(step, c.shape, c.dtype, "tmp", node)
            cg.copy(step, v, tmp, node)
            temps.append((tmp, c))
        copies = temps
    for v, c in copies:
        cg.copy(step, v, c, node)
    for c, b in swaps:
        step.block.add(step.indent, f"{c}, {b} = {b}, {c}", node)


def _packed_weight(cg: Codegen, scope: Scope, holder: Scope, val: Val, node: Node) -> Val:
    """The weight `val` (K x N) with its panels packed before the loop (gemm.pack_panels):
    the buffer is allocated with the loop's buffers, the packing runs each time the loop starts."""
    if not val.plain and val.tbase is None:
        val = cg.materialize(scope, val, node)
    k, n = (cg.dims.n(d) for d in val.shape)
    bits = 32 if val.dtype == "float32" else 64
    name = cg.fresh("pk")
    size = packed_size_text(k, n, bits)
    alloc: Block = holder.alloc  # type: ignore[assignment]
    alloc.add(holder.alloc_indent, f"{name} = np.empty({size}, np.{val.dtype})", node)
    trans = val.tbase is not None
    scope.block.add(scope.indent, f"pack_panels({val.tbase if trans else val.arr}, {int(trans)}, {name})", node)
    return dataclasses.replace(val, packed=name)
