"""The registry of example tasks that `unroll train TASK` runs, and the loader of examples/ scripts.

Each task is one script in the repository's examples/ folder with an entry point
`main(quick=False, backend="numpy", epochs=None, hidden=None, seed=0) -> dict` (its measured result).
The scripts are user code, not part of the package: they are found next to the package in a source
checkout (`pip install -e .`), or in the folder named by the environment variable UNROLL_EXAMPLES.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class Task:
    name: str
    script: str       # file name in examples/
    summary: str


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("adding", "adding_problem.py", "adding problem (many-to-one regression): TCN vs LSTM vs GRU"),
    Task("copy", "copy_memory.py", "copy memory (many-to-many classification): TCN vs LSTM vs GRU"),
    Task("digits", "digits.py", "sequential 8x8 digits, row by row (T=8) and pixel by pixel (T=64)"),
    Task("charlm", "char_lm.py", "character language model on Python's own standard library, sampling"),
    Task("caption", "caption_digits.py", "one-to-many: caption 2-3 digits ('four seven'), greedy vs beam"),
    Task("video", "video_classification.py", "video classification (many-to-one): LSTM vs GRU vs TCN"),
    Task("s2vt", "video_description.py", "video description, S2VT: 'three moves left' from a clip"),
    Task("seq2seq", "seq2seq_dates.py", "encoder-decoder: translate dates between formats"),
    Task("translate", "translate_dates.py", "GNMT-style attention: dates between formats, attention heatmap"),
    Task("numbers", "numbers_to_words.py", "numbers to English words: greedy vs beam search, exact match and BLEU"),
]}


def examples_dir() -> Path:
    """The examples/ folder: $UNROLL_EXAMPLES, else the one beside the package (source checkout)."""
    env = os.environ.get("UNROLL_EXAMPLES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "examples"


def load_example(script: str) -> ModuleType:
    """Import an examples/ script as a module (it is not a package) by its file name."""
    path = examples_dir() / script
    if not path.is_file():
        raise FileNotFoundError(
            f"example script {script!r} not found in {path.parent}: the examples live in the unroll "
            f"source repository (examples/); run from a checkout (`pip install -e .`) or set "
            f"UNROLL_EXAMPLES to the folder that holds them")
    name = f"unroll_examples.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def run_task(name: str, **options: Any) -> dict:
    """Run a registered task's `main(**options)` and return its result dict."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return load_example(TASKS[name].script).main(**options)


__all__ = ["TASKS", "Task", "examples_dir", "load_example", "run_task"]
