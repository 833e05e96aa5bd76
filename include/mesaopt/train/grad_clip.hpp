#pragma once
// Gradient clipping, two kinds (docs/paper.md §3):
// - by global norm, as optax's clip_by_global_norm: with
//   N = sqrt(sum over all parameters of ||grad||^2),
//     if N > max_norm:  grad <- grad * (max_norm / N)       (otherwise unchanged)
//   clip_grad_norm returns N (before clipping; accumulated in double). A
//   non-finite N leaves the gradients untouched: the caller sees it in the
//   return value and decides (skip the step, stop).
// - element-wise, as optax's clip (what the paper's code uses, to [-1, 1]):
//     grad_i <- min(max(grad_i, -max_value), max_value)
//   clip_grad_value; a NaN entry stays NaN (the caller's norm check sees it).
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/parameters.hpp>

#include <cmath>
#include <vector>

namespace mesaopt::train {

template <class T>
double global_grad_norm(const std::vector<ParameterView<T>>& params) {
  double sum = 0;
  for (const auto& p : params)
    for (std::size_t i = 0; i < p.size; ++i) sum += static_cast<double>(p.grad[i]) * static_cast<double>(p.grad[i]);
  return std::sqrt(sum);
}

template <class T>
double clip_grad_norm(const std::vector<ParameterView<T>>& params, double max_norm) {
  detail::check_positive_finite("clip_grad_norm", "max_norm", max_norm);
  const double norm = global_grad_norm(params);
  if (std::isfinite(norm) && norm > max_norm) {
    const T scale = static_cast<T>(max_norm / norm);
    for (const auto& p : params)
      for (std::size_t i = 0; i < p.size; ++i) p.grad[i] *= scale;
  }
  return norm;
}

template <class T>
void clip_grad_value(const std::vector<ParameterView<T>>& params, double max_value) {
  detail::check_positive_finite("clip_grad_value", "max_value", max_value);
  const T hi = static_cast<T>(max_value), lo = -hi;
  for (const auto& p : params)
    for (std::size_t i = 0; i < p.size; ++i) {
      const T g = p.grad[i];
      p.grad[i] = g > hi ? hi : (g < lo ? lo : g);  // NaN fails both tests and stays
    }
}

}  // namespace mesaopt::train
