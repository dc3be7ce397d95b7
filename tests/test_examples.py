"""Smoke tests of examples/: every script's main(quick=True) runs end to end with tiny settings.

The quick settings check that each example builds, differentiates, trains, evaluates and reports;
they do not check that it learns (the full runs' measured results are in each script's docstring).
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from unroll.tasks import TASKS, examples_dir, load_example, run_task

SCRIPTS = sorted(p.name for p in examples_dir().glob("*.py"))


def _finite_numbers(result: dict) -> None:
    for key, value in result.items():
        if isinstance(value, float):
            assert math.isfinite(value), f"{key} = {value}"


def test_every_script_has_a_quick_main_and_a_measured_docstring():
    assert len(SCRIPTS) >= 9
    for script in SCRIPTS:
        module = load_example(script)
        assert callable(getattr(module, "main", None)), script
        assert "quick" in module.main.__code__.co_varnames, script
        assert module.__doc__ and "Measured" in module.__doc__, script


def test_every_task_has_its_script():
    for task in TASKS.values():
        assert task.script in SCRIPTS


@pytest.mark.parametrize("task", list(TASKS))
def test_task_quick(task):
    result = run_task(task, quick=True)
    assert result and isinstance(result, dict)
    _finite_numbers(result)


def test_truncated_bptt_quick():
    result = load_example("truncated_bptt.py").main(quick=True)
    _finite_numbers(result)
    biases = [v for k, v in sorted(result.items()) if k.startswith("bias_init_k")]
    assert biases and min(biases) == 0.0                    # k = T: full BPTT, no bias
    assert result["bias_init_k1"] > 0


def test_custom_cell_quick():
    result = load_example("custom_cell.py").main(quick=True)
    assert result["grad_check_error"] < 1e-5
    _finite_numbers(result)


def test_gradient_flow_quick(tmp_path):
    result = load_example("gradient_flow.py").main(quick=True, out=tmp_path)
    for name in ("gradient_flow_init.png", "gradient_flow_trained.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert 0 < result["RNN_init_decay"] < 1


def test_char_lm_sampling_is_greedy_without_noise():
    module = load_example("char_lm.py")
    result = module.main(quick=True)
    assert result["greedy"].startswith("def ") and len(result["greedy"]) > 4


def test_a_script_runs_as_a_script():
    done = subprocess.run([sys.executable, str(examples_dir() / "truncated_bptt.py"), "--quick"],
                          capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "truncated BPTT" in done.stdout
