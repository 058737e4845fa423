"""Plots of the tuning-free ablation (``benchmarks/tuning_free.py``): per problem, the final metric of
Adam against its learning rate (one line per batch size, error bars = std over seeds) and every
APTS/SAPTS configuration as a horizontal line (dotted band = its std over seeds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_protocol(ps: dict[str, Any], path: Path, title: str = "") -> Path | None:
    """One panel per problem of a protocol summary (``summary["protocols"][name]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = ps["problems"]
    if not problems:
        return None
    n = len(problems)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    for ax, (pname, s) in zip(axes.flat, problems.items(), strict=False):
        higher = s["higher_is_better"]
        scale = 100.0 if higher else 1.0
        for b, info in s.get("adam_per_batch", {}).items():
            lrs = [float(k) for k in info["metric_by_lr"]]
            vals = [v[0] * scale for v in info["metric_by_lr"].values()]
            err = [(v[1] or 0.0) * scale for v in info["metric_by_lr"].values()]
            ax.errorbar(lrs, vals, yerr=err, marker="o", ms=3, capsize=2, label=f"Adam b{b}")
        cmap = plt.get_cmap("tab10")
        k = 2
        for g, v in sorted(s["groups"].items()):
            if v["method"] == "adam" or v["final_metric_mean"] is None:
                continue
            m, sd = v["final_metric_mean"] * scale, (v["final_metric_std"] or 0.0) * scale
            c = cmap(k % 10)
            k += 1
            # No Adam runs on this problem yet (so no target): no "reached" count.
            reached = f" ({v['reached']} reach target)" if "reached" in v else ""
            ax.axhline(m, color=c, lw=1.5, label=f"{g}{reached}")
            if sd:
                ax.axhspan(m - sd, m + sd, color=c, alpha=0.12)
        if s.get("target") is not None:
            ax.axhline(s["target"] * scale, color="k", ls="--", lw=0.8, label="target")
        ax.set_xscale("log")
        if not higher:
            ax.set_yscale("log")
        ax.set_xlabel("Adam learning rate")
        ax.set_ylabel("final test accuracy (%)" if higher else "final test MSE")
        if higher and s.get("target") is not None:
            ax.set_ylim(max(ax.get_ylim()[0], s["target"] * 100 - 15), None)
        ax.set_title(f"{pname} ({s['num_runs']} runs)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"Tuning-free ablation: {title}" + (" — SCREENS" if ps.get("screen") else ""))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
