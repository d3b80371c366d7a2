// A CUTLASS 3.x collective epilogue (sm_90, ptr-array / grouped, no shared memory) that applies
// AdamW to the weight whose gradient the GEMM just accumulated, instead of storing the
// gradient: the expert weight-gradient GEMM of the optimizer in the backward
// (Backend::grouped_gemm_weight_grad_adamw). Group e's output tile is expert e's weight
// gradient dw[e] (P, Q); each thread rounds its accumulators to bf16 (the gradient the separate
// path would store), loads the weight (or its fp32 master) and both moments at the same place,
// runs adamw_element (adamw_math.cuh: the same arithmetic as the multi-tensor AdamW kernel),
// and stores them back: no gradient is written or read, and with the pingpong schedule one
// warpgroup's update (memory-bound) overlaps the other warpgroup's mainloop (tensor cores).
// Each thread also sums its gradients' squares; each warp writes one partial per tile into a
// fixed slot, reduced afterwards in a fixed order (a deterministic gradient norm).
//
// It plugs into the kernel through CUTLASS's Sm90TmaWarpSpecializedAdapter (as CUTLASS's own
// no-shared-memory epilogues do), with the PtrArrayNoSmemWarpSpecialized schedule. The
// accumulator fragment is walked in pairs: in wgmma's C layout, elements 2i and 2i + 1 of a
// thread are adjacent columns of one row, so every access moves two elements (4 or 8 bytes).
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/detail.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "ops/cuda/adamw_math.cuh"
#include "ops/cuda/device_utils.cuh"

namespace moetune::cuda {

// What the fused epilogue updates: expert e's weight (P, Q), row-major, at param + e * P * Q,
// its moments (and fp32 master) at the same element offsets.
struct ExpertAdamWTarget {
  bf16* param;
  void* exp_avg;     // bf16, or fp32 when state_f32
  void* exp_avg_sq;  // same dtype as exp_avg
  float* master;     // fp32 master weights, or null (then the bf16 weight is updated in place)
  bool state_f32;
  int rows, cols;  // P, Q of one expert
  AdamWScalars scalars;
  bool decays;
  float decay;
  float* norm_partials;  // (experts, tiles_m, tiles_n, warps) sums of squares, or null
  int tiles_m, tiles_n;
  bool prefetch;  // the tile's state into L2 first (measured slower: off but for A/Bs)
};

struct ExpertAdamWThreadOp {};  // no thread-level op: CUTLASS's adapter only names the type

template <class Schedule>
class ExpertAdamWEpilogue {
 public:
  using EpilogueSchedule = Schedule;
  using DispatchPolicy = Schedule;
  using ThreadEpilogueOp = ExpertAdamWThreadOp;
  using ElementC = cutlass::bfloat16_t;  // no C is read and no D written: the types the kernel
  using ElementD = cutlass::bfloat16_t;  // names, unused
  using InternalStrideC = cute::Stride<int64_t, cute::_1, cute::_0>;
  using InternalStrideD = InternalStrideC;
  using StrideC = InternalStrideC*;
  using StrideD = InternalStrideD*;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;

  struct SharedStorage {};
  using TensorMapStorage = SharedStorage;

  struct Arguments {
    ExpertAdamWTarget target;
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args,
                                                  void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&, int) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*,
                                              cudaStream_t, cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    // Even columns (pairs), and rows of whole 16-byte units (the L2 prefetches).
    return args.target.param != nullptr && args.target.cols % 8 == 0;
  }

  CUTLASS_HOST_DEVICE explicit ExpertAdamWEpilogue(Params const& params) : params_(params) {}

  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine,
            class FrgLayout, class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                 BlockCoordMNKL blk_coord_mnkl,
                                 cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    const ExpertAdamWTarget& t = params_.target;
    if (t.master) {
      if (t.state_f32)
        update<true, float>(problem_shape_mnkl, blk_shape_mnk, blk_coord_mnkl, accumulators,
                            tiled_mma, thread_idx);
      else
        update<true, bf16>(problem_shape_mnkl, blk_shape_mnk, blk_coord_mnkl, accumulators,
                           tiled_mma, thread_idx);
    } else {
      if (t.state_f32)
        update<false, float>(problem_shape_mnkl, blk_shape_mnk, blk_coord_mnkl, accumulators,
                             tiled_mma, thread_idx);
      else
        update<false, bf16>(problem_shape_mnkl, blk_shape_mnk, blk_coord_mnkl, accumulators,
                            tiled_mma, thread_idx);
    }
  }

 private:
  // cp.async.bulk.prefetch.L2: `bytes` (a multiple of 16) from a 16-byte aligned address.
  static CUTLASS_DEVICE void prefetch_l2(const void* address, int bytes) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(address), "r"(bytes)
                 : "memory");
  }
  // Two adjacent elements of a bf16 tensor (one 4-byte word) or an fp32 one (8 bytes), as
  // loaded (even offsets: aligned), and as floats.
  template <class Word>
  static CUTLASS_DEVICE Word load_word(const void* p) {
    return *reinterpret_cast<const Word*>(p);
  }
  static CUTLASS_DEVICE float2 to_float2(uint32_t word) {
    return __bfloat1622float2(reinterpret_cast<const __nv_bfloat162&>(word));
  }
  static CUTLASS_DEVICE float2 to_float2(float2 word) { return word; }
  static CUTLASS_DEVICE void store_pair(bf16* p, float2 value) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(value.x, value.y);
  }
  static CUTLASS_DEVICE void store_pair(float* p, float2 value) {
    *reinterpret_cast<float2*>(p) = value;
  }

  template <bool kMaster, class State, class ProblemShapeMNKL, class BlockShapeMNK,
            class BlockCoordMNKL, class FrgEngine, class FrgLayout, class TiledMma>
  CUTLASS_DEVICE void update(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                             BlockCoordMNKL blk_coord_mnkl,
                             cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                             TiledMma tiled_mma, int thread_idx) {
    using namespace cute;
    const ExpertAdamWTarget& t = params_.target;
    const int M = get<0>(problem_shape_mnkl), N = get<1>(problem_shape_mnkl);
    const int m_coord = get<0>(blk_coord_mnkl), n_coord = get<1>(blk_coord_mnkl);
    const int expert = get<3>(blk_coord_mnkl);
    // Each accumulator's (row, column) in the expert's weight.
    auto coords = make_identity_tensor(make_shape(M, N));
    auto tile = local_tile(coords, take<0, 2>(blk_shape_mnk), make_coord(m_coord, n_coord));
    auto thread_coords = tiled_mma.get_thread_slice(thread_idx).partition_C(tile);

    const int64_t expert_begin = int64_t(expert) * t.rows * t.cols;
    bf16* param = t.param + expert_begin;
    State* exp_avg = static_cast<State*>(t.exp_avg) + expert_begin;
    State* exp_avg_sq = static_cast<State*>(t.exp_avg_sq) + expert_begin;
    float* master = kMaster ? t.master + expert_begin : nullptr;

    // Optionally first the whole tile's rows of every tensor read, into L2 by bulk prefetches
    // (one instruction per row segment, no registers), so that the loads below would wait on
    // L2 rather than DRAM; measured slower on an H100 (5.88 vs 4.75 ms for Qwen3's gate_up).
    if (t.prefetch) {
      constexpr int kTileM = decltype(size<0>(blk_shape_mnk))::value;
      constexpr int kTileN = decltype(size<1>(blk_shape_mnk))::value;
      constexpr int kThreads = decltype(size(tiled_mma))::value;
      const int col0 = n_coord * kTileN, width = min(kTileN, N - col0);
      for (int r = thread_idx; r < kTileM; r += kThreads) {
        const int row = m_coord * kTileM + r;
        if (row >= M || width <= 0) break;
        const int offset = row * t.cols + col0;
        if constexpr (kMaster)
          prefetch_l2(master + offset, width * 4);
        else
          prefetch_l2(param + offset, width * 2);
        prefetch_l2(exp_avg + offset, width * int(sizeof(State)));
        prefetch_l2(exp_avg_sq + offset, width * int(sizeof(State)));
      }
    }

    constexpr int kPairs = decltype(size(accumulators))::value / 2;
    float sum_squares = 0.0f;
    // Pairs whose loads are all issued before any is used (enough bytes in flight for the
    // memory system), held as loaded (bf16 pairs in one register) until their turn: the
    // kernel's 168 registers per thread hold the tile's accumulators too (64 x 128: 64).
    using WeightWord = cute::conditional_t<kMaster, float2, uint32_t>;
    using StateWord = cute::conditional_t<sizeof(State) == 4, float2, uint32_t>;
    constexpr int kBatch = sizeof(WeightWord) + 2 * sizeof(StateWord) == 12 ? 16 : 8;
    static_assert(kPairs % kBatch == 0, "accumulator pairs per thread must fill the batches");
    // (row, column) of pair i, and whether it lies inside the weight (N even, columns even:
    // the pair's second column is inside too).
    const auto where = [&](int i, int& offset) {
      const auto coord = thread_coords(2 * i);
      const int row = get<0>(coord), col = get<1>(coord);
      offset = row * t.cols + col;
      return row < M && col < N;
    };
    CUTLASS_PRAGMA_UNROLL
    for (int first = 0; first < kPairs; first += kBatch) {
      WeightWord p[kBatch];
      StateWord m[kBatch], v[kBatch];
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < kBatch; ++j) {
        int offset;
        if (!where(first + j, offset)) continue;
        p[j] = load_word<WeightWord>(kMaster ? static_cast<const void*>(master + offset)
                                             : static_cast<const void*>(param + offset));
        m[j] = load_word<StateWord>(exp_avg + offset);
        v[j] = load_word<StateWord>(exp_avg_sq + offset);
      }
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < kBatch; ++j) {
        int offset;
        if (!where(first + j, offset)) continue;
        // The gradient as the separate path stores it (bf16) and AdamW reads it back.
        const float2 g = __bfloat1622float2(__floats2bfloat162_rn(
            accumulators(2 * (first + j)), accumulators(2 * (first + j) + 1)));
        sum_squares = __fmaf_rn(g.x, g.x, sum_squares);
        sum_squares = __fmaf_rn(g.y, g.y, sum_squares);
        float2 pf = to_float2(p[j]), mf = to_float2(m[j]), vf = to_float2(v[j]);
        adamw_element(pf.x, mf.x, vf.x, g.x, t.scalars, t.decays, t.decay);
        adamw_element(pf.y, mf.y, vf.y, g.y, t.scalars, t.decays, t.decay);
        store_pair(exp_avg + offset, mf);
        store_pair(exp_avg_sq + offset, vf);
        if constexpr (kMaster) store_pair(master + offset, pf);
        store_pair(param + offset, pf);
      }
    }
    if (t.norm_partials) {
      constexpr int kWarps = decltype(size(tiled_mma))::value / 32;
      sum_squares = warp_sum(sum_squares);
      if (thread_idx % 32 == 0) {
        const int64_t tile_index = (int64_t(expert) * t.tiles_m + m_coord) * t.tiles_n + n_coord;
        t.norm_partials[tile_index * kWarps + thread_idx / 32] = sum_squares;
      }
    }
  }

  Params params_;
};

}  // namespace moetune::cuda
