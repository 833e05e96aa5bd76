#pragma once
// nn::Model: a stack of residual attention blocks assembled from a ModelConfig
// (docs/paper.md §2-3). Shapes: inputs are (B*T, input_dim), sequence-major (sequence
// b occupies rows [b*T, (b+1)*T)); predictions are (B*T, output_dim).
//
//   h_0 = Embed(x)                 Dense input_dim -> width, or identity
//   per block l:
//     a   = [LN1?(h), pe]          pe: sinusoidal positions (positional_dim > 0)
//     h   = h + Attn(a)[:, :width] linear (M1-M2) | softmax (M4) | mesa (M7-M9)
//                                  | gated_mesa (M37-M43)
//     h   = h + MLP(LN2?(h))       if mlp
//     h   = clip(h, +-clip)        if clip > 0
//   pred = Readout(h)              Dense width -> output_dim, or h[:, :output_dim]
//
// With positional_dim = p the attention layer is built with D = width + p and
// only the first `width` columns of its output enter the residual stream. The
// readout slice is the paper's constructed-token read-out: e_t = [0, s_t, s_t,
// s_{t-1}] and the model writes its prediction of s_{t+1} into the first slot.
//
// backward passes ADD into the parameter gradients (module convention of
// common/parameters.hpp); the Model is not copyable (parameter views point into it).
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parameters.hpp>
#include <mesaopt/layers/gated_mesa_layer.hpp>
#include <mesaopt/layers/linear_attention_layer.hpp>
#include <mesaopt/layers/mesa_layer.hpp>
#include <mesaopt/layers/softmax_attention_layer.hpp>
#include <mesaopt/layers/threading.hpp>
#include <mesaopt/common/random.hpp>
#include <mesaopt/nn/clip.hpp>
#include <mesaopt/nn/dense.hpp>
#include <mesaopt/nn/layer_norm.hpp>
#include <mesaopt/nn/mlp.hpp>
#include <mesaopt/nn/positional.hpp>

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

namespace mesaopt::nn {

enum class AttentionKind { linear, softmax, mesa, gated_mesa };

inline const char* attention_kind_name(AttentionKind k) {
  switch (k) {
    case AttentionKind::linear: return "linear";
    case AttentionKind::softmax: return "softmax";
    case AttentionKind::mesa: return "mesa";
    case AttentionKind::gated_mesa: return "gated_mesa";
  }
  return "?";
}

struct BlockConfig {
  AttentionKind attention = AttentionKind::linear;
  long heads = 1;             // H
  long key_size = 0;          // d per head
  long value_size = 0;        // dv per head
  bool layer_norm = false;    // pre-LN before attention (and before the MLP)
  bool mlp = false;           // add a residual GELU MLP after the attention
  long mlp_hidden = 0;        // MLP inner width (required when mlp)
  long positional_dim = 0;    // p: sinusoidal encoding concatenated to the attention input; 0 = off
  bool normalize_qk = false;  // key/query L2 normalisation (linear and mesa only; gated_mesa always normalises)
  double lambda_init = 1.0;   // mesa: initial lambda (> 0)
  // mesa: lambda = softplus(lambda_raw) (default) or lambda_raw itself (the paper's code)
  LambdaParametrization lambda_parametrization = LambdaParametrization::softplus;
  bool learn_forget = false;  // mesa: learnable forget factor
  double forget_init = 1.0;   // mesa: gamma, (0, 1]; (0, 1) when learn_forget
  long mesa_chunk = 0;        // mesa: backward checkpoint interval (0 = automatic); gated_mesa: GatedMesaOptions::chunk (0 = token by token, C > 0 = chunkwise)
  // gated_mesa (GatedMesaLayerConfig, docs/gated_mesa.md "The layer"); defaults as MesaNet's layer.
  long gated_conv_size = 4;            // short convolution + SiLU on q and k; 0 = off
  double gated_lambda_floor = 0.25;    // lambda = softplus(lambda_raw) + floor; > 0
  double gated_lambda_init = 1.0;      // initial lambda; > gated_lambda_floor
  double gated_beta_bias_init = 0.0;   // initial input-gate bias
  double gated_forget_bias_init = 0.0; // initial forget-gate bias
  double gated_norm_eps = 1e-5;        // output RMSNorm eps; > 0
  MesaSolver gated_solver = MesaSolver::cg;  // exact (decaying ridge) or cg (MesaNet)
  int gated_cg_steps = 30;             // cg steps per solve; >= 1
  double gated_cg_tolerance = 0.0;     // cg early stop; >= 0 (0: always gated_cg_steps steps)
};

struct ModelConfig {
  long input_dim = 0;          // columns of the inputs
  long width = 0;              // residual stream width
  long output_dim = 0;         // columns of the predictions
  bool embed = true;           // Dense input_dim -> width; false: identity (input_dim == width)
  bool readout_slice = false;  // true: predictions = first output_dim columns of the stream; false: Dense
  double clip = 0.0;           // clip the stream to [-clip, clip] after each block; 0 = off
  double ln_eps = 1e-5;        // LayerNorm eps
  std::vector<BlockConfig> blocks;
  int num_threads = 0;         // attention layers' threads; <= 0: library default
};

}  // namespace mesaopt::nn

namespace mesaopt::detail {

inline std::string block_field(std::size_t i, const char* field) {
  return "config.blocks[" + std::to_string(i) + "]." + field;
}

inline void validate_model_config(const nn::ModelConfig& c) {
  using nn::AttentionKind;
  const char* where = "Model";
  check_positive_size(where, "config.input_dim", c.input_dim);
  check_positive_size(where, "config.width", c.width);
  check_positive_size(where, "config.output_dim", c.output_dim);
  if (!c.embed && c.input_dim != c.width)
    fail(where, "config.embed is false (identity embedding) so config.input_dim (", c.input_dim,
         ") must equal config.width (", c.width, ")");
  if (c.readout_slice && c.output_dim > c.width)
    fail(where, "config.readout_slice needs config.output_dim (", c.output_dim, ") <= config.width (", c.width, ")");
  if (!(std::isfinite(c.clip) && c.clip >= 0)) fail(where, "config.clip must be finite and >= 0 (0 = off), got ", c.clip);
  check_positive_finite(where, "config.ln_eps", c.ln_eps);
  if (c.blocks.empty()) fail(where, "config.blocks must hold at least one block");
  for (std::size_t i = 0; i < c.blocks.size(); ++i) {
    const nn::BlockConfig& b = c.blocks[i];
    if (b.attention != AttentionKind::linear && b.attention != AttentionKind::softmax &&
        b.attention != AttentionKind::mesa && b.attention != AttentionKind::gated_mesa)
      fail(where, block_field(i, "attention"), " is not linear, softmax, mesa or gated_mesa (value ", int(b.attention),
           ")");
    check_positive_size(where, block_field(i, "heads").c_str(), b.heads);
    check_positive_size(where, block_field(i, "key_size").c_str(), b.key_size);
    check_positive_size(where, block_field(i, "value_size").c_str(), b.value_size);
    if (b.mlp) check_positive_size(where, block_field(i, "mlp_hidden").c_str(), b.mlp_hidden);
    if (b.positional_dim < 0) fail(where, block_field(i, "positional_dim"), " must be >= 0, got ", b.positional_dim);
    if (b.normalize_qk && b.attention == AttentionKind::softmax)
      fail(where, block_field(i, "normalize_qk"), " is not supported by softmax attention");
    if (b.normalize_qk && b.attention == AttentionKind::gated_mesa)
      fail(where, block_field(i, "normalize_qk"),
           " must be false for gated_mesa (the layer always L2-normalises q and k, docs/math.md M39)");
    if (b.attention == AttentionKind::mesa) {
      if (!(std::isfinite(b.lambda_init) && b.lambda_init > 0))
        fail(where, block_field(i, "lambda_init"), " must be finite and > 0, got ", b.lambda_init);
      const bool ok = b.learn_forget ? (b.forget_init > 0 && b.forget_init < 1) : (b.forget_init > 0 && b.forget_init <= 1);
      if (!ok)
        fail(where, block_field(i, "forget_init"), " must lie in ", b.learn_forget ? "(0, 1)" : "(0, 1]",
             " (learn_forget = ", b.learn_forget, "), got ", b.forget_init);
      if (b.mesa_chunk < 0) fail(where, block_field(i, "mesa_chunk"), " must be >= 0, got ", b.mesa_chunk);
      if (b.lambda_parametrization != LambdaParametrization::softplus &&
          b.lambda_parametrization != LambdaParametrization::raw)
        fail(where, block_field(i, "lambda_parametrization"), " is not softplus or raw (value ",
             int(b.lambda_parametrization), ")");
    }
    if (b.attention == AttentionKind::gated_mesa) {
      if (b.mesa_chunk < 0) fail(where, block_field(i, "mesa_chunk"), " must be >= 0, got ", b.mesa_chunk);
      if (b.gated_conv_size < 0)
        fail(where, block_field(i, "gated_conv_size"), " must be >= 0 (0 = off), got ", b.gated_conv_size);
      if (!(std::isfinite(b.gated_lambda_floor) && b.gated_lambda_floor > 0))
        fail(where, block_field(i, "gated_lambda_floor"), " must be finite and > 0, got ", b.gated_lambda_floor);
      if (!(std::isfinite(b.gated_lambda_init) && b.gated_lambda_init > b.gated_lambda_floor))
        fail(where, block_field(i, "gated_lambda_init"), " must be finite and > gated_lambda_floor = ",
             b.gated_lambda_floor, ", got ", b.gated_lambda_init);
      if (!std::isfinite(b.gated_beta_bias_init))
        fail(where, block_field(i, "gated_beta_bias_init"), " must be finite, got ", b.gated_beta_bias_init);
      if (!std::isfinite(b.gated_forget_bias_init))
        fail(where, block_field(i, "gated_forget_bias_init"), " must be finite, got ", b.gated_forget_bias_init);
      if (!(std::isfinite(b.gated_norm_eps) && b.gated_norm_eps > 0))
        fail(where, block_field(i, "gated_norm_eps"), " must be finite and > 0, got ", b.gated_norm_eps);
      if (b.gated_solver != MesaSolver::exact && b.gated_solver != MesaSolver::cg)
        fail(where, block_field(i, "gated_solver"), " is not exact or cg (value ", int(b.gated_solver), ")");
      if (b.gated_cg_steps < 1)
        fail(where, block_field(i, "gated_cg_steps"), " must be at least 1, got ", b.gated_cg_steps);
      if (!(std::isfinite(b.gated_cg_tolerance) && b.gated_cg_tolerance >= 0))
        fail(where, block_field(i, "gated_cg_tolerance"), " must be finite and >= 0, got ", b.gated_cg_tolerance);
    }
  }
}

}  // namespace mesaopt::detail

namespace mesaopt::nn {

// The attention layer of block bc in a model configured by mc, as nn::Model
// builds it (construction values; the model then owns it). Also used by the
// analysis tools to run one block's attention on its own.
template <class T>
using AnyAttentionLayer =
    std::variant<LinearAttentionLayer<T>, SoftmaxAttentionLayer<T>, MesaLayer<T>, GatedMesaLayer<T>>;

template <class T>
AnyAttentionLayer<T> make_attention_layer(const BlockConfig& bc, const ModelConfig& mc) {
  const long D = mc.width + bc.positional_dim;
  switch (bc.attention) {
    case AttentionKind::linear:
      return LinearAttentionLayer<T>(
          LinearAttentionLayerConfig{D, bc.heads, bc.key_size, bc.value_size, bc.normalize_qk, mc.num_threads});
    case AttentionKind::softmax:
      return SoftmaxAttentionLayer<T>(
          SoftmaxAttentionLayerConfig{D, bc.heads, bc.key_size, bc.value_size, mc.num_threads});
    case AttentionKind::gated_mesa: {
      GatedMesaLayerConfig g;
      g.D = D;
      g.H = bc.heads;
      g.d = bc.key_size;
      g.dv = bc.value_size;
      g.conv_size = bc.gated_conv_size;
      g.lambda_floor = bc.gated_lambda_floor;
      g.lambda_init = bc.gated_lambda_init;
      g.beta_bias_init = bc.gated_beta_bias_init;
      g.forget_bias_init = bc.gated_forget_bias_init;
      g.norm_eps = bc.gated_norm_eps;
      g.solver = bc.gated_solver;
      g.cg_steps = bc.gated_cg_steps;
      g.cg_tolerance = bc.gated_cg_tolerance;
      g.chunk = bc.mesa_chunk;
      g.num_threads = mc.num_threads;
      return GatedMesaLayer<T>(g);
    }
    case AttentionKind::mesa:
      break;
  }
  MesaLayerConfig m;
  m.D = D;
  m.H = bc.heads;
  m.d = bc.key_size;
  m.dv = bc.value_size;
  m.normalize_qk = bc.normalize_qk;
  m.lambda_init = bc.lambda_init;
  m.lambda_parametrization = bc.lambda_parametrization;
  m.learn_forget = bc.learn_forget;
  m.forget_init = bc.forget_init;
  m.chunk = bc.mesa_chunk;
  m.num_threads = mc.num_threads;
  return MesaLayer<T>(m);
}

template <class T>
struct BlockCache {
  LayerNormCache<T> ln1;
  RowMatrix<T> attn_in;  // (B*T, width + p): the attention layer's input [LN1?(h), pe]
  // The attention layer's cache, of the block's kind.
  std::variant<LinearAttentionLayerCache<T>, SoftmaxAttentionLayerCache<T>, MesaLayerCache<T>,
               GatedMesaLayerCache<T>>
      attn;
  LayerNormCache<T> ln2;
  MlpCache<T> mlp;
  RowMatrix<T> pre_clip;  // (B*T, width): the stream before clipping (empty when clip is off)
  ClipCache<T> clip;
};

template <class T>
struct ModelCache {
  long batch = 0, seq_len = 0;  // of the last complete forward (batch 0: none)
  DenseCache<T> embed;
  std::vector<BlockCache<T>> blocks;
  DenseCache<T> readout;
};

template <class T>
class Model {
 public:
  using Scalar = T;
  using Cache = ModelCache<T>;

  explicit Model(const ModelConfig& config) : config_(checked(config)) {
    if (config_.embed) embed_ = std::make_unique<Dense<T>>(DenseConfig{config_.input_dim, config_.width, true});
    for (const BlockConfig& bc : config_.blocks) blocks_.push_back(std::make_unique<Block>(bc, config_));
    if (!config_.readout_slice)
      readout_ = std::make_unique<Dense<T>>(DenseConfig{config_.width, config_.output_dim, true});
    set_num_threads(config_.num_threads);
  }
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return config_; }

  void set_num_threads(int n) {
    config_.num_threads = n;
    for (auto& b : blocks_) std::visit([n](auto& layer) { layer.set_num_threads(n); }, b->attn);
  }

  // Deterministic: weights ~ N(0, stddev^2) drawn in parameter order from one
  // SplitMix64(seed); biases 0, LayerNorm gain 1, mesa lambda = lambda_init
  // (gated_mesa: its layer's init, layers/gated_mesa_layer.hpp).
  void init(std::uint64_t seed, double stddev) {
    if (!(std::isfinite(stddev) && stddev >= 0))
      detail::fail("Model::init", "stddev must be finite and >= 0, got ", stddev);
    SplitMix64 rng(seed);
    if (embed_) embed_->init(rng, stddev);
    for (auto& b : blocks_) {
      if (b->ln1) b->ln1->init();
      std::visit([&](auto& layer) { layer.init(rng, stddev); }, b->attn);
      if (b->ln2) b->ln2->init();
      if (b->mlp) b->mlp->init(rng, stddev);
    }
    if (readout_) readout_->init(rng, stddev);
  }

  // Names: "embed.weight", "block0.ln1.gain", "block0.attn.W_q", "block0.ln2.bias",
  // "block0.mlp.fc1.weight", "readout.weight", ...
  void parameters(std::vector<ParameterView<T>>& out, const std::string& prefix = "") {
    if (embed_) embed_->parameters(out, prefix + "embed.");
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      Block& b = *blocks_[i];
      const std::string p = prefix + "block" + std::to_string(i) + ".";
      if (b.ln1) b.ln1->parameters(out, p + "ln1.");
      std::visit([&](auto& layer) { layer.parameters(out, p + "attn."); }, b.attn);
      if (b.ln2) b.ln2->parameters(out, p + "ln2.");
      if (b.mlp) b.mlp->parameters(out, p + "mlp.");
    }
    if (readout_) readout_->parameters(out, prefix + "readout.");
  }
  std::vector<ParameterView<T>> parameters() {
    std::vector<ParameterView<T>> out;
    parameters(out);
    return out;
  }

  // x is (B*T, input_dim), one token per row; returns (B*T, output_dim).
  RowMatrix<T> forward(ConstMatrixRef<T> x, long seq_len, Cache& cache) {
    check_input("Model::forward", x, seq_len);
    detail::ScopedSerialEigen serial_eigen;
    cache.batch = 0;  // invalid until complete
    const long rows = x.rows();
    RowMatrix<T> h = embed_forward(x, cache.embed);
    cache.blocks.resize(blocks_.size());
    for (std::size_t i = 0; i < blocks_.size(); ++i) block_forward(*blocks_[i], h, seq_len, cache.blocks[i]);
    RowMatrix<T> pred(rows, config_.output_dim);
    if (readout_)
      readout_->forward(h, pred, cache.readout);
    else
      pred = h.leftCols(config_.output_dim);
    cache.seq_len = seq_len;
    cache.batch = rows / seq_len;
    return pred;
  }

  // dpred is (B*T, output_dim): dL/dpred of the last forward. Adds every
  // parameter's gradient. The cache is non-const (the mesa layer's backward
  // recomputes checkpoints in it).
  void backward(ConstMatrixRef<T> dpred, Cache& cache) { backward_impl(dpred, cache, nullptr); }

  // Same, and writes dL/dx (B*T, input_dim) into dx.
  void backward(ConstMatrixRef<T> dpred, Cache& cache, MatrixRef<T> dx) {
    detail::check_shape("Model::backward", "dx", dx, cache.batch * cache.seq_len, config_.input_dim);
    RowMatrix<T> tmp(dx.rows(), dx.cols());
    backward_impl(dpred, cache, &tmp);
    dx = tmp;
  }

  // Probe of the trained model (changes no parameter, gradient or caller's
  // cache): the causal softmax attention probabilities of block `block`
  // (0-based) on inputs x (B*T, input_dim), sequence-major. Runs the embedding
  // and blocks 0..block-1 and builds that block's attention input
  // [LN1?(h), pe] with the same code as forward, so the layer sees exactly
  // what it sees in forward; returns SoftmaxAttentionLayer::attention_probabilities
  // of it: B*H matrices (T, T), item b*H + h, row t = query position, column
  // i = key position (rows sum to 1, zero above the diagonal). Throws
  // std::invalid_argument if block is out of range or not a softmax block.
  std::vector<RowMatrix<T>> attention_probabilities(ConstMatrixRef<T> x, long seq_len, long block) {
    const char* where = "Model::attention_probabilities";
    const long num_blocks = static_cast<long>(blocks_.size());
    if (block < 0 || block >= num_blocks)
      detail::fail(where, "block must lie in [0, ", num_blocks, ") (the model's blocks), got ", block);
    Block& probed = *blocks_[std::size_t(block)];
    const auto* softmax = std::get_if<SoftmaxAttentionLayer<T>>(&probed.attn);
    if (softmax == nullptr)
      detail::fail(where, "block ", block, " is a ", attention_kind_name(probed.config.attention),
                   " block; attention probabilities exist only for softmax blocks");
    check_input(where, x, seq_len);
    detail::ScopedSerialEigen serial_eigen;
    Cache scratch;
    RowMatrix<T> h = embed_forward(x, scratch.embed);
    scratch.blocks.resize(std::size_t(block) + 1);
    for (long i = 0; i < block; ++i) block_forward(*blocks_[std::size_t(i)], h, seq_len, scratch.blocks[std::size_t(i)]);
    BlockCache<T>& c = scratch.blocks[std::size_t(block)];
    attention_input(probed, h, seq_len, c);
    return softmax->attention_probabilities(c.attn_in, seq_len);
  }

 private:
  using AttentionLayer = AnyAttentionLayer<T>;

  struct Block {
    Block(const BlockConfig& bc, const ModelConfig& mc) : config(bc), attn(make_attention_layer<T>(bc, mc)) {
      if (bc.layer_norm) ln1 = std::make_unique<LayerNorm<T>>(LayerNormConfig{mc.width, mc.ln_eps});
      if (bc.mlp) {
        if (bc.layer_norm) ln2 = std::make_unique<LayerNorm<T>>(LayerNormConfig{mc.width, mc.ln_eps});
        mlp = std::make_unique<Mlp<T>>(MlpConfig{mc.width, bc.mlp_hidden, true});
      }
    }
    BlockConfig config;
    std::unique_ptr<LayerNorm<T>> ln1, ln2;
    AttentionLayer attn;
    std::unique_ptr<Mlp<T>> mlp;
  };

  // The block's layer cache, switched to the layer's kind (a no-op after the first step).
  template <class Layer>
  static typename Layer::Cache& layer_cache(BlockCache<T>& c) {
    using C = typename Layer::Cache;
    if (!std::holds_alternative<C>(c.attn)) c.attn.template emplace<C>();
    return std::get<C>(c.attn);
  }
  // The same for the backward, which must not replace a cache of another kind
  // (the cache would be lost to the model that made it): it throws instead.
  template <class Layer>
  static typename Layer::Cache& layer_cache_for_backward(BlockCache<T>& c) {
    using C = typename Layer::Cache;
    if (!std::holds_alternative<C>(c.attn))
      detail::fail("Model::backward", "cache holds another kind of attention layer than this model's ",
                   Layer::kName, " (pass the cache of this model's forward)");
    return std::get<C>(c.attn);
  }

  static const ModelConfig& checked(const ModelConfig& c) {
    detail::validate_model_config(c);
    return c;
  }

  // Throws unless x is (B*T, input_dim) for some B >= 1 with T = seq_len >= 1.
  void check_input(const char* where, const ConstMatrixRef<T>& x, long seq_len) const {
    detail::check_positive_size(where, "seq_len", seq_len);
    detail::check_positive_size(where, "x.rows()", x.rows());
    detail::check_size(where, "x.cols()", x.cols(), config_.input_dim, "config.input_dim");
    if (x.rows() % seq_len != 0)
      detail::fail(where, "x has ", x.rows(), " rows, not a multiple of seq_len = ", seq_len,
                            " (expected B*T rows)");
  }

  // h_0 (B*T, width) = Embed(x), or x itself without an embedding.
  RowMatrix<T> embed_forward(const ConstMatrixRef<T>& x, DenseCache<T>& c) {
    RowMatrix<T> h(x.rows(), config_.width);
    if (embed_)
      embed_->forward(x, h, c);
    else
      h = x;
    return h;
  }

  // c.attn_in (B*T, width + p) = [LN1?(h), pe]: the block's attention input
  // (fills c.ln1 when LN1 is on).
  void attention_input(Block& b, const RowMatrix<T>& h, long seq_len, BlockCache<T>& c) {
    const long rows = h.rows(), W = config_.width, p = b.config.positional_dim;
    c.attn_in.resize(rows, W + p);
    if (b.ln1)
      b.ln1->forward(h, c.attn_in.leftCols(W), c.ln1);
    else
      c.attn_in.leftCols(W) = h;
    if (p > 0) {
      const RowMatrix<T> pe = sinusoidal_encoding<T>(seq_len, p);
      for (long r0 = 0; r0 < rows; r0 += seq_len) c.attn_in.block(r0, W, seq_len, p) = pe;
    }
  }

  // h (B*T, width) is updated in place to the block's output.
  void block_forward(Block& b, RowMatrix<T>& h, long seq_len, BlockCache<T>& c) {
    const long rows = h.rows(), W = config_.width, p = b.config.positional_dim;
    attention_input(b, h, seq_len, c);
    RowMatrix<T> y(rows, W + p);
    std::visit(
        [&](auto& layer) {
          using Layer = std::decay_t<decltype(layer)>;
          layer.forward(c.attn_in, seq_len, layer_cache<Layer>(c), y);
        },
        b.attn);
    h += y.leftCols(W);
    if (b.mlp) {
      RowMatrix<T> z(rows, W);
      if (b.ln2) {
        RowMatrix<T> u(rows, W);
        b.ln2->forward(h, u, c.ln2);
        b.mlp->forward(u, z, c.mlp);
      } else {
        b.mlp->forward(h, z, c.mlp);
      }
      h += z;
    }
    if (config_.clip > 0) {
      c.pre_clip = h;
      clip_forward<T>(c.pre_clip, static_cast<T>(config_.clip), h, c.clip);
    } else {
      c.pre_clip.resize(0, 0);
    }
  }

  // dh (B*T, width): dL/d(block output) in, dL/d(block input) out.
  void block_backward(Block& b, RowMatrix<T>& dh, long seq_len, BlockCache<T>& c) {
    const long rows = dh.rows(), W = config_.width, p = b.config.positional_dim;
    if (config_.clip > 0) clip_backward<T>(dh, c.clip, dh);  // element-wise, in place
    if (b.mlp) {  // h_out = h_mid + MLP(LN2?(h_mid))
      RowMatrix<T> du(rows, W);
      b.mlp->backward(dh, c.mlp, du);
      if (b.ln2) {
        RowMatrix<T> dmid(rows, W);
        b.ln2->backward(du, c.ln2, dmid);
        dh += dmid;
      } else {
        dh += du;
      }
    }
    // h_mid = h_in + Attn([LN1?(h_in), pe])[:, :W]: the pe columns and the
    // dropped output columns get no gradient. Without positional columns the
    // layer's output gradient is dh itself (no copy).
    RowMatrix<T> dy_padded;
    if (p > 0) {
      dy_padded = RowMatrix<T>::Zero(rows, W + p);
      dy_padded.leftCols(W) = dh;
    }
    RowMatrix<T> da(rows, W + p);
    std::visit(
        [&](auto& layer) {
          using Layer = std::decay_t<decltype(layer)>;
          layer.backward(c.attn_in, seq_len, p > 0 ? ConstMatrixRef<T>(dy_padded) : ConstMatrixRef<T>(dh),
                         layer_cache_for_backward<Layer>(c), da);
        },
        b.attn);
    if (b.ln1) {
      RowMatrix<T> dx(rows, W);
      b.ln1->backward(da.leftCols(W), c.ln1, dx);
      dh += dx;
    } else {
      dh += da.leftCols(W);
    }
  }

  void backward_impl(ConstMatrixRef<T> dpred, Cache& cache, RowMatrix<T>* dx) {
    const char* where = "Model::backward";
    if (cache.batch <= 0 || cache.blocks.size() != blocks_.size())
      detail::fail(where, "cache holds no complete forward of this model (call forward first)");
    const long rows = cache.batch * cache.seq_len, W = config_.width;
    detail::check_shape(where, "dpred", dpred, rows, config_.output_dim);
    detail::ScopedSerialEigen serial_eigen;
    RowMatrix<T> dh(rows, W);
    if (readout_) {
      readout_->backward(dpred, cache.readout, dh);
    } else {
      dh.setZero();
      dh.leftCols(config_.output_dim) = dpred;
    }
    for (std::size_t i = blocks_.size(); i-- > 0;) block_backward(*blocks_[i], dh, cache.seq_len, cache.blocks[i]);
    if (embed_) {
      if (dx != nullptr)
        embed_->backward(dh, cache.embed, *dx);
      else
        embed_->backward(dh, cache.embed);
    } else if (dx != nullptr) {
      *dx = dh;
    }
  }

  ModelConfig config_;
  std::unique_ptr<Dense<T>> embed_;
  std::vector<std::unique_ptr<Block>> blocks_;
  std::unique_ptr<Dense<T>> readout_;
};

}  // namespace mesaopt::nn
