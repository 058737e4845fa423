r"""Training a Flax NNX model with the trust-region optimizer (nnx.Optimizer) and with APTS (shard_map).

**1. Trust region through ``nnx.Optimizer``.** :func:`apts_jax.trust_region` is an
``optax.GradientTransformationExtraArgs``; ``nnx.Optimizer.update(model, grads, **kwargs)``
forwards its keyword arguments to ``tx.update`` (after ``nnx.as_pure``: Variables become plain
arrays, other leaves such as functions pass unchanged)::

    optimizer = nnx.Optimizer(model, apts_jax.trust_region("sr1"), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)

        def value_fn(params):          # params: the optimizer's pure nnx.State of the Params
            return loss_of(nnx.merge(graphdef, params, rest), x, y)

        loss, grads = nnx.value_and_grad(loss_of)(model, x, y)
        optimizer.update(model, grads, value=loss, grad=grads, value_fn=value_fn)
        return loss

``value_fn`` is called by the optimizer at the trial point with what ``nnx.Optimizer`` passes as
``params``: ``nnx.as_pure(nnx.state(model, wrt))``, an :class:`nnx.State` of plain arrays with the
structure of the ``wrt`` variables. It must rebuild the model with ``nnx.merge(graphdef, params,
rest)`` (``rest`` = every other variable) and return the scalar loss; no learning rate is needed.
Each update costs one ``value_and_grad`` of ``value_fn`` at the trial point.

For full-batch training the optimizer state already holds :math:`f` and :math:`\nabla f` at the
accepted point, so :func:`tr_full_batch_step` reuses them with
:func:`optax.value_and_grad_from_state` — one evaluation per step instead of two. Two Flax details:
read the state through ``nnx.as_pure(optimizer.opt_state)``, and give ``nnx.Optimizer.update``
gradients *wrapped in Variables* again (it filters ``grads`` by ``wrt=nnx.Param``, which drops
plain arrays): :func:`as_variables`.

**2. APTS inside ``jax.shard_map``.** :func:`apts_jax.apts` is the paper's APTS as an optax
transformation that runs *inside* a function mapped over subdomains, one per device here. The model
is split into ``graphdef, params, rest``; ``params`` (a pure ``nnx.State``) is replicated, every
device holds its shard of the data and computes its local loss and gradient from a *varying*
copy of the parameters (:func:`apts_jax.to_varying`; ``jax.grad`` of replicated params
inside ``shard_map`` would return the sum over devices), and ``update`` runs the local
trust-region steps and the three all-reduces. The APTS state has per-device leaves (the local
value, gradient and L-SR1 memory) and replicated ones: :func:`apts_state_specs`. The updated
``params`` come out replicated (``out_specs=P()``, checked by ``check_vma``, and compared across
devices by :func:`train_apts`). Write them back with ``nnx.update(model, params)``.

Run (4 simulated CPU devices for APTS; Fashion-MNIST from ``apts_jax.data`` when it is available
offline, generated data otherwise)::

    python examples/flax_nnx_trust_region.py --cpu-devices 4
    python examples/flax_nnx_trust_region.py --cpu-devices 4 --model mlp --samples 4096
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import Array
from jax.sharding import PartitionSpec as P

import apts_jax
from apts_jax import APTSState, apts, apts_state_specs, to_varying

# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def make_data(
    num_samples: int = 2048, num_features: int = 784, num_classes: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A generated classification problem: Gaussian blobs around random class centres.

    ``x = 3 c_y + e`` with unit-norm random centres ``c_k``, standard normal noise ``e`` and
    uniform labels ``y``; float32 inputs, int32 labels.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes, num_features))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = rng.integers(0, num_classes, num_samples).astype(np.int32)
    x = 3.0 * centres[y] + rng.standard_normal((num_samples, num_features))
    return x.astype(np.float32), y


def load_data(
    source: str = "auto", num_samples: int = 2048, seed: int = 0, data_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """``(x (n, 784), y (n,), description)``: a Fashion-MNIST subset or generated data.

    ``source="auto"`` uses Fashion-MNIST when :func:`apts_jax.data.load_dataset` finds it offline
    and falls back to :func:`make_data`; ``"fashion_mnist"`` insists on it, ``"synthetic"``
    always generates.
    """
    if source in ("auto", "fashion_mnist"):
        from apts_jax.data import DatasetNotFoundError, load_dataset

        try:
            ds = load_dataset("fashion_mnist", data_dir, download=False,
                              subset=(num_samples, 1))
            return ds.train_x, ds.train_y, f"Fashion-MNIST ({ds.train_x.shape[0]} samples)"
        except DatasetNotFoundError:
            if source == "fashion_mnist":
                raise
    x, y = make_data(num_samples, 784, 10, seed)
    return x, y, f"generated blobs ({num_samples} samples, 784 features, 10 classes)"


def loss_of(model: nnx.Module, x: Array, y: Array) -> Array:
    """Mean softmax cross-entropy of ``model(x)`` with integer labels ``y``."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model(x), y))


# ------------------------------------------------------------------------------------------------
# 1. The trust-region optimizer through nnx.Optimizer
# ------------------------------------------------------------------------------------------------


def as_variables(template: nnx.State, arrays: Any) -> nnx.State:
    """``arrays`` (a pure state) wrapped in the Variable types of ``template`` (same structure)."""
    return jax.tree.map(lambda v, a: v.replace(a), template, arrays,
                        is_leaf=lambda v: isinstance(v, nnx.Variable))


@nnx.jit
def tr_step(model: nnx.Module, optimizer: nnx.Optimizer, x: Array, y: Array) -> Array:
    """One trust-region update on the batch ``(x, y)``; returns the loss before the update."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def value_fn(params: nnx.State) -> Array:  # the optimizer's pure params state
        return loss_of(nnx.merge(graphdef, params, rest), x, y)

    loss, grads = nnx.value_and_grad(loss_of)(model, x, y)
    optimizer.update(model, grads, value=loss, grad=grads, value_fn=value_fn)
    return loss


@nnx.jit
def tr_full_batch_step(model: nnx.Module, optimizer: nnx.Optimizer, x: Array, y: Array) -> Array:
    """One trust-region update on fixed data, reusing f and ∇f stored in the optimizer state."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def value_fn(p: nnx.State) -> Array:
        return loss_of(nnx.merge(graphdef, p, rest), x, y)

    value_and_grad = optax.value_and_grad_from_state(value_fn)
    loss, grads = value_and_grad(nnx.as_pure(params), state=nnx.as_pure(optimizer.opt_state))
    optimizer.update(model, as_variables(params, grads), value=loss, grad=grads,
                     value_fn=value_fn)
    return loss


def train_trust_region(
    model: nnx.Module,
    x: Array,
    y: Array,
    *,
    steps: int = 50,
    batch_size: int | None = None,
    tr_model: str = "sr1",
    memory_size: int = 5,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place for ``steps`` trust-region updates.

    ``batch_size=None``: full batch (:func:`tr_full_batch_step`, one evaluation per step);
    otherwise a fresh random minibatch per step (:func:`tr_step`). Returns the per-step losses
    (before each update), the full-data loss before/after and the optimizer diagnostics.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    optimizer = nnx.Optimizer(model, apts_jax.trust_region(tr_model, memory_size), wrt=nnx.Param)
    full_loss = nnx.jit(loss_of)
    initial = float(full_loss(model, x, y))
    rng = np.random.default_rng(seed)
    losses = []
    t0 = time.perf_counter()
    for k in range(steps):
        if batch_size is None:
            loss = tr_full_batch_step(model, optimizer, x, y)
        else:
            idx = rng.choice(x.shape[0], batch_size, replace=False)
            loss = tr_step(model, optimizer, x[idx], y[idx])
        losses.append(float(loss))
        if log is not None and (k % 10 == 0 or k == steps - 1):
            st = nnx.as_pure(optimizer.opt_state)
            log(f"  tr {k:4d}: loss {losses[-1]:.4f}, radius {float(st.radius):.3g}, "
                f"accepted {int(st.info.num_accepted)}/{k + 1}")
    info = nnx.as_pure(optimizer.opt_state).info
    return {
        "losses": losses,
        "initial_loss": initial,
        "final_loss": float(full_loss(model, x, y)),
        "num_accepted": int(info.num_accepted),
        # value_and_grad evaluations: the optimizer's (one per update) plus the caller's (every
        # minibatch step; only the first full-batch step, where the state holds no value yet).
        "evaluations": int(info.num_fun_evals) + (min(steps, 1) if batch_size is None else steps),
        "time_s": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------------------
# 2. APTS inside jax.shard_map
# ------------------------------------------------------------------------------------------------

def _map_local(fn: Callable[[Array], Array], specs: Any, state: Any, axis: str) -> Any:
    return jax.tree.map(lambda s, a: fn(a) if s == P(axis) else a, specs, state,
                        is_leaf=lambda s: isinstance(s, P))


def train_apts(
    model: nnx.Module,
    x: Array,
    y: Array,
    *,
    steps: int = 20,
    devices: int = 4,
    local_steps: int = 5,
    tr_model: str = "sr1",
    axis: str = "subdomains",
    log: Callable[[str], None] | None = None,
    **radius: float,
) -> dict[str, Any]:
    """Full-batch APTS with one subdomain per device, ``steps`` outer iterations; trains in place.

    The samples are split into ``devices`` equal shards (the first ``n - n % devices`` are used).
    Returns the global loss after every step, the largest difference between the devices' copies
    of the parameters (0 when they stay replicated) and the APTS diagnostics.
    """
    if devices > jax.device_count():
        raise SystemExit(f"error: {devices} devices requested, {jax.device_count()} available "
                         "(on CPU use --cpu-devices)")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.as_pure(params)

    def loss_fn(p: nnx.State, xb: Array, yb: Array) -> Array:
        return loss_of(nnx.merge(graphdef, p, rest), xb, yb)

    # Full batch: the data never changes, so the values/gradients of the last update are reused.
    tx = apts(axis, local_steps=local_steps, model=tr_model, reuse_value_and_grad=True, **radius)
    state0 = tx.init(params)
    specs = apts_state_specs(state0, axis)
    state = _map_local(lambda a: jnp.broadcast_to(a, (devices, *a.shape)), specs, state0, axis)

    def body(params: nnx.State, state: APTSState, xs: Array, ys: Array) -> Any:
        state = _map_local(lambda a: a[0], specs, state, axis)
        xb, yb = xs[0], ys[0]  # this device's shard
        value_fn = lambda p: loss_fn(p, xb, yb)  # noqa: E731
        value, grad = jax.value_and_grad(value_fn)(to_varying(params, axis))
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=value_fn)
        params = optax.apply_updates(params, updates)
        copies = jax.tree.map(lambda a: a[None], params)  # every device's copy, for the check
        return params, copies, _map_local(lambda a: a[None], specs, state, axis)

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:devices]), (axis,))
    step = jax.jit(jax.shard_map(
        body, mesh=mesh, in_specs=(P(), specs, P(axis), P(axis)),
        out_specs=(P(), P(axis), specs)))

    n = x.shape[0] - x.shape[0] % devices
    xs = jnp.reshape(jnp.asarray(x)[:n], (devices, n // devices, *x.shape[1:]))
    ys = jnp.reshape(jnp.asarray(y)[:n], (devices, n // devices))
    initial = float(jax.jit(loss_fn)(params, jnp.asarray(x)[:n], jnp.asarray(y)[:n]))
    losses, spread = [], 0.0
    t0 = time.perf_counter()
    for k in range(steps):
        params, copies, state = step(params, state, xs, ys)
        losses.append(float(state.global_value))
        spread = max([spread] + [float(jnp.max(jnp.abs(c - c[0]))) for c in jax.tree.leaves(copies)])
        if log is not None and (k % 5 == 0 or k == steps - 1):
            log(f"  apts {k:3d}: loss {losses[-1]:.4f}, radius {float(state.radius):.3g}, "
                f"rho {float(state.info.ratio):.3g}, accepted {int(state.info.num_accepted)}")
    nnx.update(model, params)
    return {
        "initial_loss": initial,
        "losses": losses,
        "final_loss": losses[-1] if losses else initial,
        "replica_spread": spread,
        "num_accepted": int(state.info.num_accepted),
        "time_s": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def build_model(name: str, seed: int) -> nnx.Module:
    """``"small"``: MLP 784-64-10; otherwise :func:`apts_jax.models.create_model` on 28x28x1."""
    from apts_jax.models import MLP, create_model

    if name == "small":
        return MLP((784, 64, 10), rngs=nnx.Rngs(seed))
    return create_model(name, (28, 28, 1), 10, seed)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Flax NNX + apts_jax: trust region and APTS.")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="run on CPU with this many simulated devices (before JAX starts)")
    p.add_argument("--data", choices=["auto", "fashion_mnist", "synthetic"], default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--model", choices=["small", "mlp", "mlp_mnist", "cnn"], default="small")
    p.add_argument("--steps", type=int, default=50, help="trust-region updates")
    p.add_argument("--batch-size", type=int, default=None, help="minibatch (default: full batch)")
    p.add_argument("--apts-steps", type=int, default=20, help="APTS outer iterations")
    p.add_argument("--devices", type=int, default=4, help="APTS subdomains = devices")
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cpu_devices is not None:  # must happen before any device is touched
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    x, y, desc = load_data(args.data, args.samples, args.seed, args.data_dir)
    if args.model == "cnn":
        x = x.reshape(-1, 28, 28, 1)
    print(f"data: {desc}; model: {args.model}")

    model = build_model(args.model, args.seed)
    print(f"trust region (nnx.Optimizer), {args.steps} steps, "
          f"{'full batch' if args.batch_size is None else f'batch {args.batch_size}'}:")
    out = train_trust_region(model, x, y, steps=args.steps, batch_size=args.batch_size,
                             seed=args.seed, log=print)
    print(f"  loss {out['initial_loss']:.4f} -> {out['final_loss']:.4f} "
          f"({out['evaluations']} evaluations, {out['time_s']:.1f} s)")

    model = build_model(args.model, args.seed)
    print(f"APTS in shard_map, {args.devices} subdomains, {args.apts_steps} outer iterations:")
    out = train_apts(model, x, y, steps=args.apts_steps, devices=args.devices,
                     local_steps=args.local_steps, log=print)
    print(f"  loss {out['initial_loss']:.4f} -> {out['final_loss']:.4f}, params identical on all "
          f"devices: {out['replica_spread'] == 0.0} ({out['time_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
