"""Synthetic sequence tasks for RNNs: the adding problem, copy memory, moving-digit clips, dates (seeded numpy).

Both follow Bai, Kolter & Koltun 2018, "An Empirical Evaluation of Generic Convolutional and
Recurrent Networks for Sequence Modeling" (the TCN paper, section 5 and its code
github.com/locuslab/TCN: adding_problem/utils.py, copy_memory/utils.py), but lay sequences out
time-first, (T, B, ...), like `ur.nn` and PyTorch's default. `seed` is an int or a
`np.random.Generator` (pass the same Generator to draw successive, different batches).

Adding problem (`adding_problem(n, T)`): x has shape (T, n, 2). Channel 0 holds values drawn from
U(0, 1); channel 1 is a marker that is 1 at exactly two distinct time steps, chosen uniformly among
all pairs (anywhere in the sequence, as in the TCN code), and 0 elsewhere. The target y, shape
(n, 1), is the sum of the two marked values. Trivial baseline: always predicting 1.0 (the mean of the
sum) gives MSE = Var(u1 + u2) = 2/12 = 1/6 ~ 0.1667 (`ADDING_BASELINE_MSE`); a model has learnt the
task when its MSE is far below that (the TCN paper reports 5.8e-5 for TCN and 0.164 for an LSTM at
T=600 with its training budget).

Copy memory (`copy_memory(n, T)`): sequences of length T + 20 over the symbols 0..9, shape
(T + 20, n) int32. The first 10 entries are digits drawn uniformly from 1..8 (the memory), then
T - 1 blanks (0), then the digit 9 at 0-based position T + 9 (the (T+10)-th entry, the delimiter
that asks the model to recall) and, as in the TCN paper ("the last 11 entries are filled with the
digit 9"), 9s on the remaining 10 entries. `repeat_marker=False` puts blanks there instead (the
single-delimiter variant of Arjovsky et al. 2016). The target, shape (T + 20, n) int32, is 0 except
its last 10 entries, which are the 10 memorised digits. The loss is the cross-entropy over all
T + 20 positions and 10 classes. Trivial baseline: predict 0 for the first T + 10 positions and a
uniform guess over 1..8 for the last 10: cross-entropy 10 * log(8) / (T + 20) per position
(`copy_memory_baseline(T)`).

Moving digits (`moving_digits(images, labels, n)`): short videos for video classification and
description (the S2VT setting of Venugopalan et al. 2015, in miniature). Each clip, shape
(frames, canvas, canvas), shows one 8x8 digit image drawn from `images` (e.g. scikit-learn's bundled
`load_digits().images / 16`, which the caller loads, so this module needs numpy only) sliding one
pixel per frame left, right, up or down across an empty canvas, without leaving it; where it starts
along the other axis is random. `describe(digit, direction)` gives the clip's sentence, "three moves
left". Pass disjoint image sets for training and test clips so test clips show unseen handwriting.

Dates (`random_dates(n, rng)`, `date_text(date, style)`): the translation task of the
encoder-decoder examples, days from 1950 to 2049 written in one of four human formats ("7 march
1994", "mar 07 1994", "07/03/1994", "march 7, 1994"), to be translated to ISO 1994-03-07.
"""

from __future__ import annotations

import datetime
import math
from typing import NamedTuple

import numpy as np

ADDING_BASELINE_MSE = 1.0 / 6.0  # predicting 1.0 for every sequence
COPY_MEMORY_LENGTH = 10          # digits to remember
COPY_MARKER = 9
COPY_BLANK = 0


def _rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def adding_problem(n: int, T: int, seed: int | np.random.Generator | None = 0,
                   dtype: object = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """`n` adding-problem sequences of length `T`: x (T, n, 2), y (n, 1). See the module doc."""
    if T < 2:
        raise ValueError(f"adding_problem: expected T >= 2 (two marked steps), found {T}")
    rng = _rng(seed)
    values = rng.random((T, n))
    # two distinct positions, uniform over all pairs: draw the second among the T-1 others
    first = rng.integers(0, T, n)
    second = rng.integers(0, T - 1, n)
    second += second >= first
    marker = np.zeros((T, n))
    cols = np.arange(n)
    marker[first, cols] = 1.0
    marker[second, cols] = 1.0
    x = np.stack([values, marker], axis=-1).astype(dtype)
    # the target is summed from the stored (rounded) values so y is exact for float32 inputs too
    y = (x[first, cols, 0].astype(np.float64) + x[second, cols, 0]).astype(dtype)[:, None]
    return x, y


def copy_memory(n: int, T: int, seed: int | np.random.Generator | None = 0,
                repeat_marker: bool = True, mem_length: int = COPY_MEMORY_LENGTH,
                dtype: object = np.int32) -> tuple[np.ndarray, np.ndarray]:
    """`n` copy-memory sequences: x and y of shape (T + 2*mem_length, n). See the module doc."""
    if T < 1:
        raise ValueError(f"copy_memory: expected T >= 1, found {T}")
    rng = _rng(seed)
    length = T + 2 * mem_length
    digits = rng.integers(1, 9, (mem_length, n))
    x = np.zeros((length, n), dtype=dtype)
    x[:mem_length] = digits
    x[mem_length + T - 1] = COPY_MARKER
    if repeat_marker:
        x[mem_length + T:] = COPY_MARKER
    y = np.zeros((length, n), dtype=dtype)
    y[-mem_length:] = digits
    return x, y


def copy_memory_baseline(T: int, mem_length: int = COPY_MEMORY_LENGTH) -> float:
    """Mean cross-entropy per position of the trivial predictor (0s, then uniform over 1..8)."""
    return mem_length * math.log(8) / (T + 2 * mem_length)


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIRECTIONS = ("left", "right", "up", "down")


class Clips(NamedTuple):
    """Moving-digit clips: frames (T, n, canvas, canvas) float, and per clip its digit (0-9),
    direction (an index into DIRECTIONS) and the index of the source image it shows."""
    frames: np.ndarray
    digits: np.ndarray
    directions: np.ndarray
    sources: np.ndarray


def moving_digits(images: np.ndarray, labels: np.ndarray, n: int, frames: int = 8, canvas: int = 16,
                  seed: int | np.random.Generator | None = 0, dtype: object = np.float32) -> Clips:
    """`n` clips of a digit from `images` (N, h, w) with `labels` (N,) sliding one pixel per frame
    in a random direction. See the module doc."""
    images = np.asarray(images)
    if images.ndim != 3 or len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"moving_digits: expected images (N, h, w) and N labels, found images of shape "
                         f"{images.shape} and {len(labels)} labels")
    if frames < 2:
        raise ValueError(f"moving_digits: expected frames >= 2 (one frame shows no motion), found {frames}")
    _, h, w = images.shape
    travel = frames - 1                                   # pixels moved from first to last frame
    if canvas < max(h, w) + travel:
        raise ValueError(f"moving_digits: a {h}x{w} digit moving {travel} pixels needs a canvas of at "
                         f"least {max(h, w) + travel}, found {canvas}")
    rng = _rng(seed)
    sources = rng.integers(0, len(images), n)
    directions = rng.integers(0, len(DIRECTIONS), n)
    # along the motion the start leaves room for the whole travel; across it, anywhere on the canvas
    along = rng.integers(0, canvas - max(h, w) - travel + 1, n)
    across = rng.integers(0, canvas - max(h, w) + 1, n)
    out = np.zeros((frames, n, canvas, canvas), dtype=dtype)
    for i in range(n):
        image, d = images[sources[i]], DIRECTIONS[directions[i]]
        for t in range(frames):
            # left/up move towards smaller coordinates: start at the far end of the travel
            shift = travel - t if d in ("left", "up") else t
            if d in ("left", "right"):
                row, col = across[i], along[i] + shift
            else:
                row, col = along[i] + shift, across[i]
            out[t, i, row:row + h, col:col + w] = image
    return Clips(out, np.asarray(labels)[sources].astype(np.int64), directions.astype(np.int64), sources)


def describe(digit: int, direction: int) -> str:
    """The sentence of a moving-digit clip: `describe(3, 0)` is "three moves left"."""
    return f"{DIGIT_NAMES[digit]} moves {DIRECTIONS[direction]}"


MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september",
          "october", "november", "december")


def random_dates(n: int, rng: np.random.Generator) -> list[datetime.date]:
    """`n` days drawn uniformly from 1950-01-01 to 2049-12-31."""
    first, last = datetime.date(1950, 1, 1).toordinal(), datetime.date(2049, 12, 31).toordinal()
    return [datetime.date.fromordinal(int(d)) for d in rng.integers(first, last + 1, n)]


def date_text(date: datetime.date, style: int) -> str:
    """`date` in human format `style` (0..3): "7 march 1994", "mar 07 1994", "07/03/1994",
    "march 7, 1994"."""
    month = MONTHS[date.month - 1]
    return [f"{date.day} {month} {date.year}", f"{month[:3]} {date.day:02d} {date.year}",
            f"{date.day:02d}/{date.month:02d}/{date.year}", f"{month} {date.day}, {date.year}"][style]
