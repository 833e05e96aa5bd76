#pragma once
// The chunkwise form of the gated mesa op's cg solver (MesaNet, arXiv
// 2506.05233, appendix; flash-linear-attention fla/ops/mesa_net), one chunk
// of C tokens at a time: docs/gated_mesa_chunkwise_cg.md, M49-M53. It computes
// what the recurrent cg path of ops/gated_mesa.hpp computes (M29, M32-M36),
// but the C solves of a chunk run their CG iterations together, so every step
// is a few GEMMs on C x d and C x C blocks instead of C matrix-vector products
// with d x d matrices that the recursion must first build token by token.
//
//   gated_cg_chunk_forward : (q, k, v, beta, gamma) of one chunk, state (S, H) before it
//                            -> out, and (S, H) after it                         (M49-M51)
//   gated_cg_chunk_backward: the same inputs, the state before the chunk, dout and the
//                            adjoints of the state after it -> every input's gradient and
//                            the adjoints of the state before it                  (M52-M53)
//
// H must be symmetric (the op's states are). The forward can hand out the
// chunk's solutions X (row t = x_t = A_t^{-1} q_t, M50): a caller that keeps
// them (the op does, in its cache) runs the backward with one CG solve instead
// of two, as MesaNet's kernels keep q* = X (gated_cg_chunk_backward_solve_u).
// gated_cg_chunk_backward recomputes X, so a caller of it keeps only the
// chunk-start states.
//
// Both are also split into parts (gated_cg_chunk_output / _state and
// gated_cg_chunk_solutions, gated_cg_chunk_backward_solve_u / _state / _grads) for the op's
// intra-sequence parallelism (opt.threads): the state recurrence between chunks
// is a few GEMMs and runs chunk after chunk; the CG solves of different chunks
// depend only on their own chunk's start state (and, backward, dout) and run
// in parallel. The parts evaluate the same expressions as the whole functions.
#include <mesaopt/common/matrix.hpp>

#include <Eigen/Core>

#include <cmath>
#include <cstddef>
#include <vector>

namespace mesaopt::detail {

namespace gated_cg_chunk_impl {

// The decay ratios D_ts = prod_{j in (s, t]} gamma_j (lower triangle, D_tt = 1),
// c_t = prod_{j <= t} gamma_j and W = D diag(beta) (M49). D is built as products
// row by row, never as c_t / c_s: a ratio of two underflowing cumulative gates
// would be 0/0, while the product of the gates in between is what the
// recursion multiplies by.
template <class T>
void decays(const ConstVectorRef<T>& beta, const ConstVectorRef<T>& gamma, RowMatrix<T>& D, Vector<T>& c,
            RowMatrix<T>& W) {
  const long C = gamma.size();
  D.setZero(C, C);
  c.resize(C);
  for (long t = 0; t < C; ++t) {
    if (t > 0) D.row(t).head(t) = gamma[t] * D.row(t - 1).head(t);
    D(t, t) = T(1);
    c[t] = t > 0 ? c[t - 1] * gamma[t] : gamma[0];
  }
  W = D * beta.asDiagonal();
}

// AP (row t) = p_t^T A_t for every token at once, A_t = c_t H0 + sum_{s<=t} W_ts k_s k_s^T + Lambda (M50).
// Row t of the result depends on row t of P only, so tokens whose CG has stopped do not disturb the others.
// W is lower triangular, so of P K^T only the lower triangle is needed: from kSplitRows rows on, the top
// half of the rows is multiplied with the first half of the keys only (3/4 of the C x C x d work, twice
// per step; at d = C = 64 a sixth of the step's flops).
constexpr long kSplitRows = 32;
template <class T>
void apply(const RowMatrix<T>& P, const ConstMatrixRef<T>& k, const RowMatrix<T>& W, const Vector<T>& c,
           const RowMatrix<T>& H0, bool h0_zero, const ConstVectorRef<T>& lam, RowMatrix<T>& PK, RowMatrix<T>& PH,
           RowMatrix<T>& AP) {
  const long C = P.rows();
  if (C < kSplitRows) {
    PK.noalias() = P * k.transpose();
    PK.array() *= W.array();
    AP.noalias() = PK * k;
  } else {
    const long h = C / 2, m = C - h;
    PK.resize(C, C);
    PK.topLeftCorner(h, h).noalias() = P.topRows(h) * k.topRows(h).transpose();
    PK.topRightCorner(h, m).setZero();
    PK.bottomRows(m).noalias() = P.bottomRows(m) * k.transpose();
    PK.array() *= W.array();
    AP.topRows(h).noalias() = PK.topLeftCorner(h, h) * k.topRows(h);
    AP.bottomRows(m).noalias() = PK.bottomRows(m) * k;
  }
  if (!h0_zero) {
    PH.noalias() = P * H0;  // H0 symmetric: row t is (H0 p_t)^T
    AP.noalias() += c.asDiagonal() * PH;
  }
  AP.noalias() += P * lam.asDiagonal();
}

// Row t of X = A_t^{-1} (row t of B) by gated_cg_solve's iteration, all rows in
// lockstep; each row stops by gated_cg_solve's own rule (residual norm <= tol > 0
// or exactly 0, or p.Ap <= 0), so a row takes the same steps as the recursion's
// solve for that token would.
template <class T>
void solve(const RowMatrix<T>& B, const ConstMatrixRef<T>& k, const RowMatrix<T>& W, const Vector<T>& c,
           const RowMatrix<T>& H0, bool h0_zero, const ConstVectorRef<T>& lam, int steps, T tol, RowMatrix<T>& X) {
  const long C = B.rows(), d = B.cols();
  X.setZero(C, d);
  RowMatrix<T> R = B, P = B, AP(C, d), PK(C, C), PH(C, d);
  Vector<T> rr = R.rowwise().squaredNorm();
  std::vector<char> active(static_cast<std::size_t>(C), 1);
  for (int s = 0; s < steps; ++s) {
    long n_active = 0;
    for (long t = 0; t < C; ++t) {
      char& a = active[static_cast<std::size_t>(t)];
      if (a && (rr[t] == T(0) || (tol > T(0) && std::sqrt(rr[t]) <= tol))) a = 0;
      n_active += a;
    }
    if (n_active == 0) break;
    apply<T>(P, k, W, c, H0, h0_zero, lam, PK, PH, AP);
    for (long t = 0; t < C; ++t) {
      char& a = active[static_cast<std::size_t>(t)];
      if (!a) continue;
      const T pAp = P.row(t).dot(AP.row(t));
      if (!(pAp > T(0))) {
        a = 0;
        continue;
      }
      const T alpha = rr[t] / pAp;
      X.row(t) += alpha * P.row(t);
      R.row(t) -= alpha * AP.row(t);
      const T rr_new = R.row(t).squaredNorm();
      P.row(t) = R.row(t) + (rr_new / rr[t]) * P.row(t);
      rr[t] = rr_new;
    }
  }
}

}  // namespace gated_cg_chunk_impl

// Every token's solution of one chunk of C = q.rows() tokens from the state H
// before it (M50): X (C x d), row t = x_t = A_t^{-1} q_t, the C CG solves in
// lockstep. What the forward's outputs and the backward need of the forward.
template <class T>
void gated_cg_chunk_solutions(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstVectorRef<T>& beta,
                              const ConstVectorRef<T>& gamma, const ConstVectorRef<T>& lambda_diag, int cg_steps,
                              T cg_tolerance, const RowMatrix<T>& H, RowMatrix<T>& X) {
  namespace impl = gated_cg_chunk_impl;
  if (q.rows() == 0) return;
  RowMatrix<T> D, W;
  Vector<T> c;
  impl::decays<T>(beta, gamma, D, c, W);
  const bool h0_zero = (H.array() == T(0)).all();  // the empty state: skip the C x d x d products
  impl::solve<T>(RowMatrix<T>(q), k, W, c, H, h0_zero, lambda_diag, cg_steps, cg_tolerance, X);
}

// The outputs of one chunk of C = q.rows() tokens from the state (S, H) before
// it (M50-M51); S and H are only read. With gated_cg_chunk_state this is
// gated_cg_chunk_forward split in two: the outputs of a chunk depend only on
// its own tokens and its start state, so once the start states are known
// (gated_cg_chunk_state, cheap) the chunks' outputs (the CG solves, nearly all
// the work) can run in parallel (opt.threads, docs/gated_mesa.md). solutions,
// if not null, receives X (C x d, row t = x_t = A_t^{-1} q_t).
template <class T>
void gated_cg_chunk_output(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                           const ConstVectorRef<T>& beta, const ConstVectorRef<T>& gamma,
                           const ConstVectorRef<T>& lambda_diag, int cg_steps, T cg_tolerance, const RowMatrix<T>& S,
                           const RowMatrix<T>& H, MatrixRef<T> out, RowMatrix<T>* solutions = nullptr) {
  namespace impl = gated_cg_chunk_impl;
  const long C = q.rows();
  if (C == 0) return;
  RowMatrix<T> D, W, Xlocal;
  RowMatrix<T>& X = solutions != nullptr ? *solutions : Xlocal;
  gated_cg_chunk_solutions<T>(q, k, beta, gamma, lambda_diag, cg_steps, cg_tolerance, H, X);  // M50
  Vector<T> c;
  impl::decays<T>(beta, gamma, D, c, W);
  // (M51) o_t = c_t S0 x_t + sum_{s<=t} W_ts (k_s.x_t) v_s, as GEMMs; S_t itself is never formed.
  RowMatrix<T> XK = X * k.transpose();
  XK.array() *= W.array();
  out.noalias() = XK * v;
  out.noalias() += c.asDiagonal() * (X * S.transpose());
}

// Replaces (S, H) by the state after the chunk of C = k.rows() tokens (M49):
// S_C = c_C S_0 + V^T diag(w) K, H_C = c_C H_0 + K^T diag(w) K (w = last row
// of W). Two GEMMs of C x d x (d + dv); no solve.
template <class T>
void gated_cg_chunk_state(const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v, const ConstVectorRef<T>& beta,
                          const ConstVectorRef<T>& gamma, RowMatrix<T>& S, RowMatrix<T>& H) {
  namespace impl = gated_cg_chunk_impl;
  const long C = k.rows();
  if (C == 0) return;
  RowMatrix<T> D, W;
  Vector<T> c;
  impl::decays<T>(beta, gamma, D, c, W);
  // (M49) The state after the chunk: the last row of W holds its weights.
  const T cC = c[C - 1];
  const Vector<T> w = W.row(C - 1).transpose();
  const RowMatrix<T> wk = w.asDiagonal() * k;
  S *= cC;
  S.noalias() += v.transpose() * wk;
  RowMatrix<T> Hn = cC * H;
  Hn.noalias() += k.transpose() * wk;
  // GEMM rounding is not symmetric; the recursion keeps H bitwise symmetric and so does this.
  H = (Hn + Hn.transpose()) / T(2);
}

// One chunk of C = q.rows() tokens from state (S, H): writes out (C x dv) and
// replaces S, H by the state after the chunk (M49-M51). solutions: as in
// gated_cg_chunk_output.
template <class T>
void gated_cg_chunk_forward(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                            const ConstVectorRef<T>& beta, const ConstVectorRef<T>& gamma,
                            const ConstVectorRef<T>& lambda_diag, int cg_steps, T cg_tolerance, RowMatrix<T>& S,
                            RowMatrix<T>& H, MatrixRef<T> out, RowMatrix<T>* solutions = nullptr) {
  gated_cg_chunk_output<T>(q, k, v, beta, gamma, lambda_diag, cg_steps, cg_tolerance, S, H, out, solutions);
  gated_cg_chunk_state<T>(k, v, beta, gamma, S, H);
}

// The chunk backward (M52-M53) in three parts, so that a sequence's chunks can
// share the work over threads (gated_mesa_backward with opt.threads > 1):
//
//   gated_cg_chunk_backward_solve_u: the CG solve for U, nearly all the work
//     given the forward's X (gated_cg_chunk_solutions recomputes X); it needs
//     only the chunk's inputs, its start state and dout, not the adjoints of
//     the later chunks, so the chunks' solves can run in parallel;
//   gated_cg_chunk_backward_state: the adjoints of the state before the chunk
//     from those after it (and dlambda's share), a few GEMMs: the sequential
//     part, chunk after chunk from the last one;
//   gated_cg_chunk_backward_grads: every input's gradient, given the adjoints
//     of the state after the chunk; the chunks again in parallel.
//
// gated_cg_chunk_backward_given_solutions is the three in a row, and
// gated_cg_chunk_backward recomputes X first. Each part evaluates the same
// expressions the one-piece backward did, so a split run gives the same bits.

// U (row t = u_t = A_t^{-1} S_t^T g_t, M52) by the forward's CG. It needs the
// chunk's keys, values, gates, start state and dout, not X: a caller that kept
// the forward's X runs only this solve.
template <class T>
void gated_cg_chunk_backward_solve_u(const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                                     const ConstVectorRef<T>& beta, const ConstVectorRef<T>& gamma,
                                     const ConstVectorRef<T>& lambda_diag, int cg_steps, T cg_tolerance,
                                     const RowMatrix<T>& S0, const RowMatrix<T>& H0, const ConstMatrixRef<T>& dout,
                                     RowMatrix<T>& U) {
  namespace impl = gated_cg_chunk_impl;
  const long C = k.rows();
  if (C == 0) return;
  RowMatrix<T> D, W;
  Vector<T> c;
  impl::decays<T>(beta, gamma, D, c, W);
  const bool h0_zero = (H0.array() == T(0)).all();
  // (M52) dx_t = S_t^T g_t for all t without forming S_t, then u_t = A_t^{-1} dx_t by the same CG.
  const RowMatrix<T> GS0 = dout * S0;             // row t: g_t^T S0
  const RowMatrix<T> GV = dout * v.transpose();   // (g_t . v_s)
  RowMatrix<T> DX = (W.array() * GV.array()).matrix() * k;
  DX.noalias() += c.asDiagonal() * GS0;
  impl::solve<T>(DX, k, W, c, H0, h0_zero, lambda_diag, cg_steps, cg_tolerance, U);
}

// dS, dH: on entry the adjoints of the state after the chunk, on return those
// of the state before it (M53; dH symmetric). ADDS the chunk's share to dlambda
// (M52). X: the forward's solutions (or gated_cg_chunk_solutions'), U:
// gated_cg_chunk_backward_solve_u's.
template <class T>
void gated_cg_chunk_backward_state(const ConstVectorRef<T>& beta, const ConstVectorRef<T>& gamma,
                                   const ConstMatrixRef<T>& dout, const ConstMatrixRef<T>& X, const RowMatrix<T>& U,
                                   RowMatrix<T>& dS, RowMatrix<T>& dH, VectorRef<T> dlambda) {
  namespace impl = gated_cg_chunk_impl;
  const long C = gamma.size();
  if (C == 0) return;
  RowMatrix<T> D, W;
  Vector<T> c;
  impl::decays<T>(beta, gamma, D, c, W);
  // (M52, as M35) Lambda enters every A_t directly, not through the decayed sums.
  dlambda -= (U.array() * X.array()).colwise().sum().matrix().transpose();

  // (M53) The adjoints of the state before the chunk.
  const T cC = c[C - 1];
  const RowMatrix<T> cX = c.asDiagonal() * X;
  RowMatrix<T> dS0 = cC * dS;
  dS0.noalias() += dout.transpose() * cX;
  RowMatrix<T> UX = U.transpose() * cX;                            // sum_t c_t u_t x_t^T
  RowMatrix<T> dH0 = (cC / T(2)) * (dH + dH.transpose());
  dH0 -= (UX + UX.transpose()) / T(2);
  dS.swap(dS0);
  dH.swap(dH0);
}

// Writes (overwrites) dq, dk, dv, dbeta, dgamma, given the adjoints dS, dH of
// the state after the chunk (zero if none; only read) and X, U as for
// gated_cg_chunk_backward_state.
template <class T>
void gated_cg_chunk_backward_grads(const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                                   const ConstVectorRef<T>& beta, const ConstVectorRef<T>& gamma,
                                   const RowMatrix<T>& S0, const RowMatrix<T>& H0, const ConstMatrixRef<T>& dout,
                                   const ConstMatrixRef<T>& X, const RowMatrix<T>& U, const RowMatrix<T>& dS,
                                   const RowMatrix<T>& dH, MatrixRef<T> dq, MatrixRef<T> dk, MatrixRef<T> dv,
                                   VectorRef<T> dbeta, VectorRef<T> dgamma) {
  namespace impl = gated_cg_chunk_impl;
  const long C = k.rows();
  if (C == 0) return;
  RowMatrix<T> D, W;
  Vector<T> c;
  impl::decays<T>(beta, gamma, D, c, W);
  const bool h0_zero = (H0.array() == T(0)).all();
  const RowMatrix<T> GS0 = dout * S0;             // row t: g_t^T S0 (as in the solves)
  RowMatrix<T> GV = dout * v.transpose();         // (g_t . v_s)
  dq = U;

  // (M52) The pair products of the adjoints: the gradient of the chunk's loss
  // with respect to W_ts is XK_ts (GV_ts - UK_ts), s <= t.
  const RowMatrix<T> XK = X * k.transpose();
  const RowMatrix<T> UK = U * k.transpose();
  GV -= UK;                                       // GV - UK
  const RowMatrix<T> P1 = (W.array() * XK.array()).matrix();
  const RowMatrix<T> P2 = (W.array() * GV.array()).matrix();
  dv.noalias() = P1.transpose() * dout;
  dk.noalias() = P2.transpose() * X;
  dk.noalias() -= P1.transpose() * U;
  // The state after the chunk: S_C, H_C carry the weights W_{C,s} (the last row).
  const Vector<T> w = W.row(C - 1).transpose();
  const RowMatrix<T> KdS = k * dS.transpose();                     // row s: (dS k_s)^T
  const RowMatrix<T> VdS = v * dS;                                 // row s: (dS^T v_s)^T
  const RowMatrix<T> KdH = k * (dH + dH.transpose());              // row s: ((dH + dH^T) k_s)^T
  dv.noalias() += w.asDiagonal() * KdS;
  dk.noalias() += w.asDiagonal() * (VdS + KdH);

  // dL/dW (lower triangle), then beta and the decays (M53).
  RowMatrix<T> dW = RowMatrix<T>::Zero(C, C);
  dW.template triangularView<Eigen::Lower>() = (XK.array() * GV.array()).matrix();
  dW.row(C - 1) += ((VdS.array() * k.array()).rowwise().sum() +
                    (KdH.array() * k.array()).rowwise().sum() / T(2)).matrix().transpose();
  dbeta = (D.array() * dW.array()).colwise().sum().transpose();
  const RowMatrix<T> dD = dW * beta.asDiagonal();
  // dL/dc_t: c_t scales S0 in S_t and H0 in A_t; c_C also scales them in the final state.
  Vector<T> dc = (GS0.array() * X.array()).rowwise().sum();
  if (!h0_zero) dc -= ((U * H0).array() * X.array()).rowwise().sum().matrix();
  dc[C - 1] += (dS.array() * S0.array()).sum() + (dH.array() * H0.array()).sum();
  // (M53) dgamma_j = sum_{t>=j} D_tj [ sum_{s<j} dD_ts D_{j-1,s} + dc_t c_{j-1} ] (0-based, c_{-1} = 1):
  // the derivative of each product without gamma_j, so one C x C x C GEMM and no division by a gate.
  RowMatrix<T> Dprev = RowMatrix<T>::Zero(C, C);
  Vector<T> cprev(C);
  cprev[0] = T(1);
  if (C > 1) {
    Dprev.bottomRows(C - 1) = D.topRows(C - 1);
    cprev.tail(C - 1) = c.head(C - 1);
  }
  RowMatrix<T> Rg = dD * Dprev.transpose();
  Rg.noalias() += dc * cprev.transpose();
  dgamma = (D.array() * Rg.array()).colwise().sum().transpose();
}

// gated_cg_chunk_backward given the forward's solutions X (C x d, row t =
// x_t = A_t^{-1} q_t, e.g. from gated_cg_chunk_output's `solutions`): one CG
// solve (U) instead of two. Arguments otherwise as gated_cg_chunk_backward.
template <class T>
void gated_cg_chunk_backward_given_solutions(const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                                             const ConstVectorRef<T>& beta, const ConstVectorRef<T>& gamma,
                                             const ConstVectorRef<T>& lambda_diag, int cg_steps, T cg_tolerance,
                                             const RowMatrix<T>& S0, const RowMatrix<T>& H0,
                                             const ConstMatrixRef<T>& dout, const ConstMatrixRef<T>& X,
                                             RowMatrix<T>& dS, RowMatrix<T>& dH, MatrixRef<T> dq, MatrixRef<T> dk,
                                             MatrixRef<T> dv, VectorRef<T> dbeta, VectorRef<T> dgamma,
                                             VectorRef<T> dlambda) {
  if (k.rows() == 0) return;
  RowMatrix<T> U;
  gated_cg_chunk_backward_solve_u<T>(k, v, beta, gamma, lambda_diag, cg_steps, cg_tolerance, S0, H0, dout, U);
  gated_cg_chunk_backward_grads<T>(k, v, beta, gamma, S0, H0, dout, X, U, dS, dH, dq, dk, dv, dbeta, dgamma);
  gated_cg_chunk_backward_state<T>(beta, gamma, dout, X, U, dS, dH, dlambda);
}

// Backward of one chunk (M52-M53). S0, H0: the state before the chunk. dS, dH:
// on entry the adjoints of the state after the chunk (zero if none), on return
// the adjoints of S0, H0 (dH symmetric, as the recursion's grad_initial->H).
// Writes (overwrites) dq, dk, dv, dbeta, dgamma; ADDS to dlambda (d entries).
// The solve is differentiated as an exact linear solve (as the recursion and
// MesaNet do): the gradient of the computed output when the CG has converged.
template <class T>
void gated_cg_chunk_backward(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                             const ConstVectorRef<T>& beta, const ConstVectorRef<T>& gamma,
                             const ConstVectorRef<T>& lambda_diag, int cg_steps, T cg_tolerance,
                             const RowMatrix<T>& S0, const RowMatrix<T>& H0, const ConstMatrixRef<T>& dout,
                             RowMatrix<T>& dS, RowMatrix<T>& dH, MatrixRef<T> dq, MatrixRef<T> dk, MatrixRef<T> dv,
                             VectorRef<T> dbeta, VectorRef<T> dgamma, VectorRef<T> dlambda) {
  if (q.rows() == 0) return;
  RowMatrix<T> X;
  gated_cg_chunk_solutions<T>(q, k, beta, gamma, lambda_diag, cg_steps, cg_tolerance, H0, X);  // x_t again
  gated_cg_chunk_backward_given_solutions<T>(k, v, beta, gamma, lambda_diag, cg_steps, cg_tolerance, S0, H0, dout,
                                             X, dS, dH, dq, dk, dv, dbeta, dgamma, dlambda);
}

}  // namespace mesaopt::detail
