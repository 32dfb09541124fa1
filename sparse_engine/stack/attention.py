"""``StackedMultiheadAttention``: S masked ``nn.MultiheadAttention`` layers computed together.

Each model's projections are masked as in ``SparseMultiheadAttention`` (``in_proj_weight`` or
``q/k/v_proj_weight``, and ``out_proj``, held as a ``StackedLinear``) and run through
``stacked_masked_linear`` (one call over the S models; self-attention one call over all 3E rows). The
attention itself is ``SparseMultiheadAttention``'s code, run once with the S models folded into the batch
(``(L, S*B, E)``), so every option behaves as in ``nn.MultiheadAttention``.

Inputs carry the model axis first: ``(S, B, L, E)`` with ``batch_first``, ``(S, L, B, E)`` without,
``(S, L, E)`` unbatched. Masks without a model axis are shared by all models: ``key_padding_mask``
``(B, L_src)`` (unbatched ``(L_src,)``), or ``(S, B, L_src)`` per model; ``attn_mask`` ``(L, L_src)`` or
``(B * heads, L, L_src)`` shared, ``(S, B * heads, L, L_src)`` per model. Outputs: ``(S, ...)`` as the inputs;
attention weights ``(S, B, L, L_src)`` (``(S, B, heads, L, L_src)`` per head).
"""
from typing import Optional

import torch
from torch import Tensor, nn

from sparse_engine.nn.masked_module import MaskedModule
from sparse_engine.nn.sparse_attention import SparseMultiheadAttention, _each
from sparse_engine.ops.stacked_masked_linear import stacked_masked_linear
from sparse_engine.stack.layers import StackedLinear, StackedMaskedLayer


class StackedMultiheadAttention(StackedMaskedLayer):
    """S masked ``nn.MultiheadAttention`` layers (module docstring)."""

    def __init__(self, modules):
        super().__init__(modules)
        mha = modules[0]
        for attr in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first",
                     "head_dim", "add_zero_attn"):
            setattr(self, attr, getattr(mha, attr))
        for attr in ("bias_k", "bias_v"):  # plain None attributes without add_bias_kv
            if attr not in self._parameters:
                setattr(self, attr, None)
        self.out_proj = StackedLinear.from_modules([m.out_proj for m in modules])
        self.out_proj.called_by_parent = True

    @classmethod
    def masked_weight_names(cls, module: nn.Module) -> tuple[str, ...]:
        if module._qkv_same_embed_dim:
            return ("in_proj_weight",)
        return ("q_proj_weight", "k_proj_weight", "v_proj_weight")

    @torch.no_grad()
    def unstacked(self, i: int) -> nn.Module:
        layer = super().unstacked(i)
        if isinstance(layer.out_proj, MaskedModule) and not isinstance(layer, MaskedModule):
            # a masked out_proj needs its parent's masked forward (nn.MultiheadAttention reads its weight raw)
            layer = self.as_sparse(layer, self._masked_names)
            for n in self._masked_names:
                layer.set_mask(self.mask_of(n)[i], n)
        return layer

    # SparseMultiheadAttention's attention and in-projection logic, on the folded (L, S*B, E) tensors
    _attention = SparseMultiheadAttention._attention
    _in_projection = SparseMultiheadAttention._in_projection

    def _project(self, x: Tensor, name: str, bias: Optional[Tensor], rows: Optional[slice] = None) -> Tensor:
        """``x (L, S*B, E)`` through every model's masked weight ``name`` (rows ``rows``): ``(L, S*B, n)``."""
        weight, bits = getattr(self, name), self.mask_bits_of(name)
        if rows is not None:
            weight, bits = weight[:, rows], bits[:, rows]
        y = stacked_masked_linear(x.unflatten(1, (self.num_models, -1)).transpose(0, 1), weight, bits, bias)
        return y.transpose(0, 1).flatten(1, 2)

    def _out_projection(self, x: Tensor) -> Tensor:
        """``x (L, S*B, E)`` through every model's masked ``out_proj``."""
        y = self.out_proj(x.unflatten(1, (self.num_models, -1)).transpose(0, 1))  # (S, L, B, E)
        return y.transpose(0, 1).flatten(1, 2)

    def _bias_kv(self, bsz: int):
        s = self.num_models

        def rows(bias):  # (S, 1, 1, E) -> (1, S*B, E), model s's row for its B samples
            return bias.view(s, 1, -1).expand(s, bsz // s, -1).reshape(1, bsz, -1)
        return rows(self.bias_k), rows(self.bias_v)

    @staticmethod
    def _check_mask(mask, name: str, shared: tuple, s: int, also: tuple = ()) -> None:
        """``mask`` is None, or of shape ``shared`` (one model's, shared by all), ``(s, *shared)`` or ``also``."""
        if mask is None:
            return
        allowed = ((also,) if also else ()) + (shared, (s, *shared))
        if not isinstance(mask, Tensor) or tuple(mask.shape) not in allowed:
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"{name}: expected shape {' or '.join(map(str, allowed[:-1]))} (shared by the models) "
                             f"or {allowed[-1]} (one per model), got {got}")

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        s = self.num_models
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor) or t.dim() not in (3, 4) or t.shape[0] != s or t.dim() != query.dim():
                raise ValueError(f"{name}: expected shape ({s}, B, L, E) (batch_first), ({s}, L, B, E) or unbatched "
                                 f"({s}, L, E), the model axis first and as many dimensions as query, got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
        batched = query.dim() == 4
        # one model's shapes: B samples (1 unbatched), L queries, L_src keys
        b = (query.shape[1] if self.batch_first else query.shape[2]) if batched else 1
        tgt = query.shape[2 if batched and self.batch_first else 1]
        src = key.shape[2 if batched and self.batch_first else 1]
        heads = self.num_heads
        self._check_mask(key_padding_mask, "key_padding_mask", (b, src) if batched else (src,), s)
        self._check_mask(attn_mask, "attn_mask", (b * heads, tgt, src), s, also=(tgt, src))

        def fold(x):  # -> (L, S*B, E)
            x = (x.transpose(1, 2) if self.batch_first else x) if batched else x.unsqueeze(2)
            return x.transpose(0, 1).flatten(1, 2)

        def fold_mask(mask, shared_dim):  # shared or per model -> the folded batch's (S*B, ...)
            return (mask.expand(s, *mask.shape) if mask.dim() == shared_dim else mask).flatten(0, 1)

        q, k, v = _each(fold, query, key, value)
        if key_padding_mask is not None:
            key_padding_mask = fold_mask(key_padding_mask if batched else key_padding_mask.unsqueeze(-2), 2)
        if attn_mask is not None and attn_mask.dim() != 2:  # a 2-D mask is (L, L_src) for every sample already
            attn_mask = fold_mask(attn_mask, 3)
        out, weights = self._attention(q, k, v, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                                       is_causal)
        out = out.unflatten(1, (s, -1)).transpose(0, 1)  # (S, L, B, E)
        out = (out.transpose(1, 2) if self.batch_first else out) if batched else out.squeeze(2)
        if weights is not None:
            weights = weights.unflatten(0, (s, -1))
            if not batched:
                weights = weights.squeeze(1)
        return out, weights

    def extra_repr(self) -> str:
        return f"num_models={self.num_models}, embed_dim={self.embed_dim}, num_heads={self.num_heads}"
