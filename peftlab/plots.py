"""Plots are an optional extra (peftlab[plots]): without matplotlib a plot is skipped with a one-line note."""
from __future__ import annotations

import json
from pathlib import Path

from .utils import save_figure


def pyplot(what: str):
    """matplotlib.pyplot on the Agg backend, or None (after a one-line note naming ``what``) when not installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"peftlab: {what} skipped: matplotlib is not installed (pip install 'peftlab[plots]')", flush=True)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rank_evolution(source: dict | str | Path, path: str | Path) -> Path | None:
    """PNG of every layer's rank (and the total) against the step, from a trainer history or a run's metrics.jsonl."""
    plt = pyplot("rank_evolution.png")
    if plt is None:
        return None
    if isinstance(source, dict):
        steps, ranks, total = source["step"], source["ranks"], source["total_rank"]
    else:
        rows = [json.loads(l) for l in Path(source).read_text().splitlines() if l.strip()]
        rows = [r for r in rows if "geolora/total_rank" in r]
        steps, total = [r["step"] for r in rows], [r["geolora/total_rank"] for r in rows]
        names = [k[len("geolora/rank/"):] for k in (rows[0] if rows else {}) if k.startswith("geolora/rank/")]
        ranks = {n: [r[f"geolora/rank/{n}"] for r in rows] for n in names}
    fig, (ax, ax_total) = plt.subplots(1, 2, figsize=(11, 4))
    for name, values in ranks.items():
        ax.plot(steps, values, lw=1, label=name if len(ranks) <= 12 else None)
    ax.set(xlabel="step", ylabel="rank", title="rank per layer")
    if 0 < len(ranks) <= 12:
        ax.legend(fontsize=6)
    ax_total.plot(steps, total, color="k")
    ax_total.set(xlabel="step", ylabel="total rank", title="total rank")
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path
