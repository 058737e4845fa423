"""The training application of apts_jax: the ``apts-jax train`` command line.

* :mod:`apts_jax.app.cli` — argument parsing and the entry point :func:`main`
  (``apts-jax``, ``python -m apts_jax``);
* :mod:`apts_jax.app.train` — the training loops (APTS, SAPTS, trust region, optax baselines);
* :mod:`apts_jax.app.metrics` — ``metrics.csv`` / ``metrics.jsonl`` and the summary table;
* :mod:`apts_jax.app.plots` — PNG plots (matplotlib, Agg);
* :mod:`apts_jax.app.checkpoint` — atomic orbax checkpoints for ``--resume``.

The numerical core (:mod:`apts_jax` and its other submodules) never imports this package.
"""

from apts_jax.app.cli import main

__all__ = ["main"]
