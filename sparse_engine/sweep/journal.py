"""The sweep's append-only journal: one JSON event a line, written by workers and the coordinator.

Every event is appended with one ``write()`` on a file opened with ``O_APPEND``, under an
exclusive ``lockf`` lock (POSIX record locks also hold on NFS), so lines from concurrent
processes never interleave. A line cut short by a crash (``kill -9`` mid-write, a full disk) is
skipped with a warning when read; :meth:`Journal.repair` ends such a torn tail with a newline
before anything is appended after it, so the next event starts on a line of its own.

Events (all carry ``event``, ``trial`` and ``time``):

=================  ============================================================================
``started``        a worker began (or resumed, ``from_epoch > 0``) a trial; ``attempt``, ``worker``
``epoch``          an epoch ended and its checkpoint was written: ``epoch``, ``metrics``
``finished``       ``metrics`` (final, an open dict of numbers), ``layers`` (per-layer
                   sparsity), ``history`` (per-epoch metrics), ``wall_s``, ``device``,
                   ``threads``, ``version``, ``git_sha``
``failed``         ``error``, ``traceback``
``declared``       the coordinator adopted a sweep file that declares this trial: ``kind``,
                   ``parent``, ``labels``, ``config``
``sweep``          the coordinator adopted a sweep file: ``fingerprint``, ``name``
``run``            the coordinator started its executor: ``settings`` (executor, workers,
                   threads per worker, device, ...), ``todo``
=================  ============================================================================
"""
import errno
import fcntl
import json
import os
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional, Union


class StoreError(OSError):
    """The sweep directory cannot be written (disk full, permissions, not a directory...)."""

    def __str__(self) -> str:
        return str(self.strerror)


def store_error(action: str, path: Union[str, Path], e: OSError) -> StoreError:
    hint = {errno.ENOSPC: " (the disk is full)", errno.EDQUOT: " (the disk quota is full)",
            errno.EFBIG: " (the file size limit is reached)"}.get(e.errno, "")
    return StoreError(e.errno, f"cannot {action} {path}: {e.strerror or e}{hint}")


class Journal:
    """``append(event)`` and ``read(offset)`` on ``path`` (created on first append)."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)

    def append(self, event: dict) -> None:
        event = {"time": time.time(), **event}
        line = (json.dumps(event, separators=(",", ":"), allow_nan=True) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise store_error("open the journal", self.path, e) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, "short write")
            os.fsync(fd)
        except OSError as e:
            raise store_error("append to the journal", self.path, e) from None
        finally:
            os.close(fd)  # closing releases the lock

    def repair(self) -> bool:
        """End a torn last line with a newline; True when one was there."""
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() == 0:
                    return False
                f.seek(-1, os.SEEK_END)
                if f.read(1) == b"\n":
                    return False
        except FileNotFoundError:
            return False
        try:
            with open(self.path, "ab") as f:
                fcntl.lockf(f, fcntl.LOCK_EX)
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise store_error("repair the journal", self.path, e) from None
        return True

    def read(self, offset: int = 0, final: bool = True) -> tuple[list, int]:
        """The events from byte ``offset`` on, and the offset after the last whole line read.

        A line that is not valid JSON is skipped with a warning. An unterminated last line is a
        write in progress: it is left for the next read, unless ``final`` (nothing is writing).
        """
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return [], offset
        events = []
        end = len(data) if final else data.rfind(b"\n") + 1
        for number, raw in enumerate(data[:end].split(b"\n")):
            if not raw.strip():
                continue
            try:
                event = json.loads(raw)
                if not isinstance(event, dict) or "event" not in event:
                    raise ValueError("not an event")
            except ValueError:
                warnings.warn(f"{self.path}: skipped a corrupt journal line at byte {offset} (+line {number}): "
                              f"{raw[:80]!r}", RuntimeWarning, stacklevel=2)
                continue
            events.append(event)
        return events, offset + end

    def events(self) -> Iterator[dict]:
        yield from self.read(0)[0]

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0


def last_event(events, trial: str, kinds: tuple) -> Optional[dict]:
    for event in reversed(events):
        if event.get("trial") == trial and event["event"] in kinds:
            return event
    return None
