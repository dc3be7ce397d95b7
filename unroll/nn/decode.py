"""Decoding a trained decoder: greedy search and beam search over a step compiled once.

A decoder *step* is a function `step(tokens, state) -> (scores, new_state)`: tokens (N,) ints (the
previous output of each row), state a tuple of arrays whose axis 0 is the row (N, ...), scores
(N, V) logits or log-probabilities (both searches apply log_softmax, which leaves log-probabilities
as they are). `compile_step` makes one from graph nodes; it is compiled once and reused for every
position and every beam:

    step = ur.nn.compile_step(logits, tokens=tok, state=[h, enc], new_state=[h_new, enc],
                              params=model.state_dict())
    greedy = ur.nn.greedy_decode(step, (h0, enc_out), bos=1, eos=2, max_len=20)
    beams = ur.nn.beam_search(step, (h0, enc_out), bos=1, eos=2, beam_width=4, max_len=20,
                              length_penalty=0.6)
    beams.sequences()                              # [[5, 9, 3], ...]: the tokens before eos

Beams are rows: for B sources and beam width K the step always sees N = B*K rows (row b*K + k is
beam k of source b), at every position, so its shapes never change (a graph compiled with a named
batch size, `ur.input("tok", ("N",), "int32")`, serves greedy decoding's N = B and every width).
After each step the K best continuations of each source are kept and every state array is
reordered by the rows they came from. A beam that has emitted `eos` is finished: it can only be
followed by `eos` again, at no cost, and keeps its length.

Candidates are ranked by GNMT's length-normalised score (Wu et al. 2016, eq. 14, without the
coverage term): log P(Y) / lp(Y), lp(Y) = (5 + |Y|)^alpha / 6^alpha, |Y| the number of tokens
including the `eos` (alpha = length_penalty; 0 ranks by log P(Y) alone). Ties go to the lower beam
and then the lower token id, as np.argmax breaks them, so beam width 1 is greedy decoding exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..ir.node import Node

State = tuple[np.ndarray, ...]
Step = Callable[[np.ndarray, State], tuple[np.ndarray, State]]


@dataclass(frozen=True)
class Decoded:
    """The result of a search for B sources: `tokens` (B, max_len) int64 (after a row's `eos`,
    `eos` again), `lengths` (B,) tokens generated including the `eos` (max_len when none came),
    `scores` (B,) log P(Y) and `normalized` (B,) log P(Y) / lp(Y)."""

    tokens: np.ndarray
    lengths: np.ndarray
    scores: np.ndarray
    normalized: np.ndarray
    eos: int

    def sequences(self) -> list[list[int]]:
        """Each row's tokens before its first `eos`."""
        out = []
        for row in self.tokens:
            ends = np.flatnonzero(row == self.eos)
            out.append([int(t) for t in row[: ends[0] if ends.size else len(row)]])
        return out


class CompiledStep:
    """A decoder step compiled once from graph nodes: `tokens` an int (N,) input, `state` the
    state inputs (axis 0 the row), `new_state` what they become (a state input itself for what
    does not change, e.g. the encoder outputs), `scores` (N, V). `params` (and any other fixed
    feeds) go to every call; names the step does not take are left out. `calls` counts the calls; `vocab_size` is V."""

    def __init__(self, scores: Node, tokens: Node, state: Sequence[Node], new_state: Sequence[Node],
                 params: Mapping[str, np.ndarray] | None = None, backend: str | None = None) -> None:
        from ..compile import compile as compile_graph  # late: unroll.compile imports the IR first
        if len(state) != len(new_state):
            raise ValueError(f"compile_step: state has {len(state)} inputs but new_state {len(new_state)} "
                             f"values; give one new value per state input")
        for old, new in zip(state, new_state):
            if old.shape != new.shape or old.dtype != new.dtype:
                raise ValueError(f"compile_step: state input {old.name!r} is {old.type_str()} but its new "
                                 f"value is {new.type_str()}; a state keeps its shape and dtype")
        self.vocab_size = int(scores.shape[-1])
        self.token_name = str(tokens.name)
        self.state_names = [str(s.name) for s in state]
        self.run = compile_graph([scores, *new_state], backend=backend)
        wanted = set(self.run.input_names)           # a model's state_dict may hold the encoder's too
        self.params = {k: v for k, v in (params or {}).items() if k in wanted}
        self.calls = 0

    def __call__(self, tokens: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        self.calls += 1
        out = self.run(**{self.token_name: tokens}, **dict(zip(self.state_names, state)), **self.params)
        return out[0], tuple(out[1:])


def compile_step(scores: Node, tokens: Node, state: Sequence[Node], new_state: Sequence[Node],
                 params: Mapping[str, np.ndarray] | None = None, backend: str | None = None) -> CompiledStep:
    """`CompiledStep(...)`: the decoder step that greedy_decode and beam_search call."""
    return CompiledStep(scores, tokens, state, new_state, params, backend)


def gnmt_penalty(lengths: np.ndarray, alpha: float) -> np.ndarray:
    """GNMT's lp(Y) = (5 + |Y|)^alpha / 6^alpha."""
    return ((5.0 + np.asarray(lengths, np.float64)) / 6.0) ** alpha


def _log_softmax(scores: np.ndarray) -> np.ndarray:
    x = np.asarray(scores, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _int_arg(owner: str, what: str, value: Any, low: int, high: int | None, expected: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or value < low or (high is not None and value > high):
        raise ValueError(f"{owner}: {what} expected {expected}, found {value!r}")
    return int(value)


def _as_state(owner: str, init_state: Any) -> State:
    """init_state as a tuple of arrays sharing axis 0 (the source), at least one source."""
    parts = tuple(init_state) if isinstance(init_state, (tuple, list)) else (init_state,)
    if not parts:
        raise ValueError(f"{owner}: init_state expected at least one array (B, ...), found an empty "
                         f"{type(init_state).__name__}")
    arrays = tuple(np.asarray(p) for p in parts)
    for i, a in enumerate(arrays):
        if a.ndim == 0:
            raise ValueError(f"{owner}: init_state[{i}] expected an array with the source on axis 0, "
                             f"found a scalar")
    batch = arrays[0].shape[0]
    for i, a in enumerate(arrays):
        if a.shape[0] != batch:
            raise ValueError(f"{owner}: init_state arrays expected one batch size on axis 0, found "
                             f"{batch} (init_state[0]) and {a.shape[0]} (init_state[{i}])")
    if batch == 0:
        raise ValueError(f"{owner}: empty source: init_state expected at least 1 source on axis 0, "
                         f"found shape {list(arrays[0].shape)}")
    return arrays


def _check_vocabulary(owner: str, vocab: int, bos: int, eos: int, beam_width: int | None) -> None:
    for what, token in (("bos", bos), ("eos", eos)):
        if not 0 <= token < vocab:
            raise ValueError(f"{owner}: {what} expected a token id in 0..{vocab - 1} (the step's "
                             f"vocabulary of {vocab}), found {token}")
    if beam_width is not None and beam_width > vocab:
        raise ValueError(f"{owner}: beam_width expected an int in 1..{vocab} (at most the vocabulary "
                         f"size), found {beam_width}")


def _check_scores(owner: str, scores: np.ndarray, rows: int) -> int:
    if scores.ndim != 2 or scores.shape[0] != rows:
        raise ValueError(f"{owner}: the step expected to return scores of shape ({rows}, V), found "
                         f"{list(scores.shape)}")
    return int(scores.shape[1])


def greedy_decode(step: Any, *args: Any, **kwargs: Any) -> Any:
    """`greedy_search(step, init_state, bos, eos, max_len)`: each row's next token is the argmax
    of the step's scores, until every row has emitted `eos` or after max_len tokens; a `Decoded`.

    Called with a recurrent module first, `greedy_decode(decoder, head, embedding, state, start,
    length)`, it is the in-graph form `ur.nn.structures.greedy_decode`, kept for existing code."""
    from .rnn import RNNBase
    if isinstance(step, RNNBase):
        from .structures import greedy_decode as in_graph
        return in_graph(step, *args, **kwargs)
    return greedy_search(step, *args, **kwargs)


def greedy_search(step: Step, init_state: Any, bos: int, eos: int, max_len: int) -> Decoded:
    """Greedy decoding over a step (see greedy_decode); `normalized` equals `scores` (no penalty)."""
    owner = "greedy_decode"
    max_len = _int_arg(owner, "max_len", max_len, 1, None, "an int >= 1 (the most tokens to generate)")
    bos = _int_arg(owner, "bos", bos, 0, None, "a token id >= 0")
    eos = _int_arg(owner, "eos", eos, 0, None, "a token id >= 0")
    vocab = getattr(step, "vocab_size", None)
    if vocab is not None:
        _check_vocabulary(owner, int(vocab), bos, eos, None)
    state = _as_state(owner, init_state)
    B = state[0].shape[0]
    src = np.arange(B)
    tokens = np.full(B, bos, np.int64)
    history = np.full((B, max_len), eos, np.int64)
    total, length = np.zeros(B), np.full(B, max_len, np.int64)
    done = np.zeros(B, bool)
    for t in range(max_len):
        scores, state = step(tokens.astype(np.int32), state)
        scores = np.asarray(scores)
        V = _check_scores(owner, scores, B)
        if t == 0 and vocab is None:
            _check_vocabulary(owner, V, bos, eos, None)
        logp = _log_softmax(scores)
        tokens = np.where(done, eos, np.argmax(logp, axis=1))
        total += np.where(done, 0.0, logp[src, tokens])
        history[:, t] = tokens
        ended = ~done & (tokens == eos)
        length[ended] = t + 1
        done |= ended
        if done.all():
            break
    return Decoded(history, length, total, total.copy(), eos)


def beam_search(step: Step, init_state: Any, bos: int, eos: int, beam_width: int, max_len: int,
                length_penalty: float = 0.0) -> Decoded:
    """Beam search with GNMT's length normalisation (module docstring); returns the best beam of
    each source as a `Decoded`. `step` sees N = B * beam_width rows at every position."""
    owner = "beam_search"
    beam_width = _int_arg(owner, "beam_width", beam_width, 1, None, "an int >= 1 (the number of beams)")
    max_len = _int_arg(owner, "max_len", max_len, 1, None, "an int >= 1 (the most tokens to generate)")
    bos = _int_arg(owner, "bos", bos, 0, None, "a token id >= 0")
    eos = _int_arg(owner, "eos", eos, 0, None, "a token id >= 0")
    alpha = length_penalty
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < float("inf"):
        raise ValueError(f"{owner}: length_penalty expected a number >= 0 (GNMT's alpha), found {alpha!r}")
    vocab = getattr(step, "vocab_size", None)
    if vocab is not None:  # known before anything runs
        _check_vocabulary(owner, int(vocab), bos, eos, beam_width)
    first = _as_state(owner, init_state)
    B, K = first[0].shape[0], beam_width
    state: State = tuple(np.repeat(a, K, axis=0) for a in first)   # row b*K + k: beam k of source b
    tokens = np.full(B * K, bos, np.int64)
    score = np.full((B, K), -np.inf)
    score[:, 0] = 0.0                          # one live beam at the start: no duplicate expansions
    length = np.zeros((B, K), np.int64)
    finished = np.zeros((B, K), bool)
    history = np.full((B, K, max_len), eos, np.int64)
    rows = np.arange(B)[:, None]
    for t in range(max_len):
        scores, state = step(tokens.astype(np.int32), state)
        scores = np.asarray(scores)
        V = _check_scores(owner, scores, B * K)
        if t == 0 and vocab is None:
            _check_vocabulary(owner, V, bos, eos, beam_width)
        logp = _log_softmax(scores).reshape(B, K, V)
        logp[finished] = -np.inf               # a finished beam continues only with eos, for free
        logp[finished, eos] = 0.0
        total = score[:, :, None] + logp                                    # (B, K, V)
        new_length = np.where(finished, length, t + 1)[:, :, None]
        ranked = total / gnmt_penalty(new_length, alpha)
        flat = ranked.reshape(B, K * V)
        best = np.argsort(-flat, axis=1, kind="stable")[:, :K]             # (B, K) flat ids
        parent, token = best // V, best % V
        score = total.reshape(B, K * V)[rows, best]
        length = np.broadcast_to(new_length, (B, K, V)).reshape(B, K * V)[rows, best]
        finished = finished[rows, parent] | (token == eos)
        history = history[rows, parent]
        history[:, :, t] = token
        order = (rows * K + parent).reshape(-1)
        state = tuple(a[order] for a in state)
        tokens = token.reshape(-1)
        if finished.all():
            break
    normalized = score / gnmt_penalty(length, alpha)
    pick = np.argmax(normalized, axis=1)                                   # the first of equals
    src = np.arange(B)
    return Decoded(history[src, pick], length[src, pick], score[src, pick], normalized[src, pick], eos)


__all__ = ["CompiledStep", "Decoded", "beam_search", "compile_step", "gnmt_penalty", "greedy_decode",
           "greedy_search"]
