// Tests for the reference in-context learners (docs/math.md §4, docs/paper.md §4-§5):
// each against an independent closed form, the paper's numbers on the
// linear-dynamics task, the comparison tools, and bad-input checks.
#include <catch2/catch.hpp>
#include <mesaopt/learners.hpp>
#include <mesaopt/tasks.hpp>

#include "test_util.hpp"

#include <Eigen/Dense>
#include <cmath>
#include <stdexcept>

// Everything of this file lives in its own namespace, so that test files can be
// compiled together in one translation unit (tests/CMakeLists.txt, unity groups).
namespace mesaopt_test_learners {

namespace ml = mesaopt::learners;
namespace mt = mesaopt::tasks;
using M = mesaopt::RowMatrix<double>;
using Catch::Matchers::Contains;

namespace {
// A small regression problem: B sequences of T pairs, dx inputs, dy outputs.
mt::RegressionBatch<double> small_regression(long B, long T, long dx, long dy, std::uint64_t seed,
                                             double noise = 0.1) {
  mt::RegressionConfig c;
  c.input_dim = dx;
  c.output_dim = dy;
  c.num_pairs = T;
  c.noise_std = noise;
  return mt::make_regression_batch<double>(c, B, seed);
}

mt::DynamicsBatch<double> paper_dynamics(long B, std::uint64_t seed) {
  return mt::make_dynamics_batch<double>(mt::DynamicsConfig{}, B, seed);
}

// Context of sequence b at position t (0-based): rows [b*T, b*T + t).
struct Ctx {
  M X, Y;
  Eigen::VectorXd q;
};
Ctx context(const M& x, const M& y, long T, long b, long t) {
  return {x.middleRows(b * T, t), y.middleRows(b * T, t), x.row(b * T + t).transpose()};
}
}  // namespace

TEST_CASE("every learner predicts 0 at t = 1 and is independent of the thread count") {
  const auto d = small_regression(6, 9, 3, 2, 1);
  const std::vector<ml::AnyLearner<double>> all = {
      ml::erase<double>(ml::Ridge{2.0}), ml::erase<double>(ml::LeastSquares{}),
      ml::erase<double>(ml::RecursiveLeastSquares{2.0}), ml::erase<double>(ml::GradientDescent{3, 0.05, 0.1}),
      ml::erase<double>(ml::PreconditionedGradientDescent{2, 0.05, M::Identity(3, 3) * 0.5, 0.0}),
      ml::erase<double>(ml::OnlineGradientDescent{0.1}), ml::erase<double>(ml::CompressedAlg{4, 0.5, 2.0, true}),
      ml::erase<double>(ml::ChebyshevSolver::classical(6, 0.066, 1.0)),
      ml::erase<double>(ml::ChebyshevPolynomial::paper_six_step()), ml::erase<double>(ml::Ridge::from_regularizer(0.5, 1)),
      ml::erase<double>(ml::SoftmaxKernelRegression{1.5})};
  for (const auto& l : all) {
    INFO(l.name);
    const M p = l.predict(d.x, d.y, 9);
    REQUIRE(p.rows() == 54);
    REQUIRE(p.cols() == 2);
    for (long b = 0; b < 6; ++b) CHECK(p.row(b * 9).isZero(0));
    CHECK(p.row(5).norm() > 0);
    CHECK(p.allFinite());
  }
  const M p1 = ml::Ridge{2.0}.predict<double>(d.x, d.y, 9, 1), p2 = ml::Ridge{2.0}.predict<double>(d.x, d.y, 9, 2);
  CHECK(p1 == p2);
  // float storage: same numbers to float rounding (learners compute in double).
  const M pf = ml::Ridge{2.0}.predict<float>(d.x.cast<float>(), d.y.cast<float>(), 9).cast<double>();
  CHECK(mesaopt::test::relative_rms(pf, p1) < 1e-6);
}

TEST_CASE("ridge equals the direct formula, RLS equals ridge at every t (1e-10)") {
  for (long dx : {1L, 3L, 7L})
    for (double lambda : {0.01, 1.0, 1e3}) {
      INFO("dx " << dx << ", lambda " << lambda);
      const long T = 17;
      const auto d = small_regression(5, T, dx, 2, 3 + dx);
      const M ridge = ml::Ridge{lambda}.predict<double>(d.x, d.y, T);
      const M rls = ml::RecursiveLeastSquares{lambda}.predict<double>(d.x, d.y, T);
      double worst = 0;
      for (long r = 0; r < ridge.rows(); ++r)
        worst = std::max(worst, (rls.row(r) - ridge.row(r)).norm() / std::max(1.0, ridge.row(r).norm()));
      CHECK(worst < 1e-10);
      // docs/math.md §4: W = Y X^T (X X^T + I/lambda)^{-1}, solved with a full-pivot LU.
      for (long t : {1L, 4L, 16L}) {
        const Ctx c = context(d.x, d.y, T, 2, t);
        const Eigen::MatrixXd A = c.X.transpose() * c.X + Eigen::MatrixXd::Identity(dx, dx) / lambda;
        const Eigen::VectorXd direct = c.Y.transpose() * c.X * A.fullPivLu().solve(c.q);
        CHECK((ridge.row(2 * T + t).transpose() - direct).norm() < 1e-10 * std::max(1.0, direct.norm()));
      }
    }
  // And on the paper's dynamics (reg 1e-3, i.e. lambda = 1e3).
  const auto dyn = paper_dynamics(20, 5);
  const M a = ml::Ridge::from_regularizer(1e-3).predict<double>(dyn.inputs, dyn.targets, 50);
  const M b = ml::RecursiveLeastSquares{1e3}.predict<double>(dyn.inputs, dyn.targets, 50);
  CHECK((a - b).cwiseAbs().maxCoeff() < 1e-10);
}

TEST_CASE("least squares is the minimum-norm solution and ridge approaches it as lambda grows") {
  const long T = 12, dx = 6;
  const auto d = small_regression(4, T, dx, 2, 8);
  const M ls = ml::LeastSquares{}.predict<double>(d.x, d.y, T);
  // Independent: W^T = pinv(X) Y via the SVD (min-norm when t - 1 < dx).
  for (long t : {1L, 3L, 6L, 11L}) {
    const Ctx c = context(d.x, d.y, T, 3, t);
    const Eigen::JacobiSVD<Eigen::MatrixXd> svd(c.X, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const Eigen::VectorXd direct = (svd.solve(c.Y)).transpose() * c.q;
    CHECK((ls.row(3 * T + t).transpose() - direct).norm() < 1e-9 * std::max(1.0, direct.norm()));
  }
  double prev = 1e300;
  for (double lambda : {1e1, 1e3, 1e5, 1e7, 1e9}) {
    const double diff = (ml::Ridge{lambda}.predict<double>(d.x, d.y, T) - ls).cwiseAbs().maxCoeff();
    INFO("lambda " << lambda << ": max |ridge - least squares| = " << diff);
    CHECK(diff < prev);
    prev = diff;
  }
  CHECK(prev < 1e-5);
}

TEST_CASE("one GD step is eta sum_i y_i (x_i . x_t), K steps equal CompressedAlg-(K-1)") {
  const long T = 10;
  const auto d = small_regression(3, T, 4, 3, 2);
  const double eta = 0.07;
  const M gd1 = ml::GradientDescent{1, eta, 0.0}.predict<double>(d.x, d.y, T);
  for (long b = 0; b < 3; ++b)
    for (long t = 0; t < T; ++t) {
      Eigen::VectorXd expect = Eigen::VectorXd::Zero(3);
      for (long i = 0; i < t; ++i) {
        double dot = 0;
        for (long j = 0; j < 4; ++j) dot += d.x(b * T + i, j) * d.x(b * T + t, j);
        for (long j = 0; j < 3; ++j) expect[j] += eta * d.y(b * T + i, j) * dot;
      }
      REQUIRE((gd1.row(b * T + t).transpose() - expect).norm() < 1e-12);
    }
  // The docs/paper.md §5 formula on dynamics: s_hat_{t+1} = eta sum_{t'<=t} s_{t'} (s_{t'-1} . s_t), s_0 = 0.
  const auto dyn = paper_dynamics(2, 4);
  const M p = ml::GradientDescent{1, 0.032, 0.0}.predict<double>(dyn.inputs, dyn.targets, 50);
  for (long t = 1; t <= 50; ++t) {  // 1-based, sequence 1
    Eigen::VectorXd e = Eigen::VectorXd::Zero(10);
    for (long tp = 1; tp <= t; ++tp) {
      const Eigen::VectorXd s_prev =
          tp == 1 ? Eigen::VectorXd::Zero(10) : Eigen::VectorXd(dyn.inputs.row(50 + tp - 2).transpose());
      e += 0.032 * dyn.inputs.row(50 + tp - 1).transpose() * s_prev.dot(dyn.inputs.row(50 + t - 1));
    }
    REQUIRE((p.row(50 + t - 1).transpose() - e).norm() < 1e-12);
  }
  // GD with regulariser r, K steps == Neumann series with K terms on A = H + r I.
  for (long K : {1L, 2L, 5L}) {
    const M gd = ml::GradientDescent{K, eta, 0.3}.predict<double>(d.x, d.y, T);
    const M ca = ml::CompressedAlg{K - 1, eta, 1.0 / 0.3, false}.predict<double>(d.x, d.y, T);
    CHECK((gd - ca).cwiseAbs().maxCoeff() < 1e-12);
    // Same with the step eta / ||A_t||_F on both sides.
    const M gds = ml::GradientDescent{K, 0.9, 0.3, true}.predict<double>(d.x, d.y, T);
    const M cas = ml::CompressedAlg{K - 1, 0.9, 1.0 / 0.3, true}.predict<double>(d.x, d.y, T);
    CHECK((gds - cas).cwiseAbs().maxCoeff() < 1e-12);
  }
  // Preconditioned GD with P = c I is GD with step c eta.
  const M pg = ml::PreconditionedGradientDescent{3, eta, M::Identity(4, 4) * 0.5, 0.1}.predict<double>(d.x, d.y, T);
  CHECK((pg - ml::GradientDescent{3, eta * 0.5, 0.1}.predict<double>(d.x, d.y, T)).cwiseAbs().maxCoeff() < 1e-12);
  // Online GD after two pairs: W = eta y_1 x_1^T + eta (y_2 - eta y_1 x_1.x_2) x_2^T.
  const M og = ml::OnlineGradientDescent{eta}.predict<double>(d.x, d.y, T);
  const Eigen::VectorXd x1 = d.x.row(0).transpose(), x2 = d.x.row(1).transpose(), x3 = d.x.row(2).transpose();
  const Eigen::VectorXd y1 = d.y.row(0).transpose(), y2 = d.y.row(1).transpose();
  const Eigen::VectorXd r2 = y2 - eta * y1 * x1.dot(x2);
  const Eigen::VectorXd e3 = eta * y1 * x1.dot(x3) + eta * r2 * x2.dot(x3);
  CHECK((og.row(2).transpose() - e3).norm() < 1e-12);
}

TEST_CASE("CompressedAlg-K converges to ridge at the rate |1 - eta mu|^(K+1)") {
  const long T = 30, dx = 5;
  const auto d = small_regression(1, T, dx, 2, 12);
  const double lambda = 2.0;
  const long t = 20;
  const Ctx c = context(d.x, d.y, T, 0, t);
  const Eigen::MatrixXd A = c.X.transpose() * c.X + Eigen::MatrixXd::Identity(dx, dx) / lambda;
  const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(A);
  const Eigen::VectorXd mu = es.eigenvalues();
  const double eta = 1.0 / mu.maxCoeff();  // rate 1 - mu_min / mu_max
  const M ridge = ml::Ridge{lambda}.predict<double>(d.x, d.y, T);
  const Eigen::MatrixXd G = c.Y.transpose() * c.X;
  double prev_err = 0;
  for (long K = 0; K <= 60; ++K) {
    const M ca = ml::CompressedAlg{K, eta, lambda, false}.predict<double>(d.x, d.y, T);
    const Eigen::VectorXd err = ridge.row(t).transpose() - ca.row(t).transpose();
    // Closed form: ridge - CompressedAlg = G A^{-1} (I - eta A)^{K+1} x_t.
    Eigen::VectorXd f(dx);
    for (long i = 0; i < dx; ++i) f[i] = std::pow(1.0 - eta * mu[i], double(K + 1)) / mu[i];
    const Eigen::VectorXd predicted = G * es.eigenvectors() * f.asDiagonal() * es.eigenvectors().transpose() * c.q;
    REQUIRE((err - predicted).norm() < 1e-9 * std::max(1.0, ridge.row(t).norm()));
    if (K >= 40) {  // the slowest mode dominates: ratio -> 1 - eta mu_min
      const double rate = 1.0 - eta * mu.minCoeff();
      CHECK(std::abs(err.norm() / prev_err - rate) < 1e-3);
    }
    prev_err = err.norm();
  }
  CHECK(prev_err < 1e-3 * ridge.row(t).norm());
}

TEST_CASE("Chebyshev solver: classical coefficients give the Chebyshev residual polynomial") {
  // A = V diag(mu) V^T with spectrum in [1, 9]; the solver divides by ||A||_F.
  const long n = 6;
  const M Vr = mesaopt::test::random_matrix<double>(n, n, 3);
  const Eigen::MatrixXd V = Eigen::HouseholderQR<Eigen::MatrixXd>(Vr).householderQ();
  Eigen::VectorXd mu(n);
  mu << 1.0, 1.5, 3.0, 5.0, 8.0, 9.0;
  const Eigen::MatrixXd A = V * mu.asDiagonal() * V.transpose();
  const double c = A.norm();
  const Eigen::VectorXd b = mesaopt::test::random_matrix<double>(n, 1, 4);
  const double lo = 1.0 / c, hi = 9.0 / c, theta = (hi + lo) / 2, delta = (hi - lo) / 2;
  auto cheb_T = [](long k, double z) {  // T_k(z) for |z| >= 1 or <= 1
    return std::abs(z) <= 1 ? std::cos(k * std::acos(z))
                            : std::cosh(k * std::acosh(std::abs(z))) * ((z < 0 && k % 2) ? -1.0 : 1.0);
  };
  for (long K : {1L, 3L, 6L, 10L}) {
    const auto s = ml::ChebyshevSolver::classical(K, lo, hi);
    const Eigen::VectorXd h = s.solve(A, b);
    const Eigen::VectorXd exact = A.ldlt().solve(b);
    // error = p_K(A') A^{-1} b with p_K(m) = T_K((theta - m)/delta) / T_K(theta/delta).
    Eigen::VectorXd p(n);
    for (long i = 0; i < n; ++i) p[i] = cheb_T(K, (theta - mu[i] / c) / delta) / cheb_T(K, theta / delta);
    const Eigen::VectorXd predicted = V * p.asDiagonal() * V.transpose() * exact;
    INFO("K = " << K);
    CHECK((exact - h - predicted).norm() < 1e-10 * exact.norm());
  }
  // K = 10 reaches the classical bound 2 r^K with r = (sqrt(kappa) - 1)/(sqrt(kappa) + 1) = 0.5.
  const auto s10 = ml::ChebyshevSolver::classical(10, lo, hi);
  const Eigen::VectorXd exact = A.ldlt().solve(b);
  CHECK((s10.solve(A, b) - exact).norm() <= 2 * std::pow(0.5, 10) * exact.norm() * 3.0 /* A-norm vs 2-norm */);
  // As a learner, enough classical steps on a wide interval approach ridge.
  const auto d = small_regression(3, 20, 4, 2, 6);
  auto s = ml::ChebyshevSolver::classical(120, 5e-3, 1.0, 0.5);
  CHECK((s.predict<double>(d.x, d.y, 20) - ml::Ridge::from_regularizer(0.5).predict<double>(d.x, d.y, 20))
            .cwiseAbs()
            .maxCoeff() < 1e-6);
}

TEST_CASE("softmax kernel regression: beta -> 0 averages the context, large beta picks the best match") {
  const long T = 8;
  const auto d = small_regression(2, T, 3, 2, 9);
  const M avg = ml::SoftmaxKernelRegression{0.0}.predict<double>(d.x, d.y, T);
  for (long t = 1; t < T; ++t)
    CHECK((avg.row(T + t) - d.y.middleRows(T, t).colwise().mean()).norm() < 1e-12);
  const M hard = ml::SoftmaxKernelRegression{1e6}.predict<double>(d.x, d.y, T);
  for (long t = 1; t < T; ++t) {
    long best = 0;
    double bd = -1e300;
    for (long i = 0; i < t; ++i) {
      const double v = d.x.row(T + i).dot(d.x.row(T + t));
      if (v > bd) bd = v, best = i;
    }
    CHECK((hard.row(T + t) - d.y.row(T + best)).norm() < 1e-9);
  }
}

TEST_CASE("paper numbers on the linear-dynamics task (docs/paper.md §1, §4)") {
  // 2000 sequences (1000 under sanitizers): sampling error of the averages is < 1%.
  const long B = mesaopt::test::kSanitized ? 1000 : 2000;
  const auto dyn = paper_dynamics(B, 2024);
  const M &x = dyn.inputs, &y = dyn.targets;
  const M pred = ml::GradientDescent{1, 0.032, 0.0}.predict<double>(x, y, 50);
  const auto gd = ml::loss_curve(pred, y, 50);
  const auto floor = ml::loss_curve(mt::predict_with_true_dynamics(dyn), y, 50);
  INFO("gd-1step avg " << ml::mean_of(gd) << ", t=1 " << gd[0] << ", noise floor " << ml::mean_of(floor));
  CHECK(std::abs(ml::mean_of(gd) / 0.900 - 1) < 0.05);
  // Single positions are noisier (the loss at t = 50 is heavy-tailed): allow
  // 5% plus three standard errors of the mean over sequences.
  const std::pair<long, double> paper_points[] = {{5, 1.515}, {10, 1.272}, {20, 0.852}, {30, 0.630}, {50, 0.775}};
  for (const auto& [t, paper] : paper_points) {
    double s2 = 0;
    for (long b = 0; b < B; ++b) {
      const double l = 0.5 * (y.row(b * 50 + t - 1) - pred.row(b * 50 + t - 1)).squaredNorm() - gd[std::size_t(t - 1)];
      s2 += l * l;
    }
    const double se = std::sqrt(s2 / (B - 1.0) / B);
    INFO("t = " << t << ": measured " << gd[std::size_t(t - 1)] << " +- " << se << ", paper " << paper);
    CHECK(std::abs(gd[std::size_t(t - 1)] - paper) <= 0.05 * paper + 3 * se);
  }
  // t = 1: no context, prediction 0, loss 1/2 E||s_2||^2 = n/6 + n sigma^2/2 = 1.6672 (paper: about 1.676).
  CHECK(std::abs(gd[0] / 1.676 - 1) < 0.02);
  CHECK(std::abs(ml::mean_of(floor) / 5e-4 - 1) < 0.05);

  // The paper's 6-step Chebyshev, lagged ridge and GD rows are checked position
  // by position in tests/test_paper_baselines.cpp.
}

TEST_CASE("comparison tools: agreement, curves, fitting a learner to a model") {
  const long T = 15;
  const auto d = small_regression(40, T, 4, 2, 21, 0.2);
  const M p = ml::Ridge{1.0}.predict<double>(d.x, d.y, T);
  auto same = ml::agreement(p, p, T);
  CHECK(same.mean_squared_difference == 0.0);
  CHECK(same.mean_cosine == Approx(1.0));
  const M neg = -p;
  auto opposite = ml::agreement(p, neg, T);
  CHECK(opposite.cosine[3] == Approx(-1.0));
  CHECK(opposite.squared_difference[3] == Approx(4.0 * (p.rowwise().squaredNorm().mean() * 0 + [&] {
                                                   double s = 0;
                                                   for (long b = 0; b < 40; ++b) s += p.row(b * T + 3).squaredNorm();
                                                   return s / 40;
                                                 }())));
  // A "model" that is secretly GD with eta = 0.043: the fit recovers eta.
  ml::Model<double> model = [](mesaopt::ConstMatrixRef<double> x, mesaopt::ConstMatrixRef<double> y, long len) {
    return ml::GradientDescent{1, 0.043, 0.0}.predict<double>(x, y, len);
  };
  const M mp = model(d.x, d.y, T);
  const auto fit = ml::fit_to_model<double>([](double e) { return ml::GradientDescent{1, e, 0.0}; }, mp, d.x, d.y,
                                            T, 1e-3, 1.0);
  CHECK(fit.value == Approx(0.043).epsilon(1e-4));
  CHECK(fit.residual < 1e-10);
  CHECK(fit.cosine == Approx(1.0));
  const M gd3 = ml::GradientDescent{3, 0.02, 0.0}.predict<double>(d.x, d.y, T);
  const auto fk = ml::fit_integer_to_model<double>([](long k) { return ml::GradientDescent{k, 0.02, 0.0}; }, gd3,
                                                   d.x, d.y, T, 1, 8);
  CHECK(fk.value == 3.0);
  CHECK(fk.residual == 0.0);
  const auto curves = ml::compare_loss_curves<double>(ml::erase<double>(ml::GradientDescent{1, 0.043, 0.0}), model,
                                                      d.x, d.y, T);
  CHECK(curves.learner == curves.model);
  CHECK(curves.learner.size() == std::size_t(T));
  // Tuning the step for loss: the optimum is no worse than nearby steps.
  const auto best = ml::tune_for_loss<double>([](double e) { return ml::GradientDescent{1, e, 0.0}; }, d.x, d.y, T,
                                              1e-3, 1.0);
  for (double f : {0.8, 1.25}) {
    const double other =
        ml::mean_of(ml::loss_curve(ml::GradientDescent{1, best.argmin * f, 0.0}.predict<double>(d.x, d.y, T), d.y, T));
    CHECK(best.value <= other);
  }
}

TEST_CASE("bad learner inputs throw std::invalid_argument naming the argument and value") {
  const auto d = small_regression(2, 5, 3, 1, 1);
  CHECK_THROWS_WITH(ml::Ridge{0.0}.predict<double>(d.x, d.y, 5), Contains("lambda must be finite and > 0, got 0"));
  CHECK_THROWS_WITH(ml::Ridge{-1.0}.predict<double>(d.x, d.y, 5), Contains("lambda must be finite and > 0, got -1"));
  CHECK_THROWS_WITH(ml::RecursiveLeastSquares{-2.0}.predict<double>(d.x, d.y, 5), Contains("lambda"));
  CHECK_THROWS_WITH(ml::Ridge{1.0}.predict<double>(d.x, d.y, 3), Contains("not a multiple of seq_len 3"));
  CHECK_THROWS_WITH(ml::Ridge{1.0}.predict<double>(d.x, d.y.topRows(5), 5), Contains("y.rows() is 5"));
  CHECK_THROWS_WITH(ml::Ridge{1.0}.predict<double>(d.x, d.y, 0), Contains("seq_len must be at least 1, got 0"));
  CHECK_THROWS_WITH((ml::GradientDescent{0, 0.1, 0.0}.predict<double>(d.x, d.y, 5)), Contains("steps must be at least 1, got 0"));
  CHECK_THROWS_WITH((ml::GradientDescent{1, 0.1, -1.0}.predict<double>(d.x, d.y, 5)),
                    Contains("regularizer must be finite and >= 0, got -1"));
  CHECK_THROWS_WITH((ml::CompressedAlg{2, -0.5, 1.0, true}.predict<double>(d.x, d.y, 5)),
                    Contains("eta must be finite and > 0, got -0.5"));
  CHECK_THROWS_WITH((ml::CompressedAlg{-1, 0.5, 1.0, true}.predict<double>(d.x, d.y, 5)), Contains("order must be >= 0, got -1"));
  CHECK_THROWS_WITH((ml::PreconditionedGradientDescent{1, 0.1, M::Identity(2, 2), 0.0}.predict<double>(d.x, d.y, 5)),
                    Contains("preconditioner is 2 x 2 but must be 3 x 3"));
  ml::ChebyshevSolver s = ml::ChebyshevSolver::classical(6, 0.066, 1.0);
  s.beta.pop_back();
  CHECK_THROWS_WITH(s.predict<double>(d.x, d.y, 5), Contains("beta.size() is 5"));
  s = ml::ChebyshevSolver::classical(6, 0.066, 1.0);
  s.regularizer = 0;
  CHECK_THROWS_WITH(s.predict<double>(d.x, d.y, 5), Contains("regularizer must be finite and > 0, got 0"));
  CHECK_THROWS_WITH(ml::ChebyshevSolver::classical(3, 0.5, 0.2), Contains("mu_max must be finite and > mu_min"));
  CHECK_THROWS_WITH(ml::SoftmaxKernelRegression{std::nan("")}.predict<double>(d.x, d.y, 5), Contains("beta must be finite"));
  CHECK_THROWS_WITH(ml::loss_curve(d.y, d.y.topRows(5), 5), Contains("pred is 10 x 1 but must be 5 x 1"));
  CHECK_THROWS_WITH(ml::minimize_1d([](double v) { return v; }, 0.0, 1.0, true), Contains("log_scale needs lo > 0, got lo = 0"));
  CHECK_THROWS_WITH(ml::minimize_1d([](double v) { return v; }, 2.0, 1.0, false), Contains("lo = 2, hi = 1"));
}

}  // namespace mesaopt_test_learners
