"""Attention over encoder outputs: Bahdanau's additive score and Luong's dot and general scores.

Each module takes the encoder outputs, one decoder state (the query) and which source positions
are real, and returns the context vector and the attention weights:

    attn = ur.nn.BahdanauAttention(query_size=H_dec, key_size=H_enc)
    context, weights = attn(enc_out, h_dec, lengths=src_lens)   # (B, H_enc), (B, T_src)

Layouts follow the recurrent modules: `enc_out` is (T_src, B, H_enc), or (B, T_src, H_enc) for a
module built with batch_first=True; the query is (B, H_dec); the mask is (B, T_src) bool (True: a
real position) and the weights (B, T_src) in both layouts (torch's key_padding_mask layout).

Scores, by name (`SCORES`), with q the query and k_t an encoder output:

    additive  (Bahdanau et al. 2015)  e_t = v . tanh(W_q q + W_k k_t)   (query_layer, key_layer, energy)
    dot       (Luong et al. 2015)     e_t = q . k_t                     (needs H_dec == H_enc)
    general   (Luong et al. 2015)     e_t = q . (W_a k_t)               (weight: Linear(H_enc, H_dec))

weights = softmax over t of e_t with padding positions removed: their scores are replaced by a
large negative number before the softmax (so they take no share of the mass) and their weights
are then set to exactly 0 by a `where` (so they are 0.0, not a tiny number, and a fully masked
row gives zeros rather than NaN). Lengths given as a graph input are checked when the compiled
graph is called, as the recurrent modules check theirs: a length of 0 (an empty source) or above
T_src raises `ur.FeedValueError` naming the input, the value and its index.

The part of a score that depends only on the encoder (W_k k_t for additive, W_a k_t for general) is
the same at every decoder step: `keys = attn.keys(enc_out)` computes it once, outside the decoder's
loop, and `attn(enc_out, q, mask, keys=keys)` uses it.
"""

from __future__ import annotations

from typing import Callable

from .. import dsl
from ..ir import build as b
from ..ir.node import Node, user_location
from ..ir.ops import INT_DTYPES, ShapeError
from .layers import Linear, flat_matmul
from .module import Module

# a padding position's score before the softmax: far below any real score, finite in float32
MASKED_SCORE = -1e9


class _Attention(Module):
    """Shared by both kinds: layout, mask and the softmax-and-sum; subclasses give `keys`/`scores`."""

    score = ""

    def __init__(self, query_size: int, key_size: int, batch_first: bool, name: str | None,
                 dtype: object, seed: int) -> None:
        super().__init__(name, dtype, seed)
        for what, value in (("query_size", query_size), ("key_size", key_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{type(self).__name__}: {what} must be a positive int, found {value!r}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first should be of type bool, got: {type(batch_first).__name__}")
        self.query_size, self.key_size, self.batch_first = query_size, key_size, batch_first

    def extra_repr(self) -> str:
        first = ", batch_first=True" if self.batch_first else ""
        return f"query_size={self.query_size}, key_size={self.key_size}, score={self.score!r}{first}"

    # ---- what the subclasses define ------------------------------------------------------------

    def keys(self, encoder_outputs: Node) -> Node:
        """The encoder-only part of the score, in encoder_outputs' layout (compute it once)."""
        self._check_encoder(encoder_outputs)
        return encoder_outputs

    def scores(self, keys: Node, query: Node) -> Node:
        """e (T_src, B), or (B, T_src) when batch_first, from keys and a (B, H_dec) query."""
        raise NotImplementedError

    # ---- the common part -----------------------------------------------------------------------

    def _time_axis(self) -> int:
        return 1 if self.batch_first else 0

    def _check_encoder(self, enc: Node) -> None:
        self.check_input(enc, (None, None, self.key_size), "encoder_outputs")
        if enc.shape[self._time_axis()] == 0:
            raise ShapeError(f"{self._describe()}: empty source: encoder_outputs has 0 time steps "
                             f"(expected at least 1), found {enc.tensor_type}\n  at {user_location()}")

    def _query_rows(self, query: Node) -> Node:
        """The query laid out to broadcast against the keys: (1, B, H) or (B, 1, H)."""
        shape = (query.shape[0], 1, query.shape[1]) if self.batch_first else (1,) + query.shape
        return b.reshape(query, shape)

    def _valid(self, enc: Node, mask: Node | None, lengths: Node | None) -> Node | None:
        """(B, T_src) bool of real positions, or None when every position is real."""
        if mask is not None and lengths is not None:
            raise ValueError(f"{self._describe()}: pass mask= or lengths=, not both\n  at {user_location()}")
        steps, batch = enc.shape[self._time_axis()], enc.shape[1 - self._time_axis()]
        if mask is not None:
            if not isinstance(mask, Node) or mask.dtype != "bool" or mask.shape != (batch, steps):
                found = mask.type_str() if isinstance(mask, Node) else type(mask).__name__
                raise ShapeError(f"{self._describe()}: mask expected a bool (B, T_src) = ({batch}, {steps}) "
                                 f"tensor, found {found}\n  at {user_location()}")
            return mask
        if lengths is None:
            return None
        from .utils.rnn import SequenceLengths, check_lengths, time_mask  # late: utils imports rnn
        if not isinstance(lengths, Node) or lengths.dtype not in INT_DTYPES or lengths.shape != (batch,):
            found = lengths.type_str() if isinstance(lengths, Node) else type(lengths).__name__
            raise ShapeError(f"{self._describe()}: lengths expected an int (B,) = ({batch},) tensor, found "
                             f"{found}\n  at {user_location()}")
        valid = b.transpose(time_mask(lengths, steps, (1, batch), False), (1, 0))
        check_lengths(valid, lengths, SequenceLengths(steps, False, f"{self._describe()} lengths (an "
                                                                    f"empty source has length 0)"))
        return valid

    def forward(self, encoder_outputs: Node, query: Node, mask: Node | None = None,
                lengths: Node | None = None, keys: Node | None = None) -> tuple[Node, Node]:
        """(context (B, H_enc), weights (B, T_src)). `mask` (B, T_src) bool or `lengths` (B,) int
        say which source positions are real; `keys` is `self.keys(encoder_outputs)` if computed
        beforehand (outside a decoder loop)."""
        self._check_encoder(encoder_outputs)
        batch = encoder_outputs.shape[1 - self._time_axis()]
        self.check_input(query, (batch, self.query_size), "query (the decoder state)")
        valid = self._valid(encoder_outputs, mask, lengths)
        e = self.scores(self.keys(encoder_outputs) if keys is None else keys, query)
        if not self.batch_first:
            e = b.transpose(e, (1, 0))                        # (B, T_src): the softmax runs over time
        if valid is not None:
            e = b.where(valid, e, MASKED_SCORE)
        weights = dsl.softmax(e, -1)
        if valid is not None:
            weights = b.where(valid, weights, 0.0)            # exactly 0, also for a fully masked row
        w = weights if self.batch_first else b.transpose(weights, (1, 0))
        w = b.reshape(w, w.shape + (1,))
        context = b.sum(w * encoder_outputs, self._time_axis())
        return context, weights


class BahdanauAttention(_Attention):
    """Additive attention: e_t = v . tanh(W_q q + W_k k_t), parameters `query_layer.weight`
    (A, H_dec), `key_layer.weight` (A, H_enc) and `energy.weight` (1, A), torch.nn.Linear without
    bias each (A = hidden_size, default query_size)."""

    score = "additive"

    def __init__(self, query_size: int, key_size: int, hidden_size: int | None = None,
                 batch_first: bool = False, *, name: str | None = None, dtype: object = "float32",
                 seed: int = 0) -> None:
        super().__init__(query_size, key_size, batch_first, name, dtype, seed)
        hidden = query_size if hidden_size is None else hidden_size
        self.query_layer = Linear(query_size, hidden, bias=False, dtype=dtype, seed=self.child_seed())
        self.key_layer = Linear(key_size, hidden, bias=False, dtype=dtype, seed=self.child_seed())
        self.energy = Linear(hidden, 1, bias=False, dtype=dtype, seed=self.child_seed())

    def keys(self, encoder_outputs: Node) -> Node:
        self._check_encoder(encoder_outputs)
        return self.key_layer(encoder_outputs)

    def scores(self, keys: Node, query: Node) -> Node:
        energy = self.energy(b.tanh(keys + self._query_rows(self.query_layer(query))))
        return b.reshape(energy, energy.shape[:2])


def _dot(keys: Node, query_rows: Node) -> Node:
    return b.sum(keys * query_rows, -1)


class LuongAttention(_Attention):
    """Multiplicative attention: score "dot" (e_t = q . k_t; query_size must equal key_size) or
    "general" (e_t = q . (W_a k_t), parameter `weight` (H_dec, H_enc), torch.nn.Linear(H_enc,
    H_dec, bias=False)'s layout)."""

    def __init__(self, query_size: int, key_size: int, score: str = "general", batch_first: bool = False,
                 *, name: str | None = None, dtype: object = "float32", seed: int = 0) -> None:
        super().__init__(query_size, key_size, batch_first, name, dtype, seed)
        if score not in LUONG_KEYS:
            raise ValueError(f"LuongAttention: score expected one of {', '.join(map(repr, LUONG_KEYS))}, "
                             f"found {score!r}")
        if score == "dot" and query_size != key_size:
            raise ValueError(f"LuongAttention: score 'dot' needs query_size == key_size, found "
                             f"query_size={query_size} and key_size={key_size}; use score='general'")
        self.score = score
        if score == "general":
            self.add_param("weight", (query_size, key_size), f"uniform:{key_size ** -0.5!r}")

    def keys(self, encoder_outputs: Node) -> Node:
        self._check_encoder(encoder_outputs)
        return LUONG_KEYS[self.score](self, encoder_outputs)

    def scores(self, keys: Node, query: Node) -> Node:
        return _dot(keys, self._query_rows(query))


# Luong's score name -> how the keys are made from the encoder outputs (the score is then q . key)
LUONG_KEYS: dict[str, Callable[[LuongAttention, Node], Node]] = {
    "dot": lambda self, enc: enc,
    "general": lambda self, enc: flat_matmul(enc, self.weight.T),
}


# every score by name -> a constructor (query_size, key_size, **options) -> module
SCORES: dict[str, Callable[..., _Attention]] = {
    "additive": BahdanauAttention,
    "dot": lambda q, k, **kw: LuongAttention(q, k, "dot", **kw),
    "general": lambda q, k, **kw: LuongAttention(q, k, "general", **kw),
}

__all__ = ["BahdanauAttention", "LuongAttention", "SCORES"]
