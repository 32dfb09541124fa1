"""``SparseLSTM``, ``SparseGRU``, ``SparseRNN``: recurrent layers with every weight matrix masked.

Every ``weight_*`` Parameter (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``weight_hr_l{k}`` with
projections, and their ``_reverse`` twins) has its own mask; biases are not masked. Each is a
unit of its own for pruning (``sparse_modules`` names them ``"<module>.weight_ih_l0"``...).

Masked dense fallback: the recurrence runs in torch's fused ``_VF.lstm``/``gru``/``rnn_*`` kernel
(cuDNN on GPUs) on ``masked_weight(W, bits)``. Torch's ``RNNBase.forward`` reads its weights from
the list ``_flat_weights``; the forward swaps that list for the masked weights for the duration of
the call. On CUDA, cuDNN then warns once that the weights are not one contiguous chunk (they are
rebuilt every call). ``torch.compile`` graph-breaks on recurrent layers, as for the dense ones.
"""
from torch import nn

from sparse_engine.nn.masked_module import MaskedModule


class _SparseRNNBase(MaskedModule):

    def default_masked_weights(self) -> tuple[str, ...]:
        return tuple(n for n in self._flat_weights_names if n.startswith("weight"))

    def forward(self, input, hx=None):
        self._update_flat_weights()  # refresh after Parameters were replaced (assign=True loads)
        raw = self._flat_weights
        masked = set(self._masked_names)
        self._flat_weights = [self._forward_weight(n) if n in masked else w
                              for n, w in zip(self._flat_weights_names, raw)]
        try:
            return super().forward(input, hx)
        finally:
            self._flat_weights = raw


class SparseLSTM(_SparseRNNBase, nn.LSTM):
    """``nn.LSTM`` with every weight matrix masked (masked dense fallback)."""
    dense_type = nn.LSTM


class SparseGRU(_SparseRNNBase, nn.GRU):
    """``nn.GRU`` with every weight matrix masked (masked dense fallback)."""
    dense_type = nn.GRU


class SparseRNN(_SparseRNNBase, nn.RNN):
    """``nn.RNN`` with every weight matrix masked (masked dense fallback)."""
    dense_type = nn.RNN
