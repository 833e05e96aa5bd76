#pragma once
// The processes an example runs on (docs/distributed.md): one, or mpirun's
// ranks when mesaopt was built with MPI (MESAOPT_HAS_MPI, set by the
// mesaopt::distributed target). The examples run unchanged under
// `mpirun -np N`: rank 0 prints and writes every file; the others train with
// it (TrainerConfig::process_group = group()) or run seeds of their own, and
// their standard output goes to /dev/null. Without MPI this is one process
// and group() is nullptr.
#include <mesaopt/train/process_group.hpp>

#if defined(MESAOPT_HAS_MPI)
#include <mesaopt/distributed.hpp>
#endif

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

namespace mesaopt::examples {

class Ranks {
 public:
  Ranks(int& argc, char**& argv, std::string program) : program_(std::move(program)) {
#if defined(MESAOPT_HAS_MPI)
    // MPI only when a launcher started this process: a plain run stays a
    // plain process (no MPI singleton start-up, and nothing of MPI's own
    // allocations at exit, which LeakSanitizer would report).
    if (!launched_by_mpi()) {
      (void)argc;
      (void)argv;
      return;
    }
    mpi_ = std::make_unique<distributed::Mpi>(argc, argv);
    if (mpi_->size() > 1) group_ = std::make_unique<distributed::MpiProcessGroup>();
    if (mpi_->rank() != 0 && std::freopen("/dev/null", "w", stdout) == nullptr) fail("cannot silence stdout");
#else
    (void)argc;
    (void)argv;
#endif
  }

  // Whether mpirun / mpiexec / srun started this process: the rank and size
  // variables the launchers of Open MPI, MPICH (Hydra) and PMIx set.
  static bool launched_by_mpi() {
    for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"})
      if (std::getenv(name) != nullptr) return true;
    return false;
  }

  int rank() const { return group_ ? group_->rank() : 0; }
  int size() const { return group_ ? group_->size() : 1; }
  bool root() const { return rank() == 0; }
  // The group for TrainerConfig::process_group and gather_strings; nullptr for one process.
  train::ProcessGroup* group() const { return group_.get(); }

  // Ends the program, and under mpirun the whole job: "<program>: <message>"
  // (with the rank under MPI) on stderr, exit status 1.
  [[noreturn]] void fail(const std::string& message) const {
#if defined(MESAOPT_HAS_MPI)
    if (mpi_ && mpi_->size() > 1) mpi_->abort(program_, message);
#endif
    std::fprintf(stderr, "%s: %s\n", program_.c_str(), message.c_str());
    std::exit(1);
  }

 private:
  std::string program_;
#if defined(MESAOPT_HAS_MPI)
  std::unique_ptr<distributed::Mpi> mpi_;
#endif
  std::unique_ptr<train::ProcessGroup> group_;
};

}  // namespace mesaopt::examples
