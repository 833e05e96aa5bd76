#pragma once
// Random inputs of the gated mesa op shared by its tests (test_gated_mesa.cpp
// and the two chunkwise test files): well conditioned by construction, so that
// central differences and comparisons between forms measure the code, not the
// problem.
#include <mesaopt/common/matrix.hpp>

#include "test_util.hpp"

#include <cmath>
#include <cstdint>
#include <random>

namespace mesaopt::test::gated {

// Uniform entries in [lo, hi] from a fixed seed.
inline Vector<double> uniform_vector(long n, std::uint64_t seed, double lo, double hi) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(lo, hi);
  Vector<double> x(n);
  for (long i = 0; i < n; ++i) x[i] = u(rng);
  return x;
}

struct Inputs {
  RowMatrix<double> q, k, v;
  Vector<double> beta, gamma, lam;
};

// q and k of norm about 1, gates in the interior of (0, 1] (so central
// differences stay inside), gamma in [gamma_lo, gamma_hi], lambda_diag in
// [0.5, 1.5].
inline Inputs make_inputs(long T, long d, long dv, std::uint64_t seed, double gamma_lo = 0.85,
                          double gamma_hi = 0.99) {
  Inputs in;
  in.q = random_matrix<double>(T, d, seed + 1, 1.0 / std::sqrt(double(d)));
  in.k = random_matrix<double>(T, d, seed + 2, 1.0 / std::sqrt(double(d)));
  in.v = random_matrix<double>(T, dv, seed + 3);
  in.beta = uniform_vector(T, seed + 4, 0.3, 0.99);
  in.gamma = uniform_vector(T, seed + 5, gamma_lo, gamma_hi);
  in.lam = uniform_vector(d, seed + 6, 0.5, 1.5);
  return in;
}

// The inputs in precision T.
template <class T>
struct Cast {
  RowMatrix<T> q, k, v;
  Vector<T> beta, gamma, lam;
  explicit Cast(const Inputs& in)
      : q(in.q.cast<T>()), k(in.k.cast<T>()), v(in.v.cast<T>()), beta(in.beta.cast<T>()),
        gamma(in.gamma.cast<T>()), lam(in.lam.cast<T>()) {}
};

}  // namespace mesaopt::test::gated
