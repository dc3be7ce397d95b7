"""The native renderer (cpu/native.py): the CPU backend's generated source compiled by LLVM without
Numba's front end. Its equivalence with the numpy reference on random graphs is test_properties'
(the backend's default path); here: the models compile natively (no fallback), the language's
corners, the fallback to Numba, buffer ownership, and the object cache's key."""

from __future__ import annotations

import gc
import json
import os
import re
import resource
import subprocess
import sys

import numpy as np
import pytest

import unroll as ur
from unroll.backends import numpy_ref
from unroll.backends.cpu import backend as numba_cpu
from unroll.backends.cpu import native


@pytest.fixture(autouse=True, scope="module")
def cache_dir(fresh_cache_dir):
    yield


def _run(graph: ur.Graph, feeds: dict) -> tuple[list, list]:
    args = [feeds[n] for n in graph.input_names]
    return numba_cpu.compile_graph(graph)(args), numpy_ref.compile_graph(graph)(args)


def _close(got: list, want: list, rtol: float = 2e-5) -> None:
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru", "tcn"])
def test_training_steps_compile_natively(cell):
    from unroll.bench import make_data, unroll_model
    graph, model = unroll_model(cell, 7, 3, 4, 5)
    x, y = make_data(7, 3, 4, 5)
    before = numba_cpu.STATS["native_unsupported"] + numba_cpu.STATS["native_failed"]
    got, want = _run(graph, {"x": x, "y": y, **model.state_dict()})
    assert numba_cpu.STATS["native_unsupported"] + numba_cpu.STATS["native_failed"] == before, \
        native.LAST_UNSUPPORTED[0]
    _close(got, want, 1e-4)


def test_language_corners():
    """Division by zero, int/float promotion, bool arrays, a scalar output, integer
    casts, a reduction over an empty axis, a reshape whose index arithmetic divides and takes
    remainders."""
    a = ur.input("a", (6,), "int32")
    b = ur.input("b", (6,), "int32")
    m = ur.input("m", (6,), "bool")
    x = ur.input("x", (6, 0))
    outs = [ur.cast(a, "float32") / ur.cast(b, "float32"), ur.cast(a, "float32") * 0.5, ur.where(m, a, b), ur.sum(ur.cast(a, "float64")),
            ur.sum(x, axis=1), ur.cast(ur.cast(a, "float32") / 3.0, "int8"),
            ur.transpose(ur.reshape(ur.cast(a, "float32"), (2, 3))) * 2.0, ur.less(a, b)]
    feeds = {"a": np.array([-7, 7, -7, 7, 0, 5], np.int32), "b": np.array([2, -2, -2, 2, 3, 0], np.int32),
             "m": np.array([1, 0, 1, 1, 0, 1], bool), "x": np.zeros((6, 0), np.float32)}
    got, want = _run(ur.graph(outs), feeds)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def test_unsupported_source_falls_back_to_numba(monkeypatch):
    def refuse(self, source):
        raise native.Unsupported("refused by the test")
    monkeypatch.setattr(native.Renderer, "render", refuse)
    x = ur.input("x", (3,))
    graph = ur.graph([ur.tanh(x) * 2.75])   # a graph of its own (no earlier native entry)
    before = numba_cpu.STATS["native_unsupported"], numba_cpu.STATS["numba_compiles"] + numba_cpu.STATS["cache_loads"]
    got, want = _run(graph, {"x": np.array([0.5, -1.0, 2.0], np.float32)})
    _close(got, want)
    assert numba_cpu.STATS["native_unsupported"] == before[0] + 1
    assert numba_cpu.STATS["numba_compiles"] + numba_cpu.STATS["cache_loads"] == before[1] + 1
    assert native.LAST_UNSUPPORTED[0] == "refused by the test"


def test_outputs_own_their_buffers_and_nothing_leaks():
    x = ur.input("x", (256, 256))
    kernel = numba_cpu.compile_graph(ur.graph([ur.tanh(x) + 1.0, ur.sum(x * x, axis=0)]))
    feed = np.full((256, 256), 0.5, np.float32)
    first = kernel([feed])
    del kernel
    gc.collect()
    np.testing.assert_allclose(first[0], np.tanh(0.5) + 1.0, rtol=1e-6)   # alive after the kernel
    kernel = numba_cpu.compile_graph(ur.graph([ur.tanh(x) + 1.0, ur.sum(x * x, axis=0)]))
    for _ in range(50):
        kernel([feed])
    gc.collect()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(400):   # 400 calls x 256 KB of outputs and temporaries: 100 MB if kept
        kernel([feed])
    gc.collect()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 20_000   # KB


def test_object_cache_key_follows_source_and_types(tmp_path):
    source = "def kernel(a_x, dims, fk, blas):\n    return (a_x, )\n"
    types = [("float32", 1), ("int64", 1), ("float64", 1), ("int64", 1)]
    out = [np.dtype("float32")]
    _, first, how = native.compile_native(source, types, out, str(tmp_path))
    _, again, how_again = native.compile_native(source, types, out, str(tmp_path))
    _, other, _ = native.compile_native(source, [("float64", 1)] + types[1:], [np.dtype("float64")], str(tmp_path))
    assert (how, how_again) == ("compiled", "memory") and first == again and other != first


def test_a_returned_argument_is_a_copy():
    source = "def kernel(a_x, dims, fk, blas):\n    return (a_x, )\n"
    types = [("float32", 1), ("int64", 1), ("float64", 1), ("int64", 1)]
    kernel, _, _ = native.compile_native(source, types, [np.dtype("float32")])
    x = np.arange(4, dtype=np.float32)
    (y,) = kernel(x, np.zeros(1, np.int64), np.zeros(1), np.zeros(3, np.int64))
    x[0] = 9.0
    assert y[0] == 0.0 and y.flags.owndata


def test_threads_call_one_kernel_at_once():
    """Each thread has its own call buffers (the kernel releases the GIL, like Numba's nogil)."""
    import threading
    x = ur.input("x", (64, 32))
    w = ur.input("w", (32, 16))
    kernel = numba_cpu.compile_graph(ur.graph([ur.tanh(x @ w), ur.sum(x, axis=1)]))
    rng = np.random.default_rng(0)
    feeds = [(rng.normal(size=(64, 32)).astype(np.float32), rng.normal(size=(32, 16)).astype(np.float32))
             for _ in range(4)]
    wrong = []

    def work(k: int) -> None:
        a, b = feeds[k]
        for _ in range(200):
            t, s = kernel([a, b])
            if not (np.allclose(t, np.tanh(a @ b), atol=1e-5) and np.allclose(s, a.sum(axis=1), atol=1e-4)):
                wrong.append(k)
                return
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_top_level_loop_nests_are_functions_of_their_own():
    """What keeps compile time linear in the graph: each top-level loop nest is optimised and
    compiled as a function of its own (tail merging, the register allocator and the loop
    vectoriser were superlinear in one function's size), and nests that differ only in their
    names (the six layers here) share one function, compiled once."""
    x = ur.input("x", (8, 16))
    h = x
    for i in range(6):
        h = ur.tanh(h @ ur.param(f"w{i}", (16, 16)) + ur.param(f"b{i}", (16,)))
    kernel = numba_cpu.compile_graph(ur.graph([ur.sum(h)]))
    loops = sum(line.startswith("    for ") for line in kernel.source.splitlines())
    ir_text = kernel.llvm_ir()
    parts = set(re.findall(r"define internal [^@\n]*@\"?(unroll_part\d+)", ir_text))
    calls = re.findall(r"call [^@\n]*@\"?(unroll_part\d+)", ir_text)
    assert loops >= 6 and len(calls) == loops and len(parts) <= loops - 5
    layer = max(set(calls), key=calls.count)   # the tanh layer's nest, called once per layer
    assert calls.count(layer) == 6



_RUNTIME_SCRIPT = r'''
import json, sys, warnings
import numpy as np
import unroll as ur
from unroll.bench import make_data, unroll_model
# an RNN step: its recurrent product (16 x 64 x 64) goes through the packed micro-kernel
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    graph, model = unroll_model(sys.argv[1], 6, 16, 32, 64)
    x, y = make_data(6, 16, 32, 64)
    out = ur.compile(graph, backend="numba")(x=x, y=y, **model.state_dict())
    ref = ur.compile(graph, backend="numpy")(x=x, y=y, **model.state_dict())
print(json.dumps({"value": float(out[0]), "reference": float(ref[0]),
                  "warnings": [str(c.message) for c in caught]}))
'''


def _run_runtime_script(kind: str, cache_dir) -> dict:
    env = {**os.environ, "UNROLL_CACHE_DIR": str(cache_dir)}
    proc = subprocess.run([sys.executable, "-c", _RUNTIME_SCRIPT, kind], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_runtime_library_is_compiled_once_and_a_damaged_copy_is_rebuilt(tmp_path):
    """The packed-gemm code every kernel calls is one cached object per machine: a second graph
    in a new process reuses it, and a damaged copy is reported in one warning line and rebuilt."""
    first = _run_runtime_script("rnn", tmp_path)
    runtime = sorted(tmp_path.glob("unroll_runtime_f32_*.o"))
    assert len(runtime) == 1 and first["warnings"] == []   # float32 only: nothing here calls the f64 one
    size = runtime[0].stat().st_size
    runtime[0].write_bytes(runtime[0].read_bytes()[:100])   # truncated
    second = _run_runtime_script("gru", tmp_path)
    assert [w for w in second["warnings"] if "damaged cache entry" in w and "unroll_runtime_" in w]
    assert sorted(tmp_path.glob("unroll_runtime_f32_*.o")) == runtime and runtime[0].stat().st_size == size
    assert second["value"] == pytest.approx(second["reference"], rel=1e-4)
    third = _run_runtime_script("gru", tmp_path)   # everything cached and sound: no warning
    assert third["warnings"] == [] and third["value"] == second["value"]


def test_kernels_declare_the_runtime_library_instead_of_holding_it():
    x = ur.input("x", (4, 32))
    kernel = numba_cpu.compile_graph(ur.graph([ur.sum(x @ ur.param("w", (32, 32)))]))
    text = kernel.llvm_ir()
    if "unroll_gemm_f32" in text:   # the small product went through the packed micro-kernel
        assert re.search(r"declare [^\n]*@\"?unroll_gemm_f32\b", text)
        assert not re.search(r"define [^\n]*@\"?unroll_gemm_f32\b", text)


def test_a_graph_recorded_by_one_compiler_is_compiled_by_the_other(tmp_path):
    """Cache records are keyed by the compiler too: after a run under UNROLL_CPU_CODEGEN=numba, a
    default process compiles the graph natively instead of loading the Numba module."""
    code = ("import json, unroll as ur, numpy as np\n"
            "from unroll.backends.cpu import backend\n"
            "x = ur.input('x', (4, 8))\n"
            "step = ur.compile([ur.sum(ur.tanh(x) * 2.0)], backend='numba')\n"
            "step(x=np.ones((4, 8), np.float32))\n"
            "print(json.dumps({'path': step.impl.path, 'stats': dict(backend.STATS)}))\n")
    runs = {}
    for codegen in ("numba", "native"):
        env = {**os.environ, "UNROLL_CACHE_DIR": str(tmp_path), "NUMBA_CACHE_DIR": str(tmp_path / "nb"),
               "UNROLL_CPU_CODEGEN": codegen}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[codegen] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs["numba"]["path"].endswith(".py") and runs["native"]["path"].endswith(".o")
    assert runs["native"]["stats"].get("native_compiles") == 1
