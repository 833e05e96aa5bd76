#pragma once
// Multi-head mesa layer (docs/math.md §3, M5-M12; state §6, M15-M18):
//
//   per head h:  q, k, v = W_q,h e, W_k,h e, W_v,h e    (optionally q, k L2-normalised)
//                W_t = argmin_W 1/2 sum_{i<=t} gamma_h^{t-i} ||v_i - W k_i||^2
//                                 + gamma_h^t / (2 lambda_h) ||W||_F^2               (M5)
//                o_t = W_t q_t                                                        (M6)
//   output:      Delta e_t = sum_h P_h o_{h,t}  (= O W_o^T)
//
// Parametrisations (parametrization.hpp), one per head:
//   lambda_h = softplus(lambda_raw_h)  > 0, always learnable; lambda_raw is set
//              so that lambda = config.lambda_init (default 1, docs/paper.md §2).
//              With config.lambda_parametrization = LambdaParametrization::raw,
//              lambda_h = lambda_raw_h itself (R_0 = lambda_raw I, as the paper's
//              code has it, docs/paper.md §2): nothing keeps it positive, so an
//              update that drives it to <= 0 stops the next forward with
//              std::invalid_argument naming the head.
//   gamma_h  = sigmoid(forget_raw_h) in (0, 1) when config.learn_forget;
//              otherwise gamma_h = config.forget_init fixed (default 1: no
//              forgetting) and there is no forget_raw parameter.
// Chain rule: dL/dlambda_raw = dL/dlambda * sigmoid(lambda_raw) (raw: * 1) and
// dL/dforget_raw = dL/dgamma * gamma (1 - gamma), with dL/dlambda and dL/dgamma
// from mesa_backward (M12 and the forgetting terms of docs/mesa.md), summed
// over the batch in a fixed order.
//
// With config.regularizer = MesaRegularizer::constant every head uses the
// non-decaying ridge I / lambda_h (M20) instead of gamma_h^t I / lambda_h:
// stable with forgetting when keys do not span all d directions, at O(d^3)
// per token (docs/mesa.md).
//
// Numerical failures (docs/mesa.md, "Numerical safety"): a head whose
// recursion breaks down throws MesaBreakdownError naming the sequence b, the
// head h and the position t; lambda_h = softplus(lambda_raw_h) and gamma_h =
// sigmoid(forget_raw_h) must be normal numbers of the layer's scalar type
// (softplus underflows below lambda_raw ~ -87 in float, ~ -708 in double):
// a diverged raw parameter gives std::invalid_argument naming the head, the
// raw value and the underflow, before any work is done (no silent floor, which
// would also zero the gradient that could bring lambda_raw back).
//
// The residual e + Delta e is the caller's (the model's). No biases. The
// plumbing (projections, threads, state, step, backward) is the shared
// skeleton of layers/multi_head_attention.hpp; this file supplies the per-head
// op and the regularisers. With an initial state a head starts from its
// (R_0, S_0) and lambda_h is not used (its gradient then comes only from
// pieces that start from the empty state).
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parameters.hpp>
#include <mesaopt/layers/multi_head_attention.hpp>
#include <mesaopt/layers/parametrization.hpp>
#include <mesaopt/ops/mesa.hpp>

#include <cmath>
#include <cstddef>
#include <functional>
#include <limits>
#include <string>
#include <vector>

namespace mesaopt {

// How the learnable lambda_raw gives the layer's lambda (docs/paper.md §2).
enum class LambdaParametrization {
  softplus,  // lambda = softplus(lambda_raw) > 0 (the default)
  raw,       // lambda = lambda_raw, unconstrained (the paper's code)
};

inline const char* lambda_parametrization_name(LambdaParametrization p) {
  switch (p) {
    case LambdaParametrization::softplus: return "softplus";
    case LambdaParametrization::raw: return "raw";
  }
  return "?";
}

struct MesaLayerConfig {
  long D = 0;                 // model width (token size)
  long H = 1;                 // heads
  long d = 0;                 // key/query size per head
  long dv = 0;                // value size per head
  bool normalize_qk = false;  // L2-normalise q and k per head and token
  double lambda_init = 1.0;   // lambda of every head after construction / init; > 0
  // lambda = softplus(lambda_raw) (default) or lambda_raw itself (the paper's code).
  LambdaParametrization lambda_parametrization = LambdaParametrization::softplus;
  bool learn_forget = false;  // learnable forget factor gamma = sigmoid(forget_raw) per head
  double forget_init = 1.0;   // gamma: fixed value in (0, 1] if !learn_forget, initial value in (0, 1) if learn_forget
  long chunk = 0;             // checkpoint interval of the op's backward (MesaOptions::chunk); 0 = automatic
  int num_threads = 0;        // threads for forward/backward; <= 0: default_num_threads()
  // Ridge term with forgetting (MesaOptions::regularizer, docs/mesa.md): decaying gamma^t I/lambda
  // (M5, the default) or constant I/lambda (M20, stable with gamma < 1, O(d^3) per token).
  MesaRegularizer regularizer = MesaRegularizer::decaying;
};

// What MesaLayer::backward needs from its forward: the skeleton's cache (with
// the per-(batch, head) op caches, checkpoints of R and S) plus the per-head
// regularisers as the forward used them.
template <class T>
struct MesaLayerCache : AttentionLayerCache<T, MesaCache<T>, MesaState<T>> {
  std::vector<MesaOptions<T>> options;  // per head: lambda_h, gamma_h as used by the forward
  std::vector<double> dlambda_draw;     // per head: sigmoid(lambda_raw_h) at the forward (raw: 1)
  std::vector<double> dforget_draw;     // per head: gamma_h (1 - gamma_h) at the forward (learn_forget)
  std::vector<T> dlambda, dforget;      // backward scratch: per item dL/dlambda, dL/dgamma
};

template <class T>
class MesaLayer
    : public MultiHeadAttention<T, MesaLayer<T>, MesaLayerConfig, MesaLayerCache<T>, MesaState<T>> {
  using Skeleton = MultiHeadAttention<T, MesaLayer<T>, MesaLayerConfig, MesaLayerCache<T>, MesaState<T>>;
  friend Skeleton;

 public:
  using Config = MesaLayerConfig;
  using Cache = MesaLayerCache<T>;
  static constexpr const char* kName = "MesaLayer";

  explicit MesaLayer(const Config& config)
      : Skeleton(checked(config)),
        lambda_raw_(Vector<T>::Zero(config.H)), lambda_raw_grad_(Vector<T>::Zero(config.H)),
        forget_raw_(Vector<T>::Zero(config.learn_forget ? config.H : 0)),
        forget_raw_grad_(Vector<T>::Zero(config.learn_forget ? config.H : 0)) {
    reset_extra_parameters();
  }

  // Raw (unconstrained) parameters and their gradients, (H) each; the forget
  // ones are empty unless config.learn_forget.
  Vector<T>& lambda_raw() { return lambda_raw_; }
  Vector<T>& forget_raw() { return forget_raw_; }
  Vector<T>& grad_lambda_raw() { return lambda_raw_grad_; }
  Vector<T>& grad_forget_raw() { return forget_raw_grad_; }
  const Vector<T>& lambda_raw() const { return lambda_raw_; }
  const Vector<T>& forget_raw() const { return forget_raw_; }

  // The constrained values used by the op: lambda_h = softplus(lambda_raw_h)
  // (raw parametrisation: lambda_raw_h), gamma_h = sigmoid(forget_raw_h) or
  // the fixed config.forget_init.
  T lambda(long h) const {
    check_head("MesaLayer::lambda", h);
    return raw_lambda() ? lambda_raw_(h) : static_cast<T>(detail::softplus(double(lambda_raw_(h))));
  }
  T forget(long h) const {
    check_head("MesaLayer::forget", h);
    return this->config_.learn_forget ? static_cast<T>(detail::sigmoid(double(forget_raw_(h))))
                                      : static_cast<T>(this->config_.forget_init);
  }

  // The skeleton's step (layers/multi_head_attention.hpp), recording the batch so
  // that a breakdown error can name the sequence b.
  void step(ConstMatrixRef<T> x_t, typename Skeleton::State& state, MatrixRef<T> y_t) {
    step_items_ = state.items.data();
    step_count_ = state.items.size();
    try {
      Skeleton::step(x_t, state, y_t);
    } catch (...) {
      step_items_ = nullptr;
      step_count_ = 0;
      throw;
    }
    step_items_ = nullptr;
    step_count_ = 0;
  }

 private:
  static const Config& checked(const Config& c) {
    const char* where = kName;
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
    detail::check_mesa_regularizer(where, "config.regularizer", c.regularizer);
    if (c.lambda_parametrization != LambdaParametrization::softplus &&
        c.lambda_parametrization != LambdaParametrization::raw)
      detail::fail(where, "config.lambda_parametrization is not softplus or raw (value ",
                   int(c.lambda_parametrization), ")");
    return c;
  }

  void check_head(const char* where, long h) const {
    if (h < 0 || h >= this->config_.H)
      detail::fail(where, "head h = ", h, " is outside [0, H = ", this->config_.H, ")");
  }

  // Head h's options, checked (a diverged update can drive lambda or gamma out of
  // range). The op rejects subnormal lambda and gamma (docs/mesa.md, "Errors");
  // here the message names the head and the raw parameter whose map underflowed.
  MesaOptions<T> head_options(const char* where, long h) const {
    MesaOptions<T> opt;
    opt.lambda = lambda(h);
    opt.forget = forget(h);
    opt.chunk = this->config_.chunk;
    opt.regularizer = this->config_.regularizer;
    const T tiny = std::numeric_limits<T>::min();
    if (raw_lambda() && !(std::isfinite(opt.lambda) && opt.lambda >= tiny))
      detail::fail(where, "head ", h, ": lambda = lambda_raw = ", opt.lambda, " (raw parametrisation) must be finite ",
                   "and at least the smallest normal ", detail::scalar_name<T>(), " (", tiny,
                   "): an update has driven it out of range");
    if (!(std::isfinite(opt.lambda) && opt.lambda > T(0)))
      detail::fail(where, "head ", h, ": lambda = softplus(lambda_raw = ", lambda_raw_(h), ") = ", opt.lambda,
                   " must be finite and > 0 (softplus underflowed: lambda_raw has diverged)");
    if (opt.lambda < tiny)
      detail::fail(where, "head ", h, ": lambda = softplus(lambda_raw = ", lambda_raw_(h), ") = ", opt.lambda,
                   " is subnormal (below the smallest normal ", detail::scalar_name<T>(), ", ", tiny,
                   "): softplus underflowed, lambda_raw has diverged; the mesa op needs a normal lambda");
    if (!(std::isfinite(opt.forget) && opt.forget > T(0) && opt.forget <= T(1)))
      detail::fail(where, "head ", h, ": forget = ", opt.forget, " must lie in (0, 1]");
    if (opt.forget < tiny)
      detail::fail(where, "head ", h, ": forget = sigmoid(forget_raw) = ", opt.forget, " is subnormal (below the ",
                   "smallest normal ", detail::scalar_name<T>(), ", ", tiny, "): sigmoid underflowed, forget_raw has ",
                   "diverged");
    return opt;
  }

  // Adds the sequence b and head h to a breakdown of the op (docs/mesa.md, "Numerical safety").
  [[noreturn]] static void rethrow_breakdown(const char* where, const MesaBreakdownError& e, long b, long h) {
    std::string msg = std::string(where) + ": sequence b = " + (b >= 0 ? std::to_string(b) : std::string("?")) +
                      ", head h = " + std::to_string(h) + ": " + e.what();
    throw MesaBreakdownError(msg, e.position(), b, h);
  }

  // Hooks of the skeleton.
  bool normalizes_qk() const { return this->config_.normalize_qk; }
  MesaState<T> head_initial_state(long h) const {
    return mesa_initial_state<T>(this->config_.d, this->config_.dv, head_options("MesaLayer::initial_state", h));
  }
  // Per-head options, validated here so that the parallel region cannot throw.
  void prepare(Cache& cache, const char* where) {
    const long H = this->config_.H;
    cache.options.resize(std::size_t(H));
    cache.dlambda_draw.assign(std::size_t(H), 0.0);
    cache.dforget_draw.assign(std::size_t(H), 0.0);
    for (long h = 0; h < H; ++h) {
      cache.options[std::size_t(h)] = head_options(where, h);
      cache.dlambda_draw[std::size_t(h)] = raw_lambda() ? 1.0 : detail::sigmoid(double(lambda_raw_(h)));
      if (this->config_.learn_forget) {
        const double g = detail::sigmoid(double(forget_raw_(h)));
        cache.dforget_draw[std::size_t(h)] = g * (1.0 - g);
      }
    }
  }
  void prepare_step(const char* where) {
    step_options_.resize(std::size_t(this->config_.H));
    for (long h = 0; h < this->config_.H; ++h) step_options_[std::size_t(h)] = head_options(where, h);
  }
  template <class Q, class K, class V, class O>
  void head_forward(Cache& cache, std::size_t item, long h, const Q& q, const K& k, const V& v, O&& out,
                    const MesaState<T>* initial, MesaState<T>* final) {
    try {
      mesa_forward<T>(q, k, v, cache.options[std::size_t(h)], out, cache.heads[item], initial, final);  // M7-M9, M15, M20
    } catch (const MesaBreakdownError& e) {
      rethrow_breakdown("MesaLayer::forward", e, long(item) / this->config_.H, h);
    }
  }
  void begin_backward(Cache& cache, long items) {
    cache.dlambda.assign(std::size_t(items), T(0));
    cache.dforget.assign(std::size_t(items), T(0));
  }
  template <class Q, class K, class V, class G, class DQ, class DK, class DV>
  void head_backward(Cache& cache, std::size_t item, long h, const Q& q, const K& k, const V& v, const G& dout,
                     DQ& dq, DK& dk, DV&& grad_v, const MesaState<T>* initial, const MesaState<T>* grad_final,
                     MesaState<T>* grad_initial) {
    cache.dlambda[item] = mesa_backward<T>(q, k, v, cache.options[std::size_t(h)], dout, cache.heads[item], dq, dk,
                                           grad_v, this->config_.learn_forget ? &cache.dforget[item] : nullptr,
                                           initial, grad_final, grad_initial);  // M10-M12, M16-M18
  }
  // Per-head regulariser gradients: sum over b in a fixed order, then the
  // chain rule through the parametrisation (dlambda/draw = sigmoid(raw) or 1,
  // dgamma/draw = gamma (1 - gamma)).
  void end_backward(Cache& cache, long B) {
    const long H = this->config_.H;
    for (long h = 0; h < H; ++h) {
      double gl = 0, gf = 0;
      for (long b = 0; b < B; ++b) {
        gl += double(cache.dlambda[std::size_t(b * H + h)]);
        gf += double(cache.dforget[std::size_t(b * H + h)]);
      }
      lambda_raw_grad_(h) += static_cast<T>(gl * cache.dlambda_draw[std::size_t(h)]);
      if (this->config_.learn_forget) forget_raw_grad_(h) += static_cast<T>(gf * cache.dforget_draw[std::size_t(h)]);
    }
  }
  template <class Q, class K, class V, class O>
  void head_step(long h, const Q& q, const K& k, const V& v, MesaState<T>& state, O&& out) {
    try {
      mesa_step<T>(q, k, v, step_options_[std::size_t(h)], state, out);  // M15 (M20), one token
    } catch (const MesaBreakdownError& e) {
      // The skeleton passes state.items[b*H + h]; recover b from its address when it lies in the
      // batch that step() recorded.
      long b = -1;
      const MesaState<T>* s = &state;
      if (step_items_ != nullptr && std::less_equal<const MesaState<T>*>()(step_items_, s) &&
          std::less<const MesaState<T>*>()(s, step_items_ + step_count_))
        b = long(s - step_items_) / this->config_.H;
      rethrow_breakdown("MesaLayer::step", e, b, h);
    }
  }
  // Appends prefix+"lambda_raw" (H) and, if config.learn_forget, "forget_raw" (H).
  void extra_parameters(std::vector<ParameterView<T>>& out, const std::string& prefix) {
    const long H = this->config_.H;
    out.push_back({prefix + "lambda_raw", lambda_raw_.data(), lambda_raw_grad_.data(), std::size_t(H), {H}});
    if (this->config_.learn_forget)
      out.push_back({prefix + "forget_raw", forget_raw_.data(), forget_raw_grad_.data(), std::size_t(H), {H}});
  }
  // lambda_raw and forget_raw back to config.lambda_init and config.forget_init.
  void reset_extra_parameters() {
    lambda_raw_.setConstant(static_cast<T>(raw_lambda() ? this->config_.lambda_init
                                                        : detail::softplus_inverse(this->config_.lambda_init)));
    if (this->config_.learn_forget)
      forget_raw_.setConstant(static_cast<T>(detail::logit(this->config_.forget_init)));
  }

  bool raw_lambda() const { return this->config_.lambda_parametrization == LambdaParametrization::raw; }

  Vector<T> lambda_raw_, lambda_raw_grad_;  // (H): lambda_h = softplus(lambda_raw_h), or lambda_raw_h (raw)
  Vector<T> forget_raw_, forget_raw_grad_;  // (H) if learn_forget, else empty: gamma_h = sigmoid(forget_raw_h)
  std::vector<MesaOptions<T>> step_options_;  // per head, for step
  const MesaState<T>* step_items_ = nullptr;  // the batch of the running step(), to name b in errors
  std::size_t step_count_ = 0;
};

}  // namespace mesaopt
