// Sparse MoE block as a pipeline of stages:
//   route    router logits = x W_r^T (N, E) -> fp32 softmax, top-k, (renormalised) weights
//   dispatch counting sort of the N*k (token, choice) slots by expert, rows brought to the
//            experts: M rows sorted by (this rank's) expert
//   experts  grouped GEMM gate_up (E_local, 2I, H) -> SwiGLU -> grouped GEMM down (E_local, H, I)
//   combine  out[n] = sum_j weight[n, j] * expert_out[row of (n, j)]
// Saved for the backward: each expert row's input (M, H), gate_up (M, 2I) and router weight
// (M); the SwiGLU output and the expert outputs are not. The backward applies the router
// weights at the experts (Backend::moe_swiglu_backward): the rows receive their tokens'
// unweighted output gradient g, the down projection's data gradient dh = g W_down gives
// the weight's gradient <dh, h> and the SwiGLU backward scaled by the weight, and the down
// weight gradient is g^T (w h), with w h recomputed from gate_up.
// Dispatch and combine sit behind TokenDispatcher: the local one (all experts here, M = N*k)
// or the expert-parallel one (model/expert_parallel_dispatch.h: rows travel to the rank of
// their expert by all-to-all, M varies per step and layer). Routing and the expert GEMMs
// are the same code for both.
// Buffers of M rows (rows, gate_up and the backward's) are sized by the dispatcher
// on each call; with the local dispatcher they keep their (N*k) size and are never
// reallocated. They hold at least one row, so that no tensor has a null pointer; views of
// exactly M rows are what the ops see.
// The load-balancing aux loss is computed over all MoE layers at once (model.cpp); each
// layer's backward receives its gradient w.r.t. the router probabilities (aux_dprob).
#pragma once

#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "dist/communicator.h"
#include "io/model_config.h"
#include "model/weights.h"
#include "ops/backend.h"

namespace moetune {

// A part of the expert work: rows [row_begin, row_end) of saved.rows (and of every other
// (M, ...) buffer) belong to the local experts [expert_begin, expert_end), as given by
// `offsets` (expert_end - expert_begin + 1) I32 on the device, relative to row_begin. A chunk
// without rows still has valid offsets (all zero): the fused optimizer update steps its
// experts with a zero gradient through them.
struct ExpertChunk {
  int64_t row_begin = 0, row_end = 0;
  int64_t expert_begin = 0, expert_end = 0;
  Tensor offsets;
  int64_t rows() const { return row_end - row_begin; }
};

// What the expert-parallel dispatcher remembers of one layer's exchange (see
// expert_parallel_dispatch.h); unused by the local dispatcher.
struct ExchangePlan {
  std::vector<dist::RowBlock> token_send;  // (ep) rows of the rank-sorted tokens to each peer
  std::vector<dist::RowBlock> token_recv;  // (ep) rows received from each peer
  int64_t tokens_sent = 0, tokens_received = 0;
  Buffer rank_sorted;       // (N*ep) I32: (token, rank) slots sorted by rank; first tokens_sent
  Buffer local_offsets;     // (El + 2) I32: received slots by local expert (+ "none")
  Buffer local_sorted;      // (received*k) I32: the slot of each expert row (first M)
  Buffer local_slot_rows;   // (received*k) I32: expert row of each slot (>= M: not here)
  Buffer received_weights;  // (received, k) fp32: router weights of the received tokens
};

struct MoeSaved {
  Buffer probs;             // (N, E) fp32 softmax
  Buffer topk_ids;          // (N, k) I32
  Buffer topk_weights;      // (N, k) fp32
  Buffer expert_offsets;    // (E + 1) I32 over all experts
  Buffer sorted_slots;      // (N*k) I32: slot held by each expert-sorted row
  Buffer slot_rows;         // (N*k) I32: row of each slot
  int64_t expert_rows = 0;  // M: rows this rank's experts process
  Buffer rows;              // (M, H) inputs of this rank's experts, sorted by expert
  Buffer row_weights;       // (M, 1) fp32: the router weight of each row's slot
  Buffer gate_up;           // (M, 2I)
  ExchangePlan plan;        // expert parallel only
};
struct MoeScratch {
  Buffer router_logits;   // (N, E)
  Buffer hidden;          // (M, I) SwiGLU output (forward), times the row weight (backward)
  Buffer expert_result;   // (M, H) the experts' output (forward, until combined or sent back)
  Buffer dexpert_out;     // (M, H) each row's token's output gradient, unweighted
  Buffer dhidden;         // (M, I)
  Buffer dgate_up;        // (M, 2I)
  Buffer drows;           // (M, H)
  Buffer drow_weights;    // (M, 1) fp32: gradient of each row's router weight
  Buffer dtopk_weights;   // (N, k) fp32
  Buffer drouter_logits;  // (N, E)
  Buffer balanced_ids;    // (N, k) I32, optional: dispatch by these ids instead of the top-k
  // expert parallel only
  Buffer sorted_rows;  // (N*k, H) this rank's tokens, rank-sorted (sent / partial sums back)
  Buffer exchanged;    // (received, H) tokens as received / partial sums sent back
};

// The first `rows` rows of a buffer of at least that many.
Tensor first_rows(const Buffer& buffer, int64_t rows);
// (Re)allocates buffer as (max(rows, 1), width) unless it already has that shape.
void ensure_rows(Buffer& buffer, DType dtype, int64_t rows, int64_t width, Device device);
// Buffers whose row count changes per call (expert rows received with expert parallelism:
// the MoE scratch and each layer's saved expert activations): keeps the buffer while it has
// the dtype and width and at least `rows` rows; grows it with an eighth more rows than asked
// (a first allocation, or another dtype or width, gets exactly `rows`). The buffers settle at
// the largest size seen instead of leaving a block of every size behind in the device
// allocator's cache. Users take first_rows(buffer, rows).
void ensure_capacity(Buffer& buffer, DType dtype, int64_t rows, int64_t width, Device device);

// How evenly the expert rows of the dispatched MoE layers fell on the ranks: per layer the
// busiest rank's rows and the mean over ranks, summed over layers (the local dispatcher:
// one rank). max_rows / mean_rows is how much longer the busiest rank's expert work is
// than a balanced split's; rows_here is this rank's.
struct ExpertLoad {
  int64_t layers = 0;
  double max_rows = 0, mean_rows = 0, rows_here = 0;
};

class TokenDispatcher {
 public:
  virtual ~TokenDispatcher() = default;
  // Sorts the N*k slots of topk_ids (N, k) by expert (saved.expert_offsets, sorted_slots,
  // slot_rows) and starts bringing each slot's row of x (N, H) and its router weight (of
  // saved.topk_weights) to its expert: sets saved.expert_rows = M and sizes saved.rows
  // (M, H) and saved.row_weights (M, 1), filled when it returns (in stream order).
  virtual void dispatch(const Tensor& x, const Tensor& topk_ids, MoeSaved& saved,
                        MoeScratch& scratch) = 0;
  // The expert work, in the order it runs (the local dispatcher: one chunk of all rows).
  virtual std::vector<ExpertChunk> chunks(const MoeSaved& saved) const = 0;
  // Where the experts write their output (M, H) for combine().
  virtual Tensor expert_output(MoeSaved& saved, MoeScratch& scratch) = 0;
  // out (N, H) = weighted sum of each token's expert outputs (weights saved.topk_weights).
  virtual void combine(MoeSaved& saved, MoeScratch& scratch, const Tensor& out) = 0;
  // From dout (N, H): sizes scratch.dexpert_out (M, H) and fills it with each row's token's
  // gradient, unweighted.
  virtual void combine_backward(const Tensor& dout, const MoeSaved& saved, MoeScratch& scratch) = 0;
  // Called once a chunk's rows of scratch.drows and scratch.drow_weights are final, before
  // its weight gradients (the expert-parallel dispatcher starts them home meanwhile; they
  // are not written afterwards).
  virtual void chunk_backward_done(const MoeSaved&, MoeScratch&, size_t /*chunk*/) {}
  // dx (N, H) += gradient of dispatch given scratch.drows (M, H); scratch.dtopk_weights
  // (N, k) = scratch.drow_weights back in slot order.
  virtual void dispatch_backward(const MoeSaved& saved, MoeScratch& scratch, const Tensor& dx) = 0;
  // The expert load of the layers dispatched since the last call (then starts over).
  ExpertLoad take_expert_load() { return std::exchange(load_, ExpertLoad{}); }

 protected:
  void record_layer_load(double max_rows, double mean_rows, double rows_here) {
    ++load_.layers;
    load_.max_rows += max_rows;
    load_.mean_rows += mean_rows;
    load_.rows_here += rows_here;
  }

 private:
  ExpertLoad load_;
};

// All experts on this device.
std::unique_ptr<TokenDispatcher> make_local_dispatcher(Backend& backend, int64_t num_experts,
                                                       int64_t top_k);

// A (N, k) buffer as one column (N*k, 1), the layout of the slot-indexed gathers.
Tensor slot_column(const Buffer& buffer);
// dtopk_weights (N, k) = the router weights' gradients sorted_grads (N*k, 1), given in the
// expert-sorted slot order of saved.sorted_slots, back in slot order.
void scatter_weight_grads(Backend& backend, const MoeSaved& saved, const Tensor& sorted_grads,
                          const Buffer& dtopk_weights);

void allocate_moe(const ModelConfig& config, int64_t tokens, DType dtype, Device device,
                  MoeSaved& saved);
void allocate_moe_scratch(const ModelConfig& config, int64_t tokens, DType dtype, Device device,
                          MoeScratch& scratch);

// Which expert weight of a MoE layer.
enum class ExpertWeight { GateUp, Down };
// The optimizer in the backward fused into the expert weight gradients
// (Model::set_expert_weight_update): moe_backward calls it for each dispatcher chunk and each
// expert weight (down, then gate_up) instead of computing that weight's gradient for the local
// experts [expert_begin, expert_end) with grouped_gemm_weight_grad(dy, x, offsets, ...,
// accumulate = false); it is called for chunks without rows too (offsets all zero: a zero
// gradient, which AdamW still steps).
using ExpertGradientConsumer =
    std::function<void(ExpertWeight weight, int64_t expert_begin, int64_t expert_end,
                       const Tensor& dy, const Tensor& x, const Tensor& offsets)>;

// w.experts_* hold this rank's experts (all of them without expert parallelism).
void moe_forward(Backend& backend, TokenDispatcher& dispatcher, const ModelConfig& config,
                 const LayerWeights& w, const Tensor& x, MoeSaved& saved, MoeScratch& scratch,
                 const Tensor& out);
// aux_dprob (E) fp32: d(total loss)/d(probs[n, e]) of the aux loss, or undefined.
// dx (N, H) overwritten; gradients accumulated into g (overwritten with accumulate_grads
// false, experts without rows included). With expert_gradients set (only with
// accumulate_grads false: the consumer gets the gradient's full value, never a part to add),
// g.experts_gate_up and g.experts_down are neither written nor read: expert_gradients
// receives what their grouped_gemm_weight_grad calls would have been given.
void moe_backward(Backend& backend, TokenDispatcher& dispatcher, const ModelConfig& config,
                  const LayerWeights& w, const LayerWeights& g, const Tensor& x,
                  const MoeSaved& saved, const Tensor& aux_dprob, const Tensor& dout,
                  MoeScratch& scratch, const Tensor& dx, bool accumulate_grads,
                  const ExpertGradientConsumer& expert_gradients = {});

}  // namespace moetune
