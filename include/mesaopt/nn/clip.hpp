#pragma once
// Element-wise activation clipping to [-c, c] (docs/paper.md §2: activations are
// clipped to ±4 after each block in the constructed-token runs):
//   y = min(max(x, -c), c),   dy/dx = 1 where |x| <= c, 0 where |x| > c.
// At |x| == c the clamp is the identity on its closed interval, so the gradient
// passes there; NaN inputs stay NaN in y and get zero gradient.
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>

#include <cstdint>
#include <vector>

namespace mesaopt::nn {

// What backward needs: one byte per element, 1 where the gradient passes.
template <class T>
struct ClipCache {
  long rows = 0, cols = 0;
  std::vector<std::uint8_t> pass;  // rows * cols, row-major
};

// x and y are (rows, cols); c > 0. y may alias x.
template <class T>
void clip_forward(ConstMatrixRef<T> x, identity_t<T> c, MatrixRef<T> y, ClipCache<T>& cache) {
  detail::check_positive_finite("clip_forward", "c", c);
  detail::check_shape("clip_forward", "y", y, x.rows(), x.cols());
  cache.rows = x.rows();
  cache.cols = x.cols();
  cache.pass.assign(static_cast<std::size_t>(x.rows() * x.cols()), 0);
  for (long r = 0; r < x.rows(); ++r) {
    for (long j = 0; j < x.cols(); ++j) {
      const T v = x(r, j);
      const bool inside = v >= -c && v <= c;  // false for NaN
      cache.pass[static_cast<std::size_t>(r * x.cols() + j)] = inside ? 1 : 0;
      y(r, j) = inside ? v : (v > c ? c : (v < -c ? -c : v));
    }
  }
}

// dy and dx are (rows, cols): dx = dy where the input was inside [-c, c], else 0.
template <class T>
void clip_backward(ConstMatrixRef<T> dy, const ClipCache<T>& cache, MatrixRef<T> dx) {
  detail::check_shape("clip_backward", "dy", dy, cache.rows, cache.cols);
  detail::check_shape("clip_backward", "dx", dx, cache.rows, cache.cols);
  for (long r = 0; r < cache.rows; ++r)
    for (long j = 0; j < cache.cols; ++j)
      dx(r, j) = cache.pass[static_cast<std::size_t>(r * cache.cols + j)] ? dy(r, j) : T(0);
}

}  // namespace mesaopt::nn
