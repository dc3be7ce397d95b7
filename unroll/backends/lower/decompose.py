"""Named decompositions: an (op, dtype) written as plain scalar statements, which a target opts into.

`scalar.py`'s table writes tanh as `math.tanh(x)`: a library call per element, which keeps a loop
scalar on the CPU. A decomposition writes the op as arithmetic that LLVM vectorises. Each is a list
of statement templates in the syntax of `scalar.py` (Python, untyped float literals that
`Spelling.typed` types for the dtype) over `{x}` (the operand, a name), `{out}` (the result name;
temporaries are `{out}_<letter>`) and the primitives a target spells (PRIMITIVES; the Numba CPU
backend's are the intrinsics of cpu/intrinsics.py):

    {rint}(v)             v rounded to the nearest integer, as a float
    {fmuladd}(a, b, c)    a * b + c, never reassociated by fast-math flags (fused where FMA exists)
    {pow2}(n)             2**n for an integral float n of the normal exponent range
    {scale}(p, n)         p * 2**n rounded once, for |p| < 2 and -125 <= n <= 128 (-126 gives 0)
    {ldexp}(p, n)         p * 2**n rounded once, subnormal results too, for 0.5 <= |p| < 2 and
                          |n| <= 150 (a NaN p is not kept: the caller selects NaN back)

A target opts in by name: `opt_in("exp_f32", "tanh_f32")` is its (op, dtype) -> Decomposition table
(the Numba CPU backend takes all three below; float64 keeps the library calls).

All three share Cephes' range reduction: n = rint(y / ln 2) and r = y - n ln 2 in two fused steps
with ln 2 = C1 + C2, C1 = 0.693359375 (9 significant bits: n C1 and y - n C1 are exact), then
e^r - 1 = r + r^2 Q(r) on |r| <= ln 2 / 2 with Q of degree 4 (relative error 3.8e-9 with float32
coefficients; fitted by Lawson-weighted least squares on Chebyshev nodes), evaluated in Estrin's
form (a shorter dependency chain than Horner's: measured 2 % of an LSTM step). Errors, in ulps of
float32 against the correctly rounded result (the op in float64, rounded once), measured over 2e7
samples covering every float32 exponent from the smallest subnormal to overflow, and asserted by
tests/test_edge_values.py (`SWEEP_ULPS`; it also compares them with numpy at the edge values of
tests/edge_cases.py: signed zeros, subnormals, the saturation zone, infinities, NaN):

exp_f32 (<= 1 ulp): e^x = 2^n (1 + r + r^2 Q(r)), scaled by `ldexp`: results below 2^-126 are
  subnormals rounded once, not flushed; exactly 0 below -103.97 and inf from 88.72284, the same
  thresholds as libm's expf. x is clamped to [-104, 89] first, and NaN is selected back at the end.

sigmoid_f32 (<= 2 ulps): 1 / (1 + e^-x), the base table's formula and scipy's float32 expit's, so
  it saturates where numpy's does: exactly 1 where 1 + e^-x rounds to 1 (x >= 16.7), exactly 0
  where e^-x overflows (x <= -88.72284), subnormal results in between (sigmoid(-88) = 6.05e-39).
  e^-x = `scale`(e^-r, -n): x is clamped to [-89, 87] (above 87, e^-x < 2^-125 and 1 + e^-x is 1
  anyway), which keeps -n in scale's range; NaN propagates through the arithmetic. The bound holds
  above -88.72; below, the true value is a subnormal or 0 and numpy's float32 result is 0. scipy's
  expit is itself up to 2 ulps off, so the two differ by up to 4.

tanh_f32 (<= 3 ulps; <= 2 in all but 1 of the 2e7 samples): tanh(x) = -m / (2 + m) with m = expm1(-2x) = 2^n (e^r - 1) + (2^n - 1), the
  last add fused (2^n - 1 is exact): no cancellation near 0 (a subnormal x gives x exactly), no
  branch, no second polynomial, odd up to rounding. -2x is clamped to [-40, 40], where m is
  -1 or 2.4e17 and the result exactly -+1; it saturates by itself, exactly +-1 from |x| = 9.011
  (where float32 tanh rounds to 1) on. NaN propagates. The sign of a zero result is not kept
  (neither is it under fast-math's nsz).

The earlier CPU tanh, Eigen's clamped rational polynomial, was 5 ulps off on [1, 7] and never
reached +-1 (it stopped at 1 - 2.8e-7), and sigmoid as 0.5 + 0.5 tanh(x / 2) inherited that:
sigmoid(-100) was 1.2e-7 instead of 0, and the gradients of saturated LSTM gates were not 0.
Cost, measured on a 2-core AMD EPYC (znver3), 1024 float32 in L1, per element: sigmoid 0.79 ns and
tanh 0.80-0.83 ns (the Eigen tanh 0.64 ns, the tanh-based sigmoid 0.72 ns). In a float32 LSTM
training step (T, B, I, H) = (50, 16, 32, 64), one process, minimum of 480 steps: 1.65 ms with the
Eigen activations, 1.70 ms with these (the Numba CPU backend's `dims` mask, cpu/emit.py, bought
that back and more: 1.73 ms before both changes, 1.74 ms with these activations alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ...ir.ops import Op
from .scalar import Spelling

PRIMITIVES = ("rint", "fmuladd", "pow2", "scale", "ldexp")


@dataclass(frozen=True)
class Decomposition:
    """`op` at `dtype` as statements assigning `{out}` from the operand `{x}` (module docstring)."""

    name: str
    op: Op
    dtype: str
    templates: tuple[str, ...]

    def statements(self, spelling: Spelling, primitives: Mapping[str, str], operand: str, out: str) -> list[str]:
        """The statements with literals typed, primitives spelled and `{x}`/`{out}` bound. `operand`
        is read several times: pass a name or a literal, not an expression with side effects."""
        missing = set(PRIMITIVES) - set(primitives)
        assert not missing, f"{self.name}: the target spells no {sorted(missing)}"
        return [spelling.typed(t, self.dtype).format(x=operand, out=out, **primitives) for t in self.templates]


def _reduce(y: str) -> tuple[str, ...]:
    """n = rint(y / ln 2) and r = y - n ln 2 (Cephes' split ln 2, module docstring)."""
    return (f"{{out}}_n = {{rint}}({y} * 1.4426950408889634)",
            f"{{out}}_r = {{fmuladd}}({{out}}_n, -0.693359375, {y})",
            "{out}_r = {fmuladd}({out}_n, 2.12194440e-4, {out}_r)",
            "{out}_z = {out}_r * {out}_r")


# Q(r) and Q(-r) in Estrin's form: (q0 + q1 r) + z ((q2 + q3 r) + z q4), z = r^2
_Q = ("0.4999999403953552", "0.1666652113199234", "0.04166838526725769", "0.008368710055947304",
      "0.001381464535370469")


def _estrin(sign: str) -> str:
    return (f"(({_Q[0]} {sign} {_Q[1]} * {{out}}_r) + {{out}}_z * (({_Q[2]} {sign} {_Q[3]} * {{out}}_r)"
            f" + {{out}}_z * {_Q[4]}))")


_EXP_F32 = (
    "{out}_c = -104.0 if {x} < -104.0 else {x}",
    "{out}_c = 89.0 if {out}_c > 89.0 else {out}_c",
    *_reduce("{out}_c"),
    "{out}_p = {fmuladd}({out}_z, " + _estrin("+") + ", {out}_r) + 1.0",      # e^r
    "{out} = {ldexp}({out}_p, {out}_n)",
    "{out} = {x} if {x} != {x} else {out}",
)

_SIGMOID_F32 = (
    "{out}_c = 87.0 if {x} > 87.0 else {x}",
    "{out}_c = -89.0 if {out}_c < -89.0 else {out}_c",
    *_reduce("{out}_c"),
    "{out}_p = {fmuladd}({out}_z, " + _estrin("-") + ", -{out}_r) + 1.0",     # e^-r
    "{out} = 1.0 / (1.0 + {scale}({out}_p, -{out}_n))",
)

_TANH_F32 = (
    "{out}_y = {x} * -2.0",
    "{out}_y = -40.0 if {out}_y < -40.0 else {out}_y",
    "{out}_y = 40.0 if {out}_y > 40.0 else {out}_y",
    *_reduce("{out}_y"),
    "{out}_q = {fmuladd}({out}_z, " + _estrin("+") + ", {out}_r)",            # e^r - 1
    "{out}_s = {pow2}({out}_n)",
    "{out}_m = {fmuladd}({out}_q, {out}_s, {out}_s - 1.0)",                    # expm1(-2x)
    "{out} = {out}_m / (-2.0 - {out}_m)",
)

DECOMPOSITIONS: dict[str, Decomposition] = {d.name: d for d in (
    Decomposition("exp_f32", Op.EXP, "float32", _EXP_F32),
    Decomposition("sigmoid_f32", Op.SIGMOID, "float32", _SIGMOID_F32),
    Decomposition("tanh_f32", Op.TANH, "float32", _TANH_F32),
)}


def opt_in(*names: str) -> dict[tuple[Op, str], Decomposition]:
    """A target's decompositions, by name: (op, dtype) -> Decomposition."""
    unknown = set(names) - set(DECOMPOSITIONS)
    assert not unknown, f"no decompositions named {sorted(unknown)}; known: {sorted(DECOMPOSITIONS)}"
    return {(d.op, d.dtype): d for d in (DECOMPOSITIONS[n] for n in names)}


def _templates_are_complete() -> bool:
    """Every template names only {x}, {out} and PRIMITIVES (checked at import)."""
    import string
    allowed = {"x", "out", *PRIMITIVES}
    return all(field in allowed for d in DECOMPOSITIONS.values() for t in d.templates
               for _, field, _, _ in string.Formatter().parse(t) if field is not None)


assert _templates_are_complete(), "a decomposition names a field that is neither {x}, {out} nor a primitive"
