r"""Ellipsoidal (adaptive-norm) trust regions solved with OBS in scaled variables.

The trust region :math:`\|s\|_2 \le \Delta` of the APTS paper (Cruz Alegría, Trotti, Kopaničáková,
Krause, *Data-Parallel Neural Network Training via Nonlinearly Preconditioned Trust-Region
Method*) is replaced by the ellipsoid

.. math::

   \|D^{1/2} s\|_2 \le \Delta, \qquad D = \operatorname{diag}(\sqrt{\hat v} + \epsilon),

with :math:`\hat v` Adam's bias-corrected second moment, :math:`v_t = \beta_2 v_{t-1} +
(1 - \beta_2) g_t^2`, :math:`\hat v_t = v_t / (1 - \beta_2^t)` — the adaptive-norm trust region of
Kohler, Adolphs & Lucchi, *Adaptive norms for deep learning with regularized Newton methods*,
arXiv:1905.09201 (issue 11, option 3). APTS uses it with ``norm="adaptive"``
(:class:`apts_jax.APTSOptions`; :func:`apts_jax.tr.iteration` takes ``d_half``).

**Scaled variables.** With :math:`u = D^{1/2} s` the subproblem
:math:`\min g^\top s + \tfrac12 s^\top B s`, :math:`\|D^{1/2}s\| \le \Delta` becomes the L2 problem

.. math::

   \min_u \hat g^\top u + \tfrac12 u^\top \hat B u, \quad \|u\|_2 \le \Delta, \qquad
   \hat g = D^{-1/2} g, \quad \hat B = D^{-1/2} B D^{-1/2},

solved by OBS (:func:`apts_jax.obs.solve_memory`); the step is mapped back, :math:`s = D^{-1/2} u`.
Model values are invariant (:math:`\hat g^\top u = g^\top s`, :math:`u^\top \hat B u = s^\top B s`),
so the predicted decrease needs no mapping, and the reported ``step_norm`` is the scaled norm
:math:`\|D^{1/2} s\| = \|u\|`, the quantity that the radius bounds.

**Pairs.** A secant pair :math:`(s, y)` of :math:`B` maps to :math:`(\hat s, \hat y) = (D^{1/2}s,
D^{-1/2}y)`, and :math:`Bs = y \iff \hat B \hat s = \hat y` exactly. :math:`\hat B` is the compact
L-SR1 matrix (:mod:`apts_jax.lsr1`) of the scaled pairs with :math:`\hat B_0 = \hat\gamma I`,
:math:`\hat\gamma = \hat y^\top \hat y / \hat s^\top \hat y = y^\top D^{-1} y / s^\top y` of the
newest pair (the rule of :func:`apts_jax.lsr1.update`, applied to the scaled pair; the previous
:math:`\hat\gamma` is kept when this is not finite and positive). It is the natural choice: in the
original variables :math:`B_0 = \hat\gamma D`, a multiple of Adam's preconditioner with the
multiple fitted to the newest curvature pair, and with :math:`D = I` it is exactly the L2 rule.
(Reusing the L2 :math:`\gamma = y^\top y / s^\top y` would mix units: :math:`\hat\gamma` has the
units of :math:`\hat y / \hat s = y / (D s)`.)

**When D changes.** The pairs are stored in the *original* variables (:class:`Pairs`) and mapped
with the current :math:`D` at solve time (:func:`scaled_memory`): one read of ``S, Y``, one write
of ``Ŝ, Ŷ`` and the ``m x m`` Gram matrices. Rescaling a stored scaled memory when :math:`D`
changes takes the same read and write, but its update (:func:`apts_jax.lsr1.update`) also forms
the Gram matrices of the new scaled memory, which are stale as soon as :math:`D` moves (every
iteration with a running :math:`\hat v`): one more ``O(nm^2)`` pass per update; and the chain of
ratios :math:`D_{k+1}^{1/2} / D_k^{1/2}` compounds round-off. Here :func:`update_pairs` only
evaluates the skip rule on the scaled pair (jit removes the rest of ``lsr1.update``; checked on
the compiled HLO: four ``n x m`` matrix-vector products, no Gram matrix) and shifts the FIFO,
and :math:`\hat B` is a function of the stored pairs and the current :math:`D` only. The SR1
skip rule (:func:`update_pairs`) and the conditioning check (:func:`scaled_memory`, which drops
the oldest pairs while :math:`\hat M^{-1}` or :math:`\hat\Psi^\top\hat\Psi` is badly
conditioned) both act on the scaled pairs; pairs dropped by the check stay dropped. With
:math:`D = I` the pairs, mask, :math:`\hat\gamma` and store decisions are those of
:mod:`apts_jax.lsr1` bit for bit (the Gram matrices to the last bits: two compiled programs may
round a dot product differently), and :func:`solve` on a given memory is
:func:`apts_jax.obs.solve_memory` bit for bit.

**Radius in RMS units.** :math:`\|D^{1/2}s\| \le \Delta` with :math:`\Delta = \Delta_{\rm rms}
\sqrt n` bounds the root-mean-square entry of :math:`D^{1/2}s` by :math:`\Delta_{\rm rms}`, so
:math:`\Delta_{\rm rms}` means the same for any parameter count (:func:`radius_from_rms`).

Every function is pure and ``jax.jit``-friendly, works on flat vectors in float32 or float64, and
needs ``d_half > 0`` and finite (:func:`scale` guarantees it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.typing import ArrayLike

from apts_jax import lsr1, obs, tr_model
from apts_jax.tr_model import FALLBACK, ModelStep

__all__ = [
    "DiagNorm",
    "DiagNormState",
    "Pairs",
    "diag_norm",
    "first_order_step",
    "init",
    "init_pairs",
    "model_step",
    "radius_from_rms",
    "rms_from_radius",
    "scale",
    "scaled_memory",
    "scaled_norm",
    "second_moment",
    "solve",
    "sr1_step",
    "to_scaled",
    "update",
    "update_pairs",
]

DEFAULT_BETA2 = 0.999
"""Adam's :math:`\\beta_2` (Kingma & Ba 2015), also used by Kohler et al."""
DEFAULT_EPS = 1e-8
"""The :math:`\\epsilon` in :math:`D = \\operatorname{diag}(\\sqrt{\\hat v} + \\epsilon)` (Adam's)."""


# ----------------------------------------------------------------------------------------------
# Validation (pure Python, before any state changes)
# ----------------------------------------------------------------------------------------------


def _concrete_float(x: Any) -> float | None:
    try:
        return float(x)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None  # traced: the caller is responsible


def _check_beta2(beta2: Any) -> None:
    value = _concrete_float(beta2)
    if value is not None and not (0.0 <= value < 1.0):
        raise ValueError(
            f"ellipsoid: beta2 must lie in [0, 1), got {beta2!r}; use beta2=0.999 (Adam's default)."
        )


def _check_eps(eps: Any) -> None:
    value = _concrete_float(eps)
    if value is not None and not (math.isfinite(value) and value > 0.0):
        raise ValueError(
            f"ellipsoid: eps must be finite and > 0 (it keeps D invertible), got {eps!r}; "
            "use eps=1e-8."
        )


def _check_vector(name: str, x: Array, n: int, where: str) -> None:
    if x.shape != (n,):
        raise ValueError(
            f"ellipsoid.{where}: {name} must be a flat vector of shape ({n},) like the parameters, "
            f"got shape {x.shape}; ravel the pytree first (apts_jax._tree)."
        )


def _check_radius(radius: Any, where: str) -> None:
    value = _concrete_float(radius)
    if value is not None and not (math.isfinite(value) and value > 0.0):
        raise ValueError(
            f"ellipsoid.{where}: radius must be finite and > 0, got {radius!r} (the scaled radius; "
            "see radius_from_rms)."
        )


def _check_n(n: Any, where: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"ellipsoid.{where}: n must be a positive integer, got {n!r}.")
    return int(n)


# ----------------------------------------------------------------------------------------------
# The diagonal D: Adam's bias-corrected second moment
# ----------------------------------------------------------------------------------------------


class DiagNormState(NamedTuple):
    """Running second moment of the gradients.

    Attributes:
      count: int32, number of gradients folded in (:math:`t`).
      nu: ``(n,)`` :math:`v_t = \\beta_2 v_{t-1} + (1 - \\beta_2) g_t^2` (not bias corrected),
        dtype of the parameters.
    """

    count: Array
    nu: Array


def init(n: int, dtype: Any = jnp.float32) -> DiagNormState:
    """The empty state for ``n`` parameters: ``count = 0``, ``nu = 0`` (then :func:`scale` is 1)."""
    n = _check_n(n, "init")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"ellipsoid.init: dtype must be a floating dtype, got {dtype}.")
    return DiagNormState(count=jnp.zeros((), jnp.int32), nu=jnp.zeros((n,), dtype))


def update(state: DiagNormState, g: ArrayLike, beta2: float = DEFAULT_BETA2) -> DiagNormState:
    """Fold one gradient in: :math:`v \\leftarrow \\beta_2 v + (1 - \\beta_2) g^2`, ``count + 1``."""
    _check_beta2(beta2)
    g = jnp.asarray(g)
    _check_vector("g", g, state.nu.shape[0], "update")
    dtype = state.nu.dtype
    g = g.astype(dtype)
    # With a Python float beta2, 1 - beta2 is formed in double precision (as optax does): in
    # float32, 1 - float32(0.999) is off by 1.3e-5 relative.
    nu = (beta2 * state.nu + (1 - beta2) * (g * g)).astype(dtype)
    return DiagNormState(count=state.count + 1, nu=nu)


def second_moment(state: DiagNormState, beta2: float = DEFAULT_BETA2) -> Array:
    """:math:`\\hat v = v / (1 - \\beta_2^t)` (zeros while ``count == 0``).

    :math:`1 - \\beta_2^t` is evaluated as ``-expm1(t log beta2)``, accurate for small ``t``.
    """
    _check_beta2(beta2)
    dtype = state.nu.dtype
    t = state.count.astype(dtype)
    b2 = _concrete_float(beta2)
    if b2 is None:  # traced beta2
        correction = 1 - jnp.asarray(beta2, dtype) ** t
    elif b2 == 0.0:
        correction = jnp.ones((), dtype)
    else:
        correction = -jnp.expm1(t * jnp.asarray(math.log(b2), dtype))
    started = state.count > 0
    return jnp.where(started, state.nu / jnp.where(started, correction, 1), 0).astype(dtype)


def scale(state: DiagNormState, beta2: float = DEFAULT_BETA2, eps: float = DEFAULT_EPS) -> Array:
    """``d_half`` :math:`= D^{1/2} = (\\sqrt{\\hat v} + \\epsilon)^{1/2}` as a vector.

    Before the first :func:`update` (``count == 0``) it is all ones: :math:`D = I`, the L2 ball.
    """
    _check_eps(eps)
    dtype = state.nu.dtype
    v_hat = second_moment(state, beta2)
    d = jnp.sqrt(v_hat) + jnp.asarray(eps, dtype)
    return jnp.where(state.count > 0, jnp.sqrt(d), jnp.ones_like(d)).astype(dtype)


class DiagNorm(NamedTuple):
    """:func:`init`, :func:`update`, :func:`scale` with ``beta2`` and ``eps`` bound."""

    init: Callable[..., DiagNormState]
    update: Callable[[DiagNormState, ArrayLike], DiagNormState]
    scale: Callable[[DiagNormState], Array]


def diag_norm(beta2: float = DEFAULT_BETA2, eps: float = DEFAULT_EPS) -> DiagNorm:
    """Factory binding ``beta2`` and ``eps`` once (validated here, before any state exists)."""
    _check_beta2(beta2)
    _check_eps(eps)

    def init_fn(n: int, dtype: Any = jnp.float32) -> DiagNormState:
        return init(n, dtype)

    def update_fn(state: DiagNormState, g: ArrayLike) -> DiagNormState:
        return update(state, g, beta2)

    def scale_fn(state: DiagNormState) -> Array:
        return scale(state, beta2, eps)

    return DiagNorm(init_fn, update_fn, scale_fn)


# ----------------------------------------------------------------------------------------------
# Norms and the radius in RMS units
# ----------------------------------------------------------------------------------------------


def scaled_norm(s: ArrayLike, d_half: ArrayLike) -> Array:
    """:math:`\\|D^{1/2} s\\|_2`."""
    s = jnp.asarray(s)
    return jnp.linalg.norm(jnp.asarray(d_half, s.dtype) * s)


def radius_from_rms(radius_rms: ArrayLike, n: int) -> Array:
    """:math:`\\Delta = \\Delta_{\\rm rms} \\sqrt n`: the radius that bounds the RMS entry of
    :math:`D^{1/2}s` by ``radius_rms`` for ``n`` parameters."""
    n = _check_n(n, "radius_from_rms")
    return jnp.asarray(radius_rms) * math.sqrt(n)


def rms_from_radius(radius: ArrayLike, n: int) -> Array:
    """:math:`\\Delta_{\\rm rms} = \\Delta / \\sqrt n` (inverse of :func:`radius_from_rms`)."""
    n = _check_n(n, "rms_from_radius")
    return jnp.asarray(radius) / math.sqrt(n)


def to_scaled(s: ArrayLike, y: ArrayLike, d_half: ArrayLike) -> tuple[Array, Array]:
    """The scaled secant pair :math:`(\\hat s, \\hat y) = (D^{1/2} s, D^{-1/2} y)`."""
    s = jnp.asarray(s)
    d_half = jnp.asarray(d_half, s.dtype)
    return d_half * s, jnp.asarray(y, s.dtype) / d_half


# ----------------------------------------------------------------------------------------------
# The pairs, kept in the original variables
# ----------------------------------------------------------------------------------------------


class Pairs(NamedTuple):
    """L-SR1 pairs in the original variables (a FIFO like :class:`apts_jax.lsr1.LSR1Memory`).

    Attributes:
      s: ``(n, m)`` steps as columns, oldest first.
      y: ``(n, m)`` gradient differences, same order.
      mask: ``(m,)`` bool, valid columns (a contiguous block at the newest end); pairs dropped by
        the conditioning check of :func:`scaled_memory` are cleared here by :func:`update_pairs`.
      gamma: :math:`\\hat\\gamma` of the scaled model last in effect (the fallback when the
        newest pair gives no finite positive :math:`\\hat y^\\top\\hat y / \\hat s^\\top\\hat y`).
    """

    s: Array
    y: Array
    mask: Array
    gamma: Array


def init_pairs(n: int, memory_size: int, dtype: Any = jnp.float32, gamma: float = 1.0) -> Pairs:
    """No pairs (:math:`\\hat B = \\gamma I`); arguments as :func:`apts_jax.lsr1.init`."""
    mem = lsr1.init(n, memory_size, dtype=dtype, gamma=gamma)
    return Pairs(mem.s, mem.y, mem.mask, mem.gamma)


def scaled_memory(pairs: Pairs, d_half: ArrayLike, *, cond_tol: float = 1e-3) -> lsr1.LSR1Memory:
    """The L-SR1 memory of :math:`\\hat B` for the current ``d_half`` (``O(nm^2)``).

    Columns :math:`(\\hat s_i, \\hat y_i) = (D^{1/2}s_i, D^{-1/2}y_i)`; :math:`\\hat\\gamma =
    \\hat y^\\top\\hat y / \\hat s^\\top\\hat y` of the newest valid pair when finite and positive,
    else ``pairs.gamma``; Gram matrices from the explicit :math:`\\hat\\Psi`; then the oldest
    pairs are dropped while the scaled :math:`\\hat M^{-1}` or :math:`\\hat\\Psi^\\top\\hat\\Psi`
    is badly conditioned (the check of :func:`apts_jax.lsr1.update`, same ``cond_tol``).
    With ``d_half = 1`` this is bit for bit the memory that :func:`apts_jax.lsr1.update` holds.
    """
    n, m = pairs.s.shape
    dtype = pairs.s.dtype
    d_half = jnp.asarray(d_half)
    _check_vector("d_half", d_half, n, "scaled_memory")
    d_half = d_half.astype(dtype)
    ct = lsr1.compute_dtype(dtype)
    eps = float(jnp.finfo(dtype).eps)
    s_hat = d_half[:, None] * pairs.s
    y_hat = pairs.y / d_half[:, None]

    # gamma from the newest valid pair (column m - 1 whenever any pair is valid).
    s_new, y_new = s_hat[:, m - 1], y_hat[:, m - 1]
    candidate = jnp.vdot(y_new, y_new).astype(ct) / jnp.vdot(s_new, y_new).astype(ct)
    gamma_old = pairs.gamma.astype(ct)
    ok = pairs.mask[m - 1] & jnp.isfinite(candidate) & (candidate > 0)
    gamma = jnp.where(ok, candidate, gamma_old).astype(dtype)

    _, pp, sp = lsr1.gram_matrices(s_hat, y_hat, gamma, ct)
    s_norm2 = jnp.sum(s_hat * s_hat, axis=0).astype(ct)
    tol = max(float(cond_tol), float(np.sqrt(eps)))
    # The conditioning check of lsr1.update (a private helper of lsr1: one rule, one place).
    mask = lsr1.drop_oldest_until_conditioned(pp, sp, s_norm2, pairs.mask, tol)
    outer = mask[:, None] & mask[None, :]
    pp, sp = (jnp.where(outer, a, 0.0) for a in (pp, sp))
    return lsr1.LSR1Memory(s_hat, y_hat, mask, gamma, pp, sp)


def update_pairs(
    pairs: Pairs,
    s: ArrayLike,
    y: ArrayLike,
    d_half: ArrayLike,
    *,
    scaled: lsr1.LSR1Memory | None = None,
    skip_tol: float = 1e-8,
    cond_tol: float = 1e-3,
) -> tuple[Pairs, Array]:
    """Offer the pair ``(s, y)`` (original variables); the SR1 skip rule is applied to the scaled pair.

    The pair is stored iff :func:`apts_jax.lsr1.update` would store :math:`(D^{1/2}s, D^{-1/2}y)`
    in ``scaled`` (:math:`|\\hat s^\\top(\\hat y - \\hat B\\hat s)| \\ge r \\|\\hat s\\|
    \\|\\hat y - \\hat B\\hat s\\|`, finite, :math:`s \\ne 0`). Only its ``stored`` flag is used: jit
    removes the rest (no Gram matrices are formed here; :func:`scaled_memory` forms them for the
    next ``d_half``). The returned pairs keep ``scaled.mask`` and ``scaled.gamma`` (conditioning
    drops are permanent) and, if stored, append ``(s, y)`` as the newest column.

    Args:
      pairs: the stored pairs.
      s, y: the new pair in the original variables, shape ``(n,)``.
      d_half: :math:`D^{1/2}` used for the step that produced the pair.
      scaled: ``scaled_memory(pairs, d_half)`` if already computed (for the solve); else computed.
      skip_tol: the skip-rule tolerance :math:`r` (as :func:`apts_jax.lsr1.update`).
      cond_tol: passed to :func:`scaled_memory` when ``scaled`` is None.

    Returns:
      ``(new_pairs, stored)``.
    """
    n, m = pairs.s.shape
    dtype = pairs.s.dtype
    s, y, d_half = (jnp.asarray(a) for a in (s, y, d_half))
    for name, a in (("s", s), ("y", y), ("d_half", d_half)):
        _check_vector(name, a, n, "update_pairs")
    if scaled is None:
        scaled = scaled_memory(pairs, d_half, cond_tol=cond_tol)
    s, y, d_half = (a.astype(dtype) for a in (s, y, d_half))
    s_hat, y_hat = to_scaled(s, y, d_half)
    _, stored = lsr1.update(scaled, s_hat, y_hat, skip_tol=skip_tol, cond_tol=cond_tol)
    kept = Pairs(pairs.s, pairs.y, scaled.mask, scaled.gamma.astype(pairs.gamma.dtype))
    shifted = Pairs(
        jnp.concatenate([kept.s[:, 1:], s[:, None]], axis=1),
        jnp.concatenate([kept.y[:, 1:], y[:, None]], axis=1),
        jnp.concatenate([kept.mask[1:], jnp.ones((1,), bool)]),
        kept.gamma,
    )
    # A select, not a lax.cond (as lsr1.update): no host round trip for the predicate on an
    # accelerator; the select fuses into the concatenations that shift the buffers.
    new = jax.tree.map(lambda a, b: jnp.where(stored, a, b), shifted, kept)
    return new, stored


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------


def solve(
    g: ArrayLike, memory: lsr1.LSR1Memory | Pairs, radius: ArrayLike, d_half: ArrayLike
) -> obs.OBSResult:
    """Global minimiser of :math:`g^\\top s + \\tfrac12 s^\\top B s` s.t. :math:`\\|D^{1/2}s\\| \\le
    \\Delta`, :math:`B = D^{1/2}\\hat B D^{1/2}`, by OBS on the scaled problem.

    Args:
      g: gradient, shape ``(n,)``.
      memory: the scaled memory from :func:`scaled_memory` (same ``d_half``), or :class:`Pairs`
        (then mapped here).
      radius: :math:`\\Delta > 0` (the scaled radius; see :func:`radius_from_rms`).
      d_half: :math:`D^{1/2}`, shape ``(n,)``, positive.

    Returns:
      :class:`apts_jax.obs.OBSResult` with ``step`` :math:`= s = D^{-1/2}u` in the original
      variables, ``step_norm`` :math:`= \\|u\\| = \\|D^{1/2}s\\|` (the scaled norm, ``<= radius``),
      ``predicted_decrease`` :math:`= -(g^\\top s + \\frac12 s^\\top B s)` (invariant), and ``sigma``,
      ``case``, ``lambda_min``, ``newton_iterations`` of the scaled problem (:math:`\\hat B`).
    """
    g = jnp.asarray(g)
    d_half = jnp.asarray(d_half)
    if g.ndim != 1:
        raise ValueError(f"ellipsoid.solve: g must be a flat vector, got shape {g.shape}.")
    _check_vector("d_half", d_half, g.shape[0], "solve")
    _check_radius(radius, "solve")  # before the (n m^2) mapping of the pairs
    if isinstance(memory, Pairs):
        memory = scaled_memory(memory, d_half)
    dtype = memory.s.dtype
    g = g.astype(dtype)
    d_half = d_half.astype(dtype)
    res = obs.solve_memory(g / d_half, memory, radius)
    return res._replace(step=res.step / d_half)


def first_order_step(g: ArrayLike, radius: ArrayLike, d_half: ArrayLike) -> ModelStep:
    """Minimiser of the linear model on the ellipsoid: :math:`s = -\\Delta D^{-1}g /
    \\|D^{-1/2}g\\|`.

    Predicted decrease :math:`-g^\\top s = \\Delta \\|D^{-1/2}g\\|`; ``step_norm`` is the scaled
    norm :math:`\\Delta` (0 and a zero step when :math:`g = 0`); ``case`` is
    :data:`apts_jax.tr_model.FIRST_ORDER`.
    """
    g = jnp.asarray(g)
    d_half = jnp.asarray(d_half)
    _check_vector("d_half", d_half, g.shape[0] if g.ndim == 1 else -1, "first_order_step")
    d_half = d_half.astype(g.dtype)
    fo = tr_model.first_order_step(g / d_half, radius)
    return fo._replace(step=fo.step / d_half)


def sr1_step(
    g: ArrayLike, memory: lsr1.LSR1Memory | Pairs, radius: ArrayLike, d_half: ArrayLike
) -> ModelStep:
    """:func:`solve` as a :class:`apts_jax.tr_model.ModelStep`; falls back to
    :func:`first_order_step` (``case == FALLBACK``) on a non-finite OBS result, like
    :func:`apts_jax.tr_model.sr1_step`. ``step_norm`` is the scaled norm."""
    g = jnp.asarray(g)
    dtype = g.dtype
    radius = jnp.asarray(radius).astype(dtype)
    res = solve(g, memory, radius, d_half)
    step = res.step.astype(dtype)
    predicted = jnp.asarray(res.predicted_decrease).astype(dtype)
    step_norm = jnp.asarray(res.step_norm).astype(dtype)
    finite = jnp.all(jnp.isfinite(step)) & jnp.isfinite(predicted) & jnp.isfinite(step_norm)
    fo = first_order_step(g, radius, d_half)
    return ModelStep(
        jnp.where(finite, step, fo.step),
        jnp.where(finite, predicted, fo.predicted_decrease),
        jnp.where(finite, step_norm, fo.step_norm),
        jnp.where(finite, jnp.asarray(res.case, jnp.int32), jnp.asarray(FALLBACK, jnp.int32)),
    )


def model_step(
    model: str,
    g: ArrayLike,
    memory: lsr1.LSR1Memory | Pairs | None,
    radius: ArrayLike,
    d_half: ArrayLike,
) -> ModelStep:
    """The ellipsoidal analogue of :func:`apts_jax.tr_model.compute_step` (``model`` static)."""
    if model == "sr1":
        if memory is None:
            raise ValueError('model="sr1" needs pairs or a scaled memory; got memory=None.')
        return sr1_step(g, memory, radius, d_half)
    if model == "first_order":
        return first_order_step(g, radius, d_half)
    raise ValueError(f"unknown model {model!r}; use model='sr1' or model='first_order'.")
