"""The checklist for adding an op (docs/ARCHITECTURE.md), enforced: every table keyed by op covers
every op it must, with the op list derived from `Op` itself. A new op fails here, naming the table,
until every step of the checklist is done."""

from __future__ import annotations

import pytest

from unroll.backends import numpy_ref
from unroll.backends.lower import index, scalar
from unroll.ir import autodiff, build, hoist, semantics, text
from unroll.ir.ops import (ARITY, BINARY, COMPARE, ELEMENTWISE, LEAVES, MOVEMENT, MULTI_OUTPUT, REDUCE, TYPE_RULES,
                           UNARY, Op)

ALL = frozenset(Op)
# ops that come from structure (graph inputs, loop arguments, constants, loops and their outputs,
# fused kernels), not from a builder's type rule
STRUCTURAL = LEAVES | MULTI_OUTPUT | {Op.PROJ}
FEEDS = frozenset({Op.INPUT, Op.PARAM, Op.ARG})   # values come from the caller, not from an op
COMPUTED = ALL - STRUCTURAL                        # ops a builder makes


def _missing(table: object, wanted: frozenset) -> set:
    return set(wanted) - set(table)  # type: ignore[call-overload]


def test_groups_partition_the_computed_ops():
    groups = [UNARY, BINARY, COMPARE, REDUCE, MOVEMENT,
              frozenset({Op.WHERE, Op.CAST, Op.STOP_GRADIENT, Op.MATMUL, Op.ARGMAX, Op.ONEHOT})]
    assert sum(len(g) for g in groups) == len(COMPUTED) and frozenset().union(*groups) == COMPUTED


@pytest.mark.parametrize("name,table,wanted", [
    ("ir/ops.py ARITY", ARITY, ALL),
    ("ir/ops.py TYPE_RULES", TYPE_RULES, COMPUTED),
    ("ir/semantics.py ELEMENTWISE_IMPLS", semantics.ELEMENTWISE_IMPLS, ELEMENTWISE - {Op.CAST}),
    ("ir/semantics.py STRUCTURAL_IMPLS + ELEMENTWISE_IMPLS",
     {**semantics.ELEMENTWISE_IMPLS, **semantics.STRUCTURAL_IMPLS}, COMPUTED - {Op.ONEHOT}),
    ("backends/numpy_ref.py IMPLS", numpy_ref.IMPLS, ALL - FEEDS),
    ("ir/hoist.py BATCH_RULES", hoist.BATCH_RULES, COMPUTED),
    ("backends/lower/scalar.py SCALAR_EXPRS", scalar.SCALAR_EXPRS, ELEMENTWISE),
])
def test_every_table_covers_its_ops(name, table, wanted):
    assert not _missing(table, wanted), f"{name} lacks {sorted(op.name for op in _missing(table, wanted))}"


def test_every_op_has_a_vjp_or_is_listed_as_not_differentiable():
    vjps, nondiff, structural = set(autodiff.VJPS), autodiff.NON_DIFFERENTIABLE, autodiff.STRUCTURAL
    assert not vjps & nondiff, "an op cannot both have a VJP and be non-differentiable"
    missing = ALL - vjps - nondiff - structural
    assert not missing, f"ir/autodiff.py: no VJP and not NON_DIFFERENTIABLE: {sorted(o.name for o in missing)}"


def test_printed_attributes_parse_back():
    assert set(text.ATTR_TEXT) == set(text.ATTR_PARSE), "ir/text.py: ATTR_TEXT and ATTR_PARSE differ"
    for op in COMPUTED - ELEMENTWISE - {Op.MATMUL}:  # ops whose arg is not None print it
        assert op in text.ATTR_TEXT, f"ir/text.py ATTR_TEXT lacks {op.name}"


def test_index_maps_cover_the_ops_read_element_by_element():
    pointwise = getattr(index, "POINTWISE_READS", None)
    assert pointwise is not None and not _missing(pointwise, MOVEMENT - {Op.CONCAT, Op.PAD} | ELEMENTWISE), \
        "backends/lower/index.py POINTWISE_READS lacks ops"


def test_both_compiled_targets_lower_every_op():
    pytest.importorskip("numba")
    from unroll.backends.cpu.emitters import EMITTERS
    from unroll.backends.cuda.codegen import INLINE_OPS
    assert not _missing(EMITTERS, ALL - FEEDS), "backends/cpu EMITTERS lacks ops"
    # CUDA: everything not inlined is materialised by the program builder (loops, fused, proj)
    assert not _missing(INLINE_OPS, COMPUTED | {Op.CONST}), "backends/cuda INLINE_OPS lacks ops"


def test_every_computed_op_has_a_builder():
    makes = {op for op in COMPUTED if any(callable(getattr(build, n, None)) for n in _builder_names(op))}
    assert makes == COMPUTED, f"ir/build.py has no builder for {sorted(o.name for o in COMPUTED - makes)}"


def _builder_names(op: Op) -> list[str]:
    # the builder's name is the op's value, or the numpy name where the op's value is shorter
    aliases = {Op.LT: "less", Op.LE: "less_equal", Op.GT: "greater", Op.GE: "greater_equal",
               Op.EQ: "equal", Op.NE: "not_equal", Op.BROADCAST: "broadcast_to", Op.SLICE: "slice_axis",
               Op.REDUCE_MAX: "max"}
    return [op.value, aliases.get(op, op.value)]
