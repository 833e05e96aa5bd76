// libFuzzer target for the checkpoint loader: arbitrary bytes as a
// safetensors file. io::parse_safetensors must accept or throw
// std::runtime_error, never crash, hang or over-read (ASan/UBSan watch); a
// file it accepts must satisfy the invariants it promises, and restoring it
// into a small model (float and double, with and without an optimiser) must
// again succeed or throw std::runtime_error, leaving the model untouched on
// failure. The same bytes also go through the JSON document parser.
// Any other exception escapes and libFuzzer reports it as a crash.
//
// Build and run: scripts/run-fuzz.sh [seconds] (MESAOPT_BUILD_FUZZERS=ON, clang).
#include <mesaopt/io.hpp>
#include <mesaopt/train/checkpoint.hpp>

#include "fuzz_model.hpp"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using namespace mesaopt;

void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_safetensors: invariant violated: %s\n", what);
    std::abort();
  }
}

// What parse_safetensors promises about a file it accepts.
void check_invariants(const io::SafetensorsFile& f) {
  require(f.data_start >= 8 && f.data_start <= f.bytes.size(), "data_start within the file");
  const std::uint64_t data_size = f.bytes.size() - f.data_start;
  std::uint64_t covered = 0;
  for (const auto& t : f.tensors) {
    require(t.begin <= t.end && t.end <= data_size, "tensor inside the data buffer");
    const std::size_t elem = io::safetensors_dtype_size(t.dtype);
    require(elem > 0, "known dtype");
    std::uint64_t count = 1;
    for (std::uint64_t d : t.shape) count *= d;  // checked by the parser: no overflow
    require(count * elem == t.end - t.begin, "span matches shape and dtype");
    covered += t.end - t.begin;
    require(f.find(t.name) == &t, "find() returns the tensor (names unique)");
  }
  require(covered == data_size, "tensors tile the data buffer");
  require(f.by_name.size() == f.tensors.size(), "name index complete");
}

template <class T>
void restore(const io::SafetensorsFile& f, bool with_optimizer) {
  fuzz::FuzzModel<T> model(T(7));
  const fuzz::FuzzModel<T> pristine(T(7));
  try {
    train::restore_checkpoint(f, "fuzz", model.params, with_optimizer ? &model.optimizer : nullptr);
  } catch (const std::runtime_error&) {
    require(model.weight == pristine.weight && model.bias == pristine.bias && model.scale == pristine.scale,
            "a failed load leaves the parameters untouched");
    require(model.optimizer.step_count() == 0, "a failed load leaves the optimiser untouched");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const char* text = reinterpret_cast<const char*>(data);
  try {
    const io::SafetensorsFile f = io::parse_safetensors(std::vector<char>(text, text + size), "fuzz");
    check_invariants(f);
    restore<float>(f, true);
    restore<float>(f, false);
    restore<double>(f, true);
  } catch (const std::runtime_error&) {
  }
  try {
    (void)io::json::parse(text, size);
  } catch (const io::json::ParseError&) {
  }
  return 0;
}
