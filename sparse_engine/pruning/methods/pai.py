"""Pruning at initialisation: choose the mask before training, then train the sparse network.

    pruner = PruneAtInit(model, optimizer, 0.9, "saliency", loss_fn=F.cross_entropy, data=(x, y))   # SNIP
    pruner = PruneAtInit(model, optimizer, 0.98, "synflow", input_shape=(1, 1, 28, 28))             # data-free
    pruner = PruneAtInit(model, optimizer, 0.9, "grasp", "erk", loss_fn=F.cross_entropy, data=(x, y),
                         shuffle=True)                                   # Frankle et al.'s sanity check
    print(pruner.report)         # per-layer densities

Scores (``prune_``'s): ``"saliency"`` (SNIP, Lee et al. 2019), ``"grasp"`` (Wang et al. 2020),
``"synflow"`` (Tanaka et al. 2020; iterative, ``iterations`` rounds, data-free), ``"random"``,
``"magnitude"``, or any other ``prune_`` score; any allocation, ERK included.

Sanity checks (Frankle, Dziugaite, Roy and Carbin, ICLR 2021, "Pruning Neural Networks at
Initialization: Why Are We Missing the Mark?"), each an option, both random draws from a
generator the pruner owns:

* ``shuffle=True``: each layer's mask is replaced by a random permutation of itself (the same
  kept count per layer, at random positions); the kept weights take their initial values there.
* ``reinit=True``: the kept weights are drawn anew from the layers' initialisation
  (``reinitialize_``).

If a method's accuracy survives them, it found per-layer densities, not which weights matter.

Layer collapse: a method can prune a whole layer (SynFlow prunes ResNets' 1x1 shortcut convolutions
entirely at high sparsity, Synaptic-Flow issue #7), which cuts the network. After pruning, a
``LayerCollapseWarning`` names every layer left with no weight, with the per-layer densities;
``min_density`` (a per-layer floor) or ``exclude`` prevent it.
"""
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from sparse_engine.nn.masked_module import MaskedModule
from sparse_engine.nn.sparsify import SparsityReport, sparsity_report
from sparse_engine.pruning.methods.pruner import SCORED_OPTIONS, Pruner, check_sparsity
from sparse_engine.pruning.methods.reinit import check_generator, reinitialize_
from sparse_engine.pruning.select import SCORES, prune_


class LayerCollapseWarning(UserWarning):
    """A pruned layer keeps no weight at all (layer collapse)."""


def collapsed_layers(layers: Sequence[tuple[str, MaskedModule]]) -> list[str]:
    """Names of the ``(name, layer)`` pairs whose mask keeps no weight."""
    return [name for name, m in layers if m.weight.numel() and not bool(m.mask.any())]


def warn_layer_collapse(layers: Sequence[tuple[str, MaskedModule]], method: str, stacklevel: int = 3) -> list[str]:
    """Warn (``LayerCollapseWarning``) when a layer of ``layers`` keeps no weight; returns their names."""
    collapsed = collapsed_layers(layers)
    if collapsed:
        densities = ", ".join(f"{n}: {int(m.mask.sum())}/{m.weight.numel()}" for n, m in layers)
        warnings.warn(f"{method}: layer collapse: {len(collapsed)} layer(s) pruned completely: {collapsed}; the "
                      f"network is cut there. Kept/weights per layer: {densities}. Pass min_density (a per-layer "
                      f"floor) or exclude those layers.", LayerCollapseWarning, stacklevel=stacklevel)
    return collapsed


def shuffled_mask(mask: Tensor, generator: torch.Generator) -> Tensor:
    """``mask`` (bool) with its entries randomly permuted: the same count, uniformly random positions."""
    flat = mask.flatten()
    perm = torch.randperm(flat.numel(), generator=generator).to(flat.device)
    return flat[perm].view(mask.shape)


class PruneAtInit(Pruner):
    """Prune at initialisation, optionally with Frankle et al.'s sanity checks (module docstring).

    The whole target is pruned at the construction, on the freshly initialised model; training
    then keeps the masks (``step()`` changes nothing).

    Args:
        model, optimizer: the freshly initialised model with sparse layers and its optimizer.
        sparsity: target in [0, 1).
        score: a ``prune_`` score name (default ``"saliency"``, SNIP).
        allocation: a ``prune_`` allocation (default ``"global"``; ``"erk"``, ``"uniform"``, ...).
        shuffle: shuffle each layer's mask (sanity check).
        reinit: re-draw the kept weights from the initialisation (sanity check).
        generator: the generator of ``score="random"`` and of the sanity checks (default: one seeded
            from torch's global RNG, so ``torch.manual_seed`` fixes them).
        **prune_kwargs: ``prune_``'s ``granularity``, ``exclude``, ``min_density`` and the score's
            inputs (``loss_fn``, ``data``, ``temperature``, ``input_shape``, ``iterations``, ...).

    Attributes: ``report`` (``SparsityReport`` of the pruned layers), ``densities``
    (``{layer name: kept fraction}``), ``collapsed`` (names of the layers left empty).
    """

    def __init__(self, model, optimizer, sparsity: float, score: str = "saliency", allocation="global", *,
                 shuffle: bool = False, reinit: bool = False, generator: Optional[torch.Generator] = None,
                 **prune_kwargs):
        target = check_sparsity(sparsity)
        if score not in SCORES or score == "fggp":
            raise ValueError(f"score: expected one of {tuple(s for s in SCORES if s != 'fggp')} (saliency is SNIP), "
                             f"got {score!r}")
        for name, value in (("shuffle", shuffle), ("reinit", reinit)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
        if generator is not None:
            check_generator(generator)
            if score == "random":
                prune_kwargs["generator"] = generator
        super().__init__(model, optimizer, {"score": score, "allocation": allocation, **prune_kwargs},
                         SCORED_OPTIONS, None, None)
        if self.generator is None:
            self.generator = generator or torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, ())))
        self.target, self.shuffle, self.reinit = target, shuffle, reinit
        self.config = {"sparsity": target, "shuffle": shuffle, "reinit": reinit, **self.prune_kwargs}
        self._prune_at_init()
        warn_layer_collapse(self.layers, "PruneAtInit")

    @property
    def report(self) -> SparsityReport:
        """Per-layer shape, density and kept count of the pruned layers (``print`` it for a table)."""
        names = {n for n, _ in self.layers}
        return SparsityReport([r for r in sparsity_report(self.model).layers if r.name in names])

    @property
    def densities(self) -> dict[str, float]:
        """``{layer name: kept fraction}`` of the pruned layers."""
        return {r.name: r.density for r in self.report.layers}

    @property
    def collapsed(self) -> list[str]:
        """Names of the pruned layers that keep no weight."""
        return collapsed_layers(self.layers)

    def _prune_at_init(self) -> None:
        layers = [m for _, m in self.layers]
        initial = [m.weight.detach().clone() for m in layers] if self.shuffle else None
        self.sparsity = self.target
        prune_(self.model, self.target, **self.prune_kwargs)
        if self.shuffle:
            with torch.no_grad():
                for m, w0 in zip(layers, initial):
                    mask = shuffled_mask(m.mask, self.generator)
                    m.weight.copy_(w0)  # kept weights take their initial values at their new positions
                    m.set_mask(mask)
        if self.reinit:
            reinitialize_(layers, self.generator)

