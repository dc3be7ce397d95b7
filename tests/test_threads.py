"""The BLAS thread policy of the Numba backend (unroll.backends.cpu.threads): one thread where the
work is small, the free cores where it is large, the user's setting always."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

import unroll as ur  # noqa: E402
from unroll.backends.cpu import backend, threads  # noqa: E402

_VARS = ("UNROLL_NUMBA_BLAS_THREADS", "UNROLL_NUMBA_BLAS_LOOP_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
         "UNROLL_MAX_THREADS")


@pytest.fixture
def adaptive(monkeypatch):
    for name in _VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_small_work_runs_on_one_thread(adaptive):
    assert threads.choose(threads.MIN_MACS_FOR_THREADS - 1) == (1, 1)


def test_large_work_takes_the_free_cores(adaptive):
    adaptive.setattr(threads._FREE, "cores", 4)
    adaptive.setattr(threads._FREE, "now", lambda: 4.0)
    assert threads.choose(threads.MIN_MACS_FOR_THREADS) == (4, 4)
    adaptive.setattr(threads._FREE, "now", lambda: 1.1)   # three cores busy elsewhere
    assert threads.choose(threads.MIN_MACS_FOR_THREADS) == (1, 1)
    adaptive.setattr(threads._FREE, "now", lambda: 0.0)   # fully loaded: still one
    assert threads.choose(threads.MIN_MACS_FOR_THREADS) == (1, 1)


def test_a_cap_keeps_both_rules(adaptive):
    """UNROLL_MAX_THREADS (what each MPI rank gets) bounds the count; small work still takes one
    thread and busy cores are still left alone."""
    adaptive.setattr(threads._FREE, "cores", 8)
    adaptive.setattr(threads._FREE, "now", lambda: 8.0)
    adaptive.setenv("UNROLL_MAX_THREADS", "3")
    assert threads.choose(threads.MIN_MACS_FOR_THREADS) == (3, 3)
    assert threads.choose(threads.MIN_MACS_FOR_THREADS - 1) == (1, 1)
    adaptive.setattr(threads._FREE, "now", lambda: 2.0)
    assert threads.choose(threads.MIN_MACS_FOR_THREADS) == (2, 2)


def test_the_users_setting_wins(adaptive):
    adaptive.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose(1) == (3, 3)
    adaptive.setenv("OPENBLAS_NUM_THREADS", "2")
    assert threads.choose(1) == (2, 2)
    adaptive.setenv("UNROLL_NUMBA_BLAS_LOOP_THREADS", "1")
    assert threads.choose(2 ** 40) == (2, 1)


def test_free_cores_are_measured_without_this_process():
    free = threads.FreeCores()
    free._last = (free._last[0] - 10.0, free._last[1], free._last[2]) if free._last else None
    value = free.now()
    assert 0.0 <= value <= free.cores


def test_largest_product_is_that_of_the_lowered_graph():
    T, B, I, H = 20, 4, 3, 5
    x = ur.input("x", (T, B, I))
    lstm = ur.nn.LSTM(I, H)
    out, _ = lstm(x)
    g = ur.graph(ur.sum(out))
    assert backend.largest_product(g) == B * H * 4 * H  # h @ W_hh^T per step (before hoisting)
    step = ur.compile(g, backend="numba")
    assert step.impl.max_macs == T * B * I * 4 * H   # after hoisting: the input projection
    assert np.isfinite(step(x=np.ones((T, B, I), np.float32), **lstm.state_dict()))
