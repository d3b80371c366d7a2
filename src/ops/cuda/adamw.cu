// Multi-tensor AdamW and the global gradient norm: one launch each for up to kMaxSlots
// parameters (more are split into several launches). The tensor descriptors (pointers,
// dtypes, sizes) travel BY VALUE as a __grid_constant__ kernel parameter (a SlotTable of
// ~31 KB, under Hopper's 32,764-byte parameter limit since CUDA 12.1): no host-to-device
// copy, so the host never waits on the stream (a cudaMemcpyAsync from pageable memory may
// synchronise with it; on the optimizer's side stream that meant waiting for the previous
// group's update, idling the ops' stream). The launch size does not depend on how the
// parameters are split. Optimizer state may be F32
// (default) or BF16 (Transformers keeps AdamW state in the parameter dtype; the benchmark
// uses that for a like-for-like memory comparison). Math in fp32, torch.optim.AdamW's formula.
// Two paths:
//  - vectorised (the usual case: one storage type per role across the launch, every tensor
//    a multiple of 8 elements, 16-byte aligned): 4096-element chunks that never cross a
//    tensor, the chunk's tensor found once by a forward search; 16-byte loads and stores, 8
//    elements per thread; at most 64 registers (__launch_bounds__(256, 4)) so that 4 blocks
//    of 256 fit per SM (an unroll by 2, 96 registers, measured 40% slower). The update's division
//    is __fdividef (2 ulp): IEEE division takes a slow path on some values (real-routing gradients
//    made the step 4 ms slower than balanced ones on an H200; with __fdividef both run at ~3.7
//    TB/s).
//  - scalar (any mix of dtypes, odd sizes): elements of the concatenated range in chunks,
//    the tensor found by a binary search over the element prefix sums.
// The path is chosen once over all parameters; a split into several launches then only
// rebases the prefix sums (begin, chunk_begin) per launch: AdamW's elements are independent,
// so each element's arithmetic is unchanged.
// The gradient norm is deterministic: per-block partials summed by the last block; when split,
// the launches write consecutive ranges of one partials array and share one completion
// counter, so the last block of all sums every partial in index order (one launch: as before).
// On a low-priority side stream (optimizer updates beside the backward) the update takes one
// block per chunk instead of a few long-lived blocks per SM: blocks then finish every few
// microseconds, and the scheduler can hand the SMs to the ops' stream's (higher priority)
// kernels in between, instead of the update holding every SM's registers for its whole run.
// Each element's arithmetic is the same either way (bit-identical results).
#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "ops/cuda/adamw_math.cuh"
#include "ops/cuda/device_utils.cuh"
#include "ops/cuda/sm_partition.h"

namespace moetune::cuda {

namespace {

struct TensorSlot {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  float* master;
  int64_t begin;        // prefix sum of element counts (scalar path)
  int64_t numel;        // elements of this tensor
  int64_t chunk_begin;  // prefix sum of kVecChunk chunks (vectorised path)
  float weight_decay;
  float decay;  // 1 - lr * weight_decay
  Kind param_kind, grad_kind, avg_kind, avg_sq_kind;
};

// The descriptors of one launch, passed by value (__grid_constant__: read in place from the
// parameter space, never copied per thread). 360 slots of 88 bytes = 31,680 bytes, leaving
// room for the other parameters under the 32,764-byte limit.
constexpr int kMaxSlots = 360;
struct SlotTable {
  TensorSlot slots[kMaxSlots];
};
static_assert(sizeof(TensorSlot) == 88, "TensorSlot layout changed: recheck kMaxSlots");
static_assert(sizeof(SlotTable) + 256 <= 32764, "SlotTable too large for a kernel parameter");

constexpr int kChunk = 4096;

__device__ __forceinline__ int find_slot(const TensorSlot* slots, int count, int64_t element) {
  int lo = 0, hi = count;  // slots[lo].begin <= element < slots[hi].begin
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (slots[mid].begin <= element)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

// ---- vectorised path. A tensor's last chunk may be short; blocks walk chunks in order, so
// the slot search only moves forward. The grad-norm kernel (few registers) loads kUnroll
// groups of 8 per thread before summing.
constexpr int kVecThreads = 256, kUnroll = 2;
constexpr int64_t kVecChunk = 4096;

struct Vec8 {
  float v[8];
};
__device__ __forceinline__ void load8(const float* p, Vec8& out) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  out.v[0] = a.x, out.v[1] = a.y, out.v[2] = a.z, out.v[3] = a.w;
  out.v[4] = b.x, out.v[5] = b.y, out.v[6] = b.z, out.v[7] = b.w;
}
__device__ __forceinline__ void load8(const bf16* p, Vec8& out) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const bf16* h = reinterpret_cast<const bf16*>(&raw);
#pragma unroll
  for (int j = 0; j < 8; ++j) out.v[j] = __bfloat162float(h[j]);
}
__device__ __forceinline__ void store8(float* p, const Vec8& in) {
  reinterpret_cast<float4*>(p)[0] = make_float4(in.v[0], in.v[1], in.v[2], in.v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(in.v[4], in.v[5], in.v[6], in.v[7]);
}
__device__ __forceinline__ void store8(bf16* p, const Vec8& in) {
  uint4 raw;
  bf16* h = reinterpret_cast<bf16*>(&raw);
#pragma unroll
  for (int j = 0; j < 8; ++j) h[j] = __float2bfloat16_rn(in.v[j]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// The slot holding chunk `chunk`, searching forward from `slot` (chunk_begin ascending).
__device__ __forceinline__ int advance_slot(const TensorSlot* slots, int count, int slot,
                                            int64_t chunk) {
  int lo = slot, hi = count;  // slots[lo].chunk_begin <= chunk < slots[hi].chunk_begin
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (slots[mid].chunk_begin <= chunk)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

template <typename ParamT, typename GradT, typename StateT, bool kMaster>
__global__ void __launch_bounds__(kVecThreads, 4)
    adamw_vec_kernel(const __grid_constant__ SlotTable table, int count, int64_t chunks,
                     AdamWScalars h) {
  const TensorSlot* slots = table.slots;
  int slot_index = 0;
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    slot_index = advance_slot(slots, count, slot_index, chunk);
    const TensorSlot& s = slots[slot_index];
    ParamT* param = static_cast<ParamT*>(s.param);
    const GradT* grad = static_cast<const GradT*>(s.grad);
    StateT* exp_avg = static_cast<StateT*>(s.exp_avg);
    StateT* exp_avg_sq = static_cast<StateT*>(s.exp_avg_sq);
    float* master = s.master;
    const int64_t n = s.numel;
    const float decay = s.decay;
    const bool decays = s.weight_decay != 0.0f;
    const int64_t chunk_first = (chunk - s.chunk_begin) * kVecChunk;  // offset in the tensor
#pragma unroll 1
    for (int64_t i = chunk_first + threadIdx.x * 8; i < min(n, chunk_first + kVecChunk);
         i += kVecThreads * 8) {
      Vec8 p, g, m, v;
      if constexpr (kMaster)
        load8(master + i, p);
      else
        load8(param + i, p);
      load8(grad + i, g);
      load8(exp_avg + i, m);
      load8(exp_avg_sq + i, v);
#pragma unroll
      for (int j = 0; j < 8; ++j)
        adamw_element(p.v[j], m.v[j], v.v[j], __fmul_rn(g.v[j], h.grad_scale), h, decays, decay);
      store8(exp_avg + i, m);
      store8(exp_avg_sq + i, v);
      if constexpr (kMaster) store8(master + i, p);
      store8(param + i, p);
    }
  }
}

// Sum of squares of all gradients, deterministic: every block adds its chunks in a fixed
// order and writes one partial (at partials[first_partial + block]); the last block to
// finish, of all `total_blocks` across the launches of one norm, adds the partials in index
// order.
template <typename GradT>
__global__ void __launch_bounds__(kVecThreads)
    sum_squares_vec_kernel(const __grid_constant__ SlotTable table, int count, int64_t chunks,
                           double* partials, unsigned first_partial, unsigned total_blocks,
                           unsigned* done, float* out) {
  const TensorSlot* slots = table.slots;
  int slot_index = 0;
  float sum = 0.0f;
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    slot_index = advance_slot(slots, count, slot_index, chunk);
    const TensorSlot& s = slots[slot_index];
    const int64_t first = (chunk - s.chunk_begin) * kVecChunk;
    Vec8 g[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = first + (int64_t(u) * kVecThreads + threadIdx.x) * 8;
      if (i < s.numel)
        load8(static_cast<const GradT*>(s.grad) + i, g[u]);
      else
        for (int j = 0; j < 8; ++j) g[u].v[j] = 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int j = 0; j < 8; ++j) sum += g[u].v[j] * g[u].v[j];
  }
  sum = block_sum(sum);
  __shared__ bool last;
  if (threadIdx.x == 0) {
    partials[first_partial + blockIdx.x] = sum;
    __threadfence();
    last = atomicAdd(done, 1u) == total_blocks - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  double total = 0.0;  // fixed order: warp-strided partial sums, then the block sum in fp32
  for (unsigned b = threadIdx.x; b < total_blocks; b += blockDim.x)
    total += static_cast<volatile double*>(partials)[b];
  const float block_total = block_sum(static_cast<float>(total));
  if (threadIdx.x == 0) *out = block_total;
}

__global__ void adamw_kernel(const __grid_constant__ SlotTable table, int count, int64_t total,
                             AdamWScalars h) {
  const TensorSlot* slots = table.slots;
  for (int64_t chunk = blockIdx.x; chunk * kChunk < total; chunk += gridDim.x) {
    const int64_t start = chunk * kChunk;
    int slot_index = find_slot(slots, count, start);
    for (int64_t element = start + threadIdx.x; element < min(total, start + kChunk);
         element += blockDim.x) {
      while (slot_index + 1 < count && slots[slot_index + 1].begin <= element) ++slot_index;
      const TensorSlot& s = slots[slot_index];
      const int64_t i = element - s.begin;
      const float g = __fmul_rn(load_any(s.grad, s.grad_kind, i), h.grad_scale);
      float p = s.master ? s.master[i] : load_any(s.param, s.param_kind, i);
      float m = load_any(s.exp_avg, s.avg_kind, i);
      float v = load_any(s.exp_avg_sq, s.avg_sq_kind, i);
      adamw_element(p, m, v, g, h, s.weight_decay != 0.0f, s.decay);
      store_any(s.exp_avg, s.avg_kind, i, m);
      store_any(s.exp_avg_sq, s.avg_sq_kind, i, v);
      if (s.master) s.master[i] = p;
      store_any(s.param, s.param_kind, i, p);
    }
  }
}

__global__ void sum_squares_kernel(const __grid_constant__ SlotTable table, int count,
                                   int64_t total, float* out) {
  const TensorSlot* slots = table.slots;
  float sum = 0.0f;
  for (int64_t chunk = blockIdx.x; chunk * kChunk < total; chunk += gridDim.x) {
    const int64_t start = chunk * kChunk;
    int slot_index = find_slot(slots, count, start);
    for (int64_t element = start + threadIdx.x; element < min(total, start + kChunk);
         element += blockDim.x) {
      while (slot_index + 1 < count && slots[slot_index + 1].begin <= element) ++slot_index;
      const float g = load_any(slots[slot_index].grad, slots[slot_index].grad_kind,
                               element - slots[slot_index].begin);
      sum += g * g;
    }
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) atomicAdd(out, sum);
}

// One launch's share of the slots: [first, first + count), its prefix sums rebased to 0.
struct Batch {
  std::unique_ptr<SlotTable> table;
  int count = 0;
  int64_t total = 0;   // elements (scalar path)
  int64_t chunks = 0;  // kVecChunk chunks (vectorised path)
};

// Splits the slots into launches of at most kMaxSlots, each with begin / chunk_begin counted
// from its own first slot (the kernels see only their launch's range).
std::vector<Batch> make_batches(const std::vector<TensorSlot>& slots) {
  std::vector<Batch> batches;
  for (size_t first = 0; first < slots.size(); first += kMaxSlots) {
    Batch batch;
    batch.table = std::make_unique<SlotTable>();
    batch.count = static_cast<int>(std::min<size_t>(kMaxSlots, slots.size() - first));
    for (int k = 0; k < batch.count; ++k) {
      TensorSlot s = slots[first + k];
      s.begin = batch.total;
      s.chunk_begin = batch.chunks;
      batch.total += s.numel;
      batch.chunks += ceil_div(s.numel, kVecChunk);
      batch.table->slots[k] = s;
    }
    batches.push_back(std::move(batch));
  }
  return batches;
}

int grid_for(int64_t total) {
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(ceil_div(total, kChunk), 132 * 8)));
}

// Blocks for the vectorised kernels: enough to fill every SM several times over, few enough
// that each walks many chunks (the slot search then amortises).
int vec_grid_for(int64_t chunks, int sms) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(chunks, int64_t(sms) * 8)));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

void launch_grad_norm_squared(std::span<const Tensor> grads, const Tensor& out, Scratch& scratch,
                              cudaStream_t stream) {
  check_f32(out, "grad_norm_squared out");
  std::vector<TensorSlot> slots;
  bool vectorised = true;
  for (const Tensor& g : grads) {
    if (g.numel() == 0) continue;
    check_float(g, "grad_norm_squared grad");
    TensorSlot s{};
    s.grad = g.data;
    s.grad_kind = kind_of(g);
    s.numel = g.numel();
    vectorised = vectorised && s.numel % 8 == 0 && aligned16(s.grad) &&
                 s.grad_kind == (slots.empty() ? s.grad_kind : slots.front().grad_kind) &&
                 s.grad_kind != Kind::F16;
    slots.push_back(s);
  }
  if (slots.empty()) {
    MOETUNE_CUDA_CHECK(cudaMemsetAsync(out.data, 0, sizeof(float), stream));
    return;
  }
  const std::vector<Batch> batches = make_batches(slots);
  if (vectorised) {
    // Every launch's blocks write their own range of one partials array and count down one
    // shared counter; the very last block (of the last launch, stream order) sums them all.
    const int sms = stream_sm_count(stream);
    std::vector<int> grids;
    unsigned total_blocks = 0;
    for (const Batch& batch : batches) {
      grids.push_back(vec_grid_for(batch.chunks, sms));
      total_blocks += static_cast<unsigned>(grids.back());
    }
    auto* partials = static_cast<double*>(scratch.get(sizeof(double) * total_blocks));
    auto* done = static_cast<unsigned*>(scratch.get(sizeof(unsigned)));
    MOETUNE_CUDA_CHECK(cudaMemsetAsync(done, 0, sizeof(unsigned), stream));
    unsigned first_partial = 0;
    for (size_t b = 0; b < batches.size(); ++b) {
      const Batch& batch = batches[b];
      if (slots.front().grad_kind == Kind::BF16)
        sum_squares_vec_kernel<bf16><<<grids[b], kVecThreads, 0, stream>>>(
            *batch.table, batch.count, batch.chunks, partials, first_partial, total_blocks, done,
            out.ptr<float>());
      else
        sum_squares_vec_kernel<float><<<grids[b], kVecThreads, 0, stream>>>(
            *batch.table, batch.count, batch.chunks, partials, first_partial, total_blocks, done,
            out.ptr<float>());
      MOETUNE_CUDA_LAUNCH_CHECK();
      first_partial += static_cast<unsigned>(grids[b]);
    }
    return;
  }
  // Scalar path: blocks add into `out` atomically (not bit-deterministic), launch after launch.
  MOETUNE_CUDA_CHECK(cudaMemsetAsync(out.data, 0, sizeof(float), stream));
  for (const Batch& batch : batches) {
    sum_squares_kernel<<<grid_for(batch.total), 256, 0, stream>>>(*batch.table, batch.count,
                                                                  batch.total, out.ptr<float>());
    MOETUNE_CUDA_LAUNCH_CHECK();
  }
}

namespace {
template <typename ParamT, typename GradT, typename StateT, bool kMaster>
void launch_vec(const SlotTable& table, int count, int64_t chunks, const AdamWScalars& h, int grid,
                cudaStream_t stream) {
  adamw_vec_kernel<ParamT, GradT, StateT, kMaster>
      <<<grid, kVecThreads, 0, stream>>>(table, count, chunks, h);
}
template <typename ParamT, typename GradT>
void launch_vec_state(Kind state, bool master, const SlotTable& table, int count, int64_t chunks,
                      const AdamWScalars& h, int grid, cudaStream_t stream) {
  if (state == Kind::BF16)
    master ? launch_vec<ParamT, GradT, bf16, true>(table, count, chunks, h, grid, stream)
           : launch_vec<ParamT, GradT, bf16, false>(table, count, chunks, h, grid, stream);
  else
    master ? launch_vec<ParamT, GradT, float, true>(table, count, chunks, h, grid, stream)
           : launch_vec<ParamT, GradT, float, false>(table, count, chunks, h, grid, stream);
}
// One block per chunk (capped by the grid's x limit; the kernels stride past it).
int block_per_chunk(int64_t chunks) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(chunks, INT32_MAX)));
}
}  // namespace

void launch_adamw(std::span<const AdamWParam> params, const AdamWHyper& hyper, float grad_scale,
                  Scratch& /*scratch: the table travels as a kernel parameter*/,
                  cudaStream_t stream, bool block_per_chunk_grid) {
  std::vector<TensorSlot> slots;
  for (const AdamWParam& p : params) {
    const int64_t n = p.param.numel();
    if (n == 0) continue;
    check_float(p.param, "adamw param");
    check_float(p.grad, "adamw grad");
    check_float(p.exp_avg, "adamw exp_avg");
    check_float(p.exp_avg_sq, "adamw exp_avg_sq");
    if (p.grad.numel() != n || p.exp_avg.numel() != n || p.exp_avg_sq.numel() != n ||
        (present(p.master) && p.master.numel() != n))
      fail("adamw: param ", p.param.shape.str(), " grad ", p.grad.shape.str(), " exp_avg ",
           p.exp_avg.shape.str(), " exp_avg_sq ", p.exp_avg_sq.shape.str(), " differ in size");
    if (present(p.master)) check_f32(p.master, "adamw master");
    TensorSlot s{};
    s.param = p.param.data;
    s.grad = p.grad.data;
    s.exp_avg = p.exp_avg.data;
    s.exp_avg_sq = p.exp_avg_sq.data;
    s.master = present(p.master) ? p.master.ptr<float>() : nullptr;
    s.numel = n;
    s.weight_decay = p.weight_decay;
    s.decay = adamw_decay(hyper, p.weight_decay);
    s.param_kind = kind_of(p.param);
    s.grad_kind = kind_of(p.grad);
    s.avg_kind = kind_of(p.exp_avg);
    s.avg_sq_kind = kind_of(p.exp_avg_sq);
    slots.push_back(s);
  }
  if (slots.empty()) return;
  if (hyper.step < 1) fail("adamw_update: step must be >= 1 (1-based), got ", hyper.step);
  const AdamWScalars h = make_adamw_scalars(hyper, grad_scale);
  // The vectorised kernel needs one storage type per role (no F16) and 8-element, 16-byte
  // aligned tensors; anything else takes the scalar kernel.
  const TensorSlot& first = slots.front();
  const bool master = first.master != nullptr;
  bool vectorised = first.avg_kind == first.avg_sq_kind;
  for (const TensorSlot& s : slots) {
    vectorised = vectorised && (s.master != nullptr) == master &&
                 s.param_kind == first.param_kind && s.grad_kind == first.grad_kind &&
                 s.avg_kind == first.avg_kind && s.avg_sq_kind == first.avg_sq_kind &&
                 s.param_kind != Kind::F16 && s.grad_kind != Kind::F16 && s.avg_kind != Kind::F16 &&
                 s.numel % 8 == 0 && aligned16(s.param) && aligned16(s.grad) &&
                 aligned16(s.exp_avg) && aligned16(s.exp_avg_sq) &&
                 (!master || aligned16(s.master));
  }
  const std::vector<Batch> batches = make_batches(slots);
  if (vectorised) {
    const Kind state = first.avg_kind;
    const int sms = block_per_chunk_grid ? 0 : stream_sm_count(stream);
    for (const Batch& batch : batches) {
      const SlotTable& table = *batch.table;
      const int count = batch.count;
      const int64_t chunks = batch.chunks;
      const int grid = block_per_chunk_grid ? block_per_chunk(chunks) : vec_grid_for(chunks, sms);
      if (first.param_kind == Kind::BF16 && first.grad_kind == Kind::BF16)
        launch_vec_state<bf16, bf16>(state, master, table, count, chunks, h, grid, stream);
      else if (first.param_kind == Kind::BF16)
        launch_vec_state<bf16, float>(state, master, table, count, chunks, h, grid, stream);
      else if (first.grad_kind == Kind::BF16)
        launch_vec_state<float, bf16>(state, master, table, count, chunks, h, grid, stream);
      else
        launch_vec_state<float, float>(state, master, table, count, chunks, h, grid, stream);
      MOETUNE_CUDA_LAUNCH_CHECK();
    }
    return;
  }
  for (const Batch& batch : batches) {
    const int grid = block_per_chunk_grid ? block_per_chunk(ceil_div(batch.total, kChunk))
                                          : grid_for(batch.total);
    adamw_kernel<<<grid, 256, 0, stream>>>(*batch.table, batch.count, batch.total, h);
    MOETUNE_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace moetune::cuda
