"""Video classification (many-to-one): which digit moves which way, by an LSTM, a GRU and a TCN.

Each clip is 8 frames of 16x16 pixels in which one of scikit-learn's bundled 8x8 digits slides one
pixel per frame left, right, up or down (unroll.data.moving_digits; clips for training show the
first 1500 images of load_digits, clips for testing only the other 297, so test handwriting is
unseen). The class is digit x direction (40 classes; chance 2.5%). Each model reads the flattened
frames (T=8 steps of 256 pixels) and a Linear head on its last step gives the 40 logits; the three
see the same batches, are trained with Adam and gradient clipping by ur.fit, and are scored on
held-out clips (both right, and the direction and digit parts alone).

Measured (2-core x86 machine shared with other engineers' jobs, a load of about 2; numpy backend,
one BLAS thread, H=64, TCN kernel 3 x 2 levels (receptive field 13 >= 8 frames), 4000 training clips,
1000 test clips, batch 50, 15 epochs = 1200 steps, Adam lr 3e-3, clip 1.0,
`python examples/video_classification.py`, 66 s in all; at a load of 4-6 the same run took 240 s,
the training times 92 / 39 / 89 s, with the same accuracies):
    model  accuracy  direction  digit  parameters  train s
    LSTM      74.2%     100.0%  74.2%       85032       19
    GRU       76.7%      99.9%  76.8%       64424       16
    TCN       78.5%      99.4%  78.5%      105320       28
(the direction is trivial for every model; the digit, read from raw pixels at changing positions with
no convolution over space, by unseen hands, is what separates them)

Re-derived by tests/test_examples.py with the same seeds: the default tests run the quick size (64
training clips from the first 100 images, 32 test clips from the next 20, H=8, batch 16, 1 epoch = 4
steps: nothing learnt yet), `pytest -m slow` the full run above (accuracies as fractions):
    main(quick=True) -> TCN_accuracy=0.031 LSTM_direction_accuracy=0.125 GRU_direction_accuracy=0.156
    main(quick=True) -> LSTM_parameters=8872 GRU_parameters=6744 TCN_parameters=9168
    main()           -> LSTM_accuracy=0.742 GRU_accuracy=0.767 TCN_accuracy=0.785
    main()           -> LSTM_direction_accuracy=1.000 GRU_direction_accuracy=0.999 TCN_direction_accuracy=0.994
    main()           -> LSTM_digit_accuracy=0.742 GRU_digit_accuracy=0.768 TCN_digit_accuracy=0.785
    main()           -> LSTM_parameters=85032 GRU_parameters=64424 TCN_parameters=105320

    python examples/video_classification.py [--quick] [--backend numba] [--epochs N] [--hidden H]
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
from unroll.data import DIRECTIONS, moving_digits

FRAMES, CANVAS = 8, 16
CLASSES = 10 * len(DIRECTIONS)                 # class = digit * 4 + direction
TCN_KERNEL = 3


def load_clips(n_train: int, n_test: int, seed: int, limit: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and test clips as seq-first frames (T, N, 256) and class ids (N,); test clips are made
    from held-out digit images only."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images, labels = digits.images / 16.0, digits.target
    if limit:
        images, labels = images[:limit], labels[:limit]
    split = round(len(labels) * 1500 / 1797)

    def make(lo: int, hi: int, n: int, s: int) -> tuple[np.ndarray, np.ndarray]:
        clips = moving_digits(images[lo:hi], labels[lo:hi], n, FRAMES, CANVAS, seed=s)
        frames = clips.frames.reshape(FRAMES, n, CANVAS * CANVAS)
        return frames, (clips.digits * len(DIRECTIONS) + clips.directions).astype(np.int32)

    return (*make(0, split, n_train, seed + 1), *make(split, len(labels), n_test, seed + 2))


class VideoClassifier(ur.nn.Module):
    """A sequence body (LSTM, GRU or TCN) over the frames and a Linear head on its last step."""

    def __init__(self, kind: str, hidden: int, seed: int = 0) -> None:
        super().__init__(name=kind.lower(), seed=seed)
        self.kind = kind
        pixels = CANVAS * CANVAS
        if kind == "TCN":
            levels = ur.nn.tcn_levels(FRAMES, TCN_KERNEL)
            self.body = ur.nn.TCN(pixels, [hidden] * levels, kernel_size=TCN_KERNEL, seed=self.child_seed())
        else:
            self.body = getattr(ur.nn, kind)(pixels, hidden, seed=self.child_seed())
        self.head = ur.nn.Linear(hidden, CLASSES, seed=self.child_seed())

    def forward(self, frames: ur.Node) -> ur.Node:
        out = self.body(frames) if self.kind == "TCN" else self.body(frames)[0]
        return ur.nn.many_to_one(out, self.head)       # (B, 40) logits from the last frame


def main(quick: bool = False, backend: str = "numpy", epochs: int | None = None, hidden: int | None = None,
         seed: int = 0, kinds: tuple[str, ...] = ("LSTM", "GRU", "TCN")) -> dict:
    hidden = hidden or (8 if quick else 64)
    epochs = epochs or (1 if quick else 15)
    batch = 16 if quick else 50
    n_train, n_test = (64, 32) if quick else (4000, 1000)
    x_train, y_train, x_test, y_test = load_clips(n_train, n_test, seed, limit=120 if quick else None)

    x = ur.input("frames", (FRAMES, batch, CANVAS * CANVAS))
    y = ur.input("label", (batch,), "int32")
    x_eval = ur.input("frames_eval", x_test.shape)
    print(f"video classification: {n_train} training clips of {FRAMES} frames {CANVAS}x{CANVAS}, "
          f"{CLASSES} classes (digit x direction), hidden {hidden}, batch {batch}, {epochs} epochs, "
          f"backend {backend}")
    results: dict[str, float] = {}
    rows = []
    for kind in kinds:
        model = VideoClassifier(kind, hidden, seed=seed)
        loss = ur.nn.cross_entropy(model(x), y)
        start = time.perf_counter()
        ur.fit(loss, model, {"frames": x_train, "label": y_train}, epochs=epochs, optimizer=ur.Adam(lr=3e-3),
               clip=1.0, backend=backend, seed=seed)
        seconds = time.perf_counter() - start
        logits = ur.compile(model(x_eval), backend=backend)(frames_eval=x_test, **model.state_dict())
        guess = logits.argmax(-1)
        n_dir = len(DIRECTIONS)
        accuracy = float(np.mean(guess == y_test))
        direction = float(np.mean(guess % n_dir == y_test % n_dir))
        digit = float(np.mean(guess // n_dir == y_test // n_dir))
        params = sum(v.size for v in model.state_dict().values())
        results.update({f"{kind}_accuracy": accuracy, f"{kind}_direction_accuracy": direction,
                        f"{kind}_digit_accuracy": digit, f"{kind}_parameters": params,
                        f"{kind}_seconds": seconds})
        rows.append(f"    {kind:<5} {100 * accuracy:8.1f}% {100 * direction:9.1f}% {100 * digit:5.1f}% "
                    f"{params:11d} {seconds:8.0f}")
    print("    model  accuracy  direction  digit  parameters  train s")
    print("\n".join(rows))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--hidden", type=int)
    a = parser.parse_args()
    main(quick=a.quick, backend=a.backend, epochs=a.epochs, hidden=a.hidden)
