"""The generated-module cache: damaged entries are reported and rebuilt, an unwritable directory
falls back to memory, and concurrent compiles of one graph (threads, processes) all succeed and
compile it once. Each test uses its own cache directory (UNROLL_CACHE_DIR and NUMBA_CACHE_DIR),
and runs for both ways the CPU backend compiles generated code (`codegen`: the native LLVM
renderer, the default, whose entries are object files; Numba, its fallback, whose entries are
Python modules plus Numba's own cache)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import unroll as ur
from unroll.backends import cache
from unroll.backends.cpu import backend as numba_cpu

@pytest.fixture(params=["native", "numba"])
def codegen(request, monkeypatch):
    """UNROLL_CPU_CODEGEN for this test and its child processes; the STATS key of a compile."""
    monkeypatch.setenv("UNROLL_CPU_CODEGEN", request.param)
    return request.param


def _compiles(stats: dict, codegen: str) -> int:
    return stats.get(f"{codegen}_compiles", 0)


# a small graph of its own per test (a distinct constant gives a distinct module)
def _graph(tag: float) -> tuple[ur.Graph, dict]:
    x = ur.input("x", (3, 4))
    w = ur.param("w", (4, 2))
    out = ur.sum(ur.tanh(x @ w) * tag)
    return ur.graph(out), {"x": np.arange(12.0).reshape(3, 4) / 10, "w": np.ones((4, 2)) / 4}


def _expected(graph: ur.Graph, feeds: dict) -> np.ndarray:
    return ur.compile(graph, backend="numpy")(**feeds)[0]


def _child(code: str, directory: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, UNROLL_CACHE_DIR=directory, NUMBA_CACHE_DIR=os.path.join(directory, "numba"),
               PYTHONWARNINGS="always")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=300)


CHILD = """
    import json, sys, warnings
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_cache import _graph
    import unroll as ur
    from unroll.backends.cpu import backend as numba_cpu
    graph, feeds = _graph({tag})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(ur.compile(graph, backend="numba")(**feeds)[0])
    print(json.dumps({{"value": value, "stats": dict(numba_cpu.STATS),
                      "warnings": [str(w.message) for w in caught]}}))
"""


def _run_child(directory: str, tag: float) -> dict:
    done = _child(CHILD.format(tests=os.path.dirname(__file__), tag=tag), directory)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_damaged_entries_are_rebuilt(tmp_path, codegen):
    directory = str(tmp_path)
    graph, feeds = _graph(1.25)
    first = _run_child(directory, 1.25)
    assert _compiles(first["stats"], codegen) == 1 and not first["warnings"]
    expected = float(_expected(graph, feeds))
    assert first["value"] == pytest.approx(expected, rel=1e-6)

    if codegen == "numba":   # garbage in Numba's index and data files: reported once, dropped, rebuilt
        numba_files = glob.glob(os.path.join(directory, "numba", "**", "*.nb[ic]"), recursive=True)
        assert numba_files
        for f in numba_files:
            with open(f, "wb") as fh:
                fh.write(b"garbage")
        second = _run_child(directory, 1.25)
        assert second["value"] == first["value"]
        assert any("damaged Numba cache" in w for w in second["warnings"]), second["warnings"]
    third = _run_child(directory, 1.25)  # and the rebuilt entry loads cleanly
    assert third["value"] == first["value"] and not third["warnings"]
    assert _compiles(third["stats"], codegen) == 0

    # a truncated module or object file (and its record pointing at it): reported, regenerated
    damaged = glob.glob(os.path.join(directory, "unroll_gen_*.py" if codegen == "numba" else "unroll_native_*.o"))
    assert damaged
    for entry in damaged:
        with open(entry, "r+b") as fh:
            fh.truncate(100)
    fourth = _run_child(directory, 1.25)
    assert fourth["value"] == first["value"]
    assert any("damaged cache entry" in w for w in fourth["warnings"]), fourth["warnings"]
    assert codegen == "numba" or _compiles(fourth["stats"], codegen) == 1   # Numba's own cache still has it
    assert not _run_child(directory, 1.25)["warnings"]   # replaced

    # a foreign record: reported, rebuilt
    for record in glob.glob(os.path.join(directory, "unroll_graph_*.json")):
        with open(record, "w") as fh:
            fh.write("{not json")
    fifth = _run_child(directory, 1.25)
    assert fifth["value"] == first["value"]
    assert any("damaged cache record" in w for w in fifth["warnings"]), fifth["warnings"]
    assert not glob.glob(os.path.join(directory, "**", "*.tmp"), recursive=True)


def test_unwritable_directory_compiles_in_memory(tmp_path, codegen):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    graph, feeds = _graph(1.5)
    with pytest.warns(cache.CacheWarning, match="not writable"):
        kernel = numba_cpu.compile_graph(graph, cache_dir=str(blocker / "cache"))
    got = kernel([feeds[n] for n in graph.input_names])[0]
    np.testing.assert_allclose(got, _expected(graph, feeds), rtol=1e-6)


def test_threads_compiling_one_graph_all_succeed_and_compile_once(tmp_path, codegen):
    graph, feeds = _graph(1.75)
    loads = "native_loads" if codegen == "native" else "cache_loads"
    before = numba_cpu.STATS[f"{codegen}_compiles"] + numba_cpu.STATS[loads]
    results, errors = [], []

    def work() -> None:
        try:
            kernel = numba_cpu.compile_graph(graph, cache_dir=str(tmp_path))
            results.append(float(kernel([feeds[n] for n in graph.input_names])[0]))
        except Exception as err:  # noqa: BLE001 - collected and reported below
            errors.append(repr(err))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(set(results)) == 1 and len(results) == 4
    assert numba_cpu.STATS[f"{codegen}_compiles"] + numba_cpu.STATS[loads] - before == 1


def test_processes_compiling_one_graph_compile_it_once(tmp_path, codegen):
    directory = str(tmp_path)
    code = CHILD.format(tests=os.path.dirname(__file__), tag=2.25)
    env = dict(os.environ, UNROLL_CACHE_DIR=directory, NUMBA_CACHE_DIR=os.path.join(directory, "numba"))
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    reports = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert reports[0]["value"] == reports[1]["value"]
    assert sum(_compiles(r["stats"], codegen) for r in reports) == 1


def test_cache_command_shows_and_clears(tmp_path, capsys, codegen):
    from unroll.cli import main
    graph, feeds = _graph(2.5)
    numba_cpu.compile_graph(graph, cache_dir=str(tmp_path))
    info = cache.summary(str(tmp_path))
    assert info["modules"] >= 1 and info["bytes"] > 0
    env_before = os.environ.get("UNROLL_CACHE_DIR")
    os.environ["UNROLL_CACHE_DIR"] = str(tmp_path)
    try:
        assert main(["cache"]) == 0
        shown = capsys.readouterr().out
        assert str(tmp_path) in shown and "modules" in shown
        assert main(["cache", "--clear"]) == 0
        assert "removed" in capsys.readouterr().out
    finally:
        if env_before is None:
            del os.environ["UNROLL_CACHE_DIR"]
        else:
            os.environ["UNROLL_CACHE_DIR"] = env_before
    assert not glob.glob(os.path.join(str(tmp_path), "unroll_*"))
