r"""Running APTS on devices: subdomain layouts, the jitted outer step, SAPTS steps and the solver loop.

``N`` subdomains run on ``D`` devices (``N`` a multiple of ``D``) of a one-axis mesh: each device holds
a block of ``b = N / D`` subdomains, their data shards (a leading axis of size ``N`` on the data,
sharded over the mesh axis) and their local L-SR1 memories. Inside :func:`jax.shard_map` the local
phases of a block run under ``jax.vmap`` (no communication), block sums are plain sums, and the only
cross-device communication is ``lax.psum`` over the mesh axis — three gradient-sized all-reduces per
full-batch outer iteration (see :mod:`apts_jax.apts_transform`). The results do not depend on how the ``N``
subdomains are spread over devices (up to floating-point summation order).

* :func:`subdomain_layout` — the mesh and block size, with input checks;
* :func:`split_data` — reshape a data pytree into ``N`` equal shards and place them on the mesh
  (``process_local=True``: assemble them from each process's own shards);
* :func:`local_subdomains` — the subdomains whose shards this process holds (multi-host);
* :func:`make_apts` — ``init(params, data)``, ``step(state, data)`` (full batch, APTS) and
  ``fresh_step(state, data)`` (new data each step, SAPTS), all jitted;
* :func:`solve` — full-batch APTS as one jitted ``lax.while_loop``, returning params, state and
  per-iteration statistics.

Multi-host: call ``jax.distributed.initialize()`` in every process first; :func:`subdomain_layout`
then spans ``jax.devices()`` of all processes, and data must be given as global arrays: each
process loads the shards of its subdomains (:func:`local_subdomains`) and passes them to
``split_data(layout, local_data, process_local=True)`` (built on
:func:`jax.make_array_from_process_local_data`). Only replicated outputs (params, values, scalar
statistics) can be read in every process. See ``examples/multihost.py``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from apts_jax import _tree, _validate, ellipsoid
from apts_jax._tree import strong as _strong
from apts_jax.apts_transform import (
    APTSOptions,
    OuterState,
    init_norm,
    init_window,
    outer_step,
    resolve_options,
    to_varying,
)
from apts_jax.radius import DEFAULT_RADIUS_CONFIG, RadiusConfig
from apts_jax.tr import init_memory

__all__ = [
    "APTSProgram",
    "APTSRunState",
    "OuterStats",
    "SolveStats",
    "SubdomainLayout",
    "local_subdomains",
    "make_apts",
    "solve",
    "split_data",
    "subdomain_layout",
]


class SubdomainLayout(NamedTuple):
    """``N`` subdomains on the devices of a one-axis mesh.

    Attributes:
      mesh: the mesh (one axis, ``axis_name``).
      axis_name: the mesh axis that enumerates devices.
      num_subdomains: ``N``.
      per_device: ``b = N / D``.
    """

    mesh: jax.sharding.Mesh
    axis_name: str
    num_subdomains: int
    per_device: int


def subdomain_layout(
    num_subdomains: int,
    devices: Sequence[jax.Device] | int | None = None,
    axis_name: str = "subdomains",
) -> SubdomainLayout:
    """Lay ``num_subdomains`` subdomains out over ``devices`` (default: all devices).

    Args:
      num_subdomains: ``N >= 1``, a multiple of the number of devices.
      devices: a list of devices, a number ``D`` (the first ``D`` of ``jax.devices()``) or None:
        all devices, or, when ``N`` is not a multiple of their number, the largest number of
        them that divides ``N`` (with a ``UserWarning`` naming the idle devices).
      axis_name: name of the mesh axis.

    Raises:
      ValueError: ``N`` is not a positive integer or not a multiple of the device count.
    """
    if isinstance(num_subdomains, bool) or not isinstance(num_subdomains, int | np.integer) or (
        num_subdomains < 1
    ):
        raise ValueError(f"num_subdomains must be an integer >= 1, got {num_subdomains!r}.")
    all_devices = jax.devices()
    if devices is None:
        devs = list(all_devices)
        if num_subdomains % len(devs):
            # Use the largest device count that divides N, and say so: devices stay idle.
            d = max(k for k in range(1, len(devs) + 1) if num_subdomains % k == 0)
            warnings.warn(
                f"subdomain_layout: {num_subdomains} subdomains do not divide evenly over the "
                f"{len(devs)} available devices, so only {d} of them are used (each device runs "
                f"the same number of subdomains). Use a multiple of {len(devs)} subdomains, or "
                f"pass devices={d} to choose this explicitly.",
                stacklevel=2,
            )
            devs = devs[:d]
    elif isinstance(devices, int | np.integer):
        if devices < 1 or devices > len(all_devices):
            raise ValueError(
                f"devices={devices} but {len(all_devices)} device(s) are available; on CPU, "
                "simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=8 (or "
                "jax.config.update('jax_num_cpu_devices', 8)) before JAX starts."
            )
        devs = list(all_devices[: int(devices)])
    else:
        devs = list(devices)
    d = len(devs)
    if num_subdomains % d:
        raise ValueError(
            f"num_subdomains={num_subdomains} is not a multiple of the {d} device(s); use a "
            f"multiple of {d} subdomains (each device runs the same number) or fewer devices."
        )
    mesh = jax.sharding.Mesh(np.asarray(devs), (axis_name,))
    return SubdomainLayout(mesh, axis_name, int(num_subdomains), int(num_subdomains) // d)


def local_subdomains(layout: SubdomainLayout) -> np.ndarray:
    """Global indices (ascending) of the subdomains held by this process's devices.

    Subdomain ``i`` lives on the device at mesh position ``i // per_device``. In a single process
    this is ``arange(N)``; after ``jax.distributed.initialize`` each process holds the subdomains
    of its own devices (contiguous blocks when the mesh follows ``jax.devices()``, which lists the
    devices process by process). Use it to decide which samples a process loads for
    ``split_data(..., process_local=True)``: with the global data split into ``N`` consecutive
    shards of ``S/N`` samples, a process loads the shards ``local_subdomains(layout)``, in order.
    """
    me = jax.process_index()
    devices = list(layout.mesh.devices.flat)
    b = layout.per_device
    mine = [j for j, d in enumerate(devices) if d.process_index == me]
    return np.asarray([j * b + k for j in mine for k in range(b)], dtype=np.int64)


def _leading_count(data: Any, what: str) -> int:
    leaves_with_path = jax.tree_util.tree_flatten_with_path(data)[0]
    if not leaves_with_path:
        raise ValueError("data has no array leaves.")
    counts = set()
    for path, leaf in leaves_with_path:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"data leaf {_tree.path_str(path)} is a scalar; every leaf needs a leading "
                f"{what} axis."
            )
        counts.add(shape[0])
    if len(counts) != 1:
        raise ValueError(f"data leaves have different {what} counts {sorted(counts)}.")
    (count,) = counts
    return int(count)


def split_data(layout: SubdomainLayout, data: Any, *, process_local: bool = False) -> Any:
    """Reshape every leaf ``(S, ...)`` of ``data`` to ``(N, S/N, ...)`` and shard it over the mesh.

    Args:
      layout: the :class:`SubdomainLayout`.
      data: pytree of arrays with a common leading sample axis.
      process_local: False (default): ``data`` is the whole data set, identical in every process
        (in a multi-process run JAX checks this with a collective; every process holds all of
        it). True: ``data`` holds only *this process's* samples, the concatenated shards of the
        subdomains :func:`local_subdomains` in that order (``S_p = n_p * S/N`` samples for
        ``n_p`` local subdomains; every process must pass the same shard size ``S/N``); the
        global arrays are assembled with :func:`jax.make_array_from_process_local_data`, so no
        process needs the others' data. This is the way to feed multi-host runs (after
        ``jax.distributed.initialize``); in a single process both modes agree.

    Raises:
      ValueError: a leaf has no leading axis, leaves disagree on the sample count, ``S`` (or
        ``S_p``) is not divisible by ``N`` (or ``n_p``), or this process holds no subdomain.
    """
    n = layout.num_subdomains
    samples = _leading_count(data, "sample")
    sharding = NamedSharding(layout.mesh, P(layout.axis_name))
    if process_local:
        n_local = int(local_subdomains(layout).size)
        if n_local == 0:
            raise ValueError(
                f"process {jax.process_index()} has no device in the layout's mesh, so it holds "
                "no subdomain; build the layout over devices of every process "
                "(subdomain_layout(N) with N a multiple of jax.device_count())."
            )
        if samples % n_local:
            raise ValueError(
                f"{samples} process-local samples cannot be split into the {n_local} subdomain "
                f"shards of process {jax.process_index()}; pass a multiple of {n_local} samples."
            )
        shard = samples // n_local

        def place_local(leaf: Any) -> Array:
            arr = np.asarray(leaf)
            arr = arr.reshape((n_local, shard) + tuple(arr.shape[1:]))
            return jax.make_array_from_process_local_data(
                sharding, arr, (n, shard) + tuple(arr.shape[2:])
            )

        return jax.tree.map(place_local, data)

    if samples % n:
        raise ValueError(
            f"{samples} samples cannot be split into {n} equal shards; drop "
            f"{samples % n} sample(s) or choose a number of subdomains that divides {samples}."
        )

    def place(leaf: Any) -> Array:
        arr = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
        arr = arr.reshape((n, samples // n) + tuple(arr.shape[1:]))
        return jax.device_put(arr, sharding)

    return jax.tree.map(place, data)


class APTSRunState(NamedTuple):
    """State of a multi-device APTS run (global arrays; local parts carry a leading axis ``N``).

    Attributes:
      count: outer iterations done.
      params: flat :math:`\\theta` (replicated).
      value, grad: global :math:`f`, :math:`\\nabla f` at ``params``.
      local_value, local_grad: ``(N,)``, ``(N, n)`` per-subdomain values/gradients at ``params``.
      radius: global radius :math:`\\Delta`.
      local_memory: per-subdomain L-SR1 memories (leading axis ``N``) or None.
      global_memory: global L-SR1 memory or None.
      num_accepted, num_rejected: APTS steps accepted/rejected so far.
      num_fun_evals: value-and-gradient evaluations per subdomain so far (max over subdomains).
      window: the last accepted global values (``acceptance="nonmonotone"``; None otherwise).
      norm_state: the ellipsoidal norm's second moment (``norm="adaptive"``; None otherwise).
    """

    count: Array
    params: Array
    value: Array
    grad: Array
    local_value: Array
    local_grad: Array
    radius: Array
    local_memory: Any
    global_memory: Any
    num_accepted: Array
    num_rejected: Array
    num_fun_evals: Array
    window: Any = None
    norm_state: Any = None


class OuterStats(NamedTuple):
    """Diagnostics of one outer iteration (replicated scalars; ``local_iterations`` is ``(N,)``)."""

    value: Array
    radius: Array
    ratio: Array
    accepted: Array
    global_ratio: Array
    global_accepted: Array
    step_norm: Array
    predicted_decrease: Array
    actual_decrease: Array
    grad_norm: Array
    local_iterations: Array


class APTSProgram(NamedTuple):
    """Jitted APTS functions for one layout and loss (see :func:`make_apts`).

    Attributes:
      init: ``(params, data) -> APTSRunState`` (evaluates the loss once per subdomain).
      step: ``(state, data, pair=None) -> (state, OuterStats)``, one full-batch outer iteration.
      fresh_step: ``(state, data, pair=None) -> (state, OuterStats)``, one outer iteration on
        new data (SAPTS: first re-evaluates the values/gradients at the current params on
        ``data``).

    ``pair`` (``curvature_pairs="multi_batch"`` only): the samples that ``data`` shares with the
    next minibatch, split like ``data`` (:func:`split_data`, equal shares per subdomain, e.g.
    :meth:`apts_jax.data.OverlapSampler.overlap_batches`); the global memory's pair then has its
    gradients on them (two evaluations of the shares, not counted in ``num_fun_evals``, which
    counts evaluations of ``data``). None: on ``data`` itself, at no cost.
      unravel: flat params -> params pytree.
      layout: the :class:`SubdomainLayout`.
    """

    init: Callable[[Any, Any], APTSRunState]
    step: Callable[[APTSRunState, Any], tuple[APTSRunState, OuterStats]]
    fresh_step: Callable[[APTSRunState, Any], tuple[APTSRunState, OuterStats]]
    unravel: Callable[[Array], Any]
    layout: SubdomainLayout


def _state_specs(axis: str, model: str, options: APTSOptions) -> APTSRunState:
    rep, loc = P(), P(axis)
    mem_loc = None if model != "sr1" else loc
    mem_rep = None if model != "sr1" else rep
    return APTSRunState(
        count=rep, params=rep, value=rep, grad=rep, local_value=loc, local_grad=loc,
        radius=rep, local_memory=mem_loc, global_memory=mem_rep, num_accepted=rep,
        num_rejected=rep, num_fun_evals=rep,
        window=rep if options.acceptance == "nonmonotone" else None,
        norm_state=ellipsoid.DiagNormState(rep, rep) if options.norm == "adaptive" else None,
    )


def make_apts(
    loss_fn: Callable[[Any, Any], Array],
    params: Any,
    layout: SubdomainLayout,
    *,
    local_steps: int | None = None,
    model: str | None = None,
    memory_size: int = 5,
    radius: RadiusConfig = DEFAULT_RADIUS_CONFIG,
    initial_radius: float | None = None,
    min_radius: float | None = None,
    max_radius: float | None = None,
    eta1: float | None = None,
    eta2: float | None = None,
    shrink: float | None = None,
    grow: float | None = None,
    boundary_fraction: float | None = None,
    skip_tol: float = 1e-8,
    check_vma: bool = True,
    preset: str | APTSOptions | None = None,
    local_boundary: str | None = None,
    combine: str | None = None,
    acceptance: str | None = None,
    nonmonotone_window: int | None = None,
    norm: str | None = None,
    curvature_pairs: str | None = None,
    global_step: str | None = None,
) -> APTSProgram:
    """Build jitted APTS functions for ``loss_fn(params, shard) -> scalar`` on ``layout``.

    ``loss_fn`` is the mean loss over one subdomain's data shard (a leaf-wise slice of the data
    returned by :func:`split_data`); ``params`` (arrays or ``jax.ShapeDtypeStruct``) fixes the
    parameter structure. Everything else as in :func:`apts_jax.apts`, including ``preset``
    (``"paper"`` pins the paper's method) and the issue-11 options ``local_boundary``
    (``"ball"``/``"adaptive"``), ``combine`` (``"sum"``/``"mean"``), ``acceptance``
    (``"monotone"``/``"nonmonotone"``) with ``nonmonotone_window``, ``norm``,
    ``curvature_pairs`` and ``global_step`` (see :class:`apts_jax.apts_transform.APTSOptions`);
    without ``preset`` the default is ``"tuning_free"`` (first-order model), and ``model``
    replaces the preset's model when given. With ``curvature_pairs="multi_batch"`` ``step`` and
    ``fresh_step`` take the pair data as a third argument (see :class:`APTSProgram`).

    ``init`` raises ``ValueError`` when the initial loss or gradient is not finite.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
    options = resolve_options(
        preset, local_boundary=local_boundary, combine=combine, acceptance=acceptance,
        nonmonotone_window=nonmonotone_window, norm=norm, curvature_pairs=curvature_pairs,
        global_step=global_step, model=model, local_steps=local_steps, memory_size=memory_size,
    )
    model, local_steps = options.model, options.local_steps
    config = _validate.radius_config(
        radius, initial_radius=initial_radius, min_radius=min_radius, max_radius=max_radius,
        eta1=eta1, eta2=eta2, shrink=shrink, grow=grow, boundary_fraction=boundary_fraction,
    )
    skip_tol = _validate.skip_tol(skip_tol)
    spec = _tree.flat_spec(params)
    axis = layout.axis_name
    n_sub = layout.num_subdomains
    b = layout.per_device
    state_specs = _state_specs(axis, model, options)
    stats_specs = OuterStats(*([P()] * 10), local_iterations=P(axis))

    def shard_vg(z: Array, shard: Any) -> tuple[Array, Array]:
        """Loss and gradient of one subdomain at ``z`` (already varying over the mesh axis)."""
        v, g = jax.value_and_grad(lambda f: loss_fn(_tree.unravel(spec, f), shard))(z)
        return jnp.asarray(v, spec.dtype), g.astype(spec.dtype)

    def evaluate(x: Array, data_blk: Any) -> tuple[Array, Array, Array, Array]:
        xv = to_varying(x, axis)  # outside vmap: pcast cannot be batched over a vmap axis
        lv, lg = jax.vmap(lambda sh: shard_vg(xv, sh))(data_blk)
        packed = jnp.concatenate([lg, lv[:, None]], axis=1)
        mean = jax.lax.psum(jnp.sum(packed, axis=0), axis) / n_sub
        return lv, lg, mean[-1], mean[:-1]

    def init_body(x: Array, data_blk: Any) -> APTSRunState:
        lv, lg, v, g = evaluate(x, data_blk)
        dtype = spec.dtype
        mem = init_memory(model, spec.size, memory_size, dtype, options.norm)
        local_mem = None if mem is None else jax.tree.map(
            lambda a: to_varying(jnp.broadcast_to(a, (b,) + a.shape), axis), mem
        )
        zero_i = jnp.zeros((), jnp.int32)
        return APTSRunState(
            count=zero_i, params=x, value=v, grad=g, local_value=lv, local_grad=lg,
            radius=_strong(jnp.asarray(config.initial_radius, dtype)), local_memory=local_mem,
            global_memory=mem, num_accepted=zero_i, num_rejected=zero_i, num_fun_evals=zero_i + 1,
            window=init_window(options, dtype),
            norm_state=init_norm(options, spec.size, dtype),
        )

    def pair_grads(pair_blk: Any) -> Callable[[Array], Array] | None:
        """The block's gradients on its shares of the pair data (multi-batch pairs)."""
        if pair_blk is None:
            return None
        if options.curvature_pairs != "multi_batch":
            raise ValueError(
                "make_apts: pair data are used only with curvature_pairs='multi_batch'; call "
                "step/fresh_step without them, or build the program with "
                "curvature_pairs='multi_batch' (and model='sr1')."
            )
        return lambda xv: jax.vmap(lambda sh: shard_vg(xv, sh)[1])(pair_blk)

    def step_body(state: APTSRunState, data_blk: Any, pair_blk: Any = None
                  ) -> tuple[APTSRunState, OuterStats]:
        outer = OuterState(*(getattr(state, f) for f in OuterState._fields))
        out, info = outer_step(
            shard_vg, data_blk, outer,
            axis_name=axis, num_subdomains=n_sub, local_steps=local_steps, model=model,
            config=config, skip_tol=skip_tol, options=options, pair_grad=pair_grads(pair_blk),
        )
        evals = jax.lax.pmax(jnp.max(info.evaluations), axis)
        new = state._replace(
            **out._asdict(),
            count=state.count + 1,
            num_accepted=state.num_accepted + info.accepted.astype(jnp.int32),
            num_rejected=state.num_rejected + (~info.accepted).astype(jnp.int32),
            num_fun_evals=state.num_fun_evals + evals,
        )
        stats = OuterStats(
            value=out.value, radius=out.radius, ratio=info.ratio, accepted=info.accepted,
            global_ratio=info.global_ratio, global_accepted=info.global_accepted,
            step_norm=info.step_norm, predicted_decrease=info.predicted_decrease,
            actual_decrease=info.actual_decrease, grad_norm=jnp.linalg.norm(out.grad),
            local_iterations=info.local_iterations,
        )
        return new, stats

    def fresh_body(state: APTSRunState, data_blk: Any, pair_blk: Any = None
                   ) -> tuple[APTSRunState, OuterStats]:
        lv, lg, v, g = evaluate(state.params, data_blk)
        state = state._replace(
            value=v, grad=g, local_value=lv, local_grad=lg, num_fun_evals=state.num_fun_evals + 1
        )
        return step_body(state, data_blk, pair_blk)

    data_spec = P(axis)
    smap = functools.partial(jax.shard_map, mesh=layout.mesh, check_vma=check_vma)
    init_sm = jax.jit(smap(init_body, in_specs=(P(), data_spec), out_specs=state_specs))
    step_map = smap(step_body, in_specs=(state_specs, data_spec, data_spec),
                    out_specs=(state_specs, stats_specs))
    fresh_map = smap(fresh_body, in_specs=(state_specs, data_spec, data_spec),
                     out_specs=(state_specs, stats_specs))

    def step_fn(state: APTSRunState, data: Any, pair: Any = None) -> tuple[APTSRunState, OuterStats]:
        return step_map(state, data, pair)

    def fresh_fn(state: APTSRunState, data: Any, pair: Any = None
                 ) -> tuple[APTSRunState, OuterStats]:
        return fresh_map(state, data, pair)

    step_sm = jax.jit(step_fn, donate_argnums=0)
    fresh_sm = jax.jit(fresh_fn, donate_argnums=0)
    replicated = NamedSharding(layout.mesh, P())

    def init(params: Any, data: Any) -> APTSRunState:
        _tree.check_same_structure(spec, params, "params")
        x = _tree.ravel(spec, params)
        if not replicated.is_fully_addressable and getattr(x, "is_fully_addressable", False):
            # Multi-process: device_put rejects a committed local array for a mesh spanning
            # other processes' devices; a host copy is accepted (and checked to agree).
            x = np.asarray(x)
        x = jax.device_put(x, replicated)
        state = init_sm(x, data)
        if not isinstance(state.value, jax.core.Tracer):
            # Replicated: this process's copy (multi-host arrays are not fully addressable).
            value = float(np.asarray(state.value.addressable_data(0)))
            grad_norm = float(np.linalg.norm(np.asarray(state.grad.addressable_data(0))))
            if not (np.isfinite(value) and np.isfinite(grad_norm)):
                raise ValueError(
                    f"make_apts: the loss at the initial params is not finite (global loss "
                    f"{value}, gradient norm {grad_norm}); APTS cannot start there. Check the "
                    "data (NaN/Inf entries) and the initial params, e.g. "
                    "jnp.isfinite(loss_fn(params, shard)) for every shard."
                )
        return state

    return APTSProgram(
        init=init,
        step=step_sm,
        fresh_step=fresh_sm,
        unravel=functools.partial(_tree.unravel, spec),
        layout=layout,
    )


class SolveStats(NamedTuple):
    """Statistics of :func:`solve` (histories have one entry per outer iteration, NaN-padded).

    Attributes:
      iterations: outer iterations run.
      value: final global loss.
      grad_norm: final global gradient norm.
      radius: final radius.
      num_accepted, num_rejected: APTS steps accepted/rejected.
      num_fun_evals: value-and-gradient evaluations per subdomain.
      value_history, radius_history, ratio_history: per outer iteration (after the iteration).
      accepted_history: bool per outer iteration (False past ``iterations``).
    """

    iterations: Array
    value: Array
    grad_norm: Array
    radius: Array
    num_accepted: Array
    num_rejected: Array
    num_fun_evals: Array
    value_history: Array
    radius_history: Array
    ratio_history: Array
    accepted_history: Array


def solve(
    loss_fn: Callable[[Any, Any], Array],
    params: Any,
    data: Any,
    *,
    subdomains: int,
    devices: Sequence[jax.Device] | int | None = None,
    max_iterations: int = 100,
    gtol: float = 1e-6,
    local_steps: int | None = None,
    model: str | None = None,
    memory_size: int = 5,
    check_vma: bool = True,
    radius: RadiusConfig = DEFAULT_RADIUS_CONFIG,
    preset: str | APTSOptions | None = None,
    local_boundary: str | None = None,
    combine: str | None = None,
    acceptance: str | None = None,
    nonmonotone_window: int | None = None,
    norm: str | None = None,
    curvature_pairs: str | None = None,
    global_step: str | None = None,
    **radius_constants: float,
) -> tuple[Any, APTSRunState, SolveStats]:
    """Full-batch APTS on ``subdomains`` equal data shards as one jitted ``lax.while_loop``.

    Args:
      loss_fn: ``loss_fn(params, shard) -> scalar``, the mean loss over one shard of ``data``.
      params: initial parameters (pytree of float arrays).
      data: pytree of arrays with a common leading sample axis, split into ``subdomains`` shards.
      subdomains: ``N``.
      devices: devices to use (list or count; default: all, or the most that divide ``N``).
      max_iterations: outer-iteration budget.
      gtol: stop when ``||grad|| <= gtol * max(1, ||grad_0||)``.
      local_steps, model, memory_size, check_vma: see :func:`make_apts`.
      radius: the radius constants (:class:`apts_jax.radius.RadiusConfig`).
      preset, local_boundary, combine, acceptance, nonmonotone_window, norm, curvature_pairs,
      global_step:
        the issue-11 options (see :func:`make_apts`, :class:`apts_jax.apts_transform.APTSOptions`).
      **radius_constants: ``initial_radius``, ``min_radius``, ... replacing fields of ``radius``
        (see :func:`apts_jax.apts`).

    Returns:
      ``(params, state, stats)``.
    """
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or (
        max_iterations < 1
    ):
        raise ValueError(f"max_iterations must be an integer >= 1, got {max_iterations!r}.")
    gtol = _validate.gtol(gtol)
    options = resolve_options(
        preset, local_boundary=local_boundary, combine=combine, acceptance=acceptance,
        nonmonotone_window=nonmonotone_window, norm=norm, curvature_pairs=curvature_pairs,
        global_step=global_step, model=model, local_steps=local_steps, memory_size=memory_size,
    )  # validated before any device work
    layout = subdomain_layout(subdomains, devices)
    sharded = split_data(layout, data)
    prog = make_apts(
        loss_fn, params, layout, memory_size=memory_size,
        check_vma=check_vma, radius=radius, preset=options, **radius_constants,
    )
    state = prog.init(params, sharded)
    state, stats = _solve_loop(prog, state, sharded, max_iterations, float(gtol))
    return prog.unravel(state.params), state, stats


def _solve_loop(
    prog: APTSProgram, state: APTSRunState, data: Any, max_iterations: int, gtol: float
) -> tuple[APTSRunState, SolveStats]:
    dtype = state.params.dtype

    @jax.jit
    def run(state: APTSRunState, data: Any) -> tuple[APTSRunState, SolveStats]:
        target = gtol * jnp.maximum(1.0, jnp.linalg.norm(state.grad))
        hist = jnp.full((max_iterations,), jnp.nan, dtype)
        carry0 = (state, hist, hist, hist, jnp.zeros((max_iterations,), bool), jnp.int32(0))

        def cond(c: Any) -> Array:
            st, *_, k = c
            converged = jnp.linalg.norm(st.grad) <= target
            return (k < max_iterations) & ~converged

        def body(c: Any) -> Any:
            st, hv, hr, hq, ha, k = c
            st, s = prog.step(st, data)
            return (st, hv.at[k].set(s.value), hr.at[k].set(s.radius), hq.at[k].set(s.ratio),
                    ha.at[k].set(s.accepted), k + 1)

        st, hv, hr, hq, ha, k = jax.lax.while_loop(cond, body, carry0)
        stats = SolveStats(
            iterations=k, value=st.value, grad_norm=jnp.linalg.norm(st.grad), radius=st.radius,
            num_accepted=st.num_accepted, num_rejected=st.num_rejected,
            num_fun_evals=st.num_fun_evals, value_history=hv, radius_history=hr,
            ratio_history=hq, accepted_history=ha,
        )
        return st, stats

    return run(state, data)
