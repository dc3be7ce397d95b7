"""Scalar expressions: the CPU's table derived from lower/scalar.py, its opted-in decompositions, and
the one spelling of typed literals (`SPELLING`)."""

from __future__ import annotations

from typing import Sequence

from ...ir.ops import Op
from ..lower import decompose
from ..lower.scalar import Spelling, derive

# typed literals as Numba CPU source writes them: np.float32(0.5), np.float32(np.inf)
SPELLING = Spelling("np.", inf="np.inf", nan="np.nan")


# The CPU's table is the base table: nothing in it needs another spelling for Numba. Casts are not
# table entries (they name the result dtype: scalar_statements spells np.<dtype>(x)), and float32
# exp, sigmoid and tanh are the named decompositions below.
CPU_EXPRS = derive({})


# float32 exp/sigmoid/tanh as arithmetic LLVM vectorises (math.exp/math.tanh are a libm call per
# element, which keeps the loop around them scalar); error bounds in lower/decompose.py
CPU_DECOMPOSITIONS = decompose.opt_in("exp_f32", "sigmoid_f32", "tanh_f32")


# how generated code spells the decompositions' primitives (cpu.intrinsics, imported by the module)
CPU_PRIMITIVES = {"rint": "np.rint", "fmuladd": "fmuladd", "pow2": "pow2", "scale": "scale", "ldexp": "ldexp"}


def np_dtype(dtype: str) -> str:
    return "bool_" if dtype == "bool" else dtype


def scalar_statements(op: Op, dtype: str, in_dtype: str, operands: Sequence[str], name: str) -> list[str]:
    """Statements assigning `name` = op(operands), `in_dtype` being the operands' dtype: the CPU
    table rendered through SPELLING (literals typed like the operands, so float32 math stays
    float32), explicit casts, and the opted-in decompositions."""
    if op is Op.CAST:
        return [f"{name} = np.{np_dtype(dtype)}({operands[0]})"]
    decomposition = CPU_DECOMPOSITIONS.get((op, in_dtype))
    if decomposition is not None:
        return decomposition.statements(SPELLING, CPU_PRIMITIVES, operands[0], name)
    return [f"{name} = {SPELLING.render(CPU_EXPRS, op, operands, in_dtype)}"]


def max_text(a: str, b: str, dtype: str) -> str:
    """max(a, b) as the table spells it for `dtype` (a NaN-propagating select for floats)."""
    return SPELLING.render(CPU_EXPRS, Op.MAX, [a, b], dtype)
