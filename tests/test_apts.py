"""Tests of the APTS core (:mod:`apts_jax.apts`): Algorithm 1 step by step, and its optax face.

* ``N = 1``: one outer iteration is the local TR loop on ``f`` (at most ``nu`` iterations of
  :func:`apts_jax.trust_region.iteration`, stopped at the boundary), the APTS ratio test (eq. 6-7)
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

from apts_jax import lsr1, parallel
from apts_jax.apts import APTSInfo, APTSState, apts, local_phase, to_varying
from apts_jax.data import OverlapSampler
from apts_jax.radius import DEFAULT_RADIUS_CONFIG
from apts_jax.tr_model import compute_step
from apts_jax.trust_region import iteration

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
    prog = parallel.make_apts(logistic_loss, p0, layout, local_steps=nu, model=model)
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


@pytest.mark.parametrize("model", MODELS)
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
    prog = parallel.make_apts(penalised_loss, p0, layout, local_steps=5, model="sr1")

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
    assert np.all(np.array(step_norms) <= np.array(radii_before) * (1 + 1e-5))


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


#: Fields of :class:`APTSState` that differ between subdomains (the rest is replicated).
LOCAL_STATE_FIELDS = ("value", "grad", "local_memory")
LOCAL_INFO_FIELDS = ("local_iterations", "num_fun_evals")


def optax_state_specs(state: APTSState, axis: str) -> APTSState:
    """``PartitionSpec``s of the optax-face state under ``jax.shard_map`` (one subdomain per
    device along ``axis``).

    Per-subdomain (``P(axis)``, stored *outside* with a leading axis of size ``N``, one row per
    device): ``value`` and ``grad`` (this subdomain's loss and gradient at the current params),
    ``local_memory`` (its L-SR1 memory), ``info.local_iterations`` and ``info.num_fun_evals``.
    Everything else is replicated (``P()``): ``count``, ``global_value``, ``global_grad``,
    ``radius``, ``global_memory`` and the rest of ``info``. Inside the mapped function the
    per-subdomain leaves are squeezed (``a[0]``) before ``update`` and expanded (``a[None]``)
    after it: :func:`apts` keeps one subdomain per instance without a block axis.
    """
    def spec(field, sub, local_fields):
        return jax.tree.map(lambda _: P(axis) if field in local_fields else P(), sub)

    fields = {f: spec(f, getattr(state, f), LOCAL_STATE_FIELDS)
              for f in APTSState._fields if f != "info"}
    info = APTSInfo(**{f: spec(f, getattr(state.info, f), LOCAL_INFO_FIELDS)
                       for f in APTSInfo._fields})
    return APTSState(**fields, info=info)


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
    specs = optax_state_specs(state0, AXIS)
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
    specs = optax_state_specs(state0, AXIS)
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
