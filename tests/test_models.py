"""Tests of apts_jax.models: the paper's MLPs, the small CNN, the registry and the functional bridge.

* exact parameter counts: 535,818 (784-512-256-10), 1,841,162 (3072-512-512-10), 19,466 / 20,042
  (SmallCNN with 1 / 3 input channels), each also checked against the closed form;
* output shapes for flat and image inputs; registry errors name the valid models;
* ``functional``: ``apply_fn(params, x)`` equals ``model(x)`` (eager and jitted, float32 and
  float64), ``nnx.update`` writes parameters back, and the MLP equals a numpy forward pass;
* ``cross_entropy_loss`` / ``accuracy`` against numpy, and a pure-JAX optimizer
  (:func:`apts_jax.parallel.solve`) training a model through ``functional``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from apts_jax import models
from apts_jax.models import (
    MLP,
    MODELS,
    SmallCNN,
    accuracy,
    count_params,
    create_model,
    cross_entropy_loss,
    functional,
    mlp_cifar,
    mlp_mnist,
)

#: The small MLP used by most tests (one set of shapes keeps eager compilation short).
SMALL = (12, 16, 5)


def dense_count(sizes):
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def abstract(build):
    """``build()`` with ShapeDtypeStruct leaves (nnx.eval_shape): shapes without initialising.

    ``build`` must create its ``nnx.Rngs`` itself (inside the traced function).
    """
    return nnx.eval_shape(build)


@functools.cache
def paper_model(name):
    """Abstract copies of the two large MLPs (1.8 M parameters need not be initialised)."""
    return abstract(lambda: {"mnist": mlp_mnist, "cifar": mlp_cifar}[name](nnx.Rngs(0)))


# ------------------------------------------------------------------------------------------------
# Parameter counts and shapes
# ------------------------------------------------------------------------------------------------


def test_paper_mlp_parameter_counts():
    assert count_params(paper_model("mnist")) == 535_818 == dense_count((784, 512, 256, 10))
    assert count_params(paper_model("cifar")) == 1_841_162 == dense_count((3072, 512, 512, 10))
    assert paper_model("mnist").sizes == models.MLP_MNIST_SIZES == (784, 512, 256, 10)
    assert paper_model("cifar").sizes == models.MLP_CIFAR_SIZES == (3072, 512, 512, 10)
    shapes = [tuple(layer.kernel.shape) for layer in paper_model("mnist").layers]
    assert shapes == [(784, 512), (512, 256), (256, 10)]


@pytest.mark.parametrize("in_channels, expected", [(1, 19_466), (3, 20_042)])
def test_cnn_parameter_count(in_channels, expected):
    model = abstract(lambda: SmallCNN(10, in_channels, rngs=nnx.Rngs(0)))
    closed_form = (9 * in_channels * 32 + 32) + (9 * 32 * 64 + 64) + (64 * 10 + 10)
    assert count_params(model) == expected == closed_form
    assert count_params(abstract(lambda: SmallCNN(7, in_channels, rngs=nnx.Rngs(0)))) == (
        closed_form - 3 * 65)


def test_count_params_of_a_pytree():
    _, params = functional(MLP(SMALL, rngs=nnx.Rngs(0)))
    assert count_params(params) == dense_count(SMALL) == 12 * 16 + 16 + 16 * 5 + 5


@pytest.mark.parametrize(
    "name, input_shape, expected",
    [
        ("mlp", (784,), 535_818),
        ("mlp", (28, 28, 1), 535_818),
        ("mlp", (28, 28), 535_818),
        ("mlp", (3072,), 1_841_162),
        ("mlp", (32, 32, 3), 1_841_162),
        ("mlp_mnist", (28, 28, 1), 535_818),
        ("mlp_cifar", (32, 32, 3), 1_841_162),
        ("cnn", (28, 28, 1), 19_466),
        ("cnn", (28, 28), 19_466),
        ("cnn", (32, 32, 3), 20_042),
    ],
)
def test_create_model_and_output_shapes(name, input_shape, expected):
    # Shapes only (nnx.eval_shape traces construction and the forward pass without running them);
    # concrete forward passes are checked on small models below.
    model = abstract(lambda: create_model(name, input_shape, num_classes=10, seed=0))
    assert count_params(model) == expected
    out = nnx.eval_shape(lambda: create_model(name, input_shape)(
        jnp.ones((3, *input_shape), jnp.float32)))
    assert out.shape == (3, 10) and out.dtype == jnp.float32


def test_concrete_forward_pass_of_the_paper_mlp(rng):
    model = create_model("mlp", (28, 28, 1), seed=0)
    assert count_params(model) == 535_818  # concrete arrays, not only shapes
    x = jnp.asarray(rng.standard_normal((2, 28, 28, 1)), jnp.float32)
    out = model(x)
    assert out.shape == (2, 10) and bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(out, numpy_mlp(functional(model)[1], x), rtol=1e-4, atol=1e-4)


def test_num_classes_and_seed():
    a, b, c = (create_model("cnn", (8, 8, 3), num_classes=5, seed=k) for k in (1, 1, 2))
    assert count_params(abstract(lambda: create_model("mlp", (784,), 5))) == dense_count(
        (784, 512, 256, 5))
    x = jnp.ones((2, 8, 8, 3))
    assert a(x).shape == (2, 5)
    np.testing.assert_array_equal(a(x), b(x))
    assert not np.allclose(a(x), c(x))


def test_registry_names():
    assert set(MODELS) == {"mlp", "mlp_mnist", "mlp_cifar", "cnn"}
    with pytest.raises(TypeError):
        MODELS["new"] = None  # read-only mapping


@pytest.mark.parametrize("bad", ["resnet", "MLP", "", None])
def test_unknown_model_lists_valid_names(bad):
    with pytest.raises(ValueError, match="unknown model") as err:
        create_model(bad, (784,))
    for name in MODELS:
        assert repr(name) in str(err.value)


@pytest.mark.parametrize(
    "name, input_shape, match",
    [
        ("mlp", (100,), r"784.*3072.*100 features"),
        ("mlp", (32, 32, 1), r"1024 features"),
        ("mlp_mnist", (3072,), r"'mlp_mnist'.*784 input features.*3072"),
        ("mlp_cifar", (784,), r"'mlp_cifar'.*3072 input features.*784"),
        ("cnn", (784,), r"image input_shape"),
        ("cnn", (2, 28, 28, 1), r"image input_shape"),
        ("mlp", (), r"non-empty"),
        ("mlp", (0, 784), r"positive"),
    ],
)
def test_create_model_rejects_bad_input_shapes(name, input_shape, match):
    with pytest.raises(ValueError, match=match):
        create_model(name, input_shape)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        create_model("mlp", (784,), num_classes=0)
    with pytest.raises(ValueError, match="at least two"):
        MLP((784,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="positive"):
        MLP((12, 0, 5), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="in_channels"):
        SmallCNN(10, 0, rngs=nnx.Rngs(0))


def test_wrong_input_to_the_modules():
    # Abstract modules suffice: the checks run before any parameter is used.
    with pytest.raises(ValueError, match="12 input features"):
        abstract(lambda: MLP(SMALL, rngs=nnx.Rngs(0)))(jnp.ones((2, 100)))
    cnn = abstract(lambda: SmallCNN(5, 3, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="NHWC"):
        cnn(jnp.ones((2, 32 * 32 * 3)))
    with pytest.raises(ValueError, match="NHWC"):
        cnn(jnp.ones((2, 32, 32, 1)))


def test_cnn_accepts_any_image_size():
    cnn = abstract(lambda: SmallCNN(5, 1, rngs=nnx.Rngs(0)))
    for hw in [(8, 8), (28, 28), (9, 13)]:
        out = nnx.eval_shape(lambda m, x: m(x), cnn, jnp.ones((2, *hw, 1)))
        assert out.shape == (2, 5)
    assert nnx.eval_shape(lambda m, x: m(x), cnn, jnp.ones((2, 9, 13))).shape == (2, 5)


# ------------------------------------------------------------------------------------------------
# The functional bridge
# ------------------------------------------------------------------------------------------------


def numpy_mlp(params, x):
    """Independent forward pass of the MLP from the raw kernels/biases (float64 numpy)."""
    layers = params["layers"]
    h = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    for i in range(len(layers)):
        h = h @ np.asarray(layers[i]["kernel"], np.float64) + np.asarray(layers[i]["bias"])
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h


def test_functional_round_trip_mlp(rng):
    model = MLP(SMALL, rngs=nnx.Rngs(3))
    apply_fn, params = functional(model)
    # params: a pure nnx.State (plain arrays, no Variable wrappers) with the Param structure.
    assert isinstance(params, nnx.State)
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(params))
    assert jax.tree.structure(params) == jax.tree.structure(
        nnx.as_pure(nnx.state(model, nnx.Param)))
    x = jnp.asarray(rng.standard_normal((7, 3, 4)), jnp.float32)  # flattened to 12 features
    expected = model(x)
    np.testing.assert_array_equal(apply_fn(params, x), expected)
    np.testing.assert_allclose(jax.jit(apply_fn)(params, x), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(expected, numpy_mlp(params, x), rtol=1e-5, atol=1e-5)


def test_functional_round_trip_cnn(rng):
    model = SmallCNN(5, 3, rngs=nnx.Rngs(1))
    apply_fn, params = functional(model)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
    np.testing.assert_allclose(jax.jit(apply_fn)(params, x), model(x), rtol=1e-5, atol=1e-6)


def test_functional_float64(x64, rng):
    model = MLP((6, 5, 3), rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    apply_fn, params = functional(model)
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.float64)}
    x = jnp.asarray(rng.standard_normal((4, 6)))
    out = jax.jit(apply_fn)(params, x)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, numpy_mlp(params, x), rtol=1e-12, atol=1e-12)


def test_functional_gradient_and_write_back(rng):
    model = MLP(SMALL, rngs=nnx.Rngs(0))
    apply_fn, params = functional(model)
    x = jnp.asarray(rng.standard_normal((5, 12)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 5, 5), jnp.int32)
    loss = cross_entropy_loss(apply_fn)
    g_functional = jax.jit(jax.grad(loss))(params, (x, y))
    g_nnx = nnx.jit(nnx.grad(lambda m: loss_of_module(m, x, y)))(model)
    for a, b in zip(jax.tree.leaves(g_functional), jax.tree.leaves(nnx.as_pure(g_nnx)),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # A step on the pure params, written back into the module.
    new = jax.tree.map(lambda p, g: p - 0.1 * g, params, g_functional)
    nnx.update(model, new)
    np.testing.assert_allclose(model(x), apply_fn(new, x), rtol=1e-6, atol=1e-6)
    # The captured apply_fn does not depend on the module's current values.
    other_apply_fn, _ = functional(MLP(SMALL, rngs=nnx.Rngs(5)))
    np.testing.assert_allclose(apply_fn(params, x), other_apply_fn(params, x), rtol=1e-6,
                               atol=1e-6)


def loss_of_module(model, x, y):
    logits = model(x)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y])


def test_cross_entropy_and_accuracy_against_numpy(rng):
    model = MLP(SMALL, rngs=nnx.Rngs(2))
    apply_fn, params = functional(model)
    x = rng.standard_normal((32, 12)).astype(np.float32)
    y = rng.integers(0, 5, 32).astype(np.int32)
    logits = numpy_mlp(params, x)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    ce = -np.mean(log_p[np.arange(32), y])
    acc = np.mean(np.argmax(logits, axis=1) == y)
    loss = jax.jit(cross_entropy_loss(apply_fn))
    np.testing.assert_allclose(loss(params, (x, y)), ce, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(accuracy(apply_fn))(params, (x, y)), acc, rtol=1e-6)
    y_pred = np.argmax(logits, axis=1).astype(np.int32)
    assert float(accuracy(apply_fn)(params, (x, y_pred))) == 1.0


def test_pure_jax_optimizer_trains_the_model(rng):
    """``functional`` feeds a model to apts_jax.parallel.solve (APTS, 2 subdomains)."""
    from apts_jax import parallel

    model = MLP(SMALL, rngs=nnx.Rngs(0))
    apply_fn, params = functional(model)
    x = rng.standard_normal((64, 12)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0).astype(np.int32)
    loss = cross_entropy_loss(apply_fn)
    before = float(loss(params, (x, y)))
    # first_order keeps the compile short; the L-SR1 path is exercised in test_flax_integration.
    new_params, _, _ = parallel.solve(loss, params, (x, y), subdomains=2, devices=2,
                                      max_iterations=10, local_steps=2, model="first_order")
    assert jax.tree.structure(new_params) == jax.tree.structure(params)
    after = float(loss(new_params, (x, y)))
    assert after < 0.5 * before
    nnx.update(model, new_params)
    np.testing.assert_allclose(loss_of_module(model, jnp.asarray(x), jnp.asarray(y)), after,
                               rtol=1e-5)
