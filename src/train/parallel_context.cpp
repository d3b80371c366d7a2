// Joining a multi-process run (see parallel_context.h).
#include "train/parallel_context.h"

#include <numeric>
#include <vector>

#include "core/error.h"

namespace moetune {

dist::ParallelLayout resolve_layout(int world, int64_t expert_parallel, int64_t data_parallel,
                                    int64_t num_experts, const LayoutKeys& keys) {
  if (expert_parallel < 1)
    fail(keys.expert_parallel, ": expected a positive number, got ", expert_parallel);
  if (data_parallel < 0)
    fail(keys.data_parallel, ": expected a positive number, got ", data_parallel);
  if (world % expert_parallel != 0)
    fail(keys.expert_parallel, ": ", expert_parallel, " does not divide the ", world,
         " ranks of this job (world = data_parallel x expert_parallel)");
  if (num_experts > 0 && num_experts % expert_parallel != 0)
    fail(keys.expert_parallel, ": ", expert_parallel, " does not divide the model's ", num_experts,
         " experts");
  if (expert_parallel > 1 && num_experts == 0)
    fail(keys.expert_parallel, ": ", expert_parallel,
         " needs a MoE model (this one has no experts)");
  const int64_t implied = world / expert_parallel;
  if (data_parallel != 0 && data_parallel != implied)
    fail(keys.data_parallel, ": ", data_parallel, " does not match the job: ", world, " ranks / ",
         keys.expert_parallel, " ", expert_parallel, " = ", implied, " (leave it out to use that)");
  return dist::ParallelLayout::make(world, static_cast<int>(expert_parallel),
                                    static_cast<int>(num_experts));
}

std::unique_ptr<ParallelContext> start_parallel(const std::string& device, int64_t expert_parallel,
                                                int64_t data_parallel, int64_t num_experts,
                                                const LayoutKeys& keys) {
  const dist::ProcessInfo info = dist::detect_process_info();
  // The layout is checked before joining, so a bad recipe fails fast on every rank.
  resolve_layout(info.world_size, expert_parallel, data_parallel, num_experts, keys);
  if (!info.distributed()) return nullptr;
  const bool cuda = device.rfind("cuda", 0) == 0;
  if (cuda && device != "cuda")
    fail(keys.device, ": ", device, " names one GPU, but this is rank ", info.rank, " of ",
         info.world_size, "; use cuda (each rank takes the GPU of its local rank)");
  if (!cuda && device != "cpu") fail(keys.device, ": expected cpu or cuda, got '", device, "'");

  auto context = std::make_unique<ParallelContext>();
  context->info = info;
  context->rendezvous = dist::rendezvous(info, dist::dist_timeout_seconds());
  dist::Store& store = *context->rendezvous.store;
  std::unique_ptr<dist::Communicator> world;
  if (cuda) {
    world = dist::make_nccl_communicator(info, store);
    context->device = "cuda:" + std::to_string(dist::cuda_device_for(info));
  } else {
    std::vector<int> everyone(static_cast<size_t>(info.world_size));
    std::iota(everyone.begin(), everyone.end(), 0);
    world = std::make_unique<dist::StoreCommunicator>(store, everyone);
    context->device = "cpu";
  }
  context->groups = dist::make_parallel_groups(std::move(world), static_cast<int>(expert_parallel),
                                               static_cast<int>(num_experts));
  return context;
}

void all_reduce_host(dist::Communicator& comm, Backend& backend, std::span<double> values) {
  if (values.empty() || comm.size() == 1) return;
  const Tensor host(values.data(), DType::F64, {static_cast<int64_t>(values.size())});
  if (backend.device() == Device::CPU) {
    comm.all_reduce_sum(host, host, nullptr);
    return;
  }
  Buffer device(DType::F64, host.shape, backend.device());
  backend.copy(device.tensor(), host);
  comm.all_reduce_sum(device.tensor(), device.tensor(), backend.stream());
  backend.copy(host, device.tensor());
  backend.synchronize();
}

}  // namespace moetune
