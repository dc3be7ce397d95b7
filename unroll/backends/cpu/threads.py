"""How many BLAS threads a compiled step uses: threads only where they pay, never more than are free.

Generated code is single-threaded; only scipy's OpenBLAS, which it calls for the large products
(input projections, weight gradients, per-step products above the packed kernel's size), can run
threads. Two rules decide how many, per call of a compiled step:

1. Size. A step whose largest BLAS product (outside loops at its full size, inside a loop at its
   per-step size) is under `MIN_MACS_FOR_THREADS` multiply-adds runs on one thread: there a second thread saves less than it costs, and an OpenBLAS worker spinning between
   calls takes the core another process (or this one's elementwise code) needs.
2. Load. Otherwise it takes the cores no other process is using, measured from /proc/stat's busy
   time minus this process's own CPU time over the last half second, so this process's own BLAS
   threads never count as load (after a pause longer than STALE_SECONDS, the kernel's count of
   runnable threads stands in until the next window). Measured on 2 cores with 2 busy processes beside it, an LSTM step
   that used two BLAS threads went from 1.3 ms to 18-48 ms; on one thread it took 2.0 ms.

The user's setting always wins and turns both rules off: `UNROLL_NUMBA_BLAS_THREADS` (and
`UNROLL_NUMBA_BLAS_LOOP_THREADS` for products inside time loops), else `OPENBLAS_NUM_THREADS`, else
`OMP_NUM_THREADS`. `UNROLL_MAX_THREADS` is a cap instead: both rules still apply, under it (what
`unroll.distributed.set_threads` gives each MPI rank: its share of the node's cores, while a rank's
small products still run on one thread).
"""

from __future__ import annotations

import os
import time

MIN_MACS_FOR_THREADS = 256 * 1024 * 1024
SAMPLE_SECONDS = 0.5
STALE_SECONDS = 2.0
_USER_VARIABLES = ("UNROLL_NUMBA_BLAS_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
CAP_VARIABLE = "UNROLL_MAX_THREADS"


def _int_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return max(1, int(value)) if value.isdigit() else None


def user_threads() -> tuple[int, int] | None:
    """(outside, inside loops) as the user set them, or None for the adaptive default."""
    outside = next((v for v in map(_int_env, _USER_VARIABLES) if v is not None), None)
    inside = _int_env("UNROLL_NUMBA_BLAS_LOOP_THREADS")
    if outside is None and inside is None:
        return None
    cores = os.cpu_count() or 1
    outside = outside or cores
    return outside, inside or outside


class FreeCores:
    """Cores other processes leave free, re-measured at most every SAMPLE_SECONDS."""

    def __init__(self) -> None:
        self.cores = os.cpu_count() or 1
        self._last = self._sample()
        self.free = float(self.cores)

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        """(wall seconds, busy seconds of all cores, this process's CPU seconds), None off Linux."""
        try:
            with open("/proc/stat") as f:
                fields = [float(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        own = os.times()
        return time.monotonic(), (sum(fields) - idle) / ticks, own.user + own.system

    def now(self) -> float:
        last = self._last
        if last is None or time.monotonic() - last[0] < SAMPLE_SECONDS:
            return self.free
        current = self._sample()
        if current is None:
            return self.free
        wall = current[0] - last[0]
        if wall > STALE_SECONDS:  # the window spans a pause: what runs now says more
            self._last = current
            self.free = max(0.0, self.cores - _running_elsewhere())
            return self.free
        others = max(0.0, (current[1] - last[1]) - (current[2] - last[2])) / wall
        self.free = max(0.0, self.cores - others)
        self._last = current
        return self.free


def _running_elsewhere() -> float:
    """Runnable threads on the machine now, less this one (/proc/loadavg's fourth field)."""
    try:
        with open("/proc/loadavg") as f:
            return max(0.0, float(f.read().split()[3].split("/")[0]) - 1)
    except (OSError, ValueError, IndexError):
        return 0.0


_FREE = FreeCores()


def choose(max_macs: int) -> tuple[int, int]:
    """(threads outside time loops, threads inside them) for a step whose largest product has
    `max_macs` multiply-adds."""
    fixed = user_threads()
    if fixed is not None:
        return fixed
    if max_macs < MIN_MACS_FOR_THREADS:
        return 1, 1
    threads = max(1, min(_FREE.cores, _int_env(CAP_VARIABLE) or _FREE.cores, int(_FREE.now() + 0.25)))
    return threads, threads
