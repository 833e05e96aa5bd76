#pragma once
// The mesa op (MATH.md §3), one head, one sequence, functional:
//
//   W_t = argmin_W 1/2 sum_{i<=t} gamma^{t-i} ||v_i - W k_i||^2 + gamma^t/(2 lambda) ||W||_F^2
//       = S_t R_t,   R_t = (sum_{i<=t} gamma^{t-i} k_i k_i^T + gamma^t I / lambda)^{-1}     (M5)
//   o_t = W_t q_t = S_t R_t q_t                                                           (M6)
//
// gamma = opt.forget in (0, 1] is the forgetting factor (1 = none, the plain
// M5-M6). Forward: the Sherman-Morrison recursion (M7-M9) with the fused,
// bitwise-symmetric kernels of kernels/sherman_morrison.hpp and
// kernels/state_update.hpp. Backward: the reverse sweep (M10-M12) with
// checkpoints every C tokens; see docs/mesa.md for the derivation, the memory
// formula and measured precision.
//
// Usage (float or double):
//   mesaopt::MesaOptions<float> opt;  opt.lambda = 1.0f;  opt.forget = 1.0f;  opt.chunk = 0;
//   mesaopt::MesaCache<float> cache;
//   RowMatrix<float> out(T, dv);                       // outputs must be pre-sized
//   mesaopt::mesa_forward(q, k, v, opt, out, cache);
//   float dforget = 0;
//   float dlambda = mesaopt::mesa_backward(q, k, v, opt, dout, cache, dq, dk, dv_, &dforget);
//
// Thread safety: no global state. One cache per concurrently running sequence.
// Precision (docs/mesa.md): double matches the direct ridge solve to 1e-10;
// float32 stays within about 1e-5 relative of double up to T = 65536 (d = 32).
// R must stay positive definite: in float with extreme lambda |k|^2 the
// denominator gamma + k.u could round to <= 0 and produce NaN (not observed in
// the tested ranges, lambda |k|^2 up to 1600).
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/kernels/gemv.hpp>
#include <mesaopt/kernels/sherman_morrison.hpp>
#include <mesaopt/kernels/simd.hpp>
#include <mesaopt/kernels/state_update.hpp>
#include <mesaopt/kernels/vector_ops.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

namespace mesaopt {

template <class T>
struct MesaOptions;
template <class T>
class MesaCache;

namespace detail {
template <class T>
void mesa_forward_impl(const T*, long, const T*, long, const T*, long, T*, long, long, long, long,
                       const MesaOptions<T>&, MesaCache<T>&);
template <class T>
T mesa_backward_impl(const T*, long, const T*, long, const T*, long, const T*, long, T*, long, T*, long, T*, long,
                     long, long, long, const MesaOptions<T>&, MesaCache<T>&, T*);
}  // namespace detail

// Options of the mesa op.
template <class T>
struct MesaOptions {
  T lambda = T(1);  // ridge strength lambda > 0 of M5: R_0 = lambda I (larger = weaker regularisation)
  T forget = T(1);  // forgetting factor gamma in (0, 1]; 1 = no forgetting (MATH.md §3)
  long chunk = 0;   // checkpoint interval C for the backward pass; 0 = automatic (mesa_auto_chunk)
};

// The automatic checkpoint interval: minimises the cache's size
//   (ceil(T/C)) (d^2 + d dv + d)  +  3 C d      (checkpoints + per-chunk vectors)
// at C = sqrt(T (d + dv + 1) / 3), i.e. about sqrt(T) times a constant; clamped to [1, T].
inline long mesa_auto_chunk(long T, long d, long dv) {
  const double c = std::sqrt(static_cast<double>(T) * static_cast<double>(d + dv + 1) / 3.0);
  return std::clamp(static_cast<long>(std::lround(c)), 1L, std::max(T, 1L));
}

// What mesa_backward needs from mesa_forward, plus all scratch of both passes
// (reused across calls, so repeated calls with the same sizes do not allocate).
// Holds, per checkpoint c = 0 .. ceil(T/C)-1, the state after c*C tokens:
// R (d x d), S^T (d x dv) and u = R k_{cC+1} (d); nothing per token.
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
  long length() const { return T_; }         // T of the last forward, 0 before any
  long key_dim() const { return d_; }        // d
  long value_dim() const { return dv_; }     // dv
  long chunk() const { return C_; }          // the checkpoint interval C used
  long num_checkpoints() const { return T_ > 0 ? (T_ + C_ - 1) / C_ : 0; }
  T lambda() const { return lambda_; }       // lambda of the last forward
  T forget() const { return forget_; }       // gamma of the last forward

 private:
  template <class U>
  friend void detail::mesa_forward_impl(const U*, long, const U*, long, const U*, long, U*, long, long, long, long,
                                        const MesaOptions<U>&, MesaCache<U>&);
  template <class U>
  friend U detail::mesa_backward_impl(const U*, long, const U*, long, const U*, long, const U*, long, U*, long, U*,
                                      long, U*, long, long, long, long, const MesaOptions<U>&, MesaCache<U>&, U*);

  long T_ = 0, d_ = 0, dv_ = 0, C_ = 1;
  T lambda_ = T(0), forget_ = T(0);
  std::vector<T> ck_R_, ck_St_, ck_u_;             // checkpoints
  std::vector<T> R_, St_, u_, w_, a_, tmp_;        // running state
  std::vector<T> ch_a_, ch_da_, ch_dq_;            // a_t, da_t, dq_t of one chunk (C x d each)
  std::vector<T> Gt_, M_, Mk_;                     // reverse accumulators G^T (d x dv), M (d x d), M k
};

namespace detail {

// St <- scale St + k v^T (St is d x dv, row stride lds), then da = St g (= S^T g).
// Two passes would read St twice; here each row is updated and dotted with g
// while it is in registers.
template <class T>
void state_update_dot(std::size_t d, std::size_t dv, T* St, std::size_t lds, T scale, const T* k, const T* v,
                      const T* g, T* da) {
#if MESAOPT_SIMD
  using B = kernels::simd_batch<T>;
  constexpr std::size_t W = B::size;
  const bool scaled = scale != T(1);
  const B s(scale);
  for (std::size_t r = 0; r < d; ++r) {
    T* row = St + r * lds;
    const B kr(k[r]);
    // Two accumulators: two independent FMA chains per row.
    B acc0(T(0)), acc1(T(0));
    std::size_t j = 0;
    for (; j + 2 * W <= dv; j += 2 * W) {
      B x0 = B::load_unaligned(row + j), x1 = B::load_unaligned(row + j + W);
      if (scaled) {
        x0 = x0 * s;
        x1 = x1 * s;
      }
      x0 = xsimd::fma(kr, B::load_unaligned(v + j), x0);
      x1 = xsimd::fma(kr, B::load_unaligned(v + j + W), x1);
      x0.store_unaligned(row + j);
      x1.store_unaligned(row + j + W);
      acc0 = xsimd::fma(x0, B::load_unaligned(g + j), acc0);
      acc1 = xsimd::fma(x1, B::load_unaligned(g + j + W), acc1);
    }
    for (; j < dv; j += W) {
      const std::size_t n = std::min(W, dv - j);
      B x = n == W ? B::load_unaligned(row + j) : kernels::detail::load_partial(row + j, n);
      if (scaled) x = x * s;
      x = xsimd::fma(kr, n == W ? B::load_unaligned(v + j) : kernels::detail::load_partial(v + j, n), x);
      if (n == W) x.store_unaligned(row + j);
      else kernels::detail::store_partial(x, row + j, n);
      acc0 = xsimd::fma(x, n == W ? B::load_unaligned(g + j) : kernels::detail::load_partial(g + j, n), acc0);
    }
    da[r] = kernels::detail::horizontal_sum(acc0 + acc1);
  }
#else
  for (std::size_t r = 0; r < d; ++r) {
    T* row = St + r * lds;
    T acc = 0;
    for (std::size_t j = 0; j < dv; ++j) {
      row[j] = scale * row[j] + k[r] * v[j];
      acc += row[j] * g[j];
    }
    da[r] = acc;
  }
#endif
}

#if MESAOPT_SIMD
// Columns [j0, j0 + NB W) of M <- scale M + x y^T + y x^T and (M k)_j = sum_r k_r M_rj.
// x_j, y_j stay in registers for the whole column block: NB = 4 gives 4
// accumulators + 8 operands + 3 broadcasts = 15 of 16 AVX2 registers.
template <class T, std::size_t NB, bool Scaled>
void rank2_columns(std::size_t d, T* M, std::size_t ldm, T scale, const T* x, const T* y, const T* k, T* out,
                   std::size_t j0) {
  using B = kernels::simd_batch<T>;
  constexpr std::size_t W = B::size;
  B acc[NB], xj[NB], yj[NB];
  for (std::size_t n = 0; n < NB; ++n) {
    acc[n] = B(T(0));
    xj[n] = B::load_unaligned(x + j0 + n * W);
    yj[n] = B::load_unaligned(y + j0 + n * W);
  }
  const B s(scale);
  for (std::size_t r = 0; r < d; ++r) {
    const B xr(x[r]), yr(y[r]), kr(k[r]);
    T* row = M + r * ldm + j0;
    for (std::size_t n = 0; n < NB; ++n) {
      B m = B::load_unaligned(row + n * W);
      if (Scaled) m = m * s;
      m = xsimd::fma(xr, yj[n], m);
      m = xsimd::fma(yr, xj[n], m);
      m.store_unaligned(row + n * W);
      acc[n] = xsimd::fma(kr, m, acc[n]);
    }
  }
  for (std::size_t n = 0; n < NB; ++n) acc[n].store_unaligned(out + j0 + n * W);
}

template <class T, bool Scaled>
void rank2_tail(std::size_t d, T* M, std::size_t ldm, T scale, const T* x, const T* y, const T* k, T* out,
                std::size_t j0, std::size_t rem) {
  using B = kernels::simd_batch<T>;
  B acc(T(0));
  const B s(scale);
  const B xj = kernels::detail::load_partial(x + j0, rem);
  const B yj = kernels::detail::load_partial(y + j0, rem);
  for (std::size_t r = 0; r < d; ++r) {
    T* row = M + r * ldm + j0;
    B m = kernels::detail::load_partial(row, rem);
    if (Scaled) m = m * s;
    m = xsimd::fma(B(x[r]), yj, m);
    m = xsimd::fma(B(y[r]), xj, m);
    kernels::detail::store_partial(m, row, rem);
    acc = xsimd::fma(B(k[r]), m, acc);
  }
  kernels::detail::store_partial(acc, out + j0, rem);
}

template <class T, bool Scaled>
void rank2_all(std::size_t d, T* M, std::size_t ldm, T scale, const T* x, const T* y, const T* k, T* out) {
  constexpr std::size_t W = kernels::simd_width<T>;
  std::size_t j = 0;
  for (; j + 4 * W <= d; j += 4 * W) rank2_columns<T, 4, Scaled>(d, M, ldm, scale, x, y, k, out, j);
  const std::size_t full = (d - j) / W;
  if (full == 3) rank2_columns<T, 3, Scaled>(d, M, ldm, scale, x, y, k, out, j);
  if (full == 2) rank2_columns<T, 2, Scaled>(d, M, ldm, scale, x, y, k, out, j);
  if (full == 1) rank2_columns<T, 1, Scaled>(d, M, ldm, scale, x, y, k, out, j);
  j += full * W;
  if (j < d) rank2_tail<T, Scaled>(d, M, ldm, scale, x, y, k, out, j, d - j);
}
#endif

// The M accumulator of M11: M <- scale M + x y^T + y x^T (symmetric, d x d), then
// out = M k. Because M is symmetric, (M k)_j = sum_r k_r M_rj is accumulated
// while the rows are written: one pass over M, no horizontal sums.
template <class T>
void rank2_update_apply(std::size_t d, T* M, std::size_t ldm, T scale, const T* x, const T* y, const T* k,
                        T* out) {
#if MESAOPT_SIMD
  if (scale != T(1)) rank2_all<T, true>(d, M, ldm, scale, x, y, k, out);
  else rank2_all<T, false>(d, M, ldm, scale, x, y, k, out);
#else
  for (std::size_t j = 0; j < d; ++j) out[j] = 0;
  for (std::size_t r = 0; r < d; ++r)
    for (std::size_t j = 0; j < d; ++j) {
      T& m = M[r * ldm + j];
      m = scale * m + x[r] * y[j] + y[r] * x[j];
      out[j] += k[r] * m;
    }
#endif
}

// Shared argument checks of forward and backward.
template <class T>
void check_mesa_inputs(const char* where, long qr, long qc, long kr, long kc, long vr, long vc,
                       const MesaOptions<T>& opt) {
  check_positive_size(where, "T (rows of q)", qr);
  check_positive_size(where, "d (columns of q)", qc);
  check_positive_size(where, "dv (columns of v)", vc);
  if (kr != qr || kc != qc) fail(where, "k is ", kr, " x ", kc, " but q is ", qr, " x ", qc, " (expected equal)");
  check_size(where, "rows of v", vr, qr, "rows of q");
  check_positive_finite(where, "opt.lambda", opt.lambda);
  check_half_open(where, "opt.forget", opt.forget, T(0), T(1));
  if (opt.chunk < 0) fail(where, "opt.chunk must be >= 0 (0 = automatic), got ", opt.chunk);
}

// Raw-pointer cores (row strides ld*); the public functions below validate and forward here.
template <class T>
void mesa_forward_impl(const T* q, long ldq, const T* k, long ldk, const T* v, long ldv, T* out, long ldo, long T_,
                       long d, long dv, const MesaOptions<T>& opt, MesaCache<T>& c) {
  const long C = opt.chunk > 0 ? std::min(opt.chunk, T_) : mesa_auto_chunk(T_, d, dv);
  const long nck = (T_ + C - 1) / C;
  const std::size_t dd = static_cast<std::size_t>(d), ddv = static_cast<std::size_t>(dv);
  c.T_ = T_;
  c.d_ = d;
  c.dv_ = dv;
  c.C_ = C;
  c.lambda_ = opt.lambda;
  c.forget_ = opt.forget;
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
  // R_0 = lambda I, S_0 = 0, so u_1 = R_0 k_1 = lambda k_1.
  for (std::size_t i = 0; i < dd; ++i) {
    R[i * dd + i] = opt.lambda;
    u[i] = opt.lambda * k[i];
  }
  for (long t = 0; t < T_; ++t) {
    if (t % C == 0) {  // checkpoint: the state after t tokens
      const long ck = t / C;
      std::copy(R, R + dd * dd, c.ck_R_.data() + ck * dd * dd);
      std::copy(St, St + dd * ddv, c.ck_St_.data() + ck * dd * ddv);
      std::copy(u, u + dd, c.ck_u_.data() + ck * dd);
    }
    const T* kt = k + t * ldk;
    const T* knext = t + 1 < T_ ? kt + ldk : nullptr;
    // (M7) R_t = (R_{t-1} - u u^T / (gamma + k.u)) / gamma = R_{t-1}/gamma - w w^T; a_t = R_t q_t, u_{t+1} = R_t k_{t+1}
    kernels::sherman_morrison_gain(dd, kt, u, gamma, w);
    kernels::sherman_morrison_update(dd, R, dd, w, inv_gamma, q + t * ldq, knext, a, u);
    // (M8-M9) S_t = gamma S_{t-1} + v_t k_t^T, o_t = S_t a_t
    kernels::state_update_apply(dd, ddv, St, ddv, gamma, kt, v + t * ldv, a, out + t * ldo);
  }
}

template <class T>
T mesa_backward_impl(const T* q, long ldq, const T* k, long ldk, const T* v, long ldv, const T* g, long ldg, T* dq,
                     long lddq, T* dk, long lddk, T* dvv, long lddv, long T_, long d, long dv,
                     const MesaOptions<T>& opt, MesaCache<T>& c, T* dforget) {
  const long C = c.C_;
  const long nck = (T_ + C - 1) / C;
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
  // Scalar sums in double: they add T terms of mixed sign.
  double dlambda_sum = 0;  // sum_t gamma^t (a_t . dq_t)            (M12)
  double dgamma_sum = 0;   // sum_t t c_t, see docs/mesa.md           (forgetting)
  for (long ck = nck - 1; ck >= 0; --ck) {
    const long t0 = ck * C, t1 = std::min(T_, t0 + C);
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
      const T* kt = k + t * ldk;
      const T* knext = t + 1 < T_ ? kt + ldk : nullptr;
      kernels::sherman_morrison_gain(dd, kt, u, gamma, w);
      kernels::sherman_morrison_update(dd, R, dd, w, inv_gamma, q + t * ldq, knext, a, u);
      // forward: o_t = S_t a_t            =>  da_t = S_t^T g_t              (M10)
      detail::state_update_dot(dd, ddv, St, ddv, gamma, kt, v + t * ldv, g + t * ldg, da);
      // forward: a_t = R_t q_t            =>  dq_t = R_t da_t               (M10)
      kernels::gemv(dd, dd, R, dd, da, dqt);
      // forward: R_0 = lambda I enters R_t^{-1} as gamma^t / lambda I   =>  (M12)
      dlambda_sum += gamma_pow * static_cast<double>(kernels::dot(a, dqt, dd));
      gamma_pow *= static_cast<double>(gamma);
      std::copy(dqt, dqt + dd, dq + t * lddq);
    }
    // Reverse sweep over the chunk (M11), G and M carried across chunks:
    //   G_t = g_t a_t^T + gamma G_{t+1},  M_t = dq_t a_t^T + a_t dq_t^T + gamma M_{t+1}
    for (long t = t1 - 1; t >= t0; --t) {
      const T* a = c.ch_a_.data() + (t - t0) * dd;
      const T* da = c.ch_da_.data() + (t - t0) * dd;
      const T* dqt = c.ch_dq_.data() + (t - t0) * dd;
      const T* kt = k + t * ldk;
      const T* vt = v + t * ldv;
      const T* gt = g + t * ldg;
      T* dvt = dvv + t * lddv;
      T* dkt = dk + t * lddk;
      // forward: S_t = sum_i gamma^{t-i} v_i k_i^T   =>  dv_t = G_t k_t, dk_t += G_t^T v_t
      kernels::state_update_apply(dd, ddv, Gt, ddv, gamma, a, gt, kt, dvt);  // G^T <- gamma G^T + a g^T; dv = G k
      kernels::gemv(dd, ddv, Gt, ddv, vt, gk);                               // G^T v
      // forward: R_t^{-1} = sum_i gamma^{t-i} k_i k_i^T + ...   =>  dk_t -= M_t k_t
      detail::rank2_update_apply(dd, M, dd, gamma, dqt, a, kt, Mk);
      for (std::size_t i = 0; i < dd; ++i) dkt[i] = gk[i] - Mk[i];
      if (dforget != nullptr) {
        // c_t = g_t.o_t - dq_t.q_t + 1/2 k_t.(M_t k_t) - v_t.dv_t, with g_t.o_t = da_t.a_t
        const double ct = static_cast<double>(kernels::dot(da, a, dd)) -
                          static_cast<double>(kernels::dot(dqt, q + t * ldq, dd)) +
                          0.5 * static_cast<double>(kernels::dot(kt, Mk, dd)) -
                          static_cast<double>(kernels::dot(vt, dvt, ddv));
        dgamma_sum += static_cast<double>(t + 1) * ct;
      }
    }
  }
  if (dforget != nullptr) *dforget = static_cast<T>(dgamma_sum / static_cast<double>(gamma));
  const double lam = static_cast<double>(opt.lambda);
  return static_cast<T>(dlambda_sum / (lam * lam));
}

}  // namespace detail

// Forward pass of the mesa op (M5-M9), one head, one sequence.
//   q, k : (T, d), one token per row;  v : (T, dv);  out : (T, dv), pre-sized, written.
// Throws std::invalid_argument on mismatched shapes, T, d or dv = 0, lambda not
// finite and > 0, forget outside (0, 1], chunk < 0. Fills `cache` for mesa_backward.
template <class T>
void mesa_forward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v, const MesaOptions<T>& opt,
                  MatrixRef<T> out, MesaCache<T>& cache) {
  constexpr const char* where = "mesa_forward";
  detail::check_mesa_inputs(where, q.rows(), q.cols(), k.rows(), k.cols(), v.rows(), v.cols(), opt);
  detail::check_shape(where, "out", out, v.rows(), v.cols());
  detail::mesa_forward_impl(q.data(), q.outerStride(), k.data(), k.outerStride(), v.data(), v.outerStride(), out.data(),
                    out.outerStride(), q.rows(), q.cols(), v.cols(), opt, cache);
}

// Backward pass (M10-M12 and the forgetting terms of docs/mesa.md), given
// dout = dL/dout (T, dv) and the cache of mesa_forward on the same q, k, v and
// options. Writes (does not accumulate) dq, dk : (T, d) and dv : (T, dv);
// returns dL/dlambda; if dforget != nullptr writes dL/dgamma there.
// The cache is only read (its checkpoints) and used for scratch: backward may
// be called several times after one forward. The checkpoint interval is the
// forward's (cache.chunk()); opt.chunk is ignored here. Throws std::invalid_argument on
// bad shapes and on a cache from a different T, d, dv, lambda or forget.
template <class T>
T mesa_backward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v, const MesaOptions<T>& opt,
                ConstMatrixRef<T> dout, MesaCache<T>& cache, MatrixRef<T> dq, MatrixRef<T> dk, MatrixRef<T> dv,
                T* dforget = nullptr) {
  constexpr const char* where = "mesa_backward";
  detail::check_mesa_inputs(where, q.rows(), q.cols(), k.rows(), k.cols(), v.rows(), v.cols(), opt);
  const long T_ = q.rows(), d = q.cols(), dvs = v.cols();
  detail::check_shape(where, "dout", dout, T_, dvs);
  detail::check_shape(where, "dq", dq, T_, d);
  detail::check_shape(where, "dk", dk, T_, d);
  detail::check_shape(where, "dv", dv, T_, dvs);
  if (cache.length() != T_ || cache.key_dim() != d || cache.value_dim() != dvs) {
    detail::fail(where, "cache is for T = ", cache.length(), ", d = ", cache.key_dim(), ", dv = ",
                 cache.value_dim(), " but the inputs have T = ", T_, ", d = ", d, ", dv = ", dvs,
                 " (run mesa_forward on these inputs first)");
  }
  if (cache.lambda() != opt.lambda || cache.forget() != opt.forget) {
    detail::fail(where, "cache was made with lambda = ", cache.lambda(), ", forget = ", cache.forget(),
                 " but opt has lambda = ", opt.lambda, ", forget = ", opt.forget);
  }
  return detail::mesa_backward_impl(q.data(), q.outerStride(), k.data(), k.outerStride(), v.data(), v.outerStride(),
                            dout.data(), dout.outerStride(), dq.data(), dq.outerStride(), dk.data(), dk.outerStride(),
                            dv.data(), dv.outerStride(), T_, d, dvs, opt, cache, dforget);
}

}  // namespace mesaopt
