#pragma once
// Gradient clipping by global norm (docs/paper.md §3: the paper's code clips
// element-wise to [-1, 1] instead; this is the global-norm option), as optax's
// clip_by_global_norm: with N = sqrt(sum over all parameters of ||grad||^2),
//   if N > max_norm:  grad <- grad * (max_norm / N)       (otherwise unchanged)
// Returns N (before clipping; accumulated in double). A non-finite N leaves
// the gradients untouched: the caller sees it in the return value and decides
// (skip the step, stop).
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

}  // namespace mesaopt::train
