"""Hypothesis strategies for random valid graphs and random RNN cells, built with the DSL/builders.

API (reuse these in pass and backend equivalence tests)::

    graphs(dtype="float32", min_loops=0, max_loops=2, nested=True, max_ops=6, smooth=False)
        -> SearchStrategy[Graph]
        Random graphs over small shapes (dims 1..4, rank <= 4, loops of length 1..4) that can hold
        every op of `unroll.ir.ops.Op` a user builds (tests/test_properties.py checks the enum
        against drawn graphs): elementwise math (kept finite: log/sqrt/div/pow/recip see operands
        x*x + c > 0), matmuls, reductions, reshapes, transposes, slices, concats, pads, broadcasts,
        compare+where, casts (float -> int clamped to [-50, 50]), argmax+onehot, integer math
        (add/sub/mul/maximum/minimum, compare+where, sum/max, movement, matmul on int32/int64),
        bool math (eq/ne, where, max as "any", movement), the DSL's compositions (softmax,
        log_softmax, logsumexp, softplus, stack, split), int and bool inputs, and scan loops (0-2
        carries, 0-2 sequences or length=, 0-2 per-step outputs, reverse or not, closures over
        outer values, one level of nesting). Every value drawn reaches an output: the values
        nothing reads become extra graph outputs (and, usually, extra per-step outputs of a loop).
        Outputs may be named; their names are then out0, out1, ... Input names are x<i> / w<i>
        (params), ids<i> (int), mask<i> (bool). `smooth=True` keeps only float inputs and ops
        that are smooth where they are evaluated, for finite-difference gradient checks: no relu,
        abs, sign, maximum/minimum, max-reduce, stop_gradient, where, cast, argmax/onehot, nor
        integer, bool or composite values.
    rnn_cells(dtype="float32")  -> SearchStrategy[tuple[Graph, dict[str, np.ndarray]]]
        A hand-written recurrent cell: 1-4 gates act(x_t @ W_k + h @ U_k + b_k) combined with random
        mul/add/sub (sometimes gated with h), scanned over x of shape (T, B, I) from input "h0"
        (B, H); outputs "ys" (T, B, H) and "h_T". T, B, I, H are drawn in 1..5. Returns the graph
        and random feeds for every input (parameters included).
    random_feeds(graph, seed=0, dtype=None)  -> dict[str, np.ndarray]
        Arrays for every graph input, by name: floats ~ N(0, 0.5^2) (in `dtype` if given, else the
        input's own dtype), ints in [0, ID_RANGE) = [0, 3) (onehot depths of inputs are >= 3),
        bools. `seed` may be an int or a numpy Generator.
    evaluate(graph, feeds)  -> list[np.ndarray]
        The numpy reference interpreter on feeds by name (extra feeds are ignored, so feeds made
        for a graph still work after a pass drops an input).
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import numpy as np
from hypothesis import strategies as st

import unroll as ur
from unroll.backends import numpy_ref
from unroll.ir import build as b
from unroll.ir.node import Graph, Node
from unroll.ir.ops import LEAVES

T = TypeVar("T")
DIMS = st.integers(1, 4)
MAX_RANK = 4
ID_RANGE = 3  # random_feeds draws int inputs in [0, ID_RANGE); onehot of an input has depth >= this


# ---- feeds --------------------------------------------------------------------------------------

def random_feeds(graph: Graph, seed: int | np.random.Generator = 0, dtype: object = None
                 ) -> dict[str, np.ndarray]:
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for node, name in zip(graph.inputs, graph.input_names):
        if node.dtype == "bool":
            feeds[name] = rng.random(node.shape) < 0.5
        elif node.dtype.startswith("int"):
            feeds[name] = rng.integers(0, ID_RANGE, node.shape).astype(node.dtype)
        else:
            feeds[name] = (0.5 * rng.standard_normal(node.shape)).astype(dtype or node.dtype)
    return feeds


def evaluate(graph: Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return numpy_ref.evaluate(graph, [feeds[name] for name in graph.input_names])


# ---- random expressions -------------------------------------------------------------------------

def _square(x: Node | float) -> Node | float:
    return x * x


# unary functions kept finite and smooth on any finite input (log/sqrt/recip see x*x + c > 0)
SMOOTH_UNARY: dict[str, Callable[[Node], Node]] = {
    "neg": b.neg, "tanh": b.tanh, "sigmoid": b.sigmoid,
    "exp": lambda x: b.exp(b.tanh(x)),
    "log": lambda x: b.log(x * x + 1.0),
    "sqrt": lambda x: b.sqrt(x * x + 0.25),
    "recip": lambda x: b.recip(x * x + 1.0),
    "log1p": lambda x: b.log1p(x * x),
    "sin": b.sin, "cos": b.cos,
}
# kinks, jumps or a zero gradient by definition: left out of smooth graphs (finite differences)
KINKED_UNARY: dict[str, Callable[[Node], Node]] = {
    "relu": b.relu, "abs": b.abs, "sign": b.sign, "stop_gradient": b.stop_gradient,
}

SMOOTH_BINARY: dict[str, Callable[[Node | float, Node | float], Node]] = {
    "add": b.add, "sub": b.sub, "mul": b.mul,
    "div": lambda x, y: b.div(x, _square(y) + 1.0),  # type: ignore[operator]
    "pow": lambda x, y: b.pow(_square(x) + 0.5,  # type: ignore[operator]
                              b.tanh(y) if isinstance(y, Node) else float(np.tanh(y))),
}
KINKED_BINARY: dict[str, Callable[[Node | float, Node | float], Node]] = {
    "maximum": b.maximum, "minimum": b.minimum,
}

COMPARE = [b.less, b.less_equal, b.greater, b.greater_equal, b.equal, b.not_equal]
# the binary ops with an integer meaning (div and pow are float-only)
INT_BINARY: dict[str, Callable[[Node | int, Node | int], Node]] = {
    "add": b.add, "sub": b.sub, "mul": b.mul, "maximum": b.maximum, "minimum": b.minimum,
}


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    return all(d in (1, t) for d, t in zip(reversed(shape), reversed(target)))


class _Builder:
    """Draws random ops over a pool of available float values (one scope: top level or a step)."""

    def __init__(self, draw: Callable, dtype: str, pool: list[Node], names: list[int], depth: int,
                 loops_left: list[int], nested: bool, smooth: bool) -> None:
        self.draw, self.dtype, self.pool, self.names = draw, dtype, pool, names
        self.depth, self.loops_left, self.nested, self.smooth = depth, loops_left, nested, smooth
        self.unary_fns = SMOOTH_UNARY if smooth else {**SMOOTH_UNARY, **KINKED_UNARY}
        self.binary_fns = SMOOTH_BINARY if smooth else {**SMOOTH_BINARY, **KINKED_BINARY}
        self.orders: dict[tuple[str, int], list[int]] = {}

    # ---- helpers ------------------------------------------------------------------------------

    def choose(self, table: str, options: Sequence[T]) -> T:
        """One of `options`, about evenly over many examples. With sampled_from, hypothesis drew the
        first entries far more often (abs ~10x as often as sign or sqrt in 1000 graphs), so each
        builder draws its own order of each table once, and the index from a wide range."""
        key = (table, len(options))
        if key not in self.orders:
            self.orders[key] = self.draw(st.permutations(range(len(options))))
        return options[self.orders[key][self.draw(st.integers(0, 2**16 - 1)) % len(options)]]

    def name(self, prefix: str) -> str:
        self.names[0] += 1
        return f"{prefix}{self.names[0]}"

    def shape(self, min_rank: int = 0, max_rank: int = 3) -> tuple[int, ...]:
        return tuple(self.draw(st.lists(DIMS, min_size=min_rank, max_size=max_rank)))

    def new_input(self, shape: tuple[int, ...] | None = None) -> Node:
        shape = self.shape() if shape is None else shape
        if self.draw(st.booleans()):
            return ur.input(self.name("x"), shape, self.dtype)
        return ur.param(self.name("w"), shape, 0.5, self.dtype)

    def pick(self, ok: Callable[[Node], bool] = lambda n: True) -> Node | None:
        choices = [n for n in self.pool if ok(n)]
        return self.draw(st.sampled_from(choices)) if choices else None

    def fit(self, x: Node, shape: tuple[int, ...]) -> Node:
        """A value of exactly `shape` made from x (for new carries)."""
        if x.shape == shape:
            return x
        if _broadcasts_to(x.shape, shape):
            return b.broadcast_to(x, shape)
        if x.tensor_type.size == int(np.prod(shape)) and self.draw(st.booleans()):
            return b.reshape(x, shape)
        return b.broadcast_to(b.mean(x), shape)

    # ---- actions: each appends new values to the pool -----------------------------------------

    def step(self) -> None:
        actions = ["unary", "binary", "binary", "matmul", "reduce", "movement", "movement", "input"]
        if not self.smooth:
            actions += ["select", "cast", "onehot", "integer", "boolean", "composite"]
        if self.loops_left[0] > 0 and (self.depth == 0 or (self.nested and self.depth == 1)):
            actions += ["loop", "loop"]
        action = self.choose("actions", actions)
        out = getattr(self, action)()
        if out is not None:
            self.pool.append(out)

    def unary(self) -> Node:
        fn = self.choose("unary", sorted(self.unary_fns))
        return self.unary_fns[fn](self.pick())  # type: ignore[arg-type]

    def binary(self) -> Node:
        fn = self.binary_fns[self.choose("binary", sorted(self.binary_fns))]
        a = self.pick()
        assert a is not None
        other = self.pick(lambda n: _broadcasts_to(n.shape, a.shape) or _broadcasts_to(a.shape, n.shape))
        if other is None or self.draw(st.integers(0, 4)) == 0:
            scalar = self.draw(st.sampled_from([0.5, 2.0, -1.5]))
            return fn(a, scalar) if self.draw(st.booleans()) else fn(scalar, a)
        return fn(a, other) if self.draw(st.booleans()) else fn(other, a)

    def matmul(self) -> Node:
        a = self.pick(lambda n: n.ndim >= 2)
        if a is None:
            a = self.pick(lambda n: n.ndim == 1)
            if a is None:
                return self.unary()
            a = b.reshape(a, (1, a.shape[0]))
        k = a.shape[-1]
        w = self.pick(lambda n: n.ndim == 2 and n.shape[0] == k and n is not a)
        if w is None or self.draw(st.booleans()):
            w = self.new_input((k, self.draw(DIMS)))
        return b.matmul(a, w) if self.draw(st.integers(0, 3)) else b.matmul(w.T, b.transpose(a, self._swap_last(a)))

    @staticmethod
    def _swap_last(a: Node) -> tuple[int, ...]:
        perm = list(range(a.ndim))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        return tuple(perm)

    def reduce(self) -> Node:
        x = self.pick(lambda n: n.ndim >= 1)
        if x is None:
            return self.unary()
        axes = self.draw(st.lists(st.integers(0, x.ndim - 1), min_size=0, max_size=x.ndim, unique=True))
        axis = tuple(axes) or None
        keepdims = self.draw(st.booleans())
        fn = self.draw(st.sampled_from([b.sum, b.mean] if self.smooth else [b.sum, b.max, b.mean]))
        return fn(x, axis, keepdims)

    def movement(self) -> Node:
        x = self.pick(lambda n: n.ndim >= 1)
        if x is None:
            x = self.pick()
            return b.reshape(x, (1,))  # type: ignore[arg-type]
        kind = self.draw(st.sampled_from(["reshape", "transpose", "slice", "index", "concat", "pad",
                                          "broadcast"]))
        axis = self.draw(st.integers(0, x.ndim - 1))
        dim = x.shape[axis]
        if kind == "reshape":
            options = [(x.tensor_type.size,), x.shape[:axis] + (1,) + x.shape[axis:]]
            if x.ndim >= 2:
                options.append((x.shape[0] * x.shape[1],) + x.shape[2:])
            shape = self.draw(st.sampled_from(options))
            return b.reshape(x, shape) if len(shape) <= MAX_RANK else b.reshape(x, -1)
        if kind == "transpose":
            perm = self.draw(st.permutations(list(range(x.ndim))))
            return b.transpose(x, perm) if x.ndim >= 2 else b.neg(x)
        if kind == "slice":
            start = self.draw(st.integers(0, dim - 1))
            stop = self.draw(st.integers(start + 1, dim))
            return b.slice_axis(x, axis, start, stop, self.draw(st.integers(1, 2)))
        if kind == "index":
            return x[(slice(None),) * axis + (self.draw(st.integers(-dim, dim - 1)),)]
        if kind == "concat":
            same = self.pick(lambda n: n.ndim == x.ndim and all(
                d == e for i, (d, e) in enumerate(zip(n.shape, x.shape)) if i != axis))
            parts = [x, same if same is not None else b.tanh(x)]
            if self.draw(st.booleans()):
                parts.append(b.slice_axis(x, axis, 0, 1))
            return b.concat(parts, axis)
        if kind == "pad":
            pads = [(self.draw(st.integers(0, 2)), self.draw(st.integers(0, 2))) for _ in x.shape]
            return b.pad(x, pads)
        if x.ndim >= MAX_RANK:
            return b.tanh(x)
        return b.broadcast_to(x, (self.draw(DIMS),) + x.shape)

    def select(self) -> Node:
        a = self.pick()
        assert a is not None
        other = self.pick(lambda n: _broadcasts_to(n.shape, a.shape))
        y = other if other is not None else b.neg(a)
        if self.draw(st.integers(0, 3)) == 0 and a.ndim <= 3:  # a bool input as the condition
            cond = ur.input(self.name("mask"), a.shape, "bool")
        else:
            cond = self.choose("compare", COMPARE)(a, y if self.draw(st.booleans()) else 0.25)
        return b.where(cond, a, y) if self.draw(st.booleans()) else b.where(cond, y, 0.0)

    def cast(self) -> Node:
        x = self.pick()
        assert x is not None
        target = self.draw(st.sampled_from(["float32", "float64", "int32", "int64"]))
        if target.startswith("int"):
            x = self._small(x)
        return b.cast(b.cast(x, target), self.dtype)

    @staticmethod
    def _small(x: Node) -> Node:
        """x * 3 clamped to [-50, 50]: truncation toward zero makes small ints, and a float outside
        the int range would make the cast undefined (numpy, Numba and CUDA differ there)."""
        return b.minimum(b.maximum(x * 3.0, -50.0), 50.0)

    def onehot(self) -> Node:
        x = self.pick(lambda n: 1 <= n.ndim <= 3)
        if x is None or self.draw(st.integers(0, 3)) == 0:
            ids = ur.input(self.name("ids"), self.shape(0, 2), self.draw(st.sampled_from(["int32", "int64"])))
            depth = self.draw(st.integers(ID_RANGE, ID_RANGE + 2))  # random_feeds' ids are < ID_RANGE
        else:
            axis = self.draw(st.integers(0, x.ndim - 1))
            ids, depth = b.argmax(x, axis), x.shape[axis]
        return b.cast(b.onehot(ids, depth), self.dtype)

    def input(self) -> Node:
        return self.new_input()

    # ---- integer, bool and composite values (not in smooth graphs) -----------------------------

    def _int_value(self, dtype: str) -> Node:
        """A small int tensor: an int input, a clamped cast of a float value, or an argmax."""
        how = self.draw(st.sampled_from(["input", "cast", "argmax"]))
        x = self.pick()
        assert x is not None
        if how == "input":
            return ur.input(self.name("ids"), self.shape(0, 3), dtype)
        if how == "argmax" and x.ndim >= 1:
            return b.cast(b.argmax(x, self.draw(st.integers(-x.ndim, x.ndim - 1))), dtype)
        return b.cast(self._small(x), dtype)

    def integer(self) -> Node:
        """1-3 integer ops (arithmetic, compare + where, reductions, movement, matmul) on small int
        values, cast back to the float dtype. Values stay far from int32 overflow."""
        draw = self.draw
        dtype = draw(st.sampled_from(["int32", "int64"]))
        v = self._int_value(dtype)
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(st.sampled_from(["binary", "binary", "select", "reduce", "movement", "matmul"]))
            if kind in ("binary", "select"):
                node = self._int_value(dtype)
                fits = _broadcasts_to(node.shape, v.shape) or _broadcasts_to(v.shape, node.shape)
                other: Node | int = node if fits else draw(st.integers(-3, 3))
                if kind == "binary":
                    fn = INT_BINARY[draw(st.sampled_from(sorted(INT_BINARY)))]
                    v = fn(v, other) if draw(st.booleans()) else fn(other, v)
                else:
                    cond = self.choose("compare", COMPARE)(v, other)
                    v = b.where(cond, v, other) if draw(st.booleans()) else b.where(cond, other, v)
            elif kind == "reduce" and v.ndim >= 1:
                axes = draw(st.lists(st.integers(0, v.ndim - 1), max_size=v.ndim, unique=True))
                v = draw(st.sampled_from([b.sum, b.max]))(v, tuple(axes) or None, draw(st.booleans()))
            elif kind == "movement" and v.ndim >= 1:
                v = self._move(v)
            elif kind == "matmul":
                a = v if v.ndim >= 2 else b.reshape(v, (1, v.tensor_type.size))
                w = ur.input(self.name("ids"), (a.shape[-1], draw(DIMS)), dtype)
                v = (b.matmul(a, w) if draw(st.booleans()) else
                     b.matmul(b.transpose(w), b.transpose(a, self._swap_last(a))))
        return b.cast(v, self.dtype)

    def boolean(self) -> Node:
        """Ops on bool values (eq/ne of bools, where with bool branches, max-reduce as "any",
        movement) cast to the float dtype."""
        draw = self.draw

        def mask(shape: tuple[int, ...] | None = None) -> Node:
            x = self.pick(lambda n: shape is None or _broadcasts_to(n.shape, shape))
            if x is None or draw(st.integers(0, 2)) == 0:
                return ur.input(self.name("mask"), self.shape(0, 3) if shape is None else shape, "bool")
            return self.choose("compare", COMPARE)(x, draw(st.sampled_from([0.0, 0.25, -0.5])))
        m = mask()
        for _ in range(draw(st.integers(1, 2))):
            kind = draw(st.sampled_from(["compare", "where", "reduce", "movement"]))
            if kind == "compare":
                m = draw(st.sampled_from([b.equal, b.not_equal]))(m, mask(m.shape))
            elif kind == "where":
                m = b.where(mask(m.shape), m, mask(m.shape))
            elif kind == "reduce" and m.ndim >= 1:
                m = b.max(m, draw(st.integers(0, m.ndim - 1)), draw(st.booleans()))
            elif kind == "movement" and m.ndim >= 1:
                m = self._move(m)
        return b.cast(m, self.dtype)

    def _move(self, x: Node) -> Node:
        """A movement op on a value of any dtype (x.ndim >= 1)."""
        kind = self.draw(st.sampled_from(["reshape", "transpose", "slice", "concat", "pad", "broadcast"]))
        axis = self.draw(st.integers(0, x.ndim - 1))
        if kind == "reshape":
            return b.reshape(x, -1)
        if kind == "transpose" and x.ndim >= 2:
            return b.transpose(x, self.draw(st.permutations(list(range(x.ndim)))))
        if kind == "slice":
            start = self.draw(st.integers(0, x.shape[axis] - 1))
            return b.slice_axis(x, axis, start, x.shape[axis], self.draw(st.integers(1, 2)))
        if kind == "concat":
            return b.concat([x, b.slice_axis(x, axis, 0, 1), x], axis)
        if kind == "pad":
            return b.pad(x, [(self.draw(st.integers(0, 1)), self.draw(st.integers(0, 2))) for _ in x.shape])
        if x.ndim < MAX_RANK:
            return b.broadcast_to(x, (self.draw(DIMS),) + x.shape)
        return x

    def composite(self) -> Node:
        """The DSL's compositions of ops: softmax, log_softmax, logsumexp, softplus, mean, stack, split."""
        x = self.pick()
        assert x is not None
        kind = self.draw(st.sampled_from(["softmax", "log_softmax", "logsumexp", "softplus", "stack", "split"]))
        if kind == "softplus" or x.ndim == 0:
            return ur.softplus(x)
        axis = self.draw(st.integers(-x.ndim, x.ndim - 1))
        if kind == "softmax":
            return ur.softmax(x, axis)
        if kind == "log_softmax":
            return ur.log_softmax(x, axis)
        if kind == "logsumexp":
            return ur.logsumexp(x, axis, keepdims=self.draw(st.booleans()))
        if kind == "stack" and x.ndim < MAX_RANK:
            return ur.stack([x, b.tanh(x)], axis=self.draw(st.integers(0, x.ndim)))
        dim = x.shape[axis]
        if dim == 1:
            return ur.softplus(x)
        if dim % 2 == 0 and self.draw(st.booleans()):
            first, second = b.split(x, 2, axis)  # two equal halves (the gate split)
            return first * b.sigmoid(second)
        k = self.draw(st.integers(1, dim - 1))
        first, second = b.split(x, [k, dim - k], axis)
        return b.concat([second, first], axis)  # a rotation along the axis

    # ---- loops -------------------------------------------------------------------------------

    def loop(self) -> Node:
        self.loops_left[0] -= 1
        draw = self.draw
        length = draw(st.integers(1, 4))
        n_carry, n_xs = draw(st.integers(0, 2)), draw(st.integers(0, 2))
        n_ys = draw(st.integers(1 if n_carry == 0 else 0, 2))
        reverse = draw(st.booleans())
        inits = []
        for _ in range(n_carry):
            init = self.pick() if draw(st.booleans()) else None
            inits.append(init if init is not None else
                         draw(st.sampled_from([ur.zeros, lambda s, d: self.new_input(s)]))(self.shape(), self.dtype))
        xs = []
        for _ in range(n_xs):
            seq = self.pick(lambda n: n.ndim >= 1 and n.shape[0] == length and n.ndim <= 3)
            xs.append(seq if seq is not None and draw(st.booleans()) else
                      self.new_input((length,) + self.shape(0, 2)))
        closure = [n for n in self.pool if draw(st.integers(0, 2)) == 0]
        n_ops = draw(st.integers(1, 3))

        def step_fn(carry: object, x_t: object) -> tuple[object, object]:
            carries = list(carry) if isinstance(carry, tuple) else [carry]  # type: ignore[arg-type]
            xts = list(x_t) if isinstance(x_t, tuple) else [] if x_t is None else [x_t]  # type: ignore[arg-type]
            inner = _Builder(draw, self.dtype, carries + xts + closure, self.names, self.depth + 1,
                             self.loops_left, self.nested, self.smooth)
            if not inner.pool:
                inner.pool.append(inner.new_input())
            start = len(inner.pool)  # the values made in the step begin here
            if self.nested and self.depth == 0 and draw(st.integers(0, 3)) == 0:
                inner.pool.append(inner.loop())  # one level of nesting, often
            for _ in range(n_ops):
                inner.step()
            new = []
            for c in carries:
                v = inner.fit(inner.pick(), c.shape)  # type: ignore[arg-type]
                mix = draw(st.sampled_from(["tanh", "add", "gate"] if self.smooth else ["tanh", "add", "max", "gate"]))
                new.append(b.tanh(c + v) if mix == "tanh" else c + v if mix == "add" else
                           b.maximum(c, v) if mix == "max" else c * b.sigmoid(v))
            ys = tuple(inner.pick() for _ in range(n_ys))
            if draw(st.integers(0, 3)):  # usually: the step's otherwise unused values are per-step outputs
                ys += tuple(_unused(inner.pool[start:], list(ys) + new))
            new_carry = tuple(new) if isinstance(carry, tuple) else new[0]
            return new_carry, ys if len(ys) != 1 or n_ys != 1 else ys[0]

        init_tree = tuple(inits) if n_carry != 1 or draw(st.booleans()) else inits[0]
        xs_tree = None if not xs else tuple(xs) if len(xs) != 1 or draw(st.booleans()) else xs[0]
        use_length = not xs or draw(st.integers(0, 3)) == 0
        final, ys = ur.scan(step_fn, init_tree, xs_tree, length=length if use_length else None,
                            reverse=reverse)
        outs = [*(final if isinstance(final, tuple) else [final]), *(ys if isinstance(ys, tuple) else [ys])]
        self.pool.extend(o for o in outs[:-1] if o.ndim <= MAX_RANK)
        return outs[-1]


def _unused(pool: list[Node], used: list[Node]) -> list[Node]:
    """The values of `pool` that no value of `used` (nor an earlier one of the result) reads, leaves
    excepted: made outputs, they keep every drawn op in the graph."""
    seen: set[Node] = set()
    out: list[Node] = []

    def reach(node: Node) -> None:
        stack = [node]
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                stack.extend(n.src)
    for node in used:
        reach(node)
    for node in reversed(pool):  # the latest first: they read the earlier ones
        if node not in seen and node.op not in LEAVES:
            out.append(node)
            reach(node)
    return out


# ---- strategies ---------------------------------------------------------------------------------

@st.composite
def graphs(draw: Callable, dtype: str = "float32", min_loops: int = 0, max_loops: int = 2,
           nested: bool = True, max_ops: int = 6, smooth: bool = False) -> Graph:
    names = [0]
    loops = draw(st.integers(min_loops, max_loops))
    builder = _Builder(draw, dtype, [], names, 0, [loops], nested, smooth)
    for _ in range(draw(st.integers(1, 2))):
        builder.pool.append(builder.new_input())
    for _ in range(draw(st.integers(1, max_ops))):
        builder.step()
    while builder.loops_left[0] > loops - min_loops:  # the loops asked for
        builder.pool.append(builder.loop())
    outputs = [builder.pool[-1]] + draw(st.lists(st.sampled_from(builder.pool), max_size=2))
    outputs += _unused(builder.pool, outputs)  # every op drawn is in the graph
    names_out = [f"out{i}" for i in range(len(outputs))] if draw(st.booleans()) else None
    return ur.graph(outputs, names=names_out)


ACTIVATIONS = {"sigmoid": b.sigmoid, "tanh": b.tanh, "relu": b.relu}
COMBINE = {"mul": b.mul, "add": b.add, "sub": b.sub}


@st.composite
def rnn_cells(draw: Callable, dtype: str = "float32") -> tuple[Graph, dict[str, np.ndarray]]:
    T, B, I, H = (draw(st.integers(1, 5)) for _ in range(4))  # noqa: E741 - the usual names
    n_gates = draw(st.integers(1, 4))
    x = ur.input("x", (T, B, I), dtype)
    h0 = ur.input("h0", (B, H), dtype)
    w_ih = [ur.param(f"w_ih{k}", (I, H), 0.5, dtype) for k in range(n_gates)]
    w_hh = [ur.param(f"w_hh{k}", (H, H), 0.5, dtype) for k in range(n_gates)]
    bias = [ur.param(f"b{k}", (H,), 0.5, dtype) if draw(st.booleans()) else None for k in range(n_gates)]
    acts = [draw(st.sampled_from(sorted(ACTIVATIONS))) for _ in range(n_gates)]
    combine = [draw(st.sampled_from(sorted(COMBINE))) for _ in range(n_gates - 1)]
    mix = draw(st.sampled_from(["plain", "residual", "gated"]))
    reverse = draw(st.booleans())

    def cell(h: Node, x_t: Node) -> tuple[Node, Node]:
        gates = []
        for k in range(n_gates):
            pre = x_t @ w_ih[k] + h @ w_hh[k]
            gates.append(ACTIVATIONS[acts[k]](pre + bias[k] if bias[k] is not None else pre))
        new = gates[0]
        for k, how in enumerate(combine):
            new = COMBINE[how](new, gates[k + 1])
        if mix == "residual":
            new = h + new
        elif mix == "gated":  # GRU-like interpolation with the first gate
            z = b.sigmoid(gates[0])
            new = z * h + (1.0 - z) * b.tanh(new)
        return new, new

    h_t, ys = ur.scan(cell, h0, x, reverse=reverse)
    graph = ur.graph(ys, h_t, names=["ys", "h_T"])
    return graph, random_feeds(graph, draw(st.integers(0, 2**32 - 1)))
