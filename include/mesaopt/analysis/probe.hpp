#pragma once
// Linear probes (docs/analysis.md, "Linear probes"; docs/math.md §7, M24-M25):
// ridge regression from activations X (N, D) to a per-token target Y (N, k),
// fitted on one set of sequences and scored on another.
//
//   fit:    x̄, ȳ = column means of the fit set (when intercept), Xc = X - x̄, Yc = Y - ȳ
//           W = (Xcᵀ Xc + ρ I)⁻¹ Xcᵀ Yc  (D, k),   b = ȳ - Wᵀ x̄                   (M24)
//           (ρ = 0: the minimum-norm least-squares solution)
//   score:  Ŷ = X W + b on the evaluation set;
//           MSE = mean over rows and columns of (Y - Ŷ)²,
//           R²  = 1 - Σ (Y - Ŷ)² / Σ (Y - ȳ_eval)²   (sums over all entries;
//                 ȳ_eval = the evaluation set's column means)                  (M25)
//
// R² is NaN when the evaluation target has no variance (e.g. s_0 = 0 at t = 1).
// Activations are (B*T, D) sequence-major like every batch in mesaopt; a probe
// "per position" is fitted and scored on the rows of one position t only.
// All arithmetic is in double whatever the storage scalar.
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>

#include <Eigen/Cholesky>
#include <Eigen/QR>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace mesaopt::analysis {

struct ProbeScore {
  double r2 = 0.0;   // coefficient of determination on the evaluation set (M25)
  double mse = 0.0;  // mean squared error per entry on the evaluation set
};

// A fitted linear read-out: predict(X) = X W + b.
struct LinearProbe {
  RowMatrix<double> weight;  // (D, k)
  Vector<double> bias;       // (k), zero without intercept

  template <class M>
  RowMatrix<double> predict(const M& x) const {
    if (x.cols() != weight.rows())
      detail::fail("LinearProbe::predict", "x has ", x.cols(), " columns but the probe reads ", weight.rows(),
                   " (expected equal)");
    RowMatrix<double> y = x.template cast<double>() * weight;
    y.rowwise() += bias.transpose();
    return y;
  }
};

struct ProbeOptions {
  double ridge = 1e-6;    // ρ >= 0 of M24 (absolute, not scaled by the number of rows)
  bool intercept = true;  // fit (and do not penalise) a bias
};

}  // namespace mesaopt::analysis

namespace mesaopt::detail {

inline void check_probe_options(const char* where, const analysis::ProbeOptions& o) {
  if (!(std::isfinite(o.ridge) && o.ridge >= 0)) fail(where, "options.ridge must be finite and >= 0, got ", o.ridge);
}

template <class X, class Y>
void check_probe_data(const char* where, const char* xname, const X& x, const char* yname, const Y& y) {
  check_positive_size(where, (std::string(xname) + ".rows()").c_str(), x.rows());
  check_positive_size(where, (std::string(xname) + ".cols()").c_str(), x.cols());
  check_positive_size(where, (std::string(yname) + ".cols()").c_str(), y.cols());
  if (y.rows() != x.rows())
    fail(where, yname, " has ", y.rows(), " rows but ", xname, " has ", x.rows(), " (expected equal)");
}

}  // namespace mesaopt::detail

namespace mesaopt::analysis {

// Fits M24 on (x, y): x (N, D), y (N, k).
template <class X, class Y>
LinearProbe fit_linear_probe(const X& x_in, const Y& y_in, const ProbeOptions& options = {}) {
  const char* where = "fit_linear_probe";
  detail::check_probe_options(where, options);
  detail::check_probe_data(where, "x", x_in, "y", y_in);
  RowMatrix<double> x = x_in.template cast<double>();
  RowMatrix<double> y = y_in.template cast<double>();
  const long D = x.cols(), k = y.cols();
  Vector<double> xm = Vector<double>::Zero(D), ym = Vector<double>::Zero(k);
  if (options.intercept) {
    xm = x.colwise().mean().transpose();
    ym = y.colwise().mean().transpose();
    x.rowwise() -= xm.transpose();
    y.rowwise() -= ym.transpose();
  }
  LinearProbe p;
  if (options.ridge > 0) {
    RowMatrix<double> A = x.transpose() * x;
    A.diagonal().array() += options.ridge;
    p.weight = A.ldlt().solve(x.transpose() * y);
  } else {
    p.weight = x.completeOrthogonalDecomposition().solve(y);
  }
  p.bias = ym - p.weight.transpose() * xm;
  return p;
}

// M25 of the probe on (x, y).
template <class X, class Y>
ProbeScore score_linear_probe(const LinearProbe& probe, const X& x, const Y& y_in) {
  const char* where = "score_linear_probe";
  detail::check_probe_data(where, "x", x, "y", y_in);
  if (y_in.cols() != probe.weight.cols())
    detail::fail(where, "y has ", y_in.cols(), " columns but the probe predicts ", probe.weight.cols(),
                 " (expected equal)");
  const RowMatrix<double> y = y_in.template cast<double>();
  const RowMatrix<double> pred = probe.predict(x);
  const double ss_res = (y - pred).squaredNorm();
  const double ss_tot = (y.rowwise() - y.colwise().mean()).squaredNorm();
  ProbeScore s;
  s.mse = ss_res / double(y.size());
  s.r2 = ss_tot > 0 ? 1.0 - ss_res / ss_tot : std::numeric_limits<double>::quiet_NaN();
  return s;
}

// Fit on (x_fit, y_fit), score on (x_eval, y_eval).
template <class X1, class Y1, class X2, class Y2>
ProbeScore probe(const X1& x_fit, const Y1& y_fit, const X2& x_eval, const Y2& y_eval,
                 const ProbeOptions& options = {}) {
  const char* where = "probe";
  detail::check_probe_data(where, "x_eval", x_eval, "y_eval", y_eval);
  if (x_eval.cols() != x_fit.cols() || y_eval.cols() != y_fit.cols())
    detail::fail(where, "evaluation data is ", x_eval.cols(), " -> ", y_eval.cols(), " columns but fit data is ",
                 x_fit.cols(), " -> ", y_fit.cols(), " (expected equal)");
  return score_linear_probe(fit_linear_probe(x_fit, y_fit, options), x_eval, y_eval);
}

// One probe per position t = 1..T: fitted on rows {b*T + t-1} of the fit set
// and scored on the same rows of the evaluation set (sequence-major batches of
// seq_len; the two sets may hold different numbers of sequences). Entry t-1.
template <class X1, class Y1, class X2, class Y2>
std::vector<ProbeScore> probe_per_position(const X1& x_fit, const Y1& y_fit, const X2& x_eval, const Y2& y_eval,
                                           long seq_len, const ProbeOptions& options = {}) {
  const char* where = "probe_per_position";
  detail::check_positive_size(where, "seq_len", seq_len);
  detail::check_probe_options(where, options);
  detail::check_probe_data(where, "x_fit", x_fit, "y_fit", y_fit);
  detail::check_probe_data(where, "x_eval", x_eval, "y_eval", y_eval);
  if (x_fit.rows() % seq_len != 0 || x_eval.rows() % seq_len != 0)
    detail::fail(where, "x_fit has ", x_fit.rows(), " rows and x_eval ", x_eval.rows(),
                 "; both must be multiples of seq_len = ", seq_len);
  const long Bf = x_fit.rows() / seq_len, Be = x_eval.rows() / seq_len;
  std::vector<ProbeScore> scores;
  scores.reserve(std::size_t(seq_len));
  for (long t = 0; t < seq_len; ++t) {
    RowMatrix<double> xf(Bf, x_fit.cols()), yf(Bf, y_fit.cols()), xe(Be, x_eval.cols()), ye(Be, y_eval.cols());
    for (long b = 0; b < Bf; ++b) {
      xf.row(b) = x_fit.row(b * seq_len + t).template cast<double>();
      yf.row(b) = y_fit.row(b * seq_len + t).template cast<double>();
    }
    for (long b = 0; b < Be; ++b) {
      xe.row(b) = x_eval.row(b * seq_len + t).template cast<double>();
      ye.row(b) = y_eval.row(b * seq_len + t).template cast<double>();
    }
    scores.push_back(probe(xf, yf, xe, ye, options));
  }
  return scores;
}

// Pooled probes of every captured layer: entry l fits on fit_layers[l] (all
// positions pooled) and scores on eval_layers[l], with the same targets for
// every layer (e.g. Activations::stream of two batches).
template <class M, class Y1, class Y2>
std::vector<ProbeScore> probe_layers(const std::vector<M>& fit_layers, const Y1& y_fit,
                                     const std::vector<M>& eval_layers, const Y2& y_eval,
                                     const ProbeOptions& options = {}) {
  if (fit_layers.size() != eval_layers.size())
    detail::fail("probe_layers", "fit_layers has ", fit_layers.size(), " layers but eval_layers has ",
                 eval_layers.size(), " (expected equal)");
  std::vector<ProbeScore> scores;
  for (std::size_t l = 0; l < fit_layers.size(); ++l)
    scores.push_back(probe(fit_layers[l], y_fit, eval_layers[l], y_eval, options));
  return scores;
}

}  // namespace mesaopt::analysis
