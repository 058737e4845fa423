r"""Data-parallel APTS: the additively preconditioned trust-region strategy (the paper's Algorithm 1).

Cruz Alegría, Trotti, Kopaničáková & Krause, *Data-Parallel Neural Network Training via Nonlinearly
Preconditioned Trust-Region Method*. ``N`` subdomains each own a data shard :math:`D_i` and a copy of
the parameters. One outer iteration from :math:`\theta_k` with global radius :math:`\Delta_k`:

1. global value and gradient :math:`f(\theta_k; D)`, :math:`g = \nabla f(\theta_k; D)` as the mean of
   the subdomains' local values and gradients (equal shard sizes);
2. every subdomain, in parallel and without communication, runs at most :math:`\nu` trust-region
   iterations on

   .. math:: f_i(\theta) = f(\theta; D_i) + \langle r_i, \theta - \theta_k\rangle, \qquad
             r_i = g - \nabla f(\theta_k; D_i),

   whose first gradient is the global one (eq. 3–4; the consistency term enters the value *and* the
   gradient), from radius :math:`\Delta_k/N`, with every trial kept inside the ball
   :math:`\|\theta - \theta_k\| \le \Delta_k/N` (each local radius is capped by what is left of it),
   and stops early when the accumulated local step :math:`s_i` reaches that boundary. Each
   subdomain keeps its own L-SR1 memory across outer iterations;
3. :math:`\tilde s = \sum_i s_i` (one ``psum``; :math:`\|\tilde s\| \le \Delta_k` by eq. 5) and the
   predicted decrease :math:`\sum_i f_i(\theta_k) - f_i(\theta_k + s_i)`;
4. :math:`\rho = (f(\theta_k) - f(\theta_k + \tilde s)) / \text{predicted}` (eq. 6), guarded:
   :math:`\rho = -\infty` when the predicted decrease is :math:`\le 0` or not finite or the trial is
   not finite. Accept :math:`\tilde\theta = \theta_k + \tilde s` iff :math:`\rho \ge \eta_1`; radius
   eq. 7: :math:`\min(\beta\Delta, \Delta_{\max})` if :math:`\rho > \eta_2`,
   :math:`\max(\alpha\Delta, \Delta_{\min})` if :math:`\rho < \eta_1`, else unchanged;
5. one global trust-region iteration (:func:`apts_jax.trust_region.iteration`, global L-SR1 memory)
   from :math:`\tilde\theta` with :math:`\tilde\Delta` gives :math:`\theta_{k+1}`, :math:`\Delta_{k+1}`.

Every value and gradient is reused: the global and local values and gradients at the point accepted
in step 5 serve step 1 of the next iteration (for full-batch APTS), and the scalar reductions ride
along with the vector ones. An outer iteration therefore performs exactly **three gradient-sized
all-reduces**, whatever :math:`\nu`: the summed local steps, the global gradient at
:math:`\theta_k + \tilde s`, and the global gradient at the trial point of step 5. Per subdomain it
costs :math:`\le \nu + 2` value-and-gradient evaluations on the local shard.

The decisions (acceptance, radii) use reduced, replicated quantities, so all subdomains agree.

Layout. The core, :func:`outer_step`, works on a *block* of ``b`` subdomains held by one program
instance (a leading axis of size ``b`` on everything local), reduces over the block with a plain sum
and across instances with ``lax.psum`` over ``axis_name`` (a mesh axis of :func:`jax.shard_map`, a
``pmap`` axis, or a tuple of them). :func:`apts` is the optax face with ``b = 1`` (one subdomain per
mapped instance); :mod:`apts_jax.parallel` runs ``N`` subdomains on ``D`` devices with ``b = N/D``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import Array

from apts_jax import _tree
from apts_jax import radius as radius_lib
from apts_jax._vma import match_vma, varying_axes
from apts_jax.lsr1 import LSR1Memory
from apts_jax.radius import DEFAULT_RADIUS_CONFIG, RadiusConfig
from apts_jax.trust_region import (
    _split_kwargs,
    _strong,
    init_memory,
    iteration,
    make_config,
    validate_model,
)

__all__ = [
    "APTSInfo",
    "APTSState",
    "OuterResult",
    "apts",
    "outer_step",
    "to_varying",
]

AxisName = Any  # a hashable axis name or a tuple of them

_D = DEFAULT_RADIUS_CONFIG


# ----------------------------------------------------------------------------------------------
# Collectives
# ----------------------------------------------------------------------------------------------


def _axes(axis_name: AxisName) -> tuple[Any, ...]:
    return tuple(axis_name) if isinstance(axis_name, tuple | list) else (axis_name,)


def _manual_axes() -> frozenset[Any]:
    """Mesh axes that are manual (inside ``shard_map``) at trace time."""
    try:
        mesh = jax.sharding.get_abstract_mesh()
        return frozenset(getattr(mesh, "manual_axes", ()) or ())
    except Exception:  # pragma: no cover - very old/new JAX without abstract meshes
        return frozenset()


def _vma_checked_axes(axis_name: AxisName | None) -> frozenset[Any]:
    """Axes of ``axis_name`` whose values carry varying types (``shard_map`` with ``check_vma=True``).

    ``pmap`` (which runs as a ``shard_map`` with ``check_vma=False``) and ``shard_map(...,
    check_vma=False)`` bind manual mesh axes too, but nothing is typed varying there; the
    ``axis_index`` of an axis is varying exactly when the check is on.
    """
    if axis_name is None:
        return frozenset()
    manual = _manual_axes()
    return frozenset(
        a for a in _axes(axis_name)
        if a in manual and a in varying_axes(jax.lax.axis_index(a))
    )


def to_varying(tree: Any, axis_name: AxisName) -> Any:
    """Mark replicated values as device-varying over the manual mesh axes of ``axis_name``.

    Inside ``jax.shard_map`` with ``check_vma=True``, ``jax.grad`` with respect to a *replicated*
    input returns the sum over devices of the local gradients (the transpose of the implicit
    broadcast is a ``psum``). Local computations therefore start from ``lax.pcast(x, axis,
    to="varying")``; loop carries that start from replicated values need it too. Axes that are not
    manual mesh axes (``vmap``/``pmap`` names, or ``check_vma=False``) are left alone.
    """
    manual = _manual_axes()
    axes = tuple(a for a in _axes(axis_name) if a in manual)
    if not axes:
        return tree

    def cast(x: Any) -> Any:
        if not isinstance(x, jax.Array | jax.core.Tracer):
            return x
        missing = tuple(a for a in axes if a not in varying_axes(x))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def _all_sum(x: Array, axis_name: AxisName | None) -> Array:
    """Sum over the local block (leading axis) and across program instances."""
    x = jnp.sum(x, axis=0)
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _num_instances(axis_name: AxisName | None) -> int:
    if axis_name is None:
        return 1
    size = 1
    for a in _axes(axis_name):
        size *= int(jax.lax.axis_size(a))
    return size


# ----------------------------------------------------------------------------------------------
# The local phase (one subdomain, no communication)
# ----------------------------------------------------------------------------------------------


class LocalResult(NamedTuple):
    step: Array  # s_i = theta_i - theta_k, ||s_i|| <= cap
    decrease: Array  # f_i(theta_k) - f_i(theta_k + s_i)
    memory: LSR1Memory | None
    iterations: Array  # local TR iterations run (int32)
    accepted: Array  # local steps accepted (int32)


def local_phase(
    local_value_and_grad: Callable[[Array], tuple[Array, Array]],
    theta: Array,
    local_value: Array,
    local_grad: Array,
    global_grad: Array,
    cap: Array,
    memory: LSR1Memory | None,
    *,
    local_steps: int,
    model: str,
    config: RadiusConfig,
    skip_tol: float,
) -> LocalResult:
    r"""At most ``local_steps`` trust-region iterations on :math:`f_i` inside the ball of radius ``cap``.

    :math:`f_i(x) = f(x; D_i) + \langle r_i, x - \theta_k\rangle`, :math:`\nabla f_i = \nabla f(x;
    D_i) + r_i`, :math:`r_i = g - \nabla f(\theta_k; D_i)`. The iteration ``j`` uses the radius
    :math:`\min(\Delta_{i,j}, \text{cap} - \|x_j - \theta_k\|)`, so :math:`\|s_i\| \le` ``cap``
    holds by the triangle inequality; the local radius starts at ``cap`` and never exceeds it.
    """
    r = global_grad - local_grad

    def value_and_grad(x: Array) -> tuple[Array, Array]:
        v, g = local_value_and_grad(x)
        return v + jnp.vdot(r, x - theta), g + r

    local_config = config._replace(
        max_radius=cap, min_radius=jnp.minimum(config.min_radius, cap)
    )
    stop_at = (1.0 - 1e-3) * cap

    class Carry(NamedTuple):
        x: Array
        value: Array
        grad: Array
        radius: Array
        memory: Any
        j: Array
        accepted: Array
        done: Array

    def cond(c: Carry) -> Array:
        return (c.j < local_steps) & ~c.done

    def body(c: Carry) -> Carry:
        left = cap - jnp.linalg.norm(c.x - theta)
        res = iteration(
            value_and_grad,
            c.x,
            c.value,
            c.grad,
            jnp.maximum(jnp.minimum(c.radius, left), 0.0),
            c.memory,
            model=model,
            config=local_config,
            skip_tol=skip_tol,
        )
        reached = jnp.linalg.norm(res.params - theta) >= stop_at
        return Carry(
            res.params,
            res.value,
            res.grad,
            jnp.minimum(res.radius, cap),
            res.memory,
            c.j + 1,
            c.accepted + res.accepted.astype(jnp.int32),
            reached,
        )

    init = Carry(
        theta,
        local_value,
        local_grad + r,
        cap,
        memory,
        jnp.zeros((), jnp.int32),
        jnp.zeros((), jnp.int32),
        jnp.zeros((), bool),
    )
    # Every carry varies like the local data (check_vma: loop carries keep their type).
    init = match_vma(init, local_grad, local_value)
    out = jax.lax.while_loop(cond, body, init)
    return LocalResult(
        step=out.x - theta,
        decrease=local_value - out.value,
        memory=out.memory,
        iterations=out.j,
        accepted=out.accepted,
    )


# ----------------------------------------------------------------------------------------------
# One outer iteration on a block of subdomains
# ----------------------------------------------------------------------------------------------


class OuterResult(NamedTuple):
    """Outcome of one APTS outer iteration (flat vectors; ``b`` = local block size).

    Attributes:
      params: :math:`\\theta_{k+1}` (replicated).
      value, grad: global :math:`f`, :math:`\\nabla f` at ``params`` (replicated).
      local_value, local_grad: ``(b,)``, ``(b, n)`` local values/gradients at ``params``.
      radius: :math:`\\Delta_{k+1}`.
      local_memory: per-subdomain L-SR1 memories (leading axis ``b``) or None.
      global_memory: the global L-SR1 memory or None.
      ratio: APTS ratio :math:`\\rho_k` (eq. 6), ``-inf`` for a guarded rejection.
      accepted: the APTS step :math:`\\tilde s` was accepted.
      predicted_decrease: :math:`\\sum_i f_i(\\theta_k) - f_i(\\theta_k + s_i)`.
      actual_decrease: :math:`f(\\theta_k) - f(\\theta_k + \\tilde s)`.
      step_norm: :math:`\\|\\tilde s\\|`.
      global_ratio, global_accepted: of the global TR iteration (step 5).
      local_iterations: ``(b,)`` local TR iterations per subdomain.
      local_accepted: ``(b,)`` accepted local steps per subdomain.
      evaluations: ``(b,)`` value-and-gradient evaluations per subdomain in this iteration.
    """

    params: Array
    value: Array
    grad: Array
    local_value: Array
    local_grad: Array
    radius: Array
    local_memory: Any
    global_memory: Any
    ratio: Array
    accepted: Array
    predicted_decrease: Array
    actual_decrease: Array
    step_norm: Array
    global_ratio: Array
    global_accepted: Array
    local_iterations: Array
    local_accepted: Array
    evaluations: Array


def outer_step(
    shard_value_and_grad: Callable[[Array, Any], tuple[Array, Array]],
    data_block: Any,
    params: Array,
    value: Array,
    grad: Array,
    local_value: Array,
    local_grad: Array,
    radius: Array,
    local_memory: Any,
    global_memory: Any,
    *,
    axis_name: AxisName | None,
    num_subdomains: int,
    local_steps: int = 5,
    model: str = "sr1",
    config: RadiusConfig = DEFAULT_RADIUS_CONFIG,
    skip_tol: float = 1e-8,
) -> OuterResult:
    """One APTS outer iteration (Algorithm 1, steps 2–5) for a block of ``b`` subdomains.

    Args:
      shard_value_and_grad: ``(x, shard) -> (value, grad)``: the local loss of one subdomain and
        its gradient at the flat point ``x`` (scalar and ``(n,)``, dtype of ``x``). It is called
        with ``x`` already varying over the manual axes of ``axis_name`` (see :func:`to_varying`),
        once per subdomain and evaluation: a block of ``b`` subdomains costs ``b`` evaluations.
      data_block: pytree whose leaves have a leading axis ``b``, the shards of this instance's
        subdomains (``shard`` is one slice of it); None when ``b = 1`` and the function needs no
        data argument (then ``shard`` is None).
      params: :math:`\\theta_k`, shape ``(n,)``, replicated.
      value, grad: global :math:`f(\\theta_k)`, :math:`\\nabla f(\\theta_k)` (replicated).
      local_value, local_grad: ``(b,)`` and ``(b, n)`` local values/gradients at :math:`\\theta_k`.
      radius: :math:`\\Delta_k`.
      local_memory: L-SR1 memories with leading axis ``b`` (None for the first-order model).
      global_memory: the global L-SR1 memory (None for the first-order model).
      axis_name: the named axis (or tuple) across program instances; None for a single instance.
      num_subdomains: ``N`` = ``b`` times the number of program instances.
      local_steps: :math:`\\nu`.
      model: ``"sr1"`` or ``"first_order"`` (local and global).
      config: radius constants (:class:`apts_jax.radius.RadiusConfig`).
      skip_tol: SR1 skip-rule tolerance.
    """
    n_sub = float(num_subdomains)
    cap = radius / n_sub
    b = local_value.shape[0]
    if data_block is None and b != 1:
        raise ValueError(f"outer_step: data_block is None but the block has {b} subdomains.")

    def shard(i: int) -> Any:
        return None if data_block is None else jax.tree.map(lambda a: a[i], data_block)

    def block_value_and_grad(x: Array) -> tuple[Array, Array]:
        """Values ``(b,)`` and gradients ``(b, n)`` of the block's subdomains at a common ``x``."""
        xv = to_varying(x, axis_name)  # outside vmap: pcast cannot be batched over a vmap axis
        if b == 1:
            v, g = shard_value_and_grad(xv, shard(0))
            return v[None], g[None]
        return jax.vmap(lambda sh: shard_value_and_grad(xv, sh))(data_block)

    # Step 2: local phases, vmapped over the block (no communication).
    def one_local(lv: Array, lg: Array, mem: Any, sh: Any) -> LocalResult:
        return local_phase(
            lambda x: shard_value_and_grad(x, sh), params, lv, lg, grad, cap, mem,
            local_steps=local_steps, model=model, config=config, skip_tol=skip_tol,
        )

    if b == 1:
        mem0 = None if local_memory is None else jax.tree.map(lambda a: a[0], local_memory)
        loc = one_local(local_value[0], local_grad[0], mem0, shard(0))
        loc = jax.tree.map(lambda a: a[None], loc)
    else:
        loc = jax.vmap(one_local)(local_value, local_grad, local_memory, data_block)

    # Step 3: s~ = sum_i s_i and the predicted decrease, in one all-reduce.
    packed = jnp.concatenate([loc.step, loc.decrease[:, None].astype(loc.step.dtype)], axis=1)
    summed = _all_sum(packed, axis_name)
    step, predicted = summed[:-1], summed[-1]
    step_norm = jnp.linalg.norm(step)

    # Step 4: f(theta_k + s~) (with its gradient, reused if accepted) in one all-reduce.
    trial = params + step
    t_vals, t_grads = block_value_and_grad(trial)
    packed = jnp.concatenate([t_grads, t_vals[:, None].astype(t_grads.dtype)], axis=1)
    t_mean = _all_sum(packed, axis_name) / n_sub
    t_grad, t_value = t_mean[:-1], t_mean[-1]
    finite = jnp.isfinite(t_value) & jnp.all(jnp.isfinite(t_grad))
    actual = value - t_value
    rho = radius_lib.ratio(actual, predicted)
    rho = jnp.where(finite, rho, -jnp.inf).astype(params.dtype)
    accepted = rho >= config.eta1
    # eq. 7 grows on rho > eta2 alone: pass the radius as the step norm (the boundary test holds).
    radius_tilde = radius_lib.update_radius(radius, rho, radius, config)

    sel = lambda a, b_: jnp.where(accepted, a, b_)  # noqa: E731
    theta_t = sel(trial, params)
    value_t, grad_t = sel(t_value, value), sel(t_grad, grad)
    lval_t, lgrad_t = sel(t_vals, local_value), sel(t_grads, local_grad)

    # Step 5: one global TR iteration; the local values/gradients ride along as aux.
    def global_vg(x: Array) -> tuple[tuple[Array, tuple[Array, Array]], Array]:
        vals, grads = block_value_and_grad(x)
        packed = jnp.concatenate([grads, vals[:, None].astype(grads.dtype)], axis=1)
        mean = _all_sum(packed, axis_name) / n_sub
        return (mean[-1], (vals, grads)), mean[:-1]

    res = iteration(
        global_vg, theta_t, value_t, grad_t, radius_tilde, global_memory,
        model=model, config=config, skip_tol=skip_tol, has_aux=True, aux=(lval_t, lgrad_t),
    )
    new_lval, new_lgrad = res.aux
    return OuterResult(
        params=res.params,
        value=res.value,
        grad=res.grad,
        local_value=new_lval,
        local_grad=new_lgrad,
        radius=res.radius,
        local_memory=loc.memory,
        global_memory=res.memory,
        ratio=rho,
        accepted=accepted,
        predicted_decrease=predicted,
        actual_decrease=actual,
        step_norm=step_norm,
        global_ratio=res.ratio,
        global_accepted=res.accepted,
        local_iterations=loc.iterations,
        local_accepted=loc.accepted,
        evaluations=loc.iterations + 2,
    )


# ----------------------------------------------------------------------------------------------
# The optax face
# ----------------------------------------------------------------------------------------------


class APTSInfo(NamedTuple):
    """Diagnostics (replicated unless noted; counters cumulative since ``init``).

    Attributes:
      ratio: APTS ratio :math:`\\rho` of the last outer iteration (eq. 6).
      accepted: the last APTS step :math:`\\tilde s` was accepted.
      num_accepted, num_rejected: APTS steps accepted/rejected so far.
      global_ratio: ratio of the last global TR iteration (step 5).
      num_global_accepted: global TR steps accepted so far.
      radius: :math:`\\Delta` after the last iteration.
      step_norm: :math:`\\|\\tilde s\\|` of the last iteration.
      predicted_decrease, actual_decrease: of the last APTS step.
      local_iterations: local TR iterations of this subdomain in the last outer iteration.
      num_fun_evals: value-and-gradient evaluations of this subdomain so far.
    """

    ratio: Array
    accepted: Array
    num_accepted: Array
    num_rejected: Array
    global_ratio: Array
    num_global_accepted: Array
    radius: Array
    step_norm: Array
    predicted_decrease: Array
    actual_decrease: Array
    local_iterations: Array
    num_fun_evals: Array


class APTSState(NamedTuple):
    """State of :func:`apts`.

    Attributes:
      count: outer iterations done (int32).
      value: this subdomain's local value :math:`f(\\theta; D_i)` at the current params.
      grad: this subdomain's local gradient at the current params (pytree like params).
      global_value: :math:`f(\\theta; D)` at the current params.
      global_grad: :math:`\\nabla f(\\theta; D)` (flat vector).
      radius: the global radius :math:`\\Delta`.
      local_memory: this subdomain's L-SR1 memory (None for the first-order model).
      global_memory: the global L-SR1 memory (None for the first-order model).
      info: :class:`APTSInfo`.
    """

    count: Array
    value: Array
    grad: Any
    global_value: Array
    global_grad: Array
    radius: Array
    local_memory: Any
    global_memory: Any
    info: APTSInfo


def _check_local_steps(local_steps: Any) -> int:
    if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
        raise ValueError(
            f"local_steps (nu) must be an integer >= 1, got {local_steps!r}; the paper uses 5."
        )
    return local_steps


def _check_axis_bound(axis_name: AxisName) -> None:
    for a in _axes(axis_name):
        try:
            jax.lax.axis_size(a)
        except (NameError, ValueError, KeyError) as err:
            raise ValueError(
                f"apts: axis name {a!r} is not bound here. Call the update inside a function "
                "mapped over subdomains with that axis name: jax.shard_map over a mesh axis "
                f"{a!r}, jax.vmap(..., axis_name={a!r}) or jax.pmap(..., axis_name={a!r}) "
                "(or use apts_jax.parallel.solve / make_apts, which set it up for you)."
            ) from err


def apts(
    axis_name: AxisName,
    local_steps: int = 5,
    model: str = "sr1",
    memory_size: int = 5,
    *,
    initial_radius: float = _D.initial_radius,
    min_radius: float = _D.min_radius,
    max_radius: float = _D.max_radius,
    eta1: float = _D.eta1,
    eta2: float = _D.eta2,
    shrink: float = _D.shrink,
    grow: float = _D.grow,
    boundary_fraction: float = _D.boundary_fraction,
    skip_tol: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    r"""APTS (the paper's Algorithm 1) as an optax transformation, one subdomain per mapped instance.

    Call ``update`` inside a function mapped over the subdomains with ``axis_name`` bound
    (``jax.shard_map`` over a mesh axis, ``jax.pmap``, or ``jax.vmap(..., axis_name=...)``; a tuple
    of names spreads subdomains over several axes), each instance passing its *local* quantities:
    ``update(updates, state, params, *, value, grad, value_fn, **extra_args)`` with ``value``,
    ``grad`` the local loss and gradient at ``params`` on this subdomain's shard and
    ``value_fn(params, **kw)`` the local loss (it receives the ``extra_args`` its signature names).
    ``params`` must be replicated (identical on every instance). The returned updates are
    :math:`\theta_{k+1} - \theta_k`, identical on every instance.

    ``value`` and ``grad`` are read at the first update only; afterwards the state's local value and
    gradient (computed at the accepted points) are used, so three gradient-sized all-reduces per
    update remain (plus one at the first). For minibatch training (SAPTS), where the data changes
    between updates, use ``fresh_step`` of :func:`apts_jax.parallel.make_apts` (or pass
    ``fresh_data=True`` as an extra argument to make the update re-reduce the given local
    ``value``/``grad``).

    Inside ``jax.shard_map`` with ``check_vma=True``, compute the local ``grad`` from a varying copy
    of the parameters (:func:`to_varying`) — ``jax.grad`` of a replicated input returns the *sum*
    over devices. A replicated ``grad`` is rejected with an error saying so. Collectives over a
    ``vmap`` axis name inside ``shard_map`` require ``check_vma=False`` (a JAX limitation); the
    layout helpers in :mod:`apts_jax.parallel` avoid them by reducing blocks of subdomains locally.

    Args:
      axis_name: the axis (or tuple of axes) that enumerates the subdomains.
      local_steps: :math:`\nu`, maximum local TR iterations per outer iteration (default 5).
      model: ``"sr1"`` (L-SR1/OBS, local and global) or ``"first_order"``.
      memory_size: L-SR1 pairs kept, locally and globally (default 5).
      initial_radius, min_radius, max_radius, eta1, eta2, shrink, grow, boundary_fraction:
        radius constants (:class:`apts_jax.radius.RadiusConfig`), used globally and locally.
      skip_tol: SR1 skip-rule tolerance.
    """
    _check_local_steps(local_steps)
    validate_model(model, memory_size)
    config = make_config(
        initial_radius, min_radius, max_radius, eta1, eta2, shrink, grow, boundary_fraction
    )

    def init_fn(params: Any) -> APTSState:
        spec = _tree.flat_spec(params)
        dtype = spec.dtype
        n = spec.size
        inf = _strong(jnp.asarray(jnp.inf, dtype))
        zero = _strong(jnp.zeros((), dtype))
        info = APTSInfo(
            ratio=zero,
            accepted=jnp.zeros((), bool),
            num_accepted=jnp.zeros((), jnp.int32),
            num_rejected=jnp.zeros((), jnp.int32),
            global_ratio=zero,
            num_global_accepted=jnp.zeros((), jnp.int32),
            radius=_strong(jnp.asarray(config.initial_radius, dtype)),
            step_norm=zero,
            predicted_decrease=zero,
            actual_decrease=zero,
            local_iterations=jnp.zeros((), jnp.int32),
            num_fun_evals=jnp.zeros((), jnp.int32),
        )
        return APTSState(
            count=jnp.zeros((), jnp.int32),
            value=inf,
            grad=_tree.zeros(spec),
            global_value=inf,
            global_grad=jnp.zeros((n,), dtype),
            radius=_strong(jnp.asarray(config.initial_radius, dtype)),
            local_memory=init_memory(model, n, memory_size, dtype),
            global_memory=init_memory(model, n, memory_size, dtype),
            info=info,
        )

    def update_fn(
        updates: Any,
        state: APTSState,
        params: Any = None,
        *,
        value: Any = None,
        grad: Any = None,
        value_fn: Callable[..., Any] | None = None,
        fresh_data: bool = False,
        **extra_args: Any,
    ) -> tuple[Any, APTSState]:
        if params is None:
            raise ValueError("apts: update needs params (the current parameters).")
        if value_fn is None:
            raise TypeError(
                "apts: update needs value_fn=... (the local loss of this subdomain as a function "
                "of the parameters), as optax's line-search transformations do."
            )
        if not isinstance(state, APTSState):
            raise TypeError(f"apts: state must be an APTSState from init, got {type(state)}.")
        _check_axis_bound(axis_name)
        spec = _tree.flat_spec(params)
        _tree.check_same_structure(spec, updates, "updates")
        fn_kwargs, _ = _split_kwargs(value_fn, extra_args)
        n_inst = _num_instances(axis_name)
        x = _tree.ravel(spec, params)

        def shard_vg(z: Array, _: Any = None) -> tuple[Array, Array]:
            v, g = jax.value_and_grad(
                lambda flat: value_fn(_tree.unravel(spec, flat), **fn_kwargs)
            )(z)
            return jnp.asarray(v, x.dtype), g.astype(x.dtype)

        if value is None or grad is None:
            def given() -> tuple[Array, Array]:
                return shard_vg(to_varying(x, axis_name))
        else:
            _tree.check_same_structure(spec, grad, "grad")
            g_flat = _tree.ravel(spec, grad)
            checked = _vma_checked_axes(axis_name)
            if checked and not (varying_axes(g_flat) & checked):
                raise ValueError(
                    "apts: grad is replicated across the subdomain axis "
                    f"{axis_name!r}; inside jax.shard_map, jax.grad of replicated params returns "
                    "the SUM of the local gradients. Differentiate a varying copy instead: "
                    "apts_jax.to_varying(params, axis_name) before jax.value_and_grad."
                )

            def given() -> tuple[Array, Array]:
                return jnp.asarray(value, x.dtype), g_flat

        def fresh() -> tuple[Array, Array, Array, Array]:
            lv, lg = given()
            packed = jnp.concatenate([lg, lv[None]])
            mean = jax.lax.psum(packed, axis_name) / n_inst
            return lv, lg, mean[-1], mean[:-1]

        def stored() -> tuple[Array, Array, Array, Array]:
            lv = to_varying(state.value, axis_name)
            lg = to_varying(_tree.ravel(spec, state.grad), axis_name)
            return lv, lg, state.global_value, state.global_grad

        if fresh_data:
            lv, lg, gv, gg = fresh()
        else:
            lv, lg, gv, gg = jax.lax.cond(state.count == 0, fresh, stored)

        local_memory = (
            None if state.local_memory is None
            else jax.tree.map(lambda a: a[None], to_varying(state.local_memory, axis_name))
        )
        out = outer_step(
            shard_vg, None, x, gv, gg, lv[None], lg[None], state.radius, local_memory,
            state.global_memory,
            axis_name=axis_name, num_subdomains=n_inst, local_steps=local_steps, model=model,
            config=config, skip_tol=skip_tol,
        )
        new_x = out.params
        info = APTSInfo(
            ratio=out.ratio,
            accepted=out.accepted,
            num_accepted=state.info.num_accepted + out.accepted.astype(jnp.int32),
            num_rejected=state.info.num_rejected + (~out.accepted).astype(jnp.int32),
            global_ratio=out.global_ratio,
            num_global_accepted=state.info.num_global_accepted
            + out.global_accepted.astype(jnp.int32),
            radius=out.radius,
            step_norm=out.step_norm,
            predicted_decrease=out.predicted_decrease,
            actual_decrease=out.actual_decrease,
            local_iterations=out.local_iterations[0],
            num_fun_evals=state.info.num_fun_evals + out.evaluations[0],
        )
        new_state = APTSState(
            count=state.count + 1,
            value=out.local_value[0],
            grad=_tree.unravel(spec, out.local_grad[0]),
            global_value=out.value,
            global_grad=out.grad,
            radius=out.radius,
            local_memory=None if out.local_memory is None
            else jax.tree.map(lambda a: a[0], out.local_memory),
            global_memory=out.global_memory,
            info=info,
        )
        return _tree.unravel(spec, new_x - x), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

