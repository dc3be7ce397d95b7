"""Issue #12's shape of the backends: no function in unroll/backends/ over 80 lines (the CUDA
planner is a plan and an emitter, the CPU code generator value views, scheduling and emission), and
the layout: the reference, the shared lowering, the CPU target, the CUDA target."""

from __future__ import annotations

import ast
import pathlib

BACKENDS = pathlib.Path(__file__).resolve().parent.parent / "unroll" / "backends"
MAX_LINES = 80


def test_no_function_in_the_backends_is_over_80_lines():
    long = []
    for path in sorted(BACKENDS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(BACKENDS.parent.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 80 lines (split them):\n" + "\n".join(long)


def test_backends_are_laid_out_as_reference_lowering_cpu_cuda():
    assert (BACKENDS / "numpy_ref.py").is_file()
    for package in ("lower", "cpu", "cuda"):
        assert (BACKENDS / package / "__init__.py").is_file(), package
    assert {p.stem for p in (BACKENDS / "lower").glob("*.py")} >= {"scalar", "index", "decompose"}
