"""The README's examples run as written and print what the README shows.

Each README code block that prints something is paired here with the block of output under it;
the test executes the code (in a fresh namespace, with numpy's default printing) and compares the
text. Timings and sizes that vary between machines are not in these blocks; the one path shown
(the shape error's `at file:line`) is compared as a pattern, and checked to name the test's own
line. docs/bptt_example.py runs as a script for the truncation-bias block. "Coming from PyTorch /
JAX" runs every block; the torch and JAX originals run where those are installed and are compared
with their unroll ports numerically (loss and every gradient)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys

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


def _run_fresh(code: str) -> str:
    """What `code` prints in a new interpreter, as a reader running it gets it: nodes are interned,
    and a node keeps the source line and role of whoever built it first, so in this process an
    earlier test's gradient could have built the README's `const 0.0` first and tagged it."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_15_line_lstm_prints_what_the_readme_shows():
    blocks = _blocks(_section("A 15-line LSTM"))
    (lang, code), (_, shown) = blocks[0], blocks[1]
    assert lang == "python"
    printed = _run_fresh(code)
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
    assert _run_fresh(program).strip() == shown.strip()


@pytest.mark.parametrize("title", ["Your own cell"])
def test_code_blocks_without_output_run(title):
    code = _blocks(_section(title))[0][1]
    prelude = "import numpy as np\nimport unroll as ur\nT, B, I, H = 50, 16, 8, 32\nx = ur.input('x', (T, B, I))\n"
    _run(prelude + code)


# ---- Coming from PyTorch / JAX: every block runs; the ports are checked against torch and JAX ------

PORT_ROLES = ("torch", "torch_port", "torch_port_output", "jax", "jax_port", "jax_port_output")


def _port_blocks() -> dict[str, str]:
    """The section's blocks by role: a torch model, its unroll port and what the port prints; a JAX
    scan, its port and what that prints."""
    blocks = _blocks(_section("Coming from PyTorch / JAX"))
    assert [lang for lang, _ in blocks] == ["python", "python", "", "python", "python", ""], \
        "the section's blocks changed: give each a role here so that every one is still executed"
    return dict(zip(PORT_ROLES, (body for _, body in blocks)))


def _exec(code: str) -> tuple[dict, str]:
    """(namespace, printed text) of one block run in a fresh namespace."""
    namespace: dict = {"__name__": "__readme__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, README, "exec"), namespace)  # noqa: S102 - our README
    return namespace, out.getvalue()


@pytest.fixture(scope="module")
def ports() -> tuple[dict[str, str], dict[str, tuple[dict, str]]]:
    """Each unroll block run once: a second run, while the first one's model lives, would find its
    parameter names claimed and print renamed ones (unroll.nn.module's parameter identity)."""
    blocks = _port_blocks()
    return blocks, {role: _exec(blocks[role]) for role in ("torch_port", "jax_port")}


@pytest.mark.parametrize("role", ["torch_port", "jax_port"])
def test_the_ports_print_what_the_readme_shows(ports, role):
    blocks, runs = ports
    assert runs[role][1].strip() == blocks[role + "_output"].strip()


def test_the_torch_port_computes_torchs_loss_and_gradients(ports):
    torch = pytest.importorskip("torch")
    import numpy as np
    blocks, runs = ports
    torch.manual_seed(0)
    theirs, _ = _exec(blocks["torch"])
    ours = runs["torch_port"][0]
    model, step = ours["model"], ours["step"]
    model.load_state_dict(theirs["model"].state_dict())  # torch's weights, by torch's names
    loss, *grads = step(x=theirs["x"].numpy(), labels=theirs["labels"].numpy(), **model.state_dict())
    assert abs(float(loss) - theirs["loss"].item()) <= 1e-5 * abs(theirs["loss"].item())
    torch_grads = dict(theirs["model"].named_parameters())
    for param, got in zip(model.parameters(), grads):
        want = torch_grads[param.name].grad.numpy()
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= 1e-4, f"{param.name}: relative error {err:.3g} against torch autograd"


def test_the_jax_port_computes_jaxs_loss_and_gradients(ports):
    pytest.importorskip("jax")  # optional (the [bench] extra): the unroll block ran above without it
    import numpy as np
    blocks, runs = ports
    theirs, printed = _exec(blocks["jax"])
    ours = runs["jax_port"][0]
    assert printed.strip() == blocks["jax_port_output"].strip()  # the same numbers in, the same loss out
    np.testing.assert_allclose(float(ours["loss_v"]), float(theirs["loss"]), rtol=1e-5)
    for got, want in zip(ours["grads_v"], theirs["grads"], strict=True):
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-6)


# ---- Your own cell: the shape error a mistake raises ------------------------------------------------

def test_a_shape_mistake_names_the_op_both_shapes_and_the_users_line():
    """The README's cell with W_h where W_x belongs (x_t @ W_h: f32[16,8] @ f32[32,32]) raises the
    ShapeError the README shows; its `at` line names this file and the line of the mistake."""
    import unroll as ur
    section = _section("Your own cell")
    cell, shown = _blocks(section)[0][1], _blocks(section)[1][1]
    assert "h = ur.tanh(x_t @ W_x + h @ W_h + b)" in cell  # the line the mistake below miswrites
    message, at = shown.strip().split("\n")

    T, B, I, H = 50, 16, 8, 32
    x = ur.input("x", (T, B, I))
    W_x, W_h, b = ur.param("W_x", (I, H), 0.1), ur.param("W_h", (H, H), 0.1), ur.param("b", (H,))

    def step(h, x_t):
        h = ur.tanh(x_t @ W_h + h @ W_h + b)  # the mistake: W_h where W_x belongs
        return h, h

    mistake_line = step.__code__.co_firstlineno + 1
    with pytest.raises(ur.ShapeError) as raised:
        ur.scan(step, ur.zeros((B, H)), x)
    first, where = str(raised.value).split("\n")
    assert first == message
    # the README's path and line are an example's; here they must be this file and the mistake's line
    assert re.fullmatch(r"  at (.+):(\d+)", at), at
    found = re.fullmatch(r"  at (.+):(\d+)", where)
    assert found, where
    assert os.path.samefile(found.group(1), __file__) and int(found.group(2)) == mistake_line, where


# ---- Backprop through time: docs/bptt_example.py's truncation bias ----------------------------------

def test_the_truncation_bias_is_what_docs_bptt_example_prints():
    """docs/bptt_example.py, run as a user runs it, prints the README's bias lines; the README's
    excerpt of it is its code."""
    import subprocess
    import sys
    script = os.path.join(ROOT, "docs", "bptt_example.py")
    source = open(script, encoding="utf-8").read()
    blocks = _blocks(_section("Backprop through time"))
    i = next(i for i, (_, body) in enumerate(blocks) if body.startswith("k="))
    (lang, excerpt), shown = blocks[i - 1], blocks[i][1]
    assert lang == "python"
    for line in excerpt.strip().splitlines():
        code = line.split("#")[0].strip()
        assert code in source, f"the README quotes {code!r}, which docs/bptt_example.py does not run"
    printed = subprocess.run([sys.executable, script], cwd=ROOT, capture_output=True, text=True,
                             timeout=300, check=True).stdout
    assert [s for s in printed.splitlines() if s.startswith("k=")] == shown.strip().splitlines()


# ---- Optimizing: the report table --------------------------------------------------------------------

def test_the_optimize_report_is_what_the_readme_shows():
    """The LSTM training graph the README describes (T=50, B=16, I=32, H=64; the loss `unroll bench`
    times, MSE over every step, and its gradients w.r.t. the LSTM's parameters) optimized with
    report=True, which returns (optimized graph, report)."""
    import unroll as ur
    shown = next(body for _, body in _blocks(_section("Optimizing")) if body.startswith("pass "))
    T, B, I, H = 50, 16, 32, 64
    x, y = ur.input("x", (T, B, I)), ur.input("y", (T, B, H))
    lstm = ur.nn.LSTM(I, H)
    out, _ = lstm(x)
    loss = ur.mean((out - y) ** 2)
    graph = ur.graph([loss, *ur.grad(loss, lstm.parameters())])
    optimized, report = ur.optimize(graph, report=True)
    assert optimized == report.graph
    assert str(report) == shown.strip()
    assert str(ur.explain(graph)) == str(report)
    assert report.diff("hoist").startswith("--- before hoist")


def test_the_polymorphic_step_prints_what_the_readme_shows(fresh_cache_dir):
    blocks = _blocks(_section("Every sequence length and batch size"))
    (lang, code), (_, shown) = blocks[0], blocks[1]
    assert lang == "python"
    assert _run(code).strip() == shown.strip()


# ---- Quick start: every extra is named with what it pulls in and how big it is ---------------------

# the names a reader knows each requirement by, as the README writes them
EXTRA_NAMES = {"scikit-learn": "scikit-learn", "sacrebleu": "sacrebleu", "torch": "PyTorch", "jax": "JAX",
               "jaxlib": "JAX", "pytest": "pytest", "hypothesis": "hypothesis", "numba-cuda": "numba-cuda",
               "nvidia-cuda-nvrtc": "NVRTC", "mpi4py": "mpi4py", "mpich": "MPICH"}


def _extras() -> dict[str, list[str]]:
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    return {name: [re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0] for req in reqs] for name, reqs in extras.items()}


def test_the_quick_start_says_what_each_extra_pulls_in_and_how_big_it_is():
    """Each extra in pyproject.toml has its own clause in the Quick start, from `".[name]"` to the next
    extra: it names every package the extra adds and gives its installed size (about N MB or GB)."""
    section = _section("Quick start")
    extras = _extras()
    for name, requirements in extras.items():
        start = section.find(f'".[{name}]"')
        assert start >= 0, f'the Quick start does not name the extra ".[{name}]"'
        ends = [i for i in (section.find('".[', start + 1), section.find("\n\n", start)) if i > 0]
        clause = section[start:min(ends) if ends else None]
        for requirement in requirements:
            shown = EXTRA_NAMES.get(requirement, requirement)
            assert shown in clause, f'the Quick start\'s ".[{name}]" clause does not say it adds {shown}'
        assert re.search(r"about \d+(\.\d+)? [MG]B", clause), f'".[{name}]": no size (about N MB) given'


def test_the_readme_names_the_extra_of_every_task_that_needs_one():
    """The tasks that read scikit-learn's digits are the ones the Quick start says need ".[examples]"."""
    from unroll.tasks import TASKS
    section = _section("Quick start")
    clause = section[section.index('".[examples]"'):]
    clause = clause[:clause.find('".[', 1)]
    for name, task in TASKS.items():
        if task.needs:
            assert re.search(rf"\b{name}\b", clause), \
                f"unroll train {name} needs .[examples]; the README does not say so"


# ---- the examples' results the README states are their docstrings' measured runs -------------------
# Each number below is re-derived by tests/test_examples.py from the docstring's `main(...) ->` line
# (the full runs with `pytest -m slow`), so the README cannot drift from what the scripts give.

def _stated(script: str, args: str = "") -> dict[str, str]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_examples import docstring_runs
    runs = docstring_runs(script)
    assert args in runs, f"{script}: no `main({args}) -> ...` line in its docstring"
    return {key: value for key, (op, value) in runs[args][1].items() if op == "="}


def _percent(value: str) -> str:
    return f"{float(value) * 100:.1f}"


def _check(where: str, readme: str, script: str, key: str, args: str = "", scale=_percent) -> None:
    stated = _stated(script, args)
    assert key in stated, f"the README states {where} = {readme}; {script}'s main({args}) line has no {key}"
    assert scale(stated[key]) == readme, (f"the README says {where} {readme}, {script}'s docstring "
                                          f"main({args}) -> {key}={stated[key]}")


def test_the_example_results_in_the_readme_are_the_docstrings_measured_runs():
    text = open(README, encoding="utf-8").read()
    flat = " ".join(text.split())

    def number(pattern: str) -> str:
        found = re.search(pattern, flat)
        assert found, f"the README no longer says {pattern!r}: update this test"
        return found.group(1)

    _check("S2VT", number(r"S2VT in miniature .*? gets (\d+\.\d)% of held-out sentences"),
           "video_description.py", "sentence_accuracy")
    _check("caption greedy", number(r"`ur\.nn\.greedy_decode` \((\d+\.\d)% exact\)"), "caption_digits.py",
           "caption_accuracy")
    _check("caption beam 4", number(r"`ur\.nn\.beam_search` \(width 4: (\d+\.\d)%\)"), "caption_digits.py",
           "beam_accuracy")
    _check("seq2seq_dates", number(r"seq2seq_dates\.py, the same task without attention, gets (\d+\.\d)%"),
           "seq2seq_dates.py", "sequence_accuracy")
    assert "gets all 1000 held-out dates exactly right" in flat
    _check("translate_dates", "100.0", "translate_dates.py", "sequence_accuracy")

    # the video table: accuracy, direction, digit, parameters per model
    rows = re.findall(r"^\| (LSTM|GRU|TCN)[^|]* \| (\d+\.\d)% \| (\d+\.\d)% \| (\d+\.\d)% \| ([\d,]+) \|", text, re.M)
    assert [r[0] for r in rows] == ["LSTM", "GRU", "TCN"], rows
    for model, accuracy, direction, digit, parameters in rows:
        for key, shown in ((f"{model}_accuracy", accuracy), (f"{model}_direction_accuracy", direction),
                           (f"{model}_digit_accuracy", digit)):
            _check(f"video {key}", shown, "video_classification.py", key)
        _check(f"video {model} parameters", parameters, "video_classification.py", f"{model}_parameters",
               scale=lambda v: f"{int(v):,}")

    # the numbers-to-words table: exact match and BLEU per decoder after 3 and after 8 epochs
    block = next(body for _, body in _blocks(_section("Attention and beam search")) if "3 epochs" in body)
    rows = re.findall(r"^(greedy|beam \d)\s+(\d+\.\d)%\s+(\d+\.\d)\s+(\d+\.\d)%\s+(\d+\.\d)$", block, re.M)
    assert [r[0] for r in rows] == ["greedy", "beam 1", "beam 4", "beam 8"], rows
    for decoder, exact3, bleu3, exact8, bleu8 in rows:
        name = decoder.replace(" ", "")
        for args, exact, bleu in (("epochs=3", exact3, bleu3), ("", exact8, bleu8)):
            _check(f"numbers {decoder} exact", exact, "numbers_to_words.py", f"{name}_accuracy", args)
            _check(f"numbers {decoder} BLEU", bleu, "numbers_to_words.py", f"{name}_bleu", args,
                   scale=lambda v: f"{float(v):.1f}")
