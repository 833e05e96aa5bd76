#pragma once
// train::ProcessGroup: what training needs from a group of processes (ranks)
// that train one model together, data-parallel (docs/distributed.md). The
// core library knows only this interface and so needs no MPI; MPI's
// implementation is distributed::MpiProcessGroup (mesaopt/distributed.hpp).
//
// How a sharded step is spread (train::rank_shards): the S shards of a step
// are cut into blocks of m shards, m the smallest power of two with
// ceil(S / m) <= R (R ranks), and rank r runs block r, shards
// [r m, min((r + 1) m, S)). Because a block starts at a multiple of m, the
// fixed pairwise tree over shard indices (train::ShardedStep) splits into a
// local tree over each rank's block and the same pairwise tree over the
// ranks' partial sums (rank r adds rank r + 2^k's at level k): the sum, and so
// every loss and parameter of a run, is bit-identical for any rank count and
// any thread count per rank at the same shard count. With R not a power of two
// the ranks from ceil(S / m) on have no shards and only take part in the
// broadcast; with one shard every rank computes the whole step itself.
#include <mesaopt/common/check.hpp>

#include <cstddef>
#include <cstring>
#include <string>
#include <vector>

namespace mesaopt::train {

class ProcessGroup {
 public:
  virtual ~ProcessGroup() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Blocking transfer of `bytes` bytes to / from another rank; a receive
  // matches the sender's sends in order.
  virtual void send(int to, const void* data, std::size_t bytes) = 0;
  virtual void receive(int from, void* data, std::size_t bytes) = 0;
  // root's `bytes` bytes at `data` to every rank.
  virtual void broadcast(void* data, std::size_t bytes, int root) = 0;
  // The minimum of `value` over all ranks, on every rank: how ranks agree on
  // an error (the lowest failing shard) before any of them waits on another.
  virtual long min_all(long value) = 0;
};

// The shards one rank runs in a step (see the header comment).
struct ShardRange {
  long first = 0;  // global index of its first shard
  long count = 0;  // 0: this rank has no shard this step
};

// m: shards per rank block, the smallest power of two with ceil(S / m) <= R.
inline long shards_per_rank_block(long shards, int ranks) {
  detail::check_positive_size("shards_per_rank_block", "shards", shards);
  detail::check_positive_size("shards_per_rank_block", "ranks", ranks);
  long m = 1;
  while ((shards + m - 1) / m > ranks) m *= 2;
  return m;
}

inline ShardRange rank_shards(long shards, int ranks, int rank) {
  if (rank < 0 || rank >= ranks)
    detail::fail("rank_shards", "rank = ", rank, " is outside [0, ranks = ", ranks, ")");
  const long m = shards_per_rank_block(shards, ranks);
  const long first = long(rank) * m;
  if (first >= shards) return {shards, 0};
  return {first, (first + m < shards ? first + m : shards) - first};
}

// Ranks that hold shards: ceil(S / m).
inline int active_ranks(long shards, int ranks) {
  const long m = shards_per_rank_block(shards, ranks);
  return int((shards + m - 1) / m);
}

// Every rank's `text` at rank `root`, in rank order (empty elsewhere): how a
// program collects results computed on other ranks (e.g. a seed sweep).
inline std::vector<std::string> gather_strings(ProcessGroup& group, const std::string& text, int root = 0) {
  std::vector<std::string> out;
  if (group.rank() != root) {
    const unsigned long long n = text.size();
    group.send(root, &n, sizeof n);
    if (n > 0) group.send(root, text.data(), text.size());
    return out;
  }
  out.resize(std::size_t(group.size()));
  for (int r = 0; r < group.size(); ++r) {
    if (r == root) {
      out[std::size_t(r)] = text;
      continue;
    }
    unsigned long long n = 0;
    group.receive(r, &n, sizeof n);
    out[std::size_t(r)].resize(std::size_t(n));
    if (n > 0) group.receive(r, &out[std::size_t(r)][0], std::size_t(n));
  }
  return out;
}

// root's `text` on every rank.
inline std::string broadcast_string(ProcessGroup& group, const std::string& text, int root = 0) {
  unsigned long long n = text.size();
  group.broadcast(&n, sizeof n, root);
  std::string out = group.rank() == root ? text : std::string(std::size_t(n), '\0');
  if (n > 0) group.broadcast(&out[0], std::size_t(n), root);
  return out;
}

}  // namespace mesaopt::train
