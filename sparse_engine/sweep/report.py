"""Tables of a sweep's results: mean and spread over seeds per model, method and sparsity.

    print(report_table(records))                      # markdown, test accuracy in %
    report_table(records, metric="test_loss", fmt="csv")

Markdown: one row per (model, method), one column per target sparsity, ``mean ± std`` over seeds
(the sample standard deviation; just the mean for one seed), the dense parents as ``dense`` rows
(their value in every column), and the trials' total wall time. CSV: one line per (model, method,
sparsity) with mean, std and the number of seeds.
"""
import csv
import io
import statistics
from typing import Optional

DONE = "done"


def metric_scale(metric: str) -> float:
    """Accuracies are shown in percent."""
    return 100.0 if "accuracy" in metric else 1.0


def aggregate(records: list, metric: str = "test_accuracy") -> list[dict]:
    """``[{model, method, sparsity, mean, std, n, wall_s}]`` over the finished trials' seeds, in
    the order the (model, method, sparsity) groups first appear (parents as method "dense")."""
    groups: dict = {}
    for r in records:
        if r["state"] != DONE or metric not in r["metrics"]:
            continue
        key = (r["model"], r["method"], r["sparsity"])
        groups.setdefault(key, []).append(r)
    out = []
    for (model, method, sparsity), rows in groups.items():
        values = [r["metrics"][metric] for r in rows]
        out.append({"model": model, "method": method, "sparsity": sparsity, "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values),
                    "min": min(values), "max": max(values), "wall_s": sum(r["wall_s"] or 0.0 for r in rows)})
    return out


def report_table(records: list, metric: str = "test_accuracy", fmt: str = "markdown", digits: int = 2,
                 scale: Optional[float] = None, label: Optional[str] = None) -> str:
    """The table of ``records`` (``Sweep.results()``) as markdown or CSV (module docstring);
    ``label`` names the metric in the markdown header (default: the metric's name)."""
    if fmt not in ("markdown", "csv"):
        raise ValueError(f"fmt: expected 'markdown' or 'csv', got {fmt!r}")
    scale = metric_scale(metric) if scale is None else scale
    rows = aggregate(records, metric)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["model", "method", "sparsity", "metric", "mean", "std", "n", "wall_s"])
        for r in rows:
            writer.writerow([r["model"], r["method"], r["sparsity"], metric, r["mean"], r["std"], r["n"],
                             round(r["wall_s"], 3)])
        return buffer.getvalue()
    sparsities = sorted({r["sparsity"] for r in rows if r["method"] != "dense"})
    header = " | ".join(f"{label or metric} @ {100 * s:g}%" for s in sparsities)
    lines = ["| model | method | " + header + " | time (s) |",
             "|---|---|" + "---:|" * (len(sparsities) + 1)]
    order: dict = {}
    for r in rows:
        order.setdefault(r["model"], {}).setdefault(r["method"], {})[r["sparsity"]] = r
    for model, methods in order.items():
        dense = methods.pop("dense", None)
        for method, cells in ([("dense", dense)] if dense else []) + list(methods.items()):
            if method == "dense":
                by = {s: cells[0.0] for s in sparsities}
                wall = cells[0.0]["wall_s"]
            else:
                by, wall = cells, sum(c["wall_s"] for c in cells.values())

            def cell(c):
                text = f"{scale * c['mean']:.{digits}f}"
                return text + (f" ± {scale * c['std']:.{digits}f}" if c["n"] > 1 else "")
            lines.append(f"| {model} | {method} | " + " | ".join(cell(by[s]) if s in by else "-" for s in sparsities)
                         + f" | {wall:.1f} |")
    return "\n".join(lines)
