"""PyTorch counterparts of ur.nn's recurrent layers, shared by the tests that compare against PyTorch
(import after `pytest.importorskip("torch")`)."""

from __future__ import annotations

import torch

import unroll as ur

# kind -> (our layer, PyTorch's layer), both called as (input_size, hidden_size, **options)
KINDS = {
    "rnn_tanh": (lambda *a, **k: ur.nn.RNN(*a, nonlinearity="tanh", **k),
                 lambda *a, **k: torch.nn.RNN(*a, nonlinearity="tanh", **k)),
    "rnn_relu": (lambda *a, **k: ur.nn.RNN(*a, nonlinearity="relu", **k),
                 lambda *a, **k: torch.nn.RNN(*a, nonlinearity="relu", **k)),
    "lstm": (ur.nn.LSTM, torch.nn.LSTM),
    "gru": (ur.nn.GRU, torch.nn.GRU),
}

TORCH_DTYPE = {"float32": torch.float32, "float64": torch.float64}
