"""Smoke tests of `unroll bench` (unroll.bench): a tiny run end to end, the table, config parsing.
No timing assertions."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("numba")

from unroll import bench  # noqa: E402


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("UNROLL_CACHE_DIR", str(tmp_path / "gen"))


def test_tiny_run_writes_json_table_and_plot(tmp_path):
    impls = ["numpy", "numba", "torch", "jax"]
    out = tmp_path / "results"
    result = bench.run_bench(cells=("rnn",), configs=("4,2,3,5",), impls=impls, repeats=3, budget_s=0.1,
                             out_dir=str(out), quiet=True)
    rows = {r["impl"]: r for r in result["rows"]}
    assert {"numpy", "numba"} <= set(rows)
    for name in ("numpy", "numba"):
        assert rows[name]["median_ms"] is not None and rows[name]["first_ms"] is not None, rows[name]
        assert rows[name]["repeats"] >= 3
    if "torch" in rows:
        assert rows["torch"]["median_ms"] is not None, rows["torch"]["note"]
    assert "| rnn |" in result["table"] and "numba / best peer" in result["table"]
    saved = json.loads((out / "bench.json").read_text())
    assert saved["rows"] and "OPENBLAS_NUM_THREADS" in saved["header"]
    assert (out / "bench.md").exists()
    assert (out / "bench.png").exists() or not _has_matplotlib()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_rows_run_in_their_own_process_beside_busy_load():
    result = bench.run_bench(cells=("rnn",), configs=("4,2,3,5",), impls=["numpy", "numba"], repeats=3,
                             budget_s=0.05, memory=False, quiet=True, load=1)
    pids = {r["extra"].get("pid") for r in result["rows"]}
    assert all(r["median_ms"] is not None for r in result["rows"]), [r["note"] for r in result["rows"]]
    assert len(pids) == 2 and os.getpid() not in pids
    assert result["header"]["busy processes beside the benchmark (--load)"] == 1


def test_tcn_and_lstm_rows_run():
    result = bench.run_bench(cells=("tcn", "lstm"), configs=("3,2,2,3",), impls=["numpy", "torch"], repeats=3,
                             budget_s=0.05, memory=False, quiet=True, isolate=False)
    assert all(r["median_ms"] is not None or r["note"] for r in result["rows"])
    assert any(r["impl"] == "numpy" and r["median_ms"] is not None for r in result["rows"])


def test_ratio_is_numba_over_best_peer():
    rows = [dict(cell="lstm", config="tiny", T=1, B=1, I=1, H=1, impl=i, median_ms=ms, first_ms=1.0, peak_mb=2.0)
            for i, ms in (("numba", 1.0), ("torch", 4.0), ("jax", 2.0))]
    assert bench.ratios(rows)[("lstm", "tiny")] == pytest.approx(0.5)
    table = bench.format_table(rows)
    assert "0.50x" in table and "2.0/2.0" in table


def test_parse_config_and_cli_errors(capsys):
    assert bench.parse_config("tiny") == ("tiny", (50, 1, 16, 32))
    assert bench.parse_config("7,3,2,5") == ("7,3,2,5", (7, 3, 2, 5))
    with pytest.raises(ValueError, match="T,B,I,H"):
        bench.parse_config("7,3")
    with pytest.raises(SystemExit):
        bench.main(["--configs", "huge"])
    assert "T,B,I,H" in capsys.readouterr().err


def test_peak_memory_measures_an_allocation():
    import numpy as np
    mb, method = bench.peak_memory_mb(lambda: np.ones(8 * 2 ** 20 // 8).sum())
    assert method in ("rss", "tracemalloc") and mb >= 0


def test_header_reports_threads():
    head = bench.header()
    for key in ("OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        assert key in head
    assert os.cpu_count() == head["cpus"]


def test_cuda_backend_without_gpu_is_a_row_note_not_a_crash():
    from numba import cuda
    if cuda.is_available():
        pytest.skip("a GPU is present")
    result = bench.run_bench(cells=("rnn",), configs=("3,2,2,3",), impls=("cuda",), repeats=1, budget_s=0,
                             plot=False, quiet=True, backend="cuda")
    (row,) = result["rows"]
    assert row["impl"] == "cuda" and row["median_ms"] is None and "GPU" in row["note"]
    assert "cuda / best peer" in result["table"]
    with pytest.raises(ValueError, match="unknown backend"):
        bench.run_bench(backend="tpu", quiet=True)


def test_cuda_bench_runs_in_the_simulator(tmp_path):
    """`unroll bench --backend cuda` end to end in numba's CUDA simulator (own process)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "UNROLL_CACHE_DIR": str(tmp_path / "gen")}
    done = subprocess.run([sys.executable, "-m", "unroll.bench", "--backend", "cuda", "--cells", "rnn",
                           "--configs", "3,2,2,3", "--impls", "cuda", "--repeats", "1", "--budget", "0",
                           "--no-plot", "--out", str(tmp_path / "out")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    assert rows[0]["impl"] == "cuda" and rows[0]["median_ms"] is not None, rows[0]["note"]


def test_cli_writes_results_without_out_and_names_the_extra(tmp_path, monkeypatch, capsys):
    """Issue #18: `unroll bench` with no --out still saves its numbers (./unroll_bench) and says
    where; a missing PyTorch or JAX is one line naming the extra that installs them."""
    real_import = bench._try_import
    monkeypatch.setattr(bench, "_try_import", lambda name: None if name in bench.PEERS else real_import(name))
    monkeypatch.chdir(tmp_path)
    code = bench.main(["--cells", "rnn", "--configs", "2,1,2,2", "--impls", "numpy", "--repeats", "1",
                       "--budget", "0.01", "--same-process", "--no-memory", "--no-plot"])
    out = capsys.readouterr().out
    assert code == 0
    assert 'torch and jax: not installed, skipped; pip install -e ".[bench]" adds them' in out.splitlines()
    saved = json.loads((tmp_path / "unroll_bench" / "bench.json").read_text())
    assert [r["impl"] for r in saved["rows"]] == ["numpy"]
    assert (tmp_path / "unroll_bench" / "bench.md").exists()
    last = out.strip().splitlines()[-1]
    assert last == f"results written to {os.path.join('unroll_bench', 'bench.json')}, " \
                   f"{os.path.join('unroll_bench', 'bench.md')}"


def test_missing_peers_line():
    assert bench.missing_peers_line({"torch": True, "jax": True}) is None
    assert bench.missing_peers_line({"torch": True, "jax": False}) == \
        'jax: not installed, skipped; pip install -e ".[bench]" adds them'


def test_cold_rows_start_with_empty_caches(monkeypatch):
    """--cold: each row's process gets a fresh, empty directory for unroll's and Numba's caches."""
    import subprocess

    from unroll import bench
    seen = {}

    def fake_run(cmd, **kwargs):
        env = kwargs["env"]
        seen["dirs"] = (env["UNROLL_CACHE_DIR"], env["NUMBA_CACHE_DIR"])
        seen["empty"] = os.listdir(env["UNROLL_CACHE_DIR"]) == []
        return subprocess.CompletedProcess(cmd, 1, "", "boom")
    monkeypatch.setattr(subprocess, "run", fake_run)
    spec = {"row": {"cell": "lstm", "config": "tiny", "T": 2, "B": 1, "I": 2, "H": 2, "impl": "numba"}}
    bench.measure_isolated(spec, cold=True)
    assert seen["empty"] and seen["dirs"][0] == seen["dirs"][1]
    assert not os.path.exists(seen["dirs"][0])   # removed after the row
