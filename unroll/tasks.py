"""The registry of example tasks that `unroll train TASK` runs, and the loader of examples/ scripts.

Each task is one script in the repository's examples/ folder with an entry point
`main(quick=False, backend="numpy", epochs=None, hidden=None, seed=0) -> dict` (its measured result).
The scripts are user code, not part of the package: they are found next to the package in a source
checkout (`pip install -e .`), or in the folder named by the environment variable UNROLL_EXAMPLES.
A task whose script needs a package the core install leaves out (scikit-learn's bundled digits) names
it in `needs`; run_task checks those first and raises MissingExtra, whose message is one line naming
the pip extra that brings it (`unroll train` prints it instead of a traceback).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any


# modules an example may import beyond the core install: (the distribution's name, the extra that brings it)
EXTRAS: dict[str, tuple[str, str]] = {
    "sklearn": ("scikit-learn", "examples"),
    "sacrebleu": ("sacrebleu", "examples"),
    "mpi4py": ("mpi4py", "mpi"),
    "torch": ("torch", "bench"),
    "jax": ("jax", "bench"),
}


class MissingExtra(ImportError):
    """A task needs a package that is not installed; the message names the pip extra to install."""


def missing_extra_message(task: str, module: str) -> str:
    dist, extra = EXTRAS.get(module, (module, None))
    how = f'pip install -e ".[{extra}]"' if extra else f"pip install {dist}"
    return f"task {task!r} needs {dist}, which is not installed: {how}"


@dataclass(frozen=True)
class Task:
    name: str
    script: str       # file name in examples/
    summary: str
    needs: tuple[str, ...] = field(default=())  # modules beyond the core install (keys of EXTRAS)


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("adding", "adding_problem.py", "adding problem (many-to-one regression): TCN vs LSTM vs GRU"),
    Task("copy", "copy_memory.py", "copy memory (many-to-many classification): TCN vs LSTM vs GRU"),
    Task("digits", "digits.py", "sequential 8x8 digits, row by row (T=8) and pixel by pixel (T=64)", ("sklearn",)),
    Task("charlm", "char_lm.py", "character language model on Python's own standard library, sampling"),
    Task("caption", "caption_digits.py", "one-to-many: caption 2-3 digits ('four seven'), greedy vs beam",
         ("sklearn",)),
    Task("video", "video_classification.py", "video classification (many-to-one): LSTM vs GRU vs TCN", ("sklearn",)),
    Task("s2vt", "video_description.py", "video description, S2VT: 'three moves left' from a clip", ("sklearn",)),
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
    """Run a registered task's `main(**options)` and return its result dict. Raises MissingExtra,
    before anything runs, when a module the task needs is not installed."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    for module in TASKS[name].needs:
        if importlib.util.find_spec(module) is None:
            raise MissingExtra(missing_extra_message(name, module), name=module)
    try:
        return load_example(TASKS[name].script).main(**options)
    except ModuleNotFoundError as err:  # an import the registry does not list: still one line
        module = (err.name or "").split(".")[0]
        if module not in EXTRAS:
            raise
        raise MissingExtra(missing_extra_message(name, module), name=module) from err


__all__ = ["EXTRAS", "TASKS", "MissingExtra", "Task", "examples_dir", "load_example", "run_task"]
