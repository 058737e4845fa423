#!/usr/bin/env bash
# Fresh-machine entry point for the main job: create .venv (if missing), install the package,
# install Debian's Fashion-MNIST data (if missing and possible), then run `python -m apts_jax`.
# Extra arguments are passed to `python -m apts_jax`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "run.sh: creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
mkdir -p .ci-logs
if ! .venv/bin/python -m pip install -q -e . >.ci-logs/run-pip.log 2>&1; then
  echo "run.sh: pip install failed; last lines of .ci-logs/run-pip.log:" >&2
  tail -n 40 .ci-logs/run-pip.log >&2
  exit 1
fi
bash scripts/install_dataset.sh
exec .venv/bin/python -m apts_jax "$@"
