"""Loss functions mse, cross_entropy and bce_with_logits, numerically stable, torch's reductions.

`reduction` is "mean" (default), "sum" or "none", as in torch.nn.functional.
"""

from __future__ import annotations

from ..dsl import log_softmax, softplus
from ..ir import build as b
from ..ir.node import Node, user_location
from ..ir.ops import FLOAT_DTYPES, INT_DTYPES, ShapeError


def _reduce(loss: Node, reduction: str) -> Node:
    if reduction == "mean":
        return b.mean(loss)
    if reduction == "sum":
        return b.sum(loss)
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}; expected 'mean', 'sum' or 'none'")


def _same_shape(what: str, a: Node, b_: Node) -> None:
    if a.shape != b_.shape:
        raise ShapeError(f"{what}: expected prediction and target of one shape, found {a.type} and "
                         f"{b_.type}\n  at {user_location()}")


def mse(pred: Node, target: Node, reduction: str = "mean") -> Node:
    """mean((pred - target)^2), torch.nn.functional.mse_loss."""
    _same_shape("mse", pred, target)
    diff = pred - target
    return _reduce(diff * diff, reduction)


def cross_entropy(logits: Node, targets: Node, axis: int = -1, mask: Node | None = None,
                  ignore_index: int | None = None, reduction: str = "mean") -> Node:
    """-log_softmax(logits)[target] averaged over all positions, torch.nn.functional.cross_entropy.

    `logits` has the classes on `axis`; `targets` holds integer class ids with the other axes' shape.
    `mask` (bool or float, the targets' shape) weights positions; `ignore_index` masks positions
    whose target equals it. With a mask, "mean" divides by the mask's sum (as torch does for
    ignore_index); "none" returns the masked per-position losses.
    """
    if not -logits.ndim <= axis < logits.ndim:
        raise ShapeError(f"cross_entropy: axis {axis} out of range for logits {logits.type}"
                         f"\n  at {user_location()}")
    axis %= logits.ndim
    expected = logits.shape[:axis] + logits.shape[axis + 1:]
    if logits.dtype not in FLOAT_DTYPES or targets.dtype not in INT_DTYPES or targets.shape != expected:
        raise ShapeError(f"cross_entropy: expected float logits and integer targets of shape "
                         f"{list(expected)} (logits without axis {axis}), found logits {logits.type} "
                         f"and targets {targets.type}\n  at {user_location()}")
    classes = logits.shape[axis]
    if axis != logits.ndim - 1:  # classes last, where onehot puts them
        perm = [a for a in range(logits.ndim) if a != axis] + [axis]
        logits = b.transpose(logits, perm)
    kept = None
    if ignore_index is not None:  # ignored positions pick class 0 with weight 0 (onehot rejects the id)
        kept = b.not_equal(targets, b.const(ignore_index, (), targets.dtype))
        targets = b.where(kept, targets, 0)
    picked = b.cast(b.onehot(targets, classes), logits.dtype)
    nll = -b.sum(log_softmax(logits, -1) * picked, -1)
    weights = None if kept is None else b.cast(kept, nll.dtype)
    if mask is not None:
        if mask.shape != targets.shape:
            raise ShapeError(f"cross_entropy: expected a mask of the targets' shape {list(targets.shape)}, "
                             f"found {mask.type}\n  at {user_location()}")
        mask = b.cast(mask, nll.dtype)
        weights = mask if weights is None else weights * mask
    if weights is None:
        return _reduce(nll, reduction)
    nll = nll * weights
    if reduction == "mean":
        return b.sum(nll) / b.sum(weights)
    return _reduce(nll, reduction)


def bce_with_logits(logits: Node, targets: Node, reduction: str = "mean") -> Node:
    """Binary cross-entropy on logits, stable for large |x|: softplus(x) - x * y
    (torch.nn.functional.binary_cross_entropy_with_logits)."""
    _same_shape("bce_with_logits", logits, targets)
    return _reduce(softplus(logits) - logits * targets, reduction)
