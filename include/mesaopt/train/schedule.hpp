#pragma once
// Learning-rate schedules (docs/paper.md §3), as functions of the 0-based number of
// updates already applied, `step` (the lr for the first update is lr(0)).
//
// constant:        lr(s) = lr
// warmup + cosine (optax.warmup_cosine_decay_schedule), W warm-up steps,
// S total steps, D = S - W:
//   s <  W:  lr(s) = init + (peak - init) s / W
//   s >= W:  lr(s) = floor + (peak - floor) (1 + cos(pi min(s - W, D) / D)) / 2
// so lr(W) = peak, lr(S) = floor, and lr(s > S) = floor.
#include <mesaopt/common/check.hpp>

#include <cmath>
#include <initializer_list>
#include <utility>

namespace mesaopt::train {

struct LrSchedule {
  enum class Kind { constant, warmup_cosine };
  Kind kind = Kind::constant;
  double peak = 1e-3;        // the constant lr, or the lr reached at the end of warm-up
  double init = 0.0;         // warm-up start
  double floor = 0.0;        // cosine end value
  long warmup_steps = 0;     // W
  long total_steps = 0;      // S (warm-up included)

  double operator()(long step) const {
    if (step < 0) detail::fail("LrSchedule", "step must be >= 0, got ", step);
    if (kind == Kind::constant) return peak;
    if (step < warmup_steps)
      return init + (peak - init) * static_cast<double>(step) / static_cast<double>(warmup_steps);
    const long decay = total_steps - warmup_steps;
    if (decay <= 0) return floor;
    const double progress =
        static_cast<double>(step - warmup_steps < decay ? step - warmup_steps : decay) / static_cast<double>(decay);
    return floor + (peak - floor) * 0.5 * (1.0 + std::cos(3.14159265358979323846 * progress));
  }
};

inline LrSchedule constant_schedule(double lr) {
  if (!(std::isfinite(lr) && lr >= 0)) detail::fail("constant_schedule", "lr must be finite and >= 0, got ", lr);
  LrSchedule s;
  s.kind = LrSchedule::Kind::constant;
  s.peak = lr;
  return s;
}

// Linear warm-up from `init` to `peak` over `warmup_steps`, then cosine decay to
// `floor` at `total_steps` (e.g. docs/paper.md §3: peak 8e-4, warm-up 1000, floor 1e-5).
inline LrSchedule warmup_cosine_schedule(double peak, long warmup_steps, long total_steps, double floor,
                                         double init = 0.0) {
  const char* where = "warmup_cosine_schedule";
  for (auto [name, v] : {std::pair<const char*, double>{"peak", peak}, {"floor", floor}, {"init", init}})
    if (!(std::isfinite(v) && v >= 0)) detail::fail(where, name, " must be finite and >= 0, got ", v);
  if (warmup_steps < 0) detail::fail(where, "warmup_steps must be >= 0, got ", warmup_steps);
  if (total_steps < warmup_steps)
    detail::fail(where, "total_steps (", total_steps, ") must be >= warmup_steps (", warmup_steps, ")");
  LrSchedule s;
  s.kind = LrSchedule::Kind::warmup_cosine;
  s.peak = peak;
  s.init = init;
  s.floor = floor;
  s.warmup_steps = warmup_steps;
  s.total_steps = total_steps;
  return s;
}

}  // namespace mesaopt::train
