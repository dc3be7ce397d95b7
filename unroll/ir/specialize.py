"""Specialise a shape-polymorphic graph to concrete sizes, and read those sizes off the feeds.

A graph built from `ur.input("x", ("T", "B", 8))` carries symbolic sizes (`ir.dims`) in its types
and args. `bind_sizes` reads the symbols' values from the arrays fed to its inputs (each bare symbol
from the first input that has it, every other dimension checked against it); `specialize` rebuilds
the graph with every size and size-derived constant evaluated, through `Node.make`, so the concrete
graph is type-checked again with the real sizes (a slice bound that only holds for some T fails
there, naming the op). The result is an ordinary graph: every pass and backend takes it unchanged.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .checks import FeedError
from .dims import Dim, evaluate, is_symbolic, symbols_of
from .node import Graph, LoopInfo, Node, toposort
from .ops import LEAVES, Op, TensorType


class SizeMismatchError(FeedError):
    """Fed arrays disagree about a symbolic size, or do not match the graph's fixed dimensions."""


def is_polymorphic(graph: Graph) -> bool:
    """Whether the graph's inputs carry symbolic sizes (the only way symbols enter a graph)."""
    return any(is_symbolic(n.shape) for n in graph.inputs)


def bind_sizes(graph: Graph, shapes: Sequence[tuple[int, ...]]) -> dict[str, int]:
    """The value of every symbol, read from the fed arrays' shapes (graph.inputs order). A
    disagreement names both inputs and the size; a symbol that appears only inside a product (an
    input of shape (T*B, 8) and none of shape (T, ...)) cannot be read and is an error."""
    sizes: dict[str, int] = {}
    source: dict[str, tuple[str, int]] = {}
    for node, shape in zip(graph.inputs, shapes):
        if len(shape) != node.ndim:
            raise SizeMismatchError(f"input {node.name!r}: expected rank {node.ndim} ({node.type}), found shape "
                                    f"{list(shape)}")
        for axis, (dim, actual) in enumerate(zip(node.shape, shape)):
            name = dim.is_symbol() if isinstance(dim, Dim) else None
            if name is None:
                continue
            if name in sizes and sizes[name] != actual:
                first, first_axis = source[name]
                raise SizeMismatchError(
                    f"inputs disagree about the size {name}: {first!r} has {name} = {sizes[name]} (axis "
                    f"{first_axis}) but {node.name!r} has {actual} on axis {axis} ({node.type})")
            sizes.setdefault(name, int(actual))
            source.setdefault(name, (str(node.name), axis))
    for node, shape in zip(graph.inputs, shapes):
        for axis, (dim, actual) in enumerate(zip(node.shape, shape)):
            if isinstance(dim, Dim) and not dim.symbols <= set(sizes):
                missing = ", ".join(sorted(dim.symbols - set(sizes)))
                raise SizeMismatchError(f"input {node.name!r}: the size {missing} of axis {axis} ({dim}) is "
                                        f"not the whole dimension of any input, so it cannot be read from the feeds")
            expected = evaluate(dim, sizes)
            if expected != actual:
                what = f"{dim} = {expected}" if isinstance(dim, Dim) else str(expected)
                raise SizeMismatchError(f"input {node.name!r}: expected {what} on axis {axis} ({node.type} with "
                                        f"{_bound(sizes)}), found shape {list(shape)}")
    return sizes


def _bound(sizes: Mapping[str, int]) -> str:
    return ", ".join(f"{k} = {v}" for k, v in sorted(sizes.items()))


# sizes a graph is compiled at once, to be replayed at every real size (compile.PolymorphicCompiled):
# distinct primes, far from the fixed dimensions of models, so no two sizes or products coincide
CANONICAL_PRIMES = (1009, 1013, 1019, 1021, 1031, 1033, 1039, 1049, 1051, 1061, 1063, 1069)


def canonical_sizes(graph: Graph) -> dict[str, int]:
    names = sorted(set().union(*(symbols_of(n.shape) for n in graph.inputs)))
    if len(names) > len(CANONICAL_PRIMES):
        raise ValueError(f"at most {len(CANONICAL_PRIMES)} named sizes, found {', '.join(names)}")
    return dict(zip(names, CANONICAL_PRIMES))


def specialize(graph: Graph, sizes: Mapping[str, int]) -> Graph:
    """The graph with every symbolic size replaced by its value in `sizes`."""
    memo: dict[Node, Node] = {}
    return _graph(graph, sizes, memo)


def _graph(graph: Graph, sizes: Mapping[str, int], memo: dict[Node, Node]) -> Graph:
    for node in toposort(list(graph.outputs) + list(graph.inputs)):
        if node not in memo:
            memo[node] = _node(node, [memo[s] for s in node.src], sizes, memo)
    return Graph(tuple(memo[n] for n in graph.inputs), tuple(memo[n] for n in graph.outputs),
                 graph.output_names)


def _node(node: Node, src: list[Node], sizes: Mapping[str, int], memo: dict[Node, Node]) -> Node:
    if node.op in LEAVES:
        t = node.tensor_type
        arg = evaluate(node.arg, sizes) if node.op is Op.CONST else node.arg
        new = Node.leaf(node.op, TensorType(evaluate(t.shape, sizes), t.dtype), arg, loc=node.loc)  # type: ignore[arg-type]
        new.step, new.role = node.step, node.role
        return new
    arg = node.arg
    if isinstance(arg, LoopInfo):
        arg = LoopInfo(_graph(arg.body, sizes, memo), evaluate(arg.length, sizes), arg.n_consts,  # type: ignore[arg-type]
                       arg.n_carry, arg.reverse)
    elif isinstance(arg, Graph):
        arg = _graph(arg, sizes, memo)
    else:
        arg = evaluate(arg, sizes)
    return node.replace(src=src, arg=arg)


def feed_shapes(arrays: Sequence[object]) -> list[tuple[int, ...]]:
    return [tuple(np.shape(a)) if not hasattr(a, "__cuda_array_interface__")
            else tuple(a.__cuda_array_interface__["shape"]) for a in arrays]  # type: ignore[attr-defined]


__all__ = ["CANONICAL_PRIMES", "SizeMismatchError", "bind_sizes", "canonical_sizes", "feed_shapes", "is_polymorphic", "specialize"]
