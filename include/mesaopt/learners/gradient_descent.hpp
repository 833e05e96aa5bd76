#pragma once
// Gradient-descent learners (docs/math.md §1 and §4) on the context loss
//
//     L_t(W) = 1/2 sum_{i<t} ||y_i - W x_i||^2 + regularizer/2 ||W||_F^2,
//     grad L_t(W) = W A_t - G_t,   A_t = H_t + regularizer I,
//
// with H_t = sum_{i<t} x_i x_i^T and G_t = sum_{i<t} y_i x_i^T.
#include <mesaopt/learners/context.hpp>

#include <Eigen/Core>
#include <utility>

namespace mesaopt::learners {

}  // namespace mesaopt::learners

namespace mesaopt::detail {
inline void check_regularizer(const char* where, double r) {
  if (!(std::isfinite(r) && r >= 0.0)) detail::fail(where, "regularizer must be finite and >= 0, got ", r);
}
inline void check_finite_eta(const char* where, double eta) {
  if (!std::isfinite(eta)) detail::fail(where, "eta must be finite, got ", eta);
}
}  // namespace mesaopt::detail

namespace mesaopt::learners {

// K steps of W <- W - eta grad L_t(W) from W_0 = 0, prediction W_K x_t.
// K = 1 gives y_hat_t = eta sum_{i<t} y_i (x_i . x_t): one linear-attention
// layer (docs/math.md §1; docs/paper.md §5, eta = 0.032 for the trained 1-layer model).
// Written as the literal matrix iteration (the reference for CompressedAlg).
// With frobenius_scaled the step at position t is eta / ||A_t||_F (A_t = 0, an
// all-zero context, predicts 0): a fixed step that suits short contexts
// diverges on the sequences whose lambda_max(H_t) exceeds 2 / eta at long ones.
struct GradientDescent {
  long steps = 1;
  double eta = 0.032;
  double regularizer = 0.0;
  bool frobenius_scaled = false;

  std::string name() const { return "gd-" + std::to_string(steps) + "step"; }

  template <class T>
  RowMatrix<T> predict(ConstMatrixRef<T> x, ConstMatrixRef<T> y, long seq_len, int num_threads = 0) const {
    const char* where = "GradientDescent::predict";
    detail::check_positive_size(where, "steps", steps);
    detail::check_finite_eta(where, eta);
    detail::check_regularizer(where, regularizer);
    const long K = steps;
    const double e = eta, reg = regularizer;
    const bool scaled = frobenius_scaled;
    return detail::for_each_sequence<T>(where, x, y, seq_len, num_threads,
                                        [=](const RowMatrix<double>& X, const RowMatrix<double>& Y,
                                            RowMatrix<double>& P) {
      const long dx = X.cols();
      Eigen::MatrixXd A = Eigen::MatrixXd::Identity(dx, dx) * reg;
      Eigen::MatrixXd G = Eigen::MatrixXd::Zero(Y.cols(), dx), W(Y.cols(), dx);
      for (long t = 0; t < X.rows(); ++t) {
        const double norm = A.norm();
        if (t > 0 && (!scaled || norm > 0)) {
          const double step = scaled ? e / norm : e;
          W.setZero();
          for (long k = 0; k < K; ++k) W -= step * (W * A - G);
          P.row(t) = X.row(t) * W.transpose();
        }
        A.noalias() += X.row(t).transpose() * X.row(t);
        G.noalias() += Y.row(t).transpose() * X.row(t);
      }
    });
  }
};

// Preconditioned GD: K steps of W <- W - eta grad L_t(W) P from W_0 = 0, with a
// fixed (dx, dx) preconditioner P (docs/math.md §4). P = A_t^{-1} and eta = 1 would
// give ridge in one step; a fixed P is what a trained layer can hold.
struct PreconditionedGradientDescent {
  long steps = 1;
  double eta = 0.032;
  RowMatrix<double> preconditioner;  // (dx, dx)
  double regularizer = 0.0;
  bool frobenius_scaled = false;  // step eta / ||A_t||_F, as GradientDescent

  std::string name() const { return "precond-gd-" + std::to_string(steps) + "step"; }

  template <class T>
  RowMatrix<T> predict(ConstMatrixRef<T> x, ConstMatrixRef<T> y, long seq_len, int num_threads = 0) const {
    const char* where = "PreconditionedGradientDescent::predict";
    detail::check_positive_size(where, "steps", steps);
    detail::check_finite_eta(where, eta);
    detail::check_regularizer(where, regularizer);
    detail::check_shape(where, "preconditioner", preconditioner, x.cols(), x.cols());
    if (!preconditioner.allFinite()) detail::fail(where, "preconditioner has non-finite entries");
    const long K = steps;
    const double e = eta, reg = regularizer;
    const Eigen::MatrixXd Pc = preconditioner;
    const bool scaled = frobenius_scaled;
    return detail::for_each_sequence<T>(where, x, y, seq_len, num_threads,
                                        [=, &Pc](const RowMatrix<double>& X, const RowMatrix<double>& Y,
                                                 RowMatrix<double>& P) {
      const long dx = X.cols();
      Eigen::MatrixXd A = Eigen::MatrixXd::Identity(dx, dx) * reg;
      Eigen::MatrixXd G = Eigen::MatrixXd::Zero(Y.cols(), dx), W(Y.cols(), dx);
      for (long t = 0; t < X.rows(); ++t) {
        const double norm = A.norm();
        if (t > 0 && (!scaled || norm > 0)) {
          const double step = scaled ? e / norm : e;
          W.setZero();
          for (long k = 0; k < K; ++k) W -= step * (W * A - G) * Pc;
          P.row(t) = X.row(t) * W.transpose();
        }
        A.noalias() += X.row(t).transpose() * X.row(t);
        G.noalias() += Y.row(t).transpose() * X.row(t);
      }
    });
  }
};

// Online GD: one pass over the context, one step per pair (the LMS / delta rule):
// W_i = W_{i-1} + eta (y_i - W_{i-1} x_i) x_i^T, W_0 = 0; prediction W_{t-1} x_t.
struct OnlineGradientDescent {
  double eta = 0.1;

  std::string name() const { return "online-gd"; }

  template <class T>
  RowMatrix<T> predict(ConstMatrixRef<T> x, ConstMatrixRef<T> y, long seq_len, int num_threads = 0) const {
    const char* where = "OnlineGradientDescent::predict";
    detail::check_finite_eta(where, eta);
    const double e = eta;
    return detail::for_each_sequence<T>(where, x, y, seq_len, num_threads,
                                        [=](const RowMatrix<double>& X, const RowMatrix<double>& Y,
                                            RowMatrix<double>& P) {
      Eigen::MatrixXd W = Eigen::MatrixXd::Zero(Y.cols(), X.cols());
      for (long t = 0; t < X.rows(); ++t) {
        P.row(t) = X.row(t) * W.transpose();  // zero at t = 1
        const Eigen::VectorXd r = Y.row(t).transpose() - W * X.row(t).transpose();
        W.noalias() += e * r * X.row(t);
      }
    });
  }
};

// CompressedAlg-K (docs/math.md §4): the truncated Neumann series
//     A_t^{-1} ~ eta sum_{j=0}^{K} (I - eta A_t)^j,   A_t = H_t + I/lambda,
// prediction G_t [eta sum_j (I - eta A_t)^j x_t] (K+1 matrix-vector products).
// The error against ridge is G_t A_t^{-1} (I - eta A_t)^{K+1} x_t: geometric
// with rate max |1 - eta mu| over the eigenvalues mu of A_t; it converges for
// 0 < eta < 2 / mu_max. With frobenius_scaled, the step at position t is
// eta / ||A_t||_F (mu_max <= ||A_t||_F, so any 0 < eta < 2 converges). K+1
// steps of GradientDescent with regularizer 1/lambda give the same prediction.
struct CompressedAlg {
  long order = 6;          // K: the series has K+1 terms
  double eta = 1.0;
  double lambda = 1e3;     // prior variance, regulariser 1/lambda (as Ridge)
  bool frobenius_scaled = true;

  std::string name() const { return "compressed-" + std::to_string(order); }

  template <class T>
  RowMatrix<T> predict(ConstMatrixRef<T> x, ConstMatrixRef<T> y, long seq_len, int num_threads = 0) const {
    const char* where = "CompressedAlg::predict";
    if (order < 0) detail::fail(where, "order must be >= 0, got ", order);
    detail::check_positive_finite(where, "eta", eta);
    detail::check_positive_finite(where, "lambda", lambda);
    const long K = order;
    const double e = eta, lam = lambda;
    const bool scaled = frobenius_scaled;
    return detail::for_each_sequence<T>(where, x, y, seq_len, num_threads,
                                        [=](const RowMatrix<double>& X, const RowMatrix<double>& Y,
                                            RowMatrix<double>& P) {
      const long dx = X.cols();
      Eigen::MatrixXd A = Eigen::MatrixXd::Identity(dx, dx) / lam;
      Eigen::MatrixXd G = Eigen::MatrixXd::Zero(Y.cols(), dx);
      Eigen::VectorXd v(dx), z(dx);
      for (long t = 0; t < X.rows(); ++t) {
        if (t > 0) {
          const double step = scaled ? e / A.norm() : e;
          v = X.row(t).transpose();  // (I - eta A)^j x_t
          z = v;
          for (long j = 1; j <= K; ++j) {
            v -= step * (A * v);
            z += v;
          }
          P.row(t) = (step * (G * z)).transpose();
        }
        A.noalias() += X.row(t).transpose() * X.row(t);
        G.noalias() += Y.row(t).transpose() * X.row(t);
      }
    });
  }
};

}  // namespace mesaopt::learners
