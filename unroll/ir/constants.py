"""Array constants lifted to graph inputs, for backends that keep only scalar constants in code.

A numpy operand with unequal elements becomes a CONST whose arg is a `FrozenArray` (see ops.py).
The reference interpreter evaluates it directly; a code generator would have to write its values
into the source. `lift_array_constants(graph)` turns each into an extra graph input instead, named
`__const<k>` and returned with its value, so a compiled backend reads it like any other array
(`ur.compile` feeds the values itself; the user never sees these inputs). A constant inside a loop
body first becomes a loop constant (bodies are closed scopes), innermost loops first, so nested
loops pass it down from the top level. A pure Graph -> (Graph, values) function.
"""

from __future__ import annotations

import numpy as np

from .node import Graph, LoopInfo, Node, substitute, toposort
from .ops import FrozenArray, Op
from .patterns import OpenLoop, make, map_loops

CONST_INPUT_PREFIX = "__const"


def is_array_constant(node: Node) -> bool:
    return node.op is Op.CONST and isinstance(node.arg, FrozenArray)


def lift_array_constants(graph: Graph) -> tuple[Graph, list[np.ndarray]]:
    """`graph` with every array constant read from a new input (appended after graph.inputs),
    and the values of those inputs in order. A graph without array constants comes back as is."""
    outputs = _out_of_loops(list(graph.outputs))
    constants = [n for n in toposort(outputs) if is_array_constant(n)]
    if not constants:
        return graph, []
    taken = {n.arg for n in graph.inputs}
    names = []
    for k in range(len(constants)):
        name = f"{CONST_INPUT_PREFIX}{k}"
        while name in taken:
            name = "_" + name
        names.append(name)
    inputs = [Node.leaf(Op.INPUT, c.tensor_type, name, loc=c.loc) for c, name in zip(constants, names)]
    outputs = substitute(outputs, dict(zip(constants, inputs)))
    values = [np.asarray(c.arg) for c in constants]  # type: ignore[call-overload]
    return Graph(graph.inputs + tuple(inputs), tuple(outputs), graph.output_names), values


def _out_of_loops(roots: list[Node]) -> list[Node]:
    def loop_fn(loop: Node) -> list[Node] | None:
        info: LoopInfo = loop.arg  # type: ignore[assignment]
        body_outputs = _out_of_loops(list(info.body.outputs))  # nested loops first
        if not any(is_array_constant(n) for n in toposort(body_outputs)):
            return None
        body = Graph(info.body.inputs, tuple(body_outputs))
        loop = make(Op.LOOP, loop.src, LoopInfo(body, info.length, info.n_consts, info.n_carry, info.reverse),
                    like=loop)
        ol = OpenLoop.open(loop)
        inner = [n for n in toposort(ol.body_outputs) if is_array_constant(n)]
        ol.substitute({c: ol.add_const(c) for c in inner})  # a CONST is a leaf: valid outside too
        return ol.outputs(ol.close())
    return map_loops(roots, loop_fn)
