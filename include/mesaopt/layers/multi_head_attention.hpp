#pragma once
// The skeleton shared by the three multi-head attention layers
// (LinearAttentionLayer, SoftmaxAttentionLayer, MesaLayer): projections,
// optional q/k L2 normalisation, the per-(batch, head) op calls spread over
// threads, the output projection, their backward passes, the carried state
// for streaming and one-token decoding (docs/math.md §6), init and the
// parameter views. A layer supplies only what differs, as hooks (CRTP):
//
//   static constexpr const char* kName;                     e.g. "MesaLayer"
//   bool normalizes_qk() const;
//   HeadState head_initial_state(long h) const;              the empty state of head h
//   void prepare(Cache&, const char* where);                 per-forward setup (may throw)
//   void head_forward(Cache&, item, h, q, k, v, out, initial*, final*);
//   void head_backward(Cache&, item, h, q, k, v, dout, dq, dk, grad_v, initial*, grad_final*, grad_initial*);
//   void begin_backward(Cache&, long items); void end_backward(Cache&, long B);
//   void head_step(h, q, k, v, HeadState&, out);
//   void extra_parameters(views, prefix); void reset_extra_parameters();
//
// Shapes: x is (B*T, D), sequence-major (sequence b is rows [b*T, (b+1)*T));
// a layer state holds one op state per (batch, head) pair, item b*H + h.
// The residual e + Delta e is the caller's (the model's). Backward ADDS into
// the parameter gradients and writes dx.
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parameters.hpp>
#include <mesaopt/common/random.hpp>
#include <mesaopt/layers/attention_projections.hpp>
#include <mesaopt/layers/qk_normalization.hpp>
#include <mesaopt/layers/threading.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace mesaopt {

// The op states of a multi-head layer, one per (batch, head) pair.
template <class S>
struct MultiHeadState {
  long batch = 0;        // B
  long heads = 0;        // H
  std::vector<S> items;  // B*H op states, item b*H + h

  S& at(long b, long h) { return items[std::size_t(b * heads + h)]; }
  const S& at(long b, long h) const { return items[std::size_t(b * heads + h)]; }
};

// What a layer's backward needs from its forward. It records the layer's
// configuration (heads, key and value size, normalisation) so that a backward
// can refuse a cache made by a layer of another shape.
template <class T, class HeadCache, class S>
struct AttentionLayerCache {
  long batch = 0;                  // B of the forward (0: no complete forward yet)
  long seq_len = 0;                // T of the forward
  long num_heads = 0, key_size = 0, value_size = 0;  // H, d, dv of the layer that made it
  bool normalized_qk = false;      // whether q and k were L2-normalised
  RowMatrix<T> qkv;                // (B*T, H (2d + dv)): projected q | k | v (q, k normalised if on)
  RowMatrix<T> inv_norm;           // (B*T, 2H): r of q (columns [0, H)) and k ([H, 2H)); empty if off
  RowMatrix<T> o;                  // (B*T, H dv): the heads' outputs, for dW_o
  std::vector<HeadCache> heads;    // B*H op caches, item b*H + h (empty structs for linear attention)
  bool has_initial = false;        // the forward started from a given state
  MultiHeadState<S> initial;       // a copy of that state (the backward needs it again)
};

namespace detail {
struct NoHeadCache {};  // linear attention keeps nothing per head
}  // namespace detail

template <class T, class Derived, class Config, class Cache, class HeadState>
class MultiHeadAttention : public AttentionProjections<T> {
  using Base = AttentionProjections<T>;

 public:
  using Scalar = T;
  using State = MultiHeadState<HeadState>;

  const Config& config() const { return config_; }
  void set_num_threads(int n) { config_.num_threads = n; }

  // W_q, W_k, W_v, W_o (in this order) ~ N(0, stddev^2), drawn from rng
  // (common/random.hpp: SplitMix64 + Box-Muller, reproducible across
  // machines); layer-specific parameters back to their configured initial values.
  void init(SplitMix64& rng, double stddev) {
    detail::check_init_stddev((std::string(Derived::kName) + "::init").c_str(), stddev);
    Base::init_weights(rng, stddev);
    derived().reset_extra_parameters();
  }
  // The same from a fresh generator seeded with `seed`.
  void init(std::uint64_t seed, double stddev) {
    SplitMix64 rng(seed);
    init(rng, stddev);
  }

  // Appends prefix+"W_q" (H d, D), "W_k" (H d, D), "W_v" (H dv, D), "W_o" (D, H dv),
  // then the layer's own parameters.
  void parameters(std::vector<ParameterView<T>>& out, const std::string& prefix) {
    Base::weight_parameters(out, prefix);
    derived().extra_parameters(out, prefix);
  }

  // The empty state for a batch of B sequences (every head's op state at t = 0).
  State initial_state(long B) const {
    detail::check_positive_size((std::string(Derived::kName) + "::initial_state").c_str(), "B", B);
    State s;
    s.batch = B;
    s.heads = config_.H;
    s.items.reserve(std::size_t(B * config_.H));
    for (long b = 0; b < B; ++b)
      for (long h = 0; h < config_.H; ++h) s.items.push_back(derived().head_initial_state(h));
    return s;
  }

  // x is (B*T, D); writes y (B*T, D) = Delta e and fills cache. initial: the
  // state before the first token of each sequence (nullptr: empty); final
  // receives the state after the last one (may be the same object as initial).
  void forward(ConstMatrixRef<T> x, long seq_len, Cache& cache, MatrixRef<T> y, const State* initial = nullptr,
               State* final = nullptr) {
    const std::string where_s = std::string(Derived::kName) + "::forward";
    const char* where = where_s.c_str();
    const long B = detail::check_layer_input<T>(where, x, seq_len, config_.D);
    detail::check_shape(where, "y", y, x.rows(), config_.D);
    if (initial != nullptr) check_state(where, "initial", *initial, B);
    const long H = config_.H, d = config_.d, dv = config_.dv;
    cache.batch = 0;  // marks the cache invalid until it is complete
    derived().prepare(cache, where);
    const int threads = detail::resolve_num_threads(config_.num_threads);
    detail::ScopedSerialEigen serial_eigen;
    const bool normalize = derived().normalizes_qk();

    Base::project_qkv(x, cache.qkv, threads);
    if (normalize)
      cache.inv_norm.resize(x.rows(), 2 * H);
    else
      cache.inv_norm.resize(0, 0);
    cache.o.resize(x.rows(), H * dv);
    cache.heads.resize(std::size_t(B * H));
    // The cache keeps its own copy of the initial state: the backward needs it,
    // and `final` may be the caller's `initial` itself.
    cache.has_initial = initial != nullptr;
    if (initial != nullptr)
      cache.initial = *initial;
    else
      cache.initial = State{};
    if (final != nullptr) {
      final->batch = B;
      final->heads = H;
      final->items.resize(std::size_t(B * H));
    }
    detail::parallel_for_rethrow(B * H, threads, [&](std::ptrdiff_t item) {
      const long b = long(item) / H, h = long(item) % H, r0 = b * seq_len;
      auto q = cache.qkv.block(r0, this->q_col(h), seq_len, d);
      auto k = cache.qkv.block(r0, this->k_col(h), seq_len, d);
      auto v = cache.qkv.block(r0, this->v_col(h), seq_len, dv);
      if (normalize) {
        detail::l2_normalize_rows_forward<T>(q, &cache.inv_norm(r0, h), 2 * H);
        detail::l2_normalize_rows_forward<T>(k, &cache.inv_norm(r0, H + h), 2 * H);
      }
      const std::size_t i = std::size_t(item);
      derived().head_forward(cache, i, h, q, k, v, cache.o.block(r0, h * dv, seq_len, dv),
                             initial != nullptr ? &cache.initial.items[i] : nullptr,
                             final != nullptr ? &final->items[i] : nullptr);
    });
    Base::project_out(cache.o, y, threads);
    cache.num_heads = H;
    cache.key_size = d;
    cache.value_size = dv;
    cache.normalized_qk = normalize;
    cache.seq_len = seq_len;
    cache.batch = B;
  }

  // Convenience form returning y.
  RowMatrix<T> forward(ConstMatrixRef<T> x, long seq_len, Cache& cache, const State* initial = nullptr,
                       State* final = nullptr) {
    RowMatrix<T> y(x.rows(), x.cols());
    forward(x, seq_len, cache, y, initial, final);
    return y;
  }

  // dy is dL/dy (B*T, D); writes dx (B*T, D) and ADDS into the parameter
  // gradients. grad_final (optional): dL/d(final state) of the forward, e.g.
  // the next piece's grad_initial; grad_initial (optional) receives dL/d(initial
  // state). The cache is not const: the mesa op uses it as scratch.
  void backward(ConstMatrixRef<T> x, long seq_len, ConstMatrixRef<T> dy, Cache& cache, MatrixRef<T> dx,
                const State* grad_final = nullptr, State* grad_initial = nullptr) {
    const std::string where_s = std::string(Derived::kName) + "::backward";
    const char* where = where_s.c_str();
    const long B = detail::check_layer_backward_args<T>(where, x, seq_len, dy, dx, config_.D, cache.batch,
                                                          cache.seq_len);
    check_cache_config(where, cache, B, x.rows());
    if (grad_final != nullptr) check_state(where, "grad_final", *grad_final, B);
    const int threads = detail::resolve_num_threads(config_.num_threads);
    detail::ScopedSerialEigen serial_eigen;
    const long H = config_.H, d = config_.d, dv = config_.dv;
    const bool normalize = cache.normalized_qk;

    RowMatrix<T>& d_o = this->scratch_d_o_;
    Base::backward_out(dy, cache.o, d_o, threads);  // dO = dY W_o, dW_o += dY^T O
    RowMatrix<T>& dqkv = this->scratch_dqkv_;
    dqkv.resize(x.rows(), this->width());  // every entry is written below
    if (grad_initial != nullptr) {
      grad_initial->batch = B;
      grad_initial->heads = H;
      grad_initial->items.resize(std::size_t(B * H));
    }
    derived().begin_backward(cache, B * H);
    detail::parallel_for_rethrow(B * H, threads, [&](std::ptrdiff_t item) {
      const long b = long(item) / H, h = long(item) % H, r0 = b * seq_len;
      auto q = cache.qkv.block(r0, this->q_col(h), seq_len, d);
      auto k = cache.qkv.block(r0, this->k_col(h), seq_len, d);
      auto v = cache.qkv.block(r0, this->v_col(h), seq_len, dv);
      auto dq = dqkv.block(r0, this->q_col(h), seq_len, d);
      auto dk = dqkv.block(r0, this->k_col(h), seq_len, d);
      const std::size_t i = std::size_t(item);
      derived().head_backward(cache, i, h, q, k, v, d_o.block(r0, h * dv, seq_len, dv), dq, dk,
                              dqkv.block(r0, this->v_col(h), seq_len, dv),
                              cache.has_initial ? &cache.initial.items[i] : nullptr,
                              grad_final != nullptr ? &grad_final->items[i] : nullptr,
                              grad_initial != nullptr ? &grad_initial->items[i] : nullptr);
      if (normalize) {
        detail::l2_normalize_rows_backward<T>(q, &cache.inv_norm(r0, h), 2 * H, dq);
        detail::l2_normalize_rows_backward<T>(k, &cache.inv_norm(r0, H + h), 2 * H, dk);
      }
    });
    derived().end_backward(cache, B);
    Base::backward_qkv(x, dqkv, dx, threads);  // dX = dQKV W_qkv, dW_qkv += dQKV^T X
  }

  // One decoding step for a batch: x_t is (B, D), one token of each sequence;
  // state (from initial_state(B) or a forward's final) advances by that token;
  // y_t (B, D) receives Delta e. No cache: decoding is inference only.
  void step(ConstMatrixRef<T> x_t, State& state, MatrixRef<T> y_t) {
    const std::string where_s = std::string(Derived::kName) + "::step";
    const char* where = where_s.c_str();
    const long B = x_t.rows();
    detail::check_positive_size(where, "x_t rows (B)", B);
    if (x_t.cols() != config_.D)
      detail::fail(where, "x_t has ", x_t.cols(), " columns but config.D is ", config_.D, " (expected equal)");
    detail::check_shape(where, "y_t", y_t, B, config_.D);
    check_state(where, "state", state, B);
    const long H = config_.H, d = config_.d, dv = config_.dv;
    derived().prepare_step(where);
    const int threads = detail::resolve_num_threads(config_.num_threads);
    detail::ScopedSerialEigen serial_eigen;
    RowMatrix<T>& qkv = step_qkv_;
    Base::project_qkv(x_t, qkv, threads);
    step_o_.resize(B, H * dv);
    const bool normalize = derived().normalizes_qk();
    detail::parallel_for_rethrow(B * H, threads, [&](std::ptrdiff_t item) {
      const long b = long(item) / H, h = long(item) % H;
      auto q = qkv.block(b, this->q_col(h), 1, d);
      auto k = qkv.block(b, this->k_col(h), 1, d);
      if (normalize) {
        T r;
        detail::l2_normalize_rows_forward<T>(q, &r, 1);
        detail::l2_normalize_rows_forward<T>(k, &r, 1);
      }
      derived().head_step(h, qkv.row(b).segment(this->q_col(h), d), qkv.row(b).segment(this->k_col(h), d),
                          qkv.row(b).segment(this->v_col(h), dv), state.items[std::size_t(item)],
                          step_o_.row(b).segment(h * dv, dv));
    });
    Base::project_out(step_o_, y_t, threads);
  }

 protected:
  explicit MultiHeadAttention(const Config& config)
      : Base(config.D, config.H, config.d, config.dv), config_(config) {}

  Config config_;

 private:
  Derived& derived() { return static_cast<Derived&>(*this); }
  const Derived& derived() const { return static_cast<const Derived&>(*this); }

  void check_state(const char* where, const char* what, const State& s, long B) const {
    if (s.batch != B || s.heads != config_.H || long(s.items.size()) != B * config_.H)
      detail::fail(where, what, " holds B = ", s.batch, ", H = ", s.heads, " (", s.items.size(),
                   " items) but the layer runs B = ", B, " sequences of H = ", config_.H, " heads");
  }

  // The cache must come from a forward of this layer's shape (issue: a cache of
  // another head split would otherwise be read out of bounds).
  void check_cache_config(const char* where, const Cache& cache, long B, long rows) const {
    if (cache.num_heads != config_.H || cache.key_size != config_.d || cache.value_size != config_.dv ||
        cache.normalized_qk != derived().normalizes_qk())
      detail::fail(where, "cache was made by a layer with H = ", cache.num_heads, ", d = ", cache.key_size, ", dv = ",
                   cache.value_size, ", normalize_qk = ", cache.normalized_qk, " but this layer has H = ", config_.H,
                   ", d = ", config_.d, ", dv = ", config_.dv, ", normalize_qk = ", derived().normalizes_qk());
    if (cache.qkv.rows() != rows || cache.qkv.cols() != this->width() || cache.o.rows() != rows ||
        cache.o.cols() != config_.H * config_.dv || long(cache.heads.size()) != B * config_.H ||
        (cache.normalized_qk && (cache.inv_norm.rows() != rows || cache.inv_norm.cols() != 2 * config_.H)))
      detail::fail(where, "cache buffers do not match its recorded shape (modified after the forward?)");
  }

  RowMatrix<T> step_qkv_, step_o_;  // step scratch
};

}  // namespace mesaopt
