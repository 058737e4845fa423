"""The training application of apts_jax: the ``apts-jax train`` command line.

* :mod:`apts_jax.app.cli` — argument parsing and the entry point :func:`main`
  (``apts-jax``, ``python -m apts_jax``);
* :mod:`apts_jax.app.config` — choices, defaults, :class:`~apts_jax.app.config.TrainConfig`,
  :class:`~apts_jax.app.config.UsageError` (no JAX import);
* :mod:`apts_jax.app.train` — a training run: resume, the trainer with its callbacks, outputs;
* :mod:`apts_jax.app.trainer` — the one training loop (:class:`~apts_jax.app.trainer.Trainer`),
  optimizers as ``(init, step, batches)`` triples (:class:`~apts_jax.app.trainer.Method`);
* :mod:`apts_jax.app.methods` — the optimizers (APTS, SAPTS, trust region, optax baselines);
* :mod:`apts_jax.app.callbacks` — evaluation, progress bar, checkpoints, metric files, printing;
* :mod:`apts_jax.app.problem` — data, model and loss; evaluation on whole data sets;
* :mod:`apts_jax.app.metrics` — ``metrics.csv`` / ``metrics.jsonl`` and the summary table;
* :mod:`apts_jax.app.plots` — PNG plots (matplotlib, Agg);
* :mod:`apts_jax.app.checkpoint` — atomic orbax checkpoints for ``--resume``.

Imports run one way: ``cli`` -> ``config`` (and ``train`` lazily, after configuring JAX);
``train`` -> ``methods``, ``callbacks`` -> ``trainer``, ``problem`` -> ``config``. The numerical
core (:mod:`apts_jax` and its other submodules) never imports this package.
"""

from apts_jax.app.cli import main

__all__ = ["main"]
