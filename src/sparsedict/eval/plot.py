"""Pareto plots (matplotlib, Agg backend): L0 vs FVU and L0 vs CE-loss recovered, one curve per architecture."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plot_pareto(points: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Draw ``points`` (dicts with ``architecture``, ``l0``, ``fvu`` and optionally ``ce_recovered``).

    Left panel: FVU against L0 (log x); right panel: CE-loss recovered against L0 (when any point has
    it). Each architecture is one line through its points sorted by L0, each point labelled with its
    swept parameter.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_ce = any(_finite(p.get("ce_recovered")) for p in points)
    panels = [("fvu", "FVU (fraction of variance unexplained)")]
    if has_ce:
        panels.append(("ce_recovered", "CE-loss recovered"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    archs = sorted({p["architecture"] for p in points})
    colours = plt.get_cmap("tab10")
    for ax, (key, label) in zip(axes[0], panels):
        for i, arch in enumerate(archs):
            pts = sorted((p for p in points if p["architecture"] == arch and _finite(p.get(key)) and p["l0"] > 0),
                         key=lambda p: p["l0"])  # fmt: skip
            if not pts:
                continue
            xs, ys = [p["l0"] for p in pts], [p[key] for p in pts]
            ax.plot(xs, ys, "o-", color=colours(i % 10), label=arch)
            for p, x, y in zip(pts, xs, ys):
                tag = ",".join(f"{k}={v}" for k, v in (p.get("params") or {}).items())
                ax.annotate(tag, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active latents per token, held-out)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
