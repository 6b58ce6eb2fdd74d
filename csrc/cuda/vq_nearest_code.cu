// CUDA kernel of vq_nearest_code: argmin_k (||e_k||^2 - 2 z.e_k) per row of z, fp32
// accumulation, without the (N, K) distance matrix.
//
// Pass 1: block (x, y) owns 64 rows and the y-th contiguous range of codes (split so that
// small N still fills the GPU), walked in 64-code tiles staged through shared memory with D
// in slices of 16 (an SGEMM-style 4x4 register tile per thread). Each thread keeps the best
// (value, index) of its 4 rows; the 16 threads sharing rows reduce with shuffles, ties going
// to the lowest index as torch.argmin. Every score is accumulated in the same order, so
// identical codes tie exactly. Pass 2 merges the ranges in code order and recomputes the
// distance exactly as sum_d (z_d - e_d)^2 for the chosen code.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <limits>

#include "cuda/cuda_utils.cuh"
#include "op_checks.h"
#include "ops.h"

namespace tatitok_fast {
namespace {

constexpr int kBM = 64, kBN = 64, kBD = 16, kTM = 4, kTN = 4, kThreads = 256;  // 16 x 16 threads
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

int multiprocessor_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> vq_nearest_code_cuda(const at::Tensor& z, const at::Tensor& codebook,
                                                        bool l2_normalize) {
  check_vq_args(z, codebook);
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t N = z.size(0), D = z.size(1), K = codebook.size(0);
  auto indices = at::empty({N}, z.options().dtype(at::kLong));
  auto distances = at::empty({N}, z.options().dtype(at::kFloat));
  if (N == 0) return {indices, distances};

  at::Tensor zc = z.contiguous(), ec = codebook.contiguous();
  if (l2_normalize) {  // as torch.nn.functional.normalize(x, dim=-1), in fp32
    zc = zc.to(at::kFloat);
    ec = ec.to(at::kFloat);
    zc = zc / zc.norm(2, 1, true).clamp_min(1e-12);
    ec = ec / ec.norm(2, 1, true).clamp_min(1e-12);
  }
  const at::Tensor e_norm = ec.to(at::kFloat).pow(2).sum(1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // Split the codes so that about two blocks per SM run even when N is small.
  const int64_t row_blocks = (N + kBM - 1) / kBM, code_tiles = (K + kBN - 1) / kBN;
  const int64_t want = 2 * static_cast<int64_t>(multiprocessor_count(z.get_device()));
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(code_tiles, (want + row_blocks - 1) / row_blocks));
  const int64_t codes_per_split = (code_tiles + splits - 1) / splits * kBN;
  const int64_t used_splits = (K + codes_per_split - 1) / codes_per_split;
  auto part_v = at::empty({used_splits, N}, z.options().dtype(at::kFloat));
  auto part_k = at::empty({used_splits, N}, z.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zc.scalar_type(), "vq_nearest_code_cuda", [&] {
    const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(used_splits));
    vq_argmin_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(zc.data_ptr<scalar_t>(), ec.data_ptr<scalar_t>(),
                                                              e_norm.data_ptr<float>(), N, K, D, codes_per_split,
                                                              part_v.data_ptr<float>(), part_k.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    vq_finish_kernel<scalar_t><<<num_blocks(N, kThreads / 16), kThreads, 0, stream>>>(
        zc.data_ptr<scalar_t>(), ec.data_ptr<scalar_t>(), N, D, static_cast<int>(used_splits),
        part_v.data_ptr<float>(), part_k.data_ptr<int64_t>(), indices.data_ptr<int64_t>(),
        distances.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {indices, distances};
}

}  // namespace tatitok_fast
