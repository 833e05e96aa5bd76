// Trains a one-layer model (linear attention or mesa) on the paper's
// constructed-token linear-dynamics task (PAPER.md §2) and prints the loss
// history; --csv writes step,loss. A starting point for the paper's runs.
#include <mesaopt/nn.hpp>
#include <mesaopt/tasks.hpp>
#include <mesaopt/train.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

using namespace mesaopt;

static void usage() {
  std::printf(
      "linear_dynamics: train a 1-layer model on constructed-token linear dynamics\n"
      "  --help            this text\n"
      "  --steps N         training steps (default 500)\n"
      "  --batch B         sequences per step (default 32)\n"
      "  --n N             state size (default 4)\n"
      "  --seq T           sequence length (default 20)\n"
      "  --layer K         linear | mesa (default linear)\n"
      "  --lr X            AdamW learning rate (default 1e-2)\n"
      "  --csv PATH        write step,loss to PATH\n");
}

int main(int argc, char** argv) {
  long steps = 500, batch = 32, n = 4, seq = 20;
  double lr = 1e-2;
  std::string layer = "linear", csv;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--help" || a == "-h") { usage(); return 0; }
    else if (a == "--steps") steps = std::atol(next());
    else if (a == "--batch") batch = std::atol(next());
    else if (a == "--n") n = std::atol(next());
    else if (a == "--seq") seq = std::atol(next());
    else if (a == "--layer") layer = next();
    else if (a == "--lr") lr = std::atof(next());
    else if (a == "--csv") csv = next();
    else { std::fprintf(stderr, "unknown option %s\n", a.c_str()); usage(); return 2; }
  }
  try {
    if (layer != "linear" && layer != "mesa") throw std::invalid_argument("--layer must be linear or mesa");
    nn::ModelConfig mc;
    mc.input_dim = mc.width = 4 * n;
    mc.output_dim = n;
    mc.embed = false;
    mc.readout_slice = true;
    nn::BlockConfig b;
    b.attention = layer == "mesa" ? nn::AttentionKind::mesa : nn::AttentionKind::linear;
    b.key_size = b.value_size = 4 * n;
    mc.blocks = {b};
    nn::Model<float> model(mc);
    model.init(1, 0.05);

    tasks::DynamicsConfig dc;
    dc.state_dim = n;
    dc.seq_len = seq;
    const std::uint64_t seed = 2023;
    train::BatchSource<float> source = [dc, batch, seed](long step) {
      const auto db = tasks::make_dynamics_batch<float>(dc, batch, seed, step * batch);
      train::TrainBatch<float> tb;
      tb.inputs = tasks::constructed_tokens<float>(db);
      tb.targets = db.targets;
      tb.seq_len = db.seq_len;
      return tb;
    };
    train::TrainerConfig tc;
    tc.steps = steps;
    tc.adam = train::adamw_config(0.0);
    tc.schedule = train::constant_schedule(lr);
    tc.clip_norm = 1.0;
    train::Trainer<float> trainer(model, source, tc);
    const auto r = trainer.run();
    std::printf("%s layer, n = %ld, T = %ld, batch %ld: loss %.5g -> %.5g over %ld steps, %.0f tokens/s\n",
                layer.c_str(), n, seq, batch, r.losses.front(), r.losses.back(), steps, r.tokens_per_second);
    if (!csv.empty()) {
      std::FILE* f = std::fopen(csv.c_str(), "w");
      if (f == nullptr) throw std::runtime_error("cannot open " + csv);
      std::fprintf(f, "step,loss\n");
      for (std::size_t s = 0; s < r.losses.size(); ++s) std::fprintf(f, "%zu,%.9g\n", s, r.losses[s]);
      std::fclose(f);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
