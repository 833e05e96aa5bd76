// Data-parallel training across processes (train::ProcessGroup,
// train/process_group.hpp; docs/distributed.md), checked without MPI: the
// "ranks" here are threads of this process talking through an in-memory
// ProcessGroup (LocalGroup), so the placement of shards on ranks, the tree
// over ranks, the broadcast and the error agreement are tested on every
// machine. tests/mpi/ runs the same comparison under mpirun with MPI.
#include <catch2/catch.hpp>

#include <mesaopt/nn.hpp>
#include <mesaopt/train.hpp>

#include "scratch_files.hpp"
#include "small_training.hpp"
#include "test_util.hpp"
#include "trainer_state.hpp"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <fstream>
#include <functional>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

// Everything of this file lives in its own namespace, so that test files can be
// compiled together in one translation unit (tests/CMakeLists.txt, unity groups).
namespace mesaopt_test_process_group {

using namespace mesaopt;
using mesaopt::test::error_of;
using mesaopt::test::random_matrix;
using mesaopt::test::ScratchDir;
using mesaopt::test::state_of;
using mesaopt::test::TrainerState;

namespace {

// R ranks in one process: a mailbox per (from, to) pair of byte messages;
// broadcast and min_all are built from the same mailboxes (root sends to
// every rank; every rank sends to 0, which answers).
class LocalNetwork {
 public:
  explicit LocalNetwork(int ranks) : ranks_(ranks), boxes_(std::size_t(ranks * ranks)) {}
  int ranks() const { return ranks_; }
  void post(int from, int to, const void* data, std::size_t bytes) {
    Box& b = box(from, to);
    std::lock_guard<std::mutex> lock(b.mutex);
    const char* c = static_cast<const char*>(data);
    b.messages.emplace_back(c, c + bytes);
    b.ready.notify_all();
  }
  void take(int from, int to, void* data, std::size_t bytes) {
    Box& b = box(from, to);
    std::unique_lock<std::mutex> lock(b.mutex);
    b.ready.wait(lock, [&] { return !b.messages.empty(); });
    const std::vector<char> m = std::move(b.messages.front());
    b.messages.pop_front();
    if (m.size() != bytes) throw std::logic_error("LocalNetwork: message of another size");
    std::memcpy(data, m.data(), bytes);
  }

 private:
  struct Box {
    std::mutex mutex;
    std::condition_variable ready;
    std::deque<std::vector<char>> messages;
  };
  Box& box(int from, int to) { return boxes_[std::size_t(from * ranks_ + to)]; }
  int ranks_;
  std::vector<Box> boxes_;
};

class LocalGroup : public train::ProcessGroup {
 public:
  LocalGroup(LocalNetwork& net, int rank) : net_(net), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return net_.ranks(); }
  void send(int to, const void* data, std::size_t bytes) override { net_.post(rank_, to, data, bytes); }
  void receive(int from, void* data, std::size_t bytes) override { net_.take(from, rank_, data, bytes); }
  void broadcast(void* data, std::size_t bytes, int root) override {
    if (rank_ == root) {
      for (int r = 0; r < size(); ++r)
        if (r != root) send(r, data, bytes);
    } else {
      receive(root, data, bytes);
    }
  }
  long min_all(long value) override {
    long m = value;
    if (rank_ == 0) {
      for (int r = 1; r < size(); ++r) {
        long v = 0;
        receive(r, &v, sizeof v);
        m = std::min(m, v);
      }
    } else {
      send(0, &value, sizeof value);
    }
    broadcast(&m, sizeof m, 0);
    ++calls;
    return m;
  }
  long calls = 0;

 private:
  LocalNetwork& net_;
  int rank_;
};

// Runs body(rank, group) on R threads; rethrows the first exception after all ended.
void on_ranks(int R, const std::function<void(int, train::ProcessGroup&)>& body) {
  LocalNetwork net(R);
  std::vector<LocalGroup> groups;
  for (int r = 0; r < R; ++r) groups.emplace_back(net, r);
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(R));
  std::vector<std::thread> threads;
  for (int r = 0; r < R; ++r)
    threads.emplace_back([&, r] {
      try {
        body(r, groups[std::size_t(r)]);
      } catch (...) {
        errors[std::size_t(r)] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
}

bool file_exists(const std::string& path) { return std::ifstream(path).good(); }

constexpr long kSeq = 5;

nn::ModelConfig model_config(nn::AttentionKind kind) { return test::small_model_config(kind); }

train::BatchSource<double> source(long sequences) { return test::random_source<double>(sequences, kSeq, 700); }

train::TrainerConfig trainer_config(long steps, long shards, int threads) {
  return test::small_trainer_config(steps, shards, threads);
}

}  // namespace

TEST_CASE("Shards on ranks: aligned blocks of a power of two, every shard exactly once", "[train][distributed]") {
  CHECK(train::shards_per_rank_block(8, 1) == 8);
  CHECK(train::shards_per_rank_block(8, 2) == 4);
  CHECK(train::shards_per_rank_block(8, 3) == 4);  // 3 ranks: blocks of 4, rank 2 idle
  CHECK(train::shards_per_rank_block(5, 4) == 2);
  CHECK(train::active_ranks(8, 3) == 2);
  CHECK(train::active_ranks(5, 4) == 3);
  for (long S = 1; S <= 40; ++S) {
    for (int R = 1; R <= 9; ++R) {
      INFO("S = " << S << ", R = " << R);
      const long m = train::shards_per_rank_block(S, R);
      CHECK((m & (m - 1)) == 0);
      CHECK((S + m - 1) / m <= R);
      CHECK((m == 1 || (S + m / 2 - 1) / (m / 2) > R));  // the smallest such power of two
      std::vector<int> owner(std::size_t(S), -1);
      for (int r = 0; r < R; ++r) {
        const train::ShardRange g = train::rank_shards(S, R, r);
        if (g.count == 0) continue;
        CHECK(g.first % m == 0);
        for (long s = g.first; s < g.first + g.count; ++s) {
          CHECK(owner[std::size_t(s)] == -1);
          owner[std::size_t(s)] = r;
        }
      }
      CHECK(std::count(owner.begin(), owner.end(), -1) == 0);
    }
  }
  CHECK_THAT(error_of([] { train::rank_shards(4, 2, 2); }), Catch::Contains("rank = 2"));
  CHECK_THAT(error_of([] { train::shards_per_rank_block(0, 2); }), Catch::Contains("shards"));
}

TEST_CASE("gather_strings and broadcast_string move text between ranks", "[train][distributed]") {
  on_ranks(3, [](int r, train::ProcessGroup& g) {
    const std::string mine = r == 1 ? std::string() : "rank " + std::to_string(r) + std::string(100 * r, 'x');
    const auto all = train::gather_strings(g, mine, 0);
    if (r == 0) {
      REQUIRE(all.size() == 3);
      CHECK(all[0] == "rank 0");
      CHECK(all[1].empty());
      CHECK(all[2] == "rank 2" + std::string(200, 'x'));
    } else {
      CHECK(all.empty());
    }
    CHECK(train::broadcast_string(g, r == 0 ? "from the root" : "ignored") == "from the root");
  });
}

TEST_CASE("Data-parallel training over 1-4 ranks is bit-identical to one process at the same shard count",
          "[train][distributed]") {
  const long sequences = 12, N = 4;
  for (const auto& name_kind : {std::pair<const char*, nn::AttentionKind>{"linear", nn::AttentionKind::linear},
                                {"softmax", nn::AttentionKind::softmax},
                                {"mesa", nn::AttentionKind::mesa}}) {
    // Not a structured binding: C++17 does not let the lambda below capture one (clang refuses).
    const char* name = name_kind.first;
    const nn::AttentionKind kind = name_kind.second;
    for (long S : {2L, 3L, 5L, 8L}) {
      DYNAMIC_SECTION(name << ", " << S << " shards") {
        nn::Model<double> alone(model_config(kind));
        alone.init(9, 0.3);
        train::Trainer<double> reference(alone, source(sequences), trainer_config(N, S, 2));
        reference.run();
        const TrainerState expected = state_of(reference);
        for (int R : {1, 2, 3, 4}) {
          for (int threads : {1, 2}) {
            INFO(R << " ranks x " << threads << " threads");
            std::vector<TrainerState> states(static_cast<std::size_t>(R));
            on_ranks(R, [&](int r, train::ProcessGroup& g) {
              nn::Model<double> model(model_config(kind));
              model.init(9, 0.3);
              auto tc = trainer_config(N, S, threads);
              tc.process_group = &g;
              train::Trainer<double> t(model, source(sequences), tc);
              t.run();
              states[std::size_t(r)] = state_of(t);
            });
            for (int r = 0; r < R; ++r) CHECK(states[std::size_t(r)] == expected);
          }
        }
      }
    }
  }
  SECTION("the control: another shard count differs (so the comparison can fail)") {
    nn::Model<double> a(model_config(nn::AttentionKind::linear)), b(model_config(nn::AttentionKind::linear));
    a.init(9, 0.3);
    b.init(9, 0.3);
    train::Trainer<double> ta(a, source(sequences), trainer_config(N, 3, 1));
    train::Trainer<double> tb(b, source(sequences), trainer_config(N, 4, 1));
    ta.run();
    tb.run();
    CHECK_FALSE(state_of(ta) == state_of(tb));
  }
}

TEST_CASE("Data-parallel: a failing shard stops every rank, and only rank 0 writes checkpoints",
          "[train][distributed]") {
  SECTION("a mesa breakdown in a shard of rank 1: rank 1 reports it, rank 0 names the shard and the rank") {
    // 4 shards on 2 ranks: rank 1 runs shards 2-3 (sequences 6-11 of 12).
    std::vector<std::string> errors(2);
    on_ranks(2, [&](int r, train::ProcessGroup& g) {
      nn::Model<double> model(model_config(nn::AttentionKind::mesa));
      model.init(9, 0.3);
      train::ShardedStep<double> step(model, 4, 1, &g);
      CHECK(step.local_shards().first == 2 * r);
      CHECK(step.local_shards().count == 2);
      train::TrainBatch<double> b = source(12)(0);
      b.inputs(9 * kSeq + 1, 0) = std::numeric_limits<double>::infinity();  // sequence 9: shard 3
      errors[std::size_t(r)] = error_of([&] { step.compute(b.inputs, b.targets, b.seq_len); });
      // Both ranks got past the error and can still talk: a clean step works.
      const train::TrainBatch<double> clean = source(12)(1);
      CHECK(std::isfinite(step.compute(clean.inputs, clean.targets, clean.seq_len).loss));
    });
    INFO(errors[0] << "\n" << errors[1]);
    CHECK_THAT(errors[0], Catch::Contains("shard 3 failed on rank 1"));
    CHECK_THAT(errors[1], Catch::Contains("sequence b = ") && !Catch::Contains("failed on rank"));
  }
  SECTION("checkpoints: rank 0 writes, every rank resumes from its file and goes on as one process would") {
    ScratchDir dir;
    const std::string path = dir.path + "/ranks.safetensors";
    const long N = 4, S = 4;
    nn::Model<double> alone(model_config(nn::AttentionKind::linear));
    alone.init(9, 0.3);
    train::Trainer<double> reference(alone, source(8), trainer_config(N, S, 1));
    reference.run();
    std::vector<TrainerState> states(2);
    on_ranks(2, [&](int r, train::ProcessGroup& g) {
      nn::Model<double> model(model_config(nn::AttentionKind::linear));
      model.init(9, 0.3);
      auto tc = trainer_config(N, S, 1);
      tc.process_group = &g;
      if (r == 1) tc.checkpoint_path = dir.path + "/rank1.safetensors";  // would be written by a root
      else tc.checkpoint_path = path;
      train::Trainer<double> t(model, source(8), tc);
      t.run(N / 2);
    });
    CHECK(file_exists(path));
    CHECK_FALSE(file_exists(dir.path + "/rank1.safetensors"));
    on_ranks(2, [&](int r, train::ProcessGroup& g) {
      nn::Model<double> model(model_config(nn::AttentionKind::linear));
      model.init(1234, 0.5);  // overwritten by the resume
      auto tc = trainer_config(N, S, 1);
      tc.process_group = &g;
      train::Trainer<double> t(model, source(8), tc);
      t.resume(path);
      t.run();
      states[std::size_t(r)] = state_of(t);
    });
    CHECK(states[0] == state_of(reference));
    CHECK(states[1] == state_of(reference));
  }
}

}  // namespace mesaopt_test_process_group
