// Multi-tensor AdamW and the global gradient norm: one launch each for all parameters.
// The host uploads a small table of tensor descriptors (pointers, dtypes, element prefix
// sums); blocks walk the concatenated element range in chunks and find their tensor by a
// binary search over the prefix sums, so the launch size does not depend on how the
// parameters are split. Optimizer state may be F32 (default) or BF16 (Transformers keeps
// AdamW state in the parameter dtype; the benchmark uses that for a like-for-like memory
// comparison). Math in fp32, torch.optim.AdamW's formula.
#include <vector>

#include "ops/cuda/device_utils.cuh"

namespace moetune::cuda {

namespace {

struct TensorSlot {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  float* master;
  int64_t begin;  // prefix sum of element counts
  float weight_decay;
  float decay;  // 1 - lr * weight_decay
  Kind param_kind, grad_kind, avg_kind, avg_sq_kind;
};

constexpr int kChunk = 4096;

__device__ __forceinline__ int find_slot(const TensorSlot* slots, int count, int64_t element) {
  int lo = 0, hi = count;  // slots[lo].begin <= element < slots[hi].begin
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (slots[mid].begin <= element) lo = mid; else hi = mid;
  }
  return lo;
}

// Formed in double (as Python floats are in torch), used in fp32: the CPU reference's order.
struct AdamWScalars {
  double lr;
  float lerp_weight, beta2, one_minus_beta2, eps, neg_step_size, bias_correction2_sqrt, grad_scale;
};

__device__ __forceinline__ float adamw_element(float g, float p, float& m, float& v, float decay, bool decays,
                                               const AdamWScalars& h) {
  if (decays) p = p * decay;
  m = m + h.lerp_weight * (g - m);
  v = v * h.beta2 + h.one_minus_beta2 * g * g;
  return p + h.neg_step_size * m / (sqrtf(v) / h.bias_correction2_sqrt + h.eps);
}

// Fast path: every tensor bf16 (param, grad, both moments), no master, 8-element aligned
// tensors: 16-byte loads and stores, 8 elements per thread.
__global__ void adamw_bf16x8_kernel(const TensorSlot* slots, int count, int64_t total, AdamWScalars h) {
  for (int64_t chunk = blockIdx.x; chunk * kChunk < total; chunk += gridDim.x) {
    const int64_t start = chunk * kChunk;
    int slot_index = find_slot(slots, count, start);
    for (int64_t element = start + threadIdx.x * 8; element < min(total, start + kChunk); element += blockDim.x * 8) {
      while (slot_index + 1 < count && slots[slot_index + 1].begin <= element) ++slot_index;
      const TensorSlot& s = slots[slot_index];
      const int64_t i = element - s.begin;  // multiple of 8: every tensor's size is
      uint4 pv = *reinterpret_cast<const uint4*>(static_cast<const bf16*>(s.param) + i);
      const uint4 gv = *reinterpret_cast<const uint4*>(static_cast<const bf16*>(s.grad) + i);
      uint4 mv = *reinterpret_cast<const uint4*>(static_cast<const bf16*>(s.exp_avg) + i);
      uint4 vv = *reinterpret_cast<const uint4*>(static_cast<const bf16*>(s.exp_avg_sq) + i);
      bf16* p8 = reinterpret_cast<bf16*>(&pv);
      const bf16* g8 = reinterpret_cast<const bf16*>(&gv);
      bf16* m8 = reinterpret_cast<bf16*>(&mv);
      bf16* v8 = reinterpret_cast<bf16*>(&vv);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        float m = __bfloat162float(m8[j]), v = __bfloat162float(v8[j]);
        const float p = adamw_element(__bfloat162float(g8[j]) * h.grad_scale, __bfloat162float(p8[j]), m, v, s.decay,
                                      s.weight_decay != 0.0f, h);
        p8[j] = __float2bfloat16_rn(p);
        m8[j] = __float2bfloat16_rn(m);
        v8[j] = __float2bfloat16_rn(v);
      }
      *reinterpret_cast<uint4*>(static_cast<bf16*>(s.param) + i) = pv;
      *reinterpret_cast<uint4*>(static_cast<bf16*>(s.exp_avg) + i) = mv;
      *reinterpret_cast<uint4*>(static_cast<bf16*>(s.exp_avg_sq) + i) = vv;
    }
  }
}

__global__ void adamw_kernel(const TensorSlot* slots, int count, int64_t total, AdamWScalars h) {
  for (int64_t chunk = blockIdx.x; chunk * kChunk < total; chunk += gridDim.x) {
    const int64_t start = chunk * kChunk;
    int slot_index = find_slot(slots, count, start);
    for (int64_t element = start + threadIdx.x; element < min(total, start + kChunk); element += blockDim.x) {
      while (slot_index + 1 < count && slots[slot_index + 1].begin <= element) ++slot_index;
      const TensorSlot& s = slots[slot_index];
      const int64_t i = element - s.begin;
      const float g = load_any(s.grad, s.grad_kind, i) * h.grad_scale;
      float p = s.master ? s.master[i] : load_any(s.param, s.param_kind, i);
      if (s.weight_decay != 0.0f) p = p * s.decay;
      const float m0 = load_any(s.exp_avg, s.avg_kind, i);
      const float m = m0 + h.lerp_weight * (g - m0);
      const float v = load_any(s.exp_avg_sq, s.avg_sq_kind, i) * h.beta2 + h.one_minus_beta2 * g * g;
      p = p + h.neg_step_size * m / (sqrtf(v) / h.bias_correction2_sqrt + h.eps);
      store_any(s.exp_avg, s.avg_kind, i, m);
      store_any(s.exp_avg_sq, s.avg_sq_kind, i, v);
      if (s.master) s.master[i] = p;
      store_any(s.param, s.param_kind, i, p);
    }
  }
}

__global__ void sum_squares_kernel(const TensorSlot* slots, int count, int64_t total, float* out) {
  float sum = 0.0f;
  for (int64_t chunk = blockIdx.x; chunk * kChunk < total; chunk += gridDim.x) {
    const int64_t start = chunk * kChunk;
    int slot_index = find_slot(slots, count, start);
    for (int64_t element = start + threadIdx.x; element < min(total, start + kChunk); element += blockDim.x) {
      while (slot_index + 1 < count && slots[slot_index + 1].begin <= element) ++slot_index;
      const float g = load_any(slots[slot_index].grad, slots[slot_index].grad_kind, element - slots[slot_index].begin);
      sum += g * g;
    }
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) atomicAdd(out, sum);
}

TensorSlot* upload(const std::vector<TensorSlot>& slots, Scratch& scratch, cudaStream_t stream) {
  auto* device = static_cast<TensorSlot*>(scratch.get(sizeof(TensorSlot) * slots.size()));
  MOETUNE_CUDA_CHECK(cudaMemcpyAsync(device, slots.data(), sizeof(TensorSlot) * slots.size(), cudaMemcpyHostToDevice,
                                     stream));
  return device;
}

int grid_for(int64_t total) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(total, kChunk), 132 * 8)));
}

}  // namespace

void launch_grad_norm_squared(std::span<const Tensor> grads, const Tensor& out, Scratch& scratch, cudaStream_t stream) {
  check_f32(out, "grad_norm_squared out");
  MOETUNE_CUDA_CHECK(cudaMemsetAsync(out.data, 0, sizeof(float), stream));
  std::vector<TensorSlot> slots;
  int64_t total = 0;
  for (const Tensor& g : grads) {
    if (g.numel() == 0) continue;
    check_float(g, "grad_norm_squared grad");
    TensorSlot s{};
    s.grad = g.data;
    s.grad_kind = kind_of(g);
    s.begin = total;
    total += g.numel();
    slots.push_back(s);
  }
  if (slots.empty()) return;
  sum_squares_kernel<<<grid_for(total), 256, 0, stream>>>(upload(slots, scratch, stream), int(slots.size()), total,
                                                         out.ptr<float>());
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_adamw(std::span<const AdamWParam> params, const AdamWHyper& hyper, float grad_scale, Scratch& scratch,
                  cudaStream_t stream) {
  std::vector<TensorSlot> slots;
  int64_t total = 0;
  for (const AdamWParam& p : params) {
    const int64_t n = p.param.numel();
    if (n == 0) continue;
    check_float(p.param, "adamw param");
    check_float(p.grad, "adamw grad");
    check_float(p.exp_avg, "adamw exp_avg");
    check_float(p.exp_avg_sq, "adamw exp_avg_sq");
    if (p.grad.numel() != n || p.exp_avg.numel() != n || p.exp_avg_sq.numel() != n ||
        (present(p.master) && p.master.numel() != n))
      fail("adamw: param ", p.param.shape.str(), " grad ", p.grad.shape.str(), " exp_avg ", p.exp_avg.shape.str(),
           " exp_avg_sq ", p.exp_avg_sq.shape.str(), " differ in size");
    if (present(p.master)) check_f32(p.master, "adamw master");
    TensorSlot s{};
    s.param = p.param.data;
    s.grad = p.grad.data;
    s.exp_avg = p.exp_avg.data;
    s.exp_avg_sq = p.exp_avg_sq.data;
    s.master = present(p.master) ? p.master.ptr<float>() : nullptr;
    s.begin = total;
    s.weight_decay = p.weight_decay;
    s.decay = static_cast<float>(1.0 - hyper.lr * static_cast<double>(p.weight_decay));
    s.param_kind = kind_of(p.param);
    s.grad_kind = kind_of(p.grad);
    s.avg_kind = kind_of(p.exp_avg);
    s.avg_sq_kind = kind_of(p.exp_avg_sq);
    total += n;
    slots.push_back(s);
  }
  if (slots.empty()) return;
  AdamWScalars h{};
  if (hyper.step < 1) fail("adamw_update: step must be >= 1 (1-based), got ", hyper.step);
  const double step = static_cast<double>(hyper.step);
  h.lr = hyper.lr;
  h.lerp_weight = static_cast<float>(1.0 - hyper.beta1);
  h.beta2 = static_cast<float>(hyper.beta2);
  h.one_minus_beta2 = static_cast<float>(1.0 - hyper.beta2);
  h.eps = static_cast<float>(hyper.eps);
  h.neg_step_size = static_cast<float>(-(hyper.lr / (1.0 - std::pow(hyper.beta1, step))));
  h.bias_correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(hyper.beta2, step)));
  h.grad_scale = grad_scale;
  bool all_bf16x8 = true;
  for (const TensorSlot& s : slots) {
    const int64_t n = (&s == &slots.back() ? total : (&s)[1].begin) - s.begin;
    all_bf16x8 = all_bf16x8 && !s.master && s.param_kind == Kind::BF16 && s.grad_kind == Kind::BF16 &&
                 s.avg_kind == Kind::BF16 && s.avg_sq_kind == Kind::BF16 && n % 8 == 0 &&
                 reinterpret_cast<uintptr_t>(s.param) % 16 == 0 && reinterpret_cast<uintptr_t>(s.grad) % 16 == 0 &&
                 reinterpret_cast<uintptr_t>(s.exp_avg) % 16 == 0 &&
                 reinterpret_cast<uintptr_t>(s.exp_avg_sq) % 16 == 0;
  }
  if (all_bf16x8)
    adamw_bf16x8_kernel<<<grid_for(total), 256, 0, stream>>>(upload(slots, scratch, stream), int(slots.size()), total,
                                                            h);
  else
    adamw_kernel<<<grid_for(total), 256, 0, stream>>>(upload(slots, scratch, stream), int(slots.size()), total, h);
  MOETUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace moetune::cuda
