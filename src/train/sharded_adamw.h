// Data-parallel gradient reduction and AdamW, with ZeRO-style sharding (stage 0, 1 or 2).
//
// Every rank holds the whole model (expert parameters: this EP rank's expert slice) and
// computes gradients of its own micro-batches; this class sums them over the ranks and
// updates the weights so that every replica stays identical:
//   stage 0: gradients all-reduced in place; every rank keeps the full AdamW state and
//            updates every element (memory per rank: state and master weights of the
//            whole model);
//   stage 1: gradients all-reduced in place; AdamW state and fp32 master weights exist only
//            for this rank's shard (1/N of each tensor's elements); each rank updates its
//            shard, then the updated weights are all-gathered;
//   stage 2: as 1, but gradients are reduce-scattered: this rank receives only its shard's
//            reduced gradient (a buffer of 1/N), half the traffic of an all-reduce. The
//            model's full gradient buffers still exist (they are the backward's output);
//            once gradients are allocated per group they can be released after the group's
//            reduce-scatter.
// Parameters with Parameter::expert are reduced and sharded over the expert-DP group (the
// replicas of this rank's expert slice), all others over the world.
//
// Sharding: a tensor of n elements is cut into N chunks of s = ceil(n / N) elements; rank r
// owns elements [r s, min((r+1) s, n)) (possibly none). When N does not divide n, the
// collectives go through a zero-padded scratch buffer of N s elements (internal).
//
// Driving it during the backward: reduce_group(i) from Model's gradient-ready hook of the
// LAST micro-batch of a step (earlier micro-batches only accumulate), finish_reduction()
// after forward_backward returns (reduces groups the hook did not), then
// grad_norm_squared() (global, over all ranks) and step().
//
// Overlap (DataParallelOptions::overlap_communication, on by default; needs a backend with
// side streams, Backend::make_side_stream: CUDA; the CPU runs as without it): the
// reductions run on a communication stream beside the backward. reduce_group makes that
// stream wait for the ops enqueued so far (the group's gradients are final: later groups'
// backward never writes them) and enqueues the group's collectives there, so the rest of
// the backward runs while they transfer; finish_reduction() (also called by
// grad_norm_squared, step and discard) makes the ops' stream wait for the communication
// stream before anything reads the reduced gradients or touches a gradient again. Nothing
// in flight needs scratch memory: with stage 2, a tensor that the ranks do not divide
// evenly is all-reduced in place (and its shard read from the full gradient) instead of
// going through the padded scratch; the scratch then only serves step()'s all-gathers, on
// the ops' stream. Collectives of a group are enqueued in group order, the same on every
// rank (the hook order is the backward's); the weight all-gathers and the norm's
// all-reduce stay on the ops' stream, after the join.
// Without overlap every collective is enqueued on the backend's stream (ordered with the
// ops, no events).
// Batching: a group's collectives are issued inside one dist::CommunicatorGroup per
// communicator (NCCL: one ncclGroupStart/End, one launch instead of one per parameter), and
// so are step()'s all-gathers; collectives that go through the padded scratch stay outside.
//
// The optimizer in the backward (GradientStorage::PerGroup: a group's gradients exist only
// inside the gradient-ready hook): begin_step() before the step's only micro-batch, then
// update_group(i) from the hook does group i's whole step on one stream: the reduction, the
// squared norm of this rank's reduced shard, AdamW on the shard, the all-gather of the
// updated weights (InBackwardOptimizer drives it, on a side stream beside the backward when
// the backend has one). Its weights equal step()'s with grad_scale 1 (no clipping: the global
// norm is known only at the end).
//
// The update of each element is the same Backend::adamw_update math as the unsharded AdamW
// (bit-identical on the CPU given the same reduced gradient).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "dist/communicator.h"
#include "model/model.h"
#include "model/weights.h"
#include "ops/backend.h"
#include "train/adamw.h"

namespace moetune {

struct DataParallelOptions {
  int zero_stage = 1;                 // 0, 1 or 2
  DType state_dtype = DType::F32;     // exp_avg / exp_avg_sq storage (bench: the param dtype)
  bool master_weights = true;         // fp32 master copy (of the shard) of non-fp32 parameters
  bool overlap_communication = true;  // gradient reductions on a side stream (see above)
};

class DataParallelAdamW {
 public:
  // `world` reduces non-expert gradients, `expert_dp` expert gradients (the same
  // communicator when there is no expert parallelism). All must outlive this object.
  DataParallelAdamW(std::span<const Parameter> parameters, std::span<const GradientGroup> groups,
                    Backend& backend, const AdamWConfig& config, dist::Communicator& world,
                    dist::Communicator& expert_dp, const DataParallelOptions& options);
  ~DataParallelAdamW();
  DataParallelAdamW(const DataParallelAdamW&) = delete;
  DataParallelAdamW& operator=(const DataParallelAdamW&) = delete;

  // Reduces the gradients of gradient group `index` (enqueued on the communication stream
  // when overlapping, else on the backend's stream). The group's gradients must not be
  // written until finish_reduction().
  void reduce_group(size_t index);
  // Reduces every group not reduced since the last step()/discard() and orders the ops
  // after every reduction: call after the step's last forward_backward.
  void finish_reduction();
  // True when the reductions run on a side stream (overlap requested and available).
  bool overlapping() const { return side_stream_ != nullptr; }
  // Sum over all ranks of the squares of the reduced gradients (each element counted once):
  // a collective over the world; every rank gets the same value.
  double grad_norm_squared();
  // AdamW on this rank's shards (gradients times grad_scale), then the updated weights are
  // all-gathered (stages 1 and 2). Ends the step.
  void step(double lr, float grad_scale = 1.0f);
  // Ends a skipped step (non-finite gradient) without an update.
  void discard();

  // The optimizer in the backward (see above). begin_step counts the step; update_group
  // enqueues group `index`'s reduction, norm (into norm_squared, (1) fp32, when it has data),
  // update at `lr` and weight all-gather on `stream` (the backend's stream, or a side stream
  // inside SideStreamOps), reading the gradients the group's parameters are bound to now.
  void begin_step() { ++step_count_; }
  void update_group(size_t index, double lr, void* stream, const Tensor& norm_squared);
  // The world communicator (the norms' all-reduce of InBackwardOptimizer).
  dist::Communicator& world() { return world_; }

  int zero_stage() const { return options_.zero_stage; }
  int64_t step_count() const { return step_count_; }
  void set_step_count(int64_t steps) { step_count_ = steps; }

  // This rank's optimizer state for checkpoints: per parameter, the element range
  // [begin, end) of the flattened tensor that the saved tensors hold (this rank's shard;
  // with stage 0 the state is replicated and each rank saves its shard of it too, so
  // checkpoints of every stage look the same), and the 1-D tensors over that range
  // ("exp_avg.NAME", "exp_avg_sq.NAME", "master.NAME" for non-fp32 parameters).
  struct StateShard {
    std::string parameter;
    int64_t numel = 0, begin = 0, end = 0;
    bool expert = false;
    std::vector<std::pair<std::string, Tensor>> tensors;  // name -> (end - begin) elements
  };
  std::vector<StateShard> state_shards() const;

  // Bytes of optimizer state, master weights and gradient shards this rank holds.
  int64_t state_bytes() const;

 private:
  struct Slot;
  void reduce_slot(Slot& slot, void* stream);
  void join_communication();
  void gather_slot(Slot& slot, void* stream);
  void bind_gradients(size_t begin, size_t end);
  AdamWHyper hyper(double lr) const;
  void for_each_batch(size_t begin, size_t end, bool reducing, const std::function<void(Slot&)>& f);
  Tensor padded_scratch(int64_t elements, DType dtype);

  Backend& backend_;
  std::span<const Parameter> parameters_;  // the model's: their gradient bindings are read live
  AdamWConfig config_;
  DataParallelOptions options_;
  dist::Communicator& world_;
  std::vector<GradientGroup> groups_;
  std::vector<Slot> slots_;
  std::vector<bool> group_reduced_;
  std::vector<Buffer> storage_;
  std::unique_ptr<Backend::SideStream> side_stream_;  // null: no overlap
  bool communication_pending_ = false;                // side-stream work not yet joined
  Buffer scratch_;       // padded collectives on the backend's stream (one at a time)
  Buffer norm_squared_;  // (1) fp32 on the device
  int64_t step_count_ = 0;
};

}  // namespace moetune
