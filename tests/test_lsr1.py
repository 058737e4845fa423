"""Tests of apts_jax.lsr1 against the dense SR1 recursion (tests/dense_reference.py).

The reference is always evaluated on the pairs the memory actually holds
(``memory.s[:, memory.mask]``, ``memory.y[:, memory.mask]``) with ``memory.gamma``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_rng
from dense_reference import compact_conditioning, compact_dense, sr1_denominators, sr1_dense

from apts_jax import lsr1

SKIP_TOL = 1e-8

# Everything runs under jax.jit (one compile per shape / dtype).
update_j = jax.jit(lambda mem, s, y: lsr1.update(mem, s, y))
dense_j = jax.jit(lambda mem: lsr1.dense(mem))
matvec_j = jax.jit(lambda mem, v: lsr1.matvec(mem, v))
compact_j = jax.jit(lambda mem: lsr1.compact(mem))
num_pairs_j = jax.jit(lambda mem: lsr1.num_pairs(mem))


def _np(x) -> np.ndarray:
    return np.asarray(x)


def held(mem):
    """(S, Y, gamma) of the pairs the memory holds, in float64, oldest first."""
    mask = _np(mem.mask).astype(bool)
    S = _np(mem.s).astype(np.float64)[:, mask]
    Y = _np(mem.y).astype(np.float64)[:, mask]
    return S, Y, float(mem.gamma)


def reference_dense(mem) -> np.ndarray:
    """Dense B of the held pairs: the SR1 recursion when its denominators are healthy, else the
    compact formula (both are exact for the data; they coincide when all denominators != 0)."""
    S, Y, gamma = held(mem)
    if S.shape[1] == 0:
        return gamma * np.eye(S.shape[0])
    den = sr1_denominators(S, Y, gamma)
    if np.min(np.abs(den)) > 1e-4:
        return sr1_dense(S, Y, gamma)
    return compact_dense(S, Y, gamma)


def assert_mask_contiguous_newest(mem):
    mask = _np(mem.mask).astype(bool)
    k = int(mask.sum())
    m = mask.shape[0]
    expected = np.zeros(m, bool)
    if k:
        expected[m - k:] = True
    np.testing.assert_array_equal(mask, expected, err_msg="mask must be a contiguous newest block")
    assert int(num_pairs_j(mem)) == k


def assert_tree_bitwise_equal(a, b):
    for name, x, y in zip(a._fields, a, b, strict=True):
        x, y = _np(x), _np(y)
        assert x.dtype == y.dtype, name
        assert x.shape == y.shape, name
        assert np.array_equal(x, y, equal_nan=True), f"field {name} changed"


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-300))


def _tol(dtype) -> float:
    """Relative error bound on B (measured in float32: <= 1.4e-6 on test_dense_matvec_match_recursion,
    where the held pairs have cond(M^{-1}) <= 60)."""
    return 1e-9 if dtype == np.float64 else 3e-5


def random_pair(rng, n, A, noise=0.3):
    s = rng.standard_normal(n)
    y = A @ s + noise * np.linalg.norm(A, 2) * rng.standard_normal(n)
    return s, y


def fill(mem, pairs, dtype):
    flags = []
    for s, y in pairs:
        mem, st = update_j(mem, jnp.asarray(s, dtype), jnp.asarray(y, dtype))
        flags.append(bool(st))
        assert_mask_contiguous_newest(mem)
    return mem, flags


# --------------------------------------------------------------------------------------------
# init


@pytest.mark.parametrize("gamma", [1.0, 0.25, 3.0])
def test_init(precision, gamma):
    n, m = 8, 4
    mem = lsr1.init(n, m, dtype=jnp.dtype(precision), gamma=gamma)
    assert mem.s.shape == (n, m) and mem.y.shape == (n, m) and mem.mask.shape == (m,)
    assert mem.s.dtype == precision and mem.y.dtype == precision
    assert mem.gamma.shape == () and mem.gamma.dtype == precision
    assert float(mem.gamma) == gamma
    assert not np.any(_np(mem.mask))
    assert int(num_pairs_j(mem)) == 0
    for G in (mem.psi_psi, mem.s_psi):
        assert G.shape == (m, m)
        assert not np.any(_np(G))
    np.testing.assert_array_equal(_np(dense_j(mem)), gamma * np.eye(n))
    v = make_rng("init-v").standard_normal(n).astype(precision)
    np.testing.assert_allclose(_np(matvec_j(mem, jnp.asarray(v))), gamma * v, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# dense / matvec / compact / Gram matrices against the recursion


@pytest.mark.parametrize("n,m,npairs", [(2, 1, 3), (8, 4, 6), (30, 6, 10)])
def test_dense_matvec_match_recursion(precision, n, m, npairs):
    rng = make_rng("dense", n, m, npairs, precision.name)
    compared = 0
    for trial in range(4):
        A = rng.standard_normal((n, n))
        A = 0.5 * (A + A.T) * 10.0 ** rng.uniform(-1, 1)
        mem = lsr1.init(n, m, dtype=jnp.dtype(precision), gamma=float(10.0 ** rng.uniform(-1, 1)))
        pairs = [random_pair(rng, n, A) for _ in range(npairs)]
        mem, flags = fill(mem, pairs, precision)
        S, Y, gamma = held(mem)
        assert np.isfinite(gamma)
        k = S.shape[1]
        assert k >= 1, "a well-conditioned random pair must be stored"
        kM, kP = compact_conditioning(S, Y, gamma)
        Bref = reference_dense(mem)
        Bj = _np(dense_j(mem)).astype(np.float64)
        assert Bj.shape == (n, n)
        assert np.all(np.isfinite(Bj))
        # error ~ eps * cond(M^{-1}); lsr1.update keeps the held pairs well conditioned
        assert kM <= 1e4, kM
        tol = _tol(precision)
        compared += 1
        assert _rel(Bj, Bref) <= tol, (trial, _rel(Bj, Bref), kM, kP)
        np.testing.assert_allclose(Bj, Bj.T, rtol=0, atol=tol * np.abs(Bref).max())
        V = rng.standard_normal((n, 3))
        for j in range(3):
            v = V[:, j].astype(precision)
            Bv = _np(matvec_j(mem, jnp.asarray(v))).astype(np.float64)
            assert Bv.shape == (n,)
            assert _rel(Bv, Bref @ v.astype(np.float64)) <= tol * 10, (trial, j)
        # compact form with invalid columns / rows zeroed
        Psi, M = compact_j(mem)
        Psi, M = _np(Psi).astype(np.float64), _np(M).astype(np.float64)
        assert Psi.shape == (n, m) and M.shape == (m, m)
        mask = _np(mem.mask).astype(bool)
        assert not np.any(Psi[:, ~mask]) and not np.any(M[~mask]) and not np.any(M[:, ~mask])
        np.testing.assert_allclose(Psi[:, mask], Y - gamma * S, rtol=0,
                                   atol=tol * 10 * max(np.abs(Y - gamma * S).max(), 1e-30))
        assert _rel(gamma * np.eye(n) + Psi @ M @ Psi.T, Bref) <= tol * 10
        # Gram matrices Psi^T Psi and S^T Psi (Psi = Y - gamma S) of the held pairs, zeros elsewhere
        P = Y - gamma * S
        for G, ref in ((mem.psi_psi, P.T @ P), (mem.s_psi, S.T @ P)):
            G = _np(G).astype(np.float64)
            assert not np.any(G[~mask]) and not np.any(G[:, ~mask])
            np.testing.assert_allclose(G[np.ix_(mask, mask)], ref, rtol=0,
                                       atol=(1e-12 if precision == np.float64 else 1e-5)
                                       * np.abs(ref).max())
    assert compared >= 2


def test_num_pairs_is_int32(precision):
    mem = lsr1.init(4, 2, dtype=jnp.dtype(precision))
    assert lsr1.num_pairs(mem).dtype == jnp.int32
    assert num_pairs_j(mem).dtype == jnp.int32


def test_gram_dtype_is_compute_dtype(precision):
    mem = lsr1.init(4, 2, dtype=jnp.dtype(precision))
    expected = np.float64 if jax.config.jax_enable_x64 else np.float32
    for G in (mem.psi_psi, mem.s_psi):
        assert G.dtype == expected


# --------------------------------------------------------------------------------------------
# skip rule


def test_skip_rule_decisions_match_reference(x64):
    """stored == (|s^T r| >= tol ||s|| ||r||) for pairs far from the threshold, r = y - B s."""
    rng = make_rng("skip-decisions")
    n, m = 8, 4
    A = rng.standard_normal((n, n))
    A = A + A.T
    mem = lsr1.init(n, m, dtype=jnp.float64)
    for i in range(30):
        B = reference_dense(mem)
        s = rng.standard_normal(n)
        # r with prescribed relative angle to s: cos = rel
        rel = [1e-3, 0.5, 1e-13, 1e-6, 1e-11, 0.9][i % 6] * rng.choice([-1, 1])
        u = rng.standard_normal(n)
        u -= (u @ s) / (s @ s) * s
        u /= np.linalg.norm(u)
        shat = s / np.linalg.norm(s)
        r = (rel * shat + np.sqrt(1 - rel**2) * u) * np.linalg.norm(A @ s)
        y = B @ s + r
        before = mem
        mem, stored = update_j(mem, jnp.asarray(s), jnp.asarray(y))
        stored = bool(stored)
        if abs(rel) >= 1e-6:
            assert stored, (i, rel)
        elif abs(rel) <= 1e-11:
            assert not stored, (i, rel)
            assert_tree_bitwise_equal(mem, before)
        if stored:
            S, _, _ = held(mem)
            np.testing.assert_array_equal(S[:, -1], s)
        assert_mask_contiguous_newest(mem)


@pytest.mark.parametrize("gamma", [1.0, 2.0, 0.5, 4.0])
def test_exactly_degenerate_pair_skipped_bitwise(precision, gamma):
    """s^T (y - B s) = 0 exactly (small integers, B = gamma I with gamma a power of two)."""
    n, m = 8, 4
    mem = lsr1.init(n, m, dtype=jnp.dtype(precision), gamma=gamma)
    s = np.array([1.0, 2.0, 0.0, -1.0, 3.0, 0.0, 1.0, 0.0])
    r = np.array([2.0, -1.0, 5.0, 0.0, 0.0, 7.0, 0.0, -3.0])
    assert s @ r == 0.0
    y = gamma * s + r
    new, stored = update_j(mem, jnp.asarray(s, precision), jnp.asarray(y, precision))
    assert not bool(stored)
    assert_tree_bitwise_equal(new, mem)


def test_degenerate_pair_after_stores_skipped_bitwise(x64):
    """With a nonempty memory: r orthogonal to s to rounding (|s^T r| ~ 1e-16 ||s|| ||r||)."""
    rng = make_rng("degenerate-after")
    n, m = 8, 4
    A = rng.standard_normal((n, n))
    A = A + A.T
    mem = lsr1.init(n, m, dtype=jnp.float64)
    mem, flags = fill(mem, [random_pair(rng, n, A) for _ in range(3)], np.float64)
    assert all(flags)
    B = reference_dense(mem)
    for _ in range(5):
        s = rng.standard_normal(n)
        r = rng.standard_normal(n)
        r -= (r @ s) / (s @ s) * s
        r *= np.linalg.norm(B @ s) / np.linalg.norm(r)
        y = B @ s + r
        new, stored = update_j(mem, jnp.asarray(s), jnp.asarray(y))
        assert not bool(stored)
        assert_tree_bitwise_equal(new, mem)


@pytest.mark.parametrize(
    "bad", ["s_nan", "y_nan", "s_inf", "y_ninf", "both_nan", "s_inf_y_inf"]
)
def test_nonfinite_pairs_skipped(precision, bad):
    rng = make_rng("nonfinite", bad)
    n, m = 8, 4
    A = rng.standard_normal((n, n))
    A = A + A.T
    mem = lsr1.init(n, m, dtype=jnp.dtype(precision))
    mem, _ = fill(mem, [random_pair(rng, n, A) for _ in range(2)], precision)
    s, y = random_pair(rng, n, A)
    if bad in ("s_nan", "both_nan"):
        s[1] = np.nan
    if bad in ("y_nan", "both_nan"):
        y[3] = np.nan
    if bad in ("s_inf", "s_inf_y_inf"):
        s[0] = np.inf
    if bad == "y_ninf":
        y[4] = -np.inf
    if bad == "s_inf_y_inf":
        y[0] = np.inf
    new, stored = update_j(mem, jnp.asarray(s, precision), jnp.asarray(y, precision))
    assert not bool(stored)
    assert_tree_bitwise_equal(new, mem)


@pytest.mark.parametrize("kind", ["zero_pair", "y_equals_Bs", "zero_s"])
def test_trivial_pairs_keep_memory_consistent(precision, kind):
    """Pairs with r = 0 or s = 0 must not corrupt the memory (stored or not)."""
    rng = make_rng("trivial", kind)
    n, m = 8, 4
    A = rng.standard_normal((n, n))
    A = A + A.T
    mem = lsr1.init(n, m, dtype=jnp.dtype(precision))
    mem, _ = fill(mem, [random_pair(rng, n, A) for _ in range(2)], precision)
    if kind == "zero_pair":
        s, y = np.zeros(n), np.zeros(n)
    elif kind == "y_equals_Bs":
        s = rng.standard_normal(n)
        y = _np(matvec_j(mem, jnp.asarray(s, precision))).astype(np.float64)
    else:
        s, y = np.zeros(n), rng.standard_normal(n)
    new, stored = update_j(mem, jnp.asarray(s, precision), jnp.asarray(y, precision))
    assert_mask_contiguous_newest(new)
    S, Y, gamma = held(new)
    assert np.isfinite(gamma)
    assert np.all(np.linalg.norm(S, axis=0) > 0), "a zero step was stored"
    Bj = _np(dense_j(new)).astype(np.float64)
    assert np.all(np.isfinite(Bj))
    _, M = compact_j(new)
    assert np.all(np.isfinite(_np(M)))
    kM, _ = compact_conditioning(S, Y, gamma)
    if kM < 1e6:
        assert _rel(Bj, reference_dense(new)) <= _tol(precision) * max(1.0, kM / 1e2)
    if kind == "zero_pair":
        assert not bool(stored)
        assert_tree_bitwise_equal(new, mem)


# --------------------------------------------------------------------------------------------
# ring buffer


@pytest.mark.parametrize("n,m,npush", [(2, 1, 4), (8, 4, 4), (8, 4, 11)])
def test_ring_buffer_order(precision, n, m, npush):
    rng = make_rng("ring", n, m, npush)
    for _attempt in range(20):
        Sall = rng.standard_normal((n, npush)).astype(precision).astype(np.float64)
        Yall = rng.standard_normal((n, npush)).astype(precision).astype(np.float64)
        # gamma after the last push = y^T y / s^T y of the newest pair with s^T y > 0
        sty = np.einsum("ij,ij->j", Sall, Yall)
        pos = np.nonzero(sty > 0)[0]
        gamma_final = (Yall[:, pos[-1]] @ Yall[:, pos[-1]]) / sty[pos[-1]] if pos.size else 1.0
        kM, kP = compact_conditioning(Sall[:, -m:], Yall[:, -m:], gamma_final)
        if pos.size and kM < 1e2 and kP < 1e3:
            break
    else:
        raise AssertionError("test data: no well-conditioned draw")
    mem = lsr1.init(n, m, dtype=jnp.dtype(precision))
    mem, flags = fill(mem, list(zip(Sall.T, Yall.T, strict=True)), precision)
    assert all(flags), flags
    assert int(num_pairs_j(mem)) == m
    S, Y, gamma = held(mem)
    np.testing.assert_array_equal(S, Sall[:, -m:].astype(precision))
    np.testing.assert_array_equal(Y, Yall[:, -m:].astype(precision))
    np.testing.assert_allclose(gamma, gamma_final, rtol=1e-12 if precision == np.float64 else 1e-4)
    Bref = sr1_dense(S, Y, gamma)
    assert _rel(_np(dense_j(mem)), Bref) <= _tol(precision)


def test_held_pairs_are_newest_stored_suffix(precision):
    """Whatever is dropped, the held pairs are the newest stored ones, in order."""
    rng = make_rng("suffix")
    n, m = 8, 4
    A = rng.standard_normal((n, n))
    A = A + A.T
    mem = lsr1.init(n, m, dtype=jnp.dtype(precision))
    stored_pairs = []
    for i in range(25):
        s, y = random_pair(rng, n, A, noise=0.05 if i % 3 else 1.0)
        if i % 7 == 3:  # a nearly repeated pair now and then
            s = stored_pairs[-1][0] + 1e-9 * rng.standard_normal(n) if stored_pairs else s
        mem, st = update_j(mem, jnp.asarray(s, precision), jnp.asarray(y, precision))
        if bool(st):
            stored_pairs.append((s.astype(precision), y.astype(precision)))
        assert_mask_contiguous_newest(mem)
        S, Y, gamma = held(mem)
        k = S.shape[1]
        assert 1 <= k <= m if stored_pairs else k == 0
        for j in range(k):
            np.testing.assert_array_equal(S[:, -1 - j], stored_pairs[-1 - j][0])
            np.testing.assert_array_equal(Y[:, -1 - j], stored_pairs[-1 - j][1])
        _, M = compact_j(mem)
        assert np.all(np.isfinite(_np(M))) and np.isfinite(gamma)


# --------------------------------------------------------------------------------------------
# gamma rule


def test_gamma_rule(precision):
    n, m = 8, 4
    rtol = 1e-12 if precision == np.float64 else 1e-5
    mem = lsr1.init(n, m, dtype=jnp.dtype(precision), gamma=1.0)
    rng = make_rng("gamma-rule")

    def push(s, y):
        nonlocal mem
        mem, st = update_j(mem, jnp.asarray(s, precision), jnp.asarray(y, precision))
        _, M = compact_j(mem)
        assert np.all(np.isfinite(_np(M)))
        assert np.all(np.isfinite(_np(dense_j(mem))))
        assert np.isfinite(float(mem.gamma))
        return bool(st)

    # positive curvature: gamma = y^T y / s^T y
    s = rng.standard_normal(n)
    y = 3.0 * s + 0.5 * rng.standard_normal(n)
    assert push(s, y)
    s32, y32 = s.astype(precision).astype(np.float64), y.astype(precision).astype(np.float64)
    g1 = (y32 @ y32) / (s32 @ y32)
    np.testing.assert_allclose(float(mem.gamma), g1, rtol=rtol)

    # negative curvature pair, stored by the skip rule: gamma kept
    s = rng.standard_normal(n)
    y = -2.0 * s + 0.3 * rng.standard_normal(n)
    assert s @ y < 0
    assert push(s, y)
    assert float(mem.gamma) == pytest.approx(g1, rel=rtol)

    # s^T y == 0 exactly: y^T y / 0 is not finite -> gamma kept
    s = np.array([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    y = np.array([0.0, 2.0, 0.0, 1.0, 0.0, 0.0, -1.0, 0.0])
    push(s, y)
    assert float(mem.gamma) == pytest.approx(g1, rel=rtol)

    # NaN pair: skipped, gamma kept
    assert not push(np.full(n, np.nan), np.ones(n))
    assert float(mem.gamma) == pytest.approx(g1, rel=rtol)

    # another positive pair: gamma follows the newest pair
    s = rng.standard_normal(n)
    y = 0.1 * s + 0.01 * rng.standard_normal(n)
    if push(s, y):
        s32, y32 = s.astype(precision).astype(np.float64), y.astype(precision).astype(np.float64)
        np.testing.assert_allclose(float(mem.gamma), (y32 @ y32) / (s32 @ y32), rtol=rtol)
    S, Y, gamma = held(mem)
    kM, _ = compact_conditioning(S, Y, gamma)
    if kM < 1e6:
        assert _rel(_np(dense_j(mem)), reference_dense(mem)) <= _tol(precision) * max(1, kM / 1e2)


def test_gamma_negative_curvature_only(precision):
    """Only pairs with s^T y < 0: gamma stays at its initial value, M well-defined."""
    rng = make_rng("gamma-neg")
    n, m = 8, 4
    mem = lsr1.init(n, m, dtype=jnp.dtype(precision), gamma=0.5)
    for _ in range(5):
        s = rng.standard_normal(n)
        y = -s + 0.2 * rng.standard_normal(n)
        mem, _ = update_j(mem, jnp.asarray(s, precision), jnp.asarray(y, precision))
        assert float(mem.gamma) == 0.5
        _, M = compact_j(mem)
        assert np.all(np.isfinite(_np(M)))
    assert int(num_pairs_j(mem)) >= 1


# --------------------------------------------------------------------------------------------
# conditioning


@pytest.mark.parametrize("eps", [0.0, 1e-12, 1e-9])
def test_nearly_collinear_pairs_drop_oldest(precision, eps):
    rng = make_rng("collinear", eps)
    n, m = 8, 4
    s1 = rng.standard_normal(n)
    y1 = 2.0 * s1 + rng.standard_normal(n)
    mem = lsr1.init(n, m, dtype=jnp.dtype(precision))
    mem, st = update_j(mem, jnp.asarray(s1, precision), jnp.asarray(y1, precision))
    assert bool(st)
    s2 = s1 * (1 + eps) + eps * rng.standard_normal(n)
    y2 = y1 * (1 - eps) + eps * rng.standard_normal(n)
    mem2, st2 = update_j(mem, jnp.asarray(s2, precision), jnp.asarray(y2, precision))
    assert_mask_contiguous_newest(mem2)
    S, Y, gamma = held(mem2)
    assert S.shape[1] == 1, "nearly identical pairs must not both be held"
    if bool(st2):
        np.testing.assert_array_equal(S[:, 0], s2.astype(precision))
    else:
        assert_tree_bitwise_equal(mem2, mem)
    Psi, M = compact_j(mem2)
    assert np.all(np.isfinite(_np(M))) and np.all(np.isfinite(_np(Psi)))
    assert _rel(_np(dense_j(mem2)), reference_dense(mem2)) <= _tol(precision)


def test_collinear_with_oldest_of_three(x64):
    """s3 ~ s1 (oldest): dropping the oldest restores conditioning; the newer two stay."""
    rng = make_rng("collinear3")
    n, m = 8, 4
    mem = lsr1.init(n, m, dtype=jnp.float64)
    s1, s2 = rng.standard_normal(n), rng.standard_normal(n)
    y1, y2 = 2 * s1 + rng.standard_normal(n), -s2 + rng.standard_normal(n)
    mem, fl = fill(mem, [(s1, y1), (s2, y2)], np.float64)
    assert all(fl)
    s3 = s1 + 1e-11 * rng.standard_normal(n)
    y3 = y1 + 1e-11 * rng.standard_normal(n)
    mem, st = update_j(mem, jnp.asarray(s3), jnp.asarray(y3))
    S, Y, gamma = held(mem)
    kM, kP = compact_conditioning(S, Y, gamma)
    assert kM < 1e10 and kP < 1e14, (kM, kP)
    if bool(st):
        assert S.shape[1] <= 2
        np.testing.assert_array_equal(S[:, -1], s3)
    _, M = compact_j(mem)
    assert np.all(np.isfinite(_np(M)))
    assert _rel(_np(dense_j(mem)), reference_dense(mem)) <= 1e-6


def test_long_random_stream_stays_finite(precision):
    """A long stream of arbitrary (scaled, indefinite, tiny) pairs never breaks the memory."""
    rng = make_rng("stream")
    n, m = 30, 6
    mem = lsr1.init(n, m, dtype=jnp.dtype(precision))
    for i in range(60):
        scale = 10.0 ** rng.uniform(-4, 3)
        s = rng.standard_normal(n) * scale
        y = rng.standard_normal(n) * scale * 10.0 ** rng.uniform(-2, 2)
        if i % 11 == 5:
            s = _np(mem.s)[:, -1].astype(np.float64) * (1 + 1e-7)
        mem, _ = update_j(mem, jnp.asarray(s, precision), jnp.asarray(y, precision))
        assert_mask_contiguous_newest(mem)
        Psi, M = compact_j(mem)
        assert np.all(np.isfinite(_np(M))) and np.all(np.isfinite(_np(Psi)))
        assert np.isfinite(float(mem.gamma))
        v = rng.standard_normal(n)
        assert np.all(np.isfinite(_np(matvec_j(mem, jnp.asarray(v, precision)))))
        S, Y, gamma = held(mem)
        kM, kP = compact_conditioning(S, Y, gamma)
        if precision == np.float64 and kM < 1e4:
            assert _rel(_np(dense_j(mem)), reference_dense(mem)) <= 1e-9 * max(1, kM)
