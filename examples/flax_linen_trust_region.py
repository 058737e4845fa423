r"""Training a Flax Linen model with the trust-region optimizer and a ``TrainState``.

``flax.training.train_state.TrainState.apply_gradients(grads=...)`` calls
``tx.update(grads, opt_state, params)`` *without* extra arguments, so it cannot drive
:func:`apts_jax.trust_region`, which needs the objective (``value_fn``) and ``value``/``grad`` at the
current parameters (the optax line-search contract). Call the transformation yourself and put the
results back into the state::

    tx = apts_jax.trust_region("sr1")                      # no learning rate
    state = train_state.TrainState.create(apply_fn=net.apply, params=params, tx=tx)

    @jax.jit
    def train_step(state, x, y):
        def loss_fn(params):
            return cross_entropy(state.apply_fn({"params": params}, x), y)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params,
                                             value=loss, grad=grads, value_fn=loss_fn)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), loss

With fixed (full-batch) data, :func:`optax.value_and_grad_from_state` reuses the value and gradient
that the trust region stored at the accepted point (``state.opt_state.value`` / ``.grad``), so
each step costs one evaluation (the optimizer's trial) instead of two; see :func:`train_step`.

Run::

    python examples/flax_linen_trust_region.py                # Fashion-MNIST if found, else generated
    python examples/flax_linen_trust_region.py --batch-size 256 --steps 100
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax import Array

import apts_jax


class LinenMLP(nn.Module):
    """Fully connected ReLU network with widths ``features`` (the last entry is the logits)."""

    features: Sequence[int]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.reshape(x, (x.shape[0], -1))
        for width in self.features[:-1]:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.features[-1])(x)


def make_data(
    num_samples: int = 2048, num_features: int = 784, num_classes: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs ``x = 3 c_y + e`` around unit-norm random centres; float32 ``x``, int32 ``y``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes, num_features))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = rng.integers(0, num_classes, num_samples).astype(np.int32)
    x = 3.0 * centres[y] + rng.standard_normal((num_samples, num_features))
    return x.astype(np.float32), y


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Mean softmax cross-entropy with integer labels."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def create_state(
    net: nn.Module, input_shape: Sequence[int], *, tr_model: str = "sr1", memory_size: int = 5,
    seed: int = 0,
) -> train_state.TrainState:
    """A ``TrainState`` with ``tx = apts_jax.trust_region(tr_model, memory_size)``."""
    params = net.init(jax.random.key(seed), jnp.zeros((1, *input_shape), jnp.float32))["params"]
    tx = apts_jax.trust_region(tr_model, memory_size)
    return train_state.TrainState.create(apply_fn=net.apply, params=params, tx=tx)


@functools.partial(jax.jit, static_argnames="full_batch")
def train_step(
    state: train_state.TrainState, x: Array, y: Array, *, full_batch: bool = False
) -> tuple[train_state.TrainState, Array]:
    """One trust-region update on ``(x, y)``; returns the new state and the loss before it.

    ``full_batch=True`` (the same ``x, y`` at every step) reuses the value and gradient stored
    in ``state.opt_state``; otherwise both are computed here.
    """

    def loss_fn(params: Any) -> Array:
        return cross_entropy(state.apply_fn({"params": params}, x), y)

    if full_batch:
        loss, grads = optax.value_and_grad_from_state(loss_fn)(state.params, state=state.opt_state)
    else:
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
    # TrainState.apply_gradients would call tx.update(grads, opt_state, params) without the
    # objective; pass value/grad/value_fn explicitly and apply the step.
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params,
                                         value=loss, grad=grads, value_fn=loss_fn)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), loss


def train(
    x: Array,
    y: Array,
    *,
    hidden: Sequence[int] = (64,),
    steps: int = 50,
    batch_size: int | None = None,
    tr_model: str = "sr1",
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train a :class:`LinenMLP` with the trust region; full batch when ``batch_size`` is None.

    Returns the per-step losses (before each update), the full-data loss before and after, the
    accepted-step count and the final ``TrainState``.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    num_classes = int(jnp.max(y)) + 1
    net = LinenMLP((*hidden, num_classes))
    state = create_state(net, x.shape[1:], tr_model=tr_model, seed=seed)
    full_loss = jax.jit(lambda p: cross_entropy(net.apply({"params": p}, x), y))
    initial = float(full_loss(state.params))
    rng = np.random.default_rng(seed)
    losses = []
    t0 = time.perf_counter()
    for k in range(steps):
        if batch_size is None:
            state, loss = train_step(state, x, y, full_batch=True)
        else:
            idx = rng.choice(x.shape[0], batch_size, replace=False)
            state, loss = train_step(state, x[idx], y[idx])
        losses.append(float(loss))
        if log is not None and (k % 10 == 0 or k == steps - 1):
            log(f"  step {k:4d}: loss {losses[-1]:.4f}, radius {float(state.opt_state.radius):.3g}, "
                f"accepted {int(state.opt_state.info.num_accepted)}/{k + 1}")
    return {
        "losses": losses,
        "initial_loss": initial,
        "final_loss": float(full_loss(state.params)),
        "num_accepted": int(state.opt_state.info.num_accepted),
        "state": state,
        "time_s": time.perf_counter() - t0,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Flax Linen + apts_jax.trust_region (TrainState).")
    p.add_argument("--data", choices=["auto", "fashion_mnist", "synthetic"], default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--hidden", type=int, nargs="*", default=[64])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=None, help="minibatch (default: full batch)")
    p.add_argument("--model", choices=["sr1", "first_order"], default="sr1")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    x = y = None
    desc = ""
    if args.data in ("auto", "fashion_mnist"):
        from apts_jax.data import DatasetNotFoundError, load_dataset

        try:
            ds = load_dataset("fashion_mnist", args.data_dir, download=False,
                              subset=(args.samples, 1))
            x, y, desc = ds.train_x, ds.train_y, f"Fashion-MNIST ({ds.train_x.shape[0]} samples)"
        except DatasetNotFoundError:
            if args.data == "fashion_mnist":
                raise
    if x is None:
        x, y = make_data(args.samples, 784, 10, args.seed)
        desc = f"generated blobs ({args.samples} samples)"
    print(f"data: {desc}; Linen MLP {'-'.join(map(str, [784, *args.hidden, 10]))}, "
          f"trust region {args.model!r}")
    out = train(x, y, hidden=args.hidden, steps=args.steps, batch_size=args.batch_size,
                tr_model=args.model, seed=args.seed, log=print)
    print(f"loss {out['initial_loss']:.4f} -> {out['final_loss']:.4f} ({out['time_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
