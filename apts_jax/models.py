r"""Flax NNX models of the APTS paper, a model registry, and a functional bridge to pure JAX.

The experiments of Cruz Alegría, Trotti, Kopaničáková & Krause (*Data-Parallel Neural Network
Training via Nonlinearly Preconditioned Trust-Region Method*) use fully connected ReLU networks:

* :func:`mlp_mnist` — 784-512-256-10 for (Fashion-)MNIST, **535,818** parameters
  (:math:`784\cdot512+512 + 512\cdot256+256 + 256\cdot10+10`);
* :func:`mlp_cifar` — 3072-512-512-10 for CIFAR-10, **1,841,162** parameters
  (:math:`3072\cdot512+512 + 512\cdot512+512 + 512\cdot10+10`);

both built from the general :class:`MLP` (inputs flattened, ReLU between layers, none after the
last). :class:`SmallCNN` is a small convolutional network for quick experiments (see its
docstring for the parameter count). :data:`MODELS` / :func:`create_model` build any of them by
name from the per-sample input shape.

Pure-JAX optimizers (:func:`apts_jax.parallel.make_apts`, :func:`apts_jax.parallel.solve`,
:func:`apts_jax.minimize`) take a loss of a parameter pytree; :func:`functional` turns a module
into ``(apply_fn(params, x) -> logits, params)`` with :func:`flax.nnx.split` /
:func:`flax.nnx.merge`, and :func:`cross_entropy_loss` / :func:`accuracy` build
``f(params, (x, y))`` from ``apply_fn``::

    model = create_model("mlp", (784,), 10, seed=0)
    apply_fn, params = functional(model)
    loss = cross_entropy_loss(apply_fn)          # loss(params, (x, y)) -> scalar
    params, state, stats = apts_jax.parallel.solve(loss, params, (x, y), subdomains=4)
    nnx.update(model, params)                    # write the result back into the module

Initialisation is Flax's default (LeCun-normal kernels, zero biases); layouts are Flax's
(``Linear`` kernels ``(in, out)``, images NHWC).

This module is application level: it imports Flax, which the numerical core
(:mod:`apts_jax.trust_region`, :mod:`apts_jax.apts`, :mod:`apts_jax.parallel`, ...) does not need.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import Array

__all__ = [
    "MLP",
    "MLP_CIFAR_SIZES",
    "MLP_MNIST_SIZES",
    "MODELS",
    "SmallCNN",
    "accuracy",
    "count_params",
    "create_model",
    "cross_entropy_loss",
    "functional",
    "mlp_cifar",
    "mlp_mnist",
]

#: Layer widths of the paper's (Fashion-)MNIST network (535,818 parameters).
MLP_MNIST_SIZES: tuple[int, ...] = (784, 512, 256, 10)
#: Layer widths of the paper's CIFAR-10 network (1,841,162 parameters).
MLP_CIFAR_SIZES: tuple[int, ...] = (3072, 512, 512, 10)

ApplyFn = Callable[[Any, Array], Array]


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


class MLP(nnx.Module):
    r"""Fully connected ReLU network :math:`x \mapsto W_L\,\sigma(\cdots\sigma(W_1 x + b_1)\cdots)
    + b_L` with :math:`\sigma = \mathrm{ReLU}`.

    ``sizes = (d_0, d_1, ..., d_L)`` gives ``L`` :class:`flax.nnx.Linear` layers ``d_{i-1} -> d_i``
    (:math:`\sum_i d_{i-1} d_i + d_i` parameters). The input ``(batch, ...)`` is flattened to
    ``(batch, d_0)``; the output is ``(batch, d_L)`` logits (no activation after the last layer).

    Args:
      sizes: at least two positive layer widths, input first.
      rngs: the :class:`flax.nnx.Rngs` used to initialise the weights.
      param_dtype: dtype of the weights (default float32).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        *,
        rngs: nnx.Rngs,
        param_dtype: Any = jnp.float32,
    ) -> None:
        sizes = tuple(sizes)
        if len(sizes) < 2 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes
        ):
            raise ValueError(
                f"MLP sizes must be at least two positive ints (input width first), got {sizes!r}."
            )
        self.sizes = sizes
        self.layers = nnx.List(
            [
                nnx.Linear(d_in, d_out, rngs=rngs, param_dtype=param_dtype)
                for d_in, d_out in zip(sizes[:-1], sizes[1:], strict=True)
            ]
        )

    def __call__(self, x: Array) -> Array:
        """Logits ``(batch, sizes[-1])`` of a batch ``(batch, ...)`` with ``prod(...) = sizes[0]``."""
        x = jnp.reshape(x, (x.shape[0], -1))
        if x.shape[1] != self.sizes[0]:
            raise ValueError(
                f"MLP expects {self.sizes[0]} input features per sample, got {x.shape[1]} "
                f"(input shape {x.shape})."
            )
        *hidden, last = self.layers
        for layer in hidden:
            x = jax.nn.relu(layer(x))
        return last(x)


def mlp_mnist(rngs: nnx.Rngs, num_classes: int = 10, *, param_dtype: Any = jnp.float32) -> MLP:
    """The paper's (Fashion-)MNIST network 784-512-256-10 (535,818 parameters for 10 classes)."""
    return MLP((*MLP_MNIST_SIZES[:-1], num_classes), rngs=rngs, param_dtype=param_dtype)


def mlp_cifar(rngs: nnx.Rngs, num_classes: int = 10, *, param_dtype: Any = jnp.float32) -> MLP:
    """The paper's CIFAR-10 network 3072-512-512-10 (1,841,162 parameters for 10 classes)."""
    return MLP((*MLP_CIFAR_SIZES[:-1], num_classes), rngs=rngs, param_dtype=param_dtype)


class SmallCNN(nnx.Module):
    r"""A small convolutional network (not from the paper) for quick experiments.

    ``conv 3x3 (in_channels -> 32), ReLU, 2x2 max-pool, conv 3x3 (32 -> 64), ReLU, global average
    pool, dense (64 -> num_classes)``, "SAME" padding. The global pool makes the network accept any
    image size (at least 2x2), and the parameter count independent of it:

    .. math:: (9\,c_{in}\cdot 32 + 32) + (9\cdot 32\cdot 64 + 64) + (64\,K + K)

    i.e. **19,466** for ``in_channels=1`` (MNIST-like) and **20,042** for ``in_channels=3``
    (CIFAR-10), with ``K = num_classes = 10``.

    Inputs are NHWC ``(batch, H, W, in_channels)``; ``(batch, H, W)`` is accepted when
    ``in_channels == 1``. Flat ``(batch, H*W*C)`` inputs have to be reshaped by the caller.

    Args:
      num_classes: ``K``, the number of logits.
      in_channels: ``C`` of the input images (1 or 3 usually).
      rngs: the :class:`flax.nnx.Rngs` used to initialise the weights.
      param_dtype: dtype of the weights (default float32).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        *,
        rngs: nnx.Rngs,
        param_dtype: Any = jnp.float32,
    ) -> None:
        for name, v in (("num_classes", num_classes), ("in_channels", in_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SmallCNN: {name} must be a positive int, got {v!r}.")
        self.in_channels = in_channels
        self.conv1 = nnx.Conv(in_channels, 32, (3, 3), padding="SAME", rngs=rngs,
                              param_dtype=param_dtype)
        self.conv2 = nnx.Conv(32, 64, (3, 3), padding="SAME", rngs=rngs, param_dtype=param_dtype)
        self.head = nnx.Linear(64, num_classes, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        """Logits ``(batch, num_classes)`` of images ``(batch, H, W, C)`` (or ``(batch, H, W)``)."""
        if x.ndim == 3 and self.in_channels == 1:
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"SmallCNN expects NHWC images (batch, H, W, {self.in_channels}), got shape "
                f"{x.shape}; reshape flat inputs first."
            )
        x = jax.nn.relu(self.conv1(x))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        x = jax.nn.relu(self.conv2(x))
        x = jnp.mean(x, axis=(1, 2))
        return self.head(x)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def _size(input_shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in input_shape)


def _build_mlp(input_shape: tuple[int, ...], num_classes: int, rngs: nnx.Rngs) -> MLP:
    n = _size(input_shape)
    if n == MLP_MNIST_SIZES[0]:
        return mlp_mnist(rngs, num_classes)
    if n == MLP_CIFAR_SIZES[0]:
        return mlp_cifar(rngs, num_classes)
    raise ValueError(
        f"model 'mlp' picks the paper's network from the input size: 784 (MNIST-like, "
        f"784-512-256-K) or 3072 (CIFAR-10, 3072-512-512-K); input_shape {input_shape} has "
        f"{n} features. Build MLP((d, ..., K), rngs=...) directly for other sizes."
    )


def _fixed_mlp(name: str, sizes: tuple[int, ...], build: Callable[..., MLP]) -> Callable[..., MLP]:
    def builder(input_shape: tuple[int, ...], num_classes: int, rngs: nnx.Rngs) -> MLP:
        n = _size(input_shape)
        if n != sizes[0]:
            raise ValueError(
                f"model {name!r} ({'-'.join(map(str, sizes))}) needs {sizes[0]} input features, "
                f"but input_shape {input_shape} has {n}."
            )
        return build(rngs, num_classes)

    return builder


def _build_cnn(input_shape: tuple[int, ...], num_classes: int, rngs: nnx.Rngs) -> SmallCNN:
    if len(input_shape) == 2:
        channels = 1
    elif len(input_shape) == 3:
        channels = input_shape[-1]
    else:
        raise ValueError(
            f"model 'cnn' needs an image input_shape (H, W) or (H, W, C), got {input_shape}; "
            "load the data with flatten=False."
        )
    return SmallCNN(num_classes, channels, rngs=rngs)


#: Model builders by name: ``MODELS[name](input_shape, num_classes, rngs) -> nnx.Module``.
MODELS: Mapping[str, Callable[[tuple[int, ...], int, nnx.Rngs], nnx.Module]] = MappingProxyType(
    {
        "mlp": _build_mlp,
        "mlp_mnist": _fixed_mlp("mlp_mnist", MLP_MNIST_SIZES, mlp_mnist),
        "mlp_cifar": _fixed_mlp("mlp_cifar", MLP_CIFAR_SIZES, mlp_cifar),
        "cnn": _build_cnn,
    }
)


def create_model(
    name: str, input_shape: Sequence[int], num_classes: int = 10, seed: int = 0
) -> nnx.Module:
    """Build the model ``name`` for samples of shape ``input_shape`` (no batch axis).

    Args:
      name: one of :data:`MODELS`: ``"mlp"`` (784-512-256-K or 3072-512-512-K, chosen from the
        input size), ``"mlp_mnist"``, ``"mlp_cifar"``, ``"cnn"`` (:class:`SmallCNN`; needs
        ``(H, W)`` or ``(H, W, C)``).
      input_shape: the shape of one sample, e.g. ``(784,)``, ``(28, 28, 1)``, ``(32, 32, 3)``.
      num_classes: ``K``, the number of logits.
      seed: seed of the :class:`flax.nnx.Rngs` that initialises the weights.

    Raises:
      ValueError: unknown name (the message lists the valid ones), or an input shape the model
        cannot take.
    """
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(
            f"unknown model {name!r}; valid names are {', '.join(map(repr, MODELS))}."
        )
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive ints, got {shape}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    return MODELS[name](shape, num_classes, nnx.Rngs(seed))


def count_params(model_or_params: Any) -> int:
    """Number of scalar parameters of a module (its :class:`flax.nnx.Param` leaves) or a pytree."""
    tree = model_or_params
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    return int(optax.tree.size(tree))


# ----------------------------------------------------------------------------------------------
# Functional bridge and losses
# ----------------------------------------------------------------------------------------------


def functional(model: nnx.Module) -> tuple[ApplyFn, Any]:
    """Split a module into a pure function of its parameters and the parameters.

    ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``; returns ``(apply_fn, params)``
    with ``params`` an :class:`flax.nnx.State` of plain arrays (a pytree: it can be raveled,
    differentiated, sharded, passed to any optax transformation or to
    :func:`apts_jax.parallel.make_apts`) and ``apply_fn(params, x) = nnx.merge(graphdef, params,
    rest)(x)``, which is jit/grad/vmap/shard_map friendly and equals ``model(x)`` at the split
    point. Write trained parameters back with ``nnx.update(model, params)``.

    Non-parameter state (``rest``: e.g. batch statistics, RNG counters; the models of this module
    have none) is captured as a constant; changes ``apply_fn`` makes to it are discarded.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply_fn(params: Any, x: Array) -> Array:
        return nnx.merge(graphdef, params, rest)(x)

    return apply_fn, nnx.as_pure(params)


def cross_entropy_loss(apply_fn: ApplyFn) -> Callable[[Any, tuple[Array, Array]], Array]:
    r"""``loss(params, (x, y)) = mean_j -log softmax(apply_fn(params, x))_{j, y_j}``.

    Mean softmax cross-entropy over the batch with integer labels ``y`` (shape ``(batch,)``), the
    ``loss_fn(params, shard)`` signature of :mod:`apts_jax.parallel`.
    """

    def loss(params: Any, batch: tuple[Array, Array]) -> Array:
        x, y = batch
        logits = apply_fn(params, x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    return loss


def accuracy(apply_fn: ApplyFn) -> Callable[[Any, tuple[Array, Array]], Array]:
    """``acc(params, (x, y))``: fraction of samples whose arg-max logit equals the label ``y``."""

    def acc(params: Any, batch: tuple[Array, Array]) -> Array:
        x, y = batch
        logits = apply_fn(params, x)
        return jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))

    return acc
