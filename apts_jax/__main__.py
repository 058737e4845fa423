"""``python -m apts_jax``: the main job (see :mod:`apts_jax.demo`)."""

from apts_jax.demo import main

raise SystemExit(main())
