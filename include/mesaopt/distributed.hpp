#pragma once
// mesaopt's MPI support (docs/distributed.md), kept out of the core headers so
// that the core needs no MPI: include this header and link the CMake target
// mesaopt::distributed (mesaopt::mesaopt plus MPI's include and link settings;
// it exists when mesaopt was configured with MESAOPT_WITH_MPI, ON when MPI is
// found).
//
//   distributed::Mpi mpi(argc, argv);           // MPI_Init_thread ... MPI_Finalize
//   distributed::MpiProcessGroup group;         // MPI_COMM_WORLD
//   train::TrainerConfig tc;  tc.process_group = &group;   // data-parallel steps
//
// Every rank runs the same program on the same batches; TrainerConfig's
// shards are spread over the ranks and summed in the same fixed tree as in
// one process, so a run is bit-identical for any number of ranks at the same
// shard count (train/process_group.hpp). A rank that throws must end the job:
// the others would wait for it forever. Mpi::abort prints the message with the
// rank and calls MPI_Abort, which makes mpirun stop every rank.
#include <mesaopt/common/check.hpp>
#include <mesaopt/train/process_group.hpp>

#include <mpi.h>

#include <climits>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace mesaopt::distributed {

namespace detail {

// MPI calls return an error code; MPI_COMM_WORLD's default handler aborts
// before that, but a communicator set to MPI_ERRORS_RETURN would not.
inline void check_mpi(int code, const char* what) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  throw std::runtime_error(std::string("mesaopt::distributed: ") + what + " failed: " + std::string(text, length));
}

// MPI counts are ints: byte buffers larger than INT_MAX go in pieces.
constexpr std::size_t kMaxChunk = std::size_t(1) << 30;

}  // namespace detail

// Initialises MPI for the lifetime of the object (threads: MPI_THREAD_FUNNELED,
// only the thread that made it calls MPI) and finalises it. If MPI is already
// initialised (by the caller) it leaves both to the caller.
class Mpi {
 public:
  Mpi(int& argc, char**& argv) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
      int provided = 0;
      detail::check_mpi(MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
      owns_ = true;
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
  }
  ~Mpi() {
    if (!owns_) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  }
  Mpi(const Mpi&) = delete;
  Mpi& operator=(const Mpi&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }

  // Ends the whole job: "<program>: rank r of R: <message>" on stderr, then
  // MPI_Abort(MPI_COMM_WORLD, code). Never returns.
  [[noreturn]] void abort(const std::string& program, const std::string& message, int code = 1) const {
    std::fprintf(stderr, "%s: rank %d of %d: %s\n", program.c_str(), rank_, size_, message.c_str());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code);
    std::abort();  // MPI_Abort does not return; this satisfies [[noreturn]]
  }

 private:
  bool owns_ = false;
  int rank_ = 0, size_ = 1;
};

// train::ProcessGroup over an MPI communicator (MPI_COMM_WORLD by default;
// not owned). Blocking point-to-point messages, MPI_Bcast and MPI_Allreduce.
class MpiProcessGroup : public train::ProcessGroup {
 public:
  explicit MpiProcessGroup(MPI_Comm comm = MPI_COMM_WORLD) : comm_(comm) {
    detail::check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    detail::check_mpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  MPI_Comm communicator() const { return comm_; }

  void send(int to, const void* data, std::size_t bytes) override {
    check_rank("send", to);
    const char* p = static_cast<const char*>(data);
    do {
      const std::size_t n = bytes < detail::kMaxChunk ? bytes : detail::kMaxChunk;
      detail::check_mpi(MPI_Send(p, int(n), MPI_BYTE, to, kTag, comm_), "MPI_Send");
      p += n;
      bytes -= n;
    } while (bytes > 0);
  }
  void receive(int from, void* data, std::size_t bytes) override {
    check_rank("receive", from);
    char* p = static_cast<char*>(data);
    do {
      const std::size_t n = bytes < detail::kMaxChunk ? bytes : detail::kMaxChunk;
      MPI_Status status;
      detail::check_mpi(MPI_Recv(p, int(n), MPI_BYTE, from, kTag, comm_, &status), "MPI_Recv");
      int got = 0;
      MPI_Get_count(&status, MPI_BYTE, &got);
      if (std::size_t(got) != n)
        throw std::runtime_error("mesaopt::distributed: rank " + std::to_string(rank_) + " expected " +
                                 std::to_string(n) + " bytes from rank " + std::to_string(from) + ", got " +
                                 std::to_string(got) + " (the ranks disagree on the model or the batch)");
      p += n;
      bytes -= n;
    } while (bytes > 0);
  }
  void broadcast(void* data, std::size_t bytes, int root) override {
    check_rank("broadcast", root);
    char* p = static_cast<char*>(data);
    do {
      const std::size_t n = bytes < detail::kMaxChunk ? bytes : detail::kMaxChunk;
      detail::check_mpi(MPI_Bcast(p, int(n), MPI_BYTE, root, comm_), "MPI_Bcast");
      p += n;
      bytes -= n;
    } while (bytes > 0);
  }
  long min_all(long value) override {
    long out = 0;
    detail::check_mpi(MPI_Allreduce(&value, &out, 1, MPI_LONG, MPI_MIN, comm_), "MPI_Allreduce");
    return out;
  }

 private:
  static constexpr int kTag = 7301;
  void check_rank(const char* what, int r) const {
    if (r < 0 || r >= size_)
      mesaopt::detail::fail("MpiProcessGroup", what, ": rank ", r, " is outside [0, ", size_, ")");
  }
  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
};

}  // namespace mesaopt::distributed
