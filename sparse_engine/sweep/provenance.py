"""What code produced a result: the library's version and the git sha of its checkout."""
import functools
import subprocess
from pathlib import Path
from typing import Union

REPO = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=8)
def git_sha(repo: Union[str, Path] = REPO) -> str:
    """Short sha of HEAD of ``repo`` (default: this checkout of sparse_engine), with ``-dirty`` when
    the work tree has changes; ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def library_version() -> str:
    from sparse_engine import __version__
    return __version__
