// The expert-parallel TokenDispatcher (see expert_parallel_dispatch.h for the steps).
// Row orders: "rank-sorted" = this rank's (token, rank) pairs sorted by destination rank
// (tokens ascending within a rank: what it sends, and where the partial results come back);
// "received" = the tokens from every peer, grouped by source rank; "expert rows" = the
// received (token, choice) pairs of this rank's experts sorted by local expert (stable: by
// source rank, then token), the grouped GEMMs' input.
#include "model/expert_parallel_dispatch.h"

#include <algorithm>
#include <string>
#include <vector>

#include "core/error.h"

namespace moetune {

namespace {

template <typename T>
Tensor host_view(std::vector<T>& values, DType dtype) {
  return Tensor(values.data(), dtype, {static_cast<int64_t>(values.size())});
}

// A 4-byte integer tensor seen as F32, for the bit-for-bit row gathers and exchanges.
Tensor as_f32_bits(Tensor tensor) {
  tensor.dtype = DType::F32;
  return tensor;
}

class TokenExchangeDispatcher final : public TokenDispatcher {
 public:
  TokenExchangeDispatcher(Backend& backend, dist::Communicator& comm, const ModelConfig& config)
      : backend_(backend),
        comm_(comm),
        ep_(comm.size()),
        num_experts_(config.num_experts),
        local_experts_(config.num_experts / comm.size()),
        top_k_(static_cast<int>(config.num_experts_per_tok)) {
    if (ep_ < 1 || num_experts_ < 1 || num_experts_ % ep_ != 0)
      fail("expert parallelism: ", ep_, " ranks do not divide the ", num_experts_, " experts of ",
           config.model_type);
    side_stream_ = backend.make_side_stream();
    width_ = num_experts_ + 1 + ep_ + 2;
    counts_ = Buffer(DType::I32, {width_}, backend.device());
    peer_counts_ = Buffer(DType::I32, {ep_, width_}, backend.device());
    peer_counts_host_.resize(static_cast<size_t>(ep_ * width_));
  }

  void dispatch(const Tensor& x, const Tensor& topk_ids, MoeSaved& saved,
                MoeScratch& scratch) override {
    const int64_t N = x.size(0), H = x.size(1), k = top_k_, El = local_experts_;
    const Device device = backend_.device();
    ExchangePlan& plan = saved.plan;
    // 1. this rank's slots by expert (every rank needs the counts), its tokens by rank
    backend_.moe_sort_by_expert(topk_ids, static_cast<int>(num_experts_), saved.expert_offsets,
                                saved.sorted_slots, saved.slot_rows);
    Buffer rank_ids(DType::I32, {N, ep_}, device);
    backend_.moe_rank_ids(topk_ids, El, rank_ids);
    plan.rank_sorted = Buffer(DType::I32, {N * ep_}, device);
    Buffer rank_slot_rows(DType::I32, {N * ep_}, device);
    const Tensor counts = counts_.tensor();
    backend_.copy(counts.slice_rows(0, num_experts_ + 1), saved.expert_offsets);
    backend_.moe_sort_by_expert(rank_ids, ep_ + 1, counts.slice_rows(num_experts_ + 1, width_),
                                plan.rank_sorted, rank_slot_rows);
    // 2. every rank's counts: one all_gather, one host read
    comm_.all_gather(counts_, peer_counts_, backend_.stream());
    backend_.copy(host_view(peer_counts_host_, DType::I32), peer_counts_);
    backend_.synchronize();
    plan_exchange(saved);
    const int64_t sent = plan.tokens_sent, received = plan.tokens_received, M = saved.expert_rows;

    // 3. each token's row, expert ids (as F32 bits) and router weights to the ranks
    ensure_rows(scratch.sorted_rows, x.dtype, N * k, H, device);
    ensure_capacity(scratch.exchanged, x.dtype, received, H, device);
    Buffer send_ids(DType::F32, {std::max<int64_t>(sent, 1), k}, device);
    Buffer send_weights(DType::F32, {std::max<int64_t>(sent, 1), k}, device);
    Buffer received_ids(DType::I32, {std::max<int64_t>(received, 1), k}, device);
    plan.received_weights = Buffer(DType::F32, {std::max<int64_t>(received, 1), k}, device);
    if (sent > 0) {
      const Tensor sent_slots = plan.rank_sorted.tensor().slice_rows(0, sent);
      const int ranks = static_cast<int>(ep_);
      backend_.moe_gather(x, sent_slots, ranks, first_rows(scratch.sorted_rows, sent));
      backend_.moe_gather(as_f32_bits(topk_ids), sent_slots, ranks, first_rows(send_ids, sent));
      backend_.moe_gather(saved.topk_weights.tensor(), sent_slots, ranks,
                          first_rows(send_weights, sent));
    }
    {
      dist::CommunicatorGroup group(comm_);
      void* stream = backend_.stream();
      comm_.all_to_all_v_blocks(first_rows(scratch.sorted_rows, sent), plan.token_send,
                                first_rows(scratch.exchanged, received), plan.token_recv, stream);
      comm_.all_to_all_v_blocks(first_rows(send_ids, sent), plan.token_send,
                                as_f32_bits(first_rows(received_ids, received)), plan.token_recv,
                                stream);
      comm_.all_to_all_v_blocks(first_rows(send_weights, sent), plan.token_send,
                                first_rows(plan.received_weights, received), plan.token_recv,
                                stream);
      group.end();
    }
    // 4. the received (token, choice) slots of this rank's experts, by local expert
    plan.local_offsets = Buffer(DType::I32, {El + 2}, device);
    plan.local_sorted = Buffer(DType::I32, {std::max<int64_t>(received * k, 1)}, device);
    plan.local_slot_rows = Buffer(DType::I32, {std::max<int64_t>(received * k, 1)}, device);
    ensure_capacity(saved.rows, x.dtype, M, H, device);
    ensure_capacity(saved.row_weights, DType::F32, M, 1, device);
    if (received == 0) {
      std::vector<int32_t> zeros(static_cast<size_t>(El + 2), 0);
      backend_.copy(plan.local_offsets.tensor(), host_view(zeros, DType::I32));
      return;
    }
    Buffer local_ids(DType::I32, {received, k}, device);
    backend_.moe_local_ids(first_rows(received_ids, received), comm_.rank() * El, El, local_ids);
    backend_.moe_sort_by_expert(local_ids, static_cast<int>(El + 1), plan.local_offsets,
                                plan.local_sorted, plan.local_slot_rows);
    if (M == 0) return;
    const Tensor expert_slots = plan.local_sorted.tensor().slice_rows(0, M);
    backend_.moe_gather(first_rows(scratch.exchanged, received), expert_slots, top_k_,
                        first_rows(saved.rows, M));
    backend_.moe_gather(plan.received_weights.tensor().view(Shape{received * k, 1}), expert_slots,
                        1, first_rows(saved.row_weights, M));
  }

  std::vector<ExpertChunk> chunks(const MoeSaved& saved) const override {
    return {ExpertChunk{0, saved.expert_rows, 0, local_experts_,
                        saved.plan.local_offsets.tensor().slice_rows(0, local_experts_ + 1)}};
  }

  Tensor expert_output(MoeSaved& saved, MoeScratch& scratch) override {
    ensure_capacity(scratch.expert_result, saved.rows.dtype(), saved.expert_rows,
                    saved.rows.shape()[1], backend_.device());
    return first_rows(scratch.expert_result, saved.expert_rows);
  }

  // Per received token, the weighted sum of this rank's expert outputs goes home; there
  // the ranks' partial sums add up (in rank order).
  void combine(MoeSaved& saved, MoeScratch& scratch, const Tensor& out) override {
    const ExchangePlan& plan = saved.plan;
    const int64_t received = plan.tokens_received, sent = plan.tokens_sent, M = saved.expert_rows;
    const Tensor partial = first_rows(scratch.exchanged, received);
    if (received > 0)
      backend_.moe_combine(first_rows(scratch.expert_result, M),
                           first_rows(plan.received_weights, received),
                           plan.local_slot_rows.tensor().slice_rows(0, received * top_k_), partial);
    const Tensor home = first_rows(scratch.sorted_rows, sent);
    comm_.all_to_all_v_blocks(partial, plan.token_recv, home, plan.token_send, backend_.stream());
    backend_.fill(out, 0.0f);
    if (sent > 0)
      backend_.moe_gather_backward(home, plan.rank_sorted.tensor().slice_rows(0, sent),
                                   static_cast<int>(ep_), out);
  }

  // Each token's output gradient (unweighted) once to each of its ranks, then to its rows.
  void combine_backward(const Tensor& dout, const MoeSaved& saved, MoeScratch& scratch) override {
    const ExchangePlan& plan = saved.plan;
    const int64_t received = plan.tokens_received, sent = plan.tokens_sent, M = saved.expert_rows;
    const int64_t N = dout.size(0), H = dout.size(1);
    const Device device = backend_.device();
    ensure_rows(scratch.sorted_rows, dout.dtype, N * top_k_, H, device);
    ensure_capacity(scratch.exchanged, dout.dtype, received, H, device);
    ensure_capacity(scratch.dexpert_out, dout.dtype, M, H, device);
    const Tensor send = first_rows(scratch.sorted_rows, sent);
    if (sent > 0)
      backend_.moe_gather(dout, plan.rank_sorted.tensor().slice_rows(0, sent),
                          static_cast<int>(ep_), send);
    const Tensor got = first_rows(scratch.exchanged, received);
    comm_.all_to_all_v_blocks(send, plan.token_send, got, plan.token_recv, backend_.stream());
    if (M > 0)
      backend_.moe_gather(got, plan.local_sorted.tensor().slice_rows(0, M), top_k_,
                          first_rows(scratch.dexpert_out, M));
  }

  // The experts' input gradients and router weight gradients, summed per received token,
  // go home on the side stream while the weight gradients compute.
  void chunk_backward_done(const MoeSaved& saved, MoeScratch& scratch, size_t) override {
    const ExchangePlan& plan = saved.plan;
    const int64_t received = plan.tokens_received, sent = plan.tokens_sent, M = saved.expert_rows;
    const int64_t k = top_k_;
    const Device device = backend_.device();
    const Tensor dpartial = first_rows(scratch.exchanged, received);
    ensure_capacity(dweights_partial_, DType::F32, received * k, 1, device);
    ensure_capacity(dweights_home_, DType::F32, sent * k, 1, device);
    const Tensor dw_partial = first_rows(dweights_partial_, received * k);
    if (received > 0) {
      backend_.fill(dpartial, 0.0f);
      backend_.fill(dw_partial, 0.0f);
      if (M > 0) {
        const Tensor expert_slots = plan.local_sorted.tensor().slice_rows(0, M);
        backend_.moe_gather_backward(first_rows(scratch.drows, M), expert_slots, top_k_, dpartial);
        backend_.moe_gather_backward(first_rows(scratch.drow_weights, M), expert_slots, 1,
                                     dw_partial);
      }
    }
    void* stream = backend_.stream();
    if (side_stream_) {
      side_stream_->wait_for_ops();
      stream = side_stream_->handle();
    }
    dist::CommunicatorGroup group(comm_);
    comm_.all_to_all_v_blocks(dpartial, plan.token_recv, first_rows(scratch.sorted_rows, sent),
                              plan.token_send, stream);
    comm_.all_to_all_v_blocks(dw_partial.view(Shape{received, k}), plan.token_recv,
                              first_rows(dweights_home_, sent * k).view(Shape{sent, k}),
                              plan.token_send, stream);
    group.end();
  }

  void dispatch_backward(const MoeSaved& saved, MoeScratch& scratch, const Tensor& dx) override {
    if (side_stream_) side_stream_->join();  // the gradients are home
    const ExchangePlan& plan = saved.plan;
    const int64_t sent = plan.tokens_sent, k = top_k_;
    const Tensor dtopk = scratch.dtopk_weights.tensor();
    backend_.fill(dtopk, 0.0f);
    if (sent == 0) return;
    const Tensor slots = plan.rank_sorted.tensor().slice_rows(0, sent);
    backend_.moe_gather_backward(first_rows(scratch.sorted_rows, sent), slots,
                                 static_cast<int>(ep_), dx);
    backend_.moe_gather_backward(first_rows(dweights_home_, sent * k).view(Shape{sent, k}), slots,
                                 static_cast<int>(ep_), dtopk);
  }

 private:
  // From the gathered counts: the token blocks sent to / received from each peer and the
  // number of expert rows here (saved.plan, saved.expert_rows).
  void plan_exchange(MoeSaved& saved) {
    const int64_t El = local_experts_;
    auto expert_offset = [&](int p, int64_t e) {
      return int64_t{peer_counts_host_[p * width_ + e]};
    };
    auto rank_offset = [&](int p, int64_t q) {
      return int64_t{peer_counts_host_[p * width_ + num_experts_ + 1 + q]};
    };
    for (int p = 0; p < ep_; ++p) {
      bool ok = expert_offset(p, 0) == 0 && rank_offset(p, 0) == 0;
      for (int64_t e = 0; e < num_experts_; ++e)
        ok &= expert_offset(p, e + 1) >= expert_offset(p, e);
      for (int64_t q = 0; q <= ep_; ++q) ok &= rank_offset(p, q + 1) >= rank_offset(p, q);
      if (!ok) fail("expert parallelism: rank ", p, " sent malformed expert or token counts");
    }
    const int rank = comm_.rank();
    ExchangePlan& plan = saved.plan;
    plan.token_send.clear();
    plan.token_recv.clear();
    int64_t received = 0, M = 0;
    for (int p = 0; p < ep_; ++p) {
      plan.token_send.push_back(
          {rank_offset(rank, p), rank_offset(rank, p + 1) - rank_offset(rank, p)});
      const int64_t rows = rank_offset(p, rank + 1) - rank_offset(p, rank);
      plan.token_recv.push_back({received, rows});
      received += rows;
      M += expert_offset(p, (rank + 1) * El) - expert_offset(p, rank * El);
    }
    plan.tokens_sent = rank_offset(rank, ep_);
    plan.tokens_received = received;
    saved.expert_rows = M;
    int64_t max_rows = 0, all_rows = 0;
    for (int r = 0; r < ep_; ++r) {
      int64_t rows = 0;
      for (int p = 0; p < ep_; ++p)
        rows += expert_offset(p, (r + 1) * El) - expert_offset(p, r * El);
      max_rows = std::max(max_rows, rows);
      all_rows += rows;
    }
    record_layer_load(double(max_rows), double(all_rows) / ep_, double(M));
  }

  Backend& backend_;
  dist::Communicator& comm_;
  int ep_;
  int64_t num_experts_, local_experts_;
  int top_k_;
  int64_t width_ = 0;  // E + 1 expert offsets, then the ep + 2 offsets of the rank sort
  // The backward's return exchange (nullptr: the ops' stream); the ops wait for it in
  // dispatch_backward. Meanwhile they leave scratch.exchanged, scratch.sorted_rows and the
  // weight-gradient buffers below alone.
  std::unique_ptr<Backend::SideStream> side_stream_;
  Buffer counts_;                            // (width) I32: this rank's counts
  Buffer peer_counts_;                       // (ep, width) I32: every rank's
  std::vector<int32_t> peer_counts_host_;    // their copy on the host
  Buffer dweights_partial_, dweights_home_;  // (rows * k, 1) fp32 router weight gradients
};

}  // namespace

std::unique_ptr<TokenDispatcher> make_expert_parallel_dispatcher(Backend& backend,
                                                                 dist::Communicator& expert_comm,
                                                                 const ModelConfig& config) {
  return std::make_unique<TokenExchangeDispatcher>(backend, expert_comm, config);
}

}  // namespace moetune
