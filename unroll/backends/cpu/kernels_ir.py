"""LLVM IR of what generated kernels call: the packed-weight product and the scalar primitives.

Plain llvmlite, no Numba: the native renderer (cpu/native.py) emits these functions into its
modules, and the Numba intrinsics of gemm.py and intrinsics.py wrap the same builders for the Numba
path, so both compilers run the same kernels.

Packed-weight product (`packed_gemm`, `pack_panels`). Inside a time loop an RNN multiplies a small activation `a` (M x K, M = batch) by the same weight
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

Scalar primitives (`fmuladd`, `pow2`, `scale`, `ldexp`). `fmuladd(a, b, c)` is a * b + c (LLVM's `llvm.fmuladd`: one fused operation where the CPU has FMA,
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

import contextlib
from typing import Iterator

from llvmlite import ir

# products with fewer multiply-adds than this run as generated loops (measured on this machine: a
# BLAS call costs a few us; vectorised loops win below ~64K multiply-adds), larger ones call BLAS
LOOP_MAX_MACS = 64 * 1024


# ---- small IR helpers (what Numba's cgutils offers, without importing Numba) ---------------------

def _declare(module: ir.Module, name: str, fnty: ir.FunctionType) -> ir.Function:
    fn = module.globals.get(name)
    return fn if fn is not None else ir.Function(module, fnty, name)


def _alloca(b: ir.IRBuilder, ty: ir.Type, size: int | None = None) -> ir.Value:
    """A stack slot in the function's entry block (so loops do not grow the stack)."""
    with b.goto_entry_block():
        return b.alloca(ty, size=size)


def _alloca_value(b: ir.IRBuilder, value: ir.Value) -> ir.Value:
    slot = _alloca(b, value.type)
    b.store(value, slot)
    return slot


@contextlib.contextmanager
def _for_range(b: ir.IRBuilder, count: ir.Value) -> Iterator[ir.Value]:
    """for i in range(count): the body is built inside the `with`, which yields i."""
    before = b.block
    head, body, end = (b.append_basic_block(n) for n in ("for.head", "for.body", "for.end"))
    b.branch(head)
    b.position_at_end(head)
    index = b.phi(count.type)
    index.add_incoming(ir.Constant(count.type, 0), before)
    b.cbranch(b.icmp_signed("<", index, count), body, end)
    b.position_at_end(body)
    yield index
    index.add_incoming(b.add(index, ir.Constant(count.type, 1)), b.block)
    b.branch(head)
    b.position_at_end(end)


# ---- the packed-weight product -----------------------------------------------------------------

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
    accs = [[_alloca_value(b, zero) for _ in range(2)] for _ in range(rows)]
    vp = vt.as_pointer()
    fma = _declare(module, f"llvm.fma.v{lanes}f{bits}", ir.FunctionType(vt, [vt, vt, vt]))
    with _for_range(b, k) as loop:
        kk = loop
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
            tile = _alloca(b, vt, 2)   # one row of the tile, two vectors
            tile_elems = b.bitcast(tile, fp)
            for i in range(rows):
                for h in range(2):
                    b.store(b.load(accs[i][h]), b.gep(tile, [ir.Constant(_i64, h)]))
                out_row = b.gep(c, [b.mul(ir.Constant(_i64, i), ldc)])
                with _for_range(b, cols) as col_loop:
                    ptr = b.gep(out_row, [col_loop])
                    x = b.load(b.gep(tile_elems, [col_loop]))
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
        with _for_range(b, k_blocks) as k_loop:
            k0 = b.mul(k_loop, kc_c)
            kc = _min(b, b.sub(k, k0), kc_c)
            add = b.select(b.icmp_signed(">", k0, ir.Constant(_i64, 0)), ir.Constant(_i32, 1), accumulate)
            with _for_range(b, panels) as panel_loop:
                p = panel_loop
                col0 = b.mul(p, nr_c)
                cols = _min(b, b.sub(n, col0), nr_c)
                panel = b.gep(packed, [b.mul(b.add(b.mul(k0, panels), b.mul(p, kc)), nr_c)])
                with _for_range(b, blocks) as block_loop:
                    blk = block_loop
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
    with _for_range(b, panels) as panel_loop:
        p = panel_loop
        with _for_range(b, k) as k_loop:
            kk = k_loop
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


# ---- scalar primitives ------------------------------------------------------------------------

# float width -> (integer type of its bits, mantissa bits, exponent bias, magic number, its bits)
_LAYOUT = {32: (ir.IntType(32), 23, 127, 1.5 * 2.0**23, 0x4B400000),
           64: (ir.IntType(64), 52, 1023, 1.5 * 2.0**52, 0x4338000000000000)}
_FLAGS = ("nsz",)   # an explicit flag: Numba's fast-math pass adds none to these operations


def _exponent(builder: ir.IRBuilder, n: ir.Value, bits: int) -> ir.Value:
    """The integer n of a float n (integral, |n| < 2**22), through the magic-number add."""
    int_t, _, _, magic, magic_bits = _LAYOUT[bits]
    shifted = builder.fadd(n, ir.Constant(n.type, magic), flags=_FLAGS)
    return builder.sub(builder.bitcast(shifted, int_t), int_t(magic_bits))


def _power(builder: ir.IRBuilder, k: ir.Value, bits: int, float_t: ir.Type) -> ir.Value:
    """2**k as a float from the integer k (normal exponent range)."""
    int_t, mantissa, bias, _, _ = _LAYOUT[bits]
    return builder.bitcast(builder.shl(builder.add(k, int_t(bias)), int_t(mantissa)), float_t)


def fmuladd_ir(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value, bits: int) -> ir.Value:
    ty = a.type
    fn = _declare(builder.module, f"llvm.fmuladd.f{bits}", ir.FunctionType(ty, [ty, ty, ty]))
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
