#pragma once
// Multi-head causal softmax self-attention layer (MATH.md §2, M4):
//
//   per head h:  q, k, v = W_q,h e, W_k,h e, W_v,h e
//                o_t = sum_{i<=t} softmax_i((q_t . k_i) / sqrt(d)) v_i      (M4)
//   output:      Delta e_t = sum_h P_h o_{h,t}  (= O W_o^T)
//
// The residual e + Delta e is the caller's (the model's). No biases. x is
// (B*T, D), sequence-major: sequence b is rows [b*T, (b+1)*T). The per-head op
// is the tiled (flash) softmax_attention_forward/_backward of
// ops/softmax_attention.hpp with its default tiles.
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parameters.hpp>
#include <mesaopt/layers/attention_projections.hpp>
#include <mesaopt/layers/threading.hpp>
#include <mesaopt/ops/softmax_attention.hpp>
#include <mesaopt/ops/softmax_attention_reference.hpp>

#include <cstdint>
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

// What SoftmaxAttentionLayer::backward needs from its forward.
template <class T>
struct SoftmaxAttentionLayerCache {
  long batch = 0;                      // B of the forward (0: no complete forward yet)
  long seq_len = 0;                    // T of the forward
  RowMatrix<T> qkv;                    // (B*T, H (2d + dv)): projected q | k | v
  RowMatrix<T> o;                      // (B*T, H dv): the heads' outputs, for dW_o
  std::vector<SoftmaxCache<T>> heads;  // B*H op caches (log-sum-exp per row), item b*H + h
};

template <class T>
class SoftmaxAttentionLayer : public AttentionProjections<T> {
  using Base = AttentionProjections<T>;

 public:
  using Scalar = T;
  using Config = SoftmaxAttentionLayerConfig;
  using Cache = SoftmaxAttentionLayerCache<T>;

  explicit SoftmaxAttentionLayer(const Config& config)
      : Base(checked(config).D, config.H, config.d, config.dv), config_(config) {}

  const Config& config() const { return config_; }
  void set_num_threads(int n) { config_.num_threads = n; }

  // W_q, W_k, W_v, W_o (in this order) ~ N(0, stddev^2), drawn from rng
  // (nn/random.hpp: SplitMix64 + Box-Muller, reproducible across machines).
  void init(nn::SplitMix64& rng, double stddev) {
    detail::check_init_stddev("SoftmaxAttentionLayer::init", stddev);
    Base::init_weights(rng, stddev);
  }
  // The same from a fresh generator seeded with `seed`.
  void init(std::uint64_t seed, double stddev) {
    nn::SplitMix64 rng(seed);
    init(rng, stddev);
  }

  // Appends prefix+"W_q" (H d, D), "W_k" (H d, D), "W_v" (H dv, D), "W_o" (D, H dv).
  void parameters(std::vector<ParameterView<T>>& out, const std::string& prefix) {
    Base::weight_parameters(out, prefix);
  }

  // x is (B*T, D); writes y (B*T, D) = Delta e and fills cache.
  void forward(ConstMatrixRef<T> x, long seq_len, Cache& cache, MatrixRef<T> y) {
    const char* where = "SoftmaxAttentionLayer::forward";
    const long B = detail::check_layer_input<T>(where, x, seq_len, config_.D);
    detail::check_shape(where, "y", y, x.rows(), config_.D);
    const int threads = detail::resolve_num_threads(config_.num_threads);
    detail::ScopedSerialEigen serial_eigen;
    const long H = config_.H, d = config_.d, dv = config_.dv;

    cache.batch = 0;  // marks the cache invalid until it is complete
    Base::project_qkv(x, cache.qkv, threads);
    cache.o.resize(x.rows(), H * dv);
    cache.heads.resize(static_cast<std::size_t>(B * H));
    detail::parallel_for_rethrow(B * H, threads, [&](std::ptrdiff_t item) {
      const long b = long(item) / H, h = long(item) % H, r0 = b * seq_len;
      softmax_attention_forward<T>(cache.qkv.block(r0, this->q_col(h), seq_len, d),
                                   cache.qkv.block(r0, this->k_col(h), seq_len, d),
                                   cache.qkv.block(r0, this->v_col(h), seq_len, dv),
                                   cache.o.block(r0, h * dv, seq_len, dv), cache.heads[std::size_t(item)]);  // M4
    });
    Base::project_out(cache.o, y, threads);
    cache.seq_len = seq_len;
    cache.batch = B;
  }

  // Convenience form returning y.
  RowMatrix<T> forward(ConstMatrixRef<T> x, long seq_len, Cache& cache) {
    RowMatrix<T> y(x.rows(), x.cols());
    forward(x, seq_len, cache, y);
    return y;
  }

  // Probe (read-only: touches no weight, gradient or cache). x is (B*T, D),
  // sequence-major. Returns B*H matrices, item b*H + h: head h's causal
  // attention probabilities a_{t,i} = softmax_{i<=t}((q_t . k_i) / sqrt(d)) on
  // sequence b (M4), (T, T), row t = query position t, column i = key position
  // i; rows sum to 1 and entries above the diagonal are 0. Same projections as
  // forward; the probabilities come from the plain max-subtracted reference
  // (ops/softmax_attention_reference.hpp), so they match what the tiled forward
  // uses to rounding (the tiled kernel never materialises them). O(B H T^2) memory.
  std::vector<RowMatrix<T>> attention_probabilities(ConstMatrixRef<T> x, long seq_len) const {
    const char* where = "SoftmaxAttentionLayer::attention_probabilities";
    const long B = detail::check_layer_input<T>(where, x, seq_len, config_.D);
    const int threads = detail::resolve_num_threads(config_.num_threads);
    detail::ScopedSerialEigen serial_eigen;
    const long H = config_.H, d = config_.d;
    RowMatrix<T> qkv;
    Base::project_qkv(x, qkv, threads);
    std::vector<RowMatrix<T>> probs(static_cast<std::size_t>(B * H));
    detail::parallel_for_rethrow(B * H, threads, [&](std::ptrdiff_t item) {
      const long b = long(item) / H, h = long(item) % H, r0 = b * seq_len;
      probs[std::size_t(item)] = detail::softmax_attention_probabilities_reference<T>(
          qkv.block(r0, this->q_col(h), seq_len, d), qkv.block(r0, this->k_col(h), seq_len, d), nullptr);  // M4
    });
    return probs;
  }

  // dy is dL/dy (B*T, D); writes dx (B*T, D) and ADDS into the weight gradients.
  void backward(ConstMatrixRef<T> x, long seq_len, ConstMatrixRef<T> dy, const Cache& cache, MatrixRef<T> dx) {
    const char* where = "SoftmaxAttentionLayer::backward";
    const long B = detail::check_layer_backward_args<T>(where, x, seq_len, dy, dx, config_.D, cache.batch,
                                                          cache.seq_len);
    const int threads = detail::resolve_num_threads(config_.num_threads);
    detail::ScopedSerialEigen serial_eigen;
    const long H = config_.H, d = config_.d, dv = config_.dv;

    RowMatrix<T>& d_o = this->scratch_d_o_;
    Base::backward_out(dy, cache.o, d_o, threads);  // dO = dY W_o, dW_o += dY^T O
    RowMatrix<T>& dqkv = this->scratch_dqkv_;
    dqkv.resize(x.rows(), this->width());  // every entry is written below
    detail::parallel_for_rethrow(B * H, threads, [&](std::ptrdiff_t item) {
      const long b = long(item) / H, h = long(item) % H, r0 = b * seq_len;
      softmax_attention_backward<T>(cache.qkv.block(r0, this->q_col(h), seq_len, d),
                                    cache.qkv.block(r0, this->k_col(h), seq_len, d),
                                    cache.qkv.block(r0, this->v_col(h), seq_len, dv),
                                    d_o.block(r0, h * dv, seq_len, dv), cache.heads[std::size_t(item)],
                                    dqkv.block(r0, this->q_col(h), seq_len, d),
                                    dqkv.block(r0, this->k_col(h), seq_len, d),
                                    dqkv.block(r0, this->v_col(h), seq_len, dv));  // M4 backward
    });
    Base::backward_qkv(x, dqkv, dx, threads);  // dX = dQKV W_qkv, dW_qkv += dQKV^T X
  }

 private:
  static const Config& checked(const Config& c) {
    detail::check_attention_sizes("SoftmaxAttentionLayer", c.D, c.H, c.d, c.dv);
    return c;
  }
  Config config_;
};

}  // namespace mesaopt
