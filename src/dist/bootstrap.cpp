// Process bootstrap from launcher environments (see bootstrap.h for the order). Integers
// are parsed strictly (digits only, no sign, no spaces) so that "RANK=1 " or "RANK=0x1"
// fail with the variable's name rather than being half-read.
#include "dist/bootstrap.h"

#include <algorithm>
#include <charconv>
#include <cstdlib>
#include <vector>

#include "core/error.h"

namespace moetune::dist {

namespace {

// A non-negative decimal integer that fits an int, or an Error naming the variable.
int parse_count(std::string_view name, const std::string& text) {
  int value = 0;
  const char* begin = text.data();
  const char* end = text.data() + text.size();
  auto [stop, error] = std::from_chars(begin, end, value);
  if (text.empty() || text[0] == '-' || text[0] == '+' || error != std::errc() || stop != end)
    fail("environment variable ", name, "='", text, "' is not a non-negative integer");
  return value;
}

std::optional<int> read_count(const EnvLookup& env, std::string_view name) {
  auto text = env(name);
  if (!text) return std::nullopt;
  return parse_count(name, *text);
}

int require_count(const EnvLookup& env, std::string_view name, std::string_view launcher) {
  auto value = read_count(env, name);
  if (!value) fail("environment variable ", name, " is not set (", launcher, " sets it)");
  return *value;
}

// The names of the variables one launcher sets; `local_*` may be empty.
struct Variables {
  const char* rank;
  const char* size;
  const char* local_rank;
  const char* local_size;
};

void validate(const ProcessInfo& info, const Variables& names) {
  if (info.world_size < 1) fail("environment variable ", names.size, "=0: the world has no ranks");
  if (info.rank >= info.world_size)
    fail("environment variable ", names.rank, "=", info.rank, " is not below ", names.size, "=",
         info.world_size, " (ranks are 0 .. world size - 1)");
  if (info.local_world_size < 1)
    fail("environment variable ", names.local_size, "=0: a node has no ranks");
  if (info.local_rank >= info.local_world_size)
    fail("environment variable ", names.local_rank, "=", info.local_rank, " is not below ",
         names.local_size, "=", info.local_world_size);
  if (info.local_world_size > info.world_size)
    fail("environment variable ", names.local_size, "=", info.local_world_size, " is larger than ",
         names.size, "=", info.world_size);
  if (info.world_size > 1 && info.master_addr.empty())
    fail("environment variable MASTER_ADDR is not set but ", names.size, "=", info.world_size, " (",
         info.source, "): set MASTER_ADDR to the host of rank 0 (and MASTER_PORT, default ",
         kDefaultMasterPort, ")");
  if (info.master_port < 1 || info.master_port > 65535)
    fail("environment variable MASTER_PORT=", info.master_port, " is not a TCP port (1..65535)");
}

// MASTER_ADDR / MASTER_PORT as set explicitly (all launchers honour them).
void read_master(const EnvLookup& env, ProcessInfo& info) {
  if (auto addr = env("MASTER_ADDR")) info.master_addr = *addr;
  if (auto port = read_count(env, "MASTER_PORT")) info.master_port = *port;
}

ProcessInfo from_rank_variables(const EnvLookup& env) {
  ProcessInfo info;
  if (env("MOETUNE_LAUNCH"))
    info.source = "moetune launch";
  else if (env("TORCHELASTIC_RUN_ID"))
    info.source = "torchrun";
  else
    info.source = "RANK/WORLD_SIZE environment";
  if (!env("WORLD_SIZE")) fail("environment variable RANK is set but WORLD_SIZE is not");
  info.rank = require_count(env, "RANK", info.source);
  info.world_size = require_count(env, "WORLD_SIZE", info.source);
  auto local_rank = read_count(env, "LOCAL_RANK");
  if (!local_rank && info.world_size > 1)
    fail("environment variable LOCAL_RANK is not set (RANK=", info.rank,
         ", WORLD_SIZE=", info.world_size, "): it picks this rank's GPU");
  info.local_rank = local_rank.value_or(0);
  // Without LOCAL_WORLD_SIZE, assume one node (it only informs, e.g. log lines).
  info.local_world_size = read_count(env, "LOCAL_WORLD_SIZE").value_or(info.world_size);
  read_master(env, info);
  validate(info, {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"});
  return info;
}

ProcessInfo from_open_mpi(const EnvLookup& env) {
  ProcessInfo info;
  info.source = "Open MPI (mpirun)";
  info.rank = require_count(env, "OMPI_COMM_WORLD_RANK", info.source);
  info.world_size = require_count(env, "OMPI_COMM_WORLD_SIZE", info.source);
  info.local_rank = require_count(env, "OMPI_COMM_WORLD_LOCAL_RANK", info.source);
  info.local_world_size = read_count(env, "OMPI_COMM_WORLD_LOCAL_SIZE").value_or(info.world_size);
  read_master(env, info);
  validate(info, {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                  "OMPI_COMM_WORLD_LOCAL_SIZE"});
  return info;
}

ProcessInfo from_pmi(const EnvLookup& env) {
  ProcessInfo info;
  info.source = "PMI (MPICH/Intel MPI)";
  info.rank = require_count(env, "PMI_RANK", info.source);
  info.world_size = require_count(env, "PMI_SIZE", info.source);
  const char* local_rank_name = env("MPI_LOCALRANKID") ? "MPI_LOCALRANKID" : "PMI_LOCAL_RANK";
  const char* local_size_name = env("MPI_LOCALNRANKS") ? "MPI_LOCALNRANKS" : "PMI_LOCAL_SIZE";
  auto local_rank = read_count(env, local_rank_name);
  if (!local_rank && info.world_size > 1)
    fail(
        "PMI_RANK/PMI_SIZE are set but neither MPI_LOCALRANKID nor PMI_LOCAL_RANK: the rank on "
        "this node picks the GPU");
  info.local_rank = local_rank.value_or(0);
  info.local_world_size = read_count(env, local_size_name).value_or(info.world_size);
  read_master(env, info);
  validate(info, {"PMI_RANK", "PMI_SIZE", local_rank_name, local_size_name});
  return info;
}

// The largest task count in a Slurm tasks-per-node list ("4(x2),3" -> 4).
std::optional<int> max_tasks_per_node(std::string_view list) {
  std::optional<int> best;
  size_t position = 0;
  while (position < list.size()) {
    size_t digits = position;
    while (digits < list.size() && list[digits] >= '0' && list[digits] <= '9') ++digits;
    if (digits > position) {
      int value = 0;
      std::from_chars(list.data() + position, list.data() + digits, value);
      best = std::max(best.value_or(0), value);
    }
    size_t comma = list.find(',', digits);
    if (comma == std::string_view::npos) break;
    position = comma + 1;
  }
  return best;
}

ProcessInfo from_slurm(const EnvLookup& env) {
  ProcessInfo info;
  info.source = "Slurm (srun)";
  // srun sets SLURM_STEP_NUM_TASKS for its step; SLURM_NTASKS is the job's.
  const char* size_name = env("SLURM_STEP_NUM_TASKS") ? "SLURM_STEP_NUM_TASKS" : "SLURM_NTASKS";
  info.rank = require_count(env, "SLURM_PROCID", info.source);
  info.world_size = require_count(env, size_name, info.source);
  info.local_rank = require_count(env, "SLURM_LOCALID", info.source);
  std::optional<int> per_node = read_count(env, "SLURM_NTASKS_PER_NODE");
  for (const char* name : {"SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"}) {
    if (per_node) break;
    if (auto list = env(name)) per_node = max_tasks_per_node(*list);
  }
  info.local_world_size = per_node.value_or(info.world_size);
  read_master(env, info);
  if (info.master_addr.empty()) {
    for (const char* name : {"SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_STEP_NODELIST"}) {
      if (auto list = env(name)) {
        info.master_addr = first_slurm_host(*list);
        break;
      }
    }
  }
  // One port per job, so that two jobs sharing a node do not collide on 29500.
  if (!env("MASTER_PORT")) {
    if (auto job = read_count(env, "SLURM_JOB_ID")) info.master_port = 20000 + *job % 20000;
  }
  validate(info, {"SLURM_PROCID", size_name, "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"});
  return info;
}

}  // namespace

std::string ProcessInfo::describe() const {
  std::string text = "rank " + std::to_string(rank) + "/" + std::to_string(world_size) +
                     " (local " + std::to_string(local_rank) + "/" +
                     std::to_string(local_world_size) + ") via " + source;
  if (world_size > 1) text += ", store at " + master_addr + ":" + std::to_string(master_port);
  return text;
}

EnvLookup process_environment() {
  return [](std::string_view name) -> std::optional<std::string> {
    const char* value = std::getenv(std::string(name).c_str());
    if (value == nullptr) return std::nullopt;
    return std::string(value);
  };
}

ProcessInfo detect_process_info(const EnvLookup& env) {
  if (env("RANK")) return from_rank_variables(env);
  if (env("WORLD_SIZE") && read_count(env, "WORLD_SIZE").value_or(1) > 1)
    fail("environment variable WORLD_SIZE is set but RANK is not");
  if (env("OMPI_COMM_WORLD_RANK")) return from_open_mpi(env);
  if (env("PMI_RANK")) return from_pmi(env);
  if (env("SLURM_PROCID") && (env("SLURM_STEP_NUM_TASKS") || env("SLURM_NTASKS")))
    return from_slurm(env);
  ProcessInfo info;
  read_master(env, info);
  return info;
}

ProcessInfo detect_process_info() { return detect_process_info(process_environment()); }

int choose_cuda_device(const ProcessInfo& info, int visible_device_count) {
  if (visible_device_count < 1) fail("rank ", info.rank, " sees no CUDA device");
  if (visible_device_count == 1) return 0;
  if (info.local_rank >= visible_device_count)
    fail("rank ", info.rank, " has LOCAL_RANK ", info.local_rank, " but sees only ",
         visible_device_count, " CUDA devices: start at most one process per GPU on a node");
  return info.local_rank;
}

std::string first_slurm_host(std::string_view node_list) {
  // The first top-level entry (commas inside brackets separate ranges, not hosts).
  int depth = 0;
  size_t end = 0;
  for (; end < node_list.size(); ++end) {
    if (node_list[end] == '[') ++depth;
    if (node_list[end] == ']') --depth;
    if (node_list[end] == ',' && depth == 0) break;
  }
  std::string_view entry = node_list.substr(0, end);
  // Each bracket group contributes its first value: "[03-05,9]" -> "03".
  std::string host;
  for (size_t i = 0; i < entry.size(); ++i) {
    if (entry[i] != '[') {
      host += entry[i];
      continue;
    }
    size_t close = entry.find(']', i);
    if (close == std::string_view::npos) fail("malformed Slurm node list '", node_list, "'");
    std::string_view ranges = entry.substr(i + 1, close - i - 1);
    host += ranges.substr(0, ranges.find_first_of(",-"));
    i = close;
  }
  if (host.empty()) fail("empty Slurm node list '", node_list, "'");
  return host;
}

double dist_timeout_seconds(const EnvLookup& env) {
  auto text = env("MOETUNE_DIST_TIMEOUT_S");
  if (!text) return 300.0;
  char* stop = nullptr;
  double seconds = std::strtod(text->c_str(), &stop);
  if (text->empty() || stop != text->c_str() + text->size() || !(seconds > 0) || seconds > 1e7)
    fail("environment variable MOETUNE_DIST_TIMEOUT_S='", *text,
         "' is not a positive number of seconds");
  return seconds;
}

double dist_timeout_seconds() { return dist_timeout_seconds(process_environment()); }

}  // namespace moetune::dist
