"""A GNMT-style encoder-decoder with attention (Wu et al. 2016), built from ur.nn's layers.

    model = ur.nn.GNMT(src_vocab=40, tgt_vocab=30, hidden=64, layers=3)
    logits, weights = model(src, src_lens, tgt_in)   # teacher forcing: (T_tgt, B, V), (T_tgt, B, T_src)

Encoder (`encoder.{i}`, LSTMs): the first layer is a bidirectional LSTM (hidden per direction), the
second a unidirectional LSTM reading both directions (2H -> H), and every further layer a
unidirectional LSTM whose input is added to its output (a residual connection, H -> H). All take
the source lengths (`lengths=`), so padding neither enters the states nor the outputs.

Decoder (`decoder.{i}`, LSTMCells), one step, with ctx the attention context:

    h_0 = cell_0([embed(y_prev); ctx_prev])               (input feeding: the previous context)
    ctx, weights = attention(encoder outputs, h_0, source mask)
    h_i = cell_i([h_{i-1}'; ctx]),  h_i' = h_i + h_{i-1}' for i >= 1 (residual), h_0' = h_0
    logits = head([h_top'; ctx])

so the attention, computed from the bottom layer as in GNMT, feeds every decoder layer and the
output. The decoder starts from zero states and a zero context. Attention is `attention=` one of
`ur.nn.attention.SCORES` ("additive", Bahdanau; "dot" or "general", Luong).

Training reads the target shifted right (`tgt_in`: bos + y[:-1]); mask the loss with the target
lengths (`cross_entropy(..., mask=...)`). Inference compiles one decoder step (`decoder_step`),
whose state is batch-first arrays (`decoding_state` makes the first one from the encoder), and runs
`ur.nn.greedy_decode` or `ur.nn.beam_search` over it; `decoding` does all of it for numpy sources:

    step, state = model.decoding(src_ids, src_lens)         # encoder run once, step compiled once
    best = ur.nn.beam_search(step, state, bos, eos, beam_width=4, max_len=20, length_penalty=0.6)
"""

from __future__ import annotations

import numpy as np

from .. import dsl
from ..compile import compile as compile_graph
from ..ir import build as b
from ..ir.node import Node
from .attention import SCORES
from .decode import CompiledStep
from .layers import Embedding, Linear
from .module import Module, Sequential
from .rnn import LSTM, LSTMCell
from .utils.rnn import time_mask

Carry = tuple[tuple[tuple[Node, Node], ...], Node]  # ((h_i, c_i) per decoder layer, context)


class GNMT(Module):
    """The GNMT-style model (module docstring). `layers` >= 2 for encoder and decoder alike."""

    def __init__(self, src_vocab: int, tgt_vocab: int, hidden: int, embed: int | None = None,
                 layers: int = 2, attention: str = "additive", *, name: str | None = None,
                 dtype: object = "float32", seed: int = 0) -> None:
        super().__init__(name, dtype, seed)
        if not isinstance(layers, int) or layers < 2:
            raise ValueError(f"GNMT: layers expected an int >= 2 (a bidirectional layer, then "
                             f"unidirectional ones), found {layers!r}")
        if attention not in SCORES:
            raise ValueError(f"GNMT: attention expected one of {', '.join(map(repr, SCORES))}, found "
                             f"{attention!r}")
        embed = embed or hidden
        self.hidden, self.num_layers, self.tgt_vocab = hidden, layers, tgt_vocab
        kw = {"dtype": dtype}
        self.src_embedding = Embedding(src_vocab, embed, seed=self.child_seed(), **kw)
        self.tgt_embedding = Embedding(tgt_vocab, embed, seed=self.child_seed(), **kw)
        self.encoder = Sequential(
            LSTM(embed, hidden, bidirectional=True, seed=self.child_seed(), **kw),
            *[LSTM(2 * hidden if i == 1 else hidden, hidden, seed=self.child_seed(), **kw)
              for i in range(1, layers)])
        self.decoder = Sequential(
            LSTMCell(embed + hidden, hidden, seed=self.child_seed(), **kw),
            *[LSTMCell(2 * hidden, hidden, seed=self.child_seed(), **kw) for _ in range(1, layers)])
        self.attention = SCORES[attention](hidden, hidden, batch_first=True, seed=self.child_seed(), **kw)
        self.head = Linear(2 * hidden, tgt_vocab, seed=self.child_seed(), **kw)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, layers={self.num_layers}, attention={self.attention.score!r}"

    # ---- encoder -------------------------------------------------------------------------------

    def encode(self, src: Node, src_lens: Node) -> tuple[Node, Node, Node]:
        """src (T_src, B) int ids, src_lens (B,) int -> (encoder outputs (B, T_src, H), attention
        keys (B, T_src, A), valid (B, T_src) bool), batch-first as the attention takes them."""
        x = self.src_embedding(src)
        for i, lstm in enumerate(self.encoder):
            out, _ = lstm(x, lengths=src_lens)
            x = out + x if i >= 2 else out                      # residual from the third layer on
        enc = b.transpose(x, (1, 0, 2))
        valid = b.transpose(time_mask(src_lens, src.shape[0], (1, src.shape[1]), False), (1, 0))
        return enc, self.attention.keys(enc), valid

    # ---- decoder -------------------------------------------------------------------------------

    def initial_carry(self, batch: int) -> Carry:
        zero = dsl.zeros((batch, self.hidden), self.dtype)
        return tuple((zero, zero) for _ in range(self.num_layers)), zero

    def step(self, carry: Carry, y_emb: Node, enc: Node, keys: Node, valid: Node) -> tuple[Carry, Node, Node]:
        """One decoder step: (new carry, logits (B, V), attention weights (B, T_src))."""
        states, ctx = carry
        cells = list(self.decoder)
        h, c = cells[0](b.concat([y_emb, ctx], -1), states[0])
        ctx, weights = self.attention(enc, h, mask=valid, keys=keys)
        new, inp = [(h, c)], h
        for i, cell in enumerate(cells[1:], start=1):
            h, c = cell(b.concat([inp, ctx], -1), states[i])
            new.append((h, c))
            inp = h + inp                                       # residual: the next layer's input
        logits = self.head(b.concat([inp, ctx], -1))
        return (tuple(new), ctx), logits, weights

    def forward(self, src: Node, src_lens: Node, tgt_in: Node) -> tuple[Node, Node]:
        """Teacher forcing: tgt_in (T_tgt, B) ids (bos + target[:-1]) -> (logits (T_tgt, B, V),
        attention weights (T_tgt, B, T_src))."""
        enc, keys, valid = self.encode(src, src_lens)

        def step(carry: Carry, y_emb: Node) -> tuple[Carry, tuple[Node, Node]]:
            carry, logits, weights = self.step(carry, y_emb, enc, keys, valid)
            return carry, (logits, weights)
        _, (logits, weights) = dsl.scan(step, self.initial_carry(src.shape[1]), self.tgt_embedding(tgt_in))
        return logits, weights

    # ---- decoding with a compiled step ----------------------------------------------------------

    def decoder_step(self, enc_shape: tuple, keys_shape: tuple, batch: object = "N"
                     ) -> tuple[Node, Node, list[Node], list[Node]]:
        """The graph of one decoding step for `ur.nn.compile_step`: (logits, tokens input, state
        inputs, new state). The state is, batch-first: h_i, c_i per layer, the context, then the
        encoder outputs, keys and valid mask (passed through unchanged). `batch` may be a name
        (one compiled step for every number of rows)."""
        steps, width = enc_shape[1], enc_shape[2]
        tokens = dsl.input("dec_tokens", (batch,), "int32")
        hs = [(dsl.input(f"dec_h{i}", (batch, self.hidden), self.dtype),
               dsl.input(f"dec_c{i}", (batch, self.hidden), self.dtype)) for i in range(self.num_layers)]
        ctx = dsl.input("dec_ctx", (batch, width), self.dtype)
        enc = dsl.input("dec_enc", (batch, steps, width), self.dtype)
        keys = dsl.input("dec_keys", (batch, steps, keys_shape[2]), self.dtype)
        valid = dsl.input("dec_valid", (batch, steps), "bool")
        (new, new_ctx), logits, _ = self.step((tuple(hs), ctx), self.tgt_embedding(tokens), enc, keys, valid)
        state = [v for hc in hs for v in hc] + [ctx, enc, keys, valid]
        new_state = [v for hc in new for v in hc] + [new_ctx, enc, keys, valid]
        return dsl.log_softmax(logits, -1), tokens, state, new_state

    def decoding(self, src: np.ndarray, src_lens: np.ndarray, backend: str | None = None
                 ) -> tuple[CompiledStep, tuple]:
        """(step, first state) for `ur.nn.greedy_decode` / `ur.nn.beam_search` of these sources
        (src (T_src, B) ids, src_lens (B,)): the encoder compiled and run once, the decoder step
        compiled once for any number of rows (beams are rows)."""
        src, src_lens = np.asarray(src), np.asarray(src_lens)
        src_in = dsl.input("decoding_src", src.shape, "int32")
        lens_in = dsl.input("decoding_src_lens", src_lens.shape, "int64")
        encoder = compile_graph(list(self.encode(src_in, lens_in)), backend=backend)
        params = {k: v for k, v in self.state_dict().items() if k in encoder.input_names}
        encoded = encoder(decoding_src=src.astype(np.int32), decoding_src_lens=src_lens.astype(np.int64), **params)
        scores, tokens, state, new_state = self.decoder_step(encoded[0].shape, encoded[1].shape)
        step = CompiledStep(scores, tokens, state, new_state, self.state_dict(), backend)
        return step, self.decoding_state(*encoded)

    def decoding_state(self, enc: object, keys: object, valid: object) -> tuple:
        """The first decoding state (numpy arrays, batch-first) from the encoder's values: zero
        states and context, then the encoder outputs, keys and mask."""
        enc = np.asarray(enc)
        zero = np.zeros((enc.shape[0], self.hidden), enc.dtype)
        ctx = np.zeros((enc.shape[0], enc.shape[2]), enc.dtype)
        return tuple([zero] * (2 * self.num_layers) + [ctx, enc, np.asarray(keys), np.asarray(valid)])


__all__ = ["GNMT"]
