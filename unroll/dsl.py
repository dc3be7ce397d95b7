"""The front end: symbolic inputs and parameters, composite functions, and `scan` tracing.

`scan(step_fn, init, xs)` follows lax.scan: `step_fn(carry, x_t) -> (carry, y_t)`, carry and x_t may
be (nested) tuples, and it returns `(final_carry, ys)`. The step function is called once on symbolic
placeholders; whatever it uses from outside (weights, by closure) becomes a loop constant.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from .ir import build as b
from .ir.dims import Dim, as_dim
from .ir.node import Graph, LoopInfo, Node, fresh_scope, proj, substitute, toposort, user_location
from .ir.ops import Op, ShapeError, TensorType, normalize_dtype
from .ir.unroll import unroll_loop

Tree = Any  # a Node, or a tuple/list of Trees, or None


def _leaf_shape(what: str, shape: Sequence[int]) -> tuple[int, ...]:
    """shape as a tuple of ints; a negative dimension is named here, with the leaf and the user's line,
    rather than by TensorType's generic TypeError."""
    dims = tuple(as_dim(d) for d in shape)   # a name ("T") is a symbolic size (ir.dims)
    if any(isinstance(d, int) and d < 0 for d in dims):
        raise ShapeError(f"{what}: expected non-negative dimensions, found shape {dims}\n  at {user_location()}")
    return dims


def input(name: str, shape: Sequence[int], dtype: object = "float32") -> Node:  # noqa: A001
    """A named graph input, fed by keyword when the compiled graph is called."""
    shape_t = _leaf_shape(f"input {str(name)!r}", shape)
    return Node.leaf(Op.INPUT, TensorType(shape_t, normalize_dtype(dtype)), str(name))


def param(name: str, shape: Sequence[int], init: str | float = "zeros", dtype: object = "float32") -> Node:
    """A trainable input. `init`: "zeros", "ones", "uniform:a" (U(-a, a)), "normal:std",
    "glorot", or a float a meaning "uniform:a"; anything else is a ValueError here (never a silent
    default). `init_values` draws values from the spec."""
    spec = f"uniform:{float(init)!r}" if isinstance(init, (int, float)) else str(init)
    problem = b.init_spec_error(spec)
    if problem is not None:
        raise ValueError(f"param {str(name)!r}: {problem}; expected {b.INIT_KINDS}\n  at {user_location()}")
    shape_t = _leaf_shape(f"param {str(name)!r}", shape)
    if any(isinstance(d, Dim) for d in shape_t):
        raise ShapeError(f"param {str(name)!r}: a parameter's shape is fixed, found the symbolic size "
                         f"in {tuple(str(d) for d in shape_t)}\n  at {user_location()}")
    return Node.leaf(Op.PARAM, TensorType(shape_t, normalize_dtype(dtype)), (str(name), spec))


def init_values(params: Sequence[Node] | Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Draw initial values for parameters from their init specs, in order, from one seeded stream."""
    nodes = params.params() if isinstance(params, Graph) else list(params)
    rng = np.random.default_rng(seed)
    out = {}
    for node in nodes:
        if node.op is not Op.PARAM:
            continue
        name, spec = node.arg  # type: ignore[misc]
        problem = b.init_spec_error(spec)
        if problem is not None:  # a node built around ur.param (Node.leaf): refuse rather than guess
            raise ValueError(f"init_values: param {name!r} has the unknown init spec {spec!r} ({problem}); "
                             f"expected {b.INIT_KINDS}")
        kind, _, value = spec.partition(":")
        shape, dtype = node.shape, node.dtype
        if kind == "zeros":
            arr = np.zeros(shape)
        elif kind == "ones":
            arr = np.ones(shape)
        elif kind == "uniform":
            arr = rng.uniform(-float(value), float(value), shape)
        elif kind == "normal":
            arr = rng.normal(0.0, float(value), shape)
        else:  # glorot over the last two axes (init_spec_error admitted no other kind)
            fan_in, fan_out = (shape[-2], shape[-1]) if len(shape) >= 2 else (shape[0], shape[0])
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            arr = rng.uniform(-limit, limit, shape)
        out[name] = arr.astype(dtype)
    return out


def zeros(shape: Sequence[int], dtype: object = "float32") -> Node:
    return b.const(0, shape, normalize_dtype(dtype))


def ones(shape: Sequence[int], dtype: object = "float32") -> Node:
    return b.const(1, shape, normalize_dtype(dtype))


def full(shape: Sequence[int], value: float, dtype: object = "float32") -> Node:
    return b.const(value, shape, normalize_dtype(dtype))


def graph(*outputs: Node | Sequence[Node], names: Sequence[str] | None = None) -> Graph:
    """Collect outputs (nodes or lists of nodes) into a Graph; its inputs are found by walking."""
    flat: list[Node] = []
    for out in outputs:
        flat.extend(out if isinstance(out, (list, tuple)) else [out])
    for out in flat:
        if not isinstance(out, Node):
            raise TypeError(f"graph: expected unroll values, found {type(out).__name__}")
    return Graph.of(flat, names)


# ---- composites --------------------------------------------------------------------------------

def softmax(x: Node, axis: int = -1) -> Node:
    return b.exp(log_softmax(x, axis))


def log_softmax(x: Node, axis: int = -1) -> Node:
    """Stable: x - m - log(sum(exp(x - m))) with m = max(x) held constant (the result does not
    depend on m, so its gradient through m is zero anyway)."""
    shifted = x - b.stop_gradient(b.max(x, axis, keepdims=True))
    return shifted - b.log(b.sum(b.exp(shifted), axis, keepdims=True))


def logsumexp(x: Node, axis: int = -1, keepdims: bool = False) -> Node:
    m = b.stop_gradient(b.max(x, axis, keepdims=True))
    out = b.log(b.sum(b.exp(x - m), axis, keepdims=True)) + m
    return out if keepdims else b.reshape(out, tuple(d for i, d in enumerate(out.shape) if i != axis % x.ndim))


def softplus(x: Node) -> Node:
    """log(1 + exp(x)), stable for large |x|."""
    return b.relu(x) + b.log1p(b.exp(-b.abs(x)))


def stack(xs: Sequence[Node], axis: int = 0) -> Node:
    xs = list(xs)
    axis = axis % (xs[0].ndim + 1)
    return b.concat([b.reshape(x, x.shape[:axis] + (1,) + x.shape[axis:]) for x in xs], axis)


# ---- scan ---------------------------------------------------------------------------------------

def _leaf(value: Any, what: str) -> Node:
    """A pytree leaf as a node: unroll values as they are; Python and numpy scalars and arrays as
    constants (a Python float is float32, a Python int int32, numpy values keep their dtype)."""
    if isinstance(value, Node):
        return value
    if isinstance(value, bool) or isinstance(value, np.bool_):
        return b.const(bool(value), (), "bool")
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.ndarray):
        return b.const(int(value), (), "int32" if isinstance(value, int) else np.dtype(type(value)).name)
    if isinstance(value, float):
        return b.const(value, (), "float32")
    if isinstance(value, (np.ndarray, np.generic)):
        arr = np.asarray(value)
        return b.const(arr, arr.shape, arr.dtype.name)
    raise TypeError(f"scan: expected unroll values, numbers or arrays in {what} (tuples, lists, dicts and "
                    f"namedtuples of them), found {type(value).__name__}\n  at {user_location()}")


def _flatten(tree: Tree, what: str = "a value") -> tuple[list[Node], Any]:
    """Leaves of a pytree (JAX's containers: tuples, lists, namedtuples, dicts by sorted key; None is
    an empty subtree), and a structure description to rebuild it. Iterative (trees can be deep)."""
    leaves: list[Node] = []

    def walk(t: Tree) -> Any:
        if t is None:
            return None
        if isinstance(t, dict):
            keys = sorted(t)
            return (dict, keys, [walk(t[k]) for k in keys])
        if isinstance(t, (tuple, list)):
            return (type(t), None, [walk(item) for item in t])
        leaves.append(_leaf(t, what))
        return "*"
    return leaves, walk(tree)


def _unflatten(structure: Any, leaves: list[Node]) -> Tree:
    it = iter(leaves)

    def build(s: Any) -> Tree:
        if s is None:
            return None
        if s == "*":
            return next(it)
        kind, keys, items = s
        values = [build(i) for i in items]
        if kind is dict:
            return dict(zip(keys, values))
        if hasattr(kind, "_fields"):  # a namedtuple takes its fields as arguments
            return kind(*values)
        return kind(values)
    return build(structure)


def map(fn: Callable[[Tree], Tree], xs: Tree) -> Tree:  # noqa: A001 - lax.map's name
    """`fn` applied to every slice xs[t] along axis 0, results stacked: lax.map (a scan with no carry)."""
    return scan(lambda carry, x: (carry, fn(x)), (), xs)[1]


def scan(step_fn: Callable[[Tree, Tree], tuple[Tree, Tree]], init: Tree, xs: Tree = None,
         length: int | None = None, reverse: bool = False, unroll: int | bool = 1) -> tuple[Tree, Tree]:
    """Trace `step_fn` into a rolled LOOP. Returns `(final_carry, ys)`, ys stacked on a new axis 0.

    lax.scan's convention: carries, xs and ys are pytrees (tuples, lists, dicts, namedtuples,
    nested) of unroll values, Python or numpy scalars and arrays; `length=` without xs; `unroll=k`
    runs k steps per iteration of the rolled loop (`True`: all of them), as `ur.unroll` would.

    Reference meaning (see LoopInfo for the op's own)::

        carry, ys = init, []
        for t in (reversed(range(T)) if reverse else range(T)):
            carry, y = step_fn(carry, xs[t]); ys[t] = y
        return carry, stack(ys)
    """
    where = user_location()
    carry_leaves, carry_struct = _flatten(init, "init")
    x_leaves, x_struct = _flatten(xs, "xs")
    lengths = {x.shape[0] for x in x_leaves if x.ndim >= 1}
    if any(x.ndim == 0 for x in x_leaves):
        raise ShapeError(f"scan: sequences need a leading time axis, found a scalar\n  at {where}")
    if length is not None:
        lengths.add(int(length))
    if len(lengths) != 1:
        raise ShapeError(f"scan: expected one sequence length, found {sorted(lengths) or 'none'} "
                         f"(sequence shapes {[list(x.shape) for x in x_leaves]}, length={length}); "
                         f"pass length= when there are no sequences\n  at {where}")
    (steps,) = lengths

    scope = fresh_scope()
    carry_ph = [Node.leaf(Op.ARG, c.tensor_type, (scope, i)) for i, c in enumerate(carry_leaves)]
    x_ph = [Node.leaf(Op.ARG, TensorType(x.shape[1:], x.dtype), (scope, len(carry_ph) + i))
            for i, x in enumerate(x_leaves)]
    result = step_fn(_unflatten(carry_struct, carry_ph), _unflatten(x_struct, x_ph))
    if not isinstance(result, tuple) or len(result) != 2:
        raise TypeError(f"scan: step_fn must return (carry, y), found {type(result).__name__}\n  at {where}")
    new_carry, ys = result
    new_carry_leaves, new_struct = _flatten(new_carry, "the carry step_fn returns")
    if new_struct != carry_struct:
        raise ShapeError(f"scan: step_fn must return a carry with the structure of init "
                         f"({len(carry_leaves)} values), found {len(new_carry_leaves)}\n  at {where}")
    for i, (old, new) in enumerate(zip(carry_leaves, new_carry_leaves)):
        if new.op is Op.CONST and new.shape == () and old.type != new.type:  # a number: the carry's type
            new = new_carry_leaves[i] = b.const(new.arg, old.shape, old.dtype)
        if old.type != new.type:
            raise ShapeError(f"scan: carry {i} enters the step as {old.type} but step_fn returns "
                             f"{new.type_str()}; a carry must keep its shape and dtype\n  at {where}")
    y_leaves, y_struct = _flatten(ys, "ys")

    body_outputs = new_carry_leaves + y_leaves
    consts = _captured(body_outputs, set(carry_ph + x_ph))
    placeholders = consts + carry_ph + x_ph
    args = [Node.leaf(Op.ARG, p.tensor_type, i, loc=p.loc) for i, p in enumerate(placeholders)]
    body_outputs = substitute(body_outputs, dict(zip(placeholders, args)))
    body = Graph(tuple(args), tuple(body_outputs))
    info = LoopInfo(body, steps, len(consts), len(carry_leaves), bool(reverse))
    loop = Node.make(Op.LOOP, consts + carry_leaves + x_leaves, info, loc=where)
    outs = [proj(loop, i) for i in range(len(body_outputs))]
    factor = steps if unroll is True else int(unroll)
    if factor < 1:
        raise ValueError(f"scan: unroll must be a positive int or True, found {unroll!r}\n  at {where}")
    if factor > 1 and outs:
        outs = unroll_loop(loop, factor)
    n_carry = len(carry_leaves)
    return _unflatten(carry_struct, outs[:n_carry]), _unflatten(y_struct, outs[n_carry:])


def _captured(outputs: list[Node], placeholders: set[Node]) -> list[Node]:
    """Values the body uses that do not depend on this step's placeholders: they become loop
    constants. Constant leaves stay in the body (they need no input)."""
    order = toposort(outputs)
    varying: set[Node] = set()
    for node in order:
        if node in placeholders or any(s in varying for s in node.src):
            varying.add(node)
    consts: list[Node] = []
    seen: set[Node] = set()

    def take(node: Node) -> None:
        if node not in varying and node.op is not Op.CONST and node not in seen:
            seen.add(node)
            consts.append(node)
    for node in order:
        if node in varying:
            for s in node.src:
                take(s)
    for out in outputs:
        take(out)
    return consts
