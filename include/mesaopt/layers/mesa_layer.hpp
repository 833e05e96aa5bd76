#pragma once
// Multi-head mesa layer (MATH.md §3, M5-M12):
//
//   per head h:  q, k, v = W_q,h e, W_k,h e, W_v,h e    (optionally q, k L2-normalised)
//                W_t = argmin_W 1/2 sum_{i<=t} gamma_h^{t-i} ||v_i - W k_i||^2
//                                 + gamma_h^t / (2 lambda_h) ||W||_F^2               (M5)
//                o_t = W_t q_t                                                        (M6)
//   output:      Delta e_t = sum_h P_h o_{h,t}  (= O W_o^T)
//
// Parametrisations (parametrization.hpp), one per head:
//   lambda_h = softplus(lambda_raw_h)  > 0, always learnable; lambda_raw is set
//              so that lambda = config.lambda_init (default 1, PAPER.md §2).
//   gamma_h  = sigmoid(forget_raw_h) in (0, 1) when config.learn_forget;
//              otherwise gamma_h = config.forget_init fixed (default 1: no
//              forgetting) and there is no forget_raw parameter.
// Chain rule: dL/dlambda_raw = dL/dlambda * sigmoid(lambda_raw) and
// dL/dforget_raw = dL/dgamma * gamma (1 - gamma), with dL/dlambda and dL/dgamma
// from mesa_backward (M12 and the forgetting terms of docs/mesa.md), summed
// over the batch in a fixed order.
//
// The residual e + Delta e is the caller's (the model's). No biases. x is
// (B*T, D), sequence-major: sequence b is rows [b*T, (b+1)*T).
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parameters.hpp>
#include <mesaopt/layers/attention_projections.hpp>
#include <mesaopt/layers/parametrization.hpp>
#include <mesaopt/layers/qk_normalization.hpp>
#include <mesaopt/layers/threading.hpp>
#include <mesaopt/ops/mesa.hpp>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace mesaopt {

struct MesaLayerConfig {
  long D = 0;                 // model width (token size)
  long H = 1;                 // heads
  long d = 0;                 // key/query size per head
  long dv = 0;                // value size per head
  bool normalize_qk = false;  // L2-normalise q and k per head and token
  double lambda_init = 1.0;   // lambda of every head after construction / init; > 0
  bool learn_forget = false;  // learnable forget factor gamma = sigmoid(forget_raw) per head
  double forget_init = 1.0;   // gamma: fixed value in (0, 1] if !learn_forget, initial value in (0, 1) if learn_forget
  long chunk = 0;             // checkpoint interval of the op's backward (MesaOptions::chunk); 0 = automatic
  int num_threads = 0;        // threads for forward/backward; <= 0: default_num_threads()
};

// What MesaLayer::backward needs from its forward. backward also uses the
// per-head op caches as scratch, hence the non-const reference there.
template <class T>
struct MesaLayerCache {
  long batch = 0;                        // B of the forward (0: no complete forward yet)
  long seq_len = 0;                      // T of the forward
  RowMatrix<T> qkv;                      // (B*T, H (2d + dv)): projected q | k | v (q, k normalised if on)
  RowMatrix<T> inv_norm;                 // (B*T, 2H): r of q (columns [0, H)) and k ([H, 2H)); empty if off
  RowMatrix<T> o;                        // (B*T, H dv): the heads' outputs, for dW_o
  std::vector<MesaOptions<T>> options;   // per head: lambda_h, gamma_h as used by the forward
  std::vector<double> dlambda_draw;      // per head: sigmoid(lambda_raw_h) at the forward
  std::vector<double> dforget_draw;      // per head: gamma_h (1 - gamma_h) at the forward (learn_forget)
  std::vector<MesaCache<T>> heads;       // B*H op caches (checkpoints of R and S), item b*H + h
};

template <class T>
class MesaLayer : public AttentionProjections<T> {
  using Base = AttentionProjections<T>;

 public:
  using Scalar = T;
  using Config = MesaLayerConfig;
  using Cache = MesaLayerCache<T>;

  explicit MesaLayer(const Config& config)
      : Base(checked(config).D, config.H, config.d, config.dv), config_(config),
        lambda_raw_(Vector<T>::Zero(config.H)), lambda_raw_grad_(Vector<T>::Zero(config.H)),
        forget_raw_(Vector<T>::Zero(config.learn_forget ? config.H : 0)),
        forget_raw_grad_(Vector<T>::Zero(config.learn_forget ? config.H : 0)) {
    reset_regularisers();
  }

  const Config& config() const { return config_; }
  void set_num_threads(int n) { config_.num_threads = n; }

  // W_q, W_k, W_v, W_o (in this order) ~ N(0, stddev^2), drawn from rng
  // (nn/random.hpp: SplitMix64 + Box-Muller, reproducible across machines);
  // lambda_raw and forget_raw back to config.lambda_init and config.forget_init.
  void init(nn::SplitMix64& rng, double stddev) {
    detail::check_init_stddev("MesaLayer::init", stddev);
    Base::init_weights(rng, stddev);
    reset_regularisers();
  }
  // The same from a fresh generator seeded with `seed`.
  void init(std::uint64_t seed, double stddev) {
    nn::SplitMix64 rng(seed);
    init(rng, stddev);
  }

  // Appends prefix+"W_q" (H d, D), "W_k" (H d, D), "W_v" (H dv, D), "W_o" (D, H dv),
  // "lambda_raw" (H) and, if config.learn_forget, "forget_raw" (H).
  void parameters(std::vector<ParameterView<T>>& out, const std::string& prefix) {
    Base::weight_parameters(out, prefix);
    const long H = config_.H;
    out.push_back({prefix + "lambda_raw", lambda_raw_.data(), lambda_raw_grad_.data(), std::size_t(H), {H}});
    if (config_.learn_forget)
      out.push_back({prefix + "forget_raw", forget_raw_.data(), forget_raw_grad_.data(), std::size_t(H), {H}});
  }

  // Raw (unconstrained) parameters and their gradients, (H) each; the forget
  // ones are empty unless config.learn_forget.
  Vector<T>& lambda_raw() { return lambda_raw_; }
  Vector<T>& forget_raw() { return forget_raw_; }
  Vector<T>& grad_lambda_raw() { return lambda_raw_grad_; }
  Vector<T>& grad_forget_raw() { return forget_raw_grad_; }
  const Vector<T>& lambda_raw() const { return lambda_raw_; }
  const Vector<T>& forget_raw() const { return forget_raw_; }

  // The constrained values used by the op: lambda_h = softplus(lambda_raw_h),
  // gamma_h = sigmoid(forget_raw_h) or the fixed config.forget_init.
  T lambda(long h) const {
    check_head("MesaLayer::lambda", h);
    return static_cast<T>(detail::softplus(double(lambda_raw_(h))));
  }
  T forget(long h) const {
    check_head("MesaLayer::forget", h);
    return config_.learn_forget ? static_cast<T>(detail::sigmoid(double(forget_raw_(h))))
                                : static_cast<T>(config_.forget_init);
  }

  // x is (B*T, D); writes y (B*T, D) = Delta e and fills cache. Throws if a
  // head's lambda or gamma left its range (e.g. after a diverged update).
  void forward(ConstMatrixRef<T> x, long seq_len, Cache& cache, MatrixRef<T> y) {
    const char* where = "MesaLayer::forward";
    const long B = detail::check_layer_input<T>(where, x, seq_len, config_.D);
    detail::check_shape(where, "y", y, x.rows(), config_.D);
    const long H = config_.H, d = config_.d, dv = config_.dv;
    cache.batch = 0;  // marks the cache invalid until it is complete
    // Per-head options, validated here so that the parallel region cannot throw.
    cache.options.assign(std::size_t(H), MesaOptions<T>{});
    cache.dlambda_draw.assign(std::size_t(H), 0.0);
    cache.dforget_draw.assign(std::size_t(H), 0.0);
    for (long h = 0; h < H; ++h) {
      auto& opt = cache.options[std::size_t(h)];
      opt.lambda = lambda(h);
      opt.forget = forget(h);
      opt.chunk = config_.chunk;
      if (!(std::isfinite(opt.lambda) && opt.lambda > T(0)))
        detail::fail(where, "head ", h, ": lambda = softplus(lambda_raw = ", lambda_raw_(h), ") = ", opt.lambda,
                     " must be finite and > 0");
      if (!(std::isfinite(opt.forget) && opt.forget > T(0) && opt.forget <= T(1)))
        detail::fail(where, "head ", h, ": forget = ", opt.forget, " must lie in (0, 1]");
      cache.dlambda_draw[std::size_t(h)] = detail::sigmoid(double(lambda_raw_(h)));
      if (config_.learn_forget) {
        const double g = detail::sigmoid(double(forget_raw_(h)));
        cache.dforget_draw[std::size_t(h)] = g * (1.0 - g);
      }
    }
    const int threads = detail::resolve_num_threads(config_.num_threads);
    detail::ScopedSerialEigen serial_eigen;

    Base::project_qkv(x, cache.qkv, threads);
    if (config_.normalize_qk)
      cache.inv_norm.resize(x.rows(), 2 * H);
    else
      cache.inv_norm.resize(0, 0);
    cache.o.resize(x.rows(), H * dv);
    cache.heads.resize(std::size_t(B * H));

    detail::parallel_for_rethrow(B * H, threads, [&](std::ptrdiff_t item) {
      const long b = long(item) / H, h = long(item) % H, r0 = b * seq_len;
      auto q = cache.qkv.block(r0, this->q_col(h), seq_len, d);
      auto k = cache.qkv.block(r0, this->k_col(h), seq_len, d);
      auto v = cache.qkv.block(r0, this->v_col(h), seq_len, dv);
      if (config_.normalize_qk) {
        detail::l2_normalize_rows_forward<T>(q, &cache.inv_norm(r0, h), 2 * H);
        detail::l2_normalize_rows_forward<T>(k, &cache.inv_norm(r0, H + h), 2 * H);
      }
      mesa_forward<T>(q, k, v, cache.options[std::size_t(h)], cache.o.block(r0, h * dv, seq_len, dv),
                      cache.heads[std::size_t(item)]);  // M7-M9
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

  // dy is dL/dy (B*T, D); writes dx (B*T, D) and ADDS into the gradients of
  // W_q, W_k, W_v, W_o, lambda_raw and (if learnable) forget_raw.
  void backward(ConstMatrixRef<T> x, long seq_len, ConstMatrixRef<T> dy, Cache& cache, MatrixRef<T> dx) {
    const char* where = "MesaLayer::backward";
    const long B = detail::check_layer_backward_args<T>(where, x, seq_len, dy, dx, config_.D, cache.batch,
                                                          cache.seq_len);
    const int threads = detail::resolve_num_threads(config_.num_threads);
    detail::ScopedSerialEigen serial_eigen;
    const long H = config_.H, d = config_.d, dv = config_.dv;
    const bool learn_forget = config_.learn_forget;

    RowMatrix<T>& d_o = this->scratch_d_o_;
    Base::backward_out(dy, cache.o, d_o, threads);  // dO = dY W_o, dW_o += dY^T O
    RowMatrix<T>& dqkv = this->scratch_dqkv_;
    dqkv.resize(x.rows(), this->width());  // every entry is written below
    std::vector<T> dlambda(std::size_t(B * H), T(0)), dforget(std::size_t(B * H), T(0));
    detail::parallel_for_rethrow(B * H, threads, [&](std::ptrdiff_t item) {
      const long b = long(item) / H, h = long(item) % H, r0 = b * seq_len;
      auto q = cache.qkv.block(r0, this->q_col(h), seq_len, d);
      auto k = cache.qkv.block(r0, this->k_col(h), seq_len, d);
      auto v = cache.qkv.block(r0, this->v_col(h), seq_len, dv);
      auto dq = dqkv.block(r0, this->q_col(h), seq_len, d);
      auto dk = dqkv.block(r0, this->k_col(h), seq_len, d);
      const std::size_t i = std::size_t(item);
      dlambda[i] = mesa_backward<T>(q, k, v, cache.options[std::size_t(h)], d_o.block(r0, h * dv, seq_len, dv),
                                    cache.heads[i], dq, dk, dqkv.block(r0, this->v_col(h), seq_len, dv),
                                    learn_forget ? &dforget[i] : nullptr);  // M10-M12
      if (config_.normalize_qk) {
        detail::l2_normalize_rows_backward<T>(q, &cache.inv_norm(r0, h), 2 * H, dq);
        detail::l2_normalize_rows_backward<T>(k, &cache.inv_norm(r0, H + h), 2 * H, dk);
      }
    });
    // Per-head regulariser gradients: sum over b in a fixed order, then the
    // chain rule through the parametrisation.
    for (long h = 0; h < H; ++h) {
      double gl = 0, gf = 0;
      for (long b = 0; b < B; ++b) {
        gl += double(dlambda[std::size_t(b * H + h)]);
        gf += double(dforget[std::size_t(b * H + h)]);
      }
      lambda_raw_grad_(h) += static_cast<T>(gl * cache.dlambda_draw[std::size_t(h)]);
      if (learn_forget) forget_raw_grad_(h) += static_cast<T>(gf * cache.dforget_draw[std::size_t(h)]);
    }
    Base::backward_qkv(x, dqkv, dx, threads);  // dX = dQKV W_qkv, dW_qkv += dQKV^T X
  }

 private:
  static const Config& checked(const Config& c) {
    const char* where = "MesaLayer";
    detail::check_attention_sizes(where, c.D, c.H, c.d, c.dv);
    detail::check_positive_finite(where, "config.lambda_init", c.lambda_init);
    if (c.learn_forget) {
      if (!(std::isfinite(c.forget_init) && c.forget_init > 0 && c.forget_init < 1))
        detail::fail(where, "config.forget_init must lie in (0, 1) when config.learn_forget is set ",
                     "(gamma = sigmoid(forget_raw) cannot reach 1), got ", c.forget_init);
    } else {
      detail::check_half_open(where, "config.forget_init", c.forget_init, 0.0, 1.0);
    }
    if (c.chunk < 0) detail::fail(where, "config.chunk must be >= 0 (0 = automatic), got ", c.chunk);
    return c;
  }

  void check_head(const char* where, long h) const {
    if (h < 0 || h >= config_.H) detail::fail(where, "head h = ", h, " is outside [0, H = ", config_.H, ")");
  }

  void reset_regularisers() {
    lambda_raw_.setConstant(static_cast<T>(detail::softplus_inverse(config_.lambda_init)));
    if (config_.learn_forget) forget_raw_.setConstant(static_cast<T>(detail::logit(config_.forget_init)));
  }

  Config config_;
  Vector<T> lambda_raw_, lambda_raw_grad_;  // (H): lambda_h = softplus(lambda_raw_h)
  Vector<T> forget_raw_, forget_raw_grad_;  // (H) if learn_forget, else empty: gamma_h = sigmoid(forget_raw_h)
};

}  // namespace mesaopt
