"""The small logistic-regression problem shared by the APTS tests (tests/test_apts.py, test_parallel.py)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def logistic_data(features, samples, seed, dtype=np.float32):
    """Binary logistic regression data: ``y = 1[x . w* + noise > 0]``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, features))
    w = rng.normal(size=features)
    y = (x @ w + 0.5 * rng.normal(size=samples) > 0).astype(float)
    return {"x": x.astype(dtype), "y": y.astype(dtype)}


def logistic_loss(params, shard):
    """Mean logistic loss over the shard (plus ``reg ||w||^2`` if the shard carries ``reg``)."""
    z = shard["x"] @ params["w"] + params["b"]
    loss = jnp.mean(jnp.logaddexp(0.0, z) - shard["y"] * z)
    if "reg" in shard:
        loss = loss + shard["reg"][0] * jnp.sum(params["w"] ** 2)
    return loss


def zeros_params(features, dtype=jnp.float32):
    return {"w": jnp.zeros((features,), dtype), "b": jnp.zeros((), dtype)}
