"""Many-to-many: a character language model trained on Python's own standard library, with sampling.

The corpus is offline: the source of a few standard-library modules (textwrap, heapq, string, shlex,
glob, fnmatch), read from the running interpreter's installation. An LSTM reads T characters
(one-hot) and predicts the next character at every step (ur.nn.many_to_many + cross_entropy);
the last 10% of the text is held out. Training is truncated BPTT across calls, the usual way on a
long corpus: the text is cut into `batch` contiguous streams read T characters at a time, and each
chunk starts from the (h, c) the previous chunk ended in (`ur.TrainStep(..., carry={"h0": h_n,
"c0": c_n})`), its gradient cut at the chunk boundary; a pass over the streams starts from zeros.
Sampling runs inside one compiled graph: a scan whose step feeds the chosen character back as the
next input. Choosing is the Gumbel-max trick, argmax(logits / temperature + g) with Gumbel noise g
given as an input sequence (the IR has no random ops): zero noise gives greedy decoding, drawn
noise gives samples at that temperature.

Measured (2-core x86 machine, numpy backend, one BLAS thread, 83 kB of text, 158 symbols, LSTM
H=128, T=48, 32 streams, 1200 steps (about 26 passes over the streams), Adam lr 5e-3,
`python examples/char_lm.py`):
    held-out loss 2.72 bits/char (unigram baseline 4.42 bits/char), 109 s of training
    greedy from "def ":   def token = nextchar
    sampled at T=0.8:     def cun by itemood and the heap contare
                          dErrgs, werniser, default the nem is field fon the hear in ex(cheraly).
(the corpus is the running interpreter's own library: these are for Python 3.11.7's)

Re-derived by tests/test_examples.py with the same seeds: the default tests run the quick size (the
first 4000 characters, LSTM H=16, T=12, batch 8, 3 steps), `pytest -m slow` the full run above:
    main(quick=True) -> bits_per_char=6.377 unigram_bits=4.697 greedy="def xwxwxwxwxw"
    main()           -> bits_per_char=2.72 unigram_bits=4.42 symbols=158
    main()           -> greedy="def token = nextchar"
    main()           -> sampled="def cun by itemood and the heap contare"

    python examples/char_lm.py [--quick] [--backend numba] [--epochs N] [--hidden H]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

# Before numpy loads OpenBLAS: one thread is fastest for these small matrices, and more threads
# oversubscribe a shared 2-core machine (a 25 ms step took 5.5 s on one).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

import unroll as ur

STDLIB_FILES = ("textwrap.py", "heapq.py", "string.py", "shlex.py", "glob.py", "fnmatch.py")


def load_corpus(max_chars: int | None = None) -> str:
    """Source text of a few standard-library modules (no download: they ship with Python)."""
    root = Path(os.__file__).parent
    texts = [(root / name).read_text(encoding="utf-8") for name in STDLIB_FILES if (root / name).exists()]
    text = "\n".join(texts)
    return text[:max_chars] if max_chars else text


class Vocab:
    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        return np.array([self.index[c] for c in text], dtype=np.int32)

    def decode(self, ids: np.ndarray) -> str:
        return "".join(self.chars[int(i)] for i in ids)


class CharLM(ur.nn.Module):
    def __init__(self, vocab: int, hidden: int, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.vocab = vocab
        self.rnn = ur.nn.LSTM(vocab, hidden, seed=self.child_seed())
        self.head = ur.nn.Linear(hidden, vocab, seed=self.child_seed())

    def onehot(self, ids: ur.Node) -> ur.Node:
        return ur.cast(ur.onehot(ids, self.vocab), "float32")

    def forward(self, ids: ur.Node, state: tuple[ur.Node, ur.Node] | None = None) -> tuple[ur.Node, tuple]:
        """(T, B, V) logits of the next char, and the final (h, c) (the next chunk's start)."""
        out, final = self.rnn(self.onehot(ids), state)
        return ur.nn.many_to_many(out, self.head), final

    def generate(self, prompt: ur.Node, noise: ur.Node, inv_temp: ur.Node) -> ur.Node:
        """Read `prompt` (P, B) ids, then emit len(noise) characters, each fed back as the next
        input: id_t = argmax(logits_t * inv_temp + noise_t). Returns ids (N, B)."""
        _, state = self.rnn(self.onehot(prompt[: prompt.shape[0] - 1]))
        last = self.onehot(prompt[prompt.shape[0] - 1])       # (B, V): the prompt's last char

        def step(carry, g):
            s, x = carry
            s, h = self.rnn.step(s, x)
            ids = ur.argmax(self.head(h) * inv_temp + g, -1)
            return (s, self.onehot(ids)), ids
        _, ids = ur.scan(step, init=(state, last), xs=noise)
        return ids


def streams(ids: np.ndarray, batch: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """The text as `batch` contiguous streams read T characters at a time: inputs and next-char
    targets (chunks, T, batch); chunk k + 1 of a stream continues chunk k."""
    length = (len(ids) - 1) // batch // T * T
    starts = np.arange(batch) * length
    idx = starts[None, :] + np.arange(length)[:, None]                       # (length, batch)
    return ids[idx].reshape(-1, T, batch), ids[idx + 1].reshape(-1, T, batch)


def windows(ids: np.ndarray, T: int, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` random windows: inputs ids[i:i+T] and next-char targets ids[i+1:i+T+1], (T, count)."""
    starts = rng.integers(0, len(ids) - T - 1, count)
    idx = starts[None, :] + np.arange(T)[:, None]
    return ids[idx], ids[idx + 1]


def main(quick: bool = False, backend: str = "numpy", epochs: int | None = None, hidden: int | None = None,
         seed: int = 0, steps: int | None = None, T: int | None = None, sample_length: int = 160) -> dict:
    hidden = hidden or (16 if quick else 128)
    T = T or (12 if quick else 48)
    batch = 8 if quick else 32
    steps = steps or (3 if quick else 1200)
    epochs = epochs or 1
    text = load_corpus(4000 if quick else None)
    vocab = Vocab(text)
    ids = vocab.encode(text)
    split = int(0.9 * len(ids))
    train_ids, test_ids = ids[:split], ids[split:]
    rng = np.random.default_rng(seed)
    x_train, y_train = streams(train_ids, batch, T)
    x_test, y_test = windows(test_ids, T, 8 if quick else 256, rng)
    counts = np.bincount(train_ids, minlength=len(vocab)) + 1
    unigram_bits = float(-(counts / counts.sum() * np.log2(counts / counts.sum())).sum())
    print(f"char LM: {len(text)} chars of stdlib source, {len(vocab)} symbols, LSTM H={hidden}, T={T}, "
          f"batch {batch}, {steps} steps x {epochs} epochs, backend {backend}")

    model = CharLM(len(vocab), hidden, seed=seed)
    x = ur.input("x", (T, batch), "int32")
    y = ur.input("y", (T, batch), "int32")
    h0, c0 = ur.input("h0", (1, batch, hidden)), ur.input("c0", (1, batch, hidden))
    logits, (h_n, c_n) = model(x, (h0, c0))
    loss = ur.nn.cross_entropy(logits, y)
    # truncated BPTT across calls: each chunk starts from the state the previous one ended in
    # (its gradient cut at the chunk boundary); a pass over the streams starts from zeros
    trainer = ur.TrainStep(loss, model, optimizer=ur.Adam(lr=5e-3), clip=1.0, backend=backend,
                           carry={"h0": h_n, "c0": c_n})
    start = time.perf_counter()
    for k in range(steps * epochs):
        chunk = k % len(x_train)
        if chunk == 0:
            trainer.reset_carry()
        trainer.step({"x": x_train[chunk], "y": y_train[chunk]})
    trainer.write_back()
    seconds = time.perf_counter() - start

    x_eval, y_eval = ur.input("x_eval", x_test.shape, "int32"), ur.input("y_eval", y_test.shape, "int32")
    eval_loss = ur.compile(ur.nn.cross_entropy(model(x_eval)[0], y_eval), backend=backend)
    bits = float(eval_loss(x_eval=x_test, y_eval=y_test, **model.state_dict())) / math.log(2)
    print(f"  held-out loss {bits:.2f} bits/char (unigram baseline {unigram_bits:.2f}), "
          f"trained in {seconds:.0f} s")

    prompt_text = "def "
    prompt = ur.input("prompt", (len(prompt_text), 1), "int32")
    noise = ur.input("noise", (sample_length, 1, len(vocab)))
    inv_temp = ur.input("inv_temp", ())
    sampler = ur.compile(model.generate(prompt, noise, inv_temp), backend=backend)
    prompt_ids = vocab.encode(prompt_text)[:, None]
    samples = {}
    for name, temperature in (("greedy", None), ("sample T=0.8", 0.8)):
        g = np.zeros(noise.shape, np.float32) if temperature is None else \
            rng.gumbel(size=noise.shape).astype(np.float32)
        out = sampler(prompt=prompt_ids, noise=g, inv_temp=np.float32(1.0 / (temperature or 1.0)),
                      **model.state_dict())
        samples[name] = prompt_text + vocab.decode(out[:, 0])
        print(f"  --- {name} ---\n{samples[name]}")
    return {"bits_per_char": bits, "unigram_bits": unigram_bits, "seconds": seconds,
            "greedy": samples["greedy"], "sampled": samples["sample T=0.8"], "symbols": len(vocab)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--steps", type=int)
    a = parser.parse_args()
    main(quick=a.quick, backend=a.backend, epochs=a.epochs, hidden=a.hidden, steps=a.steps)
