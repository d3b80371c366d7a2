// The op interface: every op of the training step, forward and backward, declared once.
// ops/cpu/ holds the fp32 reference implementation (readable, used by tests and the CPU
// demo, the oracle for every kernel); ops/cuda/ holds the GPU kernels. Model code calls
// a Backend, never a kernel directly, so a model runs unchanged on either device.
//
// Conventions (all ops):
// - Tensors are contiguous row-major views on the backend's device. Shapes are given
//   in comments; N = tokens (batch * seq), H = hidden, E = experts, k = top-k.
// - Float tensors may be F32 or BF16 (storage); math accumulates in fp32. Tensors
//   documented as "fp32" must be F32. Index tensors are I32.
// - "accumulate" outputs are added to (+=); all others are overwritten. Ops writing a
//   parameter gradient take an `accumulate` flag (default true): false overwrites the
//   gradient instead (the first micro-batch of a step, so that no pass zeroes the gradients
//   first), without reading its old contents (which may be garbage, even NaN).
// - Ops may run asynchronously (CUDA stream order); synchronize() waits for them.
#pragma once

#include <memory>
#include <span>
#include <string>

#include "core/tensor.h"

namespace moetune {

// Hyper-parameters of one torch.optim.AdamW step (decoupled weight decay, bias correction).
// The scalars are double, as Python floats are in torch: 1 - beta2 formed from a float
// 0.999f is off by 1e-5 relative, which would break bit-parity with torch's update.
struct AdamWHyper {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  int64_t step = 1;  // 1-based step number after this update (for bias correction)
};

// One parameter under AdamW. When `master` is defined (fp32 master weights for a bf16
// param), the update is applied to master and param receives its rounded copy.
struct AdamWParam {
  Tensor param;
  Tensor grad;
  Tensor exp_avg;     // fp32, same shape
  Tensor exp_avg_sq;  // fp32, same shape
  Tensor master;      // optional fp32 copy of param
  float weight_decay = 0.0f;
};

// Arguments of the fused LM head + cross-entropy (forward and, if grad_scale != 0, backward
// in the same pass; the [N, V] logits never need to exist).
struct LinearCrossEntropyArgs {
  Tensor hidden;            // (N, H)  final-norm output
  Tensor weight;            // (V, H)  lm_head (or the tied embedding)
  Tensor labels;            // (N) I32, already shifted; -100 = not trained
  Tensor loss_sum;          // (1) fp32, accumulate: sum of -log p(label) over trained tokens
  Tensor correct;           // (1) fp32, accumulate: trained tokens whose argmax == label (optional)
  float grad_scale = 0.0f;  // d(total loss)/d(loss_sum); 0 = forward only
  Tensor grad_hidden;       // (N, H) overwritten (when grad_scale != 0)
  Tensor grad_weight;       // (V, H) accumulate (when grad_scale != 0)
  bool accumulate_grad_weight = true;  // false: grad_weight is overwritten
  Tensor logits;                       // (N, V) fp32, optional: written when defined (parity tests)
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;

  // ---- memory --------------------------------------------------------------------------
  // dst = src, same number of elements; either may be on the host or this device; converts
  // between float dtypes (F32/BF16/F16), otherwise dtypes must match.
  virtual void copy(const Tensor& dst, const Tensor& src) = 0;
  virtual void fill(const Tensor& dst, float value) = 0;
  virtual void synchronize() = 0;
  // The stream the ops run on (a cudaStream_t as void*; nullptr on the CPU): collectives
  // that must be ordered with the ops (dist::Communicator calls) are enqueued on it.
  virtual void* stream() const { return nullptr; }

  // ---- a second stream (communication or optimizer updates beside the ops) ------------
  // Work enqueued on a side stream (collectives: its handle() goes to dist::Communicator
  // calls; backend ops between begin_ops() and end_ops()) runs concurrently with the ops;
  // one-way fences order the streams:
  // wait_for_ops(): work enqueued on the side stream from now on starts after every op
  // enqueued so far (an event recorded on stream(), waited for by the side stream);
  // join(): ops enqueued from now on start after every side-stream work enqueued so far;
  // record_fence(f) remembers the side-stream work enqueued so far under a small number f
  // (>= 0; recording f again replaces it), join_fence(f) is join() up to that point only
  // (nothing recorded under f: nothing to wait for).
  // Neither blocks the host. Memory a side-stream operation touches must stay allocated
  // and untouched by the ops until the join that follows it.
  class SideStream {
   public:
    virtual ~SideStream() = default;
    virtual void* handle() const = 0;  // a cudaStream_t as void*
    virtual void wait_for_ops() = 0;
    virtual void join() = 0;
    virtual void record_fence(int fence) = 0;
    virtual void join_fence(int fence) = 0;
    // Backend ops on the side stream: from begin_ops() (which starts with wait_for_ops())
    // to end_ops() every op of the backend is enqueued here instead of on stream(). For
    // self-contained ops only (fill, add, device copies, norms, grad_norm_squared,
    // adamw_update); ops sharing per-backend resources (gemm, attention, the loss) fail.
    // Their temporaries stay safe: a block freed on the side stream is reused only after
    // the side stream has passed the free (CUDA: caching_allocator.cpp).
    virtual void begin_ops() = 0;
    virtual void end_ops() = 0;
    // The SMs its kernels own (make_side_stream's own_sms, rounded up), 0: shared with the ops.
    virtual int own_sms() const { return 0; }
  };
  enum class SideStreamPriority {
    Same,  // as the ops' stream (communication: its kernels must not wait behind the ops)
    Low,   // below it: the ops' kernels get the SMs first (optimizer updates beside the backward)
  };
  // nullptr when the backend has no streams (CPU: everything is synchronous); callers then
  // enqueue on stream() as before.
  // own_sms > 0: the side stream's kernels run on a partition of at least that many SMs
  // (CUDA green contexts), and while it lives the ops' persistent kernels (grouped GEMMs,
  // cuBLASLt) size their grids to the other SMs, so memory-bound side work (the optimizer)
  // streams beside compute-bound ops instead of taking turns with them. Where the device or
  // driver cannot split, an ordinary side stream (SideStream::own_sms() 0, a note on stderr).
  virtual std::unique_ptr<SideStream> make_side_stream(
      SideStreamPriority priority = SideStreamPriority::Same, int own_sms = 0) {
    (void)priority;
    (void)own_sms;
    return nullptr;
  }

  // ---- dense math ----------------------------------------------------------------------
  // c = alpha * op(a) @ op(b) + beta * c, 2-D, fp32 accumulation; op(x) = x or x^T.
  // A Linear layer y = x W^T is gemm(x, false, W, true, y).
  virtual void gemm(const Tensor& a, bool transpose_a, const Tensor& b, bool transpose_b,
                    const Tensor& c, float alpha = 1.0f, float beta = 0.0f) = 0;
  // out = a + b (elementwise, same shape; out may alias a or b)
  virtual void add(const Tensor& out, const Tensor& a, const Tensor& b) = 0;
  // bias (D) added to every row of x (rows, D); bias_backward: dbias += column sums of dy
  // (= with accumulate false).
  virtual void add_bias(const Tensor& x, const Tensor& bias) = 0;
  virtual void bias_backward(const Tensor& dy, const Tensor& dbias, bool accumulate = true) = 0;

  // ---- embedding -----------------------------------------------------------------------
  // out (N, H) = table (V, H) [ids (N)];   backward: dtable[ids[n]] += dout[n] (accumulate)
  virtual void embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& out) = 0;
  virtual void embedding_backward(const Tensor& ids, const Tensor& dout, const Tensor& dtable) = 0;

  // ---- RMSNorm over the last dimension D (rows = numel / D) ------------------------------
  // out = (x * rstd) cast to x's dtype, times weight; rstd (rows) fp32 = 1/sqrt(mean(x^2)+eps)
  virtual void rmsnorm_forward(const Tensor& x, const Tensor& weight, float eps, const Tensor& out,
                               const Tensor& rstd) = 0;
  // Fused residual add + norm: residual += delta; out = rmsnorm(residual).
  virtual void add_rmsnorm_forward(const Tensor& residual, const Tensor& delta,
                                   const Tensor& weight, float eps, const Tensor& out,
                                   const Tensor& rstd) = 0;
  // dx = (or +=, with accumulate_dx) d/dx;  dweight += (or =) d/dweight
  virtual void rmsnorm_backward(const Tensor& dout, const Tensor& x, const Tensor& weight,
                                const Tensor& rstd, const Tensor& dx, const Tensor& dweight,
                                bool accumulate_dx, bool accumulate_dweight = true) = 0;

  // ---- rotary position embedding (HF rotate_half convention), in place ----------------
  // x (N, heads, D); positions (N) I32; inv_freq (D/2) fp32, any scaling already applied.
  // backward applies the inverse rotation to the gradient, in place.
  virtual void rope_forward(const Tensor& x, const Tensor& positions, const Tensor& inv_freq) = 0;
  virtual void rope_backward(const Tensor& dx, const Tensor& positions, const Tensor& inv_freq) = 0;

  // ---- attention (causal, GQA without repeating K/V) -----------------------------------
  // q (B, T, Hq, D), k and v (B, T, Hkv, D), out (B, T, Hq, D), lse (B, Hq, T) fp32 saved.
  // doc_offsets: optional I32 (docs + 1) offsets into the flattened B*T tokens; when
  // defined, a token attends only to earlier tokens of its own document (packed rows);
  // documents never cross a row boundary. Softmax in fp32.
  virtual void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale,
                                 const Tensor& doc_offsets, const Tensor& out,
                                 const Tensor& lse) = 0;
  virtual void attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k,
                                  const Tensor& v, const Tensor& out, const Tensor& lse,
                                  float scale, const Tensor& doc_offsets, const Tensor& dq,
                                  const Tensor& dk, const Tensor& dv) = 0;

  // ---- attention over a KV cache (generation; forward only) ----------------------------
  // q (n, Hq, D): n new queries at positions [past, past + n); k_cache and v_cache
  // (L, Hkv, D), L >= past + n, hold the keys and values of every position up to them.
  // Query i attends to cache rows [0, past + i] (causal, GQA). out (n, Hq, D). fp32 softmax.
  virtual void attention_cached_forward(const Tensor& q, const Tensor& k_cache,
                                        const Tensor& v_cache, int64_t past, float scale,
                                        const Tensor& out) = 0;

  // ---- SwiGLU: gate_up (M, 2I) = [gate | up] columns -> out (M, I) = silu(gate) * up ----
  virtual void swiglu_forward(const Tensor& gate_up, const Tensor& out) = 0;
  virtual void swiglu_backward(const Tensor& dout, const Tensor& gate_up,
                               const Tensor& dgate_up) = 0;

  // ---- MoE: route ----------------------------------------------------------------------
  // logits (N, E) -> probs (N, E) fp32 softmax (saved); topk_ids (N, k) I32 (descending
  // probability, ties to the lower index, as torch.topk); topk_weights (N, k) fp32, divided
  // by their sum when normalize.
  virtual void router_forward(const Tensor& logits, int top_k, bool normalize, const Tensor& probs,
                              const Tensor& topk_ids, const Tensor& topk_weights) = 0;
  // dlogits (N, E) = d/dlogits of: topk_weights (given dtopk_weights (N, k)) plus the aux
  // loss term sum_e aux_dprob[e] * probs[n, e] (aux_dprob (E) fp32, optional).
  virtual void router_backward(const Tensor& dtopk_weights, const Tensor& probs,
                               const Tensor& topk_ids, bool normalize, const Tensor& aux_dprob,
                               const Tensor& dlogits) = 0;
  // For Transformers' load_balancing_loss_func: expert_counts (E) fp32 += times each expert
  // was selected; prob_sums (E) fp32 += column sums of probs.
  virtual void router_aux_stats(const Tensor& probs, const Tensor& topk_ids,
                                const Tensor& expert_counts, const Tensor& prob_sums) = 0;

  // ---- MoE: dispatch and combine (device-side counting sort, no host sync) -------------
  // Slot s = n * k + j is token n's j-th expert choice. Sorting by expert (stable in s):
  // expert_offsets (E + 1) I32: rows of expert e are [offsets[e], offsets[e+1]);
  // sorted_slots (N*k) I32: the slot held by each row; slot_rows (N*k) I32: its inverse.
  virtual void moe_sort_by_expert(const Tensor& topk_ids, int num_experts,
                                  const Tensor& expert_offsets, const Tensor& sorted_slots,
                                  const Tensor& slot_rows) = 0;
  // out (R, H): row r = x[sorted_slots[r] / k] for R = sorted_slots.numel() <= N*k (a prefix
  // of a sort: the rows of the first buckets); backward: dx (N, H) += each row of dout (R, H)
  // added to its token, in slot order. Rows are copied bit for bit (a 4-byte integer tensor
  // may be gathered through an F32 view of it).
  virtual void moe_gather(const Tensor& x, const Tensor& sorted_slots, int top_k,
                          const Tensor& out) = 0;
  virtual void moe_gather_backward(const Tensor& dout, const Tensor& sorted_slots, int top_k,
                                   const Tensor& dx) = 0;
  // out (N, H) = sum_j weights[n, j] * y[slot_rows[n*k + j]] over the slots whose row is
  // below R (y (R, H) expert-sorted, R <= N*k; slots sorted past R, the "none" bucket of
  // moe_local_ids, add nothing).
  virtual void moe_combine(const Tensor& y, const Tensor& weights, const Tensor& slot_rows,
                           const Tensor& out) = 0;
  // Expert parallelism without duplicate rows (each token travels once to each rank that
  // holds one of its experts). rank_ids (N, P) I32: rank_ids[n, p] = p when token n chose an
  // expert of rank p (experts [p*El, (p+1)*El)), else P (the "none" bucket), for
  // moe_sort_by_expert with P + 1 buckets.
  virtual void moe_rank_ids(const Tensor& topk_ids, int64_t experts_per_rank,
                            const Tensor& rank_ids) = 0;
  // local_ids (M, k) I32 = topk_ids - first_expert where in [first_expert, + local_experts),
  // else local_experts (the "none" bucket).
  virtual void moe_local_ids(const Tensor& topk_ids, int64_t first_expert, int64_t local_experts,
                             const Tensor& local_ids) = 0;
  // The combine's backward is a moe_gather of dout (every row gets its token's unweighted
  // gradient g) plus moe_swiglu_backward, which applies the router weights at the experts,
  // so that neither the expert outputs nor the SwiGLU outputs are saved for the backward.

  // ---- MoE: the experts' SwiGLU backward, router weights applied at the experts ---------
  // For out[n] = sum_j w[n, j] * down(h[row of (n, j)]), h = silu(gate) * up, per row r with
  // w = row_weights[r] (fp32, the router weight of the row's slot) and dh (M, I) = g @ W_down
  // for the row's unweighted output gradient g:
  //   dgate_up (M, 2I) = w * dh[r] . dh/dgate_up        (overwritten)
  //   weighted_hidden (M, I) = w * h[r]                   the down weight gradient's input:
  //                                                       dW_down = sum_r g[r]^T weighted_hidden[r]
  //   drow_weights (M) fp32 = <dh[r], h[r]>               the router weight's gradient
  //                                                       (= <g[r], down(h[r])>)
  virtual void moe_swiglu_backward(const Tensor& dh, const Tensor& gate_up,
                                   const Tensor& row_weights, const Tensor& dgate_up,
                                   const Tensor& weighted_hidden, const Tensor& drow_weights) = 0;

  // ---- MoE: expert GEMMs over the expert-sorted buffer ---------------------------------
  // For each expert e, rows R_e = [offsets[e], offsets[e+1]) (offsets (E+1) I32 on device):
  // c[R_e] = a[R_e] @ op(w[e]), w (E, P, Q); op = transpose when transpose_w (then c is
  // (M, P) and a is (M, Q)), else c is (M, Q) and a is (M, P).
  virtual void grouped_gemm(const Tensor& a, const Tensor& w, bool transpose_w,
                            const Tensor& offsets, const Tensor& c) = 0;
  // dw[e] (P, Q) += dy[R_e]^T @ x[R_e]   (dy (M, P), x (M, Q)): weight gradient of a @ w[e]^T.
  // accumulate false: dw[e] = ..., and experts without rows get dw[e] = 0 (on the device:
  // the offsets never come to the host).
  virtual void grouped_gemm_weight_grad(const Tensor& dy, const Tensor& x, const Tensor& offsets,
                                        const Tensor& dw, bool accumulate = true) = 0;

  // ---- loss ----------------------------------------------------------------------------
  virtual void linear_cross_entropy(const LinearCrossEntropyArgs& args) = 0;

  // ---- optimizer -----------------------------------------------------------------------
  // out (1) fp32 = sum of squares of every element of every tensor in grads.
  virtual void grad_norm_squared(std::span<const Tensor> grads, const Tensor& out) = 0;
  // One torch.optim.AdamW step for every param; each grad is multiplied by grad_scale first
  // (gradient clipping). Parameters with weight_decay 0 are not decayed.
  virtual void adamw_update(std::span<const AdamWParam> params, const AdamWHyper& hyper,
                            float grad_scale) = 0;
  // The optimizer in the backward fused into an expert weight gradient: one AdamW step of every
  // expert's weight param.param[e] (E, P, Q) with the gradient dw[e] = dy[R_e]^T @ x[R_e] that
  // grouped_gemm_weight_grad(dy, x, offsets, dw, accumulate = false) would store in a tensor
  // of param.grad's dtype (only its dtype is used: it needs no data), which is never stored:
  // experts without rows step with a zero gradient. norm_squared (1) fp32, when defined, is
  // overwritten with the sum of squares of that gradient. This default runs those three ops on a
  // temporary gradient (bit-identical to running them by hand); the CUDA backend fuses the update
  // into the GEMM's epilogue (no gradient written or read back).
  virtual void grouped_gemm_weight_grad_adamw(const Tensor& dy, const Tensor& x,
                                              const Tensor& offsets, const AdamWParam& param,
                                              const AdamWHyper& hyper, const Tensor& norm_squared);
};

// Backend ops on a side stream for the scope's life (begin_ops() .. end_ops()); with a null
// side stream (no streams, or overlap off) the ops stay where they are.
class SideStreamOps {
 public:
  explicit SideStreamOps(Backend::SideStream* side) : side_(side) {
    if (side_) side_->begin_ops();
  }
  ~SideStreamOps() {
    if (side_) side_->end_ops();
  }
  SideStreamOps(const SideStreamOps&) = delete;
  SideStreamOps& operator=(const SideStreamOps&) = delete;

 private:
  Backend::SideStream* side_;
};

// The CPU reference backend (always available).
std::unique_ptr<Backend> make_cpu_backend();
// The CUDA backend on the given GPU; throws moetune::Error when the build has no CUDA.
std::unique_ptr<Backend> make_cuda_backend(int device_index = 0);
// Parses "cpu", "cuda", "cuda:1".
std::unique_ptr<Backend> make_backend(const std::string& device);
// True when this binary was built with the CUDA backend.
bool cuda_backend_available();

}  // namespace moetune
