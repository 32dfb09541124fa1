"""Reading a sweep directory: plain result records and status, without the sweep file.

The journal's latest ``sweep`` event lists the trials of the sweep the directory runs; their
configs and labels come from ``declared`` events, their state and results from the rest.
"""
import time
from pathlib import Path
from typing import Union

from sparse_engine.sweep.index import Index
from sparse_engine.sweep.journal import StoreError
from sparse_engine.sweep.store import Store

STATES = ("pending", "running", "done", "failed")


def _record(row: dict) -> dict:
    labels = row["labels"] or {}
    return {"id": row["id"], "kind": row["kind"], "state": row["state"], "parent": row["parent"],
            "model": labels.get("model"), "method": labels.get("method") if row["kind"] == "prune" else "dense",
            "sparsity": labels.get("sparsity", 0.0) if row["kind"] == "prune" else 0.0, "seed": labels.get("seed"),
            "labels": labels, "metrics": row["metrics"] or {}, "layers": row["layers"] or {},
            "wall_s": row["wall_s"], "epochs_done": row["epochs_done"], "attempts": row["attempts"],
            "device": row["device"], "threads": row["threads"], "version": row["version"],
            "git_sha": row["git_sha"], "error": row["error"], "traceback": row["traceback"], "config": row["config"]}


class SweepResults:
    """The results of the sweep in ``directory`` (read-only)."""

    def __init__(self, directory: Union[str, Path]):
        self.store = Store(directory)
        if not self.store.exists():
            raise StoreError(2, f"{directory}: not a sweep directory (no manifest.json); run a sweep file there first")

    def _index(self) -> Index:
        return Index.read(self.store.journal, self.store.index_path)

    def _trial_ids(self, index: Index) -> list:
        manifest = self.store.manifest() or {}
        return manifest.get("trials", [])

    def records(self, with_history: bool = False) -> list[dict]:
        """One plain dict per trial of the sweep, parents (``kind="pretrain"``) first: labels
        (``model``, ``method``, ``sparsity``, ``seed``), ``state``, ``metrics`` (final, a dict of
        numbers), ``layers`` (per-layer sparsity), ``wall_s``, device, versions, ``config``;
        ``history`` (per-epoch metrics) with ``with_history``."""
        index = self._index()
        try:
            ids = self._trial_ids(index)
            out = []
            for row in index.trials(ids):
                record = _record(row)
                if with_history:
                    record["history"] = index.history(row["id"])
                out.append(record)
            return out
        finally:
            index.close()

    def status(self) -> dict:
        """Counts by state, epochs done and left, and an ETA from the finished trials' speed."""
        records = self.records()
        counts = {s: sum(r["state"] == s for r in records) for s in STATES}
        total = {r["id"]: (r["config"] or {}).get("pretrain" if r["kind"] == "pretrain" else "train", {}).get(
            "epochs", 0) for r in records}
        done_epochs = sum(total[r["id"]] if r["state"] == "done" else r["epochs_done"] for r in records)
        left = sum(total.values()) - done_epochs
        finished = [r for r in records if r["state"] == "done" and r["wall_s"] and total[r["id"]]]
        per_epoch = (sum(r["wall_s"] for r in finished) / sum(total[r["id"]] for r in finished)) if finished else None
        workers = (self.store.manifest() or {}).get("workers") or 1
        return {"trials": len(records), **counts, "epochs_done": done_epochs, "epochs_left": left,
                "eta_s": None if per_epoch is None else left * per_epoch / workers,
                "directory": str(self.store.dir), "checked": time.time()}


def format_status(status: dict) -> str:
    eta = status["eta_s"]
    eta_text = "unknown (no finished trial yet)" if eta is None else (
        "0 s" if status["epochs_left"] == 0 else f"{eta / 60:.1f} min at the finished trials' speed")
    return (f"{status['directory']}: {status['trials']} trials: {status['done']} done, {status['failed']} failed, "
            f"{status['running']} running or interrupted, {status['pending']} pending; "
            f"epochs {status['epochs_done']} done, {status['epochs_left']} left; ETA {eta_text}")

