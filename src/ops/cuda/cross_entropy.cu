// Cross-entropy over one chunk of LM-head logits, in place. The backend computes the chunk's
// logits with one GEMM (bf16 logits in bf16 mode, as Transformers computes them before its
// fp32 upcast), this kernel turns them into the loss and, in the same pass, into
// grad_scale * (softmax - onehot), which two more GEMMs turn into grad_hidden and
// grad_weight. One block per row; each thread keeps an online (max, sum of exp) pair,
// merged across the block; the argmax (ties to the lower index, as torch) counts correct
// predictions.
#include "ops/cuda/device_utils.cuh"

namespace moetune::cuda {

namespace {

constexpr int kThreads = 512;

__device__ __forceinline__ void merge(float& max_a, float& sum_a, float max_b, float sum_b) {
  const float m = fmaxf(max_a, max_b);
  if (m == -INFINITY) return;
  sum_a = sum_a * expf(max_a - m) + sum_b * expf(max_b - m);
  max_a = m;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_kernel(scalar_t* logits, const int32_t* labels, int64_t vocab, float grad_scale,
                         float* loss_sum, float* correct, float* logits_out) {
  const int64_t row = blockIdx.x;
  scalar_t* x = logits + row * vocab;
  const int32_t label = labels[row];
  float local_max = -INFINITY, local_sum = 0.0f, best = -INFINITY;
  int64_t best_index = vocab;
  for (int64_t c = threadIdx.x; c < vocab; c += kThreads) {
    const float value = to_float(x[c]);
    if (logits_out) logits_out[row * vocab + c] = value;
    if (value > best) best = value, best_index = c;
    if (value > local_max) {
      local_sum = local_sum * expf(local_max - value) + 1.0f;
      local_max = value;
    } else {
      local_sum += expf(value - local_max);
    }
  }
  // warp merge
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other_max = __shfl_xor_sync(0xffffffffu, local_max, offset);
    const float other_sum = __shfl_xor_sync(0xffffffffu, local_sum, offset);
    const float other_best = __shfl_xor_sync(0xffffffffu, best, offset);
    const int64_t other_index = __shfl_xor_sync(0xffffffffu, best_index, offset);
    merge(local_max, local_sum, other_max, other_sum);
    if (other_best > best || (other_best == best && other_index < best_index))
      best = other_best, best_index = other_index;
  }
  __shared__ float warp_max_s[32], warp_sum_s[32], warp_best_s[32];
  __shared__ int64_t warp_index_s[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_max_s[warp] = local_max, warp_sum_s[warp] = local_sum;
    warp_best_s[warp] = best, warp_index_s[warp] = best_index;
  }
  __syncthreads();
  float row_max = warp_max_s[0], row_sum = warp_sum_s[0], row_best = warp_best_s[0];
  int64_t row_index = warp_index_s[0];
  for (int w = 1; w < kThreads / 32; ++w) {
    merge(row_max, row_sum, warp_max_s[w], warp_sum_s[w]);
    if (warp_best_s[w] > row_best || (warp_best_s[w] == row_best && warp_index_s[w] < row_index))
      row_best = warp_best_s[w], row_index = warp_index_s[w];
  }
  const float lse = row_max + logf(row_sum);
  const bool trained = label >= 0 && label < vocab;
  if (threadIdx.x == 0 && trained) {
    atomicAdd(loss_sum, lse - to_float(x[label]));
    if (correct && row_index == label) atomicAdd(correct, 1.0f);
  }
  if (grad_scale == 0.0f) return;
  __syncthreads();  // everyone has read x[label] before it is overwritten
  for (int64_t c = threadIdx.x; c < vocab; c += kThreads) {
    float grad = 0.0f;
    if (trained) grad = grad_scale * (expf(to_float(x[c]) - lse) - (c == label ? 1.0f : 0.0f));
    x[c] = from_float<scalar_t>(grad);
  }
}

}  // namespace

void launch_cross_entropy_chunk(const Tensor& logits, const Tensor& labels, float grad_scale,
                                const Tensor& loss_sum, const Tensor& correct,
                                const Tensor& logits_out, cudaStream_t stream) {
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  if (rows == 0) return;
  float* correct_ptr = present(correct) ? correct.ptr<float>() : nullptr;
  float* out_ptr = present(logits_out) ? logits_out.ptr<float>() : nullptr;
  MOETUNE_DISPATCH_FLOAT(logits.dtype, "linear_cross_entropy", {
    cross_entropy_kernel<scalar_t>
        <<<rows, kThreads, 0, stream>>>(logits.ptr<scalar_t>(), labels.ptr<int32_t>(), vocab,
                                        grad_scale, loss_sum.ptr<float>(), correct_ptr, out_ptr);
  });
  MOETUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace moetune::cuda
