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
"""

from __future__ import annotations

import copy

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..compile import Compiled, compile, default_backend
from ..dsl import init_values
from ..ir.node import Graph, Node
from ..ir.ops import Op, ShapeError
from .clip import clip_by_global_norm, clip_by_value, global_norm
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
                 **compile_options: Any) -> None:
        if not isinstance(loss, Node) or loss.tensor_type.shape != ():
            found = loss.type_str() if isinstance(loss, Node) else type(loss).__name__
            raise ShapeError(f"TrainStep: expected a scalar loss (shape []), found {found}"
                             + (f"\n  at {loss.loc}" if isinstance(loss, Node) else ""))
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
        graph = Graph.of([value, *grads])
        if optimize:
            from ..ir.optimize import optimize as run_passes
            graph = run_passes(graph)
        self.compiled: Compiled = compile(graph, backend=self.backend, **compile_options)
        self._compile_options = compile_options
        self._forward: Compiled | None = None
        leaves = Graph.of([loss, *grads]).inputs + tuple(self.params)
        self.inputs: dict[str, Node] = {n.name: n for n in leaves if n.op is Op.INPUT}
        # dropout masks the batch does not hold are drawn afresh each step, as torch does per call
        from ..nn.module import dropout_inputs
        self.dropout_masks = dropout_inputs(Graph.of([loss, *grads]))
        self._mask_rng = np.random.default_rng([seed, 1])
        all_params = {n.name: n for n in leaves if n.op is Op.PARAM}
        if values is None and self.models:
            values = self._model_values(all_params, seed)
        self.values = self._initial_values(all_params, values, seed)
        self.optimizer = make_optimizer(optimizer, lr)
        self._clip = make_clip(clip)
        self.steps = 0

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

    def _feeds(self, batch: Mapping[str, Any]) -> dict[str, Any]:
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
        """Loss and gradients (name -> array) on a batch, without clipping or updating."""
        feeds = self._feeds(batch)
        outs = self.compiled(**{n: feeds[n] for n in self.compiled.input_names})
        return float(outs[0]), dict(zip(self.param_names, outs[1:]))

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
        loss, grads = self.gradients(batch)
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

    def __call__(self, **batch: Any) -> StepStats:
        return self.step(batch)

    def __repr__(self) -> str:
        return (f"<TrainStep {self.backend}: {len(self.params)} params, inputs "
                f"{', '.join(f'{n} {node.type}' for n, node in self.inputs.items())}, {self.optimizer!r}>")
