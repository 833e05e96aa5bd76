#pragma once
// Compressed algorithms (docs/analysis.md, "Compressed algorithms"; docs/math.md
// §7, M27-M28): a linear-attention model reduced to a handful of scalars.
//
// Per head h of a linear block (D = width + p), the layer is
//   Δe_t = Σ_h PV_h Σ_{i≤t} e_i (e_iᵀ KQ_h e_t),
//   KQ_h = W_K,hᵀ W_Q,h,  PV_h = P_h W_V,h      (D x D each; M1-M2)       (M27)
// Cut each product into (D/n)² blocks of n x n (n = block_size; for the
// paper's constructed tokens n = state dimension and D = 4n, so 4 x 4 blocks
// indexed by the token slots [0, s_t, s_t, s_{t-1}]) and replace every block
// by the mean of its diagonal times the identity:
//   KQ_h[a, c] -> α_{h,ac} I_n,   α_{h,ac} = tr(KQ_h[a, c]) / n,   likewise β for PV_h   (M28)
// Blocks outside a mask are set to 0. Rows of KQ index the key token's slots,
// columns the query token's; rows of PV the output slots, columns the value
// token's.
//
// - CompressedAlg-K (a K-layer linear model): all blocks kept, 2 (D/n)² scalars
//   per head and layer (the default options).
// - The paper's Proposition 1 model (1 layer, 2 heads, constructed tokens whose
//   slots 0-1 the layer does not see, read-out from slot 0):
//   proposition1_options(n) keeps KQ blocks (key slot, query slot) in
//   {2, 3} x {2, 3} and PV blocks (0, 2), (0, 3): 6 scalars per head, 12 for
//   two heads. The exact choice of blocks is this library's reading of the
//   paper (docs/analysis.md).
//
// compressed_model builds the result as an nn::Model whose compressed blocks
// have key and value size D per head, with W_K,h = I, W_Q,h = [α_h ⊗ I_n],
// W_V,h = [β_h ⊗ I_n] and P_h = I, so that its products are exactly the
// compressed ones; everything else (embedding, norms, MLPs, other blocks,
// read-out, clip) is copied, and its loss can be compared with the original's.
#include <mesaopt/analysis/parameters.hpp>
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/nn/model.hpp>

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace mesaopt::analysis {

// KQ_h and PV_h of M27 for one head, in double.
struct HeadProducts {
  RowMatrix<double> kq;  // (D, D) = W_K,hᵀ W_Q,h
  RowMatrix<double> pv;  // (D, D) = P_h W_V,h
};

// The scalars of M28 for one head: ((D/n), (D/n)) each; entry (a, c) is the
// coefficient of block (a, c) (0 where masked out).
struct CompressedHead {
  RowMatrix<double> kq;  // α_h
  RowMatrix<double> pv;  // β_h
};

using BlockMask = Eigen::Array<bool, Eigen::Dynamic, Eigen::Dynamic>;

struct CompressionOptions {
  long block_size = 0;  // n: the identity blocks' size; must divide every compressed block's D
  BlockMask kq_mask;    // (D/n, D/n) blocks of KQ kept; empty = all
  BlockMask pv_mask;    // (D/n, D/n) blocks of PV kept; empty = all
};

// CompressedAlg-K: every n x n block kept.
inline CompressionOptions compressed_alg_options(long n) {
  CompressionOptions o;
  o.block_size = n;
  return o;
}

// The Proposition 1 model on constructed tokens [0, s_t, s_t, s_{t-1}] of state
// dimension n (see the header comment): 6 scalars per head.
inline CompressionOptions proposition1_options(long n) {
  CompressionOptions o;
  o.block_size = n;
  o.kq_mask = BlockMask::Constant(4, 4, false);
  o.pv_mask = BlockMask::Constant(4, 4, false);
  for (int a = 2; a < 4; ++a)
    for (int c = 2; c < 4; ++c) o.kq_mask(a, c) = true;
  o.pv_mask(0, 2) = o.pv_mask(0, 3) = true;
  return o;
}

// M27 for every head of block `block` (a linear-attention block).
template <class T>
std::vector<HeadProducts> head_products(nn::Model<T>& model, long block) {
  const char* where = "head_products";
  const nn::ModelConfig& mc = model.config();
  const long L = static_cast<long>(mc.blocks.size());
  if (block < 0 || block >= L) detail::fail(where, "block must lie in [0, ", L, ") (the model's blocks), got ", block);
  const nn::BlockConfig& bc = mc.blocks[std::size_t(block)];
  if (bc.attention != nn::AttentionKind::linear)
    detail::fail(where, "block ", block, " is a ", nn::attention_kind_name(bc.attention),
                 " block; the products KQ and PV describe linear-attention blocks only");
  if (bc.normalize_qk)
    detail::fail(where, "block ", block, " normalises q and k; its scores are not e_i^T KQ e_t");
  const long D = mc.width + bc.positional_dim, H = bc.heads, d = bc.key_size, dv = bc.value_size;
  const auto params = parameters_by_name(model);
  const std::string p = "block" + std::to_string(block) + ".attn.";
  const RowMatrix<double> Wq = detail::parameter_matrix(where, params, p + "W_q", H * d, D);
  const RowMatrix<double> Wk = detail::parameter_matrix(where, params, p + "W_k", H * d, D);
  const RowMatrix<double> Wv = detail::parameter_matrix(where, params, p + "W_v", H * dv, D);
  const RowMatrix<double> Wo = detail::parameter_matrix(where, params, p + "W_o", D, H * dv);
  std::vector<HeadProducts> out(static_cast<std::size_t>(H));
  for (long h = 0; h < H; ++h) {
    out[std::size_t(h)].kq = Wk.middleRows(h * d, d).transpose() * Wq.middleRows(h * d, d);
    out[std::size_t(h)].pv = Wo.middleCols(h * dv, dv) * Wv.middleRows(h * dv, dv);
  }
  return out;
}

}  // namespace mesaopt::analysis

namespace mesaopt::detail {

// M28 of one D x D product with block size n and mask (empty = all).
inline RowMatrix<double> block_trace_means(const RowMatrix<double>& m, long n, const analysis::BlockMask& mask) {
  const long k = m.rows() / n;
  RowMatrix<double> s = RowMatrix<double>::Zero(k, k);
  for (long a = 0; a < k; ++a)
    for (long c = 0; c < k; ++c)
      if (mask.size() == 0 || mask(a, c)) s(a, c) = m.block(a * n, c * n, n, n).trace() / double(n);
  return s;
}

// The D x D matrix [s ⊗ I_n].
inline RowMatrix<double> kron_identity(const RowMatrix<double>& s, long n) {
  RowMatrix<double> m = RowMatrix<double>::Zero(s.rows() * n, s.cols() * n);
  for (long a = 0; a < s.rows(); ++a)
    for (long c = 0; c < s.cols(); ++c) m.block(a * n, c * n, n, n).diagonal().setConstant(s(a, c));
  return m;
}

inline void check_compression(const char* where, const nn::ModelConfig& mc, std::size_t i,
                              const analysis::CompressionOptions& o) {
  const long D = mc.width + mc.blocks[i].positional_dim;
  check_positive_size(where, "options.block_size", o.block_size);
  if (D % o.block_size != 0)
    fail(where, "options.block_size (", o.block_size, ") does not divide block ", i, "'s attention width D = ", D);
  const long k = D / o.block_size;
  if (o.kq_mask.size() != 0 && (o.kq_mask.rows() != k || o.kq_mask.cols() != k))
    fail(where, "options.kq_mask is ", o.kq_mask.rows(), " x ", o.kq_mask.cols(), " but block ", i, " has ", k,
         " x ", k, " blocks of size ", o.block_size);
  if (o.pv_mask.size() != 0 && (o.pv_mask.rows() != k || o.pv_mask.cols() != k))
    fail(where, "options.pv_mask is ", o.pv_mask.rows(), " x ", o.pv_mask.cols(), " but block ", i, " has ", k,
         " x ", k, " blocks of size ", o.block_size);
}

}  // namespace mesaopt::detail

namespace mesaopt::analysis {

// The scalars of M28 for every head of every linear block of `model`; entry
// [l] is empty for a block that is not linear attention (it is not compressed).
// Throws std::invalid_argument if the model has no linear block, a linear
// block normalises q and k, or the options do not fit a block.
template <class T>
std::vector<std::vector<CompressedHead>> compress_attention(nn::Model<T>& model, const CompressionOptions& options) {
  const char* where = "compress_attention";
  const nn::ModelConfig& mc = model.config();
  std::vector<std::vector<CompressedHead>> out(mc.blocks.size());
  bool any = false;
  for (std::size_t i = 0; i < mc.blocks.size(); ++i) {
    if (mc.blocks[i].attention != nn::AttentionKind::linear) continue;
    any = true;
    detail::check_compression(where, mc, i, options);
    for (const HeadProducts& hp : head_products(model, long(i)))
      out[i].push_back({detail::block_trace_means(hp.kq, options.block_size, options.kq_mask),
                        detail::block_trace_means(hp.pv, options.block_size, options.pv_mask)});
  }
  if (!any) detail::fail(where, "the model has no linear-attention block to compress");
  return out;
}

// The number of free scalars of the compression: kept blocks of KQ and PV,
// summed over heads and compressed blocks (12 for proposition1_options on a
// 1-layer 2-head model).
template <class T>
long compressed_scalar_count(nn::Model<T>& model, const CompressionOptions& options) {
  const auto heads = compress_attention(model, options);
  long count = 0;
  for (std::size_t i = 0; i < heads.size(); ++i)
    for (std::size_t h = 0; h < heads[i].size(); ++h) {
      const long k = heads[i][h].kq.rows();
      count += options.kq_mask.size() == 0 ? k * k : long(options.kq_mask.count());
      count += options.pv_mask.size() == 0 ? k * k : long(options.pv_mask.count());
    }
  return count;
}

// The compressed model (see the header comment): same config, except that
// every linear block has key and value size D per head and carries the
// compressed products; all other parameters are copied.
template <class T>
std::unique_ptr<nn::Model<T>> compressed_model(nn::Model<T>& model, const CompressionOptions& options) {
  const auto heads = compress_attention(model, options);
  const nn::ModelConfig& mc = model.config();
  nn::ModelConfig c = mc;
  for (std::size_t i = 0; i < c.blocks.size(); ++i)
    if (!heads[i].empty()) c.blocks[i].key_size = c.blocks[i].value_size = mc.width + mc.blocks[i].positional_dim;
  auto out = std::make_unique<nn::Model<T>>(c);
  // Everything that keeps its shape: embedding, norms, MLPs, untouched blocks,
  // read-out. (The compressed blocks' projections are overwritten below.)
  const auto src = parameters_by_name(model);
  for (const ParameterView<T>& v : out->parameters()) {
    const auto it = src.find(v.name);
    if (it != src.end() && it->second.size == v.size) detail::copy_parameter_values("compressed_model", it->second, v);
  }
  const auto dst = parameters_by_name(*out);
  for (std::size_t i = 0; i < heads.size(); ++i) {
    if (heads[i].empty()) continue;
    const long D = mc.width + mc.blocks[i].positional_dim, H = mc.blocks[i].heads, n = options.block_size;
    RowMatrix<double> Wq(H * D, D), Wk(H * D, D), Wv(H * D, D), Wo(D, H * D);
    for (long h = 0; h < H; ++h) {
      Wq.middleRows(h * D, D) = detail::kron_identity(heads[i][std::size_t(h)].kq, n);
      Wk.middleRows(h * D, D).setIdentity();
      Wv.middleRows(h * D, D) = detail::kron_identity(heads[i][std::size_t(h)].pv, n);
      Wo.middleCols(h * D, D).setIdentity();
    }
    const std::string p = "block" + std::to_string(i) + ".attn.";
    const std::pair<const char*, const RowMatrix<double>*> weights[] = {
        {"W_q", &Wq}, {"W_k", &Wk}, {"W_v", &Wv}, {"W_o", &Wo}};
    for (const auto& w : weights) {
      const ParameterView<T>& v = detail::parameter_named("compressed_model", dst, p + w.first);
      Eigen::Map<RowMatrix<T>>(v.value, w.second->rows(), w.second->cols()) = w.second->template cast<T>();
    }
  }
  return out;
}

}  // namespace mesaopt::analysis
