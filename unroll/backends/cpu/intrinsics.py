"""The scalar primitives `lower/decompose.py`'s statements name, as Numba intrinsics for generated code.

`fmuladd(a, b, c)` is a * b + c (LLVM's `llvm.fmuladd`: one fused operation where the CPU has FMA,
else a multiply and an add). Generated code is compiled with fast-math `reassoc`, which lets LLVM
refactor `x - n*C1 - n*C2` into `x - n*(C1 + C2)` and so undo the split ln 2 of an exp's range
reduction; an intrinsic call is opaque to that reassociation.

The powers of two take the exponent `n` as a float holding an integer (what `np.rint` returns) and
read it through the magic-number add n + 1.5 * 2**23 (float64: 2**52), whose low mantissa bits are
then n: no float -> int conversion, which LLVM leaves undefined for NaN. Their float operations carry
an explicit flag, so Numba's fast-math pass (which flags only unflagged operations) leaves them as
written and LLVM cannot reassociate them with the caller's arithmetic (it did: `(p + p) * 2**127`
became `p * (2**127 + 2**127)` = p * inf).

`pow2(n)`    2**n, n in the normal exponent range (float32: -126..127): two integer operations.
`scale(p, n)` p * 2**n rounded once, for |p| < 2 and n in -125..128 (float32; -126 gives 0): the
             doubling (p + p) * 2**(n - 1) reaches 2**128 * p without building 2**128 (inf).
`ldexp(p, n)` p * 2**n rounded once, into the subnormals too, for 0.5 <= |p| < 2 and |n| <= 250
             (float32): half of n is added to p's exponent field (an integer add: exact), the other
             half is a power from bits, and one multiply rounds. A NaN p is not kept (the integer
             add may turn it into a number): callers select NaN back.

All are intrinsics, not `@njit` helpers, for the reason of `cpu.blas`: their IR is emitted inline
into the caller (a handful of instructions, which LLVM vectorises with the loop around them), no
callee module is linked in, and the caller stays cacheable.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

# float width -> (integer type of its bits, mantissa bits, exponent bias, magic number, its bits)
_LAYOUT = {32: (ir.IntType(32), 23, 127, 1.5 * 2.0**23, 0x4B400000),
           64: (ir.IntType(64), 52, 1023, 1.5 * 2.0**52, 0x4338000000000000)}
_FLAGS = ("nsz",)   # an explicit flag: Numba's fast-math pass adds none to these operations


def _float(ty) -> int | None:
    return ty.bitwidth if isinstance(ty, types.Float) else None


def _exponent(builder: ir.IRBuilder, n: ir.Value, bits: int) -> ir.Value:
    """The integer n of a float n (integral, |n| < 2**22), through the magic-number add."""
    int_t, _, _, magic, magic_bits = _LAYOUT[bits]
    shifted = builder.fadd(n, ir.Constant(n.type, magic), flags=_FLAGS)
    return builder.sub(builder.bitcast(shifted, int_t), int_t(magic_bits))


def _power(builder: ir.IRBuilder, k: ir.Value, bits: int, float_t: ir.Type) -> ir.Value:
    """2**k as a float from the integer k (normal exponent range)."""
    int_t, mantissa, bias, _, _ = _LAYOUT[bits]
    return builder.bitcast(builder.shl(builder.add(k, int_t(bias)), int_t(mantissa)), float_t)


# the primitives' IR, shared by the Numba intrinsics below and the native renderer (cpu/native.py)

def fmuladd_ir(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value, bits: int) -> ir.Value:
    ty = a.type
    fn = builder.module.globals.get(f"llvm.fmuladd.f{bits}") or ir.Function(
        builder.module, ir.FunctionType(ty, [ty, ty, ty]), f"llvm.fmuladd.f{bits}")
    return builder.call(fn, [a, b, c])


def pow2_ir(builder: ir.IRBuilder, n: ir.Value, bits: int) -> ir.Value:
    return _power(builder, _exponent(builder, n, bits), bits, n.type)


def scale_ir(builder: ir.IRBuilder, p: ir.Value, n: ir.Value, bits: int) -> ir.Value:
    int_t = _LAYOUT[bits][0]
    power = _power(builder, builder.sub(_exponent(builder, n, bits), int_t(1)), bits, p.type)
    return builder.fmul(builder.fadd(p, p, flags=_FLAGS), power, flags=_FLAGS)


def ldexp_ir(builder: ir.IRBuilder, p: ir.Value, n: ir.Value, bits: int) -> ir.Value:
    int_t, mantissa, _, _, _ = _LAYOUT[bits]
    k = _exponent(builder, n, bits)
    k1 = builder.ashr(k, int_t(1))
    scaled = builder.bitcast(builder.add(builder.bitcast(p, int_t), builder.shl(k1, int_t(mantissa))), p.type)
    return builder.fmul(scaled, _power(builder, builder.sub(k, k1), bits, p.type), flags=_FLAGS)


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
