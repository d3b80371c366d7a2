// The CPU reference backend: the class declaration shared by the files of src/ops/cpu/,
// and the argument checks every op uses.
// Each op family lives in its own file (cpu_linear.cpp, cpu_norm_rope.cpp,
// cpu_attention.cpp, cpu_moe.cpp, cpu_loss.cpp, cpu_optim.cpp); this header only
// declares. All math is plain fp32 (with double accumulators for long reductions), single
// threaded except inside OpenBLAS GEMMs, so results are bit-identical run to run.
// Compute ops accept F32 tensors only; copy() converts between F32/BF16/F16.
#pragma once

#include <cstdint>

#include "ops/backend.h"

namespace moetune::cpu {

// ---- argument checks: every failure is a moetune::Error naming the op and the argument ----

// t must be defined, on the host, of the given dtype.
void expect_tensor(const Tensor& t, DType dtype, const char* op, const char* name);
// t must have exactly this shape.
void expect_shape(const Tensor& t, const Shape& shape, const char* op, const char* name);
// Checked typed pointers (expect_tensor + cast).
float* f32(const Tensor& t, const char* op, const char* name);
int32_t* i32(const Tensor& t, const char* op, const char* name);

// Validates expert/group offsets (count + 1 entries): offsets[0] >= 0, non-decreasing,
// offsets[count] <= rows.
void expect_offsets(const int32_t* offsets, int64_t count, int64_t rows, const char* op,
                    const char* name);

class CpuBackend final : public Backend {
 public:
  Device device() const override { return Device::CPU; }
  std::string name() const override { return "cpu"; }

  // cpu_backend.cpp
  void copy(const Tensor& dst, const Tensor& src) override;
  void fill(const Tensor& dst, float value) override;
  void synchronize() override {}

  // cpu_linear.cpp
  void gemm(const Tensor& a, bool transpose_a, const Tensor& b, bool transpose_b, const Tensor& c,
            float alpha, float beta) override;
  void add(const Tensor& out, const Tensor& a, const Tensor& b) override;
  void add_bias(const Tensor& x, const Tensor& bias) override;
  void bias_backward(const Tensor& dy, const Tensor& dbias, bool accumulate) override;
  void embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& out) override;
  void embedding_backward(const Tensor& ids, const Tensor& dout, const Tensor& dtable) override;
  void swiglu_forward(const Tensor& gate_up, const Tensor& out) override;
  void swiglu_backward(const Tensor& dout, const Tensor& gate_up, const Tensor& dgate_up) override;

  // cpu_norm_rope.cpp
  void rmsnorm_forward(const Tensor& x, const Tensor& weight, float eps, const Tensor& out,
                       const Tensor& rstd) override;
  void add_rmsnorm_forward(const Tensor& residual, const Tensor& delta, const Tensor& weight,
                           float eps, const Tensor& out, const Tensor& rstd) override;
  void rmsnorm_backward(const Tensor& dout, const Tensor& x, const Tensor& weight,
                        const Tensor& rstd, const Tensor& dx, const Tensor& dweight,
                        bool accumulate_dx, bool accumulate_dweight) override;
  void rope_forward(const Tensor& x, const Tensor& positions, const Tensor& inv_freq) override;
  void rope_backward(const Tensor& dx, const Tensor& positions, const Tensor& inv_freq) override;

  // cpu_attention.cpp
  void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale,
                         const Tensor& doc_offsets, const Tensor& out, const Tensor& lse) override;
  void attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                          const Tensor& out, const Tensor& lse, float scale,
                          const Tensor& doc_offsets, const Tensor& dq, const Tensor& dk,
                          const Tensor& dv) override;
  void attention_cached_forward(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                int64_t past, float scale, const Tensor& out) override;

  // cpu_moe.cpp
  void router_forward(const Tensor& logits, int top_k, bool normalize, const Tensor& probs,
                      const Tensor& topk_ids, const Tensor& topk_weights) override;
  void router_backward(const Tensor& dtopk_weights, const Tensor& probs, const Tensor& topk_ids,
                       bool normalize, const Tensor& aux_dprob, const Tensor& dlogits) override;
  void router_aux_stats(const Tensor& probs, const Tensor& topk_ids, const Tensor& expert_counts,
                        const Tensor& prob_sums) override;
  void moe_sort_by_expert(const Tensor& topk_ids, int num_experts, const Tensor& expert_offsets,
                          const Tensor& sorted_slots, const Tensor& slot_rows) override;
  void moe_gather(const Tensor& x, const Tensor& sorted_slots, int top_k,
                  const Tensor& out) override;
  void moe_gather_backward(const Tensor& dout, const Tensor& sorted_slots, int top_k,
                           const Tensor& dx) override;
  void moe_combine(const Tensor& y, const Tensor& weights, const Tensor& slot_rows,
                   const Tensor& out) override;
  void moe_swiglu_backward(const Tensor& dh, const Tensor& gate_up, const Tensor& row_weights,
                           const Tensor& dgate_up, const Tensor& weighted_hidden,
                           const Tensor& drow_weights) override;
  void moe_rank_ids(const Tensor& topk_ids, int64_t experts_per_rank,
                    const Tensor& rank_ids) override;
  void moe_local_ids(const Tensor& topk_ids, int64_t first_expert, int64_t local_experts,
                     const Tensor& local_ids) override;
  void grouped_gemm(const Tensor& a, const Tensor& w, bool transpose_w, const Tensor& offsets,
                    const Tensor& c) override;
  void grouped_gemm_weight_grad(const Tensor& dy, const Tensor& x, const Tensor& offsets,
                                const Tensor& dw, bool accumulate) override;

  // cpu_loss.cpp
  void linear_cross_entropy(const LinearCrossEntropyArgs& args) override;

  // cpu_optim.cpp
  void grad_norm_squared(std::span<const Tensor> grads, const Tensor& out) override;
  void adamw_update(std::span<const AdamWParam> params, const AdamWHyper& hyper,
                    float grad_scale) override;
};

}  // namespace moetune::cpu
