"""The `unroll` command line: --help on every subcommand, `demo --quick`, draw, train, flow, bench."""

from __future__ import annotations

import gc
import subprocess
import sys
import types

import pytest

from unroll import cli, viz

SUBCOMMANDS = ("demo", "draw", "train", "flow")


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's --help and usage errors
        code = exit_.code
    return int(code or 0), capsys.readouterr().out


def test_top_level_help_lists_every_subcommand(capsys):
    code, out = _run(["--help"], capsys)
    assert code == 0
    for name in SUBCOMMANDS + ("bench",):
        assert name in out
    code, out = _run([], capsys)                       # no command: the same help, exit 0
    assert code == 0 and "demo" in out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command, capsys):
    code, out = _run([command, "--help"], capsys)
    assert code == 0
    assert out.startswith(f"usage: unroll {command}")


def test_train_help_lists_the_tasks(capsys):
    _, out = _run(["train", "--help"], capsys)
    for task in ("adding", "copy", "digits", "charlm", "caption", "seq2seq"):
        assert task in out


def test_bench_forwards_everything_to_unroll_bench(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("unroll.bench")
    fake.main = lambda argv: seen.append(argv) or 0    # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "unroll.bench", fake)
    assert _run(["bench", "--help"], capsys)[0] == 0
    assert _run(["bench", "--cells", "lstm", "-n", "3"], capsys)[0] == 0
    assert seen == [["--help"], ["--cells", "lstm", "-n", "3"]]


def test_bench_help_of_the_real_module(capsys):
    pytest.importorskip("unroll.bench")
    code, out = _run(["bench", "--help"], capsys)
    assert code == 0 and "usage" in out


def test_bad_arguments_exit_with_usage(capsys):
    try:
        cli.main(["draw", "transformer"])
    except SystemExit as exit_:
        assert exit_.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "unroll.cli", "--help"], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0 and "unroll demo" in done.stdout


def test_demo_quick_writes_every_file(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    code, out = _run(["demo", "--quick", "--out", str(out_dir), "--no-bench"], capsys)
    assert code == 0
    picture = "svg" if viz_can_render() else "dot"
    for stem in ("lstm_rolled", "lstm_unrolled", "lstm_backward_rolled", "lstm_backward_unrolled"):
        assert (out_dir / f"{stem}.{picture}").stat().st_size > 0
    assert (out_dir / "gradient_flow.png").read_bytes()[:4] == b"\x89PNG"
    assert (out_dir / "adding_lstm.npz").exists()
    assert "loop length=20" in out                      # the printed IR, loop still rolled
    assert "test MSE" in out and "0.167" in out


def test_demo_quick_bench_numpy_only(tmp_path, capsys):
    from unroll.demo import DemoConfig, _Out, bench, build_adding_model
    gc.collect()  # an earlier demo's modules of the same names must be gone (no SharedNameWarning)
    cfg = DemoConfig(out=tmp_path, quick=True, T=4, batch=2, hidden=3)
    result = types.SimpleNamespace(bench={})
    bench(cfg, build_adding_model(4, 2, 3, seed=0), _Out(sys.stdout), result)  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "unroll numpy (reference)" in out and "ms/step" in out
    assert result.bench["unroll numpy (reference)"] > 0


def viz_can_render() -> bool:
    try:
        viz.render("digraph { a }", "svg")
    except RuntimeError:
        return False
    return True


def test_without_graphviz_dot_files_and_install_hint(tmp_path, monkeypatch, capsys):
    def no_dot(text: str, format: str = "svg") -> bytes:
        raise RuntimeError(viz.NO_DOT_MESSAGE.format(fmt=format))
    monkeypatch.setattr(viz, "render", no_dot)
    from unroll.demo import DemoConfig, DemoResult, _Out, draw_pictures
    result = DemoResult()
    draw_pictures(DemoConfig(out=tmp_path, quick=True), _Out(sys.stdout), result)
    out = capsys.readouterr().out
    assert [p.suffix for p in result.files] == [".dot"] * 4 and all(p.exists() for p in result.files)
    assert not result.rendered and "apt-get install graphviz" in out

    code, _ = _run(["draw", "gru", "-o", str(tmp_path / "gru.svg")], capsys)
    # the .svg asked for does not exist: a non-zero exit, the DOT text beside it
    assert code == 3 and (tmp_path / "gru.dot").read_text().startswith("digraph")
    assert not (tmp_path / "gru.svg").exists()


@pytest.mark.parametrize("model,view", [("lstm", "rolled"), ("gru", "unrolled"), ("rnn", "cell"),
                                        ("lstm", "cell"), ("tcn", "rolled"), ("lstm", "backward")])
def test_draw_writes_dot_text(model, view, tmp_path, capsys):
    path = tmp_path / f"{model}_{view}.dot"
    code, out = _run(["draw", model, "--view", view, "-o", str(path), "--print-ir"], capsys)
    assert code == 0 and f"wrote {path}" in out
    text = path.read_text()
    assert text.startswith("digraph")
    if view == "rolled" and model != "tcn":
        assert "loop" in out                            # --print-ir printed a rolled loop
    if view == "cell":
        assert "loop" not in out


def test_draw_backward_unrolled_renders(tmp_path, capsys):
    if not viz_can_render():
        pytest.skip("Graphviz's dot is not installed")
    path = tmp_path / "b.svg"
    code, _ = _run(["draw", "rnn", "--view", "backward", "--unrolled", "--T", "3", "-o", str(path)], capsys)
    assert code == 0 and path.read_text().lstrip().startswith(("<?xml", "<svg"))


def test_draw_seq2seq_shows_the_encoder_and_decoder_loops_and_attention(tmp_path, capsys):
    path = tmp_path / "s2s.dot"
    code, out = _run(["draw", "seq2seq", "-o", str(path), "--print-ir"], capsys)
    assert code == 0 and out.count(" = loop ") == 4   # encoder: both directions, layer 2; the decoder
    text = path.read_text()
    assert "attention" in text and "decoder" in text and "encoder" in text


def test_draw_tcn_has_no_cell(capsys):
    with pytest.raises(SystemExit, match="no recurrent cell"):
        cli.main(["draw", "tcn", "--view", "cell"])


def test_flow_writes_a_png(tmp_path, capsys):
    path = tmp_path / "flow.png"
    code, out = _run(["flow", "--T", "5", "--hidden", "3", "--batch", "2", "-o", str(path)], capsys)
    assert code == 0 and path.read_bytes()[:4] == b"\x89PNG"
    assert out.count("per step back") == 3


def test_train_runs_a_task_quickly(capsys):
    code, out = _run(["train", "adding", "--quick", "--backend", "numpy"], capsys)
    assert code == 0
    assert "adding:" in out and "LSTM_mse=" in out


def test_train_reports_missing_examples(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("UNROLL_EXAMPLES", str(tmp_path))
    code = cli.main(["train", "digits", "--quick"])
    assert code == 2 and "UNROLL_EXAMPLES" in capsys.readouterr().err


SKLEARN_TASKS = [name for name, task in __import__("unroll.tasks").tasks.TASKS.items() if "sklearn" in task.needs]


def test_the_tasks_that_read_scikit_learns_digits_declare_it():
    """Every example that imports sklearn is a task whose `needs` names it (so `unroll train` can say
    which extra to install before it starts), and the four that do are the ones the README names."""
    from unroll.tasks import TASKS, examples_dir
    for name, task in TASKS.items():
        imports = "from sklearn" in (examples_dir() / task.script).read_text(encoding="utf-8")
        assert imports == ("sklearn" in task.needs), name
    assert sorted(SKLEARN_TASKS) == ["caption", "digits", "s2vt", "video"]


@pytest.mark.parametrize("task", SKLEARN_TASKS)
def test_train_without_the_examples_extra_names_it_in_one_line(task):
    """`unroll train digits` (caption, video, s2vt) where scikit-learn is not installed: exit 2 and one
    line naming the extra, no traceback; checked in a fresh process in which sklearn cannot import."""
    code = ("import sys; sys.modules['sklearn'] = None; from unroll.cli import main; "
            f"sys.exit(main(['train', {task!r}, '--quick', '--backend', 'numpy']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"unroll train: task {task!r} needs scikit-learn, which is not installed: "
                                   f'pip install -e ".[examples]"')
    assert done.stdout == ""


def test_an_undeclared_missing_import_is_still_one_line(monkeypatch, capsys):
    """A script importing an extra's module that its task does not declare fails the same way once
    the import fails, instead of with a traceback."""
    import dataclasses

    from unroll import tasks
    monkeypatch.setitem(tasks.TASKS, "digits", dataclasses.replace(tasks.TASKS["digits"], needs=()))
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert cli.main(["train", "digits", "--quick", "--backend", "numpy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'needs scikit-learn, which is not installed: pip install -e ".[examples]"' in err


def _readme_commands() -> list[str]:
    """Every `unroll ...` command of the README: the lines of its bash blocks (an `mpiexec -n P`
    prefix dropped) and the complete ones written inline."""
    import os
    import re
    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"),
                encoding="utf-8").read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = re.sub(r"^mpiexec -n \d+ ", "", line.split("#")[0].strip())
            commands += [part.strip() for part in line.split("&&") if part.strip().startswith("unroll")]
    inline = [" ".join(c.split()) for c in re.findall(r"`(unroll [^`]*)`", text)]
    commands += [c for c in inline if c != "unroll train --distributed"]  # that one names the option only
    return sorted(set(commands))


@pytest.mark.parametrize("command", _readme_commands())
def test_every_unroll_command_in_the_readme_parses(command, capsys):
    """Each command the README shows is accepted as written (subcommand, task and options), without
    running it: `unroll bench` parses with --help appended, after the README's own arguments."""
    argv = command.split()[1:]
    if argv[:1] == ["bench"]:
        with pytest.raises(SystemExit) as done:
            cli.main([*argv, "--help"])
        assert done.value.code == 0, capsys.readouterr().err
        return
    args = cli.build_parser().parse_args(argv)
    assert args.command == argv[0] and callable(args.run)


def test_console_script_points_at_main():
    from importlib.metadata import entry_points
    scripts = [ep for ep in entry_points(group="console_scripts") if ep.name == "unroll"]
    if not scripts:
        pytest.skip("the package is not installed (pip install -e .)")
    assert scripts[0].value == "unroll.cli:main"
