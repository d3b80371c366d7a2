// Shared helpers of the CUDA backend: error checks with file:line, the dtype dispatch used
// by every kernel family (F32 and BF16 storage, fp32 math), and the launch functions each
// .cu file exports to cuda_backend.cpp. Kernels never see moetune::Tensor; the host-side
// launchers in each .cu file unpack tensors, check shapes and launch on the given stream.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <span>

#include "core/error.h"
#include "core/tensor.h"
#include "ops/backend.h"

#define MOETUNE_CUDA_CHECK(expr)                                                                 \
  do {                                                                                           \
    cudaError_t status_ = (expr);                                                                \
    if (status_ != cudaSuccess)                                                                  \
      ::moetune::fail(__FILE__, ":", __LINE__, ": CUDA error ", cudaGetErrorName(status_), " (", \
                      cudaGetErrorString(status_), ") in " #expr);                               \
  } while (0)

// After every kernel launch: reports launch-configuration errors at once (cheap, no sync).
#define MOETUNE_CUDA_LAUNCH_CHECK() MOETUNE_CUDA_CHECK(cudaGetLastError())

namespace moetune::cuda {

// Scratch memory for a launcher (temporaries that live until the stream reaches this point).
// The backend hands out stream-ordered buffers from its caching allocator.
class Scratch {
 public:
  virtual ~Scratch() = default;
  virtual void* get(size_t bytes) = 0;  // valid until the launcher returns (stream-ordered)
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline bool is_bf16(const Tensor& t) { return t.dtype == DType::BF16; }
// An optional tensor argument was given (a default Tensor() has no data).
inline bool present(const Tensor& t) { return t.data != nullptr && t.numel() > 0; }
void check_float(const Tensor& t, const char* what);  // F32 or BF16 on the device
void check_f32(const Tensor& t, const char* what);
void check_i32(const Tensor& t, const char* what);

// ---- elementwise.cu ----
void launch_fill(const Tensor& dst, float value, cudaStream_t stream);
void launch_convert(const Tensor& dst, const Tensor& src, cudaStream_t stream);  // float dtypes
void launch_add(const Tensor& out, const Tensor& a, const Tensor& b, cudaStream_t stream);
void launch_add_bias(const Tensor& x, const Tensor& bias, cudaStream_t stream);
void launch_bias_backward(const Tensor& dy, const Tensor& dbias, bool accumulate,
                          cudaStream_t stream);
void launch_embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& out,
                              cudaStream_t stream);
void launch_embedding_backward(const Tensor& ids, const Tensor& dout, const Tensor& dtable,
                               Scratch& scratch, cudaStream_t stream);
void launch_rmsnorm_forward(const Tensor* residual, const Tensor* delta, const Tensor& x,
                            const Tensor& weight, float eps, const Tensor& out, const Tensor& rstd,
                            cudaStream_t stream);
void launch_rmsnorm_backward(const Tensor& dout, const Tensor& x, const Tensor& weight,
                             const Tensor& rstd, const Tensor& dx, const Tensor& dweight,
                             bool accumulate_dx, bool accumulate_dweight, Scratch& scratch,
                             cudaStream_t stream);
void launch_rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, bool inverse,
                 cudaStream_t stream);
void launch_swiglu_forward(const Tensor& gate_up, const Tensor& out, cudaStream_t stream);
void launch_swiglu_backward(const Tensor& dout, const Tensor& gate_up, const Tensor& dgate_up,
                            cudaStream_t stream);

// ---- moe_routing.cu ----
void launch_router_forward(const Tensor& logits, int top_k, bool normalize, const Tensor& probs,
                           const Tensor& topk_ids, const Tensor& topk_weights, cudaStream_t stream);
void launch_router_backward(const Tensor& dtopk_weights, const Tensor& probs,
                            const Tensor& topk_ids, bool normalize, const Tensor& aux_dprob,
                            const Tensor& dlogits, cudaStream_t stream);
void launch_router_aux_stats(const Tensor& probs, const Tensor& topk_ids,
                             const Tensor& expert_counts, const Tensor& prob_sums,
                             cudaStream_t stream);
void launch_moe_sort(const Tensor& topk_ids, int num_experts, const Tensor& expert_offsets,
                     const Tensor& sorted_slots, const Tensor& slot_rows, Scratch& scratch,
                     cudaStream_t stream);
void launch_moe_gather(const Tensor& x, const Tensor& sorted_slots, int top_k, const Tensor& out,
                       cudaStream_t stream);
void launch_moe_gather_backward(const Tensor& dout, const Tensor& sorted_slots, int top_k,
                                const Tensor& dx, Scratch& scratch, cudaStream_t stream);
void launch_moe_combine(const Tensor& y, const Tensor& weights, const Tensor& slot_rows,
                        const Tensor& out, cudaStream_t stream);
void launch_moe_swiglu_backward(const Tensor& dh, const Tensor& gate_up, const Tensor& row_weights,
                                const Tensor& dgate_up, const Tensor& weighted_hidden,
                                const Tensor& drow_weights, cudaStream_t stream);
void launch_moe_rank_ids(const Tensor& topk_ids, int64_t experts_per_rank, const Tensor& rank_ids,
                         cudaStream_t stream);
void launch_moe_local_ids(const Tensor& topk_ids, int64_t first_expert, int64_t local_experts,
                          const Tensor& local_ids, cudaStream_t stream);

// ---- grouped_gemm.cu ----
void launch_grouped_gemm(const Tensor& a, const Tensor& w, bool transpose_w, const Tensor& offsets,
                         const Tensor& c, cudaStream_t stream);
// accumulate false: dw overwritten, experts without rows zeroed (device-side offsets).
void launch_grouped_gemm_weight_grad(const Tensor& dy, const Tensor& x, const Tensor& offsets,
                                     const Tensor& dw, bool accumulate, cudaStream_t stream);

// ---- attention.cu (reference kernels: any dtype, document masks) ----
void launch_attention_forward_simple(const Tensor& q, const Tensor& k, const Tensor& v, float scale,
                                     const Tensor& doc_offsets, const Tensor& out,
                                     const Tensor& lse, cudaStream_t stream);
void launch_attention_backward_simple(const Tensor& dout, const Tensor& q, const Tensor& k,
                                      const Tensor& v, const Tensor& out, const Tensor& lse,
                                      float scale, const Tensor& doc_offsets, const Tensor& dq,
                                      const Tensor& dk, const Tensor& dv, Scratch& scratch,
                                      cudaStream_t stream);

// ---- attention_cache.cu (generation: new queries over a KV cache) ----
void launch_attention_cached_forward(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                     int64_t past, float scale, const Tensor& out,
                                     cudaStream_t stream);
// ---- attention_packed.cu (cuDNN varlen attention: per-document sequence tables) ----
// slots >= docs sequence slots; offsets have slots + 1 entries (element offsets of each
// sequence's first token for row widths q_width, kv_width, stats_width); seq_len slots entries.
void launch_packed_sequences(const Tensor& doc_offsets, int64_t slots, int64_t q_width,
                             int64_t kv_width, int64_t stats_width, int32_t* seq_len,
                             int64_t* q_offsets, int64_t* kv_offsets, int64_t* stats_offsets,
                             cudaStream_t stream);
// lse (B, H, T) -> token-major (B*T, H) when to_tokens, else back.
void launch_lse_layout(const float* src, float* dst, int64_t batch, int64_t heads, int64_t seq,
                       bool to_tokens, cudaStream_t stream);

// ---- cross_entropy.cu ----
// Softmax cross-entropy over one chunk of logits (rows, V), in place: the logits become
// grad_scale * (softmax - onehot) for trained rows and 0 for the others (when grad_scale
// != 0); loss_sum / correct accumulate. logits_out (rows, V) fp32 optional copy.
void launch_cross_entropy_chunk(const Tensor& logits, const Tensor& labels, float grad_scale,
                                const Tensor& loss_sum, const Tensor& correct,
                                const Tensor& logits_out, cudaStream_t stream);

// ---- adamw.cu ----
void launch_grad_norm_squared(std::span<const Tensor> grads, const Tensor& out, Scratch& scratch,
                              cudaStream_t stream);
// block_per_chunk_grid: one short block per chunk instead of a few long-lived ones per SM
// (on a low-priority side stream, so the ops' stream's kernels get SMs between blocks).
void launch_adamw(std::span<const AdamWParam> params, const AdamWHyper& hyper, float grad_scale,
                  Scratch& scratch, cudaStream_t stream, bool block_per_chunk_grid = false);

}  // namespace moetune::cuda
