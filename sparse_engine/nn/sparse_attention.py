"""``SparseMultiheadAttention``: ``nn.MultiheadAttention`` with masked in- and out-projections.

Masked: ``in_proj_weight`` (``(3E, E)``; or ``q_proj_weight``, ``k_proj_weight``,
``v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``), each a unit of its own for
pruning (``"<module>.in_proj_weight"``), and ``out_proj``, whose class becomes a sparse
``NonDynamicallyQuantizableLinear`` (unit ``"<module>.out_proj"``). ``nn.MultiheadAttention``
reads ``out_proj.weight`` itself instead of calling ``out_proj``; so does this forward (it runs
``out_proj``'s forward function without the module's hooks); an ``out_proj`` left dense
(excluded) is used as it is.

Kernels: every projection runs the fused ``sparse_engine::masked_linear`` op (the op and
dispatch ``SparseLinear`` uses), in every case below; ``W*M`` is never materialised by this layer.
The packed ``in_proj_weight`` mask is ``(3E, ceil(E/32))``, so the q, k and v projections are
row slices of the weight and of its mask: self-attention (``query is key is value``, as
``nn.TransformerEncoderLayer`` calls it) is one call over all 3E rows, ``key is value`` two calls
(q; k and v), otherwise three; ``q/k/v_proj_weight`` one call each. The attention itself is torch's
own functional code, step by step as ``F.multi_head_attention_forward`` does it, so every option
behaves as in ``nn.MultiheadAttention``: ``batch_first``, unbatched inputs, ``key_padding_mask``
and ``attn_mask`` (bool or float, 2-D or 3-D), ``is_causal``, ``add_bias_kv``, ``add_zero_attn``,
``kdim``/``vdim``, ``bias=False``, dropout in training; ``need_weights=False`` runs
``F.scaled_dot_product_attention``, ``need_weights=True`` the explicit softmax (averaged or
per-head weights, ``average_attn_weights``). Torch's fused inference fast path
(``torch._native_multi_head_attention``) reads the raw weights, so it is not used.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_engine.nn.masked_module import MaskedModule
from sparse_engine.ops.masked_linear import masked_linear


def _each(fn, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``fn`` applied to query, key and value, keeping the "is" relations between them (which select
    the in-projection's calls, as in ``F.multi_head_attention_forward``)."""
    if key is value:
        k = fn(key)
        return (k if query is key else fn(query)), k, k
    return fn(query), fn(key), fn(value)


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

    def _project(self, x: Tensor, name: str, bias, rows: Optional[slice] = None) -> Tensor:
        """``x (W[rows]*M[rows])^T + bias`` for the masked weight ``name`` (all rows by default) through
        the fused op, or with the ``use_weights`` override's rows through ``F.linear``."""
        weight, override = getattr(self, name), self.weight_override(name)
        if override is not None:
            return F.linear(x, override if rows is None else override[rows], bias)
        bits = self.mask_bits_of(name)
        if rows is not None:  # row slices of the weight and of its packed mask (one mask row per weight row)
            weight, bits = weight[rows], bits[rows]
        return masked_linear(x, weight, bits, bias, backend=self.backend)

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as ``F.multi_head_attention_forward`` computes them, through the masked op."""
        E, b = self.embed_dim, self.in_proj_bias
        if not self._qkv_same_embed_dim:
            b_q, b_k, b_v = (None,) * 3 if b is None else b.chunk(3, dim=-1)
            return (self._project(query, "q_proj_weight", b_q), self._project(key, "k_proj_weight", b_k),
                    self._project(value, "v_proj_weight", b_v))

        def project(x, rows=None):
            return self._project(x, "in_proj_weight", b if b is None or rows is None else b[..., rows], rows)

        if key is value:
            if query is key:  # self-attention: one call over all 3E rows
                return project(query).unflatten(-1, (3, E)).unbind(-2)
            k, v = project(key, slice(E, 3 * E)).unflatten(-1, (2, E)).unbind(-2)
            return project(query, slice(0, E)), k, v
        return tuple(project(x, slice(i * E, (i + 1) * E)) for i, x in enumerate((query, key, value)))

    def _bias_kv(self, bsz: int) -> tuple[Tensor, Tensor]:
        """``add_bias_kv``'s key and value rows for a batch of ``bsz``: ``(1, bsz, E)`` each."""
        return self.bias_k.repeat(1, bsz, 1), self.bias_v.repeat(1, bsz, 1)

    def _out_projection(self, x: Tensor) -> Tensor:
        """The output projection of ``x (L, batch, E)``."""
        if isinstance(self.out_proj, MaskedModule):
            return self.out_proj.forward(x)  # its masked forward, without module hooks (torch calls none either)
        return F.linear(x, self.out_proj.weight, self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask=None, need_weights: bool = True,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:
            query, key, value = _each(lambda x: x.transpose(1, 0), query, key, value)
        attn_output, attn_weights = self._attention(query, key, value, key_padding_mask, need_weights, attn_mask,
                                                    average_attn_weights, is_causal)
        if self.batch_first and is_batched:
            return attn_output.transpose(1, 0), attn_weights
        return attn_output, attn_weights

    def _attention(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                   is_causal):
        """``F.multi_head_attention_forward`` (sequence-first) with the in-projection of ``_in_projection``."""
        num_heads = self.num_heads
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
        if not is_batched:
            query, key, value = _each(lambda x: x.unsqueeze(1), query, key, value)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        if embed_dim != self.embed_dim:
            raise ValueError(f"query: expected embedding dimension {self.embed_dim} (embed_dim), got {embed_dim}")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"key, value: expected the same sequence and batch dims, got {tuple(key.shape[:2])} "
                             f"and {tuple(value.shape[:2])}")
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention builds the causal mask itself
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False
        head_dim = embed_dim // num_heads

        q, k, v = self._in_projection(query, key, value)

        if attn_mask is not None:
            expected = (tgt_len, src_len) if attn_mask.dim() == 2 else (bsz * num_heads, tgt_len, src_len)
            if attn_mask.dim() not in (2, 3) or attn_mask.shape != expected:
                raise RuntimeError(f"attn_mask: expected shape {(tgt_len, src_len)} or "
                                   f"{(bsz * num_heads, tgt_len, src_len)}, got {tuple(attn_mask.shape)}")
            if attn_mask.dim() == 2:
                attn_mask = attn_mask.unsqueeze(0)
        if self.bias_k is not None and self.bias_v is not None:
            bias_k, bias_v = self._bias_kv(bsz)
            k, v = torch.cat([k, bias_k]), torch.cat([v, bias_v])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.reshape(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src_len):
                raise ValueError(f"key_padding_mask: expected shape {(bsz, src_len)} (batch, source length), "
                                 f"got {tuple(key_padding_mask.shape)}")
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                                .reshape(bsz * num_heads, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = self._out_projection(torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len, bsz, embed_dim))
            weights = weights.view(bsz, num_heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                out, weights = out.squeeze(1), weights.squeeze(0)
            return out, weights

        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = self._out_projection(out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim))
        return (out if is_batched else out.squeeze(1)), None
