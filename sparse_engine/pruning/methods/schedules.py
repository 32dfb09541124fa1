"""Sparsity schedules: pure functions from a training step to the target sparsity at that step.

    one_shot_sparsity(step, 0.9, at=1000)              # 0 before step 1000, 0.9 from it on
    imp_phase_sparsities(0.9, phases=3)                # [0.5358..., 0.7845..., 0.9]
    cubic_sparsity(step, 0.0, 0.9, t0=0, dt=100, n=50) # Zhu & Gupta (also used for GMP and FGGP)
    cyclical_sparsity(step, 0.9, cycles=4, total_steps=10_000)   # Srinivas et al.
    cycle_start(step, cycles=4, total_steps=10_000)    # recompute masks over all weights here

A step is an integer >= 0, counted however the caller counts (iterations or epochs). Nothing here
holds state or touches tensors: the pruners in ``sparse_engine.pruning.methods.pruners`` read these
values and change masks through ``prune_``.
"""
import math
import numbers
from typing import Optional, Sequence

RAMPS = ("cubic", "linear", "constant", "step")


def _int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def _sparsity(value, name: str, upper: float = 1.0, upper_inclusive: bool = False) -> float:
    """A number in [0, upper) (or [0, upper] when upper_inclusive)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = 0.0 <= value <= upper if upper_inclusive else 0.0 <= value < upper
    if not ok:
        bracket = "]" if upper_inclusive else ")"
        raise ValueError(f"{name}: expected a sparsity in [0, {upper:g}{bracket}, got {value!r}")
    return float(value)


def _check_ends(end: int, total_steps, what: str) -> None:
    if total_steps is None:
        return
    total_steps = _int(total_steps, "total_steps", 1)
    if end > total_steps:
        raise ValueError(f"{what} ends at step {end}, after training ends (total_steps={total_steps})")


def one_shot_sparsity(step: int, target: float, at: int = 0, *, total_steps: Optional[int] = None) -> float:
    """One-shot pruning: ``s_t = 0`` for ``t < at`` and ``s_t = target`` for ``t >= at``.

    The whole target is pruned at once at step ``at`` (Han et al., 2015, "Learning both Weights
    and Connections for Efficient Neural Networks"; one-shot pruning followed by retraining). With
    ``total_steps`` given, ``at > total_steps`` (pruning after training ends) is an error.
    """
    step = _int(step, "step", 0)
    target = _sparsity(target, "target")
    at = _int(at, "at", 0)
    _check_ends(at, total_steps, f"the one-shot schedule (at={at})")
    return target if step >= at else 0.0


def imp_phase_rate(target: float, phases: int, current: float = 0.0) -> float:
    """The per-phase pruning rate of IMP: ``p = 1 - ((1 - s) / (1 - s_0))^(1/phases)``.

    Each phase removes the fraction ``p`` of the weights still kept, so after ``phases`` phases
    the density is ``(1 - s_0)(1 - p)^phases = 1 - s`` (Frankle & Carbin, 2019, "The Lottery
    Ticket Hypothesis", and Renda et al., 2020, "Comparing Rewinding and Fine-tuning in Neural
    Network Pruning", prune a fixed fraction of the remaining weights per round; ``s_0`` is the
    sparsity before the first phase, 0 for a dense network).
    """
    target = _sparsity(target, "target")
    current = _sparsity(current, "current")
    phases = _int(phases, "phases", 1)
    if target <= current:
        raise ValueError(f"target: IMP must prune beyond the current sparsity {current:g}, got target={target:g}")
    return 1.0 - ((1.0 - target) / (1.0 - current)) ** (1.0 / phases)


def imp_phase_sparsities(target: Optional[float], phases: Optional[int] = None,
                         rates: Optional[Sequence[float]] = None, *,
                         sparsities: Optional[Sequence[float]] = None, current: float = 0.0) -> list[float]:
    """The cumulative sparsity after each IMP phase; give exactly one of ``phases``, ``rates``,
    ``sparsities``.

    - ``phases``: a constant rate ``p = 1 - ((1 - s) / (1 - s_0))^(1/phases)`` (``imp_phase_rate``)
      gives ``s_i = 1 - (1 - s_0)(1 - p)^i`` for ``i = 1..phases``; the last is exactly ``target``.
    - ``rates``: explicit per-phase rates ``p_i`` in (0, 1), each a fraction of the weights still
      kept: ``s_i = 1 - (1 - s_0) prod_{j<=i} (1 - p_j)``.
    - ``sparsities``: the cumulative sparsities themselves, strictly increasing, above ``s_0``
      and below 1.

    ``s_0 = current`` (0 for a dense network). With ``rates`` or ``sparsities``, ``target`` may be
    None; otherwise the last sparsity must equal it (to 1e-9; it is then returned exactly).
    Sources: Frankle & Carbin (2019); Renda et al. (2020).
    """
    given = [name for name, v in (("phases", phases), ("rates", rates), ("sparsities", sparsities)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"imp_phase_sparsities: give exactly one of phases, rates, sparsities; got {given or 'none'}")
    current = _sparsity(current, "current")
    if target is not None:
        target = _sparsity(target, "target")
        if target <= current:
            raise ValueError(f"target: IMP must prune beyond the current sparsity {current:g}, got target={target:g}")
    elif phases is not None:
        raise ValueError("target: expected a sparsity in [0, 1) when phases is given, got None")

    if phases is not None:
        phases = _int(phases, "phases", 1)
        p = imp_phase_rate(target, phases, current)
        out = [1.0 - (1.0 - current) * (1.0 - p) ** i for i in range(1, phases)]
        return out + [target]

    if rates is not None:
        rates = list(rates)
        if not rates:
            raise ValueError("rates: expected at least one per-phase rate, got an empty list")
        for i, r in enumerate(rates):
            if not (isinstance(r, numbers.Real) and not isinstance(r, bool) and 0.0 < r < 1.0):
                raise ValueError(f"rates[{i}]: expected a per-phase rate in (0, 1), got {r!r}")
        out, density = [], 1.0 - current
        for r in rates:
            density *= 1.0 - float(r)
            out.append(1.0 - density)
        name = "rates"
    else:
        out = list(sparsities)
        if not out:
            raise ValueError("sparsities: expected at least one cumulative sparsity, got an empty list")
        previous = current
        for i, s in enumerate(out):
            _sparsity(s, f"sparsities[{i}]")
            if s <= previous:
                raise ValueError(f"sparsities[{i}]: expected strictly increasing sparsities above the current "
                                 f"sparsity {current:g}, got {s!r} after {previous!r}")
            previous = s
        out = [float(s) for s in out]
        name = "sparsities"
    if target is not None:
        if abs(out[-1] - target) > 1e-9:
            raise ValueError(f"{name}: reach sparsity {out[-1]:.6g} after the last phase, not target={target:g}")
        out[-1] = target
    return out


def cubic_sparsity(step: int, initial: float, final: float, t0: int, dt: int, n: int, *,
                   initially_zero: bool = False, stepwise: bool = False,
                   total_steps: Optional[int] = None) -> float:
    """Gradual pruning, Zhu & Gupta (2017), "To prune, or not to prune", eq. (1):

        s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3,   clamped to [s_i, s_f].

    So ``s_t = s_i`` (``initial``) up to ``t0``, rises quickly then slowly, and is ``s_f``
    (``final``) from ``t0 + n dt`` on. This is torch.ao's ``CubicSL.sparsity_compute_fn`` exactly
    (same expression, same clamp, ``t`` is the scheduler's step count and is used as is, not
    rounded down to a multiple of ``dt``); ``initially_zero=True`` gives 0 before ``t0`` as there.

    Zhu & Gupta prune only at ``t in {t0, t0 + dt, ..., t0 + n dt}``: a pruner that calls
    ``prune_`` every ``dt`` steps from ``t0`` sees exactly those values. ``stepwise=True`` holds the
    value of the last such step in between (``t`` replaced by ``t0 + dt floor((t - t0) / dt)``).
    GMP uses this schedule, and so does FGGP (Zhu, Bezek & Goksel, 2024, "FGGP: Fixed-Rate
    Gradient-First Gradual Pruning"), from a dense (``initial=0``) or a 50%-sparse
    (``initial=0.5``) network. With ``total_steps`` given, ``t0 + n dt > total_steps`` is an error.
    """
    step = _int(step, "step", 0)
    final = _sparsity(final, "final")
    initial = _sparsity(initial, "initial")
    if initial > final:
        raise ValueError(f"initial: expected a sparsity <= final={final:g}, got {initial:g}")
    t0 = _int(t0, "t0", 0)
    dt = _int(dt, "dt", 1)
    n = _int(n, "n", 1)
    _check_ends(t0 + n * dt, total_steps, f"the cubic schedule (t0 + n*dt = {t0} + {n}*{dt})")
    if initially_zero and step < t0:
        return 0.0
    t = step
    if stepwise and t > t0:
        t = t0 + dt * ((t - t0) // dt)
    s_t = final + (initial - final) * (1.0 - (t - t0) / (dt * n)) ** 3
    return float(max(initial, min(final, s_t)))


def _cycle_index(step: int, cycles: int, total_steps: int) -> int:
    # Cycle c covers [floor(c T / C), floor((c + 1) T / C)); step is in cycle c iff
    # c T < (step + 1) C, i.e. c = ceil((step + 1) C / T) - 1.
    return min(((step + 1) * cycles - 1) // total_steps, cycles - 1)


def _cycle_args(step, cycles, total_steps) -> tuple[int, int, int]:
    step = _int(step, "step", 0)
    cycles = _int(cycles, "cycles", 1)
    total_steps = _int(total_steps, "total_steps", 1)
    if cycles > total_steps:
        raise ValueError(f"cycles: expected at most total_steps={total_steps} cycles (one step each), got {cycles}")
    return step, cycles, total_steps


def cycle_index(step: int, cycles: int, total_steps: int) -> int:
    """Which cycle (0..cycles-1) a step is in; cycle ``c`` covers steps
    ``[floor(c T / C), floor((c + 1) T / C))``. Steps from ``total_steps`` on belong to the last."""
    step, cycles, total_steps = _cycle_args(step, cycles, total_steps)
    return _cycle_index(step, cycles, total_steps)


def cycle_start(step: int, cycles: int, total_steps: int) -> bool:
    """True at the first step of each cycle (``floor(c T / C)``, ``c = 0..C-1``).

    There the cyclical schedule drops back to its initial sparsity and the mask must be
    recomputed over all weights (``prune_(..., regrow=True)``), so that weights pruned in error
    during the previous cycle can come back (Srinivas et al., 2022).
    """
    step, cycles, total_steps = _cycle_args(step, cycles, total_steps)
    if step >= total_steps:
        return False
    return step == (_cycle_index(step, cycles, total_steps) * total_steps) // cycles


def cyclical_sparsity(step: int, target: float, cycles: int, total_steps: int, ramp: str = "cubic",
                      initial: float = 0.0) -> float:
    """Cyclical pruning, Srinivas et al. (2022), "Cyclical Pruning for Sparse Neural Networks":
    the same ramp from ``initial`` to ``target`` repeated over ``cycles`` cycles of training.

    Cycle ``c`` covers steps ``[a_c, b_c) = [floor(c T / C), floor((c + 1) T / C))``. Within it,
    with ``u = (t - a_c) / (b_c - a_c - 1)`` (``u = 1`` for a one-step cycle),

        s_t = s_T + (s_0 - s_T) (1 - u)^3       ramp="cubic" (Zhu & Gupta's shape)
        s_t = s_0 + (s_T - s_0) u               ramp="linear"
        s_t = s_T                               ramp="constant" (or "step")

    so each cycle starts at ``initial`` (``s_0``) and its last step is at ``target`` (``s_T``);
    from ``total_steps`` on the value is ``target``. At each cycle's first step
    (``cycle_start``) the mask is recomputed over all weights, which lets wrongly pruned
    weights regrow. Srinivas et al. ramp with the cubic schedule of Zhu & Gupta; the linear and
    constant shapes are offered for comparison, and ``initial`` applies to every cycle.
    """
    step, cycles, total_steps = _cycle_args(step, cycles, total_steps)
    target = _sparsity(target, "target")
    initial = _sparsity(initial, "initial")
    if initial > target:
        raise ValueError(f"initial: expected a sparsity <= target={target:g}, got {initial:g}")
    if ramp not in RAMPS:
        raise ValueError(f"ramp: expected one of {RAMPS}, got {ramp!r}")
    if step >= total_steps or ramp in ("constant", "step"):
        return target
    c = _cycle_index(step, cycles, total_steps)
    start, end = (c * total_steps) // cycles, ((c + 1) * total_steps) // cycles
    u = 1.0 if end - start == 1 else (step - start) / (end - start - 1)
    if u == 0.0 or u == 1.0:  # exact endpoints, free of rounding in the formulas below
        return initial if u == 0.0 else target
    if ramp == "linear":
        return initial + (target - initial) * u
    return target + (initial - target) * (1.0 - u) ** 3
