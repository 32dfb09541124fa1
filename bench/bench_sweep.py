"""Benchmark of the sweep runner: its overhead per trial, and throughput with 1, 2 and 4 workers.

Workload: the demo's MLP (784-300-100-10) on Fashion-MNIST (the real images when installed, else
random images of the same shape: the cost is the same), one dense parent and one-shot pruning
trials at several sparsities, SGD, batch 128.

  overhead    the same trials two ways, each a fresh command timed from outside (so both pay Python's
              start, the imports and the data loading once), interleaved over rounds (medians reported):
              bare    what users write today: one process, a plain loop that trains the parent,
                      then each trial (``sparse_engine.sweep.Trial``: build, epochs, evaluate),
                      with no store, checkpoints, journal or worker processes
                      (``bench_sweep.py --bare FILE``);
              runner  ``python -m sparse_engine.sweep run FILE --workers 1``: a coordinator and a
                      worker process, an epoch checkpoint, journal events, the SQL index, the final
                      model saved, the parent read from disk.
              overhead per trial = (runner - bare) / trials, in wall seconds and in CPU seconds
              (user + system of the command and its children: on a machine shared with other jobs
              the wall time mostly measures waiting, the CPU time still measures the work). Full
              mode sizes the trials to about a minute each on one idle thread (the goal: under 5%
              for 1-minute trials); --quick to a few seconds.
  throughput  the runner with W = 1, 2, 4 workers on the same trials (the cores split between
              workers: ``threads = max(1, cores // W)``, or ``--threads``), trials per minute.

    python bench/bench_sweep.py [--quick] [--data-dir DIR] [--out-dir DIR]
"""
import argparse
import gzip
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import command_line, device_slug, markdown_table, results_dir, run_metadata, write_results  # noqa: E402

import sparse_engine  # noqa: E402
from sparse_engine.sweep import Sweep, Trial  # noqa: E402
from sparse_engine.sweep.executors.base import usable_cores  # noqa: E402

BENCH = "sweep"
SWEEP = """
name = "bench"
[data]
name = "fashion_mnist"
dir = "{data_dir}"
train_size = {train_size}
[pretrain]
epochs = {epochs}
[train]
epochs = {epochs}
bn_recalibration = false
[models.mlp]
name = "fashion_mlp"
[methods.one-shot]
name = "one_shot"
[grid]
sparsity = {sparsities}
"""


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), compresslevel=1))


def data_dir(given, scratch: Path) -> tuple[str, str]:
    """(directory, what it holds): ``given``, else Fashion-MNIST if installed, else random images."""
    from sparse_engine.data.fashion_mnist import resolve_data_dir
    try:
        return str(resolve_data_dir(given)), "Fashion-MNIST"
    except FileNotFoundError:
        if given is not None:
            raise
    rng = np.random.default_rng(0)
    root = scratch / "random-images"
    root.mkdir()
    for split, n in (("train", 60_000), ("t10k", 10_000)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return str(root), "random images of Fashion-MNIST's shape"


def bare_loop(sweep: Sweep, threads: int) -> tuple[float, float]:
    """(wall, CPU) seconds for the trials in one process, no store: what a hand-written loop does."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    started, cpu = time.perf_counter(), time.process_time()
    parents = {}
    for spec in sweep.trials:  # parents first
        trial = Trial(spec, "cpu", parents.get(spec.parent))
        while not trial.finished:
            trial.train_epoch()
        trial.result()
        if spec.kind == "pretrain":
            parents[spec.id] = trial.final_state()
    torch.set_num_threads(saved)
    return time.perf_counter() - started, time.process_time() - cpu


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list) -> tuple[float, float]:
    """(wall, CPU) seconds of a command, from outside (CPU: it and the children it waited for); its
    output is shown only if it fails."""
    started, cpu = time.perf_counter(), children_cpu()
    run = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")
    return seconds, children_cpu() - cpu


def bare(sweep_file: Path, scratch: Path, threads: int) -> tuple[float, float]:
    return timed([sys.executable, __file__, "--bare", str(sweep_file), "--threads", str(threads)])


def runner(sweep_file: Path, scratch: Path, workers: int, threads) -> tuple[float, float]:
    directory = Path(tempfile.mkdtemp(dir=scratch))
    cmd = [sys.executable, "-m", "sparse_engine.sweep", "run", str(sweep_file), "--dir", str(directory),
           "--workers", str(workers), "--quiet"] + (["--threads", str(threads)] if threads else [])
    seconds = timed(cmd)  # (wall, CPU)
    status = Sweep.from_file(sweep_file, directory=directory).status()
    if status["done"] != status["trials"]:
        raise SystemExit(f"CORRECTNESS GUARD FAILED: {status}")
    shutil.rmtree(directory)
    return seconds


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="trials of a few seconds, one round: the smoke test")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX files (default: installed, else random images)")
    p.add_argument("--out-dir", type=Path, help="default: bench/results (with --quick, a temporary directory)")
    p.add_argument("--rounds", type=int, help="overhead rounds (default 3, quick 1)")
    p.add_argument("--threads", type=int, help="torch threads of the bare loop and of each runner worker (default: "
                   "the cores split between workers). On a shared machine 1 avoids OpenMP's waits for descheduled "
                   "threads")
    p.add_argument("--train-size", type=int, help="training images (default 20000, quick 2048)")
    p.add_argument("--trial-seconds", type=float, help="target length of a trial (default 60, quick: 2 epochs)")
    p.add_argument("--no-throughput", action="store_true", help="measure the overhead only")
    p.add_argument("--bare", type=Path, metavar="FILE", help="(internal) run FILE's trials as the bare loop and exit")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.bare:
        bare_loop(Sweep.from_file(args.bare, directory=Path(tempfile.mkdtemp())), args.threads or usable_cores())
        return
    out_dir = results_dir(args.out_dir, args.quick, BENCH)
    scratch = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    device = torch.device("cpu")
    cores = usable_cores()
    threads = args.threads or cores
    meta = run_metadata(device)
    meta.update(sparse_engine=sparse_engine.__version__, quick=args.quick, cores=cores, threads=threads,
                load_avg_1min=os.getloadavg()[0])
    try:
        directory, meta["data"] = data_dir(args.data_dir, scratch)
        train_size = args.train_size or (2048 if args.quick else 20_000)
        sparsities = [0.5, 0.9] if args.quick else [0.8, 0.9, 0.95]
        text = SWEEP.format(data_dir=directory, train_size=train_size, epochs=1, sparsities=sparsities)
        epochs = 2
        if not args.quick or args.trial_seconds:
            # parent + one trial, 1 epoch, after a first call that loads the data; CPU seconds per
            # thread: the wall time on an idle machine
            probe = Sweep.from_text(text.replace("sparsity = [0.8, 0.9, 0.95]", "sparsity = [0.8]"),
                                    directory=scratch / "x")
            bare_loop(probe, threads)
            one = bare_loop(probe, threads)[1] / threads / 2
            epochs = max(1, round((args.trial_seconds or 60.0) / one))
        text = SWEEP.format(data_dir=directory, train_size=train_size, epochs=epochs, sparsities=sparsities)
        sweep_file = scratch / "sweep.toml"
        sweep_file.write_text(text)
        trials = len(Sweep.from_file(sweep_file, directory=scratch / "unused").trials)
        print(f"{trials} trials of {epochs} epochs on {train_size} images ({meta['data']}), {cores} cores", flush=True)
        times = {"bare": [], "runner": []}
        for r in range(args.rounds or (1 if args.quick else 3)):
            times["bare"].append(bare(sweep_file, scratch, threads))
            times["runner"].append(runner(sweep_file, scratch, 1, args.threads))
            print(f"round {r}: bare {times['bare'][-1][0]:.1f} s ({times['bare'][-1][1]:.1f} CPU s), runner "
                  f"{times['runner'][-1][0]:.1f} s ({times['runner'][-1][1]:.1f} CPU s)", flush=True)
        base = dict(meta, trials=trials, epochs=epochs, train_size=train_size)
        rows = []
        for m in ("bare", "runner"):
            wall, cpu = (statistics.median(t[i] for t in times[m]) for i in (0, 1))
            rows.append(dict(base, section="overhead", method=m, seconds=wall, all_seconds=[t[0] for t in times[m]],
                             cpu_s=cpu, all_cpu_s=[t[1] for t in times[m]], trial_s=wall / trials,
                             trial_cpu_s=cpu / trials))
        for unit, key in (("s", "seconds"), ("cpu_s", "cpu_s")):
            extra = rows[1][key] - rows[0][key]
            rows[1].update({f"overhead_{unit}_per_trial": extra / trials,
                            f"overhead{'' if unit == 's' else '_cpu'}_pct": 100 * extra / rows[0][key]})
        for workers in () if args.no_throughput else (1, 2, 4):
            seconds, cpu = runner(sweep_file, scratch, workers, args.threads)
            rows.append(dict(base, section="throughput", method=f"runner workers={workers}", workers=workers,
                             threads=args.threads or max(1, cores // workers), seconds=seconds, cpu_s=cpu,
                             trials_per_min=60 * trials / seconds))
            print(f"workers {workers}: {seconds:.1f} s", flush=True)
        for r in rows[2:]:
            r["speedup_vs_1_worker"] = rows[2]["seconds"] / r["seconds"]
        meta["load_avg_1min_end"] = os.getloadavg()[0]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_results(out_dir, f"{BENCH}_{device_slug(device)}", rows, markdown(rows, meta, command_line("bench_sweep.py",
                                                                                                     argv)))


def markdown(rows, meta, command) -> str:
    overhead = [r for r in rows if r["section"] == "overhead"]
    trial_s = overhead[0]["trial_cpu_s"] / meta["threads"]  # the length of a trial on an idle machine
    wall_pct, cpu_pct = overhead[1]["overhead_pct"], overhead[1]["overhead_cpu_pct"]
    contended = meta["load_avg_1min"] > 0.5 * meta["cores"]
    judged, pct = ("CPU time (the machine was shared: load average "
                   f"{meta['load_avg_1min']:.1f} on {meta['cores']} cores)", cpu_pct) if contended else ("wall time",
                                                                                                      wall_pct)
    if meta["quick"] or trial_s < 30:
        target = (f"n/a: {'--quick, ' if meta['quick'] else ''}trials of {trial_s:.1f} s here (the goal is for "
                  f"1-minute trials); overhead {wall_pct:.1f}% wall, {cpu_pct:.1f}% CPU")
    else:
        target = (f"{'met' if pct < 5 else 'NOT met'}: {pct:.1f}% on trials of {trial_s:.0f} s, judged on {judged} "
                  f"(goal: under 5%); wall {wall_pct:.1f}%, CPU {cpu_pct:.1f}%")
    lines = [f"# bench_sweep ({meta['device']}, {meta['cores']} cores, torch {meta['torch']}, {meta['git_sha']}, "
             f"{meta['date']})", "", f"`{command}`; data: {meta['data']}; load average {meta['load_avg_1min']:.1f} at "
             f"the start, {meta['load_avg_1min_end']:.1f} at the end.", "",
             markdown_table(overhead, [("what", lambda r: r["method"]), ("trials", lambda r: str(r["trials"])),
                                       ("epochs", lambda r: str(r["epochs"])),
                                       ("wall (s)", lambda r: f"{r['seconds']:.2f}"),
                                       ("CPU (s)", lambda r: f"{r['cpu_s']:.2f}"),
                                       ("CPU per trial (s)", lambda r: f"{r['trial_cpu_s']:.2f}"),
                                       ("overhead / trial, wall (s)", lambda r: f"{r['overhead_s_per_trial']:.2f}"
                                        if "overhead_s_per_trial" in r else None),
                                       ("overhead / trial, CPU (s)", lambda r: f"{r['overhead_cpu_s_per_trial']:.2f}"
                                        if "overhead_cpu_s_per_trial" in r else None),
                                       ("overhead wall", lambda r: f"{r['overhead_pct']:.1f}%" if "overhead_pct" in r
                                        else None),
                                       ("overhead CPU", lambda r: f"{r['overhead_cpu_pct']:.1f}%"
                                        if "overhead_cpu_pct" in r else None)]), ""]
    throughput = [r for r in rows if r["section"] == "throughput"]
    if throughput:
        lines += [markdown_table(throughput,
                                 [("workers", lambda r: str(r["workers"])), ("threads each", lambda r: str(r["threads"])),
                                  ("wall (s)", lambda r: f"{r['seconds']:.2f}"), ("CPU (s)", lambda r: f"{r['cpu_s']:.2f}"),
                                  ("trials / min", lambda r: f"{r['trials_per_min']:.2f}"),
                                  ("vs 1 worker", lambda r: f"{r['speedup_vs_1_worker']:.2f}x")]), ""]
    lines += ["## Targets", "", f"- runner overhead: {target}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
