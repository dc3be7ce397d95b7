"""Training: optimizers, gradient clipping, the compiled TrainStep, the `fit` loop, parameter files.

Modules: optim (SGD, Adam, AdamW, RMSprop with PyTorch's equations), clip (global norm / value),
step (TrainStep: compiled forward+backward + update), loop (`fit`: mini-batches, history), io (.npz).
"""

from .clip import clip_by_global_norm, clip_by_value, global_norm
from .loop import FitResult, History, StopTraining, fit
from .io import load_params, save_params
from .optim import SGD, Adam, AdamW, Optimizer, RMSprop, make_optimizer
from .step import StepStats, TrainStep

__all__ = [
    "SGD", "Adam", "AdamW", "FitResult", "History", "Optimizer", "RMSprop", "StepStats", "StopTraining",
    "TrainStep", "clip_by_global_norm", "clip_by_value", "fit", "global_norm", "load_params",
    "make_optimizer", "save_params",
]
