"""Loop fusion in the CPU kernel language (unroll.backends.cpu.fuse): which adjacent nests merge,
which must not, and that merging never changes what a kernel computes (the kernel language is
Python, so each case runs before and after fusion on random arrays)."""

from __future__ import annotations

import ast
import textwrap

import numpy as np
import pytest

from unroll.backends.cpu.fuse import fuse_loops


def _fused(source: str) -> str:
    return ast.unparse(fuse_loops(ast.parse(textwrap.dedent(source)).body[0]))


def _nests(source: str) -> int:
    """Top-level statements of the function body that are loops, at any block depth of time loops."""
    return sum(1 for n in ast.walk(ast.parse(source)) if isinstance(n, ast.For) and n.target.id.startswith("i0"))


def _run(source: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    scope: dict = {"np": np}
    exec(source, scope)   # noqa: S102 - the kernel language is Python
    copies = {k: v.copy() for k, v in arrays.items()}
    scope["kernel"](**copies)
    return copies


def _check(source: str, arrays: dict[str, np.ndarray], nests_after: int) -> None:
    source = textwrap.dedent(source)
    fused = _fused(source)
    assert _nests(fused) == nests_after, fused
    before, after = _run(source, arrays), _run(fused, arrays)
    for name in arrays:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)


RNG = np.random.default_rng(0)


def _arrays(**shapes) -> dict[str, np.ndarray]:
    return {name: RNG.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def test_elementwise_chain_becomes_one_nest():
    _check("""
    def kernel(a, b, c, d):
        for i0 in range(4):
            for i1 in range(5):
                b[i0, i1] = a[i0, i1] * 2
        for i0 in range(4):
            for i1 in range(5):
                c[i0, i1] = b[i0, i1] + a[i0, i1]
        for i0 in range(4):
            for i1 in range(5):
                e = c[i0, i1]
                d[i0, i1] = e * b[i0, i1]
    """, _arrays(a=(4, 5), b=(4, 5), c=(4, 5), d=(4, 5)), nests_after=1)


def test_a_read_at_another_element_keeps_nests_apart():
    # c reads b transposed: b must be complete first
    _check("""
    def kernel(a, b, c):
        for i0 in range(4):
            for i1 in range(4):
                b[i0, i1] = a[i0, i1] + 1
        for i0 in range(4):
            for i1 in range(4):
                c[i0, i1] = b[i1, i0]
    """, _arrays(a=(4, 4), b=(4, 4), c=(4, 4)), nests_after=2)


def test_an_overwrite_of_what_the_first_nest_still_reads_keeps_nests_apart():
    _check("""
    def kernel(a, b):
        for i0 in range(5):
            b[i0] = a[4 - i0]
        for i0 in range(5):
            a[i0] = b[i0] * 3
    """, _arrays(a=(5,), b=(5,)), nests_after=2)


def test_a_reduction_is_not_injective_and_stays_apart():
    # r[i1] is written by every i0: the second nest must see the finished sums
    _check("""
    def kernel(a, r, out):
        for i0 in range(3):
            for i1 in range(4):
                r[i1] = r[i1] + a[i0, i1]
        for i0 in range(3):
            for i1 in range(4):
                out[i0, i1] = r[i1]
    """, _arrays(a=(3, 4), r=(4,), out=(3, 4)), nests_after=2)


def test_disjoint_segments_of_a_concatenation_merge():
    _check("""
    def kernel(a, b, cat):
        for i0 in range(3):
            for i1 in range(4):
                cat[i0, i1] = a[i0, i1]
        for i0 in range(3):
            for i1 in range(4):
                cat[i0, 4 + i1] = b[i0, i1]
        for i0 in range(3):
            for i1 in range(4):
                cat[i0, 2 * 4 + i1] = a[i0, i1] * b[i0, i1]
    """, _arrays(a=(3, 4), b=(3, 4), cat=(3, 12)), nests_after=1)


def test_overlapping_segments_stay_apart():
    _check("""
    def kernel(a, cat):
        for i0 in range(6):
            cat[i0] = a[i0]
        for i0 in range(6):
            cat[3 + i0] = cat[i0] * 2
    """, _arrays(a=(6,), cat=(9,)), nests_after=2)


def test_different_ranges_and_carried_scalars_stay_apart():
    _check("""
    def kernel(a, b, c):
        for i0 in range(4):
            b[i0] = a[i0]
        for i0 in range(3):
            c[i0] = b[i0]
    """, _arrays(a=(4,), b=(4,), c=(4,)), nests_after=2)
    _check("""
    def kernel(a, b):
        s = 0.0
        for i0 in range(4):
            s = s + a[i0]
        for i0 in range(4):
            b[i0] = s
    """, _arrays(a=(4,), b=(4,)), nests_after=2)


def test_views_of_one_buffer_under_two_names_stay_apart():
    _check("""
    def kernel(a, b):
        v = b.reshape((4,))
        for i0 in range(4):
            b[i0 // 2, i0 % 2] = a[i0]
        for i0 in range(4):
            a[i0] = v[3 - i0]
    """, _arrays(a=(4,), b=(2, 2)), nests_after=2)


def test_swapped_carries_are_distinct_buffers_but_their_old_views_are_not():
    source = """
    def kernel(x, ys):
        c = np.empty((3,), np.float32)
        n = np.empty((3,), np.float32)
        for i0 in range(3):
            c[i0] = x[0, i0]
        old = c[0:3]
        for t in range(4):
            for i0 in range(3):
                n[i0] = c[i0] + x[t, i0]
            for i0 in range(3):
                ys[t, i0] = c[i0] * n[i0]
            for i0 in range(3):
                ys[t, i0] = ys[t, i0] + old[i0]
            c, n = n, c
    """
    fused = _fused(source)
    # the first two step nests merge (c and n never name one buffer); the third reads `old`, a
    # view taken before the first swap, which may name either buffer: it stays apart only if
    # something in the merged nest writes a buffer it may name (n does)
    assert _nests(fused) == 3, fused
    arrays = _arrays(x=(4, 3), ys=(4, 3))
    before, after = _run(textwrap.dedent(source), arrays), _run(fused, arrays)
    np.testing.assert_array_equal(before["ys"], after["ys"])


def test_calls_and_allocations_stay_outside():
    source = """
    def kernel(a, b):
        for i0 in range(4):
            b[i0] = a[i0]
        for i0 in range(4):
            t = np.empty((2,), np.float32)
            b[i0] = t.shape[0] + b[i0]
    """
    assert _nests(_fused(source)) == 2


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cell_steps_lose_most_of_their_nests(cell):
    """What fusion is for: the emitters' one-nest-per-value backward step of a GRU has a dozen
    nests over (batch, hidden); after fusion a handful remain. The README quotes the GRU's small
    training step (50, 16, 32, 64): 71 nests before, 41 after."""
    import unroll as ur
    from unroll.bench import unroll_model
    graph, _ = unroll_model(cell, 50, 16, 32, 64)
    source = ur.compile(graph, backend="numba").impl.source
    before = source.count("for ")
    after = _fused(source).count("for ")
    assert after <= 0.7 * before, (before, after)
    if cell == "gru":
        assert (before, after) == (71, 41)
