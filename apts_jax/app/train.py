r"""Training loops of ``apts-jax train``: APTS, SAPTS, trust region and optax baselines.

Every optimizer is driven by a Python loop of jitted iterations; one *epoch* is:

* ``apts`` (full-batch APTS, :func:`apts_jax.parallel.make_apts` ``step``): a fixed number
  ``--iterations-per-epoch`` (default 10) of outer iterations on the whole (subset) training set,
  split into ``N`` equal shards (``n mod N`` trailing samples are left out);
* ``sapts`` (minibatch APTS, ``fresh_step``): one pass of :class:`apts_jax.data.OverlapSampler`
  over the training set: ``K`` minibatches of ``B`` slots, each split into ``N`` microbatches of
  ``B/N`` samples (microbatch ``i`` = shard ``i`` of the subdomain data); one outer iteration per
  minibatch. ``--iterations-per-epoch`` caps ``K``;
* ``tr`` (:func:`apts_jax.trust_region`): full batch — ``--iterations-per-epoch`` iterations on
  the whole training set (reusing :math:`f, \nabla f` of the accepted point); with
  ``--batch-size`` — one iteration per minibatch of :func:`apts_jax.data.plain_minibatches`,
  :math:`f, \nabla f` recomputed on each new minibatch;
* ``adam`` / ``sgd`` (:func:`optax.adam`, :func:`optax.sgd` with momentum): one step per
  minibatch of :func:`~apts_jax.data.plain_minibatches`;
* ``lbfgs`` (:func:`optax.lbfgs`, zoom line search): ``--iterations-per-epoch`` full-batch
  iterations.

Minibatch orders depend only on ``(seed, epoch)`` (``numpy.random.default_rng([seed, epoch])``),
the weights only on ``seed``; there is no other randomness. A checkpoint after every epoch holds
the complete optimizer state (parameters included) and the metric history, so ``--resume``
continues a run bitwise identically to an uninterrupted one.

After each epoch the parameters are evaluated on the whole training and test sets (see
:mod:`apts_jax.app.metrics` for the metrics).
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from apts_jax.app import metrics as metrics_lib
from apts_jax.app.checkpoint import Checkpointer
from apts_jax.app.cli import DEFAULTS, RESUME_MAY_CHANGE, SUBDOMAIN_METHODS, TrainConfig, UsageError
from apts_jax.data import OverlapSampler, load_dataset, plain_minibatches

__all__ = ["Problem", "TrainResult", "build_method", "load_problem", "resolve_config", "run"]

EVAL_CHUNK = 5000


# ----------------------------------------------------------------------------------------------
# Problem: data, model, loss
# ----------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """Data (host numpy arrays) and the model as a pure function of its parameters."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    apply_fn: Callable[[Any, jax.Array], jax.Array]
    params0: Any
    loss_fn: Callable[[Any, tuple[jax.Array, jax.Array]], jax.Array]
    num_params: int
    description: str
    source: str


def load_problem(cfg: TrainConfig) -> Problem:
    """Load the data set and build the model of ``cfg`` (weights from ``cfg.seed``)."""
    from apts_jax import models

    image_model = cfg.model == "cnn"
    ds = load_dataset(cfg.dataset, cfg.data_dir, subset=cfg.subset, flatten=not image_model)
    try:
        if cfg.hidden:
            from flax import nnx

            sizes = (math.prod(ds.train_x.shape[1:]), *cfg.hidden, ds.num_classes)
            model = models.MLP(sizes, rngs=nnx.Rngs(cfg.seed))
        else:
            model = models.create_model(cfg.model, ds.train_x.shape[1:], ds.num_classes, cfg.seed)
    except ValueError as err:
        raise UsageError(f"--model {cfg.model}: {err}") from None
    apply_fn, params = models.functional(model)
    n_params = models.count_params(params)
    if isinstance(model, models.MLP):
        desc = f"MLP {'-'.join(map(str, model.sizes))}"
    else:
        desc = type(model).__name__
    return Problem(
        train_x=ds.train_x, train_y=ds.train_y, test_x=ds.test_x, test_y=ds.test_y,
        apply_fn=apply_fn, params0=params, loss_fn=models.cross_entropy_loss(apply_fn),
        num_params=n_params, description=f"{desc} ({n_params:,} parameters)",
        source=str(ds.source),
    )


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
        cfg = cfg.replace(devices=d, subdomains=n)
    else:
        cfg = cfg.replace(devices=1, subdomains=None)
    b = cfg.batch_size
    if opt == "sapts":
        n = cfg.subdomains
        if b is None:
            b = max(n, n * (min(DEFAULTS["sapts_batch"], num_train) // n))
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


# ----------------------------------------------------------------------------------------------
# Methods: one per optimizer, each a loop of jitted iterations
# ----------------------------------------------------------------------------------------------


@dataclass
class IterRecord:
    """What one iteration reports (host values)."""

    loss: float
    radius: float | None
    accepted: bool | None
    grad_evals: int


class Method:
    """An optimizer driven epoch by epoch. Subclasses set the attributes in ``__init__``."""

    name: str = ""
    label: str = ""
    samples_per_eval: int = 1
    has_radius: bool = True

    def init(self) -> Any:
        """The initial training state (a pytree of JAX arrays)."""
        raise NotImplementedError

    def iterations(self, epoch: int) -> int:
        """Iterations in epoch ``epoch`` (1-based)."""
        raise NotImplementedError

    def run_epoch(
        self, state: Any, epoch: int, grad_evals: int, callback: Callable[[IterRecord], None]
    ) -> Any:
        """Run epoch ``epoch`` (1-based) from ``state``; ``grad_evals`` is the running count."""
        raise NotImplementedError

    def params(self, state: Any) -> Any:
        raise NotImplementedError

    def radius(self, state: Any) -> float | None:
        return None


def _np_batch(problem: Problem, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return problem.train_x[idx], problem.train_y[idx]


class APTSMethod(Method):
    """Full-batch APTS (``apts``) or minibatch SAPTS (``sapts``) on a subdomain layout."""

    def __init__(self, cfg: TrainConfig, problem: Problem) -> None:
        from apts_jax.parallel import make_apts, split_data, subdomain_layout

        self.cfg, self.problem = cfg, problem
        self.name = cfg.optimizer
        self.layout = subdomain_layout(cfg.subdomains, cfg.devices)
        self._split = split_data
        self.prog = make_apts(
            problem.loss_fn, problem.params0, self.layout, local_steps=cfg.local_steps,
            model=cfg.tr_model, memory_size=cfg.memory,
        )
        n_train = problem.train_x.shape[0]
        N = cfg.subdomains
        kind = "L-SR1" if cfg.second_order else "first-order"
        where = f"{N} subdomains on {cfg.devices} device(s)"
        if cfg.optimizer == "apts":
            self.n_used = n_train - n_train % N
            self.data = split_data(
                self.layout, (problem.train_x[: self.n_used], problem.train_y[: self.n_used])
            )
            self.per_epoch = cfg.iterations_per_epoch or DEFAULTS["iterations_per_epoch_full"]
            self.samples_per_eval = self.n_used
            self.label = (
                f"APTS, full batch ({self.n_used} samples, {self.n_used // N} per subdomain), "
                f"{where}, {cfg.local_steps} local {kind} TR steps, "
                f"{self.per_epoch} outer iterations per epoch"
            )
        else:
            self.sampler = OverlapSampler(
                n_train, cfg.batch_size, N, overlap=cfg.overlap,
                subdomain_overlap=cfg.subdomain_overlap, seed=cfg.seed,
            )
            k = self.sampler.batches_per_epoch
            self.per_epoch = min(k, cfg.iterations_per_epoch) if cfg.iterations_per_epoch else k
            self.samples_per_eval = cfg.batch_size
            s = self.sampler
            self.label = (
                f"SAPTS, minibatches of {cfg.batch_size} = {N} x {s.microbatch_size} "
                f"(overlap {s.overlap_size} with the next, {s.shared_size} shared by all "
                f"subdomains), {where}, {cfg.local_steps} local {kind} TR steps, "
                f"{self.per_epoch} of {k} minibatches per epoch"
            )

    def _minibatch(self, epoch: int, k: int) -> Any:
        # Sampler epochs are 0-based; microbatches[k] is (N, m): flattening it row by row and
        # letting split_data cut N equal shards puts microbatch i on subdomain i.
        micro = self.sampler.epoch(epoch - 1).microbatches[k].reshape(-1)
        return self._split(self.layout, _np_batch(self.problem, micro))

    def init(self) -> Any:
        data = self.data if self.name == "apts" else self._minibatch(1, 0)
        return self.prog.init(self.problem.params0, data)

    def iterations(self, epoch: int) -> int:
        return self.per_epoch

    def run_epoch(self, state, epoch, grad_evals, callback):
        micro = None if self.name == "apts" else self.sampler.epoch(epoch - 1).microbatches
        for k in range(self.per_epoch):
            if micro is None:
                state, st = self.prog.step(state, self.data)
            else:
                data = self._split(self.layout, _np_batch(self.problem, micro[k].reshape(-1)))
                state, st = self.prog.fresh_step(state, data)
            v, r, a, ev = jax.device_get((st.value, st.radius, st.accepted, state.num_fun_evals))
            callback(IterRecord(float(v), float(r), bool(a), int(ev)))
        return state

    def params(self, state):
        return self.prog.unravel(state.params)

    def radius(self, state):
        return float(state.radius)


class TrustRegionMethod(Method):
    """:func:`apts_jax.trust_region` on one device, full batch or minibatches."""

    def __init__(self, cfg: TrainConfig, problem: Problem) -> None:
        from apts_jax.trust_region import trust_region

        self.cfg, self.problem = cfg, problem
        self.name = "tr"
        self.opt = trust_region(cfg.tr_model, cfg.memory)
        loss = problem.loss_fn
        opt = self.opt
        n_train = problem.train_x.shape[0]
        kind = "L-SR1" if cfg.second_order else "first-order"
        if cfg.batch_size is None:
            self.data = (jnp.asarray(problem.train_x), jnp.asarray(problem.train_y))
            self.per_epoch = cfg.iterations_per_epoch or DEFAULTS["iterations_per_epoch_full"]
            self.samples_per_eval = n_train
            self.label = (f"{kind} trust region, full batch ({n_train} samples), "
                          f"{self.per_epoch} iterations per epoch")
            vg = optax.value_and_grad_from_state(loss)

            @jax.jit
            def step(carry, batch):
                params, state = carry
                value, grad = vg(params, batch, state=state)
                updates, state = opt.update(
                    grad, state, params, value=value, grad=grad,
                    value_fn=lambda p: loss(p, batch),
                )
                return optax.apply_updates(params, updates), state
        else:
            k = plain_minibatches(n_train, cfg.batch_size, seed=cfg.seed).indices.shape[0]
            self.per_epoch = min(k, cfg.iterations_per_epoch) if cfg.iterations_per_epoch else k
            self.samples_per_eval = cfg.batch_size
            self.label = (f"{kind} trust region, minibatches of {cfg.batch_size} (f and its "
                          f"gradient re-evaluated on each), {self.per_epoch} of {k} per epoch")

            @jax.jit
            def step(carry, batch):
                params, state = carry
                updates, state = opt.update(
                    params, state, params, value=None, grad=None,
                    value_fn=lambda p: loss(p, batch),
                )
                return optax.apply_updates(params, updates), state

        self._step = step

    def init(self):
        params = jax.tree.map(jnp.asarray, self.problem.params0)
        return (params, self.opt.init(params))

    def iterations(self, epoch):
        return self.per_epoch

    def run_epoch(self, state, epoch, grad_evals, callback):
        idx = None
        if self.cfg.batch_size is not None:
            idx = plain_minibatches(
                self.problem.train_x.shape[0], self.cfg.batch_size, seed=self.cfg.seed,
                epoch=epoch - 1,
            ).indices
        for k in range(self.per_epoch):
            batch = self.data if idx is None else _np_batch(self.problem, idx[k])
            state = self._step(state, batch)
            s = state[1]
            v, r, a, ev = jax.device_get(
                (s.value, s.radius, s.info.accepted, s.info.num_fun_evals)
            )
            callback(IterRecord(float(v), float(r), bool(a), int(ev)))
        return state

    def params(self, state):
        return state[0]

    def radius(self, state):
        return float(state[1].radius)


class OptaxMinibatchMethod(Method):
    """optax ``adam`` / ``sgd`` (momentum) on minibatches."""

    has_radius = False

    def __init__(self, cfg: TrainConfig, problem: Problem) -> None:
        self.cfg, self.problem = cfg, problem
        self.name = cfg.optimizer
        if cfg.optimizer == "adam":
            self.opt = optax.adam(cfg.lr)
            what = f"optax adam (lr {cfg.lr:g})"
        else:
            self.opt = optax.sgd(cfg.lr, momentum=cfg.momentum or None)
            what = f"optax sgd (lr {cfg.lr:g}, momentum {cfg.momentum:g})"
        n_train = problem.train_x.shape[0]
        k = n_train // cfg.batch_size
        self.per_epoch = min(k, cfg.iterations_per_epoch) if cfg.iterations_per_epoch else k
        self.samples_per_eval = cfg.batch_size
        self.label = f"{what}, minibatches of {cfg.batch_size}, {self.per_epoch} of {k} per epoch"
        loss, opt = problem.loss_fn, self.opt

        @jax.jit
        def step(carry, batch):
            params, state = carry
            value, grad = jax.value_and_grad(loss)(params, batch)
            updates, state = opt.update(grad, state, params)
            return (optax.apply_updates(params, updates), state), value

        self._step = step

    def init(self):
        params = jax.tree.map(jnp.asarray, self.problem.params0)
        return (params, self.opt.init(params))

    def iterations(self, epoch):
        return self.per_epoch

    def run_epoch(self, state, epoch, grad_evals, callback):
        idx = plain_minibatches(
            self.problem.train_x.shape[0], self.cfg.batch_size, seed=self.cfg.seed,
            epoch=epoch - 1,
        ).indices
        for k in range(self.per_epoch):
            state, value = self._step(state, _np_batch(self.problem, idx[k]))
            grad_evals += 1
            callback(IterRecord(float(value), None, None, grad_evals))
        return state

    def params(self, state):
        return state[0]


class LBFGSMethod(Method):
    """:func:`optax.lbfgs` (zoom line search), full batch."""

    has_radius = False

    def __init__(self, cfg: TrainConfig, problem: Problem) -> None:
        self.cfg, self.problem = cfg, problem
        self.name = "lbfgs"
        self.opt = optax.lbfgs(memory_size=cfg.memory)
        n_train = problem.train_x.shape[0]
        self.data = (jnp.asarray(problem.train_x), jnp.asarray(problem.train_y))
        self.per_epoch = cfg.iterations_per_epoch or DEFAULTS["iterations_per_epoch_full"]
        self.samples_per_eval = n_train
        self.label = (f"optax L-BFGS (memory {cfg.memory}, zoom line search), full batch "
                      f"({n_train} samples), {self.per_epoch} iterations per epoch")
        loss, opt = problem.loss_fn, self.opt
        vg = optax.value_and_grad_from_state(loss)

        @jax.jit
        def step(carry, batch):
            params, state = carry
            fresh = ~jnp.isfinite(optax.tree_utils.tree_get(state, "value"))
            value, grad = vg(params, batch, state=state)
            updates, state = opt.update(
                grad, state, params, value=value, grad=grad, value_fn=lambda p: loss(p, batch)
            )
            get = optax.tree_utils.tree_get
            evals = get(state, "num_linesearch_steps") + fresh.astype(jnp.int32)
            ok = get(state, "decrease_error") <= 0
            return (optax.apply_updates(params, updates), state), (get(state, "value"), ok, evals)

        self._step = step

    def init(self):
        params = jax.tree.map(jnp.asarray, self.problem.params0)
        return (params, self.opt.init(params))

    def iterations(self, epoch):
        return self.per_epoch

    def run_epoch(self, state, epoch, grad_evals, callback):
        for _ in range(self.per_epoch):
            state, out = self._step(state, self.data)
            value, ok, evals = jax.device_get(out)
            grad_evals += int(evals)
            callback(IterRecord(float(value), None, bool(ok), grad_evals))
        return state

    def params(self, state):
        return state[0]


def build_method(cfg: TrainConfig, problem: Problem) -> Method:
    if cfg.optimizer in SUBDOMAIN_METHODS:
        return APTSMethod(cfg, problem)
    if cfg.optimizer == "tr":
        return TrustRegionMethod(cfg, problem)
    if cfg.optimizer in ("adam", "sgd"):
        return OptaxMinibatchMethod(cfg, problem)
    if cfg.optimizer == "lbfgs":
        return LBFGSMethod(cfg, problem)
    raise UsageError(f"unknown optimizer {cfg.optimizer!r}")  # pragma: no cover


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


class Evaluator:
    """Mean loss and accuracy over whole data sets, in fixed chunks on one device."""

    def __init__(self, problem: Problem) -> None:
        self.device = jax.devices()[0]
        apply_fn = problem.apply_fn

        @jax.jit
        def chunk(params, x, y):
            logits = apply_fn(params, x)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return jnp.sum(losses), jnp.sum(jnp.argmax(logits, axis=-1) == y)

        self._chunk = chunk

        def put(x: np.ndarray, y: np.ndarray) -> list[tuple[jax.Array, jax.Array]]:
            return [
                (jax.device_put(x[i: i + EVAL_CHUNK], self.device),
                 jax.device_put(y[i: i + EVAL_CHUNK], self.device))
                for i in range(0, x.shape[0], EVAL_CHUNK)
            ]

        self.train = put(problem.train_x, problem.train_y)
        self.test = put(problem.test_x, problem.test_y)

    def __call__(self, params: Any, split: str) -> tuple[float, float]:
        params = jax.device_put(params, self.device)
        total, correct, count = 0.0, 0, 0
        for x, y in self.train if split == "train" else self.test:
            s, c = jax.device_get(self._chunk(params, x, y))
            total += float(s)
            correct += int(c)
            count += int(x.shape[0])
        return total / count, correct / count


# ----------------------------------------------------------------------------------------------
# The run: resume, loop, outputs
# ----------------------------------------------------------------------------------------------


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


def _print(*args: Any) -> None:
    from tqdm import tqdm

    tqdm.write(" ".join(str(a) for a in args), file=sys.stdout)
    sys.stdout.flush()


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
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


def run(cfg: TrainConfig) -> TrainResult:
    """Train as configured; write metrics, config, plots and checkpoints into ``cfg.out``."""
    from tqdm import tqdm

    t_start = time.perf_counter()
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"

    latest = None
    if ckpt_dir.is_dir():
        with Checkpointer(ckpt_dir) as probe:
            latest = probe.latest_epoch()
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

    problem = load_problem(cfg)
    cfg = resolve_config(cfg, problem.train_x.shape[0])
    if cfg.resume and latest is not None:
        _check_resume_config(out, cfg)
    try:
        method = build_method(cfg, problem)
    except ValueError as err:
        raise UsageError(str(err)) from None
    evaluator = Evaluator(problem)
    config_doc = _config_json(cfg, problem, method)

    _print(
        f"apts-jax train: {cfg.dataset} from {problem.source}: {problem.train_x.shape[0]} train / "
        f"{problem.test_x.shape[0]} test samples; {problem.description}"
    )
    _print(f"  optimizer: {method.label}")
    _print(f"  devices: {config_doc['resolved']['devices']}; {cfg.epochs} epoch(s); out: {out}")

    state = method.init()
    history: list[dict[str, Any]] = []
    iters: list[dict[str, Any]] = []
    start_epoch = 0
    time_offset = 0.0
    train_time = 0.0
    grad_evals = 0
    with Checkpointer(ckpt_dir) as ckpt:
        if cfg.resume and latest is not None:
            try:
                state, meta = ckpt.restore(latest, state)
            except ValueError as err:
                raise UsageError(f"--resume: {err}") from None
            history, iters = list(meta["history"]), list(meta["iterations"])
            start_epoch = int(meta["epoch"])
            time_offset = float(meta["wall_time_s"])
            train_time = float(meta["train_time_s"])
            grad_evals = int(meta["grad_evals"])
            _print(f"  resumed from the checkpoint of epoch {start_epoch} in {ckpt_dir}")
        elif cfg.resume:
            _print(f"  --resume: no checkpoint in {ckpt_dir} yet, starting from the beginning")
        metrics_lib.atomic_write_text(out / "config.json", json.dumps(config_doc, indent=2) + "\n")
        t_session = time.perf_counter()

        def wall() -> float:
            return time_offset + time.perf_counter() - t_session

        n_train = problem.train_x.shape[0]

        def epoch_row(epoch: int, iterations: int, batch_losses: list[float],
                      accepted: list[bool | None]) -> dict[str, Any]:
            params = method.params(state)
            train_loss, train_acc = evaluator(params, "train")
            test_loss, test_acc = evaluator(params, "test")
            acc = [a for a in accepted if a is not None]
            return {
                "epoch": epoch,
                "iterations": iterations,
                "wall_time_s": wall(),
                "train_time_s": train_time,
                "train_loss": train_loss,
                "train_accuracy": train_acc,
                "batch_loss": float(np.mean(batch_losses)) if batch_losses else None,
                "test_loss": test_loss,
                "test_accuracy": test_acc,
                "radius": method.radius(state),
                "accepted_frac": (sum(acc) / len(acc)) if acc else None,
                "grad_evals": grad_evals,
                "data_passes": grad_evals * method.samples_per_eval / n_train,
            }

        if not history:
            history.append(_clean_row(epoch_row(0, 0, [], [])))
            metrics_lib.write_metrics(out, history)

        total = sum(method.iterations(e) for e in range(1, cfg.epochs + 1))
        done = sum(method.iterations(e) for e in range(1, start_epoch + 1))
        show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        bar = tqdm(total=total, initial=done, disable=not show, unit="it", dynamic_ncols=True,
                   desc=cfg.optimizer, file=sys.stderr, leave=False)
        shown = {"test_accuracy": history[-1].get("test_accuracy")}
        try:
            for epoch in range(start_epoch + 1, cfg.epochs + 1):
                losses: list[float] = []
                accepted: list[bool | None] = []
                n_iter0 = history[-1]["iterations"]

                def on_iter(rec: IterRecord, epoch: int = epoch, n_iter0: int = n_iter0,
                            losses: list[float] = losses,
                            accepted: list[bool | None] = accepted) -> None:
                    losses.append(rec.loss)
                    accepted.append(rec.accepted)
                    k = n_iter0 + len(losses)
                    iters.append({
                        "iteration": k, "epoch": epoch, "loss": metrics_lib.clean(rec.loss),
                        "radius": metrics_lib.clean(rec.radius), "accepted": rec.accepted,
                        "grad_evals": rec.grad_evals,
                    })
                    bar.update(1)
                    parts = [f"ep {epoch}/{cfg.epochs}", f"loss {rec.loss:.4f}"]
                    if shown["test_accuracy"] is not None:
                        parts.append(f"test acc {shown['test_accuracy']:.2%}")
                    if rec.radius is not None:
                        parts.append(f"radius {rec.radius:.2e}")
                    acc = [a for a in accepted if a is not None]
                    if acc:
                        parts.append(f"accepted {sum(acc)}/{len(acc)}")
                    bar.set_postfix_str("  ".join(parts), refresh=False)

                t0 = time.perf_counter()
                state = method.run_epoch(state, epoch, grad_evals, on_iter)
                jax.block_until_ready(state)
                train_time += time.perf_counter() - t0
                if iters:
                    grad_evals = int(iters[-1]["grad_evals"])
                row = _clean_row(
                    epoch_row(epoch, n_iter0 + len(losses), losses, accepted)
                )
                history.append(row)
                shown["test_accuracy"] = row.get("test_accuracy")
                meta = {
                    "epoch": epoch, "history": history, "iterations": iters,
                    "wall_time_s": row["wall_time_s"], "train_time_s": train_time,
                    "grad_evals": grad_evals, "seed": cfg.seed, "config": config_doc,
                }
                ckpt.save(epoch, state, meta)
                metrics_lib.write_metrics(out, history)
                metrics_lib.write_iterations(out, iters)
                _print(_epoch_line(row, cfg.epochs))
        finally:
            bar.close()

    metrics_lib.write_metrics(out, history)
    metrics_lib.write_iterations(out, iters)
    title = f"{cfg.optimizer} on {cfg.dataset}"
    if cfg.plots:
        from apts_jax.app.plots import write_plots

        write_plots(out, history, iters, title=f"{title}, {problem.description}")
    table = metrics_lib.summary_table(history, title=f"Summary: {title}, {problem.description}")
    metrics_lib.atomic_write_text(out / "summary.txt", table + "\n")
    _print("")
    _print(table)
    final = history[-1]
    _print(
        f"\nfinal test accuracy {final['test_accuracy']:.2%} after {final['epoch']} epoch(s), "
        f"{final['iterations']} iterations; total {time.perf_counter() - t_start:.1f} s in this "
        f"session; outputs in {out}/ (metrics.csv, metrics.jsonl, iterations.csv, config.json, "
        f"{'loss.png, accuracy.png, radius.png, ' if cfg.plots else ''}summary.txt, checkpoints/)"
    )
    return TrainResult(cfg, history, iters, method.params(state), state, out)


def _clean_row(row: dict[str, Any]) -> dict[str, Any]:
    """Row with JSON-safe values (non-finite -> None), as stored in checkpoints and files."""
    return {k: metrics_lib.clean(v) for k, v in row.items()}
