"""Random-graph equivalence: every backend, every transformation, against the numpy reference.

Properties (each on random graphs from tests/strategies.py: every op of the op table, int and bool
values, the DSL's compositions, scan loops with nesting; forward graphs and, where drawn, their
training graphs [loss, *grads]):

    unroll      the reference on `ur.unroll(g)` and `ur.unroll(g, factor)` == on g (float64, tight)
    optimize    the reference after `ur.optimize` and after each backend's own pass pipeline == before
    numba       the CPU backend (native LLVM renderer), with and without its passes, == the reference
    numba codegen   the same compiled through Numba (UNROLL_CPU_CODEGEN=numba, its fallback)
    emulator    the CUDA backend's kernels in the multi-block grid emulator (cuda.gridsim) == reference
    simulator   the CUDA backend in numba's CUDA simulator (a child process) == the reference
    coverage    the strategies draw every op of `unroll.ir.ops.Op` (the list comes from the enum)

Example counts. Each property test is parametrised by its budget: `[default]` runs a few examples in
the default suite, `[slow]` (marked `slow`) a few hundred in the slow job,
`python3 -m pytest -q -m slow tests/test_properties.py` (.ci/run runs it after the default suite).
`UNROLL_PROPERTY_SCALE=4` multiplies the slow counts for a deeper local run. The runs are
derandomized (the same examples every run, whichever tests ran before in the process: tests/conftest.py
stops hypothesis from drawing constants out of the modules imported so far, so CI fails only when
code changes); for a random search,
set `HYPOTHESIS_PROFILE=explore` (random seeds, hypothesis' example database in .hypothesis/).

Regressions. Every failure the properties found is kept as an explicit test at the end of this
module (`REGRESSIONS`): a small hand-written DSL graph with its feeds, reduced from the random one,
run on every backend and transformation in the default suite. Explicit graphs rather than
`@example` blobs or a checked-in hypothesis example database: a database entry is an opaque choice
sequence that silently turns into another graph (or into nothing) when the strategies change, and
derandomized runs do not read it; a named DSL graph still says what broke after any change to the
strategies, and a backend's author can run it alone. A bug not fixed yet is listed in `KNOWN_BUGS`
with a one-line reason, the backends it breaks and a test for graphs that may show it: its
regression is `xfail(strict=False)` on those backends (a fix makes it pass), and the properties
let those backends fail on such graphs (a hypothesis event, "known bug: ...", in
`--hypothesis-show-statistics`) while still checking every other graph, so the default suite stays
green. Delete the entry with the fix.

Failing examples are not shrunk (shrinking a graph the Numba backend compiles again at every step
runs into hypothesis' 5-minute limit); the failing graph's text is printed instead (`note`), and
`HYPOTHESIS_PROFILE=explore` shrinks.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st

import unroll as ur
from strategies import evaluate, graphs, random_feeds, rnn_cells
from unroll.ir.node import Graph, all_nodes
from unroll.ir.ops import Op
from unroll.ir.text import print_graph

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SIM_CHILD = os.environ.get("UNROLL_PROPERTY_SIM_CHILD") == "1"
EXPLORE = os.environ.get("HYPOTHESIS_PROFILE") == "explore"
SCALE = float(os.environ.get("UNROLL_PROPERTY_SCALE", "1"))
FLOATS = ("float32", "float64")


# ---- budgets: a few examples by default, a few hundred in the slow job ---------------------------

def budget(default: int, slow: int) -> Callable:
    """Parametrise a test by its example count: `[default]`, and `[slow]` marked slow."""
    return pytest.mark.parametrize("examples", [
        pytest.param(default, id="default"),
        pytest.param(max(1, round(slow * SCALE)), id="slow", marks=pytest.mark.slow),
    ])


def run(check: Callable, examples: int) -> None:
    """Run a @given function for `examples` examples: derandomized and without shrinking (shrinking
    a graph that the Numba backend compiles takes hypothesis' limit of 5 minutes; the failing graph's
    text is shown instead), unless exploring."""
    phases = list(Phase) if EXPLORE else [Phase.explicit, Phase.generate]
    settings(settings.default, max_examples=examples, deadline=None, derandomize=not EXPLORE,
             database=settings.default.database if EXPLORE else None, phases=phases,
             suppress_health_check=list(HealthCheck))(check)()


@pytest.fixture(autouse=True, scope="module")
def cache_dir(fresh_cache_dir):
    """Generated modules (and Numba's cache beside them) in a fresh directory (CI's cold cache)."""
    yield


# ---- comparisons ---------------------------------------------------------------------------------

# rtol, and atol relative to the largest magnitude of the expected output (at least 1): random
# graphs reach large values, and a float32 sum of large terms has an absolute error to match
TOLERANCE = {"float32": (2e-4, 2e-5), "float64": (1e-9, 1e-11)}


def assert_close(got: list, want: list, what: str = "", tolerance: tuple[float, float] | None = None) -> None:
    assert len(got) == len(want), (what, len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype, (what, i, g.shape, g.dtype, w.shape, w.dtype)
        if w.dtype.kind == "f":
            rtol, atol = tolerance or TOLERANCE[str(w.dtype)]
            scale = max(1.0, float(np.max(np.abs(w[np.isfinite(w)])))) if np.isfinite(w).any() else 1.0
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol * scale, err_msg=f"{what}: output {i}")
        else:
            np.testing.assert_array_equal(g, w, err_msg=f"{what}: output {i}")


def training_graph(graph: Graph) -> Graph:
    """[loss, *grads]: a loss on every float output, its gradients w.r.t. every float input."""
    floats = [o for o in graph.outputs if o.dtype in FLOATS]
    loss = ur.sum(floats[0])
    for o in floats[1:]:
        loss = loss + ur.sum(o * o)
    return ur.graph(loss, *ur.grad(loss, [n for n in graph.inputs if n.dtype in FLOATS]))


def variant(graph: Graph, kind: str) -> Graph:
    """The graph a backend is given: the graph itself, its full or 2-step unrolling, its training
    graph. The drawn graph's text is shown with a failing example."""
    note(f"drawn graph:\n{print_graph(graph)}")
    if kind == "unroll":
        return ur.unroll(graph)
    if kind == "unroll2":
        return ur.unroll(graph, factor=2)
    if kind == "train":
        return training_graph(graph)
    return graph


VARIANTS = st.sampled_from(["plain", "plain", "unroll", "unroll2", "train"])
SEEDS = st.integers(0, 2**16)


def numba_run(graph: Graph, feeds: dict, optimize: bool) -> list[np.ndarray]:
    from unroll.backends.cpu import backend as numba_cpu
    kernel = numba_cpu.compile_graph(graph, passes=numba_cpu.PASSES if optimize else ())
    return kernel([feeds[n] for n in graph.input_names])


def emulate(graph: Graph, feeds: dict, blocks: int | None, **options) -> list[np.ndarray]:
    """The CUDA backend's program for `graph`, run by the grid emulator with tiny tiles and blocks."""
    from unroll.backends.cuda.backend import build_program
    from unroll.backends.cuda.gridsim import emulate_program
    from unroll.backends.cuda.kernels import Tuning
    from unroll.backends.cuda.loop import DeviceProps
    program = build_program(graph, DeviceProps(sm_count=8), blocks=blocks, threads=16,
                            tuning=Tuning(threads=16, max_blocks=2, mm_tile=(4, 4, 2, 2, 2), reduce_blocks=2),
                            **options)
    return emulate_program(program, [feeds[n.name] for n in program.inputs])


# ---- the strategies cover the op table -----------------------------------------------------------

# ops no user builds directly: fused nodes come from the fuse_cells / fuse_top_level passes
PASS_MADE = {Op.FUSED}


def test_strategies_cover_every_op():
    """Every op of the enum (not a hand-kept list) in 400 drawn graphs; FUSED in their optimized forms."""
    from unroll.backends.cuda.backend import PASSES as CUDA_PASSES
    seen: set[Op] = set()
    fused: set[Op] = set()

    @given(graphs())
    def draw(graph):
        seen.update(n.op for n, _ in all_nodes(graph))
        if Op.FUSED not in fused and any(n.op is Op.LOOP for n in graph.nodes()):
            fused.update(n.op for n, _ in all_nodes(ur.optimize(graph, passes=list(CUDA_PASSES))))
    run(draw, 400)
    missing = sorted(op.name for op in set(Op) - PASS_MADE - seen)
    assert not missing, f"tests/strategies.py never drew {missing} in 400 graphs; add them to graphs()"
    assert PASS_MADE <= fused, "no fused node after the CUDA pass pipeline"


# ---- the reference: unroll and optimize keep the values ------------------------------------------

@budget(default=10, slow=400)
def test_unroll_equals_rolled(examples):
    """float64: the rolled graph, its full unrolling and its unrolling by a factor give the same
    values, forward and for the training graph (grad of the loop vs grad of the unrolled loop)."""
    @given(graphs(dtype="float64", min_loops=1), st.integers(1, 4), st.booleans(), SEEDS)
    def check(graph, factor, train, seed):
        note(f"drawn graph:\n{print_graph(graph)}")
        with tolerating_known_bugs(graph, "reference-unroll"):
            for unrolled in (ur.unroll(graph), ur.unroll(graph, factor=factor)):
                ur.verify(unrolled)
                assert unrolled.input_names == graph.input_names
                rolled, other = (training_graph(graph), training_graph(unrolled)) if train else (graph, unrolled)
                feeds = random_feeds(rolled, seed)
                assert_close(evaluate(other, feeds), evaluate(rolled, feeds), f"unroll factor={factor} train={train}")
    run(check, examples)


@budget(default=10, slow=400)
def test_optimize_preserves_values(examples):
    """float64: ur.optimize and each backend's own pipeline keep the values (forward, training, and
    after unrolling), and ur.verify accepts the result."""
    from unroll.backends.cpu.backend import PASSES as NUMBA_PASSES
    from unroll.backends.cuda.backend import PASSES as CUDA_PASSES
    pipelines = {"default": None, "numba": list(NUMBA_PASSES), "cuda": list(CUDA_PASSES)}

    @given(graphs(dtype="float64"), VARIANTS, st.sampled_from(sorted(pipelines)), SEEDS)
    def check(graph, kind, pipeline, seed):
        before = variant(graph, kind)
        feeds = random_feeds(before, seed)
        with tolerating_known_bugs(before, "reference-optimize"):
            after = ur.optimize(before, passes=pipelines[pipeline])
            ur.verify(after)
            assert_close(evaluate(after, feeds), evaluate(before, feeds), f"{pipeline} pipeline on {kind}",
                         tolerance=(1e-8, 1e-10))
    run(check, examples)


# ---- Numba CPU -----------------------------------------------------------------------------------

def _check_numba_equals_reference(examples: int, what: str) -> None:
    """Random float32/float64 graphs, their unrollings and training graphs, with and without
    passes, on the CPU backend as the environment configures it, against the reference."""
    pytest.importorskip("numba")

    @given(st.sampled_from(FLOATS).flatmap(lambda dtype: graphs(dtype=dtype, max_loops=2)), VARIANTS,
           st.booleans(), SEEDS)
    def check(graph, kind, optimize, seed):
        graph = variant(graph, kind)
        feeds = random_feeds(graph, seed)
        with tolerating_known_bugs(graph, "numba"):
            assert_close(numba_run(graph, feeds, optimize), evaluate(graph, feeds), f"{what} optimize={optimize}")
    run(check, examples)


@budget(default=8, slow=130)
def test_numba_equals_reference(examples):
    """float32 and float64 graphs, their unrollings and training graphs, with and without passes."""
    _check_numba_equals_reference(examples, "numba")


@budget(default=3, slow=40)
def test_numba_codegen_equals_reference(examples, monkeypatch):
    """The same through Numba's compiler (UNROLL_CPU_CODEGEN=numba): the fallback for source the
    native renderer refuses, and the way to step around it, must keep the reference's meaning."""
    monkeypatch.setenv("UNROLL_CPU_CODEGEN", "numba")
    _check_numba_equals_reference(examples, "numba codegen")


@budget(default=4, slow=6)
def test_numba_random_cells_and_their_gradients(examples):
    """Random hand-written recurrent cells (strategies.rnn_cells) and their BPTT gradients."""
    pytest.importorskip("numba")

    @given(rnn_cells())
    def check(cell):
        graph, feeds = cell
        loss = ur.sum(graph.outputs[0] * graph.outputs[0])
        train = ur.graph([loss, *ur.grad(loss, [n for n in graph.inputs if n.dtype == "float32"])])
        with tolerating_known_bugs(train, "numba"):
            assert_close(numba_run(train, feeds, True), evaluate(train, feeds), "numba cell", tolerance=(1e-3, 2e-5))
    run(check, examples)


# ---- CUDA: grid emulator and numba's simulator ---------------------------------------------------

@budget(default=40, slow=400)
def test_cuda_emulator_equals_reference(examples):
    """The CUDA backend's kernels (every kernel kind, 1-3 blocks) run by cuda.gridsim."""
    @given(st.sampled_from(FLOATS).flatmap(lambda dtype: graphs(dtype=dtype)), VARIANTS,
           st.integers(1, 3), st.booleans(), SEEDS)
    def check(graph, kind, blocks, optimize, seed):
        graph = variant(graph, kind)
        feeds = random_feeds(graph, seed)
        with tolerating_known_bugs(graph, "emulator"):
            assert_close(emulate(graph, feeds, blocks, optimize=optimize), evaluate(graph, feeds),
                         f"cuda emulator blocks={blocks} optimize={optimize}")
    run(check, examples)


@budget(default=12, slow=60)
def test_cuda_emulator_random_cells_multiblock(examples):
    """Random hand-written cells (strategies.rnn_cells) and their BPTT on 1-4 blocks."""
    @given(rnn_cells(), st.integers(1, 4), st.booleans())
    def check(cell, blocks, train):
        graph, feeds = cell
        if train:
            ys, h = graph.outputs
            loss = ur.sum(ys * ys) + ur.sum(h)
            params = [n for n in graph.inputs if n.op is Op.PARAM] + [graph.inputs[1]]
            graph = ur.graph(loss, *ur.grad(loss, params))
        with tolerating_known_bugs(graph, "emulator"):
            assert_close(emulate(graph, feeds, blocks), evaluate(graph, feeds), f"cells blocks={blocks}",
                         tolerance=(2e-4, 2e-5))
    run(check, examples)


def _simulator_check(examples: int) -> None:
    """In the child process (NUMBA_ENABLE_CUDASIM=1): ur.compile(..., backend="cuda") == reference."""
    @given(st.sampled_from(FLOATS).flatmap(lambda dtype: graphs(dtype=dtype)), VARIANTS, st.booleans(), SEEDS)
    def check(graph, kind, optimize, seed):
        graph = variant(graph, kind)
        feeds = random_feeds(graph, seed)
        with tolerating_known_bugs(graph, "simulator"):
            outs = ur.compile(graph, backend="cuda", optimize=optimize)(**feeds)
            assert_close(outs if isinstance(outs, list) else [outs], evaluate(graph, feeds),
                         f"cuda simulator optimize={optimize}")
    run(check, examples)


if SIM_CHILD:
    def test_simulator_child():
        _simulator_check(int(os.environ["UNROLL_PROPERTY_SIM_EXAMPLES"]))


@pytest.mark.skipif(SIM_CHILD, reason="runs in the parent process")
@budget(default=5, slow=250)
def test_cuda_simulator_equals_reference(examples, tmp_path):
    """numba's CUDA simulator must be on before numba is imported: the examples run in a child
    pytest of this file (see test_cuda_sim.py), whose output is shown on failure."""
    pytest.importorskip("numba")
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "UNROLL_PROPERTY_SIM_CHILD": "1",
           "UNROLL_PROPERTY_SIM_EXAMPLES": str(examples), "UNROLL_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           os.path.abspath(__file__), "-k", "test_simulator_child"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"child pytest exit {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "1 passed" in proc.stdout, proc.stdout[-3000:]


# ---- regressions: every failure the properties found, as a small explicit graph ------------------

def _stop_gradient_of_inlined_abs():
    """stop_gradient aliases its source; the Numba backend inlined that source (abs) away and raised
    KeyError: <abs f32[]> with optimize=False (fixed in 9b82fb4)."""
    w = ur.param("w", ())
    return ur.graph([ur.stop_gradient(ur.abs(w))]), {"w": np.array(-1.5, np.float32)}


def _integer_matmul():
    """An int32 matmul: the Numba backend called BLAS' float gemm on the int arrays and returned
    garbage, with and without passes (fixed in 9b82fb4). Found as a 1x1 int matmul in a random graph."""
    a = ur.input("a", (2, 3), "int32")
    c = ur.input("c", (3, 2), "int32")
    feeds = {"a": np.array([[1, 2, 0], [-1, 2, 1]], np.int32), "c": np.array([[2, 1], [0, -1], [1, 2]], np.int32)}
    return ur.graph([a @ c]), feeds


def _bool_max_reduction():
    """max over bools ("any"): the Numba backend started the reduction from True, so an all-False row
    gave True, with and without passes (fixed in 9b82fb4). Found as ne(max(mask, axis=1), x <= -0.5)
    in a random graph."""
    m = ur.input("m", (4, 2), "bool")
    x = ur.input("x", (4,))
    feeds = {"m": np.array([[1, 0], [0, 0], [0, 1], [0, 0]], bool), "x": np.array([0.0, -1.0, 0.5, 0.25], np.float32)}
    return ur.graph([ur.max(m, axis=1), ur.max(m, axis=0, keepdims=True), ur.max(m[1:2]),
                     ur.cast(ur.not_equal(ur.max(m, axis=1), ur.less_equal(x, -0.5)), "float32")]), feeds


def _concat_returned_twice_per_step():
    """A loop step returning one concat as two per-step outputs: the concat got a buffer of its
    own, and the Numba backend took that for the outputs' ys[t] and never copied it there
    (uninitialised values, 1e33). Found as `ur.unroll(g, factor=2)` of a loop returning one
    constant twice (slow job, seed 912; fixed in cpu/loops.py's end of step)."""
    x = ur.input("x", (3, 2))
    w = ur.param("w", (2,))

    def step(carry, xt):
        both = ur.concat([xt * w, w], axis=0)
        return carry, (both, both)

    _, (first, second) = ur.scan(step, 0.0, x)
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(3, 2), "w": np.array([0.5, -2.0], np.float32)}
    return ur.graph([first, second]), feeds


REGRESSIONS: dict[str, Callable[[], tuple[Graph, dict]]] = {
    "concat_returned_twice_per_step": _concat_returned_twice_per_step,
    "stop_gradient_of_inlined_abs": _stop_gradient_of_inlined_abs,
    "integer_matmul": _integer_matmul,
    "bool_max_reduction": _bool_max_reduction,
}

# how each regression graph is run; each must equal the numpy reference on the original graph
# (on its training graph for the *train backends)
BACKENDS: dict[str, Callable[[Graph, dict], list]] = {
    "reference-unroll": lambda g, f: evaluate(ur.unroll(g), f),
    "reference-optimize": lambda g, f: evaluate(ur.optimize(g), f),
    "reference-unroll-train": lambda g, f: evaluate(training_graph(ur.unroll(g)), f),
    "numba": lambda g, f: numba_run(g, f, False),
    "numba-passes": lambda g, f: numba_run(g, f, True),
    "numba-passes-train": lambda g, f: numba_run(training_graph(g), f, True),
    "emulator": lambda g, f: emulate(g, f, 2, optimize=False),
    "emulator-passes": lambda g, f: emulate(g, f, 2),
    "emulator-passes-train": lambda g, f: emulate(training_graph(g), f, 2),
}


@dataclass(frozen=True)
class Known:
    """A bug found here and not fixed yet: its regression is xfail(strict=False) on `backends`
    (BACKENDS keys), and the properties tolerate a failure of those backends on a random graph
    that `shows` it could show this bug, with its `error` (they still check every other graph).
    Delete the entry with the fix."""
    reason: str
    backends: frozenset[str]
    shows: Callable[[Graph], bool]
    error: type[Exception] = AssertionError  # how the bug fails: a wrong value, or this exception


def _has(graph: Graph, test: Callable) -> bool:
    return any(test(n) for n, _ in all_nodes(graph))


# Empty: the three bugs found so far (stop_gradient_of_inlined_abs, integer_matmul,
# bool_max_reduction; all three in the Numba backend) were fixed in commit 9b82fb4. An entry reads:
#   "integer_matmul": Known("numba codegen: an integer matmul calls BLAS' float gemm on the int arrays",
#                           frozenset({"numba", "numba-passes"}),
#                           lambda g: _has(g, lambda n: n.op is Op.MATMUL and n.dtype.startswith("int"))),
KNOWN_BUGS: dict[str, Known] = {}


@contextlib.contextmanager
def tolerating_known_bugs(graph: Graph, backend: str) -> Iterator[None]:
    """A failure of `backend` (BACKENDS keys, or a prefix of them) on a graph that shows a known
    bug is recorded as a hypothesis event, not raised."""
    try:
        yield
    except Exception as err:
        known = [name for name, bug in KNOWN_BUGS.items() if isinstance(err, bug.error)
                 and any(b.startswith(backend) for b in bug.backends) and bug.shows(graph)]
        if not known:
            raise
        event(f"known bug: {', '.join(known)}")


def _regression_cases():
    for name, build in REGRESSIONS.items():
        trainable = any(o.dtype in FLOATS for o in build()[0].outputs)
        for backend in BACKENDS:
            if "train" in backend and not trainable:
                continue
            bug = KNOWN_BUGS.get(name)
            marks = [pytest.mark.xfail(strict=False, reason=bug.reason)] if bug and backend in bug.backends else []
            yield pytest.param(name, backend, id=f"{name}-{backend}", marks=marks)


@pytest.mark.skipif(SIM_CHILD, reason="runs in the parent process")
@pytest.mark.parametrize("name,backend", list(_regression_cases()))
def test_regression(name, backend):
    graph, feeds = REGRESSIONS[name]()
    if backend.startswith("numba"):
        pytest.importorskip("numba")
    got = BACKENDS[backend](graph, feeds)
    assert_close(got, evaluate(training_graph(graph) if "train" in backend else graph, feeds),
                 f"{name} on {backend}")


def test_known_bugs_name_regressions_and_backends():
    assert set(KNOWN_BUGS) <= set(REGRESSIONS)
    assert all(bug.backends <= set(BACKENDS) for bug in KNOWN_BUGS.values())
