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


def test_console_script_points_at_main():
    from importlib.metadata import entry_points
    scripts = [ep for ep in entry_points(group="console_scripts") if ep.name == "unroll"]
    if not scripts:
        pytest.skip("the package is not installed (pip install -e .)")
    assert scripts[0].value == "unroll.cli:main"
