"""Persistent recurrent kernels: one launch runs all T steps of a rolled LOOP (Diamos et al.,
Persistent RNNs, ICML 2016), planned from the loop body alone, so forward and backward loops of any
cell written in the DSL (RNN, LSTM, GRU, hand-written) take the same path.

Work split. Each of G blocks owns a fixed set of elements of every value the step materializes:
the carried state is split into G contiguous column ranges of its last (hidden) axis; every other
materialized value gives each of its columns to the block that owns most of what a sample of that
column reads (indices traced through the body with numpy), so a block mostly reads what it wrote.
The exact reads of every stage (all elements, traced once per stage) then decide which columns of
each smem result a block computes and where grid barriers are needed.
Materialized per step are: the new carries and per-step outputs; "scratch" values that a matmul
reads as its left operand (e.g. the backward's gate gradients); and recurrent matmuls P = A @ W
whose W is loop-invariant ("smem matmuls"). Everything else is inlined (recomputed) into the
element code that uses it.

Where weights live. For a smem matmul each block computes only the columns of P that its own
elements read, for all rows, into shared memory, and keeps exactly those columns of W resident in
shared memory for the whole launch (loaded once in the prologue). An LSTM block that owns hidden
units j0..j1 thus holds W's columns {j, H+j, 2H+j, 3H+j} and does h @ W for them plus the fused gate
math without leaving the SM; each thread accumulates a register tile of up to 8 rows x 4 columns.
When the resident slices do not fit, the matmul is inlined instead and W is read from global memory
(L2-resident at these sizes). Loop sources that are views or constants (W.T, zeros, the gate slices
of the hoisted input projection) are read in place from the outer graph's buffers.

Synchronization. Between stages of a step a block synchronizes its threads; a grid-wide barrier is
placed only where a stage reads elements another block wrote since the last barrier (RAW) or
overwrites elements another block may still read (WAR). Carries and scratch values are double
buffered by step parity. The placement is found by simulating a few steps of the schedule. For an
LSTM forward this gives one grid barrier per step (before h @ W), for its backward one (before
dgates @ W). The barrier is an atomic counter + generation word in global memory (self-resetting,
so launches and CUDA-graph replays need no reset) or, with sync="cg", cooperative groups'
grid.sync(). All blocks must be co-resident: G <= number of SMs, one block per SM.

The simulator cannot synchronize blocks, so there G = 1 (`tests` run G > 1 through the
multi-block emulator in `cuda.gridsim`).

Two steps. The plan step, `schedule_loop` (`_Planner`), decides all of the above and returns a
`Schedule`: element owners, stages with their reads, writes and grid barriers, the smem matmuls
with the columns each block computes, the shared-memory layout; it writes no source and can be
tested alone. The emit step, `emit_loop` (`_LoopWriter`), turns a Schedule into the kernel.
`plan_loop` runs both.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ...ir.node import LoopInfo, Node, proj, toposort
from ...ir.ops import FLOAT_DTYPES, LEAVES, MOVEMENT, Op
from .codegen import (
    CHECK_DTYPE,
    CHECK_SIZE,
    INLINE_OPS,
    NUMBA_TYPES,
    Emitter,
    flat_offset,
    inline_fused,
    literal,
    unravel,
)
from ..lower.index import numpy_source_map
from .kernels import KernelSpec, check_key


class NotPersistent(Exception):
    """The loop cannot run as one persistent kernel; the message says why (recorded in the plan)."""


@dataclass(frozen=True)
class DeviceProps:
    """What the planner needs to know about the GPU (defaults: an H100 SXM)."""

    sm_count: int = 132
    max_shared_bytes: int = 232448   # per block, after opting in (227 KB on Hopper)
    simulator: bool = False


@dataclass(frozen=True)
class LoopOptions:
    blocks: int | None = None        # G; None: chosen from the work per step
    threads: int = 256
    sync: str = "atomic"             # "atomic" | "cg"
    smem_weights: bool = True        # keep recurrent weight slices resident in shared memory
    work_per_block: int = 1 << 17    # multiply-adds per step one block should get before adding blocks
    trace_cap: int = 1 << 26         # index pairs traced per stage before giving up (opaque stage)


@dataclass(eq=False)
class Stage:
    kind: str                        # "pointwise" | "matmul"
    nodes: list[Node]                # a matmul or scratch stage: one node; outputs: same-owner group
    output: bool = False             # stores the body's outputs (carries, per-step outputs)
    grid_sync: bool = False          # a grid barrier before this stage
    reads: list[tuple[Hashable, str, bool]] = field(default_factory=list)  # (buffer, parity, local)
    writes: list[tuple[Hashable, str]] = field(default_factory=list)

    @property
    def node(self) -> Node:
        return self.nodes[0]


@dataclass
class LoopPlan:
    spec: KernelSpec
    blocks: int
    threads: int
    description: dict
    schedule: Schedule | None = None

    @property
    def shared_bytes(self) -> int:
        return self.spec.shared_bytes


class _Stop:
    """`in` test for toposort's stop set: materialized nodes other than the roots."""

    def __init__(self, keys: dict[Node, Hashable], roots: set[Node]) -> None:
        self.keys, self.roots = keys, roots

    def __contains__(self, node: object) -> bool:
        return node not in self.roots and node in self.keys


def trace_reads(roots: Sequence[Node], elems: np.ndarray, keys: dict[Node, Hashable], cap: int
                ) -> dict[Hashable, tuple[np.ndarray, np.ndarray]] | None:
    """For the elements `elems` of the roots (computed inline, sharing one element space): every
    materialized value each element reads, as {key: (element positions, flat indices)}; values
    keyed None are always available. None when the trace would exceed `cap` index pairs (the stage
    is then treated as reading everything). Each node is visited once for all the requests that
    reach it, so a group of outputs sharing a cell's math costs about one trace."""
    root_set = set(roots)
    order = toposort(list(roots), stop=_Stop(keys, root_set))
    start = (np.arange(len(elems)), elems.astype(np.int64))
    requests: dict[Node, list[tuple[np.ndarray, np.ndarray]]] = {r: [start] for r in roots}
    found: dict[Hashable, list[tuple[np.ndarray, np.ndarray]]] = {}
    total = 0
    for node in reversed(order):
        reqs = requests.pop(node, None)
        if not reqs:
            continue
        size = max(1, node.tensor_type.size)
        combined = np.unique(np.concatenate([p * size + f for p, f in reqs])) if len(reqs) > 1 \
            else reqs[0][0] * size + reqs[0][1]
        pos, flat = combined // size, combined % size
        if node not in root_set and node in keys:
            if keys[node] is not None:
                found.setdefault(keys[node], []).append((pos, flat))
            continue
        if node.op in LEAVES:
            continue
        if total + len(flat) * _expansion(node) > cap:  # reductions repeat each element
            return None
        for src, sel, src_flat in numpy_source_map(node, flat):
            requests.setdefault(src, []).append((pos[sel], src_flat))
            total += len(src_flat)
            if total > cap:
                return None
    return {k: (np.concatenate([p for p, _ in v]), np.concatenate([f for _, f in v]))
            for k, v in found.items()}


def _expansion(node: Node) -> int:
    """Index pairs numpy_source_map makes per requested element (over all sources)."""
    if node.op is Op.MATMUL:
        return 2 * node.src[0].shape[-1]
    if node.op in (Op.SUM, Op.REDUCE_MAX, Op.ARGMAX):
        src = node.src[0]
        axes = node.arg[0] if node.op is not Op.ARGMAX else (node.arg,)  # type: ignore[index]
        return max(1, math.prod(src.shape[a] for a in axes))  # type: ignore[union-attr]
    return max(1, len(node.src))


def _partition(shape: Sequence[int], blocks: int) -> np.ndarray:
    """Owner of each element: contiguous column ranges of the last axis, all rows together."""
    size = math.prod(shape)
    if size == 0:
        return np.zeros(0, np.int32)
    last = shape[-1] if shape else 1
    cols = np.arange(size) % last
    return (cols * blocks // last).astype(np.int32)


def _table(owner: np.ndarray, blocks: int) -> np.ndarray:
    """(blocks, L) element lists, -1 padded, ascending (coalesced) within a block."""
    counts = np.bincount(owner, minlength=blocks) if len(owner) else np.zeros(blocks, int)
    width = max(1, int(counts.max()) if len(counts) else 1)
    table = np.full((blocks, width), -1, np.int32)
    for g in range(blocks):
        mine = np.nonzero(owner == g)[0]
        table[g, :len(mine)] = mine
    return table


@dataclass(eq=False)
class Schedule:
    """The plan of a persistent loop kernel, before any source is written: which block owns which
    elements, the stages of a step in order (with their grid barriers and what they read and write),
    which matmuls keep their weights in shared memory and how shared memory is laid out.
    `emit_loop(schedule, outer_materialized)` turns it into the kernel."""

    loop: Node
    blocks: int                                   # G
    threads: int
    sync: str                                     # "atomic" | "cg" (unused with one block)
    args: list[Node]                              # the body's arguments
    role: dict[Node, tuple[str, int]]             # argument -> ("const" | "carry" | "xs", index)
    outputs: list[Node]                           # the body's outputs (fused groups inlined)
    order: list[Node]                             # the body's nodes, in dependency order
    scratch: list[Node]                           # materialized per step (double buffered)
    smem: list[Node]                              # matmuls with resident weight slices, in order
    owners: dict[Node, np.ndarray]                # element -> block, per stage node
    stages: list[Stage]
    needed: dict[Node, list[set[int]]]            # smem matmul -> columns each block computes
    layout: dict[Node, tuple[int, int, int]]      # smem matmul -> (W offset, P offset, width)
    tiles: dict[Node, tuple[int, int]]            # smem matmul -> register tile (rows, cols)
    shared_bytes: int
    opaque: bool                                  # some stage's reads were too big to trace
    notes: list[str] = field(default_factory=list)

    @property
    def info(self) -> LoopInfo:
        return self.loop.arg  # type: ignore[return-value]

    @property
    def n_consts(self) -> int:
        return self.info.n_consts

    @property
    def n_carry(self) -> int:
        return self.info.n_carry

    @property
    def grid_syncs(self) -> int:
        """Grid barriers per step (none with one block: a block barrier does)."""
        return sum(st.grid_sync for st in self.stages) if self.blocks > 1 else 0

    def description(self) -> dict:
        G = self.blocks
        out = {
            "path": "persistent",
            "blocks": G, "threads": self.threads,
            "sync": ("none (one block)" if G == 1 else self.sync),
            "grid_syncs_per_step": self.grid_syncs,
            "shared_bytes": self.shared_bytes,
            "weights": {f"{p.src[0].shape}@{p.src[1].shape}": f"shared memory, {self.layout[p][2]} columns per block"
                        for p in self.smem},
            "inlined_matmuls": sum(1 for n in self.order if n.op is Op.MATMUL and n not in self.smem),
            "stages": [f"{'|grid| ' if st.grid_sync and G > 1 else ''}{st.kind} "
                       f"{'+'.join(n.op.value for n in st.nodes)}{list(st.node.shape)}" for st in self.stages],
            "opaque_trace": self.opaque,
        }
        if self.notes:
            out["notes"] = self.notes
        return out


class _Planner:
    """The plan step: classifies the body's nodes, assigns element owners, orders the stages, places
    grid barriers and lays out shared memory (`build() -> Schedule`); no source is written."""

    def __init__(self, loop: Node, options: LoopOptions, props: DeviceProps, blocks: int,
                 smem_matmuls: set[Node] | None) -> None:
        self.loop, self.info = loop, loop.arg  # type: ignore[assignment]
        self.options, self.props, self.G = options, props, blocks
        info: LoopInfo = loop.arg  # type: ignore[assignment]
        self.T, self.n_c, self.n_h = info.length, info.n_consts, info.n_carry
        self.outputs = inline_fused(list(info.body.outputs))
        self.args = list(info.body.inputs)
        self.role: dict[Node, tuple[str, int]] = {}
        for i, a in enumerate(self.args):
            self.role[a] = ("const", i) if i < self.n_c else ("carry", i - self.n_c) \
                if i < self.n_c + self.n_h else ("xs", i - self.n_c - self.n_h)
        self.order = toposort(self.outputs)
        self.invariant = self._invariant()
        self.smem = self._smem_candidates() if smem_matmuls is None else smem_matmuls
        self.scratch = self._scratch_nodes()
        self.smem_list = [n for n in self.order if n in self.smem]
        self.keys = self._keys()
        self.carry_outs = self.outputs[:self.n_h]
        self.owners: dict[Node, np.ndarray] = {}
        self.buffer_owner: dict[Hashable, np.ndarray] = {}

    # ---- classification --------------------------------------------------------------------

    def _invariant(self) -> set[Node]:
        inv: set[Node] = set()
        for n in self.order:
            if n.op is Op.CONST or (n.op is Op.ARG and self.role.get(n, ("",))[0] == "const") or \
                    (n.src and n.op is not Op.ARG and all(s in inv for s in n.src)):
                inv.add(n)
        return inv

    def _direct(self, node: Node) -> bool:
        """A view chain down to a carry or sequence argument (read straight from its buffer)."""
        while node.op in MOVEMENT and node.op not in (Op.PAD, Op.CONCAT):
            node = node.src[0]
        return node.op is Op.ARG and self.role[node][0] in ("carry", "xs")

    def _smem_candidates(self) -> set[Node]:
        if not self.options.smem_weights:
            return set()
        out: set[Node] = set()
        for n in self.order:
            if n.op is Op.MATMUL and n.ndim == 2 and n.src[0].ndim == 2 and n.src[1].ndim == 2 \
                    and n.src[1] in self.invariant and n.src[0] not in self.invariant \
                    and n.dtype in FLOAT_DTYPES and _view_base(n.src[0]) not in out:
                out.add(n)
        dtypes = {n.dtype for n in out}
        if len(dtypes) > 1:  # one dynamic shared array, one dtype
            keep = max(dtypes, key=lambda d: sum(1 for n in out if n.dtype == d))
            out = {n for n in out if n.dtype == keep}
        return out

    def _scratch_nodes(self) -> list[Node]:
        """Left operands of smem matmuls that are computed in the step (not views of an argument)."""
        scratch = {n.src[0] for n in self.order if n in self.smem and not self._direct(n.src[0])}
        return [n for n in self.order if n in scratch]

    def _keys(self) -> dict[Node, Hashable]:
        """The buffer each materialized body node lives in (None: always available)."""
        keys: dict[Node, Hashable] = {}
        for a, (kind, i) in self.role.items():
            keys[a] = ("carry", i) if kind == "carry" else None
        for i, n in enumerate(self.scratch):
            keys[n] = ("scratch", i)
        for i, n in enumerate(self.smem_list):
            keys[n] = ("P", i)
        return keys

    # ---- the plan --------------------------------------------------------------------------

    def build(self) -> Schedule:
        self._assign_owners()
        stages = self._stages()
        # exactly what each pointwise stage reads: all its elements, all its nodes in one trace
        stage_reads: dict[int, dict | None] = {}
        for st in stages:
            if st.kind == "pointwise":
                stage_reads[id(st)] = self._reads_of(st.nodes, np.arange(st.node.tensor_type.size), st.output)
        needed, opaque = self._needed_columns(stages, stage_reads)
        self._hazards(stages, stage_reads)
        self._place_syncs(stages)
        layout, tiles, shared_bytes = self._smem_layout(needed)
        return Schedule(self.loop, self.G, self.options.threads, self.options.sync, self.args, self.role,
                        self.outputs, self.order, self.scratch, self.smem_list, self.owners, stages,
                        needed, layout, tiles, shared_bytes, opaque)

    def _refresh_buffers(self) -> None:
        for k in range(self.n_h):
            if self.carry_outs[k] in self.owners:
                self.buffer_owner[("carry", k)] = self.owners[self.carry_outs[k]]
        for i, n in enumerate(self.scratch):
            if n in self.owners:
                self.buffer_owner[("scratch", i)] = self.owners[n]

    def _assign_owners(self) -> None:
        """Anchor carries first (column ranges), then scratch and the remaining outputs by vote."""
        shapes = Counter(o.shape for o in self.carry_outs if o.ndim >= 1)
        anchor = shapes.most_common(1)[0][0] if shapes else None
        for o in self.carry_outs:
            if o.shape == anchor:
                self.owners[o] = _partition(o.shape, self.G)
        self._refresh_buffers()
        for n in self.scratch:
            if n not in self.owners:
                self.owners[n] = self._vote(n, False)
                self._refresh_buffers()
        for n in dict.fromkeys(self.outputs):
            if n not in self.owners:
                self.owners[n] = self._vote(n, True)
                self._refresh_buffers()

    def _reads_of(self, nodes: Sequence[Node], elems: np.ndarray, as_output: bool) -> dict | None:
        """What computing `nodes` at `elems` reads. An output stage reads a node that is
        already materialized (argument, scratch, smem result) directly."""
        keys = self.keys
        direct = [n for n in nodes if as_output and n in keys]
        inline = [n for n in nodes if n not in direct]
        out: dict[Hashable, list] = {}
        for n in direct:
            if keys[n] is not None:
                out.setdefault(keys[n], []).append((np.arange(len(elems)), elems))
        if inline:
            traced = trace_reads(inline, elems, keys, self.options.trace_cap)
            if traced is None:
                return None
            for k, v in traced.items():
                out.setdefault(k, []).append(v)
        return {k: (np.concatenate([p for p, _ in v]), np.concatenate([f for _, f in v]))
                for k, v in out.items()}

    def _vote(self, n: Node, as_output: bool) -> np.ndarray:
        """Each column of n goes to the block owning most of what a sample of its elements
        (the first and last rows) reads: cheap, and columns keep their elements together."""
        G = self.G
        size = n.tensor_type.size
        default = _partition(n.shape, G)
        if G == 1 or size == 0:
            return default
        last = n.shape[-1] if n.ndim else 1
        sample = np.unique(np.concatenate([np.arange(min(size, last)),
                                           np.arange(max(0, size - last), size)]))
        reads = self._reads_of([n], sample, as_output)
        if reads is None:
            return default
        cols_all, own_all = [], []
        for key, (pos, flat) in reads.items():
            own = self.buffer_owner.get(key)
            if own is not None:
                cols_all.append(sample[pos] % last)
                own_all.append(own[flat])
        if not cols_all:
            return default
        pairs, counts = np.unique(np.concatenate(cols_all).astype(np.int64) * G +
                                  np.concatenate(own_all), return_counts=True)
        col, own = pairs // G, (pairs % G).astype(np.int32)
        order = np.lexsort((-counts, col))          # by column, most votes first
        first = np.ones(len(order), bool)
        first[1:] = col[order][1:] != col[order][:-1]
        col_owner = default[:last].copy()
        col_owner[col[order][first]] = own[order][first]
        return col_owner[np.arange(size) % last].astype(np.int32)

    def _stages(self) -> list[Stage]:
        """Scratch and smem matmul stages in dependency order, then the output stages: one loop for
        all outputs with the same element owners (shared subexpressions computed once); a scratch
        value that is also an output is stored by its scratch stage."""
        stages: list[Stage] = []
        for n in self.order:
            if n in self.scratch:
                stages.append(Stage("pointwise", [n]))
            elif n in self.smem:
                stages.append(Stage("matmul", [n]))
        out_stages: list[Stage] = []
        for n in dict.fromkeys(self.outputs):
            if n in self.scratch:
                continue
            same = next((st for st in out_stages if st.node.shape == n.shape and
                         np.array_equal(self.owners[st.node], self.owners[n])), None)
            if same is None:
                out_stages.append(Stage("pointwise", [n], output=True))
            else:
                same.nodes.append(n)
        return stages + out_stages

    def _needed_columns(self, stages: list[Stage], stage_reads: dict[int, dict | None]
                        ) -> tuple[dict[Node, list[set[int]]], bool]:
        """Columns of each smem result a block needs (all of them when a trace was too big)."""
        G = self.G
        needed: dict[Node, list[set[int]]] = {p: [set() for _ in range(G)] for p in self.smem_list}
        opaque = False
        for st in stages:
            if st.kind != "pointwise":
                continue
            reads = stage_reads[id(st)]
            if reads is None:
                opaque = True
                continue
            own = self.owners[st.node]
            for i, p in enumerate(self.smem_list):
                if ("P", i) in reads:
                    pos, flat = reads[("P", i)]
                    cols = flat % p.shape[-1]
                    blocks = own[pos]
                    for g in range(G):
                        needed[p][g].update(np.unique(cols[blocks == g]).tolist())
        if opaque:
            for p in self.smem_list:
                needed[p] = [set(range(p.shape[-1])) for _ in range(G)]
        return needed, opaque

    def _hazards(self, stages: list[Stage], stage_reads: dict[int, dict | None]) -> None:
        """What each stage reads and writes, and whether each read is of elements its own block
        wrote (local), for the barrier placement."""
        G, keys = self.G, self.keys
        out_keys: dict[Node, list[Hashable]] = {}
        for k, o in enumerate(self.carry_outs):
            out_keys.setdefault(o, []).append(("carry", k))
        for i, n in enumerate(self.scratch):
            out_keys.setdefault(n, []).append(("scratch", i))
        all_keys = [("carry", k) for k in range(self.n_h)] + [("scratch", i) for i in range(len(self.scratch))]
        for st in stages:
            n = st.node
            if st.kind == "matmul":
                a_reads = trace_reads([n.src[0]], np.arange(n.src[0].tensor_type.size), keys,
                                      self.options.trace_cap) \
                    if n.src[0] not in keys else {keys[n.src[0]]: (None, None)}
                for key in (all_keys if a_reads is None else [k for k in a_reads if k is not None]):
                    if key[0] in ("carry", "scratch"):
                        st.reads.append((key, "prev" if key[0] == "carry" else "cur", G == 1))
                continue
            reads = stage_reads[id(st)]
            own = self.owners[st.node]
            if reads is None:
                st.reads += [(key, "prev" if key[0] == "carry" else "cur", G == 1) for key in all_keys]
            else:
                for key, (pos, flat) in reads.items():
                    if key is None or key[0] == "P":
                        continue
                    src_own = self.buffer_owner.get(key)
                    local = G == 1 or (src_own is not None and bool(np.all(src_own[flat] == own[pos])))
                    st.reads.append((key, "prev" if key[0] == "carry" else "cur", local))
            for n in st.nodes:
                for key in out_keys.get(n, []):
                    st.writes.append((key, "next" if key[0] == "carry" else "cur"))

    def _smem_layout(self, needed: dict[Node, list[set[int]]]
                     ) -> tuple[dict[Node, tuple[int, int, int]], dict[Node, tuple[int, int]], int]:
        """Per smem matmul, its W slice (K x L) then P (M x L); _SmemTooBig when it does not fit."""
        itemsize = np.dtype(self.smem_list[0].dtype).itemsize if self.smem_list else 4
        layout: dict[Node, tuple[int, int, int]] = {}  # node -> (w offset, p offset, L) in elements
        tiles: dict[Node, tuple[int, int]] = {}
        offset = 0
        for p in self.smem_list:
            m, k = p.src[0].shape
            rows, cols = _register_tile(m, max(1, max(len(c) for c in needed[p])), self.options.threads)
            tiles[p] = (rows, cols)
            # columns padded to a multiple of the per-thread column count (pad columns hold zeros)
            width = math.ceil(max(1, max(len(c) for c in needed[p])) / cols) * cols
            layout[p] = (offset, offset + k * width, width)
            offset += k * width + m * width
        shared_bytes = offset * itemsize
        if shared_bytes > self.props.max_shared_bytes:
            raise _SmemTooBig(shared_bytes)
        return layout, tiles, shared_bytes

    def _place_syncs(self, stages: list[Stage]) -> None:
        """Grid barriers where another block's writes must be visible (RAW) or another block may
        still read what is about to be overwritten (WAR); simulated over a few steps since carries
        and scratch values alternate between two buffers by step parity."""
        if self.G == 1:
            return
        for _ in range(len(stages) + 1):
            need = self._simulate(stages)
            if need is None:
                return
            stages[need].grid_sync = True
        raise AssertionError("sync placement did not converge")

    @staticmethod
    def _simulate(stages: list[Stage]) -> int | None:
        dirty: set[tuple] = set()
        foreign: set[tuple] = set()
        for step in range(4):
            par = {"prev": step % 2, "cur": step % 2, "next": (step + 1) % 2}
            for i, st in enumerate(stages):
                if st.grid_sync:
                    dirty.clear()
                    foreign.clear()
                for key, rel, local in st.reads:
                    if not local and (key, par[rel]) in dirty:
                        return i
                for key, rel in st.writes:
                    if (key, par[rel]) in foreign:
                        return i
                for key, rel, local in st.reads:
                    if not local:
                        foreign.add((key, par[rel]))
                for key, rel in st.writes:
                    dirty.add((key, par[rel]))
        return None


def _smem_tables(sc: Schedule, p: Node) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For smem matmul p, per block: the columns it computes (-1 padded), each column's slot in
    its slice (-1: not computed there), and how many it computes."""
    G, width, n_cols = sc.blocks, sc.layout[p][2], p.shape[-1]
    cols = np.full((G, width), -1, np.int32)
    slots = np.full((G, n_cols), -1, np.int32)
    for g in range(G):
        mine = sorted(sc.needed[p][g])
        cols[g, :len(mine)] = mine
        slots[g, mine] = np.arange(len(mine))
    return cols, slots, np.array([len(sc.needed[p][g]) for g in range(G)], np.int32)


def emit_loop(schedule: Schedule, outer_materialized: Callable[[Node], bool]) -> KernelSpec:
    """The emit step: the persistent kernel's source for a Schedule. Loop sources for which
    `outer_materialized` is false are computed in the kernel from the outer graph's nodes."""
    return _LoopWriter(schedule, outer_materialized).kernel()


class _LoopWriter:
    """Writes one Schedule as a kernel: parameters and tables, the prologue (resident weights,
    carry init), the time loop of stages with their barriers, and the epilogue (final carries)."""

    def __init__(self, sc: Schedule, outer_materialized: Callable[[Node], bool]) -> None:
        self.sc = sc
        self.outer_mat = outer_materialized
        self.G, self.NT, self.T = sc.blocks, sc.threads, sc.info.length
        self.n_c, self.n_h = sc.n_consts, sc.n_carry
        self.params: list[tuple[str, str, tuple]] = []
        self.constants: dict[Hashable, np.ndarray] = {}
        self.scratch: dict[Hashable, tuple[int, str]] = {}
        self.names: dict[tuple, str] = {}
        self.checks: dict[Hashable, Node] = {}
        self.current_root: Node | None = None
        self.body_nodes = set(sc.order)
        self.source_of = dict(zip(sc.args, sc.loop.src))
        self.em = Emitter(self.access, level=1, check=self.check)

    # ---- parameters ----------------------------------------------------------------------------

    def param(self, name: str, dtype: str, ref: tuple) -> str:
        if ref not in self.names:
            self.names[ref] = name
            self.params.append((name, dtype, ref))
        return self.names[ref]

    def table(self, name: str, data: np.ndarray) -> str:
        key = (self.sc.loop, name)
        self.constants[key] = np.ascontiguousarray(data, np.int32).reshape(-1)
        return self.param(name, "int32", ("const", key))

    def buffer(self, name: str, size: int, dtype: str) -> str:
        key = (self.sc.loop, name)
        self.scratch[key] = (max(1, size), dtype)
        return self.param(name, dtype, ("scratch", key))

    def check(self, node: Node) -> str:
        """The error buffer of an inlined onehot (registered when first used)."""
        key = check_key(node)
        self.checks[key] = node
        self.scratch[key] = (CHECK_SIZE, CHECK_DTYPE)
        return self.param(f"err{len(self.checks) - 1}", CHECK_DTYPE, ("scratch", key))

    def _declare(self) -> None:
        """Parameters registered up front, in a fixed order: loop sources in buffers, carry and
        scratch double buffers, owner tables, smem column tables, the barrier word."""
        sc, G = self.sc, self.G
        # loop sources in buffers are parameters; the others (constants, views such as W.T or the
        # gate slices of the hoisted projection) are computed in place from the outer graph
        self.arg_name: dict[Node, str] = {}
        for i, a in enumerate(sc.args):
            kind, j = sc.role[a]
            src = sc.loop.src[i]
            if kind in ("const", "xs") and self.outer_mat(src):
                self.arg_name[a] = self.param(f"{'c' if kind == 'const' else 'x'}{j}", a.dtype, ("node", src))
        self.carry_buf = [self.buffer(f"hb{k}", 2 * sc.args[self.n_c + k].tensor_type.size,
                                      sc.args[self.n_c + k].dtype) for k in range(self.n_h)]
        self.scratch_buf = [self.buffer(f"sb{i}", 2 * n.tensor_type.size, n.dtype)
                            for i, n in enumerate(sc.scratch)]
        self.tabs: dict[Node, str] = {}
        for st in sc.stages:
            if st.kind == "pointwise" and st.node not in self.tabs:
                name = self.table(f"own{len(set(self.tabs.values()))}", _table(sc.owners[st.node], G))
                for n in st.nodes:
                    self.tabs[n] = name
        self.pcols, self.pslot, self.pcount = {}, {}, {}
        for i, p in enumerate(sc.smem):
            cols, slots, counts = _smem_tables(sc, p)
            self.pcols[p] = self.table(f"pcol{i}", cols)
            self.pslot[p] = self.table(f"pslot{i}", slots)
            self.pcount[p] = self.table(f"pcnt{i}", counts)
        self.bar = self.buffer("bar", 2, "int32") if G > 1 and sc.sync == "atomic" else None
        self.smem_dtype = sc.smem[0].dtype if sc.smem else None

    # ---- loads -----------------------------------------------------------------------------------

    def access(self, n: Node):
        """How the kernel loads n: a buffer, shared memory or the outer graph (None: inline it)."""
        sc = self.sc
        if n is self.current_root and n in sc.scratch:
            return None
        if n not in self.body_nodes:  # a node of the outer graph, inside an inlined loop source
            if n.op is Op.CONST or not (self.outer_mat(n) or n.op in (Op.INPUT, Op.PARAM)):
                return None
            name = self.param(f"o{len(self.params)}", n.dtype, ("node", n))
            return lambda ix: f"{name}[{flat_offset(ix, n.shape)}]"
        if n.op is Op.ARG:
            return self._arg_access(n)
        if n in sc.scratch:
            i = sc.scratch.index(n)
            size = n.tensor_type.size
            return lambda ix: f"{self.scratch_buf[i]}[p * {size} + {flat_offset(ix, n.shape)}]"
        if n in sc.smem:
            _, poff, width = sc.layout[n]
            n_cols = n.shape[-1]
            return lambda ix: (f"sm[{poff} + {ix[0]} * {width} + "
                               f"{self.pslot[n]}[g * {n_cols} + {ix[1]}]]")
        return None

    def _arg_access(self, n: Node):
        kind, j = self.sc.role[n]
        size = n.tensor_type.size
        em = self.em
        if kind in ("const", "xs") and n not in self.arg_name:
            src = self.source_of[n]
            return (lambda ix: em.value(src, ix)) if kind == "const" else \
                (lambda ix: em.value(src, ("t",) + tuple(ix)))
        if kind == "const":
            return lambda ix: f"{self.arg_name[n]}[{flat_offset(ix, n.shape)}]"
        if kind == "xs":
            return lambda ix: f"{self.arg_name[n]}[t * {size} + {flat_offset(ix, n.shape)}]"
        return lambda ix: f"{self.carry_buf[j]}[p * {size} + {flat_offset(ix, n.shape)}]"

    # ---- the kernel ------------------------------------------------------------------------------

    def kernel(self) -> KernelSpec:
        sc, em, G, NT, T = self.sc, self.em, self.G, self.NT, self.T
        self._declare()
        em.line("g = cuda.blockIdx.x")
        em.line("tid = cuda.threadIdx.x")
        if sc.smem:
            em.line(f"sm = cuda.shared.array(0, {NUMBA_TYPES[self.smem_dtype]})")
        if G > 1 and sc.sync == "cg":
            em.line("grid = cuda.cg.this_grid()")
        if self.bar is not None:  # read before this block's first arrival: every block reads the same value
            em.line(f"gen = cuda.atomic.add({self.bar}, 1, 0)")
        self._prologue()
        self._time_loop()
        self._epilogue()
        name = f"persistent_{'bwd' if sc.info.reverse else 'fwd'}"
        # parameter order: as registered
        body = f"def {name}({', '.join(p for p, _, _ in self.params)}):\n" + "\n".join(em.lines) + "\n"
        return KernelSpec(name, body, self.params, (G,), NT, shared_bytes=sc.shared_bytes, scratch=self.scratch,
                          zeroed=frozenset({(sc.loop, "bar")}) if self.bar else frozenset(),
                          constants=self.constants, checks=self.checks,
                          note=f"persistent loop T={T}, {G} block(s) x {NT} threads")

    def grid_sync(self) -> None:
        em, G = self.em, self.G
        if G == 1:
            em.line("cuda.syncthreads()")
        elif self.sc.sync == "cg":
            em.line("grid.sync()")
        else:
            # bar[0] counts arrivals, bar[1] is the generation; the last block to arrive resets
            # the count and bumps the generation, the others wait for it (self-resetting, so a
            # launch or a CUDA-graph replay needs no reset). `gen` is this block's copy.
            bar = self.bar
            em.line("cuda.syncthreads()")
            with em.block("if tid == 0:"):
                em.line("cuda.threadfence()")
                with em.block(f"if cuda.atomic.add({bar}, 0, 1) == {G - 1}:"):
                    em.line(f"cuda.atomic.exch({bar}, 0, 0)")
                    em.line("cuda.threadfence()")
                    em.line(f"cuda.atomic.add({bar}, 1, 1)")
                with em.block("else:"):
                    with em.block(f"while cuda.atomic.add({bar}, 1, 0) == gen:"):
                        em.line("cuda.nanosleep(20)")
                em.line("gen += 1")
                em.line("cuda.threadfence()")
            em.line("cuda.syncthreads()")

    def _prologue(self) -> None:
        """Resident weight slices into shared memory, carry init into parity 0."""
        sc, em, NT = self.sc, self.em, self.NT
        for p in sc.smem:
            woff, _, width = sc.layout[p]
            w_node = p.src[1]
            k_dim = p.src[0].shape[1]
            with em.block(f"for w in range(tid, {k_dim * width}, {NT}):"):
                em.line(f"kk = w // {width}")
                em.line(f"cc = w % {width}")
                em.line(f"n = {self.pcols[p]}[g * {width} + cc]")
                em.line(f"wv = {literal(0, self.smem_dtype)}")
                with em.block("if n >= 0:"):
                    em.line(f"wv = {em.value(w_node, ('kk', 'n'))}")
                em.line(f"sm[{woff} + w] = wv")
        carry_outs = sc.outputs[:self.n_h]
        for k in range(self.n_h):
            init = sc.loop.src[self.n_c + k]

            def copy_init(e: str, k: int = k, init: Node = init) -> list[str]:
                if self.outer_mat(init):
                    return [f"{self.carry_buf[k]}[{e}] = {self.param(f'h{k}', init.dtype, ('node', init))}[{e}]"]
                idx = tuple(em.bind(x, "i") for x in unravel(e, init.shape))
                return [f"{self.carry_buf[k]}[{e}] = {em.value(init, idx)}"]
            self._owned_loop(self.tabs[carry_outs[k]], sc.owners[carry_outs[k]], copy_init)
        self.grid_sync()

    def _time_loop(self) -> None:
        sc, em, T = self.sc, self.em, self.T
        with em.block(f"for s in range({T}):"):
            em.line(f"t = {T - 1} - s" if sc.info.reverse else "t = s")
            em.line("p = s & 1")
            em.line("q = 1 - p")
            for st in sc.stages:
                if st.grid_sync and self.G > 1:
                    self.grid_sync()
                else:
                    em.line("cuda.syncthreads()")
                with em.scope():
                    if st.kind == "matmul":
                        self._matmul_stage(st.node)
                    else:
                        self.current_root = None if st.output else st.node
                        self._pointwise_stage(st)
                        self.current_root = None
            em.line("cuda.syncthreads()")

    def _epilogue(self) -> None:
        """Final carries from the last written parity (owner-local)."""
        sc = self.sc
        last = self.T % 2
        carry_outs = sc.outputs[:self.n_h]
        for k in range(self.n_h):
            arg = sc.args[self.n_c + k]
            size = arg.tensor_type.size
            fin = self.param(f"f{k}", arg.dtype, ("node", proj(sc.loop, k)))
            self._owned_loop(self.tabs[carry_outs[k]], sc.owners[carry_outs[k]],
                             lambda e, k=k, fin=fin, size=size: [f"{fin}[{e}] = {self.carry_buf[k]}[{last * size} + {e}]"])

    def _owned_loop(self, tab: str, owner: np.ndarray, body) -> None:
        """For each element this block owns: the statements body(e) returns (it may emit more)."""
        em = self.em
        width = max(1, int(np.bincount(owner).max()) if len(owner) else 1)
        with em.block(f"for kq in range(tid, {width}, {self.NT}):"):
            em.line(f"e = {tab}[g * {width} + kq]")
            with em.block("if e >= 0:"):
                for line in body("e"):
                    em.line(line)

    def _stores(self, st: Stage) -> list[tuple[Node, list[str]]]:
        """Per node of a pointwise stage: where its element e goes (scratch, carry, per-step output)."""
        sc = self.sc
        stores: list[tuple[Node, list[str]]] = []
        for n in st.nodes:
            size = n.tensor_type.size
            dests: list[str] = []
            if n in sc.scratch and not st.output:
                dests.append(f"{self.scratch_buf[sc.scratch.index(n)]}[p * {size} + e]")
            for pos, o in enumerate(sc.outputs):  # the body outputs n is (scratch stages store them too)
                if o is not n:
                    continue
                if pos < self.n_h:
                    dests.append(f"{self.carry_buf[pos]}[q * {size} + e]")
                else:
                    y = self.param(f"y{pos - self.n_h}", o.dtype, ("node", proj(sc.loop, pos)))
                    dests.append(f"{y}[t * {size} + e]")
            if dests:
                stores.append((n, dests))
        return stores

    def _pointwise_stage(self, st: Stage) -> None:
        em = self.em
        first = st.node
        stores = self._stores(st)
        if not stores:
            return
        size = first.tensor_type.size
        width = max(1, int(np.bincount(self.sc.owners[first]).max()) if size else 1)
        with em.block(f"for kq in range(tid, {width}, {self.NT}):"):
            em.line(f"e = {self.tabs[first]}[g * {width} + kq]")
            with em.block("if e >= 0:"):
                idx = tuple(em.bind(x, "i") for x in unravel("e", first.shape))
                for n, dests in stores:
                    v = em.value(n, idx)
                    for d in dests:
                        em.line(f"{d} = {v}")

    def _matmul_stage(self, p: Node) -> None:
        """P[:, my columns] = A @ W[:, my columns], W's slice resident in shared memory. Each thread
        accumulates a rows x cols register tile (rows strided by 1, columns by width / cols so a
        warp's shared-memory reads hit distinct banks), reusing each A load `cols` times."""
        em = self.em
        a = p.src[0]
        m_dim, k_dim = a.shape
        woff, poff, width = self.sc.layout[p]
        rows, cols = self.sc.tiles[p]
        wc = width // cols
        groups = math.ceil(m_dim / rows)
        zero = literal(0, p.dtype)
        with em.block(f"for w in range(tid, {groups * wc}, {self.NT}):"):
            em.line(f"mb = (w // {wc}) * {rows}")
            em.line(f"cl = w % {wc}")
            with em.block(f"if cl < {self.pcount[p]}[g]:"):
                for r in range(rows):
                    for j in range(cols):
                        em.line(f"acc{r}_{j} = {zero}")
                with em.block(f"for kk in range({k_dim}):"):
                    for j in range(cols):
                        em.line(f"wv{j} = sm[{woff} + kk * {width} + cl + {j * wc}]")
                    for r in range(rows):
                        row = "mb" if r == 0 else f"min(mb + {r}, {m_dim - 1})"
                        av = em.value(a, (row, "kk"))
                        for j in range(cols):
                            em.line(f"acc{r}_{j} += {av} * wv{j}")
                for r in range(rows):
                    row = "mb" if r == 0 else f"mb + {r}"
                    guard = r > 0 and m_dim % rows != 0
                    with (em.block(f"if {row} < {m_dim}:") if guard else em.scope()):
                        for j in range(cols):
                            em.line(f"sm[{poff} + ({row}) * {width} + cl + {j * wc}] = acc{r}_{j}")


def _register_tile(m: int, width: int, threads: int) -> tuple[int, int]:
    """Rows x columns of P per thread in a smem matmul: the largest tile that still gives every
    thread of the block work (more reuse of each load per multiply-add), at most 8 x 4."""
    best = (1, 1)
    for rows in (8, 4, 2, 1):
        for cols in (4, 2, 1):
            if rows > m or cols > width:
                continue
            items = math.ceil(m / rows) * math.ceil(width / cols)
            if items >= threads and rows * cols > best[0] * best[1]:
                best = (rows, cols)
    return best


class _SmemTooBig(Exception):
    pass


def _view_base(node: Node) -> Node:
    while node.op in MOVEMENT and node.op not in (Op.PAD, Op.CONCAT):
        node = node.src[0]
    return node


def check_persistent(loop: Node) -> None:
    """Raise NotPersistent when the body holds something a persistent kernel cannot run."""
    info: LoopInfo = loop.arg  # type: ignore[assignment]
    if info.length == 0:
        raise NotPersistent("zero-length loop")
    for n in toposort(inline_fused(list(info.body.outputs))):
        if n.op is Op.LOOP:
            raise NotPersistent("nested loop in the body")
        if n.op not in INLINE_OPS and n.op is not Op.ARG:
            raise NotPersistent(f"{n.op.value} in the body")
        if not isinstance(n.type, tuple) and n.dtype not in NUMBA_TYPES:
            raise NotPersistent(f"dtype {n.dtype}")


def _step_work(loop: Node) -> int:
    info: LoopInfo = loop.arg  # type: ignore[assignment]
    work = 0
    for n in toposort(inline_fused(list(info.body.outputs))):
        if n.op is Op.MATMUL:
            work += n.tensor_type.size * n.src[0].shape[-1]
        elif n.op is not Op.ARG and not isinstance(n.type, tuple):
            work += n.tensor_type.size
    return work


def schedule_loop(loop: Node, options: LoopOptions = LoopOptions(), props: DeviceProps = DeviceProps()
                  ) -> Schedule:
    """The plan step for `loop` (no source): the block count, and resident weights given up one by
    one (biggest first) until shared memory fits. NotPersistent with the reason when it cannot run
    as one persistent kernel."""
    check_persistent(loop)
    info: LoopInfo = loop.arg  # type: ignore[assignment]
    outs = inline_fused(list(info.body.outputs))
    carry_dims = [o.shape[-1] for o in outs[:info.n_carry] if o.ndim >= 1]
    max_g = max(1, min(props.sm_count, max(carry_dims) if carry_dims else 1))
    if props.simulator:
        blocks = 1
    elif options.blocks:
        blocks = max(1, min(options.blocks, max_g))
    else:
        blocks = max(1, min(max_g, math.ceil(_step_work(loop) / options.work_per_block)))
    smem: set[Node] | None = None
    tried = []
    while True:
        planner = _Planner(loop, options, props, blocks, smem)
        try:
            schedule = planner.build()
            schedule.notes = tried
            return schedule
        except _SmemTooBig as err:
            tried.append(f"{blocks} blocks need {err.args[0]} bytes of shared memory")
            if blocks < max_g and not options.blocks and not props.simulator:
                blocks = min(max_g, blocks * 2)
                continue
            if not planner.smem:
                raise NotPersistent("shared memory too small even without resident weights")
            # give up residency for the biggest weight (read it from L2 instead)
            biggest = max(planner.smem, key=lambda n: n.src[1].tensor_type.size)
            smem = set(planner.smem) - {biggest}


def plan_loop(loop: Node, options: LoopOptions = LoopOptions(), props: DeviceProps = DeviceProps(),
              outer_materialized: Callable[[Node], bool] = lambda n: True) -> LoopPlan:
    """The persistent kernel for `loop` (plan step, then emit step), or NotPersistent with the
    reason. Loop sources for which `outer_materialized` is false are computed in the kernel from
    the outer graph's nodes."""
    schedule = schedule_loop(loop, options, props)
    spec = emit_loop(schedule, outer_materialized)
    return LoopPlan(spec, schedule.blocks, schedule.threads, schedule.description(), schedule)
