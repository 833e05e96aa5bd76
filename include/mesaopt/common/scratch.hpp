#pragma once
// Zero-filled scratch for the per-call states of the recurrent ops.
//
// The recurrent linear attention op runs once per (sequence, head): at the
// paper's head size its states are a few hundred entries (20 x 32 in float,
// rows padded to the SIMD width), and a training step of linear-6L at batch
// 64 makes 1536 forward and 1536 backward calls, four states in all per pair.
// As Eigen matrices each state was a malloc, a memset and a free: 2.5 % of
// the step's samples in the allocator (docs/training.md, "Stop 45"). A state
// of at most N entries now lives on the caller's stack; a larger one (heads
// past 32 x 32) still goes to the heap, where its own sweep dwarfs the call.
#include <algorithm>
#include <cstddef>
#include <vector>

namespace mesaopt::detail {

template <class T, std::size_t N = 1024>
class ZeroedScratch {
 public:
  // rows x ld entries, all zero.
  ZeroedScratch(std::size_t rows, std::size_t ld) : size_(rows * ld) {
    if (size_ > N) heap_.assign(size_, T(0));
    else std::fill_n(local_, size_, T(0));
  }
  ZeroedScratch(const ZeroedScratch&) = delete;
  ZeroedScratch& operator=(const ZeroedScratch&) = delete;

  T* data() { return size_ > N ? heap_.data() : local_; }
  const T* data() const { return size_ > N ? heap_.data() : local_; }

 private:
  std::size_t size_;
  alignas(64) T local_[N];
  std::vector<T> heap_;
};

}  // namespace mesaopt::detail
