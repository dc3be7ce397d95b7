"""torch.nn.utils counterparts: `ur.nn.utils.rnn` (pack_padded_sequence, pad_packed_sequence)."""

from . import rnn

__all__ = ["rnn"]
