"""The ``apts-jax`` command line: ``apts-jax train [options]``.

Also reachable as ``python -m apts_jax train [options]``; ``python -m apts_jax`` with no arguments
(or with options but no sub-command) runs ``train`` with those options. ``--help`` on either level
lists everything.

Arguments are parsed and checked here **before** JAX is configured: ``--devices D`` must set
``jax_num_cpu_devices`` before JAX starts its backends, so this module does not import JAX at
import time (the training loops in :mod:`apts_jax.app.train` do). Bad flags exit with status 2 and
an argparse-style one-line error (no traceback); a data set that cannot be found exits with
status 1 and the loader's explanation.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import math
import sys
from collections.abc import Sequence

from apts_jax.app.config import (
    APTS_OPTION_FLAGS,
    DATASET_CHOICES,
    DEFAULT_JOB_DOC,
    DEFAULTS,
    FULL_BATCH,
    MODEL_CHOICES,
    OPTIMIZER_CHOICES,
    PRESET_CHOICES,
    RESUME_MAY_CHANGE,
    SUBDOMAIN_METHODS,
    TrainConfig,
    UsageError,
)

# The configuration lives in apts_jax.app.config; its names stay importable from here.
__all__ = [
    "DATASET_CHOICES",
    "DEFAULTS",
    "MODEL_CHOICES",
    "OPTIMIZER_CHOICES",
    "RESUME_MAY_CHANGE",
    "TrainConfig",
    "UsageError",
    "build_parser",
    "configure_devices",
    "main",
    "parse_train_args",
]


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and 0.0 <= v < 1.0):
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", choices=DATASET_CHOICES, default=d["dataset"],
                   help="training data (default %(default)s; found offline in the system "
                        "datasets folder, --data-dir, $APTS_JAX_DATA_DIR or the user cache)")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder holding the data set files (searched first)")
    g.add_argument("--model", choices=MODEL_CHOICES, default=d["model"],
                   help="network (default %(default)s: 784-512-256-10 for MNIST-like data, "
                        "3072-512-512-10 for CIFAR-10; cnn: a small CNN)")
    g.add_argument("--hidden", type=_positive_int, nargs="+", default=None, metavar="W",
                   help="hidden layer widths of a custom ReLU MLP instead of the paper's network "
                        "(--model mlp only), e.g. --hidden 128 64")
    g.add_argument("--subset", type=_positive_int, default=None, metavar="K",
                   help="use only the first K training (and K test) samples, for quick runs")

    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=OPTIMIZER_CHOICES, default=d["optimizer"],
                   help="apts: full-batch APTS; sapts: minibatch APTS; tr: L-SR1 trust region "
                        "(full batch, or minibatches with --batch-size); adam, sgd: optax "
                        "baselines (--lr); lbfgs: optax L-BFGS with zoom line search, full batch "
                        "(default %(default)s)")
    g.add_argument("--subdomains", type=_positive_int, default=None, metavar="N",
                   help="APTS subdomains, a multiple of the device count (default: 4, or the "
                        "next multiple of the device count)")
    g.add_argument("--devices", type=_positive_int, default=None, metavar="D",
                   help="use the first D devices; on CPU, D devices are simulated if JAX has "
                        "not started yet (default: every local device)")
    g.add_argument("--local-steps", type=_positive_int, default=d["local_steps"], metavar="K",
                   help="apts/sapts: local trust-region steps per subdomain and outer iteration "
                        "(default: the preset's, 10 for tuning_free, 5 for paper)")
    order = g.add_mutually_exclusive_group()
    order.add_argument("--second-order", dest="second_order", action="store_true", default=None,
                       help="L-SR1 quadratic model, OBS subproblem solver (default of tr and of "
                            "apts/sapts --preset paper)")
    order.add_argument("--first-order", dest="second_order", action="store_false",
                       help="first-order trust-region model (steepest descent to the boundary; "
                            "default of apts/sapts)")
    g.add_argument("--memory", type=_positive_int, default=d["memory"], metavar="M",
                   help="L-SR1 memory size (L-BFGS memory for lbfgs; default %(default)s)")
    g.add_argument("--preset", choices=PRESET_CHOICES, default=None,
                   help="apts/sapts: 'tuning_free' (default: first-order model, adaptive local "
                        "boundary, mean combination, adaptive norm; sapts minibatch max(256, "
                        "10000/16)) or 'paper', the paper's Algorithm 1 exactly (L-SR1, sapts "
                        "minibatch 10000); the options below change single choices of it")
    g.add_argument("--local-boundary", choices=APTS_OPTION_FLAGS["local_boundary"], default=None,
                   help="apts/sapts: 'ball' caps the local radius at Delta/N (paper); 'adaptive' "
                        "lets it adapt up to max_radius/N (the authors' code)")
    g.add_argument("--combine", choices=APTS_OPTION_FLAGS["combine"], default=None,
                   help="apts/sapts: 'sum' of the local steps with local radius Delta/N (paper) "
                        "or their 'mean' with local radius Delta")
    g.add_argument("--acceptance", choices=APTS_OPTION_FLAGS["acceptance"], default=None,
                   help="apts/sapts: 'monotone' ratio test (paper) or 'nonmonotone' against the "
                        "maximum of the last --nonmonotone-window accepted values")
    g.add_argument("--nonmonotone-window", type=_positive_int, default=None, metavar="W",
                   help="window of --acceptance nonmonotone (default 5)")
    g.add_argument("--norm", choices=APTS_OPTION_FLAGS["norm"], default=None,
                   help="apts/sapts: trust-region norm, 'l2' (paper) or the ellipsoidal "
                        "'adaptive' norm scaled by Adam's second moment")
    g.add_argument("--global-step", choices=APTS_OPTION_FLAGS["global_step"], default=None,
                   help="apts/sapts: 'tr' runs the paper's global trust-region step after the "
                        "APTS step (step 5; default), 'none' skips it")
    g.add_argument("--curvature-pairs", choices=APTS_OPTION_FLAGS["curvature_pairs"],
                   default=None,
                   help="apts/sapts with --second-order: secant pairs of the global L-SR1 "
                        "memory, 'same_batch' from the global step (paper; default) or "
                        "'multi_batch', one pair per outer iteration with its gradients on the "
                        "samples consecutive minibatches share (Berahas et al. 2016)")
    g.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate of adam (default 1e-3) / sgd (default 0.01)")
    g.add_argument("--momentum", type=_fraction, default=None,
                   help="sgd momentum in [0, 1) (default 0.9)")

    g = p.add_argument_group("batches and epochs")
    g.add_argument("--batch-size", type=_positive_int, default=None, metavar="B",
                   help="minibatch size (sapts: summed over subdomains, a multiple of N; "
                        "default max(256, min(10000, samples)/16), with --preset paper "
                        "min(10000, samples), rounded down to a multiple of N; adam/sgd: default "
                        "128; tr: full batch unless given; not for apts/lbfgs)")
    g.add_argument("--overlap", type=_fraction, default=d["overlap"], metavar="R",
                   help="sapts: fraction of a minibatch shared with the next one "
                        "(default %(default)s)")
    g.add_argument("--subdomain-overlap", type=_fraction, default=d["subdomain_overlap"],
                   metavar="S", help="sapts: fraction of each microbatch common to all subdomains "
                                     "(default %(default)s)")
    g.add_argument("--epochs", type=_positive_int, default=d["epochs"],
                   help="epochs to train (default %(default)s; with --resume: the total)")
    g.add_argument("--iterations-per-epoch", type=_positive_int, default=None, metavar="K",
                   help="full-batch methods (apts, lbfgs, full-batch tr): iterations per epoch "
                        f"(default {d['iterations_per_epoch_full']}); minibatch methods: at most "
                        "K minibatches per epoch (default: all of them)")
    g.add_argument("--seed", type=_nonneg_int, default=d["seed"],
                   help="seed of the weights and of the minibatch order (default %(default)s)")

    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default runs/<optimizer>-<dataset>-<timestamp>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (bitwise identical "
                        "to an uninterrupted run)")
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show the progress bar (default: when stderr is a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--no-plots", dest="plots", action="store_false", default=True,
                   help="do not write the PNG plots")


def build_parser() -> argparse.ArgumentParser:
    """The ``apts-jax`` parser with its ``train`` sub-command."""
    return _build_parsers()[0]


def _build_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(
        prog="apts-jax",
        description="Training application of apts_jax (APTS / trust-region training in JAX).",
        epilog="Without a COMMAND, 'train' runs with the options given: 'python -m apts_jax' "
               "alone is the default training job (see 'apts-jax train --help').",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="train a network and write metrics, plots and checkpoints",
        description="Train a network with APTS, SAPTS, the L-SR1 trust region or an optax\n"
                    "baseline; write metrics.csv/metrics.jsonl, config.json, PNG plots and\n"
                    "checkpoints into --out.\n\n" + DEFAULT_JOB_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_train_arguments(train)
    return parser, train


def _normalise_argv(argv: Sequence[str]) -> list[str]:
    """No sub-command given: run ``train`` (``python -m apts_jax [--epochs 3 ...]``)."""
    argv = list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        return ["train", *argv]
    return argv


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-flag checks that need no JAX; ``parser.error`` (exit 2) on failure."""
    opt = args.optimizer
    if args.batch_size is not None and opt in FULL_BATCH:
        parser.error(
            f"--batch-size: {opt} is a full-batch method (use --subset to shrink the data)"
        )
    if args.subdomains is not None and args.devices is not None and args.subdomains % args.devices:
        parser.error(
            f"--subdomains {args.subdomains} is not a multiple of --devices {args.devices} "
            "(every device runs the same number of subdomains)"
        )
    if opt == "sapts" and args.batch_size is not None and args.subdomains is not None and (
        args.batch_size % args.subdomains
    ):
        parser.error(
            f"--batch-size {args.batch_size} is not divisible by --subdomains {args.subdomains} "
            "(each subdomain gets batch_size / subdomains samples)"
        )
    if args.lr is not None and opt not in ("adam", "sgd"):
        parser.error(f"--lr: {opt} chooses its own step sizes; --lr is for adam and sgd")
    if args.momentum is not None and opt != "sgd":
        parser.error("--momentum is for --optimizer sgd")
    given = [k for k in ("preset", *APTS_OPTION_FLAGS, "nonmonotone_window")
             if getattr(args, k) is not None]
    if given and opt not in SUBDOMAIN_METHODS:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        parser.error(f"{flags}: APTS options, for --optimizer apts or sapts (not {opt})")
    if args.nonmonotone_window is not None and args.acceptance != "nonmonotone":
        parser.error("--nonmonotone-window needs --acceptance nonmonotone")
    if args.hidden and args.model != "mlp":
        parser.error(
            f"--hidden builds a custom MLP; it cannot be combined with --model {args.model}"
        )
    if args.resume and args.out is None:
        parser.error("--resume needs --out DIR (the folder of the run to continue)")
    if args.subset is not None and opt == "sapts" and args.batch_size is not None and (
        args.batch_size > args.subset
    ):
        parser.error(f"--batch-size {args.batch_size} is larger than --subset {args.subset}")


def parse_train_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse and check ``argv`` (without the program name) into a :class:`TrainConfig`.

    Exits with status 2 (``SystemExit``) on bad flags, like argparse.
    """
    parser, train_parser = _build_parsers()
    argv = _normalise_argv(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command != "train":  # pragma: no cover - only "train" exists
        parser.error(f"unknown command {args.command!r}")
    _check(train_parser, args)
    opt = args.optimizer
    lr = args.lr if args.lr is not None else DEFAULTS["lr"].get(opt)
    momentum = args.momentum if args.momentum is not None else (
        DEFAULTS["momentum"] if opt == "sgd" else None
    )
    out = args.out
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = f"runs/{opt}-{args.dataset}-{stamp}"
    # Every argument whose dest is a TrainConfig field is copied; the rest is derived here.
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(
        hidden=tuple(args.hidden) if args.hidden else None,
        subdomains=args.subdomains if opt in SUBDOMAIN_METHODS else None,
        second_order=None if args.second_order is None else bool(args.second_order),
        lr=lr,
        momentum=momentum,
        out=out,
        resume=bool(args.resume),
        plots=bool(args.plots),
    )
    return TrainConfig(**values)


def _error(message: str, status: int) -> int:
    first = " ".join(str(message).split("\n")[0].split())
    print(f"apts-jax train: error: {first}", file=sys.stderr)
    return status


def configure_devices(devices: int | None) -> None:
    """Ask JAX for ``devices`` simulated CPU devices when its backends have not started yet.

    Must run before any JAX computation. When JAX is already up (e.g. in a test session that
    configured its own devices) nothing changes; :func:`apts_jax.app.train.resolve_config` then
    checks that enough devices exist.
    """
    import jax

    if devices is None or int(jax.config.jax_num_cpu_devices) >= devices:
        return
    try:
        jax.config.update("jax_num_cpu_devices", int(devices))
    except RuntimeError:  # JAX's own check: its backends have started, the count is fixed
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``apts-jax`` / ``python -m apts_jax``; returns the exit status."""
    cfg = parse_train_args(argv)
    configure_devices(cfg.devices)
    # Imported only now: JAX must see the device configuration above first.
    from apts_jax.app import train as train_lib
    from apts_jax.data import DatasetNotFoundError

    try:
        train_lib.run(cfg)
    except UsageError as err:
        return _error(str(err), 2)
    except DatasetNotFoundError as err:
        print(f"apts-jax train: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\napts-jax train: interrupted; continue with --resume --out "
              f"{cfg.out}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
