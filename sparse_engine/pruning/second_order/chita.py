"""CHITA and CHITA++ on models (Benbaki et al., ICML 2023, "Fast as CHITA: Neural Network
Pruning with Combinatorial Optimization"): one-shot pruning as an L0-constrained least-squares
problem; the solver, and what it solves, are in ``sparse_engine.pruning.second_order.chita_solver``.

    report = chita(model, F.cross_entropy, loader, 0.9, n_grads=1000, l2=1e-4)
    report = chita_plus_plus(model, F.cross_entropy, loader, 0.98, stages=5, schedule="exponential")

Block-diagonal approximation (``block_size``). A large layer is cut into blocks of
``block_size`` consecutive weights (row-major; the last block of a layer is shorter and padded),
and the Fisher into its diagonal blocks ``X_b^T X_b``: the problem separates. Each block's budget
``k_b`` is the number of its weights kept by global magnitude pruning (one ``topk_mask`` over
|w| of all layers: exactly ``k`` in all), and all blocks are solved at once, batched
(``chita_solve_blocks``). There the per-row selection is a stable row sort with topk_mask's
rule (largest first, ties to the lower index): topk_mask's GPU select keeps a 65536-bin
histogram per group, built for a few large groups, not for thousands of 128-weight rows. Blocks
that have converged leave the batch. ``block_size=None`` (the default of ``chita``) solves one
global problem over all weights of all layers: the exact low-rank Fisher, layer budgets coming
out of the solve.

Dead weights (``prune_dead=True``, the default): weights whose gradient is zero on every sample
(dead units; in CHITA++, units earlier stages cut off) are pruned and left out of the problem, as
the authors' solver does: in the full problem they cost nothing to keep and take budget from live
weights (``chita_solver``'s docstring).

Gradients (``chita``) are computed in eval mode through the layers' dense forward (pruned
weights get gradients, so CHITA may regrow them), per sample with ``torch.func.vmap(grad)``
(``grad_batch_size=1``) or per group of ``grad_batch_size`` samples, and written straight into
the block layout: memory is ``n x p`` float32 (plus the padding of each layer's last block),
plus one chunk of per-sample gradients while they are computed; nothing else of size n x p.
"""
import math
import numbers
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from sparse_engine.nn.masked_module import MaskedModule
from sparse_engine.nn.sparsify import Selector, SparsityReport, sparsity_report, warn_empty_layers
from sparse_engine.ops.mask_pack import unpack_mask
from sparse_engine.ops.topk_mask import topk_mask
from sparse_engine.pruning.second_order.chita_solver import (  # noqa: F401
    CHITA_STEPS, _check_bool, _check_int, _check_number, _options, chita_backsolve, chita_objective, chita_solve,
    chita_solve_blocks, chita_solve_ref)
from sparse_engine.pruning.select import buffers_restored, forward_with, prunable_layers, restores_on_error, target_kept

CHITA_SCHEDULES = ("exponential", "cubic", "linear", "constant")
_GRAD_CHUNK_ELEMS = 1 << 24    # per-sample gradients held at once while collecting (64 MiB)


class _BlockLayout:
    """Where each weight of each layer sits in the (B, m) block layout.

    ``block_size=None``: one block holding every layer's weights end to end (m = total). Else
    each layer is cut into ``ceil(numel / block_size)`` blocks of ``m = min(block_size, largest
    layer)`` consecutive weights; the last block of a layer is padded (``valid`` False)."""

    def __init__(self, numels: Sequence[int], block_size: Optional[int]):
        self.numels = list(numels)
        total = sum(self.numels)
        if block_size is None or block_size >= total and len(self.numels) == 1:
            self.global_block = True
            self.B, self.m = 1, total
            self.starts = [sum(self.numels[:i]) for i in range(len(self.numels))]  # column offsets
        else:
            self.global_block = False
            self.m = min(block_size, max(self.numels))
            self.nblocks = [-(-p // self.m) for p in self.numels]
            self.starts = [sum(self.nblocks[:i]) for i in range(len(self.numels))]  # first block of each layer
            self.B = sum(self.nblocks)

    def write_rows(self, G: Tensor, row: int, grads: Sequence[Tensor]) -> None:
        """Write per-layer gradient rows (r, numel_l) into G (B, n, m) at rows [row, row + r)."""
        r = grads[0].shape[0]
        for l, g in enumerate(grads):
            p = self.numels[l]
            if self.global_block:
                G[0, row:row + r, self.starts[l]:self.starts[l] + p] = g
            else:
                nb, b0 = self.nblocks[l], self.starts[l]
                full = p // self.m
                if full:
                    G[b0:b0 + full, row:row + r] = g[:, :full * self.m].reshape(r, full, self.m).transpose(0, 1)
                if full < nb:
                    G[b0 + full, row:row + r, :p - full * self.m] = g[:, full * self.m:]

    def pack(self, vectors: Sequence[Tensor]) -> Tensor:
        """Per-layer flat vectors -> (B, m), zero at padding."""
        out = vectors[0].new_zeros(self.B, self.m)
        self.write_rows(out.unsqueeze(1), 0, [v.reshape(1, -1) for v in vectors])
        return out

    def unpack(self, packed: Tensor) -> list[Tensor]:
        """(B, m) -> per-layer flat vectors."""
        if self.global_block:
            return [packed[0, s:s + p] for s, p in zip(self.starts, self.numels)]
        return [packed[b0:b0 + nb].reshape(-1)[:p] for b0, nb, p in zip(self.starts, self.nblocks, self.numels)]

    def valid(self, device) -> Optional[Tensor]:
        if self.global_block:
            return None
        return self.pack([torch.ones(p, device=device) for p in self.numels]) > 0


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _data_batches(data) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches ``(inputs, targets)`` from one pair or an iterable of pairs, lazily."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        yield data[0], data[1]
        return
    if isinstance(data, Tensor) or not hasattr(data, "__iter__"):
        raise TypeError(f"data: expected a batch (inputs, targets) or an iterable of such batches, "
                        f"got {type(data).__name__}")
    for i, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not isinstance(batch[0], Tensor):
            raise TypeError(f"data: batch {i}: expected a pair (inputs, targets), got {type(batch).__name__}")
        yield batch[0], batch[1]


def _collect_gradients(model: nn.Module, layers, loss_fn: Callable, data, n_grads: int, grad_batch_size: int,
                       layout: _BlockLayout) -> Tensor:
    """Rows of ``X`` (module docstring): the gradients of ``n_grads`` samples (or groups of
    ``grad_batch_size`` samples), divided by sqrt(rows), written into a (B, rows, m) float32 tensor."""
    names = [n for n, _ in layers]
    mods = [m for _, m in layers]
    device = mods[0].weight.device
    G = torch.zeros(layout.B, n_grads, layout.m, dtype=torch.float32, device=device)
    weights = tuple(m.weight.detach() for m in mods)
    total = sum(layout.numels)
    chunk = max(1, _GRAD_CHUNK_ELEMS // total)

    def group_loss(ws, x, t):
        with forward_with(mods, ws):
            return loss_fn(model(x), t)

    per_group = torch.func.vmap(torch.func.grad(group_loss), in_dims=(None, 0, 0))
    row = 0
    with _eval_mode(model), buffers_restored(model), torch.no_grad():
        for x, t in _data_batches(data):
            if row == n_grads:
                break
            groups = min(x.shape[0] // grad_batch_size, n_grads - row)
            for s in range(0, groups, chunk):
                e = min(s + chunk, groups)
                xs = x[s * grad_batch_size:e * grad_batch_size].reshape(e - s, grad_batch_size, *x.shape[1:])
                ts = t[s * grad_batch_size:e * grad_batch_size].reshape(e - s, grad_batch_size, *t.shape[1:])
                grads = [g.reshape(e - s, -1).float() for g in per_group(weights, xs, ts)]
                for name, g in zip(names, grads):
                    bad = ~torch.isfinite(g).all(1)
                    if bad.any():
                        i = row + int(bad.nonzero()[0])
                        what = "sample" if grad_batch_size == 1 else "group of samples"
                        raise ValueError(f"data: the gradient of {what} {i} is NaN or Inf in layer '{name}'; check "
                                         f"the data, loss_fn and the model's weights")
                layout.write_rows(G, row, grads)
                row += e - s
    if row == 0:
        raise ValueError(f"data: expected at least one sample (at least grad_batch_size={grad_batch_size} "
                         f"samples in a batch), got none (CHITA++ reads data once per stage: pass a list or "
                         f"a DataLoader, not a one-shot iterator)")
    G = G[:, :row]
    return G.mul_(1.0 / math.sqrt(row))


def _check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity: expected a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _check_chita_args(loss_fn, n_grads, l2, block_size, iht_iters, grad_batch_size, rounds, backsolve, step,
                      prune_dead) -> None:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable loss_fn(outputs, targets), got {type(loss_fn).__name__}")
    _check_int(n_grads, "n_grads", 1)
    _check_number(l2, "l2", positive=True)
    if block_size is not None:
        _check_int(block_size, "block_size", 1)
    _check_int(iht_iters, "iht_iters", 0)
    _check_int(grad_batch_size, "grad_batch_size", 1)
    _options(iht_iters, 1, rounds, 0.0, backsolve, step)
    _check_bool(prune_dead, "prune_dead")


def _chita_stage(model, layers, loss_fn, data, sparsity, n_grads, l2, block_size, iht_iters, grad_batch_size,
                 rounds, backsolve, step, prune_dead) -> None:
    mods = [m for _, m in layers]
    for name, m in layers:
        if not torch.isfinite(m.weight).all():
            raise ValueError(f"model: the weight of layer '{name}' contains NaN or Inf")
    layout = _BlockLayout([m.weight.numel() for m in mods], block_size)
    k = target_kept(sum(layout.numels), sparsity)
    X = _collect_gradients(model, layers, loss_fn, data, n_grads, grad_batch_size, layout)
    flat = [m.weight.detach().reshape(-1).float() for m in mods]
    w0 = layout.pack(flat)
    if layout.global_block:
        w, keep = chita_solve(X[0], w0[0], k, l2, iters=iht_iters, step=step, rounds=rounds, backsolve=backsolve,
                              prune_dead=prune_dead)
        w, keep = w.unsqueeze(0), keep.unsqueeze(0)
    else:
        # Block budgets: the weights that global magnitude pruning keeps in each block.
        bits = topk_mask([f.abs().reshape(1, -1) for f in flat], k)
        magnitude = [unpack_mask(b, (1, p)).reshape(-1) for b, p in zip(bits, layout.numels)]
        ks = layout.pack([mk.float() for mk in magnitude]).sum(1).round().long()
        w, keep = chita_solve_blocks(X, w0, ks, l2, valid=layout.valid(X.device), iters=iht_iters, step=step,
                                     rounds=rounds, backsolve=backsolve, prune_dead=prune_dead)
    del X
    with torch.no_grad():
        for m, w_l, keep_l in zip(mods, layout.unpack(w), layout.unpack(keep)):
            m.weight.copy_(w_l.reshape(m.weight.shape).to(m.weight.dtype))
            m.set_mask(keep_l.reshape(m.weight.shape))


@restores_on_error
def chita(model: nn.Module, loss_fn: Callable, data, sparsity: float, n_grads: int = 1000, l2: float = 1e-4,
          block_size: Optional[int] = None, iht_iters: int = 100, *, grad_batch_size: int = 1, rounds: int = 3,
          backsolve: bool = True, step: str = "search", exclude: Selector = None,
          prune_dead: bool = True) -> SparsityReport:
    """One-shot CHITA over the sparse layers of ``model``, in place (module docstring).

    Args:
        model: a model with sparse layers (``sparse_engine.sparsify``).
        loss_fn: ``loss_fn(outputs, targets)``, averaging over the batch (``F.cross_entropy``).
        data: one batch ``(inputs, targets)`` or an iterable of batches (a list, a DataLoader);
            read once, until ``n_grads`` gradients are collected.
        sparsity: fraction of pruned weights over the layers pruned, in [0, 1); exactly
            ``n - round(sparsity * n)`` weights are kept (``target_kept``, as ``prune_`` rounds).
        n_grads: gradients (rows of X) to collect; fewer if ``data`` runs out.
        l2: the ridge ``l2/2 ||w - w0||^2``, > 0, on the Fisher's scale (the Fisher is the mean of
            the gradients' outer products; the default is about 5% of the mean Fisher diagonal
            of a trained Fashion-MNIST MLP 784-40-20-10: scale it with your gradients).
        block_size: None (default): one global problem over all weights; an int: the
            block-diagonal approximation with blocks of ``block_size`` weights of one layer, budgets
            from global magnitude pruning.
        iht_iters: IHT iterations per round (``chita_solve``'s ``iters``).
        grad_batch_size: 1 (default): one row per sample (``vmap(grad)``); m > 1: one row per
            group of m consecutive samples of a batch (their mean gradient; samples left over at
            the end of a batch are not used).
        rounds, backsolve, step: as in ``chita_solve``.
        exclude: layers to leave as they are (glob patterns, a list of them, or a callable).
        prune_dead: weights with a zero gradient on every sample (dead units) are pruned and left
            out of the problem, as the authors' solver does (``chita_solve``); False keeps them in
            the problem, where they cost nothing to keep and take budget from live weights.
    Weights are replaced by the solution (regrowing pruned weights where the solve keeps them)
    and masks set to its support. Gradients are taken in eval mode; buffers are restored.
    Memory: the n x p float32 gradient matrix (p = weights of the pruned layers), plus a chunk of
    per-sample gradients while they are computed and the solver's workspace.
    Returns ``sparsity_report(model)``.
    """
    sparsity = _check_sparsity(sparsity)
    _check_chita_args(loss_fn, n_grads, l2, block_size, iht_iters, grad_batch_size, rounds, backsolve, step,
                      prune_dead)
    layers = prunable_layers(model, exclude)
    _chita_stage(model, layers, loss_fn, data, sparsity, n_grads, l2, block_size, iht_iters, grad_batch_size,
                 rounds, backsolve, step, prune_dead)
    return _report(model, layers, "chita")


def _report(model: nn.Module, layers, caller: str) -> SparsityReport:
    """The model's report, with a warning for layers the global problem left without weights."""
    report = sparsity_report(model)
    warn_empty_layers(report, [n for n, _ in layers], caller, EMPTY_ADVICE)
    return report


EMPTY_ADVICE = ("the global problem found them the cheapest to remove; exclude them (exclude=[...]) or prune at a "
                "lower sparsity, or prune them separately (obs_layerwise prunes each layer at its own sparsity)")


def chita_sparsities(target: float, stages: int, schedule: str = "exponential", start: float = 0.0) -> list[float]:
    """The sparsity of each of CHITA++'s ``stages`` stages, from ``start`` (excluded) to ``target``.

    With ``D = target - start`` and ``t = 1..T`` (the paper's schedules, whose stage 0 is the
    starting point):
        exponential: ``start + D (1 - 2^-t) / (1 - 2^-T)`` (each stage prunes half the previous amount)
        cubic:       ``target - D (1 - t/T)^3``
        linear:      ``start + D t/T``
        constant:    ``target`` at every stage (the quadratic model is refreshed at the target)
    The last stage is exactly ``target``."""
    target = _check_sparsity(target)
    start = _check_sparsity(start)
    stages = _check_int(stages, "stages", 1)
    if schedule not in CHITA_SCHEDULES:
        raise ValueError(f"schedule: expected one of {CHITA_SCHEDULES}, got {schedule!r}")
    d, T = target - start, stages
    if schedule == "exponential":
        out = [start + d * (1 - 2.0 ** -t) / (1 - 2.0 ** -T) for t in range(1, T + 1)]
    elif schedule == "cubic":
        out = [target - d * (1 - t / T) ** 3 for t in range(1, T + 1)]
    elif schedule == "linear":
        out = [start + d * t / T for t in range(1, T + 1)]
    else:
        out = [target] * T
    out[-1] = target
    return out


def _explicit_schedule(sparsity: float, stages, schedule) -> Optional[list[float]]:
    """``schedule`` given as the stages' sparsities (checked: ``stages`` of them, non-decreasing,
    the last equal to ``sparsity`` up to 1e-9); None for a schedule's name."""
    if isinstance(schedule, str):
        return None
    if not isinstance(schedule, Sequence) or not all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                                     for v in schedule):
        raise ValueError(f"schedule: expected one of {CHITA_SCHEDULES} or a sequence of sparsities, got {schedule!r}")
    values = [_check_sparsity(float(v)) for v in schedule]
    stages = _check_int(stages, "stages", 1)
    if len(values) != stages:
        raise ValueError(f"stages: expected {len(values)} (the number of sparsities in schedule), got {stages}")
    if any(b < a for a, b in zip(values, values[1:])) or abs(values[-1] - sparsity) > 1e-9:
        raise ValueError(f"schedule: expected non-decreasing sparsities ending at sparsity={sparsity}, got {values}")
    return values[:-1] + [sparsity]


@restores_on_error
def chita_plus_plus(model: nn.Module, loss_fn: Callable, data, sparsity: float, stages: int = 5,
                    schedule: Union[str, Sequence[float]] = "exponential", n_grads: int = 1000, l2: float = 1e-4,
                    block_size: Optional[int] = None, iht_iters: int = 100, *, grad_batch_size: int = 1,
                    rounds: int = 3, backsolve: bool = True, step: str = "search",
                    exclude: Selector = None, prune_dead: bool = True) -> SparsityReport:
    """CHITA++: ``stages`` CHITA solves at the sparsities of ``chita_sparsities(sparsity, stages,
    schedule, start)``, where ``start`` is the current sparsity of the pruned layers (capped at
    ``sparsity``), or at the sparsities given as ``schedule`` (a sequence of ``stages`` values,
    non-decreasing, ending at ``sparsity``: another code's schedule, such as the authors'
    ``generate_schedule`` with its first stage at ``base_level``). Each stage recomputes the
    gradients at the weights the previous stage left, so the quadratic model follows the weights.
    ``data`` is read once per stage: pass a list or a DataLoader, not a one-shot iterator. Other
    arguments as in ``chita``. Returns the report."""
    sparsity = _check_sparsity(sparsity)
    _check_chita_args(loss_fn, n_grads, l2, block_size, iht_iters, grad_batch_size, rounds, backsolve, step,
                      prune_dead)
    explicit = _explicit_schedule(sparsity, stages, schedule)
    layers = prunable_layers(model, exclude)
    total = sum(m.weight.numel() for _, m in layers)
    current = 1.0 - sum(int(m.mask.sum()) for _, m in layers) / total
    for s in explicit or chita_sparsities(sparsity, stages, schedule, min(current, sparsity)):
        if target_kept(total, s) == total:
            continue  # nothing to prune at this stage
        _chita_stage(model, layers, loss_fn, data, s, n_grads, l2, block_size, iht_iters, grad_batch_size, rounds,
                     backsolve, step, prune_dead)
    return _report(model, layers, "chita_plus_plus")
