#!/usr/bin/env bash
# Builds everything (library tests, benchmarks, examples) and runs the test
# suite with CTest, then builds the Python package and runs its tests with
# pytest: the README's test command.
#
# With --sanitize: the same tests under AddressSanitizer and UBSan
# (-fno-sanitize-recover=all: any finding fails) in build-sanitize/, built
# with clang at -O1 -g1 (line tables for reports). clang compiles these
# Eigen-heavy tests about twice as fast as GCC (test_masking_aliasing with the
# sanitizers: 131 s vs 274 s on one core; docs/building.md), and a second
# compiler is a check of its own. The install/consume test is a packaging
# check with nothing to sanitise; it runs in the plain pass only.
#
# Under CI (.ci/run sets MESAOPT_CI=1) the benchmarks and examples are built in
# the sanitizer pass instead of the plain one, and the examples' smoke runs
# then run under the sanitizers too: CI only checks that they compile and run,
# and compiling them twice was a large share of CI's time. The plain pass
# also compiles every public header on its own (MESAOPT_CHECK_HEADERS).
#
# Open MPI is installed too: with it the suite also trains under mpirun
# (tests/mpi, and the examples' MPI runs). Without MPI (MESAOPT_WITH_MPI=OFF or
# none installed) the same suite builds and runs without those tests: under CI
# the plain pass is configured that way (the check that the core needs no
# MPI, and a shorter CI), the sanitizer pass with MPI.
set -euo pipefail
cd "$(dirname "$0")/.."

jobs=$(nproc)
ci=OFF
[ "${MESAOPT_CI:-}" = 1 ] && ci=ON
if [ "${1:-}" = "--sanitize" ]; then
  bash scripts/install-deps.sh --clang --mpi
  build=build-sanitize
  cmake -S . -B "$build" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1 -DNDEBUG" -DMESAOPT_SANITIZE=address,undefined \
    -DMESAOPT_BUILD_BENCHMARKS=$ci -DMESAOPT_BENCHMARKS_UNOPTIMIZED=$ci -DMESAOPT_BUILD_EXAMPLES=$ci >/dev/null
  exclude=(-E '^install_and_consume$')
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
else
  build=build
  exclude=()
  others=ON
  mpi=ON
  if [ $ci = ON ]; then
    others=OFF
    mpi=OFF  # CI's plain pass is the build without MPI; its sanitizer pass has MPI
  fi
  if [ $mpi = ON ]; then bash scripts/install-deps.sh --mpi; else bash scripts/install-deps.sh; fi
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DMESAOPT_CHECK_HEADERS=ON -DMESAOPT_WITH_MPI=$mpi \
    -DMESAOPT_BUILD_BENCHMARKS=$others -DMESAOPT_BUILD_EXAMPLES=$others >/dev/null
fi
cmake --build "$build" -j "$jobs"
echo "run-tests.sh: configured and built $build in ${SECONDS} s"
ctest --test-dir "$build" --output-on-failure -j "$jobs" "${exclude[@]}"
echo "run-tests.sh: $build built and tested in ${SECONDS} s"

# The Python package (docs/python.md), in the plain pass: scripts/python-env.sh
# builds it into .venv-py with NumPy and JAX from PyPI, then pytest runs its
# tests (the NumPy API against NumPy references and finite differences, the JAX
# functions against jax.grad). MESAOPT_TORCH=1 also installs PyTorch (PyPI's
# CUDA build, about 5 GB and 1-2 minutes) and so runs the mesaopt.torch tests
# (gradcheck); .ci/run sets it. The front ends installed here are required:
# MESAOPT_REQUIRE_FRONTENDS makes their tests fail, not skip, if they do not
# import (python/tests/conftest.py). MESAOPT_PYTHON=0 skips this part.
if [ "${1:-}" != "--sanitize" ] && [ "${MESAOPT_PYTHON:-1}" != 0 ]; then
  torch=()
  frontends=jax
  if [ "${MESAOPT_TORCH:-0}" = 1 ]; then torch=(--torch); frontends=jax,torch; fi
  CMAKE_BUILD_PARALLEL_LEVEL="$jobs" bash scripts/python-env.sh --jax ${torch[@]+"${torch[@]}"}
  MESAOPT_REQUIRE_FRONTENDS=$frontends .venv-py/bin/python -m pytest python/tests -q -rs
  echo "run-tests.sh: Python package built and tested; ${SECONDS} s in all"
fi
