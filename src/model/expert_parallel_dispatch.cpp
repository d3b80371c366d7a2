// The expert-parallel TokenDispatcher (see expert_parallel_dispatch.h for the steps).
// Row order conventions: "sorted" = this rank's N*k slots sorted by global expert (what
// moe_sort_by_expert gives, sent in rank blocks); "received" = M rows grouped by source
// rank, each block sorted by expert; "expert-major" = the same M rows grouped by local
// expert, then by source rank (the grouped GEMM's input). Permutations between received
// and expert-major are moe_gather calls with top_k = 1 (out[r] = x[index[r]]).
#include "model/expert_parallel_dispatch.h"

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
  ExpertParallelDispatcher(Backend& backend, dist::Communicator& comm, const ModelConfig& config)
      : backend_(backend),
        comm_(comm),
        ep_(comm.size()),
        num_experts_(config.num_experts),
        local_experts_(config.num_experts / comm.size()),
        top_k_(static_cast<int>(config.num_experts_per_tok)) {
    side_stream_ = backend.make_side_stream();
    if (ep_ < 1 || num_experts_ < 1 || num_experts_ % ep_ != 0)
      fail("expert parallelism: ", ep_, " ranks do not divide the ", num_experts_, " experts of ",
           config.model_type);
    peer_offsets_ = Buffer(DType::I32, {ep_, num_experts_ + 1}, backend.device());
    peer_offsets_host_.resize(static_cast<size_t>(ep_ * (num_experts_ + 1)));
  }

  void dispatch(const Tensor& x, const Tensor& topk_ids, MoeSaved& saved,
                MoeScratch& scratch) override {
    const int64_t slots = topk_ids.numel(), H = x.size(1);
    backend_.moe_sort_by_expert(topk_ids, static_cast<int>(num_experts_), saved.expert_offsets,
                                saved.sorted_slots, saved.slot_rows);
    ensure_rows(scratch.sorted_rows, x.dtype, slots, H, backend_.device());
    const Tensor sorted = first_rows(scratch.sorted_rows, slots);  // (N*k, H)
    backend_.moe_gather(x, saved.sorted_slots, top_k_, sorted);
    plan_exchange(saved);
    const int64_t M = saved.expert_rows;
    ensure_rows(scratch.exchanged, x.dtype, M, H, backend_.device());
    ensure_rows(saved.rows, x.dtype, M, H, backend_.device());
    const Tensor received = first_rows(scratch.exchanged, M);  // (M, H)
    comm_.all_to_all_v(sorted, saved.plan.send_rows, received, saved.plan.recv_rows, stream());
    if (M > 0) backend_.moe_gather(received, saved.plan.regroup, 1, first_rows(saved.rows, M));
  }

  Tensor expert_output(MoeSaved& saved, MoeScratch& scratch) override {
    ensure_rows(scratch.expert_result, saved.rows.dtype(), saved.expert_rows, saved.rows.shape()[1],
                backend_.device());
    return first_rows(scratch.expert_result, saved.expert_rows);
  }

  void combine(MoeSaved& saved, MoeScratch& scratch, const Tensor& out) override {
    const int64_t M = saved.expert_rows;
    const Tensor results = first_rows(scratch.exchanged, M);  // (M, H) in received order
    if (M > 0)
      backend_.moe_gather(first_rows(scratch.expert_result, M), saved.plan.ungroup, 1, results);
    comm_.all_to_all_v(results, saved.plan.recv_rows, saved.expert_out, saved.plan.send_rows,
                       stream());  // back home: (N*k, H) sorted
    backend_.moe_combine(saved.expert_out, saved.topk_weights, saved.slot_rows, out);
  }

  void combine_backward(const Tensor& dout, const MoeSaved& saved, MoeScratch& scratch) override {
    const int64_t slots = saved.sorted_slots.numel(), M = saved.expert_rows;
    const int64_t H = dout.size(1);
    ensure_rows(scratch.sorted_rows, dout.dtype, slots, H, backend_.device());
    ensure_rows(scratch.exchanged, dout.dtype, M, H, backend_.device());
    ensure_rows(scratch.dexpert_out, dout.dtype, M, H, backend_.device());
    const Tensor dsorted = first_rows(scratch.sorted_rows, slots);  // (N*k, H)
    backend_.moe_combine_backward(dout, saved.expert_out, saved.topk_weights, saved.slot_rows,
                                  dsorted, scratch.dtopk_weights);
    const Tensor dreceived = first_rows(scratch.exchanged, M);  // (M, H)
    comm_.all_to_all_v(dsorted, saved.plan.send_rows, dreceived, saved.plan.recv_rows, stream());
    if (M > 0)
      backend_.moe_gather(dreceived, saved.plan.regroup, 1, first_rows(scratch.dexpert_out, M));
  }

  // The input gradients back to their ranks: ungrouped on the ops' stream, exchanged on
  // the side stream when there is one (the weight gradients compute meanwhile).
  void start_dispatch_backward(const MoeSaved& saved, MoeScratch& scratch) override {
    const int64_t slots = saved.sorted_slots.numel(), M = saved.expert_rows;
    const Tensor dreceived = first_rows(scratch.exchanged, M);  // (M, H)
    if (M > 0) backend_.moe_gather(first_rows(scratch.drows, M), saved.plan.ungroup, 1, dreceived);
    const Tensor dsorted = first_rows(scratch.sorted_rows, slots);  // (N*k, H)
    void* stream = backend_.stream();
    if (side_stream_) {
      side_stream_->wait_for_ops();  // dreceived is complete
      stream = side_stream_->handle();
    }
    comm_.all_to_all_v(dreceived, saved.plan.recv_rows, dsorted, saved.plan.send_rows, stream);
    backward_started_ = true;
  }

  void dispatch_backward(const MoeSaved& saved, MoeScratch& scratch, const Tensor& dx) override {
    if (!backward_started_) start_dispatch_backward(saved, scratch);
    backward_started_ = false;
    if (side_stream_) side_stream_->join();  // dsorted has arrived
    const int64_t slots = saved.sorted_slots.numel();
    backend_.moe_gather_backward(first_rows(scratch.sorted_rows, slots), saved.sorted_slots, top_k_,
                                 dx);
  }

 private:
  dist::StreamHandle stream() const { return backend_.stream(); }

  // From saved.expert_offsets: every peer's offsets (one all_gather on the device), the
  // row counts per peer on the host (the layer's one device->host read: the host must size
  // the all_to_all_v), and the permutations between received and expert-major order, built
  // on the device from the same offsets (saved.plan, saved.expert_rows).
  void plan_exchange(MoeSaved& saved) {
    const int64_t width = num_experts_ + 1, El = local_experts_;
    comm_.all_gather(saved.expert_offsets, peer_offsets_, stream());  // (ep, E + 1)
    backend_.copy(host_view(peer_offsets_host_, DType::I32), peer_offsets_);
    backend_.synchronize();
    // offset(p, e): peer p's first row of global expert e (in its expert-sorted order)
    auto offset = [&](int p, int64_t e) { return int64_t{peer_offsets_host_[p * width + e]}; };
    const int rank = comm_.rank();
    ExchangePlan& plan = saved.plan;
    plan.send_rows.assign(static_cast<size_t>(ep_), 0);
    plan.recv_rows.assign(static_cast<size_t>(ep_), 0);
    int64_t M = 0;
    for (int p = 0; p < ep_; ++p) {
      for (int64_t e = 0; e < num_experts_; ++e)
        if (offset(p, e + 1) < offset(p, e) || offset(p, 0) != 0)
          fail("expert parallelism: rank ", p, " sent malformed expert offsets (expert ", e, ")");
      plan.send_rows[p] = offset(rank, (p + 1) * El) - offset(rank, p * El);
      plan.recv_rows[p] = offset(p, (rank + 1) * El) - offset(p, rank * El);
      M += plan.recv_rows[p];
    }
    saved.expert_rows = M;

    // indices = [local_offsets (El + 1) | regroup (M) | ungroup (M)], written on the device
    plan.indices = Buffer(DType::I32, {El + 1 + 2 * M}, backend_.device());
    int32_t* base = plan.indices.ptr<int32_t>();
    const Device device = backend_.device();
    plan.local_offsets = Tensor(base, DType::I32, {El + 1}, device);
    plan.regroup = Tensor(base + El + 1, DType::I32, {M}, device);
    plan.ungroup = Tensor(base + El + 1 + M, DType::I32, {M}, device);
    backend_.moe_regroup_by_expert(peer_offsets_, rank * El, plan.local_offsets, plan.regroup,
                                   plan.ungroup);
  }

  Backend& backend_;
  // The reverse exchange of the input gradients (nullptr: the ops' stream). Between
  // start_dispatch_backward and dispatch_backward's join it reads scratch.exchanged and
  // writes scratch.sorted_rows, which nothing else touches until then.
  std::unique_ptr<Backend::SideStream> side_stream_;
  bool backward_started_ = false;
  dist::Communicator& comm_;
  int ep_;
  int64_t num_experts_, local_experts_;
  int top_k_;
  Buffer peer_offsets_;                     // (ep, E + 1) I32 on the device
  std::vector<int32_t> peer_offsets_host_;  // (ep * (E + 1)) its copy on the host
};

}  // namespace

std::unique_ptr<TokenDispatcher> make_expert_parallel_dispatcher(Backend& backend,
                                                                 dist::Communicator& expert_comm,
                                                                 const ModelConfig& config) {
  return std::make_unique<ExpertParallelDispatcher>(backend, expert_comm, config);
}

}  // namespace moetune
