"""The configuration of ``apts-jax train``: choices, defaults, :class:`TrainConfig`, :class:`UsageError`.

Shared by the argument parser (:mod:`apts_jax.app.cli`) and the trainer (:mod:`apts_jax.app.train`)
without either importing the other. This module imports neither JAX nor Flax, so ``--help`` and
argument checks stay fast and ``--devices`` can still configure JAX afterwards.

Adding an option: add a field to :class:`TrainConfig` (with a default, so that callers and the
``config.json`` of older runs keep working) and an argument with the same ``dest`` in
:func:`apts_jax.app.cli._add_train_arguments`; :func:`apts_jax.app.cli.parse_train_args` copies every
argument whose name is a field. Fields that may change on ``--resume`` go into
:data:`RESUME_MAY_CHANGE`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = [
    "APTS_OPTION_FLAGS",
    "DATASET_CHOICES",
    "DEFAULTS",
    "DEFAULT_JOB_DOC",
    "DEFAULT_PRESET",
    "FULL_BATCH",
    "MODEL_CHOICES",
    "OPTIMIZER_CHOICES",
    "PRESET_CHOICES",
    "RESUME_MAY_CHANGE",
    "SUBDOMAIN_METHODS",
    "TrainConfig",
    "UsageError",
]

DATASET_CHOICES = ("fashion_mnist", "mnist", "cifar10")
# Mirrors apts_jax.models.MODELS (kept literal so that ``--help`` does not import Flax/JAX; a test
# checks that they agree).
MODEL_CHOICES = ("mlp", "mlp_mnist", "mlp_cifar", "cnn")
OPTIMIZER_CHOICES = ("apts", "sapts", "tr", "adam", "sgd", "lbfgs")
#: The APTS options of issue 11 (flag -> choices), mirroring
#: apts_jax._validate.APTS_OPTION_CHOICES (kept literal so that ``--help`` does not import JAX; a
#: test checks that they agree). None (the flag's default) keeps the library's default.
APTS_OPTION_FLAGS: dict[str, tuple[str, ...]] = {
    "local_boundary": ("ball", "adaptive"),
    "combine": ("sum", "mean"),
    "acceptance": ("monotone", "nonmonotone"),
    "norm": ("l2", "adaptive"),
    "global_step": ("tr", "none"),
    "curvature_pairs": ("same_batch", "multi_batch"),
}
#: Mirrors apts_jax.apts_transform.PRESETS (a test checks that they agree).
PRESET_CHOICES = ("tuning_free", "paper")
#: The preset that ``--preset`` omitted means (apts_jax.DEFAULT_OPTIONS; a test checks it).
DEFAULT_PRESET = "tuning_free"

#: Optimizers that always use the whole (subset) training set per iteration.
FULL_BATCH = ("apts", "lbfgs")
#: Optimizers that run on subdomains.
SUBDOMAIN_METHODS = ("apts", "sapts")

#: Defaults of the no-argument job (``python -m apts_jax``), see :data:`DEFAULT_JOB_DOC`.
DEFAULTS: dict[str, Any] = {
    "dataset": "fashion_mnist",
    "model": "mlp",
    "optimizer": "sapts",
    "local_steps": None,  # apts/sapts: the preset's nu (10 tuning_free, 5 paper)
    "memory": 5,
    "overlap": 0.05,
    "subdomain_overlap": 0.05,
    "epochs": 3,
    "iterations_per_epoch_full": 10,  # full-batch methods: outer iterations per epoch
    # sapts: apts_jax.default_minibatch (max(256, min(10000, samples) // 16)) for the default
    # preset, min(paper_sapts_batch, samples) for --preset paper; a multiple of the subdomains.
    "paper_sapts_batch": 10_000,
    "minibatch": 128,  # adam / sgd (and tr when --batch-size is given)
    "min_subdomains": 4,
    "seed": 0,
    "lr": {"adam": 1e-3, "sgd": 0.01},
    "momentum": 0.9,
}

DEFAULT_JOB_DOC = """\
With no arguments this trains the paper's 784-512-256-10 ReLU MLP (535,818 parameters) on the
full Fashion-MNIST training set (60,000 images; test set 10,000) with SAPTS in the library's
default (tuning-free) configuration: 4 subdomains (or the next multiple of the device count) on
every local device, minibatches of 624 samples (max(256, 10,000/16), a multiple of the subdomain
count) from the overlap sampler (5% overlap), at most 10 local first-order trust-region steps per
subdomain and outer iteration in the Adam-scaled norm, local steps averaged; 3 epochs of 104
outer iterations (about 5 minutes on a 2-core CPU; 87.4% test accuracy, measured 2026-12-01).
--preset paper runs the paper's method instead. Outputs go to
runs/<optimizer>-<dataset>-<timestamp>/."""


class UsageError(Exception):
    """A flag combination found invalid after JAX started (exit status 2, one line)."""


@dataclass(frozen=True)
class TrainConfig:
    """The resolved training configuration (written to ``config.json``).

    Fields that depend on the devices (``devices``, ``subdomains``, ``batch_size``) are filled in
    by :func:`apts_jax.app.train.resolve_config` once JAX is up; ``None`` there means "not
    decided yet". ``batch_size=None`` after resolution means full batch.
    """

    dataset: str
    data_dir: str | None
    model: str
    hidden: tuple[int, ...] | None
    optimizer: str
    subdomains: int | None
    devices: int | None
    local_steps: int | None  # None: the preset's (resolve_config)
    second_order: bool | None  # None: the method's default (resolve_config)
    memory: int
    batch_size: int | None
    overlap: float
    subdomain_overlap: float
    epochs: int
    iterations_per_epoch: int | None
    subset: int | None
    lr: float | None
    momentum: float | None
    seed: int
    out: str
    resume: bool
    progress: bool | None
    plots: bool
    # APTS/SAPTS options (issue 11); None keeps the library's default (apts_jax.DEFAULT_OPTIONS).
    preset: str | None = None
    local_boundary: str | None = None
    combine: str | None = None
    acceptance: str | None = None
    nonmonotone_window: int | None = None
    norm: str | None = None
    global_step: str | None = None
    curvature_pairs: str | None = None

    def apts_options(self) -> dict[str, Any]:
        """The APTS option keywords given (for :func:`apts_jax.parallel.make_apts`)."""
        names = ("preset", "local_boundary", "combine", "acceptance", "nonmonotone_window", "norm",
                 "global_step", "curvature_pairs")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    @property
    def tr_model(self) -> str:
        """The trust-region model name of the core library (``"sr1"`` or ``"first_order"``).

        Only meaningful once :func:`apts_jax.app.train.resolve_config` has decided
        ``second_order`` (None before: the method's default)."""
        if self.second_order is None:
            raise ValueError("tr_model: second_order is not resolved yet (resolve_config).")
        return "sr1" if self.second_order else "first_order"

    @property
    def full_batch(self) -> bool:
        return self.optimizer in FULL_BATCH or (self.optimizer == "tr" and self.batch_size is None)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden) if self.hidden else None
        d["tr_model"] = None if self.second_order is None else self.tr_model
        d["full_batch"] = self.full_batch
        return d

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


#: Fields that may differ between a run and its ``--resume`` (everything else must match).
RESUME_MAY_CHANGE = frozenset({"epochs", "resume", "out", "progress", "plots", "data_dir"})
