"""The lecture's RNN structures as small composable recipes: many-to-many, many-to-one,
one-to-many, and encoder-decoder with teacher forcing or greedy decoding.

Each is a few lines of DSL on top of the modules; read them as documented examples as much as API.
The recurrent module of the generating structures must be unidirectional (they use `rnn.step`).

    x = ur.input("x", (T, B, I))
    rnn, head = ur.nn.GRU(I, H), ur.nn.Linear(H, O)
    out, h_n = rnn(x)
    y_seq = many_to_many(out, head)                 # (T, B, O): a prediction per step
    y_cls = many_to_one(out, head, pool="mean")     # (B, O): one per sequence
"""

from __future__ import annotations

from typing import Callable

from .. import dsl
from ..ir import build as b
from ..ir.node import Node, user_location
from ..ir.ops import INT_DTYPES
from .layers import Embedding
from .rnn import RNNBase, State

Head = Callable[[Node], Node]


def many_to_many(outputs: Node, head: Head) -> Node:
    """A per-step head over (T, B, H) -> (T, B, O) (Linear applies to any leading dims: one matmul
    for all steps)."""
    return head(outputs)


def many_to_one(outputs: Node, head: Head | None = None, pool: str = "last") -> Node:
    """One vector per sequence from (T, B, H): the last step ("last") or the mean over time
    ("mean"), then the head if given. For a bidirectional RNN prefer pooling or h_n: the last step
    of the reverse direction has seen only one input."""
    if pool == "last":
        summary = outputs[outputs.shape[0] - 1]
    elif pool == "mean":
        summary = b.mean(outputs, 0)
    else:
        raise ValueError(f"many_to_one: pool must be 'last' or 'mean', found {pool!r}")
    return summary if head is None else head(summary)


def state_from(rnn: RNNBase, h: Node) -> State:
    """The state layout of `rnn` (h of shape (L, B, H_out), or (h, c) for an LSTM) from one
    (B, H_out) vector: every layer starts at h (an LSTM's cell state at zero). How a vector
    conditions the first state, e.g. `state_from(rnn, ur.tanh(project(image_features)))`."""
    layers = rnn.num_layers * rnn.num_directions
    stacked = b.broadcast_to(b.reshape(h, (1,) + h.shape), (layers,) + h.shape)
    if rnn.has_cell_state:  # c is hidden_size wide (h is proj_size wide with projections)
        return stacked, dsl.zeros((layers, h.shape[0], rnn.hidden_size), stacked.dtype)
    return stacked


def one_to_many(rnn: RNNBase, head: Head, state: State, x0: Node, length: int) -> tuple[Node, State]:
    """Generate `length` outputs from one starting state: each step's output head(h_t) is the next
    step's input (so head maps hidden_size -> input_size). x0 (B, input_size) is the first input.
    Returns (ys (length, B, input_size), final state). A scan with no sequences, only length=.

        h = ur.tanh(cond(vector)); ys, _ = one_to_many(rnn, head, state_from(rnn, h), x0, 20)
    """
    def step(carry: tuple[State, Node], _: None) -> tuple[tuple[State, Node], Node]:
        s, x = carry
        s, h = rnn.step(s, x)
        y = head(h)
        return (s, y), y
    (final, _), ys = dsl.scan(step, init=(state, x0), length=length)
    return ys, final


def teacher_forcing(encoder: RNNBase, decoder: RNNBase, head: Head, src: Node, tgt_in: Node) -> Node:
    """Encoder-decoder training: the encoder's final state starts the decoder, which reads the
    target sequence shifted right (tgt_in, already embedded: (T', B, I_dec)). Returns the head's
    output per target step (T', B, O). The two modules need the same state layout."""
    _, state = encoder(src)
    out, _ = decoder(tgt_in, state)
    return head(out)


def greedy_decode(decoder: RNNBase, head: Head, embedding: Embedding, state: State, start: Node,
                  length: int) -> tuple[Node, Node]:
    """Inference: from `state` (e.g. the encoder's h_n) and start ids (B,) (e.g. BOS), run `length`
    steps whose next input is the embedding of the previous step's argmax,
    onehot(argmax(logits)) @ E. Returns (logits (length, B, V), ids (length, B) int32)."""
    if start.dtype not in INT_DTYPES:
        raise TypeError(f"greedy_decode: expected integer start ids, found {start.type}"
                        f"\n  at {user_location()}")

    def step(carry: tuple[State, Node], _: None) -> tuple[tuple[State, Node], tuple[Node, Node]]:
        s, x = carry
        s, h = decoder.step(s, x)
        logits = head(h)
        ids = b.argmax(logits, -1)
        return (s, embedding(ids)), (logits, ids)
    _, (logits, ids) = dsl.scan(step, init=(state, embedding(start)), length=length)
    return logits, ids
