"""Flax integration: the trust region through ``nnx.Optimizer`` and a Linen ``TrainState``, and APTS
in a ``jax.shard_map``-ed NNX train step over 4 simulated CPU devices.

The examples ``examples/flax_nnx_trust_region.py`` and ``examples/flax_linen_trust_region.py`` are
imported and their training functions run at tiny sizes:

* ``nnx.Optimizer(model, trust_region(...), wrt=nnx.Param)`` forwards ``value``, ``grad``,
  ``value_fn`` (and further keyword arguments) to the transformation; ``value_fn`` receives the
  optimizer's *pure* ``nnx.State`` of the parameters and rebuilds the model with ``nnx.merge``.
  Minibatch and full-batch (state-reusing) training decrease the loss clearly, and the NNX path
  reproduces the plain optax loop on ``apts_jax.models.functional`` parameters;
* APTS (``apts_jax.apts.apts``) inside ``jax.shard_map`` on per-device data: the global loss
  decreases, the parameters stay identical on all devices, and the state's global loss is the
  full-data loss of the trained model;
* Linen: ``tx.update(grads, opt_state, params, value=, grad=, value_fn=)`` and
  ``optax.apply_updates`` in place of ``TrainState.apply_gradients``.

Sizes are tiny (a 20-16-4 MLP, 128 samples) to keep compilation the main cost.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import apts_jax
from apts_jax.models import MLP, cross_entropy_loss, functional

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


nnx_example = load_example("flax_nnx_trust_region")
linen_example = load_example("flax_linen_trust_region")

SIZES = (20, 16, 4)


@pytest.fixture(scope="module")
def data():
    x, y = nnx_example.make_data(num_samples=128, num_features=SIZES[0], num_classes=SIZES[-1],
                                 seed=0)
    return jnp.asarray(x), jnp.asarray(y)


def full_loss(model, x, y):
    return float(nnx_example.loss_of(model, x, y))


# ------------------------------------------------------------------------------------------------
# nnx.Optimizer + trust_region
# ------------------------------------------------------------------------------------------------


def test_nnx_optimizer_minibatch_training(data):
    x, y = data
    model = MLP(SIZES, rngs=nnx.Rngs(0))
    out = nnx_example.train_trust_region(model, x, y, steps=15, batch_size=32, seed=0)
    assert out["final_loss"] < 0.5 * out["initial_loss"]
    assert out["final_loss"] == pytest.approx(full_loss(model, x, y), rel=1e-6)  # trained in place
    assert 0 < out["num_accepted"] <= 15
    assert out["evaluations"] == 2 * 15  # caller's value_and_grad + the optimizer's trial


def test_nnx_optimizer_full_batch_reuses_the_state(data):
    x, y = data
    model = MLP(SIZES, rngs=nnx.Rngs(0))
    steps = 15
    out = nnx_example.train_trust_region(model, x, y, steps=steps, batch_size=None)
    assert out["final_loss"] < 0.2 * out["initial_loss"]
    # One value_and_grad per update (the trial), plus the first evaluation by the caller.
    assert out["evaluations"] == steps + 1
    # Full batch: the recorded losses are the accepted values, so they never increase.
    assert np.all(np.diff(out["losses"]) <= 1e-7)
    assert out["losses"][0] == pytest.approx(out["initial_loss"], rel=1e-6)


def test_nnx_optimizer_matches_the_plain_optax_loop(data):
    """Same math through nnx.Optimizer (extra kwargs forwarded to value_fn) and plain optax."""
    x, y = data
    steps, kind = 6, "first_order"  # first_order: a short compile; sr1 runs in the tests above
    seen = []

    model = MLP(SIZES, rngs=nnx.Rngs(1))
    apply_fn, params0 = functional(model)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def value_fn(params, x, y):  # x, y come from optimizer.update(..., x=x, y=y)
        seen.append(type(params))
        return nnx_example.loss_of(nnx.merge(graphdef, params, rest), x, y)

    optimizer = nnx.Optimizer(model, apts_jax.trust_region(kind), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(nnx_example.loss_of)(model, x, y)
        optimizer.update(model, grads, value=loss, grad=grads, value_fn=value_fn, x=x, y=y)
        return loss

    tx = apts_jax.trust_region(kind)
    loss = cross_entropy_loss(apply_fn)

    @jax.jit
    def optax_step(params, state):
        value, grad = jax.value_and_grad(loss)(params, (x, y))
        updates, state = tx.update(grad, state, params, value=value, grad=grad,
                                   value_fn=lambda p: loss(p, (x, y)))
        return optax.apply_updates(params, updates), state

    params, state = params0, tx.init(params0)
    for _ in range(steps):
        nnx_step(model, optimizer, x, y)
        params, state = optax_step(params, state)

    # value_fn saw the optimizer's params: an nnx.State (pure arrays, Param structure).
    assert seen and all(t is nnx.State for t in seen)
    nnx_params = nnx.as_pure(nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(nnx_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    info = nnx.as_pure(optimizer.opt_state).info
    assert int(info.num_accepted) == int(state.info.num_accepted) > 0
    assert int(optimizer.step[...]) == steps
    assert full_loss(model, x, y) < float(loss(params0, (x, y)))


def test_nnx_optimizer_without_value_fn_explains(data):
    x, y = data
    model = MLP(SIZES, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, apts_jax.trust_region("first_order"), wrt=nnx.Param)
    loss, grads = nnx.value_and_grad(nnx_example.loss_of)(model, x, y)
    with pytest.raises(TypeError, match="value_fn"):
        optimizer.update(model, grads)
    with pytest.raises(TypeError, match=r"\['z'\].*not accepted by value_fn"):
        optimizer.update(model, grads, value=loss, grad=grads,
                         value_fn=lambda p: nnx_example.loss_of(model, x, y), z=1.0)


# ------------------------------------------------------------------------------------------------
# APTS in a shard_map-ed NNX train step
# ------------------------------------------------------------------------------------------------


def test_apts_in_shard_map_nnx_train_step(data):
    x, y = data
    model = MLP(SIZES, rngs=nnx.Rngs(0))
    before = nnx.as_pure(nnx.state(model, nnx.Param))
    out = nnx_example.train_apts(model, x, y, steps=6, devices=4, local_steps=2)
    losses = out["losses"]
    assert len(losses) == 6 and np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * out["initial_loss"]
    assert np.all(np.diff(losses) <= 1e-6)  # APTS never accepts an increase of the global loss
    assert out["replica_spread"] == 0.0  # every device holds the same parameters
    assert out["num_accepted"] > 0
    # Written back into the module; the state's global loss is the full-data loss there.
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before),
                                                     jax.tree.leaves(after), strict=True))
    assert full_loss(model, x, y) == pytest.approx(losses[-1], rel=1e-5)


def test_apts_state_specs():
    from jax.sharding import PartitionSpec as P

    params = functional(MLP((3, 2), rngs=nnx.Rngs(0)))[1]
    state = apts_jax.apts("i").init(params)
    specs = nnx_example.apts_state_specs(state, "i")
    assert jax.tree.structure(specs, is_leaf=lambda s: isinstance(s, P)) == jax.tree.structure(
        state)
    assert all(s == P("i") for s in jax.tree.leaves(specs.grad, is_leaf=lambda s: isinstance(s, P)))
    assert specs.value == P("i") and specs.global_value == P() and specs.radius == P()
    assert specs.info.num_fun_evals == P("i") and specs.info.ratio == P()


# ------------------------------------------------------------------------------------------------
# Linen TrainState
# ------------------------------------------------------------------------------------------------


def test_linen_full_batch(data):
    x, y = data
    # first_order keeps the compile short; the L-SR1 model runs in the NNX tests above.
    out = linen_example.train(x, y, hidden=SIZES[1:-1], steps=15, tr_model="first_order")
    assert out["final_loss"] < 0.3 * out["initial_loss"]
    assert np.all(np.diff(out["losses"]) <= 1e-7)
    state = out["state"]
    assert int(state.step) == 15
    assert int(state.opt_state.info.num_fun_evals) == 15  # value/grad reused from the state


def test_linen_minibatch(data):
    x, y = data
    out = linen_example.train(x, y, hidden=SIZES[1:-1], steps=12, batch_size=32,
                              tr_model="first_order")
    assert out["final_loss"] < 0.6 * out["initial_loss"]
    assert isinstance(out["state"].opt_state, apts_jax.TrustRegionState)
