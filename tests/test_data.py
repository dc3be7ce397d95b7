"""The synthetic task generators: shapes, dtypes, the tasks' defining properties, seeding, baselines."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from unroll import data


@given(n=st.integers(1, 40), T=st.integers(2, 60), seed=st.integers(0, 2**31))
def test_adding_problem_properties(n, T, seed):
    x, y = data.adding_problem(n, T, seed=seed)
    assert x.shape == (T, n, 2) and y.shape == (n, 1)
    assert x.dtype == np.float32 and y.dtype == np.float32
    values, marker = x[..., 0], x[..., 1]
    assert np.all((values >= 0) & (values < 1))
    assert set(np.unique(marker)) <= {0.0, 1.0}
    assert np.all(marker.sum(axis=0) == 2)  # exactly two marked steps per sequence
    np.testing.assert_allclose(y[:, 0], (values * marker).sum(axis=0), rtol=1e-6)


def test_adding_problem_marks_every_pair_uniformly():
    T, n = 4, 60000
    x, _ = data.adding_problem(n, T, seed=1)
    pairs = [tuple(np.flatnonzero(x[:, i, 1])) for i in range(n)]
    counts = {p: pairs.count(p) for p in set(pairs)}
    assert len(counts) == math.comb(T, 2)  # all 6 pairs occur, none more than once per sequence
    expected = n / len(counts)
    assert all(abs(c - expected) < 5 * math.sqrt(expected) for c in counts.values())


def test_adding_problem_trivial_baseline():
    _, y = data.adding_problem(100000, 10, seed=2)
    mse = float(np.mean((y - 1.0) ** 2))
    assert abs(mse - data.ADDING_BASELINE_MSE) < 0.005
    assert abs(data.ADDING_BASELINE_MSE - 0.1667) < 1e-4


@given(n=st.integers(1, 30), T=st.integers(1, 50), seed=st.integers(0, 2**31))
def test_copy_memory_properties(n, T, seed):
    x, y = data.copy_memory(n, T, seed=seed)
    L = T + 20
    assert x.shape == y.shape == (L, n) and x.dtype == y.dtype == np.int32
    digits = x[:10]
    assert np.all((digits >= 1) & (digits <= 8))
    assert np.all(x[10:T + 9] == 0)            # T - 1 blanks
    assert np.all(x[T + 9] == 9)               # the delimiter at 0-based position T + 9
    assert np.all(x[T + 10:] == 9)             # TCN: the last 11 entries are all 9
    assert np.all(y[:T + 10] == 0)
    np.testing.assert_array_equal(y[-10:], digits)


def test_copy_memory_single_marker_variant_and_mem_length():
    x, y = data.copy_memory(5, 7, seed=0, repeat_marker=False)
    assert np.all(x[7 + 9] == 9) and np.all(x[7 + 10:] == 0)
    assert np.count_nonzero(x == 9) == 5
    x, y = data.copy_memory(3, 6, seed=0, mem_length=4, dtype=np.int64)
    assert x.shape == (6 + 8, 3) and x.dtype == np.int64
    np.testing.assert_array_equal(y[-4:], x[:4])


def test_copy_memory_baseline_is_the_uniform_guess_cross_entropy():
    T = 30
    _, y = data.copy_memory(200, T, seed=3)
    # the trivial predictor: certain 0 on the first T+10 positions, uniform over 1..8 on the last 10
    probs = np.zeros(y.shape + (10,))
    probs[:T + 10, :, 0] = 1.0
    probs[T + 10:, :, 1:9] = 1.0 / 8
    picked = np.take_along_axis(probs, y[..., None], axis=-1)[..., 0]
    ce = float(np.mean(-np.log(picked)))
    assert ce == pytest.approx(data.copy_memory_baseline(T), rel=1e-12)
    assert data.copy_memory_baseline(T) == pytest.approx(10 * math.log(8) / (T + 20))


def test_seeding():
    a = data.adding_problem(8, 20, seed=5)
    b = data.adding_problem(8, 20, seed=5)
    c = data.adding_problem(8, 20, seed=6)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    rng = np.random.default_rng(0)
    first, second = data.copy_memory(4, 10, seed=rng), data.copy_memory(4, 10, seed=rng)
    assert not np.array_equal(first[0], second[0])  # a shared Generator draws fresh batches


def test_bad_lengths():
    with pytest.raises(ValueError, match="T >= 2"):
        data.adding_problem(3, 1)
    with pytest.raises(ValueError, match="T >= 1"):
        data.copy_memory(3, 0)


def test_moving_digits_are_seeded_stay_on_the_canvas_and_move_as_described():
    from unroll.data import DIRECTIONS, describe, moving_digits
    rng = np.random.default_rng(3)
    images = rng.uniform(0.1, 1.0, (5, 8, 8))          # no zero pixel: the digit's box is visible
    labels = np.arange(5)
    clips = moving_digits(images, labels, 40, frames=6, canvas=14, seed=7)
    again = moving_digits(images, labels, 40, frames=6, canvas=14, seed=7)
    np.testing.assert_array_equal(clips.frames, again.frames)
    assert clips.frames.shape == (6, 40, 14, 14)
    for i in range(40):
        assert np.isclose(clips.frames[:, i].sum(axis=(1, 2)), images[clips.sources[i]].sum()).all()  # whole
        first_row, first_col, last_row, last_col = (np.nonzero(clips.frames[t, i].any(axis=a))[0][0]
                                                    for t in (0, 5) for a in (1, 0))
        moved = {"left": (0, -5), "right": (0, 5), "up": (-5, 0), "down": (5, 0)}[DIRECTIONS[clips.directions[i]]]
        assert (last_row - first_row, last_col - first_col) == moved
    assert describe(3, 0) == "three moves left"
    with pytest.raises(ValueError, match="canvas of at least 13"):
        moving_digits(images, labels, 2, frames=6, canvas=12)
