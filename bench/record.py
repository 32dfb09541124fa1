"""Where benchmark results go, shared by the benchmarks in bench/.

Every row carries the run's metadata (device, versions, git sha, date), so rows appended to a
device's ``<bench>_<device-slug>.jsonl`` over months stay comparable; the markdown table beside
it is rewritten by each run and shows that run only.
"""
import argparse
import datetime
import json
import platform
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

from sparse_engine.sweep import provenance

REPO = Path(__file__).resolve().parent.parent


def git_sha() -> str:
    """Short sha of HEAD, with ``-dirty`` when the work tree has changes; ``unknown`` outside git."""
    return provenance.git_sha(REPO)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: torch.device) -> str:
    name = slug(device_name(device))
    return name if device.type == "cuda" else f"cpu-{name}"


def run_metadata(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "git_sha": git_sha(),
    }


def append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, Callable[[dict], Optional[str]]]]) -> str:
    """A markdown table with one line per row; ``columns`` are (header, cell function) pairs and a
    cell function returning None shows as an em dash."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [cell(row) for _, cell in columns]
        lines.append("| " + " | ".join("—" if c is None else c for c in cells) + " |")
    return "\n".join(lines)


def write_results(out_dir: Path, name: str, rows: Sequence[dict], text: str) -> None:
    """Append ``rows`` to ``<out_dir>/<name>.jsonl``, rewrite ``<out_dir>/<name>.md`` with ``text``,
    and print the table and where it went."""
    append_jsonl(out_dir / f"{name}.jsonl", rows)
    (out_dir / f"{name}.md").write_text(text)
    print()
    print(text)
    print(f"wrote {out_dir / (name + '.md')} and appended {len(rows)} rows to {out_dir / (name + '.jsonl')}")


def results_dir(out_dir: Optional[Path], quick: bool, bench: str) -> Path:
    """``out_dir`` if given, else bench/results, or a fresh temporary directory for a quick smoke run."""
    if out_dir is not None:
        return out_dir
    return Path(tempfile.mkdtemp(prefix=f"bench_{bench}_")) if quick else REPO / "bench" / "results"


def command_line(script: str, argv: Optional[Sequence[str]] = None) -> str:
    """The command that ran ``bench/<script>`` with ``argv`` (default: this process's arguments)."""
    return " ".join(["python", f"bench/{script}", *(argv if argv is not None else sys.argv[1:])])


def add_run_arguments(p: argparse.ArgumentParser, quick: str) -> None:
    """The options every benchmark takes: --device, --out-dir, --quick (``quick`` says what it
    shrinks), --threads, --seed; check them with :func:`check_run_arguments`."""
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-dir", type=Path, help="default: bench/results (with --quick, a fresh temporary directory)")
    p.add_argument("--quick", action="store_true", help=f"{quick}, few repeats: the smoke test")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads; default: torch's). Where "
                   "other processes hold the cores, each parallel region of a multi-threaded call waits for its "
                   "descheduled threads: compare with --threads 1")
    p.add_argument("--seed", type=int, default=0)


def check_run_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads: expected a positive count, got {args.threads}")
