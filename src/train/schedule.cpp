// Learning-rate schedules (see schedule.h): the formulas of transformers/optimization.py.
#include "train/schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/error.h"

namespace moetune {

ScheduleType parse_schedule_type(const std::string& name) {
  if (name == "constant") return ScheduleType::Constant;
  if (name == "linear") return ScheduleType::Linear;
  if (name == "cosine") return ScheduleType::Cosine;
  fail("scheduler.type: unknown schedule '", name, "' (expected constant, linear or cosine)");
}

const char* schedule_type_name(ScheduleType type) {
  switch (type) {
    case ScheduleType::Constant:
      return "constant";
    case ScheduleType::Linear:
      return "linear";
    case ScheduleType::Cosine:
      return "cosine";
  }
  return "?";
}

double LrSchedule::factor(int64_t step) const {
  if (step < warmup_steps)
    return static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, warmup_steps));
  if (type == ScheduleType::Constant) return 1.0;
  const double decay_steps = static_cast<double>(std::max<int64_t>(1, total_steps - warmup_steps));
  const double progress = static_cast<double>(step - warmup_steps) / decay_steps;
  double decayed = 0.0;  // 1 at the end of warmup, 0 at total_steps
  if (type == ScheduleType::Linear) {
    decayed = std::max(0.0, 1.0 - progress);
  } else {
    // num_cycles = 0.5: 0.5 * (1 + cos(pi * 2 * 0.5 * progress)), clamped at 0 as HF does.
    decayed = std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * progress)));
    if (progress >= 1.0) decayed = 0.0;
  }
  return decayed * (1.0 - min_lr_ratio) + min_lr_ratio;
}

}  // namespace moetune
