"""Sparsity schedules against hand-computed values, torch.ao's CubicSL, and their argument checks."""
import math
import warnings

import pytest
from torch import nn

from sparse_engine.pruning.methods.schedules import (cubic_sparsity, cycle_index, cycle_start, cyclical_sparsity,
                                             imp_phase_rate, imp_phase_sparsities, one_shot_sparsity)


# --- one-shot --------------------------------------------------------------------------------

def test_one_shot():
    assert [one_shot_sparsity(t, 0.9, at=3) for t in range(6)] == [0.0, 0.0, 0.0, 0.9, 0.9, 0.9]
    assert one_shot_sparsity(0, 0.5) == 0.5
    assert one_shot_sparsity(10, 0.5, at=10, total_steps=10) == 0.5   # pruning at the very end is allowed


def test_one_shot_errors():
    with pytest.raises(ValueError, match="target"):
        one_shot_sparsity(0, 1.0)
    with pytest.raises(ValueError, match="at"):
        one_shot_sparsity(0, 0.5, at=-1)
    with pytest.raises(ValueError, match="after training ends.*total_steps=10"):
        one_shot_sparsity(0, 0.5, at=11, total_steps=10)
    with pytest.raises(ValueError, match="step"):
        one_shot_sparsity(-1, 0.5)


# --- IMP ---------------------------------------------------------------------------------------

def test_imp_phases():
    # p = 1 - 0.1^(1/3) = 0.5358411; cumulative 1 - 0.1^(i/3): 0.5358411, 0.7845565, 0.9
    assert imp_phase_rate(0.9, 3) == pytest.approx(0.5358411166, abs=1e-9)
    s = imp_phase_sparsities(0.9, 3)
    assert s[:2] == pytest.approx([0.5358411166, 0.7845565309], abs=1e-9)
    assert s[2] == 0.9                                           # exactly the target
    assert imp_phase_sparsities(0.8, 1) == [0.8]
    # from 50% sparse to 90% in two phases: remaining density 0.5 -> 0.1, p = 1 - sqrt(0.2)
    s = imp_phase_sparsities(0.9, 2, current=0.5)
    assert s[0] == pytest.approx(1 - 0.5 * math.sqrt(0.2), abs=1e-12) and s[1] == 0.9
    assert imp_phase_rate(0.9, 2, current=0.5) == pytest.approx(1 - math.sqrt(0.2), abs=1e-12)


def test_imp_explicit_rates_and_sparsities():
    assert imp_phase_sparsities(None, rates=[0.5, 0.5, 0.2]) == pytest.approx([0.5, 0.75, 0.8], abs=1e-12)
    s = imp_phase_sparsities(0.8, rates=[0.5, 0.5, 0.2])
    assert s[-1] == 0.8
    assert imp_phase_sparsities(0.9, sparsities=[0.5, 0.8, 0.9]) == [0.5, 0.8, 0.9]
    assert imp_phase_sparsities(None, rates=[0.5], current=0.5) == [0.75]


def test_imp_errors():
    with pytest.raises(ValueError, match="phases"):
        imp_phase_sparsities(0.9, 0)
    with pytest.raises(ValueError, match="target"):
        imp_phase_sparsities(1.0, 3)
    with pytest.raises(ValueError, match="target.*current sparsity 0.5"):
        imp_phase_sparsities(0.4, 2, current=0.5)
    with pytest.raises(ValueError, match="rates"):
        imp_phase_sparsities(0.9, rates=[0.5, 0.5])            # reaches 0.75, not 0.9
    with pytest.raises(ValueError, match=r"rates\[1\]"):
        imp_phase_sparsities(None, rates=[0.5, 1.0])
    with pytest.raises(ValueError, match=r"sparsities\[1\].*increasing"):
        imp_phase_sparsities(None, sparsities=[0.5, 0.4])
    with pytest.raises(ValueError, match=r"sparsities\[1\]"):
        imp_phase_sparsities(None, sparsities=[0.5, 1.0])
    with pytest.raises(ValueError, match="exactly one of phases, rates, sparsities"):
        imp_phase_sparsities(0.9, 3, rates=[0.5])
    with pytest.raises(ValueError, match="target"):
        imp_phase_sparsities(None, 3)


# --- cubic (Zhu & Gupta) vs torch.ao CubicSL ---------------------------------------------------

def test_cubic_reproduces_torch_ao_cubicsl_test():
    """torch's own CubicSL test (test/ao/sparsity/test_scheduler.py, TestCubicScheduler.test_step)
    runs init_sl=0.1, init_t=3, delta_t=2, total_t=5, initially_zero=True on two groups whose final
    sparsities are 0.8 and 0.4, and checks, after rounding to one decimal:
      - scheduler steps 1, 2 (t < t0 = 3): [0, 0];
      - step 3 (t = t0): [0.1, 0.1], the initial sparsity;
      - step 4: [0.3, 0.2]. These are the two groups at the same step t = 4, not two steps:
        (t - t0) / (n dt) = 1/10, so s = s_f - (s_f - 0.1) * 0.9^3 = s_f - 0.729 (s_f - 0.1),
        i.e. 0.8 - 0.5103 = 0.2897 -> 0.3 and 0.4 - 0.2187 = 0.1813 -> 0.2;
      - step t0 + n dt = 13: exactly [0.8, 0.4].
    t is the scheduler's step count itself (CubicSL does not round t down to a multiple of dt)."""
    s = lambda t, final: cubic_sparsity(t, 0.1, final, t0=3, dt=2, n=5, initially_zero=True)
    assert [s(t, 0.8) for t in (1, 2)] == [0.0, 0.0]
    assert s(3, 0.8) == 0.1 and s(3, 0.4) == 0.1
    assert s(4, 0.8) == pytest.approx(0.2897, abs=1e-12) and s(4, 0.4) == pytest.approx(0.1813, abs=1e-12)
    assert [round(s(4, 0.8), 1), round(s(4, 0.4), 1)] == [0.3, 0.2]
    assert s(13, 0.8) == 0.8 and s(13, 0.4) == 0.4 and s(12, 0.8) < 0.8

    # The same run through torch.ao's scheduler and sparsifier, compared at every step.
    from torch.ao.pruning import WeightNormSparsifier
    from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL
    model = nn.Sequential(nn.Linear(13, 17), nn.Dropout(0.5), nn.Linear(17, 3))
    sparsifier = WeightNormSparsifier()
    sparsifier.prepare(model, config=[{"tensor_fqn": "0.weight", "sparsity_level": 0.8},
                                      {"tensor_fqn": "2.weight", "sparsity_level": 0.4}])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # "scheduler.step() before sparsifier.step()"
        scheduler = CubicSL(sparsifier, init_sl=0.1, init_t=3, delta_t=2, total_t=5, initially_zero=True)
        for t in range(1, 16):
            scheduler.step()
            assert scheduler.last_epoch == t
            assert [g["sparsity_level"] for g in sparsifier.groups] == [s(t, 0.8), s(t, 0.4)]


@pytest.mark.parametrize("initially_zero", [False, True], ids=["initial-before-t0", "zero-before-t0"])
@pytest.mark.parametrize("initial,final,t0,dt,n", [(0.1, 0.8, 3, 2, 5), (0.0, 0.9, 0, 1, 7), (0.5, 0.95, 10, 7, 3)])
def test_cubic_equals_torch_sparsity_compute_fn(initial, final, t0, dt, n, initially_zero):
    from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL
    for t in range(0, t0 + n * dt + 5):
        ref = CubicSL.sparsity_compute_fn(s_0=initial, s_f=final, t=t, t_0=t0, dt=dt, n=n,
                                          initially_zero=initially_zero)
        assert cubic_sparsity(t, initial, final, t0, dt, n, initially_zero=initially_zero) == ref, t


def test_cubic_hand_values_and_stepwise():
    # initial 0, final 0.9, t0 0, dt 10, n 4 (40 steps): at t = 20, (1 - 1/2)^3 = 1/8 -> 0.9 * 7/8
    c = lambda t, **kw: cubic_sparsity(t, 0.0, 0.9, 0, 10, 4, **kw)
    assert c(0) == 0.0 and c(20) == pytest.approx(0.7875, abs=1e-12) and c(40) == 0.9 and c(99) == 0.9
    assert c(25) == pytest.approx(0.9 * (1 - 0.375 ** 3), abs=1e-12)
    # stepwise holds the value of the last pruning step t0 + k dt
    assert c(25, stepwise=True) == c(20) and c(29, stepwise=True) == c(20) and c(30, stepwise=True) == c(30)
    # with t0 3, dt 2: t = 4 holds t0's value, t = 5 is (1 - 2/10)^3 = 0.512 of the way back
    assert cubic_sparsity(4, 0.1, 0.8, 3, 2, 5, stepwise=True) == 0.1
    assert cubic_sparsity(5, 0.1, 0.8, 3, 2, 5, stepwise=True) == pytest.approx(0.8 - 0.7 * 0.512, abs=1e-12)
    # FGGP from a 50%-sparse network: 0.5 until t0, then towards 0.9
    assert cubic_sparsity(0, 0.5, 0.9, 5, 5, 4) == 0.5
    assert cubic_sparsity(15, 0.5, 0.9, 5, 5, 4) == pytest.approx(0.9 - 0.4 * 0.5 ** 3, abs=1e-12)


def test_cubic_errors():
    args = dict(initial=0.1, final=0.8, t0=3, dt=2, n=5)
    for name, bad in [("n", 0), ("dt", 0), ("t0", -1), ("final", 1.0), ("initial", -0.1)]:
        with pytest.raises(ValueError, match=f"^{name}"):
            cubic_sparsity(4, **{**args, name: bad})
    with pytest.raises(ValueError, match="^initial.*<= final"):
        cubic_sparsity(4, **{**args, "initial": 0.9})
    with pytest.raises(TypeError, match="^dt"):
        cubic_sparsity(4, **{**args, "dt": 2.5})
    with pytest.raises(ValueError, match="ends at step 13, after training ends"):
        cubic_sparsity(4, **args, total_steps=12)
    assert cubic_sparsity(13, **args, total_steps=13) == 0.8


# --- cyclical (Srinivas et al.) --------------------------------------------------------------

def test_cycle_boundaries():
    # T = 10, C = 3: cycles [0, 3), [3, 6), [6, 10)
    assert [cycle_index(t, 3, 10) for t in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    assert [t for t in range(15) if cycle_start(t, 3, 10)] == [0, 3, 6]
    assert [t for t in range(100) if cycle_start(t, 7, 100)] == [(c * 100) // 7 for c in range(7)]
    assert [t for t in range(5) if cycle_start(t, 1, 5)] == [0]


def test_cyclical_values():
    cubic = [cyclical_sparsity(t, 0.8, 3, 10) for t in range(11)]
    # 3-step cycles: u = 0, 1/2, 1 -> 0, 0.8 (1 - 1/8) = 0.7, 0.8; 4-step cycle: u = 0, 1/3, 2/3, 1
    expected = [0.0, 0.7, 0.8, 0.0, 0.7, 0.8, 0.0, 0.8 * (1 - 8 / 27), 0.8 * (1 - 1 / 27), 0.8, 0.8]
    assert cubic == pytest.approx(expected, abs=1e-12)
    linear = [cyclical_sparsity(t, 0.8, 3, 10, ramp="linear", initial=0.2) for t in range(10)]
    assert linear == pytest.approx([0.2, 0.5, 0.8, 0.2, 0.5, 0.8, 0.2, 0.4, 0.6, 0.8], abs=1e-12)
    for ramp in ("constant", "step"):
        assert [cyclical_sparsity(t, 0.8, 3, 10, ramp=ramp) for t in range(11)] == [0.8] * 11
    # each cycle's last step is at the target, each cycle starts at initial
    for t in range(100):
        v = cyclical_sparsity(t, 0.9, 4, 100, initial=0.1)
        if cycle_start(t, 4, 100):
            assert v == 0.1
        if cycle_start(t + 1, 4, 100) or t == 99:
            assert v == pytest.approx(0.9, abs=1e-12)
    assert cyclical_sparsity(5, 0.9, 5, 5) == 0.9          # one-step cycles


def test_cyclical_errors():
    with pytest.raises(ValueError, match="^cycles"):
        cyclical_sparsity(0, 0.8, 0, 10)
    with pytest.raises(ValueError, match="^cycles.*total_steps=10"):
        cyclical_sparsity(0, 0.8, 11, 10)
    with pytest.raises(ValueError, match="^total_steps"):
        cycle_start(0, 1, 0)
    with pytest.raises(ValueError, match="^ramp"):
        cyclical_sparsity(0, 0.8, 2, 10, ramp="cosine")
    with pytest.raises(ValueError, match="^initial"):
        cyclical_sparsity(0, 0.5, 2, 10, initial=0.6)
    with pytest.raises(ValueError, match="^target"):
        cyclical_sparsity(0, 1.0, 2, 10)
