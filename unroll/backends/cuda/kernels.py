"""Kernel sources for the CUDA backend's top-level ops: fused elementwise groups, reductions and the
tiled shared-memory matmul. Pure source generation (no numba import): a `KernelSpec` holds the
module source, the kernel's parameters (all 1-D contiguous arrays) and its launch shape.

Every kernel reads its materialized inputs through `Emitter` loads, so transposes, reshapes, slices
and elementwise producers are fused into the reading kernel instead of being copied first.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ...ir.node import Node
from ...ir.ops import LEAVES, MOVEMENT, Op
from ..lower import index
from ..lower.index import numpy_source_map
from .codegen import (
    CHECK_DTYPE,
    CHECK_SIZE,
    MODULE_HEADER,
    NUMBA_TYPES,
    Emitter,
    flat_offset,
    literal,
    reduce_identity,
    render,
    unravel,
)

ArgRef = tuple[str, Hashable]

@contextmanager
def _last_to_arrive(em: Emitter, counter: str, arrivals: int) -> Iterator[None]:
    """Code emitted inside runs in the one block of `arrivals` that finishes last (a grid-wide
    combine without a second launch): every block publishes its partial result, bumps
    `cnt[counter]`, and the block that sees `arrivals - 1` combines the partials and resets the
    counter for the next launch. Needs `tid`, a shared `flag` and the `cnt` parameter."""
    em.line("cuda.threadfence()")
    em.line("cuda.syncthreads()")
    with em.block("if tid == 0:"):
        em.line(f"flag[0] = 1 if cuda.atomic.add(cnt, {counter}, 1) == {arrivals - 1} else 0")
    em.line("cuda.syncthreads()")
    with em.block("if flag[0] == 1:"):
        em.line("cuda.threadfence()")
        yield
        with em.block("if tid == 0:"):
            em.line(f"cnt[{counter}] = 0")  # ready for the next launch  # ("node", Node) | ("scratch", key) | ("table", key) | ...


@dataclass
class KernelSpec:
    """One generated kernel: source, parameters (name, dtype, what is bound to it), launch shape."""

    name: str
    body: str                       # the kernel's `def` (module source = header + body)
    params: list[tuple[str, str, ArgRef]]
    grid: tuple[int, ...]
    block: int
    shared_bytes: int = 0           # dynamic shared memory
    scratch: dict[Hashable, tuple[int, str]] = field(default_factory=dict)  # key -> (size, dtype)
    zeroed: frozenset = frozenset()  # scratch keys that must start (and stay, between launches) zero
    constants: dict[Hashable, np.ndarray] = field(default_factory=dict)  # uploaded once (tables)
    note: str = ""
    checks: dict[Hashable, Node] = field(default_factory=dict)  # error-buffer scratch key -> onehot

    @property
    def source(self) -> str:
        return MODULE_HEADER + "\n\n" + self.body

    @property
    def signature(self) -> str:
        return "void(" + ", ".join(f"{NUMBA_TYPES[dt]}[::1]" for _, dt, _ in self.params) + ")"

    @property
    def digest(self) -> str:
        return hashlib.sha256((self.source + self.signature).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Tuning:
    """Launch and tile sizes. The simulator runs one Python thread per CUDA thread: keep it small."""

    threads: int = 256
    max_blocks: int = 1024          # grid-stride loops cover the rest
    mm_tile: tuple[int, int, int, int, int] = (64, 64, 16, 4, 4)  # BM, BN, BK, TM, TN
    reduce_blocks: int = 264        # target blocks for big reductions (2 per H100 SM)

    @staticmethod
    def simulator() -> Tuning:
        return Tuning(threads=32, max_blocks=2, mm_tile=(8, 8, 4, 2, 2), reduce_blocks=2)


class _Inputs:
    """Collects the materialized nodes a kernel reads and names their parameters."""

    def __init__(self, computed: Sequence[Node], is_materialized: Callable[[Node], bool]) -> None:
        self.computed = set(computed)
        self.is_materialized = is_materialized
        self.names: dict[Node, str] = {}
        self.checks: dict[Hashable, Node] = {}
        self.check_names: dict[Hashable, str] = {}

    def access(self, node: Node):
        if node.op is Op.CONST or (node in self.computed and node.op not in LEAVES):
            return None  # constants are literals; computed nodes are inlined
        if not (self.is_materialized(node) or node.op in LEAVES and node.op is not Op.CONST):
            return None
        name = self.names.setdefault(node, f"a{len(self.names)}")
        return lambda ix: f"{name}[{flat_offset(ix, node.shape)}]"

    def check(self, node: Node) -> str:
        """The error buffer of an inlined onehot (a parameter after the inputs)."""
        key = check_key(node)
        if key not in self.checks:
            self.checks[key] = node
            self.check_names[key] = f"err{len(self.check_names)}"
        return self.check_names[key]

    def emitter(self, level: int) -> Emitter:
        return Emitter(self.access, level=level, check=self.check)

    def params(self) -> list[tuple[str, str, ArgRef]]:
        return [(name, node.dtype, ("node", node)) for node, name in self.names.items()] + \
            [(name, CHECK_DTYPE, ("scratch", key)) for key, name in self.check_names.items()]

    def scratch(self) -> dict[Hashable, tuple[int, str]]:
        return {key: (CHECK_SIZE, CHECK_DTYPE) for key in self.checks}


# ---- out-of-range onehot ids -----------------------------------------------------------------------

def check_key(node: Node) -> tuple[Node, str]:
    """The scratch key of a onehot's error buffer (shared by every kernel that inlines it)."""
    return (node, "onehot_ids")


def raise_if_flagged(node: Node, flags: np.ndarray) -> None:
    """Raise the IndexError a kernel recorded for onehot `node` in its error buffer (flag, id)."""
    if int(flags[0]):
        depth = int(node.arg)  # type: ignore[call-overload]
        raise IndexError(f"onehot: id {int(flags[1])} is out of range for depth {depth} (expected "
                         f"0 <= id < {depth}); reported by a cuda kernel (one offending id is shown)\n"
                         f"  at {node.loc}")


def _def(name: str, params: Sequence[str], lines: Sequence[str]) -> str:
    return f"def {name}({', '.join(params)}):\n" + "\n".join(lines) + "\n"


def _index_vars(em: Emitter, flat: str, shape: Sequence[int], stem: str) -> tuple[str, ...]:
    return tuple(em.bind(e, stem) for e in unravel(flat, shape))


# ---- fused elementwise ---------------------------------------------------------------------------

def elementwise_kernel(name: str, outs: Sequence[Node], is_materialized: Callable[[Node], bool],
                       tuning: Tuning) -> KernelSpec:
    """Computes each node of `outs` (independent of each other) at every element: one thread per
    element in a grid-stride loop per distinct size, producers inlined from the shared expression
    table. Several outputs in one kernel save launches."""
    inputs = _Inputs(outs, is_materialized)
    em = inputs.emitter(level=2)
    sizes = list(dict.fromkeys(o.tensor_type.size for o in outs))
    lines: list[str] = []
    for size in sizes:
        em.lines = []
        with em.scope():
            for k, out in enumerate(outs):
                if out.tensor_type.size != size:
                    continue
                idx = _index_vars(em, "e", out.shape, "i")
                em.line(f"o{k}[e] = {em.value(out, idx)}")
        lines += [f"    for e in range(cuda.grid(1), {size}, cuda.gridsize(1)):"] + em.lines
    params = [(f"o{k}", o.dtype, ("node", o)) for k, o in enumerate(outs)] + inputs.params()
    blocks = max(1, min(math.ceil(max(sizes) / tuning.threads), tuning.max_blocks))
    return KernelSpec(name, _def(name, [p for p, _, _ in params], lines), params, (blocks,),
                      tuning.threads, scratch=inputs.scratch(), checks=inputs.checks,
                      note=f"fused elementwise: {len(outs)} output(s) of {'/'.join(map(str, sizes))} elements")


# ---- reductions ----------------------------------------------------------------------------------

def _combine(em: Emitter, op: Op, dtype: str, a: str, b: str) -> str:
    """a + b, or the maximum as the scalar table's NaN-propagating select (np.max propagates NaN;
    a plain `max(a, b)` would not). The select reads its operands twice: they are bound first."""
    if op is Op.SUM:
        return f"{a} + {b}"
    return render(Op.MAX, (em.bind(a, "mx"), em.bind(b, "mx")), dtype)


def reduction_kernel(name: str, node: Node, is_materialized: Callable[[Node], bool],
                     tuning: Tuning) -> KernelSpec:
    """SUM / REDUCE_MAX: each block reduces a tile of TO outputs over one chunk of the reduced
    elements (TR threads per output, a shared-memory tree); with several chunks, the last block to
    finish an output tile combines the chunks' partials in a fixed order (deterministic)."""
    src = node.src[0]
    axes = index.reduced_axes(node)
    red_dims = [src.shape[a] for a in axes]
    n_out, n_red = node.tensor_type.size, math.prod(red_dims)
    nt = tuning.threads
    contiguous = src.ndim - 1 in axes or n_out == 1
    to = 1 if contiguous else min(32, nt)
    tr = nt // to
    blocks_o = math.ceil(n_out / to)
    chunks = max(1, min(math.ceil(n_red / (tr * 16)), max(1, tuning.reduce_blocks // blocks_o)))
    chunk = math.ceil(n_red / chunks) if n_red else 0
    dt = node.dtype
    inputs = _Inputs([node], is_materialized)
    em = inputs.emitter(level=1)
    em.line("tid = cuda.threadIdx.x")
    em.line(f"tx = tid % {to}")
    em.line(f"ty = tid // {to}")
    em.line(f"o = cuda.blockIdx.x * {to} + tx")
    em.line("c = cuda.blockIdx.y")
    em.line(f"sm = cuda.shared.array({nt}, {NUMBA_TYPES[dt]})")
    em.line("flag = cuda.shared.array(1, int32)")
    em.line(f"acc = {reduce_identity(node.op, dt)}")
    with em.block(f"if o < {n_out}:"):
        out_idx = _index_vars(em, "o", node.shape, "i")
        with em.block(f"for r in range(c * {chunk} + ty, min(c * {chunk} + {chunk}, {n_red}), {tr}):"):
            red_idx = _index_vars(em, "r", red_dims, "j")
            v = em.value(src, tuple(index.reduce_sources(em.ix, node, out_idx, red_idx)))
            em.line(f"acc = {_combine(em, node.op, dt, 'acc', v)}")
    em.line("sm[tid] = acc")
    em.line("cuda.syncthreads()")
    s = tr // 2
    while s >= 1:
        with em.block(f"if ty < {s}:"):
            em.line(f"sm[tid] = {_combine(em, node.op, dt, 'sm[tid]', f'sm[tid + {s * to}]')}")
        em.line("cuda.syncthreads()")
        s //= 2
    params = [("out", dt, ("node", node))]
    scratch: dict[Hashable, tuple[int, str]] = {}
    zeroed: frozenset = frozenset()
    if chunks == 1:
        with em.block(f"if ty == 0 and o < {n_out}:"):
            em.line("out[o] = sm[tx]")
    else:
        part_key, count_key = (node, "partials"), (node, "counters")
        scratch = {part_key: (n_out * chunks, dt), count_key: (blocks_o, "int32")}
        zeroed = frozenset({count_key})
        params += [("part", dt, ("scratch", part_key)), ("cnt", "int32", ("scratch", count_key))]
        with em.block(f"if ty == 0 and o < {n_out}:"):
            em.line(f"part[o * {chunks} + c] = sm[tx]")
        with _last_to_arrive(em, "cuda.blockIdx.x", chunks):
            with em.block(f"if ty == 0 and o < {n_out}:"):
                em.line(f"tot = part[o * {chunks}]")
                with em.block(f"for cc in range(1, {chunks}):"):
                    em.line(f"tot = {_combine(em, node.op, dt, 'tot', f'part[o * {chunks} + cc]')}")
                em.line("out[o] = tot")
    params += inputs.params()
    return KernelSpec(name, _def(name, [p for p, _, _ in params], em.lines), params, (blocks_o, chunks), nt,
                      scratch={**scratch, **inputs.scratch()}, zeroed=zeroed, checks=inputs.checks,
                      note=f"{node.op.value}: {n_out} outputs x {n_red} reduced, {to}x{tr} threads, "
                           f"{chunks} chunk(s)")


# ---- tiled matmul --------------------------------------------------------------------------------

def _view_fast_axis(operand: Node, is_materialized: Callable[[Node], bool]) -> str:
    """'row' when consecutive rows of a 2-D operand view are adjacent in memory (a transposed
    operand): its tile is then loaded row-fastest so the warp's loads coalesce."""
    node, flats = operand, None
    m, k = operand.shape[-2:]
    if m < 2 or k < 2:
        return "col"
    probe = np.array([0, 1, k], np.int64)  # elements (0,0), (0,1), (1,0) of the last two axes
    flats = probe
    while not (is_materialized(node) or node.op in LEAVES):
        if node.op not in MOVEMENT or node.op in (Op.PAD, Op.CONCAT):
            return "col"
        ((node, _, flats),) = numpy_source_map(node, flats)
    d_col, d_row = flats[1] - flats[0], flats[2] - flats[0]
    return "row" if d_row == 1 and d_col != 1 else "col"


@dataclass(frozen=True)
class _Gemm:
    """The tiling of one matmul kernel."""

    bm: int                         # rows of C per block
    bn: int                         # columns of C per block
    bk: int                         # depth of a shared-memory slab
    tm: int                         # rows per thread
    tn: int                         # columns per thread
    m: int
    k: int
    n: int
    batch_shape: tuple[int, ...]
    splits: int                     # K ranges summed by different blocks (split-K)
    k_chunk: int                    # K per split, a multiple of bk

    @property
    def threads(self) -> int:
        return (self.bm // self.tm) * (self.bn // self.tn)

    @property
    def n_batch(self) -> int:
        return math.prod(self.batch_shape)

    @property
    def tiles(self) -> int:
        return math.ceil(self.m / self.bm) * math.ceil(self.n / self.bn) * self.n_batch

    @staticmethod
    def of(node: Node, tuning: Tuning) -> _Gemm:
        a, b = node.src
        bm, bn, bk, tm, tn = tuning.mm_tile
        m_dim, k_dim, n_dim = a.shape[-2], a.shape[-1], b.shape[-1]
        batch_shape = tuple(node.shape[:-2])
        # split-K when there are few output tiles and a long K (weight gradients: K = T * B): each
        # split sums a K range; the last block to finish a tile adds the splits in order (deterministic)
        tiles = math.ceil(m_dim / bm) * math.ceil(n_dim / bn) * math.prod(batch_shape)
        splits = max(1, min(tuning.reduce_blocks // max(1, tiles), k_dim // (bk * 8)))
        k_chunk = math.ceil(math.ceil(k_dim / splits) / bk) * bk
        splits = math.ceil(k_dim / k_chunk) if k_dim else 1
        return _Gemm(bm, bn, bk, tm, tn, m_dim, k_dim, n_dim, batch_shape, splits, k_chunk)


def matmul_kernel(name: str, node: Node, is_materialized: Callable[[Node], bool],
                  tuning: Tuning) -> KernelSpec:
    """C = A @ B (batch dims broadcast): BM x BN tiles of C per block, BK-deep slabs of A and B
    staged in shared memory, a TM x TN register tile per thread (rows/cols strided across threads
    so shared-memory reads are conflict-free). Operands are read through inlined view expressions:
    A.T or a reshape costs no copy."""
    a, b = node.src
    mm = _Gemm.of(node, tuning)
    bm, bn, bk, tm, tn, nt = mm.bm, mm.bn, mm.bk, mm.tm, mm.tn, mm.threads
    dt = node.dtype
    inputs = _Inputs([node], is_materialized)
    em = inputs.emitter(level=1)
    ty = NUMBA_TYPES[dt]
    em.line("tid = cuda.threadIdx.x")
    # rows padded by one element: a warp storing down a column of a tile hits distinct banks
    pa, pb = bm + 1, bn + 1
    em.line(f"As = cuda.shared.array({bk * pa}, {ty})")
    em.line(f"Bs = cuda.shared.array({bk * pb}, {ty})")
    em.line(f"tr = tid // {bn // tn}")
    em.line(f"tc = tid % {bn // tn}")
    em.line(f"bz = cuda.blockIdx.z // {mm.splits}")
    em.line(f"split = cuda.blockIdx.z % {mm.splits}")
    bidx = _index_vars(em, "bz", mm.batch_shape, "b")
    em.line(f"m0 = cuda.blockIdx.y * {bm}")
    em.line(f"n0 = cuda.blockIdx.x * {bn}")
    zero = literal(0, dt)
    accs = [[f"c{i}_{j}" for j in range(tn)] for i in range(tm)]
    for row in accs:
        for c in row:
            em.line(f"{c} = {zero}")

    def load_tile(operand: Node, rows: int, cols: int, r0: str, c0: str, rlim: int, clim: int,
                  smem: str, smem_index: str) -> None:
        _load_tile(em, node, operand, _view_fast_axis(operand, is_materialized), nt, bidx, zero,
                   (rows, cols, r0, c0, rlim, clim), smem, smem_index)

    with em.block(f"for k0 in range(split * {mm.k_chunk}, min(split * {mm.k_chunk} + {mm.k_chunk}, {mm.k}), {bk}):"):
        # A tile: rows m (BM), cols k (BK), stored [kk][mm]; B tile: rows k (BK), cols n, [kk][nn]
        load_tile(a, bm, bk, "m0", "k0", mm.m, mm.k, "As", f"cc * {pa} + rr")
        load_tile(b, bk, bn, "k0", "n0", mm.k, mm.n, "Bs", f"rr * {pb} + cc")
        em.line("cuda.syncthreads()")
        with em.block(f"for kk in range({bk}):"):
            for i in range(tm):
                em.line(f"av{i} = As[kk * {pa} + tr + {i * (bm // tm)}]")
            for j in range(tn):
                em.line(f"bv{j} = Bs[kk * {pb} + tc + {j * (bn // tn)}]")
            for i in range(tm):
                for j in range(tn):
                    em.line(f"{accs[i][j]} += av{i} * bv{j}")
        em.line("cuda.syncthreads()")
    params, scratch = _gemm_store(em, mm, node, accs)
    params += inputs.params()
    grid = (math.ceil(mm.n / bn), math.ceil(mm.m / bm), mm.n_batch * mm.splits)
    return KernelSpec(name, _def(name, [p for p, _, _ in params], em.lines), params, grid, nt,
                      scratch={**scratch, **inputs.scratch()}, checks=inputs.checks,
                      zeroed=frozenset(k for k in scratch if k[1] == "splitk_counters"),
                      note=f"matmul {mm.m}x{mm.k} @ {mm.k}x{mm.n} x{mm.n_batch}: {bm}x{bn}x{bk} tiles, "
                           f"{tm}x{tn} per thread, {mm.splits} K split(s)")


def _load_tile(em: Emitter, node: Node, operand: Node, fast: str, nt: int, bidx: tuple[str, ...], zero: str,
               box: tuple[int, int, str, str, int, int], smem: str, smem_index: str) -> None:
    """Stage a rows x cols tile of `operand` starting at (r0, c0) in shared memory (zeros outside
    rlim x clim), loading along the operand's memory-contiguous axis (`fast`)."""
    rows, cols, r0, c0, rlim, clim = box
    with em.block(f"for l in range(tid, {rows * cols}, {nt}):"):
        if fast == "row":
            em.line(f"rr = l % {rows}")
            em.line(f"cc = l // {rows}")
        else:
            em.line(f"rr = l // {cols}")
            em.line(f"cc = l % {cols}")
        em.line(f"gr = {r0} + rr")
        em.line(f"gc = {c0} + cc")
        em.line(f"val = {zero}")
        with em.block(f"if gr < {rlim} and gc < {clim}:"):
            full = tuple(index.matmul_operand(em.ix, bidx + ("0", "0"), operand.shape, node.shape, "gr", "gc"))
            em.line(f"val = {em.value(operand, full)}")
        em.line(f"{smem}[{smem_index}] = val")


def _gemm_store(em: Emitter, mm: _Gemm, node: Node, accs: list[list[str]]
                ) -> tuple[list[tuple[str, str, ArgRef]], dict[Hashable, tuple[int, str]]]:
    """Store the register tiles: straight to `out`, or with split-K to partials that the last
    block of a tile to finish sums in split order. Returns the parameters and scratch it uses."""
    bm, bn, tm, tn = mm.bm, mm.bn, mm.tm, mm.tn
    m_dim, n_dim, splits = mm.m, mm.n, mm.splits
    mn = m_dim * n_dim

    def each_element(body: Callable[[int, int], None]) -> None:
        """Emit body(i, j) for this thread's (i, j) results that fall inside the matrix (gm, gn)."""
        for i in range(tm):
            em.line(f"gm = m0 + tr + {i * (bm // tm)}")
            with em.block(f"if gm < {m_dim}:"):
                for j in range(tn):
                    em.line(f"gn = n0 + tc + {j * (bn // tn)}")
                    with em.block(f"if gn < {n_dim}:"):
                        body(i, j)

    def store(target: str, offset: str) -> None:
        each_element(lambda i, j: em.line(f"{target}[{offset} + gm * {n_dim} + gn] = {accs[i][j]}"))

    def combine_splits(i: int, j: int) -> None:
        em.line(f"tot = part[bz * {splits * mn} + gm * {n_dim} + gn]")
        with em.block(f"for sp in range(1, {splits}):"):
            em.line(f"tot += part[(bz * {splits} + sp) * {mn} + gm * {n_dim} + gn]")
        em.line(f"out[bz * {mn} + gm * {n_dim} + gn] = tot")

    params: list[tuple[str, str, ArgRef]] = [("out", node.dtype, ("node", node))]
    scratch: dict[Hashable, tuple[int, str]] = {}
    if splits == 1:
        store("out", f"bz * {mn}")
        return params, scratch
    part_key, count_key = (node, "splitk"), (node, "splitk_counters")
    scratch = {part_key: (splits * mm.n_batch * mn, node.dtype), count_key: (mm.tiles, "int32")}
    params += [("part", node.dtype, ("scratch", part_key)), ("cnt", "int32", ("scratch", count_key))]
    store("part", f"(bz * {splits} + split) * {mn}")
    em.line("flag = cuda.shared.array(1, int32)")
    em.line("tile = (bz * cuda.gridDim.y + cuda.blockIdx.y) * cuda.gridDim.x + cuda.blockIdx.x")
    with _last_to_arrive(em, "tile", splits):
        each_element(combine_splits)
    return params, scratch
