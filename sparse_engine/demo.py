"""``make demo``: prune an MLP on real Fashion-MNIST with sparse layers and fused masked kernels.

Trains a dense MLP, then for each target sparsity: copies it, converts it with ``sparsify``, prunes
it globally by magnitude, retrains briefly with ``mask_optimizer`` keeping pruned weights at zero,
and prints a table of sparsity, accuracy and time.

    python -m sparse_engine.demo [--data-dir DIR] [--device cuda] [--epochs 3] [--retrain-epochs 1]
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
from sparse_engine.pruning import global_magnitude_prune_
from sparse_engine.train import evaluate, train_epoch


def mlp(hidden=(300, 100)) -> nn.Module:
    layers, width = [nn.Flatten()], 28 * 28
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST IDX files "
                   "(default: $SPARSE_ENGINE_DATA, else /usr/share/datasets/fashion-mnist)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--epochs", type=int, default=3, help="dense training epochs")
    p.add_argument("--retrain-epochs", type=int, default=1, help="retraining epochs after each prune")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo", help="directory for results.json")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.retrain_epochs < 0:
        p.error("--epochs must be >= 1 and --retrain-epochs >= 0")
    if not all(0.0 <= s < 1.0 for s in args.sparsities):
        p.error(f"--sparsities must lie in [0, 1), got {args.sparsities}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")

    torch.manual_seed(args.seed)
    try:
        x_train, y_train = load_fashion_mnist("train", args.data_dir)
        x_test, y_test = load_fashion_mnist("test", args.data_dir)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}")
    gen = torch.Generator().manual_seed(args.seed)
    steps = -(-x_train.shape[0] // 128)

    dense = mlp().to(args.device)
    opt = torch.optim.Adam(dense.parameters(), lr=args.lr)
    t0 = time.perf_counter()
    with tqdm(total=args.epochs * steps, desc="dense training", unit="step") as bar:
        for _ in range(args.epochs):
            train_epoch(dense, opt, x_train, y_train, device=args.device, generator=gen, progress=bar)
    rows = [dict(method="dense", sparsity=0.0, acc_pruned=None, acc=evaluate(dense, x_test, y_test, device=args.device),
                 prune_s=0.0, retrain_s=0.0, train_s=time.perf_counter() - t0)]

    for s in args.sparsities:
        model = sparsify(copy.deepcopy(dense))
        t0 = time.perf_counter()
        report = global_magnitude_prune_(model, s)
        prune_s = time.perf_counter() - t0
        acc_pruned = evaluate(model, x_test, y_test, device=args.device)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr / 10)
        mask_optimizer(opt, model)
        t0 = time.perf_counter()
        with tqdm(total=args.retrain_epochs * steps, desc=f"retrain at {s:.0%}", unit="step") as bar:
            for _ in range(args.retrain_epochs):
                train_epoch(model, opt, x_train, y_train, device=args.device, generator=gen, progress=bar)
        retrain_s = time.perf_counter() - t0
        after = sparsity_report(model)
        if after.kept != report.kept:
            raise RuntimeError(f"retraining changed the number of kept weights: {report.kept} -> {after.kept}")
        rows.append(dict(method="global magnitude + retrain", sparsity=after.sparsity, acc_pruned=acc_pruned,
                         acc=evaluate(model, x_test, y_test, device=args.device), prune_s=prune_s,
                         retrain_s=retrain_s, train_s=None))

    print()
    print(f"Fashion-MNIST, MLP 784-300-100-10, device {args.device}, {args.epochs} dense epochs, "
          f"{args.retrain_epochs} retraining epoch(s)")
    print("| model | sparsity | acc. after prune | final acc. | prune time (s) | (re)training time (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        pruned = "-" if r["acc_pruned"] is None else f"{100 * r['acc_pruned']:.2f}%"
        train_s = r["train_s"] if r["method"] == "dense" else r["retrain_s"]
        print(f"| {r['method']} | {100 * r['sparsity']:.1f}% | {pruned} | {100 * r['acc']:.2f}% | "
              f"{r['prune_s']:.3f} | {train_s:.1f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(dict(args=vars(args), rows=rows), indent=2))
    print(f"\nresults written to {out / 'results.json'}")
    return rows


if __name__ == "__main__":
    main()
