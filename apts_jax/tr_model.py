r"""Trust-region models and their subproblem steps (the "descent" half of a trust-region method).

Every function here works on flat vectors and returns a :class:`ModelStep`: the step :math:`s`,
the predicted decrease :math:`m(0) - m(s) \ge 0`, :math:`\|s\|` and a case code.

* ``"first_order"``: the linear model :math:`m(s) = f + g^\top s`, whose minimiser on the ball
  :math:`\|s\| \le \Delta` is :math:`s = -\Delta g / \|g\|` with predicted decrease
  :math:`\Delta \|g\|` (:math:`s = 0`, decrease 0 when :math:`g = 0`). This is the first-order
  trust-region step used by APTS.
* ``"sr1"``: the quadratic model :math:`m(s) = f + g^\top s + \tfrac12 s^\top B s` with the
  compact limited-memory SR1 matrix :math:`B = \gamma I + \Psi M \Psi^\top`
  (:mod:`apts_jax.lsr1`), minimised globally on the ball by the orthonormal-basis SR1 (OBS)
  method of Brust, Erway & Marcia, *On solving L-SR1 trust-region subproblems*, Comput. Optim.
  Appl. 66 (2017) (:func:`apts_jax.obs.solve_memory`). See also Nocedal & Wright, *Numerical
  Optimization*, 2nd ed., ch. 4 (trust-region subproblem) and ch. 6.2 (SR1).

If OBS returns a non-finite step or predicted decrease (which only happens on a degenerate
memory), :func:`sr1_step` falls back to the first-order step and reports ``case == FALLBACK``, so
the trust-region iteration never evaluates the objective at a NaN point.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

from apts_jax import obs
from apts_jax.lsr1 import LSR1Memory

__all__ = [
    "FALLBACK",
    "FIRST_ORDER",
    "MODELS",
    "ModelStep",
    "compute_step",
    "first_order_step",
    "sr1_step",
]

MODELS = ("sr1", "first_order")
"""Names accepted by :func:`compute_step` and the optimizer factories."""

FIRST_ORDER = -1
"""``ModelStep.case`` of a first-order step."""
FALLBACK = -2
"""``ModelStep.case`` of an SR1 step replaced by the first-order step (non-finite OBS output)."""


class ModelStep(NamedTuple):
    """A trust-region step and what the model predicts for it.

    Attributes:
      step: :math:`s`, shape ``(n,)``, :math:`\\|s\\| \\le \\Delta`.
      predicted_decrease: :math:`m(0) - m(s)` (≥ 0 up to round-off).
      step_norm: :math:`\\|s\\|`.
      case: int32; an OBS case (``obs.INTERIOR`` … ``obs.SINGULAR``) for ``"sr1"``,
        :data:`FIRST_ORDER` for ``"first_order"``, :data:`FALLBACK` when the SR1 step was replaced.
    """

    step: Array
    predicted_decrease: Array
    step_norm: Array
    case: Array


def first_order_step(g: ArrayLike, radius: ArrayLike) -> ModelStep:
    r"""Minimiser of the linear model on the ball: :math:`s = -\Delta\, g / \|g\|`.

    Predicted decrease :math:`-g^\top s = \Delta \|g\|`. For :math:`g = 0` the step and the
    predicted decrease are 0 (which :func:`apts_jax.radius.ratio` turns into a rejection).
    The norm is computed with scaling so that it neither overflows nor underflows.
    """
    g = jnp.asarray(g)
    dtype = g.dtype
    radius = jnp.asarray(radius).astype(dtype)
    scale = jnp.max(jnp.abs(g)) if g.size else jnp.zeros((), dtype)
    nonzero = scale > 0
    safe_scale = jnp.where(nonzero, scale, jnp.ones_like(scale))
    g_scaled = g / safe_scale
    g_norm_scaled = jnp.linalg.norm(g_scaled)
    unit = jnp.where(nonzero, g_scaled / jnp.where(nonzero, g_norm_scaled, 1), 0)
    step = -radius * unit
    g_norm = scale * g_norm_scaled
    predicted = jnp.where(nonzero, radius * g_norm, jnp.zeros_like(g_norm))
    step_norm = jnp.where(nonzero, radius, jnp.zeros_like(radius))
    return ModelStep(
        step.astype(dtype),
        predicted.astype(dtype),
        step_norm.astype(dtype),
        jnp.asarray(FIRST_ORDER, jnp.int32),
    )


def sr1_step(g: ArrayLike, memory: LSR1Memory, radius: ArrayLike) -> ModelStep:
    r"""Global minimiser of the L-SR1 model on the ball, by OBS (Brust–Erway–Marcia 2017).

    Solves :math:`\min_s g^\top s + \tfrac12 s^\top B s` s.t. :math:`\|s\| \le \Delta` with
    :func:`apts_jax.obs.solve_memory`. Falls back to :func:`first_order_step` (``case ==
    FALLBACK``) if the OBS step or its predicted decrease is not finite.
    """
    g = jnp.asarray(g)
    dtype = g.dtype
    radius = jnp.asarray(radius).astype(dtype)
    res = obs.solve_memory(g, memory, radius)
    step = jnp.asarray(res.step).astype(dtype)
    predicted = jnp.asarray(res.predicted_decrease).astype(dtype)
    step_norm = jnp.asarray(res.step_norm).astype(dtype)
    finite = jnp.all(jnp.isfinite(step)) & jnp.isfinite(predicted) & jnp.isfinite(step_norm)
    fo = first_order_step(g, radius)
    return ModelStep(
        jnp.where(finite, step, fo.step),
        jnp.where(finite, predicted, fo.predicted_decrease),
        jnp.where(finite, step_norm, fo.step_norm),
        jnp.where(finite, jnp.asarray(res.case, jnp.int32), jnp.asarray(FALLBACK, jnp.int32)),
    )


def compute_step(
    model: str, g: ArrayLike, memory: LSR1Memory | None, radius: ArrayLike
) -> ModelStep:
    """Dispatch on the model name (a static Python string): ``"sr1"`` or ``"first_order"``."""
    if model == "sr1":
        if memory is None:
            raise ValueError('model="sr1" needs an L-SR1 memory; got memory=None.')
        return sr1_step(g, memory, radius)
    if model == "first_order":
        return first_order_step(g, radius)
    raise ValueError(f"unknown model {model!r}; use one of {MODELS}.")
