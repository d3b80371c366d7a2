// Collective communication between the ranks of a group, and the layout of the groups.
//
// Communicator is the interface the trainer and the MoE layer use (never NCCL directly):
// - all_reduce (sum): gradients of replicated parameters;
// - reduce_scatter / all_gather: sharded data parallel (each rank keeps 1/size of the
//   gradients and optimizer state; weights are gathered back before use);
// - all_to_all_v: expert-parallel dispatch and combine, rows of a (tokens, hidden) buffer
//   sent to the rank holding their expert, with per-peer row counts known on the host
//   (from the ranks' expert offsets, all-gathered first);
// - group_start / group_end: a batch of collectives launched together (NCCL groups).
// Every call takes the stream to run on (a cudaStream_t as void*; nullptr = the default
// stream; ignored on the CPU) so that gradient reduce-scatters can run on a communication
// stream beside the backward. Calls are asynchronous on that stream for NCCL and
// synchronous for the CPU implementations.
//
// Implementations:
// - LocalCommunicator: one rank (size 1): collectives are copies. What a CPU or one-GPU
//   run uses, so trainer code has no special case for a single process.
// - StoreCommunicator: CPU tensors between processes through the rendezvous store. Slow
//   (every byte goes through rank 0's store), but exact and deterministic (sums in rank
//   order), so CPU tests can check that DP=2 or EP=2 reproduce one process.
// - NCCL (make_nccl_communicator): CUDA builds only; NCCL_NVLS_ENABLE=0 unless set.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "dist/bootstrap.h"

namespace moetune::dist {

class Store;

using StreamHandle = void*;  // cudaStream_t; nullptr = default stream

// Rows [offset, offset + rows) of a tensor (along its first dimension).
struct RowBlock {
  int64_t offset = 0;
  int64_t rows = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;

  // out = sum over ranks of in. Same shape and dtype; out may be in (in place).
  virtual void all_reduce_sum(const Tensor& in, const Tensor& out, StreamHandle stream) = 0;
  // in (size * n elements) summed over ranks; this rank receives chunk `rank`: out (n).
  // Rows of a tensor are chunked along the first dimension when it divides.
  virtual void reduce_scatter_sum(const Tensor& in, const Tensor& out, StreamHandle stream) = 0;
  // out (size * n) = concatenation of every rank's in (n), in rank order.
  virtual void all_gather(const Tensor& in, const Tensor& out, StreamHandle stream) = 0;
  // Rows of `send` (rows, ...) go to peers in rank order: send_rows[p] rows to peer p;
  // `recv` receives recv_rows[p] rows from each peer p, in rank order. Row size (elements
  // per row = numel / shape[0]) and dtype must match between send and recv. Counts are on
  // the host and must agree pairwise across ranks (send_rows[p] on r == recv_rows[r] on p).
  virtual void all_to_all_v(const Tensor& send, std::span<const int64_t> send_rows,
                            const Tensor& recv, std::span<const int64_t> recv_rows,
                            StreamHandle stream) = 0;
  // As all_to_all_v, with each peer's rows anywhere in the tensors: rows
  // [send_blocks[p].offset, + rows) of `send` go to peer p, peer p's rows land at
  // recv_blocks[p] of `recv` (blocks of recv must not overlap). Counts agree pairwise as
  // for all_to_all_v. The expert-parallel dispatch sends a chunk of its experts' rows at a
  // time this way.
  virtual void all_to_all_v_blocks(const Tensor& send, std::span<const RowBlock> send_blocks,
                                   const Tensor& recv, std::span<const RowBlock> recv_blocks,
                                   StreamHandle stream) = 0;
  // Collectives issued between group_start() and group_end() on this communicator may be
  // launched together at group_end() (NCCL: ncclGroupStart/End, one fused launch instead
  // of one per call). Inside a group, nothing may depend on a collective's result and no
  // buffer a grouped collective reads may be rewritten before group_end(); groups nest.
  // A no-op for the CPU implementations (their calls complete one by one).
  virtual void group_start() {}
  virtual void group_end() {}
  // Returns when every rank of the group has reached it (and, for NCCL, the stream's work
  // before it is done).
  virtual void barrier(StreamHandle stream) = 0;
  // A sub-group of the ranks that pass the same color, ordered by key (ncclCommSplit's
  // rule). Every rank of this group must call it, in the same order.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;
};

// group_start() now, group_end() at end() or, if end() was not reached (an exception),
// at destruction (errors then ignored: the exception in flight is the one to report).
class CommunicatorGroup {
 public:
  explicit CommunicatorGroup(Communicator& comm) : comm_(&comm) { comm.group_start(); }
  ~CommunicatorGroup();
  CommunicatorGroup(const CommunicatorGroup&) = delete;
  CommunicatorGroup& operator=(const CommunicatorGroup&) = delete;
  void end();

 private:
  Communicator* comm_;  // null once ended
};

// Checks shared by the implementations (shapes, dtypes, counts); fail with clear messages.
void check_all_reduce(const Communicator& comm, const Tensor& in, const Tensor& out);
void check_reduce_scatter(const Communicator& comm, const Tensor& in, const Tensor& out);
void check_all_gather(const Communicator& comm, const Tensor& in, const Tensor& out);
// Returns the elements per row.
int64_t check_all_to_all_v_blocks(const Communicator& comm, const Tensor& send,
                                  std::span<const RowBlock> send_blocks, const Tensor& recv,
                                  std::span<const RowBlock> recv_blocks);
// Returns the elements per row.
int64_t check_all_to_all_v(const Communicator& comm, const Tensor& send,
                           std::span<const int64_t> send_rows, const Tensor& recv,
                           std::span<const int64_t> recv_rows);

// Size 1. Host tensors are copied with memcpy; device tensors need a copy function (the
// backend's), given at construction.
class LocalCommunicator : public Communicator {
 public:
  using DeviceCopy = void (*)(void* context, const Tensor& dst, const Tensor& src);
  LocalCommunicator() = default;
  LocalCommunicator(DeviceCopy device_copy, void* context)
      : device_copy_(device_copy), context_(context) {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string name() const override { return "local"; }
  void all_reduce_sum(const Tensor& in, const Tensor& out, StreamHandle stream) override;
  void reduce_scatter_sum(const Tensor& in, const Tensor& out, StreamHandle stream) override;
  void all_gather(const Tensor& in, const Tensor& out, StreamHandle stream) override;
  void all_to_all_v(const Tensor& send, std::span<const int64_t> send_rows, const Tensor& recv,
                    std::span<const int64_t> recv_rows, StreamHandle stream) override;
  void all_to_all_v_blocks(const Tensor& send, std::span<const RowBlock> send_blocks,
                           const Tensor& recv, std::span<const RowBlock> recv_blocks,
                           StreamHandle stream) override;
  void barrier(StreamHandle) override {}
  std::unique_ptr<Communicator> split(int, int) override;

 private:
  void copy(const Tensor& dst, const Tensor& src);
  DeviceCopy device_copy_ = nullptr;
  void* context_ = nullptr;
};

// CPU tensors (F32, F64, I32, I64 for sums; any dtype to move) between processes through
// the store. `members` are the global ranks of this group, this rank among them.
class StoreCommunicator : public Communicator {
 public:
  StoreCommunicator(Store& store, std::vector<int> members, std::string group_name = "world");
  int rank() const override { return rank_; }
  int size() const override { return static_cast<int>(members_.size()); }
  std::string name() const override { return "store:" + group_name_; }
  void all_reduce_sum(const Tensor& in, const Tensor& out, StreamHandle stream) override;
  void reduce_scatter_sum(const Tensor& in, const Tensor& out, StreamHandle stream) override;
  void all_gather(const Tensor& in, const Tensor& out, StreamHandle stream) override;
  void all_to_all_v(const Tensor& send, std::span<const int64_t> send_rows, const Tensor& recv,
                    std::span<const int64_t> recv_rows, StreamHandle stream) override;
  void all_to_all_v_blocks(const Tensor& send, std::span<const RowBlock> send_blocks,
                           const Tensor& recv, std::span<const RowBlock> recv_blocks,
                           StreamHandle stream) override;
  void barrier(StreamHandle stream) override;
  std::unique_ptr<Communicator> split(int color, int key) override;

 private:
  // Posts this rank's blob for peer `to` (-1 = everyone) of collective `sequence_` and
  // reads the blobs the others posted; blobs of the previous collective are erased (every
  // peer has read them once it posted this one).
  std::vector<std::string> exchange(const std::vector<std::string>& outgoing, bool per_peer);
  std::string previous_key(int64_t sequence, int to) const;

  Store& store_;
  std::vector<int> members_;  // global ranks
  std::string group_name_;
  int rank_ = 0;  // index of this process in members_
  int64_t sequence_ = 0;
  int64_t splits_ = 0;
  bool per_peer_previous_ = false;  // how the previous collective's blobs were keyed
};

// The NCCL communicator of all ranks, its unique id exchanged through the store. Sets the
// CUDA device to choose_cuda_device(info, ...) first. Fails in builds without CUDA.
std::unique_ptr<Communicator> make_nccl_communicator(const ProcessInfo& info, Store& store);
bool nccl_available();  // true when this build has NCCL
// The CUDA device index of this rank (choose_cuda_device over the visible devices).
int cuda_device_for(const ProcessInfo& info);

// How the ranks are split for a MoE model (world = data_parallel * expert_parallel):
// - expert parallel groups are blocks of consecutive ranks (within a node when ep fits
//   one, so the all-to-all stays on NVLink): group g = ranks [g*ep, (g+1)*ep);
// - each EP group holds all experts, expert e on EP rank e / (experts / ep);
// - expert parameters are reduced over the replicas of the same expert shard: the ranks
//   with the same EP rank (expert data-parallel group, size data_parallel);
// - all other parameters are replicated on every rank and reduced over all of them.
struct ParallelLayout {
  int world = 1;
  int data_parallel = 1;    // replicas of each expert shard
  int expert_parallel = 1;  // ranks an expert set is split over

  // Validates (ep divides world; if num_experts > 0, ep divides it too).
  static ParallelLayout make(int world, int expert_parallel, int num_experts = 0);

  int ep_rank(int rank) const { return rank % expert_parallel; }
  int ep_group(int rank) const { return rank / expert_parallel; }  // which EP group
  int dp_rank(int rank) const { return rank / expert_parallel; }   // index among replicas
  std::vector<int> ep_group_ranks(int rank) const;                 // size expert_parallel
  std::vector<int> expert_dp_group_ranks(int rank) const;          // size data_parallel
  // Experts [first, first + count) held by `rank`.
  std::pair<int, int> local_experts(int rank, int num_experts) const;

  // split() arguments: color and key for this rank's EP group and expert-DP group.
  int ep_color(int rank) const { return ep_group(rank); }
  int ep_key(int rank) const { return ep_rank(rank); }
  int expert_dp_color(int rank) const { return ep_rank(rank); }
  int expert_dp_key(int rank) const { return dp_rank(rank); }
};

// The three communicators of a layout, split from the world communicator.
struct ParallelGroups {
  ParallelLayout layout;
  std::unique_ptr<Communicator> world;      // non-expert gradients (all ranks)
  std::unique_ptr<Communicator> expert;     // EP dispatch/combine (size expert_parallel)
  std::unique_ptr<Communicator> expert_dp;  // expert gradients (size data_parallel)
};
ParallelGroups make_parallel_groups(std::unique_ptr<Communicator> world, int expert_parallel,
                                    int num_experts = 0);

}  // namespace moetune::dist
