"""A plain-JAX ReLU MLP shared by the example scripts (no Flax needed)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

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
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(mlp_logits(params, x), y))


def accuracy(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(mlp_logits(params, x), axis=-1) == y)
