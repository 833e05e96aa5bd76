#pragma once
// In-context linear regression (docs/math.md §5): a fresh weight matrix w per
// sequence (dy x dx, entries N(0, weight_std^2)), inputs x_i ~ N(0, I),
// y_i = w x_i + eps_i with eps_i ~ N(0, noise_std^2 I). Each sequence has
// num_pairs pairs; every pair can serve as a query for the pairs before it.
//
// Two token layouts are used in the literature (D = dx + dy in both; x lives
// in the first dx slots, y in the last dy):
//  - paired:      token i = [x_i, y_i], i = 1..N, except the last (query)
//                 token [x_N, 0]; the model predicts y_N at the last token.
//  - alternating: 2N tokens x_1, y_1, x_2, y_2, ... with x tokens [x_i, 0] and
//                 y tokens [0, y_i] (Garg et al. 2022); the model predicts y_i
//                 at the x token of pair i (row 2(i-1)).
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parallel.hpp>
#include <mesaopt/tasks/random.hpp>

#include <cmath>
#include <cstdint>
#include <vector>

namespace mesaopt::tasks {

struct RegressionConfig {
  long input_dim = 10;      // dx
  long output_dim = 1;      // dy
  long num_pairs = 50;      // N pairs per sequence
  double noise_std = 0.0;   // eps ~ N(0, noise_std^2 I)
  double weight_std = 1.0;  // w entries ~ N(0, weight_std^2)
};

template <class T>
struct RegressionBatch {
  long batch = 0, num_pairs = 0, input_dim = 0, output_dim = 0;
  RowMatrix<T> x;               // (B*N, dx), sequence-major
  RowMatrix<T> y;               // (B*N, dy)
  std::vector<RowMatrix<T>> w;  // B matrices (dy, dx): the ground truth per sequence
};

inline void validate(const char* where, const RegressionConfig& c) {
  detail::check_positive_size(where, "input_dim", c.input_dim);
  detail::check_positive_size(where, "output_dim", c.output_dim);
  if (c.num_pairs < 2) detail::fail(where, "num_pairs must be at least 2, got ", c.num_pairs);
  if (!(std::isfinite(c.noise_std) && c.noise_std >= 0.0)) {
    detail::fail(where, "noise_std must be finite and >= 0, got ", c.noise_std);
  }
  detail::check_positive_finite(where, "weight_std", c.weight_std);
}

// Sequences first_sequence .. first_sequence + batch - 1 of the stream keyed by
// `seed`; sequence b draws w, then (x_i, eps_i) for i = 1..N, from stream
// (seed, first_sequence + b). Independent of num_threads.
template <class T = double>
RegressionBatch<T> make_regression_batch(const RegressionConfig& config, long batch, std::uint64_t seed,
                                         long first_sequence = 0, int num_threads = 0) {
  const char* where = "make_regression_batch";
  validate(where, config);
  detail::check_positive_size(where, "batch", batch);
  if (first_sequence < 0) detail::fail(where, "first_sequence must be >= 0, got ", first_sequence);
  const long N = config.num_pairs, dx = config.input_dim, dy = config.output_dim;
  RegressionBatch<T> out;
  out.batch = batch;
  out.num_pairs = N;
  out.input_dim = dx;
  out.output_dim = dy;
  out.x.resize(batch * N, dx);
  out.y.resize(batch * N, dy);
  out.w.resize(static_cast<std::size_t>(batch));
  parallel_for(batch, num_threads, [&](std::ptrdiff_t b) {
    CounterRng rng(seed, static_cast<std::uint64_t>(first_sequence + b));
    RowMatrix<double> w(dy, dx);
    for (long i = 0; i < w.size(); ++i) w.data()[i] = config.weight_std * rng.normal();
    Vector<double> xi(dx), yi(dy);
    for (long i = 0; i < N; ++i) {
      for (long j = 0; j < dx; ++j) xi[j] = rng.normal();
      yi.noalias() = w * xi;
      for (long j = 0; j < dy; ++j) yi[j] += config.noise_std * rng.normal();
      out.x.row(b * N + i) = xi.transpose().cast<T>();
      out.y.row(b * N + i) = yi.transpose().cast<T>();
    }
    out.w[static_cast<std::size_t>(b)] = w.cast<T>();
  });
  return out;
}

// Paired layout: (B*N, dx+dy), token i = [x_i, y_i], last token of each
// sequence [x_N, 0] (the query).
template <class T>
RowMatrix<T> paired_tokens(const RegressionBatch<T>& batch) {
  const long N = batch.num_pairs, dx = batch.input_dim, dy = batch.output_dim;
  RowMatrix<T> e(batch.batch * N, dx + dy);
  e.leftCols(dx) = batch.x;
  e.rightCols(dy) = batch.y;
  for (long b = 0; b < batch.batch; ++b) e.row(b * N + N - 1).tail(dy).setZero();
  return e;
}

// Alternating layout: (B*2N, dx+dy), rows 2i = [x_i, 0], 2i+1 = [0, y_i].
template <class T>
RowMatrix<T> alternating_tokens(const RegressionBatch<T>& batch) {
  const long dx = batch.input_dim, dy = batch.output_dim;
  RowMatrix<T> e = RowMatrix<T>::Zero(2 * batch.x.rows(), dx + dy);
  for (long r = 0; r < batch.x.rows(); ++r) {
    e.row(2 * r).head(dx) = batch.x.row(r);
    e.row(2 * r + 1).tail(dy) = batch.y.row(r);
  }
  return e;
}

// The noise-floor predictor: w x_i with the true w. Returns (B*N, dy).
template <class T>
RowMatrix<T> predict_with_true_weights(const RegressionBatch<T>& batch) {
  RowMatrix<T> pred(batch.x.rows(), batch.output_dim);
  for (long b = 0; b < batch.batch; ++b) {
    pred.middleRows(b * batch.num_pairs, batch.num_pairs).noalias() =
        batch.x.middleRows(b * batch.num_pairs, batch.num_pairs) * batch.w[static_cast<std::size_t>(b)].transpose();
  }
  return pred;
}

}  // namespace mesaopt::tasks
