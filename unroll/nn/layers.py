"""Feed-forward layers Linear and Embedding, with PyTorch's parameter names, layouts and inits.

Both flatten the leading dims into one matrix so each is a single matmul (one GEMM for a whole
(T, B, ...) sequence), then restore them.
"""

from __future__ import annotations

import math

from ..ir import build as b
from ..ir.node import Node, user_location
from ..ir.ops import INT_DTYPES, ShapeError
from .module import Module


def flat_matmul(x: Node, w_t: Node) -> Node:
    """x (..., K) @ w_t (K, N) -> (..., N) as one 2-D matmul."""
    lead = x.shape[:-1]
    y = b.reshape(x, (math.prod(lead), x.shape[-1])) @ w_t
    return b.reshape(y, lead + (w_t.shape[-1],))


class Linear(Module):
    """torch.nn.Linear: y = x @ weight.T + bias over any leading dims; weight (out, in), bias (out,),
    both drawn from U(-1/sqrt(in), 1/sqrt(in)) like torch."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, name: str | None = None,
                 dtype: object = "float32", seed: int = 0) -> None:
        super().__init__(name, dtype, seed)
        self.in_features, self.out_features, self.has_bias = in_features, out_features, bool(bias)
        bound = f"uniform:{1.0 / math.sqrt(in_features)!r}"
        self.add_param("weight", (out_features, in_features), bound)
        if bias:
            self.add_param("bias", (out_features,), bound)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}"

    def forward(self, x: Node) -> Node:
        leading = x.ndim - 1 if isinstance(x, Node) and x.ndim >= 1 else 0
        self.check_input(x, (None,) * leading + (self.in_features,))  # any leading dims
        y = flat_matmul(x, self.weight.T)
        return y + self.bias if self.has_bias else y


class Embedding(Module):
    """torch.nn.Embedding: integer ids of any shape -> (..., embedding_dim), weight
    (num_embeddings, embedding_dim) drawn from N(0, 1) like torch. Computed as onehot(ids) @ weight
    (the IR has onehot, and the matmul's gradient is the scatter-add torch performs). An id outside
    [0, num_embeddings) raises IndexError when run, naming the id and this call's line, as torch
    raises; onehot is the only path from ids to rows, so its check covers every use."""

    def __init__(self, num_embeddings: int, embedding_dim: int, name: str | None = None,
                 dtype: object = "float32", seed: int = 0) -> None:
        super().__init__(name, dtype, seed)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.add_param("weight", (num_embeddings, embedding_dim), "normal:1.0")

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"

    def forward(self, ids: Node) -> Node:
        if not isinstance(ids, Node) or ids.dtype not in INT_DTYPES:
            found = ids.type_str() if isinstance(ids, Node) else type(ids).__name__
            raise ShapeError(f"{self._describe()}: expected integer ids (int32 or int64), found {found}"
                             f"\n  at {user_location()}")
        return flat_matmul(b.cast(b.onehot(ids, self.num_embeddings), self.dtype), self.weight)


class Dropout(Module):
    """torch.nn.Dropout(p): in training mode (the default, like torch) x * mask, the mask an
    explicit graph input (values 0 or 1/(1-p), drawn by `ur.nn.dropout_feeds(graph, seed)`); the
    identity in eval mode (`.eval()`) or with p = 0."""

    def __init__(self, p: float = 0.5, inplace: bool = False, name: str | None = None,
                 dtype: object = "float32") -> None:
        super().__init__(name, dtype)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p, self.inplace = float(p), inplace

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"

    def forward(self, x: Node) -> Node:
        if not isinstance(x, Node):
            raise TypeError(f"{self._describe()}: expected a symbolic input, found {type(x).__name__}"
                            f"\n  at {user_location()}")
        if not self.training or self.p == 0:
            return x
        return x * self.dropout_mask(x.shape, self.p, "mask", x.dtype)
