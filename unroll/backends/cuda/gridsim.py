"""A multi-block CUDA emulator for testing grid-synchronized kernels on the CPU.

numba's simulator runs a grid's blocks one after another, so a kernel that waits for other blocks
(a persistent kernel's grid barrier) cannot run there with more than one block. This emulator runs
every thread of every block at once as a Python thread (tiny grids only: a few blocks of 32-64
threads), with real barriers for `cuda.syncthreads()` and `cg.this_grid().sync()`, atomics under a
lock and a thread switch interval of microseconds so that interleavings vary. It executes the
generated kernel's plain Python function on numpy arrays, with a fake `cuda` in its globals.

Used by the tests only; it implements just what the generated kernels call.

`IEEE_MATH` stands in for the `math` module of generated kernels that run as Python (here, and in
numba's simulator: `runtime` installs it there): Python's math raises where a GPU's libdevice returns
IEEE values (log(0) = -inf, sqrt(-1) = nan, exp(1000) = inf); this returns those values, computed in
double precision like Python's math.
"""

from __future__ import annotations

import math
import sys
import threading
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


class _Dim:
    def __init__(self, x: int, y: int = 1, z: int = 1) -> None:
        self.x, self.y, self.z = x, y, z


class _Atomic:
    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock

    def _op(self, array: np.ndarray, index: Any, fn: Callable[[Any], Any]) -> Any:
        with self._lock:
            old = array[index]
            array[index] = fn(old)
            return old

    def add(self, array, index, val):
        return self._op(array, index, lambda o: o + val)

    def exch(self, array, index, val):
        return self._op(array, index, lambda o: val)

    def max(self, array, index, val):
        return self._op(array, index, lambda o: max(o, val))

    def cas(self, array, index, old, val):
        return self._op(array, index, lambda o: val if o == old else o)


class _Shared:
    def __init__(self, emu: GridEmulator) -> None:
        self._emu = emu

    def array(self, shape, dtype):
        return self._emu._shared_array(shape, dtype)


class _Local:
    def array(self, shape, dtype):
        return np.zeros(shape, np.dtype(str(dtype)) if not isinstance(dtype, type) else dtype)


class _Grid:
    def __init__(self, emu: GridEmulator) -> None:
        self._emu = emu

    def sync(self) -> None:
        self._emu._grid_barrier.wait()


class _Cg:
    def __init__(self, emu: GridEmulator) -> None:
        self._emu = emu

    def this_grid(self) -> _Grid:
        return _Grid(self._emu)


def _ieee2(fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], float]:
    def call(x: Any, y: Any) -> float:
        with np.errstate(all="ignore"):
            return float(fn(np.float64(x), np.float64(y)))
    call.__name__ = fn.__name__
    return call


def _ieee(fn: Callable[[Any], Any]) -> Callable[[Any], float]:
    def call(x: Any) -> float:
        with np.errstate(all="ignore"):
            return float(fn(np.float64(x)))
    call.__name__ = fn.__name__
    return call


class _IeeeMath(types.SimpleNamespace):
    """The math functions generated kernels call, with IEEE results instead of Python's exceptions;
    any other name is Python's math's."""

    def __getattr__(self, name: str) -> Any:
        return getattr(math, name)


IEEE_MATH = _IeeeMath(exp=_ieee(np.exp), log=_ieee(np.log), log1p=_ieee(np.log1p), sqrt=_ieee(np.sqrt),
                      tanh=_ieee(np.tanh), expm1=_ieee(np.expm1), pow=_ieee2(np.power),
                      sin=_ieee(np.sin), cos=_ieee(np.cos))  # Python's math.sin(inf) raises; libdevice gives nan


def _np_dtype(dtype: Any) -> np.dtype:
    name = str(dtype)
    return np.dtype("bool" if name == "bool" or name == "boolean" else name)


class GridEmulator:
    """Run `fn(*args)` with grid x block threads at once (1-D grids and blocks)."""

    def __init__(self, grid: int | Sequence[int], block: int, shared_bytes: int = 0,
                 timeout: float = 120.0) -> None:
        g = (grid,) if isinstance(grid, int) else tuple(grid)
        self.dims = tuple(g) + (1,) * (3 - len(g))
        self.block = block
        self.shared_bytes = shared_bytes
        self.timeout = timeout
        n_blocks = self.dims[0] * self.dims[1] * self.dims[2]
        self._n_blocks = n_blocks
        self._lock = threading.Lock()
        self._local = threading.local()
        self._grid_barrier = threading.Barrier(n_blocks * block, timeout=timeout)
        self._block_barriers = [threading.Barrier(block, timeout=timeout) for _ in range(n_blocks)]
        self._shared: list[list[np.ndarray]] = [[] for _ in range(n_blocks)]
        self._dynamic = [bytearray(max(shared_bytes, 8)) for _ in range(n_blocks)]
        self.atomic = _Atomic(self._lock)
        self.shared = _Shared(self)
        self.local = _Local()
        self.cg = _Cg(self)
        self.gridDim = _Dim(*self.dims)
        self.blockDim = _Dim(block)

    # -- the fake cuda module's API
    @property
    def threadIdx(self) -> _Dim:
        return self._local.tid

    @property
    def blockIdx(self) -> _Dim:
        return self._local.bid

    def grid(self, ndim: int) -> int:
        return self._local.bid.x * self.block + self._local.tid.x

    def gridsize(self, ndim: int) -> int:
        return self.dims[0] * self.block

    def syncthreads(self) -> None:
        self._block_barriers[self._local.block].wait()

    def threadfence(self) -> None:
        pass

    def nanosleep(self, ns: int) -> None:
        time.sleep(0)

    def _shared_array(self, shape, dtype) -> np.ndarray:
        b = self._local.block
        k = self._local.shared_calls
        self._local.shared_calls += 1
        with self._lock:
            arrays = self._shared[b]
            if k < len(arrays):
                return arrays[k]
            dt = _np_dtype(dtype)
            if shape == 0:
                arr = np.frombuffer(self._dynamic[b], dtype=dt)
            else:
                arr = np.zeros(shape, dt)
                arr[...] = np.nan if dt.kind == "f" else 0  # never read before written
            arrays.append(arr)
            return arr

    # -- running
    def run(self, fn: Callable, args: Sequence[Any]) -> None:
        gx, gy, gz = self.dims
        fake = self
        glob = dict(fn.__globals__)
        glob["cuda"] = fake
        glob["math"] = IEEE_MATH
        patched = types.FunctionType(fn.__code__, glob, fn.__name__, fn.__defaults__, fn.__closure__)
        errors: list[BaseException] = []

        def thread_main(block: int, bid: tuple[int, int, int], tid: int) -> None:
            fake._local.tid = _Dim(tid)
            fake._local.bid = _Dim(*bid)
            fake._local.block = block
            fake._local.shared_calls = 0
            try:
                patched(*args)
            except threading.BrokenBarrierError:
                pass
            except BaseException as err:
                errors.append(err)
                self._grid_barrier.abort()
                for b in self._block_barriers:
                    b.abort()

        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)
        try:
            threads = []
            block = 0
            for z in range(gz):
                for y in range(gy):
                    for x in range(gx):
                        for t in range(self.block):
                            threads.append(threading.Thread(target=thread_main, args=(block, (x, y, z), t),
                                                            daemon=True))
                        block += 1
            for th in threads:
                th.start()
            for th in threads:
                th.join(self.timeout)
        finally:
            sys.setswitchinterval(old_interval)
        if errors:
            raise errors[0]
        if any(th.is_alive() for th in threads):
            raise TimeoutError("grid emulator: threads did not finish (deadlock?)")


def emulate_program(program: Any, arrays: Sequence[np.ndarray], env_out: dict | None = None) -> list[np.ndarray]:
    """Run every kernel of a `cuda.backend.Program` on numpy arrays with the emulator (host loops as
    Python loops), inputs in program.inputs order; returns the outputs shaped like the graph's."""
    from ...ir.node import proj
    from .codegen import NP_DTYPES
    from .runtime import python_function
    from .backend import HostLoop
    from .kernels import raise_if_flagged

    checks: dict[Any, tuple[Any, np.ndarray]] = {}  # onehot error buffers, read after the run

    def flat(node: Any) -> np.ndarray:
        return np.zeros(max(1, node.tensor_type.size), NP_DTYPES[node.dtype])

    def run(prog: Any, env: dict) -> list[np.ndarray]:
        state = run.__dict__.setdefault(id(prog), {})
        for step in prog.steps:
            if isinstance(step, HostLoop):
                loop(step, env)
                continue
            launch(step.spec, env, state)
        return [env[o] if o in env else env.setdefault(o, flat(o)) for o in prog.outputs]

    def launch(spec: Any, env: dict, state: dict) -> None:
        args = []
        for _, _, (kind, key) in spec.params:
            if kind == "node":
                if key not in env:
                    env[key] = flat(key)
                args.append(env[key])
            elif kind == "scratch":
                size, dtype = spec.scratch[key]
                args.append(state.setdefault(key, np.zeros(size, NP_DTYPES[dtype])))
                if key in spec.checks:
                    checks.setdefault((key, id(args[-1])), (spec.checks[key], args[-1]))
            else:
                args.append(spec.constants[key])
        GridEmulator(spec.grid, spec.block, spec.shared_bytes).run(python_function(spec), args)

    def loop(step: Any, env: dict) -> None:
        for spec in step.pre:
            launch(spec, env, {})
        node, info = step.node, step.node.arg
        n_c, n_h = info.n_consts, info.n_carry
        srcs = [env[s] for s in node.src]
        carries = [srcs[n_c + k].copy() for k in range(n_h)]
        sizes = [a.tensor_type.size for a in info.body.inputs[n_c + n_h:]]
        ys = [env.setdefault(proj(node, n_h + j), flat(proj(node, n_h + j))) for j in range(info.n_ys)]
        y_sizes = [o.tensor_type.size for o in info.body.outputs[n_h:]]
        for s in range(info.length):
            t = info.length - 1 - s if info.reverse else s
            args = srcs[:n_c] + carries + [x[t * n:(t + 1) * n] for x, n in zip(srcs[n_c + n_h:], sizes)]
            outs = run(step.body, dict(zip(step.body.inputs, args)))
            carries = [o.copy() for o in outs[:n_h]]
            for yb, o, n in zip(ys, outs[n_h:], y_sizes):
                yb[t * n:(t + 1) * n] = o[:n]
        for k in range(n_h):
            env[proj(node, k)] = carries[k]

    env = {n: np.ascontiguousarray(a, NP_DTYPES[n.dtype]).reshape(-1).copy() if np.size(a) else
           np.zeros(1, NP_DTYPES[n.dtype]) for n, a in zip(program.inputs, arrays)}
    outs = run(program, env)
    for node, flags in checks.values():
        raise_if_flagged(node, flags)
    if env_out is not None:
        env_out.update(env)
    return [o[:n.tensor_type.size].reshape(n.shape) for o, n in zip(outs, program.outputs)]
