#pragma once
// Tools for comparing a model with a learner (docs/paper.md §4: "the trained
// 1-layer linear model *is* one step of GD"): loss curves side by side,
// agreement of predictions, and fitting a learner's hyperparameter to a model.
#include <mesaopt/learners/context.hpp>

#include <cmath>
#include <functional>
#include <limits>
#include <vector>

namespace mesaopt::learners {

// Any model seen as a predictor on the same data: x (B*T, dx), y (B*T, dy) ->
// predictions (B*T, dy). At position t a causal model may use x_1..x_t and
// y_1..y_{t-1} only; that is the model's responsibility. (For the dynamics task
// y_{t-1} = s_t = x_t, so a model of the inputs alone fits this signature.)
template <class T>
using Model = std::function<RowMatrix<T>(ConstMatrixRef<T> x, ConstMatrixRef<T> y, long seq_len)>;

struct CurveComparison {
  std::vector<double> learner;  // per-position loss of the learner, t = 1..T
  std::vector<double> model;    // per-position loss of the model
};

// Both loss curves on the same batch.
template <class T>
CurveComparison compare_loss_curves(const AnyLearner<T>& learner, const Model<T>& model, ConstMatrixRef<T> x,
                                    ConstMatrixRef<T> y, long seq_len) {
  detail::check_context("compare_loss_curves", x, y, seq_len);
  CurveComparison c;
  c.learner = loss_curve(learner.predict(x, y, seq_len), y, seq_len);
  c.model = loss_curve(model(x, y, seq_len), y, seq_len);
  return c;
}

struct Agreement {
  std::vector<double> squared_difference;  // per position: mean over sequences of ||a_t - b_t||^2
  std::vector<double> cosine;              // per position: mean over sequences of cos(a_t, b_t)
  double mean_squared_difference = 0.0;    // over all positions
  double mean_cosine = 0.0;                // over all positions
};

// Agreement of two prediction sets (B*T, d). The cosine of two zero vectors is
// taken as 1 and of a zero and a nonzero vector as 0 (every learner predicts 0
// at t = 1, where there is no context).
template <class A, class B>
Agreement agreement(const A& pred_a, const B& pred_b, long seq_len) {
  const char* where = "agreement";
  detail::check_positive_size(where, "seq_len", seq_len);
  detail::check_shape(where, "pred_b", pred_b, pred_a.rows(), pred_a.cols());
  detail::check_positive_size(where, "pred_a.rows()", pred_a.rows());
  if (pred_a.rows() % seq_len != 0) {
    detail::fail(where, "pred_a has ", pred_a.rows(), " rows, not a multiple of seq_len ", seq_len);
  }
  const long nb = pred_a.rows() / seq_len;
  Agreement g;
  g.squared_difference.assign(static_cast<std::size_t>(seq_len), 0.0);
  g.cosine.assign(static_cast<std::size_t>(seq_len), 0.0);
  for (long b = 0; b < nb; ++b)
    for (long t = 0; t < seq_len; ++t) {
      const auto a = pred_a.row(b * seq_len + t).template cast<double>();
      const auto c = pred_b.row(b * seq_len + t).template cast<double>();
      g.squared_difference[static_cast<std::size_t>(t)] += (a - c).squaredNorm();
      const double na = a.norm(), nc = c.norm();
      const double cs = (na == 0.0 || nc == 0.0) ? (na == nc ? 1.0 : 0.0) : a.dot(c) / (na * nc);
      g.cosine[static_cast<std::size_t>(t)] += cs;
    }
  for (long t = 0; t < seq_len; ++t) {
    g.squared_difference[static_cast<std::size_t>(t)] /= static_cast<double>(nb);
    g.cosine[static_cast<std::size_t>(t)] /= static_cast<double>(nb);
  }
  g.mean_squared_difference = mean_of(g.squared_difference);
  g.mean_cosine = mean_of(g.cosine);
  return g;
}

struct Minimum {
  double argmin = 0.0;
  double value = 0.0;
};

// Minimises f on [lo, hi]: a grid of grid_points (geometric when log_scale),
// then golden-section search between the best grid point's neighbours.
template <class F>
Minimum minimize_1d(F&& f, double lo, double hi, bool log_scale = true, int grid_points = 17,
                    int golden_iterations = 30) {
  const char* where = "minimize_1d";
  if (!(std::isfinite(lo) && std::isfinite(hi) && lo < hi)) {
    detail::fail(where, "need finite lo < hi, got lo = ", lo, ", hi = ", hi);
  }
  if (log_scale && !(lo > 0.0)) detail::fail(where, "log_scale needs lo > 0, got lo = ", lo);
  if (grid_points < 3) detail::fail(where, "grid_points must be at least 3, got ", grid_points);
  if (golden_iterations < 0) detail::fail(where, "golden_iterations must be >= 0, got ", golden_iterations);
  // u is the search coordinate: log(p) or p.
  auto to_p = [&](double u) { return log_scale ? std::exp(u) : u; };
  const double ulo = log_scale ? std::log(lo) : lo, uhi = log_scale ? std::log(hi) : hi;
  std::vector<double> us(static_cast<std::size_t>(grid_points)), fs(us.size());
  int best = 0;
  for (int i = 0; i < grid_points; ++i) {
    us[static_cast<std::size_t>(i)] = ulo + (uhi - ulo) * i / (grid_points - 1);
    fs[static_cast<std::size_t>(i)] = f(to_p(us[static_cast<std::size_t>(i)]));
    if (fs[static_cast<std::size_t>(i)] < fs[static_cast<std::size_t>(best)]) best = i;
  }
  Minimum m{to_p(us[static_cast<std::size_t>(best)]), fs[static_cast<std::size_t>(best)]};
  double a = us[static_cast<std::size_t>(std::max(best - 1, 0))];
  double b = us[static_cast<std::size_t>(std::min(best + 1, grid_points - 1))];
  const double g = 0.5 * (std::sqrt(5.0) - 1.0);
  double c = b - g * (b - a), d = a + g * (b - a);
  double fc = f(to_p(c)), fd = f(to_p(d));
  for (int it = 0; it < golden_iterations; ++it) {
    if (fc < fd) {
      b = d; d = c; fd = fc; c = b - g * (b - a); fc = f(to_p(c));
    } else {
      a = c; c = d; fc = fd; d = a + g * (b - a); fd = f(to_p(d));
    }
  }
  if (fc < m.value) m = {to_p(c), fc};
  if (fd < m.value) m = {to_p(d), fd};
  return m;
}

struct FitResult {
  double value = 0.0;     // the fitted hyperparameter
  double residual = 0.0;  // mean over positions of the mean squared prediction difference
  double cosine = 0.0;    // mean cosine similarity at the fit
};

// The hyperparameter p in [lo, hi] for which make(p) (a learner struct) best
// matches model_pred (B*T, dy), in mean squared difference of predictions.
template <class T, class Make>
FitResult fit_to_model(Make&& make, ConstMatrixRef<T> model_pred, ConstMatrixRef<T> x, ConstMatrixRef<T> y,
                       long seq_len, double lo, double hi, bool log_scale = true, int num_threads = 0) {
  detail::check_context("fit_to_model", x, y, seq_len);
  detail::check_shape("fit_to_model", "model_pred", model_pred, y.rows(), y.cols());
  auto residual = [&](double p) {
    return agreement(make(p).template predict<T>(x, y, seq_len, num_threads), model_pred, seq_len)
        .mean_squared_difference;
  };
  const Minimum m = minimize_1d(residual, lo, hi, log_scale);
  const Agreement g = agreement(make(m.argmin).template predict<T>(x, y, seq_len, num_threads), model_pred, seq_len);
  return {m.argmin, g.mean_squared_difference, g.mean_cosine};
}

// Integer hyperparameter (e.g. the number of steps K) in [kmin, kmax], exhaustively.
template <class T, class Make>
FitResult fit_integer_to_model(Make&& make, ConstMatrixRef<T> model_pred, ConstMatrixRef<T> x, ConstMatrixRef<T> y,
                               long seq_len, long kmin, long kmax, int num_threads = 0) {
  detail::check_context("fit_integer_to_model", x, y, seq_len);
  detail::check_shape("fit_integer_to_model", "model_pred", model_pred, y.rows(), y.cols());
  if (kmin > kmax) detail::fail("fit_integer_to_model", "need kmin <= kmax, got ", kmin, " > ", kmax);
  FitResult best;
  best.residual = std::numeric_limits<double>::infinity();
  for (long k = kmin; k <= kmax; ++k) {
    const Agreement g = agreement(make(k).template predict<T>(x, y, seq_len, num_threads), model_pred, seq_len);
    if (g.mean_squared_difference < best.residual) best = {double(k), g.mean_squared_difference, g.mean_cosine};
  }
  return best;
}

// The hyperparameter in [lo, hi] minimising the learner's average loss on
// (x, y) ("optimally tuned" step size, beta, ...). Tune on one batch and
// report on another to avoid a biased estimate.
template <class T, class Make>
Minimum tune_for_loss(Make&& make, ConstMatrixRef<T> x, ConstMatrixRef<T> y, long seq_len, double lo, double hi,
                      bool log_scale = true, int num_threads = 0) {
  detail::check_context("tune_for_loss", x, y, seq_len);
  auto loss = [&](double p) {
    return mean_of(loss_curve(make(p).template predict<T>(x, y, seq_len, num_threads), y, seq_len));
  };
  return minimize_1d(loss, lo, hi, log_scale);
}

}  // namespace mesaopt::learners
