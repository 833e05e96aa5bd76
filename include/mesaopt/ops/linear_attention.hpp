#pragma once
// Causal linear attention, one head, one sequence (docs/math.md §1, M1-M3;
// carried state §6, M13-M14):
//
//   S_t = S_0 + sum_{i<=t} v_i k_i^T,   o_t = S_t q_t     (no softmax, no scaling,
//                                                           no normalisation; the
//                                                           causal mask includes i = t)
//
// S_0 = 0 unless an initial state is given. Two exact forms of the same function:
// - recurrent: carries St = S^T (d x dv) through the sequence with the
//   kernel kernels::state_sweep (St += k_t v_t^T, o_t = St^T q_t for every
//   token, blocks of St held in registers for the whole sequence). 4 d dv
//   flops per token, O(d dv) scratch.
// - chunked: splits the sequence into chunks of C tokens; inside a chunk the
//   quadratic form tril(Q_c K_c^T) V_c is a small GEMM, and earlier chunks
//   enter through the carried state, Q_c St. About 4 d dv + 2 C (d + dv) flops
//   per token, all of them GEMMs; O(C^2 + d dv) scratch.
// linear_attention_forward / _backward pick one by linear_attention_use_chunked
// (the crossover is measured in docs/linear_attention.md).
//
// The op contract (shared with softmax_attention and mesa):
//   forward (q, k, v, out, initial = nullptr, final = nullptr)
//   backward(q, k, v, dout, dq, dk, grad_v, initial = nullptr, grad_final = nullptr, grad_initial = nullptr)
//   step    (q, k, v, state, out)                          one token, decoding
// q, k are (seq_len, d); v, out, dout are (seq_len, dv); one token per row.
// `initial` is the state before the first token (nullptr: S_0 = 0); `final`
// receives the state after the last one (it may be the same object as
// `initial`). The backward takes the same `initial` again (this op keeps no
// cache), optionally dL/dS_T of the final state (`grad_final`, from the next
// piece), and writes dL/dS_0 into `grad_initial` when it is given: chaining
// pieces this way gives the whole sequence's gradients exactly (M14).
//
// Functional: no global state, all scratch is local, so different sequences
// (heads, batch entries) may be processed from different threads at once.
// Backward passes OVERWRITE dq, dk, grad_v (they do not accumulate).
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parallel.hpp>
#include <mesaopt/common/scratch.hpp>
#include <mesaopt/kernels/state_sweep.hpp>
#include <mesaopt/ops/checks.hpp>
#include <mesaopt/ops/masked_product.hpp>
#include <mesaopt/ops/state.hpp>

#include <algorithm>
#include <cstddef>

// Each op call runs its Eigen GEMMs on the calling thread only
// (detail::ScopedSerialEigen, common/parallel.hpp): parallelism belongs to the
// caller, one call per (batch, head); outside a parallel region Eigen would
// otherwise split even a 64 x 64 tile product over all threads (the slowdown is
// measured in docs/linear_attention.md).

namespace mesaopt {

namespace detail {

template <class T>
void check_linear_attention_args(const char* where, const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                                 const ConstMatrixRef<T>& v, const LinearAttentionState<identity_t<T>>* initial) {
  check_sequence_inputs<T>(where, q, k, v);
  if (initial != nullptr) check_linear_attention_state(where, "initial", *initial, q.cols(), v.cols());
}

template <class T>
void check_linear_attention_backward_args(const char* where, const ConstMatrixRef<T>& q,
                                          const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                                          const ConstMatrixRef<T>& dout, const MatrixRef<T>& dq,
                                          const MatrixRef<T>& dk, const MatrixRef<T>& grad_v,
                                          const LinearAttentionState<identity_t<T>>* initial,
                                          const LinearAttentionState<identity_t<T>>* grad_final) {
  check_linear_attention_args<T>(where, q, k, v, initial);
  check_gradient_shapes<T>(where, q.rows(), q.cols(), v.cols(), dout, dq, dk, grad_v);
  check_gradients_distinct<T>(where, q, k, v, dout, dq, dk, grad_v);
  if (grad_final != nullptr) check_linear_attention_state(where, "grad_final", *grad_final, q.cols(), v.cols());
}

// A rows x cols state in a buffer with row stride ld >= cols (rows padded to
// the SIMD width for the sweep kernel).
template <class T>
using PaddedStateMap = Eigen::Map<RowMatrix<T>, 0, Eigen::OuterStride<>>;
template <class T>
PaddedStateMap<T> padded_state(T* data, long rows, long cols, std::size_t ld) {
  return PaddedStateMap<T>(data, rows, cols, Eigen::OuterStride<>(Eigen::Index(ld)));
}

// St (d x dv) = S_0^T, or 0.
template <class T>
RowMatrix<T> initial_transposed_state(const LinearAttentionState<identity_t<T>>* initial, long d, long dv) {
  if (initial == nullptr) return RowMatrix<T>::Zero(d, dv);
  return initial->S.transpose();
}

}  // namespace detail

// ---------------------------------------------------------------------------
// Choice between the two forms.

// Chunk length used when none is given. 64 and 32 were within measurement
// noise of each other where the chunked form is chosen (d, dv >= 256 in float);
// see docs/linear_attention.md.
inline long linear_attention_default_chunk(long /*d*/, long /*dv*/) { return 64; }

// True when the chunked form is expected to be faster than the recurrent one
// for a sequence of seq_len tokens, key width d, value width dv and scalars of
// scalar_bytes bytes. The recurrent kernel streams the state St (d x dv) once
// per token and wins while St stays in L2; once St reaches 256 KiB (d = dv =
// 256 in float) the chunked form's GEMMs win (measurements in
// docs/linear_attention.md). Short sequences (seq_len < 64) stay recurrent.
inline bool linear_attention_use_chunked(long seq_len, long d, long dv, long scalar_bytes = long(sizeof(float))) {
  return seq_len >= 64 && d * dv * scalar_bytes >= 256L * 1024L;
}

// ---------------------------------------------------------------------------
// Recurrent form (M1-M2 forward; M3 backward; state M13-M14).

template <class T>
void linear_attention_forward_recurrent(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v,
                                        MatrixRef<T> out, const LinearAttentionState<identity_t<T>>* initial = nullptr,
                                        LinearAttentionState<identity_t<T>>* final = nullptr) {
  const char* where = "linear_attention_forward_recurrent";
  detail::check_linear_attention_args<T>(where, q, k, v, initial);
  detail::check_output<T>(where, "out", out, q.rows(), v.cols());
  detail::check_output_distinct<T>(where, out, q, k, v);
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  // St = S^T (d x dv), rows padded to the SIMD width (kernels::padded_stride);
  // on the stack at the paper's head sizes (detail::ZeroedScratch).
  const auto lds = kernels::padded_stride<T>(std::size_t(dv));
  detail::ZeroedScratch<T> scratch(std::size_t(d), lds);
  auto St = detail::padded_state<T>(scratch.data(), d, dv, lds);
  if (initial != nullptr) St = initial->S.transpose();
  // M1: St += k_t v_t^T;  M2: o_t = S_t q_t = St^T q_t, for t = 0 .. n-1.
  kernels::state_sweep<T>(std::size_t(n), std::size_t(d), std::size_t(dv), scratch.data(), lds, T(1), k.data(),
                          detail::row_stride(k), v.data(), detail::row_stride(v), q.data(), detail::row_stride(q),
                          out.data(), detail::row_stride(out), /*reverse=*/false);
  if (final != nullptr) final->S = St.transpose();
}

// Three sweeps of the same kernel (kernels::state_sweep), 12 d dv flops per token:
//   forward sweep:  S += v_t k_t^T (S is dv x d, from S_0),  dq_t = S_t^T g_t
//   reverse sweep:  Gt += q_t g_t^T (d x dv), dv_t = G_t k_t = Gt^T k_t
//                   G  += g_t q_t^T (dv x d), dk_t = G_t^T v_t = G^T v_t
// with G starting at dL/dS_T (M14) and ending as dL/dS_0.
template <class T>
void linear_attention_backward_recurrent(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v,
                                         ConstMatrixRef<T> dout, MatrixRef<T> dq, MatrixRef<T> dk,
                                         MatrixRef<T> grad_v, const LinearAttentionState<identity_t<T>>* initial = nullptr,
                                         const LinearAttentionState<identity_t<T>>* grad_final = nullptr,
                                         LinearAttentionState<identity_t<T>>* grad_initial = nullptr) {
  const char* where = "linear_attention_backward_recurrent";
  detail::check_linear_attention_backward_args<T>(where, q, k, v, dout, dq, dk, grad_v, initial, grad_final);
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  const auto ud = std::size_t(d), udv = std::size_t(dv);
  // The states' rows are padded to the SIMD width (kernels::padded_stride).
  const auto pd = kernels::padded_stride<T>(ud), pdv = kernels::padded_stride<T>(udv);
  // The states on the stack at the paper's head sizes (detail::ZeroedScratch).
  {
    // forward: o_t = S_t q_t   =>   dq_t = S_t^T g_t   (M3)
    detail::ZeroedScratch<T> S(udv, pd);
    if (initial != nullptr) detail::padded_state<T>(S.data(), dv, d, pd) = initial->S;
    kernels::state_sweep<T>(std::size_t(n), udv, ud, S.data(), pd, T(1), v.data(), detail::row_stride(v), k.data(),
                            detail::row_stride(k), dout.data(), detail::row_stride(dout), dq.data(),
                            detail::row_stride(dq), /*reverse=*/false);
  }
  // forward: S_t = S_0 + sum_{i<=t} v_i k_i^T  =>  G_t = dL/dS_T + sum_{tau>=t} g_tau q_tau^T,
  //          dv_t = G_t k_t, dk_t = G_t^T v_t, dL/dS_0 = G_1   (M3, M14; G kept in both layouts)
  detail::ZeroedScratch<T> Gt(ud, pdv), G(udv, pd);
  if (grad_final != nullptr) {
    detail::padded_state<T>(Gt.data(), d, dv, pdv) = grad_final->S.transpose();
    detail::padded_state<T>(G.data(), dv, d, pd) = grad_final->S;
  }
  // Two reverse sweeps (t = n-1 .. 0): Gt += q_t g_t^T, dv_t = Gt^T k_t; G += g_t q_t^T, dk_t = G^T v_t.
  kernels::state_sweep<T>(std::size_t(n), ud, udv, Gt.data(), pdv, T(1), q.data(), detail::row_stride(q), dout.data(),
                          detail::row_stride(dout), k.data(), detail::row_stride(k), grad_v.data(),
                          detail::row_stride(grad_v), /*reverse=*/true);
  kernels::state_sweep<T>(std::size_t(n), udv, ud, G.data(), pd, T(1), dout.data(), detail::row_stride(dout), q.data(),
                          detail::row_stride(q), v.data(), detail::row_stride(v), dk.data(), detail::row_stride(dk),
                          /*reverse=*/true);
  if (grad_initial != nullptr) grad_initial->S = detail::padded_state<T>(G.data(), dv, d, pd);
}

// ---------------------------------------------------------------------------
// Chunked form. For the chunk of rows [s, s + c) with carried St (S_0 and all rows < s):
//   O_c = tril(Q_c K_c^T) V_c + Q_c St,   then St += K_c^T V_c.

// chunk: tokens per chunk (>= 1; need not divide seq_len). 0 picks the default.
template <class T>
void linear_attention_forward_chunked(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v,
                                      MatrixRef<T> out, long chunk = 0,
                                      const LinearAttentionState<identity_t<T>>* initial = nullptr,
                                      LinearAttentionState<identity_t<T>>* final = nullptr) {
  const char* where = "linear_attention_forward_chunked";
  detail::check_linear_attention_args<T>(where, q, k, v, initial);
  detail::check_output<T>(where, "out", out, q.rows(), v.cols());
  detail::check_output_distinct<T>(where, out, q, k, v);
  if (chunk < 0) detail::fail(where, "chunk must be >= 0 (0 = default), got ", chunk);
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  const long C = std::min(n, chunk > 0 ? chunk : linear_attention_default_chunk(d, dv));
  const detail::ScopedSerialEigen serial;
  RowMatrix<T> A(C, C);                                                 // masked Q_c K_c^T
  const auto first_column = [](long) { return 0L; };
  const auto through_diagonal = [](long t) { return t + 1; };
  RowMatrix<T> St = detail::initial_transposed_state<T>(initial, d, dv);  // S_0^T + earlier chunks' K^T V
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
    // Oc = Ac Vc over i <= t only (masked_product.hpp: no 0 * Inf across the mask).
    detail::masked_product(Ac, first_column, through_diagonal, Vc, Oc, /*accumulate=*/false);
    if (s > 0 || initial != nullptr) Oc.noalias() += Qc * St;  // earlier tokens: o_t += S_{s-1} q_t
    if (s + c < n || final != nullptr) St.noalias() += Kc.transpose() * Vc;
  }
  if (final != nullptr) final->S = St.transpose();
}

// Chunked M3 (and M14). Two sweeps of GEMMs with B = tril(dO_c V_c^T), A = tril(Q_c K_c^T):
//   forward sweep:  dQ_c = B K_c + dO_c St^T,            St += K_c^T V_c
//   reverse sweep:  dV_c = A^T dO_c + K_c Gt,  dK_c = B^T Q_c + V_c Gt^T,  Gt += Q_c^T dO_c
// where St holds S_0 and earlier chunks and Gt = G^T holds dL/dS_T and later chunks.
template <class T>
void linear_attention_backward_chunked(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v,
                                       ConstMatrixRef<T> dout, MatrixRef<T> dq, MatrixRef<T> dk,
                                       MatrixRef<T> grad_v, long chunk = 0,
                                       const LinearAttentionState<identity_t<T>>* initial = nullptr,
                                       const LinearAttentionState<identity_t<T>>* grad_final = nullptr,
                                       LinearAttentionState<identity_t<T>>* grad_initial = nullptr) {
  const char* where = "linear_attention_backward_chunked";
  detail::check_linear_attention_backward_args<T>(where, q, k, v, dout, dq, dk, grad_v, initial, grad_final);
  if (chunk < 0) detail::fail(where, "chunk must be >= 0 (0 = default), got ", chunk);
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  const long C = std::min(n, chunk > 0 ? chunk : linear_attention_default_chunk(d, dv));
  const detail::ScopedSerialEigen serial;
  RowMatrix<T> A(C, C), B(C, C);
  // Masks of the tiles (masked_product.hpp): A, B keep the columns i <= t of
  // row t; their transposes keep the columns t >= i of row i.
  const auto first_column = [](long) { return 0L; };
  const auto through_diagonal = [](long t) { return t + 1; };
  const auto from_diagonal = [](long i) { return i; };
  {
    // forward: o_t = S_t q_t  =>  dq_t = S_t^T g_t = S_0^T g_t + sum_{i<=t} k_i (v_i . g_t)
    RowMatrix<T> St = detail::initial_transposed_state<T>(initial, d, dv);
    for (long s = 0; s < n; s += C) {
      const long c = std::min(C, n - s);
      const auto Kc = k.middleRows(s, c);
      const auto Vc = v.middleRows(s, c);
      const auto Gc = dout.middleRows(s, c);
      auto Bc = B.topLeftCorner(c, c);
      Bc.noalias() = Gc * Vc.transpose();
      Bc.template triangularView<Eigen::StrictlyUpper>().setZero();
      auto dQc = dq.middleRows(s, c);
      detail::masked_product(Bc, first_column, through_diagonal, Kc, dQc, /*accumulate=*/false);
      if (s > 0 || initial != nullptr) dQc.noalias() += Gc * St.transpose();
      if (s + c < n) St.noalias() += Kc.transpose() * Vc;
    }
  }
  // forward: S_t = S_0 + sum_{i<=t} v_i k_i^T  =>  G_t = dL/dS_T + sum_{tau>=t} g_tau q_tau^T,
  //          dv_t = G_t k_t,  dk_t = G_t^T v_t,  dL/dS_0 = G_1
  const bool has_grad_final = grad_final != nullptr;
  RowMatrix<T> Gt = has_grad_final ? RowMatrix<T>(grad_final->S.transpose()) : RowMatrix<T>::Zero(d, dv);
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
    auto dVc = grad_v.middleRows(s, c);
    auto dKc = dk.middleRows(s, c);
    // Row i of A^T, B^T is unmasked on the columns t >= i.
    const auto to_end = [c](long) { return c; };
    detail::masked_product(Ac.transpose(), from_diagonal, to_end, Gc, dVc, /*accumulate=*/false);
    detail::masked_product(Bc.transpose(), from_diagonal, to_end, Qc, dKc, /*accumulate=*/false);
    if (s + c < n || has_grad_final) {
      dVc.noalias() += Kc * Gt;
      dKc.noalias() += Vc * Gt.transpose();
    }
    if (s > 0 || grad_initial != nullptr) Gt.noalias() += Qc.transpose() * Gc;
  }
  if (grad_initial != nullptr) grad_initial->S = Gt.transpose();
}

// ---------------------------------------------------------------------------
// Entry points that pick the faster form for the size.

template <class T>
void linear_attention_forward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v, MatrixRef<T> out,
                              const LinearAttentionState<identity_t<T>>* initial = nullptr,
                              LinearAttentionState<identity_t<T>>* final = nullptr) {
  if (linear_attention_use_chunked(q.rows(), q.cols(), v.cols(), long(sizeof(T))))
    linear_attention_forward_chunked<T>(q, k, v, out, 0, initial, final);
  else
    linear_attention_forward_recurrent<T>(q, k, v, out, initial, final);
}

template <class T>
void linear_attention_backward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v,
                               ConstMatrixRef<T> dout, MatrixRef<T> dq, MatrixRef<T> dk, MatrixRef<T> grad_v,
                               const LinearAttentionState<identity_t<T>>* initial = nullptr,
                               const LinearAttentionState<identity_t<T>>* grad_final = nullptr,
                               LinearAttentionState<identity_t<T>>* grad_initial = nullptr) {
  if (linear_attention_use_chunked(q.rows(), q.cols(), v.cols(), long(sizeof(T))))
    linear_attention_backward_chunked<T>(q, k, v, dout, dq, dk, grad_v, 0, initial, grad_final, grad_initial);
  else
    linear_attention_backward_recurrent<T>(q, k, v, dout, dq, dk, grad_v, initial, grad_final, grad_initial);
}

// One decoding step (M13): S <- S + v k^T, out = S q. q, k have d entries, v
// and out dv; state.S is (dv, d), e.g. from linear_attention_initial_state.
template <class T>
void linear_attention_step(ConstVectorRef<T> q, ConstVectorRef<T> k, ConstVectorRef<T> v,
                           LinearAttentionState<T>& state, VectorRef<T> out) {
  const char* where = "linear_attention_step";
  const long dv = state.S.rows(), d = state.S.cols();
  detail::check_positive_size(where, "state.S columns (d)", d);
  detail::check_positive_size(where, "state.S rows (dv)", dv);
  detail::check_token_inputs(where, q, k, v, out, d, dv);
  detail::check_token_output_distinct(where, q, k, v, out);
  // S (dv x d) <- S + v k^T, out_r = S_r . q: the transposed use of the state kernel.
  kernels::state_update_dot<T>(std::size_t(dv), std::size_t(d), state.S.data(), std::size_t(d), T(1), v.data(),
                               k.data(), q.data(), out.data());
}

// ---------------------------------------------------------------------------
// Overloads for float and double, so that callers need not name the scalar:
// linear_attention_forward(q, k, v, out) with float or double matrices (the
// templates above stay callable as linear_attention_forward<T>(...)).
// Each overload is a template on an unused int parameter (template <int = 0>):
// as a plain inline function it would instantiate the float and the double op
// in every translation unit that includes this header, called or not (GCC
// spent about 15 s parsing mesaopt/ops.hpp that way; docs/building.md); a
// template is instantiated only where it is called. f<float>(...) still names
// the generic template (a type is not an int), and a call with the exact Ref
// types picks the overload as the more specialised template.
#define MESAOPT_LINEAR_ATTENTION_OVERLOADS(S)                                                                   \
  template <int = 0> inline void linear_attention_forward(ConstMatrixRef<S> q, ConstMatrixRef<S> k, ConstMatrixRef<S> v,          \
                                       MatrixRef<S> out, const LinearAttentionState<S>* initial = nullptr,     \
                                       LinearAttentionState<S>* final = nullptr) {                             \
    linear_attention_forward<S>(q, k, v, out, initial, final);                                                 \
  }                                                                                                            \
  template <int = 0> inline void linear_attention_backward(ConstMatrixRef<S> q, ConstMatrixRef<S> k, ConstMatrixRef<S> v,         \
                                        ConstMatrixRef<S> dout, MatrixRef<S> dq, MatrixRef<S> dk,              \
                                        MatrixRef<S> grad_v, const LinearAttentionState<S>* initial = nullptr, \
                                        const LinearAttentionState<S>* grad_final = nullptr,                   \
                                        LinearAttentionState<S>* grad_initial = nullptr) {                     \
    linear_attention_backward<S>(q, k, v, dout, dq, dk, grad_v, initial, grad_final, grad_initial);            \
  }                                                                                                            \
  template <int = 0> inline void linear_attention_forward_recurrent(ConstMatrixRef<S> q, ConstMatrixRef<S> k, ConstMatrixRef<S> v, \
                                                 MatrixRef<S> out, const LinearAttentionState<S>* initial = nullptr, \
                                                 LinearAttentionState<S>* final = nullptr) {                   \
    linear_attention_forward_recurrent<S>(q, k, v, out, initial, final);                                       \
  }                                                                                                            \
  template <int = 0> inline void linear_attention_backward_recurrent(                                                             \
      ConstMatrixRef<S> q, ConstMatrixRef<S> k, ConstMatrixRef<S> v, ConstMatrixRef<S> dout, MatrixRef<S> dq,  \
      MatrixRef<S> dk, MatrixRef<S> grad_v, const LinearAttentionState<S>* initial = nullptr,                  \
      const LinearAttentionState<S>* grad_final = nullptr, LinearAttentionState<S>* grad_initial = nullptr) {   \
    linear_attention_backward_recurrent<S>(q, k, v, dout, dq, dk, grad_v, initial, grad_final, grad_initial);  \
  }                                                                                                            \
  template <int = 0> inline void linear_attention_forward_chunked(ConstMatrixRef<S> q, ConstMatrixRef<S> k, ConstMatrixRef<S> v,  \
                                               MatrixRef<S> out, long chunk = 0,                               \
                                               const LinearAttentionState<S>* initial = nullptr,               \
                                               LinearAttentionState<S>* final = nullptr) {                     \
    linear_attention_forward_chunked<S>(q, k, v, out, chunk, initial, final);                                  \
  }                                                                                                            \
  template <int = 0> inline void linear_attention_backward_chunked(                                                               \
      ConstMatrixRef<S> q, ConstMatrixRef<S> k, ConstMatrixRef<S> v, ConstMatrixRef<S> dout, MatrixRef<S> dq,  \
      MatrixRef<S> dk, MatrixRef<S> grad_v, long chunk = 0, const LinearAttentionState<S>* initial = nullptr,  \
      const LinearAttentionState<S>* grad_final = nullptr, LinearAttentionState<S>* grad_initial = nullptr) {   \
    linear_attention_backward_chunked<S>(q, k, v, dout, dq, dk, grad_v, chunk, initial, grad_final,            \
                                         grad_initial);                                                        \
  }                                                                                                            \
  template <int = 0> inline void linear_attention_step(ConstVectorRef<S> q, ConstVectorRef<S> k, ConstVectorRef<S> v,             \
                                    LinearAttentionState<S>& state, VectorRef<S> out) {                        \
    linear_attention_step<S>(q, k, v, state, out);                                                             \
  }
MESAOPT_LINEAR_ATTENTION_OVERLOADS(float)
MESAOPT_LINEAR_ATTENTION_OVERLOADS(double)
#undef MESAOPT_LINEAR_ATTENTION_OVERLOADS

}  // namespace mesaopt
