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
// (M7) with the fused, bitwise-symmetric kernels of
// kernels/sherman_morrison.hpp gives a_t = R_t q_t; S_t and o_t = S_t a_t
// (M8-M9) depend on R only through a_t, so once a chunk's a_t are known its S
// part is one kernels::state_sweep (the state held in registers over the
// chunk). Backward: the reverse sweep (M10-M12, M16-M18) with R checkpoints
// every C tokens, its S and G parts again whole-chunk sweeps; see
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
//
// Regulariser with forgetting (opt.regularizer, docs/math.md M5 and M20):
// `decaying` (default) forgets the ridge with the data, gamma^t I / lambda, and
// runs the exact Sherman-Morrison recursion, O(d^2) per token; `constant` keeps
// I / lambda at every t (as MesaNet does), P_t = gamma P_{t-1} + k k^T +
// (1 - gamma)/lambda I, solved by a Cholesky factorisation per token, O(d^3)
// (ops/mesa_constant.hpp). Both are the same objective at gamma = 1. With
// gamma < 1 and keys that leave directions unspanned, the decaying R grows like
// gamma^-t on those directions and the recursion breaks down; the constant
// one stays bounded (docs/mesa.md, "Numerical safety").
//
// Breakdown (docs/mesa.md, "Numerical safety"): the forward and the step watch
// the quantity each token already computes: the decaying mode's denominator
// den_t = gamma + k_t.R_{t-1} k_t, which is >= gamma while R is positive
// definite, must lie in [gamma/2, gamma/epsilon] (below: R lost positive
// definiteness; above: the update cancelled every significant digit); the
// constant mode's Cholesky factorisation must succeed with finite pivots.
// Otherwise they throw MesaBreakdownError (a std::runtime_error: the inputs
// were valid, the arithmetic failed) naming the position t and lambda |k_t|^2.
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/kernels/gemv.hpp>
#include <mesaopt/kernels/rank2.hpp>
#include <mesaopt/kernels/sherman_morrison.hpp>
#include <mesaopt/kernels/state_sweep.hpp>
#include <mesaopt/kernels/state_update.hpp>
#include <mesaopt/kernels/vector_ops.hpp>
#include <mesaopt/ops/checks.hpp>
#include <mesaopt/ops/mesa_constant.hpp>
#include <mesaopt/ops/state.hpp>

#include <Eigen/Cholesky>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace mesaopt {

// Which ridge term the objective carries when it forgets (docs/math.md §3).
// At gamma = 1 both are the paper's layer (M5) and agree to rounding.
enum class MesaRegularizer {
  // gamma^t I / lambda: the ridge is forgotten with the data (M5 with gamma).
  // Exact Sherman-Morrison recursion (M7), O(d^2) per token. With gamma < 1,
  // R grows like gamma^-t on directions no key spans, and the recursion
  // breaks down after about log(epsilon)/log(gamma) tokens (docs/mesa.md).
  decaying,
  // I / lambda at every t, as in MesaNet (M20): P_t = gamma P_{t-1} + k k^T
  // + (1 - gamma)/lambda I stays >= I/lambda; Cholesky per token, O(d^3).
  constant,
};

// Options of the mesa op.
template <class T>
struct MesaOptions {
  T lambda = T(1);  // ridge strength lambda > 0 of M5: R_0 = lambda I (larger = weaker regularisation); a normal number
  T forget = T(1);  // forgetting factor gamma in (0, 1]; 1 = no forgetting (docs/math.md §3); a normal number
  long chunk = 0;   // checkpoint interval C for the backward pass; 0 = automatic (mesa_auto_chunk)
  MesaRegularizer regularizer = MesaRegularizer::decaying;  // ridge term with forgetting (M5 or M20)
};

// The forward recursion lost positive definiteness to rounding (docs/mesa.md,
// "Numerical safety"). The inputs were valid; the arithmetic failed, so this
// is a std::runtime_error, not std::invalid_argument. what() names the
// position, the denominator or factorisation that failed and lambda |k_t|^2;
// a layer adds the sequence b and head h.
class MesaBreakdownError : public std::runtime_error {
 public:
  MesaBreakdownError(const std::string& message, long position, long batch = -1, long head = -1)
      : std::runtime_error(message), position_(position), batch_(batch), head_(head) {}
  long position() const noexcept { return position_; }  // token t (0-based, within the call) that failed
  long batch() const noexcept { return batch_; }        // sequence b of a layer call; -1 from the op
  long head() const noexcept { return head_; }          // head h of a layer call; -1 from the op

 private:
  long position_, batch_, head_;
};

namespace detail {

template <class T>
const char* scalar_name() {
  return sizeof(T) == sizeof(float) ? "float" : sizeof(T) == sizeof(double) ? "double" : "long double";
}

// lambda and gamma must be normal numbers (docs/mesa.md, "Errors"): a
// subnormal lambda has already lost relative precision, lambda k_t loses more
// and 1/lambda overflows; a subnormal gamma makes 1/gamma overflow.
template <class T>
void check_normal(const char* where, const char* what, T value, const char* why) {
  if (value < std::numeric_limits<T>::min())
    fail(where, what, " = ", value, " is subnormal (below the smallest normal ", scalar_name<T>(), ", ",
         std::numeric_limits<T>::min(), "): ", why);
}
template <class T>
void check_mesa_lambda(const char* where, const char* what, T lambda) {
  check_positive_finite(where, what, lambda);
  check_normal(where, what, lambda, "lambda k and 1/lambda lose all precision or overflow");
}
template <class T>
void check_mesa_forget(const char* where, const char* what, T gamma) {
  check_half_open(where, what, gamma, T(0), T(1));
  check_normal(where, what, gamma, "1/gamma overflows");
}
inline void check_mesa_regularizer(const char* where, const char* what, MesaRegularizer r) {
  if (r != MesaRegularizer::decaying && r != MesaRegularizer::constant)
    fail(where, what, " must be MesaRegularizer::decaying or MesaRegularizer::constant, got ", static_cast<int>(r));
}

// The breakdown test of the decaying recursion: den_t = gamma + k_t.R_{t-1} k_t
// lies in [gamma, inf) while R_{t-1} is positive definite. Below gamma/2 (or
// NaN) rounding has destroyed positive definiteness; above gamma/epsilon the
// update R_{t-1} - u u^T/den, whose relative rounding error in the direction
// of k_t is about epsilon den/gamma, has no significant digit left there.
template <class T>
bool mesa_denominator_ok(T den, T lo, T hi) {
  return den >= lo && den <= hi;  // false for NaN and +-inf
}

// Throws MesaBreakdownError for token t (docs/mesa.md, "Numerical safety").
// den: the decaying mode's denominator; NaN for the constant mode's Cholesky.
template <class T>
[[noreturn]] void throw_mesa_breakdown(const char* where, long t, T den, const T* kt, long d, T gamma, T lambda,
                                       MesaRegularizer regularizer, bool has_initial) {
  double k2 = 0;
  for (long i = 0; i < d; ++i) k2 += double(kt[i]) * double(kt[i]);
  std::ostringstream os;
  os.precision(4);
  os << where << ": numerical breakdown at position t = " << t << " (0-based, within this call): ";
  if (regularizer == MesaRegularizer::decaying) {
    const double lo = double(gamma) / 2, hi = double(gamma) / double(std::numeric_limits<T>::epsilon());
    os << "the Sherman-Morrison denominator gamma + k_t.R_{t-1} k_t = " << double(den) << " is outside [gamma/2, "
       << "gamma/epsilon] = [" << lo << ", " << hi << "] (";
    if (std::isfinite(double(den)) && double(den) > hi)
      os << "the update cancelled every significant digit of R in the direction of k_t";
    else
      os << "it is >= gamma while R is positive definite: R lost positive definiteness, or k_t is not finite";
    os << ")";
  } else {
    os << "the Cholesky factorisation of P_t = gamma P_{t-1} + k_t k_t^T + (1 - gamma)/lambda I failed or gave a "
       << "non-finite pivot (P_t is positive definite in exact arithmetic; P_t lost it to rounding, or k_t is not finite)";
  }
  os << "; lambda |k_t|^2 = " << double(lambda) * k2 << " (lambda = " << double(lambda) << ", |k_t|^2 = " << k2
     << ", gamma = " << double(gamma) << ", " << scalar_name<T>() << ")";
  if (has_initial) os << ", started from a given initial state";
  os << ". See docs/mesa.md, \"Numerical safety\", for the safe range of lambda |k|^2: use double, a smaller "
     << "lambda or normalised keys";
  if (regularizer == MesaRegularizer::decaying && gamma < T(1))
    os << ", or MesaRegularizer::constant (with gamma < 1 the decaying ridge lets R grow like gamma^-t in "
       << "directions no key spans)";
  os << ".";
  throw MesaBreakdownError(os.str(), t);
}

}  // namespace detail

// The automatic checkpoint interval: minimises the cache's size
//   (ceil(seq_len/C)) (d^2 + d)  +  4 C d      (R checkpoints + per-chunk vectors)
// at C = sqrt(seq_len (d + 1) / 4), i.e. about sqrt(seq_len) times a constant;
// clamped to [1, seq_len]. dv does not enter: the cache keeps S only at the
// start (the backward sweeps S over the whole sequence from S_0, docs/mesa.md).
inline long mesa_auto_chunk(long seq_len, long d, long /*dv*/) {
  const double c = std::sqrt(static_cast<double>(seq_len) * static_cast<double>(d + 1) / 4.0);
  return std::clamp(static_cast<long>(std::lround(c)), 1L, std::max(seq_len, 1L));
}

// The empty state (M5): R = lambda I (d x d), S = 0 (dv x d).
template <class T>
MesaState<T> mesa_initial_state(long d, long dv, const MesaOptions<T>& opt) {
  const char* where = "mesa_initial_state";
  detail::check_positive_size(where, "d", d);
  detail::check_positive_size(where, "dv", dv);
  detail::check_mesa_lambda(where, "opt.lambda", opt.lambda);
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
// R (d x d) and the gain w of token cC+1 (d; kernels/sherman_morrison.hpp,
// computed in the update of the token before it); S^T (d x dv) only for checkpoint 0 (the
// backward sweeps S from S_0); nothing per token. Checkpoint 0 is the initial
// state. With MesaRegularizer::constant a checkpoint holds P = R^{-1} (d x d)
// instead of R and w (the per-token Cholesky factors are recomputed chunk by
// chunk, like R in the decaying mode, rather than stored: T d^2/2 numbers
// would defeat the checkpointing), and the cache
// keeps a copy of the initial R_0 to check the backward's `initial` against.
// A forward that throws leaves the cache unusable (length() = 0).
template <class T>
class MesaCache {
 public:
  // Bytes held by the cache (checkpoints and scratch, by capacity).
  std::size_t bytes() const {
    std::size_t n = solver_.capacity();
    for (const auto* b : {&ck_R_, &ck_St_, &ck_w_, &init_R_, &R_, &St_, &w_, &w_next_, &ch_a_, &ch_da_, &ch_dq_, &ch_Mk_,
                          &Gt_, &G_, &M_})
      n += b->capacity();
    return n * sizeof(T);
  }
  long length() const { return T_; }         // seq_len of the last complete forward, 0 before any
  long key_dim() const { return d_; }        // d
  long value_dim() const { return dv_; }     // dv
  long chunk() const { return C_; }          // the checkpoint interval C used
  long num_checkpoints() const { return T_ > 0 ? (T_ + C_ - 1) / C_ : 0; }
  T lambda() const { return lambda_; }       // lambda of the last forward
  T forget() const { return forget_; }       // gamma of the last forward
  MesaRegularizer regularizer() const { return regularizer_; }  // regulariser of the last forward
  bool has_initial_state() const { return has_initial_; }  // the last forward started from a given state

 private:
  friend struct detail::MesaCacheAccess;

  long T_ = 0, d_ = 0, dv_ = 0, C_ = 1;
  T lambda_ = T(0), forget_ = T(0);
  MesaRegularizer regularizer_ = MesaRegularizer::decaying;
  bool has_initial_ = false;
  std::vector<T> ck_R_, ck_w_;                     // checkpoints (ck_R_: P in the constant mode; ck_w_: decaying only)
  std::vector<T> ck_St_;                           // S_0^T (d x dv), the S the forward started from
  std::vector<T> init_R_;                          // constant mode with an initial state: R_0 as the forward used it
  std::vector<T> R_, St_, w_, w_next_;             // running state: R, S^T (the backward keeps S, dv x d), this and the next token's gain
  std::vector<T> ch_a_, ch_da_, ch_dq_, ch_Mk_;    // a_t, da_t, dq_t, M_t k_t of one chunk (C x d each)
  std::vector<T> Gt_, G_, M_;                      // reverse accumulators G^T (d x dv), G (dv x d), M (d x d)
  detail::MesaPrecisionSolver<T> solver_;          // constant mode: P_t and its Cholesky factor
};

namespace detail {

// Shared argument checks of forward and backward.
template <class T>
void check_mesa_args(const char* where, const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                     const ConstMatrixRef<T>& v, const MesaOptions<T>& opt) {
  check_sequence_inputs<T>(where, q, k, v);
  check_mesa_lambda(where, "opt.lambda", opt.lambda);
  check_mesa_forget(where, "opt.forget", opt.forget);
  if (opt.chunk < 0) fail(where, "opt.chunk must be >= 0 (0 = automatic), got ", opt.chunk);
  check_mesa_regularizer(where, "opt.regularizer", opt.regularizer);
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
  // The forward (M7-M9, M15; M20 for the constant regulariser), writing checkpoints into c.
  template <class T>
  static void forward(const char* where, const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                      const ConstMatrixRef<T>& v, const MesaOptions<T>& opt, MatrixRef<T>& out, MesaCache<T>& c,
                      const MesaState<identity_t<T>>* initial, MesaState<identity_t<T>>* final) {
    const long n = q.rows(), d = q.cols(), dv = v.cols();
    const long C = opt.chunk > 0 ? std::min(opt.chunk, n) : mesa_auto_chunk(n, d, dv);
    const long nck = (n + C - 1) / C;
    const std::size_t dd = static_cast<std::size_t>(d), ddv = static_cast<std::size_t>(dv);
    c.T_ = 0;  // unusable until this forward completes: a breakdown throws mid-way
    c.d_ = d;
    c.dv_ = dv;
    c.C_ = C;
    c.lambda_ = opt.lambda;
    c.forget_ = opt.forget;
    c.regularizer_ = opt.regularizer;
    c.has_initial_ = initial != nullptr;
    c.ck_R_.resize(nck * dd * dd);
    c.St_.assign(dd * ddv, T(0));
    c.ch_a_.resize(std::size_t(C) * dd);
    T* St = c.St_.data();
    if (initial != nullptr) {  // (M15) S_0 given, stored transposed
      for (std::size_t i = 0; i < dd; ++i)
        for (std::size_t j = 0; j < ddv; ++j) St[i * ddv + j] = initial->S(long(j), long(i));
    }
    c.ck_St_.assign(St, St + dd * ddv);
    if (opt.regularizer == MesaRegularizer::constant)
      forward_constant<T>(where, q, k, v, opt, out, c, initial, final);
    else
      forward_decaying<T>(where, q, k, v, opt, out, c, initial, final);
    c.T_ = n;
  }

  // (M8-M9) for tokens [t0, t1): S_t = gamma S_{t-1} + v_t k_t^T, o_t = S_t a_t,
  // with the chunk's a_t in c.ch_a_ and S^T in c.St_ (d x dv), carried across chunks.
  template <class T>
  static void sweep_chunk_outputs(MesaCache<T>& c, long t0, long t1, const ConstMatrixRef<T>& k,
                                  const ConstMatrixRef<T>& v, T gamma, MatrixRef<T>& out) {
    const long ldk = k.outerStride(), ldv = v.outerStride(), ldo = out.outerStride();
    kernels::state_sweep<T>(std::size_t(t1 - t0), std::size_t(c.d_), std::size_t(c.dv_), c.St_.data(),
                            std::size_t(c.dv_), gamma, k.data() + t0 * ldk, std::size_t(ldk), v.data() + t0 * ldv,
                            std::size_t(ldv), c.ch_a_.data(), std::size_t(c.d_), out.data() + t0 * ldo,
                            std::size_t(ldo), /*reverse=*/false);
  }

  // One token of the decaying recursion (M7, M9), the same calls in the
  // forward and in the backward's recompute, so the recompute has the
  // forward's bits: R <- R/gamma - w w^T and a = R q (with x: y = R x, the
  // backward's dq), and, unless this is the last token (k_next null), the
  // next token's gain into w_next, after which w and w_next swap. Returns
  // den_{t+1} = gamma + k_next . R k_next (gamma without a next token).
  template <class T>
  static T advance_token(std::size_t d, T* R, T*& w, T*& w_next, T inv_gamma, T gamma, const T* q,
                         const T* k_next, T* a, const T* x = nullptr, T* y = nullptr) {
    if (k_next == nullptr) {
      kernels::sherman_morrison_update<T>(d, R, d, w, inv_gamma, q, nullptr, a, nullptr, x, y);
      return gamma;
    }
    const T den = kernels::sherman_morrison_update_gain(d, R, d, w, inv_gamma, q, k_next, gamma, a, w_next, w_next,
                                                        x, y);  // u_{t+1} = R_t k_{t+1} in w_next, then w_{t+1}
    std::swap(w, w_next);
    return den;
  }

  // The Sherman-Morrison recursion (M7, M15) with the denominator test; M8-M9 by chunks.
  template <class T>
  static void forward_decaying(const char* where, const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                               const ConstMatrixRef<T>& v, const MesaOptions<T>& opt, MatrixRef<T>& out,
                               MesaCache<T>& c, const MesaState<identity_t<T>>* initial,
                               MesaState<identity_t<T>>* final) {
    const long n = q.rows(), d = q.cols(), dv = v.cols();
    const long ldq = q.outerStride(), ldk = k.outerStride();
    const long C = c.C_;
    const std::size_t dd = static_cast<std::size_t>(d);
    const long nck = (n + C - 1) / C;
    c.ck_w_.resize(nck * dd);
    c.R_.assign(dd * dd, T(0));
    c.w_.resize(dd);
    c.w_next_.resize(dd);
    const T gamma = opt.forget;
    const T inv_gamma = T(1) / gamma;  // exactly 1 without forgetting: the kernels skip the scaling
    // Breakdown bounds of den_t (docs/mesa.md, "Numerical safety"): one compare pair per token.
    const T den_lo = gamma / T(2), den_hi = gamma / std::numeric_limits<T>::epsilon();
    T* R = c.R_.data();
    T* St = c.St_.data();
    T* w = c.w_.data();            // token t's gain
    T* w_next = c.w_next_.data();  // token t+1's (u_{t+1} = R_t k_{t+1} first, then w_{t+1} in place)
    const T* q0 = q.data();
    const T* k0 = k.data();
    if (initial != nullptr) {  // (M15) R_0 given; u_1 = R_0 k_1
      symmetrised_copy(initial->R, R);
      kernels::gemv(dd, dd, R, dd, k0, w_next);
    } else {  // R_0 = lambda I, S_0 = 0, so u_1 = R_0 k_1 = lambda k_1.
      for (std::size_t i = 0; i < dd; ++i) {
        R[i * dd + i] = opt.lambda;
        w_next[i] = opt.lambda * k0[i];
      }
    }
    const T den_first = kernels::sherman_morrison_gain(dd, k0, w_next, gamma, w);
    if (!mesa_denominator_ok(den_first, den_lo, den_hi))
      throw_mesa_breakdown<T>(where, 0, den_first, k0, d, gamma, opt.lambda, opt.regularizer, initial != nullptr);
    for (long t0 = 0; t0 < n; t0 += C) {
      const long t1 = std::min(n, t0 + C), ck = t0 / C;
      // checkpoint: R after t0 tokens and the gain w of the next one
      std::copy(R, R + dd * dd, c.ck_R_.data() + ck * dd * dd);
      std::copy(w, w + dd, c.ck_w_.data() + ck * dd);
      for (long t = t0; t < t1; ++t) {
        // (M7) R_t = (R_{t-1} - u u^T / (gamma + k.u)) / gamma = R_{t-1}/gamma - w w^T; a_t = R_t q_t;
        // and in the same pass u_{t+1} = R_t k_{t+1}, den_{t+1} and w_{t+1}
        const T* knext = t + 1 < n ? k0 + (t + 1) * ldk : nullptr;
        T* a = c.ch_a_.data() + (t - t0) * dd;
        const T den = advance_token(dd, R, w, w_next, inv_gamma, gamma, q0 + t * ldq, knext, a);
        if (knext != nullptr && !mesa_denominator_ok(den, den_lo, den_hi))
          throw_mesa_breakdown<T>(where, t + 1, den, knext, d, gamma, opt.lambda, opt.regularizer, initial != nullptr);
      }
      sweep_chunk_outputs(c, t0, t1, k, v, gamma, out);  // (M8-M9)
    }
    if (final != nullptr) {
      final->R = Eigen::Map<const RowMatrix<T>>(R, d, d);
      final->S = Eigen::Map<const RowMatrix<T>>(St, d, dv).transpose();
    }
  }

  // The constant regulariser (M20): P_t = gamma P_{t-1} + k k^T + (1 - gamma)/lambda I,
  // refactorised per token (ops/mesa_constant.hpp); checkpoints hold P and S^T.
  template <class T>
  static void forward_constant(const char* where, const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                               const ConstMatrixRef<T>& v, const MesaOptions<T>& opt, MatrixRef<T>& out,
                               MesaCache<T>& c, const MesaState<identity_t<T>>* initial,
                               MesaState<identity_t<T>>* final) {
    const long n = q.rows(), d = q.cols(), dv = v.cols();
    const long ldq = q.outerStride(), ldk = k.outerStride();
    const long C = c.C_;
    const std::size_t dd = static_cast<std::size_t>(d);
    const T gamma = opt.forget;
    const T ridge = (T(1) - gamma) / opt.lambda;  // (M20) the ridge added per token; 0 at gamma = 1
    MesaPrecisionSolver<T>& P = c.solver_;
    c.ck_w_.clear();
    if (initial != nullptr) {  // (M15) P_0 = R_0^{-1}
      c.init_R_.resize(dd * dd);
      symmetrised_copy(initial->R, c.init_R_.data());
      if (!P.set_inverse_of(Eigen::Map<const RowMatrix<T>>(c.init_R_.data(), d, d)))
        fail(where, "initial.R is not positive definite (its Cholesky factorisation failed); ",
             "MesaRegularizer::constant inverts it to start the recursion");
    } else {  // P_0 = I / lambda
      c.init_R_.clear();
      P.set_identity_over(d, opt.lambda);
    }
    T* St = c.St_.data();
    for (long t0 = 0; t0 < n; t0 += C) {
      const long t1 = std::min(n, t0 + C), ck = t0 / C;
      std::copy(P.data(), P.data() + dd * dd, c.ck_R_.data() + ck * dd * dd);  // checkpoint: P after t0 tokens
      for (long t = t0; t < t1; ++t) {
        const T* kt = k.data() + t * ldk;
        if (!P.advance(kt, gamma, ridge))  // (M20) P_t and its Cholesky factor
          throw_mesa_breakdown<T>(where, t, std::numeric_limits<T>::quiet_NaN(), kt, d, gamma, opt.lambda,
                                  opt.regularizer, initial != nullptr);
        P.solve(q.data() + t * ldq, c.ch_a_.data() + (t - t0) * dd);  // a_t = P_t^{-1} q_t = R_t q_t
      }
      sweep_chunk_outputs(c, t0, t1, k, v, gamma, out);  // (M8-M9)
    }
    if (final != nullptr) {
      P.inverse(final->R);  // R_T = P_T^{-1}: the state means the same in both modes
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
    symmetrised_copy(initial->R, R0.data());  // what the forward stored as checkpoint 0 (constant mode: as init_R_)
    const T* used = c.regularizer_ == MesaRegularizer::constant ? c.init_R_.data() : c.ck_R_.data();
    if (!std::equal(R0.begin(), R0.end(), used))
      fail(where, "initial.R differs from the R_0 the forward used (pass the same initial as to mesa_forward)");
    for (long i = 0; i < d; ++i)
      for (long j = 0; j < dv; ++j)
        if (c.ck_St_[std::size_t(i * dv + j)] != initial->S(j, i))
          fail(where, "initial.S differs from the S_0 the forward used (pass the same initial as to mesa_forward)");
  }

  // The backward sweep (M10-M12, M16-M18; M21-M22 for the constant regulariser); returns dL/dlambda.
  // 1. da_t = S_t^T g_t for every t: one forward sweep of S (dv x d) from S_0,
  //    written into dq's rows (M10; da depends on S alone, not on R).
  // 2. For each chunk, last first: recompute R_t (P_t) and a_t from the chunk's
  //    checkpoint with the forward's kernels (bitwise the forward's), then
  //    dq_t = R_t da_t; then the reverse sweep (M11) over the chunk: G^T, G and
  //    M as three reverse sweeps (dv_t = G_t k_t, G_t^T v_t, M_t k_t).
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
    const bool constant = c.regularizer_ == MesaRegularizer::constant;
    const T ridge = (T(1) - gamma) / opt.lambda;  // constant mode (M20): the forward's per-token ridge
    c.ch_a_.resize(C * dd);
    c.ch_da_.resize(C * dd);
    c.ch_dq_.resize(C * dd);
    c.ch_Mk_.resize(C * dd);
    c.Gt_.assign(dd * ddv, T(0));
    c.G_.assign(ddv * dd, T(0));
    c.M_.assign(dd * dd, T(0));
    c.St_.resize(dd * ddv);
    if (!constant) {
      c.R_.resize(dd * dd);
      c.w_.resize(dd);
      c.w_next_.resize(dd);
    }
    T* R = c.R_.data();
    T* S = c.St_.data();  // S (dv x d): the backward's sweep runs on S, not S^T
    T* Gt = c.Gt_.data();
    T* G = c.G_.data();
    T* M = c.M_.data();
    MesaPrecisionSolver<T>& P = c.solver_;
    const T* q0 = q.data();
    const T* k0 = k.data();
    const T* v0 = v.data();
    const T* g0 = dout.data();
    // forward: o_t = S_t a_t, S_t = gamma S_{t-1} + v_t k_t^T   =>   da_t = S_t^T g_t   (M10), into dq's rows
    for (std::size_t i = 0; i < dd; ++i)
      for (std::size_t j = 0; j < ddv; ++j) S[j * dd + i] = c.ck_St_[i * ddv + j];
    kernels::state_sweep<T>(std::size_t(n), ddv, dd, S, dd, gamma, v0, std::size_t(ldv), k0, std::size_t(ldk), g0,
                            std::size_t(ldg), dq.data(), std::size_t(lddq), /*reverse=*/false);
    // Scalar sums in double: they add seq_len terms of mixed sign.
    double dlambda_sum = 0;  // decaying: sum_t gamma^t (a_t . dq_t)            (M12)
    double dgamma_sum = 0;   // sum_t t c_t (+ the final state's term)            (M18, M22)
    // Constant mode (M21-M22): tau_t = tr(M_t) = 2 a_t.dq_t + gamma tau_{t+1}, and its sums.
    double tau = 0, tau_sum = 0, t_tau_sum = 0;
    for (long ck = nck - 1; ck >= 0; --ck) {
      const long t0 = ck * C, t1 = std::min(n, t0 + C);
      // Recompute the chunk's R_t (P_t) and a_t from its checkpoint. The same
      // kernels on the same state reproduce the forward's bitwise.
      if (constant) {
        P.set(d, c.ck_R_.data() + ck * dd * dd);
      } else {
        std::copy(c.ck_R_.data() + ck * dd * dd, c.ck_R_.data() + (ck + 1) * dd * dd, R);
        std::copy(c.ck_w_.data() + ck * dd, c.ck_w_.data() + (ck + 1) * dd, c.w_.data());
      }
      T* w = c.w_.data();            // token t's gain (decaying mode)
      T* w_next = c.w_next_.data();  // token t+1's
      double gamma_pow = std::pow(static_cast<double>(gamma), static_cast<double>(t0 + 1));  // gamma^t, t 1-based
      for (long t = t0; t < t1; ++t) {
        T* a = c.ch_a_.data() + (t - t0) * dd;
        T* da = c.ch_da_.data() + (t - t0) * dd;
        T* dqt = c.ch_dq_.data() + (t - t0) * dd;
        const T* kt = k0 + t * ldk;
        std::copy(dq.data() + t * lddq, dq.data() + t * lddq + d, da);  // da_t from step 1
        if (constant) {
          if (!P.advance(kt, gamma, ridge))  // the forward passed on the same data; kept as a safety net
            throw_mesa_breakdown<T>("mesa_backward", t, std::numeric_limits<T>::quiet_NaN(), kt, d, gamma,
                                    opt.lambda, opt.regularizer, c.has_initial_);
          P.solve(q0 + t * ldq, a);
          // forward: a_t = R_t q_t   =>   dq_t = R_t da_t   (M10)
          P.solve(da, dqt);
        } else {
          // forward: a_t = R_t q_t   =>   dq_t = R_t da_t   (M10), in the same pass over R,
          // with the forward's own calls (its bits: the same R_t, a_t and w_{t+1})
          advance_token(dd, R, w, w_next, inv_gamma, gamma, q0 + t * ldq, t + 1 < n ? kt + ldk : nullptr, a, da, dqt);
          // forward: R_0 = lambda I enters R_t^{-1} as gamma^t / lambda I   =>  (M12)
          dlambda_sum += gamma_pow * static_cast<double>(kernels::dot(a, dqt, dd));
          gamma_pow *= static_cast<double>(gamma);
        }
        std::copy(dqt, dqt + dd, dq.data() + t * lddq);
      }
      if (ck == nck - 1 && grad_final != nullptr) {
        // R now holds R_T (constant mode: R_T = P_T^{-1} from the last factor), S holds S_T
        // (step 1). (M16): G_{T+1} = Sbar / gamma, M_{T+1} = 2 R_T sym(Rbar) R_T / gamma;
        // their terms of M17 and M18 (M21-M22).
        RowMatrix<T> RT_constant;
        if (constant) P.inverse(RT_constant);
        const Eigen::Map<const RowMatrix<T>> RT(constant ? RT_constant.data() : R, d, d), ST(S, dv, d);
        const RowMatrix<T> Rbar = (grad_final->R + grad_final->R.transpose()) / T(2);
        const RowMatrix<T> Minit = (T(2) * inv_gamma) * (RT * Rbar * RT);
        Eigen::Map<RowMatrix<T>>(M, d, d) = (Minit + Minit.transpose()) / T(2);
        Eigen::Map<RowMatrix<T>>(Gt, d, dv) = inv_gamma * grad_final->S.transpose();
        Eigen::Map<RowMatrix<T>>(G, dv, d) = inv_gamma * grad_final->S;
        const double RRbar = (RT.template cast<double>() * RT.template cast<double>())
                                 .cwiseProduct(Rbar.template cast<double>())
                                 .sum();  // tr(R_T Rbar R_T)
        if (constant)
          tau = 2.0 * RRbar / static_cast<double>(gamma);  // tau_{T+1} = tr(M_{T+1})
        else
          dlambda_sum += std::pow(static_cast<double>(gamma), static_cast<double>(n)) * RRbar;
        const double SbarS = grad_final->S.template cast<double>().cwiseProduct(ST.template cast<double>()).sum();
        const double RbarR = grad_final->R.template cast<double>().cwiseProduct(RT.template cast<double>()).sum();
        dgamma_sum += static_cast<double>(n) * (SbarS - RbarR);
      }
      // Reverse sweep over the chunk (M11), G and M carried across chunks:
      //   G_t = g_t a_t^T + gamma G_{t+1},  M_t = dq_t a_t^T + a_t dq_t^T + gamma M_{t+1}
      // forward: S_t = sum_i gamma^{t-i} v_i k_i^T   =>  dv_t = G_t k_t, dk_t = G_t^T v_t - M_t k_t
      const std::size_t nc = std::size_t(t1 - t0);
      kernels::state_sweep<T>(nc, dd, ddv, Gt, ddv, gamma, c.ch_a_.data(), dd, g0 + t0 * ldg, std::size_t(ldg),
                              k0 + t0 * ldk, std::size_t(ldk), grad_v.data() + t0 * lddv, std::size_t(lddv),
                              /*reverse=*/true);  // G^T <- gamma G^T + a g^T;  dv = G k
      kernels::state_sweep<T>(nc, ddv, dd, G, dd, gamma, g0 + t0 * ldg, std::size_t(ldg), c.ch_a_.data(), dd,
                              v0 + t0 * ldv, std::size_t(ldv), dk.data() + t0 * lddk, std::size_t(lddk),
                              /*reverse=*/true);  // G <- gamma G + g a^T;  dk = G^T v
      // forward: R_t^{-1} = sum_i gamma^{t-i} k_i k_i^T + ...   =>  dk_t -= M_t k_t
      // (M <- gamma M + dq a^T + a dq^T;  M k)
      kernels::rank2_sweep<T>(nc, dd, M, dd, gamma, c.ch_dq_.data(), dd, c.ch_a_.data(), dd, k0 + t0 * ldk,
                              std::size_t(ldk), c.ch_Mk_.data(), dd, /*reverse=*/true);
      for (long t = t1 - 1; t >= t0; --t) {
        const T* a = c.ch_a_.data() + (t - t0) * dd;
        const T* da = c.ch_da_.data() + (t - t0) * dd;
        const T* dqt = c.ch_dq_.data() + (t - t0) * dd;
        const T* Mk = c.ch_Mk_.data() + (t - t0) * dd;
        const T* kt = k0 + t * ldk;
        const T* vt = v0 + t * ldv;
        const T* dvt = grad_v.data() + t * lddv;
        T* dkt = dk.data() + t * lddk;
        for (std::size_t i = 0; i < dd; ++i) dkt[i] -= Mk[i];
        if (constant) {
          // (M21) tau_t = tr(M_t): the ridge's adjoint (P_t has the term (1 - gamma)/lambda I for every t)
          tau = 2.0 * static_cast<double>(kernels::dot(a, dqt, dd)) + static_cast<double>(gamma) * tau;
          tau_sum += tau;
          t_tau_sum += static_cast<double>(t + 1) * tau;
        }
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
    const double lam = static_cast<double>(opt.lambda), gam = static_cast<double>(gamma);
    if (dforget != nullptr) {
      if (constant)  // (M22) dL/dgamma = (1/gamma)[sum_t t (c_t + (1-gamma)/(2 lambda) tau_t) + ...] + sum_t tau_t / (2 lambda)
        *dforget = static_cast<T>((dgamma_sum + 0.5 * ((1.0 - gam) / lam) * t_tau_sum) / gam + tau_sum / (2.0 * lam));
      else
        *dforget = static_cast<T>(dgamma_sum / gam);
    }
    if (grad_initial != nullptr) {
      // (M17) dL/dS_0 = gamma G_1,  dL/dR_0 = gamma/2 R_0^{-1} M_1 R_0^{-1}
      const Eigen::Map<const RowMatrix<T>> M1(M, d, d), G1(G, dv, d), R0(c.ck_R_.data(), d, d);
      grad_initial->S = gamma * G1;
      RowMatrix<T> X;
      if (constant) {  // checkpoint 0 holds P_0 = R_0^{-1} (symmetric)
        X = R0 * M1 * R0;
      } else if (c.has_initial_) {
        const Eigen::LLT<RowMatrix<T>> llt(R0);
        if (llt.info() != Eigen::Success)
          fail("mesa_backward", "initial.R is not positive definite (its Cholesky factorisation failed)");
        X = llt.solve(RowMatrix<T>(llt.solve(M1).transpose())).transpose();
      } else {
        X = M1 / (opt.lambda * opt.lambda);
      }
      grad_initial->R = (gamma / T(4)) * (X + X.transpose());
    }
    if (constant) {
      // (M21) dL/dlambda = (1 - gamma)/(2 lambda^2) sum_t tau_t  [+ gamma tau_1 / (2 lambda^2) from P_0 = I/lambda]
      const double from_ridge = (1.0 - gam) / (2.0 * lam * lam) * tau_sum;
      const double from_P0 = c.has_initial_ ? 0.0 : gam * tau / (2.0 * lam * lam);
      return static_cast<T>(from_ridge + from_P0);
    }
    if (c.has_initial_) return T(0);
    return static_cast<T>(dlambda_sum / (lam * lam));
  }
};

}  // namespace detail

// Forward pass of the mesa op (M5-M9, M15; M20 with MesaRegularizer::constant), one head, one sequence.
//   q, k : (seq_len, d), one token per row;  v : (seq_len, dv);  out : (seq_len, dv), pre-sized, written.
// Throws std::invalid_argument on mismatched shapes, seq_len, d or dv = 0, lambda not
// finite, > 0 and normal, forget outside (0, 1] or subnormal, chunk < 0, an unknown
// regularizer, and an initial state of the wrong shape, non-finite or not
// symmetric (constant mode: or not positive definite). Throws MesaBreakdownError
// (std::runtime_error) when rounding destroys the recursion at some token
// (docs/mesa.md, "Numerical safety"); `out` is then partly written, `final` is
// not, and the cache is unusable. Fills `cache` for mesa_backward.
template <class T>
void mesa_forward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v, const MesaOptions<T>& opt,
                  MatrixRef<T> out, MesaCache<T>& cache, const MesaState<identity_t<T>>* initial = nullptr,
                  MesaState<identity_t<T>>* final = nullptr) {
  constexpr const char* where = "mesa_forward";
  detail::check_mesa_args<T>(where, q, k, v, opt);
  detail::check_output<T>(where, "out", out, q.rows(), v.cols());
  detail::check_output_distinct<T>(where, out, q, k, v);
  if (initial != nullptr) detail::check_mesa_initial_state(where, *initial, q.cols(), v.cols());
  detail::MesaCacheAccess::forward<T>(where, q, k, v, opt, out, cache, initial, final);
}

// Backward pass (M10-M12, M16-M18; M21-M22 with MesaRegularizer::constant),
// given dout = dL/dout (seq_len, dv) and the cache of mesa_forward on the same
// q, k, v, options and initial state.
// Writes (does not accumulate) dq, dk : (seq_len, d) and grad_v : (seq_len,
// dv); returns dL/dlambda (decaying mode: 0 when the forward started from an
// initial state, which replaces lambda; constant mode: lambda also enters every
// token's ridge, so it is not 0 then unless gamma = 1);
// if dforget != nullptr writes dL/dgamma there; grad_final (optional) is
// dL/d(final state); grad_initial (optional) receives dL/d(initial state).
// The cache is only read (its checkpoints) and used for scratch: backward may
// be called several times after one forward. The checkpoint interval is the
// forward's (cache.chunk()); opt.chunk is ignored here. Throws
// std::invalid_argument on bad shapes, on a cache from a different seq_len, d,
// dv, lambda, forget or regularizer, and on an initial state other than the forward's.
template <class T>
T mesa_backward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v, const MesaOptions<T>& opt,
                ConstMatrixRef<T> dout, MesaCache<T>& cache, MatrixRef<T> dq, MatrixRef<T> dk, MatrixRef<T> grad_v,
                identity_t<T>* dforget = nullptr, const MesaState<identity_t<T>>* initial = nullptr,
                const MesaState<identity_t<T>>* grad_final = nullptr, MesaState<identity_t<T>>* grad_initial = nullptr) {
  constexpr const char* where = "mesa_backward";
  detail::check_mesa_args<T>(where, q, k, v, opt);
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  detail::check_gradient_shapes<T>(where, n, d, dv, dout, dq, dk, grad_v);
  detail::check_gradients_distinct<T>(where, q, k, v, dout, dq, dk, grad_v);
  if (cache.length() != n || cache.key_dim() != d || cache.value_dim() != dv) {
    detail::fail(where, "cache is for seq_len = ", cache.length(), ", d = ", cache.key_dim(), ", dv = ",
                 cache.value_dim(), " but the inputs have seq_len = ", n, ", d = ", d, ", dv = ", dv,
                 " (run mesa_forward on these inputs first)");
  }
  if (cache.lambda() != opt.lambda || cache.forget() != opt.forget) {
    detail::fail(where, "cache was made with lambda = ", cache.lambda(), ", forget = ", cache.forget(),
                 " but opt has lambda = ", opt.lambda, ", forget = ", opt.forget);
  }
  if (cache.regularizer() != opt.regularizer) {
    const auto name = [](MesaRegularizer r) { return r == MesaRegularizer::constant ? "constant" : "decaying"; };
    detail::fail(where, "cache was made with regularizer = ", name(cache.regularizer()), " but opt has regularizer = ",
                 name(opt.regularizer));
  }
  detail::MesaCacheAccess::check_same_initial<T>(where, cache, initial);
  if (grad_final != nullptr) detail::check_mesa_state(where, "grad_final", *grad_final, d, dv);
  return detail::MesaCacheAccess::backward<T>(q, k, v, opt, dout, cache, dq, dk, grad_v, dforget, grad_final,
                                              grad_initial);
}

// One decoding step (M15 for one token): u = R k, R <- (R - u u^T/(gamma + k.u))/gamma,
// S <- gamma S + v k^T, out = S R q. With MesaRegularizer::constant (M20):
// P = R^{-1}, P <- gamma P + k k^T + (1 - gamma)/lambda I, R <- P^{-1}, by
// Cholesky (O(d^3): two factorisations and an inverse; each step's inversions
// add a relative error of about epsilon cond(R)). q, k have d entries, v and
// out dv; the state starts as mesa_initial_state(d, dv, opt) (or any state a
// forward returned, with the same regulariser). Throws MesaBreakdownError
// (position 0) when the update breaks down, leaving the state unchanged.
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
  detail::check_token_output_distinct(where, q, k, v, out);
  detail::check_mesa_lambda(where, "opt.lambda", opt.lambda);
  detail::check_mesa_forget(where, "opt.forget", opt.forget);
  detail::check_mesa_regularizer(where, "opt.regularizer", opt.regularizer);
  const std::size_t dd = std::size_t(d), ddv = std::size_t(dv);
  const T gamma = opt.forget;
  Vector<T> a(d);
  if (opt.regularizer == MesaRegularizer::constant) {
    detail::MesaPrecisionSolver<T> P;
    if (!P.set_inverse_of(state.R))
      detail::fail(where, "state.R is not positive definite (its Cholesky factorisation failed)");
    if (!P.advance(k.data(), gamma, (T(1) - gamma) / opt.lambda))  // (M20)
      detail::throw_mesa_breakdown<T>(where, 0, std::numeric_limits<T>::quiet_NaN(), k.data(), d, gamma, opt.lambda,
                                      opt.regularizer, false);
    P.solve(q.data(), a.data());  // a_t = P_t^{-1} q_t
    P.inverse(state.R);           // R_t = P_t^{-1}
  } else {
    Vector<T> u(d), w(d);
    kernels::gemv(dd, dd, state.R.data(), dd, k.data(), u.data());                       // u = R_{t-1} k_t
    const T den = kernels::sherman_morrison_gain(dd, k.data(), u.data(), gamma, w.data());  // (M7)
    if (!detail::mesa_denominator_ok(den, gamma / T(2), gamma / std::numeric_limits<T>::epsilon()))
      detail::throw_mesa_breakdown<T>(where, 0, den, k.data(), d, gamma, opt.lambda, opt.regularizer, false);
    kernels::sherman_morrison_update(dd, state.R.data(), dd, w.data(), T(1) / gamma, q.data(),
                                     static_cast<const T*>(nullptr), a.data(), static_cast<T*>(nullptr));  // R_t, a_t = R_t q_t
  }
  // (M8-M9) S (dv x d) <- gamma S + v k^T, out = S a: the transposed use of the state kernel.
  kernels::state_update_dot(ddv, dd, state.S.data(), dd, gamma, v.data(), k.data(), a.data(), out.data());
}

// Overloads for float and double of the step (the sequence functions deduce T from the options).
// Each overload is a template on an unused int parameter (template <int = 0>):
// as a plain inline function it would instantiate the float and the double op
// in every translation unit that includes this header, called or not (GCC
// spent about 15 s parsing mesaopt/ops.hpp that way; docs/building.md); a
// template is instantiated only where it is called. f<float>(...) still names
// the generic template (a type is not an int), and a call with the exact Ref
// types picks the overload as the more specialised template.
#define MESAOPT_MESA_OVERLOADS(S)                                                                              \
  template <int = 0> inline void mesa_step(ConstVectorRef<S> q, ConstVectorRef<S> k, ConstVectorRef<S> v, const MesaOptions<S>& opt, \
                        MesaState<S>& state, VectorRef<S> out) {                                                \
    mesa_step<S>(q, k, v, opt, state, out);                                                                    \
  }
MESAOPT_MESA_OVERLOADS(float)
MESAOPT_MESA_OVERLOADS(double)
#undef MESAOPT_MESA_OVERLOADS

}  // namespace mesaopt
