"""Pruning methods: exact kept counts at every step, pruned weights stay zero, regrowth, seeds,
checkpoint + resume, BatchNorm recalibration, IMP's phases and LR schedules, errors."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_engine import sparse_modules, sparsify
from sparse_engine.nn.mask_optimizer import mask_optimizer
from sparse_engine.pruning import prune_
from sparse_engine.pruning.select.allocation import target_kept
from sparse_engine.pruning.methods.bn_recalibration import recalibrate_bn
from sparse_engine.pruning.methods.lr_schedules import ALLRSchedule, relative_norm_drop, retrain_lr_schedule
from sparse_engine.pruning.methods.pruners import FGGP, GMP, IMP, Cyclical, OneShot
from sparse_engine.pruning.methods.pruner import installed_mask_optimizer
from sparse_engine.pruning.methods.schedules import cubic_sparsity, cyclical_sparsity

N_WEIGHTS = 12 * 16 + 16 * 4  # the MLP's sparse weights: 256


def mlp():
    return sparsify(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)))


def cnn():
    return sparsify(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(4 * 4 * 4, 3)))


def batches(n=4, size=16, shape=(12,), classes=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, *shape, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n)]


DATA = batches()


def masks(model):
    return {n: m.mask for n, m in sparse_modules(model)}


def kept(model):
    return sum(int(m.mask.sum()) for _, m in sparse_modules(model))


def assert_pruned_zero(model):
    for name, m in sparse_modules(model):
        assert (m.weight.detach()[~m.mask] == 0).all(), f"layer {name}: a pruned weight is nonzero"


def run(model, optimizer, pruner, steps, data=DATA, epoch_len=None, loss_fn=F.cross_entropy, start=0):
    """The user loop: zero_grad, backward, optimizer.step, pruner.step (then on_epoch_end every
    epoch_len steps). Checks pruned weights are zero after each optimizer step and each pruner
    step, and that step() returns True exactly when masks changed. Returns the kept count after
    every step."""
    counts = []
    for t in range(start, start + steps):
        x, y = data[t % len(data)]
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
        assert_pruned_zero(model)
        before = masks(model)
        changed = pruner.step()
        if epoch_len is not None and (t + 1) % epoch_len == 0:
            changed = pruner.on_epoch_end() or changed
        after = masks(model)
        if not changed:
            assert all(torch.equal(before[n], after[n]) for n in after), f"masks changed at step {t + 1} unreported"
        assert_pruned_zero(model)
        counts.append(kept(model))
    return counts


def sgd(model, lr=0.1):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


# -- exact kept counts at every step ---------------------------------------------------------

def test_gmp_counts_hand_computed():
    # s_t = 0.8 - 0.8 (1 - (t - 2)/6)^3 at t = 2, 4, 6, 8: 0, 0.562963, 0.770370, 0.8 of 256 weights
    # -> pruned round(s * 256) = 0, 144, 197, 205 -> kept 256, 112, 59, 51.
    model = mlp()
    opt = sgd(model)
    pruner = GMP(model, opt, 0.8, start_step=2, end_step=8, frequency=2)
    assert run(model, opt, pruner, 10) == [256, 256, 256, 112, 112, 59, 59, 51, 51, 51]
    assert pruner.sparsity == 0.8


def expected_gradual(pruner, t, n=N_WEIGHTS):
    points = [p for p in range(pruner.t0, pruner.t0 + pruner.n * pruner.dt + 1, pruner.dt) if p <= t]
    return n if not points else target_kept(n, cubic_sparsity(points[-1], pruner.initial, pruner.final,
                                                               pruner.t0, pruner.dt, pruner.n))


def expected_cyclical(pruner, t, n=N_WEIGHTS):
    T, C, f = pruner.total_steps, pruner.cycles, pruner.frequency
    starts = [(c * T) // C for c in range(C)] + [T]
    events = set()
    for a, b in zip(starts, starts[1:]):
        events.update(range(a, b, f))
        events.add(b - 1)
    last = max(e for e in events if e <= min(t, T - 1))
    return target_kept(n, cyclical_sparsity(last, pruner.target, C, T, pruner.ramp, pruner.initial))


METHODS = {
    "oneshot": (lambda m, o: OneShot(m, o, 0.7, at=3), lambda p, t: N_WEIGHTS if t < 3 else target_kept(256, 0.7)),
    "gmp": (lambda m, o: GMP(m, o, 0.9, 1, 10, 3, allocation="uniform"), expected_gradual),
    "gmp-recover": (lambda m, o: GMP(m, o, 0.9, 0, 10, 2, recover=True, loss_fn=F.cross_entropy, data=DATA[0]),
                    expected_gradual),
    "fggp": (lambda m, o: FGGP(m, o, 0.85, 2, 11, 3, rate=2.0), expected_gradual),
    "cyclical": (lambda m, o: Cyclical(m, o, 0.8, cycles=3, total_steps=14, frequency=2), expected_cyclical),
    "cyclical-initial": (lambda m, o: Cyclical(m, o, 0.8, cycles=2, total_steps=10, ramp="linear", initial=0.3,
                                               loss_fn=F.cross_entropy, data=DATA[1]), expected_cyclical),
}


@pytest.mark.parametrize("optimizer", [sgd, adamw], ids=["sgd-momentum", "adamw"])
@pytest.mark.parametrize("method", list(METHODS))
def test_kept_count_after_every_step(method, optimizer):
    make, expected = METHODS[method]
    model = mlp()
    opt = optimizer(model)
    pruner = make(model, opt)
    counts = run(model, opt, pruner, 15)
    assert counts == [expected(pruner, t) for t in range(1, 16)]
    assert counts[-1] == target_kept(N_WEIGHTS, pruner.sparsity)
    assert pruner.step_count == 15


def test_imp_counts_phases_and_budget():
    model = mlp()
    opt = sgd(model)
    pruner = IMP(model, opt, 0.9, phases=3, budget_epochs=7)
    assert pruner.phase_epochs == [3, 2, 2] and pruner.total_epochs == 7
    s = pruner.phase_sparsities                         # 1 - 0.1^(k/3)
    assert s[:2] == pytest.approx([1 - 0.1 ** (1 / 3), 1 - 0.1 ** (2 / 3)]) and s[2] == 0.9
    counts = run(model, opt, pruner, 14, epoch_len=2)   # 7 epochs of 2 steps
    # phase 0 pruned at construction; phase 1 after epoch 3 (step 6); phase 2 after epoch 5 (step 10)
    k = [target_kept(N_WEIGHTS, v) for v in s]
    assert counts == [k[0]] * 5 + [k[1]] * 4 + [k[2]] * 5
    assert pruner.finished and pruner.phase == 2
    assert not pruner.on_epoch_end() and kept(model) == k[2]


def test_imp_from_sparse_model_and_rates():
    model = mlp()
    prune_(model, 0.5)
    pruner = IMP(model, sgd(model), None, rates=[0.5, 0.2], epochs_per_phase=1)
    # each rate prunes that fraction of the weights still kept: 128 -> 64 -> 51.2
    assert pruner.phase_sparsities == pytest.approx([0.75, 0.8])
    assert kept(model) == 64


def test_built_in_loop_drives_a_pruner():
    # train_epoch zeroes gradients at the start of each iteration, so .grad is this step's when
    # the object passed as its per-step hook (today its ``scheduler`` argument) is stepped.
    from sparse_engine.train import train_epoch
    model = mlp()
    opt = sgd(model)
    pruner = FGGP(model, opt, 0.8, 2, 6, 2, rate=2.0)
    x, y = torch.cat([b[0] for b in DATA]), torch.cat([b[1] for b in DATA])
    for _ in range(2):
        train_epoch(model, opt, x, y, batch_size=16, on_step=pruner.step, generator=torch.Generator().manual_seed(0))
        pruner.on_epoch_end()
    assert pruner.step_count == 8 and pruner.epoch == 2
    assert kept(model) == target_kept(N_WEIGHTS, 0.8)
    assert_pruned_zero(model)


# -- optimizer state, mask_optimizer ---------------------------------------------------------

def test_optimizer_state_of_newly_pruned_weights_is_cleared():
    model = mlp()
    opt = adamw(model)
    pruner = GMP(model, opt, 0.6, 2, 4, 2, initial=0.3)   # prunes 0.3 at t=2, 0.6 at t=4
    run(model, opt, pruner, 4)
    run(model, opt, pruner, 1, start=4)                   # the step after the prune
    for _, m in sparse_modules(model):
        state = opt.state[m.weight]
        for key in ("exp_avg", "exp_avg_sq"):
            assert (state[key][~m.mask] == 0).all()
            assert (state[key][m.mask] != 0).any()


def test_mask_optimizer_installed_once():
    model = mlp()
    opt = sgd(model)
    pruner = OneShot(model, opt, 0.5)
    assert installed_mask_optimizer(opt, model) is pruner.masked_optimizer
    assert len(opt._optimizer_step_pre_hooks) == 1
    model2 = mlp()
    opt2 = sgd(model2)
    handle = mask_optimizer(opt2, model2)
    assert GMP(model2, opt2, 0.5, 1, 2, 1).masked_optimizer is handle
    assert len(opt2._optimizer_step_pre_hooks) == 1


# -- regrowth ---------------------------------------------------------------------------------

def regression(seed=0, w6=8.0):
    """A linear model whose 7th weight starts tiny but matters most (true value ``w6``): magnitude
    prunes it first, and its dense gradient stays large, so a method that can regrow brings it back."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, w6, 0.45])
    x = torch.randn(64, 8, generator=g)
    data = [(x[i:i + 16], x[i:i + 16] @ w_true[:, None]) for i in range(0, 64, 16)]
    model = sparsify(nn.Sequential(nn.Linear(8, 1, bias=False)))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.05, 0.4]]))
    return model, data


@pytest.mark.parametrize("recover", [False, True], ids=["no-recovery", "recover"])
def test_gmp_recovery_regrows(recover):
    model, data = regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    extra = {"loss_fn": F.mse_loss, "data": data} if recover else {}
    pruner = GMP(model, opt, 0.5, 0, 8, 2, initial=0.25, recover=recover, **extra)
    assert not model[0].mask[0, 6] and kept(model) == 6      # t=0: 25%, the two smallest |w|
    counts = run(model, opt, pruner, 10, data=data, loss_fn=F.mse_loss)
    # s_t = 0.5 - 0.25 (1 - t/8)^3 at t = 2, 4, 6, 8: 0.3945, 0.46875, 0.4961, 0.5 -> 3, 4, 4, 4 of 8 pruned
    assert counts == [6, 5, 5, 4, 4, 4, 4, 4, 4, 4]
    assert bool(model[0].mask[0, 6]) is recover               # back only with recovery


def test_cyclical_regrows_at_cycle_start():
    # The 7th input is useless during the first cycle and matters most in the second: a weight
    # pruned "in error" for the later data. Cycle 2 starts dense (initial=0), so it can come back.
    model, data = regression(w6=0.0)
    _, later = regression(w6=8.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = Cyclical(model, opt, 0.5, cycles=2, total_steps=12, frequency=3)
    ends = {}
    for t in range(12):
        run(model, opt, pruner, 1, data=data if t < 6 else later, loss_fn=F.mse_loss, start=t)
        if t + 1 in (5, 11):                         # the last steps of the two cycles
            ends[t + 1] = model[0].mask[0].clone()
    assert ends[5].sum() == ends[11].sum() == 4
    assert not ends[5][6] and ends[11][6]            # pruned in cycle 1, kept at the end of cycle 2


def test_cyclical_regrowth_above_zero_uses_gradient():
    model, data = regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = Cyclical(model, opt, 0.5, cycles=2, total_steps=12, ramp="linear", initial=0.25,
                      loss_fn=F.mse_loss, data=data)
    assert not model[0].mask[0, 6] and kept(model) == 6       # t=0: nothing pruned yet, so 25% by |w|
    for t in range(12):
        run(model, opt, pruner, 1, data=data, loss_fn=F.mse_loss, start=t)
        if t + 1 == 6:                                         # cycle 2 starts: 6 kept, chosen over all weights
            assert model[0].mask[0, 6] and kept(model) == 6
    assert model[0].mask[0, 6] and kept(model) == 4


# -- seeds and checkpoints --------------------------------------------------------------------

def seeded_run(seed, make, steps=8, epoch_len=None):
    torch.manual_seed(seed)
    model = mlp()
    opt = sgd(model)
    pruner = make(model, opt)
    run(model, opt, pruner, steps, epoch_len=epoch_len)
    return masks(model)


def test_same_seed_same_masks():
    make = lambda m, o: OneShot(m, o, 0.6, at=2, score="random")  # noqa: E731
    a, b, c = seeded_run(0, make), seeded_run(0, make), seeded_run(1, make)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    make = lambda m, o: GMP(m, o, 0.8, 1, 7, 2)  # noqa: E731
    a, b = seeded_run(3, make), seeded_run(3, make)
    assert all(torch.equal(a[n], b[n]) for n in a)


RESUMABLE = {
    "oneshot-random": (lambda m, o: OneShot(m, o, 0.6, at=7, score="random"), None),
    "imp-random-llr": (lambda m, o: IMP(m, o, 0.9, 3, 1, lr_schedule="llr", steps_per_epoch=3,
                                        lr_options={"max_lr": 0.1}, score="random"), 3),
    "imp-allr-rewind": (lambda m, o: IMP(m, o, 0.8, 2, 2, lr_schedule="allr", steps_per_epoch=3,
                                         lr_options={"max_lr": 0.1, "original_steps": 100},
                                         rewind={k: v * 0.5 for k, v in m.state_dict().items()}), 3),
    "gmp-recover": METHODS["gmp-recover"][0:1] + (None,),
    "fggp": METHODS["fggp"][0:1] + (None,),
    "cyclical-initial": METHODS["cyclical-initial"][0:1] + (None,),
}


@pytest.mark.parametrize("pruner_first", [True, False], ids=["pruner-loaded-first", "pruner-loaded-last"])
@pytest.mark.parametrize("method", list(RESUMABLE))
def test_checkpoint_resume_reproduces_masks(method, pruner_first):
    make, epoch_len = RESUMABLE[method]
    steps, cut = 12, 5

    def fresh():
        torch.manual_seed(0)
        model = mlp()
        opt = sgd(model)
        return model, opt, make(model, opt)

    def trace(model, opt, pruner, start, n):
        out = []
        for t in range(start, start + n):
            run(model, opt, pruner, 1, epoch_len=epoch_len, start=t)
            out.append((masks(model), opt.param_groups[0]["lr"]))
        return out

    model, opt, pruner = fresh()
    full = trace(model, opt, pruner, 0, steps)
    final = copy.deepcopy(model.state_dict())

    model, opt, pruner = fresh()
    trace(model, opt, pruner, 0, cut)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "pruner": pruner.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    torch.manual_seed(123)                                  # a different fresh start: the loads decide
    model = mlp()
    opt = sgd(model)
    pruner = make(model, opt)
    if pruner_first:
        pruner.load_state_dict(ckpt["pruner"])
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    if not pruner_first:
        pruner.load_state_dict(ckpt["pruner"])
    resumed = trace(model, opt, pruner, cut, steps - cut)
    for (m_full, lr_full), (m_res, lr_res) in zip(full[cut:], resumed):
        assert all(torch.equal(m_full[n], m_res[n]) for n in m_full)
        assert lr_full == lr_res
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())
    assert kept(model) < N_WEIGHTS


def test_load_state_dict_checks_method_and_config():
    model = mlp()
    opt = sgd(model)
    state = GMP(model, opt, 0.8, 1, 7, 2).state_dict()
    other = mlp()
    with pytest.raises(ValueError, match="end_step: saved 7, here 9"):
        GMP(other, sgd(other), 0.8, 1, 9, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="saved by a GMP pruner, cannot load into FGGP"):
        FGGP(other, sgd(other), 0.8, 1, 7, 2, rate=2).load_state_dict(state)


# -- IMP learning rates and rewinding -----------------------------------------------------------

def test_imp_lr_schedule_restarts_each_phase():
    model = mlp()
    opt = sgd(model)
    pruner = IMP(model, opt, 0.75, phases=2, epochs_per_phase=2, lr_schedule="clr", steps_per_epoch=5,
                 lr_options={"max_lr": 0.2, "min_lr": 0.01})
    reference = retrain_lr_schedule("clr", torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 10,
                                    max_lr=0.2, min_lr=0.01)
    lrs = []
    for t in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        run(model, opt, pruner, 1, epoch_len=5, start=t)
    expected = [reference.lr_at(i) for i in range(10)]
    assert lrs == pytest.approx(expected * 2)
    assert expected[0] < expected[1] == 0.2 and expected[1] > expected[9]  # warm-up, then the cosine decay


def test_imp_warns_when_an_epoch_has_other_than_steps_per_epoch_steps():
    model = mlp()
    opt = sgd(model)
    pruner = IMP(model, opt, 0.5, 1, 2, lr_schedule="llr", steps_per_epoch=3, lr_options={"max_lr": 0.1})
    run(model, opt, pruner, 2)
    with pytest.warns(UserWarning, match="epoch 1 took 2 steps, not steps_per_epoch=3"):
        pruner.on_epoch_end()


def test_imp_allr_gets_norm_drop():
    model = mlp()
    before = copy.deepcopy(model)
    pruner = IMP(model, sgd(model), 0.5, 1, 1, lr_schedule="allr", steps_per_epoch=2,
                 lr_options={"max_lr": 0.1, "original_steps": 10})
    assert isinstance(pruner.lr_scheduler, ALLRSchedule)
    assert pruner.norm_drop == pytest.approx(relative_norm_drop(before, model))
    assert pruner.lr_scheduler.norm_drop == pruner.norm_drop and pruner.pruned_fraction == pytest.approx(0.5)


def test_imp_rewind():
    model = mlp()
    early = {k: v.clone() for k, v in model.state_dict().items()}
    opt = sgd(model)
    pruner = IMP(model, opt, 0.75, 2, 1, rewind=early)
    run(model, opt, pruner, 2, epoch_len=2)              # phase 1 starts after the first epoch
    assert pruner.phase == 1 and not opt.state
    for name, m in sparse_modules(model):
        assert torch.equal(m.weight.detach(), early[f"{name}.weight"] * m.mask)


# -- BatchNorm recalibration --------------------------------------------------------------------

def test_recalibrate_bn_cumulative_average():
    model = cnn().eval()
    bn = model[1]
    bn.momentum = 0.3
    data = [torch.randn(5, 2, 4, 4) for _ in range(3)]
    assert recalibrate_bn(model, data, batches=2) == 2
    feats = [model[0](x) for x in data[:2]]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean.detach())
    torch.testing.assert_close(bn.running_var, var.detach())
    assert not model.training and not bn.training and bn.momentum == 0.3 and int(bn.num_batches_tracked) == 2
    assert recalibrate_bn(mlp(), data) == 0             # no BatchNorm: nothing runs


def test_pruner_recalibrates_bn_after_prune():
    model = cnn()
    data = [(torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
    expected = copy.deepcopy(model)
    prune_(expected, 0.5)
    recalibrate_bn(expected, data)
    OneShot(model, sgd(model), 0.5, bn_data=data)
    torch.testing.assert_close(model[1].running_mean, expected[1].running_mean)
    torch.testing.assert_close(model[1].running_var, expected[1].running_var)


# -- call order and errors ----------------------------------------------------------------------

def test_fggp_needs_this_steps_gradient():
    model = mlp()
    opt = sgd(model)
    pruner = FGGP(model, opt, 0.5, 1, 3, 2, rate=2.0, initial=0.2)   # prunes at t = 1
    x, y = DATA[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)                      # wrong order: the gradient is gone
    with pytest.raises(ValueError, match=r"loss_fn and data \(or \.grad"):
        pruner.step()


@pytest.mark.parametrize("make, match", [
    (lambda m, o: OneShot(m, o, 1.0), r"sparsity: expected a target sparsity in \[0, 1\)"),
    (lambda m, o: GMP(m, o, 1.0, 0, 4, 2), r"sparsity: expected a target sparsity in \[0, 1\)"),
    (lambda m, o: IMP(m, o, 1.2, 3, 1), r"sparsity: expected a target sparsity in \[0, 1\)"),
    (lambda m, o: Cyclical(m, o, 1.0, 2, 10), r"sparsity: expected a target sparsity in \[0, 1\)"),
    (lambda m, o: IMP(m, o, 0.9, 0, 1), r"phases: expected an int >= 1, got 0"),
    (lambda m, o: IMP(m, o, 0.9, 3, 1, budget_epochs=3), "give exactly one"),
    (lambda m, o: IMP(m, o, 0.9, 3, budget_epochs=2), "budget_epochs: expected an int >= 3"),
    (lambda m, o: IMP(m, o, 0.9, 3, 1, lr_schedule="llr"), "steps_per_epoch"),
    (lambda m, o: IMP(m, o, 0.9, 3, 1, lr_schedule="cosine", steps_per_epoch=2), "lr_schedule: expected"),
    (lambda m, o: GMP(m, o, 0.9, 0, 100, 10, total_steps=50), r"ends at step 100, after training ends"),
    (lambda m, o: FGGP(m, o, 0.9, 0, 100, 10, rate=2, total_steps=50), r"after training ends"),
    (lambda m, o: OneShot(m, o, 0.9, at=60, total_steps=50), r"after training ends"),
    (lambda m, o: GMP(m, o, 0.9, 0, 10, 3), r"frequency=3: end_step - start_step = 10 must be a multiple"),
    (lambda m, o: GMP(m, o, 0.9, 5, 5, 1), r"end_step: expected an int > start_step=5"),
    (lambda m, o: GMP(m, o, 0.5, 0, 10, 2, initial=0.6), r"initial=0.6: expected at most sparsity=0.5"),
    (lambda m, o: GMP(m, o, 0.9, 0, 10, 2, recover=True), "loss_fn and data are needed"),
    (lambda m, o: GMP(m, o, 0.9, 0, 10, 2, data=DATA), "only read when pruned weights can regrow"),
    (lambda m, o: GMP(m, o, 0.9, 0, 10, 2, score="random"), r"unexpected argument\(s\) \['score'\]"),
    (lambda m, o: FGGP(m, o, 0.9, 0, 10, 2, rate=0.5), "rate: expected a finite number >= 1"),
    (lambda m, o: Cyclical(m, o, 0.9, 20, 10), "cycles: expected at most total_steps=10"),
    (lambda m, o: Cyclical(m, o, 0.9, 2, 10, initial=0.2), "loss_fn and data are needed"),
    (lambda m, o: Cyclical(m, o, 0.9, 2, 10, ramp="cosine"), "ramp: expected one of"),
    (lambda m, o: OneShot(m, o, 0.5, exclude="*"), "every sparse layer is excluded"),
], ids=["oneshot-1.0", "gmp-1.0", "imp-1.2", "cyclical-1.0", "imp-zero-phases", "imp-epochs-and-budget",
        "imp-budget-below-phases", "imp-lr-no-steps", "imp-lr-unknown", "gmp-ends-late", "fggp-ends-late",
        "oneshot-late", "gmp-frequency", "gmp-empty", "gmp-initial-above", "gmp-recover-no-data",
        "gmp-data-unused", "gmp-score", "fggp-rate", "cyclical-cycles", "cyclical-regrow-no-data",
        "cyclical-ramp", "exclude-all"])
def test_bad_config(make, match):
    model = mlp()
    with pytest.raises((ValueError, TypeError), match=match):
        make(model, sgd(model))


def test_below_current_sparsity():
    model = mlp()
    prune_(model, 0.6)
    opt = sgd(model)
    with pytest.raises(ValueError, match=r"sparsity=0.5 is not above the model's current sparsity 0.6.*IMP only"):
        IMP(model, opt, 0.5, 2, 1)
    with pytest.raises(ValueError, match=r"sparsity=0.6 is not above"):
        IMP(model, opt, 0.6, 2, 1)
    with pytest.raises(ValueError, match=r"sparsity=0.5 is below the model's current sparsity 0.6"):
        OneShot(model, opt, 0.5)
    with pytest.raises(ValueError, match=r"initial=0.2 is below the model's current sparsity 0.6"):
        GMP(model, opt, 0.9, 0, 4, 2, initial=0.2)
    assert GMP(model, opt, 0.9, 0, 4, 2).initial == 154 / 256   # default: start from it (round(0.6 * 256) pruned)


def test_no_sparse_layers_and_bad_types():
    dense = nn.Sequential(nn.Linear(4, 4))
    opt = sgd(dense)
    for make in (lambda: OneShot(dense, opt, 0.5), lambda: IMP(dense, opt, 0.5, 2, 1),
                 lambda: GMP(dense, opt, 0.5, 0, 2, 1), lambda: FGGP(dense, opt, 0.5, 0, 2, 1, rate=2),
                 lambda: Cyclical(dense, opt, 0.5, 1, 4)):
        with pytest.raises(ValueError, match=r"has none \(call sparse_engine.sparsify\(model\) first\)"):
            make()
    model = mlp()
    with pytest.raises(TypeError, match="optimizer: expected a torch.optim.Optimizer"):
        OneShot(model, None, 0.5)
    with pytest.raises(ValueError, match="bn_batches: given without bn_data"):
        OneShot(model, sgd(model), 0.5, bn_batches=2)
