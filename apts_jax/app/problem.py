"""The training problem of ``apts-jax train``: the data set, the model and the loss.

Evaluation of a problem's parameters on whole data sets is :class:`Evaluator`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from apts_jax.app.config import TrainConfig, UsageError
from apts_jax.data import load_dataset

__all__ = ["EVAL_CHUNK", "Evaluator", "Problem", "load_problem"]

#: Samples per jitted evaluation call (fixed shapes: at most two compilations per data set).
EVAL_CHUNK = 5000


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

    @property
    def num_train(self) -> int:
        return int(self.train_x.shape[0])

    def batch(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The training samples ``idx`` as a host ``(x, y)`` pair."""
        return self.train_x[idx], self.train_y[idx]


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
        """``(mean loss, accuracy)`` of ``params`` on ``split`` (``"train"`` or ``"test"``)."""
        params = jax.device_put(params, self.device)
        total, correct, count = 0.0, 0, 0
        for x, y in self.train if split == "train" else self.test:
            s, c = jax.device_get(self._chunk(params, x, y))
            total += float(s)
            correct += int(c)
            count += int(x.shape[0])
        return total / count, correct / count
