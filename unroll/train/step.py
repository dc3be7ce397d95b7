"""`TrainStep`: one compiled forward + backward graph, the parameter values, clipping and an optimizer.

    step = TrainStep(loss, params, optimizer=Adam(lr=1e-2), clip=1.0)
    stats = step(x=xb, y=yb)          # forward + BPTT, clip, update; returns StepStats(loss, grad_norm)

`[loss, *grads]` from `ur.value_and_grad(loss, params)` is compiled once with the chosen backend
(default: "numba" when Numba imports, else "numpy"; backend="numpy" runs the reference interpreter)
(value_and_grad's loss shares the forward loops with the gradients, so each runs once per step). The step owns its
parameter values (`step.values`, name -> array, copied at construction) and updates them in place.
Parameters of the loss that are not in `params` are fed from `values` too but never updated (frozen).
Models (objects with `.parameters()`, `.state_dict()`) may stand in `params`: their state_dict
gives the initial values, and `write_back()` loads the trained values into them.
`grads=` accepts gradient nodes built another way (e.g. after `ur.truncate`) instead of
`ur.value_and_grad(loss, params, policy=policy)`; `optimize=True` runs `ur.optimize`'s pass
pipeline on the step's graph before compiling it.

Stateful training on a stream (`carry={"h0": h_n, ...}`: input name -> the node whose value feeds
it next time): truncated BPTT across calls, the usual way to train a character model on a long
corpus. Each step also computes the carried nodes; the next step feeds them to those inputs (the
batch may still give them, e.g. zeros at the start of a stream), so the state flows on while its
gradient stops at the batch boundary (an input has none). The first step starts from zeros;
`reset_carry()` starts a new stream. Forward-only `evaluate` neither reads nor moves the carry.

Data-parallel (`comm=MPI.COMM_WORLD`, see unroll.distributed): every rank builds the same graph,
whose batch is that rank's share of the global batch, and calls `step` with its own share. The
parameters are broadcast from rank 0 at construction; each step's gradients and loss are averaged
over the ranks by one Allreduce of one flat buffer before clipping and the update, so the values
and the optimizer's state stay bitwise identical on every rank, and a non-finite gradient on any
rank skips the update on all of them. A step that raises on one rank raises RankFailed on the
others; a collective that waits longer than `comm_timeout` seconds (default 600, or
$UNROLL_MPI_TIMEOUT) aborts the job. Dropout masks the batch does not hold are drawn per rank.
`save_checkpoint`/`load_checkpoint` write on rank 0 only and resume on any number of ranks.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..compile import Compiled, compile, default_backend
from ..dsl import init_values
from ..ir.node import Graph, Node
from ..ir.ops import Op, ShapeError
from .. import distributed
from .clip import clip_by_global_norm, clip_by_value, global_norm
from .io import checkpoint_arrays, save_checkpoint, split_checkpoint
from .optim import Optimizer, make_optimizer

Clip = float | tuple[str, float] | Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None


@dataclass(frozen=True)
class StepStats:
    loss: float
    grad_norm: float  # global 2-norm of the gradients before clipping
    applied: bool     # False when the loss or a gradient was not finite (the update was skipped)


def collect_params(params: Iterable[Any] | Node | None, loss: Node) -> tuple[list[Node], list[Any]]:
    """PARAM nodes from a list of nodes and/or models (objects with `.parameters()`; all of the
    loss's parameters when None), order kept, duplicates dropped; and the models among them."""
    if params is None:
        return Graph.of([loss]).params(), []
    items = [params] if isinstance(params, Node) or hasattr(params, "parameters") else list(params)
    out: list[Node] = []
    models = [item for item in items if hasattr(item, "parameters")]
    for item in items:
        nodes = list(item.parameters()) if hasattr(item, "parameters") else [item]
        for node in nodes:
            if not isinstance(node, Node) or node.op is not Op.PARAM:
                found = f"{node.op.value} {node.type_str()}" if isinstance(node, Node) else type(node).__name__
                raise TypeError(f"expected parameters (ur.param nodes or models with .parameters()), "
                                f"found {found}")
            if not any(node is n for n in out):
                out.append(node)
    return out, models


def make_clip(clip: Clip) -> Callable[[dict[str, np.ndarray], float], dict[str, np.ndarray]] | None:
    """clip: None; a float = max global norm; ("norm", c) or ("value", c); or fn(grads) -> grads."""
    if clip is None:
        return None
    if callable(clip):
        return lambda grads, norm: clip(grads)  # type: ignore[misc,operator]
    if isinstance(clip, (int, float)):
        clip = ("norm", float(clip))
    kind, amount = clip  # type: ignore[misc]
    if not amount > 0:
        raise ValueError(f"clip: expected a positive threshold, found {clip!r}")
    if kind == "norm":
        return lambda grads, norm: clip_by_global_norm(grads, amount)[0]
    if kind == "value":
        return lambda grads, norm: clip_by_value(grads, amount)
    raise ValueError(f"unknown clip {clip!r}; expected a max norm, ('norm', c), ('value', c) or a function")


class TrainStep:
    """A compiled training step. Call it with a batch (input name -> array) to train on it."""

    def __init__(self, loss: Node, params: Iterable[Any] | Node | None = None, *,
                 optimizer: Optimizer | str | None = "adam", lr: float | None = None, clip: Clip = None,
                 backend: str | None = None, values: Mapping[str, np.ndarray] | None = None, seed: int = 0,
                 grads: Sequence[Node] | None = None, policy: Any = None, optimize: bool = False,
                 comm: Any = None, comm_timeout: float | None = None, carry: Mapping[str, Node] | None = None,
                 **compile_options: Any) -> None:
        if not isinstance(loss, Node) or loss.tensor_type.shape != ():
            found = loss.type_str() if isinstance(loss, Node) else type(loss).__name__
            raise ShapeError(f"TrainStep: expected a scalar loss (shape []), found {found}"
                             + (f"\n  at {loss.loc}" if isinstance(loss, Node) else ""))
        self.comm = None if comm is None else distributed.check_comm(comm)  # before a long compile
        self._watchdog = None if comm is None else distributed.Watchdog(comm, comm_timeout)
        if self.comm is not None:
            distributed.set_threads(self.comm, self._watchdog)
        self.loss = loss
        self.params, self.models = collect_params(params, loss)
        value = loss
        if grads is None:
            from ..ir.autodiff import SaveAll, value_and_grad  # late: a heavier module
            # value_and_grad's loss shares the forward loops with the gradients: they run once
            value, grads = value_and_grad(loss, self.params, policy=policy or SaveAll())
        grads = list(grads)
        if len(grads) != len(self.params):
            raise ValueError(f"TrainStep: {len(grads)} gradients for {len(self.params)} parameters")
        for p, g in zip(self.params, grads):
            if g.tensor_type.shape != p.shape:
                raise ShapeError(f"TrainStep: gradient of {p.name!r} has type {g.type_str()}, "
                                 f"expected the parameter's shape {list(p.shape)}")
        self.param_names = [p.name for p in self.params]
        self.backend = backend or default_backend()  # numba when it imports, else numpy
        self.carry_nodes = dict(carry or {})
        graph = Graph.of([value, *grads, *self.carry_nodes.values()])
        if optimize:
            from ..ir.optimize import optimize as run_passes
            graph = run_passes(graph)
        self.compiled: Compiled = compile(graph, backend=self.backend, **compile_options)
        self._compile_options = compile_options
        self._forward: Compiled | None = None
        leaves = Graph.of([loss, *grads]).inputs + tuple(self.params)
        self.inputs: dict[str, Node] = {n.name: n for n in leaves if n.op is Op.INPUT}
        self._check_carry()
        self.carried: dict[str, np.ndarray] = {}   # the state the next step starts from
        # dropout masks the batch does not hold are drawn afresh each step, as torch does per call
        from ..nn.module import dropout_inputs
        self.dropout_masks = dropout_inputs(Graph.of([loss, *grads]))
        rank = 0 if comm is None else comm.Get_rank()
        # each rank draws its own masks (rank 0 the same as a single process)
        self._mask_rng = np.random.default_rng([seed, 1] if rank == 0 else [seed, 1, rank])
        all_params = {n.name: n for n in leaves if n.op is Op.PARAM}
        if values is None and self.models:
            values = self._model_values(all_params, seed)
        self.values = self._initial_values(all_params, values, seed)
        self.optimizer = make_optimizer(optimizer, lr)
        self._clip = make_clip(clip)
        self.steps = 0
        self._averager: distributed.GradientAverager | None = None
        if self.comm is not None:
            dtype = np.result_type(*(p.dtype for p in self.params)) if self.params else np.float64
            self._averager = distributed.GradientAverager(
                self.comm, {p.name: p.shape for p in self.params}, dtype, self._watchdog)
            distributed.broadcast_values(self.comm, self.values, self._averager.watchdog)

    @property
    def watchdog(self) -> distributed.Watchdog:
        """The watchdog that guards this step's collectives (only with a communicator)."""
        if self._averager is None:
            raise AttributeError("TrainStep.watchdog: this step has no communicator")
        return self._averager.watchdog

    @property
    def comm_seconds(self) -> float:
        """Seconds spent in the gradient Allreduce so far (0 without a communicator)."""
        return 0.0 if self._averager is None else self._averager.seconds

    def _model_values(self, params: dict[str, Node], seed: int) -> dict[str, np.ndarray]:
        """The models' current values, and init-spec draws for parameters outside the models."""
        values: dict[str, np.ndarray] = {}
        for model in self.models:
            if hasattr(model, "state_dict"):
                values.update({k: v for k, v in model.state_dict().items() if k in params})
        rest = [node for name, node in params.items() if name not in values]
        values.update(init_values(rest, seed))
        return values

    def write_back(self) -> None:
        """Load the current values into the models given as `params` (their state_dict changes)."""
        for model in self.models:
            if not hasattr(model, "load_state_dict"):
                continue
            names = set(model.state_dict())
            model.load_state_dict({k: v for k, v in self.values.items() if k in names}, strict=False)

    @staticmethod
    def _initial_values(params: dict[str, Node], values: Mapping[str, np.ndarray] | None,
                        seed: int) -> dict[str, np.ndarray]:
        if values is None:
            return init_values(list(params.values()), seed)
        missing = [name for name in params if name not in values]
        if missing:
            raise KeyError(f"TrainStep: values has no entry for parameter(s) {', '.join(map(repr, missing))}")
        out = {}
        for name, node in params.items():
            arr = np.asarray(values[name])
            if arr.shape != node.shape:
                raise ValueError(f"TrainStep: value of {name!r} has shape {list(arr.shape)}, expected "
                                 f"{list(node.shape)} ({node.type})")
            out[name] = np.array(arr, dtype=node.dtype)  # a private, writable copy
        return out

    def _check_carry(self) -> None:
        for name, node in self.carry_nodes.items():
            target = self.inputs.get(name)
            if target is None:
                raise KeyError(f"TrainStep: carry names {name!r}, which is not an input of the loss; inputs: "
                               + ", ".join(f"{n} {v.type}" for n, v in self.inputs.items()))
            if not isinstance(node, Node) or node.tensor_type != target.tensor_type:
                found = node.type_str() if isinstance(node, Node) else type(node).__name__
                raise ShapeError(f"TrainStep: carry[{name!r}] must have the input's type {target.type_str()}, "
                                 f"found {found}")

    def _carried(self, name: str) -> np.ndarray:
        """The state input `name` starts from: the last step's value, else zeros."""
        if name in self.carried:
            return self.carried[name]
        node = self.inputs[name]
        if not all(isinstance(d, int) for d in node.shape):
            raise KeyError(f"TrainStep: the carried input {name!r} has symbolic shape {node.type_str()}: "
                           f"give its first value in the batch")
        return np.zeros(node.shape, node.dtype)

    def reset_carry(self) -> None:
        """Start a new stream: the next step's carried inputs are zeros (or what the batch gives)."""
        self.carried.clear()

    def _feeds(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if self.carry_nodes:
            batch = {**{name: self._carried(name) for name in self.carry_nodes if name not in batch}, **batch}
        drawn = [m for m in self.dropout_masks if m.name not in batch]
        missing = [n for n in self.inputs if n not in batch and all(n != m.name for m in drawn)]
        if missing:
            raise KeyError(f"TrainStep: the batch has no {', '.join(map(repr, missing))}; inputs: "
                           + ", ".join(f"{n} {node.type}" for n, node in self.inputs.items()))
        feeds = {n: batch[n] for n in self.inputs if n in batch}
        if drawn:
            from ..ir.dims import unify
            from ..nn.module import draw_masks
            sizes: dict[str, int] = {}
            unify(sizes, ((d, a) for n in feeds for d, a in zip(self.inputs[n].shape, np.shape(feeds[n]))))
            feeds.update(draw_masks(drawn, self._mask_rng, sizes))
        feeds.update(self.values)
        return feeds

    def gradients(self, batch: Mapping[str, Any]) -> tuple[float, dict[str, np.ndarray]]:
        """Loss and gradients (name -> array) on a batch, without clipping or updating (with a
        communicator: this rank's own, not averaged)."""
        feeds = self._feeds(batch)
        outs = self.compiled(**{n: feeds[n] for n in self.compiled.input_names})
        n = len(self.param_names)
        for name, value in zip(self.carry_nodes, outs[1 + n:]):
            self.carried[name] = np.array(value)   # gradient cut: fed back as an input
        return float(outs[0]), dict(zip(self.param_names, outs[1:1 + n]))

    def evaluate(self, batch: Mapping[str, Any]) -> float:
        """The loss on a batch with the current values (forward only, compiled on first use)."""
        if self._forward is None:
            self._forward = compile(self.loss, backend=self.backend, **self._compile_options)
        feeds = self._feeds(batch)
        return float(self._forward(**{n: feeds[n] for n in self._forward.input_names}))

    def step(self, batch: Mapping[str, Any]) -> StepStats:
        """Forward + backward on the batch, clip, and apply the optimizer update. The update is
        skipped (`applied=False`) when the loss or a gradient is not finite, and undone when it
        made a parameter non-finite (a huge learning rate overflows an update of finite
        gradients): either way the values and the optimizer's state stay the last finite ones."""
        if self._averager is None:
            loss, grads = self.gradients(batch)
        else:
            loss, grads = self._averaged_gradients(batch)
        norm = global_norm(grads)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            return StepStats(loss, norm, False)
        if self._clip is not None:
            grads = self._clip(grads, norm)
        saved = (copy.deepcopy(self.optimizer.state), {k: v.copy() for k, v in self.values.items()})
        self.optimizer.step(self.values, grads)
        if not all(np.isfinite(v).all() for v in self.values.values()):
            self.optimizer.state = saved[0]
            for name, value in saved[1].items():
                self.values[name][...] = value
            return StepStats(loss, norm, False)
        self.steps += 1
        return StepStats(loss, norm, True)

    def _averaged_gradients(self, batch: Mapping[str, Any]) -> tuple[float, dict[str, np.ndarray]]:
        """This rank's loss and gradients, averaged with every other rank's (one Allreduce). When
        this rank's forward or backward raises, it tells the others (they raise RankFailed) and
        re-raises its own error, so no rank waits for a step that will never come."""
        assert self._averager is not None
        try:
            loss, grads = self.gradients(batch)
        except BaseException:
            with contextlib.suppress(distributed.RankFailed):
                self._averager.average(0.0, None, self.steps + 1)
            raise
        return self._averager.average(loss, grads, self.steps + 1)

    def save_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Write the values, the optimizer's state and the step count to an .npz file (rank 0
        only; with a communicator every rank must call it, and all return once it is written)."""
        error: BaseException | None = None
        if distributed.is_root(self.comm):
            try:
                save_checkpoint(path, self.values, self.optimizer.state_dict(), self.steps)
            except BaseException as err:  # the other ranks must hear of it, not wait
                error = err
        if self.comm is not None and self._averager is not None:
            _, failed = distributed.agree(self.comm, self._averager.watchdog, "the checkpoint write",
                                          failed=error is not None)
            if failed and error is None:
                raise distributed.RankFailed(f"rank 0 could not write the checkpoint {os.fspath(path)!r}")
        if error is not None:
            raise error

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Resume from `save_checkpoint`'s file: values, optimizer state and step count. With a
        communicator rank 0 reads it and broadcasts it, so it resumes on any number of ranks and
        the other ranks need not see the file."""
        flat: dict[str, np.ndarray] | None = None
        error: BaseException | None = None
        if distributed.is_root(self.comm):
            try:
                flat = checkpoint_arrays(path)
            except BaseException as err:
                error = err
        if self.comm is not None and self._averager is not None:
            _, failed = distributed.agree(self.comm, self._averager.watchdog, "the checkpoint read",
                                          failed=error is not None)
            if failed and error is None:
                raise distributed.RankFailed(f"rank 0 could not read the checkpoint {os.fspath(path)!r}")
            if error is None:
                flat = distributed.broadcast_arrays(self.comm, flat, self._averager.watchdog)
        if error is not None:
            raise error
        assert flat is not None
        values, optimizer_state, steps = split_checkpoint(flat, path)
        unknown = [name for name in values if name not in self.values]
        missing = [name for name in self.values if name not in values]
        if unknown or missing:
            raise KeyError(f"load_checkpoint: {os.fspath(path)!r} does not match this step's parameters"
                           + (f"; missing {', '.join(map(repr, missing))}" if missing else "")
                           + (f"; unknown {', '.join(map(repr, unknown))}" if unknown else ""))
        for name, value in values.items():
            if value.shape != self.values[name].shape:
                raise ValueError(f"load_checkpoint: {name!r} has shape {list(value.shape)} in "
                                 f"{os.fspath(path)!r}, expected {list(self.values[name].shape)}")
            self.values[name][...] = value
        self.optimizer.load_state_dict(optimizer_state)
        self.steps = steps

    def __call__(self, **batch: Any) -> StepStats:
        return self.step(batch)

    def __repr__(self) -> str:
        return (f"<TrainStep {self.backend}: {len(self.params)} params, inputs "
                f"{', '.join(f'{n} {node.type}' for n, node in self.inputs.items())}, {self.optimizer!r}>")
