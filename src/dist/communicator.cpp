// The communicators that need no GPU (LocalCommunicator, StoreCommunicator), the argument
// checks every implementation shares, and the expert/data parallel layout.
// StoreCommunicator moves raw tensor bytes as store values: each collective posts this
// rank's blob(s) under "comm/<group>/<sequence>/<from>[/<to>]" and reads the peers'; the
// sums run in rank order on every rank, so all ranks get bit-identical results.
#include "dist/communicator.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <tuple>

#include "core/error.h"
#include "dist/store.h"

namespace moetune::dist {

// ---- checks ----------------------------------------------------------------------------------

namespace {

void check_same_kind(const char* op, const Tensor& a, const Tensor& b) {
  if (a.dtype != b.dtype)
    fail(op, ": dtypes differ (", dtype_name(a.dtype), " vs ", dtype_name(b.dtype), ")");
  if (a.device != b.device) fail(op, ": tensors are on different devices");
}

int64_t elements_per_row(const Tensor& tensor) {
  if (tensor.rank() == 0) return 1;
  return tensor.size(0) == 0 ? 0 : tensor.numel() / tensor.size(0);
}

}  // namespace

void check_all_reduce(const Communicator& comm, const Tensor& in, const Tensor& out) {
  check_same_kind("all_reduce", in, out);
  if (in.numel() != out.numel())
    fail("all_reduce: in ", in.shape.str(), " and out ", out.shape.str(), " differ in size");
}

void check_reduce_scatter(const Communicator& comm, const Tensor& in, const Tensor& out) {
  check_same_kind("reduce_scatter", in, out);
  if (in.numel() != out.numel() * comm.size())
    fail("reduce_scatter: in ", in.shape.str(), " must hold ", comm.size(), " x out ",
         out.shape.str());
}

void check_all_gather(const Communicator& comm, const Tensor& in, const Tensor& out) {
  check_same_kind("all_gather", in, out);
  if (out.numel() != in.numel() * comm.size())
    fail("all_gather: out ", out.shape.str(), " must hold ", comm.size(), " x in ", in.shape.str());
}

int64_t check_all_to_all_v(const Communicator& comm, const Tensor& send,
                           std::span<const int64_t> send_rows, const Tensor& recv,
                           std::span<const int64_t> recv_rows) {
  check_same_kind("all_to_all_v", send, recv);
  const size_t peers = static_cast<size_t>(comm.size());
  if (send_rows.size() != peers || recv_rows.size() != peers)
    fail("all_to_all_v: ", send_rows.size(), " send and ", recv_rows.size(),
         " receive counts for a group of ", peers);
  auto total = [](std::span<const int64_t> rows) {
    int64_t sum = 0;
    for (int64_t count : rows) {
      if (count < 0) fail("all_to_all_v: negative row count ", count);
      sum += count;
    }
    return sum;
  };
  const int64_t send_total = total(send_rows), recv_total = total(recv_rows);
  if (send.rank() == 0 || recv.rank() == 0) fail("all_to_all_v: tensors need a row dimension");
  if (send_total > send.size(0) || recv_total > recv.size(0))
    fail("all_to_all_v: counts ask for ", send_total, " rows to send from ", send.shape.str(),
         " and ", recv_total, " to receive into ", recv.shape.str());
  int64_t row = elements_per_row(send.size(0) ? send : recv);
  if (send.size(0) && recv.size(0) && elements_per_row(recv) != row)
    fail("all_to_all_v: rows of send ", send.shape.str(), " and recv ", recv.shape.str(),
         " differ in size");
  return row;
}

int64_t check_all_to_all_v_blocks(const Communicator& comm, const Tensor& send,
                                  std::span<const RowBlock> send_blocks, const Tensor& recv,
                                  std::span<const RowBlock> recv_blocks) {
  check_same_kind("all_to_all_v_blocks", send, recv);
  const size_t peers = static_cast<size_t>(comm.size());
  if (send_blocks.size() != peers || recv_blocks.size() != peers)
    fail("all_to_all_v_blocks: ", send_blocks.size(), " send and ", recv_blocks.size(),
         " receive blocks for a group of ", peers);
  if (send.rank() == 0 || recv.rank() == 0)
    fail("all_to_all_v_blocks: tensors need a row dimension");
  auto check = [](std::span<const RowBlock> blocks, const Tensor& tensor, const char* what) {
    for (const RowBlock& block : blocks)
      if (block.offset < 0 || block.rows < 0 || block.offset + block.rows > tensor.size(0))
        fail("all_to_all_v_blocks: ", what, " block [", block.offset, ", +", block.rows,
             ") is outside ", tensor.shape.str());
  };
  check(send_blocks, send, "send");
  check(recv_blocks, recv, "receive");
  const int64_t row = elements_per_row(send.size(0) ? send : recv);
  if (send.size(0) && recv.size(0) && elements_per_row(recv) != row)
    fail("all_to_all_v_blocks: rows of send ", send.shape.str(), " and recv ", recv.shape.str(),
         " differ in size");
  return row;
}

// ---- CommunicatorGroup -------------------------------------------------------------------

void CommunicatorGroup::end() {
  if (comm_ == nullptr) return;
  Communicator* comm = comm_;
  comm_ = nullptr;
  comm->group_end();
}

CommunicatorGroup::~CommunicatorGroup() {
  try {
    end();
  } catch (...) {  // an exception is already in flight (end() was skipped)
  }
}

// ---- LocalCommunicator -------------------------------------------------------------------

void LocalCommunicator::copy(const Tensor& dst, const Tensor& src) {
  if (dst.data == src.data || src.bytes() == 0) return;
  if (dst.device == Device::CPU && src.device == Device::CPU) {
    std::memmove(dst.data, src.data, src.bytes());
    return;
  }
  if (device_copy_ == nullptr)
    fail("LocalCommunicator: device tensors need the backend's copy (none was given)");
  device_copy_(context_, dst, src);
}

void LocalCommunicator::all_reduce_sum(const Tensor& in, const Tensor& out, StreamHandle) {
  check_all_reduce(*this, in, out);
  copy(out, in);
}

void LocalCommunicator::reduce_scatter_sum(const Tensor& in, const Tensor& out, StreamHandle) {
  check_reduce_scatter(*this, in, out);
  copy(out, in);
}

void LocalCommunicator::all_gather(const Tensor& in, const Tensor& out, StreamHandle) {
  check_all_gather(*this, in, out);
  copy(out, in);
}

void LocalCommunicator::all_to_all_v(const Tensor& send, std::span<const int64_t> send_rows,
                                     const Tensor& recv, std::span<const int64_t> recv_rows,
                                     StreamHandle) {
  const int64_t row = check_all_to_all_v(*this, send, send_rows, recv, recv_rows);
  if (send_rows[0] != recv_rows[0])
    fail("all_to_all_v: a single rank sends ", send_rows[0], " rows to itself but receives ",
         recv_rows[0]);
  const Tensor from = send.view({send.size(0) * row}).slice_rows(0, send_rows[0] * row);
  const Tensor to = recv.view({recv.size(0) * row}).slice_rows(0, recv_rows[0] * row);
  copy(to, from);
}

void LocalCommunicator::all_to_all_v_blocks(const Tensor& send,
                                            std::span<const RowBlock> send_blocks,
                                            const Tensor& recv,
                                            std::span<const RowBlock> recv_blocks, StreamHandle) {
  const int64_t row = check_all_to_all_v_blocks(*this, send, send_blocks, recv, recv_blocks);
  if (send_blocks[0].rows != recv_blocks[0].rows)
    fail("all_to_all_v_blocks: a single rank sends ", send_blocks[0].rows,
         " rows to itself but receives ", recv_blocks[0].rows);
  const Tensor from = send.view({send.size(0) * row})
                          .slice_rows(send_blocks[0].offset * row,
                                      (send_blocks[0].offset + send_blocks[0].rows) * row);
  const Tensor to = recv.view({recv.size(0) * row})
                        .slice_rows(recv_blocks[0].offset * row,
                                    (recv_blocks[0].offset + recv_blocks[0].rows) * row);
  copy(to, from);
}

std::unique_ptr<Communicator> LocalCommunicator::split(int, int) {
  return std::make_unique<LocalCommunicator>(device_copy_, context_);
}

// ---- StoreCommunicator -------------------------------------------------------------------

namespace {

void require_host(const char* op, const Tensor& tensor) {
  if (tensor.device != Device::CPU)
    fail(op, ": the store communicator moves host tensors only (use NCCL for device tensors)");
}

std::string bytes_of(const Tensor& tensor, int64_t first_element, int64_t count) {
  const size_t element = dtype_size(tensor.dtype);
  return std::string(static_cast<const char*>(tensor.data) + first_element * element,
                     static_cast<size_t>(count) * element);
}

// out[i] += blob[i] for `count` elements of `dtype` (out starts as the first blob).
void add_into(DType dtype, void* out, const std::string& blob, int64_t count) {
  auto sum = [&]<typename T>(T*) {
    T* target = static_cast<T*>(out);
    const char* source = blob.data();
    for (int64_t i = 0; i < count; ++i) {
      T value;
      std::memcpy(&value, source + i * sizeof(T), sizeof(T));
      target[i] += value;
    }
  };
  switch (dtype) {
    case DType::F32:
      return sum(static_cast<float*>(nullptr));
    case DType::F64:
      return sum(static_cast<double*>(nullptr));
    case DType::I32:
      return sum(static_cast<int32_t*>(nullptr));
    case DType::I64:
      return sum(static_cast<int64_t*>(nullptr));
    case DType::BF16:
    case DType::F16: {
      auto* target = static_cast<uint16_t*>(out);
      const bool bf16 = dtype == DType::BF16;
      for (int64_t i = 0; i < count; ++i) {
        uint16_t bits;
        std::memcpy(&bits, blob.data() + i * 2, 2);
        float value = bf16 ? bf16_to_float(target[i]) + bf16_to_float(bits)
                           : f16_to_float(target[i]) + f16_to_float(bits);
        target[i] = bf16 ? float_to_bf16(value) : float_to_f16(value);
      }
      return;
    }
    default:
      fail("store communicator: cannot sum dtype ", dtype_name(dtype));
  }
}

// dst = sum of the blobs, in order (all ranks sum in the same order: identical results).
void sum_blobs(const Tensor& dst, const std::vector<std::string>& blobs, int64_t count) {
  std::memcpy(dst.data, blobs[0].data(), blobs[0].size());
  for (size_t i = 1; i < blobs.size(); ++i) add_into(dst.dtype, dst.data, blobs[i], count);
}

}  // namespace

StoreCommunicator::StoreCommunicator(Store& store, std::vector<int> members, std::string group_name)
    : store_(store), members_(std::move(members)), group_name_(std::move(group_name)) {
  auto self = std::find(members_.begin(), members_.end(), store.rank());
  if (self == members_.end())
    fail("StoreCommunicator: rank ", store.rank(), " is not a member of group ", group_name_);
  rank_ = static_cast<int>(self - members_.begin());
}

std::vector<std::string> StoreCommunicator::exchange(const std::vector<std::string>& outgoing,
                                                     bool per_peer) {
  const std::string prefix = "comm/" + group_name_ + "/";
  auto key = [&](int64_t sequence, int from, int to) {
    std::string text = prefix + std::to_string(sequence) + "/" + std::to_string(from);
    return per_peer ? text + "/" + std::to_string(to) : text;
  };
  const int64_t sequence = sequence_++;
  if (per_peer) {
    for (int peer = 0; peer < size(); ++peer)
      store_.set(key(sequence, rank_, peer), outgoing[peer]);
  } else {
    store_.set(key(sequence, rank_, 0), outgoing[0]);
  }
  std::vector<std::string> incoming(size());
  for (int peer = 0; peer < size(); ++peer)
    incoming[peer] =
        peer == rank_ ? outgoing[per_peer ? peer : 0] : store_.get(key(sequence, peer, rank_));
  // Everyone has posted `sequence`, so everyone is done reading `sequence - 1`: erase ours.
  if (sequence > 0) {
    if (per_peer_previous_) {
      for (int peer = 0; peer < size(); ++peer) store_.erase(previous_key(sequence - 1, peer));
    } else {
      store_.erase(previous_key(sequence - 1, 0));
    }
  }
  per_peer_previous_ = per_peer;
  return incoming;
}

std::string StoreCommunicator::previous_key(int64_t sequence, int to) const {
  std::string text =
      "comm/" + group_name_ + "/" + std::to_string(sequence) + "/" + std::to_string(rank_);
  return per_peer_previous_ ? text + "/" + std::to_string(to) : text;
}

void StoreCommunicator::all_reduce_sum(const Tensor& in, const Tensor& out, StreamHandle) {
  check_all_reduce(*this, in, out);
  require_host("all_reduce", in);
  auto blobs = exchange({bytes_of(in, 0, in.numel())}, false);
  sum_blobs(out, blobs, out.numel());
}

void StoreCommunicator::reduce_scatter_sum(const Tensor& in, const Tensor& out, StreamHandle) {
  check_reduce_scatter(*this, in, out);
  require_host("reduce_scatter", in);
  const int64_t chunk = out.numel();
  std::vector<std::string> outgoing;
  for (int peer = 0; peer < size(); ++peer) outgoing.push_back(bytes_of(in, peer * chunk, chunk));
  auto blobs = exchange(outgoing, true);
  sum_blobs(out, blobs, chunk);
}

void StoreCommunicator::all_gather(const Tensor& in, const Tensor& out, StreamHandle) {
  check_all_gather(*this, in, out);
  require_host("all_gather", in);
  auto blobs = exchange({bytes_of(in, 0, in.numel())}, false);
  char* target = static_cast<char*>(out.data);
  for (const auto& blob : blobs) {
    std::memcpy(target, blob.data(), blob.size());
    target += blob.size();
  }
}

void StoreCommunicator::all_to_all_v(const Tensor& send, std::span<const int64_t> send_rows,
                                     const Tensor& recv, std::span<const int64_t> recv_rows,
                                     StreamHandle) {
  const int64_t row = check_all_to_all_v(*this, send, send_rows, recv, recv_rows);
  require_host("all_to_all_v", send);
  std::vector<std::string> outgoing;
  int64_t first_row = 0;
  for (int peer = 0; peer < size(); ++peer) {
    outgoing.push_back(bytes_of(send, first_row * row, send_rows[peer] * row));
    first_row += send_rows[peer];
  }
  auto blobs = exchange(outgoing, true);
  char* target = static_cast<char*>(recv.data);
  const size_t row_bytes = static_cast<size_t>(row) * dtype_size(recv.dtype);
  for (int peer = 0; peer < size(); ++peer) {
    if (blobs[peer].size() != static_cast<size_t>(recv_rows[peer]) * row_bytes)
      fail("all_to_all_v: rank ", rank_, " expected ", recv_rows[peer], " rows from rank ", peer,
           " but got ", row_bytes ? blobs[peer].size() / row_bytes : 0,
           " (send and receive counts disagree)");
    std::memcpy(target, blobs[peer].data(), blobs[peer].size());
    target += blobs[peer].size();
  }
}

void StoreCommunicator::all_to_all_v_blocks(const Tensor& send,
                                            std::span<const RowBlock> send_blocks,
                                            const Tensor& recv,
                                            std::span<const RowBlock> recv_blocks, StreamHandle) {
  const int64_t row = check_all_to_all_v_blocks(*this, send, send_blocks, recv, recv_blocks);
  require_host("all_to_all_v_blocks", send);
  std::vector<std::string> outgoing;
  for (const RowBlock& block : send_blocks)
    outgoing.push_back(bytes_of(send, block.offset * row, block.rows * row));
  auto blobs = exchange(outgoing, true);
  const size_t row_bytes = static_cast<size_t>(row) * dtype_size(recv.dtype);
  for (int peer = 0; peer < size(); ++peer) {
    const RowBlock& block = recv_blocks[peer];
    if (blobs[peer].size() != static_cast<size_t>(block.rows) * row_bytes)
      fail("all_to_all_v_blocks: rank ", rank_, " expected ", block.rows, " rows from rank ", peer,
           " but got ", row_bytes ? blobs[peer].size() / row_bytes : 0,
           " (send and receive counts disagree)");
    std::memcpy(static_cast<char*>(recv.data) + block.offset * row_bytes, blobs[peer].data(),
                blobs[peer].size());
  }
}

void StoreCommunicator::barrier(StreamHandle) { exchange({std::string()}, false); }

std::unique_ptr<Communicator> StoreCommunicator::split(int color, int key) {
  const std::string mine = std::to_string(color) + " " + std::to_string(key);
  auto all = exchange({mine}, false);
  std::vector<std::tuple<int, int>> chosen;  // (key, index in this group)
  for (int peer = 0; peer < size(); ++peer) {
    int peer_color = 0, peer_key = 0;
    std::sscanf(all[peer].c_str(), "%d %d", &peer_color, &peer_key);
    if (peer_color == color) chosen.emplace_back(peer_key, peer);
  }
  std::sort(chosen.begin(), chosen.end());
  std::vector<int> members;
  for (const auto& [peer_key, peer] : chosen) members.push_back(members_[peer]);
  return std::make_unique<StoreCommunicator>(
      store_, members, group_name_ + "/" + std::to_string(splits_++) + "." + std::to_string(color));
}

// ---- layout -----------------------------------------------------------------------------------

ParallelLayout ParallelLayout::make(int world, int expert_parallel, int num_experts) {
  if (world < 1) fail("parallel layout: world size ", world, " must be at least 1");
  if (expert_parallel < 1)
    fail("parallel layout: expert_parallel ", expert_parallel, " must be at least 1");
  if (world % expert_parallel != 0)
    fail("parallel layout: expert_parallel=", expert_parallel, " does not divide the ", world,
         " ranks");
  if (num_experts > 0 && num_experts % expert_parallel != 0)
    fail("parallel layout: expert_parallel=", expert_parallel, " does not divide the ", num_experts,
         " experts of the model");
  return {world, world / expert_parallel, expert_parallel};
}

std::vector<int> ParallelLayout::ep_group_ranks(int rank) const {
  std::vector<int> ranks(expert_parallel);
  std::iota(ranks.begin(), ranks.end(), ep_group(rank) * expert_parallel);
  return ranks;
}

std::vector<int> ParallelLayout::expert_dp_group_ranks(int rank) const {
  std::vector<int> ranks;
  for (int replica = 0; replica < data_parallel; ++replica)
    ranks.push_back(replica * expert_parallel + ep_rank(rank));
  return ranks;
}

std::pair<int, int> ParallelLayout::local_experts(int rank, int num_experts) const {
  if (num_experts % expert_parallel != 0)
    fail("parallel layout: expert_parallel=", expert_parallel, " does not divide the ", num_experts,
         " experts of the model");
  const int per_rank = num_experts / expert_parallel;
  return {ep_rank(rank) * per_rank, per_rank};
}

ParallelGroups make_parallel_groups(std::unique_ptr<Communicator> world, int expert_parallel,
                                    int num_experts) {
  ParallelGroups groups;
  groups.layout = ParallelLayout::make(world->size(), expert_parallel, num_experts);
  const int rank = world->rank();
  groups.expert = world->split(groups.layout.ep_color(rank), groups.layout.ep_key(rank));
  groups.expert_dp =
      world->split(groups.layout.expert_dp_color(rank), groups.layout.expert_dp_key(rank));
  groups.world = std::move(world);
  return groups;
}

// ---- NCCL, when this build has none -----------------------------------------------------------

#ifndef MOETUNE_WITH_NCCL
std::unique_ptr<Communicator> make_nccl_communicator(const ProcessInfo&, Store&) {
  fail(
      "this moetune was built without CUDA/NCCL; rebuild with -DMOETUNE_CUDA=ON on a "
      "machine with the CUDA toolkit (NCCL included)");
}
bool nccl_available() { return false; }
int cuda_device_for(const ProcessInfo&) { fail("this moetune was built without CUDA"); }
#endif

}  // namespace moetune::dist
