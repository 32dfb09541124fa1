"""Retraining LR schedules (Zimmer et al., 2023): hand-computed values at start, middle and end,
warm-up length, resuming from a state_dict, and argument checks."""
import io
import math

import pytest
import torch
from torch import nn

from sparse_engine.pruning.methods.lr_schedules import (ALLRSchedule, CLRSchedule, FTSchedule, LLRSchedule, LRWSchedule,
                                                RETRAIN_SCHEDULES, SLRSchedule, allr_initial_lr, relative_norm_drop,
                                                retrain_lr_schedule)

# Original training: 100 iterations, linear warm-up over 10 to 0.1, then steps to 0.01 and 0.001.
ORIGINAL = [0.1 * (i + 1) / 10 for i in range(10)] + [0.1] * 40 + [0.01] * 25 + [0.001] * 25


def _optimizer(lr=1.0, groups=1):
    params = [nn.Parameter(torch.randn(3)) for _ in range(groups)]
    return torch.optim.SGD([{"params": [p]} for p in params], lr=lr, momentum=0.9)


def _run(sched, steps):
    """The learning rate used by each of ``steps`` iterations of a normal loop."""
    opt, out = sched.optimizer, []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        for g in opt.param_groups:
            assert g["lr"] == out[-1]
            g["params"][0].grad = torch.ones_like(g["params"][0])
        opt.step()
        sched.step()
    return out


def test_llr_values():
    # T = 20, W = 2, D = 18: warm-up 0.1/3, 0.2/3; then 0.1 (1 - k/18)
    lrs = _run(LLRSchedule(_optimizer(), 20, max_lr=0.1), 21)
    assert lrs[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1], abs=1e-15)
    assert lrs[11] == pytest.approx(0.05, abs=1e-15)           # k = 9: half way
    assert lrs[19] == pytest.approx(0.1 / 18, abs=1e-15)        # last iteration, k = 17
    assert lrs[20] == 0.0                                       # after the budget: 0


def test_clr_values():
    lrs = _run(CLRSchedule(_optimizer(), 20, max_lr=0.1, min_lr=0.001), 21)
    assert lrs[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1], abs=1e-15)
    assert lrs[11] == pytest.approx(0.0505, abs=1e-15)          # k = 9: cos(pi/2) = 0, halfway to min
    assert lrs[19] == pytest.approx(0.001 + 0.099 * (1 + math.cos(math.pi * 17 / 18)) / 2, abs=1e-15)
    assert lrs[19] == pytest.approx(0.001752, abs=1e-6)
    assert lrs[20] == pytest.approx(0.001, abs=1e-15)


def test_ft_values():
    lrs = _run(FTSchedule(_optimizer(), 10, last_lr=0.001), 11)
    assert lrs == [0.001] * 11                                  # no warm-up, constant


def test_lrw_values():
    # T = 30: replay original iterations 70..99: 0.01 for 70..74, then 0.001
    lrs = _run(LRWSchedule(_optimizer(), 30, ORIGINAL), 31)
    assert lrs[0] == 0.01 and lrs[4] == 0.01 and lrs[5] == 0.001
    assert lrs[15] == 0.001 and lrs[29] == 0.001 and lrs[30] == 0.001
    # replay the last 40 instead: 60..99, of which the first 30 are used
    lrs = _run(LRWSchedule(_optimizer(), 30, ORIGINAL, replay_steps=40), 30)
    assert lrs[0] == 0.01 and lrs[14] == 0.01 and lrs[15] == 0.001 and lrs[29] == 0.001


def test_slr_values():
    # T = 20, W = 2, D = 18: k -> original index floor(100 k / 18); original warm-up replaced by 0.1
    lrs = _run(SLRSchedule(_optimizer(), 20, ORIGINAL), 21)
    assert lrs[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1], abs=1e-15)   # k=0 -> index 0 (warm-up) -> 0.1
    assert lrs[10] == 0.1          # k = 8 -> index 44
    assert lrs[11] == 0.01         # k = 9 -> index 50: the middle
    assert lrs[15] == 0.01         # k = 13 -> index 72
    assert lrs[16] == 0.001        # k = 14 -> index 77
    assert lrs[19] == 0.001 and lrs[20] == 0.001
    # a different max_lr scales the whole compressed schedule
    lrs = _run(SLRSchedule(_optimizer(), 20, ORIGINAL, max_lr=0.2), 21)
    assert lrs[2] == 0.2 and lrs[11] == pytest.approx(0.02, abs=1e-15) and lrs[20] == pytest.approx(0.002, abs=1e-15)


def test_allr_initial_lr():
    # d / sqrt(s) = 0.3 / sqrt(0.9) = 0.3162278 beats the budget floor 20/100 = 0.2
    assert allr_initial_lr(0.1, 0.3, 0.9, 20, 100) == pytest.approx(0.1 * 0.3 / math.sqrt(0.9), abs=1e-15)
    assert allr_initial_lr(0.1, 0.3, 0.9, 20, 100) == pytest.approx(0.03162278, abs=1e-8)
    assert allr_initial_lr(0.1, 0.3, 0.9, 50, 100) == pytest.approx(0.05, abs=1e-15)   # floor 0.5 wins
    assert allr_initial_lr(0.1, 1.0, 0.25, 20, 100) == pytest.approx(0.1, abs=1e-15)   # d/sqrt(s) = 2 -> 1
    assert allr_initial_lr(0.1, 0.0, 0.5, 300, 100) == pytest.approx(0.1, abs=1e-15)   # floor min(3, 1)


def test_allr_values():
    start = 0.1 * 0.3 / math.sqrt(0.9)
    lrs = _run(ALLRSchedule(_optimizer(), 20, max_lr=0.1, norm_drop=0.3, pruned_fraction=0.9,
                            original_steps=100), 21)
    assert lrs[:3] == pytest.approx([start / 3, 2 * start / 3, start], abs=1e-15)
    assert lrs[11] == pytest.approx(start / 2, abs=1e-15)
    assert lrs[19] == pytest.approx(start / 18, abs=1e-15)
    assert lrs[20] == 0.0


def test_factory_derives_from_original_schedule():
    f = lambda name, **kw: retrain_lr_schedule(name, _optimizer(), 20, original_schedule=ORIGINAL, **kw)
    assert f("ft").last_lr == 0.001                               # last LR of the original
    assert f("llr").start_lr == 0.1                               # its maximum
    clr = f("clr")
    assert (clr.max_lr, clr.min_lr) == (0.1, 0.001)               # min from the peak on
    assert _run(f("slr"), 21) == _run(SLRSchedule(_optimizer(), 20, ORIGINAL), 21)
    assert _run(f("lrw"), 21) == _run(LRWSchedule(_optimizer(), 20, ORIGINAL), 21)
    allr = f("allr", norm_drop=0.3, pruned_fraction=0.9)           # original_steps = len(ORIGINAL)
    assert allr.start_lr == pytest.approx(allr_initial_lr(0.1, 0.3, 0.9, 20, 100), abs=1e-15)
    # a callable with its length works as well
    g = retrain_lr_schedule("ft", _optimizer(), 20, original_schedule=lambda i: ORIGINAL[i], original_steps=100)
    assert g.last_lr == 0.001
    # without an original schedule CLR ends at 0 unless min_lr is given
    assert retrain_lr_schedule("clr", _optimizer(), 20, max_lr=0.1).min_lr == 0.0


@pytest.mark.parametrize("total", [20, 25, 9, 100])
def test_warmup_length(total):
    kw = dict(max_lr=0.1, original_schedule=ORIGINAL, norm_drop=0.3, pruned_fraction=0.9)
    for name in RETRAIN_SCHEDULES:
        sched = retrain_lr_schedule(name, _optimizer(), total, **kw)
        lrs = _run(sched, total)
        start = sched.lr_at(sched.warmup_steps)
        expected = int(0.1 * total) if name in ("slr", "clr", "llr", "allr") else 0
        assert sched.warmup_steps == expected, name
        # strictly increasing below the start value during the warm-up, at the start value right after
        assert all(a < b for a, b in zip(lrs[:expected], lrs[1:expected + 1])), name
        assert all(v < start for v in lrs[:expected]) and lrs[expected] == start, name
    sched = retrain_lr_schedule("llr", _optimizer(), 20, max_lr=0.1, warmup=0.25)
    assert sched.warmup_steps == 5 and _run(sched, 6)[4:] == pytest.approx([0.1 * 5 / 6, 0.1], abs=1e-15)


@pytest.mark.parametrize("name", RETRAIN_SCHEDULES)
def test_resume_from_state_dict(name):
    kw = dict(original_schedule=ORIGINAL, norm_drop=0.3, pruned_fraction=0.9)
    full = _run(retrain_lr_schedule(name, _optimizer(), 20, **kw), 20)

    opt = _optimizer()
    sched = retrain_lr_schedule(name, opt, 20, **kw)
    first = _run(sched, 7)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)                   # numbers only: loads without pickle code

    opt2 = _optimizer()
    sched2 = retrain_lr_schedule(name, opt2, 20, **kw)          # scheduler first, then the optimizer state
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert first + _run(sched2, 13) == full


def test_every_param_group_gets_the_schedule():
    sched = LLRSchedule(_optimizer(groups=3), 20, max_lr=0.1)
    _run(sched, 5)                      # _run asserts every group's lr equals the first's
    assert sched.get_last_lr() == [sched.lr_at(5)] * 3


def test_relative_norm_drop():
    w = torch.tensor([3.0, 4.0])
    assert relative_norm_drop(w, torch.tensor([0.0, 4.0])) == pytest.approx(0.6, abs=1e-15)
    model = nn.Linear(4, 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.weight[0].zero_()
    removed = before["weight"][0].double().pow(2).sum()
    total = sum(t.double().pow(2).sum() for t in before.values())
    assert relative_norm_drop(before, model) == pytest.approx(math.sqrt(removed / total), rel=1e-12)
    assert relative_norm_drop(list(before.values()), list(model.parameters())) == relative_norm_drop(before, model)
    with pytest.raises(ValueError, match="^after"):
        relative_norm_drop({"a": w}, {"b": w})
    with pytest.raises(ValueError, match="^after"):
        relative_norm_drop(w, torch.zeros(3))
    with pytest.raises(ValueError, match="^before"):
        relative_norm_drop(torch.zeros(2), torch.zeros(2))


def test_bad_arguments():
    opt = _optimizer()
    with pytest.raises(ValueError, match="^name"):
        retrain_lr_schedule("cosine", opt, 20, max_lr=0.1)
    with pytest.raises(ValueError, match="^total_steps"):
        LLRSchedule(opt, 0, max_lr=0.1)
    with pytest.raises(ValueError, match="^warmup"):
        LLRSchedule(opt, 20, max_lr=0.1, warmup=1.0)
    with pytest.raises(ValueError, match="^max_lr"):
        LLRSchedule(opt, 20, max_lr=0.0)
    with pytest.raises(ValueError, match="^max_lr"):
        retrain_lr_schedule("llr", opt, 20)
    with pytest.raises(ValueError, match="^min_lr"):
        CLRSchedule(opt, 20, max_lr=0.1, min_lr=0.2)
    with pytest.raises(ValueError, match="^last_lr"):
        retrain_lr_schedule("ft", opt, 20)
    with pytest.raises(ValueError, match="^original_schedule"):
        retrain_lr_schedule("lrw", opt, 20)
    with pytest.raises(ValueError, match="^original_schedule"):
        retrain_lr_schedule("slr", opt, 20, original_schedule=[0.1, -0.1])
    with pytest.raises(ValueError, match="^original_steps"):
        retrain_lr_schedule("slr", opt, 20, original_schedule=lambda i: 0.1)
    with pytest.raises(ValueError, match="^replay_steps"):
        LRWSchedule(opt, 20, ORIGINAL, replay_steps=101)
    with pytest.raises(ValueError, match="^norm_drop"):
        retrain_lr_schedule("allr", opt, 20, max_lr=0.1, pruned_fraction=0.5, original_steps=100)
    with pytest.raises(ValueError, match="^pruned_fraction"):
        retrain_lr_schedule("allr", opt, 20, max_lr=0.1, norm_drop=0.3, original_steps=100)
    with pytest.raises(ValueError, match="^pruned_fraction"):
        ALLRSchedule(opt, 20, 0.1, 0.3, 0.0, 100)
    with pytest.raises(ValueError, match="^original_steps"):
        retrain_lr_schedule("allr", opt, 20, max_lr=0.1, norm_drop=0.3, pruned_fraction=0.5)
    with pytest.raises(ValueError, match="^norm_drop"):
        ALLRSchedule(opt, 20, 0.1, -0.1, 0.5, 100)
