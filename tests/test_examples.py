"""Tests of examples/: every script's main(quick=True) runs end to end with tiny settings, and every
result a script's docstring states is re-derived from the script.

The quick settings check that each example builds, differentiates, trains, evaluates and reports;
they do not check that it learns. Each docstring ends with lines such as

    main(quick=True) -> TCN_mse=0.8918 LSTM_mse=0.8687
    main()           -> TCN_mse=0.0008 LSTM_mse=0.0008

which the tests run with the same seeds: quick lines in the default run (the quick run is shared
with the smoke tests, so checking its numbers costs nothing), the others (the full runs the
docstring's "Measured" text reports, a few seconds to two minutes each) with `pytest -m slow`.
A value is `key=number` (the result's `key`, as written: within half a percent and a unit of
the last written digit for quick runs; for full runs, whose hundreds of steps amplify rounding
differences between BLAS builds, within 0.02 for accuracies and 25 % otherwise), `key<number` (an
upper bound, for measured rounding errors) or `key="text"` (the result starts with it).
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import math
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import pytest

from unroll.tasks import TASKS, examples_dir, load_example, run_task

SCRIPTS = sorted(p.name for p in examples_dir().glob("*.py"))
TASK_OF = {t.script: name for name, t in TASKS.items()}

_RUN_LINE = re.compile(r"^\s*main\((?P<args>[^)]*)\)\s*->\s*(?P<values>.+)$", re.M)
_VALUE = re.compile(r'(?P<key>\w+)(?P<op>[=<])(?P<value>"(?:[^"\\]|\\.)*"|[-+0-9.eE]+)')


@functools.cache
def docstring_runs(script: str) -> dict[str, tuple[dict[str, Any], dict[str, tuple[str, str]]]]:
    """The `main(...) -> key=value ...` lines of a script's docstring: args text -> (kwargs,
    {key: (op, written value)}); lines with the same call are one run."""
    runs: dict[str, tuple[dict[str, Any], dict[str, tuple[str, str]]]] = {}
    for line in _RUN_LINE.finditer(load_example(script).__doc__ or ""):
        args = line["args"].strip()
        call = ast.parse(f"main({args})", mode="eval").body
        assert isinstance(call, ast.Call) and not call.args, f"{script}: keyword arguments only: {line[0]}"
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        values = {m["key"]: (m["op"], m["value"]) for m in _VALUE.finditer(line["values"])}
        assert values, f"{script}: no key=value in {line[0]!r}"
        runs.setdefault(args, (kwargs, {}))[1].update(values)
    return runs


def _run_main(script: str, kwargs: dict[str, Any], out: Callable[[], Path]) -> dict:
    """main(**kwargs), through run_task for a registered task; a script that writes files (an
    `out` parameter) writes them into a temporary folder."""
    main = load_example(script).main
    if "out" in inspect.signature(main).parameters and "out" not in kwargs:
        kwargs = {**kwargs, "out": out()}
    return run_task(TASK_OF[script], **kwargs) if script in TASK_OF else main(**kwargs)


def check_stated(script: str, result: dict, stated: dict[str, tuple[str, str]], quick: bool) -> None:
    """Every value the docstring states for this run against what the run returned."""
    for key, (op, text) in stated.items():
        assert key in result, f"{script}: the docstring states {key}, which main() does not return"
        got = result[key]
        where = f"{script}: docstring says {key}{op}{text}, the run gives {got!r}"
        if text.startswith('"'):
            assert str(got).startswith(json.loads(text)), where
            continue
        want = float(text)
        if op == "<":
            assert got < want, where
        elif quick:
            unit = 10.0 ** Decimal(text).as_tuple().exponent  # type: ignore[operator]
            assert got == pytest.approx(want, rel=5e-3, abs=unit), where
        elif "accuracy" in key or "recall" in key:
            assert got == pytest.approx(want, abs=0.02), where
        else:
            assert got == pytest.approx(want, rel=0.25, abs=10.0 ** Decimal(text).as_tuple().exponent), where


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Callable[[str], dict]:
    """main(quick=True) of a script, run once per test module and shared by the tests below."""
    results: dict[str, dict] = {}

    def run(script: str) -> dict:
        if script not in results:
            results[script] = _run_main(script, {"quick": True}, lambda: tmp_path_factory.mktemp("out"))
        return results[script]
    return run


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
        runs = docstring_runs(script)
        assert "quick=True" in runs, f"{script}: no `main(quick=True) -> ...` line in its docstring"
        assert "" in runs, f"{script}: no `main() -> ...` line for the measured full run"


# scripts whose data is read from the running interpreter (char_lm: the standard library's source),
# so their numbers hold for the Python version their docstring names
PYTHON_OF = {"char_lm.py": (3, 11)}


def _skip_other_python(script: str) -> None:
    version = PYTHON_OF.get(script)
    if version is not None and sys.version_info[:2] != version:
        pytest.skip(f"{script}'s numbers are for Python {version[0]}.{version[1]}'s standard library")


@pytest.mark.parametrize("script", SCRIPTS)
def test_docstring_quick_numbers_are_what_the_quick_run_gives(script, quick):
    _skip_other_python(script)
    _, stated = docstring_runs(script)["quick=True"]
    check_stated(script, quick(script), stated, quick=True)


FULL_RUNS = [(script, args) for script in SCRIPTS for args in docstring_runs(script) if args != "quick=True"]


@pytest.mark.slow  # the full runs: 7 s (custom_cell) to about 2 min (seq2seq_dates) each on 2 cores
@pytest.mark.parametrize("script,args", FULL_RUNS, ids=[f"{s[:-3]}({a})" for s, a in FULL_RUNS])
def test_docstring_measured_numbers_are_what_the_full_run_gives(script, args, tmp_path):
    _skip_other_python(script)
    kwargs, stated = docstring_runs(script)[args]
    check_stated(script, _run_main(script, kwargs, lambda: tmp_path), stated, quick=False)


def test_every_task_has_its_script():
    for task in TASKS.values():
        assert task.script in SCRIPTS


@pytest.mark.parametrize("task", list(TASKS))
def test_task_quick(task, quick):
    result = quick(TASKS[task].script)  # run_task(task, quick=True)
    assert result and isinstance(result, dict)
    _finite_numbers(result)


def test_truncated_bptt_quick(quick):
    result = quick("truncated_bptt.py")
    _finite_numbers(result)
    biases = [v for k, v in sorted(result.items()) if k.startswith("bias_init_k")]
    assert biases and min(biases) == 0.0                    # k = T: full BPTT, no bias
    assert result["bias_init_k1"] > 0


def test_custom_cell_quick(quick):
    result = quick("custom_cell.py")
    assert result["grad_check_error"] < 1e-5
    _finite_numbers(result)


def test_gradient_flow_quick(quick):
    result = quick("gradient_flow.py")
    for key in ("init_png", "trained_png"):
        assert Path(result[key]).read_bytes()[:4] == b"\x89PNG"
    assert 0 < result["RNN_init_decay"] < 1


def test_char_lm_sampling_is_greedy_without_noise(quick):
    result = quick("char_lm.py")
    assert result["greedy"].startswith("def ") and len(result["greedy"]) > 4


def test_a_script_runs_as_a_script():
    done = subprocess.run([sys.executable, str(examples_dir() / "truncated_bptt.py"), "--quick"],
                          capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "truncated BPTT" in done.stdout


def test_a_stale_docstring_number_fails():
    """The comparison the docstring tests use rejects what a stale docstring would state."""
    stated = {"mse": ("=", "0.6566"), "err": ("<", "1e-7"), "greedy": ("=", '"def x"'), "accuracy": ("=", "0.923")}
    check_stated("x.py", {"mse": 0.65661, "err": 2e-8, "greedy": "def xy", "accuracy": 0.93}, stated, quick=False)
    check_stated("x.py", {"mse": 0.65661, "err": 2e-8, "greedy": "def xy", "accuracy": 0.923}, stated, quick=True)
    for wrong in ({"mse": 0.6600}, {"err": 2e-7}, {"greedy": "class"}, {"accuracy": 0.95}):
        result = {"mse": 0.65661, "err": 2e-8, "greedy": "def xy", "accuracy": 0.923, **wrong}
        with pytest.raises(AssertionError, match="docstring says"):
            check_stated("x.py", result, stated, quick=True)
    with pytest.raises(AssertionError, match="docstring says accuracy=0.923"):
        check_stated("x.py", {"mse": 0.6566, "err": 2e-8, "greedy": "def x", "accuracy": 0.95}, stated, quick=False)
    with pytest.raises(AssertionError, match="does not return"):
        check_stated("x.py", {}, stated, quick=True)
