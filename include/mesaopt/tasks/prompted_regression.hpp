#pragma once
// Few-shot regression posed to a model trained on the dynamics task
// (docs/paper.md §4 "Other tasks", docs/tasks.md "Prompted regression"): the
// paper prompts a Transformer trained to predict s_{t+1} from s_1..s_t with
// the pairs of a regression problem written as a sequence,
//
//     x_1, y_1, [EOS,] x_2, y_2, [EOS,] ..., x_N, y_N     (optionally after P prefix tokens)
//
// and reads the model's next-token prediction at each x_i as its guess of
// y_i. The pairs come from the dynamics' own distribution, so the only thing
// that is new to the model is the layout: W ~ Haar on O(n) per sequence,
// x_i ~ U[-a, a]^n (as s_1 of the dynamics), y_i = W x_i + eps_i,
// eps_i ~ N(0, sigma^2 I). Between pairs the sequence jumps from y_i to an
// unrelated x_{i+1}: a model that fits a regression to consecutive tokens sees
// a wrong pair (y_i, x_{i+1}) for every right one (x_i, y_i). An end-of-
// sequence token after each pair, and a prefix of tokens before the first,
// are vectors of the token space that can be learned with the model frozen
// (prompt tuning): this header builds the prompts from them and maps the
// gradient with respect to the prompt back onto them.
//
// Rows are sequence-major as everywhere in mesaopt: sequence b of a prompt
// batch occupies rows [b S, (b+1) S) with S = PromptLayout::seq_len().
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parallel.hpp>
#include <mesaopt/tasks/linear_dynamics.hpp>
#include <mesaopt/tasks/random.hpp>

#include <cmath>
#include <cstdint>
#include <vector>

namespace mesaopt::tasks {

struct PromptedRegressionConfig {
  long state_dim = 10;      // n: x_i and y_i both live in the dynamics' token space
  long pairs = 16;          // N pairs per sequence
  double noise_std = 0.01;  // sigma of eps_i (the dynamics' noise)
  double init_scale = 1.0;  // a: x_i ~ U[-a, a]^n (the dynamics' s_1)
};

// Where each token of a prompt sits. Pair i (0-based) starts at row
// prefix + i * tokens_per_pair(): x_i, then y_i, then EOS when `eos`.
struct PromptLayout {
  long pairs = 16;   // N
  bool eos = false;  // an EOS token after every pair
  long prefix = 0;   // P prefix tokens before the first pair

  long tokens_per_pair() const { return eos ? 3 : 2; }
  long seq_len() const { return prefix + pairs * tokens_per_pair(); }
  long x_row(long pair) const { return prefix + pair * tokens_per_pair(); }
  long y_row(long pair) const { return x_row(pair) + 1; }
  long eos_row(long pair) const { return x_row(pair) + 2; }  // only with eos
};

template <class T>
struct PromptedRegressionBatch {
  long batch = 0, pairs = 0, state_dim = 0;
  RowMatrix<T> x;               // (B*N, n), sequence-major: row b*N + i is x_{i+1} of sequence b
  RowMatrix<T> y;               // (B*N, n): y_{i+1} = W x_{i+1} + eps
  std::vector<RowMatrix<T>> W;  // B matrices (n, n): the ground truth per sequence
};

inline void validate(const char* where, const PromptedRegressionConfig& c) {
  detail::check_positive_size(where, "state_dim", c.state_dim);
  if (c.pairs < 1) detail::fail(where, "pairs must be >= 1, got ", c.pairs);
  if (!(std::isfinite(c.noise_std) && c.noise_std >= 0.0))
    detail::fail(where, "noise_std must be finite and >= 0, got ", c.noise_std);
  detail::check_positive_finite(where, "init_scale", c.init_scale);
}

inline void validate(const char* where, const PromptLayout& l) {
  if (l.pairs < 1) detail::fail(where, "layout.pairs must be >= 1, got ", l.pairs);
  if (l.prefix < 0) detail::fail(where, "layout.prefix must be >= 0, got ", l.prefix);
}

// Sequences first_sequence .. first_sequence + batch - 1 of the stream keyed
// by `seed`: sequence b draws W, then (x_i, eps_i) for i = 1..N, from stream
// (seed, first_sequence + b). Independent of num_threads.
template <class T = double>
PromptedRegressionBatch<T> make_prompted_regression_batch(const PromptedRegressionConfig& config, long batch,
                                                          std::uint64_t seed, long first_sequence = 0,
                                                          int num_threads = 0) {
  const char* where = "make_prompted_regression_batch";
  validate(where, config);
  detail::check_positive_size(where, "batch", batch);
  if (first_sequence < 0) detail::fail(where, "first_sequence must be >= 0, got ", first_sequence);
  const long N = config.pairs, n = config.state_dim;
  PromptedRegressionBatch<T> out;
  out.batch = batch;
  out.pairs = N;
  out.state_dim = n;
  out.x.resize(batch * N, n);
  out.y.resize(batch * N, n);
  out.W.resize(static_cast<std::size_t>(batch));
  parallel_for(batch, num_threads, [&](std::ptrdiff_t b) {
    CounterRng rng(seed, static_cast<std::uint64_t>(first_sequence + b));
    const RowMatrix<double> W = detail::haar_orthogonal(n, rng);
    Vector<double> xi(n), yi(n);
    for (long i = 0; i < N; ++i) {
      for (long j = 0; j < n; ++j) xi[j] = rng.uniform(-config.init_scale, config.init_scale);
      yi.noalias() = W * xi;
      for (long j = 0; j < n; ++j) yi[j] += config.noise_std * rng.normal();
      out.x.row(b * N + i) = xi.transpose().cast<T>();
      out.y.row(b * N + i) = yi.transpose().cast<T>();
    }
    out.W[static_cast<std::size_t>(b)] = W.cast<T>();
  });
  return out;
}

namespace detail_prompt {
// T is taken from the batch alone, so eos and prefix may be Eigen expressions.
template <class U>
struct non_deduced {
  using type = U;
};

template <class T>
void check_tokens(const char* where, const PromptedRegressionBatch<T>& batch, const PromptLayout& layout,
                  const Vector<T>& eos, const RowMatrix<T>& prefix) {
  validate(where, layout);
  detail::check_size(where, "layout.pairs", layout.pairs, batch.pairs, "batch.pairs");
  if (layout.eos) detail::check_size(where, "eos.size()", eos.size(), batch.state_dim, "batch.state_dim");
  detail::check_size(where, "prefix.rows()", prefix.rows(), layout.prefix, "layout.prefix");
  if (layout.prefix > 0) detail::check_size(where, "prefix.cols()", prefix.cols(), batch.state_dim, "batch.state_dim");
}
}  // namespace detail_prompt

// The prompts (B*S, n): per sequence the prefix rows, then x_i, y_i and, with
// layout.eos, the EOS vector, for i = 1..N. `eos` (n) is read only with
// layout.eos; `prefix` is (P, n) (any number of columns when P = 0).
template <class T>
RowMatrix<T> prompt_tokens(const PromptedRegressionBatch<T>& batch, const PromptLayout& layout,
                           const typename detail_prompt::non_deduced<Vector<T>>::type& eos,
                           const typename detail_prompt::non_deduced<RowMatrix<T>>::type& prefix) {
  detail_prompt::check_tokens("prompt_tokens", batch, layout, eos, prefix);
  const long S = layout.seq_len(), N = layout.pairs, n = batch.state_dim;
  RowMatrix<T> tokens(batch.batch * S, n);
  for (long b = 0; b < batch.batch; ++b) {
    if (layout.prefix > 0) tokens.middleRows(b * S, layout.prefix) = prefix;
    for (long i = 0; i < N; ++i) {
      tokens.row(b * S + layout.x_row(i)) = batch.x.row(b * N + i);
      tokens.row(b * S + layout.y_row(i)) = batch.y.row(b * N + i);
      if (layout.eos) tokens.row(b * S + layout.eos_row(i)) = eos.transpose();
    }
  }
  return tokens;
}

// The adjoint of prompt_tokens for the learned tokens: given dL/dtokens
// (B*S, n), ADDS to d_eos (n) the sum of the rows at every EOS position of
// every sequence (only with layout.eos) and to d_prefix (P, n) the sum over
// sequences of the prefix rows. The tokens are shared by all sequences and
// pairs, so their gradient is the sum over the places they occupy.
template <class T>
void accumulate_prompt_gradients(ConstMatrixRef<T> d_tokens, long batch, const PromptLayout& layout, Vector<T>& d_eos,
                                 RowMatrix<T>& d_prefix) {
  const char* where = "accumulate_prompt_gradients";
  validate(where, layout);
  detail::check_positive_size(where, "batch", batch);
  const long S = layout.seq_len(), n = d_tokens.cols();
  detail::check_size(where, "d_tokens.rows()", d_tokens.rows(), batch * S, "batch * layout.seq_len()");
  if (layout.eos) detail::check_size(where, "d_eos.size()", d_eos.size(), n, "d_tokens.cols()");
  detail::check_size(where, "d_prefix.rows()", d_prefix.rows(), layout.prefix, "layout.prefix");
  if (layout.prefix > 0) detail::check_size(where, "d_prefix.cols()", d_prefix.cols(), n, "d_tokens.cols()");
  for (long b = 0; b < batch; ++b) {
    if (layout.prefix > 0) d_prefix += d_tokens.middleRows(b * S, layout.prefix);
    if (layout.eos)
      for (long i = 0; i < layout.pairs; ++i) d_eos += d_tokens.row(b * S + layout.eos_row(i)).transpose();
  }
}

// The rows of a model's output (B*S, n) at the x positions, in pair order:
// (B*N, n), row b*N + i the prediction made at x_{i+1}, i.e. the model's guess
// of y_{i+1} (next-token prediction).
template <class T>
RowMatrix<T> predictions_at_queries(ConstMatrixRef<T> outputs, long batch, const PromptLayout& layout) {
  const char* where = "predictions_at_queries";
  validate(where, layout);
  detail::check_positive_size(where, "batch", batch);
  const long S = layout.seq_len(), N = layout.pairs;
  detail::check_size(where, "outputs.rows()", outputs.rows(), batch * S, "batch * layout.seq_len()");
  RowMatrix<T> out(batch * N, outputs.cols());
  for (long b = 0; b < batch; ++b)
    for (long i = 0; i < N; ++i) out.row(b * N + i) = outputs.row(b * S + layout.x_row(i));
  return out;
}

// The adjoint of predictions_at_queries: dL/doutputs (B*S, n) that is
// d_queries' row b*N + i at row b*S + x_row(i) and zero elsewhere.
template <class T>
RowMatrix<T> scatter_query_gradients(ConstMatrixRef<T> d_queries, long batch, const PromptLayout& layout) {
  const char* where = "scatter_query_gradients";
  validate(where, layout);
  detail::check_positive_size(where, "batch", batch);
  const long S = layout.seq_len(), N = layout.pairs;
  detail::check_size(where, "d_queries.rows()", d_queries.rows(), batch * N, "batch * layout.pairs");
  RowMatrix<T> out = RowMatrix<T>::Zero(batch * S, d_queries.cols());
  for (long b = 0; b < batch; ++b)
    for (long i = 0; i < N; ++i) out.row(b * S + layout.x_row(i)) = d_queries.row(b * N + i);
  return out;
}

}  // namespace mesaopt::tasks
