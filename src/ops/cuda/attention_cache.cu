// Attention of new queries over a KV cache (generation, forward only): query i at position
// past + i sees cache rows [0, past + i], GQA (query head h reads KV head h / (Hq / Hkv)).
// One block of 4 warps per (query, head): each warp runs an online softmax over every 4th
// key (a lane holds head_dim / 32 accumulators), then the 4 partial (max, sum, acc) merge in
// shared memory. O(L) per query and head, no scratch; decode is bandwidth-bound on the cache.
#include "ops/cuda/device_utils.cuh"

namespace moetune::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kMaxPerLane = 8;  // head_dim <= 256

struct CacheDims {
  int64_t queries, past, q_heads, kv_heads, head_dim;
  float scale;
};

template <typename scalar_t>
__global__ void attention_cached_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v,
                                        CacheDims d, scalar_t* out) {
  const int64_t i = blockIdx.x / d.q_heads, h = blockIdx.x % d.q_heads;
  const int64_t hk = h / (d.q_heads / d.kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const scalar_t* qr = q + (i * d.q_heads + h) * d.head_dim;
  float qv[kMaxPerLane], acc[kMaxPerLane];
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int64_t c = lane + 32 * e;
    qv[e] = c < d.head_dim ? to_float(qr[c]) * d.scale : 0.0f;
    acc[e] = 0.0f;
  }
  float running_max = -INFINITY, running_sum = 0.0f;
  const int64_t visible = d.past + i + 1;
  for (int64_t j = warp; j < visible; j += kWarps) {
    const int64_t kv_index = (j * d.kv_heads + hk) * d.head_dim;
    float s = 0.0f;
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int64_t c = lane + 32 * e;
      if (c < d.head_dim) s += qv[e] * to_float(k[kv_index + c]);
    }
    s = warp_sum(s);
    const float new_max = fmaxf(running_max, s);
    const float correction = expf(running_max - new_max), p = expf(s - new_max);
    running_sum = running_sum * correction + p;
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int64_t c = lane + 32 * e;
      if (c < d.head_dim) acc[e] = acc[e] * correction + p * to_float(v[kv_index + c]);
    }
    running_max = new_max;
  }
  // Merge the warps' partial softmaxes (a warp with no key has max -inf and sum 0).
  __shared__ float warp_max_s[kWarps], warp_sum_s[kWarps];
  __shared__ float warp_acc[kWarps][32 * kMaxPerLane];
  if (lane == 0) {
    warp_max_s[warp] = running_max;
    warp_sum_s[warp] = running_sum;
  }
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) warp_acc[warp][lane + 32 * e] = acc[e];
  __syncthreads();
  if (warp != 0) return;
  float total_max = -INFINITY;
  for (int w = 0; w < kWarps; ++w) total_max = fmaxf(total_max, warp_max_s[w]);
  float total_sum = 0.0f, weight[kWarps];
  for (int w = 0; w < kWarps; ++w) {
    weight[w] = warp_sum_s[w] > 0.0f ? expf(warp_max_s[w] - total_max) : 0.0f;
    total_sum += warp_sum_s[w] * weight[w];
  }
  scalar_t* o = out + (i * d.q_heads + h) * d.head_dim;
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int64_t c = lane + 32 * e;
    if (c >= d.head_dim) continue;
    float value = 0.0f;
    for (int w = 0; w < kWarps; ++w) value += warp_acc[w][lane + 32 * e] * weight[w];
    o[c] = from_float<scalar_t>(value / total_sum);
  }
}

}  // namespace

void launch_attention_cached_forward(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                     int64_t past, float scale, const Tensor& out,
                                     cudaStream_t stream) {
  const char* op = "attention_cached_forward";
  check_float(q, op);
  if (q.rank() != 3 || k_cache.rank() != 3 || k_cache.size(2) != q.size(2) ||
      v_cache.shape != k_cache.shape || k_cache.dtype != q.dtype || v_cache.dtype != q.dtype ||
      out.shape != q.shape || out.dtype != q.dtype)
    fail(op, ": q ", q.shape.str(), " k_cache ", k_cache.shape.str(), " v_cache ",
         v_cache.shape.str(), " out ", out.shape.str(),
         " must be (n, Hq, D), (L, Hkv, D), (L, Hkv, D), (n, Hq, D) of one dtype");
  const CacheDims d{q.size(0), past, q.size(1), k_cache.size(1), q.size(2), scale};
  if (d.kv_heads == 0 || d.q_heads % d.kv_heads != 0)
    fail(op, ": query heads (", d.q_heads, ") must be a multiple of KV heads (", d.kv_heads, ")");
  if (d.head_dim > 32 * kMaxPerLane) fail(op, ": head_dim ", d.head_dim, " > ", 32 * kMaxPerLane);
  if (past < 0 || past + d.queries > k_cache.size(0))
    fail(op, ": positions [", past, ", ", past + d.queries, ") do not fit a cache of ",
         k_cache.size(0));
  const int64_t blocks = d.queries * d.q_heads;
  if (blocks == 0) return;
  MOETUNE_DISPATCH_FLOAT(q.dtype, op, {
    attention_cached_kernel<scalar_t><<<static_cast<unsigned>(blocks), 32 * kWarps, 0, stream>>>(
        q.ptr<scalar_t>(), k_cache.ptr<scalar_t>(), v_cache.ptr<scalar_t>(), d,
        out.ptr<scalar_t>());
  });
  MOETUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace moetune::cuda
