// Sharded training steps (train::ShardedStep, TrainerConfig::shards and
// ::threads; docs/training.md, "Shards and threads"): the sharded gradient is
// the batch gradient (one shard: bit for bit; more: to rounding), a run is
// bit-identical for any thread count at a fixed shard count, exact resume
// holds, the checkpoint records the shard count, and bad configurations,
// batches and steps are reported as on the unsharded path.
#include <catch2/catch.hpp>

#include <mesaopt/nn.hpp>
#include <mesaopt/train.hpp>

#include "scratch_files.hpp"
#include "small_training.hpp"
#include "test_util.hpp"
#include "trainer_state.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// Everything of this file lives in its own namespace, so that test files can be
// compiled together in one translation unit (tests/CMakeLists.txt, unity groups).
namespace mesaopt_test_sharded_training {

using namespace mesaopt;
using mesaopt::test::error_of;
using mesaopt::test::random_matrix;
using mesaopt::test::ScratchDir;
using mesaopt::test::state_of;

namespace {

constexpr long kSeq = 5;

nn::ModelConfig model_config(nn::AttentionKind kind) { return test::small_model_config(kind); }

const std::vector<std::pair<const char*, nn::AttentionKind>> kKinds = {
    {"linear", nn::AttentionKind::linear}, {"softmax", nn::AttentionKind::softmax}, {"mesa", nn::AttentionKind::mesa}};

// Batch s of `sequences` sequences, drawn from seeds that depend only on s.
template <class T>
train::BatchSource<T> source(long sequences) {
  return test::random_source<T>(sequences, kSeq, 500);
}

train::TrainerConfig trainer_config(long steps, long shards, int threads) {
  return test::small_trainer_config(steps, shards, threads);
}

template <class T>
std::vector<T> gradients(const std::vector<ParameterView<T>>& params) {
  std::vector<T> out;
  for (const auto& p : params) out.insert(out.end(), p.grad, p.grad + p.size);
  return out;
}


}  // namespace

TEMPLATE_TEST_CASE("ShardedStep computes the batch's loss and gradient for any shard count", "[train][shards]",
                   float, double) {
  using T = TestType;
  const long sequences = 7;  // 3 shards: 2 + 2 + 3 sequences; 7 shards: one each
  // The shards' GEMMs have fewer rows than the whole batch's, and Eigen may
  // block them differently: in float the predictions then differ by rounding.
  const double tol = std::is_same<T, float>::value ? 2e-5 : 1e-13;
  const double loss_tol = std::is_same<T, float>::value ? 1e-6 : 1e-14;
  const train::TrainBatch<T> batch = source<T>(sequences)(0);
  for (const auto& [name, kind] : kKinds) {
    DYNAMIC_SECTION(name) {
      nn::Model<T> model(model_config(kind));
      model.init(11, 0.4);
      const auto params = model.parameters();
      // The unsharded computation, as the trainer does it with shards = 1.
      zero_grad(params);
      typename nn::Model<T>::Cache cache;
      const RowMatrix<T> pred = model.forward(batch.inputs, kSeq, cache);
      const train::MseLoss whole = train::mse_loss_forward<T>(pred, batch.targets, kSeq);
      RowMatrix<T> dpred(pred.rows(), pred.cols());
      train::mse_loss_backward<T>(pred, batch.targets, kSeq, dpred);
      model.backward(dpred, cache);
      const std::vector<T> g_whole = gradients(params);
      double g_scale = 0;
      for (T g : g_whole) g_scale = std::max(g_scale, std::abs(double(g)));
      REQUIRE(g_scale > 0);

      for (long shards : {1L, 2L, 3L, 7L}) {
        INFO("shards = " << shards);
        // Garbage in the master's gradients: compute must overwrite them.
        for (const auto& p : params) std::fill(p.grad, p.grad + p.size, T(1e3));
        train::ShardedStep<T> step(model, shards, 2);
        const train::MseLoss loss = step.compute(batch.inputs, batch.targets, kSeq);
        const std::vector<T> g = gradients(params);
        REQUIRE(g.size() == g_whole.size());
        REQUIRE(loss.per_position.size() == whole.per_position.size());
        if (shards == 1) {
          // One shard is the whole batch through a replica: the same bits.
          CHECK(loss.loss == whole.loss);
          CHECK(loss.per_position == whole.per_position);
          CHECK(g == g_whole);
        } else {
          CHECK(std::abs(loss.loss - whole.loss) <= loss_tol * whole.loss);
          for (std::size_t t = 0; t < loss.per_position.size(); ++t)
            CHECK(std::abs(loss.per_position[t] - whole.per_position[t]) <= loss_tol * whole.per_position[t]);
          double err = 0;
          for (std::size_t i = 0; i < g.size(); ++i) err = std::max(err, std::abs(double(g[i]) - double(g_whole[i])));
          CHECK(err <= tol * g_scale);
        }
      }
    }
  }
}

TEST_CASE("ShardedStep adds the shards' gradients in the pairwise tree over shard indices, bit for bit, on any thread count",
          "[train][shards]") {
  // The tree written out by hand for each shard count (docs/training.md,
  // "Shards and threads"), in float, where another order of the same sums
  // changes bits. Each shard's gradient is computed here as a worker's
  // replica computes it: the shard's rows through a one-thread model, the
  // whole batch's loss restricted to them (mse_loss_backward_part).
  using T = float;
  const long sequences = 7;
  const train::TrainBatch<T> batch = source<T>(sequences)(0);
  using G = std::vector<T>;
  auto add = [](const G& a, const G& b) {
    G c(a.size());
    for (std::size_t i = 0; i < a.size(); ++i) c[i] = a[i] + b[i];
    return c;
  };
  for (const auto& [name, kind] : kKinds) {
    DYNAMIC_SECTION(name) {
      nn::ModelConfig mc = model_config(kind);
      mc.num_threads = 1;
      nn::Model<T> model(mc);
      model.init(13, 0.4);
      const auto params = model.parameters();
      for (long shards : {3L, 5L, 6L, 7L}) {
        INFO("shards = " << shards);
        std::vector<G> g;
        for (long s = 0; s < shards; ++s) {
          const long b0 = train::shard_begin(s, shards, sequences), b1 = train::shard_begin(s + 1, shards, sequences);
          const auto x = batch.inputs.middleRows(b0 * kSeq, (b1 - b0) * kSeq);
          const auto y = batch.targets.middleRows(b0 * kSeq, (b1 - b0) * kSeq);
          zero_grad(params);
          typename nn::Model<T>::Cache cache;
          const RowMatrix<T> pred = model.forward(x, kSeq, cache);
          RowMatrix<T> dpred(pred.rows(), pred.cols());
          train::mse_loss_backward_part<T>(pred, y, kSeq, batch.inputs.rows(), dpred);
          model.backward(dpred, cache);
          g.push_back(gradients(params));
        }
        G tree;
        if (shards == 3) tree = add(add(g[0], g[1]), g[2]);
        if (shards == 5) tree = add(add(add(g[0], g[1]), add(g[2], g[3])), g[4]);
        if (shards == 6) tree = add(add(add(g[0], g[1]), add(g[2], g[3])), add(g[4], g[5]));
        if (shards == 7) tree = add(add(add(g[0], g[1]), add(g[2], g[3])), add(add(g[4], g[5]), g[6]));
        // The test can tell orders apart: left to right gives other bits.
        G left_to_right = g[0];
        for (long s = 1; s < shards; ++s) left_to_right = add(left_to_right, g[std::size_t(s)]);
        if (shards >= 5) CHECK_FALSE(left_to_right == tree);
        for (int threads : {1, 2, 3}) {
          INFO("threads = " << threads);
          for (const auto& p : params) std::fill(p.grad, p.grad + p.size, T(1e3));
          train::ShardedStep<T> step(model, shards, threads);
          for (int repeat = 0; repeat < 3; ++repeat) {  // nothing of a step's sums carries over to the next
            step.compute(batch.inputs, batch.targets, kSeq);
            CHECK(gradients(params) == tree);
          }
        }
      }
    }
  }
}

TEST_CASE("A sharded run is bit-identical for 1, 2 and 3 threads, and differs from another shard count only by rounding",
          "[train][shards]") {
  const long steps = 5, sequences = 8;
  for (const auto& [name, kind] : kKinds) {
    DYNAMIC_SECTION(name) {
      auto run = [&, kind = kind](long shards, int threads) {
        nn::Model<double> model(model_config(kind));
        model.init(5, 0.4);
        train::Trainer<double> t(model, source<double>(sequences), trainer_config(steps, shards, threads));
        t.run();
        return state_of(t);
      };
      const auto one = run(4, 1);
      CHECK(run(4, 2) == one);
      CHECK(run(4, 3) == one);
      // Another shard count is another (equally valid) order of the sums.
      const auto other = run(1, 2);
      CHECK_FALSE(other == one);
      REQUIRE(other.losses.size() == one.losses.size());
      const auto* a = reinterpret_cast<const double*>(one.losses.data());
      const auto* b = reinterpret_cast<const double*>(other.losses.data());
      for (long s = 0; s < steps; ++s) CHECK(std::abs(a[s] - b[s]) <= 1e-12 * std::abs(b[s]));
    }
  }
}

TEST_CASE("Parallel loops hand each item to one worker of the team, named by an index below the team size",
          "[train][shards]") {
  for (int threads : {1, 2, 3})
    for (long n : {0L, 1L, 2L, 7L}) {
      INFO("threads = " << threads << ", n = " << n);
      const int team = mesaopt::parallel_team_size(n, threads);
#if defined(_OPENMP)
      const long expected = n == 0 ? 0 : (threads > 1 && n > 1 ? std::min<long>(n, threads) : 1);
#else
      const long expected = n == 0 ? 0 : 1;
#endif
      CHECK(team == expected);
      std::vector<int> calls(std::size_t(n), 0), worker_of(std::size_t(n), -1);
      mesaopt::parallel_for_dynamic(n, threads, [&](std::ptrdiff_t i, int worker) {
        ++calls[std::size_t(i)];
        worker_of[std::size_t(i)] = worker;
      });
      for (long i = 0; i < n; ++i) {
        CHECK(calls[std::size_t(i)] == 1);
        CHECK(worker_of[std::size_t(i)] >= 0);
        CHECK(worker_of[std::size_t(i)] < team);
      }
    }
#if defined(_OPENMP)
  // A serial loop inside someone else's parallel region: worker 0, not the
  // enclosing thread's number.
  std::vector<int> seen(2, -1);
#pragma omp parallel num_threads(2)
  mesaopt::parallel_for_dynamic(1, 1, [&](std::ptrdiff_t, int worker) { seen[std::size_t(omp_get_thread_num())] = worker; });
  CHECK(seen[0] == 0);
  for (int w : seen) CHECK(w <= 0);
#endif
}

TEST_CASE("Automatic shards: at most 8 sequences each, fewer for large activations, as if given explicitly",
          "[train][shards]") {
  CHECK(train::auto_shard_count(1) == 1);
  CHECK(train::auto_shard_count(2) == 2);
  CHECK(train::auto_shard_count(7) == 7);
  CHECK(train::auto_shard_count(8) == 8);
  CHECK(train::auto_shard_count(64) == 8);
  // The paper's constructed-token models (width 40, 4 heads of size 20, T = 50):
  // 400 scalars per token and block, 40 more for the input.
  nn::ModelConfig paper;
  paper.input_dim = paper.width = 40;
  paper.output_dim = 10;
  paper.embed = false;
  nn::BlockConfig block;
  block.heads = 4;
  block.key_size = block.value_size = 20;
  for (long layers : {1L, 4L, 6L}) {
    paper.blocks.assign(std::size_t(layers), block);
    CHECK(train::activation_scalars_per_token(paper) == 40 + 400 * layers);
  }
  // linear-6L: 8 sequences of float are 3.9 MB > 3 MiB, 4 are not; in double 2.
  CHECK(train::auto_shard_count(64, 50, paper, 4) == 16);
  CHECK(train::auto_shard_count(64, 50, paper, 8) == 32);
  CHECK(train::auto_shard_count(256, 50, paper, 4) == 64);
  CHECK(train::auto_shard_count(5, 50, paper, 4) == 5);  // never fewer than min(B, 8), never more than B
  CHECK(train::auto_shard_count(1, 50, paper, 4) == 1);
  paper.blocks.assign(4, block);  // linear-4L: 8 sequences fit
  CHECK(train::auto_shard_count(64, 50, paper, 4) == 8);
  CHECK(train::auto_shard_count(256, 50, paper, 4) == 32);
  CHECK(train::auto_shard_count(3, 50, paper, 4) == 3);
  // A sequence over the budget on its own: one per shard.
  CHECK(train::auto_shard_count(20, 5000, paper, 4) == 20);
  const nn::ModelConfig mc = model_config(nn::AttentionKind::softmax);
  for (long sequences : {1L, 3L, 10L}) {
    INFO("B = " << sequences);
    nn::Model<double> a(mc), b(mc);
    a.init(9, 0.4);
    b.init(9, 0.4);
    train::Trainer<double> automatic(a, source<double>(sequences), trainer_config(3, 0, 2));
    CHECK(automatic.shards() == 0);  // chosen at the first batch
    automatic.run();
    const long expected = sequences == 1 ? 1 : std::min(sequences, 8L);
    CHECK(automatic.shards() == expected);
    train::Trainer<double> given(b, source<double>(sequences), trainer_config(3, expected, 1));
    given.run();
    CHECK(state_of(automatic) == state_of(given));
  }
  // Bad arguments are named.
  CHECK_THAT(error_of([&] { train::auto_shard_count(0, 50, mc, 4); }), Catch::Contains("sequences"));
  CHECK_THAT(error_of([&] { train::auto_shard_count(8, 0, mc, 4); }), Catch::Contains("seq_len"));
  CHECK_THAT(error_of([&] { train::auto_shard_count(8, 50, mc, -4); }), Catch::Contains("scalar_bytes"));
}

TEST_CASE("Sharded runs resume exactly, with any thread count, the checkpoint records the shard count",
          "[train][shards]") {
  const long N = 6, sequences = 6;
  ScratchDir dir;
  const std::string path = dir.path + "/ckpt.safetensors";
  const nn::ModelConfig mc = model_config(nn::AttentionKind::mesa);
  nn::Model<double> straight(mc);
  straight.init(3, 0.3);
  train::Trainer<double> t0(straight, source<double>(sequences), trainer_config(N, 3, 2));
  t0.run();

  nn::Model<double> first(mc);
  first.init(3, 0.3);
  auto tc = trainer_config(N, 3, 2);
  tc.checkpoint_path = path;
  train::Trainer<double> t1(first, source<double>(sequences), tc);
  t1.run(N / 2);
  CHECK(io::read_safetensors(path).metadata.at("trainer.shards") == "3");

  nn::Model<double> second(mc);
  second.init(77, 0.5);
  train::Trainer<double> t2(second, source<double>(sequences), trainer_config(N, 3, 1));  // threads are not recorded
  t2.resume(path);
  t2.run();
  CHECK(state_of(t2) == state_of(t0));

  SECTION("another shard count is refused, naming the entry") {
    nn::Model<double> other(mc);
    train::Trainer<double> t3(other, source<double>(sequences), trainer_config(N, 2, 1));
    const std::string e = error_of([&] { t3.resume(path); });
    CHECK_THAT(e, Catch::Contains("trainer.shards = 3") && Catch::Contains("trainer.shards = 2"));
    CHECK(t3.step() == 0);
  }
  SECTION("a checkpoint written before shards were recorded resumes with one shard only") {
    const io::SafetensorsFile f = io::read_safetensors(path);
    std::map<std::string, std::string> meta = f.metadata;
    meta.erase("trainer.shards");
    std::vector<io::SafetensorsTensorRef> refs;
    for (const auto& t : f.tensors) refs.push_back({t.name, t.dtype, t.shape, f.data(t)});
    const std::string old = dir.path + "/old.safetensors";
    io::write_safetensors(old, refs, meta);
    nn::Model<double> one_shard(mc);
    train::Trainer<double> t4(one_shard, source<double>(sequences), trainer_config(N, 1, 1));
    t4.resume(old);
    CHECK(t4.step() == N / 2);
    nn::Model<double> three_shards(mc);
    train::Trainer<double> t5(three_shards, source<double>(sequences), trainer_config(N, 3, 1));
    CHECK_THAT(error_of([&] { t5.resume(old); }), Catch::Contains("no \"trainer.shards\" entry"));
  }
}

TEST_CASE("Sharded steps: bad configurations, short batches and non-finite shards", "[train][shards]") {
  nn::Model<double> model(model_config(nn::AttentionKind::linear));
  model.init(1, 0.3);
  SECTION("shards must be >= 0 (0: automatic); a ShardedStep needs >= 1") {
    CHECK_THAT(error_of([&] { train::Trainer<double>(model, source<double>(4), trainer_config(3, -1, 1)); }),
               Catch::Contains("config.shards must be >= 0") && Catch::Contains("-1"));
    CHECK_THAT(error_of([&] { train::ShardedStep<double>(model, 0, 1); }), Catch::Contains("shards"));
  }
  SECTION("a batch with fewer sequences than shards") {
    train::Trainer<double> t(model, source<double>(2), trainer_config(3, 3, 2));
    const std::string e = error_of([&] { t.run(); });
    CHECK_THAT(e, Catch::Contains("2 sequences") && Catch::Contains("shards = 3"));
    CHECK(t.step() == 0);
  }
  SECTION("a NaN in one shard stops the step (policy stop) or skips it (policy skip)") {
    auto poisoned = [](long s) {
      train::TrainBatch<double> b = source<double>(6)(s);
      if (s == 1) b.inputs(4 * kSeq + 2, 1) = std::numeric_limits<double>::quiet_NaN();  // sequence 4: shard 2
      return b;
    };
    train::Trainer<double> stop(model, poisoned, trainer_config(3, 3, 2));
    try {
      stop.run();
      FAIL("no NonFiniteError");
    } catch (const train::NonFiniteError& e) {
      CHECK(e.step() == 1);
      CHECK(e.quantity() == "loss");
    }
    CHECK(stop.step() == 1);

    nn::Model<double> other(model_config(nn::AttentionKind::linear));
    other.init(1, 0.3);
    auto tc = trainer_config(3, 3, 2);
    tc.non_finite = train::NonFinitePolicy::skip;
    train::Trainer<double> skip(other, poisoned, tc);
    skip.run();
    CHECK(skip.skipped_steps() == std::vector<long>{1});
    CHECK(skip.optimizer().step_count() == 2);
  }
}

}  // namespace mesaopt_test_sharded_training
