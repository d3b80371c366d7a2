// SM partitions (ops/cuda/sm_partition.h, CUDA green contexts): a split gives a partition and
// the rest of the SMs; the partition's stream runs the backend's kernels with the results of
// the ordinary stream (AdamW and the sm90 grouped GEMM bit-identical), its events record there
// and other streams wait on them, and stream_sm_count reports its SMs or a stream's budget.
//
// DISABLED_OverlapBench measures what a partition buys (run with --gtest_also_run_disabled_tests
// --gtest_filter='*SmPartition*'): AdamW over a Qwen3 layer's gate_up experts on k SMs alone, a
// grouped GEMM on the rest alone, and both at once, against the two one after the other on the
// whole GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"
#include "gpu_test_util.h"
#include "ops/backend.h"
#include "ops/cuda/cuda_common.h"
#include "ops/cuda/grouped_gemm_sm90.h"
#include "ops/cuda/sm_partition.h"

namespace moetune {
namespace {

int device_sms() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  return sms;
}

struct NoScratch : cuda::Scratch {
  void* get(size_t) override { return nullptr; }
};

std::vector<uint8_t> bytes_of(const Tensor& t) {
  std::vector<uint8_t> out(t.bytes());
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(out.data(), t.data, out.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  return out;
}

Buffer random_bf16(Backend& backend, Shape shape, std::mt19937& rng, float low, float high) {
  std::uniform_real_distribution<float> dist(low, high);
  std::vector<float> values(static_cast<size_t>(shape.numel()));
  for (auto& v : values) v = dist(rng);
  Buffer out(DType::BF16, shape, Device::CUDA);
  backend.copy(out.tensor(), Tensor(values.data(), DType::F32, shape));
  return out;
}

// AdamW state of one bf16 tensor (bf16 moments, no master: the benchmark's layout).
struct AdamWState {
  Buffer param, grad, exp_avg, exp_avg_sq;
  AdamWParam view() const {
    return AdamWParam{param.tensor(),      grad.tensor(), exp_avg.tensor(),
                      exp_avg_sq.tensor(), Tensor(),      0.01f};
  }
};

class SmPartitionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!testing::hopper_gpu()) GTEST_SKIP() << "not an sm_90 device";
    backend_ = make_cuda_backend(0);
  }
  std::unique_ptr<Backend> backend_;
  std::mt19937 rng_{11};
};

TEST_F(SmPartitionTest, SplitsIntoDisjointPartitionsThatRunTheKernels) {
  cuda::SmPartition::Split split;
  std::string why;
  ASSERT_TRUE(cuda::SmPartition::split(0, 16, split, &why)) << why;
  EXPECT_GE(split.part->sms(), 16);
  EXPECT_GE(split.rest_sms, 1);
  EXPECT_LE(split.part->sms() + split.rest_sms, device_sms());
  if (split.rest) {
    EXPECT_EQ(split.rest->sms(), split.rest_sms);
  }
  cudaStream_t part = split.part->make_stream(0);
  EXPECT_EQ(cuda::stream_sm_count(part), split.part->sms());
  auto* ops = static_cast<cudaStream_t>(backend_->stream());
  EXPECT_EQ(cuda::stream_sm_count(ops), device_sms());
  cuda::set_stream_sm_budget(ops, 100);
  EXPECT_EQ(cuda::stream_sm_count(ops), 100);
  cuda::set_stream_sm_budget(ops, 0);
  EXPECT_EQ(cuda::stream_sm_count(ops), device_sms());

  // AdamW on the partition and on the ordinary stream: the same bits.
  const Shape shape{3, 1000, 72};  // not a multiple of any block's work
  AdamWState state[2];
  for (AdamWState& s : state) {
    std::mt19937 same(5);
    s.param = random_bf16(*backend_, shape, same, -1, 1);
    s.grad = random_bf16(*backend_, shape, same, -0.1f, 0.1f);
    s.exp_avg = random_bf16(*backend_, shape, same, -0.01f, 0.01f);
    s.exp_avg_sq = random_bf16(*backend_, shape, same, 0, 0.001f);
  }
  AdamWHyper hyper;
  hyper.step = 3;
  NoScratch scratch;
  const AdamWParam on_part = state[0].view(), on_ops = state[1].view();
  cuda::launch_adamw({&on_part, 1}, hyper, 1.0f, scratch, part);
  cuda::launch_adamw({&on_ops, 1}, hyper, 1.0f, scratch, ops);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  // Events of the partition's context record on its stream.
  cudaEvent_t event = cuda::create_event_for(part, cudaEventDisableTiming);
  EXPECT_EQ(cudaEventRecord(event, part), cudaSuccess);
  EXPECT_EQ(cudaStreamWaitEvent(ops, event, 0), cudaSuccess);
  EXPECT_EQ(cudaEventDestroy(event), cudaSuccess);
  EXPECT_EQ(bytes_of(state[0].param.tensor()), bytes_of(state[1].param.tensor()));
  EXPECT_EQ(bytes_of(state[0].exp_avg.tensor()), bytes_of(state[1].exp_avg.tensor()));
  EXPECT_EQ(bytes_of(state[0].exp_avg_sq.tensor()), bytes_of(state[1].exp_avg_sq.tensor()));

  // The grouped GEMM (persistent grid sized by stream_sm_count) on the partition: the same
  // bits.
  const int64_t experts = 5, rows = 700, k = 256, n = 384;
  std::vector<int32_t> offsets{0, 0, 129, 130, 500, 700};
  Buffer offsets_gpu(DType::I32, Shape{experts + 1}, Device::CUDA);
  backend_->copy(offsets_gpu.tensor(), Tensor(offsets.data(), DType::I32, Shape{experts + 1}));
  Buffer a = random_bf16(*backend_, Shape{rows, k}, rng_, -1, 1);
  Buffer w = random_bf16(*backend_, Shape{experts, n, k}, rng_, -1, 1);
  Buffer c_part(DType::BF16, Shape{rows, n}, Device::CUDA),
      c_ops(DType::BF16, Shape{rows, n}, Device::CUDA);
  ASSERT_TRUE(cuda::launch_grouped_gemm_sm90(a.tensor(), w.tensor(), true, offsets_gpu.tensor(),
                                             c_part.tensor(), part));
  ASSERT_TRUE(cuda::launch_grouped_gemm_sm90(a.tensor(), w.tensor(), true, offsets_gpu.tensor(),
                                             c_ops.tensor(), ops));
  EXPECT_EQ(bytes_of(c_part.tensor()), bytes_of(c_ops.tensor()));
  EXPECT_EQ(cudaStreamDestroy(part), cudaSuccess);
}

TEST_F(SmPartitionTest, RefusesImpossibleSplits) {
  cuda::SmPartition::Split split;
  std::string why;
  EXPECT_FALSE(cuda::SmPartition::split(0, 0, split, &why));
  EXPECT_NE(why.find("at least one SM"), std::string::npos) << why;
  EXPECT_FALSE(cuda::SmPartition::split(0, device_sms(), split, &why));
  EXPECT_NE(why.find("SMs of a device with"), std::string::npos) << why;
}

// Milliseconds of `work` enqueued on `stream` (after the device is idle).
template <typename Work>
double time_ms(cudaStream_t stream, Work&& work) {
  cudaEvent_t start = cuda::create_event_for(stream, cudaEventDefault),
              stop = cuda::create_event_for(stream, cudaEventDefault);
  cudaDeviceSynchronize();
  cudaEventRecord(start, stream);
  work();
  cudaEventRecord(stop, stream);
  cudaEventSynchronize(stop);
  float ms = 0;
  cudaEventElapsedTime(&ms, start, stop);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms;
}

TEST_F(SmPartitionTest, DISABLED_OverlapBench) {
  // AdamW over one layer's gate_up experts (128 x 1536 x 2048 bf16, bf16 moments: 14 bytes per
  // parameter) and the gate_up forward GEMM of micro batch 1 (32768 rows, balanced).
  const int64_t experts = 128, rows = 32768, hidden = 2048, width = 1536;
  const Shape shape{experts, width, hidden};
  AdamWState state;
  for (Buffer* b : {&state.param, &state.grad, &state.exp_avg, &state.exp_avg_sq}) {
    *b = Buffer(DType::BF16, shape, Device::CUDA);
    backend_->fill(b->tensor(), 0.01f);
  }
  const AdamWParam param = state.view();
  AdamWHyper hyper;
  NoScratch scratch;
  std::vector<int32_t> offsets(experts + 1);
  for (int64_t e = 0; e <= experts; ++e) offsets[e] = static_cast<int32_t>(e * rows / experts);
  Buffer offsets_gpu(DType::I32, Shape{experts + 1}, Device::CUDA);
  backend_->copy(offsets_gpu.tensor(), Tensor(offsets.data(), DType::I32, Shape{experts + 1}));
  Buffer a(DType::BF16, Shape{rows, hidden}, Device::CUDA),
      c(DType::BF16, Shape{rows, width}, Device::CUDA);
  backend_->fill(a.tensor(), 0.01f);
  const Tensor w = state.param.tensor();
  backend_->synchronize();

  const int adamw_calls = 6, gemm_calls = 60;
  const double adamw_gb = 14.0 * static_cast<double>(shape.numel()) / 1e9;
  const double gemm_tflop = 2.0 * rows * hidden * width / 1e12;
  auto adamw = [&](cudaStream_t s, int calls) {
    for (int i = 0; i < calls; ++i) cuda::launch_adamw({&param, 1}, hyper, 1.0f, scratch, s);
  };
  auto gemm = [&](cudaStream_t s, int calls) {
    for (int i = 0; i < calls; ++i)
      ASSERT_TRUE(
          cuda::launch_grouped_gemm_sm90(a.tensor(), w, true, offsets_gpu.tensor(), c.tensor(), s));
  };
  auto* ops = static_cast<cudaStream_t>(backend_->stream());
  adamw(ops, 1);
  gemm(ops, 2);
  const double adamw_full = time_ms(ops, [&] { adamw(ops, adamw_calls); }) / adamw_calls;
  const double gemm_full = time_ms(ops, [&] { gemm(ops, gemm_calls); }) / gemm_calls;
  const double serial = adamw_full * adamw_calls + gemm_full * gemm_calls;
  std::printf(
      "[sm partition] whole GPU (%d SMs): AdamW %.3f ms (%.0f GB/s), GEMM %.3f ms "
      "(%.0f TFLOP/s); %d AdamW + %d GEMM one after the other: %.2f ms\n",
      device_sms(), adamw_full, adamw_gb / adamw_full * 1e3, gemm_full,
      gemm_tflop / gemm_full * 1e3, adamw_calls, gemm_calls, serial);

  int least = 0, greatest = 0;
  cudaDeviceGetStreamPriorityRange(&least, &greatest);
  for (int k : {8, 16, 24, 32, 48, 64}) {
    cuda::SmPartition::Split split;
    std::string why;
    if (!cuda::SmPartition::split(0, k, split, &why)) {
      std::printf("[sm partition] k %d: %s\n", k, why.c_str());
      continue;
    }
    // The rest's own stream where the driver made its context (hard), else the ordinary
    // stream with a budget of the rest's SMs (soft) for the GEMM alone too.
    cudaStream_t part = split.part->make_stream(greatest),
                 rest = split.rest ? split.rest->make_stream(0) : nullptr;
    const int part_sms = split.part->sms(), rest_sms = split.rest_sms;
    cudaStream_t gemm_alone = rest;
    if (!rest) {
      gemm_alone = ops;
      cuda::set_stream_sm_budget(ops, rest_sms);
    }
    adamw(part, 1);
    gemm(gemm_alone, 1);
    const double adamw_part = time_ms(part, [&] { adamw(part, adamw_calls); }) / adamw_calls;
    const double gemm_rest =
        time_ms(gemm_alone, [&] { gemm(gemm_alone, gemm_calls); }) / gemm_calls;
    cuda::set_stream_sm_budget(ops, 0);
    // Both at once: the GEMMs on the rest (hard) or on the ordinary stream with a budget of the
    // rest's SMs (soft: its kernels may also land on the partition's SMs when they are free).
    for (bool soft : {false, true}) {
      if (!soft && !rest) continue;
      cudaStream_t compute = soft ? ops : rest;
      if (soft) cuda::set_stream_sm_budget(ops, rest_sms);
      // Events of each stream's own context; the partition starts once the compute stream
      // has reached its start.
      cudaEvent_t start = cuda::create_event_for(compute, cudaEventDefault),
                  compute_done = cuda::create_event_for(compute, cudaEventDefault),
                  part_start = cuda::create_event_for(part, cudaEventDefault),
                  part_done = cuda::create_event_for(part, cudaEventDefault);
      cudaDeviceSynchronize();
      cudaEventRecord(start, compute);
      cudaStreamWaitEvent(part, start, 0);
      cudaEventRecord(part_start, part);
      adamw(part, adamw_calls);
      cudaEventRecord(part_done, part);
      gemm(compute, gemm_calls);
      cudaEventRecord(compute_done, compute);
      cudaDeviceSynchronize();
      float compute_ms = 0, part_ms = 0;
      EXPECT_EQ(cudaEventElapsedTime(&compute_ms, start, compute_done), cudaSuccess);
      EXPECT_EQ(cudaEventElapsedTime(&part_ms, part_start, part_done), cudaSuccess);
      const double span = std::max(compute_ms, part_ms);
      std::printf(
          "[sm partition] k %d (part %d SMs, rest %d): AdamW alone %.3f ms (%.0f GB/s), "
          "GEMM alone on the rest %.3f ms (%.0f TFLOP/s); together (%s): GEMMs %.2f ms, "
          "AdamWs %.2f ms, span %.2f ms = %.2fx the serial %.2f ms\n",
          k, part_sms, rest_sms, adamw_part, adamw_gb / adamw_part * 1e3, gemm_rest,
          gemm_tflop / gemm_rest * 1e3, soft ? "soft" : "hard", compute_ms, part_ms, span,
          span / serial, serial);
      cuda::set_stream_sm_budget(ops, 0);
      for (cudaEvent_t event : {start, compute_done, part_start, part_done})
        cudaEventDestroy(event);
    }
    cudaStreamDestroy(part);
    if (rest) cudaStreamDestroy(rest);
  }
}

}  // namespace
}  // namespace moetune
