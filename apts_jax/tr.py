r"""Trust-region optimizer with an L-SR1 (OBS) or first-order model, as an optax transformation.

This is the trust-region (TR) method of the APTS paper (Cruz Alegría, Trotti, Kopaničáková,
Krause, *Data-Parallel Neural Network Training via Nonlinearly Preconditioned Trust-Region
Method*), which APTS uses both as its global method and as its local (subdomain) solver.

One iteration, from :math:`x_k` with :math:`f_k = f(x_k)`, :math:`g_k = \nabla f(x_k)`, radius
:math:`\Delta_k` and an L-SR1 memory:

1. *Model step* (:mod:`apts_jax.tr_model`): :math:`s_k \approx \arg\min_{\|s\| \le \Delta_k}
   m_k(s)` with :math:`m_k(s) = f_k + g_k^\top s + \tfrac12 s^\top B_k s`, where :math:`B_k` is the
   compact L-SR1 matrix and the subproblem is solved globally by OBS (Brust, Erway & Marcia,
   *On solving L-SR1 trust-region subproblems*, Comput. Optim. Appl. 66, 2017); or, for
   ``model="first_order"``, :math:`B_k = 0` and :math:`s_k = -\Delta_k g_k/\|g_k\|`.
2. *Trial*: :math:`f(x_k + s_k)`, :math:`\nabla f(x_k + s_k)` (one ``value_and_grad`` call).
3. *Ratio* (:mod:`apts_jax.radius`): :math:`\rho_k = (f_k - f(x_k+s_k)) / (m_k(0) - m_k(s_k))`,
   :math:`-\infty` when the predicted decrease is :math:`\le 0` or non-finite, or the trial value
   or gradient is not finite.
4. *Accept* iff :math:`\rho_k \ge \eta_1`: :math:`x_{k+1} = x_k + s_k`, else :math:`x_{k+1} = x_k`.
5. *Radius*: shrink :math:`\alpha\Delta_k` iff :math:`\rho_k < \eta_1`; grow :math:`\beta\Delta_k`
   iff :math:`\rho_k > \eta_2` and :math:`\|s_k\| \ge c_b \Delta_k`; clipped to
   :math:`[\Delta_{\min}, \Delta_{\max}]`.
6. *SR1 pair* at the trial point, :math:`s_k` and :math:`y_k = \nabla f(x_k + s_k) - g_k`, offered
   to the memory whether the step is accepted or not (Nocedal & Wright, *Numerical Optimization*,
   2nd ed., Alg. 6.2; ch. 4 for the trust-region framework); :func:`apts_jax.lsr1.update` applies
   the SR1 skip rule :math:`|s^\top(y - Bs)| \ge r \|s\| \|y - Bs\|`. A pair with a non-finite
   entry, or a zero step, never enters the memory; a NaN/Inf trial leaves :math:`x`, :math:`f`,
   :math:`g` and the memory untouched and shrinks the radius.

:func:`iteration` is the pure flat-vector iteration (reused by APTS); :func:`trust_region` wraps
it as an :class:`optax.GradientTransformationExtraArgs` following the optax line-search contract.
The factory is also ``apts_jax.trust_region``; this module was ``apts_jax.trust_region`` before
(``from apts_jax.trust_region import ...`` still works through an alias).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import Array

from apts_jax import _tree, _validate, ellipsoid, lsr1
from apts_jax import radius as radius_lib
from apts_jax._tree import cast_like as _cast_like
from apts_jax._tree import strong as _strong
from apts_jax.lsr1 import LSR1Memory
from apts_jax.radius import DEFAULT_RADIUS_CONFIG, RadiusConfig
from apts_jax.tr_model import compute_step

__all__ = [
    "IterationResult",
    "TrustRegionInfo",
    "TrustRegionState",
    "init_memory",
    "init_state",
    "iteration",
    "next_state",
    "offer_pair",
    "trust_region",
]


def init_memory(
    model: str, n: int, memory_size: int, dtype: Any, norm: str = "l2"
) -> LSR1Memory | ellipsoid.Pairs | None:
    """An empty L-SR1 memory for ``model="sr1"`` (None for ``"first_order"``), strong types.

    For ``norm="adaptive"`` (the ellipsoidal trust region) the pairs are kept in the original
    variables, :class:`apts_jax.ellipsoid.Pairs`, and mapped with the current scaling at each
    solve (see :func:`iteration`).
    """
    if model != "sr1":
        return None
    if norm == "adaptive":
        memory = ellipsoid.init_pairs(n, memory_size, dtype=dtype)
    else:
        memory = lsr1.init(n, memory_size, dtype=dtype)
    return jax.tree.map(_strong, memory)


# ----------------------------------------------------------------------------------------------
# The pure flat-vector iteration
# ----------------------------------------------------------------------------------------------


class IterationResult(NamedTuple):
    """Outcome of one trust-region iteration on flat vectors (see :func:`iteration`).

    Attributes:
      params: :math:`x_{k+1}` (the trial point if accepted, else :math:`x_k`).
      value: :math:`f(x_{k+1})`.
      grad: :math:`\\nabla f(x_{k+1})`.
      radius: :math:`\\Delta_{k+1}`.
      memory: the L-SR1 memory after offering the pair (None for the first-order model).
      aux: auxiliary output of the objective at :math:`x_{k+1}` (None unless ``has_aux``).
      update: :math:`x_{k+1} - x_k`, i.e. the trial step or zeros.
      accepted: bool, :math:`\\rho_k \\ge \\eta_1`.
      ratio: :math:`\\rho_k` (``-inf`` for a guarded rejection, never NaN).
      actual_decrease: :math:`f(x_k) - f(x_k + s_k)` (may be NaN/Inf for a bad trial).
      predicted_decrease: :math:`m_k(0) - m_k(s_k)`.
      step_norm: :math:`\\|s_k\\|` of the trial step.
      trial_finite: bool, the trial value and gradient are finite.
      pair_stored: bool, the pair :math:`(s_k, y_k)` entered the memory.
      model_case: int32 case code of the model step (:mod:`apts_jax.tr_model`).
    """

    params: Array
    value: Array
    grad: Array
    radius: Array
    memory: LSR1Memory | None
    aux: Any
    update: Array
    accepted: Array
    ratio: Array
    actual_decrease: Array
    predicted_decrease: Array
    step_norm: Array
    trial_finite: Array
    pair_stored: Array
    model_case: Array


def offer_pair(
    memory: LSR1Memory | ellipsoid.Pairs,
    s: Array,
    y: Array,
    *,
    valid: Array | bool = True,
    d_half: Array | None = None,
    scaled: LSR1Memory | None = None,
    skip_tol: float = 1e-8,
) -> tuple[LSR1Memory | ellipsoid.Pairs, Array]:
    r"""Offer the secant pair :math:`(s, y)` to an L-SR1 memory (pure; straight-line code).

    The pair is stored iff ``valid``, :math:`s \ne 0`, :math:`s` and :math:`y` are finite and the
    SR1 skip rule of :func:`apts_jax.lsr1.update` passes (with ``d_half``: on the scaled pair
    :math:`(D^{1/2}s, D^{-1/2}y)`, :func:`apts_jax.ellipsoid.update_pairs`, ``memory`` an
    :class:`apts_jax.ellipsoid.Pairs` and ``scaled`` its scaled memory if already formed).
    Otherwise ``memory`` comes back unchanged.

    Returns:
      ``(memory, stored)``, the memory in the dtypes of ``memory`` and a bool.
    """
    offer = jnp.asarray(valid, bool) & jnp.all(jnp.isfinite(s)) & jnp.all(jnp.isfinite(y))
    # Feed zeros instead of non-finite entries so that no NaN is even computed with. A zero step
    # is never stored (lsr1.update skips s = 0 and returns the memory unchanged), so no second
    # select over the (n, m) buffers is needed.
    s_in = jnp.where(offer, s, jnp.zeros_like(s))
    y_in = jnp.where(offer, y, jnp.zeros_like(y))
    if d_half is None:
        candidate, stored = lsr1.update(memory, s_in, y_in, skip_tol=skip_tol)
    else:
        candidate, stored = ellipsoid.update_pairs(
            memory, s_in, y_in, d_half, scaled=scaled, skip_tol=skip_tol
        )
    return jax.tree.map(_cast_like, candidate, memory), offer & jnp.asarray(stored, bool)


def iteration(
    value_and_grad_fn: Callable[[Array], Any],
    params: Array,
    value: Array,
    grad: Array,
    radius: Array,
    memory: LSR1Memory | ellipsoid.Pairs | None,
    *,
    model: str = "sr1",
    config: RadiusConfig = DEFAULT_RADIUS_CONFIG,
    skip_tol: float = 1e-8,
    has_aux: bool = False,
    aux: Any = None,
    d_half: Array | None = None,
    store_pair: bool = True,
) -> IterationResult:
    r"""One trust-region iteration on flat vectors (pure, jit/vmap friendly).

    Args:
      value_and_grad_fn: ``x -> (f(x), ∇f(x))`` on flat vectors, or
        ``x -> ((f(x), aux), ∇f(x))`` when ``has_aux`` (the convention of
        :func:`jax.value_and_grad`). Called exactly once, at the trial point.
      params: :math:`x_k`, shape ``(n,)``, real floating.
      value: :math:`f(x_k)` (cast to ``params.dtype``).
      grad: :math:`\nabla f(x_k)`, shape ``(n,)``.
      radius: :math:`\Delta_k > 0`.
      memory: L-SR1 memory for ``model="sr1"``; ignored (may be None) for ``"first_order"``.
      model: ``"sr1"`` or ``"first_order"`` (static).
      config: radius constants (Python floats or arrays).
      skip_tol: the SR1 skip-rule tolerance :math:`r` passed to :func:`apts_jax.lsr1.update`.
      has_aux: whether ``value_and_grad_fn`` returns auxiliary data.
      aux: auxiliary data at :math:`x_k` (kept when the step is rejected).
      d_half: None for the L2 trust region :math:`\|s\| \le \Delta`; else :math:`D^{1/2}`,
        shape ``(n,)``, positive, for the ellipsoid :math:`\|D^{1/2}s\| \le \Delta`
        (:mod:`apts_jax.ellipsoid`: OBS in the scaled variables, ``memory`` an
        :class:`apts_jax.ellipsoid.Pairs`, the skip rule on the scaled pair). ``step_norm`` and
        the radius are then in the scaled norm.
      store_pair: offer the pair of this iteration to ``memory`` (step 6; default True). False
        returns ``memory`` unchanged (``pair_stored`` False), for a caller that forms its pairs
        otherwise (APTS with ``curvature_pairs="multi_batch"``).

    Returns:
      An :class:`IterationResult`; see the module docstring for the math.
    """
    params = jnp.asarray(params)
    dtype = params.dtype
    value = _cast_like(value, params)
    grad = _cast_like(grad, params)
    radius = _cast_like(radius, params)
    if model == "first_order":
        memory = None

    scaled = None
    if d_half is None:
        if isinstance(memory, ellipsoid.Pairs):
            raise TypeError(
                "iteration: memory is apts_jax.ellipsoid.Pairs (the ellipsoidal norm's unscaled "
                "pairs) but d_half is None; pass d_half=D^{1/2}, or use an L2 memory "
                "(tr.init_memory(..., norm='l2'))."
            )
        ms = compute_step(model, grad, memory, radius)
    else:
        d_half = _cast_like(d_half, params)
        if memory is not None:
            if not isinstance(memory, ellipsoid.Pairs):
                raise TypeError(
                    "iteration: with d_half (the ellipsoidal norm) the memory must be "
                    "apts_jax.ellipsoid.Pairs (tr.init_memory(..., norm='adaptive')), got "
                    f"{type(memory).__name__}."
                )
            scaled = ellipsoid.scaled_memory(memory, d_half)
        ms = ellipsoid.model_step(model, grad, scaled, radius, d_half)
    trial = params + ms.step
    if has_aux:
        (trial_value, trial_aux), trial_grad = value_and_grad_fn(trial)
    else:
        trial_value, trial_grad = value_and_grad_fn(trial)
        trial_aux = None
    trial_value = jnp.asarray(trial_value)
    if trial_value.shape != ():
        raise ValueError(
            f"the objective must return a scalar, got shape {trial_value.shape}; reduce it "
            "(e.g. jnp.mean) before returning."
        )
    trial_value = _cast_like(trial_value, params)
    trial_grad = _cast_like(trial_grad, params)
    if trial_grad.shape != params.shape:
        raise ValueError(
            f"value_and_grad_fn returned a gradient of shape {trial_grad.shape}, expected "
            f"{params.shape}."
        )

    trial_finite = jnp.isfinite(trial_value) & jnp.all(jnp.isfinite(trial_grad))
    actual = value - trial_value
    rho = radius_lib.ratio(actual, ms.predicted_decrease)
    rho = jnp.where(trial_finite, rho, -jnp.inf).astype(dtype)
    accepted = rho >= config.eta1
    new_radius = _cast_like(radius_lib.update_radius(radius, rho, ms.step_norm, config), radius)

    if memory is not None and store_pair:
        new_memory, pair_stored = offer_pair(
            memory, ms.step, trial_grad - grad, valid=trial_finite & (ms.step_norm > 0),
            d_half=d_half, scaled=scaled, skip_tol=skip_tol,
        )
    else:
        new_memory = memory
        pair_stored = jnp.zeros((), bool)

    zero = jnp.zeros_like(params)
    new_aux = optax.tree.where(accepted, trial_aux, aux) if has_aux else None
    return IterationResult(
        params=jnp.where(accepted, trial, params),
        value=jnp.where(accepted, trial_value, value),
        grad=jnp.where(accepted, trial_grad, grad),
        radius=new_radius,
        memory=new_memory,
        aux=new_aux,
        update=jnp.where(accepted, ms.step, zero),
        accepted=accepted,
        ratio=rho,
        actual_decrease=actual,
        predicted_decrease=ms.predicted_decrease,
        step_norm=ms.step_norm,
        trial_finite=trial_finite,
        pair_stored=pair_stored,
        model_case=ms.case,
    )


# ----------------------------------------------------------------------------------------------
# The optax face
# ----------------------------------------------------------------------------------------------


class TrustRegionInfo(NamedTuple):
    """Diagnostics of the last update (counters are cumulative since ``init``).

    Attributes:
      num_accepted: int32, accepted steps so far.
      num_rejected: int32, rejected steps so far.
      num_fun_evals: int32, ``value_and_grad`` evaluations made by the optimizer so far (one per
        update, plus one when ``update`` had to compute ``value``/``grad`` itself).
      ratio: :math:`\\rho` of the last trial (``-inf`` when guarded; 0 before the first).
      step_norm: :math:`\\|s\\|` of the last trial step.
      predicted_decrease: :math:`m(0) - m(s)` of the last trial step.
      actual_decrease: :math:`f(x) - f(x+s)` of the last trial step.
      accepted: bool, whether the last trial was accepted.
      trial_finite: bool, whether the last trial value and gradient were finite.
      pair_stored: bool, whether the last SR1 pair entered the memory.
      model_case: int32 case code of the last model step (OBS case, or
        :data:`apts_jax.tr_model.FIRST_ORDER` / :data:`~apts_jax.tr_model.FALLBACK`).
    """

    num_accepted: Array
    num_rejected: Array
    num_fun_evals: Array
    ratio: Array
    step_norm: Array
    predicted_decrease: Array
    actual_decrease: Array
    accepted: Array
    trial_finite: Array
    pair_stored: Array
    model_case: Array


class TrustRegionState(NamedTuple):
    """State of :func:`trust_region`.

    Attributes:
      count: int32, number of updates so far.
      value: :math:`f` at the current parameters, i.e. at ``params + updates`` after an update
        (``inf`` after ``init``, which makes :func:`optax.value_and_grad_from_state` evaluate the
        objective at the first step).
      grad: :math:`\\nabla f` at the current parameters, a pytree like ``params`` (zeros after
        ``init``).
      radius: the trust-region radius :math:`\\Delta` for the next update.
      memory: the L-SR1 memory on the raveled parameters (None for ``model="first_order"``).
      info: :class:`TrustRegionInfo`.
    """

    count: Array
    value: Array
    grad: Any
    radius: Array
    memory: LSR1Memory | None
    info: TrustRegionInfo


def _init_info(dtype: Any) -> TrustRegionInfo:
    i0 = jnp.zeros((), jnp.int32)
    return TrustRegionInfo(
        num_accepted=i0,
        num_rejected=i0,
        num_fun_evals=i0,
        ratio=jnp.zeros((), dtype),
        step_norm=jnp.zeros((), dtype),
        predicted_decrease=jnp.zeros((), dtype),
        actual_decrease=jnp.zeros((), dtype),
        accepted=jnp.zeros((), bool),
        trial_finite=jnp.ones((), bool),
        pair_stored=jnp.zeros((), bool),
        model_case=jnp.full((), -1, jnp.int32),
    )


def init_state(
    spec: _tree.FlatSpec, model: str, memory_size: int, config: RadiusConfig
) -> TrustRegionState:
    """The initial :class:`TrustRegionState` for parameters described by ``spec``."""
    dtype = spec.dtype
    return TrustRegionState(
        count=jnp.zeros((), jnp.int32),
        value=jnp.full((), jnp.inf, dtype),
        grad=_tree.zeros(spec),
        radius=jnp.full((), config.initial_radius, dtype),
        memory=init_memory(model, spec.size, memory_size, dtype),
        info=_init_info(dtype),
    )


def next_state(
    state: TrustRegionState, spec: _tree.FlatSpec, res: IterationResult, extra_evals: int = 0
) -> TrustRegionState:
    """Fold an :class:`IterationResult` into the state; every leaf keeps its dtype."""
    info = state.info
    acc = res.accepted.astype(jnp.int32)
    new_info = TrustRegionInfo(
        num_accepted=info.num_accepted + acc,
        num_rejected=info.num_rejected + (1 - acc),
        num_fun_evals=info.num_fun_evals + (1 + extra_evals),
        ratio=res.ratio,
        step_norm=res.step_norm,
        predicted_decrease=res.predicted_decrease,
        actual_decrease=res.actual_decrease,
        accepted=res.accepted,
        trial_finite=res.trial_finite,
        pair_stored=res.pair_stored,
        model_case=res.model_case,
    )
    new_state = TrustRegionState(
        count=state.count + 1,
        value=res.value,
        grad=_tree.unravel(spec, res.grad),
        radius=res.radius,
        memory=res.memory,
        info=new_info,
    )
    return jax.tree.map(_cast_like, new_state, state)


def _check_state(state: Any, spec: _tree.FlatSpec, model: str) -> None:
    if not isinstance(state, TrustRegionState):
        raise TypeError(
            f"state must be the TrustRegionState returned by init/update, got "
            f"{type(state).__name__}."
        )
    _tree.check_same_structure(spec, state.grad, "state.grad")
    if model == "sr1":
        n_mem = None if state.memory is None else state.memory.s.shape[0]
        if n_mem != spec.size:
            raise ValueError(
                f"state.memory holds vectors of size {n_mem}, but params have {spec.size} "
                "entries; the state was initialised for other params. Call init(params) again."
            )


def trust_region(
    model: str = "sr1",
    memory_size: int = 5,
    *,
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
) -> optax.GradientTransformationExtraArgs:
    r"""Trust-region optimizer (L-SR1/OBS or first-order model) as an optax transformation.

    Implements the trust-region method of Cruz Alegría, Trotti, Kopaničáková & Krause,
    *Data-Parallel Neural Network Training via Nonlinearly Preconditioned Trust-Region Method*
    (the global/local solver of APTS), with the L-SR1 model solved by OBS (Brust, Erway & Marcia,
    Comput. Optim. Appl. 66, 2017); see Nocedal & Wright, *Numerical Optimization*, ch. 4 and 6.
    The math of one update is in the module docstring: :math:`\rho = (f(x) - f(x+s)) /
    (m(0) - m(s))`, accept iff :math:`\rho \ge \eta_1`, shrink by ``shrink`` iff
    :math:`\rho < \eta_1`, grow by ``grow`` iff :math:`\rho > \eta_2` and
    :math:`\|s\| \ge` ``boundary_fraction`` :math:`\Delta`; the SR1 pair
    :math:`(s, \nabla f(x+s) - \nabla f(x))` is offered to the memory at every trial.

    ``update(updates, state, params, *, value, grad, value_fn, **extra_args)`` follows optax's
    line-search contract (:func:`optax.scale_by_zoom_linesearch`):

    * ``value``, ``grad``: :math:`f` and :math:`\nabla f` at ``params`` (if either is None, both
      are computed with ``jax.value_and_grad(value_fn)``, costing one more evaluation). They
      must be computed on the *same data* as ``value_fn`` uses in this update. For a
      deterministic (full-batch) objective :func:`optax.value_and_grad_from_state` may reuse the
      ones stored in the state (see the example); **never with minibatches**: the stored values
      belong to the previous batch, and :math:`\rho` would compare losses of two batches.
    * ``value_fn(params, **kw)``: the scalar objective; the trial gradient is obtained with
      ``jax.value_and_grad(value_fn)``. ``kw`` are the ``extra_args`` that ``value_fn``'s
      signature names (all of them if it has ``**kwargs``); any other extra argument raises
      ``TypeError``, as in optax.
    * ``updates`` only has to match ``params`` leaf by leaf; the step is computed from ``grad``.
      Put the trust region *first* in an :func:`optax.chain`.
    * Returns the actual step (``params + updates`` is the trial point when accepted; zeros when
      rejected) and a :class:`TrustRegionState` whose ``value``/``grad`` are :math:`f` and
      :math:`\nabla f` at ``params + updates``. Transformations chained *after* the trust region
      (e.g. ``optax.scale``) change the step without the state knowing, so the stored
      ``value``/``grad`` are then stale: only use value_and_grad_from_state with the
      trust region last (or followed by identity-like transformations).

    Pytrees are raveled to one vector of the promoted leaf dtype (at least float32); parameters
    must be real floating. ``init`` accepts ``jax.ShapeDtypeStruct`` leaves. Leaves of the state
    keep fixed dtypes and weak types, so a jitted training step compiles once.

    Args:
      model: ``"sr1"`` (L-SR1 quadratic model, OBS subproblem solver) or ``"first_order"``.
      memory_size: number of SR1 pairs kept (``>= 1``; also validated for ``"first_order"``).
      radius: the radius constants (:class:`apts_jax.radius.RadiusConfig`; default
        :data:`~apts_jax.radius.DEFAULT_RADIUS_CONFIG`).
      initial_radius, min_radius, max_radius, eta1, eta2, shrink, grow, boundary_fraction:
        convenience keywords replacing single fields of ``radius`` (Δ0 = 0.1, Δmin = 1e-8,
        Δmax = 10, η1 = 0.1, η2 = 0.75, α = 0.5, β = 2, boundary test ``||s|| >= 0.9 Δ`` by
        default); giving a field both here and, differently, in ``radius`` raises.
      skip_tol: SR1 skip-rule tolerance r (default 1e-8, Nocedal & Wright eq. 6.26).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
      ValueError / TypeError: at the factory call, for an unknown model, a bad memory size or bad
        radius constants; at ``init``/``update``, for non-floating parameters, mismatched
        shapes (naming the leaf), a foreign state, or a missing ``value_fn``.

    Example (full batch: a deterministic objective, so reusing the state's value and gradient
    is exact; with minibatches compute ``value, grad = jax.value_and_grad(loss)(params, batch)``
    and pass ``value_fn=functools.partial(loss, batch=batch)`` at every update instead):

      >>> import jax, jax.numpy as jnp, optax
      >>> from apts_jax import trust_region
      >>> fn = lambda x: jnp.sum((x - 1.0) ** 2)
      >>> opt = trust_region()
      >>> params = jnp.zeros(3)
      >>> state = opt.init(params)
      >>> vg = optax.value_and_grad_from_state(fn)  # full batch only
      >>> for _ in range(20):
      ...   value, grad = vg(params, state=state)
      ...   updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fn)
      ...   params = optax.apply_updates(params, updates)
    """
    _validate.model(model, memory_size)
    config = _validate.radius_config(
        radius, initial_radius=initial_radius, min_radius=min_radius, max_radius=max_radius,
        eta1=eta1, eta2=eta2, shrink=shrink, grow=grow, boundary_fraction=boundary_fraction,
    )
    skip_tol = _validate.skip_tol(skip_tol)

    def init_fn(params: Any) -> TrustRegionState:
        spec = _tree.flat_spec(params)
        return init_state(spec, model, memory_size, config)

    def update_fn(
        updates: Any,
        state: TrustRegionState,
        params: Any = None,
        *,
        value: Any = None,
        grad: Any = None,
        value_fn: Callable[..., Any] | None = None,
        **extra_args: Any,
    ) -> tuple[Any, TrustRegionState]:
        if value_fn is None:
            raise TypeError(
                "trust_region.update needs the objective: pass value_fn=<loss function> (and "
                "value=..., grad=... at params), e.g. opt.update(grad, state, params, "
                "value=value, grad=grad, value_fn=loss)."
            )
        if not callable(value_fn):
            raise TypeError(f"value_fn must be callable, got {type(value_fn).__name__}.")
        if params is None:
            raise ValueError("trust_region.update needs params (the current parameters).")
        spec = _tree.flat_spec(params)
        _tree.check_same_structure(spec, updates, "updates")
        if grad is not None:
            _tree.check_same_structure(spec, grad, "grad")
        if value is not None:
            if math.prod(jnp.shape(value)) != 1:
                raise ValueError(f"value must be a scalar, got shape {jnp.shape(value)}.")
            value = jnp.reshape(value, ())
        _check_state(state, spec, model)
        fn_kwargs = _validate.split_kwargs(value_fn, extra_args, "trust_region.update")

        vg = jax.value_and_grad(value_fn)
        extra_evals = 0
        if value is None or grad is None:
            value, grad = vg(params, **fn_kwargs)
            extra_evals = 1

        def flat_value_and_grad(x: Array) -> tuple[Array, Array]:
            v, g = vg(_tree.unravel(spec, x), **fn_kwargs)
            return v, _tree.ravel(spec, g)

        x = _tree.ravel(spec, params)
        res = iteration(
            flat_value_and_grad,
            x,
            value,
            _tree.ravel(spec, grad),
            state.radius,
            state.memory,
            model=model,
            config=config,
            skip_tol=skip_tol,
        )
        new_state = next_state(state, spec, res, extra_evals)
        return _tree.unravel(spec, res.update), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
