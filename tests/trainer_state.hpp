#pragma once
// A train::Trainer's whole carried state as bytes, for bit-for-bit comparisons
// of runs (exact resume, skipped steps, shards and threads).
#include <mesaopt/train/trainer.hpp>

#include <cstddef>
#include <vector>

namespace mesaopt::test {

inline std::vector<char> bytes_of(const void* p, std::size_t n) {
  const char* c = static_cast<const char*>(p);
  return std::vector<char>(c, c + n);
}

// Everything a Trainer carries from step to step, as bytes (NaN compares equal
// to itself bit for bit).
struct TrainerState {
  std::vector<std::vector<char>> params, m, v;
  long adam_step = 0, step = 0;
  std::vector<char> losses;
  std::vector<long> skipped;
  bool operator==(const TrainerState& o) const {
    return params == o.params && m == o.m && v == o.v && adam_step == o.adam_step && step == o.step &&
           losses == o.losses && skipped == o.skipped;
  }
};

template <class T>
TrainerState state_of(const train::Trainer<T>& t) {
  TrainerState s;
  for (const auto& p : t.parameters()) s.params.push_back(bytes_of(p.value, p.size * sizeof(T)));
  const auto& opt = t.optimizer();
  for (std::size_t k = 0; k < opt.params().size(); ++k) {
    s.m.push_back(bytes_of(opt.first_moment(k).data(), opt.first_moment(k).size() * sizeof(T)));
    s.v.push_back(bytes_of(opt.second_moment(k).data(), opt.second_moment(k).size() * sizeof(T)));
  }
  s.adam_step = opt.step_count();
  s.step = t.step();
  s.losses = bytes_of(t.loss_history().data(), t.loss_history().size() * sizeof(double));
  s.skipped = t.skipped_steps();
  return s;
}

}  // namespace mesaopt::test
