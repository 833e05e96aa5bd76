#pragma once
// K-step Chebyshev/Richardson iteration on a vector iterate, with per-step
// coefficients (docs/math.md §4): approximate h = A_t^{-1} x_t,
// A_t = H_t + regularizer I, by the two-term recursion on the
// Frobenius-normalised system
//
//     A' = A_t / c,  b' = x_t / c,  c = ||A_t||_F,   h_{-1} = h_0 = 0,
//     h_{k+1} = h_k + alpha_k (b' - A' h_k) + beta_k (h_k - h_{k-1}),
//
// then predict y_hat_t = G_t h_K with G_t = sum_{i<t} y_i x_i^T (a GD step on
// the preconditioned query; as K grows with good coefficients this tends to ridge
// with regulariser `regularizer`). Normalising both A and b keeps A'^{-1} b' =
// A_t^{-1} x_t while putting the spectrum of A' in (0, 1]. classical() gives the
// textbook Chebyshev semi-iteration's coefficients.
//
// This is NOT the paper's "Chebyshev" baseline: the paper's code builds a
// matrix polynomial from lagged pairs (learners/chebyshev_polynomial.hpp,
// ChebyshevPolynomial::paper_six_step()). Its learned coefficients do not suit
// this iteration (docs/learners.md). The momentum convention, the scaling of A
// and the start h_0 are options.
#include <mesaopt/learners/context.hpp>

#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <cmath>
#include <vector>

namespace mesaopt::learners {

// How beta_k enters the recursion.
enum class Momentum {
  heavy_ball,  // h_{k+1} = h_k + alpha_k r(h_k) + beta_k (h_k - h_{k-1})   (docs/paper.md §5)
  nesterov,    // g = h_k + beta_k (h_k - h_{k-1}); h_{k+1} = g + alpha_k r(g)
  none,        // h_{k+1} = h_k + alpha_k r(h_k): Richardson, beta ignored
};
// The normaliser c of A' = A_t / c, b' = x_t / c.
enum class SystemScaling { frobenius, spectral, trace };
// The starting iterate h_{-1} = h_0.
enum class StartPoint { zero, rhs };  // 0, or b' (the query, as stored in a token)

struct ChebyshevSolver {
  std::vector<double> alpha;  // alpha_0 .. alpha_{K-1}
  std::vector<double> beta;   // beta_0 .. beta_{K-1} (beta_0 multiplies h_0 - h_{-1} = 0)
  double regularizer = 1e-3;  // additive, as docs/paper.md §5 writes it
  std::string label = "";     // name override; default "chebyshev-iteration-K"
  Momentum momentum = Momentum::heavy_ball;
  SystemScaling scaling = SystemScaling::frobenius;
  StartPoint start = StartPoint::zero;

  // Classical Chebyshev semi-iteration (Saad, Iterative Methods, Alg. 12.1) for
  // a spectrum of A' inside [mu_min, mu_max]: theta = (mu_max + mu_min)/2,
  // delta = (mu_max - mu_min)/2, sigma = theta/delta, rho_0 = 1/sigma,
  // rho_k = 1/(2 sigma - rho_{k-1}); alpha_0 = 1/theta, beta_0 = 0,
  // alpha_k = 2 rho_k / delta, beta_k = rho_k rho_{k-1}. The residual
  // polynomial after K steps is T_K((theta - mu)/delta) / T_K(sigma).
  static ChebyshevSolver classical(long steps, double mu_min, double mu_max, double regularizer = 1e-3) {
    const char* where = "ChebyshevSolver::classical";
    detail::check_positive_size(where, "steps", steps);
    detail::check_positive_finite(where, "mu_min", mu_min);
    if (!(std::isfinite(mu_max) && mu_max > mu_min)) {
      detail::fail(where, "mu_max must be finite and > mu_min = ", mu_min, ", got ", mu_max);
    }
    const double theta = 0.5 * (mu_max + mu_min), delta = 0.5 * (mu_max - mu_min), sigma = theta / delta;
    ChebyshevSolver s;
    s.regularizer = regularizer;
    double rho_prev = 1.0 / sigma;
    s.alpha.push_back(1.0 / theta);
    s.beta.push_back(0.0);
    for (long k = 1; k < steps; ++k) {
      const double rho = 1.0 / (2.0 * sigma - rho_prev);
      s.alpha.push_back(2.0 * rho / delta);
      s.beta.push_back(rho * rho_prev);
      rho_prev = rho;
    }
    return s;
  }

  std::string name() const { return label.empty() ? "chebyshev-iteration-" + std::to_string(alpha.size()) : label; }

  void validate(const char* where) const {
    detail::check_positive_size(where, "alpha.size()", static_cast<long>(alpha.size()));
    detail::check_size(where, "beta.size()", static_cast<long>(beta.size()),
                                static_cast<long>(alpha.size()), "alpha.size()");
    for (std::size_t k = 0; k < alpha.size(); ++k) {
      if (!std::isfinite(alpha[k]) || !std::isfinite(beta[k])) {
        detail::fail(where, "coefficients must be finite, got alpha[", k, "] = ", alpha[k], ", beta[", k,
                              "] = ", beta[k]);
      }
    }
    detail::check_positive_finite(where, "regularizer", regularizer);
  }

  // Runs the recursion for one system: returns h_K ~ A^{-1} b. A is (d, d) SPD.
  Eigen::VectorXd solve(const Eigen::MatrixXd& A, const Eigen::VectorXd& b) const {
    double c = 1.0;
    switch (scaling) {
      case SystemScaling::frobenius: c = A.norm(); break;
      case SystemScaling::spectral: c = Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd>(A, Eigen::EigenvaluesOnly)
                                            .eigenvalues().maxCoeff(); break;
      case SystemScaling::trace: c = A.trace(); break;
    }
    const Eigen::MatrixXd As = A / c;
    const Eigen::VectorXd bs = b / c;
    Eigen::VectorXd h = start == StartPoint::zero ? Eigen::VectorXd::Zero(b.size()) : bs;
    Eigen::VectorXd h_prev = h, h_next(b.size()), g(b.size());
    for (std::size_t k = 0; k < alpha.size(); ++k) {
      switch (momentum) {
        case Momentum::heavy_ball: h_next = h + alpha[k] * (bs - As * h) + beta[k] * (h - h_prev); break;
        case Momentum::nesterov:
          g = h + beta[k] * (h - h_prev);
          h_next = g + alpha[k] * (bs - As * g);
          break;
        case Momentum::none: h_next = h + alpha[k] * (bs - As * h); break;
      }
      h_prev.swap(h);
      h.swap(h_next);
    }
    return h;
  }

  template <class T>
  RowMatrix<T> predict(ConstMatrixRef<T> x, ConstMatrixRef<T> y, long seq_len, int num_threads = 0) const {
    const char* where = "ChebyshevSolver::predict";
    validate(where);
    const ChebyshevSolver& self = *this;
    return detail::for_each_sequence<T>(where, x, y, seq_len, num_threads,
                                        [&self](const RowMatrix<double>& X, const RowMatrix<double>& Y,
                                                RowMatrix<double>& P) {
      const long dx = X.cols();
      Eigen::MatrixXd A = Eigen::MatrixXd::Identity(dx, dx) * self.regularizer;
      Eigen::MatrixXd G = Eigen::MatrixXd::Zero(Y.cols(), dx);
      for (long t = 0; t < X.rows(); ++t) {
        if (t > 0) P.row(t) = (G * self.solve(A, X.row(t).transpose())).transpose();
        A.noalias() += X.row(t).transpose() * X.row(t);
        G.noalias() += Y.row(t).transpose() * X.row(t);
      }
    });
  }
};

}  // namespace mesaopt::learners
