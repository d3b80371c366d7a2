// The expert-parallel token exchange on one GPU: its ops (moe_rank_ids, moe_local_ids, and
// the gather, gather backward and combine over a prefix of a sort) against the CPU on awkward
// shapes, and the dispatcher on one rank (a LocalCommunicator: the exchanges are device
// copies, but the side stream, its fence and the ops are the real ones): a MoE layer's
// forward and backward against the local dispatcher, fp32 and bf16.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "dist/communicator.h"
#include "io/model_config.h"
#include "model/expert_parallel_dispatch.h"
#include "model/moe.h"
#include "ops/backend.h"

namespace moetune {
namespace {

std::vector<int32_t> to_host_i32(Backend& gpu, const Tensor& t) {
  std::vector<int32_t> values(static_cast<size_t>(t.numel()));
  gpu.copy(Tensor(values.data(), DType::I32, t.shape), t);
  gpu.synchronize();
  return values;
}
std::vector<float> to_host_f32(Backend& gpu, const Tensor& t) {
  std::vector<float> values(static_cast<size_t>(t.numel()));
  gpu.copy(Tensor(values.data(), DType::F32, t.shape), t);
  gpu.synchronize();
  return values;
}

// The token exchange's ops on the GPU against the CPU: rank ids and local ids (exact), then a
// sort with a "none" bucket whose prefix drives the gather, the gather's backward and the
// combine (exact in fp32: the same sums in the same order). Awkward sizes: ranks holding
// none of a token's experts, a prefix of zero rows, rows not a multiple of the vector width.
TEST(CudaTokenExchangeOps, MatchCpu) {
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend(0);
  std::mt19937 rng(17);
  struct Case {
    int64_t tokens, top_k, ranks, per_rank, hidden;
  };
  for (const Case& c : {Case{1, 1, 1, 1, 8}, Case{37, 2, 4, 2, 12}, Case{300, 8, 4, 32, 64},
                        Case{129, 3, 8, 2, 5}}) {
    const int64_t E = c.ranks * c.per_rank, N = c.tokens, k = c.top_k;
    std::vector<int32_t> ids(static_cast<size_t>(N * k));
    for (int64_t n = 0; n < N; ++n) {  // k distinct experts, skewed to the first ranks
      std::vector<int32_t> all(static_cast<size_t>(E));
      for (int64_t e = 0; e < E; ++e) all[e] = static_cast<int32_t>(e);
      std::shuffle(all.begin(), all.end(), rng);
      std::partial_sort(all.begin(), all.begin() + k, all.end(), [&](int32_t a, int32_t b) {
        return (a * 7919 + n) % 5 < (b * 7919 + n) % 5;
      });
      std::copy(all.begin(), all.begin() + k, ids.begin() + n * k);
    }
    const Tensor host_ids(ids.data(), DType::I32, {N, k});
    Buffer device_ids(DType::I32, {N, k}, Device::CUDA);
    gpu->copy(device_ids, host_ids);
    for (int64_t rank = 0; rank < c.ranks; ++rank) {
      const std::string where = std::to_string(N) + " tokens, rank " + std::to_string(rank);
      // rank ids and their sort (ranks + 1 buckets)
      Buffer cpu_rank_ids(DType::I32, {N, c.ranks}),
          gpu_rank_ids(DType::I32, {N, c.ranks}, Device::CUDA);
      cpu->moe_rank_ids(host_ids, c.per_rank, cpu_rank_ids);
      gpu->moe_rank_ids(device_ids, c.per_rank, gpu_rank_ids);
      const std::vector<int32_t> rank_ids(cpu_rank_ids.ptr<int32_t>(),
                                          cpu_rank_ids.ptr<int32_t>() + N * c.ranks);
      EXPECT_EQ(to_host_i32(*gpu, gpu_rank_ids.tensor()), rank_ids) << where;
      // local ids of this rank, sorted with a "none" bucket; its prefix drives the row ops
      Buffer cpu_local(DType::I32, {N, k}), gpu_local(DType::I32, {N, k}, Device::CUDA);
      cpu->moe_local_ids(host_ids, rank * c.per_rank, c.per_rank, cpu_local);
      gpu->moe_local_ids(device_ids, rank * c.per_rank, c.per_rank, gpu_local);
      const std::vector<int32_t> local(cpu_local.ptr<int32_t>(), cpu_local.ptr<int32_t>() + N * k);
      EXPECT_EQ(to_host_i32(*gpu, gpu_local.tensor()), local) << where;
      Buffer offsets(DType::I32, {c.per_rank + 2}), sorted(DType::I32, {N * k}),
          slot_rows(DType::I32, {N * k});
      cpu->moe_sort_by_expert(cpu_local, static_cast<int>(c.per_rank + 1), offsets, sorted,
                              slot_rows);
      const int64_t M = offsets.ptr<int32_t>()[c.per_rank];  // rows of this rank's experts
      auto upload = [&](const Buffer& b) {
        Buffer d(b.dtype(), b.shape(), Device::CUDA);
        gpu->copy(d, b.tensor());
        return d;
      };
      const Buffer d_sorted = upload(sorted), d_slot_rows = upload(slot_rows);
      auto random = [&](Shape shape) {
        Buffer b(DType::F32, shape);
        std::uniform_real_distribution<float> u(-1.0f, 1.0f);
        for (int64_t i = 0; i < shape.numel(); ++i) b.ptr<float>()[i] = u(rng);
        return b;
      };
      const Buffer x = random({N, c.hidden}), y = random({std::max<int64_t>(M, 1), c.hidden});
      const Buffer weights = random({N, k}), d_x = upload(x), d_y = upload(y),
                   d_weights = upload(weights);
      const Tensor prefix = sorted.tensor().slice_rows(0, M);
      const Tensor d_prefix = d_sorted.tensor().slice_rows(0, M);
      // gather of the prefix
      Buffer rows(DType::F32, {std::max<int64_t>(M, 1), c.hidden});
      Buffer d_rows(DType::F32, {std::max<int64_t>(M, 1), c.hidden}, Device::CUDA);
      cpu->moe_gather(x, prefix, static_cast<int>(k), rows.tensor().slice_rows(0, M));
      gpu->moe_gather(d_x, d_prefix, static_cast<int>(k), d_rows.tensor().slice_rows(0, M));
      EXPECT_EQ(to_host_f32(*gpu, d_rows.tensor().slice_rows(0, M)),
                std::vector<float>(rows.ptr<float>(), rows.ptr<float>() + M * c.hidden))
          << where << ": gather";
      // its backward (slots past the prefix add nothing)
      Buffer dx(DType::F32, {N, c.hidden}), d_dx(DType::F32, {N, c.hidden}, Device::CUDA);
      cpu->fill(dx, 0.5f);
      gpu->fill(d_dx, 0.5f);
      cpu->moe_gather_backward(y.tensor().slice_rows(0, M), prefix, static_cast<int>(k), dx);
      gpu->moe_gather_backward(d_y.tensor().slice_rows(0, M), d_prefix, static_cast<int>(k), d_dx);
      EXPECT_EQ(to_host_f32(*gpu, d_dx.tensor()),
                std::vector<float>(dx.ptr<float>(), dx.ptr<float>() + N * c.hidden))
          << where << ": gather backward";
      // combine of the M rows (the other slots add nothing)
      Buffer out(DType::F32, {N, c.hidden}), d_out(DType::F32, {N, c.hidden}, Device::CUDA);
      cpu->moe_combine(y.tensor().slice_rows(0, M), weights, slot_rows, out);
      gpu->moe_combine(d_y.tensor().slice_rows(0, M), d_weights, d_slot_rows, d_out);
      const std::vector<float> got = to_host_f32(*gpu, d_out.tensor());
      for (int64_t i = 0; i < N * c.hidden; ++i)
        ASSERT_NEAR(got[i], out.ptr<float>()[i], 1e-5f) << where << ": combine at " << i;
    }
  }
}

struct LayerRun {
  std::vector<float> out, dx, drouter, dgate_up, ddown;
};

// Max |a - b| / max |b| over the elements.
double relative_difference(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, scale = 1e-30;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(double(a[i]) - double(b[i])));
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return diff / scale;
}

// The local dispatcher, or the expert-parallel one over one rank.
LayerRun run_layer(Backend& gpu, DType dtype, bool expert_parallel) {
  nlohmann::json json = {{"model_type", "qwen3_moe"},
                         {"vocab_size", 16},
                         {"hidden_size", 256},
                         {"intermediate_size", 256},
                         {"moe_intermediate_size", 128},
                         {"num_hidden_layers", 1},
                         {"num_attention_heads", 2},
                         {"num_key_value_heads", 1},
                         {"head_dim", 128},
                         {"num_experts", 8},
                         {"num_experts_per_tok", 2},
                         {"norm_topk_prob", true},
                         {"rms_norm_eps", 1e-6},
                         {"rope_theta", 10000.0},
                         {"max_position_embeddings", 32}};
  const ModelConfig config = parse_model_config(json, "chunked_layer");
  const int64_t N = 300, H = config.hidden_size, I = config.moe_intermediate_size;
  const int64_t E = config.num_experts, k = config.num_experts_per_tok;
  dist::LocalCommunicator comm(
      [](void* backend, const Tensor& dst, const Tensor& src) {
        static_cast<Backend*>(backend)->copy(dst, src);
      },
      &gpu);
  auto dispatcher = expert_parallel ? make_expert_parallel_dispatcher(gpu, comm, config)
                                    : make_local_dispatcher(gpu, E, k);
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> uniform(-0.5f, 0.5f);
  std::vector<Buffer> keep;
  auto make = [&](Shape shape) {
    std::vector<float> values(static_cast<size_t>(shape.numel()));
    for (float& v : values) v = uniform(rng);
    keep.emplace_back(dtype, shape, Device::CUDA);
    gpu.copy(keep.back(), Tensor(values.data(), DType::F32, shape));
    return keep.back().tensor();
  };
  const Tensor x = make({N, H}), dout = make({N, H});
  LayerWeights w, g;
  w.moe = g.moe = true;
  w.router = make({E, H});
  w.experts_gate_up = make({E, 2 * I, H});
  w.experts_down = make({E, H, I});
  g.router = make({E, H});
  g.experts_gate_up = make({E, 2 * I, H});  // garbage: overwritten
  g.experts_down = make({E, H, I});
  MoeSaved saved;
  MoeScratch scratch;
  allocate_moe(config, N, dtype, Device::CUDA, saved);
  allocate_moe_scratch(config, N, dtype, Device::CUDA, scratch);
  // Skewed fixed routing: experts 4 and 7 get nothing, expert 0 half of the slots.
  std::vector<int32_t> ids(static_cast<size_t>(N * k));
  const int32_t others[] = {1, 2, 3, 5, 6};
  for (int64_t n = 0; n < N; ++n) {
    ids[n * k] = n % 2 == 0 ? 0 : others[n % 5];
    ids[n * k + 1] = others[(n * 7 + 1) % 5] == ids[n * k] ? 6 : others[(n * 7 + 1) % 5];
    if (ids[n * k + 1] == ids[n * k]) ids[n * k + 1] = 5;
  }
  scratch.balanced_ids = Buffer(DType::I32, {N, k}, Device::CUDA);
  gpu.copy(scratch.balanced_ids, Tensor(ids.data(), DType::I32, {N, k}));
  Buffer out(dtype, {N, H}, Device::CUDA), dx(dtype, {N, H}, Device::CUDA);
  for (int repeat = 0; repeat < 2; ++repeat) {  // the second pass reuses every buffer
    moe_forward(gpu, *dispatcher, config, w, x, saved, scratch, out);
    moe_backward(gpu, *dispatcher, config, w, g, x, saved, Tensor(), dout, scratch, dx, false);
  }
  auto host = [&](const Tensor& t) {
    std::vector<float> values(static_cast<size_t>(t.numel()));
    gpu.copy(Tensor(values.data(), DType::F32, t.shape), t);
    gpu.synchronize();
    return values;
  };
  return {host(out), host(dx), host(g.router), host(g.experts_gate_up), host(g.experts_down)};
}

class CudaTokenExchange : public ::testing::TestWithParam<DType> {};

TEST_P(CudaTokenExchange, MatchesTheLocalDispatcher) {
  auto gpu = make_cuda_backend(0);
  const double tolerance = GetParam() == DType::BF16 ? 2e-2 : 1e-5;
  const LayerRun local = run_layer(*gpu, GetParam(), false);
  const LayerRun ep = run_layer(*gpu, GetParam(), true);
  EXPECT_LE(relative_difference(ep.out, local.out), tolerance) << "out";
  EXPECT_LE(relative_difference(ep.dx, local.dx), tolerance) << "dx";
  EXPECT_LE(relative_difference(ep.drouter, local.drouter), tolerance) << "drouter";
  EXPECT_LE(relative_difference(ep.dgate_up, local.dgate_up), tolerance) << "dgate_up";
  EXPECT_LE(relative_difference(ep.ddown, local.ddown), tolerance) << "ddown";
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaTokenExchange, ::testing::Values(DType::F32, DType::BF16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace moetune
