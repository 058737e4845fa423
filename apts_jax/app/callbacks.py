"""The callbacks of ``apts-jax train`` (see :class:`apts_jax.app.trainer.Callback`).

* :class:`Evaluation` — loss and accuracy on the whole training and test sets after every epoch;
* :class:`ProgressBar` — a tqdm bar on stderr, one tick per iteration;
* :class:`CheckpointSaver` — an orbax checkpoint of the state and the record after every epoch;
* :class:`MetricFiles` — ``metrics.csv``/``metrics.jsonl``/``iterations.csv`` after every epoch;
* :class:`EpochPrinter` — one line per epoch on stdout;
* :class:`Summary` — at the end: plots, ``summary.txt`` and the summary table.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from apts_jax.app import metrics as metrics_lib
from apts_jax.app.checkpoint import Checkpointer
from apts_jax.app.problem import Evaluator
from apts_jax.app.trainer import Callback, StepInfo, Trainer

__all__ = [
    "CheckpointSaver",
    "EpochPrinter",
    "Evaluation",
    "MetricFiles",
    "ProgressBar",
    "Summary",
    "echo",
    "epoch_line",
]


def echo(*args: Any) -> None:
    """Print a line on stdout without breaking a running progress bar."""
    from tqdm import tqdm

    tqdm.write(" ".join(str(a) for a in args), file=sys.stdout)
    sys.stdout.flush()


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    """The one-line report of an epoch row."""

    def f(key: str, spec: str) -> str:
        v = metrics_lib.clean(row.get(key))
        return "-" if v is None else format(v, spec)

    acc = metrics_lib.clean(row.get("accepted_frac"))
    return (
        f"epoch {row['epoch']:>3}/{epochs}  iters {row['iterations']:>5}  "
        f"train loss {f('train_loss', '.4f')}  test loss {f('test_loss', '.4f')}  "
        f"test acc {f('test_accuracy', '.2%')}  radius {f('radius', '.3g')}  "
        f"accepted {'-' if acc is None else format(acc, '.0%')}  "
        f"time {row['wall_time_s']:.1f} s"
    )


class Evaluation(Callback):
    """Adds ``train_loss``, ``train_accuracy``, ``test_loss``, ``test_accuracy`` to each row."""

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator

    def epoch_metrics(self, trainer: Trainer, state: Any) -> dict[str, Any]:
        params = trainer.method.params(state)
        train_loss, train_acc = self.evaluator(params, "train")
        test_loss, test_acc = self.evaluator(params, "test")
        return {"train_loss": train_loss, "train_accuracy": train_acc,
                "test_loss": test_loss, "test_accuracy": test_acc}


class ProgressBar(Callback):
    """A tqdm bar over all iterations of the run (shown when ``show``)."""

    def __init__(self, show: bool, desc: str) -> None:
        self.show, self.desc = show, desc
        self.bar: Any = None

    def on_train_begin(self, trainer: Trainer) -> None:
        from tqdm import tqdm

        m = trainer.method
        total = sum(m.iterations(e) for e in range(1, trainer.epochs + 1))
        done = sum(m.iterations(e) for e in range(1, trainer.log.epoch + 1))
        self.bar = tqdm(total=total, initial=done, disable=not self.show, unit="it",
                        dynamic_ncols=True, desc=self.desc, file=sys.stderr, leave=False)

    def on_step(self, trainer: Trainer, info: StepInfo) -> None:
        self.bar.update(1)
        parts = [f"ep {trainer.epoch}/{trainer.epochs}", f"loss {info.loss:.4f}"]
        shown = trainer.log.history[-1].get("test_accuracy") if trainer.log.history else None
        if shown is not None:
            parts.append(f"test acc {shown:.2%}")
        if info.radius is not None:
            parts.append(f"radius {info.radius:.2e}")
        acc = [a for a in trainer.epoch_accepted if a is not None]
        if acc:
            parts.append(f"accepted {sum(acc)}/{len(acc)}")
        self.bar.set_postfix_str("  ".join(parts), refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class CheckpointSaver(Callback):
    """Saves ``(state, record)`` after every epoch (not epoch 0); closes the checkpointer."""

    def __init__(self, checkpointer: Checkpointer, config_doc: dict[str, Any], seed: int) -> None:
        self.ckpt, self.config_doc, self.seed = checkpointer, config_doc, seed

    def on_epoch_end(self, trainer: Trainer, state: Any) -> None:
        log = trainer.log
        row = log.history[-1]
        if row["epoch"] == 0:
            return
        self.ckpt.save(row["epoch"], state, {
            "epoch": row["epoch"], "history": log.history, "iterations": log.iterations,
            "wall_time_s": row["wall_time_s"], "train_time_s": log.train_time,
            "grad_evals": log.grad_evals, "seed": self.seed, "config": self.config_doc,
        })

    def close(self) -> None:
        self.ckpt.close()


class MetricFiles(Callback):
    """(Re)writes the metric files in ``out`` after every epoch and at the end."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_epoch_end(self, trainer: Trainer, state: Any) -> None:
        metrics_lib.write_metrics(self.out, trainer.log.history)
        if trainer.log.history[-1]["epoch"] > 0:
            metrics_lib.write_iterations(self.out, trainer.log.iterations)

    def on_train_end(self, trainer: Trainer, state: Any) -> None:
        metrics_lib.write_metrics(self.out, trainer.log.history)
        metrics_lib.write_iterations(self.out, trainer.log.iterations)


class EpochPrinter(Callback):
    """One line per trained epoch on stdout."""

    def on_epoch_end(self, trainer: Trainer, state: Any) -> None:
        row = trainer.log.history[-1]
        if row["epoch"] > 0:
            echo(epoch_line(row, trainer.epochs))


class Summary(Callback):
    """At the end: the PNG plots (when ``plots``), ``summary.txt`` and the final report."""

    def __init__(self, out: Path, title: str, plots: bool, t_start: float) -> None:
        self.out, self.title, self.plots, self.t_start = out, title, plots, t_start

    def on_train_end(self, trainer: Trainer, state: Any) -> None:
        out, log = self.out, trainer.log
        if self.plots:
            from apts_jax.app.plots import write_plots

            write_plots(out, log.history, log.iterations, title=self.title)
        table = metrics_lib.summary_table(log.history, title=f"Summary: {self.title}")
        metrics_lib.atomic_write_text(out / "summary.txt", table + "\n")
        echo("")
        echo(table)
        final = log.history[-1]
        echo(
            f"\nfinal test accuracy {final['test_accuracy']:.2%} after {final['epoch']} "
            f"epoch(s), {final['iterations']} iterations; total "
            f"{time.perf_counter() - self.t_start:.1f} s in this session; outputs in {out}/ "
            "(metrics.csv, metrics.jsonl, iterations.csv, config.json, "
            f"{'loss.png, accuracy.png, radius.png, ' if self.plots else ''}summary.txt, "
            "checkpoints/)"
        )
