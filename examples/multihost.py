r"""Multi-host data-parallel APTS: train an MLP over the devices of several processes.

Launch one copy of this script per host (or per group of local GPUs); the processes meet through
:func:`jax.distributed.initialize` (JAX's own coordination service and collectives: NCCL on GPU,
ICI/DCN on TPU, gloo on CPU) and then run *one* program over all global devices:
``N`` subdomains (default: one per global device) on a one-axis mesh, the jitted APTS outer step of
:func:`apts_jax.parallel.make_apts`, whose only cross-device traffic is three gradient-sized
all-reduces per outer iteration.

Each process loads only its own part of the training data, the shards of the subdomains that live
on its devices (:func:`apts_jax.parallel.local_subdomains`), and the global data arrays are
assembled with :func:`jax.make_array_from_process_local_data` through
``apts_jax.parallel.split_data(layout, local_data, process_local=True)``. Parameters are
replicated; every process starts from the same seed. Progress is printed by process 0.

Usage::

    # two hosts (run on each, with its own --process-id):
    python examples/multihost.py --coordinator host0:1234 --num-processes 2 --process-id 0
    python examples/multihost.py --coordinator host0:1234 --num-processes 2 --process-id 1

    # SLURM / Open MPI / Cloud TPU: no arguments, jax.distributed.initialize detects them
    srun -N 2 --ntasks-per-node 1 python examples/multihost.py

    # one machine, two processes with 2 simulated CPU devices each (gloo collectives):
    python examples/multihost.py --cpu-devices 2 --coordinator 127.0.0.1:1234 \
        --num-processes 2 --process-id 0 &
    python examples/multihost.py --cpu-devices 2 --coordinator 127.0.0.1:1234 \
        --num-processes 2 --process-id 1

    # the same computation in a single process on 4 simulated CPU devices:
    python examples/multihost.py --single-process --cpu-devices 4

Omitted ``--coordinator``/``--num-processes``/``--process-id`` fall back to the environment
variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, and then to
the cluster auto-detection of :func:`jax.distributed.initialize` (SLURM, Open MPI, Cloud TPU, ...).

Data: ``--dataset fashion_mnist`` (default; :func:`apts_jax.data.load_dataset`, every process
reads the files, normalises with the statistics of the whole training set, and keeps its rows; a
real pipeline would read only its rows) or ``--dataset synthetic`` (a seeded random
classification problem, identical in every process, e.g. for tests). ``--minibatches M > 1``
trains SAPTS instead: every epoch each process shuffles its local samples and feeds ``M``
minibatches through ``fresh_step``.

``--save out.npz`` (process 0) stores the final flat parameters and the loss history.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Multi-host data-parallel APTS training of an MLP (jax.distributed).",
    )
    g = p.add_argument_group("processes (jax.distributed.initialize)")
    g.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                   help="HOST:PORT of process 0's coordinator (env JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"),
                   help="number of processes (env JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"),
                   help="this process's index in [0, num_processes) (env JAX_PROCESS_ID)")
    g.add_argument("--local-device-ids", type=int, nargs="*", default=None,
                   help="local accelerators this process uses (default: all visible)")
    g.add_argument("--single-process", action="store_true",
                   help="do not call jax.distributed.initialize (one process, its devices)")
    g.add_argument("--init-timeout", type=int, default=300,
                   help="seconds to wait for all processes to connect")
    g.add_argument("--cpu-devices", type=int, default=None,
                   help="run on CPU with K simulated devices per process (gloo collectives)")
    t = p.add_argument_group("training")
    t.add_argument("--subdomains", type=int, default=None,
                   help="N, a multiple of the global device count (default: the device count)")
    t.add_argument("--iterations", type=int, default=20, help="outer iterations (or epochs)")
    t.add_argument("--minibatches", type=int, default=1,
                   help="minibatches per epoch; > 1 runs SAPTS (fresh_step)")
    t.add_argument("--local-steps", type=int, default=5, help="nu, local TR iterations")
    t.add_argument("--model", choices=["sr1", "first_order"], default="sr1")
    t.add_argument("--memory", type=int, default=5, help="L-SR1 memory size")
    t.add_argument("--hidden", type=int, nargs="*", default=[512, 256], help="hidden sizes")
    t.add_argument("--dataset", choices=["fashion_mnist", "synthetic"], default="fashion_mnist")
    t.add_argument("--samples", type=int, default=None,
                   help="use the first S training samples (default: all; synthetic: 4096)")
    t.add_argument("--features", type=int, default=784, help="synthetic: input features")
    t.add_argument("--classes", type=int, default=10, help="synthetic: classes")
    t.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    t.add_argument("--print-every", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save", default=None, help="process 0 writes final params/history (.npz)")
    return p


def setup_jax(args: argparse.Namespace) -> None:
    """Configure JAX (before any device is touched) and join the distributed run."""
    import jax

    if args.cpu_devices is not None:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        # gloo is JAX's default cross-process CPU collective implementation (0.10 - 0.12);
        # set it explicitly so that an environment override does not leave CPU collectives off.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.single_process:
        return
    try:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            local_device_ids=args.local_device_ids,
            initialization_timeout=args.init_timeout,
        )
    except ValueError as err:
        raise SystemExit(
            f"error: jax.distributed.initialize failed ({err}). Pass --coordinator HOST:PORT "
            "--num-processes P --process-id I (or the JAX_COORDINATOR_ADDRESS / "
            "JAX_NUM_PROCESSES / JAX_PROCESS_ID variables), run under SLURM / Open MPI / Cloud "
            "TPU, or use --single-process."
        ) from err


def load_global_data(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, int]:
    """The full training/test data as numpy arrays (the same in every process)."""
    import numpy as np

    if args.dataset == "synthetic":
        s = args.samples or 4096
        rng = np.random.default_rng(args.seed + 1)
        w = rng.normal(size=(args.features, args.classes)) / np.sqrt(args.features)
        x = rng.normal(size=(s + 1024, args.features)).astype(np.float32)
        y = np.argmax(x @ w + 0.3 * rng.normal(size=(s + 1024, args.classes)), axis=1)
        y = y.astype(np.int32)
        return x[:s], y[:s], x[s:], y[s:], args.classes
    from apts_jax.data import load_dataset

    ds = load_dataset("fashion_mnist", args.data_dir, subset=(args.samples, None))
    return ds.train_x, ds.train_y, ds.test_x, ds.test_y, ds.num_classes


def run(args: argparse.Namespace) -> dict[str, Any]:
    setup_jax(args)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from _mlp import accuracy, cross_entropy, init_mlp

    from apts_jax import parallel

    me, procs = jax.process_index(), jax.process_count()
    chief = me == 0

    def log(msg: str) -> None:
        if chief:
            print(msg, flush=True)

    n_dev = jax.device_count()
    n_sub = args.subdomains or n_dev
    if n_sub % n_dev:
        raise SystemExit(
            f"error: --subdomains {n_sub} is not a multiple of the {n_dev} global devices; "
            "every device must hold the same number of subdomains."
        )
    layout = parallel.subdomain_layout(n_sub, jax.devices())
    mine = parallel.local_subdomains(layout)

    x, y, xt, yt, classes = load_global_data(args)
    m = args.minibatches
    per = x.shape[0] // (n_sub * m)  # samples per subdomain and minibatch
    if per < 1:
        raise SystemExit(f"error: {x.shape[0]} samples are too few for {n_sub} x {m} shards.")
    shard = per * m  # samples per subdomain and epoch
    used = shard * n_sub
    # This process's part: the shards of its subdomains, in order (the first `used` samples).
    x_loc = x[:used].reshape(n_sub, shard, -1)[mine].reshape(-1, x.shape[1])
    y_loc = y[:used].reshape(n_sub, shard)[mine].reshape(-1)

    sizes = [x.shape[1], *args.hidden, classes]
    params = init_mlp(jax.random.key(args.seed), sizes)  # same seed: identical in every process

    def loss_fn(p: Any, batch: Any) -> jax.Array:
        bx, by = batch
        return cross_entropy(p, bx, by)

    prog = parallel.make_apts(
        loss_fn, params, layout, local_steps=args.local_steps, model=args.model,
        memory_size=args.memory,
    )
    log(
        f"{procs} process(es), {n_dev} devices ({jax.devices()[0].platform}), "
        f"{jax.local_device_count()} local; N = {n_sub} subdomains ({layout.per_device}/device); "
        f"MLP {'-'.join(map(str, sizes))}; {used} samples ({shard}/subdomain), "
        f"{'APTS full batch' if m == 1 else f'SAPTS, {m} minibatches/epoch'}, "
        f"nu = {args.local_steps}, model {args.model}"
    )
    rng = np.random.default_rng([args.seed, me])

    def epoch_batches(epoch: int) -> list[Any]:
        if m == 1:
            return [parallel.split_data(layout, (x_loc, y_loc), process_local=True)]
        # Shuffle within each local subdomain shard, then cut every shard into m minibatches.
        order = np.stack([rng.permutation(shard) for _ in range(mine.size)])
        xs = np.take_along_axis(x_loc.reshape(mine.size, shard, -1), order[..., None], axis=1)
        ys = np.take_along_axis(y_loc.reshape(mine.size, shard), order, axis=1)
        return [
            parallel.split_data(
                layout,
                (xs[:, j * per:(j + 1) * per].reshape(-1, x.shape[1]),
                 ys[:, j * per:(j + 1) * per].reshape(-1)),
                process_local=True,
            )
            for j in range(m)
        ]

    full = epoch_batches(0) if m == 1 else None
    t0 = time.perf_counter()
    state = prog.init(params, full[0] if full else epoch_batches(0)[0])
    history = [float(state.value)]
    log(f"{'iter':>5} {'loss':>9} {'|grad|':>9} {'radius':>9} {'accepted':>9} {'time s':>7}")
    log(f"{0:5d} {history[0]:9.4f} {float(jnp.linalg.norm(state.grad)):9.2e} "
        f"{float(state.radius):9.2e} {'':>9} {0.0:7.1f}")
    for k in range(1, args.iterations + 1):
        if m == 1:
            state, stats = prog.step(state, full[0])
        else:
            for batch in epoch_batches(k):
                state, stats = prog.fresh_step(state, batch)
        history.append(float(state.value))
        if k % args.print_every == 0 or k == args.iterations:
            log(f"{k:5d} {history[-1]:9.4f} {float(stats.grad_norm):9.2e} "
                f"{float(state.radius):9.2e} {int(state.num_accepted):4d}/{int(state.count):<4d} "
                f"{time.perf_counter() - t0:7.1f}")
    # params are replicated: every process can read them; evaluate locally on process 0.
    flat = np.asarray(state.params)
    result = {"final_loss": history[-1], "wall_time_s": time.perf_counter() - t0}
    if chief:
        final = prog.unravel(jnp.asarray(flat))
        acc = float(jax.jit(accuracy)(final, jnp.asarray(xt), jnp.asarray(yt)))
        result["test_accuracy"] = acc
        log(f"done: loss {history[0]:.4f} -> {history[-1]:.4f}, test accuracy "
            f"{100 * acc:.2f} %, {int(state.num_accepted)}/{int(state.count)} APTS steps "
            f"accepted, {result['wall_time_s']:.1f} s")
        if args.save:
            np.savez(args.save, params=flat, history=np.asarray(history),
                     num_processes=procs, num_devices=n_dev, subdomains=n_sub)
    if not args.single_process:
        jax.distributed.shutdown()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.iterations < 1 or args.minibatches < 1:
        print("error: --iterations and --minibatches must be >= 1", file=sys.stderr)
        return 2
    try:
        run(args)
    except Exception as err:  # report the data-not-found case without a traceback
        from apts_jax.data import DatasetNotFoundError

        if isinstance(err, DatasetNotFoundError):
            print(f"error: {err} (or use --dataset synthetic)", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
