// Hopper (sm_90a) grouped GEMMs over the expert-sorted token buffer: CUTLASS 3.x
// warp-specialized TMA + wgmma kernels with device-side group shapes built from the expert
// offsets (no host sync, one launch per GEMM). grouped_gemm.cu tries these first and keeps its
// WMMA kernels as the fallback. Each launcher returns false, having done nothing, when it
// cannot take the call (no CUTLASS in this build, not an sm_90 device, not bf16, misaligned
// or mis-shaped tensors); the fallback then runs (and reports shape errors).
#pragma once

#include <cuda_runtime.h>

#include "core/tensor.h"
#include "ops/backend.h"

namespace moetune::cuda {

// c[R_e] = a[R_e] @ w[e]^T (transpose_w; w (E, N, K)) or a[R_e] @ w[e] (w (E, K, N)),
// R_e = rows offsets[e] .. offsets[e+1] of a (rows, K) and c (rows, N); bf16, fp32 accumulation.
bool launch_grouped_gemm_sm90(const Tensor& a, const Tensor& w, bool transpose_w,
                              const Tensor& offsets, const Tensor& c, cudaStream_t stream);
// dw[e] (P, Q) += dy[R_e]^T @ x[R_e] (dy (rows, P), x (rows, Q), dw bf16, fp32 accumulation);
// accumulate false: dw[e] = ... (epilogue beta 0: CUTLASS skips loading C), and experts
// without rows are NOT written (no tiles): the caller zeroes them.
bool launch_grouped_gemm_weight_grad_sm90(const Tensor& dy, const Tensor& x, const Tensor& offsets,
                                          const Tensor& dw, cudaStream_t stream,
                                          bool accumulate = true);
// The optimizer in the backward fused into the weight grad (Backend::grouped_gemm_weight_grad_
// adamw): AdamW of every expert's w[e] = param.param[e] (E, P, Q) bf16 with the gradient dy[R_e]^T
// @ x[R_e] rounded to bf16 (param.grad's dtype bf16 or fp32: the separate path rounds to bf16
// either way; its data is not used), computed in
// the GEMM's epilogue and never stored; experts without rows step with a zero gradient;
// norm_squared (1) fp32 (optional) = the gradient's sum of squares (deterministic). State bf16 or
// fp32, fp32 master optional. False, having done nothing, when it cannot take the call.
// prefetch: each tile's state bulk-prefetched into L2 before the epilogue loads it (measured
// slower on an H100, 5.88 vs 4.75 ms for Qwen3's gate_up: off unless asked for, for A/Bs).
bool launch_grouped_gemm_weight_grad_adamw_sm90(const Tensor& dy, const Tensor& x,
                                                const Tensor& offsets, const AdamWParam& param,
                                                const AdamWHyper& hyper, const Tensor& norm_squared,
                                                cudaStream_t stream, bool prefetch = true);

// The WMMA kernels of grouped_gemm.cu alone (the fallback path), for tests and benchmarks.
void launch_grouped_gemm_wmma(const Tensor& a, const Tensor& w, bool transpose_w,
                              const Tensor& offsets, const Tensor& c, cudaStream_t stream);
void launch_grouped_gemm_weight_grad_wmma(const Tensor& dy, const Tensor& x, const Tensor& offsets,
                                          const Tensor& dw, cudaStream_t stream,
                                          bool accumulate = true);

}  // namespace moetune::cuda
