"""Figures of the paper protocol (``benchmarks/paper.py``) from its per-run JSON files.

The paper's Figures 1-2 on our data: test accuracy and training loss against epochs and against
training wall time (compilation excluded, see ``paper.py``), for the APTS variants (Figure 1:
full-batch APTS; Figure 2: minibatch SAPTS) against the best and the median Adam learning rate of
each Adam batch size. Every curve is the mean over the seeds of a configuration (the epoch times
too). Colours: the number of subdomains ``N``; solid = L-SR1 (second order), dashed = first order
(both the paper's method), dotted = the library's default (``order`` ``default``);
black/grey = Adam at the large/small batch size, solid = best LR, dotted = median LR.

Usable on its own (no JAX import)::

    python benchmarks/plot_paper.py benchmarks/results/paper      # rewrites the PNG files
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["group_curves", "load_runs", "plot_dataset", "plot_lr_sensitivity", "plot_all"]

N_COLORS = {1: "tab:blue", 2: "tab:orange", 4: "tab:green", 8: "tab:red"}
#: Line style and label of a run's ``order`` (paper.py: "sr1", "fo", "default").
ORDER_STYLE = {"sr1": "-", "fo": "--", "default": ":"}
ORDER_LABEL = {"sr1": "L-SR1", "fo": "1st order", "default": "default (tuning-free)"}


def load_runs(root: str | Path) -> dict[str, list[dict[str, Any]]]:
    """``{dataset: [run JSON, ...]}`` for every ``<root>/<dataset>/<run>.json``."""
    root = Path(root)
    out: dict[str, list[dict[str, Any]]] = {}
    if not root.is_dir():
        return out
    for ds_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        runs = []
        for f in sorted(ds_dir.glob("*.json")):
            try:
                doc = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(doc, dict) and "history" in doc and "group" in doc:
                runs.append(doc)
        if runs:
            out[ds_dir.name] = runs
    return out


def group_curves(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean curves over the seeds of each group: ``{group: {epoch, time, acc, loss, seeds}}``.

    Only epochs that every seed of the group reached are kept.
    """
    by_group: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in runs:
        by_group[r["group"]].append(r)
    curves = {}
    for g, rs in by_group.items():
        n = min(len(r["history"]) for r in rs)
        if n == 0:
            continue

        def mean(key: str, rs=rs, n=n) -> list[float | None]:
            out = []
            for i in range(n):
                vals = [r["history"][i].get(key) for r in rs]
                vals = [v for v in vals if v is not None]
                out.append(sum(vals) / len(vals) if vals else None)
            return out

        curves[g] = {
            "epoch": [rs[0]["history"][i]["epoch"] for i in range(n)],
            "time": mean("train_time_excl_compile_s"),
            "acc": mean("test_accuracy"),
            "loss": mean("train_loss"),
            "seeds": len(rs),
            "run": rs[0],
        }
    return curves


def _adam_lines(summary_ds: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """``(group, label, colour, linestyle)`` of the best/median Adam curves per batch size."""
    lines = []
    per_batch = summary_ds.get("adam", {}).get("per_batch_size", {})
    sizes = sorted(per_batch, key=lambda b: -int(b))
    for i, b in enumerate(sizes):
        colour = "black" if i == 0 else "tab:gray"
        info = per_batch[b]
        for which, ls in (("best", "-"), ("median", ":")):
            entry = info.get(which)
            if entry:
                lines.append((entry["group"], f"Adam b={b} {which} (lr {entry['lr']:.2g})", colour,
                              ls))
    return lines


def plot_dataset(
    dataset: str,
    runs: Sequence[Mapping[str, Any]],
    summary_ds: Mapping[str, Any],
    out_dir: str | Path,
    *,
    title_note: str = "",
) -> list[Path]:
    """Write ``<dataset>_fig1_apts.png`` and ``<dataset>_fig2_sapts.png``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = group_curves(runs)
    adam = _adam_lines(summary_ds)
    target = summary_ds.get("target_accuracy")
    written = []
    for fig_no, method in ((1, "apts"), (2, "sapts")):
        groups = sorted(
            (g for g, c in curves.items() if c["run"]["method"] == method),
            key=lambda g: (curves[g]["run"]["params"].get("order") != "sr1",
                           curves[g]["run"]["params"].get("subdomains") or 0),
        )
        if not groups and not adam:
            continue
        fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
        panels = ((0, 0, "epoch", "acc"), (0, 1, "time", "acc"),
                  (1, 0, "epoch", "loss"), (1, 1, "time", "loss"))
        for row, col, xkey, ykey in panels:
            ax = axes[row][col]
            entries = []
            for g in groups:
                p = curves[g]["run"]["params"]
                n = p.get("subdomains") or 1
                ls = ORDER_STYLE.get(p.get("order"), "--")
                label = (f"{'APTS' if method == 'apts' else 'SAPTS'} N={n} "
                         f"{ORDER_LABEL.get(p.get('order'), '1st order')}")
                entries.append((g, label, N_COLORS.get(n, None), ls))
            entries += [e for e in adam if e[0] in curves]
            for g, label, colour, ls in entries:
                c = curves[g]
                xs, ys = c[xkey], c[ykey]
                pts = [(x, y) for x, y in zip(xs, ys, strict=True) if x is not None and y is not None
                       and (xkey == "epoch" or x > 0)]
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, color=colour,
                        label=f"{label} ({c['seeds']} seed{'s' if c['seeds'] != 1 else ''})",
                        marker="." if len(pts) < 30 else None)
            if ykey == "acc" and target is not None:
                ax.axhline(target, color="tab:purple", lw=0.8, alpha=0.6,
                           label="target (best Adam - 0.3 pp)")
            if ykey == "loss":
                ax.set_yscale("log")
            if xkey == "time":
                ax.set_xscale("log")
                ax.set_xlabel("training time, s (compilation excluded; mean over seeds)")
            else:
                ax.set_xlabel("epoch")
                ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_ylabel("test accuracy" if ykey == "acc" else "training loss (full train set)")
            ax.grid(True, which="both", alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
        name = "APTS, full batch" if method == "apts" else "SAPTS, minibatches"
        fig.suptitle(f"{dataset}: {name} vs best/median Adam{title_note}")
        fig.tight_layout(rect=(0, 0.12, 1, 0.97))
        path = out_dir / f"{dataset}_fig{fig_no}_{method}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_lr_sensitivity(dataset: str, summary_ds: Mapping[str, Any], out_dir: str | Path, *,
                        title_note: str = "") -> Path | None:
    """Write ``<dataset>_lr_sensitivity.png``: Adam/SGD final accuracy against the learning rate.

    One curve per optimizer and batch size (mean over seeds), and the final accuracy of every
    APTS/SAPTS configuration as a horizontal line (solid: L-SR1, dashed: first order, dotted: the
    library's default): the
    trust-region methods have no learning rate to tune. ``None`` when there is no grid to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = [(opt, b, info) for opt in ("adam", "sgd")
             for b, info in summary_ds.get(opt, {}).get("per_batch_size", {}).items()]
    if not grids:
        return None
    fig, ax = plt.subplots(figsize=(12, 5))
    for opt, b, info in grids:
        pts = [(float(lr), a) for lr, a in info["accuracy_by_lr"].items() if a is not None]
        ax.semilogx([p[0] for p in pts], [p[1] for p in pts], "o-" if opt == "adam" else "s:",
                    color="black" if int(b) >= 1000 else "grey", label=f"{opt}, batch {b}")
    for v in summary_ds.get("groups", {}).values():
        p = v["params"]
        if v["method"] not in ("apts", "sapts") or v["final_test_accuracy_mean"] is None:
            continue
        name = "APTS" if v["method"] == "apts" else f"SAPTS b={p.get('batch_size')}"
        ax.axhline(v["final_test_accuracy_mean"], ls=ORDER_STYLE.get(p.get("order"), "--"),
                   lw=1.2 if v["method"] == "sapts" else 0.8, alpha=0.8,
                   color=N_COLORS.get(p.get("subdomains")),
                   label=f"{name} N={p.get('subdomains')} "
                         f"{ORDER_LABEL.get(p.get('order'), '1st order')} (no lr)")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final test accuracy (mean over seeds)")
    ax.set_title(f"{dataset}: learning-rate sensitivity{title_note}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    path = Path(out_dir) / f"{dataset}_lr_sensitivity.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(root: str | Path, summary: Mapping[str, Any] | None = None,
             title_note: str = "") -> list[Path]:
    """Plot every dataset under ``root`` (summary read from ``root/summary.json`` if not given)."""
    root = Path(root)
    if summary is None:
        path = root / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {"datasets": {}}
    written = []
    for ds, runs in load_runs(root).items():
        s = summary.get("datasets", {}).get(ds, {})
        written += plot_dataset(ds, runs, s, root, title_note=title_note)
        lr_plot = plot_lr_sensitivity(ds, s, root, title_note=title_note)
        written += [lr_plot] if lr_plot else []
    return written


if __name__ == "__main__":
    for p in plot_all(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/paper"):
        print(f"wrote {p}")
