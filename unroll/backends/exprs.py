"""Scalar expressions for elementwise ops: one table, rendered into both Numba CPU and CUDA kernels.

Write kernel math once, JIT it twice (after minitorch): each entry is a Python expression template
over scalar operands `{0}`, `{1}`, `{2}` using only `math` functions, which both `numba.njit` and
`numba.cuda.jit` compile. `render(op, operands)` fills a template.
"""

from __future__ import annotations

from typing import Sequence

from ..ir.ops import ELEMENTWISE, Op

SCALAR_EXPRS: dict[Op, str] = {
    Op.NEG: "(-{0})",
    Op.EXP: "math.exp({0})",
    Op.LOG: "math.log({0})",
    Op.TANH: "math.tanh({0})",
    # stable in both tails: never exponentiates a large positive number
    Op.SIGMOID: "(1.0 / (1.0 + math.exp(-{0})) if {0} >= 0.0 else math.exp({0}) / (1.0 + math.exp({0})))",
    Op.RELU: "({0} if {0} > 0.0 else 0.0 * {0})",
    Op.SQRT: "math.sqrt({0})",
    Op.ABS: "abs({0})",
    Op.SIGN: "(1.0 if {0} > 0.0 else (-1.0 if {0} < 0.0 else 0.0 * {0}))",
    Op.RECIP: "(1.0 / {0})",
    Op.LOG1P: "math.log1p({0})",
    Op.ADD: "({0} + {1})",
    Op.SUB: "({0} - {1})",
    Op.MUL: "({0} * {1})",
    Op.DIV: "({0} / {1})",
    Op.POW: "({0} ** {1})",
    Op.MAX: "max({0}, {1})",
    Op.MIN: "min({0}, {1})",
    Op.LT: "({0} < {1})",
    Op.LE: "({0} <= {1})",
    Op.GT: "({0} > {1})",
    Op.GE: "({0} >= {1})",
    Op.EQ: "({0} == {1})",
    Op.NE: "({0} != {1})",
    Op.WHERE: "({1} if {0} else {2})",
    Op.STOP_GRADIENT: "{0}",
    Op.CAST: "{0}",  # the store into a typed array casts; see backends for int casts
}

assert set(SCALAR_EXPRS) == set(ELEMENTWISE), "every elementwise op needs a scalar expression"


def render(op: Op, operands: Sequence[str]) -> str:
    """The scalar expression of `op` applied to operand expressions (names or sub-expressions).

    Operands that appear more than once in a template (sigmoid, relu, sign) should be plain names,
    not sub-expressions, so the backend binds them to locals first.
    """
    return SCALAR_EXPRS[op].format(*operands)
