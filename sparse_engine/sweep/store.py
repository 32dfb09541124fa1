"""The sweep directory: an embedded store, no server.

::

    DIR/sweep.toml              the sweep file this directory runs (a copy)
    DIR/manifest.json           its fingerprint (the sorted trial ids) and name
    DIR/journal.jsonl           append-only events (journal.py): the source of truth
    DIR/index.sqlite            the SQL index (index.py), rebuilt from the journal on start
    DIR/trials/ID/checkpoint.pt the last epoch checkpoint of a running or interrupted trial
    DIR/trials/ID/model.pt      the final model's state_dict (masks included) of a finished trial
    DIR/.lock                   held by the coordinating process while it runs
    DIR/dispatch.json           the masked ops' measured implementation choices (ops.dispatch), shared by
                                the workers, so a resumed trial computes as it did before the interruption

Files are replaced atomically (written to a temporary file in the same directory, fsynced,
renamed, the directory fsynced), so a crash leaves the old version or the new one, never a torn
file. A worker holds ``trials/ID/.lock`` while it runs a trial, so no two processes ever run the
same trial, even if a worker outlived a killed coordinator.
"""
import fcntl
import io
import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from sparse_engine.sweep.journal import Journal, StoreError, store_error

CHECKPOINT, MODEL = "checkpoint.pt", "model.pt"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync the directory)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise store_error("write", path, e) from None


def save_torch(obj, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def load_torch(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


class FileLock:
    """An exclusive, non-blocking ``lockf`` lock on ``path``, released when the process dies."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def acquire(self) -> bool:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise store_error("create the lock file", self.path, e) from None
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            return False
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Store:
    """Paths and files of one sweep directory."""

    def __init__(self, directory: Union[str, Path]):
        self.dir = Path(directory)
        self.journal = Journal(self.dir / "journal.jsonl")
        self.index_path = self.dir / "index.sqlite"
        self.manifest_path = self.dir / "manifest.json"

    def create(self) -> None:
        """Make the directory (a clear StoreError if it cannot be written)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "trials").mkdir(exist_ok=True)
            probe = self.dir / f".write-test{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise store_error("write to the sweep directory", self.dir, e) from None

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> Optional[dict]:
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise StoreError(5, f"cannot read {self.manifest_path}: {e}") from None

    def write_manifest(self, manifest: dict, source_text: str) -> None:
        atomic_write(self.dir / "sweep.toml", source_text.encode())
        atomic_write(self.manifest_path, json.dumps(manifest, indent=2).encode())

    def trial_dir(self, trial: str) -> Path:
        return self.dir / "trials" / trial

    def checkpoint(self, trial: str) -> Path:
        return self.trial_dir(trial) / CHECKPOINT

    def model(self, trial: str) -> Path:
        return self.trial_dir(trial) / MODEL

    def lock(self) -> FileLock:
        return FileLock(self.dir / ".lock")

    @property
    def dispatch_path(self) -> Path:
        return self.dir / "dispatch.json"

    def share_dispatch_choices(self, choices: dict) -> None:
        """Add ``choices`` (``ops.dispatch.choices()``) to ``dispatch.json``, under an exclusive lock: the keys it
        lacks; a recorded choice is never changed (the trials that used it may resume from checkpoints)."""
        try:
            fd = os.open(self.dir / ".dispatch.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise store_error("create the lock file", self.dir / ".dispatch.lock", e) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)  # blocking: held only for a read and a small write
            try:
                shared = json.loads(self.dispatch_path.read_text())["choices"]
            except FileNotFoundError:
                shared = {}
            merged = {**choices, **shared}
            if merged != shared:
                atomic_write(self.dispatch_path, json.dumps({"version": 1, "choices": merged}, indent=1,
                                                            sort_keys=True).encode())
        except OSError as e:
            raise store_error("update", self.dispatch_path, e) from None
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(5, f"cannot read {self.dispatch_path}: {e!r}") from None
        finally:
            os.close(fd)

    def trial_lock(self, trial: str) -> FileLock:
        directory = self.trial_dir(trial)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise store_error("create", directory, e) from None
        return FileLock(directory / ".lock")
