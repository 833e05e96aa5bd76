// Tests for the synthetic tasks (docs/paper.md §1, docs/math.md §5): the generator's
// statistics match the specification, batches are reproducible, layouts are
// right and bad settings are rejected.
#include <catch2/catch.hpp>
#include <mesaopt/tasks.hpp>

#include "test_util.hpp"

#include <Eigen/Eigenvalues>
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

// Everything of this file lives in its own namespace, so that test files can be
// compiled together in one translation unit (tests/CMakeLists.txt, unity groups).
namespace mesaopt_test_tasks {

namespace mt = mesaopt::tasks;
using M = mesaopt::RowMatrix<double>;
using Catch::Matchers::Contains;

namespace {
// |estimate - expected| <= z standard errors.
void check_mean(double estimate, double expected, double std_error, double z = 5.0) {
  INFO("estimate " << estimate << ", expected " << expected << ", standard error " << std_error);
  CHECK(std::abs(estimate - expected) <= z * std_error);
}
}  // namespace

TEST_CASE("dynamics: W* is orthogonal and Haar-distributed") {
  mt::DynamicsConfig cfg;
  const long B = 4000, n = cfg.state_dim;
  const auto bt = mt::make_dynamics_batch<double>(cfg, B, 7);
  double tr = 0, tr2 = 0, w00 = 0, w00sq = 0;
  for (const M& W : bt.W) {
    REQUIRE((W.transpose() * W - M::Identity(n, n)).norm() < 1e-12);
    const double rho = Eigen::EigenSolver<Eigen::MatrixXd>(W, false).eigenvalues().cwiseAbs().maxCoeff();
    CHECK(std::abs(rho - 1.0) < 1e-10);
    tr += W.trace();
    tr2 += W.trace() * W.trace();
    w00 += W(0, 0);
    w00sq += W(0, 0) * W(0, 0);
  }
  // Haar on O(n): E tr W = 0, E (tr W)^2 = 1, E W_00 = 0, E W_00^2 = 1/n. (A QR
  // without the sign fix has E W_00 < 0 and fails the first moment checks.)
  check_mean(tr / B, 0.0, 1.0 / std::sqrt(double(B)));
  check_mean(tr2 / B, 1.0, std::sqrt(2.0 / B));
  check_mean(w00 / B, 0.0, std::sqrt(1.0 / n / B));
  check_mean(w00sq / B, 1.0 / n, std::sqrt(3.0 / (n * (n + 2.0)) / B));
}

TEST_CASE("dynamics: initial state, noise, targets and the noise floor follow the specification") {
  mt::DynamicsConfig cfg;
  const long B = 3000, T = cfg.seq_len, n = cfg.state_dim;
  const auto bt = mt::make_dynamics_batch<double>(cfg, B, 11);
  REQUIRE(bt.inputs.rows() == B * T);
  REQUIRE(bt.inputs.cols() == n);
  // s_1 ~ U[-1, 1]: in range, mean 0, variance 1/3, independent coordinates.
  M s1(B, n);
  for (long b = 0; b < B; ++b) s1.row(b) = bt.inputs.row(b * T);
  CHECK(s1.maxCoeff() <= 1.0);
  CHECK(s1.minCoeff() >= -1.0);
  CHECK(s1.maxCoeff() > 0.99);
  CHECK(s1.minCoeff() < -0.99);
  const double N = double(B * n);
  check_mean(s1.mean(), 0.0, std::sqrt(1.0 / 3.0 / N));
  check_mean(s1.array().square().mean(), 1.0 / 3.0, std::sqrt(4.0 / 45.0 / N));
  const M cov = s1.transpose() * s1 / double(B);
  CHECK(std::abs(cov(0, 1)) < 5.0 / 3.0 / std::sqrt(double(B)));
  // Inputs and targets are the same trajectory shifted by one.
  for (long b = 0; b < 5; ++b)
    for (long t = 0; t + 1 < T; ++t) REQUIRE(bt.inputs.row(b * T + t + 1) == bt.targets.row(b * T + t));
  // The noise eps = s_{t+1} - W* s_t is N(0, 0.01^2 I): mean, variance,
  // no correlation between coordinates.
  const M eps = bt.targets - mt::predict_with_true_dynamics(bt);
  const double m = double(eps.size()), var = cfg.noise_std * cfg.noise_std;
  check_mean(eps.mean(), 0.0, std::sqrt(var / m));
  check_mean(eps.array().square().mean(), var, var * std::sqrt(2.0 / m));
  const M ecov = eps.transpose() * eps / double(eps.rows());
  CHECK(std::abs(ecov(2, 7)) < 5.0 * var / std::sqrt(double(eps.rows())));
  // The noise floor, 1/2 E||eps||^2 = sigma^2 n / 2 = 5e-4 (docs/paper.md §1).
  const double floor = 0.5 * eps.rowwise().squaredNorm().mean();
  check_mean(floor, var * n / 2.0, var / 2.0 * std::sqrt(2.0 * n / double(eps.rows())));
  CHECK(std::abs(floor - 5e-4) < 0.02 * 5e-4);
}

TEST_CASE("dynamics: settings are honoured (normal init, Gaussian W*, clipping, tanh, n, T)") {
  SECTION("normal initial state with scale 2") {
    mt::DynamicsConfig cfg;
    cfg.init = mt::InitialState::normal;
    cfg.init_scale = 2.0;
    const long B = 4000;
    const auto bt = mt::make_dynamics_batch<double>(cfg, B, 3);
    double s = 0, s2 = 0, s4 = 0;
    for (long b = 0; b < B; ++b)
      for (long j = 0; j < cfg.state_dim; ++j) {
        const double v = bt.inputs(b * cfg.seq_len, j);
        s += v, s2 += v * v, s4 += v * v * v * v;
      }
    const double N = double(B * cfg.state_dim);
    check_mean(s / N, 0.0, 2.0 / std::sqrt(N));
    check_mean(s2 / N, 4.0, 4.0 * std::sqrt(2.0 / N));
    check_mean(s4 / N, 3.0 * 16.0, 16.0 * std::sqrt(96.0 / N));  // Gaussian kurtosis, not uniform's
  }
  SECTION("Gaussian W* has the requested spectral radius, and clipping bounds the states") {
    mt::DynamicsConfig cfg;
    cfg.matrix = mt::TransitionMatrix::gaussian;
    cfg.spectral_radius = 1.3;  // grows: clipping becomes active
    cfg.state_dim = 6;
    cfg.seq_len = 40;
    const auto bt = mt::make_dynamics_batch<double>(cfg, 200, 5);
    for (const M& W : bt.W) {
      const double rho = Eigen::EigenSolver<Eigen::MatrixXd>(W, false).eigenvalues().cwiseAbs().maxCoeff();
      REQUIRE(std::abs(rho - 1.3) < 1e-10);
    }
    CHECK(bt.targets.cwiseAbs().maxCoeff() == 10.0);
    CHECK(bt.inputs.cwiseAbs().maxCoeff() == 10.0);
  }
  SECTION("tanh transition: s_{t+1} - tanh(W* s_t) is the noise") {
    mt::DynamicsConfig cfg;
    cfg.transition = mt::Transition::tanh;
    cfg.state_dim = 5;
    cfg.seq_len = 30;
    cfg.noise_std = 0.05;
    cfg.init_scale = 3.0;  // large states: tanh is far from linear at first
    const auto bt = mt::make_dynamics_batch<double>(cfg, 1000, 9);
    const M eps = bt.targets - mt::predict_with_true_dynamics(bt);
    const double var = 0.05 * 0.05, m = double(eps.size());
    check_mean(eps.array().square().mean(), var, var * std::sqrt(2.0 / m));
    // It is not the linear system: the linear prediction is off by far more.
    M lin(bt.inputs.rows(), 5);
    for (long b = 0; b < bt.batch; ++b)
      lin.middleRows(b * 30, 30) = bt.inputs.middleRows(b * 30, 30) * bt.W[std::size_t(b)].transpose();
    double first = 0;
    for (long b = 0; b < bt.batch; ++b) first += (bt.targets.row(b * 30) - lin.row(b * 30)).squaredNorm() / 5.0;
    CHECK(first / bt.batch > 10 * var);
  }
  SECTION("zero noise makes the targets exact") {
    mt::DynamicsConfig cfg;
    cfg.noise_std = 0.0;
    cfg.state_dim = 3;
    cfg.seq_len = 2;
    const auto bt = mt::make_dynamics_batch<double>(cfg, 3, 1);
    CHECK((bt.targets - mt::predict_with_true_dynamics(bt)).cwiseAbs().maxCoeff() < 1e-15);
  }
}

TEST_CASE("dynamics: same seed gives the same batch whatever the order or thread count") {
  mt::DynamicsConfig cfg;
  cfg.seq_len = 20;
  const auto a = mt::make_dynamics_batch<double>(cfg, 64, 42, 0, 1);
  const auto b = mt::make_dynamics_batch<double>(cfg, 64, 42, 0, 2);
  CHECK(a.inputs == b.inputs);
  CHECK(a.targets == b.targets);
  for (std::size_t i = 0; i < a.W.size(); ++i) REQUIRE(a.W[i] == b.W[i]);
  // Generating sequences 32..63 on their own (another "order") gives the same rows.
  const auto tail = mt::make_dynamics_batch<double>(cfg, 32, 42, 32, 1);
  CHECK(tail.inputs == a.inputs.bottomRows(32 * 20));
  CHECK(tail.W[0] == a.W[32]);
  // A different seed gives a different batch; float storage rounds the same data.
  const auto c = mt::make_dynamics_batch<double>(cfg, 64, 43, 0, 1);
  CHECK((c.inputs - a.inputs).cwiseAbs().maxCoeff() > 0.1);
  const auto f = mt::make_dynamics_batch<float>(cfg, 64, 42);
  CHECK((f.inputs.cast<double>() - a.inputs).cwiseAbs().maxCoeff() < 1e-6);
  // The generator itself: a fixed stream gives fixed values (guards accidental changes).
  mt::CounterRng r1(1, 2), r2(1, 2), r3(2, 1);
  const std::uint64_t v = r1.next_u64();
  CHECK(v == r2.next_u64());
  CHECK(v != r3.next_u64());
}

TEST_CASE("dynamics on a WorkerTeam: the same batch, bit for bit, for every team size, and bad input still throws") {
  mt::DynamicsConfig cfg;
  cfg.seq_len = 20;
  cfg.observed_dim = 7;  // hidden_inputs too
  const auto ref = mt::make_dynamics_batch<float>(cfg, 37, 42, 5, 1);
  for (int size : {1, 2, 3}) {
    INFO("team size " << size);
    mesaopt::WorkerTeam team(size);
    for (int call = 0; call < 2; ++call) {  // a team serves call after call
      const auto b = mt::make_dynamics_batch<float>(cfg, 37, 42, 5, team);
      CHECK(b.inputs == ref.inputs);
      CHECK(b.targets == ref.targets);
      CHECK(b.hidden_inputs == ref.hidden_inputs);
      REQUIRE(b.W.size() == ref.W.size());
      for (std::size_t i = 0; i < b.W.size(); ++i) CHECK(b.W[i] == ref.W[i]);
      CHECK(b.batch == 37);
      CHECK(b.observed_dim == 7);
    }
    // Another first sequence is another batch.
    const auto other = mt::make_dynamics_batch<float>(cfg, 37, 42, 6, team);
    CHECK((other.inputs - ref.inputs).cwiseAbs().maxCoeff() > 0.1f);
    mt::DynamicsConfig bad_cfg = cfg;
    bad_cfg.noise_std = -0.1;
    CHECK_THROWS_WITH(mt::make_dynamics_batch<float>(bad_cfg, 2, 1, 0, team), Contains("noise_std must be finite and >= 0"));
    CHECK_THROWS_WITH(mt::make_dynamics_batch<float>(cfg, 0, 1, 0, team), Contains("batch"));
    CHECK_THROWS_WITH(mt::make_dynamics_batch<float>(cfg, 2, 1, -1, team), Contains("first_sequence must be >= 0, got -1"));
  }
}

TEST_CASE("dynamics partially observed: inputs are the first n_s coordinates of the same states and the noise floor") {
  mt::DynamicsConfig full;
  full.state_dim = 20;
  full.seq_len = 30;
  mt::DynamicsConfig part = full;
  part.observed_dim = 5;  // the paper's n_s = 5 of n = 20
  const long B = 400, T = 30;
  const auto a = mt::make_dynamics_batch<double>(full, B, 17, 0, 1);
  const auto p = mt::make_dynamics_batch<double>(part, B, 17, 0, 2);
  REQUIRE(p.observed_dim == 5);
  REQUIRE(p.state_dim == 20);
  REQUIRE(p.inputs.cols() == 5);
  REQUIRE(p.targets.cols() == 5);
  REQUIRE(p.hidden_inputs.cols() == 15);
  CHECK(a.observed_dim == 20);
  CHECK(a.hidden_inputs.cols() == 0);
  // The same sequences: observing fewer coordinates does not change the stream.
  CHECK(p.inputs == a.inputs.leftCols(5));
  CHECK(p.hidden_inputs == a.inputs.rightCols(15));
  CHECK(p.targets == a.targets.leftCols(5));
  for (long b = 0; b < B; ++b) REQUIRE(p.W[std::size_t(b)] == a.W[std::size_t(b)]);
  // The oracle predictor sees the hidden part too: its residual is the noise on
  // the observed coordinates, and it is the fully observed prediction's first columns.
  const M floor = mt::predict_with_true_dynamics(p);
  REQUIRE(floor.cols() == 5);
  CHECK((floor - mt::predict_with_true_dynamics(a).leftCols(5)).cwiseAbs().maxCoeff() < 1e-13);
  const M eps = p.targets - floor;
  const double var = full.noise_std * full.noise_std, m = double(eps.size());
  check_mean(eps.array().square().mean(), var, var * std::sqrt(2.0 / m));
  // Without the hidden part the observed block of W* is far from enough.
  M seen_only(B * T, 5);
  for (long b = 0; b < B; ++b)
    seen_only.middleRows(b * T, T) = p.inputs.middleRows(b * T, T) * p.W[std::size_t(b)].topLeftCorner(5, 5).transpose();
  CHECK((p.targets - seen_only).array().square().mean() > 100 * var);
  // A batch whose parts disagree is rejected, not read out of bounds.
  auto broken = p;
  broken.hidden_inputs.resize(B * T, 14);
  CHECK_THROWS_WITH(mt::predict_with_true_dynamics(broken), Contains("inconsistent"));
}

TEST_CASE("constructed tokens are [0, s_t, s_t, s_{t-1}] with s_0 = 0") {
  mt::DynamicsConfig cfg;
  cfg.state_dim = 3;
  cfg.seq_len = 4;
  const auto bt = mt::make_dynamics_batch<double>(cfg, 2, 1);
  const M e = mt::constructed_tokens(bt);
  REQUIRE(e.rows() == 8);
  REQUIRE(e.cols() == 12);
  for (long b = 0; b < 2; ++b)
    for (long t = 0; t < 4; ++t) {
      const long r = b * 4 + t;
      CHECK(e.row(r).head(3).isZero(0));
      CHECK(e.row(r).segment(3, 3) == bt.inputs.row(r));
      CHECK(e.row(r).segment(6, 3) == bt.inputs.row(r));
      if (t == 0) {
        CHECK(e.row(r).tail(3).isZero(0));
      } else {
        CHECK(e.row(r).tail(3) == bt.inputs.row(r - 1));
      }
    }
  CHECK_THROWS_WITH(mt::constructed_tokens<double>(bt.inputs, 3), Contains("seq_len 3"));
  // The 1-layer variant of the paper's code: slot 1 empty, the rest the same.
  M masked = mt::constructed_tokens(bt, mt::TokenSlots::last_only);
  REQUIRE(masked.rows() == e.rows());
  REQUIRE(masked.cols() == e.cols());
  CHECK(masked.middleCols(3, 3).isZero(0));
  M expected = e;
  expected.middleCols(3, 3).setZero();
  CHECK(masked == expected);
}

TEST_CASE("regression: statistics and both token layouts") {
  mt::RegressionConfig cfg;
  cfg.input_dim = 4;
  cfg.output_dim = 2;
  cfg.num_pairs = 25;
  cfg.noise_std = 0.1;
  const long B = 2000;
  const auto bt = mt::make_regression_batch<double>(cfg, B, 5);
  const double N = double(bt.x.size());
  check_mean(bt.x.mean(), 0.0, 1.0 / std::sqrt(N));
  check_mean(bt.x.array().square().mean(), 1.0, std::sqrt(2.0 / N));
  const M noise = bt.y - mt::predict_with_true_weights(bt);
  const double m = double(noise.size());
  check_mean(noise.array().square().mean(), 0.01, 0.01 * std::sqrt(2.0 / m));
  double wsq = 0;
  for (const M& w : bt.w) wsq += w.squaredNorm();
  check_mean(wsq / (B * 8.0), 1.0, std::sqrt(2.0 / (B * 8.0)));
  // Fresh w per sequence.
  CHECK((bt.w[0] - bt.w[1]).norm() > 0.1);

  const M p = mt::paired_tokens(bt);
  REQUIRE(p.rows() == B * 25);
  REQUIRE(p.cols() == 6);
  CHECK(p.row(3).head(4) == bt.x.row(3));
  CHECK(p.row(3).tail(2) == bt.y.row(3));
  CHECK(p.row(24).head(4) == bt.x.row(24));
  CHECK(p.row(24).tail(2).isZero(0));  // query token
  CHECK(p.row(25).tail(2) == bt.y.row(25));
  const M a = mt::alternating_tokens(bt);
  REQUIRE(a.rows() == 2 * B * 25);
  CHECK(a.row(6).head(4) == bt.x.row(3));
  CHECK(a.row(6).tail(2).isZero(0));
  CHECK(a.row(7).head(4).isZero(0));
  CHECK(a.row(7).tail(2) == bt.y.row(3));

  const auto again = mt::make_regression_batch<double>(cfg, B, 5, 0, 1);
  CHECK(again.x == bt.x);
  CHECK(again.y == bt.y);
  CHECK((mt::make_regression_batch<double>(cfg, 2, 6).x - bt.x.topRows(50)).norm() > 0.1);
}

TEST_CASE("bad task settings throw std::invalid_argument naming the argument and value") {
  mt::DynamicsConfig cfg;
  auto bad = [&](auto mutate, const std::string& text) {
    mt::DynamicsConfig c;
    mutate(c);
    CHECK_THROWS_AS(mt::make_dynamics_batch<double>(c, 2, 1), std::invalid_argument);
    CHECK_THROWS_WITH(mt::make_dynamics_batch<double>(c, 2, 1), Contains(text));
  };
  bad([](mt::DynamicsConfig& c) { c.noise_std = -0.1; }, "noise_std must be finite and >= 0, got -0.1");
  bad([](mt::DynamicsConfig& c) { c.state_dim = 0; }, "state_dim must be at least 1, got 0");
  bad([](mt::DynamicsConfig& c) { c.seq_len = 1; }, "seq_len must be at least 2, got 1");
  bad([](mt::DynamicsConfig& c) { c.init_scale = 0; }, "init_scale must be finite and > 0, got 0");
  bad([](mt::DynamicsConfig& c) { c.clip = -1; }, "clip must be finite and > 0, got -1");
  bad([](mt::DynamicsConfig& c) { c.noise_std = std::nan(""); }, "noise_std");
  bad(
      [](mt::DynamicsConfig& c) {
        c.matrix = mt::TransitionMatrix::gaussian;
        c.spectral_radius = -2;
      },
      "spectral_radius must be finite and > 0, got -2");
  bad([](mt::DynamicsConfig& c) { c.observed_dim = 11; }, "observed_dim must be in [0, state_dim = 10] (0: all observed), got 11");
  bad([](mt::DynamicsConfig& c) { c.observed_dim = -1; }, "observed_dim must be in [0, state_dim = 10] (0: all observed), got -1");
  CHECK_THROWS_WITH(mt::make_dynamics_batch<double>(cfg, 0, 1), Contains("batch must be at least 1, got 0"));
  CHECK_THROWS_WITH(mt::make_dynamics_batch<double>(cfg, 2, 1, -3), Contains("first_sequence must be >= 0, got -3"));

  mt::RegressionConfig r;
  r.num_pairs = 1;
  CHECK_THROWS_WITH(mt::make_regression_batch<double>(r, 2, 1), Contains("num_pairs must be at least 2, got 1"));
  r = {};
  r.input_dim = 0;
  CHECK_THROWS_WITH(mt::make_regression_batch<double>(r, 2, 1), Contains("input_dim must be at least 1, got 0"));
  r = {};
  r.noise_std = -1;
  CHECK_THROWS_WITH(mt::make_regression_batch<double>(r, 2, 1), Contains("noise_std must be finite and >= 0, got -1"));
  r = {};
  CHECK_THROWS_WITH(mt::make_regression_batch<double>(r, 0, 1), Contains("batch must be at least 1, got 0"));
}

TEST_CASE("prompted regression: the pairs follow the dynamics' distribution and are reproducible") {
  mt::PromptedRegressionConfig c;
  c.pairs = 40;
  c.noise_std = 0;
  const auto a = mt::make_prompted_regression_batch<double>(c, 64, 5, 0, 1);
  REQUIRE(a.x.rows() == 64 * 40);
  REQUIRE(a.y.cols() == 10);
  double max_orth = 0, max_fit = 0, sum = 0, sumsq = 0;
  for (long b = 0; b < a.batch; ++b) {
    const M& W = a.W[std::size_t(b)];
    max_orth = std::max(max_orth, (W * W.transpose() - M::Identity(10, 10)).cwiseAbs().maxCoeff());
    // Without noise y_i = W x_i exactly.
    max_fit = std::max(max_fit, (a.y.middleRows(b * 40, 40) - a.x.middleRows(b * 40, 40) * W.transpose())
                                    .cwiseAbs().maxCoeff());
  }
  CHECK(max_orth < 1e-12);
  CHECK(max_fit < 1e-12);
  CHECK(a.x.cwiseAbs().maxCoeff() <= 1.0);  // U[-1, 1]
  for (long i = 0; i < a.x.size(); ++i) {
    sum += a.x.data()[i];
    sumsq += a.x.data()[i] * a.x.data()[i];
  }
  const double count = double(a.x.size());
  check_mean(sum / count, 0.0, std::sqrt(1.0 / 3.0 / count));
  check_mean(sumsq / count, 1.0 / 3.0, std::sqrt(4.0 / 45.0 / count));  // Var(u^2) = 1/5 - 1/9 for u ~ U[-1, 1]

  // Sequence b depends only on (seed, first_sequence + b), whatever the thread count.
  const auto part = mt::make_prompted_regression_batch<double>(c, 16, 5, 8, 2);
  CHECK(part.x == a.x.middleRows(8 * 40, 16 * 40));
  CHECK(part.y == a.y.middleRows(8 * 40, 16 * 40));
  // The noise has the configured standard deviation.
  c.noise_std = 0.5;
  const auto noisy = mt::make_prompted_regression_batch<double>(c, 64, 5, 0, 1);
  double noise_sq = 0;
  for (long b = 0; b < noisy.batch; ++b)
    noise_sq += (noisy.y.middleRows(b * 40, 40) - noisy.x.middleRows(b * 40, 40) * noisy.W[std::size_t(b)].transpose())
                    .squaredNorm();
  check_mean(noise_sq / count, 0.25, 0.25 * std::sqrt(2.0 / count));
}

TEST_CASE("prompted regression: prompt layout, token placement and the adjoints of building and reading prompts") {
  mt::PromptedRegressionConfig c;
  c.state_dim = 3;
  c.pairs = 4;
  const long B = 2, n = 3, N = 4;
  const auto batch = mt::make_prompted_regression_batch<double>(c, B, 9);
  for (bool eos : {false, true})
    for (long P : {0L, 2L}) {
      const mt::PromptLayout layout{N, eos, P};
      INFO("eos " << eos << ", prefix " << P);
      const long S = layout.seq_len();
      CHECK(S == P + N * (eos ? 3 : 2));
      const mesaopt::Vector<double> e = mesaopt::Vector<double>::LinSpaced(n, 1.5, 2.5);
      const M prefix = M::Random(P, n);
      const M tokens = mt::prompt_tokens(batch, layout, e, prefix);
      REQUIRE(tokens.rows() == B * S);
      // Every row is what the layout says, and every row is accounted for.
      std::vector<int> seen(std::size_t(B * S), 0);
      for (long b = 0; b < B; ++b) {
        for (long p = 0; p < P; ++p) {
          CHECK(tokens.row(b * S + p) == prefix.row(p));
          ++seen[std::size_t(b * S + p)];
        }
        for (long i = 0; i < N; ++i) {
          CHECK(tokens.row(b * S + layout.x_row(i)) == batch.x.row(b * N + i));
          CHECK(tokens.row(b * S + layout.y_row(i)) == batch.y.row(b * N + i));
          ++seen[std::size_t(b * S + layout.x_row(i))];
          ++seen[std::size_t(b * S + layout.y_row(i))];
          if (eos) {
            CHECK(tokens.row(b * S + layout.eos_row(i)) == e.transpose());
            ++seen[std::size_t(b * S + layout.eos_row(i))];
          }
        }
      }
      CHECK(std::count(seen.begin(), seen.end(), 1) == B * S);

      // Adjoint of the learned tokens: the prompt is affine in (eos, prefix), so
      // <G, tokens(e, P) - tokens(0, 0)> = <d_eos, e> + <d_prefix, P> for any G.
      const M G = M::Random(B * S, n);
      mesaopt::Vector<double> d_eos = mesaopt::Vector<double>::Constant(n, 0.25);  // accumulate ADDS
      M d_prefix = M::Constant(P, n, 0.25);
      mt::accumulate_prompt_gradients<double>(G, B, layout, d_eos, d_prefix);
      const M base = mt::prompt_tokens(batch, layout, mesaopt::Vector<double>::Zero(n), M::Zero(P, n));
      double rhs = 0;
      if (eos) rhs += (d_eos.array() - 0.25).matrix().dot(e);
      if (P > 0) rhs += ((d_prefix.array() - 0.25).matrix().cwiseProduct(prefix)).sum();
      CHECK(G.cwiseProduct(tokens - base).sum() == Approx(rhs).epsilon(1e-12));
      if (!eos) CHECK(d_eos == mesaopt::Vector<double>::Constant(n, 0.25));  // untouched

      // predictions_at_queries and scatter_query_gradients are adjoint:
      // <scatter(Q), O> = <Q, gather(O)>.
      const M O = M::Random(B * S, n), Q = M::Random(B * N, n);
      const M gathered = mt::predictions_at_queries<double>(O, B, layout);
      REQUIRE(gathered.rows() == B * N);
      CHECK(gathered.row(N + 1) == O.row(S + layout.x_row(1)));
      CHECK(mt::scatter_query_gradients<double>(Q, B, layout).cwiseProduct(O).sum() ==
            Approx(Q.cwiseProduct(gathered).sum()).epsilon(1e-12));
    }

  // Bad input is rejected by name.
  const mesaopt::Vector<double> e3 = mesaopt::Vector<double>::Zero(3), e2 = mesaopt::Vector<double>::Zero(2);
  CHECK_THROWS_WITH(mt::prompt_tokens(batch, mt::PromptLayout{5, false, 0}, e3, M()),
                    Contains("layout.pairs is 5 but batch.pairs is 4"));
  CHECK_THROWS_WITH(mt::prompt_tokens(batch, mt::PromptLayout{4, true, 0}, e2, M()),
                    Contains("eos.size() is 2 but batch.state_dim is 3"));
  CHECK_THROWS_WITH(mt::prompt_tokens(batch, mt::PromptLayout{4, false, 2}, e3, M::Zero(1, 3)),
                    Contains("prefix.rows() is 1 but layout.prefix is 2"));
  CHECK_THROWS_WITH(mt::prompt_tokens(batch, mt::PromptLayout{4, false, -1}, e3, M()),
                    Contains("layout.prefix must be >= 0, got -1"));
  CHECK_THROWS_WITH(mt::predictions_at_queries<double>(M::Zero(7, 3), 1, mt::PromptLayout{4, false, 0}),
                    Contains("outputs.rows() is 7 but batch * layout.seq_len() is 8"));
  mesaopt::Vector<double> d_eos(3);
  M d_prefix(0, 3);
  CHECK_THROWS_WITH(mt::accumulate_prompt_gradients<double>(M::Zero(8, 3), 2, mt::PromptLayout{4, false, 0}, d_eos,
                                                            d_prefix),
                    Contains("d_tokens.rows() is 8 but batch * layout.seq_len() is 16"));
  mt::PromptedRegressionConfig bad;
  bad.pairs = 0;
  CHECK_THROWS_WITH(mt::make_prompted_regression_batch<double>(bad, 2, 1), Contains("pairs must be >= 1, got 0"));
  bad = {};
  bad.init_scale = 0;
  CHECK_THROWS_WITH(mt::make_prompted_regression_batch<double>(bad, 2, 1),
                    Contains("init_scale must be finite and > 0, got 0"));
}

}  // namespace mesaopt_test_tasks
