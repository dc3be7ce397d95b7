"""The CPU kernel language rendered straight to LLVM IR: the generated source compiled without Numba.

The CPU emitters write a kernel in a small imperative language that happens to be Python syntax:
`for` loops over `range`, scalar expressions, element reads and writes of C-contiguous arrays,
views (`a[t]`, `a[i:j]`, `.reshape`), `np.empty`, typed casts (`np.float32(x)`) and calls of a
fixed set of primitives (`xxgemm`, `packed_gemm`, `pack_panels`, `blas_threads`, `fmuladd`, `pow2`,
`scale`, `ldexp`, `math.*`). Numba compiles it, but spends most of its time in its general Python
front end (SSA, type inference over every name, lowering with reference counting): about 7 s of an
LSTM training step's 11 s cold compile, growing faster than the source. This module is a second
renderer of the same language, in the spirit of tinygrad's renderers: one pass over the source's
`ast` that types every name once (its first assignment; a name that changes type is refused) and
emits LLVM IR with llvmlite's builder, then LLVM compiles it. The heavy pieces are shared with the
Numba path: kernels_ir.py's packed micro-kernel and power-of-two primitives are the same IR
builders, and products go to the same BLAS (scipy's OpenBLAS, whose `?gemm` Numba's np.dot calls).
Numba itself is not imported.

Semantics follow what Numba gives the same source (the backend's tests run both against the numpy
reference): integers compute in int64, a float32 meets an int32/int64 in float64, `//` and `%`
floor (a zero divisor gives 0: Numba's numpy error model), float math is float32 for float32
arguments, stores cast to the array's dtype, and the backend's fast-math flags are set on float
arithmetic. Anything outside the language raises `Unsupported`, and the caller compiles the source
with Numba instead: the native path is an accelerator, never a second meaning.

Memory: `np.empty` is an aligned malloc; every allocation site owns a slot, freed when the site
runs again and at every exit unless the buffer is returned, in which case the caller wraps it in a
numpy array that frees it. Errors (`raise IndexError(...)`) set a status word and return; the
caller raises the Python exception.
"""

from __future__ import annotations

import ast
import ctypes
import functools
import json
import os
import re
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir

from .. import cache
from .fuse import fuse_loops
from .kernels_ir import _aligned, _gemm_function, _pack_function, fmuladd_ir, ldexp_ir, pow2_ir, scale_ir


class Unsupported(Exception):
    """The source uses something outside the kernel language: compile it with Numba instead."""


I1, I8, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64)
VOIDP = I8.as_pointer()
# numpy dtype -> the LLVM type of a scalar and of an array element (bool is one byte in memory)
SCALAR = {"float32": ir.FloatType(), "float64": ir.DoubleType(), "int64": I64, "int32": I32,
          "int16": ir.IntType(16), "int8": I8, "uint8": I8, "bool": I1}
STORED = {**SCALAR, "bool": I8}
ITEMSIZE = {d: np.dtype(d).itemsize for d in SCALAR}
FLOATS = ("float32", "float64")
FAST = ("nsz", "arcp", "contract", "afn", "reassoc")   # backend.FASTMATH
ALIGN = 64
CASTS = {"float32", "float64", "int64", "int32", "int16", "int8", "uint8", "bool_"}


@dataclass
class Scalar:
    value: ir.Value
    dtype: str


@dataclass
class Array:
    data: ir.Value              # element pointer
    shape: tuple[ir.Value, ...]  # i64 each
    dtype: str
    base: ir.Value              # i8* of the allocation that owns the memory (null: an argument's)


@dataclass
class Var:
    """A name's storage: allocas in the entry block (LLVM's mem2reg makes them registers)."""
    kind: str                   # "scalar" or "array"
    dtype: str
    slots: list[ir.Value]       # scalar: [value]; array: [data, base, *shape]


def _is_int(dtype: str) -> bool:
    return dtype not in FLOATS and dtype != "bool"


def _promote(a: str, b: str) -> str:
    """The dtype Numba computes a binary arithmetic op in."""
    if a in FLOATS or b in FLOATS:
        if "float64" in (a, b):
            return "float64"
        other = b if a == "float32" else a
        return "float32" if other in ("float32", "bool", "int8", "int16", "uint8") else "float64"
    return "int64"


class Renderer:
    """One kernel: `render(source, arg_types)` fills an LLVM module with `unroll_kernel`."""

    def __init__(self, arg_types: Sequence[tuple[str, int]]) -> None:
        self.arg_types = list(arg_types)
        self.module = ir.Module(name="unroll_native")
        # void unroll_kernel(i8** args, i64* shapes, i8** outs, i64* out_shapes, i64* status,
        #                    i8** allocations)
        fnty = ir.FunctionType(ir.VoidType(), [VOIDP.as_pointer(), I64.as_pointer(), VOIDP.as_pointer(),
                                               I64.as_pointer(), I64.as_pointer(), VOIDP.as_pointer()])
        self.fn = ir.Function(self.module, fnty, "unroll_kernel")
        self.entry = self.fn.append_basic_block("entry")
        self.b = ir.IRBuilder(self.fn.append_basic_block("body"))
        self.allocas = ir.IRBuilder(self.entry)
        self.vars: dict[str, Var] = {}
        # each np.empty site's buffer, in the caller's table (memory LLVM cannot turn into
        # registers: hundreds of buffers live until the exit made the register allocator quadratic)
        self.n_allocs = 0
        self.out_ndims: list[int] = []
        self.errors: list[tuple[str, str, int]] = []   # (exception, message, integer arguments)
        self.exit_block = self.fn.append_basic_block("exit")
        self.returned = False
        self.main = self.fn
        self.scratch: dict[tuple[str, str, int], ir.Value] = {}
        self.oom_block: ir.Block | None = None
        self.parts = 0
        self.main_loops = 0   # loops rendered in the kernel function itself (not outlined)
        self.runtime: set[int] = set()   # the float widths whose runtime library the kernel calls
        self.outlined: dict[tuple, ir.Function] = {}   # a loop nest's renamed ast and types -> its function

    # ---- helpers ---------------------------------------------------------------------------------

    def _slot(self, ty: ir.Type) -> ir.Value:
        return self.allocas.alloca(ty)

    def _extern(self, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
        fn = self.module.globals.get(name)
        if fn is None:
            fn = ir.Function(self.module, ir.FunctionType(ret, args), name)
        return fn

    def _const_int(self, v: int) -> Scalar:
        return Scalar(ir.Constant(I64, v), "int64")

    def _cast(self, s: Scalar, dtype: str) -> ir.Value:
        """s's value as `dtype` (Numba's conversions: fptosi/fptoui, sitofp, trunc/sext)."""
        src, b, ty = s.dtype, self.b, SCALAR[dtype]
        v = s.value
        if src == dtype:
            return v
        if dtype == "bool":
            return b.fcmp_unordered("!=", v, ir.Constant(v.type, 0.0)) if src in FLOATS \
                else b.icmp_unsigned("!=", v, ir.Constant(v.type, 0))
        if dtype in FLOATS:
            if src in FLOATS:
                return b.fpext(v, ty) if dtype == "float64" else b.fptrunc(v, ty)
            return b.uitofp(v, ty) if src in ("bool", "uint8") else b.sitofp(v, ty)
        if src in FLOATS:
            return b.fptoui(v, ty) if dtype == "uint8" else b.fptosi(v, ty)
        if v.type.width > ty.width:
            return b.trunc(v, ty)
        if v.type.width < ty.width:
            return b.zext(v, ty) if src in ("bool", "uint8") else b.sext(v, ty)
        return v

    def _as(self, s: Scalar, dtype: str) -> Scalar:
        return Scalar(self._cast(s, dtype), dtype)

    # ---- variables -------------------------------------------------------------------------------

    def _assign(self, name: str, value: Scalar | Array) -> None:
        var = self.vars.get(name)
        if isinstance(value, Array):
            if var is None:
                var = Var("array", value.dtype, [self._slot(value.data.type), self._slot(VOIDP)]
                          + [self._slot(I64) for _ in value.shape])
                self.vars[name] = var
            if var.kind != "array" or var.dtype != value.dtype or len(var.slots) != 2 + len(value.shape):
                raise Unsupported(f"{name} changes type")
            for slot, v in zip(var.slots, (value.data, value.base, *value.shape)):
                self.b.store(v, slot)
        else:
            if var is None:
                var = Var("scalar", value.dtype, [self._slot(SCALAR[value.dtype])])
                self.vars[name] = var
            if var.kind != "scalar":
                raise Unsupported(f"{name} changes type")
            if var.dtype != value.dtype:   # only a widening into the name's type (Numba unifies them)
                widens = (var.dtype == "int64" and _is_int(value.dtype)) or (
                    var.dtype == "float64" and value.dtype in FLOATS)
                if not widens:
                    raise Unsupported(f"{name} changes type")
                value = self._as(value, var.dtype)
            self.b.store(value.value, var.slots[0])

    def _load(self, name: str) -> Scalar | Array:
        var = self.vars.get(name)
        if var is None:
            raise Unsupported(f"unknown name {name}")
        if var.kind == "scalar":
            return Scalar(self.b.load(var.slots[0]), var.dtype)
        data, base, *shape = (self.b.load(s) for s in var.slots)
        return Array(data, tuple(shape), var.dtype, base)

    # ---- the function ----------------------------------------------------------------------------

    def render(self, source: str) -> None:
        tree = ast.parse(source)
        fdef = tree.body[0]
        if not isinstance(fdef, ast.FunctionDef) or len(fdef.args.args) != len(self.arg_types):
            raise Unsupported("expected def kernel(...) with one argument per array")
        fdef = fuse_loops(fdef)   # one nest where the emitters wrote one per elementwise node
        args_p, shapes_p, self.outs_p, self.oshapes_p, self.status_p, self.allocs_p = self.fn.args
        offset = 0
        for k, (param, (dtype, ndim)) in enumerate(zip(fdef.args.args, self.arg_types)):
            raw = self.b.load(self.b.gep(args_p, [ir.Constant(I64, k)]))
            shape = tuple(self.b.load(self.b.gep(shapes_p, [ir.Constant(I64, offset + d)])) for d in range(ndim))
            offset += ndim
            data = self.b.bitcast(raw, STORED[dtype].as_pointer())
            self._assign(param.arg, Array(data, shape, dtype, ir.Constant(VOIDP, None)))
        self._block(fdef.body)
        if not self.b.block.is_terminated:
            raise Unsupported("the kernel must end in a return")
        # exit: free every allocation that is not returned
        self.b.position_at_end(self.exit_block)
        free = self._extern("free", ir.VoidType(), [VOIDP])
        n_out = len(self.out_ndims)
        bases = [self.b.load(self.b.gep(self.outs_p, [ir.Constant(I64, 2 * r + 1)])) for r in range(n_out)]
        # (after an error no output was stored: every base is null, every buffer is freed)
        for k in range(self.n_allocs):
            ptr = self.b.load(self._alloc_slot(k))
            keep = ir.Constant(I1, 0)
            for base in bases:
                keep = self.b.or_(keep, self.b.icmp_unsigned("==", ptr, base))
            # free(NULL) is a no-op: no branch per buffer (a block per buffer made LLVM's tail
            # merging quadratic in a kernel's buffers)
            self.b.call(free, [self.b.select(keep, ir.Constant(VOIDP, None), ptr)])
        self.b.ret_void()
        # entry: null every allocation slot and the outputs, then the body
        self.allocas.position_at_end(self.entry)
        for k in range(self.n_allocs):
            self.allocas.store(ir.Constant(VOIDP, None), self.allocas.gep(self.allocs_p, [ir.Constant(I64, k)]))
        for r in range(2 * n_out):
            self.allocas.store(ir.Constant(VOIDP, None), self.allocas.gep(self.outs_p, [ir.Constant(I64, r)]))
        self.allocas.store(ir.Constant(I64, 0), self.status_p)
        self.allocas.branch(self.fn.basic_blocks[1])
        if not self.main_loops:
            # straight-line code that runs once per call (every loop is a function of its own):
            # not optimised, it costs microseconds per call; optimised, it was a large share of a TCN's
            # LLVM time (thousands of lines of views and BLAS arguments)
            self.fn.attributes.add("optnone")
            self.fn.attributes.add("noinline")

    def _block(self, stmts: list[ast.stmt]) -> None:
        for stmt in stmts:
            if self.b.block.is_terminated:
                return
            self._stmt(stmt)

    def _stmt(self, s: ast.stmt) -> None:
        b = self.b
        if isinstance(s, ast.Assign) and len(s.targets) == 1:
            target = s.targets[0]
            if isinstance(target, ast.Tuple):   # a, b = b, a: every value first
                if not isinstance(s.value, ast.Tuple) or len(s.value.elts) != len(target.elts):
                    raise Unsupported("tuple assignment")
                values = [self._expr(e) for e in s.value.elts]
                for t, v in zip(target.elts, values):
                    self._assign_to(t, v)
                return
            self._assign_to(target, self._expr(s.value))
        elif isinstance(s, ast.AugAssign):
            self._assign_to(s.target, self._binop(s.op, self._expr(s.target), self._expr(s.value)))
        elif isinstance(s, ast.For):
            if self.fn is self.main and _outlinable(s):
                self._outline(s)
            else:
                self._for(s)
        elif isinstance(s, ast.If):
            cond = self._truth(self._expr(s.test))
            if s.orelse:
                with b.if_else(cond) as (then, other):
                    with then:
                        self._block(s.body)
                    with other:
                        self._block(s.orelse)
            else:
                with b.if_then(cond):
                    self._block(s.body)
        elif isinstance(s, ast.Expr) and isinstance(s.value, ast.Call):
            self._call(s.value)
        elif isinstance(s, ast.Raise):
            self._raise(s)
        elif isinstance(s, ast.Return):
            self._return(s)
        elif isinstance(s, ast.Pass):
            return
        else:
            raise Unsupported(f"statement {type(s).__name__}")

    def _outline(self, s: ast.For) -> None:
        """A top-level loop nest as a function of its own. LLVM optimises and compiles each
        function on its own, so a kernel's compile time grows with its number of loop nests, not
        with their product: one function holding a 1000-op graph took minutes in the loop vectoriser
        and the register allocator. Names the loop only reads are passed by value; names it assigns
        (an accumulator, carries swapped at the end of a step) by pointers to the caller's slots,
        copied in at its start and out at its end. Nests that differ only in the names they use
        (every layer of a deep stack, every level of a TCN) share one function: it is compiled
        once, whatever the depth."""
        order = list(dict.fromkeys(n.id for n in ast.walk(s) if isinstance(n, ast.Name)))
        stored = {n.id for n in ast.walk(s) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        written_names = {name for name in order if name in self.vars and name in stored}
        read_only = [(name, self.vars[name]) for name in order if name in self.vars and name not in stored]
        written = [(name, self.vars[name]) for name in order if name in written_names]
        values = [self.b.load(slot) for _, var in read_only for slot in var.slots]
        pointers = [slot for _, var in written for slot in var.slots]
        canonical = {name: f"v{k}" for k, name in enumerate(order)}
        key = (_renamed_dump(s, canonical),
               tuple((canonical[name], var.kind, var.dtype, len(var.slots)) for name, var in read_only + written))
        part = self.outlined.get(key)
        if part is not None:
            self.b.call(part, values + pointers)
            return
        self.parts += 1
        fnty = ir.FunctionType(ir.VoidType(), [v.type for v in values] + [p.type for p in pointers])
        part = self.outlined[key] = ir.Function(self.module, fnty, f"unroll_part{self.parts}")
        part.linkage = "internal"
        part.attributes.add("noinline")
        part.attributes.add("nounwind")
        self.b.call(part, values + pointers)
        saved = self.fn, self.b, self.allocas, self.vars
        entry = part.append_basic_block("entry")
        self.fn, self.allocas, self.b = part, ir.IRBuilder(entry), ir.IRBuilder(part.append_basic_block("body"))
        self.vars = {}
        args = iter(part.args)
        copy_out = []
        for name, var in read_only + written:
            local = Var(var.kind, var.dtype, [self._slot(slot.type.pointee) for slot in var.slots])
            self.vars[name] = local
            for slot in local.slots:
                arg = next(args)
                if name in written_names:
                    self.b.store(self.b.load(arg), slot)
                    copy_out.append((slot, arg))
                else:
                    self.b.store(arg, slot)
        self._for(s)
        for slot, theirs in copy_out:
            self.b.store(self.b.load(slot), theirs)
        self.b.ret_void()
        self.allocas.branch(part.basic_blocks[1])
        self.fn, self.b, self.allocas, self.vars = saved

    def _scratch(self, ty: ir.Type, k: int) -> ir.Value:
        """The k-th stack slot of type `ty` for arguments passed by address (BLAS's): one set per
        function, reused by every call (a slot per call grew a kernel by thousands of allocas)."""
        key = (self.fn.name, str(ty), k)
        slot = self.scratch.get(key)
        if slot is None:
            slot = self.scratch[key] = self._slot(ty)
        return slot

    def _assign_to(self, target: ast.expr, value: Scalar | Array) -> None:
        if isinstance(target, ast.Name):
            self._assign(target.id, value)
        elif isinstance(target, ast.Subscript):
            if not isinstance(value, Scalar):
                raise Unsupported("store of an array")
            if any(isinstance(p, ast.Slice) for p in self._indices(target.slice)):
                self._fill(self._subscript(target), value)   # a[i:j] = x
                return
            arr = self._expr(target.value)
            if not isinstance(arr, Array):
                raise Unsupported("store into a scalar")
            self.b.store(self._stored(value, arr.dtype), self._element(arr, target.slice))
        else:
            raise Unsupported(f"assignment to {type(target).__name__}")

    def _stored(self, value: Scalar, dtype: str) -> ir.Value:
        v = self._cast(value, dtype)
        return self.b.zext(v, I8) if dtype == "bool" else v

    def _fill(self, view: Array, value: Scalar) -> None:
        """Every element of a contiguous view set to `value`: a call of the module's fill function
        for the element type (so that the kernel function itself stays free of loops)."""
        b = self.b
        count = ir.Constant(I64, 1)
        for n in view.shape:
            count = b.mul(count, n)
        v = self._stored(value, view.dtype)
        b.call(self._fill_function(v.type), [view.data, count, v])

    def _fill_function(self, ty: ir.Type) -> ir.Function:
        name = f"unroll_fill_{str(ty).replace(' ', '')}"
        fn = self.module.globals.get(name)
        if fn is not None:
            return fn
        fn = ir.Function(self.module, ir.FunctionType(ir.VoidType(), [ty.as_pointer(), I64, ty]), name)
        fn.linkage = "internal"
        fn.attributes.add("noinline")
        fn.attributes.add("nounwind")
        data, count, v = fn.args
        entry, head, body, done = (fn.append_basic_block(n) for n in ("entry", "head", "body", "end"))
        b = ir.IRBuilder(entry)
        b.branch(head)
        b.position_at_end(head)
        i = b.phi(I64)
        i.add_incoming(ir.Constant(I64, 0), entry)
        b.cbranch(b.icmp_signed("<", i, count), body, done)
        b.position_at_end(body)
        b.store(v, b.gep(data, [i]))
        i.add_incoming(b.add(i, ir.Constant(I64, 1)), body)
        b.branch(head)
        b.position_at_end(done)
        b.ret_void()
        return fn

    def _for(self, s: ast.For) -> None:
        it = s.iter
        if not (isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id == "range"
                and isinstance(s.target, ast.Name) and not s.orelse):
            raise Unsupported("for over something else than range")
        args = [self._int(self._expr(a)) for a in it.args]
        step = 1
        if len(it.args) == 3:
            step = _literal_int(it.args[2])
        start, stop = (args[0], args[1]) if len(args) >= 2 else (ir.Constant(I64, 0), args[0])
        b = self.b
        name = s.target.id
        self._assign(name, Scalar(start, "int64"))
        slot = self.vars[name].slots[0]
        # the loop runs on its own counter, so the body may read but not redirect it
        counter = self._slot(I64)
        b.store(start, counter)
        self.main_loops += self.fn is self.main
        head = self.fn.append_basic_block("for.head")
        body = self.fn.append_basic_block("for.body")
        done = self.fn.append_basic_block("for.end")
        b.branch(head)
        b.position_at_end(head)
        i = b.load(counter)
        more = b.icmp_signed("<" if step > 0 else ">", i, stop)
        b.cbranch(more, body, done)
        b.position_at_end(body)
        b.store(i, slot)
        self._block(s.body)
        if not b.block.is_terminated:
            b.store(b.add(i, ir.Constant(I64, step)), counter)
            b.branch(head)
        b.position_at_end(done)

    def _raise(self, s: ast.Raise) -> None:
        exc = s.exc
        if not (isinstance(exc, ast.Call) and isinstance(exc.func, ast.Name) and exc.args
                and isinstance(exc.args[0], ast.Constant) and isinstance(exc.args[0].value, str)):
            raise Unsupported("raise of something else than Error('message', ints...)")
        code = len(self.errors) + 1
        self.errors.append((exc.func.id, exc.args[0].value, len(exc.args) - 1))  # type: ignore[arg-type]
        for k, a in enumerate(exc.args[1:]):
            v = self._int(self._expr(a))
            self.b.store(v, self.b.gep(self.status_p, [ir.Constant(I64, 1 + k)]))
        self.b.store(ir.Constant(I64, code), self.status_p)
        self.b.branch(self.exit_block)

    def _return(self, s: ast.Return) -> None:
        if self.returned:
            raise Unsupported("more than one return")
        self.returned = True
        values = s.value.elts if isinstance(s.value, ast.Tuple) else [s.value]
        offset = 0
        for r, e in enumerate(values):
            arr = self._expr(e)
            if not isinstance(arr, Array):
                raise Unsupported("a scalar output")
            self.out_ndims.append(len(arr.shape))
            self.b.store(self.b.bitcast(arr.data, VOIDP), self.b.gep(self.outs_p, [ir.Constant(I64, 2 * r)]))
            self.b.store(arr.base, self.b.gep(self.outs_p, [ir.Constant(I64, 2 * r + 1)]))
            for d, n in enumerate(arr.shape):
                self.b.store(n, self.b.gep(self.oshapes_p, [ir.Constant(I64, offset + d)]))
            offset += len(arr.shape)
        self.b.branch(self.exit_block)

    # ---- expressions -----------------------------------------------------------------------------

    def _int(self, v: Scalar | Array) -> ir.Value:
        if not isinstance(v, Scalar) or not (_is_int(v.dtype) or v.dtype == "bool"):
            raise Unsupported("an integer was expected")
        return self._cast(v, "int64")

    def _truth(self, v: Scalar | Array) -> ir.Value:
        if not isinstance(v, Scalar):
            raise Unsupported("truth of an array")
        return self._cast(v, "bool")

    def _expr(self, e: ast.expr):
        b = self.b
        if isinstance(e, ast.Name):
            if e.id in ("True", "False"):
                return Scalar(ir.Constant(I1, e.id == "True"), "bool")
            return self._load(e.id)
        if isinstance(e, ast.Constant):
            v = e.value
            if isinstance(v, bool):
                return Scalar(ir.Constant(I1, v), "bool")
            if isinstance(v, int):
                return self._const_int(v)
            if isinstance(v, float):
                return Scalar(ir.Constant(ir.DoubleType(), v), "float64")
            raise Unsupported(f"constant {v!r}")
        if isinstance(e, ast.BinOp):
            return self._binop(e.op, self._expr(e.left), self._expr(e.right))
        if isinstance(e, ast.UnaryOp):
            v = self._expr(e.operand)
            if not isinstance(v, Scalar):
                raise Unsupported("unary op on an array")
            if isinstance(e.op, ast.USub):
                if v.dtype in FLOATS:
                    return Scalar(b.fneg(v.value, flags=FAST), v.dtype)
                return Scalar(b.neg(self._cast(v, "int64")), "int64")
            if isinstance(e.op, ast.UAdd):
                return v
            if isinstance(e.op, ast.Not):
                return Scalar(b.not_(self._truth(v)), "bool")
            if isinstance(e.op, ast.Invert) and _is_int(v.dtype):
                return Scalar(b.not_(self._cast(v, "int64")), "int64")
            raise Unsupported(f"unary {type(e.op).__name__}")
        if isinstance(e, ast.Compare):
            if len(e.ops) != 1:
                raise Unsupported("chained comparison")
            return self._compare(e.ops[0], self._expr(e.left), self._expr(e.comparators[0]))
        if isinstance(e, ast.BoolOp):
            return self._bool_op(e)
        if isinstance(e, ast.IfExp):
            return self._ifexp(e)
        if isinstance(e, ast.Subscript):
            return self._subscript(e)
        if isinstance(e, ast.Attribute) and e.attr in ("inf", "nan") and _dotted(e) in ("np.inf", "np.nan",
                                                                                     "math.inf", "math.nan"):
            return Scalar(ir.Constant(ir.DoubleType(), float(e.attr)), "float64")
        if isinstance(e, ast.Call):
            return self._call(e)
        raise Unsupported(f"expression {type(e).__name__}")

    def _bool_op(self, e: ast.BoolOp) -> Scalar:
        """`a and b`, `a or b` (short-circuit: the right side may read what the left one guards)."""
        b = self.b
        result = self._slot(I1)
        left = self._truth(self._expr(e.values[0]))
        b.store(left, result)
        for value in e.values[1:]:
            go_on = left if isinstance(e.op, ast.And) else b.not_(left)
            with b.if_then(go_on):
                b.store(self._truth(self._expr(value)), result)
            left = b.load(result)
        return Scalar(b.load(result), "bool")

    def _ifexp(self, e: ast.IfExp) -> Scalar:
        """A real branch (the unchosen side may read out of bounds: a pad's clamped index); LLVM
        turns it into a select where both sides are safe to evaluate."""
        b = self.b
        cond = self._truth(self._expr(e.test))
        then_block = self.fn.append_basic_block("if.then")
        else_block = self.fn.append_basic_block("if.else")
        join = self.fn.append_basic_block("if.end")
        b.cbranch(cond, then_block, else_block)
        b.position_at_end(then_block)
        yes = self._expr(e.body)
        then_end = b.block
        b.position_at_end(else_block)
        no = self._expr(e.orelse)
        else_end = b.block
        if not (isinstance(yes, Scalar) and isinstance(no, Scalar)):
            raise Unsupported("conditional arrays")
        dtype = yes.dtype if yes.dtype == no.dtype else _promote(yes.dtype, no.dtype)
        no_v = self._cast(no, dtype)
        b.branch(join)
        b.position_at_end(then_end)
        yes_v = self._cast(yes, dtype)
        b.branch(join)
        b.position_at_end(join)
        phi = b.phi(SCALAR[dtype])
        phi.add_incoming(yes_v, then_end)
        phi.add_incoming(no_v, else_end)
        return Scalar(phi, dtype)

    def _binop(self, op: ast.operator, x, y) -> Scalar:
        if not (isinstance(x, Scalar) and isinstance(y, Scalar)):
            raise Unsupported("arithmetic on arrays")
        b = self.b
        if isinstance(op, (ast.BitAnd, ast.BitOr, ast.BitXor)):
            if x.dtype == y.dtype == "bool":
                dtype, xv, yv = "bool", x.value, y.value
            elif _is_int(x.dtype) or _is_int(y.dtype):
                dtype, xv, yv = "int64", self._int(x), self._int(y)
            else:
                raise Unsupported("bit operation on floats")
            fn = {ast.BitAnd: b.and_, ast.BitOr: b.or_, ast.BitXor: b.xor}[type(op)]
            return Scalar(fn(xv, yv), dtype)
        if isinstance(op, ast.Div):
            dtype = _promote(x.dtype, y.dtype)
            dtype = "float64" if dtype == "int64" else dtype
            return Scalar(b.fdiv(self._cast(x, dtype), self._cast(y, dtype), flags=FAST), dtype)
        dtype = _promote(x.dtype, y.dtype)
        xv, yv = self._cast(x, dtype), self._cast(y, dtype)
        if dtype in FLOATS:
            if isinstance(op, ast.Pow):
                ty = SCALAR[dtype]
                fn = self._extern(f"llvm.pow.f{_bits(dtype)}", ty, [ty, ty])
                return Scalar(b.call(fn, [xv, yv], fastmath=FAST), dtype)
            table = {ast.Add: b.fadd, ast.Sub: b.fsub, ast.Mult: b.fmul}
            if type(op) not in table:
                raise Unsupported(f"float {type(op).__name__}")
            return Scalar(table[type(op)](xv, yv, flags=FAST), dtype)
        if isinstance(op, (ast.FloorDiv, ast.Mod)):
            return Scalar(self._floor_divmod(xv, yv, isinstance(op, ast.Mod)), "int64")
        table = {ast.Add: b.add, ast.Sub: b.sub, ast.Mult: b.mul, ast.LShift: b.shl, ast.RShift: b.ashr}
        if type(op) not in table:
            raise Unsupported(f"integer {type(op).__name__}")
        return Scalar(table[type(op)](xv, yv), "int64")

    def _floor_divmod(self, x: ir.Value, y: ir.Value, mod: bool) -> ir.Value:
        """Python's floor division / modulo; a zero divisor gives 0 (Numba's numpy error model)."""
        b = self.b
        zero, one = ir.Constant(I64, 0), ir.Constant(I64, 1)
        is_zero = b.icmp_signed("==", y, zero)
        safe = b.select(is_zero, one, y)
        q, r = b.sdiv(x, safe), b.srem(x, safe)
        # round toward minus infinity where the remainder's sign differs from the divisor's
        fix = b.and_(b.icmp_signed("!=", r, zero), b.icmp_signed("<", b.xor(r, safe), zero))
        out = b.select(fix, b.add(r, safe), r) if mod else b.select(fix, b.sub(q, one), q)
        return b.select(is_zero, zero, out)

    def _compare(self, op: ast.cmpop, x, y) -> Scalar:
        if not (isinstance(x, Scalar) and isinstance(y, Scalar)):
            raise Unsupported("comparison of arrays")
        sym = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}.get(type(op))
        if sym is None:
            raise Unsupported(f"comparison {type(op).__name__}")
        if x.dtype in FLOATS or y.dtype in FLOATS:
            dtype = _promote(x.dtype, y.dtype)
            xv, yv = self._cast(x, dtype), self._cast(y, dtype)
            cmp = self.b.fcmp_unordered if sym == "!=" else self.b.fcmp_ordered
            return Scalar(cmp(sym, xv, yv), "bool")
        if x.dtype == y.dtype == "bool":
            return Scalar(self.b.icmp_unsigned(sym, x.value, y.value), "bool")
        return Scalar(self.b.icmp_signed(sym, self._int(x), self._int(y)), "bool")

    # ---- arrays ----------------------------------------------------------------------------------

    def _indices(self, node: ast.expr) -> list[ast.expr]:
        return list(node.elts) if isinstance(node, ast.Tuple) else [node]

    def _offset(self, arr: Array, idx: Sequence[ir.Value]) -> ir.Value:
        """Row-major offset of the first len(idx) indices (C-contiguous)."""
        b = self.b
        off = ir.Constant(I64, 0)
        for d in range(len(arr.shape)):
            i = idx[d] if d < len(idx) else ir.Constant(I64, 0)
            off = b.add(b.mul(off, arr.shape[d]), i) if d else i
        return off

    def _element(self, arr: Array, index: ast.expr) -> ir.Value:
        idx = [self._int(self._expr(i)) for i in self._indices(index)]
        if len(idx) != len(arr.shape):
            raise Unsupported("element access with a partial index")
        return self.b.gep(arr.data, [self._offset(arr, idx)])

    def _subscript(self, e: ast.Subscript):
        b = self.b
        if isinstance(e.value, ast.Attribute) and e.value.attr == "shape":   # a.shape[k]
            arr = self._expr(e.value.value)
            return Scalar(arr.shape[_literal_int(e.slice)], "int64")
        arr = self._expr(e.value)
        if not isinstance(arr, Array):
            raise Unsupported("subscript of a scalar")
        parts = self._indices(e.slice)
        # rows [lo:hi] of the first axis, later axes whole (`a[i:j]`, `a[:, :]`): a contiguous view
        if isinstance(parts[0], ast.Slice) and all(_whole(p) for p in parts[1:]) and len(parts) <= len(arr.shape):
            sl = parts[0]
            if sl.step is not None:
                raise Unsupported("strided slice")
            lo = self._int(self._expr(sl.lower)) if sl.lower is not None else ir.Constant(I64, 0)
            hi = self._int(self._expr(sl.upper)) if sl.upper is not None else arr.shape[0]
            data = b.gep(arr.data, [self._offset(arr, [lo])])
            return Array(data, (b.sub(hi, lo), *arr.shape[1:]), arr.dtype, arr.base)
        if any(isinstance(p, ast.Slice) for p in parts):
            raise Unsupported("mixed slice")
        idx = [self._int(self._expr(p)) for p in parts]
        ptr = b.gep(arr.data, [self._offset(arr, idx)])
        if len(idx) < len(arr.shape):   # a view: a[t]
            return Array(ptr, arr.shape[len(idx):], arr.dtype, arr.base)
        if len(idx) > len(arr.shape):
            raise Unsupported("too many indices")
        v = b.load(ptr)
        if arr.dtype == "bool":
            v = b.icmp_unsigned("!=", v, ir.Constant(I8, 0))
        return Scalar(v, arr.dtype)

    def _shape_tuple(self, e: ast.expr) -> list[ir.Value]:
        if isinstance(e, ast.Tuple):
            return [self._int(self._expr(x)) for x in e.elts]
        return [self._int(self._expr(e))]

    def _empty(self, e: ast.Call) -> Array:
        if len(e.args) != 2:
            raise Unsupported("np.empty without a dtype")
        shape = self._shape_tuple(e.args[0])
        dtype = _dtype_name(e.args[1])
        b = self.b
        count = ir.Constant(I64, 1)
        for n in shape:
            count = b.mul(count, n)
        nbytes = b.mul(count, ir.Constant(I64, ITEMSIZE[dtype]))
        rounded = b.and_(b.add(nbytes, ir.Constant(I64, 2 * ALIGN - 1)), ir.Constant(I64, -ALIGN))
        slot = self._alloc_slot(self.n_allocs)
        self.n_allocs += 1
        free = self._extern("free", ir.VoidType(), [VOIDP])
        b.call(free, [b.load(slot)])   # the site ran before (inside a loop): its last buffer
        alloc = self._extern("aligned_alloc", VOIDP, [I64, I64])
        raw = b.call(alloc, [ir.Constant(I64, ALIGN), rounded])
        b.store(raw, slot)
        go_on = self.fn.append_basic_block("allocated")
        b.cbranch(b.icmp_unsigned("==", raw, ir.Constant(VOIDP, None)), self._out_of_memory(), go_on)
        b.position_at_end(go_on)
        return Array(b.bitcast(raw, STORED[dtype].as_pointer()), tuple(shape), dtype, raw)

    def _alloc_slot(self, k: int) -> ir.Value:
        return self.b.gep(self.allocs_p, [ir.Constant(I64, k)])

    def _out_of_memory(self) -> ir.Block:
        """The one block every failed allocation branches to: MemoryError, then the exit."""
        if self.oom_block is None:
            self.oom_block = self.fn.append_basic_block("out_of_memory")
            with self.b.goto_block(self.oom_block):
                self.errors.append(("MemoryError", "out of memory allocating a buffer", 0))
                self.b.store(ir.Constant(I64, len(self.errors)), self.status_p)
                self.b.branch(self.exit_block)
        return self.oom_block

    # ---- calls -----------------------------------------------------------------------------------

    def _call(self, e: ast.Call):
        if e.keywords:
            raise Unsupported("keyword arguments")
        if isinstance(e.func, ast.Attribute) and e.func.attr == "reshape" and len(e.args) == 1:
            arr = self._expr(e.func.value)
            if not isinstance(arr, Array):
                raise Unsupported("reshape of a scalar")
            return Array(arr.data, tuple(self._shape_tuple(e.args[0])), arr.dtype, arr.base)
        name = _dotted(e.func)
        if name == "np.empty":
            return self._empty(e)
        if name.startswith("np.") and name[3:] in CASTS:
            dtype = "bool" if name == "np.bool_" else name[3:]
            v = self._expr(e.args[0])
            if isinstance(v, Scalar):
                return self._as(v, dtype)
            raise Unsupported("cast of an array")
        args = [self._expr(a) for a in e.args]
        rule = CALLS.get(name)
        if rule is None:
            raise Unsupported(f"call of {name}")
        return rule(self, args)

    def _float_args(self, args, n: int) -> tuple[str, list[ir.Value]]:
        if len(args) != n or not all(isinstance(a, Scalar) for a in args):
            raise Unsupported("math on arrays")
        dtype = args[0].dtype if args[0].dtype in FLOATS else "float64"
        for a in args[1:]:
            dtype = _promote(dtype, a.dtype)
        return dtype, [self._cast(a, dtype) for a in args]

    def _intrinsic(self, stem: str, args, n: int = 1) -> Scalar:
        dtype, vals = self._float_args(args, n)
        ty = SCALAR[dtype]
        fn = self._extern(f"llvm.{stem}.f{_bits(dtype)}", ty, [ty] * n)
        return Scalar(self.b.call(fn, vals, fastmath=FAST), dtype)

    def _libm(self, stem: str, args) -> Scalar:
        dtype, vals = self._float_args(args, 1)
        ty = SCALAR[dtype]
        fn = self._extern(stem + ("f" if dtype == "float32" else ""), ty, [ty])
        return Scalar(self.b.call(fn, vals), dtype)

    def _minmax(self, args, smaller: bool) -> Scalar:
        """Python's min/max of two scalars (the emitters use them on integers)."""
        if len(args) != 2:
            raise Unsupported("min/max of other than two values")
        x, y = args
        dtype = _promote(x.dtype, y.dtype)
        xv, yv = self._cast(x, dtype), self._cast(y, dtype)
        # Python: max(a, b) is a unless b > a (min: unless b < a)
        pick_y = self.b.fcmp_ordered(">" if smaller else "<", xv, yv) if dtype in FLOATS else \
            self.b.icmp_signed(">" if smaller else "<", xv, yv)
        return Scalar(self.b.select(pick_y, yv, xv), dtype)

    def _abs(self, args) -> Scalar:
        (x,) = args
        if x.dtype in FLOATS:
            return self._intrinsic("fabs", args)
        v = self._cast(x, "int64")
        return Scalar(self.b.select(self.b.icmp_signed("<", v, ir.Constant(I64, 0)), self.b.neg(v), v), "int64")

    def _same_float(self, args, n: int) -> tuple[str, list[ir.Value]]:
        if len(args) != n or not all(isinstance(a, Scalar) and a.dtype == args[0].dtype in FLOATS for a in args):
            raise Unsupported("a primitive on mixed types")
        return args[0].dtype, [a.value for a in args]

    def _primitive(self, build: Callable, args, n: int) -> Scalar:
        """One of cpu/intrinsics.py's primitives: the same IR as in Numba-compiled code."""
        dtype, vals = self._same_float(args, n)
        return Scalar(build(self.b, *vals, _bits(dtype)), dtype)

    def _arrays(self, args, kinds: str) -> None:
        for a, k in zip(args, kinds):
            if (k == "a") != isinstance(a, Array):
                raise Unsupported("primitive called with the wrong kinds of arguments")

    def _pack_panels(self, args) -> Scalar:
        self._arrays(args, "asa")
        w, trans_s, packed = args
        if w.dtype not in FLOATS or packed.dtype != w.dtype or len(w.shape) != 2:
            raise Unsupported("pack_panels types")
        b, bits = self.b, _bits(w.dtype)
        trans = self._truth(trans_s)
        k = b.select(trans, w.shape[1], w.shape[0])
        n = b.select(trans, w.shape[0], w.shape[1])
        fn = self._runtime_function(_pack_function, bits)
        b.call(fn, [w.data, w.shape[1], k, n, b.zext(trans, I32), _aligned(b, packed.data)])
        return Scalar(ir.Constant(I1, 0), "bool")

    def _runtime_function(self, build: Callable[[ir.Module, int], ir.Function], bits: int) -> ir.Function:
        """A declaration of the runtime library's function that `build` defines (the library is
        compiled once per machine: `runtime_library`)."""
        name, fnty = _runtime_signature(build, bits)
        self.runtime.add(bits)
        fn = self.module.globals.get(name)
        return fn if fn is not None else ir.Function(self.module, fnty, name)

    def _packed_gemm(self, args) -> Scalar:
        self._arrays(args, "asaas")
        a, trans_s, packed, c, acc_s = args
        if not (a.dtype == packed.dtype == c.dtype in FLOATS) or len(a.shape) != 2 or len(c.shape) != 2:
            raise Unsupported("packed_gemm types")
        b, bits = self.b, _bits(a.dtype)
        one = ir.Constant(I64, 1)
        trans = self._truth(trans_s)
        lda = a.shape[1]
        row_stride, k_stride = b.select(trans, one, lda), b.select(trans, lda, one)
        m, k = b.select(trans, a.shape[1], a.shape[0]), b.select(trans, a.shape[0], a.shape[1])
        fn = self._runtime_function(_gemm_function, bits)
        b.call(fn, [a.data, row_stride, k_stride, m, k, _aligned(b, packed.data), c.shape[1], c.data,
                    c.shape[1], b.zext(self._truth(acc_s), I32)])
        return Scalar(ir.Constant(I1, 0), "bool")

    def _xxgemm(self, args) -> Scalar:
        """Column-major gemm: scipy's OpenBLAS `sgemm`/`dgemm` (Fortran interface, 32-bit
        integers), called as Numba's `numba_xxgemm` (cpu.blas) calls it."""
        self._arrays(args, "ssssssxasasxas")
        b = self.b
        _kind, ta, tb, m, n, k, alpha, a, lda, bb, ldb, beta, c, ldc = args   # the dtype gives the kind
        if not (a.dtype == bb.dtype == c.dtype in FLOATS):
            raise Unsupported("xxgemm types")
        i32p, fp = I32.as_pointer(), STORED[c.dtype].as_pointer()
        fn = self._extern(f"unroll_{'s' if c.dtype == 'float32' else 'd'}gemm", ir.VoidType(),
                          [VOIDP, VOIDP, i32p, i32p, i32p, fp, fp, i32p, fp, i32p, fp, fp, i32p])

        used: dict[str, int] = {}

        def slot(value: ir.Value) -> ir.Value:
            k = used[str(value.type)] = used.get(str(value.type), -1) + 1
            where = self._scratch(value.type, k)
            b.store(value, where)
            return where

        def char(s: Scalar) -> ir.Value:
            return slot(b.trunc(self._int(s), I8))

        def int32(s: Scalar) -> ir.Value:
            return slot(b.trunc(self._int(s), I32))
        b.call(fn, [char(ta), char(tb), int32(m), int32(n), int32(k), slot(self._cast(alpha, c.dtype)),
                    a.data, int32(lda), bb.data, int32(ldb), slot(self._cast(beta, c.dtype)), c.data, int32(ldc)])
        return Scalar(ir.Constant(I1, 0), "bool")

    def _blas_threads(self, args) -> Scalar:
        self._arrays(args, "ss")
        b = self.b
        ptr, threads = self._int(args[0]), self._int(args[1])
        fnty = ir.FunctionType(ir.VoidType(), [I32])
        with b.if_then(b.icmp_unsigned("!=", ptr, ir.Constant(I64, 0)), likely=True):
            b.call(b.inttoptr(ptr, fnty.as_pointer()), [b.trunc(threads, I32)])
        return Scalar(ir.Constant(I1, 0), "bool")


_NAME_IN_DUMP = re.compile(r"Name\(id='([^']*)'")


def _renamed_dump(s: ast.stmt, names: dict[str, str]) -> str:
    """`s`'s ast, dumped with every name replaced by `names[name]` (two nests with equal dumps
    differ only in the names they use)."""
    return _NAME_IN_DUMP.sub(lambda m: f"Name(id='{names[m.group(1)]}'", ast.dump(s))


def _outlinable(s: ast.stmt) -> bool:
    """A loop nest that may become a function of its own: it allocates nothing, raises nothing and
    returns nothing (those touch the kernel's allocation slots and status word)."""
    for n in ast.walk(s):
        if isinstance(n, (ast.Raise, ast.Return)):
            return False
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "empty":
            return False
    return True


def _whole(e: ast.expr) -> bool:
    return isinstance(e, ast.Slice) and e.lower is None and e.upper is None and e.step is None


def _bits(dtype: str) -> int:
    return 32 if dtype == "float32" else 64


def _literal_int(e: ast.expr) -> int:
    if isinstance(e, ast.Constant) and isinstance(e.value, int):
        return e.value
    if isinstance(e, ast.UnaryOp) and isinstance(e.op, ast.USub):
        return -_literal_int(e.operand)
    raise Unsupported("a literal integer was expected")


def _dotted(e: ast.expr) -> str:
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.Attribute):
        return f"{_dotted(e.value)}.{e.attr}"
    raise Unsupported("call of an expression")


def _dtype_name(e: ast.expr) -> str:
    name = _dotted(e)
    if not name.startswith("np.") or name[3:] not in CASTS:
        raise Unsupported(f"dtype {name}")
    return "bool" if name == "np.bool_" else name[3:]


MATH_INTRINSICS = {"exp": "exp", "log": "log", "sin": "sin", "cos": "cos", "sqrt": "sqrt", "fabs": "fabs",
                   "floor": "floor", "ceil": "ceil"}
MATH_LIBM = {"tanh": "tanh", "log1p": "log1p", "expm1": "expm1", "atan": "atan", "tan": "tan"}

CALLS: dict[str, Callable[[Renderer, list], object]] = {
    **{f"math.{k}": (lambda stem: lambda r, a: r._intrinsic(stem, a))(v) for k, v in MATH_INTRINSICS.items()},
    **{f"math.{k}": (lambda stem: lambda r, a: r._libm(stem, a))(v) for k, v in MATH_LIBM.items()},
    "np.rint": lambda r, a: r._intrinsic("rint", a),
    "np.sqrt": lambda r, a: r._intrinsic("sqrt", a),
    "min": lambda r, a: r._minmax(a, True),
    "max": lambda r, a: r._minmax(a, False),
    "abs": lambda r, a: r._abs(a),
    "fmuladd": lambda r, a: r._primitive(fmuladd_ir, a, 3),
    "pow2": lambda r, a: r._primitive(pow2_ir, a, 1),
    "scale": lambda r, a: r._primitive(scale_ir, a, 2),
    "ldexp": lambda r, a: r._primitive(ldexp_ir, a, 2),
    "pack_panels": Renderer._pack_panels,
    "packed_gemm": Renderer._packed_gemm,
    "xxgemm": Renderer._xxgemm,
    "blas_threads": Renderer._blas_threads,
}


# ---- compiling and calling -----------------------------------------------------------------------

@functools.cache
def _initialize() -> None:
    """LLVM's native target and the symbols kernels call, once per process."""
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    # tail merging (the code generator's control-flow optimiser) was quadratic in a kernel's
    # blocks: 60-78 % of the machine-code time of a 400-op graph; it only shrinks code
    llvm.set_option("", "-enable-tail-merge=false")
    _symbols()


def _machine(opt: int = 3) -> llvm.TargetMachine:
    """A target machine for the host. A new one per engine: MCJIT takes ownership of it."""
    _initialize()
    target = llvm.Target.from_default_triple()
    return target.create_target_machine(cpu=llvm.get_host_cpu_name(),
                                        features=llvm.get_host_cpu_features().flatten(), opt=opt, jit=True)


def _symbols() -> None:
    """The C functions kernels call: libc's allocator, libm, and scipy's OpenBLAS gemm (the
    functions scipy.linalg.cython_blas exports; the backend has loaded that module already, to
    control its threads)."""
    libc = ctypes.CDLL(None)
    for name in ("aligned_alloc", "free"):
        llvm.add_symbol(name, ctypes.cast(getattr(libc, name), ctypes.c_void_p).value)
    cython_blas = scipy_cython_blas()
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    for name in ("sgemm", "dgemm"):
        capsule = cython_blas.__pyx_capi__[name]   # type: ignore[attr-defined]
        llvm.add_symbol(f"unroll_{name}", get_pointer(capsule, get_name(capsule)))
    libm = ctypes.CDLL("libm.so.6")
    for stem in MATH_LIBM.values():
        for name in (stem, stem + "f"):
            llvm.add_symbol(name, ctypes.cast(getattr(libm, name), ctypes.c_void_p).value)


@functools.cache
def scipy_cython_blas():
    """scipy.linalg.cython_blas (scipy's OpenBLAS, whose gemm kernels call and whose threads the
    backend sets), loaded from its file: importing it by name first imports all of scipy.linalg,
    0.54 of the 0.74 s the backend took to import."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("scipy")
        folder = os.path.join(os.path.dirname(spec.origin), "linalg")   # type: ignore[union-attr, arg-type]
        path = next(os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.startswith("cython_blas.")
                    and f.endswith((".so", ".pyd")))
        module_spec = importlib.util.spec_from_file_location("scipy.linalg.cython_blas", path)
        module = importlib.util.module_from_spec(module_spec)   # type: ignore[arg-type]
        module_spec.loader.exec_module(module)   # type: ignore[union-attr]
        return module
    except (ImportError, OSError, StopIteration, AttributeError):
        from scipy.linalg import cython_blas
        return cython_blas


def _optimize(module: llvm.ModuleRef, machine, slp: bool = False) -> None:
    """LLVM's O3 pipeline with loop vectorisation. SLP vectorisation (straight-line code packed into
    vectors) only where asked, for the runtime library: a kernel's loops are vectorised by the loop
    vectoriser and its straight-line code runs once per call, and SLP was one of the costliest
    passes on a cell's kernel."""
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = slp
    pass_builder = llvm.create_pass_builder(machine, pto)
    pass_builder.getModulePassManager().run(module, pass_builder)


# ---- the runtime library: code every kernel shares, compiled once per machine ----------------------
#
# The packed-gemm driver with its six micro-kernels and the packing routine (kernels_ir.py) are the
# same for every graph and, compiled into each kernel, were a large share of a cell's IR and LLVM
# time. They are compiled once into an object of their own, cached like a kernel, loaded once per
# process, and kernels call them by name (benchmarks/compile_times.py: cold cache, and a new graph
# once the library is cached).

RUNTIME_BUILDERS: tuple[Callable[[ir.Module, int], ir.Function], ...] = (_gemm_function, _pack_function)
_RUNTIME_LOCK = threading.Lock()
_RUNTIME: dict[int, object] = {}   # float bits -> the loaded library's engine (kept: kernels call into it)


@functools.cache
def _runtime_signature(build: Callable[[ir.Module, int], ir.Function], bits: int) -> tuple[str, ir.FunctionType]:
    fn = build(ir.Module(name="signature"), bits)
    return fn.name, fn.ftype


def _runtime_object(bits: int) -> tuple[bytes, list[str]]:
    """The runtime library for `bits`-bit floats compiled, and the names it exports."""
    module = ir.Module(name=f"unroll_runtime_f{bits}")
    exported = []
    for build in RUNTIME_BUILDERS:
        fn = build(module, bits)
        fn.linkage = ""   # exported (the micro-kernels stay private to it)
        exported.append(fn.name)
    compiled = llvm.parse_assembly(str(module))
    compiled.verify()
    _optimize(compiled, _machine(), slp=True)
    return _machine().emit_object(compiled), exported


def runtime_library(directory: str, bits: int) -> None:
    """Make the runtime library's functions for `bits`-bit floats callable by kernels in this
    process: loaded from `directory` (compiled and cached there the first time on this machine and
    version). A kernel object is loaded after the libraries it calls: its calls are resolved then."""
    with _RUNTIME_LOCK:
        if bits in _RUNTIME:
            return
        _initialize()
        name = f"unroll_runtime_f{bits}_" + cache.digest("\n".join([
            _runtime_version(), llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()]))
        with cache.entry_lock(directory, name):
            found = _read_meta(directory, name)
            if found is None:
                obj, symbols = _runtime_object(bits)
                _write_object(directory, name, obj, {"symbols": symbols})
            else:
                meta, obj = found
                symbols = meta["symbols"]
        engine = _engine(obj)
        for symbol in symbols:
            llvm.add_symbol(symbol, engine.get_function_address(symbol))
        _RUNTIME[bits] = engine


@functools.cache
def _runtime_version() -> str:
    """What the runtime's code depends on: kernels_ir.py, this module, llvmlite's LLVM."""
    from . import kernels_ir
    texts = []
    for path in (kernels_ir.__file__, __file__):
        with open(path, "rb") as f:
            texts.append(f.read().decode())
    return cache.digest("\n".join(texts + [llvm.llvm_version_info.__repr__()]))


def _engine(obj: bytes) -> llvm.ExecutionEngine:
    engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), _machine())
    engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
    engine.finalize_object()
    return engine


def _read_meta(directory: str, name: str) -> tuple[dict, bytes] | None:
    """The cached object `name` and its metadata if its digest checks, else None (a damaged entry
    is reported in one warning line; the caller rebuilds and replaces it)."""
    obj_path, meta_path = os.path.join(directory, name + ".o"), os.path.join(directory, name + ".json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        with open(obj_path, "rb") as f:
            obj = f.read()
        if cache.digest(obj) != meta["digest"]:
            raise ValueError("the object code does not match its digest")
        return meta, obj
    except (FileNotFoundError, NotADirectoryError, PermissionError):   # none yet, or no cache to read
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        cache.warn(f"unroll: damaged cache entry {obj_path} ({err}); rebuilding it")
        return None


def _write_object(directory: str, name: str, obj: bytes, meta: dict) -> None:
    """Cache `obj` with its metadata and digest; an unwritable directory is reported once."""
    try:
        cache.write_atomic(os.path.join(directory, name + ".o"), obj)
        cache.write_atomic(os.path.join(directory, name + ".json"), json.dumps({**meta, "digest": cache.digest(obj)}))
    except OSError as err:
        if directory not in _UNWRITABLE:
            _UNWRITABLE.add(directory)
            cache.warn(f"unroll: the cache directory {directory} is not writable ({err}); compiled "
                       f"kernels stay in memory")


class _Buffer:
    """Owner of a malloc'ed buffer that numpy arrays view (freed with the last of them)."""
    _free = ctypes.CDLL(None).free
    _free.argtypes = [ctypes.c_void_p]

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __del__(self) -> None:
        self._free(self.ptr)


def _view(ptr: int, shape: tuple[int, ...], dtype: np.dtype, owner: _Buffer | None) -> np.ndarray:
    """An ndarray over `ptr`; it keeps `owner` (the malloc'ed block) alive. Without an owner the
    memory is an argument's, and the result is a copy (a kernel's outputs never alias its inputs)."""
    count = int(np.prod(shape))
    buf = (ctypes.c_char * max(count * dtype.itemsize, 1)).from_address(ptr)
    arr = np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)
    if owner is None:
        return arr.copy()
    buf._unroll_owner = owner   # type: ignore[attr-defined]   # the array's base holds the owner
    return arr


@dataclass
class _CallBuffers:
    """What one call passes and gets back: argument pointers and shapes, outputs (data and base
    pointers) and their shapes, the status word and the kernel's table of buffers."""
    args: np.ndarray
    shapes: np.ndarray
    outs: np.ndarray
    out_shapes: np.ndarray
    status: np.ndarray
    allocations: np.ndarray
    pointers: tuple[int, ...] = ()


class NativeKernel:
    """The compiled function, called like a Numba dispatcher: `fn(*arrays) -> tuple of arrays`.
    Calls release the GIL (ctypes) and each thread has its own call buffers, so threads may call
    one kernel at once, as they could call Numba's `nogil` function."""

    def __init__(self, arg_types: Sequence[tuple[str, int]], out_ndims: Sequence[int],
                 errors: Sequence[tuple[str, str, int]], allocations: int, address: int,
                 out_dtypes: Sequence[np.dtype]) -> None:
        self.arg_types = list(arg_types)
        self.out_ndims = list(out_ndims)
        self.errors = list(errors)
        self.out_dtypes = list(out_dtypes)
        self.allocations = allocations
        self._fn = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 6)(address)
        self._local = threading.local()

    def _buffers(self) -> _CallBuffers:
        bufs = getattr(self._local, "buffers", None)
        if bufs is None:
            bufs = self._local.buffers = _CallBuffers(
                np.zeros(len(self.arg_types), np.uintp), np.zeros(max(1, sum(nd for _, nd in self.arg_types)), np.int64),
                np.zeros(max(1, 2 * len(self.out_ndims)), np.uintp), np.zeros(max(1, sum(self.out_ndims)), np.int64),
                np.zeros(8, np.int64), np.zeros(max(1, self.allocations), np.uintp))
            bufs.pointers = tuple(a.ctypes.data for a in (bufs.args, bufs.shapes, bufs.outs, bufs.out_shapes,
                                                            bufs.status, bufs.allocations))
        return bufs

    def __call__(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        bufs = self._buffers()
        offset = 0
        for k, (a, (_, ndim)) in enumerate(zip(arrays, self.arg_types)):
            bufs.args[k] = a.ctypes.data
            bufs.shapes[offset:offset + ndim] = a.shape
            offset += ndim
        self._fn(*bufs.pointers)
        status = int(bufs.status[0])
        if status:
            kind, message, n = self.errors[status - 1]
            raise {"IndexError": IndexError, "MemoryError": MemoryError}.get(kind, RuntimeError)(
                message, *(int(v) for v in bufs.status[1:1 + n]))
        owners: dict[int, _Buffer] = {}
        outs, offset = [], 0
        for r, ndim in enumerate(self.out_ndims):
            data, base = int(bufs.outs[2 * r]), int(bufs.outs[2 * r + 1])
            shape = tuple(int(s) for s in bufs.out_shapes[offset:offset + ndim])
            offset += ndim
            owner = None
            if base:
                owner = owners.get(base)
                if owner is None:
                    owner = owners[base] = _Buffer(base)
            outs.append(_view(data, shape, self.out_dtypes[r], owner))
        return tuple(outs)


CODEGEN_ENV = "UNROLL_CPU_CODEGEN"   # "native" (the default) or "numba"
LAST_UNSUPPORTED = [""]   # why the last source went to Numba instead (for tests and debugging)


def enabled() -> bool:
    """Whether generated kernels are compiled here (else by Numba). UNROLL_CPU_CODEGEN=numba
    switches the native path off (to compare the two, or to step around a bug in it)."""
    return os.environ.get(CODEGEN_ENV, "native").lower() != "numba"


def optimized_ir(source: str, arg_types: Sequence[tuple[str, int]]) -> tuple[llvm.ModuleRef, Renderer]:
    """`source` rendered to LLVM IR and optimised (what the object code is compiled from)."""
    renderer = Renderer(arg_types)
    renderer.render(source)
    module = llvm.parse_assembly(str(renderer.module))
    module.verify()
    _optimize(module, _machine())
    return module, renderer


def _compile_object(source: str, arg_types: Sequence[tuple[str, int]]) -> tuple[bytes, dict]:
    """The optimised object code for `source`, and what calling it needs (outputs, errors)."""
    module, renderer = optimized_ir(source, arg_types)
    return _machine().emit_object(module), {"out_ndims": renderer.out_ndims, "errors": renderer.errors,
                                            "allocations": renderer.n_allocs, "runtime": sorted(renderer.runtime)}


def _load_object(obj: bytes, meta: dict, out_dtypes: Sequence[np.dtype], arg_types, directory: str) -> NativeKernel:
    for bits in meta["runtime"]:
        runtime_library(directory, bits)
    engine = _engine(obj)
    address = engine.get_function_address("unroll_kernel")
    if not address:
        raise ValueError("no unroll_kernel in the object")
    kernel = NativeKernel(arg_types, meta["out_ndims"], [tuple(e) for e in meta["errors"]], meta["allocations"],
                          address, out_dtypes)
    kernel.engine = engine   # type: ignore[attr-defined]   # the code lives as long as the kernel
    return kernel


def compile_native(source: str, arg_types: Sequence[tuple[str, int]], out_dtypes: Sequence[np.dtype],
                   directory: str | None = None, version: str = "") -> tuple[NativeKernel, str, str]:
    """The kernel for `source` (a generated `def kernel(...)`) with arguments of (dtype, ndim):
    loaded from `directory`'s object cache or compiled (and cached there). Returns (kernel, the
    object file's path, how: "memory" (this process had it), "loaded" or "compiled"). Raises Unsupported where the source
    leaves the kernel language. A damaged cache entry is reported, rebuilt and replaced; a cache
    that cannot be written is reported once and the kernel is kept in memory."""
    _initialize()
    key = cache.digest("\n".join([version, llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten(),
                                   repr(list(arg_types)), repr([str(d) for d in out_dtypes]), source]))
    name = f"unroll_native_{key}"
    directory = directory or cache.default_dir()
    path = os.path.join(directory, name + ".o")
    with cache.entry_lock(directory, name):   # one compile per entry, across threads and processes
        kernel = _LOADED.get(path)   # this process has it (another T or B of the same source)
        if kernel is not None:
            return kernel, path, "memory"
        kernel = load_entry(directory, name, arg_types, out_dtypes)
        if kernel is not None:
            return kernel, path, "loaded"
        obj, meta = _compile_object(source, arg_types)
        _write_object(directory, name, obj, {**meta, "source": source})
        kernel = _LOADED[path] = _load_object(obj, meta, out_dtypes, arg_types, directory)
        return kernel, path, "compiled"


def load_entry(directory: str, name: str, arg_types: Sequence[tuple[str, int]],
               out_dtypes: Sequence[np.dtype]) -> NativeKernel | None:
    """The cached kernel `name` in `directory`, or None when there is none or it is damaged (then
    reported in one warning line; the caller rebuilds and replaces it)."""
    found = _read_meta(directory, name)
    if found is None:
        return None
    meta, obj = found
    obj_path = os.path.join(directory, name + ".o")
    try:
        kernel = _load_object(obj, meta, out_dtypes, arg_types, directory)
        kernel.source = meta["source"]   # type: ignore[attr-defined]
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        cache.warn(f"unroll: damaged cache entry {obj_path} ({err}); rebuilding it")
        return None
    _LOADED[obj_path] = kernel
    return kernel


_UNWRITABLE: set[str] = set()
_LOADED: dict[str, NativeKernel] = {}   # object path -> its kernel, loaded once per process
