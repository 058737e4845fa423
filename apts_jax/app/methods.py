r"""The optimizers of ``apts-jax train``, each an ``(init, step, batches)`` triple (a
:class:`~apts_jax.app.trainer.Method`).

One *epoch* is:

* ``apts`` (full-batch APTS, :func:`apts_jax.parallel.make_apts` ``step``): a fixed number
  ``--iterations-per-epoch`` (default 10) of outer iterations on the whole (subset) training set,
  split into ``N`` equal shards (``n mod N`` trailing samples are left out);
* ``sapts`` (minibatch APTS, ``fresh_step``): one pass of :class:`apts_jax.data.OverlapSampler`
  over the training set: ``K`` minibatches of ``B`` slots, each split into ``N`` microbatches of
  ``B/N`` samples (microbatch ``i`` = shard ``i`` of the subdomain data); one outer iteration per
  minibatch. ``--iterations-per-epoch`` caps ``K``;
* ``tr`` (:func:`apts_jax.trust_region`): full batch — ``--iterations-per-epoch`` iterations on
  the whole training set (reusing :math:`f, \nabla f` of the accepted point); with
  ``--batch-size`` — one iteration per minibatch of :func:`apts_jax.data.plain_minibatches`,
  :math:`f, \nabla f` recomputed on each new minibatch;
* ``adam`` / ``sgd`` (:func:`optax.adam`, :func:`optax.sgd` with momentum): one step per
  minibatch of :func:`~apts_jax.data.plain_minibatches`;
* ``lbfgs`` (:func:`optax.lbfgs`, zoom line search): ``--iterations-per-epoch`` full-batch
  iterations.

Minibatch orders depend only on ``(seed, epoch)`` (``numpy.random.default_rng([seed, epoch])``),
the weights only on ``seed``; there is no other randomness.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax

from apts_jax.app.config import DEFAULTS, SUBDOMAIN_METHODS, TrainConfig, UsageError
from apts_jax.app.problem import Problem
from apts_jax.app.trainer import Method, StepReport
from apts_jax.data import OverlapSampler, plain_minibatches

__all__ = ["apts_method", "build_method", "lbfgs_method", "optax_method", "trust_region_method"]


def _per_epoch(cfg: TrainConfig, available: int | None = None) -> int:
    """Iterations per epoch: ``--iterations-per-epoch`` (full batch: its default), capped by the
    ``available`` minibatches of one pass."""
    if available is None:
        return cfg.iterations_per_epoch or DEFAULTS["iterations_per_epoch_full"]
    return min(available, cfg.iterations_per_epoch) if cfg.iterations_per_epoch else available


def _order(cfg: TrainConfig) -> str:
    return "L-SR1" if cfg.second_order else "first-order"


def _fresh_params(problem: Problem) -> Callable[[], Any]:
    return lambda: jax.tree.map(jnp.asarray, problem.params0)


def _plain_batches(cfg: TrainConfig, problem: Problem) -> Callable[[int], Iterator[Any]]:
    """The minibatches of :func:`~apts_jax.data.plain_minibatches` of an epoch, as host arrays."""

    def batches(epoch: int) -> Iterator[Any]:
        idx = plain_minibatches(problem.num_train, cfg.batch_size, seed=cfg.seed,
                                epoch=epoch - 1).indices
        return (problem.batch(i) for i in idx)

    return batches


def apts_method(cfg: TrainConfig, problem: Problem) -> Method:
    """Full-batch APTS (``apts``) or minibatch SAPTS (``sapts``) on a subdomain layout."""
    from apts_jax.parallel import make_apts, split_data, subdomain_layout

    layout = subdomain_layout(cfg.subdomains, cfg.devices)
    prog = make_apts(problem.loss_fn, problem.params0, layout, local_steps=cfg.local_steps,
                     model=cfg.tr_model, memory_size=cfg.memory, **cfg.apts_options())
    n_train, N = problem.num_train, cfg.subdomains
    where = f"{N} subdomains on {cfg.devices} device(s)"
    if cfg.optimizer == "apts":
        n_used = n_train - n_train % N
        data = split_data(layout, (problem.train_x[:n_used], problem.train_y[:n_used]))
        per_epoch = _per_epoch(cfg)
        samples = n_used
        label = (f"APTS, full batch ({n_used} samples, {n_used // N} per subdomain), {where}, "
                 f"{cfg.local_steps} local {_order(cfg)} TR steps, {per_epoch} outer iterations "
                 "per epoch")

        def batches(epoch: int) -> Iterator[Any]:
            return itertools.repeat(data)

        def init() -> Any:
            return prog.init(problem.params0, data)

        def step(state: Any, batch: Any) -> tuple[Any, StepReport]:
            state, st = prog.step(state, batch)
            return state, StepReport(st.value, st.radius, st.accepted,
                                     grad_evals_total=state.num_fun_evals)
    else:
        sampler = OverlapSampler(n_train, cfg.batch_size, N, overlap=cfg.overlap,
                                 subdomain_overlap=cfg.subdomain_overlap, seed=cfg.seed)
        k = sampler.batches_per_epoch
        per_epoch = _per_epoch(cfg, k)
        samples = cfg.batch_size
        pairs = cfg.curvature_pairs == "multi_batch"
        if pairs and sampler.pair_share == 0:
            raise UsageError(
                f"--curvature-pairs multi_batch: consecutive minibatches share "
                f"{sampler.overlap_size} samples, fewer than the {N} subdomains; raise --overlap "
                "or --batch-size"
            )
        label = (f"SAPTS, minibatches of {cfg.batch_size} = {N} x {sampler.microbatch_size} "
                 f"(overlap {sampler.overlap_size} with the next, {sampler.shared_size} shared by "
                 f"all subdomains), {where}, {cfg.local_steps} local {_order(cfg)} TR steps, "
                 f"{per_epoch} of {k} minibatches per epoch")
        if pairs:
            label += (f"; multi-batch curvature pairs on {N * sampler.pair_share} overlap "
                      "samples (2 evaluations of them per iteration, not in the data passes)")

        def batches(epoch: int) -> Iterator[Any]:
            # Sampler epochs are 0-based; microbatches[k] is (N, m): flattening it row by row and
            # letting split_data cut N equal shards puts microbatch i on subdomain i.
            micro = sampler.epoch(epoch - 1).microbatches
            if not pairs:
                return (split_data(layout, problem.batch(m.reshape(-1))) for m in micro)
            shared = sampler.overlap_batches(epoch - 1)  # (K, N, q): the same row-wise split
            return ((split_data(layout, problem.batch(m.reshape(-1))),
                     split_data(layout, problem.batch(o.reshape(-1))))
                    for m, o in zip(micro, shared, strict=True))

        def init() -> Any:
            first = next(iter(batches(1)))
            return prog.init(problem.params0, first[0] if pairs else first)

        def step(state: Any, batch: Any) -> tuple[Any, StepReport]:
            state, st = prog.fresh_step(state, *batch) if pairs else prog.fresh_step(state, batch)
            return state, StepReport(st.value, st.radius, st.accepted,
                                     grad_evals_total=state.num_fun_evals)

    return Method(
        name=cfg.optimizer, label=label, init=init, step=step, batches=batches,
        iterations_per_epoch=per_epoch, samples_per_eval=samples, num_train=n_train,
        params=lambda state: prog.unravel(state.params),
        radius=lambda state: float(state.radius),
    )


def trust_region_method(cfg: TrainConfig, problem: Problem) -> Method:
    """:func:`apts_jax.trust_region` on one device, full batch or minibatches."""
    from apts_jax import trust_region  # the top-level factory

    opt = trust_region(cfg.tr_model, cfg.memory)
    loss, n_train = problem.loss_fn, problem.num_train
    if cfg.batch_size is None:
        data = (jnp.asarray(problem.train_x), jnp.asarray(problem.train_y))
        per_epoch = _per_epoch(cfg)
        samples = n_train
        label = (f"{_order(cfg)} trust region, full batch ({n_train} samples), {per_epoch} "
                 "iterations per epoch")
        vg = optax.value_and_grad_from_state(loss)

        def batches(epoch: int) -> Iterator[Any]:
            return itertools.repeat(data)

        @jax.jit
        def update(carry, batch):
            params, state = carry
            value, grad = vg(params, batch, state=state)
            updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                        value_fn=lambda p: loss(p, batch))
            return optax.apply_updates(params, updates), state
    else:
        k = plain_minibatches(n_train, cfg.batch_size, seed=cfg.seed).indices.shape[0]
        per_epoch = _per_epoch(cfg, k)
        samples = cfg.batch_size
        label = (f"{_order(cfg)} trust region, minibatches of {cfg.batch_size} (f and its "
                 f"gradient re-evaluated on each), {per_epoch} of {k} per epoch")
        batches = _plain_batches(cfg, problem)

        @jax.jit
        def update(carry, batch):
            params, state = carry
            updates, state = opt.update(params, state, params, value=None, grad=None,
                                        value_fn=lambda p: loss(p, batch))
            return optax.apply_updates(params, updates), state

    def init() -> Any:
        params = _fresh_params(problem)()
        return params, opt.init(params)

    def step(carry: Any, batch: Any) -> tuple[Any, StepReport]:
        carry = update(carry, batch)
        s = carry[1]
        return carry, StepReport(s.value, s.radius, s.info.accepted,
                                 grad_evals_total=s.info.num_fun_evals)

    return Method(
        name="tr", label=label, init=init, step=step, batches=batches,
        iterations_per_epoch=per_epoch, samples_per_eval=samples, num_train=n_train,
        params=lambda carry: carry[0], radius=lambda carry: float(carry[1].radius),
    )


def optax_method(cfg: TrainConfig, problem: Problem) -> Method:
    """optax ``adam`` / ``sgd`` (momentum) on minibatches."""
    if cfg.optimizer == "adam":
        opt = optax.adam(cfg.lr)
        what = f"optax adam (lr {cfg.lr:g})"
    else:
        opt = optax.sgd(cfg.lr, momentum=cfg.momentum or None)
        what = f"optax sgd (lr {cfg.lr:g}, momentum {cfg.momentum:g})"
    loss, n_train = problem.loss_fn, problem.num_train
    k = n_train // cfg.batch_size
    per_epoch = _per_epoch(cfg, k)

    @jax.jit
    def update(carry, batch):
        params, state = carry
        value, grad = jax.value_and_grad(loss)(params, batch)
        updates, state = opt.update(grad, state, params)
        return (optax.apply_updates(params, updates), state), value

    def init() -> Any:
        params = _fresh_params(problem)()
        return params, opt.init(params)

    def step(carry: Any, batch: Any) -> tuple[Any, StepReport]:
        carry, value = update(carry, batch)
        return carry, StepReport(value)

    return Method(
        name=cfg.optimizer, label=f"{what}, minibatches of {cfg.batch_size}, {per_epoch} of {k} "
                                  "per epoch",
        init=init, step=step, batches=_plain_batches(cfg, problem),
        iterations_per_epoch=per_epoch, samples_per_eval=cfg.batch_size, num_train=n_train,
        params=lambda carry: carry[0],
    )


def lbfgs_method(cfg: TrainConfig, problem: Problem) -> Method:
    """:func:`optax.lbfgs` (zoom line search), full batch."""
    opt = optax.lbfgs(memory_size=cfg.memory)
    loss, n_train = problem.loss_fn, problem.num_train
    data = (jnp.asarray(problem.train_x), jnp.asarray(problem.train_y))
    per_epoch = _per_epoch(cfg)
    vg = optax.value_and_grad_from_state(loss)
    get = optax.tree_utils.tree_get

    @jax.jit
    def update(carry, batch):
        params, state = carry
        fresh = ~jnp.isfinite(get(state, "value"))
        value, grad = vg(params, batch, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                    value_fn=lambda p: loss(p, batch))
        evals = get(state, "num_linesearch_steps") + fresh.astype(jnp.int32)
        ok = get(state, "decrease_error") <= 0
        return (optax.apply_updates(params, updates), state), (get(state, "value"), ok, evals)

    def init() -> Any:
        params = _fresh_params(problem)()
        return params, opt.init(params)

    def step(carry: Any, batch: Any) -> tuple[Any, StepReport]:
        carry, (value, ok, evals) = update(carry, batch)
        return carry, StepReport(value, accepted=ok, grad_evals=evals)

    return Method(
        name="lbfgs",
        label=(f"optax L-BFGS (memory {cfg.memory}, zoom line search), full batch ({n_train} "
               f"samples), {per_epoch} iterations per epoch"),
        init=init, step=step, batches=lambda epoch: itertools.repeat(data),
        iterations_per_epoch=per_epoch, samples_per_eval=n_train, num_train=n_train,
        params=lambda carry: carry[0],
    )


def build_method(cfg: TrainConfig, problem: Problem) -> Method:
    """The :class:`~apts_jax.app.trainer.Method` of ``cfg.optimizer``."""
    if cfg.optimizer in SUBDOMAIN_METHODS:
        return apts_method(cfg, problem)
    if cfg.optimizer == "tr":
        return trust_region_method(cfg, problem)
    if cfg.optimizer in ("adam", "sgd"):
        return optax_method(cfg, problem)
    if cfg.optimizer == "lbfgs":
        return lbfgs_method(cfg, problem)
    raise UsageError(f"unknown optimizer {cfg.optimizer!r}")  # pragma: no cover
