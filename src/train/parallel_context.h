// The multi-process side of `moetune train` and `moetune bench`: when a launcher (torchrun,
// `moetune launch`, mpirun, srun) started several processes, every rank joins the
// rendezvous store, builds the world communicator (NCCL on cuda devices, one GPU per local
// rank; the store communicator on the CPU) and splits it into the expert-parallel groups
// (dist::make_parallel_groups). A single process gets no context at all (nullptr), so the
// one-GPU path is unchanged.
// Also: the layout check (errors name the recipe key or the command-line flag), and a sum
// of host scalars over the ranks (metrics, token counts) for both kinds of communicator.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "dist/bootstrap.h"
#include "dist/communicator.h"
#include "dist/store.h"
#include "ops/backend.h"

namespace moetune {

// Names of the layout settings in error messages: the recipe's keys or bench's flags.
struct LayoutKeys {
  std::string expert_parallel = "parallel.expert_parallel";
  std::string data_parallel = "parallel.data_parallel";
  std::string device = "parallel.device";
};

// world = data_parallel x expert_parallel. expert_parallel must divide the world (and the
// model's experts when num_experts > 0); data_parallel 0 means world / expert_parallel,
// any other value must equal it.
dist::ParallelLayout resolve_layout(int world, int64_t expert_parallel, int64_t data_parallel,
                                    int64_t num_experts, const LayoutKeys& keys = {});

struct ParallelContext {
  dist::ProcessInfo info;
  dist::Rendezvous rendezvous;  // destroyed after the groups (declared first)
  dist::ParallelGroups groups;
  std::string device;  // the backend device of this rank ("cpu", "cuda:LOCAL_RANK")

  int rank() const { return info.rank; }
  int world() const { return info.world_size; }
  const dist::ParallelLayout& layout() const { return groups.layout; }
  // Waits for every rank (the store; no device work is waited for).
  void barrier(const std::string& name) { rendezvous.store->barrier(name); }
};

// nullptr when this process is alone (no launcher, or a world of 1); otherwise the joined
// context. `device` is the requested one: cpu, or cuda (each rank takes its local GPU).
std::unique_ptr<ParallelContext> start_parallel(const std::string& device, int64_t expert_parallel,
                                                int64_t data_parallel, int64_t num_experts,
                                                const LayoutKeys& keys = {});

// values[i] = sum over the communicator's ranks of values[i] (through a device buffer on
// a device backend: NCCL reduces device memory only). Exact for integers below 2^53.
void all_reduce_host(dist::Communicator& comm, Backend& backend, std::span<double> values);

}  // namespace moetune
