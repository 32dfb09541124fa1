"""Lottery tickets: a mask and the weights to train it from, saved and reloaded.

    pruner = IMP(model, opt, 0.9, phases=3, epochs_per_phase=E, dense_epochs=E, rewind_step=100)
    ...                                      # train: dense epochs, then 3 prune-rewind-retrain phases
    torch.save(pruner.ticket(), "ticket.pt")
    fresh = sparsify(make_model())
    load_ticket(fresh, torch.load("ticket.pt"))                   # the ticket: masks + rewind weights
    load_ticket(other, ticket, reinit=True, generator=g)           # the random-reinitialisation control

A ticket is a plain dict (``torch.save``/``torch.load(weights_only=True)`` keep it):

* ``"masks"``: ``{layer name: int32 packed mask}`` of the pruned sparse layers;
* ``"weights"``: the rewind point, a ``state_dict`` (parameters and buffers) with the pruned
  weights of those layers zeroed;
* plain values describing it (``"sparsity"``, ``"phase"``, ``"rewind_step"``).

IMP's lottery options (``dense_epochs``, ``rewind_step``, ``reinit``) are documented on ``IMP``.
"""
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from sparse_engine.nn.masked_module import MaskedModule
from sparse_engine.nn.sparsify import sparse_modules
from sparse_engine.ops.mask_pack import packed_shape, unpack_mask
from sparse_engine.pruning.methods.pruner import check_int
from sparse_engine.pruning.methods.reinit import check_generator, reinitialize_


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of ``model.state_dict()`` (parameters and buffers): a rewind point."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_lottery_options(dense_epochs, rewind_step, reinit, rewind, lr_schedule, steps_per_epoch) -> int:
    """Validate IMP's lottery-ticket options; returns ``dense_epochs`` as an int."""
    dense_epochs = check_int(dense_epochs, "dense_epochs", 0)
    if not isinstance(reinit, bool):
        raise TypeError(f"reinit: expected a bool, got {type(reinit).__name__}")
    if rewind_step is not None:
        rewind_step = check_int(rewind_step, "rewind_step", 0)
        if rewind is not None:
            raise ValueError("rewind/rewind_step: give at most one (a saved state_dict, or the step to capture)")
        if rewind_step > 0 and dense_epochs == 0:
            raise ValueError(f"rewind_step={rewind_step}: the weights after step {rewind_step} are captured during "
                             f"the dense epochs; with dense_epochs=0 the first prune is at the construction (use "
                             f"rewind_step=0, or dense_epochs >= 1)")
        if steps_per_epoch is not None:
            spe = check_int(steps_per_epoch, "steps_per_epoch", 1)
            if rewind_step > dense_epochs * spe:
                raise ValueError(f"rewind_step={rewind_step}: after the {dense_epochs} dense epoch(s) of "
                                 f"{spe} steps ({dense_epochs * spe} steps)")
    if reinit and rewind is None and rewind_step is None:
        raise ValueError("reinit: the random-reinitialisation control needs a rewind point (rewind or rewind_step) "
                         "for the parameters it does not redraw")
    if dense_epochs and lr_schedule == "allr":
        raise ValueError("lr_schedule: 'allr' scales each phase's schedule by its prune and has none for the dense "
                         "epochs; use another schedule or None with dense_epochs")
    return dense_epochs


def _weight_key(name: str) -> str:
    return f"{name}.weight" if name else "weight"


@torch.no_grad()
def make_ticket(layers: Sequence[tuple[str, MaskedModule]], rewind: Mapping[str, Tensor], **info) -> dict:
    """A ticket (module docstring) from the ``(name, layer)`` pairs' current masks and the
    ``rewind`` state dict; ``info`` adds plain values."""
    masks = {name: m.mask_bits.detach().clone() for name, m in layers}
    weights = {k: v.detach().clone() for k, v in rewind.items()}
    for name, m in layers:
        key = _weight_key(name)
        if key in weights:
            weights[key].masked_fill_(~m.mask.to(weights[key].device), 0)
    return {"masks": masks, "weights": weights, **info}


def _check_ticket(model: nn.Module, ticket) -> dict[str, MaskedModule]:
    if not isinstance(ticket, Mapping) or not isinstance(ticket.get("masks"), Mapping) \
            or not isinstance(ticket.get("weights"), Mapping):
        raise TypeError("ticket: expected a dict with 'masks' and 'weights' (from IMP.ticket() or make_ticket)")
    layers = dict(sparse_modules(model))
    unknown = sorted(set(ticket["masks"]) - set(layers))
    if unknown:
        raise ValueError(f"ticket: masks of {unknown[:4]}, which are not sparse layers of the model "
                         f"(its sparse layers: {list(layers)[:8]})")
    for name, bits in ticket["masks"].items():
        expected = packed_shape(layers[name].weight.shape)
        if not isinstance(bits, Tensor) or bits.dtype != torch.int32 or tuple(bits.shape) != tuple(expected):
            raise ValueError(f"ticket['masks']['{name}']: expected int32 of shape {tuple(expected)}, got "
                             f"{getattr(bits, 'dtype', type(bits).__name__)} {tuple(getattr(bits, 'shape', ()))}")
    own = model.state_dict()
    unknown = sorted(set(ticket["weights"]) - set(own))
    if unknown:
        raise ValueError(f"ticket: weights {unknown[:4]} are not in the model's state_dict")
    for k, v in ticket["weights"].items():
        if not isinstance(v, Tensor) or v.shape != own[k].shape:
            raise ValueError(f"ticket['weights']['{k}']: expected a tensor of shape {tuple(own[k].shape)}, got "
                             f"{tuple(getattr(v, 'shape', ())) or type(v).__name__}")
    return {name: layers[name] for name in ticket["masks"]}


@torch.no_grad()
def load_ticket(model: nn.Module, ticket: Mapping, *, reinit: bool = False,
                generator: Optional[torch.Generator] = None) -> nn.Module:
    """Set ``model`` (same architecture, sparsified) to ``ticket``: its weights and buffers to the
    ticket's rewind weights and its layers' masks to the ticket's; returns ``model``.

    ``reinit=True`` is the random-reinitialisation control (Frankle & Carbin 2019): the masks and
    every other parameter and buffer as in the ticket, but the masked layers' weights and biases
    drawn anew from their initialisation (``reinitialize_`` with ``generator``, required then).
    Everything is checked before the model changes. Clear or rebuild the optimizer afterwards.
    """
    if not isinstance(reinit, bool):
        raise TypeError(f"reinit: expected a bool, got {type(reinit).__name__}")
    if reinit:
        if generator is None:
            raise ValueError("generator: reinit=True draws new weights and needs a torch.Generator")
        check_generator(generator)
    elif generator is not None:
        raise ValueError("generator: only read with reinit=True")
    layers = _check_ticket(model, ticket)
    own = model.state_dict(keep_vars=True)
    for k, v in ticket["weights"].items():
        own[k].copy_(v)
    for name, layer in layers.items():
        bits = ticket["masks"][name].to(layer.weight.device)
        layer.set_mask(unpack_mask(bits, layer.weight.shape))
    if reinit:
        reinitialize_(list(layers.values()), generator, bias=True)
    return model
