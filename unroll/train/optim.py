"""Optimizers on numpy arrays (SGD, Adam, AdamW, RMSprop) with PyTorch's update equations.

Each optimizer updates parameter arrays in place from gradient arrays, both keyed by name (a dict)
or by position (a list). The equations and the order of floating-point operations follow
`torch.optim`'s single-tensor code paths (torch 2.13, the CPU default). Results agree to rounding,
not bitwise: torch's CPU kernels fuse `a + alpha*b` into one FMA (one rounding), numpy rounds twice.
tests/test_train.py checks six steps against torch: float64 to 1e-13, float32 to 2e-6 relative.
Arithmetic stays in the parameter's dtype (Python floats are weak scalars under NumPy 2).

State (moments, momentum buffers, per-parameter step counts) lives in `optimizer.state[name]`;
`state_dict()` flattens it to `{"name:key": array}` for `save_params`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

Arrays = Mapping[str, np.ndarray] | Sequence[np.ndarray]


def _items(arrays: Arrays) -> list[tuple[Any, np.ndarray]]:
    if isinstance(arrays, Mapping):
        return list(arrays.items())
    return list(enumerate(arrays))


def _lerp(start: np.ndarray, end: np.ndarray, weight: float) -> np.ndarray:
    """torch.lerp's formula (operations near zero for accuracy), written into `start`."""
    if abs(weight) < 0.5:
        start += weight * (end - start)
    else:
        start[...] = end + (weight - 1) * (end - start)
    return start


def check_hyper(owner: str, name: str, value: float, low: float = 0.0, high: float = float("inf"),
                high_open: bool = False) -> float:
    """`value` as a float when it is finite and in [low, high] (or [low, high) with high_open);
    else a ValueError naming the optimizer and the hyperparameter (NaN fails every comparison)."""
    v = float(value)
    ok = math.isfinite(v) and low <= v and (v < high if high_open else v <= high)
    if not ok:
        bound = f"[{low:g}, {high:g}{')' if high_open else ']'}" if math.isfinite(high) else f">= {low:g}"
        raise ValueError(f"{owner}: expected a finite {name} {bound}, found {value!r}")
    return v


class Optimizer:
    """Base class: `step(params, grads)` updates every parameter that has a gradient, in place."""

    def __init__(self, lr: float, weight_decay: float = 0.0) -> None:
        owner = type(self).__name__
        lr = check_hyper(owner, "lr", lr)
        weight_decay = check_hyper(owner, "weight_decay", weight_decay)
        self.lr = float(lr)  # may be changed between steps (a schedule)
        self.weight_decay = float(weight_decay)
        self.state: dict[Any, dict[str, Any]] = {}

    def step(self, params: Arrays, grads: Arrays) -> None:
        """One update. `params` and `grads` are keyed alike (names or positions); parameters
        without a gradient are left alone. Parameter arrays must be writable: they change in place."""
        values = dict(_items(params))
        for key, grad in _items(grads):
            if key not in values:
                raise KeyError(f"{type(self).__name__}.step: gradient for {key!r} has no parameter; "
                               f"parameters: {', '.join(map(repr, values))}")
            param = values[key]
            if not isinstance(param, np.ndarray) or not param.flags.writeable:
                raise TypeError(f"{type(self).__name__}.step: parameter {key!r} must be a writable "
                                f"numpy array (it is updated in place), found {type(param).__name__}")
            grad = np.asarray(grad)
            if grad.shape != param.shape:
                raise ValueError(f"{type(self).__name__}.step: gradient for {key!r} has shape "
                                 f"{list(grad.shape)}, expected the parameter's {list(param.shape)}")
            state = self.state.setdefault(key, {"step": 0})
            state["step"] += 1
            self._update(param, grad.astype(param.dtype, copy=False), state)

    def _update(self, param: np.ndarray, grad: np.ndarray, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _decayed(self, param: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """L2 weight decay folded into the gradient (torch: grad.add(param, alpha=wd))."""
        return grad + self.weight_decay * param if self.weight_decay else grad

    def state_dict(self) -> dict[str, np.ndarray]:
        """The state as flat arrays named "param:key" (the step count as a 0-d int64 array)."""
        return {f"{name}:{key}": np.asarray(value) for name, state in self.state.items()
                for key, value in state.items()}

    def load_state_dict(self, flat: Mapping[str, np.ndarray]) -> None:
        self.state = {}
        for full, value in flat.items():
            name, sep, key = str(full).rpartition(":")
            if not sep:
                raise ValueError(f"{type(self).__name__}.load_state_dict: expected keys 'param:key', "
                                 f"found {full!r}")
            self.state.setdefault(name, {})[key] = int(value) if key == "step" else np.array(value)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "state")
        return f"{type(self).__name__}({fields})"


class SGD(Optimizer):
    """torch.optim.SGD: v = momentum*v + (1-dampening)*g (v = g on the first step);
    p -= lr * (g + momentum*v if nesterov else v); g includes weight_decay*p."""

    def __init__(self, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        super().__init__(lr, weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov momentum requires momentum > 0 and dampening == 0")
        self.momentum = check_hyper("SGD", "momentum", momentum)
        self.dampening = check_hyper("SGD", "dampening", dampening, high=1.0)
        self.nesterov = bool(nesterov)

    def _update(self, param: np.ndarray, grad: np.ndarray, state: dict[str, Any]) -> None:
        grad = self._decayed(param, grad)
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                # np.array, not .copy(): arithmetic on 0-d arrays returns immutable numpy scalars
                buf = state["momentum_buffer"] = np.array(grad, dtype=param.dtype)
            else:
                buf *= self.momentum
                buf += (1 - self.dampening) * grad
            grad = grad + self.momentum * buf if self.nesterov else buf
        param += -self.lr * grad


class Adam(Optimizer):
    """torch.optim.Adam: m = lerp(m, g, 1-beta1); v = beta2*v + (1-beta2)*g*g;
    p -= lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps). `amsgrad` uses max(v) so far;
    `decoupled_weight_decay` (AdamW) shrinks p by (1 - lr*wd) instead of adding wd*p to g."""

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False,
                 decoupled_weight_decay: bool = False) -> None:
        super().__init__(lr, weight_decay)
        owner = type(self).__name__
        self.betas = (check_hyper(owner, "betas[0]", betas[0], high=1.0, high_open=True),
                      check_hyper(owner, "betas[1]", betas[1], high=1.0, high_open=True))
        self.eps = check_hyper(owner, "eps", eps)
        self.amsgrad = bool(amsgrad)
        self.decoupled_weight_decay = bool(decoupled_weight_decay)

    def _update(self, param: np.ndarray, grad: np.ndarray, state: dict[str, Any]) -> None:
        beta1, beta2 = self.betas
        if self.decoupled_weight_decay:
            param *= 1 - self.lr * self.weight_decay
        else:
            grad = self._decayed(param, grad)
        if "exp_avg" not in state:
            state["exp_avg"] = np.zeros_like(param)
            state["exp_avg_sq"] = np.zeros_like(param)
            if self.amsgrad:
                state["max_exp_avg_sq"] = np.zeros_like(param)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        _lerp(exp_avg, grad, 1 - beta1)
        exp_avg_sq *= beta2
        exp_avg_sq += (1 - beta2) * grad * grad
        t = state["step"]
        step_size = self.lr / (1 - beta1 ** t)
        bias_correction2_sqrt = (1 - beta2 ** t) ** 0.5
        second = exp_avg_sq
        if self.amsgrad:
            np.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
            second = state["max_exp_avg_sq"]
        denom = np.sqrt(second) / bias_correction2_sqrt + self.eps
        param += -step_size * (exp_avg / denom)


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (default 1e-2)."""

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False) -> None:
        super().__init__(lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay=True)


class RMSprop(Optimizer):
    """torch.optim.RMSprop: s = alpha*s + (1-alpha)*g*g; a = sqrt(s - gbar^2 if centered else s) + eps
    (gbar = lerp(gbar, g, 1-alpha)); with momentum b = momentum*b + g/a, p -= lr*b; else p -= lr*g/a."""

    def __init__(self, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False) -> None:
        super().__init__(lr, weight_decay)
        self.alpha = check_hyper("RMSprop", "alpha", alpha, high=1.0)
        self.eps = check_hyper("RMSprop", "eps", eps)
        self.momentum = check_hyper("RMSprop", "momentum", momentum)
        self.centered = bool(centered)

    def _update(self, param: np.ndarray, grad: np.ndarray, state: dict[str, Any]) -> None:
        grad = self._decayed(param, grad)
        if "square_avg" not in state:
            state["square_avg"] = np.zeros_like(param)
            if self.momentum > 0:
                state["momentum_buffer"] = np.zeros_like(param)
            if self.centered:
                state["grad_avg"] = np.zeros_like(param)
        square_avg = state["square_avg"]
        square_avg *= self.alpha
        square_avg += (1 - self.alpha) * grad * grad
        if self.centered:
            grad_avg = _lerp(state["grad_avg"], grad, 1 - self.alpha)
            avg = np.sqrt(square_avg + -1 * grad_avg * grad_avg)
        else:
            avg = np.sqrt(square_avg)
        avg += self.eps
        if self.momentum > 0:
            buf = state["momentum_buffer"]
            buf *= self.momentum
            buf += grad / avg
            param += -self.lr * buf
        else:
            param += -self.lr * (grad / avg)


OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop}


def make_optimizer(spec: Optimizer | str | None, lr: float | None = None) -> Optimizer:
    """An Optimizer instance as given, or one built from its name ("adam", "sgd", "rmsprop",
    "adamw"; default "adam") with PyTorch's defaults and `lr` if given."""
    if isinstance(spec, Optimizer):
        if lr is not None:
            spec.lr = float(lr)
        return spec
    name = "adam" if spec is None else str(spec).lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {spec!r}; expected an Optimizer or one of "
                         f"{', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]() if lr is None else OPTIMIZERS[name](lr=lr)
