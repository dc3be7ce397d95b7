"""unroll: a compiler for recurrent neural networks. This module is the public API only.

    import unroll as ur
    x = ur.input("x", (T, B, I)); lstm = ur.nn.LSTM(I, H); out, (h, c) = lstm(x)
    step = ur.compile([loss, *ur.grad(loss, lstm.parameters())], backend="numba")
"""

from __future__ import annotations

from .compile import Compiled, FeedError, FeedValueError, compile
from .dsl import (full, graph, init_values, input, log_softmax, logsumexp, map, ones, param, scan,
                  softmax, softplus, stack, zeros)
from .ir.build import (abs, add, argmax, broadcast_to, cast, concat, const, div, equal, exp, greater,
                       greater_equal, less, less_equal, log, log1p, matmul, max, maximum, mean,
                       minimum, mul, neg, not_equal, onehot, pad, pow, recip, relu, reshape, sigmoid,
                       sign, sin, cos, slice_axis, split, sqrt, stop_gradient, sub, sum, tanh, transpose, where)
from .ir.node import Graph, Node
from .ir.ops import ShapeError
from .ir.optimize import explain, optimize
from .ir.text import ParseError, parse, print_graph
from .ir.unroll import unroll
from .ir.verify import VerifyError, verify
from .ir.autodiff import BudgetError, Checkpoint, MemoryBudget, Recompute, SaveAll, grad, value_and_grad, vjp
from .ir.truncate import truncate, truncation_bias
from .viz import draw, to_dot, to_networkx
from . import nn
from .diagnostics import GradientFlow, gradient_flow, plot_gradient_flow
from . import data, distributed, train
from .train import (SGD, Adam, AdamW, RMSprop, StopTraining, TrainStep, clip_by_global_norm,
                    clip_by_value, fit, load_params, save_params)

__version__ = "0.1.0"

__all__ = [
    "Compiled", "FeedError", "FeedValueError", "Graph", "Node", "ShapeError", "VerifyError", "abs", "add", "argmax",
    "broadcast_to", "cast", "compile", "concat", "const", "div", "equal", "exp", "explain", "full", "graph",
    "greater", "greater_equal", "init_values", "input", "less", "less_equal", "log", "log1p",
    "log_softmax", "logsumexp", "map", "matmul", "max", "maximum", "mean", "minimum", "mul", "neg", "nn",
    "not_equal", "onehot", "ones", "optimize", "pad", "param", "pow", "recip", "relu", "reshape", "scan",
    "sigmoid", "sign", "sin", "cos", "slice_axis", "softmax", "softplus", "split", "sqrt", "stack",
    "stop_gradient", "sub", "sum", "tanh", "transpose", "unroll", "verify", "where", "zeros",
    "draw", "to_dot", "to_networkx", "ParseError", "parse", "print_graph",
    "GradientFlow", "gradient_flow", "plot_gradient_flow",
    "BudgetError", "Checkpoint", "MemoryBudget", "Recompute", "SaveAll", "grad", "truncate", "truncation_bias",
    "value_and_grad", "vjp",
    "data", "distributed", "train", "SGD", "Adam", "AdamW", "RMSprop", "StopTraining", "TrainStep",
    "clip_by_global_norm", "clip_by_value", "fit", "load_params", "save_params",
]
