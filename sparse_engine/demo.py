"""``make demo``: prune and retrain real models on Fashion-MNIST with the methods the literature compares.

The demo is a sweep: it runs ``examples/demo.toml`` through ``sparse_engine.sweep`` (the options
below override the file's keys). For an MLP and a small CNN, a dense parent is trained once with
SGD and a linearly decaying learning rate (the "original schedule") and shared by every method,
which starts from it and gets the same retraining budget in optimizer steps:

    one-shot      global magnitude prune at step 0, then retrain (CLR)
    one-shot ERK  the same with Erdos-Renyi-Kernel layer-wise allocation instead of a global threshold
    IMP+FT/SLR/CLR  iterative magnitude pruning over 3 phases, retrained with FT, SLR or CLR
                  (Zimmer et al., ICLR 2023)
    GMP           cubic gradual magnitude pruning (Zhu & Gupta, 2017) over the first 3/4 of the budget (CLR)
    cyclical      cubic ramps repeated over 3 cycles, masks recomputed over all weights at each cycle
                  start (Srinivas et al., 2022) (CLR)
    FGGP          cubic targets with the gradient-first, magnitude-next fixed-rate rule
                  (Zhu, Bezek & Goksel, 2024) (CLR)

With ``--beyond-accuracy`` every trial also measures ``sparse_engine.eval``'s metrics (the sweep
metric ``beyond_accuracy``): agreement with and distance to the dense parent, calibration, worst-class
accuracy, accuracy under noise and corruptions, stored beside accuracy in the sweep and in ``results.json``.

The pruning trials of each model train as stacked models (``sparse_engine.stack``) where a measured
training step says stacking is faster on this machine (``--stack auto``, the default; ``--stack K``: K
at a time regardless; ``--stack 1``: one at a time); ``--compare-stacking`` (``make demo`` passes it)
runs the sweep a second time the other way, in ``OUT/stack-1`` when the first run stacked any trials,
else in ``OUT/stack-32`` with every model's trials in one stack, and reports both wall times.

It prints a table of accuracy and time, and writes ``results.json`` and ``sparsity_accuracy.png``
into ``--out``, which is also the sweep's directory: an interrupted demo resumes where it stopped,
and a repeated one reuses its finished trials. Nothing is downloaded: the data comes from Debian's
``dataset-fashion-mnist`` (``make demo`` installs it where apt is available) or from ``--data-dir``.

    python -m sparse_engine.demo [--data-dir DIR] [--device cuda] [--full] [--models mlp cnn] [--stack K]
"""
import argparse
import json
import time
from pathlib import Path

import torch

from sparse_engine.sweep import Sweep, SweepFileError, plot_sweep, report_table
from sparse_engine.sweep.cli import stack_arg
from sparse_engine.sweep.stacked import AUTO_MAX

SWEEP_FILE = Path(__file__).resolve().parent.parent / "examples" / "demo.toml"
METHODS = ("one-shot", "one-shot ERK", "IMP+FT", "IMP+SLR", "IMP+CLR", "GMP", "cyclical", "FGGP")
MODELS = ("mlp", "cnn")
BUDGETS = {  # (training images, dense epochs, retraining epochs)
    "default": (8_000, 8, 6),   # the demo's budget (2 min 38 s on 2 idle cores before it became a sweep)
    "full": (60_000, 15, 9),
}
BATCH = 128


def overrides(args, budget) -> dict:
    """The sweep file's keys that the command line sets."""
    n_train, epochs, retrain = budget
    out = {"grid.model": args.models, "grid.method": args.methods, "grid.sparsity": args.sparsities,
           "grid.seed": [args.seed], "data.subset_seed": args.seed, "data.train_size": n_train,
           "pretrain.epochs": epochs, "train.epochs": retrain, "device": args.device}
    if args.data_dir:
        out["data.dir"] = args.data_dir
    if args.beyond_accuracy:
        out["metrics"] = ["accuracy", "loss", "beyond_accuracy"]
    return out


def rows_of(records: list, every_metric: bool = False) -> list[dict]:
    """The demo's rows (one per trial): model, method, target, sparsity, acc, seconds (and, with
    ``every_metric``, every other final metric of the trial)."""
    rows = []
    for r in records:
        if r["state"] != "done":
            continue
        m = r["metrics"]
        row = dict(model=r["model"], method=r["method"], target=r["sparsity"], sparsity=m["sparsity"],
                   acc=m["test_accuracy"], seconds=r["wall_s"])
        if every_metric:
            row.update((k, v) for k, v in m.items() if k not in ("test_accuracy", "sparsity"))
        rows.append(row)
    return rows


def run_sweep(sweep: Sweep, args, stack, out) -> float:
    """Run ``sweep`` (stacking ``stack`` trials); returns its wall time in seconds."""
    started = time.perf_counter()
    # The demo's directory is its own: a changed command line takes it over, keeping what still fits.
    status = sweep.run(workers=args.workers, threads=args.threads, stack=stack, force_new=True)
    if status["failed"]:
        raise SystemExit(f"error: {status['failed']} trial(s) failed; see `python -m sparse_engine.sweep report "
                         f"{out} --failures`")
    return time.perf_counter() - started


def stacking_of_last_run(sweep: Sweep) -> dict:
    """``{model label: the largest stack its pruning trials trained in}`` in the sweep's last run (1: one at
    a time), from the trials' ``started`` events; with ``--stack auto`` it is what the probe chose."""
    events, _ = sweep.store.journal.read(0)
    runs = [i for i, e in enumerate(events) if e.get("event") == "run"]
    model = {t.id: t.labels.get("model") for t in sweep.trials if t.kind == "prune"}
    out: dict = {}
    for e in events[runs[-1] if runs else 0:]:
        if e.get("event") == "started" and e.get("trial") in model:
            label = model[e["trial"]]
            out[label] = max(out.get(label, 1), e.get("stacked", 1))
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST IDX files "
                   "(default: $SPARSE_ENGINE_DATA, else /usr/share/datasets/fashion-mnist)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda runs the GPU kernels")
    p.add_argument("--full", action="store_true", help="all 60k training images and longer budgets")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    p.add_argument("--train-size", type=int, default=None, help="training images (overrides the budget's)")
    p.add_argument("--epochs", type=int, default=None, help="dense training epochs (overrides the budget's)")
    p.add_argument("--retrain-epochs", type=int, default=None, help="retraining budget in epochs (overrides)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="trials at once (default: 1 on CPU, one per GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: the cores split "
                   "between workers; on a machine shared with other jobs, 1 avoids OpenMP's waits for descheduled "
                   "threads)")
    p.add_argument("--beyond-accuracy", action="store_true", help="also measure agreement with the dense parent, "
                   "calibration and accuracy under noise and corruptions (sparse_engine.eval), kept in results.json")
    p.add_argument("--stack", type=stack_arg, default="auto", help="pruning trials trained as one stacked model "
                   "(default auto: as many as fit, for the models where a stacked step measures faster; 1: one at a "
                   "time)")
    p.add_argument("--compare-stacking", action="store_true", help="also run the sweep the other way (one at a "
                   "time if this run stacked trials, else all of a model's trials in one stack) and report both wall "
                   "times")
    p.add_argument("--sweep", type=Path, default=SWEEP_FILE, help="the sweep file (default: examples/demo.toml)")
    p.add_argument("--out", default="runs/demo", help="the sweep directory, with results.json and "
                   "sparsity_accuracy.png")
    args = p.parse_args(argv)
    n_train, epochs, retrain = BUDGETS["full" if args.full else "default"]
    budget = (args.train_size or n_train, args.epochs or epochs, args.retrain_epochs or retrain)
    if budget[0] < BATCH or budget[1] < 1 or budget[2] < 1:
        p.error(f"--train-size must be >= {BATCH}, --epochs and --retrain-epochs >= 1")
    if not all(0.0 < s < 1.0 for s in args.sparsities):
        p.error(f"--sparsities must lie in (0, 1), got {args.sparsities}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    from sparse_engine.data.fashion_mnist import resolve_data_dir
    try:
        resolve_data_dir(args.data_dir)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}")
    try:
        sweep = Sweep.from_file(args.sweep, overrides(args, budget), args.out)
    except SweepFileError as e:
        raise SystemExit(f"error: {e}")
    walls = {f"stack {args.stack}": run_sweep(sweep, args, args.stack, args.out)}
    stacking = stacking_of_last_run(sweep)
    if args.compare_stacking:
        # the other way: one at a time if this run stacked anything, else every model's trials in one stack
        other = 1 if any(k > 1 for k in stacking.values()) else AUTO_MAX
        again = Sweep.from_file(args.sweep, overrides(args, budget), Path(args.out) / f"stack-{other}")
        walls[f"stack {other}"] = run_sweep(again, args, other, Path(args.out) / f"stack-{other}")
    records = sweep.results()
    rows = rows_of(records, args.beyond_accuracy)

    print(f"\nFashion-MNIST ({budget[0]} training images, 10000 test), device {args.device}: dense {budget[1]} epochs, "
          f"then {budget[2]} retraining epochs for every method")
    print(report_table(records, "test_accuracy", label="acc"))
    print("\nstacking (pruning trials per stacked model): " + ", ".join(f"{m}: {k}" for m, k in stacking.items())
          + "\nwall time of the sweep (trials finished in an earlier run are not run again): "
          + ", ".join(f"{k}: {v:.1f} s" for k, v in walls.items()))
    out = Path(args.out)
    meta = dict(args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, train_size=budget[0],
                epochs=budget[1], retrain_epochs=budget[2], torch=torch.__version__, sweep=str(args.sweep),
                wall_s=walls, stacking=stacking)
    (out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    plot_sweep(records, out / "sparsity_accuracy.png", title=lambda model: f"Fashion-MNIST, {model.upper()}")
    print(f"\nresults: {out / 'results.json'}, plot: {out / 'sparsity_accuracy.png'}, sweep: {out} "
          f"(python -m sparse_engine.sweep report {out})")
    return rows


if __name__ == "__main__":
    main()
