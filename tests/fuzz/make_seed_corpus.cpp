// Writes the fuzz target's seed corpus: a few valid checkpoints made by the
// library's own save_checkpoint (float and double, with and without optimiser
// state, with extra metadata) and a hand-written header exercising escapes,
// so no binary seeds live in the repository. Usage: make_seed_corpus DIR
#include <mesaopt/io.hpp>
#include <mesaopt/train/checkpoint.hpp>

#include "fuzz_model.hpp"

#include <cstdio>
#include <exception>
#include <string>

using namespace mesaopt;

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  try {
    fuzz::FuzzModel<float> f32(1.5f);
    f32.optimizer.step(1e-3);
    train::save_checkpoint(dir + "/seed_f32_adamw.safetensors", f32.params, &f32.optimizer, 12);
    train::save_checkpoint(dir + "/seed_f32_weights.safetensors", f32.params,
                           static_cast<const train::Adam<float>*>(nullptr), 3, {{"note", "weights only"}});
    fuzz::FuzzModel<double> f64(-0.25);
    f64.optimizer.step(1e-3);
    f64.optimizer.step(1e-3);
    train::save_checkpoint(dir + "/seed_f64_adamw.safetensors", f64.params, &f64.optimizer, 2,
                           {{"run", "seed \"quoted\" \xc3\xa9"}});
    const double one = 1.0;
    io::write_safetensors(dir + "/seed_escapes.safetensors",
                          {{"a\"b\\c\n\xf0\x9f\x98\x80", "F64", {1, 1}, &one}}, {{"k\tey", "v\u00e9"}});
  } catch (const std::exception& e) {
    std::fprintf(stderr, "make_seed_corpus: %s\n", e.what());
    return 1;
  }
  return 0;
}
