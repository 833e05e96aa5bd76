#pragma once
// GELU, tanh approximation (Hendrycks & Gimpel 2016; the form used by GPT-2 and
// by jax.nn.gelu(approximate=True), flax's default):
//   y = x/2 (1 + tanh(u)),   u = sqrt(2/pi) (x + 0.044715 x^3)
//   dy/dx = (1 + tanh u)/2 + x/2 (1 - tanh^2 u) sqrt(2/pi) (1 + 3*0.044715 x^2)
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>

#include <cmath>

namespace mesaopt::nn {

// What backward needs: the input.
template <class T>
struct GeluCache {
  RowMatrix<T> x;  // (rows, cols)
};

}  // namespace mesaopt::nn

namespace mesaopt::detail {
inline constexpr double kSqrt2OverPi = 0.79788456080286535587989211986876;
inline constexpr double kGeluCubic = 0.044715;

template <class T>
T gelu(T x) {
  const T u = T(kSqrt2OverPi) * (x + T(kGeluCubic) * x * x * x);
  return T(0.5) * x * (T(1) + std::tanh(u));
}
template <class T>
T gelu_derivative(T x) {
  const T u = T(kSqrt2OverPi) * (x + T(kGeluCubic) * x * x * x);
  const T th = std::tanh(u);
  return T(0.5) * (T(1) + th) +
         T(0.5) * x * (T(1) - th * th) * T(kSqrt2OverPi) * (T(1) + T(3 * kGeluCubic) * x * x);
}
}  // namespace mesaopt::detail

namespace mesaopt::nn {

// x and y are (rows, cols), element-wise.
template <class T>
void gelu_forward(ConstMatrixRef<T> x, MatrixRef<T> y, GeluCache<T>& cache) {
  detail::check_shape("gelu_forward", "y", y, x.rows(), x.cols());
  cache.x = x;
  for (long r = 0; r < x.rows(); ++r)
    for (long c = 0; c < x.cols(); ++c) y(r, c) = detail::gelu(x(r, c));
}

// dy and dx are (rows, cols): dx = gelu'(x) * dy.
template <class T>
void gelu_backward(ConstMatrixRef<T> dy, const GeluCache<T>& cache, MatrixRef<T> dx) {
  detail::check_shape("gelu_backward", "dy", dy, cache.x.rows(), cache.x.cols());
  detail::check_shape("gelu_backward", "dx", dx, cache.x.rows(), cache.x.cols());
  for (long r = 0; r < dy.rows(); ++r)
    for (long c = 0; c < dy.cols(); ++c) dx(r, c) = detail::gelu_derivative(cache.x(r, c)) * dy(r, c);
}

}  // namespace mesaopt::nn
