// Learning-rate schedules with warmup, as Transformers' get_*_schedule_with_warmup define
// them: a LambdaLR multiplier evaluated at the number of optimizer steps already taken
// (so the first update, at completed_steps 0, runs at lr 0 when there is a warmup).
//   constant: warmup, then 1
//   linear:   warmup, then a straight line from 1 down to min_lr_ratio at total_steps
//   cosine:   warmup, then half a cosine from 1 down to min_lr_ratio at total_steps
//             (get_cosine_with_min_lr_schedule_with_warmup; min_lr_ratio 0 is the plain one)
#pragma once

#include <cstdint>
#include <string>

namespace moetune {

enum class ScheduleType { Constant, Linear, Cosine };

// "constant" | "linear" | "cosine"; an Error naming the value otherwise.
ScheduleType parse_schedule_type(const std::string& name);
const char* schedule_type_name(ScheduleType type);

struct LrSchedule {
  ScheduleType type = ScheduleType::Cosine;
  double base_lr = 1e-3;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;
  double min_lr_ratio = 0.0;  // the floor, as a fraction of base_lr

  // The multiplier of base_lr for the update made after `completed_steps` steps.
  double factor(int64_t completed_steps) const;
  double lr(int64_t completed_steps) const { return base_lr * factor(completed_steps); }
};

}  // namespace moetune
