"""One-to-many: "caption" an 8x8 digit image with the letters of its name ("seven", "zero", ...).

The image (64 pixels, scikit-learn's bundled load_digits, split 1500 / 297) conditions the first
state of a GRU decoder: h0 = tanh(Linear(64, H)(image)) (ur.nn.state_from). Training uses teacher
forcing: the decoder reads "<s>" + the name's letters and must predict the letters, then "." (end).
At test time it spells on its own with ur.nn.greedy_decode: each step's most likely letter is fed
back, embedded, as the next input. A caption is right when the whole word is spelled exactly.

Measured (2-core x86 machine shared with other jobs, numpy backend, one BLAS thread, GRU H=64,
letters embedded in 16 dims, batch 50, 30 epochs = 900 steps, `python examples/caption_digits.py`,
8 s in all):
    test captions spelled exactly: 92.3% of 297 (chance 10%); 6 s of training
    e.g. 1 -> 'one', 7 -> 'seven', 4 -> 'four', 6 -> 'six', 3 -> 'three', 1 -> 'one'

Re-derived by tests/test_examples.py with the same seeds: the default tests run the quick size (the
first 64 images, 53 for training and 11 for testing, H=8, batch 16, 1 epoch = 3 steps: it spells
nothing yet), `pytest -m slow` the full run above (accuracy as a fraction):
    main(quick=True) -> caption_accuracy=0.000 examples="8 -> '', 2 -> '', 0 -> ''"
    main()           -> caption_accuracy=0.923 examples="1 -> 'one', 7 -> 'seven', 4 -> 'four'"

    python examples/caption_digits.py [--quick] [--backend numba] [--epochs N] [--hidden H]
"""

from __future__ import annotations

import argparse
import os
import time

# Before numpy loads OpenBLAS: one thread is fastest for these small matrices, and more threads
# oversubscribe a shared 2-core machine (a 25 ms step took 5.5 s on one).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

import unroll as ur

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
END, START = ".", "<s>"
LETTERS = sorted(set("".join(NAMES)))
VOCAB = [END, START] + LETTERS                 # END is id 0, START id 1
LENGTH = max(map(len, NAMES)) + 1              # letters + END: 6 steps


def encode_names(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decoder inputs ("<s>" + letters) and targets (letters + "."), padded with "." after the end,
    both (LENGTH, N) int32, and the mask (LENGTH, N) of the positions that count (up to the end)."""
    ids = {c: i for i, c in enumerate(VOCAB)}
    targets = np.zeros((LENGTH, len(labels)), np.int32)             # 0 = END
    mask = np.zeros((LENGTH, len(labels)), np.float32)
    for n, label in enumerate(labels):
        word = NAMES[label]
        targets[:len(word), n] = [ids[c] for c in word]
        mask[:len(word) + 1, n] = 1.0                                 # letters and the END
    inputs = np.concatenate([np.full((1, len(labels)), ids[START], np.int32), targets[:-1]])
    return inputs, targets, mask


def spell(ids: np.ndarray) -> str:
    word = "".join(VOCAB[i] for i in ids)
    return word.split(END)[0]


class Captioner(ur.nn.Module):
    def __init__(self, hidden: int, embed: int = 16, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.condition = ur.nn.Linear(64, hidden, seed=self.child_seed())
        self.embedding = ur.nn.Embedding(len(VOCAB), embed, seed=self.child_seed())
        self.decoder = ur.nn.GRU(embed, hidden, seed=self.child_seed())
        self.head = ur.nn.Linear(hidden, len(VOCAB), seed=self.child_seed())

    def first_state(self, image: ur.Node) -> ur.Node:
        return ur.nn.state_from(self.decoder, ur.tanh(self.condition(image)))

    def forward(self, image: ur.Node, letters_in: ur.Node) -> ur.Node:
        """Teacher forcing: logits (LENGTH, B, V) for the next letter at every step."""
        out, _ = self.decoder(self.embedding(letters_in), self.first_state(image))
        return ur.nn.many_to_many(out, self.head)

    def caption(self, image: ur.Node) -> ur.Node:
        """Greedy decoding from the image alone: ids (LENGTH, B)."""
        start = ur.full((image.shape[0],), VOCAB.index(START), "int32")
        _, ids = ur.nn.greedy_decode(self.decoder, self.head, self.embedding, self.first_state(image),
                                     start, LENGTH)
        return ids


def main(quick: bool = False, backend: str = "numpy", epochs: int | None = None, hidden: int | None = None,
         seed: int = 0) -> dict:
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32)                 # (1797, 64)
    labels = digits.target
    if quick:
        images, labels = images[:64], labels[:64]
    n_train = round(len(labels) * 1500 / 1797)
    hidden = hidden or (8 if quick else 64)
    epochs = epochs or (1 if quick else 30)
    batch = 16 if quick else 50
    letters_in, letters_out, mask = encode_names(labels)

    model = Captioner(hidden, seed=seed)
    image = ur.input("image", (batch, 64))
    x_in = ur.input("letters_in", (LENGTH, batch), "int32")
    y_out = ur.input("letters_out", (LENGTH, batch), "int32")
    weight = ur.input("mask", (LENGTH, batch))
    loss = ur.nn.cross_entropy(model(image, x_in), y_out, mask=weight)
    train = {"image": images[:n_train], "letters_in": letters_in[:, :n_train],
             "letters_out": letters_out[:, :n_train], "mask": mask[:, :n_train]}
    print(f"captioning digits: {n_train} training images, GRU H={hidden}, batch {batch}, {epochs} epochs, "
          f"backend {backend}")
    start = time.perf_counter()
    ur.fit(loss, model, train, epochs=epochs, optimizer=ur.Adam(lr=1e-2), clip=1.0, backend=backend,
           seed=seed, batch_axes={"image": 0, "letters_in": 1, "letters_out": 1, "mask": 1})
    seconds = time.perf_counter() - start

    test_images, test_labels = images[n_train:], labels[n_train:]
    test_image = ur.input("test_image", test_images.shape)
    ids = ur.compile(model.caption(test_image), backend=backend)(test_image=test_images, **model.state_dict())
    words = [spell(ids[:, n]) for n in range(len(test_labels))]
    accuracy = float(np.mean([w == NAMES[t] for w, t in zip(words, test_labels)]))
    print(f"  test captions spelled exactly: {100 * accuracy:.1f}% of {len(words)}, "
          f"trained in {seconds:.0f} s")
    shown = ", ".join(f"{t} -> {w!r}" for t, w in list(zip(test_labels, words))[:6])
    print(f"  e.g. {shown}")
    return {"caption_accuracy": accuracy, "seconds": seconds, "examples": shown}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--hidden", type=int)
    a = parser.parse_args()
    main(quick=a.quick, backend=a.backend, epochs=a.epochs, hidden=a.hidden)
