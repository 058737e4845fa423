"""Metric files of a training run and the end-of-run summary table.

Per epoch (one row each, epoch 0 = the initial parameters before any iteration):

=================  =================================================================================
``epoch``          epochs done
``iterations``     optimizer iterations done (outer iterations for APTS/SAPTS), cumulative
``wall_time_s``    seconds since the run started (cumulative over ``--resume``; includes the
                   evaluation and the first epoch's compilation)
``train_time_s``   seconds spent in optimizer iterations only, cumulative
``train_loss``     mean cross-entropy over the whole (subset) training set at the epoch's end
``train_accuracy`` accuracy over the training set at the epoch's end
``batch_loss``     mean over the epoch's iterations of the loss the optimizer reported (its
                   (mini)batch loss after the iteration)
``test_loss``      mean cross-entropy over the (subset) test set
``test_accuracy``  accuracy over the test set
``radius``         trust-region radius at the epoch's end (empty for adam, sgd, lbfgs)
``accepted_frac``  fraction of the epoch's iterations whose step was accepted (trust-region
                   methods) or whose line search met the sufficient-decrease condition (lbfgs);
                   empty for adam and sgd
``grad_evals``     value-and-gradient evaluations by the optimizer, cumulative (APTS/SAPTS: per
                   subdomain, each on its own shard, so one evaluation = one pass over the
                   (mini)batch)
``data_passes``    ``grad_evals`` times the samples one evaluation touches, divided by the
                   training-set size: gradient work in full-data-gradient units
=================  =================================================================================

``metrics.csv`` (header + one line per epoch; empty cell = not applicable or non-finite) and
``metrics.jsonl`` (one JSON object per line; ``null`` = not applicable or non-finite) hold the same
rows. ``iterations.csv`` has one row per iteration (``iteration``, ``epoch``, ``loss``,
``radius``, ``accepted``, ``grad_evals``). Every file is rewritten whole through a temporary file
in the same folder, ``fsync`` and :func:`os.replace`, so a reader (or a crash) never sees half a
file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "EPOCH_FIELDS",
    "ITERATION_FIELDS",
    "atomic_write_text",
    "clean",
    "summary_table",
    "write_iterations",
    "write_metrics",
]

EPOCH_FIELDS = (
    "epoch",
    "iterations",
    "wall_time_s",
    "train_time_s",
    "train_loss",
    "train_accuracy",
    "batch_loss",
    "test_loss",
    "test_accuracy",
    "radius",
    "accepted_frac",
    "grad_evals",
    "data_passes",
)
ITERATION_FIELDS = ("iteration", "epoch", "loss", "radius", "accepted", "grad_evals")


def clean(value: Any) -> Any:
    """JSON-safe scalar: non-finite floats become None, numpy scalars plain Python."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    try:
        f = float(value)
    except (TypeError, ValueError):
        return value
    if hasattr(value, "dtype") and getattr(value.dtype, "kind", "f") in "iub":
        return int(value) if value.dtype.kind != "b" else bool(value)
    return f if math.isfinite(f) else None


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _csv_text(rows: Iterable[Mapping[str, Any]], fields: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(fields)
    for row in rows:
        out = []
        for k in fields:
            v = clean(row.get(k))
            out.append("" if v is None else (repr(v) if isinstance(v, float) else v))
        w.writerow(out)
    return buf.getvalue()


def write_metrics(out_dir: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """(Re)write ``metrics.csv`` and ``metrics.jsonl`` in ``out_dir`` from the epoch rows."""
    out = Path(out_dir)
    atomic_write_text(out / "metrics.csv", _csv_text(rows, EPOCH_FIELDS))
    lines = [
        json.dumps({k: clean(row.get(k)) for k in EPOCH_FIELDS}, allow_nan=False) for row in rows
    ]
    atomic_write_text(out / "metrics.jsonl", "".join(line + "\n" for line in lines))


def write_iterations(out_dir: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """(Re)write ``iterations.csv`` in ``out_dir`` from the per-iteration rows."""
    atomic_write_text(Path(out_dir) / "iterations.csv", _csv_text(rows, ITERATION_FIELDS))


def _fmt(value: Any, spec: str) -> str:
    v = clean(value)
    if v is None:
        return "-"
    if spec == "pct":
        return f"{100 * v:.2f}%"
    return format(v, spec)


def _ascii_head_rule() -> Any:
    from rich.box import Box

    # rich.box.SIMPLE_HEAD with "-": the table is printed to any terminal and written to a file.
    return Box("    \n    \n -- \n    \n    \n    \n    \n    \n", ascii=True)


def summary_table(rows: Sequence[Mapping[str, Any]], title: str = "") -> str:
    """A plain-text table of the epoch rows (for the terminal and ``summary.txt``), drawn by rich."""
    from rich.console import Console
    from rich.table import Table

    cols = (
        ("epoch", "epoch", "d"),
        ("iters", "iterations", "d"),
        ("time s", "wall_time_s", ".1f"),
        ("train loss", "train_loss", ".4f"),
        ("train acc", "train_accuracy", "pct"),
        ("test loss", "test_loss", ".4f"),
        ("test acc", "test_accuracy", "pct"),
        ("radius", "radius", ".3g"),
        ("accepted", "accepted_frac", "pct"),
        ("grad evals", "grad_evals", "d"),
        ("data passes", "data_passes", ".2f"),
    )
    table = Table(title=title or None, title_justify="left", box=_ascii_head_rule(),
                  show_edge=False, pad_edge=False)
    for name, _, _ in cols:
        table.add_column(name, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*(_fmt(row.get(key), spec) for _, key, spec in cols))
    # Plain text whatever the terminal: no colours, no width limit (the file must not wrap).
    console = Console(file=io.StringIO(), width=1000, color_system=None, force_terminal=False,
                      highlight=False, emoji=False, markup=False)
    with console.capture() as capture:
        console.print(table)
    return "\n".join(line.rstrip() for line in capture.get().splitlines()).strip("\n")
