// CUDA moe_regroup_by_expert (the expert-parallel regroup, one block per (peer, local
// expert)) against the CPU reference: exact integer equality on awkward counts (local
// experts without rows, a silent peer, a rank receiving nothing, blocks of more rows than
// threads), from the sizes of tests up to Qwen3-30B-A3B's 128 experts over 8 ranks.
// Outputs on the GPU are poisoned first, so an unwritten entry fails.
#include <gtest/gtest.h>

#include <random>
#include <vector>

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

}  // namespace
}  // namespace moetune
