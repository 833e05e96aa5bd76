#!/usr/bin/env bash
# Builds and runs mesaopt's main demo: the paper's constructed-token linear
# dynamics experiment (examples/linear_dynamics.cpp), reduced default settings
# (about 70 s of training on 2 cores, after the build). Arguments are passed on, e.g. --csv out.csv,
# --models linear-1L,mesa-1L (faster), --full (the paper's settings, hours).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DMESAOPT_BUILD_EXAMPLES=ON >/dev/null
cmake --build build -j "$(nproc)" --target linear_dynamics
./build/examples/linear_dynamics "$@"
