"""``python -m apts_jax [train] [options]``: the ``apts-jax`` command line.

With no arguments it runs the default training job (see ``python -m apts_jax train --help``).
"""

from apts_jax.app.cli import main

raise SystemExit(main())
