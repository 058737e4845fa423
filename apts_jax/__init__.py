"""apts_jax: data-parallel nonlinearly preconditioned trust-region training (APTS) for JAX.

Reference implementation of Cruz Alegría, Trotti, Kopaničáková, Krause, *Data-Parallel Neural
Network Training via Nonlinearly Preconditioned Trust-Region Method*, with an L-SR1 / OBS
trust-region optimizer for optax.

Public API (factories at the top level, as in optax):

* :func:`trust_region` — the trust-region optimizer as an
  :class:`optax.GradientTransformationExtraArgs` (state :class:`TrustRegionState`,
  diagnostics :class:`TrustRegionInfo`); module :mod:`apts_jax.tr`;
* :func:`minimize` — a jitted trust-region solver loop for deterministic problems
  (:class:`MinimizeStats`); module :mod:`apts_jax.minimize` (shadowed by the function: import
  from it with ``from apts_jax.minimize import ...``);
* :class:`RadiusConfig` / :data:`DEFAULT_RADIUS_CONFIG` — the radius constants and their defaults;
* :func:`apts` — data-parallel APTS as an optax transformation (state :class:`APTSState`,
  shard_map specs :func:`apts_state_specs`; the open choices of issue 11 as
  :class:`APTSOptions`; the default :data:`DEFAULT_OPTIONS` = :data:`TUNING_FREE`, the
  paper's method as :data:`PAPER` / ``preset="paper"``; SAPTS minibatch rule
  :func:`default_minibatch`); module
  :mod:`apts_jax.apts_transform`;
* :mod:`~apts_jax.parallel` — subdomain layouts over devices, jitted APTS/SAPTS steps, and
  full-batch APTS :func:`solve` (also ``apts_jax.solve``);
* modules :mod:`~apts_jax.lsr1` (compact L-SR1 memory), :mod:`~apts_jax.obs` (OBS subproblem
  solver), :mod:`~apts_jax.radius` (ratio and radius update), :mod:`~apts_jax.tr_model`
  (model steps).

Compatibility: the modules were ``apts_jax.apts`` and ``apts_jax.trust_region``; ``from
apts_jax.apts import ...`` and ``from apts_jax.trust_region import ...`` keep working (module
aliases), while the attributes ``apts_jax.apts`` and ``apts_jax.trust_region`` are the factories.
"""

import sys as _sys

from apts_jax import apts_transform, lsr1, obs, parallel, radius, tr, tr_model
from apts_jax.apts_transform import (
    DEFAULT_OPTIONS,
    PAPER,
    TUNING_FREE,
    APTSInfo,
    APTSOptions,
    APTSState,
    apts,
    apts_state_specs,
    default_minibatch,
    to_varying,
)
from apts_jax.minimize import MinimizeStats, minimize
from apts_jax.parallel import solve
from apts_jax.radius import DEFAULT_RADIUS_CONFIG, RadiusConfig
from apts_jax.tr import TrustRegionInfo, TrustRegionState, trust_region

# The old module names, for ``from apts_jax.apts import ...`` (the attribute is the factory).
_sys.modules.setdefault(__name__ + ".apts", apts_transform)
_sys.modules.setdefault(__name__ + ".trust_region", tr)

__all__ = [
    "DEFAULT_OPTIONS",
    "PAPER",
    "TUNING_FREE",
    "APTSInfo",
    "APTSOptions",
    "APTSState",
    "DEFAULT_RADIUS_CONFIG",
    "MinimizeStats",
    "RadiusConfig",
    "TrustRegionInfo",
    "TrustRegionState",
    "apts",
    "apts_state_specs",
    "apts_transform",
    "default_minibatch",
    "lsr1",
    "minimize",
    "obs",
    "parallel",
    "radius",
    "solve",
    "to_varying",
    "tr",
    "tr_model",
    "trust_region",
]
