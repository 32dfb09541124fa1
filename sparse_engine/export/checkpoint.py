"""safetensors checkpoints that keep the masks: ``save_safetensors`` and ``load_safetensors``.

A safetensors file holds tensors and a string-to-string header, nothing like ``torch.save``'s
``_metadata``, so a plain ``safetensors.torch.save_file(model.state_dict(), path)`` drops the
masks. That file still loads back sparse (masks are derived from the weights' exact zeros, see
``sparse_engine.nn.mask_checkpoint``), but a kept weight that happens to be exactly 0 would come
back pruned. ``save_safetensors`` writes the masks too, as int32 tensors named like the layers'
mask buffers (``"head.1.mask_bits"``, ``"lstm.weight_ih_l0_mask_bits"``); sparse layers read
those keys back (also through a plain ``load_file`` + ``load_state_dict``), and
``load_safetensors`` drops them for layers that are dense in the model loaded into, so the same
file loads into the dense architecture with ``strict=True``.

Tied weights (one tensor under several names) are stored once, as safetensors requires; the
header records the other names (``"sparse_engine.aliases"``) and ``load_safetensors`` restores them.
"""
import json
import os
from typing import Optional, Union

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sparse_engine.nn.mask_checkpoint import saved_masks
from sparse_engine.nn.masked_module import MaskedModule, check_model, mask_buffer_name

_MASKS = "sparse_engine.masks"
_ALIASES = "sparse_engine.aliases"

PathLike = Union[str, os.PathLike]


def _view_key(t: Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def save_safetensors(model: nn.Module, path: PathLike, metadata: Optional[dict[str, str]] = None) -> None:
    """Write ``model.state_dict()`` and its masks to a safetensors file at ``path``.

    Args:
        model: any module (sparse layers' masks are written as ``<module>.mask_bits`` tensors).
        path: the file to write.
        metadata: extra header entries (str to str), kept as they are.
    """
    check_model(model)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise TypeError(f"metadata: expected None or a dict of str to str, got {metadata!r}")
    state = model.state_dict()
    masks = saved_masks(state)
    tensors, aliases, first = {}, {}, {}
    for key, value in list(state.items()) + list(masks.items()):
        value = value.detach()
        view = _view_key(value)
        if view in first:
            aliases[key] = first[view]
            continue
        first[view] = key
        tensors[key] = value.contiguous()
    # Tensors that overlap without being the same view cannot be stored side by side: copy them.
    storages = {}
    for key, value in tensors.items():
        storages.setdefault((value.device, value.untyped_storage().data_ptr()), []).append(key)
    for keys in storages.values():
        for key in keys[1:]:
            tensors[key] = tensors[key].clone()
    header = {"format": "pt", _MASKS: json.dumps(sorted(masks)), _ALIASES: json.dumps(aliases)}
    header.update(metadata or {})
    save_file(tensors, os.fspath(path), metadata=header)


def load_safetensors(model: nn.Module, path: PathLike, strict: bool = True, assign: bool = False):
    """Load a safetensors file into ``model`` with ``load_state_dict``, masks included.

    Works for files written by :func:`save_safetensors` (masks restored exactly) and for plain
    safetensors files (masks derived from exact zeros). Mask tensors of layers that are dense in
    ``model`` are dropped, so the file loads into the dense architecture too. Returns
    ``load_state_dict``'s result (missing and unexpected keys).
    """
    check_model(model)
    path = os.fspath(path)
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        header = f.metadata() or {}
    for alias, key in json.loads(header.get(_ALIASES, "{}")).items():
        tensors[alias] = tensors[key]
    wanted = {f"{name}.{mask_buffer_name(n)}" if name else mask_buffer_name(n)
              for name, m in model.named_modules() if isinstance(m, MaskedModule) for n in m.owned_masked_weights()}
    for key in json.loads(header.get(_MASKS, "[]")):
        if key not in wanted:
            tensors.pop(key, None)
    return model.load_state_dict(tensors, strict=strict, assign=assign)


__all__ = ["save_safetensors", "load_safetensors"]

