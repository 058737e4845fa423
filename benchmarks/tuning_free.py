r"""Tuning-free APTS ablation (issue 11): problems, Adam yardsticks, APTS/SAPTS configurations.

A resumable benchmark runner built on library APIs only (:mod:`apts_jax.parallel`,
:mod:`apts_jax.data`, :mod:`apts_jax.models`, :func:`optax.adam`; it does not import
``apts_jax.app``). One JSON per finished run; a run whose JSON exists is skipped.

Problems (:data:`PROBLEMS`; float32; ``epochs`` is the full protocol's budget):

* ``fmnist_mlp`` — Fashion-MNIST (60,000 / 10,000), the paper's 784-512-256-10 ReLU MLP (Flax
  LeCun-normal init of :func:`apts_jax.models.create_model`, as ``paper.py``), softmax
  cross-entropy, 20 epochs, APTS batch 10,000;
* ``fmnist_cnn`` — Fashion-MNIST, a small pure-JAX CNN: conv 3x3 stride 2 (1 -> 8), ReLU, conv
  3x3 stride 2 (8 -> 16), ReLU, dense 784 -> 10 (9,098 parameters), APTS batch 10,000; **10
  epochs** (to keep the Adam grid within the compute budget on the shared 2-core machine); per
  gradient step it costs about as much as the MLP at batch 128 and about 1.6x at batch 10,000
  (measured on 2 busy cores: 5.8 vs 6.1 ms and 0.68 vs 0.42 s CPU per step);
* ``regression`` — teacher-student regression: ``x ~ N(0, I_32)``, a fixed random teacher
  32-64-64-1 (tanh), targets standardised + Gaussian noise (sd 0.2, so the test-MSE floor is 0.04),
  60,000 / 10,000 samples; student 32-128-128-1 ReLU MLP, mean squared error; the metric is the
  test MSE (lower is better); 20 epochs, APTS batch 10,000;
* ``fmnist_small`` — the first 5,000 Fashion-MNIST training samples (normalised with their own
  statistics) and the full test set, the paper's MLP; 30 epochs (a small-data problem needs more
  passes: 30 epochs of 5,000 samples are 2.5 epochs of the full set); APTS batch 1,000 (the paper's
  10,000 is 1/6 of the data; 1,000 is 1/5 of 5,000).

Methods:

* **Adam** (:func:`optax.adam`, default betas): 13 learning rates log-spaced in [1e-5, 1e-1]
  (3 significant digits, the same values as ``paper.py``), at batch 128 and at the problem's APTS
  batch; one step per minibatch of :func:`apts_jax.data.plain_minibatches` (``seed``, epoch:
  remainder dropped), an epoch is one ``lax.scan`` over the minibatches (data on the device, one
  compilation per problem and batch size, shared by all learning rates and seeds: the learning
  rate is an argument);
* **APTS/SAPTS configurations** (:data:`CONFIGS`): each a dict of runner keys (:data:`RUNNER_KEYS`:
  ``stochastic``, ``batch_size`` / ``batch_scale`` / ``min_batch`` (the minibatch is
  ``max(min_batch, (batch_size or the problem's APTS batch) * batch_scale)``), ``overlap``,
  ``subdomain_overlap``,
  ``num_subdomains``, ``iterations_per_epoch``) and keyword arguments of
  :func:`apts_jax.parallel.make_apts` (every other key goes there unchanged, so a new library
  option is one new entry; unknown keys are rejected before any run starts). SAPTS
  (``stochastic=True``): one outer iteration (``fresh_step``) per minibatch of the
  :class:`apts_jax.data.OverlapSampler` (``overlap`` between consecutive minibatches,
  ``subdomain_overlap`` of each microbatch shared by all subdomains), an epoch is one sampler pass;
  full-batch APTS: ``iterations_per_epoch`` outer iterations (``step``) on the whole training set.
  ``N`` subdomains run on ``N`` simulated CPU devices (``jax_num_cpu_devices``).

Per epoch each run records the test metric (accuracy for classification, MSE for regression),
test loss, training loss (on the first 5,000 training samples, to cut the evaluation cost; the
imported ``paper.py`` runs have it on the whole set), gradient evaluations, data passes (gradient
evaluations x samples per evaluation / N_train; for APTS the per-subdomain count of
``num_fun_evals``, the initial evaluation included, times the minibatch), and the training time
**excluding compilation**: every jitted function is compiled ahead of time
(``jit(...).lower(...).compile()``, timed as ``compile_s``), and the training clock covers only
the optimizer calls (``block_until_ready`` at the end; the per-epoch evaluation, and for SAPTS the
host-side gather of the next minibatch, ``data_s``, are outside it).

Protocols: ``full`` (the problem's epochs, ``--seeds``, default 0 1 2) and ``--screen`` (seed 0,
half the epochs, rounded up); they are stored apart, ``<out>/<problem>/<protocol>/<run>.json``, and
summarised apart (the summary says which tables are screens).

Reuse of ``paper.py``: the full-protocol Adam grid of ``fmnist_mlp`` is the same protocol as
``benchmarks/results/paper/fashion_mnist/adam-*`` (same data, model, init, minibatch order,
learning rates, batch sizes, 20 epochs, seeds 0-2), so those runs are *converted* into this
schema (``source: "paper.py"``; times are the app's Python-loop times with the batch gather on
the host, compilation excluded, so they slightly overstate Adam's time), and the screen runs
(seed 0, 10 epochs) are their first 10 epochs (Adam has no schedule, so a prefix of a longer
run is the shorter run). ``--no-import`` reruns them here instead.

Summary (``summary.json``, ``summary.md``, ``tuning_free_<protocol>.png``): per problem the best
Adam (lr, batch) with mean +- std over seeds, the median Adam (over all learning rates and both
batches, and per batch), each configuration's final metric mean +- std, data passes, training
time, time to the target (best Adam - 0.3 pp accuracy, or best Adam's test MSE x 1.02), and the gap
to the best Adam (pp for accuracy; % of the best Adam's loss, sign so that negative is worse, for
regression); then per configuration the WORST gap over the problems (also in units of each
problem's tolerance: 0.3 pp or 2 %), the selection criterion of issue 11.

Usage::

    python benchmarks/tuning_free.py --dry-run                      # plan + time estimate
    python benchmarks/tuning_free.py --screen --methods adam        # Adam screens
    python benchmarks/tuning_free.py --screen --configs paper --methods apts
    python benchmarks/tuning_free.py --methods adam                 # full Adam grid
    python benchmarks/tuning_free.py --summary-only
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import inspect
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "tuning_free"
PAPER_RESULTS = HERE / "results" / "paper" / "fashion_mnist"
TARGET_GAP = 0.003  # accuracy: 0.3 percentage points below the best Adam
TARGET_REL_LOSS = 0.02  # regression: 2 % above the best Adam's test loss
ADAM_SMALL_BATCH = 128
EVAL_CHUNK = 5000
TRAIN_EVAL_SAMPLES = 5_000  # the per-epoch training loss is taken on the first 5,000 samples


def log_grid(lo: float, hi: float, num: int) -> list[float]:
    """``num`` values log-spaced from ``lo`` to ``hi`` (both included), rounded to 3 digits."""
    if num == 1:
        return [lo]
    a, b = math.log10(lo), math.log10(hi)
    return [float(f"{10 ** (a + (b - a) * k / (num - 1)):.3g}") for k in range(num)]


LRS: tuple[float, ...] = tuple(log_grid(1e-5, 1e-1, 13))


# ----------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------


@dataclass
class ProblemData:
    """Host data and the model as pure functions of a parameter pytree.

    ``loss(params, (x, y))`` is the training loss (mean over the batch); ``metric(params, (x, y))``
    returns ``(loss, accuracy)`` summed (not averaged) over the batch, accuracy 0 for regression.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    init: Callable[[int], Any]
    loss: Callable[[Any, Any], Any]
    sums: Callable[[Any, Any], Any]
    description: str


@dataclass(frozen=True)
class ProblemSpec:
    """A benchmark problem: name, kind, full-protocol epochs, APTS batch, data/model builder."""

    name: str
    kind: str  # "classification" (metric: test accuracy, higher better) or "regression" (test MSE)
    epochs: int
    apts_batch: int
    build: Callable[[], ProblemData] = field(compare=False)
    description: str = ""

    @property
    def metric(self) -> str:
        return "test_accuracy" if self.kind == "classification" else "test_loss"

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "classification"

    @property
    def adam_batches(self) -> tuple[int, ...]:
        return tuple(sorted({ADAM_SMALL_BATCH, self.apts_batch}))


def _ce_sums(apply_fn: Callable) -> Callable:
    import jax.numpy as jnp
    import optax

    def sums(params: Any, batch: Any) -> Any:
        x, y = batch
        logits = apply_fn(params, x)
        loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y))
        acc = jnp.sum((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))
        return loss, acc

    return sums


def _ce_loss(apply_fn: Callable) -> Callable:
    import jax.numpy as jnp
    import optax

    def loss(params: Any, batch: Any) -> Any:
        x, y = batch
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x), y))

    return loss


@functools.lru_cache(maxsize=2)
def _fashion(subset: int | None) -> Any:
    from apts_jax.data import load_dataset

    return load_dataset("fashion_mnist", download=False,
                        subset=None if subset is None else (subset, None))


def _paper_mlp(subset: int | None) -> ProblemData:
    """The paper's MLP with the app's initialisation (``create_model("mlp", ...)``, seed)."""
    from apts_jax import models

    ds = _fashion(subset)
    apply_fn, _ = models.functional(models.create_model("mlp", (784,), 10, 0))

    def init(seed: int) -> Any:
        return models.functional(models.create_model("mlp", (784,), 10, seed))[1]

    n = ds.train_x.shape[0]
    return ProblemData(ds.train_x, ds.train_y, ds.test_x, ds.test_y, init, _ce_loss(apply_fn),
                       _ce_sums(apply_fn),
                       f"Fashion-MNIST ({n} train / {ds.test_x.shape[0]} test), MLP 784-512-256-10")


def _he(key: Any, shape: tuple[int, ...], fan_in: int) -> Any:
    import jax
    import jax.numpy as jnp

    return jax.random.normal(key, shape, jnp.float32) * np.float32(np.sqrt(2.0 / fan_in))


def _conv3x3_s2(h: Any, w: Any, b: Any) -> Any:
    """3x3 convolution, stride 2, "SAME" padding (even sizes: one zero row/column after), + bias.

    Written as patches @ kernel (im2col): on CPU this is about 2x faster than
    ``lax.conv_general_dilated`` for these tiny channel counts, and equal to it (checked to float32
    rounding)."""
    import jax.numpy as jnp

    n, hh, ww, c = h.shape
    hp = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
    ho, wo = hh // 2, ww // 2
    cols = [hp[:, i:i + 2 * ho:2, j:j + 2 * wo:2, :] for i in range(3) for j in range(3)]
    return jnp.concatenate(cols, axis=-1) @ jnp.reshape(w, (9 * c, -1)) + b


def cnn_apply(params: Any, x: Any) -> Any:
    """Small CNN: conv 3x3/2 (1->8), ReLU, conv 3x3/2 (8->16), ReLU, dense 784->10; x ``(B, 784)``."""
    import jax
    import jax.numpy as jnp

    h = jnp.reshape(x, (x.shape[0], 28, 28, 1))
    for w, b in (params["conv1"], params["conv2"]):
        h = jax.nn.relu(_conv3x3_s2(h, w, b))
    w, b = params["dense"]
    return jnp.reshape(h, (h.shape[0], -1)) @ w + b


def _cnn() -> ProblemData:
    import jax
    import jax.numpy as jnp

    ds = _fashion(None)

    def init(seed: int) -> Any:
        k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
        return {
            "conv1": (_he(k1, (3, 3, 1, 8), 9), jnp.zeros((8,), jnp.float32)),
            "conv2": (_he(k2, (3, 3, 8, 16), 72), jnp.zeros((16,), jnp.float32)),
            "dense": (jax.random.normal(k3, (784, 10), jnp.float32) / np.float32(28.0),
                      jnp.zeros((10,), jnp.float32)),
        }

    return ProblemData(ds.train_x, ds.train_y, ds.test_x, ds.test_y, init, _ce_loss(cnn_apply),
                       _ce_sums(cnn_apply),
                       "Fashion-MNIST (60000 / 10000), CNN conv8/2-conv16/2-dense10 (9,098 params)")


def mlp_apply(params: Any, x: Any) -> Any:
    """ReLU MLP on a list of ``(w, b)``; squeezes a single output column."""
    import jax

    h = x
    for w, b in params[:-1]:
        h = jax.nn.relu(h @ w + b)
    w, b = params[-1]
    out = h @ w + b
    return out[:, 0] if out.shape[1] == 1 else out


def _init_mlp(seed: int, sizes: Sequence[int]) -> list[tuple[Any, Any]]:
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
    return [(jax.random.normal(k, (a, b), jnp.float32) / np.float32(np.sqrt(a)),
             jnp.zeros((b,), jnp.float32)) for k, a, b in zip(keys, sizes[:-1], sizes[1:],
                                                               strict=True)]


def teacher_data(n_train: int, n_test: int, dim: int = 32, noise: float = 0.2,
                 seed: int = 1234) -> tuple[np.ndarray, ...]:
    """``x ~ N(0, I)``, ``y = standardised tanh-teacher(x) + noise * N(0, 1)`` (float32, numpy)."""
    rng = np.random.default_rng(seed)
    sizes = (dim, 64, 64, 1)
    ws = [rng.standard_normal((a, b)) / np.sqrt(a) for a, b in zip(sizes[:-1], sizes[1:],
                                                                     strict=True)]
    bs = [0.1 * rng.standard_normal(b) for b in sizes[1:]]
    x = rng.standard_normal((n_train + n_test, dim))
    h = x
    for w, b in zip(ws[:-1], bs[:-1], strict=True):
        h = np.tanh(h @ w + b)
    t = (h @ ws[-1] + bs[-1])[:, 0]
    t = (t - t[:n_train].mean()) / t[:n_train].std()
    y = t + noise * rng.standard_normal(t.shape)
    f32 = np.float32
    return (x[:n_train].astype(f32), y[:n_train].astype(f32), x[n_train:].astype(f32),
            y[n_train:].astype(f32))


def regression_problem(n_train: int = 60_000, n_test: int = 10_000, dim: int = 32,
                       hidden: tuple[int, ...] = (128, 128)) -> ProblemData:
    import jax.numpy as jnp

    xtr, ytr, xte, yte = teacher_data(n_train, n_test, dim)
    sizes = (dim, *hidden, 1)

    def loss(params: Any, batch: Any) -> Any:
        x, y = batch
        return jnp.mean((mlp_apply(params, x) - y) ** 2)

    def sums(params: Any, batch: Any) -> Any:
        x, y = batch
        return jnp.sum((mlp_apply(params, x) - y) ** 2), jnp.zeros((), jnp.float32)

    return ProblemData(xtr, ytr, xte, yte, functools.partial(_init_mlp, sizes=sizes), loss, sums,
                       f"teacher-student regression ({n_train} / {n_test}, d={dim}, noise 0.2), "
                       f"student MLP {'-'.join(map(str, sizes))}, MSE")


PROBLEMS: dict[str, ProblemSpec] = {
    "fmnist_mlp": ProblemSpec("fmnist_mlp", "classification", 20, 10_000,
                              functools.partial(_paper_mlp, None), "Fashion-MNIST, paper MLP"),
    "fmnist_cnn": ProblemSpec("fmnist_cnn", "classification", 10, 10_000, _cnn,
                              "Fashion-MNIST, small CNN"),
    "regression": ProblemSpec("regression", "regression", 20, 10_000, regression_problem,
                              "teacher-student MLP regression"),
    "fmnist_small": ProblemSpec("fmnist_small", "classification", 30, 1_000,
                                functools.partial(_paper_mlp, 5000),
                                "Fashion-MNIST 5,000-sample subset, paper MLP"),
}


@functools.lru_cache(maxsize=8)
def _problem_data(name: str) -> ProblemData:
    return PROBLEMS[name].build()


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------

#: Keys a configuration may hold that the runner consumes; every other key goes to ``make_apts``.
RUNNER_KEYS = frozenset({"stochastic", "batch_size", "batch_scale", "min_batch", "overlap",
                         "subdomain_overlap",
                         "num_subdomains", "iterations_per_epoch", "description"})

#: The paper's method as ``paper.py`` ran it: SAPTS, batch 10,000 (the problem's APTS batch),
#: 5 % overlap between consecutive minibatches and 5 % of each microbatch shared by all
#: subdomains, nu = 5 local steps, L-SR1 memory 5, default radius constants, N in {1, 2, 4}.
PAPER: dict[str, Any] = {
    "description": "paper method (SAPTS L-SR1, nu=5, m=5, 5 % overlaps, default radius)",
    "stochastic": True, "batch_size": None, "overlap": 0.05, "subdomain_overlap": 0.05,
    "num_subdomains": (1, 2, 4), "local_steps": 5, "model": "sr1", "memory_size": 5,
    "preset": "paper",
}

#: Shared bases of the issue-11 combinations: the authors' local boundary + mean combination, then
#: + the ellipsoidal norm, then + the first-order model.
_AM: dict[str, Any] = {**PAPER, "local_boundary": "adaptive", "combine": "mean"}
_AME: dict[str, Any] = {**_AM, "norm": "adaptive"}
_FO_AME: dict[str, Any] = {**_AME, "model": "first_order"}

#: Named configurations. Add one entry per ablation (e.g. ``{**PAPER, "local_boundary": ...}``).
CONFIGS: dict[str, dict[str, Any]] = {
    "paper": PAPER,
    "paper-fo": {**PAPER, "model": "first_order", "description": "paper, first-order model"},
    "paper-b4x": {**PAPER, "batch_scale": 0.25, "description": "paper, minibatches 4x smaller"},
    "paper-fullbatch": {**PAPER, "stochastic": False, "iterations_per_epoch": 1,
                        "description": "full-batch APTS, 1 outer iteration per epoch"},
    # issue 11, one choice at a time from the paper preset, then combinations
    "adaptive": {**PAPER, "local_boundary": "adaptive",
                 "description": "paper, authors' local boundary (local radius up to max/N)"},
    "mean": {**PAPER, "combine": "mean", "description": "paper, mean of local steps, local radius Delta"},
    "nonmono": {**PAPER, "acceptance": "nonmonotone", "nonmonotone_window": 5,
                "description": "paper, non-monotone acceptance (window 5)"},
    "ellipsoid": {**PAPER, "norm": "adaptive", "description": "paper, ellipsoidal (Adam-scaled) norm"},
    "adaptive-mean": {**_AM, "description": "adaptive boundary + mean combination"},
    "adaptive-mean-b4x": {**_AM, "batch_scale": 0.25,
                          "description": "adaptive boundary + mean combination, minibatches 4x smaller"},
    "adaptive-mean-b16x": {**_AM, "batch_scale": 0.0625,
                           "description": "adaptive boundary + mean combination, minibatches 16x smaller"},
    "all3-b4x": {**_AM, "acceptance": "nonmonotone", "nonmonotone_window": 5, "batch_scale": 0.25,
                 "description": "adaptive + mean + non-monotone, minibatches 4x smaller"},
    "adaptive-mean-ell-b4x": {**_AME, "batch_scale": 0.25,
                              "description": "adaptive + mean + ellipsoidal norm, minibatches 4x smaller"},
    "adaptive-mean-ell-b16x": {**_AME, "batch_scale": 0.0625,
                               "description": "adaptive + mean + ellipsoidal norm, minibatches 16x smaller"},
    "adaptive-mean-ell-b16x-min256": {**_AME, "batch_scale": 0.0625, "min_batch": 256,
                                      "description": "adaptive + mean + ellipsoidal norm, minibatches "
                                                     "16x smaller but at least 256 samples"},
    "adaptive-mean-ell-bs256": {**_AME, "batch_size": 256,
                                "description": "adaptive + mean + ellipsoidal norm, minibatch 256"},
    "fo-adaptive-mean-ell-b16x-min256": {
        **_FO_AME, "batch_scale": 0.0625, "min_batch": 256,
        "description": "first-order model + adaptive + mean + ellipsoidal norm, minibatches 16x "
                       "smaller but at least 256 samples"},
    "fo-adaptive-mean-ell-b16x-min256-noglobal": {
        **_FO_AME, "batch_scale": 0.0625, "min_batch": 256, "global_step": "none",
        "description": "first-order model + adaptive + mean + ellipsoidal norm, minibatches 16x "
                       "smaller but at least 256 samples, no global step (step 5)"},
    "fo-adaptive-mean-ell-b16x-min256-nu10": {
        **_FO_AME, "batch_scale": 0.0625, "min_batch": 256, "local_steps": 10,
        "description": "first-order model + adaptive + mean + ellipsoidal norm, minibatches 16x "
                       "smaller but at least 256 samples, nu = 10 local steps"},
    # option 4: multi-batch curvature pairs for the global L-SR1 memory (needs the sr1 model)
    "paper-mb": {**PAPER, "curvature_pairs": "multi_batch",
                 "description": "paper, multi-batch curvature pairs (global pair over the outer "
                                "step, gradients on the minibatch overlap)"},
    "adaptive-mean-ell-b16x-min256-mb": {
        **_AME, "batch_scale": 0.0625, "min_batch": 256, "curvature_pairs": "multi_batch",
        "description": "adaptive + mean + ellipsoidal norm, minibatches 16x smaller but at least "
                       "256 samples, multi-batch curvature pairs"},
    "fo-adaptive-mean-ell-bs256": {
        **_FO_AME, "batch_size": 256,
        "description": "first-order model + adaptive + mean + ellipsoidal norm, minibatch 256"},
}


def split_config(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(runner keys, make_apts keyword arguments)`` of a configuration.

    ``preset="paper"`` is dropped when :func:`apts_jax.parallel.make_apts` has no ``preset``
    parameter (today's defaults are the paper's method); any other key that ``make_apts`` does not
    accept raises ``ValueError`` naming it.
    """
    from apts_jax.parallel import make_apts

    runner = {k: v for k, v in cfg.items() if k in RUNNER_KEYS}
    kwargs = {k: v for k, v in cfg.items() if k not in RUNNER_KEYS}
    sig = inspect.signature(make_apts).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values()):
        return runner, kwargs
    if kwargs.get("preset") == "paper" and "preset" not in sig:
        kwargs.pop("preset")
    unknown = sorted(set(kwargs) - set(sig))
    if unknown:
        raise ValueError(
            f"configuration keys {unknown} are neither runner keys {sorted(RUNNER_KEYS)} nor "
            f"keyword arguments of apts_jax.parallel.make_apts ({', '.join(list(sig)[3:])}); fix "
            "the entry in CONFIGS or update the library.")
    return runner, kwargs


def config_batch(cfg: Mapping[str, Any], problem: ProblemSpec) -> int | None:
    """The minibatch of a configuration on ``problem`` (None: full batch), a multiple of max N."""
    if not cfg.get("stochastic", True):
        return None
    b = cfg.get("batch_size") or problem.apts_batch
    b = int(round(b * float(cfg.get("batch_scale", 1.0))))
    b = max(b, int(cfg.get("min_batch", 1)))
    m = math.lcm(*[int(n) for n in _as_tuple(cfg.get("num_subdomains", (1,)))])
    return max(m, b - b % m)


def _as_tuple(v: Any) -> tuple:
    return tuple(v) if isinstance(v, list | tuple) else (v,)


# ----------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    problem: str
    protocol: str  # "full" or "screen"
    method: str  # "adam" or "apts"
    seed: int
    epochs: int
    batch_size: int | None = None
    lr: float | None = None
    config: str | None = None
    subdomains: int | None = None

    @property
    def group(self) -> str:
        if self.method == "adam":
            return f"adam-b{self.batch_size}-lr{self.lr:.2e}"
        return f"{self.config}-N{self.subdomains}"

    @property
    def name(self) -> str:
        return f"{self.group}-s{self.seed}"

    @property
    def key(self) -> str:
        return f"{self.problem}/{self.protocol}/{self.name}"

    def path(self, out: Path) -> Path:
        return out / self.problem / self.protocol / f"{self.name}.json"


def protocol_epochs(problem: ProblemSpec, screen: bool, epochs: int | None) -> int:
    if epochs is not None:
        return epochs
    return math.ceil(problem.epochs / 2) if screen else problem.epochs


def plan(problems: Sequence[str], configs: Sequence[str], seeds: Sequence[int], *, screen: bool,
         epochs: int | None = None, methods: Sequence[str] = ("adam", "apts"),
         lrs: Sequence[float] | None = None,
         config_table: Mapping[str, Mapping[str, Any]] | None = None) -> list[RunSpec]:
    """All runs: per problem the Adam grid (cheap batches first), then each configuration."""
    table = CONFIGS if config_table is None else config_table
    lrs = LRS if lrs is None else tuple(lrs)
    protocol = "screen" if screen else "full"
    seeds = (0,) if screen else tuple(seeds)
    runs: list[RunSpec] = []
    for pname in problems:
        if pname not in PROBLEMS:
            raise ValueError(f"unknown problem {pname!r}; known: {', '.join(PROBLEMS)}")
        p = PROBLEMS[pname]
        e = protocol_epochs(p, screen, epochs)
        if "adam" in methods:
            for b in sorted(p.adam_batches, reverse=True):
                for lr in lrs:
                    for s in seeds:
                        runs.append(RunSpec(pname, protocol, "adam", s, e, batch_size=b, lr=lr))
        if "apts" in methods:
            for cname in configs:
                if cname not in table:
                    raise ValueError(f"unknown configuration {cname!r}; known: {', '.join(table)}")
                cfg = table[cname]
                split_config(cfg)  # reject unknown keys before anything runs
                for n in _as_tuple(cfg.get("num_subdomains", (1,))):
                    for s in seeds:
                        runs.append(RunSpec(pname, protocol, "apts", s, e,
                                            batch_size=config_batch(cfg, p), config=cname,
                                            subdomains=int(n)))
    return runs


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import jax
    import jaxlib
    import optax

    info: dict[str, Any] = {
        "cores": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "jax": jax.__version__,
        "jaxlib": jaxlib.__version__, "optax": optax.__version__,
        "backend": jax.default_backend(), "num_devices": jax.device_count(),
    }
    import apts_jax

    lib = Path(apts_jax.__file__).resolve().parent
    info["apts_jax_path"] = str(lib)
    with contextlib.suppress(OSError):
        info["apts_jax_commit"] = (lib.parent / "COMMIT").read_text().strip()
    with contextlib.suppress(OSError):
        info["loadavg"] = list(os.getloadavg())
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    return info


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_EVAL_CACHE: dict[str, Any] = {}


def _evaluator(pname: str, data: ProblemData) -> Callable[[Any], dict[str, float]]:
    """``params -> {train_loss, test_loss, test_accuracy, train_accuracy}`` on the whole sets."""
    import jax
    import jax.numpy as jnp

    if pname in _EVAL_CACHE:
        return _EVAL_CACHE[pname]
    sums = jax.jit(data.sums)
    sets = {}
    k = TRAIN_EVAL_SAMPLES
    for split, x, y in (("train", data.train_x[:k], data.train_y[:k]),
                        ("test", data.test_x, data.test_y)):
        chunks = [(jnp.asarray(x[i:i + EVAL_CHUNK]), jnp.asarray(y[i:i + EVAL_CHUNK]))
                  for i in range(0, x.shape[0], EVAL_CHUNK)]
        sets[split] = (chunks, x.shape[0])
    classification = PROBLEMS[pname].kind == "classification" if pname in PROBLEMS else \
        np.issubdtype(data.train_y.dtype, np.integer)

    def evaluate(params: Any) -> dict[str, float]:
        t0 = time.perf_counter()
        out: dict[str, float] = {}
        for split, (chunks, n) in sets.items():
            tot = [sums(params, c) for c in chunks]
            loss = sum(float(t[0]) for t in tot) / n
            out[f"{split}_loss"] = loss
            if classification:
                out[f"{split}_accuracy"] = sum(float(t[1]) for t in tot) / n
        out["eval_s"] = time.perf_counter() - t0
        return out

    _EVAL_CACHE[pname] = evaluate
    return evaluate


_ADAM_CACHE: dict[tuple, tuple[Any, float]] = {}


def _adam_epoch(pname: str, data: ProblemData, params: Any, batch: int, steps: int,
                xdev: Any, ydev: Any) -> tuple[Any, float]:
    """AOT-compiled ``(params, opt_state, lr, X, Y, idx) -> (params, opt_state, losses)``."""
    import jax
    import jax.numpy as jnp
    import optax

    key = (pname, batch, steps)
    if key in _ADAM_CACHE:
        return _ADAM_CACHE[key][0], 0.0
    loss = data.loss

    def epoch(params: Any, opt_state: Any, lr: Any, x: Any, y: Any, idx: Any) -> Any:
        opt = optax.adam(lr)

        def body(carry: Any, rows: Any) -> Any:
            p, s = carry
            v, g = jax.value_and_grad(loss)(p, (jnp.take(x, rows, axis=0), jnp.take(y, rows, axis=0)))
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), v

        (params, opt_state), values = jax.lax.scan(body, (params, opt_state), idx)
        return params, opt_state, values

    opt_state = optax.adam(1e-3).init(params)
    idx = jnp.zeros((steps, batch), jnp.int32)
    t0 = time.perf_counter()
    compiled = jax.jit(epoch, donate_argnums=(0, 1)).lower(
        params, opt_state, jnp.float32(1e-3), xdev, ydev, idx).compile()
    dt = time.perf_counter() - t0
    _ADAM_CACHE[key] = (compiled, dt)
    return compiled, dt


_DEVICE_DATA: dict[str, Any] = {}


def _device_data(pname: str, data: ProblemData) -> tuple[Any, Any]:
    import jax.numpy as jnp

    if pname not in _DEVICE_DATA:
        _DEVICE_DATA.clear()
        _DEVICE_DATA[pname] = (jnp.asarray(data.train_x), jnp.asarray(data.train_y))
    return _DEVICE_DATA[pname]


def run_adam(spec: RunSpec, data: ProblemData,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import optax

    from apts_jax.data import plain_minibatches

    n = data.train_x.shape[0]
    b = spec.batch_size
    assert b is not None and spec.lr is not None
    steps = n // b
    params = jax.tree.map(jnp.asarray, data.init(spec.seed))
    xdev, ydev = _device_data(spec.problem, data)
    evaluate = _evaluator(spec.problem, data)
    compiled, compile_s = _adam_epoch(spec.problem, data, params, b, steps, xdev, ydev)
    opt_state = optax.adam(spec.lr).init(params)
    lr = jnp.float32(spec.lr)
    history = [{"epoch": 0, "grad_evals": 0, "data_passes": 0.0, "train_time_s": 0.0,
                **evaluate(params)}]
    train_t = 0.0
    for e in range(1, spec.epochs + 1):
        idx = jnp.asarray(plain_minibatches(n, b, seed=spec.seed, epoch=e - 1).indices)
        t0 = time.perf_counter()
        params, opt_state, values = compiled(params, opt_state, lr, xdev, ydev, idx)
        jax.block_until_ready((params, values))
        train_t += time.perf_counter() - t0
        evals = e * steps
        row = {"epoch": e, "grad_evals": evals, "data_passes": evals * b / n,
               "train_time_s": train_t, "batch_loss_mean": float(jnp.mean(values)),
               **evaluate(params)}
        history.append(row)
        if log:
            log(_row_text(row))
    return {"history": history, "compile_s": compile_s, "init_s": 0.0, "data_s": 0.0,
            "steps_per_epoch": steps, "samples_per_eval": b}


def _row_text(row: dict[str, Any]) -> str:
    acc = row.get("test_accuracy")
    m = f"test acc {acc:.2%}" if acc is not None else f"test mse {row['test_loss']:.4f}"
    return (f"      epoch {row['epoch']:3d}  {m}  train loss {row['train_loss']:.4f}  "
            f"passes {row['data_passes']:.1f}  t {row['train_time_s']:.1f} s")


def devices_for(n: int) -> int:
    import jax

    cap = jax.device_count()
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


_APTS_CACHE: dict[tuple, list[Any]] = {}


def run_apts(spec: RunSpec, data: ProblemData, cfg: Mapping[str, Any],
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One APTS (full batch) or SAPTS run of configuration ``cfg`` with ``spec.subdomains``."""
    import jax

    from apts_jax.data import OverlapSampler
    from apts_jax.parallel import make_apts, split_data, subdomain_layout

    runner, kwargs = split_config(cfg)
    N = int(spec.subdomains or 1)
    params0 = data.init(spec.seed)
    stochastic = bool(runner.get("stochastic", True))
    # Multi-batch curvature pairs: the samples each minibatch shares with the next, as pair data.
    pairs = stochastic and kwargs.get("curvature_pairs") == "multi_batch"
    # One program (and one compiled step) per problem, configuration, N and batch: seeds share it.
    pkey = (spec.problem, json.dumps(dict(cfg), sort_keys=True, default=str), N, spec.batch_size)
    cached = _APTS_CACHE.get(pkey)
    if cached is None:
        _APTS_CACHE.clear()
        layout = subdomain_layout(N, devices_for(N))
        cached = [make_apts(data.loss, params0, layout, **kwargs), None]
        _APTS_CACHE[pkey] = cached
    prog = cached[0]
    layout = prog.layout
    evaluate = _evaluator(spec.problem, data)
    n = data.train_x.shape[0]
    x, y = data.train_x, data.train_y
    data_s = 0.0
    if stochastic:
        b = spec.batch_size
        assert b is not None
        sampler = OverlapSampler(n, b, N, overlap=runner.get("overlap", 0.05),
                                 subdomain_overlap=runner.get("subdomain_overlap", 0.05),
                                 seed=spec.seed)
        per_epoch = sampler.batches_per_epoch
        samples_per_eval = b

        def batch(micro: np.ndarray) -> Any:
            idx = micro.reshape(-1)
            return split_data(layout, (x[idx], y[idx]))

        t0 = time.perf_counter()
        first = batch(sampler.epoch(0).microbatches[0])
        first_pair = batch(sampler.overlap_batches(0)[0]) if pairs else None
        data_s += time.perf_counter() - t0
    else:
        n_used = n - n % N
        full = split_data(layout, (x[:n_used], y[:n_used]))
        per_epoch = int(runner.get("iterations_per_epoch", 1))
        samples_per_eval = n_used
        first, first_pair = full, None
    # Samples of the two pair evaluations per outer iteration (counted in the data passes).
    pair_samples = 2 * N * sampler.pair_share if pairs else 0
    extra = (first_pair,) if pairs else ()
    t0 = time.perf_counter()
    state = prog.init(params0, first)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    compile_s = 0.0
    if cached[1] is None:
        fn = prog.fresh_step if stochastic else prog.step
        t0 = time.perf_counter()
        cached[1] = fn.lower(state, first, *extra).compile()
        compile_s = time.perf_counter() - t0
    step = cached[1]
    iterations = 0
    history = [{"epoch": 0, "grad_evals": int(state.num_fun_evals),
                "data_passes": int(state.num_fun_evals) * samples_per_eval / n,
                "train_time_s": 0.0, "radius": float(state.radius), **evaluate(
                    prog.unravel(state.params))}]
    train_t = 0.0
    for e in range(1, spec.epochs + 1):
        micro = sampler.epoch(e - 1).microbatches if stochastic else None
        shared = sampler.overlap_batches(e - 1) if pairs else None
        accepted = 0
        for k in range(per_epoch):
            if micro is not None:
                t0 = time.perf_counter()
                d = first if (e == 1 and k == 0) else batch(micro[k])
                if pairs:
                    extra = (first_pair if (e == 1 and k == 0) else batch(shared[k]),)
                data_s += time.perf_counter() - t0
            else:
                d = full
            t0 = time.perf_counter()
            state, st = step(state, d, *extra)
            jax.block_until_ready(state)
            train_t += time.perf_counter() - t0
            accepted += int(st.accepted)
            iterations += 1
        evals = int(state.num_fun_evals)
        row = {"epoch": e, "iterations": e * per_epoch, "grad_evals": evals,
               "data_passes": (evals * samples_per_eval + iterations * pair_samples) / n,
               "train_time_s": train_t,
               "radius": float(state.radius), "accepted_frac": accepted / per_epoch,
               "value": float(state.value), **evaluate(prog.unravel(state.params))}
        history.append(row)
        if log:
            log(_row_text(row) + f"  radius {row['radius']:.3g}  acc.frac {accepted}/{per_epoch}")
    return {"history": history, "compile_s": compile_s, "init_s": init_s, "data_s": data_s,
            "steps_per_epoch": per_epoch, "samples_per_eval": samples_per_eval,
            "make_apts_kwargs": _jsonable(kwargs),
            "runner": {k: list(v) if isinstance(v, tuple) else v for k, v in runner.items()},
            "devices": layout.mesh.devices.size}


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-safe copy (tuples -> lists, anything unknown -> its ``str``)."""
    return json.loads(json.dumps(dict(d), default=str))


def execute(spec: RunSpec, out: Path, *, command: str, config_table: Mapping[str, Any] | None = None,
            log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``spec``, write its JSON atomically and return the document."""
    table = CONFIGS if config_table is None else config_table
    t0 = time.perf_counter()
    data = _problem_data(spec.problem)
    if spec.method == "adam":
        res = run_adam(spec, data, log)
    else:
        res = run_apts(spec, data, table[spec.config], log)
    elapsed = time.perf_counter() - t0
    history = res.pop("history")
    p = PROBLEMS[spec.problem]
    doc = {
        "schema_version": SCHEMA_VERSION, "source": "tuning_free", "name": spec.name,
        "group": spec.group, "problem": spec.problem, "protocol": spec.protocol,
        "screen": spec.protocol == "screen", "method": spec.method,
        "params": {"seed": spec.seed, "epochs": spec.epochs, "batch_size": spec.batch_size,
                   "lr": spec.lr, "config": spec.config, "subdomains": spec.subdomains},
        "metric": p.metric, "problem_description": data.description,
        "history": history, "final": history[-1], **res, "elapsed_s": elapsed,
        "timing_note": "train_time_s: optimizer calls only (cumulative, AOT compilation and "
                       "evaluation excluded; SAPTS minibatch gather excluded, see data_s)",
        "machine": machine_info(), "date": _now(), "command": command,
    }
    if spec.method == "apts":
        doc["config"] = _jsonable(table[spec.config])
    _atomic_write(spec.path(out), json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return doc


# ----------------------------------------------------------------------------------------------
# Reuse of paper.py's Adam runs (fmnist_mlp)
# ----------------------------------------------------------------------------------------------


def import_paper_run(spec: RunSpec, out: Path, paper_dir: Path = PAPER_RESULTS) -> bool:
    """Convert ``paper.py``'s matching Adam run into ``spec``'s JSON; False when none matches."""
    if spec.problem != "fmnist_mlp" or spec.method != "adam":
        return False
    src = paper_dir / f"{spec.name}.json"
    if not src.is_file():
        return False
    doc = json.loads(src.read_text())
    if doc.get("protocol", {}).get("subset") or doc["final"]["epoch"] < spec.epochs or \
            doc.get("config", {}).get("model") != "mlp" or doc.get("config", {}).get("hidden"):
        return False
    hist = []
    for row in doc["history"][: spec.epochs + 1]:
        hist.append({"epoch": row["epoch"], "grad_evals": row["grad_evals"],
                     "data_passes": row["data_passes"],
                     "train_time_s": row.get("train_time_excl_compile_s", row["train_time_s"]),
                     "train_loss": row["train_loss"], "train_accuracy": row.get("train_accuracy"),
                     "test_loss": row["test_loss"], "test_accuracy": row["test_accuracy"],
                     "batch_loss_mean": row.get("batch_loss")})
    new = {
        "schema_version": SCHEMA_VERSION, "source": "paper.py", "source_file": str(src),
        "name": spec.name, "group": spec.group, "problem": spec.problem,
        "protocol": spec.protocol, "screen": spec.protocol == "screen", "method": "adam",
        "params": {"seed": spec.seed, "epochs": spec.epochs, "batch_size": spec.batch_size,
                   "lr": spec.lr, "config": None, "subdomains": None},
        "metric": "test_accuracy", "problem_description": "Fashion-MNIST (60000 / 10000), MLP "
        "784-512-256-10 (apts_jax.app via benchmarks/paper.py)",
        "history": hist, "final": hist[-1], "compile_s": sum(r.get("compile_s", 0.0) for r in
                                                             doc["history"][: spec.epochs + 1]),
        "init_s": 0.0, "data_s": None, "steps_per_epoch": 60_000 // spec.batch_size,
        "samples_per_eval": spec.batch_size, "elapsed_s": None,
        "timing_note": "converted from paper.py: train_time_s = its train_time_excl_compile_s "
                       "(the app's Python loop per step, host-side batch gather included)",
        "machine": doc.get("machine"), "date": doc.get("date"), "command": doc.get("command"),
    }
    _atomic_write(spec.path(out), json.dumps(new, indent=1, allow_nan=False) + "\n")
    return True


# ----------------------------------------------------------------------------------------------
# Dry run: estimate
# ----------------------------------------------------------------------------------------------


def _class_key(s: RunSpec) -> tuple:
    return (s.problem, s.method, s.batch_size, s.config, s.subdomains)


def estimate(specs: Sequence[RunSpec], out: Path, *, probe: bool,
             config_table: Mapping[str, Any] | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Seconds per run: from finished runs of the same class (problem, method, batch, config, N)
    if any, else from a probe (1 epoch capped at 20 Adam steps / 2 APTS steps), else None.

    A run costs ``fixed + epochs * per_epoch`` where ``per_epoch`` = training + evaluation time
    of one epoch; ``fixed`` = compilation (Adam: once per problem and batch in a process).
    """
    finished: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for f in out.glob("*/*/*.json"):
        with contextlib.suppress(ValueError, KeyError, OSError):
            d = json.loads(f.read_text())
            if d.get("source") != "tuning_free":
                continue
            p = d["params"]
            k = (d["problem"], d["method"], p["batch_size"], p["config"], p["subdomains"])
            finished[k].append(d)
    rates: dict[tuple, dict[str, float]] = {}
    for k, docs in finished.items():
        per_epoch = statistics.fmean(d["elapsed_s"] / max(1, d["params"]["epochs"]) for d in docs)
        rates[k] = {"per_epoch_s": per_epoch, "fixed_s": 0.0, "from": "finished runs"}
    todo = [s for s in specs if not s.path(out).is_file()]
    for s in todo:
        k = _class_key(s)
        if k in rates or not probe:
            continue
        with tempfile.TemporaryDirectory(prefix="tf-probe-") as tmp:
            pspec = RunSpec(s.problem, "probe", s.method, s.seed, 1, s.batch_size, s.lr, s.config,
                            s.subdomains)
            t0 = time.perf_counter()
            d = execute(pspec, Path(tmp), command="probe", config_table=config_table)
            total = time.perf_counter() - t0
        h0, h1 = d["history"][0], d["history"][1]
        per_epoch = h1["train_time_s"] + h1.get("eval_s", 0.0) + (d.get("data_s") or 0.0)
        fixed = d["compile_s"] + d["init_s"] + h0.get("eval_s", 0.0)
        rates[k] = {"per_epoch_s": per_epoch, "fixed_s": fixed, "from": "probe"}
        log(f"  probe {s.problem}/{s.group}: {per_epoch:.2f} s per epoch (train "
            f"{h1['train_time_s']:.2f} s, eval {h1.get('eval_s', 0):.2f} s), compile+init "
            f"{fixed:.1f} s; probe total {total:.1f} s")
    per_run: list[dict[str, Any]] = []
    total = 0.0
    by: dict[str, float] = defaultdict(float)
    seen_fixed: set[tuple] = set()
    for s in todo:
        r = rates.get(_class_key(s))
        if r is None:
            per_run.append({"run": s.key, "estimate_s": None})
            continue
        fixed = r["fixed_s"] if (s.method == "apts" or _class_key(s)[:3] not in seen_fixed) else 0.0
        seen_fixed.add(_class_key(s)[:3])
        est = fixed + s.epochs * r["per_epoch_s"]
        per_run.append({"run": s.key, "estimate_s": est})
        total += est
        by[f"{s.problem}/{s.method}"] += est
    return {"total_s": total, "by_problem_method_s": dict(by), "per_run": per_run,
            "classes": {"/".join(map(str, k)): v for k, v in rates.items()},
            "unestimated": sum(1 for r in per_run if r["estimate_s"] is None)}


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


def _mean_std(xs: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [x for x in xs if x is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _better(a: float, b: float, higher: bool) -> bool:
    return a > b if higher else a < b


def time_to_target(run: dict[str, Any], metric: str, target: float, higher: bool) -> float | None:
    """Training time at the first epoch whose ``metric`` reaches ``target``."""
    for row in run["history"]:
        v = row.get(metric)
        if v is not None and (v >= target if higher else v <= target):
            return float(row["train_time_s"])
    return None


def summarize_problem(pname: str, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Groups (mean +- std over seeds), best/median Adam, targets, gaps, times to target."""
    p = PROBLEMS.get(pname)
    metric = runs[0]["metric"]
    higher = metric == "test_accuracy"
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[r["group"]].append(r)
    table: dict[str, dict[str, Any]] = {}
    for g, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["params"]["seed"])
        m, sd = _mean_std([r["final"].get(metric) for r in rs])
        t, t_sd = _mean_std([r["final"]["train_time_s"] for r in rs])
        table[g] = {
            "method": rs[0]["method"],
            "params": {k: v for k, v in rs[0]["params"].items() if k != "seed"},
            "seeds": [r["params"]["seed"] for r in rs], "epochs": rs[0]["final"]["epoch"],
            "final_metric_mean": m, "final_metric_std": sd,
            "final_train_loss_mean": _mean_std([r["final"].get("train_loss") for r in rs])[0],
            "data_passes_mean": _mean_std([r["final"].get("data_passes") for r in rs])[0],
            "train_time_s_mean": t, "train_time_s_std": t_sd,
            "compile_s_mean": _mean_std([r.get("compile_s") for r in rs])[0],
            "loadavg_mean": _mean_std([((r.get("machine") or {}).get("loadavg") or [None])[0]
                                       for r in rs])[0],
            "sources": sorted({r.get("source", "?") for r in rs}),
        }
    adam = {g: v for g, v in table.items() if v["method"] == "adam" and
            v["final_metric_mean"] is not None and math.isfinite(v["final_metric_mean"])}

    def rank(items: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
        return sorted(items, key=lambda e: e[1]["final_metric_mean"], reverse=higher)

    out: dict[str, Any] = {"metric": metric, "higher_is_better": higher, "groups": table,
                           "num_runs": len(runs), "kind": p.kind if p else None}
    if not adam:
        out.update(best_adam=None, median_adam=None, target=None, adam_per_batch={})
        return out
    ranked = rank(list(adam.items()))  # best first
    best_g, best = ranked[0]
    med_g, med = ranked[(len(ranked) - 1) // 2]
    per_b: dict[str, Any] = {}
    for b in sorted({v["params"]["batch_size"] for v in adam.values()}):
        rb = rank([(g, v) for g, v in adam.items() if v["params"]["batch_size"] == b])
        mg, mv = rb[(len(rb) - 1) // 2]
        per_b[str(b)] = {
            "best": {"group": rb[0][0], "lr": rb[0][1]["params"]["lr"],
                     "mean": rb[0][1]["final_metric_mean"], "std": rb[0][1]["final_metric_std"]},
            "median": {"group": mg, "lr": mv["params"]["lr"], "mean": mv["final_metric_mean"]},
            "num_lrs": len(rb),
            "grid_train_time_s": sum(v["train_time_s_mean"] or 0.0 for _, v in rb),
            "metric_by_lr": {f"{v['params']['lr']:.3g}": [v["final_metric_mean"],
                                                          v["final_metric_std"]]
                             for _, v in sorted(rb, key=lambda e: e[1]["params"]["lr"])},
        }
    bm = best["final_metric_mean"]
    target = bm - TARGET_GAP if higher else bm * (1 + TARGET_REL_LOSS)
    tol = TARGET_GAP * 100 if higher else TARGET_REL_LOSS * 100
    grid = sum(v["train_time_s_mean"] or 0.0 for v in adam.values())
    for g, v in table.items():
        rs = groups[g]
        times = [time_to_target(r, metric, target, higher) for r in rs]
        hit = [t for t in times if t is not None]
        v["time_to_target_s"] = times
        v["reached"] = f"{len(hit)}/{len(times)}"
        v["time_to_target_s_mean"] = statistics.fmean(hit) if hit else None
        m = v["final_metric_mean"]
        if m is None or not math.isfinite(m):
            v["gap"] = None
        elif higher:
            v["gap"] = 100.0 * (m - bm)  # percentage points, negative = worse
        else:
            v["gap"] = 100.0 * (bm - m) / bm  # % of the best Adam's loss, negative = worse
        v["gap_in_tolerances"] = None if v["gap"] is None else v["gap"] / tol
        passes = v["data_passes_mean"]
        v["train_time_per_data_pass_s"] = (v["train_time_s_mean"] / passes
                                           if passes and v["train_time_s_mean"] is not None else None)
        v["ratio_to_adam_grid"] = (v["time_to_target_s_mean"] / grid if grid and
                                   v["time_to_target_s_mean"] is not None else None)
        v["above_median_adam"] = None if m is None else (
            _better(m, med["final_metric_mean"], higher) or m == med["final_metric_mean"])
    out.update(
        best_adam={"group": best_g, "lr": best["params"]["lr"],
                   "batch_size": best["params"]["batch_size"], "mean": bm,
                   "std": best["final_metric_std"], "sources": best["sources"]},
        median_adam={"group": med_g, "lr": med["params"]["lr"],
                     "batch_size": med["params"]["batch_size"], "mean": med["final_metric_mean"]},
        target=target, gap_unit="pp" if higher else "% rel. loss", tolerance=tol,
        adam_per_batch=per_b,
        adam_grid_train_time_s=grid,
    )
    return out


def worst_gaps(problems: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """Per non-Adam group and per configuration (over its N): the worst gap over the problems."""
    per_group: dict[str, dict[str, Any]] = defaultdict(dict)
    for pname, s in problems.items():
        for g, v in s.get("groups", {}).items():
            if v["method"] != "apts" or v.get("gap") is None:
                continue
            per_group[g][pname] = (v["gap"], v["gap_in_tolerances"])
    groups = {}
    for g, d in sorted(per_group.items()):
        worst = min(d.items(), key=lambda e: e[1][1])
        groups[g] = {"worst_problem": worst[0], "worst_gap": worst[1][0],
                     "worst_gap_in_tolerances": worst[1][1], "problems": sorted(d),
                     "gaps": {k: v[0] for k, v in d.items()}}
    configs: dict[str, Any] = {}
    for g, v in groups.items():
        c = g.rsplit("-N", 1)[0]
        if c not in configs or v["worst_gap_in_tolerances"] < configs[c]["worst_gap_in_tolerances"]:
            configs[c] = dict(v, group=g)
    return {"groups": groups, "configs": configs}


def summarize(out: Path, problems: Sequence[str] | None = None) -> dict[str, Any]:
    """Read every run JSON under ``out``; summarise per protocol and problem."""
    by: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for f in sorted(out.glob("*/*/*.json")):
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if "protocol" not in d or "history" not in d:
            continue
        if problems and d["problem"] not in problems:
            continue
        by[d["protocol"]][d["problem"]].append(d)
    result: dict[str, Any] = {}
    for proto, probs in sorted(by.items()):
        ps = {pn: summarize_problem(pn, rs) for pn, rs in sorted(probs.items())}
        result[proto] = {"screen": proto == "screen", "problems": ps, "selection": worst_gaps(ps)}
    return result


def _f(v: Any, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _metric_text(v: float | None, sd: float | None, higher: bool) -> str:
    if v is None:
        return "-"
    if higher:
        return f"{100 * v:.2f} %" if sd is None else f"{100 * v:.2f} ± {100 * sd:.2f} %"
    return f"{v:.4f}" if sd is None else f"{v:.4f} ± {sd:.4f}"


def markdown(summary: dict[str, Any]) -> str:
    lines = ["# Tuning-free ablation (issue 11): summary", "",
             f"Generated {summary['date']} by `{summary['command']}`; machine: "
             f"{summary['machine'].get('cpu_model', '?')}, {summary['machine']['cores']} cores, "
             f"JAX {summary['machine']['jax']} ({summary['machine']['backend']}).", "",
             "Metric: test accuracy (classification, higher is better) or test MSE (regression, "
             "lower is better), final epoch, mean ± std over seeds. Times: training time, "
             "compilation and evaluation excluded, mean over seeds. Target: best Adam − 0.3 pp "
             "(accuracy) or best Adam's MSE × 1.02. Gap to best Adam: pp (accuracy) or % of the "
             "best Adam's MSE (regression); negative = worse. `tol` = the gap in units of the "
             "problem's tolerance (0.3 pp or 2 %). Ratio = time to target / Adam grid time (one "
             "sweep: every Adam (lr, batch), mean over seeds). `load` = mean 1-minute load "
             "average at the end of the runs: times measured under different loads (the machine "
             "is shared) are not comparable. Times of `source: paper.py` runs come from "
             "the app's loop (host gather per step), the others from this runner (`lax.scan`).",
             ""]
    for proto, ps in summary["protocols"].items():
        tag = "SCREEN runs (1 seed, half the epochs)" if ps["screen"] else "full protocol"
        lines += [f"## Protocol `{proto}` — {tag}", ""]
        for pname, s in ps["problems"].items():
            higher = s["higher_is_better"]
            lines += [f"### {pname} ({s['num_runs']} runs)", ""]
            ba, md = s.get("best_adam"), s.get("median_adam")
            if ba:
                lines += [f"Best Adam: batch {ba['batch_size']}, lr {ba['lr']:.3g}: "
                          f"{_metric_text(ba['mean'], ba['std'], higher)} (from "
                          f"{', '.join(ba['sources'])}); median Adam (all lr × batch): batch "
                          f"{md['batch_size']}, lr {md['lr']:.3g}: "
                          f"{_metric_text(md['mean'], None, higher)}; target "
                          f"{_metric_text(s['target'], None, higher).split(' ±')[0]}; Adam grid "
                          f"time {s['adam_grid_train_time_s']:.1f} s.", ""]
                for b, info in s["adam_per_batch"].items():
                    lines.append(
                        f"- Adam batch {b}: best lr {info['best']['lr']:.3g} "
                        f"({_metric_text(info['best']['mean'], info['best']['std'], higher)}), "
                        f"median lr {info['median']['lr']:.3g} "
                        f"({_metric_text(info['median']['mean'], None, higher)}), "
                        f"{info['num_lrs']} lrs, grid time {info['grid_train_time_s']:.1f} s")
                lines.append("")
            lines += ["| group | seeds | final metric | train loss | data passes | train time s | "
                      "s / pass | time to target s | reached | ratio to grid | gap | tol | "
                      "≥ median Adam | load |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
                      "---: | :-: | ---: |"]
            shown = set()
            if ba:
                shown = {ba["group"], md["group"]} | {i[w]["group"] for i in
                                                      s["adam_per_batch"].values()
                                                      for w in ("best", "median")}
            for g, v in sorted(s["groups"].items(), key=lambda e: (e[1]["method"] == "adam", e[0])):
                if v["method"] == "adam" and g not in shown:
                    continue
                label = g + (" (best)" if ba and g == ba["group"] else "") + (
                    " (median)" if md and g == md["group"] else "")
                lines.append(
                    f"| {label} | {len(v['seeds'])} | "
                    f"{_metric_text(v['final_metric_mean'], v['final_metric_std'], higher)} | "
                    f"{_f(v['final_train_loss_mean'], '.4f')} | {_f(v['data_passes_mean'], '.1f')} | "
                    f"{_f(v['train_time_s_mean'], '.1f')} | "
                    f"{_f(v.get('train_time_per_data_pass_s'), '.3f')} | "
                    f"{_f(v.get('time_to_target_s_mean'), '.1f')} | {v.get('reached', '-')} | "
                    f"{_f(v.get('ratio_to_adam_grid'), '.3f')} | {_f(v.get('gap'), '+.2f')} | "
                    f"{_f(v.get('gap_in_tolerances'), '+.1f')} | "
                    f"{ {None: '-', True: 'yes', False: 'no'}[v.get('above_median_adam')]} | "
                    f"{_f(v.get('loadavg_mean'), '.1f')} |")
            lines.append("")
        sel = ps["selection"]
        if sel["groups"]:
            names = sorted({p for v in sel["groups"].values() for p in v["problems"]})
            lines += ["### Selection: worst gap to the best Adam over the problems", "",
                      "Gap per problem (pp of accuracy, or % of the best Adam's MSE; negative = "
                      "worse), the worst one, and the worst in units of the problem's tolerance "
                      "(0.3 pp or 2 %), the selection criterion; `-` = not run.", "",
                      "| configuration (group) | " + " | ".join(names)
                      + " | worst problem | worst gap | in tolerances | problems |",
                      "| --- | " + " | ".join("---:" for _ in names) + " | --- | ---: | ---: | ---: |"]
            for g, v in sorted(sel["groups"].items(), key=lambda e: -e[1]["worst_gap_in_tolerances"]):
                per = " | ".join(_f(v["gaps"].get(p), "+.2f") for p in names)
                lines.append(f"| {g} | {per} | {v['worst_problem']} | {v['worst_gap']:+.2f} | "
                             f"{v['worst_gap_in_tolerances']:+.1f} | {len(v['problems'])} |")
            lines.append("")
    return "\n".join(lines)


def write_summary(out: Path, command: str, problems: Sequence[str] | None = None,
                  plots: bool = True) -> dict[str, Any]:
    summary = {"schema_version": SCHEMA_VERSION, "date": _now(), "command": command,
               "machine": machine_info(), "target_gap": TARGET_GAP,
               "target_rel_loss": TARGET_REL_LOSS,
               "problems_defined": {k: {"kind": v.kind, "epochs": v.epochs,
                                        "apts_batch": v.apts_batch,
                                        "adam_batches": list(v.adam_batches),
                                        "description": v.description}
                                    for k, v in PROBLEMS.items()},
               "configs_defined": {k: _jsonable(c) for k, c in CONFIGS.items()},
               "protocols": summarize(out, problems)}
    _atomic_write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    _atomic_write(out / "summary.md", markdown(summary) + "\n")
    if plots:
        try:
            sys.path.insert(0, str(HERE))
            import plot_tuning_free

            for proto, ps in summary["protocols"].items():
                plot_tuning_free.plot_protocol(ps, out / f"tuning_free_{proto}.png",
                                               title=f"{proto} protocol")
        except ImportError as err:  # matplotlib missing
            print(f"no plots: {err}", flush=True)
    return summary


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    p.add_argument("--configs", nargs="*", default=["paper"],
                   help=f"APTS/SAPTS configurations (known: {', '.join(CONFIGS)})")
    p.add_argument("--methods", nargs="+", default=["adam", "apts"], choices=["adam", "apts"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="Adam: only these learning rates of the 13-point grid (default: all)")
    p.add_argument("--epochs", type=int, default=None,
                   help="override every problem's epoch budget (default: per problem; screens: "
                        "half of it)")
    p.add_argument("--screen", action="store_true",
                   help="screening protocol: seed 0, half the epochs (results in <problem>/screen)")
    p.add_argument("--only", default=None, metavar="REGEX",
                   help="only runs whose '<problem>/<protocol>/<name>' matches (re.search)")
    p.add_argument("--max-runs", type=int, default=None, metavar="K")
    p.add_argument("--dry-run", action="store_true", help="list the plan and estimate its time")
    p.add_argument("--no-probe", action="store_true",
                   help="--dry-run: estimate from finished runs only (no timing probes)")
    p.add_argument("--no-import", action="store_true",
                   help="rerun fmnist_mlp's Adam grid instead of converting paper.py's runs")
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = args.out.resolve()
    command = " ".join(["python benchmarks/tuning_free.py",
                        *(sys.argv[1:] if argv is None else list(argv))])
    import jax

    max_n = max([int(n) for c in args.configs if c in CONFIGS
                 for n in _as_tuple(CONFIGS[c].get("num_subdomains", (1,)))] or [1])
    with contextlib.suppress(RuntimeError):
        jax.config.update("jax_num_cpu_devices", max(max_n, 1))

    lrs = None
    if args.lrs:
        lrs = [lr for lr in LRS if any(math.isclose(lr, x, rel_tol=1e-2) for x in args.lrs)]
        if len(lrs) != len(args.lrs):
            print(f"error: --lrs must be values of the grid {list(LRS)}", file=sys.stderr)
            return 2
    specs = plan(args.problems, args.configs, args.seeds, screen=args.screen, epochs=args.epochs,
                 methods=args.methods, lrs=lrs)
    if args.only:
        rx = re.compile(args.only)
        specs = [s for s in specs if rx.search(s.key)]
    if not args.no_import and not args.dry_run:
        for s in specs:
            if not s.path(out).is_file() and import_paper_run(s, out):
                print(f"  imported {s.key} from paper.py", flush=True)
    done = [s for s in specs if s.path(out).is_file()]
    todo = [s for s in specs if not s.path(out).is_file()]
    print(f"tuning_free: {len(specs)} planned run(s) in {out}: {len(done)} finished, {len(todo)} "
          f"to run; devices {jax.device_count()} ({jax.default_backend()})", flush=True)
    if args.dry_run:
        importable = [s for s in todo if s.problem == "fmnist_mlp" and s.method == "adam" and
                      not args.no_import and (PAPER_RESULTS / f"{s.name}.json").is_file()]
        for s in specs:
            state = "done" if s in done else ("import" if s in importable else "todo")
            print(f"  [{state:6}] {s.key}  ({s.epochs} epochs)")
        rest = [s for s in todo if s not in importable]
        est = estimate(rest, out, probe=not args.no_probe)
        print(f"estimated compute for {len(rest)} run(s) to train ({len(importable)} to import): "
              f"{est['total_s']:.0f} s = {est['total_s'] / 60:.1f} min"
              + (f" ({est['unestimated']} run(s) without an estimate)" if est["unestimated"] else ""))
        for k, v in sorted(est["by_problem_method_s"].items()):
            print(f"  {k}: {v / 60:.1f} min")
        _atomic_write(out / "dry_run_estimate.json", json.dumps(
            {"date": _now(), "command": command, "machine": machine_info(), "todo": len(rest),
             "import": len(importable), **est}, indent=1) + "\n")
        return 0

    import fcntl
    import hashlib

    out.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(str(out).encode()).hexdigest()[:16]
    lock = open(Path(tempfile.gettempdir()) / f"apts-tuning-free-{key}.lock", "w")  # noqa: SIM115
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print(f"error: another tuning_free.py invocation is running on {out}", file=sys.stderr)
        return 1
    if not args.summary_only:
        budget = len(todo) if args.max_runs is None else min(args.max_runs, len(todo))
        t_all = time.perf_counter()
        log = None if args.quiet else (lambda m: print(m, flush=True))
        for i, s in enumerate(todo[:budget]):
            print(f"[{i + 1}/{budget}] {s.key} ({s.epochs} epochs) ...", flush=True)
            doc = execute(s, out, command=command, log=log)
            f = doc["final"]
            m = doc["metric"]
            print(f"    {m} {f[m]:.4f}  train loss {f['train_loss']:.4f}  passes "
                  f"{f['data_passes']:.1f}  train {f['train_time_s']:.1f} s  compile "
                  f"{doc['compile_s']:.1f} s  elapsed {doc['elapsed_s']:.1f} s", flush=True)
        print(f"ran {budget} run(s) in {time.perf_counter() - t_all:.1f} s; {len(todo) - budget} "
              "left", flush=True)
    write_summary(out, command, plots=not args.no_plots)
    print(f"wrote {out / 'summary.json'} and summary.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
