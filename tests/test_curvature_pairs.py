"""Tests of ``curvature_pairs`` (issue 11, option 4): multi-batch secant pairs for the global memory.

``curvature_pairs="multi_batch"`` (Berahas, Nocedal & Takáč 2016) gives the global L-SR1 memory
one pair per outer iteration, :math:`s_k = \\theta_{k+1} - \\theta_k` and :math:`y_k =
\\nabla f_O(\\theta_{k+1}) - \\nabla f_O(\\theta_k)` on the pair data :math:`O` (the samples that
consecutive minibatches share), or on the iteration's own data when none is given.

* validation: the option needs the L-SR1 model and the global step; pair data without the option
  are rejected, before any work;
* the stored pair against a numpy reference (closed-form logistic gradients), full batch (no pair
  data) in float32 and float64, and SAPTS with pair data for both norms; ``"same_batch"`` stores
  step 5's pair instead;
* :meth:`apts_jax.data.OverlapSampler.overlap_batches` are the samples consecutive minibatches
  share;
* layout independence (``N = 4`` on 1, 2, 4 devices, ``check_vma`` on and off);
* the optax face (``pair_fn``) inside ``jax.shard_map`` agrees with ``make_apts``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from logistic_problem import logistic_data, logistic_loss, zeros_params

from apts_jax import parallel
from apts_jax.apts_transform import (
    PAPER,
    OuterState,
    apts,
    apts_state_specs,
    outer_step,
    resolve_options,
    to_varying,
)
from apts_jax.data import OverlapSampler

AXIS = "subdomains"
MB = {"preset": "paper", "curvature_pairs": "multi_batch"}


def np_grad(x, shard):
    """Gradient of the mean logistic loss at flat ``x = [b, w]`` (float64)."""
    xs, ys = np.asarray(shard["x"], np.float64), np.asarray(shard["y"], np.float64)
    z = xs @ x[1:] + x[0]
    dz = (1.0 / (1.0 + np.exp(-z)) - ys) / z.shape[0]
    return np.concatenate([[np.sum(dz)], xs.T @ dz])


def newest_pair(memory):
    mask = np.asarray(memory.mask)
    assert mask[-1], "the newest column holds no pair"
    return np.asarray(memory.s)[:, -1].astype(np.float64), np.asarray(memory.y)[:, -1].astype(
        np.float64)


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def test_multi_batch_needs_the_global_sr1_memory():
    with pytest.raises(ValueError, match="model='first_order' keeps none; pass model='sr1'"):
        resolve_options(curvature_pairs="multi_batch")  # the default's model is first-order
    with pytest.raises(ValueError, match="global_step='none' skips it; pass global_step='tr'"):
        resolve_options("paper", curvature_pairs="multi_batch", global_step="none")
    assert resolve_options(model="sr1", curvature_pairs="multi_batch").curvature_pairs == (
        "multi_batch")
    with pytest.raises(ValueError, match="unknown curvature_pairs 'overlap'"):
        resolve_options("paper", curvature_pairs="overlap")
    with pytest.raises(ValueError, match="pass model='sr1'"):
        apts(AXIS, curvature_pairs="multi_batch")
    layout = parallel.subdomain_layout(2, devices=1)
    with pytest.raises(ValueError, match="pass model='sr1'"):
        parallel.make_apts(logistic_loss, zeros_params(3), layout, curvature_pairs="multi_batch")


def test_pair_data_without_the_option_are_rejected(x64):
    data = logistic_data(3, 16, seed=0, dtype=np.float64)
    p0 = zeros_params(3, jnp.float64)
    layout = parallel.subdomain_layout(2, devices=1)
    prog = parallel.make_apts(logistic_loss, p0, layout, preset="paper")
    sharded = parallel.split_data(layout, data)
    state = prog.init(p0, sharded)
    before = np.asarray(state.params).copy()
    with pytest.raises(ValueError, match="used only with curvature_pairs='multi_batch'"):
        prog.fresh_step(state, sharded, sharded)
    np.testing.assert_array_equal(np.asarray(state.params), before)  # not donated, unchanged

    x = jnp.zeros(4, jnp.float64)
    outer = OuterState(x, jnp.zeros(()), x, jnp.zeros((1,)), x[None], jnp.ones(()), None, None)
    with pytest.raises(ValueError, match="pair_grad is used only with"):
        outer_step(lambda z, _: (jnp.sum(z), z), None, outer, axis_name=None, num_subdomains=1,
                   model="first_order", options=PAPER._replace(model="first_order"),
                   pair_grad=lambda z: z[None])

    opt = apts(AXIS, preset="paper")
    params = jax.tree.map(lambda a: jnp.broadcast_to(a, (2,) + a.shape), p0)
    opt_state = jax.vmap(opt.init)(params)

    def one(p, s):
        fn = lambda q: logistic_loss(q, data)  # noqa: E731
        return opt.update(p, s, p, value=None, grad=None, value_fn=fn, pair_fn=fn)

    with pytest.raises(ValueError, match="pair_fn is used only with"):
        jax.vmap(one, axis_name=AXIS)(params, opt_state)


# ------------------------------------------------------------------------------------------------
# The stored pair against numpy
# ------------------------------------------------------------------------------------------------


def test_full_batch_pair_spans_the_outer_step(precision):
    """Without pair data the pair's gradients are on the iteration's (fixed) data."""
    dtype = precision
    data = logistic_data(8, 128, seed=1, dtype=dtype)
    p0 = zeros_params(8, dtype)
    layout = parallel.subdomain_layout(2, devices=1)
    sharded = parallel.split_data(layout, data)
    tol = 1e-10 if dtype == np.float64 else 2e-5
    for pairs in ("multi_batch", "same_batch"):
        prog = parallel.make_apts(logistic_loss, p0, layout, preset="paper",
                                  curvature_pairs=pairs, initial_radius=0.5)
        state = prog.init(p0, sharded)
        theta0 = np.asarray(state.params, np.float64)
        for _ in range(2):
            prev = np.asarray(state.params, np.float64)
            state, stats = prog.step(state, sharded)
        theta = np.asarray(state.params, np.float64)
        assert np.linalg.norm(theta - prev) > 0.1 * np.linalg.norm(theta - theta0)  # it moved
        s, y = newest_pair(state.global_memory)
        want_s = theta - prev
        want_y = np_grad(theta, data) - np_grad(prev, data)
        if pairs == "multi_batch":
            np.testing.assert_allclose(s, want_s, rtol=0, atol=tol * np.max(np.abs(want_s)))
            np.testing.assert_allclose(y, want_y, rtol=0, atol=tol * 10 * np.max(np.abs(want_y)))
            assert int(np.sum(np.asarray(state.global_memory.mask))) == 2  # one pair per iteration
        else:  # step 5's pair: a different (shorter) step
            assert not np.allclose(s, want_s, rtol=0.1)


@pytest.mark.parametrize("norm", ["l2", "adaptive"])
def test_sapts_pair_is_on_the_shared_samples(x64, norm):
    data = logistic_data(6, 96, seed=2, dtype=np.float64)
    p0 = zeros_params(6, jnp.float64)
    layout = parallel.subdomain_layout(2, devices=2)
    prog = parallel.make_apts(logistic_loss, p0, layout, norm=norm, initial_radius=0.5, **MB)
    batch = {k: v[:64] for k, v in data.items()}
    shared = {k: v[48:64] for k, v in data.items()}  # the last quarter of the batch, 8 per share
    state = prog.init(p0, parallel.split_data(layout, batch))
    prev = np.asarray(state.params, np.float64)
    state, _ = prog.fresh_step(state, parallel.split_data(layout, batch),
                               parallel.split_data(layout, shared))
    theta = np.asarray(state.params, np.float64)
    assert np.linalg.norm(theta - prev) > 0
    s, y = newest_pair(state.global_memory)
    np.testing.assert_allclose(s, theta - prev, rtol=0, atol=1e-12)
    want_y = np_grad(theta, shared) - np_grad(prev, shared)
    np.testing.assert_allclose(y, want_y, rtol=0, atol=1e-10 * np.max(np.abs(want_y)))
    # ... and not the gradient difference on the whole batch
    assert not np.allclose(y, np_grad(theta, batch) - np_grad(prev, batch), rtol=1e-3)


def test_overlap_batches_are_shared_by_consecutive_minibatches():
    sampler = OverlapSampler(1000, 200, 4, overlap=0.1, subdomain_overlap=0.05, seed=3)
    o, q = sampler.overlap_size, sampler.pair_share
    assert q == o // 4 and q > 0
    eb = sampler.epoch(2)
    pairs = sampler.overlap_batches(2)
    assert pairs.shape == (sampler.batches_per_epoch, 4, q)
    for k in range(sampler.batches_per_epoch - 1):
        shared = set(eb.minibatches[k]) & set(eb.minibatches[k + 1])
        assert len(shared) == o
        assert set(pairs[k].ravel()) <= shared and len(set(pairs[k].ravel())) == 4 * q
    with pytest.raises(ValueError, match="fewer than the 4 subdomains.*raise overlap"):
        OverlapSampler(1000, 40, 4, overlap=0.05).overlap_batches(0)


# ------------------------------------------------------------------------------------------------
# Layout independence and the optax face
# ------------------------------------------------------------------------------------------------


def _sapts_batches(data, sampler, epochs=1):
    out = []
    for e in range(epochs):
        micro, shared = sampler.epoch(e).microbatches, sampler.overlap_batches(e)
        for m, o in zip(micro, shared, strict=True):
            out.append(({k: v[m.reshape(-1)] for k, v in data.items()},
                        {k: v[o.reshape(-1)] for k, v in data.items()}))
    return out


def _sapts_run(devices, check_vma, pairs="multi_batch", steps=6):
    data = logistic_data(10, 512, seed=4, dtype=np.float64)
    p0 = zeros_params(10, jnp.float64)
    sampler = OverlapSampler(512, 128, 4, overlap=0.25, seed=0)
    layout = parallel.subdomain_layout(4, devices=devices)
    prog = parallel.make_apts(logistic_loss, p0, layout, preset="paper", curvature_pairs=pairs,
                              initial_radius=0.05, max_radius=1.0, check_vma=check_vma)
    batches = _sapts_batches(data, sampler)[:steps]
    state = prog.init(p0, parallel.split_data(layout, batches[0][0]))
    params, accepted = [], []
    for batch, shared in batches:
        args = (parallel.split_data(layout, batch),)
        if pairs == "multi_batch":
            args += (parallel.split_data(layout, shared),)
        state, stats = prog.fresh_step(state, *args)
        params.append(np.asarray(state.params))
        accepted.append((bool(stats.accepted), bool(stats.global_accepted)))
    return np.array(params), accepted, np.asarray(state.global_memory.mask)


@pytest.mark.slow  # several compiles; run with pytest -m slow
def test_layout_independence_with_multi_batch_pairs(x64):
    want, acc, mask = _sapts_run(1, True)
    assert mask.sum() >= 3  # pairs were stored
    for devices, check_vma in ((2, True), (4, True), (2, False)):
        got, got_acc, got_mask = _sapts_run(devices, check_vma)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.max(np.abs(want)))
        assert got_acc == acc
        np.testing.assert_array_equal(got_mask, mask)
    same, _, _ = _sapts_run(1, True, pairs="same_batch")
    assert not np.allclose(same[-1], want[-1], rtol=1e-6)  # the option changed the trajectory


@pytest.mark.parametrize("check_vma", [True, False])
def test_optax_face_pair_fn_in_shard_map_agrees_with_make_apts(x64, check_vma):
    n = 2
    data = logistic_data(5, 256, seed=5, dtype=np.float64)
    p0 = zeros_params(5, jnp.float64)
    sampler = OverlapSampler(256, 64, n, overlap=0.25, seed=1)
    batches = _sapts_batches(data, sampler)[:4]
    opts = dict(local_steps=3, initial_radius=0.2, max_radius=2.0, **MB)

    layout = parallel.subdomain_layout(n, devices=n)
    prog = parallel.make_apts(logistic_loss, p0, layout, **opts)
    state = prog.init(p0, parallel.split_data(layout, batches[0][0]))
    want = []
    for batch, shared in batches:
        state, _ = prog.fresh_step(state, parallel.split_data(layout, batch),
                                   parallel.split_data(layout, shared))
        want.append(np.asarray(state.params))

    optimizer = apts(AXIS, **opts)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), (AXIS,))
    state0 = optimizer.init(p0)
    specs = apts_state_specs(state0, AXIS)

    def local(fn, st):
        return jax.tree.map(lambda s, a: fn(a) if s == P(AXIS) else a, specs, st,
                            is_leaf=lambda x: isinstance(x, P))

    def body(params, st, batch, shared):
        st = local(lambda a: a[0], st)
        value_fn = lambda p, scale: scale * logistic_loss(p, batch)  # noqa: E731
        pair_fn = lambda p: logistic_loss(p, shared)  # noqa: E731  (no extra args: dropped)
        value, grad = jax.value_and_grad(value_fn)(to_varying(params, AXIS), 1.0)
        updates, st = optimizer.update(grad, st, params, value=value, grad=grad,
                                       value_fn=value_fn, pair_fn=pair_fn, scale=1.0)
        return optax.apply_updates(params, updates), local(lambda a: a[None], st)

    step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), specs, P(AXIS), P(AXIS)),
                                 out_specs=(P(), specs), check_vma=check_vma))
    st = local(lambda a: jnp.broadcast_to(a, (n,) + a.shape), state0)
    params = p0
    for k, (batch, shared) in enumerate(batches):
        split = lambda d: {key: v.reshape((n, -1) + v.shape[1:]) for key, v in d.items()}  # noqa: E731
        params, st = step(params, st, split(batch), split(shared))
        got = np.concatenate([np.ravel(params["b"]), np.asarray(params["w"])])
        np.testing.assert_allclose(got, want[k], rtol=0, atol=1e-10 * np.max(np.abs(want[k])))
    assert np.asarray(st.global_memory.mask).sum() >= 2
