#pragma once
// Causal softmax attention, one head, one sequence (docs/math.md §2, M4; a
// key/value prefix, §6 M19):
//
//   s_{t,i} = (q_t . k_i) / sqrt(d),   a_{t,i} = softmax_{i<=t}(s_{t,.}),   o_t = sum_{i<=t} a_{t,i} v_i
//
// Tiled ("flash") forward: query rows are processed in blocks of Br, keys in
// blocks of Bc; each tile of logits Q_b K_b^T is a GEMM (kernels::gemm against
// K^T, transposed once per call), exponentiated with Eigen's vectorised exp
// against a running max, and P_b V_b is a second GEMM into a running output. Per query row we carry the running max m and
// running sum l; the seq_len x seq_len matrix is never formed (scratch
// O(Br Bc + Br dv)). The cache saves lse_t = log sum_{i<=t} exp(s_{t,i}) and a
// copy of o_t.
//
// Backward (flash style): D_t = g_t . o_t; for each key block, for each query
// block at or below it, recompute P = exp(s - lse) from the cache, then
//   dV_b += P^T dO,  dP = dO V_b^T,  dS = P o (dP - D) / sqrt(d),
//   dQ += dS K_b,    dK_b += dS^T Q.
// (dS = P o (dP - D) is ds_{t,i} = a_{t,i} (da_{t,i} - sum_j a_{t,j} da_{t,j})
//  of M4, since sum_j a_{t,j} (g_t . v_j) = g_t . o_t = D_t.)
//
// The op contract (shared with linear_attention and mesa):
//   forward (q, k, v, opt, out, cache, initial = nullptr, final = nullptr)
//   backward(q, k, v, opt, dout, cache, dq, dk, grad_v, initial = nullptr, grad_final = nullptr,
//            grad_initial = nullptr)
//   step    (q, k, v, kv_cache, out)                       one token, decoding
// The state is a SoftmaxKVCache: the P keys and values before this piece.
// Query t of the piece sits at position P + t and attends to all P cached
// tokens and to the piece's tokens up to t (M19). `final` receives the cache
// with the piece appended (it may be `initial` itself). The backward takes the
// same `initial` again, optionally the gradient of the final cache
// (`grad_final`, (P + seq_len) rows: the next piece's `grad_initial`), and
// writes the gradient of the initial cache's keys and values into
// `grad_initial`.
//
// Functional: no global state; all scratch is local or in the caller's cache,
// so different sequences may be processed from different threads at once.
// Backward OVERWRITES dq, dk, grad_v (it does not accumulate).
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parallel.hpp>
#include <mesaopt/kernels/gemm.hpp>
#include <mesaopt/ops/checks.hpp>
#include <mesaopt/ops/masked_product.hpp>
#include <mesaopt/ops/state.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

// The tile products are the kernels' GEMMs (kernels/gemm.hpp): at the paper's
// T = 50 and d = 20 Eigen's GEMM packed both operands on every call and ran
// its remainder rows in 4-wide packets, about a third of a softmax-1L training
// step (docs/softmax_attention.md, "The tile products"). Each op call runs its
// remaining Eigen products on the calling thread only (detail::ScopedSerialEigen,
// common/parallel.hpp): parallelism belongs to the caller, one call per (batch,
// head); outside a parallel region Eigen would otherwise split even a 64 x 64
// product over all threads (docs/linear_attention.md).

namespace mesaopt {

// What softmax_attention_backward needs from the forward pass.
// Memory: seq_len (lse) + seq_len dv (out) scalars per sequence.
template <class T>
struct SoftmaxCache {
  Vector<T> lse;     // (seq_len) per-row log-sum-exp of the scaled logits s_{t,i}, i <= P + t
  RowMatrix<T> out;  // (seq_len, dv) copy of the output; backward needs D_t = dout_t . out_t
  long d = 0;        // key width the cache was made with
  long prefix = 0;   // P: tokens of the initial KV cache the forward attended to
};

// Options of the softmax op: the tile sizes of the flash kernels (tokens). The
// defaults were measured (docs/softmax_attention.md); tests use small odd tiles
// to exercise tile edges.
struct SoftmaxAttentionOptions {
  long query_rows = 64;  // Br
  long key_rows = 128;   // Bc
};
using SoftmaxAttentionTiles = SoftmaxAttentionOptions;  // the name before the op contract

namespace detail {

inline void check_softmax_options(const char* where, const SoftmaxAttentionOptions& opt) {
  check_positive_size(where, "opt.query_rows", opt.query_rows);
  check_positive_size(where, "opt.key_rows", opt.key_rows);
}

template <class T>
void check_softmax_cache(const char* where, const SoftmaxCache<T>& sc, long n, long d, long dv, long prefix) {
  if (sc.lse.size() != n || sc.out.rows() != n || sc.out.cols() != dv || sc.d != d || sc.prefix != prefix) {
    fail(where, "cache was made for seq_len = ", sc.lse.size(), ", d = ", sc.d, ", dv = ", sc.out.cols(),
         ", prefix = ", sc.prefix, " (out ", sc.out.rows(), " x ", sc.out.cols(), ") but the inputs have seq_len = ", n,
         ", d = ", d, ", dv = ", dv, ", prefix = ", prefix, " (pass the same initial cache as to the forward)");
  }
}

// Columns of a tile of logits or probabilities: the key block's width rounded
// up to whole packets of Eigen's exp, which then never runs its scalar tail
// (std::exp, one call per entry: 9 % of a softmax-1L step at T = 50 when
// the rows had 1-50 entries; docs/softmax_attention.md). The extra columns
// are scratch: exponentiated with the row, never read by a product.
template <class T>
long tile_columns(long keys) {
  constexpr long W = Eigen::internal::packet_traits<T>::size;
  return (keys + W - 1) / W * W;
}

// The first n entries of a row of a tile_columns-wide tile, rounded up to
// whole packets: the span an elementwise exp runs over (the entries past n
// are scratch; see tile_columns).
template <class T>
Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>> packet_span(T* row, long n, long row_capacity) {
  return {row, std::min(tile_columns<T>(n), row_capacity)};
}

// [initial keys; k] (P + n rows), or k itself when there is no prefix.
template <class T>
struct PrefixedRows {
  RowMatrix<T> storage;
  ConstMatrixRef<T> view;
  PrefixedRows(const ConstMatrixRef<T>& rows, const T* prefix, long prefix_rows)
      : storage(prefix_rows > 0 ? prefix_rows + rows.rows() : 0, prefix_rows > 0 ? rows.cols() : 0),
        view(prefix_rows > 0 ? ConstMatrixRef<T>(storage) : rows) {
    if (prefix_rows > 0) {
      storage.topRows(prefix_rows) = Eigen::Map<const RowMatrix<T>>(prefix, prefix_rows, rows.cols());
      storage.bottomRows(rows.rows()) = rows;
    }
  }
};

// The tiled forward over queries q (n, d) at positions P .. P+n-1 and keys K,
// values V (P + n rows): query t attends keys 0 .. P + t.
template <class T>
void softmax_forward_tiled(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                           long P, MatrixRef<T> out, SoftmaxCache<T>& sc, const SoftmaxAttentionOptions& opt) {
  const long n = q.rows(), d = q.cols(), dv = V.cols(), nk = K.rows();
  const long Br = std::min(opt.query_rows, n), Bc = std::min(opt.key_rows, nk);
  const T scale = T(1) / std::sqrt(T(d));
  sc.lse.resize(n);
  sc.d = d;
  sc.prefix = P;
  const ScopedSerialEigen serial;

  const RowMatrix<T> Kt = K.transpose();  // (d, P + n): the right factor of Q K^T, row-major
  RowMatrix<T> S = RowMatrix<T>::Zero(Br, tile_columns<T>(Bc));  // raw logits q_t . k_i of one tile, then P in place
  RowMatrix<T> acc(Br, dv);   // running sum_i exp(s_{t,i} - m_t) v_i
  Vector<T> m(Br), l(Br);     // running max of raw logits, running sum of exp
  for (long r0 = 0; r0 < n; r0 += Br) {
    const long br = std::min(Br, n - r0);
    const auto Qb = q.middleRows(r0, br);
    m.setConstant(-std::numeric_limits<T>::infinity());
    l.setZero();
    acc.topRows(br).setZero();
    // Key blocks up to the last query row of this block (causal).
    const long key_end = P + r0 + br;
    for (long c0 = 0; c0 < key_end; c0 += Bc) {
      const long bc = std::min(Bc, key_end - c0);
      auto Sb = S.topLeftCorner(br, bc);
      kernels::gemm<T>(std::size_t(br), std::size_t(bc), std::size_t(d), Qb.data(), std::size_t(q.outerStride()),
                       Kt.data() + c0, std::size_t(Kt.outerStride()), S.data(), std::size_t(S.outerStride()), false);
      for (long i = 0; i < br; ++i) {
        // Keys c0 .. c0 + valid - 1 are at or before query t = r0 + i (position P + t).
        const long valid = std::min(bc, P + r0 + i - c0 + 1);
        auto row = Sb.row(i);
        if (valid <= 0) {  // the whole tile lies after this query
          row.setZero();
          continue;
        }
        // s = scale * raw and scale > 0, so the max of s is scale * max(raw).
        const T m_new = std::max(m(i), row.head(valid).maxCoeff());
        const T alpha = std::exp(scale * (m(i) - m_new));  // 0 on the first tile (m = -inf)
        auto span = packet_span(row.data(), valid, S.cols());
        span = ((span - m_new) * scale).exp();
        row.tail(bc - valid).setZero();
        l(i) = l(i) * alpha + row.head(valid).sum();
        if (alpha != T(1)) acc.row(i) *= alpha;
        m(i) = m_new;
      }
      // acc += Sb V over the keys each query may see (masked_product.hpp: a
      // non-finite value in a later token's v must not reach earlier outputs).
      const auto Vb = V.middleRows(c0, bc);
      detail::masked_product_with(
          Sb, [](long) { return 0L; }, [&](long i) { return P + r0 + i - c0 + 1; }, Vb, acc.topRows(br),
          /*accumulate=*/true, [&] {
            kernels::gemm<T>(std::size_t(br), std::size_t(dv), std::size_t(bc), S.data(), std::size_t(S.outerStride()),
                             Vb.data(), std::size_t(V.outerStride()), acc.data(), std::size_t(acc.outerStride()), true);
          });
    }
    for (long i = 0; i < br; ++i) {
      out.row(r0 + i) = acc.row(i) / l(i);
      sc.lse(r0 + i) = scale * m(i) + std::log(l(i));
    }
  }
  sc.out = out;
}

// The tiled backward for the same layout; writes dq (n, d) and dK, dV (P + n rows).
template <class T>
void softmax_backward_tiled(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& K, const ConstMatrixRef<T>& V,
                            long P, const ConstMatrixRef<T>& dout, const SoftmaxCache<T>& sc, MatrixRef<T> dq,
                            MatrixRef<T> dK_all, MatrixRef<T> dV_all, const SoftmaxAttentionOptions& opt) {
  const long n = q.rows(), d = q.cols(), dv = V.cols(), nk = K.rows();
  const long Br = std::min(opt.query_rows, n), Bc = std::min(opt.key_rows, nk);
  const T scale = T(1) / std::sqrt(T(d));

  const ScopedSerialEigen serial;
  // D_t = g_t . o_t = sum_j a_{t,j} da_{t,j}  (M4), rounded as an entry of the
  // GEMM dP = dO V^T below (kernels::gemm_entry): where o_t = v_i exactly (the
  // first token: a_{0,0} = 1) da_{t,i} - D_t is then exactly 0, as is the
  // gradient it carries.
  Vector<T> D(n);
  for (long t = 0; t < n; ++t)
    D(t) = kernels::gemm_entry<T>(std::size_t(dv), dout.row(t).data(), 1, sc.out.row(t).data(), 1);
  // K^T and V^T, row-major: the right factors of Q K^T and dO V^T.
  const RowMatrix<T> Kt = K.transpose(), Vt = V.transpose();
  RowMatrix<T> Pm = RowMatrix<T>::Zero(Br, tile_columns<T>(Bc)), dP(Br, Bc);
  RowMatrix<T> dKb(Bc, d), dVb(Bc, dv);
  // dq sums over key tiles in a buffer of our own, copied out at the end: the
  // small products vectorise their destination with alignment peeling, so
  // accumulating into the caller's memory made dq depend on where that memory
  // starts (a NumPy output 8 bytes past a 32-byte boundary gave other bits).
  RowMatrix<T> dq_sum = RowMatrix<T>::Zero(n, d);
  for (long c0 = 0; c0 < nk; c0 += Bc) {
    const long bc = std::min(Bc, nk - c0);
    const auto Kb = K.middleRows(c0, bc);
    auto dK = dKb.topRows(bc);
    auto dV = dVb.topRows(bc);
    dK.setZero();
    dV.setZero();
    // Query blocks that contain a row t with P + t >= c0 (key i contributes to positions >= i).
    for (long r0 = (std::max(0L, c0 - P) / Br) * Br; r0 < n; r0 += Br) {
      const long br = std::min(Br, n - r0);
      const auto Qb = q.middleRows(r0, br);
      const auto dOb = dout.middleRows(r0, br);
      auto Pb = Pm.topLeftCorner(br, bc);
      auto dPb = dP.topLeftCorner(br, bc);
      // forward: a_{t,i} = exp(s_{t,i} - lse_t), recomputed from the cache.
      kernels::gemm<T>(std::size_t(br), std::size_t(bc), std::size_t(d), Qb.data(), std::size_t(q.outerStride()),
                       Kt.data() + c0, std::size_t(Kt.outerStride()), Pm.data(), std::size_t(Pm.outerStride()), false);
      for (long i = 0; i < br; ++i) {
        const long valid = std::min(bc, P + r0 + i - c0 + 1);
        auto row = Pb.row(i);
        if (valid <= 0) {
          row.setZero();
          continue;
        }
        auto span = packet_span(row.data(), valid, Pm.cols());
        span = (span * scale - sc.lse(r0 + i)).exp();
        row.tail(bc - valid).setZero();
      }
      // Query row i sees the keys [0, valid(i)) of this tile; key j is seen by
      // the query rows [first_query(j), br). Products go through masked_product
      // so that non-finite values never cross the mask.
      const auto valid = [&](long i) { return P + r0 + i - c0 + 1; };
      const auto first_query = [&](long j) { return c0 + j - P - r0; };
      const auto all_queries = [&](long) { return br; };
      // forward: o_t = sum_i a_{t,i} v_i  =>  dv_i += a_{t,i} g_t,  da_{t,i} = g_t . v_i
      detail::masked_product_with(Pb.transpose(), first_query, all_queries, dOb, dV, /*accumulate=*/true, [&] {
        kernels::gemm_tn<T>(std::size_t(bc), std::size_t(dv), std::size_t(br), Pm.data(), std::size_t(Pm.outerStride()),
                            dOb.data(), std::size_t(dout.outerStride()), dV.data(), std::size_t(dVb.outerStride()), true);
      });
      kernels::gemm<T>(std::size_t(br), std::size_t(bc), std::size_t(dv), dOb.data(), std::size_t(dout.outerStride()),
                       Vt.data() + c0, std::size_t(Vt.outerStride()), dP.data(), std::size_t(dP.outerStride()), false);
      // forward: a = softmax(s)  =>  ds_{t,i} = a_{t,i} (da_{t,i} - D_t); s = q.k / sqrt(d).
      // Masked entries are set to 0, not computed as 0 * (g_t . v_i - D_t).
      for (long i = 0; i < br; ++i) {
        const long n_valid = std::clamp(valid(i), 0L, bc);
        auto row = dPb.row(i);
        row.head(n_valid).array() = Pb.row(i).head(n_valid).array() * (row.head(n_valid).array() - D(r0 + i)) * scale;
        row.tail(bc - n_valid).setZero();
      }
      auto dq_b = dq_sum.middleRows(r0, br);
      detail::masked_product_with(dPb, [](long) { return 0L; }, valid, Kb, dq_b, /*accumulate=*/true, [&] {
        kernels::gemm<T>(std::size_t(br), std::size_t(d), std::size_t(bc), dP.data(), std::size_t(dP.outerStride()),
                         Kb.data(), std::size_t(K.outerStride()), dq_b.data(), std::size_t(dq_sum.outerStride()), true);
      });
      detail::masked_product_with(dPb.transpose(), first_query, all_queries, Qb, dK, /*accumulate=*/true, [&] {
        kernels::gemm_tn<T>(std::size_t(bc), std::size_t(d), std::size_t(br), dP.data(), std::size_t(dP.outerStride()),
                            Qb.data(), std::size_t(q.outerStride()), dK.data(), std::size_t(dKb.outerStride()), true);
      });
    }
    dK_all.middleRows(c0, bc) = dK;
    dV_all.middleRows(c0, bc) = dV;
  }
  dq = dq_sum;
}

}  // namespace detail

// Forward. q, k are (seq_len, d); v, out are (seq_len, dv); one token per row.
// Fills sc (resized here) with lse and a copy of out for the backward pass.
template <class T>
void softmax_attention_forward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v,
                               const SoftmaxAttentionOptions& opt, MatrixRef<T> out, SoftmaxCache<T>& sc,
                               const SoftmaxKVCache<identity_t<T>>* initial = nullptr, SoftmaxKVCache<identity_t<T>>* final = nullptr) {
  const char* where = "softmax_attention_forward";
  detail::check_sequence_inputs<T>(where, q, k, v);
  detail::check_output<T>(where, "out", out, q.rows(), v.cols());
  detail::check_output_distinct<T>(where, out, q, k, v);
  detail::check_softmax_options(where, opt);
  const long d = q.cols(), dv = v.cols();
  if (initial != nullptr) detail::check_kv_cache(where, "initial", *initial, d, dv);
  const long P = initial != nullptr ? initial->length() : 0;
  {
    const detail::PrefixedRows<T> K(k, P > 0 ? initial->keys().data() : nullptr, P);
    const detail::PrefixedRows<T> V(v, P > 0 ? initial->values().data() : nullptr, P);
    detail::softmax_forward_tiled<T>(q, K.view, V.view, P, out, sc, opt);
  }
  if (final != nullptr) {
    if (final != initial) *final = initial != nullptr ? *initial : SoftmaxKVCache<T>(d, dv);
    final->append(k, v);
  }
}

// The form before the op contract: tiles last, no state.
template <class T>
void softmax_attention_forward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v, MatrixRef<T> out,
                               SoftmaxCache<T>& sc, const SoftmaxAttentionOptions& tiles = {}) {
  softmax_attention_forward<T>(q, k, v, tiles, out, sc);
}

// Backward. dout is (seq_len, dv) = dL/dout; sc from softmax_attention_forward
// on the same q, k, v and initial. Writes (overwrites) dq, dk (seq_len, d) and
// grad_v (seq_len, dv); grad_final (optional) is the gradient of the final
// cache (P + seq_len tokens); grad_initial (optional) receives the gradient of
// the initial cache's P keys and values.
template <class T>
void softmax_attention_backward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v,
                                const SoftmaxAttentionOptions& opt, ConstMatrixRef<T> dout,
                                const SoftmaxCache<T>& sc, MatrixRef<T> dq, MatrixRef<T> dk, MatrixRef<T> grad_v,
                                const SoftmaxKVCache<identity_t<T>>* initial = nullptr,
                                const SoftmaxKVCache<identity_t<T>>* grad_final = nullptr,
                                SoftmaxKVCache<identity_t<T>>* grad_initial = nullptr) {
  const char* where = "softmax_attention_backward";
  detail::check_sequence_inputs<T>(where, q, k, v);
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  detail::check_gradient_shapes<T>(where, n, d, dv, dout, dq, dk, grad_v);
  detail::check_gradients_distinct<T>(where, q, k, v, dout, dq, dk, grad_v);
  detail::check_softmax_options(where, opt);
  if (initial != nullptr) detail::check_kv_cache(where, "initial", *initial, d, dv);
  const long P = initial != nullptr ? initial->length() : 0;
  detail::check_softmax_cache<T>(where, sc, n, d, dv, P);
  if (grad_final != nullptr) {
    detail::check_kv_cache(where, "grad_final", *grad_final, d, dv);
    detail::check_size(where, "grad_final.length()", grad_final->length(), P + n,
                       "the final cache's length (initial length + seq_len)");
  }
  const detail::PrefixedRows<T> K(k, P > 0 ? initial->keys().data() : nullptr, P);
  const detail::PrefixedRows<T> V(v, P > 0 ? initial->values().data() : nullptr, P);
  if (P == 0) {
    detail::softmax_backward_tiled<T>(q, K.view, V.view, 0, dout, sc, dq, dk, grad_v, opt);
  } else {
    RowMatrix<T> dK_all(P + n, d), dV_all(P + n, dv);
    detail::softmax_backward_tiled<T>(q, K.view, V.view, P, dout, sc, dq, dK_all, dV_all, opt);
    dk = dK_all.bottomRows(n);
    grad_v = dV_all.bottomRows(n);
    if (grad_initial != nullptr) {
      *grad_initial = SoftmaxKVCache<T>(d, dv);
      grad_initial->append(dK_all.topRows(P), dV_all.topRows(P));
    }
  }
  if (grad_final != nullptr) {
    dk += grad_final->keys().bottomRows(n);
    grad_v += grad_final->values().bottomRows(n);
    if (grad_initial != nullptr && P > 0) {
      grad_initial->keys() += grad_final->keys().topRows(P);
      grad_initial->values() += grad_final->values().topRows(P);
    }
  }
  if (grad_initial != nullptr && P == 0) *grad_initial = SoftmaxKVCache<T>(d, dv);
}

// The form before the op contract: tiles last, no state.
template <class T>
void softmax_attention_backward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v,
                                ConstMatrixRef<T> dout, const SoftmaxCache<T>& sc, MatrixRef<T> dq,
                                MatrixRef<T> dk, MatrixRef<T> grad_v, const SoftmaxAttentionOptions& tiles = {}) {
  softmax_attention_backward<T>(q, k, v, tiles, dout, sc, dq, dk, grad_v);
}

// One decoding step (M19): appends (k, v) to kv_cache, then out = the softmax
// attention of q over every cached token (the new one included). q, k have d
// entries, v and out dv; kv_cache is e.g. SoftmaxKVCache<T>(d, dv).
template <class T>
void softmax_attention_step(ConstVectorRef<T> q, ConstVectorRef<T> k, ConstVectorRef<T> v,
                            SoftmaxKVCache<T>& kv_cache, VectorRef<T> out) {
  const char* where = "softmax_attention_step";
  const long d = kv_cache.key_dim(), dv = kv_cache.value_dim();
  detail::check_positive_size(where, "kv_cache.key_dim() (d)", d);
  detail::check_positive_size(where, "kv_cache.value_dim() (dv)", dv);
  detail::check_token_inputs(where, q, k, v, out, d, dv);
  detail::check_token_output_distinct(where, q, k, v, out);
  kv_cache.append(k.data(), v.data());
  const detail::ScopedSerialEigen serial;
  const T scale = T(1) / std::sqrt(T(d));
  Vector<T> s = kv_cache.keys() * q;  // raw logits q . k_i over the cache
  const T m = s.maxCoeff();
  s = ((s.array() - m) * scale).exp();
  out.noalias() = kv_cache.values().transpose() * s;
  out /= s.sum();
}

// The causal attention probabilities a_{t,i} of M4 for q, k (seq_len, d):
// (seq_len, seq_len), rows sum to 1, zero above the diagonal. Materialised,
// max-subtracted, O(seq_len^2) memory: a probe for analysis, not the forward.
// If lse != nullptr it receives lse_t = log sum_{i<=t} exp(s_{t,i}).
template <class T>
RowMatrix<T> softmax_attention_probabilities(ConstMatrixRef<T> q, ConstMatrixRef<T> k, Vector<T>* lse = nullptr) {
  const char* where = "softmax_attention_probabilities";
  detail::check_positive_size(where, "seq_len (rows of q)", q.rows());
  detail::check_positive_size(where, "d (columns of q)", q.cols());
  detail::check_shape(where, "k", k, q.rows(), q.cols());
  const long n = q.rows();
  const T scale = T(1) / std::sqrt(T(q.cols()));
  RowMatrix<T> a = RowMatrix<T>::Zero(n, n);
  if (lse != nullptr) lse->resize(n);
  for (long t = 0; t < n; ++t) {
    T mx = -std::numeric_limits<T>::infinity();
    for (long i = 0; i <= t; ++i) {
      a(t, i) = q.row(t).dot(k.row(i)) * scale;  // s_{t,i}
      mx = std::max(mx, a(t, i));
    }
    T sum = 0;
    for (long i = 0; i <= t; ++i) {
      a(t, i) = std::exp(a(t, i) - mx);
      sum += a(t, i);
    }
    for (long i = 0; i <= t; ++i) a(t, i) /= sum;
    if (lse != nullptr) (*lse)(t) = mx + std::log(sum);
  }
  return a;
}

// Overloads for float and double of the step (callers need not name the scalar; the
// sequence functions deduce T from the cache).
// Each overload is a template on an unused int parameter (template <int = 0>):
// as a plain inline function it would instantiate the float and the double op
// in every translation unit that includes this header, called or not (GCC
// spent about 15 s parsing mesaopt/ops.hpp that way; docs/building.md); a
// template is instantiated only where it is called. f<float>(...) still names
// the generic template (a type is not an int), and a call with the exact Ref
// types picks the overload as the more specialised template.
#define MESAOPT_SOFTMAX_ATTENTION_OVERLOADS(S)                                                       \
  template <int = 0> inline void softmax_attention_step(ConstVectorRef<S> q, ConstVectorRef<S> k, ConstVectorRef<S> v,  \
                                     SoftmaxKVCache<S>& kv_cache, VectorRef<S> out) {                \
    softmax_attention_step<S>(q, k, v, kv_cache, out);                                               \
  }                                                                                                  \
  template <int = 0> inline RowMatrix<S> softmax_attention_probabilities(ConstMatrixRef<S> q, ConstMatrixRef<S> k,      \
                                                      Vector<S>* lse = nullptr) {                    \
    return softmax_attention_probabilities<S>(q, k, lse);                                            \
  }
MESAOPT_SOFTMAX_ATTENTION_OVERLOADS(float)
MESAOPT_SOFTMAX_ATTENTION_OVERLOADS(double)
#undef MESAOPT_SOFTMAX_ATTENTION_OVERLOADS

}  // namespace mesaopt
