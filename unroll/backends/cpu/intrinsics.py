"""The scalar primitives `lower/decompose.py`'s statements name, as Numba intrinsics for generated code.

Their IR and their contracts are kernels_ir.py's (shared with the native renderer). All are
intrinsics, not `@njit` helpers, for the reason of `cpu.blas`: their IR is emitted inline into the
caller (a handful of instructions, which LLVM vectorises with the loop around them), no callee
module is linked in, and the caller stays cacheable.
"""

from __future__ import annotations

from numba import types
from numba.extending import intrinsic

from .kernels_ir import fmuladd_ir, ldexp_ir, pow2_ir, scale_ir


def _float(ty) -> int | None:
    return ty.bitwidth if isinstance(ty, types.Float) else None


@intrinsic
def fmuladd(typingctx, a, b, c):
    """a * b + c with one rounding where the target has FMA; never reassociated."""
    bits = _float(a)
    if bits is None or not a == b == c:
        return None
    return a(a, b, c), lambda context, builder, signature, args: fmuladd_ir(builder, *args, bits)


@intrinsic
def pow2(typingctx, n):
    """2**n for a float n holding an integer of the normal exponent range."""
    bits = _float(n)
    if bits is None:
        return None
    return n(n), lambda context, builder, signature, args: pow2_ir(builder, args[0], bits)


@intrinsic
def scale(typingctx, p, n):
    """p * 2**n rounded once, for |p| < 2 and n in -125..128 (float32); see the module docstring."""
    bits = _float(p)
    if bits is None or n != p:
        return None
    return p(p, n), lambda context, builder, signature, args: scale_ir(builder, *args, bits)


@intrinsic
def ldexp(typingctx, p, n):
    """p * 2**n rounded once, subnormal results included; see the module docstring."""
    bits = _float(p)
    if bits is None or n != p:
        return None
    return p(p, n), lambda context, builder, signature, args: ldexp_ir(builder, *args, bits)
