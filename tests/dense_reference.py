"""Dense float64 references for the L-SR1 memory and the trust-region subproblem.

Pure numpy/scipy, independent of ``apts_jax``. Everything here works on explicit ``n x n``
matrices and is meant for small test problems only.

* :func:`sr1_dense` -- the SR1 recursion ``B_{k+1} = B_k + r r^T / (r^T s)``, ``r = y - B_k s``,
  from ``B_0 = gamma I`` over the pairs in order (oldest first).
* :func:`compact_dense` -- the compact form ``gamma I + Psi M Psi^T`` (``Psi = Y - gamma S``,
  ``M^{-1} = D + L + L^T - gamma S^T S``); equal to :func:`sr1_dense` whenever every recursion
  denominator is nonzero. Used to cross-check the recursion, not as the primary reference.
* :func:`trs_dense` -- global minimiser of ``q(p) = g^T p + 1/2 p^T B p`` s.t. ``||p|| <= radius``
  from ``numpy.linalg.eigh(B)`` (Moré-Sorensen optimality conditions).
* :func:`model_value` -- ``q(p)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.optimize import brentq

INTERIOR = "interior"
BOUNDARY = "boundary"
HARD = "hard"
SINGULAR = "singular"


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def sr1_dense(S, Y, gamma, skip_tol: float | None = None) -> np.ndarray:
    """Dense SR1 recursion over the columns of ``S``, ``Y`` (oldest first) from ``B_0 = gamma I``.

    ``B_{k+1} = B_k + r r^T / (r^T s)`` with ``r = y - B_k s``. With ``skip_tol`` given, a pair is
    skipped when ``|s^T r| < skip_tol ||s|| ||r||`` (Nocedal & Wright eq. 6.26) or when it is not
    finite. Without ``skip_tol`` only pairs with ``r = 0`` exactly (no-op updates) are skipped; a
    zero denominator with ``r != 0`` raises ``ZeroDivisionError``.
    """
    S, Y = _f64(S), _f64(Y)
    n = S.shape[0]
    B = float(gamma) * np.eye(n)
    for i in range(S.shape[1]):
        s, y = S[:, i], Y[:, i]
        if not (np.all(np.isfinite(s)) and np.all(np.isfinite(y))):
            if skip_tol is None:
                raise ValueError("non-finite pair")
            continue
        r = y - B @ s
        den = float(s @ r)
        rn = float(np.linalg.norm(r))
        if skip_tol is not None:
            if abs(den) < skip_tol * float(np.linalg.norm(s)) * rn:
                continue
        elif rn == 0.0:
            continue
        elif den == 0.0:
            raise ZeroDivisionError("SR1 denominator s^T (y - B s) is zero")
        B = B + np.outer(r, r) / den
        B = 0.5 * (B + B.T)
    return B


def sr1_denominators(S, Y, gamma) -> np.ndarray:
    """Relative SR1 denominators ``s_k^T r_k / (||s_k|| ||r_k||)`` along the recursion (no skip)."""
    S, Y = _f64(S), _f64(Y)
    n = S.shape[0]
    B = float(gamma) * np.eye(n)
    out = []
    for i in range(S.shape[1]):
        s, y = S[:, i], Y[:, i]
        r = y - B @ s
        den = float(s @ r)
        scale = float(np.linalg.norm(s) * np.linalg.norm(r))
        out.append(den / scale if scale > 0 else 0.0)
        if scale > 0 and den != 0.0:
            B = B + np.outer(r, r) / den
    return np.asarray(out)


def compact_dense(S, Y, gamma) -> np.ndarray:
    """Compact L-SR1 matrix ``gamma I + Psi M Psi^T`` (Byrd, Nocedal & Schnabel 1994)."""
    S, Y = _f64(S), _f64(Y)
    n, k = S.shape
    B = float(gamma) * np.eye(n)
    if k == 0:
        return B
    SY = S.T @ Y
    Minv = np.tril(SY, -1) + np.tril(SY, -1).T + np.diag(np.diag(SY)) - float(gamma) * (S.T @ S)
    Psi = Y - float(gamma) * S
    B = B + Psi @ np.linalg.solve(Minv, Psi.T)
    return 0.5 * (B + B.T)


def compact_conditioning(S, Y, gamma) -> tuple[float, float]:
    """``(cond(M^{-1}), cond(Psi^T Psi))`` in the 2-norm (``inf`` when singular)."""
    S, Y = _f64(S), _f64(Y)
    if S.shape[1] == 0:
        return 1.0, 1.0
    SY = S.T @ Y
    Minv = np.tril(SY, -1) + np.tril(SY, -1).T + np.diag(np.diag(SY)) - float(gamma) * (S.T @ S)
    Psi = Y - float(gamma) * S
    return float(np.linalg.cond(Minv)), float(np.linalg.cond(Psi.T @ Psi))


def model_value(g, B, p) -> float:
    """``q(p) = g^T p + 1/2 p^T B p`` in float64."""
    g, B, p = _f64(g), _f64(B), _f64(p)
    return float(g @ p + 0.5 * p @ (B @ p))


class TRSSolution(NamedTuple):
    p: np.ndarray         # a global minimiser (the minimum-norm one in the singular case)
    sigma: float          # multiplier sigma* >= 0
    model_value: float    # q(p)
    unique: bool          # False in the hard case and in the singular case with ||p|| < radius
    case: str             # INTERIOR, BOUNDARY, HARD or SINGULAR
    cond: float           # (lambda_max + sigma) / (lambda_min + sigma) (inf if singular)
    lambda_min: float
    eigvec_min: np.ndarray  # a unit eigenvector of lambda_min


def trs_dense(g, B, radius, *, hard_tol: float = 1e-10, lam_tol: float = 1e-12) -> TRSSolution:
    """Global minimiser of ``g^T p + 1/2 p^T B p`` s.t. ``||p|| <= radius``, via ``eigh(B)``.

    With ``B = V diag(lam) V^T`` and ``a = V^T g``, ``p(sigma) = -V (a / (lam + sigma))``.

    * interior: ``lam_min > 0`` and ``||p(0)|| <= radius``;
    * ``sigma* = -lam_min`` (``lam_min <= 0``, the components of ``a`` on the ``lam_min``
      cluster are ``<= hard_tol ||g||``, and ``p_hat = p(-lam_min)`` without those components
      has ``||p_hat|| <= radius``): singular PSD when ``|lam_min| <= lam_tol * max|lam|``
      (``p = p_hat``, the minimum-norm minimiser), hard case otherwise
      (``p = p_hat + alpha u_min``, ``alpha`` bringing ``p`` to the boundary);
    * boundary otherwise: ``||p(sigma)|| = radius`` with ``sigma > max(0, -lam_min)``, solved with
      ``brentq`` in the shifted variable ``t = sigma + lam_min`` (keeps relative accuracy in
      ``lam_i + sigma`` when the root is close to the pole).

    All tolerances are relative (to ``||g||`` and ``max|lam|``).
    """
    g = _f64(g)
    B = _f64(B)
    B = 0.5 * (B + B.T)
    radius = float(radius)
    lam, V = np.linalg.eigh(B)
    a = V.T @ g
    gnorm = float(np.linalg.norm(g))
    lam_scale = float(np.max(np.abs(lam))) if lam.size else 0.0
    ltol = lam_tol * max(lam_scale, np.finfo(np.float64).tiny)
    lmin = float(lam[0])
    lmax = float(lam[-1])
    umin = V[:, 0].copy()
    # Eigenvalues relative to lam_min, exact zero on the lam_min cluster.
    dl = lam - lmin
    J = dl <= ltol
    dl[J] = 0.0

    def result(p, sigma, case, unique):
        sigma = float(sigma)
        denom = lmin + sigma
        cond = (lmax + sigma) / denom if denom > 0 else np.inf
        return TRSSolution(p, sigma, model_value(g, B, p), unique, case, cond, lmin, umin)

    # Interior.
    if lmin > 0:
        p0 = -V @ (a / lam)
        if np.linalg.norm(p0) <= radius:
            return result(p0, 0.0, INTERIOR, True)

    # sigma* = -lam_min (hard / singular).
    aJ = float(np.linalg.norm(a[J]))
    if lmin <= ltol and aJ <= hard_tol * gnorm:
        nJ = ~J
        phat = -V[:, nJ] @ (a[nJ] / dl[nJ])
        pn = float(np.linalg.norm(phat))
        if pn <= radius:
            if lmin < -ltol:
                alpha = np.sqrt(max(radius**2 - pn**2, 0.0))
                return result(phat + alpha * umin, -lmin, HARD, False)
            unique = bool(np.isclose(pn, radius, rtol=1e-14, atol=0.0))
            return result(phat, max(-lmin, 0.0), SINGULAR, unique)

    # Boundary: find t > max(0, lam_min) with ||p|| = radius, sigma = t - lam_min.
    nz = a != 0.0

    def pnorm(t):
        d = dl[nz] + t
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.sqrt(np.sum((a[nz] / d) ** 2)))

    def f(t):
        return pnorm(t) - radius

    if lmin > 0:
        t_lo = lmin  # sigma = 0; ||p(0)|| > radius since the interior test failed
    else:
        t_lo = aJ / (2.0 * radius) if aJ > 0 else np.finfo(np.float64).tiny
        for _ in range(2200):
            v = f(t_lo)
            if np.isfinite(v) and v > 0:
                break
            t_lo *= 0.5
        else:  # pragma: no cover - defensive
            raise RuntimeError("trs_dense: could not bracket the secular equation from below")
    t_hi = max(t_lo, 0.0) + 2.0 * gnorm / radius + np.finfo(np.float64).tiny
    while f(t_hi) > 0:  # pragma: no cover - defensive
        t_hi *= 2.0
    if f(t_lo) <= 0:
        t = t_lo
    else:
        t = brentq(f, t_lo, t_hi, xtol=1e-300, rtol=4 * np.finfo(np.float64).eps, maxiter=1000)
    p = -V @ (a / (dl + t))
    sigma = max(t - lmin, 0.0)
    return result(p, sigma, BOUNDARY, True)


def random_orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``n x k`` matrix with orthonormal columns (QR of a Gaussian matrix)."""
    if k == 0:
        return np.zeros((n, 0))
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    return q * np.sign(np.diag(r))


def consistent_pairs(rng: np.random.Generator, B: np.ndarray, k: int, max_cond: float = 1e3):
    """Random ``S`` (n x k) and ``Y = B S``: for ``B = gamma I + Q K Q^T`` with ``Q^T S``
    invertible and ``K`` nonsingular, the compact L-SR1 of these pairs with the same ``gamma``
    equals ``B``. Rejection-samples ``S`` until ``cond(S) <= max_cond``."""
    n = B.shape[0]
    for _ in range(1000):
        S = rng.standard_normal((n, k))
        if k == 0 or np.linalg.cond(S) <= max_cond:
            return S, B @ S
    raise RuntimeError("could not draw well-conditioned S")


def scaled_conditioning(S, Y, gamma) -> tuple[float, float]:
    """``(cond(D M^{-1} D), cond(E Psi^T Psi E))`` after symmetric diagonal scaling:
    ``E = diag(1/||psi_i||)``, ``D = diag((||s_i|| ||psi_i||)^{-1/2})`` (``inf`` for a zero
    column)."""
    S, Y = _f64(S), _f64(Y)
    if S.shape[1] == 0:
        return 1.0, 1.0
    SY = S.T @ Y
    Minv = np.tril(SY, -1) + np.tril(SY, -1).T + np.diag(np.diag(SY)) - float(gamma) * (S.T @ S)
    Psi = Y - float(gamma) * S
    ps = np.linalg.norm(Psi, axis=0)
    ss = np.linalg.norm(S, axis=0)
    if np.any(ps == 0) or np.any(ss == 0):
        return np.inf, np.inf
    e = 1.0 / ps
    d = 1.0 / np.sqrt(ss * ps)
    return (float(np.linalg.cond(Minv * np.outer(d, d))),
            float(np.linalg.cond((Psi.T @ Psi) * np.outer(e, e))))
