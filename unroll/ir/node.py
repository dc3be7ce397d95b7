"""The IR's data structures: the immutable hash-consed Node, Graph, LoopInfo, and iterative walks.

A Node is `(op, type, src, arg)` (after tinygrad's UOp). Nodes are interned: building the same
`(op, src, arg)` twice returns the same object, so identical subexpressions are one node (CSE for free),
equality is identity and graphs compare with `is`. Side data that is not part of a node's identity
(the user's source line, the time step an unrolled node belongs to, its role such as "backward")
lives in slots that the first builder fills.

Every walk here is iterative: unrolled graphs are thousands of nodes deep.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
import weakref
from dataclasses import dataclass
from typing import Callable, Container, Iterable, Iterator, NoReturn, Sequence

from .ops import ARITY, LEAVES, TYPE_RULES, Op, ShapeError, TensorType

NodeType = TensorType | tuple[TensorType, ...]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=4096)
def _is_internal(path: str) -> bool:
    return os.path.abspath(path).startswith(_PACKAGE_DIR + os.sep) or "<frozen" in path


def user_location() -> str:
    """`file:line` of the innermost caller outside the unroll package (the user's line)."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if not _is_internal(path):
            return f"{path}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return "<unknown>"


class Node:
    """One value of the IR. Build nodes with `Node.make` / `Node.leaf`, never by hand."""

    __slots__ = ("op", "type", "src", "arg", "loc", "step", "role", "__weakref__")
    _interned: "weakref.WeakValueDictionary[tuple, Node]" = weakref.WeakValueDictionary()

    op: Op
    type: NodeType
    src: tuple["Node", ...]
    arg: object
    loc: str | None    # the user's file:line that first built this node
    step: int | None   # the time step of an unrolled node
    role: str | None   # who made it: None (the user), "backward" (autodiff), "truncate", ...

    def __new__(cls, op: Op, type_: NodeType, src: tuple["Node", ...], arg: object) -> "Node":
        # ids are stable keys: an interned node holds its sources alive
        key = (op, type_, tuple(id(s) for s in src), arg)
        node = cls._interned.get(key)
        if node is None:
            node = object.__new__(cls)
            node.op, node.type, node.src, node.arg = op, type_, src, arg
            node.loc, node.step, node.role = None, None, None
            cls._interned[key] = node
        return node

    # ---- construction -------------------------------------------------------------------------

    @staticmethod
    def leaf(op: Op, type_: TensorType, arg: object, loc: str | None = None) -> "Node":
        node = Node(op, type_, (), arg)
        if node.loc is None:
            node.loc = loc or user_location()
        return node

    @staticmethod
    def make(op: Op, src: Sequence["Node"], arg: object = None, loc: str | None = None) -> "Node":
        """Build a node, inferring its type; a ShapeError names the op, shapes and user line."""
        src = tuple(src)
        for s in src:
            if not isinstance(s, Node):   # a number or array given to a builder that lifts none
                raise TypeError(f"{op.value}: expected unroll values as operands, found {type(s).__name__} "
                                f"(a number or numpy array becomes a value with ur.const(v, dtype=...))"
                                f"\n  at {loc or user_location()}")
        try:
            type_ = infer_type(op, src, arg)
        except ShapeError as err:
            raise ShapeError(f"{err}\n  at {loc or user_location()}") from None
        node = Node(op, type_, src, arg)
        if node.loc is None:
            node.loc = loc or user_location()
        return node

    def replace(self, src: Sequence["Node"] | None = None, arg: object = ...) -> "Node":
        """The same op with new sources and/or arg; keeps this node's source line and step tag."""
        new = Node.make(self.op, self.src if src is None else src, self.arg if arg is ... else arg,
                        loc=self.loc)
        if new.step is None:
            new.step = self.step
        if new.role is None:
            new.role = self.role
        return new

    # ---- views -------------------------------------------------------------------------------

    @property
    def tensor_type(self) -> TensorType:
        if not isinstance(self.type, TensorType):
            raise TypeError(f"{self.op.value} has {len(self.type)} outputs; pick one with proj(node, i)")
        return self.type

    @property
    def shape(self) -> tuple[int, ...]:
        return self.tensor_type.shape

    @property
    def dtype(self) -> str:
        return self.tensor_type.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def name(self) -> str | None:
        """The feed name of an input or parameter, else None."""
        if self.op is Op.INPUT:
            return self.arg  # type: ignore[return-value]
        if self.op is Op.PARAM:
            return self.arg[0]  # type: ignore[index]
        return None

    def __repr__(self) -> str:
        name = f" {self.name!r}" if self.name else ""
        return f"<{self.op.value}{name} {self.type_str()}>"

    def type_str(self) -> str:
        if isinstance(self.type, TensorType):
            return str(self.type)
        return "(" + ", ".join(map(str, self.type)) + ")"

    # Python operators build IR (the DSL); comparisons are functions (ur.less, ...) because
    # `==` must stay identity for interned nodes.
    __hash__ = object.__hash__

    # numpy must not handle `ndarray + node` or `np.float64(0.9) * node` itself (it would build an
    # object array with one node per element): this makes its operators return NotImplemented, so
    # Python calls our reflected operator, which turns the numpy operand into a constant.
    __array_ufunc__ = None

    def __array__(self, dtype: object = None, copy: object = None) -> NoReturn:
        raise TypeError(f"{self!r} is a symbolic unroll value with no numpy value yet; compute it with "
                        f"ur.compile(...)(**feeds)")

    def __add__(self, o: object) -> "Node": return _b().add(self, o)
    def __radd__(self, o: object) -> "Node": return _b().add(o, self)
    def __sub__(self, o: object) -> "Node": return _b().sub(self, o)
    def __rsub__(self, o: object) -> "Node": return _b().sub(o, self)
    def __mul__(self, o: object) -> "Node": return _b().mul(self, o)
    def __rmul__(self, o: object) -> "Node": return _b().mul(o, self)
    def __truediv__(self, o: object) -> "Node": return _b().div(self, o)
    def __rtruediv__(self, o: object) -> "Node": return _b().div(o, self)
    def __pow__(self, o: object) -> "Node": return _b().pow(self, o)
    def __rpow__(self, o: object) -> "Node": return _b().pow(o, self)
    def __matmul__(self, o: object) -> "Node": return _b().matmul(self, o)
    def __rmatmul__(self, o: object) -> "Node": return _b().matmul(o, self)
    def __neg__(self) -> "Node": return _b().neg(self)
    def __lt__(self, o: object) -> "Node": return _b().less(self, o)
    def __gt__(self, o: object) -> "Node": return _b().greater(self, o)
    def __getitem__(self, index: object) -> "Node": return _b().getitem(self, index)

    @property
    def T(self) -> "Node":
        return _b().transpose(self)

    def reshape(self, *shape: int | Sequence[int]) -> "Node":
        return _b().reshape(self, *shape)

    def __bool__(self) -> bool:
        raise TypeError("a symbolic unroll value has no truth value; use ur.where for data-dependent "
                        "choices")

    def __iter__(self) -> Iterator["Node"]:
        if isinstance(self.type, tuple):
            return iter([proj(self, i) for i in range(len(self.type))])
        return iter([self[i] for i in range(self.shape[0])])

    def __len__(self) -> int:
        return len(self.type) if isinstance(self.type, tuple) else self.shape[0]


def _b():  # the builder module, imported late: it imports this one
    from . import build
    return build


@dataclass(frozen=True, eq=False)
class Graph:
    """Named inputs and ordered outputs. Equality is structural because nodes are interned.

    For a loop body, `inputs` are its ARG nodes in index order: consts, carried state, per-step slices.
    """

    inputs: tuple[Node, ...]
    outputs: tuple[Node, ...]
    output_names: tuple[str, ...] | None = None

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Graph) and self.output_names == other.output_names
                and _same(self.inputs, other.inputs) and _same(self.outputs, other.outputs))

    def __hash__(self) -> int:
        return hash((tuple(map(id, self.inputs)), tuple(map(id, self.outputs)), self.output_names))

    @staticmethod
    def of(outputs: Sequence[Node], names: Sequence[str] | None = None) -> "Graph":
        """A top-level graph: inputs are the input/param leaves reachable from the outputs."""
        outputs = tuple(outputs)
        inputs = tuple(n for n in toposort(outputs) if n.op in (Op.INPUT, Op.PARAM))
        seen: dict[str, Node] = {}
        for n in inputs:
            other = seen.setdefault(n.name, n)  # type: ignore[arg-type]
            if other is not n:
                raise ValueError(f"two different inputs are named {n.name!r}: {other} (built at "
                                 f"{other.loc}) and {n} (built at {n.loc})")
        return Graph(inputs, outputs, tuple(names) if names is not None else None)

    @property
    def input_names(self) -> list[str]:
        return [n.name or f"arg{n.arg}" for n in self.inputs]

    def params(self) -> list[Node]:
        return [n for n in self.inputs if n.op is Op.PARAM]

    def nodes(self) -> list[Node]:
        """Every node of this graph (not of nested bodies) in dependency order."""
        return toposort(self.outputs)

    def __str__(self) -> str:
        from .text import print_graph
        return print_graph(self)

    def __repr__(self) -> str:
        return f"<Graph {len(self.inputs)} inputs, {len(self.outputs)} outputs, {len(self.nodes())} nodes>"


def _same(a: Sequence[Node], b: Sequence[Node]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


@dataclass(frozen=True)
class LoopInfo:
    """The static part of a rolled LOOP node; its sources are `consts + carry_init + xs`.

    Meaning (the numpy reference interpreter implements exactly this)::

        def loop(consts, carry, xs, body, length, reverse):
            ys = [[None] * length for _ in range(n_ys)]
            for t in (reversed(range(length)) if reverse else range(length)):
                carry, y_t = body(*consts, *carry, *[x[t] for x in xs])   # body returns carry + ys
                for k, y in enumerate(y_t):
                    ys[k][t] = y                  # ys[k][t] always belongs to step t, also in reverse
            return (*carry, *[np.stack(y) for y in ys])

    The body is a closed Graph: it sees outer values only through its consts. Its inputs are
    `n_consts` constants, `n_carry` carried values and one slice per sequence; its outputs are the
    `n_carry` new carried values followed by the per-step outputs. A loop node's outputs (reach them
    with `proj`) are the final carried values followed by the stacked per-step outputs.
    """

    body: Graph
    length: int
    n_consts: int
    n_carry: int
    reverse: bool = False

    @property
    def n_xs(self) -> int:
        return len(self.body.inputs) - self.n_consts - self.n_carry

    @property
    def n_ys(self) -> int:
        return len(self.body.outputs) - self.n_carry


def infer_type(op: Op, src: tuple[Node, ...], arg: object) -> NodeType:
    arity = ARITY[op]
    if arity is not None and len(src) != arity:
        raise ShapeError(f"{op.value}: expected {arity} source(s), found {len(src)}")
    if op is Op.PROJ:
        types = src[0].type
        if not isinstance(types, tuple) or not 0 <= int(arg) < len(types):  # type: ignore[call-overload]
            raise ShapeError(f"proj: index {arg} is not an output of {src[0]!r}")
        return types[int(arg)]  # type: ignore[call-overload]
    if op is Op.LOOP:
        return _loop_type(src, arg)  # type: ignore[arg-type]
    if op is Op.FUSED:
        body: Graph = arg  # type: ignore[assignment]
        _check_body_args(op, body, src)
        outs = tuple(o.tensor_type for o in body.outputs)
        return outs
    if op in LEAVES:
        raise ShapeError(f"{op.value}: leaves are built with Node.leaf")
    for s in src:
        if not isinstance(s.type, TensorType):
            raise ShapeError(f"{op.value}: a source has several outputs ({s!r}); pick one with proj")
    return TYPE_RULES[op](op, [s.type for s in src], arg)  # type: ignore[misc]


def _check_body_args(op: Op, body: Graph, src: Sequence[Node]) -> None:
    if len(body.inputs) != len(src):
        raise ShapeError(f"{op.value}: body takes {len(body.inputs)} arguments, found {len(src)} sources")


def _loop_type(src: tuple[Node, ...], info: LoopInfo) -> tuple[TensorType, ...]:
    body = info.body
    _check_body_args(Op.LOOP, body, src)
    n_c, n_h = info.n_consts, info.n_carry
    for i, (arg_node, s) in enumerate(zip(body.inputs, src)):
        group = "const" if i < n_c else "carry" if i < n_c + n_h else "sequence"
        expected = arg_node.tensor_type
        found = s.tensor_type
        if group == "sequence":
            if found.shape[:1] != (info.length,) or found.shape[1:] != expected.shape \
                    or found.dtype != expected.dtype:
                raise ShapeError(f"loop: {group} {i - n_c - n_h} expected "
                                 f"{TensorType((info.length,) + expected.shape, expected.dtype)}, found {found}")
        elif found != expected:
            raise ShapeError(f"loop: {group} {i} expected {expected}, found {found}")
    for k in range(n_h):
        out, arg_node = body.outputs[k], body.inputs[n_c + k]
        if out.type != arg_node.type:
            raise ShapeError(f"loop: carried value {k} enters the body as {arg_node.type} but the body "
                             f"returns {out.type_str()}; a carry must keep its shape and dtype")
    carry = tuple(o.tensor_type for o in body.outputs[:n_h])
    ys = tuple(TensorType((info.length,) + o.shape, o.dtype) for o in body.outputs[n_h:])
    return carry + ys


def proj(node: Node, index: int) -> Node:
    return Node.make(Op.PROJ, (node,), index, loc=node.loc)


# ---- walks -------------------------------------------------------------------------------------

def toposort(roots: Iterable[Node], stop: Container[Node] = ()) -> list[Node]:
    """All nodes reachable from roots (not entering loop bodies), sources before users. Iterative.
    Nodes in `stop` are listed but not walked through."""
    order: list[Node] = []
    seen: set[int] = set()
    stack: list[tuple[Node, bool]] = [(r, False) for r in reversed(list(roots))]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        if node not in stop:
            stack.extend((s, False) for s in reversed(node.src) if id(s) not in seen)
    return order


def rewrite(roots: Sequence[Node], fn: Callable[[Node, tuple[Node, ...]], Node | None],
            stop: Container[Node] = ()) -> list[Node]:
    """Rebuild the graph bottom-up. `fn(node, new_src)` returns a replacement or None to keep the
    node (rebuilt on its new sources if they changed). Returns the new roots. Nodes in `stop` are
    not walked through: `fn` sees them with their old sources and must replace them."""
    new: dict[Node, Node] = {}
    for node in toposort(roots, stop):
        src = node.src if node in stop else tuple(new[s] for s in node.src)
        out = fn(node, src)
        if out is None:
            out = node if all(a is b for a, b in zip(src, node.src)) else node.replace(src=src)
        new[node] = out
    return [new[r] for r in roots]


def substitute(roots: Sequence[Node], mapping: dict[Node, Node]) -> list[Node]:
    """Replace nodes (leaves or not) by others everywhere below roots; the replaced nodes' own
    sources are not walked."""
    return rewrite(roots, lambda node, src: mapping.get(node), stop=mapping)


def all_nodes(graph: Graph) -> Iterator[tuple[Node, int]]:
    """Every node of the graph and of its nested bodies, with its nesting depth. Iterative."""
    stack: list[tuple[Graph, int]] = [(graph, 0)]
    while stack:
        g, depth = stack.pop()
        for node in g.nodes():
            yield node, depth
            body = nested_body(node)
            if body is not None:
                stack.append((body, depth + 1))


def nested_body(node: Node) -> Graph | None:
    if node.op is Op.LOOP:
        return node.arg.body  # type: ignore[union-attr]
    if node.op is Op.FUSED:
        return node.arg  # type: ignore[return-value]
    return None


_trace_ids = itertools.count(1)


def fresh_scope() -> int:
    """A new id for tracing placeholders (ARG nodes with arg=(scope, index)); see dsl.scan."""
    return next(_trace_ids)
