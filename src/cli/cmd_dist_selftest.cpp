// `moetune dist-selftest [--expert-parallel N] [--nccl]`: checks a multi-process setup end
// to end: bootstrap from the launcher's environment, the rendezvous store (barrier, values
// from every rank), the CPU store communicator (all_reduce, reduce_scatter, all_gather,
// all_to_all_v, a communicator group of two collectives, EP/DP group splits) and, with
// --nccl in a CUDA build, the same collectives through NCCL on this rank's GPU (device
// tensors, group splits, a 16 MB all_reduce). Every result is checked against its closed
// form. With --expert-parallel N (N > 1) it also runs a tiny random MoE model with its
// experts split over each EP group, every rank on its own micro-batch, against a one-rank
// reference each rank computes locally (check_expert_parallel): on the CPU through the
// store, and with --nccl on this rank's GPU through NCCL. Run it under the same launcher
// as training (srun / mpirun / torchrun --no-python / moetune launch).
//
// Fault injection for the launcher's tests: MOETUNE_SELFTEST_FAIL_RANK=r and
// MOETUNE_SELFTEST_FAIL=exit|kill|hang|no-show|exit-early make rank r exit with status 3,
// die by SIGKILL, hang after joining the store, hang before joining it, or exit with
// status 3 before joining it (the others then wait until the launcher stops them).
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "cli/commands.h"
#include "core/error.h"
#include "dist/bootstrap.h"
#include "dist/communicator.h"
#include "dist/store.h"
#include "io/model_config.h"
#include "model/expert_parallel_check.h"
#include "ops/backend.h"

namespace moetune::cli {

namespace {

void check(bool condition, const std::string& what) {
  if (!condition) fail("dist-selftest: ", what);
}

void maybe_fail(const dist::ProcessInfo& info, const char* stage) {
  const char* rank = std::getenv("MOETUNE_SELFTEST_FAIL_RANK");
  const char* mode = std::getenv("MOETUNE_SELFTEST_FAIL");
  if (!rank || !mode || std::atoi(rank) != info.rank) return;
  const std::string how = mode;
  const bool before_store = how == "no-show" || how == "exit-early";
  if (before_store != (std::strcmp(stage, "before-store") == 0)) return;
  std::fprintf(stderr, "dist-selftest: rank %d fails on purpose (%s)\n", info.rank, mode);
  std::fflush(stderr);
  if (how == "exit" || how == "exit-early") std::_Exit(3);
  if (how == "kill") std::raise(SIGKILL);
  if (how == "hang" || how == "no-show")
    while (true) std::this_thread::sleep_for(std::chrono::seconds(1));
}

// Host vectors staged where the communicator works: on the backend's device (NCCL) or left
// on the host (store communicator, backend == nullptr).
class Staging {
 public:
  explicit Staging(Backend* backend) : backend_(backend) {}
  dist::StreamHandle stream() const { return backend_ ? backend_->stream() : nullptr; }
  Tensor put(std::vector<float>& host, Shape shape) {
    const Tensor host_tensor(host.data(), DType::F32, shape);
    if (!backend_) return host_tensor;
    buffers_.emplace_back(DType::F32, shape, backend_->device());
    backend_->copy(buffers_.back(), host_tensor);
    return buffers_.back().tensor();
  }
  // Copies a staged tensor back into `host` (a no-op on the host).
  void get(std::vector<float>& host, const Tensor& staged) {
    if (!backend_) return;
    backend_->copy(Tensor(host.data(), DType::F32, staged.shape), staged);
    backend_->synchronize();
  }

 private:
  Backend* backend_;
  std::vector<Buffer> buffers_;
};

// Every collective on small float buffers, against closed forms.
void check_collectives(dist::Communicator& comm, const std::string& group,
                       Backend* backend = nullptr) {
  Staging staging(backend);
  const dist::StreamHandle stream = staging.stream();
  const int n = comm.size(), r = comm.rank();
  const std::string where = " (group " + group + ", rank " + std::to_string(r) + ")";
  // all_reduce: element i of rank r is r + i; the sum is n(n-1)/2 + n i.
  std::vector<float> values(5);
  for (int i = 0; i < 5; ++i) values[i] = static_cast<float>(r + i);
  const Tensor tensor = staging.put(values, {5});
  comm.all_reduce_sum(tensor, tensor, stream);
  staging.get(values, tensor);
  for (int i = 0; i < 5; ++i) check(values[i] == n * (n - 1) / 2.0f + n * i, "all_reduce" + where);
  // reduce_scatter of (n, 2): chunk c of rank r holds 10 r + c; the sum over r of chunk r.
  std::vector<float> full(2 * n), mine(2);
  for (int c = 0; c < n; ++c) full[2 * c] = full[2 * c + 1] = static_cast<float>(10 * r + c);
  const Tensor mine_tensor = staging.put(mine, {1, 2});
  comm.reduce_scatter_sum(staging.put(full, {n, 2}), mine_tensor, stream);
  staging.get(mine, mine_tensor);
  check(mine[0] == 10.0f * n * (n - 1) / 2 + n * r && mine[1] == mine[0], "reduce_scatter" + where);
  // all_gather: rank r contributes r.
  std::vector<float> own{static_cast<float>(r)}, gathered(n);
  const Tensor gathered_tensor = staging.put(gathered, {n});
  comm.all_gather(staging.put(own, {1}), gathered_tensor, stream);
  staging.get(gathered, gathered_tensor);
  for (int p = 0; p < n; ++p) check(gathered[p] == p, "all_gather" + where);
  // all_to_all_v: rank r sends (r + p) % 3 rows to peer p, each row (3) = {r, p, row}.
  std::vector<int64_t> send_rows(n), recv_rows(n);
  for (int p = 0; p < n; ++p) send_rows[p] = (r + p) % 3, recv_rows[p] = (p + r) % 3;
  std::vector<float> send, recv(3 * 3 * n);
  for (int p = 0; p < n; ++p)
    for (int row = 0; row < send_rows[p]; ++row)
      send.insert(send.end(), {float(r), float(p), float(row)});
  int64_t send_total = static_cast<int64_t>(send.size()) / 3;
  send.resize(3 * (send_total + 1));  // never empty
  const Tensor recv_tensor = staging.put(recv, {3 * n, 3});
  comm.all_to_all_v(staging.put(send, {send_total + 1, 3}), send_rows, recv_tensor, recv_rows,
                    stream);
  staging.get(recv, recv_tensor);
  size_t position = 0;
  for (int p = 0; p < n; ++p)
    for (int row = 0; row < recv_rows[p]; ++row, position += 3)
      check(recv[position] == p && recv[position + 1] == r && recv[position + 2] == row,
            "all_to_all_v" + where);
  // A batch (communicator group): an all_reduce and an all_gather launched together.
  std::vector<float> summed{float(r), 1.0f}, batch_gathered(n);
  const Tensor summed_tensor = staging.put(summed, {2});
  const Tensor batch_tensor = staging.put(batch_gathered, {n});
  const Tensor own_tensor = staging.put(own, {1});
  dist::CommunicatorGroup batch(comm);
  comm.all_reduce_sum(summed_tensor, summed_tensor, stream);
  comm.all_gather(own_tensor, batch_tensor, stream);
  batch.end();
  staging.get(summed, summed_tensor);
  staging.get(batch_gathered, batch_tensor);
  check(summed[0] == n * (n - 1) / 2.0f && summed[1] == n, "grouped all_reduce" + where);
  for (int p = 0; p < n; ++p) check(batch_gathered[p] == p, "grouped all_gather" + where);
  comm.barrier(stream);
}

// NCCL on this rank's GPU: every collective on device tensors, in the world and in the EP
// and expert-DP groups split from it (ncclCommSplit), plus a large all_reduce.
void check_nccl(const dist::ProcessInfo& info, dist::Store& store, int expert_parallel) {
  auto backend = make_backend("cuda:" + std::to_string(dist::cuda_device_for(info)));
  auto groups =
      dist::make_parallel_groups(dist::make_nccl_communicator(info, store), expert_parallel);
  check_collectives(*groups.world, "nccl world", backend.get());
  check_collectives(*groups.expert, "nccl expert", backend.get());
  check_collectives(*groups.expert_dp, "nccl expert_dp", backend.get());
  dist::Communicator& comm = *groups.world;
  const int n = comm.size(), r = comm.rank();
  constexpr int kCount = 1 << 22;  // 16 MB: the ring/tree path, not only the small-message one
  std::vector<float> host(kCount);
  for (int i = 0; i < kCount; ++i) host[i] = static_cast<float>(r + i % 7);
  Buffer values(DType::F32, {kCount}, Device::CUDA);
  backend->copy(values, Tensor(host.data(), DType::F32, {kCount}));
  comm.all_reduce_sum(values, values, backend->stream());
  backend->copy(Tensor(host.data(), DType::F32, {kCount}), values);
  backend->synchronize();
  for (int i = 0; i < kCount; ++i)
    check(host[i] == n * (n - 1) / 2.0f + n * (i % 7), "NCCL all_reduce gave a wrong sum");
}

// A tiny random Qwen3-MoE (4 experts per EP rank, top-2, aux loss, one dense layer) run
// expert-parallel over `expert`, against one rank with accumulation. Prints the errors.
void check_expert_parallel_model(Backend& backend, dist::Communicator& expert, int global_rank,
                                 double tolerance) {
  const int ep = expert.size();
  const nlohmann::json json = {{"model_type", "qwen3_moe"},
                               {"vocab_size", 128},
                               {"hidden_size", 64},
                               {"intermediate_size", 96},
                               {"moe_intermediate_size", 32},
                               {"num_hidden_layers", 3},
                               {"num_attention_heads", 4},
                               {"num_key_value_heads", 2},
                               {"head_dim", 16},
                               {"num_experts", 4 * ep},
                               {"num_experts_per_tok", 2},
                               {"norm_topk_prob", true},
                               {"mlp_only_layers", {1}},
                               {"output_router_logits", true},
                               {"router_aux_loss_coef", 0.01},
                               {"rope_theta", 10000.0},
                               {"initializer_range", 0.1}};
  const ModelConfig config = parse_model_config(json, "dist-selftest");
  auto make = [&](const ModelOptions& options) {
    return Model::random_init(config, 2024, backend, options);
  };
  const ExpertParallelCheck result = check_expert_parallel(backend, expert, make, 2, 32, 99);
  std::printf(
      "dist-selftest: rank %d: expert parallel ep=%d on %s: relative errors loss %.2e, aux %.2e, "
      "expert grads %.2e, other grads %.2e (worst %s): %s\n",
      global_rank, ep, backend.name().c_str(), result.loss_error, result.aux_error,
      result.expert_grad_error, result.other_grad_error, result.worst_tensor.c_str(),
      result.max_error() <= tolerance ? "PASS" : "FAIL");
  std::fflush(stdout);
  check(result.max_error() <= tolerance,
        "expert parallel forward/backward differs from one rank by " +
            std::to_string(result.max_error()) + " (tolerance " + std::to_string(tolerance) +
            ") on " + backend.name());
}

}  // namespace

int run_dist_selftest(int argc, char** argv) {
  int expert_parallel = 1;
  bool nccl = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--nccl") {
      nccl = true;
    } else if (arg == "--expert-parallel" && i + 1 < argc) {
      expert_parallel = std::atoi(argv[++i]);
    } else if (arg == "-h" || arg == "--help") {
      std::printf(
          "usage: moetune dist-selftest [--expert-parallel N] [--nccl]\n"
          "Checks bootstrap, the rendezvous store and the collectives across ranks;\n"
          "with --expert-parallel N > 1 also an expert-parallel forward/backward of a tiny\n"
          "MoE model against one rank (CPU, and with --nccl on the GPUs).\n");
      return 0;
    } else {
      fail("unknown argument '", arg, "' (moetune dist-selftest --help)");
    }
  }
  const dist::ProcessInfo info = dist::detect_process_info();
  const double timeout_s = dist::dist_timeout_seconds();
  maybe_fail(info, "before-store");
  dist::Rendezvous rendezvous = dist::rendezvous(info, timeout_s);
  dist::Store& store = *rendezvous.store;
  maybe_fail(info, "after-store");
  store.barrier("selftest-start");

  // Every rank publishes r*r + 1 and reads everyone's.
  store.set("selftest/value/" + std::to_string(info.rank),
            std::to_string(info.rank * info.rank + 1));
  long sum = 0, expected = 0;
  for (int rank = 0; rank < info.world_size; ++rank) {
    sum += std::stol(store.get("selftest/value/" + std::to_string(rank)));
    expected += rank * rank + 1;
  }
  check(sum == expected, "values exchanged through the store do not add up");

  std::vector<int> everyone(info.world_size);
  for (int rank = 0; rank < info.world_size; ++rank) everyone[rank] = rank;
  auto groups = dist::make_parallel_groups(
      std::make_unique<dist::StoreCommunicator>(store, everyone), expert_parallel);
  check_collectives(*groups.world, "world");
  check_collectives(*groups.expert, "expert");
  check_collectives(*groups.expert_dp, "expert_dp");
  check(groups.expert->size() == expert_parallel &&
            groups.expert->rank() == groups.layout.ep_rank(info.rank) &&
            groups.expert_dp->rank() == groups.layout.dp_rank(info.rank),
        "group sizes or ranks differ from the layout");

  if (expert_parallel > 1) {
    auto cpu = make_cpu_backend();
    check_expert_parallel_model(*cpu, *groups.expert, info.rank, 1e-5);
  }
  if (nccl) {
    check_nccl(info, store, expert_parallel);
    if (expert_parallel > 1) {
      auto backend = make_backend("cuda:" + std::to_string(dist::cuda_device_for(info)));
      auto nccl_groups =
          dist::make_parallel_groups(dist::make_nccl_communicator(info, store), expert_parallel);
      check_expert_parallel_model(*backend, *nccl_groups.expert, info.rank, 1e-4);
    }
  }
  store.barrier("selftest-end");
  std::printf("dist-selftest: %s: ok (store, collectives, ep=%d%s)\n", info.describe().c_str(),
              expert_parallel, nccl ? ", nccl" : "");
  std::fflush(stdout);
  return 0;
}

}  // namespace moetune::cli
