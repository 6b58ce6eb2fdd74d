// CUDA kernels of vq_nearest_code: the nearest code of every row of z, exact, without the
// (N, K) distance matrix (the host side, which picks the path and sizes the grids, is
// vq_nearest_code.cpp beside this file). Two paths:
//
// Tensor cores (sm_80+ and a kernel image compiled for compute_80+, K < 2^31; twin:
// ops/reference.py vq_nearest_code_mma_ref):
//   1. vq_mma_candidates_kernel: block (x, y) owns 64 rows and the y-th range of codes, in
//      64-code tiles; 4 warps compute the 64 x 64 dot products with TF32 wmma (m16n16k8, fp32
//      accumulation; bf16/fp16 inputs are exact in TF32) over D in slices of 32. Scores
//      s~ = ||e||^2 - 2 dot feed a per-row list of the kCand smallest (ties: lower index) and
//      T, the smallest score left out of the list.
//   2. vq_mma_finish_kernel (a warp per row): merges the ranges' lists, re-checks the
//      candidates exactly (||z - e||^2 in fp64, ties to the lower index) and accepts the row
//      when no left-out code can reach the best: ||z||^2 + T - bound > best, with bound >=
//      |s~ - s| (mma_score_error_bound, the same expression as the twin's). Other rows get -1.
//   3. vq_exact_rows_kernel: a block per row marked -1 searches all K codes in fp64.
//   So the result is the nearest code by fp64 distance however TF32 rounds; for random
//   64-dim data with 8192 codes no row needed step 3 in the twin with 4 candidates.
//
// SIMT fallback (older GPUs, or builds whose loaded image predates sm_80): block (x, y) owns
// 64 rows and the y-th range of codes, walked in 64-code tiles staged through shared memory
// with D in slices of 16 (an SGEMM-style 4x4 register tile per thread), fp32 scores, the 16
// threads sharing rows reducing with shuffles (ties to the lowest index as torch.argmin); the
// finish kernel merges the ranges in code order and recomputes the distance exactly as
// sum_d (z_d - e_d)^2 for the chosen code.
#include <mma.h>

#include <cmath>
#include <limits>

#include "cuda/device_utils.cuh"

namespace tatitok_fast::cuda {
namespace {


constexpr int kBM = kVqSimtRows, kBN = kVqSimtCodes, kBD = 16, kTM = 4, kTN = 4;  // 16 x 16 threads
constexpr int kThreads = kVqThreads;
static_assert(kBM == kBN && kBM == 16 * kTM, "tile loads assume square 64 x 64 tiles");

__device__ __forceinline__ void take_better(float& v, int64_t& k, float ov, int64_t ok) {
  if (ov < v || (ov == v && ok < k)) {
    v = ov;
    k = ok;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) vq_argmin_kernel(const scalar_t* __restrict__ z,
                                                             const scalar_t* __restrict__ e,
                                                             const float* __restrict__ e_norm, int64_t N, int64_t K,
                                                             int64_t D, int64_t codes_per_split,
                                                             float* __restrict__ part_v, int64_t* __restrict__ part_k) {
  __shared__ float zs[kBD][kBM + 4];  // transposed tiles: [d][row], [d][code]
  __shared__ float es[kBD][kBN + 4];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;

  float best_v[kTM];
  int64_t best_k[kTM];
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    best_v[i] = INFINITY;
    best_k[i] = 0;
  }

  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * codes_per_split;
  const int64_t k_end = min(K, k_begin + codes_per_split);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBN) {
    float acc[kTM][kTN];
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) acc[i][j] = 0.f;

    for (int64_t d0 = 0; d0 < D; d0 += kBD) {
      for (int i = tid; i < kBM * kBD; i += kThreads) {
        const int r = i / kBD, dd = i % kBD;
        const int64_t gr = row0 + r, gk = k0 + r, gd = d0 + dd;
        zs[dd][r] = (gr < N && gd < D) ? static_cast<float>(z[gr * D + gd]) : 0.f;
        es[dd][r] = (gk < K && gd < D) ? static_cast<float>(e[gk * D + gd]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int dd = 0; dd < kBD; ++dd) {
        float a[kTM], b[kTN];
#pragma unroll
        for (int i = 0; i < kTM; ++i) a[i] = zs[dd][ty * kTM + i];
#pragma unroll
        for (int j = 0; j < kTN; ++j) b[j] = es[dd][tx * kTN + j];
#pragma unroll
        for (int i = 0; i < kTM; ++i)
#pragma unroll
          for (int j = 0; j < kTN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < kTN; ++j) {  // codes in increasing order: strict < keeps the lowest
      const int64_t k = k0 + tx * kTN + j;
      if (k < k_end) {
        const float en = e_norm[k];
#pragma unroll
        for (int i = 0; i < kTM; ++i) {
          const float v = en - 2.0f * acc[i][j];
          if (v < best_v[i]) {
            best_v[i] = v;
            best_k[i] = k;
          }
        }
      }
    }
  }

  // Reduce over the 16 lanes (tx) sharing rows; one partial per (range, row).
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    float v = best_v[i];
    int64_t k = best_k[i];
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, off, 16);
      const int64_t ok = __shfl_xor_sync(0xffffffffu, k, off, 16);
      take_better(v, k, ov, ok);
    }
    const int64_t row = row0 + ty * kTM + i;
    if (tx == 0 && row < N) {
      part_v[blockIdx.y * N + row] = v;
      part_k[blockIdx.y * N + row] = k;
    }
  }
}

// 16 lanes per row: merge the code ranges (lowest index on ties), then the exact distance.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) vq_finish_kernel(const scalar_t* __restrict__ z,
                                                             const scalar_t* __restrict__ e, int64_t N, int64_t D,
                                                             int splits, const float* __restrict__ part_v,
                                                             const int64_t* __restrict__ part_k,
                                                             int64_t* __restrict__ out_idx,
                                                             float* __restrict__ out_dist) {
  const int lane = threadIdx.x % 16;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 16) + threadIdx.x / 16;
  const bool valid = row < N;
  float v = INFINITY;
  int64_t k = INT64_MAX;  // lanes without a range never win a tie
  if (valid) {
    for (int s = lane; s < splits; s += 16) take_better(v, k, part_v[s * N + row], part_k[s * N + row]);
  }
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, off, 16);
    const int64_t ok = __shfl_xor_sync(0xffffffffu, k, off, 16);
    take_better(v, k, ov, ok);
  }
  if (k == INT64_MAX) k = 0;
  float s = 0.f;
  if (valid) {
    for (int64_t d = lane; d < D; d += 16) {
      const float diff = static_cast<float>(z[row * D + d]) - static_cast<float>(e[k * D + d]);
      s = fmaf(diff, diff, s);
    }
  }
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off, 16);
  if (lane == 0 && valid) {
    out_idx[row] = k;
    out_dist[row] = s;
  }
}

// ---------------------------------------------------------------------------------------
// Tensor-core path

constexpr int kCand = kVqCand;  // candidates kept per row
constexpr int kMThreads = 128;   // 4 warps x 16 rows
// tiles of the candidates kernel, whose body exists only for sm_80+ (unused in older passes)
[[maybe_unused]] constexpr int kMBM = kVqMmaRows, kMBN = kVqMmaCodes, kMBD = 32;
constexpr int kSentinel = std::numeric_limits<int32_t>::max();  // an empty list slot

// (v, k) < (ov, ok): smaller score, then lower index.
__device__ __forceinline__ bool before(float v, int32_t k, float ov, int32_t ok) {
  return v < ov || (v == ov && k < ok);
}

// The kCand smallest (score, index) pairs seen, sorted, and t = the smallest score of the
// pairs seen but not kept.
struct CandList {
  float v[kCand];
  int32_t k[kCand];
  float t;

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int c = 0; c < kCand; ++c) {
      v[c] = INFINITY;
      k[c] = kSentinel;
    }
    t = INFINITY;
  }

  __device__ __forceinline__ void insert(float nv, int32_t nk) {
    if (nk == kSentinel) return;
    if (!before(nv, nk, v[kCand - 1], k[kCand - 1])) {
      t = fminf(t, nv);
      return;
    }
    if (k[kCand - 1] != kSentinel) t = fminf(t, v[kCand - 1]);  // evicted
    int c = kCand - 1;
    while (c > 0 && before(nv, nk, v[c - 1], k[c - 1])) {
      v[c] = v[c - 1];
      k[c] = k[c - 1];
      --c;
    }
    v[c] = nv;
    k[c] = nk;
  }

  // Merge the list of lane ^ mask (same warp, all lanes taking part).
  __device__ __forceinline__ void merge_xor(int mask) {
    float ov[kCand];
    int32_t ok[kCand];
#pragma unroll
    for (int c = 0; c < kCand; ++c) {
      ov[c] = __shfl_xor_sync(0xffffffffu, v[c], mask);
      ok[c] = __shfl_xor_sync(0xffffffffu, k[c], mask);
    }
    const float ot = __shfl_xor_sync(0xffffffffu, t, mask);
#pragma unroll
    for (int c = 0; c < kCand; ++c) insert(ov[c], ok[c]);
    t = fminf(t, ot);
  }
};

// Bound on |s~ - s| for a row (see mma_score_error_bound in ops/reference.py).
__device__ __forceinline__ double mma_score_error_bound(double z_norm, double e_norm_max_sq, int64_t D, double u_in) {
  const double u32 = 5.9604644775390625e-08;  // 2^-24
  const double d = static_cast<double>(D);
  const double g32 = d * u32 / (1.0 - d * u32);
  const double g_acc = d * 4.76837158203125e-07 / (1.0 - d * 4.76837158203125e-07);  // 2^-21
  const double e_max = sqrt(e_norm_max_sq);
  const double dot_err = (u_in * (2.0 + u_in) + g_acc * (1.0 + u_in) * (1.0 + u_in)) * z_norm * e_max;
  const double sub_err = u32 * (e_norm_max_sq + 2.0 * (1.0 + u_in) * (1.0 + u_in) * z_norm * e_max);
  return 1.25 * (g32 * e_norm_max_sq + 2.0 * dot_err + sub_err);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMThreads) vq_mma_candidates_kernel(
    const scalar_t* __restrict__ z, const scalar_t* __restrict__ e, const float* __restrict__ e_norm, int64_t N,
    int64_t K, int64_t D, int64_t codes_per_split, float* __restrict__ part_v, int32_t* __restrict__ part_k,
    float* __restrict__ part_t) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  __shared__ __align__(32) float zs[kMBM][kMBD + 4];  // rows x D slice, TF32 values
  __shared__ __align__(32) float es[kMBN][kMBD + 4];  // codes x D slice
  __shared__ __align__(32) float dots[kMBM][kMBN + 4];
  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kMBM;
  const int r = tid >> 1, half = tid & 1;  // scoring: 2 threads per row, 32 codes each
  CandList list;
  list.init();

  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * codes_per_split;
  const int64_t k_end = min(K, k_begin + codes_per_split);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kMBN) {
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[kMBN / 16];
#pragma unroll
    for (int j = 0; j < kMBN / 16; ++j) wmma::fill_fragment(acc[j], 0.f);
    for (int64_t d0 = 0; d0 < D; d0 += kMBD) {
      for (int i = tid; i < kMBM * kMBD; i += kMThreads) {
        const int rr = i / kMBD, dd = i % kMBD;
        const int64_t gr = row0 + rr, gk = k0 + rr, gd = d0 + dd;
        zs[rr][dd] = (gr < N && gd < D) ? wmma::__float_to_tf32(static_cast<float>(z[gr * D + gd])) : 0.f;
        es[rr][dd] = (gk < k_end && gd < D) ? wmma::__float_to_tf32(static_cast<float>(e[gk * D + gd])) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kMBD; kk += 8) {
        wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a;
        wmma::load_matrix_sync(a, &zs[warp * 16][kk], kMBD + 4);
#pragma unroll
        for (int j = 0; j < kMBN / 16; ++j) {
          // B (d x code) = es^T: column-major over es's rows
          wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> b;
          wmma::load_matrix_sync(b, &es[j * 16][kk], kMBD + 4);
          wmma::mma_sync(acc[j], a, b, acc[j]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < kMBN / 16; ++j)
      wmma::store_matrix_sync(&dots[warp * 16][j * 16], acc[j], kMBN + 4, wmma::mem_row_major);
    __syncthreads();
    for (int c = half * (kMBN / 2); c < (half + 1) * (kMBN / 2); ++c) {
      const int64_t k = k0 + c;
      if (k < k_end) list.insert(e_norm[k] - 2.0f * dots[r][c], static_cast<int32_t>(k));
    }
    __syncthreads();  // dots is rewritten by the next tile
  }
  list.merge_xor(1);  // the two threads of a row (adjacent lanes) now hold the same list
  const int64_t row = row0 + r;
  if (half == 0 && row < N) {
    const int64_t base = static_cast<int64_t>(blockIdx.y) * N + row;
#pragma unroll
    for (int c = 0; c < kCand; ++c) {
      part_v[base * kCand + c] = list.v[c];
      part_k[base * kCand + c] = list.k[c];
    }
    part_t[base] = list.t;
  }
#else
  // Compiled for a PTX/SASS target without TF32 wmma: the host never launches this image
  // (the host reads the loaded image's ptxVersion, vq_mma_ptx_version); if it ever does, fail loudly
  // rather than leave part_* uninitialised for the finish kernel.
  __trap();
#endif
}

// A warp per row: merge the ranges' lists, exact fp64 re-check, accept or mark -1.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) vq_mma_finish_kernel(
    const scalar_t* __restrict__ z, const scalar_t* __restrict__ e, int64_t N, int64_t K, int64_t D, int splits,
    const float* __restrict__ part_v, const int32_t* __restrict__ part_k, const float* __restrict__ part_t,
    const float* __restrict__ e_norm_max_sq, double u_in, int64_t* __restrict__ out_idx,
    float* __restrict__ out_dist) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (row >= N) return;  // the whole warp shares the row
  CandList list;
  list.init();
  for (int s = lane; s < splits; s += 32) {
    const int64_t base = static_cast<int64_t>(s) * N + row;
    for (int c = 0; c < kCand; ++c) list.insert(part_v[base * kCand + c], part_k[base * kCand + c]);
    list.t = fminf(list.t, part_t[base]);
  }
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) list.merge_xor(mask);

  const scalar_t* zr = z + row * D;
  double zz = 0.0;
  for (int64_t d = lane; d < D; d += 32) {
    const double v = static_cast<double>(static_cast<float>(zr[d]));
    zz = fma(v, v, zz);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) zz += __shfl_xor_sync(0xffffffffu, zz, off);
  double best = INFINITY;
  int64_t best_k = -1;
  for (int c = 0; c < kCand; ++c) {  // every lane holds the same list
    const int32_t k = list.k[c];
    if (k == kSentinel) continue;
    const scalar_t* er = e + static_cast<int64_t>(k) * D;
    double s = 0.0;
    for (int64_t d = lane; d < D; d += 32) {
      const double diff = static_cast<double>(static_cast<float>(zr[d])) - static_cast<double>(static_cast<float>(er[d]));
      s = fma(diff, diff, s);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (s < best || (s == best && k < best_k)) {
      best = s;
      best_k = k;
    }
  }
  const double t = static_cast<double>(list.t);
  const double bound = mma_score_error_bound(sqrt(zz), static_cast<double>(*e_norm_max_sq), D, u_in);
  const bool safe = best_k >= 0 && (K <= kCand || t + zz - bound > best + 1e-12 * (zz + fabs(t) + best));
  if (lane == 0) {
    out_idx[row] = safe ? best_k : -1;
    out_dist[row] = static_cast<float>(best);
  }
}

// A block per row that the finish kernel could not settle (-1): all K codes in fp64.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) vq_exact_rows_kernel(const scalar_t* __restrict__ z,
                                                                 const scalar_t* __restrict__ e, int64_t K, int64_t D,
                                                                 int64_t* __restrict__ out_idx,
                                                                 float* __restrict__ out_dist) {
  __shared__ double sv[kThreads / 32];
  __shared__ int64_t sk[kThreads / 32];
  const int64_t row = blockIdx.x;
  if (out_idx[row] >= 0) return;  // uniform over the block
  const scalar_t* zr = z + row * D;
  double best = INFINITY;
  int64_t best_k = K;  // lanes without a code never win a tie
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {  // increasing k per thread
    const scalar_t* er = e + k * D;
    double s = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const double diff = static_cast<double>(static_cast<float>(zr[d])) - static_cast<double>(static_cast<float>(er[d]));
      s = fma(diff, diff, s);
    }
    if (s < best) {  // strict: the lower k of a tie stays
      best = s;
      best_k = k;
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const double ov = __shfl_xor_sync(0xffffffffu, best, off);
    const int64_t ok = __shfl_xor_sync(0xffffffffu, best_k, off);
    if (ov < best || (ov == best && ok < best_k)) {
      best = ov;
      best_k = ok;
    }
  }
  if (threadIdx.x % 32 == 0) {
    sv[threadIdx.x / 32] = best;
    sk[threadIdx.x / 32] = best_k;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) {
      if (sv[w] < best || (sv[w] == best && sk[w] < best_k)) {
        best = sv[w];
        best_k = sk[w];
      }
    }
    out_idx[row] = best_k < K ? best_k : 0;  // all-NaN rows: code 0
    out_dist[row] = static_cast<float>(best);
  }
}

}  // namespace

// The tensor-core candidates kernel has a body on the current device only when the image the
// driver loads for it (SASS for this GPU, or PTX JIT-compiled from an older virtual arch,
// e.g. a TORCH_CUDA_ARCH_LIST=7.5+PTX build on an H100) comes from compute_80 or newer,
// since the body is compiled only under __CUDA_ARCH__ >= 800. The device's own capability
// is not enough: it says what the GPU could run, not what was compiled.
cudaError_t vq_mma_ptx_version(Dtype dtype, int* ptx_version) {
  cudaError_t err = cudaSuccess;
  const cudaError_t bad = dispatch_dtype(dtype, [&](auto tag) {
    cudaFuncAttributes attr{};
    err = cudaFuncGetAttributes(&attr, vq_mma_candidates_kernel<decltype(tag)>);
    *ptx_version = attr.ptxVersion;
  });
  return err != cudaSuccess ? err : bad;
}

cudaError_t launch_vq_mma(Dtype dtype, const void* z, const void* e, const float* e_norm,
                          const float* e_norm_max_sq, int64_t N, int64_t K, int64_t D, int64_t codes_per_split,
                          unsigned row_blocks, unsigned splits, unsigned finish_blocks, unsigned exact_blocks,
                          double u_in, float* part_v, int32_t* part_k, float* part_t, int64_t* out_idx,
                          float* out_dist, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto* zs = static_cast<const scalar_t*>(z);
    const auto* es = static_cast<const scalar_t*>(e);
    vq_mma_candidates_kernel<scalar_t><<<dim3(row_blocks, splits), kMThreads, 0, stream>>>(
        zs, es, e_norm, N, K, D, codes_per_split, part_v, part_k, part_t);
    if (cudaPeekAtLastError() != cudaSuccess) return;
    vq_mma_finish_kernel<scalar_t><<<finish_blocks, kThreads, 0, stream>>>(
        zs, es, N, K, D, static_cast<int>(splits), part_v, part_k, part_t, e_norm_max_sq, u_in, out_idx, out_dist);
    if (cudaPeekAtLastError() != cudaSuccess) return;
    vq_exact_rows_kernel<scalar_t><<<exact_blocks, kThreads, 0, stream>>>(zs, es, K, D, out_idx, out_dist);
  });
}

cudaError_t launch_vq_simt(Dtype dtype, const void* z, const void* e, const float* e_norm, int64_t N, int64_t K,
                           int64_t D, int64_t codes_per_split, unsigned row_blocks, unsigned splits,
                           unsigned finish_blocks, float* part_v, int64_t* part_k, int64_t* out_idx, float* out_dist,
                           cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto* zs = static_cast<const scalar_t*>(z);
    const auto* es = static_cast<const scalar_t*>(e);
    vq_argmin_kernel<scalar_t><<<dim3(row_blocks, splits), kThreads, 0, stream>>>(zs, es, e_norm, N, K, D,
                                                                                   codes_per_split, part_v, part_k);
    if (cudaPeekAtLastError() != cudaSuccess) return;
    vq_finish_kernel<scalar_t><<<finish_blocks, kThreads, 0, stream>>>(zs, es, N, D, static_cast<int>(splits), part_v,
                                                                       part_k, out_idx, out_dist);
  });
}

}  // namespace tatitok_fast::cuda
