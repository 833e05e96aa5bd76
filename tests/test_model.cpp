// Tests for nn::Model (config-assembled residual attention stacks) and
// train::Trainer: whole-model gradients against central finite differences
// for every parameter and the input, exact training resume, loss reduction
// on a tiny linear-dynamics task, thread-count invariance and config errors.
#include <catch2/catch.hpp>

#include <mesaopt/nn.hpp>
#include <mesaopt/tasks.hpp>
#include <mesaopt/train.hpp>

#include "gradcheck.hpp"
#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include <unistd.h>

// Everything of this file lives in its own namespace, so that test files can be
// compiled together in one translation unit (tests/CMakeLists.txt, unity groups).
namespace mesaopt_test_model {

using namespace mesaopt;
using mesaopt::test::random_matrix;

namespace {

// (a) constructed-token style: no embed, readout slice, 2 linear blocks, clip.
nn::ModelConfig constructed_config(long n, double clip) {
  nn::ModelConfig c;
  c.input_dim = c.width = 4 * n;
  c.output_dim = n;
  c.embed = false;
  c.readout_slice = true;
  c.clip = clip;
  nn::BlockConfig b;
  b.attention = nn::AttentionKind::linear;
  b.heads = 2;
  b.key_size = 3;
  b.value_size = 2;
  c.blocks = {b, b};
  return c;
}

// (b) embed + softmax block with positions + mesa block with LN and MLP + Dense readout.
nn::ModelConfig hybrid_config() {
  nn::ModelConfig c;
  c.input_dim = 3;
  c.width = 5;
  c.output_dim = 2;
  nn::BlockConfig s;
  s.attention = nn::AttentionKind::softmax;
  s.heads = 2;
  s.key_size = 3;
  s.value_size = 2;
  s.positional_dim = 4;
  nn::BlockConfig m;
  m.attention = nn::AttentionKind::mesa;
  m.heads = 2;
  m.key_size = 3;
  m.value_size = 3;
  m.layer_norm = true;
  m.mlp = true;
  m.mlp_hidden = 6;
  m.lambda_init = 0.7;
  m.learn_forget = true;
  m.forget_init = 0.9;
  c.blocks = {s, m};
  return c;
}

// Checks dL/dtheta for every parameter view and dL/dx, L = MSE(model(x), y).
void check_model_gradients(nn::Model<double>& model, const RowMatrix<double>& x, const RowMatrix<double>& y,
                           long T) {
  auto params = model.parameters();
  nn::ModelCache<double> cache;
  auto loss = [&]() {
    nn::ModelCache<double> c;
    const RowMatrix<double> p = model.forward(x, T, c);
    return train::mse_loss_forward<double>(p, y, T).loss;
  };
  zero_grad(params);
  const RowMatrix<double> pred = model.forward(x, T, cache);
  RowMatrix<double> dpred(pred.rows(), pred.cols());
  train::mse_loss_backward<double>(pred, y, T, dpred);
  RowMatrix<double> dx(x.rows(), x.cols());
  model.backward(dpred, cache, dx);
  for (auto& p : params) {
    const std::vector<double> analytic(p.grad, p.grad + p.size);
    const auto r = test::check_gradient(loss, p.value, analytic.data(), p.size);
    INFO(r.describe(p.name));
    CHECK(r.error < 1e-6);
  }
  RowMatrix<double> xv = x;
  auto loss_x = [&]() {
    nn::ModelCache<double> c;
    const RowMatrix<double> p = model.forward(xv, T, c);
    return train::mse_loss_forward<double>(p, y, T).loss;
  };
  const auto r = test::check_gradient(loss_x, xv, dx);
  INFO(r.describe("dx"));
  CHECK(r.error < 1e-6);
}

std::string scratch_path(const char* name) {
  return "/tmp/mesaopt_test_model_" + std::to_string(::getpid()) + "_" + name + ".safetensors";
}

// The constructed-token linear-dynamics source: step s draws sequences
// [s*B, (s+1)*B) of the stream keyed by seed.
template <class T>
train::BatchSource<T> dynamics_source(long n, long T_len, long B, std::uint64_t seed) {
  tasks::DynamicsConfig dc;
  dc.state_dim = n;
  dc.seq_len = T_len;
  return [dc, B, seed](long step) {
    const auto batch = tasks::make_dynamics_batch<T>(dc, B, seed, step * B, 1);
    train::TrainBatch<T> tb;
    tb.inputs = tasks::constructed_tokens<T>(batch);
    tb.targets = batch.targets;
    tb.seq_len = batch.seq_len;
    return tb;
  };
}

nn::ModelConfig one_layer_config(long n, nn::AttentionKind kind) {
  nn::ModelConfig c;
  c.input_dim = c.width = 4 * n;
  c.output_dim = n;
  c.embed = false;
  c.readout_slice = true;
  nn::BlockConfig b;
  b.attention = kind;
  b.heads = 1;
  b.key_size = 4 * n;
  b.value_size = 4 * n;
  c.blocks = {b};
  return c;
}

train::TrainerConfig trainer_config(long steps, double lr) {
  train::TrainerConfig tc;
  tc.steps = steps;
  tc.adam = train::adamw_config(0.0);
  tc.schedule = train::constant_schedule(lr);
  tc.clip_norm = 1.0;
  tc.progress = false;
  return tc;
}

std::vector<double> flatten(const std::vector<ParameterView<double>>& params) {
  std::vector<double> out;
  for (const auto& p : params) out.insert(out.end(), p.value, p.value + p.size);
  return out;
}

// N steps of the training loop written out by hand: forward, MSE backward,
// `between(params)` on the gradients (clipping), then Adam with `decay_mask`
// at lr tc.schedule(s); what the Trainer must equal bit for bit.
void train_by_hand(nn::Model<double>& model, const train::BatchSource<double>& source, long N,
                   const train::TrainerConfig& tc, const std::vector<bool>& decay_mask,
                   const std::function<void(const std::vector<ParameterView<double>>&)>& between) {
  const auto params = model.parameters();
  train::Adam<double> adam(params, tc.adam, decay_mask);
  nn::Model<double>::Cache cache;
  for (long s = 0; s < N; ++s) {
    const auto batch = source(s);
    zero_grad(params);
    const RowMatrix<double> pred = model.forward(batch.inputs, batch.seq_len, cache);
    RowMatrix<double> dpred(pred.rows(), pred.cols());
    train::mse_loss_backward<double>(pred, batch.targets, batch.seq_len, dpred);
    model.backward(dpred, cache);
    between(params);
    adam.step(tc.schedule(s));
  }
}

}  // namespace

TEST_CASE("Model gradient: constructed tokens, 2 linear blocks with clip, readout slice", "[model][grad]") {
  const long n = 2, T = 5, B = 2;
  const double clip = 0.6;
  nn::Model<double> model(constructed_config(n, clip));
  model.init(11, 0.4);
  const RowMatrix<double> x = random_matrix<double>(B * T, 4 * n, 3, 0.5);
  const RowMatrix<double> y = random_matrix<double>(B * T, n, 4, 1.0);
  // The clip must be active somewhere (so its path is tested) and no stream
  // value may sit within the finite-difference reach of the boundary.
  nn::ModelCache<double> cache;
  model.forward(x, T, cache);
  long clipped = 0;
  double margin = 1e9;
  for (const auto& bc : cache.blocks) {
    REQUIRE(bc.pre_clip.size() > 0);
    for (long i = 0; i < bc.pre_clip.size(); ++i) {
      const double v = std::abs(bc.pre_clip.data()[i]);
      clipped += v > clip;
      margin = std::min(margin, std::abs(v - clip));
    }
  }
  INFO("clipped " << clipped << ", margin " << margin);
  REQUIRE(clipped > 0);
  REQUIRE(margin > 1e-3);
  check_model_gradients(model, x, y, T);
}

TEST_CASE("Model gradient: embed + softmax(positional) + mesa(LN, MLP, learned forget) + Dense readout",
          "[model][grad]") {
  const long T = 4, B = 2;
  nn::Model<double> model(hybrid_config());
  model.init(5, 0.3);
  const RowMatrix<double> x = random_matrix<double>(B * T, 3, 7, 1.0);
  const RowMatrix<double> y = random_matrix<double>(B * T, 2, 8, 1.0);
  auto params = model.parameters();
  std::vector<std::string> names;
  for (const auto& p : params) names.push_back(p.name);
  CHECK(names.front() == "embed.weight");
  CHECK(std::find(names.begin(), names.end(), "block0.attn.W_q") != names.end());
  CHECK(std::find(names.begin(), names.end(), "block1.ln1.gain") != names.end());
  CHECK(std::find(names.begin(), names.end(), "block1.attn.lambda_raw") != names.end());
  CHECK(std::find(names.begin(), names.end(), "block1.mlp.fc1.weight") != names.end());
  CHECK(names.back() == "readout.bias");
  // The positional block's layer is width + p wide.
  for (const auto& p : params)
    if (p.name == "block0.attn.W_q") CHECK(p.shape == std::vector<long>{6, 9});
  check_model_gradients(model, x, y, T);
}

// Prompt tuning (examples/fewshot_prompting.cpp, docs/tasks.md "Prompted
// regression"): the gradient of the label loss of a frozen model with respect
// to the learned EOS token and prefix, through Model::backward's dx and the
// prompt adjoints, against central differences.
TEST_CASE("Prompt tuning gradient: learned EOS and prefix tokens through a frozen model", "[model][grad]") {
  nn::ModelConfig mc = hybrid_config();
  mc.output_dim = mc.input_dim;  // the prompt's tokens and the predictions share the token space
  nn::Model<double> model(mc);
  model.init(11, 0.3);
  tasks::PromptedRegressionConfig pc;
  pc.state_dim = 3;
  pc.pairs = 3;
  const long B = 2;
  const auto batch = tasks::make_prompted_regression_batch<double>(pc, B, 4);
  const tasks::PromptLayout layout{3, true, 2};
  Vector<double> eos = random_matrix<double>(3, 1, 12, 1.0);
  RowMatrix<double> prefix = random_matrix<double>(2, 3, 13, 1.0);
  auto label_loss = [&]() {
    nn::ModelCache<double> c;
    const RowMatrix<double> out = model.forward(tasks::prompt_tokens(batch, layout, eos, prefix), layout.seq_len(), c);
    const RowMatrix<double> err = tasks::predictions_at_queries<double>(out, B, layout) - batch.y;
    return 0.5 * err.squaredNorm() / double(B * pc.pairs);
  };
  nn::ModelCache<double> cache;
  const RowMatrix<double> out = model.forward(tasks::prompt_tokens(batch, layout, eos, prefix), layout.seq_len(), cache);
  const RowMatrix<double> err = tasks::predictions_at_queries<double>(out, B, layout) - batch.y;
  const RowMatrix<double> d_out = tasks::scatter_query_gradients<double>(err / double(B * pc.pairs), B, layout);
  RowMatrix<double> d_prompts(B * layout.seq_len(), 3);
  model.backward(d_out, cache, d_prompts);
  Vector<double> d_eos = Vector<double>::Zero(3);
  RowMatrix<double> d_prefix = RowMatrix<double>::Zero(2, 3);
  tasks::accumulate_prompt_gradients<double>(d_prompts, B, layout, d_eos, d_prefix);
  const auto r_eos = test::check_gradient(label_loss, eos, d_eos);
  INFO(r_eos.describe("d_eos"));
  CHECK(r_eos.error < 1e-6);
  const auto r_prefix = test::check_gradient(label_loss, prefix, d_prefix);
  INFO(r_prefix.describe("d_prefix"));
  CHECK(r_prefix.error < 1e-6);
  CHECK(d_eos.norm() > 1e-3);  // the check compares gradients that are not zero
  CHECK(d_prefix.norm() > 1e-3);
}

TEST_CASE("Model: init is deterministic and seed-dependent, forward is causal", "[model]") {
  nn::Model<double> a(hybrid_config()), b(hybrid_config());
  a.init(1, 0.2);
  b.init(1, 0.2);
  CHECK(flatten(a.parameters()) == flatten(b.parameters()));
  b.init(2, 0.2);
  CHECK(flatten(a.parameters()) != flatten(b.parameters()));
  // Changing the last token of a sequence leaves earlier predictions unchanged.
  const long T = 5;
  RowMatrix<double> x = random_matrix<double>(T, 3, 9, 1.0);
  nn::ModelCache<double> c;
  const RowMatrix<double> p0 = a.forward(x, T, c);
  x.row(T - 1).array() += 1.0;
  const RowMatrix<double> p1 = a.forward(x, T, c);
  CHECK((p0.topRows(T - 1) - p1.topRows(T - 1)).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((p0.row(T - 1) - p1.row(T - 1)).cwiseAbs().maxCoeff() > 1e-6);
}

TEST_CASE("Trainer: resume from a checkpoint is exact, bit for bit", "[model][train]") {
  const long n = 2, T = 6, B = 4, N = 8;
  auto source = dynamics_source<double>(n, T, B, 42);
  nn::ModelConfig mc = hybrid_config();
  mc.input_dim = 4 * n;
  mc.output_dim = n;

  nn::Model<double> straight(mc);
  straight.init(3, 0.2);
  train::Trainer<double> t0(straight, source, trainer_config(N, 1e-2));
  const auto r0 = t0.run();
  REQUIRE(r0.losses.size() == std::size_t(N));

  const std::string path = scratch_path("resume");
  nn::Model<double> first(mc);
  first.init(3, 0.2);
  auto tc = trainer_config(N, 1e-2);
  tc.checkpoint_path = path;
  train::Trainer<double> t1(first, source, tc);
  t1.run(N / 2);
  CHECK(t1.step() == N / 2);

  nn::Model<double> second(mc);
  second.init(999, 0.5);  // different weights: all must come from the checkpoint
  train::Trainer<double> t2(second, source, trainer_config(N, 1e-2));
  t2.resume(path);
  CHECK(t2.step() == N / 2);
  CHECK(t2.optimizer().step_count() == N / 2);
  const auto r2 = t2.run();
  std::remove(path.c_str());

  CHECK(r2.first_step == N / 2);
  CHECK(r2.steps_run == N / 2);
  REQUIRE(r2.losses.size() == r0.losses.size());
  CHECK(std::memcmp(r2.losses.data(), r0.losses.data(), r0.losses.size() * sizeof(double)) == 0);
  const auto a = flatten(straight.parameters()), b = flatten(second.parameters());
  REQUIRE(a.size() == b.size());
  CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0);
  // And the loss actually changed over the run (the comparison is not vacuous).
  CHECK(r0.losses.front() != r0.losses.back());
}

TEST_CASE("Trainer: 200 steps on constructed-token linear dynamics lower the loss", "[model][train]") {
  const long n = 3, T = 10, B = 16, steps = 200;
  auto source = dynamics_source<float>(n, T, B, 7);
  for (auto kind : {nn::AttentionKind::linear, nn::AttentionKind::mesa}) {
    nn::Model<float> model(one_layer_config(n, kind));
    model.init(1, 0.05);
    train::Trainer<float> trainer(model, source, trainer_config(steps, 1e-2));
    const auto r = trainer.run();
    auto mean = [&](long from, long to) {
      double s = 0;
      for (long i = from; i < to; ++i) s += r.losses[std::size_t(i)];
      return s / double(to - from);
    };
    const double initial = mean(0, 10), final = mean(steps - 10, steps);
    const double ratio = final / initial;
    INFO(nn::attention_kind_name(kind) << ": initial " << initial << ", final " << final << ", ratio " << ratio
                                       << ", " << r.tokens_per_second << " tok/s");
    std::printf("[train] %s: loss %.4g -> %.4g (ratio %.3f), %.0f tokens/s\n", nn::attention_kind_name(kind),
                initial, final, ratio, r.tokens_per_second);
    CHECK(std::isfinite(final));
    // Measured (Release, AVX2): linear 0.568, mesa 0.228 (final/initial of 10-step means).
    const double bound = kind == nn::AttentionKind::linear ? 0.75 : 0.4;
    CHECK(ratio < bound);
  }
}

TEST_CASE("Trainer: 1 vs 2 threads give identical parameters", "[model][train]") {
  const long n = 2, T = 6, B = 4, N = 3;
  auto source = dynamics_source<double>(n, T, B, 5);
  nn::ModelConfig mc = hybrid_config();
  mc.input_dim = 4 * n;
  mc.output_dim = n;
  nn::Model<double> one(mc), two(mc);
  one.init(4, 0.2);
  two.init(4, 0.2);
  one.set_num_threads(1);
  two.set_num_threads(2);
  train::Trainer<double> t1(one, source, trainer_config(N, 1e-2));
  train::Trainer<double> t2(two, source, trainer_config(N, 1e-2));
  const auto r1 = t1.run(), r2 = t2.run();
  CHECK(std::memcmp(r1.losses.data(), r2.losses.data(), r1.losses.size() * sizeof(double)) == 0);
  const auto a = flatten(one.parameters()), b = flatten(two.parameters());
  REQUIRE(a.size() == b.size());
  CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0);
  CHECK(flatten(one.parameters()) != [&] {
    nn::Model<double> fresh(mc);
    fresh.init(4, 0.2);
    return flatten(fresh.parameters());
  }());
}

TEST_CASE("Trainer: element-wise clipping is the hand-written loop with clip_grad_value", "[model][train]") {
  const long n = 2, T = 6, B = 4, N = 3;
  auto source = dynamics_source<double>(n, T, B, 5);
  nn::ModelConfig mc = hybrid_config();
  mc.input_dim = 4 * n;
  mc.output_dim = n;
  nn::Model<double> trained(mc), by_hand(mc), unclipped(mc);
  for (auto* m : {&trained, &by_hand, &unclipped}) m->init(4, 0.2);
  auto tc = trainer_config(N, 1e-2);
  tc.clip_norm = 0;
  tc.clip_value = 1e-3;  // below most entries of these gradients: the clip acts
  tc.shards = 1;
  train::Trainer<double>(trained, source, tc).run();
  tc.clip_value = 0;
  train::Trainer<double>(unclipped, source, tc).run();

  const auto params = by_hand.parameters();
  train_by_hand(by_hand, source, N, tc, train::default_decay_mask(params), [](const auto& grads) {
    long clipped = 0;
    for (const auto& p : grads)
      for (std::size_t i = 0; i < p.size; ++i) clipped += std::abs(p.grad[i]) > 1e-3;
    CHECK(clipped > 0);
    train::clip_grad_value(grads, 1e-3);
  });
  const auto a = flatten(trained.parameters()), b = flatten(params);
  REQUIRE(a.size() == b.size());
  CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0);
  CHECK(flatten(unclipped.parameters()) != a);
}

TEST_CASE("Trainer: DecayScope::all decays every parameter (vectors and the mesa lambda too)", "[model][train]") {
  const long n = 2, T = 6, B = 4, N = 3;
  auto source = dynamics_source<double>(n, T, B, 5);
  nn::ModelConfig mc = hybrid_config();
  mc.input_dim = 4 * n;
  mc.output_dim = n;
  for (auto& b : mc.blocks)
    if (b.attention == nn::AttentionKind::mesa) b.lambda_parametrization = LambdaParametrization::raw;
  nn::Model<double> trained(mc), by_hand(mc), matrices_only(mc);
  for (auto* m : {&trained, &by_hand, &matrices_only}) m->init(4, 0.2);
  auto tc = trainer_config(N, 1e-2);
  tc.adam.weight_decay = 0.5;  // large, so that the decay of the vectors shows
  tc.clip_norm = 0;
  tc.shards = 1;
  tc.decay = train::DecayScope::all;
  train::Trainer<double> t(trained, source, tc);
  t.run();
  tc.decay = train::DecayScope::matrices;
  train::Trainer<double>(matrices_only, source, tc).run();

  const auto params = by_hand.parameters();
  bool has_vector = false;
  for (const auto& p : params) has_vector |= p.shape.size() < 2;
  CHECK(has_vector);  // there is something the scope changes
  train_by_hand(by_hand, source, N, tc, std::vector<bool>(params.size(), true), [](const auto&) {});
  const auto a = flatten(trained.parameters()), b = flatten(params);
  REQUIRE(a.size() == b.size());
  CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0);
  CHECK(flatten(matrices_only.parameters()) != a);
  for (std::size_t k = 0; k < params.size(); ++k) CHECK(t.optimizer().decay_mask()[k]);
}

TEST_CASE("Model and Trainer: bad configs throw naming the field", "[model][errors]") {
  auto throws_with = [](auto&& make, const char* field) {
    CHECK_THROWS_AS(make(), std::invalid_argument);
    CHECK_THROWS_WITH(make(), Catch::Matchers::Contains(field));
  };
  auto build = [](nn::ModelConfig c) { return [c] { nn::Model<double> m(c); }; };
  nn::ModelConfig c = constructed_config(2, 0.0);
  { auto b = c; b.width = 0; throws_with(build(b), "config.width"); }
  { auto b = c; b.input_dim = 0; throws_with(build(b), "config.input_dim"); }
  { auto b = c; b.output_dim = 0; throws_with(build(b), "config.output_dim"); }
  { auto b = c; b.input_dim = 5; throws_with(build(b), "config.input_dim"); }
  { auto b = c; b.output_dim = 9; throws_with(build(b), "config.readout_slice"); }
  { auto b = c; b.clip = -1; throws_with(build(b), "config.clip"); }
  { auto b = c; b.blocks.clear(); throws_with(build(b), "config.blocks"); }
  { auto b = c; b.blocks[1].key_size = 0; throws_with(build(b), "config.blocks[1].key_size"); }
  { auto b = c; b.blocks[0].value_size = -1; throws_with(build(b), "config.blocks[0].value_size"); }
  { auto b = c; b.blocks[0].heads = 0; throws_with(build(b), "config.blocks[0].heads"); }
  { auto b = c; b.blocks[0].mlp = true; throws_with(build(b), "config.blocks[0].mlp_hidden"); }
  { auto b = c; b.blocks[1].positional_dim = -2; throws_with(build(b), "config.blocks[1].positional_dim"); }
  { auto b = c; b.blocks[0].attention = nn::AttentionKind::mesa; b.blocks[0].lambda_init = 0;
    throws_with(build(b), "config.blocks[0].lambda_init"); }
  { auto b = c; b.blocks[0].attention = nn::AttentionKind::mesa;
    b.blocks[0].lambda_parametrization = static_cast<LambdaParametrization>(5);
    throws_with(build(b), "config.blocks[0].lambda_parametrization"); }
  { auto b = c; b.blocks[0].attention = nn::AttentionKind::mesa; b.blocks[0].learn_forget = true;
    throws_with(build(b), "config.blocks[0].forget_init"); }
  { auto b = c; b.blocks[0].attention = nn::AttentionKind::softmax; b.blocks[0].normalize_qk = true;
    throws_with(build(b), "config.blocks[0].normalize_qk"); }

  nn::Model<double> model(c);
  nn::ModelCache<double> cache;
  throws_with([&] { model.forward(RowMatrix<double>::Zero(6, 7), 3, cache); }, "x.cols()");
  throws_with([&] { model.forward(RowMatrix<double>::Zero(7, 8), 3, cache); }, "seq_len");
  throws_with([&] { model.backward(RowMatrix<double>::Zero(6, 2), cache); }, "forward");
  throws_with([&] { model.init(1, -1.0); }, "stddev");
  model.forward(RowMatrix<double>::Zero(6, 8), 3, cache);
  throws_with([&] { model.backward(RowMatrix<double>::Zero(6, 3), cache); }, "dpred");

  auto source = dynamics_source<double>(2, 3, 2, 1);
  throws_with([&] { train::Trainer<double> t(model, source, trainer_config(0, 1e-2)); }, "config.steps");
  { auto tc = trainer_config(5, 1e-2); tc.clip_norm = -1;
    throws_with([&] { train::Trainer<double> t(model, source, tc); }, "config.clip_norm"); }
  { auto tc = trainer_config(5, 1e-2); tc.clip_value = -1;
    throws_with([&] { train::Trainer<double> t(model, source, tc); }, "config.clip_value"); }
  { auto tc = trainer_config(5, 1e-2); tc.decay = static_cast<train::DecayScope>(3);
    throws_with([&] { train::Trainer<double> t(model, source, tc); }, "config.decay"); }
  { auto tc = trainer_config(5, 1e-2); tc.checkpoint_every = -1;
    throws_with([&] { train::Trainer<double> t(model, source, tc); }, "config.checkpoint_every"); }
  throws_with([&] { train::Trainer<double> t(model, train::BatchSource<double>{}, trainer_config(5, 1e-2)); },
              "source");
}

}  // namespace mesaopt_test_model
