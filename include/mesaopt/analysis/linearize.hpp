#pragma once
// Linearisation support (docs/analysis.md, "Linearisation"): replace one block
// of a model by a block of another attention kind (e.g. softmax -> linear, as
// the paper does for layers 2..7 of its softmax models), keeping every shared
// parameter, and select the parameters of that block for training it alone.
// The training itself is the caller's (e.g. an optimiser built on
// select_parameters(model.parameters(), mask)); this header knows no training.
#include <mesaopt/analysis/parameters.hpp>
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/parameters.hpp>
#include <mesaopt/nn/model.hpp>

#include <memory>
#include <string>
#include <vector>

namespace mesaopt::analysis {

// A new model equal to `model` except that block `block` has config
// `replacement`. Every parameter whose name exists in both models is copied
// (embedding, norms, MLPs, the projections W_q, W_k, W_v, W_o when the
// replacement keeps heads, key and value sizes and positional_dim, the mesa
// λ and γ when both are mesa blocks); parameters only the new block has (e.g.
// the mesa λ when linear -> mesa) keep their construction values (λ_init).
// Throws std::invalid_argument if block is out of range, the replacement is
// not a valid block config, or a shared name changes shape.
template <class T>
std::unique_ptr<nn::Model<T>> replace_block(nn::Model<T>& model, long block, const nn::BlockConfig& replacement) {
  const char* where = "replace_block";
  nn::ModelConfig c = model.config();
  const long L = static_cast<long>(c.blocks.size());
  if (block < 0 || block >= L) detail::fail(where, "block must lie in [0, ", L, ") (the model's blocks), got ", block);
  c.blocks[std::size_t(block)] = replacement;
  auto out = std::make_unique<nn::Model<T>>(c);  // validates the replacement
  copy_parameters_by_name(model, *out);
  return out;
}

// replace_block with block `block`'s own config of attention kind `kind`
// (normalize_qk is turned off when the new kind is softmax, which has none, or
// gated_mesa, which always normalises).
template <class T>
std::unique_ptr<nn::Model<T>> replace_attention_kind(nn::Model<T>& model, long block, nn::AttentionKind kind) {
  const nn::ModelConfig& c = model.config();
  const long L = static_cast<long>(c.blocks.size());
  if (block < 0 || block >= L)
    detail::fail("replace_attention_kind", "block must lie in [0, ", L, ") (the model's blocks), got ", block);
  nn::BlockConfig b = c.blocks[std::size_t(block)];
  b.attention = kind;
  if (kind == nn::AttentionKind::softmax || kind == nn::AttentionKind::gated_mesa) b.normalize_qk = false;
  return replace_block(model, block, b);
}

// The paper's linearisation: block `block` becomes linear attention.
template <class T>
std::unique_ptr<nn::Model<T>> linearize_block(nn::Model<T>& model, long block) {
  return replace_attention_kind(model, block, nn::AttentionKind::linear);
}

// Mask over model.parameters() (same order): true for the parameters of block
// `block` ("block<i>." names), or only of its attention layer
// ("block<i>.attn.") when attention_only.
template <class T>
std::vector<bool> block_parameter_mask(nn::Model<T>& model, long block, bool attention_only = false) {
  const long L = static_cast<long>(model.config().blocks.size());
  if (block < 0 || block >= L)
    detail::fail("block_parameter_mask", "block must lie in [0, ", L, ") (the model's blocks), got ", block);
  const std::string prefix = "block" + std::to_string(block) + (attention_only ? ".attn." : ".");
  std::vector<bool> mask;
  for (const ParameterView<T>& v : model.parameters()) mask.push_back(v.name.compare(0, prefix.size(), prefix) == 0);
  return mask;
}

// The views whose mask entry is true (mask.size() must equal views.size()).
template <class T>
std::vector<ParameterView<T>> select_parameters(const std::vector<ParameterView<T>>& views,
                                                const std::vector<bool>& mask) {
  if (mask.size() != views.size())
    detail::fail("select_parameters", "mask has ", mask.size(), " entries but there are ", views.size(),
                 " parameter views (expected equal)");
  std::vector<ParameterView<T>> out;
  for (std::size_t i = 0; i < views.size(); ++i)
    if (mask[i]) out.push_back(views[i]);
  return out;
}

}  // namespace mesaopt::analysis
