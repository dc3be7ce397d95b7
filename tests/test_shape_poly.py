"""Shape-polymorphic graphs (issue #14): `ur.input("x", ("T", "B", 8))` names sizes, everything built
from it carries them, and one compiled step runs every T and batch size.

Checked: the size algebra (ir/dims.py); the types and text of a symbolic LSTM training graph; for
RNN/LSTM/GRU steps at random (T, B), the symbolic graph's results equal those of the same model
built with concrete sizes, on the numpy reference and on Numba, with one Numba compile for all
sizes; feeds that disagree about a size; and the clear errors where a size must be concrete."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import unroll as ur
from unroll.ir.dims import Dim, SymbolicSizeError, evaluate, exact_quotient
from unroll.ir.specialize import SizeMismatchError

T, B = Dim.symbol("T"), Dim.symbol("B")


# ---- the size algebra ----------------------------------------------------------------------------

def test_sizes_are_polynomials_compared_structurally():
    assert T * B == B * T and str(T * B * 8) == "8*B*T"
    assert T != 8 and T != B and hash(T * B) == hash(B * T)
    assert (T + 1) - 1 == T and T - T == 0 and isinstance(T - T, int)
    assert exact_quotient(8 * T * B, 8) == T * B and exact_quotient(T * B, B) == T
    assert exact_quotient(T + 1, 2) is None
    assert evaluate((T, T * B + 2, 1.0 / (T * B)), {"T": 3, "B": 2}) == (3, 8, 1.0 / 6)


def test_order_is_answered_where_it_holds_for_every_size():
    assert T >= 1 and T + 1 > T and T - 1 >= 0 and not (T < 1)
    with pytest.raises(SymbolicSizeError, match="depends on the values of B, T"):
        _ = T >= B
    with pytest.raises(SymbolicSizeError, match="concrete value of the symbolic size T"):
        range(T)
    with pytest.raises(SymbolicSizeError, match="not a whole size"):
        _ = T // 3


# ---- building ------------------------------------------------------------------------------------

def _model(kind: str, shape_x, shape_y, module=None):
    """[loss, *grads] of an RNN/LSTM/GRU step (or of `module` again, on inputs of other shapes)."""
    x, y = ur.input("x", shape_x), ur.input("y", shape_y)
    if module is None:
        module = {"rnn": ur.nn.RNN, "lstm": ur.nn.LSTM, "gru": ur.nn.GRU}[kind](8, 16)
    out, _ = module(x)
    loss = ur.mean((out - y) ** 2)
    params = list(module.parameters())
    return [loss, *ur.grad(loss, params)], module


def test_symbols_flow_through_types_and_text():
    outs, _ = _model("lstm", ("T", "B", 8), ("T", "B", 16))
    assert str(outs[0].type) == "f32[]" and all(not ur.ir.dims.is_symbolic(g.shape) for g in outs[1:])
    text = str(ur.graph(outs))
    assert 'input "x" : f32[T,B,8]' in text and "loop length=T" in text
    assert "const 1.0/(16*B*T) : f32[]" in text     # the mean's 1/count stays symbolic
    x = ur.input("x", ("T", "B", 8))
    assert str(x.reshape(-1, 8).type) == "f32[B*T,8]"
    assert str(x[1:].type) == "f32[T-1,B,8]" and str(x[-1].type) == "f32[B,8]"


def test_a_parameter_shape_must_be_concrete():
    with pytest.raises(ur.ShapeError, match="a parameter's shape is fixed"):
        ur.param("w", ("H", 4))


def test_operations_that_need_a_concrete_size_say_so():
    outs, _ = _model("rnn", ("T", "B", 8), ("T", "B", 16))
    with pytest.raises(SymbolicSizeError, match="depends on the values of T: this operation cannot be built"):
        ur.truncate(outs[0], 3)


# ---- running: every size, one compile --------------------------------------------------------------

SIZES = st.tuples(st.integers(2, 9), st.integers(2, 6))   # coincidences (T == B, B*T == 8) included


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
@settings(max_examples=3, deadline=None, derandomize=True)
@given(sizes=st.lists(SIZES, min_size=2, max_size=3, unique=True))
def test_one_step_for_every_size_equals_the_concrete_graph(kind, sizes, fresh_cache_dir):
    from unroll.backends.cpu import backend as numba_cpu
    outs, module = _model(kind, ("T", "B", 8), ("T", "B", 16))
    poly = {b: ur.compile(outs, backend=b) for b in ("numpy", "numba")}
    rng = np.random.default_rng(0)
    compiles = []
    for t, b in sizes:
        feeds = dict(x=rng.standard_normal((t, b, 8)), y=rng.standard_normal((t, b, 16)), **module.state_dict())
        concrete_outs, _ = _model(kind, (t, b, 8), (t, b, 16), module)   # the same parameters
        expected = ur.compile(concrete_outs, backend="numpy")(**feeds)
        got_ref = poly["numpy"](**feeds)
        before = (numba_cpu.STATS["numba_compiles"] + numba_cpu.STATS["native_compiles"])
        got = poly["numba"](**feeds)
        compiles.append((numba_cpu.STATS["numba_compiles"] + numba_cpu.STATS["native_compiles"]) - before)
        for e, r, n in zip(expected, got_ref, got):
            np.testing.assert_array_equal(r, e)                  # the reference: the same graph
            np.testing.assert_allclose(n, e, rtol=2e-4, atol=2e-5)
    assert sum(compiles[1:]) == 0, f"a new size recompiled: {compiles}"


@pytest.mark.parametrize("codegen", ["native", "numba"])
def test_coinciding_sizes_share_the_module_and_a_size_of_one_has_its_own(codegen, fresh_cache_dir, monkeypatch):
    """T == B, B*T == I and T == I merge no names (the first specialisation's generation is
    replayed); a size of 1 is written as a literal, so it is a module of its own (compiled once).
    On both compilers of the CPU backend: the native renderer and Numba (UNROLL_CPU_CODEGEN=numba)."""
    from unroll.backends.cpu import backend as numba_cpu
    monkeypatch.setenv("UNROLL_CPU_CODEGEN", codegen)
    outs, module = _model("lstm", ("T", "B", 8), ("T", "B", 16))
    run = ur.compile(outs, backend="numba")
    ref = ur.compile(outs, backend="numpy")
    rng = np.random.default_rng(1)
    compiles = {}
    for t, b in [(5, 3), (2, 2), (2, 4), (8, 8), (3, 1), (4, 1), (9, 4)]:
        feeds = dict(x=rng.standard_normal((t, b, 8)), y=rng.standard_normal((t, b, 16)), **module.state_dict())
        before = (numba_cpu.STATS["numba_compiles"] + numba_cpu.STATS["native_compiles"])
        got = run(**feeds)
        compiles[(t, b)] = (numba_cpu.STATS["numba_compiles"] + numba_cpu.STATS["native_compiles"]) - before
        for g, e in zip(got, ref(**feeds)):
            np.testing.assert_allclose(g, e, rtol=2e-4, atol=2e-5)
    # the first sizes compile the canonical module (0 when this process compiled it already), the
    # first size of 1 its own; everything else reuses one of the two
    assert compiles[(5, 3)] <= 1 and compiles[(3, 1)] <= 1, compiles
    assert all(n == 0 for sizes, n in compiles.items() if sizes not in ((5, 3), (3, 1))), compiles
    shared = [run.specializations[(("B", b), ("T", t))].impl.dispatcher for t, b in [(2, 2), (2, 4), (8, 8), (9, 4)]]
    assert all(d is run.template.impl.dispatcher for d in shared)
    assert run.template.impl.path.endswith(".o" if codegen == "native" else ".py"), run.template.impl.path


def test_feeds_that_disagree_about_a_size_name_both_inputs():
    outs, module = _model("rnn", ("T", "B", 8), ("T", "B", 16))
    run = ur.compile(outs, backend="numpy")
    with pytest.raises(SizeMismatchError, match=r"'x' has T = 5 \(axis 0\) but 'y' has 6 on axis 0"):
        run(x=np.zeros((5, 3, 8)), y=np.zeros((6, 3, 16)), **module.state_dict())
    with pytest.raises(ur.FeedError, match="expected 8 on axis 2"):
        run(x=np.zeros((5, 3, 7)), y=np.zeros((5, 3, 16)), **module.state_dict())


def test_a_size_only_inside_a_product_cannot_be_read():
    x = ur.input("x", (T * B, 8))
    run = ur.compile(ur.sum(x), backend="numpy")
    with pytest.raises(SizeMismatchError, match="cannot be read from the feeds"):
        run(x=np.zeros((6, 8)))


def test_slices_of_a_symbolic_axis_run_at_every_length():
    x = ur.input("x", ("T", 3))
    run = ur.compile([x[1:] - x[:-1], x[-1]], backend="numpy")
    for t in (2, 5):
        v = np.arange(3 * t, dtype=np.float32).reshape(t, 3)
        diff, last = run(x=v)
        np.testing.assert_array_equal(diff, v[1:] - v[:-1])
        np.testing.assert_array_equal(last, v[-1])
