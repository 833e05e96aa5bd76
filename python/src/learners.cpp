// Bindings of the paper's task and its reference in-context learners
// (include/mesaopt/tasks/linear_dynamics.hpp, include/mesaopt/learners/), so
// that a notebook can reproduce a Fig. 4 baseline without writing C++. The
// Python side (python/mesaopt/tasks.py, learners.py) checks the arguments and
// reshapes (B, T, d) arrays to the (B*T, d) rows the C++ API takes; the
// learners compute in double (they do in C++ too), so the data is float64.
#include <mesaopt/learners.hpp>
#include <mesaopt/tasks.hpp>

#include <nanobind/eigen/dense.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "common.hpp"

namespace mesaopt_py {
namespace {

namespace ml = mesaopt::learners;
namespace mt = mesaopt::tasks;
using Rows = mesaopt::RowMatrix<double>;
using In = Eigen::Ref<const Rows>;  // a C-contiguous float64 (rows, cols) array, read without a copy

template <class E>
E enum_of(const char* where, const char* name, const std::string& value,
          std::initializer_list<std::pair<const char*, E>> choices) {
  std::string names;
  for (const auto& [label, e] : choices) {
    if (value == label) return e;
    names += (names.empty() ? "'" : ", '") + std::string(label) + "'";
  }
  bad(std::string(where) + ": " + name + " must be one of " + names + ", got '" + value + "'");
}

// (inputs, targets, W stacked as (B*n, n), hidden_inputs) of sequences
// first .. first + batch - 1; observed_dim 0: all n coordinates observed.
std::tuple<Rows, Rows, Rows, Rows> dynamics_batch(long batch, std::uint64_t seed, long first, long state_dim,
                                                  long seq_len, double noise_std, const std::string& matrix,
                                                  double spectral_radius, const std::string& init, double init_scale,
                                                  double clip, const std::string& transition, long observed_dim,
                                                  int threads) {
  const char* where = "dynamics_batch";
  mt::DynamicsConfig c;
  c.state_dim = state_dim;
  c.seq_len = seq_len;
  c.noise_std = noise_std;
  c.matrix = enum_of<mt::TransitionMatrix>(where, "matrix", matrix,
                                           {{"orthogonal", mt::TransitionMatrix::random_orthogonal},
                                            {"gaussian", mt::TransitionMatrix::gaussian}});
  c.spectral_radius = spectral_radius;
  c.init = enum_of<mt::InitialState>(where, "init", init,
                                     {{"uniform", mt::InitialState::uniform}, {"normal", mt::InitialState::normal}});
  c.init_scale = init_scale;
  c.clip = clip;
  c.transition = enum_of<mt::Transition>(where, "transition", transition,
                                         {{"linear", mt::Transition::linear}, {"tanh", mt::Transition::tanh}});
  c.observed_dim = observed_dim;
  mt::DynamicsBatch<double> b;
  {
    nb::gil_scoped_release release;
    b = mt::make_dynamics_batch<double>(c, batch, seed, first, threads);
  }
  Rows W(batch * state_dim, state_dim);
  for (long i = 0; i < batch; ++i) W.middleRows(i * state_dim, state_dim) = b.W[std::size_t(i)];
  return {std::move(b.inputs), std::move(b.targets), std::move(W), std::move(b.hidden_inputs)};
}

Rows constructed_tokens(In inputs, long seq_len, const std::string& slots) {
  const auto s = enum_of<mt::TokenSlots>("constructed_tokens", "slots", slots,
                                         {{"both", mt::TokenSlots::both}, {"last_only", mt::TokenSlots::last_only}});
  return mt::constructed_tokens<double>(inputs, seq_len, s);
}

// Runs learner.predict without the GIL.
template <class Learner>
Rows predict(const Learner& learner, In x, In y, long seq_len, int threads) {
  nb::gil_scoped_release release;
  return learner.template predict<double>(x, y, seq_len, threads);
}

}  // namespace

void bind_learners(nb::module_& m) {
  m.def("dynamics_batch", &dynamics_batch);
  m.def("constructed_tokens", &constructed_tokens);
  m.def("loss_curve", [](In pred, In target, long seq_len) { return ml::loss_curve(pred, target, seq_len); });
  m.def("ridge_predict", [](In x, In y, long seq_len, double regularizer, long lag, int threads) {
    if (!(regularizer > 0) || !std::isfinite(regularizer))
      bad("ridge: regularizer must be positive and finite, got " + std::to_string(regularizer));
    return predict(ml::Ridge::from_regularizer(regularizer, lag), x, y, seq_len, threads);
  });
  m.def("least_squares_predict",
        [](In x, In y, long seq_len, int threads) { return predict(ml::LeastSquares{}, x, y, seq_len, threads); });
  m.def("gd_predict", [](In x, In y, long seq_len, double eta, long steps, double regularizer, bool frobenius_scaled,
                         int threads) {
    ml::GradientDescent gd;
    gd.steps = steps;
    gd.eta = eta;
    gd.regularizer = regularizer;
    gd.frobenius_scaled = frobenius_scaled;
    return predict(gd, x, y, seq_len, threads);
  });
  m.def("chebyshev_predict", [](In x, In y, long seq_len, std::vector<double> alpha, std::vector<double> beta,
                                double regularizer, long lag, bool matrix_form, int threads) {
    ml::ChebyshevPolynomial p;
    p.alpha = std::move(alpha);
    p.beta = std::move(beta);
    p.regularizer = regularizer;
    p.lag = lag;
    nb::gil_scoped_release release;
    return matrix_form ? p.predict_matrix_form<double>(x, y, seq_len, threads) : p.predict<double>(x, y, seq_len, threads);
  });
  m.def("chebyshev_paper_coefficients", [] {
    const ml::ChebyshevPolynomial p = ml::ChebyshevPolynomial::paper_six_step();
    return std::make_tuple(p.alpha, p.beta);
  });
}

}  // namespace mesaopt_py
