#pragma once
// A reusable finite-difference gradient checker for the hand-written backward
// passes. The project's rule: every backward is checked in double for every
// input and parameter, relative error below 1e-6.
//
// Usage:
//   auto loss = [&] { forward(...); return (out.array() * w.array()).sum(); };  // dL/dout = w
//   backward(..., dq, ...);
//   auto r = mesaopt::test::check_gradient(loss, q, dq);
//   INFO(r.describe("dq")); CHECK(r.error < 1e-6);
//
// The error metric: max_i |analytic_i - numeric_i| / max(||analytic||_inf,
// ||numeric||_inf, floor). Scaled by the whole gradient's magnitude, it does not
// blow up at entries whose gradient is (near) zero, yet a wrong entry of any
// size shows up; the floor keeps an all-zero gradient from dividing by zero.
#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <sstream>
#include <string>
#include <vector>

namespace mesaopt::test {

struct GradCheckResult {
  double error = 0;           // the metric above
  std::size_t worst = 0;      // index of the worst entry
  double analytic_worst = 0;  // analytic gradient there
  double numeric_worst = 0;   // central difference there
  double scale = 0;           // the denominator used
  std::size_t size = 0;

  std::string describe(const std::string& name) const {
    std::ostringstream os;
    os << name << ": relative error " << error << " at entry " << worst << " of " << size << " (analytic "
       << analytic_worst << ", numeric " << numeric_worst << ", scale " << scale << ")";
    return os.str();
  }
};

// Central differences of loss() with respect to x[0..n), perturbing in place
// and restoring each entry exactly. h is relative to max(1, |x_i|).
template <class Loss>
std::vector<double> numeric_gradient(Loss&& loss, double* x, std::size_t n, double h = 1e-5) {
  std::vector<double> g(n);
  for (std::size_t i = 0; i < n; ++i) {
    const double saved = x[i];
    const double step = h * std::max(1.0, std::abs(saved));
    x[i] = saved + step;
    const double up = loss();
    x[i] = saved - step;
    const double down = loss();
    x[i] = saved;
    g[i] = (up - down) / (2 * step);
  }
  return g;
}

inline GradCheckResult compare_gradients(const double* analytic, const double* numeric, std::size_t n,
                                         double floor = 1e-8) {
  GradCheckResult r;
  r.size = n;
  double amax = 0, nmax = 0, worst_diff = -1;
  for (std::size_t i = 0; i < n; ++i) {
    amax = std::max(amax, std::abs(analytic[i]));
    nmax = std::max(nmax, std::abs(numeric[i]));
    const double diff = std::abs(analytic[i] - numeric[i]);
    if (!(diff <= worst_diff)) {  // also catches NaN
      worst_diff = diff;
      r.worst = i;
    }
  }
  r.scale = std::max({amax, nmax, floor});
  r.error = std::isnan(worst_diff) ? INFINITY : worst_diff / r.scale;
  if (n > 0) {
    r.analytic_worst = analytic[r.worst];
    r.numeric_worst = numeric[r.worst];
  }
  return r;
}

// Raw-buffer form: x has n entries, analytic holds dL/dx.
template <class Loss>
GradCheckResult check_gradient(Loss&& loss, double* x, const double* analytic, std::size_t n, double h = 1e-5) {
  const std::vector<double> numeric = numeric_gradient(loss, x, n, h);
  return compare_gradients(analytic, numeric.data(), n);
}

// Eigen form: x and analytic are contiguous dense double objects of equal size.
template <class Loss, class X, class G>
GradCheckResult check_gradient(Loss&& loss, Eigen::DenseBase<X>& x, const Eigen::DenseBase<G>& analytic,
                               double h = 1e-5) {
  return check_gradient(loss, x.derived().data(), analytic.derived().data(), static_cast<std::size_t>(x.size()),
                        h);
}

// Scalar form, e.g. for lambda.
template <class Loss>
GradCheckResult check_gradient(Loss&& loss, double& x, double analytic, double h = 1e-5) {
  return check_gradient(loss, &x, &analytic, 1, h);
}

// Central differences of loss() w.r.t. every entry of the matrix m, compared
// with `analytic` (same shape). symmetric: perturb (i, j) and (j, i) together
// (a state such as mesa's R must stay symmetric) and compare with the
// symmetric analytic gradient G_ij.
template <class Loss, class Matrix, class Analytic>
GradCheckResult fd_matrix(Loss&& loss, Matrix& m, const Analytic& analytic, bool symmetric, double h = 1e-5) {
  std::vector<double> num(std::size_t(m.size())), ana(std::size_t(m.size()));
  for (long i = 0; i < m.rows(); ++i)
    for (long j = 0; j < m.cols(); ++j) {
      const std::size_t idx = std::size_t(i * m.cols() + j);
      ana[idx] = analytic(i, j);
      if (symmetric && j < i) {
        num[idx] = num[std::size_t(j * m.cols() + i)];
        continue;
      }
      const double a = m(i, j), step = h * std::max(1.0, std::abs(a));
      auto set = [&](double x) {
        m(i, j) = x;
        if (symmetric) m(j, i) = x;
      };
      set(a + step);
      const double up = loss();
      set(a - step);
      const double down = loss();
      set(a);
      num[idx] = (up - down) / (2 * step) / (symmetric && i != j ? 2.0 : 1.0);
    }
  return compare_gradients(ana.data(), num.data(), ana.size());
}

}  // namespace mesaopt::test
