"""Communication for data-parallel training over MPI: flat buffers, allreduce, broadcast, faults, threads.

    from mpi4py import MPI
    ur.fit(loss, model, data, epochs=5, comm=MPI.COMM_WORLD)    # mpiexec -n 4 python train.py

Every rank holds the full parameters and trains on its share of each global batch; this module is
what the ranks say to each other (`TrainStep(comm=...)` and `fit(comm=...)` use it):

* `GradientAverager`: every gradient, the loss and a failure count packed into ONE contiguous
  buffer, averaged by ONE in-place `Allreduce` per step (no per-tensor calls, no pickling). The
  skip decision is collective by construction: a NaN or inf on any rank makes the summed buffer
  non-finite on every rank, so all ranks skip the same update; and a rank whose step raised adds 1
  to the failure count, so every rank raises instead of waiting for it.
* `broadcast_values`: rank 0's parameters copied bitwise into every rank's arrays (one `Bcast` of
  their bytes), after checking that every rank built the same names, shapes and dtypes.
* `agree`: a two-flag allreduce (stop, failed) for decisions outside the step (evaluation's
  StopTraining, a checkpoint write that failed).
* Faults: `Watchdog` aborts the job (MPI_Abort) when a collective waits longer than its timeout (a
  rank hangs or died quietly); `abort_on_error` makes an uncaught exception on one rank abort the
  job instead of leaving the others blocked forever.
* `set_threads`: each rank gets its share of the node's cores for BLAS, unless the user chose.
* `local_batch`, `is_root`, `root_only_output`, and `default`, the ambient communicator that
  `unroll train --distributed` sets so that unmodified scripts calling `ur.fit` train distributed.

mpi4py is imported only when a communicator is used: `pip install "unroll[mpi]"` (mpi4py and the
MPICH wheel, which brings `mpiexec`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
import traceback
from types import ModuleType
from typing import Any, Iterator, Mapping

import numpy as np

INSTALL_HINT = 'pip install "unroll[mpi]" (that is: pip install mpi4py mpich; it brings mpiexec)'
DEFAULT_TIMEOUT = 600.0  # seconds a collective may wait; UNROLL_MPI_TIMEOUT overrides
# the user's thread settings: any of them set, set_threads leaves threads alone
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "UNROLL_NUMBA_BLAS_THREADS",
                    "UNROLL_MAX_THREADS")

_default_comm: Any = None


def mpi() -> ModuleType:
    """mpi4py's MPI module, or an ImportError that says how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise ImportError(f"data-parallel training needs mpi4py and an MPI library: {INSTALL_HINT}") from err
    return MPI


def world() -> Any:
    """MPI.COMM_WORLD (mpi4py imported on first use)."""
    return mpi().COMM_WORLD


def check_comm(comm: Any) -> Any:
    """`comm` when it is an mpi4py intracommunicator; else a TypeError naming what was given."""
    MPI = mpi()
    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(f"comm: expected an mpi4py communicator such as MPI.COMM_WORLD, found "
                        f"{type(comm).__name__}")
    return comm


def is_root(comm: Any) -> bool:
    """True on rank 0 and without a communicator: the process that prints and writes files."""
    return comm is None or comm.Get_rank() == 0


def local_batch(global_batch: int, comm_or_size: Any) -> int:
    """Each rank's share of a global batch: global_batch // ranks, which must divide exactly."""
    size = comm_or_size if isinstance(comm_or_size, int) else comm_or_size.Get_size()
    if not isinstance(global_batch, int) or global_batch < 1:
        raise ValueError(f"global batch: expected a positive int, found {global_batch!r}")
    if global_batch % size:
        below, above = global_batch // size * size, (global_batch // size + 1) * size
        raise ValueError(f"the global batch {global_batch} does not split evenly over {size} ranks "
                         f"({global_batch} = {global_batch // size} x {size} + {global_batch % size}); "
                         f"use a multiple of {size}, e.g. {below or above} or {above}")
    return global_batch // size


@contextlib.contextmanager
def default(comm: Any) -> Iterator[Any]:
    """Make `comm` the communicator of every `ur.fit` that is not given one (for scripts that
    cannot pass it: `unroll train TASK --distributed`)."""
    global _default_comm
    previous, _default_comm = _default_comm, comm
    try:
        yield comm
    finally:
        _default_comm = previous


def default_comm() -> Any:
    """The communicator set by `default(comm)`, else None (train on this process alone)."""
    return _default_comm


# ---- faults ---------------------------------------------------------------------------------------


def _timeout(timeout: float | None) -> float:
    if timeout is None:
        timeout = float(os.environ.get("UNROLL_MPI_TIMEOUT", DEFAULT_TIMEOUT))
    if not timeout > 0:
        raise ValueError(f"timeout: expected a positive number of seconds, found {timeout!r}")
    return float(timeout)


class Watchdog:
    """Aborts the whole job when this rank waits in one collective longer than `timeout` seconds.

    A blocked MPI call cannot be interrupted, and a rank that hangs, or exits without MPI noticing,
    leaves the others waiting forever. One daemon thread per process checks every guarded wait
    (mpi4py releases the GIL while it waits, so the thread runs) and calls MPI_Abort. The timeout
    must exceed the longest legitimate wait: the slowest rank's compute time for a step, including
    a first-call compile.
    """

    POLL = 0.25  # seconds between the thread's checks

    _waits: dict[int, tuple["Watchdog", str, float]] = {}  # thread id -> (watchdog, what, since)
    _lock = threading.Lock()
    _thread: threading.Thread | None = None

    def __init__(self, comm: Any, timeout: float | None = None) -> None:
        self.comm = comm
        self.timeout = _timeout(timeout)

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        if self.comm.Get_size() < 2:
            yield
            return
        key = threading.get_ident()
        with Watchdog._lock:
            if Watchdog._thread is None:
                Watchdog._thread = threading.Thread(target=Watchdog._watch, name="unroll-mpi-watchdog",
                                                    daemon=True)
                Watchdog._thread.start()
            Watchdog._waits[key] = (self, what, time.monotonic())
        try:
            yield
        finally:
            with Watchdog._lock:
                Watchdog._waits.pop(key, None)

    @staticmethod
    def _watch() -> None:
        while True:
            time.sleep(Watchdog.POLL)
            now = time.monotonic()
            with Watchdog._lock:
                late = [(dog, what, now - since) for dog, what, since in Watchdog._waits.values()
                        if now - since > dog.timeout]
            for dog, what, waited in late[:1]:
                _abort(dog.comm, f"waited {waited:.0f} s (timeout {dog.timeout:g} s) in {what}: "
                                 f"another rank has failed or hangs")


def _abort(comm: Any, message: str) -> None:
    sys.stderr.write(f"\nunroll.distributed: rank {comm.Get_rank()} of {comm.Get_size()}: {message}; "
                     f"aborting all ranks (MPI_Abort)\n")
    sys.stderr.flush()
    comm.Abort(1)


def abort_on_error(comm: Any) -> None:
    """Make an uncaught exception on this rank (main thread or another) print its traceback and
    abort every rank, instead of exiting while the others wait in a collective forever."""
    if comm.Get_size() < 2:
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        previous(kind, value, tb)
        _abort(comm, f"uncaught {kind.__name__}")

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        traceback.print_exception(args.exc_type, args.exc_value, args.exc_traceback)
        _abort(comm, f"uncaught {args.exc_type.__name__} in thread {getattr(args.thread, 'name', '?')}")

    sys.excepthook = hook
    threading.excepthook = thread_hook


class RankFailed(RuntimeError):
    """Raised on the ranks that did not fail when another rank's step or evaluation raised."""


def agree(comm: Any, watchdog: Watchdog, what: str, *, stop: bool = False,
          failed: bool = False) -> tuple[bool, int]:
    """(any rank asked to stop, how many ranks failed): one small allreduce every rank must reach."""
    MPI = mpi()
    flags = np.array([float(stop), float(failed)])
    with watchdog.guard(what):
        comm.Allreduce(MPI.IN_PLACE, flags, op=MPI.SUM)
    return bool(flags[0]), int(flags[1])


def allgather(comm: Any, watchdog: Watchdog, what: str, value: Any) -> list[Any]:
    """Every rank's small Python `value` (pickled: for one-off checks, never per step)."""
    with watchdog.guard(what):
        return comm.allgather(value)


# ---- gradients and parameters ---------------------------------------------------------------------


class GradientAverager:
    """One flat buffer holding every gradient, then the loss, then a failure count; `average`
    sums it over the ranks with one in-place Allreduce and divides by the number of ranks.

    The buffer's dtype is the gradients' common dtype (float32 models send float32, like DDP).
    `seconds` and `calls` count the time spent in the Allreduce (the step's communication)."""

    def __init__(self, comm: Any, shapes: Mapping[str, tuple[int, ...]], dtype: Any,
                 watchdog: Watchdog | None = None) -> None:
        self.comm = comm
        self.size = comm.Get_size()
        self.watchdog = watchdog or Watchdog(comm)
        sizes = [math.prod(shape) for shape in shapes.values()]
        self.buffer = np.zeros(sum(sizes) + 2, dtype=dtype)
        self.views: dict[str, np.ndarray] = {}
        offset = 0
        for (name, shape), n in zip(shapes.items(), sizes):
            self.views[name] = self.buffer[offset:offset + n].reshape(shape)
            offset += n
        self.seconds = 0.0
        self.calls = 0

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    def average(self, loss: float, grads: Mapping[str, np.ndarray] | None,
                step: int) -> tuple[float, dict[str, np.ndarray]]:
        """The mean loss and gradients over the ranks (views into the buffer, valid until the next
        call). `grads=None` says this rank's step raised: it sends zeros and a failure, and every
        rank raises RankFailed (the failing one should raise its own error instead)."""
        MPI = mpi()
        buf = self.buffer
        if grads is None:
            buf[:-1] = 0
            buf[-1] = 1
        else:
            for name, view in self.views.items():
                view[...] = grads[name]
            buf[-2], buf[-1] = loss, 0
        start = time.perf_counter()
        with self.watchdog.guard(f"the gradient allreduce of step {step}"):
            self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        failed = int(buf[-1])
        if failed:
            raise RankFailed(f"{failed} of {self.size} ranks raised an error in step {step} (its "
                             f"traceback is printed by that rank); this rank stops too")
        if self.size > 1:
            buf[:-1] /= self.size
        return float(buf[-2]), dict(self.views)


def _layout(arrays: Mapping[str, np.ndarray]) -> list[tuple[str, tuple[int, ...], str]]:
    return [(name, tuple(a.shape), a.dtype.str) for name, a in arrays.items()]


def broadcast_values(comm: Any, values: Mapping[str, np.ndarray], watchdog: Watchdog,
                     root: int = 0) -> None:
    """Overwrite every rank's arrays with rank `root`'s, bitwise (one Bcast of their bytes).
    Raises ValueError on every rank when the ranks hold different names, shapes or dtypes."""
    mine = _layout(values)
    with watchdog.guard("the parameter broadcast"):
        theirs = comm.bcast(mine, root=root)  # a small list of names and shapes, pickled once
    differ = [f"{a[0]} {a[1]} {a[2]} vs rank {root}'s {b[0]} {b[1]} {b[2]}"
              for a, b in zip(mine, theirs) if a != b]
    if len(mine) != len(theirs):
        differ.append(f"{len(mine)} parameters vs rank {root}'s {len(theirs)}")
    _, failed = agree(comm, watchdog, "the parameter check", failed=bool(differ))
    if failed:
        detail = ("; ".join(differ[:3]) if differ else "another rank's differ")
        raise ValueError(f"the ranks built different models ({failed} of {comm.Get_size()} differ from "
                         f"rank {root}): {detail}. Build the same graph on every rank")
    flat = np.empty(sum(a.nbytes for a in values.values()), dtype=np.uint8)
    offset = 0
    for a in values.values():
        flat[offset:offset + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        offset += a.nbytes
    with watchdog.guard("the parameter broadcast"):
        comm.Bcast(flat, root=root)
    offset = 0
    for a in values.values():
        a[...] = flat[offset:offset + a.nbytes].view(a.dtype).reshape(a.shape)
        offset += a.nbytes


def broadcast_arrays(comm: Any, arrays: Mapping[str, np.ndarray] | None, watchdog: Watchdog,
                     root: int = 0) -> dict[str, np.ndarray]:
    """Rank `root`'s named arrays on every rank (the others pass None): the layout is sent
    pickled (small), the data in one Bcast of bytes. For a checkpoint read by rank 0 alone."""
    mine = _layout(arrays) if comm.Get_rank() == root else None  # type: ignore[arg-type]
    with watchdog.guard("the checkpoint broadcast"):
        layout = comm.bcast(mine, root=root)
    out = {name: np.empty(shape, dtype=np.dtype(dtype)) for name, shape, dtype in layout}
    if comm.Get_rank() == root:
        for name, a in arrays.items():  # type: ignore[union-attr]
            out[name][...] = a
    broadcast_values(comm, out, watchdog, root)
    return out


def checksum(values: Mapping[str, np.ndarray]) -> int:
    """A 63-bit hash of the arrays' bytes (names and order included), to compare ranks bitwise."""
    import hashlib
    h = hashlib.blake2b(digest_size=8)
    for name, a in values.items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def identical_on_all_ranks(comm: Any, values: Mapping[str, np.ndarray]) -> bool:
    """True when every rank holds bitwise the same arrays (compares checksums: min == max)."""
    MPI = mpi()
    mine = checksum(values)
    low, high = comm.allreduce(mine, op=MPI.MIN), comm.allreduce(mine, op=MPI.MAX)
    return low == high


# ---- threads and output ---------------------------------------------------------------------------


def local_ranks(comm: Any, watchdog: Watchdog | None = None) -> int:
    """How many ranks of `comm` run on this node (they share its cores). Collective."""
    MPI = mpi()
    with watchdog.guard("counting the ranks on this node") if watchdog else contextlib.nullcontext():
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_size()
    finally:
        node.Free()


def threads_for(cores: int, ranks_on_node: int, environ: Mapping[str, str]) -> int | None:
    """cores // ranks_on_node (at least 1), or None where there is nothing to decide: the node's
    only rank, or the user has set one of THREAD_VARIABLES."""
    if ranks_on_node < 2 or any(environ.get(name, "").strip() for name in THREAD_VARIABLES):
        return None
    return max(1, cores // ranks_on_node)


def set_threads(comm: Any, watchdog: Watchdog | None = None) -> int | None:
    """Give this rank its share of the node's cores for BLAS: cores // ranks on the node, so that
    N ranks x their threads never oversubscribe the machine. Does nothing (returns None) when the
    user set any of THREAD_VARIABLES, or when this is the node's only rank. Sets
    UNROLL_MAX_THREADS, a cap under which the CPU backend's own rules still apply (small products
    on one thread, only free cores; OPENBLAS_NUM_THREADS would fix the count and turn them off),
    and limits the BLAS libraries already loaded (numpy's OpenBLAS) through threadpoolctl.
    Collective: every rank must call it."""
    ranks = local_ranks(comm, watchdog)  # first, so that every rank takes part whatever it decides
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    count = threads_for(cores, ranks, os.environ)
    if count is None:
        return None
    os.environ["UNROLL_MAX_THREADS"] = str(count)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=count)
    except ImportError:
        pass
    return count


@contextlib.contextmanager
def root_only_output(comm: Any) -> Iterator[None]:
    """Send stdout to /dev/null on every rank but 0 (stderr stays: errors show wherever they are)."""
    if is_root(comm):
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


__all__ = [
    "DEFAULT_TIMEOUT", "GradientAverager", "INSTALL_HINT", "RankFailed", "Watchdog", "abort_on_error",
    "agree", "allgather", "broadcast_arrays", "broadcast_values", "check_comm", "checksum", "default",
    "default_comm",
    "identical_on_all_ranks", "is_root", "local_batch", "local_ranks", "mpi", "root_only_output",
    "set_threads", "threads_for", "world",
]
