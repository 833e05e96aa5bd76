// The paper's Fig. 4 baselines exactly as its code computes them (docs/paper.md
// §5, docs/math.md M23; docs/learners.md "The paper's rows"):
//  - ChebyshevPolynomial: alpha = 1, beta = 0 is the truncated Neumann series;
//    the vector form equals the matrix form; the lag drops the latest pairs;
//  - Ridge with lag 1 against its closed form;
//  - chebyshev-6, lsq-exact-lagged (ridge 1e-3, lag 1) and gd-0.032 against the
//    paper's per-position curves (docs/figures/paper_fig4_curves.csv).
#include <catch2/catch.hpp>
#include <mesaopt/learners.hpp>
#include <mesaopt/tasks.hpp>

#include "test_util.hpp"

#include <Eigen/Cholesky>

#include <cmath>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

// Everything of this file lives in its own namespace, so that test files can be
// compiled together in one translation unit (tests/CMakeLists.txt, unity groups).
namespace mesaopt_test_paper_baselines {

namespace ml = mesaopt::learners;
namespace mt = mesaopt::tasks;
using mesaopt::RowMatrix;
using Catch::Matchers::Contains;

namespace {

// A random symmetric positive definite matrix scaled to unit Frobenius norm (an Abar).
Eigen::MatrixXd random_abar(long n, std::uint64_t seed) {
  const RowMatrix<double> X = mesaopt::test::random_matrix<double>(n + 3, n, seed);
  Eigen::MatrixXd A = X.transpose() * X + 1e-3 * Eigen::MatrixXd::Identity(n, n);
  return A / A.norm();
}

std::map<std::string, std::vector<double>> read_paper_curves() {
  const std::string path = std::string(MESAOPT_SOURCE_DIR) + "/docs/figures/paper_fig4_curves.csv";
  std::ifstream f(path);
  REQUIRE(f.good());
  std::string line;
  std::getline(f, line);
  REQUIRE(line == "method,position,loss");
  std::map<std::string, std::vector<double>> out;
  while (std::getline(f, line)) {
    std::stringstream ss(line);
    std::string method, position, loss;
    std::getline(ss, method, ',');
    std::getline(ss, position, ',');
    std::getline(ss, loss, ',');
    auto& curve = out[method];
    REQUIRE(std::stol(position) == long(curve.size()) + 1);
    curve.push_back(std::stod(loss));
  }
  return out;
}

}  // namespace

TEST_CASE("ChebyshevPolynomial with alpha = 1, beta = 0 is the truncated Neumann series", "[chebyshev]") {
  for (long n : {1L, 3L, 10L}) {
    const Eigen::MatrixXd Abar = random_abar(n, 100 + std::uint64_t(n));
    const Eigen::MatrixXd I = Eigen::MatrixXd::Identity(n, n);
    for (long K : {1L, 2L, 6L, 15L}) {
      Eigen::MatrixXd neumann = I, power = I;
      for (long k = 1; k <= K; ++k) {
        power = power * (I - Abar);
        neumann += power;
      }
      const Eigen::MatrixXd X = ml::ChebyshevPolynomial::neumann(K).polynomial(Abar);
      INFO("n = " << n << ", K = " << K);
      CHECK((X - neumann).norm() <= 1e-13 * neumann.norm());
    }
  }
  // ... and so tends to Abar^{-1} as K grows (Abar's spectrum lies in (0, 1]).
  const Eigen::MatrixXd Abar = random_abar(4, 7) + 0.3 * Eigen::MatrixXd::Identity(4, 4);
  const Eigen::MatrixXd Ab = Abar / Abar.norm();
  const Eigen::MatrixXd inv = Ab.inverse();
  CHECK((ml::ChebyshevPolynomial::neumann(400).polynomial(Ab) - inv).norm() < 1e-8 * inv.norm());
}

TEST_CASE("ChebyshevPolynomial: the vector form equals the matrix form", "[chebyshev]") {
  ml::ChebyshevPolynomial p = ml::ChebyshevPolynomial::paper_six_step();
  for (long n : {1L, 4L, 10L, 13L}) {
    const Eigen::MatrixXd Abar = random_abar(n, 200 + std::uint64_t(n));
    const Eigen::VectorXd s = mesaopt::test::random_matrix<double>(n, 1, 300 + std::uint64_t(n)).col(0);
    const Eigen::VectorXd by_matrix = p.polynomial(Abar) * s, by_vector = p.apply(Abar, s);
    CHECK((by_matrix - by_vector).norm() <= 1e-12 * by_matrix.norm());
  }
  for (long lag : {0L, 1L, 2L}) {
    for (long dx : {1L, 3L, 10L}) {
      p.lag = lag;
      const long B = 3, T = 17, dy = 2;
      const RowMatrix<double> x = mesaopt::test::random_matrix<double>(B * T, dx, 40 + std::uint64_t(dx));
      const RowMatrix<double> y = mesaopt::test::random_matrix<double>(B * T, dy, 50 + std::uint64_t(dx));
      const RowMatrix<double> a = p.predict<double>(x, y, T), b = p.predict_matrix_form<double>(x, y, T);
      INFO("lag = " << lag << ", dx = " << dx);
      CHECK((a - b).norm() <= 1e-11 * b.norm());
      // Positions 1 .. lag + 1 have no context: prediction 0; position lag + 2 has one pair.
      for (long s = 0; s < B; ++s) {
        CHECK(a.middleRows(s * T, lag + 1).isZero(0.0));
        CHECK(a.row(s * T + lag + 1).norm() > 0);
      }
      // Float storage gives the same numbers to float rounding.
      const RowMatrix<float> af = p.predict<float>(x.cast<float>(), y.cast<float>(), T);
      CHECK((af.cast<double>() - a).norm() <= 1e-5 * a.norm());
    }
  }
}

TEST_CASE("Ridge with a lag uses the pairs i < t - lag (closed form)", "[ridge]") {
  const long T = 12, dx = 4, dy = 3, B = 2;
  const RowMatrix<double> x = mesaopt::test::random_matrix<double>(B * T, dx, 61);
  const RowMatrix<double> y = mesaopt::test::random_matrix<double>(B * T, dy, 62);
  for (long lag : {0L, 1L, 3L}) {
    const ml::Ridge r = ml::Ridge::from_regularizer(0.1, lag);
    const RowMatrix<double> p = r.predict<double>(x, y, T);
    for (long s = 0; s < B; ++s)
      for (long t = 0; t < T; ++t) {
        const long used = std::max(0L, t - lag);
        Eigen::VectorXd expected = Eigen::VectorXd::Zero(dy);
        if (used > 0) {
          const auto X = x.middleRows(s * T, used), Y = y.middleRows(s * T, used);
          const Eigen::MatrixXd H = X.transpose() * X + 0.1 * Eigen::MatrixXd::Identity(dx, dx);
          expected = Y.transpose() * X * H.ldlt().solve(Eigen::VectorXd(x.row(s * T + t).transpose()));
        }
        INFO("lag " << lag << ", t " << t);
        CHECK((p.row(s * T + t).transpose() - expected).norm() <= 1e-12 * (1 + expected.norm()));
      }
  }
  CHECK(ml::Ridge::from_regularizer(1e-3, 1).name() == "ridge-lagged");
  CHECK_THROWS_WITH(ml::Ridge::from_regularizer(1e-3, -1).predict<double>(x, y, T), Contains("lag must be >= 0"));
  ml::ChebyshevPolynomial bad = ml::ChebyshevPolynomial::paper_six_step();
  bad.lag = -2;
  CHECK_THROWS_WITH(bad.predict<double>(x, y, T), Contains("lag must be >= 0, got -2"));
  bad = ml::ChebyshevPolynomial::paper_six_step();
  bad.beta.pop_back();
  CHECK_THROWS_AS(bad.predict<double>(x, y, T), std::invalid_argument);
}

// The paper's curves are 5-seed means over 5 x 256 test sequences (docs/paper.md
// §4): their own relative standard error per position is 1-6 % for these rows
// (largest for the lagged ridge at t = 11-13, where the number of pairs crosses
// the dimension and the loss is heavy-tailed; measured, docs/learners.md). So the
// check is: within 3 %, or within 3 combined standard errors (the paper's,
// estimated from our per-sequence spread as if from 1280 sequences, and ours).
TEST_CASE("the paper's baselines match its Fig. 4 curves position by position", "[paper][chebyshev]") {
  const auto paper = read_paper_curves();
  const mt::DynamicsConfig cfg;  // the paper's task (docs/paper.md §1)
  const long T = cfg.seq_len, N = 20000;
  const auto batch = mt::make_dynamics_batch<double>(cfg, N, 12345);
  struct Row {
    const char* paper_name;
    RowMatrix<double> pred;
  };
  const Row rows[] = {
      {"chebyshev-6", ml::ChebyshevPolynomial::paper_six_step().predict<double>(batch.inputs, batch.targets, T)},
      {"lsq-exact-lagged", ml::Ridge::from_regularizer(1e-3, 1).predict<double>(batch.inputs, batch.targets, T)},
      {"gd-0.032", ml::GradientDescent{1, 0.032, 0.0}.predict<double>(batch.inputs, batch.targets, T)},
  };
  for (const Row& row : rows) {
    const std::vector<double>& ref = paper.at(row.paper_name);
    REQUIRE(long(ref.size()) == T);
    long within_3_percent = 0;
    for (long t = 2; t <= T; ++t) {
      double sum = 0, sum2 = 0;
      for (long s = 0; s < N; ++s) {
        const long r = s * T + t - 1;
        const double loss = 0.5 * (batch.targets.row(r) - row.pred.row(r)).squaredNorm();
        sum += loss;
        sum2 += loss * loss;
      }
      const double mean = sum / double(N), sd = std::sqrt(std::max(0.0, sum2 / double(N) - mean * mean));
      const double se = sd * std::sqrt(1.0 / 1280.0 + 1.0 / double(N));
      const double diff = std::abs(mean - ref[std::size_t(t - 1)]);
      INFO(row.paper_name << " t = " << t << ": ours " << mean << ", paper " << ref[std::size_t(t - 1)]
                          << ", relative difference " << diff / ref[std::size_t(t - 1)] << ", combined SE " << se);
      CHECK((diff <= 0.03 * ref[std::size_t(t - 1)] || diff <= 3 * se));
      within_3_percent += diff <= 0.03 * ref[std::size_t(t - 1)];
    }
    // How many are within 3 % outright depends on the row's tail: measured with
    // 20000 sequences, chebyshev-6 and the lagged ridge nearly all, gd-0.032
    // (heavy-tailed at long contexts) about 35 of 49 (docs/learners.md).
    WARN(row.paper_name << ": " << within_3_percent << " of " << T - 1 << " positions t >= 2 within 3 %");
    // The averages over t = 1..T within 1.5 %.
    const std::vector<double> curve = ml::loss_curve(row.pred, batch.targets, T);
    double ours = 0, theirs = 0;
    for (long t = 0; t < T; ++t) {
      ours += curve[std::size_t(t)];
      theirs += ref[std::size_t(t)];
    }
    CHECK(std::abs(ours / theirs - 1) < 0.015);
  }
}

}  // namespace mesaopt_test_paper_baselines
