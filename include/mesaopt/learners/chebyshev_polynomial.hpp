#pragma once
// The paper's "Chebyshev" baseline (its Proposition 2, Fig. 4 row "6 Chebyshev
// steps") exactly as the paper's code computes it (docs/math.md §4, M23;
// docs/paper.md §5): a matrix polynomial in the Frobenius-normalised ridge
// matrix, built from the context pairs with a one-pair lag.
//
// At position t the context is the pairs (x_i, y_i), i < t - lag (lag = 1: the
// paper's rows use the pairs (s_{t'-1}, s_{t'}) with t' <= t - 1, so positions
// 1 and 2 both predict 0). With
//
//     A = sum_i x_i x_i^T + regularizer I,   c = ||A||_F,   Abar = A / c,
//     G = sum_i y_i x_i^T,
//
// the polynomial X_K(Abar) is built from X_{-1} = X_0 = P_0 = I by
//
//     P_k = P_{k-1} (I - alpha_k Abar),
//     X_k = X_{k-1} + P_k + beta_k (X_{k-1} - X_{k-2}),      k = 1 .. K,
//
// and the prediction is y_hat_t = G X_K x_t / c (the paper writes it with row
// vectors, s_t^T (X_K / c) X^T Y). X_K approximates Abar^{-1}, so the
// prediction approximates ridge regression with regulariser `regularizer` on
// the lagged pairs. With alpha = 1, beta = 0, X_K = sum_{k=0..K} (I - Abar)^k,
// the truncated Neumann series of Abar^{-1}.
//
// Every P_k and X_k is a polynomial in the symmetric Abar, so they commute and
// X_K x_t can be formed with vectors only (predict(), O(K dx^2) per position
// after A): g_{-1} = g_0 = p_0 = x_t, p_k = p_{k-1} - alpha_k Abar p_{k-1},
// g_k = g_{k-1} + p_k + beta_k (g_{k-1} - g_{k-2}). predict_matrix_form()
// builds X_K itself (O(K dx^3)), as the paper's code does; tests compare the two.
//
// This is not ChebyshevSolver (learners/chebyshev.hpp), which runs a
// two-term iteration on a vector iterate h_k with a residual; with the
// paper's learned coefficients that form does not give the paper's curve
// (docs/learners.md).
#include <mesaopt/learners/context.hpp>

#include <Eigen/Core>

#include <cmath>
#include <string>
#include <vector>

namespace mesaopt::learners {

struct ChebyshevPolynomial {
  std::vector<double> alpha;  // alpha_1 .. alpha_K
  std::vector<double> beta;   // beta_1 .. beta_K (beta_1 multiplies X_0 - X_{-1} = 0)
  double regularizer = 1e-3;  // added to A (the paper: 1e-3); >= 0
  long lag = 1;               // pairs i < t - lag form the context; the paper's rows: 1
  std::string label = "";     // name override; default "chebyshev-K" (+ "-unlagged" for lag 0)

  // The 6-step coefficients the paper's authors learned through this same
  // lagged predictor (docs/paper.md §5).
  static ChebyshevPolynomial paper_six_step() {
    ChebyshevPolynomial p;
    p.alpha = {1.0257748, 3.2508426, 3.2583678, 3.2122886, 2.694414, 1.2727231};
    p.beta = {0.0, 0.6787798, 0.30748147, 0.74470717, 1.8360422, 2.3438027};
    return p;
  }
  // alpha_k = 1, beta_k = 0: X_K = the truncated Neumann series sum_{k<=K} (I - Abar)^k.
  static ChebyshevPolynomial neumann(long steps) {
    detail::check_positive_size("ChebyshevPolynomial::neumann", "steps", steps);
    ChebyshevPolynomial p;
    p.alpha.assign(std::size_t(steps), 1.0);
    p.beta.assign(std::size_t(steps), 0.0);
    return p;
  }

  std::string name() const {
    if (!label.empty()) return label;
    return "chebyshev-" + std::to_string(alpha.size()) + (lag == 0 ? "-unlagged" : lag == 1 ? "" : "-lag" + std::to_string(lag));
  }

  void validate(const char* where) const {
    detail::check_positive_size(where, "alpha.size()", static_cast<long>(alpha.size()));
    detail::check_size(where, "beta.size()", static_cast<long>(beta.size()), static_cast<long>(alpha.size()),
                       "alpha.size()");
    for (std::size_t k = 0; k < alpha.size(); ++k)
      if (!std::isfinite(alpha[k]) || !std::isfinite(beta[k]))
        detail::fail(where, "coefficients must be finite, got alpha[", k, "] = ", alpha[k], ", beta[", k, "] = ",
                     beta[k]);
    if (!(std::isfinite(regularizer) && regularizer >= 0.0))
      detail::fail(where, "regularizer must be finite and >= 0, got ", regularizer);
    if (lag < 0) detail::fail(where, "lag must be >= 0, got ", lag);
  }

  // X_K(Abar) for a symmetric (dx, dx) Abar (the paper's matrix recursion).
  Eigen::MatrixXd polynomial(const Eigen::MatrixXd& Abar) const {
    const long n = Abar.rows();
    const Eigen::MatrixXd I = Eigen::MatrixXd::Identity(n, n);
    Eigen::MatrixXd P = I, X = I, X_prev = I;
    for (std::size_t k = 0; k < alpha.size(); ++k) {
      P = (P * (I - alpha[k] * Abar)).eval();
      Eigen::MatrixXd X_next = X + P + beta[k] * (X - X_prev);
      X_prev.swap(X);
      X.swap(X_next);
    }
    return X;
  }

  // X_K(Abar) s by the vector recursion (no matrix products).
  Eigen::VectorXd apply(const Eigen::MatrixXd& Abar, const Eigen::VectorXd& s) const {
    Eigen::VectorXd p = s, g = s, g_prev = s, g_next(s.size());
    for (std::size_t k = 0; k < alpha.size(); ++k) {
      p -= alpha[k] * (Abar * p);
      g_next = g + p + beta[k] * (g - g_prev);
      g_prev.swap(g);
      g.swap(g_next);
    }
    return g;
  }

  // x is (B*T, dx), y is (B*T, dy); returns (B*T, dy). Vector form.
  template <class T>
  RowMatrix<T> predict(ConstMatrixRef<T> x, ConstMatrixRef<T> y, long seq_len, int num_threads = 0) const {
    return run<T>("ChebyshevPolynomial::predict", x, y, seq_len, num_threads, false);
  }
  // The same predictions with X_K formed as a matrix, as the paper's code does.
  template <class T>
  RowMatrix<T> predict_matrix_form(ConstMatrixRef<T> x, ConstMatrixRef<T> y, long seq_len,
                                   int num_threads = 0) const {
    return run<T>("ChebyshevPolynomial::predict_matrix_form", x, y, seq_len, num_threads, true);
  }

 private:
  template <class T>
  RowMatrix<T> run(const char* where, ConstMatrixRef<T> x, ConstMatrixRef<T> y, long seq_len, int num_threads,
                   bool matrix_form) const {
    validate(where);
    const ChebyshevPolynomial& self = *this;
    return detail::for_each_sequence<T>(where, x, y, seq_len, num_threads,
                                        [&self, matrix_form](const RowMatrix<double>& X, const RowMatrix<double>& Y,
                                                             RowMatrix<double>& P) {
      const long dx = X.cols();
      Eigen::MatrixXd A = Eigen::MatrixXd::Identity(dx, dx) * self.regularizer;
      Eigen::MatrixXd G = Eigen::MatrixXd::Zero(Y.cols(), dx);
      long used = 0;  // pairs 0 .. used-1 are in A and G
      for (long t = 0; t < X.rows(); ++t) {
        for (; used < t - self.lag; ++used) {
          A.noalias() += X.row(used).transpose() * X.row(used);
          G.noalias() += Y.row(used).transpose() * X.row(used);
        }
        if (used == 0) continue;  // empty context: predict 0 (G = 0)
        const double c = A.norm();
        const Eigen::MatrixXd Abar = A / c;
        const Eigen::VectorXd s = X.row(t).transpose();
        const Eigen::VectorXd g = matrix_form ? Eigen::VectorXd(self.polynomial(Abar) * s) : self.apply(Abar, s);
        P.row(t) = (G * g).transpose() / c;
      }
    });
  }
};

}  // namespace mesaopt::learners
