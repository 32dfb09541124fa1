"""The sweep's SQLite index: trials, their state and results, queryable with SQL.

Written by the coordinating process only, and always derivable from the journal: on start the
coordinator rebuilds it from the journal into a temporary file and renames it over the old one
(so a crash leaves either the old index or the new, never half of one), then applies new journal
events as they arrive, one transaction per batch. Readers (``status``, ``report``) use the file
when it has seen the whole journal, else an in-memory rebuild.

Tables::

    trials(id, kind, parent, labels, config, state, attempts, epochs_done, metrics, layers,
           wall_s, device, threads, version, git_sha, error, traceback, updated, measured)
    epochs(trial, epoch, metrics)            -- one row per (trial, epoch): no duplicates
    meta(key, value)                         -- journal_offset, fingerprint

``state`` is ``pending``, ``running`` (started, not finished: running now, or interrupted),
``done`` or ``failed``. JSON columns hold JSON text. ``measured`` lists the sweep metrics whose
values ``metrics`` holds: a metric added to the sweep file later is measured on the finished models
(an ``evaluated`` event merges its values in) without training them again.
"""
import json
import os
import sqlite3
from pathlib import Path
from typing import Iterable, Optional

from sparse_engine.sweep.journal import Journal, StoreError, store_error

SCHEMA = """
CREATE TABLE IF NOT EXISTS trials (
    id TEXT PRIMARY KEY, kind TEXT, parent TEXT, labels TEXT, config TEXT, state TEXT DEFAULT 'pending',
    attempts INTEGER DEFAULT 0, epochs_done INTEGER DEFAULT 0, metrics TEXT, layers TEXT, wall_s REAL,
    device TEXT, threads INTEGER, version TEXT, git_sha TEXT, error TEXT, traceback TEXT, updated REAL,
    measured TEXT);
CREATE TABLE IF NOT EXISTS epochs (trial TEXT, epoch INTEGER, metrics TEXT, PRIMARY KEY (trial, epoch));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""
RESULT_COLUMNS = ("metrics", "layers", "wall_s", "device", "threads", "version", "git_sha", "measured")
JSON_COLUMNS = ("labels", "config", "metrics", "layers", "measured")


def _apply(db: sqlite3.Connection, event: dict) -> None:
    kind, trial, when = event["event"], event.get("trial"), event.get("time")
    if kind == "sweep":
        db.execute("INSERT OR REPLACE INTO meta VALUES ('fingerprint', ?)", (event["fingerprint"],))
        return
    if trial is None:
        return
    db.execute("INSERT OR IGNORE INTO trials (id) VALUES (?)", (trial,))
    if kind == "declared":
        db.execute("UPDATE trials SET kind=?, parent=?, labels=?, config=? WHERE id=?",
                   (event["kind"], event.get("parent"), json.dumps(event["labels"]), json.dumps(event["config"]),
                    trial))
    elif kind == "started":
        db.execute("UPDATE trials SET state='running', attempts=attempts+1, epochs_done=?, error=NULL, "
                   "traceback=NULL, updated=? WHERE id=? AND state != 'done'", (event.get("from_epoch", 0), when,
                                                                                trial))
    elif kind == "epoch":
        db.execute("INSERT OR REPLACE INTO epochs VALUES (?, ?, ?)", (trial, event["epoch"],
                                                                      json.dumps(event["metrics"])))
        db.execute("UPDATE trials SET epochs_done=MAX(epochs_done, ?), updated=? WHERE id=? AND state != 'done'",
                   (event["epoch"], when, trial))
    elif kind == "finished":
        # The finished event carries the whole per-epoch history: the final word on it.
        db.execute("DELETE FROM epochs WHERE trial=?", (trial,))
        db.executemany("INSERT INTO epochs VALUES (?, ?, ?)",
                       [(trial, i + 1, json.dumps(m)) for i, m in enumerate(event.get("history", []))])
        values = [json.dumps(event.get(c)) if c in JSON_COLUMNS else event.get(c) for c in RESULT_COLUMNS]
        db.execute(f"UPDATE trials SET state='done', epochs_done=?, error=NULL, traceback=NULL, updated=?, "
                   f"{', '.join(c + '=?' for c in RESULT_COLUMNS)} WHERE id=?",
                   (len(event.get("history", [])), when, *values, trial))
    elif kind == "evaluated":
        row = db.execute("SELECT metrics, measured FROM trials WHERE id=? AND state='done'", (trial,)).fetchone()
        if row is not None:
            metrics = {**json.loads(row[0] or "{}"), **event["metrics"]}
            measured = list(dict.fromkeys((json.loads(row[1]) if row[1] else []) + event["measured"]))
            db.execute("UPDATE trials SET metrics=?, measured=?, updated=? WHERE id=?",
                       (json.dumps(metrics), json.dumps(measured), when, trial))
    elif kind == "failed":
        db.execute("UPDATE trials SET state='failed', error=?, traceback=?, updated=? WHERE id=? AND state != 'done'",
                   (event.get("error"), event.get("traceback"), when, trial))


class Index:
    """An open index; ``apply(events, offset)`` records events and the journal offset they end at."""

    def __init__(self, db: sqlite3.Connection, path: Optional[Path] = None):
        self.db, self.path = db, path

    @classmethod
    def build(cls, journal: Journal, path: Optional[Path] = None) -> "Index":
        """The index of everything in ``journal``: in memory (``path`` None) or written to a
        temporary file, fsynced and renamed to ``path``."""
        events, offset = journal.read(0)
        if path is None:
            index = cls(sqlite3.connect(":memory:"))
            index.db.executescript(SCHEMA)
            index.apply(events, offset)
            return index
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        try:
            tmp.unlink(missing_ok=True)
            db = sqlite3.connect(tmp)
            db.executescript(SCHEMA)
            cls(db).apply(events, offset)
            db.close()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, sqlite3.Error) as e:
            tmp.unlink(missing_ok=True)
            raise _error("rebuild the index", path, e) from None
        return cls(sqlite3.connect(path), path)

    @classmethod
    def read(cls, journal: Journal, path: Path) -> "Index":
        """For readers: the index file if it has seen the whole journal, else a rebuild in memory."""
        if path.exists():
            try:
                db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
                row = db.execute("SELECT value FROM meta WHERE key='journal_offset'").fetchone()
                if row is not None and int(row[0]) == journal.size():
                    return cls(db, path)
                db.close()
            except sqlite3.Error:
                pass
        return cls.build(journal, None)

    def apply(self, events: Iterable[dict], offset: int) -> None:
        try:
            with self.db:  # one transaction: all of these events or none
                for event in events:
                    _apply(self.db, event)
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('journal_offset', ?)", (str(offset),))
        except sqlite3.Error as e:
            raise _error("update the index", self.path or ":memory:", e) from None

    def trials(self, ids: Optional[Iterable[str]] = None) -> list[dict]:
        """Every trial row as a dict (JSON columns decoded), in ``ids`` order when given."""
        self.db.row_factory = sqlite3.Row
        rows = {r["id"]: dict(r) for r in self.db.execute("SELECT * FROM trials")}
        for r in rows.values():
            for c in JSON_COLUMNS:
                r[c] = json.loads(r[c]) if r.get(c) is not None else None
        return [rows[i] for i in ids if i in rows] if ids is not None else list(rows.values())

    def history(self, trial: str) -> list[dict]:
        rows = self.db.execute("SELECT metrics FROM epochs WHERE trial=? ORDER BY epoch", (trial,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def journal_offset(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key='journal_offset'").fetchone()
        return int(row[0]) if row else 0

    def state(self, trial: str) -> str:
        row = self.db.execute("SELECT state FROM trials WHERE id=?", (trial,)).fetchone()
        return row[0] if row else "pending"

    def states(self) -> dict[str, str]:
        """Every recorded trial's state (a trial absent here is pending), in one query."""
        return dict(self.db.execute("SELECT id, state FROM trials"))

    def close(self) -> None:
        self.db.close()


def _error(action: str, path, e: Exception) -> StoreError:
    if isinstance(e, OSError):
        return store_error(action, path, e)
    full = "full" in str(e)
    return StoreError(28 if full else 5, f"cannot {action} {path}: {e}{' (the disk is full)' if full else ''}")
