// Process bootstrap: who am I in a multi-process job? One process per GPU; the rank, the
// world size, the rank on this node and the rendezvous address (MASTER_ADDR:MASTER_PORT,
// where rank 0 serves the store) are read from the environment of whichever launcher
// started us, in this order:
//   1. RANK/WORLD_SIZE (+LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT): torchrun,
//      `moetune launch`, or set by hand;
//   2. Open MPI (mpirun): OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE;
//   3. MPICH/Intel MPI (PMI): PMI_RANK/PMI_SIZE (+MPI_LOCALRANKID/MPI_LOCALNRANKS);
//   4. Slurm (srun): SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, MASTER_ADDR defaulting to the
//      first host of SLURM_JOB_NODELIST and MASTER_PORT to one derived from SLURM_JOB_ID;
//   5. none of these: a single process.
// The environment is passed in as a lookup function so that tests need not touch the real
// one. Every inconsistency is an Error naming the variable.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <string_view>

namespace moetune::dist {

constexpr int kDefaultMasterPort = 29500;

struct ProcessInfo {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;
  std::string master_addr;  // empty for a single process
  int master_port = kDefaultMasterPort;
  std::string source = "single process";  // which launcher's variables were read

  bool distributed() const { return world_size > 1; }
  std::string describe() const;  // "rank 1/4 (local 1/4) via torchrun, store at host:port"
};

// Returns the value of an environment variable, nullopt when unset.
using EnvLookup = std::function<std::optional<std::string>(std::string_view name)>;
EnvLookup process_environment();  // reads the real environment (getenv)

ProcessInfo detect_process_info(const EnvLookup& env);
ProcessInfo detect_process_info();  // from the real environment

// The CUDA device this rank uses: cuda:LOCAL_RANK when this process sees several devices,
// device 0 when it sees one (a launcher that gives each rank its own GPU through
// CUDA_VISIBLE_DEVICES, e.g. srun --gpus-per-task=1). Fails when LOCAL_RANK has no GPU.
int choose_cuda_device(const ProcessInfo& info, int visible_device_count);

// The first host name of a Slurm host list: "node[03-05,9],gpu1" -> "node03".
std::string first_slurm_host(std::string_view node_list);

// Timeout in seconds for every blocking distributed call: MOETUNE_DIST_TIMEOUT_S, else 300.
double dist_timeout_seconds(const EnvLookup& env);
double dist_timeout_seconds();

}  // namespace moetune::dist
