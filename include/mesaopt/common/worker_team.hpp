#pragma once
// mesaopt::WorkerTeam: a fixed team of threads that sleep while they have no
// work, for the sharded training step (train/sharded_step.hpp): the caller and
// size() - 1 helper threads take items of a loop in index order, one at a
// time, and the call returns when every item is done.
//
// Why not an OpenMP region: GCC's libgomp lets a thread that waits (at the
// closing barrier of a region, and for the next region) spin for a while
// before it sleeps. Where another process holds one of the cores, the spinning
// thread takes CPU time from the one still running a shard, and the step
// waits for that shard: 2 threads trained linear-2L at 0.77-0.85x of 1 thread
// with a busy core (batch 64), against 0.95-0.97x with OMP_WAIT_POLICY=passive
// (docs/training.md, "A shared machine"). These threads wait on a condition
// variable and cost nothing while they wait.
//
// Waking a sleeping thread is not free on a virtual machine, though: the
// helper's idle core has to be woken too, and a step paid about 60 us of it
// (the helper starting its first item late, the caller waking after the
// helper's last one), 8 % of a 2-thread linear-1L step at batch 64. So a
// waiter first spins for a bounded time (kSpinMicroseconds, with the pause
// instruction) on the condition it waits for, and sleeps only if that did not
// come: the caller for the helpers' last items, a helper for the next call
// (the next step, when the caller's work between steps is short). A core
// taken by another process loses at most that spin per wait.
// Measurements: docs/training.md, "Waking the workers".
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace mesaopt {

class WorkerTeam {
 public:
  // size >= 1 threads in all: the calling thread and size - 1 helpers, started
  // here and joined in the destructor.
  explicit WorkerTeam(int size) {
    for (int w = 1; w < size; ++w) helpers_.emplace_back([this, w] { helper_loop(w); });
  }
  ~WorkerTeam() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    start_.notify_all();
    for (auto& t : helpers_) t.join();
  }
  WorkerTeam(const WorkerTeam&) = delete;
  WorkerTeam& operator=(const WorkerTeam&) = delete;

  int size() const { return int(helpers_.size()) + 1; }

  // How long a waiter spins before it sleeps.
  static constexpr std::chrono::microseconds kSpinMicroseconds{50};

  // Calls body(i, worker) for every i in [0, n): items go out in index order
  // to whichever member is free; worker in [0, size()) names the member (the
  // caller is 0). Returns when all are done; their writes are then visible to
  // the caller. body must not throw (catch inside it). One call at a time.
  template <class Body>
  void run(std::ptrdiff_t n, Body&& body) {
    if (n <= 0) return;
    using B = std::remove_reference_t<Body>;
    if (helpers_.empty() || n == 1) {
      for (std::ptrdiff_t i = 0; i < n; ++i) body(i, 0);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      context_ = const_cast<void*>(static_cast<const void*>(&body));
      call_ = [](void* c, std::ptrdiff_t i, int worker) { (*static_cast<B*>(c))(i, worker); };
      items_ = n;
      next_.store(0, std::memory_order_relaxed);
      busy_.store(int(helpers_.size()), std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    start_.notify_all();
    work(0);
    if (spin_until([this] { return busy_.load(std::memory_order_acquire) == 0; })) return;
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return busy_.load(std::memory_order_relaxed) == 0; });
  }

 private:
  // Spins until pred() holds (true) or kSpinMicroseconds have passed (false).
  // pred reads atomics only; the writers still change them under mutex_, so
  // a waiter that goes on to sleep on a condition variable misses nothing.
  template <class Pred>
  static bool spin_until(Pred pred) {
    const auto end = std::chrono::steady_clock::now() + kSpinMicroseconds;
    for (unsigned k = 1;; ++k) {
      if (pred()) return true;
      if (k % 64 == 0 && std::chrono::steady_clock::now() > end) return false;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
  }

  void work(int worker) {
    for (;;) {
      const std::ptrdiff_t i = next_.fetch_add(1, std::memory_order_relaxed);
      if (i >= items_) return;
      call_(context_, i, worker);
    }
  }

  void helper_loop(int worker) {
    std::uint64_t seen = 0;
    for (;;) {
      spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
      {
        std::unique_lock<std::mutex> lock(mutex_);
        start_.wait(lock, [&] { return stop_ || generation_.load(std::memory_order_relaxed) != seen; });
        if (stop_) return;
        seen = generation_.load(std::memory_order_relaxed);
      }
      work(worker);
      std::lock_guard<std::mutex> lock(mutex_);
      if (busy_.fetch_sub(1, std::memory_order_release) == 1) done_.notify_one();  // release: the caller may see 0 by spinning, not through the mutex
    }
  }

  std::vector<std::thread> helpers_;
  std::mutex mutex_;
  std::condition_variable start_, done_;
  bool stop_ = false;
  // Written under mutex_; atomic so that a spinning waiter may read them
  // without it.
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<int> busy_{0};  // helpers still in the current call
  // The current call, written under mutex_ before generation_ moves on.
  void* context_ = nullptr;
  void (*call_)(void*, std::ptrdiff_t, int) = nullptr;
  std::ptrdiff_t items_ = 0;
  std::atomic<std::ptrdiff_t> next_{0};
};

}  // namespace mesaopt
