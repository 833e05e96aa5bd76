// Data-parallel training across MPI ranks (docs/distributed.md), measured:
//
//   mpirun -np R bench_distributed [--batch B] [--steps N] [--threads N] [--models LIST]
//
// For each of the paper's constructed-token models (paper_models.hpp), every
// rank runs a Trainer with TrainerConfig::process_group = MPI_COMM_WORLD and
// automatic shards: after 2 warm-up steps, N timed steps; rank 0 prints the
// global tokens/s, the step time, and the time of the step's communication
// measured on its own: the reduction of the packed gradient (loss sums +
// parameters) through the ranks' tree and its broadcast, repeated on a buffer
// of the same size. A plain MPI program rather than a Google Benchmark binary:
// every rank must take part in every timed step. Built only with MPI.
#include <mesaopt/distributed.hpp>
#include <mesaopt/nn.hpp>
#include <mesaopt/tasks.hpp>
#include <mesaopt/train.hpp>

#include "paper_models.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

using namespace mesaopt;
using namespace mesaopt::bench;

struct Named {
  const char* name;
  Spec spec;
};
const Named kModels[] = {{"linear-1L", kSpecs[0]}, {"linear-2L", kSpecs[1]}, {"linear-4L", kSpecs[2]},
                         {"linear-6L", kSpecs[3]}, {"softmax-1L", kSpecs[4]}, {"mesa-1L", kSpecs[5]}};

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// The communication of one data-parallel step on `bytes` bytes: the tree over
// the active ranks (as ShardedStep runs it) and the broadcast from rank 0.
double time_exchange(train::ProcessGroup& g, long shards, std::size_t bytes, int repeats) {
  std::vector<char> buffer(bytes, 1), other(bytes);
  const int R = g.size(), r = g.rank(), active = train::active_ranks(shards, R);
  MPI_Barrier(MPI_COMM_WORLD);
  const double start = now();
  for (int k = 0; k < repeats; ++k) {
    if (r < active) {
      for (int stride = 1; stride < active; stride *= 2) {
        if (r % (2 * stride) == 0) {
          if (r + stride < active) g.receive(r + stride, other.data(), bytes);
        } else {
          g.send(r - stride, buffer.data(), bytes);
          break;
        }
      }
    }
    g.broadcast(buffer.data(), bytes, 0);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  return (now() - start) / repeats;
}

}  // namespace

int main(int argc, char** argv) {
  distributed::Mpi mpi(argc, argv);
  distributed::MpiProcessGroup group;
  long batch = 256, steps = 10;
  int threads = 1;
  std::vector<std::string> models = {"linear-2L", "linear-6L", "mesa-1L"};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) mpi.abort("bench_distributed", a + " needs a value");
    const std::string v = argv[++i];
    if (a == "--batch") batch = std::atol(v.c_str());
    else if (a == "--steps") steps = std::atol(v.c_str());
    else if (a == "--threads") threads = std::atoi(v.c_str());
    else if (a == "--models") {
      models.clear();
      for (std::size_t p = 0; p <= v.size();) {
        const std::size_t q = std::min(v.find(',', p), v.size());
        models.push_back(v.substr(p, q - p));
        p = q + 1;
      }
    } else {
      mpi.abort("bench_distributed", "unknown option " + a);
    }
  }
  if (batch < 1 || steps < 1 || threads < 1) mpi.abort("bench_distributed", "--batch, --steps, --threads must be >= 1");
  const bool root = group.rank() == 0;
  if (root)
    std::printf("%-11s %5s %7s %6s %7s %12s %10s %10s %12s %9s\n", "model", "ranks", "threads", "batch", "shards",
                "tokens/s", "step_ms", "comm_ms", "comm_bytes", "params");
  try {
    for (const std::string& name : models) {
      const Named* m = nullptr;
      for (const Named& k : kModels)
        if (name == k.name) m = &k;
      if (m == nullptr) mpi.abort("bench_distributed", "unknown model " + name);
      const nn::ModelConfig mc = model_config(m->spec, 1);
      nn::Model<float> model(mc);
      model.init(1, 0.0002);
      tasks::DynamicsConfig dc;
      const auto source = [&](long s) {
        const auto db = tasks::make_dynamics_batch<float>(dc, batch, 1, std::uint64_t(s) * std::uint64_t(batch), 1);
        train::TrainBatch<float> tb;
        tb.inputs = tasks::constructed_tokens<float>(db);
        tb.targets = db.targets;
        tb.seq_len = db.seq_len;
        return tb;
      };
      train::TrainerConfig tc;
      tc.steps = steps + 2;
      tc.adam = train::adamw_config(0.1);
      tc.schedule = train::constant_schedule(1e-4);
      tc.clip_value = 1.0;
      tc.threads = threads;
      tc.progress = false;
      tc.process_group = &group;
      train::Trainer<float> trainer(model, source, tc);
      trainer.run(2);
      MPI_Barrier(MPI_COMM_WORLD);
      const double start = now();
      trainer.run();
      MPI_Barrier(MPI_COMM_WORLD);
      const double seconds = now() - start;
      long params = 0;
      for (const auto& p : model.parameters()) params += long(p.size);
      const std::size_t bytes = sizeof(double) + sizeof(long) + std::size_t(kT) * sizeof(double) +
                                std::size_t(params) * sizeof(float);
      const double comm = group.size() > 1 ? time_exchange(group, trainer.shards(), bytes, 50) : 0.0;
      if (root)
        std::printf("%-11s %5d %7d %6ld %7ld %12.0f %10.2f %10.3f %12zu %9ld\n", name.c_str(), group.size(), threads,
                    batch, trainer.shards(), double(steps * batch * kT) / seconds, 1e3 * seconds / double(steps),
                    1e3 * comm, bytes, params);
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    mpi.abort("bench_distributed", e.what());
  }
  return 0;
}
