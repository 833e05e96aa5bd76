#pragma once
// Causal linear attention, one head, one sequence (MATH.md §1, M1-M3):
//
//   S_t = sum_{i<=t} v_i k_i^T,   o_t = S_t q_t        (no softmax, no scaling,
//                                                        no normalisation; the
//                                                        causal mask includes i = t)
//
// Two exact forms of the same function:
// - recurrent: carries St = S^T (d x dv) through the sequence with the fused
//   kernel kernels::state_update_apply (St += k_t v_t^T, o_t = St^T q_t in one
//   pass). 4 d dv flops per token, O(d dv) scratch.
// - chunked: splits the sequence into chunks of C tokens; inside a chunk the
//   quadratic form tril(Q_c K_c^T) V_c is a small GEMM, and earlier chunks
//   enter through the carried state, Q_c St. About 4 d dv + 2 C (d + dv) flops
//   per token, all of them GEMMs; O(C^2 + d dv) scratch.
// linear_attention_forward / _backward pick one by linear_attention_use_chunked
// (a rule measured on this machine; see docs/linear_attention.md).
//
// Functional: no global state, all scratch is local, so different sequences
// (heads, batch entries) may be processed from different threads at once.
// Backward passes OVERWRITE dq, dk, dv (they do not accumulate).
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/kernels/state_update.hpp>
#include <mesaopt/ops/linear_attention_reference.hpp>

#include <mesaopt/common/parallel.hpp>

#include <algorithm>
#include <cstddef>

// Each op call runs its Eigen GEMMs on the calling thread only
// (detail::ScopedSerialEigen, common/parallel.hpp): parallelism belongs to the
// caller, one call per (batch, head); outside a parallel region Eigen would
// otherwise split even a 64 x 64 tile product over all threads (measured up to
// 30x slower on the shared 2-core machine, docs/linear_attention.md).

namespace mesaopt {

namespace detail {

template <class T>
void check_linear_attention_backward_args(const char* where, const ConstMatrixRef<T>& q,
                                          const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                                          const ConstMatrixRef<T>& dout, const MatrixRef<T>& dq,
                                          const MatrixRef<T>& dk, const MatrixRef<T>& dv_) {
  check_linear_attention_inputs<T>(where, q, k, v);
  check_shape(where, "dout", dout, q.rows(), v.cols());
  check_shape(where, "dq", dq, q.rows(), q.cols());
  check_shape(where, "dk", dk, q.rows(), q.cols());
  check_shape(where, "dv", dv_, q.rows(), v.cols());
}

// Pointer to row t of a row-major view (inner stride 1, any outer stride).
template <class M>
auto row_ptr(M& m, long t) {
  return m.data() + t * m.outerStride();
}

}  // namespace detail

// ---------------------------------------------------------------------------
// Choice between the two forms.

// Chunk length used when none is given. 64 and 32 were within measurement
// noise of each other where the chunked form is chosen (d, dv >= 256 in float);
// see docs/linear_attention.md.
inline long linear_attention_default_chunk(long /*d*/, long /*dv*/) { return 64; }

// True when the chunked form is expected to be faster than the recurrent one
// for a sequence of T tokens, key width d, value width dv and scalars of
// scalar_bytes bytes. Measured on this machine (Zen3, AVX2, float,
// docs/linear_attention.md): the recurrent kernel streams the state St
// (d x dv) once per token and wins while St stays in L2 (d = dv <= 128 by
// 1.2-5x; d = dv = 192 a tie); once St reaches 256 KiB (d = dv = 256 in
// float) the chunked form's GEMMs win (forward 43 vs 36 GFLOP/s). Short
// sequences (T < 64) stay recurrent.
inline bool linear_attention_use_chunked(long T, long d, long dv, long scalar_bytes = long(sizeof(float))) {
  return T >= 64 && d * dv * scalar_bytes >= 256L * 1024L;
}

// ---------------------------------------------------------------------------
// Recurrent form (M1-M2 forward; M3 backward).

// q, k are (T, d); v is (T, dv); out is (T, dv); one token per row.
template <class T>
void linear_attention_forward_recurrent(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v,
                                        MatrixRef<T> out) {
  const char* where = "linear_attention_forward_recurrent";
  detail::check_linear_attention_inputs<T>(where, q, k, v);
  detail::check_shape(where, "out", out, q.rows(), v.cols());
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  RowMatrix<T> St = RowMatrix<T>::Zero(d, dv);  // St = S^T (d x dv)
  for (long t = 0; t < n; ++t) {
    // M1: St += k_t v_t^T;  M2: o_t = S_t q_t = St^T q_t.
    kernels::state_update_apply<T>(std::size_t(d), std::size_t(dv), St.data(), std::size_t(dv), T(1),
                                   detail::row_ptr(k, t), detail::row_ptr(v, t), detail::row_ptr(q, t),
                                   detail::row_ptr(out, t));
  }
}

// dout is (T, dv) = dL/dout; writes dq, dk (T, d) and dv_ (T, dv).
// Three sweeps of the same fused kernel, 12 d dv flops per token:
//   forward sweep:  S += v_t k_t^T (S is dv x d),  dq_t = S_t^T g_t
//   reverse sweep:  Gt += q_t g_t^T (d x dv), dv_t = G_t k_t = Gt^T k_t
//                   G  += g_t q_t^T (dv x d), dk_t = G_t^T v_t = G^T v_t
template <class T>
void linear_attention_backward_recurrent(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v,
                                         ConstMatrixRef<T> dout, MatrixRef<T> dq, MatrixRef<T> dk,
                                         MatrixRef<T> dv_) {
  const char* where = "linear_attention_backward_recurrent";
  detail::check_linear_attention_backward_args<T>(where, q, k, v, dout, dq, dk, dv_);
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  const auto ud = std::size_t(d), udv = std::size_t(dv);
  {
    // forward: o_t = S_t q_t   =>   dq_t = S_t^T g_t   (M3)
    RowMatrix<T> S = RowMatrix<T>::Zero(dv, d);
    for (long t = 0; t < n; ++t)
      kernels::state_update_apply<T>(udv, ud, S.data(), ud, T(1), detail::row_ptr(v, t), detail::row_ptr(k, t),
                                     detail::row_ptr(dout, t), detail::row_ptr(dq, t));
  }
  // forward: S_t = sum_{i<=t} v_i k_i^T  =>  G_t = sum_{tau>=t} g_tau q_tau^T,
  //          dv_t = G_t k_t, dk_t = G_t^T v_t   (M3; G kept in both layouts)
  RowMatrix<T> Gt = RowMatrix<T>::Zero(d, dv);
  RowMatrix<T> G = RowMatrix<T>::Zero(dv, d);
  for (long t = n - 1; t >= 0; --t) {
    kernels::state_update_apply<T>(ud, udv, Gt.data(), udv, T(1), detail::row_ptr(q, t), detail::row_ptr(dout, t),
                                   detail::row_ptr(k, t), detail::row_ptr(dv_, t));
    kernels::state_update_apply<T>(udv, ud, G.data(), ud, T(1), detail::row_ptr(dout, t), detail::row_ptr(q, t),
                                   detail::row_ptr(v, t), detail::row_ptr(dk, t));
  }
}

// ---------------------------------------------------------------------------
// Chunked form. For the chunk of rows [s, s + c) with carried St (all rows < s):
//   O_c = tril(Q_c K_c^T) V_c + Q_c St,   then St += K_c^T V_c.

// chunk: tokens per chunk (>= 1; need not divide T). 0 picks the default.
template <class T>
void linear_attention_forward_chunked(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v,
                                      MatrixRef<T> out, long chunk = 0) {
  const char* where = "linear_attention_forward_chunked";
  detail::check_linear_attention_inputs<T>(where, q, k, v);
  detail::check_shape(where, "out", out, q.rows(), v.cols());
  if (chunk < 0) detail::fail(where, "chunk must be >= 0 (0 = default), got ", chunk);
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  const long C = std::min(n, chunk > 0 ? chunk : linear_attention_default_chunk(d, dv));
  const detail::ScopedSerialEigen serial;
  RowMatrix<T> A(C, C);                         // masked Q_c K_c^T
  RowMatrix<T> St = RowMatrix<T>::Zero(d, dv);  // sum over earlier chunks of K^T V
  for (long s = 0; s < n; s += C) {
    const long c = std::min(C, n - s);
    const auto Qc = q.middleRows(s, c);
    const auto Kc = k.middleRows(s, c);
    const auto Vc = v.middleRows(s, c);
    auto Oc = out.middleRows(s, c);
    auto Ac = A.topLeftCorner(c, c);
    // A_{t,i} = q_t . k_i for i <= t (diagonal included), 0 above.
    Ac.noalias() = Qc * Kc.transpose();
    Ac.template triangularView<Eigen::StrictlyUpper>().setZero();
    Oc.noalias() = Ac * Vc;
    if (s > 0) Oc.noalias() += Qc * St;  // earlier chunks: o_t += S_{s-1} q_t
    if (s + c < n) St.noalias() += Kc.transpose() * Vc;
  }
}

// Chunked M3. Two sweeps of GEMMs with B = tril(dO_c V_c^T), A = tril(Q_c K_c^T):
//   forward sweep:  dQ_c = B K_c + dO_c St^T,            St += K_c^T V_c
//   reverse sweep:  dV_c = A^T dO_c + K_c Gt,  dK_c = B^T Q_c + V_c Gt^T,  Gt += Q_c^T dO_c
// where St sums earlier chunks and Gt = G^T sums later chunks.
template <class T>
void linear_attention_backward_chunked(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v,
                                       ConstMatrixRef<T> dout, MatrixRef<T> dq, MatrixRef<T> dk, MatrixRef<T> dv_,
                                       long chunk = 0) {
  const char* where = "linear_attention_backward_chunked";
  detail::check_linear_attention_backward_args<T>(where, q, k, v, dout, dq, dk, dv_);
  if (chunk < 0) detail::fail(where, "chunk must be >= 0 (0 = default), got ", chunk);
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  const long C = std::min(n, chunk > 0 ? chunk : linear_attention_default_chunk(d, dv));
  const detail::ScopedSerialEigen serial;
  RowMatrix<T> A(C, C), B(C, C);
  {
    // forward: o_t = S_t q_t  =>  dq_t = S_t^T g_t = sum_{i<=t} k_i (v_i . g_t)
    RowMatrix<T> St = RowMatrix<T>::Zero(d, dv);
    for (long s = 0; s < n; s += C) {
      const long c = std::min(C, n - s);
      const auto Kc = k.middleRows(s, c);
      const auto Vc = v.middleRows(s, c);
      const auto Gc = dout.middleRows(s, c);
      auto Bc = B.topLeftCorner(c, c);
      Bc.noalias() = Gc * Vc.transpose();
      Bc.template triangularView<Eigen::StrictlyUpper>().setZero();
      auto dQc = dq.middleRows(s, c);
      dQc.noalias() = Bc * Kc;
      if (s > 0) dQc.noalias() += Gc * St.transpose();
      if (s + c < n) St.noalias() += Kc.transpose() * Vc;
    }
  }
  // forward: S_t = sum_{i<=t} v_i k_i^T  =>  G_t = sum_{tau>=t} g_tau q_tau^T,
  //          dv_t = G_t k_t,  dk_t = G_t^T v_t
  RowMatrix<T> Gt = RowMatrix<T>::Zero(d, dv);
  const long last = ((n - 1) / C) * C;
  for (long s = last; s >= 0; s -= C) {
    const long c = std::min(C, n - s);
    const auto Qc = q.middleRows(s, c);
    const auto Kc = k.middleRows(s, c);
    const auto Vc = v.middleRows(s, c);
    const auto Gc = dout.middleRows(s, c);
    auto Ac = A.topLeftCorner(c, c);
    auto Bc = B.topLeftCorner(c, c);
    Ac.noalias() = Qc * Kc.transpose();
    Ac.template triangularView<Eigen::StrictlyUpper>().setZero();
    Bc.noalias() = Gc * Vc.transpose();
    Bc.template triangularView<Eigen::StrictlyUpper>().setZero();
    auto dVc = dv_.middleRows(s, c);
    auto dKc = dk.middleRows(s, c);
    dVc.noalias() = Ac.transpose() * Gc;
    dKc.noalias() = Bc.transpose() * Qc;
    if (s + c < n) {
      dVc.noalias() += Kc * Gt;
      dKc.noalias() += Vc * Gt.transpose();
    }
    if (s > 0) Gt.noalias() += Qc.transpose() * Gc;
  }
}

// ---------------------------------------------------------------------------
// Entry points that pick the faster form for the size.

// q, k are (T, d); v is (T, dv); out is (T, dv); one token per row.
template <class T>
void linear_attention_forward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v, MatrixRef<T> out) {
  if (linear_attention_use_chunked(q.rows(), q.cols(), v.cols(), long(sizeof(T))))
    linear_attention_forward_chunked<T>(q, k, v, out);
  else
    linear_attention_forward_recurrent<T>(q, k, v, out);
}

// dout is (T, dv); writes (overwrites) dq, dk (T, d) and dv_ (T, dv).
template <class T>
void linear_attention_backward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v,
                               ConstMatrixRef<T> dout, MatrixRef<T> dq, MatrixRef<T> dk, MatrixRef<T> dv_) {
  if (linear_attention_use_chunked(q.rows(), q.cols(), v.cols(), long(sizeof(T))))
    linear_attention_backward_chunked<T>(q, k, v, dout, dq, dk, dv_);
  else
    linear_attention_backward_recurrent<T>(q, k, v, dout, dq, dk, dv_);
}

// ---------------------------------------------------------------------------
// Non-template overloads, so that callers need not name the scalar:
// linear_attention_forward(q, k, v, out) with float or double matrices (the
// templates above stay callable as linear_attention_forward<T>(...)).
#define MESAOPT_LINEAR_ATTENTION_OVERLOADS(S)                                                                   \
  inline void linear_attention_forward(ConstMatrixRef<S> q, ConstMatrixRef<S> k, ConstMatrixRef<S> v,          \
                                       MatrixRef<S> out) {                                                     \
    linear_attention_forward<S>(q, k, v, out);                                                                 \
  }                                                                                                            \
  inline void linear_attention_backward(ConstMatrixRef<S> q, ConstMatrixRef<S> k, ConstMatrixRef<S> v,         \
                                        ConstMatrixRef<S> dout, MatrixRef<S> dq, MatrixRef<S> dk,              \
                                        MatrixRef<S> dv_) {                                                    \
    linear_attention_backward<S>(q, k, v, dout, dq, dk, dv_);                                                  \
  }                                                                                                            \
  inline void linear_attention_forward_recurrent(ConstMatrixRef<S> q, ConstMatrixRef<S> k, ConstMatrixRef<S> v, \
                                                 MatrixRef<S> out) {                                           \
    linear_attention_forward_recurrent<S>(q, k, v, out);                                                       \
  }                                                                                                            \
  inline void linear_attention_backward_recurrent(ConstMatrixRef<S> q, ConstMatrixRef<S> k,                    \
                                                  ConstMatrixRef<S> v, ConstMatrixRef<S> dout, MatrixRef<S> dq, \
                                                  MatrixRef<S> dk, MatrixRef<S> dv_) {                         \
    linear_attention_backward_recurrent<S>(q, k, v, dout, dq, dk, dv_);                                        \
  }                                                                                                            \
  inline void linear_attention_forward_chunked(ConstMatrixRef<S> q, ConstMatrixRef<S> k, ConstMatrixRef<S> v,  \
                                               MatrixRef<S> out, long chunk = 0) {                             \
    linear_attention_forward_chunked<S>(q, k, v, out, chunk);                                                  \
  }                                                                                                            \
  inline void linear_attention_backward_chunked(ConstMatrixRef<S> q, ConstMatrixRef<S> k, ConstMatrixRef<S> v, \
                                                ConstMatrixRef<S> dout, MatrixRef<S> dq, MatrixRef<S> dk,      \
                                                MatrixRef<S> dv_, long chunk = 0) {                            \
    linear_attention_backward_chunked<S>(q, k, v, dout, dq, dk, dv_, chunk);                                   \
  }
MESAOPT_LINEAR_ATTENTION_OVERLOADS(float)
MESAOPT_LINEAR_ATTENTION_OVERLOADS(double)
#undef MESAOPT_LINEAR_ATTENTION_OVERLOADS

}  // namespace mesaopt
