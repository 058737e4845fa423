"""Tests of the trust-region optimizer: radius control, model steps, the pure iteration and the
optax face (chain, value_and_grad_from_state, ShapeDtypeStruct init, no recompilation, NaN handling,
bad input). Runs under jax.jit in float32 and float64 (``precision`` fixture), both models.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_minimize import logistic, logistic_data

from apts_jax import (
    DEFAULT_RADIUS_CONFIG,
    RadiusConfig,
    TrustRegionInfo,
    TrustRegionState,
    lsr1,
    minimize,
    trust_region,
)
from apts_jax import radius as radius_lib
from apts_jax.minimize import MAX_ITERATIONS, MIN_RADIUS
from apts_jax.tr import iteration
from apts_jax.tr_model import FIRST_ORDER, compute_step, first_order_step

MODELS = ["sr1", "first_order"]


def _signature(tree):
    """(shape, dtype, weak_type) of every leaf: what decides whether jit retraces."""
    return jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype), bool(a.weak_type)), tree)


# ------------------------------------------------------------------------------------------------
# Radius control
# ------------------------------------------------------------------------------------------------


def _ratio_reference(actual, predicted):
    if not (np.isfinite(actual) and np.isfinite(predicted) and predicted > 0):
        return -np.inf
    return actual / predicted


def _radius_reference(radius, rho, step_norm, c: RadiusConfig, dtype):
    boundary = np.asarray(c.boundary_fraction, dtype) * np.asarray(radius, dtype)  # as in dtype
    if not rho >= c.eta1:
        new = c.shrink * radius
    elif rho > c.eta2 and step_norm >= boundary:
        new = c.grow * radius
    else:
        new = radius
    return min(max(new, c.min_radius), c.max_radius)


def test_ratio_guard_and_values(precision):
    cases = [
        (1.0, 2.0), (-1.0, 2.0), (3.0, 1.0), (0.0, 1.0),
        (1.0, 0.0), (0.0, 0.0), (-1.0, -1.0), (1.0, -1e-30),  # predicted <= 0: reject
        (np.nan, 1.0), (np.inf, 1.0), (-np.inf, 1.0), (1.0, np.nan), (1.0, np.inf),
    ]
    actual = jnp.asarray([a for a, _ in cases], precision)
    predicted = jnp.asarray([p for _, p in cases], precision)
    rho = jax.jit(radius_lib.ratio)(actual, predicted)
    assert rho.dtype == precision
    assert not np.any(np.isnan(np.asarray(rho)))
    expected = [_ratio_reference(a, p) for a, p in cases]
    np.testing.assert_array_equal(np.asarray(rho), np.asarray(expected, precision))


def test_update_radius_matches_rule(precision, rng):
    c = DEFAULT_RADIUS_CONFIG
    radii = np.asarray([1e-8, 1e-3, 0.1, 1.0, 6.0, 10.0])
    rhos = np.asarray([-np.inf, np.nan, -1.0, 0.0, 0.05, 0.1, 0.5, 0.75, 0.76, 1.0, 5.0, np.inf])
    fractions = np.asarray([0.0, 0.5, 0.89, 0.9, 1.0])
    grid = np.stack(np.meshgrid(radii, rhos, fractions, indexing="ij"), -1).reshape(-1, 3)
    r, rho, frac = (jnp.asarray(grid[:, i], precision) for i in range(3))
    step_norm = r * frac
    new = jax.jit(radius_lib.update_radius)(r, rho, step_norm, c)
    assert new.dtype == precision
    expected = [
        _radius_reference(float(a), float(b), float(s), c, precision)
        for a, b, s in zip(np.asarray(r), np.asarray(rho), np.asarray(step_norm), strict=True)
    ]
    np.testing.assert_allclose(np.asarray(new), np.asarray(expected, precision), rtol=1e-6)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("initial_radius", 0.0, "initial_radius"),
        ("initial_radius", -0.1, "initial_radius"),
        ("min_radius", 0.0, "min_radius"),
        ("max_radius", 0.05, "max_radius"),
        ("eta1", -0.1, "eta1"),
        ("eta1", 0.75, "eta1"),
        ("eta2", 1.0, "eta2"),
        ("shrink", 0.0, "shrink"),
        ("shrink", 1.0, "shrink"),
        ("grow", 0.9, "grow"),
        ("boundary_fraction", 1.5, "boundary_fraction"),
        ("max_radius", float("inf"), "finite"),
        ("eta2", float("nan"), "finite"),
    ],
)
def test_validate_config_rejects(field, value, match):
    bad = DEFAULT_RADIUS_CONFIG._replace(**{field: value})
    with pytest.raises(ValueError, match=match):
        radius_lib.validate_config(bad)
    with pytest.raises(ValueError, match=match):
        trust_region(**{field: value})


def test_validate_config_accepts_defaults():
    assert radius_lib.validate_config(RadiusConfig()) == DEFAULT_RADIUS_CONFIG
    with pytest.raises(TypeError, match="concrete"):
        radius_lib.validate_config(DEFAULT_RADIUS_CONFIG._replace(eta1="x"))


# ------------------------------------------------------------------------------------------------
# Model steps and the pure iteration
# ------------------------------------------------------------------------------------------------


def test_first_order_step(precision):
    g = jnp.asarray([3.0, -4.0], precision)
    ms = jax.jit(first_order_step)(g, 0.5)
    np.testing.assert_allclose(np.asarray(ms.step), [-0.3, 0.4], rtol=1e-6)
    assert float(ms.predicted_decrease) == pytest.approx(2.5, rel=1e-6)
    assert float(ms.step_norm) == pytest.approx(0.5)
    assert int(ms.case) == FIRST_ORDER and ms.step.dtype == precision
    # huge and tiny gradients: no overflow/underflow in the norm
    big = jnp.asarray([3e30, -4e30], precision)
    np.testing.assert_allclose(np.asarray(first_order_step(big, 1.0).step), [-0.6, 0.8], rtol=1e-6)
    zero = first_order_step(jnp.zeros(3, precision), 1.0)
    assert float(zero.predicted_decrease) == 0.0 and float(zero.step_norm) == 0.0
    assert np.all(np.asarray(zero.step) == 0.0)
    with pytest.raises(ValueError, match="unknown model"):
        compute_step("cauchy", g, None, 1.0)


def test_iteration_rejects_zero_gradient_without_nan():
    """rho guard in the iteration: g = 0 gives predicted decrease 0, a rejection, no NaN."""

    def vg(x):
        return jnp.sum(x**2), 2 * x

    x = jnp.zeros(3)
    res = jax.jit(functools.partial(iteration, vg, model="first_order"))(
        x, 0.0, jnp.zeros(3), 0.5, None
    )
    assert not bool(res.accepted) and float(res.ratio) == -np.inf
    assert float(res.radius) == pytest.approx(0.25)
    leaves = [np.asarray(v) for v in jax.tree.leaves(res)]
    assert all(not np.any(np.isnan(v)) for v in leaves if np.issubdtype(v.dtype, np.floating))


def _quadratic(n, seed, dtype):
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.normal(size=(n, n)))[0]
    a = (q * np.logspace(-1, 1, n)) @ q.T
    b = rng.normal(size=n)
    a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)

    def vg(x):
        return 0.5 * x @ a @ x + b @ x, a @ x + b

    return vg, rng


def _run_iterations(vg, x, d_half, memory, steps, radius=0.3):
    run = jax.jit(functools.partial(iteration, vg, model="sr1"))
    value, grad = vg(x)
    # strong-typed arrays from the start: one compilation for all the steps
    radius = jnp.asarray(radius, x.dtype)
    memory = jax.tree.map(lambda a: jnp.asarray(a, a.dtype), memory)
    out = []
    for _ in range(steps):
        res = run(x, value, grad, radius, memory, d_half=d_half)
        x, value, grad, radius, memory = res.params, res.value, res.grad, res.radius, res.memory
        out.append(res)
    return out


def test_iteration_with_unit_ellipsoid_is_the_l2_iteration(precision):
    """``d_half = 1`` (D = I) with unscaled pairs (ellipsoid.Pairs) reproduces the L2 iteration."""
    from apts_jax import ellipsoid

    vg, _ = _quadratic(12, 0, precision)
    x0 = jnp.zeros(12, precision)
    l2 = _run_iterations(vg, x0, None, lsr1.init(12, 4, dtype=precision), 6)
    ell = _run_iterations(vg, x0, jnp.ones(12, precision), ellipsoid.init_pairs(12, 4, precision), 6)
    rtol = 1e-5 if precision == jnp.float32 else 1e-12
    scaled_memory = jax.jit(ellipsoid.scaled_memory)
    for a, b in zip(l2, ell, strict=True):
        np.testing.assert_allclose(np.asarray(b.params), np.asarray(a.params), rtol=rtol, atol=rtol)
        assert float(a.radius) == float(b.radius) and bool(a.accepted) == bool(b.accepted)
        assert bool(a.pair_stored) == bool(b.pair_stored)
        # Pairs drop badly conditioned columns when next mapped (ellipsoid.scaled_memory), the L2
        # memory when it stores: compare the memories that the next solve uses.
        used = scaled_memory(b.memory, jnp.ones(12, precision))
        np.testing.assert_array_equal(np.asarray(used.mask), np.asarray(a.memory.mask))
        np.testing.assert_allclose(float(used.gamma), float(a.memory.gamma), rtol=10 * rtol)
    assert sum(bool(r.pair_stored) for r in l2) >= 3  # the memory was exercised


def test_iteration_ellipsoid_first_step_closed_form(precision):
    """Empty memory (B^ = I): u = -g^ min(1, Delta/||g^||), g^ = D^{-1/2} g, s = D^{-1/2} u; the
    reported step norm is ||D^{1/2} s|| and the stored pair is (s, y) in the original variables."""
    from apts_jax import ellipsoid

    vg, rng = _quadratic(10, 1, precision)
    d_half = jnp.asarray(rng.uniform(0.3, 3.0, size=10), precision)
    x0 = jnp.asarray(rng.normal(size=10), precision)
    g = np.asarray(vg(x0)[1], np.float64)
    dh = np.asarray(d_half, np.float64)
    rtol = 2e-5 if precision == jnp.float32 else 1e-12
    for radius in (0.05, 100.0):  # on the boundary / interior (the Newton step)
        res = _run_iterations(vg, x0, d_half, ellipsoid.init_pairs(10, 3, precision), 1,
                              radius=radius)[0]
        g_hat = g / dh
        u = -g_hat * min(1.0, radius / np.linalg.norm(g_hat))
        want = u / dh
        assert bool(res.pair_stored)  # the trial step, accepted or not, is the newest pair
        step = np.asarray(res.memory.s[:, -1])
        np.testing.assert_allclose(step, want, rtol=rtol, atol=rtol * np.max(np.abs(want)))
        if bool(res.accepted):
            np.testing.assert_allclose(np.asarray(res.update), step)
        np.testing.assert_allclose(float(res.step_norm), np.linalg.norm(u), rtol=rtol)
        np.testing.assert_allclose(float(res.predicted_decrease), -(g_hat @ u + 0.5 * u @ u),
                                   rtol=10 * rtol)
    with pytest.raises(TypeError, match="ellipsoid.Pairs"):
        iteration(vg, x0, 0.0, jnp.asarray(g, precision), 0.1, lsr1.init(10, 3, dtype=precision),
                  d_half=d_half)
    with pytest.raises(TypeError, match="d_half is None"):
        iteration(vg, x0, 0.0, jnp.asarray(g, precision), 0.1,
                  ellipsoid.init_pairs(10, 3, precision))


def test_iteration_rejects_uphill_model_step():
    """A (wrong) gradient that makes the step go uphill: predicted > 0, actual < 0 -> rejected."""

    def vg(x):
        return jnp.sum(x**2), 2 * x

    x = jnp.ones(2)
    res = iteration(vg, x, 2.0, -jnp.ones(2), 0.5, None, model="first_order")
    assert float(res.predicted_decrease) > 0 and float(res.actual_decrease) < 0
    assert not bool(res.accepted) and float(res.ratio) < 0
    np.testing.assert_array_equal(np.asarray(res.params), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(res.update), 0.0)


# ------------------------------------------------------------------------------------------------
# The optax face: chain, value_and_grad_from_state, jit, same result as minimize
# ------------------------------------------------------------------------------------------------


@functools.cache
def _logistic_step(model: str):
    """A jitted optax training step (trust region inside optax.chain); counts its traces."""
    opt = optax.chain(trust_region(model), optax.scale(1.0))
    vg = optax.value_and_grad_from_state(logistic)
    traces = []

    @jax.jit
    def step(params, state, x, y, lam):
        traces.append(1)
        value, grad = vg(params, x, y, lam, state=state)
        updates, state = opt.update(
            grad, state, params, value=value, grad=grad, value_fn=logistic, x=x, y=y, lam=lam
        )
        return optax.apply_updates(params, updates), state

    return opt, step, traces


@pytest.mark.parametrize("model", MODELS)
def test_chain_matches_minimize_and_state_reuse(model, precision):
    x_np, y_np, lam = logistic_data()
    data = (jnp.asarray(x_np, precision), jnp.asarray(y_np, precision), lam)
    params0 = {"w": jnp.zeros(x_np.shape[1], precision), "b": jnp.zeros((), precision)}
    ref, ref_state, stats = minimize(
        logistic, params0, *data, model=model, max_iterations=10, gtol=0.0
    )
    assert int(stats.termination) in (MAX_ITERATIONS, MIN_RADIUS)
    n_steps = int(stats.iterations)  # the optax loop makes the same iterations

    opt, step, traces = _logistic_step(model)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params0)
    state = opt.init(abstract)
    assert _signature(state) == _signature(opt.init(params0))
    assert float(optax.tree.get(state, "value")) == np.inf  # forces a fresh first evaluation
    n_traces = len(traces)
    params = params0
    for k in range(n_steps):
        params, state = step(params, state, *data)
        if k == 0:
            signature = _signature(state)
    assert _signature(state) == signature == _signature(opt.init(abstract))
    assert len(traces) - n_traces <= 1  # at most one trace per (model, precision): no recompiles

    tr_state = state[0]
    assert isinstance(tr_state, TrustRegionState) and isinstance(tr_state.info, TrustRegionInfo)
    rtol = 1e-4 if precision == np.float32 else 1e-7  # same math, different XLA programs
    for leaf, ref_leaf in zip(jax.tree.leaves(params), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(ref_leaf), rtol=rtol, atol=rtol)
    assert int(tr_state.info.num_accepted) == int(stats.num_accepted)
    assert int(tr_state.count) == n_steps
    # one evaluation per step, plus one at the start that value_and_grad_from_state made itself
    assert int(tr_state.info.num_fun_evals) == n_steps

    # state.value / state.grad are f and grad f at the current params
    value, grad = jax.value_and_grad(logistic)(params, *data)
    np.testing.assert_allclose(float(optax.tree.get(state, "value")), float(value), rtol=rtol)
    for leaf, ref_leaf in zip(
        jax.tree.leaves(optax.tree.get(state, "grad")), jax.tree.leaves(grad), strict=True
    ):
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(ref_leaf), rtol=rtol, atol=rtol)
    if model == "sr1":
        assert int(lsr1.num_pairs(tr_state.memory)) > 0
    else:
        assert tr_state.memory is None


# ------------------------------------------------------------------------------------------------
# NaN / Inf trial points
# ------------------------------------------------------------------------------------------------


def rosen_poisoned(x, poison):
    """Rosenbrock; poison=1: NaN value, 2: finite value but NaN gradient, 3: +inf value."""
    f = jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)
    f = jnp.where(poison == 1, jnp.nan, jnp.where(poison == 3, jnp.inf, f))
    u = jnp.where(poison == 2, x[0] ** 2 - x[0] ** 2, 1.0)  # d sqrt(u) at u = 0 -> inf * 0 = NaN
    return f + jnp.where(poison == 2, jnp.sqrt(u), 0.0)


@functools.cache
def _rosen_step(model: str):
    opt = trust_region(model)
    vg = optax.value_and_grad_from_state(rosen_poisoned)

    def step(params, state, poison):
        value, grad = vg(params, jnp.zeros((), jnp.int32), state=state)
        updates, state = opt.update(
            grad, state, params, value=value, grad=grad, value_fn=rosen_poisoned, poison=poison
        )
        return optax.apply_updates(params, updates), state

    @functools.partial(jax.jit, static_argnums=2)
    def run(params, state, n_steps: int):
        """n_steps clean steps in one jitted fori_loop (the long first-order tail)."""
        zero = jnp.zeros((), jnp.int32)
        return jax.lax.fori_loop(0, n_steps, lambda _, c: step(*c, zero), (params, state))

    return opt, jax.jit(step), run


@pytest.mark.parametrize("model", MODELS)
def test_nan_trial_never_reaches_params_or_memory(model, precision):
    opt, step, run = _rosen_step(model)
    params = jnp.asarray([-1.2, 1.0], precision)
    state = opt.init(params)
    poisoned = {3: 1, 6: 2, 10: 3, 11: 1}
    n_steps = 300 if model == "sr1" else 30
    for k in range(n_steps):
        old_params, old_state = params, state
        params, state = step(params, state, jnp.asarray(poisoned.get(k, 0), jnp.int32))
        if k in poisoned:
            assert not bool(state.info.trial_finite) and not bool(state.info.accepted)
            assert not bool(state.info.pair_stored)
            assert float(state.info.ratio) == -np.inf
            np.testing.assert_array_equal(np.asarray(params), np.asarray(old_params))
            assert float(state.value) == float(old_state.value)
            np.testing.assert_array_equal(np.asarray(state.grad), np.asarray(old_state.grad))
            for new, old in zip(jax.tree.leaves(state.memory), jax.tree.leaves(old_state.memory),
                                strict=True):
                np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
            expected = max(0.5 * float(old_state.radius), 1e-8)
            assert float(state.radius) == pytest.approx(expected, rel=1e-6)
        assert np.all(np.isfinite(np.asarray(params)))
        assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(state.memory))
    assert int(state.info.num_rejected) >= len(poisoned)
    if model == "first_order":
        params, state = run(params, state, 20_000)
    np.testing.assert_allclose(np.asarray(params), np.ones(2), atol=2e-3)

    # rho guard at the exact minimiser: g = 0, predicted decrease 0 -> rejected, no NaN anywhere
    at_min = jnp.ones(2, precision)
    new_params, new_state = step(at_min, opt.init(at_min), jnp.asarray(0, jnp.int32))
    assert not bool(new_state.info.accepted) and float(new_state.info.ratio) == -np.inf
    np.testing.assert_array_equal(np.asarray(new_params), np.ones(2))
    floats = [np.asarray(v) for v in jax.tree.leaves(new_state)]
    assert not any(np.isnan(v).any() for v in floats if np.issubdtype(v.dtype, np.floating))


# ------------------------------------------------------------------------------------------------
# Pytrees, dtypes, kwargs filtering
# ------------------------------------------------------------------------------------------------


def test_mixed_dtype_pytree_first_order():
    params = {"a": jnp.ones((2, 2), jnp.float32), "b": jnp.ones(3, jnp.bfloat16)}

    def loss(p):
        return jnp.sum(p["a"] ** 2) + jnp.sum(p["b"].astype(jnp.float32) ** 2)

    opt = trust_region("first_order", initial_radius=0.5)
    state = opt.init(params)
    assert state.grad["b"].dtype == jnp.bfloat16 and state.value.dtype == jnp.float32
    value, grad = jax.value_and_grad(loss)(params)
    updates, new_state = jax.jit(
        lambda p, s, v, g: opt.update(g, s, p, value=v, grad=g, value_fn=loss)
    )(params, state, value, grad)
    assert jax.tree.map(lambda u: u.dtype, updates) == {"a": jnp.float32, "b": jnp.bfloat16}
    assert _signature(new_state) == _signature(state)
    assert bool(new_state.info.accepted)
    step_norm = np.sqrt(sum(float(jnp.sum(u.astype(jnp.float32) ** 2))
                            for u in jax.tree.leaves(updates)))
    assert step_norm == pytest.approx(0.5, rel=1e-2)


def test_value_fn_kwargs_filtering():
    calls = {}

    def loss(p, scale, *, offset=0.0):
        calls["kw"] = (scale, offset)
        return scale * jnp.sum((p - offset) ** 2)

    opt = trust_region("first_order")
    p = jnp.ones(2)
    state = opt.init(p)
    value, grad = jax.value_and_grad(loss)(p, 2.0)
    opt.update(grad, state, p, value=value, grad=grad, value_fn=loss, scale=2.0, offset=1.0)
    assert calls["kw"] == (2.0, 1.0)
    with pytest.raises(TypeError, match="unused"):
        opt.update(grad, state, p, value=value, grad=grad, value_fn=loss, scale=2.0, unused=1)

    def loss_kwargs(p, **kw):
        calls["all"] = sorted(kw)
        return jnp.sum(p**2)

    opt.update(grad, state, p, value=value, grad=grad, value_fn=loss_kwargs, a=1, b=2)
    assert calls["all"] == ["a", "b"]
    # value/grad omitted: computed with value_fn (one extra evaluation, counted)
    _, st = opt.update(grad, state, p, value_fn=loss, scale=2.0)
    assert int(st.info.num_fun_evals) == 2


# ------------------------------------------------------------------------------------------------
# Bad input: raises at the call, before anything is evaluated
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"model": "bfgs"}, ValueError, "unknown model"),
        ({"model": None}, ValueError, "unknown model"),
        ({"memory_size": 0}, ValueError, "memory_size"),
        ({"memory_size": -3}, ValueError, "memory_size"),
        ({"memory_size": 1.5}, TypeError, "memory_size"),
        ({"initial_radius": 0.0}, ValueError, "initial_radius"),
        ({"min_radius": -1.0}, ValueError, "min_radius"),
        ({"eta1": 0.9, "eta2": 0.5}, ValueError, "eta1"),
        ({"skip_tol": float("nan")}, ValueError, "skip_tol"),
    ],
)
def test_factory_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        trust_region(**kwargs)


def test_init_rejects_integer_params():
    opt = trust_region()
    with pytest.raises(TypeError, match=r"\['steps'\]"):
        opt.init({"w": jnp.ones(3), "steps": jnp.zeros((), jnp.int32)})
    with pytest.raises(TypeError, match="floating"):
        opt.init(jax.ShapeDtypeStruct((3,), jnp.int32))


def test_update_rejects_bad_input_before_evaluating():
    calls = []

    def loss(p):
        calls.append(1)
        return jnp.sum(p["w"] ** 2) + p["b"] ** 2

    opt = trust_region()
    params = {"w": jnp.ones(3), "b": jnp.ones(())}
    state = opt.init(params)
    grad = {"w": jnp.ones(3), "b": jnp.ones(())}
    ok = dict(value=jnp.asarray(4.0), grad=grad, value_fn=loss)

    with pytest.raises(TypeError, match="value_fn="):
        opt.update(grad, state, params, value=jnp.asarray(4.0), grad=grad)
    with pytest.raises(TypeError, match="callable"):
        opt.update(grad, state, params, value=jnp.asarray(4.0), grad=grad, value_fn=3.0)
    with pytest.raises(ValueError, match=r"grad leaf \['w'\]"):
        opt.update(grad, state, params, **{**ok, "grad": {"w": jnp.ones(4), "b": jnp.ones(())}})
    with pytest.raises(ValueError, match=r"updates leaf \['b'\]"):
        opt.update({"w": jnp.ones(3), "b": jnp.ones(2)}, state, params, **ok)
    with pytest.raises(ValueError, match="updates has tree structure"):
        opt.update({"w": jnp.ones(3)}, state, params, **ok)
    with pytest.raises(TypeError, match=r"\['b'\]"):
        opt.update(grad, state, {"w": jnp.ones(3), "b": jnp.ones((), jnp.int32)}, **ok)
    with pytest.raises(ValueError, match="init"):
        other = opt.init({"w": jnp.ones(5), "b": jnp.ones(())})
        opt.update(grad, other._replace(grad=grad), params, **ok)
    with pytest.raises(TypeError, match="TrustRegionState"):
        opt.update(grad, (state,), params, **ok)
    with pytest.raises(ValueError, match="scalar"):
        opt.update(grad, state, params, **{**ok, "value": jnp.ones(2)})
    with pytest.raises(ValueError, match="params"):
        opt.update(grad, state, None, **ok)
    assert not calls
    # and the same call with good input works (first-order: cheap to run eagerly)
    opt = trust_region("first_order")
    state = opt.init(params)
    updates, new_state = opt.update(grad, state, params, **ok)
    assert calls and int(new_state.count) == 1 and int(state.count) == 0


# ------------------------------------------------------------------------------------------------
# One RadiusConfig argument for every factory (the eight keywords stay as a convenience)
# ------------------------------------------------------------------------------------------------


def _initial_radius(factory, **kw):
    import apts_jax

    p = jnp.zeros(3)
    if factory == "trust_region":
        return float(trust_region(**kw).init(p).radius)
    if factory == "apts":
        return float(apts_jax.apts("i", **kw).init(p).radius)
    if factory == "minimize":
        return float(minimize(lambda x: jnp.sum((x - 1.0) ** 2), p, max_iterations=0, **kw)[1].radius)
    assert factory == "make_apts"
    layout = apts_jax.parallel.subdomain_layout(2, devices=2)
    loss = lambda x, shard: jnp.sum((x - shard) ** 2)  # noqa: E731
    prog = apts_jax.parallel.make_apts(loss, p, layout, **kw)
    return float(prog.init(p, apts_jax.parallel.split_data(layout, np.ones((4, 3), np.float32))).radius)


@pytest.mark.parametrize("factory", ["trust_region", "apts", "minimize", "make_apts"])
def test_radius_config_argument(factory):
    cfg = RadiusConfig(initial_radius=0.5, max_radius=4.0)
    assert _initial_radius(factory, radius=cfg) == 0.5
    assert _initial_radius(factory, initial_radius=0.25) == 0.25  # keyword on the default
    assert _initial_radius(factory, radius=cfg, initial_radius=0.5) == 0.5  # agrees: fine
    with pytest.raises(ValueError, match=r"\['initial_radius'\] given both"):
        _initial_radius(factory, radius=cfg, initial_radius=0.2)
    with pytest.raises(TypeError, match="RadiusConfig"):
        _initial_radius(factory, radius={"initial_radius": 0.5})
    with pytest.raises(ValueError, match="exceeds max_radius"):  # validated like the keywords
        _initial_radius(factory, radius=RadiusConfig(initial_radius=0.5, max_radius=0.1))
