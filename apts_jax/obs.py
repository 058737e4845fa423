"""The OBS solver for L-SR1 trust-region subproblems.

Solves

    min_p  q(p) = g^T p + 1/2 p^T B p   subject to  ||p||_2 <= Delta,

with ``B = gamma I + Psi M Psi^T`` the L-SR1 matrix of the pairs in ``S``, ``Y`` (see
:mod:`apts_jax.lsr1`), by the orthonormal-basis SR1 method of Brust, Erway & Marcia, *On solving L-SR1
trust-region subproblems*, Comput. Optim. Appl. 66 (2017) — the subproblem solver of the APTS paper
(Cruz Alegría et al., sec. 2.1). Cost ``O(n m^2)``; no ``n x n`` matrix is ever formed.

Method. An orthonormal basis ``Q = X T`` of ``span(Psi)`` gives ``Psi = Q R`` with ``R = Q^T Psi``, and
``K = R M R^T = U diag(lh) U^T`` gives ``B = P diag(lh + gamma, gamma I) P^T`` with ``P_par = X T U``.
:func:`solve_memory` takes ``X = Psi`` (never formed) and ``T`` from the eigendecomposition of the
cached ``G = Psi^T Psi`` (scaled to unit diagonal, numerically dependent directions dropped): accurate
while ``cond(G)`` is moderate, which :func:`apts_jax.lsr1.update` guarantees. :func:`solve` accepts any
``(S, Y)`` and forms the basis explicitly by a *shifted CholeskyQR2*: a first round on ``G`` with its
small eigenvalues clamped at ``10 m eps`` gives ``Q1 = Psi T1`` (explicit, ``||Q1|| <= ~1``), a second
round on the explicitly computed ``Q1^T Q1`` makes it orthonormal to round-off. The error of the basis
is then ``O(eps cond(Psi))`` instead of ``O(eps cond(Psi)^2)`` (Fukaya et al., *Shifted Cholesky QR
for computing the QR factorization of ill-conditioned matrices*, SIAM J. Sci. Comput. 42, 2020); in
float32 a single round fails beyond a scaled ``cond(Psi^T Psi)`` of about ``1e5``. In these coordinates
``a = (P_par^T g, ||g_perp||)`` and ``lambda = (lh + gamma, gamma)``, and the optimality conditions
(Moré–Sorensen) ``(B + sigma I) p = -g``, ``sigma (Delta - ||p||) = 0``, ``B + sigma I >= 0`` are solved
case by case:

* **interior** (``B > 0`` and ``||B^{-1} g|| <= Delta``): ``sigma = 0``;
* **sigma = -lambda_min** when every component of ``g`` along the ``lambda_min`` eigenspace vanishes and
  the remaining step ``p_hat`` fits: in the *hard case* (``lambda_min < 0``) the step is completed to the
  boundary with an eigenvector of ``lambda_min`` — either in ``span(Psi)`` (``HARD_PARALLEL``) or in its
  orthogonal complement, where ``lambda_min = gamma`` (``HARD_COMPLEMENT``); with ``lambda_min = 0`` the
  minimum-norm step is returned (``SINGULAR``);
* **boundary** otherwise: a fixed number (``NEWTON_ITERATIONS``) of Newton steps on the secular
  equation ``1/||p(sigma)|| - 1/Delta = 0``, which is concave and increasing, started at a point to
  the left of the root (``sigma = 0`` when ``B > 0``, else ``max(-lambda_min, max_i(|a_i| / Delta -
  lambda_i))``), so it converges monotonically. The iteration runs in the shifted variable
  ``t = sigma + min(lambda_min, 0)``, which keeps tiny components of ``g`` along the ``lambda_min``
  eigenvector accurate (a defect of the reference implementation was a
  "zero guard" that froze the iteration there and returned ``||p|| >> Delta``).

The compiled solve is straight-line device code: no ``while`` (the Newton iterations are unrolled
and freeze once converged) and every case is computed and chosen by ``select``, so an accelerator
never waits for the host. One choice remains, static, ``straight_line`` of :func:`solve` and
:func:`solve_memory` — how ``||g_perp||`` and ``g_perp`` are obtained:

* ``True``: ``g_perp`` is always formed explicitly with one re-projection ("twice is enough"):
  two passes over ``X`` more than the minimum, and **no** ``conditional`` at all. Best on GPU/TPU,
  where a ``conditional`` is a device-to-host round trip and two extra passes cost microseconds.
* ``False``: the Gram formula ``||g_perp||^2 = ||g||^2 - ||g_par||^2``; only when it cancels
  (``||g_perp|| < 0.1 ||g||``, :data:`EXPLICIT_PERP`) the explicit, re-orthogonalised ``g_perp``
  is formed, behind **one** ``lax.cond``; otherwise the step is ``p = c g + X v`` (``g_perp`` never
  formed). Two passes over ``X`` (the minimum) in the common case. Best on CPU, where the solve is
  bandwidth bound and a branch costs nothing.
* ``None`` (default): resolved at trace time, ``False`` on the CPU backend, ``True`` otherwise.

Measured on CPU (2 shared cores, float32, m = 5, ``benchmarks/obs_variants.py``, results in
``benchmarks/results/obs_variants.json``, medians of 9 interleaved blocks against the solver before
the rewrite, n = 1e4 / 1e5 / 5e5 / 1.8e6): ``straight_line=True`` costs 1.2 / 1.8 / 1.9 / 1.9x in
:func:`solve_memory` (n = 1.8e6: 73 ms against 39 ms) and 1.1 / 1.4 / 1.3 / 1.4x in :func:`solve`
(its passes are over one explicit basis instead of ``S`` and ``Y``); ``straight_line=False`` costs
1.00 / 0.97 / 0.99 / 0.97x in :func:`solve_memory` and 1.00 / 1.08 / 1.00 / 1.23x in
:func:`solve`, where the excess at n = 1.8e6 is the explicit CholeskyQR2 basis (forming ``Q1``
and ``Q1^T Q1``), not the complement. Under ``jax.vmap`` the ``lax.cond`` becomes a ``select``
(both branches run), so ``False`` then costs what ``True`` does.

The solve is split into named steps, each testable alone: :func:`orthonormalize`, :func:`spectral`,
:func:`project`, :func:`secular`, :func:`newton`, :func:`hard_case`, :func:`assemble`.

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

#: Newton steps on the secular equation, unrolled. Measured over the test set (tests/test_obs.py:
#: every case, float32 and float64, tiny components along the lambda_min eigenvector down to
#: 1e-14; every batch asserts convergence): at most 9 are needed; the rest freeze at the root.
NEWTON_ITERATIONS = 12


class OBSResult(NamedTuple):
    """Solution of the L-SR1 trust-region subproblem.

    Attributes:
      step: the minimiser ``p*`` (shape ``(n,)``, dtype of ``g``).
      sigma: the Lagrange multiplier ``sigma* >= 0`` of the constraint.
      predicted_decrease: ``-q(p*) = -(g^T p* + 1/2 p*^T B p*) >= 0``.
      step_norm: ``||p*||``.
      case: one of ``INTERIOR, BOUNDARY, HARD_PARALLEL, HARD_COMPLEMENT, SINGULAR`` (int32).
      lambda_min: the smallest eigenvalue of ``B``.
      newton_iterations: Newton steps taken before convergence on the secular equation (0 outside
        the boundary case); ``NEWTON_ITERATIONS`` are always executed, converged ones change nothing.
    """

    step: Array
    sigma: Array
    predicted_decrease: Array
    step_norm: Array
    case: Array
    lambda_min: Array
    newton_iterations: Array


# ---------------------------------------------------------------------------------------------
# The basis X whose columns span span(Psi): P_par = X @ coeff.


class Basis(NamedTuple):
    """``X = Psi = Y - gamma S`` (``s`` given; never formed) or an explicit ``(n, m)`` matrix ``y``."""

    s: Array | None
    y: Array
    gamma: Array

    def t(self, v: Array) -> Array:
        """``X^T v`` (one pass over ``X``)."""
        v = v.astype(self.y.dtype)
        out = jnp.matmul(v, self.y, precision=_HIGHEST)
        if self.s is not None:
            out = out - self.gamma * jnp.matmul(v, self.s, precision=_HIGHEST)
        return out

    def times(self, c: Array) -> Array:
        """``X c`` (one pass over ``X``)."""
        c = c.astype(self.y.dtype)
        out = jnp.matmul(self.y, c, precision=_HIGHEST)
        if self.s is not None:
            out = out - jnp.matmul(self.s, self.gamma * c, precision=_HIGHEST)
        return out

    def rows(self, k: int) -> Array:
        """The first ``k`` rows of ``X``."""
        if self.s is None:
            return self.y[:k]
        return self.y[:k] - self.gamma * self.s[:k]


class Orthonormal(NamedTuple):
    """``X T`` has orthonormal columns where ``keep``; ``X = (X T) T_pinv`` on the valid columns."""

    t: Array  # (m, m), zero columns where not kept
    t_pinv: Array  # (m, m), zero rows where not kept
    keep: Array  # (m,) bool


def orthonormalize(gram: Array, mask: Array, eps: float, shift: float = 0.0) -> Orthonormal:
    """``T`` with ``X T`` orthonormal on the kept columns, from ``G = X^T X`` (``m x m``).

    ``G`` is scaled to unit diagonal (columns of ``X`` with a negligible norm are dropped) and
    eigendecomposed, ``D^{-1/2} G D^{-1/2} = V diag(s) V^T``; ``T = D^{-1/2} V diag(w)`` with
    ``w = max(s, shift)^{-1/2}``. Without ``shift`` the directions with ``s <= 10 m eps max(s)`` are
    dropped (numerically dependent); with ``shift > 0`` every valid direction is kept and clamped, so
    ``||X T|| <= ~1`` (the first round of shifted CholeskyQR).

    Returns:
      An :class:`Orthonormal` ``(T, T_pinv, keep)``; ``T_pinv = diag(1/w) V^T D^{1/2}`` on the kept
      rows, so ``R = (X T)^T X = (T^T G T) T_pinv`` needs no product with the ill-conditioned ``G``.
    """
    m = mask.shape[0]
    d = jnp.diag(gram)
    d_max = jnp.max(jnp.where(mask, d, 0.0))
    cols = mask & (d > (100.0 * eps) ** 2 * d_max) & (d > 0)
    scale = jnp.where(cols, jax.lax.rsqrt(jnp.where(cols, d, 1.0)), 0.0)
    outer = cols[:, None] & cols[None, :]
    corr = jnp.where(outer, scale[:, None] * gram * scale[None, :], 0.0)
    # Pad the unused coordinates with -1: the valid block is PSD, so the padding sorts first and
    # its eigenvectors cannot mix with valid ones.
    corr = corr + jnp.diag(jnp.where(cols, 0.0, -1.0))
    s_hat, v = jnp.linalg.eigh(corr)
    real = s_hat > -0.5
    if shift > 0.0:
        keep = real
        s_hat = jnp.maximum(s_hat, shift * jnp.max(s_hat))
    else:
        keep = real & (s_hat > 10.0 * m * eps * jnp.max(s_hat))
    root = jnp.sqrt(jnp.where(keep, s_hat, 1.0))
    w = jnp.where(keep, 1.0 / root, 0.0)
    sqrt_d = jnp.where(cols, jnp.sqrt(jnp.where(cols, d, 1.0)), 0.0)
    t_pinv = jnp.where(keep[:, None], root[:, None] * v.T * sqrt_d[None, :], 0.0)
    return Orthonormal((scale[:, None] * v) * w[None, :], t_pinv, keep)


class Spectral(NamedTuple):
    """Spectral data of ``B`` in the basis ``P = [P_par, P_perp]``, ``P_par = X coeff``."""

    lam_par: Array  # (m,) eigenvalues lh + gamma of B on span(Psi) (gamma where not valid)
    valid_par: Array  # (m,) bool; the valid ones come first
    coeff: Array  # (m, m) with P_par = X coeff (zero columns where not valid)
    rank: Array  # int32 rank of P_par
    gamma: Array  # B_0 = gamma I, the eigenvalue of B on the complement
    has_perp: Array  # bool: n > rank (the complement is not empty)


def spectral(r: Array, m_inv: Array, t: Array, keep: Array, mask: Array, gamma: Array,
             n: int) -> Spectral:
    """Eigendecomposition of ``Psi M Psi^T`` on ``span(Psi)`` from ``R = Q^T Psi``, ``Q = X T``.

    ``K = R M R^T = U diag(lh) U^T`` (``M = (M^{-1})^{-1}`` of the valid pairs), so
    ``Psi M Psi^T = (Q U) diag(lh) (Q U)^T`` and ``P_par = X (T U)``. A singular ``M^{-1}`` falls back
    to ``B = gamma I``.
    """
    m = mask.shape[0]
    ct = r.dtype
    mat = lsr1.invert_masked(m_inv, mask)
    k = r @ mat @ r.T
    k = 0.5 * (k + k.T)
    k = jnp.where(jnp.all(jnp.isfinite(k)), k, 0.0)
    rank = jnp.sum(keep.astype(jnp.int32))
    # Pad the dropped directions above the Gershgorin bound: they sort last.
    bound = jnp.max(jnp.sum(jnp.abs(k), axis=1))
    k = jnp.where(keep[:, None] & keep[None, :], k, 0.0)
    k = k + jnp.diag(jnp.where(keep, 0.0, 4.0 * bound + 1.0))
    lam_hat, u = jnp.linalg.eigh(k)
    valid = jnp.arange(m) < rank
    coeff = jnp.where(valid[None, :], t @ u, 0.0)
    gamma = gamma.astype(ct)
    lam = jnp.where(valid, lam_hat + gamma, gamma)
    return Spectral(lam, valid, coeff, rank, gamma, n - rank > 0)


def _implicit_basis(s: Array, y: Array, gamma: Array, mask: Array, psi_psi: Array, s_psi: Array,
                    eps: float) -> tuple[Basis, Spectral]:
    """``X = Psi`` and one round of :func:`orthonormalize` on the cached ``Psi^T Psi``."""
    psi_psi, m_inv = lsr1.small_matrices(psi_psi, s_psi, mask)
    t, _, keep = orthonormalize(psi_psi, mask, eps)
    r = t.T @ psi_psi
    return Basis(s, y, gamma), spectral(r, m_inv, t, keep, mask, gamma, s.shape[0])


def _tall_times_small(x: Array, c: Array) -> Array:
    """``x @ c`` for a tall ``(n, m)`` ``x`` and a small ``(m, k)`` ``c`` as ``m`` broadcast
    products: one fused elementwise pass. (XLA:CPU runs the ``dot`` 2-3x slower, 55 ms against
    24 ms at n = 1.8e6, m = 5.)"""
    out = x[:, 0, None] * c[0][None, :]
    for i in range(1, x.shape[1]):
        out = out + x[:, i, None] * c[i][None, :]
    return out


def _explicit_basis(gamma: Array, mask: Array, psi: Array, psi_psi: Array, s_psi: Array,
                    eps: float) -> tuple[Basis, Spectral]:
    """Shifted CholeskyQR2: ``Q1 = Psi T1`` formed explicitly, then ``Q = Q1 T2`` orthonormal."""
    m = mask.shape[0]
    ct = psi_psi.dtype
    eps_ct = float(jnp.finfo(ct).eps)
    psi_psi, m_inv = lsr1.small_matrices(psi_psi, s_psi, mask)
    first = orthonormalize(psi_psi, mask, eps_ct, shift=10.0 * m * eps_ct)
    q1 = _tall_times_small(psi.astype(ct), first.t)
    g2 = jnp.matmul(q1.T, q1, precision=_HIGHEST)  # accurate: Q1 is well conditioned
    g2 = 0.5 * (g2 + g2.T)
    t2, _, keep = orthonormalize(g2, first.keep, eps)
    r = t2.T @ g2 @ first.t_pinv  # Q^T Psi with Q = Q1 T2
    return Basis(None, q1, gamma), spectral(r, m_inv, t2, keep, mask, gamma, psi.shape[0])


# ---------------------------------------------------------------------------------------------
# Coordinates of g.


class Projection(NamedTuple):
    """``g`` in the basis ``P``: ``g_par = P_par^T g`` and ``g_perp = h - P_par h_par``.

    With the explicit complement ``h = g - P_par g_par`` and ``h_par = P_par^T h`` (re-projection);
    with the Gram formula ``h = g`` and ``h_par = g_par`` (``g_perp`` is then never formed: the
    step folds it into its one product with ``X``).
    """

    g_par: Array  # (m,)
    a_perp: Array  # ||g_perp||, 0 when span(Psi) is the whole space
    h: Array  # (n,)
    h_par: Array  # (m,)
    g_norm: Array


#: The Gram formula ``||g_perp||^2 = ||g||^2 - ||g_par||^2`` is trusted while ``||g_perp|| >=
#: EXPLICIT_PERP * ||g||`` (cancellation loses at most two digits); below, ``g_perp`` is formed.
EXPLICIT_PERP = 0.1


def _explicit_perp(basis: Basis, spec: Spectral, g: Array, g_par: Array
                   ) -> tuple[Array, Array, Array]:
    """``h = g - P_par g_par`` (one pass over ``X``), ``h_par = P_par^T h`` (a second pass) and
    ``||g_perp|| = sqrt(||h||^2 - ||h_par||^2)``."""
    ct = spec.lam_par.dtype
    h = g - basis.times(spec.coeff @ g_par).astype(g.dtype)
    h_par = spec.coeff.T @ basis.t(h).astype(ct)
    h_norm2 = jnp.vdot(h, h).astype(ct)
    return h, h_par, jnp.sqrt(jnp.maximum(h_norm2 - jnp.sum(h_par**2), 0.0))


def project(basis: Basis, spec: Spectral, g: Array, straight_line: bool = True) -> Projection:
    """Coordinates of ``g``: ``g_par = P_par^T g`` (one pass over ``X``) and ``||g_perp||``.

    ``||g||^2 - ||g_par||^2`` cancels when ``g`` is nearly inside ``span(Psi)``, so the residual
    ``h = g - P_par g_par`` is formed (one pass) and re-projected (``h_par = P_par^T h``, a second
    pass; "twice is enough"): ``g_perp = h - P_par h_par`` is orthogonal to ``span(Psi)`` to
    round-off relative to ``||g_perp||``, which the ``1/tau`` of the step would otherwise amplify.

    ``straight_line`` (static) chooses when: ``True`` always (no ``conditional``: two passes over
    ``X`` on every solve); ``False`` only when the Gram formula gives ``||g_perp|| <
    EXPLICIT_PERP ||g||``, through one ``lax.cond`` (otherwise ``h = g``, ``h_par = g_par``).
    """
    ct = spec.lam_par.dtype
    g_norm2 = jnp.vdot(g, g).astype(ct)
    g_norm = jnp.sqrt(g_norm2)
    g_par = spec.coeff.T @ basis.t(g).astype(ct)
    if straight_line:
        h, h_par, a_perp = _explicit_perp(basis, spec, g, g_par)
    else:
        a_gram = jnp.sqrt(jnp.maximum(g_norm2 - jnp.sum(g_par**2), 0.0))
        explicit = spec.has_perp & (a_gram < EXPLICIT_PERP * g_norm)
        refs = (g, g_par, a_gram, spec.coeff, basis)
        h, h_par, a_perp = jax.lax.cond(
            explicit,
            lambda: match_vma(_explicit_perp(basis, spec, g, g_par), *refs),
            lambda: match_vma((g, g_par, a_gram), *refs),
        )
    a_perp = jnp.where(spec.has_perp, a_perp, 0.0)
    return Projection(g_par, a_perp, h, h_par, g_norm)


# ---------------------------------------------------------------------------------------------
# The secular equation.


class Secular(NamedTuple):
    """The ``(m + 1)``-term secular problem ``||p(t)||^2 = sum_i a_i^2 / (d_i + t)^2`` and its case.

    ``t = sigma - sigma_low``, ``sigma_low = max(-lambda_min, 0)``; index ``m`` is the complement.
    """

    lam: Array  # (m+1,) eigenvalues (m parallel, then gamma)
    a: Array  # (m+1,) coordinates of g (tiny components on the lambda_min eigenspace zeroed)
    valid: Array  # (m+1,) bool
    d: Array  # (m+1,) lambda_i + sigma_low >= 0, computed without cancellation (1 where invalid)
    active: Array  # valid & (a != 0)
    pole: Array  # valid directions of the lambda_min eigenspace (B not positive definite)
    lam_min: Array
    tol_lam: Array
    pos_def: Array  # lambda_min > tol_lam
    boundary: Array  # the solution has ||p|| = Delta and sigma > sigma_low
    t_start: Array  # Newton start, left of the root


def secular(spec: Spectral, proj: Projection, radius: Array | float, eps: float) -> Secular:
    """Set up the secular equation and decide the case (tolerances relative to ``max|lambda|``,
    ``||g||``; ``eps`` of the parameter dtype)."""
    ct = spec.lam_par.dtype
    m = spec.lam_par.shape[0]
    delta = jnp.asarray(radius, ct)
    lam = jnp.concatenate([spec.lam_par, spec.gamma[None]])
    valid = jnp.concatenate([spec.valid_par, spec.has_perp[None]])
    a = jnp.where(valid, jnp.concatenate([proj.g_par, proj.a_perp[None]]), 0.0)

    lam_min = jnp.min(jnp.where(valid, lam, jnp.inf))
    lam_min = jnp.where(jnp.isfinite(lam_min), lam_min, spec.gamma)
    lam_scale = jnp.max(jnp.where(valid, jnp.abs(lam), 0.0))
    tol_lam = 100.0 * eps * lam_scale
    pos_def = lam_min > tol_lam
    d = jnp.where(lam_min >= 0, lam, lam - lam_min)
    d = jnp.where(valid, jnp.maximum(d, 0.0), 1.0)
    pole = valid & ~pos_def & (jnp.where(lam_min >= 0, lam - lam_min, d) <= tol_lam)
    tiny = jnp.full((m + 1,), 100.0 * eps, ct) * proj.g_norm
    a = jnp.where(pole & (jnp.abs(a) <= tiny), 0.0, a)
    active = valid & (a != 0)
    pole_hit = jnp.any(pole & active)  # g has a component along the lambda_min eigenspace
    # Step at sigma_low (t = 0), poles excluded.
    w0 = jnp.where(active & ~pole, a / d, 0.0)
    boundary = pole_hit | (jnp.sqrt(jnp.sum(w0**2)) > delta)
    t_start = jnp.where(
        pos_def, 0.0, jnp.maximum(0.0, jnp.max(jnp.where(active, jnp.abs(a) / delta - d, 0.0)))
    )
    return Secular(lam, a, valid, d, active, pole, lam_min, tol_lam, pos_def, boundary, t_start)


def newton(sec: Secular, radius: Array | float, iterations: int = NEWTON_ITERATIONS
           ) -> tuple[Array, Array, Array]:
    """``iterations`` unrolled Newton steps on ``phi(t) = 1/||p(t)|| - 1/Delta`` from ``t_start``.

    ``phi`` is increasing and concave, so Newton from the left of the root increases ``t``
    monotonically to the root, and at the root it stays there (to rounding): the steps need no
    freezing once converged. Convergence (``| ||p|| - Delta | <= 4 eps Delta``, an update below
    ``eps t``, or a non-finite ``phi``) is only recorded, per step, for the diagnostics. No ``while``
    loop: the trip count is static.

    The iterates carry no "done" flag on purpose: a flag chained through the unrolled steps is a
    chain of scalar selects that XLA's fusion copies into every later step (quadratic program size,
    measured by ``benchmarks/compile_cost.py``).

    Returns:
      ``(t, steps, converged)``: the root (0 outside the boundary case), the number of steps taken
      up to the first one that met the convergence test (``iterations`` if none did), and whether
      any step met it.
    """
    ct = sec.d.dtype
    eps_ct = float(jnp.finfo(ct).eps)
    delta = jnp.asarray(radius, ct)
    a2 = jnp.where(sec.active, sec.a**2, 0.0)
    t = match_vma(sec.t_start, a2)
    conv = []
    for _ in range(iterations):
        den = jnp.where(sec.active, sec.d + t, 1.0)
        n2 = jnp.sum(a2 / den**2)
        n3 = jnp.sum(a2 / den**3)
        norm = jnp.sqrt(n2)
        phi = 1.0 / norm - 1.0 / delta
        dphi = n3 / (norm * n2)
        t_new = jnp.maximum(t - phi / dphi, 0.0)
        conv.append((jnp.abs(norm - delta) <= 4.0 * eps_ct * delta) | (
            jnp.abs(t_new - t) <= eps_ct * jnp.maximum(t, 1e-300)
        ) | ~jnp.isfinite(phi))
        t = jnp.where(jnp.isfinite(t_new), t_new, t)
    hits = jnp.stack(conv)
    converged = jnp.any(hits)
    steps = jnp.where(converged, jnp.argmax(hits).astype(jnp.int32) + 1, iterations)
    boundary = sec.boundary
    return (jnp.where(boundary, t, 0.0), jnp.where(boundary, steps, 0).astype(jnp.int32),
            converged | ~boundary)


# ---------------------------------------------------------------------------------------------
# Hard case and step assembly.


class HardCase(NamedTuple):
    """Completion of the step along an eigenvector ``u`` of ``lambda_min`` (zero when not hard)."""

    hard: Array  # bool: sigma* = -lambda_min < 0 with ||p_hat|| < Delta
    use_par: Array  # bool: u in span(Psi) (column i_par of P_par), else in the complement
    i_par: Array  # int32
    alpha_par: Array  # coefficient of u along P_par[:, i_par]
    alpha_perp: Array  # coefficient of u in the complement
    j: Array  # int32: u = (e_j - P_par P_par[j]^T) / u_norm in the complement
    p_row: Array  # (m,) P_par[j]
    u_norm: Array
    g_u: Array  # u^T g


def hard_case(basis: Basis, spec: Spectral, proj: Projection, sec: Secular, coord: Array,
              radius: Array | float, g: Array) -> HardCase:
    """``p* = p_hat + alpha u`` with ``alpha = sqrt(Delta^2 - ||p_hat||^2)`` (signed so that
    ``u^T g alpha <= 0``). For ``lambda_min = gamma`` the eigenvector is found among
    ``e_j - P_par P_par[j]^T`` for the first ``m + 1`` rows ``j`` (the one of largest norm)."""
    m = spec.lam_par.shape[0]
    n = g.shape[0]
    ct = spec.lam_par.dtype
    delta = jnp.asarray(radius, ct)
    hard = ~sec.boundary & ~sec.pos_def & (sec.lam_min < -sec.tol_lam)
    pole_par = sec.pole[:m]
    i_par = jnp.argmax(pole_par).astype(jnp.int32)
    use_par = jnp.any(pole_par)
    alpha = jnp.sqrt(jnp.maximum(delta**2 - jnp.sum(coord**2), 0.0))
    alpha = jnp.where(hard, alpha, 0.0)
    rows = min(m + 1, n)
    p_rows = basis.rows(rows).astype(ct) @ spec.coeff  # (rows, m)
    row_norm2 = jnp.sum(p_rows**2, axis=1)
    j = jnp.argmin(row_norm2).astype(jnp.int32)
    u_norm = jnp.sqrt(jnp.maximum(1.0 - row_norm2[j], 0.0))
    g_u = (g[j].astype(ct) - proj.g_par @ p_rows[j]) / jnp.where(u_norm > 0, u_norm, 1.0)
    alpha_par = jnp.where(use_par, -jnp.where(sec.a[i_par] > 0, 1.0, -1.0) * alpha, 0.0)
    alpha_perp = jnp.where(use_par, 0.0, -jnp.where(g_u > 0, 1.0, -1.0) * alpha)
    return HardCase(hard, use_par, i_par, alpha_par, alpha_perp, j, p_rows[j], u_norm, g_u)


class Assembled(NamedTuple):
    step: Array
    q: Array  # model value q(step)
    step_norm: Array


def assemble(basis: Basis, spec: Spectral, proj: Projection, sec: Secular, t_star: Array,
             hc: HardCase, radius: Array | float, dtype: jnp.dtype) -> Assembled:
    """``p = coef_g g_perp + P_par c + beta e_j`` (one pass over ``X``) and ``q(p)`` from coordinates.

    ``c_i = -a_i / (d_i + t)`` on the active parallel directions (plus ``alpha_par`` in the hard
    case), ``coef_g = -1/tau`` with ``tau = gamma + sigma`` on the complement and
    ``beta = alpha_perp / u_norm``. Round-off can make ``||p||`` exceed ``Delta`` by a few ulps: the
    norm is measured on the assembled vector and the step scaled back (``q`` accordingly).
    """
    m = spec.lam_par.shape[0]
    ct = spec.lam_par.dtype
    delta = jnp.asarray(radius, ct)
    den = sec.d + t_star
    coord = jnp.where(sec.active & (sec.boundary | ~sec.pole),
                      -sec.a / jnp.where(sec.active, den, 1.0), 0.0)
    coord_par = coord[:m].at[hc.i_par].add(hc.alpha_par)
    tau = sec.d[m] + t_star
    perp_active = sec.active[m] & (sec.boundary | ~sec.pole[m])
    coef_g = jnp.where(perp_active, -1.0 / jnp.where(perp_active, tau, 1.0), 0.0)
    beta = jnp.where(hc.u_norm > 0, hc.alpha_perp / jnp.where(hc.u_norm > 0, hc.u_norm, 1.0), 0.0)

    lin = proj.g_par @ coord_par + coef_g * proj.a_perp**2 + hc.alpha_perp * hc.g_u
    quad = 0.5 * (
        jnp.sum(jnp.where(spec.valid_par, spec.lam_par, 0.0) * coord_par**2)
        + spec.gamma * (coef_g**2 * proj.a_perp**2 + hc.alpha_perp**2)
    )
    # g_perp = h - P_par h_par and u = (e_j - P_par p_row) / u_norm fold into one product with X.
    v = spec.coeff @ (coord_par - coef_g * proj.h_par - beta * hc.p_row)
    step = coef_g.astype(dtype) * proj.h + basis.times(v).astype(dtype)
    step = step.at[hc.j].add(beta.astype(dtype))
    norm_actual = jnp.sqrt(jnp.vdot(step, step).astype(ct))
    factor = jnp.where(norm_actual > delta, delta / jnp.where(norm_actual > 0, norm_actual, 1.0),
                       1.0)
    step = step * factor.astype(dtype)
    q = factor * lin + factor**2 * quad
    return Assembled(step, q, jnp.minimum(norm_actual, delta))


def _solve(g: Array, basis: Basis, spec: Spectral, radius: Array | float,
           straight_line: bool) -> OBSResult:
    dtype = g.dtype
    eps = float(jnp.finfo(dtype).eps)
    proj = project(basis, spec, g, straight_line)
    sec = secular(spec, proj, radius, eps)
    t_star, steps, _ = newton(sec, radius, NEWTON_ITERATIONS)
    den = sec.d + t_star
    coord = jnp.where(sec.active & (sec.boundary | ~sec.pole),
                      -sec.a / jnp.where(sec.active, den, 1.0), 0.0)
    hc = hard_case(basis, spec, proj, sec, coord, radius, g)
    out = assemble(basis, spec, proj, sec, t_star, hc, radius, dtype)
    sigma_low = jnp.maximum(-sec.lam_min, 0.0)
    sigma = jnp.where(sec.boundary, sigma_low + t_star, jnp.where(sec.pos_def, 0.0, sigma_low))
    case = jnp.where(
        sec.boundary,
        BOUNDARY,
        jnp.where(
            sec.pos_def,
            INTERIOR,
            jnp.where(hc.hard, jnp.where(hc.use_par, HARD_PARALLEL, HARD_COMPLEMENT), SINGULAR),
        ),
    ).astype(jnp.int32)
    return OBSResult(
        step=out.step,
        sigma=sigma,
        predicted_decrease=-out.q,
        step_norm=out.step_norm,
        case=case,
        lambda_min=sec.lam_min,
        newton_iterations=steps,
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


def resolve_straight_line(straight_line: bool | None) -> bool:
    """The variant of the complement step: ``straight_line`` itself, or for ``None`` (resolved at
    trace time) ``False`` on the CPU backend and ``True`` on any other (GPU, TPU)."""
    if straight_line is None:
        return jax.default_backend() != "cpu"
    if not isinstance(straight_line, bool | np.bool_):
        raise TypeError(
            f"obs.solve: straight_line must be True, False or None (a static Python bool), got "
            f"{straight_line!r}; pass it as a keyword (static under jax.jit)."
        )
    return bool(straight_line)


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
    *,
    straight_line: bool | None = None,
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
        otherwise ``B = gamma I`` is used. ``Psi^T Psi`` may be ill-conditioned: the basis of
        ``span(Psi)`` is formed by shifted CholeskyQR2 (module docstring), at the cost of two more
        passes over an ``(n, m)`` matrix than :func:`solve_memory`.
      straight_line: static choice of how ``g_perp`` is handled (module docstring, "Variants"):
        ``True``: always formed explicitly, no ``conditional`` in the compiled solve (best on
        GPU/TPU); ``False``: Gram formula, ``g_perp`` formed only when ``||g_perp|| < 0.1 ||g||``
        behind one ``lax.cond`` (best on CPU); ``None`` (default): ``False`` on the CPU backend,
        ``True`` otherwise.

    Returns:
      An :class:`OBSResult`.
    """
    g = jnp.asarray(g)
    S = jnp.asarray(S, g.dtype)  # noqa: N806
    Y = jnp.asarray(Y, g.dtype)  # noqa: N806
    _check_inputs(g, S, Y)
    _check_radius(radius)
    straight_line = resolve_straight_line(straight_line)
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
    eps = float(jnp.finfo(g.dtype).eps)
    # Full float32 products for the small algebra too (no TF32 / bf16 passes on accelerators).
    with jax.default_matmul_precision("highest"):
        psi, psi_psi, s_psi = lsr1.gram_matrices(S, Y, gamma, ct)
        outer = mask[:, None] & mask[None, :]
        psi_psi, s_psi = (jnp.where(outer, x, 0.0) for x in (psi_psi, s_psi))
        basis, spec = _explicit_basis(gamma, mask, psi, psi_psi, s_psi, eps)
        return _solve(g, basis, spec, radius, straight_line)


def solve_memory(g: Array, memory: lsr1.LSR1Memory, radius: Array | float, *,
                 straight_line: bool | None = None) -> OBSResult:
    """:func:`solve` for the L-SR1 matrix of ``memory``, reusing its Gram matrices (``O(nm)``).

    The basis comes from one eigendecomposition of the cached ``Psi^T Psi``, accurate because
    :func:`apts_jax.lsr1.update` keeps its scaled condition number below ``1 / cond_tol``.
    ``straight_line`` as in :func:`solve`.
    """
    g = jnp.asarray(g)
    _check_inputs(g, memory.s, memory.y)
    _check_radius(radius)
    straight_line = resolve_straight_line(straight_line)
    g = g.astype(memory.s.dtype)
    eps = float(jnp.finfo(g.dtype).eps)
    with jax.default_matmul_precision("highest"):
        basis, spec = _implicit_basis(memory.s, memory.y, memory.gamma, memory.mask,
                                      memory.psi_psi, memory.s_psi, eps)
        return _solve(g, basis, spec, radius, straight_line)
