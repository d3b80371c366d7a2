// The optimizer in the backward on the GPU: a tiny Qwen3-MoE (bf16 weights, fp32 gradients
// and AdamW state with fp32 master weights, as the trainer) trained a few steps three ways -
// the plain whole-model AdamW step, InBackwardOptimizer inline on the ops' stream, and
// InBackwardOptimizer with the updates on the side stream beside the backward - must give
// bit-equal weights, AdamW state and (in-backward paths) gradient norms, and losses equal
// up to the loss sum's atomic accumulation order; the in-backward paths fuse the expert
// weights' updates into their gradient GEMMs (the default), and a fourth path inline without
// that fusion gives the same weights and state too (its norm, summed in other pieces, equal
// to rounding), and a fifth path overlapped with the updates on SMs of their own (an SM
// partition, InBackwardOptions::optimizer_sms; unfused) gives them too; with and
// without recompute, tied and untied embeddings. Sequence long enough (2 x 256) that the side
// stream's updates really run beside the next layers' backward.
// Also: the caching allocator does not hand a block freed on the side stream to the ops'
// stream before the side stream has passed the free; ops sharing the cuBLASLt workspace
// refuse the side stream; the profiler's per-op table counts nested ops once and keeps the
// side stream's ops apart.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "../test_model_fixtures.h"
#include "core/error.h"
#include "model/model.h"
#include "ops/backend.h"
#include "ops/cuda/cuda_profile.h"
#include "train/adamw.h"
#include "train/optimizer_in_backward.h"

namespace moetune {
namespace {

// The shared tiny Qwen3-MoE grown to sizes where the side stream has work to overlap
// (4 layers, layer 1 dense, 8 experts top-2, hidden 128, sequences of 256).
ModelConfig gpu_moe(bool tied) {
  return testing::tiny_moe_config({{"vocab_size", 384},
                                   {"hidden_size", 128},
                                   {"intermediate_size", 192},
                                   {"moe_intermediate_size", 64},
                                   {"num_hidden_layers", 4},
                                   {"num_attention_heads", 4},
                                   {"num_key_value_heads", 2},
                                   {"head_dim", 32},
                                   {"num_experts", 8},
                                   {"router_aux_loss_coef", 0.01},
                                   {"max_position_embeddings", 512},
                                   {"initializer_range", 0.05},
                                   {"tie_word_embeddings", tied}},
                                  "gpu_moe");
}

enum class Path { Plain, InBackward, Overlapped, InBackwardUnfused, OwnSms };

struct TrainedRun {
  std::vector<double> losses, norms;
  std::vector<Model::NamedHostTensor> weights;
  std::vector<std::vector<float>> state;  // AdamW state tensors, host fp32
};

TrainedRun train(Backend& backend, Path path, bool tied, bool recompute) {
  const ModelConfig config = gpu_moe(tied);
  ModelOptions options;
  options.param_dtype = DType::BF16;
  options.grad_dtype = DType::F32;
  options.recompute_layers = recompute;
  if (path != Path::Plain) options.grad_storage = GradientStorage::PerGroup;
  auto model = Model::random_init(config, 1234, backend, options);
  AdamWConfig adamw_config;
  adamw_config.weight_decay = 0.1;
  AdamW adamw(model->parameters(), backend, adamw_config);
  std::unique_ptr<InBackwardOptimizer> in_backward;
  if (path != Path::Plain) {
    InBackwardOptions in_backward_options;
    const bool overlap = path == Path::Overlapped || path == Path::OwnSms;
    const bool fused = path == Path::InBackward || path == Path::Overlapped;
    in_backward_options.overlap = overlap;
    in_backward_options.fuse_expert_updates = fused;
    if (path == Path::OwnSms) in_backward_options.optimizer_sms = 16;
    in_backward = std::make_unique<InBackwardOptimizer>(*model, adamw, in_backward_options);
    EXPECT_EQ(in_backward->overlapping(), overlap);
    EXPECT_EQ(in_backward->fuses_expert_updates(), fused);
    if (path == Path::OwnSms) {
      EXPECT_GE(in_backward->optimizer_sms(), 16);
    }
  }
  TrainedRun run;
  const int64_t B = 2, T = 256;
  for (int step = 0; step < 4; ++step) {
    // Every token trained (no label masked above 1).
    const testing::Tokens tokens =
        testing::make_tokens(B * T, 77 + step, config.vocab_size, /*masked_above=*/1.0f);
    const BatchView batch{B, T, tokens.ids, tokens.labels, {}, {}};
    const double lr = 1e-3 * (step + 1);
    model->zero_grads();
    if (in_backward) in_backward->begin_step(lr);
    const StepResult result = model->forward_backward(batch, 1.0f / float(B * (T - 1)));
    if (!in_backward) adamw.step(lr);
    run.losses.push_back(result.loss_sum);
    if (in_backward) run.norms.push_back(in_backward->grad_norm());
  }
  backend.synchronize();
  run.weights = model->hf_tensors_to_host(false);
  for (const auto& state : adamw.state_tensors()) {
    std::vector<float> values(static_cast<size_t>(state.tensor.numel()));
    backend.copy(Tensor(values.data(), DType::F32, state.tensor.shape), state.tensor);
    run.state.push_back(std::move(values));
  }
  backend.synchronize();
  return run;
}

void expect_same(const TrainedRun& a, const TrainedRun& b, const char* what) {
  // The loss sum is accumulated with atomics (the summation order varies from run to run),
  // so losses agree to rounding; weights, AdamW state and norms must be bit-equal.
  ASSERT_EQ(a.losses.size(), b.losses.size()) << what;
  for (size_t i = 0; i < a.losses.size(); ++i)
    EXPECT_NEAR(a.losses[i], b.losses[i], 1e-6 * std::abs(b.losses[i])) << what << ": step " << i;
  ASSERT_EQ(a.weights.size(), b.weights.size());
  for (size_t i = 0; i < a.weights.size(); ++i)
    EXPECT_TRUE(a.weights[i].values == b.weights[i].values) << what << ": " << a.weights[i].name;
  ASSERT_EQ(a.state.size(), b.state.size());
  for (size_t i = 0; i < a.state.size(); ++i)
    EXPECT_TRUE(a.state[i] == b.state[i]) << what << ": AdamW state " << i;
}

class CudaOptimizerInBackward : public ::testing::TestWithParam<std::tuple<bool, bool>> {};

TEST_P(CudaOptimizerInBackward, OverlappedInlineAndPlainAreBitIdentical) {
  const auto [tied, recompute] = GetParam();
  auto backend = make_cuda_backend(0);
  const TrainedRun plain = train(*backend, Path::Plain, tied, recompute);
  const TrainedRun in_backward = train(*backend, Path::InBackward, tied, recompute);
  const TrainedRun overlapped = train(*backend, Path::Overlapped, tied, recompute);
  const TrainedRun unfused = train(*backend, Path::InBackwardUnfused, tied, recompute);
  const TrainedRun own_sms = train(*backend, Path::OwnSms, tied, recompute);
  expect_same(plain, in_backward, "inline vs plain");
  expect_same(in_backward, overlapped, "overlapped vs inline");
  expect_same(plain, unfused, "inline without fused expert updates vs plain");
  expect_same(plain, own_sms, "overlapped on SMs of its own vs plain");
  ASSERT_EQ(own_sms.norms.size(), unfused.norms.size());
  for (size_t i = 0; i < own_sms.norms.size(); ++i)  // partials over other grids: to rounding
    EXPECT_NEAR(own_sms.norms[i], unfused.norms[i], 1e-6 * unfused.norms[i]) << "step " << i;
  EXPECT_EQ(in_backward.norms, overlapped.norms);
  ASSERT_EQ(unfused.norms.size(), in_backward.norms.size());
  for (size_t i = 0; i < unfused.norms.size(); ++i)
    EXPECT_NEAR(in_backward.norms[i], unfused.norms[i], 1e-6 * unfused.norms[i]) << "step " << i;
  for (double norm : overlapped.norms) EXPECT_TRUE(std::isfinite(norm) && norm > 0) << norm;
}

INSTANTIATE_TEST_SUITE_P(TiedRecompute, CudaOptimizerInBackward,
                         ::testing::Combine(::testing::Bool(), ::testing::Bool()));

TEST(CudaSideStream, FreedBlockWaitsForTheSideStream) {
  auto backend = make_cuda_backend(0);
  const int64_t floats = 777 * 512 / 4;  // a size no other allocation here uses
  // Two cached blocks of that size, so no cudaMalloc (which may synchronise) runs below.
  { Buffer a(DType::F32, {floats}, Device::CUDA), b(DType::F32, {floats}, Device::CUDA); }
  // Keep the ops' stream busy (~10 ms of 1 GiB fills), so the side stream (which starts
  // after every op enqueued so far) cannot have passed the free when the host allocates again.
  Buffer big(DType::F32, {int64_t(1) << 28}, Device::CUDA);
  for (int i = 0; i < 32; ++i) backend->fill(big, float(i));
  auto side = backend->make_side_stream(Backend::SideStreamPriority::Low);
  ASSERT_NE(side, nullptr);
  void* side_block = nullptr;
  {
    SideStreamOps on_side(side.get());
    Buffer scratch(DType::F32, {floats}, Device::CUDA);
    backend->fill(scratch, 2.0f);
    side_block = scratch.data();
  }  // freed on the side stream: the newest cached block without the rule
  Buffer reused(DType::F32, {floats}, Device::CUDA);
  EXPECT_NE(reused.data(), side_block) << "a block still in use on the side stream was reused";
  side->join();
  backend->synchronize();
  Buffer again(DType::F32, {floats}, Device::CUDA);  // the side stream has passed it now
  EXPECT_EQ(again.data(), side_block);
}

TEST(CudaSideStream, GemmRefusesTheSideStream) {
  auto backend = make_cuda_backend(0);
  auto side = backend->make_side_stream(Backend::SideStreamPriority::Low);
  Buffer a(DType::F32, {4, 4}, Device::CUDA), c(DType::F32, {4, 4}, Device::CUDA);
  {
    SideStreamOps on_side(side.get());
    EXPECT_THROW(backend->gemm(a, false, a, true, c), Error);
  }
  backend->gemm(a, false, a, true, c);  // back on the ops' stream
  backend->synchronize();
}

TEST(CudaProfile, OpsByNameNestedOnceSideApart) {
  auto backend = make_cuda_backend(0);
  auto side = backend->make_side_stream(Backend::SideStreamPriority::Low);
  // fp32 dw of bf16 inputs: grouped_gemm_weight_grad forms the bf16 partial and copy()s it.
  const int64_t E = 2, M = 16, P = 8, Q = 8;
  Buffer dy(DType::BF16, {M, P}, Device::CUDA), x(DType::BF16, {M, Q}, Device::CUDA);
  Buffer dw(DType::F32, {E, P, Q}, Device::CUDA), offsets(DType::I32, {E + 1}, Device::CUDA);
  std::vector<int32_t> host_offsets = {0, 10, 16};
  backend->copy(offsets, Tensor(host_offsets.data(), DType::I32, {E + 1}));
  Buffer grad(DType::F32, {1024}, Device::CUDA), norm(DType::F32, {1}, Device::CUDA);
  const std::vector<Tensor> grads = {grad.tensor()};
  cuda::begin_phase_profile(*backend);
  backend->grouped_gemm_weight_grad(dy, x, offsets, dw, /*accumulate=*/false);
  backend->fill(grad, 1.0f);
  {
    SideStreamOps on_side(side.get());
    backend->grad_norm_squared(grads, norm);
  }
  side->join();
  const cuda::PhaseTimes times = cuda::end_phase_profile(*backend);
  ASSERT_TRUE(times.ops.count("grouped_gemm_weight_grad"));
  EXPECT_EQ(times.ops.at("grouped_gemm_weight_grad").calls, 1);
  EXPECT_EQ(times.ops.count("copy"), 0u) << "the nested copy() was counted on its own";
  ASSERT_TRUE(times.ops.count("fill"));
  EXPECT_EQ(times.ops.at("fill").calls, 1);
  EXPECT_EQ(times.ops.count("grad_norm_squared"), 0u);
  ASSERT_TRUE(times.side_ops.count("grad_norm_squared"));
  EXPECT_EQ(times.side_ops.at("grad_norm_squared").calls, 1);
  EXPECT_GT(times.side_seconds[static_cast<int>(cuda::Phase::Optimizer)], 0.0);
  EXPECT_EQ(times.seconds[static_cast<int>(cuda::Phase::Optimizer)], 0.0);
  float host_norm = 0;
  backend->copy(Tensor(&host_norm, DType::F32, {1}), norm);
  EXPECT_EQ(host_norm, 1024.0f);
}

}  // namespace
}  // namespace moetune
