#!/usr/bin/env bash
# Builds everything (library tests, benchmarks, examples) and runs the test
# suite with CTest. With --sanitize, builds the tests with AddressSanitizer and
# UBSan (-fno-sanitize-recover=all: any finding fails) in build-sanitize/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh

jobs=$(nproc)
if [ "${1:-}" = "--sanitize" ]; then
  build=build-sanitize
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMESAOPT_SANITIZE=address,undefined \
    -DMESAOPT_BUILD_BENCHMARKS=OFF -DMESAOPT_BUILD_EXAMPLES=OFF >/dev/null
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
else
  build=build
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
fi
cmake --build "$build" -j "$jobs"
ctest --test-dir "$build" --output-on-failure -j "$jobs"
