// The NCCL Communicator (CUDA builds only; see dist/communicator.h for the interface).
// One communicator per group, one process per GPU. The ncclUniqueId travels through the
// rendezvous store; sub-groups come from ncclCommSplit. Collectives are enqueued on the
// caller's stream and return at once (stream order), except barrier(), which waits.
//
// Tricks:
// - Moves (all_gather, all_to_all_v) go as bytes (ncclUint8), so any dtype travels; only
//   sums need NCCL's numeric type.
// - all_to_all_v is point-to-point sends/receives inside one ncclGroupStart/End, the way
//   NCCL documents all-to-all with variable counts; peers with zero rows are skipped.
// - group_start/group_end are ncclGroupStart/End (thread-wide in NCCL, nesting): the
//   optimizer batches the collectives of a gradient group into one launch.
// - NCCL_NVLS_ENABLE=0 is set before the first communicator unless the user set it:
//   NVLink multicast is off on the machines this project uses (it can take a shared host's
//   GPUs out of service).
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "dist/communicator.h"
#include "dist/store.h"

namespace moetune::dist {

namespace {

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) fail("CUDA error in ", what, ": ", cudaGetErrorString(status));
}

void check_nccl(ncclResult_t status, const char* what, ncclComm_t comm = nullptr) {
  if (status == ncclSuccess) return;
  const char* last_error = ncclGetLastError(comm);
  const std::string message = detail::concat(
      "NCCL error in ", what, ": ", ncclGetErrorString(status),
      last_error && *last_error ? std::string(" (") + last_error + ")" : std::string(),
      " (NCCL_DEBUG=WARN shows more)");
  // A peer that exited or lost its network: exit status 75, so that a launcher names the
  // rank that failed first rather than this one.
  if (status == ncclRemoteError) throw PeerFailure(message);
  throw Error(message);
}

ncclDataType_t sum_type(DType dtype) {
  switch (dtype) {
    case DType::F32:
      return ncclFloat32;
    case DType::BF16:
      return ncclBfloat16;
    case DType::F16:
      return ncclFloat16;
    case DType::F64:
      return ncclFloat64;
    case DType::I32:
      return ncclInt32;
    case DType::I64:
      return ncclInt64;
    case DType::I8:
      return ncclInt8;
    case DType::U8:
      return ncclUint8;
    default:
      fail("NCCL sum: unsupported dtype ", dtype_name(dtype));
  }
}

void require_device(const char* op, const Tensor& tensor) {
  if (tensor.device != Device::CUDA) fail(op, ": the NCCL communicator needs CUDA tensors");
}

cudaStream_t as_stream(StreamHandle stream) { return static_cast<cudaStream_t>(stream); }

class NcclCommunicator : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, std::string name) : comm_(comm), name_(std::move(name)) {
    check_nccl(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank", comm_);
    check_nccl(ncclCommCount(comm_, &size_), "ncclCommCount", comm_);
    check_cuda(cudaMalloc(&scratch_, sizeof(float)), "cudaMalloc (barrier scratch)");
  }
  ~NcclCommunicator() override {
    cudaFree(scratch_);
    ncclCommDestroy(comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "nccl:" + name_; }

  void all_reduce_sum(const Tensor& in, const Tensor& out, StreamHandle stream) override {
    check_all_reduce(*this, in, out);
    require_device("all_reduce", in);
    check_nccl(ncclAllReduce(in.data, out.data, static_cast<size_t>(in.numel()), sum_type(in.dtype),
                             ncclSum, comm_, as_stream(stream)),
               "ncclAllReduce", comm_);
  }

  void reduce_scatter_sum(const Tensor& in, const Tensor& out, StreamHandle stream) override {
    check_reduce_scatter(*this, in, out);
    require_device("reduce_scatter", in);
    check_nccl(ncclReduceScatter(in.data, out.data, static_cast<size_t>(out.numel()),
                                 sum_type(in.dtype), ncclSum, comm_, as_stream(stream)),
               "ncclReduceScatter", comm_);
  }

  void all_gather(const Tensor& in, const Tensor& out, StreamHandle stream) override {
    check_all_gather(*this, in, out);
    require_device("all_gather", in);
    check_nccl(ncclAllGather(in.data, out.data, in.bytes(), ncclUint8, comm_, as_stream(stream)),
               "ncclAllGather", comm_);
  }

  void all_to_all_v(const Tensor& send, std::span<const int64_t> send_rows, const Tensor& recv,
                    std::span<const int64_t> recv_rows, StreamHandle stream) override {
    const int64_t row = check_all_to_all_v(*this, send, send_rows, recv, recv_rows);
    require_device("all_to_all_v", send);
    const size_t row_bytes = static_cast<size_t>(row) * dtype_size(send.dtype);
    const char* send_bytes = static_cast<const char*>(send.data);
    char* recv_bytes = static_cast<char*>(recv.data);
    check_nccl(ncclGroupStart(), "ncclGroupStart", comm_);
    size_t send_offset = 0, recv_offset = 0;
    for (int peer = 0; peer < size_; ++peer) {
      const size_t send_count = static_cast<size_t>(send_rows[peer]) * row_bytes;
      const size_t recv_count = static_cast<size_t>(recv_rows[peer]) * row_bytes;
      if (send_count)
        check_nccl(ncclSend(send_bytes + send_offset, send_count, ncclUint8, peer, comm_,
                            as_stream(stream)),
                   "ncclSend", comm_);
      if (recv_count)
        check_nccl(ncclRecv(recv_bytes + recv_offset, recv_count, ncclUint8, peer, comm_,
                            as_stream(stream)),
                   "ncclRecv", comm_);
      send_offset += send_count;
      recv_offset += recv_count;
    }
    check_nccl(ncclGroupEnd(), "ncclGroupEnd", comm_);
  }

  void all_to_all_v_blocks(const Tensor& send, std::span<const RowBlock> send_blocks,
                           const Tensor& recv, std::span<const RowBlock> recv_blocks,
                           StreamHandle stream) override {
    const int64_t row = check_all_to_all_v_blocks(*this, send, send_blocks, recv, recv_blocks);
    require_device("all_to_all_v_blocks", send);
    const size_t row_bytes = static_cast<size_t>(row) * dtype_size(send.dtype);
    const char* send_bytes = static_cast<const char*>(send.data);
    char* recv_bytes = static_cast<char*>(recv.data);
    check_nccl(ncclGroupStart(), "ncclGroupStart", comm_);
    for (int peer = 0; peer < size_; ++peer) {
      const RowBlock& out = send_blocks[peer];
      const RowBlock& in = recv_blocks[peer];
      if (out.rows)
        check_nccl(ncclSend(send_bytes + out.offset * row_bytes, out.rows * row_bytes, ncclUint8,
                            peer, comm_, as_stream(stream)),
                   "ncclSend", comm_);
      if (in.rows)
        check_nccl(ncclRecv(recv_bytes + in.offset * row_bytes, in.rows * row_bytes, ncclUint8,
                            peer, comm_, as_stream(stream)),
                   "ncclRecv", comm_);
    }
    check_nccl(ncclGroupEnd(), "ncclGroupEnd", comm_);
  }

  void group_start() override { check_nccl(ncclGroupStart(), "ncclGroupStart", comm_); }
  void group_end() override { check_nccl(ncclGroupEnd(), "ncclGroupEnd", comm_); }

  void barrier(StreamHandle stream) override {
    check_nccl(ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, as_stream(stream)),
               "ncclAllReduce (barrier)", comm_);
    check_cuda(cudaStreamSynchronize(as_stream(stream)), "cudaStreamSynchronize (barrier)");
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    ncclComm_t child = nullptr;
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    check_nccl(ncclCommSplit(comm_, color, key, &child, &config), "ncclCommSplit", comm_);
    if (child == nullptr) fail("ncclCommSplit gave no communicator for color ", color);
    return std::make_unique<NcclCommunicator>(child, name_ + "/" + std::to_string(color));
  }

 private:
  ncclComm_t comm_ = nullptr;
  std::string name_;
  int rank_ = 0;
  int size_ = 1;
  void* scratch_ = nullptr;
};

}  // namespace

int cuda_device_for(const ProcessInfo& info) {
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  return choose_cuda_device(info, count);
}

std::unique_ptr<Communicator> make_nccl_communicator(const ProcessInfo& info, Store& store) {
  ::setenv("NCCL_NVLS_ENABLE", "0", 0);
  check_cuda(cudaSetDevice(cuda_device_for(info)), "cudaSetDevice");
  // Each rank counts its communicators in the store, so a second world communicator gets
  // a fresh id key; every rank creates them in the same order.
  const int64_t generation = store.add("nccl/world/generation/" + std::to_string(info.rank), 1);
  const std::string key = "nccl/world/unique_id/" + std::to_string(generation);
  ncclUniqueId id;
  if (info.rank == 0) {
    check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
    store.set(key, std::string_view(id.internal, sizeof(id.internal)));
  } else {
    const std::string bytes = store.get(key);
    if (bytes.size() != sizeof(id.internal)) fail("malformed ncclUniqueId in the store");
    std::memcpy(id.internal, bytes.data(), sizeof(id.internal));
  }
  ncclComm_t comm = nullptr;
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  check_nccl(ncclCommInitRankConfig(&comm, info.world_size, id, info.rank, &config),
             "ncclCommInitRankConfig");
  return std::make_unique<NcclCommunicator>(comm, "world");
}

bool nccl_available() { return true; }

}  // namespace moetune::dist
