#!/usr/bin/env bash
# Installs what mesaopt's build, tests, benchmarks and examples need, from
# Debian's packages, only when something is missing. Idempotent and quiet when
# everything is present. Extra package names may be passed as arguments;
# --fuzz adds what the libFuzzer targets need (scripts/run-fuzz.sh): clang and
# compiler-rt's development package (libclang_rt.fuzzer, ASan, UBSan);
# --clang adds the same and LLVM's OpenMP runtime (the sanitizer pass of
# scripts/run-tests.sh builds with clang); --mpi adds Open MPI (the optional
# mesaopt::distributed target, its tests and the examples under mpirun).
set -euo pipefail

packages=(cmake g++ make libeigen3-dev libxsimd-dev catch2 libbenchmark-dev)
for arg in "$@"; do
  if [ "$arg" = --fuzz ]; then
    packages+=(clang libclang-rt-dev)
  elif [ "$arg" = --clang ]; then
    packages+=(clang libclang-rt-dev libomp-dev)
  elif [ "$arg" = --mpi ]; then
    packages+=(libopenmpi-dev openmpi-bin)
  else
    packages+=("$arg")
  fi
done
missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1; then
  sudo=(sudo)
else
  echo "install-deps: missing ${missing[*]}; run as root or install sudo" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
