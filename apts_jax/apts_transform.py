r"""Data-parallel APTS: the additively preconditioned trust-region strategy (the paper's Algorithm 1).

Cruz Alegría, Trotti, Kopaničáková & Krause, *Data-Parallel Neural Network Training via Nonlinearly
Preconditioned Trust-Region Method*. ``N`` subdomains each own a data shard :math:`D_i` and a copy of
the parameters. One outer iteration from :math:`\theta_k` with global radius :math:`\Delta_k`:

1. global value and gradient :math:`f(\theta_k; D)`, :math:`g = \nabla f(\theta_k; D)` as the mean of
   the subdomains' local values and gradients (equal shard sizes);
2. every subdomain, in parallel and without communication, runs at most :math:`\nu` trust-region
   iterations on

   .. math:: f_i(\theta) = f(\theta; D_i) + \langle r_i, \theta - \theta_k\rangle, \qquad
             r_i = g - \nabla f(\theta_k; D_i),

   whose first gradient is the global one (eq. 3–4; the consistency term enters the value *and* the
   gradient), from radius :math:`\Delta_k/N`, with every trial kept inside the ball
   :math:`\|\theta - \theta_k\| \le \Delta_k/N` (each local radius is capped by what is left of it),
   and stops early when the accumulated local step :math:`s_i` reaches that boundary. Each
   subdomain keeps its own L-SR1 memory across outer iterations;
3. :math:`\tilde s = \sum_i s_i` (one ``psum``; :math:`\|\tilde s\| \le \Delta_k` by eq. 5) and the
   predicted decrease :math:`\sum_i f_i(\theta_k) - f_i(\theta_k + s_i)`;
4. :math:`\rho = (f(\theta_k) - f(\theta_k + \tilde s)) / \text{predicted}` (eq. 6), guarded:
   :math:`\rho = -\infty` when the predicted decrease is :math:`\le 0` or not finite or the trial is
   not finite. Accept :math:`\tilde\theta = \theta_k + \tilde s` iff :math:`\rho \ge \eta_1`; radius
   eq. 7: :math:`\min(\beta\Delta, \Delta_{\max})` if :math:`\rho > \eta_2`,
   :math:`\max(\alpha\Delta, \Delta_{\min})` if :math:`\rho < \eta_1`, else unchanged;
5. one global trust-region iteration (:func:`apts_jax.tr.iteration`, global L-SR1 memory)
   from :math:`\tilde\theta` with :math:`\tilde\Delta` gives :math:`\theta_{k+1}`, :math:`\Delta_{k+1}`.

Every value and gradient is reused: the global and local values and gradients at the point accepted
in step 5 serve step 1 of the next iteration (for full-batch APTS: :mod:`apts_jax.parallel`'s
``step``, or :func:`apts` with ``reuse_value_and_grad=True``), and the scalar reductions ride
along with the vector ones. An outer iteration therefore performs exactly **three gradient-sized
all-reduces**, whatever :math:`\nu`: the summed local steps, the global gradient at
:math:`\theta_k + \tilde s`, and the global gradient at the trial point of step 5 (a fourth
reduces the caller's values and gradients when the data change, as in SAPTS and :func:`apts`'s
default). Per subdomain it costs :math:`\le \nu + 2` value-and-gradient evaluations on the local
shard.

The decisions (acceptance, radii) use reduced, replicated quantities, so all subdomains agree.

Options (issue 11). The choices that the paper's text leaves open are fields of
:class:`APTSOptions` (keywords of :func:`apts`, :func:`apts_jax.parallel.make_apts` and
:func:`apts_jax.parallel.solve`): ``local_boundary`` (``"ball"`` as above, or ``"adaptive"``: the
local radius starts at :math:`\Delta_k/N` and adapts up to :math:`\Delta_{\max}/N`, so eq. 5's
bound :math:`\|\tilde s\| \le \Delta_k` no longer holds and the ratio test alone guards the
step), ``combine`` (``"sum"`` as above, or ``"mean"``: :math:`\tilde s` and the predicted
decrease are means, the local radius is :math:`\Delta_k`), ``acceptance`` (``"monotone"`` as
above, or ``"nonmonotone"``: eq. 6's actual decrease from the maximum of the last ``W`` accepted
values), ``norm`` (``"l2"`` or the ellipsoidal ``"adaptive"`` norm), ``model`` (``"sr1"`` or
``"first_order"``), ``global_step`` (``"tr"``: step 5 as above; ``"none"``: without it) and
``curvature_pairs`` (``"same_batch"``: the global memory takes step 5's pair; ``"multi_batch"``:
one pair over the whole outer step, its gradients on the data that consecutive minibatches
share). :data:`PAPER` (``preset="paper"``) is the method described above, exactly. The default
(:data:`DEFAULT_OPTIONS` = :data:`TUNING_FREE`, ``preset="tuning_free"``) is the configuration
that came closest to a learning-rate-tuned Adam without tuning (``benchmarks/tuning_free.py``):
first-order model, adaptive local boundary, mean combination, ellipsoidal norm, :math:`\nu = 10`
(``local_steps`` is a field of the presets too).

Layout. The core, :func:`outer_step`, maps an :class:`OuterState` to the next one through named
steps (local phases, summed step, :func:`ratio_test` for eq. 6–7, global iteration) and works on
a *block* of ``b`` subdomains held by one program instance (a leading axis of size ``b`` on
everything local), reduces over the block with a plain sum and across instances with
``lax.psum`` over ``axis_name`` (a mesh axis of :func:`jax.shard_map`, a
``pmap`` axis, or a tuple of them). :func:`apts` (also ``apts_jax.apts``) is the optax face with
``b = 1`` (one subdomain per mapped instance); :mod:`apts_jax.parallel` runs ``N`` subdomains on
``D`` devices with ``b = N/D``. This module was ``apts_jax.apts`` before the factory took that
name (``from apts_jax.apts import ...`` still works through an alias).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import Array

from apts_jax import _tree, _validate, ellipsoid
from apts_jax import radius as radius_lib
from apts_jax._tree import strong as _strong
from apts_jax._vma import match_vma, varying_axes
from apts_jax.lsr1 import LSR1Memory
from apts_jax.radius import DEFAULT_RADIUS_CONFIG, RadiusConfig
from apts_jax.tr import init_memory, iteration, offer_pair

__all__ = [
    "DEFAULT_OPTIONS",
    "PAPER",
    "PRESETS",
    "TUNING_FREE",
    "APTSInfo",
    "APTSOptions",
    "APTSState",
    "LocalResult",
    "OuterInfo",
    "OuterState",
    "RatioTest",
    "apts",
    "apts_state_specs",
    "default_minibatch",
    "init_window",
    "local_phase",
    "outer_step",
    "ratio_test",
    "resolve_options",
    "to_varying",
]

AxisName = Any  # a hashable axis name or a tuple of them


# ----------------------------------------------------------------------------------------------
# Options (issue 11: the choices the paper's text leaves open)
# ----------------------------------------------------------------------------------------------


class APTSOptions(NamedTuple):
    r"""The open choices of APTS (issue 11), one frozen record; the defaults are :data:`PAPER`.

    Attributes:
      local_boundary: ``"ball"`` (paper): every local phase stays in the ball of radius
        :math:`\Delta_k/N` (its radius is capped by what is left of it) and stops when
        :math:`\|s_i\|` reaches it, so :math:`\|\tilde s\| \le \Delta_k` (eq. 5).
        ``"adaptive"`` (the authors' code): the local TR starts at :math:`\Delta_k/N`, adapts its
        own radius up to :math:`\bar\Delta/N` (:math:`\bar\Delta` = ``max_radius``), runs its
        :math:`\nu` steps and stops early only when :math:`\|s_i\|` reaches
        :math:`\bar\Delta/N`. **Eq. 5's bound** :math:`\|\tilde s\| \le \Delta_k` **no
        longer holds** (only :math:`\|\tilde s\| \le \bar\Delta`); the ratio test of the
        combined step is its only guard.
      combine: ``"sum"`` (paper): :math:`\tilde s = \sum_i s_i`, local radius
        :math:`\Delta_k/N`, predicted decrease :math:`\sum_i (f_i(\theta_k) - f_i(\theta_k +
        s_i))`. ``"mean"``: :math:`\tilde s = \frac1N\sum_i s_i`, local radius
        :math:`\Delta_k` (the combined step stays in the ball, the local steps are not shrunk
        N-fold), predicted decrease the *mean* of the local decreases. Since every
        :math:`\nabla f_i(\theta_k) = \nabla f(\theta_k)`, both predictions agree with
        :math:`-\nabla f(\theta_k)^\top\tilde s` to first order, so :math:`\rho \to 1` as
        :math:`\Delta \to 0` for either.
      acceptance: ``"monotone"`` (paper): :math:`\rho = (f(\theta_k) - f(\theta_k + \tilde
        s)) / \text{pred}`. ``"nonmonotone"``: the actual decrease is measured from the maximum
        of the last ``nonmonotone_window`` accepted global values (the current one included),
        :math:`\rho = (\max_{0 \le j < W} f(\theta_{k-j}') - f(\theta_k + \tilde s)) /
        \text{pred}`, as in NAPTS (arXiv 2605.14860); it drives both acceptance and eq. 7. Only
        the APTS step uses it; the global TR iteration (step 5) stays monotone. The state carries
        the window (replicated); a value enters it whenever the iterate moves. With minibatches
        (SAPTS) the window holds values of earlier batches, as in NAPTS.
      nonmonotone_window: :math:`W \ge 1` (``W = 1`` is the monotone test). Default 5.
      norm: ``"l2"`` (paper): :math:`\|s\|_2 \le \Delta`. ``"adaptive"``: the ellipsoid
        :math:`\|D^{1/2}s\|_2 \le \Delta`, :math:`D = \operatorname{diag}(\sqrt{\hat v} +
        \epsilon)` with :math:`\hat v` Adam's bias-corrected running mean of the squared *global*
        gradients (:math:`\beta_2 = 0.999`, :math:`\epsilon = 10^{-8}`), folded in once per outer
        iteration at :math:`\theta_k`; one :math:`D` serves the local phases and the global step
        of that iteration (Kohler, Adolphs & Lucchi, arXiv:1905.09201; :mod:`apts_jax.ellipsoid`:
        OBS in the scaled variables, L-SR1 pairs stored unscaled). Every radius, the local caps
        and eq. 5's bound are then in the scaled norm (:math:`D` has the units of a gradient, so
        the radius constants mean something else than for ``"l2"``).
      curvature_pairs: where the *global* L-SR1 memory's secant pairs come from.
        ``"same_batch"`` (paper): the pair of the global TR iteration (step 5),
        :math:`(s_g, \nabla f(\tilde\theta + s_g) - \nabla f(\tilde\theta))`, both gradients
        on the iteration's batch. ``"multi_batch"`` (Berahas, Nocedal & Takáč, "A multi-batch
        L-BFGS method for machine learning", NeurIPS 2016): one pair per outer iteration over
        the whole outer step, :math:`s_k = \theta_{k+1} - \theta_k`, :math:`y_k =
        \nabla f_{O_k}(\theta_{k+1}) - \nabla f_{O_k}(\theta_k)` with :math:`O_k` the
        samples the iteration's minibatch shares with the next one (the ``pair`` data of the
        factories: two gradient evaluations on :math:`O_k` and one more gradient-sized
        all-reduce per outer iteration). Without pair data :math:`O_k` is the iteration's own
        batch (full-batch APTS: the next batch is the same), and the pair costs no evaluation
        (:math:`\nabla f(\theta_{k+1})` and :math:`\nabla f(\theta_k)` on that batch are
        known). Offered at every outer iteration through the SR1 skip rule; when both steps
        were rejected :math:`s_k = 0` and nothing is stored. Needs ``model="sr1"`` and
        ``global_step="tr"``. The local phases keep their same-batch pairs (their gradients
        are on the subdomain's own data, at no extra cost).
      model: the trust-region model of the local phases and the global step, ``"sr1"`` (paper:
        L-SR1 with the OBS subproblem solver) or ``"first_order"`` (the step to the boundary
        along :math:`-g`, in the trust-region norm). The ``model`` argument of the factories
        replaces it when given.
      global_step: ``"tr"`` (paper): step 5, one global trust-region iteration from
        :math:`\tilde\theta` with radius :math:`\tilde\Delta`, which also sets
        :math:`\Delta_{k+1}`. ``"none"``: no step 5, :math:`\theta_{k+1} = \tilde\theta`,
        :math:`\Delta_{k+1} = \tilde\Delta` (eq. 7 of the APTS step alone); one evaluation
        less per outer iteration, the global L-SR1 memory is left unused.
      local_steps: :math:`\nu`, the most local trust-region iterations per subdomain and outer
        iteration (paper: 5). The ``local_steps`` argument of the factories replaces it when
        given.
    """

    local_boundary: str = "ball"
    combine: str = "sum"
    acceptance: str = "monotone"
    nonmonotone_window: int = 5
    norm: str = "l2"
    curvature_pairs: str = "same_batch"
    model: str = "sr1"
    global_step: str = "tr"
    local_steps: int = 5


PAPER = APTSOptions()
"""The paper's method (Algorithm 1 as written): L-SR1 model, ball local boundary, summed steps,
monotone test, L2 norm, same-batch curvature pairs, :math:`\nu = 5`. ``preset="paper"`` pins
it."""

TUNING_FREE = APTSOptions(
    local_boundary="adaptive", combine="mean", norm="adaptive", model="first_order",
    local_steps=10,
)
"""The library's default (issue 11; ``preset="tuning_free"``): the first-order model, the authors'
adaptive local boundary, the mean of the local steps and the ellipsoidal (Adam-scaled) norm,
:math:`\nu = 10` local steps; monotone acceptance. Chosen by ``benchmarks/tuning_free.py`` as the
configuration with the smallest *worst* gap to a learning-rate-tuned Adam over four problems
(README, "Tuning-free defaults"); with SAPTS it goes with minibatches of ``max(256, B/16)`` for
a paper batch ``B`` (:func:`default_minibatch`). :math:`\nu = 10` replaced the paper's 5 after
the full protocol on the four problems (worst gap 4.4 against 9.2 tolerance units at
:math:`N = 2`; level at :math:`N = 1`)."""

#: Named presets accepted by ``preset=...``.
PRESETS: dict[str, APTSOptions] = {"paper": PAPER, "tuning_free": TUNING_FREE}

#: The options used when neither ``preset`` nor an option keyword is given (one place).
DEFAULT_OPTIONS = TUNING_FREE

#: The paper's SAPTS minibatch (10,000 samples) and the tuning-free rule's floor (256 samples).
PAPER_MINIBATCH = 10_000
MIN_DEFAULT_MINIBATCH = 256


def default_minibatch(num_train: int, num_subdomains: int = 1, *, paper_batch: int = PAPER_MINIBATCH,
                      floor: int = MIN_DEFAULT_MINIBATCH) -> int:
    """The SAPTS minibatch that goes with :data:`TUNING_FREE`: ``max(floor, min(paper_batch,
    num_train) // 16)``, rounded down to a multiple of ``num_subdomains`` and at most
    ``num_train`` (625 → 624 samples for N = 4 on a 60,000-sample set).

    The 16-fold reduction of the paper's 10,000 with a floor of 256 is the minibatch rule of the
    chosen configuration (``benchmarks/tuning_free.py``, ``fo-adaptive-mean-ell-b16x-min256`` and
    its ``-nu10`` variant).
    """
    for name, v in (("num_train", num_train), ("num_subdomains", num_subdomains),
                    ("paper_batch", paper_batch), ("floor", floor)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"default_minibatch: {name}={v!r} must be a positive int.")
    if num_train < num_subdomains:
        raise ValueError(
            f"default_minibatch: {num_train} samples cannot be split into {num_subdomains} "
            "subdomains; use fewer subdomains or more data."
        )
    b = min(num_train, max(floor, min(paper_batch, num_train) // 16))
    return max(num_subdomains, b - b % num_subdomains)


def resolve_options(
    preset: str | APTSOptions | None = None,
    *,
    local_boundary: str | None = None,
    combine: str | None = None,
    acceptance: str | None = None,
    nonmonotone_window: int | None = None,
    norm: str | None = None,
    curvature_pairs: str | None = None,
    global_step: str | None = None,
    model: str | None = None,
    local_steps: int | None = None,
    memory_size: int | None = None,
) -> APTSOptions:
    """The validated :class:`APTSOptions`: ``preset`` (a name of :data:`PRESETS`, an
    :class:`APTSOptions`, or None for :data:`DEFAULT_OPTIONS`) with the keywords that are not
    None replacing its fields. With ``memory_size`` (the factories' L-SR1 memory) the resolved
    model is checked together with it. Raises ``ValueError``/``TypeError`` naming the bad
    value."""
    if preset is None:
        base = DEFAULT_OPTIONS
    elif isinstance(preset, APTSOptions):
        base = preset
    elif isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; use one of {sorted(PRESETS)}.")
        base = PRESETS[preset]
    else:
        raise TypeError(
            f"preset must be a preset name {sorted(PRESETS)} or an apts_jax.APTSOptions, got "
            f"{type(preset).__name__}."
        )
    given = {
        k: v for k, v in dict(
            local_boundary=local_boundary, combine=combine, acceptance=acceptance,
            nonmonotone_window=nonmonotone_window, norm=norm, curvature_pairs=curvature_pairs,
            global_step=global_step, model=model, local_steps=local_steps,
        ).items() if v is not None
    }
    options = _validate.apts_options(base._replace(**given))
    if memory_size is not None:
        _validate.model(options.model, memory_size)
    return options


# ----------------------------------------------------------------------------------------------
# Collectives
# ----------------------------------------------------------------------------------------------


def _axes(axis_name: AxisName) -> tuple[Any, ...]:
    return tuple(axis_name) if isinstance(axis_name, tuple | list) else (axis_name,)


def _manual_axes() -> frozenset[Any]:
    """Mesh axes that are manual (inside ``shard_map``) at trace time."""
    try:
        mesh = jax.sharding.get_abstract_mesh()
        return frozenset(getattr(mesh, "manual_axes", ()) or ())
    except Exception:  # pragma: no cover - very old/new JAX without abstract meshes
        return frozenset()


def _vma_checked_axes(axis_name: AxisName | None) -> frozenset[Any]:
    """Axes of ``axis_name`` whose values carry varying types (``shard_map`` with ``check_vma=True``).

    ``pmap`` (which runs as a ``shard_map`` with ``check_vma=False``) and ``shard_map(...,
    check_vma=False)`` bind manual mesh axes too, but nothing is typed varying there; the
    ``axis_index`` of an axis is varying exactly when the check is on.
    """
    if axis_name is None:
        return frozenset()
    manual = _manual_axes()
    return frozenset(
        a for a in _axes(axis_name)
        if a in manual and a in varying_axes(jax.lax.axis_index(a))
    )


def to_varying(tree: Any, axis_name: AxisName) -> Any:
    """Mark replicated values as device-varying over the manual mesh axes of ``axis_name``.

    Inside ``jax.shard_map`` with ``check_vma=True``, ``jax.grad`` with respect to a *replicated*
    input returns the sum over devices of the local gradients (the transpose of the implicit
    broadcast is a ``psum``). Local computations therefore start from ``lax.pcast(x, axis,
    to="varying")``; loop carries that start from replicated values need it too. Axes that are not
    manual mesh axes (``vmap``/``pmap`` names, or ``check_vma=False``) are left alone.
    """
    manual = _manual_axes()
    axes = tuple(a for a in _axes(axis_name) if a in manual)
    if not axes:
        return tree

    def cast(x: Any) -> Any:
        if not isinstance(x, jax.Array | jax.core.Tracer):
            return x
        missing = tuple(a for a in axes if a not in varying_axes(x))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def _all_sum(x: Array, axis_name: AxisName | None) -> Array:
    """Sum over the local block (leading axis) and across program instances."""
    x = jnp.sum(x, axis=0)
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _num_instances(axis_name: AxisName | None) -> int:
    return 1 if axis_name is None else int(jax.lax.axis_size(_axes(axis_name)))


# ----------------------------------------------------------------------------------------------
# The local phase (one subdomain, no communication)
# ----------------------------------------------------------------------------------------------


class LocalResult(NamedTuple):
    step: Array  # s_i = theta_i - theta_k, ||s_i|| <= cap
    decrease: Array  # f_i(theta_k) - f_i(theta_k + s_i)
    memory: LSR1Memory | None
    iterations: Array  # local TR iterations run (int32)
    accepted: Array  # local steps accepted (int32)


def local_phase(
    local_value_and_grad: Callable[[Array], tuple[Array, Array]],
    theta: Array,
    local_value: Array,
    local_grad: Array,
    global_grad: Array,
    cap: Array,
    memory: LSR1Memory | None,
    *,
    local_steps: int,
    model: str,
    config: RadiusConfig,
    skip_tol: float,
    initial_radius: Array | None = None,
    d_half: Array | None = None,
) -> LocalResult:
    r"""At most ``local_steps`` trust-region iterations on :math:`f_i` inside the ball of radius ``cap``.

    :math:`f_i(x) = f(x; D_i) + \langle r_i, x - \theta_k\rangle`, :math:`\nabla f_i = \nabla f(x;
    D_i) + r_i`, :math:`r_i = g - \nabla f(\theta_k; D_i)`. The iteration ``j`` uses the radius
    :math:`\min(\Delta_{i,j}, \text{cap} - \|x_j - \theta_k\|)`, so :math:`\|s_i\| \le` ``cap``
    holds by the triangle inequality; the local radius starts at ``initial_radius`` (default
    ``cap``: the paper's ball) and never exceeds ``cap``; the phase stops early when
    :math:`\|s_i\|` reaches ``cap``. With ``d_half`` (``norm="adaptive"``) every norm here is the
    scaled one, :math:`\|D^{1/2}\cdot\|` (:func:`apts_jax.tr.iteration`), with the same bound.
    """
    r = global_grad - local_grad

    def norm(v: Array) -> Array:
        return jnp.linalg.norm(v) if d_half is None else jnp.linalg.norm(d_half * v)

    def value_and_grad(x: Array) -> tuple[Array, Array]:
        v, g = local_value_and_grad(x)
        return v + jnp.vdot(r, x - theta), g + r

    local_config = config._replace(
        max_radius=cap, min_radius=jnp.minimum(config.min_radius, cap)
    )
    stop_at = (1.0 - 1e-3) * cap

    class Carry(NamedTuple):
        x: Array
        value: Array
        grad: Array
        radius: Array
        memory: Any
        dist: Array  # ||x - theta_k||, carried: one norm per iteration
        j: Array
        accepted: Array
        done: Array

    def cond(c: Carry) -> Array:
        return (c.j < local_steps) & ~c.done

    def body(c: Carry) -> Carry:
        left = cap - c.dist
        res = iteration(
            value_and_grad,
            c.x,
            c.value,
            c.grad,
            jnp.maximum(jnp.minimum(c.radius, left), 0.0),
            c.memory,
            model=model,
            config=local_config,
            skip_tol=skip_tol,
            d_half=d_half,
        )
        dist = norm(res.params - theta)
        return Carry(
            res.params,
            res.value,
            res.grad,
            jnp.minimum(res.radius, cap),
            res.memory,
            dist,
            c.j + 1,
            c.accepted + res.accepted.astype(jnp.int32),
            dist >= stop_at,
        )

    init = Carry(
        theta,
        local_value,
        local_grad + r,
        cap if initial_radius is None else jnp.minimum(initial_radius, cap),
        memory,
        jnp.zeros_like(cap),
        jnp.zeros((), jnp.int32),
        jnp.zeros((), jnp.int32),
        jnp.zeros((), bool),
    )
    # Every carry varies like the local data (check_vma: loop carries keep their type).
    init = match_vma(init, local_grad, local_value)
    out = jax.lax.while_loop(cond, body, init)
    return LocalResult(
        step=out.x - theta,
        decrease=local_value - out.value,
        memory=out.memory,
        iterations=out.j,
        accepted=out.accepted,
    )


# ----------------------------------------------------------------------------------------------
# One outer iteration on a block of subdomains
# ----------------------------------------------------------------------------------------------


class OuterState(NamedTuple):
    """The iterate of APTS on a block of ``b`` subdomains (flat vectors).

    Attributes:
      params: :math:`\\theta_k`, shape ``(n,)`` (replicated).
      value, grad: global :math:`f(\\theta_k)`, :math:`\\nabla f(\\theta_k)` (replicated).
      local_value, local_grad: ``(b,)``, ``(b, n)`` local values/gradients at :math:`\\theta_k`.
      radius: :math:`\\Delta_k`.
      local_memory: L-SR1 memories with leading axis ``b`` (None for the first-order model).
      global_memory: the global L-SR1 memory (None for the first-order model).
      window: ``(W,)`` the last accepted global values, oldest first, ``-inf`` where none yet
        (``acceptance="nonmonotone"`` only; None otherwise). Replicated.
      norm_state: the running second moment of the global gradients that defines the
        ellipsoidal norm (:class:`apts_jax.ellipsoid.DiagNormState`; ``norm="adaptive"`` only,
        None otherwise). Replicated.
    """

    params: Array
    value: Array
    grad: Array
    local_value: Array
    local_grad: Array
    radius: Array
    local_memory: Any
    global_memory: Any
    window: Any = None
    norm_state: Any = None


class OuterInfo(NamedTuple):
    """Diagnostics of one outer iteration (replicated unless noted).

    Attributes:
      ratio: APTS ratio :math:`\\rho_k` (eq. 6), ``-inf`` for a guarded rejection.
      accepted: the APTS step :math:`\\tilde s` was accepted.
      predicted_decrease: :math:`\\sum_i f_i(\\theta_k) - f_i(\\theta_k + s_i)` (the mean for
        ``combine="mean"``).
      actual_decrease: :math:`f_{\\rm ref} - f(\\theta_k + \\tilde s)`, the numerator of
        :math:`\\rho`: :math:`f_{\\rm ref} = f(\\theta_k)` (monotone) or the window maximum
        (``acceptance="nonmonotone"``).
      step_norm: :math:`\\|\\tilde s\\|` (:math:`\\|D^{1/2}\\tilde s\\|` for ``norm="adaptive"``).
      global_ratio, global_accepted: of the global TR iteration (step 5).
      local_iterations: ``(b,)`` local TR iterations per subdomain.
      local_accepted: ``(b,)`` accepted local steps per subdomain.
      evaluations: ``(b,)`` value-and-gradient evaluations per subdomain in this iteration.
    """

    ratio: Array
    accepted: Array
    predicted_decrease: Array
    actual_decrease: Array
    step_norm: Array
    global_ratio: Array
    global_accepted: Array
    local_iterations: Array
    local_accepted: Array
    evaluations: Array


class RatioTest(NamedTuple):
    """Outcome of the APTS ratio test (eq. 6-7), see :func:`ratio_test`."""

    ratio: Array
    accepted: Array
    radius: Array


def ratio_test(
    actual_decrease: Array,
    predicted_decrease: Array,
    trial_finite: Array,
    radius: Array,
    config: RadiusConfig = DEFAULT_RADIUS_CONFIG,
) -> RatioTest:
    r"""The APTS ratio test of the summed step (eq. 6) and the new global radius (eq. 7). Pure.

    :math:`\rho = (f(\theta_k) - f(\theta_k + \tilde s)) / \sum_i (f_i(\theta_k) - f_i(\theta_k +
    s_i))`; :math:`\rho = -\infty` when the predicted decrease is :math:`\le 0` or not finite, the
    actual decrease is not finite, or the trial value/gradient is not finite (``trial_finite``
    False). Accept iff :math:`\rho \ge \eta_1`. Radius (eq. 7, no boundary test: the summed step
    is not a minimiser of one model): :math:`\min(\beta\Delta, \Delta_{\max})` if
    :math:`\rho > \eta_2`, :math:`\max(\alpha\Delta, \Delta_{\min})` if :math:`\rho < \eta_1`,
    else :math:`\Delta`.

    Args:
      actual_decrease: :math:`f(\theta_k) - f(\theta_k + \tilde s)`.
      predicted_decrease: the *sum* over subdomains of the local decreases (their mean for
        ``combine="mean"``, where the step is the mean of the local steps).
      trial_finite: bool, :math:`f` and :math:`\nabla f` at :math:`\theta_k + \tilde s` are finite.
      radius: :math:`\Delta_k`.
      config: the radius constants.
    """
    rho = radius_lib.ratio(actual_decrease, predicted_decrease)
    rho = jnp.where(trial_finite, rho, -jnp.inf).astype(rho.dtype)
    accepted = rho >= config.eta1
    # eq. 7 grows on rho > eta2 alone: pass the radius as the step norm (the boundary test holds).
    new_radius = radius_lib.update_radius(radius, rho, radius, config)
    return RatioTest(ratio=rho, accepted=accepted, radius=new_radius)


def _reduce_mean(vals: Array, grads: Array, axis_name: AxisName | None, n_sub: float
                 ) -> tuple[Array, Array]:
    """Global mean value and gradient of the block's ``(b,)`` values and ``(b, n)`` gradients,
    in one all-reduce (the value rides along with the gradient)."""
    packed = jnp.concatenate([grads, vals[:, None].astype(grads.dtype)], axis=1)
    mean = _all_sum(packed, axis_name) / n_sub
    return mean[-1], mean[:-1]


def _summed_step(loc: LocalResult, axis_name: AxisName | None) -> tuple[Array, Array]:
    r""":math:`\tilde s = \sum_i s_i` and the predicted decrease :math:`\sum_i (f_i(\theta_k) -
    f_i(\theta_k + s_i))` (eq. 6's denominator: a sum, not a mean), in one all-reduce."""
    packed = jnp.concatenate([loc.step, loc.decrease[:, None].astype(loc.step.dtype)], axis=1)
    summed = _all_sum(packed, axis_name)
    return summed[:-1], summed[-1]


def _local_phases(
    shard_value_and_grad: Callable[[Array, Any], tuple[Array, Array]],
    data_block: Any,
    shard: Callable[[int], Any],
    state: OuterState,
    cap: Array,
    **options: Any,
) -> LocalResult:
    """Step 2: the block's local phases, vmapped over the block (no communication)."""

    def one_local(lv: Array, lg: Array, mem: Any, sh: Any) -> LocalResult:
        return local_phase(
            lambda x: shard_value_and_grad(x, sh), state.params, lv, lg, state.grad, cap, mem,
            **options,
        )

    if state.local_value.shape[0] == 1:
        mem0 = None if state.local_memory is None else jax.tree.map(
            lambda a: a[0], state.local_memory)
        loc = one_local(state.local_value[0], state.local_grad[0], mem0, shard(0))
        return jax.tree.map(lambda a: a[None], loc)
    return jax.vmap(one_local)(state.local_value, state.local_grad, state.local_memory, data_block)


def outer_step(
    shard_value_and_grad: Callable[[Array, Any], tuple[Array, Array]],
    data_block: Any,
    state: OuterState,
    *,
    axis_name: AxisName | None,
    num_subdomains: int,
    local_steps: int | None = None,
    model: str | None = None,
    config: RadiusConfig = DEFAULT_RADIUS_CONFIG,
    skip_tol: float = 1e-8,
    options: APTSOptions = DEFAULT_OPTIONS,
    pair_grad: Callable[[Array], Array] | None = None,
) -> tuple[OuterState, OuterInfo]:
    """One APTS outer iteration (Algorithm 1, steps 2–5) for a block of ``b`` subdomains.

    Args:
      shard_value_and_grad: ``(x, shard) -> (value, grad)``: the local loss of one subdomain and
        its gradient at the flat point ``x`` (scalar and ``(n,)``, dtype of ``x``). It is called
        with ``x`` already varying over the manual axes of ``axis_name`` (see :func:`to_varying`),
        once per subdomain and evaluation: a block of ``b`` subdomains costs ``b`` evaluations.
      data_block: pytree whose leaves have a leading axis ``b``, the shards of this instance's
        subdomains (``shard`` is one slice of it); None when ``b = 1`` and the function needs no
        data argument (then ``shard`` is None).
      state: :class:`OuterState` at :math:`\\theta_k`.
      axis_name: the named axis (or tuple) across program instances; None for a single instance.
      num_subdomains: ``N`` = ``b`` times the number of program instances.
      local_steps: :math:`\\nu`; None: ``options.local_steps``.
      model: ``"sr1"`` or ``"first_order"`` (local and global); None: ``options.model``.
      config: radius constants (:class:`apts_jax.radius.RadiusConfig`).
      skip_tol: SR1 skip-rule tolerance.
      options: :class:`APTSOptions` (validated by the factories; default
        :data:`DEFAULT_OPTIONS`). For ``acceptance="nonmonotone"`` ``state.window`` must hold
        the window.
      pair_grad: ``curvature_pairs="multi_batch"`` only: ``x -> (b, n)``, the gradients of the
        block's subdomains at ``x`` (already varying, as for ``shard_value_and_grad``) on
        their equal shares of the pair data :math:`O_k`; their mean over all subdomains is
        :math:`\nabla f_{O_k}(x)`. None: :math:`O_k` is the iteration's own data (no extra
        evaluation).

    Returns:
      ``(state, info)``: the :class:`OuterState` at :math:`\\theta_{k+1}` and an
      :class:`OuterInfo`.
    """
    if model is None:
        model = options.model
    if local_steps is None:
        local_steps = options.local_steps
    multi_batch = options.curvature_pairs == "multi_batch"
    if multi_batch and (model != "sr1" or options.global_step != "tr"):
        raise ValueError(
            "outer_step: curvature_pairs='multi_batch' needs model='sr1' and global_step='tr' "
            f"(got model={model!r}, global_step={options.global_step!r})."
        )
    if pair_grad is not None and not multi_batch:
        raise ValueError(
            "outer_step: pair_grad is used only with curvature_pairs='multi_batch'; drop it or "
            "set options.curvature_pairs='multi_batch'."
        )
    n_sub = float(num_subdomains)
    b = state.local_value.shape[0]
    if data_block is None and b != 1:
        raise ValueError(f"outer_step: data_block is None but the block has {b} subdomains.")
    nonmonotone = options.acceptance == "nonmonotone"
    if nonmonotone and state.window is None:
        raise ValueError(
            "outer_step: acceptance='nonmonotone' needs state.window, the (W,) buffer of the last "
            "accepted global values (e.g. jnp.full((W,), -jnp.inf)); the factories build it."
        )
    adaptive_norm = options.norm == "adaptive"
    if adaptive_norm and state.norm_state is None:
        raise ValueError(
            "outer_step: norm='adaptive' needs state.norm_state (apts_jax.ellipsoid.init(n)); "
            "the factories build it."
        )
    # The ellipsoidal norm: D from the running second moment of the global gradients, folded in
    # at theta_k; one D for the whole outer iteration (local phases and the global step).
    norm_state, d_half = state.norm_state, None
    if adaptive_norm:
        norm_state = ellipsoid.update(norm_state, state.grad)
        d_half = ellipsoid.scale(norm_state)
    # Local radius: Delta/N for the summed combination, Delta for the mean.
    share = n_sub if options.combine == "sum" else 1.0
    local_start = state.radius / share
    if options.local_boundary == "ball":
        cap, initial = local_start, None
    else:  # "adaptive": start at Delta/N, adapt up to max_radius/N
        cap = jnp.full_like(local_start, config.max_radius / share)
        initial = local_start

    def shard(i: int) -> Any:
        return None if data_block is None else jax.tree.map(lambda a: a[i], data_block)

    def block_value_and_grad(x: Array) -> tuple[Array, Array]:
        """Values ``(b,)`` and gradients ``(b, n)`` of the block's subdomains at a common ``x``."""
        xv = to_varying(x, axis_name)  # outside vmap: pcast cannot be batched over a vmap axis
        if b == 1:
            v, g = shard_value_and_grad(xv, shard(0))
            return v[None], g[None]
        return jax.vmap(lambda sh: shard_value_and_grad(xv, sh))(data_block)

    # Step 2: local phases inside the ball of radius Delta_k / N (see options).
    loc = _local_phases(
        shard_value_and_grad, data_block, shard, state, cap,
        local_steps=local_steps, model=model, config=config, skip_tol=skip_tol,
        initial_radius=initial, d_half=d_half,
    )
    # Step 3: s~ = sum_i s_i and the predicted decrease (means for combine="mean").
    step, predicted = _summed_step(loc, axis_name)
    if options.combine == "mean":
        step, predicted = step / n_sub, predicted / n_sub

    # Step 4: f(theta_k + s~) (with its gradient, reused if accepted) and the ratio test.
    trial = state.params + step
    t_vals, t_grads = block_value_and_grad(trial)
    t_value, t_grad = _reduce_mean(t_vals, t_grads, axis_name, n_sub)
    reference = (
        jnp.maximum(state.value, jnp.max(state.window)) if nonmonotone else state.value
    )
    actual = reference - t_value
    test = ratio_test(
        actual, predicted, jnp.isfinite(t_value) & jnp.all(jnp.isfinite(t_grad)), state.radius,
        config,
    )
    accepted = test.accepted
    theta_t, value_t, grad_t, lval_t, lgrad_t = optax.tree.where(
        accepted,
        (trial, t_value, t_grad, t_vals, t_grads),
        (state.params, state.value, state.grad, state.local_value, state.local_grad),
    )

    if options.global_step == "none":  # no step 5: theta_{k+1} = theta~, Delta_{k+1} = Delta~
        return _without_global_step(
            state, loc, test, step, predicted, actual, d_half, norm_state, nonmonotone,
            (theta_t, value_t, grad_t, lval_t, lgrad_t),
        )

    # Step 5: one global TR iteration; the local values/gradients ride along as aux.
    def global_vg(x: Array) -> tuple[tuple[Array, tuple[Array, Array]], Array]:
        vals, grads = block_value_and_grad(x)
        value, grad = _reduce_mean(vals, grads, axis_name, n_sub)
        return (value, (vals, grads)), grad

    res = iteration(
        global_vg, theta_t, value_t, grad_t, test.radius, state.global_memory,
        model=model, config=config, skip_tol=skip_tol, has_aux=True, aux=(lval_t, lgrad_t),
        d_half=d_half, store_pair=not multi_batch,
    )
    global_memory = res.memory
    if multi_batch:
        global_memory = _multi_batch_pair(
            state, res.params, res.grad, pair_grad, axis_name, n_sub, d_half, skip_tol
        )
    new_lval, new_lgrad = res.aux
    window = state.window
    if nonmonotone:
        # The new value enters the window whenever the iterate moved (step 4 or 5 accepted).
        moved = accepted | res.accepted
        pushed = jnp.concatenate([window[1:], res.value[None].astype(window.dtype)])
        window = jnp.where(moved, pushed, window)
    new_state = OuterState(
        params=res.params, value=res.value, grad=res.grad, local_value=new_lval,
        local_grad=new_lgrad, radius=res.radius, local_memory=loc.memory,
        global_memory=global_memory, window=window, norm_state=norm_state,
    )
    info = OuterInfo(
        ratio=test.ratio,
        accepted=accepted,
        predicted_decrease=predicted,
        actual_decrease=actual,
        step_norm=jnp.linalg.norm(step if d_half is None else d_half * step),
        global_ratio=res.ratio,
        global_accepted=res.accepted,
        local_iterations=loc.iterations,
        local_accepted=loc.accepted,
        evaluations=loc.iterations + 2,
    )
    return new_state, info


def _multi_batch_pair(
    state: OuterState,
    new_params: Array,
    new_grad: Array,
    pair_grad: Callable[[Array], Array] | None,
    axis_name: AxisName | None,
    n_sub: float,
    d_half: Array | None,
    skip_tol: float,
) -> Any:
    r"""The global memory after offering the outer iteration's multi-batch pair
    (``curvature_pairs="multi_batch"``): :math:`s_k = \theta_{k+1} - \theta_k`, :math:`y_k =
    \nabla f_{O_k}(\theta_{k+1}) - \nabla f_{O_k}(\theta_k)`; with ``pair_grad`` None,
    :math:`O_k` is the iteration's batch and both gradients are known (``new_grad``,
    ``state.grad``). One all-reduce of the gradient difference otherwise."""
    s = new_params - state.params
    if pair_grad is None:
        y = new_grad - state.grad
    else:
        diff = pair_grad(to_varying(new_params, axis_name)) - pair_grad(
            to_varying(state.params, axis_name))
        y = _all_sum(diff, axis_name) / n_sub
    memory, _ = offer_pair(state.global_memory, s, y.astype(s.dtype), valid=jnp.any(s != 0),
                           d_half=d_half, skip_tol=skip_tol)
    return memory


def _without_global_step(
    state: OuterState,
    loc: LocalResult,
    test: RatioTest,
    step: Array,
    predicted: Array,
    actual: Array,
    d_half: Array | None,
    norm_state: Any,
    nonmonotone: bool,
    accepted_point: tuple[Array, Array, Array, Array, Array],
) -> tuple[OuterState, OuterInfo]:
    """The end of an outer iteration with ``global_step="none"``: the APTS ratio test's point
    and radius are the next iterate and radius (the global memory is passed through)."""
    theta_t, value_t, grad_t, lval_t, lgrad_t = accepted_point
    window = state.window
    if nonmonotone:
        pushed = jnp.concatenate([window[1:], value_t[None].astype(window.dtype)])
        window = jnp.where(test.accepted, pushed, window)
    new_state = OuterState(
        params=theta_t, value=value_t, grad=grad_t, local_value=lval_t, local_grad=lgrad_t,
        radius=test.radius, local_memory=loc.memory, global_memory=state.global_memory,
        window=window, norm_state=norm_state,
    )
    info = OuterInfo(
        ratio=test.ratio,
        accepted=test.accepted,
        predicted_decrease=predicted,
        actual_decrease=actual,
        step_norm=jnp.linalg.norm(step if d_half is None else d_half * step),
        global_ratio=jnp.zeros_like(test.ratio),
        global_accepted=jnp.zeros_like(test.accepted),
        local_iterations=loc.iterations,
        local_accepted=loc.accepted,
        evaluations=loc.iterations + 1,
    )
    return new_state, info


# ----------------------------------------------------------------------------------------------
# The optax face
# ----------------------------------------------------------------------------------------------


class APTSInfo(NamedTuple):
    """Diagnostics (replicated unless noted; counters cumulative since ``init``).

    Attributes:
      ratio: APTS ratio :math:`\\rho` of the last outer iteration (eq. 6).
      accepted: the last APTS step :math:`\\tilde s` was accepted.
      num_accepted, num_rejected: APTS steps accepted/rejected so far.
      global_ratio: ratio of the last global TR iteration (step 5).
      num_global_accepted: global TR steps accepted so far.
      radius: :math:`\\Delta` after the last iteration.
      step_norm: :math:`\\|\\tilde s\\|` of the last iteration.
      predicted_decrease, actual_decrease: of the last APTS step.
      local_iterations: local TR iterations of this subdomain in the last outer iteration.
      num_fun_evals: value-and-gradient evaluations of this subdomain so far.
    """

    ratio: Array
    accepted: Array
    num_accepted: Array
    num_rejected: Array
    global_ratio: Array
    num_global_accepted: Array
    radius: Array
    step_norm: Array
    predicted_decrease: Array
    actual_decrease: Array
    local_iterations: Array
    num_fun_evals: Array


class APTSState(NamedTuple):
    """State of :func:`apts`.

    Attributes:
      count: outer iterations done (int32).
      value: this subdomain's local value :math:`f(\\theta; D_i)` at the current params.
      grad: this subdomain's local gradient at the current params (pytree like params).
      global_value: :math:`f(\\theta; D)` at the current params.
      global_grad: :math:`\\nabla f(\\theta; D)` (flat vector).
      radius: the global radius :math:`\\Delta`.
      local_memory: this subdomain's L-SR1 memory (None for the first-order model).
      global_memory: the global L-SR1 memory (None for the first-order model).
      info: :class:`APTSInfo`.
      window: the last accepted global values (``acceptance="nonmonotone"``; None otherwise),
        replicated; see :class:`OuterState`.
      norm_state: the ellipsoidal norm's running second moment (``norm="adaptive"``; None
        otherwise), replicated; see :class:`OuterState`.
    """

    count: Array
    value: Array
    grad: Any
    global_value: Array
    global_grad: Array
    radius: Array
    local_memory: Any
    global_memory: Any
    info: APTSInfo
    window: Any = None
    norm_state: Any = None


#: Fields of :class:`APTSState` / :class:`APTSInfo` that differ between subdomains.
LOCAL_STATE_FIELDS = ("value", "grad", "local_memory")
LOCAL_INFO_FIELDS = ("local_iterations", "num_fun_evals")


def apts_state_specs(state: APTSState, axis_name: AxisName) -> APTSState:
    """``PartitionSpec`` of every leaf of an :class:`APTSState` for ``jax.shard_map``.

    Per-subdomain leaves get ``P(axis_name)`` (stored outside ``shard_map`` with a leading axis of
    size ``N``): ``value``, ``grad``, ``local_memory``, ``info.local_iterations`` and
    ``info.num_fun_evals``; all others ``P()`` (replicated). Inside the mapped function squeeze
    the per-subdomain leaves (``a[0]``) before ``update`` and expand them (``a[None]``) after it.

    The simpler layout also works: the whole state stacked along the subdomain axis
    (``P(axis_name)`` for every leaf, e.g. ``jax.vmap(opt.init)`` of stacked params, and
    ``jax.tree.map(lambda a: a[0], state)`` inside) — it stores the replicated fields ``N``
    times and, with ``check_vma=True``, costs one more all-reduce per update (see :func:`apts`).
    """
    if not isinstance(state, APTSState):
        raise TypeError(f"apts_state_specs: expected an APTSState, got {type(state).__name__}.")
    spec_local = jax.sharding.PartitionSpec(axis_name)
    spec_rep = jax.sharding.PartitionSpec()

    def specs(sub: Any, local: bool) -> Any:
        return jax.tree.map(lambda _: spec_local if local else spec_rep, sub)

    fields = {f: specs(getattr(state, f), f in LOCAL_STATE_FIELDS)
              for f in APTSState._fields if f != "info"}
    info = APTSInfo(**{f: specs(getattr(state.info, f), f in LOCAL_INFO_FIELDS)
                       for f in APTSInfo._fields})
    return APTSState(**fields, info=info)


def init_window(options: APTSOptions, dtype: Any) -> Array | None:
    """The empty window of the non-monotone test (None for the monotone one)."""
    if options.acceptance != "nonmonotone":
        return None
    return _strong(jnp.full((options.nonmonotone_window,), -jnp.inf, dtype))


def init_norm(options: APTSOptions, n: int, dtype: Any) -> ellipsoid.DiagNormState | None:
    """The empty second moment of the ellipsoidal norm (None for ``norm="l2"``)."""
    if options.norm != "adaptive":
        return None
    return jax.tree.map(_strong, ellipsoid.init(n, dtype))


def _check_axis_bound(axis_name: AxisName) -> None:
    for a in _axes(axis_name):
        try:
            jax.lax.axis_size(a)
        except (NameError, ValueError, KeyError) as err:
            raise ValueError(
                f"apts: axis name {a!r} is not bound here. Call the update inside a function "
                "mapped over subdomains with that axis name: jax.shard_map over a mesh axis "
                f"{a!r}, jax.vmap(..., axis_name={a!r}) or jax.pmap(..., axis_name={a!r}) "
                "(or use apts_jax.parallel.solve / make_apts, which set it up for you)."
            ) from err


def _check_state(state: Any, spec: _tree.FlatSpec) -> None:
    if not isinstance(state, APTSState):
        raise TypeError(f"apts: state must be an APTSState from init, got {type(state)}.")
    if jnp.ndim(state.radius) != 0:
        raise ValueError(
            f"apts: state.radius has shape {jnp.shape(state.radius)}, expected a scalar: the "
            "state still carries the subdomain axis. Inside jax.shard_map every instance holds "
            "a block of one subdomain; squeeze it before update and restore it after: "
            "state = jax.tree.map(lambda a: a[0], state); ...; jax.tree.map(lambda a: a[None], "
            "new_state) (or use apts_jax.apts_state_specs(state, axis_name) for per-field specs)."
        )
    _tree.check_same_structure(spec, state.grad, "state.grad")


def apts(
    axis_name: AxisName,
    local_steps: int | None = None,
    model: str | None = None,
    memory_size: int = 5,
    *,
    reuse_value_and_grad: bool = False,
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
    preset: str | APTSOptions | None = None,
    local_boundary: str | None = None,
    combine: str | None = None,
    acceptance: str | None = None,
    nonmonotone_window: int | None = None,
    norm: str | None = None,
    curvature_pairs: str | None = None,
    global_step: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""APTS (the paper's Algorithm 1) as an optax transformation, one subdomain per mapped instance.

    Call ``update`` inside a function mapped over the subdomains with ``axis_name`` bound
    (``jax.shard_map`` over a mesh axis, ``jax.pmap``, or ``jax.vmap(..., axis_name=...)``; a tuple
    of names spreads subdomains over several axes), each instance passing its *local* quantities:
    ``update(updates, state, params, *, value, grad, value_fn, **extra_args)`` with ``value``,
    ``grad`` the local loss and gradient at ``params`` on this subdomain's data and
    ``value_fn(params, **kw)`` the local loss on the same data (it receives the ``extra_args`` its
    signature names; any other extra argument raises ``TypeError``, as in optax). ``params`` must
    be replicated (identical on every instance). The returned updates are
    :math:`\theta_{k+1} - \theta_k`, identical on every instance.

    Data. By default every update uses the ``value``/``grad`` it is passed: they are reduced to
    the global :math:`f`, :math:`\nabla f` (one all-reduce more, four gradient-sized all-reduces
    per update), so :math:`r_i` and :math:`\rho` always come from the current batch — right for
    minibatches (SAPTS)::

        value, grad = jax.value_and_grad(loss)(apts_jax.to_varying(params, axis), batch)
        updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                    value_fn=functools.partial(loss, batch=batch))

    For a *fixed* data set (full-batch APTS) ``reuse_value_and_grad=True`` reuses the local and
    global values and gradients that the previous update computed at the new parameters (three
    all-reduces per update; ``value``/``grad`` are read at the first update only and may be None
    afterwards, like :func:`optax.value_and_grad_from_state`). With minibatches this option mixes
    two batches: never use it there (``update(..., fresh_data=True)`` forces the re-reduction
    for one call, e.g. after the data changed).

    Multi-batch curvature pairs (``model="sr1", curvature_pairs="multi_batch"``): pass
    ``pair_fn=...``, the local loss on this subdomain's share of the samples the current batch
    shares with the next one (equal shares on every instance; it receives the extra arguments its
    signature names); the global memory then takes :math:`(\theta_{k+1} - \theta_k,
    \nabla f_O(\theta_{k+1}) - \nabla f_O(\theta_k))`, two gradient evaluations of ``pair_fn``
    per update. Without ``pair_fn`` the pair's gradients are on the current batch (no extra
    evaluation; the right choice for a fixed data set).

    Layout. The state holds per-subdomain fields (``value``, ``grad``, ``local_memory``,
    ``info.local_iterations``, ``info.num_fun_evals``) and replicated ones (see
    :func:`apts_state_specs`). Under ``pmap``/``vmap`` stack it with ``jax.vmap(opt.init)``. Under
    ``jax.shard_map`` either stack the whole state along the subdomain axis (``P(axis)`` for every
    leaf) or use the per-field specs of :func:`apts_state_specs`; each instance then holds a
    block of one subdomain, squeezed with ``a[0]`` before ``update`` and restored with
    ``a[None]`` after it (a state that still carries that axis is rejected with an error saying
    so). The stacked layout stores the replicated fields ``N`` times and, with
    ``check_vma=True``, types them as varying: the update then spends one more gradient-sized
    all-reduce (an exact max of equal values) to return replicated updates. With
    ``check_vma=True`` compute the local ``grad`` from a varying copy
    of the parameters (:func:`to_varying`) — ``jax.grad`` of a replicated input returns the *sum*
    over devices; a replicated ``grad`` is rejected with an error saying so. Collectives over a
    ``vmap`` axis name inside ``shard_map`` require ``check_vma=False`` (a JAX limitation); the
    layout helpers in :mod:`apts_jax.parallel` avoid them by reducing blocks of subdomains locally.

    Args:
      axis_name: the axis (or tuple of axes) that enumerates the subdomains.
      local_steps: :math:`\nu`, maximum local TR iterations per outer iteration; None
        (default): the preset's (10 for the default :data:`TUNING_FREE`, 5 for
        ``preset="paper"``).
      model: ``"sr1"`` (L-SR1/OBS, local and global) or ``"first_order"``; None (default):
        the preset's (``"first_order"`` for the default :data:`TUNING_FREE`, ``"sr1"`` for
        ``preset="paper"``).
      memory_size: L-SR1 pairs kept, locally and globally (default 5; unused by the
        first-order model).
      reuse_value_and_grad: full-batch only: reuse the values/gradients of the previous update
        (see above). Default False.
      radius: radius constants (:class:`apts_jax.radius.RadiusConfig`), used globally and
        locally.
      initial_radius, min_radius, max_radius, eta1, eta2, shrink, grow, boundary_fraction:
        convenience keywords replacing single fields of ``radius``.
      skip_tol: SR1 skip-rule tolerance.
      preset: ``"paper"`` (:data:`PAPER`, the paper's method exactly), ``"tuning_free"``
        (:data:`TUNING_FREE`), an :class:`APTSOptions`, or None for :data:`DEFAULT_OPTIONS`
        (= :data:`TUNING_FREE`).
      local_boundary, combine, acceptance, nonmonotone_window, norm, curvature_pairs,
      global_step: the open choices of issue 11, replacing fields of the preset (see
        :class:`APTSOptions`):
        ``local_boundary="ball"|"adaptive"`` (``"adaptive"`` gives up eq. 5's bound
        :math:`\|\tilde s\| \le \Delta`; the ratio test guards the step),
        ``combine="sum"|"mean"``, ``acceptance="monotone"|"nonmonotone"`` with window
        ``nonmonotone_window`` (default 5), ``norm="l2"|"adaptive"`` (the ellipsoidal trust
        region; the state then carries ``norm_state``, replicated), ``global_step="tr"|"none"``
        (step 5 or not), ``curvature_pairs="same_batch"|"multi_batch"`` (the global memory's
        pairs: step 5's, or one over the whole outer step; needs ``model="sr1"``).
    """
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
    reuse = bool(reuse_value_and_grad)

    def init_fn(params: Any) -> APTSState:
        spec = _tree.flat_spec(params)
        dtype = spec.dtype
        n = spec.size
        inf = _strong(jnp.asarray(jnp.inf, dtype))
        zero = _strong(jnp.zeros((), dtype))
        info = APTSInfo(
            ratio=zero,
            accepted=jnp.zeros((), bool),
            num_accepted=jnp.zeros((), jnp.int32),
            num_rejected=jnp.zeros((), jnp.int32),
            global_ratio=zero,
            num_global_accepted=jnp.zeros((), jnp.int32),
            radius=_strong(jnp.asarray(config.initial_radius, dtype)),
            step_norm=zero,
            predicted_decrease=zero,
            actual_decrease=zero,
            local_iterations=jnp.zeros((), jnp.int32),
            num_fun_evals=jnp.zeros((), jnp.int32),
        )
        return APTSState(
            count=jnp.zeros((), jnp.int32),
            value=inf,
            grad=_tree.zeros(spec),
            global_value=inf,
            global_grad=jnp.zeros((n,), dtype),
            radius=_strong(jnp.asarray(config.initial_radius, dtype)),
            local_memory=init_memory(model, n, memory_size, dtype, options.norm),
            global_memory=init_memory(model, n, memory_size, dtype, options.norm),
            info=info,
            window=init_window(options, dtype),
            norm_state=init_norm(options, n, dtype),
        )

    def update_fn(
        updates: Any,
        state: APTSState,
        params: Any = None,
        *,
        value: Any = None,
        grad: Any = None,
        value_fn: Callable[..., Any] | None = None,
        fresh_data: bool = False,
        pair_fn: Callable[..., Any] | None = None,
        **extra_args: Any,
    ) -> tuple[Any, APTSState]:
        if params is None:
            raise ValueError("apts: update needs params (the current parameters).")
        if value_fn is None:
            raise TypeError(
                "apts: update needs value_fn=... (the local loss of this subdomain as a function "
                "of the parameters), as optax's line-search transformations do."
            )
        spec = _tree.flat_spec(params)
        _check_state(state, spec)
        _check_axis_bound(axis_name)
        _tree.check_same_structure(spec, updates, "updates")
        fn_kwargs = _validate.split_kwargs(value_fn, extra_args, "apts.update")
        if pair_fn is not None and options.curvature_pairs != "multi_batch":
            raise ValueError(
                "apts: pair_fn is used only with curvature_pairs='multi_batch' (the secant pair "
                "on the data shared with the next batch); drop it or build the optimizer with "
                "apts(..., model='sr1', curvature_pairs='multi_batch')."
            )
        if pair_fn is not None and not callable(pair_fn):
            raise TypeError(f"apts: pair_fn must be callable, got {type(pair_fn).__name__}.")
        n_inst = _num_instances(axis_name)
        x = _tree.ravel(spec, params)
        pair_grad = None
        if pair_fn is not None:
            pair_kwargs = _validate.split_kwargs(pair_fn, extra_args, "apts.update", strict=False)

            def pair_grad(z: Array) -> Array:
                g = jax.grad(lambda flat: pair_fn(_tree.unravel(spec, flat), **pair_kwargs))(z)
                return g.astype(x.dtype)[None]

        def shard_vg(z: Array, _: Any = None) -> tuple[Array, Array]:
            v, g = jax.value_and_grad(
                lambda flat: value_fn(_tree.unravel(spec, flat), **fn_kwargs)
            )(z)
            return jnp.asarray(v, x.dtype), g.astype(x.dtype)

        if value is None or grad is None:
            def given() -> tuple[Array, Array]:
                return shard_vg(to_varying(x, axis_name))
        else:
            _tree.check_same_structure(spec, grad, "grad")
            g_flat = _tree.ravel(spec, grad)
            checked = _vma_checked_axes(axis_name)
            if checked and not (varying_axes(g_flat) & checked):
                raise ValueError(
                    "apts: grad is replicated across the subdomain axis "
                    f"{axis_name!r}; inside jax.shard_map, jax.grad of replicated params returns "
                    "the SUM of the local gradients. Differentiate a varying copy instead: "
                    "apts_jax.to_varying(params, axis_name) before jax.value_and_grad."
                )

            def given() -> tuple[Array, Array]:
                return jnp.asarray(value, x.dtype), g_flat

        def fresh() -> tuple[Array, Array, Array, Array]:
            lv, lg = given()
            packed = jnp.concatenate([lg, lv[None]])
            mean = jax.lax.psum(packed, axis_name) / n_inst
            return lv, lg, mean[-1], mean[:-1]

        def stored() -> tuple[Array, Array, Array, Array]:
            lv = to_varying(state.value, axis_name)
            lg = to_varying(_tree.ravel(spec, state.grad), axis_name)
            return lv, lg, state.global_value, state.global_grad

        if reuse and not fresh_data:
            # Both branches must have one type: a state stacked along a shard_map axis makes the
            # stored global values varying there, while the freshly reduced ones are not.
            def fresh_like_stored() -> tuple[Array, Array, Array, Array]:
                lv, lg, gv, gg = fresh()
                return (*match_vma((lv, lg), state.value, state.grad),
                        *match_vma((gv, gg), state.global_value, state.global_grad))

            lv, lg, gv, gg = jax.lax.cond(state.count == 0, fresh_like_stored, stored)
        else:
            lv, lg, gv, gg = fresh()

        local_memory = (
            None if state.local_memory is None
            else jax.tree.map(lambda a: a[None], to_varying(state.local_memory, axis_name))
        )
        outer = OuterState(
            params=x, value=gv, grad=gg, local_value=lv[None], local_grad=lg[None],
            radius=state.radius, local_memory=local_memory, global_memory=state.global_memory,
            window=state.window, norm_state=state.norm_state,
        )
        out, oinfo = outer_step(
            shard_vg, None, outer,
            axis_name=axis_name, num_subdomains=n_inst, local_steps=local_steps, model=model,
            config=config, skip_tol=skip_tol, options=options, pair_grad=pair_grad,
        )
        info = APTSInfo(
            ratio=oinfo.ratio,
            accepted=oinfo.accepted,
            num_accepted=state.info.num_accepted + oinfo.accepted.astype(jnp.int32),
            num_rejected=state.info.num_rejected + (~oinfo.accepted).astype(jnp.int32),
            global_ratio=oinfo.global_ratio,
            num_global_accepted=state.info.num_global_accepted
            + oinfo.global_accepted.astype(jnp.int32),
            radius=out.radius,
            step_norm=oinfo.step_norm,
            predicted_decrease=oinfo.predicted_decrease,
            actual_decrease=oinfo.actual_decrease,
            local_iterations=oinfo.local_iterations[0],
            num_fun_evals=state.info.num_fun_evals + oinfo.evaluations[0],
        )
        new_state = APTSState(
            count=state.count + 1,
            value=out.local_value[0],
            grad=_tree.unravel(spec, out.local_grad[0]),
            global_value=out.value,
            global_grad=out.grad,
            radius=out.radius,
            local_memory=None if out.local_memory is None
            else jax.tree.map(lambda a: a[0], out.local_memory),
            global_memory=out.global_memory,
            info=info,
            window=out.window,
            norm_state=out.norm_state,
        )
        delta = out.params - x
        # A state stacked along a checked shard_map axis types its replicated fields (radius,
        # global memory) as varying, and the step with them, although every instance holds the
        # same values. One all-reduce (a max of equal values: exact) makes the step replicated
        # again; the per-field specs of apts_state_specs avoid it.
        stacked = tuple(sorted(
            set().union(*(varying_axes(a) for a in (state.radius, state.count))) & _vma_checked_axes(
                axis_name), key=str))
        if stacked:
            delta = jax.lax.pmax(delta, stacked)
        return _tree.unravel(spec, delta), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
