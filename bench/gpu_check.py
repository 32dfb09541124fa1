"""One command for a lent GPU: does it work, and how fast (`make gpu-check`).

On a CUDA machine, in order, each step with its own time limit (the whole is sized to finish in
under 8 minutes on an H100/H200):

  1. build   the C++/CUDA extension for sm_90a (TORCH_CUDA_ARCH_LIST=9.0a, pip install -e .)
  2. pytest  `pytest -m gpu` over tests/
  3. bench   every bench/bench_*.py in its --quick mode on --device cuda (bench_models.py too, when
             it exists): each prints its table, with the configs/dispatch choices it reports
  4. demo    the demo on one model, one method, a small budget (needs Fashion-MNIST; skipped, with
             the reason, when the data is not there)

Everything goes under one results folder (default bench/results/gpu-check-<device>), at most 8 files:
summary.md (steps, status, seconds, the environment), build.txt, pytest.txt, bench.txt (every
benchmark's output), bench.jsonl (their result rows) and bench.md (their tables), demo.txt.

Without a GPU it runs in skip mode: it says so in summary.md, skips the GPU steps, and checks that
every planned benchmark still takes the options used here (--quick, --out-dir, --device), so the
command keeps working between GPU sessions (tests/test_gpu_check.py runs this mode in CI).

  python bench/gpu_check.py                 # make gpu-check
  python bench/gpu_check.py --out /tmp/gc   # another results folder
"""
import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Seconds per step: build + tests + benchmarks + demo stay under 8 minutes.
LIMITS = {"build": 150, "pytest": 120, "bench": 35, "demo": 60}
TOTAL_LIMIT = 8 * 60
NOT_BENCHMARKS = {"bench/gpu_check.py"}


def benchmarks() -> list[Path]:
    """The benchmarks to run: every bench/bench_*.py (bench_models.py included when present)."""
    return sorted(p for p in (REPO / "bench").glob("bench_*.py") if str(p.relative_to(REPO)) not in NOT_BENCHMARKS)


def _run(cmd: list, log: Path, limit: float, env=None) -> tuple[str, float]:
    """Runs cmd, appending its output to log; returns (status, seconds)."""
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(str(c) for c in cmd)}\n")
        f.flush()
        try:
            proc = subprocess.run([str(c) for c in cmd], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=max(1.0, limit), env=env)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
        f.write(f"\n[{status}]\n\n")
    return status, time.perf_counter() - start


def _help(script: Path) -> str:
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    return proc.stdout if proc.returncode == 0 else ""


def _bench_command(script: Path, help_text: str, out_dir: Path, device: str) -> list:
    cmd = [sys.executable, script, "--quick", "--out-dir", out_dir]
    if "--device" in help_text:
        cmd += ["--device", device]
    return cmd


def _environment() -> list[str]:
    import torch
    import triton
    lines = [f"- python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"- device: {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
                     f"{torch.cuda.device_count()} visible")
    else:
        lines.append("- device: none (no CUDA device visible to torch)")
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    lines.append(f"- git {sha.strip() or 'unknown'}, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    return lines


def _collect(scratch: Path, out: Path) -> None:
    """Appends every benchmark's result rows and tables to bench.jsonl and bench.md."""
    for suffix, name in ((".jsonl", "bench.jsonl"), (".md", "bench.md")):
        with open(out / name, "a") as f:
            for p in sorted(scratch.rglob(f"*{suffix}")):
                if suffix == ".md":
                    f.write(f"\n<!-- {p.relative_to(scratch)} -->\n")
                f.write(p.read_text())


def main(argv=None) -> int:
    import torch
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="results folder (default: bench/results/gpu-check-<device>)")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX files for the demo step")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    if args.out is None:
        name = torch.cuda.get_device_name(0).lower().replace(" ", "-") if gpu else "cpu"
        args.out = REPO / "bench" / "results" / f"gpu-check-{name}"
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("summary.md", "build.txt", "pytest.txt", "bench.txt", "bench.jsonl", "bench.md", "demo.txt"):
        (out / stale).unlink(missing_ok=True)

    start = time.perf_counter()
    rows = []  # (step, status, seconds)

    def left() -> float:
        return TOTAL_LIMIT - (time.perf_counter() - start)

    def step(name, cmd, log, limit, env=None):
        if left() < 5:
            rows.append((name, "skipped: the 8-minute budget is spent", 0.0))
            return
        status, seconds = _run(cmd, out / log, min(limit, left()), env)
        rows.append((name, status, seconds))

    scripts = benchmarks()
    with ThreadPoolExecutor(len(scripts)) as pool:  # the --help of each, at once (they import torch)
        helps = dict(zip(scripts, pool.map(_help, scripts)))
    if not gpu:
        # Skip mode: nothing here can run the GPU steps; check that the commands would still work.
        for script in scripts:
            help_text = helps[script]
            missing = [o for o in ("--quick", "--out-dir") if o not in help_text]
            status = f"failed: {script.name} lacks {missing}" if missing else "skipped (no GPU); options checked"
            rows.append((f"bench {script.name}", status, 0.0))
        for name in ("build (TORCH_CUDA_ARCH_LIST=9.0a)", "pytest -m gpu", "demo"):
            rows.append((name, "skipped (no GPU)", 0.0))
    else:
        env = dict(os.environ, TORCH_CUDA_ARCH_LIST="9.0a")
        step("build (TORCH_CUDA_ARCH_LIST=9.0a)",
             [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."],
             "build.txt", LIMITS["build"], env)
        step("pytest -m gpu", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
             "pytest.txt", LIMITS["pytest"])
        with tempfile.TemporaryDirectory() as scratch:
            for script in scripts:
                bench_out = Path(scratch) / script.stem
                step(f"bench {script.name}", _bench_command(script, helps[script], bench_out, "cuda"), "bench.txt",
                     LIMITS["bench"])
            _collect(Path(scratch), out)
        demo = [sys.executable, "-m", "sparse_engine.demo", "--device", "cuda", "--models", "mlp", "--methods",
                "one-shot", "--sparsities", "0.9", "--train-size", "2048", "--epochs", "1", "--retrain-epochs", "1",
                "--out", str(Path(tempfile.mkdtemp(prefix="gpu_check_demo_")))]
        if args.data_dir:
            demo += ["--data-dir", args.data_dir]
        from sparse_engine.data.fashion_mnist import resolve_data_dir
        try:
            resolve_data_dir(args.data_dir)
        except FileNotFoundError as e:
            rows.append(("demo", f"skipped: no Fashion-MNIST ({e})", 0.0))
        else:
            step("demo (mlp, one-shot, 2048 images, 1+1 epochs)", demo, "demo.txt", LIMITS["demo"])

    failed = [r for r in rows if r[1].startswith(("failed", "timed out"))]
    lines = ["# gpu-check", ""]
    if not gpu:
        lines += ["**Skip mode: no CUDA device.** The build for sm_90a, `pytest -m gpu`, the benchmarks and the",
                  "demo did not run; the benchmarks' options were checked.", ""]
    lines += _environment() + ["", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {status} | {seconds:.1f} |" for name, status, seconds in rows]
    lines += ["", f"Total {time.perf_counter() - start:.0f} s; {len(failed)} step(s) failed or timed out."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nresults in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
