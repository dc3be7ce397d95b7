"""The reference interpreter: the executable spec of every op, written with plain numpy.

Each op's meaning is one entry of IMPLS. Loops run as Python for-loops exactly as LoopInfo's
docstring says. Every other backend and every pass is tested for equality against this module.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..ir.node import Graph, LoopInfo, Node
from ..ir.ops import BINARY, COMPARE, UNARY, Op

Impl = Callable[..., np.ndarray]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    from scipy.special import expit  # stable in both tails, and fast
    return expit(x)


def _pad(x: np.ndarray, pads: Sequence[tuple[int, int]]) -> np.ndarray:
    # zeros + one assignment: np.pad's generality costs ~10x on the small arrays of a loop step
    out = np.zeros(tuple(d + lo + hi for d, (lo, hi) in zip(x.shape, pads)), x.dtype)
    out[tuple(slice(lo, lo + d) for d, (lo, _) in zip(x.shape, pads))] = x
    return out


def _slice(x: np.ndarray, triples: Sequence[tuple[int, int, int]]) -> np.ndarray:
    return x[tuple(slice(*t) for t in triples)]


ELEMENTWISE_IMPLS: dict[Op, Impl] = {
    Op.NEG: np.negative, Op.EXP: np.exp, Op.LOG: np.log, Op.TANH: np.tanh, Op.SIGMOID: _sigmoid,
    Op.RELU: lambda x: np.maximum(x, 0).astype(x.dtype), Op.SQRT: np.sqrt, Op.ABS: np.abs,
    Op.SIGN: np.sign, Op.RECIP: lambda x: (1 / x).astype(x.dtype), Op.LOG1P: np.log1p,
    Op.ADD: np.add, Op.SUB: np.subtract, Op.MUL: np.multiply, Op.DIV: np.divide, Op.POW: np.power,
    Op.MAX: np.maximum, Op.MIN: np.minimum,
    Op.LT: np.less, Op.LE: np.less_equal, Op.GT: np.greater, Op.GE: np.greater_equal,
    Op.EQ: np.equal, Op.NE: np.not_equal, Op.WHERE: np.where, Op.STOP_GRADIENT: lambda x: x,
}

# impl(node, *source_values) -> value; the node gives arg and the result type
IMPLS: dict[Op, Callable[..., np.ndarray]] = {
    **{op: (lambda f: lambda node, *xs: f(*xs))(ELEMENTWISE_IMPLS[op])
       for op in UNARY | BINARY | COMPARE | {Op.WHERE, Op.STOP_GRADIENT}},
    Op.CONST: lambda node: np.full(node.shape, node.arg, node.dtype),
    Op.CAST: lambda node, x: x.astype(node.dtype),
    Op.MATMUL: lambda node, a, b: np.matmul(a, b),
    Op.SUM: lambda node, x: np.sum(x, axis=node.arg[0], keepdims=node.arg[1]),
    Op.REDUCE_MAX: lambda node, x: np.max(x, axis=node.arg[0], keepdims=node.arg[1]),
    Op.ARGMAX: lambda node, x: np.argmax(x, axis=node.arg),
    Op.ONEHOT: lambda node, ids: (ids[..., None] == np.arange(node.arg)),
    Op.RESHAPE: lambda node, x: np.reshape(x, node.arg),
    Op.TRANSPOSE: lambda node, x: np.transpose(x, node.arg),
    Op.BROADCAST: lambda node, x: np.broadcast_to(x, node.arg),
    Op.CONCAT: lambda node, *xs: np.concatenate(xs, axis=node.arg),
    Op.SLICE: lambda node, x: _slice(x, node.arg),
    Op.PAD: lambda node, x: _pad(x, node.arg),
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
