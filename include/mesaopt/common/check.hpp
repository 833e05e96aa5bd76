#pragma once
// Argument validation for public entry points. Every failure throws
// std::invalid_argument with a message naming the argument and the values,
// e.g. "mesa_forward: k has 5 rows but q has 6 (expected equal)".
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>

namespace mesaopt::detail {

template <class... Parts>
[[noreturn]] void fail(const char* where, const Parts&... parts) {
  std::ostringstream os;
  os << where << ": ";
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

// Throws unless `value == expected`.
inline void check_size(const char* where, const char* what, long value, long expected,
                       const char* expected_what) {
  if (value != expected) {
    fail(where, what, " is ", value, " but ", expected_what, " is ", expected, " (expected equal)");
  }
}

// Throws unless value >= 1.
inline void check_positive_size(const char* where, const char* what, long value) {
  if (value < 1) fail(where, what, " must be at least 1, got ", value);
}

// Throws unless `value` is finite and > 0.
template <class T>
void check_positive_finite(const char* where, const char* what, T value) {
  if (!(std::isfinite(value) && value > T(0))) {
    fail(where, what, " must be finite and > 0, got ", value);
  }
}

// Throws unless `value` is finite and lies in (lo, hi].
template <class T>
void check_half_open(const char* where, const char* what, T value, T lo, T hi) {
  if (!(std::isfinite(value) && value > lo && value <= hi)) {
    fail(where, what, " must lie in (", lo, ", ", hi, "], got ", value);
  }
}

// Throws unless the matrix-like `m` is rows x cols.
template <class M>
void check_shape(const char* where, const char* what, const M& m, long rows, long cols) {
  if (m.rows() != rows || m.cols() != cols) {
    fail(where, what, " is ", m.rows(), " x ", m.cols(), " but must be ", rows, " x ", cols);
  }
}

}  // namespace mesaopt::detail
