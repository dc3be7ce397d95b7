"""The BLAS entry point generated code calls: `xxgemm`, an intrinsic over Numba's `numba_xxgemm`.

Generated code must not call other `@njit` functions: Numba links a callee's whole LLVM module into
every caller and re-optimises it (measured: +4 s of compile per call site signature). An intrinsic is
lowered inline into the caller instead, and `numba_xxgemm` is resolved by symbol name, so the
caller stays cacheable. It is the function `np.dot` uses inside Numba (scipy's OpenBLAS), exposed
with transposes, leading dimensions and beta, so transposed weights, per-step slices `ys[t]` and
accumulation (`beta=1`) need no copies. Arguments are column-major BLAS gemm's; alpha/beta are
scalars of the matrices' dtype ('s': float32, 'd': float64).

The matrices are passed as arrays, not as `arr.ctypes.data` integers: Numba frees an array after
its last use, and a pointer taken as an int is not a use, so a temporary whose last use was
`.ctypes.data` was freed before BLAS read it (large arrays are unmapped: a segfault in the large
benchmark configuration; small ones were read from freed heap). As arguments, the arrays live until
the call returns.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_ll_char = ir.IntType(8)
_ll_voidp = cgutils.voidptr_t


@intrinsic
def xxgemm(typingctx, kind, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Column-major BLAS gemm via Numba's helper `numba_xxgemm` (resolved by name, so cacheable)."""
    for arr in (a, b, c):
        if not isinstance(arr, types.Array):
            return None
    sig = types.int32(kind, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)

    def codegen(context, builder, signature, args):
        (kind_v, ta, tb, m_v, n_v, k_v, alpha_v, a_v, lda_v, b_v, ldb_v, beta_v, c_v, ldc_v) = args
        intp_t = context.get_value_type(types.intp)
        fnty = ir.FunctionType(ir.IntType(32), [_ll_char, _ll_char, _ll_char, intp_t, intp_t, intp_t,
                                                _ll_voidp, _ll_voidp, intp_t, _ll_voidp, intp_t,
                                                _ll_voidp, _ll_voidp, intp_t])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemm")
        alpha_slot = cgutils.alloca_once_value(builder, alpha_v)
        beta_slot = cgutils.alloca_once_value(builder, beta_v)

        def as_char(v):
            return builder.trunc(v, _ll_char)

        def data(value, ty):
            return builder.bitcast(context.make_array(ty)(context, builder, value=value).data, _ll_voidp)

        arg_types = signature.args
        return builder.call(fn, (as_char(kind_v), as_char(ta), as_char(tb), m_v, n_v, k_v,
                                 builder.bitcast(alpha_slot, _ll_voidp), data(a_v, arg_types[7]), lda_v,
                                 data(b_v, arg_types[9]), ldb_v, builder.bitcast(beta_slot, _ll_voidp),
                                 data(c_v, arg_types[12]), ldc_v))
    return sig, codegen


@intrinsic
def blas_threads(typingctx, set_threads_ptr, threads):
    """Call OpenBLAS's `openblas_set_num_threads(threads)` through the function pointer
    `set_threads_ptr` (an int; 0 means no control and does nothing). The pointer is a run-time
    argument, not a constant, so the compiled code stays valid in a cached module loaded by
    another process where the library sits at another address."""
    sig = types.void(set_threads_ptr, threads)

    def codegen(context, builder, signature, args):
        ptr_v, threads_v = args
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(32)])
        with builder.if_then(builder.icmp_unsigned("!=", ptr_v, ptr_v.type(0)), likely=True):
            fn = builder.inttoptr(ptr_v, fnty.as_pointer())
            builder.call(fn, [builder.trunc(threads_v, ir.IntType(32))])
        return context.get_dummy_value()
    return sig, codegen
