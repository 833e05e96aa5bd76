#pragma once
// Plain references for the mesa op (ops/mesa.hpp), for tests and benchmarks:
//
//  * reference::mesa_forward_direct: the ridge solution solved from scratch at
//    every position (M5-M6, M15), in double, O(seq_len d^3): the independent
//    closed form.
//  * reference::mesa_forward: the Sherman-Morrison recursion (M7-M9, M15)
//    written as straightforward Eigen expressions, no mesaopt kernels: what the
//    fast path is measured against in benchmarks/bench_mesa.cpp.
//  * reference::mesa_backward: every R_t, S_t, a_t stored (O(seq_len d^2)
//    memory, no checkpoints, no fused kernels), the reverse sweep of M10-M11
//    and M16-M17 as plain matrix expressions, and dL/dgamma from the total
//    adjoints directly (sum_t <G_t, S_{t-1}> - 1/2 <M_t, R_{t-1}^{-1}>, with
//    explicit inverses) rather than the fast path's c_t form (M18).
//
// All three take opt.regularizer (mesa_forward_direct: a `regularizer`
// argument): with MesaRegularizer::constant (M20) the direct solve adds the
// non-decaying ridge in closed form, the recursion forms P_t = gamma P_{t-1} +
// k k^T + (1 - gamma)/lambda I and inverts it explicitly at every token, and
// the backward takes dL/dlambda and dL/dgamma from the total adjoints of every
// P_t (sum_t <-M_t/2, dP_t>) instead of the fast path's traces (M21-M22).
// Every entry point validates its arguments like the fast op (shapes, lambda
// and gamma finite, positive and normal, initial state shapes) and throws
// std::invalid_argument naming the argument.
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/ops/checks.hpp>
#include <mesaopt/ops/mesa.hpp>

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <Eigen/LU>

#include <vector>

namespace mesaopt::reference {

// o_t = S_t H_t^{-1} q_t with, at every t (1-based),
//   H_t = sum_{i<=t} gamma^{t-i} k_i k_i^T + gamma^t H_0  [+ (1 - gamma^t)/lambda I with MesaRegularizer::constant],
//   S_t = gamma^t S_0 + sum_{i<=t} gamma^{t-i} v_i k_i^T,
// H_0 = I / lambda and S_0 = 0, or H_0 = initial->R^{-1} and S_0 = initial->S;
// H_t factorised afresh (LDL^T) at every t. q, k : (seq_len, d); v : (seq_len, dv); returns (seq_len, dv).
// The data sums are accumulated by their definition (weights gamma per step) and the
// ridge is added in closed form; nothing is inverted incrementally.
inline RowMatrix<double> mesa_forward_direct(const RowMatrix<double>& q, const RowMatrix<double>& k,
                                             const RowMatrix<double>& v, double lambda, double gamma = 1.0,
                                             const MesaState<double>* initial = nullptr,
                                             MesaRegularizer regularizer = MesaRegularizer::decaying) {
  const char* where = "reference::mesa_forward_direct";
  detail::check_sequence_inputs<double>(where, q, k, v);
  detail::check_mesa_lambda(where, "lambda", lambda);
  detail::check_mesa_forget(where, "gamma", gamma);
  detail::check_mesa_regularizer(where, "regularizer", regularizer);
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  if (initial != nullptr) detail::check_mesa_state(where, "initial", *initial, d, dv);
  using Mat = Eigen::MatrixXd;
  const Mat H0 = initial != nullptr ? Mat(Mat(initial->R).inverse()) : Mat(Mat::Identity(d, d) / lambda);
  Mat D = Mat::Zero(d, d);  // sum_{i<=t} gamma^{t-i} k_i k_i^T
  Mat S = initial != nullptr ? Mat(initial->S) : Mat(Mat::Zero(dv, d));
  double gamma_t = 1.0;  // gamma^t
  RowMatrix<double> out(n, dv);
  for (long t = 0; t < n; ++t) {
    const Eigen::VectorXd kt = k.row(t).transpose();
    D = gamma * D + kt * kt.transpose();
    S = gamma * S + v.row(t).transpose() * kt.transpose();
    gamma_t *= gamma;
    Mat H = D + gamma_t * H0;
    if (regularizer == MesaRegularizer::constant) H += ((1.0 - gamma_t) / lambda) * Mat::Identity(d, d);
    const Eigen::VectorXd x = H.ldlt().solve(Eigen::VectorXd(q.row(t).transpose()));
    out.row(t) = (S * x).transpose();
  }
  return out;
}

// The recursion M7-M9 with forgetting, literally:
//   u = R k;  R = (R - u u^T / (gamma + k.u)) / gamma;  S = gamma S + v k^T;  a = R q;  o = S a,
// from R = lambda I, S = 0 or from *initial; the final state goes to *final.
// (The literal rank-1 update; R is not kept bitwise symmetric: docs/math.md §3.)
// With MesaRegularizer::constant (M20): P = R^{-1};  P = gamma P + k k^T + (1 - gamma)/lambda I;
// R = P^{-1} (explicit inverse);  a = R q;  o = S a.
template <class T>
void mesa_forward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v, const MesaOptions<T>& opt,
                  MatrixRef<T> out, const MesaState<identity_t<T>>* initial = nullptr, MesaState<identity_t<T>>* final = nullptr) {
  const char* where = "reference::mesa_forward";
  detail::check_mesa_args<T>(where, q, k, v, opt);
  detail::check_output<T>(where, "out", out, q.rows(), v.cols());
  detail::check_output_distinct<T>(where, out, q, k, v);
  using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  using Vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  if (initial != nullptr) detail::check_mesa_state(where, "initial", *initial, d, dv);
  const T gamma = opt.forget;
  Mat R = initial != nullptr ? Mat(initial->R) : Mat(opt.lambda * Mat::Identity(d, d));
  Mat S = initial != nullptr ? Mat(initial->S) : Mat(Mat::Zero(dv, d));
  Vec u(d), a(d);
  if (opt.regularizer == MesaRegularizer::constant) {
    Mat P = R.inverse();
    for (long t = 0; t < n; ++t) {
      const Vec kt = k.row(t).transpose();
      P = gamma * P + kt * kt.transpose() + ((T(1) - gamma) / opt.lambda) * Mat::Identity(d, d);
      R = P.inverse();
      S = gamma * S + v.row(t).transpose() * k.row(t);
      a.noalias() = R * q.row(t).transpose();
      out.row(t).noalias() = (S * a).transpose();
    }
  } else {
    for (long t = 0; t < n; ++t) {
      const auto kt = k.row(t).transpose();
      u.noalias() = R * kt;
      const T den = gamma + kt.dot(u);
      R.noalias() -= (u / den) * u.transpose();
      if (gamma != T(1)) R /= gamma;
      if (gamma != T(1)) S *= gamma;
      S.noalias() += v.row(t).transpose() * k.row(t);
      a.noalias() = R * q.row(t).transpose();
      out.row(t).noalias() = (S * a).transpose();
    }
  }
  if (final != nullptr) {
    final->R = R;
    final->S = S;
  }
}

// The gradients of mesa_forward: writes dq, dk (seq_len, d), grad_v (seq_len, dv),
// *dforget = dL/dgamma if given, *grad_initial = dL/d(R_0, S_0) if given;
// grad_final = dL/d(R_T, S_T) or null; returns dL/dlambda (0 with an initial state).
template <class T>
T mesa_backward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v, const MesaOptions<T>& opt,
                ConstMatrixRef<T> dout, MatrixRef<T> dq, MatrixRef<T> dk, MatrixRef<T> grad_v, identity_t<T>* dforget = nullptr,
                const MesaState<identity_t<T>>* initial = nullptr, const MesaState<identity_t<T>>* grad_final = nullptr,
                MesaState<identity_t<T>>* grad_initial = nullptr) {
  const char* where = "reference::mesa_backward";
  detail::check_mesa_args<T>(where, q, k, v, opt);
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  detail::check_gradient_shapes<T>(where, n, d, dv, dout, dq, dk, grad_v);
  detail::check_gradients_distinct<T>(where, q, k, v, dout, dq, dk, grad_v);
  if (initial != nullptr) detail::check_mesa_state(where, "initial", *initial, d, dv);
  if (grad_final != nullptr) detail::check_mesa_state(where, "grad_final", *grad_final, d, dv);
  using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  using Vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  const T gamma = opt.forget;
  const bool constant = opt.regularizer == MesaRegularizer::constant;
  const Mat I = Mat::Identity(d, d);
  // Forward, keeping R_t and S_t for t = 0 .. n (index t = after t tokens) and a_t.
  std::vector<Mat> R(std::size_t(n + 1)), S(std::size_t(n + 1));
  std::vector<Vec> a(static_cast<std::size_t>(n));
  R[0] = initial != nullptr ? Mat(initial->R) : Mat(opt.lambda * I);
  S[0] = initial != nullptr ? Mat(initial->S) : Mat(Mat::Zero(dv, d));
  for (long t = 0; t < n; ++t) {
    const Vec kt = k.row(t).transpose();
    if (constant) {  // (M20) P_t = gamma P_{t-1} + k k^T + (1 - gamma)/lambda I, inverted explicitly
      const Mat P = gamma * Mat(R[std::size_t(t)].inverse()) + kt * kt.transpose() + ((T(1) - gamma) / opt.lambda) * I;
      R[std::size_t(t + 1)] = P.inverse();
    } else {
      const Vec u = R[std::size_t(t)] * kt;
      R[std::size_t(t + 1)] = (R[std::size_t(t)] - u * u.transpose() / (gamma + kt.dot(u))) / gamma;
    }
    S[std::size_t(t + 1)] = gamma * S[std::size_t(t)] + v.row(t).transpose() * k.row(t);
    a[std::size_t(t)] = R[std::size_t(t + 1)] * q.row(t).transpose();
  }
  // Total adjoints: G_t of S_t and M_t = -2 x (adjoint of R_t^{-1}), from the final state's (M16).
  Mat G = Mat::Zero(dv, d), M = Mat::Zero(d, d);
  if (grad_final != nullptr) {
    const Mat& RT = R[std::size_t(n)];
    G = grad_final->S / gamma;
    M = T(2) * RT * (Mat(grad_final->R) + Mat(grad_final->R).transpose()) / T(2) * RT / gamma;
  }
  double dgamma = 0;
  double tr_M_sum = 0;  // constant mode: sum_t tr(M_t), the adjoint of the per-token ridge
  for (long t = n - 1; t >= 0; --t) {
    const std::size_t i = std::size_t(t);
    const Vec g = dout.row(t).transpose();
    const Vec da = S[i + 1].transpose() * g;     // forward o = S a
    const Vec dqt = R[i + 1] * da;               // forward a = R q
    G = g * a[i].transpose() + gamma * G;        // (M11)
    M = dqt * a[i].transpose() + a[i] * dqt.transpose() + gamma * M;
    dq.row(t) = dqt.transpose();
    grad_v.row(t) = (G * k.row(t).transpose()).transpose();
    dk.row(t) = (G.transpose() * v.row(t).transpose() - M * k.row(t).transpose()).transpose();
    // forward: R_t^{-1} = gamma R_{t-1}^{-1} + k k^T [+ (1 - gamma)/lambda I],  S_t = gamma S_{t-1} + v k^T,
    // so d(R_t^{-1})/dgamma = R_{t-1}^{-1} [- I/lambda] and dS_t/dgamma = S_{t-1}, against the total
    // adjoints G_t and -M_t/2.
    Mat dP_dgamma = R[i].inverse();
    if (constant) dP_dgamma -= I / opt.lambda;
    dgamma += double((G.cwiseProduct(S[i])).sum()) - 0.5 * double((M.cwiseProduct(dP_dgamma)).sum());
    tr_M_sum += double(M.trace());
  }
  if (dforget != nullptr) *dforget = static_cast<T>(dgamma);
  // (M17) dL/dS_0 = gamma G_1,  dL/dR_0 = gamma/2 R_0^{-1} M_1 R_0^{-1}
  const Mat P0 = R[0].inverse();
  const Mat dR0 = (gamma / T(2)) * P0 * M * P0;
  if (grad_initial != nullptr) {
    grad_initial->S = gamma * G;
    grad_initial->R = dR0;
  }
  // dL/dlambda: through R_0 = lambda I (empty state: tr(dL/dR_0)) and, in the constant
  // mode, through every token's ridge (1 - gamma)/lambda I: <-M_t/2, -(1 - gamma)/lambda^2 I>.
  double dlambda = initial != nullptr ? 0.0 : double(dR0.trace());
  if (constant) dlambda += (1.0 - double(gamma)) / (2.0 * double(opt.lambda) * double(opt.lambda)) * tr_M_sum;
  return static_cast<T>(dlambda);
}

}  // namespace mesaopt::reference
