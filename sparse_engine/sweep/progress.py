"""The runner's progress display: one bar over the epochs left, with ETA and what each worker runs.

tqdm shows it on a terminal and stays quiet otherwise (``enabled=None``), or as ``enabled`` says.
"""
from typing import Optional

from tqdm import tqdm


class Progress:
    """Counts epochs from the journal's ``epoch``/``finished``/``failed`` events of ``todo``."""

    def __init__(self, todo: list, index, enabled: Optional[bool]):
        self.specs = {t.id: t for t in todo}
        rows = {r["id"]: r for r in index.trials([t.id for t in todo])}
        self.seen = {t.id: min(rows.get(t.id, {}).get("epochs_done") or 0, t.epochs) for t in todo}
        total = sum(t.epochs for t in todo)
        self.bar = tqdm(total=total, initial=sum(self.seen.values()), unit="epoch", desc="sweep",
                        disable=None if enabled is None else not enabled, dynamic_ncols=True, leave=True)

    def _advance(self, trial: str, epoch: int) -> None:
        epoch = min(epoch, self.specs[trial].epochs)
        if epoch > self.seen[trial]:
            self.bar.update(epoch - self.seen[trial])
            self.seen[trial] = epoch

    def update(self, events: list, running: dict) -> None:
        for e in events:
            trial = e.get("trial")
            if trial not in self.specs:
                continue
            if e["event"] == "epoch":
                self._advance(trial, e["epoch"])
            elif e["event"] in ("finished", "failed"):
                self._advance(trial, self.specs[trial].epochs)
        if running and not self.bar.disable:
            status = [f"{w}: {s.describe()} {self.seen.get(s.id, 0)}/{s.epochs}"
                      for w, unit in sorted(running.items()) for s in unit]
            self.bar.set_postfix_str(" | ".join(status), refresh=False)

    def close(self) -> None:
        self.bar.close()
