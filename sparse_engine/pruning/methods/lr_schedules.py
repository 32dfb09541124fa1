"""Learning-rate schedules for retraining after pruning (Zimmer, Spiegel & Pokutta, ICLR 2023,
"How I Learned to Stop Worrying and Love Retraining"). The formulas follow the authors' code,
github.com/ZIB-IOL/BIMP, ``runners/baseRunner.py::define_retrain_schedule``, which was read to
pin down the details the paper's prose leaves open (ALLR's normalization and floor, SLR's
handling of the original warm-up, CLR's end value, which schedules warm up).

    sched = retrain_lr_schedule("allr", optimizer, total_steps=len(loader) * 10,
                                original_schedule=train_lrs, norm_drop=d, pruned_fraction=0.9)
    for x, y in loader:
        loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()
        sched.step()                       # once per iteration, after optimizer.step()

Every schedule is a ``torch.optim.lr_scheduler.LRScheduler``: it sets the same learning rate
``lr_at(t)`` in every param group, where ``t`` is the number of ``step()`` calls so far
(``t = 0`` for the first iteration), and its ``state_dict()`` holds only numbers, so a retraining
run resumes exactly (construct it again, then ``load_state_dict``).

Common shape, ``T = total_steps``, ``W = floor(warmup T)`` warm-up steps, ``D = T - W``:

    lr_at(t) = lr_0 (t + 1) / (W + 1)     for t < W  (linear warm-up from near 0, never 0)
    lr_at(t) = main(t - W)                for W <= t < T, and main(D) from t = T on

where ``lr_0 = main(0)`` and ``main`` is the schedule's own rule over ``k = 0..D``. SLR, CLR,
LLR and ALLR warm up over 10% of the budget, FT and LRW not at all (as in the paper). The authors'
code shapes the warm-up as a half cosine from 0 (``CosineAnnealingLR`` with ``eta_min=lr_0``);
here it is linear, as the issue asks, and starts above 0 so no iteration is wasted.
"""
import math
import numbers
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

RETRAIN_SCHEDULES = ("ft", "lrw", "slr", "clr", "llr", "allr")
DEFAULT_WARMUP = {"ft": 0.0, "lrw": 0.0, "slr": 0.1, "clr": 0.1, "llr": 0.1, "allr": 0.1}

OriginalSchedule = Union[Sequence[float], Callable[[int], float]]


def _int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def _lr(value, name: str, positive: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise ValueError(f"{name}: expected a learning rate {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def original_lrs(original_schedule: OriginalSchedule, original_steps: Optional[int] = None) -> list[float]:
    """The original training's learning rate at each of its iterations, as a list.

    ``original_schedule`` is a sequence (one LR per iteration; its length is the original
    length) or a callable ``step -> lr`` evaluated at ``0..original_steps-1``.
    """
    if callable(original_schedule):
        if original_steps is None:
            raise ValueError("original_steps: expected the original training's length in steps when "
                             "original_schedule is a callable, got None")
        original_steps = _int(original_steps, "original_steps", 1)
        lrs = [float(original_schedule(i)) for i in range(original_steps)]
    elif isinstance(original_schedule, (Sequence, Tensor)) and not isinstance(original_schedule, (str, bytes)):
        lrs = [float(v) for v in original_schedule]
        if not lrs:
            raise ValueError("original_schedule: expected at least one learning rate, got an empty sequence")
        if original_steps is not None and original_steps != len(lrs):
            raise ValueError(f"original_steps: the original schedule has {len(lrs)} steps, got {original_steps!r}")
    else:
        raise TypeError(f"original_schedule: expected a sequence of learning rates or a callable step -> lr, "
                        f"got {type(original_schedule).__name__}")
    for i, v in enumerate(lrs):
        _lr(v, f"original_schedule[{i}]")
    if max(lrs) <= 0:
        raise ValueError("original_schedule: expected a positive learning rate somewhere, got all zeros")
    return [float(v) for v in lrs]


def _budget(total_steps, warmup) -> tuple[int, float, int]:
    """(T, warm-up fraction, W): W = floor(warmup T), as the authors' int(0.1 * n_total_iterations)."""
    total_steps = _int(total_steps, "total_steps", 1)
    if not (isinstance(warmup, numbers.Real) and not isinstance(warmup, bool) and 0.0 <= warmup < 1.0):
        raise ValueError(f"warmup: expected the warm-up's fraction of total_steps in [0, 1), got {warmup!r}")
    return total_steps, float(warmup), int(warmup * total_steps)


def _peak_index(lrs: Sequence[float]) -> int:
    return max(range(len(lrs)), key=lambda i: (lrs[i], -i))


def _flat_params(x, name: str) -> dict:
    if isinstance(x, nn.Module):
        return {n: p.detach() for n, p in x.named_parameters()}
    if isinstance(x, Tensor):
        return {"": x.detach()}
    if isinstance(x, Mapping):
        return {k: v.detach() for k, v in x.items()}
    if isinstance(x, Iterable):
        return {str(i): t.detach() for i, t in enumerate(x)}
    raise TypeError(f"{name}: expected a Tensor, a sequence or dict of Tensors, or an nn.Module, "
                    f"got {type(x).__name__}")


@torch.no_grad()
def relative_norm_drop(before, after) -> float:
    """``d = ||W - W_p||_2 / ||W||_2``, the relative L2-norm change of the weights caused by
    pruning (Zimmer et al., 2023, used by ALLR), over all given tensors together, in float64.

    ``before``/``after``: a Tensor, a sequence or dict of Tensors (matched by position or key),
    or an ``nn.Module`` (its parameters). Take ``before`` as a copy before pruning, e.g.
    ``{n: p.detach().clone() for n, p in model.named_parameters()}``, and pass the model as
    ``after``. For pruning (zeroing entries) ``d`` is in [0, 1]; the authors compute the same
    value as ``sqrt(|‖W‖² - ‖W_p‖²|) / ‖W‖`` over all weights and biases.
    """
    b, a = _flat_params(before, "before"), _flat_params(after, "after")
    if b.keys() != a.keys():
        raise ValueError(f"after: expected the same tensors as before; differ at "
                         f"{sorted(set(b) ^ set(a))[:5]}")
    num = den = 0.0
    for k, tb in b.items():
        ta = a[k]
        if tb.shape != ta.shape:
            raise ValueError(f"after: tensor {k!r} has shape {tuple(ta.shape)}, before has {tuple(tb.shape)}")
        tb64 = tb.to(torch.float64)
        num += float(torch.sum((tb64 - ta.to(device=tb.device, dtype=torch.float64)) ** 2))
        den += float(torch.sum(tb64 ** 2))
    if den == 0:
        raise ValueError("before: the weights have norm 0, the relative norm drop is undefined")
    return math.sqrt(num / den)


def allr_initial_lr(max_lr: float, norm_drop: float, pruned_fraction: float, retrain_steps: int,
                    original_steps: int) -> float:
    """ALLR's start value (Zimmer et al., 2023; exactly as ``define_retrain_schedule`` in the
    authors' code computes it):

        lr_0 = max_lr * clip(d / sqrt(s), min(T_rt / T_orig, 1), 1)

    ``d = norm_drop`` (``relative_norm_drop``), ``s = pruned_fraction``: the fraction of the
    weights kept before this prune that it removed (the sparsity for one-shot pruning, the
    per-phase rate ``p`` for an IMP phase; the authors pass exactly this). Dividing by ``sqrt(s)``
    normalizes ``d``: pruning a random fraction ``s`` of the weights drops the norm by about
    ``sqrt(s)``, and magnitude pruning by less, so ``d / sqrt(s)`` in [0, 1] measures how much
    this prune hurt relative to a random one. ``T_rt / T_orig`` (retraining budget over the
    original training's length) is a floor: a short budget needs a large enough learning rate.
    """
    max_lr = _lr(max_lr, "max_lr", positive=True)
    d = _lr(norm_drop, "norm_drop")
    s = pruned_fraction
    if not (isinstance(s, numbers.Real) and not isinstance(s, bool) and 0.0 < s <= 1.0):
        raise ValueError(f"pruned_fraction: expected the fraction of kept weights this prune removed, "
                         f"in (0, 1], got {s!r}")
    retrain_steps = _int(retrain_steps, "total_steps", 1)
    original_steps = _int(original_steps, "original_steps", 1)
    floor = min(retrain_steps / original_steps, 1.0)
    return max_lr * min(max(d / math.sqrt(s), floor), 1.0)


class RetrainSchedule(LRScheduler):
    """Base of the retraining schedules: the warm-up, ``lr_at`` and ``get_lr`` (see the module
    docstring). A subclass sets its parameters, then calls ``super().__init__`` and implements
    ``_main(k)`` for ``k = 0..D`` (``D`` = steps after the warm-up)."""

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup: float, last_epoch: int = -1):
        self.total_steps, self.warmup, self.warmup_steps = _budget(total_steps, warmup)
        self.decay_steps = self.total_steps - self.warmup_steps
        super().__init__(optimizer, last_epoch)

    def _main(self, k: int) -> float:
        raise NotImplementedError

    def lr_at(self, step: int) -> float:
        """The learning rate of iteration ``step`` (0-based), a pure function of the step."""
        step = _int(step, "step", 0)
        w = self.warmup_steps
        if step < w:
            return self._main(0) * (step + 1) / (w + 1)
        return self._main(min(step - w, self.decay_steps))

    def get_lr(self) -> list[float]:
        lr = self.lr_at(self.last_epoch)
        return [lr for _ in self.optimizer.param_groups]

    _get_closed_form_lr = get_lr


class FTSchedule(RetrainSchedule):
    """FT, fine-tuning (Han et al., 2015): ``main(k) = last_lr``, the last learning rate of the
    original training, constant; no warm-up (Zimmer et al., 2023). The authors' code uses the
    smallest LR of the original schedule after its warm-up, the same value for decaying schedules;
    ``retrain_lr_schedule`` takes the last one, as the issue says."""

    def __init__(self, optimizer: Optimizer, total_steps: int, last_lr: float, *, warmup: float = 0.0,
                 last_epoch: int = -1):
        self.last_lr = _lr(last_lr, "last_lr", positive=True)
        super().__init__(optimizer, total_steps, warmup, last_epoch)

    def _main(self, k: int) -> float:
        return self.last_lr


class LRWSchedule(RetrainSchedule):
    """LRW, learning-rate rewinding (Renda et al., 2020): replay the last ``R`` iterations of the
    original schedule, ``main(k) = lr_orig(T_orig - R + min(k, R - 1))``, with ``R = replay_steps``
    (default: the whole budget ``D``); no warm-up (Zimmer et al., 2023)."""

    def __init__(self, optimizer: Optimizer, total_steps: int, original_schedule: OriginalSchedule, *,
                 original_steps: Optional[int] = None, replay_steps: Optional[int] = None,
                 warmup: float = 0.0, last_epoch: int = -1):
        total, _, w = _budget(total_steps, warmup)
        lrs = original_lrs(original_schedule, original_steps)
        r = total - w if replay_steps is None else _int(replay_steps, "replay_steps", 1)
        if r > len(lrs):
            raise ValueError(f"replay_steps: cannot replay {r} steps of an original schedule of {len(lrs)} steps "
                             f"(set replay_steps <= {len(lrs)})")
        self.replay = lrs[len(lrs) - r:]
        super().__init__(optimizer, total_steps, warmup, last_epoch)

    def _main(self, k: int) -> float:
        return self.replay[min(k, len(self.replay) - 1)]


class SLRSchedule(RetrainSchedule):
    """SLR, scaled learning-rate restarting (Le & Hua, 2021): the original schedule compressed
    into the ``D`` post-warm-up steps, starting at the maximum learning rate.

        main(k) = (max_lr / peak) lr'_orig(floor(k T_orig / D)),  k < D;   main(D) = main(D - 1)

    where ``lr'_orig`` is the original schedule with its warm-up (the steps before its first
    maximum ``peak``) replaced by ``peak``, as in the authors' code, and ``max_lr`` defaults to
    ``peak`` (then the factor is 1). 10% warm-up by default.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, original_schedule: OriginalSchedule, *,
                 original_steps: Optional[int] = None, max_lr: Optional[float] = None, warmup: float = 0.1,
                 last_epoch: int = -1):
        _budget(total_steps, warmup)
        lrs = original_lrs(original_schedule, original_steps)
        i_peak = _peak_index(lrs)
        peak = lrs[i_peak]
        scale = 1.0 if max_lr is None else _lr(max_lr, "max_lr", positive=True) / peak
        lrs = [peak] * i_peak + lrs[i_peak:]
        total, _, w = _budget(total_steps, warmup)
        d = total - w
        self.compressed = [scale * lrs[(k * len(lrs)) // d] for k in range(d)]
        super().__init__(optimizer, total_steps, warmup, last_epoch)

    def _main(self, k: int) -> float:
        return self.compressed[min(k, len(self.compressed) - 1)]


class CLRSchedule(RetrainSchedule):
    """CLR, cyclic learning-rate restarting (Le & Hua, 2021), a 1-cycle: after the warm-up,
    cosine from ``max_lr`` down to ``min_lr`` over ``D`` steps,

        main(k) = min_lr + (max_lr - min_lr) (1 + cos(pi k / D)) / 2.

    The authors' code ends at the smallest learning rate of the original schedule after its
    warm-up (``retrain_lr_schedule`` derives that from ``original_schedule``). 10% warm-up.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, max_lr: float, min_lr: float = 0.0, *,
                 warmup: float = 0.1, last_epoch: int = -1):
        self.max_lr = _lr(max_lr, "max_lr", positive=True)
        self.min_lr = _lr(min_lr, "min_lr")
        if self.min_lr > self.max_lr:
            raise ValueError(f"min_lr: expected at most max_lr={self.max_lr:g}, got {self.min_lr:g}")
        super().__init__(optimizer, total_steps, warmup, last_epoch)

    def _main(self, k: int) -> float:
        return self.min_lr + (self.max_lr - self.min_lr) * (1.0 + math.cos(math.pi * k / self.decay_steps)) / 2.0


class LLRSchedule(RetrainSchedule):
    """LLR, linear learning-rate restarting (Zimmer et al., 2023): after the warm-up,
    linear from ``start`` (``max_lr``, the original schedule's largest) to 0 over ``D`` steps,
    ``main(k) = start (1 - k / D)``. 10% warm-up."""

    def __init__(self, optimizer: Optimizer, total_steps: int, max_lr: float, *, warmup: float = 0.1,
                 last_epoch: int = -1):
        self.start_lr = _lr(max_lr, "max_lr", positive=True)
        super().__init__(optimizer, total_steps, warmup, last_epoch)

    def _main(self, k: int) -> float:
        return self.start_lr * (1.0 - k / self.decay_steps)


class ALLRSchedule(LLRSchedule):
    """ALLR, adaptive linear learning-rate restarting (Zimmer et al., 2023): LLR whose
    start value is ``allr_initial_lr(max_lr, norm_drop, pruned_fraction, total_steps,
    original_steps)``,

        start = max_lr * clip(d / sqrt(s), min(T_rt / T_orig, 1), 1),   main(k) = start (1 - k / D),

    ``d = ||W - W_p|| / ||W||`` the relative norm drop of this prune, ``s`` the fraction of kept
    weights it removed, ``T_rt = total_steps``, ``T_orig = original_steps``. 10% warm-up.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, max_lr: float, norm_drop: float,
                 pruned_fraction: float, original_steps: int, *, warmup: float = 0.1, last_epoch: int = -1):
        start = allr_initial_lr(max_lr, norm_drop, pruned_fraction, total_steps, original_steps)
        self.max_lr, self.norm_drop, self.pruned_fraction = float(max_lr), float(norm_drop), float(pruned_fraction)
        self.original_steps = int(original_steps)
        super().__init__(optimizer, total_steps, start, warmup=warmup, last_epoch=last_epoch)


def retrain_lr_schedule(name: str, optimizer: Optimizer, total_steps: int, *, max_lr: Optional[float] = None,
                        min_lr: Optional[float] = None, last_lr: Optional[float] = None,
                        original_schedule: Optional[OriginalSchedule] = None, original_steps: Optional[int] = None,
                        replay_steps: Optional[int] = None, warmup: Optional[float] = None,
                        norm_drop: Optional[float] = None, pruned_fraction: Optional[float] = None,
                        last_epoch: int = -1) -> RetrainSchedule:
    """One of the retraining schedules of Zimmer et al. (2023) by name, for ``total_steps``
    retraining iterations:

    - ``"ft"``: constant ``last_lr`` (FTSchedule); no warm-up.
    - ``"lrw"``: the last ``replay_steps`` (default all) iterations of ``original_schedule``
      replayed (LRWSchedule); no warm-up.
    - ``"slr"``: ``original_schedule`` compressed into the budget from its maximum (SLRSchedule).
    - ``"clr"``: cosine from ``max_lr`` to ``min_lr`` (CLRSchedule).
    - ``"llr"``: linear from ``max_lr`` to 0 (LLRSchedule).
    - ``"allr"``: linear to 0 from ``max_lr * clip(norm_drop / sqrt(pruned_fraction),
      min(total_steps / original_steps, 1), 1)`` (ALLRSchedule).

    ``warmup`` (fraction of ``total_steps``) defaults to 0.1 for slr/clr/llr/allr and 0 for ft/lrw.
    From ``original_schedule`` (a per-iteration list of the original training's learning rates,
    or a callable with ``original_steps``) the defaults are derived: ``max_lr`` its maximum,
    ``last_lr`` its last value, ``min_lr`` its minimum from the maximum on (the authors' CLR end
    value; 0 without an original schedule), ``original_steps`` its length. Inputs that a schedule
    does not read are ignored, so a pruner can pass all it knows.
    """
    if name not in RETRAIN_SCHEDULES:
        raise ValueError(f"name: expected one of {RETRAIN_SCHEDULES}, got {name!r}")
    if warmup is None:
        warmup = DEFAULT_WARMUP[name]
    lrs = None
    if original_schedule is not None:
        lrs = original_lrs(original_schedule, original_steps)
        original_steps = len(lrs)
    kw = dict(warmup=warmup, last_epoch=last_epoch)

    def need(value, arg: str, derived_from_original: bool = True):
        if value is None:
            hint = " (or original_schedule, from which it is derived)" if derived_from_original else ""
            raise ValueError(f"{arg}: schedule '{name}' needs {arg}{hint}, got None")
        return value

    if name in ("lrw", "slr") and lrs is None:
        raise ValueError(f"original_schedule: schedule '{name}' needs the original training's learning rates, "
                         f"got None")
    if name == "ft":
        if last_lr is None and lrs is not None:
            last_lr = lrs[-1]
        return FTSchedule(optimizer, total_steps, need(last_lr, "last_lr"), **kw)
    if name == "lrw":
        return LRWSchedule(optimizer, total_steps, lrs, replay_steps=replay_steps, **kw)
    if name == "slr":
        return SLRSchedule(optimizer, total_steps, lrs, max_lr=max_lr, **kw)
    if max_lr is None and lrs is not None:
        max_lr = max(lrs)
    max_lr = need(max_lr, "max_lr")
    if name == "clr":
        if min_lr is None:
            min_lr = min(lrs[_peak_index(lrs):]) if lrs is not None else 0.0
        return CLRSchedule(optimizer, total_steps, max_lr, min_lr, **kw)
    if name == "llr":
        return LLRSchedule(optimizer, total_steps, max_lr, **kw)
    return ALLRSchedule(optimizer, total_steps, max_lr, need(norm_drop, "norm_drop", False),
                        need(pruned_fraction, "pruned_fraction", False), need(original_steps, "original_steps"),
                        **kw)
