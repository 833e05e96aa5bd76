// Data-parallel training under mpirun (docs/distributed.md), run by ctest as
// `mpirun -np R mpi_train DIR` for R = 1, 2, 4: every rank trains the same
// small models with TrainerConfig::process_group = MPI_COMM_WORLD; rank 0 also
// trains them alone (no group) and checks that every rank's losses, weights
// and Adam moments equal that reference bit for bit, for several shard counts
// and model kinds; then that a run stopped at half way, checkpointed by rank 0
// into DIR and resumed by every rank, ends equal to it too; then that a mesa
// breakdown in one rank's shard stops every rank with an error (no hang).
// Exit status 0 when all checks pass; a failed check ends the job with
// MPI_Abort and a message naming the rank and the check.
#include <mesaopt/distributed.hpp>
#include <mesaopt/nn.hpp>
#include <mesaopt/train.hpp>

#include "small_training.hpp"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

using namespace mesaopt;

namespace {

constexpr long kSeq = 6, kSequences = 16;

nn::ModelConfig model_config(nn::AttentionKind kind) { return test::small_model_config(kind); }

train::BatchSource<double> source() { return test::random_source<double>(kSequences, kSeq, 900); }

train::TrainerConfig trainer_config(long steps, long shards) { return test::small_trainer_config(steps, shards, 0); }

// A trainer's state as bytes: losses, parameters, Adam moments and step.
std::string state_bytes(const train::Trainer<double>& t) {
  std::string out;
  auto add = [&](const void* p, std::size_t n) { out.append(static_cast<const char*>(p), n); };
  add(t.loss_history().data(), t.loss_history().size() * sizeof(double));
  for (const auto& p : t.parameters()) add(p.value, p.size * sizeof(double));
  const auto& opt = t.optimizer();
  for (std::size_t k = 0; k < opt.params().size(); ++k) {
    add(opt.first_moment(k).data(), opt.first_moment(k).size() * sizeof(double));
    add(opt.second_moment(k).data(), opt.second_moment(k).size() * sizeof(double));
  }
  const long step = t.step();
  add(&step, sizeof step);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  distributed::Mpi mpi(argc, argv);
  distributed::MpiProcessGroup group;
  const bool root = group.rank() == 0;
  if (argc != 2) mpi.abort("mpi_train", "usage: mpi_train SCRATCH_DIR");
  const std::string dir = argv[1];
  int checks = 0;
  auto require = [&](bool ok, const std::string& what) {
    if (!ok) mpi.abort("mpi_train", "check failed: " + what);
    ++checks;
  };
  try {
    const long N = 4;
    for (nn::AttentionKind kind : {nn::AttentionKind::linear, nn::AttentionKind::mesa}) {
      for (long S : {3L, 4L, 8L}) {
        const std::string name = std::string(nn::attention_kind_name(kind)) + ", " + std::to_string(S) + " shards";
        nn::Model<double> model(model_config(kind));
        model.init(5, 0.3);
        auto tc = trainer_config(N, S);
        tc.process_group = &group;
        train::Trainer<double> t(model, source(), tc);
        t.run();
        const auto all = train::gather_strings(group, state_bytes(t));
        if (root) {
          nn::Model<double> alone(model_config(kind));
          alone.init(5, 0.3);
          train::Trainer<double> reference(alone, source(), trainer_config(N, S));
          reference.run();
          const std::string expected = state_bytes(reference);
          for (int r = 0; r < group.size(); ++r)
            require(all[std::size_t(r)] == expected, name + ": rank " + std::to_string(r) + " differs from one process");
        }
      }
    }

    // Checkpoint by rank 0 at half way, resumed by every rank.
    const std::string path = dir + "/mpi_train.safetensors";
    {
      nn::Model<double> model(model_config(nn::AttentionKind::linear));
      model.init(5, 0.3);
      auto tc = trainer_config(N, 4);
      tc.process_group = &group;
      tc.checkpoint_path = path;
      train::Trainer<double>(model, source(), tc).run(N / 2);
    }
    MPI_Barrier(MPI_COMM_WORLD);  // the file is complete before anyone reads it
    nn::Model<double> resumed(model_config(nn::AttentionKind::linear));
    resumed.init(77, 0.5);
    auto tc = trainer_config(N, 4);
    tc.process_group = &group;
    train::Trainer<double> t(resumed, source(), tc);
    t.resume(path);
    t.run();
    const auto all = train::gather_strings(group, state_bytes(t));
    if (root) {
      nn::Model<double> alone(model_config(nn::AttentionKind::linear));
      alone.init(5, 0.3);
      train::Trainer<double> reference(alone, source(), trainer_config(N, 4));
      reference.run();
      for (int r = 0; r < group.size(); ++r)
        require(all[std::size_t(r)] == state_bytes(reference),
                "resume: rank " + std::to_string(r) + " differs from one process");
    }

    // A breakdown in the last shard (on the last active rank): every rank throws.
    {
      nn::Model<double> model(model_config(nn::AttentionKind::mesa));
      model.init(5, 0.3);
      train::ShardedStep<double> step(model, 4, 1, &group);
      const train::ShardRange mine = train::rank_shards(4, group.size(), group.rank());
      require(step.local_shards().first == mine.first && step.local_shards().count == mine.count &&
                  (group.size() == 1 || mine.count < 4),
              "rank " + std::to_string(group.rank()) + " runs its own block of the shards");
      train::TrainBatch<double> b = source()(0);
      b.inputs((kSequences - 1) * kSeq + 2, 0) = std::numeric_limits<double>::infinity();
      std::string error;
      try {
        step.compute(b.inputs, b.targets, b.seq_len);
      } catch (const std::exception& e) {
        error = e.what();
      }
      require(!error.empty(), "a breakdown in shard 3 did not throw on rank " + std::to_string(group.rank()));
      const int owner = int(3 / train::shards_per_rank_block(4, group.size()));
      if (group.rank() != owner)  // the others name the shard and the rank that ran it
        require(error.find("shard 3 failed on rank " + std::to_string(owner)) != std::string::npos,
                "rank " + std::to_string(group.rank()) + "'s error names shard 3 and its rank: " + error);

      const train::TrainBatch<double> clean = source()(1);
      require(std::isfinite(step.compute(clean.inputs, clean.targets, clean.seq_len).loss),
              "a clean step after the error");
    }
  } catch (const std::exception& e) {
    mpi.abort("mpi_train", e.what());
  }
  if (root) std::printf("mpi_train: %d ranks, %d checks passed\n", group.size(), checks);
  return 0;
}
