"""Benchmark of one pruning step: against a training step of the same model, and against
torch.nn.utils.prune.

One step of gradual magnitude pruning takes a model from sparsity FROM to TO: score every weight,
select the weights to keep (one global selection), update the masks (zeroing the newly pruned
weights), and clear the optimizer state (momentum, Adam moments) at the pruned positions, or the
next optimizer steps would move weights that are meant to stay zero. Timed for each model and
optimizer (AdamW; SGD with momentum), in the same run:

  ours_step     prune_(model, TO, "magnitude", "global") + handle.clear_state(), on a sparsify()'d
                model whose optimizer runs under mask_optimizer. clear_state would otherwise run
                in the next optimizer step's pre-hook; it is called here so that it is timed.
  ours_restorable ours_step inside restore_on_error(model, optimizer): what a step costs if it copies
                the model and optimizer state first so that a failure can be undone (pruners do it only
                when BatchNorm recalibration follows the prune; a plain prune_ checks everything and
                computes every mask before it changes one, and copies nothing)
  ours_prune    prune_ alone (scores, allocation, selection, set_mask, the sparsity report)
  ours_clear    handle.clear_state() alone
  ours_score    magnitude_scores(model)       } the public functions prune_ is built from, each
  ours_select   topk_mask(scores, k)          } alone; prune_ also unpacks the masks from bits,
  ours_set_mask layer.set_mask(m), all layers } ranks pruned weights last, ANDs masks, reports
  torch_step    the same dense model under torch.nn.utils.prune: global_unstructured(params,
                L1Unstructured, amount) + zeroing the optimizer state at pruned positions by hand
                (state.mul_(module.weight_mask) for every state tensor shaped like the weight),
                which torch's pruning leaves to its users. global_unstructured prunes ``amount``
                among the weights its masks still keep (a float amount is a fraction of those,
                not of all weights), so the step passes the int count round(TO n) - round(FROM n).
  torch_prune   global_unstructured alone
  torch_clear   the zeroing by hand alone
  ours_train    one training step (zero_grad, forward, loss, backward, optimizer step with
                mask_optimizer's hooks) of the sparse model at FROM
  torch_train   one training step of the model under torch.nn.utils.prune at FROM (its forward
                pre-hooks rebuild weight_orig * weight_mask every call)
  dense_train   one training step of the dense model, no pruning at all

Every timed call starts from the same state: before it, outside the timed region, the weights,
masks and optimizer state are restored to those of the model at FROM (for torch: prune.remove, the
saved weight_orig copied back, prune.custom_from_mask with the saved mask; for dense_train no mask).
Both sides live side by side and are timed in rounds that interleave all methods, ours and torch
alternating, so that a slow spell of a shared machine hits each alike.
Repeated global_unstructured calls would stack PruningContainers, each keeping one more full
mask; a real run's container holds one method per step taken, of which only the newest computes,
so the time of a step does not depend on the depth, its memory does.

Models: MLPs 784-300-100-10 and 784-4096-4096-10, a small CNN on 3x32x32 inputs; on CUDA also a
stack of transformer-sized MLP blocks (residual; per block 4096x4096, 4096->11008, 11008->4096;
12 blocks in bf16 by default, fewer if they do not fit), where the selection cost shows.

Before a model is timed, one guard per optimizer ends the run (exit status 1, nothing written):
on the same architecture (the transformer stack at 1/8 width) with tie-free float32 weights
(distinct |w|), both pruning steps run from dense to FROM, then to TO (the optimizer state filled
by a step with lr 0, which leaves the weights as they are): the masks of prune_ and of
global_unstructured must be equal with exactly round(s n) pruned, the weights equal, and every
optimizer state tensor zero at every pruned position and unchanged elsewhere.

  python bench/bench_pruning_step.py                          # CUDA: MLPs, CNN, 12-block stack
  python bench/bench_pruning_step.py --device cpu             # CPU: MLPs and CNN, fp32
  python bench/bench_pruning_step.py --device cuda --models mlp-stack --layers 6
  python bench/bench_pruning_step.py --device cpu --quick --out-dir /tmp/p   # smoke test

Results: one JSON line per (model, optimizer, method) appended to
<out-dir>/pruning_step_<device>.jsonl, and the run's table rewritten to <out-dir>/pruning_step_<device>.md.
"""
import argparse
import copy
import gc
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from record import (add_run_arguments, check_run_arguments, command_line, device_slug, markdown_table,
                    results_dir, run_metadata, write_results)
from timing import Times, copy_gbps, interleaved_ms

import sparse_engine
from sparse_engine import mask_optimizer, prune_, sparse_modules, sparsify, topk_mask
from sparse_engine.pruning import magnitude_scores, restore_on_error, target_kept

BENCH = "pruning_step"
TRAIN_BATCHES = 3        # a training step cycles through this many batches
ROUNDS, REPS = 5, 3      # every method: 5 rounds of 3 timed calls, the rounds interleaving the methods
GUARD_WIDTH_DIV = 8      # the transformer stack's guard runs at 1/8 width (20M weights at 12 blocks)
# Tie-free weights: consecutive float32 bit patterns from 2^-10 up to 1 (exclusive), distinct |w|.
TIE_FREE_FIRST_BITS, TIE_FREE_END_BITS = 0x3A800000, 0x3F800000

LABELS = {
    "ours_step": "ours: prune_ + clear_state",
    "ours_restorable": "ours: the same in restore_on_error",
    "ours_prune": "ours: prune_",
    "ours_clear": "ours: clear_state",
    "ours_score": "ours: magnitude_scores",
    "ours_select": "ours: topk_mask",
    "ours_set_mask": "ours: set_mask",
    "torch_step": "torch: global_unstructured + clear",
    "torch_prune": "torch: global_unstructured",
    "torch_clear": "torch: clear by hand",
    "ours_train": "train step, sparse (ours)",
    "torch_train": "train step, torch prune hooks",
    "dense_train": "train step, dense",
}
# The training step each row is counted in: the same side's.
TRAIN_OF = {**{m: "ours_train" for m in LABELS if m.startswith("ours_")},
            **{m: "torch_train" for m in LABELS if m.startswith("torch_")}, "dense_train": "dense_train"}
TORCH_EQUIVALENT = {"ours_step": "torch_step", "ours_prune": "torch_prune", "ours_clear": "torch_clear",
                    "ours_train": "torch_train"}
STEPS = ("ours_step", "torch_step")


# ---- models --------------------------------------------------------------------------------------

class MLPBlock(nn.Module):
    """x + down(gelu(up(gelu(proj(x))))): the shapes of a transformer layer's projections."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.proj, self.up, self.down = nn.Linear(d, d), nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(F.gelu(self.proj(x)))))


def mlp(*sizes: int) -> nn.Module:
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def cnn(c1: int, c2: int, image: int, classes: int = 10) -> nn.Module:
    """conv-conv-pool twice (3x3, padding 1), then two linear layers."""
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * (image // 4) ** 2, 256), nn.ReLU(), nn.Linear(256, classes))


def stack(layers: int, d: int, f: int) -> nn.Module:
    return nn.Sequential(*(MLPBlock(d, f) for _ in range(layers)))


@dataclass(frozen=True)
class Workload:
    """A model and its data. ``make(div)`` builds it (width divided by ``div``: the guard's copy);
    inputs are ``batch`` samples of ``input_shape``; ``classes``: cross-entropy targets, or None
    for a mean squared error against a random target shaped like the input."""
    name: str
    make: Callable[[int], nn.Module]
    batch: int
    input_shape: Callable[[int], tuple[int, ...]]
    classes: Optional[int]
    dtype: torch.dtype
    guard_div: int = 1

    def batches(self, n: int, device: torch.device, div: int, dtype: torch.dtype, gen: torch.Generator):
        out = []
        for _ in range(n):
            x = torch.randn(self.batch, *self.input_shape(div), generator=gen, device=device).to(dtype)
            y = (torch.randint(0, self.classes, (self.batch,), generator=gen, device=device) if self.classes
                 else torch.randn(x.shape, generator=gen, device=device).to(dtype))
            out.append((x, y))
        return out

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float(), y) if self.classes else F.mse_loss(out.float(), y.float())


def workloads(quick: bool, layers: int) -> dict[str, Workload]:
    """By family name (``--models``): mlp, mlp-wide, cnn, mlp-stack (CUDA)."""
    fp32 = torch.float32
    if quick:
        return {
            "mlp": Workload("mlp-64-48-32-10", lambda div: mlp(64, 48, 32, 10), 16, lambda div: (64,), 10, fp32),
            "mlp-wide": Workload("mlp-64-256-256-10", lambda div: mlp(64, 256, 256, 10), 16, lambda div: (64,), 10,
                                 fp32),
            "cnn": Workload("cnn-16x16-8-16", lambda div: cnn(8, 16, 16), 4, lambda div: (3, 16, 16), 10, fp32),
            "mlp-stack": Workload(f"mlp-stack-{min(layers, 2)}x256-688",
                                  lambda div: stack(min(layers, 2), 256 // div, 688 // div), 64,
                                  lambda div: (256 // div,), None, torch.bfloat16, GUARD_WIDTH_DIV),
        }
    return {
        "mlp": Workload("mlp-784-300-100-10", lambda div: mlp(784, 300, 100, 10), 128, lambda div: (784,), 10, fp32),
        "mlp-wide": Workload("mlp-784-4096-4096-10", lambda div: mlp(784, 4096, 4096, 10), 128, lambda div: (784,),
                             10, fp32),
        "cnn": Workload("cnn-32x32-64-128", lambda div: cnn(64, 128, 32), 32, lambda div: (3, 32, 32), 10, fp32),
        "mlp-stack": Workload(f"mlp-stack-{layers}x4096-11008", lambda div: stack(layers, 4096 // div, 11008 // div),
                              4096, lambda div: (4096 // div,), None, torch.bfloat16, GUARD_WIDTH_DIV),
    }


DEFAULT_MODELS = {"cpu": ("mlp", "mlp-wide", "cnn"), "cuda": ("mlp", "mlp-wide", "cnn", "mlp-stack")}

OPTIMIZERS = {
    "adamw": lambda params, lr=1e-3: torch.optim.AdamW(params, lr=lr, weight_decay=0.01),
    "sgd": lambda params, lr=1e-2: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4),
}


def build(w: Workload, device: torch.device, seed: int, div: int = 1, dtype: Optional[torch.dtype] = None):
    """The workload's dense model, initialised from ``seed`` on ``device`` (the same weights each call)."""
    torch.manual_seed(seed)
    with torch.device(device):
        return w.make(div).to(dtype or w.dtype)


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, "weight") of every Linear and Conv2d, in module order: what both sides prune."""
    return [(m, "weight") for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d)]


# ---- the pruning steps ---------------------------------------------------------------------------

def ours_step(model: nn.Module, handle, sparsity: float) -> None:
    prune_(model, sparsity, "magnitude", "global")
    handle.clear_state()


def restorable_step(model: nn.Module, opt: torch.optim.Optimizer, handle, sparsity: float) -> None:
    with restore_on_error(model, opt):
        ours_step(model, handle, sparsity)


def torch_prune(params, amount: int) -> None:
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)


@torch.no_grad()
def torch_clear(opt: torch.optim.Optimizer, params) -> None:
    """What a user of torch.nn.utils.prune writes to keep pruned weights from moving: the state of
    weight_orig (the optimized parameter) multiplied by the mask. Unlike clear_state it cannot tell
    which layers changed, so it touches every layer; multiplying does not clear inf/NaN (masked_fill
    would, at the cost of a bool mask per layer)."""
    for module, name in params:
        p, mask = getattr(module, name + "_orig"), getattr(module, name + "_mask")
        for v in opt.state.get(p, {}).values():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                v.mul_(mask)


def torch_step(opt, params, amount: int) -> None:
    torch_prune(params, amount)
    torch_clear(opt, params)


def pruned_count(n: int, sparsity: float) -> int:
    return n - target_kept(n, sparsity)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, w: Workload, batches) -> Callable[[int], None]:
    def step(i: int) -> None:
        x, y = batches[i]
        opt.zero_grad(set_to_none=True)
        w.loss(model(x), y).backward()
        opt.step()
    return step


@torch.no_grad()
def state_tensors(opt: torch.optim.Optimizer) -> dict:
    """A copy of every tensor of the optimizer state (AdamW's step count included)."""
    return {p: {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)} for p, s in opt.state.items()}


@torch.no_grad()
def restore_state(opt: torch.optim.Optimizer, saved: dict) -> None:
    """The saved state back, and the gradients dropped (memory only: no step timed here reads them)."""
    opt.zero_grad(set_to_none=True)
    for p, s in saved.items():
        for k, v in s.items():
            opt.state[p][k].copy_(v)


# ---- correctness guard ---------------------------------------------------------------------------

@torch.no_grad()
def set_tie_free_weights_(model: nn.Module, seed: int) -> None:
    """Weights with distinct |w| across all prunable layers: consecutive float32 bit patterns from
    2^-10 up, in random order, with random signs (magnitude pruning must ignore the sign)."""
    weights = [getattr(m, name) for m, name in prunable(model)]
    n = sum(p.numel() for p in weights)
    if n > TIE_FREE_END_BITS - TIE_FREE_FIRST_BITS:
        raise ValueError(f"set_tie_free_weights_: at most {TIE_FREE_END_BITS - TIE_FREE_FIRST_BITS} weights, got {n}")
    gen = torch.Generator().manual_seed(seed)
    bits = (torch.randperm(n, generator=gen) + TIE_FREE_FIRST_BITS).to(torch.int32)
    values = bits.view(torch.float32) * (torch.randint(0, 2, (n,), generator=gen) * 2 - 1)
    for p, v in zip(weights, values.split([p.numel() for p in weights])):
        p.copy_(v.view_as(p))


def state_problems(side: str, opt, params: list[torch.Tensor], masks: list[torch.Tensor], before: dict) -> list[str]:
    """Every state tensor shaped like a weight is zero where pruned and as before where kept."""
    problems = []
    for i, (p, keep) in enumerate(zip(params, masks)):
        for k, v in opt.state[p].items():
            if not isinstance(v, torch.Tensor) or v.shape != p.shape:
                continue
            if (v[~keep] != 0).any():
                problems.append(f"{side}: layer {i} state '{k}' nonzero at {int((v[~keep] != 0).sum())} pruned weights")
            if not torch.equal(v[keep], before[p][k][keep]):
                problems.append(f"{side}: layer {i} state '{k}' changed at kept weights")
    return problems


def check_step(w: Workload, opt_name: str, s_from: float, s_to: float, device: torch.device, seed: int) -> None:
    """The guard of the module docstring; ends the run on any mismatch."""
    dense = build(w, device, seed, div=w.guard_div, dtype=torch.float32)
    set_tie_free_weights_(dense, seed)
    ours = sparsify(copy.deepcopy(dense))
    ours_opt = OPTIMIZERS[opt_name](ours.parameters(), lr=0.0)
    handle = mask_optimizer(ours_opt, ours)
    params = prunable(dense)
    ref_opt = OPTIMIZERS[opt_name](dense.parameters(), lr=0.0)
    batch = w.batches(1, device, w.guard_div, torch.float32, torch.Generator(device=device).manual_seed(seed))
    for model, opt in ((ours, ours_opt), (dense, ref_opt)):
        train_step(model, opt, w, batch)(0)  # fills the optimizer state; lr 0 leaves the weights as they are
    layers = [m for _, m in sparse_modules(ours)]
    n = sum(m.weight.numel() for m in layers)
    done = 0
    for s in ([s_from] if s_from > 0 else []) + [s_to]:
        ours_before, ref_before = state_tensors(ours_opt), state_tensors(ref_opt)
        ours_step(ours, handle, s)
        torch_step(ref_opt, params, pruned_count(n, s) - done)
        done = pruned_count(n, s)
        ours_masks = [m.mask for m in layers]
        ref_masks = [m.weight_mask != 0 for m, _ in params]
        problems = [f"layer {i}: {int((a != b).sum())} of {a.numel()} mask entries differ"
                    for i, (a, b) in enumerate(zip(ours_masks, ref_masks)) if not torch.equal(a, b)]
        kept = sum(int(m.sum()) for m in ours_masks)
        if kept != target_kept(n, s):
            problems.append(f"prune_ kept {kept} weights, expected {target_kept(n, s)}")
        problems += [f"layer {i}: weights differ" for i, (a, (m, _)) in enumerate(zip(layers, params))
                     if not torch.equal(a.weight, m.weight)]
        problems += state_problems("ours", ours_opt, [m.weight for m in layers], ours_masks, ours_before)
        problems += state_problems("torch", ref_opt, [m.weight_orig for m, _ in params], ref_masks, ref_before)
        if problems:
            sys.exit(f"CORRECTNESS GUARD FAILED ({w.name}, {opt_name}, step to sparsity {s:g}, tie-free weights "
                     f"at 1/{w.guard_div} width, n={n}): " + "; ".join(problems[:5])
                     + ". Nothing was written: timings of a wrong pruning step are not reported.")


# ---- timing --------------------------------------------------------------------------------------

@dataclass
class Method:
    """A timed call ``step(i)`` over ``n_sets`` input sets, and what restores its state before each
    call, outside the timed region."""
    step: Callable[[int], object]
    before: Callable[[], object]
    n_sets: int = 1


def ours_methods(w: Workload, opt_name: str, s_from: float, s_to: float, device: torch.device,
                 seed: int) -> dict[str, Method]:
    """The sparse model at ``s_from`` with its optimizer state, and the calls timed on it."""
    model = sparsify(build(w, device, seed))
    opt = OPTIMIZERS[opt_name](model.parameters())
    handle = mask_optimizer(opt, model)
    layers = [m for _, m in sparse_modules(model)]
    batches = w.batches(TRAIN_BATCHES, device, 1, w.dtype, torch.Generator(device=device).manual_seed(seed))
    train = train_step(model, opt, w, batches)
    if s_from > 0:
        ours_step(model, handle, s_from)
    train(0)  # the optimizer state exists from the first step on
    with torch.no_grad():
        weights, masks = [m.weight.clone() for m in layers], [m.mask for m in layers]
    state = state_tensors(opt)

    @torch.no_grad()
    def restore():
        for m, wt, mask in zip(layers, weights, masks):
            m.set_mask(mask)  # a new mask version: clear_state will clear every layer
            m.weight.copy_(wt)
        restore_state(opt, state)

    k = target_kept(sum(m.weight.numel() for m in layers), s_to)
    prune_(model, s_to, "magnitude", "global")
    new_masks = [m.mask for m in layers]
    scores = []  # computed before each selection, released by it: no GB of scores held meanwhile

    def set_masks(i):
        for m, mask in zip(layers, new_masks):
            m.set_mask(mask)

    return {
        "ours_step": Method(lambda i: ours_step(model, handle, s_to), restore),
        "ours_restorable": Method(lambda i: restorable_step(model, opt, handle, s_to), restore),
        "ours_prune": Method(lambda i: prune_(model, s_to, "magnitude", "global"), restore),
        "ours_clear": Method(lambda i: handle.clear_state(), restore),
        "ours_score": Method(lambda i: magnitude_scores(model), restore),
        "ours_select": Method(lambda i: topk_mask(scores.pop(), k),
                              lambda: (restore(), scores.append(list(magnitude_scores(model).values())))),
        "ours_set_mask": Method(set_masks, restore),
        "ours_train": Method(train, restore, TRAIN_BATCHES),
    }


def torch_methods(w: Workload, opt_name: str, s_from: float, s_to: float, device: torch.device,
                  seed: int) -> dict[str, Method]:
    """The same dense model under torch.nn.utils.prune at ``s_from``, and the calls timed on it."""
    model = build(w, device, seed)
    params = prunable(model)
    opt = OPTIMIZERS[opt_name](model.parameters())  # the weights: the parameters prune renames weight_orig
    batches = w.batches(TRAIN_BATCHES, device, 1, w.dtype, torch.Generator(device=device).manual_seed(seed))
    train = train_step(model, opt, w, batches)
    n = sum(getattr(m, name).numel() for m, name in params)
    if s_from > 0:
        torch_step(opt, params, pruned_count(n, s_from))
    train(0)
    with torch.no_grad():
        weights = [getattr(m, name + "_orig" if s_from > 0 else name).clone() for m, name in params]
        masks = [m.weight_mask != 0 for m, _ in params] if s_from > 0 else None
    state = state_tensors(opt)
    amount = pruned_count(n, s_to) - pruned_count(n, s_from)

    def restore(pruned: bool = True):
        for i, (m, name) in enumerate(params):
            if prune.is_pruned(m):
                prune.remove(m, name)  # weight_orig becomes the parameter `weight` again (the same object)
            with torch.no_grad():
                getattr(m, name).copy_(weights[i])
            if pruned and masks is not None:
                prune.custom_from_mask(m, name, mask=masks[i])
        restore_state(opt, state)

    def restore_with_masks():  # clearing by hand needs masks to clear by, also from a dense model
        restore()
        if masks is None:
            torch_prune(params, amount)

    return {
        "torch_step": Method(lambda i: torch_step(opt, params, amount), restore),
        "torch_prune": Method(lambda i: torch_prune(params, amount), restore),
        "torch_clear": Method(lambda i: torch_clear(opt, params), restore_with_masks),
        "torch_train": Method(train, restore, TRAIN_BATCHES),
        "dense_train": Method(train, lambda: restore(pruned=False), TRAIN_BATCHES),
    }


# Within a round, ours and torch alternate, so that a slow spell of a shared machine hits both.
ROUND_ORDER = ("ours_step", "torch_step", "ours_restorable", "ours_train", "torch_train", "dense_train", "ours_prune", "torch_prune",
               "ours_clear", "torch_clear", "ours_score", "ours_select", "ours_set_mask")


def measure(methods: dict[str, Method], device: torch.device, quick: bool) -> dict[str, Times]:
    """Per method, the median over ``ROUNDS`` rounds of each round's median (``REPS`` calls after a
    warm-up call in the first round), with the 20th and 80th percentiles of the round medians.
    Host clock, synchronized on CUDA (the markdown's notes say why not do_bench)."""
    rounds, reps = (1, 3) if quick else (ROUNDS, REPS)  # as main() records them
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    return interleaved_ms({name: (methods[name].step, methods[name].n_sets, lambda i, m=methods[name]: m.before())
                           for name in ROUND_ORDER}, rounds, reps, sync)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---- one case ------------------------------------------------------------------------------------

def state_tensor_count(opt_name: str) -> int:
    return {"adamw": 2, "sgd": 1}[opt_name]  # exp_avg + exp_avg_sq; momentum_buffer


def bench_case(w: Workload, opt_name: str, device: torch.device, args, meta: dict) -> list[dict]:
    s_from, s_to = args.sparsity
    check_step(w, opt_name, s_from, s_to, device, args.seed)
    free(device)
    methods = ours_methods(w, opt_name, s_from, s_to, device, args.seed)
    methods.update(torch_methods(w, opt_name, s_from, s_to, device, args.seed))
    times = measure(methods, device, args.quick)
    del methods
    free(device)

    model = build(w, torch.device("meta"), args.seed)
    n = sum(getattr(m, name).numel() for m, name in prunable(model))
    total = sum(p.numel() for p in model.parameters())
    es = torch.finfo(w.dtype).bits // 8
    # Fewest bytes of a step: read the weights once, write the mask bits, read and write each
    # optimizer state tensor once (state is kept in the weights' dtype).
    floor_bytes = n * es + math.ceil(n / 8) + 2 * state_tensor_count(opt_name) * n * es
    floor_ms = floor_bytes / (meta["copy_gbps"] * 1e6)
    rows = []
    for name, t in times.items():
        row = {
            **meta, "bench": BENCH, "model": w.name, "method": name, "label": LABELS[name],
            "weights": n, "params": total, "dtype": str(w.dtype).removeprefix("torch."), "batch": w.batch,
            "optimizer": opt_name, "sparsity_from": s_from, "sparsity_to": s_to,
            "pruned_by_step": pruned_count(n, s_to) - pruned_count(n, s_from),
            "ms": t.median, "ms_p20": t.p20, "ms_p80": t.p80,
            "train_steps": t.median / times[TRAIN_OF[name]].median,
            "dense_train_steps": t.median / times["dense_train"].median,
            "speedup_vs_torch": (times[TORCH_EQUIVALENT[name]].median / t.median
                                 if name in TORCH_EQUIVALENT else None),
            "floor_bytes": floor_bytes if name in STEPS else None,
            "gbps": floor_bytes / t.median / 1e6 if name in STEPS else None,
            "x_floor": t.median / floor_ms if name in STEPS else None,
        }
        rows.append(row)
    order = list(LABELS)
    return sorted(rows, key=lambda r: order.index(r["method"]))


# ---- reporting -----------------------------------------------------------------------------------

def fmt(v, spec) -> Optional[str]:
    return None if v is None else format(v, spec)


COLUMNS = [
    ("model", lambda r: r["model"]),
    ("weights", lambda r: f"{r['weights']:.3g}"),
    ("dtype", lambda r: r["dtype"]),
    ("optimizer", lambda r: r["optimizer"]),
    ("sparsity", lambda r: f"{r['sparsity_from']:g}→{r['sparsity_to']:g}"),
    ("method", lambda r: r["label"]),
    ("ms", lambda r: f"{r['ms']:.4g}"),
    ("spread %", lambda r: f"{100 * (r['ms_p80'] - r['ms_p20']) / r['ms']:.1f}"),
    ("= train steps (same side)", lambda r: f"{r['train_steps']:.3g}"),
    ("= dense train steps", lambda r: f"{r['dense_train_steps']:.3g}"),
    ("speedup vs torch", lambda r: fmt(r["speedup_vs_torch"], ".3g")),
    ("GB/s", lambda r: fmt(r["gbps"], ".3g")),
    ("x floor", lambda r: fmt(r["x_floor"], ".3g")),
]


def summary_lines(rows: list[dict]) -> list[str]:
    """One line per (model, optimizer): the headline ratios, and the phases of ours."""
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["optimizer"]), {})[r["method"]] = r
    lines = []
    for (model, opt), m in by.items():
        ours, ref = m["ours_step"], m["torch_step"]
        case = f"{model} {opt} {ours['sparsity_from']:g}→{ours['sparsity_to']:g}"
        lines.append(f"{case}: a pruning step costs {ours['train_steps']:.3g} sparse training steps with ours "
                     f"({ours['ms']:.4g} ms), {ref['train_steps']:.3g} training steps under torch.nn.utils.prune "
                     f"({ref['ms']:.4g} ms): torch ms / ours ms = {ours['speedup_vs_torch']:.3g}; in dense training steps "
                     f"{ours['dense_train_steps']:.3g} vs {ref['dense_train_steps']:.3g}")
        lines.append(f"{case}: restore_on_error around the step (a copy of the weights, buffers and optimizer state "
                     f"first) takes it from {ours['ms']:.4g} ms to {m['ours_restorable']['ms']:.4g} ms "
                     f"({m['ours_restorable']['ms'] / ours['ms']:.3g}x); prune_ alone copies nothing")
        parts = sum(m[p]["ms"] for p in ("ours_score", "ours_select", "ours_set_mask"))
        lines.append(f"{case}: ours' phases (ms): score {m['ours_score']['ms']:.3g}, select "
                     f"{m['ours_select']['ms']:.3g}, set_mask {m['ours_set_mask']['ms']:.3g}, rest of prune_ "
                     f"{m['ours_prune']['ms'] - parts:.3g} (masks unpacked from bits, pruned ranked last, ANDed with "
                     f"the current ones, counts, report), clear_state {m['ours_clear']['ms']:.3g}; torch: global_unstructured "
                     f"{m['torch_prune']['ms']:.3g}, clear by hand {m['torch_clear']['ms']:.3g}")
    return lines


def markdown(rows: list[dict], meta: dict, command: str) -> str:
    cuda = meta["device_type"] == "cuda"
    timer = ("time.perf_counter between torch.cuda.synchronize() calls: a pruning step needs its state restored "
             "before every call outside the timed region, for which do_bench has no place, and waits on the "
             "device itself (counts); training steps use the same timer, so that their ratios compare like with "
             "like" if cuda else "time.perf_counter around each call")
    return "\n".join([
        f"# pruning step benchmark: {meta['device']}",
        "",
        f"- date {meta['date']}, git {meta['git_sha']}, torch {meta['torch']}, triton {meta['triton']}, "
        f"sparse_engine {meta['sparse_engine']}"
        + (f", CUDA {meta['cuda']}" if cuda else f", {meta['cpu_threads']} CPU threads"),
        f"- command: `{command}`",
        *([] if cuda else [f"- host load average (1 min): {meta['load_avg_1min']:.2f} at the start, "
                           f"{meta['load_avg_1min_end']:.2f} at the end, on {meta['cpu_count']} CPUs (a load near "
                           "or above the CPU count means other processes competed for the cores: read the spreads)"]),
        f"- ceiling, measured once before the table: copy {meta['copy_gbps']:.4g} GB/s (bytes read + written)",
        "- a pruning step: magnitude scores, one global selection, masks set and newly pruned weights zeroed, "
        "optimizer state cleared at pruned positions; ours = `prune_(model, s, \"magnitude\", \"global\")` + "
        "`handle.clear_state()` (mask_optimizer); torch = `prune.global_unstructured(params, L1Unstructured, "
        "amount)` (amount: the int count to prune among the unpruned) + `state.mul_(weight_mask)` by hand for "
        "every state tensor of weight_orig",
        "- every pruning call starts from the model at the first sparsity: weights, masks and optimizer state "
        "restored before it, outside the timed region (torch: prune.remove, weight_orig copied back, "
        "custom_from_mask), so PruningContainers do not pile up",
        f"- ms: median over {meta['rounds']} round(s) of each round's median of {meta['reps']} calls, after one "
        "warm-up call; the rounds interleave all methods of a model, ours and torch alternating, so that a slow "
        f"spell of a shared machine hits each alike; {timer}",
        "- = train steps (same side): this row's ms / one training step (forward, backward, optimizer step) of "
        "the same side's model at the first sparsity: ours' sparse model, or the model under torch's prune "
        "hooks; = dense train steps: over the dense model's training step",
        "- speedup vs torch: the torch row's ms / ours (step, prune, clear, training step)",
        "- GB/s and x floor (step rows): the fewest bytes of a step (weights read once, mask bits written, each "
        "optimizer state tensor read and written once) over the time, and the time over those bytes at the copy "
        "bandwidth",
        "- spread % = (80th - 20th percentile) / median of the round medians (of the calls, with one round); a "
        "ratio nearer 1 than the spreads of its rows is noise" + ("" if cuda else "; the CPU cores may be shared "
                                                                      "with other work"),
        "- correctness, checked before timing: on tie-free weights of the same architecture (the transformer "
        "stack at 1/8 width) ours and torch's masks equal after each step, weights equal, optimizer state zero "
        "where pruned and unchanged where kept",
        "",
        markdown_table(rows, COLUMNS),
        "",
        "## Summary (measured in this run)",
        "",
        *(f"- {line}" for line in summary_lines(rows)),
        "",
    ])


# ---- command line --------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, quick="tiny models")
    p.add_argument("--models", nargs="+", choices=DEFAULT_MODELS["cuda"],
                   help="default: mlp mlp-wide cnn, and mlp-stack on CUDA")
    p.add_argument("--optimizers", nargs="+", choices=tuple(OPTIMIZERS), default=list(OPTIMIZERS))
    p.add_argument("--sparsity", nargs=2, type=float, default=[0.5, 0.6], metavar=("FROM", "TO"),
                   help="the step prunes the model from FROM to TO (default 0.5 0.6)")
    p.add_argument("--layers", type=int, default=12, help="blocks of the transformer-sized MLP stack (default 12; "
                   "fewer are tried when they do not fit in memory)")
    args = p.parse_args(argv)
    check_run_arguments(p, args)
    if args.layers < 1:
        p.error(f"--layers: expected a positive count, got {args.layers}")
    s_from, s_to = args.sparsity
    if not 0 <= s_from < s_to < 1:
        p.error(f"--sparsity: expected 0 <= FROM < TO < 1, got {s_from} {s_to}")
    args.models = args.models or list(DEFAULT_MODELS[args.device])
    if args.device == "cpu" and "mlp-stack" in args.models and not args.quick:
        p.error("--models mlp-stack: the transformer-sized stack is for CUDA (bf16, 1e9 weights)")
    return args


def run_model(family: str, opt_name: str, device: torch.device, args, meta: dict) -> list[dict]:
    """The rows of one model and optimizer; the transformer stack shrinks by a third per OOM."""
    layers = args.layers
    while True:
        w = workloads(args.quick, layers)[family]
        try:
            return bench_case(w, opt_name, device, args, meta)
        except torch.OutOfMemoryError:
            if family != "mlp-stack" or layers == 1:
                raise
        free(device)  # outside the except block: the traceback no longer holds the failed case's tensors
        layers = max(1, layers * 2 // 3)
        print(f"{w.name}: out of memory, trying {layers} blocks", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = results_dir(args.out_dir, args.quick, BENCH)
    command = command_line("bench_pruning_step.py", argv)

    meta = run_metadata(device)
    meta["sparse_engine"] = sparse_engine.__version__
    meta["quick"] = args.quick
    meta["load_avg_1min"] = os.getloadavg()[0]
    meta["cpu_count"] = os.cpu_count()
    meta["timer"] = "perf_counter+cuda_sync" if device.type == "cuda" else "perf_counter"
    meta["rounds"], meta["reps"] = (1, 3) if args.quick else (ROUNDS, REPS)
    meta["copy_gbps"] = copy_gbps(device, (1 << 30 if device.type == "cuda" else 256 << 20) >> (4 if args.quick else 0),
                                  quick=args.quick)
    print(f"{meta['device']}: copy {meta['copy_gbps']:.4g} GB/s (read + written)", flush=True)

    rows = []
    for family in args.models:
        for opt_name in args.optimizers:
            print(f"{family} {opt_name}", flush=True)
            rows += run_model(family, opt_name, device, args, meta)
    meta["load_avg_1min_end"] = os.getloadavg()[0]
    for r in rows:
        r["load_avg_1min_end"] = meta["load_avg_1min_end"]
    write_results(out_dir, f"{BENCH}_{device_slug(device)}", rows, markdown(rows, meta, command))


if __name__ == "__main__":
    main()
