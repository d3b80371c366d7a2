// DataParallelAdamW batches a gradient group's collectives: one communicator group
// (NCCL: ncclGroupStart/End) per communicator, holding every collective that needs no
// padded scratch; the padded ones (their scratch copies sit between collectives) come
// after, outside any group. Checked on the sequence of calls a recording 2-rank
// communicator sees, for ZeRO stages 0, 1 and 2 (the reductions) and step()'s all-gathers.
// (That the batched reductions give the same numbers is test_data_parallel's job.)
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"
#include "dist/communicator.h"
#include "model/model.h"
#include "train/sharded_adamw.h"

namespace moetune {
namespace {

// Rank 0 of a pretend group of 2 (host tensors): collectives move this rank's data only
// and append "<name>:<call>[:<elements>]" to a shared log.
class RecordingCommunicator final : public dist::Communicator {
 public:
  RecordingCommunicator(std::string name, std::vector<std::string>& log)
      : name_(std::move(name)), log_(log) {}
  int rank() const override { return 0; }
  int size() const override { return 2; }
  std::string name() const override { return name_; }
  void all_reduce_sum(const Tensor& in, const Tensor& out, dist::StreamHandle) override {
    record("all_reduce", in.numel());
    if (out.data != in.data) std::memcpy(out.data, in.data, in.bytes());
  }
  void reduce_scatter_sum(const Tensor& in, const Tensor& out, dist::StreamHandle) override {
    record("reduce_scatter", in.numel());
    std::memcpy(out.data, in.data, out.bytes());  // chunk 0
  }
  void all_gather(const Tensor& in, const Tensor& out, dist::StreamHandle) override {
    record("all_gather", out.numel());
    std::memmove(out.data, in.data, in.bytes());  // chunk 0
  }
  void all_to_all_v(const Tensor&, std::span<const int64_t>, const Tensor&,
                    std::span<const int64_t>, dist::StreamHandle) override {
    fail("not used");
  }
  void all_to_all_v_blocks(const Tensor&, std::span<const dist::RowBlock>, const Tensor&,
                           std::span<const dist::RowBlock>, dist::StreamHandle) override {
    fail("not used");
  }
  void group_start() override { log_.push_back(name_ + ":start"); }
  void group_end() override { log_.push_back(name_ + ":end"); }
  void barrier(dist::StreamHandle) override {}
  std::unique_ptr<Communicator> split(int, int) override { fail("not used"); }

 private:
  void record(const char* call, int64_t elements) {
    log_.push_back(name_ + ":" + call + ":" + std::to_string(elements));
  }
  std::string name_;
  std::vector<std::string>& log_;
};

struct Fixture {
  std::vector<Buffer> storage;
  std::vector<Parameter> parameters;
  void add(const std::string& name, int64_t elements, bool expert) {
    storage.emplace_back(DType::F32, Shape{elements});
    Tensor value = storage.back().tensor();
    storage.emplace_back(DType::F32, Shape{elements});
    Tensor grad = storage.back().tensor();
    for (int64_t i = 0; i < elements; ++i) value.ptr<float>()[i] = grad.ptr<float>()[i] = 0.5f;
    parameters.push_back({name, value, grad, true, expert});
  }
};

std::vector<std::string> run(int stage, bool step) {
  std::vector<std::string> log;
  RecordingCommunicator world("world", log), experts("experts", log);
  auto backend = make_cpu_backend();
  Fixture f;
  f.add("norm", 4, false);   // divides 2
  f.add("bias", 3, false);   // padded: 2 chunks of 2
  f.add("up", 6, true);      // expert, divides
  f.add("down", 5, true);    // expert, padded
  f.add("other", 8, false);  // the second group
  const std::vector<GradientGroup> groups = {{"layer.0", 0, 4}, {"head", 4, 5}};
  DataParallelOptions options;
  options.zero_stage = stage;
  DataParallelAdamW optimizer(f.parameters, groups, *backend, AdamWConfig{}, world, experts,
                              options);
  optimizer.reduce_group(0);
  if (step) {
    log.clear();
    optimizer.reduce_group(1);
    log.clear();
    optimizer.step(1e-3);
  }
  return log;
}

using Log = std::vector<std::string>;

TEST(ShardedAdamWBatching, ReductionsOfAGroupAreBatchedPerCommunicator) {
  // Stages 0 and 1 all-reduce in place (no scratch): everything is batched.
  for (int stage : {0, 1})
    EXPECT_EQ(run(stage, false),
              (Log{"world:start", "world:all_reduce:4", "world:all_reduce:3", "world:end",
                   "experts:start", "experts:all_reduce:6", "experts:all_reduce:5", "experts:end"}))
        << "stage " << stage;
  // Stage 2 without overlap (CPU): padded tensors reduce-scatter through the scratch.
  EXPECT_EQ(run(2, false), (Log{"world:start", "world:reduce_scatter:4", "world:end",
                                "experts:start", "experts:reduce_scatter:6", "experts:end",
                                "world:reduce_scatter:4", "experts:reduce_scatter:6"}));
}

TEST(ShardedAdamWBatching, StepAllGathersAreBatchedExceptPaddedOnes) {
  EXPECT_EQ(run(0, true), Log{});  // stage 0: replicated state, nothing to gather
  for (int stage : {1, 2})
    EXPECT_EQ(run(stage, true), (Log{"world:start", "world:all_gather:4", "world:all_gather:8",
                                     "world:end", "experts:start", "experts:all_gather:6",
                                     "experts:end", "world:all_gather:4", "experts:all_gather:6"}))
        << "stage " << stage;
}

}  // namespace
}  // namespace moetune
