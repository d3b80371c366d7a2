// Sparse MoE block forward and backward, and the local token dispatcher (see moe.h).
#include "model/moe.h"

#include <algorithm>

namespace moetune {

Tensor first_rows(const Buffer& buffer, int64_t rows) {
  Tensor view = buffer.tensor();
  MOETUNE_CHECK(view.rank() >= 1 && rows <= view.size(0), "first_rows: ", rows,
                " rows of a buffer of ", view.shape.str());
  view.shape = buffer.shape();
  view.shape.dims[0] = rows;
  return view;
}

void ensure_rows(Buffer& buffer, DType dtype, int64_t rows, int64_t width, Device device) {
  const Shape shape{std::max<int64_t>(rows, 1), width};
  if (buffer.data() != nullptr && buffer.dtype() == dtype && buffer.shape() == shape) return;
  buffer = Buffer();  // free first: the caching allocator can hand the memory back at once
  buffer = Buffer(dtype, shape, device);
}

void ensure_capacity(Buffer& buffer, DType dtype, int64_t rows, int64_t width, Device device) {
  if (buffer.data() != nullptr && buffer.dtype() == dtype && buffer.shape().rank == 2 &&
      buffer.shape()[1] == width && buffer.shape()[0] >= rows)
    return;
  const bool growing = buffer.data() != nullptr && buffer.dtype() == dtype &&
                       buffer.shape().rank == 2 && buffer.shape()[1] == width;
  buffer = Buffer();  // free first: the caching allocator can hand the memory back at once
  buffer =
      Buffer(dtype, Shape{std::max<int64_t>(growing ? rows + rows / 8 : rows, 1), width}, device);
}

Tensor slot_column(const Buffer& buffer) { return buffer.tensor().view(Shape{buffer.numel(), 1}); }

namespace {
class LocalDispatcher final : public TokenDispatcher {
 public:
  LocalDispatcher(Backend& backend, int64_t num_experts, int64_t top_k)
      : backend_(backend),
        num_experts_(static_cast<int>(num_experts)),
        top_k_(static_cast<int>(top_k)) {}

  void dispatch(const Tensor& x, const Tensor& topk_ids, MoeSaved& saved, MoeScratch&) override {
    backend_.moe_sort_by_expert(topk_ids, num_experts_, saved.expert_offsets, saved.sorted_slots,
                                saved.slot_rows);
    saved.expert_rows = topk_ids.numel();  // N*k, the size allocate_moe gave saved.rows
    const double rows = static_cast<double>(saved.expert_rows);
    record_layer_load(rows, rows, rows);
    backend_.moe_gather(x, saved.sorted_slots, top_k_, saved.rows);
    backend_.moe_gather(slot_column(saved.topk_weights), saved.sorted_slots, 1, saved.row_weights);
  }
  std::vector<ExpertChunk> chunks(const MoeSaved& saved) const override {
    return {ExpertChunk{0, saved.expert_rows, 0, num_experts_, saved.expert_offsets.tensor()}};
  }
  Tensor expert_output(MoeSaved& saved, MoeScratch& scratch) override {
    return first_rows(scratch.expert_result, saved.expert_rows);
  }
  void combine(MoeSaved& saved, MoeScratch& scratch, const Tensor& out) override {
    backend_.moe_combine(first_rows(scratch.expert_result, saved.expert_rows), saved.topk_weights,
                         saved.slot_rows, out);
  }
  void combine_backward(const Tensor& dout, const MoeSaved& saved, MoeScratch& scratch) override {
    backend_.moe_gather(dout, saved.sorted_slots, top_k_,
                        first_rows(scratch.dexpert_out, saved.expert_rows));
  }
  void dispatch_backward(const MoeSaved& saved, MoeScratch& scratch, const Tensor& dx) override {
    backend_.moe_gather_backward(first_rows(scratch.drows, saved.expert_rows), saved.sorted_slots,
                                 top_k_, dx);
    scatter_weight_grads(backend_, saved, first_rows(scratch.drow_weights, saved.expert_rows),
                         scratch.dtopk_weights);
  }

 private:
  Backend& backend_;
  int num_experts_;
  int top_k_;
};
}  // namespace

void scatter_weight_grads(Backend& backend, const MoeSaved& saved, const Tensor& sorted_grads,
                          const Buffer& dtopk_weights) {
  const Tensor dslots = slot_column(dtopk_weights);  // (N*k, 1)
  backend.fill(dslots, 0.0f);
  backend.moe_gather_backward(sorted_grads, saved.sorted_slots, 1, dslots);
}

std::unique_ptr<TokenDispatcher> make_local_dispatcher(Backend& backend, int64_t num_experts,
                                                       int64_t top_k) {
  return std::make_unique<LocalDispatcher>(backend, num_experts, top_k);
}

void allocate_moe(const ModelConfig& config, int64_t tokens, DType dtype, Device device,
                  MoeSaved& saved) {
  const int64_t E = config.num_experts, k = config.num_experts_per_tok;
  const int64_t H = config.hidden_size, I = config.moe_intermediate_size, slots = tokens * k;
  saved.probs = Buffer(DType::F32, {tokens, E}, device);
  saved.topk_ids = Buffer(DType::I32, {tokens, k}, device);
  saved.topk_weights = Buffer(DType::F32, {tokens, k}, device);
  saved.expert_offsets = Buffer(DType::I32, {E + 1}, device);
  saved.sorted_slots = Buffer(DType::I32, {slots}, device);
  saved.slot_rows = Buffer(DType::I32, {slots}, device);
  saved.expert_rows = slots;
  saved.rows = Buffer(dtype, {slots, H}, device);
  saved.row_weights = Buffer(DType::F32, {slots, 1}, device);
  saved.gate_up = Buffer(dtype, {slots, 2 * I}, device);
}

void allocate_moe_scratch(const ModelConfig& config, int64_t tokens, DType dtype, Device device,
                          MoeScratch& scratch) {
  const int64_t E = config.num_experts, k = config.num_experts_per_tok;
  const int64_t H = config.hidden_size, I = config.moe_intermediate_size, slots = tokens * k;
  scratch.router_logits = Buffer(dtype, {tokens, E}, device);
  scratch.hidden = Buffer(dtype, {slots, I}, device);
  scratch.expert_result = Buffer(dtype, {slots, H}, device);
  scratch.dexpert_out = Buffer(dtype, {slots, H}, device);
  scratch.dhidden = Buffer(dtype, {slots, I}, device);
  scratch.dgate_up = Buffer(dtype, {slots, 2 * I}, device);
  scratch.drows = Buffer(dtype, {slots, H}, device);
  scratch.drow_weights = Buffer(DType::F32, {slots, 1}, device);
  scratch.dtopk_weights = Buffer(DType::F32, {tokens, k}, device);
  scratch.drouter_logits = Buffer(dtype, {tokens, E}, device);
}

void moe_forward(Backend& backend, TokenDispatcher& dispatcher, const ModelConfig& config,
                 const LayerWeights& w, const Tensor& x, MoeSaved& saved, MoeScratch& scratch,
                 const Tensor& out) {
  const int64_t I = config.moe_intermediate_size;
  const DType dtype = x.dtype;
  const Device device = backend.device();
  // route
  backend.gemm(x, false, w.router, true, scratch.router_logits);  // (N, E)
  backend.router_forward(scratch.router_logits, static_cast<int>(config.num_experts_per_tok),
                         config.norm_topk_prob, saved.probs, saved.topk_ids, saved.topk_weights);
  // dispatch
  // (ModelOptions::balanced_routing: fixed ids; the weights and their gradient stay the
  // router's, as in Transformers with its top-k indices replaced)
  const Tensor dispatch_ids = scratch.balanced_ids.data() != nullptr ? scratch.balanced_ids.tensor()
                                                                     : saved.topk_ids.tensor();
  dispatcher.dispatch(x, dispatch_ids, saved, scratch);  // (M, H)
  const int64_t M = saved.expert_rows;
  ensure_capacity(saved.gate_up, dtype, M, 2 * I, device);
  ensure_capacity(scratch.hidden, dtype, M, I, device);
  // experts, chunk by chunk (none of this rank's experts may have rows: M = 0 with expert
  // parallelism)
  const Tensor expert_out = dispatcher.expert_output(saved, scratch);  // (M, H)
  const std::vector<ExpertChunk> chunks = dispatcher.chunks(saved);
  for (size_t c = 0; c < chunks.size(); ++c) {
    const ExpertChunk& chunk = chunks[c];
    if (chunk.rows() > 0) {
      const auto part = [&](const Tensor& t) {
        return t.slice_rows(chunk.row_begin, chunk.row_end);
      };
      const auto experts = [&](const Tensor& weights) {
        return weights.slice_rows(chunk.expert_begin, chunk.expert_end);
      };
      const Tensor gate_up = part(first_rows(saved.gate_up, M));
      const Tensor hidden = part(first_rows(scratch.hidden, M));
      backend.grouped_gemm(part(first_rows(saved.rows, M)), experts(w.experts_gate_up), true,
                           chunk.offsets, gate_up);  // (rows, 2I)
      backend.swiglu_forward(gate_up, hidden);       // (rows, I)
      backend.grouped_gemm(hidden, experts(w.experts_down), true, chunk.offsets,
                           part(expert_out));  // (rows, H)
    }
  }
  // combine
  dispatcher.combine(saved, scratch, out);  // (N, H)
}

void moe_backward(Backend& backend, TokenDispatcher& dispatcher, const ModelConfig& config,
                  const LayerWeights& w, const LayerWeights& g, const Tensor& x,
                  const MoeSaved& saved, const Tensor& aux_dprob, const Tensor& dout,
                  MoeScratch& scratch, const Tensor& dx, bool accumulate_grads,
                  const ExpertGradientConsumer& expert_gradients) {
  MOETUNE_CHECK(!expert_gradients || !accumulate_grads,
                "moe_backward: fused expert weight updates need overwritten gradients (one "
                "micro-batch per optimizer step)");
  const int64_t H = config.hidden_size, I = config.moe_intermediate_size;
  const int64_t M = saved.expert_rows;
  const DType dtype = x.dtype;
  const Device device = backend.device();
  // combine
  dispatcher.combine_backward(dout, saved, scratch);  // dexpert_out (M, H), dtopk_weights
  // experts, chunk by chunk: down then SwiGLU (with the router weights) then gate_up; the
  // input gradients start home before the weight gradients
  ensure_capacity(scratch.hidden, dtype, M, I, device);
  ensure_capacity(scratch.dhidden, dtype, M, I, device);
  ensure_capacity(scratch.dgate_up, dtype, M, 2 * I, device);
  ensure_capacity(scratch.drows, dtype, M, H, device);
  ensure_capacity(scratch.drow_weights, DType::F32, M, 1, device);
  const std::vector<ExpertChunk> chunks = dispatcher.chunks(saved);
  for (size_t c = 0; c < chunks.size(); ++c) {
    const ExpertChunk& chunk = chunks[c];
    const auto part = [&](const Buffer& b) {
      return first_rows(b, M).slice_rows(chunk.row_begin, chunk.row_end);
    };
    const auto experts = [&](const Tensor& weights) {
      return weights.slice_rows(chunk.expert_begin, chunk.expert_end);
    };
    if (chunk.rows() > 0) {
      backend.grouped_gemm(part(scratch.dexpert_out), experts(w.experts_down), false, chunk.offsets,
                           part(scratch.dhidden));  // (rows, I), unweighted
      backend.moe_swiglu_backward(part(scratch.dhidden), part(saved.gate_up),
                                  part(saved.row_weights), part(scratch.dgate_up),
                                  part(scratch.hidden), part(scratch.drow_weights));
      backend.grouped_gemm(part(scratch.dgate_up), experts(w.experts_gate_up), false, chunk.offsets,
                           part(scratch.drows));  // (rows, H)
    }
    dispatcher.chunk_backward_done(saved, scratch, c);
    if (expert_gradients) {
      // The optimizer takes the gradients over (steps the weights from them); every chunk,
      // with rows or not, since experts without rows still take a step (zero gradient).
      expert_gradients(ExpertWeight::Down, chunk.expert_begin, chunk.expert_end,
                       part(scratch.dexpert_out), part(scratch.hidden), chunk.offsets);
      expert_gradients(ExpertWeight::GateUp, chunk.expert_begin, chunk.expert_end,
                       part(scratch.dgate_up), part(saved.rows), chunk.offsets);
    } else if (chunk.rows() > 0) {
      backend.grouped_gemm_weight_grad(part(scratch.dexpert_out), part(scratch.hidden),
                                       chunk.offsets, experts(g.experts_down),
                                       accumulate_grads);  // (experts, H, I)
      backend.grouped_gemm_weight_grad(part(scratch.dgate_up), part(saved.rows), chunk.offsets,
                                       experts(g.experts_gate_up),
                                       accumulate_grads);  // (experts, 2I, H)
    } else if (!accumulate_grads) {  // no rows here: overwriting means zero expert gradients
      backend.fill(experts(g.experts_down), 0.0f);
      backend.fill(experts(g.experts_gate_up), 0.0f);
    }
  }
  // dispatch
  backend.fill(dx, 0.0f);
  dispatcher.dispatch_backward(saved, scratch, dx);
  // route: the weights' gradient plus the aux loss' gradient through the softmax
  backend.router_backward(scratch.dtopk_weights, saved.probs, saved.topk_ids, config.norm_topk_prob,
                          aux_dprob, scratch.drouter_logits);
  backend.gemm(scratch.drouter_logits, false, w.router, false, dx, 1, 1);  // (N, H)
  backend.gemm(scratch.drouter_logits, true, x, false, g.router, 1,
               accumulate_grads ? 1.0f : 0.0f);  // (E, H)
}

}  // namespace moetune
