"""Model-level conversion: ``sparsify``, ``densify`` and ``sparsity_report``.

Layers are converted in place by changing their class, so every ``Parameter`` object stays the
same: optimizers built before ``sparsify``, hooks, ``requires_grad``, dtypes and devices survive.
"""
import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from sparse_engine.nn.masked_module import MaskedModule
from sparse_engine.nn.sparse_conv2d import SparseConv2d
from sparse_engine.nn.sparse_linear import SparseLinear
from sparse_engine.ops.masked_linear import check_backend

# Exact types only: a subclass may use its weight outside forward (nn.MultiheadAttention's
# out_proj does), where a mask would silently not apply.
SPARSE_TYPES = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}

Selector = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


def name_matcher(selector: Selector, argname: str) -> Optional[Callable[[str, nn.Module], bool]]:
    if selector is None:
        return None
    if callable(selector):
        return selector
    patterns = [selector] if isinstance(selector, str) else list(selector)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{argname}: expected None, a name pattern, a list of name patterns or a callable "
                        f"(name, module) -> bool, got {selector!r}")
    return lambda name, _: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def sparse_modules(model: nn.Module) -> list[tuple[str, MaskedModule]]:
    """The ``(name, layer)`` pairs of the sparse layers of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MaskedModule)]


def sparsify(model: nn.Module, include: Selector = None, exclude: Selector = None,
             backend: str = "triton") -> nn.Module:
    """Turn ``nn.Linear`` and ``nn.Conv2d`` layers of ``model`` into sparse layers, in place.

    Args:
        model: any module; a bare ``nn.Linear``/``nn.Conv2d`` is converted itself.
        include: which layers to convert: None (every supported layer), glob patterns on the
            qualified module names (``"encoder.*"``), or a callable ``(name, module) -> bool``.
            An included layer with a weight but of an unsupported type is an error.
        exclude: layers to leave dense, same forms as ``include``.
        backend: CUDA kernel of the new layers, ``"triton"`` or ``"cuda"``.
    Returns:
        ``model``, whose converted layers start with a dense mask (nothing is pruned).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    check_backend(backend)
    inc, exc = name_matcher(include, "include"), name_matcher(exclude, "exclude")
    for name, module in list(model.named_modules()):
        if isinstance(module, MaskedModule) or (exc is not None and exc(name, module)):
            continue
        explicitly_included = inc is not None and inc(name, module)
        if inc is not None and not explicitly_included:
            continue
        target = SPARSE_TYPES.get(type(module))
        if target is None:
            # Only layers with weights are worth an error; include="*" also matches activations.
            if explicitly_included and isinstance(getattr(module, "weight", None), nn.Parameter):
                raise TypeError(f"sparsify: layer '{name}' of type {type(module).__name__} matches include but is "
                                f"not supported; supported layer types are "
                                f"{[t.__name__ for t in SPARSE_TYPES]} (exact types, not subclasses)")
            continue
        module.__class__ = target
        module._init_mask(backend)
    return model


@torch.no_grad()
def densify(model: nn.Module) -> nn.Module:
    """Turn sparse layers back into ``nn.Linear``/``nn.Conv2d``, in place.

    Pruned weights stay exact zeros; the mask is dropped.
    """
    dense_types = {v: k for k, v in SPARSE_TYPES.items()}
    for _, module in sparse_modules(model):
        module.apply_mask_()
        del module.mask_bits, module.backend, module.mask_version
        module.__class__ = dense_types[type(module)]
    return model


@dataclass
class LayerDensity:
    name: str
    shape: tuple
    numel: int
    kept: int

    @property
    def density(self) -> float:
        return self.kept / self.numel if self.numel else 1.0


@dataclass
class SparsityReport:
    """Per-layer and global density of a model's sparse layers (``str()`` prints a table)."""
    layers: list[LayerDensity]

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def kept(self) -> int:
        return sum(layer.kept for layer in self.layers)

    @property
    def density(self) -> float:
        return self.kept / self.numel if self.numel else 1.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def __str__(self) -> str:
        rows = [(layer.name or "<model>", "x".join(map(str, layer.shape)), f"{layer.density:.4f}", str(layer.kept),
                 str(layer.numel)) for layer in self.layers]
        rows.append(("global", "", f"{self.density:.4f}", str(self.kept), str(self.numel)))
        head = ("layer", "shape", "density", "nonzeros", "weights")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        return "\n".join(lines)


def sparsity_report(model: nn.Module) -> SparsityReport:
    """Name, shape, density and kept (nonzero) count of every sparse layer, plus the global density."""
    layers = [LayerDensity(name, tuple(m.weight.shape), m.weight.numel(), int(m.mask.sum()))
              for name, m in sparse_modules(model)]
    return SparsityReport(layers)
