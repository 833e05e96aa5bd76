#pragma once
// Element-wise activation clipping to [-c, c] (docs/paper.md §2: activations are
// clipped to ±4 after each block in the constructed-token runs):
//   y = min(max(x, -c), c),   dy/dx = 1 where |x| <= c, 0 where |x| > c.
// At |x| == c the clamp is the identity on its closed interval, so the gradient
// passes there; NaN inputs stay NaN in y and get zero gradient.
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>

#include <algorithm>
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
  cache.pass.resize(static_cast<std::size_t>(x.rows() * x.cols()));  // every entry written below
  const T lo = -c, hi = c;
  const long rows = x.rows(), cols = x.cols();  // locals: the stores below could alias the Refs' members
  for (long r = 0; r < rows; ++r) {
    // Row pointers and branch-free selects, so that GCC vectorises the row
    // (the element-wise form through the Refs did not vectorise: 5 % of
    // linear-1L's training step, docs/training.md).
    const T* xr = x.data() + r * x.outerStride();
    T* yr = y.data() + r * y.outerStride();
    std::uint8_t* pr = cache.pass.data() + static_cast<std::size_t>(r * cols);
    for (long j = 0; j < cols; ++j) {
      const T v = xr[j];
      pr[j] = static_cast<std::uint8_t>((v >= lo) & (v <= hi));  // 0 for NaN
      // std::max / std::min return their first argument when a comparison
      // with NaN is false, so NaN stays NaN.
      yr[j] = std::min(std::max(v, lo), hi);
    }
  }
}

// dy and dx are (rows, cols): dx = dy where the input was inside [-c, c], else 0.
// Element-wise: dy and dx may be the same matrix (the model clips its
// gradient in place).
template <class T>
void clip_backward(ConstMatrixRef<T> dy, const ClipCache<T>& cache, MatrixRef<T> dx) {
  detail::check_shape("clip_backward", "dy", dy, cache.rows, cache.cols);
  detail::check_shape("clip_backward", "dx", dx, cache.rows, cache.cols);
  for (long r = 0; r < cache.rows; ++r) {
    const T* dyr = dy.data() + r * dy.outerStride();
    T* dxr = dx.data() + r * dx.outerStride();
    const std::uint8_t* pr = cache.pass.data() + static_cast<std::size_t>(r * cache.cols);
    // The load before the select, so that GCC vectorises the row (with the
    // load under the condition it kept a scalar loop).
    for (long j = 0; j < cache.cols; ++j) {
      const T g = dyr[j];
      dxr[j] = pr[j] ? g : T(0);
    }
  }
}

}  // namespace mesaopt::nn
