"""Benchmark of one RigL mask update: ours against the plain-torch version of the same update, in
the same run, and against a training step.

A RigL update (Evci et al. 2020) at sparsity 0.9 with ERK masks and drop fraction 0.3: one dense
forward and backward on a batch for the gradient of the pruned weights, then in every layer drop
the 30% of kept weights with the smallest |w| and grow as many where |g| is largest among the
positions not kept, zero the grown weights and their optimizer state. Timed in the same run:

  ours_update   RigL.update(0.3): gradient_scores (dense pass on leaves sharing the weights'
                storage) + drop_and_grow_ (two grouped topk_mask calls over all layers: radix select,
                no sort, no concatenation) + set_mask + state clearing
  ref_update    the same with drop_and_grow_(reference=True): each layer sorted in plain torch
                (torch.sort, stable, as RigL's reference code sorts the whole layer), the same masks
  ours_select   drop_and_grow_masks alone, on the scores of the update
  ref_select    drop_and_grow_masks_ref alone (the plain-torch selection)
  grad          gradient_scores alone (the dense pass both updates share)
  train_step    one training step of the sparse model (zero_grad, forward, loss, backward, SGD step
                with mask_optimizer's hooks)

Every timed call starts from the same state: weights, masks and optimizer state are restored
before it, outside the timed region. Methods are timed in rounds that interleave them, so a slow
spell of a shared machine hits each alike. Before timing, a guard (exit status 1, nothing written)
checks that ours and the reference give identical masks, weights and optimizer state.

  python bench/bench_dst.py --device cpu                    # MLP 784-300-100-10, MLP 784-4096-4096-10, CNN
  python bench/bench_dst.py --device cuda                   # the same and ResNet-18 on 3x32x32
  python bench/bench_dst.py --device cpu --quick --out-dir /tmp/d   # smoke test

Results: one JSON line per (model, method) appended to <out-dir>/dst_<device>.jsonl, and the run's
table rewritten to <out-dir>/dst_<device>.md.
"""
import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from record import (add_run_arguments, check_run_arguments, command_line, device_slug, markdown_table,
                    results_dir, run_metadata, write_results)
from timing import Times, interleaved_ms

from sparse_engine import sparse_modules, sparsify
from sparse_engine.models import fashion_cnn, resnet18
from sparse_engine.pruning import RigL, drop_and_grow_, drop_and_grow_masks, drop_and_grow_masks_ref, drop_counts
from sparse_engine.pruning.select import gradient_scores

BENCH = "dst"
SPARSITY, DROP, DELTA_T = 0.9, 0.3, 100
ROUNDS, REPS = 5, 3
LABELS = {
    "ours_update": "ours: RigL update (gradient + topk_mask selection)",
    "ref_update": "plain torch: RigL update (gradient + sorted selection)",
    "ours_select": "ours: drop-and-grow selection",
    "ref_select": "plain torch: drop-and-grow selection",
    "grad": "dense gradient pass",
    "train_step": "train step, sparse",
}
REFERENCE = {"ours_update": "ref_update", "ours_select": "ref_select"}


@dataclass
class Workload:
    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple
    batch: int


def mlp(*sizes: int) -> nn.Module:
    layers = [nn.Flatten()]
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def workloads(quick: bool, device: torch.device) -> list[Workload]:
    if quick:
        return [Workload("mlp-64-48-32-10", lambda: mlp(64, 48, 32, 10), (64,), 16),
                Workload("mlp-64-256-256-10", lambda: mlp(64, 256, 256, 10), (64,), 16)]
    out = [Workload("mlp-784-300-100-10", lambda: mlp(784, 300, 100, 10), (1, 28, 28), 128),
           Workload("mlp-784-4096-4096-10", lambda: mlp(784, 4096, 4096, 10), (1, 28, 28), 128),
           Workload("cnn-fashion", fashion_cnn, (1, 28, 28), 128)]
    if device.type == "cuda":
        out.append(Workload("resnet18", resnet18, (3, 32, 32), 128))
    return out


class Case:
    """A sparse model at SPARSITY with its RigL pruner and a saved state to restore before every call."""

    def __init__(self, w: Workload, device: torch.device, seed: int):
        torch.manual_seed(seed)
        self.model = sparsify(w.make()).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(seed)
        self.batches = [(torch.randn(w.batch, *w.input_shape, generator=g).to(device),
                         torch.randint(0, 10, (w.batch,), generator=g).to(device)) for _ in range(2)]
        self.pruner = RigL(self.model, self.opt, SPARSITY, total_steps=100 * DELTA_T, loss_fn=F.cross_entropy,
                           data=self.batches[0], delta_t=DELTA_T, drop_fraction=DROP)
        self.train(1)  # momentum buffers exist, as they do mid-run
        self.layers = [m for _, m in sparse_modules(self.model)]
        self.saved = self.save()
        self.saved["masks"] = [m.clone() for m in self.saved["masks"]]

    def train(self, i: int) -> None:
        x, y = self.batches[i % len(self.batches)]
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()
        self.opt.step()

    @torch.no_grad()
    def save(self) -> dict:
        return {"tensors": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "masks": [m.mask for m in self.layers],
                "opt": {p: {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
                        for p, s in self.opt.state.items()}}

    @torch.no_grad()
    def restore(self) -> None:
        own = self.model.state_dict(keep_vars=True)
        for k, v in self.saved["tensors"].items():
            own[k].copy_(v)
        for m, mask in zip(self.layers, self.saved["masks"]):
            m.set_mask(mask)
        self.opt.zero_grad(set_to_none=True)
        for p, s in self.saved["opt"].items():
            for k, v in s.items():
                self.opt.state[p][k].copy_(v)

    def selection_inputs(self) -> tuple:
        masks = [m.mask for m in self.layers]
        grads = gradient_scores(self.model, loss_fn=F.cross_entropy, data=self.batches[0])
        grow = [grads[n] for n, _ in sparse_modules(self.model)]
        return masks, [m.weight.detach().abs() for m in self.layers], grow, drop_counts(
            [int(m.sum()) for m in masks], DROP)

    def ref_update(self) -> None:
        drop_and_grow_(self.layers, self.pruner.grow_scores(), DROP, self.opt, reference=True)

    def methods(self) -> dict[str, Callable[[int], object]]:
        inputs = self.selection_inputs()
        return {
            "ours_update": lambda i: self.pruner.update(DROP),
            "ref_update": lambda i: self.ref_update(),
            "ours_select": lambda i: drop_and_grow_masks(*inputs),
            "ref_select": lambda i: drop_and_grow_masks_ref(*inputs),
            "grad": lambda i: gradient_scores(self.model, loss_fn=F.cross_entropy, data=self.batches[0]),
            "train_step": self.train,
        }


def check(case: Case) -> None:
    """Ours and the reference leave identical masks, weights and optimizer state; exit 1 if not."""
    results = []
    for update in (lambda: case.pruner.update(DROP), case.ref_update):
        case.restore()
        update()
        results.append(case.save())
    case.restore()
    ours, ref = results
    problems = [k for k, v in ref["tensors"].items() if not torch.equal(ours["tensors"][k], v)]
    problems += [f"mask {i}" for i, (a, b) in enumerate(zip(ours["masks"], ref["masks"])) if not torch.equal(a, b)]
    problems += [f"optimizer state {k}" for p, s in ref["opt"].items() for k, v in s.items()
                 if not torch.equal(ours["opt"][p][k], v)]
    changed = sum(int((a != b).sum()) for a, b in zip(ours["masks"], case.saved["masks"]))
    if not changed:
        problems.append("the update changed no mask")
    if problems:
        print(f"guard failed: ours and the plain-torch RigL update differ at {problems[:6]}", file=sys.stderr)
        sys.exit(1)


def measure(case: Case, device: torch.device, quick: bool) -> dict[str, Times]:
    rounds, reps = (1, 3) if quick else (ROUNDS, REPS)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    return interleaved_ms({name: (step, 1, lambda i: case.restore()) for name, step in case.methods().items()},
                          rounds, reps, sync)


def bench_case(w: Workload, device: torch.device, args, meta: dict) -> list[dict]:
    case = Case(w, device, args.seed)
    check(case)
    times = measure(case, device, args.quick)
    n = sum(m.weight.numel() for m in case.layers)
    rows = []
    for name, t in times.items():
        ref = REFERENCE.get(name)
        rows.append({
            **meta, "bench": BENCH, "model": w.name, "method": name, "label": LABELS[name], "weights": n,
            "batch": w.batch, "sparsity": SPARSITY, "drop_fraction": DROP, "delta_t": DELTA_T,
            "ms": t.median, "ms_p20": t.p20, "ms_p80": t.p80,
            "train_steps": t.median / times["train_step"].median,
            "speedup_vs_plain_torch": times[ref].median / t.median if ref else None,
            # an update every delta_t steps, as a share of the delta_t training steps between updates
            "overhead_pct": 100 * t.median / (DELTA_T * times["train_step"].median)
            if name.endswith("_update") else None,
        })
    return rows


def fmt(v, spec):
    return None if v is None else format(v, spec)


COLUMNS = [
    ("model", lambda r: r["model"]),
    ("weights", lambda r: f"{r['weights']:.3g}"),
    ("method", lambda r: r["label"]),
    ("ms", lambda r: f"{r['ms']:.4g}"),
    ("spread %", lambda r: f"{100 * (r['ms_p80'] - r['ms_p20']) / r['ms']:.1f}"),
    ("= train steps", lambda r: f"{r['train_steps']:.3g}"),
    ("speedup vs plain torch", lambda r: fmt(r["speedup_vs_plain_torch"], ".3g")),
    (f"overhead at delta_t={DELTA_T} (%)", lambda r: fmt(r["overhead_pct"], ".3g")),
]


def markdown(rows: list[dict], meta: dict, command: str) -> str:
    summary = []
    for model in dict.fromkeys(r["model"] for r in rows):
        m = {r["method"]: r for r in rows if r["model"] == model}
        summary.append(f"{model}: a RigL update costs {m['ours_update']['train_steps']:.3g} training steps with ours "
                       f"({m['ours_update']['ms']:.4g} ms) and {m['ref_update']['train_steps']:.3g} with the "
                       f"plain-torch selection ({m['ref_update']['ms']:.4g} ms); the selection alone "
                       f"{m['ours_select']['ms']:.3g} ms vs {m['ref_select']['ms']:.3g} ms "
                       f"(x{m['ours_select']['speedup_vs_plain_torch']:.3g}); the dense gradient pass "
                       f"{m['grad']['ms']:.3g} ms")
    return "\n".join([
        f"# RigL update benchmark: {meta['device']}",
        "",
        f"- date {meta['date']}, git {meta['git_sha']}, torch {meta['torch']}, triton {meta['triton']}"
        + (f", CUDA {meta['cuda']}" if meta["device_type"] == "cuda" else f", {meta['cpu_threads']} CPU threads"),
        f"- command: `{command}`",
        f"- host load average (1 min) at the start: {meta['load_avg_1min']:.2f} on {meta['cpu_count']} CPUs",
        f"- update: sparsity {SPARSITY}, ERK masks, drop fraction {DROP}, SGD with momentum; every call restored "
        "to the same weights, masks and optimizer state outside the timed region",
        f"- ms: median over {meta['rounds']} round(s) of each round's median of {meta['reps']} calls (the rounds "
        "interleave the methods); spread % = (80th - 20th percentile) / median",
        "- correctness, checked before timing: ours and the plain-torch update leave identical masks, weights "
        "and optimizer state",
        "",
        markdown_table(rows, COLUMNS),
        "",
        "## Summary (measured in this run)",
        "",
        *(f"- {line}" for line in summary),
        "",
    ])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, quick="tiny MLPs")
    args = p.parse_args(argv)
    check_run_arguments(p, args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out_dir = results_dir(args.out_dir, args.quick, BENCH)
    command = command_line("bench_dst.py", argv)
    meta = run_metadata(device)
    meta.update(quick=args.quick, load_avg_1min=os.getloadavg()[0], cpu_count=os.cpu_count(),
                rounds=1 if args.quick else ROUNDS, reps=3 if args.quick else REPS, timer="perf_counter")
    rows = []
    for w in workloads(args.quick, device):
        print(f"{w.name} ...", flush=True)
        rows += bench_case(w, device, args, meta)
    write_results(out_dir, f"{BENCH}_{device_slug(device)}", rows, markdown(rows, meta, command))


if __name__ == "__main__":
    main()
