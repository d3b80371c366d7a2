// MoE routing on the device: router softmax + top-k + renormalisation (one warp per token),
// its backward, the aux-loss statistics, the stable counting sort of (token, choice) slots
// by expert, and the gather / weighted combine that move rows in and out of the
// expert-sorted buffer, and the expert-parallel token exchange's rank and local expert ids.
// No host synchronisation anywhere: expert offsets stay on the device.
//
// Counting sort (stable in slot order), three launches:
//   1. each block of 1024 slots counts its experts (warp __match_any_sync ranks) into
//      counts[e][block];
//   2. one block scans counts in (expert, block) order: base[e][block], expert_offsets;
//   3. each block recomputes its ranks and writes sorted_slots / slot_rows.
#include "ops/cuda/device_utils.cuh"
#include "ops/cuda/vector_access.cuh"

namespace moetune::cuda {

namespace {

constexpr int kSortBlock = 1024;

// One warp per token. Probabilities live in shared memory (E floats per warp).
template <typename scalar_t>
__global__ void router_forward_kernel(const scalar_t* logits, int64_t tokens, int experts,
                                      int top_k, bool normalize, float* probs, int32_t* topk_ids,
                                      float* topk_weights) {
  extern __shared__ float shared_probs[];
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t token = int64_t(blockIdx.x) * warps + warp;
  if (token >= tokens) return;
  float* p = shared_probs + warp * experts;
  float max_logit = -INFINITY;
  for (int e = lane; e < experts; e += 32) {
    p[e] = to_float(logits[token * experts + e]);
    max_logit = fmaxf(max_logit, p[e]);
  }
  max_logit = warp_max(max_logit);
  float sum = 0.0f;
  for (int e = lane; e < experts; e += 32) {
    p[e] = expf(p[e] - max_logit);
    sum += p[e];
  }
  sum = warp_sum(sum);
  const float inv = 1.0f / sum;
  for (int e = lane; e < experts; e += 32) {
    p[e] *= inv;
    probs[token * experts + e] = p[e];
  }
  __syncwarp();
  float picked_sum = 0.0f;
  float my_weight = 0.0f;  // lane j < top_k holds choice j
  int my_id = 0;
  for (int j = 0; j < top_k; ++j) {
    float best = -1.0f;
    int best_id = experts;
    for (int e = lane; e < experts; e += 32)
      if (p[e] > best) best = p[e], best_id = e;  // lane-local: strictly greater keeps lower index
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float other = __shfl_xor_sync(0xffffffffu, best, offset);
      const int other_id = __shfl_xor_sync(0xffffffffu, best_id, offset);
      if (other > best || (other == best && other_id < best_id)) best = other, best_id = other_id;
    }
    if (lane == j) my_weight = best, my_id = best_id;
    picked_sum += best;
    __syncwarp();
    if (lane == 0) p[best_id] = -2.0f;  // taken
    __syncwarp();
  }
  if (lane < top_k) {
    topk_ids[token * top_k + lane] = my_id;
    topk_weights[token * top_k + lane] = normalize ? my_weight / picked_sum : my_weight;
  }
}

// dp = aux_dprob + scatter of d(topk weights)/dp; dlogits = p * (dp - <p, dp>).
template <typename scalar_t>
__global__ void router_backward_kernel(const float* dtopk, const float* probs,
                                       const int32_t* topk_ids, int64_t tokens, int experts,
                                       int top_k, bool normalize, const float* aux_dprob,
                                       scalar_t* dlogits) {
  extern __shared__ float shared_dp[];
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t token = int64_t(blockIdx.x) * warps + warp;
  if (token >= tokens) return;
  float* dp = shared_dp + warp * experts;
  const float* p = probs + token * experts;
  for (int e = lane; e < experts; e += 32) dp[e] = aux_dprob ? aux_dprob[e] : 0.0f;
  __syncwarp();
  if (lane == 0) {
    float picked_sum = 0.0f, weighted = 0.0f;
    for (int j = 0; j < top_k; ++j) picked_sum += p[topk_ids[token * top_k + j]];
    for (int j = 0; j < top_k; ++j)
      weighted += dtopk[token * top_k + j] * p[topk_ids[token * top_k + j]] / picked_sum;
    for (int j = 0; j < top_k; ++j) {
      const int e = topk_ids[token * top_k + j];
      const float g = dtopk[token * top_k + j];
      dp[e] += normalize ? (g - weighted) / picked_sum : g;
    }
  }
  __syncwarp();
  float dot = 0.0f;
  for (int e = lane; e < experts; e += 32) dot += p[e] * dp[e];
  dot = warp_sum(dot);
  for (int e = lane; e < experts; e += 32)
    dlogits[token * experts + e] = from_float<scalar_t>(p[e] * (dp[e] - dot));
}

__global__ void router_aux_stats_kernel(const float* probs, const int32_t* topk_ids, int64_t tokens,
                                        int experts, int top_k, float* expert_counts,
                                        float* prob_sums) {
  const int e = blockIdx.x;
  float prob = 0.0f, count = 0.0f;
  for (int64_t n = threadIdx.x; n < tokens; n += blockDim.x) {
    prob += probs[n * experts + e];
    for (int j = 0; j < top_k; ++j) count += topk_ids[n * top_k + j] == e ? 1.0f : 0.0f;
  }
  prob = block_sum(prob);
  count = block_sum(count);
  if (threadIdx.x == 0) {
    expert_counts[e] += count;
    prob_sums[e] += prob;
  }
}

// Per slot of this block: its expert, rank among earlier same-expert slots of its warp,
// and per-warp counts in shared memory. Returns the expert (or -1 past the end).
__device__ int rank_in_block(const int32_t* topk_ids, int64_t slots, int experts, int* warp_counts,
                             int* rank) {
  const int64_t slot = int64_t(blockIdx.x) * kSortBlock + threadIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int expert = slot < slots ? topk_ids[slot] : -1;
  if (expert >= experts || expert < -1) expert = -1;  // out of range: dropped
  for (int i = threadIdx.x; i < 32 * experts; i += blockDim.x) warp_counts[i] = 0;
  __syncthreads();
  const unsigned peers = __match_any_sync(0xffffffffu, expert);
  *rank = __popc(peers & ((1u << lane) - 1u));
  if (expert >= 0 && *rank == 0) warp_counts[expert * 32 + warp] = __popc(peers);
  __syncthreads();
  return expert;
}

__global__ void sort_count_kernel(const int32_t* topk_ids, int64_t slots, int experts,
                                  int32_t* counts, int blocks) {
  extern __shared__ int warp_counts[];  // (experts, 32)
  int rank;
  rank_in_block(topk_ids, slots, experts, warp_counts, &rank);
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    int total = 0;
    for (int w = 0; w < 32; ++w) total += warp_counts[e * 32 + w];
    counts[int64_t(e) * blocks + blockIdx.x] = total;
  }
}

// Exclusive scan of counts (experts * blocks, expert-major) by one block, in place.
__global__ void sort_scan_kernel(int32_t* counts, int64_t length, int experts, int blocks,
                                 int32_t* expert_offsets) {
  __shared__ int32_t carry;
  __shared__ int32_t warp_sums[32];
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t start = 0; start < length; start += blockDim.x) {
    const int64_t i = start + threadIdx.x;
    const int32_t value = i < length ? counts[i] : 0;
    int32_t inclusive = value;
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int32_t other = __shfl_up_sync(0xffffffffu, inclusive, offset);
      if (lane >= offset) inclusive += other;
    }
    if (lane == 31) warp_sums[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
      int32_t sum = lane < int(blockDim.x / 32) ? warp_sums[lane] : 0;
      for (int offset = 1; offset < 32; offset <<= 1) {
        const int32_t other = __shfl_up_sync(0xffffffffu, sum, offset);
        if (lane >= offset) sum += other;
      }
      warp_sums[lane] = sum;  // inclusive over warps
    }
    __syncthreads();
    const int32_t exclusive = carry + (warp ? warp_sums[warp - 1] : 0) + inclusive - value;
    if (i < length) {
      counts[i] = exclusive;
      if (i % blocks == 0) expert_offsets[i / blocks] = exclusive;
    }
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) carry = exclusive + value;
    __syncthreads();
  }
  if (threadIdx.x == 0) expert_offsets[experts] = carry;
}

__global__ void sort_place_kernel(const int32_t* topk_ids, int64_t slots, int experts,
                                  const int32_t* base, int blocks, int32_t* sorted_slots,
                                  int32_t* slot_rows) {
  extern __shared__ int warp_counts[];
  int rank;
  const int expert = rank_in_block(topk_ids, slots, experts, warp_counts, &rank);
  const int64_t slot = int64_t(blockIdx.x) * kSortBlock + threadIdx.x;
  if (slot >= slots) return;
  if (expert < 0) {
    slot_rows[slot] = -1;
    return;
  }
  const int warp = threadIdx.x / 32;
  int before = 0;
  for (int w = 0; w < warp; ++w) before += warp_counts[expert * 32 + w];
  const int row = base[int64_t(expert) * blocks + blockIdx.x] + before + rank;
  sorted_slots[row] = static_cast<int32_t>(slot);
  slot_rows[slot] = row;
}

// The row kernels below take V consecutive elements per thread access (16-byte vectors when
// rows allow: vector_access.cuh; V = 1 otherwise); one block per row or token.

// out[r] = x[sorted_slots[r] / k]
template <typename scalar_t, int V>
__global__ void gather_kernel(const scalar_t* x, const int32_t* sorted_slots, int top_k,
                              scalar_t* out, int64_t hidden) {
  const int64_t row = blockIdx.x;
  const int64_t token = sorted_slots[row] / top_k;
  for (int64_t c = int64_t(threadIdx.x) * V; c < hidden; c += int64_t(blockDim.x) * V) {
    if constexpr (V * sizeof(scalar_t) == 16)
      *reinterpret_cast<uint4*>(out + row * hidden + c) =
          *reinterpret_cast<const uint4*>(x + token * hidden + c);
    else
      for (int i = 0; i < V; ++i) out[row * hidden + c + i] = x[token * hidden + c + i];
  }
}

// Rows narrower than a warp (the router weights of the slots: one fp32 each): one thread
// per element instead of a block per row.
template <typename scalar_t>
__global__ void gather_narrow_kernel(const scalar_t* x, const int32_t* sorted_slots, int top_k,
                                     scalar_t* out, int64_t rows, int64_t hidden) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= rows * hidden) return;
  const int64_t row = i / hidden, c = i % hidden;
  out[i] = x[int64_t(sorted_slots[row] / top_k) * hidden + c];
}
template <typename scalar_t>
__global__ void gather_backward_narrow_kernel(const scalar_t* dout, const int32_t* slot_rows,
                                              int top_k, scalar_t* dx, int64_t tokens,
                                              int64_t hidden) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= tokens * hidden) return;
  const int64_t token = i / hidden, c = i % hidden;
  float sum = to_float(dx[i]);
  for (int j = 0; j < top_k; ++j) {
    const int32_t row = slot_rows[token * top_k + j];
    if (row >= 0) sum += to_float(dout[int64_t(row) * hidden + c]);
  }
  dx[i] = from_float<scalar_t>(sum);
}

// rank_ids[n, p] = p if token n chose an expert of rank p, else ranks (one thread per token)
__global__ void rank_ids_kernel(const int32_t* topk_ids, int top_k, int64_t tokens,
                                int experts_per_rank, int ranks, int32_t* rank_ids) {
  const int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (n >= tokens) return;
  int32_t* row = rank_ids + n * ranks;
  for (int p = 0; p < ranks; ++p) row[p] = ranks;
  for (int j = 0; j < top_k; ++j) {
    const int p = topk_ids[n * top_k + j] / experts_per_rank;
    if (p >= 0 && p < ranks) row[p] = p;
  }
}

__global__ void local_ids_kernel(const int32_t* topk_ids, int64_t count, int first_expert,
                                 int local_experts, int32_t* local_ids) {
  const int64_t s = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (s >= count) return;
  const int local = topk_ids[s] - first_expert;
  local_ids[s] = local >= 0 && local < local_experts ? local : local_experts;
}

__global__ void invert_kernel(const int32_t* sorted_slots, int64_t rows, int32_t* slot_rows) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r < rows) slot_rows[sorted_slots[r]] = static_cast<int32_t>(r);
}

// dx[n] += sum_j dout[slot_rows[n*k+j]]  (deterministic: one block per token)
template <typename scalar_t, int V>
__global__ void gather_backward_kernel(const scalar_t* dout, const int32_t* slot_rows, int top_k,
                                       scalar_t* dx, int64_t hidden) {
  const int64_t token = blockIdx.x;
  for (int64_t c = int64_t(threadIdx.x) * V; c < hidden; c += int64_t(blockDim.x) * V) {
    float sum[V], part[V];
    load_vec<scalar_t, V>(dx + token * hidden + c, sum);
    for (int j = 0; j < top_k; ++j) {
      const int32_t row = slot_rows[token * top_k + j];
      if (row < 0) continue;
      load_vec<scalar_t, V>(dout + int64_t(row) * hidden + c, part);
#pragma unroll
      for (int i = 0; i < V; ++i) sum[i] += part[i];
    }
    store_vec<scalar_t, V>(dx + token * hidden + c, sum);
  }
}

template <typename scalar_t, int V>
__global__ void combine_kernel(const scalar_t* y, int64_t y_rows, const float* weights,
                               const int32_t* slot_rows, int top_k, scalar_t* out, int64_t hidden) {
  const int64_t token = blockIdx.x;
  for (int64_t c = int64_t(threadIdx.x) * V; c < hidden; c += int64_t(blockDim.x) * V) {
    float sum[V] = {}, part[V];
    for (int j = 0; j < top_k; ++j) {
      const int32_t row = slot_rows[token * top_k + j];
      if (row < 0 || row >= y_rows) continue;
      const float w = weights[token * top_k + j];
      load_vec<scalar_t, V>(y + int64_t(row) * hidden + c, part);
#pragma unroll
      for (int i = 0; i < V; ++i) sum[i] += w * part[i];
    }
    store_vec<scalar_t, V>(out + token * hidden + c, sum);
  }
}

int row_threads(int64_t d) {
  return static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, ceil_div(d, 32) * 32)));
}

}  // namespace

void launch_router_forward(const Tensor& logits, int top_k, bool normalize, const Tensor& probs,
                           const Tensor& topk_ids, const Tensor& topk_weights,
                           cudaStream_t stream) {
  check_float(logits, "router_forward logits");
  check_f32(probs, "router_forward probs");
  check_i32(topk_ids, "router_forward topk_ids");
  check_f32(topk_weights, "router_forward topk_weights");
  const int experts = static_cast<int>(logits.size(-1));
  const int64_t tokens = experts ? logits.numel() / experts : 0;
  if (top_k < 1 || top_k > experts || top_k > 32 || probs.numel() != logits.numel() ||
      topk_ids.numel() != tokens * top_k || topk_weights.numel() != tokens * top_k)
    fail("router_forward: logits ", logits.shape.str(), " top_k ", top_k, " probs ",
         probs.shape.str(), " topk_ids ", topk_ids.shape.str(), " do not fit");
  if (tokens == 0) return;
  const int warps = 4;
  MOETUNE_DISPATCH_FLOAT(logits.dtype, "router_forward", {
    router_forward_kernel<scalar_t>
        <<<ceil_div(tokens, warps), warps * 32, sizeof(float) * warps * experts, stream>>>(
            logits.ptr<scalar_t>(), tokens, experts, top_k, normalize, probs.ptr<float>(),
            topk_ids.ptr<int32_t>(), topk_weights.ptr<float>());
  });
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_router_backward(const Tensor& dtopk_weights, const Tensor& probs,
                            const Tensor& topk_ids, bool normalize, const Tensor& aux_dprob,
                            const Tensor& dlogits, cudaStream_t stream) {
  check_f32(dtopk_weights, "router_backward dtopk_weights");
  check_f32(probs, "router_backward probs");
  check_float(dlogits, "router_backward dlogits");
  const int experts = static_cast<int>(probs.size(-1));
  const int64_t tokens = experts ? probs.numel() / experts : 0;
  const int top_k = tokens ? static_cast<int>(topk_ids.numel() / tokens) : 1;
  if (dlogits.numel() != probs.numel() || dtopk_weights.numel() != topk_ids.numel() ||
      (present(aux_dprob) && aux_dprob.numel() != experts))
    fail("router_backward: probs ", probs.shape.str(), " dlogits ", dlogits.shape.str(), " dtopk ",
         dtopk_weights.shape.str(), " do not fit");
  if (tokens == 0) return;
  const float* aux = present(aux_dprob) ? aux_dprob.ptr<float>() : nullptr;
  const int warps = 4;
  MOETUNE_DISPATCH_FLOAT(dlogits.dtype, "router_backward", {
    router_backward_kernel<scalar_t>
        <<<ceil_div(tokens, warps), warps * 32, sizeof(float) * warps * experts, stream>>>(
            dtopk_weights.ptr<float>(), probs.ptr<float>(), topk_ids.ptr<int32_t>(), tokens,
            experts, top_k, normalize, aux, dlogits.ptr<scalar_t>());
  });
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_router_aux_stats(const Tensor& probs, const Tensor& topk_ids,
                             const Tensor& expert_counts, const Tensor& prob_sums,
                             cudaStream_t stream) {
  check_f32(probs, "router_aux_stats probs");
  check_f32(expert_counts, "router_aux_stats expert_counts");
  check_f32(prob_sums, "router_aux_stats prob_sums");
  const int experts = static_cast<int>(probs.size(-1));
  const int64_t tokens = experts ? probs.numel() / experts : 0;
  if (expert_counts.numel() != experts || prob_sums.numel() != experts)
    fail("router_aux_stats: expert_counts/prob_sums must have ", experts, " elements");
  if (tokens == 0) return;
  router_aux_stats_kernel<<<experts, 256, 0, stream>>>(
      probs.ptr<float>(), topk_ids.ptr<int32_t>(), tokens, experts,
      static_cast<int>(topk_ids.numel() / tokens), expert_counts.ptr<float>(),
      prob_sums.ptr<float>());
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_moe_sort(const Tensor& topk_ids, int num_experts, const Tensor& expert_offsets,
                     const Tensor& sorted_slots, const Tensor& slot_rows, Scratch& scratch,
                     cudaStream_t stream) {
  check_i32(topk_ids, "moe_sort_by_expert topk_ids");
  check_i32(expert_offsets, "moe_sort_by_expert expert_offsets");
  const int64_t slots = topk_ids.numel();
  if (expert_offsets.numel() != num_experts + 1 || sorted_slots.numel() != slots ||
      slot_rows.numel() != slots || num_experts < 1)
    fail("moe_sort_by_expert: expert_offsets ", expert_offsets.shape.str(), " sorted_slots ",
         sorted_slots.shape.str(), " slot_rows ", slot_rows.shape.str(), " do not fit ", slots,
         " slots, ", num_experts, " experts");
  const int blocks = static_cast<int>(std::max<int64_t>(1, ceil_div(slots, kSortBlock)));
  auto* counts = static_cast<int32_t*>(scratch.get(sizeof(int32_t) * num_experts * blocks));
  const size_t smem = sizeof(int) * 32 * num_experts;
  if (smem > 48 * 1024) {
    MOETUNE_CUDA_CHECK(cudaFuncSetAttribute(
        sort_count_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    MOETUNE_CUDA_CHECK(cudaFuncSetAttribute(
        sort_place_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  }
  sort_count_kernel<<<blocks, kSortBlock, smem, stream>>>(topk_ids.ptr<int32_t>(), slots,
                                                          num_experts, counts, blocks);
  MOETUNE_CUDA_LAUNCH_CHECK();
  sort_scan_kernel<<<1, 1024, 0, stream>>>(counts, int64_t(num_experts) * blocks, num_experts,
                                           blocks, expert_offsets.ptr<int32_t>());
  MOETUNE_CUDA_LAUNCH_CHECK();
  if (slots == 0) return;
  sort_place_kernel<<<blocks, kSortBlock, smem, stream>>>(
      topk_ids.ptr<int32_t>(), slots, num_experts, counts, blocks, sorted_slots.ptr<int32_t>(),
      slot_rows.ptr<int32_t>());
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_moe_gather(const Tensor& x, const Tensor& sorted_slots, int top_k, const Tensor& out,
                       cudaStream_t stream) {
  const int64_t hidden = x.size(-1), rows = sorted_slots.numel();
  if (out.numel() != rows * hidden || out.dtype != x.dtype || rows * hidden > x.numel() * top_k)
    fail("moe_gather: x ", x.shape.str(), " out ", out.shape.str(), " sorted_slots ",
         sorted_slots.shape.str(), " do not fit");
  if (rows == 0 || hidden == 0) return;
  MOETUNE_DISPATCH_FLOAT(x.dtype, "moe_gather", {
    constexpr int kVec = 16 / int(sizeof(scalar_t));
    if (hidden < 32)
      gather_narrow_kernel<scalar_t><<<ceil_div(rows * hidden, 256), 256, 0, stream>>>(
          x.ptr<scalar_t>(), sorted_slots.ptr<int32_t>(), top_k, out.ptr<scalar_t>(), rows, hidden);
    else if (vector_aligned(hidden, sizeof(scalar_t), {x.data, out.data}))
      gather_kernel<scalar_t, kVec><<<rows, row_threads(hidden / kVec), 0, stream>>>(
          x.ptr<scalar_t>(), sorted_slots.ptr<int32_t>(), top_k, out.ptr<scalar_t>(), hidden);
    else
      gather_kernel<scalar_t, 1><<<rows, row_threads(hidden), 0, stream>>>(
          x.ptr<scalar_t>(), sorted_slots.ptr<int32_t>(), top_k, out.ptr<scalar_t>(), hidden);
  });
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_moe_gather_backward(const Tensor& dout, const Tensor& sorted_slots, int top_k,
                                const Tensor& dx, Scratch& scratch, cudaStream_t stream) {
  const int64_t hidden = dx.size(-1), rows = sorted_slots.numel();
  const int64_t tokens = hidden ? dx.numel() / hidden : 0, slots = tokens * top_k;
  if (dout.numel() != rows * hidden || dout.dtype != dx.dtype || rows > slots)
    fail("moe_gather_backward: dout ", dout.shape.str(), " dx ", dx.shape.str(), " do not fit");
  if (rows == 0 || hidden == 0) return;
  // slot -> row, -1 for the slots past a prefix (they add nothing)
  auto* slot_rows = static_cast<int32_t*>(scratch.get(sizeof(int32_t) * slots));
  if (rows < slots)
    MOETUNE_CUDA_CHECK(cudaMemsetAsync(slot_rows, 0xff, sizeof(int32_t) * slots, stream));
  invert_kernel<<<ceil_div(rows, 256), 256, 0, stream>>>(sorted_slots.ptr<int32_t>(), rows,
                                                         slot_rows);
  MOETUNE_CUDA_LAUNCH_CHECK();
  MOETUNE_DISPATCH_FLOAT(dx.dtype, "moe_gather_backward", {
    constexpr int kVec = 16 / int(sizeof(scalar_t));
    if (hidden < 32)
      gather_backward_narrow_kernel<scalar_t><<<ceil_div(tokens * hidden, 256), 256, 0, stream>>>(
          dout.ptr<scalar_t>(), slot_rows, top_k, dx.ptr<scalar_t>(), tokens, hidden);
    else if (vector_aligned(hidden, sizeof(scalar_t), {dout.data, dx.data}))
      gather_backward_kernel<scalar_t, kVec><<<tokens, row_threads(hidden / kVec), 0, stream>>>(
          dout.ptr<scalar_t>(), slot_rows, top_k, dx.ptr<scalar_t>(), hidden);
    else
      gather_backward_kernel<scalar_t, 1><<<tokens, row_threads(hidden), 0, stream>>>(
          dout.ptr<scalar_t>(), slot_rows, top_k, dx.ptr<scalar_t>(), hidden);
  });
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_moe_combine(const Tensor& y, const Tensor& weights, const Tensor& slot_rows,
                        const Tensor& out, cudaStream_t stream) {
  check_f32(weights, "moe_combine weights");
  const int64_t hidden = out.size(-1), tokens = hidden ? out.numel() / hidden : 0;
  const int top_k = tokens ? static_cast<int>(weights.numel() / tokens) : 1;
  const int64_t y_rows = hidden ? y.numel() / hidden : 0;  // rows of slots past y add nothing
  if (y.numel() != y_rows * hidden || y_rows > tokens * top_k ||
      slot_rows.numel() != tokens * top_k || y.dtype != out.dtype)
    fail("moe_combine: y ", y.shape.str(), " weights ", weights.shape.str(), " out ",
         out.shape.str(), " do not fit");
  if (tokens == 0) return;
  MOETUNE_DISPATCH_FLOAT(out.dtype, "moe_combine", {
    constexpr int kVec = 16 / int(sizeof(scalar_t));
    if (vector_aligned(hidden, sizeof(scalar_t), {y.data, out.data}))
      combine_kernel<scalar_t, kVec><<<tokens, row_threads(hidden / kVec), 0, stream>>>(
          y.ptr<scalar_t>(), y_rows, weights.ptr<float>(), slot_rows.ptr<int32_t>(), top_k,
          out.ptr<scalar_t>(), hidden);
    else
      combine_kernel<scalar_t, 1><<<tokens, row_threads(hidden), 0, stream>>>(
          y.ptr<scalar_t>(), y_rows, weights.ptr<float>(), slot_rows.ptr<int32_t>(), top_k,
          out.ptr<scalar_t>(), hidden);
  });
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_moe_rank_ids(const Tensor& topk_ids, int64_t experts_per_rank, const Tensor& rank_ids,
                         cudaStream_t stream) {
  check_i32(topk_ids, "moe_rank_ids topk_ids");
  check_i32(rank_ids, "moe_rank_ids rank_ids");
  if (topk_ids.rank() != 2 || rank_ids.rank() != 2 || rank_ids.size(0) != topk_ids.size(0) ||
      experts_per_rank < 1)
    fail("moe_rank_ids: topk_ids ", topk_ids.shape.str(), " rank_ids ", rank_ids.shape.str(),
         " experts_per_rank ", experts_per_rank, " do not fit");
  const int64_t tokens = topk_ids.size(0);
  if (tokens == 0) return;
  rank_ids_kernel<<<ceil_div(tokens, 128), 128, 0, stream>>>(
      topk_ids.ptr<int32_t>(), static_cast<int>(topk_ids.size(1)), tokens,
      static_cast<int>(experts_per_rank), static_cast<int>(rank_ids.size(1)),
      rank_ids.ptr<int32_t>());
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_moe_local_ids(const Tensor& topk_ids, int64_t first_expert, int64_t local_experts,
                          const Tensor& local_ids, cudaStream_t stream) {
  check_i32(topk_ids, "moe_local_ids topk_ids");
  check_i32(local_ids, "moe_local_ids local_ids");
  if (local_ids.numel() != topk_ids.numel() || first_expert < 0 || local_experts < 1)
    fail("moe_local_ids: topk_ids ", topk_ids.shape.str(), " local_ids ", local_ids.shape.str(),
         " first_expert ", first_expert, " local_experts ", local_experts, " do not fit");
  const int64_t count = topk_ids.numel();
  if (count == 0) return;
  local_ids_kernel<<<ceil_div(count, 256), 256, 0, stream>>>(
      topk_ids.ptr<int32_t>(), count, static_cast<int>(first_expert),
      static_cast<int>(local_experts), local_ids.ptr<int32_t>());
  MOETUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace moetune::cuda
