"""The CPU backend ("numba"): optimize, generate one kernel function, compile and cache it, run it.

`compile_graph(graph, passes=PASSES, cache_dir=None)` returns a `NumbaKernel`: call it with the input
arrays (graph.inputs order). Its `.source` is the generated kernel, `.path` its cache entry.

Two compilers for one generated source. By default `native.py` renders the source (a small kernel
language in Python syntax) to LLVM IR and compiles it with llvmlite: no Numba front end, which took
most of a cold compile (LSTM training step: about 7 of 11 s) and grew faster than the source. Its
cache entries are object files `unroll_native_<sha256>.o` with a JSON of what calling them needs,
keyed by the source, argument types, host CPU and compiler sources, checked against their digest
when loaded. Source the renderer refuses (`native.Unsupported`), and every source when
UNROLL_CPU_CODEGEN=numba, is compiled by Numba as `@njit` instead, as described next.

Caching (Numba path): Numba's `cache=True` needs a real file. The generated module is written
once under the cache dir ($UNROLL_CACHE_DIR, else ~/.cache/unroll) as `unroll_<sha256>.py`, named by
the hash of its content (temp file + os.replace, never rewritten), imported as a real module and
registered in `sys.modules`. Shapes are run-time parameters (see cpu.codegen), so a new T or B
gives the same source: in one process the loaded module is reused with no compilation at all, and a
new process loads the machine code from Numba's cache (NUMBA_CACHE_DIR, default next to the module).
A graph compiled before (same printed IR, options and compiler sources) is recognised by a
JSON record `unroll_graph_<sha256>.json` beside its module, so a new process skips the passes and
code generation as well (for either compiler). `STATS` counts code generations, native and Numba
compilations, cache loads, fallbacks (`native_unsupported`) and recorded hits; tests read it.

Threads, chosen deliberately (measured on a 2-core machine, idle):
- the generated code runs on the calling thread (no `parallel=True`/prange): per-step work in an
  RNN is small (B x H elements), a parallel region per step costs microseconds to start, and Numba
  worker threads would compete with BLAS's own threads (oversubscription turned a 25 ms step into
  5.5 s here);
- per-step products by a loop-invariant weight (h @ W_hh^T, dgates @ W_hh) run in
  `gemm.packed_gemm` on the calling thread up to `PACKED_MAX_MACS` multiply-adds: the
  weight is packed once per call, not once per step as BLAS does, and there is no call or thread
  start-up cost per step (LSTM (1000, 8, 32, 128) 139 -> 84 ms, RNN 49 -> 20 ms, GRU 160 -> 88 ms).
  Other products go to scipy's OpenBLAS (`cpu.blas.xxgemm`, the library Numba's np.dot
  uses), except other per-step products under `LOOP_MAX_MACS`, which run as vectorised loops.
  How many threads that OpenBLAS uses is decided per call by `threads.choose`: one where the
  step's largest product is small, else the cores no other process is using, and exactly what the
  user set where they set UNROLL_NUMBA_BLAS_THREADS / UNROLL_NUMBA_BLAS_LOOP_THREADS /
  OPENBLAS_NUM_THREADS / OMP_NUM_THREADS. Generated code switches between the outside and the
  in-loop count around each top-level loop through `openblas_set_num_threads`
  (cpu.blas.blas_threads). numpy's own OpenBLAS is left alone.
- freed memory stays in glibc's heap (`_keep_freed_memory`): otherwise every step page-faults
  its activations in afresh.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import re
import sys
from collections import Counter
from typing import Sequence

import numpy as np

from ...ir.node import Graph, Node
from .. import cache
from . import threads
from . import codegen, native
from .codegen import UnsupportedOp
from .values import ReplayMismatch

FLEXIBLE_SHAPES = False  # sizes are run-time parameters of the code, but a Graph's shapes are static

STATS: Counter = Counter()  # codegen, modules_written, modules_loaded, numba_compiles, cache_loads

# fast-math without nnan/ninf: reductions may reassociate (vectorise), inf/nan keep their meaning
FASTMATH = '{"nsz", "arcp", "contract", "afn", "reassoc"}'


def _blas_setter() -> int:
    """The address of scipy OpenBLAS's openblas_set_num_threads (0 where it cannot be found), after
    starting it on one thread (the policy raises the count per call where threads pay)."""
    try:
        native.scipy_cython_blas()   # loads the library to control
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return 0
    for lib in ThreadpoolController().lib_controllers:
        if lib.internal_api == "openblas" and "numpy" not in os.path.basename(os.path.dirname(lib.filepath)):
            lib.set_num_threads((threads.user_threads() or (1, 1))[0])
            fn = lib._get_symbol("openblas_set_num_threads")  # threadpoolctl's symbol affix lookup
            return (ctypes.cast(fn, ctypes.c_void_p).value or 0) if fn is not None else 0
    return 0


def _keep_freed_memory() -> bool:
    """Ask glibc to serve arrays up to 32 MB from its heap and keep freed memory there.

    A training step allocates its activations afresh on every call (tens to hundreds of MB at the
    large configurations). By default glibc maps each big block from the OS and unmaps it when
    freed, so every step page-faults and zero-fills all of its memory again: measured here, the
    LSTM (100, 64, 256, 512) step took 950-1260 ms that way and 730-815 ms with the memory kept.
    Process-wide (it helps every library in the process alike, PyTorch included); the process
    keeps its peak heap instead of returning it. UNROLL_MALLOC_TUNING=0 leaves malloc alone."""
    if os.environ.get("UNROLL_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 * 2 ** 20)) and bool(libc.mallopt(m_trim_threshold, 2 ** 30))
    except (OSError, AttributeError):
        return False


MALLOC_TUNED = _keep_freed_memory()
BLAS_SETTER = _blas_setter()
_SET_THREADS = ctypes.CFUNCTYPE(None, ctypes.c_int)(BLAS_SETTER) if BLAS_SETTER else None
_current_threads = [(threads.user_threads() or (1, 1))[0]]  # what OpenBLAS is set to now


def _llvm_options() -> None:
    """Let LLVM vectorise loops that touch many arrays: a fused cell kernel reads and writes a
    dozen (per-step outputs for the backward pass), and LLVM's default limit of 8 run-time alias
    checks left those loops scalar (measured: LSTM (50,16,32,64) step 10.3 -> 4.7 ms). The checks
    are exact, so results do not change. Process-wide, set once."""
    import llvmlite.binding as llvm
    if not getattr(llvm, "_unroll_options_set", False):
        llvm.set_option("", "-runtime-memory-check-threshold=128")
        llvm._unroll_options_set = True  # type: ignore[attr-defined]


_llvm_options()


class NumbaBackendError(RuntimeError):
    """Numba could not compile the generated code; names the op, its user line and the source line."""


def default_cache_dir() -> str:
    return cache.default_dir()


def _hash_files(paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + f.read())
    return digest.hexdigest()[:16]


@functools.cache
def _kernels_version() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return _hash_files([os.path.join(here, f) for f in ("blas.py", "gemm.py", "intrinsics.py", "kernels_ir.py")])


_HEADER = '''"""Generated by unroll's Numba CPU backend. Do not edit: the file is named by its content hash."""
# kernels library version {kernels}
import math

import numpy as np
from numba import njit

from unroll.backends.cpu.gemm import pack_panels, packed_gemm
from unroll.backends.cpu.blas import blas_threads, xxgemm
from unroll.backends.cpu.intrinsics import fmuladd, ldexp, pow2, scale


@njit(cache=True, nogil=True, fastmath={fastmath}, error_model="numpy")
'''


def module_source(fn_source: str) -> tuple[str, int]:
    """The module text and the line number (1-based) where the function's `def` starts."""
    header = _HEADER.format(kernels=_kernels_version(), fastmath=FASTMATH)
    return header + fn_source, header.count("\n") + 1


def load_module(text: str, directory: str | None = None) -> tuple[object, str]:
    """Write (once), validate and import the module with this content; returns (module, path)."""
    module, path, how = cache.load_module("unroll_gen_", text, directory or default_cache_dir())
    STATS[f"modules_{how}"] += 1
    return module, path


def _signature(graph: Graph):
    from numba import types
    from numba.np.numpy_support import from_dtype
    args = [types.Array(from_dtype(np.dtype("bool" if n.dtype == "bool" else n.dtype)), max(n.ndim, 1), "C")
            for n in graph.inputs]
    return tuple(args + [types.Array(types.int64, 1, "C"), types.Array(types.float64, 1, "C"),
                         types.Array(types.int64, 1, "C")])


def largest_product(graph: Graph) -> int:
    """The multiply-adds of the graph's largest matmul (a loop body's at its per-step size): what
    decides whether BLAS threads pay (threads.choose). Taken from the lowered graph, after hoisting
    has turned per-step input projections into one product each. A chain of products accumulated
    into one buffer (`c + pad(a @ b) + ...`: a convolution's taps, fuse_cells.accumulations) counts
    as one product of their total: split k ways, a TCN's im2col product would otherwise fall under
    the threshold and run on one thread (medium 262 -> 383 ms)."""
    from ...ir.fuse_cells import accumulations
    from ...ir.node import all_nodes
    from ...ir.ops import Op

    def macs(n: Node) -> int:
        return n.type.size * n.src[0].shape[-1] if n.op is Op.MATMUL else 0  # type: ignore[union-attr]
    best = max((macs(n) for n, _ in all_nodes(graph)), default=0)
    sums, chain = accumulations(list(graph.outputs)), {}
    for n in graph.nodes():
        if n in sums:
            chain[n] = sum(chain.get(s, 0) + macs(s.src[0] if s.op is Op.PAD else s) for s in n.src)
            best = max(best, chain[n])
    return best


class NumbaKernel:
    """The compiled graph: `kernel(arrays) -> list of arrays`. `.source`, `.path`, `.from_cache`."""

    def __init__(self, graph: Graph, dims: Sequence[int], floats: Sequence[float], source: str, path: str,
                 dispatcher, from_cache: bool, max_macs: int) -> None:
        self.graph = graph
        self.source = source
        self.path = path
        self.dispatcher = dispatcher
        self.from_cache = from_cache
        self.dims = np.array(dims, dtype=np.int64)
        self.fk = np.array(floats, dtype=np.float64)
        self.max_macs = max_macs  # of the lowered graph (threads.choose)
        self.size_log: list[tuple[str, str]] | None = None   # its codegen's size names (respecialize)
        self.blas = np.array([BLAS_SETTER, 1, 1], dtype=np.int64)  # setter, threads outside/inside loops
        self._scalar_out = [o.type.ndim == 0 for o in graph.outputs]  # type: ignore[union-attr]
        self._in_dtypes = [np.dtype("bool" if n.dtype == "bool" else n.dtype) for n in graph.inputs]

    @property
    def impl(self) -> "NumbaKernel":
        return self

    def _choose_threads(self) -> None:
        """BLAS threads for this call (threads.choose); the outside count is set here, the
        generated code switches to the in-loop count and back around its loops."""
        outside, inside = threads.choose(self.max_macs)
        self.blas[1], self.blas[2] = outside, inside
        if _SET_THREADS is not None and _current_threads[0] != outside:
            _SET_THREADS(outside)
            _current_threads[0] = outside

    def __call__(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        args = []
        for a, dtype in zip(arrays, self._in_dtypes):
            a = np.asarray(a)
            if a.ndim == 0:
                a = a.reshape(1)
            if a.dtype != dtype or not a.flags.c_contiguous or not a.flags.writeable or not a.flags.aligned:
                a = np.array(a, dtype=dtype, order="C")   # exactly the compiled signature's types
            args.append(a)
        self._choose_threads()
        try:
            outs = self.dispatcher(*args, self.dims, self.fk, self.blas)
        except IndexError as err:
            if err.args and err.args[0] == codegen.ONEHOT_ERROR:   # (message, id, depth)
                _, bad, depth = err.args
                raise IndexError(f"onehot: id {bad} is out of range for depth {depth} (expected 0 <= id < "
                                 f"{depth}); an Embedding's vocabulary or a onehot's depth is smaller than "
                                 f"the ids fed") from None
            raise
        return [o.reshape(()) if scalar else o for o, scalar in zip(outs, self._scalar_out)]

    def llvm_ir(self) -> str:
        """The optimised LLVM IR of the generated kernel (native or Numba-compiled)."""
        if isinstance(self.dispatcher, native.NativeKernel):
            return str(native.optimized_ir(self.source, self.dispatcher.arg_types)[0])
        return self.dispatcher.inspect_llvm(self.dispatcher.signatures[0])

    def __repr__(self) -> str:
        return f"<NumbaKernel {os.path.basename(self.path)} ({'cached' if self.from_cache else 'compiled'})>"


# The passes this backend wants from ur.optimize (`ur.compile` reads this: compile.pass_pipeline).
# Loop bodies are not fuse_cells'd: this backend's code generator already inlines every
# single-use elementwise chain into one loop nest (emitters.emit_cluster), and its smaller nests
# vectorise with fewer live values than one nest per cell. Measured in one process, with vs
# without fuse_cells in loops: LSTM (50,16,32,64) 2.70 vs 3.10 ms, (100,32,128,256) 76.6 vs
# 82.6 ms, (1000,8,32,128) 155 vs 173 ms; GRU within 2-7 %, RNN equal (the CUDA backend keeps
# it: one kernel launch per fused node). The top level's elementwise ops are grouped
# (fuse_top_level): every top-level nest costs Numba/LLVM compile time, a TCN step has hundreds.
PASSES: tuple[str, ...] = ("simplify", "fuse_matmuls", "hoist", "simplify", "fuse_top_level")


def prepare_graph(graph: Graph, passes: Sequence = PASSES) -> Graph:
    """The graph the code generator lowers: `graph` after `passes` (names or functions)."""
    if not passes:
        return graph
    from ...ir.optimize import optimize
    return optimize(graph, passes=list(passes))


def compile_graph(graph: Graph, passes: Sequence = PASSES, cache_dir: str | None = None,
                  **options: object) -> NumbaKernel:
    """Lower `graph` after `passes` (default PASSES; `()` for none) to a cached `@njit` function.

    A graph seen before (same printed IR, passes and compiler version) skips the passes and the
    code generation: its generated module, dims and floats are recorded in a small JSON file next
    to the module, so a new process goes straight to Numba's cache."""
    if options:
        raise TypeError(f"numba backend: unknown options {', '.join(sorted(options))}; expected cache_dir")
    directory = cache_dir or default_cache_dir()
    record = _record_path(directory, graph, passes)
    kernel = _load_recorded(record, graph) if record is not None else None
    if kernel is not None:
        return kernel
    lowered = prepare_graph(graph, passes)
    cg = codegen.generate(lowered)
    STATS["codegen"] += 1
    fn_source: str = cg.source  # type: ignore[attr-defined]
    compiled = _compile_native(fn_source, lowered, directory) if native.enabled() else None
    if compiled is not None:
        dispatcher, path, from_cache = compiled
        entry = {"native": os.path.basename(path)[:-2]}
    else:
        text, first_line = module_source(fn_source)
        with cache.entry_lock(directory, cache.module_name("unroll_gen_", text)):  # one compile per entry
            module, path = load_module(text, directory)
            dispatcher = module.kernel  # type: ignore[attr-defined]
            try:
                from_cache = _compile(dispatcher, _signature(lowered), path)
            except Exception as err:  # numba's errors: re-raised with the op and source location
                raise _explain(err, cg, path, first_line) from None
        entry = {"module": os.path.basename(path)}
    max_macs = largest_product(lowered)
    kernel = NumbaKernel(graph, cg.dim_values, cg.float_values, fn_source, path, dispatcher, from_cache, max_macs)
    kernel.size_log = cg.dims.log
    if record is not None and [n.type for n in lowered.inputs] == [n.type for n in graph.inputs]:
        with contextlib.suppress(OSError):  # an unwritable cache only loses the shortcut
            cache.write_atomic(record, json.dumps({**entry, "dims": cg.dim_values, "floats": cg.float_values,
                                                   "max_macs": max_macs}))
    return kernel


def _arg_types(graph: Graph) -> list[tuple[str, int]]:
    """The generated kernel's arguments as (dtype, ndim): the inputs (rank 0 as shape (1,)), then
    dims, fk and blas (as _signature)."""
    return [(n.dtype, max(n.ndim, 1)) for n in graph.inputs] + [("int64", 1), ("float64", 1), ("int64", 1)]


def _out_dtypes(graph: Graph) -> list[np.dtype]:
    return [np.dtype(o.dtype) for o in graph.outputs]


def _compile_native(source: str, lowered: Graph, directory: str):
    """(kernel, object path, from cache) from the native renderer, or None where the source leaves
    its language or LLVM rejects the IR (then Numba compiles the source: same meaning)."""
    try:
        kernel, path, how = native.compile_native(source, _arg_types(lowered), _out_dtypes(lowered),
                                                  directory, _compiler_version())
    except native.Unsupported as err:
        STATS["native_unsupported"] += 1
        native.LAST_UNSUPPORTED[0] = str(err)
        return None
    except RuntimeError as err:   # LLVM rejected the IR: a renderer bug; Numba still compiles it
        STATS["native_failed"] += 1
        native.LAST_UNSUPPORTED[0] = f"LLVM: {err}"
        return None
    if how != "memory":
        STATS["native_loads" if how == "loaded" else "native_compiles"] += 1
    return kernel, path, how != "compiled"


def respecialize(template: NumbaKernel, graph: Graph, passes: Sequence = PASSES) -> NumbaKernel | None:
    """The kernel for `graph`, which differs from the graph `template` was compiled for only in its
    sizes (two specialisations of one shape-polymorphic graph): its passes and code generation are
    replayed against the template's (`values.Dims` replay) and must give the template's source
    exactly; then it shares the template's compiled code with its own run-time sizes, with no Numba
    compile, even where its sizes coincide (T == B). A name of the template may hold 0 or 1 here:
    the code reads it at run time like any size. None where the replay diverges (a pass or the code
    generator chose differently for these sizes, such as a batch of 1 whose broadcasts fold away):
    the caller compiles `graph` on its own."""
    log = getattr(template, "size_log", None)
    if log is None:   # a template loaded from a cache record: generate its log (no Numba work)
        log = template.size_log = codegen.generate(prepare_graph(template.graph, passes)).dims.log
    lowered = prepare_graph(graph, passes)
    try:
        cg = codegen.generate(lowered, replay=log)
        dims, floats = cg.dims.replayed_values()
    except ReplayMismatch:
        return None
    if cg.source != template.source or len(cg.dims.log) != len(log):  # type: ignore[attr-defined]
        return None
    STATS["respecialized"] += 1
    kernel = NumbaKernel(graph, dims, floats, template.source, template.path, template.dispatcher, True,
                         largest_product(lowered))
    kernel.size_log = log
    return kernel


def _compile(dispatcher, sig, path: str) -> bool:
    """Compile (or load from Numba's cache) the overload for `sig`; True when it came from cache.
    A Numba cache entry that fails to load is dropped and rebuilt (cache.compile_once)."""
    if sig in dispatcher.overloads:
        return False
    hits_before = sum(dispatcher.stats.cache_hits.values())
    cache.compile_once(lambda: dispatcher.compile(sig), dispatcher, path)
    from_cache = sum(dispatcher.stats.cache_hits.values()) > hits_before
    STATS["cache_loads" if from_cache else "numba_compiles"] += 1
    return from_cache


@functools.cache
def _compiler_version() -> str:
    """Hash of the sources that decide generated code (passes, IR, this backend), once per process."""
    package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    folders = ("ir", "backends", "backends/lower", "backends/cpu")
    return _hash_files([os.path.join(package, folder, name) for folder in folders
                        for name in sorted(os.listdir(os.path.join(package, folder)))
                        if name.endswith(".py")])


def _record_path(directory: str, graph: Graph, passes: Sequence) -> str | None:
    """The record file for this graph and pipeline; None where passes include functions (their
    repr names an address, not their code, so it cannot key a record across processes). The
    compiler is part of the key: a graph compiled under UNROLL_CPU_CODEGEN=numba is compiled again
    by the native renderer, not loaded as the Numba module."""
    if not all(isinstance(p, str) for p in passes):
        return None
    from ...ir.text import print_graph
    compiler = "native" if native.enabled() else "numba"
    key = "\n".join([_compiler_version(), compiler, FASTMATH, repr(tuple(passes)), print_graph(graph)])
    return os.path.join(directory, f"unroll_graph_{hashlib.sha256(key.encode()).hexdigest()[:24]}.json")


def _load_recorded(record: str, graph: Graph) -> NumbaKernel | None:
    """The kernel for a graph compiled before (in any process), or None (nothing recorded, or a
    damaged record or module: then the caller regenerates and rewrites them)."""
    try:
        with open(record) as f:
            meta = json.load(f)
        name, dims, floats = meta.get("module"), [int(d) for d in meta["dims"]], [float(v) for v in meta["floats"]]
        max_macs = int(meta["max_macs"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        cache.warn(f"unroll: damaged cache record {record}; rebuilding it")
        return None
    directory = os.path.dirname(record)
    if "native" in meta:
        kernel = native.load_entry(directory, meta["native"], _arg_types(graph), _out_dtypes(graph)) \
            if native.enabled() else None
        if kernel is None:
            return None
        STATS["recorded"] += 1
        STATS["native_loads"] += 1
        return NumbaKernel(graph, dims, floats, kernel.source, os.path.join(directory, meta["native"] + ".o"),
                           kernel, True, max_macs)
    text = cache.read_module(os.path.join(directory, name))
    if text is None:
        return None
    with cache.entry_lock(directory, name[:-3]):
        module, path = load_module(text, directory)
        dispatcher = module.kernel  # type: ignore[attr-defined]
        try:
            from_cache = _compile(dispatcher, _signature(graph), path)
        except Exception:  # anything odd: regenerate from the graph, which explains errors properly
            return None
    STATS["recorded"] += 1
    source = text[text.index("def kernel("):]
    return NumbaKernel(graph, dims, floats, source, path, dispatcher, from_cache, max_macs)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _explain(err: Exception, cg: codegen.Codegen, path: str, first_line: int) -> Exception:
    message = _ANSI.sub("", str(err))
    node: Node | None = None
    line_no = None
    for file, line in re.findall(r'File "([^"]+)", line (\d+)', message):
        if os.path.basename(file) == os.path.basename(path):
            line_no = int(line)
            k = line_no - first_line
            if 0 <= k < len(cg.lines):
                node = cg.lines[k][2]
            break
    loc = getattr(err, "loc", None)
    if node is None and loc is not None and os.path.basename(str(getattr(loc, "filename", ""))) == os.path.basename(path):
        line_no = int(loc.line)
        k = line_no - first_line
        if 0 <= k < len(cg.lines):
            node = cg.lines[k][2]
    first = next((ln.strip() for ln in message.splitlines() if ln.strip()), type(err).__name__)
    detail = [ln.strip() for ln in message.splitlines() if ln.strip() and not ln.startswith(" ")][:6]
    where = f"{path}:{line_no}" if line_no else path
    what = f"op {node.op.value!r} ({node!r}, built at {node.loc})" if node is not None else "the graph"
    return NumbaBackendError(f"numba backend: Numba could not compile the code generated for {what}; "
                             f"generated source at {where}.\nNumba said: {first}\n" + "\n".join(detail[1:]))


__all__ = ["FLEXIBLE_SHAPES", "NumbaBackendError", "NumbaKernel", "STATS", "UnsupportedOp", "compile_graph",
           "respecialize"]
