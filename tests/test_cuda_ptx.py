"""Every kind of kernel the CUDA backend generates compiles to PTX for compute capability 8.0 and 9.0,
without a GPU: numba-cuda's compile_ptx with NVRTC from the `nvidia-cuda-nvrtc==13.0.*` wheel (the
`cuda` extra). Skipped, with the reason, where NVRTC or numba-cuda is missing or the simulator is on.

The kernels come from `build_program`, which plans for an H100 (132 SMs, 227 KB of shared memory)
without touching a device; persistent loops are forced to 2 blocks so the grid barrier is compiled.
The cooperative-groups barrier (sync="cg") needs a device even to compile (numba links cudadevrt),
so only the default atomic barrier is checked here; the GPU script checks both.
"""

from __future__ import annotations

import os
import re

import pytest

import unroll as ur

CCS = [(8, 0), (9, 0)]


def _nvrtc_problem() -> str | None:
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return "NUMBA_ENABLE_CUDASIM is set: compile_ptx is not available in the simulator"
    try:
        from numba import cuda
    except Exception as err:  # pragma: no cover - depends on the install
        return f"numba-cuda is not importable: {err}"

    def probe(a):
        a[0] = 1.0
    try:
        cuda.compile_ptx(probe, "void(float32[::1])", cc=(8, 0))
    except Exception as err:
        return f"compile_ptx does not work here (NVRTC missing? pip install 'nvidia-cuda-nvrtc==13.0.*'): {err}"
    return None


_PROBLEM = _nvrtc_problem()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")


def _program(graph, **options):
    from unroll.backends.cuda.loop import DeviceProps
    from unroll.backends.cuda.backend import build_program
    return build_program(graph, DeviceProps(), **options)


def _lstm_step(T=3, B=2, I=3, H=8):
    from unroll.ir.autodiff import grad
    x = ur.input("x", (T, B, I))
    y = ur.input("y", (T, B, H))
    lstm = ur.nn.LSTM(I, H)
    out, _ = lstm(x)
    loss = ur.mean((out - y) ** 2)
    return ur.graph(loss, *grad(loss, list(lstm.parameters())))


_PTX: dict[tuple[str, tuple[int, int]], str] = {}


def _ptx(spec, cc) -> str:
    """PTX of a generated kernel (memoized: several tests look at the same kernel)."""
    from numba import cuda

    from unroll.backends.cuda.runtime import python_function
    key = (spec.digest, cc)
    if key not in _PTX:
        _PTX[key], _ = cuda.compile_ptx(python_function(spec), spec.signature, cc=cc)
    return _PTX[key]


@pytest.fixture(scope="module")
def lstm_specs():
    program = _program(_lstm_step(), blocks=2)
    kinds: dict[str, object] = {}
    for spec in program.specs():
        kind = re.sub(r"\d+$", "", spec.name)
        if kind == "red" and spec.grid[1] > 1:
            kind = "red_chunked"
        kinds.setdefault(kind, spec)
    return kinds, program


def test_lstm_training_step_has_every_kernel_kind(lstm_specs) -> None:
    kinds, program = lstm_specs
    assert {"ew", "mm", "persistent_fwd", "persistent_bwd"} <= set(kinds), sorted(kinds)
    assert [p["blocks"] for p in program.plan] == [2, 2]


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm{cc[0]}{cc[1]}")
@pytest.mark.parametrize("kind", ["persistent_fwd", "persistent_bwd", "mm", "ew"])
def test_lstm_kernels_compile_to_ptx(lstm_specs, kind: str, cc) -> None:
    spec = lstm_specs[0][kind]
    ptx = _ptx(spec, cc)
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    assert ".entry" in ptx
    if kind.startswith("persistent"):
        assert "atom.global.add" in ptx            # the grid barrier's counter
        assert "bar.sync" in ptx or "barrier.sync" in ptx
        assert "membar.gl" in ptx or "fence.sc.gpu" in ptx or "fence.acq_rel.gpu" in ptx
        assert ".shared" in ptx                    # resident weight slices
    if kind == "mm":
        assert "ld.shared.f32" in ptx and "fma.rn.f32" in ptx


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm{cc[0]}{cc[1]}")
def test_chunked_reduction_compiles(cc) -> None:
    x = ur.input("x", (4, 5000))
    program = _program(ur.graph(ur.sum(x, axis=1), ur.max(x)), optimize=False)
    specs = [s for s in program.specs() if s.name.startswith("red")]
    assert specs and all(s.grid[1] > 1 for s in specs), [s.note for s in specs]
    ptx = _ptx(specs[0], cc)
    assert "atom.global.add" in ptx and ("membar.gl" in ptx or "fence" in ptx)


def test_elementwise_ops_compile() -> None:
    from test_cuda_sim import elementwise_graph
    graph, _ = elementwise_graph()
    program = _program(graph, optimize=False)
    for spec in program.specs():
        body = _ptx(spec, (9, 0)).split(".entry")[1]
        assert not re.search(r"\b(add|sub|mul|fma\.rn|div\.rn)\.f64\b", body), \
            f"float64 arithmetic in float32 kernel {spec.name}:\n{spec.body}"


def test_float32_kernels_do_no_float64_arithmetic(lstm_specs) -> None:
    spec = lstm_specs[0]["persistent_fwd"]
    body = _ptx(spec, (9, 0)).split(".entry")[1]
    assert not re.search(r"\b(add|mul|fma\.rn|div\.rn)\.f64\b", body), "float64 arithmetic in a float32 kernel"


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru", "tcn"])
def test_benchmark_sized_programs_compile(cell: str) -> None:
    """Every kernel of the benchmark's small training step, both targets (minutes: slow)."""
    from unroll.bench import unroll_model
    graph, _ = unroll_model(cell, 50, 16, 32, 64)
    for spec in _program(graph).specs():
        for cc in CCS:
            assert ".entry" in _ptx(spec, cc)


def test_onehot_id_checks_compile() -> None:
    """onehot's error buffer (int64 flag and id) in an elementwise kernel, a matmul operand and a
    persistent loop (2 blocks): every kernel compiles, and each check stores to its buffer."""
    from test_cuda_sim import _embedding_graph
    graph, _ = _embedding_graph()
    program = _program(graph, blocks=2)
    checked = [spec for spec in program.specs() if spec.checks]
    assert any(s.name.startswith("persistent") for s in checked), [s.name for s in checked]
    for spec in program.specs():
        body = _ptx(spec, (9, 0)).split(".entry")[1]
        if spec.checks:
            assert "st.global.u64" in body or "st.global.b64" in body, spec.body


def test_nan_rules_compile_without_float64() -> None:
    """max/argmax with numpy's NaN rules (selects, not `max`) stay float32 in every reduction kind."""
    x = ur.input("x", (4, 5000))
    y = ur.input("y", (3, 5))
    program = _program(ur.graph(ur.max(x, axis=1), ur.max(x), ur.max(y, axis=1), ur.argmax(y, axis=0)),
                       optimize=False)
    for spec in program.specs():
        assert "max(" not in spec.body.replace("cuda.atomic.max(", ""), spec.body
        body = _ptx(spec, (9, 0)).split(".entry")[1]
        assert not re.search(r"\b(add|sub|mul|fma\.rn|div\.rn|setp\.\w+)\.f64\b", body), spec.body
