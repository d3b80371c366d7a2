// Flash attention forward/backward through cuDNN's SDPA (cudnn-frontend graphs), bf16,
// causal, GQA without repeating K/V, with or without document masks (packed rows). Used for
// bf16 tensors when the build has cuDNN (MOETUNE_HAS_CUDNN); the callers fall back to the
// reference kernels of attention.cu otherwise. Graphs are built once per shape and cached.
// Packed rows run as cuDNN's variable-length (THD) attention: every document is one sequence
// of a ragged batch (ragged offsets into our (B*T, H, D) tensors, per-sequence lengths, a
// padding mask), causal on its own; the batch of sequences is rounded up to a power of two
// (empty sequences) so a handful of graphs serve every packing. Needs cuDNN >= 9.6 (GQA with
// ragged offsets).
#pragma once

#include <cuda_runtime.h>

#include <memory>

#include "core/tensor.h"

namespace moetune::cuda {

class CudnnAttention {
 public:
  explicit CudnnAttention(cudaStream_t stream);
  ~CudnnAttention();
  CudnnAttention(const CudnnAttention&) = delete;
  CudnnAttention& operator=(const CudnnAttention&) = delete;

  // False when cuDNN cannot take this call (no cuDNN in the build, unsupported shape or
  // dtype); then nothing was launched. `workspace` allocates stream-ordered scratch.
  using Workspace = void* (*)(void* context, size_t bytes);
  // doc_offsets: optional (docs + 1) I32 on the device, as in Backend::attention_forward.
  bool forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale,
               const Tensor& doc_offsets, const Tensor& out, const Tensor& lse, Workspace workspace,
               void* context);
  bool backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                const Tensor& out, const Tensor& lse, float scale, const Tensor& doc_offsets,
                const Tensor& dq, const Tensor& dk, const Tensor& dv, Workspace workspace,
                void* context);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moetune::cuda
