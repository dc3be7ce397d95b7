"""Edge values and allowed errors for every elementwise op, shared by the per-backend edge tests.

The values are the ones where implementations drift apart: signed zeros, subnormals, tiny and huge
magnitudes, the saturation zone of tanh/sigmoid (|x| around 20), infinities and NaN. A backend's
result is compared with numpy's float32 result (the reference interpreter's) in ulps of float32:

- `ulp_distance(a, b)` counts representable float32 values between a and b (0 for equal values,
  +0 and -0 equal; NaN only matches NaN; infinities only match themselves);
- `MAX_ULPS[op]` is the allowed distance: exact (0) for arithmetic, comparisons, selects and
  movement; a few ulps for transcendental ops, whose float32 versions differ between libm, Eigen-
  style polynomials and CUDA's intrinsics, while the saturated results (tanh -> +-1, sigmoid -> 0/1,
  exp -> 0/inf) must be exact because the tolerance is in ulps of the reference itself.

`UNARY_X` feeds one-operand ops; binary ops get every pair of `BINARY_VALUES` (a smaller set: the
pairs grow quadratically). `reference(op, *xs)` is numpy's float32 meaning.
"""

from __future__ import annotations

import numpy as np

from unroll.ir.ops import BINARY, COMPARE, UNARY, Op

_TINY = float(np.finfo(np.float32).tiny)       # smallest normal
_SUB = float(np.float32(1e-45))                 # smallest subnormal
EDGE_MAGNITUDES = [0.0, _SUB, 1e-40, _TINY, 1e-30, 0.5, 1.0, 2.0, 9.0, 20.0, 88.0, 100.0, 1e4, 1e30,
                   float("inf")]
UNARY_X = np.array([s * m for m in EDGE_MAGNITUDES for s in (1.0, -1.0)] + [float("nan")], np.float32)
BINARY_VALUES = np.array([0.0, -0.0, 1e-40, -1e-30, 1.0, -1.0, 2.5, -20.0, 1e4, 1e30, -1e30,
                          float("inf"), -float("inf"), float("nan")], np.float32)

# allowed float32 ulps between a backend and numpy's float32 result
MAX_ULPS: dict[Op, int] = {
    **{op: 0 for op in BINARY | COMPARE},
    Op.NEG: 0, Op.ABS: 0, Op.SIGN: 0, Op.RELU: 0, Op.SQRT: 1, Op.RECIP: 0,
    Op.EXP: 4, Op.LOG: 4, Op.LOG1P: 4, Op.TANH: 4, Op.SIGMOID: 4,
    # sin/cos: measured 1 ulp on Numba (sinf/cosf) and on the CUDA simulator (double, rounded),
    # 0 at +-1e30 (numpy's float32 loop reduces |x| > 117435 / 71476 through libm, exactly).
    # The bound is what the worst cases allow, not what was measured: numpy's float32 loop is
    # within 1.49 ulps of the exact value and libdevice's sinf/cosf within 2 (CUDA guide),
    # so a GPU may sit 3 ulps from numpy
    Op.SIN: 3, Op.COS: 3,
    Op.POW: 4,
}
assert set(MAX_ULPS) == UNARY | BINARY | COMPARE


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise float32 ulps between a and b; a huge number where exactly one is NaN or where
    an infinity meets a different value."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)

    def ordered(x: np.ndarray) -> np.ndarray:  # monotone map of float32 onto int64, +0 == -0
        i = x.view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)

    dist = np.abs(ordered(a) - ordered(b))
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    dist = np.where(nan_a & nan_b, 0, dist)
    dist = np.where(nan_a ^ nan_b, 2**40, dist)
    inf_mismatch = (np.isinf(a) | np.isinf(b)) & (a != b) & ~(nan_a | nan_b)
    return np.where(inf_mismatch, 2**40, dist)


def binary_operands() -> tuple[np.ndarray, np.ndarray]:
    """Every ordered pair of BINARY_VALUES, as two flat arrays."""
    a, b = np.meshgrid(BINARY_VALUES, BINARY_VALUES, indexing="ij")
    return a.ravel().copy(), b.ravel().copy()


def operands(op: Op) -> list[np.ndarray]:
    """The float32 inputs an edge test feeds to `op`."""
    return [UNARY_X.copy()] if op in UNARY else list(binary_operands())


def worst(op: Op, got: np.ndarray, expected: np.ndarray, xs: list[np.ndarray]) -> tuple[int, str]:
    """(max ulp distance, a description of the worst input) for one op's results."""
    if got.dtype == np.bool_ or expected.dtype == np.bool_:
        bad = np.asarray(got) != np.asarray(expected)
        dist = np.where(bad, 2**40, 0)
    else:
        dist = ulp_distance(got, expected)
    k = int(np.argmax(dist))
    where = ", ".join(f"{x[k]!r}" for x in xs)
    return int(dist[k]), f"{op.value}({where}) = {got[k]!r}, numpy {expected[k]!r}"
