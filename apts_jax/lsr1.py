"""Limited-memory SR1 (L-SR1) quasi-Newton matrices in compact form.

The L-SR1 matrix of the ``k`` most recent secant pairs ``(s_i, y_i)`` (columns of ``S`` and ``Y``,
oldest first) with initial matrix ``B_0 = gamma I`` is

    B = gamma I + Psi M Psi^T,   Psi = Y - gamma S,   M^{-1} = D + L + L^T - gamma S^T S,

where ``S^T Y = L + D + U`` (``L`` strictly lower triangular, ``D`` diagonal). It equals the dense SR1
recursion ``B_{i+1} = B_i + r_i r_i^T / (r_i^T s_i)``, ``r_i = y_i - B_i s_i``, started from ``gamma I``
(Nocedal & Wright, *Numerical Optimization*, 2nd ed., sec. 6.2 and 7.2; Erway & Marcia, SIAM J. Matrix
Anal. Appl. 36, 2015). It is the Hessian model of the L-SR1 trust-region method used by APTS (Cruz
Alegría, Trotti, Kopaničáková, Krause, *Data-Parallel Neural Network Training via Nonlinearly
Preconditioned Trust-Region Method*, sec. 2.1).

The memory is a fixed-shape FIFO of ``m`` pairs stored as the columns of two ``(n, m)`` arrays, oldest
first, with a validity mask (valid columns are always the newest ones), so every function here is
``jax.jit``-friendly and never recompiles as the memory fills up. The ``m x m`` Gram matrices
``Psi^T Psi`` and ``S^T Psi`` are kept with the memory (recomputed when a pair is stored), so the OBS
solver needs no ``O(nm^2)`` work of its own. The small algebra runs in float64 when
``jax_enable_x64`` is on (the *compute dtype*), otherwise in float32.

Update rules (all documented defaults):

* **Skip rule** (N&W eq. 6.26): the pair is stored only if
  ``|s^T (y - B s)| >= skip_tol * ||s|| * ||y - B s||`` (``skip_tol = 1e-8``) *and* ``|s^T (y - B s)|`` is
  above the round-off level of its own evaluation; pairs with a non-finite entry or ``s = 0`` are skipped.
* **gamma rule**: after storing a pair, ``gamma = y^T y / s^T y`` of that pair when this is finite and
  positive; otherwise the previous ``gamma`` is kept (so ``gamma`` is always finite and positive).
* **Conditioning check**: after storing, the oldest pairs are dropped while ``M^{-1}`` or ``Psi^T Psi`` of
  the remaining pairs is singular or badly conditioned: reciprocal condition numbers (after symmetric
  diagonal scaling) must exceed ``cond_tol = 1e-3`` (or ``sqrt(eps)`` of the parameter dtype if
  larger). Nearly dependent pairs otherwise amplify round-off into spurious negative curvature
  (seen on the chained Rosenbrock function in float64 with a ``sqrt(eps)`` threshold: the TR
  iteration stalled with model eigenvalues near -1e4 where the Hessian is positive definite).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST


class LSR1Memory(NamedTuple):
    """A fixed-size L-SR1 memory.

    Attributes:
      s: ``(n, m)`` secant steps as columns, oldest first (column ``m - 1`` is the newest).
      y: ``(n, m)`` gradient differences as columns, in the same order.
      mask: ``(m,)`` bool, which columns hold a valid pair (a contiguous block at the newest end).
      gamma: scalar, ``B_0 = gamma I``; dtype of ``s``.
      psi_psi: ``(m, m)`` ``Psi^T Psi`` for the current ``gamma``, in the compute dtype.
      s_psi: ``(m, m)`` ``S^T Psi`` (``s_psi[i, j] = s_i^T psi_j``), in the compute dtype.

    Both Gram matrices are formed from the explicit ``Psi = Y - gamma S`` whenever a pair is stored
    (``O(nm^2)``): expanding them through ``S^T S``, ``S^T Y`` and ``Y^T Y`` would cancel
    catastrophically when ``B`` is close to ``gamma I`` (error ``eps (|gamma| ||S|| / ||Psi||)^2``).
    Invalid rows/columns are zero.
    """

    s: Array
    y: Array
    mask: Array
    gamma: Array
    psi_psi: Array
    s_psi: Array


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype of the small ``m x m`` algebra: float64 when x64 is enabled, else float32."""
    return jnp.promote_types(dtype, jax.dtypes.canonicalize_dtype(np.float64))


def init(
    n: int, memory_size: int, dtype: jnp.dtype = jnp.float32, gamma: float = 1.0
) -> LSR1Memory:
    """An empty memory for ``n`` parameters and ``memory_size`` pairs (``B = gamma I``)."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"lsr1.init: n must be a positive integer, got {n!r}.")
    if (
        isinstance(memory_size, bool)
        or not isinstance(memory_size, int | np.integer)
        or memory_size < 1
    ):
        raise ValueError(
            f"lsr1.init: memory_size must be an integer >= 1, got {memory_size!r}; "
            "use memory_size=5 (the paper's choice) if unsure."
        )
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"lsr1.init: dtype must be a floating dtype, got {dtype}.")
    if not np.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"lsr1.init: gamma must be finite and > 0, got {gamma!r}.")
    m = int(memory_size)
    ct = compute_dtype(dtype)
    zeros = jnp.zeros((int(n), m), dtype)
    small = jnp.zeros((m, m), ct)
    return LSR1Memory(
        s=zeros,
        y=zeros,
        mask=jnp.zeros((m,), bool),
        gamma=jnp.asarray(gamma, dtype),
        psi_psi=small,
        s_psi=small,
    )


def num_pairs(memory: LSR1Memory) -> Array:
    """Number of valid pairs (int32)."""
    return jnp.sum(memory.mask, dtype=jnp.int32)


# ---------------------------------------------------------------------------------------------
# Small (m x m) algebra shared with the OBS solver.


def small_matrices(psi_psi: Array, s_psi: Array, mask: Array) -> tuple[Array, Array]:
    """``Psi^T Psi`` and ``M^{-1}`` from the Gram matrices, rows/columns of invalid pairs zeroed.

    ``M^{-1} = D + L + L^T - gamma S^T S`` equals ``tril(S^T Psi, -1) + tril(S^T Psi, -1)^T +
    diag(S^T Psi)`` because ``S^T S`` is symmetric; this form has no cancellation.
    """
    lower = jnp.tril(s_psi, -1)
    m_inv = lower + lower.T + jnp.diag(jnp.diag(s_psi))
    outer = mask[:, None] & mask[None, :]
    return jnp.where(outer, psi_psi, 0.0), jnp.where(outer, m_inv, 0.0)


def gram_matrices(s: Array, y: Array, gamma: Array, ct: jnp.dtype) -> tuple[Array, Array, Array]:
    """``Psi``, ``Psi^T Psi`` and ``S^T Psi`` (the latter two in ``ct``) with ``Psi = Y - gamma S``."""
    psi = y - gamma.astype(s.dtype) * s
    psi_psi = jnp.matmul(psi.T, psi, precision=_HIGHEST).astype(ct)
    s_psi = jnp.matmul(s.T, psi, precision=_HIGHEST).astype(ct)
    return psi, 0.5 * (psi_psi + psi_psi.T), s_psi


def invert_masked(a: Array, mask: Array) -> Array:
    """Inverse of the valid block of a symmetric matrix; rows/columns of invalid entries are zero.

    Computed as ``V diag(1/lambda) V^T`` from ``eigh`` rather than by LU: the pivoting of
    ``jnp.linalg.inv`` compiles to a ``while`` loop, ``eigh`` to one library call. A singular
    block gives non-finite entries (callers check for them), as LU does.
    """
    outer = mask[:, None] & mask[None, :]
    padded = jnp.where(outer, a, jnp.eye(a.shape[0], dtype=a.dtype))
    lam, v = jnp.linalg.eigh(padded)
    inv = jnp.matmul(v / lam[None, :], v.T, precision=_HIGHEST)
    inv = 0.5 * (inv + inv.T)
    return jnp.where(outer, inv, 0.0)


def _reciprocal_condition(a: Array, mask: Array, scale: Array) -> Array:
    """``min|eig| / max|eig|`` of ``diag(scale) a diag(scale)`` restricted to ``mask`` (1 if empty).

    Invalid rows/columns are padded with a value far above the Gershgorin bound of the valid block,
    so the eigenvalues of the valid block can be told apart from the padding exactly.
    """
    outer = mask[:, None] & mask[None, :]
    scaled = jnp.where(outer, scale[:, None] * a * scale[None, :], 0.0)
    bound = jnp.max(jnp.sum(jnp.abs(scaled), axis=1))
    pad = 4.0 * bound + 1.0
    padded = scaled + jnp.diag(jnp.where(mask, 0.0, pad))
    eig = jnp.linalg.eigvalsh(padded)
    is_valid = eig < 0.5 * pad
    abs_eig = jnp.abs(eig)
    hi = jnp.max(jnp.where(is_valid, abs_eig, 0.0))
    lo = jnp.min(jnp.where(is_valid, abs_eig, jnp.inf))
    rc = jnp.where(hi > 0, lo / jnp.where(hi > 0, hi, 1.0), 0.0)
    return jnp.where(jnp.any(mask), rc, 1.0)


def _well_conditioned(psi_psi: Array, s_psi: Array, s_norm2: Array, mask: Array,
                      tol: float) -> Array:
    psi_psi, m_inv = small_matrices(psi_psi, s_psi, mask)
    d_psi = jnp.diag(psi_psi)
    ok_cols = jnp.all(jnp.where(mask, (d_psi > 0) & (s_norm2 > 0), True))
    inv_sqrt = lambda d: jnp.where(mask & (d > 0), jax.lax.rsqrt(jnp.where(d > 0, d, 1.0)), 0.0)  # noqa: E731
    rc_psi = _reciprocal_condition(psi_psi, mask, inv_sqrt(d_psi))
    # M^{-1} has entries s_i^T psi_j: scale by (||s_i|| ||psi_i||)^(-1/2).
    scale_m = jnp.sqrt(inv_sqrt(d_psi) * inv_sqrt(s_norm2))
    rc_m = _reciprocal_condition(m_inv, mask, scale_m)
    finite = jnp.isfinite(rc_psi) & jnp.isfinite(rc_m)
    return ok_cols & finite & (rc_psi >= tol) & (rc_m >= tol)


def drop_oldest_until_conditioned(
    psi_psi: Array, s_psi: Array, s_norm2: Array, mask: Array, tol: float
) -> Array:
    """The largest newest-end sub-mask of ``mask`` whose pairs are well conditioned."""
    m = mask.shape[0]
    idx = jnp.arange(m)
    candidates = mask[None, :] & (idx[None, :] >= jnp.arange(m + 1)[:, None])  # (m+1, m)
    good = jax.vmap(lambda mk: _well_conditioned(psi_psi, s_psi, s_norm2, mk, tol))(candidates)
    good = good.at[m].set(True)
    first = jnp.argmax(good)
    return candidates[first]


# ---------------------------------------------------------------------------------------------
# Products with B.


def _dot_t(a: Array, v: Array) -> Array:
    """``a^T v`` for ``a`` of shape (n, m) at full precision."""
    return jnp.matmul(v, a, precision=_HIGHEST)


def compact(memory: LSR1Memory) -> tuple[Array, Array]:
    """``(Psi, M)`` with ``B = gamma I + Psi M Psi^T``; invalid columns of ``Psi`` and rows of ``M`` are 0."""
    psi = jnp.where(memory.mask[None, :], memory.y - memory.gamma * memory.s, 0.0)
    _, m_inv = small_matrices(memory.psi_psi, memory.s_psi, memory.mask)
    return psi, invert_masked(m_inv, memory.mask)


def matvec(memory: LSR1Memory, v: Array) -> Array:
    """``B v`` in ``O(nm)``."""
    ct = memory.psi_psi.dtype
    psi, mat = compact(memory)
    coeff = mat @ _dot_t(psi, v).astype(ct)
    return memory.gamma * v + jnp.matmul(psi, coeff.astype(psi.dtype), precision=_HIGHEST)


def dense(memory: LSR1Memory) -> Array:
    """The ``n x n`` matrix ``B`` (for tests and small problems only)."""
    psi, mat = compact(memory)
    n = psi.shape[0]
    ct = mat.dtype
    psi = psi.astype(ct)
    return memory.gamma.astype(ct) * jnp.eye(n, dtype=ct) + psi @ mat @ psi.T


# ---------------------------------------------------------------------------------------------
# Update.


def update(
    memory: LSR1Memory, s: Array, y: Array, *, skip_tol: float = 1e-8, cond_tol: float = 1e-3
) -> tuple[LSR1Memory, Array]:
    """Add the pair ``(s, y)`` unless the SR1 skip rule rejects it.

    Args:
      memory: the current memory.
      s: step ``x_new - x_old``, shape ``(n,)``.
      y: gradient difference ``g(x_new) - g(x_old)``, shape ``(n,)``.
      skip_tol: ``r`` in the skip rule ``|s^T(y - Bs)| >= r ||s|| ||y - Bs||``.
      cond_tol: the smallest reciprocal condition number (after diagonal scaling) accepted for
        ``M^{-1}`` and ``Psi^T Psi``; raised to ``sqrt(eps)`` for low-precision dtypes.

    Returns:
      ``(new_memory, stored)``; when ``stored`` is False the memory is returned unchanged (bitwise).

    Straight-line code (no ``while``, no ``conditional`` once compiled): the updated memory is
    always computed and chosen by a select. Measured on CPU (n = 1e4 and 1.8e6, m = 5): as fast as
    the former ``lax.cond`` when the pair is stored, about twice the cost of a skip (rare).
    """
    n, m = memory.s.shape
    if s.shape != (n,) or y.shape != (n,):  # static shapes: checked at trace time
        raise ValueError(
            f"lsr1.update: s and y must have shape ({n},) like the memory, got {s.shape} and "
            f"{y.shape}."
        )
    dtype = memory.s.dtype
    ct = memory.psi_psi.dtype
    eps = float(jnp.finfo(dtype).eps)
    s = s.astype(dtype)
    y = y.astype(dtype)
    gamma_p = memory.gamma
    gamma = gamma_p.astype(ct)

    # r = y - B s = w - Psi c with w = y - gamma s, c = M Psi^T s (one pass over S and Y).
    w = y - gamma_p * s
    psi_s = (_dot_t(memory.y, s) - gamma_p * _dot_t(memory.s, s)).astype(ct)
    psi_w = (_dot_t(memory.y, w) - gamma_p * _dot_t(memory.s, w)).astype(ct)
    s_s = jnp.vdot(s, s).astype(ct)
    s_w = jnp.vdot(s, w).astype(ct)
    w_w = jnp.vdot(w, w).astype(ct)
    s_y = jnp.vdot(s, y).astype(ct)
    y_y = jnp.vdot(y, y).astype(ct)

    psi_psi, m_inv = small_matrices(memory.psi_psi, memory.s_psi, memory.mask)
    mat = invert_masked(m_inv, memory.mask)
    psi_s = jnp.where(memory.mask, psi_s, 0.0)
    psi_w = jnp.where(memory.mask, psi_w, 0.0)
    c = mat @ psi_s
    s_r = s_w - psi_s @ c
    r_r = jnp.maximum(w_w - 2 * psi_w @ c + c @ psi_psi @ c, 0.0)
    # Round-off level of s^T r as evaluated above (relative to the size of its terms).
    noise = 100.0 * eps * (jnp.sqrt(s_s * w_w) + jnp.abs(psi_s) @ jnp.abs(c))
    finite = jnp.isfinite(s_s) & jnp.isfinite(y_y) & jnp.isfinite(s_r) & jnp.isfinite(r_r)
    store = (
        finite
        & (s_s > 0)
        & (jnp.abs(s_r) >= skip_tol * jnp.sqrt(s_s) * jnp.sqrt(r_r))
        & (jnp.abs(s_r) > noise)
    )

    new_s = jnp.concatenate([memory.s[:, 1:], s[:, None]], axis=1)
    new_y = jnp.concatenate([memory.y[:, 1:], y[:, None]], axis=1)
    mask = jnp.concatenate([memory.mask[1:], jnp.ones((1,), bool)])
    candidate = y_y / s_y
    new_gamma = jnp.where(jnp.isfinite(candidate) & (candidate > 0), candidate, gamma)
    new_gamma = new_gamma.astype(dtype)
    _, pp, sp = gram_matrices(new_s, new_y, new_gamma, ct)
    s_norm2 = jnp.sum(new_s * new_s, axis=0).astype(ct)
    tol = max(float(cond_tol), float(np.sqrt(eps)))
    mask = drop_oldest_until_conditioned(pp, sp, s_norm2, mask, tol)
    outer = mask[:, None] & mask[None, :]
    pp, sp = (jnp.where(outer, a, 0.0) for a in (pp, sp))
    candidate_memory = LSR1Memory(new_s, new_y, mask, new_gamma, pp, sp)
    # A select, not a lax.cond: no host round trip on an accelerator. The stored memory is
    # computed either way (its O(nm^2) Gram matrices are the bulk of an update); the select
    # fuses into the concatenations that shift the buffers, so a stored pair costs the same.
    new_memory = jax.tree.map(lambda a, b: jnp.where(store, a, b), candidate_memory, memory)
    return new_memory, store
