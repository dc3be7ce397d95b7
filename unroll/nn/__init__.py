"""ur.nn: the model library (RNN, LSTM, GRU and their cells, Linear, Embedding, Dropout, Conv1d, TCN,
losses, structures, attention, greedy and beam search decoding), written only with the DSL and
PyTorch-compatible in arguments, names, layouts, initialisation, results and errors.

    lstm = ur.nn.LSTM(I, H)                      # parameters named like torch: weight_ih_l0, ...
    out, (h_n, c_n) = lstm(x)                    # x: (T, B, I) symbolic; one ur.scan per layer
    lstm.load_state_dict(torch_lstm.state_dict())
    run = ur.compile([out, h_n, c_n]); run(x=xv, **lstm.state_dict())

Build your own models by subclassing Module and assigning submodules as attributes; their
parameters get dotted names (`rnn.weight_ih_l0`, `head.weight`) as in torch. Separately built
top-level modules never share parameters (see `unroll.nn.module`); feed several with
`run(**ur.nn.state(encoder, decoder), x=...)`.
"""

from . import utils
from .attention import BahdanauAttention, LuongAttention
from .conv import TCN, Conv1d, TemporalBlock, tcn_levels
from .decode import CompiledStep, Decoded, beam_search, compile_step, greedy_decode, greedy_search
from .layers import Dropout, Embedding, Linear
from .losses import bce_with_logits, cross_entropy, mse
from .module import Module, NameClashError, Sequential, StateDictError, dropout_feeds, dropout_inputs, state
from .rnn import (GRU, LSTM, RNN, CellWeights, GRUCell, InputShapeError, LSTMCell, RNNBase, RNNCell,
                  RNNCellBase, gru_cell, lstm_cell, rnn_cell)
from .seq2seq import GNMT
from .structures import many_to_many, many_to_one, one_to_many, state_from, teacher_forcing

__all__ = [
    "tcn_levels", "utils", "BahdanauAttention", "LuongAttention", "CompiledStep", "Decoded", "beam_search",
    "compile_step", "GNMT", "greedy_search",
    "GRU", "GRUCell", "LSTM", "LSTMCell", "RNN", "RNNCell", "RNNCellBase", "TCN", "CellWeights", "Conv1d",
    "Dropout", "Embedding", "InputShapeError", "Linear", "Module", "NameClashError", "RNNBase",
    "Sequential", "StateDictError", "TemporalBlock", "bce_with_logits", "cross_entropy", "dropout_feeds",
    "dropout_inputs", "greedy_decode", "gru_cell", "lstm_cell", "many_to_many", "many_to_one", "mse",
    "one_to_many", "rnn_cell", "state", "state_from", "teacher_forcing",
]
