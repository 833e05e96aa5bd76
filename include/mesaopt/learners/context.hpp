#pragma once
// Shared plumbing for the reference in-context learners (docs/math.md §4).
//
// Data convention: a batch of B sequences of T pairs (x_t, y_t), stored
// sequence-major: x is (B*T, dx), y is (B*T, dy), sequence b in rows
// [b*T, (b+1)*T). A learner predicts y_t from the context pairs (x_i, y_i),
// i < t, and the query x_t, for every t of every sequence; its predictions are
// (B*T, dy) in the same layout. At t = 1 (row b*T) the context is empty and
// every learner predicts 0.
//
// For the dynamics task x = inputs (s_1..s_T) and y = targets (s_2..s_{T+1}),
// so at position t the context is the pairs (s_i, s_{i+1}), i < t, the query
// s_t and the target s_{t+1} (docs/paper.md §5; the pair (s_0 = 0, s_1) of the
// paper's formulas contributes nothing to any learner here and is omitted).
//
// All learners compute in double precision whatever the storage scalar T.
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parallel.hpp>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace mesaopt::learners {

// A learner with its name, type-erased: predict(x, y, seq_len) -> (B*T, dy).
template <class T>
struct AnyLearner {
  std::string name;
  std::function<RowMatrix<T>(ConstMatrixRef<T> x, ConstMatrixRef<T> y, long seq_len)> predict;
};

// Wraps any learner struct with `name()` and `predict<T>(x, y, seq_len, threads)`.
template <class T, class L>
AnyLearner<T> erase(L learner, int num_threads = 0) {
  AnyLearner<T> out;
  out.name = learner.name();
  out.predict = [learner, num_threads](ConstMatrixRef<T> x, ConstMatrixRef<T> y, long seq_len) {
    return learner.template predict<T>(x, y, seq_len, num_threads);
  };
  return out;
}

}  // namespace mesaopt::learners

namespace mesaopt::detail {

// Throws unless x is (B*T, dx) and y is (B*T, dy) with B, T, dx, dy >= 1.
template <class X, class Y>
void check_context(const char* where, const X& x, const Y& y, long seq_len) {
  detail::check_positive_size(where, "seq_len", seq_len);
  detail::check_positive_size(where, "x.rows()", x.rows());
  detail::check_positive_size(where, "x.cols()", x.cols());
  detail::check_positive_size(where, "y.cols()", y.cols());
  detail::check_size(where, "y.rows()", y.rows(), x.rows(), "x.rows()");
  if (x.rows() % seq_len != 0) {
    detail::fail(where, "x has ", x.rows(), " rows, not a multiple of seq_len ", seq_len);
  }
}

// Runs body(X, Y, P) on every sequence (X is (T, dx), Y is (T, dy), both
// double; body writes P (T, dy)). Sequences are independent, so the result does
// not depend on num_threads. Validate everything before calling: body must not throw.
template <class T, class Body>
RowMatrix<T> for_each_sequence(const char* where, ConstMatrixRef<T> x, ConstMatrixRef<T> y, long seq_len,
                               int num_threads, Body&& body) {
  check_context(where, x, y, seq_len);
  const long B = x.rows() / seq_len;
  RowMatrix<T> pred(x.rows(), y.cols());
  mesaopt::parallel_for(B, num_threads, [&](std::ptrdiff_t b) {
    const RowMatrix<double> X = x.middleRows(b * seq_len, seq_len).template cast<double>();
    const RowMatrix<double> Y = y.middleRows(b * seq_len, seq_len).template cast<double>();
    RowMatrix<double> P = RowMatrix<double>::Zero(seq_len, y.cols());
    body(X, Y, P);
    pred.middleRows(b * seq_len, seq_len) = P.cast<T>();
  });
  return pred;
}

inline std::string format_number(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

}  // namespace mesaopt::detail

namespace mesaopt::learners {

// Per-position loss curve: entry t-1 is the mean over sequences of
// 1/2 ||target_t - prediction_t||^2 (docs/paper.md §1). pred and target are (B*T, d).
template <class P, class Y>
std::vector<double> loss_curve(const P& pred, const Y& target, long seq_len) {
  const char* where = "loss_curve";
  detail::check_positive_size(where, "seq_len", seq_len);
  detail::check_shape(where, "pred", pred, target.rows(), target.cols());
  detail::check_positive_size(where, "target.rows()", target.rows());
  if (target.rows() % seq_len != 0) {
    detail::fail(where, "target has ", target.rows(), " rows, not a multiple of seq_len ", seq_len);
  }
  const long B = target.rows() / seq_len;
  std::vector<double> curve(static_cast<std::size_t>(seq_len), 0.0);
  for (long b = 0; b < B; ++b)  // fixed order: reproducible sums
    for (long t = 0; t < seq_len; ++t) {
      const long r = b * seq_len + t;
      curve[static_cast<std::size_t>(t)] +=
          0.5 * (target.row(r).template cast<double>() - pred.row(r).template cast<double>()).squaredNorm();
    }
  for (double& v : curve) v /= static_cast<double>(B);
  return curve;
}

// Mean of a curve (the paper's "avg" = mean over t = 1..T).
inline double mean_of(const std::vector<double>& curve) {
  double s = 0.0;
  for (double v : curve) s += v;
  return curve.empty() ? 0.0 : s / static_cast<double>(curve.size());
}

}  // namespace mesaopt::learners
