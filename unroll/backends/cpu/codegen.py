"""Graph -> Python source for one `@njit` function: loops stay rolled, buffers are preallocated.

The generated function takes the graph's input arrays, `dims` (int64) and `fk` (float64) and returns
the output arrays. Everything shape-dependent -- sizes, loop lengths, slice bounds, float constants
such as a mean's 1/count -- is read from `dims`/`fk` at run time, never written into the source, so
graphs that differ only in T or B produce the *same* source, hence the same content hash, module
and Numba cache entry (sizes 0 and 1 and "simple" constants stay literal; equal sizes share one
name, so a coincidence such as T == H gives another, equally valid, source).

Lowering, by op (see `_EMITTERS`):
- values are `Val`s: an array variable plus an index map, so transpose/slice/broadcast/stop_gradient
  are free views resolved at code-generation time (loops index the underlying buffer directly, which
  keeps unit strides visible to LLVM);
- elementwise ops with one user of the same shape are inlined into that user's loop nest, and a
  FUSED node's body becomes one loop nest per output shape (scalar statements, no temporaries);
- matmul calls BLAS (`cpu.blas.xxgemm`); inside a loop, a product by a loop-invariant weight
  packs that weight once before the loop and runs `gemm.packed_gemm` up to a size chosen at
  run time (BLAS above it), other per-step products run as loops when small; `c + a @ b`
  accumulates in place (beta=1), directly into the carried buffer when it is a loop carry read
  nowhere else (BPTT weight gradients);
- a LOOP is a `for t in range(...)` in the same function; every per-step buffer is allocated once
  before the outermost loop, per-step outputs are written straight into `ys[t]`, and carries swap
  buffers at the end of a step instead of copying.
Each emitted line remembers its node, so compile errors can name the op and the user's line.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ...ir.node import Graph, LoopInfo, Node
from ...ir.ops import ELEMENTWISE, FLOAT_DTYPES, Op
from ..lower.scalar import SCALAR_EXPRS
from .gemm import PACKED_MAX_MACS, packed_size_text
from .blas import LOOP_MAX_MACS

Index = Callable[[Sequence[str]], list[str]]


class UnsupportedOp(NotImplementedError):
    """The Numba backend has no lowering for an op (the message names it and the user's line)."""


@dataclass
class Val:
    """A tensor value in generated code: `base[idx(I)]` is its element at logical index I.

    `const` marks a constant (its scalar expression; no array). `arr` is a Numba array expression
    for the whole value when one exists (a view), `plain` says `arr` is C-contiguous with exactly
    this shape, `tbase` is set when the value is the transpose of such a plain 2-D array (BLAS takes
    it without a copy), and `root` names the variable owning the memory (to avoid returning input
    views). Rank-0 values live in shape-(1,) arrays.
    """

    shape: tuple[int, ...]
    dtype: str
    base: str | None = None
    idx: Index | None = None
    const: str | None = None
    arr: str | None = None
    plain: bool = False
    root: str | None = None
    tbase: str | None = None   # for 2-D transposes of a plain array: that array's expression
    fn: Callable[[Sequence[str]], str] | None = None  # a virtual value (pad, concat): its element
    parts: tuple[int, list] | None = None  # a virtual concat: (axis, [(start or None, part Val)])
    packed: str | None = None  # a loop-invariant weight: its panels packed for gemm.packed_gemm

    def elem(self, index: Sequence[str]) -> str:
        if self.const is not None:
            return self.const
        if self.fn is not None:
            return self.fn(index)
        return f"{self.base}[{', '.join(self.idx(index))}]"  # type: ignore[misc]


def plain_val(name: str, shape: tuple[int, ...], dtype: str, root: str | None = None) -> Val:
    idx: Index = (lambda index: ["0"]) if not shape else (lambda index: list(index))
    return Val(shape, dtype, base=name, idx=idx, arr=name, plain=True, root=root or name)


class Dims:
    """Shape-dependent numbers become run-time parameters `n<k>` (ints) and `k<k>` (floats).

    Sizes (`n`) share one name per value, so a graph's loops over equal extents read one variable;
    offsets (`offset`: slice bounds, pads, concat positions) get a name per use. Otherwise an offset
    that happened to equal a size (a TCN's padding 8 and a batch of 8) changed the source for a new
    T or B: another module and, for a TCN, another 40 s compile. Equal sizes (T == I) still give
    another, equally valid, source. 0 and 1 stay literal (size-1 axes, unit steps), so B = 1 is a
    module of its own."""

    def __init__(self) -> None:
        self.ints: dict[object, str] = {}
        self.values: list[int] = []
        self.floats: dict[tuple[str, float], str] = {}

    def n(self, value: int) -> str:
        return self._name(int(value), int(value))

    def offset(self, value: int) -> str:
        return self._name(int(value), ("offset", len(self.ints)))

    def part_offset(self, extents: Sequence[int], k: int) -> str | None:
        """Where part k of a concatenation of parts with these extents starts (None: at 0). After
        parts of its own extent it is written `k * n` with n the part's extent (`2 * n3` for the
        third of equal gates): a loop over the part writes [k * n + i] for i < n, so LLVM can prove
        the parts' stores disjoint and vectorise a kernel that writes all gates (with an unrelated
        offset name it cannot, and kept it scalar)."""
        offset, part = sum(extents[:k]), extents[k]
        if not offset:
            return None
        if part > 1 and all(e == part for e in extents[:k]):  # k is structural, not a size
            return self.n(part) if k == 1 else f"{k} * {self.n(part)}"
        return self.offset(offset)

    def _name(self, value: int, key: object) -> str:
        if value in (0, 1):
            return str(value)
        if key not in self.ints:
            self.ints[key] = f"n{len(self.ints)}"
            self.values.append(value)
        return self.ints[key]

    def shape(self, shape: Sequence[int]) -> str:
        return "(" + "".join(f"{self.n(d)}, " for d in shape) + ")" if shape else "(1,)"

    def f(self, value: float, dtype: str) -> str:
        if dtype not in FLOAT_DTYPES:
            if dtype == "bool":
                return "True" if value else "False"
            v = int(value)
            return f"np.{dtype}({v})" if abs(v) <= 2 else f"np.{dtype}({'' if v > 0 else '-'}{self.n(abs(v))})"
        value = float(value)
        if math.isinf(value) or math.isnan(value):
            lit = "np.inf" if value > 0 else "-np.inf" if value < 0 else "np.nan"
        elif _simple(value):
            lit = repr(value)
        else:
            key = (dtype, value)
            if key not in self.floats:
                self.floats[key] = f"k{len(self.floats)}"
            return self.floats[key]
        return f"np.{dtype}({lit})"


def _simple(value: float) -> bool:
    """Constants that stay literal: small integers and quarters (not 1/count-like values)."""
    return abs(value) <= 64 and (value * 4).is_integer()


_FLOAT_LIT = re.compile(r"(?<![\w.])(\d+\.\d+)")


def scalar_statements(op: Op, dtype: str, in_dtype: str, operands: Sequence[str], name: str) -> list[str]:
    """Statements assigning `name` = op(operands): the exprs table adapted to Numba CPU (literals
    typed like the operands so float32 math stays float32, explicit casts, vectorisable tanh)."""
    if op is Op.CAST:
        return [f"{name} = np.{'bool_' if dtype == 'bool' else dtype}({operands[0]})"]
    if in_dtype == "float32" and op in (Op.TANH, Op.SIGMOID):
        x = operands[0] if op is Op.TANH else f"np.float32(0.5) * {operands[0]}"
        lines = tanh32_statements(x, name)
        if op is Op.SIGMOID:
            lines.append(f"{name} = np.float32(0.5) + np.float32(0.5) * {name}")
        return lines
    template = FLOAT_SELECTS.get(op, SCALAR_EXPRS[op]) if in_dtype in FLOAT_DTYPES else SCALAR_EXPRS[op]
    if in_dtype in FLOAT_DTYPES:
        template = _FLOAT_LIT.sub(lambda m: f"np.{in_dtype}({m.group(1)})", template)
    return [f"{name} = {template.format(*operands)}"]


# float max/min as selects that propagate NaN like np.maximum/np.minimum (`|`, not `or`: no branch)
FLOAT_SELECTS = {
    Op.MAX: "({0} if ({0} > {1}) | ({0} != {0}) else {1})",
    Op.MIN: "({0} if ({0} < {1}) | ({0} != {0}) else {1})",
}


def float_max(a: str, b: str) -> str:
    return FLOAT_SELECTS[Op.MAX].format(a, b)


_TANH_P = ("-2.76076847742355e-16", "2.00018790482477e-13", "-8.60467152213735e-11", "5.12229709037114e-08",
           "1.48572235717979e-05", "6.37261928875436e-04", "4.89352455891786e-03")
_TANH_Q = ("1.19825839466702e-06", "1.18534705686654e-04", "2.26843463243900e-03", "4.89352518554385e-03")


def tanh32_statements(x: str, name: str) -> list[str]:
    """Eigen's float32 tanh (a clamped odd rational polynomial, ~2 ulp): plain arithmetic that LLVM
    vectorises, where `math.tanh` is a scalar libm call per element (and calling a helper @njit
    function would link its module into every kernel)."""
    xc, x2 = f"{name}c", f"{name}q"
    p = f"np.float32({_TANH_P[0]})"
    for coef in _TANH_P[1:]:
        p = f"({p} * {x2} + np.float32({coef}))"
    q = f"np.float32({_TANH_Q[0]})"
    for coef in _TANH_Q[1:]:
        q = f"({q} * {x2} + np.float32({coef}))"
    lo, hi = "np.float32(-7.90531110763549805)", "np.float32(7.90531110763549805)"
    # the clamp as selects: Python's min/max lower to branches LLVM does not if-convert, which kept
    # every loop holding a tanh or sigmoid scalar (NaN still passes through: both tests are false)
    return [f"{xc} = {x}",
            f"{xc} = {lo} if {xc} < {lo} else ({hi} if {xc} > {hi} else {xc})",
            f"{x2} = {xc} * {xc}",
            f"{name} = {xc} * {p} / {q}"]


# ---- code blocks ---------------------------------------------------------------------------------

@dataclass
class Block:
    """Lines of code (text, indent, node); nested blocks are insertion points (hoisted allocations)."""

    items: list = field(default_factory=list)

    def add(self, indent: int, text: str, node: Node | None = None) -> None:
        self.items.append((indent, text, node))

    def sub(self) -> "Block":
        block = Block()
        self.items.append(block)
        return block

    def flatten(self, out: list[tuple[int, str, Node | None]]) -> None:
        stack: list = [iter(self.items)]
        while stack:
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
            elif isinstance(item, Block):
                stack.append(iter(item.items))
            else:
                out.append(item)


@dataclass
class Scope:
    """One graph being emitted: the top level or a loop body (closed: it sees only its ARGs)."""

    graph: Graph
    env: dict[Node, Val]
    block: Block
    indent: int
    alloc: Block | None = None     # where per-step buffers go (before the outermost loop)
    alloc_indent: int = 0
    targets: dict[Node, Val] = field(default_factory=dict)  # write destinations (ys[t])
    order: list[Node] = field(default_factory=list)
    users: dict[Node, list[Node]] = field(default_factory=dict)
    inline: set[Node] = field(default_factory=set)
    accumulate: dict[Node, Node] = field(default_factory=dict)  # add node -> its matmul operand
    owned: dict[Node, str] = field(default_factory=dict)   # node -> buffer allocated for it here
    in_place: dict[Node, Val] = field(default_factory=dict)  # node -> carry buffer it updates
    virtual: set[Node] = field(default_factory=set)   # concats read through index arithmetic


_INLINE_INTO = ELEMENTWISE | {Op.SUM, Op.REDUCE_MAX}


class Codegen:
    """Generates the source of one function for one graph. `generate()` returns the source text."""

    def __init__(self, graph: Graph, fn_name: str = "kernel") -> None:
        self.graph = graph
        self.fn_name = fn_name
        self.dims = Dims()
        self.counter = 0
        self.loop_depth = 0
        self.arg_names = _arg_names(graph)
        self.lines: list[tuple[int, str, Node | None]] = []

    # ---- naming and allocation -------------------------------------------------------------------

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def alloc(self, scope: Scope, shape: tuple[int, ...], dtype: str, prefix: str, node: Node | None,
              fill: str | None = None) -> Val:
        name = self.fresh(prefix)
        ctor = f"np.full({self.dims.shape(shape)}, {fill}, np.{_np_dtype(dtype)})" if fill is not None \
            else f"np.empty({self.dims.shape(shape)}, np.{_np_dtype(dtype)})"
        if scope.alloc is None:
            scope.block.add(scope.indent, f"{name} = {ctor}", node)
        else:
            scope.alloc.add(scope.alloc_indent, f"{name} = {ctor}", node)
        return plain_val(name, shape, dtype)

    def out_for(self, scope: Scope, node: Node, prefix: str) -> Val:
        """Where a node's result goes: its write target (ys[t], a carry), else a new buffer."""
        if node in scope.in_place:
            return scope.in_place[node]
        if node in scope.targets:
            return scope.targets[node]
        val = self.alloc(scope, node.shape, node.dtype, prefix, node)
        scope.owned[node] = val.base  # type: ignore[assignment]
        return val

    # ---- loop nests ------------------------------------------------------------------------------

    def nest(self, scope: Scope, shape: Sequence[int], node: Node | None) -> tuple[list[str], int]:
        """Open `for` loops over shape at the current position; returns index names and indent."""
        names = []
        indent = scope.indent
        for k, d in enumerate(shape):
            name = f"i{k}"
            scope.block.add(indent, f"for {name} in range({self.dims.n(d)}):", node)
            names.append(name)
            indent += 1
        return names, indent

    def copy(self, scope: Scope, src: Val, dst: Val, node: Node | None) -> None:
        if src.parts is not None and src.shape == dst.shape:
            # a virtual concat (a convolution's im2col columns) part by part: each part's loops
            # copy contiguous runs, where one loop over the whole chose its part per element (a
            # branch chain that kept the copy scalar)
            axis, parts = src.parts
            for start, part in parts:
                self.copy(scope, part, _offset_view(dst, part.shape, axis, start), node)
            return
        idx, indent = self.nest(scope, dst.shape, node)
        scope.block.add(indent, f"{dst.elem(idx)} = {src.elem(_bcast(idx, src.shape, dst.shape))}", node)

    def materialize(self, scope: Scope, val: Val, node: Node | None) -> Val:
        if val.plain:
            return val
        out = self.alloc(scope, val.shape, val.dtype, "m", node)
        self.copy(scope, val, out, node)
        return out

    def array(self, scope: Scope, val: Val, node: Node | None) -> str:
        """A Numba array expression for the value (a view where possible, else a copy)."""
        if val.arr is not None:
            return val.arr
        return self.materialize(scope, val, node).arr  # type: ignore[return-value]

    # ---- scopes ----------------------------------------------------------------------------------

    def prepare(self, scope: Scope) -> None:
        """Use lists, inlining and accumulation decisions for one scope."""
        scope.order = scope.graph.nodes()
        outputs = set(scope.graph.outputs)
        no_inline: set[Node] = set()
        for node in scope.order:
            for s in node.src:
                scope.users.setdefault(s, []).append(node)
        for node in scope.order:
            if node.op is Op.ADD and node.ndim == 2 and node.src[0].shape == node.src[1].shape:
                for mm, other in ((node.src[1], node.src[0]), (node.src[0], node.src[1])):
                    if mm.op is Op.MATMUL and mm.ndim == 2 and len(scope.users.get(mm, [])) == 1 \
                            and mm not in outputs and mm is not other:
                        scope.accumulate[node] = mm
                        no_inline.add(other)   # read from memory by the accumulating product
                        break
        self.concat_targets(scope, outputs, no_inline)
        for node in scope.order:
            users = scope.users.get(node, [])
            if node in scope.accumulate or node in no_inline:
                continue
            if node.op in ELEMENTWISE and node.op is not Op.STOP_GRADIENT and node not in outputs \
                    and len(users) == 1 and users[0].op in _INLINE_INTO and node.src:
                user = users[0]
                loop_shape = user.src[0].shape if user.op in (Op.SUM, Op.REDUCE_MAX) else user.shape
                if node.shape == loop_shape:
                    scope.inline.add(node)

    def concat_targets(self, scope: Scope, outputs: set[Node], no_inline: set[Node]) -> None:
        """Sources of a concat that are computed only for it write straight into its output (the
        gate gradients of an LSTM backward step): its buffer is chosen now, before they run."""
        for node in reversed(scope.order):
            if node.op is not Op.CONCAT or node in scope.in_place:
                continue
            writes = [src for src in node.src if len(scope.users.get(src, [])) == 1 and src not in outputs
                      and src not in scope.targets and _is_writer(src) and node.src.count(src) == 1]
            if not writes and node not in scope.targets and node not in outputs:
                scope.virtual.add(node)   # read through index arithmetic, never stored
                continue
            out = scope.targets.get(node)
            if out is None:
                out = self.alloc(scope, node.shape, node.dtype, "cat", node)
                scope.owned[node] = out.base  # type: ignore[assignment]
            scope.targets[node] = out
            axis: int = node.arg  # type: ignore[assignment]
            extents = [src.shape[axis] for src in node.src]
            for k, src in enumerate(node.src):
                if src in writes:
                    scope.targets[src] = _offset_view(out, src.shape, axis, self.dims.part_offset(extents, k))
                    no_inline.add(src)

    def emit_scope(self, scope: Scope) -> list[Val]:
        self.prepare(scope)
        accumulated = set(scope.accumulate.values())
        for node in scope.order:
            if node in scope.env or node in scope.inline:
                continue
            if node in accumulated:
                continue  # emitted by its accumulating add
            if node.op in (Op.INPUT, Op.PARAM, Op.ARG):
                raise UnsupportedOp(f"no value for {node!r} (built at {node.loc})")
            emitter = _EMITTERS.get(node.op)
            if emitter is None:
                raise UnsupportedOp(f"the numba backend cannot lower op {node.op.value!r} "
                                    f"({node!r}, built at {node.loc})")
            emitter(self, scope, node)
        return [scope.env[o] for o in scope.graph.outputs]

    # ---- the whole function ----------------------------------------------------------------------

    def generate(self) -> str:
        top = Block()
        scope = Scope(self.graph, {}, top, 1)
        for name, node in zip(self.arg_names, self.graph.inputs):
            scope.env[node] = plain_val(name, node.shape, node.dtype)
        outs = self.emit_scope(scope)
        returned = []
        inputs = set(self.arg_names)
        for node, val in zip(self.graph.outputs, outs):
            if not val.plain or val.root in inputs or val.const is not None:
                val = self.materialize_fresh(scope, val, node)
            returned.append(val.arr)
        top.add(1, f"return ({''.join(r + ', ' for r in returned)})")
        header = [(0, f"def {self.fn_name}({', '.join(self.arg_names + ['dims', 'fk', 'blas'])}):", None)]
        for k in range(len(self.dims.values)):
            header.append((1, f"n{k} = dims[{k}]", None))
        for (dtype, _), name in self.dims.floats.items():
            header.append((1, f"{name} = np.{dtype}(fk[{int(name[1:])}])", None))
        body: list[tuple[int, str, Node | None]] = []
        top.flatten(body)
        self.lines = header + body
        return "\n".join("    " * indent + text for indent, text, _ in self.lines) + "\n"

    def materialize_fresh(self, scope: Scope, val: Val, node: Node) -> Val:
        out = self.alloc(scope, val.shape, val.dtype, "out", node)
        self.copy(scope, val, out, node)
        return out

    @property
    def dim_values(self) -> list[int]:
        return list(self.dims.values)

    @property
    def float_values(self) -> list[float]:
        return [v for _, v in self.dims.floats]


def _np_dtype(dtype: str) -> str:
    return "bool_" if dtype == "bool" else dtype


def _arg_names(graph: Graph) -> list[str]:
    names, seen = [], set()
    for i, node in enumerate(graph.inputs):
        base = "a_" + re.sub(r"\W", "_", node.name or f"in{i}")
        name = base
        while name in seen:
            name = f"{base}_{i}"
        seen.add(name)
        names.append(name)
    return names


def _bcast(index: Sequence[str], shape: tuple[int, ...], loop_shape: tuple[int, ...]) -> list[str]:
    """Index into an operand of `shape` broadcast (numpy rules) to `loop_shape`."""
    offset = len(loop_shape) - len(shape)
    return [("0" if d == 1 and loop_shape[k + offset] != 1 else index[k + offset]) for k, d in enumerate(shape)]


# ---- elementwise clusters ------------------------------------------------------------------------

def _cone(outputs: Sequence[Node], is_leaf: Callable[[Node], bool]) -> list[Node]:
    """Nodes needed for outputs, stopping at leaves, sources first (iterative post-order)."""
    order, seen = [], set()
    stack: list[tuple[Node, bool]] = [(o, False) for o in reversed(outputs)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        if not is_leaf(node):
            stack.extend((s, False) for s in reversed(node.src) if s not in seen)
    return order


def emit_cluster(cg: Codegen, scope: Scope, loop_shape: tuple[int, ...],
                 stores: Sequence[tuple[Node, Val]], leaf_val: Callable[[Node], Val | None],
                 node: Node, reduce: tuple[Node, Val] | None = None) -> None:
    """One loop nest over loop_shape computing every node in the cone of `stores` as scalar
    statements; `leaf_val(n)` gives the array of a node read from memory (None: compute it).
    With `reduce=(src, out)`, the single computed value is reduced into out instead of stored."""
    outs = [n for n, _ in stores] if reduce is None else [reduce[0]]
    cone = _cone(outs, lambda n: n.op is Op.CONST or leaf_val(n) is not None)
    if reduce is None:
        idx, indent = cg.nest(scope, loop_shape, node)
        _emit_statements(cg, scope, cone, idx, indent, loop_shape, leaf_val, node, stores)
        return
    src, out = reduce
    axes, keepdims = node.arg  # type: ignore[misc]
    kept = [k for k in range(len(loop_shape)) if k not in axes]
    split = (max(kept) + 1) if kept else 0   # trailing reduced axes use a scalar accumulator
    is_max = node.op is Op.REDUCE_MAX
    init = cg.dims.f(-math.inf if node.dtype in FLOAT_DTYPES else -(2 ** 31), node.dtype) if is_max \
        else cg.dims.f(0, node.dtype)
    # initialise the output
    oidx, oindent = cg.nest(scope, out.shape, node)
    scope.block.add(oindent, f"{out.elem(oidx)} = {init}", node)
    idx, indent = cg.nest(scope, loop_shape[:split], node)
    out_index = [idx[k] if k in kept else "0" for k in range(split)] + ["0"] * (len(loop_shape) - split)
    out_index = [i for k, i in enumerate(out_index) if keepdims or k in kept]
    acc = cg.fresh("acc")
    scope.block.add(indent, f"{acc} = {init}", node)
    inner = [f"i{k}" for k in range(split, len(loop_shape))]
    for k, name in enumerate(inner):
        scope.block.add(indent + k, f"for {name} in range({cg.dims.n(loop_shape[split + k])}):", node)
    full_idx = idx + inner
    value = _emit_statements(cg, scope, cone, full_idx, indent + len(inner), loop_shape, leaf_val, node, [])
    is_float = node.dtype in FLOAT_DTYPES
    pick = float_max if is_float else (lambda a, b: f"max({a}, {b})")
    combine = pick(acc, value) if is_max else f"{acc} + {value}"
    scope.block.add(indent + len(inner), f"{acc} = {combine}", node)
    target = out.elem(out_index)
    combine_out = pick(target, acc) if is_max else f"{target} + {acc}"
    scope.block.add(indent, f"{target} = {combine_out}", node)


def _emit_statements(cg: Codegen, scope: Scope, cone: list[Node], idx: list[str], indent: int,
                     loop_shape: tuple[int, ...], leaf_val: Callable[[Node], Val | None], node: Node,
                     stores: Sequence[tuple[Node, Val]]) -> str:
    names: dict[Node, str] = {}
    for n in cone:
        val = leaf_val(n) if n.op is not Op.CONST else None
        if n.op is Op.CONST:
            names[n] = cg.dims.f(n.arg, n.dtype)  # type: ignore[arg-type]
        elif val is not None:
            if val.const is not None:
                names[n] = val.const
            else:
                names[n] = cg.fresh("e")
                scope.block.add(indent, f"{names[n]} = {val.elem(_bcast(idx, val.shape, loop_shape))}", n)
        elif n.op is Op.STOP_GRADIENT:
            names[n] = names[n.src[0]]
        else:
            names[n] = cg.fresh("s")
            in_dtype = n.src[-1].dtype
            for line in scalar_statements(n.op, n.dtype, in_dtype, [names[s] for s in n.src], names[n]):
                scope.block.add(indent, line, n)
    for n, out in stores:
        scope.block.add(indent, f"{out.elem(idx)} = {names[n]}", n)
    return names[cone[-1]] if cone else ""


def _scope_leaf(scope: Scope) -> Callable[[Node], Val | None]:
    def leaf(n: Node) -> Val | None:
        if n in scope.inline:
            return None
        return scope.env.get(n)
    return leaf


def emit_elementwise(cg: Codegen, scope: Scope, node: Node) -> None:
    if node.op is Op.STOP_GRADIENT:
        scope.env[node] = scope.env[node.src[0]]
        return
    out = cg.out_for(scope, node, "v")
    emit_cluster(cg, scope, node.shape, [(node, out)], _scope_leaf(scope), node)
    scope.env[node] = out


def emit_reduce(cg: Codegen, scope: Scope, node: Node) -> None:
    out = cg.out_for(scope, node, "r")
    src = node.src[0]
    leaf = _scope_leaf(scope)
    emit_cluster(cg, scope, src.shape, [], leaf, node, reduce=(src, out))
    scope.env[node] = out


def emit_fused(cg: Codegen, scope: Scope, node: Node) -> None:
    body: Graph = node.arg  # type: ignore[assignment]
    projs: dict[int, list[Node]] = {}
    for user in scope.users.get(node, []):
        if user.op is Op.PROJ:
            projs.setdefault(user.arg, []).append(user)  # type: ignore[arg-type]
    arg_vals = {a: scope.env[s] for a, s in zip(body.inputs, node.src)}
    body_nodes = _cone(list(body.outputs), lambda n: n.op in (Op.ARG, Op.CONST))
    if not all(n.op in ELEMENTWISE or n.op in (Op.ARG, Op.CONST) for n in body_nodes):
        # not purely elementwise: emit the body inline as a nested scope
        sub = Scope(body, dict(arg_vals), scope.block, scope.indent, scope.alloc, scope.alloc_indent)
        outs = cg.emit_scope(sub)
        for i, users in projs.items():
            for u in users:
                scope.env[u] = outs[i]
        return
    groups: dict[tuple[int, ...], list[tuple[Node, Val]]] = {}
    results: dict[int, Val] = {}
    for i, out_node in enumerate(body.outputs):
        users = projs.get(i)
        if not users:
            continue
        if out_node in arg_vals:   # an output that is an input passes through
            results[i] = arg_vals[out_node]
            continue
        if out_node.op is Op.CONST:
            results[i] = Val(out_node.shape, out_node.dtype, const=cg.dims.f(out_node.arg, out_node.dtype))  # type: ignore[arg-type]
            continue
        # proj nodes are interned: one per output; it gets its write target, else a new buffer
        owner = users[0]
        out = cg.out_for(scope, owner, "f")
        results[i] = out
        groups.setdefault(out_node.shape, []).append((out_node, out))
    for shape, stores in groups.items():
        emit_cluster(cg, scope, shape, stores, lambda n: arg_vals.get(n), node)
    for i, users in projs.items():
        if i in results:
            for u in users:
                scope.env[u] = results[i]


# ---- matmul, movement, misc ----------------------------------------------------------------------

def _blas_operand(cg: Codegen, scope: Scope, val: Val, node: Node) -> tuple[str, bool]:
    """A local variable holding a C-contiguous 2-D array, and whether the value is its transpose."""
    if val.plain:
        expr, trans = val.arr, False
    elif val.tbase is not None:
        expr, trans = val.tbase, True
    else:
        expr, trans = cg.materialize(scope, val, node).arr, False
    if not re.fullmatch(r"\w+", expr):  # type: ignore[arg-type]
        name = cg.fresh("op")
        scope.block.add(scope.indent, f"{name} = {expr}", node)
        expr = name
    return expr, trans  # type: ignore[return-value]


def emit_matmul(cg: Codegen, scope: Scope, node: Node, out: Val | None = None, accumulate: bool = False) -> None:
    a, b = (scope.env[s] for s in node.src)
    if out is None:
        out = cg.out_for(scope, node, "mm")
    if node.ndim != 2:
        emit_batched_matmul(cg, scope, node, a, b, out, accumulate)
        scope.env[node] = out
        return
    final = None
    if not out.plain:
        final, out = out, cg.alloc(scope, node.shape, node.dtype, "mm", node)
        if accumulate:
            cg.copy(scope, final, out, node)
    A, ta = _blas_operand(cg, scope, a, node)
    B, tb = _blas_operand(cg, scope, b, node)
    O, _ = _blas_operand(cg, scope, out, node)
    m, k, n = (cg.dims.n(d) for d in (node.shape[0], node.src[0].shape[1], node.shape[1]))
    dtype = node.dtype
    add = scope.block.add
    ind = scope.indent

    def a_el(i: str, kk: str) -> str:
        return f"{A}[{kk}, {i}]" if ta else f"{A}[{i}, {kk}]"
    kind = ord("s" if dtype == "float32" else "d")
    beta = f"np.{dtype}({1.0 if accumulate else 0.0})"
    # row-major out = A @ B is column-major out^T = B^T A^T
    blas = (f"xxgemm({kind}, {ord('t' if tb else 'n')}, {ord('t' if ta else 'n')}, {n}, {m}, {k}, "
            f"np.{dtype}(1.0), {B}, max({B}.shape[1], 1), {A}, "
            f"max({A}.shape[1], 1), {beta}, {O}, max({n}, 1))")
    if scope.alloc is None:
        # outside loops a product runs once per call: BLAS's call cost does not matter and one code
        # path compiles faster (every loop nest costs Numba/LLVM compile time)
        add(ind, f"if {m} * {k} * {n} > 0:", node)
        add(ind + 1, blas, node)
        if not accumulate:
            add(ind, "else:", node)
            add(ind + 1, f"{O}[:, :] = np.{dtype}(0.0)", node)
        _matmul_result(cg, scope, node, out, final)
        return
    if b.packed is not None:
        # a packed loop-invariant weight: the micro-kernel up to PACKED_MAX_MACS (one thread, no
        # call or packing cost), BLAS's threads above it. Decided at run time (sizes are dims)
        add(ind, f"if {m} * {k} * {n} <= {PACKED_MAX_MACS}:", node)
        add(ind + 1, f"packed_gemm({A}, {int(ta)}, {b.packed}, {O}, {int(accumulate)})", node)
        add(ind, "else:", node)
        add(ind + 1, blas, node)
        _matmul_result(cg, scope, node, out, final)
        return
    # small products: loops (no call overhead); large: BLAS. Decided at run time (sizes are dims)
    add(ind, f"if {m} * {k} * {n} < {LOOP_MAX_MACS}:", node)
    if not tb:  # i-k-j: unit stride over rows of B and out
        add(ind + 1, f"for i0 in range({m}):", node)
        if not accumulate:
            add(ind + 2, f"for i2 in range({n}):", node)
            add(ind + 3, f"{O}[i0, i2] = np.{dtype}(0.0)", node)
        aik = cg.fresh("aik")
        add(ind + 2, f"for i1 in range({k}):", node)
        add(ind + 3, f"{aik} = {a_el('i0', 'i1')}", node)
        add(ind + 3, f"for i2 in range({n}):", node)
        add(ind + 4, f"{O}[i0, i2] += {aik} * {B}[i1, i2]", node)
    else:  # B is a transpose: dot products over contiguous rows of both
        acc = cg.fresh("acc")
        add(ind + 1, f"for i0 in range({m}):", node)
        add(ind + 2, f"for i2 in range({n}):", node)
        add(ind + 3, f"{acc} = np.{dtype}(0.0)", node)
        add(ind + 3, f"for i1 in range({k}):", node)
        add(ind + 4, f"{acc} += {a_el('i0', 'i1')} * {B}[i2, i1]", node)
        add(ind + 3, f"{O}[i0, i2] {'+' if accumulate else ''}= {acc}", node)
    add(ind, "else:", node)
    add(ind + 1, blas, node)
    _matmul_result(cg, scope, node, out, final)


def _matmul_result(cg: Codegen, scope: Scope, node: Node, out: Val, final: Val | None) -> None:
    """The product is in `out`; where its destination is a view BLAS cannot write (`final`), copy it there."""
    if final is not None:
        cg.copy(scope, out, final, node)
        out = final
    scope.env[node] = out


def emit_batched_matmul(cg: Codegen, scope: Scope, node: Node, a: Val, b: Val, out: Val, accumulate: bool) -> None:
    """Batched products (rare in RNNs) as plain loops over broadcast batch indices."""
    batch = node.shape[:-2]
    kk = node.src[0].shape[-1]
    idx, indent = cg.nest(scope, node.shape, node)
    acc = cg.fresh("acc")
    scope.block.add(indent, f"{acc} = np.{node.dtype}(0.0)", node)
    scope.block.add(indent, f"for j in range({cg.dims.n(kk)}):", node)
    a_idx = _bcast(idx[:-2], a.shape[:-2], batch) + [idx[-2], "j"]
    b_idx = _bcast(idx[:-2], b.shape[:-2], batch) + ["j", idx[-1]]
    scope.block.add(indent + 1, f"{acc} += {a.elem(a_idx)} * {b.elem(b_idx)}", node)
    scope.block.add(indent, f"{out.elem(idx)} {'+' if accumulate else ''}= {acc}", node)


def emit_add(cg: Codegen, scope: Scope, node: Node) -> None:
    mm = scope.accumulate.get(node)
    if mm is None:
        emit_elementwise(cg, scope, node)
        return
    other = node.src[0] if node.src[1] is mm else node.src[1]
    out = cg.out_for(scope, node, "acc")
    other_val = scope.env[other]
    if not (out.plain and other_val.plain and out.base == other_val.base):
        cg.copy(scope, other_val, out, node)   # out = other, then out += a @ b
    emit_matmul(cg, scope, mm, out=out, accumulate=True)
    scope.env[node] = out
    scope.env.pop(mm, None)


def remap(val: Val, shape: tuple[int, ...], index_map: Callable[[Sequence[str]], list[str]], arr: str | None = None,
          tbase: str | None = None) -> Val:
    """The value whose element at I is val's element at index_map(I) (a view, no code)."""
    if val.const is not None:
        return Val(shape, val.dtype, const=val.const)
    if val.fn is not None:
        fn = val.fn
        return Val(shape, val.dtype, fn=lambda index: fn(index_map(index)))
    src_idx = val.idx
    return Val(shape, val.dtype, base=val.base, idx=lambda index: src_idx(index_map(index)),  # type: ignore[misc]
               arr=arr, root=val.root, tbase=tbase)


def _broadcast_val(val: Val, shape: tuple[int, ...]) -> Val:
    if val.shape == shape:
        return val
    if val.const is not None or val.fn is not None:
        src_shape = val.shape
        return remap(val, shape, lambda index: _bcast(index, src_shape, shape))
    src_idx = val.idx
    src_shape = val.shape
    return Val(shape, val.dtype, base=val.base, idx=lambda index: src_idx(_bcast(index, src_shape, shape)),  # type: ignore[misc]
               root=val.root)


def emit_broadcast(cg: Codegen, scope: Scope, node: Node) -> None:
    scope.env[node] = _broadcast_val(scope.env[node.src[0]], node.shape)


def emit_transpose(cg: Codegen, scope: Scope, node: Node) -> None:
    val = scope.env[node.src[0]]
    perm: tuple[int, ...] = node.arg  # type: ignore[assignment]
    if val.const is not None:
        scope.env[node] = Val(node.shape, node.dtype, const=val.const)
        return
    inv = [perm.index(k) for k in range(len(perm))]
    if val.fn is not None:
        scope.env[node] = remap(val, node.shape, lambda index: [index[inv[k]] for k in range(len(inv))])
        return
    src_idx = val.idx
    if len(perm) == 2 and val.tbase is not None:   # transpose of a transpose
        scope.env[node] = plain_val(val.tbase, node.shape, node.dtype, root=val.root)
        scope.env[node].base = val.base
        scope.env[node].idx = lambda index: src_idx([index[1], index[0]])  # type: ignore[misc]
        return
    arr = f"{val.arr}.T" if val.arr is not None and len(perm) == 2 else None
    scope.env[node] = Val(node.shape, node.dtype, base=val.base,
                          idx=lambda index: src_idx([index[inv[k]] for k in range(len(inv))]),  # type: ignore[misc]
                          arr=arr, root=val.root, tbase=val.arr if val.plain and len(perm) == 2 else None)


def emit_slice(cg: Codegen, scope: Scope, node: Node) -> None:
    val = scope.env[node.src[0]]
    if val.const is not None:
        scope.env[node] = Val(node.shape, node.dtype, const=val.const)
        return
    triples: tuple[tuple[int, int, int], ...] = node.arg  # type: ignore[assignment]
    n = cg.dims.offset
    parts = []
    for (start, _, step), name in zip(triples, range(len(triples))):
        parts.append((n(start) if start else None, n(step) if step != 1 else None))

    def index_map(index: Sequence[str], src_idx: Index = val.idx) -> list[str]:  # type: ignore[assignment]
        out = []
        for (start, step), i in zip(parts, index):
            term = f"{step} * {i}" if step else i
            out.append(f"{start} + {term}" if start else term)
        return src_idx(out)

    if val.fn is not None:
        scope.env[node] = remap(val, node.shape, lambda index: index_map(index, lambda i: list(i)))
        return
    arr = None
    if val.arr is not None and node.ndim:
        arr = f"{val.arr}[{', '.join(_slice_text(cg, t, d) for t, d in zip(triples, val.shape))}]"
    # (Numba types a sliced array as layout 'A' even where it is contiguous: never `plain`)
    scope.env[node] = Val(node.shape, node.dtype, base=val.base, idx=index_map, arr=arr, root=val.root)


def _slice_text(cg: Codegen, triple: tuple[int, int, int], dim: int) -> str:
    start, stop, step = triple
    if (start, stop, step) == (0, dim, 1):
        return ":"
    text = f"{cg.dims.offset(start) if start else ''}:{cg.dims.offset(stop)}"
    return text + (f":{cg.dims.offset(step)}" if step != 1 else "")


def emit_reshape(cg: Codegen, scope: Scope, node: Node) -> None:
    val = scope.env[node.src[0]]
    if val.const is not None:
        scope.env[node] = Val(node.shape, node.dtype, const=val.const)
        return
    src = cg.materialize(scope, val, node)
    name = cg.fresh("rs")
    scope.block.add(scope.indent, f"{name} = {src.arr}.reshape({cg.dims.shape(node.shape)})", node)
    scope.env[node] = plain_val(name, node.shape, node.dtype, root=src.root)


def emit_const(cg: Codegen, scope: Scope, node: Node) -> None:
    scope.env[node] = Val(node.shape, node.dtype, const=cg.dims.f(node.arg, node.dtype))  # type: ignore[arg-type]


def _is_writer(node: Node) -> bool:
    """Nodes whose emitter writes its result into a given target (see Codegen.out_for)."""
    if node.op is Op.PROJ:
        return node.src[0].op is Op.FUSED
    return node.op in ELEMENTWISE and node.op is not Op.STOP_GRADIENT or node.op in (
        Op.MATMUL, Op.SUM, Op.REDUCE_MAX, Op.CONCAT, Op.ARGMAX, Op.ONEHOT)


def _offset_view(out: Val, shape: tuple[int, ...], axis: int, offset: str | None) -> Val:
    """The part of `out` starting at `offset` along `axis`, with the given shape."""
    out_idx = out.idx

    def index(i: Sequence[str]) -> list[str]:
        moved = list(i)
        if offset is not None:
            moved[axis] = f"{offset} + {moved[axis]}"
        return out_idx(moved)  # type: ignore[misc]
    return Val(shape, out.dtype, base=out.base, idx=index, root=out.root)


def emit_concat(cg: Codegen, scope: Scope, node: Node) -> None:
    axis: int = node.arg  # type: ignore[assignment]
    extents = [s.shape[axis] for s in node.src]
    if node in scope.virtual:
        vals = [scope.env[s] for s in node.src]
        starts = [cg.dims.part_offset(extents, k) for k in range(len(vals))]   # None: at 0

        def fn(index: Sequence[str]) -> str:
            i = index[axis]
            expr = ""
            for k in range(len(vals) - 1, -1, -1):
                moved = list(index)
                if starts[k] is not None:
                    moved[axis] = f"{i} - {starts[k]}"
                e = vals[k].elem(moved)
                expr = e if not expr else f"({e} if {i} < {starts[k + 1] or 0} else {expr})"
            return expr
        scope.env[node] = Val(node.shape, node.dtype, fn=fn, parts=(axis, list(zip(starts, vals))))
        return
    out = cg.out_for(scope, node, "cat")
    for k, s in enumerate(node.src):
        val = scope.env[s]
        if val is scope.targets.get(s) and val.base == out.base:
            continue  # already written in place
        idx, indent = cg.nest(scope, s.shape, node)
        dst = list(idx)
        start = cg.dims.part_offset(extents, k)
        if start is not None:
            dst[axis] = f"{start} + {idx[axis]}"
        scope.block.add(indent, f"{out.elem(dst)} = {val.elem(idx)}", node)
    scope.env[node] = out


def emit_pad(cg: Codegen, scope: Scope, node: Node) -> None:
    """A virtual value: reads select the source or zero, so pad + slices + concat (a convolution's
    taps) become index arithmetic in whatever loop finally reads them."""
    pads: tuple[tuple[int, int], ...] = node.arg  # type: ignore[assignment]
    src = scope.env[node.src[0]]
    zero = cg.dims.f(0, node.dtype)
    bounds = [(cg.dims.offset(lo), cg.dims.offset(lo + d)) for (lo, _), d in zip(pads, node.src[0].shape)]
    padded = [k for k, (lo, hi) in enumerate(pads) if lo or hi]

    # reads are clamped into the source and always done, the condition only selects: a
    # conditional load kept loops scalar (a TCN's backward sums three such reads per element).
    # An empty source has nothing to clamp into: all reads are zeros, behind the condition.
    clamp = all(node.src[0].shape[k] > 0 for k in padded)
    extents = [cg.dims.n(d) for d in node.src[0].shape]

    def fn(index: Sequence[str]) -> str:
        shifted = [f"{i} - {lo}" if lo != "0" else i for i, (lo, _) in zip(index, bounds)]
        cond = " and ".join(f"{bounds[k][0]} <= {index[k]} < {bounds[k][1]}" for k in padded)
        if not cond:
            return src.elem(shifted)
        if clamp:
            shifted = [f"min(max({i}, 0), {extents[k]} - 1)" if k in padded else i for k, i in enumerate(shifted)]
        return f"({src.elem(shifted)} if {cond} else {zero})"
    scope.env[node] = Val(node.shape, node.dtype, fn=fn)


def emit_argmax(cg: Codegen, scope: Scope, node: Node) -> None:
    axis: int = node.arg  # type: ignore[assignment]
    src = node.src[0]
    val = scope.env[src]
    out = cg.out_for(scope, node, "am")
    idx, indent = cg.nest(scope, node.shape, node)
    full = list(idx[:axis]) + ["0"] + list(idx[axis:])
    best, arg = cg.fresh("best"), cg.fresh("arg")
    scope.block.add(indent, f"{best} = {val.elem(full)}", node)
    scope.block.add(indent, f"{arg} = 0", node)
    full[axis] = "j"
    scope.block.add(indent, f"for j in range(1, {cg.dims.n(src.shape[axis])}):", node)
    scope.block.add(indent + 1, f"if {val.elem(full)} > {best}:", node)
    scope.block.add(indent + 2, f"{best} = {val.elem(full)}", node)
    scope.block.add(indent + 2, f"{arg} = j", node)
    scope.block.add(indent, f"{out.elem(idx)} = {arg}", node)
    scope.env[node] = out


def emit_onehot(cg: Codegen, scope: Scope, node: Node) -> None:
    val = scope.env[node.src[0]]
    out = cg.out_for(scope, node, "oh")
    idx, indent = cg.nest(scope, node.shape, node)
    scope.block.add(indent, f"{out.elem(idx)} = np.float32(1.0) if {val.elem(idx[:-1])} == {idx[-1]} "
                            f"else np.float32(0.0)", node)
    scope.env[node] = out


def emit_proj(cg: Codegen, scope: Scope, node: Node) -> None:
    if node not in scope.env:
        raise UnsupportedOp(f"proj of {node.src[0]!r} has no value (built at {node.loc})")


def emit_loop(cg: Codegen, scope: Scope, node: Node) -> None:
    info: LoopInfo = node.arg  # type: ignore[assignment]
    body = info.body
    n_c, n_h = info.n_consts, info.n_carry
    src_vals = [scope.env[s] for s in node.src]
    outer = scope.alloc is None
    alloc_block = scope.block.sub() if outer else scope.alloc
    alloc_indent = scope.indent if outer else scope.alloc_indent
    holder = Scope(scope.graph, {}, scope.block, scope.indent, alloc_block, alloc_indent)
    t = f"t{cg.loop_depth}"
    cg.loop_depth += 1
    # carried buffers, initialised here (every time this loop runs)
    carries = []
    for k in range(n_h):
        arg = body.inputs[n_c + k]
        buf = cg.alloc(holder, arg.shape, arg.dtype, "c", node)
        cg.copy(scope, src_vals[n_c + k], buf, node)
        carries.append(buf)
    ys = []
    for out in body.outputs[n_h:]:
        ys.append(cg.alloc(holder, (info.length,) + out.shape, out.dtype, "ys", node))
    env: dict[Node, Val] = {}
    weights = {n.src[1] for n in body.nodes() if n.op is Op.MATMUL and n.ndim == 2}
    for i, arg in enumerate(body.inputs[:n_c]):
        env[arg] = src_vals[i]
        if arg in weights and arg.dtype in FLOAT_DTYPES:
            # a weight every step multiplies: packed once, here, for the per-step micro-kernel
            env[arg] = _packed_weight(cg, scope, holder, src_vals[i], node)
    for k, arg in enumerate(body.inputs[n_c:n_c + n_h]):
        env[arg] = carries[k]
    for j, arg in enumerate(body.inputs[n_c + n_h:]):
        env[arg] = _step_view(src_vals[n_c + n_h + j], t)
    header = (f"for {t} in range({cg.dims.n(info.length)} - 1, -1, -1):" if info.reverse
              else f"for {t} in range({cg.dims.n(info.length)}):")
    # BLAS threads for the per-step products (the policy: cpu.backend's module docstring)
    switch_threads = outer and any(n.op is Op.MATMUL for n in body.nodes())
    if switch_threads:
        scope.block.add(scope.indent, "blas_threads(blas[0], blas[2])", node)
    scope.block.add(scope.indent, header, node)
    step = Scope(body, env, scope.block, scope.indent + 1, alloc_block, alloc_indent)
    carry_outs = list(body.outputs[:n_h])
    y_outs = list(body.outputs[n_h:])
    # per-step outputs computed only for ys are written straight into ys[t]
    counts: dict[Node, int] = {}
    for o in body.outputs:
        counts[o] = counts.get(o, 0) + 1
    for j, o in enumerate(y_outs):
        if counts[o] == 1 and o.op not in (Op.ARG, Op.CONST, Op.PROJ) and o.op not in _VIEW_OPS:
            step.targets[o] = _step_view(ys[j], t, plain=True)
        elif o.op is Op.PROJ and o.src[0].op is Op.FUSED and counts[o] == 1:
            step.targets[o] = _step_view(ys[j], t, plain=True)
    # c_new = c + a @ b where c is read nowhere else: accumulate into the carried buffer
    users: dict[Node, int] = {}
    for n in body.nodes():
        for s in n.src:
            users[s] = users.get(s, 0) + 1
    in_place_carries = set()
    for k, o in enumerate(carry_outs):
        arg = body.inputs[n_c + k]
        if o.op is Op.ADD and arg in o.src and users.get(arg, 0) == 1 and counts[o] == 1 \
                and o.src[0].shape == o.src[1].shape and o.ndim == 2 and any(
                    s.op is Op.MATMUL for s in o.src if s is not arg):
            step.in_place[o] = carries[k]
            in_place_carries.add(k)
    outs = cg.emit_scope(step)
    indent = scope.indent + 1
    # end of step: ys not written in place, then carries (copies first, then buffer swaps)
    for j, o in enumerate(y_outs):
        if o not in step.targets:
            cg.copy(step, outs[n_h + j], _step_view(ys[j], t, plain=True), node)
    swaps, copies = [], []
    swapped: set[Node] = set()
    for k, o in enumerate(carry_outs):
        if k in in_place_carries or outs[k] is carries[k]:
            continue
        owned = step.owned.get(o)
        if owned is not None and o not in swapped and outs[k].base == owned and outs[k].plain:
            swaps.append((carries[k].base, owned))
            swapped.add(o)
        else:
            copies.append((outs[k], carries[k]))
    carry_roots = {c.base for c in carries}
    if any(v.root in carry_roots for v, _ in copies) and len(copies) > 1:
        temps = []
        for v, c in copies:
            tmp = cg.alloc(step, c.shape, c.dtype, "tmp", node)
            cg.copy(step, v, tmp, node)
            temps.append((tmp, c))
        copies = temps
    for v, c in copies:
        cg.copy(step, v, c, node)
    for c, b in swaps:
        scope.block.add(indent, f"{c}, {b} = {b}, {c}", node)
    if switch_threads:
        scope.block.add(scope.indent, "blas_threads(blas[0], blas[1])", node)
    cg.loop_depth -= 1
    results = carries + ys
    for user in scope.users.get(node, []):
        if user.op is Op.PROJ:
            scope.env[user] = results[user.arg]  # type: ignore[index]


def _packed_weight(cg: Codegen, scope: Scope, holder: Scope, val: Val, node: Node) -> Val:
    """The weight `val` (K x N) with its panels packed before the loop (gemm.pack_panels):
    the buffer is allocated with the loop's buffers, the packing runs each time the loop starts."""
    if not val.plain and val.tbase is None:
        val = cg.materialize(scope, val, node)
    k, n = (cg.dims.n(d) for d in val.shape)
    bits = 32 if val.dtype == "float32" else 64
    name = cg.fresh("pk")
    size = packed_size_text(k, n, bits)
    alloc: Block = holder.alloc  # type: ignore[assignment]
    alloc.add(holder.alloc_indent, f"{name} = np.empty({size}, np.{val.dtype})", node)
    trans = val.tbase is not None
    scope.block.add(scope.indent, f"pack_panels({val.tbase if trans else val.arr}, {int(trans)}, {name})", node)
    return dataclasses.replace(val, packed=name)


def _step_view(val: Val, t: str, plain: bool = False) -> Val:
    """The t-th slice along axis 0 of a (possibly viewed) array."""
    shape = val.shape[1:]
    if val.const is not None or val.fn is not None:
        return remap(val, shape, lambda index: [t] + list(index))
    src_idx = val.idx
    arr = f"{val.arr}[{t}]" if val.arr is not None and shape else (
        f"{val.arr}[{t}:{t} + 1]" if val.arr is not None else None)
    return Val(shape, val.dtype, base=val.base, idx=lambda index: src_idx([t] + list(index)),  # type: ignore[misc]
               arr=arr, plain=(val.plain or plain) and arr is not None, root=val.root)


_VIEW_OPS = frozenset({Op.TRANSPOSE, Op.SLICE, Op.BROADCAST, Op.RESHAPE, Op.STOP_GRADIENT, Op.PAD})

Emitter = Callable[[Codegen, Scope, Node], None]
_EMITTERS: dict[Op, Emitter] = {
    **{op: emit_elementwise for op in ELEMENTWISE},
    Op.ADD: emit_add,
    Op.CONST: emit_const,
    Op.SUM: emit_reduce,
    Op.REDUCE_MAX: emit_reduce,
    Op.MATMUL: emit_matmul,
    Op.BROADCAST: emit_broadcast,
    Op.TRANSPOSE: emit_transpose,
    Op.SLICE: emit_slice,
    Op.RESHAPE: emit_reshape,
    Op.CONCAT: emit_concat,
    Op.PAD: emit_pad,
    Op.ARGMAX: emit_argmax,
    Op.ONEHOT: emit_onehot,
    Op.PROJ: emit_proj,
    Op.LOOP: emit_loop,
    Op.FUSED: emit_fused,
}


def generate(graph: Graph, fn_name: str = "kernel") -> Codegen:
    """Generate the source for `graph`; the Codegen carries the source lines, dims and floats."""
    cg = Codegen(graph, fn_name)
    cg.source = cg.generate()  # type: ignore[attr-defined]
    return cg
