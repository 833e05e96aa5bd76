// detail::ordered_pipeline (common/parallel.hpp): the stage order it promises,
// results equal to the serial order for any thread count, the window bound,
// and which exception it rethrows.
#include <atomic>
#include <chrono>
#include <catch2/catch.hpp>
#include <cstdint>
#include <mesaopt/common/parallel.hpp>
#include <mesaopt/common/worker_team.hpp>
#include <stdexcept>
#include <string>
#include <utility>
#include <thread>
#include <vector>

namespace mesaopt_test_parallel {

using mesaopt::detail::ordered_pipeline;

// Many short pipelines with tiny stages: the shape that made LLVM's libomp
// (before 19) corrupt its allocator when the pipeline waited with `taskwait
// depend` (LLVM issue 85963; docs/building.md, "OpenMP"). Built with clang 14
// and the sanitizers, that form failed 7 of 10 runs of this test (aborts in
// libomp, and stages out of their order). Every pipeline checks the stage
// order, the window, and that its outputs are those of the serial order. 1000
// pipelines per thread count: at 4000, LeakSanitizer reports a block lost
// inside libomp (docs/building.md, "OpenMP").
TEST_CASE("ordered_pipeline: stage order, window and results of the serial order over many pipelines",
          "[parallel]") {
  for (int threads : {2, 3}) {
    long wrong_order = 0, wrong_value = 0;
    for (long rep = 0; rep < 1000; ++rep) {
      const std::ptrdiff_t n = 1 + rep % 40, window = 1 + rep % 4;
      // Per item: 1 after pre, 2 after seq, 3 after post.
      std::vector<std::atomic<int>> stage(static_cast<std::size_t>(n));
      for (auto& s : stage) s.store(0);
      std::vector<std::uint64_t> a(static_cast<std::size_t>(n)), b(a.size()), c(a.size());  // unsigned: wraps
      std::atomic<long> bad{0};
      std::uint64_t carry = 1;
      ordered_pipeline(
          n, threads, window,
          [&](std::ptrdiff_t i) {
            const std::size_t u = static_cast<std::size_t>(i);
            if (stage[u].load() != 0) ++bad;
            if (i >= window && stage[u - static_cast<std::size_t>(window)].load() != 3) ++bad;  // the window
            a[u] = std::uint64_t(3 * i + 1);
            stage[u].store(1);
          },
          [&](std::ptrdiff_t i) {
            const std::size_t u = static_cast<std::size_t>(i);
            if (stage[u].load() != 1 || (i > 0 && stage[u - 1].load() < 2)) ++bad;
            carry = carry * 7 + a[u];
            b[u] = carry;
            stage[u].store(2);
          },
          [&](std::ptrdiff_t i) {
            const std::size_t u = static_cast<std::size_t>(i);
            if (stage[u].load() != 2) ++bad;
            c[u] = b[u] + std::uint64_t(i);
            stage[u].store(3);
          });
      wrong_order += bad.load();
      std::uint64_t ref = 1;
      for (std::ptrdiff_t i = 0; i < n; ++i) {
        const std::size_t u = static_cast<std::size_t>(i);
        ref = ref * 7 + std::uint64_t(3 * i + 1);
        if (c[u] != ref + std::uint64_t(i) || stage[u].load() != 3) ++wrong_value;
      }
    }
    INFO("threads=" << threads);
    CHECK(wrong_order == 0);
    CHECK(wrong_value == 0);
  }
}

// The exception the serial order would throw first is rethrown, and no seq or
// post runs for an item after a failed pre or seq.
TEST_CASE("ordered_pipeline rethrows the serial order's first exception", "[parallel]") {
  struct Case {
    const char* fail;                                      // the case, in words
    std::vector<std::pair<char, std::ptrdiff_t>> throws;  // (stage p/s/q for pre/seq/post, item)
    std::string expected;                                  // the stage and item whose exception comes out
    std::ptrdiff_t last_seq;  // the highest item whose seq may complete
  };
  const std::ptrdiff_t n = 12;
  const std::vector<Case> cases = {
      {"pre 5", {{'p', 5}}, "p5", 4},
      {"seq 5", {{'s', 5}}, "s5", 4},
      {"post 5", {{'q', 5}}, "q5", n - 1},
      {"post 3 before pre 6", {{'q', 3}, {'p', 6}}, "q3", 5},
      {"pre 6 before post 7", {{'p', 6}, {'q', 7}}, "p6", 5},
      {"seq 4 before pre 4's successor 5", {{'s', 4}, {'p', 5}}, "s4", 3},
      {"pre 0", {{'p', 0}}, "p0", -1},
  };
  for (const Case& cs : cases) {
    for (int threads : {1, 2, 3}) {
      INFO(cs.fail << ", threads=" << threads);
      const auto maybe_throw = [&](char stage, std::ptrdiff_t i) {
        for (const auto& t : cs.throws)
          if (t.first == stage && t.second == i) throw std::runtime_error(std::string(1, stage) + std::to_string(i));
      };
      std::vector<std::atomic<int>> seq_done(static_cast<std::size_t>(n)), post_ran(static_cast<std::size_t>(n));
      for (std::size_t u = 0; u < std::size_t(n); ++u) seq_done[u].store(0), post_ran[u].store(0);
      std::string caught;
      try {
        ordered_pipeline(
            n, threads, 3, [&](std::ptrdiff_t i) { maybe_throw('p', i); },
            [&](std::ptrdiff_t i) {
              maybe_throw('s', i);
              seq_done[static_cast<std::size_t>(i)].store(1);
            },
            [&](std::ptrdiff_t i) {
              post_ran[static_cast<std::size_t>(i)].store(1);
              maybe_throw('q', i);
            });
      } catch (const std::runtime_error& e) {
        caught = e.what();
      }
      CHECK(caught == cs.expected);
      for (std::ptrdiff_t i = 0; i < n; ++i) {
        const std::size_t u = static_cast<std::size_t>(i);
        INFO("item " << i);
        if (i > cs.last_seq) {
          CHECK(seq_done[u].load() == 0);
          CHECK(post_ran[u].load() == 0);
        } else if (threads > 1) {
          // Items before the failure run to the end (the serial order stops at
          // the first exception, so it is checked only with threads).
          CHECK(seq_done[u].load() == 1);
          CHECK(post_ran[u].load() == 1);
        }
      }
    }
  }
}

}  // namespace mesaopt_test_parallel

TEST_CASE("WorkerTeam runs every item once, on members in range, over many calls", "[parallel][worker_team]") {
  for (int size : {1, 2, 3, 5}) {
    mesaopt::WorkerTeam team(size);
    CHECK(team.size() == size);
    for (std::ptrdiff_t n : {0, 1, 2, 3, 7, 64, 1000}) {
      for (int call = 0; call < 20; ++call) {
        std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
        for (auto& h : hits) h = 0;
        std::vector<long> value(static_cast<std::size_t>(n), -1);  // plain writes, read after run returns
        std::atomic<int> bad_worker{0};
        team.run(n, [&](std::ptrdiff_t i, int worker) {
          if (worker < 0 || worker >= size) ++bad_worker;
          ++hits[static_cast<std::size_t>(i)];
          value[static_cast<std::size_t>(i)] = long(i) * 3 + call;
        });
        INFO("size = " << size << ", n = " << n << ", call = " << call);
        CHECK(bad_worker == 0);
        int wrong = 0;
        for (std::ptrdiff_t i = 0; i < n; ++i)
          if (hits[static_cast<std::size_t>(i)] != 1 || value[static_cast<std::size_t>(i)] != long(i) * 3 + call) ++wrong;
        CHECK(wrong == 0);
      }
    }
  }
}

TEST_CASE("WorkerTeam uses its helpers", "[parallel][worker_team]") {
  // Two items that each wait (up to 30 s) until both have started: both
  // members must hold one at the same time.
  mesaopt::WorkerTeam team(2);
  std::atomic<int> started{0};
  std::atomic<int> mask{0};
  team.run(2, [&](std::ptrdiff_t, int worker) {
    mask |= 1 << worker;
    ++started;
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (started < 2 && std::chrono::steady_clock::now() < give_up) std::this_thread::yield();
  });
  CHECK(started == 2);
  CHECK(mask == 3);
}
