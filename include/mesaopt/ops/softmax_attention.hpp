#pragma once
// Causal softmax attention, one head, one sequence (MATH.md §2, M4):
//
//   s_{t,i} = (q_t . k_i) / sqrt(d),   a_{t,i} = softmax_{i<=t}(s_{t,.}),   o_t = sum_{i<=t} a_{t,i} v_i
//
// Tiled ("flash") forward: query rows are processed in blocks of Br, keys in
// blocks of Bc; each tile of logits Q_b K_b^T is an Eigen GEMM, exponentiated
// with Eigen's vectorised exp against a running max, and P_b V_b is a second
// GEMM into a running output. Per query row we carry the running max m and
// running sum l; the T x T matrix is never formed (scratch O(Br Bc + Br dv)).
// The cache saves lse_t = log sum_{i<=t} exp(s_{t,i}) and a copy of o_t.
//
// Backward (flash style): D_t = g_t . o_t; for each key block, for each query
// block at or below it, recompute P = exp(s - lse) from the cache, then
//   dV_b += P^T dO,  dP = dO V_b^T,  dS = P o (dP - D) / sqrt(d),
//   dQ += dS K_b,    dK_b += dS^T Q.
// (dS = P o (dP - D) is ds_{t,i} = a_{t,i} (da_{t,i} - sum_j a_{t,j} da_{t,j})
//  of M4, since sum_j a_{t,j} (g_t . v_j) = g_t . o_t = D_t.)
//
// Functional: no global state; all scratch is local or in the caller's cache,
// so different sequences may be processed from different threads at once.
// Backward OVERWRITES dq, dk, dv (it does not accumulate).
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>

#include <mesaopt/common/parallel.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

// Each op call runs its Eigen GEMMs on the calling thread only
// (detail::ScopedSerialEigen, common/parallel.hpp): parallelism belongs to the
// caller, one call per (batch, head); outside a parallel region Eigen would
// otherwise split even a 64 x 64 tile product over all threads (measured up to
// 30x slower on the shared 2-core machine, docs/linear_attention.md).

namespace mesaopt {

// What softmax_attention_backward needs from the forward pass.
// Memory: T (lse) + T dv (out) scalars per sequence.
template <class T>
struct SoftmaxCache {
  Vector<T> lse;     // (T) per-row log-sum-exp of the scaled logits s_{t,i}, i <= t
  RowMatrix<T> out;  // (T, dv) copy of the output; backward needs D_t = dout_t . out_t
  long d = 0;        // key width the cache was made with
};

// Tile sizes of the flash kernels (tokens). The defaults were measured on this
// machine (docs/softmax_attention.md); tests use small odd tiles to exercise
// tile edges.
struct SoftmaxAttentionTiles {
  long query_rows = 64;  // Br
  long key_rows = 128;   // Bc
};

namespace detail {

inline void check_softmax_tiles(const char* where, const SoftmaxAttentionTiles& tiles) {
  check_positive_size(where, "tiles.query_rows", tiles.query_rows);
  check_positive_size(where, "tiles.key_rows", tiles.key_rows);
}

template <class T>
void check_softmax_attention_inputs(const char* where, const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k,
                                    const ConstMatrixRef<T>& v) {
  check_positive_size(where, "T (rows of q)", q.rows());
  check_positive_size(where, "d (columns of q)", q.cols());
  check_positive_size(where, "dv (columns of v)", v.cols());
  check_shape(where, "k", k, q.rows(), q.cols());
  check_shape(where, "v", v, q.rows(), v.cols());
}

template <class T>
void check_softmax_cache(const char* where, const SoftmaxCache<T>& sc, long n, long d, long dv) {
  if (sc.lse.size() != n || sc.out.rows() != n || sc.out.cols() != dv || sc.d != d) {
    fail(where, "cache was made for T = ", sc.lse.size(), ", d = ", sc.d, ", dv = ", sc.out.cols(),
         " (out ", sc.out.rows(), " x ", sc.out.cols(), ") but the inputs have T = ", n, ", d = ", d, ", dv = ", dv);
  }
}

}  // namespace detail

// q, k are (T, d); v is (T, dv); out is (T, dv); one token per row.
// Fills sc (resized here) with lse and a copy of out for the backward pass.
template <class T>
void softmax_attention_forward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v, MatrixRef<T> out,
                               SoftmaxCache<T>& sc, const SoftmaxAttentionTiles& tiles = {}) {
  const char* where = "softmax_attention_forward";
  detail::check_softmax_attention_inputs<T>(where, q, k, v);
  detail::check_shape(where, "out", out, q.rows(), v.cols());
  detail::check_softmax_tiles(where, tiles);
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  const long Br = std::min(tiles.query_rows, n), Bc = std::min(tiles.key_rows, n);
  const T scale = T(1) / std::sqrt(T(d));
  sc.lse.resize(n);
  sc.d = d;
  const detail::ScopedSerialEigen serial;

  RowMatrix<T> S(Br, Bc);     // raw logits q_t . k_i of one tile, then P in place
  RowMatrix<T> acc(Br, dv);   // running sum_i exp(s_{t,i} - m_t) v_i
  Vector<T> m(Br), l(Br);     // running max of raw logits, running sum of exp
  for (long r0 = 0; r0 < n; r0 += Br) {
    const long br = std::min(Br, n - r0);
    const auto Qb = q.middleRows(r0, br);
    m.setConstant(-std::numeric_limits<T>::infinity());
    l.setZero();
    acc.topRows(br).setZero();
    // Key blocks up to the last query row of this block (causal).
    for (long c0 = 0; c0 < r0 + br; c0 += Bc) {
      const long bc = std::min(Bc, r0 + br - c0);
      auto Sb = S.topLeftCorner(br, bc);
      Sb.noalias() = Qb * k.middleRows(c0, bc).transpose();
      for (long i = 0; i < br; ++i) {
        // Keys c0 .. c0 + valid - 1 are at or before query t = r0 + i.
        const long valid = std::min(bc, r0 + i - c0 + 1);
        auto row = Sb.row(i);
        if (valid <= 0) {  // the whole tile lies after this query (only when Bc > Br)
          row.setZero();
          continue;
        }
        // s = scale * raw and scale > 0, so the max of s is scale * max(raw).
        const T m_new = std::max(m(i), row.head(valid).maxCoeff());
        const T alpha = std::exp(scale * (m(i) - m_new));  // 0 on the first tile (m = -inf)
        row.head(valid) = ((row.head(valid).array() - m_new) * scale).exp();
        row.tail(bc - valid).setZero();
        l(i) = l(i) * alpha + row.head(valid).sum();
        if (alpha != T(1)) acc.row(i) *= alpha;
        m(i) = m_new;
      }
      acc.topRows(br).noalias() += Sb * v.middleRows(c0, bc);
    }
    for (long i = 0; i < br; ++i) {
      out.row(r0 + i) = acc.row(i) / l(i);
      sc.lse(r0 + i) = scale * m(i) + std::log(l(i));
    }
  }
  sc.out = out;
}

// dout is (T, dv) = dL/dout; sc from softmax_attention_forward on the same
// q, k, v. Writes (overwrites) dq, dk (T, d) and dv_ (T, dv).
template <class T>
void softmax_attention_backward(ConstMatrixRef<T> q, ConstMatrixRef<T> k, ConstMatrixRef<T> v,
                                ConstMatrixRef<T> dout, const SoftmaxCache<T>& sc, MatrixRef<T> dq, MatrixRef<T> dk,
                                MatrixRef<T> dv_, const SoftmaxAttentionTiles& tiles = {}) {
  const char* where = "softmax_attention_backward";
  detail::check_softmax_attention_inputs<T>(where, q, k, v);
  const long n = q.rows(), d = q.cols(), dv = v.cols();
  detail::check_shape(where, "dout", dout, n, dv);
  detail::check_softmax_cache<T>(where, sc, n, d, dv);
  detail::check_shape(where, "dq", dq, n, d);
  detail::check_shape(where, "dk", dk, n, d);
  detail::check_shape(where, "dv", dv_, n, dv);
  detail::check_softmax_tiles(where, tiles);
  const long Br = std::min(tiles.query_rows, n), Bc = std::min(tiles.key_rows, n);
  const T scale = T(1) / std::sqrt(T(d));

  const detail::ScopedSerialEigen serial;
  // D_t = g_t . o_t = sum_j a_{t,j} da_{t,j}  (M4)
  const Vector<T> D = (dout.array() * sc.out.array()).rowwise().sum();
  RowMatrix<T> P(Br, Bc), dP(Br, Bc);
  RowMatrix<T> dKb(Bc, d), dVb(Bc, dv);
  dq.setZero();
  for (long c0 = 0; c0 < n; c0 += Bc) {
    const long bc = std::min(Bc, n - c0);
    const auto Kb = k.middleRows(c0, bc);
    const auto Vb = v.middleRows(c0, bc);
    auto dK = dKb.topRows(bc);
    auto dV = dVb.topRows(bc);
    dK.setZero();
    dV.setZero();
    // Query blocks that contain a row t >= c0 (causal: key i contributes to t >= i).
    for (long r0 = (c0 / Br) * Br; r0 < n; r0 += Br) {
      const long br = std::min(Br, n - r0);
      const auto Qb = q.middleRows(r0, br);
      const auto dOb = dout.middleRows(r0, br);
      auto Pb = P.topLeftCorner(br, bc);
      auto dPb = dP.topLeftCorner(br, bc);
      // forward: a_{t,i} = exp(s_{t,i} - lse_t), recomputed from the cache.
      Pb.noalias() = Qb * Kb.transpose();
      for (long i = 0; i < br; ++i) {
        const long valid = std::min(bc, r0 + i - c0 + 1);
        auto row = Pb.row(i);
        if (valid <= 0) {
          row.setZero();
          continue;
        }
        row.head(valid) = (row.head(valid).array() * scale - sc.lse(r0 + i)).exp();
        row.tail(bc - valid).setZero();
      }
      // forward: o_t = sum_i a_{t,i} v_i  =>  dv_i += a_{t,i} g_t,  da_{t,i} = g_t . v_i
      dV.noalias() += Pb.transpose() * dOb;
      dPb.noalias() = dOb * Vb.transpose();
      // forward: a = softmax(s)  =>  ds_{t,i} = a_{t,i} (da_{t,i} - D_t); s = q.k / sqrt(d)
      for (long i = 0; i < br; ++i)
        dPb.row(i).array() = Pb.row(i).array() * (dPb.row(i).array() - D(r0 + i)) * scale;
      dq.middleRows(r0, br).noalias() += dPb * Kb;
      dK.noalias() += dPb.transpose() * Qb;
    }
    dk.middleRows(c0, bc) = dK;
    dv_.middleRows(c0, bc) = dV;
  }
}

// Non-template overloads are not needed: T is deduced from the cache.

}  // namespace mesaopt
