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
    INLINE_OPS,
    NUMBA_TYPES,
    Emitter,
    flat_offset,
    inline_fused,
    numpy_source_map,
    unravel,
)
from .kernels import KernelSpec


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


class _Planner:
    def __init__(self, loop: Node, options: LoopOptions, props: DeviceProps, blocks: int,
                 smem_matmuls: set[Node] | None, outer_materialized: Callable[[Node], bool]) -> None:
        self.loop, self.info = loop, loop.arg  # type: ignore[assignment]
        self.outer_mat = outer_materialized
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

    # ---- the plan --------------------------------------------------------------------------

    def build(self) -> LoopPlan:
        G = self.G
        keys: dict[Node, Hashable] = {}
        for a, (kind, i) in self.role.items():
            keys[a] = ("carry", i) if kind == "carry" else None
        for i, n in enumerate(self.scratch):
            keys[n] = ("scratch", i)
        smem_list = [n for n in self.order if n in self.smem]
        for i, n in enumerate(smem_list):
            keys[n] = ("P", i)
        self.keys = keys
        out_nodes = list(dict.fromkeys(self.outputs))
        cap = self.options.trace_cap

        # owners: anchor carries first, then scratch and the remaining outputs by majority vote
        owners: dict[Node, np.ndarray] = {}
        carry_outs = self.outputs[:self.n_h]
        shapes = Counter(o.shape for o in carry_outs if o.ndim >= 1)
        anchor = shapes.most_common(1)[0][0] if shapes else None
        for o in carry_outs:
            if o.shape == anchor:
                owners[o] = _partition(o.shape, G)
        buffer_owner: dict[Hashable, np.ndarray] = {}

        def refresh_buffers() -> None:
            for k in range(self.n_h):
                if carry_outs[k] in owners:
                    buffer_owner[("carry", k)] = owners[carry_outs[k]]
            for i, n in enumerate(self.scratch):
                if n in owners:
                    buffer_owner[("scratch", i)] = owners[n]
        refresh_buffers()
        def reads_of(nodes: Sequence[Node], elems: np.ndarray, as_output: bool) -> dict | None:
            """What computing `nodes` at `elems` reads. An output stage reads a node that is
            already materialized (argument, scratch, smem result) directly."""
            direct = [n for n in nodes if as_output and n in keys]
            inline = [n for n in nodes if n not in direct]
            out: dict[Hashable, list] = {}
            for n in direct:
                if keys[n] is not None:
                    out.setdefault(keys[n], []).append((np.arange(len(elems)), elems))
            if inline:
                traced = trace_reads(inline, elems, keys, cap)
                if traced is None:
                    return None
                for k, v in traced.items():
                    out.setdefault(k, []).append(v)
            return {k: (np.concatenate([p for p, _ in v]), np.concatenate([f for _, f in v]))
                    for k, v in out.items()}

        def vote(n: Node, as_output: bool) -> np.ndarray:
            """Each column of n goes to the block owning most of what a sample of its elements
            (the first and last rows) reads: cheap, and columns keep their elements together."""
            size = n.tensor_type.size
            default = _partition(n.shape, G)
            if G == 1 or size == 0:
                return default
            last = n.shape[-1] if n.ndim else 1
            sample = np.unique(np.concatenate([np.arange(min(size, last)),
                                               np.arange(max(0, size - last), size)]))
            reads = reads_of([n], sample, as_output)
            if reads is None:
                return default
            cols_all, own_all = [], []
            for key, (pos, flat) in reads.items():
                own = buffer_owner.get(key)
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

        for n in self.scratch:
            if n not in owners:
                owners[n] = vote(n, False)
                refresh_buffers()
        for n in out_nodes:
            if n not in owners:
                owners[n] = vote(n, True)
                refresh_buffers()

        # stages in dependency order
        stages: list[Stage] = []
        for n in self.order:
            if n in self.scratch:
                stages.append(Stage("pointwise", [n]))
            elif n in self.smem:
                stages.append(Stage("matmul", [n]))
        # a scratch value that is also an output is stored by its scratch stage
        # one loop for all outputs with the same element owners: shared subexpressions computed once
        out_stages: list[Stage] = []
        for n in out_nodes:
            if n in self.scratch:
                continue
            same = next((st for st in out_stages if st.node.shape == n.shape and
                         np.array_equal(owners[st.node], owners[n])), None)
            if same is None:
                out_stages.append(Stage("pointwise", [n], output=True))
            else:
                same.nodes.append(n)
        stages += out_stages

        # exactly what each pointwise stage reads: all its elements, all its nodes in one trace
        stage_reads: dict[int, dict | None] = {}
        for st in stages:
            if st.kind == "pointwise":
                stage_reads[id(st)] = reads_of(st.nodes, np.arange(st.node.tensor_type.size), st.output)

        # columns of each smem result a block needs
        needed: dict[Node, list[set[int]]] = {p: [set() for _ in range(G)] for p in smem_list}
        opaque = False
        for st in stages:
            if st.kind != "pointwise":
                continue
            reads = stage_reads[id(st)]
            if reads is None:
                opaque = True
                continue
            own = owners[st.node]
            for i, p in enumerate(smem_list):
                if ("P", i) in reads:
                    pos, flat = reads[("P", i)]
                    cols = flat % p.shape[-1]
                    blocks = own[pos]
                    for g in range(G):
                        needed[p][g].update(np.unique(cols[blocks == g]).tolist())
        if opaque:
            for p in smem_list:
                needed[p] = [set(range(p.shape[-1])) for _ in range(G)]

        # hazards: what each stage reads and writes, local or not
        self.stage_out_keys: dict[Node, list[Hashable]] = {}
        for k, o in enumerate(carry_outs):
            self.stage_out_keys.setdefault(o, []).append(("carry", k))
        for i, n in enumerate(self.scratch):
            self.stage_out_keys.setdefault(n, []).append(("scratch", i))
        all_keys = [("carry", k) for k in range(self.n_h)] + [("scratch", i) for i in range(len(self.scratch))]
        for st in stages:
            n = st.node
            if st.kind == "matmul":
                a_reads = trace_reads([n.src[0]], np.arange(n.src[0].tensor_type.size), keys, cap) \
                    if n.src[0] not in keys else {keys[n.src[0]]: (None, None)}
                for key in (all_keys if a_reads is None else [k for k in a_reads if k is not None]):
                    if key[0] in ("carry", "scratch"):
                        st.reads.append((key, "prev" if key[0] == "carry" else "cur", G == 1))
                continue
            reads = stage_reads[id(st)]
            own = owners[st.node]
            if reads is None:
                st.reads += [(key, "prev" if key[0] == "carry" else "cur", G == 1) for key in all_keys]
            else:
                for key, (pos, flat) in reads.items():
                    if key is None or key[0] == "P":
                        continue
                    src_own = buffer_owner.get(key)
                    local = G == 1 or (src_own is not None and bool(np.all(src_own[flat] == own[pos])))
                    st.reads.append((key, "prev" if key[0] == "carry" else "cur", local))
            for n in st.nodes:
                for key in self.stage_out_keys.get(n, []):
                    st.writes.append((key, "next" if key[0] == "carry" else "cur"))
        self._place_syncs(stages)

        # shared memory layout: per smem matmul, W slice (K x L) then P (M x L)
        itemsize = np.dtype(smem_list[0].dtype).itemsize if smem_list else 4
        layout: dict[Node, tuple[int, int, int]] = {}  # node -> (w offset, p offset, L) in elements
        self.tiles: dict[Node, tuple[int, int]] = {}
        offset = 0
        for p in smem_list:
            m, k = p.src[0].shape
            rows, cols = _register_tile(m, max(1, max(len(c) for c in needed[p])), self.options.threads)
            self.tiles[p] = (rows, cols)
            # columns padded to a multiple of the per-thread column count (pad columns hold zeros)
            width = math.ceil(max(1, max(len(c) for c in needed[p])) / cols) * cols
            layout[p] = (offset, offset + k * width, width)
            offset += k * width + m * width
        shared_bytes = offset * itemsize
        if shared_bytes > self.props.max_shared_bytes:
            raise _SmemTooBig(shared_bytes)

        spec = self._source(stages, owners, needed, layout, shared_bytes, smem_list)
        grid_syncs = sum(st.grid_sync for st in stages)
        description = {
            "path": "persistent",
            "blocks": G, "threads": self.options.threads,
            "sync": ("none (one block)" if G == 1 else self.options.sync),
            "grid_syncs_per_step": grid_syncs if G > 1 else 0,
            "shared_bytes": shared_bytes,
            "weights": {f"{p.src[0].shape}@{p.src[1].shape}": f"shared memory, {layout[p][2]} columns per block"
                        for p in smem_list},
            "inlined_matmuls": sum(1 for n in self.order if n.op is Op.MATMUL and n not in self.smem),
            "stages": [f"{'|grid| ' if st.grid_sync and G > 1 else ''}{st.kind} "
                       f"{'+'.join(n.op.value for n in st.nodes)}{list(st.node.shape)}" for st in stages],
            "opaque_trace": opaque,
        }
        return LoopPlan(spec, G, self.options.threads, description)

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

    # ---- source --------------------------------------------------------------------------------

    def _source(self, stages: list[Stage], owners: dict[Node, np.ndarray],
                needed: dict[Node, list[set[int]]], layout: dict[Node, tuple[int, int, int]],
                shared_bytes: int, smem_list: list[Node]) -> KernelSpec:
        G, NT, T = self.G, self.options.threads, self.T
        loop = self.loop
        params: list[tuple[str, str, tuple]] = []
        constants: dict[Hashable, np.ndarray] = {}
        scratch: dict[Hashable, tuple[int, str]] = {}
        names: dict[tuple, str] = {}

        def param(name: str, dtype: str, ref: tuple) -> str:
            if ref not in names:
                names[ref] = name
                params.append((name, dtype, ref))
            return names[ref]

        def table(name: str, data: np.ndarray) -> str:
            key = (loop, name)
            constants[key] = np.ascontiguousarray(data, np.int32).reshape(-1)
            return param(name, "int32", ("const", key))

        def buffer(name: str, size: int, dtype: str) -> str:
            key = (loop, name)
            scratch[key] = (max(1, size), dtype)
            return param(name, dtype, ("scratch", key))

        # loop sources in buffers are parameters; the others (constants, views such as W.T or the
        # gate slices of the hoisted projection) are computed in place from the outer graph
        arg_name: dict[Node, str] = {}
        for i, a in enumerate(self.args):
            kind, j = self.role[a]
            src = loop.src[i]
            if kind in ("const", "xs") and self.outer_mat(src):
                arg_name[a] = param(f"{'c' if kind == 'const' else 'x'}{j}", a.dtype, ("node", src))
        body_nodes = set(self.order)
        source_of = dict(zip(self.args, loop.src))
        carry_buf = [buffer(f"hb{k}", 2 * self.args[self.n_c + k].tensor_type.size,
                            self.args[self.n_c + k].dtype) for k in range(self.n_h)]
        scratch_buf = [buffer(f"sb{i}", 2 * n.tensor_type.size, n.dtype) for i, n in enumerate(self.scratch)]
        tabs: dict[Node, str] = {}
        for st in stages:
            if st.kind == "pointwise" and st.node not in tabs:
                name = table(f"own{len(set(tabs.values()))}", _table(owners[st.node], G))
                for n in st.nodes:
                    tabs[n] = name
        pcols, pslot, pcount = {}, {}, {}
        for i, p in enumerate(smem_list):
            width = layout[p][2]
            n_cols = p.shape[-1]
            cols = np.full((G, width), -1, np.int32)
            slots = np.full((G, n_cols), -1, np.int32)
            for g in range(G):
                mine = sorted(needed[p][g])
                cols[g, :len(mine)] = mine
                slots[g, mine] = np.arange(len(mine))
            pcols[p] = table(f"pcol{i}", cols)
            pslot[p] = table(f"pslot{i}", slots)
            pcount[p] = table(f"pcnt{i}", np.array([len(needed[p][g]) for g in range(G)], np.int32))
        bar = buffer("bar", 2, "int32") if G > 1 and self.options.sync == "atomic" else None

        smem_dtype = NUMBA_TYPES[smem_list[0].dtype] if smem_list else None
        current_root: list[Node | None] = [None]

        def access(n: Node):
            if n is current_root[0] and n in self.scratch:
                return None
            if n not in body_nodes:  # a node of the outer graph, inside an inlined loop source
                if n.op is Op.CONST or not (self.outer_mat(n) or n.op in (Op.INPUT, Op.PARAM)):
                    return None
                name = param(f"o{len(params)}", n.dtype, ("node", n))
                return lambda ix: f"{name}[{flat_offset(ix, n.shape)}]"
            if n.op is Op.ARG:
                kind, j = self.role[n]
                size = n.tensor_type.size
                if kind in ("const", "xs") and n not in arg_name:
                    src = source_of[n]
                    return (lambda ix: em.value(src, ix)) if kind == "const" else \
                        (lambda ix: em.value(src, ("t",) + tuple(ix)))
                if kind == "const":
                    return lambda ix: f"{arg_name[n]}[{flat_offset(ix, n.shape)}]"
                if kind == "xs":
                    return lambda ix: f"{arg_name[n]}[t * {size} + {flat_offset(ix, n.shape)}]"
                return lambda ix: f"{carry_buf[j]}[p * {size} + {flat_offset(ix, n.shape)}]"
            if n in self.scratch:
                i = self.scratch.index(n)
                size = n.tensor_type.size
                return lambda ix: f"{scratch_buf[i]}[p * {size} + {flat_offset(ix, n.shape)}]"
            if n in self.smem:
                _, poff, width = layout[n]
                n_cols = n.shape[-1]
                return lambda ix: (f"sm[{poff} + {ix[0]} * {width} + "
                                   f"{pslot[n]}[g * {n_cols} + {ix[1]}]]")
            return None

        em = Emitter(access, level=1)
        em.line("g = cuda.blockIdx.x")
        em.line("tid = cuda.threadIdx.x")
        if smem_list:
            em.line(f"sm = cuda.shared.array(0, {smem_dtype})")
        if G > 1 and self.options.sync == "cg":
            em.line("grid = cuda.cg.this_grid()")
        if bar is not None:  # read before this block's first arrival: every block reads the same value
            em.line(f"gen = cuda.atomic.add({bar}, 1, 0)")

        def grid_sync() -> None:
            if G == 1:
                em.line("cuda.syncthreads()")
            elif self.options.sync == "cg":
                em.line("grid.sync()")
            else:
                # bar[0] counts arrivals, bar[1] is the generation; the last block to arrive resets
                # the count and bumps the generation, the others wait for it (self-resetting, so a
                # launch or a CUDA-graph replay needs no reset). `gen` is this block's copy.
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

        # prologue: resident weight slices, carry init into parity 0
        for p in smem_list:
            woff, _, width = layout[p]
            w_node = p.src[1]
            k_dim = p.src[0].shape[1]
            with em.block(f"for w in range(tid, {k_dim * width}, {NT}):"):
                em.line(f"kk = w // {width}")
                em.line(f"cc = w % {width}")
                em.line(f"n = {pcols[p]}[g * {width} + cc]")
                em.line(f"wv = {smem_dtype}(0)")
                with em.block("if n >= 0:"):
                    em.line(f"wv = {em.value(w_node, ('kk', 'n'))}")
                em.line(f"sm[{woff} + w] = wv")
        carry_outs = self.outputs[:self.n_h]
        for k in range(self.n_h):
            init = loop.src[self.n_c + k]

            def copy_init(e: str, k: int = k, init: Node = init) -> list[str]:
                if self.outer_mat(init):
                    return [f"{carry_buf[k]}[{e}] = {param(f'h{k}', init.dtype, ('node', init))}[{e}]"]
                idx = tuple(em.bind(x, "i") for x in unravel(e, init.shape))
                return [f"{carry_buf[k]}[{e}] = {em.value(init, idx)}"]
            self._owned_loop(em, tabs[carry_outs[k]], owners[carry_outs[k]], NT, copy_init)
        grid_sync()

        # the time loop
        with em.block(f"for s in range({T}):"):
            em.line(f"t = {T - 1} - s" if self.info.reverse else "t = s")
            em.line("p = s & 1")
            em.line("q = 1 - p")
            for st in stages:
                if st.grid_sync and G > 1:
                    grid_sync()
                else:
                    em.line("cuda.syncthreads()")
                with em.scope():
                    if st.kind == "matmul":
                        self._matmul_stage(em, st.node, layout, pcount, NT)
                    else:
                        current_root[0] = None if st.output else st.node
                        self._pointwise_stage(em, st, tabs, owners, NT, carry_buf, scratch_buf,
                                              st.output, param)
                        current_root[0] = None
            em.line("cuda.syncthreads()")

        # epilogue: final carries from the last written parity (owner-local)
        last = T % 2
        for k in range(self.n_h):
            size = self.args[self.n_c + k].tensor_type.size
            fin = param(f"f{k}", self.args[self.n_c + k].dtype, ("node", proj(loop, k)))
            self._owned_loop(em, tabs[carry_outs[k]], owners[carry_outs[k]], NT, lambda e, k=k, fin=fin, size=size: [
                f"{fin}[{e}] = {carry_buf[k]}[{last * size} + {e}]"])

        name = f"persistent_{'bwd' if self.info.reverse else 'fwd'}"
        # parameter order: as registered
        body = f"def {name}({', '.join(p for p, _, _ in params)}):\n" + "\n".join(em.lines) + "\n"
        return KernelSpec(name, body, params, (G,), NT, shared_bytes=shared_bytes, scratch=scratch,
                          zeroed=frozenset({(loop, "bar")}) if bar else frozenset(), constants=constants,
                          note=f"persistent loop T={T}, {G} block(s) x {NT} threads")

    @staticmethod
    def _owned_loop(em: Emitter, tab: str, owner: np.ndarray, nt: int, body) -> None:
        """For each element this block owns: the statements body(e) returns (it may emit more)."""
        width = max(1, int(np.bincount(owner).max()) if len(owner) else 1)
        with em.block(f"for kq in range(tid, {width}, {nt}):"):
            em.line(f"e = {tab}[g * {width} + kq]")
            with em.block("if e >= 0:"):
                for line in body("e"):
                    em.line(line)

    def _pointwise_stage(self, em: Emitter, st: Stage, tabs: dict, owners: dict, nt: int,
                         carry_buf: list[str], scratch_buf: list[str], is_output: bool, param) -> None:
        first = st.node
        stores: list[tuple[Node, list[str]]] = []
        for n in st.nodes:
            size = n.tensor_type.size
            dests: list[str] = []
            if n in self.scratch and not is_output:
                dests.append(f"{scratch_buf[self.scratch.index(n)]}[p * {size} + e]")
            for pos, o in enumerate(self.outputs):  # the body outputs n is (scratch stages store them too)
                if o is not n:
                    continue
                if pos < self.n_h:
                    dests.append(f"{carry_buf[pos]}[q * {size} + e]")
                else:
                    y = param(f"y{pos - self.n_h}", o.dtype, ("node", proj(self.loop, pos)))
                    dests.append(f"{y}[t * {size} + e]")
            if dests:
                stores.append((n, dests))
        if not stores:
            return
        size = first.tensor_type.size
        width = max(1, int(np.bincount(owners[first]).max()) if size else 1)
        with em.block(f"for kq in range(tid, {width}, {nt}):"):
            em.line(f"e = {tabs[first]}[g * {width} + kq]")
            with em.block("if e >= 0:"):
                idx = tuple(em.bind(x, "i") for x in unravel("e", first.shape))
                for n, dests in stores:
                    v = em.value(n, idx)
                    for d in dests:
                        em.line(f"{d} = {v}")

    def _matmul_stage(self, em: Emitter, p: Node, layout: dict, pcount: dict, nt: int) -> None:
        """P[:, my columns] = A @ W[:, my columns], W's slice resident in shared memory. Each thread
        accumulates a rows x cols register tile (rows strided by 1, columns by width / cols so a
        warp's shared-memory reads hit distinct banks), reusing each A load `cols` times."""
        a = p.src[0]
        m_dim, k_dim = a.shape
        woff, poff, width = layout[p]
        rows, cols = self.tiles[p]
        wc = width // cols
        groups = math.ceil(m_dim / rows)
        zero = f"{NUMBA_TYPES[p.dtype]}(0)"
        with em.block(f"for w in range(tid, {groups * wc}, {nt}):"):
            em.line(f"mb = (w // {wc}) * {rows}")
            em.line(f"cl = w % {wc}")
            with em.block(f"if cl < {pcount[p]}[g]:"):
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


def plan_loop(loop: Node, options: LoopOptions = LoopOptions(), props: DeviceProps = DeviceProps(),
              outer_materialized: Callable[[Node], bool] = lambda n: True) -> LoopPlan:
    """The persistent kernel for `loop`, or NotPersistent with the reason. Loop sources for which
    `outer_materialized` is false are computed in the kernel from the outer graph's nodes."""
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
        planner = _Planner(loop, options, props, blocks, smem, outer_materialized)
        try:
            plan = planner.build()
            if tried:
                plan.description["notes"] = tried
            return plan
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
