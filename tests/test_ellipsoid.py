"""Tests of apts_jax.ellipsoid: the ellipsoidal trust region ||D^{1/2} s|| <= Delta solved by OBS.

References are independent of the scaled-variable substitution used by the module: the
subproblem is solved in the ORIGINAL variables from the generalised eigenproblem B V = D V Lambda
(scipy.linalg.eigh(B, D), V^T D V = I), which turns the ellipsoid into the ball ||c|| <= Delta for
s = V c, followed by the dense secular-equation solver of tests/dense_reference.py. The model
matrix B = D^{1/2} Bhat D^{1/2} comes from the dense SR1 recursion (numpy) of the scaled pairs.
Every JAX call runs under jax.jit, in float32 and float64.
"""

from __future__ import annotations

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from conftest import make_rng
from dense_reference import BOUNDARY, INTERIOR, sr1_dense, trs_dense

from apts_jax import ellipsoid as ell
from apts_jax import lsr1, obs, tr_model

_update = jax.jit(ell.update, static_argnames="beta2")
_second_moment = jax.jit(ell.second_moment, static_argnames="beta2")
_scale = jax.jit(ell.scale, static_argnames=("beta2", "eps"))
_scaled_memory = jax.jit(ell.scaled_memory)
_solve = jax.jit(ell.solve)
_solve_pairs = jax.jit(lambda g, pairs, r, d: ell.solve(g, pairs, r, d))
_first_order = jax.jit(ell.first_order_step)
_update_pairs = jax.jit(ell.update_pairs)
_lsr1_update = jax.jit(lambda mem, s, y: lsr1.update(mem, s, y))
_obs_solve_memory = jax.jit(obs.solve_memory)
_matvec = jax.jit(lsr1.matvec)
_model_step = jax.jit(ell.model_step, static_argnums=0)


# One shape for every solver call (each (shape, dtype) is one compile of OBS).
N, M = 12, 4


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _rel(a, b) -> float:
    a, b = _f64(a), _f64(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(np.float64).tiny))


def _tol(dtype) -> float:
    return 1e-8 if dtype == np.float64 else 2e-3


def _random_d_half(rng, n, spread=1.0) -> np.ndarray:
    """D^{1/2} with entries over e^{+-spread}: D ranges over e^{+-2 spread} (far from a multiple of I)."""
    return np.exp(rng.uniform(-spread, spread, n))


def _symmetric(rng, n, eigs) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * eigs) @ q.T


def _pairs_from_quadratic(rng, n, m, a_mat, dtype) -> ell.Pairs:
    """m pairs (s_i, y_i = A s_i) in the original variables, all valid, gamma = 1."""
    s = rng.standard_normal((n, m))
    y = a_mat @ s
    return ell.Pairs(
        s=jnp.asarray(s, dtype),
        y=jnp.asarray(y, dtype),
        mask=jnp.ones((m,), bool),
        gamma=jnp.asarray(1.0, dtype),
    )


def _reference_b(pairs: ell.Pairs, d_half: np.ndarray, *, swap: bool = False) -> np.ndarray:
    """B = D^{1/2} Bhat D^{1/2}, Bhat the dense SR1 recursion of the scaled pairs (numpy, float64).

    ``swap=True`` builds the WRONG model (pairs mapped with D^{-1/2} s, D^{1/2} y), used to show
    that the tests can tell the two apart.
    """
    s, y, dh = _f64(pairs.s), _f64(pairs.y), _f64(d_half)
    if swap:
        dh = 1.0 / dh
    s_hat, y_hat = dh[:, None] * s, y / dh[:, None]
    gamma = float(y_hat[:, -1] @ y_hat[:, -1] / (s_hat[:, -1] @ y_hat[:, -1]))
    if not gamma > 0:  # s^T y <= 0: the previous gamma is kept
        gamma = float(pairs.gamma)
    b_hat = sr1_dense(s_hat, y_hat, gamma)
    return dh[:, None] * b_hat * dh[None, :]


def _reference_ellipsoid_trs(g, b_mat, d_half, radius):
    """min g^T s + 1/2 s^T B s s.t. s^T D s <= radius^2, in the original variables.

    Generalised eigenproblem B V = D V diag(lam), V^T D V = I: with s = V c the constraint is
    ||c|| <= radius and the model is (V^T g)^T c + 1/2 sum lam c^2, solved by trs_dense.
    """
    d = _f64(d_half) ** 2
    lam, v = scipy.linalg.eigh(_f64(b_mat), np.diag(d))
    sol = trs_dense(v.T @ _f64(g), np.diag(lam), radius)
    return v @ sol.p, sol


# ----------------------------------------------------------------------------------------------
# D: Adam's bias-corrected second moment


@pytest.mark.parametrize("beta2", [0.9, 0.999])
def test_second_moment_matches_numpy(precision, beta2):
    rng = make_rng("second-moment", beta2, precision.name)
    n, steps, eps = 9, 7, 1e-8
    grads = rng.standard_normal((steps, n)) * np.exp(rng.uniform(-3, 3, (1, n)))
    grads = grads.astype(precision)
    state = ell.init(n, precision)
    np.testing.assert_array_equal(np.asarray(_scale(state, beta2=beta2, eps=eps)), np.ones(n))
    v = np.zeros(n)
    for t, g in enumerate(grads, start=1):
        state = _update(state, jnp.asarray(g), beta2=beta2)
        v = beta2 * v + (1 - beta2) * _f64(g) ** 2
        v_hat = v / float(1 - Fraction(beta2) ** t)  # exact: 1 - beta2^t cancels in float64
        d_half = np.sqrt(np.sqrt(v_hat) + eps)
        assert int(state.count) == t and state.nu.dtype == precision
        assert _rel(state.nu, v) <= 10 * np.finfo(precision).eps * t
        assert _rel(_second_moment(state, beta2=beta2), v_hat) <= 20 * np.finfo(precision).eps * t
        assert _rel(_scale(state, beta2=beta2, eps=eps), d_half) <= 20 * np.finfo(precision).eps * t
    # The factory binds the same constants.
    dn = ell.diag_norm(beta2=beta2, eps=eps)
    st2 = dn.init(n, precision)
    for g in grads:
        st2 = jax.jit(dn.update)(st2, jnp.asarray(g))
    np.testing.assert_array_equal(np.asarray(jax.jit(dn.scale)(st2)), np.asarray(_scale(state, beta2, eps)))


# ----------------------------------------------------------------------------------------------
# The OBS step in the ellipsoid against the dense solution in the original variables


@pytest.mark.parametrize("kind", ["interior", "boundary", "indefinite"])
def test_solve_matches_dense_ellipsoid_problem(precision, kind):
    tol = _tol(precision)
    for trial in range(4):
        rng = make_rng("ellipsoid-trs", kind, trial, precision.name)
        n, m = N, M
        d_half = _random_d_half(rng, n).astype(precision)
        g = rng.standard_normal(n).astype(precision)
        if kind == "interior":
            # Pairs of A = D^{1/2} Ahat D^{1/2}, Ahat well conditioned, redrawn until the scaled
            # L-SR1 matrix is positive definite (SR1 does not keep definiteness by itself).
            dh = _f64(d_half)
            for _ in range(50):
                a_mat = dh[:, None] * _symmetric(rng, n, rng.uniform(1.0, 2.0, n)) * dh[None, :]
                pairs = _pairs_from_quadratic(rng, n, m, a_mat, precision)
                b_ref = _reference_b(pairs, d_half)
                if np.linalg.eigvalsh(b_ref)[0] > 0:
                    break
        else:
            eigs = rng.uniform(0.5, 5.0, n) if kind == "boundary" else rng.uniform(-3.0, 5.0, n)
            pairs = _pairs_from_quadratic(rng, n, m, _symmetric(rng, n, eigs), precision)
            b_ref = _reference_b(pairs, d_half)
        if kind == "interior":
            assert np.linalg.eigvalsh(b_ref)[0] > 0
            newton = -np.linalg.solve(b_ref, _f64(g))
            radius = 2.0 * float(np.linalg.norm(_f64(d_half) * newton))
        else:
            radius = float(rng.uniform(0.2, 1.0))
        s_ref, sol = _reference_ellipsoid_trs(g, b_ref, d_half, radius)
        assert sol.case == (INTERIOR if kind == "interior" else BOUNDARY)

        mem = _scaled_memory(pairs, jnp.asarray(d_half))
        assert bool(jnp.all(mem.mask)), "all pairs must survive the conditioning check here"
        res = _solve(jnp.asarray(g), mem, radius, jnp.asarray(d_half))
        assert res.step.dtype == precision
        assert int(res.case) == (obs.INTERIOR if kind == "interior" else obs.BOUNDARY)
        assert _rel(res.step, s_ref) <= tol, (kind, trial, _rel(res.step, s_ref))
        q_ref = sol.model_value
        assert abs(float(res.predicted_decrease) + q_ref) <= tol * abs(q_ref)
        # step_norm is the scaled norm and the step is feasible in it.
        scaled = float(np.linalg.norm(_f64(d_half) * _f64(res.step)))
        assert abs(float(res.step_norm) - scaled) <= tol * scaled
        assert scaled <= radius * (1 + 10 * np.finfo(precision).eps)
        if kind != "interior":
            assert abs(scaled - radius) <= tol * radius
        # Passing Pairs maps them inside solve: the same step.
        res2 = _solve_pairs(jnp.asarray(g), pairs, radius, jnp.asarray(d_half))
        np.testing.assert_array_equal(np.asarray(res2.step), np.asarray(res.step))
        # The test can fail: swapping D^{1/2} and D^{-1/2} gives a step far outside tol.
        b_swap = _reference_b(pairs, d_half, swap=True)
        s_swap, _ = _reference_ellipsoid_trs(g, b_swap, 1.0 / _f64(d_half), radius)
        assert _rel(s_swap, s_ref) > 100 * tol


def test_plain_l2_problem_differs_from_ellipsoid(x64):
    """Solving the L2 problem (the D = I answer) is far from the ellipsoid reference: D matters."""
    rng = make_rng("l2-vs-ellipsoid")
    n, m = N, M
    pairs = _pairs_from_quadratic(rng, n, m, _symmetric(rng, n, rng.uniform(0.5, 5, n)), np.float64)
    d_half = _random_d_half(rng, n)
    g = rng.standard_normal(n)
    s_ref, _ = _reference_ellipsoid_trs(g, _reference_b(pairs, d_half), d_half, 0.5)
    res_l2 = _solve(jnp.asarray(g), _scaled_memory(pairs, jnp.ones(n)), 0.5, jnp.ones(n))
    res = _solve(jnp.asarray(g), _scaled_memory(pairs, jnp.asarray(d_half)), 0.5, jnp.asarray(d_half))
    assert _rel(res.step, s_ref) <= 1e-8
    assert _rel(res_l2.step, s_ref) > 1e-2


# ----------------------------------------------------------------------------------------------
# D = I reproduces plain L-SR1 / OBS bit for bit


def test_identity_scaling_reproduces_lsr1_and_obs_bitwise(precision):
    rng = make_rng("identity", precision.name)
    n, m = N, M
    a_mat = _symmetric(rng, n, rng.uniform(-2.0, 4.0, n))
    mem = lsr1.init(n, m, dtype=precision, gamma=0.7)
    pairs = ell.init_pairs(n, m, dtype=precision, gamma=0.7)
    ones = jnp.ones(n, precision)
    eps = float(np.finfo(precision).eps)
    n_stored = 0
    for k in range(8):
        s = rng.standard_normal(n)
        y = a_mat @ s + 0.3 * rng.standard_normal(n)
        if k == 5:  # an exactly degenerate pair: y - B s = 0 for the current model
            y = _f64(_matvec(mem, jnp.asarray(s, precision)))
        s, y = jnp.asarray(s, precision), jnp.asarray(y, precision)
        mem, stored_ref = _lsr1_update(mem, s, y)
        pairs, stored = _update_pairs(pairs, s, y, ones)
        assert bool(stored) == bool(stored_ref)
        n_stored += int(stored)
        scaled = _scaled_memory(pairs, ones)
        # Same pairs, mask and gamma; the Gram matrices agree to the last bits (two compiled
        # programs may round a dot product differently).
        for name in ("s", "y", "mask", "gamma"):
            np.testing.assert_array_equal(
                np.asarray(getattr(scaled, name)), np.asarray(getattr(mem, name)), err_msg=f"{name}, k={k}"
            )
        for name in ("psi_psi", "s_psi"):
            a, b = getattr(scaled, name), getattr(mem, name)
            assert a.dtype == b.dtype
            atol = 16 * eps * float(jnp.max(jnp.abs(b)))
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=atol, err_msg=name)
        g = jnp.asarray(rng.standard_normal(n), precision)
        for radius in (0.1, 10.0):
            # On the same memory the ellipsoidal solve with D = I is the plain OBS solve, bit for bit.
            r_ell = _solve(g, mem, radius, ones)
            r_obs = _obs_solve_memory(g, mem, radius)
            for name, a, b in zip(r_ell._fields, r_ell, r_obs, strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
            r_pairs = _solve(g, scaled, radius, ones)
            assert int(r_pairs.case) == int(r_obs.case)
            assert _rel(r_pairs.step, r_obs.step) <= 1e3 * eps
    assert 3 <= n_stored < 8  # some pairs stored, the degenerate one skipped


def test_pairs_are_kept_in_original_variables(precision):
    rng = make_rng("raw-pairs", precision.name)
    n, m = N, M
    a_mat = _symmetric(rng, n, rng.uniform(0.5, 3.0, n))
    pairs = ell.init_pairs(n, m, dtype=precision)
    for _ in range(4):
        d_half = jnp.asarray(_random_d_half(rng, n), precision)  # D changes every step
        s = jnp.asarray(rng.standard_normal(n), precision)
        y = jnp.asarray(a_mat @ _f64(s), precision)
        pairs, stored = _update_pairs(pairs, s, y, d_half)
        assert bool(stored)
        np.testing.assert_array_equal(np.asarray(pairs.s[:, -1]), np.asarray(s))
        np.testing.assert_array_equal(np.asarray(pairs.y[:, -1]), np.asarray(y))
    assert bool(jnp.all(pairs.mask))


# ----------------------------------------------------------------------------------------------
# Scaled pairs: the secant equation, gamma, the skip rule


def test_secant_equation_of_scaled_pairs(precision):
    """B s_i = y_i for B = D^{1/2} Bhat D^{1/2} (Bhat the scaled L-SR1 of pairs of a quadratic)."""
    tol = _tol(precision)
    rng = make_rng("secant", precision.name)
    n, m = 12, 4
    a_mat = _symmetric(rng, n, rng.uniform(-2.0, 5.0, n))
    pairs = _pairs_from_quadratic(rng, n, m, a_mat, precision)
    d_half = _random_d_half(rng, n).astype(precision)
    mem = _scaled_memory(pairs, jnp.asarray(d_half))
    assert bool(jnp.all(mem.mask))
    s, y, dh = _f64(pairs.s), _f64(pairs.y), _f64(d_half)
    gamma_ref = float((y[:, -1] / dh) @ (y[:, -1] / dh) / (s[:, -1] @ y[:, -1]))
    assert abs(float(mem.gamma) - gamma_ref) <= tol * gamma_ref
    for i in range(m):
        b_s = d_half * _f64(_matvec(mem, jnp.asarray(d_half * pairs.s[:, i])))
        assert _rel(b_s, y[:, i]) <= tol * 10, (i, _rel(b_s, y[:, i]))
    # The scaled memory satisfies the scaled secant equation Bhat shat = yhat.
    for i in range(m):
        assert _rel(_matvec(mem, mem.s[:, i]), _f64(mem.y[:, i])) <= tol * 10
    # With the roles of D^{1/2} and D^{-1/2} swapped the secant equation fails.
    b_s_wrong = _f64(_matvec(mem, jnp.asarray(pairs.s[:, 0] / d_half))) / dh
    assert _rel(b_s_wrong, y[:, 0]) > 0.1


def test_skip_rule_acts_on_scaled_pairs(precision):
    """A pair with s^T y = s^T D s is degenerate for Bhat = I (scaled) but not for B = I."""
    rng = make_rng("skip-scaled", precision.name)
    n, m = N, M
    d_half = _random_d_half(rng, n)
    s = rng.standard_normal(n)
    z = rng.standard_normal(n)
    w = z - (z @ s) / (s @ s) * s
    y = d_half**2 * s + w  # s^T y = s^T D s: shat^T (yhat - shat) = 0
    args = (jnp.asarray(s, precision), jnp.asarray(y, precision))
    pairs = ell.init_pairs(n, m, dtype=precision, gamma=1.0)
    new, stored = _update_pairs(pairs, *args, jnp.asarray(d_half, precision))
    assert not bool(stored)
    np.testing.assert_array_equal(np.asarray(new.s), np.asarray(pairs.s))
    assert not bool(jnp.any(new.mask))
    # The same pair in the L2 norm (D = I) is stored: the rule really looks at the scaled pair.
    _, stored_l2 = _update_pairs(pairs, *args, jnp.ones(n, precision))
    assert bool(stored_l2)
    _, stored_raw = _lsr1_update(lsr1.init(n, m, dtype=precision), *args)
    assert bool(stored_raw)


def test_conditioning_check_on_scaled_pairs(x64):
    """Two pairs that are nearly dependent only after scaling: the older one is dropped."""
    n, m = N, M
    # s1, s2 differ where D is tiny, y1, y2 where D is huge: the scaled pairs nearly coincide.
    d_half = np.ones(n)
    d_half[2:4] = 1e-4
    d_half[4:6] = 1e4
    s = np.zeros((n, m))
    y = np.zeros((n, m))
    s[:2, 2:] = [[1.0, 1.0], [0.5, 0.5]]
    s[2, 2] = s[3, 3] = 1.0
    y[:2, 2:] = [[2.0, 2.0], [1.5, 1.5]]
    y[4, 2] = y[5, 3] = 1.0
    pairs = ell.Pairs(
        s=jnp.asarray(s), y=jnp.asarray(y), mask=jnp.asarray([False, False, True, True]),
        gamma=jnp.asarray(1.0),
    )
    np.testing.assert_array_equal(np.asarray(_scaled_memory(pairs, jnp.ones(n)).mask),
                                  [False, False, True, True])
    mem = _scaled_memory(pairs, jnp.asarray(d_half))
    np.testing.assert_array_equal(np.asarray(mem.mask), [False, False, False, True])
    new, _ = _update_pairs(pairs, jnp.zeros(n), jnp.zeros(n), jnp.asarray(d_half), scaled=mem)
    np.testing.assert_array_equal(np.asarray(new.mask), [False, False, False, True])  # kept


# ----------------------------------------------------------------------------------------------
# First-order step, norms, radius in RMS units


def test_first_order_step_in_scaled_norm(precision):
    eps = np.finfo(precision).eps
    rng = make_rng("first-order", precision.name)
    n = N
    d_half = _random_d_half(rng, n).astype(precision)
    g = (rng.standard_normal(n) * 1e-3).astype(precision)
    radius = 0.37
    fo = _first_order(jnp.asarray(g), radius, jnp.asarray(d_half))
    d = _f64(d_half) ** 2
    s_ref = -radius * _f64(g) / d / np.sqrt(_f64(g) @ (_f64(g) / d))
    assert _rel(fo.step, s_ref) <= 10 * eps
    assert int(fo.case) == tr_model.FIRST_ORDER
    scaled = float(np.linalg.norm(_f64(d_half) * _f64(fo.step)))
    assert abs(scaled - radius) <= 10 * eps * radius  # on the boundary
    assert abs(float(fo.step_norm) - radius) <= 10 * eps * radius
    gts = float(_f64(g) @ _f64(fo.step))
    assert gts < 0  # descent
    assert abs(float(fo.predicted_decrease) + gts) <= 10 * eps * abs(gts)
    # It minimises g^T s on the ellipsoid: no random boundary point does better.
    u = rng.standard_normal((200, n))
    pts = radius * u / np.linalg.norm(u, axis=1, keepdims=True) / _f64(d_half)
    assert np.all(pts @ _f64(g) >= gts * (1 + 10 * eps))
    # Not the L2 step (the test distinguishes the norms) and not the swapped scaling.
    s_l2 = -radius * _f64(g) / np.linalg.norm(_f64(g))
    s_swap = -radius * _f64(g) * d / np.sqrt(_f64(g) @ (_f64(g) * d))
    assert _rel(s_l2, s_ref) > 0.1 and _rel(s_swap, s_ref) > 0.1
    zero = _first_order(jnp.zeros(n, precision), radius, jnp.asarray(d_half))
    assert not np.any(np.asarray(zero.step)) and float(zero.predicted_decrease) == 0.0


def test_norms_and_rms_radius(precision):
    rng = make_rng("rms", precision.name)
    n = 50
    d_half = jnp.asarray(_random_d_half(rng, n), precision)
    s = jnp.asarray(rng.standard_normal(n), precision)
    ref = np.linalg.norm(_f64(d_half) * _f64(s))
    assert _rel(jax.jit(ell.scaled_norm)(s, d_half), ref) <= 10 * np.finfo(precision).eps
    radius = ell.radius_from_rms(0.01, n)
    assert abs(float(radius) - 0.01 * np.sqrt(n)) <= 10 * np.finfo(precision).eps * float(radius)
    assert abs(float(ell.rms_from_radius(radius, n)) - 0.01) <= 1e-6 * 0.01
    # A boundary step of radius_from_rms(r) has RMS(D^{1/2} s) = r, for any n.
    for n2 in (10, 1000):
        dh = jnp.asarray(_random_d_half(rng, n2), precision)
        g = jnp.asarray(rng.standard_normal(n2), precision)
        fo = _first_order(g, ell.radius_from_rms(0.01, n2), dh)
        rms = np.sqrt(np.mean((_f64(dh) * _f64(fo.step)) ** 2))
        assert abs(rms - 0.01) <= 1e-5 * 0.01


# ----------------------------------------------------------------------------------------------
# Model-step dispatch and fallback


def test_model_step_dispatch_and_fallback(precision):
    rng = make_rng("dispatch", precision.name)
    n, m = N, M
    pairs = _pairs_from_quadratic(rng, n, m, _symmetric(rng, n, rng.uniform(0.5, 3, n)), precision)
    d_half = jnp.asarray(_random_d_half(rng, n), precision)
    g = jnp.asarray(rng.standard_normal(n), precision)
    mem = _scaled_memory(pairs, d_half)
    ms = _model_step("sr1", g, mem, 0.3, d_half)
    res = _solve(g, mem, 0.3, d_half)
    np.testing.assert_array_equal(np.asarray(ms.step), np.asarray(res.step))
    assert int(ms.case) == int(res.case)
    fo = _model_step("first_order", g, None, 0.3, d_half)
    np.testing.assert_array_equal(np.asarray(fo.step), np.asarray(_first_order(g, 0.3, d_half).step))
    bad = mem._replace(gamma=jnp.asarray(jnp.nan, precision))
    fb = _model_step("sr1", g, bad, 0.3, d_half)
    assert int(fb.case) == tr_model.FALLBACK
    np.testing.assert_array_equal(np.asarray(fb.step), np.asarray(fo.step))
    with pytest.raises(ValueError, match="model='sr1' or model='first_order'"):
        ell.model_step("newton", g, mem, 0.3, d_half)
    with pytest.raises(ValueError, match="needs pairs"):
        ell.model_step("sr1", g, None, 0.3, d_half)


# ----------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="beta2 must lie in"):
        ell.diag_norm(beta2=1.0)
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        ell.diag_norm(eps=0.0)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        ell.init(0)
    with pytest.raises(TypeError, match="floating"):
        ell.init(3, jnp.int32)
    state = ell.init(4)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        ell.update(state, jnp.ones(5))
    with pytest.raises(ValueError, match="beta2 must lie in"):
        ell.update(state, jnp.ones(4), beta2=-0.1)
    pairs = ell.init_pairs(4, 2)
    with pytest.raises(ValueError, match="d_half must be a flat vector"):
        ell.scaled_memory(pairs, jnp.ones(3))
    with pytest.raises(ValueError, match="d_half must be a flat vector"):
        ell.solve(jnp.ones(4), pairs, 1.0, jnp.ones((4, 1)))
    with pytest.raises(ValueError, match="radius must be finite and > 0"):
        ell.solve(jnp.ones(4), pairs, 0.0, jnp.ones(4))
    with pytest.raises(ValueError, match="n must be a positive integer"):
        ell.radius_from_rms(0.1, 0)


# ----------------------------------------------------------------------------------------------
# Inside shard_map (the APTS local phase): replicated pairs and D, per-device gradient and pair


def test_inside_shard_map_matches_per_device(x64):
    from jax.sharding import PartitionSpec as P

    axis, ndev = "d", 2
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:ndev]), (axis,))
    rng = make_rng("shard-map")
    n, m = N, M
    pairs = _pairs_from_quadratic(rng, n, m, _symmetric(rng, n, rng.uniform(-1, 3, n)), np.float64)
    pairs = pairs._replace(mask=jnp.asarray([False, True, True, True]))
    d_half = jnp.asarray(_random_d_half(rng, n))
    g, s, y = (jnp.asarray(rng.standard_normal((ndev, n))) for _ in range(3))
    # Device 1: yhat = Bhat shat exactly, a pair that the skip rule rejects.
    mem = _scaled_memory(pairs, d_half)
    y = y.at[1].set(d_half * _matvec(mem, d_half * s[1]))

    def local(pairs, d_half, g, s, y):
        mem = ell.scaled_memory(pairs, d_half)
        res = ell.solve(g, mem, 0.4, d_half)
        new, stored = ell.update_pairs(pairs, s, y, d_half, scaled=mem)
        return res.step, new, stored

    def body(pairs, d_half, g, s, y):
        step, new, stored = local(pairs, d_half, g[0], s[0], y[0])
        return jax.tree.map(lambda a: a[None], (step, new, stored))

    sharded = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(axis), P(axis), P(axis)),
                                    out_specs=P(axis), check_vma=True))
    step, new, stored = sharded(pairs, d_half, g, s, y)
    want = [jax.jit(local)(pairs, d_half, g[i], s[i], y[i]) for i in range(ndev)]
    np.testing.assert_array_equal(np.asarray(stored), [bool(w[2]) for w in want])
    assert bool(stored[0]) and not bool(stored[1])
    for i in range(ndev):
        assert _rel(step[i], want[i][0]) <= 1e-12
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(want[i][1]), strict=True):
            np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(b))
