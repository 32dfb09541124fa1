"""Benchmark of one training step of whole models: dense, this library at 90%, torch.nn.utils.prune at 90%.

A training step is zero_grad, forward, cross-entropy loss, backward and an AdamW step. Methods,
each timed in the same run on the same inputs, interleaved in rounds:

  dense   the dense model: the floor
  ours    sparse_engine.sparsify + prune_(model, 0.9) (global magnitude) + mask_optimizer
  prune   torch.nn.utils.prune.global_unstructured (L1, 0.9) on the same weights: what users run
          today (its forward pre-hooks rebuild weight_orig * weight_mask every call)

Models (CPU default shapes): the demo MLP 784-300-100-10 (batch 128), the demo CNN (batch 128),
MLP 1024-4096-1024-10 (batch 256), ResNet-18 with the CIFAR stem (batch 8, 3x32x32) and the
2-layer transformer encoder of sparse_engine.models (batch 32, 32 tokens) and its 2-layer LSTM
classifier (batch 32, 32 tokens; every LSTM weight matrix masked); their embeddings are left dense:
at initialisation the N(0, 1) entries would take all the kept weights. Each runs with one
thread and with torch's default thread count (--quick: one thread; --threads: that count only).

Masks are chosen at initialisation, where global magnitude empties some layers (ResNet-18's last
blocks, whose fan-in is largest); none of the three methods' work depends on which weights are kept.

Optimizers (--optimizers, default both): "adamw", torch.optim.AdamW as constructed by default
(its single-tensor implementation on CPU), and "adamw-fused", AdamW(fused=True). torch's CPU sqrt
runs several times slower on exact zeros than on other values, and a pruned model's second moments
are exact zeros at every pruned weight (ours and torch prune's alike), so the default AdamW step of
a pruned model costs more than the dense model's; the fused kernel does not slow down on zeros.

Our masked ops choose their implementation by measurement (sparse_engine.ops.dispatch) during the
warm-up; the table counts the choices made.

Before timing, a guard (exit status 1, nothing written) checks that ours and torch's prune chose
the same number of weights and that their forwards agree; after timing, that our pruned weights
are still exact zeros.

  python bench/bench_models.py --device cpu                   # all models, 1 and default threads
  python bench/bench_models.py --device cpu --models mlp resnet18 --threads 1
  python bench/bench_models.py --device cpu --quick --out-dir /tmp/m   # smoke test, tiny shapes

Results: one JSON line per (model, threads, method) appended to <out-dir>/models_<device>.jsonl,
and the run's table rewritten to <out-dir>/models_<device>.md.
"""
import argparse
import copy
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from record import (add_run_arguments, check_run_arguments, command_line, device_slug, markdown_table,
                    results_dir, run_metadata, write_results)
from timing import interleaved_rounds_ms, paired_ratio, round_times

from sparse_engine import mask_optimizer, prune_, sparse_modules, sparsify
from sparse_engine.models import example_batch, fashion_cnn, fashion_mlp, lstm, resnet18, transformer
from sparse_engine.nn.masked_module import MaskedWeight
from sparse_engine.ops import dispatch

BENCH = "models"
SPARSITY = 0.9
# name -> torch.optim.AdamW keyword arguments (the same for the three methods).
OPTIMIZERS = {"adamw": dict(lr=1e-3), "adamw-fused": dict(lr=1e-3, fused=True)}
ROUNDS, REPS = 15, 3
N_SETS = 2
LABELS = {"dense": "dense", "ours": "sparse_engine", "prune": "torch.nn.utils.prune"}
# The CPU goal, checked on this run's numbers: ours <= 1.10x dense and <= torch prune.
GOAL_OVER_DENSE = 1.10


def mlp(*widths: int) -> nn.Module:
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


@dataclass
class Workload:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple]  # generator -> (inputs, targets)
    batch_size: int
    exclude: tuple = ()  # layers left dense (sparsify's exclude), for both sparse methods


def _named_batch(name: str, batch_size: int):
    return lambda g: example_batch(name, batch_size, generator=g)


def _features_batch(features: int, batch_size: int, classes: int = 10):
    return lambda g: (torch.randn(batch_size, features, generator=g),
                      torch.randint(0, classes, (batch_size,), generator=g))


def _images_batch(shape: tuple, batch_size: int, classes: int = 10):
    return lambda g: (torch.randn(batch_size, *shape, generator=g), torch.randint(0, classes, (batch_size,), generator=g))


def workloads(quick: bool) -> list[Workload]:
    if quick:  # tiny shapes: every model type, seconds in all
        return [
            Workload("mlp-784-300-100-10", fashion_mlp, _named_batch("fashion_mlp", 8), 8),
            Workload("cnn", fashion_cnn, _named_batch("fashion_cnn", 4), 4),
            Workload("mlp-64-256-64-10", lambda: mlp(64, 256, 64, 10), _features_batch(64, 16), 16),
            Workload("resnet18", resnet18, _images_batch((3, 16, 16), 1), 1),
            Workload("transformer", lambda: transformer(d_model=32, nhead=2, dim_feedforward=64),
                     _named_batch("transformer", 2), 2, exclude=("embed",)),
            Workload("lstm", lambda: lstm(embed_dim=8, hidden_size=16), _named_batch("lstm", 2), 2, exclude=("embed",)),
        ]
    return [
        Workload("mlp-784-300-100-10", fashion_mlp, _named_batch("fashion_mlp", 128), 128),
        Workload("cnn", fashion_cnn, _named_batch("fashion_cnn", 128), 128),
        Workload("mlp-1024-4096-1024-10", lambda: mlp(1024, 4096, 1024, 10), _features_batch(1024, 256), 256),
        Workload("resnet18", resnet18, _named_batch("resnet18", 8), 8),
        Workload("transformer", transformer, _named_batch("transformer", 32), 32, exclude=("embed",)),
        Workload("lstm", lstm, _named_batch("lstm", 32), 32, exclude=("embed",)),
    ]


MODEL_KEYS = {"mlp": "mlp-784", "cnn": "cnn", "mlp_large": "mlp-1024", "resnet18": "resnet18",
              "transformer": "transformer", "lstm": "lstm"}


def torch_prune_targets(model: nn.Module, sparse: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, parameter name)`` in the dense ``model`` for every weight that ``sparse`` (a
    sparsified copy of it) masks, for ``prune.global_unstructured``."""
    names = {id(m): n for n, m in sparse.named_modules()}
    modules = dict(model.named_modules())
    targets = []
    for name, unit in sparse_modules(sparse):
        if isinstance(unit, MaskedWeight):
            targets.append((modules[names[id(unit.module)]], unit.name))
        else:
            targets.append((modules[name], "weight"))
    return targets


def recompute_out_proj(model: nn.Module) -> None:
    """torch's prune recomputes ``weight = weight_orig * weight_mask`` in a forward pre-hook of the
    module owning the weight, but MultiheadAttention reads ``out_proj.weight`` without calling
    ``out_proj``: its pruned weight would be computed once and its graph freed by the first
    backward. Running out_proj's hooks from MultiheadAttention's own pre-hook is the fix a user needs."""
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention) and m.out_proj._forward_pre_hooks:
            def run(mha, args):
                for hook in list(mha.out_proj._forward_pre_hooks.values()):
                    hook(mha.out_proj, args)
            m.register_forward_pre_hook(run)


class Case:
    """The three models of one workload, from the same initial weights, and their training steps."""

    def __init__(self, w: Workload, device: torch.device, seed: int, optimizer: str):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        self.batches = [tuple(t.to(device) for t in w.batch(gen)) for _ in range(N_SETS)]
        dense = w.build().to(device)
        self.models = {"dense": dense}
        ours = sparsify(copy.deepcopy(dense), exclude=list(w.exclude) or None)
        prune_(ours, SPARSITY)  # global magnitude
        self.models["ours"] = ours
        theirs = copy.deepcopy(dense)
        prune.global_unstructured(torch_prune_targets(theirs, ours), pruning_method=prune.L1Unstructured,
                                  amount=SPARSITY)
        recompute_out_proj(theirs)
        self.models["prune"] = theirs
        self.optimizers = {k: torch.optim.AdamW(m.parameters(), **OPTIMIZERS[optimizer])
                           for k, m in self.models.items()}
        self.masker = mask_optimizer(self.optimizers["ours"], ours)

    def step(self, method: str) -> Callable[[int], object]:
        model, opt = self.models[method], self.optimizers[method]

        def train(i: int):
            x, y = self.batches[i]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss

        return train


def guard_fail(message: str) -> None:
    print(f"guard failed: {message}", file=sys.stderr)
    sys.exit(1)


def check_before(case: Case, name: str) -> None:
    """Ours and torch's prune kept as many weights and compute the same forward; exit 1 if not."""
    ours, theirs = case.models["ours"], case.models["prune"]
    kept_ours = sum(int(u.mask.sum()) for _, u in sparse_modules(ours))
    kept_theirs = sum(int(b.sum()) for n, b in theirs.named_buffers() if n.endswith("_mask"))
    total = sum(u.weight.numel() for _, u in sparse_modules(ours))
    if kept_ours != kept_theirs or abs(kept_ours - round((1 - SPARSITY) * total)) > 1:
        guard_fail(f"{name}: kept weights: ours {kept_ours}, torch prune {kept_theirs}, of {total}")
    x = case.batches[0][0]
    with torch.no_grad():
        ours.eval(), theirs.eval()
        a, b = ours(x), theirs(x)
        ours.train(), theirs.train()
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
        guard_fail(f"{name}: forward of ours and torch prune differ by {float((a - b).abs().max()):.3g}")


def check_after(case: Case, name: str) -> None:
    for unit_name, unit in sparse_modules(case.models["ours"]):
        if unit.weight.detach()[~unit.mask].ne(0).any():
            guard_fail(f"{name}: layer {unit_name}: pruned weights moved during training")


def measure(case: Case, device: torch.device, quick: bool) -> dict[str, list[float]]:
    """Per method, the ms of one step in each round."""
    rounds, reps = (1, 2) if quick else (ROUNDS, REPS)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    return interleaved_rounds_ms({m: (case.step(m), N_SETS, None) for m in LABELS}, rounds, reps, sync)


def bench_case(w: Workload, device: torch.device, threads: list[int], optimizer: str, args,
               meta: dict) -> list[dict]:
    case = Case(w, device, args.seed, optimizer)
    check_before(case, w.name)
    weights = sum(u.weight.numel() for _, u in sparse_modules(case.models["ours"]))
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        dispatch.clear()  # measured again for this thread count, in the warm-up of the first round
        per_round = measure(case, device, args.quick)
        picked = list(dispatch.choices().values())
        for method, values in per_round.items():
            tm = round_times(values)
            over_dense, over_prune = (paired_ratio(values, per_round[base]) for base in ("dense", "prune"))
            rows.append({
                **meta, "bench": BENCH, "model": w.name, "batch": w.batch_size, "threads": t, "optimizer": optimizer,
                "method": method,
                "label": LABELS[method], "sparsity": SPARSITY, "masked_weights": weights,
                "ms": tm.median, "ms_p20": tm.p20, "ms_p80": tm.p80,
                # ratios round by round (same few seconds of the machine), then their median
                "over_dense": over_dense.median, "over_prune": over_prune.median,
                "over_dense_p20": over_dense.p20, "over_dense_p80": over_dense.p80,
                "over_prune_p20": over_prune.p20, "over_prune_p80": over_prune.p80,
                "dispatch": {impl: picked.count(impl) for impl in dispatch.IMPLEMENTATIONS} if method == "ours" else None,
            })
    check_after(case, w.name)
    return rows


def goal_met(r: dict) -> bool:
    return r["over_dense"] <= GOAL_OVER_DENSE and r["over_prune"] <= 1.0


COLUMNS = [
    ("model", lambda r: r["model"]),
    ("batch", lambda r: str(r["batch"])),
    ("threads", lambda r: str(r["threads"])),
    ("optimizer", lambda r: r.get("optimizer", "adamw")),
    ("dense ms", lambda r: f"{r['dense_ms']:.4g}"),
    ("ours ms", lambda r: f"{r['ms']:.4g}"),
    ("torch prune ms", lambda r: f"{r['prune_ms']:.4g}"),
    ("ours / dense", lambda r: f"{r['over_dense']:.3f} ({r['over_dense_p20']:.2f}-{r['over_dense_p80']:.2f})"),
    ("ours / torch prune", lambda r: f"{r['over_prune']:.3f} ({r['over_prune_p20']:.2f}-{r['over_prune_p80']:.2f})"),
    ("torch prune / dense", lambda r: f"{r['prune_ms'] / r['dense_ms']:.3f}"),
    (f"goal (<= {GOAL_OVER_DENSE}x dense, <= prune)", lambda r: "met" if goal_met(r) else "NOT met"),
    ("dispatch (ops: fused / materialized)", lambda r: " / ".join(str(v) for v in r["dispatch"].values())),
]


def summary_rows(rows: list[dict]) -> list[dict]:
    """One row per (model, threads, optimizer): ours, with the dense and prune times beside it."""
    by = {(r["model"], r["threads"], r["optimizer"], r["method"]): r for r in rows}
    return [{**r, "dense_ms": by[r["model"], r["threads"], r["optimizer"], "dense"]["ms"],
             "prune_ms": by[r["model"], r["threads"], r["optimizer"], "prune"]["ms"]}
            for r in rows if r["method"] == "ours"]


def markdown(rows: list[dict], meta: dict, command: str) -> str:
    summary = summary_rows(rows)
    missed = [f"{r['model']} ({r['threads']} thread{'s' if r['threads'] > 1 else ''}, {r['optimizer']})"
              for r in summary if not goal_met(r)]
    return "\n".join([
        f"# Training-step benchmark: {meta['device']}",
        "",
        f"- date {meta['date']}, git {meta['git_sha']}, torch {meta['torch']}, triton {meta['triton']}"
        + (f", CUDA {meta['cuda']}" if meta["device_type"] == "cuda" else ""),
        f"- command: `{command}`",
        f"- host load average (1 min) at the start: {meta['load_avg_1min']:.2f} on {meta['cpu_count']} CPUs",
        "- step: zero_grad, forward, cross-entropy, backward, AdamW (lr 1e-3; adamw: torch's default "
        f"implementation, adamw-fused: fused=True); sparsity {SPARSITY} by global "
        "magnitude (ours: prune_ + mask_optimizer; torch: prune.global_unstructured L1 on the same weights)",
        f"- ms: median over {meta['rounds']} round(s) of each round's median of {meta['reps']} steps, the "
        "three methods interleaved in every round (their order rotating); ratios: the median over rounds of "
        "the ratio within each round, with its 20th-80th percentiles (the run's noise)",
        "",
        markdown_table(summary, COLUMNS),
        "",
        "Goal not met: " + (", ".join(missed) if missed else "none") + ".",
        "",
    ])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, quick="tiny shapes of every model")
    p.add_argument("--models", nargs="+", choices=list(MODEL_KEYS), help="default: all")
    p.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS),
                   help="default: all")
    args = p.parse_args(argv)
    check_run_arguments(p, args)
    device = torch.device(args.device)
    default_threads = torch.get_num_threads()
    if args.threads is not None:
        threads = [args.threads]
    else:
        threads = [1] if args.quick else sorted({1, default_threads})
    out_dir = results_dir(args.out_dir, args.quick, BENCH)
    command = command_line("bench_models.py", argv)
    meta = run_metadata(device)
    meta.update(quick=args.quick, load_avg_1min=os.getloadavg()[0], cpu_count=os.cpu_count(),
                rounds=1 if args.quick else ROUNDS, reps=2 if args.quick else REPS, timer="perf_counter")
    meta.pop("cpu_threads")  # per row: "threads"
    rows = []
    for w in workloads(args.quick):
        if args.models and not any(w.name.startswith(MODEL_KEYS[k]) for k in args.models):
            continue
        for optimizer in args.optimizers:
            print(f"{w.name}, {optimizer} ...", flush=True)
            rows += bench_case(w, device, threads, optimizer, args, meta)
    torch.set_num_threads(default_threads)
    write_results(out_dir, f"{BENCH}_{device_slug(device)}", rows, markdown(rows, meta, command))


if __name__ == "__main__":
    main()
