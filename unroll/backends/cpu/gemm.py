"""Per-step products with a packed, loop-invariant weight: an LLVM vector micro-kernel for Numba code.

Inside a time loop an RNN multiplies a small activation `a` (M x K, M = batch) by the same weight
every step. BLAS re-packs that weight on every call (OpenBLAS's sgemm_itcopy was 16 % of an LSTM
training step's samples) and pays its call and thread start-up cost per step, which dominates at
small M. Here the weight is packed once before the loop (`pack_panels`) into column panels of
NR = two vector registers' width (16 float32), zero-padded, in chunks of KC rows of K, chunk-major
(chunk 0 of every panel, then chunk 1, ...), each panel's chunk contiguous:

    packed[j, p, kk, r] = w[j * KC + kk, p * NR + r]          (0 where p * NR + r >= N)

and `packed_gemm` computes `c (+)= a @ w` from it with a register-blocked micro-kernel: up to MR
rows of `a` times one panel's chunk, MR * 2 vector accumulators, one broadcast of `a[i, k]` and two
vector loads of the panel per k (the classic BLIS/OpenBLAS 6 x 16 shape for float32 on AVX2). The
chunk of the panel stays in L1 while every row block uses it; later chunks add to c. Rows are split
into nearly equal blocks of at most MR (8 rows: 4 + 4, never 6 + 2), and each row count 1..MR has
its own kernel, so no arithmetic is spent on padding rows; the last panel of an N that is not a
multiple of NR stores element by element.

Both are Numba intrinsics whose bodies are LLVM functions defined once per module (`linkonce_odr`),
so a call site costs one call instruction: Numba never type-infers them (generated code calls no
other `@njit` function, which would be linked into the caller and recompiled, see cpu.blas),
and they are cached with the caller. Vectors are 256 bits; LLVM lowers the vector FMA to `vfmadd`
on AVX2/FMA machines and to narrower instructions elsewhere (slower, still correct). float64 uses
the same code with 4-element vectors.

Measured on this 2-core AMD EPYC (float32, one process, packed on one thread / OpenBLAS with two
threads, time per product): 8 x 128 x 512 12 / 41-57 us (85-90 GFLOP/s), 16 x 64 x 256 6 / 16-20 us,
32 x 256 x 1024 0.21-0.33 / 0.27-0.33 ms, 64 x 256 x 1024 equal; 64 x 512 x 2048 3-4x slower
(its 4 MB of panels stream from L3 every product). Hence PACKED_MAX_MACS: above it the generated
code calls BLAS. The kernel runs on the calling thread: splitting the panels between two threads
with Numba's prange cost 20-40 us per step to start and gained at most 1.5x on 32 x 1024 x 256,
and OpenBLAS's own threads (still used outside loops) spin while a prange worker needs their core.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

MR = 6              # rows of `a` per micro-kernel call
ALIGN = 64           # bytes: packed panels start on a cache line
# per-step products up to this many multiply-adds run in the micro-kernel on one thread, larger ones
# call BLAS with its threads (measured here, one process: packed / BLAS-2-threads time 0.5-0.75
# up to 8M multiply-adds (32 x 256 x 1024), 1.0-1.1 at 12-17M, 1.2 at (128 x 128 x 512))
PACKED_MAX_MACS = 12 * 1024 * 1024
KC = 128             # K per chunk: one panel's chunk is KC * NR elements (8 KB in float32)
VECTOR_BITS = 256   # two vectors of this width make one panel row (NR elements)

_i64 = ir.IntType(64)
_i32 = ir.IntType(32)


def panel_width(dtype_bits: int) -> int:
    """NR: elements per packed panel row (two vectors)."""
    return 2 * VECTOR_BITS // dtype_bits


def _float_type(bits: int) -> ir.Type:
    return ir.FloatType() if bits == 32 else ir.DoubleType()


def _function(module: ir.Module, name: str, params: list[ir.Type]) -> tuple[ir.Function, ir.IRBuilder | None]:
    """The module's void function `name`, and a builder at its entry when its body still has to
    be written (None when the module has it already)."""
    fn = module.globals.get(name)
    if fn is not None:
        return fn, None
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), params), name)
    fn.linkage = "linkonce_odr"
    # one copy per module, called from every site: inlined, LLVM re-optimised the kernels at each
    # call site (compile time) for no gain (a call per row block and panel is noise)
    fn.attributes.add("noinline")
    fn.attributes.add("nounwind")
    return fn, ir.IRBuilder(fn.append_basic_block("entry"))


def _ceil_div(b: ir.IRBuilder, x: ir.Value, d: ir.Value | int) -> ir.Value:
    d = ir.Constant(_i64, d) if isinstance(d, int) else d
    return b.sdiv(b.add(x, b.sub(d, ir.Constant(_i64, 1))), d)


def _min(b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> ir.Value:
    return b.select(b.icmp_signed("<", x, y), x, y)


def _micro_kernel(module: ir.Module, bits: int, rows: int) -> ir.Function:
    """kernel_<rows>(a, row_stride, k_stride, k, panel, c, ldc, cols, accumulate):
    c[:rows, :cols] (+)= a[:rows] @ panel, with a[i, kk] at a + i * row_stride + kk * k_stride."""
    ft = _float_type(bits)
    lanes = VECTOR_BITS // bits
    vt = ir.VectorType(ft, lanes)
    fp = ft.as_pointer()
    fn, b = _function(module, f"unroll_gemm_f{bits}_k{rows}", [fp, _i64, _i64, _i64, fp, fp, _i64, _i64, _i32])
    if b is None:
        return fn
    a, row_stride, k_stride, k, panel, c, ldc, cols, accumulate = fn.args
    zero = ir.Constant(vt, [0.0] * lanes)
    accs = [[cgutils.alloca_once_value(b, zero) for _ in range(2)] for _ in range(rows)]
    vp = vt.as_pointer()
    fma = cgutils.get_or_insert_function(module, ir.FunctionType(vt, [vt, vt, vt]),
                                         f"llvm.fma.v{lanes}f{bits}")
    with cgutils.for_range(b, k) as loop:
        kk = loop.index
        row = b.gep(panel, [b.mul(kk, ir.Constant(_i64, 2 * lanes))])
        halves = [b.load(b.bitcast(b.gep(row, [ir.Constant(_i64, h * lanes)]), vp), align=bits // 8)
                  for h in range(2)]
        for i in range(rows):
            x = b.load(b.gep(a, [b.add(b.mul(ir.Constant(_i64, i), row_stride), b.mul(kk, k_stride))]))
            undef = ir.Constant(vt, ir.Undefined)
            splat = b.shuffle_vector(b.insert_element(undef, x, ir.Constant(_i32, 0)), undef,
                                     ir.Constant(ir.VectorType(_i32, lanes), [0] * lanes))
            for h in range(2):
                b.store(b.call(fma, [splat, halves[h], b.load(accs[i][h])]), accs[i][h])
    full = b.icmp_signed("==", cols, ir.Constant(_i64, 2 * lanes))
    add = b.icmp_signed("!=", accumulate, ir.Constant(_i32, 0))
    with b.if_else(full, likely=True) as (whole, part):
        with whole:
            for i in range(rows):
                out_row = b.gep(c, [b.mul(ir.Constant(_i64, i), ldc)])
                for h in range(2):
                    ptr = b.bitcast(b.gep(out_row, [ir.Constant(_i64, h * lanes)]), vp)
                    value = b.load(accs[i][h])
                    summed = b.fadd(value, b.load(ptr, align=bits // 8))
                    b.store(b.select(add, summed, value), ptr, align=bits // 8)
        with part:   # the last panel of an N that is not a multiple of NR: through a stack tile
            tile = cgutils.alloca_once(b, vt, size=2)   # one row of the tile, two vectors
            tile_elems = b.bitcast(tile, fp)
            for i in range(rows):
                for h in range(2):
                    b.store(b.load(accs[i][h]), b.gep(tile, [ir.Constant(_i64, h)]))
                out_row = b.gep(c, [b.mul(ir.Constant(_i64, i), ldc)])
                with cgutils.for_range(b, cols) as col_loop:
                    ptr = b.gep(out_row, [col_loop.index])
                    x = b.load(b.gep(tile_elems, [col_loop.index]))
                    b.store(b.select(add, b.fadd(x, b.load(ptr)), x), ptr)
    b.ret_void()
    return fn


def _gemm_function(module: ir.Module, bits: int) -> ir.Function:
    """gemm(a, row_stride, k_stride, m, k, packed, n, c, ldc, accumulate): c[:m, :n] (+)= a @ w."""
    fp = _float_type(bits).as_pointer()
    fn, b = _function(module, f"unroll_gemm_f{bits}", [fp, _i64, _i64, _i64, _i64, fp, _i64, fp, _i64, _i32])
    if b is None:
        return fn
    kernels = [_micro_kernel(module, bits, r) for r in range(1, MR + 1)]
    a, row_stride, k_stride, m, k, packed, n, c, ldc, accumulate = fn.args
    nr_c = ir.Constant(_i64, panel_width(bits))
    panels = _ceil_div(b, n, nr_c)
    blocks = _ceil_div(b, m, MR)
    kc_c = ir.Constant(_i64, KC)
    # K = 0 still runs one (empty) chunk, so that c is written (zeros) unless accumulating
    one = ir.Constant(_i64, 1)
    k_blocks = b.select(b.icmp_signed("<", k, one), one, _ceil_div(b, k, kc_c))
    with b.if_then(b.icmp_signed(">", blocks, ir.Constant(_i64, 0)), likely=True):
        base = b.sdiv(m, blocks)    # rows per block: base or base + 1 (the first `extra` blocks)
        extra = b.srem(m, blocks)
        # K in chunks of KC: a panel's chunk and the rows of `a` it meets stay in L1 while every
        # row block uses them; the first chunk writes (or accumulates into) c, later ones add to it
        with cgutils.for_range(b, k_blocks) as k_loop:
            k0 = b.mul(k_loop.index, kc_c)
            kc = _min(b, b.sub(k, k0), kc_c)
            add = b.select(b.icmp_signed(">", k0, ir.Constant(_i64, 0)), ir.Constant(_i32, 1), accumulate)
            with cgutils.for_range(b, panels) as panel_loop:
                p = panel_loop.index
                col0 = b.mul(p, nr_c)
                cols = _min(b, b.sub(n, col0), nr_c)
                panel = b.gep(packed, [b.mul(b.add(b.mul(k0, panels), b.mul(p, kc)), nr_c)])
                with cgutils.for_range(b, blocks) as block_loop:
                    blk = block_loop.index
                    bigger = b.icmp_signed("<", blk, extra)
                    rows = b.add(base, b.zext(bigger, _i64))
                    row0 = b.add(b.mul(blk, base), b.select(bigger, blk, extra))
                    a_rows = b.gep(a, [b.add(b.mul(row0, row_stride), b.mul(k0, k_stride))])
                    c_tile = b.gep(c, [b.add(b.mul(row0, ldc), col0)])
                    switch_end = b.append_basic_block("rows.end")
                    switch = b.switch(rows, switch_end)
                    for r, kernel in enumerate(kernels, start=1):
                        case = b.append_basic_block(f"rows{r}")
                        switch.add_case(ir.Constant(_i64, r), case)
                        b.position_at_end(case)
                        b.call(kernel, [a_rows, row_stride, k_stride, kc, panel, c_tile, ldc, cols, add])
                        b.branch(switch_end)
                    b.position_at_end(switch_end)
    b.ret_void()
    return fn


def _pack_function(module: ir.Module, bits: int) -> ir.Function:
    """pack(w, ld, k, n, transposed, packed): the chunk-major layout of the module docstring, from w
    (K x N, or N x K with `transposed`)."""
    ft = _float_type(bits)
    fp = ft.as_pointer()
    nr = panel_width(bits)
    fn, b = _function(module, f"unroll_pack_f{bits}", [fp, _i64, _i64, _i64, _i32, fp])
    if b is None:
        return fn
    w, ld, k, n, transposed, packed = fn.args
    nr_c = ir.Constant(_i64, nr)
    panels = _ceil_div(b, n, nr_c)
    trans = b.icmp_signed("!=", transposed, ir.Constant(_i32, 0))
    kc_c = ir.Constant(_i64, KC)
    with cgutils.for_range(b, panels) as panel_loop:
        p = panel_loop.index
        with cgutils.for_range(b, k) as k_loop:
            kk = k_loop.index
            # chunk-major: chunk j of every panel, then chunk j + 1 (see the module docstring)
            k0 = b.mul(b.sdiv(kk, kc_c), kc_c)
            kc = _min(b, b.sub(k, k0), kc_c)
            dst = b.gep(packed, [b.mul(b.add(b.add(b.mul(k0, panels), b.mul(p, kc)), b.sub(kk, k0)), nr_c)])
            for r in range(nr):
                col = b.add(b.mul(p, nr_c), ir.Constant(_i64, r))
                slot = b.gep(dst, [ir.Constant(_i64, r)])
                inside = b.icmp_signed("<", col, n)
                with b.if_else(inside) as (yes, no):
                    with yes:
                        src = b.select(trans, b.add(b.mul(col, ld), kk), b.add(b.mul(kk, ld), col))
                        b.store(b.load(b.gep(w, [src])), slot)
                    with no:
                        b.store(ir.Constant(ft, 0.0), slot)
    b.ret_void()
    return fn


def _data(context, builder, ty, value) -> ir.Value:
    return context.make_array(ty)(context, builder, value=value).data


def _array_parts(context, builder, ty, value):
    arr = context.make_array(ty)(context, builder, value=value)
    shape = cgutils.unpack_tuple(builder, arr.shape, ty.ndim)
    strides = cgutils.unpack_tuple(builder, arr.strides, ty.ndim)
    return arr.data, shape, strides


def _aligned(builder, ptr: ir.Value) -> ir.Value:
    """`ptr` rounded up to a 64-byte boundary: the panel's vector loads never split a cache line
    (unaligned, half of them did, and the kernel's speed varied 1.5x between runs)."""
    as_int = builder.ptrtoint(ptr, _i64)
    rounded = builder.and_(builder.add(as_int, ir.Constant(_i64, ALIGN - 1)), ir.Constant(_i64, -ALIGN))
    return builder.inttoptr(rounded, ptr.type)


def packed_size_text(k: str, n: str, dtype_bits: int) -> str:
    """The expression (in K and N) for the elements to allocate for a packed K x N weight: the
    panels plus room to align them."""
    nr = panel_width(dtype_bits)
    return f"-(-{n} // {nr}) * {k} * {nr} + {ALIGN * 8 // dtype_bits}"


def packed_size(k: int, n: int, dtype_bits: int) -> int:
    """packed_size_text's value for given K and N."""
    nr = panel_width(dtype_bits)
    return -(-n // nr) * k * nr + ALIGN * 8 // dtype_bits


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
