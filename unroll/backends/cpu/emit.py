"""Emission: `Codegen` walks a graph's scopes, asks the scheduler for its decisions, lets each op's
emitter write its lines into nested `Block`s, and assembles the function's source."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from ...ir.node import Graph, Node
from ...ir.ops import Op
from .emitters import EMITTERS, UnsupportedOp
from .scalars import np_dtype
from .schedule import Scope, prepare
from .values import Dims, Val, bcast, offset_view, plain_val


# Sizes and offsets are read as `dims[k] & SIZE_MASK` (2**40 - 1, more than any array holds): the
# mask gives LLVM their sign bit (zero), so an index such as `offset + i` is known non-negative and
# Numba's negative-index wrap-around (`j < 0 ? j + dim : j`) folds away; with it, LLVM loaded a
# gate's slice of the concatenated gate buffer element by element (vmovss/vinsertps) instead of as
# vectors (measured: LSTM (50, 16, 32, 64) float32 training step 1.74 -> 1.70 ms).
SIZE_MASK = "0xFFFFFFFFFF"


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


class Codegen:
    """Generates the source of one function for one graph. `generate()` returns the source text."""

    def __init__(self, graph: Graph, fn_name: str = "kernel", replay: Sequence[tuple[str, str]] | None = None
                 ) -> None:
        self.graph = graph
        self.fn_name = fn_name
        self.dims = Dims(replay)   # replay: another generation's size names (see values.Dims)
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
        ctor = f"np.full({self.dims.shape(shape)}, {fill}, np.{np_dtype(dtype)})" if fill is not None \
            else f"np.empty({self.dims.shape(shape)}, np.{np_dtype(dtype)})"
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
                self.copy(scope, part, offset_view(dst, part.shape, axis, start), node)
            return
        idx, indent = self.nest(scope, dst.shape, node)
        scope.block.add(indent, f"{dst.elem(idx)} = {src.elem(bcast(idx, src.shape, dst.shape))}", node)

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

    def emit_scope(self, scope: Scope) -> list[Val]:
        prepare(self, scope)
        accumulated = set(scope.accumulate.values())
        for node in scope.order:
            if node in scope.env or node in scope.inline:
                continue
            if node in accumulated:
                continue  # emitted by its accumulating add
            if node.op in (Op.INPUT, Op.PARAM, Op.ARG):
                raise UnsupportedOp(f"no value for {node!r} (built at {node.loc})")
            emitter = EMITTERS.get(node.op)
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
        n_ints, floats = self.dims.parameters()
        for k in range(n_ints):
            header.append((1, f"n{k} = dims[{k}] & {SIZE_MASK}", None))
        for name, dtype in floats:
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


def generate(graph: Graph, fn_name: str = "kernel", replay: Sequence[tuple[str, str]] | None = None
             ) -> Codegen:
    """Generate the source for `graph`; the Codegen carries the source lines, dims and floats.
    `replay`: another generation's `dims.log`, whose names this one reuses (values.Dims)."""
    cg = Codegen(graph, fn_name, replay)
    cg.source = cg.generate()  # type: ignore[attr-defined]
    return cg
