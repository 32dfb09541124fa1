"""Dynamic sparse training: SET and RigL train a sparse network from scratch, moving its weights.

    pruner = RigL(model, optimizer, 0.9, total_steps=len(loader) * epochs,
                  loss_fn=F.cross_entropy, data=lambda: batch)       # delta_t=100, drop 0.3, cosine, stop 0.75
    for x, y in loader:
        batch = (x, y)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        pruner.step()             # every delta_t steps until stop * total_steps: drop and grow

The construction draws the initial masks (``score="random"`` by default, ``allocation="erk"``: the
Erdos-Renyi-Kernel distribution of RigL) at the target sparsity. Then, at steps
``t = delta_t, 2 delta_t, ...`` below ``stop * total_steps``, each layer drops the
``floor(f_t * kept)`` kept weights of smallest ``|w|`` and grows as many (``drop_and_grow_``):

* ``SET`` (Mocanu et al. 2018): grown uniformly at random among the positions not kept;
* ``RigL`` (Evci et al. 2020): grown where the dense gradient ``|g|`` is largest.

``f_t`` is ``drop_fraction_at`` (cosine decay from ``drop_fraction`` to 0 at the stop step, as
RigL; or linear, or constant). The per-layer kept counts never change, so the sparsity stays
exactly constant; grown weights start at 0 with cleared optimizer state.

RigL's dense gradient is computed only at update steps, by a separate dense forward and backward
(``gradient_scores``: the sparse layers run ``F.linear``/conv on leaves that share the weights'
storage, so pruned weights get the gradient they would have if regrown). No dense copy of the
weights is kept. ``data`` is what it runs on: a batch ``(inputs, targets)``, a list of batches, or
a callable returning either (e.g. ``lambda: last_batch``: the current mini-batch, as the paper).
"""
import math
import numbers
from typing import Callable, Optional

import torch
from torch import Tensor

from sparse_engine.pruning.methods.drop_grow import drop_and_grow_
from sparse_engine.pruning.methods.pruner import Pruner, check_int, check_sparsity
from sparse_engine.pruning.select import gradient_scores, prune_

DECAYS = ("cosine", "linear", "constant")
INIT_SCORES = ("random", "magnitude")
# Options of the initial prune that DST passes to prune_ (granularity is unstructured).
DST_OPTIONS = ("score", "allocation", "exclude", "min_density", "generator")


def drop_fraction_at(t: int, drop_fraction: float, end_step: int, decay: str = "cosine") -> float:
    """The drop fraction at step ``t``: 0 from ``end_step`` on, before it

    * ``"cosine"`` (RigL): ``drop_fraction / 2 * (1 + cos(pi t / end_step))``;
    * ``"linear"``: ``drop_fraction * (1 - t / end_step)``;
    * ``"constant"``: ``drop_fraction``.
    """
    if decay not in DECAYS:
        raise ValueError(f"decay: expected one of {DECAYS}, got {decay!r}")
    if t >= end_step:
        return 0.0
    if decay == "cosine":
        return drop_fraction / 2 * (1 + math.cos(math.pi * t / end_step))
    if decay == "linear":
        return drop_fraction * (1 - t / end_step)
    return drop_fraction


def _check_fraction(value, name: str, low_open: bool) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
        and (0.0 < value if low_open else 0.0 <= value) and value <= 1.0
    if not ok:
        raise ValueError(f"{name}: expected a number in {'(0' if low_open else '[0'}, 1], got {value!r}")
    return float(value)


def _check_data(data) -> None:
    if callable(data):
        return
    pair = isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor)
    many = isinstance(data, (tuple, list)) and len(data) > 0 and all(
        isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[0], Tensor) for b in data)
    if not (pair or many):
        raise TypeError(f"data: expected a batch (inputs, targets), a non-empty list of batches, or a callable "
                        f"returning one of them, got {type(data).__name__}")


class DynamicSparse(Pruner):
    """What SET and RigL share (module docstring); subclasses give ``grow_scores()``.

    Attributes beyond ``Pruner``'s: ``end_step`` (the first step without updates,
    ``floor(stop * total_steps)``), ``last_update`` (``{"step", "fraction", "dropped", "grown"}``
    of the latest update, or None).
    """

    def __init__(self, model, optimizer, sparsity: float, total_steps: int, *, delta_t: int = 100,
                 drop_fraction: float = 0.3, decay: str = "cosine", stop: float = 0.75, **prune_kwargs):
        target = check_sparsity(sparsity)
        total_steps = check_int(total_steps, "total_steps", 1)
        delta_t = check_int(delta_t, "delta_t", 1)
        drop_fraction = _check_fraction(drop_fraction, "drop_fraction", low_open=False)
        stop = _check_fraction(stop, "stop", low_open=True)
        if decay not in DECAYS:
            raise ValueError(f"decay: expected one of {DECAYS}, got {decay!r}")
        prune_kwargs.setdefault("score", "random")
        prune_kwargs.setdefault("allocation", "erk")
        if prune_kwargs["score"] not in INIT_SCORES:
            raise ValueError(f"score: the initial masks are drawn by one of {INIT_SCORES}, got "
                             f"{prune_kwargs['score']!r}")
        # A generator given with score="magnitude" is not a prune_ input; SET grows with it.
        generator = prune_kwargs.pop("generator", None) if prune_kwargs["score"] != "random" else None
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        super().__init__(model, optimizer, prune_kwargs, DST_OPTIONS, None, None)
        if generator is not None:
            self.generator = generator
        self.target, self.total_steps, self.delta_t = target, total_steps, delta_t
        self.drop_fraction, self.decay, self.stop = drop_fraction, decay, stop
        self.end_step = math.floor(stop * total_steps)
        self.last_update: Optional[dict] = None
        self.config = {"sparsity": target, "total_steps": total_steps, "delta_t": delta_t,
                       "drop_fraction": drop_fraction, "decay": decay, "stop": stop, **self.prune_kwargs}

    def _initial_prune(self) -> None:
        # Over all weights (regrow=True): a model that is already sparse gets fresh masks too.
        self.sparsity = self.target
        prune_(self.model, self.target, regrow=True, **self.prune_kwargs)

    def fraction_at(self, t: int) -> float:
        """``drop_fraction_at(t, drop_fraction, end_step, decay)``."""
        return drop_fraction_at(t, self.drop_fraction, self.end_step, self.decay)

    def update_step(self, t: int) -> bool:
        """Whether the masks are updated after step ``t``."""
        return 0 < t < self.end_step and t % self.delta_t == 0

    def grow_scores(self) -> list[Tensor]:
        raise NotImplementedError

    def update(self, fraction: float) -> dict:
        """One drop-and-grow update of every pruned layer with drop fraction ``fraction`` now
        (what ``step()`` does at update steps); returns ``{"dropped", "grown"}``."""
        return drop_and_grow_([m for _, m in self.layers], self.grow_scores(), fraction, self.optimizer)

    def step_selects(self, t: int) -> bool:
        return self.update_step(t)

    def _on_step(self, t: int) -> bool:
        if not self.update_step(t):
            return False
        fraction = self.fraction_at(t)
        counts = self.update(fraction)
        self.last_update = {"step": t, "fraction": fraction, **counts}
        return counts["grown"] > 0

    def _extra_state(self) -> dict:
        return {"last_update": self.last_update}

    def _load_extra_state(self, state: dict) -> None:
        self.last_update = state["last_update"]


class SET(DynamicSparse):
    """Sparse Evolutionary Training (Mocanu et al. 2018): drop the smallest ``|w|``, grow uniformly
    at random among the positions not kept (module docstring).

    Args:
        model, optimizer: the model with sparse layers and its optimizer.
        sparsity: target in [0, 1), held exactly from the construction on.
        total_steps: the training length in optimizer steps.
        delta_t: steps between updates (int >= 1).
        drop_fraction: the initial fraction of each layer's kept weights replaced per update, in [0, 1]
            (0: static sparse training).
        decay: ``"cosine"``, ``"linear"`` or ``"constant"`` (``drop_fraction_at``).
        stop: updates stop at ``floor(stop * total_steps)``, in (0, 1].
        **prune_kwargs: the initial masks: ``score`` ("random" or "magnitude"), ``allocation``
            (default "erk"), ``exclude``, ``min_density``, ``generator``. The pruner's generator
            (seeded from torch's global RNG unless given; checkpointed) draws the random masks
            and the regrowth.
    """

    def __init__(self, model, optimizer, sparsity: float, total_steps: int, *, delta_t: int = 100,
                 drop_fraction: float = 0.3, decay: str = "cosine", stop: float = 0.75, **prune_kwargs):
        super().__init__(model, optimizer, sparsity, total_steps, delta_t=delta_t, drop_fraction=drop_fraction,
                         decay=decay, stop=stop, **prune_kwargs)
        if self.generator is None:  # score="magnitude": growth still draws from a generator the pruner owns
            self.generator = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, ())))
        self._initial_prune()

    def grow_scores(self) -> list[Tensor]:
        """Uniform random scores in [0, 1), drawn layer by layer from the pruner's generator."""
        return [torch.rand(m.weight.shape, generator=self.generator).to(m.weight.device) for _, m in self.layers]


class RigL(DynamicSparse):
    """RigL (Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners"): drop the
    smallest ``|w|``, grow the largest dense-gradient magnitudes ``|g|`` among the positions not
    kept (module docstring). Defaults are the paper's: ``delta_t=100``, ``drop_fraction=0.3``,
    cosine decay, ``stop=0.75``, ERK random initial masks.

    Args:
        loss_fn: ``loss_fn(model(inputs), targets)``, differentiable.
        data: where the dense gradient is taken at an update step: a batch ``(inputs, targets)``,
            a list of batches (gradients averaged), or a callable returning either, called at
            each update (to use the current mini-batch).
        (the other arguments as :class:`SET`).
    """

    def __init__(self, model, optimizer, sparsity: float, total_steps: int, *, loss_fn: Callable, data,
                 delta_t: int = 100, drop_fraction: float = 0.3, decay: str = "cosine", stop: float = 0.75,
                 **prune_kwargs):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable loss_fn(outputs, targets), got {type(loss_fn).__name__}")
        _check_data(data)
        if prune_kwargs.get("score", "random") != "random" and prune_kwargs.get("generator") is not None:
            raise ValueError("generator: RigL reads it only for score='random' (the initial masks); it grows by "
                             "the gradient")
        super().__init__(model, optimizer, sparsity, total_steps, delta_t=delta_t, drop_fraction=drop_fraction,
                         decay=decay, stop=stop, **prune_kwargs)
        self.loss_fn, self.data = loss_fn, data
        self._initial_prune()

    def grow_scores(self) -> list[Tensor]:
        """``|g|``, the dense loss gradient at the current sparse weights on ``data``."""
        data = self.data() if callable(self.data) else self.data
        names = [n for n, _ in self.layers]
        scores = gradient_scores(self.model, loss_fn=self.loss_fn, data=data, names=names)
        return [scores[n] for n in names]
