#pragma once
// How every module with parameters (layers, nn blocks, models) exposes them to
// optimisers and checkpoints: as named flat buffers with their gradients.
//
// Convention for every module:
//   void parameters(std::vector<ParameterView<T>>& out, const std::string& prefix);
// appends one view per parameter tensor, named prefix + local name
// (e.g. "block0.attn.W_q"); backward passes ADD (+=) into the grad buffers, so
// callers zero them first (zero_grad below).
#include <cstddef>
#include <string>
#include <vector>

namespace mesaopt {

template <class T>
struct ParameterView {
  std::string name;         // unique within a model, e.g. "block0.attn.W_q"
  T* value = nullptr;       // `size` contiguous values
  T* grad = nullptr;        // `size` contiguous gradients, same layout
  std::size_t size = 0;
  std::vector<long> shape;  // logical shape (row-major), product == size
};

template <class T>
void zero_grad(const std::vector<ParameterView<T>>& params) {
  for (const auto& p : params)
    for (std::size_t i = 0; i < p.size; ++i) p.grad[i] = T(0);
}

}  // namespace mesaopt
