#pragma once
// Multi-head causal softmax self-attention layer (docs/math.md §2, M4; state §6, M19):
//
//   per head h:  q, k, v = W_q,h e, W_k,h e, W_v,h e
//                o_t = sum_{i<=t} softmax_i((q_t . k_i) / sqrt(d)) v_i      (M4)
//   output:      Delta e_t = sum_h P_h o_{h,t}  (= O W_o^T)
//
// No biases. The per-head op is the tiled (flash) softmax_attention_forward /
// _backward of ops/softmax_attention.hpp with its default tiles; the state of a
// head is its key/value cache (SoftmaxKVCache). The plumbing is the shared
// skeleton of layers/multi_head_attention.hpp.
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parameters.hpp>
#include <mesaopt/layers/multi_head_attention.hpp>
#include <mesaopt/ops/softmax_attention.hpp>

#include <string>
#include <vector>

namespace mesaopt {

struct SoftmaxAttentionLayerConfig {
  long D = 0;           // model width (token size)
  long H = 1;           // heads
  long d = 0;           // key/query size per head
  long dv = 0;          // value size per head
  int num_threads = 0;  // threads for forward/backward; <= 0: default_num_threads()
};

// What SoftmaxAttentionLayer::backward needs from its forward (per head: the
// op cache with the log-sum-exp per row).
template <class T>
using SoftmaxAttentionLayerCache = AttentionLayerCache<T, SoftmaxCache<T>, SoftmaxKVCache<T>>;

template <class T>
class SoftmaxAttentionLayer
    : public MultiHeadAttention<T, SoftmaxAttentionLayer<T>, SoftmaxAttentionLayerConfig,
                                SoftmaxAttentionLayerCache<T>, SoftmaxKVCache<T>> {
  using Skeleton = MultiHeadAttention<T, SoftmaxAttentionLayer<T>, SoftmaxAttentionLayerConfig,
                                      SoftmaxAttentionLayerCache<T>, SoftmaxKVCache<T>>;
  friend Skeleton;

 public:
  using Config = SoftmaxAttentionLayerConfig;
  using Cache = SoftmaxAttentionLayerCache<T>;
  static constexpr const char* kName = "SoftmaxAttentionLayer";

  explicit SoftmaxAttentionLayer(const Config& config) : Skeleton(checked(config)) {}

  // Probe (read-only: touches no weight, gradient or cache). x is (B*T, D),
  // sequence-major. Returns B*H matrices, item b*H + h: head h's causal
  // attention probabilities a_{t,i} = softmax_{i<=t}((q_t . k_i) / sqrt(d)) on
  // sequence b (M4), (T, T), row t = query position t, column i = key position
  // i; rows sum to 1 and entries above the diagonal are 0. Same projections as
  // forward; the probabilities come from the plain max-subtracted
  // softmax_attention_probabilities (ops/softmax_attention.hpp), so they match
  // what the tiled forward uses to rounding (the tiled kernel never
  // materialises them). O(B H T^2) memory.
  std::vector<RowMatrix<T>> attention_probabilities(ConstMatrixRef<T> x, long seq_len) const {
    const char* where = "SoftmaxAttentionLayer::attention_probabilities";
    const long B = detail::check_layer_input<T>(where, x, seq_len, this->config_.D);
    const int threads = detail::resolve_num_threads(this->config_.num_threads);
    detail::ScopedSerialEigen serial_eigen;
    const long H = this->config_.H, d = this->config_.d;
    RowMatrix<T> qkv;
    this->project_qkv(x, qkv, threads);
    std::vector<RowMatrix<T>> probs(static_cast<std::size_t>(B * H));
    detail::parallel_for_rethrow(B * H, threads, [&](std::ptrdiff_t item) {
      const long b = long(item) / H, h = long(item) % H, r0 = b * seq_len;
      probs[std::size_t(item)] = softmax_attention_probabilities<T>(
          qkv.block(r0, this->q_col(h), seq_len, d), qkv.block(r0, this->k_col(h), seq_len, d));  // M4
    });
    return probs;
  }

 private:
  static const Config& checked(const Config& c) {
    detail::check_attention_sizes(kName, c.D, c.H, c.d, c.dv);
    return c;
  }

  // Hooks of the skeleton.
  bool normalizes_qk() const { return false; }
  SoftmaxKVCache<T> head_initial_state(long) const { return SoftmaxKVCache<T>(this->config_.d, this->config_.dv); }
  void prepare(Cache&, const char*) {}
  void prepare_step(const char*) {}
  template <class Q, class K, class V, class O>
  void head_forward(Cache& cache, std::size_t item, long, const Q& q, const K& k, const V& v, O&& out,
                    const SoftmaxKVCache<T>* initial, SoftmaxKVCache<T>* final) {
    softmax_attention_forward<T>(q, k, v, SoftmaxAttentionOptions{}, out, cache.heads[item], initial, final);  // M4
  }
  template <class Q, class K, class V, class G, class DQ, class DK, class DV>
  void head_backward(Cache& cache, std::size_t item, long, const Q& q, const K& k, const V& v, const G& dout,
                     DQ& dq, DK& dk, DV&& grad_v, const SoftmaxKVCache<T>* initial,
                     const SoftmaxKVCache<T>* grad_final, SoftmaxKVCache<T>* grad_initial) {
    softmax_attention_backward<T>(q, k, v, SoftmaxAttentionOptions{}, dout, cache.heads[item], dq, dk, grad_v,
                                  initial, grad_final, grad_initial);  // M4 backward, M19
  }
  void begin_backward(Cache&, long) {}
  void end_backward(Cache&, long) {}
  template <class Q, class K, class V, class O>
  void head_step(long, const Q& q, const K& k, const V& v, SoftmaxKVCache<T>& state, O&& out) {
    softmax_attention_step<T>(q, k, v, state, out);  // M19, one token
  }
  void extra_parameters(std::vector<ParameterView<T>>&, const std::string&) {}
  void reset_extra_parameters() {}
};

}  // namespace mesaopt
