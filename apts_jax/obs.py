"""The OBS solver for L-SR1 trust-region subproblems.

Solves

    min_p  q(p) = g^T p + 1/2 p^T B p   subject to  ||p||_2 <= Delta,

with ``B = gamma I + Psi M Psi^T`` the L-SR1 matrix of the pairs in ``S``, ``Y`` (see
:mod:`apts_jax.lsr1`), by the orthonormal-basis SR1 method of Brust, Erway & Marcia, *On solving L-SR1
trust-region subproblems*, Comput. Optim. Appl. 66 (2017) — the subproblem solver of the APTS paper
(Cruz Alegría et al., sec. 2.1). Cost ``O(n m^2)``; no ``n x n`` matrix is ever formed.

Method. With ``G = Psi^T Psi`` (scaled to unit diagonal, eigendecomposed, numerically dependent
directions dropped) we get ``Psi = Q R`` with ``Q = Psi T`` orthonormal; ``K = R M R^T = U diag(lh) U^T``
gives ``B = P diag(lh + gamma, gamma I) P^T`` with ``P_par = Psi T U``. In these coordinates
``a = (P_par^T g, ||g_perp||)`` and ``lambda = (lh + gamma, gamma)``, and the optimality conditions
(Moré–Sorensen) ``(B + sigma I) p = -g``, ``sigma (Delta - ||p||) = 0``, ``B + sigma I >= 0`` are solved
case by case:

* **interior** (``B > 0`` and ``||B^{-1} g|| <= Delta``): ``sigma = 0``;
* **sigma = -lambda_min** when every component of ``g`` along the ``lambda_min`` eigenspace vanishes and
  the remaining step ``p_hat`` fits: in the *hard case* (``lambda_min < 0``) the step is completed to the
  boundary with an eigenvector of ``lambda_min`` — either in ``span(Psi)`` (``HARD_PARALLEL``) or in its
  orthogonal complement, where ``lambda_min = gamma`` (``HARD_COMPLEMENT``); with ``lambda_min = 0`` the
  minimum-norm step is returned (``SINGULAR``);
* **boundary** otherwise: Newton's method on the secular equation ``1/||p(sigma)|| - 1/Delta = 0``, which
  is concave and increasing, started at a point to the left of the root (``sigma = 0`` when ``B > 0``,
  else ``max(-lambda_min, max_i(|a_i| / Delta - lambda_i))``), so it converges monotonically. The
  iteration runs in the shifted variable ``t = sigma + min(lambda_min, 0)``, which keeps tiny components of
  ``g`` along the ``lambda_min`` eigenvector accurate (a defect of the reference implementation was a
  "zero guard" that froze the iteration there and returned ``||p|| >> Delta``).

All tolerances are relative (to ``||g||``, ``max|lambda|``, ``Delta`` and the machine epsilon of the
parameter dtype). The returned step always satisfies ``||step|| <= Delta (1 + 1e-6)``: its norm is
measured on the assembled vector and the step scaled back if round-off made it longer.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from apts_jax import lsr1
from apts_jax._vma import match_vma

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST

INTERIOR = 0
BOUNDARY = 1
HARD_PARALLEL = 2
HARD_COMPLEMENT = 3
SINGULAR = 4
CASE_NAMES = ("interior", "boundary", "hard_parallel", "hard_complement", "singular")

_MAX_NEWTON = 100


class OBSResult(NamedTuple):
    """Solution of the L-SR1 trust-region subproblem.

    Attributes:
      step: the minimiser ``p*`` (shape ``(n,)``, dtype of ``g``).
      sigma: the Lagrange multiplier ``sigma* >= 0`` of the constraint.
      predicted_decrease: ``-q(p*) = -(g^T p* + 1/2 p*^T B p*) >= 0``.
      step_norm: ``||p*||``.
      case: one of ``INTERIOR, BOUNDARY, HARD_PARALLEL, HARD_COMPLEMENT, SINGULAR`` (int32).
      lambda_min: the smallest eigenvalue of ``B``.
      newton_iterations: Newton iterations on the secular equation (0 outside the boundary case).
    """

    step: Array
    sigma: Array
    predicted_decrease: Array
    step_norm: Array
    case: Array
    lambda_min: Array
    newton_iterations: Array


def _dot_t(a: Array, v: Array) -> Array:
    return jnp.matmul(v, a, precision=_HIGHEST)


class _Eigen(NamedTuple):
    """Spectral data of B in the basis P = [P_par, P_perp]."""

    lam_par: Array  # (m,) eigenvalues lh + gamma (arbitrary where not valid)
    valid_par: Array  # (m,) bool
    coeff: Array  # (m, m) C with P_par = Psi C
    g_par: Array  # (m,) P_par^T g
    rank: Array  # int32 rank of P_par


def _spectral(psi_psi: Array, m_inv: Array, psi_g: Array, gamma: Array, mask: Array,
              eps: float) -> _Eigen:
    """Eigendecomposition of ``Psi M Psi^T`` restricted to ``span(Psi)`` from ``m x m`` data."""
    m = mask.shape[0]
    ct = psi_psi.dtype
    d = jnp.diag(psi_psi)
    d_max = jnp.max(jnp.where(mask, d, 0.0))
    cols = mask & (d > (100.0 * eps) ** 2 * d_max) & (d > 0)
    scale = jnp.where(cols, jax.lax.rsqrt(jnp.where(cols, d, 1.0)), 0.0)
    outer = cols[:, None] & cols[None, :]
    corr = jnp.where(outer, scale[:, None] * psi_psi * scale[None, :], 0.0)
    # Pad the unused coordinates with -1: the valid block is PSD, so the padding sorts first and
    # its eigenvectors cannot mix with valid ones.
    corr = corr + jnp.diag(jnp.where(cols, 0.0, -1.0))
    s_hat, v = jnp.linalg.eigh(corr)
    keep = (s_hat > -0.5) & (s_hat > 10.0 * m * eps * jnp.max(s_hat))
    w = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, s_hat, 1.0)), 0.0)
    t = (scale[:, None] * v) * w[None, :]  # Q = Psi T, orthonormal on the kept columns

    mat = lsr1.invert_masked(m_inv, mask)
    gram = psi_psi
    k = t.T @ gram @ mat @ gram @ t
    k = 0.5 * (k + k.T)
    k = jnp.where(jnp.all(jnp.isfinite(k)), k, 0.0)  # a singular M^{-1}: fall back to B = gamma I
    rank = jnp.sum(keep.astype(jnp.int32))
    # Pad the dropped directions above the Gershgorin bound: they sort last.
    bound = jnp.max(jnp.sum(jnp.abs(k), axis=1))
    k = k + jnp.diag(jnp.where(keep, 0.0, 4.0 * bound + 1.0))
    lam_hat, u = jnp.linalg.eigh(k)
    valid = jnp.arange(m) < rank
    coeff = jnp.where(valid[None, :], t @ u, 0.0)
    g_par = jnp.where(valid, coeff.T @ psi_g, 0.0)
    lam = jnp.where(valid, lam_hat + gamma.astype(ct), gamma.astype(ct))
    return _Eigen(lam, valid, coeff, g_par, rank)


def _psi_t(s: Array, y: Array, gamma: Array, v: Array) -> Array:
    """``Psi^T v = Y^T v - gamma S^T v`` without forming ``Psi`` (one pass over S and Y)."""
    return _dot_t(y, v) - gamma * _dot_t(s, v)


def _psi_times(s: Array, y: Array, gamma: Array, coeff: Array) -> Array:
    """``Psi c = Y c - S (gamma c)`` without forming ``Psi`` (one pass over S and Y)."""
    c = coeff.astype(s.dtype)
    return jnp.matmul(y, c, precision=_HIGHEST) - jnp.matmul(s, gamma * c, precision=_HIGHEST)


def _solve(
    g: Array,
    s: Array,
    y: Array,
    gamma: Array,
    radius: Array,
    mask: Array,
    psi_psi: Array,
    s_psi: Array,
) -> OBSResult:
    n, m = s.shape
    dtype = g.dtype
    ct = psi_psi.dtype
    eps = float(jnp.finfo(dtype).eps)
    eps_ct = float(jnp.finfo(ct).eps)
    gamma_p = jnp.asarray(gamma, dtype)
    gamma_c = gamma_p.astype(ct)
    delta = jnp.asarray(radius, ct)

    # --- one pass over S, Y, g -------------------------------------------------------------
    # Psi = Y - gamma S is never formed: the two products with it each read S and Y once. The
    # Gram matrices (the cancellation-prone part) come from the explicit Psi (lsr1.gram_matrices).
    psi_g = _psi_t(s, y, gamma_p, g).astype(ct)
    g_norm2 = jnp.vdot(g, g).astype(ct)
    g_norm = jnp.sqrt(g_norm2)

    psi_psi, m_inv = lsr1.small_matrices(psi_psi, s_psi, mask)
    psi_g = jnp.where(mask, psi_g, 0.0)
    eig = _spectral(psi_psi, m_inv, psi_g, gamma_c, mask, eps)

    # --- the complement: ||g_perp|| -------------------------------------------------------
    n_perp = n - eig.rank
    has_perp = n_perp > 0
    g_perp2 = jnp.maximum(g_norm2 - jnp.sum(eig.g_par**2), 0.0)
    a_perp_gram = jnp.sqrt(g_perp2)

    # ||g||^2 - ||g_par||^2 cancels when g is nearly inside span(Psi): then form the vector
    # g_perp = g - P_par g_par explicitly (one more pass) and use it for its norm and for the step.
    explicit = has_perp & (a_perp_gram < 0.1 * g_norm)

    def explicit_perp() -> tuple[Array, Array]:
        g_perp = g - _psi_times(s, y, gamma_p, eig.coeff @ eig.g_par)
        # Project once more ("twice is enough"): the first residual is orthogonal to span(Psi)
        # only up to round-off relative to ||g||, which 1/tau would amplify.
        proj = eig.coeff.T @ _psi_t(s, y, gamma_p, g_perp).astype(ct)
        g_perp = g_perp - _psi_times(s, y, gamma_p, eig.coeff @ proj)
        return jnp.sqrt(jnp.vdot(g_perp, g_perp).astype(ct)), g_perp

    a_perp, h = jax.lax.cond(explicit, explicit_perp, lambda: (a_perp_gram, g))
    a_perp = jnp.where(has_perp, a_perp, 0.0)

    # (m + 1)-vectors: the m parallel eigen-directions and the complement.
    lam = jnp.concatenate([eig.lam_par, gamma_c[None]])
    a = jnp.concatenate([eig.g_par, a_perp[None]])
    valid = jnp.concatenate([eig.valid_par, has_perp[None]])
    a = jnp.where(valid, a, 0.0)

    lam_min = jnp.min(jnp.where(valid, lam, jnp.inf))
    lam_min = jnp.where(jnp.isfinite(lam_min), lam_min, gamma_c)
    lam_scale = jnp.max(jnp.where(valid, jnp.abs(lam), 0.0))
    tol_lam = 100.0 * eps * lam_scale
    pos_def = lam_min > tol_lam
    # d_i = lambda_i + sigma_low with sigma_low = max(-lambda_min, 0), computed without cancellation.
    d = jnp.where(lam_min >= 0, lam, lam - lam_min)
    d = jnp.where(valid, jnp.maximum(d, 0.0), 1.0)
    pole = valid & ~pos_def & (jnp.where(lam_min >= 0, lam - lam_min, d) <= tol_lam)
    tiny = jnp.concatenate(
        [
            jnp.full((m,), 100.0 * eps, ct) * g_norm,
            (100.0 * eps * g_norm)[None],
        ]
    )
    a = jnp.where(pole & (jnp.abs(a) <= tiny), 0.0, a)
    active = valid & (a != 0)
    pole_hit = jnp.any(pole & active)  # g has a component along the lambda_min eigenspace

    # Step at sigma_low (t = 0), poles excluded.
    w0 = jnp.where(active & ~pole, a / d, 0.0)
    p0_norm = jnp.sqrt(jnp.sum(w0**2))
    boundary = pole_hit | (p0_norm > delta)

    # --- Newton on phi(t) = 1/||p(t)|| - 1/Delta, t = sigma - sigma_low ----------------------
    def p_norm(t: Array) -> tuple[Array, Array]:
        den = d + t
        safe = jnp.where(active, den, 1.0)
        n2 = jnp.sum(jnp.where(active, (a / safe) ** 2, 0.0))
        n3 = jnp.sum(jnp.where(active, a**2 / safe**3, 0.0))
        return n2, n3

    t_start = jnp.where(
        pos_def,
        0.0,
        jnp.maximum(0.0, jnp.max(jnp.where(active, jnp.abs(a) / delta - d, 0.0))),
    )

    def newton_cond(state: tuple[Array, Array, Array]) -> Array:
        _, it, done = state
        return boundary & ~done & (it < _MAX_NEWTON)

    def newton_body(state: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        t, it, _ = state
        n2, n3 = p_norm(t)
        norm = jnp.sqrt(n2)
        phi = 1.0 / norm - 1.0 / delta
        dphi = n3 / (norm * n2)
        t_new = jnp.maximum(t - phi / dphi, 0.0)
        converged = (jnp.abs(norm - delta) <= 4.0 * eps_ct * delta) | (
            jnp.abs(t_new - t) <= eps_ct * jnp.maximum(t, 1e-300)
        )
        t_new = jnp.where(jnp.isfinite(t_new), t_new, t)
        return t_new, it + 1, converged | ~jnp.isfinite(phi)

    t_star, iters, _ = jax.lax.while_loop(
        newton_cond, newton_body, match_vma((t_start, jnp.int32(0), jnp.bool_(False)), t_start)
    )
    t_star = jnp.where(boundary, t_star, 0.0)
    sigma_low = jnp.maximum(-lam_min, 0.0)
    sigma = jnp.where(boundary, sigma_low + t_star, jnp.where(pos_def, 0.0, sigma_low))

    # Coordinates of the step: c_i = -a_i / (d_i + t) over the active directions.
    den = d + t_star
    coord = jnp.where(active & (boundary | ~pole), -a / jnp.where(active, den, 1.0), 0.0)

    # --- hard case: complete to the boundary along an eigenvector of lambda_min ---------------
    hard = ~boundary & ~pos_def & (lam_min < -tol_lam)
    pole_par = pole[:m]
    i_par = jnp.argmax(pole_par)
    use_par = jnp.any(pole_par)
    alpha = jnp.sqrt(jnp.maximum(delta**2 - jnp.sum(coord[:m] ** 2) - coord[m] ** 2, 0.0))
    alpha = jnp.where(hard, alpha, 0.0)

    # Complement eigenvector u = (e_j - P_par P_par[j]^T) / ||.||, j among the first m + 1 rows.
    rows = min(m + 1, n)
    p_rows = (y[:rows] - gamma_p * s[:rows]).astype(ct) @ eig.coeff  # (rows, m)
    row_norm2 = jnp.sum(p_rows**2, axis=1)
    j = jnp.argmin(row_norm2)
    u_norm = jnp.sqrt(jnp.maximum(1.0 - row_norm2[j], 0.0))
    g_u = (g[j].astype(ct) - eig.g_par @ p_rows[j]) / jnp.where(u_norm > 0, u_norm, 1.0)

    alpha_par = jnp.where(use_par, -jnp.where(a[i_par] > 0, 1.0, -1.0) * alpha, 0.0)
    alpha_perp = jnp.where(use_par, 0.0, -jnp.where(g_u > 0, 1.0, -1.0) * alpha)
    coord_par = coord[:m].at[i_par].add(alpha_par)

    # Complement coefficient: p_perp = -(1/tau) g_perp (+ alpha_perp u), tau = gamma + sigma.
    tau = d[m] + jnp.where(boundary, t_star, 0.0)
    perp_active = active[m] & (boundary | ~pole[m])
    coef_g = jnp.where(perp_active, -1.0 / jnp.where(perp_active, tau, 1.0), 0.0)
    beta = jnp.where(u_norm > 0, alpha_perp / jnp.where(u_norm > 0, u_norm, 1.0), 0.0)

    # Model value from the coordinates: q = lin + quad.
    lam_par = eig.lam_par
    lin = (
        eig.g_par @ coord_par
        + coef_g * a_perp**2
        + alpha_perp * g_u
    )
    quad = 0.5 * (
        jnp.sum(jnp.where(eig.valid_par, lam_par, 0.0) * coord_par**2)
        + gamma_c * (coef_g**2 * a_perp**2 + alpha_perp**2)
    )

    # --- assemble p = coef_g g_perp + beta e_j + Psi C (c - beta P_j^T) ----------------------
    # with g_perp = h explicitly, or h = g and g_perp = g - Psi C g_par folded into the sum.
    v = eig.coeff @ (coord_par - jnp.where(explicit, 0.0, coef_g) * eig.g_par - beta * p_rows[j])
    step = coef_g.astype(dtype) * h + _psi_times(s, y, gamma_p, v)
    step = step.at[j].add(beta.astype(dtype))
    norm_actual = jnp.sqrt(jnp.vdot(step, step).astype(ct))
    factor = jnp.where(norm_actual > delta, delta / jnp.where(norm_actual > 0, norm_actual, 1.0),
                       1.0)
    step = step * factor.astype(dtype)
    q = factor * lin + factor**2 * quad
    step_norm = jnp.minimum(norm_actual, delta)

    case = jnp.where(
        boundary,
        BOUNDARY,
        jnp.where(
            pos_def,
            INTERIOR,
            jnp.where(hard, jnp.where(use_par, HARD_PARALLEL, HARD_COMPLEMENT), SINGULAR),
        ),
    ).astype(jnp.int32)
    return OBSResult(
        step=step,
        sigma=sigma,
        predicted_decrease=-q,
        step_norm=step_norm,
        case=case,
        lambda_min=lam_min,
        newton_iterations=iters,
    )


def _check_inputs(g: Array, s: Array, y: Array) -> None:
    if g.ndim != 1:
        raise ValueError(f"obs.solve: g must be a flat vector, got shape {g.shape}.")
    if s.ndim != 2 or s.shape != y.shape or s.shape[0] != g.shape[0]:
        raise ValueError(
            "obs.solve: S and Y must both have shape (n, m) with n = g.size = "
            f"{g.shape[0]}; got S {s.shape}, Y {y.shape}."
        )
    if not jnp.issubdtype(g.dtype, jnp.floating):
        raise TypeError(f"obs.solve: g must be floating, got {g.dtype}.")


def _check_radius(radius: Array | float) -> None:
    try:
        value = float(radius)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return  # traced: checked by the caller
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"obs.solve: radius must be finite and > 0, got {value}.")


def solve(
    g: Array,
    S: Array,  # noqa: N803 (the paper's notation)
    Y: Array,  # noqa: N803
    gamma: Array | float,
    radius: Array | float,
    mask: Array | None = None,
) -> OBSResult:
    """Solve ``min g^T p + 1/2 p^T B p`` s.t. ``||p|| <= radius`` for the L-SR1 matrix of ``(S, Y)``.

    Args:
      g: gradient, shape ``(n,)``.
      S: steps as columns, shape ``(n, m)``, oldest first.
      Y: gradient differences, shape ``(n, m)``.
      gamma: ``B_0 = gamma I`` (any sign).
      radius: trust-region radius ``Delta > 0``.
      mask: ``(m,)`` bool, the valid columns (default: all). No valid column means ``B = gamma I``.
        ``M^{-1}`` of the valid pairs must be nonsingular (:func:`apts_jax.lsr1.update` ensures it);
        otherwise ``B = gamma I`` is used.

    Returns:
      An :class:`OBSResult`.
    """
    g = jnp.asarray(g)
    S = jnp.asarray(S, g.dtype)  # noqa: N806
    Y = jnp.asarray(Y, g.dtype)  # noqa: N806
    _check_inputs(g, S, Y)
    _check_radius(radius)
    m = S.shape[1]
    if mask is None:
        mask = jnp.ones((m,), bool)
    else:
        mask = jnp.asarray(mask, bool)
        if mask.shape != (m,):
            raise ValueError(f"obs.solve: mask must have shape ({m},), got {mask.shape}.")
        S = jnp.where(mask[None, :], S, 0.0)  # noqa: N806
        Y = jnp.where(mask[None, :], Y, 0.0)  # noqa: N806
    ct = lsr1.compute_dtype(g.dtype)
    gamma = jnp.asarray(gamma, g.dtype)
    _, psi_psi, s_psi = lsr1.gram_matrices(S, Y, gamma, ct)
    outer = mask[:, None] & mask[None, :]
    psi_psi, s_psi = (jnp.where(outer, x, 0.0) for x in (psi_psi, s_psi))
    return _solve(g, S, Y, gamma, radius, mask, psi_psi, s_psi)


def solve_memory(g: Array, memory: lsr1.LSR1Memory, radius: Array | float) -> OBSResult:
    """:func:`solve` for the L-SR1 matrix of ``memory``, reusing its Gram matrices (``O(nm)``)."""
    g = jnp.asarray(g)
    _check_inputs(g, memory.s, memory.y)
    _check_radius(radius)
    return _solve(
        g.astype(memory.s.dtype),
        memory.s,
        memory.y,
        memory.gamma,
        radius,
        memory.mask,
        memory.psi_psi,
        memory.s_psi,
    )
