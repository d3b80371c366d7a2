// Helpers of cuDNN's variable-length attention for packed rows (attention_cudnn.cpp): each
// document of doc_offsets becomes one "sequence" of a ragged (THD) batch, so each is causal on
// its own and no mask is ever materialised.
// - packed_sequences: per sequence slot, its length and the element offsets of its first token
//   in Q/O (tokens * Hq * D), K/V (tokens * Hkv * D) and the softmax stats (tokens * Hq). Slots
//   past the last document (the batch is rounded up so few graphs get built) have length 0
//   and start at the end.
// - lse layout: cuDNN's ragged stats are token-major (N, Hq); the Backend's lse is (B, Hq, T).
#include <algorithm>

#include "ops/cuda/device_utils.cuh"

namespace moetune::cuda {

namespace {

__global__ void packed_sequences_kernel(const int32_t* doc_offsets, int64_t docs, int64_t slots,
                                        int64_t q_width, int64_t kv_width, int64_t stats_width,
                                        int32_t* seq_len, int64_t* q_offsets, int64_t* kv_offsets,
                                        int64_t* stats_offsets) {
  const int64_t slot = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (slot > slots) return;
  const int64_t start = doc_offsets[slot < docs ? slot : docs];
  q_offsets[slot] = start * q_width;
  kv_offsets[slot] = start * kv_width;
  stats_offsets[slot] = start * stats_width;
  if (slot < slots) seq_len[slot] = slot < docs ? doc_offsets[slot + 1] - doc_offsets[slot] : 0;
}

// (B, H, T) <-> (B*T, H): element (b, h, t) <-> ((b * T + t), h).
__global__ void lse_layout_kernel(const float* src, float* dst, int64_t batch, int64_t heads,
                                  int64_t seq, bool to_tokens) {
  const int64_t n = batch * heads * seq;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i % seq, h = (i / seq) % heads, b = i / (seq * heads);
    const int64_t token_major = (b * seq + t) * heads + h;
    if (to_tokens)
      dst[token_major] = src[i];
    else
      dst[i] = src[token_major];
  }
}

}  // namespace

void launch_packed_sequences(const Tensor& doc_offsets, int64_t slots, int64_t q_width,
                             int64_t kv_width, int64_t stats_width, int32_t* seq_len,
                             int64_t* q_offsets, int64_t* kv_offsets, int64_t* stats_offsets,
                             cudaStream_t stream) {
  check_i32(doc_offsets, "attention doc_offsets");
  const int64_t docs = doc_offsets.numel() - 1;
  if (docs < 1 || slots < docs) fail("packed attention: ", docs, " documents in ", slots, " slots");
  packed_sequences_kernel<<<static_cast<unsigned>(ceil_div(slots + 1, 256)), 256, 0, stream>>>(
      doc_offsets.ptr<int32_t>(), docs, slots, q_width, kv_width, stats_width, seq_len, q_offsets,
      kv_offsets, stats_offsets);
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_lse_layout(const float* src, float* dst, int64_t batch, int64_t heads, int64_t seq,
                       bool to_tokens, cudaStream_t stream) {
  const int64_t n = batch * heads * seq;
  if (n == 0) return;
  const int grid = static_cast<int>(std::min<int64_t>(ceil_div(n, 256), 65536));
  lse_layout_kernel<<<grid, 256, 0, stream>>>(src, dst, batch, heads, seq, to_tokens);
  MOETUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace moetune::cuda
