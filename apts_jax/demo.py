"""The main job: train a ReLU MLP on Fashion-MNIST with the L-SR1 trust-region optimizer.

Full-batch trust-region training (no learning rate to choose) on the real data set, found offline
through :func:`apts_jax.data.load_dataset` (Debian's ``dataset-fashion-mnist`` package, a
``--data-dir``, ``$APTS_JAX_DATA_DIR`` or the user cache). Prints the loss, accuracy, radius and
acceptance every ``--print-every`` iterations and the test accuracy at the end.

Run it with ``python -m apts_jax`` (``--help`` lists the options).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from apts_jax.data import DatasetNotFoundError, load_dataset
from apts_jax.trust_region import trust_region

Params = list[tuple[jax.Array, jax.Array]]


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> Params:
    """He-initialised weights and zero biases of a fully connected network."""
    params = []
    for din, dout in zip(sizes[:-1], sizes[1:], strict=True):
        key, sub = jax.random.split(key)
        w = jax.random.normal(sub, (din, dout), jnp.float32) * jnp.sqrt(2.0 / din)
        params.append((w, jnp.zeros((dout,), jnp.float32)))
    return params


def mlp_logits(params: Params, x: jax.Array) -> jax.Array:
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def cross_entropy(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of the MLP on ``(x, y)``."""
    logits = mlp_logits(params, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def accuracy(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(mlp_logits(params, x), axis=-1) == y)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m apts_jax",
        description="Full-batch L-SR1 trust-region training of an MLP on Fashion-MNIST.",
    )
    p.add_argument("--iterations", type=int, default=150, help="trust-region iterations")
    p.add_argument("--hidden", type=int, nargs="*", default=[128], help="hidden layer sizes")
    p.add_argument("--model", choices=["sr1", "first_order"], default="sr1")
    p.add_argument("--memory", type=int, default=5, help="L-SR1 memory size")
    p.add_argument("--subset", type=int, default=None, help="use only the first N training samples")
    p.add_argument("--data-dir", default=None, help="folder holding the Fashion-MNIST IDX files")
    p.add_argument("--print-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train and return the final metrics."""
    ds = load_dataset("fashion_mnist", args.data_dir, subset=args.subset)
    x, y = jnp.asarray(ds.train_x), jnp.asarray(ds.train_y)
    xt, yt = jnp.asarray(ds.test_x), jnp.asarray(ds.test_y)
    sizes = [x.shape[1], *args.hidden, ds.num_classes]
    params = init_mlp(jax.random.key(args.seed), sizes)
    n_params = sum(w.size + b.size for w, b in params)
    print(
        f"Fashion-MNIST from {ds.source}: {x.shape[0]} train / {xt.shape[0]} test samples; "
        f"MLP {'-'.join(map(str, sizes))} ({n_params:,} parameters); "
        f"trust region, {args.model} model; devices: {jax.devices()}"
    )

    opt = trust_region(args.model, args.memory)
    state = opt.init(params)
    value_and_grad = optax.value_and_grad_from_state(cross_entropy)

    @jax.jit
    def step(params: Params, state: Any) -> tuple[Params, Any]:
        value, grad = value_and_grad(params, x, y, state=state)
        updates, state = opt.update(
            grad, state, params, value=value, grad=grad, value_fn=lambda p: cross_entropy(p, x, y)
        )
        return optax.apply_updates(params, updates), state

    eval_test = jax.jit(lambda p: (cross_entropy(p, xt, yt), accuracy(p, xt, yt)))
    eval_train = jax.jit(lambda p: accuracy(p, x, y))

    t0 = time.perf_counter()
    loss0 = float(cross_entropy(params, x, y))
    print(f"{'iter':>5} {'loss':>9} {'train acc':>9} {'radius':>9} {'accepted':>9} {'time s':>7}")
    print(f"{0:5d} {loss0:9.4f} {float(eval_train(params)):9.4f} {'':>9} {'':>9} {0.0:7.1f}")
    for k in range(1, args.iterations + 1):
        params, state = step(params, state)
        if k % args.print_every == 0 or k == args.iterations:
            info = state.info
            print(
                f"{k:5d} {float(state.value):9.4f} {float(eval_train(params)):9.4f} "
                f"{float(state.radius):9.2e} {int(info.num_accepted):4d}/{k:<4d} "
                f"{time.perf_counter() - t0:7.1f}"
            )
    test_loss, test_acc = eval_test(params)
    result = {
        "initial_loss": loss0,
        "final_loss": float(state.value),
        "test_loss": float(test_loss),
        "test_accuracy": float(test_acc),
        "accepted": int(state.info.num_accepted),
        "iterations": args.iterations,
        "wall_time_s": time.perf_counter() - t0,
    }
    print(
        f"done: train loss {loss0:.4f} -> {result['final_loss']:.4f}; test loss "
        f"{result['test_loss']:.4f}, test accuracy {100 * result['test_accuracy']:.2f} %; "
        f"{result['accepted']}/{args.iterations} steps accepted; {result['wall_time_s']:.1f} s"
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.iterations < 1:
        print("error: --iterations must be >= 1", file=sys.stderr)
        return 2
    try:
        run(args)
    except DatasetNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    raise SystemExit(main())
