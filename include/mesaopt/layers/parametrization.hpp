#pragma once
// Maps from unconstrained learnable values to constrained layer constants:
//
//   lambda = softplus(lambda_raw) = log(1 + exp(lambda_raw))   in (0, inf)
//   gamma  = sigmoid(forget_raw)  = 1 / (1 + exp(-forget_raw)) in (0, 1)
//
// with their derivatives (dlambda/draw = sigmoid(raw), dgamma/draw =
// gamma (1 - gamma)) and inverses (to initialise from a wanted value). All are
// evaluated in double and in overflow-free forms; callers cast to the layer's
// scalar. softplus was chosen over exp for lambda because it grows linearly:
// a large gradient step on lambda_raw cannot blow lambda up exponentially.
// softplus underflows to 0 below lambda_raw ~ -745 and sigmoid to 0 below
// forget_raw ~ -745: the layers check the mapped values before use.
#include <cmath>

namespace mesaopt::detail {

// log(1 + e^x) without overflow.
inline double softplus(double x) { return x > 0 ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x)); }

// The x with softplus(x) = y, for y > 0: log(e^y - 1) = y + log(1 - e^-y).
inline double softplus_inverse(double y) { return y + std::log(-std::expm1(-y)); }

// 1 / (1 + e^-x) without overflow; also d softplus / dx.
inline double sigmoid(double x) {
  if (x >= 0) return 1.0 / (1.0 + std::exp(-x));
  const double e = std::exp(x);
  return e / (1.0 + e);
}

// The x with sigmoid(x) = p, for 0 < p < 1.
inline double logit(double p) { return std::log(p) - std::log1p(-p); }

}  // namespace mesaopt::detail
