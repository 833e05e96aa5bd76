// Tests for the analysis module (mesaopt/analysis.hpp, docs/analysis.md):
// activation capture (bit-identical to the forward's values, outputs
// unchanged), linear probes (a planted linear map is recovered, an unrelated
// target is not), the paper's probe targets (against direct solves), the
// compressed algorithms (a model that already is the algorithm compresses to
// itself; an independent evaluation of M27-M28) and linearisation (a block
// replaced by its own kind at the same weights changes nothing), and bad
// input rejected with std::invalid_argument.
#include <catch2/catch.hpp>

#include <mesaopt/analysis.hpp>
#include <mesaopt/nn.hpp>
#include <mesaopt/tasks.hpp>

#include "test_util.hpp"

#include <cmath>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

// Everything of this file lives in its own namespace, so that test files can be
// compiled together in one translation unit (tests/CMakeLists.txt, unity groups).
namespace mesaopt_test_analysis {

using namespace mesaopt;
using mesaopt::test::random_matrix;
using Catch::Matchers::Contains;

namespace {

using Map = Eigen::Map<RowMatrix<double>>;

// The view `name` of `model` as a writable (rows, cols) matrix.
Map weight(nn::Model<double>& model, const std::string& name, long rows, long cols) {
  const auto params = analysis::parameters_by_name(model);
  const ParameterView<double>& v = params.at(name);
  REQUIRE(v.size == std::size_t(rows * cols));
  return Map(v.value, rows, cols);
}

nn::BlockConfig block(nn::AttentionKind kind, long heads, long key, long value) {
  nn::BlockConfig b;
  b.attention = kind;
  b.heads = heads;
  b.key_size = key;
  b.value_size = value;
  return b;
}

// Constructed tokens [0, s_t, s_t, s_{t-1}] of state size n: no embedding,
// read-out from slot 0, `layers` linear blocks.
nn::ModelConfig constructed_config(long n, long layers, long heads, long key, long value, double clip) {
  nn::ModelConfig c;
  c.input_dim = c.width = 4 * n;
  c.output_dim = n;
  c.embed = false;
  c.readout_slice = true;
  c.clip = clip;
  c.blocks.assign(std::size_t(layers), block(nn::AttentionKind::linear, heads, key, value));
  c.num_threads = 1;
  return c;
}

// embed -> softmax (positions, LN) -> mesa (LN, MLP, learned forget) -> linear -> Dense read-out, clip.
nn::ModelConfig hybrid_config() {
  nn::ModelConfig c;
  c.input_dim = 3;
  c.width = 6;
  c.output_dim = 2;
  c.clip = 50.0;
  nn::BlockConfig s = block(nn::AttentionKind::softmax, 2, 3, 2);
  s.positional_dim = 4;
  s.layer_norm = true;
  nn::BlockConfig m = block(nn::AttentionKind::mesa, 2, 3, 3);
  m.layer_norm = true;
  m.mlp = true;
  m.mlp_hidden = 5;
  m.learn_forget = true;
  m.forget_init = 0.9;
  m.lambda_init = 0.7;
  nn::BlockConfig l = block(nn::AttentionKind::linear, 2, 3, 2);
  c.blocks = {s, m, l};
  c.num_threads = 2;
  return c;
}

RowMatrix<double> forward(nn::Model<double>& model, const RowMatrix<double>& x, long T) {
  nn::ModelCache<double> cache;
  return model.forward(x, T, cache);
}

// Dynamics batch and its constructed tokens.
struct Dyn {
  tasks::DynamicsBatch<double> batch;
  RowMatrix<double> tokens;
};
Dyn dynamics(long n, long T, long B, std::uint64_t seed) {
  tasks::DynamicsConfig dc;
  dc.state_dim = n;
  dc.seq_len = T;
  Dyn d;
  d.batch = tasks::make_dynamics_batch<double>(dc, B, seed, 0, 1);
  d.tokens = tasks::constructed_tokens(d.batch);
  return d;
}

}  // namespace

// ---------------------------------------------------------------- capture

TEST_CASE("capture_activations: outputs unchanged and every captured value bit-identical to the forward's",
          "[analysis][capture]") {
  const long T = 9, B = 3;
  nn::Model<double> model(hybrid_config());
  model.init(5, 0.4);
  const RowMatrix<double> x = random_matrix<double>(B * T, 3, 17, 1.0);
  nn::ModelCache<double> cache;
  const RowMatrix<double> before = model.forward(x, T, cache);
  const analysis::Activations<double> a = analysis::capture_activations(model, x, T);
  CHECK(a.batch == B);
  CHECK(a.seq_len == T);
  CHECK(a.predictions == before);
  CHECK(forward(model, x, T) == before);  // the model is left as it was
  REQUIRE(a.stream.size() == 4);
  REQUIRE(a.attention_input.size() == 3);
  REQUIRE(a.attention_output.size() == 3);
  for (std::size_t l = 0; l < 3; ++l) {
    INFO("block " << l);
    CHECK(a.attention_input[l] == cache.blocks[l].attn_in);
    CHECK(a.attention_output[l].rows() == B * T);
    CHECK(a.attention_output[l].cols() == cache.blocks[l].attn_in.cols());
  }
  // Block 2 has no LN: its attention input starts with the stream after block 1, bit for bit.
  CHECK(a.stream[2] == cache.blocks[2].attn_in.leftCols(6));
  // Block 2 has no MLP: h_3 = clip(h_2 + y_2[:, :W], 50) exactly (the clip is active).
  const RowMatrix<double> h3 = a.stream[2] + a.attention_output[2].leftCols(6);
  CHECK(h3.cwiseAbs().maxCoeff() > 50.0);
  CHECK(a.stream[3] == h3.cwiseMax(-50.0).cwiseMin(50.0));
  // The Dense read-out of the last stream gives the predictions.
  const RowMatrix<double> Wr = weight(model, "readout.weight", 2, 6);
  const Map br = weight(model, "readout.bias", 1, 2);
  RowMatrix<double> pred = a.stream[3] * Wr.transpose();
  pred.rowwise() += br.row(0);
  CHECK((pred - before).cwiseAbs().maxCoeff() < 1e-12);
  // h_0 is the embedding x W_e^T + b_e.
  RowMatrix<double> h0 = x * RowMatrix<double>(weight(model, "embed.weight", 6, 3)).transpose();
  h0.rowwise() += weight(model, "embed.bias", 1, 6).row(0);
  CHECK((h0 - a.stream[0]).cwiseAbs().maxCoeff() < 1e-12);
  // Without attention outputs.
  analysis::CaptureOptions o;
  o.attention_output = false;
  const analysis::Activations<double> b = analysis::capture_activations(model, x, T, o);
  CHECK(b.attention_output.empty());
  CHECK(b.stream == a.stream);
}

TEST_CASE("capture_activations: constructed tokens with clip, the last stream is the read-out slice bit for bit",
          "[analysis][capture]") {
  const long n = 3, T = 11, B = 2;
  nn::Model<double> model(constructed_config(n, 3, 2, 4, 3, 1.5));
  model.init(9, 0.6);  // large enough that the clip at 1.5 is active
  const Dyn d = dynamics(n, T, B, 4);
  const RowMatrix<double> pred = forward(model, d.tokens, T);
  const analysis::Activations<double> a = analysis::capture_activations(model, d.tokens, T);
  CHECK(a.predictions == pred);
  CHECK(a.stream[0] == d.tokens);
  CHECK(RowMatrix<double>(a.stream[3].leftCols(n)) == pred);
  bool clipped = false;
  for (std::size_t l = 0; l < 3; ++l) {
    CHECK(a.stream[l] == a.attention_input[l]);  // no LN, no positions
    const RowMatrix<double> mid = a.stream[l] + a.attention_output[l];
    CHECK(a.stream[l + 1] == mid.cwiseMax(-1.5).cwiseMin(1.5));
    clipped = clipped || mid.cwiseAbs().maxCoeff() > 1.5;
  }
  CHECK(clipped);
}

// ----------------------------------------------------------------- probes

TEST_CASE("Linear probe recovers a planted linear map (R^2 ~ 1) and scores ~0 on an unrelated target",
          "[analysis][probe]") {
  const long D = 6, k = 3;
  const RowMatrix<double> M = random_matrix<double>(D, k, 1, 1.0);
  const RowMatrix<double> c = random_matrix<double>(1, k, 2, 4.0);
  const RowMatrix<double> xf = random_matrix<double>(400, D, 3, 1.0), xe = random_matrix<double>(2000, D, 4, 1.0);
  RowMatrix<double> yf = xf * M, ye = xe * M;
  yf.rowwise() += c.row(0);
  ye.rowwise() += c.row(0);
  for (double ridge : {0.0, 1e-6}) {
    INFO("ridge " << ridge);
    analysis::ProbeOptions o;
    o.ridge = ridge;
    const analysis::LinearProbe p = analysis::fit_linear_probe(xf, yf, o);
    CHECK((p.weight - M).cwiseAbs().maxCoeff() < 1e-6);
    CHECK((p.bias.transpose() - c).cwiseAbs().maxCoeff() < 1e-6);
    const analysis::ProbeScore s = analysis::probe(xf, yf, xe, ye, o);
    CHECK(s.r2 > 1 - 1e-10);
    CHECK(s.mse < 1e-10);
  }
  // Without an intercept the offset c cannot be represented.
  analysis::ProbeOptions no_bias;
  no_bias.intercept = false;
  CHECK(analysis::probe(xf, yf, xe, ye, no_bias).r2 < 0.9);
  // An independent target: R^2 ~ 0 (slightly negative out of sample), MSE ~ its variance.
  const RowMatrix<double> zf = random_matrix<double>(400, k, 5, 1.0), ze = random_matrix<double>(2000, k, 6, 1.0);
  const analysis::ProbeScore u = analysis::probe(xf, zf, xe, ze);
  CHECK(std::abs(u.r2) < 0.05);
  CHECK(std::abs(u.mse - 1.0) < 0.15);
}

TEST_CASE("Per-position probes recover a position-dependent map that a pooled probe cannot", "[analysis][probe]") {
  const long T = 4, D = 3, Bf = 60, Be = 80;
  RowMatrix<double> xf = random_matrix<double>(Bf * T, D, 7, 1.0), xe = random_matrix<double>(Be * T, D, 8, 1.0);
  RowMatrix<double> yf(Bf * T, 1), ye(Be * T, 1);
  for (long r = 0; r < Bf * T; ++r) yf(r, 0) = xf(r, r % T % D) * (1.0 + double(r % T));
  for (long r = 0; r < Be * T; ++r) ye(r, 0) = xe(r, r % T % D) * (1.0 + double(r % T));
  const auto per = analysis::probe_per_position(xf, yf, xe, ye, T);
  REQUIRE(per.size() == std::size_t(T));
  for (const analysis::ProbeScore& s : per) CHECK(s.r2 > 1 - 1e-8);
  CHECK(analysis::probe(xf, yf, xe, ye).r2 < 0.7);
}

TEST_CASE("Probe targets: s_{t-1} and the preconditioned input against direct solves", "[analysis][probe]") {
  const long n = 3, T = 6, B = 2;
  const Dyn d = dynamics(n, T, B, 12);
  const double rho = 0.3;
  const analysis::DynamicsProbeTargets<double> g = analysis::dynamics_probe_targets(d.batch, rho);
  CHECK(g.current == d.batch.inputs);
  CHECK(g.next == d.batch.targets);
  for (long b = 0; b < B; ++b)
    for (long t = 0; t < T; ++t) {
      const long r = b * T + t;
      if (t == 0)
        CHECK(g.previous.row(r).isZero(0));
      else
        CHECK(g.previous.row(r) == d.batch.inputs.row(r - 1));
      // S_t = [s_1; ...; s_{t-1}] (t-1 rows), (S^T S + rho I)^-1 s_t.
      RowMatrix<double> S = d.batch.inputs.middleRows(b * T, t);
      const RowMatrix<double> A = S.transpose() * S + rho * RowMatrix<double>::Identity(n, n);
      const Vector<double> want = A.inverse() * d.batch.inputs.row(r).transpose();
      CHECK((g.preconditioned.row(r).transpose() - want).cwiseAbs().maxCoeff() < 1e-10);
    }
}

TEST_CASE("Probing captured activations: the tokens hold s_{t-1} exactly, a noise target is not decodable",
          "[analysis][probe]") {
  const long n = 3, T = 8;
  nn::Model<double> model(constructed_config(n, 2, 2, 4, 4, 0.0));
  model.init(3, 0.3);
  const Dyn fit = dynamics(n, T, 40, 100), eval = dynamics(n, T, 40, 200);
  const auto af = analysis::capture_activations(model, fit.tokens, T);
  const auto ae = analysis::capture_activations(model, eval.tokens, T);
  const auto gf = analysis::dynamics_probe_targets(fit.batch, 1e-3);
  const auto ge = analysis::dynamics_probe_targets(eval.batch, 1e-3);
  const auto scores = analysis::probe_layers(af.stream, gf.previous, ae.stream, ge.previous);
  REQUIRE(scores.size() == 3);
  CHECK(scores[0].r2 > 1 - 1e-9);  // slot 3 of e_t is s_{t-1}
  const RowMatrix<double> nf = random_matrix<double>(40 * T, n, 1, 1.0), ne = random_matrix<double>(40 * T, n, 2, 1.0);
  CHECK(analysis::probe(af.stream[0], nf, ae.stream[0], ne).r2 < 0.1);
}

// ------------------------------------------------------ compressed models

TEST_CASE("A model that already is CompressedAlg (scaled-identity blocks) compresses to itself: identical loss",
          "[analysis][compress]") {
  const long n = 4, D = 4 * n, H = 2, T = 10, B = 3;
  nn::Model<double> model(constructed_config(n, 2, H, D, D, 4.0));
  model.init(1, 0.0);
  std::vector<std::vector<RowMatrix<double>>> alpha(2), beta(2);
  for (long l = 0; l < 2; ++l) {
    const std::string p = "block" + std::to_string(l) + ".attn.";
    auto Wq = weight(model, p + "W_q", H * D, D), Wk = weight(model, p + "W_k", H * D, D);
    auto Wv = weight(model, p + "W_v", H * D, D), Wo = weight(model, p + "W_o", D, H * D);
    for (long h = 0; h < H; ++h) {
      // Coefficients on a 1/16 grid: the trace means are exact in binary.
      RowMatrix<double> a = (random_matrix<double>(4, 4, 10 + std::uint64_t(l * H + h), 2.0)).array().round() / 16.0;
      RowMatrix<double> bb = (random_matrix<double>(4, 4, 20 + std::uint64_t(l * H + h), 2.0)).array().round() / 16.0;
      alpha[std::size_t(l)].push_back(a);
      beta[std::size_t(l)].push_back(bb);
      for (long i = 0; i < 4; ++i)
        for (long j = 0; j < 4; ++j)
          for (long e = 0; e < n; ++e) {
            Wq(h * D + i * n + e, j * n + e) = a(i, j);
            Wv(h * D + i * n + e, j * n + e) = bb(i, j);
          }
      Wk.middleRows(h * D, D).setIdentity();
      Wo.middleCols(h * D, D).setIdentity();
    }
  }
  const auto heads = analysis::compress_attention(model, analysis::compressed_alg_options(n));
  REQUIRE(heads.size() == 2);
  for (std::size_t l = 0; l < 2; ++l) {
    REQUIRE(heads[l].size() == std::size_t(H));
    for (std::size_t h = 0; h < std::size_t(H); ++h) {
      CHECK(heads[l][h].kq == alpha[l][h]);
      CHECK(heads[l][h].pv == beta[l][h]);
    }
  }
  CHECK(analysis::compressed_scalar_count(model, analysis::compressed_alg_options(n)) == 2 * H * 32);
  auto compressed = analysis::compressed_model(model, analysis::compressed_alg_options(n));
  const Dyn d = dynamics(n, T, B, 7);
  CHECK(forward(*compressed, d.tokens, T) == forward(model, d.tokens, T));
  const auto a = analysis::model_loss_curve(model, d.tokens, d.batch.targets, T);
  const auto c = analysis::model_loss_curve(*compressed, d.tokens, d.batch.targets, T);
  CHECK(a == c);
  CHECK(analysis::loss_ratio(*compressed, model, d.tokens, d.batch.targets, T) == 1.0);
}

TEST_CASE("Proposition 1 compression of a 1-layer GD-like model: 12 scalars, same loss", "[analysis][compress]") {
  // Two heads with key/value size n < D whose products are scaled identities in
  // the Proposition 1 blocks: head 0 is a GD step (key s_{t-1}, query s_t,
  // value s_t), head 1 a key s_t / query s_t / value s_{t-1} term.
  const long n = 3, T = 12, B = 4;
  nn::Model<double> model(constructed_config(n, 1, 2, n, n, 0.0));
  model.init(1, 0.0);
  auto Wq = weight(model, "block0.attn.W_q", 2 * n, 4 * n), Wk = weight(model, "block0.attn.W_k", 2 * n, 4 * n);
  auto Wv = weight(model, "block0.attn.W_v", 2 * n, 4 * n), Wo = weight(model, "block0.attn.W_o", 4 * n, 2 * n);
  const RowMatrix<double> I = RowMatrix<double>::Identity(n, n);
  Wk.block(0, 3 * n, n, n) = 0.5 * I;  // key s_{t-1}
  Wq.block(0, 2 * n, n, n) = 0.06 * I;  // query s_t
  Wv.block(0, 2 * n, n, n) = I;         // value s_t
  Wo.block(0, 0, n, n) = I;             // into slot 0
  Wk.block(n, 2 * n, n, n) = I;
  Wq.block(n, 2 * n, n, n) = -0.01 * I;
  Wv.block(n, 3 * n, n, n) = I;
  Wo.block(0, n, n, n) = 2.0 * I;
  const analysis::CompressionOptions o = analysis::proposition1_options(n);
  CHECK(analysis::compressed_scalar_count(model, o) == 12);
  const auto heads = analysis::compress_attention(model, o);
  CHECK(heads[0][0].kq(3, 2) == Approx(0.03).epsilon(1e-14));
  CHECK(heads[0][0].pv(0, 2) == 1.0);
  CHECK(heads[0][1].kq(2, 2) == Approx(-0.01).epsilon(1e-14));
  CHECK(heads[0][1].pv(0, 3) == 2.0);
  auto compressed = analysis::compressed_model(model, o);
  CHECK(compressed->config().blocks[0].key_size == 4 * n);
  const Dyn d = dynamics(n, T, B, 3);
  const auto a = analysis::model_loss_curve(model, d.tokens, d.batch.targets, T);
  const auto c = analysis::model_loss_curve(*compressed, d.tokens, d.batch.targets, T);
  for (long t = 0; t < T; ++t) CHECK(std::abs(a[std::size_t(t)] - c[std::size_t(t)]) < 1e-12 * a[std::size_t(t)]);
}

TEST_CASE("Compressed model of a random linear model equals an independent evaluation of M27-M28",
          "[analysis][compress]") {
  const long n = 2, D = 4 * n, H = 2, d = 3, dv = 5, T = 7, B = 2;
  nn::Model<double> model(constructed_config(n, 1, H, d, dv, 0.0));
  model.init(21, 0.5);
  const Dyn data = dynamics(n, T, B, 9);
  const RowMatrix<double> Wq = weight(model, "block0.attn.W_q", H * d, D), Wk = weight(model, "block0.attn.W_k", H * d, D);
  const RowMatrix<double> Wv = weight(model, "block0.attn.W_v", H * dv, D), Wo = weight(model, "block0.attn.W_o", D, H * dv);
  for (bool prop1 : {false, true}) {
    INFO("proposition 1 masks: " << prop1);
    const analysis::CompressionOptions o = prop1 ? analysis::proposition1_options(n) : analysis::compressed_alg_options(n);
    // Independent: per head the block means of Wk^T Wq and Wo Wv, written out.
    std::vector<RowMatrix<double>> KQ, PV;
    for (long h = 0; h < H; ++h) {
      RowMatrix<double> kq = RowMatrix<double>::Zero(D, D), pv = RowMatrix<double>::Zero(D, D);
      for (long a = 0; a < 4; ++a)
        for (long c = 0; c < 4; ++c) {
          double sk = 0, sv = 0;
          for (long e = 0; e < n; ++e) {
            for (long j = 0; j < d; ++j) sk += Wk(h * d + j, a * n + e) * Wq(h * d + j, c * n + e);
            for (long j = 0; j < dv; ++j) sv += Wo(a * n + e, h * dv + j) * Wv(h * dv + j, c * n + e);
          }
          const bool keep_k = !prop1 || (a >= 2 && c >= 2), keep_v = !prop1 || (a == 0 && c >= 2);
          for (long e = 0; e < n; ++e) {
            kq(a * n + e, c * n + e) = keep_k ? sk / double(n) : 0.0;
            pv(a * n + e, c * n + e) = keep_v ? sv / double(n) : 0.0;
          }
        }
      KQ.push_back(kq);
      PV.push_back(pv);
    }
    RowMatrix<double> want(B * T, n);
    for (long b = 0; b < B; ++b)
      for (long t = 0; t < T; ++t) {
        const Vector<double> et = data.tokens.row(b * T + t).transpose();
        Vector<double> out = et;
        for (long h = 0; h < H; ++h)
          for (long i = 0; i <= t; ++i) {
            const Vector<double> ei = data.tokens.row(b * T + i).transpose();
            out += PV[std::size_t(h)] * ei * ei.dot(KQ[std::size_t(h)] * et);
          }
        want.row(b * T + t) = out.head(n).transpose();
      }
    auto compressed = analysis::compressed_model(model, o);
    const RowMatrix<double> got = forward(*compressed, data.tokens, T);
    CHECK((got - want).cwiseAbs().maxCoeff() < 1e-12);
    CHECK((got - forward(model, data.tokens, T)).cwiseAbs().maxCoeff() > 1e-3);  // a real reduction
  }
}

// ----------------------------------------------------------- linearisation

TEST_CASE("Replacing a block by its own kind at the same weights changes nothing, softmax -> linear keeps the "
          "shared parameters",
          "[analysis][linearize]") {
  const long T = 8, B = 2;
  nn::Model<double> model(hybrid_config());
  model.init(13, 0.4);
  const RowMatrix<double> x = random_matrix<double>(B * T, 3, 31, 1.0);
  const RowMatrix<double> pred = forward(model, x, T);
  const nn::AttentionKind kinds[] = {nn::AttentionKind::softmax, nn::AttentionKind::mesa, nn::AttentionKind::linear};
  for (long l = 0; l < 3; ++l) {
    INFO("block " << l);
    auto same = analysis::replace_attention_kind(model, l, kinds[l]);
    CHECK(forward(*same, x, T) == pred);
    CHECK(analysis::loss_ratio(*same, model, x, RowMatrix<double>::Zero(B * T, 2), T) == 1.0);
  }
  auto lin = analysis::linearize_block(model, 0);
  CHECK(lin->config().blocks[0].attention == nn::AttentionKind::linear);
  const auto src = analysis::parameters_by_name(model);
  std::size_t compared = 0;
  for (const ParameterView<double>& v : lin->parameters()) {
    const ParameterView<double>& w = src.at(v.name);  // every parameter is shared here
    REQUIRE(w.size == v.size);
    for (std::size_t i = 0; i < v.size; ++i) CHECK(v.value[i] == w.value[i]);
    ++compared;
  }
  CHECK(compared == model.parameters().size());
  CHECK((forward(*lin, x, T) - pred).cwiseAbs().maxCoeff() > 1e-6);  // the kind did change
  // linear -> mesa: the projections are kept, lambda starts at lambda_init.
  auto mesa = analysis::replace_attention_kind(model, 2, nn::AttentionKind::mesa);
  const auto mp = analysis::parameters_by_name(*mesa);
  CHECK(mp.count("block2.attn.lambda_raw") == 1);
  CHECK(Map(mp.at("block2.attn.W_q").value, 6, 6) == Map(src.at("block2.attn.W_q").value, 6, 6));
}

TEST_CASE("block_parameter_mask selects exactly one block's parameters", "[analysis][linearize]") {
  nn::ModelConfig c = hybrid_config();
  c.blocks.resize(12, c.blocks[2]);  // blocks 1 and 10, 11: "block1." must not match "block10."
  nn::Model<double> model(c);
  const auto views = model.parameters();
  for (bool attn_only : {false, true}) {
    const std::vector<bool> mask = analysis::block_parameter_mask(model, 1, attn_only);
    REQUIRE(mask.size() == views.size());
    const auto chosen = analysis::select_parameters(views, mask);
    CHECK(!chosen.empty());
    for (const ParameterView<double>& v : chosen)
      CHECK(v.name.rfind(attn_only ? "block1.attn." : "block1.", 0) == 0);
    std::size_t expected = 0;
    for (const ParameterView<double>& v : views)
      expected += v.name.rfind(attn_only ? "block1.attn." : "block1.", 0) == 0 ? 1 : 0;
    CHECK(chosen.size() == expected);
  }
  CHECK(analysis::select_parameters(views, analysis::block_parameter_mask(model, 1)).size() == 14);  // LN1 (2), W_q/k/v/o, lambda, forget, LN2 (2), MLP (4)
}

// ------------------------------------------------------------- bad input

TEST_CASE("Analysis tools reject bad input with std::invalid_argument naming it", "[analysis][errors]") {
  const RowMatrix<double> x = random_matrix<double>(20, 3, 1, 1.0), y = random_matrix<double>(20, 2, 2, 1.0);
  analysis::ProbeOptions bad;
  bad.ridge = -1;
  CHECK_THROWS_WITH(analysis::fit_linear_probe(x, y, bad), Contains("ridge") && Contains("-1"));
  bad.ridge = std::nan("");
  CHECK_THROWS_AS(analysis::fit_linear_probe(x, y, bad), std::invalid_argument);
  CHECK_THROWS_WITH(analysis::fit_linear_probe(x, RowMatrix<double>(19, 2)), Contains("19") && Contains("20"));
  const analysis::LinearProbe p = analysis::fit_linear_probe(x, y);
  CHECK_THROWS_AS(analysis::score_linear_probe(p, RowMatrix<double>(20, 4), y), std::invalid_argument);
  CHECK_THROWS_AS(analysis::score_linear_probe(p, x, RowMatrix<double>(20, 3)), std::invalid_argument);
  CHECK_THROWS_AS(analysis::probe(x, y, RowMatrix<double>(5, 4), RowMatrix<double>(5, 2)), std::invalid_argument);
  CHECK_THROWS_WITH(analysis::probe_per_position(x, y, x, y, 3), Contains("seq_len = 3"));
  CHECK_THROWS_AS(analysis::probe_per_position(x, y, x, y, 0), std::invalid_argument);
  CHECK_THROWS_AS(analysis::probe_layers(std::vector<RowMatrix<double>>{x}, y, std::vector<RowMatrix<double>>{}, y),
                  std::invalid_argument);
  CHECK_THROWS_WITH(analysis::preconditioned_inputs<double>(x, 5, 0.0), Contains("rho"));
  CHECK_THROWS_AS(analysis::previous_states<double>(x, 3), std::invalid_argument);

  nn::Model<double> model(hybrid_config());
  model.init(1, 0.1);
  CHECK_THROWS_AS(analysis::capture_activations(model, x, 3), std::invalid_argument);  // 20 rows, T = 3
  CHECK_THROWS_AS(analysis::capture_activations(model, RowMatrix<double>(20, 4), 5), std::invalid_argument);
  // Compression: block 0 is softmax, block 1 mesa, block 2 linear of width 6.
  CHECK_THROWS_WITH(analysis::head_products(model, 0), Contains("softmax"));
  CHECK_THROWS_WITH(analysis::head_products(model, 3), Contains("[0, 3)"));
  CHECK_THROWS_WITH(analysis::compressed_model(model, analysis::compressed_alg_options(4)),
                    Contains("block_size (4)") && Contains("D = 6"));
  CHECK_THROWS_AS(analysis::compressed_model(model, analysis::compressed_alg_options(0)), std::invalid_argument);
  CHECK_THROWS_WITH(analysis::compressed_model(model, analysis::proposition1_options(3)), Contains("kq_mask is 4 x 4"));
  CHECK_NOTHROW(analysis::compressed_model(model, analysis::compressed_alg_options(3)));
  nn::ModelConfig sc = hybrid_config();
  sc.blocks = {sc.blocks[0]};
  nn::Model<double> softmax_only(sc);
  CHECK_THROWS_WITH(analysis::compress_attention(softmax_only, analysis::compressed_alg_options(2)),
                    Contains("no linear-attention block"));
  nn::ModelConfig nc = constructed_config(2, 1, 1, 2, 2, 0.0);
  nc.blocks[0].normalize_qk = true;
  nn::Model<double> normalized(nc);
  CHECK_THROWS_WITH(analysis::compress_attention(normalized, analysis::compressed_alg_options(2)), Contains("normalises"));
  // Linearisation.
  CHECK_THROWS_WITH(analysis::linearize_block(model, 3), Contains("[0, 3)") && Contains("got 3"));
  CHECK_THROWS_AS(analysis::replace_attention_kind(model, -1, nn::AttentionKind::linear), std::invalid_argument);
  nn::BlockConfig wider = hybrid_config().blocks[2];
  wider.key_size = 4;  // W_q and W_k change shape
  CHECK_THROWS_WITH(analysis::replace_block(model, 2, wider), Contains("W_q"));
  nn::BlockConfig invalid = wider;
  invalid.heads = 0;
  CHECK_THROWS_AS(analysis::replace_block(model, 2, invalid), std::invalid_argument);
  CHECK_THROWS_AS(analysis::block_parameter_mask(model, 5), std::invalid_argument);
  CHECK_THROWS_WITH(analysis::select_parameters(model.parameters(), std::vector<bool>(3, true)),
                    Contains("3 entries"));
}

}  // namespace mesaopt_test_analysis
