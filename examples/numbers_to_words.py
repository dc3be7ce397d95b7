"""Translation with attention and beam search: numbers to English words ("1437" -> "one thousand four
hundred thirty seven").

Sources are 1 to 6 digits (the number of digits drawn uniformly, so short and long numbers are
equally common) and targets 1 to 9 words plus an end token: both sides have variable lengths.
The model is ur.nn.GNMT with 3 layers (a bidirectional first encoder layer, residual connections
from the third, Bahdanau attention feeding every decoder layer), trained by teacher forcing with
the loss masked past each target's end. Test numbers are drawn like the training ones, and those
of 4 to 6 digits never occur in training (the 1,000 numbers of up to 3 digits are all needed to
learn from; half of the test set is such short numbers). They are decoded with one compiled
decoder step: greedily, and by beam search of width 1, 4 and 8 with GNMT's length normalisation
(alpha = 0.6). Reported per decoder: exact match (the whole word sequence right) and corpus
BLEU (sacrebleu's corpus_bleu when it is installed, `pip install -e ".[examples]"`; otherwise
`corpus_bleu` below, which computes the same number).

Measured (2-core x86 machine shared with other jobs, numpy backend, one BLAS thread, H=64,
embeddings of 16, 6000 training numbers, batch 100, 8 epochs = 480 steps, Adam lr 1e-2,
`python examples/numbers_to_words.py`, about 3 minutes in all; 1000 test numbers):
    decoder    exact   BLEU  decode s
    greedy     99.9%   99.9       0.6
    beam 1     99.9%   99.9       0.8
    beam 4     99.9%   99.9       4.8
    beam 8     99.9%   99.9       4.7
    trained in 155 s; the one error, 900082 -> 'nine hundred thousand eight'
Trained well, the model leaves beam search nothing to find. After 3 epochs (`main(epochs=3)`, 72 s
of training) it does: width 4 finds sequences that greedy decoding misses.
    decoder    exact   BLEU  decode s
    greedy     64.1%   70.1       0.6
    beam 1     64.1%   70.1       0.7
    beam 4     65.3%   70.2       2.7
    beam 8     65.3%   70.2       5.2

Re-derived by tests/test_examples.py with the same seeds: the default tests run the quick size (64
training numbers, 16 test numbers, H=8, batch 32, 1 epoch = 2 steps), `pytest -m slow` the full
runs (exact match as a fraction, BLEU in sacrebleu's 0-100):
    main(quick=True) -> greedy_accuracy=0.000 beam4_accuracy=0.000 greedy_bleu=0.44 beam8_bleu=0.48
    main(epochs=3)   -> greedy_accuracy=0.641 beam1_accuracy=0.641 beam4_accuracy=0.653 beam8_accuracy=0.653
    main(epochs=3)   -> greedy_bleu=70.1 beam1_bleu=70.1 beam4_bleu=70.2 beam8_bleu=70.2
    main()           -> greedy_accuracy=0.999 beam1_accuracy=0.999 beam4_accuracy=0.999 beam8_accuracy=0.999
    main()           -> greedy_bleu=99.9 beam1_bleu=99.9 beam4_bleu=99.9 beam8_bleu=99.9
    main()           -> wrong="900082 -> 'nine hundred thousand eight'"

    python examples/numbers_to_words.py [--quick] [--backend numba] [--epochs N] [--hidden H]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections import Counter

# Before numpy loads OpenBLAS: one thread is fastest for these small matrices.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

import unroll as ur

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen").split()
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
SOURCE_CHARS = ["_"] + list("0123456789")
WORDS = ["<pad>", "<s>", "</s>"] + ONES + list(TENS[2:]) + ["hundred", "thousand"]
BOS, EOS = 1, 2
SOURCE_LENGTH = 6                         # up to 999999
TARGET_LENGTH = 10                        # "seven hundred seventy seven thousand seven hundred seventy seven" </s>
HELD_OUT_FROM = 1000                      # test numbers from here up are never trained on
BEAM_WIDTHS = (1, 4, 8)
ALPHA = 0.6


def below_thousand(n: int) -> list[str]:
    words = [ONES[n // 100], "hundred"] if n >= 100 else []
    n %= 100
    if n >= 20:
        words.append(TENS[n // 10])
        n %= 10
    return words + ([ONES[n]] if n else [])


def number_words(n: int) -> list[str]:
    """English words of 0 <= n < 10**6, without "and" or hyphens: 1437 -> one thousand four hundred thirty seven."""
    if n == 0:
        return ["zero"]
    thousands, rest = divmod(n, 1000)
    return (below_thousand(thousands) + ["thousand"] if thousands else []) + below_thousand(rest)


def random_numbers(count: int, rng: np.random.Generator, exclude: set[int] = frozenset()) -> list[int]:
    """Numbers whose digit count is uniform in 1..6, none from `exclude`."""
    out: list[int] = []
    while len(out) < count:
        digits = int(rng.integers(1, SOURCE_LENGTH + 1))
        n = int(rng.integers(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits))
        if n not in exclude:
            out.append(n)
    return out


def encode(numbers: list[int]) -> dict[str, np.ndarray]:
    """Right-padded digits (SOURCE_LENGTH, N) with lengths; word ids (TARGET_LENGTH, N) ending in </s>,
    the decoder's inputs (<s> then the target shifted right) and the mask of real target steps."""
    n = len(numbers)
    src, lens = np.zeros((SOURCE_LENGTH, n), np.int32), np.zeros(n, np.int64)
    tgt = np.zeros((TARGET_LENGTH, n), np.int32)
    for i, number in enumerate(numbers):
        text, words = str(number), number_words(number) + ["</s>"]
        src[: len(text), i] = [SOURCE_CHARS.index(c) for c in text]
        lens[i] = len(text)
        tgt[: len(words), i] = [WORDS.index(w) for w in words]
    tgt_in = np.concatenate([np.full((1, n), BOS, np.int32), tgt[:-1]])
    mask = np.arange(TARGET_LENGTH)[:, None] <= (tgt == EOS).argmax(0)[None, :]
    return {"src": src, "src_lens": lens, "tgt_in": tgt_in, "tgt": tgt, "tgt_mask": mask}


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 as sacrebleu's defaults compute it (whitespace tokens, which is what its 13a
    tokenizer gives for these lowercase words; brevity penalty; 'exp' smoothing of zero counts)."""
    correct, total = [0] * 4, [0] * 4
    sys_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        h, r = hyp.split(), ref.split()
        sys_len, ref_len = sys_len + len(h), ref_len + len(r)
        for n in range(1, 5):
            hyp_grams = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            ref_grams = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            correct[n - 1] += sum((hyp_grams & ref_grams).values())
            total[n - 1] += max(len(h) - n + 1, 0)
    if sys_len == 0:
        return 0.0
    smooth, logs = 1.0, []
    for c, t in zip(correct, total):
        if t == 0:
            return 0.0
        if c == 0:
            smooth *= 2
            logs.append(math.log(100.0 / (smooth * t)))
        else:
            logs.append(math.log(100.0 * c / t))
    penalty = 1.0 if sys_len >= ref_len else math.exp(1 - ref_len / sys_len)
    return penalty * math.exp(sum(logs) / 4)


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU when installed, else corpus_bleu (the same number)."""
    try:
        import sacrebleu
    except ImportError:
        return corpus_bleu(hypotheses, references)
    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def text(ids: list[int]) -> str:
    return " ".join(WORDS[i] for i in ids)


def main(quick: bool = False, backend: str = "numpy", epochs: int | None = None, hidden: int | None = None,
         seed: int = 0) -> dict:
    hidden = hidden or (8 if quick else 64)
    epochs = epochs or (1 if quick else 8)
    batch = 32 if quick else 100
    n_train, n_test = (64, 16) if quick else (6000, 1000)
    rng = np.random.default_rng(seed)
    test_numbers = random_numbers(n_test, rng)
    unseen = {n for n in test_numbers if n >= HELD_OUT_FROM}       # never in training
    train, test = encode(random_numbers(n_train, rng, unseen)), encode(test_numbers)

    model = ur.nn.GNMT(len(SOURCE_CHARS), len(WORDS), hidden, embed=16, layers=3, seed=seed)
    inputs = {"src": ((SOURCE_LENGTH, batch), "int32"), "src_lens": ((batch,), "int64"),
              "tgt_in": ((TARGET_LENGTH, batch), "int32"), "tgt": ((TARGET_LENGTH, batch), "int32"),
              "tgt_mask": ((TARGET_LENGTH, batch), "bool")}
    x = {name: ur.input(name, shape, dtype) for name, (shape, dtype) in inputs.items()}
    logits, _ = model(x["src"], x["src_lens"], x["tgt_in"])
    loss = ur.nn.cross_entropy(logits, x["tgt"], mask=x["tgt_mask"])
    print(f"numbers to words: {n_train} training numbers, GNMT 3 layers H={hidden}, batch {batch}, "
          f"{epochs} epochs, backend {backend}")
    start = time.perf_counter()
    ur.fit(loss, model, train, epochs=epochs, optimizer=ur.Adam(lr=1e-2), clip=1.0, backend=backend,
           seed=seed, batch_axes={"src": 1, "src_lens": 0, "tgt_in": 1, "tgt": 1, "tgt_mask": 1})
    seconds = time.perf_counter() - start

    step, first = model.decoding(test["src"], test["src_lens"], backend=backend)   # one step for all
    references = [" ".join(number_words(n)) for n in test_numbers]
    searches = {"greedy": lambda: ur.nn.greedy_decode(step, first, BOS, EOS, TARGET_LENGTH)}
    for k in BEAM_WIDTHS:
        searches[f"beam{k}"] = lambda k=k: ur.nn.beam_search(step, first, BOS, EOS, k, TARGET_LENGTH, ALPHA)
    result: dict = {"seconds": seconds}
    print(f"  trained in {seconds:.0f} s; {n_test} test numbers:")
    print(f"    {'decoder':8}  {'exact':>6}  {'BLEU':>5}  {'decode s':>8}")
    for name, search in searches.items():
        begin = time.perf_counter()
        hypotheses = [text(ids) for ids in search().sequences()]
        took = time.perf_counter() - begin
        exact = float(np.mean([h == r for h, r in zip(hypotheses, references)]))
        score = bleu(hypotheses, references)
        label = "greedy" if name == "greedy" else f"beam {name[4:]}"
        print(f"    {label:8}  {100 * exact:5.1f}%  {score:5.1f}  {took:8.1f}")
        result.update({f"{name}_accuracy": exact, f"{name}_bleu": score, f"{name}_seconds": took})
    wrong = [(n, h) for n, h, r in zip(test_numbers, hypotheses, references) if h != r][:3]
    print("  e.g. " + "; ".join(f"{n} -> {h!r}" for n, h in zip(test_numbers[:2], hypotheses[:2]))
          + ("; wrong: " + "; ".join(f"{n} -> {h!r}" for n, h in wrong) if wrong else ""))
    print(f"  one compiled decoder step, called {step.calls} times")
    result["wrong"] = "; ".join(f"{n} -> {h!r}" for n, h in wrong)  # the last decoder's first errors
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--hidden", type=int)
    a = parser.parse_args()
    main(quick=a.quick, backend=a.backend, epochs=a.epochs, hidden=a.hidden)
