"""What every sparse layer shares: its packed mask, how the mask is set, and how it is saved.

The mask is a non-persistent buffer ``mask_bits`` (int32, 1 bit per weight; see
``sparse_engine.ops.mask_pack``). It is *not* a ``state_dict`` key, so a sparse model's
``state_dict`` has exactly the keys of the dense architecture and loads into it with
``strict=True``. The mask travels in the ``state_dict``'s ``_metadata`` instead (which
``torch.save``/``torch.load`` keep, also with ``weights_only=True``), and pruned weights are
exact zeros in ``weight``.

Loading a ``state_dict`` without a saved mask (a dense checkpoint, or one whose ``_metadata`` was
dropped, e.g. by rebuilding the dict) resets the layer to a dense mask, so that the layer holds
exactly the loaded weights; nothing from the checkpoint is zeroed.
"""
import torch
from torch import Tensor

from sparse_engine.ops.mask_pack import pack_mask, packed_shape, unpack_mask

_METADATA_KEY = "sparse_engine.mask_bits"


class MaskedModule:
    """Mixin for ``nn.Module`` subclasses with a ``weight`` parameter masked by ``mask_bits``."""

    mask_bits: Tensor

    def _init_mask(self, backend: str = "triton") -> None:
        rows, words = packed_shape(self.weight.shape)
        self.register_buffer("mask_bits", torch.empty(rows, words, dtype=torch.int32, device=self.weight.device),
                             persistent=False)
        self.backend = backend
        self.mask_version = 0
        self.set_mask(torch.ones_like(self.weight, dtype=torch.bool))

    @property
    def mask(self) -> Tensor:
        """The mask as a bool tensor of the weight's shape (True = kept). A fresh tensor."""
        return unpack_mask(self.mask_bits, self.weight.shape)

    @torch.no_grad()
    def set_mask(self, mask: Tensor) -> None:
        """Set the mask (bool, the weight's shape and device) and zero the pruned weights.

        ``mask_version`` increases, which tells ``mask_optimizer`` to clear the optimizer state of
        newly pruned entries.
        """
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask: expected a bool torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected dtype torch.bool, got {mask.dtype}")
        if mask.shape != self.weight.shape:
            raise ValueError(f"mask: expected shape {tuple(self.weight.shape)} (the weight's), got {tuple(mask.shape)}")
        if mask.device != self.weight.device:
            raise ValueError(f"mask: expected a tensor on {self.weight.device} (the weight's device), got {mask.device}")
        self.mask_bits.copy_(pack_mask(mask))
        self.weight.masked_fill_(~mask, 0)
        self.mask_version += 1

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Zero the weights at pruned positions (after an optimizer step, for instance)."""
        self.weight.masked_fill_(~self.mask, 0)

    @torch.no_grad()
    def _set_mask_bits(self, mask_bits: Tensor) -> None:
        expected = packed_shape(self.weight.shape)
        if mask_bits.dtype != torch.int32 or tuple(mask_bits.shape) != expected:
            raise ValueError(f"saved mask of {type(self).__name__}: expected int32 of shape {expected}, "
                             f"got {mask_bits.dtype} of shape {tuple(mask_bits.shape)}")
        self.set_mask(unpack_mask(mask_bits.to(self.weight.device), self.weight.shape))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:
            metadata.setdefault(prefix[:-1], {})[_METADATA_KEY] = self.mask_bits.detach().clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "weight" not in state_dict:
            return  # the weight was not loaded (reported as missing): keep the current mask.
        saved = (local_metadata or {}).get(_METADATA_KEY)
        if saved is None:
            self.set_mask(torch.ones_like(self.weight, dtype=torch.bool))
        else:
            self._set_mask_bits(saved)

    def extra_repr(self) -> str:
        kept = int(self.mask.sum())
        return f"{super().extra_repr()}, density={kept / max(self.weight.numel(), 1):.4f}, backend={self.backend!r}"
