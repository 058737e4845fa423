r"""A jitted trust-region solver loop for deterministic problems.

:func:`minimize` runs :func:`apts_jax.tr.iteration` (L-SR1/OBS or first-order model;
see that module for the math and the references: Cruz Alegría, Trotti, Kopaničáková, Krause,
*Data-Parallel Neural Network Training via Nonlinearly Preconditioned Trust-Region Method*;
Brust, Erway & Marcia 2017; Nocedal & Wright ch. 4 and 6) inside one :func:`jax.lax.while_loop`
under :func:`jax.jit`.

Stopping tests, checked after every iteration (and once before the first):

* ``GTOL``: :math:`\|\nabla f(x_k)\|_2 \le \text{gtol}\cdot\max(1, \|\nabla f(x_0)\|_2)` — a
  gradient tolerance relative to the initial gradient, but never looser than the absolute
  ``gtol`` when :math:`\|g_0\| < 1`. Relative, because the scale of a loss is arbitrary; floored
  at 1 so that a start close to a minimiser does not demand a tolerance far below round-off.
* ``MIN_RADIUS``: a step was rejected while the radius was already at ``min_radius`` (the model
  can no longer make progress: usually the round-off floor has been reached).
* ``MAX_ITERATIONS``: ``max_iterations`` iterations were made.
* ``NONFINITE``: the value or gradient at the *initial* point is not finite (no iteration is
  made). Non-finite trial points later on are rejected and shrink the radius.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from apts_jax import _tree, _validate
from apts_jax.radius import DEFAULT_RADIUS_CONFIG, RadiusConfig
from apts_jax.tr import TrustRegionState, init_state, iteration, next_state

__all__ = [
    "GTOL",
    "MAX_ITERATIONS",
    "MIN_RADIUS",
    "NONFINITE",
    "RUNNING",
    "TERMINATION_REASONS",
    "MinimizeStats",
    "minimize",
]


RUNNING = 0
GTOL = 1
MAX_ITERATIONS = 2
MIN_RADIUS = 3
NONFINITE = 4
TERMINATION_REASONS = {
    RUNNING: "running",
    GTOL: "gradient norm below gtol * max(1, ||g0||)",
    MAX_ITERATIONS: "maximum number of iterations reached",
    MIN_RADIUS: "step rejected at the minimum radius",
    NONFINITE: "non-finite value or gradient at the initial point",
}
"""Human-readable meaning of :attr:`MinimizeStats.termination`."""


class MinimizeStats(NamedTuple):
    """Summary of a :func:`minimize` run.

    Attributes:
      iterations: int32, trust-region iterations made.
      num_fun_evals: int32, ``value_and_grad`` evaluations (1 + iterations).
      value: final objective value.
      grad_norm: final :math:`\\|\\nabla f\\|_2`.
      radius: final radius.
      termination: int32 reason code (``GTOL``, ``MAX_ITERATIONS``, ``MIN_RADIUS``,
        ``NONFINITE``; see :data:`TERMINATION_REASONS`).
      converged: bool, ``termination == GTOL``.
      num_accepted: int32, accepted steps.
      num_rejected: int32, rejected steps.
      aux: auxiliary output of ``fun`` at the final parameters (None unless ``has_aux``).
    """

    iterations: Array
    num_fun_evals: Array
    value: Array
    grad_norm: Array
    radius: Array
    termination: Array
    converged: Array
    num_accepted: Array
    num_rejected: Array
    aux: Any


class _Carry(NamedTuple):
    x: Array
    state: TrustRegionState
    grad: Array
    aux: Any
    termination: Array


def minimize(
    fun: Callable[..., Any],
    params: Any,
    *args: Any,
    model: str = "sr1",
    memory_size: int = 5,
    max_iterations: int = 1000,
    gtol: float = 1e-6,
    radius: RadiusConfig = DEFAULT_RADIUS_CONFIG,
    initial_radius: float | None = None,
    min_radius: float | None = None,
    max_radius: float | None = None,
    eta1: float | None = None,
    eta2: float | None = None,
    shrink: float | None = None,
    grow: float | None = None,
    boundary_fraction: float | None = None,
    skip_tol: float = 1e-8,
    has_aux: bool = False,
) -> tuple[Any, TrustRegionState, MinimizeStats]:
    r"""Minimise ``fun(params, *args)`` with the trust-region method, in one jitted while loop.

    Args:
      fun: scalar objective of a pytree of real floating arrays (returns ``(value, aux)`` when
        ``has_aux``). It is a static argument of the jitted loop: pass the same function object
        to reuse the compilation; put data in ``args``.
      params: initial parameters (pytree).
      *args: extra positional arguments of ``fun`` (traced, e.g. data).
      model: ``"sr1"`` (L-SR1 + OBS) or ``"first_order"``.
      memory_size: SR1 pairs kept (default 5).
      max_iterations: iteration budget (default 1000).
      gtol: gradient tolerance, relative: stop when
        ``||g|| <= gtol * max(1, ||g0||)`` (default 1e-6).
      radius: the radius constants (:class:`apts_jax.radius.RadiusConfig`).
      initial_radius, min_radius, max_radius, eta1, eta2, shrink, grow, boundary_fraction:
        convenience keywords replacing single fields of ``radius``.
      skip_tol: SR1 skip-rule tolerance (default 1e-8).
      has_aux: ``fun`` returns ``(value, aux)``; the final ``aux`` is in ``stats.aux``.

    Returns:
      ``(params, state, stats)``: the final parameters, the final
      :class:`apts_jax.tr.TrustRegionState` (usable to continue with
      :func:`apts_jax.trust_region` built with the same constants) and a :class:`MinimizeStats`.
    """
    if not callable(fun):
        raise TypeError(f"fun must be callable, got {type(fun).__name__}.")
    _validate.model(model, memory_size)
    config = _validate.radius_config(
        radius, initial_radius=initial_radius, min_radius=min_radius, max_radius=max_radius,
        eta1=eta1, eta2=eta2, shrink=shrink, grow=grow, boundary_fraction=boundary_fraction,
    )
    max_iterations = _validate.non_negative_int("max_iterations", max_iterations)
    gtol = _validate.gtol(gtol)
    skip_tol = _validate.skip_tol(skip_tol)
    _tree.flat_spec(params)  # raises TypeError on non-floating leaves, naming the leaf
    return _minimize_jit(
        params, args, config, jnp.asarray(max_iterations, jnp.int32), gtol,
        fun=fun, model=model, memory_size=memory_size, skip_tol=skip_tol,
        has_aux=bool(has_aux),
    )


@functools.partial(
    jax.jit, static_argnames=("fun", "model", "memory_size", "skip_tol", "has_aux")
)
def _minimize_jit(
    params: Any,
    args: tuple[Any, ...],
    config: RadiusConfig,
    max_iterations: Array,
    gtol: Array,
    *,
    fun: Callable[..., Any],
    model: str,
    memory_size: int,
    skip_tol: float,
    has_aux: bool,
) -> tuple[Any, TrustRegionState, MinimizeStats]:
    spec = _tree.flat_spec(params)
    dtype = spec.dtype
    vg = jax.value_and_grad(fun, has_aux=has_aux)

    def flat_vg(x: Array) -> Any:
        out, g = vg(_tree.unravel(spec, x), *args)
        return out, _tree.ravel(spec, g)

    def to_dtype(v: Any) -> Array:
        return jax.lax.convert_element_type(jnp.asarray(v), dtype)

    x0 = _tree.ravel(spec, params)
    out0, g0 = flat_vg(x0)
    if has_aux:
        f0, aux0 = out0
    else:
        f0, aux0 = out0, None
    f0 = jnp.asarray(f0)
    if f0.shape != ():
        raise ValueError(
            f"fun must return a scalar, got shape {f0.shape}; reduce it (e.g. jnp.mean)."
        )
    f0 = to_dtype(f0)
    g0 = to_dtype(g0)

    state0 = init_state(spec, model, memory_size, config)
    state0 = state0._replace(
        value=f0,
        grad=_tree.unravel(spec, g0),
        info=state0.info._replace(num_fun_evals=jnp.ones((), jnp.int32)),
    )
    g0_norm = jnp.linalg.norm(g0)
    threshold = to_dtype(gtol) * jnp.maximum(to_dtype(1.0), g0_norm)
    min_radius = to_dtype(config.min_radius)

    finite0 = jnp.isfinite(f0) & jnp.all(jnp.isfinite(g0))
    term0 = jnp.where(
        ~finite0,
        NONFINITE,
        jnp.where(g0_norm <= threshold, GTOL, jnp.where(max_iterations <= 0, MAX_ITERATIONS,
                                                          RUNNING)),
    ).astype(jnp.int32)

    def cond(c: _Carry) -> Array:
        return c.termination == RUNNING

    def body(c: _Carry) -> _Carry:
        res = iteration(
            flat_vg,
            c.x,
            c.state.value,
            c.grad,
            c.state.radius,
            c.state.memory,
            model=model,
            config=config,
            skip_tol=skip_tol,
            has_aux=has_aux,
            aux=c.aux,
        )
        state = next_state(c.state, spec, res)
        g_norm = jnp.linalg.norm(res.grad)
        collapsed = ~res.accepted & (c.state.radius <= min_radius)
        term = jnp.where(
            g_norm <= threshold,
            GTOL,
            jnp.where(
                collapsed,
                MIN_RADIUS,
                jnp.where(state.count >= max_iterations, MAX_ITERATIONS, RUNNING),
            ),
        ).astype(jnp.int32)
        return _Carry(res.params, state, res.grad, res.aux, term)

    carry = jax.lax.while_loop(cond, body, _Carry(x0, state0, g0, aux0, term0))
    state = carry.state
    info = state.info
    stats = MinimizeStats(
        iterations=state.count,
        num_fun_evals=info.num_fun_evals,
        value=state.value,
        grad_norm=jnp.linalg.norm(carry.grad),
        radius=state.radius,
        termination=carry.termination,
        converged=carry.termination == GTOL,
        num_accepted=info.num_accepted,
        num_rejected=info.num_rejected,
        aux=carry.aux,
    )
    return _tree.unravel(spec, carry.x), state, stats
