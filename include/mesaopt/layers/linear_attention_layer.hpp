#pragma once
// Multi-head causal linear self-attention layer (docs/math.md §1, M1-M3; state §6, M13-M14):
//
//   per head h:  q, k, v = W_q,h e, W_k,h e, W_v,h e    (optionally q, k L2-normalised)
//                o_t = S_t q_t,  S_t = S_0 + sum_{i<=t} v_i k_i^T      (M1-M2, M13)
//   output:      Delta e_t = sum_h P_h o_{h,t}  (= O W_o^T)
//
// No softmax, no 1/sqrt(d), no biases (docs/paper.md §2). The plumbing
// (projections, threads, state, step, backward) is the shared skeleton of
// layers/multi_head_attention.hpp; this file supplies the per-head op.
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parameters.hpp>
#include <mesaopt/layers/multi_head_attention.hpp>
#include <mesaopt/ops/linear_attention.hpp>

#include <string>
#include <vector>

namespace mesaopt {

struct LinearAttentionLayerConfig {
  long D = 0;                 // model width (token size)
  long H = 1;                 // heads
  long d = 0;                 // key/query size per head
  long dv = 0;                // value size per head
  bool normalize_qk = false;  // L2-normalise q and k per head and token
  int num_threads = 0;        // threads for forward/backward; <= 0: default_num_threads()
};

// What LinearAttentionLayer::backward needs from its forward.
template <class T>
using LinearAttentionLayerCache = AttentionLayerCache<T, detail::NoHeadCache, LinearAttentionState<T>>;

template <class T>
class LinearAttentionLayer
    : public MultiHeadAttention<T, LinearAttentionLayer<T>, LinearAttentionLayerConfig, LinearAttentionLayerCache<T>,
                                LinearAttentionState<T>> {
  using Skeleton = MultiHeadAttention<T, LinearAttentionLayer<T>, LinearAttentionLayerConfig,
                                      LinearAttentionLayerCache<T>, LinearAttentionState<T>>;
  friend Skeleton;

 public:
  using Config = LinearAttentionLayerConfig;
  using Cache = LinearAttentionLayerCache<T>;
  static constexpr const char* kName = "LinearAttentionLayer";

  explicit LinearAttentionLayer(const Config& config) : Skeleton(checked(config)) {}

 private:
  static const Config& checked(const Config& c) {
    detail::check_attention_sizes(kName, c.D, c.H, c.d, c.dv);
    return c;
  }

  // Hooks of the skeleton.
  bool normalizes_qk() const { return this->config_.normalize_qk; }
  LinearAttentionState<T> head_initial_state(long) const {
    return linear_attention_initial_state<T>(this->config_.d, this->config_.dv);
  }
  void prepare(Cache&, const char*) {}
  void prepare_step(const char*) {}
  template <class Q, class K, class V, class O>
  void head_forward(Cache&, std::size_t, long, const Q& q, const K& k, const V& v, O&& out,
                    const LinearAttentionState<T>* initial, LinearAttentionState<T>* final) {
    linear_attention_forward<T>(q, k, v, out, initial, final);  // M1-M2, M13
  }
  template <class Q, class K, class V, class G, class DQ, class DK, class DV>
  void head_backward(Cache&, std::size_t, long, const Q& q, const K& k, const V& v, const G& dout, DQ& dq, DK& dk,
                     DV&& grad_v, const LinearAttentionState<T>* initial, const LinearAttentionState<T>* grad_final,
                     LinearAttentionState<T>* grad_initial) {
    linear_attention_backward<T>(q, k, v, dout, dq, dk, grad_v, initial, grad_final, grad_initial);  // M3, M14
  }
  void begin_backward(Cache&, long) {}
  void end_backward(Cache&, long) {}
  template <class Q, class K, class V, class O>
  void head_step(long, const Q& q, const K& k, const V& v, LinearAttentionState<T>& state, O&& out) {
    linear_attention_step<T>(q, k, v, state, out);  // M13, one token
  }
  void extra_parameters(std::vector<ParameterView<T>>&, const std::string&) {}
  void reset_extra_parameters() {}
};

}  // namespace mesaopt
