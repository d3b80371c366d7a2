// Reference attention kernels: causal, GQA (query head h reads KV head h / (Hq / Hkv)),
// optional document masks, any head_dim up to 256, F32 or BF16. One warp per
// (batch, query, head): each lane holds head_dim / 32 elements, the softmax runs online.
// Backward recomputes probabilities from the saved log-sum-exp; dK/dV gather through fp32
// atomics in a scratch buffer. O(T^2) per head and simple: the fp32 parity path and the
// fallback; the bf16 speed path is cuDNN's flash attention (attention_cudnn.cpp).
#include "ops/cuda/device_utils.cuh"

namespace moetune::cuda {

namespace {

constexpr int kMaxPerLane = 8;  // head_dim <= 256

struct AttnDims {
  int64_t batch, seq, q_heads, kv_heads, head_dim;
  float scale;
  const int32_t* doc_offsets;
  int docs;
};

// First key a query may see: its row start, or its document start when masks are given.
__device__ __forceinline__ int64_t first_key(const AttnDims& d, int64_t b, int64_t t) {
  const int64_t global = b * d.seq + t;
  int64_t start = b * d.seq;
  if (d.doc_offsets) {
    int lo = 0, hi = d.docs;  // doc_offsets[lo] <= global < doc_offsets[hi]
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (d.doc_offsets[mid] <= global)
        lo = mid;
      else
        hi = mid;
    }
    start = max(start, int64_t(d.doc_offsets[lo]));
  }
  return start - b * d.seq;  // as a position in the row
}

template <typename scalar_t>
__global__ void attention_forward_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v,
                                         AttnDims d, scalar_t* out, float* lse) {
  const int64_t warp_id = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp_id >= d.batch * d.seq * d.q_heads) return;
  const int64_t h = warp_id % d.q_heads, t = (warp_id / d.q_heads) % d.seq,
                b = warp_id / (d.q_heads * d.seq);
  const int64_t hk = h / (d.q_heads / d.kv_heads);
  const scalar_t* qr = q + ((b * d.seq + t) * d.q_heads + h) * d.head_dim;
  float qv[kMaxPerLane], acc[kMaxPerLane];
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int64_t c = lane + 32 * i;
    qv[i] = c < d.head_dim ? to_float(qr[c]) * d.scale : 0.0f;
    acc[i] = 0.0f;
  }
  float running_max = -INFINITY, running_sum = 0.0f;
  for (int64_t j = first_key(d, b, t); j <= t; ++j) {
    const int64_t kv_index = ((b * d.seq + j) * d.kv_heads + hk) * d.head_dim;
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int64_t c = lane + 32 * i;
      if (c < d.head_dim) s += qv[i] * to_float(k[kv_index + c]);
    }
    s = warp_sum(s);
    const float new_max = fmaxf(running_max, s);
    const float correction = expf(running_max - new_max), p = expf(s - new_max);
    running_sum = running_sum * correction + p;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int64_t c = lane + 32 * i;
      if (c < d.head_dim) acc[i] = acc[i] * correction + p * to_float(v[kv_index + c]);
    }
    running_max = new_max;
  }
  scalar_t* o = out + ((b * d.seq + t) * d.q_heads + h) * d.head_dim;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int64_t c = lane + 32 * i;
    if (c < d.head_dim) o[c] = from_float<scalar_t>(acc[i] / running_sum);
  }
  if (lane == 0) lse[(b * d.q_heads + h) * d.seq + t] = running_max + logf(running_sum);
}

template <typename scalar_t>
__global__ void attention_backward_kernel(const scalar_t* dout, const scalar_t* q,
                                          const scalar_t* k, const scalar_t* v, const scalar_t* out,
                                          const float* lse, AttnDims d, scalar_t* dq, float* dk_acc,
                                          float* dv_acc) {
  const int64_t warp_id = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp_id >= d.batch * d.seq * d.q_heads) return;
  const int64_t h = warp_id % d.q_heads, t = (warp_id / d.q_heads) % d.seq,
                b = warp_id / (d.q_heads * d.seq);
  const int64_t hk = h / (d.q_heads / d.kv_heads);
  const int64_t q_index = ((b * d.seq + t) * d.q_heads + h) * d.head_dim;
  float qv[kMaxPerLane], dov[kMaxPerLane], dqv[kMaxPerLane];
  float delta = 0.0f;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int64_t c = lane + 32 * i;
    const bool in = c < d.head_dim;
    qv[i] = in ? to_float(q[q_index + c]) : 0.0f;
    dov[i] = in ? to_float(dout[q_index + c]) : 0.0f;
    delta += in ? dov[i] * to_float(out[q_index + c]) : 0.0f;
    dqv[i] = 0.0f;
  }
  delta = warp_sum(delta);
  const float row_lse = lse[(b * d.q_heads + h) * d.seq + t];
  for (int64_t j = first_key(d, b, t); j <= t; ++j) {
    const int64_t kv_index = ((b * d.seq + j) * d.kv_heads + hk) * d.head_dim;
    float s = 0.0f, dp = 0.0f;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int64_t c = lane + 32 * i;
      if (c < d.head_dim) {
        s += qv[i] * to_float(k[kv_index + c]);
        dp += dov[i] * to_float(v[kv_index + c]);
      }
    }
    s = warp_sum(s) * d.scale;
    dp = warp_sum(dp);
    const float p = expf(s - row_lse);
    const float ds = p * (dp - delta) * d.scale;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int64_t c = lane + 32 * i;
      if (c < d.head_dim) {
        dqv[i] += ds * to_float(k[kv_index + c]);
        atomicAdd(dk_acc + kv_index + c, ds * qv[i]);
        atomicAdd(dv_acc + kv_index + c, p * dov[i]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int64_t c = lane + 32 * i;
    if (c < d.head_dim) dq[q_index + c] = from_float<scalar_t>(dqv[i]);
  }
}

template <typename scalar_t>
__global__ void store_kernel(const float* src, scalar_t* dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = from_float<scalar_t>(src[i]);
}

AttnDims dims_of(const Tensor& q, const Tensor& k, const Tensor& v, float scale,
                 const Tensor& doc_offsets, const char* what) {
  check_float(q, what);
  if (q.rank() != 4 || k.rank() != 4 || v.shape != k.shape || k.size(0) != q.size(0) ||
      k.size(1) != q.size(1) || k.size(3) != q.size(3) || k.size(2) == 0 ||
      q.size(2) % k.size(2) != 0 || k.dtype != q.dtype || v.dtype != q.dtype)
    fail(what, ": q ", q.shape.str(), " k ", k.shape.str(), " v ", v.shape.str(),
         " must be (B, T, Hq, D), (B, T, Hkv, D) with Hq a multiple of Hkv, one dtype");
  if (q.size(3) > 32 * kMaxPerLane) fail(what, ": head_dim ", q.size(3), " > ", 32 * kMaxPerLane);
  AttnDims d{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), scale, nullptr, 0};
  if (present(doc_offsets)) {
    check_i32(doc_offsets, "attention doc_offsets");
    d.doc_offsets = doc_offsets.ptr<int32_t>();
    d.docs = static_cast<int>(doc_offsets.numel() - 1);
  }
  return d;
}

}  // namespace

void launch_attention_forward_simple(const Tensor& q, const Tensor& k, const Tensor& v, float scale,
                                     const Tensor& doc_offsets, const Tensor& out,
                                     const Tensor& lse, cudaStream_t stream) {
  const AttnDims d = dims_of(q, k, v, scale, doc_offsets, "attention_forward");
  check_f32(lse, "attention_forward lse");
  if (out.shape != q.shape || out.dtype != q.dtype || lse.numel() != d.batch * d.q_heads * d.seq)
    fail("attention_forward: out ", out.shape.str(), " lse ", lse.shape.str(), " do not fit q ",
         q.shape.str());
  const int64_t warps = d.batch * d.seq * d.q_heads;
  if (warps == 0) return;
  MOETUNE_DISPATCH_FLOAT(q.dtype, "attention_forward", {
    attention_forward_kernel<scalar_t><<<ceil_div(warps, 4), 128, 0, stream>>>(
        q.ptr<scalar_t>(), k.ptr<scalar_t>(), v.ptr<scalar_t>(), d, out.ptr<scalar_t>(),
        lse.ptr<float>());
  });
  MOETUNE_CUDA_LAUNCH_CHECK();
}

void launch_attention_backward_simple(const Tensor& dout, const Tensor& q, const Tensor& k,
                                      const Tensor& v, const Tensor& out, const Tensor& lse,
                                      float scale, const Tensor& doc_offsets, const Tensor& dq,
                                      const Tensor& dk, const Tensor& dv, Scratch& scratch,
                                      cudaStream_t stream) {
  const AttnDims d = dims_of(q, k, v, scale, doc_offsets, "attention_backward");
  if (dout.shape != q.shape || out.shape != q.shape || dq.shape != q.shape || dk.shape != k.shape ||
      dv.shape != v.shape || dout.dtype != q.dtype || dq.dtype != q.dtype || dk.dtype != q.dtype ||
      dv.dtype != q.dtype)
    fail("attention_backward: gradients must have the shapes and dtype of q, k, v");
  const int64_t warps = d.batch * d.seq * d.q_heads;
  if (warps == 0) return;
  auto* dk_acc = static_cast<float*>(scratch.get(sizeof(float) * k.numel()));
  auto* dv_acc = static_cast<float*>(scratch.get(sizeof(float) * v.numel()));
  MOETUNE_CUDA_CHECK(cudaMemsetAsync(dk_acc, 0, sizeof(float) * k.numel(), stream));
  MOETUNE_CUDA_CHECK(cudaMemsetAsync(dv_acc, 0, sizeof(float) * v.numel(), stream));
  const int grid = static_cast<int>(std::min<int64_t>(ceil_div(k.numel(), 256), 65536));
  MOETUNE_DISPATCH_FLOAT(q.dtype, "attention_backward", {
    attention_backward_kernel<scalar_t><<<ceil_div(warps, 4), 128, 0, stream>>>(
        dout.ptr<scalar_t>(), q.ptr<scalar_t>(), k.ptr<scalar_t>(), v.ptr<scalar_t>(),
        out.ptr<scalar_t>(), lse.ptr<float>(), d, dq.ptr<scalar_t>(), dk_acc, dv_acc);
    MOETUNE_CUDA_LAUNCH_CHECK();
    store_kernel<scalar_t><<<grid, 256, 0, stream>>>(dk_acc, dk.ptr<scalar_t>(), k.numel());
    store_kernel<scalar_t><<<grid, 256, 0, stream>>>(dv_acc, dv.ptr<scalar_t>(), v.numel());
  });
  MOETUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace moetune::cuda
