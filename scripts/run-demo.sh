#!/usr/bin/env bash
# Builds and runs mesaopt's main demo. Arguments are passed to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)" --target demo
./build/examples/demo "$@"
