#!/usr/bin/env bash
# Creates a Python virtual environment with the mesaopt package built from
# this checkout (docs/python.md):
#
#   bash scripts/python-env.sh [--venv DIR] [--torch] [--jax] [--python PY]
#
#   --venv DIR    where to create it (default: .venv-py in the repository)
#   --torch       also install PyTorch from PyPI (`pip install torch`; PyPI has
#                 no CPU-only torch for Linux x86_64, so this is the CUDA build
#                 with its nvidia-* wheels: about 5.3 GB, 1-2 minutes; it runs
#                 on the CPU without a GPU). mesaopt.torch needs it
#   --jax         also install JAX (CPU)
#   --python PY   interpreter to build the environment from (default /usr/bin/python3)
#
# On Debian it installs what is missing with apt-get (as root, or via sudo):
# python3 python3-venv python3-dev cmake g++ make libeigen3-dev libxsimd-dev.
# Then: pip install numpy pytest scikit-build-core nanobind, and
# `pip install --no-build-isolation .` of this repository.
# MESAOPT_NATIVE=0 in the environment builds without -march=native.
# Idempotent: rerunning it rebuilds the package in the existing environment
# (incrementally: the CMake build folder is build-py/ in the repository).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-py"
PY=/usr/bin/python3
WITH_TORCH=0
WITH_JAX=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv) VENV="$2"; shift 2 ;;
    --venv=*) VENV="${1#*=}"; shift ;;
    --python) PY="$2"; shift 2 ;;
    --python=*) PY="${1#*=}"; shift ;;
    --torch) WITH_TORCH=1; shift ;;
    --jax) WITH_JAX=1; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "python-env.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

# --- system packages (Debian/Ubuntu), only those missing --------------------
if command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  want=(python3 python3-venv python3-dev cmake g++ make libeigen3-dev libxsimd-dev)
  missing=()
  for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    SUDO=""
    if [[ $(id -u) -ne 0 ]]; then
      if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
        echo "python-env.sh: missing packages ${missing[*]}; run as root or install sudo" >&2; exit 1
      fi
    fi
    echo "python-env.sh: installing ${missing[*]}"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

if ! "$PY" -c 'import sys; assert sys.version_info >= (3, 9)' 2>/dev/null; then
  echo "python-env.sh: $PY is missing or older than Python 3.9" >&2; exit 1
fi

# --- the environment ----------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "python-env.sh: creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip
# numpy and pytest to use and test the package; scikit-build-core and nanobind,
# its build requirements (pyproject.toml), installed here too so that the build
# runs without pip's build isolation: the CMake folder build-py/ then stays
# valid between runs and a rerun recompiles only what changed (an isolated
# build gets a new temporary nanobind path every time and recompiles all).
"$VPY" -m pip install -q numpy pytest "scikit-build-core>=0.10" "nanobind>=2.0"

if [[ $WITH_TORCH -eq 1 ]]; then
  # PyPI's Linux x86_64 torch is the CUDA build: its nvidia-* wheels are
  # dependencies it needs to import (a --no-deps install does not import), so
  # this is a plain install, several GB. CPU-only wheels exist only on
  # PyTorch's own index, which this project does not use.
  if "$VPY" -c 'import torch' 2>/dev/null; then
    echo "python-env.sh: torch $("$VPY" -c 'import torch; print(torch.__version__)') already installed"
  else
    echo "python-env.sh: installing torch from PyPI (CUDA build, about 5 GB; runs on the CPU)"
    "$VPY" -m pip install -q torch
  fi
fi
if [[ $WITH_JAX -eq 1 ]]; then
  echo "python-env.sh: installing jax (CPU)"
  "$VPY" -m pip install -q "jax[cpu]" || "$VPY" -m pip install -q jax jaxlib
fi

# jax (and torch) first: with jax in the environment the build compiles the
# XLA FFI handlers of mesaopt.jax (python/CMakeLists.txt).
# Build parallelism: all cores unless CMAKE_BUILD_PARALLEL_LEVEL says otherwise.
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 1)}"
echo "python-env.sh: building mesaopt (pip install $ROOT; the first build takes a few minutes)"
"$VPY" -m pip install --no-build-isolation "$ROOT"

"$VPY" -c 'import mesaopt, numpy; print("mesaopt", mesaopt.__version__, "simd", mesaopt.simd, "numpy", numpy.__version__)'
if [[ $WITH_TORCH -eq 1 ]]; then
  "$VPY" -c 'import torch, mesaopt.torch; print("torch", torch.__version__, "(mesaopt.torch imports)")'
fi
if [[ $WITH_JAX -eq 1 ]]; then
  "$VPY" -c 'import jax, mesaopt.jax; print("jax", jax.__version__, "(mesaopt.jax imports)")'
fi
echo "python-env.sh: done. Run the tests with: $VENV/bin/python -m pytest $ROOT/python/tests -q"
