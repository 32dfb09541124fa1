"""``make demo``: prune and retrain real models on Fashion-MNIST with the methods the literature compares.

For an MLP and a small CNN, a dense model is trained once with SGD and a linearly decaying learning
rate (the "original schedule"). Every method then starts from that dense model and gets the same
retraining budget in optimizer steps:

    one-shot      global magnitude prune at step 0, then retrain (CLR)
    one-shot ERK  the same with Erdos-Renyi-Kernel layer-wise allocation instead of a global threshold
    IMP+FT/SLR/CLR  iterative magnitude pruning over 3 phases, retrained with FT, SLR or CLR
                  (Zimmer et al., ICLR 2023)
    GMP           cubic gradual magnitude pruning (Zhu & Gupta, 2017) over the first 3/4 of the budget (CLR)
    cyclical      cubic ramps repeated over 3 cycles, masks recomputed over all weights at each cycle
                  start (Srinivas et al., 2022) (CLR)
    FGGP          cubic targets with the gradient-first, magnitude-next fixed-rate rule
                  (Zhu, Bezek & Goksel, 2024) (CLR)

and prints a table of accuracy and time, and writes ``results.json`` and ``sparsity_accuracy.png``
under ``--out``. Nothing is downloaded: the data comes from Debian's ``dataset-fashion-mnist``
(``make demo`` installs it where apt is available) or from ``--data-dir``.

    python -m sparse_engine.demo [--data-dir DIR] [--device cuda] [--full] [--models mlp cnn]
"""
import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from sparse_engine import mask_optimizer, sparsify, sparsity_report
from sparse_engine.data import load_fashion_mnist
from sparse_engine.eval import compare_models, model_metrics
from sparse_engine.models import fashion_cnn, fashion_mlp
from sparse_engine.pruning import FGGP, GMP, IMP, Cyclical, OneShot, retrain_lr_schedule
from sparse_engine.train import evaluate, train_epoch

METHODS = ("one-shot", "one-shot ERK", "IMP+FT", "IMP+SLR", "IMP+CLR", "GMP", "cyclical", "FGGP")
BUDGETS = {  # (training images, dense epochs, retraining epochs)
    "default": (8_000, 8, 6),   # about 4-5 minutes on 2 idle CPU cores
    "full": (60_000, 15, 9),
}
MAX_LR, MIN_LR, MOMENTUM, WEIGHT_DECAY, BATCH = 0.1, 1e-3, 0.9, 1e-4, 128
FGGP_RATE = 2.0
PHASES = 3


MODELS = {"mlp": fashion_mlp, "cnn": fashion_cnn}


def original_schedule(total_steps: int) -> list[float]:
    """The dense training's per-step learning rates: linear decay from MAX_LR to MIN_LR."""
    return [MAX_LR + (MIN_LR - MAX_LR) * t / max(total_steps - 1, 1) for t in range(total_steps)]


def sgd(model: nn.Module, lr: float = MAX_LR) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def gradual_steps(total: int, prunes: int = 10) -> tuple[int, int]:
    """(end_step, frequency) of gradual pruning: up to ``prunes`` prunes over the first 3/4 of ``total``."""
    span = max(3 * total // 4, 1)
    prunes = min(prunes, span)
    return (span // prunes) * prunes, span // prunes


def run_method(method, dense, sparsity, data, budget_epochs, steps, orig_lrs, args, bar):
    """Prune a copy of ``dense`` with ``method`` at ``sparsity`` and retrain it for the budget."""
    x_train, y_train, x_test, y_test = data
    model = sparsify(copy.deepcopy(dense))
    opt = sgd(model)
    mask_optimizer(opt, model)
    total = budget_epochs * steps
    gen = torch.Generator().manual_seed(args.seed)
    bn = dict(bn_data=x_train[:1024].to(args.device).split(256))
    clr = dict(original_schedule=orig_lrs)
    scheduler = None
    t0 = time.perf_counter()
    if method.startswith("IMP"):
        pruner = IMP(model, opt, sparsity, min(PHASES, budget_epochs), budget_epochs=budget_epochs, steps_per_epoch=steps,
                     lr_schedule=method.split("+")[1].lower(), lr_options=clr, **bn)
    else:
        scheduler = retrain_lr_schedule("clr", opt, total, **clr)
        if method == "one-shot":
            pruner = OneShot(model, opt, sparsity, **bn)
        elif method == "one-shot ERK":
            pruner = OneShot(model, opt, sparsity, allocation="erk", **bn)
        elif method == "GMP":
            pruner = GMP(model, opt, sparsity, 0, *gradual_steps(total), total_steps=total, **bn)
        elif method == "cyclical":
            # Each cycle starts dense (initial=0): every weight is back, at zero, and free to regrow.
            pruner = Cyclical(model, opt, sparsity, cycles=max(1, min(3, total // 4)), total_steps=total, frequency=max(steps // 4, 1), **bn)
        elif method == "FGGP":
            pruner = FGGP(model, opt, sparsity, 0, *gradual_steps(total), FGGP_RATE, total_steps=total, **bn)
        else:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    prune_s = time.perf_counter() - t0
    for _ in range(budget_epochs):
        train_epoch(model, opt, x_train, y_train, BATCH, args.device, scheduler=scheduler, generator=gen,
                    progress=bar, on_step=pruner.step)
        pruner.on_epoch_end()
    report = sparsity_report(model)
    row = dict(sparsity=report.sparsity, target=sparsity, acc=evaluate(model, x_test, y_test, device=args.device),
               seconds=time.perf_counter() - t0, first_prune_s=prune_s)
    if args.beyond_accuracy:  # agreement, calibration, noise and corruptions against the dense parent
        row.update(compare_models(model, dense, x_test, y_test, device=args.device))
    return row


def plot(rows, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, name in zip(axes[0], models):
        dense = [r for r in rows if r["model"] == name and r["method"] == "dense"]
        for method in METHODS:
            pts = sorted((r["target"], r["acc"]) for r in rows if r["model"] == name and r["method"] == method)
            if pts:
                ax.plot([100 * s for s, _ in pts], [100 * a for _, a in pts], marker="o", label=method)
        if dense:
            ax.axhline(100 * dense[0]["acc"], color="k", linestyle="--", label="dense")
        ax.set_title(f"Fashion-MNIST, {name.upper()}")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST IDX files "
                   "(default: $SPARSE_ENGINE_DATA, else /usr/share/datasets/fashion-mnist)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda runs the GPU kernels)")
    p.add_argument("--full", action="store_true", help="all 60k training images and longer budgets")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    p.add_argument("--train-size", type=int, default=None, help="training images (overrides the budget's)")
    p.add_argument("--epochs", type=int, default=None, help="dense training epochs (overrides the budget's)")
    p.add_argument("--retrain-epochs", type=int, default=None, help="retraining budget in epochs (overrides)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beyond-accuracy", action="store_true", help="also store sparse_engine.eval's metrics "
                   "(agreement with the dense model, calibration, accuracy under noise and corruptions) in results.json")
    p.add_argument("--out", default="runs/demo", help="directory for results.json and sparsity_accuracy.png")
    args = p.parse_args(argv)
    n_train, epochs, retrain = BUDGETS["full" if args.full else "default"]
    n_train = args.train_size or n_train
    epochs = args.epochs or epochs
    retrain = args.retrain_epochs or retrain
    if n_train < BATCH or epochs < 1 or retrain < 1:
        p.error(f"--train-size must be >= {BATCH}, --epochs and --retrain-epochs >= 1")
    if not all(0.0 < s < 1.0 for s in args.sparsities):
        p.error(f"--sparsities must lie in (0, 1), got {args.sparsities}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    try:
        x_train, y_train = load_fashion_mnist("train", args.data_dir)
        x_test, y_test = load_fashion_mnist("test", args.data_dir)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}")
    torch.manual_seed(args.seed)
    subset = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(args.seed))[:n_train]
    data = (x_train[subset], y_train[subset], x_test, y_test)
    steps = -(-data[0].shape[0] // BATCH)
    runs = len(args.sparsities) * len(args.methods)
    total_steps = len(args.models) * (epochs + runs * retrain) * steps

    rows = []
    with tqdm(total=total_steps, desc="demo", unit="step", dynamic_ncols=True) as bar:
        for name in args.models:
            torch.manual_seed(args.seed)
            dense = MODELS[name]().to(args.device)
            opt = sgd(dense)
            orig = original_schedule(epochs * steps)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: orig[min(t, len(orig) - 1)] / MAX_LR)
            gen = torch.Generator().manual_seed(args.seed)
            bar.set_description(f"{name}: dense training")
            t0 = time.perf_counter()
            for _ in range(epochs):
                train_epoch(dense, opt, data[0], data[1], BATCH, args.device, scheduler=sched, generator=gen,
                            progress=bar)
            rows.append(dict(model=name, method="dense", target=0.0, sparsity=0.0,
                             acc=evaluate(dense, x_test, y_test, device=args.device),
                             seconds=time.perf_counter() - t0, first_prune_s=0.0,
                             **(model_metrics(dense, x_test, y_test, device=args.device)
                                if args.beyond_accuracy else {})))
            for s in args.sparsities:
                for method in args.methods:
                    bar.set_description(f"{name}: {method} at {s:.0%}")
                    r = run_method(method, dense, s, data, retrain, steps, orig, args, bar)
                    rows.append(dict(model=name, method=method, **r))

    header = (f"Fashion-MNIST ({data[0].shape[0]} training images, 10000 test), device {args.device}: "
              f"dense {epochs} epochs, then {retrain} retraining epochs for every method")
    print("\n" + header)
    sparsities = sorted({r["target"] for r in rows if r["method"] != "dense"})
    print("| model | method | " + " | ".join(f"acc @ {100 * s:g}%" for s in sparsities) + " | time (s) |")
    print("|---|---|" + "---:|" * (len(sparsities) + 1))
    for name in args.models:
        for method in ("dense",) + tuple(args.methods):
            mine = [r for r in rows if r["model"] == name and r["method"] == method]
            if method == "dense":
                cells = [f"{100 * mine[0]['acc']:.2f}"] * len(sparsities)
            else:
                by = {r["target"]: r for r in mine}
                cells = [f"{100 * by[s]['acc']:.2f}" if s in by else "-" for s in sparsities]
            print(f"| {name} | {method} | " + " | ".join(cells) + f" | {sum(r['seconds'] for r in mine):.1f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(args=vars(args), train_size=int(data[0].shape[0]), epochs=epochs, retrain_epochs=retrain,
                torch=torch.__version__)
    (out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    plot(rows, out / "sparsity_accuracy.png")
    print(f"\nresults: {out / 'results.json'}, plot: {out / 'sparsity_accuracy.png'}")
    return rows


if __name__ == "__main__":
    main()
