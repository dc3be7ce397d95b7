"""Scalar expressions for elementwise ops: one base table, and each target's table derived from it.

Write kernel math once, JIT it twice (after minitorch): each entry of `SCALAR_EXPRS` is a Python
expression template over scalar operands `{0}`, `{1}`, `{2}` using only `math` functions, which
both `numba.njit` and `numba.cuda.jit` compile. A target does not edit it; it derives its own table
with explicit, reviewable overrides (tinygrad's `code_for_op = {**base, ...}`):

    CPU_EXPRS = derive({Op.TANH: ...})     # (the Numba CPU and CUDA tables override nothing today)

Numeric literals in a template (`1.0`, `0.5`) are written untyped; `Spelling.typed` rewrites them
for the operand dtype, because a bare `1.0` is a float64 and would promote float32 math to float64.
Named decompositions (float32 exp, sigmoid and tanh as vectorisable arithmetic instead of a libm
call per element) live in `decompose.py`; a target opts into them by op and dtype.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from ...ir.ops import ELEMENTWISE, FLOAT_DTYPES, Op

SCALAR_EXPRS: dict[Op, str] = {
    Op.NEG: "(-{0})",
    Op.EXP: "math.exp({0})",
    Op.LOG: "math.log({0})",
    Op.TANH: "math.tanh({0})",
    # numpy's sigmoid (scipy's expit): where exp(-x) overflows to inf, 1 / (1 + inf) is exactly the
    # saturated 0 numpy gives (float32: below x = -88.7); a two-branch form exp(x) / (1 + exp(x))
    # returned subnormals there instead (27 ulps from numpy at x = -100), and no branch is needed
    Op.SIGMOID: "(1.0 / (1.0 + math.exp(-{0})))",
    # NaN passes through (numpy's maximum(x, 0)); `0.0 * x`, which kept NaN too, made relu(-inf) NaN
    Op.RELU: "({0} if ({0} > 0.0) | ({0} != {0}) else 0.0)",
    Op.SQRT: "math.sqrt({0})",
    Op.ABS: "abs({0})",
    Op.SIGN: "(1.0 if {0} > 0.0 else (-1.0 if {0} < 0.0 else 0.0 * {0}))",
    Op.RECIP: "(1.0 / {0})",
    Op.LOG1P: "math.log1p({0})",
    # float32 stays float32: Numba types math.sin of a float32 as float32 (llvm.sin.f32, libm's
    # sinf), numba.cuda calls libdevice's __nv_sinf (full range reduction: no fast-math intrinsics)
    Op.SIN: "math.sin({0})",
    Op.COS: "math.cos({0})",
    Op.ADD: "({0} + {1})",
    Op.SUB: "({0} - {1})",
    Op.MUL: "({0} * {1})",
    Op.DIV: "({0} / {1})",
    Op.POW: "({0} ** {1})",
    # numpy's maximum/minimum propagate NaN from either side; a plain `max(a, b)` does not
    Op.MAX: "({0} if ({0} > {1}) | ({0} != {0}) else {1})",
    Op.MIN: "({0} if ({0} < {1}) | ({0} != {0}) else {1})",
    Op.LT: "({0} < {1})",
    Op.LE: "({0} <= {1})",
    Op.GT: "({0} > {1})",
    Op.GE: "({0} >= {1})",
    Op.EQ: "({0} == {1})",
    Op.NE: "({0} != {1})",
    Op.WHERE: "({1} if {0} else {2})",
    Op.STOP_GRADIENT: "{0}",
    Op.CAST: "{0}",  # the store into a typed array casts; targets spell explicit casts
}

assert set(SCALAR_EXPRS) == set(ELEMENTWISE), "every elementwise op needs a scalar expression"

# integer operands: the same ops without float literals (max/min need no NaN test)
INT_OVERRIDES: dict[Op, str] = {
    Op.RELU: "({0} if {0} > 0 else 0 * {0})",
    Op.SIGN: "(1 if {0} > 0 else (-1 if {0} < 0 else 0 * {0}))",
    Op.MAX: "({0} if {0} > {1} else {1})",
    Op.MIN: "({0} if {0} < {1} else {1})",
}


def derive(overrides: Mapping[Op, str], base: Mapping[Op, str] = SCALAR_EXPRS) -> dict[Op, str]:
    """A target's table: `base` with `overrides` (each must name an op the base has)."""
    unknown = set(overrides) - set(base)
    assert not unknown, f"overrides for ops the base table lacks: {unknown}"
    return {**base, **overrides}


_FLOAT_LITERAL = re.compile(r"(?<![\w.])(\d+\.\d*(?:e[-+]?\d+)?)")


@dataclass(frozen=True)
class Spelling:
    """How a target writes typed scalars: `prefix` + dtype name + `(value)`, e.g. `np.float32(0.5)`
    for Numba CPU source and `float32(0.5)` for numba.cuda source (which imports the type names)."""

    prefix: str
    inf: str = "math.inf"
    nan: str = "math.nan"

    def literal(self, value: object, dtype: str) -> str:
        """A typed constant: float32 literals must not promote float32 arithmetic to float64."""
        if dtype == "bool":
            return "True" if value else "False"
        if dtype not in FLOAT_DTYPES:
            return f"{self.prefix}{dtype}({int(value)})"  # type: ignore[call-overload]
        v = float(value)  # type: ignore[arg-type]
        text = (self.inf if v > 0 else f"-{self.inf}") if math.isinf(v) else self.nan if math.isnan(v) \
            else repr(v)
        return f"{self.prefix}{dtype}({text})"

    def typed(self, template: str, dtype: str) -> str:
        """`template` with its untyped float literals typed as `dtype` (float dtypes only)."""
        if dtype not in FLOAT_DTYPES:
            return template
        return _FLOAT_LITERAL.sub(lambda m: f"{self.prefix}{dtype}({m.group(1)})", template)

    def render(self, table: Mapping[Op, str], op: Op, operands: Sequence[str], dtype: str) -> str:
        """`op` applied to operand expressions, literals typed for the operands' dtype."""
        template = table[op]
        if dtype not in FLOAT_DTYPES:
            template = INT_OVERRIDES.get(op, template)
        return self.typed(template, dtype).format(*operands)


def render(op: Op, operands: Sequence[str]) -> str:
    """The base expression of `op` applied to operand expressions (names or sub-expressions).

    Operands that appear more than once in a template (sigmoid, relu, sign, max, min) should be
    plain names, not sub-expressions, so the backend binds them to locals first.
    """
    return SCALAR_EXPRS[op].format(*operands)
