"""lax.scan's convention, ported from the cases of JAX's control-flow tests a user meets first:
pytrees (tuples, lists, dicts, namedtuples, nested) as carries, xs and ys; Python and numpy
scalars and arrays wherever a value is accepted; length= without xs; unroll=k; ur.map. Each result
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
