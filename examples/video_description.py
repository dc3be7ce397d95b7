"""Video description, S2VT style: read a clip's frames, then say what happens ("three moves left").

S2VT (Venugopalan et al., "Sequence to Sequence - Video to Text", ICCV 2015) in miniature: one stack
of two LSTMs runs over T frames and then over the sentence. The first LSTM reads each frame's
feature (a Linear projection of its pixels) while the frames last and zeros afterwards; the second
reads the first one's output next to a word embedding, zeros while the frames last and the previous
word afterwards, and only its outputs after the frames are scored against the next word. There is
no separate encoder state handed over: the same two loops carry on from frames to words.

The clips (unroll.data.moving_digits) are 8 frames of 16x16 in which one of scikit-learn's bundled
8x8 digits slides one pixel per frame left, right, up or down; training clips show the first 1500
images of load_digits, held-out clips only the other 297 (unseen handwriting). The sentence is
"<digit> moves <direction>" and "." (end). Training uses teacher forcing; the held-out clips are
described by greedy decoding (ur.nn.greedy_decode over a decoder step compiled once: each step's most
likely word is fed back), and a description counts when the whole sentence is exactly right.

Measured (2-core x86 machine shared with other engineers' jobs, a load of about 2-3; numpy
backend, one BLAS thread, LSTMs H=64, frame features 64, words embedded in 16, 4000 training clips,
1000 held-out clips, batch 50, 20 epochs = 1600 steps, Adam lr 5e-3, clip 1.0,
`python examples/video_description.py`, 61 s in all; 169 s at a load of 4-5):
    held-out sentences exactly right: 77.3% of 1000 (words 92.4%: digits 77.4%, directions 99.9%),
    56 s of training
    e.g. 'seven moves right' (right), 'six moves up' (right), 'five moves left' (right)
(the errors are the digit, read from raw pixels at changing positions by unseen hands, as in
examples/video_classification.py, whose models reach 74-79% on the same clips, but for one direction)

Re-derived by tests/test_examples.py with the same seeds: the default tests run the quick size (64
training clips from the first 100 images, 32 held-out clips from the next 20, H=8, batch 16, 1 epoch
= 4 steps: nothing learnt yet), `pytest -m slow` the full run above (accuracies as fractions):
    main(quick=True) -> sentence_accuracy=0.000 word_accuracy=0.021 examples="'four four four four'"
    main()           -> sentence_accuracy=0.773 word_accuracy=0.924 digit_accuracy=0.774 direction_accuracy=0.999
    main()           -> examples="'seven moves right' (right), 'six moves up' (right), 'five moves left' (right)"

    python examples/video_description.py [--quick] [--backend numba] [--epochs N] [--hidden H]
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
from unroll.data import DIGIT_NAMES, DIRECTIONS, describe, moving_digits
from unroll.nn.rnn import State

FRAMES, CANVAS = 8, 16
END, START = ".", "<s>"
VOCAB = [END, START, *DIGIT_NAMES, "moves", *DIRECTIONS]   # END is id 0, START id 1
WORDS = 4                                                  # digit, "moves", direction, END


def load_clips(n: int, lo: int, hi: int, seed: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`n` clips made from digit images lo:hi as seq-first frames (T, n, 256) and their sentences as
    word ids (WORDS, n), END last."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images, labels = digits.images / 16.0, digits.target
    if limit:
        images, labels = images[:limit], labels[:limit]
    clips = moving_digits(images[lo:hi], labels[lo:hi], n, FRAMES, CANVAS, seed=seed)
    ids = {w: i for i, w in enumerate(VOCAB)}
    words = np.array([[ids[w] for w in describe(d, r).split()] + [ids[END]]
                      for d, r in zip(clips.digits, clips.directions)], np.int32).T
    return clips.frames.reshape(FRAMES, n, CANVAS * CANVAS), words


def sentence(ids: np.ndarray) -> str:
    """The words before the first END."""
    words = [VOCAB[i] for i in ids]
    return " ".join(words[:words.index(END)] if END in words else words)


class S2VT(ur.nn.Module):
    def __init__(self, hidden: int, features: int = 64, embed: int = 16, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.frame_features = ur.nn.Linear(CANVAS * CANVAS, features, seed=self.child_seed())
        self.embedding = ur.nn.Embedding(len(VOCAB), embed, seed=self.child_seed())
        self.frames_lstm = ur.nn.LSTM(features, hidden, seed=self.child_seed())
        self.words_lstm = ur.nn.LSTM(hidden + embed, hidden, seed=self.child_seed())
        self.head = ur.nn.Linear(hidden, len(VOCAB), seed=self.child_seed())

    def read(self, frames: ur.Node) -> tuple[State, State]:
        """The encoding stage: both LSTMs over the frames (the word input zero); their states."""
        top, state1 = self.frames_lstm(ur.tanh(self.frame_features(frames)))
        no_words = ur.zeros(top.shape[:2] + (self.embedding.embedding_dim,))
        _, state2 = self.words_lstm(ur.concat([top, no_words], -1))
        return state1, state2

    def forward(self, frames: ur.Node, words_in: ur.Node) -> ur.Node:
        """Teacher forcing: logits (WORDS, B, V) for the next word, after reading the frames."""
        state1, state2 = self.read(frames)
        no_frames = ur.zeros(words_in.shape + (self.frame_features.out_features,))
        top, _ = self.frames_lstm(no_frames, state1)
        out, _ = self.words_lstm(ur.concat([top, self.embedding(words_in)], -1), state2)
        return ur.nn.many_to_many(out, self.head)

    def step(self, word: ur.Node, state: list[ur.Node]) -> tuple[ur.Node, list[ur.Node]]:
        """One decoding step (no frame any more): previous words (N,) and the two LSTMs' (h, c),
        four (N, H) arrays -> next-word log-probabilities (N, V) and the new (h, c) of both."""
        batch = word.shape[0]
        h1, c1, h2, c2 = (s.reshape(1, *s.shape) for s in state)
        no_frame = ur.zeros((batch, self.frame_features.out_features))
        (h1, c1), top = self.frames_lstm.step((h1, c1), no_frame)
        (h2, c2), out = self.words_lstm.step((h2, c2), ur.concat([top, self.embedding(word)], -1))
        return ur.log_softmax(self.head(out), -1), [s[0] for s in (h1, c1, h2, c2)]


def main(quick: bool = False, backend: str = "numpy", epochs: int | None = None, hidden: int | None = None,
         seed: int = 0) -> dict:
    hidden = hidden or (8 if quick else 64)
    epochs = epochs or (1 if quick else 20)
    batch = 16 if quick else 50
    n_train, n_test = (64, 32) if quick else (4000, 1000)
    limit = 120 if quick else None
    split = round((limit or 1797) * 1500 / 1797)
    x_train, y_train = load_clips(n_train, 0, split, seed + 1, limit)
    x_test, y_test = load_clips(n_test, split, limit or 1797, seed + 2, limit)
    start_row = np.full((1, n_train), VOCAB.index(START), np.int32)
    words_in = np.concatenate([start_row, y_train[:-1]])

    model = S2VT(hidden, seed=seed)
    frames = ur.input("frames", (FRAMES, batch, CANVAS * CANVAS))
    x_in = ur.input("words_in", (WORDS, batch), "int32")
    y_out = ur.input("words_out", (WORDS, batch), "int32")
    loss = ur.nn.cross_entropy(model(frames, x_in), y_out)
    print(f"video description (S2VT): {n_train} training clips of {FRAMES} frames {CANVAS}x{CANVAS}, "
          f"LSTMs H={hidden}, batch {batch}, {epochs} epochs, backend {backend}")
    start = time.perf_counter()
    ur.fit(loss, model, {"frames": x_train, "words_in": words_in, "words_out": y_train}, epochs=epochs,
           optimizer=ur.Adam(lr=5e-3), clip=1.0, backend=backend, seed=seed,
           batch_axes={"frames": 1, "words_in": 1, "words_out": 1})
    seconds = time.perf_counter() - start

    # read the held-out clips in one graph, then say the sentences with ur.nn.greedy_decode, which
    # calls one decoder step compiled once (the rows being the clips)
    weights = model.state_dict()
    test_frames = ur.input("test_frames", x_test.shape)
    read = ur.compile([part[0] for state in model.read(test_frames) for part in state], backend=backend)
    start_state = read(test_frames=x_test, **{k: weights[k] for k in read.input_names if k in weights})
    word = ur.input("word", ("N",), "int32")
    state = [ur.input(name, ("N", hidden)) for name in ("h1", "c1", "h2", "c2")]
    log_probs, new_state = model.step(word, state)
    uses = {p.name for p in ur.graph(log_probs, *new_state).params()}
    step = ur.nn.compile_step(log_probs, tokens=word, state=state, new_state=new_state,
                              params={k: v for k, v in weights.items() if k in uses}, backend=backend)
    ids = ur.nn.greedy_decode(step, start_state, VOCAB.index(START), VOCAB.index(END), WORDS).tokens.T
    said = [sentence(ids[:, n]) for n in range(n_test)]
    truth = [sentence(y_test[:, n]) for n in range(n_test)]
    accuracy = float(np.mean([s == t for s, t in zip(said, truth)]))
    word_accuracy = float(np.mean(ids[:WORDS - 1] == y_test[:WORDS - 1]))
    digit_accuracy, direction_accuracy = (float(np.mean(ids[i] == y_test[i])) for i in (0, 2))
    print(f"  held-out sentences exactly right: {100 * accuracy:.1f}% of {n_test} (words "
          f"{100 * word_accuracy:.1f}%: digits {100 * digit_accuracy:.1f}%, directions "
          f"{100 * direction_accuracy:.1f}%), trained in {seconds:.0f} s")
    shown = ", ".join(f"{s!r} ({'right' if s == t else f'truth {t!r}'})" for s, t in list(zip(said, truth))[:3])
    print(f"  e.g. {shown}")
    return {"sentence_accuracy": accuracy, "word_accuracy": word_accuracy, "digit_accuracy": digit_accuracy,
            "direction_accuracy": direction_accuracy, "seconds": seconds, "examples": shown}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--hidden", type=int)
    a = parser.parse_args()
    main(quick=a.quick, backend=a.backend, epochs=a.epochs, hidden=a.hidden)
