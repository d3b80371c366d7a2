// Sharded data-parallel AdamW (see sharded_adamw.h). One Slot per parameter: its
// communicator, its shard range, views of its gradient/weights over that range and the
// AdamW state of the range. Flattened 1-D views (Tensor::view + slice_rows) give element
// ranges of any tensor without copies. Overlap: the reductions go to a side stream, joined
// (one event) before anything reads the reduced gradients.
#include "train/sharded_adamw.h"

#include <algorithm>
#include <functional>

#include "core/error.h"

namespace moetune {

namespace {

Tensor flat(const Tensor& tensor) { return tensor.view({tensor.numel()}); }

Tensor range_of(const Tensor& tensor, int64_t begin, int64_t end) {
  return flat(tensor).slice_rows(begin, end);
}

}  // namespace

struct DataParallelAdamW::Slot {
  Parameter param;
  dist::Communicator* comm = nullptr;
  int shards = 1, shard_rank = 0;
  int64_t numel = 0, chunk = 0;  // chunk = ceil(numel / shards)
  int64_t begin = 0, end = 0;    // this rank's elements
  Tensor grad_shard;             // stage 2: (chunk) reduced gradient of [begin, end)
  AdamWParam adam;               // over [begin, end) (stage 0: the whole tensor)
  bool padded() const { return numel % shards != 0; }
  int64_t count() const { return end - begin; }
};

DataParallelAdamW::DataParallelAdamW(std::span<const Parameter> parameters,
                                     std::span<const GradientGroup> groups, Backend& backend,
                                     const AdamWConfig& config, dist::Communicator& world,
                                     dist::Communicator& expert_dp,
                                     const DataParallelOptions& options)
    : backend_(backend),
      parameters_(parameters),
      config_(config),
      options_(options),
      world_(world),
      groups_(groups.begin(), groups.end()),
      group_reduced_(groups.size(), false) {
  if (options.zero_stage < 0 || options.zero_stage > 2)
    fail("parallel.zero_stage: expected 0, 1 or 2, got ", options.zero_stage);
  const Device device = backend.device();
  const bool sharded = options.zero_stage >= 1;
  if (options.overlap_communication) side_stream_ = backend.make_side_stream();
  size_t scratch_bytes = 0;
  slots_.resize(parameters.size());
  for (size_t i = 0; i < parameters.size(); ++i) {
    Slot& slot = slots_[i];
    const Parameter& parameter = parameters[i];
    slot.param = parameter;
    slot.comm = parameter.expert ? &expert_dp : &world;
    slot.shards = slot.comm->size();
    slot.shard_rank = slot.comm->rank();
    slot.numel = parameter.value.numel();
    slot.chunk = (slot.numel + slot.shards - 1) / slot.shards;
    slot.begin = std::min(slot.numel, slot.shard_rank * slot.chunk);
    slot.end = std::min(slot.numel, slot.begin + slot.chunk);
    // Stage 2 reduce-scatters into a gradient shard; with overlap, not the tensors the
    // ranks do not divide (they are all-reduced in place: no scratch while in flight).
    const bool shard_gradient =
        options.zero_stage == 2 && slot.shards > 1 && !(side_stream_ && slot.padded());
    if (slot.padded() && slot.shards > 1)
      scratch_bytes = std::max(scratch_bytes, static_cast<size_t>(slot.chunk * slot.shards) *
                                                  std::max(dtype_size(parameter.value.dtype),
                                                           dtype_size(parameter.grad.dtype)));

    // The AdamW entry over the elements this rank updates.
    const int64_t first = sharded ? slot.begin : 0, last = sharded ? slot.end : slot.numel;
    const int64_t count = last - first;
    AdamWParam& adam = slot.adam;
    adam.param = range_of(parameter.value, first, last);
    if (shard_gradient) {
      storage_.emplace_back(parameter.grad.dtype, Shape{slot.chunk}, device);
      slot.grad_shard = storage_.back().tensor();
      backend.fill(slot.grad_shard, 0.0f);
      adam.grad = slot.grad_shard.slice_rows(0, count);
    } else {
      adam.grad = range_of(parameter.grad, first, last);
    }
    storage_.emplace_back(options.state_dtype, Shape{count}, device);
    adam.exp_avg = storage_.back().tensor();
    storage_.emplace_back(options.state_dtype, Shape{count}, device);
    adam.exp_avg_sq = storage_.back().tensor();
    if (count > 0) {
      backend.fill(adam.exp_avg, 0.0f);
      backend.fill(adam.exp_avg_sq, 0.0f);
    }
    if (options.master_weights && parameter.value.dtype != DType::F32) {
      storage_.emplace_back(DType::F32, Shape{count}, device);
      adam.master = storage_.back().tensor();
      if (count > 0) backend.copy(adam.master, adam.param);
    }
    adam.weight_decay = parameter.decay ? static_cast<float>(config.weight_decay) : 0.0f;
  }
  if (scratch_bytes > 0)
    scratch_ = Buffer(DType::U8, {static_cast<int64_t>(scratch_bytes)}, device);
  norm_squared_ = Buffer(DType::F32, {1}, device);
  // Every parameter must be in exactly one group (finish_reduction reduces by group).
  std::vector<int> covered(slots_.size(), 0);
  for (const GradientGroup& group : groups_) {
    if (group.begin > group.end || group.end > slots_.size())
      fail("data parallel: gradient group ", group.name, " [", group.begin, ", ", group.end,
           ") is outside the ", slots_.size(), " parameters");
    for (size_t i = group.begin; i < group.end; ++i) ++covered[i];
  }
  for (size_t i = 0; i < covered.size(); ++i)
    if (covered[i] != 1)
      fail("data parallel: parameter ", slots_[i].param.name, " is in ", covered[i],
           " gradient groups (expected 1)");
}

DataParallelAdamW::~DataParallelAdamW() = default;

Tensor DataParallelAdamW::padded_scratch(int64_t elements, DType dtype) {
  return Tensor(scratch_.tensor().data, dtype, {elements}, backend_.device());
}

// Sums the slot's gradient over its communicator on `stream`: in place (stages 0, 1, and
// stage 2 without a gradient shard) or into the slot's gradient shard (stage 2). The padded
// path (scratch copies on the backend's stream) is only taken without overlap.
void DataParallelAdamW::reduce_slot(Slot& slot, void* stream) {
  if (slot.shards == 1 || slot.numel == 0) return;
  const Tensor grad = flat(slot.param.grad);
  if (!slot.grad_shard.data) {
    slot.comm->all_reduce_sum(grad, grad, stream);
    return;
  }
  if (!slot.padded()) {
    slot.comm->reduce_scatter_sum(grad, slot.grad_shard, stream);
    return;
  }
  const Tensor padded = padded_scratch(slot.chunk * slot.shards, grad.dtype);
  backend_.copy(padded.slice_rows(0, slot.numel), grad);
  backend_.fill(padded.slice_rows(slot.numel, padded.numel()), 0.0f);
  slot.comm->reduce_scatter_sum(padded, slot.grad_shard, stream);
}

// The ops enqueued from now on wait for every reduction enqueued on the side stream.
void DataParallelAdamW::join_communication() {
  if (!communication_pending_) return;
  side_stream_->join();
  communication_pending_ = false;
}

// Every rank's updated shard of the weights to every rank (stages 1, 2).
void DataParallelAdamW::gather_slot(Slot& slot, void* stream) {
  if (slot.shards == 1 || slot.numel == 0) return;
  const Tensor value = flat(slot.param.value);
  if (!slot.padded()) {
    // In place: this rank's shard already sits at its offset of the output.
    slot.comm->all_gather(value.slice_rows(slot.begin, slot.end), value, stream);
    return;
  }
  const Tensor padded = padded_scratch(slot.chunk * slot.shards, value.dtype);
  const int64_t offset = slot.shard_rank * slot.chunk;
  if (slot.count() > 0)
    backend_.copy(padded.slice_rows(offset, offset + slot.count()),
                  value.slice_rows(slot.begin, slot.end));
  slot.comm->all_gather(padded.slice_rows(offset, offset + slot.chunk), padded, stream);
  backend_.copy(value, padded.slice_rows(0, slot.numel));
}

void DataParallelAdamW::reduce_group(size_t index) {
  if (index >= groups_.size()) fail("data parallel: no gradient group ", index);
  if (group_reduced_[index]) return;
  group_reduced_[index] = true;
  const GradientGroup& group = groups_[index];
  const bool communicates =
      std::any_of(slots_.begin() + group.begin, slots_.begin() + group.end,
                  [](const Slot& slot) { return slot.shards > 1 && slot.numel > 0; });
  if (!communicates) return;
  void* stream = backend_.stream();
  if (side_stream_) {
    side_stream_->wait_for_ops();  // the group's gradients are complete on the ops' stream
    stream = side_stream_->handle();
    communication_pending_ = true;
  }
  for_each_batch(group.begin, group.end, /*reducing=*/true,
                 [&](Slot& slot) { reduce_slot(slot, stream); });
}

// Calls f (reduce_slot, or gather_slot when not reducing) on every slot of [begin, end):
// the slots whose collective uses no scratch in one communicator group per communicator
// (NCCL: one launch for all of them), then the others one by one (they copy through the
// shared padded scratch around their collective, which a group would only launch at its
// end, after every copy).
void DataParallelAdamW::for_each_batch(size_t begin, size_t end, bool reducing,
                                       const std::function<void(Slot&)>& f) {
  auto batched = [reducing](const Slot& slot) {
    const bool scratch = slot.padded() && (!reducing || slot.grad_shard.data != nullptr);
    return slot.shards > 1 && slot.numel > 0 && !scratch;
  };
  std::vector<dist::Communicator*> comms;
  for (size_t i = begin; i < end; ++i)
    if (batched(slots_[i]) && std::find(comms.begin(), comms.end(), slots_[i].comm) == comms.end())
      comms.push_back(slots_[i].comm);
  for (dist::Communicator* comm : comms) {
    dist::CommunicatorGroup batch(*comm);
    for (size_t i = begin; i < end; ++i)
      if (batched(slots_[i]) && slots_[i].comm == comm) f(slots_[i]);
    batch.end();
  }
  for (size_t i = begin; i < end; ++i)
    if (!batched(slots_[i])) f(slots_[i]);
}

void DataParallelAdamW::finish_reduction() {
  for (size_t index = 0; index < groups_.size(); ++index) reduce_group(index);
  join_communication();
}

double DataParallelAdamW::grad_norm_squared() {
  join_communication();
  // Each element once: every rank sums its shard's range of each reduced gradient.
  std::vector<Tensor> owned;
  for (const Slot& slot : slots_) {
    if (slot.count() == 0) continue;
    if (slot.grad_shard.data)
      owned.push_back(slot.grad_shard.slice_rows(0, slot.count()));
    else
      owned.push_back(range_of(slot.param.grad, slot.begin, slot.end));
  }
  if (owned.empty())
    backend_.fill(norm_squared_, 0.0f);
  else
    backend_.grad_norm_squared(owned, norm_squared_);
  world_.all_reduce_sum(norm_squared_, norm_squared_, backend_.stream());
  float value = 0;
  backend_.copy(Tensor(&value, DType::F32, {1}), norm_squared_);
  backend_.synchronize();
  return value;
}

AdamWHyper DataParallelAdamW::hyper(double lr) const {
  AdamWHyper hyper;
  hyper.lr = lr;
  hyper.beta1 = config_.beta1;
  hyper.beta2 = config_.beta2;
  hyper.eps = config_.eps;
  hyper.step = step_count_;
  return hyper;
}

void DataParallelAdamW::step(double lr, float grad_scale) {
  finish_reduction();
  ++step_count_;
  std::vector<AdamWParam> updates;
  for (const Slot& slot : slots_)
    if (slot.adam.param.numel() > 0) updates.push_back(slot.adam);
  if (!updates.empty()) backend_.adamw_update(updates, hyper(lr), grad_scale);
  if (options_.zero_stage >= 1)
    for_each_batch(0, slots_.size(), /*reducing=*/false,
                   [&](Slot& slot) { gather_slot(slot, backend_.stream()); });
  discard();
}

// The slots of [begin, end) read the gradients their parameters are bound to now
// (GradientStorage::PerGroup binds a group's gradients only while the backward's hook runs).
void DataParallelAdamW::bind_gradients(size_t begin, size_t end) {
  for (size_t i = begin; i < end; ++i) {
    Slot& slot = slots_[i];
    slot.param.grad = parameters_[i].grad;
    if (!slot.grad_shard.data) {
      const bool sharded = options_.zero_stage >= 1;
      slot.adam.grad =
          range_of(slot.param.grad, sharded ? slot.begin : 0, sharded ? slot.end : slot.numel);
    }
  }
}

void DataParallelAdamW::update_group(size_t index, double lr, void* stream,
                                     const Tensor& norm_squared) {
  if (index >= groups_.size()) fail("data parallel: no gradient group ", index);
  MOETUNE_CHECK(step_count_ > 0, "DataParallelAdamW::update_group before begin_step");
  const GradientGroup& group = groups_[index];
  bind_gradients(group.begin, group.end);
  for_each_batch(group.begin, group.end, /*reducing=*/true,
                 [&](Slot& slot) { reduce_slot(slot, stream); });
  std::vector<AdamWParam> updates;
  std::vector<Tensor> owned;
  for (size_t i = group.begin; i < group.end; ++i) {
    const Slot& slot = slots_[i];
    if (slot.adam.param.numel() > 0) updates.push_back(slot.adam);
    if (slot.count() == 0) continue;
    owned.push_back(slot.grad_shard.data ? slot.grad_shard.slice_rows(0, slot.count())
                                         : range_of(slot.param.grad, slot.begin, slot.end));
  }
  if (norm_squared.data) {
    if (owned.empty())
      backend_.fill(norm_squared, 0.0f);
    else
      backend_.grad_norm_squared(owned, norm_squared);
  }
  if (!updates.empty()) backend_.adamw_update(updates, hyper(lr), 1.0f);
  if (options_.zero_stage >= 1)
    for_each_batch(group.begin, group.end, /*reducing=*/false,
                   [&](Slot& slot) { gather_slot(slot, stream); });
}

void DataParallelAdamW::discard() {
  join_communication();  // the next zero_grads must not race a reduction still reading
  std::fill(group_reduced_.begin(), group_reduced_.end(), false);
}

std::vector<DataParallelAdamW::StateShard> DataParallelAdamW::state_shards() const {
  std::vector<StateShard> shards;
  for (const Slot& slot : slots_) {
    StateShard shard;
    shard.parameter = slot.param.name;
    shard.numel = slot.numel;
    shard.begin = slot.begin;
    shard.end = slot.end;
    shard.expert = slot.param.expert;
    // Stage 0 holds the whole tensor's state: save this rank's range of it.
    const int64_t offset = options_.zero_stage >= 1 ? 0 : slot.begin;
    auto part = [&](const Tensor& state) {
      return state.slice_rows(offset, offset + slot.count());
    };
    shard.tensors.emplace_back("exp_avg." + slot.param.name, part(slot.adam.exp_avg));
    shard.tensors.emplace_back("exp_avg_sq." + slot.param.name, part(slot.adam.exp_avg_sq));
    if (slot.adam.master.rank() > 0)  // set: this parameter has master weights
      shard.tensors.emplace_back("master." + slot.param.name, part(slot.adam.master));
    shards.push_back(std::move(shard));
  }
  return shards;
}

int64_t DataParallelAdamW::state_bytes() const {
  int64_t bytes = 0;
  for (const Buffer& buffer : storage_) bytes += static_cast<int64_t>(buffer.bytes());
  return bytes;
}

}  // namespace moetune
