"""Per-model optimisation: K stacked float64 runs (StackedSGD / StackedAdamW, different learning rates and
LR schedules per model, masks changing mid-run) equal K separate runs with torch's optimizers and
mask_optimizer."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse_engine as se
from sparse_engine.pruning.methods.lr_schedules import CLRSchedule
from sparse_engine.stack import stack, unstack
from sparse_engine.stack.optim import PerModelLR, StackedAdamW, StackedSGD, mask_stacked_optimizer
from test_stack import K, SHAPES, make_models, random_masks_

LRS = [0.05, 0.01, 0.002]
SCHEDULES = [lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
             lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)),
             lambda o: CLRSchedule(o, total_steps=5, max_lr=0.02)]

OPTIMIZERS = {
    "sgd-nesterov-wd": (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-3),
                        lambda p, lr: StackedSGD(p, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-3)),
    "sgd-dampening": (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.5, dampening=0.1),
                      lambda p, lr: StackedSGD(p, lr=lr, momentum=0.5, dampening=0.1)),
    "sgd-plain": (lambda p, lr: torch.optim.SGD(p, lr=lr), lambda p, lr: StackedSGD(p, lr=lr)),
    "adamw": (lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.1, foreach=False),
              lambda p, lr: StackedAdamW(p, lr=lr, weight_decay=0.1)),
}


def run_separately(models, make_opt, batches, schedules):
    for i, m in enumerate(models):
        opt = make_opt(m.parameters(), LRS[i])
        se.mask_optimizer(opt, m)
        sched = schedules[i](opt) if schedules else None
        for t, (x, y) in enumerate(batches):
            if t == 2:
                torch.manual_seed(100 + i)
                random_masks_(m)
            F.cross_entropy(m(x[i]), y[i]).backward()
            opt.step()
            opt.zero_grad()
            if sched:
                sched.step()


def run_stacked(stacked, make_opt, batches, schedules):
    opt = make_opt(stacked, LRS)
    mask_stacked_optimizer(opt, stacked)
    sched = PerModelLR(opt, schedules) if schedules else None
    for t, (x, y) in enumerate(batches):
        if t == 2:  # the same new masks as the separate runs draw
            for i in range(K):
                torch.manual_seed(100 + i)
                masks = [torch.rand(layer.weight.shape[1:]) >= torch.rand(1) * 0.9
                         for _, layer in stacked.masked_layers()]
                for (_, layer), mask in zip(stacked.masked_layers(), masks):
                    full = layer.mask
                    full[i] = mask
                    layer.set_mask(full)
        F.cross_entropy(stacked(x).flatten(0, 1), y.flatten()).backward()
        for p in stacked.parameters():
            if p.grad is not None:
                p.grad.mul_(K)  # cross_entropy averaged over K*B: each model's loss is the mean over its B
        opt.step()
        opt.zero_grad()
        if sched:
            sched.step()
    return opt


@pytest.mark.parametrize("opt, schedules", [
    ("sgd-nesterov-wd", None), ("sgd-nesterov-wd", SCHEDULES), ("sgd-dampening", SCHEDULES), ("sgd-plain", None),
    ("adamw", None), ("adamw", SCHEDULES)], ids=lambda v: v if isinstance(v, str) else "per-model-schedules")
def test_stacked_equals_separate_runs(opt, schedules):
    # BatchNorm models with different masks per model. The demo CNN's convolutions have biases before
    # BatchNorm, whose true gradient is zero: AdamW scales their rounding noise (~1e-17) up to steps of
    # size lr, so no two summation orders agree there; AdamW runs on the residual model (no such biases).
    name = "resnet" if opt == "adamw" else "cnn"
    models = make_models(name)
    stacked = stack(models)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(K, 6, *SHAPES[name], generator=g, dtype=torch.float64),
                torch.randint(0, 5, (K, 6), generator=g)) for _ in range(5)]
    make_ref, make_stacked = OPTIMIZERS[opt]
    run_separately(models, make_ref, batches, schedules)
    run_stacked(stacked, make_stacked, batches, schedules)
    for m, b in zip(models, unstack(stacked)):
        for (n, t), (_, u) in zip(m.state_dict().items(), b.state_dict().items()):
            torch.testing.assert_close(u, t, rtol=1e-9, atol=1e-11, msg=n)
        for (_, x), (_, y) in zip(se.sparse_modules(m), se.sparse_modules(b)):
            assert torch.equal(x.mask_bits, y.mask_bits)
            assert (y.weight[~y.mask] == 0).all()


def test_per_model_lr_state_dict_resumes():
    stacked = stack(make_models("mlp"))
    opt = StackedSGD(stacked, lr=LRS, momentum=0.9)
    sched = PerModelLR(opt, SCHEDULES)
    for _ in range(3):
        sched.step()
    state = sched.state_dict()
    opt2 = StackedSGD(stack(make_models("mlp")), lr=LRS, momentum=0.9)
    sched2 = PerModelLR(opt2, SCHEDULES)
    sched2.load_state_dict(state)
    assert torch.equal(opt2.param_groups[0]["lr"], opt.param_groups[0]["lr"])
    sched.step(), sched2.step()
    assert torch.equal(opt2.param_groups[0]["lr"], opt.param_groups[0]["lr"])


def test_errors():
    stacked = stack(make_models("mlp"))
    with pytest.raises(ValueError, match="lr: expected 3 values"):
        StackedSGD(stacked, lr=[0.1, 0.2])
    with pytest.raises(ValueError, match="lr: expected finite values >= 0"):
        StackedAdamW(stacked, lr=[0.1, -0.2, 0.1])
    with pytest.raises(ValueError, match="nesterov: requires a momentum"):
        StackedSGD(stacked, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="params: expected every parameter to have the same leading model axis"):
        StackedSGD([torch.zeros(3, 2, requires_grad=True), torch.zeros(2, 2, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="schedulers: expected 3"):
        PerModelLR(StackedSGD(stacked, lr=0.1), SCHEDULES[:2])
    with pytest.raises(TypeError, match="stacked: expected a StackedModel"):
        mask_stacked_optimizer(StackedSGD(stacked, lr=0.1), make_models("mlp")[0])


def test_adamw_state_with_one_step_for_all_models_loads_per_model():
    """A StackedAdamW state saved with one step count for all models (before per-model counts) loads as
    K counts, so clearing one model's state right after loading restarts that model alone."""
    stacked = stack([nn.Linear(3, 2).double() for _ in range(3)])
    opt = StackedAdamW(stacked, lr=[0.1, 0.2, 0.3])
    stacked(torch.randn(3, 4, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    for state in saved["state"].values():
        state["step"] = torch.tensor(5.0)
    fresh = StackedAdamW(stacked, lr=[0.1, 0.2, 0.3])
    fresh.load_state_dict(saved)
    for state in fresh.state.values():
        assert state["step"].tolist() == [5.0, 5.0, 5.0]
        state["step"][1].zero_()
    fresh.step()
    assert all(s["step"].tolist() == [6.0, 1.0, 6.0] for s in fresh.state.values())
