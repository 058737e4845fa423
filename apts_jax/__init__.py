"""apts_jax: data-parallel nonlinearly preconditioned trust-region training (APTS) for JAX.

Reference implementation of Cruz Alegría, Trotti, Kopaničáková, Krause, *Data-Parallel Neural
Network Training via Nonlinearly Preconditioned Trust-Region Method*, with an L-SR1 / OBS
trust-region optimizer for optax.

Public API:

* :func:`trust_region` — the trust-region optimizer as an
  :class:`optax.GradientTransformationExtraArgs` (state :class:`TrustRegionState`,
  diagnostics :class:`TrustRegionInfo`);
* :func:`minimize` — a jitted trust-region solver loop for deterministic problems
  (:class:`MinimizeStats`);
* :class:`RadiusConfig` / :data:`DEFAULT_RADIUS_CONFIG` — the radius constants and their defaults;
* :func:`apts_jax.apts.apts` — data-parallel APTS as an optax transformation (state
  :class:`APTSState`; the module ``apts_jax.apts`` is not shadowed), and
  :mod:`~apts_jax.parallel` — subdomain layouts over devices, jitted APTS/SAPTS steps, and
  full-batch APTS :func:`solve` (also ``apts_jax.solve``);
* modules :mod:`~apts_jax.lsr1` (compact L-SR1 memory), :mod:`~apts_jax.obs` (OBS subproblem
  solver), :mod:`~apts_jax.radius` (ratio and radius update), :mod:`~apts_jax.tr_model`
  (model steps).

Note: the function :func:`trust_region` and :func:`minimize` shadow the submodules of the same name
as attributes of the package; import from the submodules with ``from apts_jax.trust_region import
iteration`` (the ``from`` form always resolves the module).
"""

from apts_jax import apts, lsr1, obs, parallel, radius, tr_model
from apts_jax.apts import APTSInfo, APTSState, to_varying
from apts_jax.minimize import MinimizeStats, minimize
from apts_jax.parallel import solve
from apts_jax.radius import DEFAULT_RADIUS_CONFIG, RadiusConfig
from apts_jax.trust_region import TrustRegionInfo, TrustRegionState, trust_region

__all__ = [
    "APTSInfo",
    "APTSState",
    "DEFAULT_RADIUS_CONFIG",
    "MinimizeStats",
    "RadiusConfig",
    "TrustRegionInfo",
    "TrustRegionState",
    "apts",
    "lsr1",
    "minimize",
    "obs",
    "parallel",
    "radius",
    "solve",
    "to_varying",
    "tr_model",
    "trust_region",
]
