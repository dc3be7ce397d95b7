"""ur.compile, ur.fit and TrainStep default to the fastest installed backend (issue #18): Numba when it
imports, else the numpy reference, which stays one argument away (backend="numpy").

Tests elsewhere that check semantics name backend="numpy" so the suite's runtime does not depend on
this default; here one tiny graph is compiled with the default to see that it really is Numba."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import unroll as ur
from unroll.compile import default_backend
from unroll.train import step as step_module


def test_default_is_numpy_when_numba_does_not_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now raises ImportError
    assert default_backend.__wrapped__() == "numpy"


def test_default_is_numba_when_it_imports(fresh_cache_dir):
    pytest.importorskip("numba")
    assert default_backend() == "numba"
    x = ur.input("db_x", (3,))
    run = ur.compile(x * 2.0 + 1.0)
    assert run.backend == "numba"
    np.testing.assert_array_equal(run(db_x=np.arange(3, dtype=np.float32)), [1.0, 3.0, 5.0])
    assert ur.compile(x * 2.0, backend="numpy").backend == "numpy"  # the reference, one argument away


def test_train_step_and_fit_use_the_default(monkeypatch):
    """TrainStep (and so fit) resolve None to default_backend(); compile is stubbed: no Numba build."""
    seen: list[str] = []

    def fake_compile(graph, backend=None, **options):
        seen.append(backend)
        return ur.compile(graph, backend="numpy", **options)

    monkeypatch.setattr(step_module, "compile", fake_compile)
    monkeypatch.setattr(step_module, "default_backend", lambda: "numba")
    w = ur.param("db_w", (2,), "ones")
    x = ur.input("db_in", (4, 2))
    loss = ur.mean((x * w) ** 2)
    trainer = ur.TrainStep(loss, [w], optimizer="sgd", lr=0.1)
    assert trainer.backend == "numba" and seen == ["numba"]
    result = ur.fit(loss, [w], {"db_in": np.ones((4, 2), np.float32)}, batch_axes={"db_in": 0}, steps=1,
                    progress=False)
    assert result.trainer.backend == "numba" and seen == ["numba", "numba"]
    assert ur.TrainStep(loss, [w], backend="numpy").backend == "numpy" and seen[-1] == "numpy"


def test_unroll_train_uses_the_default(monkeypatch, capsys):
    """`unroll train` without --backend trains on the default backend (Numba when installed)."""
    from unroll import cli, tasks
    seen = {}

    def fake_run_task(task, **kwargs):
        seen.update(kwargs)
        return {"loss": 0.0}
    monkeypatch.setattr(tasks, "run_task", fake_run_task)
    assert cli.main(["train", "adding", "--quick"]) == 0
    assert seen["backend"] == default_backend()


def test_unroll_flow_and_the_diagnostics_use_the_default(monkeypatch, capsys):
    """`unroll flow` (which trains with --train-steps) and unroll.diagnostics compile and train on the
    default backend too; --backend numpy still picks the reference."""
    import inspect

    from unroll import cli, diagnostics
    for fn in (diagnostics.gradient_flow, diagnostics.compare_gradient_flow):
        assert inspect.signature(fn).parameters["backend"].default is None
    seen = []

    def fake_compare(*args, **kwargs):
        seen.append(kwargs["backend"])
        return []
    monkeypatch.setattr(diagnostics, "compare_gradient_flow", fake_compare)
    monkeypatch.setattr(diagnostics, "plot_gradient_flow", lambda flows, path, title: path)
    assert cli.main(["flow", "-o", "unused.png"]) == 0
    assert cli.main(["flow", "--backend", "numpy", "-o", "unused.png"]) == 0
    assert seen == [default_backend(), "numpy"]
