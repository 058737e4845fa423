r"""The paper's experimental protocol on our data, resumable run by run.

Protocol (full mode; every optimizer gets the same number of epochs, ``--epochs``, default 20):

* data/model: Fashion-MNIST (60,000 train / 10,000 test) with the 784-512-256-10 ReLU MLP;
  CIFAR-10 with the 3072-512-512-10 MLP when its files are found offline (skipped with a message
  otherwise); softmax cross-entropy, float32;
* **APTS**, full batch, ``N`` in {1, 2, 4} subdomains, the paper's method (``--preset paper``)
  with L-SR1 (``sr1``) and first-order (``fo``) trust-region models, one configuration (at most
  ``nu = 5`` local iterations, L-SR1 memory 5, default radius constants), 1 outer iteration per
  epoch;
* **SAPTS**, minibatches of 10,000 (``N`` microbatches each, 5 % overlap between consecutive
  minibatches and 5 % of each microbatch shared by all subdomains: the app's overlap sampler), the
  same ``N``, models and configuration; one epoch = one pass of the sampler;
* **SAPTS with the library's default** (order ``default``: ``preset="tuning_free"``, first-order
  model, adaptive local boundary, mean combination, ellipsoidal norm; no ``--preset`` and no
  model or ``--local-steps`` flag, so the run is whatever ``apts-jax train`` does by default:
  ``nu = 10`` since the default took the preset's nu; the earlier ``nu = 5`` runs are kept in
  ``fashion_mnist/superseded-default-nu5/``), minibatches of :func:`apts_jax.default_minibatch`
  (624 for N = 2, 4 and 625 for N = 1 on 60,000 samples), the same ``N`` and overlaps;
* **Adam** over 13 learning rates log-spaced in [1e-5, 1e-1], at batch 10,000 and at batch 128;
* **SGD** (momentum 0.9) over the same learning rates and batch sizes;
* **L-BFGS** (``optax.lbfgs``, zoom line search, memory 5), full batch, 1 iteration per epoch;
* 3 seeds (0, 1, 2) for everything: the seed sets the weights and the minibatch order.

Each run is the training application (:func:`apts_jax.app.train.run`) called in this process with
the corresponding ``apts-jax train`` flags (listed in the run's JSON under ``argv``); its per-epoch
metrics (train loss/accuracy on the whole training set, test loss/accuracy, evaluations, data
passes, radius, ...) are kept as they are. **What is timed**: ``train_time_s`` is the app's time
inside the optimizer iterations of each epoch (``block_until_ready`` at the epoch's end; the
per-epoch evaluation, checkpointing and data loading are outside it). It includes JAX's tracing,
lowering and XLA compilation of the step functions during the first epoch; this script measures
that compilation time with ``jax.monitoring`` time-span events (union of the trace / lower /
compile spans that fall inside each epoch's iteration loop) and reports
``train_time_excl_compile_s = train_time_s - compile_s`` (cumulative per epoch). All times to
target and wall-time plots use ``train_time_excl_compile_s``; ``wall_time_s`` (the app's clock,
evaluation and compilation included) is kept too.

On CPU, ``max(N)`` devices are simulated (``jax_num_cpu_devices``) and APTS/SAPTS with ``N``
subdomains run on ``D = N`` devices (``--max-devices`` caps ``D`` to the largest divisor of ``N``
below it). Simulated devices share the machine's cores: no parallel speedup is possible on a
2-core machine, so CPU wall times of ``N > 1`` are *not* the paper's parallel times.

Outputs (``--out``, default ``benchmarks/results/paper``; ``--quick`` defaults to
``benchmarks/results/paper-quick``):

* ``<dataset>/<run-name>.json`` — one per finished run, written atomically; a run whose JSON exists
  is skipped on later invocations. An interrupted run resumes from the app's last epoch checkpoint
  (kept in ``<dataset>/.work/<run-name>/``, deleted once the JSON is written);
* ``summary.json`` and ``summary.md`` — per group (a configuration over its seeds): final test
  accuracy mean ± std, final training loss, training time; the best and median Adam learning rate
  per batch size; the target accuracy (best Adam configuration's mean final test accuracy − 0.3
  percentage points); each group's time to reach it; the total time of the Adam grid (one sweep:
  the sum over batch sizes and learning rates of the mean-over-seeds training time) and the ratio
  (APTS time to target) / (Adam grid total);
* ``<dataset>_fig1_apts.png``, ``<dataset>_fig2_sapts.png``, ``<dataset>_lr_sensitivity.png`` — see
  ``benchmarks/plot_paper.py``.

Run names: ``apts-N2-sr1-s0``, ``sapts-N4-fo-b10000-s1``, ``adam-b128-lr1.00e-03-s2``,
``sgd-b10000-lr1.00e-01-s0``, ``lbfgs-s0``; the group drops the ``-s<seed>`` suffix.

Usage::

    python benchmarks/paper.py --dry-run                # planned runs + compute estimate (probe)
    python benchmarks/paper.py                          # everything (resumable; Ctrl-C is safe)
    python benchmarks/paper.py --max-runs 10            # at most 10 new runs in this sitting
    python benchmarks/paper.py --only '^fashion_mnist/adam-b128'   # regex on "<dataset>/<name>"
    python benchmarks/paper.py --quick                  # 2,000-sample subset, 3 epochs, 1 seed,
                                                        # 2 learning rates (a few minutes on CPU)
    python benchmarks/paper.py --summary-only           # rebuild summary + plots from the JSONs
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "paper"
QUICK_OUT = HERE / "results" / "paper-quick"
TARGET_GAP = 0.003  # 0.3 percentage points below the best Adam accuracy


def log_grid(lo: float, hi: float, num: int) -> list[float]:
    """``num`` values log-spaced from ``lo`` to ``hi`` (both included), rounded to 3 digits."""
    if num == 1:
        return [lo]
    a, b = math.log10(lo), math.log10(hi)
    return [float(f"{10 ** (a + (b - a) * k / (num - 1)):.3g}") for k in range(num)]


@dataclass(frozen=True)
class Protocol:
    """Everything that defines the set of runs."""

    datasets: tuple[str, ...] = ("fashion_mnist", "cifar10")
    epochs: int = 20
    seeds: tuple[int, ...] = (0, 1, 2)
    subdomains: tuple[int, ...] = (1, 2, 4)
    #: "sr1"/"fo": the paper's method (--preset paper) with either model (APTS and SAPTS);
    #: "default": the library's default (SAPTS only, its own minibatch rule).
    orders: tuple[str, ...] = ("sr1", "fo", "default")
    full_batch_iterations: int = 1
    sapts_batch: int = 10_000
    lrs: tuple[float, ...] = tuple(log_grid(1e-5, 1e-1, 13))
    batch_sizes: tuple[int, ...] = (10_000, 128)
    subset: int | None = None
    methods: tuple[str, ...] = ("apts", "sapts", "adam", "sgd", "lbfgs")
    local_steps: int = 5  # nu, APTS/SAPTS (the paper's and apts_jax.parallel.make_apts' default)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


FULL = Protocol()
QUICK = Protocol(epochs=3, seeds=(0,), lrs=(1e-3, 1e-2), sapts_batch=500, batch_sizes=(500, 128),
                 subset=2000)


@dataclass(frozen=True)
class RunSpec:
    """One training run: the app flags and what identifies it."""

    dataset: str
    method: str
    seed: int
    subdomains: int | None = None
    order: str | None = None
    batch_size: int | None = None
    lr: float | None = None
    extra: tuple[str, ...] = field(default=())

    @property
    def group(self) -> str:
        if self.method == "apts":
            return f"apts-N{self.subdomains}-{self.order}"
        if self.method == "sapts":
            return f"sapts-N{self.subdomains}-{self.order}-b{self.batch_size}"
        if self.method in ("adam", "sgd"):
            return f"{self.method}-b{self.batch_size}-lr{self.lr:.2e}"
        return self.method

    @property
    def name(self) -> str:
        return f"{self.group}-s{self.seed}"

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.name}"

    def params(self) -> dict[str, Any]:
        return {"subdomains": self.subdomains, "order": self.order, "batch_size": self.batch_size,
                "lr": self.lr, "seed": self.seed}

    def argv(self, proto: Protocol, out: Path, devices: int | None) -> list[str]:
        a = ["train", "--dataset", self.dataset, "--model", "mlp", "--optimizer", self.method,
             "--epochs", str(proto.epochs), "--seed", str(self.seed), "--out", str(out),
             "--resume", "--no-plots", "--no-progress"]
        if proto.subset:
            a += ["--subset", str(proto.subset)]
        if self.method in ("apts", "sapts"):
            a += ["--subdomains", str(self.subdomains)]
            if devices is not None:
                a += ["--devices", str(devices)]
            if self.order != "default":  # the default: no preset, model or nu flag
                a += ["--preset", "paper",
                      "--second-order" if self.order == "sr1" else "--first-order",
                      "--local-steps", str(proto.local_steps)]
        if self.method in ("apts", "lbfgs"):
            a += ["--iterations-per-epoch", str(proto.full_batch_iterations)]
        if self.method in ("sapts", "adam", "sgd"):
            a += ["--batch-size", str(self.batch_size)]
        if self.method in ("adam", "sgd"):
            a += ["--lr", repr(self.lr)]
        return a + list(self.extra)


#: Training-set sizes of the protocol's data sets (before ``--subset``).
TRAIN_SIZES = {"fashion_mnist": 60_000, "mnist": 60_000, "cifar10": 50_000}


def num_train(dataset: str, proto: Protocol) -> int:
    """The training samples a run of ``proto`` on ``dataset`` uses."""
    n = TRAIN_SIZES[dataset]
    return min(n, proto.subset) if proto.subset else n


def plan(proto: Protocol, datasets: Sequence[str]) -> list[RunSpec]:
    """All runs of the protocol for ``datasets``, cheapest families first within a dataset."""
    from apts_jax.apts_transform import default_minibatch  # imports JAX, not its backend

    runs: list[RunSpec] = []
    for ds in datasets:
        for seed in proto.seeds:
            if "lbfgs" in proto.methods:
                runs.append(RunSpec(ds, "lbfgs", seed))
        for method in ("apts", "sapts"):
            if method not in proto.methods:
                continue
            for order in proto.orders:
                if order == "default" and method != "sapts":
                    continue
                for n in proto.subdomains:
                    batch = None
                    if method == "sapts":
                        batch = (default_minibatch(num_train(ds, proto), n) if order == "default"
                                 else proto.sapts_batch)
                    for seed in proto.seeds:
                        runs.append(RunSpec(ds, method, seed, subdomains=n, order=order,
                                            batch_size=batch))
        for method in ("adam", "sgd"):
            if method not in proto.methods:
                continue
            for b in proto.batch_sizes:
                for lr in proto.lrs:
                    for seed in proto.seeds:
                        runs.append(RunSpec(ds, method, seed, batch_size=b, lr=lr))
    return runs


# ----------------------------------------------------------------------------------------------
# Compilation time (jax.monitoring time spans)
# ----------------------------------------------------------------------------------------------


class CompileClock:
    """Union of JAX trace/lower/compile time spans; ``seconds_between(t0, t1)`` clips to a window."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
              "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self._lock = threading.Lock()
        import jax

        jax.monitoring.register_event_time_span_listener(self._on_span)

    def _on_span(self, event: str, start: float, end: float, **_: Any) -> None:
        if event in self.EVENTS:
            with self._lock:
                self.spans.append((start, end))

    def seconds_between(self, t0: float, t1: float) -> float:
        """Length of the union of spans clipped to ``[t0, t1]`` (``time.time()`` clock)."""
        with self._lock:
            clipped = sorted((max(s, t0), min(e, t1)) for s, e in self.spans if e > t0 and s < t1)
        total, cur_s, cur_e = 0.0, None, None
        for s, e in clipped:
            if cur_e is None or s > cur_e:
                if cur_e is not None:
                    total += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        if cur_e is not None:
            total += cur_e - cur_s
        return total


_CLOCK: CompileClock | None = None


def compile_clock() -> CompileClock:
    global _CLOCK
    if _CLOCK is None:
        _CLOCK = CompileClock()
    return _CLOCK


@contextlib.contextmanager
def epoch_compile_log(path: Path) -> Iterator[dict[int, float]]:
    """Record the compilation seconds inside each epoch's iteration loop of the app's next run.

    Wraps :func:`apts_jax.app.train.build_method` for the duration of the block, so that the
    method's ``run_epoch`` is timed; the per-epoch values are persisted to ``path`` (JSON) after
    every epoch, so an interrupted and resumed run keeps the earlier epochs' values.
    """
    from apts_jax.app import train as train_lib

    clock = compile_clock()
    log: dict[int, float] = {}
    if path.is_file():
        with contextlib.suppress(OSError, ValueError):
            log = {int(k): float(v) for k, v in json.loads(path.read_text()).items()}
    original = train_lib.build_method

    def build(cfg: Any, problem: Any) -> Any:
        method = original(cfg, problem)
        inner = method.run_epoch

        def run_epoch(state: Any, epoch: int, grad_evals: int, callback: Callable) -> Any:
            import jax

            t0 = time.time()
            state = inner(state, epoch, grad_evals, callback)
            jax.block_until_ready(state)
            log[epoch] = clock.seconds_between(t0, time.time())
            from apts_jax.app.metrics import atomic_write_text

            atomic_write_text(path, json.dumps({str(k): v for k, v in sorted(log.items())}))
            return state

        method.run_epoch = run_epoch
        return method

    train_lib.build_method = build
    try:
        yield log
    finally:
        train_lib.build_method = original


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
        "device_kind": jax.devices()[0].device_kind,
    }
    with contextlib.suppress(OSError):
        info["loadavg"] = list(os.getloadavg())
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    return info


def devices_for(n: int | None, max_devices: int | None) -> int | None:
    """Devices of a run with ``n`` subdomains: the largest divisor of ``n`` that is available."""
    if n is None:
        return None
    import jax

    cap = jax.device_count() if max_devices is None else min(max_devices, jax.device_count())
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _run_app(argv: list[str], log_file: Path | None, verbose: bool) -> Any:
    from apts_jax.app import train as train_lib
    from apts_jax.app.cli import parse_train_args

    cfg = parse_train_args(argv)
    if verbose or log_file is None:
        return train_lib.run(cfg)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f):
        return train_lib.run(cfg)


def execute(spec: RunSpec, proto: Protocol, out_root: Path, *, max_devices: int | None,
            verbose: bool, command: str) -> dict[str, Any]:
    """Run ``spec`` (resuming its work folder if any), write and return its JSON document."""
    from apts_jax.app.cli import UsageError
    from apts_jax.app.metrics import atomic_write_text

    work = out_root / spec.dataset / ".work" / spec.name
    devices = devices_for(spec.subdomains, max_devices)
    argv = spec.argv(proto, work, devices)
    t0 = time.perf_counter()
    try:
        with epoch_compile_log(work / "compile_log.json") as clog:
            result = _run_app(argv, work / "log.txt", verbose)
    except UsageError as err:
        if "--resume" not in str(err):
            raise
        print(f"  {spec.key}: stale work folder ({err}); starting afresh", flush=True)
        shutil.rmtree(work, ignore_errors=True)
        with epoch_compile_log(work / "compile_log.json") as clog:
            result = _run_app(argv, work / "log.txt", verbose)
    elapsed = time.perf_counter() - t0

    config = json.loads((work / "config.json").read_text())
    history = []
    compile_total = 0.0
    for row in result.history:
        row = dict(row)
        c = float(clog.get(int(row["epoch"]), 0.0)) if row["epoch"] > 0 else 0.0
        compile_total += c
        row["compile_s"] = c
        row["train_time_excl_compile_s"] = max(0.0, float(row["train_time_s"]) - compile_total)
        history.append(row)
    final = history[-1]
    doc = {
        "schema_version": SCHEMA_VERSION,
        "name": spec.name,
        "group": spec.group,
        "dataset": spec.dataset,
        "method": spec.method,
        "params": spec.params(),
        "protocol": proto.to_json(),
        "argv": argv,
        "devices": devices,
        "config": config,
        "history": history,
        "final": {k: final.get(k) for k in (
            "epoch", "iterations", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
            "grad_evals", "data_passes", "radius", "wall_time_s", "train_time_s", "compile_s",
            "train_time_excl_compile_s")} | {"compile_s": compile_total},
        "session_elapsed_s": elapsed,
        "timing_note": "train_time_s: app's time inside optimizer iterations (cumulative; first "
                       "epoch includes compilation); compile_s: JAX trace+lower+compile spans "
                       "inside the iteration loops; train_time_excl_compile_s = train_time_s - "
                       "cumulative compile_s; wall_time_s: app clock incl. evaluation",
        "machine": machine_info(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": command,
    }
    path = out_root / spec.dataset / f"{spec.name}.json"
    atomic_write_text(path, json.dumps(doc, indent=1, allow_nan=False) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(OSError):
        (out_root / spec.dataset / ".work").rmdir()
    return doc


def available_datasets(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(found, messages)``: datasets whose files are present offline."""
    from apts_jax.data import find_dataset

    found, msgs = [], []
    for ds in names:
        try:
            where = find_dataset(ds)
        except Exception as err:  # pragma: no cover - malformed folders
            where, why = None, str(err)
        else:
            why = "files not found offline"
        if where is None:
            msgs.append(f"skipping {ds}: {why} (see apts_jax.data.load_dataset for the folders "
                        "searched; scripts/install_dataset.sh installs Fashion-MNIST)")
        else:
            found.append(ds)
    return found, msgs


# ----------------------------------------------------------------------------------------------
# Dry run: plan + probe-based estimate
# ----------------------------------------------------------------------------------------------


def _probe_class(spec: RunSpec) -> tuple:
    return (spec.dataset, spec.method, spec.subdomains, spec.order, spec.batch_size)


def _iterations_per_epoch(spec: RunSpec, proto: Protocol, n_train: int) -> int:
    from apts_jax.app.cli import DEFAULTS
    from apts_jax.data import OverlapSampler

    if spec.method in ("apts", "lbfgs"):
        return proto.full_batch_iterations
    if spec.method == "sapts":
        return OverlapSampler(n_train, spec.batch_size, spec.subdomains,
                              overlap=DEFAULTS["overlap"],
                              subdomain_overlap=DEFAULTS["subdomain_overlap"],
                              seed=0).batches_per_epoch
    return n_train // spec.batch_size  # the app's adam/sgd epoch (remainder dropped)


def probe(specs: Sequence[RunSpec], proto: Protocol, *, max_devices: int | None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time one short run per distinct (dataset, method, N, order, batch) and extrapolate.

    Each probe runs the app for 1 epoch of ``k`` iterations (``k`` = 1 for full-batch methods, 3
    for batch 10,000, 20 for small batches) and measures: compilation inside the loop, seconds
    per iteration without it, the per-epoch evaluation + checkpoint time, and the setup time
    (data loading, model, init, first evaluation). A run's estimate is ``setup + compile +
    epochs * (iterations_per_epoch * t_iter + t_epoch_overhead)``. Iteration costs of the
    trust-region methods vary (rejected steps, early local stops), so this is a rough estimate.
    """
    from apts_jax.app.cli import UsageError

    classes: dict[tuple, RunSpec] = {}
    for s in specs:
        classes.setdefault(_probe_class(s), s)
    results: dict[tuple, dict[str, Any]] = {}
    n_train_cache: dict[str, int] = {}
    for key, spec in classes.items():
        if spec.dataset not in n_train_cache:
            from apts_jax.data import load_dataset

            ds = load_dataset(spec.dataset, download=False, subset=proto.subset)
            n_train_cache[spec.dataset] = int(ds.train_x.shape[0])
        n_train = n_train_cache[spec.dataset]
        ipe = _iterations_per_epoch(spec, proto, n_train)
        k = min(ipe, 1 if spec.method in ("apts", "lbfgs") else (3 if spec.batch_size >= 5000
                                                                 else 20))
        with tempfile.TemporaryDirectory(prefix="paper-probe-") as tmp:
            p = replace(proto, epochs=1, full_batch_iterations=k)
            extra = ("--iterations-per-epoch", str(k)) if spec.method not in ("apts", "lbfgs") \
                else ()
            s = replace(spec, extra=extra)
            argv = s.argv(p, Path(tmp) / "run", devices_for(spec.subdomains, max_devices))
            t0 = time.perf_counter()
            try:
                with epoch_compile_log(Path(tmp) / "compile.json") as clog:
                    res = _run_app(argv, Path(tmp) / "log.txt", False)
            except UsageError as err:
                log(f"  probe {spec.group}: failed ({err})")
                continue
            total = time.perf_counter() - t0
        h0, h1 = res.history[0], res.history[1]
        comp = float(clog.get(1, 0.0))
        t_iter = max(0.0, (float(h1["train_time_s"]) - comp) / k)
        # Trust-region methods: evaluations per iteration vary (early local phases often stop
        # after one step at the cap); the upper estimate assumes every iteration does the most
        # evaluations: local_steps + 2 (+1 for SAPTS's fresh evaluation).
        t_upper = t_iter
        evals_per_it = None
        if spec.method in ("apts", "sapts"):
            evals_per_it = max(1.0, (int(h1["grad_evals"]) - 1) / k)
            worst = proto.local_steps + 2 + (spec.method == "sapts")
            t_upper = t_iter * max(1.0, worst / evals_per_it)
        overhead = max(0.0, float(h1["wall_time_s"]) - float(h0["wall_time_s"])
                       - float(h1["train_time_s"]))
        setup = max(0.0, total - float(h1["wall_time_s"]))
        results[key] = {"group": spec.group, "probe_iterations": k, "iterations_per_epoch": ipe,
                        "compile_s": comp, "s_per_iteration": t_iter,
                        "s_per_iteration_upper": t_upper, "evaluations_per_iteration": evals_per_it,
                        "epoch_overhead_s": overhead, "setup_s": setup + float(h0["wall_time_s"]),
                        "probe_total_s": total}
        log(f"  probe {spec.dataset}/{spec.group:<28} {ipe:5d} it/epoch  "
            f"{t_iter * 1e3:9.1f} ms/it  compile {comp:5.1f} s  eval/epoch {overhead:5.2f} s")
    per_run = []
    total_s = upper_s = 0.0
    by_method: dict[str, float] = defaultdict(float)
    for s in specs:
        r = results.get(_probe_class(s))
        if r is None:
            continue
        fixed = r["setup_s"] + r["compile_s"] + proto.epochs * r["epoch_overhead_s"]
        est = fixed + proto.epochs * r["iterations_per_epoch"] * r["s_per_iteration"]
        up = fixed + proto.epochs * r["iterations_per_epoch"] * r["s_per_iteration_upper"]
        per_run.append({"run": s.key, "estimate_s": est, "upper_estimate_s": up})
        total_s += est
        upper_s += up
        by_method[s.method] += est
    return {"classes": list(results.values()), "per_run": per_run, "total_s": total_s,
            "upper_total_s": upper_s, "by_method_s": dict(by_method)}


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


def _mean_std(xs: Sequence[float]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def time_to_target(run: dict[str, Any], target: float) -> float | None:
    """Training time (compilation excluded) at the first epoch whose test accuracy >= target."""
    for row in run["history"]:
        acc = row.get("test_accuracy")
        if acc is not None and acc >= target:
            return float(row["train_time_excl_compile_s"])
    return None


def summarize_dataset(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Group statistics, Adam LR selection, target accuracy and time ratios for one dataset."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[r["group"]].append(r)
    table: dict[str, dict[str, Any]] = {}
    for g, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["params"]["seed"])
        acc_m, acc_s = _mean_std([r["final"]["test_accuracy"] for r in rs])
        loss_m, loss_s = _mean_std([r["final"]["train_loss"] for r in rs])
        t_m, t_s = _mean_std([r["final"]["train_time_excl_compile_s"] for r in rs])
        table[g] = {
            "method": rs[0]["method"], "params": {k: v for k, v in rs[0]["params"].items()
                                                  if k != "seed"},
            "seeds": [r["params"]["seed"] for r in rs], "epochs": rs[0]["final"]["epoch"],
            "final_test_accuracy_mean": acc_m, "final_test_accuracy_std": acc_s,
            "final_train_loss_mean": loss_m, "final_train_loss_std": loss_s,
            "train_time_s_mean": t_m, "train_time_s_std": t_s,
            "compile_s_mean": _mean_std([r["final"]["compile_s"] for r in rs])[0],
            "data_passes_mean": _mean_std([r["final"]["data_passes"] for r in rs])[0],
        }
        passes = table[g]["data_passes_mean"]
        table[g]["train_time_per_data_pass_s"] = t_m / passes if t_m is not None and passes else None

    def lr_table(method: str) -> dict[str, Any]:
        per_b: dict[str, Any] = {}
        sizes = sorted({v["params"]["batch_size"] for v in table.values()
                        if v["method"] == method})
        total = 0.0
        total_all = 0.0
        for b in sizes:
            entries = [(g, v) for g, v in table.items() if v["method"] == method
                       and v["params"]["batch_size"] == b and v["final_test_accuracy_mean"]
                       is not None]
            if not entries:
                continue
            ranked = sorted(entries, key=lambda e: e[1]["final_test_accuracy_mean"])
            best, med = ranked[-1], ranked[(len(ranked) - 1) // 2]
            grid_t = sum(v["train_time_s_mean"] or 0.0 for _, v in entries)
            grid_all = sum(r["final"]["train_time_excl_compile_s"] for g, _ in entries
                           for r in groups[g])
            total += grid_t
            total_all += grid_all
            per_b[str(b)] = {
                "best": {"group": best[0], "lr": best[1]["params"]["lr"],
                         "accuracy": best[1]["final_test_accuracy_mean"]},
                "median": {"group": med[0], "lr": med[1]["params"]["lr"],
                           "accuracy": med[1]["final_test_accuracy_mean"]},
                "num_lrs": len(entries),
                "grid_train_time_s": grid_t,
                "grid_train_time_all_seeds_s": grid_all,
                "accuracy_by_lr": {f"{v['params']['lr']:.3g}": v["final_test_accuracy_mean"]
                                   for _, v in sorted(entries, key=lambda e: e[1]["params"]["lr"])},
            }
        return {"per_batch_size": per_b, "grid_train_time_s": total,
                "grid_train_time_all_seeds_s": total_all}

    adam, sgd = lr_table("adam"), lr_table("sgd")
    best_adam = None
    for b, info in adam["per_batch_size"].items():
        if best_adam is None or info["best"]["accuracy"] > best_adam["accuracy"]:
            best_adam = dict(info["best"], batch_size=int(b))
    target = None if best_adam is None else best_adam["accuracy"] - TARGET_GAP
    grid_total = adam["grid_train_time_s"] or None
    for g, v in table.items():
        if target is None:
            v.update(time_to_target_s_mean=None, reached=None, ratio_to_adam_grid=None)
            continue
        v["time_to_target_s"], v["reached"], v["time_to_target_s_mean"] = _hit_times(groups[g],
                                                                                     target)
        v["ratio_to_adam_grid"] = (v["time_to_target_s_mean"] / grid_total
                                   if v["time_to_target_s_mean"] is not None and grid_total
                                   else None)
    by_batch = {b: _against_adam_batch(b, info, table, groups)
                for b, info in adam["per_batch_size"].items()}
    elapsed = [r["session_elapsed_s"] for r in runs if r.get("session_elapsed_s") is not None]
    dates = sorted(r["date"] for r in runs if r.get("date"))
    return {"groups": table, "adam": adam, "sgd": sgd, "best_adam": best_adam,
            "target_accuracy": target, "adam_grid_train_time_s": grid_total,
            "against_adam_batch": by_batch, "num_runs": len(runs),
            "compute_s": sum(elapsed) if elapsed else None,
            "first_run_date": dates[0] if dates else None,
            "last_run_date": dates[-1] if dates else None}


def _hit_times(rs: Sequence[dict[str, Any]],
               target: float) -> tuple[list[float | None], str, float | None]:
    """(time to target per run, "k/n reached", mean time over the runs that reached it)."""
    times = [time_to_target(r, target) for r in rs]
    hit = [t for t in times if t is not None]
    return times, f"{len(hit)}/{len(times)}", (statistics.fmean(hit) if hit else None)


def _against_adam_batch(batch: str, info: dict[str, Any], table: dict[str, Any],
                        groups: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """APTS/SAPTS/L-BFGS against the Adam grid of one batch size only.

    The paper compares with Adam at the batch APTS uses (the full set or 10,000); the headline
    target above takes the best Adam over all batch sizes. Two targets per batch size: ``best`` =
    that batch size's best Adam − 0.3 pp, and ``median`` = the accuracy of its median learning rate
    (what an untuned pick from the grid gives). Ratio = time to the target / that batch size's grid
    time (one sweep over the learning rates, mean over seeds per configuration).
    """
    grid = info["grid_train_time_s"] or None
    targets: dict[str, Any] = {}
    for level, gap in (("best", TARGET_GAP), ("median", 0.0)):
        target = info[level]["accuracy"] - gap
        rows: dict[str, Any] = {}
        for g, v in table.items():
            if v["method"] in ("adam", "sgd"):
                continue
            _, reached, t = _hit_times(groups[g], target)
            rows[g] = {"reached": reached, "time_to_target_s_mean": t,
                       "ratio_to_adam_grid": t / grid if t is not None and grid else None}
        targets[level] = {"adam_group": info[level]["group"], "target_accuracy": target,
                          "adam_time_to_target_s": _hit_times(groups[info[level]["group"]],
                                                              target)[2],
                          "groups": rows}
    return {"batch_size": int(batch), "grid_train_time_s": grid, "targets": targets}


def _fmt(v: Any, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# Paper protocol: summary ({summary['mode']} mode)", "",
             f"Generated {summary['date']} by `{summary['command']}`; machine: "
             f"{summary['machine'].get('cpu_model', '?')}, {summary['machine']['cores']} cores, "
             f"JAX {summary['machine']['jax']} ({summary['machine']['backend']}).", "",
             "Times are training time with compilation excluded (evaluation excluded), mean over "
             "seeds. Target = best Adam configuration's mean final test accuracy − 0.3 pp. Ratio = "
             "(time to target) / (Adam grid total: one sweep over batch sizes × learning rates, "
             "mean-over-seeds time per configuration).", ""]
    for ds, s in summary["datasets"].items():
        lines += [f"## {ds}", ""]
        if s.get("skipped"):
            lines += [f"Skipped: {s['skipped']}", ""]
            continue
        if s.get("compute_s") is not None:
            lines += [f"{s['num_runs']} of {s.get('planned_runs', '?')} planned runs finished; "
                      f"compute {s['compute_s'] / 3600:.2f} h (sum of the runs' elapsed times, "
                      f"evaluation and compilation included), runs started "
                      f"{s['first_run_date']} … {s['last_run_date']}.", ""]
        ba = s.get("best_adam")
        if ba:
            lines += [f"Best Adam: batch {ba['batch_size']}, lr {ba['lr']:.3g}, "
                      f"{ba['accuracy']:.2%}; target accuracy {s['target_accuracy']:.2%}; "
                      f"Adam grid total {s['adam_grid_train_time_s']:.1f} s.", ""]
        lines += ["| group | seeds | final test acc | final train loss | data passes | "
                  "train time s | s / data pass | time to target s | reached | ratio to Adam grid |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        order = {"apts": 0, "sapts": 1, "lbfgs": 2, "adam": 3, "sgd": 4}
        shown = set()
        for opt in ("adam", "sgd"):
            for info in s[opt]["per_batch_size"].values():
                shown.update({info["best"]["group"], info["median"]["group"]})
        for g, v in sorted(s["groups"].items(), key=lambda e: (order.get(e[1]["method"], 9),
                                                               e[0])):
            if v["method"] in ("adam", "sgd") and g not in shown:
                continue
            acc = (f"{100 * v['final_test_accuracy_mean']:.2f} ± "
                   f"{100 * v['final_test_accuracy_std']:.2f} %"
                   if v["final_test_accuracy_mean"] is not None else "-")
            tag = ""
            if v["method"] in ("adam", "sgd"):
                for which in ("best", "median"):
                    info = s[v["method"]]["per_batch_size"].get(str(v["params"]["batch_size"]))
                    if info and info[which]["group"] == g:
                        tag += f" ({which})"
            lines.append(
                f"| {g}{tag} | {len(v['seeds'])} | {acc} | "
                f"{_fmt(v['final_train_loss_mean'], '.4f')} | {_fmt(v['data_passes_mean'], '.1f')}"
                f" | {_fmt(v['train_time_s_mean'], '.1f')} | "
                f"{_fmt(v.get('train_time_per_data_pass_s'), '.3f')} | "
                f"{_fmt(v.get('time_to_target_s_mean'), '.1f')} | {v.get('reached') or '-'} | "
                f"{_fmt(v.get('ratio_to_adam_grid'), '.3f')} |")
        lines.append("")
        lines += _against_adam_batch_markdown(s)
        for opt in ("adam", "sgd"):
            for b, info in s[opt]["per_batch_size"].items():
                accs = ", ".join(f"{lr}: {_fmt(a, '.2%')}" for lr, a in
                                 info["accuracy_by_lr"].items())
                lines.append(f"- {opt} batch {b}: best lr {info['best']['lr']:.3g} "
                             f"({info['best']['accuracy']:.2%}), median lr "
                             f"{info['median']['lr']:.3g} ({info['median']['accuracy']:.2%}); "
                             f"grid time {info['grid_train_time_s']:.1f} s "
                             f"({info['grid_train_time_all_seeds_s']:.1f} s all seeds). "
                             f"Accuracy by lr: {accs}")
        lines.append("")
    return "\n".join(lines)


def _against_adam_batch_markdown(s: dict[str, Any]) -> list[str]:
    by_b = s.get("against_adam_batch") or {}
    if not by_b:
        return []
    cols = [(b, level) for b in by_b for level in ("best", "median")]
    lines = ["Against the Adam grid of one batch size (target `best` = that batch size's best Adam − "
             "0.3 pp, `median` = the accuracy of its median learning rate; cells: runs that reached "
             "it, mean time to it, ratio to that batch size's grid time):", ""]
    head = "| group |" + "".join(
        f" batch {b} {level} ({by_b[b]['targets'][level]['target_accuracy']:.2%}; grid "
        f"{_fmt(by_b[b]['grid_train_time_s'], '.1f')} s) |" for b, level in cols)
    lines += [head, "| --- |" + " ---: |" * len(cols)]

    def cell(v: dict[str, Any]) -> str:
        if v["time_to_target_s_mean"] is None:
            return f" {v['reached']} |"
        return (f" {v['reached']}, {v['time_to_target_s_mean']:.1f} s, "
                f"{_fmt(v['ratio_to_adam_grid'], '.3f')} |")

    for g in next(iter(by_b.values()))["targets"]["best"]["groups"]:
        lines.append(f"| {g} |" + "".join(cell(by_b[b]["targets"][lv]["groups"][g])
                                         for b, lv in cols))
    lines.append("| that Adam configuration itself |" + "".join(
        f" {_fmt(by_b[b]['targets'][lv]['adam_time_to_target_s'], '.1f')} s |" for b, lv in cols))
    return [*lines, ""]


def write_summary(out_root: Path, specs: Sequence[RunSpec], proto: Protocol, mode: str,
                  skipped: dict[str, str], command: str, plots: bool = True) -> dict[str, Any]:
    """Summarise the finished runs among ``specs``; write summary.json/.md and the plots."""
    from apts_jax.app.metrics import atomic_write_text

    by_ds: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in specs:
        path = out_root / s.dataset / f"{s.name}.json"
        if path.is_file():
            by_ds[s.dataset].append(json.loads(path.read_text()))
    datasets: dict[str, Any] = {ds: {"skipped": why} for ds, why in skipped.items()}
    for ds, runs in by_ds.items():
        datasets[ds] = summarize_dataset(runs)
        datasets[ds]["planned_runs"] = sum(1 for s in specs if s.dataset == ds)
    summary = {
        "schema_version": SCHEMA_VERSION, "mode": mode, "protocol": proto.to_json(),
        "target_gap": TARGET_GAP, "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": command, "machine": machine_info(), "datasets": datasets,
    }
    atomic_write_text(out_root / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out_root / "summary.md", markdown(summary) + "\n")
    if plots:
        sys.path.insert(0, str(HERE))
        import plot_paper

        note = " (quick mode)" if mode == "quick" else ""
        for ds, runs in by_ds.items():
            plot_paper.plot_dataset(ds, runs, datasets[ds], out_root, title_note=note)
            plot_paper.plot_lr_sensitivity(ds, datasets[ds], out_root, title_note=note)
    return summary


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="2,000-sample subset, 3 epochs, 1 seed, lr in {1e-3, 1e-2}, batches "
                        "500/128 (SAPTS 500); default --out benchmarks/results/paper-quick")
    p.add_argument("--out", type=Path, default=None, help="results folder")
    p.add_argument("--only", default=None, metavar="REGEX",
                   help="only runs whose '<dataset>/<name>' matches (re.search)")
    p.add_argument("--epochs", type=int, default=None, help="epoch budget (every method)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--datasets", nargs="+", default=None,
                   choices=["fashion_mnist", "mnist", "cifar10"])
    p.add_argument("--max-runs", type=int, default=None, metavar="K",
                   help="run at most K not-yet-finished runs in this invocation")
    p.add_argument("--max-devices", type=int, default=None,
                   help="cap the devices of an APTS run (default: N devices)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the planned runs and estimate the compute from a timing probe")
    p.add_argument("--no-probe", action="store_true", help="--dry-run without the timing probe")
    p.add_argument("--summary-only", action="store_true",
                   help="rebuild summary.json/.md and the plots from the existing JSONs")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--verbose", action="store_true", help="show the app's output")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    proto = QUICK if args.quick else FULL
    mode = "quick" if args.quick else "full"
    if args.epochs is not None:
        proto = replace(proto, epochs=args.epochs)
    if args.seeds is not None:
        proto = replace(proto, seeds=tuple(args.seeds))
    if args.datasets is not None:
        proto = replace(proto, datasets=tuple(args.datasets))
    out_root = (args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)).resolve()
    command = " ".join(["python", *([sys.argv[0]] if argv is None else ["benchmarks/paper.py"]),
                        *(sys.argv[1:] if argv is None else argv)])

    # Simulated CPU devices must be configured before JAX starts its backends.
    import jax

    max_n = max(proto.subdomains)
    if args.max_devices is not None:
        max_n = min(max_n, args.max_devices)
    with contextlib.suppress(RuntimeError):
        jax.config.update("jax_num_cpu_devices", max_n)
    compile_clock()

    found, msgs = available_datasets(proto.datasets)
    for m in msgs:
        print(m, flush=True)
    skipped = {ds: m for ds, m in zip(
        [d for d in proto.datasets if d not in found], msgs, strict=True)}
    specs = plan(proto, found)
    if args.only:
        rx = re.compile(args.only)
        specs = [s for s in specs if rx.search(s.key)]
    done = [s for s in specs if (out_root / s.dataset / f"{s.name}.json").is_file()]
    for s in done:  # a finished run's work folder left by an interruption after its JSON
        if not args.dry_run and (out_root / s.dataset / ".work" / s.name).is_dir():
            shutil.rmtree(out_root / s.dataset / ".work" / s.name, ignore_errors=True)
    todo = [s for s in specs if s not in done]
    print(f"paper protocol ({mode}): {len(specs)} planned run(s) in {out_root}: {len(done)} "
          f"finished (skipped), {len(todo)} to run; epochs {proto.epochs}, seeds "
          f"{list(proto.seeds)}, devices {jax.device_count()} ({jax.default_backend()})",
          flush=True)

    if args.dry_run:
        for s in specs:
            partial = (out_root / s.dataset / ".work" / s.name).is_dir()
            state = "done" if s in done else ("partial" if partial else "todo")
            print(f"  [{state:7}] {s.key}")
        if todo and not args.no_probe:
            print("timing probe (1 short run per distinct configuration):", flush=True)
            est = probe(todo, proto, max_devices=args.max_devices)
            h = est["total_s"] / 3600
            print(f"estimated compute for the {len(todo)} remaining run(s): {est['total_s']:.0f} s "
                  f"= {h:.1f} h on this machine (upper estimate with the most evaluations per "
                  f"APTS/SAPTS iteration: {est['upper_total_s'] / 3600:.1f} h); by method: "
                  + ", ".join(f"{k} {v / 3600:.2f} h" for k, v in est["by_method_s"].items()))
            from apts_jax.app.metrics import atomic_write_text

            atomic_write_text(out_root / "dry_run_estimate.json", json.dumps(
                {"date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                 "mode": mode, "protocol": proto.to_json(), "machine": machine_info(),
                 "todo": len(todo), **est}, indent=1) + "\n")
        return 0

    # One invocation at a time per results folder (two would train the same runs).
    import fcntl
    import hashlib

    out_root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(str(out_root).encode()).hexdigest()[:16]
    lock = open(Path(tempfile.gettempdir()) / f"apts-paper-{key}.lock", "w")  # noqa: SIM115
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print(f"error: another paper.py invocation is running on {out_root}", file=sys.stderr)
        return 1

    if not args.summary_only:
        budget = len(todo) if args.max_runs is None else min(args.max_runs, len(todo))
        t_all = time.perf_counter()
        for i, s in enumerate(todo[:budget]):
            print(f"[{i + 1}/{budget}] {s.key} ...", flush=True)
            try:
                doc = execute(s, proto, out_root, max_devices=args.max_devices,
                              verbose=args.verbose, command=command)
            except KeyboardInterrupt:
                print(f"\ninterrupted during {s.key}; run again to resume it from its last "
                      "epoch checkpoint", flush=True)
                return 130
            f = doc["final"]
            print(f"    test acc {f['test_accuracy']:.2%}  train loss {f['train_loss']:.4f}  "
                  f"train time {f['train_time_excl_compile_s']:.1f} s (+ compile "
                  f"{f['compile_s']:.1f} s)  elapsed {doc['session_elapsed_s']:.1f} s",
                  flush=True)
        print(f"ran {budget} run(s) in {time.perf_counter() - t_all:.1f} s; "
              f"{len(todo) - budget} left", flush=True)
    summary = write_summary(out_root, specs, proto, mode, skipped, command,
                            plots=not args.no_plots)
    for ds, s in summary["datasets"].items():
        if s.get("skipped"):
            continue
        print(f"{ds}: {s['num_runs']} finished run(s); target accuracy "
              f"{_fmt(s['target_accuracy'], '.2%')}")
    print(f"wrote {out_root / 'summary.json'} and summary.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
