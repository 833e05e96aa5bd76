#pragma once
// The paper's main task (docs/paper.md §1, docs/math.md §5): sequences of a dynamical
// system with a fresh transition matrix W* per sequence,
//
//     s_{t+1} = W* s_t + eps_t            (linear, the default)
//     s_{t+1} = tanh(W* s_t) + eps_t      (the nonlinear contrast variant)
//
// eps_t ~ N(0, noise_std^2 I), states clipped to [-clip, clip]. Inputs are
// s_1..s_T, targets s_2..s_{T+1}. Defaults are the paper's settings: n = 10,
// T = 50, W* Haar-random orthogonal, s_1 ~ U[-1, 1]^n, noise_std = 0.01,
// clip = 10.
//
// Partially observed variant (docs/paper.md §4, "Other tasks"): with
// observed_dim = n_s > 0 only the first n_s coordinates of s_t are seen: the
// inputs and targets hold those, and the other n - n_s (hidden) coordinates are
// kept apart so that the noise floor can still be computed. The paper's
// setting: n_s = 5 observed of n = 20 (n_h = 15 hidden).
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parallel.hpp>
#include <mesaopt/common/worker_team.hpp>
#include <mesaopt/tasks/random.hpp>

#include <Eigen/Eigenvalues>
#include <Eigen/QR>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace mesaopt::tasks {

// How W* is drawn for each sequence.
enum class TransitionMatrix {
  random_orthogonal,  // Haar measure on O(n): QR of a Gaussian matrix, signs fixed
  gaussian,           // N(0, 1) entries rescaled to spectral radius `spectral_radius`
};

// Distribution of s_1.
enum class InitialState {
  uniform,  // s_1 ~ U[-init_scale, init_scale]^n (the paper's code)
  normal,   // s_1 ~ N(0, init_scale^2 I)         (the paper's text)
};

// The map applied to W* s_t.
enum class Transition {
  linear,  // s_{t+1} = W* s_t + eps
  tanh,    // s_{t+1} = tanh(W* s_t) + eps: linear learners are no longer optimal
};

struct DynamicsConfig {
  long state_dim = 10;     // n
  long seq_len = 50;       // T, number of inputs (and of targets) per sequence
  double noise_std = 0.01;  // sigma: eps ~ N(0, sigma^2 I); 0 allowed
  TransitionMatrix matrix = TransitionMatrix::random_orthogonal;
  double spectral_radius = 0.95;  // used by TransitionMatrix::gaussian only
  InitialState init = InitialState::uniform;
  double init_scale = 1.0;  // half-width (uniform) or standard deviation (normal)
  double clip = 10.0;       // states are clipped to [-clip, clip]
  Transition transition = Transition::linear;
  long observed_dim = 0;    // n_s: only the first n_s coordinates are observed; 0: all n
};

// A batch of B sequences, sequence-major: sequence b occupies rows [b*T, (b+1)*T).
// Fully observed, n_s = n; partially observed, inputs and targets hold the first
// n_s coordinates and hidden_inputs the other n - n_s of the same states.
template <class T>
struct DynamicsBatch {
  long batch = 0, seq_len = 0, state_dim = 0;  // state_dim: n, observed or not
  long observed_dim = 0;          // n_s: the columns of inputs and targets
  RowMatrix<T> inputs;            // (B*T, n_s): row b*T + t-1 is s_t, t = 1..T (its observed part)
  RowMatrix<T> targets;           // (B*T, n_s): row b*T + t-1 is s_{t+1} (its observed part)
  RowMatrix<T> hidden_inputs;     // (B*T, n - n_s): the hidden part of s_t; no columns when fully observed
  std::vector<RowMatrix<T>> W;    // B matrices (n, n): the ground-truth W* per sequence
  Transition transition = Transition::linear;
};

inline void validate(const char* where, const DynamicsConfig& c) {
  detail::check_positive_size(where, "state_dim", c.state_dim);
  if (c.seq_len < 2) detail::fail(where, "seq_len must be at least 2, got ", c.seq_len);
  if (!(std::isfinite(c.noise_std) && c.noise_std >= 0.0)) {
    detail::fail(where, "noise_std must be finite and >= 0, got ", c.noise_std);
  }
  if (c.matrix == TransitionMatrix::gaussian) {
    detail::check_positive_finite(where, "spectral_radius", c.spectral_radius);
  }
  detail::check_positive_finite(where, "init_scale", c.init_scale);
  detail::check_positive_finite(where, "clip", c.clip);
  if (c.observed_dim < 0 || c.observed_dim > c.state_dim) {
    detail::fail(where, "observed_dim must be in [0, state_dim = ", c.state_dim, "] (0: all observed), got ",
                 c.observed_dim);
  }
}

}  // namespace mesaopt::tasks

namespace mesaopt::detail {

// Haar-random orthogonal n x n matrix: QR of a Gaussian matrix with the signs
// of diag(R) moved into Q (Mezzadri 2007), so the law is exactly Haar.
inline RowMatrix<double> haar_orthogonal(long n, tasks::CounterRng& rng) {
  Eigen::MatrixXd g(n, n);
  for (long i = 0; i < n; ++i)
    for (long j = 0; j < n; ++j) g(i, j) = rng.normal();
  Eigen::HouseholderQR<Eigen::MatrixXd> qr(g);
  Eigen::MatrixXd q = qr.householderQ();
  const Eigen::MatrixXd& r = qr.matrixQR();
  for (long j = 0; j < n; ++j)
    if (r(j, j) < 0) q.col(j) = -q.col(j);
  return q;
}

// Gaussian matrix rescaled so that its spectral radius is exactly `radius`.
inline RowMatrix<double> gaussian_with_radius(long n, double radius, tasks::CounterRng& rng) {
  Eigen::MatrixXd g(n, n);
  for (long i = 0; i < n; ++i)
    for (long j = 0; j < n; ++j) g(i, j) = rng.normal();
  const double rho = Eigen::EigenSolver<Eigen::MatrixXd>(g, false).eigenvalues().cwiseAbs().maxCoeff();
  return g * (radius / rho);
}

// One sequence from stream (seed, index): draws W*, then s_1, then the noise
// for each step, in that order.
inline void generate_dynamics_sequence(const tasks::DynamicsConfig& c, std::uint64_t seed, std::uint64_t index,
                                       RowMatrix<double>& W, RowMatrix<double>& states /* (T+1, n) */) {
  tasks::CounterRng rng(seed, index);
  const long n = c.state_dim;
  W = c.matrix == tasks::TransitionMatrix::random_orthogonal ? haar_orthogonal(n, rng)
                                                      : gaussian_with_radius(n, c.spectral_radius, rng);
  states.resize(c.seq_len + 1, n);
  for (long j = 0; j < n; ++j) {
    const double v = c.init == tasks::InitialState::uniform ? rng.uniform(-c.init_scale, c.init_scale)
                                                     : c.init_scale * rng.normal();
    states(0, j) = std::clamp(v, -c.clip, c.clip);
  }
  Vector<double> next(n);
  for (long t = 0; t < c.seq_len; ++t) {
    next.noalias() = W * states.row(t).transpose();
    for (long j = 0; j < n; ++j) {
      double v = c.transition == tasks::Transition::linear ? next[j] : std::tanh(next[j]);
      v += c.noise_std * rng.normal();
      states(t + 1, j) = std::clamp(v, -c.clip, c.clip);
    }
  }
}

// make_dynamics_batch's body; for_each(n, body) calls body(b) for every b in
// [0, n), on whatever threads it has.
template <class T, class ForEach>
tasks::DynamicsBatch<T> make_dynamics_batch_with(const char* where, const tasks::DynamicsConfig& config, long batch,
                                                 std::uint64_t seed, long first_sequence, ForEach&& for_each) {
  tasks::validate(where, config);
  detail::check_positive_size(where, "batch", batch);
  if (first_sequence < 0) detail::fail(where, "first_sequence must be >= 0, got ", first_sequence);
  const long len = config.seq_len, n = config.state_dim;
  const long seen = config.observed_dim > 0 ? config.observed_dim : n;
  tasks::DynamicsBatch<T> out;
  out.batch = batch;
  out.seq_len = len;
  out.state_dim = n;
  out.observed_dim = seen;
  out.transition = config.transition;
  out.inputs.resize(batch * len, seen);
  out.targets.resize(batch * len, seen);
  out.hidden_inputs.resize(batch * len, n - seen);
  out.W.resize(static_cast<std::size_t>(batch));
  for_each(batch, [&](std::ptrdiff_t b) {
    RowMatrix<double> W, states;
    detail::generate_dynamics_sequence(config, seed, static_cast<std::uint64_t>(first_sequence + b), W, states);
    out.W[static_cast<std::size_t>(b)] = W.template cast<T>();
    out.inputs.middleRows(b * len, len) = states.topLeftCorner(len, seen).template cast<T>();
    out.targets.middleRows(b * len, len) = states.bottomLeftCorner(len, seen).template cast<T>();
    out.hidden_inputs.middleRows(b * len, len) = states.topRightCorner(len, n - seen).template cast<T>();
  });
  return out;
}

}  // namespace mesaopt::detail

namespace mesaopt::tasks {

// Generates sequences first_sequence .. first_sequence + batch - 1 of the
// stream keyed by `seed`. Sequence b depends only on (seed, first_sequence + b):
// the result does not depend on num_threads (<= 0: library default).
template <class T = double>
DynamicsBatch<T> make_dynamics_batch(const DynamicsConfig& config, long batch, std::uint64_t seed,
                                     long first_sequence = 0, int num_threads = 0) {
  return detail::make_dynamics_batch_with<T>(
      "make_dynamics_batch", config, batch, seed, first_sequence,
      [num_threads](std::ptrdiff_t n, auto&& body) { parallel_for(n, num_threads, body); });
}

// The same batch, bit for bit, generated on a WorkerTeam's threads
// (common/worker_team.hpp) instead of an OpenMP region: for a training loop
// that makes each step's batch between sharded steps. libgomp's threads spin
// for milliseconds after a region, on the cores the step's workers need next;
// a team's helpers spin 50 us at most and then sleep. Why it matters: one
// thread takes about 0.7 ms for 64 sequences of the paper's task (11 us a
// sequence, most of it drawing normal numbers), as long as a 2-thread
// linear-1L step on them (docs/training.md, "Stop 44"). An exception in a
// sequence (none is expected beyond std::bad_alloc) is rethrown after all
// ended, the one of the lowest sequence.
template <class T = double>
DynamicsBatch<T> make_dynamics_batch(const DynamicsConfig& config, long batch, std::uint64_t seed,
                                     long first_sequence, WorkerTeam& team) {
  return detail::make_dynamics_batch_with<T>(
      "make_dynamics_batch", config, batch, seed, first_sequence, [&team](std::ptrdiff_t n, auto&& body) {
        detail::for_each_rethrow(
            n, [&team](std::ptrdiff_t count, auto&& item) { team.run(count, [&](std::ptrdiff_t i, int) { item(i); }); },
            body);
      });
}

// Which slots of a constructed token carry s_t.
enum class TokenSlots {
  both,       // [0, s_t, s_t, s_{t-1}]: the paper's token
  last_only,  // [0, 0, s_t, s_{t-1}]: what the paper's code lets a 1-layer model's
              // attention see (docs/paper.md §3; it masks slots 0-1 inside the
              // block). For one block with the read-out from slot 0 the two are
              // the same model: slot 1 reaches the prediction only through the
              // attention's input, and slot 0 is zero in both.
};

// The paper's constructed tokens (docs/paper.md §2): e_t = [0, s_t, s_t, s_{t-1}]
// with s_0 = 0, 4n dims; the first n slots are where a model writes its
// prediction. inputs is (B*T, n), sequence-major; returns (B*T, 4n).
template <class T>
RowMatrix<T> constructed_tokens(ConstMatrixRef<T> inputs, long seq_len, TokenSlots slots = TokenSlots::both) {
  const char* where = "constructed_tokens";
  detail::check_positive_size(where, "seq_len", seq_len);
  detail::check_positive_size(where, "inputs.cols()", inputs.cols());
  if (inputs.rows() % seq_len != 0) {
    detail::fail(where, "inputs has ", inputs.rows(), " rows, not a multiple of seq_len ", seq_len);
  }
  const long n = inputs.cols(), rows = inputs.rows();
  RowMatrix<T> e = RowMatrix<T>::Zero(rows, 4 * n);
  for (long r = 0; r < rows; ++r) {
    if (slots == TokenSlots::both) e.row(r).segment(n, n) = inputs.row(r);
    e.row(r).segment(2 * n, n) = inputs.row(r);
    if (r % seq_len != 0) e.row(r).segment(3 * n, n) = inputs.row(r - 1);
  }
  return e;
}

template <class T>
RowMatrix<T> constructed_tokens(const DynamicsBatch<T>& batch, TokenSlots slots = TokenSlots::both) {
  return constructed_tokens<T>(batch.inputs, batch.seq_len, slots);
}

// The best achievable predictor ("noise-floor"): W* s_t, or tanh(W* s_t) for the
// nonlinear variant, using each sequence's true W* and its whole state s_t
// (hidden part included: an oracle when partially observed). Returns the
// observed part, (B*T, n_s). Its expected loss is noise_std^2 n_s / 2 (unless
// clipping is active).
template <class T>
RowMatrix<T> predict_with_true_dynamics(const DynamicsBatch<T>& batch) {
  const long rows_expected = batch.batch * batch.seq_len;
  if (static_cast<long>(batch.W.size()) != batch.batch || batch.inputs.rows() != rows_expected ||
      batch.inputs.cols() != batch.observed_dim || batch.hidden_inputs.rows() != rows_expected ||
      batch.hidden_inputs.cols() != batch.state_dim - batch.observed_dim) {
    detail::fail("predict_with_true_dynamics", "batch is inconsistent: ", batch.W.size(), " matrices, inputs ",
                 batch.inputs.rows(), " x ", batch.inputs.cols(), " and hidden_inputs ", batch.hidden_inputs.rows(),
                 " x ", batch.hidden_inputs.cols(), " for batch ", batch.batch, " x seq_len ", batch.seq_len,
                 ", state_dim ", batch.state_dim, " (observed ", batch.observed_dim, ")");
  }
  const long seen = batch.observed_dim, len = batch.seq_len;
  RowMatrix<T> pred(batch.inputs.rows(), seen);
  for (long b = 0; b < batch.batch; ++b) {
    const auto& W = batch.W[static_cast<std::size_t>(b)];
    auto rows = pred.middleRows(b * len, len);
    // Observed rows of W* s_t: W*[:n_s, :n_s] s_obs + W*[:n_s, n_s:] s_hidden.
    rows.noalias() = batch.inputs.middleRows(b * len, len) * W.topLeftCorner(seen, seen).transpose();
    if (seen < batch.state_dim)
      rows.noalias() += batch.hidden_inputs.middleRows(b * len, len) *
                        W.topRightCorner(seen, batch.state_dim - seen).transpose();
    if (batch.transition == Transition::tanh) rows = rows.array().tanh().matrix();
  }
  return pred;
}

}  // namespace mesaopt::tasks
