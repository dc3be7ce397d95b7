"""The CUDA backend without a GPU: numba's CUDA simulator, the multi-block grid emulator, and the
no-GPU error.

numba's simulator must be switched on (NUMBA_ENABLE_CUDASIM=1) before numba is first imported, and
the normal test process imports numba for the CPU backend. So the simulator checks (`SIM_CHECKS`)
run once, all together, in a child `python -m pytest` of this very file with the variable set
(`UNROLL_CUDASIM_CHILD=1` selects them there); in the normal process one test per check reports
that check's result from the child's junit XML. The simulator runs one Python thread per CUDA
thread, so sizes are tiny and kernels use one or two blocks of 32 threads; it cannot synchronize
blocks, so persistent kernels run there with one block. Multi-block persistent kernels (grid
barriers, work split, sync placement) are checked with `cuda.gridsim`, which runs all threads of
all blocks at once, in the normal process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable

import numpy as np
import pytest

import unroll as ur
from unroll.ir import build as b

CHILD = os.environ.get("UNROLL_CUDASIM_CHILD") == "1"
HERE = os.path.dirname(os.path.abspath(__file__))
SIM_CHECKS: dict[str, Callable[[], None]] = {}


def sim_check(fn: Callable[[], None]) -> Callable[[], None]:
    SIM_CHECKS[fn.__name__] = fn
    return fn


def reference(graph: ur.Graph, feeds: dict) -> list[np.ndarray]:
    out = ur.compile(graph, backend="numpy")(**feeds)
    return out if isinstance(out, list) else [out]


def assert_close(outs, refs, rtol=2e-5, atol=2e-6) -> None:
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        o, r = np.asarray(o), np.asarray(r)
        assert o.shape == r.shape and o.dtype == r.dtype, (o.shape, r.shape, o.dtype, r.dtype)
        if r.dtype.kind == "f":
            np.testing.assert_allclose(o, r, rtol=rtol, atol=atol)
        else:
            np.testing.assert_array_equal(o, r)


def training_graph(cell: str, T: int, B: int, I: int, H: int, dtype: str = "float32", seed: int = 0):
    """[loss, *grads] of an MSE loss on every step, and feeds for it."""
    import warnings

    from unroll.ir.autodiff import grad
    warnings.filterwarnings("ignore", message=".*both name a parameter.*")  # fresh models, same names
    rng = np.random.default_rng(seed)
    x = ur.input("x", (T, B, I), dtype)
    y = ur.input("y", (T, B, H), dtype)
    if cell == "tcn":
        model = ur.nn.TCN(I, [H, H], kernel_size=2, dtype=dtype)
        out = model(x)
    else:
        model = {"rnn": ur.nn.RNN, "lstm": ur.nn.LSTM, "gru": ur.nn.GRU}[cell](I, H, dtype=dtype)
        out, _ = model(x)
    loss = ur.mean((out - y) ** 2)
    params = list(model.parameters())
    graph = ur.graph(loss, *grad(loss, params))
    feeds = {"x": rng.standard_normal((T, B, I)).astype(dtype), "y": rng.standard_normal((T, B, H)).astype(dtype),
             **{k: v.astype(dtype) for k, v in model.state_dict().items()}}
    return graph, feeds, model


def elementwise_graph():
    x = ur.input("x", (3, 4))
    w = ur.input("w", (4,))
    ids = ur.input("ids", (3,), "int32")
    pos = x * x + 0.5
    outs = [
        ur.tanh(x) + ur.sigmoid(-x) * ur.relu(x) - ur.abs(x) / ur.sqrt(pos),
        ur.log(pos) + ur.exp(x * 0.1) + ur.log1p(pos) + ur.sign(x) + ur.recip(pos) + pos ** 1.5,
        ur.maximum(x, w) - ur.minimum(x, 0.25) + (x ** 2.0),
        ur.where(ur.greater(x, w), x, w * 2.0),
        ur.cast(ur.less_equal(x, 0.0), "float32") + ur.cast(ur.cast(x * 3.0, "int32"), "float32"),
        ur.pad(x, ((1, 0), (0, 2))),
        ur.concat([x, ur.transpose(ur.reshape(x, (4, 3)))[:3, :2] * 2.0], axis=1),
        ur.broadcast_to(w, (2, 3, 4)) + ur.reshape(x, (1, 3, 4)),
        ur.onehot(ids, 5) * 3.0,
        ur.argmax(x, axis=1),
        ur.sum(x * w, axis=1, keepdims=True) + ur.max(x, axis=0),
        ur.softmax(x, axis=-1),
        x[1:, ::2],
    ]
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((3, 4)).astype(np.float32),
             "w": rng.standard_normal(4).astype(np.float32),
             "ids": np.array([0, 4, 2], np.int32)}
    return ur.graph(*outs), feeds


# ---- checks run inside numba's CUDA simulator ------------------------------------------------

@sim_check
def fused_elementwise_kernels() -> None:
    graph, feeds = elementwise_graph()
    step = ur.compile(graph, backend="cuda", optimize=False)
    assert_close(step(**feeds), reference(graph, feeds), rtol=1e-5, atol=1e-6)
    assert "math.tanh" in step.impl.source and "float32(" in step.impl.source


@sim_check
def tiled_matmul_and_reductions() -> None:
    a = ur.input("a", (2, 9, 5))
    c = ur.input("c", (7, 5))
    big = ur.input("big", (3, 1200))
    w = ur.input("w", (200, 3))
    outs = [a @ c.T,                       # batched, operand read transposed through a view
            ur.transpose(a, (0, 2, 1)) @ ur.reshape(a[:, :, :4], (2, 9, 4)),
            w.T @ ur.tanh(w),              # long K, one output tile: split-K

            ur.sum(big, axis=1),           # chunked block reduction
            ur.max(big * -1.0, axis=(0, 1)),
            ur.mean(big, axis=0)]
    rng = np.random.default_rng(2)
    feeds = {"a": rng.standard_normal((2, 9, 5)).astype(np.float32),
             "c": rng.standard_normal((7, 5)).astype(np.float32),
             "big": rng.standard_normal((3, 1200)).astype(np.float32),
             "w": rng.standard_normal((200, 3)).astype(np.float32)}
    graph = ur.graph(*outs)
    step = ur.compile(graph, backend="cuda", optimize=False)
    notes = [s.note for s in step.impl.program.specs()]
    assert any(n.startswith("matmul") and "1 K split" not in n for n in notes), notes
    assert any("chunk(s)" in n and "1 chunk" not in n for n in notes), notes
    assert_close(step(**feeds), reference(graph, feeds), rtol=1e-4, atol=1e-5)


def _training_check(cell: str, **options) -> object:
    graph, feeds, _ = training_graph(cell, T=3, B=2, I=3, H=4)
    step = ur.compile(graph, backend="cuda", **options)
    assert_close(step(**feeds), reference(graph, feeds), rtol=1e-4, atol=1e-6)
    return step


@sim_check
def lstm_training_step_persistent() -> None:
    step = _training_check("lstm")
    paths = [p["path"] for p in step.impl.plan]
    assert paths == ["persistent", "persistent"], step.impl.plan
    assert any("shared memory" in w for p in step.impl.plan for w in p["weights"].values())


@sim_check
def gru_training_step_persistent() -> None:
    step = _training_check("gru")
    assert [p["path"] for p in step.impl.plan] == ["persistent", "persistent"]


@sim_check
def rnn_training_step_persistent() -> None:
    step = _training_check("rnn")
    assert [p["path"] for p in step.impl.plan] == ["persistent", "persistent"]


@sim_check
def gru_training_step_host_loop() -> None:
    step = _training_check("gru", persistent=False)
    assert [(p["path"], p["reason"]) for p in step.impl.plan] == [("host loop", "persistent=False")] * 2


@sim_check
def failed_persistent_kernel_falls_back_to_host_loop() -> None:
    from unroll.backends.cuda import runtime as rt
    real = rt.kernel

    def failing(spec):
        if spec.name.startswith("persistent"):
            raise RuntimeError("simulated compile failure")
        return real(spec)
    rt.kernel = failing
    try:
        step = _training_check("lstm")
    finally:
        rt.kernel = real
    assert [p["path"] for p in step.impl.plan] == ["host loop"] * 2
    assert all("simulated compile failure" in p["reason"] for p in step.impl.plan)


@sim_check
def tcn_training_step() -> None:
    graph, feeds, _ = training_graph("tcn", T=5, B=1, I=2, H=3)
    step = ur.compile(graph, backend="cuda")
    assert_close(step(**feeds), reference(graph, feeds), rtol=1e-4, atol=1e-6)


@sim_check
def float64_lstm_gradients() -> None:
    graph, feeds, _ = training_graph("lstm", T=2, B=1, I=2, H=3, dtype="float64")
    step = ur.compile(graph, backend="cuda")
    assert_close(step(**feeds), reference(graph, feeds), rtol=1e-11, atol=1e-13)


@sim_check
def nested_loop_runs_as_host_loop() -> None:
    x = ur.input("x", (3, 2, 2))
    w = ur.param("w", (2, 2), 0.5)

    def outer(h, xt):
        def inner(c, k):
            return ur.tanh(c @ w + xt), c
        c, _ = ur.scan(inner, h, length=2)
        return c, c
    h, ys = ur.scan(outer, ur.zeros((2, 2)), x)
    graph = ur.graph(ys, h)
    feeds = {"x": np.random.default_rng(3).standard_normal((3, 2, 2)).astype(np.float32),
             "w": np.full((2, 2), 0.3, np.float32)}
    step = ur.compile(graph, backend="cuda", optimize=False)
    assert step.impl.plan[0]["path"] == "host loop"
    assert step.impl.plan[0]["reason"] == "nested loop in the body"
    assert [p["path"] for p in step.impl.plan[0]["body"]] == ["persistent"]  # the inner loop
    assert_close(step(**feeds), reference(graph, feeds))


@sim_check
def lstm_training_loop_on_device() -> None:
    """Three SGD steps with the parameters kept as device arrays; device_outputs=True."""
    from numba import cuda
    graph, feeds, model = training_graph("lstm", T=3, B=2, I=2, H=3)
    names = [n for n in model.state_dict()]
    step = ur.compile(graph, backend="cuda", device_outputs=True)
    ref_step = ur.compile(graph, backend="numpy")
    dev = step.impl.to_device(feeds)
    host = dict(feeds)
    for _ in range(3):
        loss, *grads = step(**dev)
        ref_loss, *ref_grads = ref_step(**host)
        assert not isinstance(loss, np.ndarray) and hasattr(loss, "copy_to_host")
        np.testing.assert_allclose(loss.copy_to_host(), ref_loss, rtol=1e-5)
        for name, g, rg in zip(names, grads, ref_grads):
            new = dev[name].copy_to_host() - 0.5 * g.copy_to_host()
            dev[name] = cuda.to_device(new)
            host[name] = host[name] - np.float32(0.5) * rg
            np.testing.assert_allclose(new, host[name], rtol=1e-4, atol=1e-6)


@sim_check
def device_outputs_and_shapes() -> None:
    x = ur.input("x", (2, 3))
    graph = ur.graph(ur.sum(x), x * 2.0, x)
    step = ur.compile(graph, backend="cuda", device_outputs=True, copy_outputs=True)
    xv = np.arange(6, dtype=np.float32).reshape(2, 3)
    s, twice, same = step(x=xv)
    assert tuple(twice.shape) == (2, 3) and tuple(s.shape) == ()
    np.testing.assert_allclose(twice.copy_to_host(), xv * 2)
    np.testing.assert_allclose(same.copy_to_host(), xv)
    np.testing.assert_allclose(s.copy_to_host(), 15.0)


def _embedding_graph(V: int = 6):
    """onehot read three ways: as a value, cast into a matmul (an Embedding) and inside a loop step
    (its ids depend on the carry, so the onehot stays in the step)."""
    ids = ur.input("ids", (4, 3), "int32")
    emb = ur.nn.Embedding(V, 2, name="emb")
    w = ur.param("w_loop", (V, 2), 0.5)

    def cell(h, ids_t):
        k = ids_t + ur.argmax(h, axis=-1)  # ids_t <= 4 stay in range
        h = ur.tanh(ur.cast(ur.onehot(k, V), "float32") @ w + h)
        return h, h
    h, ys = ur.scan(cell, ur.zeros((3, 2)), ids)
    graph = ur.graph(ur.onehot(ids, V) * 2.0, emb(ids), ys, h)
    feeds = {"ids": np.array([[0, 1, 2], [3, 4, 0], [1, 1, 1], [4, 3, 2]], np.int32),
             "emb.weight": np.arange(2 * V, dtype=np.float32).reshape(V, 2) / 10,
             "w_loop": np.full((V, 2), 0.5, np.float32)}
    return graph, feeds


@sim_check
def out_of_range_onehot_ids_raise() -> None:
    """A kernel cannot raise: it flags the id, and the host raises IndexError after the call."""
    graph, feeds = _embedding_graph()
    step = ur.compile(graph, backend="cuda")
    assert_close(step(**feeds), reference(graph, feeds))
    assert any("err" in s.body for s in step.impl.program.specs())
    for bad in (6, -1):
        ids = feeds["ids"].copy()
        ids[2, 1] = bad
        with pytest.raises(IndexError, match=r"onehot: id -?\d+ is out of range for depth 6 \(expected 0 <= id < 6\)"):
            step(**{**feeds, "ids": ids})
    assert_close(step(**feeds), reference(graph, feeds))  # the flags were cleared
    unchecked = ur.compile(graph, backend="cuda", check_ids=False, device_outputs=True)
    ids = feeds["ids"].copy()
    ids[0, 0] = 7
    rows = unchecked(**{**feeds, "ids": ids})[0].copy_to_host()
    np.testing.assert_array_equal(rows[0, 0], np.zeros(6, np.float32))  # no raise: a zero row
    checked = ur.compile(graph, backend="cuda", device_outputs=True)
    with pytest.raises(IndexError, match="depth 6"):
        checked(**{**feeds, "ids": ids})


@sim_check
def reductions_and_argmax_propagate_nan_like_numpy() -> None:
    x = ur.input("x", (3, 5))
    big = ur.input("big", (2, 1500))
    xv = np.array([[1, np.nan, 3, np.nan, 0], [5, 7, 7, 1, -np.inf], [2, 9, 1, 9, np.nan]], np.float32)
    bigv = np.random.default_rng(4).standard_normal((2, 1500)).astype(np.float32)
    bigv[1, 1234] = np.nan
    graph = ur.graph(ur.max(x, axis=1), ur.max(x, axis=0), ur.argmax(x, axis=1), ur.argmax(x, axis=0),
                     ur.max(big, axis=1), ur.max(big), ur.maximum(x, 0.0), ur.minimum(x, 0.0))
    step = ur.compile(graph, backend="cuda", optimize=False)
    assert any("chunk(s)" in s.note and "1 chunk" not in s.note for s in step.impl.program.specs())
    for got, want in zip(step(x=xv, big=bigv), reference(graph, {"x": xv, "big": bigv})):
        np.testing.assert_array_equal(got, want)


if CHILD:
    @pytest.mark.parametrize("name", sorted(SIM_CHECKS))
    def test_in_simulator(name: str) -> None:
        SIM_CHECKS[name]()


# ---- the normal process: simulator results, emulator checks, errors --------------------------------

@pytest.fixture(scope="module")
def simulator_results(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """Run the simulator checks once in a child process; {check: (outcome, message)}."""
    report = tmp_path_factory.mktemp("cudasim") / "report.xml"
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "UNROLL_CUDASIM_CHILD": "1",
           "UNROLL_CACHE_DIR": str(tmp_path_factory.mktemp("cudasim_cache"))}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           f"--junitxml={report}", os.path.abspath(__file__), "-k", "test_in_simulator"],
                          env=env, cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=900)
    results: dict[str, tuple[str, str]] = {}
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            name = case.get("name", "")
            check = name[name.find("[") + 1:-1] if "[" in name else name
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            skip = case.find("skipped")
            if bad is not None:
                results[check] = ("failed", (bad.get("message") or "") + "\n" + (bad.text or ""))
            elif skip is not None:
                results[check] = ("skipped", skip.get("message") or "")
            else:
                results[check] = ("passed", "")
    results["__output__"] = ("", proc.stdout[-4000:] + proc.stderr[-4000:])
    return results


@pytest.mark.cudasim
@pytest.mark.skipif(CHILD, reason="runs in the parent process")
@pytest.mark.parametrize("name", sorted(SIM_CHECKS))
def test_simulator(name: str, simulator_results) -> None:
    outcome, message = simulator_results.get(name, ("missing", ""))
    if outcome == "skipped":
        pytest.skip(message)
    if outcome != "passed":
        pytest.fail(f"{name} in the CUDA simulator: {outcome}\n{message}\n"
                    f"child output:\n{simulator_results['__output__'][1]}", pytrace=False)


def _emulate(graph: ur.Graph, feeds: dict, blocks: int | None, **options) -> tuple[list, object]:
    from unroll.backends.cuda.gridsim import emulate_program
    from unroll.backends.cuda.kernels import Tuning
    from unroll.backends.cuda.loop import DeviceProps
    from unroll.backends.cuda.backend import build_program
    program = build_program(graph, DeviceProps(sm_count=8), blocks=blocks, threads=16,
                            tuning=Tuning(threads=16, max_blocks=2, mm_tile=(4, 4, 2, 2, 2), reduce_blocks=2),
                            **options)
    return emulate_program(program, [feeds[n.name] for n in program.inputs]), program


@pytest.mark.skipif(CHILD, reason="runs in the parent process")
@pytest.mark.parametrize("cell,blocks,sync", [("lstm", 2, "atomic"), ("lstm", 4, "atomic"), ("gru", 3, "atomic"),
                                              ("rnn", 4, "atomic"), ("lstm", 3, "cg")])
def test_multiblock_persistent_training_step(cell: str, blocks: int, sync: str) -> None:
    """G blocks really in parallel: grid barriers, the column split and sync placement."""
    graph, feeds, _ = training_graph(cell, T=3, B=2, I=3, H=8)
    outs, program = _emulate(graph, feeds, blocks, sync=sync)
    bodies = [s.body for s in program.specs() if s.name.startswith("persistent")]
    assert all(("grid.sync()" in b) == (sync == "cg") for b in bodies)
    plans = program.plan
    assert [(p["path"], p["blocks"], p["grid_syncs_per_step"]) for p in plans] == \
        [("persistent", blocks, 1)] * 2, plans
    assert_close(outs, reference(graph, feeds), rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(CHILD, reason="runs in the parent process")
def test_emulator_catches_missing_grid_barriers(monkeypatch) -> None:
    """Without its barriers the same kernel races: the emulator is able to see it."""
    from unroll.backends.cuda import loop as cuda_loop
    graph, feeds, _ = training_graph("lstm", T=3, B=2, I=3, H=8)
    monkeypatch.setattr(cuda_loop._Planner, "_place_syncs", lambda self, stages: None)
    wrong = 0
    for _ in range(3):
        outs, _ = _emulate(graph, feeds, 4)
        wrong += any(not np.allclose(o, r, rtol=1e-4, atol=1e-6) for o, r in zip(outs, reference(graph, feeds)))
        if wrong:
            break
    assert wrong


# random cells on 1-4 blocks and random graphs through every kernel kind: tests/test_properties.py


@pytest.mark.skipif(CHILD, reason="runs in the parent process")
def test_plan_is_built_without_a_device() -> None:
    from unroll.backends.cuda.loop import DeviceProps
    from unroll.backends.cuda.backend import build_program
    graph, _, _ = training_graph("lstm", T=50, B=16, I=32, H=64)
    program = build_program(graph, DeviceProps())
    fwd, bwd = program.plan
    assert fwd["path"] == bwd["path"] == "persistent"
    assert fwd["blocks"] > 1 and fwd["grid_syncs_per_step"] == 1 and bwd["grid_syncs_per_step"] == 1
    assert fwd["sync"] == "atomic" and fwd["shared_bytes"] <= DeviceProps().max_shared_bytes


@pytest.mark.skipif(CHILD, reason="runs in the parent process")
def test_no_gpu_gives_a_clear_error() -> None:
    code = ("import unroll as ur\n"
            "x = ur.input('x', (2,))\n"
            "try:\n"
            "    ur.compile(ur.tanh(x), backend='cuda')\n"
            "except Exception as err:\n"
            "    print(type(err).__name__, err)\n"
            "else:\n"
            "    print('compiled')\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(HERE), timeout=300).stdout
    if out.startswith("compiled"):
        pytest.skip("a GPU is present")
    assert out.startswith("CudaUnavailableError backend='cuda' needs an NVIDIA GPU; none was found"), out
    assert "backend='numba'" in out and "NUMBA_ENABLE_CUDASIM=1" in out


@pytest.mark.skipif(CHILD, reason="runs in the parent process")
def test_import_unroll_does_not_import_numba() -> None:
    code = "import sys, unroll; print(sorted(m for m in sys.modules if m.split('.')[0] == 'numba'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(HERE), timeout=300).stdout.strip()
    assert out == "[]", out


@pytest.mark.skipif(CHILD, reason="runs in the parent process")
def test_unknown_option_is_rejected() -> None:
    from unroll.backends.cuda.backend import build_program
    x = ur.input("x", (2,))
    with pytest.raises(TypeError, match="unknown options bogus"):
        build_program(b.tanh(x), bogus=1)


@pytest.mark.skipif(CHILD, reason="runs in the parent process")
def test_integer_and_bool_max_reductions_emulated() -> None:
    """max over ints starts from the dtype's minimum (inline and block reductions), argmax of ints."""
    x = ur.input("x", (3, 40), "int32")
    big = ur.input("big", (2, 300), "int64")
    mask = ur.input("mask", (3, 4), "bool")
    graph = ur.graph(ur.max(x, axis=1), ur.max(x), ur.max(big, axis=1), ur.argmax(x, axis=1),
                     ur.maximum(x, ur.cast(ur.const(-5.0, (3, 40)), "int32")), ur.max(mask, axis=1))
    rng = np.random.default_rng(5)
    feeds = {"x": rng.integers(-2**31, -2**31 + 1000, (3, 40)).astype(np.int32),
             "big": rng.integers(-2**62, 2**62, (2, 300)).astype(np.int64),
             "mask": np.array([[0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1]], bool)}
    outs, program = _emulate(graph, feeds, 1, optimize=False)
    assert any(s.name.startswith("red") for s in program.specs())
    for got, want in zip(outs, reference(graph, feeds)):
        np.testing.assert_array_equal(got, want)
