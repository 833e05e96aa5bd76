#pragma once
// Multi-head gated mesa layer in MesaNet's parametrisation (docs/math.md §8,
// "The gated mesa layer", M37-M43; docs/gated_mesa.md, "The layer"), around
// the gated mesa op (ops/gated_mesa.hpp, M29-M36). Per sequence and head h,
// with x_t the layer input (D):
//
//   q~_t, k~_t, v_t = W_q,h x_t, W_k,h x_t, W_v,h x_t                         (M37)
//   q^_t = silu(sum_j c_q[j] . q~_{t-K+1+j}),  k^ likewise with c_k           (M38)
//          (causal depthwise short convolution, kernel K = config.conv_size;
//           K = 0: q^ = q~, k^ = k~, no SiLU)
//   q_t = q^_t / |q^_t|,  k_t = k^_t / |k^_t|     (qk_normalization.hpp)      (M39)
//   beta_t  = sigmoid(w_beta,h . x_t + b_beta,h),
//   gamma_t = sigmoid(w_gamma,h . x_t + b_gamma,h)                            (M40)
//   lambda_h = softplus(lambda_raw_h) + config.lambda_floor   (d entries)     (M41)
//   o_t = gated_mesa(q, k, v, beta, gamma, lambda_h)_t        (M29-M32)
//   u_t = o_t / sqrt(|o_t|^2 / dv + eps) * w_norm  (RMSNorm, weight shared
//                                                    by the heads)           (M42)
//   output: Delta e_t = sum_h P_h u_{h,t}  (= U W_o^T)                        (M43)
//
// as FLA's MesaNet layer (fla/layers/mesa_net.py): no biases on q, k, v, o;
// biased gate projections; SiLU short convolutions on q and k only; lambda per
// key channel with a floor (FLA: lambda_lower_bound = 0.25, initial lambda 1);
// RMSNorm(dv) with one learnable weight for all heads. Not done here: FLA's
// optional output gate (use_output_gate, FusedRMSNormGated) and the conv bias
// (FLA's default conv_bias = False). The backward chains the op's gradients
// (M33-M36) through M37-M43 (the chain rule is written next to each step).
//
// Parameters (views, in this order): W_q (H d, D), W_k (H d, D), W_v (H dv, D),
// W_o (D, H dv), W_beta (H, D), b_beta (H), W_gamma (H, D), b_gamma (H),
// lambda_raw (H, d), conv_q (H d, K) and conv_k (H d, K) when K > 0 (entry
// (h d + i, j) multiplies channel i of token t - K + 1 + j: PyTorch's
// Conv1d(groups = channels) weight[:, 0, :] with left padding K - 1), and
// norm_weight (dv).
//
// Shapes: x is (B*T, D), sequence-major. Backward ADDS into the parameter
// gradients and writes dx. Sums over the batch and heads (shared parameters)
// are taken in a fixed order, so results do not depend on the thread count.
//
// Decoding (docs/gated_mesa.md, "Decoding"): initial_state(B) and step(x_t,
// state, y_t) run B sequences one token at a time. The state holds, per
// sequence, the raw q~ | k~ of its last K - 1 tokens (the short convolution's
// window) and, per sequence and head, the op's state (S and R or H, M36);
// stepping through a sequence gives forward's outputs (to rounding; the tests
// compare). The layer's forward itself starts every sequence empty.
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parameters.hpp>
#include <mesaopt/common/random.hpp>
#include <mesaopt/layers/attention_projections.hpp>
#include <mesaopt/layers/parametrization.hpp>
#include <mesaopt/layers/qk_normalization.hpp>
#include <mesaopt/layers/threading.hpp>
#include <mesaopt/ops/gated_mesa.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace mesaopt {

struct GatedMesaLayerConfig {
  long D = 0;                     // model width (token size)
  long H = 1;                     // heads
  long d = 0;                     // key/query size per head
  long dv = 0;                    // value size per head
  long conv_size = 4;             // K: causal short convolution + SiLU on q and k (MesaNet: 4); 0 = off
  double lambda_floor = 0.25;     // lambda = softplus(lambda_raw) + lambda_floor; > 0 (MesaNet: 0.25)
  double lambda_init = 1.0;       // every lambda entry after construction / init; > lambda_floor (MesaNet: 1)
  double beta_bias_init = 0.0;    // b_beta after init (MesaNet: 0, beta = 1/2 at x = 0)
  double forget_bias_init = 0.0;  // b_gamma after init (MesaNet: 0, gamma = 1/2 at x = 0)
  double norm_eps = 1e-5;         // RMSNorm eps (MesaNet: 1e-5); > 0
  MesaSolver solver = MesaSolver::cg;  // GatedMesaOptions::solver (MesaNet: cg)
  int cg_steps = 30;              // GatedMesaOptions::cg_steps (MesaNet: 30); >= 1
  double cg_tolerance = 0.0;      // GatedMesaOptions::cg_tolerance; >= 0 (0: always cg_steps steps)
  long chunk = 0;                 // GatedMesaOptions::chunk: 0 = token by token; C > 0 = chunkwise, C tokens per chunk
  int num_threads = 0;            // threads for forward/backward; <= 0: default_num_threads()
};

// What GatedMesaLayer::backward needs from its forward (and its scratch).
template <class T>
struct GatedMesaLayerCache {
  long batch = 0;    // B of the forward (0: no complete forward yet)
  long seq_len = 0;  // T of the forward
  long num_heads = 0, key_size = 0, value_size = 0, conv_size = -1;  // of the layer that made it
  RowMatrix<T> qkv;       // (B*T, H (2d + dv)): X W_qkv^T, q~ | k~ | v (M37)
  RowMatrix<T> conv;      // (B*T, 2 H d): the convolutions before SiLU, q | k (M38); empty when K = 0
  RowMatrix<T> qk;        // (B*T, 2 H d): the op's q | k (M39)
  RowMatrix<T> inv_norm;  // (B*T, 2H): 1/|q^| (columns [0, H)) and 1/|k^| ([H, 2H))
  RowMatrix<T> gates;     // (B*H, 2T): row b*H + h = beta_1..T | gamma_1..T (M40)
  RowMatrix<T> lambda;    // (H, d): lambda_h (M41)
  RowMatrix<T> o;         // (B*T, H dv): the op's outputs
  RowMatrix<T> rms;       // (B*T, H): 1 / sqrt(|o|^2/dv + eps) (M42)
  RowMatrix<T> u;         // (B*T, H dv): the normalised, weighted outputs, input of W_o (M42)
  std::vector<GatedMesaCache<T>> heads;  // B*H op caches, item b*H + h
  // Backward scratch, per item (reduced over items in a fixed order).
  RowMatrix<T> dgate_logits;  // (B*T, 2H)
  RowMatrix<T> dconv;         // (B*H, 2 d K)
  RowMatrix<T> dnorm;         // (B*H, dv)
  RowMatrix<T> dlambda;       // (B*H, d)
};

// The decoding state of B sequences (GatedMesaLayer::initial_state, step).
template <class T>
struct GatedMesaLayerState {
  long batch = 0;   // B
  long tokens = 0;  // tokens consumed so far by every sequence
  // (B, (K-1) 2 H d): per sequence, the raw q~ | k~ (M37; the first 2 H d
  // columns of QKV) of its last K - 1 tokens, oldest first; unused slots of a
  // sequence shorter than K - 1 tokens are zero and skipped. No columns when K <= 1.
  RowMatrix<T> window;
  std::vector<GatedMesaState<T>> heads;  // B*H op states, item b*H + h
};

namespace detail {

inline void check_gated_mesa_layer_config(const char* where, const GatedMesaLayerConfig& c) {
  check_attention_sizes(where, c.D, c.H, c.d, c.dv);
  if (c.conv_size < 0) fail(where, "config.conv_size must be >= 0 (0 = no short convolution), got ", c.conv_size);
  check_positive_finite(where, "config.lambda_floor", c.lambda_floor);
  if (!(std::isfinite(c.lambda_init) && c.lambda_init > c.lambda_floor))
    fail(where, "config.lambda_init must be finite and > config.lambda_floor = ", c.lambda_floor, ", got ",
         c.lambda_init);
  if (!std::isfinite(c.beta_bias_init)) fail(where, "config.beta_bias_init must be finite, got ", c.beta_bias_init);
  if (!std::isfinite(c.forget_bias_init))
    fail(where, "config.forget_bias_init must be finite, got ", c.forget_bias_init);
  check_positive_finite(where, "config.norm_eps", c.norm_eps);
  if (c.solver != MesaSolver::exact && c.solver != MesaSolver::cg)
    fail(where, "config.solver must be MesaSolver::exact or MesaSolver::cg, got ", static_cast<int>(c.solver));
  if (c.cg_steps < 1) fail(where, "config.cg_steps must be at least 1, got ", c.cg_steps);
  if (!(std::isfinite(c.cg_tolerance) && c.cg_tolerance >= 0))
    fail(where, "config.cg_tolerance must be finite and >= 0, got ", c.cg_tolerance);
  if (c.chunk < 0) fail(where, "config.chunk must be >= 0 (0 = token by token, C > 0 = chunkwise), got ", c.chunk);
}

// silu(z) = z sigmoid(z) and its derivative sigmoid(z) (1 + z (1 - sigmoid(z))) (M38).
template <class T>
T silu_value(T z) {
  return static_cast<T>(double(z) * sigmoid(double(z)));
}
template <class T>
T silu_derivative(T z) {
  const double s = sigmoid(double(z));
  return static_cast<T>(s * (1.0 + double(z) * (1.0 - s)));
}

}  // namespace detail

template <class T>
class GatedMesaLayer : public AttentionProjections<T> {
  using Base = AttentionProjections<T>;

 public:
  using Scalar = T;
  using Config = GatedMesaLayerConfig;
  using Cache = GatedMesaLayerCache<T>;
  using State = GatedMesaLayerState<T>;
  static constexpr const char* kName = "GatedMesaLayer";

  explicit GatedMesaLayer(const Config& config)
      : Base(checked(config).D, config.H, config.d, config.dv), config_(config),
        gate_w_(RowMatrix<T>::Zero(2 * config.H, config.D)), gate_w_grad_(RowMatrix<T>::Zero(2 * config.H, config.D)),
        gate_b_(Vector<T>::Zero(2 * config.H)), gate_b_grad_(Vector<T>::Zero(2 * config.H)),
        lambda_raw_(RowMatrix<T>::Zero(config.H, config.d)), lambda_raw_grad_(RowMatrix<T>::Zero(config.H, config.d)),
        conv_(RowMatrix<T>::Zero(2 * config.H * config.d, config.conv_size)),
        conv_grad_(RowMatrix<T>::Zero(2 * config.H * config.d, config.conv_size)),
        norm_w_(Vector<T>::Ones(config.dv)), norm_w_grad_(Vector<T>::Zero(config.dv)) {
    reset_extra_parameters();
  }

  const Config& config() const { return config_; }
  void set_num_threads(int n) { config_.num_threads = n; }

  // The op's options as the layer passes them (config.solver, cg_steps, cg_tolerance, chunk).
  GatedMesaOptions<T> options() const {
    GatedMesaOptions<T> opt;
    opt.solver = config_.solver;
    opt.cg_steps = config_.cg_steps;
    opt.cg_tolerance = static_cast<T>(config_.cg_tolerance);
    opt.chunk = config_.chunk;
    return opt;
  }

  // Views of the layer's own parameters and gradients (the projections: Base's W_q() ... grad_W_o()).
  auto W_beta() { return gate_w_.topRows(config_.H); }
  auto W_gamma() { return gate_w_.bottomRows(config_.H); }
  auto b_beta() { return gate_b_.head(config_.H); }
  auto b_gamma() { return gate_b_.tail(config_.H); }
  RowMatrix<T>& lambda_raw() { return lambda_raw_; }      // (H, d)
  auto conv_q() { return conv_.topRows(config_.H * config_.d); }     // (H d, K)
  auto conv_k() { return conv_.bottomRows(config_.H * config_.d); }  // (H d, K)
  Vector<T>& norm_weight() { return norm_w_; }            // (dv)
  auto grad_W_beta() { return gate_w_grad_.topRows(config_.H); }
  auto grad_W_gamma() { return gate_w_grad_.bottomRows(config_.H); }
  auto grad_b_beta() { return gate_b_grad_.head(config_.H); }
  auto grad_b_gamma() { return gate_b_grad_.tail(config_.H); }
  RowMatrix<T>& grad_lambda_raw() { return lambda_raw_grad_; }
  auto grad_conv_q() { return conv_grad_.topRows(config_.H * config_.d); }
  auto grad_conv_k() { return conv_grad_.bottomRows(config_.H * config_.d); }
  Vector<T>& grad_norm_weight() { return norm_w_grad_; }

  // lambda_h (d) = softplus(lambda_raw_h) + config.lambda_floor (M41).
  Vector<T> lambda(long h) const {
    if (h < 0 || h >= config_.H) detail::fail("GatedMesaLayer::lambda", "head h = ", h, " is outside [0, H = ", config_.H, ")");
    Vector<T> l(config_.d);
    for (long i = 0; i < config_.d; ++i)
      l[i] = static_cast<T>(detail::softplus(double(lambda_raw_(h, i))) + config_.lambda_floor);
    return l;
  }

  // W_q, W_k, W_v, W_o, W_beta, W_gamma ~ N(0, stddev^2) (in this order) and
  // conv_q, conv_k ~ U(-1/sqrt(K), 1/sqrt(K)) (PyTorch's Conv1d default), all
  // from rng; b_beta, b_gamma, lambda_raw and norm_weight back to their
  // configured initial values.
  void init(SplitMix64& rng, double stddev) {
    detail::check_init_stddev("GatedMesaLayer::init", stddev);
    Base::init_weights(rng, stddev);
    fill_normal(gate_w_.data(), std::size_t(gate_w_.size()), stddev, rng);
    const double bound = config_.conv_size > 0 ? 1.0 / std::sqrt(double(config_.conv_size)) : 0.0;
    for (long i = 0; i < conv_.size(); ++i) conv_.data()[i] = static_cast<T>(bound * (2.0 * rng.uniform01() - 1.0));
    reset_extra_parameters();
  }
  void init(std::uint64_t seed, double stddev) {
    SplitMix64 rng(seed);
    init(rng, stddev);
  }

  // Appends prefix + "W_q", "W_k", "W_v", "W_o", "W_beta", "b_beta", "W_gamma",
  // "b_gamma", "lambda_raw", ("conv_q", "conv_k" when K > 0), "norm_weight".
  void parameters(std::vector<ParameterView<T>>& out, const std::string& prefix) {
    Base::weight_parameters(out, prefix);
    const long H = config_.H, D = config_.D, d = config_.d, K = config_.conv_size;
    out.push_back({prefix + "W_beta", gate_w_.data(), gate_w_grad_.data(), std::size_t(H * D), {H, D}});
    out.push_back({prefix + "b_beta", gate_b_.data(), gate_b_grad_.data(), std::size_t(H), {H}});
    out.push_back(
        {prefix + "W_gamma", gate_w_.data() + H * D, gate_w_grad_.data() + H * D, std::size_t(H * D), {H, D}});
    out.push_back({prefix + "b_gamma", gate_b_.data() + H, gate_b_grad_.data() + H, std::size_t(H), {H}});
    out.push_back({prefix + "lambda_raw", lambda_raw_.data(), lambda_raw_grad_.data(), std::size_t(H * d), {H, d}});
    if (K > 0) {
      out.push_back({prefix + "conv_q", conv_.data(), conv_grad_.data(), std::size_t(H * d * K), {H * d, K}});
      out.push_back({prefix + "conv_k", conv_.data() + H * d * K, conv_grad_.data() + H * d * K,
                     std::size_t(H * d * K), {H * d, K}});
    }
    out.push_back({prefix + "norm_weight", norm_w_.data(), norm_w_grad_.data(), std::size_t(config_.dv), {config_.dv}});
  }

  // x is (B*T, D); writes y (B*T, D) = Delta e (M37-M43) and fills cache.
  void forward(ConstMatrixRef<T> x, long seq_len, Cache& cache, MatrixRef<T> y) {
    const char* where = "GatedMesaLayer::forward";
    const long B = detail::check_layer_input<T>(where, x, seq_len, config_.D);
    detail::check_shape(where, "y", y, x.rows(), config_.D);
    check_parameters(where);
    const long H = config_.H, d = config_.d, dv = config_.dv, K = config_.conv_size, T_ = seq_len, N = x.rows();
    cache.batch = 0;  // invalid until complete
    const int threads = detail::resolve_num_threads(config_.num_threads);
    detail::ScopedSerialEigen serial_eigen;
    const GatedMesaOptions<T> opt = options();

    Base::project_qkv(x, cache.qkv, threads);  // M37
    RowMatrix<T> logits = x * gate_w_.transpose();  // M40: (N, 2H) gate logits, biases below
    logits.rowwise() += gate_b_.transpose();
    cache.lambda.resize(H, d);
    for (long h = 0; h < H; ++h) cache.lambda.row(h) = lambda(h).transpose();  // M41
    if (K > 0)
      cache.conv.resize(N, 2 * H * d);
    else
      cache.conv.resize(0, 0);
    cache.qk.resize(N, 2 * H * d);
    cache.inv_norm.resize(N, 2 * H);
    cache.gates.resize(B * H, 2 * T_);
    cache.o.resize(N, H * dv);
    cache.rms.resize(N, H);
    cache.u.resize(N, H * dv);
    cache.heads.resize(std::size_t(B * H));

    detail::parallel_for_rethrow(B * H, threads, [&](std::ptrdiff_t item) {
      const long b = long(item) / H, h = long(item) % H, r0 = b * T_;
      for (int s = 0; s < 2; ++s) {  // s = 0: q, s = 1: k
        const long col = s * H * d + h * d;  // column of head h's q or k in qkv, conv, qk; row of its conv weights
        auto raw = cache.qkv.block(r0, col, T_, d);
        auto out = cache.qk.block(r0, col, T_, d);
        if (K > 0) {
          auto pre = cache.conv.block(r0, col, T_, d);
          for (long t = 0; t < T_; ++t)
            convolve_token(col, std::max(0L, K - 1 - t), [&](long j) { return &raw(t - K + 1 + j, 0); }, &pre(t, 0),
                           &out(t, 0));
        } else {
          out = raw;
        }
        detail::l2_normalize_rows_forward<T>(out, &cache.inv_norm(r0, s * H + h), 2 * H);  // M39
      }
      for (long t = 0; t < T_; ++t) {  // M40
        cache.gates(item, t) = static_cast<T>(detail::sigmoid(double(logits(r0 + t, h))));
        cache.gates(item, T_ + t) = static_cast<T>(detail::sigmoid(double(logits(r0 + t, H + h))));
      }
      const Vector<T> beta = cache.gates.row(item).head(T_).transpose();
      const Vector<T> gamma = cache.gates.row(item).tail(T_).transpose();
      const Vector<T> lam = cache.lambda.row(h).transpose();
      auto o = cache.o.block(r0, h * dv, T_, dv);
      try {
        gated_mesa_forward<T>(cache.qk.block(r0, h * d, T_, d), cache.qk.block(r0, H * d + h * d, T_, d),
                              cache.qkv.block(r0, this->v_col(h), T_, dv), beta, gamma, lam, opt, o,
                              cache.heads[std::size_t(item)]);  // M29-M32
      } catch (const MesaBreakdownError& e) {
        throw MesaBreakdownError(std::string(where) + ": sequence b = " + std::to_string(b) + ", head h = " +
                                     std::to_string(h) + ": " + e.what(),
                                 e.position(), b, h);
      } catch (const std::invalid_argument& e) {  // gates out of range (a diverged gate parameter)
        detail::fail(where, "sequence b = ", b, ", head h = ", h, ": ", e.what());
      }
      for (long t = 0; t < T_; ++t) cache.rms(r0 + t, h) = rms_norm_token(o.row(t), cache.u.block(r0 + t, h * dv, 1, dv));
    });
    Base::project_out(cache.u, y, threads);  // M43
    cache.num_heads = H;
    cache.key_size = d;
    cache.value_size = dv;
    cache.conv_size = K;
    cache.seq_len = T_;
    cache.batch = B;
  }

  RowMatrix<T> forward(ConstMatrixRef<T> x, long seq_len, Cache& cache) {
    RowMatrix<T> y(x.rows(), x.cols());
    forward(x, seq_len, cache, y);
    return y;
  }

  // The state of B empty sequences: S = 0 and, for the exact solver,
  // R = Lambda^{-1} (P_0 = Lambda, M29), for cg H = 0. The exact solver's R_0
  // is taken from lambda_raw now: make the state after setting the parameters.
  State initial_state(long B) const {
    const char* where = "GatedMesaLayer::initial_state";
    detail::check_positive_size(where, "B", B);
    check_parameters(where);
    const long H = config_.H, d = config_.d, dv = config_.dv;
    State s;
    s.batch = B;
    s.tokens = 0;
    s.window = RowMatrix<T>::Zero(B, window_columns());
    s.heads.resize(std::size_t(B * H));
    for (long item = 0; item < B * H; ++item) {
      GatedMesaState<T>& st = s.heads[std::size_t(item)];
      st.S = RowMatrix<T>::Zero(dv, d);
      if (config_.solver == MesaSolver::exact) {
        const Vector<T> lam = lambda(item % H);
        st.R = RowMatrix<T>::Zero(d, d);
        for (long i = 0; i < d; ++i) st.R(i, i) = T(1) / lam[i];
      } else {
        st.H = RowMatrix<T>::Zero(d, d);
      }
    }
    return s;
  }

  // One token of each of the state's B sequences: x_t (B, D) row b = the next
  // input of sequence b; writes y_t (B, D) (M37-M43 at that position) and
  // advances the state. The op runs token by token whatever config.chunk says.
  void step(ConstMatrixRef<T> x_t, State& state, MatrixRef<T> y_t) {
    const char* where = "GatedMesaLayer::step";
    const long H = config_.H, d = config_.d, dv = config_.dv, K = config_.conv_size, B = state.batch;
    if (B < 1 || state.tokens < 0 || long(state.heads.size()) != B * H || state.window.rows() != B ||
        state.window.cols() != window_columns())
      detail::fail(where, "state is not a state of this layer (batch ", B, ", ", state.heads.size(), " head states, window ",
                   state.window.rows(), " x ", state.window.cols(), "; expected batch >= 1, batch * H = batch * ", H,
                   " head states, window batch x ", window_columns(), "): make it with initial_state(B)");
    detail::check_shape(where, "x_t", x_t, B, config_.D);
    detail::check_shape(where, "y_t", y_t, B, config_.D);
    if (!x_t.allFinite()) detail::fail(where, "x_t has a non-finite entry");
    check_parameters(where);
    const int threads = detail::resolve_num_threads(config_.num_threads);
    detail::ScopedSerialEigen serial_eigen;
    const GatedMesaOptions<T> opt = options();
    const long t = state.tokens, qk_cols = 2 * H * d;

    RowMatrix<T> qkv;
    Base::project_qkv(x_t, qkv, threads);  // M37
    RowMatrix<T> logits = x_t * gate_w_.transpose();  // M40
    logits.rowwise() += gate_b_.transpose();
    RowMatrix<T> qk(B, qk_cols), pre(B, qk_cols), inv_norm(B, 2 * H), u(B, H * dv);
    detail::parallel_for_rethrow(B * H, threads, [&](std::ptrdiff_t item) {
      const long b = long(item) / H, h = long(item) % H;
      for (int s = 0; s < 2; ++s) {
        const long col = s * H * d + h * d;
        if (K > 0)  // M38: tokens t-K+1 .. t-1 from the window, t from this step's projection
          convolve_token(col, std::max(0L, K - 1 - t),
                         [&](long j) { return j == K - 1 ? &qkv(b, col) : &state.window(b, j * qk_cols + col); },
                         &pre(b, col), &qk(b, col));
        else
          qk.block(b, col, 1, d) = qkv.block(b, col, 1, d);
        detail::l2_normalize_rows_forward<T>(qk.block(b, col, 1, d), &inv_norm(b, s * H + h), 2 * H);  // M39
      }
      const T beta = static_cast<T>(detail::sigmoid(double(logits(b, h))));       // M40
      const T gamma = static_cast<T>(detail::sigmoid(double(logits(b, H + h))));  // M40
      Vector<T> o(dv);
      try {
        gated_mesa_step<T>(qk.row(b).segment(h * d, d).transpose(), qk.row(b).segment(H * d + h * d, d).transpose(),
                           qkv.row(b).segment(this->v_col(h), dv).transpose(), beta, gamma, lambda(h), opt,
                           state.heads[std::size_t(item)], o);  // M29-M32
      } catch (const MesaBreakdownError& e) {
        throw MesaBreakdownError(std::string(where) + ": sequence b = " + std::to_string(b) + ", head h = " +
                                     std::to_string(h) + ", token " + std::to_string(t) + ": " + e.what(),
                                 t, b, h);
      } catch (const std::invalid_argument& e) {
        detail::fail(where, "sequence b = ", b, ", head h = ", h, ": ", e.what());
      }
      rms_norm_token(o.transpose(), u.block(b, h * dv, 1, dv));  // M42
    });
    Base::project_out(u, y_t, threads);  // M43
    if (K > 1) {  // the window moves by one token
      const long W = window_columns();
      for (long b = 0; b < B; ++b) {
        if (K > 2) state.window.block(b, 0, 1, W - qk_cols) = state.window.block(b, qk_cols, 1, W - qk_cols).eval();
        state.window.block(b, W - qk_cols, 1, qk_cols) = qkv.block(b, 0, 1, qk_cols);
      }
    }
    ++state.tokens;
  }

  // dy is dL/dy (B*T, D); writes dx (B*T, D) and ADDS into the parameter
  // gradients. The cache is not const: it holds the backward's scratch.
  void backward(ConstMatrixRef<T> x, long seq_len, ConstMatrixRef<T> dy, Cache& cache, MatrixRef<T> dx) {
    const char* where = "GatedMesaLayer::backward";
    const long B = detail::check_layer_backward_args<T>(where, x, seq_len, dy, dx, config_.D, cache.batch,
                                                          cache.seq_len);
    const long H = config_.H, d = config_.d, dv = config_.dv, K = config_.conv_size, T_ = seq_len, N = x.rows();
    if (cache.num_heads != H || cache.key_size != d || cache.value_size != dv || cache.conv_size != K)
      detail::fail(where, "cache was made by a layer with H = ", cache.num_heads, ", d = ", cache.key_size,
                   ", dv = ", cache.value_size, ", conv_size = ", cache.conv_size, " but this layer has H = ", H,
                   ", d = ", d, ", dv = ", dv, ", conv_size = ", K);
    if (cache.qkv.rows() != N || cache.qkv.cols() != this->width() || cache.u.rows() != N ||
        cache.u.cols() != H * dv || long(cache.heads.size()) != B * H || cache.gates.rows() != B * H)
      detail::fail(where, "cache buffers do not match its recorded shape (modified after the forward?)");
    const int threads = detail::resolve_num_threads(config_.num_threads);
    detail::ScopedSerialEigen serial_eigen;
    const GatedMesaOptions<T> opt = options();

    RowMatrix<T>& d_u = this->scratch_d_o_;
    Base::backward_out(dy, cache.u, d_u, threads);  // M43: dU = dY W_o, dW_o += dY^T U
    RowMatrix<T>& dqkv = this->scratch_dqkv_;
    dqkv.resize(N, this->width());
    cache.dgate_logits.resize(N, 2 * H);
    cache.dconv.setZero(B * H, 2 * d * K);
    cache.dnorm.resize(B * H, dv);
    cache.dlambda.resize(B * H, d);

    detail::parallel_for_rethrow(B * H, threads, [&](std::ptrdiff_t item) {
      const long b = long(item) / H, h = long(item) % H, r0 = b * T_;
      // M42 backward: u = w * o r, r = (|o|^2/dv + eps)^(-1/2), n = o r:
      //   dw += sum_t du_t * n_t,  do_t = r (g_t - n_t (g_t . n_t) / dv),  g_t = du_t * w.
      auto o = cache.o.block(r0, h * dv, T_, dv);
      auto du = d_u.block(r0, h * dv, T_, dv);
      RowMatrix<T> dout(T_, dv);
      Vector<T> dw = Vector<T>::Zero(dv);
      for (long t = 0; t < T_; ++t) {
        const T r = cache.rms(r0 + t, h);
        const Vector<T> n = o.row(t).transpose() * r;
        const Vector<T> g = du.row(t).transpose().cwiseProduct(norm_w_);
        dw += du.row(t).transpose().cwiseProduct(n);
        dout.row(t) = (r * (g - n * (g.dot(n) / T(dv)))).transpose();
      }
      cache.dnorm.row(item) = dw.transpose();
      // The op (M33-M36).
      const Vector<T> beta = cache.gates.row(item).head(T_).transpose();
      const Vector<T> gamma = cache.gates.row(item).tail(T_).transpose();
      const Vector<T> lam = cache.lambda.row(h).transpose();
      RowMatrix<T> dq(T_, d), dk(T_, d);
      Vector<T> dbeta(T_), dgamma(T_), dlam(d);
      gated_mesa_backward<T>(cache.qk.block(r0, h * d, T_, d), cache.qk.block(r0, H * d + h * d, T_, d),
                             cache.qkv.block(r0, this->v_col(h), T_, dv), beta, gamma, lam, opt, dout,
                             cache.heads[std::size_t(item)], dq, dk, dqkv.block(r0, this->v_col(h), T_, dv), dbeta,
                             dgamma, dlam);
      cache.dlambda.row(item) = dlam.transpose();
      // M40 backward: dz = dbeta beta (1 - beta), dz' = dgamma gamma (1 - gamma).
      for (long t = 0; t < T_; ++t) {
        cache.dgate_logits(r0 + t, h) = dbeta[t] * beta[t] * (T(1) - beta[t]);
        cache.dgate_logits(r0 + t, H + h) = dgamma[t] * gamma[t] * (T(1) - gamma[t]);
      }
      for (int s = 0; s < 2; ++s) {
        const long col = s * H * d + h * d;
        RowMatrix<T>& g = s == 0 ? dq : dk;
        detail::l2_normalize_rows_backward<T>(cache.qk.block(r0, col, T_, d), &cache.inv_norm(r0, s * H + h), 2 * H,
                                              g);  // M39 backward
        auto draw = dqkv.block(r0, col, T_, d);
        if (K > 0) {
          // M38 backward: dpre = g silu'(pre); dc[i, j] += sum_t dpre(t, i) raw(t-K+1+j, i);
          // draw(t', i) = sum_j c[i, j] dpre(t'+K-1-j, i).
          auto pre = cache.conv.block(r0, col, T_, d);
          auto raw = cache.qkv.block(r0, col, T_, d);
          for (long t = 0; t < T_; ++t)
            for (long i = 0; i < d; ++i) g(t, i) *= detail::silu_derivative(pre(t, i));
          T* dc = cache.dconv.row(item).data() + s * d * K;  // (d, K), channel i at dc[i K + j]
          draw.setZero();
          for (long t = 0; t < T_; ++t)
            for (long i = 0; i < d; ++i) {
              const T gi = g(t, i);
              for (long j = std::max(0L, K - 1 - t); j < K; ++j) {
                dc[i * K + j] += gi * raw(t - K + 1 + j, i);
                draw(t - K + 1 + j, i) += conv_(col + i, j) * gi;
              }
            }
        } else {
          draw = g;
        }
      }
    });
    // Shared parameters: sums over the items in a fixed order.
    for (long h = 0; h < H; ++h) {
      for (long b = 0; b < B; ++b) {
        const long item = b * H + h;
        for (long i = 0; i < d; ++i)  // M41 backward: dlambda/draw = sigmoid(lambda_raw)
          lambda_raw_grad_(h, i) += cache.dlambda(item, i) * static_cast<T>(detail::sigmoid(double(lambda_raw_(h, i))));
        for (int s = 0; s < 2 && K > 0; ++s)
          for (long i = 0; i < d; ++i)
            for (long j = 0; j < K; ++j)
              conv_grad_(s * H * d + h * d + i, j) += cache.dconv(item, s * d * K + i * K + j);
      }
    }
    for (long item = 0; item < B * H; ++item) norm_w_grad_ += cache.dnorm.row(item).transpose();
    Base::backward_qkv(x, dqkv, dx, threads);  // M37: dX = dQKV W_qkv, dW_qkv += dQKV^T X
    // M40: dX += dZ W_g, dW_g += dZ^T X, db_g += sum_t dZ_t.
    dx.noalias() += cache.dgate_logits * gate_w_;
    gate_w_grad_.noalias() += cache.dgate_logits.transpose() * x;
    gate_b_grad_ += cache.dgate_logits.colwise().sum().transpose();
  }

 private:
  static const Config& checked(const Config& c) {
    detail::check_gated_mesa_layer_config(kName, c);
    return c;
  }

  long window_columns() const { return config_.conv_size > 1 ? (config_.conv_size - 1) * 2 * config_.H * config_.d : 0; }

  // M38 at one token t for the d channels of q or k of one head (col: their
  // column in QKV and row of their conv weights): pre_i = sum_j conv(col + i, j)
  // raw_{t-K+1+j, i} over j = first .. K-1 (the tokens that exist),
  // out_i = silu(pre_i). raw_row(j) points at token t-K+1+j's d raw values.
  template <class RawRow>
  void convolve_token(long col, long first, RawRow&& raw_row, T* pre, T* out) const {
    for (long i = 0; i < config_.d; ++i) {
      T acc = 0;
      for (long j = first; j < config_.conv_size; ++j) acc += conv_(col + i, j) * raw_row(j)[i];
      pre[i] = acc;                      // causal depthwise convolution
      out[i] = detail::silu_value(acc);  // SiLU
    }
  }

  // M42 for one head's output o (1, dv): u = o r w_norm with r = 1/sqrt(|o|^2/dv + eps); returns r.
  template <class O, class U>
  T rms_norm_token(const O& o, U&& u) const {
    const T r = T(1) / std::sqrt(o.squaredNorm() / T(config_.dv) + static_cast<T>(config_.norm_eps));
    u = (o.array() * r * norm_w_.transpose().array()).matrix();
    return r;
  }

  // A diverged update can make a parameter non-finite: name it before any work.
  void check_parameters(const char* where) const {
    for (long h = 0; h < config_.H; ++h)
      for (long i = 0; i < config_.d; ++i)
        if (!std::isfinite(lambda_raw_(h, i)))
          detail::fail(where, "lambda_raw(", h, ", ", i, ") = ", lambda_raw_(h, i), " is not finite");
    if (!gate_w_.allFinite() || !gate_b_.allFinite())
      detail::fail(where, "a gate parameter (W_beta, b_beta, W_gamma or b_gamma) is not finite");
    if (!conv_.allFinite()) detail::fail(where, "a convolution weight (conv_q or conv_k) is not finite");
    if (!norm_w_.allFinite()) detail::fail(where, "norm_weight has a non-finite entry");
  }

  void reset_extra_parameters() {
    gate_b_.head(config_.H).setConstant(static_cast<T>(config_.beta_bias_init));
    gate_b_.tail(config_.H).setConstant(static_cast<T>(config_.forget_bias_init));
    lambda_raw_.setConstant(static_cast<T>(detail::softplus_inverse(config_.lambda_init - config_.lambda_floor)));
    norm_w_.setOnes();
  }

  Config config_;
  RowMatrix<T> gate_w_, gate_w_grad_;        // (2H, D): [W_beta; W_gamma]
  Vector<T> gate_b_, gate_b_grad_;           // (2H): [b_beta; b_gamma]
  RowMatrix<T> lambda_raw_, lambda_raw_grad_;  // (H, d)
  RowMatrix<T> conv_, conv_grad_;            // (2 H d, K): [conv_q; conv_k]
  Vector<T> norm_w_, norm_w_grad_;           // (dv)
};

}  // namespace mesaopt
