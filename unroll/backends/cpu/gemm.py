"""`pack_panels` and `packed_gemm` as Numba intrinsics over kernels_ir.py's LLVM functions.

The packed-weight product itself (layout, micro-kernel, measurements) is described and built in
kernels_ir.py; this module only wraps it for Numba-compiled kernels. Both are intrinsics whose
bodies are LLVM functions defined once per module (`linkonce_odr`), so a call site costs one call
instruction: Numba never type-infers them (generated code calls no other `@njit` function, which
would be linked into the caller and recompiled, see cpu.blas), and they are cached with the caller.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .kernels_ir import _aligned, _gemm_function, _i32, _i64, _pack_function

def _data(context, builder, ty, value) -> ir.Value:
    return context.make_array(ty)(context, builder, value=value).data


def _array_parts(context, builder, ty, value):
    arr = context.make_array(ty)(context, builder, value=value)
    shape = cgutils.unpack_tuple(builder, arr.shape, ty.ndim)
    strides = cgutils.unpack_tuple(builder, arr.strides, ty.ndim)
    return arr.data, shape, strides


def _float_bits(ty) -> int | None:
    """The element width of a C-contiguous float array type (the kernels assume unit inner strides)."""
    if isinstance(ty, types.Array) and ty.layout == "C" and ty.dtype in (types.float32, types.float64):
        return ty.dtype.bitwidth
    return None


@intrinsic
def pack_panels(typingctx, w, transposed, packed):
    """Pack the 2-D C-contiguous weight `w` (K x N; with `transposed`, w is N x K and the product
    uses its transpose) into `packed`, a contiguous array of ceil(N / NR) * K * NR elements."""
    bits = _float_bits(w)
    if bits is None or _float_bits(packed) != bits or w.ndim != 2:
        return None
    sig = types.void(w, transposed, packed)

    def codegen(context, builder, signature, args):
        w_v, trans_v, packed_v = args
        data, shape, strides = _array_parts(context, builder, signature.args[0], w_v)
        trans = builder.icmp_signed("!=", trans_v, trans_v.type(0))
        k = builder.select(trans, shape[1], shape[0])
        n = builder.select(trans, shape[0], shape[1])
        ld = builder.sdiv(strides[0], ir.Constant(_i64, bits // 8))
        fn = _pack_function(builder.module, bits)
        builder.call(fn, [data, ld, k, n, builder.zext(trans, _i32),
                          _aligned(builder, _data(context, builder, signature.args[2], packed_v))])
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def packed_gemm(typingctx, a, a_transposed, packed, c, accumulate):
    """c (+)= a @ w for w packed by `pack_panels`; a (M x K) and c (M x N) are C-contiguous 2-D
    arrays. With `a_transposed`, `a` holds the K x M array whose transpose is multiplied, read in
    place (the kernel's per-k loads of a block's rows are then contiguous)."""
    bits = _float_bits(a)
    if bits is None or _float_bits(packed) != bits or _float_bits(c) != bits or a.ndim != 2 or c.ndim != 2:
        return None
    sig = types.void(a, a_transposed, packed, c, accumulate)

    def codegen(context, builder, signature, args):
        a_v, trans_v, packed_v, c_v, acc_v = args
        size = ir.Constant(_i64, bits // 8)
        one = ir.Constant(_i64, 1)
        a_data, a_shape, a_strides = _array_parts(context, builder, signature.args[0], a_v)
        c_data, c_shape, c_strides = _array_parts(context, builder, signature.args[3], c_v)
        lda = builder.sdiv(a_strides[0], size)
        trans = builder.icmp_signed("!=", trans_v, trans_v.type(0))
        row_stride, k_stride = builder.select(trans, one, lda), builder.select(trans, lda, one)
        m, k = builder.select(trans, a_shape[1], a_shape[0]), builder.select(trans, a_shape[0], a_shape[1])
        fn = _gemm_function(builder.module, bits)
        builder.call(fn, [a_data, row_stride, k_stride, m, k,
                          _aligned(builder, _data(context, builder, signature.args[2], packed_v)), c_shape[1],
                          c_data, builder.sdiv(c_strides[0], size),
                          builder.zext(builder.icmp_signed("!=", acc_v, acc_v.type(0)), _i32)])
        return context.get_dummy_value()
    return sig, codegen
