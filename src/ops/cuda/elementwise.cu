// Memory-bound kernels: fill, dtype conversion, add, bias, embedding, RMSNorm (with the fused
// residual add), rotary embedding and SwiGLU (and the experts' SwiGLU backward with the
// router weights, which also sums each row's <dh, h>). The training step's hot ones (norms, RoPE,
// SwiGLU) move 16-byte vectors (ops/cuda/vector_access.cuh) when the row width and pointers
// allow, with single-element instantiations otherwise; norm rows of up to 256 vectors
// (forward) are held in registers by a group of lanes of one warp, up to 512 (backward: 2
// vectors a thread) by a group of up to 8 warps (shuffle reductions, named barriers across
// warps, grid sized to the GPU); wider rows take a block (forward) or a warp (backward) each. Flat
// grid-stride loops elsewhere. Secondary operands (weights, biases) are read through `load_any`, a
// uniform run-time dtype branch, so each kernel is compiled once or twice rather than for every
// dtype combination.
#include <algorithm>

#include "ops/cuda/device_memory.h"
#include "ops/cuda/device_utils.cuh"
#include "ops/cuda/vector_access.cuh"

namespace moetune::cuda {

namespace {

int grid_for(int64_t n, int threads = 256) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, threads), 65536)));
}

__global__ void fill_kernel(void* dst, Kind kind, int64_t n, float value) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    store_any(dst, kind, i, value);
}
__global__ void fill_i32_kernel(int32_t* dst, int64_t n, int32_t value) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = value;
}
__global__ void convert_kernel(void* dst, Kind dst_kind, const void* src, Kind src_kind,
                               int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    store_any(dst, dst_kind, i, load_any(src, src_kind, i));
}
__global__ void add_kernel(void* out, Kind ko, const void* a, Kind ka, const void* b, Kind kb,
                           int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    store_any(out, ko, i, load_any(a, ka, i) + load_any(b, kb, i));
}
__global__ void add_bias_kernel(void* x, Kind kx, const void* bias, Kind kb, int64_t n, int64_t d) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    store_any(x, kx, i, load_any(x, kx, i) + load_any(bias, kb, i % d));
}
// One thread per column, rows walked in order (coalesced across the warp).
// accumulate false overwrites dbias without reading it.
__global__ void bias_backward_kernel(const void* dy, Kind kdy, void* dbias, Kind kb, int64_t rows,
                                     int64_t d, bool accumulate) {
  const int64_t col = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (col >= d) return;
  float sum = 0.0f;
  for (int64_t r = 0; r < rows; ++r) sum += load_any(dy, kdy, r * d + col);
  store_any(dbias, kb, col, accumulate ? load_any(dbias, kb, col) + sum : sum);
}

__global__ void embedding_forward_kernel(const int32_t* ids, const void* table, Kind kt,
                                         int64_t vocab, void* out, Kind ko, int64_t hidden) {
  const int64_t n = blockIdx.x;
  const int32_t id = ids[n];
  const bool valid = id >= 0 && id < vocab;
  for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x)
    store_any(out, ko, n * hidden + c,
              valid ? load_any(table, kt, int64_t(id) * hidden + c) : 0.0f);
}
// Deterministic scatter-add without atomics: the block of the first token with a given id
// lists (warp 0, ballots in token order) every later token with that id in shared memory,
// then sums their gradient rows in token order and adds once. O(N) id reads per block.
constexpr int kMaxRepeats = 2048;
__global__ void embedding_backward_kernel(const int32_t* ids, int64_t tokens, const void* dout,
                                          Kind kd, void* dtable, Kind kt, int64_t vocab,
                                          int64_t hidden) {
  const int64_t n = blockIdx.x;
  const int32_t id = ids[n];
  if (id < 0 || id >= vocab) return;
  __shared__ int earlier, count;
  __shared__ int32_t repeats[kMaxRepeats];
  if (threadIdx.x == 0) earlier = 0, count = 0;
  __syncthreads();
  for (int64_t m = threadIdx.x; m < n; m += blockDim.x)
    if (ids[m] == id) earlier = 1;
  __syncthreads();
  if (earlier) return;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int listed = 0;
    for (int64_t base = n; base < tokens; base += 32) {
      const int64_t m = base + lane;
      const bool hit = m < tokens && ids[m] == id;
      const unsigned mask = __ballot_sync(0xffffffffu, hit);
      const int at = listed + __popc(mask & ((1u << lane) - 1u));
      if (hit && at < kMaxRepeats) repeats[at] = static_cast<int32_t>(m);
      listed += __popc(mask);
    }
    if (lane == 0) count = listed;
  }
  __syncthreads();
  const int listed = min(count, kMaxRepeats);
  const int64_t rest =
      listed == kMaxRepeats ? int64_t(repeats[kMaxRepeats - 1]) + 1 : tokens;  // past the list
  for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) {
    float sum = 0.0f;
    for (int i = 0; i < listed; ++i) sum += load_any(dout, kd, int64_t(repeats[i]) * hidden + c);
    for (int64_t m = rest; m < tokens; ++m)  // only when an id repeats more than kMaxRepeats times
      if (ids[m] == id) sum += load_any(dout, kd, m * hidden + c);
    const int64_t at = int64_t(id) * hidden + c;
    store_any(dtable, kt, at, load_any(dtable, kt, at) + sum);
  }
}

// ---- RMSNorm ------------------------------------------------------------------------
// out = weight * round(x * rstd); optional fused residual += delta first (x is residual).
// Two kernels. Rows up to 256 vectors (2048 bf16 / 1024 fp32 elements with 16-byte vectors)
// sit in registers: a group of `group` lanes of one warp (a power of two, 1 to 32) takes a
// row, its lane `sub` holding the vectors sub, sub + group, ... (CHUNKS of them, V elements
// each, in the storage dtype), so the row is read from memory once and its sum of squares
// needs only log2(group) shuffles; a warp takes 32 / group rows at once, the rows strided
// over the grid's warps (grid sized to the GPU). CHUNKS >= 4 keeps 4+ loads in flight per
// lane (Qwen3's q/k norm rows of 128: 4 lanes per row, 8 rows per warp). The weight is
// staged once per block in shared memory as fp32, in the order of weight_slot. Wider rows
// take the block-per-row kernel below (two passes over the row, the second from cache).

// Shared-memory slot of weight column c with 16-byte vectors of V elements: plane i / 4 of
// float4s, so the lanes of a warp reading the same plane of consecutive vectors hit
// consecutive 16 bytes (no bank conflicts).
template <int V>
__device__ __forceinline__ int64_t weight_slot(int64_t c, int64_t vectors) {
  if constexpr (V % 4 == 0) {
    const int64_t vec = c / V, i = c % V;
    return ((i / 4) * vectors + vec) * 4 + i % 4;
  } else {
    return c;
  }
}
// Stages weight (d) in shared memory as fp32 and waits for the block.
template <int V>
__device__ __forceinline__ void stage_weight(float* staged, const void* weight, Kind kw,
                                             int64_t d) {
  const int64_t vectors = d / V;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x)
    staged[weight_slot<V>(c, vectors)] = load_any(weight, kw, c);
  __syncthreads();
}
template <int V>
__device__ __forceinline__ void staged_weight_vec(const float* staged, int64_t vectors, int64_t vec,
                                                  float (&w)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int plane = 0; plane < V / 4; ++plane) {
      const float4 f = reinterpret_cast<const float4*>(staged)[plane * vectors + vec];
      w[plane * 4 + 0] = f.x;
      w[plane * 4 + 1] = f.y;
      w[plane * 4 + 2] = f.z;
      w[plane * 4 + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) w[i] = staged[vec * V + i];
  }
}
// Sum over the `group` lanes of a row (every lane of the warp calls it).
__device__ __forceinline__ float group_sum(float value, int group) {
  for (int offset = group >> 1; offset > 0; offset >>= 1)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

constexpr int kRowThreads = 256;

// Host-side split of a row of `vectors` vectors over lanes: chunks 0 when it is too wide.
struct RowSplit {
  int chunks = 0, group = 0;
};
RowSplit row_split(int64_t vectors) {
  if (vectors > 8 * 32) return {};
  int chunks = 4;
  while (chunks < 8 && chunks * 32 < vectors) chunks *= 2;
  int group = 1;
  while (group * chunks < vectors) group *= 2;
  return {chunks, group};
}

// The backward's split: kBackwardChunks vectors per thread, groups of up to a block.
constexpr int kBackwardChunks = 2;
RowSplit backward_split(int64_t vectors) {
  if (vectors > int64_t(kBackwardChunks) * kRowThreads) return {};
  int group = 1;
  while (group * kBackwardChunks < vectors) group *= 2;
  return {kBackwardChunks, group};
}

// Vectors of a row that lane `sub` of its group holds: sub, sub + group, ... below `vectors`.
__device__ __forceinline__ int lane_chunks(int64_t vectors, int sub, int group) {
  return vectors > sub ? int((vectors - sub + group - 1) / group) : 0;
}

// delta is read as scalar_t vectors when V > 1 (the launcher checks its dtype and
// alignment), else through load_any.
template <typename scalar_t, int V, int CHUNKS>
__global__ void __launch_bounds__(kRowThreads)
    rmsnorm_forward_rows_kernel(scalar_t* x, const void* delta, Kind kdelta, const void* weight,
                                Kind kw, float eps, scalar_t* out, float* rstd, int64_t rows,
                                int64_t d, int group) {
  extern __shared__ __align__(16) float staged[];  // (d) weight, weight_slot order
  stage_weight<V>(staged, weight, kw, d);
  const int lane = threadIdx.x & 31, sub = lane & (group - 1), stride = group * V;
  const int64_t vectors = d / V, rows_per_warp = 32 / group;
  const int held = lane_chunks(vectors, sub, group);  // <= CHUNKS
  const int64_t step = int64_t(gridDim.x) * (blockDim.x >> 5) * rows_per_warp;
  for (int64_t base =
           (int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5)) * rows_per_warp;
       base < rows; base += step) {  // uniform over the warp (the shuffles need every lane)
    const int64_t row = base + lane / group;
    const int chunks = row < rows ? held : 0;
    const int64_t first = row * d + sub * V;  // this lane's first element
    scalar_t* x_lane = x + first;
    Packed<scalar_t, V> v[CHUNKS];
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k)
      if (k < chunks) v[k] = load_packed<scalar_t, V>(x_lane + k * stride);
    if (delta) {
#pragma unroll
      for (int k = 0; k < CHUNKS; ++k) {
        if (k >= chunks) continue;
        float dv[V];
        if constexpr (V > 1)
          load_vec<scalar_t, V>(static_cast<const scalar_t*>(delta) + first + k * stride, dv);
        else
          dv[0] = load_any(delta, kdelta, first + k * stride);
#pragma unroll
        for (int i = 0; i < V; ++i) v[k].v[i] = from_float<scalar_t>(to_float(v[k].v[i]) + dv[i]);
        store_packed<scalar_t, V>(x_lane + k * stride, v[k]);
      }
    }
    float sum_sq = 0.0f;
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k)
      if (k < chunks)
#pragma unroll
        for (int i = 0; i < V; ++i) sum_sq += to_float(v[k].v[i]) * to_float(v[k].v[i]);
    const float inv = rsqrtf(group_sum(sum_sq, group) / float(d) + eps);
    if (chunks > 0 && sub == 0) rstd[row] = inv;
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k) {
      if (k >= chunks) continue;
      float w[V], o[V];
      staged_weight_vec<V>(staged, vectors, sub + k * group, w);
#pragma unroll
      for (int i = 0; i < V; ++i)
        o[i] = to_float(from_float<scalar_t>(to_float(v[k].v[i]) * inv)) * w[i];
      store_vec<scalar_t, V>(out + first + k * stride, o);
    }
  }
}

// Block per row (rows wider than rmsnorm_forward_rows_kernel holds), V elements per access.
template <typename scalar_t, int V>
__global__ void rmsnorm_forward_kernel(scalar_t* x, const void* delta, Kind kdelta,
                                       const void* weight, Kind kw, float eps, scalar_t* out,
                                       float* rstd, int64_t d) {
  const int64_t row = blockIdx.x;
  scalar_t* xr = x + row * d;
  float sum_sq = 0.0f;
  for (int64_t c = int64_t(threadIdx.x) * V; c < d; c += int64_t(blockDim.x) * V) {
    float value[V];
    load_vec<scalar_t, V>(xr + c, value);
    if (delta) {
      float dv[V];
      if constexpr (V > 1)
        load_vec<scalar_t, V>(static_cast<const scalar_t*>(delta) + row * d + c, dv);
      else
        dv[0] = load_any(delta, kdelta, row * d + c);
#pragma unroll
      for (int i = 0; i < V; ++i) value[i] = to_float(from_float<scalar_t>(value[i] + dv[i]));
      store_vec<scalar_t, V>(xr + c, value);
    }
#pragma unroll
    for (int i = 0; i < V; ++i) sum_sq += value[i] * value[i];
  }
  const float inv = rsqrtf(block_sum(sum_sq) / float(d) + eps);
  if (threadIdx.x == 0) rstd[row] = inv;
  for (int64_t c = int64_t(threadIdx.x) * V; c < d; c += int64_t(blockDim.x) * V) {
    float value[V];
    load_vec<scalar_t, V>(xr + c, value);
#pragma unroll
    for (int i = 0; i < V; ++i)
      value[i] = to_float(from_float<scalar_t>(value[i] * inv)) * load_any(weight, kw, c + i);
    store_vec<scalar_t, V>(out + row * d + c, value);
  }
}

// Backward over rows in registers. A row of `vectors` vectors is taken by `group` threads of
// the block (a power of two, 1 to 256: up to a warp, or 2 to 8 whole warps for hidden-size
// rows), thread `sub` of the group holding vectors sub and sub + group (CHUNKS = 2: dout, x
// and, when accumulating, the old dx, loaded together up front), so a thread keeps few
// registers and the SM holds 3 or 4 blocks of 256 threads (backward_blocks_per_sm). dx = rstd * (g
// - xhat * mean(g * xhat)), g = dout * w: the row's dot sums by shuffles over the group's lanes
// and, for multi-warp groups, over its warps through shared memory (double-buffered, one named
// barrier per row). dweight: each of the block's kRowThreads / group row slots has its own row of
// sums in shared memory (weight_slot order; at most kRowThreads * CHUNKS * V floats in all), each
// thread adding dout * xhat of its columns there (no other thread touches them, so no
// atomics and no registers held across rows); the block then sums its slots in order into
// its partial (deterministic).
// Blocks of kRowThreads per SM the backward's registers allow: 3 with bf16 16-byte vectors (80
// registers; capped at 64 they spill), 4 otherwise (64).
template <typename scalar_t, int V>
constexpr int backward_blocks_per_sm() {
  return sizeof(scalar_t) == 2 && V > 1 ? 3 : 4;
}
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
template <int V>
__device__ __forceinline__ void add_staged_vec(float* staged, int64_t vectors, int64_t vec,
                                               const float (&add)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int plane = 0; plane < V / 4; ++plane) {
      float4& f = reinterpret_cast<float4*>(staged)[plane * vectors + vec];
      float4 sum = f;
      sum.x += add[plane * 4 + 0];
      sum.y += add[plane * 4 + 1];
      sum.z += add[plane * 4 + 2];
      sum.w += add[plane * 4 + 3];
      f = sum;
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) staged[vec * V + i] += add[i];
  }
}
template <typename scalar_t, int V, int CHUNKS>
__global__ void __launch_bounds__(kRowThreads, (backward_blocks_per_sm<scalar_t, V>()))
    rmsnorm_backward_rows_kernel(const scalar_t* dout, const scalar_t* x, const void* weight,
                                 Kind kw, const float* rstd, scalar_t* dx, bool accumulate,
                                 float* dweight_partial, int64_t rows, int64_t d, int group) {
  // (d) weight, then (kRowThreads / group, d) dweight sums, both in weight_slot order
  extern __shared__ __align__(16) float staged[];
  __shared__ float warp_dots[2][kRowThreads / 32];  // multi-warp groups' partial dots
  const int64_t vectors = d / V, slots = kRowThreads / group;
  float* dweight_sums = staged + d;
  for (int64_t c = threadIdx.x; c < slots * d; c += kRowThreads) dweight_sums[c] = 0.0f;
  stage_weight<V>(staged, weight, kw, d);  // and waits for the block
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = threadIdx.x & (group - 1), slot = threadIdx.x / group;
  const int stride = group * V, lanes = group < 32 ? group : 32;
  const int group_warps = group / lanes;  // warps per row (1 unless group > 32)
  float* my_sums = dweight_sums + slot * d;
  const int held = lane_chunks(vectors, sub, group);  // <= CHUNKS
  int parity = 0;
  // Uniform over the block (the multi-warp groups' barriers need every thread of the row).
  for (int64_t base = int64_t(blockIdx.x) * slots; base < rows;
       base += int64_t(gridDim.x) * slots) {
    const int64_t row = base + slot;
    const int chunks = row < rows ? held : 0;
    const int64_t first = row * d + sub * V;  // this thread's first element
    const float inv = chunks > 0 ? rstd[row] : 0.0f;
    Packed<scalar_t, V> g[CHUNKS], xv[CHUNKS], old[CHUNKS];
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k) {
      if (k >= chunks) continue;
      g[k] = load_packed<scalar_t, V>(dout + first + k * stride);
      xv[k] = load_packed<scalar_t, V>(x + first + k * stride);
      if (accumulate) old[k] = load_packed<scalar_t, V>(dx + first + k * stride);
    }
    float dot = 0.0f;
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k) {
      if (k >= chunks) continue;
      float w[V], gx[V];
      staged_weight_vec<V>(staged, vectors, sub + k * group, w);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        gx[i] = to_float(g[k].v[i]) * (to_float(xv[k].v[i]) * inv);
        dot += gx[i] * w[i];
      }
      add_staged_vec<V>(my_sums, vectors, sub + k * group, gx);
    }
    dot = group_sum(dot, lanes);
    if (group_warps > 1) {  // uniform over the block
      if (lane == 0) warp_dots[parity][warp] = dot;
      named_barrier(1 + slot, group);
      const int first_warp = warp & ~(group_warps - 1);
      dot = 0.0f;
#pragma unroll
      for (int w = 0; w < kRowThreads / 32; ++w)
        if (w < group_warps) dot += warp_dots[parity][first_warp + w];
      parity ^= 1;  // the next row's writes go to the other buffer (no second barrier)
    }
    const float mean = dot / float(d);
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k) {
      if (k >= chunks) continue;
      float w[V], value[V];
      staged_weight_vec<V>(staged, vectors, sub + k * group, w);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float gw = to_float(g[k].v[i]) * w[i];
        const float delta = inv * (gw - to_float(xv[k].v[i]) * inv * mean);
        value[i] = accumulate ? to_float(old[k].v[i]) + delta : delta;
      }
      store_vec<scalar_t, V>(dx + first + k * stride, value);
    }
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < d; c += kRowThreads) {
    const int64_t at = weight_slot<V>(c, vectors);
    float sum = 0.0f;
    for (int64_t s = 0; s < slots; ++s) sum += dweight_sums[s * d + at];
    dweight_partial[blockIdx.x * d + c] = sum;
  }
}

// Backward for rows wider than rmsnorm_backward_rows_kernel holds.
// dx = rstd * (g - xhat * mean(g * xhat)), g = dout * w. One warp per row, the rows
// strided over the grid's warps, so a row's mean needs only a warp shuffle. Each lane takes
// V consecutive columns per access (16-byte loads when
// the row allows: V = 16 / sizeof(scalar_t)). dweight = sum over rows of dout * xhat: each
// warp sums its rows into its own shared-memory row, the block adds its warps' rows into its
// partial, and sum_partials_kernel adds the blocks' partials in a fixed order (deterministic).
// In a warp's dweight row column c = 32 V k + V lane + i sits at 32 V k + 32 i + lane, so the
// lanes' updates of one i hit 32 different banks; rows are padded to a multiple of 32 V.
template <int V>
__host__ __device__ __forceinline__ int64_t dweight_slot(int64_t c) {
  const int64_t chunk = c / (32 * V), r = c % (32 * V);
  return chunk * 32 * V + (r % V) * 32 + r / V;
}
template <int V>
__host__ __device__ __forceinline__ int64_t dweight_row_floats(int64_t d) {
  return (d + 32 * V - 1) / (32 * V) * (32 * V);
}

template <typename scalar_t, int V>
__global__ void rmsnorm_backward_kernel(const scalar_t* dout, const scalar_t* x, const void* weight,
                                        Kind kw, const float* rstd, scalar_t* dx, bool accumulate,
                                        float* dweight_partial, int64_t rows, int64_t d) {
  extern __shared__ float dw_warps[];  // (warps, dweight_row_floats(d)), slots dweight_slot
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int64_t row_floats = dweight_row_floats<V>(d);
  float* dw = dw_warps + warp * row_floats;
  for (int64_t c = lane; c < row_floats; c += 32) dw[c] = 0.0f;
  __syncwarp();
  for (int64_t row = int64_t(blockIdx.x) * warps + warp; row < rows;
       row += int64_t(gridDim.x) * warps) {
    const float inv = rstd[row];
    const scalar_t* g_row = dout + row * d;
    const scalar_t* x_row = x + row * d;
    float dot = 0.0f;
    for (int64_t c = int64_t(lane) * V; c < d; c += 32 * V) {
      float g[V], xv[V];
      load_vec<scalar_t, V>(g_row + c, g);
      load_vec<scalar_t, V>(x_row + c, xv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float xhat = xv[i] * inv;
        dot += g[i] * load_any(weight, kw, c + i) * xhat;
        dw[c - lane * V + i * 32 + lane] += g[i] * xhat;  // dweight_slot(c + i)
      }
    }
    const float mean = warp_sum(dot) / float(d);
    for (int64_t c = int64_t(lane) * V; c < d; c += 32 * V) {
      float g[V], xv[V], value[V];
      load_vec<scalar_t, V>(g_row + c, g);
      load_vec<scalar_t, V>(x_row + c, xv);
      if (accumulate) load_vec<scalar_t, V>(dx + row * d + c, value);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float gw = g[i] * load_any(weight, kw, c + i);
        const float delta = inv * (gw - xv[i] * inv * mean);
        value[i] = accumulate ? value[i] + delta : delta;
      }
      store_vec<scalar_t, V>(dx + row * d + c, value);
    }
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    float sum = 0.0f;
    const int64_t slot = dweight_slot<V>(c);
    for (int w = 0; w < warps; ++w) sum += dw_warps[w * row_floats + slot];
    dweight_partial[blockIdx.x * d + c] = sum;
  }
}

// out[c] (+)= sum over blocks of partial[block, c]: 32 columns per block, its 32 thread rows
// each summing every 32nd block's partial, then those 32 sums in order.
__global__ void sum_partials_kernel(const float* partial, int blocks, void* out, Kind ko, int64_t d,
                                    bool accumulate) {
  __shared__ float sums[32][33];
  const int64_t c = blockIdx.x * int64_t(32) + threadIdx.x;
  float sum = 0.0f;
  if (c < d)
    for (int b = threadIdx.y; b < blocks; b += 32) sum += partial[int64_t(b) * d + c];
  sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y != 0 || c >= d) return;
  float total = 0.0f;
  for (int r = 0; r < 32; ++r) total += sums[r][threadIdx.x];
  store_any(out, ko, c, accumulate ? load_any(out, ko, c) + total : total);
}

// HF rotate_half: pairs (i, i + D/2) rotate by angle position * inv_freq[i] (fp32 math).
// A thread takes V consecutive pairs of one token for `group_heads` (<= kRopeHeads) heads:
// it computes their V angles' cos and sin once (not once per head), loads the
// 2 * group_heads vectors of V elements first (16-byte loads in flight together: in-place
// updates would otherwise keep the compiler from hoisting a head's loads above the previous
// head's stores), then rotates and stores them.
constexpr int kRopeHeads = 8;
template <typename scalar_t, int V>
__global__ void rope_kernel(scalar_t* x, const int32_t* positions, const float* inv_freq,
                            int64_t tokens, int64_t heads, int64_t half, int group_heads,
                            float direction) {
  const int64_t vectors = half / V, head_groups = (heads + group_heads - 1) / group_heads;
  const int64_t total = tokens * head_groups * vectors;
  for (int64_t item = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; item < total;
       item += int64_t(gridDim.x) * blockDim.x) {
    const int64_t pair = (item % vectors) * V;
    const int64_t head_group = (item / vectors) % head_groups;
    const int64_t token = item / (vectors * head_groups);
    const float position = float(positions[token]);
    float cos_v[V], sin_v[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      sincosf(position * inv_freq[pair + i], &sin_v[i], &cos_v[i]);
      sin_v[i] *= direction;
    }
    const int64_t first_head = head_group * group_heads;
    const int here = heads - first_head < group_heads ? int(heads - first_head) : group_heads;
    scalar_t* token_x = x + (token * heads + first_head) * 2 * half + pair;
    Packed<scalar_t, V> lo[kRopeHeads], hi[kRopeHeads];
#pragma unroll
    for (int h = 0; h < kRopeHeads; ++h) {
      if (h >= here) continue;
      lo[h] = load_packed<scalar_t, V>(token_x + h * 2 * half);
      hi[h] = load_packed<scalar_t, V>(token_x + h * 2 * half + half);
    }
#pragma unroll
    for (int h = 0; h < kRopeHeads; ++h) {
      if (h >= here) continue;
      Packed<scalar_t, V> new_lo, new_hi;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float x1 = to_float(lo[h].v[i]), x2 = to_float(hi[h].v[i]);
        new_lo.v[i] = from_float<scalar_t>(x1 * cos_v[i] - x2 * sin_v[i]);
        new_hi.v[i] = from_float<scalar_t>(x2 * cos_v[i] + x1 * sin_v[i]);
      }
      store_packed<scalar_t, V>(token_x + h * 2 * half, new_lo);
      store_packed<scalar_t, V>(token_x + h * 2 * half + half, new_hi);
    }
  }
}

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + __expf(-v)); }

// SwiGLU: a block walks rows (grid-strided), its threads V consecutive columns each (16-byte
// loads of gate and up, stores of out), so no per-element division by the row width.
template <typename scalar_t, int V>
__global__ void swiglu_forward_kernel(const scalar_t* gate_up, scalar_t* out, int64_t rows,
                                      int64_t width) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const scalar_t* gate_row = gate_up + r * 2 * width;
    for (int64_t c = int64_t(threadIdx.x) * V; c < width; c += int64_t(blockDim.x) * V) {
      float g[V], u[V], o[V];
      load_vec<scalar_t, V>(gate_row + c, g);
      load_vec<scalar_t, V>(gate_row + width + c, u);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float silu = to_float(from_float<scalar_t>(g[i] * sigmoid(g[i])));
        o[i] = silu * u[i];
      }
      store_vec<scalar_t, V>(out + r * width + c, o);
    }
  }
}
template <typename scalar_t, int V>
__global__ void swiglu_backward_kernel(const scalar_t* dout, const scalar_t* gate_up,
                                       scalar_t* dgate_up, int64_t rows, int64_t width) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const scalar_t* gate_row = gate_up + r * 2 * width;
    scalar_t* dgate_row = dgate_up + r * 2 * width;
    for (int64_t c = int64_t(threadIdx.x) * V; c < width; c += int64_t(blockDim.x) * V) {
      float g[V], u[V], d[V], dg[V], du[V];
      load_vec<scalar_t, V>(gate_row + c, g);
      load_vec<scalar_t, V>(gate_row + width + c, u);
      load_vec<scalar_t, V>(dout + r * width + c, d);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float sg = sigmoid(g[i]);
        dg[i] = d[i] * u[i] * sg * (1.0f + g[i] * (1.0f - sg));
        du[i] = d[i] * g[i] * sg;
      }
      store_vec<scalar_t, V>(dgate_row + c, dg);
      store_vec<scalar_t, V>(dgate_row + width + c, du);
    }
  }
}

// The experts' SwiGLU backward with the router weights (Backend::moe_swiglu_backward): as
// swiglu_backward, times the row's weight w, plus weighted_hidden = w * h (h as the forward
// stored it: silu rounded, then times up, rounded) and the row's <dh, h> by a block sum.
template <typename scalar_t, int V>
__global__ void moe_swiglu_backward_kernel(const scalar_t* dh, const scalar_t* gate_up,
                                           const float* row_weights, scalar_t* dgate_up,
                                           scalar_t* weighted_hidden, float* drow_weights,
                                           int64_t rows, int64_t width) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const scalar_t* gate_row = gate_up + r * 2 * width;
    scalar_t* dgate_row = dgate_up + r * 2 * width;
    const float w = row_weights[r];
    float dot = 0.0f;
    for (int64_t c = int64_t(threadIdx.x) * V; c < width; c += int64_t(blockDim.x) * V) {
      float g[V], u[V], d[V], dg[V], du[V], h[V];
      load_vec<scalar_t, V>(gate_row + c, g);
      load_vec<scalar_t, V>(gate_row + width + c, u);
      load_vec<scalar_t, V>(dh + r * width + c, d);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float sg = sigmoid(g[i]);
        const float silu = to_float(from_float<scalar_t>(g[i] * sg));
        const float hidden = to_float(from_float<scalar_t>(silu * u[i]));
        dot += d[i] * hidden;
        h[i] = w * hidden;
        dg[i] = w * d[i] * u[i] * sg * (1.0f + g[i] * (1.0f - sg));
        du[i] = w * d[i] * silu;
      }
      store_vec<scalar_t, V>(dgate_row + c, dg);
      store_vec<scalar_t, V>(dgate_row + width + c, du);
      store_vec<scalar_t, V>(weighted_hidden + r * width + c, h);
    }
    dot = block_sum(dot);
    if (threadIdx.x == 0) drow_weights[r] = dot;
  }
}

int row_threads(int64_t d) {
  return static_cast<int>(std::min<int64_t>(512, std::max<int64_t>(32, ceil_div(d, 32) * 32)));
}

int sm_count() {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess)
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms;
}

// Blocks of kRowThreads for a rows kernel: one per kRowThreads / group rows, at most as many as
// the GPU holds at once (the kernels stride over the rest). Depends only on the kernel and
// the GPU, so the backward's dweight summation order is the same run to run.
template <typename Kernel>
int rows_grid(Kernel kernel, size_t smem, int64_t rows, int group) {
  int per_sm = 0;
  MOETUNE_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kRowThreads, int(smem)));
  const int64_t rows_per_block = kRowThreads / group;
  return static_cast<int>(std::clamp<int64_t>(ceil_div(rows, rows_per_block), 1,
                                              int64_t(std::max(per_sm, 1)) * sm_count()));
}

// Blocks for the SwiGLU kernels: one per row, at most as many as the GPU holds at once.
int swiglu_grid(int64_t rows, int threads) {
  const int64_t resident = int64_t(sm_count()) * std::max(1, 2048 / threads);
  return static_cast<int>(std::clamp<int64_t>(rows, 1, resident));
}

// Calls BODY with kVector (16-byte vectors of scalar_t, or 1 when `vectorised` is false)
// and kChunks (4 or 8, split.chunks) bound as constants.
#define MOETUNE_DISPATCH_ROWS(VECTORISED, CHUNKS, ...)    \
  do {                                                    \
    if (VECTORISED) {                                     \
      constexpr int kVector = 16 / int(sizeof(scalar_t)); \
      if ((CHUNKS) == 4) {                                \
        constexpr int kChunks = 4;                        \
        __VA_ARGS__;                                      \
      } else {                                            \
        constexpr int kChunks = 8;                        \
        __VA_ARGS__;                                      \
      }                                                   \
    } else {                                              \
      constexpr int kVector = 1;                          \
      if ((CHUNKS) == 4) {                                \
        constexpr int kChunks = 4;                        \
        __VA_ARGS__;                                      \
      } else {                                            \
        constexpr int kChunks = 8;                        \
        __VA_ARGS__;                                      \
      }                                                   \
    }                                                     \
  } while (0)

}  // namespace

void check_float(const Tensor& t, const char* what) {
  if (t.dtype != DType::F32 && t.dtype != DType::BF16)
    fail(what, ": expected an F32 or BF16 tensor, got ", dtype_name(t.dtype), " ", t.shape.str());
  if (t.numel() > 0 && t.device != Device::CUDA) fail(what, ": tensor is not on the CUDA device");
}
void check_f32(const Tensor& t, const char* what) {
  if (t.dtype != DType::F32) fail(what, ": expected an F32 tensor, got ", dtype_name(t.dtype));
  if (t.numel() > 0 && t.device != Device::CUDA) fail(what, ": tensor is not on the CUDA device");
}
void check_i32(const Tensor& t, const char* what) {
  if (t.dtype != DType::I32) fail(what, ": expected an I32 tensor, got ", dtype_name(t.dtype));
  if (t.numel() > 0 && t.device != Device::CUDA) fail(what, ": tensor is not on the CUDA device");
}

void launch_fill(const Tensor& dst, float value, cudaStream_t stream) {
  if (dst.numel() == 0) return;
  if (dst.dtype == DType::I32) {
    fill_i32_kernel<<<grid_for(dst.numel()), 256, 0, stream>>>(dst.ptr<int32_t>(), dst.numel(),
                                                               int32_t(value));
  } else {
    fill_kernel<<<grid_for(dst.numel()), 256, 0, stream>>>(dst.data, kind_of(dst), dst.numel(),
                                                           value);
  }
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_convert(const Tensor& dst, const Tensor& src, cudaStream_t stream) {
  if (dst.numel() == 0) return;
  convert_kernel<<<grid_for(dst.numel()), 256, 0, stream>>>(dst.data, kind_of(dst), src.data,
                                                            kind_of(src), dst.numel());
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_add(const Tensor& out, const Tensor& a, const Tensor& b, cudaStream_t stream) {
  if (out.numel() != a.numel() || out.numel() != b.numel())
    fail("add: shapes ", out.shape.str(), " ", a.shape.str(), " ", b.shape.str(), " differ");
  if (out.numel() == 0) return;
  add_kernel<<<grid_for(out.numel()), 256, 0, stream>>>(out.data, kind_of(out), a.data, kind_of(a),
                                                        b.data, kind_of(b), out.numel());
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_add_bias(const Tensor& x, const Tensor& bias, cudaStream_t stream) {
  const int64_t d = bias.numel();
  if (d == 0 || x.numel() % d != 0)
    fail("add_bias: bias ", bias.shape.str(), " does not fit ", x.shape.str());
  add_bias_kernel<<<grid_for(x.numel()), 256, 0, stream>>>(x.data, kind_of(x), bias.data,
                                                           kind_of(bias), x.numel(), d);
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_bias_backward(const Tensor& dy, const Tensor& dbias, bool accumulate,
                          cudaStream_t stream) {
  const int64_t d = dbias.numel();
  if (d == 0 || dy.numel() % d != 0)
    fail("bias_backward: dbias ", dbias.shape.str(), " does not fit ", dy.shape.str());
  bias_backward_kernel<<<ceil_div(d, 256), 256, 0, stream>>>(
      dy.data, kind_of(dy), dbias.data, kind_of(dbias), dy.numel() / d, d, accumulate);
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& out,
                              cudaStream_t stream) {
  check_i32(ids, "embedding_forward ids");
  const int64_t tokens = ids.numel(), hidden = table.size(-1);
  if (out.numel() != tokens * hidden)
    fail("embedding_forward: out ", out.shape.str(), " for ", tokens, " ids");
  if (tokens == 0) return;
  embedding_forward_kernel<<<tokens, row_threads(hidden), 0, stream>>>(
      ids.ptr<int32_t>(), table.data, kind_of(table), table.size(0), out.data, kind_of(out),
      hidden);
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_embedding_backward(const Tensor& ids, const Tensor& dout, const Tensor& dtable,
                               Scratch&, cudaStream_t stream) {
  check_i32(ids, "embedding_backward ids");
  const int64_t tokens = ids.numel(), hidden = dtable.size(-1);
  if (dout.numel() != tokens * hidden)
    fail("embedding_backward: dout ", dout.shape.str(), " for ", tokens, " ids");
  if (tokens == 0) return;
  embedding_backward_kernel<<<tokens, row_threads(hidden), 0, stream>>>(
      ids.ptr<int32_t>(), tokens, dout.data, kind_of(dout), dtable.data, kind_of(dtable),
      dtable.size(0), hidden);
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_rmsnorm_forward(const Tensor* residual, const Tensor* delta, const Tensor& x,
                            const Tensor& weight, float eps, const Tensor& out, const Tensor& rstd,
                            cudaStream_t stream) {
  check_float(x, "rmsnorm x");
  check_f32(rstd, "rmsnorm rstd");
  const int64_t d = weight.numel();
  if (d == 0 || x.numel() % d != 0 || out.numel() != x.numel() || out.dtype != x.dtype)
    fail("rmsnorm: x ", x.shape.str(), " out ", out.shape.str(), " weight ", weight.shape.str(),
         " do not fit");
  const int64_t rows = x.numel() / d;
  if (rstd.numel() != rows) fail("rmsnorm: rstd ", rstd.shape.str(), " for ", rows, " rows");
  if (delta && delta->numel() != x.numel())
    fail("add_rmsnorm: delta ", delta->shape.str(), " vs ", x.shape.str());
  (void)residual;
  if (rows == 0) return;
  const void* delta_data = delta ? delta->data : nullptr;
  const Kind delta_kind = delta ? kind_of(*delta) : Kind::F32;
  MOETUNE_DISPATCH_FLOAT(x.dtype, "rmsnorm", {
    constexpr int kVec = 16 / int(sizeof(scalar_t));
    // 16-byte vectors when the rows, x, out and delta (in x's dtype) allow them.
    const bool vectorised = vector_aligned(d, sizeof(scalar_t), {x.data, out.data, delta_data}) &&
                            (!delta || delta->dtype == x.dtype);
    const RowSplit split = row_split(vectorised ? d / kVec : d);
    if (split.chunks > 0) {
      const size_t smem = sizeof(float) * d;
      MOETUNE_DISPATCH_ROWS(vectorised, split.chunks, {
        auto kernel = rmsnorm_forward_rows_kernel<scalar_t, kVector, kChunks>;
        kernel<<<rows_grid(kernel, smem, rows, split.group), kRowThreads, smem, stream>>>(
            x.ptr<scalar_t>(), delta_data, delta_kind, weight.data, kind_of(weight), eps,
            out.ptr<scalar_t>(), rstd.ptr<float>(), rows, d, split.group);
      });
    } else {
      auto kernel =
          vectorised ? rmsnorm_forward_kernel<scalar_t, kVec> : rmsnorm_forward_kernel<scalar_t, 1>;
      kernel<<<rows, row_threads(vectorised ? d / kVec : d), 0, stream>>>(
          x.ptr<scalar_t>(), delta_data, delta_kind, weight.data, kind_of(weight), eps,
          out.ptr<scalar_t>(), rstd.ptr<float>(), d);
    }
  });
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_rmsnorm_backward(const Tensor& dout, const Tensor& x, const Tensor& weight,
                             const Tensor& rstd, const Tensor& dx, const Tensor& dweight,
                             bool accumulate_dx, bool accumulate_dweight, Scratch& scratch,
                             cudaStream_t stream) {
  check_float(x, "rmsnorm_backward x");
  const int64_t d = weight.numel();
  if (d == 0 || x.numel() % d != 0 || dout.numel() != x.numel() || dx.numel() != x.numel() ||
      dout.dtype != x.dtype || dx.dtype != x.dtype || dweight.numel() != d)
    fail("rmsnorm_backward: shapes/dtypes do not fit: x ", x.shape.str(), " dout ",
         dout.shape.str(), " dx ", dx.shape.str(), " weight ", weight.shape.str());
  const int64_t rows = x.numel() / d;
  if (rows == 0) {
    if (!accumulate_dweight) launch_fill(dweight, 0.0f, stream);
    return;
  }
  MOETUNE_DISPATCH_FLOAT(x.dtype, "rmsnorm_backward", {
    constexpr int kVec = 16 / int(sizeof(scalar_t));
    const bool vectorised = vector_aligned(d, sizeof(scalar_t), {dout.data, x.data, dx.data});
    const RowSplit split = backward_split(vectorised ? d / kVec : d);
    int blocks = 0;
    float* partial = nullptr;
    if (split.chunks > 0) {
      // staged weight and the row slots' dweight sums (at most 32 KB)
      const size_t smem = sizeof(float) * d * (1 + kRowThreads / split.group);
      auto kernel = vectorised ? rmsnorm_backward_rows_kernel<scalar_t, kVec, kBackwardChunks>
                               : rmsnorm_backward_rows_kernel<scalar_t, 1, kBackwardChunks>;
      blocks = rows_grid(kernel, smem, rows, split.group);
      partial = static_cast<float*>(scratch.get(sizeof(float) * blocks * d));
      kernel<<<blocks, kRowThreads, smem, stream>>>(
          dout.ptr<scalar_t>(), x.ptr<scalar_t>(), weight.data, kind_of(weight), rstd.ptr<float>(),
          dx.ptr<scalar_t>(), accumulate_dx, partial, rows, d, split.group);
    } else {
      // 8 warps per block while their dweight rows fit in 96 KB of shared memory (fewer for
      // wide rows), at most 1024 blocks (their partials: 1024 * d floats of scratch).
      auto kernel = vectorised ? rmsnorm_backward_kernel<scalar_t, kVec>
                               : rmsnorm_backward_kernel<scalar_t, 1>;
      const int64_t row_floats =
          vectorised ? dweight_row_floats<kVec>(d) : dweight_row_floats<1>(d);
      const int warps = static_cast<int>(
          std::clamp<int64_t>((96 << 10) / (int64_t(sizeof(float)) * row_floats), 1, 8));
      blocks = static_cast<int>(std::min<int64_t>(ceil_div(rows, warps), 1024));
      partial = static_cast<float*>(scratch.get(sizeof(float) * blocks * d));
      const size_t smem = sizeof(float) * warps * row_floats;
      if (smem > 227 * 1024) fail("rmsnorm_backward: rows of ", d, " elements are too wide");
      if (smem > 48 * 1024)
        MOETUNE_CUDA_CHECK(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      kernel<<<blocks, 32 * warps, smem, stream>>>(
          dout.ptr<scalar_t>(), x.ptr<scalar_t>(), weight.data, kind_of(weight), rstd.ptr<float>(),
          dx.ptr<scalar_t>(), accumulate_dx, partial, rows, d);
    }
    MOETUNE_CUDA_LAUNCH_CHECK();
    sum_partials_kernel<<<static_cast<unsigned>(ceil_div(d, 32)), dim3(32, 32), 0, stream>>>(
        partial, blocks, dweight.data, kind_of(dweight), d, accumulate_dweight);
  });
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, bool inverse,
                 cudaStream_t stream) {
  check_float(x, "rope x");
  check_i32(positions, "rope positions");
  check_f32(inv_freq, "rope inv_freq");
  if (x.rank() != 3 || x.size(0) != positions.numel() || x.size(2) != 2 * inv_freq.numel())
    fail("rope: x ", x.shape.str(), " positions ", positions.shape.str(), " inv_freq ",
         inv_freq.shape.str(), " do not fit (N, heads, D), (N), (D/2)");
  if (x.numel() == 0) return;
  const int64_t tokens = x.size(0), heads = x.size(1), half = inv_freq.numel();
  MOETUNE_DISPATCH_FLOAT(x.dtype, "rope", {
    constexpr int kVec = 16 / int(sizeof(scalar_t));
    const bool vectorised = vector_aligned(half, sizeof(scalar_t), {x.data});
    const int64_t vectors = vectorised ? half / kVec : half;
    // Up to 8 heads per thread (cos and sin shared), fewer while that leaves under ~512
    // threads per SM (Qwen3's 4 k heads: 1 head per thread).
    int group_heads = kRopeHeads;
    while (group_heads > 1 &&
           tokens * ceil_div(heads, group_heads) * vectors < int64_t(sm_count()) * 512)
      group_heads /= 2;
    // Blocks of 128: the 16-byte kernel takes ~210 registers (16 vectors and 8 cos/sin
    // pairs in flight), 2 such blocks per SM.
    const int blocks = grid_for(tokens * ceil_div(heads, group_heads) * vectors, 128);
    auto kernel = vectorised ? rope_kernel<scalar_t, kVec> : rope_kernel<scalar_t, 1>;
    kernel<<<blocks, 128, 0, stream>>>(x.ptr<scalar_t>(), positions.ptr<int32_t>(),
                                       inv_freq.ptr<float>(), tokens, heads, half, group_heads,
                                       inverse ? -1.0f : 1.0f);
  });
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_swiglu_forward(const Tensor& gate_up, const Tensor& out, cudaStream_t stream) {
  check_float(gate_up, "swiglu gate_up");
  const int64_t width = out.size(-1), rows = width ? out.numel() / width : 0;
  if (gate_up.numel() != 2 * out.numel() || gate_up.size(-1) != 2 * width ||
      out.dtype != gate_up.dtype)
    fail("swiglu: gate_up ", gate_up.shape.str(), " and out ", out.shape.str(),
         " do not fit (M, 2I), (M, I)");
  if (out.numel() == 0) return;
  MOETUNE_DISPATCH_FLOAT(out.dtype, "swiglu", {
    constexpr int kVec = 16 / int(sizeof(scalar_t));
    const bool vectorised = vector_aligned(width, sizeof(scalar_t), {gate_up.data, out.data});
    auto kernel =
        vectorised ? swiglu_forward_kernel<scalar_t, kVec> : swiglu_forward_kernel<scalar_t, 1>;
    const int threads = row_threads(vectorised ? width / kVec : width);
    kernel<<<swiglu_grid(rows, threads), threads, 0, stream>>>(gate_up.ptr<scalar_t>(),
                                                               out.ptr<scalar_t>(), rows, width);
  });
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_swiglu_backward(const Tensor& dout, const Tensor& gate_up, const Tensor& dgate_up,
                            cudaStream_t stream) {
  const int64_t width = dout.size(-1), rows = width ? dout.numel() / width : 0;
  if (gate_up.numel() != 2 * dout.numel() || dgate_up.numel() != gate_up.numel() ||
      dout.dtype != gate_up.dtype || dgate_up.dtype != gate_up.dtype)
    fail("swiglu_backward: dout ", dout.shape.str(), " gate_up ", gate_up.shape.str(), " dgate_up ",
         dgate_up.shape.str(), " do not fit");
  if (dout.numel() == 0) return;
  MOETUNE_DISPATCH_FLOAT(dout.dtype, "swiglu_backward", {
    constexpr int kVec = 16 / int(sizeof(scalar_t));
    const bool vectorised =
        vector_aligned(width, sizeof(scalar_t), {dout.data, gate_up.data, dgate_up.data});
    auto kernel =
        vectorised ? swiglu_backward_kernel<scalar_t, kVec> : swiglu_backward_kernel<scalar_t, 1>;
    const int threads = row_threads(vectorised ? width / kVec : width);
    kernel<<<swiglu_grid(rows, threads), threads, 0, stream>>>(
        dout.ptr<scalar_t>(), gate_up.ptr<scalar_t>(), dgate_up.ptr<scalar_t>(), rows, width);
  });
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_moe_swiglu_backward(const Tensor& dh, const Tensor& gate_up, const Tensor& row_weights,
                                const Tensor& dgate_up, const Tensor& weighted_hidden,
                                const Tensor& drow_weights, cudaStream_t stream) {
  check_float(dh, "moe_swiglu_backward dh");
  check_f32(row_weights, "moe_swiglu_backward row_weights");
  check_f32(drow_weights, "moe_swiglu_backward drow_weights");
  const int64_t width = dh.size(-1), rows = width ? dh.numel() / width : 0;
  if (gate_up.size(-1) != 2 * width || gate_up.numel() != 2 * dh.numel() ||
      dgate_up.numel() != gate_up.numel() || weighted_hidden.numel() != dh.numel() ||
      weighted_hidden.size(-1) != width || row_weights.numel() != rows ||
      drow_weights.numel() != rows || gate_up.dtype != dh.dtype || dgate_up.dtype != dh.dtype ||
      weighted_hidden.dtype != dh.dtype)
    fail("moe_swiglu_backward: dh ", dh.shape.str(), " gate_up ", gate_up.shape.str(),
         " row_weights ", row_weights.shape.str(), " dgate_up ", dgate_up.shape.str(),
         " weighted_hidden ", weighted_hidden.shape.str(), " drow_weights ",
         drow_weights.shape.str(), " do not fit (M, I), (M, 2I), (M), (M, 2I), (M, I), (M)");
  if (dh.numel() == 0) return;
  MOETUNE_DISPATCH_FLOAT(dh.dtype, "moe_swiglu_backward", {
    constexpr int kVec = 16 / int(sizeof(scalar_t));
    const bool vectorised = vector_aligned(
        width, sizeof(scalar_t), {dh.data, gate_up.data, dgate_up.data, weighted_hidden.data});
    auto kernel = vectorised ? moe_swiglu_backward_kernel<scalar_t, kVec>
                             : moe_swiglu_backward_kernel<scalar_t, 1>;
    const int threads = row_threads(vectorised ? width / kVec : width);
    kernel<<<swiglu_grid(rows, threads), threads, 0, stream>>>(
        dh.ptr<scalar_t>(), gate_up.ptr<scalar_t>(), row_weights.ptr<float>(),
        dgate_up.ptr<scalar_t>(), weighted_hidden.ptr<scalar_t>(), drow_weights.ptr<float>(), rows,
        width);
  });
  MOETUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace moetune::cuda

// ---- benchmark helpers (ops/cuda/device_memory.h) ----
namespace moetune::cuda {
namespace {
__device__ __forceinline__ uint64_t mix(uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
__global__ void fill_normal_kernel(void* dst, Kind kind, int64_t n, float std, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const uint64_t bits = mix(seed ^ mix(uint64_t(i)));
    const float u1 = (float((bits >> 40) & 0xffffff) + 1.0f) / 16777217.0f;
    const float u2 = float((bits >> 16) & 0xffffff) / 16777216.0f;
    store_any(dst, kind, i, std * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2));
  }
}
}  // namespace

void fill_normal(const Tensor& tensor, float std, uint64_t seed) {
  if (tensor.numel() == 0) return;
  // Default stream between device syncs (the backend's stream may still be zero-filling the
  // allocation): used only while setting a benchmark up.
  MOETUNE_CUDA_CHECK(cudaDeviceSynchronize());
  fill_normal_kernel<<<grid_for(tensor.numel()), 256>>>(tensor.data, kind_of(tensor),
                                                        tensor.numel(), std, seed);
  MOETUNE_CUDA_LAUNCH_CHECK();
  MOETUNE_CUDA_CHECK(cudaDeviceSynchronize());
}

const char* device_name() {
  static thread_local cudaDeviceProp properties;
  int device = 0;
  MOETUNE_CUDA_CHECK(cudaGetDevice(&device));
  MOETUNE_CUDA_CHECK(cudaGetDeviceProperties(&properties, device));
  return properties.name;
}
}  // namespace moetune::cuda
