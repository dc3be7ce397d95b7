"""Gradient clipping on numpy arrays: by global norm and by value (the cure for exploding gradients).

Both take a dict, list or tuple of arrays and return the same kind of container with new arrays
(the inputs are not changed). `clip_by_global_norm` follows `torch.nn.utils.clip_grad_norm_`:
every gradient is scaled by min(1, max_norm / (norm + 1e-6)), where norm is the 2-norm of all
gradients together, and it returns that pre-clip norm so training can log it.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence, TypeVar

import numpy as np

Grads = TypeVar("Grads", Mapping[str, np.ndarray], Sequence[np.ndarray])


def _arrays(grads: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(g) for g in (grads.values() if isinstance(grads, Mapping) else grads)]


def _map(grads: Grads, fn: Callable[[np.ndarray], np.ndarray]) -> Grads:
    if isinstance(grads, Mapping):
        return {k: fn(np.asarray(g)) for k, g in grads.items()}  # type: ignore[return-value]
    return type(grads)(fn(np.asarray(g)) for g in grads) if isinstance(grads, tuple) else \
        [fn(np.asarray(g)) for g in grads]  # type: ignore[return-value]


def global_norm(grads: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> float:
    """sqrt(sum of squares of every element of every array), accumulated in float64."""
    total = 0.0
    for g in _arrays(grads):
        flat = g.astype(np.float64, copy=False).ravel()
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip_by_global_norm(grads: Grads, max_norm: float) -> tuple[Grads, float]:
    """Scale all gradients together so that their global norm is at most `max_norm`.
    Returns `(clipped, norm_before_clipping)`. A non-finite norm leaves the gradients as they are
    (the caller decides whether to skip the step)."""
    if not max_norm > 0:
        raise ValueError(f"clip_by_global_norm: expected max_norm > 0, found {max_norm}")
    norm = global_norm(grads)
    coef = max_norm / (norm + 1e-6)
    if not math.isfinite(norm) or coef >= 1.0:
        return _map(grads, lambda g: g.copy()), norm
    return _map(grads, lambda g: g * coef), norm


def clip_by_value(grads: Grads, clip_value: float) -> Grads:
    """Clamp every gradient element into [-clip_value, clip_value] (torch's clip_grad_value_)."""
    if not clip_value > 0:
        raise ValueError(f"clip_by_value: expected clip_value > 0, found {clip_value}")
    return _map(grads, lambda g: np.clip(g, -clip_value, clip_value))
