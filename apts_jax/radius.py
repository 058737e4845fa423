r"""Trust-region radius control: the acceptance ratio and the radius update.

This module is the "search" half of a trust-region method (in the sense of optimistix, which
separates the radius control from the subproblem "descent"). It knows nothing about the model
that produced a step; it only sees the actual decrease, the predicted decrease, the radius and the
length of the step. The same functions drive the plain trust-region optimizer
(:mod:`apts_jax.tr`) and the global radius of APTS (Cruz Alegría, Trotti, Kopaničáková,
Krause, *Data-Parallel Neural Network Training via Nonlinearly Preconditioned Trust-Region
Method*).

Math (Nocedal & Wright, *Numerical Optimization*, 2nd ed., Alg. 4.1 and Alg. 6.2):

.. math::

   \rho_k = \frac{f(x_k) - f(x_k + s_k)}{m_k(0) - m_k(s_k)},

with :math:`\rho_k = -\infty` whenever the predicted decrease :math:`m_k(0) - m_k(s_k)` is
:math:`\le 0` or not finite, or the actual decrease is not finite (so that a step the model does
not endorse, or a NaN/Inf trial, is always rejected instead of producing ``0/0``). Then

* accept the step iff :math:`\rho_k \ge \eta_1`;
* shrink, :math:`\Delta_{k+1} = \max(\alpha \Delta_k, \Delta_{\min})`, iff :math:`\rho_k < \eta_1`;
* grow, :math:`\Delta_{k+1} = \min(\beta \Delta_k, \Delta_{\max})`, iff :math:`\rho_k > \eta_2`
  and the step reached the boundary, :math:`\|s_k\| \ge c_b \Delta_k` (``boundary_fraction``);
* otherwise keep :math:`\Delta_{k+1} = \Delta_k`;

and the result is clipped to :math:`[\Delta_{\min}, \Delta_{\max}]`.

All functions are pure, shape-polymorphic (they broadcast, so a vector of radii works) and
jit/vmap friendly. The configuration is a :class:`typing.NamedTuple`, hence a pytree: its fields
may be Python floats (validated by :func:`validate_config`) or traced arrays.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
from jax import Array
from jax.typing import ArrayLike

__all__ = [
    "DEFAULT_RADIUS_CONFIG",
    "RadiusConfig",
    "ratio",
    "update_radius",
    "validate_config",
]


class RadiusConfig(NamedTuple):
    """Constants of the trust-region radius control.

    Defaults follow Nocedal & Wright's SR1 trust-region method (Alg. 6.2: shrink below 0.1,
    grow above 0.75 on the boundary, factors 1/2 and 2) with a boundary test of 0.9 Δ as in the
    APTS authors' code; Δ0 = 0.1 is the APTS authors' initial radius. One set of defaults is used
    for every problem.

    Attributes:
      initial_radius: Δ0 > 0, the radius of the first iteration (default 0.1).
      min_radius: Δmin > 0, lower clip of the radius (default 1e-8). A rejection at Δmin is the
        "radius collapsed" stopping test of :func:`apts_jax.minimize`.
      max_radius: Δmax ≥ Δ0, upper clip of the radius (default 10.0).
      eta1: η1 ∈ [0, η2): accept iff ρ ≥ η1, shrink iff ρ < η1 (default 0.1).
      eta2: η2 ∈ (η1, 1): grow iff ρ > η2 and the step reached the boundary (default 0.75).
      shrink: α ∈ (0, 1), the shrink factor Δ ← αΔ (default 0.5).
      grow: β > 1, the growth factor Δ ← βΔ (default 2.0).
      boundary_fraction: c_b ∈ (0, 1]; a step "reached the boundary" iff ‖s‖ ≥ c_b Δ
        (default 0.9).
    """

    initial_radius: float = 0.1
    min_radius: float = 1e-8
    max_radius: float = 10.0
    eta1: float = 0.1
    eta2: float = 0.75
    shrink: float = 0.5
    grow: float = 2.0
    boundary_fraction: float = 0.9


DEFAULT_RADIUS_CONFIG = RadiusConfig()
"""The default :class:`RadiusConfig` (Δ0=0.1, Δmin=1e-8, Δmax=10, η1=0.1, η2=0.75, α=0.5, β=2,
boundary fraction 0.9)."""


def _as_float(name: str, value: object) -> float:
    try:
        out = float(value)  # type: ignore[arg-type]
    except Exception as err:  # tracers, strings, arrays with more than one element ...
        raise TypeError(
            f"RadiusConfig.{name} must be a concrete real number to be validated, got "
            f"{value!r} of type {type(value).__name__}; pass a Python float."
        ) from err
    if not math.isfinite(out):
        raise ValueError(f"RadiusConfig.{name} must be finite, got {out!r}; pass a finite float.")
    return out


def validate_config(config: RadiusConfig) -> RadiusConfig:
    """Check a :class:`RadiusConfig` and return it with all fields converted to Python floats.

    Conditions: all fields finite, ``0 < min_radius <= initial_radius <= max_radius``,
    ``0 <= eta1 < eta2 < 1``, ``0 < shrink < 1 < grow``, ``0 < boundary_fraction <= 1``.

    Raises:
      TypeError: a field is not a concrete real number (e.g. a tracer).
      ValueError: a field violates a condition; the message names the value and the fix.
    """
    if not isinstance(config, RadiusConfig):
        raise TypeError(f"expected a RadiusConfig, got {type(config).__name__}.")
    c = RadiusConfig(*(_as_float(n, v) for n, v in zip(RadiusConfig._fields, config, strict=True)))
    if not c.min_radius > 0.0:
        raise ValueError(f"min_radius={c.min_radius!r} must be > 0; pass e.g. min_radius=1e-8.")
    if not c.initial_radius > 0.0:
        raise ValueError(
            f"initial_radius={c.initial_radius!r} must be > 0; pass e.g. initial_radius=0.1."
        )
    if not c.min_radius <= c.initial_radius:
        raise ValueError(
            f"initial_radius={c.initial_radius!r} is below min_radius={c.min_radius!r}; "
            "make min_radius <= initial_radius."
        )
    if not c.initial_radius <= c.max_radius:
        raise ValueError(
            f"initial_radius={c.initial_radius!r} exceeds max_radius={c.max_radius!r}; "
            "make initial_radius <= max_radius."
        )
    if not 0.0 <= c.eta1 < 1.0:
        raise ValueError(f"eta1={c.eta1!r} must lie in [0, 1); the default is 0.1.")
    if not 0.0 < c.eta2 < 1.0:
        raise ValueError(f"eta2={c.eta2!r} must lie in (0, 1); the default is 0.75.")
    if not c.eta1 < c.eta2:
        raise ValueError(
            f"eta1={c.eta1!r} must be < eta2={c.eta2!r} (accept/shrink threshold below the "
            "growth threshold); e.g. eta1=0.1, eta2=0.75."
        )
    if not 0.0 < c.shrink < 1.0:
        raise ValueError(f"shrink={c.shrink!r} must lie in (0, 1); the default is 0.5.")
    if not c.grow > 1.0:
        raise ValueError(f"grow={c.grow!r} must be > 1; the default is 2.0.")
    if not 0.0 < c.boundary_fraction <= 1.0:
        raise ValueError(
            f"boundary_fraction={c.boundary_fraction!r} must lie in (0, 1]; the default is 0.9."
        )
    return c


def ratio(actual_decrease: ArrayLike, predicted_decrease: ArrayLike) -> Array:
    r"""The trust-region ratio :math:`\rho = \text{actual} / \text{predicted}`, guarded.

    Returns ``-inf`` (which every acceptance test rejects and every radius rule shrinks on) where
    the predicted decrease is :math:`\le 0` or not finite, or the actual decrease is not finite
    (NaN/Inf trial value). Never returns NaN. The result has the promoted dtype of the inputs.

    Args:
      actual_decrease: :math:`f(x) - f(x + s)`.
      predicted_decrease: :math:`m(0) - m(s)`.
    """
    actual = jnp.asarray(actual_decrease)
    predicted = jnp.asarray(predicted_decrease)
    dtype = jnp.result_type(actual, predicted, jnp.float32)
    actual = actual.astype(dtype)
    predicted = predicted.astype(dtype)
    ok = jnp.isfinite(actual) & jnp.isfinite(predicted) & (predicted > 0)
    safe_predicted = jnp.where(ok, predicted, jnp.ones_like(predicted))
    rho = jnp.where(ok, actual / safe_predicted, -jnp.inf)
    # actual/predicted can still overflow to +inf for a tiny predicted decrease; that is a
    # legitimate "much better than predicted" and is accepted. Overflow cannot produce NaN.
    return rho


def update_radius(
    radius: ArrayLike,
    rho: ArrayLike,
    step_norm: ArrayLike,
    config: RadiusConfig = DEFAULT_RADIUS_CONFIG,
) -> Array:
    r"""The new radius after a trial step (see the module docstring for the rule).

    NaN ``rho`` is treated as a failure (shrink). The result is clipped to
    ``[config.min_radius, config.max_radius]`` and has the dtype of ``radius``.

    Args:
      radius: current radius :math:`\Delta_k` (> 0).
      rho: trust-region ratio from :func:`ratio`.
      step_norm: :math:`\|s_k\|` of the trial step.
      config: the constants.
    """
    radius = jnp.asarray(radius)
    dtype = jnp.result_type(radius, jnp.float32)
    radius = radius.astype(dtype)
    rho = jnp.asarray(rho)
    step_norm = jnp.asarray(step_norm).astype(dtype)
    shrink = ~(rho >= config.eta1)  # also True for NaN
    on_boundary = step_norm >= config.boundary_fraction * radius
    grow = (rho > config.eta2) & on_boundary & ~shrink
    new = jnp.where(
        shrink, config.shrink * radius, jnp.where(grow, config.grow * radius, radius)
    )
    new = jnp.clip(new, config.min_radius, config.max_radius)
    return new.astype(dtype)
