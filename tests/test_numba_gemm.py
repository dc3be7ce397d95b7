"""The packed-weight micro-kernel (backends.cpu.gemm) equals numpy's product on random shapes: partial
panels, K across chunk boundaries, row blocks of every size, transposed weights, accumulation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from numba import njit  # noqa: E402

from unroll.backends.cpu.gemm import pack_panels, packed_gemm  # noqa: E402
from unroll.backends.cpu.kernels_ir import KC, MR, packed_size, panel_width  # noqa: E402


@njit(cache=False)
def _packed_product(w, transposed, a, a_transposed, c, accumulate, packed):
    pack_panels(w, transposed, packed)
    packed_gemm(a, a_transposed, packed, c, accumulate)


def _run(a: np.ndarray, w: np.ndarray, transposed: bool, c: np.ndarray, accumulate: bool,
         a_transposed: bool = False) -> np.ndarray:
    k, n = w.shape
    bits = 8 * a.dtype.itemsize
    packed = np.full(packed_size(k, n, bits), np.nan, a.dtype)   # NaN: reading an unpacked slot shows
    stored = np.ascontiguousarray(w.T) if transposed else w
    a_stored = np.ascontiguousarray(a.T) if a_transposed else a
    _packed_product(stored, int(transposed), a_stored, int(a_transposed), c, int(accumulate), packed)
    return c


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 3 * MR + 1), k=st.sampled_from([1, 3, 16, KC - 1, KC, KC + 1, 2 * KC + 5]),
       n=st.integers(1, 3 * panel_width(32) + 3), transposed=st.booleans(), a_transposed=st.booleans(),
       accumulate=st.booleans(), dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 2 ** 16))
def test_packed_gemm_equals_numpy(m, k, n, transposed, a_transposed, accumulate, dtype, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(dtype)
    w = rng.standard_normal((k, n)).astype(dtype)
    c0 = rng.standard_normal((m, n)).astype(dtype)
    got = _run(a, w, transposed, c0.copy(), accumulate, a_transposed)
    want = (c0 if accumulate else 0) + a.astype(np.float64) @ w.astype(np.float64)
    tol = 1e-4 * (k + 1) if dtype == "float32" else 1e-10 * (k + 1)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_packed_gemm_leaves_other_columns_alone():
    """A product into a view of a wider buffer (a gate slice) writes exactly its own columns."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 20)).astype(np.float32)
    w = rng.standard_normal((20, 21)).astype(np.float32)
    c = np.full((5, 21), 7.0, np.float32)
    _run(a, w, False, c, False)
    np.testing.assert_allclose(c, a @ w, rtol=1e-5, atol=1e-5)


def test_packed_gemm_rejects_non_contiguous_arrays():
    """The kernel assumes unit inner strides: a strided view does not type (Numba raises), it is
    never silently read with the wrong stride."""
    from numba.core.errors import TypingError
    a = np.ones((4, 8), np.float32)[:, ::2]
    w = np.ones((4, 16), np.float32)
    with pytest.raises(TypingError):
        _run(a, w, False, np.zeros((4, 16), np.float32), False)
