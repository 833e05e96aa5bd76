#pragma once
// Activation capture (docs/analysis.md, "Activation capture"): the residual
// stream of an nn::Model after its embedding and after every block, and every
// block's attention input and output, for a batch of sequences.
//
// Model structure (nn/model.hpp): h_0 = Embed(x); block l computes
//   a_l = [LN1?(h_l), pe]                    attention input  (B*T, W + p_l)
//   y_l = Attn_l(a_l)                        attention output (B*T, W + p_l)
//   h_mid = h_l + y_l[:, :W];  h_{l+1} = clip(h_mid + MLP(LN2?(h_mid)))
// and the predictions are Readout(h_L).
//
// The model's forward is not touched: capture runs Model::forward as it is
// (its predictions are returned unchanged) and recomputes the stream with
// single-block models that hold copies of each block's parameters, and the
// attention outputs with stand-alone layers of each block's kind. They run
// the same code on the same values as the model's forward, so every captured
// matrix is bit-identical to the value inside the forward (checked by
// tests/test_analysis.cpp). Cost: about two forwards plus one attention layer
// per block.
#include <mesaopt/analysis/parameters.hpp>
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parallel.hpp>
#include <mesaopt/nn/dense.hpp>
#include <mesaopt/nn/model.hpp>

#include <memory>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

namespace mesaopt::analysis {

template <class T>
struct Activations {
  long batch = 0, seq_len = 0;
  RowMatrix<T> predictions;  // (B*T, output_dim): Model::forward's result
  // L + 1 matrices (B*T, width): stream[0] = h_0 (after the embedding),
  // stream[l + 1] = h_{l+1}, the stream after block l (after its clip).
  std::vector<RowMatrix<T>> stream;
  // L matrices (B*T, width + p_l): block l's attention input [LN1?(h_l), pe].
  std::vector<RowMatrix<T>> attention_input;
  // L matrices (B*T, width + p_l): the attention layer's output y_l; its first
  // `width` columns are what enters the stream (empty when not requested).
  std::vector<RowMatrix<T>> attention_output;
};

struct CaptureOptions {
  bool attention_output = true;  // also run each block's attention layer on its input
};

}  // namespace mesaopt::analysis

namespace mesaopt::detail {

// The config of a model made of block `i` of mc alone, reading and writing the
// stream itself: identity embedding, read-out = the whole stream.
inline nn::ModelConfig single_block_config(const nn::ModelConfig& mc, std::size_t i) {
  nn::ModelConfig c = mc;
  c.input_dim = mc.width;
  c.output_dim = mc.width;
  c.embed = false;
  c.readout_slice = true;
  c.blocks = {mc.blocks[i]};
  return c;
}

}  // namespace mesaopt::detail

namespace mesaopt::analysis {

// Captures the activations of `model` on x (B*T, input_dim), sequence-major.
// The model's parameters, gradients and outputs are unchanged (the model is
// taken by non-const reference only because Model::forward and
// Model::parameters are non-const). Throws std::invalid_argument on a bad x
// or seq_len (the messages of Model::forward).
template <class T>
Activations<T> capture_activations(nn::Model<T>& model, ConstMatrixRef<T> x, long seq_len,
                                   const CaptureOptions& options = {}) {
  const nn::ModelConfig& mc = model.config();
  const std::size_t L = mc.blocks.size();
  Activations<T> out;
  nn::ModelCache<T> cache;
  out.predictions = model.forward(x, seq_len, cache);  // validates x and seq_len
  out.batch = cache.batch;
  out.seq_len = seq_len;
  detail::ScopedSerialEigen serial_eigen;
  const auto params = parameters_by_name(model);

  // h_0: the model's embedding, or x itself.
  RowMatrix<T> h(x.rows(), mc.width);
  if (mc.embed) {
    nn::Dense<T> embed(nn::DenseConfig{mc.input_dim, mc.width, true});
    std::vector<ParameterView<T>> views;
    embed.parameters(views, "embed.");
    for (const ParameterView<T>& v : views)
      detail::copy_parameter_values("capture_activations", detail::parameter_named("capture_activations", params, v.name), v);
    nn::DenseCache<T> ec;
    embed.forward(x, h, ec);
  } else {
    h = x;
  }
  out.stream.reserve(L + 1);
  out.stream.push_back(h);
  out.attention_input.reserve(L);
  for (std::size_t i = 0; i < L; ++i) {
    const std::string prefix = "block" + std::to_string(i) + ".";
    out.attention_input.push_back(cache.blocks[i].attn_in);
    if (options.attention_output) {
      nn::AnyAttentionLayer<T> layer = nn::make_attention_layer<T>(mc.blocks[i], mc);
      std::visit(
          [&](auto& l) {
            using Layer = std::decay_t<decltype(l)>;
            std::vector<ParameterView<T>> views;
            l.parameters(views, prefix + "attn.");
            for (const ParameterView<T>& v : views)
              detail::copy_parameter_values("capture_activations",
                                            detail::parameter_named("capture_activations", params, v.name), v);
            typename Layer::Cache lc;
            RowMatrix<T> y(cache.blocks[i].attn_in.rows(), cache.blocks[i].attn_in.cols());
            l.forward(cache.blocks[i].attn_in, seq_len, lc, y);
            out.attention_output.push_back(std::move(y));
          },
          layer);
    }
    nn::Model<T> single(detail::single_block_config(mc, i));
    const std::size_t copied = copy_parameters_by_name(model, single, prefix, "block0.");
    if (copied != single.parameters().size())
      detail::fail("capture_activations", "block ", i, ": copied ", copied, " of ", single.parameters().size(),
                   " parameters into the single-block model (names do not match)");
    nn::ModelCache<T> sc;
    h = single.forward(h, seq_len, sc);
    out.stream.push_back(h);
  }
  return out;
}

}  // namespace mesaopt::analysis
