#!/usr/bin/env bash
# Fuzzes the checkpoint / safetensors loader for a fixed time:
#   scripts/run-fuzz.sh [seconds]        (default 60)
# Configures build-fuzz/ with clang++ (MESAOPT_BUILD_FUZZERS=ON), builds the
# libFuzzer target tests/fuzz/fuzz_safetensors.cpp (with ASan + UBSan) and
# its seed corpus (valid checkpoints written by the library's own
# save_checkpoint, at build time), then runs it for `seconds`. New inputs
# accumulate in build-fuzz/corpus/safetensors/; a crash, sanitizer report,
# invariant violation, leak or slow input (> 10 s) leaves its input as
# build-fuzz/crash-* (or leak-*, timeout-*) and makes this script exit
# non-zero. Reproduce one with: build-fuzz/tests/fuzz/fuzz_safetensors FILE
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
case "$seconds" in
  ''|*[!0-9]*) echo "usage: $0 [seconds]" >&2; exit 2 ;;
esac
bash scripts/install-deps.sh --fuzz

build=build-fuzz
cmake -S . -B "$build" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMESAOPT_BUILD_FUZZERS=ON -DMESAOPT_BUILD_TESTS=OFF -DMESAOPT_BUILD_BENCHMARKS=OFF \
  -DMESAOPT_BUILD_EXAMPLES=OFF -DMESAOPT_OPENMP=OFF >/dev/null
cmake --build "$build" -j "$(nproc)" --target fuzz_safetensors fuzz_seed_corpus

corpus="$build/corpus/safetensors"
mkdir -p "$corpus"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
"$build/tests/fuzz/fuzz_safetensors" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
  -dict=tests/fuzz/safetensors.dict -print_final_stats=1 -artifact_prefix="$build/" \
  "$corpus" "$build/tests/fuzz/seeds/safetensors"
