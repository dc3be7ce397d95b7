"""The README's examples run as written and print what the README shows.

Each README code block that prints something is paired here with the block of output under it;
the test executes the code (in a fresh namespace, with numpy's default printing) and compares the
text. Timings and sizes that vary between machines are not in these blocks."""

from __future__ import annotations

import contextlib
import io
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def _section(title: str) -> str:
    text = open(README, encoding="utf-8").read()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def _blocks(section: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block in a section, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w*)\n(.*?)```", section, re.S)]


def _run(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, README, "exec"), {"__name__": "__readme__"})  # noqa: S102 - our README
    return out.getvalue()


def test_the_15_line_lstm_prints_what_the_readme_shows():
    blocks = _blocks(_section("A 15-line LSTM"))
    (lang, code), (_, shown) = blocks[0], blocks[1]
    assert lang == "python"
    printed = _run(code)
    assert printed.strip() == shown.strip()


def test_the_tanh_rnn_backward_ir_is_what_the_code_prints():
    section = _section("Backprop through time")
    blocks = _blocks(section)
    shown = next(body for lang, body in blocks if body.lstrip().startswith("%0 = param \"U\""))
    # the block is the README's tanh RNN (I=3, H=4, B=2, T=5) with parameters W and U and no bias
    program = (
        "import unroll as ur\n"
        "W, U = ur.param('W', (3, 4), 0.5), ur.param('U', (4, 4), 0.5)\n"
        "xs = ur.input('xs', (5, 2, 3))\n"
        "h_T, hs = ur.scan(lambda h, x_t: (ur.tanh(x_t @ W + h @ U),) * 2, ur.zeros((2, 4)), xs)\n"
        "print(ur.graph(*ur.grad(ur.sum(hs), [W, U])))\n")
    assert _run(program).strip() == shown.strip()


@pytest.mark.parametrize("title", ["Your own cell"])
def test_code_blocks_without_output_run(title):
    code = _blocks(_section(title))[0][1]
    prelude = "import numpy as np\nimport unroll as ur\nT, B, I, H = 50, 16, 8, 32\nx = ur.input('x', (T, B, I))\n"
    _run(prelude + code)
