"""Lottery tickets through IMP: dense epochs, rewinding to init or to step k restores the saved
weights exactly, tickets saved and reloaded, the random-reinitialisation control on the same mask,
resume mid-run, errors."""
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_engine import sparse_modules, sparsify
from sparse_engine.pruning import IMP, load_ticket, snapshot

STEPS = 4  # per epoch


def model_with_bn():
    return sparsify(nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(STEPS)]


DATA = batches()


def train(model, opt, pruner, epochs, on_step=None, stop_after=None):
    """``epochs`` epochs of STEPS steps; ``on_step(t)`` after each pruner.step(); returns at
    ``stop_after`` total steps if given."""
    for _ in range(epochs):
        for x, y in DATA:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            pruner.step()
            if on_step is not None:
                on_step(pruner.step_count)
            if stop_after is not None and pruner.step_count == stop_after:
                return
        pruner.on_epoch_end()


def masks(model):
    return {n: m.mask for n, m in sparse_modules(model)}


def masked(state, model):
    """``state`` with the pruned weights of ``model``'s sparse layers zeroed."""
    out = dict(state)
    for n, m in sparse_modules(model):
        out[f"{n}.weight"] = state[f"{n}.weight"] * m.mask
    return out


def assert_state_equal(model, expected):
    own = model.state_dict()
    for k, v in expected.items():
        assert torch.equal(own[k], v), k


def build(seed=0, **kw):
    torch.manual_seed(seed)
    model = model_with_bn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    init = snapshot(model)
    return model, opt, init, IMP(model, opt, 0.75, phases=2, epochs_per_phase=1, **kw)


def test_rewind_to_init_restores_the_initial_weights_exactly():
    model, opt, init, pruner = build(dense_epochs=1, rewind_step=0)
    assert pruner.in_dense_epochs and all(m.all() for m in masks(model).values())
    assert pruner.total_epochs == 3
    train(model, opt, pruner, 1)  # the dense epoch, then phase 0's prune and rewind
    assert not pruner.in_dense_epochs and pruner.phase == 0
    assert sum(int(m.sum()) for m in masks(model).values()) == 12 * 16 + 16 * 4 - round(0.5 * (12 * 16 + 16 * 4))
    assert_state_equal(model, masked(init, model))
    assert len(opt.state) == 0
    train(model, opt, pruner, 1)  # phase 0's epoch, then phase 1's prune and rewind
    assert pruner.phase == 1 and math.isclose(pruner.sparsity, 0.75)
    assert_state_equal(model, masked(init, model))


def test_rewind_to_step_k_restores_the_weights_after_k_steps():
    model, opt, _, pruner = build(dense_epochs=2, rewind_step=6, steps_per_epoch=STEPS)
    seen = {}
    train(model, opt, pruner, 2, on_step=lambda t: seen.setdefault(t, snapshot(model)) if t == 6 else None)
    assert_state_equal(model, masked(seen[6], model))
    ticket = pruner.ticket()
    assert ticket["rewind_step"] == 6 and ticket["phase"] == 0 and ticket["sparsity"] == pytest.approx(0.5)
    for k, v in masked(seen[6], model).items():
        assert torch.equal(ticket["weights"][k], v), k


def test_ticket_saved_and_reloaded():
    model, opt, _, pruner = build(dense_epochs=1, rewind_step=2)
    train(model, opt, pruner, 2)
    buf = io.BytesIO()
    torch.save(pruner.ticket(), buf)
    buf.seek(0)
    ticket = torch.load(buf, weights_only=True)
    torch.manual_seed(42)
    fresh = model_with_bn()
    assert load_ticket(fresh, ticket) is fresh
    assert all(torch.equal(masks(model)[n], m) for n, m in masks(fresh).items())
    assert_state_equal(fresh, ticket["weights"])
    assert_state_equal(fresh, masked(pruner.rewind, model))


def test_reinit_control_trains_the_same_mask_from_new_weights():
    model_a, opt_a, _, ticket_run = build(dense_epochs=1, rewind_step=0)
    model_b, opt_b, init, control = build(dense_epochs=1, rewind_step=0, reinit=True)
    train(model_a, opt_a, ticket_run, 2)
    train(model_b, opt_b, control, 2)      # the last phase (1) started from a reinitialisation
    assert all(torch.equal(masks(model_a)[n], m) for n, m in masks(model_b).items())
    state = model_b.state_dict()
    for n, m in sparse_modules(model_b):
        w = m.weight.detach()
        assert (w[~m.mask] == 0).all()
        assert not torch.equal(w, init[f"{n}.weight"] * m.mask)           # new weights ...
        assert w.abs().max() <= 1 / math.sqrt(m.in_features)               # ... from nn.Linear's init
        assert not torch.equal(m.bias, init[f"{n}.bias"])
    for k in ("1.weight", "1.bias", "1.running_mean", "1.running_var"):   # BatchNorm from the rewind point
        assert torch.equal(state[k], init[k]), k
    # the control from a saved ticket, reproducible from its generator
    ticket = ticket_run.ticket()
    c1, c2 = model_with_bn(), model_with_bn()
    load_ticket(c1, ticket, reinit=True, generator=torch.Generator().manual_seed(5))
    load_ticket(c2, ticket, reinit=True, generator=torch.Generator().manual_seed(5))
    for (n, a), (_, b) in zip(sparse_modules(c1), sparse_modules(c2)):
        assert torch.equal(a.mask, masks(model_a)[n]) and torch.equal(a.weight, b.weight)
        assert not torch.equal(a.weight, ticket["weights"][f"{n}.weight"])


@pytest.mark.parametrize("stop_after", [2, 5, 10])  # dense epochs before and after step k, and in phase 0
def test_resume_mid_run_to_identical_masks_and_weights(stop_after):
    kw = dict(dense_epochs=2, rewind_step=3, lr_schedule="clr", steps_per_epoch=STEPS, lr_options={"max_lr": 0.1})
    model, opt, _, pruner = build(**kw)
    train(model, opt, pruner, 4)
    expected = (masks(model), snapshot(model))

    model, opt, _, pruner = build(**kw)
    train(model, opt, pruner, 4, stop_after=stop_after)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "pruner": pruner.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model, opt, _, pruner = build(seed=7, **kw)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    pruner.load_state_dict(saved["pruner"])
    done = stop_after
    # finish the interrupted epoch, then the rest
    for x, y in DATA[done % STEPS:]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step()
    pruner.on_epoch_end()
    train(model, opt, pruner, 4 - (done // STEPS + 1))
    assert all(torch.equal(expected[0][n], m) for n, m in masks(model).items())
    assert_state_equal(model, expected[1])


def test_rewind_step_never_reached_is_an_error_and_leaves_the_model():
    model, opt, _, pruner = build(dense_epochs=1, rewind_step=10)   # no steps_per_epoch: checked at the end
    with pytest.raises(RuntimeError, match=r"rewind_step=10: the dense epochs ended after 4 steps"):
        train(model, opt, pruner, 1)
    assert all(m.all() for m in masks(model).values()) and pruner.in_dense_epochs


def test_bad_arguments_name_them():
    torch.manual_seed(0)
    model = model_with_bn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cases = [
        (dict(dense_epochs=-1), r"dense_epochs: expected an int >= 0"),
        (dict(rewind_step=-2), r"rewind_step: expected an int >= 0"),
        (dict(rewind_step=0, rewind=snapshot(model)), r"rewind/rewind_step: give at most one"),
        (dict(rewind_step=3), r"rewind_step=3: .* with dense_epochs=0"),
        (dict(rewind_step=9, dense_epochs=2, steps_per_epoch=4), r"rewind_step=9: after the 2 dense epoch\(s\)"),
        (dict(reinit=True), r"reinit: the random-reinitialisation control needs a rewind point"),
        (dict(reinit=1, rewind_step=0), r"reinit: expected a bool"),
        (dict(dense_epochs=1, lr_schedule="allr", steps_per_epoch=4), r"lr_schedule: 'allr'"),
    ]
    for kw, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            IMP(model, opt, 0.5, 2, 1, **kw)
    assert all(m.all() for m in masks(model).values())
    pruner = IMP(model, opt, 0.5, 2, 1, dense_epochs=1)
    with pytest.raises(RuntimeError, match="ticket: no mask yet"):
        pruner.ticket()
    train(model, opt, pruner, 1)
    with pytest.raises(RuntimeError, match="ticket: this IMP has no rewind point"):
        pruner.ticket()


def test_load_ticket_checks_everything_before_changing_the_model():
    model, opt, _, pruner = build(rewind_step=0)
    ticket = pruner.ticket()
    fresh = model_with_bn()
    before = snapshot(fresh)
    bad = [
        ({**ticket, "masks": {**ticket["masks"], "9": ticket["masks"]["0"]}}, {}, r"ticket: masks of \['9'\]"),
        ({**ticket, "masks": {"0": ticket["masks"]["3"]}}, {}, r"ticket\['masks'\]\['0'\]: expected int32 of shape"),
        ({**ticket, "weights": {**ticket["weights"], "0.weight": torch.zeros(3)}}, {},
         r"ticket\['weights'\]\['0.weight'\]: expected a tensor of shape \(16, 12\)"),
        ({**ticket, "weights": {"x": torch.zeros(1)}}, {}, r"ticket: weights \['x'\] are not in the model"),
        ({"masks": {}}, {}, r"ticket: expected a dict with 'masks' and 'weights'"),
        (ticket, {"reinit": True}, r"generator: reinit=True draws new weights"),
        (ticket, {"generator": torch.Generator()}, r"generator: only read with reinit=True"),
    ]
    for t, kw, message in bad:
        with pytest.raises((ValueError, TypeError), match=message):
            load_ticket(fresh, t, **kw)
    assert_state_equal(fresh, before)
    assert all(m.all() for m in masks(fresh).values())
