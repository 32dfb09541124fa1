"""``SparseMultiheadAttention``: ``nn.MultiheadAttention`` with masked in- and out-projections.

Masked: ``in_proj_weight`` (``(3E, E)``; or ``q_proj_weight``, ``k_proj_weight``,
``v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``), each a unit of its own for
pruning (``"<module>.in_proj_weight"``), and ``out_proj``, whose class becomes a sparse
``NonDynamicallyQuantizableLinear`` (unit ``"<module>.out_proj"``). ``nn.MultiheadAttention``
reads ``out_proj.weight`` itself instead of calling ``out_proj``, so this forward uses
``out_proj``'s masked weight; an ``out_proj`` left dense (excluded) is used as it is.

Masked dense fallback: ``F.multi_head_attention_forward`` (torch's own attention, every option)
on ``masked_weight(W, bits)`` for each masked projection. Torch's fused inference fast path
(``torch._native_multi_head_attention``) reads the raw weights, so it is not used.
"""
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_engine.nn.masked_module import MaskedModule


class SparseMultiheadAttention(MaskedModule, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with masked projections (see the module docstring)."""

    dense_type = nn.MultiheadAttention

    def default_masked_weights(self) -> tuple[str, ...]:
        if self._qkv_same_embed_dim:
            return ("in_proj_weight",)
        return ("q_proj_weight", "k_proj_weight", "v_proj_weight")

    def __init__(self, *args, backend: str = "triton", **kwargs):
        super().__init__(*args, backend=backend, **kwargs)
        from sparse_engine.nn.conversion import convert_module
        convert_module(self.out_proj, backend, called_by_parent=True)

    def _out_proj_weight(self) -> Tensor:
        if isinstance(self.out_proj, MaskedModule):
            return self.out_proj.effective_weight()
        return self.out_proj.weight

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask=None, need_weights: bool = True,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:
            # Keep the "is" relations between query, key and value, which F.multi_head_attention_forward reads.
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        separate = not self._qkv_same_embed_dim
        attn_output, attn_weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads,
            None if separate else self.effective_weight("in_proj_weight"), self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout,
            self._out_proj_weight(), self.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, use_separate_proj_weight=separate,
            q_proj_weight=self.effective_weight("q_proj_weight") if separate else None,
            k_proj_weight=self.effective_weight("k_proj_weight") if separate else None,
            v_proj_weight=self.effective_weight("v_proj_weight") if separate else None,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if self.batch_first and is_batched:
            return attn_output.transpose(1, 0), attn_weights
        return attn_output, attn_weights
