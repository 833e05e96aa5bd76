// Reliability of train::Trainer (docs/training.md, "Failures and what they
// produce"): a non-finite loss or gradient norm is caught at the step where it
// arises and never reaches the weights, the Adam state or a checkpoint (policy
// stop: a NonFiniteError naming the step; policy skip: the batch is dropped and
// counted, and the run equals one whose stream never held it); save() refuses
// non-finite state; resume() refuses a checkpoint of another configuration
// with the same tensor shapes, and a damaged one, without changing anything;
// resume stays exact with skipped steps.
#include <catch2/catch.hpp>

#include <mesaopt/nn.hpp>
#include <mesaopt/train.hpp>

#include "scratch_files.hpp"
#include "trainer_state.hpp"
#include "test_util.hpp"

#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include <dirent.h>
#include <unistd.h>

// Everything of this file lives in its own namespace, so that test files can be
// compiled together in one translation unit (tests/CMakeLists.txt, unity groups).
namespace mesaopt_test_train_reliability {

using namespace mesaopt;
using mesaopt::test::error_of;
using mesaopt::test::random_matrix;
using mesaopt::test::read_bytes;
using mesaopt::test::ScratchDir;
using mesaopt::test::bytes_of;
using mesaopt::test::state_of;
using mesaopt::test::TrainerState;

namespace {




constexpr long kIn = 3, kWidth = 8, kOut = 2, kSeq = 5, kBatch = 2;

// One linear-attention block with H heads of size d (H d = 4 keeps every tensor
// shape the same across head splits).
nn::ModelConfig linear_config(long heads = 1, long key_size = 4, bool normalize_qk = false) {
  nn::ModelConfig c;
  c.input_dim = kIn;
  c.width = kWidth;
  c.output_dim = kOut;
  nn::BlockConfig b;
  b.attention = nn::AttentionKind::linear;
  b.heads = heads;
  b.key_size = key_size;
  b.value_size = key_size;
  b.normalize_qk = normalize_qk;
  c.blocks = {b};
  return c;
}

// A mesa block with pre-LN and an MLP (the kind that used to fail a step late
// with "lambda = softplus(lambda_raw = nan)").
nn::ModelConfig mesa_config(double forget = 1.0) {
  nn::ModelConfig c;
  c.input_dim = kIn;
  c.width = kWidth;
  c.output_dim = kOut;
  nn::BlockConfig b;
  b.attention = nn::AttentionKind::mesa;
  b.heads = 2;
  b.key_size = 3;
  b.value_size = 3;
  b.layer_norm = true;
  b.mlp = true;
  b.mlp_hidden = 8;
  b.forget_init = forget;
  c.blocks = {b};
  return c;
}

// Batch s: random inputs and targets drawn from seeds that depend only on s.
train::BatchSource<double> clean_source() {
  return [](long s) {
    train::TrainBatch<double> b;
    b.inputs = random_matrix<double>(kBatch * kSeq, kIn, 1000 + 2 * std::uint64_t(s));
    b.targets = random_matrix<double>(kBatch * kSeq, kOut, 1001 + 2 * std::uint64_t(s));
    b.seq_len = kSeq;
    return b;
  };
}

// clean_source with `value` written into one input of each step in `bad`.
train::BatchSource<double> poisoned_source(std::vector<long> bad, double value) {
  return [bad, value, clean = clean_source()](long s) {
    train::TrainBatch<double> b = clean(s);
    for (long k : bad)
      if (k == s) b.inputs(3, 1) = value;
    return b;
  };
}

train::TrainerConfig trainer_config(long steps) {
  train::TrainerConfig tc;
  tc.steps = steps;
  tc.adam = train::adamw_config(0.01);
  tc.schedule = train::constant_schedule(1e-2);  // the skip equivalence below needs lr independent of s
  tc.clip_norm = 1.0;
  tc.progress = false;
  return tc;
}

template <class T>
bool all_finite(const train::Trainer<T>& t) {
  for (const auto& p : t.parameters())
    for (std::size_t i = 0; i < p.size; ++i)
      if (!std::isfinite(p.value[i])) return false;
  const auto& opt = t.optimizer();
  for (std::size_t k = 0; k < opt.params().size(); ++k)
    for (std::size_t i = 0; i < opt.first_moment(k).size(); ++i)
      if (!std::isfinite(opt.first_moment(k)[i]) || !std::isfinite(opt.second_moment(k)[i])) return false;
  return true;
}

std::vector<char> flat_params(const std::vector<ParameterView<double>>& params) {
  std::vector<char> out;
  for (const auto& p : params) {
    const auto b = bytes_of(p.value, p.size * sizeof(double));
    out.insert(out.end(), b.begin(), b.end());
  }
  return out;
}

struct Kind {
  const char* name;
  nn::ModelConfig config;
};
nn::ModelConfig softmax_config() {
  nn::ModelConfig c = linear_config(2, 2);
  c.blocks[0].attention = nn::AttentionKind::softmax;
  return c;
}
std::vector<Kind> kinds() {
  return {{"linear", linear_config()}, {"softmax", softmax_config()}, {"mesa", mesa_config()}};
}

}  // namespace

// ---------------------------------------------------------------- non-finite steps

TEST_CASE("Non-finite input, policy stop: throws naming the step, state and last checkpoint untouched",
          "[train][reliability]") {
  const long bad = 5, N = 8;
  for (const Kind& kind : kinds()) {
    for (const double value : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
      DYNAMIC_SECTION(kind.name << ", input " << value) {
        ScratchDir dir;
        const std::string path = dir.path + "/ckpt.safetensors";
        // Reference: the clean run up to the bad step.
        nn::Model<double> ref_model(kind.config);
        ref_model.init(7, 0.3);
        train::Trainer<double> ref(ref_model, clean_source(), trainer_config(N));
        ref.run(bad);
        const TrainerState before_bad = state_of(ref);

        nn::Model<double> model(kind.config);
        model.init(7, 0.3);
        auto tc = trainer_config(N);
        tc.checkpoint_path = path;
        tc.checkpoint_every = 2;
        train::Trainer<double> trainer(model, poisoned_source({bad}, value), tc);
        trainer.run(4);  // writes the step-4 checkpoint: the last good one
        const std::vector<char> good = read_bytes(path);
        REQUIRE(!good.empty());

        bool thrown = false;
        try {
          trainer.run();  // step 4 is clean, step 5 holds the bad value
        } catch (const train::NonFiniteError& e) {
          thrown = true;
          INFO(e.what());
          CHECK(e.step() == bad);
          CHECK_FALSE(std::isfinite(e.value()));
          if (std::string(kind.name) == "mesa") {
            // The mesa recursion meets the non-finite key first and stops (docs/mesa.md).
            CHECK(e.quantity() == "mesa breakdown");
            CHECK_THAT(std::string(e.what()), Catch::Contains("mesa breakdown at step 5") &&
                                                  Catch::Contains("numerical breakdown at position"));
          } else {
            CHECK(e.quantity() == "loss");  // the bad input reaches the loss first
            CHECK_THAT(std::string(e.what()), Catch::Contains("at step 5") && Catch::Contains("non-finite loss"));
          }
        }
        CHECK(thrown);
        CHECK(trainer.step() == bad);
        CHECK(state_of(trainer) == before_bad);  // weights, Adam m, v, t, history: bit for bit
        CHECK(read_bytes(path) == good);         // the last good checkpoint is byte-identical
        CHECK(all_finite(trainer));
      }
    }
  }
}

TEST_CASE("Non-finite input, policy skip: the run equals one whose stream never held the bad batch",
          "[train][reliability]") {
  const long bad = 3, N = 8;
  for (const Kind& kind : kinds()) {
    for (const double value : {std::numeric_limits<double>::quiet_NaN(), -std::numeric_limits<double>::infinity()}) {
      DYNAMIC_SECTION(kind.name << ", input " << value) {
        nn::Model<double> model(kind.config);
        model.init(11, 0.3);
        auto tc = trainer_config(N);
        tc.non_finite = train::NonFinitePolicy::skip;
        // The source also records the trainer's state when it is asked for
        // the bad batch and for the one after it.
        train::Trainer<double>* observed = nullptr;
        TrainerState at_bad, after_bad;
        auto poisoned = poisoned_source({bad}, value);
        train::Trainer<double> trainer(
            model,
            [&](long s) {
              if (s == bad) at_bad = state_of(*observed);
              if (s == bad + 1) after_bad = state_of(*observed);
              return poisoned(s);
            },
            tc);
        observed = &trainer;
        const train::TrainResult r = trainer.run();

        CHECK(r.steps_run == N);
        CHECK(r.skipped == 1);
        CHECK(r.skipped_steps == std::vector<long>{bad});
        CHECK(trainer.skipped_steps() == std::vector<long>{bad});
        CHECK(trainer.step() == N);
        CHECK(trainer.optimizer().step_count() == N - 1);  // Adam counts applied updates
        CHECK(all_finite(trainer));
        REQUIRE(r.losses.size() == std::size_t(N));
        CHECK_FALSE(std::isfinite(r.losses[bad]));
        // Weights and Adam state after the skipped step equal those before it.
        CHECK(after_bad.params == at_bad.params);
        CHECK(after_bad.m == at_bad.m);
        CHECK(after_bad.v == at_bad.v);
        CHECK(after_bad.adam_step == at_bad.adam_step);

        // With a constant lr, skipping step `bad` is the same as a stream that
        // never had that batch: the clean batches 0..bad-1, bad+1..N-1 in N-1 steps.
        nn::Model<double> ref_model(kind.config);
        ref_model.init(11, 0.3);
        auto clean = clean_source();
        train::Trainer<double> ref(
            ref_model, [&](long s) { return clean(s < bad ? s : s + 1); }, trainer_config(N - 1));
        const train::TrainResult rr = ref.run();
        CHECK(flat_params(trainer.parameters()) == flat_params(ref.parameters()));
        for (long s = 0; s < N; ++s) {
          if (s == bad) continue;
          const double want = rr.losses[std::size_t(s < bad ? s : s - 1)];
          CHECK(std::memcmp(&r.losses[std::size_t(s)], &want, sizeof(double)) == 0);
        }
        // And the comparison is not vacuous: the bad batch would have changed the run.
        CHECK(rr.losses.front() != rr.losses.back());
      }
    }
  }
}

TEST_CASE("A finite loss with a non-finite gradient norm is caught too", "[train][reliability]") {
  // Input column 2 is zero in every clean batch and the embedding's column 2
  // is zero, so it never moves. At the bad step that input is 1e300: the
  // forward multiplies it by 0 (finite loss), but dW_embed[:, 2] = dh^T x
  // holds ~1e297, whose square overflows the norm: N = inf.
  const long bad = 2, N = 6;
  auto source = [](long s) {
    train::TrainBatch<double> b = clean_source()(s);
    b.inputs.col(2).setZero();
    if (s == bad) b.inputs(4, 2) = 1e300;
    return b;
  };
  auto zero_column = [](nn::Model<double>& m) {
    for (auto& p : m.parameters())
      if (p.name == "embed.weight") {
        REQUIRE(p.shape == std::vector<long>{kWidth, kIn});
        for (long r = 0; r < kWidth; ++r) p.value[r * kIn + 2] = 0.0;
      }
  };
  for (const Kind& kind : kinds()) {
    DYNAMIC_SECTION(kind.name) {
      nn::Model<double> ref_model(kind.config), model(kind.config);
      ref_model.init(3, 0.3);
      model.init(3, 0.3);
      zero_column(ref_model);
      zero_column(model);
      train::Trainer<double> ref(ref_model, source, trainer_config(N));
      ref.run(bad);

      SECTION("stop") {
        train::Trainer<double> trainer(model, source, trainer_config(N));
        bool thrown = false;
        try {
          trainer.run();
        } catch (const train::NonFiniteError& e) {
          thrown = true;
          INFO(e.what());
          CHECK(e.step() == bad);
          CHECK(e.quantity() == "gradient norm");
          CHECK(std::isinf(e.value()));
          CHECK_THAT(std::string(e.what()), Catch::Contains("non-finite gradient norm") && Catch::Contains("at step 2"));
        }
        CHECK(thrown);
        CHECK(state_of(trainer) == state_of(ref));
      }
      SECTION("skip") {
        auto tc = trainer_config(N);
        tc.non_finite = train::NonFinitePolicy::skip;
        train::Trainer<double> trainer(model, source, tc);
        const auto r = trainer.run();
        CHECK(r.skipped == 1);
        CHECK(r.skipped_steps == std::vector<long>{bad});
        CHECK(std::isfinite(r.losses[bad]));  // the loss was fine; the gradient was not
        CHECK(std::isinf(r.grad_norms[bad]));
        CHECK(all_finite(trainer));
      }
    }
  }
}

TEST_CASE("Policy skip stops after max_consecutive_skips bad steps in a row", "[train][reliability]") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  nn::Model<double> model(linear_config());
  model.init(5, 0.3);
  auto tc = trainer_config(8);
  tc.non_finite = train::NonFinitePolicy::skip;
  tc.max_consecutive_skips = 2;
  SECTION("three in a row: the third stops") {
    train::Trainer<double> trainer(model, poisoned_source({2, 3, 4}, nan), tc);
    const std::string e = error_of([&] { trainer.run(); });
    CHECK_THAT(e, Catch::Contains("at step 4") && Catch::Contains("max_consecutive_skips = 2"));
    CHECK(trainer.step() == 4);
    CHECK(trainer.skipped_steps() == std::vector<long>{2, 3});
    CHECK(all_finite(trainer));
  }
  SECTION("two in a row, twice: runs through") {
    train::Trainer<double> trainer(model, poisoned_source({1, 2, 4, 5}, nan), tc);
    const auto r = trainer.run();
    CHECK(r.skipped == 4);
    CHECK(trainer.optimizer().step_count() == 4);
  }
  SECTION("no cap") {
    tc.max_consecutive_skips = 0;
    train::Trainer<double> trainer(model, poisoned_source({0, 1, 2, 3, 4, 5, 6}, nan), tc);
    CHECK(trainer.run().skipped == 7);
  }
  SECTION("bad settings") {
    tc.max_consecutive_skips = -1;
    CHECK_THROWS_WITH(train::Trainer<double>(model, clean_source(), tc), Catch::Contains("max_consecutive_skips"));
  }
}

TEST_CASE("save() refuses non-finite weights or Adam moments and leaves the file untouched", "[train][reliability]") {
  ScratchDir dir;
  const std::string path = dir.path + "/ckpt.safetensors";
  nn::Model<double> model(mesa_config());
  model.init(2, 0.3);
  train::Trainer<double> trainer(model, clean_source(), trainer_config(6));
  trainer.run(3);
  trainer.save(path);
  const std::vector<char> good = read_bytes(path);
  const auto& params = trainer.parameters();
  REQUIRE(params.size() > 2);

  SECTION("a NaN weight") {
    const double keep = params[2].value[1];
    params[2].value[1] = std::numeric_limits<double>::quiet_NaN();
    const std::string e = error_of([&] { trainer.save(path); });
    CHECK_THAT(e, Catch::Contains(params[2].name) && Catch::Contains("nan") && Catch::Contains("untouched"));
    CHECK(read_bytes(path) == good);
    params[2].value[1] = keep;
  }
  SECTION("an infinite Adam moment") {
    trainer.optimizer().second_moment(0)[0] = std::numeric_limits<double>::infinity();
    CHECK_THAT(error_of([&] { trainer.save(path); }),
               Catch::Contains("second moment") && Catch::Contains(params[0].name));
    CHECK(read_bytes(path) == good);
  }
  SECTION("the control: finite state saves") {
    trainer.run(4);
    trainer.save(path);
    CHECK(read_bytes(path) != good);
  }
}

// ---------------------------------------------------------------- resume

TEST_CASE("Resume with skipped steps is exact, and carries the consecutive-skip count", "[train][reliability]") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const long N = 8;
  for (const Kind& kind : kinds()) {
    DYNAMIC_SECTION(kind.name) {
      ScratchDir dir;
      const std::string path = dir.path + "/ckpt.safetensors";
      auto tc = trainer_config(N);
      tc.non_finite = train::NonFinitePolicy::skip;
      auto source = poisoned_source({1, 3}, nan);

      nn::Model<double> straight(kind.config);
      straight.init(9, 0.3);
      train::Trainer<double> t0(straight, source, tc);
      const auto r0 = t0.run();
      REQUIRE(r0.skipped_steps == std::vector<long>({1, 3}));

      nn::Model<double> first(kind.config);
      first.init(9, 0.3);
      auto tc1 = tc;
      tc1.checkpoint_path = path;
      train::Trainer<double> t1(first, source, tc1);
      t1.run(N / 2);  // steps 0..3: the checkpoint holds both skips and a NaN loss

      nn::Model<double> second(kind.config);
      second.init(999, 0.5);
      train::Trainer<double> t2(second, source, tc);
      t2.resume(path);
      CHECK(state_of(t2) == state_of(t1));
      const auto r2 = t2.run();
      CHECK(r2.first_step == N / 2);
      CHECK(state_of(t2) == state_of(t0));  // weights, moments, t, step, losses (NaN included), skips
      CHECK(r2.losses.size() == r0.losses.size());

      // The count of skips in a row survives the checkpoint: with a cap of 2,
      // skips at 3 (saved) and 4 are allowed, 5 stops, straight or resumed.
      auto capped = tc;
      capped.max_consecutive_skips = 2;
      auto source3 = poisoned_source({3, 4, 5}, nan);
      nn::Model<double> a(kind.config);
      a.init(9, 0.3);
      auto capped1 = capped;
      capped1.checkpoint_path = path;
      train::Trainer<double> ta(a, source3, capped1);
      ta.run(4);
      nn::Model<double> b(kind.config);
      b.init(1, 0.3);
      train::Trainer<double> tb(b, source3, capped);
      tb.resume(path);
      CHECK_THAT(error_of([&] { tb.run(); }), Catch::Contains("at step 5"));
      CHECK(tb.skipped_steps() == std::vector<long>({3, 4}));
    }
  }
}

namespace {

// A trainer with some history whose state must survive refused resumes.
struct Target {
  nn::Model<double> model;
  train::Trainer<double> trainer;
  TrainerState before;
  explicit Target(const nn::ModelConfig& mc, const train::TrainerConfig& tc = trainer_config(10))
      : model(mc), trainer((model.init(21, 0.3), model), clean_source(), tc) {
    trainer.run(3);
    before = state_of(trainer);
  }
};

// Writes a 4-step checkpoint of a trainer with model config mc and trainer config tc.
void write_checkpoint(const std::string& path, const nn::ModelConfig& mc, train::TrainerConfig tc = trainer_config(10)) {
  nn::Model<double> m(mc);
  m.init(4, 0.3);
  train::Trainer<double> t(m, clean_source(), tc);
  t.run(4);
  t.save(path);
}

}  // namespace

TEST_CASE("Resume refuses a checkpoint of another configuration and changes nothing", "[train][reliability]") {
  ScratchDir dir;
  const std::string path = dir.path + "/other.safetensors";
  struct Case {
    const char* field;
    nn::ModelConfig model;
    train::TrainerConfig trainer;
    const char* theirs;
    const char* ours;
  };
  auto tc = [](auto&& edit) {
    train::TrainerConfig c = trainer_config(10);
    edit(c);
    return c;
  };
  const std::vector<Case> cases = {
      {"model.blocks[0].heads", linear_config(2, 2), trainer_config(10), "2", "1"},
      {"model.blocks[0].normalize_qk", linear_config(1, 4, true), trainer_config(10), "true", "false"},
      {"optim.beta1", linear_config(), tc([](auto& c) { c.adam.beta1 = 0.8; }), "0.80000000000000004", "0.90000000000000002"},
      {"optim.beta2", linear_config(), tc([](auto& c) { c.adam.beta2 = 0.99; }), "0.98999999999999999", "0.999"},
      {"optim.eps", linear_config(), tc([](auto& c) { c.adam.eps = 1e-6; }), "9.9999999999999995e-07", "1e-08"},
      {"optim.weight_decay", linear_config(), tc([](auto& c) { c.adam.weight_decay = 0.1; }), "0.10000000000000001",
       "0.01"},
      {"optim.type", linear_config(), tc([](auto& c) { c.adam.decoupled_weight_decay = false; }), "adam", "adamw"},
      {"trainer.clip_norm", linear_config(), tc([](auto& c) { c.clip_norm = 0.0; }), "0", "1"},
      {"trainer.clip_value", linear_config(), tc([](auto& c) { c.clip_value = 1.0; }), "1", "0"},
      {"trainer.decay", linear_config(), tc([](auto& c) { c.decay = train::DecayScope::all; }), "all", "matrices"},
      {"trainer.schedule.peak", linear_config(), tc([](auto& c) { c.schedule = train::constant_schedule(2e-2); }),
       "0.02", "0.01"},
      {"trainer.schedule.kind", linear_config(),
       tc([](auto& c) { c.schedule = train::warmup_cosine_schedule(1e-2, 2, 10, 0.0); }), "warmup_cosine",
       "constant"},
  };
  Target target(linear_config());
  for (const Case& c : cases) {
    DYNAMIC_SECTION(c.field) {
      write_checkpoint(path, c.model, c.trainer);
      // The tensors alone fit this model: the low-level loader would take them.
      nn::Model<double> scratch(linear_config());
      CHECK_NOTHROW(train::load_checkpoint(path, scratch.parameters()));
      const std::string e = error_of([&] { target.trainer.resume(path); });
      INFO(e);
      CHECK_THROWS_AS(target.trainer.resume(path), std::invalid_argument);
      CHECK_THAT(e, Catch::Contains(std::string(c.field) + " = " + c.theirs) &&
                        Catch::Contains(std::string(c.field) + " = " + c.ours) && Catch::Contains(path));
      CHECK(state_of(target.trainer) == target.before);
    }
  }
  SECTION("a mesa block with another fixed forget factor (not a tensor)") {
    Target mesa(mesa_config(1.0));
    write_checkpoint(path, mesa_config(0.9));
    CHECK_THAT(error_of([&] { mesa.trainer.resume(path); }),
               Catch::Contains("model.blocks[0].forget_init = 0.90000000000000002") &&
                   Catch::Contains("model.blocks[0].forget_init = 1"));
    CHECK(state_of(mesa.trainer) == mesa.before);
  }
  SECTION("a mesa block whose lambda is used raw (the same tensors)") {
    Target mesa(mesa_config());
    nn::ModelConfig raw = mesa_config();
    raw.blocks[0].lambda_parametrization = LambdaParametrization::raw;
    write_checkpoint(path, raw);
    CHECK_THAT(error_of([&] { mesa.trainer.resume(path); }),
               Catch::Contains("model.blocks[0].lambda_parametrization = raw") &&
                   Catch::Contains("model.blocks[0].lambda_parametrization = softplus"));
    CHECK(state_of(mesa.trainer) == mesa.before);
  }
  SECTION("the control: the same configuration (another thread count, steps or checkpoint path) resumes") {
    auto other = trainer_config(20);
    other.checkpoint_path = dir.path + "/elsewhere.safetensors";
    write_checkpoint(path, linear_config(), other);
    target.model.set_num_threads(2);
    target.trainer.resume(path);
    CHECK(target.trainer.step() == 4);
    CHECK_FALSE(state_of(target.trainer) == target.before);
  }
}

TEST_CASE("A checkpoint written before the decay scope and the lambda parametrisation were recorded resumes "
          "with the old behaviour only", "[train][reliability]") {
  ScratchDir dir;
  const std::string path = dir.path + "/new.safetensors";
  const std::string old = dir.path + "/old.safetensors";
  write_checkpoint(path, mesa_config());
  const io::SafetensorsFile f = io::read_safetensors(path);
  REQUIRE(f.metadata.at("trainer.decay") == "matrices");
  REQUIRE(f.metadata.at("model.blocks[0].lambda_parametrization") == "softplus");
  std::map<std::string, std::string> meta = f.metadata;
  meta.erase("trainer.decay");
  meta.erase("model.blocks[0].lambda_parametrization");
  std::vector<io::SafetensorsTensorRef> refs;
  for (const auto& t : f.tensors) refs.push_back({t.name, t.dtype, t.shape, f.data(t)});
  io::write_safetensors(old, refs, meta);

  Target same(mesa_config());
  same.trainer.resume(old);
  CHECK(same.trainer.step() == 4);
  SECTION("a trainer that decays every parameter refuses it") {
    nn::Model<double> model(mesa_config());
    auto tc = trainer_config(10);
    tc.decay = train::DecayScope::all;
    train::Trainer<double> t(model, clean_source(), tc);
    CHECK_THAT(error_of([&] { t.resume(old); }), Catch::Contains("no \"trainer.decay\" entry"));
    CHECK(t.step() == 0);
  }
  SECTION("a model with the raw lambda refuses it") {
    nn::ModelConfig raw = mesa_config();
    raw.blocks[0].lambda_parametrization = LambdaParametrization::raw;
    nn::Model<double> model(raw);
    train::Trainer<double> t(model, clean_source(), trainer_config(10));
    CHECK_THAT(error_of([&] { t.resume(old); }), Catch::Contains("no \"model.blocks[0].lambda_parametrization\""));
    CHECK(t.step() == 0);
  }
}

TEST_CASE("Resume refuses a damaged or old checkpoint before changing anything", "[train][reliability]") {
  ScratchDir dir;
  const std::string good = dir.path + "/good.safetensors";
  const std::string bad = dir.path + "/bad.safetensors";
  write_checkpoint(good, linear_config());
  const io::SafetensorsFile f = io::read_safetensors(good);
  REQUIRE(f.metadata.count("trainer.loss_history") == 1);

  // `good` with its metadata edited and optionally one tensor dropped.
  auto rewrite = [&](const std::function<void(std::map<std::string, std::string>&)>& edit,
                     const std::string& drop = "") {
    std::map<std::string, std::string> meta = f.metadata;
    edit(meta);
    std::vector<io::SafetensorsTensorRef> refs;
    for (const auto& t : f.tensors)
      if (t.name != drop) refs.push_back({t.name, t.dtype, t.shape, f.data(t)});
    io::write_safetensors(bad, refs, meta);
  };
  struct Case {
    const char* name;
    std::function<void(std::map<std::string, std::string>&)> edit;
    const char* drop;
    const char* expect;
  };
  const std::string history = f.metadata.at("trainer.loss_history");
  const std::vector<Case> cases = {
      {"no loss history", [](auto& m) { m.erase("trainer.loss_history"); }, "", "trainer.loss_history"},
      {"a history one entry short", [&](auto& m) { m["trainer.loss_history"] = history.substr(0, history.rfind(',')); },
       "", "loss history has 3 entries but step is 4"},
      {"a garbage history entry", [&](auto& m) { m["trainer.loss_history"] = "0.5x," + history.substr(history.find(',') + 1); },
       "", "bad loss history entry \"0.5x\""},
      {"a NaN loss at a step that was not skipped",
       [&](auto& m) { m["trainer.loss_history"] = "nan," + history.substr(history.find(',') + 1); }, "",
       "is nan but step 0 is not a skipped step"},
      {"a bad skipped-steps list", [](auto& m) { m["trainer.skipped_steps"] = "2,1"; }, "", "bad skipped step"},
      {"Adam's step count disagrees", [](auto& m) { m["optim.step"] = "3"; }, "", "optim.step is 3"},
      {"a missing tensor", [](auto&) {}, "readout.bias", "\"readout.bias\" is missing"},
      {"no configuration (an old checkpoint)",
       [](auto& m) {
         for (auto it = m.begin(); it != m.end();)
           it = (it->first.rfind("model.", 0) == 0 || (it->first.rfind("trainer.", 0) == 0 &&
                                                        it->first != "trainer.loss_history"))
                    ? m.erase(it)
                    : std::next(it);
       },
       "", "no model or trainer configuration"},
  };
  Target target(linear_config());
  for (const Case& c : cases) {
    DYNAMIC_SECTION(c.name) {
      rewrite(c.edit, c.drop);
      const std::string e = error_of([&] { target.trainer.resume(bad); });
      INFO(e);
      CHECK_THAT(e, Catch::Contains(c.expect) && Catch::Contains(bad));
      CHECK(state_of(target.trainer) == target.before);
    }
  }
  SECTION("the control: the unedited rewrite resumes") {
    rewrite([](auto&) {});
    target.trainer.resume(bad);
    CHECK(target.trainer.step() == 4);
  }
  SECTION("a missing file") {
    CHECK_THROWS_AS(target.trainer.resume(dir.path + "/none.safetensors"), std::runtime_error);
    CHECK(state_of(target.trainer) == target.before);
  }
}

TEST_CASE("Exact resume: N straight == N/2 + save + resume + N/2, bit for bit", "[train][reliability]") {
  const long N = 8;
  for (const Kind& kind : kinds()) {
    DYNAMIC_SECTION(kind.name) {
      ScratchDir dir;
      const std::string path = dir.path + "/ckpt.safetensors";
      nn::Model<double> straight(kind.config);
      straight.init(3, 0.3);
      train::Trainer<double> t0(straight, clean_source(), trainer_config(N));
      t0.run();
      nn::Model<double> first(kind.config);
      first.init(3, 0.3);
      auto tc = trainer_config(N);
      tc.checkpoint_path = path;
      train::Trainer<double> t1(first, clean_source(), tc);
      t1.run(N / 2);
      nn::Model<double> second(kind.config);
      second.init(77, 0.5);
      train::Trainer<double> t2(second, clean_source(), trainer_config(N));
      t2.resume(path);
      t2.run();
      CHECK(state_of(t2) == state_of(t0));
      CHECK(t0.skipped_steps().empty());
    }
  }
}

}  // namespace mesaopt_test_train_reliability
