"""``python -m sparse_engine.sweep`` and the ``sparse-engine`` console script.

    sparse-engine run FILE [--dir DIR] [--set KEY=VALUE ...] [--workers N] [--stack K] [--executor ray ...]
    sparse-engine status DIR
    sparse-engine report DIR [--metric test_accuracy] [--format markdown|csv] [--out FILE]
    sparse-engine plot DIR [--out FILE.png|.svg] [--log-density]

``run`` exits with 1 when a trial failed (its traceback is in the journal and ``report``), 2 for
a sweep file or directory that cannot be used.
"""
import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from sparse_engine.sweep.coordinator import Sweep, SweepError
from sparse_engine.sweep.journal import StoreError
from sparse_engine.sweep.plot import plot_sweep
from sparse_engine.sweep.report import report_table
from sparse_engine.sweep.results import SweepResults, format_status
from sparse_engine.sweep.source import SweepFileError, parse_override


def stack_arg(value: str):
    """``--stack``: an integer >= 1 or "auto"."""
    if value == "auto":
        return value
    try:
        k = int(value)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f'expected an integer >= 1 or "auto", got {value!r}')
    return k


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparse-engine", description="Resumable pruning sweeps (sparse_engine.sweep).")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) every trial of a sweep file")
    run.add_argument("file", type=Path)
    run.add_argument("--dir", type=Path, help="sweep directory (default: the file's `directory`, else runs/NAME)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key of the file, e.g. --set train.epochs=3 (TOML values)")
    run.add_argument("--data-dir", help="directory of the data files (data.dir)")
    run.add_argument("--executor", choices=("local", "ray"))
    run.add_argument("--workers", type=int,
                     help="concurrent trials (default: 1 on CPU, one per GPU; 0: in this process, no pool)")
    run.add_argument("--threads", type=int, help="torch threads per worker (default: the cores split)")
    run.add_argument("--checkpoint-every", type=int, help="epochs between checkpoints (default 1)")
    run.add_argument("--stack", type=stack_arg, metavar="K",
                     help="train up to K prune trials of one architecture, data and budget as one stacked model "
                          "(default 1: one at a time; auto: as many as fit, where it measures faster)")
    run.add_argument("--address", help="ray: cluster address (default: start a local Ray instance)")
    run.add_argument("--gpus-per-trial", type=float, help="ray: GPUs per trial (fractions allowed)")
    run.add_argument("--ray-num-cpus", type=int, help="ray: CPUs of the local Ray instance")
    run.add_argument("--retry-failed", action="store_true", help="run failed trials again")
    run.add_argument("--force-new", action="store_true", help="make a directory of another sweep run this file")
    run.add_argument("--dry-run", action="store_true", help="check the file and list its trials; run nothing")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    status = sub.add_parser("status", help="counts by state and ETA")
    status.add_argument("dir", type=Path)
    report = sub.add_parser("report", help="table of mean ± std over seeds")
    report.add_argument("dir", type=Path)
    report.add_argument("--metric", default="test_accuracy")
    report.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    report.add_argument("--out", type=Path, help="write the table here instead of printing it")
    report.add_argument("--failures", action="store_true", help="also print the failed trials' errors")
    plot = sub.add_parser("plot", help="sparsity vs metric curves with the seeds' spread")
    plot.add_argument("dir", type=Path)
    plot.add_argument("--metric", default="test_accuracy")
    plot.add_argument("--out", type=Path, help="PNG, SVG or PDF (default: DIR/sparsity_<metric>.png)")
    plot.add_argument("--log-density", action="store_true", help="x axis: density on a log scale")
    return p


def _run(args) -> int:
    overrides = dict(parse_override(s) for s in args.set)
    if args.data_dir:
        overrides["data.dir"] = args.data_dir
    sweep = Sweep.from_file(args.file, overrides, args.dir)
    if args.dry_run:
        for spec in sweep.trials:
            print(f"{spec.id}  {spec.kind:8s}  {spec.describe()}")
        print(f"{len(sweep.trials)} trials; directory {sweep.directory}")
        return 0
    status = sweep.run(args.executor, workers=args.workers, threads=args.threads, address=args.address,
                       gpus_per_trial=args.gpus_per_trial, ray_num_cpus=args.ray_num_cpus,
                       checkpoint_every=args.checkpoint_every, stack=args.stack, retry_failed=args.retry_failed,
                       force_new=args.force_new, progress=False if args.quiet else None)
    print(format_status(status))
    if status["failed"]:
        print(f"{status['failed']} trial(s) failed: `sparse-engine report {sweep.directory} --failures` shows why; "
              f"`run --retry-failed` runs them again", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        results = SweepResults(args.dir)
        if args.command == "status":
            print(format_status(results.status()))
        elif args.command == "report":
            records = results.records()
            table = report_table(records, args.metric, args.format)
            if args.out:
                args.out.write_text(table + ("" if table.endswith("\n") else "\n"))
                print(f"wrote {args.out}")
            else:
                print(table)
            if args.failures:
                for r in records:
                    if r["state"] == "failed":
                        print(f"\n{r['id']} ({r['model']} {r['method']} @ {r['sparsity']}): {r['error']}\n"
                              f"{r['traceback'] or ''}")
        elif args.command == "plot":
            out = args.out or args.dir / f"sparsity_{args.metric}.png"
            print(f"wrote {plot_sweep(results.records(), out, args.metric, args.log_density)}")
        return 0
    except (SweepFileError, SweepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (StoreError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
