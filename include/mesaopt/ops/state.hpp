#pragma once
// The state an op carries from one piece of a sequence to the next
// (docs/math.md §6). With it a long sequence can be processed in pieces,
// decoded one token at a time, or trained by truncated backprop through time:
// the final state of one piece is the initial state of the next, and the
// gradient of the initial state of one piece is the gradient of the final
// state of the piece before.
//
//   LinearAttentionState  S_t = S_0 + sum_{i<=t} v_i k_i^T          (M13), dv x d
//   MesaState             R_t (d x d, SPD), S_t (dv x d)             (M15)
//   SoftmaxKVCache        the keys (P x d) and values (P x dv) seen so far (M19)
//
// The same types hold gradients: a LinearAttentionState whose S is dL/dS, a
// MesaState whose R, S are dL/dR, dL/dS, a SoftmaxKVCache whose keys and values
// are dL/dk_i, dL/dv_i of the cached tokens.
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

namespace mesaopt {

// Linear attention's state: S = sum of v k^T over the tokens seen (dv x d).
template <class T>
struct LinearAttentionState {
  RowMatrix<T> S;  // (dv, d)
};

// The mesa layer's state: R = (sum gamma^{t-i} k k^T + gamma^t R_0^{-1})^{-1}
// (d x d, symmetric positive definite) and S = sum gamma^{t-i} v k^T (dv x d).
template <class T>
struct MesaState {
  RowMatrix<T> R;  // (d, d)
  RowMatrix<T> S;  // (dv, d)
};

// The empty linear-attention state: S = 0.
template <class T>
LinearAttentionState<T> linear_attention_initial_state(long d, long dv) {
  detail::check_positive_size("linear_attention_initial_state", "d", d);
  detail::check_positive_size("linear_attention_initial_state", "dv", dv);
  return {RowMatrix<T>::Zero(dv, d)};
}

// Softmax attention's state: every key and value seen so far, in order.
// Storage grows geometrically, so appending one token at a time is amortised O(d + dv).
template <class T>
class SoftmaxKVCache {
 public:
  using ConstMap = Eigen::Map<const RowMatrix<T>>;
  using Map = Eigen::Map<RowMatrix<T>>;

  SoftmaxKVCache() = default;
  // An empty cache for keys of width d and values of width dv.
  SoftmaxKVCache(long d, long dv) : d_(d), dv_(dv) {
    detail::check_positive_size("SoftmaxKVCache", "d", d);
    detail::check_positive_size("SoftmaxKVCache", "dv", dv);
  }
  // A cache holding the given keys (P, d) and values (P, dv).
  SoftmaxKVCache(ConstMatrixRef<T> keys, ConstMatrixRef<T> values) : SoftmaxKVCache(keys.cols(), values.cols()) {
    append(keys, values);
  }

  long length() const { return n_; }     // P, tokens held
  long key_dim() const { return d_; }    // d
  long value_dim() const { return dv_; } // dv

  ConstMap keys() const { return ConstMap(k_.data(), n_, d_); }      // (P, d)
  ConstMap values() const { return ConstMap(v_.data(), n_, dv_); }   // (P, dv)
  Map keys() { return Map(k_.data(), n_, d_); }
  Map values() { return Map(v_.data(), n_, dv_); }

  // Appends the rows of keys (n, d) and values (n, dv).
  void append(ConstMatrixRef<T> keys, ConstMatrixRef<T> values) {
    const char* where = "SoftmaxKVCache::append";
    detail::check_size(where, "columns of keys", keys.cols(), d_, "the cache's key_dim()");
    detail::check_size(where, "columns of values", values.cols(), dv_, "the cache's value_dim()");
    detail::check_size(where, "rows of values", values.rows(), keys.rows(), "rows of keys");
    const long n = keys.rows();
    grow(n_ + n);
    for (long i = 0; i < n; ++i) {
      std::copy(keys.row(i).data(), keys.row(i).data() + d_, k_.data() + (n_ + i) * d_);
      std::copy(values.row(i).data(), values.row(i).data() + dv_, v_.data() + (n_ + i) * dv_);
    }
    n_ += n;
  }
  // Appends one token: k has d entries, v has dv entries.
  void append(const T* k, const T* v) {
    grow(n_ + 1);
    std::copy(k, k + d_, k_.data() + n_ * d_);
    std::copy(v, v + dv_, v_.data() + n_ * dv_);
    ++n_;
  }
  // Sets the length to n <= length() (n = 0: empty); keeps the storage.
  void truncate(long n) {
    if (n < 0 || n > n_) detail::fail("SoftmaxKVCache::truncate", "n must lie in [0, ", n_, "], got ", n);
    n_ = n;
  }
  void clear() { n_ = 0; }
  // Reserves room for n tokens.
  void reserve(long n) {
    if (n > 0) {
      k_.reserve(std::size_t(n * d_));
      v_.reserve(std::size_t(n * dv_));
    }
  }

 private:
  void grow(long n) {
    if (std::size_t(n * d_) > k_.size()) {
      const long cap = std::max(n, 2 * n_);
      k_.resize(std::size_t(cap * d_));
      v_.resize(std::size_t(cap * dv_));
    }
  }

  long d_ = 0, dv_ = 0, n_ = 0;
  std::vector<T> k_, v_;  // row-major, capacity >= n_ rows
};

namespace detail {

// Throws unless state->S is dv x d and finite.
template <class T>
void check_linear_attention_state(const char* where, const char* what, const LinearAttentionState<T>& s, long d,
                                  long dv) {
  if (s.S.rows() != dv || s.S.cols() != d)
    fail(where, what, ".S is ", s.S.rows(), " x ", s.S.cols(), " but must be dv x d = ", dv, " x ", d);
  if (!s.S.allFinite()) fail(where, what, ".S has a non-finite entry");
}

// Throws unless the KV cache has key width d and value width dv.
template <class T>
void check_kv_cache(const char* where, const char* what, const SoftmaxKVCache<T>& c, long d, long dv) {
  if (c.key_dim() != d || c.value_dim() != dv)
    fail(where, what, " holds keys of width ", c.key_dim(), " and values of width ", c.value_dim(),
         " but the inputs have d = ", d, ", dv = ", dv);
}

}  // namespace detail

}  // namespace mesaopt
