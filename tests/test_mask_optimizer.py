"""mask_optimizer's post-step zeroing: skipped where provably a no-op, applied from the packed bits elsewhere.

The skip rests on a claim about torch's optimizers (from a zero gradient, zero state and zero
weight, SGD/Adam/AdamW compute +0): these tests run every flag combination for many steps, with
masks changing while momentum and moments are built up, with the zeroing *disabled* (it raises
if called), and compare the pruned weights bit for bit with +0.
"""
import itertools

import pytest
import torch
from torch import nn

from sparse_engine import mask_optimizer, sparse_modules, sparsify
from sparse_engine.nn.masked_module import MaskedModule
from sparse_engine.nn.mask_optimizer import update_keeps_zeros


def _model():
    return sparsify(nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 5 * 5, 17), nn.ReLU(),
                                  nn.Linear(17, 4)))


# The implementations: single-tensor, foreach, and the fused CPU kernels.
_IMPLEMENTATIONS = [dict(foreach=False), dict(foreach=True), dict(fused=True)]


def _sgd_flags():
    for momentum, nesterov, dampening in [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, False, 0.3), (0.9, True, 0.0)]:
        for wd, maximize, impl in itertools.product([0.0, 1e-2], [False, True], _IMPLEMENTATIONS):
            yield dict(lr=0.05, momentum=momentum, nesterov=nesterov, dampening=dampening, weight_decay=wd,
                       maximize=maximize, **impl)


def _adam_flags():
    for wd, amsgrad, maximize, impl in itertools.product([0.0, 1e-1], [False, True], [False, True], _IMPLEMENTATIONS):
        yield dict(lr=1e-2, weight_decay=wd, amsgrad=amsgrad, maximize=maximize, **impl)


CASES = ([(torch.optim.SGD, f) for f in _sgd_flags()] + [(torch.optim.Adam, f) for f in _adam_flags()]
         + [(torch.optim.AdamW, f) for f in _adam_flags()])


def _case_id(case):
    cls, flags = case
    on = [k if v is True else f"{k}={v}" for k, v in flags.items() if v not in (False, 0.0) and k != "lr"]
    return "-".join([cls.__name__] + on)


def _pruned_bits_are_plus_zero(unit) -> bool:
    pruned = unit.weight.detach()[~unit.mask]
    return bool((pruned.view(torch.int32) == 0).all())  # +0 exactly: -0.0 and denormals fail


def _train(opt, model, steps=16, mask_steps=(0, 5, 11)):
    x, y = torch.randn(8, 3, 7, 7), torch.randn(8, 4)
    for step in range(steps):
        if step in mask_steps:  # masks change with momentum and moments built up
            for _, unit in sparse_modules(model):
                unit.set_mask(torch.rand(unit.weight.shape) < 0.4)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        yield step


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_proven_optimizers_keep_pruned_weights_zero_without_rezeroing(case, monkeypatch):
    cls, flags = case
    model = _model()
    opt = cls(model.parameters(), **flags)
    handle = mask_optimizer(opt, model)
    assert handle.layers_to_apply() == []

    def forbidden(self, name=None):
        raise AssertionError("the post-step zeroing ran for an optimizer where it is a no-op")

    monkeypatch.setattr(MaskedModule, "apply_mask_", forbidden)
    for step in _train(opt, model):
        for name, unit in sparse_modules(model):
            assert _pruned_bits_are_plus_zero(unit), f"{name}: pruned weight moved at step {step}"
            assert unit.weight.detach()[unit.mask].ne(0).any(), "the kept weights must train"


class MyAdam(torch.optim.Adam):
    pass


UNPROVEN = {
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, initial_accumulator_value=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, centered=True),
    "adam-subclass": lambda p: MyAdam(p, lr=1e-2),
    "adam-eps0": lambda p: torch.optim.Adam(p, lr=1e-2, eps=0.0),
    "sgd-tensor-lr": lambda p: torch.optim.SGD(p, lr=torch.tensor(0.05), momentum=0.9),
}


@pytest.mark.parametrize("name", list(UNPROVEN))
def test_other_optimizers_apply_the_mask(name, monkeypatch):
    model = _model()
    opt = UNPROVEN[name](model.parameters())
    handle = mask_optimizer(opt, model)
    units = [unit for _, unit in sparse_modules(model)]
    assert handle.layers_to_apply() == units
    calls = []
    original = MaskedModule.apply_mask_
    monkeypatch.setattr(MaskedModule, "apply_mask_", lambda self, n=None: (calls.append(self), original(self, n)))
    for _ in _train(opt, model, steps=6, mask_steps=(0, 3)):
        for unit_name, unit in sparse_modules(model):
            assert _pruned_bits_are_plus_zero(unit), unit_name
    assert len(calls) == 6 * len(units)


def test_decision_per_group_and_always_apply():
    model = _model()
    convs = [model[0].weight, model[0].bias]
    rest = [p for p in model.parameters() if all(p is not q for q in convs)]
    opt = torch.optim.Adam([{"params": convs}, {"params": rest, "eps": 0.0}], lr=1e-2)
    handle = mask_optimizer(opt, model)
    assert handle.layers_to_apply() == [model[3], model[5]]
    opt.param_groups[1]["eps"] = 1e-8  # judged at every step, as the groups are now
    assert handle.layers_to_apply() == []
    assert not update_keeps_zeros(opt, {**opt.param_groups[0], "lr": float("inf")})
    assert update_keeps_zeros(opt, {**opt.param_groups[0], "fused": True})  # CPU parameters
    assert not update_keeps_zeros(opt, {**opt.param_groups[0], "fused": True,
                                        "params": [torch.empty(3, device="meta")]})  # not CPU: unproven
    handle.remove()
    always = mask_optimizer(opt, model, always_apply=True)
    assert always.layers_to_apply() == [model[0], model[3], model[5]]


def test_always_apply_covers_gradients_from_outside_the_layer():
    """A weight also used outside its layer's forward gets unmasked gradients: always_apply keeps it zero."""
    model = _model()
    for _, unit in sparse_modules(model):
        unit.set_mask(torch.rand(unit.weight.shape) < 0.4)
    outside = model[5].weight
    for always in (False, True):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        handle = mask_optimizer(opt, model, always_apply=always)
        opt.zero_grad()
        (model(torch.randn(2, 3, 7, 7)).sum() + outside.square().sum() + outside.sum()).backward()
        opt.step()
        assert _pruned_bits_are_plus_zero(model[5]) == always
        handle.remove()
    with pytest.raises(TypeError, match="always_apply: expected a bool"):
        mask_optimizer(opt, model, always_apply="yes")
