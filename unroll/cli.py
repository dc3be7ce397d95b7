"""The `unroll` command line: demo, draw, train, flow and bench subcommands (argparse, --help on each).

    unroll demo                      # build, print, draw, train and time an LSTM (about a minute)
    unroll draw lstm --view unrolled -o lstm.svg
    unroll train digits --epochs 5 --backend numba
    mpiexec -n 2 unroll train adding --distributed   # data-parallel over 2 MPI processes
    unroll flow -o flow.png          # ‖∂L/∂h_t‖ of RNN vs LSTM vs GRU
    unroll bench ...                 # the benchmark suite (unroll.bench)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

BACKENDS = ("numpy", "numba", "cuda")
MODELS = ("rnn", "lstm", "gru", "tcn", "seq2seq")
VIEWS = ("rolled", "unrolled", "cell", "backward")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text}")
    return value


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive, default=None,
                   help="BLAS threads (default 1: fastest for these small matrices, and more threads "
                        "oversubscribe a busy machine; with --distributed: the node's cores // its ranks)")


@contextlib.contextmanager
def _blas_threads(count: int) -> Iterator[None]:
    """Limit numpy's BLAS threads for the command (threadpoolctl, when installed; OpenBLAS reads
    OPENBLAS_NUM_THREADS only when it loads, which `import unroll` has already done)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=count, user_api="blas"):
        yield


# ---- demo -----------------------------------------------------------------------------------------


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="build, print, draw, train and benchmark an LSTM (no arguments needed)",
        description="Build an LSTM for the adding problem, print its IR, draw it rolled, unrolled and "
                    "with its backward pass, train it (progress bar; test MSE vs the trivial 0.167), "
                    "plot its gradient flow and time one training step against the numpy reference "
                    "and PyTorch. Pictures need Graphviz's `dot`; without it .dot files are written.")
    p.add_argument("--out", type=Path, default=Path("unroll_demo"),
                   help="output folder (default: ./unroll_demo)")
    p.add_argument("--quick", action="store_true", help="tiny settings: a few steps, still writes every file")
    p.add_argument("--backend", choices=("auto", "numpy", "numba"), default="auto",
                   help="training backend (default auto: numba when available, else numpy)")
    p.add_argument("--steps", type=_positive, default=None, help="training steps (default 600; quick: 8)")
    p.add_argument("--T", type=_positive, default=20, help="sequence length (default 20)")
    p.add_argument("--hidden", type=_positive, default=32, help="hidden size (default 32)")
    p.add_argument("--batch", type=_positive, default=64, help="batch size (default 64)")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 0.01)")
    p.add_argument("--format", dest="fmt", choices=("svg", "png", "pdf", "dot"), default="svg",
                   help="picture format (default svg)")
    p.add_argument("--no-bench", dest="bench", action="store_false", help="skip the benchmark")
    p.add_argument("--seed", type=int, default=0)
    _add_threads(p)
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo
    cfg = DemoConfig(out=args.out, quick=args.quick, backend=args.backend, T=args.T, batch=args.batch,
                     hidden=args.hidden, steps=args.steps, lr=args.lr, fmt=args.fmt, bench=args.bench,
                     seed=args.seed)
    run_demo(cfg)
    return 0


# ---- draw -----------------------------------------------------------------------------------------


def _add_draw(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "draw", help="draw a model or one cell (rolled, unrolled, backward) to a picture",
        description="Build a small named model on a symbolic input (T, B, I) with an MSE loss on every "
                    "step and draw it (seq2seq: the GNMT-style encoder-decoder, whose decoder loop "
                    "attends to the encoder's outputs). Views: rolled (the loop as written), unrolled (one cell per "
                    "step), cell (one step of the recurrence, no loop), backward (loss and gradients, "
                    "add --unrolled to unroll them). The format comes from the output's suffix (.svg, "
                    ".png, .pdf, .dot); without Graphviz's `dot` only .dot works.")
    p.add_argument("model", choices=MODELS, help="what to draw")
    p.add_argument("--view", choices=VIEWS, default="rolled", help="default rolled")
    p.add_argument("--unrolled", action="store_true", help="with --view backward: unroll it too")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="output file (default: MODEL_VIEW.svg in the current folder)")
    p.add_argument("--T", type=_positive, default=4, help="sequence length (default 4)")
    p.add_argument("--batch", type=_positive, default=1, help="batch size (default 1)")
    p.add_argument("--input", type=_positive, default=2, help="input size (default 2)")
    p.add_argument("--hidden", type=_positive, default=3, help="hidden size / channels (default 3)")
    p.add_argument("--layers", type=_positive, default=1, help="layers (RNNs) or TCN levels (default 1)")
    p.add_argument("--print-ir", action="store_true", help="also print the graph's textual IR")
    p.set_defaults(run=_run_draw)


def _draw_graph(args: argparse.Namespace):
    from . import dsl, nn
    from .ir.autodiff import grad
    from .ir.node import Graph

    T, B, I, H = args.T, args.batch, args.input, args.hidden
    kinds = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
    if args.model == "seq2seq":   # GNMT-style: encoder loops, then a decoder loop attending to them
        if args.view == "cell":
            raise SystemExit("unroll draw: seq2seq is several loops; use --view rolled, unrolled or backward")
        vocab = max(I, 3)
        model = nn.GNMT(src_vocab=vocab, tgt_vocab=vocab, hidden=H, layers=max(2, args.layers))
        src, tgt_in = dsl.input("src", (T, B), "int64"), dsl.input("tgt_in", (T, B), "int64")
        out, _ = model(src, dsl.input("src_lens", (B,), "int64"), tgt_in)
    elif args.model == "tcn":
        if args.view == "cell":
            raise SystemExit("unroll draw: a TCN has no recurrent cell; use --view rolled or backward")
        model = nn.TCN(I, [H] * args.layers, kernel_size=2)
        x = dsl.input("x", (T, B, I))
        out = model(x)
    else:
        model = kinds[args.model](I, H, num_layers=args.layers)
        if args.view == "cell":
            x_t = dsl.input("x_t", (B, I))
            h = dsl.input("h", (B, H))
            if args.model == "lstm":
                (h_new, c_new), _ = model.cell()((h, dsl.input("c", (B, H))), x_t)
                return dsl.graph(h_new, c_new, names=("h_next", "c_next"))
            h_new, _ = model.cell()(h, x_t)
            return dsl.graph(h_new, names=("h_next",))
        x = dsl.input("x", (T, B, I))
        out, _ = model(x)
    y = dsl.input("y", out.shape)
    loss = nn.mse(out, y)
    if args.view == "backward":
        return Graph.of([loss, *grad(loss, model.parameters())])
    return dsl.graph(loss)


def _run_draw(args: argparse.Namespace) -> int:
    from .viz import draw
    graph = _draw_graph(args)
    view = "unrolled" if args.view == "unrolled" or (args.view == "backward" and args.unrolled) else "rolled"
    if args.print_ir:
        print(graph)
    path = args.output or Path(f"{args.model}_{args.view}{'_unrolled' if args.unrolled else ''}.svg")
    try:
        written = draw(graph, path, view=view)
    except RuntimeError as err:
        if "not found" not in str(err):
            raise
        written = draw(graph, path.with_suffix(".dot"), view=view)
        print(f"unroll draw: Graphviz's `dot` is missing, so {path} was NOT written; wrote DOT text to "
              f"{written} instead (apt-get install graphviz, or pip install pygraphviz; then "
              f"dot -T{path.suffix.lstrip('.') or 'svg'} {written} -o {path})", file=sys.stderr)
        return 3  # the asked-for picture does not exist: scripts must not take this for success
    print(f"wrote {written}")
    return 0


# ---- train ----------------------------------------------------------------------------------------


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .tasks import TASKS
    lines = "\n".join(f"  {t.name:<8} {t.summary}  (examples/{t.script})" for t in TASKS.values())
    p = sub.add_parser(
        "train", help="train one of the example tasks", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Run an example task from examples/ and print its result.\n\ntasks:\n{lines}")
    p.add_argument("task", choices=list(TASKS), help="which task")
    p.add_argument("--epochs", type=_positive, default=None, help="epochs (default: the task's own)")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="default: numba when installed, else numpy (each example's docstring states "
                        "its numbers for --backend numpy, the reference)")
    p.add_argument("--hidden", type=_positive, default=None, help="hidden size (default: the task's own)")
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distributed", action="store_true",
                   help="train data-parallel over the MPI ranks: run as `mpiexec -n P unroll train TASK "
                        "--distributed` (needs pip install \"unroll[mpi]\"); each rank trains on the "
                        "task's batch size, so the global batch is P times it; rank 0 prints")
    _add_threads(p)
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .compile import default_backend
    from .tasks import MissingExtra, run_task
    try:
        result = run_task(args.task, quick=args.quick, backend=args.backend or default_backend(), epochs=args.epochs,
                          hidden=args.hidden, seed=args.seed)
    except (FileNotFoundError, MissingExtra) as err:
        print(f"unroll train: {err}", file=sys.stderr)
        return 2
    print(f"\n{args.task}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in result.items()))
    return 0


def _run_distributed(args: argparse.Namespace) -> int:
    """`train --distributed`: every `ur.fit` of the task trains over MPI.COMM_WORLD; rank 0 prints."""
    from . import distributed
    try:
        comm = distributed.world()
    except ImportError as err:
        print(f"unroll train --distributed: {err}", file=sys.stderr)
        return 2
    distributed.abort_on_error(comm)  # an error on one rank must not leave the others waiting
    if args.threads is None:
        distributed.set_threads(comm)
    size = comm.Get_size()
    if comm.Get_rank() == 0:
        note = "" if size > 1 else " (start it under `mpiexec -n P` to train on P processes)"
        print(f"unroll train --distributed: {size} rank{'s' * (size > 1)}{note}", flush=True)
    with distributed.default(comm), distributed.root_only_output(comm), \
            _blas_threads(args.threads) if args.threads else contextlib.nullcontext():
        code = _run_train(args)
    if code and size > 1:  # a failure on one rank only: stop the others rather than hang
        comm.Abort(code)
    return code


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---- flow -----------------------------------------------------------------------------------------


def _add_flow(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flow", help="plot the gradient flow ‖∂L/∂h_t‖ of RNN vs LSTM vs GRU",
        description="Measure ‖∂L/∂h_t‖ for every time step t (loss on the last step of an "
                    "adding-problem batch) for each cell kind, print the per-step decay and plot it "
                    "on a log scale.")
    p.add_argument("-o", "--output", type=Path, default=Path("gradient_flow.png"), help="PNG file")
    p.add_argument("--kinds", nargs="+", choices=("RNN", "LSTM", "GRU"), default=["RNN", "LSTM", "GRU"])
    p.add_argument("--T", type=_positive, default=100, help="sequence length (default 100)")
    p.add_argument("--hidden", type=_positive, default=32, help="hidden size (default 32)")
    p.add_argument("--batch", type=_positive, default=32, help="batch size (default 32)")
    p.add_argument("--train-steps", type=int, default=0, help="train each model this many steps first")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="default: numba when installed, else numpy (the reference)")
    p.add_argument("--seed", type=int, default=0)
    _add_threads(p)
    p.set_defaults(run=_run_flow)


def _run_flow(args: argparse.Namespace) -> int:
    from .diagnostics import compare_gradient_flow, plot_gradient_flow
    from .compile import default_backend
    flows = compare_gradient_flow(args.kinds, T=args.T, batch=args.batch, hidden=args.hidden, seed=args.seed,
                                  backend=args.backend or default_backend(), train_steps=args.train_steps)
    for flow in flows:
        print(flow)
    trained = f", after {args.train_steps} training steps" if args.train_steps else ", at initialisation"
    title = f"‖∂L/∂h_t‖ on the adding problem (T={args.T}{trained})"
    path = plot_gradient_flow(flows, args.output, title=title)
    print(f"wrote {path}")
    return 0


# ---- bench ----------------------------------------------------------------------------------------


def _add_bench(sub: argparse._SubParsersAction) -> None:
    # everything after `bench` (--help included) goes to unroll.bench.main
    p = sub.add_parser("bench", help="benchmark backends against PyTorch/JAX (unroll bench --help)",
                       add_help=False, prefix_chars="\0")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    try:
        from .bench import main as bench_main
    except ImportError as err:
        print(f"unroll bench: the benchmark module is not available ({err})", file=sys.stderr)
        return 2
    code = bench_main(list(args.args))
    return int(code or 0)


# ---- cache ----------------------------------------------------------------------------------------


def _add_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache", help="show where compiled code is cached and how big it is; --clear empties it",
        description="The generated modules, their records and Numba's machine code live under "
                    "$UNROLL_CACHE_DIR (default ~/.cache/unroll). Entries are validated when loaded, "
                    "so clearing is never needed for correctness, only to reclaim space.")
    p.add_argument("--clear", action="store_true", help="remove every cached entry")
    p.set_defaults(run=_run_cache)


def _run_cache(args: argparse.Namespace) -> int:
    from .backends import cache
    info = cache.summary()
    print(f"cache directory: {info['directory']}")
    print(f"  {info['modules']} modules, {info['files']} files, {info['bytes'] / 1e6:.1f} MB")
    print(f"  Numba's machine code: {info['numba_cache_dir']}")
    if args.clear:
        print(f"removed {cache.clear()} files")
    return 0


# ---- entry point ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(
        prog="unroll", description="unroll: a compiler for recurrent neural networks. "
                                   "Start with `unroll demo`.")
    parser.add_argument("--version", action="version", version=f"unroll {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_demo, _add_draw, _add_train, _add_flow, _add_bench, _add_cache):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "distributed", False):
        return _run_distributed(args)
    threads = (args.threads or 1) if hasattr(args, "threads") else None  # demo, train, flow
    with _blas_threads(threads) if threads else contextlib.nullcontext():
        return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
