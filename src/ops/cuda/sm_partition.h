// SM partitions of one GPU: a CUDA green context holding a fixed set of the device's SMs and
// streams whose kernels run only there. The optimizer in the backward uses one to stream its
// memory-bound AdamW on a few SMs while the compute-bound backward keeps the rest (the
// persistent kernels then size their grids by stream_sm_count). Green contexts are reached
// through the driver's entry points (cudaGetDriverEntryPointByVersion): nothing links libcuda.
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <string>

namespace moetune::cuda {

class SmPartition {
 public:
  // Splits `device`'s SMs: `part`, a green context of at least `sms` SMs (rounded up to the
  // driver's granularity), and the other `rest_sms`, with `rest` their green context where
  // the driver makes one (null otherwise: the remainder of a split has fewer guarantees).
  // False, with the reason in *why, where the driver or device cannot split.
  struct Split {
    std::unique_ptr<SmPartition> part, rest;
    int rest_sms = 0;
  };
  static bool split(int device, int sms, Split& out, std::string* why);
  ~SmPartition();
  SmPartition(const SmPartition&) = delete;
  SmPartition& operator=(const SmPartition&) = delete;

  int sms() const { return sms_; }  // the SMs it holds
  // A non-blocking stream whose kernels run on this partition's SMs only (the caller destroys
  // it with cudaStreamDestroy before the partition goes).
  cudaStream_t make_stream(int priority) const;

 private:
  SmPartition() = default;
  void* green_context_ = nullptr;  // CUgreenCtx
  int sms_ = 0;
};

// A CUDA event that can be recorded on `stream`: created in the stream's context (a green
// context's stream is of that context, and an event records only on streams of its own;
// waiting on it from any stream of the device is fine). `flags` as cudaEventCreateWithFlags.
cudaEvent_t create_event_for(cudaStream_t stream, unsigned flags);

// The SMs the persistent kernels of `stream` (the grouped GEMMs, cuBLASLt's SM target) size
// their grids by: its budget where one is set, else its green context's SMs where it has
// one, else the device's.
int stream_sm_count(cudaStream_t stream);
// Sets (sms > 0) or clears (0) `stream`'s budget: the optimizer's SM partition runs beside it,
// so its persistent grids leave those SMs alone rather than wait for them.
void set_stream_sm_budget(cudaStream_t stream, int sms);

}  // namespace moetune::cuda
