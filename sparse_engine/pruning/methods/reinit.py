"""Random re-initialisation of sparse layers, keeping their masks: the control of the lottery-ticket
and pruning-at-initialisation experiments.

Frankle & Carbin (2019) train a winning ticket's mask from a *new* random initialisation to show
that the original initialisation matters; Frankle et al. (2021) re-initialise the kept weights of
a mask found at initialisation to test whether the method found more than per-layer densities.
Both draw the new weights from the distribution the layers were initialised from: here each
layer's own ``reset_parameters()`` (what ``nn.Linear``/``nn.Conv2d`` ran when the model was
built), seeded from a ``torch.Generator`` so the draw is reproducible and leaves torch's global
random state as it was.
"""
from typing import Sequence

import torch

from sparse_engine.nn.masked_module import MaskedModule


def check_generator(generator, name: str = "generator") -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{name}: expected a torch.Generator, got {type(generator).__name__}")
    return generator


@torch.no_grad()
def reinitialize_(layers: Sequence[MaskedModule], generator: torch.Generator, *, bias: bool = False) -> None:
    """Draw new weights for ``layers`` from their initialisation (``reset_parameters()``), then
    zero the pruned ones; masks are unchanged. ``bias=False`` keeps each layer's bias as it is.

    Each layer is reset under a fresh seed drawn from ``generator`` inside
    ``torch.random.fork_rng``, so the global RNG (CPU and CUDA) is restored afterwards.
    """
    check_generator(generator)
    layers = list(layers)
    for i, layer in enumerate(layers):
        if not isinstance(layer, MaskedModule) or not callable(getattr(layer, "reset_parameters", None)):
            raise TypeError(f"layers[{i}]: expected a sparse layer with reset_parameters(), got "
                            f"{type(layer).__name__}")
    cuda = sorted({layer.weight.device.index or 0 for layer in layers if layer.weight.is_cuda})
    for layer in layers:
        seed = int(torch.randint(0, 2 ** 62, (), generator=generator))
        saved_bias = None if bias or layer.bias is None else layer.bias.detach().clone()
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            layer.reset_parameters()
        if saved_bias is not None:
            layer.bias.copy_(saved_bias)
        layer.apply_mask_()
