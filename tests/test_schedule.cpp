// Learning-rate schedules against Transformers: tests/data/schedule_goldens.json holds the lr
// of every update of a few runs, recorded from transformers' own schedulers by
// scripts/make_schedule_goldens.py.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "test_util.h"
#include "train/schedule.h"

namespace moetune {
namespace {

TEST(Schedule, MatchesTransformers) {
  std::ifstream in(testing::source_dir() / "tests/data/schedule_goldens.json");
  ASSERT_TRUE(in.good());
  const auto cases = nlohmann::json::parse(in);
  ASSERT_GE(cases.size(), 5u);
  for (const auto& c : cases) {
    LrSchedule schedule;
    schedule.type = parse_schedule_type(c["type"].get<std::string>());
    schedule.base_lr = c["base_lr"].get<double>();
    schedule.warmup_steps = c["warmup_steps"].get<int64_t>();
    schedule.total_steps = c["total_steps"].get<int64_t>();
    schedule.min_lr_ratio = c["min_lr_ratio"].get<double>();
    const auto& lrs = c["lrs"];
    for (size_t step = 0; step < lrs.size(); ++step) {
      EXPECT_NEAR(schedule.lr(static_cast<int64_t>(step)), lrs[step].get<double>(), 1e-12)
          << c["type"] << " warmup " << schedule.warmup_steps << " step " << step;
    }
  }
}

TEST(Schedule, ChosenPoints) {
  LrSchedule cosine{ScheduleType::Cosine, 1.0, 10, 110, 0.1};
  EXPECT_DOUBLE_EQ(cosine.lr(0), 0.0);
  EXPECT_DOUBLE_EQ(cosine.lr(5), 0.5);
  EXPECT_DOUBLE_EQ(cosine.lr(10), 1.0);
  EXPECT_NEAR(cosine.lr(60), 0.55, 1e-12);  // half way: 0.5 * 0.9 + 0.1
  EXPECT_NEAR(cosine.lr(110), 0.1, 1e-12);
  LrSchedule linear{ScheduleType::Linear, 2.0, 0, 100, 0.0};
  EXPECT_DOUBLE_EQ(linear.lr(25), 1.5);
  EXPECT_DOUBLE_EQ(linear.lr(100), 0.0);
  EXPECT_THROW(parse_schedule_type("cosin"), Error);
}

}  // namespace
}  // namespace moetune
