// Grouped GEMMs over the expert-sorted token buffer, reading the expert offsets on the
// device (no host sync, one launch for all experts).
//
// bf16 path: tensor cores through WMMA (16x16x16, fp32 accumulators), 128x128x32 block
// tiles, 8 warps of 64x32, a 3-stage cp.async pipeline (16-byte copies, zero-fill past
// the edges). Shared-memory tiles keep the global layout, and the fragment layout
// (row/col major) absorbs the transposes, so three instantiations cover:
//   forward     c[R_e] = a[R_e] @ w[e]^T      (A k-major, B k-major)
//   data grad   c[R_e] = a[R_e] @ w[e]        (A k-major, B n-major)
//   weight grad dw[e] += dy[R_e]^T @ x[R_e]   (A m-major, B n-major, K = rows of e)
//               (or dw[e] = ... with accumulate false: the old dw is not read, and the
//               blocks of an expert without rows write zeros)
// Row tiles of the forward/data-grad GEMMs are scheduled on the device: block y = t finds
// its expert by a warp prefix scan of ceil(rows_e / 128) over the offsets; blocks past the
// last tile exit. fp32 tensors, and bf16 shapes whose contiguous dims are not multiples of
// 8, take a simple one-thread-per-output kernel (the parity path).
// On Hopper, bf16 calls go to the wgmma kernels of grouped_gemm_sm90.cu first; these
// kernels are the fallback (launch_grouped_gemm_wmma / _weight_grad_wmma). Overwriting weight
// gradients on sm90 leaves the experts without rows to zero_empty_experts_kernel (the CUTLASS
// grouped GEMM has no tiles for them), which reads the offsets on the device too.
#include <mma.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "ops/cuda/device_utils.cuh"
#include "ops/cuda/grouped_gemm_sm90.h"

namespace moetune::cuda {

namespace {

constexpr int kBM = 128, kBN = 128, kBK = 32, kStages = 3, kThreads = 256;
constexpr int kPad = 8;  // bf16 elements of padding per shared row (16 bytes: no bank conflicts)

__device__ __forceinline__ void cp_async16(void* smem, const void* global, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global),
               "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <bool KMajor, int Rows>  // Rows: the tile's m (or n) extent
struct TileShape {
  // KMajor: [Rows][kBK + pad]; else [kBK][Rows + pad]
  static constexpr int ld = KMajor ? kBK + kPad : Rows + kPad;
  static constexpr int elements = KMajor ? Rows * ld : kBK * ld;
};

// Loads one (Rows x kBK) tile of a matrix whose element (r, k) lives at
// base[r * ld + k] (KMajor) or base[k * ld + r]; rows in [0, row_limit) and k in
// [k0, k_limit) are valid, the rest is zero-filled.
template <bool KMajor, int Rows>
__device__ __forceinline__ void load_tile(bf16* smem, const bf16* base, int64_t ld, int64_t row0,
                                          int64_t row_limit, int64_t k0, int64_t k_limit) {
  using Shape = TileShape<KMajor, Rows>;
  constexpr int chunks = Rows * kBK / 8;
  for (int c = threadIdx.x; c < chunks; c += kThreads) {
    if constexpr (KMajor) {
      const int r = c / (kBK / 8), kc = (c % (kBK / 8)) * 8;
      const int64_t gr = row0 + r, gk = k0 + kc;
      const bool valid = gr < row_limit && gk < k_limit;
      cp_async16(smem + r * Shape::ld + kc, valid ? base + gr * ld + gk : base, valid);
    } else {
      const int k = c / (Rows / 8), rc = (c % (Rows / 8)) * 8;
      const int64_t gr = row0 + rc, gk = k0 + k;
      const bool valid = gr < row_limit && gk < k_limit;
      cp_async16(smem + k * Shape::ld + rc, valid ? base + gk * ld + gr : base, valid);
    }
  }
}

struct GemmArgs {
  const bf16* a;
  int64_t lda;
  const bf16* b;
  int64_t ldb, b_expert_stride;
  bf16* c;
  int64_t ldc, c_expert_stride;
  int64_t n, k;   // forward/data grad: N and K; weight grad: M (=P) and N (=Q) in m_dim/n
  int64_t m_dim;  // weight grad only
  const int32_t* offsets;
  int experts;
  bool accumulate;  // weight grad only: dw += (true) or dw = (false)
};

template <bool AKMajor, bool BKMajor, bool KGrouped>
__global__ void __launch_bounds__(kThreads) grouped_gemm_kernel(GemmArgs args) {
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  using AShape = TileShape<AKMajor, kBM>;
  using BShape = TileShape<BKMajor, kBN>;
  bf16* a_tiles = reinterpret_cast<bf16*>(smem_raw);
  bf16* b_tiles = a_tiles + kStages * AShape::elements;

  // ---- which expert and which rows ----
  int expert;
  int64_t m0, m_limit, k_begin, k_end;
  if constexpr (KGrouped) {
    expert = blockIdx.z;
    m0 = int64_t(blockIdx.y) * kBM;
    m_limit = args.m_dim;
    k_begin = args.offsets[expert];
    k_end = args.offsets[expert + 1];
    if (k_begin >= k_end) {  // no rows: dw[e] += 0, or the block's tile of dw[e] = 0
      if (!args.accumulate) {
        const int64_t n_begin = int64_t(blockIdx.x) * kBN;
        bf16* c_base = args.c + expert * args.c_expert_stride;
        for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
          const int64_t row = m0 + e / kBN, col = n_begin + e % kBN;
          if (row < m_limit && col < args.n)
            c_base[row * args.ldc + col] = __float2bfloat16_rn(0.0f);
        }
      }
      return;
    }
  } else {
    __shared__ int tile_expert, tile_first;
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      const int target = blockIdx.y;
      int running = 0;
      int found = -1, found_first = 0;
      for (int base = 0; base < args.experts && found < 0; base += 32) {
        const int e = base + lane;
        int tiles = 0;
        if (e < args.experts) tiles = (args.offsets[e + 1] - args.offsets[e] + kBM - 1) / kBM;
        int inclusive = tiles;
        for (int o = 1; o < 32; o <<= 1) {
          const int other = __shfl_up_sync(0xffffffffu, inclusive, o);
          if (lane >= o) inclusive += other;
        }
        const int start = running + inclusive - tiles;
        const unsigned hit =
            __ballot_sync(0xffffffffu, tiles > 0 && target >= start && target < start + tiles);
        if (hit) {
          const int src = __ffs(hit) - 1;
          found = base + src;
          found_first = __shfl_sync(0xffffffffu, start, src);
        }
        running += __shfl_sync(0xffffffffu, inclusive, 31);
      }
      if (lane == 0) tile_expert = found, tile_first = found_first;
    }
    __syncthreads();
    expert = tile_expert;
    if (expert < 0) return;  // past the last tile
    const int64_t row_begin = args.offsets[expert];
    m0 = row_begin + int64_t(blockIdx.y - tile_first) * kBM;
    m_limit = args.offsets[expert + 1];
    k_begin = 0;
    k_end = args.k;
  }
  const int64_t n0 = int64_t(blockIdx.x) * kBN;
  const bf16* b_base = args.b + expert * args.b_expert_stride;

  // A tile origin: forward: rows m0.., k from 0; weight grad: A(m=p, k=row) = dy[row][p].
  auto load_stage = [&](int stage, int64_t k0) {
    if constexpr (KGrouped) {
      load_tile<AKMajor, kBM>(a_tiles + stage * AShape::elements, args.a, args.lda, m0, m_limit, k0,
                              k_end);
      load_tile<BKMajor, kBN>(b_tiles + stage * BShape::elements, args.b, args.ldb, n0, args.n, k0,
                              k_end);
    } else {
      load_tile<AKMajor, kBM>(a_tiles + stage * AShape::elements, args.a, args.lda, m0, m_limit, k0,
                              k_end);
      load_tile<BKMajor, kBN>(b_tiles + stage * BShape::elements, b_base, args.ldb, n0, args.n, k0,
                              k_end);
    }
  };

  const int warp = threadIdx.x / 32;
  const int warp_m = warp / 4, warp_n = warp % 4;  // 2 x 4 warps, each 64 x 32
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  using ALayout = std::conditional_t<AKMajor, wmma::row_major, wmma::col_major>;
  using BLayout = std::conditional_t<BKMajor, wmma::col_major, wmma::row_major>;

  const int64_t k_tiles = (k_end - k_begin + kBK - 1) / kBK;
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, k_begin + s * kBK);
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int64_t next = kt + kStages - 1;
    if (next < k_tiles) load_stage(int(next % kStages), k_begin + next * kBK);
    cp_async_commit();
    const bf16* as = a_tiles + (kt % kStages) * AShape::elements;
    const bf16* bs = b_tiles + (kt % kStages) * BShape::elements;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, ALayout> a_frag[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, BLayout> b_frag[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = warp_m * 64 + i * 16;
        const bf16* p = AKMajor ? as + m * AShape::ld + kk : as + kk * AShape::ld + m;
        wmma::load_matrix_sync(a_frag[i], p, AShape::ld);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n = warp_n * 32 + j * 16;
        const bf16* p = BKMajor ? bs + n * BShape::ld + kk : bs + kk * BShape::ld + n;
        wmma::load_matrix_sync(b_frag[j], p, BShape::ld);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a_frag[i], b_frag[j], acc[i][j]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  // ---- epilogue: one 16x16 fragment at a time through a per-warp scratch ----
  float* scratch = reinterpret_cast<float*>(smem_raw) + warp * 256;
  const int lane = threadIdx.x % 32;
  bf16* c_base = KGrouped ? args.c + expert * args.c_expert_stride : args.c;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int64_t row0 = m0 + warp_m * 64 + i * 16, col0 = n0 + warp_n * 32 + j * 16;
      for (int e = lane; e < 256; e += 32) {
        const int64_t row = row0 + e / 16, col = col0 + e % 16;
        if (row < m_limit && col < args.n) {
          float value = scratch[e];
          if constexpr (KGrouped)
            if (args.accumulate) value += __bfloat162float(c_base[row * args.ldc + col]);
          c_base[row * args.ldc + col] = __float2bfloat16_rn(value);
        }
      }
      __syncwarp();
    }
  }
}

// ---- simple path (fp32, or shapes the tiled kernel does not take) ----
__device__ __forceinline__ int find_expert(const int32_t* offsets, int experts, int64_t row) {
  int lo = 0, hi = experts;  // offsets[lo] <= row < offsets[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (offsets[mid] <= row)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

template <typename scalar_t>
__global__ void grouped_gemm_simple_kernel(const scalar_t* a, const scalar_t* w, bool transpose_w,
                                           const int32_t* offsets, int experts, int64_t rows,
                                           int64_t p, int64_t q, scalar_t* c) {
  const int64_t out_cols = transpose_w ? p : q, inner = transpose_w ? q : p;
  const int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (index >= rows * out_cols) return;
  const int64_t row = index / out_cols, col = index % out_cols;
  if (row < offsets[0] || row >= offsets[experts]) return;  // rows of no expert stay untouched
  const int e = find_expert(offsets, experts, row);
  const scalar_t* we = w + e * p * q;
  float sum = 0.0f;
  for (int64_t i = 0; i < inner; ++i) {
    const float wv = transpose_w ? to_float(we[col * q + i]) : to_float(we[i * q + col]);
    sum += to_float(a[row * inner + i]) * wv;
  }
  c[index] = from_float<scalar_t>(sum);
}

template <typename scalar_t>
__global__ void grouped_weight_grad_simple_kernel(const scalar_t* dy, const scalar_t* x,
                                                  const int32_t* offsets, int64_t p, int64_t q,
                                                  bool accumulate, scalar_t* dw) {
  const int e = blockIdx.y;
  const int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (index >= p * q) return;
  const int64_t i = index / q, j = index % q;
  float sum = 0.0f;
  for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r)
    sum += to_float(dy[r * p + i]) * to_float(x[r * q + j]);
  scalar_t* out = dw + e * p * q + index;
  *out = from_float<scalar_t>(accumulate ? to_float(*out) + sum : sum);
}

// dw[e] = 0 for every expert e without rows (offsets[e] == offsets[e + 1]); blocks of experts
// with rows exit at once. grid (chunks, E).
__global__ void zero_empty_experts_kernel(const int32_t* offsets, bf16* dw, int64_t expert_size) {
  const int e = blockIdx.y;
  if (offsets[e] != offsets[e + 1]) return;
  bf16* expert = dw + e * expert_size;
  const bf16 zero = __float2bfloat16_rn(0.0f);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < expert_size;
       i += int64_t(gridDim.x) * blockDim.x)
    expert[i] = zero;
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data) % 16 == 0; }

size_t smem_bytes(bool a_kmajor, bool b_kmajor) {
  const size_t a = a_kmajor ? TileShape<true, kBM>::elements : TileShape<false, kBM>::elements;
  const size_t b = b_kmajor ? TileShape<true, kBN>::elements : TileShape<false, kBN>::elements;
  return std::max<size_t>(kStages * (a + b) * sizeof(bf16), 8 * 256 * sizeof(float));
}

template <bool A, bool B, bool K>
void launch_tiled(const GemmArgs& args, dim3 grid, cudaStream_t stream) {
  const size_t smem = smem_bytes(A, B);
  static_assert(kThreads == 256);
  MOETUNE_CUDA_CHECK(cudaFuncSetAttribute(grouped_gemm_kernel<A, B, K>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  grouped_gemm_kernel<A, B, K><<<grid, kThreads, smem, stream>>>(args);
  MOETUNE_CUDA_LAUNCH_CHECK();
}

}  // namespace

namespace {
// MOETUNE_GROUPED_GEMM=wmma keeps every call on these kernels (A/B benchmarks, bisecting).
bool sm90_allowed() {
  const char* choice = std::getenv("MOETUNE_GROUPED_GEMM");
  return choice == nullptr || std::strcmp(choice, "wmma") != 0;
}
}  // namespace

void launch_grouped_gemm(const Tensor& a, const Tensor& w, bool transpose_w, const Tensor& offsets,
                         const Tensor& c, cudaStream_t stream) {
  if (!sm90_allowed() || !launch_grouped_gemm_sm90(a, w, transpose_w, offsets, c, stream))
    launch_grouped_gemm_wmma(a, w, transpose_w, offsets, c, stream);
}

void launch_grouped_gemm_weight_grad(const Tensor& dy, const Tensor& x, const Tensor& offsets,
                                     const Tensor& dw, bool accumulate, cudaStream_t stream) {
  if (sm90_allowed() &&
      launch_grouped_gemm_weight_grad_sm90(dy, x, offsets, dw, stream, accumulate)) {
    // The sm90 kernel has no tiles for experts without rows: overwriting zeroes them here.
    if (!accumulate) {
      const int64_t experts = dw.size(0), expert_size = dw.size(1) * dw.size(2);
      const unsigned chunks =
          static_cast<unsigned>(std::min<int64_t>(ceil_div(expert_size, 1024), 64));
      zero_empty_experts_kernel<<<dim3(chunks, static_cast<unsigned>(experts)), 256, 0, stream>>>(
          offsets.ptr<int32_t>(), dw.ptr<bf16>(), expert_size);
      MOETUNE_CUDA_LAUNCH_CHECK();
    }
    return;
  }
  launch_grouped_gemm_weight_grad_wmma(dy, x, offsets, dw, stream, accumulate);
}

void launch_grouped_gemm_wmma(const Tensor& a, const Tensor& w, bool transpose_w,
                              const Tensor& offsets, const Tensor& c, cudaStream_t stream) {
  check_float(a, "grouped_gemm a");
  check_i32(offsets, "grouped_gemm offsets");
  if (w.rank() != 3 || a.rank() != 2 || c.rank() != 2 || a.dtype != w.dtype || c.dtype != a.dtype)
    fail("grouped_gemm: a ", a.shape.str(), " w ", w.shape.str(), " c ", c.shape.str(),
         " must be 2-D, 3-D, 2-D of one dtype");
  const int experts = static_cast<int>(w.size(0));
  const int64_t p = w.size(1), q = w.size(2), rows = a.size(0);
  const int64_t inner = transpose_w ? q : p, out_cols = transpose_w ? p : q;
  if (a.size(1) != inner || c.size(0) != rows || c.size(1) != out_cols ||
      offsets.numel() != experts + 1)
    fail("grouped_gemm: a ", a.shape.str(), " w ", w.shape.str(), " c ", c.shape.str(), " offsets ",
         offsets.shape.str(), " do not fit (transpose_w ", transpose_w, ")");
  if (rows == 0 || out_cols == 0) return;
  const bool tiled = a.dtype == DType::BF16 && inner % 8 == 0 && out_cols % 8 == 0 &&
                     aligned16(a) && aligned16(w) && aligned16(c);
  if (!tiled) {
    MOETUNE_DISPATCH_FLOAT(a.dtype, "grouped_gemm", {
      grouped_gemm_simple_kernel<scalar_t><<<ceil_div(rows * out_cols, 256), 256, 0, stream>>>(
          a.ptr<scalar_t>(), w.ptr<scalar_t>(), transpose_w, offsets.ptr<int32_t>(), experts, rows,
          p, q, c.ptr<scalar_t>());
    });
    MOETUNE_CUDA_LAUNCH_CHECK();
    return;
  }
  GemmArgs args{};
  args.a = a.ptr<bf16>();
  args.lda = inner;
  args.b = w.ptr<bf16>();
  args.ldb = q;
  args.b_expert_stride = p * q;
  args.c = c.ptr<bf16>();
  args.ldc = out_cols;
  args.n = out_cols;
  args.k = inner;
  args.offsets = offsets.ptr<int32_t>();
  args.experts = experts;
  const dim3 grid(static_cast<unsigned>(ceil_div(out_cols, kBN)),
                  static_cast<unsigned>(ceil_div(rows, kBM) + experts));
  if (transpose_w)
    launch_tiled<true, true, false>(args, grid, stream);
  else
    launch_tiled<true, false, false>(args, grid, stream);
}

void launch_grouped_gemm_weight_grad_wmma(const Tensor& dy, const Tensor& x, const Tensor& offsets,
                                          const Tensor& dw, cudaStream_t stream, bool accumulate) {
  check_float(dy, "grouped_gemm_weight_grad dy");
  check_i32(offsets, "grouped_gemm_weight_grad offsets");
  if (dw.rank() != 3 || dy.rank() != 2 || x.rank() != 2 || dy.dtype != x.dtype ||
      dw.dtype != dy.dtype)
    fail("grouped_gemm_weight_grad: dy ", dy.shape.str(), " x ", x.shape.str(), " dw ",
         dw.shape.str(), " must be 2-D, 2-D, 3-D of one dtype");
  const int experts = static_cast<int>(dw.size(0));
  const int64_t p = dw.size(1), q = dw.size(2);
  if (dy.size(1) != p || x.size(1) != q || dy.size(0) != x.size(0) ||
      offsets.numel() != experts + 1)
    fail("grouped_gemm_weight_grad: dy ", dy.shape.str(), " x ", x.shape.str(), " dw ",
         dw.shape.str(), " offsets ", offsets.shape.str(), " do not fit");
  if (dw.numel() == 0 || experts == 0) return;
  const bool tiled =
      dy.dtype == DType::BF16 && p % 8 == 0 && q % 8 == 0 && aligned16(dy) && aligned16(x);
  if (!tiled) {
    MOETUNE_DISPATCH_FLOAT(dy.dtype, "grouped_gemm_weight_grad", {
      grouped_weight_grad_simple_kernel<scalar_t>
          <<<dim3(static_cast<unsigned>(ceil_div(p * q, 256)), experts), 256, 0, stream>>>(
              dy.ptr<scalar_t>(), x.ptr<scalar_t>(), offsets.ptr<int32_t>(), p, q, accumulate,
              dw.ptr<scalar_t>());
    });
    MOETUNE_CUDA_LAUNCH_CHECK();
    return;
  }
  GemmArgs args{};
  args.a = dy.ptr<bf16>();
  args.lda = p;
  args.b = x.ptr<bf16>();
  args.ldb = q;
  args.c = dw.ptr<bf16>();
  args.ldc = q;
  args.c_expert_stride = p * q;
  args.n = q;
  args.m_dim = p;
  args.offsets = offsets.ptr<int32_t>();
  args.experts = experts;
  args.accumulate = accumulate;
  const dim3 grid(static_cast<unsigned>(ceil_div(q, kBN)), static_cast<unsigned>(ceil_div(p, kBM)),
                  experts);
  launch_tiled<false, false, true>(args, grid, stream);
}

}  // namespace moetune::cuda
