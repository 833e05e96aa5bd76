#!/usr/bin/env bash
# Creates the virtual environment of the peer benchmarks (benchmarks/peers/):
# JAX with optax, and NumPy, from PyPI, in .venv-peers/ at the repository root
# (ignored by git). Idempotent: an existing environment is only checked.
# Not needed to build, test or use mesaopt.
#   bash scripts/setup-peers.sh && .venv-peers/bin/python benchmarks/peers/train_step_jax.py
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-peers
if ! "$venv/bin/python" -c "import jax, optax, numpy" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q "jax[cpu]" optax numpy
fi
"$venv/bin/python" -c "import jax, optax, numpy; print('peers: jax', jax.__version__, 'optax', optax.__version__, 'numpy', numpy.__version__)"
