"""A small trainer: one loop over epochs and batches, everything else in callbacks.

An optimizer is a :class:`Method`, an ``(init, step, batches)`` triple with labels:

* ``init() -> state``: the initial training state (a pytree of arrays, parameters included);
* ``step(state, batch) -> (state, StepReport)``: one (jitted) iteration and what it reports;
* ``batches(epoch) -> iterable of batches``: the batches of epoch ``epoch`` (1-based), a pure
  function of the epoch (and the seed), so a resumed run sees the same batches.

:class:`Trainer` runs ``epochs`` epochs of ``method.iterations_per_epoch`` steps each, keeps the
record (:class:`TrainLog`: epoch rows, iteration rows, evaluation count, clocks), and calls its
:class:`Callback` s: ``on_train_begin``, ``on_step`` after every iteration, ``epoch_metrics`` to add
fields (e.g. an evaluation) to an epoch's row, ``on_epoch_end`` after every epoch (epoch 0, the
initial state, included), ``on_train_end`` after the last one and ``close`` always. The
application's callbacks (evaluation, progress bar, checkpoints, metric files, printing) are in
:mod:`apts_jax.app.callbacks`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import numpy as np

from apts_jax.app import metrics as metrics_lib

__all__ = ["Callback", "Method", "StepInfo", "StepReport", "TrainLog", "Trainer"]


class StepReport(NamedTuple):
    """What one ``step`` reports (device or host scalars; fetched with one ``device_get``).

    Attributes:
      loss: the (mini)batch loss the optimizer reports after the iteration.
      radius: the trust-region radius after the iteration (None: not a trust-region method).
      accepted: whether the step was accepted / met its decrease condition (None: always taken).
      grad_evals: value-and-gradient evaluations done by this iteration ...
      grad_evals_total: ... or, for optimizers that count them in their state, the running total
        (evaluations of ``init`` included); it takes precedence over ``grad_evals``.
    """

    loss: Any
    radius: Any = None
    accepted: Any = None
    grad_evals: Any = 1
    grad_evals_total: Any = None


class StepInfo(NamedTuple):
    """One iteration as host values (``grad_evals``: the running total after it)."""

    loss: float
    radius: float | None
    accepted: bool | None
    grad_evals: int


def _no_radius(state: Any) -> None:
    return None


@dataclass
class Method:
    """An optimizer as the trainer drives it: ``(init, step, batches)`` plus labels.

    Attributes:
      name: the optimizer's name (``--optimizer``).
      label: one line describing the method and its batches (printed, in ``config.json``).
      init, step, batches: see the module docstring.
      iterations_per_epoch: steps per epoch (``batches(epoch)`` is cut to this many).
      samples_per_eval: samples one gradient evaluation touches (for ``data_passes``).
      num_train: training-set size.
      params: the parameters of a state (as a pytree).
      radius: the trust-region radius of a state (None for methods without one).
    """

    name: str
    label: str
    init: Callable[[], Any]
    step: Callable[[Any, Any], tuple[Any, StepReport]]
    batches: Callable[[int], Iterable[Any]]
    iterations_per_epoch: int
    samples_per_eval: int
    num_train: int
    params: Callable[[Any], Any]
    radius: Callable[[Any], float | None] = _no_radius

    def iterations(self, epoch: int) -> int:
        """Iterations in epoch ``epoch`` (1-based)."""
        return self.iterations_per_epoch

    def run_epoch(
        self, state: Any, epoch: int, grad_evals: int, callback: Callable[[StepInfo], None]
    ) -> Any:
        """The iteration loop of epoch ``epoch`` from ``state``; ``grad_evals``: the running count
        before it. Calls ``callback`` with every iteration's :class:`StepInfo`."""
        for batch in itertools.islice(self.batches(epoch), self.iterations(epoch)):
            state, report = self.step(state, batch)
            r = jax.device_get(report)
            if r.grad_evals_total is not None:
                grad_evals = int(r.grad_evals_total)
            else:
                grad_evals += int(r.grad_evals)
            callback(StepInfo(
                float(r.loss),
                None if r.radius is None else float(r.radius),
                None if r.accepted is None else bool(r.accepted),
                grad_evals,
            ))
        return state


@dataclass
class TrainLog:
    """The record of a run: what the checkpoints hold besides the state.

    ``history`` has one row per epoch (row 0: the initial state), ``iterations`` one per step.
    ``wall_offset`` and ``train_time`` carry the clocks over a ``--resume``.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    iterations: list[dict[str, Any]] = field(default_factory=list)
    grad_evals: int = 0
    train_time: float = 0.0
    wall_offset: float = 0.0
    t_session: float = field(default_factory=time.perf_counter)

    def wall(self) -> float:
        """Seconds since the run started (over all sessions)."""
        return self.wall_offset + time.perf_counter() - self.t_session

    @property
    def epoch(self) -> int:
        """Epochs done."""
        return int(self.history[-1]["epoch"]) if self.history else 0


class Callback:
    """Hooks of :class:`Trainer`; every hook is optional (the defaults do nothing)."""

    def on_train_begin(self, trainer: Trainer) -> None:
        pass

    def on_step(self, trainer: Trainer, info: StepInfo) -> None:
        pass

    def epoch_metrics(self, trainer: Trainer, state: Any) -> dict[str, Any]:
        """Fields added to the row of the epoch that just ended (before its clocks are read)."""
        return {}

    def on_epoch_end(self, trainer: Trainer, state: Any) -> None:
        """After an epoch's row was appended to ``trainer.log.history`` (also for epoch 0)."""

    def on_train_end(self, trainer: Trainer, state: Any) -> None:
        pass

    def close(self) -> None:
        """Always called when the run ends, also on an error or an interruption."""


class Trainer:
    """Runs ``method`` to ``epochs`` epochs, continuing ``log`` (empty: a fresh run).

    While an epoch runs, ``epoch_losses`` and ``epoch_accepted`` hold its iterations' values.
    """

    def __init__(self, method: Method, epochs: int, callbacks: Sequence[Callback] = (),
                 log: TrainLog | None = None) -> None:
        self.method = method
        self.epochs = int(epochs)
        self.callbacks = list(callbacks)
        self.log = log if log is not None else TrainLog()
        self.epoch = self.log.epoch
        self.epoch_losses: list[float] = []
        self.epoch_accepted: list[bool | None] = []

    def fit(self, state: Any) -> Any:
        """Train from ``state`` (at epoch ``log.epoch``) to ``epochs``; the final state."""
        log = self.log
        try:
            for cb in self.callbacks:
                cb.on_train_begin(self)
            if not log.history:
                self._end_epoch(state, 0)
            for epoch in range(log.epoch + 1, self.epochs + 1):
                self.epoch = epoch
                self.epoch_losses, self.epoch_accepted = [], []
                t0 = time.perf_counter()
                # Looked up on the method each epoch: benchmarks wrap ``run_epoch`` to time it.
                state = self.method.run_epoch(state, epoch, log.grad_evals, self._on_step)
                jax.block_until_ready(state)
                log.train_time += time.perf_counter() - t0
                if log.iterations:
                    log.grad_evals = int(log.iterations[-1]["grad_evals"])
                self._end_epoch(state, epoch)
            for cb in self.callbacks:
                cb.on_train_end(self, state)
        finally:
            for cb in self.callbacks:
                cb.close()
        return state

    def _on_step(self, info: StepInfo) -> None:
        self.epoch_losses.append(info.loss)
        self.epoch_accepted.append(info.accepted)
        first = self.log.history[-1]["iterations"]
        self.log.iterations.append({
            "iteration": first + len(self.epoch_losses), "epoch": self.epoch,
            "loss": metrics_lib.clean(info.loss), "radius": metrics_lib.clean(info.radius),
            "accepted": info.accepted, "grad_evals": info.grad_evals,
        })
        for cb in self.callbacks:
            cb.on_step(self, info)

    def _end_epoch(self, state: Any, epoch: int) -> None:
        log, method = self.log, self.method
        extra: dict[str, Any] = {}
        for cb in self.callbacks:
            extra.update(cb.epoch_metrics(self, state))
        losses = self.epoch_losses if epoch else []
        accepted = [a for a in (self.epoch_accepted if epoch else []) if a is not None]
        row = {
            "epoch": epoch,
            "iterations": (log.history[-1]["iterations"] + len(losses)) if log.history else 0,
            "wall_time_s": log.wall(),
            "train_time_s": log.train_time,
            **extra,
            "batch_loss": float(np.mean(losses)) if losses else None,
            "radius": method.radius(state),
            "accepted_frac": (sum(accepted) / len(accepted)) if accepted else None,
            "grad_evals": log.grad_evals,
            "data_passes": log.grad_evals * method.samples_per_eval / method.num_train,
        }
        log.history.append({k: metrics_lib.clean(v) for k, v in row.items()})
        for cb in self.callbacks:
            cb.on_epoch_end(self, state)
