#pragma once
// Optional L2 normalisation of queries and keys, per head and per token
// (docs/paper.md §2: "an option to L2-normalise queries and keys"), used by the
// linear-attention and mesa layers:
//
//   y = x r,   r = (|x|^2 + eps)^(-1/2)
//
// eps = 1e-12 keeps an all-zero row finite (y = 0) and is negligible for rows
// of ordinary size. Differentiating (exactly, eps included):
//
//   dL/dx = r (g - (g . y) y),   g = dL/dy
//
// (from dr/dx = -r^3 x, so (g . x) dr/dx = -r (g . y) y).
#include <mesaopt/common/matrix.hpp>

#include <cmath>

namespace mesaopt::detail {

template <class T>
constexpr T kQkNormEps = T(1e-12);

// Normalises every row of x (n, m) in place and writes r for row t to
// inv_norm[t * inv_stride].
template <class T>
void l2_normalize_rows_forward(MatrixRef<T> x, T* inv_norm, long inv_stride) {
  for (long t = 0; t < x.rows(); ++t) {
    T* row = x.data() + t * x.outerStride();
    T s = 0;
    for (long j = 0; j < x.cols(); ++j) s += row[j] * row[j];
    const T r = T(1) / std::sqrt(s + kQkNormEps<T>);
    for (long j = 0; j < x.cols(); ++j) row[j] *= r;
    inv_norm[t * inv_stride] = r;
  }
}

// y (n, m) holds the normalised rows, inv_norm their r; g (n, m) holds dL/dy
// on entry and dL/dx on return.
template <class T>
void l2_normalize_rows_backward(ConstMatrixRef<T> y, const T* inv_norm, long inv_stride, MatrixRef<T> g) {
  for (long t = 0; t < y.rows(); ++t) {
    const T* yr = y.data() + t * y.outerStride();
    T* gr = g.data() + t * g.outerStride();
    T gy = 0;
    for (long j = 0; j < y.cols(); ++j) gy += gr[j] * yr[j];
    const T r = inv_norm[t * inv_stride];
    for (long j = 0; j < y.cols(); ++j) gr[j] = r * (gr[j] - gy * yr[j]);
  }
}

}  // namespace mesaopt::detail
