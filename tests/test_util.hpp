#pragma once
// Small helpers shared by the tests: seeded random matrices and error metrics.
#include <mesaopt/common/matrix.hpp>

#include <cmath>
#include <cstdint>
#include <exception>
#include <functional>
#include <random>
#include <string>

namespace mesaopt::test {

// True when built with AddressSanitizer (GCC/Clang); tests may shrink their
// very largest sizes then (the plain run still covers the full sizes).
#if defined(__SANITIZE_ADDRESS__)
inline constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
inline constexpr bool kSanitized = true;
#else
inline constexpr bool kSanitized = false;
#endif
#else
inline constexpr bool kSanitized = false;
#endif

// The message of the std::exception f throws, or "<no exception>".
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "<no exception>";
}

// rows x cols standard-normal entries times `scale`, from a fixed seed.
template <class T>
RowMatrix<T> random_matrix(long rows, long cols, std::uint64_t seed, double scale = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n01(0.0, 1.0);
  RowMatrix<T> m(rows, cols);
  for (long i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(scale * n01(rng));
  return m;
}

// ||a - b||_F / max(||b||_F, tiny): relative RMS error of a against b.
template <class A, class B>
double relative_rms(const A& a, const B& b) {
  const double num = (a.template cast<double>() - b.template cast<double>()).norm();
  const double den = b.template cast<double>().norm();
  return num / std::max(den, 1e-300);
}

}  // namespace mesaopt::test
