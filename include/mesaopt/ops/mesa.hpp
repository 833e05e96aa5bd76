#pragma once
// The mesa op (docs/math.md §3; carried state §6), one head, one sequence, functional:
//
//   W_t = argmin_W 1/2 sum_{i<=t} gamma^{t-i} ||v_i - W k_i||^2 + gamma^t/(2 lambda) ||W||_F^2
//       = S_t R_t,   R_t = (sum_{i<=t} gamma^{t-i} k_i k_i^T + gamma^t I / lambda)^{-1}     (M5)
//   o_t = W_t q_t = S_t R_t q_t                                                           (M6)
//
// gamma = opt.forget in (0, 1] is the forgetting factor (1 = none, the plain
// M5-M6). With an initial state (R_0, S_0) the recursion starts from it
// instead of (lambda I, 0) (M15). Forward: the Sherman-Morrison recursion
// (M7-M9) with the fused, bitwise-symmetric kernels of
// kernels/sherman_morrison.hpp and kernels/state_update.hpp. Backward: the
// reverse sweep (M10-M12, M16-M18) with checkpoints every C tokens; see
// docs/mesa.md for the memory formula and measured precision.
//
// The op contract (shared with linear_attention and softmax_attention):
//   forward (q, k, v, opt, out, cache, initial = nullptr, final = nullptr)
//   backward(q, k, v, opt, dout, cache, dq, dk, grad_v, dforget = nullptr,
//            initial = nullptr, grad_final = nullptr, grad_initial = nullptr)   returns dL/dlambda
//   step    (q, k, v, opt, state, out)                    one token, decoding
// q, k are (seq_len, d); v, out, dout are (seq_len, dv); one token per row.
// `initial` (R_0 d x d symmetric positive definite, S_0 dv x d; nullptr: the
// empty state of mesa_initial_state, R_0 = lambda I, S_0 = 0) and `final` (the
// state after the last token; may be the same object) carry a sequence across
// calls. The cache holds the initial state the forward used (its first
// checkpoint); the backward takes the same `initial` again and checks it
// against the cache. grad_final = dL/d(final state) from the next piece,
// grad_initial receives dL/d(initial state): chaining pieces this way gives
// the whole sequence's gradients exactly. With an initial state lambda is not
// used, and the returned dL/dlambda is 0 (the gradient goes to grad_initial->R).
//
// Usage (float or double):
//   mesaopt::MesaOptions<float> opt;  opt.lambda = 1.0f;  opt.forget = 1.0f;  opt.chunk = 0;
//   mesaopt::MesaCache<float> cache;
//   RowMatrix<float> out(seq_len, dv);                   // outputs must be pre-sized
//   mesaopt::mesa_forward(q, k, v, opt, out, cache);
//   float dforget = 0;
//   float dlambda = mesaopt::mesa_backward(q, k, v, opt, dout, cache, dq, dk, grad_v, &dforget);
//
// Thread safety: no global state. One cache per concurrently running sequence.
// Precision (docs/mesa.md): double matches the direct ridge solve to 1e-10;
// float32 stays within about 1e-5 relative of double up to 65536 tokens (d = 32).
// R must stay positive definite: in float with extreme lambda |k|^2 the
// denominator gamma + k.u can round to <= 0 and produce NaN (docs/mesa.md).
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/kernels/gemv.hpp>
#include <mesaopt/kernels/rank2.hpp>
#include <mesaopt/kernels/sherman_morrison.hpp>
#include <mesaopt/kernels/state_update.hpp>
#include <mesaopt/kernels/vector_ops.hpp>
#include <mesaopt/ops/checks.hpp>
#include <mesaopt/ops/state.hpp>

#include <Eigen/Cholesky>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

namespace mesaopt {

// Options of the mesa op.
template <class T>
struct MesaOptions {
  T lambda = T(1);  // ridge strength lambda > 0 of M5: R_0 = lambda I (larger = weaker regularisation)
  T forget = T(1);  // forgetting factor gamma in (0, 1]; 1 = no forgetting (docs/math.md §3)
  long chunk = 0;   // checkpoint interval C for the backward pass; 0 = automatic (mesa_auto_chunk)
};

// The automatic checkpoint interval: minimises the cache's size
//   (ceil(seq_len/C)) (d^2 + d dv + d)  +  3 C d      (checkpoints + per-chunk vectors)
// at C = sqrt(seq_len (d + dv + 1) / 3), i.e. about sqrt(seq_len) times a constant; clamped to [1, seq_len].
inline long mesa_auto_chunk(long seq_len, long d, long dv) {
  const double c = std::sqrt(static_cast<double>(seq_len) * static_cast<double>(d + dv + 1) / 3.0);
  return std::clamp(static_cast<long>(std::lround(c)), 1L, std::max(seq_len, 1L));
}

// The empty state (M5): R = lambda I (d x d), S = 0 (dv x d).
template <class T>
MesaState<T> mesa_initial_state(long d, long dv, const MesaOptions<T>& opt) {
  const char* where = "mesa_initial_state";
  detail::check_positive_size(where, "d", d);
  detail::check_positive_size(where, "dv", dv);
  detail::check_positive_finite(where, "opt.lambda", opt.lambda);
  return {opt.lambda * RowMatrix<T>::Identity(d, d), RowMatrix<T>::Zero(dv, d)};
}

template <class T>
class MesaCache;

namespace detail {
struct MesaCacheAccess;
}

// What mesa_backward needs from mesa_forward, plus all scratch of both passes
// (reused across calls, so repeated calls with the same sizes do not allocate).
// Holds, per checkpoint c = 0 .. ceil(seq_len/C)-1, the state after c*C tokens:
// R (d x d), S^T (d x dv) and u = R k_{cC+1} (d); nothing per token.
// Checkpoint 0 is the initial state.
template <class T>
class MesaCache {
 public:
  // Bytes held by the cache (checkpoints and scratch, by capacity).
  std::size_t bytes() const {
    std::size_t n = 0;
    for (const auto* b : {&ck_R_, &ck_St_, &ck_u_, &R_, &St_, &u_, &w_, &a_, &tmp_, &ch_a_, &ch_da_, &ch_dq_,
                          &Gt_, &M_, &Mk_})
      n += b->capacity();
    return n * sizeof(T);
  }
  long length() const { return T_; }         // seq_len of the last forward, 0 before any
  long key_dim() const { return d_; }        // d
  long value_dim() const { return dv_; }     // dv
  long chunk() const { return C_; }          // the checkpoint interval C used
  long num_checkpoints() const { return T_ > 0 ? (T_ + C_ - 1) / C_ : 0; }
  T lambda() const { return lambda_; }       // lambda of the last forward
  T forget() const { return forget_; }       // gamma of the last forward
  bool has_initial_state() const { return has_initial_; }  // the last forward started from a given state

 private:
  friend struct detail::MesaCacheAccess;

  long T_ = 0, d_ = 0, dv_ = 0, C_ = 1;
  T lambda_ = T(0), forget_ = T(0);
  bool has_initial_ = false;
  std::vector<T> ck_R_, ck_St_, ck_u_;             // checkpoints
  std::vector<T> R_, St_, u_, w_, a_, tmp_;        // running state
  std::vector<T> ch_a_, ch_da_, ch_dq_;            // a_t, da_t, dq_t of one chunk (C x d each)
  std::vector<T> Gt_, M_, Mk_;                     // reverse accumulators G^T (d x dv), M (d x d), M k
};

namespace detail {

// Shared argument checks of forward and backward.
template <class T>
void check_mesa_args(const char* where, const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                     const ConstMatrixRef<T>& v, const MesaOptions<T>& opt) {
  check_sequence_inputs<T>(where, q, k, v);
  check_positive_finite(where, "opt.lambda", opt.lambda);
  check_half_open(where, "opt.forget", opt.forget, T(0), T(1));
  if (opt.chunk < 0) fail(where, "opt.chunk must be >= 0 (0 = automatic), got ", opt.chunk);
}

// Throws unless R is d x d, finite and symmetric to rounding (relative
// sqrt(epsilon)), and S is dv x d and finite.
template <class T>
void check_mesa_state(const char* where, const char* what, const MesaState<T>& s, long d, long dv) {
  if (s.R.rows() != d || s.R.cols() != d)
    fail(where, what, ".R is ", s.R.rows(), " x ", s.R.cols(), " but must be d x d = ", d, " x ", d);
  if (s.S.rows() != dv || s.S.cols() != d)
    fail(where, what, ".S is ", s.S.rows(), " x ", s.S.cols(), " but must be dv x d = ", dv, " x ", d);
  if (!s.R.allFinite()) fail(where, what, ".R has a non-finite entry");
  if (!s.S.allFinite()) fail(where, what, ".S has a non-finite entry");
}

template <class T>
void check_mesa_initial_state(const char* where, const MesaState<T>& s, long d, long dv) {
  check_mesa_state(where, "initial", s, d, dv);
  const T scale = std::max(T(1), s.R.cwiseAbs().maxCoeff());
  const T asym = (s.R - s.R.transpose()).cwiseAbs().maxCoeff();
  if (asym > std::sqrt(std::numeric_limits<T>::epsilon()) * scale)
    fail(where, "initial.R must be symmetric (it is R_t = (sum k k^T + ...)^-1), but |R - R^T| reaches ", asym);
}

// The kernels need R exactly symmetric (kernels/sherman_morrison.hpp):
// (R + R^T) / 2 is R itself when R already is.
template <class T>
void symmetrised_copy(const RowMatrix<T>& R, T* dst) {
  const long d = R.rows();
  for (long i = 0; i < d; ++i)
    for (long j = 0; j < d; ++j) dst[i * d + j] = (R(i, j) + R(j, i)) / T(2);
}

struct MesaCacheAccess {
  // The forward (M7-M9, M15), writing checkpoints into c.
  template <class T>
  static void forward(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                      const MesaOptions<T>& opt, MatrixRef<T>& out, MesaCache<T>& c, const MesaState<identity_t<T>>* initial,
                      MesaState<identity_t<T>>* final) {
    const long n = q.rows(), d = q.cols(), dv = v.cols();
    const long ldq = q.outerStride(), ldk = k.outerStride(), ldv = v.outerStride(), ldo = out.outerStride();
    const long C = opt.chunk > 0 ? std::min(opt.chunk, n) : mesa_auto_chunk(n, d, dv);
    const long nck = (n + C - 1) / C;
    const std::size_t dd = static_cast<std::size_t>(d), ddv = static_cast<std::size_t>(dv);
    c.T_ = n;
    c.d_ = d;
    c.dv_ = dv;
    c.C_ = C;
    c.lambda_ = opt.lambda;
    c.forget_ = opt.forget;
    c.has_initial_ = initial != nullptr;
    c.ck_R_.resize(nck * dd * dd);
    c.ck_St_.resize(nck * dd * ddv);
    c.ck_u_.resize(nck * dd);
    c.R_.assign(dd * dd, T(0));
    c.St_.assign(dd * ddv, T(0));
    c.u_.resize(dd);
    c.w_.resize(dd);
    c.a_.resize(dd);
    const T gamma = opt.forget;
    const T inv_gamma = T(1) / gamma;  // exactly 1 without forgetting: the kernels skip the scaling
    T* R = c.R_.data();
    T* St = c.St_.data();
    T* u = c.u_.data();
    T* w = c.w_.data();
    T* a = c.a_.data();
    const T* q0 = q.data();
    const T* k0 = k.data();
    const T* v0 = v.data();
    T* o0 = out.data();
    if (initial != nullptr) {  // (M15) R_0, S_0 given; u_1 = R_0 k_1
      symmetrised_copy(initial->R, R);
      for (std::size_t i = 0; i < dd; ++i)
        for (std::size_t j = 0; j < ddv; ++j) St[i * ddv + j] = initial->S(long(j), long(i));
      kernels::gemv(dd, dd, R, dd, k0, u);
    } else {  // R_0 = lambda I, S_0 = 0, so u_1 = R_0 k_1 = lambda k_1.
      for (std::size_t i = 0; i < dd; ++i) {
        R[i * dd + i] = opt.lambda;
        u[i] = opt.lambda * k0[i];
      }
    }
    for (long t = 0; t < n; ++t) {
      if (t % C == 0) {  // checkpoint: the state after t tokens
        const long ck = t / C;
        std::copy(R, R + dd * dd, c.ck_R_.data() + ck * dd * dd);
        std::copy(St, St + dd * ddv, c.ck_St_.data() + ck * dd * ddv);
        std::copy(u, u + dd, c.ck_u_.data() + ck * dd);
      }
      const T* kt = k0 + t * ldk;
      const T* knext = t + 1 < n ? kt + ldk : nullptr;
      // (M7) R_t = (R_{t-1} - u u^T / (gamma + k.u)) / gamma = R_{t-1}/gamma - w w^T; a_t = R_t q_t, u_{t+1} = R_t k_{t+1}
      kernels::sherman_morrison_gain(dd, kt, u, gamma, w);
      kernels::sherman_morrison_update(dd, R, dd, w, inv_gamma, q0 + t * ldq, knext, a, u);
      // (M8-M9) S_t = gamma S_{t-1} + v_t k_t^T, o_t = S_t a_t
      kernels::state_update_apply(dd, ddv, St, ddv, gamma, kt, v0 + t * ldv, a, o0 + t * ldo);
    }
    if (final != nullptr) {
      final->R = Eigen::Map<const RowMatrix<T>>(R, d, d);
      final->S = Eigen::Map<const RowMatrix<T>>(St, d, dv).transpose();
    }
  }

  // Throws unless `initial` is the state the forward started from.
  template <class T>
  static void check_same_initial(const char* where, const MesaCache<T>& c, const MesaState<identity_t<T>>* initial) {
    if (c.has_initial_ != (initial != nullptr))
      fail(where, "the forward ran ", c.has_initial_ ? "with" : "without", " an initial state but backward got ",
           initial != nullptr ? "one" : "none", " (pass the same initial as to mesa_forward)");
    if (initial == nullptr) return;
    const long d = c.d_, dv = c.dv_;
    check_mesa_state(where, "initial", *initial, d, dv);
    std::vector<T> R0(std::size_t(d * d));
    symmetrised_copy(initial->R, R0.data());  // what the forward stored as checkpoint 0
    if (!std::equal(R0.begin(), R0.end(), c.ck_R_.begin()))
      fail(where, "initial.R differs from the R_0 the forward used (pass the same initial as to mesa_forward)");
    for (long i = 0; i < d; ++i)
      for (long j = 0; j < dv; ++j)
        if (c.ck_St_[std::size_t(i * dv + j)] != initial->S(j, i))
          fail(where, "initial.S differs from the S_0 the forward used (pass the same initial as to mesa_forward)");
  }

  // The backward sweep (M10-M12, M16-M18); returns dL/dlambda.
  template <class T>
  static T backward(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                    const MesaOptions<T>& opt, const ConstMatrixRef<T>& dout, MesaCache<T>& c, MatrixRef<T>& dq,
                    MatrixRef<T>& dk, MatrixRef<T>& grad_v, T* dforget, const MesaState<identity_t<T>>* grad_final,
                    MesaState<identity_t<T>>* grad_initial) {
    const long n = q.rows(), d = q.cols(), dv = v.cols();
    const long ldq = q.outerStride(), ldk = k.outerStride(), ldv = v.outerStride(), ldg = dout.outerStride();
    const long lddq = dq.outerStride(), lddk = dk.outerStride(), lddv = grad_v.outerStride();
    const long C = c.C_;
    const long nck = (n + C - 1) / C;
    const std::size_t dd = static_cast<std::size_t>(d), ddv = static_cast<std::size_t>(dv);
    const T gamma = opt.forget;
    const T inv_gamma = T(1) / gamma;
    c.ch_a_.resize(C * dd);
    c.ch_da_.resize(C * dd);
    c.ch_dq_.resize(C * dd);
    c.Gt_.assign(dd * ddv, T(0));
    c.M_.assign(dd * dd, T(0));
    c.Mk_.resize(dd);
    c.tmp_.resize(dd);
    T* R = c.R_.data();
    T* St = c.St_.data();
    T* u = c.u_.data();
    T* w = c.w_.data();
    T* Gt = c.Gt_.data();
    T* M = c.M_.data();
    T* Mk = c.Mk_.data();
    T* gk = c.tmp_.data();
    const T* q0 = q.data();
    const T* k0 = k.data();
    const T* v0 = v.data();
    const T* g0 = dout.data();
    // Scalar sums in double: they add seq_len terms of mixed sign.
    double dlambda_sum = 0;  // sum_t gamma^t (a_t . dq_t)            (M12)
    double dgamma_sum = 0;   // sum_t t c_t (+ the final state's term)  (M18)
    for (long ck = nck - 1; ck >= 0; --ck) {
      const long t0 = ck * C, t1 = std::min(n, t0 + C);
      // Recompute the chunk forward from its checkpoint. The same kernels on the
      // same state reproduce the forward's R_t, S_t, a_t bitwise.
      std::copy(c.ck_R_.data() + ck * dd * dd, c.ck_R_.data() + (ck + 1) * dd * dd, R);
      std::copy(c.ck_St_.data() + ck * dd * ddv, c.ck_St_.data() + (ck + 1) * dd * ddv, St);
      std::copy(c.ck_u_.data() + ck * dd, c.ck_u_.data() + (ck + 1) * dd, u);
      double gamma_pow = std::pow(static_cast<double>(gamma), static_cast<double>(t0 + 1));  // gamma^t, t 1-based
      for (long t = t0; t < t1; ++t) {
        T* a = c.ch_a_.data() + (t - t0) * dd;
        T* da = c.ch_da_.data() + (t - t0) * dd;
        T* dqt = c.ch_dq_.data() + (t - t0) * dd;
        const T* kt = k0 + t * ldk;
        const T* knext = t + 1 < n ? kt + ldk : nullptr;
        kernels::sherman_morrison_gain(dd, kt, u, gamma, w);
        kernels::sherman_morrison_update(dd, R, dd, w, inv_gamma, q0 + t * ldq, knext, a, u);
        // forward: o_t = S_t a_t            =>  da_t = S_t^T g_t              (M10)
        kernels::state_update_dot(dd, ddv, St, ddv, gamma, kt, v0 + t * ldv, g0 + t * ldg, da);
        // forward: a_t = R_t q_t            =>  dq_t = R_t da_t               (M10)
        kernels::gemv(dd, dd, R, dd, da, dqt);
        // forward: R_0 = lambda I enters R_t^{-1} as gamma^t / lambda I   =>  (M12)
        dlambda_sum += gamma_pow * static_cast<double>(kernels::dot(a, dqt, dd));
        gamma_pow *= static_cast<double>(gamma);
        std::copy(dqt, dqt + dd, dq.data() + t * lddq);
      }
      if (ck == nck - 1 && grad_final != nullptr) {
        // R and St now hold the final state R_T, S_T^T. (M16): G_{T+1} = Sbar / gamma,
        // M_{T+1} = 2 R_T sym(Rbar) R_T / gamma; their terms of M17 and M18.
        const Eigen::Map<const RowMatrix<T>> RT(R, d, d), StT(St, d, dv);
        const RowMatrix<T> Rbar = (grad_final->R + grad_final->R.transpose()) / T(2);
        const RowMatrix<T> Minit = (T(2) * inv_gamma) * (RT * Rbar * RT);
        Eigen::Map<RowMatrix<T>>(M, d, d) = (Minit + Minit.transpose()) / T(2);
        Eigen::Map<RowMatrix<T>>(Gt, d, dv) = inv_gamma * grad_final->S.transpose();
        const double RRbar = (RT.template cast<double>() * RT.template cast<double>())
                                 .cwiseProduct(Rbar.template cast<double>())
                                 .sum();  // tr(R_T Rbar R_T)
        dlambda_sum += std::pow(static_cast<double>(gamma), static_cast<double>(n)) * RRbar;
        const double SbarS = grad_final->S.template cast<double>().cwiseProduct(StT.transpose().template cast<double>()).sum();
        const double RbarR = grad_final->R.template cast<double>().cwiseProduct(RT.template cast<double>()).sum();
        dgamma_sum += static_cast<double>(n) * (SbarS - RbarR);
      }
      // Reverse sweep over the chunk (M11), G and M carried across chunks:
      //   G_t = g_t a_t^T + gamma G_{t+1},  M_t = dq_t a_t^T + a_t dq_t^T + gamma M_{t+1}
      for (long t = t1 - 1; t >= t0; --t) {
        const T* a = c.ch_a_.data() + (t - t0) * dd;
        const T* da = c.ch_da_.data() + (t - t0) * dd;
        const T* dqt = c.ch_dq_.data() + (t - t0) * dd;
        const T* kt = k0 + t * ldk;
        const T* vt = v0 + t * ldv;
        const T* gt = g0 + t * ldg;
        T* dvt = grad_v.data() + t * lddv;
        T* dkt = dk.data() + t * lddk;
        // forward: S_t = sum_i gamma^{t-i} v_i k_i^T   =>  dv_t = G_t k_t, dk_t += G_t^T v_t
        kernels::state_update_apply(dd, ddv, Gt, ddv, gamma, a, gt, kt, dvt);  // G^T <- gamma G^T + a g^T; dv = G k
        kernels::gemv(dd, ddv, Gt, ddv, vt, gk);                               // G^T v
        // forward: R_t^{-1} = sum_i gamma^{t-i} k_i k_i^T + ...   =>  dk_t -= M_t k_t
        kernels::rank2_update_apply(dd, M, dd, gamma, dqt, a, kt, Mk);
        for (std::size_t i = 0; i < dd; ++i) dkt[i] = gk[i] - Mk[i];
        if (dforget != nullptr) {
          // c_t = g_t.o_t - dq_t.q_t + 1/2 k_t.(M_t k_t) - v_t.dv_t, with g_t.o_t = da_t.a_t   (M18)
          const double ct = static_cast<double>(kernels::dot(da, a, dd)) -
                            static_cast<double>(kernels::dot(dqt, q0 + t * ldq, dd)) +
                            0.5 * static_cast<double>(kernels::dot(kt, Mk, dd)) -
                            static_cast<double>(kernels::dot(vt, dvt, ddv));
          dgamma_sum += static_cast<double>(t + 1) * ct;
        }
      }
    }
    if (dforget != nullptr) *dforget = static_cast<T>(dgamma_sum / static_cast<double>(gamma));
    if (grad_initial != nullptr) {
      // (M17) dL/dS_0 = gamma G_1,  dL/dR_0 = gamma/2 R_0^{-1} M_1 R_0^{-1}
      const Eigen::Map<const RowMatrix<T>> M1(M, d, d), G1t(Gt, d, dv), R0(c.ck_R_.data(), d, d);
      grad_initial->S = gamma * G1t.transpose();
      RowMatrix<T> X;
      if (c.has_initial_) {
        const Eigen::LLT<RowMatrix<T>> llt(R0);
        if (llt.info() != Eigen::Success)
          fail("mesa_backward", "initial.R is not positive definite (its Cholesky factorisation failed)");
        X = llt.solve(RowMatrix<T>(llt.solve(M1).transpose())).transpose();
      } else {
        X = M1 / (opt.lambda * opt.lambda);
      }
      grad_initial->R = (gamma / T(4)) * (X + X.transpose());
    }
    if (c.has_initial_) return T(0);
    const double lam = static_cast<double>(opt.lambda);
    return static_cast<T>(dlambda_sum / (lam * lam));
  }
};

}  // namespace detail

// Forward pass of the mesa op (M5-M9, M15), one head, one sequence.
//   q, k : (seq_len, d), one token per row;  v : (seq_len, dv);  out : (seq_len, dv), pre-sized, written.
// Throws std::invalid_argument on mismatched shapes, seq_len, d or dv = 0, lambda not
// finite and > 0, forget outside (0, 1], chunk < 0, and an initial state of the
// wrong shape, non-finite or not symmetric. Fills `cache` for mesa_backward.
template <class T>
void mesa_forward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v, const MesaOptions<T>& opt,
                  MatrixRef<T> out, MesaCache<T>& cache, const MesaState<identity_t<T>>* initial = nullptr,
                  MesaState<identity_t<T>>* final = nullptr) {
  constexpr const char* where = "mesa_forward";
  detail::check_mesa_args<T>(where, q, k, v, opt);
  detail::check_output<T>(where, "out", out, q.rows(), v.cols());
  if (initial != nullptr) detail::check_mesa_initial_state(where, *initial, q.cols(), v.cols());
  detail::MesaCacheAccess::forward<T>(q, k, v, opt, out, cache, initial, final);
}

// Backward pass (M10-M12, M16-M18), given dout = dL/dout (seq_len, dv) and
// the cache of mesa_forward on the same q, k, v, options and initial state.
// Writes (does not accumulate) dq, dk : (seq_len, d) and grad_v : (seq_len,
// dv); returns dL/dlambda (0 when the forward started from an initial state);
// if dforget != nullptr writes dL/dgamma there; grad_final (optional) is
// dL/d(final state); grad_initial (optional) receives dL/d(initial state).
// The cache is only read (its checkpoints) and used for scratch: backward may
// be called several times after one forward. The checkpoint interval is the
// forward's (cache.chunk()); opt.chunk is ignored here. Throws
// std::invalid_argument on bad shapes, on a cache from a different seq_len, d,
// dv, lambda or forget, and on an initial state other than the forward's.
template <class T>
T mesa_backward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v, const MesaOptions<T>& opt,
                ConstMatrixRef<T> dout, MesaCache<T>& cache, MatrixRef<T> dq, MatrixRef<T> dk, MatrixRef<T> grad_v,
                identity_t<T>* dforget = nullptr, const MesaState<identity_t<T>>* initial = nullptr,
                const MesaState<identity_t<T>>* grad_final = nullptr, MesaState<identity_t<T>>* grad_initial = nullptr) {
  constexpr const char* where = "mesa_backward";
  detail::check_mesa_args<T>(where, q, k, v, opt);
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  detail::check_gradient_shapes<T>(where, n, d, dv, dout, dq, dk, grad_v);
  if (cache.length() != n || cache.key_dim() != d || cache.value_dim() != dv) {
    detail::fail(where, "cache is for seq_len = ", cache.length(), ", d = ", cache.key_dim(), ", dv = ",
                 cache.value_dim(), " but the inputs have seq_len = ", n, ", d = ", d, ", dv = ", dv,
                 " (run mesa_forward on these inputs first)");
  }
  if (cache.lambda() != opt.lambda || cache.forget() != opt.forget) {
    detail::fail(where, "cache was made with lambda = ", cache.lambda(), ", forget = ", cache.forget(),
                 " but opt has lambda = ", opt.lambda, ", forget = ", opt.forget);
  }
  detail::MesaCacheAccess::check_same_initial<T>(where, cache, initial);
  if (grad_final != nullptr) detail::check_mesa_state(where, "grad_final", *grad_final, d, dv);
  return detail::MesaCacheAccess::backward<T>(q, k, v, opt, dout, cache, dq, dk, grad_v, dforget, grad_final,
                                              grad_initial);
}

// One decoding step (M15 for one token): u = R k, R <- (R - u u^T/(gamma + k.u))/gamma,
// S <- gamma S + v k^T, out = S R q. q, k have d entries, v and out dv; the
// state starts as mesa_initial_state(d, dv, opt) (or any state a forward returned).
template <class T>
void mesa_step(ConstVectorRef<T> q, ConstVectorRef<T> k, ConstVectorRef<T> v, const MesaOptions<T>& opt,
               MesaState<T>& state, VectorRef<T> out) {
  const char* where = "mesa_step";
  const long d = state.R.rows(), dv = state.S.rows();
  detail::check_positive_size(where, "state.R rows (d)", d);
  detail::check_positive_size(where, "state.S rows (dv)", dv);
  detail::check_shape(where, "state.R", state.R, d, d);
  detail::check_shape(where, "state.S", state.S, dv, d);
  detail::check_token_inputs(where, q, k, v, out, d, dv);
  detail::check_positive_finite(where, "opt.lambda", opt.lambda);
  detail::check_half_open(where, "opt.forget", opt.forget, T(0), T(1));
  const std::size_t dd = std::size_t(d), ddv = std::size_t(dv);
  const T gamma = opt.forget;
  Vector<T> u(d), w(d), a(d);
  kernels::gemv(dd, dd, state.R.data(), dd, k.data(), u.data());                 // u = R_{t-1} k_t
  kernels::sherman_morrison_gain(dd, k.data(), u.data(), gamma, w.data());      // (M7)
  kernels::sherman_morrison_update(dd, state.R.data(), dd, w.data(), T(1) / gamma, q.data(), static_cast<const T*>(nullptr),
                                   a.data(), static_cast<T*>(nullptr));       // R_t, a_t = R_t q_t
  // (M8-M9) S (dv x d) <- gamma S + v k^T, out = S a: the transposed use of the state kernel.
  kernels::state_update_dot(ddv, dd, state.S.data(), dd, gamma, v.data(), k.data(), a.data(), out.data());
}

// Non-template overloads of the step (the sequence functions deduce T from the options).
#define MESAOPT_MESA_OVERLOADS(S)                                                                              \
  inline void mesa_step(ConstVectorRef<S> q, ConstVectorRef<S> k, ConstVectorRef<S> v, const MesaOptions<S>& opt, \
                        MesaState<S>& state, VectorRef<S> out) {                                                \
    mesa_step<S>(q, k, v, opt, state, out);                                                                    \
  }
MESAOPT_MESA_OVERLOADS(float)
MESAOPT_MESA_OVERLOADS(double)
#undef MESAOPT_MESA_OVERLOADS

}  // namespace mesaopt
