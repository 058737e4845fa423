r"""Classic ``jax.pmap`` data-parallel training, with Adam or APTS as a drop-in optimizer.

A textbook data-parallel loop: parameters and optimizer state replicated over the devices of a
``jax.pmap(..., axis_name="batch")``, every minibatch split over the devices, each device
computing the loss and gradient of its part. The optimizer line is the only difference between
the two runs::

    opt = optax.adam(args.lr)                                  # --optimizer adam
    opt = apts("batch", local_steps=args.local_steps)          # --optimizer apts

The update call serves both: it passes the device-averaged gradient as ``updates`` (what Adam
uses) and, as optax extra arguments that Adam ignores, this device's own ``value``, ``grad`` and
``value_fn`` on its part of the minibatch (what APTS uses: each device is one subdomain, it runs
``nu`` local trust-region steps on its part and the devices add their steps; see
:func:`apts_jax.apts`). APTS uses the ``value``/``grad`` of the current minibatch at every update
(its default; minibatch training is the paper's SAPTS). For APTS the averaged ``updates`` only fix
the parameter structure.

Run (4 simulated CPU devices; on GPUs/TPUs drop ``--cpu-devices``)::

    python examples/pmap_training.py --optimizer adam --cpu-devices 4
    python examples/pmap_training.py --optimizer apts --cpu-devices 4

Data: the first ``--subset`` Fashion-MNIST training samples (:func:`apts_jax.data.load_dataset`).
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Sequence
from typing import Any


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="jax.pmap data-parallel MLP training: Adam or APTS.")
    p.add_argument("--optimizer", choices=["adam", "apts"], default="apts")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="run on CPU with this many simulated devices")
    p.add_argument("--subset", type=int, default=8192, help="training samples used")
    p.add_argument("--batch-size", type=int, default=2048, help="global minibatch size")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--hidden", type=int, nargs="*", default=[128])
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--local-steps", type=int, default=5, help="APTS: nu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    if args.cpu_devices is not None:  # before any device is touched
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    import jax.numpy as jnp
    import numpy as np
    import optax
    from _mlp import accuracy, cross_entropy, init_mlp
    from jax import lax

    from apts_jax import apts
    from apts_jax.data import load_dataset

    n_dev = jax.local_device_count()
    ds = load_dataset("fashion_mnist", args.data_dir, subset=(args.subset, None))
    batch = args.batch_size - args.batch_size % n_dev
    steps = ds.train_x.shape[0] // batch
    if steps < 1:
        raise SystemExit(f"error: --batch-size {batch} exceeds the {ds.train_x.shape[0]} samples")
    sizes = [ds.train_x.shape[1], *args.hidden, ds.num_classes]
    params = init_mlp(jax.random.key(args.seed), sizes)

    # ---- the only line that differs -------------------------------------------------------
    if args.optimizer == "adam":
        opt = optax.adam(args.lr)
    else:
        opt = apts("batch", local_steps=args.local_steps)
    # -----------------------------------------------------------------------------------------

    @functools.partial(jax.pmap, axis_name="batch")
    def train_step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
        loss, grads = jax.value_and_grad(cross_entropy)(params, x, y)
        updates, opt_state = opt.update(
            lax.pmean(grads, "batch"), opt_state, params,
            value=loss, grad=grads, value_fn=lambda p: cross_entropy(p, x, y),
        )
        return optax.apply_updates(params, updates), opt_state, lax.pmean(loss, "batch")

    def replicate(tree: Any) -> Any:  # a leading device axis, as pmap expects
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (n_dev, *jnp.shape(a))), tree)

    p_params, p_state = replicate(params), replicate(opt.init(params))
    xt, yt = jnp.asarray(ds.test_x), jnp.asarray(ds.test_y)
    evaluate = jax.jit(lambda p: (cross_entropy(p, xt, yt), accuracy(p, xt, yt)))
    print(f"{args.optimizer}: {n_dev} devices, MLP {'-'.join(map(str, sizes))}, "
          f"{steps * batch} samples, {steps} steps/epoch of {batch} ({batch // n_dev}/device)")
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    loss = float("nan")
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(ds.train_x.shape[0])[: steps * batch]
        for i in range(steps):
            idx = order[i * batch:(i + 1) * batch]
            x = ds.train_x[idx].reshape(n_dev, batch // n_dev, -1)
            y = ds.train_y[idx].reshape(n_dev, batch // n_dev)
            p_params, p_state, p_loss = train_step(p_params, p_state, x, y)
            loss = float(p_loss[0])
        params = jax.tree.map(lambda a: a[0], p_params)
        test_loss, test_acc = evaluate(params)
        print(f"epoch {epoch:3d}: last minibatch loss {loss:.4f}, test loss {float(test_loss):.4f}, "
              f"test accuracy {100 * float(test_acc):.2f} %, {time.perf_counter() - t0:.1f} s")
    return {"loss": loss, "test_accuracy": float(test_acc), "time_s": time.perf_counter() - t0}


def main(argv: Sequence[str] | None = None) -> int:
    run(_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
