#pragma once
// The chunkwise-parallel form of the gated mesa op's exact solver
// (docs/gated_mesa_chunkwise_exact.md, M44-M48; GitHub issue 15): one chunk of
// C tokens from a state (S, R = P^{-1}) at a time, as GEMMs and triangular
// solves of size C instead of C sequential rank-one updates of R. It gives the
// recurrence M29-M31 exactly (to rounding). The chunk loop, the checkpoints and
// the argument checks belong to the caller (gated_mesa_forward/backward with
// opt.chunk > 0); these two functions trust their arguments: q, k (C x d),
// v, out, dout (C x dv), beta, gamma (C) in (0, 1], R symmetric positive
// definite (d x d), S (dv x d).
//
// Precision: A = D^{-1} + K R_0 K^T (M45) has the gates on its diagonal,
// D^{-1} = diag(g_s / beta_s) with g_s the product of the chunk's gammas, so
// its condition kappa ~ 1 + beta |k|^2 ||R_0|| / g_C grows as the gates close
// and as the decaying ridge inflates R_0, and the outputs cancel in proportion.
// In float, C <= 16 kept outputs and gradients within ~3x of the recurrence's
// own error for gates down to ~0.9; C = 64 made dgamma 36x worse there; past
// kappa ~ 1e8 results can be wrong without a breakdown being raised (tables in
// docs/gated_mesa_chunkwise_exact.md, "Precision and limits").
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/ops/mesa.hpp>  // MesaBreakdownError

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>

namespace mesaopt {
namespace detail {

// The chunk's gate products (M44): g_s = gamma_1...gamma_s and r_s =
// gamma_{s+1}...gamma_C (so g_s r_s = g_C), e_s = g_s / beta_s (the diagonal of
// D^{-1}) and omega_s = beta_s r_s (token s's weight in S_C). r is formed as
// its own product, not as g_C / g_s, so that neither it nor omega overflows
// when g_s underflows.
template <class T>
void gated_chunk_gates(const ConstVectorRef<T>& beta, const ConstVectorRef<T>& gamma, Vector<T>& g, Vector<T>& r,
                       Vector<T>& e, Vector<T>& omega) {
  const long C = beta.size();
  g.resize(C), r.resize(C), e.resize(C), omega.resize(C);
  T p = T(1);
  for (long s = 0; s < C; ++s) {
    p *= gamma[s];
    g[s] = p;
    e[s] = p / beta[s];
  }
  p = T(1);
  for (long s = C - 1; s >= 0; --s) {
    r[s] = p;
    omega[s] = beta[s] * p;
    p *= gamma[s];
  }
}

// In place: the lower triangle of L holds A on entry and its Cholesky factor on
// return (strict upper triangle zeroed). Pivot j is the Schur complement
// (g_{j-1} / beta_j) den_j, den_j the recurrence's Sherman-Morrison denominator
// gamma_j + beta_j k_j.R_{j-1} k_j (M45), so "pivot >= e_j / 2" is exactly the
// recurrence's breakdown test den_j >= gamma_j / 2 (M31): the two forms fail at
// the same token. Eigen's LLT would not say which pivot failed.
template <class T>
void gated_chunk_cholesky(const char* where, RowMatrix<T>& L, const Vector<T>& e) {
  const long C = L.rows();
  for (long j = 0; j < C; ++j) {
    const T pivot = L(j, j) - L.row(j).head(j).squaredNorm();
    if (!(pivot >= e[j] / T(2)) || !(pivot > T(0)) || !std::isfinite(pivot)) {
      std::ostringstream os;
      os << where << ": numerical breakdown at position t = " << j
         << " (0-based, within the chunk): the Cholesky pivot of A = D^-1 + K R0 K^T is " << pivot
         << ", below e_t/2 = " << e[j] / T(2)
         << " (the recurrence's denominator gamma_t + beta_t k_t.R_{t-1} k_t would be below gamma_t/2: R lost "
            "positive definiteness to rounding, the chunk's forget gates multiply to too small a number for "
            "this precision, or a key is not finite); use double, a smaller chunk or normalised keys";
      throw MesaBreakdownError(os.str(), j);
    }
    const T ljj = std::sqrt(pivot);
    L(j, j) = ljj;
    if (j + 1 < C) {
      L.col(j).tail(C - j - 1).noalias() -= L.block(j + 1, 0, C - j - 1, j) * L.row(j).head(j).transpose();
      L.col(j).tail(C - j - 1) /= ljj;
    }
  }
  L.template triangularView<Eigen::StrictlyUpper>().setZero();
}

// Li = L^{-1} for a lower triangular L (n x n, positive diagonal), lower
// triangular itself (strict upper triangle zero). Why an explicit inverse: a
// chunk applies L^{-1} or L^{-T} to C x C and C x d blocks up to nine times
// (M46-M48), and a C x C triangular solve runs at a fraction of a triangular
// product's speed at C = 64 (docs/gated_mesa_chunkwise_exact.md, "Cost per
// token"); one inverse (C^3/3 flops) turns them all into products. Blocked:
// inv([A 0; B D]) = [A^-1 0; -D^-1 B A^-1  D^-1], so the off-diagonal blocks
// are triangular products too; below 16 rows, column by column.
template <class T>
void lower_triangular_inverse(const RowMatrix<T>& L, RowMatrix<T>& Li) {
  const long n = L.rows();
  Li.setZero(n, n);
  for (long b = 0; b < n; b += 16) {  // diagonal blocks of up to 16, by substitution
    const long m = std::min<long>(16, n - b);
    for (long j = 0; j < m; ++j) {
      Li(b + j, b + j) = T(1) / L(b + j, b + j);
      for (long i = j + 1; i < m; ++i) {
        T acc = T(0);
        for (long p = j; p < i; ++p) acc += L(b + i, b + p) * Li(b + p, b + j);
        Li(b + i, b + j) = -acc / L(b + i, b + i);
      }
    }
  }
  // Merge neighbouring inverted blocks of width w into blocks of width 2w:
  // the lower-left block of a merged pair is -D^-1 (B A^-1).
  for (long w = 16; w < n; w *= 2) {
    for (long b = 0; b + w < n; b += 2 * w) {
      const long m = std::min<long>(w, n - b - w);  // rows of the lower block
      auto Ai = Li.block(b, b, w, w);
      auto Di = Li.block(b + w, b + w, m, m);
      RowMatrix<T> BA = L.block(b + w, b, m, w) * Ai.template triangularView<Eigen::Lower>();
      Li.block(b + w, b, m, w).noalias() = -(Di.template triangularView<Eigen::Lower>() * BA);
    }
  }
}

// The forward's intermediates of one chunk (M44-M46), shared by the forward
// and the backward's recomputation.
template <class T>
struct GatedExactChunk {
  Vector<T> g, r, e, omega;
  RowMatrix<T> Kt;  // K R0 (C x d); row s = (R0 k_s)^T
  RowMatrix<T> L;   // Cholesky factor of A = D^{-1} + K R0 K^T (C x C)
  RowMatrix<T> Li;  // L^{-1} (C x C, lower triangular): every solve with L below is a product with Li
  RowMatrix<T> W;   // triu(L^{-1} B), B = K R0 Q^T (C x C); kept by the backward only
  RowMatrix<T> Z;   // L^{-T} W (C x C, upper triangular): column t = z_t = A_t^{-1} K_t R0 q_t
  RowMatrix<T> X;   // Q R0 - Z^T Kt (C x d): row t = (P~_t^{-1} q_t)^T, P~_t = P_t / g_t

  // The gate products, K R0 and the Cholesky factor of A (M44-M45): what both
  // the outputs and the state after the chunk need.
  void factor(const char* where, const ConstMatrixRef<T>& k, const ConstVectorRef<T>& beta,
              const ConstVectorRef<T>& gamma, const RowMatrix<T>& R0) {
    gated_chunk_gates<T>(beta, gamma, g, r, e, omega);
    // R_C carries 1/g_C (M47) and e_s = g_s / beta_s is A's diagonal (M45): a
    // subnormal g_s would make them inf or 0 without any pivot failing.
    for (long s = 0; s < g.size(); ++s) {
      if (!(g[s] >= std::numeric_limits<T>::min())) {
        std::ostringstream os;
        os << where << ": numerical breakdown at position t = " << s
           << " (0-based, within the chunk): the product of the chunk's forget gates up to t is " << g[s]
           << ", below the smallest normal number (1/g overflows); use a smaller chunk";
        throw MesaBreakdownError(os.str(), s);
      }
    }
    Kt.noalias() = k * R0;
    L.noalias() = Kt * k.transpose();
    L.diagonal() += e;
    gated_chunk_cholesky<T>(where, L, e);
    lower_triangular_inverse<T>(L, Li);
  }

  // Every token's solve from the factor (M46): Z, X (and W if keep_W).
  void solves(const ConstMatrixRef<T>& q, const RowMatrix<T>& R0, bool keep_W) {
    // (M46) all z_t at once: the leading t x t block of L factors A_t, and that
    // of L^{-1} is L_t^{-1}; triu keeps column t to the first t keys.
    const RowMatrix<T> B = Kt * q.transpose();
    W.noalias() = Li.template triangularView<Eigen::Lower>() * B;
    W.template triangularView<Eigen::StrictlyLower>().setZero();
    Z.noalias() = Li.transpose().template triangularView<Eigen::Upper>() * W;
    if (!keep_W) W.resize(0, 0);
    X.noalias() = q * R0;
    X.noalias() -= Z.transpose().template triangularView<Eigen::Lower>() * Kt;
  }

  void compute(const char* where, const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
               const ConstVectorRef<T>& beta, const ConstVectorRef<T>& gamma, const RowMatrix<T>& R0,
               bool keep_W) {
    factor(where, k, beta, gamma, R0);
    solves(q, R0, keep_W);
  }
};

// The outputs of a chunk whose factor and solves are done (M46): O = X S0^T +
// Z^T V, the g_t of S_t and P_t cancel in o_t. S is the state before the chunk.
template <class T>
void gated_exact_chunk_output(const GatedExactChunk<T>& ch, const ConstMatrixRef<T>& v, const RowMatrix<T>& S,
                              MatrixRef<T> out) {
  out.noalias() = ch.X * S.transpose();
  out.noalias() += ch.Z.transpose().template triangularView<Eigen::Lower>() * v;
}

// Replaces (S, R) by the state after a factored chunk (M47). G: on entry K R0
// (ch.Kt or a copy of it), overwritten (scratch).
template <class T>
void gated_exact_chunk_state(const GatedExactChunk<T>& ch, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                             RowMatrix<T>& G, RowMatrix<T>& S, RowMatrix<T>& R) {
  const long C = k.rows();
  // (M47) R_C = (R0 - Kt^T A^{-1} Kt) / g_C, evaluated in the Joseph form
  // M R0 M^T + G^T D^{-1} G (G = A^{-1} Kt, M = I - G^T K): a sum of two
  // positive semi-definite terms. The plain difference cancels R0's large
  // entries (R0 grows on directions the keys do not span, M30) and, carried
  // from chunk to chunk, lost up to 100x more accuracy in float than this form
  // (docs/gated_mesa_chunkwise_exact.md, "Precision and limits").
  const T gC = ch.g[C - 1];
  const long d = R.rows();
  const RowMatrix<T> F = ch.Li.template triangularView<Eigen::Lower>() * G;
  G.noalias() = ch.Li.transpose().template triangularView<Eigen::Upper>() * F;
  RowMatrix<T> M = RowMatrix<T>::Identity(d, d);
  M.noalias() -= G.transpose() * k;
  const RowMatrix<T> MR = M * R;
  RowMatrix<T> Rn = G.transpose() * (ch.e.asDiagonal() * G);
  Rn.noalias() += MR * M.transpose();
  // Entry (i, j) and (j, i) alike, as M31 keeps R: R_C is exactly symmetric.
  for (long i = 0; i < d; ++i) {
    for (long j = 0; j <= i; ++j) {
      const T x = (Rn(i, j) + Rn(j, i)) / (T(2) * gC);
      R(i, j) = x;
      R(j, i) = x;
    }
  }
  // (M47) S_C = g_C S0 + V^T diag(omega) K
  S *= gC;
  S.noalias() += v.transpose() * (ch.omega.asDiagonal() * k);
}

// One chunk of C = q.rows() tokens from the state (S, R) (R = P^{-1},
// symmetric positive definite): writes out (C x dv) and replaces S, R by the
// state after the chunk (M44-M47). Throws MesaBreakdownError (position within
// the chunk) where the recurrence would (M45), and where the product of the
// chunk's gates leaves the normal range.
template <class T>
void gated_exact_chunk_forward(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                               const ConstVectorRef<T>& beta, const ConstVectorRef<T>& gamma, RowMatrix<T>& S,
                               RowMatrix<T>& R, MatrixRef<T> out) {
  const char* where = "gated_exact_chunk_forward";
  GatedExactChunk<T> ch;
  ch.compute(where, q, k, beta, gamma, R, false);
  gated_exact_chunk_output<T>(ch, v, S, out);
  gated_exact_chunk_state<T>(ch, k, v, ch.Kt, S, R);
}

template <class T>
void gated_exact_chunk_backward_prepare(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                                        const ConstVectorRef<T>& beta, const ConstVectorRef<T>& gamma,
                                        const RowMatrix<T>& R0, GatedExactChunk<T>& ch, RowMatrix<T>& F);
template <class T>
void gated_exact_chunk_backward_sweep(const GatedExactChunk<T>& ch, const RowMatrix<T>& F,
                                      const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                                      const ConstMatrixRef<T>& v, const ConstVectorRef<T>& beta,
                                      const ConstVectorRef<T>& gamma, const RowMatrix<T>& S0, const RowMatrix<T>& R0,
                                      const ConstMatrixRef<T>& dout, RowMatrix<T>& dS, RowMatrix<T>& dR,
                                      MatrixRef<T> dq, MatrixRef<T> dk, MatrixRef<T> dv, VectorRef<T> dbeta,
                                      VectorRef<T> dgamma);

// Backward of one chunk (M48). S0, R0: the state before the chunk. dS, dR: on
// entry dL/dS_C and dL/dR_C (zero matrices if none; dR is used as sym(dR), as
// gated_mesa_backward's grad_final->R), on return dL/dS0 and dL/dR0 (symmetric,
// the convention of grad_initial->R). Writes dq, dk, dv (C rows), dbeta and
// dgamma (C entries). Recomputes the chunk's forward from (S0, R0).
template <class T>
void gated_exact_chunk_backward(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                                const ConstVectorRef<T>& beta, const ConstVectorRef<T>& gamma,
                                const RowMatrix<T>& S0, const RowMatrix<T>& R0, const ConstMatrixRef<T>& dout,
                                RowMatrix<T>& dS, RowMatrix<T>& dR, MatrixRef<T> dq, MatrixRef<T> dk,
                                MatrixRef<T> dv, VectorRef<T> dbeta, VectorRef<T> dgamma) {
  GatedExactChunk<T> ch;
  RowMatrix<T> F;
  gated_exact_chunk_backward_prepare<T>(q, k, beta, gamma, R0, ch, F);
  gated_exact_chunk_backward_sweep<T>(ch, F, q, k, v, beta, gamma, S0, R0, dout, dS, dR, dq, dk, dv, dbeta, dgamma);
}

// gated_exact_chunk_backward in two parts, for the op's threads (opt.threads):
// _prepare recomputes the chunk's forward (M44-M46) and F = L^{-1} K R0 from
// the chunk's start state alone, so the chunks' preparations can run in
// parallel; _sweep is the rest of M48, which needs the adjoints of the state
// after the chunk and so runs chunk after chunk from the last one. Together
// they evaluate the same expressions as the one-piece backward.
template <class T>
void gated_exact_chunk_backward_prepare(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                                        const ConstVectorRef<T>& beta, const ConstVectorRef<T>& gamma,
                                        const RowMatrix<T>& R0, GatedExactChunk<T>& ch, RowMatrix<T>& F) {
  ch.compute("gated_exact_chunk_backward", q, k, beta, gamma, R0, true);
  F.noalias() = ch.Li.template triangularView<Eigen::Lower>() * ch.Kt;
}

// The rest of M48 from a prepared chunk (ch, F); arguments as gated_exact_chunk_backward.
template <class T>
void gated_exact_chunk_backward_sweep(const GatedExactChunk<T>& ch, const RowMatrix<T>& F,
                                      const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                                      const ConstMatrixRef<T>& v, const ConstVectorRef<T>& beta,
                                      const ConstVectorRef<T>& gamma, const RowMatrix<T>& S0, const RowMatrix<T>& R0,
                                      const ConstMatrixRef<T>& dout, RowMatrix<T>& dS, RowMatrix<T>& dR,
                                      MatrixRef<T> dq, MatrixRef<T> dk, MatrixRef<T> dv, VectorRef<T> dbeta,
                                      VectorRef<T> dgamma) {
  const long C = q.rows();
  const T gC = ch.g[C - 1];
  const RowMatrix<T>& L = ch.L;
  const RowMatrix<T>& Li = ch.Li;
  const RowMatrix<T>& Kt = ch.Kt;
  const RowMatrix<T>& Z = ch.Z;

  // S_C = g_C S0 + V^T diag(omega) K: the adjoint Sbar reaches S0, V, K, omega and g_C.
  const RowMatrix<T> Sbar = dS;
  RowMatrix<T> KS = k * Sbar.transpose();  // (C x dv), row s = (Sbar k_s)^T
  dv.noalias() = ch.omega.asDiagonal() * KS;
  dk.noalias() = ch.omega.asDiagonal() * (v * Sbar);
  const Vector<T> domega = v.cwiseProduct(KS).rowwise().sum();  // v_s . Sbar k_s
  T hC = gC * Sbar.cwiseProduct(S0).sum();  // dL/d(log g_C), accumulated
  dS = gC * Sbar;

  // R_C = (R0 - F^T F) / g_C, F = L^{-1} Kt: the forward's Joseph form is the same function, and this
  // form is the cheaper one to differentiate (M48).
  const RowMatrix<T> Rbar = (dR + dR.transpose()) / T(2);
  RowMatrix<T> FR = F * Rbar;
  hC -= (Rbar.cwiseProduct(R0).sum() - FR.cwiseProduct(F).sum()) / gC;  // -<Rbar, R_C>
  FR *= T(-2) / gC;                                                      // dF
  RowMatrix<T> dKt = Li.transpose().template triangularView<Eigen::Upper>() * FR;  // F = L^{-1} Kt: dKt = L^{-T} dF
  RowMatrix<T> Lbar = -(dKt * F.transpose());                             // only its lower triangle is used
  dR = Rbar / gC;

  // O = X S0^T + Z^T V.
  const RowMatrix<T> dX = dout * S0;  // (C x d)
  dS.noalias() += dout.transpose() * ch.X;
  RowMatrix<T> dZ = v * dout.transpose();  // (C x C)
  dv.noalias() += Z.template triangularView<Eigen::Upper>() * dout;
  // X = Q R0 - Z^T Kt.
  dZ.noalias() -= Kt * dX.transpose();
  dKt.noalias() -= Z.template triangularView<Eigen::Upper>() * dX;
  dZ.template triangularView<Eigen::StrictlyLower>().setZero();  // Z is upper triangular
  // Z = L^{-T} W: dW = L^{-1} dZ, Lbar -= Z dW^T.
  RowMatrix<T> dW = Li.template triangularView<Eigen::Lower>() * dZ;
  Lbar.noalias() -= Z * dW.transpose();
  dW.template triangularView<Eigen::StrictlyLower>().setZero();  // W = triu(L^{-1} B)
  // L^{-1} B: dB = L^{-T} dW, Lbar -= dB N^T (only N's upper triangle, W, meets Lbar's lower one).
  const RowMatrix<T> dB = Li.transpose().template triangularView<Eigen::Upper>() * dW;
  Lbar.noalias() -= dB * ch.W.transpose();
  // B = Kt Q^T.
  dKt.noalias() += dB * q;
  dq.noalias() = dB.transpose() * Kt;

  // Cholesky A = L L^T: Abar = sym(L^{-T} Phi(L^T Lbar) L^{-1}), Phi = lower
  // triangle with the diagonal halved.
  Lbar.template triangularView<Eigen::StrictlyUpper>().setZero();
  RowMatrix<T> Abar = L.transpose() * Lbar;
  Abar.template triangularView<Eigen::StrictlyUpper>().setZero();
  Abar.diagonal() /= T(2);
  const RowMatrix<T> LiTPhi = Li.transpose().template triangularView<Eigen::Upper>() * Abar;  // L^{-T} Phi
  Abar.noalias() = LiTPhi * Li.template triangularView<Eigen::Lower>();                        // L^{-T} Phi L^{-1}
  Abar = (Abar + Abar.transpose()).eval() / T(2);
  // A = D^{-1} + K R0 K^T, Kt = K R0, X = Q R0 - ...
  const Vector<T> de = Abar.diagonal();
  dk.noalias() += T(2) * (Abar * Kt);
  dk.noalias() += dKt * R0;
  RowMatrix<T> KA = Abar * k;
  KA += dKt;
  dR.noalias() += k.transpose() * KA;
  dR.noalias() += q.transpose() * dX;
  dq.noalias() += dX * R0;
  dR = (dR + dR.transpose()).eval() / T(2);

  // Gates (M48): e_s = g_s / beta_s, omega_s = beta_s r_s, g_C; as derivatives
  // in log gamma_j: e_s depends on gamma_j for j <= s, omega_s for j > s, g_C on all.
  Vector<T> h(C);
  for (long s = 0; s < C; ++s) {
    const T he = de[s] * ch.e[s];         // dL/d(log g_s) through e_s
    const T ho = domega[s] * ch.omega[s];  // dL/d(log r_s) through omega_s
    dbeta[s] = -he / beta[s] + domega[s] * ch.r[s];
    h[s] = he;
    dgamma[s] = ho;  // temporarily
  }
  T suffix = T(0), prefix = T(0);
  for (long j = C - 1; j >= 0; --j) {
    suffix += h[j];
    h[j] = suffix;  // sum_{s >= j} he_s
  }
  for (long j = 0; j < C; ++j) {
    const T ho = dgamma[j];
    dgamma[j] = (h[j] + prefix + hC) / gamma[j];  // prefix = sum_{s < j} ho_s
    prefix += ho;
  }
}

}  // namespace detail
}  // namespace mesaopt
