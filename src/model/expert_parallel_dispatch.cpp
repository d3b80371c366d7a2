// The expert-parallel TokenDispatcher (see expert_parallel_dispatch.h for the steps).
// Row order conventions: "sorted" = this rank's N*k slots sorted by global expert (what
// moe_sort_by_expert gives, sent in per-rank, per-chunk blocks); "received" = a chunk's
// rows grouped by source rank, each block sorted by expert; "expert-major" = the same rows
// grouped by local expert, then by source rank (the grouped GEMM's input). Each chunk owns
// the same row range in both orders. Permutations between received and expert-major are
// moe_gather calls with top_k = 1 (out[r] = x[index[r]]) on the chunk's rows.
#include "model/expert_parallel_dispatch.h"

#include <algorithm>
#include <span>
#include <string>
#include <vector>

#include "core/error.h"

namespace moetune {

namespace {

template <typename T>
Tensor host_view(std::vector<T>& values, DType dtype) {
  return Tensor(values.data(), dtype, {static_cast<int64_t>(values.size())});
}

class ExpertParallelDispatcher final : public TokenDispatcher {
 public:
  ExpertParallelDispatcher(Backend& backend, dist::Communicator& comm, const ModelConfig& config,
                           int chunks)
      : backend_(backend),
        comm_(comm),
        ep_(comm.size()),
        num_experts_(config.num_experts),
        local_experts_(config.num_experts / comm.size()),
        top_k_(static_cast<int>(config.num_experts_per_tok)) {
    if (ep_ < 1 || num_experts_ < 1 || num_experts_ % ep_ != 0)
      fail("expert parallelism: ", ep_, " ranks do not divide the ", num_experts_, " experts of ",
           config.model_type);
    chunks_ = std::clamp<int64_t>(chunks, 1, local_experts_);
    side_stream_ = backend.make_side_stream();
    peer_offsets_ = Buffer(DType::I32, {ep_, num_experts_ + 1}, backend.device());
    peer_offsets_host_.resize(static_cast<size_t>(ep_ * (num_experts_ + 1)));
  }

  void dispatch(const Tensor& x, const Tensor& topk_ids, MoeSaved& saved,
                MoeScratch& scratch) override {
    const int64_t slots = topk_ids.numel(), H = x.size(1);
    backend_.moe_sort_by_expert(topk_ids, static_cast<int>(num_experts_), saved.expert_offsets,
                                saved.sorted_slots, saved.slot_rows);
    ensure_rows(scratch.sorted_rows, x.dtype, slots, H, backend_.device());
    ensure_rows(scratch.sorted_weights, DType::F32, slots, 1, backend_.device());
    const Tensor sorted = first_rows(scratch.sorted_rows, slots);             // (N*k, H)
    const Tensor sorted_weights = first_rows(scratch.sorted_weights, slots);  // (N*k, 1)
    backend_.moe_gather(x, saved.sorted_slots, top_k_, sorted);
    backend_.moe_gather(slot_column(saved.topk_weights), saved.sorted_slots, 1, sorted_weights);
    plan_exchange(saved);
    const int64_t M = saved.expert_rows;
    reserve_received(scratch, x.dtype, M, H);
    ensure_capacity(saved.rows, x.dtype, M, H, backend_.device());
    ensure_capacity(saved.row_weights, DType::F32, M, 1, backend_.device());
    send_to_experts({sorted, sorted_weights}, received(scratch, M), saved.plan);
  }

  std::vector<ExpertChunk> chunks(const MoeSaved& saved) const override {
    std::vector<ExpertChunk> result;
    for (const ExchangeChunk& chunk : saved.plan.chunks) result.push_back(chunk.experts);
    return result;
  }

  Tensor expert_output(MoeSaved& saved, MoeScratch& scratch) override {
    ensure_capacity(scratch.expert_result, saved.rows.dtype(), saved.expert_rows,
                    saved.rows.shape()[1], backend_.device());
    return first_rows(scratch.expert_result, saved.expert_rows);
  }

  // received rows (and router weights) of the chunk -> its expert-major rows of saved.rows
  void chunk_ready(MoeSaved& saved, MoeScratch& scratch, size_t c) override {
    const ExchangeChunk& chunk = saved.plan.chunks[c];
    const int64_t M = saved.expert_rows;
    regroup(chunk, first_rows(scratch.exchanged, M), first_rows(saved.rows, M));
    regroup(chunk, first_rows(scratch.exchanged_weights, M), first_rows(saved.row_weights, M));
  }

  // the chunk's outputs -> received order -> back to their ranks (into scratch.sorted_rows)
  void chunk_done(MoeSaved& saved, MoeScratch& scratch, size_t c) override {
    const ExchangeChunk& chunk = saved.plan.chunks[c];
    const int64_t M = saved.expert_rows, slots = saved.sorted_slots.numel();
    ungroup(chunk, first_rows(scratch.expert_result, M), first_rows(scratch.exchanged, M));
    send_home(c, {first_rows(scratch.exchanged, M)}, {first_rows(scratch.sorted_rows, slots)},
              saved.plan);
  }

  void combine(MoeSaved& saved, MoeScratch& scratch, const Tensor& out) override {
    if (side_stream_) side_stream_->join();  // every chunk is home
    backend_.moe_combine(first_rows(scratch.sorted_rows, saved.sorted_slots.numel()),
                         saved.topk_weights, saved.slot_rows, out);
  }

  // Each row's token's gradient dout (unweighted) to the row's expert.
  void combine_backward(const Tensor& dout, const MoeSaved& saved, MoeScratch& scratch) override {
    const int64_t slots = saved.sorted_slots.numel(), M = saved.expert_rows;
    const int64_t H = dout.size(1);
    ensure_rows(scratch.sorted_rows, dout.dtype, slots, H, backend_.device());
    ensure_rows(scratch.sorted_weights, DType::F32, slots, 1, backend_.device());
    reserve_received(scratch, dout.dtype, M, H);
    ensure_capacity(scratch.dexpert_out, dout.dtype, M, H, backend_.device());
    const Tensor dsorted = first_rows(scratch.sorted_rows, slots);  // (N*k, H)
    backend_.moe_gather(dout, saved.sorted_slots, top_k_, dsorted);
    send_to_experts({dsorted}, {first_rows(scratch.exchanged, M)}, saved.plan);
  }

  void chunk_backward_ready(const MoeSaved& saved, MoeScratch& scratch, size_t c) override {
    const int64_t M = saved.expert_rows;
    regroup(saved.plan.chunks[c], first_rows(scratch.exchanged, M),
            first_rows(scratch.dexpert_out, M));
  }

  // the chunk's input gradients and router weight gradients -> received order -> home
  void chunk_backward_done(const MoeSaved& saved, MoeScratch& scratch, size_t c) override {
    const ExchangeChunk& chunk = saved.plan.chunks[c];
    const int64_t M = saved.expert_rows, slots = saved.sorted_slots.numel();
    ungroup(chunk, first_rows(scratch.drows, M), first_rows(scratch.exchanged, M));
    ungroup(chunk, first_rows(scratch.drow_weights, M), first_rows(scratch.exchanged_weights, M));
    send_home(c, received(scratch, M),
              {first_rows(scratch.sorted_rows, slots), first_rows(scratch.sorted_weights, slots)},
              saved.plan);
  }

  void dispatch_backward(const MoeSaved& saved, MoeScratch& scratch, const Tensor& dx) override {
    if (side_stream_) side_stream_->join();  // every chunk's input gradients are home
    const int64_t slots = saved.sorted_slots.numel();
    backend_.moe_gather_backward(first_rows(scratch.sorted_rows, slots), saved.sorted_slots, top_k_,
                                 dx);
    scatter_weight_grads(backend_, saved, first_rows(scratch.sorted_weights, slots),
                         scratch.dtopk_weights);
  }

 private:
  // The stream the exchanges go on: the side stream (after the ops enqueued so far) or,
  // without one, the ops' stream.
  void* exchange_stream() {
    if (!side_stream_) return backend_.stream();
    side_stream_->wait_for_ops();
    return side_stream_->handle();
  }

  // The received-order buffers of M rows: the rows (M, H) and their weights (M, 1).
  void reserve_received(MoeScratch& scratch, DType dtype, int64_t M, int64_t H) {
    ensure_capacity(scratch.exchanged, dtype, M, H, backend_.device());
    ensure_capacity(scratch.exchanged_weights, DType::F32, M, 1, backend_.device());
  }
  static std::vector<Tensor> received(const MoeScratch& scratch, int64_t M) {
    return {first_rows(scratch.exchanged, M), first_rows(scratch.exchanged_weights, M)};
  }

  // Every chunk's rows of each tensor of `sorted` (this rank's slots, expert-sorted) to the
  // ranks of their experts, into the same tensor of `received` (M rows); a chunk's tensors
  // travel in one communicator group. The ops wait for chunk 0 now, for chunk c + 1 at
  // chunk c's send_home (the exchanges are enqueued in that order, so a fence waits for
  // exactly what was enqueued before it).
  void send_to_experts(const std::vector<Tensor>& sorted, const std::vector<Tensor>& received,
                       const ExchangePlan& plan) {
    void* stream = exchange_stream();
    for (size_t c = 0; c < plan.chunks.size(); ++c) {
      exchange(sorted, plan.chunks[c].send, received, plan.chunks[c].recv, stream);
      if (c == 0 && side_stream_) side_stream_->join();
    }
  }

  // Chunk c's rows of each tensor of `received` (in received order, ungrouped) back to the
  // ranks they came from, into their blocks of the same tensor of `home` (N*k rows).
  void send_home(size_t c, const std::vector<Tensor>& received, const std::vector<Tensor>& home,
                 const ExchangePlan& plan) {
    // the ops wait for the next chunk's rows (enqueued before anything else of this chunk)
    if (side_stream_ && c + 1 < plan.chunks.size()) side_stream_->join();
    exchange(received, plan.chunks[c].recv, home, plan.chunks[c].send, exchange_stream());
  }

  void exchange(const std::vector<Tensor>& from, std::span<const dist::RowBlock> from_blocks,
                const std::vector<Tensor>& to, std::span<const dist::RowBlock> to_blocks,
                void* stream) {
    dist::CommunicatorGroup group(comm_);
    for (size_t t = 0; t < from.size(); ++t)
      comm_.all_to_all_v_blocks(from[t], from_blocks, to[t], to_blocks, stream);
    group.end();
  }

  // to[chunk rows] = received-order rows of `from` gathered into expert-major order.
  void regroup(const ExchangeChunk& chunk, const Tensor& from, const Tensor& to) {
    if (chunk.experts.rows() == 0) return;
    const int64_t begin = chunk.experts.row_begin, end = chunk.experts.row_end;
    backend_.moe_gather(from.slice_rows(begin, end), chunk.regroup, 1, to.slice_rows(begin, end));
  }
  // The inverse: expert-major rows of `from` back to received order in `to`.
  void ungroup(const ExchangeChunk& chunk, const Tensor& from, const Tensor& to) {
    if (chunk.experts.rows() == 0) return;
    const int64_t begin = chunk.experts.row_begin, end = chunk.experts.row_end;
    backend_.moe_gather(from.slice_rows(begin, end), chunk.ungroup, 1, to.slice_rows(begin, end));
  }

  // From saved.expert_offsets: every peer's offsets (one all_gather on the device), the
  // row blocks per peer and chunk on the host (the layer's one device->host read: the host
  // must size the exchanges), and each chunk's permutations between received and
  // expert-major order, built on the device from the same offsets (saved.plan,
  // saved.expert_rows). Chunk c holds local experts [c El / C, (c + 1) El / C); its rows
  // follow the previous chunks' in both orders.
  void plan_exchange(MoeSaved& saved) {
    const int64_t width = num_experts_ + 1, El = local_experts_;
    comm_.all_gather(saved.expert_offsets, peer_offsets_, backend_.stream());  // (ep, E + 1)
    backend_.copy(host_view(peer_offsets_host_, DType::I32), peer_offsets_);
    backend_.synchronize();
    // offset(p, e): peer p's first row of global expert e (in its expert-sorted order)
    auto offset = [&](int p, int64_t e) { return int64_t{peer_offsets_host_[p * width + e]}; };
    for (int p = 0; p < ep_; ++p)
      for (int64_t e = 0; e < num_experts_; ++e)
        if (offset(p, e + 1) < offset(p, e) || offset(p, 0) != 0)
          fail("expert parallelism: rank ", p, " sent malformed expert offsets (expert ", e, ")");
    const int rank = comm_.rank();
    ExchangePlan& plan = saved.plan;
    plan.chunks.assign(static_cast<size_t>(chunks_), ExchangeChunk{});
    int64_t M = 0;
    for (int64_t c = 0; c < chunks_; ++c) {
      ExchangeChunk& chunk = plan.chunks[c];
      const int64_t first = c * El / chunks_, last = (c + 1) * El / chunks_;  // local experts
      chunk.experts.expert_begin = first;
      chunk.experts.expert_end = last;
      chunk.experts.row_begin = M;
      for (int p = 0; p < ep_; ++p) {
        const int64_t send_begin = offset(rank, p * El + first);
        chunk.send.push_back({send_begin, offset(rank, p * El + last) - send_begin});
        const int64_t rows = offset(p, rank * El + last) - offset(p, rank * El + first);
        chunk.recv.push_back({M, rows});
        M += rows;
      }
      chunk.experts.row_end = M;
    }
    saved.expert_rows = M;

    // indices = [offsets of chunk 0 | of chunk 1 | ... | regroup, ungroup of chunk 0 | ...]
    plan.indices = Buffer(DType::I32, {El + chunks_ + 2 * M}, backend_.device());
    int32_t* next = plan.indices.ptr<int32_t>();
    const Device device = backend_.device();
    auto take = [&](int64_t count) {
      Tensor view(next, DType::I32, {count}, device);
      next += count;
      return view;
    };
    for (ExchangeChunk& chunk : plan.chunks)
      chunk.experts.offsets = take(chunk.experts.expert_end - chunk.experts.expert_begin + 1);
    for (ExchangeChunk& chunk : plan.chunks) {
      chunk.regroup = take(chunk.experts.rows());
      chunk.ungroup = take(chunk.experts.rows());
      backend_.moe_regroup_by_expert(peer_offsets_, rank * El + chunk.experts.expert_begin,
                                     chunk.experts.offsets, chunk.regroup, chunk.ungroup);
    }
  }

  Backend& backend_;
  dist::Communicator& comm_;
  int ep_;
  int64_t num_experts_, local_experts_;
  int top_k_;
  int64_t chunks_ = 1;
  // The exchanges (nullptr: the ops' stream). Between their start and the fences above they
  // touch scratch.sorted_rows / scratch.exchanged / saved.expert_out blocks that the ops
  // leave alone until then (each chunk's rows are disjoint from the others').
  std::unique_ptr<Backend::SideStream> side_stream_;
  Buffer peer_offsets_;                     // (ep, E + 1) I32 on the device
  std::vector<int32_t> peer_offsets_host_;  // (ep * (E + 1)) its copy on the host
};

}  // namespace

std::unique_ptr<TokenDispatcher> make_expert_parallel_dispatcher(Backend& backend,
                                                                 dist::Communicator& expert_comm,
                                                                 const ModelConfig& config,
                                                                 int chunks) {
  return std::make_unique<ExpertParallelDispatcher>(backend, expert_comm, config, chunks);
}

}  // namespace moetune
