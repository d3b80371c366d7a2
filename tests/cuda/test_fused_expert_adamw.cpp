// The optimizer in the backward fused into the expert weight-gradient GEMM
// (Backend::grouped_gemm_weight_grad_adamw on the CUDA backend: the sm90 GEMM with AdamW in its
// epilogue, grouped_gemm_sm90.cu / expert_adamw_epilogue_sm90.cuh) against the same update by
// separate ops on the same GPU (grouped_gemm_weight_grad into a bf16 gradient, grad_norm_squared,
// adamw_update): weights, moments and master weights bit-identical, the norm within fp32
// rounding; over two steps, on awkward shapes (P, Q not tile multiples, experts with 0, 1 and
// 129 rows, rows outside every expert), for each AdamW state layout (bf16 / fp32 moments, with
// and without fp32 master weights) and gradient dtype (bf16, or fp32 as the trainer keeps it).
// Also against the CPU backend (its default composition, fp32).
//
// DISABLED_Qwen3Shapes times it (run with --gtest_also_run_disabled_tests
// --gtest_filter='*FusedExpertAdamW*Qwen3*'): the Qwen3-30B-A3B expert weight gradients (32768
// rows, 128 experts), fused vs separate, bf16 state without master weights (the benchmark's).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"
#include "gpu_test_util.h"
#include "ops/backend.h"
#include "ops/cuda/grouped_gemm_sm90.h"

namespace moetune {
namespace {

// Host copy of a tensor's raw bytes.
std::vector<uint8_t> bytes_of(Backend& backend, const Tensor& t) {
  std::vector<uint8_t> out(t.bytes());
  backend.synchronize();
  EXPECT_EQ(cudaMemcpy(out.data(), t.data, out.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  return out;
}

// One expert weight with its AdamW state, on `backend`'s device, from fixed host values.
struct ExpertState {
  Buffer param, exp_avg, exp_avg_sq, master;
  AdamWParam view(DType grad_dtype) const {
    AdamWParam p;
    p.param = param.tensor();
    p.grad = Tensor(nullptr, grad_dtype, param.shape(), param.tensor().device);
    p.exp_avg = exp_avg.tensor();
    p.exp_avg_sq = exp_avg_sq.tensor();
    if (master.data()) p.master = master.tensor();
    p.weight_decay = 0.1f;
    return p;
  }
};

struct StateLayout {
  DType state;
  bool master;
  DType grad;  // the gradient dtype of the separate path (the model's grad_dtype)
};

class FusedExpertAdamW : public ::testing::TestWithParam<StateLayout> {
 protected:
  void SetUp() override {
    if (!testing::hopper_gpu()) GTEST_SKIP() << "not an sm_90 device";
    gpu_ = make_cuda_backend(0);
    cpu_ = make_cpu_backend();
  }

  Buffer upload(Backend& backend, DType dtype, Shape shape, const std::vector<float>& values) {
    Buffer out(dtype, shape, backend.device());
    backend.copy(out.tensor(), Tensor(const_cast<float*>(values.data()), DType::F32, shape));
    return out;
  }
  static std::vector<float> rounded(std::vector<float> values) {  // to bf16 and back
    for (auto& v : values) v = bf16_to_float(float_to_bf16(v));
    return values;
  }
  std::vector<float> random(int64_t count, float low, float high) {
    std::uniform_real_distribution<float> dist(low, high);
    std::vector<float> out(count);
    for (auto& v : out) v = dist(rng_);
    return out;
  }
  ExpertState make_state(Backend& backend, Shape shape, const StateLayout& layout,
                         const std::vector<float>& weights, const std::vector<float>& avg,
                         const std::vector<float>& avg_sq) {
    ExpertState s;
    s.param = upload(backend, DType::BF16, shape, weights);
    s.exp_avg = upload(backend, layout.state, shape, avg);
    s.exp_avg_sq = upload(backend, layout.state, shape, avg_sq);
    if (layout.master) s.master = upload(backend, DType::F32, shape, weights);
    return s;
  }

  std::unique_ptr<Backend> gpu_, cpu_;
  std::mt19937 rng_{20261207};
};

TEST_P(FusedExpertAdamW, BitIdenticalToSeparateOpsAndCloseToTheCpu) {
  const StateLayout layout = GetParam();
  // Experts with 0, 1, 129 rows and an empty one last; rows before and after every expert.
  const std::vector<int32_t> counts = {37, 0, 1, 129, 64, 0};
  const int64_t experts = static_cast<int64_t>(counts.size()), p = 136, q = 200, first_row = 3;
  std::vector<int32_t> offsets(experts + 1, static_cast<int32_t>(first_row));
  for (int64_t e = 0; e < experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
  const int64_t rows = offsets[experts] + 5;
  const Shape shape{experts, p, q};
  const int64_t n = shape.numel();
  const std::vector<float> weights = random(n, -0.5f, 0.5f);
  const std::vector<float> avg = random(n, -1e-3f, 1e-3f);
  const std::vector<float> avg_sq = random(n, 0.0f, 1e-5f);

  ExpertState fused = make_state(*gpu_, shape, layout, weights, avg, avg_sq);
  ExpertState separate = make_state(*gpu_, shape, layout, weights, avg, avg_sq);
  // The CPU backend is fp32: its weights, moments and inputs are the GPU's values as fp32 (the
  // weights the master's when there is one), its gradient fp32.
  const bool bf16_state = layout.state == DType::BF16;
  ExpertState on_cpu;
  on_cpu.param = upload(*cpu_, DType::F32, shape, layout.master ? weights : rounded(weights));
  on_cpu.exp_avg = upload(*cpu_, DType::F32, shape, bf16_state ? rounded(avg) : avg);
  on_cpu.exp_avg_sq = upload(*cpu_, DType::F32, shape, bf16_state ? rounded(avg_sq) : avg_sq);
  Buffer offsets_gpu(DType::I32, Shape{experts + 1}, Device::CUDA);
  gpu_->copy(offsets_gpu.tensor(), Tensor(offsets.data(), DType::I32, Shape{experts + 1}));
  Buffer grad(layout.grad, shape, Device::CUDA);
  Buffer norm_fused(DType::F32, Shape{1}, Device::CUDA),
      norm_separate(DType::F32, Shape{1}, Device::CUDA), norm_cpu(DType::F32, Shape{1});

  for (int64_t step = 1; step <= 2; ++step) {
    const std::vector<float> dy_host = random(rows * p, -1.0f, 1.0f);
    const std::vector<float> x_host = random(rows * q, -1.0f, 1.0f);
    Buffer dy = upload(*gpu_, DType::BF16, Shape{rows, p}, dy_host);
    Buffer x = upload(*gpu_, DType::BF16, Shape{rows, q}, x_host);
    AdamWHyper hyper;
    hyper.lr = 1e-3;
    hyper.step = step;

    ASSERT_TRUE(cuda::launch_grouped_gemm_weight_grad_adamw_sm90(
        dy.tensor(), x.tensor(), offsets_gpu.tensor(), fused.view(layout.grad), hyper,
        norm_fused.tensor(), static_cast<cudaStream_t>(gpu_->stream())))
        << "the fused kernel declined";

    gpu_->grouped_gemm_weight_grad(dy.tensor(), x.tensor(), offsets_gpu.tensor(), grad.tensor(),
                                   /*accumulate=*/false);
    const Tensor grads[] = {grad.tensor()};
    gpu_->grad_norm_squared(grads, norm_separate.tensor());
    AdamWParam with_grad = separate.view(layout.grad);
    with_grad.grad = grad.tensor();
    gpu_->adamw_update(std::span<const AdamWParam>(&with_grad, 1), hyper, 1.0f);

    Buffer dy_cpu = upload(*cpu_, DType::F32, Shape{rows, p}, rounded(dy_host));
    Buffer x_cpu = upload(*cpu_, DType::F32, Shape{rows, q}, rounded(x_host));
    cpu_->grouped_gemm_weight_grad_adamw(dy_cpu.tensor(), x_cpu.tensor(),
                                         Tensor(offsets.data(), DType::I32, Shape{experts + 1}),
                                         on_cpu.view(DType::F32), hyper, norm_cpu.tensor());

    const char* names[] = {"weights", "exp_avg", "exp_avg_sq", "master"};
    const Buffer* a[] = {&fused.param, &fused.exp_avg, &fused.exp_avg_sq, &fused.master};
    const Buffer* b[] = {&separate.param, &separate.exp_avg, &separate.exp_avg_sq,
                         &separate.master};
    for (int k = 0; k < 4; ++k) {
      if (!a[k]->data()) continue;
      const std::vector<uint8_t> x_bytes = bytes_of(*gpu_, a[k]->tensor());
      const std::vector<uint8_t> y_bytes = bytes_of(*gpu_, b[k]->tensor());
      int64_t differing = 0;
      const size_t element = dtype_size(a[k]->dtype());
      for (size_t i = 0; i < x_bytes.size(); i += element)
        differing += std::memcmp(&x_bytes[i], &y_bytes[i], element) != 0;
      EXPECT_EQ(differing, 0) << names[k] << " at step " << step << ": " << differing << " of " << n
                              << " elements differ from the separate ops";
    }
    float nf = 0, ns = 0;
    gpu_->copy(Tensor(&nf, DType::F32, Shape{1}), norm_fused.tensor());
    gpu_->copy(Tensor(&ns, DType::F32, Shape{1}), norm_separate.tensor());
    EXPECT_GT(ns, 0.0f);
    EXPECT_NEAR(nf, ns, 1e-5 * ns) << "gradient norm squared at step " << step;
    EXPECT_NEAR(nf, *norm_cpu.ptr<float>(), 1e-3 * ns) << "vs the CPU at step " << step;

    // The CPU's weights: its gradient is fp32 and summed in another order, not the bf16 one;
    // AdamW's first steps move each weight by about lr whatever the gradient's size, so compare the
    // weights' change, element by element, within a fraction of lr.
    std::vector<float> gpu_weights(n), cpu_weights(n);
    gpu_->copy(Tensor(gpu_weights.data(), DType::F32, shape),
               (layout.master ? fused.master : fused.param).tensor());
    cpu_->copy(Tensor(cpu_weights.data(), DType::F32, shape), on_cpu.param.tensor());
    int64_t far = 0;
    for (int64_t i = 0; i < n; ++i)
      far += std::fabs(gpu_weights[i] - cpu_weights[i]) >
             0.05 * hyper.lr * step + 8e-3 * std::fabs(cpu_weights[i]);
    EXPECT_LE(far, n / 1000) << far << " of " << n << " weights far from the CPU's at step "
                             << step;
  }
}

INSTANTIATE_TEST_SUITE_P(StateLayouts, FusedExpertAdamW,
                         ::testing::Values(StateLayout{DType::BF16, false, DType::BF16},
                                           StateLayout{DType::F32, true, DType::F32},
                                           StateLayout{DType::F32, false, DType::BF16},
                                           StateLayout{DType::BF16, true, DType::F32}),
                         [](const ::testing::TestParamInfo<StateLayout>& info) {
                           return std::string(info.param.state == DType::BF16 ? "Bf16State"
                                                                              : "Fp32State") +
                                  (info.param.master ? "Master" : "NoMaster") +
                                  (info.param.grad == DType::BF16 ? "Bf16Grad" : "Fp32Grad");
                         });

// The fused kernel declines what it cannot take (fp32 weights and inputs): the backend then
// runs the separate ops.
TEST(FusedExpertAdamWFallback, DeclinesFp32) {
  if (!testing::hopper_gpu()) GTEST_SKIP() << "not an sm_90 device";
  auto gpu = make_cuda_backend(0);
  const Shape shape{2, 8, 8};
  Buffer w(DType::F32, shape, Device::CUDA), m(DType::F32, shape, Device::CUDA),
      v(DType::F32, shape, Device::CUDA);
  Buffer dy(DType::F32, Shape{4, 8}, Device::CUDA), x(DType::F32, Shape{4, 8}, Device::CUDA);
  Buffer offsets(DType::I32, Shape{3}, Device::CUDA);
  AdamWParam param{w.tensor(), Tensor(nullptr, DType::F32, shape, Device::CUDA),
                   m.tensor(), v.tensor(),
                   Tensor(),   0.0f};
  AdamWHyper hyper;
  EXPECT_FALSE(cuda::launch_grouped_gemm_weight_grad_adamw_sm90(
      dy.tensor(), x.tensor(), offsets.tensor(), param, hyper, Tensor(), nullptr));
}

// Microbenchmark: the Qwen3-30B-A3B expert weight gradients, fused vs separate.
TEST(FusedExpertAdamWBench, DISABLED_Qwen3Shapes) {
  if (!testing::hopper_gpu()) GTEST_SKIP() << "not an sm_90 device";
  auto gpu = make_cuda_backend(0);
  const int64_t experts = 128, rows = 32768, hidden = 2048, width = 768;
  std::mt19937 rng(7);
  for (bool skewed : {false, true}) {
    std::vector<double> weight(experts, 1.0);
    if (skewed) {
      std::normal_distribution<double> normal(0.0, 1.0);
      for (auto& w : weight) w = std::exp(normal(rng));
    }
    double total = 0;
    for (double w : weight) total += w;
    std::vector<int32_t> offsets(experts + 1, 0);
    for (int64_t e = 0; e < experts; ++e)
      offsets[e + 1] = offsets[e] + static_cast<int32_t>(rows * weight[e] / total);
    offsets[experts] = static_cast<int32_t>(rows);
    Buffer offsets_gpu(DType::I32, Shape{experts + 1}, Device::CUDA);
    gpu->copy(offsets_gpu.tensor(), Tensor(offsets.data(), DType::I32, Shape{experts + 1}));
    for (auto [p, q] : {std::pair<int64_t, int64_t>{2 * width, hidden}, {hidden, width}}) {
      const Shape shape{experts, p, q};
      Buffer dy(DType::BF16, Shape{rows, p}, Device::CUDA),
          x(DType::BF16, Shape{rows, q}, Device::CUDA);
      Buffer w(DType::BF16, shape, Device::CUDA), m(DType::BF16, shape, Device::CUDA),
          v(DType::BF16, shape, Device::CUDA), g(DType::BF16, shape, Device::CUDA);
      gpu->fill(dy.tensor(), 0.01f);
      gpu->fill(x.tensor(), 0.02f);
      Buffer norm(DType::F32, Shape{1}, Device::CUDA);
      AdamWParam param{w.tensor(), Tensor(nullptr, DType::BF16, shape, Device::CUDA),
                       m.tensor(), v.tensor(),
                       Tensor(),   0.01f};
      AdamWHyper hyper;
      auto time_ms = [&](auto&& run) {
        for (int i = 0; i < 3; ++i) run();
        gpu->synchronize();
        const auto start = std::chrono::steady_clock::now();
        const int repeat = 20;
        for (int i = 0; i < repeat; ++i) run();
        gpu->synchronize();
        return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                   .count() /
               repeat;
      };
      const double fused_ms = time_ms([&] {
        gpu->grouped_gemm_weight_grad_adamw(dy.tensor(), x.tensor(), offsets_gpu.tensor(), param,
                                            hyper, norm.tensor());
      });
      const double prefetched_ms = time_ms([&] {
        cuda::launch_grouped_gemm_weight_grad_adamw_sm90(
            dy.tensor(), x.tensor(), offsets_gpu.tensor(), param, hyper, norm.tensor(),
            static_cast<cudaStream_t>(gpu->stream()), /*prefetch=*/true);
      });
      const double gemm_ms = time_ms([&] {
        gpu->grouped_gemm_weight_grad(dy.tensor(), x.tensor(), offsets_gpu.tensor(), g.tensor(),
                                      false);
      });
      AdamWParam with_grad = param;
      with_grad.grad = g.tensor();
      const double separate_ms = time_ms([&] {
        gpu->grouped_gemm_weight_grad(dy.tensor(), x.tensor(), offsets_gpu.tensor(), g.tensor(),
                                      false);
        const Tensor grads[] = {g.tensor()};
        gpu->grad_norm_squared(grads, norm.tensor());
        gpu->adamw_update(std::span<const AdamWParam>(&with_grad, 1), hyper, 1.0f);
      });
      const double bytes = 10.0 * shape.numel();  // w, m, v read and written (bf16)
      std::printf(
          "%s routing, dw (%lld, %lld, %lld): fused %.3f ms (%.0f GB/s of AdamW state; with "
          "the L2 prefetch %.3f ms), separate %.3f ms (GEMM alone %.3f), saved %.3f ms\n",
          skewed ? "skewed" : "balanced", (long long)experts, (long long)p, (long long)q, fused_ms,
          bytes / fused_ms / 1e6, prefetched_ms, separate_ms, gemm_ms, separate_ms - fused_ms);
    }
  }
}

}  // namespace
}  // namespace moetune
