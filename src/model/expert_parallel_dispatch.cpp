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
    if (ep_ < 1 || num_experts_ < 1 || num_experts_ % ep_ != 0)
      fail("expert parallelism: ", ep_, " ranks do not divide the ", num_experts_, " experts of ",
           config.model_type);
    const int64_t counts = static_cast<int64_t>(ep_) * local_experts_;
    counts_send_ = Buffer(DType::I32, {counts}, backend.device());
    counts_recv_ = Buffer(DType::I32, {counts}, backend.device());
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

  void dispatch_backward(const MoeSaved& saved, MoeScratch& scratch, const Tensor& dx) override {
    const int64_t slots = saved.sorted_slots.numel(), M = saved.expert_rows;
    const Tensor dreceived = first_rows(scratch.exchanged, M);  // (M, H)
    if (M > 0) backend_.moe_gather(first_rows(scratch.drows, M), saved.plan.ungroup, 1, dreceived);
    const Tensor dsorted = first_rows(scratch.sorted_rows, slots);  // (N*k, H)
    comm_.all_to_all_v(dreceived, saved.plan.recv_rows, dsorted, saved.plan.send_rows, stream());
    backend_.moe_gather_backward(dsorted, saved.sorted_slots, top_k_, dx);
  }

 private:
  dist::StreamHandle stream() const { return backend_.stream(); }

  // From saved.expert_offsets: the row counts per peer, exchanged, and the permutation
  // from received to expert-major order (saved.plan, saved.expert_rows).
  void plan_exchange(MoeSaved& saved) {
    const int64_t E = num_experts_, El = local_experts_;
    std::vector<int32_t> offsets(static_cast<size_t>(E + 1));
    backend_.copy(host_view(offsets, DType::I32), saved.expert_offsets);
    backend_.synchronize();
    // send_counts[p * El + e]: rows of this rank for peer p's local expert e
    std::vector<int32_t> send_counts(static_cast<size_t>(E)), recv_counts(send_counts.size());
    for (int64_t e = 0; e < E; ++e) send_counts[e] = offsets[e + 1] - offsets[e];
    backend_.copy(counts_send_, host_view(send_counts, DType::I32));
    const std::vector<int64_t> per_peer(static_cast<size_t>(ep_), El);
    comm_.all_to_all_v(counts_send_, per_peer, counts_recv_, per_peer, stream());
    backend_.copy(host_view(recv_counts, DType::I32), counts_recv_);
    backend_.synchronize();

    ExchangePlan& plan = saved.plan;
    plan.send_rows.assign(static_cast<size_t>(ep_), 0);
    plan.recv_rows.assign(static_cast<size_t>(ep_), 0);
    for (int p = 0; p < ep_; ++p) {
      plan.send_rows[p] = offsets[(p + 1) * El] - offsets[p * El];
      for (int64_t e = 0; e < El; ++e) {
        const int32_t count = recv_counts[p * El + e];
        if (count < 0) fail("expert parallelism: rank ", p, " announced ", count, " rows");
        plan.recv_rows[p] += count;
      }
    }
    int64_t M = 0;
    std::vector<int64_t> source_start(static_cast<size_t>(ep_));  // first received row of p
    for (int p = 0; p < ep_; ++p) source_start[p] = M, M += plan.recv_rows[p];
    saved.expert_rows = M;

    // indices = [local_offsets (El + 1) | regroup (M) | ungroup (M)]
    std::vector<int32_t> indices(static_cast<size_t>(El + 1 + 2 * M));
    int32_t* local_offsets = indices.data();
    int32_t* regroup = local_offsets + El + 1;
    int32_t* ungroup = regroup + M;
    std::vector<int64_t> cursor = source_start;  // next received row of (p, current e)
    int64_t row = 0;                             // expert-major row
    for (int64_t e = 0; e < El; ++e) {
      local_offsets[e] = static_cast<int32_t>(row);
      for (int p = 0; p < ep_; ++p) {
        // p's rows for expert e follow its rows for experts < e (cursor[p] advances in e)
        for (int32_t i = 0; i < recv_counts[p * El + e]; ++i, ++row) {
          regroup[row] = static_cast<int32_t>(cursor[p] + i);
          ungroup[cursor[p] + i] = static_cast<int32_t>(row);
        }
        cursor[p] += recv_counts[p * El + e];
      }
    }
    local_offsets[El] = static_cast<int32_t>(row);
    plan.indices = Buffer(DType::I32, {El + 1 + 2 * M}, backend_.device());
    backend_.copy(plan.indices, host_view(indices, DType::I32));
    int32_t* base = plan.indices.ptr<int32_t>();
    const Device device = backend_.device();
    plan.local_offsets = Tensor(base, DType::I32, {El + 1}, device);
    plan.regroup = Tensor(base + El + 1, DType::I32, {M}, device);
    plan.ungroup = Tensor(base + El + 1 + M, DType::I32, {M}, device);
  }

  Backend& backend_;
  dist::Communicator& comm_;
  int ep_;
  int64_t num_experts_, local_experts_;
  int top_k_;
  Buffer counts_send_, counts_recv_;  // (ep * E_local) I32 on the device
};

}  // namespace

std::unique_ptr<TokenDispatcher> make_expert_parallel_dispatcher(Backend& backend,
                                                                 dist::Communicator& expert_comm,
                                                                 const ModelConfig& config) {
  return std::make_unique<ExpertParallelDispatcher>(backend, expert_comm, config);
}

}  // namespace moetune
