"""lax.scan's convention, ported from the cases of JAX's control-flow tests a user meets first:
pytrees (tuples, lists, dicts, namedtuples, nested) as carries, xs and ys; Python and numpy
scalars and arrays wherever a value is accepted; length= without xs; unroll=k; ur.map; and ports of
JAX's testScanImpl, testScanGrad and testScanRnn (matrix @ vector steps). Each result
is checked against a plain Python loop over numpy (the meaning lax.scan documents)."""

from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest

import unroll as ur

Point = namedtuple("Point", ["x", "y"])
RNG = np.random.default_rng(0)


def _run(outs, **feeds):
    return ur.compile(list(outs), backend="numpy")(**feeds)


def test_namedtuple_carry_and_dict_xs():
    xs_v = RNG.normal(size=(5, 3)).astype(np.float32)
    xs = ur.input("xs", (5, 3))

    def step(c, x):
        p = Point(c.x + x["a"], c.y * 0.5)
        return p, {"sum": p.x, "half": p.y}
    final, ys = ur.scan(step, Point(ur.zeros((3,)), ur.ones((3,))), {"a": xs})
    assert isinstance(final, Point) and set(ys) == {"sum", "half"}
    got = _run([final.x, final.y, ys["sum"], ys["half"]], xs=xs_v)
    cx, cy, sums, halves = np.zeros(3, np.float32), np.ones(3, np.float32), [], []
    for t in range(5):
        cx, cy = cx + xs_v[t], cy * np.float32(0.5)
        sums.append(cx)
        halves.append(cy)
    for g, e in zip(got, [cx, cy, np.stack(sums), np.stack(halves)]):
        np.testing.assert_allclose(g, e, rtol=1e-6)


def test_python_and_numpy_scalars_and_arrays_as_init_carry_and_closed_over_constants():
    w = np.array([1.0, -2.0, 0.5], np.float32)
    final, ys = ur.scan(lambda c, _: ((c[0] + 1.0, c[1] * w), c[0]), (0.0, np.ones(3, np.float32)),
                        None, length=4)
    got = _run([final[0], final[1], ys])
    np.testing.assert_allclose(got[0], 4.0)
    np.testing.assert_allclose(got[1], w ** 4, rtol=1e-6)
    np.testing.assert_allclose(got[2], [0.0, 1.0, 2.0, 3.0])


def test_a_number_returned_as_a_carry_takes_the_carry_type():
    final, _ = ur.scan(lambda c, x: (0.0, c + x), ur.zeros((2,)), ur.input("xs2", (3, 2)))
    np.testing.assert_array_equal(_run([final], xs2=np.ones((3, 2), np.float32))[0], np.zeros(2))


def test_nested_lists_and_empty_subtrees():
    xs = ur.input("xs3", (3, 2))
    final, ys = ur.scan(lambda c, x: ([c[0] + x, [c[1][0] * 2.0]], (None, x)), [ur.zeros((2,)), [ur.ones((2,))]], xs)
    assert isinstance(final, list) and isinstance(final[1], list) and ys[0] is None
    got = _run([final[0], final[1][0], ys[1]], xs3=np.ones((3, 2), np.float32))
    np.testing.assert_allclose(got[0], 3.0)
    np.testing.assert_allclose(got[1], 8.0)


@pytest.mark.parametrize("unroll", [1, 2, 3, 7, True])
def test_unroll_k_changes_the_loop_not_the_result(unroll):
    xs_v = RNG.normal(size=(7, 2, 3))
    xs = ur.input("xs4", (7, 2, 3), "float64")
    w = ur.param("w4", (3, 3), 0.5, "float64")
    final, ys = ur.scan(lambda h, x: (ur.tanh(x + h @ w),) * 2, ur.zeros((2, 3), "float64"), xs, unroll=unroll)
    rolled_final, rolled_ys = ur.scan(lambda h, x: (ur.tanh(x + h @ w),) * 2, ur.zeros((2, 3), "float64"), xs)
    wv = ur.init_values([w])["w4"]
    got = _run([final, ys, *ur.grad(ur.sum(ys), [w])], xs4=xs_v, w4=wv)
    want = _run([rolled_final, rolled_ys, *ur.grad(ur.sum(rolled_ys), [w])], xs4=xs_v, w4=wv)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-12)
    loops = [n for n in ur.graph(final).nodes() if n.op.value == "loop"]
    full = unroll is True or unroll >= 7
    assert (not loops) if full else len(loops) >= 1
    if not full and unroll > 1:  # k steps per iteration of the rolled loop
        assert loops[0].arg.length == 7 // unroll


def test_map_is_a_scan_without_carry():
    xs_v = RNG.normal(size=(4, 2)).astype(np.float32)
    ys = ur.map(lambda x: {"sq": x * x, "neg": -x}, ur.input("xs5", (4, 2)))
    got = _run([ys["sq"], ys["neg"]], xs5=xs_v)
    np.testing.assert_allclose(got[0], xs_v * xs_v)
    np.testing.assert_allclose(got[1], -xs_v)


def test_leaves_that_are_not_values_are_rejected_clearly():
    with pytest.raises(TypeError, match="expected unroll values, numbers or arrays in init"):
        ur.scan(lambda c, x: (c, c), "not a value", None, length=2)


# ---- JAX's lax_control_flow_test: testScanImpl, testScanGrad, testScanRnn ---------------------------
# The same step functions with ur. for jnp. / lax., in float64, checked against JAX's scan_reference
# (a Python loop over numpy) forward and against central finite differences for the gradients; and
# against JAX itself where it is installed (the ".[bench]" extra).

D = RNG.normal(size=2)


def _scan_reference(f, init, xs, reverse=False):
    """JAX's scan_reference: the loop lax.scan documents, stacking the per-step outputs."""
    carry, ys = init, []
    for x in (xs[::-1] if reverse else xs):
        carry, y = f(carry, x)
        ys.append(y)
    ys = np.stack(ys[::-1] if reverse else ys)
    return carry, ys


def _impl_step(mod):
    """testScanImpl's f: a closed-over numpy array d, scalars and reductions in the step."""
    def f(c, a):
        assert a.shape == (3,) and c.shape == (4,)
        b = mod.cos(mod.sum(mod.sin(a)) + mod.sum(mod.cos(c)) + float(np.sum(D)))
        c = mod.sin(c * b)
        assert b.shape == ()
        return c, b
    return f


def _finite_difference(fn, x, eps=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[i] = eps
        g[i] = (fn(x + d) - fn(x - d)) / (2 * eps)
    return g


@pytest.mark.parametrize("reverse", [False, True])
def test_jax_scan_impl(reverse):
    as_v, c_v = RNG.normal(size=(5, 3)), RNG.normal(size=4)
    as_, c = ur.input("as_", (5, 3), "float64"), ur.input("c", (4,), "float64")
    final, bs = ur.scan(_impl_step(ur), c, as_, reverse=reverse)
    got = _run([final, bs], as_=as_v, c=c_v)
    want = _scan_reference(_impl_step(np), c_v, as_v, reverse)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-14)


def test_jax_scan_grad():
    """testScanGrad: d/dc and d/das of sum(final) + sum(ys) through the scan."""
    as_v, c_v = RNG.normal(size=(5, 3)), RNG.normal(size=4)
    as_, c = ur.input("as_g", (5, 3), "float64"), ur.input("c_g", (4,), "float64")
    final, bs = ur.scan(_impl_step(ur), c, as_)
    loss = ur.sum(final) + ur.sum(bs)
    got_loss, g_c, g_as = _run([loss, *ur.grad(loss, [c, as_])], as_g=as_v, c_g=c_v)

    def ref(cv, av):
        fin, ys = _scan_reference(_impl_step(np), cv, av)
        return np.sum(fin) + np.sum(ys)
    np.testing.assert_allclose(got_loss, ref(c_v, as_v), rtol=1e-12)
    np.testing.assert_allclose(g_c, _finite_difference(lambda cv: ref(cv, as_v), c_v), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(g_as, _finite_difference(lambda av: ref(c_v, av), as_v), rtol=1e-6, atol=1e-8)


N_IN, N_HID, N_OUT, LENGTH = 4, 2, 1, 3


def _rnn_loss(mod, concat, params, inputs, targets):
    """testScanRnn's model: 1-D state and input, matrix @ vector (jnp.dot(W, stacked))."""
    W_trans, W_out = params

    def step(state, x):
        stacked = concat([state, x])
        output = mod.tanh(W_out @ stacked)
        next_state = mod.tanh(W_trans @ stacked)
        return next_state, output
    zeros = np.zeros(N_HID) if mod is np else ur.zeros((N_HID,), "float64")
    if mod is np:
        _, outputs = _scan_reference(step, zeros, inputs)
    else:
        _, outputs = ur.scan(step, zeros, inputs)
    return mod.sum((outputs - targets) ** 2)


def test_jax_scan_rnn():
    W_trans_v, W_out_v = RNG.normal(size=(N_HID, N_HID + N_IN)), RNG.normal(size=(N_OUT, N_HID + N_IN))
    inputs_v, targets_v = RNG.normal(size=(LENGTH, N_IN)), RNG.normal(size=(LENGTH, N_OUT))
    W_trans, W_out = ur.input("W_trans", W_trans_v.shape, "float64"), ur.input("W_out", W_out_v.shape, "float64")
    inputs, targets = ur.input("inputs", inputs_v.shape, "float64"), ur.input("targets", targets_v.shape, "float64")
    loss = _rnn_loss(ur, lambda parts: ur.concat(parts, 0), (W_trans, W_out), inputs, targets)
    feeds = dict(W_trans=W_trans_v, W_out=W_out_v, inputs=inputs_v, targets=targets_v)
    got_loss, g_trans, g_out = _run([loss, *ur.grad(loss, [W_trans, W_out])], **feeds)

    def ref(wt, wo):
        return _rnn_loss(np, np.concatenate, (wt, wo), inputs_v, targets_v)
    np.testing.assert_allclose(got_loss, ref(W_trans_v, W_out_v), rtol=1e-12)
    np.testing.assert_allclose(g_trans, _finite_difference(lambda w: ref(w, W_out_v), W_trans_v), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(g_out, _finite_difference(lambda w: ref(W_trans_v, w), W_out_v), rtol=1e-6, atol=1e-8)
    # the CPU backend gives the same values
    compiled = ur.compile([loss, *ur.grad(loss, [W_trans, W_out])], backend="numba")(**feeds)
    for g, e in zip(compiled, [got_loss, g_trans, g_out]):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)


def test_jax_scan_impl_and_grad_against_jax():
    jax = pytest.importorskip("jax")
    with jax.enable_x64(True):   # float64 in this test only (the README's JAX port is float32)
        _against_jax(jax)


def _against_jax(jax):
    jnp = jax.numpy
    as_v, c_v = RNG.normal(size=(5, 3)), RNG.normal(size=4)
    as_, c = ur.input("as_j", (5, 3), "float64"), ur.input("c_j", (4,), "float64")
    final, bs = ur.scan(_impl_step(ur), c, as_)
    loss = ur.sum(final) + ur.sum(bs)
    got = _run([final, bs, *ur.grad(loss, [c, as_])], as_j=as_v, c_j=c_v)

    def jax_loss(cv, av):
        fin, ys = jax.lax.scan(_impl_step(jnp), cv, av)
        return jnp.sum(fin) + jnp.sum(ys)
    fin, ys = jax.lax.scan(_impl_step(jnp), jnp.asarray(c_v), jnp.asarray(as_v))
    want = [fin, ys, *jax.grad(jax_loss, argnums=(0, 1))(jnp.asarray(c_v), jnp.asarray(as_v))]
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, np.asarray(e), rtol=1e-12, atol=1e-14)
