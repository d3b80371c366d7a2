// The CUDA backend: the Backend interface (ops/backend.h) on one GPU. This file holds the
// class, its resources (one stream, the cuBLASLt handle and workspace, cuDNN attention;
// side streams with their events for communication beside the ops),
// the dense GEMM through cuBLASLt (bf16 in, fp32 accumulate; fp32 in, fp32 math, no TF32,
// for parity), copies, the fused LM head + cross-entropy (token chunks: the [N, V] logits
// never exist), and the dispatch of every other op to its kernel family (*.cu).
// Temporaries come from the caching allocator and are returned when the op returns: all
// work is ordered on the one stream, so reuse by later launches is safe. Side streams
// (Backend::SideStream): `stream_` is the stream ops enqueue on, `ops_stream_` the backend's
// own; SideStream::begin_ops() points `stream_` (and the allocator's allocation stream, see
// caching_allocator.cpp for its rule) at the side stream until end_ops(). Ops sharing the
// cuBLASLt workspace or cuDNN's stream (gemm, attention, the loss) refuse to run there. The
// ops' stream has a higher priority than a Low side stream (optimizer updates).
// Profiling (cuda_profile.h): each outermost op is bracketed by events on the stream it
// runs on and its time added to its phase and to its name; side-stream ops are kept apart.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <tuple>
#include <vector>

#include "ops/cuda/attention_cudnn.h"
#include "ops/cuda/cuda_common.h"
#include "ops/cuda/cuda_profile.h"
#include "ops/cuda/device_memory.h"
#include "ops/cuda/grouped_gemm_sm90.h"
#include "ops/cuda/sm_partition.h"

namespace moetune {
namespace cuda {
void* device_allocate(size_t bytes, bool zero_fill);
void device_free(void* pointer);
}  // namespace cuda

namespace {

using cuda::Phase;

#define MOETUNE_CUBLAS_CHECK(expr)                                                              \
  do {                                                                                          \
    cublasStatus_t status_ = (expr);                                                            \
    if (status_ != CUBLAS_STATUS_SUCCESS)                                                       \
      ::moetune::fail(__FILE__, ":", __LINE__, ": cuBLAS error ", cublasGetStatusName(status_), \
                      " in " #expr);                                                            \
  } while (0)

cudaDataType_t cuda_type(DType dtype, const char* what) {
  switch (dtype) {
    case DType::F32:
      return CUDA_R_32F;
    case DType::BF16:
      return CUDA_R_16BF;
    case DType::F16:
      return CUDA_R_16F;
    default:
      fail(what, ": dtype ", dtype_name(dtype), " not supported");
  }
}

// Stream-ordered temporaries of one op.
class BufferScratch : public cuda::Scratch {
 public:
  void* get(size_t bytes) override {
    buffers_.emplace_back(DType::U8, Shape{static_cast<int64_t>(std::max<size_t>(bytes, 1))},
                          Device::CUDA);
    return buffers_.back().data();
  }
  static void* workspace(void* context, size_t bytes) {
    return static_cast<BufferScratch*>(context)->get(bytes);
  }

 private:
  std::vector<Buffer> buffers_;
};

int alignment_of(const void* pointer) {
  const auto address = reinterpret_cast<uintptr_t>(pointer);
  for (int a : {256, 16, 8, 4})
    if (address % a == 0) return a;
  return 2;
}

class CudaBackend;

// A non-blocking stream beside the backend's, with one reusable event per direction
// (cudaStreamWaitEvent captures the event's state when it is called, so re-recording it
// afterwards is safe) and the numbered fences. Gradient collectives run here while the
// backward goes on, or backend ops between begin_ops() and end_ops().
class CudaSideStream final : public Backend::SideStream {
 public:
  // partition: the SMs this stream's kernels own (null: an ordinary stream); the ops' stream
  // gets the other SMs as its budget from begin_ops() (side work enqueued) to join().
  CudaSideStream(CudaBackend* backend, cudaStream_t ops, int priority,
                 std::unique_ptr<cuda::SmPartition::Split> partition = nullptr)
      : backend_(backend), ops_(ops), partition_(std::move(partition)) {
    if (partition_) {
      stream_ = partition_->part->make_stream(priority);
    } else {
      MOETUNE_CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, priority));
    }
    // Each event lives in the context of the stream it is recorded on (sm_partition.h).
    ops_done_ = cuda::create_event_for(ops_, cudaEventDisableTiming);
    side_done_ = cuda::create_event_for(stream_, cudaEventDisableTiming);
  }
  ~CudaSideStream() override {
    if (in_ops_) end_ops();
    cudaStreamSynchronize(stream_);
    cudaEventDestroy(ops_done_);
    cudaEventDestroy(side_done_);
    for (cudaEvent_t fence : fences_)
      if (fence) cudaEventDestroy(fence);
    cuda::forget_side_allocation_stream(stream_);
    cudaStreamDestroy(stream_);
    if (partition_) cuda::set_stream_sm_budget(ops_, 0);
  }
  int own_sms() const override { return partition_ ? partition_->part->sms() : 0; }
  CudaSideStream(const CudaSideStream&) = delete;
  CudaSideStream& operator=(const CudaSideStream&) = delete;

  void* handle() const override { return stream_; }
  void wait_for_ops() override {
    MOETUNE_CUDA_CHECK(cudaEventRecord(ops_done_, ops_));
    MOETUNE_CUDA_CHECK(cudaStreamWaitEvent(stream_, ops_done_, 0));
  }
  void join() override {
    MOETUNE_CUDA_CHECK(cudaEventRecord(side_done_, stream_));
    MOETUNE_CUDA_CHECK(cudaStreamWaitEvent(ops_, side_done_, 0));
    if (partition_) cuda::set_stream_sm_budget(ops_, 0);  // nothing left beside the ops
  }
  void record_fence(int fence) override {
    MOETUNE_CHECK(fence >= 0, "SideStream::record_fence: negative fence");
    if (static_cast<size_t>(fence) >= fences_.size()) fences_.resize(fence + 1, nullptr);
    cudaEvent_t& event = fences_[static_cast<size_t>(fence)];
    if (!event) event = cuda::create_event_for(stream_, cudaEventDisableTiming);
    MOETUNE_CUDA_CHECK(cudaEventRecord(event, stream_));
  }
  void join_fence(int fence) override {
    if (fence < 0 || static_cast<size_t>(fence) >= fences_.size() || !fences_[fence]) return;
    MOETUNE_CUDA_CHECK(cudaStreamWaitEvent(ops_, fences_[static_cast<size_t>(fence)], 0));
  }
  void begin_ops() override;  // after CudaBackend
  void end_ops() override;

 private:
  CudaBackend* backend_;
  cudaStream_t ops_ = nullptr, stream_ = nullptr;
  std::unique_ptr<cuda::SmPartition::Split> partition_;
  cudaEvent_t ops_done_ = nullptr, side_done_ = nullptr;
  std::vector<cudaEvent_t> fences_;  // null: never recorded
  bool in_ops_ = false;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device_index) : device_index_(device_index) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
      (void)cudaGetLastError();
      fail("no CUDA device found (is the NVIDIA driver loaded, CUDA_VISIBLE_DEVICES set?)");
    }
    if (device_index < 0 || device_index >= count)
      fail("CUDA device ", device_index, " does not exist (", count, " found)");
    MOETUNE_CUDA_CHECK(cudaSetDevice(device_index));
    register_device_allocator(cuda::device_allocate, cuda::device_free);
    // Priorities: numerically lower is higher; the default (0) is the least. The ops' stream
    // takes one step above the least when the device has several, so that a Low side
    // stream can sit below it.
    int least = 0, greatest = 0;
    MOETUNE_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    least_priority_ = least;
    greatest_priority_ = greatest;
    ops_priority_ = greatest < least ? least - 1 : least;
    MOETUNE_CUDA_CHECK(
        cudaDeviceGetAttribute(&device_sms_, cudaDevAttrMultiProcessorCount, device_index));
    MOETUNE_CUDA_CHECK(
        cudaStreamCreateWithPriority(&ops_stream_, cudaStreamNonBlocking, ops_priority_));
    stream_ = ops_stream_;
    cuda::set_allocation_stream(stream_);
    MOETUNE_CUBLAS_CHECK(cublasLtCreate(&lt_));
    workspace_ = Buffer(DType::U8, Shape{kWorkspaceBytes}, Device::CUDA);
    attention_ = std::make_unique<cuda::CudnnAttention>(stream_);
  }

  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    for (auto& [key, plan] : plans_) plan.destroy();
    attention_.reset();
    workspace_ = Buffer();
    if (lt_) cublasLtDestroy(lt_);
    cuda::set_allocation_stream(nullptr);
    if (ops_stream_) cudaStreamDestroy(ops_stream_);
  }

  Device device() const override { return Device::CUDA; }
  std::string name() const override { return "cuda:" + std::to_string(device_index_); }

  // ---- profiling -------------------------------------------------------------------------
  void begin_profile() {
    profiling_ = true;
    marks_.clear();
  }
  cuda::PhaseTimes end_profile() {
    synchronize();
    MOETUNE_CUDA_CHECK(cudaDeviceSynchronize());  // side streams too
    cuda::PhaseTimes times;
    for (auto& mark : marks_) {
      float ms = 0.0f;
      MOETUNE_CUDA_CHECK(cudaEventElapsedTime(&ms, mark.start, mark.stop));
      cudaEventDestroy(mark.start);
      cudaEventDestroy(mark.stop);
      const double s = ms * 1e-3;
      cuda::OpTime& op = (mark.side ? times.side_ops : times.ops)[mark.op];
      op.seconds += s;
      ++op.calls;
      if (mark.side) {
        times.side_seconds[static_cast<int>(mark.phase)] += s;
        continue;
      }
      times.seconds[static_cast<int>(mark.phase)] += s;
      if (mark.gemm == GemmKind::Grouped) {
        times.grouped_gemm_s += s;
        times.grouped_gemm_flops += mark.flops;
      } else if (mark.gemm == GemmKind::WeightGrad) {
        times.weight_grad_s += s;
        times.weight_grad_flops += mark.flops;
      }
    }
    marks_.clear();
    profiling_ = false;
    return times;
  }

  // ---- memory ----------------------------------------------------------------------------
  void copy(const Tensor& dst, const Tensor& src) override {
    PhaseScope scope(this, Phase::OtherOps);
    if (dst.numel() != src.numel())
      fail("copy: ", dst.shape.str(), " <- ", src.shape.str(), ": element counts differ");
    if (dst.numel() == 0) return;
    const bool dst_host = dst.device == Device::CPU, src_host = src.device == Device::CPU;
    if (dst.dtype == src.dtype) {
      const cudaMemcpyKind kind =
          dst_host ? (src_host ? cudaMemcpyHostToHost : cudaMemcpyDeviceToHost)
                   : (src_host ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToDevice);
      MOETUNE_CUDA_CHECK(cudaMemcpyAsync(dst.data, src.data, dst.bytes(), kind, stream_));
      if (dst_host || src_host) MOETUNE_CUDA_CHECK(cudaStreamSynchronize(stream_));
      return;
    }
    if (!dtype_is_float(dst.dtype) || !dtype_is_float(src.dtype))
      fail("copy: cannot convert ", dtype_name(src.dtype), " to ", dtype_name(dst.dtype));
    BufferScratch scratch;
    Tensor device_src = src, device_dst = dst;
    if (src_host) {
      device_src = Tensor(scratch.get(src.bytes()), src.dtype, src.shape, Device::CUDA);
      MOETUNE_CUDA_CHECK(
          cudaMemcpyAsync(device_src.data, src.data, src.bytes(), cudaMemcpyHostToDevice, stream_));
    }
    if (dst_host) device_dst = Tensor(scratch.get(dst.bytes()), dst.dtype, dst.shape, Device::CUDA);
    cuda::launch_convert(device_dst, device_src, stream_);
    if (dst_host)
      MOETUNE_CUDA_CHECK(
          cudaMemcpyAsync(dst.data, device_dst.data, dst.bytes(), cudaMemcpyDeviceToHost, stream_));
    MOETUNE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  void fill(const Tensor& dst, float value) override {
    PhaseScope scope(this, Phase::OtherOps);
    if (value == 0.0f && dst.numel()) {
      MOETUNE_CUDA_CHECK(cudaMemsetAsync(dst.data, 0, dst.bytes(), stream_));
      return;
    }
    cuda::launch_fill(dst, value, stream_);
  }

  // Waits for the stream ops enqueue on now (the side stream between begin_ops/end_ops).
  void synchronize() override { MOETUNE_CUDA_CHECK(cudaStreamSynchronize(stream_)); }
  void* stream() const override { return ops_stream_; }
  std::unique_ptr<SideStream> make_side_stream(SideStreamPriority priority, int own_sms) override {
    if (own_sms > 0) {
      // Its own SMs: the highest priority, so that ops' kernels which found those SMs idle
      // give them back first (the ops' budget keeps their persistent grids off them).
      auto split = std::make_unique<cuda::SmPartition::Split>();
      std::string why;
      if (cuda::SmPartition::split(device_index_, own_sms, *split, &why))
        return std::make_unique<CudaSideStream>(this, ops_stream_, greatest_priority_,
                                                std::move(split));
      std::fprintf(stderr,
                   "moetune: no SM partition of %d SMs (%s): the side stream shares the "
                   "SMs\n",
                   own_sms, why.c_str());
    }
    return std::make_unique<CudaSideStream>(
        this, ops_stream_, priority == SideStreamPriority::Low ? least_priority_ : ops_priority_);
  }

  // ---- dense math --------------------------------------------------------------------------
  void gemm(const Tensor& a, bool transpose_a, const Tensor& b, bool transpose_b, const Tensor& c,
            float alpha, float beta) override {
    PhaseScope scope(this, Phase::DenseGemm);
    gemm_impl(a, transpose_a, b, transpose_b, c, alpha, beta);
  }

  void add(const Tensor& out, const Tensor& a, const Tensor& b) override {
    PhaseScope scope(this, Phase::OtherOps);
    cuda::launch_add(out, a, b, stream_);
  }
  void add_bias(const Tensor& x, const Tensor& bias) override {
    PhaseScope scope(this, Phase::OtherOps);
    cuda::launch_add_bias(x, bias, stream_);
  }
  void bias_backward(const Tensor& dy, const Tensor& dbias, bool accumulate) override {
    PhaseScope scope(this, Phase::OtherOps);
    cuda::launch_bias_backward(dy, dbias, accumulate, stream_);
  }

  void embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& out) override {
    PhaseScope scope(this, Phase::OtherOps);
    cuda::launch_embedding_forward(ids, table, out, stream_);
  }
  void embedding_backward(const Tensor& ids, const Tensor& dout, const Tensor& dtable) override {
    PhaseScope scope(this, Phase::OtherOps);
    BufferScratch scratch;
    cuda::launch_embedding_backward(ids, dout, dtable, scratch, stream_);
  }

  void rmsnorm_forward(const Tensor& x, const Tensor& weight, float eps, const Tensor& out,
                       const Tensor& rstd) override {
    PhaseScope scope(this, Phase::OtherOps);
    cuda::launch_rmsnorm_forward(nullptr, nullptr, x, weight, eps, out, rstd, stream_);
  }
  void add_rmsnorm_forward(const Tensor& residual, const Tensor& delta, const Tensor& weight,
                           float eps, const Tensor& out, const Tensor& rstd) override {
    PhaseScope scope(this, Phase::OtherOps);
    cuda::launch_rmsnorm_forward(&residual, &delta, residual, weight, eps, out, rstd, stream_);
  }
  void rmsnorm_backward(const Tensor& dout, const Tensor& x, const Tensor& weight,
                        const Tensor& rstd, const Tensor& dx, const Tensor& dweight,
                        bool accumulate_dx, bool accumulate_dweight) override {
    PhaseScope scope(this, Phase::OtherOps);
    BufferScratch scratch;
    cuda::launch_rmsnorm_backward(dout, x, weight, rstd, dx, dweight, accumulate_dx,
                                  accumulate_dweight, scratch, stream_);
  }

  void rope_forward(const Tensor& x, const Tensor& positions, const Tensor& inv_freq) override {
    PhaseScope scope(this, Phase::OtherOps);
    cuda::launch_rope(x, positions, inv_freq, false, stream_);
  }
  void rope_backward(const Tensor& dx, const Tensor& positions, const Tensor& inv_freq) override {
    PhaseScope scope(this, Phase::OtherOps);
    cuda::launch_rope(dx, positions, inv_freq, true, stream_);
  }

  void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale,
                         const Tensor& doc_offsets, const Tensor& out, const Tensor& lse) override {
    PhaseScope scope(this, Phase::Attention);
    require_ops_stream("attention_forward");
    BufferScratch scratch;
    if (out.shape == q.shape && out.dtype == q.dtype && v.shape == k.shape && v.dtype == k.dtype &&
        lse.dtype == DType::F32 && lse.numel() == q.size(0) * q.size(1) * q.size(2) &&
        attention_->forward(q, k, v, scale, doc_offsets, out, lse, BufferScratch::workspace,
                            &scratch))
      return;
    cuda::launch_attention_forward_simple(q, k, v, scale, doc_offsets, out, lse, stream_);
  }
  void attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                          const Tensor& out, const Tensor& lse, float scale,
                          const Tensor& doc_offsets, const Tensor& dq, const Tensor& dk,
                          const Tensor& dv) override {
    PhaseScope scope(this, Phase::Attention);
    require_ops_stream("attention_backward");
    BufferScratch scratch;
    if (dout.shape == q.shape && dout.dtype == q.dtype && out.shape == q.shape &&
        dq.shape == q.shape && dq.dtype == q.dtype && dk.shape == k.shape && dk.dtype == k.dtype &&
        dv.shape == v.shape && dv.dtype == v.dtype && v.shape == k.shape &&
        lse.dtype == DType::F32 && lse.numel() == q.size(0) * q.size(1) * q.size(2) &&
        attention_->backward(dout, q, k, v, out, lse, scale, doc_offsets, dq, dk, dv,
                             BufferScratch::workspace, &scratch))
      return;
    cuda::launch_attention_backward_simple(dout, q, k, v, out, lse, scale, doc_offsets, dq, dk, dv,
                                           scratch, stream_);
  }

  void attention_cached_forward(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                int64_t past, float scale, const Tensor& out) override {
    PhaseScope scope(this, Phase::Attention);
    require_ops_stream("attention_cached_forward");
    cuda::launch_attention_cached_forward(q, k_cache, v_cache, past, scale, out, stream_);
  }

  void swiglu_forward(const Tensor& gate_up, const Tensor& out) override {
    PhaseScope scope(this, Phase::Experts);
    cuda::launch_swiglu_forward(gate_up, out, stream_);
  }
  void swiglu_backward(const Tensor& dout, const Tensor& gate_up, const Tensor& dgate_up) override {
    PhaseScope scope(this, Phase::Experts);
    cuda::launch_swiglu_backward(dout, gate_up, dgate_up, stream_);
  }

  void router_forward(const Tensor& logits, int top_k, bool normalize, const Tensor& probs,
                      const Tensor& topk_ids, const Tensor& topk_weights) override {
    PhaseScope scope(this, Phase::RouterDispatch);
    cuda::launch_router_forward(logits, top_k, normalize, probs, topk_ids, topk_weights, stream_);
  }
  void router_backward(const Tensor& dtopk_weights, const Tensor& probs, const Tensor& topk_ids,
                       bool normalize, const Tensor& aux_dprob, const Tensor& dlogits) override {
    PhaseScope scope(this, Phase::RouterDispatch);
    cuda::launch_router_backward(dtopk_weights, probs, topk_ids, normalize, aux_dprob, dlogits,
                                 stream_);
  }
  void router_aux_stats(const Tensor& probs, const Tensor& topk_ids, const Tensor& expert_counts,
                        const Tensor& prob_sums) override {
    PhaseScope scope(this, Phase::RouterDispatch);
    cuda::launch_router_aux_stats(probs, topk_ids, expert_counts, prob_sums, stream_);
  }
  void moe_sort_by_expert(const Tensor& topk_ids, int num_experts, const Tensor& expert_offsets,
                          const Tensor& sorted_slots, const Tensor& slot_rows) override {
    PhaseScope scope(this, Phase::RouterDispatch);
    BufferScratch scratch;
    cuda::launch_moe_sort(topk_ids, num_experts, expert_offsets, sorted_slots, slot_rows, scratch,
                          stream_);
  }
  void moe_gather(const Tensor& x, const Tensor& sorted_slots, int top_k,
                  const Tensor& out) override {
    PhaseScope scope(this, Phase::RouterDispatch);
    cuda::launch_moe_gather(x, sorted_slots, top_k, out, stream_);
  }
  void moe_gather_backward(const Tensor& dout, const Tensor& sorted_slots, int top_k,
                           const Tensor& dx) override {
    PhaseScope scope(this, Phase::RouterDispatch);
    BufferScratch scratch;
    cuda::launch_moe_gather_backward(dout, sorted_slots, top_k, dx, scratch, stream_);
  }
  void moe_combine(const Tensor& y, const Tensor& weights, const Tensor& slot_rows,
                   const Tensor& out) override {
    PhaseScope scope(this, Phase::RouterDispatch);
    cuda::launch_moe_combine(y, weights, slot_rows, out, stream_);
  }
  void moe_rank_ids(const Tensor& topk_ids, int64_t experts_per_rank,
                    const Tensor& rank_ids) override {
    PhaseScope scope(this, Phase::RouterDispatch);
    cuda::launch_moe_rank_ids(topk_ids, experts_per_rank, rank_ids, stream_);
  }
  void moe_local_ids(const Tensor& topk_ids, int64_t first_expert, int64_t local_experts,
                     const Tensor& local_ids) override {
    PhaseScope scope(this, Phase::RouterDispatch);
    cuda::launch_moe_local_ids(topk_ids, first_expert, local_experts, local_ids, stream_);
  }
  void moe_swiglu_backward(const Tensor& dh, const Tensor& gate_up, const Tensor& row_weights,
                           const Tensor& dgate_up, const Tensor& weighted_hidden,
                           const Tensor& drow_weights) override {
    PhaseScope scope(this, Phase::Experts);
    cuda::launch_moe_swiglu_backward(dh, gate_up, row_weights, dgate_up, weighted_hidden,
                                     drow_weights, stream_);
  }

  void grouped_gemm(const Tensor& a, const Tensor& w, bool transpose_w, const Tensor& offsets,
                    const Tensor& c) override {
    // 2 * rows * in * out (every row belongs to one expert)
    PhaseScope scope(this, Phase::Experts, GemmKind::Grouped,
                     2.0 * double(a.numel()) * double(c.rank() == 2 ? c.size(1) : 0));
    cuda::launch_grouped_gemm(a, w, transpose_w, offsets, c, stream_);
  }
  void grouped_gemm_weight_grad(const Tensor& dy, const Tensor& x, const Tensor& offsets,
                                const Tensor& dw, bool accumulate) override {
    // 2 * rows * P * Q
    PhaseScope scope(this, Phase::Experts, GemmKind::WeightGrad,
                     2.0 * double(dy.numel()) * double(dw.rank() == 3 ? dw.size(2) : 0));
    if (dw.dtype == DType::F32 && dy.dtype != DType::F32) {
      // fp32 gradients of bf16 experts (the trainer's bf16 weights): the kernels take one
      // dtype, so this micro-batch's dw is formed (fp32 accumulation) in a scratch of the
      // inputs' dtype, then added to (or, on the first micro-batch, copied into) the fp32
      // gradient.
      Buffer partial(dy.dtype, dw.shape, Device::CUDA);
      cuda::launch_grouped_gemm_weight_grad(dy, x, offsets, partial, /*accumulate=*/false, stream_);
      if (accumulate)
        cuda::launch_add(dw, dw, partial, stream_);
      else
        copy(dw, partial);
      return;
    }
    cuda::launch_grouped_gemm_weight_grad(dy, x, offsets, dw, accumulate, stream_);
  }

  void grouped_gemm_weight_grad_adamw(const Tensor& dy, const Tensor& x, const Tensor& offsets,
                                      const AdamWParam& param, const AdamWHyper& hyper,
                                      const Tensor& norm_squared) override {
    {
      // The GEMM and the update in one kernel: timed as an op of its own (not in the weight
      // grad's TFLOP/s, which would then count the update's memory time).
      PhaseScope scope(this, Phase::Experts);
      if (cuda::launch_grouped_gemm_weight_grad_adamw_sm90(dy, x, offsets, param, hyper,
                                                           norm_squared, stream_))
        return;
    }
    // Anything the fused kernel does not take (fp32, no CUTLASS, not Hopper): the ops apart.
    Backend::grouped_gemm_weight_grad_adamw(dy, x, offsets, param, hyper, norm_squared);
  }

  void linear_cross_entropy(const LinearCrossEntropyArgs& args) override {
    PhaseScope scope(this, Phase::Loss);
    const Tensor& hidden = args.hidden;
    const Tensor& weight = args.weight;
    cuda::check_float(hidden, "linear_cross_entropy hidden");
    cuda::check_i32(args.labels, "linear_cross_entropy labels");
    cuda::check_f32(args.loss_sum, "linear_cross_entropy loss_sum");
    if (hidden.rank() != 2 || weight.rank() != 2 || weight.size(1) != hidden.size(1) ||
        args.labels.numel() != hidden.size(0) || weight.dtype != hidden.dtype)
      fail("linear_cross_entropy: hidden ", hidden.shape.str(), " weight ", weight.shape.str(),
           " labels ", args.labels.shape.str(), " do not fit (N, H), (V, H), (N)");
    const int64_t tokens = hidden.size(0), vocab = weight.size(0);
    const bool backward = args.grad_scale != 0.0f;
    if (backward &&
        (args.grad_hidden.shape != hidden.shape || args.grad_weight.shape != weight.shape))
      fail("linear_cross_entropy: grad_hidden ", args.grad_hidden.shape.str(), " grad_weight ",
           args.grad_weight.shape.str(), " must match hidden and weight");
    if (cuda::present(args.logits) && args.logits.numel() != tokens * vocab)
      fail("linear_cross_entropy: logits ", args.logits.shape.str(), " must be (N, V)");
    if (tokens == 0) {
      if (backward && !args.accumulate_grad_weight && args.grad_weight.numel())
        MOETUNE_CUDA_CHECK(
            cudaMemsetAsync(args.grad_weight.data, 0, args.grad_weight.bytes(), stream_));
      return;
    }
    // Chunk of rows whose logits take at most ~640 MB (bf16: 2048 rows at a 151,936 vocab).
    const int64_t row_bytes = vocab * static_cast<int64_t>(dtype_size(hidden.dtype));
    const int64_t chunk =
        std::max<int64_t>(1, std::min<int64_t>(tokens, (int64_t(640) << 20) / row_bytes));
    Buffer logits(hidden.dtype, Shape{chunk, vocab}, Device::CUDA);
    // The first chunk overwrites grad_weight unless accumulating (beta 0: not read).
    float grad_weight_beta = args.accumulate_grad_weight ? 1.0f : 0.0f;
    for (int64_t start = 0; start < tokens; start += chunk) {
      const int64_t end = std::min(tokens, start + chunk);
      const Tensor h = hidden.slice_rows(start, end);
      const Tensor l = logits.tensor().slice_rows(0, end - start);
      gemm_impl(h, false, weight, true, l, 1.0f, 0.0f);
      Tensor logits_out;
      if (cuda::present(args.logits))
        logits_out = args.logits.view(Shape{tokens, vocab}).slice_rows(start, end);
      cuda::launch_cross_entropy_chunk(l, args.labels.view(Shape{tokens}).slice_rows(start, end),
                                       args.grad_scale, args.loss_sum, args.correct, logits_out,
                                       stream_);
      if (!backward) continue;
      gemm_impl(l, false, weight, false, args.grad_hidden.slice_rows(start, end), 1.0f, 0.0f);
      gemm_impl(l, true, h, false, args.grad_weight, 1.0f, grad_weight_beta);
      grad_weight_beta = 1.0f;
    }
  }

  void grad_norm_squared(std::span<const Tensor> grads, const Tensor& out) override {
    PhaseScope scope(this, Phase::Optimizer);
    BufferScratch scratch;
    cuda::launch_grad_norm_squared(grads, out, scratch, stream_);
  }
  void adamw_update(std::span<const AdamWParam> params, const AdamWHyper& hyper,
                    float grad_scale) override {
    PhaseScope scope(this, Phase::Optimizer);
    BufferScratch scratch;
    // On a side stream sharing the SMs: short blocks (adamw.cu), so the ops' kernels are not
    // locked out; on one with its own SMs: the long-lived blocks that fill them.
    cuda::launch_adamw(params, hyper, grad_scale, scratch, stream_,
                       /*block_per_chunk_grid=*/stream_ != ops_stream_ && !stream_owns_sms_);
  }

 private:
  static constexpr int64_t kWorkspaceBytes = 64ll << 20;

  enum class GemmKind { None, Grouped, WeightGrad };  // grouped GEMMs timed on their own
  struct Mark {
    Phase phase;
    cudaEvent_t start, stop;
    GemmKind gemm = GemmKind::None;
    double flops = 0;
    const char* op = "";  // the op's name (a string literal: __builtin_FUNCTION)
    bool side = false;    // enqueued on a side stream
  };
  // Records the op's start and stop on the stream it runs on while profiling; nested ops
  // (an op calling another, e.g. copy() inside grouped_gemm_weight_grad) count once, under
  // the outermost op's phase and name. `op` defaults to the calling member's name.
  class PhaseScope {
   public:
    PhaseScope(CudaBackend* backend, Phase phase, GemmKind gemm = GemmKind::None, double flops = 0,
               const char* op = __builtin_FUNCTION())
        : backend_(backend) {
      if (!backend->profiling_ || backend->depth_++ > 0) return;
      active_ = true;
      mark_.phase = phase;
      mark_.gemm = gemm;
      mark_.flops = flops;
      mark_.op = op;
      mark_.side = backend->stream_ != backend->ops_stream_;
      stream_ = backend->stream_;
      mark_.start = cuda::create_event_for(backend->stream_, cudaEventDefault);
      mark_.stop = cuda::create_event_for(backend->stream_, cudaEventDefault);
      cudaEventRecord(mark_.start, stream_);
    }
    ~PhaseScope() {
      if (!backend_->profiling_) return;
      --backend_->depth_;
      if (!active_) return;
      cudaEventRecord(mark_.stop, stream_);
      backend_->marks_.push_back(mark_);
    }

   private:
    CudaBackend* backend_;
    cudaStream_t stream_ = nullptr;
    bool active_ = false;
    Mark mark_{};
  };

  // Ops that share the cuBLASLt workspace or cuDNN's stream run on the ops' stream only.
  void require_ops_stream(const char* op) const {
    if (stream_ != ops_stream_)
      fail(op,
           ": not supported on a side stream (SideStream::begin_ops runs self-contained ops "
           "only)");
  }

  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
    void destroy() {
      if (desc) cublasLtMatmulDescDestroy(desc);
      if (a) cublasLtMatrixLayoutDestroy(a);
      if (b) cublasLtMatrixLayoutDestroy(b);
      if (c) cublasLtMatrixLayoutDestroy(c);
    }
  };
  // (m, n, k, transposes, dtypes, beta != 0, alignment, SM target: 0 = the whole device)
  using PlanKey = std::tuple<int64_t, int64_t, int64_t, bool, bool, int, int, bool, int, int>;

  // Row-major C (m, n) = op(A) op(B) is column-major C^T (n, m) = op(B)^T op(A)^T: cuBLASLt
  // gets b as its first operand and a as its second, each as the column-major view of its
  // row-major storage.
  void gemm_impl(const Tensor& a, bool transpose_a, const Tensor& b, bool transpose_b,
                 const Tensor& c, float alpha, float beta) {
    require_ops_stream("gemm");
    if (a.rank() != 2 || b.rank() != 2 || c.rank() != 2)
      fail("gemm: a ", a.shape.str(), " b ", b.shape.str(), " c ", c.shape.str(), " must be 2-D");
    const int64_t m = transpose_a ? a.size(1) : a.size(0), k = transpose_a ? a.size(0) : a.size(1);
    const int64_t n = transpose_b ? b.size(0) : b.size(1), kb = transpose_b ? b.size(1) : b.size(0);
    if (k != kb || c.size(0) != m || c.size(1) != n)
      fail("gemm: op(a) ", m, "x", k, " @ op(b) ", kb, "x", n, " -> c ", c.shape.str(),
           " do not fit");
    if (a.dtype != b.dtype || (c.dtype != a.dtype && c.dtype != DType::F32))
      fail("gemm: dtypes a ", dtype_name(a.dtype), " b ", dtype_name(b.dtype), " c ",
           dtype_name(c.dtype), " (a and b must match; c matches them or is F32)");
    if (m == 0 || n == 0) return;
    if (k == 0) {
      if (beta == 0.0f)
        MOETUNE_CUDA_CHECK(cudaMemsetAsync(c.data, 0, c.bytes(), stream_));
      else if (beta != 1.0f)
        fail("gemm: k == 0 with beta ", beta, " is not supported");
      return;
    }
    const int align = std::min({alignment_of(a.data), alignment_of(b.data), alignment_of(c.data)});
    // A stream with an SM budget (an optimizer partition beside it): cuBLASLt sizes its grid
    // to the budget, so its kernels do not wait for the partition's SMs.
    const int sms = cuda::stream_sm_count(stream_);
    const int sm_target = sms < device_sms_ ? sms : 0;
    const PlanKey key{
        m,     n,        k, transpose_a, transpose_b, int(a.dtype), int(c.dtype), beta != 0.0f,
        align, sm_target};
    auto found = plans_.find(key);
    if (found == plans_.end())
      found = plans_
                  .emplace(key, make_plan(a, transpose_a, b, transpose_b, c, m, n, k, beta, align,
                                          sm_target))
                  .first;
    const Plan& plan = found->second;
    MOETUNE_CUBLAS_CHECK(cublasLtMatmul(lt_, plan.desc, &alpha, b.data, plan.a, a.data, plan.b,
                                        &beta, c.data, plan.c, c.data, plan.c, &plan.algo,
                                        workspace_.data(), kWorkspaceBytes, stream_));
  }

  Plan make_plan(const Tensor& a, bool transpose_a, const Tensor& b, bool transpose_b,
                 const Tensor& c, int64_t m, int64_t n, int64_t k, float beta, int align,
                 int sm_target) {
    Plan plan;
    const cudaDataType_t ab_type = cuda_type(a.dtype, "gemm"), c_type = cuda_type(c.dtype, "gemm");
    MOETUNE_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    if (sm_target > 0)
      MOETUNE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(
          plan.desc, CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, &sm_target, sizeof(sm_target)));
    const cublasOperation_t op_first = transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_second = transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    MOETUNE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA,
                                                        &op_first, sizeof(op_first)));
    MOETUNE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB,
                                                        &op_second, sizeof(op_second)));
    MOETUNE_CUBLAS_CHECK(
        cublasLtMatrixLayoutCreate(&plan.a, ab_type, b.size(1), b.size(0), b.size(1)));
    MOETUNE_CUBLAS_CHECK(
        cublasLtMatrixLayoutCreate(&plan.b, ab_type, a.size(1), a.size(0), a.size(1)));
    MOETUNE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.c, c_type, n, m, n));
    cublasLtMatmulPreference_t preference;
    MOETUNE_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference));
    const uint64_t workspace = kWorkspaceBytes;
    const uint32_t alignment = static_cast<uint32_t>(align);
    cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                         &workspace, sizeof(workspace));
    for (auto attribute :
         {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
          CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
      cublasLtMatmulPreferenceSetAttribute(preference, attribute, &alignment, sizeof(alignment));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
        lt_, plan.desc, plan.a, plan.b, plan.c, plan.c, preference, 1, &result, &found);
    cublasLtMatmulPreferenceDestroy(preference);
    if (status != CUBLAS_STATUS_SUCCESS || found == 0) {
      plan.destroy();
      fail("gemm: cuBLASLt has no algorithm for ", m, "x", n, "x", k, " (", dtype_name(a.dtype),
           " -> ", dtype_name(c.dtype), ", transpose ", transpose_a, "/", transpose_b, ", beta ",
           beta, ")");
    }
    plan.algo = result.algo;
    return plan;
  }

  int device_index_;
  int device_sms_ = 0;
  cudaStream_t ops_stream_ = nullptr;  // the backend's own stream
  cudaStream_t stream_ = nullptr;      // where ops enqueue now: ops_stream_ or a side stream
  bool stream_owns_sms_ = false;       // stream_ is a side stream with its own SMs
  int ops_priority_ = 0, least_priority_ = 0, greatest_priority_ = 0;
  cublasLtHandle_t lt_ = nullptr;
  Buffer workspace_;
  std::unique_ptr<cuda::CudnnAttention> attention_;
  std::map<PlanKey, Plan> plans_;
  bool profiling_ = false;
  int depth_ = 0;
  std::vector<Mark> marks_;

  friend class CudaSideStream;
  friend void cuda::begin_phase_profile(Backend&);
  friend cuda::PhaseTimes cuda::end_phase_profile(Backend&);
};

void CudaSideStream::begin_ops() {
  MOETUNE_CHECK(!in_ops_ && backend_->stream_ == backend_->ops_stream_,
                "SideStream::begin_ops: ops already run on a side stream");
  wait_for_ops();
  backend_->stream_ = stream_;
  backend_->stream_owns_sms_ = partition_ != nullptr;
  // Until join(): the ops' persistent kernels leave the partition's SMs to this work.
  if (partition_) cuda::set_stream_sm_budget(ops_, partition_->rest_sms);
  cuda::set_side_allocation_stream(stream_);
  in_ops_ = true;
}

void CudaSideStream::end_ops() {
  if (!in_ops_) return;
  backend_->stream_ = backend_->ops_stream_;
  backend_->stream_owns_sms_ = false;
  cuda::set_side_allocation_stream(nullptr);
  in_ops_ = false;
}

}  // namespace

namespace cuda {
void begin_phase_profile(Backend& backend) {
  auto* cuda_backend = dynamic_cast<CudaBackend*>(&backend);
  if (!cuda_backend) fail("phase profiling needs the CUDA backend");
  cuda_backend->begin_profile();
}
PhaseTimes end_phase_profile(Backend& backend) {
  auto* cuda_backend = dynamic_cast<CudaBackend*>(&backend);
  if (!cuda_backend) fail("phase profiling needs the CUDA backend");
  return cuda_backend->end_profile();
}
}  // namespace cuda

std::unique_ptr<Backend> make_cuda_backend(int device_index) {
  return std::make_unique<CudaBackend>(device_index);
}

}  // namespace moetune
