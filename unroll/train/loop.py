"""`fit`: the training loop. Mini-batches from arrays, a compiled TrainStep, progress, evaluation.

    result = ur.fit(loss, model_or_params, {"x": x, "y": y}, epochs=5, optimizer=ur.Adam(lr=1e-2), clip=1.0)
    params, history = result            # or result.params, result.history, result.trainer

Batches and static shapes. A graph's shapes are static, so the graph's batch size *is* the
mini-batch size (`batch_size=`, if given, must agree). `data` maps every graph input to an array
holding the whole data set, with the examples along the input's batch axis:
  * `batch_axes={"x": 1}` names that axis explicitly (None: the array is fed whole to every step);
  * otherwise it is inferred: the one axis where the array's size differs from the graph input's.
    For a seq-first input `ur.input("x", (T, B, I))` and data of shape (T, N, I) that is axis 1;
    for a target `ur.input("y", (B, 1))` and data (N, 1), axis 0.
  * An array whose shape equals the graph input's is fed whole to every step (a constant input, or
    a data set of exactly one batch). Pass `batch_axes` when N could equal B by accident.
All batched inputs must hold the same number N of examples. Each epoch visits them in a fresh
seeded permutation (`shuffle=False`: in order). The last partial batch (N % B examples) is dropped
(`drop_last=True`, the default); with `drop_last=False` it is filled up to B with examples from
the start of the epoch's order, so it is seen once more rather than padded with fake data.

Stopping. `epochs` and/or `steps` (optimizer updates in all) bound the run, whichever ends first.
`eval_fn` may raise `StopTraining` to end it early.
A non-finite loss or gradient stops the run with a warning, and so does an update that would make
a parameter non-finite (a learning rate so large that finite gradients overflow): that update is
skipped or undone, so the values returned and written back are the last finite ones, and
`history.stopped` says why.

Checkpoints. `checkpoint=path` writes the values, the optimizer's state and the step count after
every epoch and at the end (TrainStep.save_checkpoint); `resume=path` starts from such a file.

Several processes (`comm=MPI.COMM_WORLD`, run under `mpiexec -n P`; unroll.distributed). Every rank
builds the same graph, whose batch size b is its share of the global batch: the global batch is
P x b (`batch_size=`, if given, is the global batch and must be P x b; `ur.distributed.local_batch
(B, comm)` gives b and says so when B does not divide). Every rank passes the whole data set; each
global batch is drawn from rank 0's seeded permutation exactly as one process draws a batch of
P x b, and rank r trains on its r-th slice of it. Gradients and losses are averaged over the ranks,
so for a loss that is a mean over the batch, P ranks follow the same trajectory as one process with
batch P x b (to rounding). Only rank 0 shows progress, warns and writes checkpoints; every rank
returns the same values and history. eval_fn runs on every rank; StopTraining on any rank stops
them all. Without `comm`, the communicator set by `ur.distributed.default` is used, if any.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from .. import distributed
from ..ir.node import Node
from .optim import Optimizer
from .step import Clip, TrainStep

EvalFn = Callable[[dict[str, np.ndarray]], Any]


class StopTraining(Exception):
    """Raise it from `eval_fn` to end `fit` early (e.g. once a target metric is reached); its
    message goes to `history.stopped`."""


@dataclass
class History:
    """What happened during `fit`: per-step losses and pre-clip gradient norms, per-epoch mean
    losses, evaluation results as (step, result) pairs, wall time, and why it stopped early (if)."""

    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=list)
    evals: list[tuple[int, Any]] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str | None = None
    comm_seconds: float = 0.0  # of `seconds`, the time spent averaging gradients over the ranks

    @property
    def steps(self) -> int:
        return len(self.loss)


@dataclass
class FitResult:
    params: dict[str, np.ndarray]  # trained values (copies), name -> array
    history: History
    trainer: TrainStep             # to keep training, or to evaluate

    def __iter__(self) -> Iterator[Any]:  # params, history = ur.fit(...)
        return iter((self.params, self.history))


@dataclass(frozen=True)
class _Feed:
    name: str
    data: np.ndarray
    axis: int | None  # batch axis; None: fed whole to every step


def _plan_feeds(inputs: Mapping[str, Node], data: Mapping[str, Any],
                batch_axes: Mapping[str, int | None] | None) -> tuple[list[_Feed], int, int]:
    """Each input's batch axis, the number of examples N and the batch size B (see module doc)."""
    batch_axes = dict(batch_axes or {})
    missing = [n for n in inputs if n not in data]
    extra = [n for n in data if n not in inputs]
    if missing or extra:
        raise KeyError("fit: data must hold one array per graph input; "
                       + (f"missing {', '.join(map(repr, missing))}; " if missing else "")
                       + (f"not graph inputs: {', '.join(map(repr, extra))}; " if extra else "")
                       + "inputs: " + ", ".join(f"{n} {node.type}" for n, node in inputs.items()))
    unknown = [n for n in batch_axes if n not in inputs]
    if unknown:
        raise KeyError(f"fit: batch_axes names {', '.join(map(repr, unknown))}, not graph inputs")
    feeds, sizes, batches = [], {}, {}
    for name, node in inputs.items():
        arr = np.asarray(data[name])
        want = node.shape
        if arr.ndim != len(want):
            raise ValueError(f"fit: data[{name!r}] has shape {list(arr.shape)}, but input {name!r} is "
                             f"{node.type}: expected the same rank, examples along the batch axis")
        if name in batch_axes:
            axis = batch_axes[name]
            if axis is not None:
                axis = int(axis) % arr.ndim
        else:
            differ = [i for i, (d, g) in enumerate(zip(arr.shape, want)) if d != g]
            if len(differ) > 1:
                raise ValueError(f"fit: data[{name!r}] has shape {list(arr.shape)} but input {name!r} is "
                                 f"{node.type}: they differ on axes {differ}, expected only the batch "
                                 f"axis to differ (or pass batch_axes)")
            axis = differ[0] if differ else None
        if axis is not None:
            other = [i for i, (d, g) in enumerate(zip(arr.shape, want)) if d != g and i != axis]
            if other:
                raise ValueError(f"fit: data[{name!r}] has shape {list(arr.shape)} but input {name!r} is "
                                 f"{node.type}: axes {other} differ besides the batch axis {axis}")
            sizes[name], batches[name] = arr.shape[axis], want[axis]
        elif arr.shape != want:
            raise ValueError(f"fit: data[{name!r}] is fed whole (batch axis None) but has shape "
                             f"{list(arr.shape)}, expected {list(want)}")
        feeds.append(_Feed(name, arr, axis))
    if len(set(sizes.values())) > 1:
        raise ValueError("fit: batched inputs hold different numbers of examples: "
                         + ", ".join(f"{n}: {s}" for n, s in sizes.items()))
    if len(set(batches.values())) > 1:
        raise ValueError("fit: graph inputs disagree on the batch size: "
                         + ", ".join(f"{n}: {b}" for n, b in batches.items()))
    if not sizes:  # every array is fed whole: the data set is one batch
        return feeds, 1, 1
    return feeds, next(iter(sizes.values())), next(iter(batches.values()))


def _epoch_batches(n: int, batch: int, rng: np.random.Generator | None,
                   drop_last: bool) -> list[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    full = n // batch
    out = [order[k * batch:(k + 1) * batch] for k in range(full)]
    rest = n - full * batch
    if rest and not drop_last:
        out.append(np.concatenate([order[full * batch:], np.resize(order, batch - rest)]))
    return out


def _check_batch_size(batch_size: int | None, batch: int, ranks: int, batched: bool) -> None:
    """`batch_size` (the global batch) against the graph's batch `batch` on each of `ranks`."""
    if batch_size is None or not batched:
        return
    if ranks > 1:
        share = distributed.local_batch(batch_size, ranks)
        if share != batch:
            raise ValueError(f"fit: batch_size={batch_size} is the global batch, {share} per rank over "
                             f"{ranks} ranks, but the graph's batch size is {batch}: build the graph "
                             f"with ur.distributed.local_batch({batch_size}, comm) = {share}")
    elif batch_size != batch:
        raise ValueError(f"fit: batch_size={batch_size}, but the graph's inputs have batch size {batch} "
                         f"(shapes are static: build the graph with the batch size you want)")


def _show_progress(progress: bool) -> bool:
    return bool(progress) and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def fit(loss: Node, params: Iterable[Any] | Node | None, data: Mapping[str, Any], *,
        epochs: int | None = None, steps: int | None = None, batch_size: int | None = None,
        optimizer: Optimizer | str | None = "adam", lr: float | None = None, clip: Clip = None,
        backend: str | None = None, batch_axes: Mapping[str, int | None] | None = None,
        shuffle: bool = True, drop_last: bool = True, values: Mapping[str, np.ndarray] | None = None,
        grads: list[Node] | None = None, eval_fn: EvalFn | None = None, eval_every: int | None = None,
        policy: Any = None, optimize: bool = False, progress: bool = True, seed: int = 0,
        trainer: TrainStep | None = None, comm: Any = None,
        checkpoint: str | os.PathLike[str] | None = None,
        resume: str | os.PathLike[str] | None = None) -> FitResult:
    """Train `loss` (a scalar node) with respect to `params` (PARAM nodes and/or models with
    `.parameters()`; None: every parameter of the loss) on `data` (input name -> array of all
    examples; batch axes as in the module doc).

    optimizer: an Optimizer or a name ("adam" default, "sgd", "rmsprop", "adamw"), `lr` overrides
    its learning rate. clip: None, a max global norm, ("norm", c), ("value", c) or fn(grads) -> grads.
    values: initial parameter values (e.g. a model's state_dict()); default: drawn from the params'
    init specs with `seed`. eval_fn(values) -> float | dict | None runs every `eval_every` steps
    (default: after each epoch); its results go to history.evals and the progress bar; it may
    raise StopTraining to end the run early.
    progress: a tqdm bar with the running mean loss of the epoch, shown only on a terminal.
    Models given in `params` start from their state_dict() and get the trained values loaded
    back at the end (as training a torch module updates it).
    backend: as in ur.compile; default None: "numba" when Numba imports, else "numpy" (the
    reference, backend="numpy").
    grads, policy, optimize: how the step's gradients are built and compiled (see TrainStep).
    trainer: an existing TrainStep to continue (then params, optimizer, clip, backend, values,
    grads, policy and optimize are taken from it). Returns FitResult(params, history, trainer).
    comm: an mpi4py communicator to train data-parallel over its ranks (module doc);
    checkpoint / resume: a checkpoint file to write after every epoch and at the end / to start from.
    """
    for what, count in (("epochs", epochs), ("steps", steps), ("eval_every", eval_every)):
        if count is not None and (not isinstance(count, int) or count < 1):
            raise ValueError(f"fit: {what} must be a positive int or None, found {count!r}")
    if trainer is None:
        trainer = TrainStep(loss, params, optimizer=optimizer, lr=lr, clip=clip, backend=backend,
                            values=values, seed=seed, grads=grads, policy=policy, optimize=optimize,
                            comm=distributed.default_comm() if comm is None else comm)
    elif comm is not None and comm is not trainer.comm:
        raise ValueError("fit: comm differs from the trainer's communicator (TrainStep(comm=...))")
    comm = trainer.comm
    ranks, rank = (1, 0) if comm is None else (comm.Get_size(), comm.Get_rank())
    try:
        # carried inputs (TrainStep(carry=...)) come from the previous step, not from the data
        inputs = {n: v for n, v in trainer.inputs.items() if n not in trainer.carry_nodes or n in data}
        feeds, n_examples, batch = _plan_feeds(inputs, data, batch_axes)
        _check_batch_size(batch_size, batch, ranks, any(f.axis is not None for f in feeds))
    except Exception as err:
        if ranks > 1:  # the other ranks may have accepted their data: tell them before raising
            distributed.agree(comm, trainer.watchdog, "fit's data check", failed=True)
        raise err
    batched = any(f.axis is not None for f in feeds)
    if comm is not None and ranks > 1:
        _, failed = distributed.agree(comm, trainer.watchdog, "fit's data check")
        if failed:
            raise distributed.RankFailed(f"fit: {failed} of {ranks} ranks refused their data (see their "
                                         f"errors); this rank stops too")
        counts, batches, seeds = zip(*distributed.allgather(comm, trainer.watchdog, "fit's data check",
                                                            (n_examples, batch, seed)))
        if len(set(counts)) > 1:
            raise ValueError(f"fit: the ranks hold different numbers of examples ({', '.join(map(str, counts))} "
                             f"on ranks 0..{ranks - 1}); every rank passes the whole data set")
        if len(set(batches)) > 1:
            raise ValueError(f"fit: the ranks' graphs have different batch sizes ({', '.join(map(str, batches))} "
                             f"on ranks 0..{ranks - 1}); build every rank's graph with the same share")
        seed = seeds[0]  # rank 0's data order on every rank, so the shards never overlap
    global_batch = batch * ranks if batched else batch
    if drop_last and n_examples < global_batch:
        per_rank = f" ({batch} per rank x {ranks} ranks)" if ranks > 1 else ""
        raise ValueError(f"fit: the data holds {n_examples} examples, fewer than one batch of "
                         f"{global_batch}{per_rank}; pass drop_last=False to repeat examples, or build "
                         f"a smaller batch")
    if resume is not None:
        trainer.load_checkpoint(resume)
    per_epoch = n_examples // global_batch if drop_last else math.ceil(n_examples / global_batch)
    if epochs is None and steps is None:
        epochs = 1
    total = min(x for x in (steps, None if epochs is None else epochs * per_epoch) if x is not None)
    rng = np.random.default_rng(seed)
    history = History()
    start, comm_start = time.perf_counter(), trainer.comm_seconds
    from tqdm.auto import tqdm  # late: `import unroll` stays light
    bar = tqdm(total=total, disable=not (_show_progress(progress) and rank == 0), unit="step",
               dynamic_ncols=True, leave=True)
    postfix: dict[str, Any] = {}

    def evaluate() -> None:
        stopped: str | None = None
        error: BaseException | None = None
        try:
            result = eval_fn(dict(trainer.values))  # type: ignore[misc]
        except StopTraining as stop:
            stopped = f"step {history.steps}: {stop}" if str(stop) else f"step {history.steps}"
        except BaseException as err:
            if ranks == 1:
                raise
            error = err
        if ranks > 1:  # the ranks decide together, or one would wait for the others' next step
            any_stop, failed = distributed.agree(comm, trainer.watchdog, f"the evaluation at step "
                                                 f"{history.steps}", stop=stopped is not None,
                                                 failed=error is not None)
            if error is not None:
                raise error
            if failed:
                raise distributed.RankFailed(f"eval_fn raised on {failed} of {ranks} ranks at step "
                                             f"{history.steps}; this rank stops too")
            if any_stop and stopped is None:
                stopped = f"step {history.steps}: eval_fn raised StopTraining on another rank"
        if stopped is not None:
            history.stopped = stopped
            return
        history.evals.append((history.steps, result))
        if isinstance(result, Mapping):
            postfix.update({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in result.items()})
        elif isinstance(result, (int, float)):
            postfix["eval"] = f"{result:.4g}"

    epoch = 0
    try:
        while history.steps < total and history.stopped is None:
            whole = {f.name: f.data for f in feeds if f.axis is None}
            epoch_sum, epoch_steps = 0.0, 0
            for idx in _epoch_batches(n_examples, global_batch, rng if shuffle else None, drop_last):
                if ranks > 1 and batched:
                    idx = idx[rank * batch:(rank + 1) * batch]  # this rank's share
                feed = dict(whole)
                feed.update({f.name: np.take(f.data, idx, axis=f.axis) for f in feeds if f.axis is not None})
                stats = trainer.step(feed)
                if not stats.applied:
                    finite = math.isfinite(stats.loss) and math.isfinite(stats.grad_norm)
                    what = ("the update made a parameter non-finite and was undone" if finite else
                            f"loss {stats.loss} or gradient norm {stats.grad_norm} is not finite; the "
                            f"update was skipped")
                    history.stopped = (f"step {history.steps + 1} (epoch {epoch + 1}): {what} "
                                       f"(try a smaller lr or clip=1.0)")
                    if rank == 0:
                        warnings.warn(f"fit stopped at {history.stopped}", RuntimeWarning, stacklevel=2)
                    break
                history.loss.append(stats.loss)
                history.grad_norm.append(stats.grad_norm)
                epoch_sum, epoch_steps = epoch_sum + stats.loss, epoch_steps + 1
                postfix["loss"] = f"{epoch_sum / epoch_steps:.4g}"
                if eval_fn is not None and eval_every and history.steps % eval_every == 0:
                    evaluate()
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                if history.steps >= total or history.stopped is not None:
                    break
            if epoch_steps:
                history.epoch_loss.append(epoch_sum / epoch_steps)
            epoch += 1
            if eval_fn is not None and not eval_every and history.stopped is None:
                evaluate()
                bar.set_postfix(postfix)
            if checkpoint is not None and history.steps < total and history.stopped is None:
                trainer.save_checkpoint(checkpoint)
    finally:
        bar.close()
        history.seconds = time.perf_counter() - start
        history.comm_seconds = trainer.comm_seconds - comm_start
    if checkpoint is not None:
        trainer.save_checkpoint(checkpoint)
    trainer.write_back()
    return FitResult({k: v.copy() for k, v in trainer.values.items()}, history, trainer)
