// CUDA moe_regroup_by_expert (the expert-parallel regroup, one block per (peer, local
// expert)) against the CPU reference: exact integer equality on awkward counts (local
// experts without rows, a silent peer, a rank receiving nothing, blocks of more rows than
// threads), from the sizes of tests up to Qwen3-30B-A3B's 128 experts over 8 ranks.
// Outputs on the GPU are poisoned first, so an unwritten entry fails.
// Also the expert-parallel dispatcher's chunked pipeline on one GPU (one rank, a
// LocalCommunicator: the exchanges are device copies, but the side stream, its fences and
// the grouped GEMMs on slices of the experts are the real ones): a MoE layer's forward and
// backward with 1, 2, 4 and 8 chunks against the local dispatcher, fp32 and bf16.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <random>
#include <vector>

#include "dist/communicator.h"
#include "io/model_config.h"
#include "model/expert_parallel_dispatch.h"
#include "model/moe.h"
#include "ops/backend.h"

namespace moetune {
namespace {

struct Case {
  int peers, local;
  int max_count;
};

std::vector<int32_t> to_host(Backend& gpu, const Buffer& buffer) {
  std::vector<int32_t> values(static_cast<size_t>(buffer.shape().numel()));
  gpu.copy(Tensor(values.data(), DType::I32, buffer.shape()), buffer.tensor());
  gpu.synchronize();
  return values;
}

TEST(CudaMoeRegroup, MatchesCpu) {
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend(0);
  std::mt19937 rng(11);
  for (const Case& c : {Case{1, 1, 5}, Case{2, 3, 4}, Case{3, 2, 0}, Case{4, 8, 700},
                        Case{8, 16, 300}, Case{2, 64, 50}}) {
    const int experts = c.peers * c.local;
    const int64_t width = experts + 1;
    std::vector<int32_t> peer_offsets(static_cast<size_t>(c.peers * width), 0);
    std::uniform_int_distribution<int> count(0, c.max_count);
    for (int p = 0; p < c.peers; ++p)
      for (int g = 0; g < experts; ++g) {
        const bool silent = c.peers > 2 && p == 1;  // sends nothing
        const int n = silent || rng() % 4 == 0 ? 0 : count(rng);
        peer_offsets[p * width + g + 1] = peer_offsets[p * width + g] + n;
      }
    const Tensor host_offsets(peer_offsets.data(), DType::I32, {c.peers, width});
    Buffer device_offsets(DType::I32, {c.peers, width}, Device::CUDA);
    gpu->copy(device_offsets, host_offsets);
    for (int rank = 0; rank < c.peers; ++rank) {
      const int64_t first = int64_t(rank) * c.local;
      int64_t rows = 0;
      for (int p = 0; p < c.peers; ++p)
        rows += peer_offsets[p * width + first + c.local] - peer_offsets[p * width + first];
      Buffer cpu_out(DType::I32, {c.local + 1 + 2 * rows}, Device::CPU);
      Buffer gpu_out(DType::I32, {c.local + 1 + 2 * rows}, Device::CUDA);
      gpu->fill(gpu_out, -7.0f);  // poison (I32 fill through the float value)
      auto views = [&](const Buffer& b) {
        int32_t* base = b.ptr<int32_t>();
        const Device d = b.tensor().device;
        return std::vector<Tensor>{Tensor(base, DType::I32, {c.local + 1}, d),
                                   Tensor(base + c.local + 1, DType::I32, {rows}, d),
                                   Tensor(base + c.local + 1 + rows, DType::I32, {rows}, d)};
      };
      const auto cv = views(cpu_out), gv = views(gpu_out);
      cpu->moe_regroup_by_expert(host_offsets, first, cv[0], cv[1], cv[2]);
      gpu->moe_regroup_by_expert(device_offsets, first, gv[0], gv[1], gv[2]);
      const std::vector<int32_t> expected(cpu_out.ptr<int32_t>(),
                                          cpu_out.ptr<int32_t>() + cpu_out.shape().numel());
      EXPECT_EQ(to_host(*gpu, gpu_out), expected)
          << c.peers << " peers, " << c.local << " local experts, rank " << rank << ", " << rows
          << " rows";
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

// chunks 0: the local dispatcher.
LayerRun run_layer(Backend& gpu, DType dtype, int chunks) {
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
  auto dispatcher = chunks == 0 ? make_local_dispatcher(gpu, E, k)
                                : make_expert_parallel_dispatcher(gpu, comm, config, chunks);
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

class CudaChunkedDispatch : public ::testing::TestWithParam<DType> {};

TEST_P(CudaChunkedDispatch, MatchesTheLocalDispatcher) {
  auto gpu = make_cuda_backend(0);
  const double tolerance = GetParam() == DType::BF16 ? 2e-2 : 1e-4;
  const LayerRun local = run_layer(*gpu, GetParam(), 0);
  for (int chunks : {1, 2, 4, 8}) {
    const LayerRun ep = run_layer(*gpu, GetParam(), chunks);
    EXPECT_LE(relative_difference(ep.out, local.out), tolerance) << chunks << " chunks: out";
    EXPECT_LE(relative_difference(ep.dx, local.dx), tolerance) << chunks << " chunks: dx";
    EXPECT_LE(relative_difference(ep.drouter, local.drouter), tolerance) << chunks << ": drouter";
    EXPECT_LE(relative_difference(ep.dgate_up, local.dgate_up), tolerance)
        << chunks << " chunks: dgate_up";
    EXPECT_LE(relative_difference(ep.ddown, local.ddown), tolerance) << chunks << " chunks: ddown";
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaChunkedDispatch, ::testing::Values(DType::F32, DType::BF16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace moetune
