"""Tests of ur.nn's greedy_decode and beam_search: beam width 1 is greedy decoding, a beam as wide
as every prefix finds the best sequence under GNMT's length normalisation, the step sees fixed
shapes (one compiled step for every position and beam), bad arguments raise errors naming the
argument and the expected and found values; and the README's "Attention and beam search" code
block prints what the README shows."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import unroll as ur
from unroll.nn.decode import gnmt_penalty

V, EOS, BOS = 5, 0, 1


class TableStep:
    """A toy decoder in numpy: the next token's logits depend on the previous token and a per-row
    bias carried in the state (so reordering the state by beam matters). Records every call's shapes."""

    def __init__(self, seed: int, vocab: int = V) -> None:
        rng = np.random.default_rng(seed)
        self.table = rng.standard_normal((vocab, vocab)) * 2.0
        self.shapes: list[tuple] = []

    def __call__(self, tokens, state):
        (bias, count) = state
        self.shapes.append((tokens.shape, bias.shape, count.shape))
        logits = self.table[tokens] + bias * (count[:, None] % 2)
        return logits, (bias, count + 1)


def init(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed + 100)
    return rng.standard_normal((batch, V)), np.zeros(batch, np.int64)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
@pytest.mark.parametrize("seed", range(8))
def test_beam_width_1_is_greedy_decoding(seed, alpha):
    step = TableStep(seed)
    greedy = ur.nn.greedy_decode(step, init(4, seed), BOS, EOS, max_len=7)
    beam = ur.nn.beam_search(step, init(4, seed), BOS, EOS, beam_width=1, max_len=7, length_penalty=alpha)
    np.testing.assert_array_equal(greedy.tokens, beam.tokens)
    np.testing.assert_array_equal(greedy.lengths, beam.lengths)
    np.testing.assert_allclose(greedy.scores, beam.scores, rtol=1e-12)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _brute_force(step: TableStep, state, max_len: int, alpha: float):
    """The best sequence of each source by enumeration: every sequence that ends in eos, or has
    max_len tokens, ranked by log P / lp."""
    bias, _ = state
    best = []
    for b in range(bias.shape[0]):
        top = (-np.inf, None)
        for n in range(1, max_len + 1):
            for seq in itertools.product(range(V), repeat=n):
                if EOS in seq[:-1] or (n < max_len and seq[-1] != EOS):
                    continue
                logp, prev = 0.0, BOS
                for t, tok in enumerate(seq):
                    logits = step.table[prev] + bias[b] * (t % 2)
                    logp += _log_softmax(logits)[tok]
                    prev = tok
                score = logp / gnmt_penalty(n, alpha)
                if score > top[0]:
                    top = (score, list(seq))
        best.append(top)
    return best


@pytest.mark.parametrize("alpha", [0.0, 0.6])
@pytest.mark.parametrize("seed", range(4))
def test_a_beam_as_wide_as_every_prefix_finds_the_best_sequence(seed, alpha):
    step = TableStep(seed)
    state = init(3, seed)
    found = ur.nn.beam_search(step, state, BOS, EOS, beam_width=V, max_len=2, length_penalty=alpha)
    for b, (score, seq) in enumerate(_brute_force(step, state, 2, alpha)):
        assert found.normalized[b] == pytest.approx(score, rel=1e-12)
        assert list(found.tokens[b][: len(seq)]) == seq


def test_the_step_sees_one_shape_at_every_position():
    step = TableStep(3)
    out = ur.nn.beam_search(step, init(4), BOS, EOS, beam_width=3, max_len=6, length_penalty=0.6)
    assert len(set(step.shapes)) == 1 and step.shapes[0] == ((12,), (12, V), (12,))
    assert out.tokens.shape == (4, 6) and out.lengths.shape == (4,)
    for row, length, seq in zip(out.tokens, out.lengths, out.sequences()):
        assert len(seq) == length - (row[length - 1] == EOS)
        assert np.all(row[length:] == EOS)


def test_lengths_count_the_eos_and_the_penalty_is_gnmts():
    assert gnmt_penalty(1, 0.6) == 1.0
    assert gnmt_penalty(10, 0.6) == pytest.approx((15 / 6) ** 0.6)
    assert gnmt_penalty(np.array([3, 7]), 0.0).tolist() == [1.0, 1.0]


def test_bad_arguments_name_the_argument_and_the_expected_and_found_values():
    step = TableStep(0)
    bs = ur.nn.beam_search
    cases = [
        (lambda: bs(step, init(2), BOS, EOS, 0, 5), r"beam_width expected an int >= 1 .*found 0"),
        (lambda: bs(step, init(2), BOS, EOS, V + 1, 5), rf"beam_width expected an int in 1..{V} .*found {V + 1}"),
        (lambda: bs(step, init(2), BOS, V, 2, 5), rf"eos expected a token id in 0..{V - 1} .*found {V}"),
        (lambda: bs(step, init(2), -1, EOS, 2, 5), r"bos expected a token id >= 0, found -1"),
        (lambda: bs(step, init(2), BOS, EOS, 2, 0), r"max_len expected an int >= 1 .*found 0"),
        (lambda: bs(step, init(2), BOS, EOS, 2, 5, length_penalty=-1.0), r"length_penalty expected a number >= 0"),
        (lambda: bs(step, init(0), BOS, EOS, 2, 5), r"empty source: init_state expected at least 1 source .*found shape \[0, 5\]"),
        (lambda: ur.nn.greedy_decode(step, init(2), BOS, 9, 5), r"greedy_decode: eos expected a token id in 0..4 .*found 9"),
        (lambda: ur.nn.greedy_decode(step, (np.zeros((2, 3)), np.zeros(3)), BOS, EOS, 5),
         r"one batch size on axis 0, found 2 \(init_state\[0\]\) and 3 \(init_state\[1\]\)"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


# ---- a compiled GNMT step: compiled once, consistent with teacher forcing ---------------------------

def test_a_compiled_gnmt_step_decodes_what_teacher_forcing_scores():
    model = ur.nn.GNMT(9, 7, 6, embed=4, layers=2, dtype="float64").eval()
    Ts, batch, max_len, eos, bos = 6, 3, 5, 2, 1
    src, lens = ur.input("src", (Ts, batch), "int32"), ur.input("lens", (batch,), "int64")
    rng = np.random.default_rng(0)
    feeds = {"src": rng.integers(3, 9, (Ts, batch)).astype(np.int32), "lens": np.array([6, 2, 4])}
    encoder = ur.compile(list(model.encode(src, lens)), backend="numpy")
    encoded = encoder(**feeds, **{k: v for k, v in model.state_dict().items() if k in encoder.input_names})
    scores, tokens, state, new_state = model.decoder_step(encoded[0].shape, encoded[1].shape)
    step = ur.nn.compile_step(scores, tokens, state, new_state, model.state_dict(), backend="numpy")
    assert step.vocab_size == 7
    greedy = ur.nn.greedy_decode(step, model.decoding_state(*encoded), bos, eos, max_len)
    beams = {k: ur.nn.beam_search(step, model.decoding_state(*encoded), bos, eos, k, max_len, 0.6) for k in (1, 3)}
    np.testing.assert_array_equal(beams[1].tokens, greedy.tokens)     # one compiled step, N = 3 and N = 9

    # the step's log-probabilities along the greedy output are what teacher forcing computes
    tin = ur.input("tin", (max_len, batch), "int32")
    logits, _ = model(src, lens, tin)
    forced = ur.compile(ur.log_softmax(logits, -1), backend="numpy")
    tin_v = np.concatenate([np.full((1, batch), bos), greedy.tokens.T[:-1]]).astype(np.int32)
    logp = forced(tin=tin_v, **feeds, **model.state_dict())
    picked = np.take_along_axis(logp, greedy.tokens.T[:, :, None], 2)[..., 0]
    live = np.arange(max_len)[:, None] < greedy.lengths[None, :]
    np.testing.assert_allclose((picked * live).sum(0), greedy.scores, rtol=1e-10)


# ---- the README's section --------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_readme_attention_block_prints_what_the_readme_shows():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index("## Attention and beam search\n")
    section = text[start:text.find("\n## ", start + 1)]
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, re.S)
    (lang, code), (_, shown) = blocks[0], blocks[1]
    assert lang == "python"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == shown.strip()


# ---- examples/numbers_to_words.py's own BLEU is sacrebleu's -----------------------------------------

def test_the_numbers_example_bleu_is_sacrebleus_and_its_words_are_english():
    from unroll.tasks import load_example
    example = load_example("numbers_to_words.py")
    assert " ".join(example.number_words(1437)) == "one thousand four hundred thirty seven"
    assert " ".join(example.number_words(900082)) == "nine hundred thousand eighty two"
    assert example.number_words(0) == ["zero"]
    sacrebleu = pytest.importorskip("sacrebleu")
    rng = np.random.default_rng(0)
    refs = [" ".join(example.number_words(int(n))) for n in rng.integers(0, 10**6, 100)]
    for hyps in ([" ".join(r.split()[:-1]) if i % 3 == 0 else r for i, r in enumerate(refs)],
                 [r.split()[0] for r in refs], ["one two three four five"] * 100, [""] * 100):
        assert example.corpus_bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
