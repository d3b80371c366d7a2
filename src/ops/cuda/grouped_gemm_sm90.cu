// Hopper grouped GEMMs for the expert phase (bf16 operands, fp32 accumulation) through
// CUTLASS 3.x "grouped" kernels: TMA loads into 128B-swizzled shared memory, a multistage
// mbarrier pipeline fed by a producer warp, and two consumer warpgroups issuing wgmma on
// alternate tiles ("pingpong": one warpgroup's epilogue overlaps the other's mainloop), on a
// persistent grid whose tile scheduler walks all experts' tiles on the device. Tiles: 64 x 256
// (x 64) for the row-grouped forward and data grad, whose M (an expert's rows) ends in a
// partial tile: half the rows of a 128-row tile are wasted on average there, and with real
// routing's uneven experts 64 x 256 measured 10% faster than 128 x 128 (10.23 -> 9.18 ms per
// step at micro batch 1, 35.5 -> 34.0 at 4; with balanced routing, 256 rows per expert, 3-4%
// slower: bench/results/grouped_tile_ab.jsonl). The weight grad (M, N fixed, K = an expert's
// rows) uses 128 x 256 tiles with the "cooperative" schedule (both consumer warpgroups on one
// tile): 7.12 -> 6.99 ms per step real routing and 7.75 -> 6.80 balanced at micro batch 1,
// 19.23 -> 18.81 real at 4, 16.43 -> 17.06 balanced at 4 (bench/results/wgrad_tile_ab.jsonl).
//
// The expert offsets never come to the host: a small kernel (one thread per expert) turns
// offsets [E+1] into CUTLASS's per-group arrays (problem shape, A/B/C/D pointers, strides)
// in a stream-ordered scratch buffer, and the GEMM kernel reads them there; it rewrites its
// TMA descriptors per group on the device (tensormap.replace), so rows past an expert's end
// read as zeros and stores stop at its last row. Three instantiations:
//   forward     c[R_e] = a[R_e] @ w[e]^T    A row-major (rows, K), B = w[e] (N, K) k-major
//   data grad   c[R_e] = a[R_e] @ w[e]      A row-major (rows, K), B = w[e] (K, N) n-major
//   weight grad dw[e] += dy[R_e]^T @ x[R_e] A = dy^T (P, rows_e) m-major, B = x (rows_e, Q)
//               n-major, K = rows of e; epilogue D = acc + beta * C with C = D = dw[e] (bf16,
//               like the WMMA path); experts without rows get M = 0 (no tiles: dw[e] += 0).
//               beta 0 (overwrite, accumulate false) is a run-time value: LinearCombination's
//               is_C_load_needed() is false when beta == 0 (Sm90ScalarBroadcastPtrArray::
//               is_zero), so the epilogue never loads C; the caller zeroes empty experts.
// Built only with CUTLASS headers (scripts/setup.sh: pinned nvidia-cutlass wheel) and an
// sm_90a target; otherwise the launchers return false and grouped_gemm.cu's WMMA kernels run.
#include "ops/cuda/device_utils.cuh"
#include "ops/cuda/grouped_gemm_sm90.h"
#include "ops/cuda/sm_partition.h"

#if defined(MOETUNE_HAS_CUTLASS_SM90)

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "ops/cuda/expert_adamw_epilogue_sm90.cuh"

namespace moetune::cuda {

namespace {

using cute::_0;
using cute::_1;
using Element = cutlass::bfloat16_t;
using ProblemShape =
    cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M, N, K) per group
constexpr int kAlignment = 8;                                      // elements: 16 bytes

// Shared memory the epilogue keeps, which the mainloop's stage count leaves free (a variable
// template: spelled inline as a sizeof, nvcc's host pass drops a `typename` that gcc needs).
template <class Epilogue>
constexpr int kEpilogueSmemBytes = static_cast<int>(sizeof(typename Epilogue::SharedStorage));

// One CUTLASS grouped GEMM type for the given operand layouts (CUTLASS's A is (M, K), B is
// (N, K); RowMajor A / ColumnMajor B are k-major). Output is always row-major (M, N).
template <class LayoutA, class LayoutB, int TileM, int TileN, bool Cooperative = false>
struct GroupedGemm {
  using TileShape = cute::Shape<cute::Int<TileM>, cute::Int<TileN>, cute::_64>;
  using ClusterShape = cute::Shape<_1, _1, _1>;
  using KernelSchedule =
      std::conditional_t<Cooperative, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative,
                         cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong>;
  using EpilogueSchedule =
      std::conditional_t<Cooperative, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
                         cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong>;
  using LayoutC = cutlass::layout::RowMajor;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, LayoutC*, kAlignment,
      Element, LayoutC*, kAlignment, EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<Element, float>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment, Element,
      LayoutB*, kAlignment, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<kEpilogueSmemBytes<Epilogue>>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideC = typename Kernel::InternalStrideC;
  using StrideD = typename Kernel::InternalStrideD;
};

using ForwardGemm = GroupedGemm<cutlass::layout::RowMajor, cutlass::layout::ColumnMajor, 64, 256>;
using DataGradGemm = GroupedGemm<cutlass::layout::RowMajor, cutlass::layout::RowMajor, 64, 256>;
using WeightGradGemm =
    GroupedGemm<cutlass::layout::ColumnMajor, cutlass::layout::RowMajor, 128, 256, true>;

// The weight grad with AdamW in its epilogue (expert_adamw_epilogue_sm90.cuh): the same operands
// as WeightGradGemm, the pingpong schedule so that one warpgroup's memory-bound update runs
// beside the other's mainloop.
struct WeightGradAdamWGemm {
  using TileShape = cute::Shape<cute::_64, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<_1, _1, _1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
      ExpertAdamWEpilogue<cutlass::epilogue::PtrArrayNoSmemWarpSpecialized>>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::ColumnMajor*,
      kAlignment, Element, cutlass::layout::RowMajor*, kAlignment, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<kEpilogueSmemBytes<Epilogue>>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideC = typename Kernel::InternalStrideC;
  using StrideD = typename Kernel::InternalStrideD;
  static constexpr int kTileM = 64, kTileN = 128;
  static constexpr int kWarps = decltype(cute::size(typename Kernel::TiledMma{}))::value / 32;
};

// Where group e's operands start, in elements: a + begin * a_row, b + e * b_expert + begin *
// b_row, c + e * c_expert + begin * c_row (begin = offsets[e]). Row-grouped GEMMs have
// M = rows of e and fixed N, K; the K-grouped weight gradient has fixed M, N and K = rows of e.
struct GroupPlan {
  const int32_t* offsets;
  int experts;
  bool k_grouped;
  int m, n, k;  // the fixed dims (m for k_grouped, k otherwise)
  const bf16* a;
  int64_t a_row;
  const bf16* b;
  int64_t b_row, b_expert;
  bf16* c;
  int64_t c_row, c_expert;
};

// The K-grouped weight gradient's plan: dw[e] (P, Q) from dy[R_e] (rows, P) and x[R_e] (rows, Q).
GroupPlan weight_grad_plan(const Tensor& dy, const Tensor& x, const Tensor& offsets, bf16* dw,
                           int64_t experts, int64_t p, int64_t q) {
  GroupPlan plan{};
  plan.offsets = offsets.ptr<int32_t>();
  plan.experts = static_cast<int>(experts);
  plan.k_grouped = true;
  plan.m = static_cast<int>(p);
  plan.n = static_cast<int>(q);
  plan.a = dy.ptr<bf16>();
  plan.a_row = p;
  plan.b = x.ptr<bf16>();
  plan.b_row = q;
  plan.c = dw;
  plan.c_expert = p * q;
  return plan;
}

// The per-group arrays CUTLASS reads, carved out of one scratch buffer.
template <class G>
struct GroupArrays {
  ProblemShape::UnderlyingProblemShape* problems;
  const Element** a;
  const Element** b;
  const Element** c;
  Element** d;
  typename G::StrideA* stride_a;
  typename G::StrideB* stride_b;
  typename G::StrideC* stride_c;
  typename G::StrideD* stride_d;
};

template <class G>
__global__ void build_groups_kernel(GroupPlan plan, GroupArrays<G> out,
                                    typename G::StrideA stride_a, typename G::StrideB stride_b,
                                    typename G::StrideC stride_c) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= plan.experts) return;
  const int begin = plan.offsets[e], rows = plan.offsets[e + 1] - begin;
  // Experts without rows get no tiles (M = 0): nothing is read or written for them.
  if (plan.k_grouped)
    out.problems[e] = cute::make_shape(rows > 0 ? plan.m : 0, plan.n, rows);
  else
    out.problems[e] = cute::make_shape(rows, plan.n, plan.k);
  const bf16* a = plan.a + int64_t(begin) * plan.a_row;
  const bf16* b = plan.b + int64_t(e) * plan.b_expert + int64_t(begin) * plan.b_row;
  bf16* c = plan.c + int64_t(e) * plan.c_expert + int64_t(begin) * plan.c_row;
  out.a[e] = reinterpret_cast<const Element*>(a);
  out.b[e] = reinterpret_cast<const Element*>(b);
  out.c[e] = reinterpret_cast<const Element*>(c);
  out.d[e] = reinterpret_cast<Element*>(c);
  out.stride_a[e] = stride_a;
  out.stride_b[e] = stride_b;
  out.stride_c[e] = stride_c;
  out.stride_d[e] = stride_c;
}

// Bump allocator over one byte range (256-byte aligned pieces).
struct Carver {
  char* base;
  size_t used = 0;
  template <class T>
  T* take(size_t count) {
    T* pointer = reinterpret_cast<T*>(base ? base + used : nullptr);
    used += (count * sizeof(T) + 255) / 256 * 256;
    return pointer;
  }
};

template <class G>
GroupArrays<G> carve(Carver& carver, int experts) {
  GroupArrays<G> arrays{};
  arrays.problems = carver.take<ProblemShape::UnderlyingProblemShape>(experts);
  arrays.a = carver.take<const Element*>(experts);
  arrays.b = carver.take<const Element*>(experts);
  arrays.c = carver.take<const Element*>(experts);
  arrays.d = carver.take<Element*>(experts);
  arrays.stride_a = carver.take<typename G::StrideA>(experts);
  arrays.stride_b = carver.take<typename G::StrideB>(experts);
  arrays.stride_c = carver.take<typename G::StrideC>(experts);
  arrays.stride_d = carver.take<typename G::StrideD>(experts);
  return arrays;
}

// sm_90 device (the kernels are built for sm_90a only) and the SMs the persistent grid may
// take on `stream` (sm_partition.h: its green context's or its budget, else the device's).
bool hopper_device(cudaStream_t stream, int& device, int& sms) {
  int major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (major != 9 || minor != 0) return false;
  sms = stream_sm_count(stream);
  return true;
}

bool aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

// The K-grouped weight gradient's operands as its kernels take them: bf16 dy (rows, P), x
// (rows, Q), dw (E, P, Q), I32 offsets (E + 1); P, Q multiples of 8, 16-byte aligned, int32 sizes.
bool weight_grad_operands_fit(const Tensor& dy, const Tensor& x, const Tensor& offsets,
                              const Tensor& dw) {
  if (dy.dtype != DType::BF16 || x.dtype != DType::BF16 || dw.dtype != DType::BF16 ||
      offsets.dtype != DType::I32)
    return false;
  if (dy.rank() != 2 || x.rank() != 2 || dw.rank() != 3 || offsets.rank() != 1) return false;
  const int64_t experts = dw.size(0), p = dw.size(1), q = dw.size(2), rows = dy.size(0);
  if (dy.size(1) != p || x.size(1) != q || x.size(0) != rows || offsets.numel() != experts + 1)
    return false;
  if (experts == 0 || p == 0 || q == 0) return false;
  if (p % kAlignment || q % kAlignment || !aligned16(dy.data) || !aligned16(x.data) ||
      !aligned16(dw.data))
    return false;
  return rows <= INT32_MAX && p <= INT32_MAX && q <= INT32_MAX && experts <= INT32_MAX;
}

// D = alpha * acc + beta * C (LinearCombination) over the group arrays' C and D.
template <class G>
auto linear_combination(float beta) {
  return [beta](const GroupArrays<G>& arrays) {
    typename G::Kernel::EpilogueArguments epilogue{
        {}, arrays.c, arrays.stride_c, arrays.d, arrays.stride_d};
    epilogue.thread.alpha = 1.0f;
    epilogue.thread.beta = beta;
    return epilogue;
  };
}

// make_epilogue(arrays) gives the epilogue's arguments (CollectiveEpilogue::Arguments).
template <class G, class MakeEpilogue>
void run_grouped(const GroupPlan& plan, typename G::StrideA stride_a, typename G::StrideB stride_b,
                 typename G::StrideC stride_c, const MakeEpilogue& make_epilogue, int device,
                 int sms, cudaStream_t stream) {
  using Gemm = typename G::Gemm;
  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = device;
  hw_info.sm_count = sms;

  // Sizes first (null base), then one buffer for the group arrays and CUTLASS's workspace
  // (its per-SM TMA descriptors).
  Carver sizing{nullptr};
  carve<G>(sizing, plan.experts);
  typename Gemm::Arguments arguments;
  auto make_arguments = [&](const GroupArrays<G>& arrays) {
    return typename Gemm::Arguments{cutlass::gemm::GemmUniversalMode::kGrouped,
                                    {plan.experts, arrays.problems, nullptr},
                                    {arrays.a, arrays.stride_a, arrays.b, arrays.stride_b},
                                    make_epilogue(arrays),
                                    hw_info};
  };
  const size_t workspace_bytes = Gemm::get_workspace_size(make_arguments(GroupArrays<G>{}));
  Buffer scratch(DType::U8, Shape{static_cast<int64_t>(sizing.used + workspace_bytes + 256)},
                 Device::CUDA);
  Carver carver{static_cast<char*>(scratch.data())};
  const GroupArrays<G> arrays = carve<G>(carver, plan.experts);
  void* workspace = static_cast<char*>(scratch.data()) + carver.used;

  build_groups_kernel<G><<<static_cast<unsigned>(ceil_div(plan.experts, 128)), 128, 0, stream>>>(
      plan, arrays, stride_a, stride_b, stride_c);
  MOETUNE_CUDA_LAUNCH_CHECK();

  arguments = make_arguments(arrays);
  Gemm gemm;
  cutlass::Status status = gemm.can_implement(arguments);
  if (status == cutlass::Status::kSuccess) status = gemm.initialize(arguments, workspace, stream);
  if (status == cutlass::Status::kSuccess) status = gemm.run(stream);
  if (status != cutlass::Status::kSuccess)
    fail("grouped GEMM (sm90): CUTLASS ", cutlassGetStatusString(status));
  MOETUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace

bool launch_grouped_gemm_sm90(const Tensor& a, const Tensor& w, bool transpose_w,
                              const Tensor& offsets, const Tensor& c, cudaStream_t stream) {
  if (a.dtype != DType::BF16 || w.dtype != DType::BF16 || c.dtype != DType::BF16 ||
      offsets.dtype != DType::I32)
    return false;
  if (a.rank() != 2 || w.rank() != 3 || c.rank() != 2 || offsets.rank() != 1) return false;
  const int64_t experts = w.size(0), p = w.size(1), q = w.size(2), rows = a.size(0);
  const int64_t k = transpose_w ? q : p, n = transpose_w ? p : q;
  if (a.size(1) != k || c.size(0) != rows || c.size(1) != n || offsets.numel() != experts + 1)
    return false;
  if (experts == 0 || rows == 0 || n == 0 || k == 0) return false;
  if (k % kAlignment || n % kAlignment || !aligned16(a.data) || !aligned16(w.data) ||
      !aligned16(c.data))
    return false;
  if (rows > INT32_MAX || n > INT32_MAX || k > INT32_MAX || experts > INT32_MAX) return false;
  int device = 0, sms = 0;
  if (!hopper_device(stream, device, sms)) return false;

  GroupPlan plan{};
  plan.offsets = offsets.ptr<int32_t>();
  plan.experts = static_cast<int>(experts);
  plan.k_grouped = false;
  plan.n = static_cast<int>(n);
  plan.k = static_cast<int>(k);
  plan.a = a.ptr<bf16>();
  plan.a_row = k;
  plan.b = w.ptr<bf16>();
  plan.b_expert = p * q;
  plan.c = c.ptr<bf16>();
  plan.c_row = n;
  // Strides (CUTLASS modes: A (M, K), B (N, K), C (M, N)); the one dynamic entry is the leading
  // dim.
  if (transpose_w) {
    using G = ForwardGemm;
    run_grouped<G>(plan, typename G::StrideA{k, _1{}, _0{}}, typename G::StrideB{k, _1{}, _0{}},
                   typename G::StrideC{n, _1{}, _0{}}, linear_combination<G>(0.0f), device, sms,
                   stream);
  } else {
    using G = DataGradGemm;
    run_grouped<G>(plan, typename G::StrideA{k, _1{}, _0{}}, typename G::StrideB{_1{}, n, _0{}},
                   typename G::StrideC{n, _1{}, _0{}}, linear_combination<G>(0.0f), device, sms,
                   stream);
  }
  return true;
}

bool launch_grouped_gemm_weight_grad_sm90(const Tensor& dy, const Tensor& x, const Tensor& offsets,
                                          const Tensor& dw, cudaStream_t stream, bool accumulate) {
  if (!weight_grad_operands_fit(dy, x, offsets, dw)) return false;
  const int64_t experts = dw.size(0), p = dw.size(1), q = dw.size(2), rows = dy.size(0);
  int device = 0, sms = 0;
  if (!hopper_device(stream, device, sms)) return false;
  if (rows == 0) return true;  // every expert is empty: dw += 0 (the caller zeroes them)

  const GroupPlan plan = weight_grad_plan(dy, x, offsets, dw.ptr<bf16>(), experts, p, q);
  using G = WeightGradGemm;
  run_grouped<G>(plan, typename G::StrideA{_1{}, p, _0{}}, typename G::StrideB{_1{}, q, _0{}},
                 typename G::StrideC{q, _1{}, _0{}},
                 linear_combination<G>(accumulate ? 1.0f : 0.0f), device, sms, stream);
  return true;
}

namespace {

// Experts without rows (no GEMM tiles): AdamW with a zero gradient, pairs of elements as in
// the epilogue (the moments decay and the weight still moves). Block (x, e) strides over
// expert e's elements; experts with rows return at once.
template <bool kMaster, class State>
__global__ void adamw_experts_without_rows_kernel(ExpertAdamWTarget t, const int32_t* offsets) {
  const int expert = blockIdx.y;
  if (offsets[expert + 1] > offsets[expert]) return;
  const int64_t count = int64_t(t.rows) * t.cols;
  const int64_t begin = int64_t(expert) * count;
  State* exp_avg = static_cast<State*>(t.exp_avg) + begin;
  State* exp_avg_sq = static_cast<State*>(t.exp_avg_sq) + begin;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 2; i < count;
       i += int64_t(gridDim.x) * blockDim.x * 2) {
    float p[2], m[2], v[2];
    for (int j = 0; j < 2; ++j) {
      p[j] = kMaster ? t.master[begin + i + j] : to_float(t.param[begin + i + j]);
      m[j] = to_float(exp_avg[i + j]);
      v[j] = to_float(exp_avg_sq[i + j]);
      adamw_element(p[j], m[j], v[j], 0.0f, t.scalars, t.decays, t.decay);
      exp_avg[i + j] = from_float<State>(m[j]);
      exp_avg_sq[i + j] = from_float<State>(v[j]);
      if constexpr (kMaster) t.master[begin + i + j] = p[j];
      t.param[begin + i + j] = __float2bfloat16_rn(p[j]);
    }
  }
}

// The gradient's sum of squares from the epilogue's per-(tile, warp) partials of the experts
// with rows (the others' slots were not written), in a fixed order: one block.
__global__ void sum_expert_partials_kernel(const float* partials, const int32_t* offsets,
                                           int64_t per_expert, int experts, float* out) {
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < per_expert * experts; i += blockDim.x) {
    const int64_t expert = i / per_expert;
    if (offsets[expert + 1] > offsets[expert]) sum += partials[i];
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) *out = sum;
}

template <bool kMaster, class State>
void launch_experts_without_rows(const ExpertAdamWTarget& target, const int32_t* offsets,
                                 int experts, cudaStream_t stream) {
  const int64_t count = int64_t(target.rows) * target.cols;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(count, 512), 32)),
                  static_cast<unsigned>(experts));
  adamw_experts_without_rows_kernel<kMaster, State><<<grid, 256, 0, stream>>>(target, offsets);
  MOETUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace

bool launch_grouped_gemm_weight_grad_adamw_sm90(const Tensor& dy, const Tensor& x,
                                                const Tensor& offsets, const AdamWParam& param,
                                                const AdamWHyper& hyper, const Tensor& norm_squared,
                                                cudaStream_t stream, bool prefetch) {
  const Tensor& w = param.param;
  // The gradient the separate path steps from is the GEMM's output rounded to bf16 whether
  // it is kept in bf16 or fp32 (CudaBackend::grouped_gemm_weight_grad forms an fp32 gradient
  // of bf16 inputs in a bf16 scratch): the epilogue rounds its accumulators the same way.
  if ((param.grad.dtype != DType::BF16 && param.grad.dtype != DType::F32) ||
      !weight_grad_operands_fit(dy, x, offsets, w))
    return false;
  const int64_t experts = w.size(0), p = w.size(1), q = w.size(2), rows = dy.size(0);
  const DType state = param.exp_avg.dtype;
  const bool master = param.master.data != nullptr && param.master.numel() > 0;
  if ((state != DType::BF16 && state != DType::F32) || param.exp_avg_sq.dtype != state ||
      param.exp_avg.numel() != w.numel() || param.exp_avg_sq.numel() != w.numel() ||
      (master && (param.master.dtype != DType::F32 || param.master.numel() != w.numel())))
    return false;
  if (!aligned16(param.exp_avg.data) || !aligned16(param.exp_avg_sq.data) ||
      (master && !aligned16(param.master.data)))
    return false;
  if (p * q > INT32_MAX) return false;  // the epilogue's element offsets within an expert
  if (hyper.step < 1) return false;     // the separate path reports it
  int device = 0, sms = 0;
  if (!hopper_device(stream, device, sms)) return false;

  using G = WeightGradAdamWGemm;
  ExpertAdamWTarget target{};
  target.param = w.ptr<bf16>();
  target.exp_avg = param.exp_avg.data;
  target.exp_avg_sq = param.exp_avg_sq.data;
  target.master = master ? param.master.ptr<float>() : nullptr;
  target.state_f32 = state == DType::F32;
  target.rows = static_cast<int>(p);
  target.cols = static_cast<int>(q);
  target.scalars = make_adamw_scalars(hyper, 1.0f);
  target.decays = param.weight_decay != 0.0f;
  target.decay = adamw_decay(hyper, param.weight_decay);
  target.tiles_m = static_cast<int>(ceil_div(p, int64_t(G::kTileM)));
  target.tiles_n = static_cast<int>(ceil_div(q, int64_t(G::kTileN)));
  target.prefetch = prefetch;
  const int64_t partials_per_expert = int64_t(target.tiles_m) * target.tiles_n * G::kWarps;
  Buffer partials;
  if (norm_squared.data != nullptr) {
    if (norm_squared.dtype != DType::F32 || norm_squared.numel() != 1)
      fail("grouped_gemm_weight_grad_adamw: norm_squared must be (1) fp32, got ",
           norm_squared.shape.str());
    partials = Buffer::uninitialized(DType::F32, {partials_per_expert * experts}, Device::CUDA);
    target.norm_partials = partials.ptr<float>();
  }

  if (rows > 0) {
    // C: the weight (this epilogue reads and writes it itself, not through C/D).
    const GroupPlan plan = weight_grad_plan(dy, x, offsets, w.ptr<bf16>(), experts, p, q);
    run_grouped<G>(
        plan, typename G::StrideA{_1{}, p, _0{}}, typename G::StrideB{_1{}, q, _0{}},
        typename G::StrideC{q, _1{}, _0{}},
        [&](const GroupArrays<G>&) { return typename G::Kernel::EpilogueArguments{target}; },
        device, sms, stream);
  }
  const int32_t* offsets_device = offsets.ptr<int32_t>();
  const int e = static_cast<int>(experts);
  if (master)
    target.state_f32 ? launch_experts_without_rows<true, float>(target, offsets_device, e, stream)
                     : launch_experts_without_rows<true, bf16>(target, offsets_device, e, stream);
  else
    target.state_f32 ? launch_experts_without_rows<false, float>(target, offsets_device, e, stream)
                     : launch_experts_without_rows<false, bf16>(target, offsets_device, e, stream);
  if (norm_squared.data != nullptr) {
    sum_expert_partials_kernel<<<1, 1024, 0, stream>>>(
        target.norm_partials, offsets_device, partials_per_expert, e, norm_squared.ptr<float>());
    MOETUNE_CUDA_LAUNCH_CHECK();
  }
  return true;
}

}  // namespace moetune::cuda

#else  // no CUTLASS or no sm_90a target in this build: the WMMA kernels take every call

namespace moetune::cuda {
bool launch_grouped_gemm_sm90(const Tensor&, const Tensor&, bool, const Tensor&, const Tensor&,
                              cudaStream_t) {
  return false;
}
bool launch_grouped_gemm_weight_grad_sm90(const Tensor&, const Tensor&, const Tensor&,
                                          const Tensor&, cudaStream_t, bool) {
  return false;
}
bool launch_grouped_gemm_weight_grad_adamw_sm90(const Tensor&, const Tensor&, const Tensor&,
                                                const AdamWParam&, const AdamWHyper&, const Tensor&,
                                                cudaStream_t, bool) {
  return false;
}
}  // namespace moetune::cuda

#endif
