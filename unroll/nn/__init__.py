"""ur.nn: the model library (RNN, LSTM, GRU, Linear, Embedding, Conv1d, TCN, losses, structures),
written only with the DSL and PyTorch-compatible in names, layouts, initialisation and results.

    lstm = ur.nn.LSTM(I, H)                      # parameters named like torch: weight_ih_l0, ...
    out, (h_n, c_n) = lstm(x)                    # x: (T, B, I) symbolic; one ur.scan per layer
    lstm.load_state_dict({k: v.numpy() for k, v in torch_lstm.state_dict().items()})
    run = ur.compile([out, h_n, c_n]); run(x=xv, **lstm.state_dict())

Build your own models by subclassing Module and assigning submodules as attributes; their
parameters get dotted names (`rnn.weight_ih_l0`, `head.weight`) as in torch.
"""

from .conv import TCN, Conv1d, TemporalBlock, tcn_levels
from .layers import Embedding, Linear
from .losses import bce_with_logits, cross_entropy, mse
from .module import Module, Sequential, StateDictError
from .rnn import GRU, LSTM, RNN, CellWeights, RNNBase, gru_cell, lstm_cell, rnn_cell
from .structures import greedy_decode, many_to_many, many_to_one, one_to_many, state_from, teacher_forcing

__all__ = [
    "tcn_levels",
    "GRU", "LSTM", "RNN", "TCN", "CellWeights", "Conv1d", "Embedding", "Linear", "Module", "RNNBase",
    "Sequential", "StateDictError", "TemporalBlock", "bce_with_logits", "cross_entropy", "greedy_decode",
    "gru_cell", "lstm_cell", "many_to_many", "many_to_one", "mse", "one_to_many", "rnn_cell",
    "state_from", "teacher_forcing",
]
