// What a call of WorkerTeam::run costs beyond its items (common/worker_team.hpp,
// the sharded training step's threads): 8 items of `item_us` microseconds of
// busy work each (the shards of a step), then `serial_us` of busy work on the
// calling thread alone (the step's reduction and optimiser), repeated.
//
// Counters (per call, wall clock):
//   overhead_us   the call's time minus the ideal one: 8 item_us / threads
//                 (items split evenly) + serial_us. With 2 threads it is the
//                 time lost to waking the helper and to waking the caller
//                 after the helper's last item (docs/training.md, "Waking the
//                 workers").
//
// Run:  ./build/benchmarks/bench_worker_team --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>
#include <mesaopt/common/worker_team.hpp>

#include <chrono>
#include <cstddef>

namespace {

using Clock = std::chrono::steady_clock;

// Busy work for `us` microseconds of wall time.
void busy_for(double us) {
  const auto end = Clock::now() + std::chrono::duration<double, std::micro>(us);
  while (Clock::now() < end) {
  }
}

void BM_WorkerTeamCall(benchmark::State& state) {
  const double item_us = double(state.range(0)), serial_us = double(state.range(1));
  const int threads = int(state.range(2));
  constexpr std::ptrdiff_t kItems = 8;
  mesaopt::WorkerTeam team(threads);
  const auto start = Clock::now();
  for (auto _ : state) {
    team.run(kItems, [&](std::ptrdiff_t, int) { busy_for(item_us); });
    busy_for(serial_us);
  }
  const double total_us = std::chrono::duration<double, std::micro>(Clock::now() - start).count();
  const double ideal_us = double(kItems) * item_us / threads + serial_us;
  state.counters["ideal_us"] = ideal_us;
  state.counters["overhead_us"] = state.iterations() > 0 ? total_us / double(state.iterations()) - ideal_us : 0.0;
}

}  // namespace

BENCHMARK(BM_WorkerTeamCall)->Name("worker_team_call")->ArgNames({"item_us", "serial_us", "threads"})
    ->ArgsProduct({{50, 200}, {0, 50, 500}, {1, 2}})->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_MAIN();
