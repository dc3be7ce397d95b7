"""Graph -> source of one kernel function: loops stay rolled, buffers are preallocated.

The source is a small kernel language in Python syntax (what `native.py` renders to LLVM IR, and
what Numba compiles as `@njit` where the renderer refuses it).

The generated function takes the graph's input arrays, `dims` (int64) and `fk` (float64) and returns
the output arrays. Everything shape-dependent -- sizes, loop lengths, slice bounds, float constants
such as a mean's 1/count -- is read from `dims`/`fk` at run time, never written into the source, so
graphs that differ only in T or B produce the *same* source, hence the same content hash, module
and Numba cache entry (sizes 0 and 1 and "simple" constants stay literal; equal sizes share one
name, so a coincidence such as T == H gives another, equally valid, source).

Lowering, by op (see `emitters.EMITTERS`):
- values are `Val`s: an array variable plus an index map, so transpose/slice/broadcast/stop_gradient
  are free views resolved at code-generation time (loops index the underlying buffer directly, which
  keeps unit strides visible to LLVM);
- elementwise ops with one user of the same shape are inlined into that user's loop nest, and a
  FUSED node's body becomes one loop nest per output shape (scalar statements, no temporaries);
- matmul calls BLAS (`cpu.blas.xxgemm`); inside a loop, a product by a loop-invariant weight
  packs that weight once before the loop and runs `gemm.packed_gemm` up to a size chosen at
  run time (BLAS above it), other per-step products run as loops when small; `c + a @ b`
  accumulates in place (beta=1), directly into the carried buffer when it is a loop carry read
  nowhere else (BPTT weight gradients), and `c + pad_rows(a @ b)` into the row range of c the
  pad leaves nonzero (a convolution's taps, nn/conv.py: a chain of them shares one buffer); a
  range of rows of a C-contiguous array is itself a plain array (`x[a:b]`), so BLAS reads and
  writes it in place;
- a LOOP is a `for t in range(...)` in the same function; every per-step buffer is allocated once
  before the outermost loop, per-step outputs are written straight into `ys[t]`, and carries swap
  buffers at the end of a step instead of copying.
Each emitted line remembers its node, so compile errors can name the op and the user's line.

The generator is laid out in layers, one module each:
  values.py     value views: `Val` (a buffer and an index map), `Dims` (run-time sizes and
                constants), index maps (broadcast, offset, per-step views)
  scalars.py    scalar expressions: the CPU table derived from lower/scalar.py, the opted-in
                decompositions of lower/decompose.py, typed literals (`SPELLING`)
  schedule.py   scheduling decisions: inlining, in-place accumulation, write targets (concat
                parts, ys[t], carries)
  emitters.py   the per-op emitters (`EMITTERS`)
  loops.py      loop emission (buffers, packed weights, the end of a step)
  emit.py       `Codegen`: scopes, blocks, allocation, the function's source
This module is their front: `generate(graph)`.
"""

from __future__ import annotations

from .emit import Block, Codegen, generate
from .emitters import EMITTERS, ONEHOT_ERROR, UnsupportedOp
from .scalars import CPU_DECOMPOSITIONS, CPU_EXPRS, CPU_PRIMITIVES, SPELLING, scalar_statements
from .values import Dims, Val

__all__ = ["Block", "CPU_DECOMPOSITIONS", "CPU_EXPRS", "CPU_PRIMITIVES", "Codegen", "Dims", "EMITTERS",
           "ONEHOT_ERROR", "SPELLING", "UnsupportedOp", "Val", "generate", "scalar_statements"]
