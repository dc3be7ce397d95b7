"""Autodiff: the VJP table is complete, every rule (and the VJP of every rule) matches central
finite differences in float64, symbolic zeros build no dead work, roles, errors, fused kernels."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import unroll as ur
from unroll.backends import numpy_ref
from unroll.ir import build as b
from unroll.ir.autodiff import NON_DIFFERENTIABLE, STRUCTURAL, VJPS, unbroadcast
from unroll.ir.node import Graph, Node, all_nodes, proj
from unroll.ir.ops import Op

F64 = "float64"


def run(outputs, feeds):
    graph = Graph.of(list(outputs))
    ur.verify(graph)
    return numpy_ref.evaluate(graph, [feeds[name] for name in graph.input_names])


# ---- the table is complete ------------------------------------------------------------------------

def test_every_op_has_a_vjp_or_is_listed():
    for op in Op:
        places = [op in VJPS, op in NON_DIFFERENTIABLE, op in STRUCTURAL]
        assert sum(places) == 1, f"{op} must be in exactly one of VJPS, NON_DIFFERENTIABLE, STRUCTURAL"


def test_every_vjp_rule_has_a_finite_difference_case():
    assert set(CASES) == set(VJPS)


# ---- per-op cases: (builder over input nodes, input arrays), drawn by hypothesis -------------------

SHAPES = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)


def _rng(draw):
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


def _away_from_zero(rng, shape, low=0.3, high=1.5):
    return rng.uniform(low, high, shape) * rng.choice([-1.0, 1.0], shape)


@st.composite
def _broadcast_pair(draw, count=2):
    """Shapes that broadcast together: a full shape and variants with dims set to 1 / dropped."""
    full = draw(SHAPES)
    shapes = []
    for _ in range(count):
        drop = draw(st.integers(0, len(full)))
        shape = tuple(1 if draw(st.integers(0, 3)) == 0 else d for d in full[drop:])
        shapes.append(shape)
    return shapes


UNARY_DOMAIN = {
    Op.LOG: lambda rng, s: rng.uniform(0.3, 2.0, s),
    Op.SQRT: lambda rng, s: rng.uniform(0.3, 2.0, s),
    Op.RECIP: lambda rng, s: _away_from_zero(rng, s),
    Op.LOG1P: lambda rng, s: rng.uniform(-0.6, 2.0, s),
    Op.RELU: lambda rng, s: _away_from_zero(rng, s, 0.1),
    Op.ABS: lambda rng, s: _away_from_zero(rng, s, 0.1),
}


def _unary_case(op):
    @st.composite
    def case(draw):
        rng, shape = _rng(draw), draw(SHAPES)
        x = UNARY_DOMAIN.get(op, lambda r, s: r.uniform(-1.5, 1.5, s))(rng, shape)
        return (lambda a: b.unary(op, a)), [x]
    return case()


def _binary_case(op):
    @st.composite
    def case(draw):
        rng = _rng(draw)
        sx, sy = draw(_broadcast_pair())
        if op is Op.POW:
            x, y = rng.uniform(0.4, 2.0, sx), rng.uniform(-1.5, 1.5, sy)
            exponent = draw(st.sampled_from([None, 1.0, 2.0, 3.0, -0.5]))
            if exponent is not None:  # a constant exponent (the rule folds 1 and 2)
                return (lambda a: b.pow(a, b.const(exponent, (), F64))), [x]
        elif op is Op.DIV:
            x, y = rng.uniform(-1.5, 1.5, sx), _away_from_zero(rng, sy)
        elif op in (Op.MAX, Op.MIN):  # one operand large, the other small: never a tie
            x, y = _away_from_zero(rng, sx, 0.5), rng.uniform(-0.2, 0.2, sy)
            if draw(st.booleans()):
                x, y = rng.uniform(-0.2, 0.2, sx), _away_from_zero(rng, sy, 0.5)
        else:
            x, y = rng.uniform(-1.5, 1.5, sx), rng.uniform(-1.5, 1.5, sy)
        return (lambda a, c: b.binary(op, a, c)), [x, y]
    return case()


@st.composite
def _where_case(draw):
    rng = _rng(draw)
    sc, sx, sy = draw(_broadcast_pair(3))
    cond = rng.random(sc) < 0.5
    return (lambda c, x, y: b.where(c, x, y)), [cond, rng.uniform(-1, 1, sx), rng.uniform(-1, 1, sy)]


@st.composite
def _cast_case(draw):  # f64 -> f32 -> f64: linear up to float32 rounding (checked with a large eps)
    rng = _rng(draw)
    return (lambda x: b.cast(b.cast(x, "float32"), F64)), [rng.uniform(-1, 1, draw(SHAPES))]


@st.composite
def _matmul_case(draw):
    rng = _rng(draw)
    m, k, n = (draw(st.integers(1, 3)) for _ in range(3))
    batch_a, batch_b = draw(_broadcast_pair())
    batch_a, batch_b = batch_a[:1], batch_b[:1]
    if batch_a and batch_b and batch_a != batch_b and 1 not in (batch_a[0], batch_b[0]):
        batch_b = batch_a
    return b.matmul, [rng.uniform(-1, 1, batch_a + (m, k)), rng.uniform(-1, 1, batch_b + (k, n))]


@st.composite
def _reduce_case(draw, op):
    rng = _rng(draw)
    shape = draw(SHAPES.filter(len))
    axes = tuple(draw(st.lists(st.integers(0, len(shape) - 1), unique=True, max_size=len(shape))))
    keep = draw(st.booleans())
    size = int(np.prod(shape))
    x = (rng.permutation(size) * 0.3 + rng.uniform(0, 0.1, size)).reshape(shape)  # distinct values
    fn = b.sum if op is Op.SUM else b.max
    return (lambda a: fn(a, axes or None, keep)), [x]


@st.composite
def _reshape_case(draw):
    rng = _rng(draw)
    shape = draw(SHAPES)
    target = draw(st.sampled_from([(int(np.prod(shape)),), tuple(reversed(shape)), shape + (1,)]))
    return (lambda a: Node.make(Op.RESHAPE, (a,), target)), [rng.uniform(-1, 1, shape)]


@st.composite
def _transpose_case(draw):
    rng = _rng(draw)
    shape = draw(SHAPES.filter(lambda s: len(s) >= 2))
    perm = tuple(draw(st.permutations(range(len(shape)))))
    return (lambda a: Node.make(Op.TRANSPOSE, (a,), perm)), [rng.uniform(-1, 1, shape)]


@st.composite
def _broadcast_case(draw):
    rng = _rng(draw)
    target = draw(SHAPES)
    drop = draw(st.integers(0, len(target)))
    shape = tuple(1 if draw(st.booleans()) else d for d in target[drop:])
    return (lambda a: Node.make(Op.BROADCAST, (a,), target)), [rng.uniform(-1, 1, shape)]


@st.composite
def _concat_case(draw):
    rng = _rng(draw)
    shape = draw(SHAPES.filter(len))
    axis = draw(st.integers(0, len(shape) - 1))
    sizes = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    arrays = [rng.uniform(-1, 1, shape[:axis] + (n,) + shape[axis + 1:]) for n in sizes]
    return (lambda *xs: Node.make(Op.CONCAT, xs, axis)), arrays


@st.composite
def _slice_case(draw):
    rng = _rng(draw)
    shape = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple))
    triples = []
    for dim in shape:
        start = draw(st.integers(0, dim - 1))
        triples.append((start, draw(st.integers(start + 1, dim)), draw(st.integers(1, 3))))
    return (lambda a: Node.make(Op.SLICE, (a,), tuple(triples))), [rng.uniform(-1, 1, shape)]


@st.composite
def _pad_case(draw):
    rng = _rng(draw)
    shape = draw(SHAPES.filter(len))
    pads = [(draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in shape]
    return (lambda a: b.pad(a, pads)), [rng.uniform(-1, 1, shape)]


CASES = {
    **{op: _unary_case(op) for op in VJPS if op in {Op.NEG, Op.EXP, Op.LOG, Op.TANH, Op.SIGMOID, Op.RELU,
                                                   Op.SQRT, Op.ABS, Op.RECIP, Op.LOG1P, Op.SIN,
                                                   Op.COS}},
    **{op: _binary_case(op) for op in (Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.MAX, Op.MIN)},
    Op.WHERE: _where_case(), Op.CAST: _cast_case(), Op.MATMUL: _matmul_case(),
    Op.SUM: _reduce_case(Op.SUM), Op.REDUCE_MAX: _reduce_case(Op.REDUCE_MAX),
    Op.RESHAPE: _reshape_case(), Op.TRANSPOSE: _transpose_case(), Op.BROADCAST: _broadcast_case(),
    Op.CONCAT: _concat_case(), Op.SLICE: _slice_case(), Op.PAD: _pad_case(),
}


# ---- check_vjp: <J^T u, v> against <u, (f(x + eps v) - f(x - eps v)) / 2 eps> ----------------------

def check_vjp(fn, arrays, rng, eps=1e-6, rtol=1e-6, atol=1e-9, order=1):
    """order=1 checks fn's VJP; order=2 checks the VJP of x -> J(x)^T u (the rule differentiated)."""
    nodes = [ur.input(f"x{i}", a.shape, a.dtype) for i, a in enumerate(arrays)]
    out = fn(*nodes)
    floats = [i for i, a in enumerate(arrays) if a.dtype == np.float64]
    wrt = [nodes[i] for i in floats]
    u = ur.input("u", out.shape, F64)
    feeds = {f"x{i}": a for i, a in enumerate(arrays)}
    feeds["u"] = rng.uniform(-1, 1, out.shape)
    if order == 2:  # f(x) = J(x)^T u, flattened into one vector; its own VJP is checked below
        grads = ur.vjp([out], [u], wrt)
        out = b.concat([b.reshape(g, (-1,)) for g in grads] + [b.const(0.0, (1,), F64)], 0)
        u = ur.input("u2", out.shape, F64)
        feeds["u2"] = rng.uniform(-1, 1, out.shape)
    grads = ur.vjp([out], [u], wrt)
    for g, w in zip(grads, wrt):
        assert g.type == w.type
        assert g.role in ("backward", None)
    got = run(grads, feeds)
    directions = {i: rng.uniform(-1, 1, arrays[i].shape) for i in floats}
    f = ur.compile(out, backend="numpy")

    def at(sign):
        shifted = dict(feeds)
        for i, d in directions.items():
            shifted[f"x{i}"] = arrays[i] + sign * eps * d
        return f(**{k: shifted[k] for k in f.input_names})

    lhs = sum(float(np.sum(g * directions[i])) for g, i in zip(got, floats))
    rhs = float(np.sum(feeds["u" if order == 1 else "u2"] * (at(1) - at(-1)) / (2 * eps)))
    assert lhs == pytest.approx(rhs, rel=rtol, abs=atol)


@pytest.mark.parametrize("order", [1, 2], ids=["vjp", "vjp_of_vjp"])
@pytest.mark.parametrize("op", sorted(CASES, key=lambda o: o.value), ids=lambda o: o.value)
@settings(max_examples=12)
@given(data=st.data())
def test_vjp_matches_finite_differences(op, order, data):
    """order 1: the rule; order 2: the rule's own VJP (gradients of gradients: the backward graph
    is ordinary IR)."""
    fn, arrays = data.draw(CASES[op])
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    if op is Op.CAST:  # linear up to float32 rounding: a large step
        check_vjp(fn, arrays, rng, eps=0.1, rtol=1e-5, atol=1e-5, order=order)  # f32 rounding
    elif order == 1:
        check_vjp(fn, arrays, rng)
    else:
        check_vjp(fn, arrays, rng, eps=1e-5, rtol=1e-5, atol=1e-8, order=2)


# ---- symbolic zeros ---------------------------------------------------------------------------------

def _count(nodes, op):
    """Backward nodes of this op below nodes (loop bodies included)."""
    return sum(1 for n, _ in all_nodes(Graph((), tuple(nodes))) if n.op is op and n.role == "backward")


def test_no_work_for_sources_that_need_no_gradient():
    x = ur.input("x", (4, 3), F64)
    w = ur.param("w", (3, 2), 0.1, F64)
    loss = ur.sum(ur.tanh(x @ w))
    (gw,) = ur.grad(loss, [w])
    assert _count([gw], Op.MATMUL) == 1  # x^T @ g only: no g @ w^T for x
    assert _count([ur.grad(loss, x)], Op.MATMUL) == 1


def test_no_work_for_values_that_do_not_reach_the_loss():
    """A loop's per-step output the loss ignores gets no cotangent: no dy sequence, no exp VJP."""
    x = ur.input("x", (4, 2, 3), F64)
    w = ur.param("w", (3, 3), 0.3, F64)
    h_T, ignored = ur.scan(lambda h, x_t: (ur.tanh(x_t @ w + h), ur.exp(h)), ur.zeros((2, 3), F64), x)
    g = ur.grad(ur.sum(h_T), w)
    backward = [n for n, _ in all_nodes(Graph((), (g,))) if n.role == "backward"]
    assert not any(n.op is Op.EXP for n in backward)
    (loop,) = [n for n in backward if n.op is Op.LOOP]
    assert ignored.src[0] in {n for n, _ in all_nodes(Graph.of([ignored]))}
    assert loop.arg.n_xs == 2  # the saved 1 - h^2 and x (for dw = x^T dz); no cotangent sequence


def test_unreached_wrt_gets_zeros_and_stop_gradient_blocks():
    x = ur.input("x", (3,), F64)
    y = ur.input("y", (2,), F64)
    loss = ur.sum(ur.stop_gradient(x) * x)
    gx, gy = ur.grad(loss, [x, y])
    assert gy.op is Op.CONST and gy.arg == 0 and gy.shape == (2,)
    (got,) = run([gx], {"x": np.array([1.0, 2.0, 3.0])})
    np.testing.assert_allclose(got, [1.0, 2.0, 3.0])  # only the un-stopped factor


def test_loop_vjp_builds_only_needed_outputs_and_carries():
    T, B, H = 4, 2, 3
    x = ur.input("x", (T, B, H), F64)
    w = ur.param("w", (H, H), 0.3, F64)
    counter = ur.zeros((B, 1), F64)

    def step(carry, x_t):
        h, n = carry
        h = ur.tanh(x_t @ w + h)
        return (h, n + 1.0), h

    _, ys = ur.scan(step, (ur.zeros((B, H), F64), counter), x)
    (gw,) = ur.grad(ur.sum(ys), [w])
    loops = [n for n, _ in all_nodes(Graph((), (gw,))) if n.op is Op.LOOP and n.role == "backward"]
    assert len(loops) == 1
    info = loops[0].arg
    # carried: dw accumulator and dh only (the counter gets none); no per-step dx output
    assert info.n_carry == 2 and info.n_ys == 0


# ---- grad of grad through a loop, Hessian-vector product ----------------------------------------

def test_value_and_grad_runs_the_forward_loop_once():
    T, B, H = 5, 2, 3
    x = ur.input("x", (T, B, H), F64)
    w = ur.param("w", (H, H), 0.3, F64)
    _, ys = ur.scan(lambda h, x_t: (ur.tanh(x_t @ w + h),) * 2, ur.zeros((B, H), F64), x)
    loss = ur.mean(ys * ys)
    grads = ur.grad(loss, [w])
    value, grads2 = ur.value_and_grad(loss, [w])
    assert grads2[0] is grads[0]

    def forward_loops(nodes):
        return [n for n in Graph.of(nodes).nodes() if n.op is Op.LOOP and not n.arg.reverse]
    assert len(forward_loops([loss, *grads])) == 2       # the loss's loop and the extended one
    assert len(forward_loops([value, *grads2])) == 1     # shared
    assert len(forward_loops(ur.ir.loops.merge_loops([loss, *grads]))) == 1
    feeds = {"x": np.random.default_rng(0).standard_normal((T, B, H)), "w": np.eye(H) * 0.3}
    a, b_ = run([loss], feeds), run([value], feeds)
    np.testing.assert_array_equal(a[0], b_[0])


# ---- roles, errors, fused -------------------------------------------------------------------------------

def test_every_node_autodiff_creates_is_marked_backward():
    x = ur.input("x", (3, 2, 2), F64)
    w = ur.param("w", (2, 2), 0.3, F64)
    _, ys = ur.scan(lambda h, x_t: (ur.sigmoid(x_t @ w + h),) * 2, ur.zeros((2, 2), F64), x)
    loss = ur.sum(ys)
    before = {n for n, _ in all_nodes(Graph.of([loss]))}
    grads = ur.grad(loss, [w])
    forward_loops = set()
    for n, _ in all_nodes(Graph.of(grads)):
        if n.op is Op.LOOP and not n.arg.reverse:
            forward_loops.add(n)
    for n, _ in all_nodes(Graph.of(grads)):
        if n not in before and n not in forward_loops:
            assert n.role == "backward", n
    assert all(n.role is None for n in before if n.op is not Op.CONST)


def test_non_scalar_loss_needs_a_cotangent():
    y = ur.input("y", (3, 4), F64)
    with pytest.raises(ValueError, match=r"shape \[3, 4\].*cotangent="):
        ur.grad(y * 2.0, y)
    g = ur.grad(y * 2.0, y, cotangent=ur.ones((3, 4), F64))
    np.testing.assert_allclose(run([g], {"y": np.zeros((3, 4))})[0], 2.0)
    with pytest.raises(ValueError, match="cotangent"):
        ur.vjp([y], [ur.ones((4,), F64)], y)
    with pytest.raises(TypeError, match="int32"):
        ur.grad(ur.sum(y), ur.input("ids", (3,), "int32"))


def test_grad_accepts_a_graph_and_a_single_wrt():
    x = ur.input("x", (2,), F64)
    g = ur.grad(ur.graph(ur.sum(x * x)), x)
    assert isinstance(g, Node)
    np.testing.assert_allclose(run([g], {"x": np.array([1.0, -2.0])})[0], [2.0, -4.0])
    with pytest.raises(ValueError, match="one output"):
        ur.grad(ur.graph(x, x), x)


def test_fused_kernels_are_differentiated_through_their_body():
    x = ur.input("x", (3,), F64)
    y = ur.input("y", (3,), F64)
    a0, a1 = Node.leaf(Op.ARG, x.tensor_type, 0), Node.leaf(Op.ARG, y.tensor_type, 1)
    body = Graph((a0, a1), (ur.tanh(a0) * a1, a0 + a1))
    fused = Node.make(Op.FUSED, (x, y), body)
    loss = ur.sum(proj(fused, 0) * proj(fused, 1))
    plain = ur.sum((ur.tanh(x) * y) * (x + y))
    feeds = {"x": np.array([0.1, -0.4, 0.9]), "y": np.array([1.0, 0.5, -2.0])}
    got = run(ur.grad(loss, [x, y]), feeds)
    want = run(ur.grad(plain, [x, y]), feeds)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-14)


def test_unbroadcast_sums_over_broadcast_axes():
    g = ur.input("g", (2, 3, 4), F64)
    assert unbroadcast(g, (2, 3, 4)) is g
    out = unbroadcast(g, (3, 1))
    assert out.shape == (3, 1)
    value = np.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_allclose(run([out], {"g": value})[0], value.sum(axis=(0, 2))[:, None])
