"""The numba.cuda side of the CUDA backend: device checks, loading generated kernels (cached as
hash-named modules), device buffers, launches and CUDA-graph capture. The only module of the backend
that touches numba.cuda; it is imported lazily by `cuda.backend` (so `import unroll` never imports
numba).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import cache
from .codegen import NP_DTYPES
from .kernels import KernelSpec
from .loop import DeviceProps

NO_GPU_MESSAGE = ("backend='cuda' needs an NVIDIA GPU; none was found (numba.cuda.is_available() is "
                  "False). Use backend='numba' or set NUMBA_ENABLE_CUDASIM=1 to run in the simulator")


class CudaUnavailableError(RuntimeError):
    """No GPU and no simulator: the message says what to do instead."""


def cuda_module():
    from numba import cuda
    return cuda


def simulator_enabled() -> bool:
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return True
    from numba import config
    return bool(getattr(config, "ENABLE_CUDASIM", False))


def require_device() -> None:
    """Raise CudaUnavailableError unless a GPU (or the simulator) is there."""
    try:
        cuda = cuda_module()
    except Exception as err:  # numba-cuda not installed or broken
        raise CudaUnavailableError(f"{NO_GPU_MESSAGE} (importing numba.cuda failed: {err})") from None
    if simulator_enabled():
        return
    try:
        ok = cuda.is_available()
    except Exception:  # a broken driver install reports here
        ok = False
    if not ok:
        raise CudaUnavailableError(NO_GPU_MESSAGE)


def device_props() -> DeviceProps:
    if simulator_enabled():
        return DeviceProps(sm_count=1, max_shared_bytes=48 * 1024, simulator=True)
    dev = cuda_module().get_current_device()
    sms = int(dev.MULTIPROCESSOR_COUNT)
    try:
        smem = int(dev.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
    except Exception:
        smem = int(dev.MAX_SHARED_MEMORY_PER_BLOCK)
    return DeviceProps(sm_count=sms, max_shared_bytes=smem, simulator=False)


def device_name() -> str:
    if simulator_enabled():
        return "numba CUDA simulator"
    name = cuda_module().get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)


# ---- generated modules -----------------------------------------------------------------------------

def cache_dir() -> str:
    return os.path.join(cache.default_dir(), "cuda")


def load_module(source: str) -> Any:
    """The module of this generated source, written once under its content hash and validated
    (backends.cache), so numba's cache=True can key compiled kernels on a real file."""
    name = cache.module_name("unroll_cuda_", source)
    with cache.entry_lock(cache_dir(), name):
        return cache.load_module("unroll_cuda_", source, cache_dir())[0]


def python_function(spec: KernelSpec) -> Callable:
    """The kernel as a plain Python function (for cuda.jit, compile_ptx and the grid emulator)."""
    return getattr(load_module(spec.source), spec.name)


class Kernel:
    """A compiled kernel with its launch shape; `launch(args, stream)`."""

    def __init__(self, spec: KernelSpec) -> None:
        cuda = cuda_module()
        self.spec = spec
        fn = python_function(spec)
        self.simulator = simulator_enabled()
        if self.simulator:
            # the simulator runs the kernel as Python: math with IEEE results where Python's raises
            # (log(0), sqrt(-1), exp(1000)), as libdevice returns them on a GPU
            from .gridsim import IEEE_MATH
            fn.__globals__["math"] = IEEE_MATH
            self._fake = cuda.jit(spec.signature)(fn)
            return
        dispatcher = cuda.jit(spec.signature, cache=True)(fn)
        self._kernel = next(iter(dispatcher.overloads.values()))
        # what numba's own launch path passes: 3-D grid and block
        self._grid = tuple(spec.grid) + (1,) * (3 - len(spec.grid))
        self._block = (spec.block, 1, 1)
        if spec.shared_bytes > 48 * 1024:
            _allow_shared(self._kernel, spec.shared_bytes)

    def max_coresident_blocks(self) -> int:
        if self.simulator:
            return 1
        return int(self._kernel.max_cooperative_grid_blocks(self.spec.block, self.spec.shared_bytes))

    @property
    def resources(self) -> dict:
        if self.simulator:
            return {}
        k = self._kernel
        return {"registers": k.regs_per_thread, "local_bytes": k.local_mem_per_thread,
                "static_shared_bytes": k.shared_mem_per_block}

    def launch(self, args: Sequence[Any], stream: Any) -> None:
        s = self.spec
        if self.simulator:
            self._fake[s.grid, s.block, stream, s.shared_bytes](*args)
        else:
            self._kernel.launch(list(args), self._grid, self._block, stream, s.shared_bytes)


def _allow_shared(kernel: Any, nbytes: int) -> None:
    """Opt the kernel in to more than 48 KB of dynamic shared memory."""
    from numba.cuda.cudadrv.driver import binding, driver
    cufunc = kernel._codelibrary.get_cufunc()
    attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    driver.cuKernelSetAttribute(attr, int(nbytes), cufunc.handle, cufunc.device.id)


_KERNELS: dict[str, Kernel] = {}


def kernel(spec: KernelSpec) -> Kernel:
    key = spec.digest + f"/{spec.grid}/{spec.block}/{spec.shared_bytes}"
    k = _KERNELS.get(key)
    if k is None:
        k = _KERNELS[key] = Kernel(spec)
    return k


# ---- buffers -----------------------------------------------------------------------------------------

def empty(size: int, dtype: str, stream: Any = 0) -> Any:
    return cuda_module().device_array(max(1, size), dtype=NP_DTYPES[dtype], stream=stream)


def upload(array: np.ndarray, stream: Any = 0) -> Any:
    return cuda_module().to_device(np.ascontiguousarray(array).reshape(-1) if array.size else
                                   np.zeros(1, array.dtype), stream=stream)


def is_device_array(value: Any) -> bool:
    if hasattr(value, "__cuda_array_interface__"):
        return True
    return type(value).__name__ in ("DeviceNDArray", "FakeCUDAArray", "MappedNDArray")


def as_device(value: Any) -> Any:
    """A numba device array viewing `value` (numba, CuPy or PyTorch GPU arrays; no copy)."""
    if type(value).__name__ in ("DeviceNDArray", "FakeCUDAArray", "MappedNDArray"):
        return value
    return cuda_module().as_cuda_array(value)


def new_stream() -> Any:
    return cuda_module().stream()


# ---- CUDA graphs -------------------------------------------------------------------------------------

class CapturedGraph:
    """A CUDA graph captured from the launches `record()` issues on `stream`; `replay()` launches
    them all with one driver call (a numba launch costs ~50 us of Python; a replay ~10 us total)."""

    def __init__(self, stream: Any, record: Callable[[], None]) -> None:
        from cuda.bindings import driver as cu
        self._cu = cu
        self._stream = int(stream.handle) if hasattr(stream, "handle") else int(stream)
        _check(cu.cuStreamBeginCapture(self._stream,
                                       cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED))
        try:
            record()
        except BaseException:
            try:
                cu.cuStreamEndCapture(self._stream)
            finally:
                raise
        graph = _check(cu.cuStreamEndCapture(self._stream))
        self._graph = graph
        self._exec = _check(cu.cuGraphInstantiate(graph, 0))

    def replay(self) -> None:
        _check(self._cu.cuGraphLaunch(self._exec, self._stream))


def _check(result: Any) -> Any:
    from cuda.bindings import driver as cu
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver call failed: {err}")
    return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)
