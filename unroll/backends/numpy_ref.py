"""The reference interpreter: the executable spec of every op, written with plain numpy.

Each op's meaning is one entry of IMPLS, built from the numpy tables of `ir/semantics.py` (which
constant folding uses too; ELEMENTWISE_IMPLS is re-exported here). Loops run as Python for-loops
exactly as LoopInfo's docstring says. An id outside [0, depth) makes onehot raise IndexError.
Every other backend and every pass is tested for equality against this module.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..ir.node import Graph, LoopInfo, Node
from ..ir.ops import FrozenArray, Op
from ..ir.semantics import ELEMENTWISE_IMPLS, STRUCTURAL_IMPLS

__all__ = ["ELEMENTWISE_IMPLS", "IMPLS", "PASSES", "compile_graph", "evaluate", "run_loop"]


def _const(node: Node) -> np.ndarray:
    if isinstance(node.arg, FrozenArray):
        return node.arg.array.copy()  # the stored array is read-only; callers may own what we return
    return np.full(node.shape, node.arg, node.dtype)


def _onehot(node: Node, ids: np.ndarray) -> np.ndarray:
    try:
        return STRUCTURAL_IMPLS[Op.ONEHOT](node.arg, ids)
    except IndexError as err:  # an id outside the vocabulary: say where the onehot (or Embedding) was built
        raise IndexError(f"{err}\n  at {node.loc}") from None


# impl(node, *source_values) -> value; the node gives arg and the result type. The meanings are
# ir/semantics.py's tables (shared with constant folding), looked up when an entry runs so the tables
# stay the one place a meaning lives; the entries below them need the node or run graphs.
IMPLS: dict[Op, Callable[..., np.ndarray]] = {
    **{op: (lambda op: lambda node, *xs: ELEMENTWISE_IMPLS[op](*xs))(op) for op in ELEMENTWISE_IMPLS},
    **{op: (lambda op: lambda node, *xs: STRUCTURAL_IMPLS[op](node.arg, *xs))(op) for op in STRUCTURAL_IMPLS},
    Op.CONST: _const,
    Op.ONEHOT: _onehot,
    Op.PROJ: lambda node, xs: xs[node.arg],
    Op.LOOP: lambda node, *xs: run_loop(node.arg, xs),
    Op.FUSED: lambda node, *xs: tuple(evaluate(node.arg, xs)),
}


def run_loop(info: LoopInfo, sources: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """LoopInfo's reference loop, literally."""
    n_c, n_h = info.n_consts, info.n_carry
    consts, carry, xs = list(sources[:n_c]), list(sources[n_c:n_c + n_h]), sources[n_c + n_h:]
    order = _order(info.body)
    ys: list[np.ndarray] = [np.empty((info.length,) + o.shape, o.dtype) for o in info.body.outputs[n_h:]]
    for t in (reversed(range(info.length)) if info.reverse else range(info.length)):
        outs = _run(info.body, order, consts + carry + [x[t] for x in xs])
        carry = outs[:n_h]
        for k, y in enumerate(outs[n_h:]):
            ys[k][t] = y
    return tuple(carry) + tuple(ys)


_ORDERS: dict[Graph, list[Node]] = {}


def _order(graph: Graph) -> list[Node]:
    order = _ORDERS.get(graph)
    if order is None:
        if len(_ORDERS) > 256:
            _ORDERS.clear()
        order = _ORDERS[graph] = graph.nodes()
    return order


def _run(graph: Graph, order: list[Node], args: Sequence[np.ndarray]) -> list[np.ndarray]:
    env: dict[Node, np.ndarray] = dict(zip(graph.inputs, args))
    for node in order:
        if node in env:
            continue
        if node.op in (Op.INPUT, Op.PARAM, Op.ARG):
            raise KeyError(f"no value for {node!r} (built at {node.loc})")
        value = IMPLS[node.op](node, *[env[s] for s in node.src])
        if not isinstance(value, tuple):
            value = np.asarray(value, dtype=node.dtype)
        env[node] = value
    return [env[o] for o in graph.outputs]


def evaluate(graph: Graph, args: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Values of graph.outputs for values of graph.inputs (in order)."""
    return _run(graph, _order(graph), args)


# the reference runs the graph as it was built: passes are what it checks, not what it relies on
PASSES: tuple[str, ...] = ()


def compile_graph(graph: Graph, passes: Sequence = PASSES) -> Callable[[Sequence[np.ndarray]], list[np.ndarray]]:
    """The backend interface: a function from input arrays (graph.inputs order) to output arrays."""
    if passes:
        from ..ir.optimize import optimize
        graph = optimize(graph, passes=list(passes))
    order = graph.nodes()
    return lambda args: _run(graph, order, args)
