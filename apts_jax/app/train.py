r"""Training runs of ``apts-jax train``: resume, the trainer and its callbacks, the outputs.

:func:`run` loads the problem (:mod:`apts_jax.app.problem`), resolves the configuration now that
JAX is up (:func:`resolve_config`), builds the optimizer as an ``(init, step, batches)`` triple
(:func:`build_method`, :mod:`apts_jax.app.methods`) and drives it with the one loop of
:class:`apts_jax.app.trainer.Trainer`; evaluation, the progress bar, checkpoints, metric files and
printing are callbacks (:mod:`apts_jax.app.callbacks`).

Minibatch orders depend only on ``(seed, epoch)``, the weights only on ``seed``; there is no other
randomness. A checkpoint after every epoch holds the complete optimizer state (parameters
included) and the record of the run, so ``--resume`` continues a run bitwise identically to an
uninterrupted one.

After each epoch the parameters are evaluated on the whole training and test sets (see
:mod:`apts_jax.app.metrics` for the metrics).
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import optax

from apts_jax.app.callbacks import (
    CheckpointSaver,
    EpochPrinter,
    Evaluation,
    MetricFiles,
    ProgressBar,
    Summary,
    echo,
)
from apts_jax.app.checkpoint import Checkpointer
from apts_jax.app.config import (
    DEFAULT_PRESET,
    DEFAULTS,
    RESUME_MAY_CHANGE,
    SUBDOMAIN_METHODS,
    TrainConfig,
    UsageError,
)
from apts_jax.app.methods import build_method
from apts_jax.app.metrics import atomic_write_text
from apts_jax.app.problem import Evaluator, Problem, load_problem
from apts_jax.app.trainer import Method, StepInfo, Trainer, TrainLog
from apts_jax.apts_transform import PRESETS, default_minibatch

__all__ = [
    "Evaluator",
    "Method",
    "Problem",
    "TrainResult",
    "build_method",
    "load_problem",
    "resolve_config",
    "run",
]

#: The per-iteration record passed to ``run_epoch`` callbacks (former name of ``StepInfo``).
IterRecord = StepInfo


def resolve_config(cfg: TrainConfig, num_train: int) -> TrainConfig:
    """Fill in devices, subdomains and batch size now that JAX is up; check what needs JAX."""
    available = len(jax.devices())
    if cfg.devices is not None and cfg.devices > available:
        raise UsageError(
            f"--devices {cfg.devices}, but only {available} device(s) are available (on CPU, "
            "devices are simulated only when JAX has not started before the command)"
        )
    opt = cfg.optimizer
    if opt in SUBDOMAIN_METHODS:
        d = cfg.devices if cfg.devices is not None else available
        n = cfg.subdomains
        if n is None:
            n = d * math.ceil(DEFAULTS["min_subdomains"] / d)
        elif n % d:
            if cfg.devices is not None:
                raise UsageError(f"--subdomains {n} is not a multiple of --devices {d}")
            # All devices by default: use the most devices that divide N.
            d = max(k for k in range(1, d + 1) if n % k == 0)
        # The preset is recorded explicitly (config.json, --resume checks), and with it the
        # trust-region model when neither --first-order nor --second-order was given.
        preset = cfg.preset or DEFAULT_PRESET
        model = PRESETS[preset].model if cfg.second_order is None else cfg.tr_model
        nu = PRESETS[preset].local_steps if cfg.local_steps is None else cfg.local_steps
        if cfg.curvature_pairs == "multi_batch" and model != "sr1":
            why = ("--first-order keeps none" if cfg.second_order is not None
                   else f"the {preset} preset's model is first-order")
            raise UsageError(
                f"--curvature-pairs multi_batch forms the pairs of the L-SR1 memory, but {why}: "
                "use --second-order"
            )
        cfg = cfg.replace(devices=d, subdomains=n, preset=preset,
                          second_order=model == "sr1", local_steps=nu)
        if cfg.curvature_pairs == "multi_batch" and cfg.global_step == "none":
            raise UsageError(
                "--curvature-pairs multi_batch feeds the global step's L-SR1 memory; it cannot "
                "be combined with --global-step none"
            )
    else:
        cfg = cfg.replace(devices=1, subdomains=None,
                          second_order=True if cfg.second_order is None else cfg.second_order)
    b = cfg.batch_size
    if opt == "sapts":
        n = cfg.subdomains
        if b is None and cfg.preset == "paper":
            b = max(n, n * (min(DEFAULTS["paper_sapts_batch"], num_train) // n))
        elif b is None:
            b = default_minibatch(num_train, n) if num_train >= n else n
        if b % n:
            raise UsageError(f"--batch-size {b} is not divisible by --subdomains {n}")
    elif opt in ("adam", "sgd") and b is None:
        b = min(DEFAULTS["minibatch"], num_train)
    if b is not None and b > num_train:
        raise UsageError(f"--batch-size {b} is larger than the {num_train} training samples")
    if opt == "apts" and num_train < cfg.subdomains:
        raise UsageError(
            f"{num_train} training samples cannot be split into {cfg.subdomains} subdomains"
        )
    return cfg.replace(batch_size=b)


@dataclass
class TrainResult:
    """What :func:`run` returns (also written to ``--out``)."""

    config: TrainConfig
    history: list[dict[str, Any]]
    iterations: list[dict[str, Any]]
    params: Any
    state: Any
    out: Path


def _config_json(cfg: TrainConfig, problem: Problem, method: Method) -> dict[str, Any]:
    d = cfg.to_json()
    d["resolved"] = {
        "train_samples": int(problem.train_x.shape[0]),
        "test_samples": int(problem.test_x.shape[0]),
        "model": problem.description,
        "num_params": problem.num_params,
        "data_source": problem.source,
        "method": method.label,
        "iterations_per_epoch": method.iterations(1),
        "samples_per_gradient_evaluation": method.samples_per_eval,
        "devices": [str(dv) for dv in jax.devices()[: cfg.devices or 1]],
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
    }
    return d


def _check_resume_config(out: Path, cfg: TrainConfig) -> None:
    path = out / "config.json"
    if not path.is_file():
        raise UsageError(f"--resume: {path} is missing; is {out} the folder of a run?")
    saved = json.loads(path.read_text())
    now = cfg.to_json()
    diff = sorted(
        k for k in now
        if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k]
    )
    if diff:
        parts = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in diff)
        raise UsageError(f"--resume: the options differ from the run in {out} ({parts})")


def _existing_epoch(ckpt_dir: Path, cfg: TrainConfig) -> int | None:
    """The newest checkpoint in ``ckpt_dir``; errors when ``--resume`` and it disagree."""
    latest = None
    if ckpt_dir.is_dir():
        with Checkpointer(ckpt_dir) as probe:
            latest = probe.latest_epoch()
    out = ckpt_dir.parent
    if cfg.resume:
        if latest is not None and latest > cfg.epochs:
            raise UsageError(
                f"--resume: the run in {out} is at epoch {latest}, past --epochs {cfg.epochs}"
            )
    elif latest is not None:
        raise UsageError(
            f"--out {out} already holds a run (checkpoint of epoch {latest}); add --resume to "
            "continue it or choose another --out"
        )
    return latest


def _restore(ckpt: Checkpointer, epoch: int, template: Any) -> tuple[Any, TrainLog]:
    """State and record of checkpoint ``epoch``, the clocks continuing from it."""
    try:
        state, meta = ckpt.restore(epoch, template)
    except ValueError as err:
        raise UsageError(f"--resume: {err}") from None
    log = TrainLog(
        history=list(meta["history"]), iterations=list(meta["iterations"]),
        grad_evals=int(meta["grad_evals"]), train_time=float(meta["train_time_s"]),
        wall_offset=float(meta["wall_time_s"]),
    )
    return state, log


def run(cfg: TrainConfig) -> TrainResult:
    """Train as configured; write metrics, config, plots and checkpoints into ``cfg.out``."""
    t_start = time.perf_counter()
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    latest = _existing_epoch(ckpt_dir, cfg)

    problem = load_problem(cfg)
    cfg = resolve_config(cfg, problem.num_train)
    if cfg.resume and latest is not None:
        _check_resume_config(out, cfg)
    try:
        method = build_method(cfg, problem)  # the module attribute: benchmarks may wrap it
    except ValueError as err:
        raise UsageError(str(err)) from None
    evaluator = Evaluator(problem)
    config_doc = _config_json(cfg, problem, method)

    echo(
        f"apts-jax train: {cfg.dataset} from {problem.source}: {problem.num_train} train / "
        f"{problem.test_x.shape[0]} test samples; {problem.description}"
    )
    echo(f"  optimizer: {method.label}")
    echo(f"  devices: {config_doc['resolved']['devices']}; {cfg.epochs} epoch(s); out: {out}")

    state = method.init()
    ckpt = Checkpointer(ckpt_dir)
    log = None
    try:
        if cfg.resume and latest is not None:
            state, log = _restore(ckpt, latest, state)
            echo(f"  resumed from the checkpoint of epoch {log.epoch} in {ckpt_dir}")
        elif cfg.resume:
            echo(f"  --resume: no checkpoint in {ckpt_dir} yet, starting from the beginning")
        atomic_write_text(out / "config.json", json.dumps(config_doc, indent=2) + "\n")
    except BaseException:
        ckpt.close()
        raise
    log = log or TrainLog()
    log.t_session = time.perf_counter()
    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    title = f"{cfg.optimizer} on {cfg.dataset}, {problem.description}"
    callbacks = [
        Evaluation(evaluator),
        ProgressBar(show, desc=cfg.optimizer),
        CheckpointSaver(ckpt, config_doc, cfg.seed),
        MetricFiles(out),
        EpochPrinter(),
        Summary(out, title, cfg.plots, t_start),
    ]
    trainer = Trainer(method, cfg.epochs, callbacks, log)
    state = trainer.fit(state)
    return TrainResult(cfg, log.history, log.iterations, method.params(state), state, out)
