"""Data-parallel training over MPI (unroll.distributed, `fit(comm=...)`, `TrainStep(comm=...)`).

The in-process tests need no MPI. The MPI tests run this file under `mpiexec -n 2` (`python3
tests/test_distributed.py CHECK`), with a timeout so that nothing can hang CI, and skip when mpi4py
or mpiexec is missing (`pip install "unroll[mpi]"`). What they check on 2 ranks:
  * equivalence: 2 ranks x batch 4 give the parameters of one process with batch 8 to 1e-6 after 20
    Adam steps, LSTM and TCN, with truncated BPTT too, and the ranks' parameters are bitwise
    identical (float64, so that the check measures the algorithm, not the rounding of two
    summation orders);
  * the NaN guard: a non-finite gradient on one rank skips the update on both;
  * a global batch_size that does not split over the ranks, or does not match the graph, is refused;
  * checkpoints: written by rank 0, they resume on 1 or 2 ranks with the same result;
  * threads: each rank takes cores // 2 unless the user set a thread variable;
  * faults: a rank whose step raises makes the other raise RankFailed; a rank that hangs makes the
    other abort the job after its watchdog's timeout; an uncaught exception aborts the job.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import unroll as ur
from unroll import distributed

T, I, H = 6, 3, 5
GLOBAL_BATCH, STEPS = 8, 20
TOL = 1e-6
ROOT = Path(__file__).resolve().parent.parent


# ---- the models and data of the MPI checks --------------------------------------------------------


class Net(ur.nn.Module):
    """An LSTM or a TCN with a Linear head on the last step (float64)."""

    def __init__(self, kind: str) -> None:
        super().__init__(name=f"{kind.lower()}net", seed=0)
        self.kind = kind
        if kind == "TCN":
            self.body = ur.nn.TCN(I, [H, H], kernel_size=2, dtype="float64", seed=self.child_seed())
        else:
            self.body = ur.nn.LSTM(I, H, dtype="float64", seed=self.child_seed())
        self.head = ur.nn.Linear(H, 1, dtype="float64", seed=self.child_seed())

    def forward(self, x: ur.Node) -> ur.Node:
        out = self.body(x) if self.kind == "TCN" else self.body(x)[0]
        return ur.nn.many_to_one(out, self.head)


def _problem(kind: str, batch: int, truncate: int | None = None):
    """(loss, model, grads or None) with the graph built for `batch`."""
    model = Net(kind)
    x, y = ur.input("x", (T, batch, I), "float64"), ur.input("y", (batch, 1), "float64")
    loss = ur.nn.mse(model(x), y)
    grads = None if truncate is None else ur.grad(ur.truncate(loss, truncate), model.parameters())
    return loss, model, grads


def _data(n: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"x": rng.normal(size=(T, n, I)), "y": rng.normal(size=(n, 1))}


def _ordered(values: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [values[k] for k in sorted(values)]  # two models' names may differ by a suffix


@dataclass
class Run:
    params: list[np.ndarray]  # sorted by name: names differ by a suffix between live models
    losses: list[float]
    steps: int                # the trainer's count (a resumed run includes the checkpoint's)


def _fit(kind: str, comm, truncate: int | None = None, steps: int = STEPS, **options) -> Run:
    """fit for `steps` Adam steps, from the same initial values whatever the number of ranks. Keeps
    no reference to the model, so the next one built gets the same parameter names (checkpoints)."""
    ranks = 1 if comm is None else comm.Get_size()
    loss, model, grads = _problem(kind, GLOBAL_BATCH // ranks, truncate)
    initial = dict(zip(sorted(model.state_dict()), _ordered(_initial(kind))))
    result = ur.fit(loss, model, _data(), steps=steps, optimizer=ur.Adam(lr=1e-2), clip=1.0,
                    backend="numpy", values=initial, grads=grads, progress=False, comm=comm, **options)
    return Run(_ordered(result.params), result.history.loss, result.trainer.steps)


def _named(arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {str(i): a for i, a in enumerate(arrays)}


_INITIAL: dict[str, dict[str, np.ndarray]] = {}


def _initial(kind: str) -> dict[str, np.ndarray]:
    if kind not in _INITIAL:
        _INITIAL[kind] = Net(kind).state_dict()
    return _INITIAL[kind]


def _close(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


# ---- the MPI checks (run by mpiexec) --------------------------------------------------------------


def check_equivalence(comm, tmp: Path) -> None:
    rank = comm.Get_rank()
    for kind, truncate in (("LSTM", None), ("TCN", None), ("LSTM", 2)):
        result = _fit(kind, comm, truncate)
        assert distributed.identical_on_all_ranks(comm, _named(result.params)), f"{kind}: ranks differ"
        assert result.steps == STEPS
        if rank == 0:
            single = _fit(kind, None, truncate)
            error = _close(result.params, single.params)
            losses = float(np.max(np.abs(np.subtract(result.losses, single.losses))))
            print(f"{kind} truncate={truncate}: max |2 ranks - 1 process| = {error:.2e}, losses {losses:.2e}",
                  flush=True)
            assert error < TOL and losses < TOL, (kind, truncate, error, losses)

    # batch_size= is the global batch: it must split evenly and match the graph's share
    for global_batch, message in ((7, "global batch 7 does not split evenly over 2 ranks"),
                                  (16, "8 per rank over 2 ranks, but the graph's batch size is 4")):
        try:
            _fit("LSTM", comm, steps=1, batch_size=global_batch)
        except ValueError as err:
            assert message in str(err), err
        else:
            raise AssertionError(f"batch_size={global_batch} was accepted")

    # the NaN guard: a non-finite gradient on rank 1 alone skips the update on both ranks
    loss, model, _ = _problem("LSTM", GLOBAL_BATCH // comm.Get_size())
    step = ur.TrainStep(loss, model, backend="numpy", comm=comm)
    data = _data(GLOBAL_BATCH // comm.Get_size())
    assert distributed.identical_on_all_ranks(comm, step.values)  # broadcast from rank 0
    before = {k: v.copy() for k, v in step.values.items()}
    bad = {"x": data["x"].copy(), "y": data["y"].copy()}
    if rank == 1:
        bad["x"][0, 0, 0] = np.nan
    stats = step.step(bad)
    assert not stats.applied and step.steps == 0
    assert all(np.array_equal(before[k], v) for k, v in step.values.items())
    assert step.step(data).applied and distributed.identical_on_all_ranks(comm, step.values)
    del loss, model, step

    # checkpoints: written by rank 0 after 10 steps, resumed on 2 ranks and on 1 process
    path = tmp / "ck.npz"
    _fit("LSTM", comm, steps=10, checkpoint=path)
    resumed_here = _fit("LSTM", comm, steps=10, resume=path)
    if rank == 0:
        resumed_alone = _fit("LSTM", None, steps=10, resume=path)
        first = _fit("LSTM", None, steps=10, checkpoint=tmp / "ck1.npz")
        again = _fit("LSTM", None, steps=10, resume=tmp / "ck1.npz")
        assert first.steps == 10 and again.steps == 20 and resumed_here.steps == 20
        for other in (resumed_alone, again):
            assert _close(resumed_here.params, other.params) < TOL
        print("checkpoint written by rank 0 resumes on 2 ranks and on 1 process", flush=True)

    # threads: without the user's setting each of the 2 ranks takes half the cores
    saved = {name: os.environ.pop(name, None) for name in distributed.THREAD_VARIABLES}
    count = distributed.set_threads(comm)
    assert count == max(1, len(os.sched_getaffinity(0)) // 2), count
    assert os.environ["UNROLL_MAX_THREADS"] == str(count)   # a cap: small products still take one thread
    assert not any(os.environ.get(name) for name in distributed.THREAD_VARIABLES[:-1])
    os.environ.update({name: value for name, value in saved.items() if value is not None})
    assert distributed.set_threads(comm) is None  # the user's setting (here: the test's) wins


def check_step_raises(comm, tmp: Path) -> None:
    """Rank 1's step raises (a wrong input shape), then its fit refuses its data: rank 0 must
    raise RankFailed both times, not wait."""
    loss, model, _ = _problem("LSTM", GLOBAL_BATCH // comm.Get_size())
    step = ur.TrainStep(loss, model, backend="numpy", comm=comm)
    data = _data(GLOBAL_BATCH // comm.Get_size())
    if comm.Get_rank() == 1:
        data["x"] = data["x"][:, :, :2]
    try:
        step.step(data)
    except distributed.RankFailed as err:
        print(f"rank {comm.Get_rank()} RankFailed: {err}", flush=True)
    except Exception as err:
        print(f"rank {comm.Get_rank()} own error: {type(err).__name__}", flush=True)
    else:
        raise AssertionError("the step did not fail")
    # fit: rank 1's data is refused before training; rank 0 hears of it instead of waiting
    data = _data()
    if comm.Get_rank() == 1:
        data["y"] = data["y"][:5]
    try:
        ur.fit(loss, model, data, steps=2, backend="numpy", progress=False, comm=comm)
    except distributed.RankFailed as err:
        print(f"fit rank {comm.Get_rank()} RankFailed: {err}", flush=True)
    except ValueError as err:
        print(f"fit rank {comm.Get_rank()} own error: {err}", flush=True)


def check_hang(comm, tmp: Path) -> None:
    """Rank 1 never comes to the step: rank 0's watchdog aborts the job after 3 s."""
    loss, model, _ = _problem("LSTM", GLOBAL_BATCH // comm.Get_size())
    step = ur.TrainStep(loss, model, backend="numpy", comm=comm, comm_timeout=3.0)
    if comm.Get_rank() == 1:
        time.sleep(120)
    step.step(_data(GLOBAL_BATCH // comm.Get_size()))


def check_uncaught(comm, tmp: Path) -> None:
    """An uncaught exception on rank 1 outside any step aborts the job (abort_on_error)."""
    distributed.abort_on_error(comm)
    loss, model, _ = _problem("LSTM", GLOBAL_BATCH // comm.Get_size())
    step = ur.TrainStep(loss, model, backend="numpy", comm=comm)
    if comm.Get_rank() == 1:
        raise OSError("rank 1 lost its data file")
    step.step(_data(GLOBAL_BATCH // comm.Get_size()))


CHECKS = {"equivalence": check_equivalence, "raises": check_step_raises, "hang": check_hang,
          "uncaught": check_uncaught}


# ---- running them under mpiexec -------------------------------------------------------------------


def _mpiexec() -> str:
    pytest.importorskip("mpi4py", reason=f"the MPI tests need mpi4py: {distributed.INSTALL_HINT}")
    beside = Path(sys.executable).parent / "mpiexec"  # the mpich wheel's, in this Python's bin/
    found = shutil.which("mpiexec") or (str(beside) if beside.exists() else None)
    if found is None:
        pytest.skip(f"the MPI tests need mpiexec: {distributed.INSTALL_HINT}")
    return found


def _launch(check: str, tmp_path: Path, timeout: float,
            command: list[str] | None = None) -> tuple[int, str, float]:
    """Run CHECK (or `command`) on 2 ranks; past `timeout` the whole process group (mpiexec and its
    ranks) is killed and the test fails, so a hang can never stall CI."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    start = time.perf_counter()
    command = command or [__file__, check, str(tmp_path)]
    proc = subprocess.Popen([_mpiexec(), "-n", "2", sys.executable, *command],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=ROOT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"mpiexec -n 2 ... {check} ran past {timeout} s and was killed:\n{out}")
    return proc.returncode, out, time.perf_counter() - start


def test_two_ranks_match_one_process_and_resume_from_checkpoints(tmp_path):
    code, out, _ = _launch("equivalence", tmp_path, timeout=240)
    assert code == 0, out
    for kind in ("LSTM truncate=None", "TCN truncate=None", "LSTM truncate=2"):
        assert kind in out, out
    assert "resumes on 2 ranks and on 1 process" in out


def test_a_step_that_raises_on_one_rank_stops_the_other(tmp_path):
    code, out, seconds = _launch("raises", tmp_path, timeout=120)
    assert code == 0, out
    assert "rank 0 RankFailed: 1 of 2 ranks raised an error in step 1" in out, out
    assert "rank 1 own error" in out, out
    assert "fit rank 0 RankFailed: fit: 1 of 2 ranks refused their data" in out, out
    assert "fit rank 1 own error: fit: batched inputs hold different numbers of examples" in out, out


def test_a_hung_or_crashed_rank_aborts_the_job_in_bounded_time(tmp_path):
    code, out, seconds = _launch("hang", tmp_path, timeout=120)
    assert code != 0, out
    assert re.search(r"rank 0 of 2: waited \d+ s \(timeout 3 s\) in the gradient allreduce", out), out
    assert seconds < 60, seconds
    code, out, seconds = _launch("uncaught", tmp_path, timeout=120)
    assert code != 0 and "OSError: rank 1 lost its data file" in out, out
    assert "rank 1 of 2: uncaught OSError; aborting all ranks" in out, out
    assert seconds < 60, seconds


def test_the_cli_trains_a_task_on_two_ranks_and_prints_once(tmp_path):
    code, out, _ = _launch("cli", tmp_path, timeout=240, command=[
        "-m", "unroll.cli", "train", "adding", "--quick", "--distributed", "--backend", "numpy"])
    assert code == 0, out
    assert "unroll train --distributed: 2 ranks" in out, out
    assert out.count("\nadding: TCN_mse=") == 1, out  # rank 0 prints, rank 1 is silent


def test_the_readme_example_runs_as_written_on_two_ranks(tmp_path):
    """The README's "Train on several processes" Python block, saved to a file and started as
    `mpiexec -n 2 python file.py` in an empty folder: it trains and rank 0 writes its checkpoint."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Train on several processes\n"):]
    section = section[:section.index("\n## ", 1)]
    code = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(code) == 1, "the section's Python block is gone or split: run each one here"
    script = tmp_path / "train.py"
    script.write_text(code[0], encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([_mpiexec(), "-n", "2", sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the README's MPI example ran past 240 s and was killed:\n{out}")
    assert proc.returncode == 0, out
    names = re.findall(r'checkpoint="([^"]+)"', code[0])
    assert names and all((tmp_path / name).is_file() for name in names), sorted(os.listdir(tmp_path))


# ---- in-process tests (no MPI) --------------------------------------------------------------------


def test_local_batch_splits_evenly_or_says_why():
    assert distributed.local_batch(64, 4) == 16
    split = r"global batch 10 does not split evenly over 4 ranks \(10 = 2 x 4 \+ 2\)"
    with pytest.raises(ValueError, match=split):
        distributed.local_batch(10, 4)
    with pytest.raises(ValueError, match="positive int"):
        distributed.local_batch(0, 2)


def test_each_rank_gets_its_share_of_the_cores_unless_the_user_chose():
    assert distributed.threads_for(2, 2, {}) == 1
    assert distributed.threads_for(16, 3, {}) == 5
    assert distributed.threads_for(2, 4, {}) == 1          # never 0
    assert distributed.threads_for(2, 1, {}) is None       # the node's only rank: left alone
    assert distributed.threads_for(16, 4, {"OMP_NUM_THREADS": "3"}) is None


def test_a_comm_without_mpi4py_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match=r'pip install "unroll\[mpi\]"'):
        distributed.mpi()
    loss, model, _ = _problem("LSTM", 4)
    with pytest.raises(ImportError, match="mpi4py"):
        ur.TrainStep(loss, model, backend="numpy", comm=object())


def test_checkpoint_resumes_values_optimizer_state_and_step_count(tmp_path):
    loss, model, _ = _problem("LSTM", 4)
    data = _data(4)
    step = ur.TrainStep(loss, model, backend="numpy")
    for _ in range(3):
        step.step(data)
    step.save_checkpoint(tmp_path / "ck.npz")
    step.step(data)
    again = ur.TrainStep(loss, model, backend="numpy")
    again.load_checkpoint(tmp_path / "ck.npz")
    assert again.steps == 3
    again.step(data)
    assert _close(_ordered(step.values), _ordered(again.values)) == 0.0
    ur.save_params(tmp_path / "params.npz", step.values)
    with pytest.raises(ValueError, match="not a training checkpoint"):
        again.load_checkpoint(tmp_path / "params.npz")


def test_fit_writes_a_checkpoint_and_resumes_from_it(tmp_path):
    path = tmp_path / "ck.npz"
    first = _fit("LSTM", None, steps=6, checkpoint=path)
    values, state, steps = ur.train.io.load_checkpoint(path)
    assert steps == 6 and any(k.endswith(":exp_avg") for k in state)
    assert _close(_ordered(values), first.params) == 0.0
    resumed = _fit("LSTM", None, steps=2, resume=path)
    assert resumed.steps == 8


def test_cli_distributed_without_mpi4py_says_how_to_install(monkeypatch, capsys):
    from unroll import cli
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    assert cli.main(["train", "adding", "--quick", "--distributed"]) == 2
    assert 'pip install "unroll[mpi]"' in capsys.readouterr().err


if __name__ == "__main__":  # mpiexec -n 2 python3 tests/test_distributed.py CHECK TMPDIR
    from mpi4py import MPI
    CHECKS[sys.argv[1]](MPI.COMM_WORLD, Path(sys.argv[2]))
