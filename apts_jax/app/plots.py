"""PNG plots of a training run (matplotlib, Agg backend: no display needed).

* ``loss.png``: train and test loss against epochs (with the per-iteration optimizer loss, faint,
  at fractional epochs) and against wall time;
* ``accuracy.png``: train and test accuracy against epochs and against wall time;
* ``radius.png``: the trust-region radius per iteration (log scale) with rejected steps marked;
  for optimizers without a radius (adam, sgd, lbfgs) the panel says so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["PNG_SIGNATURE", "is_png", "write_plots"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _series(rows: Sequence[Mapping[str, Any]], x: str, y: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in rows:
        a, b = r.get(x), r.get(y)
        if a is None or b is None:
            continue
        a, b = float(a), float(b)
        if math.isfinite(a) and math.isfinite(b):
            xs.append(a)
            ys.append(b)
    return xs, ys


def is_png(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` starts with the PNG signature."""
    with open(path, "rb") as f:
        return f.read(8) == PNG_SIGNATURE


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)


def write_plots(
    out_dir: str | os.PathLike[str],
    epochs: Sequence[Mapping[str, Any]],
    iterations: Sequence[Mapping[str, Any]],
    *,
    title: str = "",
) -> list[Path]:
    """Write ``loss.png``, ``accuracy.png`` and ``radius.png`` into ``out_dir``; return the paths.

    ``epochs`` are the metric rows of :mod:`apts_jax.app.metrics` (``epoch``, ``wall_time_s``,
    ``train_loss``, ...), ``iterations`` the per-iteration rows (``iteration``, ``epoch``,
    ``loss``, ``radius``, ``accepted``).
    """
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    # Iteration -> fractional epoch (iteration j of epoch e with K_e iterations: e - 1 + j / K_e).
    frac = []
    by_epoch: dict[int, list[Mapping[str, Any]]] = {}
    for r in iterations:
        by_epoch.setdefault(int(r["epoch"]), []).append(r)
    for e, rs in sorted(by_epoch.items()):
        k = len(rs)
        for j, r in enumerate(rs, start=1):
            frac.append({**r, "epoch_frac": e - 1 + j / k})

    def two_panels(metric: str, label: str, fname: str, with_iters: bool) -> None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, xkey, xlabel in ((axes[0], "epoch", "epoch"), (axes[1], "wall_time_s",
                                                                 "wall time [s]")):
            if with_iters and xkey == "epoch":
                xs, ys = _series(frac, "epoch_frac", "loss")
                if xs:
                    ax.plot(xs, ys, color="0.7", lw=0.8, label="optimizer (per iteration)")
            for split, style in (("train", "o-"), ("test", "s--")):
                xs, ys = _series(epochs, xkey, f"{split}_{metric}")
                if xs:
                    ax.plot(xs, ys, style, label=split)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend()
        if metric == "loss":
            ys = [y for _, y in zip(*_series(epochs, "epoch", "train_loss"), strict=True)]
            if ys and min(ys) > 0 and max(ys) / min(ys) > 20:
                for ax in axes:
                    ax.set_yscale("log")
        fig.suptitle(f"{title} — {label}" if title else label)
        fig.tight_layout()
        path = out / fname
        _save(fig, path)
        plt.close(fig)
        paths.append(path)

    two_panels("loss", "cross-entropy loss", "loss.png", with_iters=True)
    two_panels("accuracy", "accuracy", "accuracy.png", with_iters=False)

    fig, ax = plt.subplots(figsize=(7, 4))
    xs, ys = _series(iterations, "iteration", "radius")
    if xs:
        ax.plot(xs, ys, "-", lw=1.0, label="radius after the iteration")
        rej = [(r["iteration"], r["radius"]) for r in iterations
               if r.get("accepted") is False and r.get("radius") is not None]
        if rej:
            ax.plot(*zip(*rej, strict=True), "rx", ms=4, label="rejected step")
        if min(ys) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("trust-region radius")
        ax.grid(alpha=0.3)
        ax.legend()
    else:
        ax.text(0.5, 0.5, "this optimizer has no trust-region radius", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title(f"{title} — radius" if title else "radius")
    fig.tight_layout()
    path = out / "radius.png"
    _save(fig, path)
    plt.close(fig)
    paths.append(path)
    return paths
