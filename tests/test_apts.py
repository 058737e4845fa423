"""Tests of the APTS core (:mod:`apts_jax.apts_transform`): Algorithm 1 step by step, and its optax face.

* ``N = 1``: one outer iteration is the local TR loop on ``f`` (at most ``nu`` iterations of
  :func:`apts_jax.tr.iteration`, stopped at the boundary), the APTS ratio test (eq. 6-7)
  and one global TR iteration -- rebuilt by hand in float64 and compared iteration by iteration;
* the local phase: the first local gradient is the global one (``r_i`` in the gradient), the
  value of ``f_i`` carries ``<r_i, x - theta_k>``, ``||s_i|| <= Delta/N``;
* ``||sum_i s_i|| <= Delta_k`` over a run; a rejected outer step leaves ``theta`` unchanged;
* the optax face ``apts(axis_name)`` inside ``jax.pmap`` (a classic data-parallel script),
  ``jax.vmap(axis_name=...)`` and ``jax.shard_map`` (``check_vma`` True and False) matches
  :func:`apts_jax.parallel.solve` with the same ``N``; a replicated gradient inside ``shard_map``
  and other bad input raise clear errors before anything runs.

The session simulates 8 CPU devices (``tests/conftest.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from logistic_problem import logistic_data, logistic_loss, zeros_params

import apts_jax
from apts_jax import lsr1, parallel
from apts_jax.apts_transform import (
    PAPER,
    apts,
    apts_state_specs,
    local_phase,
    outer_step,
    ratio_test,
    to_varying,
)
from apts_jax.data import OverlapSampler
from apts_jax.radius import DEFAULT_RADIUS_CONFIG
from apts_jax.tr import iteration
from apts_jax.tr_model import compute_step

MODELS = ["sr1", "first_order"]
AXIS = "i"


# ------------------------------------------------------------------------------------------------
# Problems
# ------------------------------------------------------------------------------------------------


def flat(params):
    return np.concatenate([np.ravel(np.asarray(params["b"])), np.ravel(np.asarray(params["w"]))])


def to_numpy(tree):
    return jax.tree.map(lambda a: None if a is None else np.array(a), tree)


# ------------------------------------------------------------------------------------------------
# 1. N = 1: one outer iteration = nu local TR iterations on f + ratio test + one global iteration
# ------------------------------------------------------------------------------------------------


def _reference_outer(it, fvg, theta, value, grad, radius, lmem, gmem, nu, cfg):
    """Algorithm 1 for ``N = 1`` (``r = 0``, local radius ``Delta``) from the TR iteration."""
    cap = float(radius)
    lcfg = cfg._replace(max_radius=cap, min_radius=min(cfg.min_radius, cap))
    x, v, g, r, mem = theta, value, grad, cap, lmem
    local_iterations = 0
    for _ in range(nu):
        left = cap - float(np.linalg.norm(x - theta))
        res = it(x, v, g, max(min(r, left), 0.0), mem, lcfg)
        x, v, g, mem = np.asarray(res.params), float(res.value), np.asarray(res.grad), res.memory
        r = min(float(res.radius), cap)
        local_iterations += 1
        if np.linalg.norm(x - theta) >= (1.0 - 1e-3) * cap:  # reached the local boundary
            break
    s = x - theta
    predicted = value - v
    trial_value, trial_grad = fvg(theta + s)
    trial_value, trial_grad = float(trial_value), np.asarray(trial_grad)
    actual = value - trial_value
    ok = np.isfinite(actual) and np.all(np.isfinite(trial_grad)) and predicted > 0
    rho = actual / predicted if ok else -np.inf
    # eq. (7)
    if rho < cfg.eta1:
        radius_t = max(cfg.shrink * radius, cfg.min_radius)
    elif rho > cfg.eta2:
        radius_t = min(cfg.grow * radius, cfg.max_radius)
    else:
        radius_t = radius
    accepted = rho >= cfg.eta1
    if accepted:
        theta_t, value_t, grad_t = theta + s, trial_value, trial_grad
    else:
        theta_t, value_t, grad_t = theta, value, grad
    res = it(theta_t, value_t, grad_t, radius_t, gmem, cfg)
    return {
        "params": np.asarray(res.params), "value": float(res.value), "grad": np.asarray(res.grad),
        "radius": float(res.radius), "local_memory": mem, "global_memory": res.memory,
        "ratio": rho, "accepted": accepted, "predicted": predicted, "actual": actual,
        "step_norm": float(np.linalg.norm(s)), "local_iterations": local_iterations,
        "global_accepted": bool(res.accepted),
    }


@pytest.mark.parametrize("model", MODELS)
def test_single_subdomain_is_local_loop_ratio_test_and_global_iteration(x64, model):
    nu, outer = 5, 8
    data = logistic_data(10, 64, seed=11, dtype=np.float64)
    data["reg"] = np.full((64,), 1e-3)
    p0 = zeros_params(10, jnp.float64)
    layout = parallel.subdomain_layout(1, devices=1)
    prog = parallel.make_apts(logistic_loss, p0, layout, local_steps=nu, model=model,
                              preset="paper")
    sharded = parallel.split_data(layout, data)
    state = prog.init(p0, sharded)

    fvg = jax.jit(jax.value_and_grad(lambda x: logistic_loss(prog.unravel(x), data)))
    it = jax.jit(lambda x, v, g, r, mem, cfg: iteration(fvg, x, v, g, r, mem, model=model,
                                                        config=cfg))
    cfg = DEFAULT_RADIUS_CONFIG
    seen_multi_local, seen_reject = False, False
    for _ in range(outer):
        before = to_numpy(state)  # prog.step donates its input state
        lmem = None if before.local_memory is None else jax.tree.map(
            lambda a: a[0], before.local_memory)
        ref = _reference_outer(it, fvg, before.params, float(before.value), before.grad,
                               float(before.radius), lmem, before.global_memory, nu, cfg)
        state, stats = prog.step(state, sharded)

        np.testing.assert_allclose(state.params, ref["params"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(state.grad, ref["grad"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(float(state.value), ref["value"], rtol=1e-12)
        np.testing.assert_allclose(float(state.radius), ref["radius"], rtol=1e-12)
        assert bool(stats.accepted) == ref["accepted"]
        assert bool(stats.global_accepted) == ref["global_accepted"]
        assert int(stats.local_iterations[0]) == ref["local_iterations"]
        np.testing.assert_allclose(float(stats.step_norm), ref["step_norm"], rtol=1e-10,
                                   atol=1e-14)
        np.testing.assert_allclose(float(stats.predicted_decrease), ref["predicted"],
                                   rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(float(stats.actual_decrease), ref["actual"], rtol=1e-8,
                                   atol=1e-14)
        if np.isfinite(ref["ratio"]):
            np.testing.assert_allclose(float(stats.ratio), ref["ratio"], rtol=1e-8)
        else:
            assert float(stats.ratio) == -np.inf
        # With N = 1 the local problem is f itself: the APTS ratio is 1 up to rounding.
        if ref["step_norm"] > 0:
            np.testing.assert_allclose(float(stats.ratio), 1.0, atol=1e-8)
        if model == "sr1":
            for got, want in ((jax.tree.map(lambda a: a[0], state.local_memory),
                               ref["local_memory"]),
                              (state.global_memory, ref["global_memory"])):
                np.testing.assert_array_equal(got.mask, want.mask)
                for field in ("s", "y", "gamma"):
                    np.testing.assert_allclose(getattr(got, field), getattr(want, field),
                                               rtol=1e-9, atol=1e-12)
        seen_multi_local |= ref["local_iterations"] > 1
        seen_reject |= not ref["global_accepted"]
    # The run exercised the interesting branches (several local iterations, a rejection).
    if model == "sr1":
        assert seen_multi_local
    assert seen_reject or seen_multi_local


# ------------------------------------------------------------------------------------------------
# 2a. The local phase: first gradient = global gradient, value of f_i carries <r_i, x - theta>
# ------------------------------------------------------------------------------------------------


def _local_problem(num, features=10, per=32):
    data = logistic_data(features, num * per, seed=5, dtype=np.float64)
    shards = {k: v.reshape((num, per) + v.shape[1:]) for k, v in data.items()}
    rng = np.random.default_rng(6)
    theta = 0.1 * rng.normal(size=features + 1)

    def f(x, shard):
        return logistic_loss({"b": x[0], "w": x[1:]}, shard)

    lv, lg = jax.vmap(jax.value_and_grad(f), in_axes=(None, 0))(theta, shards)
    return f, shards, theta, np.asarray(lv), np.asarray(lg)


def _random_memories(num, n, seed):
    """Distinct L-SR1 memories (pairs y = A s with a random SPD A per subdomain)."""
    rng = np.random.default_rng(seed)
    update = jax.jit(lambda mem, s, y: lsr1.update(mem, s, y)[0])
    mems = []
    for _ in range(num):
        q = rng.normal(size=(n, n))
        a = q @ q.T / n + 0.1 * np.eye(n)
        mem = lsr1.init(n, 5, dtype=jnp.float64)
        for _ in range(3):
            s = rng.normal(size=n)
            mem = update(mem, s, a @ s)
        assert int(lsr1.num_pairs(mem)) == 3
        mems.append(mem)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *mems)


# The property does not depend on the model; sr1 is slow (CI time, issue 9).
@pytest.mark.parametrize("model", [pytest.param("sr1", marks=pytest.mark.slow), "first_order"])
def test_local_phase_first_gradient_is_global(x64, model):
    num = 4
    f, shards, theta, lv, lg = _local_problem(num)
    g = lg.mean(axis=0)
    cap = 0.05
    mems = _random_memories(num, theta.size, 7) if model == "sr1" else None

    @jax.jit
    def run(shards, lv, lg, mems):
        def one(shard, v, gi, mem):
            res = local_phase(jax.value_and_grad(lambda x: f(x, shard)), theta, v, gi, g,
                              jnp.asarray(cap), mem, local_steps=1, model=model,
                              config=DEFAULT_RADIUS_CONFIG, skip_tol=1e-8)
            # the model steps of the global and of the local gradient, for comparison
            return (res, compute_step(model, jnp.asarray(g), mem, cap).step,
                    compute_step(model, gi, mem, cap).step)
        return jax.vmap(one)(shards, lv, lg, mems)

    res, global_steps, local_steps = run(shards, lv, lg, mems)
    assert np.all(np.asarray(res.iterations) == 1)
    assert np.all(np.asarray(res.accepted) == 1), "the small local steps should be accepted"
    for i in range(num):
        expected = np.asarray(global_steps[i])
        np.testing.assert_allclose(res.step[i], expected, rtol=1e-10, atol=1e-14)
        # ... and not the step of the local gradient alone (the shards disagree).
        assert np.linalg.norm(np.asarray(local_steps[i]) - expected) > 1e-3 * cap
        # the value carries the consistency term too:
        # f_i(theta + s) = f(theta + s; D_i) + <g - grad f(theta; D_i), s>, f_i(theta) = f(theta; D_i)
        s = np.asarray(res.step[i])
        shard = jax.tree.map(lambda a, i=i: a[i], shards)
        f_i_new = float(f(theta + s, shard)) + float(np.dot(g - lg[i], s))
        np.testing.assert_allclose(float(res.decrease[i]), lv[i] - f_i_new, rtol=1e-9,
                                   atol=1e-13)
        assert float(res.decrease[i]) > 0
        assert np.linalg.norm(s) <= cap * (1 + 1e-12)
    if model == "first_order":  # every subdomain takes the same global steepest-descent step
        np.testing.assert_allclose(res.step, np.broadcast_to(-cap * g / np.linalg.norm(g),
                                                             res.step.shape), rtol=1e-10)


# ------------------------------------------------------------------------------------------------
# 2b/2c. ||sum s_i|| <= Delta_k over a run; a rejected outer step leaves theta unchanged
# ------------------------------------------------------------------------------------------------


def penalised_loss(params, shard):
    """Logistic loss + ``pen * relu(||theta||^2 - 0.04^2)^2``: free inside the ball of radius
    0.04 around ``theta_0 = 0``, steep outside (``pen`` comes with the data)."""
    d2 = jnp.sum(params["w"] ** 2) + params["b"] ** 2
    return logistic_loss(params, shard) + shard["pen"][0] * jnp.maximum(d2 - 0.04**2, 0.0) ** 2


@pytest.fixture(scope="module")
def penalised_program():
    data = logistic_data(20, 256, seed=3)
    p0 = zeros_params(20)
    layout = parallel.subdomain_layout(4, devices=4)
    prog = parallel.make_apts(penalised_loss, p0, layout, local_steps=5, preset="paper")

    def make_data(pen):
        return parallel.split_data(layout, {**data, "pen": np.full((256,), pen, np.float32)})

    return prog, p0, make_data


def test_sum_of_local_steps_within_global_radius_and_loss_monotone(penalised_program):
    prog, p0, make_data = penalised_program
    data = make_data(0.0)  # plain logistic regression, default radii
    state = prog.init(p0, data)
    norms, radii, values = [], [], [float(state.value)]
    for _ in range(20):
        radii.append(float(state.radius))
        state, stats = prog.step(state, data)
        norms.append(float(stats.step_norm))
        values.append(float(stats.value))
        assert np.all(np.asarray(stats.local_iterations) >= 1)
    norms, radii = np.array(norms), np.array(radii)
    assert np.all(norms <= radii * (1 + 1e-5)), (norms, radii)  # float32: a few ulps
    assert np.max(norms / radii) > 0.5  # the bound is attained in order of magnitude
    assert np.all(np.isfinite(np.asarray(state.params)))
    # Full-batch APTS never increases the global loss, rejections included (item 4; the MLP
    # case is in test_parallel.py). Acceptance needs f(trial) < f(current) in these very numbers.
    assert int(state.num_rejected) > 0
    assert np.all(np.diff(values) <= 0), np.diff(values)
    assert values[-1] < 0.5 * values[0]


def test_rejected_outer_step_leaves_params_unchanged(penalised_program):
    prog, p0, make_data = penalised_program
    data = make_data(1e6)
    state = prog.init(p0, data)
    x0 = np.array(state.params)
    r0 = float(state.radius)
    assert r0 / 4 < 0.04 < r0  # local steps (<= r0/4) are free, their sum (~ r0) is not
    state, stats = prog.step(state, data)
    assert not bool(stats.accepted)
    assert float(stats.ratio) < DEFAULT_RADIUS_CONFIG.eta1
    assert float(stats.step_norm) > 0.5 * r0  # a genuine (aligned) step was proposed ...
    assert float(stats.predicted_decrease) > 0
    assert float(stats.actual_decrease) < 0  # ... and made things worse
    assert not bool(stats.global_accepted)  # the global step (radius r0/2) leaves the ball too
    np.testing.assert_array_equal(np.asarray(state.params), x0)
    np.testing.assert_allclose(float(state.radius), r0 / 4, rtol=1e-6)
    assert int(state.num_rejected) == 1 and int(state.num_accepted) == 0


# ------------------------------------------------------------------------------------------------
# 10. The optax face inside pmap / vmap / shard_map vs parallel.solve (same N)
# ------------------------------------------------------------------------------------------------

#: The optax-face problem: well posed in float32 (the radius cap keeps every accept/reject
#: decision far from its threshold, so summation order does not change the trajectory).
OPTAX_N, OPTAX_STEPS, OPTAX_RADIUS = 8, 8, {"max_radius": 0.1}


@functools.cache
def optax_problem():
    return logistic_data(20, 256, seed=0), zeros_params(20)


@pytest.fixture(scope="module")
def solve_reference():
    data, p0 = optax_problem()
    params, state, stats = parallel.solve(
        logistic_loss, p0, data, subdomains=OPTAX_N, max_iterations=OPTAX_STEPS, gtol=0.0,
        **OPTAX_RADIUS)
    assert int(stats.iterations) == OPTAX_STEPS
    return flat(params), np.asarray(stats.value_history)


def _per_subdomain(data, n):
    return {k: v.reshape((n, -1) + v.shape[1:]) for k, v in data.items()}


def _check_against_solve(params_flat, values, solve_reference):
    ref_params, ref_values = solve_reference
    scale = np.max(np.abs(ref_params))
    np.testing.assert_allclose(params_flat, ref_params, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(values, ref_values, rtol=1e-5)


def test_optax_face_in_classic_pmap_script(solve_reference):
    data, p0 = optax_problem()
    n_dev = OPTAX_N
    loss = logistic_loss
    # --- a classic pmap data-parallel script, with apts as the optimizer -------------------
    optimizer = apts("batch", **OPTAX_RADIUS)
    replicate = jax.pmap(lambda x: x, axis_name="batch")  # place on devices once (no recompiles)
    params = replicate(jax.tree.map(lambda a: jnp.broadcast_to(a, (n_dev,) + a.shape), p0))
    batches = replicate(_per_subdomain(data, n_dev))
    opt_state = jax.pmap(optimizer.init, axis_name="batch")(params)

    @functools.partial(jax.pmap, axis_name="batch")
    def train_step(params, opt_state, batch):
        value_fn = lambda p: loss(p, batch)  # noqa: E731
        value, grad = jax.value_and_grad(value_fn)(params)
        updates, opt_state = optimizer.update(grad, opt_state, params, value=value, grad=grad,
                                              value_fn=value_fn)
        return optax.apply_updates(params, updates), opt_state

    values, radii_before, step_norms = [], [], []
    for _ in range(OPTAX_STEPS):
        radii_before.append(float(opt_state.radius[0]))
        params, opt_state = train_step(params, opt_state, batches)
        values.append(float(opt_state.global_value[0]))
        step_norms.append(float(opt_state.info.step_norm[0]))
    # ---------------------------------------------------------------------------------------
    for leaf in jax.tree.leaves(params):  # identical on every device
        leaf = np.asarray(leaf)
        np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
    _check_against_solve(flat(jax.tree.map(lambda a: a[0], params)), values, solve_reference)
    assert int(opt_state.count[0]) == OPTAX_STEPS
    # The default's bound (adaptive local boundary, mean combination): ||s~||_D <= max_radius.
    assert np.all(np.array(step_norms) <= OPTAX_RADIUS["max_radius"] * (1 + 1e-5))
    assert np.all(np.array(radii_before) <= OPTAX_RADIUS["max_radius"] * (1 + 1e-6))


def test_optax_face_in_vmap(solve_reference):
    data, p0 = optax_problem()
    n = OPTAX_N
    optimizer = apts(AXIS, **OPTAX_RADIUS)
    params = jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), p0)
    state = jax.vmap(optimizer.init)(params)
    batches = _per_subdomain(data, n)

    @jax.jit
    def step(params, state, batches):
        def one(params, state, batch):
            value_fn = lambda p: logistic_loss(p, batch)  # noqa: E731
            value, grad = jax.value_and_grad(value_fn)(params)
            updates, state = optimizer.update(grad, state, params, value=value, grad=grad,
                                              value_fn=value_fn)
            return optax.apply_updates(params, updates), state
        return jax.vmap(one, axis_name=AXIS)(params, state, batches)

    values = []
    for _ in range(OPTAX_STEPS):
        params, state = step(params, state, batches)
        values.append(float(state.global_value[0]))
    _check_against_solve(flat(jax.tree.map(lambda a: a[0], params)), values, solve_reference)


def test_optax_face_fresh_data_matches_fresh_step():
    """SAPTS through the optax face (``fresh_data=True``, a new minibatch per update) follows
    ``make_apts(...).fresh_step`` on the same microbatches."""
    n_sub, features = 4, 20
    data = logistic_data(features, 512, seed=9)
    p0 = zeros_params(features)
    sampler = OverlapSampler(512, 128, n_sub, seed=1)
    micro = [{k: v[idx] for k, v in data.items()}
             for e in range(2) for idx in sampler.epoch(e).microbatches]  # (N, m, ...) each

    layout = parallel.subdomain_layout(n_sub, devices=n_sub)
    prog = parallel.make_apts(logistic_loss, p0, layout, model="first_order")
    sharding = jax.sharding.NamedSharding(layout.mesh, P(layout.axis_name))
    state = prog.init(p0, jax.device_put(micro[0], sharding))
    want = []
    for batch in micro:
        state, _ = prog.fresh_step(state, jax.device_put(batch, sharding))
        want.append(np.asarray(state.params))

    optimizer = apts(AXIS, model="first_order")
    params = jax.tree.map(lambda a: jnp.broadcast_to(a, (n_sub,) + a.shape), p0)
    opt_state = jax.vmap(optimizer.init)(params)

    @jax.jit
    def step(params, opt_state, batch):
        def one(params, opt_state, batch):
            value_fn = lambda p: logistic_loss(p, batch)  # noqa: E731
            value, grad = jax.value_and_grad(value_fn)(params)
            updates, opt_state = optimizer.update(grad, opt_state, params, value=value, grad=grad,
                                                  value_fn=value_fn, fresh_data=True)
            return optax.apply_updates(params, updates), opt_state
        return jax.vmap(one, axis_name=AXIS)(params, opt_state, batch)

    for k, batch in enumerate(micro):
        params, opt_state = step(params, opt_state, batch)
        got = flat(jax.tree.map(lambda a: a[0], params))
        np.testing.assert_allclose(got, want[k], rtol=0, atol=1e-5 * np.max(np.abs(want[k])))
    assert np.linalg.norm(want[-1]) > 0.1


def _map_local(fn, specs, state):
    return jax.tree.map(lambda s, a: fn(a) if s == P(AXIS) else a, specs, state,
                        is_leaf=lambda x: isinstance(x, P))


def _shard_map_step(optimizer, specs, mesh, check_vma, vary=True):
    def body(params, state, batch):
        state = _map_local(lambda a: a[0], specs, state)
        batch = jax.tree.map(lambda a: a[0], batch)
        value_fn = lambda p: logistic_loss(p, batch)  # noqa: E731
        # jax.grad of *replicated* params inside shard_map(check_vma=True) would return the sum
        # over devices: differentiate a varying copy.
        at = to_varying(params, AXIS) if vary else params
        value, grad = jax.value_and_grad(value_fn)(at)
        updates, state = optimizer.update(grad, state, params, value=value, grad=grad,
                                          value_fn=value_fn)
        state = _map_local(lambda a: a[None], specs, state)
        return optax.apply_updates(params, updates), state

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), specs, P(AXIS)),
                                 out_specs=(P(), specs), check_vma=check_vma))


@pytest.mark.parametrize("check_vma", [True, False])
def test_optax_face_in_shard_map(solve_reference, check_vma):
    data, p0 = optax_problem()
    n = OPTAX_N
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), (AXIS,))
    optimizer = apts(AXIS, **OPTAX_RADIUS)
    state0 = optimizer.init(p0)
    specs = apts_state_specs(state0, AXIS)
    state = _map_local(lambda a: jnp.broadcast_to(a, (n,) + a.shape), specs, state0)
    step = _shard_map_step(optimizer, specs, mesh, check_vma)
    batches = _per_subdomain(data, n)
    params, values = p0, []
    for _ in range(OPTAX_STEPS):
        params, state = step(params, state, batches)
        values.append(float(state.global_value))
    _check_against_solve(flat(params), values, solve_reference)
    assert state.value.shape == (n,) and state.info.num_fun_evals.shape == (n,)
    assert len(set(np.asarray(state.value).tolist())) > 1  # local values really are local


def test_shard_map_replicated_grad_is_rejected():
    data, p0 = optax_problem()
    n = OPTAX_N
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), (AXIS,))
    optimizer = apts(AXIS, **OPTAX_RADIUS)
    state0 = optimizer.init(p0)
    specs = apts_state_specs(state0, AXIS)
    state = _map_local(lambda a: jnp.broadcast_to(a, (n,) + a.shape), specs, state0)
    step = _shard_map_step(optimizer, specs, mesh, check_vma=True, vary=False)
    with pytest.raises(ValueError, match=r"replicated.*to_varying"):
        step(p0, state, _per_subdomain(data, n))


# ------------------------------------------------------------------------------------------------
# 9. Bad input to the optax face
# ------------------------------------------------------------------------------------------------


def _update_args(optimizer):
    p = zeros_params(3)
    state = optimizer.init(p)
    value_fn = lambda q: jnp.sum(q["w"] ** 2)  # noqa: E731
    return p, state, value_fn


def test_unbound_axis_name_outside_mapping():
    optimizer = apts("nope")
    p, state, value_fn = _update_args(optimizer)
    with pytest.raises(ValueError, match=r"axis name 'nope' is not bound"):
        optimizer.update(p, state, p, value=value_fn(p), grad=p, value_fn=value_fn)


def test_unbound_axis_name_inside_other_vmap():
    optimizer = apts("nope")
    p, state, value_fn = _update_args(optimizer)
    batched = jax.tree.map(lambda a: jnp.broadcast_to(a, (2,) + a.shape), p)
    batched_state = jax.tree.map(lambda a: jnp.broadcast_to(a, (2,) + a.shape), state)

    def one(q, st):
        return optimizer.update(q, st, q, value=value_fn(q), grad=q, value_fn=value_fn)

    with pytest.raises(ValueError, match=r"axis name 'nope' is not bound"):
        jax.vmap(one, axis_name="other")(batched, batched_state)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_local_steps_must_be_positive_int(bad):
    with pytest.raises(ValueError, match="local_steps"):
        apts(AXIS, local_steps=bad)


def test_non_float_params_rejected():
    optimizer = apts(AXIS)
    with pytest.raises(TypeError, match="floating"):
        optimizer.init({"w": jnp.zeros((3,), jnp.int32)})


def test_update_needs_value_fn():
    optimizer = apts(AXIS)
    p, state, value_fn = _update_args(optimizer)
    with pytest.raises(TypeError, match="value_fn"):
        optimizer.update(p, state, p, value=value_fn(p), grad=p)


# ------------------------------------------------------------------------------------------------
# 11. The ratio test (eq. 6-7) as a pure function, and rho for N > 1 against a hand computation
# ------------------------------------------------------------------------------------------------

_C = DEFAULT_RADIUS_CONFIG  # eta1 = 0.1, eta2 = 0.75, shrink 0.5, grow 2, [1e-8, 10]
_NAN, _INF = float("nan"), float("inf")
RATIO_CASES = [  # actual, predicted, trial_finite, radius -> rho, accepted, new radius
    (1.0, 2.0, True, 1.0, 0.5, True, 1.0),  # eta1 <= rho <= eta2: accept, keep
    (3.0, 4.0, True, 1.0, 0.75, True, 1.0),  # rho == eta2: keep (grow needs rho > eta2)
    (0.1, 1.0, True, 1.0, 0.1, True, 1.0),  # rho == eta1: accept, keep
    (1.0, 1.0, True, 1.0, 1.0, True, 2.0),  # rho > eta2: grow (no boundary test in eq. 7)
    (8.0, 1.0, True, 6.0, 8.0, True, 10.0),  # grow clipped at max_radius
    (-1.0, 1.0, True, 1.0, -1.0, False, 0.5),  # worse: reject, shrink
    (-1.0, 1.0, True, 1.5e-8, -1.0, False, 1e-8),  # shrink clipped at min_radius
    (1.0, 0.0, True, 1.0, -_INF, False, 0.5),  # predicted 0: guarded
    (1.0, -1.0, True, 1.0, -_INF, False, 0.5),  # predicted < 0: guarded
    (1.0, _NAN, True, 1.0, -_INF, False, 0.5),  # predicted NaN: guarded
    (_NAN, 1.0, True, 1.0, -_INF, False, 0.5),  # actual NaN: guarded
    (_INF, 1.0, True, 1.0, -_INF, False, 0.5),  # actual inf (trial -inf): guarded
    (1.0, 1.0, False, 1.0, -_INF, False, 0.5),  # non-finite trial gradient: guarded
]


def test_ratio_test_pure_function(precision):
    cols = list(zip(*RATIO_CASES, strict=True))
    actual, predicted, finite, radius = (np.asarray(c) for c in cols[:4])
    got = jax.jit(lambda a, p, f, r: ratio_test(a, p, f, r, _C))(
        actual.astype(precision), predicted.astype(precision), finite, radius.astype(precision))
    assert got.ratio.dtype == precision and got.radius.dtype == precision
    np.testing.assert_allclose(np.asarray(got.ratio), np.asarray(cols[4], float), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got.accepted), np.asarray(cols[5]))
    np.testing.assert_allclose(np.asarray(got.radius), np.asarray(cols[6], float), rtol=1e-6)


def test_ratio_for_several_subdomains_is_over_the_sum_of_local_decreases(x64):
    """N = 4 on 2 devices, nu = 1, first-order model: every local phase is one step of length
    Delta/N along -g (the first local gradient is the global one), so eq. 6 can be computed by
    hand: rho = (f(theta) - f(theta + sum_i s_i)) / sum_i (f_i(theta) - f_i(theta + s_i))."""
    n_sub, features = 4, 6
    data = logistic_data(features, 64, seed=5, dtype=np.float64)
    p0 = {"w": jnp.asarray(np.linspace(-0.5, 0.5, features)), "b": jnp.asarray(0.2)}
    layout = parallel.subdomain_layout(n_sub, devices=2)
    prog = parallel.make_apts(logistic_loss, p0, layout, model="first_order", local_steps=1,
                              initial_radius=0.4, preset="paper")
    sharded = parallel.split_data(layout, data)
    state = prog.init(p0, sharded)
    _, stats = prog.step(state, sharded)

    shards = [{k: v[i * 16:(i + 1) * 16] for k, v in data.items()} for i in range(n_sub)]
    loss = jax.jit(lambda w, b, sh: logistic_loss({"w": w, "b": b}, sh))
    grad = jax.jit(jax.grad(lambda w, b, sh: logistic_loss({"w": w, "b": b}, sh), argnums=(0, 1)))

    def f_and_g(w, b, sh):
        gw, gb = grad(w, b, sh)
        return float(loss(w, b, sh)), np.concatenate([np.asarray(gw), [float(gb)]])

    w0, b0 = np.asarray(p0["w"]), float(p0["b"])
    local = [f_and_g(w0, b0, sh) for sh in shards]
    g = np.mean([gi for _, gi in local], axis=0)
    cap = 0.4 / n_sub
    s = -cap * g / np.linalg.norm(g)
    steps, decreases = [], []
    for (fi, gi), sh in zip(local, shards, strict=True):
        r = g - gi
        fi_trial = float(loss(w0 + s[:-1], b0 + s[-1], sh)) + r @ s
        accepted = (fi - fi_trial) / (cap * np.linalg.norm(g)) >= _C.eta1
        steps.append(s if accepted else 0 * s)
        decreases.append(fi - fi_trial if accepted else 0.0)
    total = np.sum(steps, axis=0)
    f0 = np.mean([fi for fi, _ in local])
    f1 = np.mean([float(loss(w0 + total[:-1], b0 + total[-1], sh)) for sh in shards])
    predicted = np.sum(decreases)
    assert predicted > 0 and abs(predicted - np.mean(decreases)) > 0.5 * predicted
    np.testing.assert_allclose(float(stats.predicted_decrease), predicted, rtol=1e-10)
    np.testing.assert_allclose(float(stats.actual_decrease), f0 - f1, rtol=1e-10)
    np.testing.assert_allclose(float(stats.ratio), (f0 - f1) / predicted, rtol=1e-10)


def test_outer_step_takes_and_returns_named_state(x64):
    """``outer_step`` on one instance (no mapped axis) with an :class:`OuterState`."""
    from apts_jax.apts_transform import OuterInfo, OuterState

    data = logistic_data(4, 32, seed=2, dtype=np.float64)
    x0 = jnp.zeros(5)

    def vg(x, shard):
        return jax.value_and_grad(lambda z: logistic_loss({"w": z[1:], "b": z[0]}, shard))(x)

    v, g = vg(x0, data)
    st = OuterState(params=x0, value=v, grad=g, local_value=v[None], local_grad=g[None],
                    radius=jnp.asarray(0.1), local_memory=None, global_memory=None)
    new, info = jax.jit(lambda s: outer_step(vg, jax.tree.map(lambda a: a[None], data), s,
                                             axis_name=None, num_subdomains=1,
                                             model="first_order", options=PAPER))(st)
    assert isinstance(new, OuterState) and isinstance(info, OuterInfo)
    assert bool(info.accepted) and float(new.value) < float(v)
    np.testing.assert_allclose(float(new.value), float(vg(new.params, data)[0]), rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# 12. The optax face as users write it: top-level factory, current data, the stacked layout
# ------------------------------------------------------------------------------------------------


def test_factories_are_callable_at_the_top_level():
    assert isinstance(apts_jax.apts(AXIS), optax.GradientTransformationExtraArgs)
    assert isinstance(apts_jax.trust_region(), optax.GradientTransformationExtraArgs)
    assert apts_jax.apts is apts and apts_jax.apts_transform.apts is apts
    from apts_jax.apts import outer_step as old_name  # the old module name still imports
    from apts_jax.trust_region import iteration as old_iteration

    assert old_name is outer_step and old_iteration is iteration


def _sapts_problem():
    n_sub, features = 4, 20
    data = logistic_data(features, 512, seed=9)
    sampler = OverlapSampler(512, 128, n_sub, seed=1)
    micro = [{k: v[idx] for k, v in data.items()}
             for e in range(2) for idx in sampler.epoch(e).microbatches]  # (N, m, ...) each
    return n_sub, zeros_params(features), micro


def _vmap_apts_run(optimizer, n_sub, p0, batches, **update_kw):
    params = jax.tree.map(lambda a: jnp.broadcast_to(a, (n_sub,) + a.shape), p0)
    opt_state = jax.vmap(optimizer.init)(params)

    @jax.jit
    def step(params, opt_state, batch):
        def one(params, opt_state, batch):
            value_fn = lambda p: logistic_loss(p, batch)  # noqa: E731
            value, grad = jax.value_and_grad(value_fn)(params)
            updates, opt_state = optimizer.update(grad, opt_state, params, value=value, grad=grad,
                                                  value_fn=value_fn, **update_kw)
            return optax.apply_updates(params, updates), opt_state
        return jax.vmap(one, axis_name=AXIS)(params, opt_state, batch)

    out = []
    for batch in batches:
        params, opt_state = step(params, opt_state, batch)
        out.append((flat(jax.tree.map(lambda a: a[0], params)), float(opt_state.info.ratio[0]),
                    float(opt_state.global_value[0])))
    return out


@pytest.mark.parametrize("fresh_data", [None, True])
def test_default_update_uses_the_current_minibatch(fresh_data):
    """Two (and more) minibatches: rho and r_i of every update come from the batch passed to it
    (as ``make_apts(...).fresh_step``), by default (``fresh_data`` not given) too."""
    n_sub, p0, micro = _sapts_problem()
    layout = parallel.subdomain_layout(n_sub, devices=n_sub)
    prog = parallel.make_apts(logistic_loss, p0, layout, model="first_order")
    sharding = jax.sharding.NamedSharding(layout.mesh, P(layout.axis_name))
    state = prog.init(p0, jax.device_put(micro[0], sharding))
    want = []
    for batch in micro:
        state, stats = prog.fresh_step(state, jax.device_put(batch, sharding))
        want.append((np.asarray(state.params), float(stats.ratio)))

    kw = {} if fresh_data is None else {"fresh_data": True}
    got = _vmap_apts_run(apts(AXIS, model="first_order"), n_sub, p0, micro, **kw)
    for (gp, gr, _), (wp, wr) in zip(got, want, strict=True):
        np.testing.assert_allclose(gp, wp, rtol=0, atol=1e-5 * np.max(np.abs(wp)))
        np.testing.assert_allclose(gr, wr, rtol=1e-4)
    assert np.linalg.norm(want[-1][0]) > 0.1


@pytest.mark.slow  # heavy compiles; run with pytest -m slow
def test_reuse_value_and_grad_is_explicit_and_exact_for_full_batch(solve_reference):
    """Full batch: ``reuse_value_and_grad=True`` (three all-reduces per update) and the default
    (re-reduce what is passed) both follow ``parallel.solve``; with minibatches only the default
    uses the current batch (the ratio of the second update differs)."""
    data, p0 = optax_problem()
    batches = [_per_subdomain(data, OPTAX_N)] * OPTAX_STEPS
    for reuse in (True, False):
        run = _vmap_apts_run(apts(AXIS, reuse_value_and_grad=reuse, **OPTAX_RADIUS), OPTAX_N, p0,
                             batches)
        _check_against_solve(run[-1][0], [v for *_, v in run], solve_reference)
    n_sub, p0, micro = _sapts_problem()
    fresh = _vmap_apts_run(apts(AXIS, model="first_order"), n_sub, p0, micro[:2])
    stale = _vmap_apts_run(apts(AXIS, model="first_order", reuse_value_and_grad=True), n_sub, p0,
                           micro[:2])
    assert fresh[0][1] == stale[0][1] and abs(fresh[1][1] - stale[1][1]) > 1e-3


@pytest.mark.slow  # heavy compiles; run with pytest -m slow
def test_recorded_optax_face_trajectory_float64(x64):
    """The optax face (vmap, N = 4, nu = 3, full batch) reproduces the trajectory recorded before
    issue 9's refactoring (see tests/test_parallel.py::RECORDED)."""
    data = logistic_data(6, 64, seed=3, dtype=np.float64)
    p0 = zeros_params(6, jnp.float64)
    batches = [_per_subdomain(data, 4)] * 6
    want = [0.5881392743843715, 0.37713996514236114, 0.23242640350661425, 0.21249782503599626,
            0.16696291461664303, 0.14307444828506055]
    for reuse in (True, False):
        run = _vmap_apts_run(apts(AXIS, local_steps=3, reuse_value_and_grad=reuse,
                                  preset="paper"), 4, p0, batches)
        np.testing.assert_allclose([v for *_, v in run], want, rtol=1e-9)
    np.testing.assert_allclose(
        run[-1][0], [0.09537894588638073, 3.5219831781392834, 1.5943622589740158,
                     3.3836452568845563, 2.5745028240075443, -0.054241572027661694,
                     -5.425719255124568], rtol=1e-8)


def _stacked_shard_map_step(optimizer, mesh, check_vma, reuse_first_value=True):
    """The user's way: the whole state stacked along the subdomain axis (``P(axis)`` for every
    leaf), squeezed inside with ``a[0]`` and restored with ``a[None]``."""
    def step(params, state, x, y):
        state = jax.tree.map(lambda a: a[0], state)
        batch = {"x": x[0], "y": y[0]}
        value_fn = lambda p: logistic_loss(p, batch)  # noqa: E731
        value, grad = jax.value_and_grad(value_fn)(to_varying(params, AXIS))
        updates, state = optimizer.update(grad, state, params, value=value, grad=grad,
                                          value_fn=value_fn)
        return optax.apply_updates(params, updates), jax.tree.map(lambda a: a[None], state)

    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)),
                                 out_specs=(P(), P(AXIS)), check_vma=check_vma))


# CI runs check_vma=True with reuse (the user-way check_vma True/False is
# test_optax_face_in_shard_map); the other three are slow (CI time, issue 9).
@pytest.mark.parametrize(("check_vma", "reuse"), [
    (True, True),
    pytest.param(False, False, marks=pytest.mark.slow),
    pytest.param(True, False, marks=pytest.mark.slow),
    pytest.param(False, True, marks=pytest.mark.slow),
])
def test_optax_face_in_shard_map_with_stacked_state(solve_reference, check_vma, reuse):
    data, p0 = optax_problem()
    n = OPTAX_N
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), (AXIS,))
    optimizer = apts(AXIS, reuse_value_and_grad=reuse, **OPTAX_RADIUS)
    state = jax.vmap(optimizer.init)(jax.tree.map(lambda a: jnp.stack([a] * n), p0))
    step = _stacked_shard_map_step(optimizer, mesh, check_vma)
    batches = _per_subdomain(data, n)
    params, values = p0, []
    for _ in range(OPTAX_STEPS):
        params, state = step(params, state, batches["x"], batches["y"])
        values.append(float(state.global_value[0]))
    _check_against_solve(flat(params), values, solve_reference)


def test_state_with_block_axis_gets_a_clear_error():
    data, p0 = optax_problem()
    n = OPTAX_N
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), (AXIS,))
    optimizer = apts(AXIS, **OPTAX_RADIUS)
    state = jax.vmap(optimizer.init)(jax.tree.map(lambda a: jnp.stack([a] * n), p0))

    def step(params, state, x, y):  # forgets to squeeze the state's block axis
        batch = {"x": x[0], "y": y[0]}
        value_fn = lambda p: logistic_loss(p, batch)  # noqa: E731
        value, grad = jax.value_and_grad(value_fn)(to_varying(params, AXIS))
        return optimizer.update(grad, state, params, value=value, grad=grad, value_fn=value_fn)

    batches = _per_subdomain(data, n)
    fn = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS), P(AXIS)),
                       out_specs=(P(), P(AXIS)))
    with pytest.raises(ValueError, match=r"subdomain axis.*jax.tree.map\(lambda a: a\[0\]"):
        fn(p0, state, batches["x"], batches["y"])


def test_extra_keyword_arguments_not_taken_by_value_fn_raise():
    optimizer = apts(AXIS)
    p, state, _ = _update_args(optimizer)
    batched = jax.tree.map(lambda a: jnp.broadcast_to(a, (2,) + a.shape), (p, state))

    def one(q, st, **kw):
        value_fn = lambda q, scale: scale * jnp.sum(q["w"] ** 2)  # noqa: E731
        v, g = jax.value_and_grad(value_fn)(q, 2.0)
        return optimizer.update(q, st, q, value=v, grad=g, value_fn=value_fn, **kw)

    # Traced only (eval_shape): the check runs at trace time; executing the update eagerly
    # op by op would only cost time.
    jax.eval_shape(jax.vmap(lambda q, st: one(q, st, scale=2.0), axis_name=AXIS), *batched)
    with pytest.raises(TypeError, match=r"\['unused'\] are not accepted by value_fn"):
        jax.eval_shape(jax.vmap(lambda q, st: one(q, st, scale=2.0, unused=1), axis_name=AXIS),
                       *batched)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "x"])
def test_skip_tol_is_validated(bad):
    with pytest.raises((ValueError, TypeError), match="skip_tol"):
        apts(AXIS, skip_tol=bad)
    layout = parallel.subdomain_layout(2, devices=2)
    with pytest.raises((ValueError, TypeError), match="skip_tol"):
        parallel.make_apts(logistic_loss, zeros_params(3), layout, skip_tol=bad)
