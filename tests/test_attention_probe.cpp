// Tests for the attention probes: SoftmaxAttentionLayer::attention_probabilities
// and nn::Model::attention_probabilities (the "token construction" analysis of
// docs/paper.md §2/§4). The probabilities are compared with an independent
// straightforward computation from the layer's own weights (softmax of
// q k^T / sqrt(d) under the causal mask, M4), checked to be row-stochastic and
// causal, tied back to the layer's forward output (A V W_o^T = y), and the
// model probe is checked to see exactly the attention input of forward.
#include <catch2/catch.hpp>

#include <mesaopt/layers/softmax_attention_layer.hpp>
#include <mesaopt/nn.hpp>

#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

// Everything of this file lives in its own namespace, so that test files can be
// compiled together in one translation unit (tests/CMakeLists.txt, unity groups).
namespace mesaopt_test_attention_probe {

using namespace mesaopt;
using mesaopt::test::random_matrix;
using Catch::Matchers::Contains;

namespace {

// Independent M4 probabilities of one head: q, k are (T, d).
RowMatrix<double> plain_probabilities(const RowMatrix<double>& q, const RowMatrix<double>& k) {
  const long T = q.rows();
  const RowMatrix<double> s = (q * k.transpose()) / std::sqrt(double(q.cols()));
  RowMatrix<double> a = RowMatrix<double>::Zero(T, T);
  for (long t = 0; t < T; ++t) {
    const double mx = s.row(t).head(t + 1).maxCoeff();
    a.row(t).head(t + 1) = (s.row(t).head(t + 1).array() - mx).exp().matrix();
    a.row(t).head(t + 1) /= a.row(t).head(t + 1).sum();
  }
  return a;
}

// Checks every matrix is (T, T), rows sum to 1 (1e-12), exactly 0 above the
// diagonal and non-negative.
void check_stochastic_causal(const std::vector<RowMatrix<double>>& probs, long T) {
  for (const RowMatrix<double>& a : probs) {
    REQUIRE(a.rows() == T);
    REQUIRE(a.cols() == T);
    for (long t = 0; t < T; ++t) {
      CHECK(std::abs(a.row(t).sum() - 1.0) < 1e-12);
      for (long i = 0; i < T; ++i) {
        if (i > t) CHECK(a(t, i) == 0.0);
        CHECK(a(t, i) >= 0.0);
      }
    }
  }
}

double max_abs_diff(const RowMatrix<double>& a, const RowMatrix<double>& b) {
  REQUIRE(a.rows() == b.rows());
  REQUIRE(a.cols() == b.cols());
  return (a - b).cwiseAbs().maxCoeff();
}

std::map<std::string, ParameterView<double>> by_name(nn::Model<double>& model) {
  std::map<std::string, ParameterView<double>> m;
  for (const auto& v : model.parameters()) m.emplace(v.name, v);
  return m;
}

RowMatrix<double> param(const std::map<std::string, ParameterView<double>>& p, const std::string& name, long rows,
                        long cols) {
  return Eigen::Map<const RowMatrix<double>>(p.at(name).value, rows, cols);
}

// embed -> softmax block (LN, positions) -> mesa block -> softmax block (positions, MLP) -> Dense.
nn::ModelConfig probe_config(long input_dim, long width, long p0, long p2, bool ln0) {
  nn::ModelConfig c;
  c.input_dim = input_dim;
  c.width = width;
  c.output_dim = 2;
  nn::BlockConfig s0;
  s0.attention = nn::AttentionKind::softmax;
  s0.heads = 3;
  s0.key_size = 4;
  s0.value_size = 2;
  s0.positional_dim = p0;
  s0.layer_norm = ln0;
  nn::BlockConfig m;
  m.attention = nn::AttentionKind::mesa;
  m.heads = 2;
  m.key_size = 3;
  m.value_size = 3;
  nn::BlockConfig s2;
  s2.attention = nn::AttentionKind::softmax;
  s2.heads = 2;
  s2.key_size = 5;
  s2.value_size = 3;
  s2.positional_dim = p2;
  s2.mlp = true;
  s2.mlp_hidden = 7;
  c.blocks = {s0, m, s2};
  c.num_threads = 2;
  return c;
}

}  // namespace

TEST_CASE("SoftmaxAttentionLayer::attention_probabilities equals plain softmax(q k^T / sqrt(d)) (double)",
          "[probe]") {
  for (long T : {1L, 2L, 7L, 33L, 70L}) {
    for (int threads : {1, 2}) {
      const long B = 3, D = 6, H = 3, d = 4, dv = 2;
      SoftmaxAttentionLayer<double> layer({D, H, d, dv, threads});
      layer.init(std::uint64_t(T) * 7 + 1, 0.8);  // large enough weights for peaked, non-uniform rows
      const RowMatrix<double> x = random_matrix<double>(B * T, D, 100 + std::uint64_t(T), 1.0);
      INFO("T = " << T << ", threads = " << threads);
      const auto probs = layer.attention_probabilities(x, T);
      REQUIRE(probs.size() == std::size_t(B * H));
      check_stochastic_causal(probs, T);

      const RowMatrix<double> Wq = layer.W_q(), Wk = layer.W_k(), Wv = layer.W_v(), Wo = layer.W_o();
      RowMatrix<double> o(B * T, H * dv);
      double worst = 0, spread = 0;
      for (long b = 0; b < B; ++b) {
        const RowMatrix<double> xb = x.middleRows(b * T, T);
        for (long h = 0; h < H; ++h) {
          const RowMatrix<double> q = xb * Wq.middleRows(h * d, d).transpose();
          const RowMatrix<double> k = xb * Wk.middleRows(h * d, d).transpose();
          const RowMatrix<double> v = xb * Wv.middleRows(h * dv, dv).transpose();
          const RowMatrix<double>& a = probs[std::size_t(b * H + h)];
          worst = std::max(worst, max_abs_diff(a, plain_probabilities(q, k)));
          spread = std::max(spread, a.maxCoeff() - a.row(T - 1).minCoeff());
          o.block(b * T, h * dv, T, dv) = a * v;  // o_t = sum_i a_{t,i} v_i (M4)
        }
      }
      CHECK(worst < 1e-12);
      if (T > 2) CHECK(spread > 0.05);  // the rows are not trivially uniform
      // The probabilities are the ones the (tiled) forward uses: A V W_o^T = y.
      SoftmaxAttentionLayerCache<double> cache;
      const RowMatrix<double> y = layer.forward(x, T, cache);
      CHECK(max_abs_diff(o * Wo.transpose(), y) < 1e-12);
    }
  }
}

TEST_CASE("SoftmaxAttentionLayer::attention_probabilities rejects a bad input shape", "[probe]") {
  SoftmaxAttentionLayer<double> layer({5, 2, 3, 2, 1});
  layer.init(1, 0.1);
  CHECK_THROWS_AS(layer.attention_probabilities(RowMatrix<double>::Zero(10, 4), 5), std::invalid_argument);
  CHECK_THROWS_WITH(layer.attention_probabilities(RowMatrix<double>::Zero(10, 5), 3), Contains("T = 3"));
  CHECK_THROWS_AS(layer.attention_probabilities(RowMatrix<double>::Zero(10, 5), 0), std::invalid_argument);
}

TEST_CASE("Model::attention_probabilities of block 0 equals an independent computation from the weights",
          "[probe]") {
  const long n = 3, W = 8, p = 6, T = 19, B = 2, H = 3, d = 4;
  for (bool ln : {false, true}) {
    INFO("layer_norm = " << ln);
    nn::Model<double> model(probe_config(n, W, p, 4, ln));
    model.init(11, 0.5);
    auto params = by_name(model);
    if (ln) {  // move LN's gain and bias off their init values so they matter
      const RowMatrix<double> g = random_matrix<double>(1, W, 5, 0.3), bb = random_matrix<double>(1, W, 6, 0.3);
      for (long j = 0; j < W; ++j) {
        params.at("block0.ln1.gain").value[j] += g(0, j);
        params.at("block0.ln1.bias").value[j] += bb(0, j);
      }
    }
    const RowMatrix<double> x = random_matrix<double>(B * T, n, 21, 1.0);
    const auto probs = model.attention_probabilities(x, T, 0);
    REQUIRE(probs.size() == std::size_t(B * H));
    check_stochastic_causal(probs, T);

    // Independent attention input: [LN?(x W_e^T + b_e), PE] (docs/paper.md §2).
    const RowMatrix<double> We = param(params, "embed.weight", W, n);
    const Vector<double> be = Eigen::Map<const Vector<double>>(params.at("embed.bias").value, W);
    RowMatrix<double> h = x * We.transpose();
    h.rowwise() += be.transpose();
    if (ln) {
      const Vector<double> g = Eigen::Map<const Vector<double>>(params.at("block0.ln1.gain").value, W);
      const Vector<double> bb = Eigen::Map<const Vector<double>>(params.at("block0.ln1.bias").value, W);
      for (long r = 0; r < h.rows(); ++r) {
        const double mu = h.row(r).mean();
        const double var = (h.row(r).array() - mu).square().mean();
        h.row(r) = ((h.row(r).array() - mu) / std::sqrt(var + 1e-5)).matrix();
        h.row(r) = h.row(r).cwiseProduct(g.transpose()) + bb.transpose();
      }
    }
    RowMatrix<double> a_in(B * T, W + p);
    for (long b = 0; b < B; ++b) {
      a_in.block(b * T, 0, T, W) = h.middleRows(b * T, T);
      for (long t = 0; t < T; ++t)
        for (long j = 0; j < p; ++j) {
          const double freq = std::pow(10000.0, -2.0 * double(j / 2) / double(p));
          a_in(b * T + t, W + j) = j % 2 == 0 ? std::sin(double(t) * freq) : std::cos(double(t) * freq);
        }
    }
    const RowMatrix<double> Wq = param(params, "block0.attn.W_q", H * d, W + p);
    const RowMatrix<double> Wk = param(params, "block0.attn.W_k", H * d, W + p);
    double worst = 0;
    for (long b = 0; b < B; ++b)
      for (long hd = 0; hd < H; ++hd) {
        const RowMatrix<double> xb = a_in.middleRows(b * T, T);
        const RowMatrix<double> q = xb * Wq.middleRows(hd * d, d).transpose();
        const RowMatrix<double> k = xb * Wk.middleRows(hd * d, d).transpose();
        worst = std::max(worst, max_abs_diff(probs[std::size_t(b * H + hd)], plain_probabilities(q, k)));
      }
    CHECK(worst < 1e-12);
  }
}

TEST_CASE("Model::attention_probabilities sees exactly forward's attention input (every softmax block)",
          "[probe]") {
  const long n = 3, W = 8, T = 13, B = 3;
  nn::Model<double> model(probe_config(n, W, 6, 4, true));
  model.init(3, 0.4);
  const RowMatrix<double> x = random_matrix<double>(B * T, n, 8, 1.0);
  nn::ModelCache<double> cache;
  const RowMatrix<double> pred = model.forward(x, T, cache);
  // Block 2 follows a mesa block and an MLP-less softmax block: the probe must
  // run both exactly as forward does. Compare against the layer probe applied
  // to the attention input forward cached (bit for bit: the same code path).
  for (long block : {0L, 2L}) {
    INFO("block " << block);
    const auto via_model = model.attention_probabilities(x, T, block);
    const nn::ModelConfig& c = model.config();
    const nn::BlockConfig& bc = c.blocks[std::size_t(block)];
    auto params = by_name(model);
    const std::string pre = "block" + std::to_string(block) + ".attn.";
    SoftmaxAttentionLayer<double> layer({W + bc.positional_dim, bc.heads, bc.key_size, bc.value_size, 1});
    layer.W_q() = param(params, pre + "W_q", bc.heads * bc.key_size, W + bc.positional_dim);
    layer.W_k() = param(params, pre + "W_k", bc.heads * bc.key_size, W + bc.positional_dim);
    const auto via_cache = layer.attention_probabilities(cache.blocks[std::size_t(block)].attn_in, T);
    REQUIRE(via_model.size() == via_cache.size());
    for (std::size_t i = 0; i < via_model.size(); ++i) CHECK(via_model[i] == via_cache[i]);
    check_stochastic_causal(via_model, T);
  }
  // The probe leaves the model alone: forward gives the same predictions after it.
  nn::ModelCache<double> again;
  CHECK(model.forward(x, T, again) == pred);
}

TEST_CASE("Model::attention_probabilities rejects a bad block index, a non-softmax block and bad inputs",
          "[probe]") {
  nn::Model<double> model(probe_config(3, 8, 6, 4, false));
  model.init(1, 0.1);
  const RowMatrix<double> x = random_matrix<double>(2 * 5, 3, 1, 1.0);
  CHECK_THROWS_AS(model.attention_probabilities(x, 5, -1), std::invalid_argument);
  CHECK_THROWS_WITH(model.attention_probabilities(x, 5, -1), Contains("block") && Contains("-1"));
  CHECK_THROWS_WITH(model.attention_probabilities(x, 5, 3), Contains("[0, 3)") && Contains("got 3"));
  CHECK_THROWS_WITH(model.attention_probabilities(x, 5, 1), Contains("block 1") && Contains("mesa"));
  CHECK_THROWS_AS(model.attention_probabilities(x, 4, 0), std::invalid_argument);  // 10 rows, T = 4
  CHECK_THROWS_AS(model.attention_probabilities(RowMatrix<double>::Zero(10, 4), 5, 0), std::invalid_argument);
  CHECK_NOTHROW(model.attention_probabilities(x, 5, 2));
}

}  // namespace mesaopt_test_attention_probe
