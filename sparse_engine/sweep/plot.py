"""Sparsity-vs-metric curves of a sweep, one panel per model, with the spread over seeds.

    plot_sweep(records, "sweep.png")                   # PNG, SVG or PDF by the file's extension
    plot_sweep(records, "sweep.svg", log_density=True) # x: density (1 - sparsity) on a log scale

Each method is a line through its mean over seeds, with a band from the lowest to the highest
seed when there are several; the dense parents are a dashed line (and band).
"""
from pathlib import Path
from typing import Callable, Union

from sparse_engine.sweep.report import aggregate, metric_scale

FORMATS = (".png", ".svg", ".pdf")


def plot_sweep(records: list, path: Union[str, Path], metric: str = "test_accuracy", log_density: bool = False,
               title: Union[str, Callable[[str], str]] = "{model}", dpi: int = 120) -> Path:
    """Write the figure of ``records`` (``Sweep.results()``) to ``path``; returns the path.
    ``title``: each panel's title, a format string of ``model`` or a function of it."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"path: expected a file ending in {', '.join(FORMATS)}, got {str(path)!r}")
    rows = aggregate(records, metric)
    if not rows:
        raise ValueError(f"records: no finished trial has the metric {metric!r}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = metric_scale(metric)
    unit = " (%)" if scale == 100.0 else ""
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        for method in dict.fromkeys(r["method"] for r in mine if r["method"] != "dense"):
            pts = sorted((r["sparsity"], r) for r in mine if r["method"] == method)
            x = [(1 - s if log_density else s) * 100 for s, _ in pts]
            line, = ax.plot(x, [scale * r["mean"] for _, r in pts], marker="o", label=method)
            if any(r["n"] > 1 for _, r in pts):
                ax.fill_between(x, [scale * r["min"] for _, r in pts], [scale * r["max"] for _, r in pts],
                                color=line.get_color(), alpha=0.15, linewidth=0)
        for r in (r for r in mine if r["method"] == "dense"):
            ax.axhline(scale * r["mean"], color="k", linestyle="--", label="dense")
            if r["n"] > 1:
                ax.axhspan(scale * r["min"], scale * r["max"], color="k", alpha=0.08, linewidth=0)
        if log_density:
            ax.set_xscale("log")
            ax.invert_xaxis()
        ax.set_title(title(model) if callable(title) else title.format(model=model))
        ax.set_xlabel("density (%, log scale)" if log_density else "sparsity (%)")
        ax.set_ylabel(metric.replace("_", " ") + unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
