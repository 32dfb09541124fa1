"""How sparse layers save and load their masks: masks that cannot be lost, loads that stay consistent.

Saving (``state_dict()``):

* the keys are exactly the dense architecture's (masks are non-persistent buffers), so a sparse
  ``state_dict`` loads into the dense model with ``strict=True``;
* each mask travels in the ``state_dict``'s ``_metadata`` under ``"sparse_engine.mask_bits"``
  (``"sparse_engine.mask_bits.<param>"`` for weights other than ``weight``), which
  ``torch.save``/``torch.load`` keep (``weights_only=True`` too);
* the saved weights hold **exact zeros at pruned positions**, whatever an optimizer did to the
  stored weights (a masked copy is saved where they drifted; the layer is not modified).

Loading (``load_state_dict``), per masked weight:

* a weight the load did **not** write (missing key, torch's size mismatch) keeps its mask;
* a written weight takes the saved mask, from ``_metadata`` or from a ``<module>.mask_bits`` key
  (as the safetensors helpers write); the weights are then zeroed where it prunes;
* **without a saved mask** (a dense checkpoint, a rebuilt or prefix-stripped dict, a plain
  safetensors file) the mask is derived from the loaded weight's **exact zeros**, so a pruned
  model keeps its sparsity; ``with missing_masks("dense"):`` restores the earlier behaviour
  (dense masks). A weight that is all zeros then gets an empty mask, with a warning;
* a saved mask that is not an int32 tensor of the packed shape is reported the way torch reports
  an unusable checkpoint entry: as the unexpected key ``"<module>.mask_bits"`` (``strict=True``
  raises the one ``RuntimeError`` that lists every such key with torch's other problems,
  ``strict=False`` returns them), plus a warning saying what is wrong with each. (torch calls
  every layer with ``strict=True`` and applies ``strict`` to the key lists afterwards, so the key
  lists are the only channel that ``strict=False`` turns into a return value.) That layer's mask
  is derived from its loaded weight's zeros, so no layer ever holds weights that disagree with
  its mask;
* ``assign=True`` (the meta-device pattern: build on ``meta``, then
  ``load_state_dict(sd, assign=True)``) puts the masks on the loaded weights' device. torch would
  wrap the checkpoint's one tensor of a tied weight in two Parameters; the layers are tied again.

Tied weights: the layer holding the mask (the first in module order) loads it; a later layer
sharing the Parameter derives the mask only when the checkpoint named the weight under its key
alone (``safetensors.torch.save_model`` keeps one name of a shared tensor).
"""
import contextvars
import warnings
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor

from sparse_engine.ops.mask_pack import pack_mask, packed_shape, unpack_mask

METADATA_KEY = "sparse_engine.mask_bits"
MISSING_MASK_POLICIES = ("zeros", "dense")
_missing_mask_policy = contextvars.ContextVar("sparse_engine_missing_masks", default="zeros")


def metadata_key(param_name: str) -> str:
    """The ``_metadata`` entry of the mask of Parameter ``param_name``."""
    return METADATA_KEY if param_name == "weight" else f"{METADATA_KEY}.{param_name}"


@contextmanager
def missing_masks(policy: str) -> Iterator[None]:
    """What ``load_state_dict`` does for a sparse layer whose checkpoint has no saved mask.

    ``"zeros"`` (the default): the mask keeps the loaded weight's non-zeros. ``"dense"``: the
    mask keeps every weight (the behaviour before masks were derived). Applies to every load
    within the block, in this thread or task.
    """
    if policy not in MISSING_MASK_POLICIES:
        raise ValueError(f"policy: expected one of {MISSING_MASK_POLICIES}, got {policy!r}")
    token = _missing_mask_policy.set(policy)
    try:
        yield
    finally:
        _missing_mask_policy.reset(token)


@torch.no_grad()
def save_masks(module, destination, prefix: str, keep_vars: bool) -> None:
    """``_save_to_state_dict``'s part for masks: zeros at pruned positions, masks into ``_metadata``."""
    metadata = getattr(destination, "_metadata", None)
    entry = metadata.setdefault(prefix[:-1], {}) if metadata is not None else None
    owned = module.owned_masked_weights()
    for n in module._masked_names:
        key = prefix + n
        if key not in destination:
            continue
        bits = module.mask_bits_of(n)
        value = destination[key]
        # keep_vars asks for the Parameters themselves (not copies); meta tensors have no values.
        if not keep_vars and isinstance(value, Tensor) and not value.is_meta:
            pruned = ~unpack_mask(bits, value.shape)
            if bool((value.masked_fill(~pruned, 0) != 0).any()):
                destination[key] = value.masked_fill(pruned, 0)
        if entry is not None and n in owned:
            entry[metadata_key(n)] = bits.detach().clone()


def saved_masks(state_dict) -> dict[str, Tensor]:
    """The masks in a ``state_dict``'s ``_metadata`` as ``{"<module>.<mask buffer name>": int32 bits}``."""
    from sparse_engine.nn.masked_module import mask_buffer_name
    out = {}
    for module_name, entry in (getattr(state_dict, "_metadata", None) or {}).items():
        for key, bits in entry.items():
            if key == METADATA_KEY or key.startswith(METADATA_KEY + "."):
                param = "weight" if key == METADATA_KEY else key[len(METADATA_KEY) + 1:]
                buffer = mask_buffer_name(param)
                out[f"{module_name}.{buffer}" if module_name else buffer] = bits
    return out


def _version(t: Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _was_written(now: Tensor, before: tuple, key_present: bool) -> bool:
    param, version = before
    if now is not param:
        return True  # assign=True replaced it
    if version is None:
        return key_present
    return _version(now) != version


def _same_view(a: Tensor, b: Tensor) -> bool:
    return (a.device == b.device and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
            and not a.is_meta and a.data_ptr() == b.data_ptr())


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} of shape {tuple(value.shape)}"
    return type(value).__name__


def _checked_saved_mask(saved, weight: Tensor) -> tuple[Optional[Tensor], Optional[str]]:
    """``(bool mask, None)`` from a saved packed mask, or ``(None, what is wrong with it)``."""
    expected = packed_shape(weight.shape)
    if not isinstance(saved, Tensor) or saved.dtype != torch.int32 or tuple(saved.shape) != expected:
        return None, f"expected an int32 tensor of shape {expected}, got {_describe(saved)}"
    if weight.is_meta or saved.is_meta:
        return torch.ones_like(weight, dtype=torch.bool), None
    bits = saved.to(weight.device)
    mask = unpack_mask(bits, weight.shape)
    if not torch.equal(pack_mask(mask), bits):
        return None, "corrupt: bits are set past the weight's last column"
    return mask, None


def _mask_without_saved(layer: str, weight: Tensor) -> Tensor:
    if _missing_mask_policy.get() == "dense" or weight.is_meta:
        return torch.ones_like(weight, dtype=torch.bool)
    mask = weight != 0
    if weight.numel() and not bool(mask.any()):
        warnings.warn(f"load_state_dict: '{layer}' was loaded as all zeros without a saved mask, so its mask derived "
                      f"from the weight's zeros prunes all of it; load under sparse_engine.missing_masks('dense') to "
                      f"keep it dense", stacklevel=4)
    return mask


def load_with_masks(module, load, state_dict, prefix: str, local_metadata, strict: bool, missing_keys,
                    unexpected_keys, error_msgs) -> None:
    """``_load_from_state_dict`` of a sparse layer: ``load`` (torch's) for the tensors, then the masks."""
    from sparse_engine.nn.masked_module import mask_buffer_name
    local_metadata = local_metadata or {}
    before = {n: (getattr(module, n), _version(getattr(module, n))) for n in module._masked_names}
    saved, consumed = {}, []
    for n in module._masked_names:
        key = prefix + mask_buffer_name(n)
        if key in state_dict:
            saved[n] = state_dict[key]
            consumed.append(key)
        elif metadata_key(n) in local_metadata:
            saved[n] = local_metadata[metadata_key(n)]
    load(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
    for key in consumed:
        while key in unexpected_keys:
            unexpected_keys.remove(key)

    with torch.no_grad():
        for n in module._masked_names:
            weight = getattr(module, n)
            if n in module._mask_owners:
                owner, owner_name = module._mask_owners[n]
                shared = getattr(owner, owner_name)
                entry_version = before[n][1]
                if _same_view(shared, weight) and shared is not weight:
                    # assign=True wrapped the checkpoint's one tensor in two Parameters: tie them again.
                    setattr(module, n, shared)
                    weight, entry_version = shared, _version(shared)
                if shared is weight:
                    # Still tied: the layer holding the mask loaded it, unless the checkpoint had only this
                    # layer's key (safetensors' save_model keeps one name of a shared tensor).
                    handled = getattr(owner, "_mask_loaded_at", {}).get(owner_name) == entry_version
                    if _was_written(weight, before[n], prefix + n in state_dict) and not handled:
                        module.set_mask(_mask_without_saved(f"{prefix}{n}", weight), n)
                    continue
                # This layer now has a weight of its own: it holds its own mask from now on.
                module._register_mask(n, torch.ones_like(weight, dtype=torch.bool))
            loaded_at = module.__dict__.setdefault("_mask_loaded_at", {})
            loaded_at.pop(n, None)
            if not _was_written(weight, before[n], prefix + n in state_dict):
                continue  # torch did not load this weight: it keeps its mask
            bits_name = mask_buffer_name(n)
            if module._buffers[bits_name].device != weight.device:
                module._buffers[bits_name] = torch.empty(packed_shape(weight.shape), dtype=torch.int32,
                                                         device=weight.device)
            layer = f"{prefix}{n}"
            mask = None
            if n in saved:
                mask, problem = _checked_saved_mask(saved[n], weight)
                if problem is not None:
                    # torch passes strict=True to every layer and applies strict to the key lists itself:
                    # an unexpected key makes strict=True raise and strict=False return it.
                    unexpected_keys.append(prefix + bits_name)
                    warnings.warn(f"load_state_dict: saved mask for '{layer}' ({type(module).__name__}): {problem}; "
                                  f"its mask was derived from the loaded weight's exact zeros instead", stacklevel=4)
            if mask is None:
                mask = _mask_without_saved(layer, weight)
            module.set_mask(mask, n)
            loaded_at[n] = _version(weight)  # tells a layer tied to this weight, loaded next, that it is done
