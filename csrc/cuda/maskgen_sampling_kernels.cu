// CUDA kernels of the MaskGen sampling ops (semantics in ../cpu/maskgen_sampling.cpp; the host
// side, with the checks and outputs, is maskgen_sampling.cpp beside this file).
//
// maskgen_unmask_step, pass 1: one block per (b, l). Decoded positions exit at once (they
// keep their id with +inf confidence); masked ones stream their K logits once, drawing the
// Gumbel noise in registers (Philox, stream = position, counter = offset + k/4), and reduce
// the (score, index) argmax over the block, first maximum winning. No softmax, no noise
// tensor, no sort. Pass 2: one block per row re-masks the positions that have fewer than
// mask_len strictly smaller confidences (= conf <= the mask_len-th smallest, ties included).
// The arithmetic mirrors torch's CUDA kernels (division by a host scalar is a multiply by its
// fp32 reciprocal there) with explicitly rounded intrinsics, so explicit noise reproduces the
// reference ids exactly. Nothing here synchronises with the host: CUDA-graph capturable.
#include "cuda/device_utils.cuh"
#include "philox.h"

namespace tatitok_fast::cuda {
namespace {

constexpr int kSampleThreads = 256;

struct ArgMax {
  float score;
  float s;  // the scaled logit at the winning index
  int64_t k;
};

__device__ __forceinline__ void take_max(ArgMax& a, const ArgMax& o) {
  if (o.score > a.score || (o.score == a.score && o.k < a.k)) a = o;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kSampleThreads)
    unmask_sample_kernel(const scalar_t* __restrict__ logits, const scalar_t* __restrict__ uncond, float cfg,
                         const int64_t* __restrict__ ids, int64_t mask_token_id, int64_t K, float inv_temp,
                         float t_sample, float t_conf, const float* __restrict__ sample_noise,
                         const float* __restrict__ conf_noise, at::PhiloxCudaState rng,
                         int64_t* __restrict__ sampled, float* __restrict__ conf) {
  const int64_t p = blockIdx.x;
  if (ids[p] != mask_token_id) {
    if (threadIdx.x == 0) {
      sampled[p] = ids[p];
      conf[p] = INFINITY;
    }
    return;
  }
  uint64_t seed = 0, counter = 0;
  if (sample_noise == nullptr || conf_noise == nullptr) philox_seed_counter(rng, &seed, &counter);
  const scalar_t* row = logits + p * K;
  const scalar_t* urow = uncond ? uncond + p * K : nullptr;
  ArgMax best{-INFINITY, -INFINITY, INT64_MAX};
  for (int64_t k4 = static_cast<int64_t>(threadIdx.x) * 4; k4 < K; k4 += 4 * kSampleThreads) {
    Philox4 r{};
    if (sample_noise == nullptr) r = philox4x32_10(seed, counter + static_cast<uint64_t>(k4 >> 2), p);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t k = k4 + j;
      if (k >= K) break;
      float x = static_cast<float>(row[k]);
      if (urow) x = __fadd_rn(x, __fmul_rn(__fsub_rn(x, static_cast<float>(urow[k])), cfg));
      const float s = __fmul_rn(x, inv_temp);
      const float g = sample_noise ? sample_noise[p * K + k] : gumbel_from_uniform(uniform01(r.x[j]));
      const ArgMax cand{__fadd_rn(s, __fmul_rn(g, t_sample)), s, k};
      take_max(best, cand);
    }
  }
  // block argmax: warps, then the first warp over the warp winners
  __shared__ ArgMax warp_best[kSampleThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    ArgMax o;
    o.score = __shfl_xor_sync(0xffffffffu, best.score, off);
    o.s = __shfl_xor_sync(0xffffffffu, best.s, off);
    o.k = __shfl_xor_sync(0xffffffffu, best.k, off);
    take_max(best, o);
  }
  if (threadIdx.x % 32 == 0) warp_best[threadIdx.x / 32] = best;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kSampleThreads / 32; ++w) take_max(best, warp_best[w]);
    if (best.k == INT64_MAX) {  // every score NaN: torch.argmax would answer 0
      best.k = 0;
      best.s = __fmul_rn(static_cast<float>(row[0]), inv_temp);
    }
    const float g2 = conf_noise ? conf_noise[p]
                                : gumbel_from_uniform(uniform01(
                                      philox4x32_10(seed, counter + static_cast<uint64_t>((K + 3) / 4), p).x[0]));
    sampled[p] = best.k;
    conf[p] = __fadd_rn(best.s, __fmul_rn(g2, t_conf));
  }
}

// One block per row; conf of the row staged in shared memory (L floats).
__global__ void unmask_select_kernel(const float* __restrict__ conf, const int64_t* __restrict__ sampled,
                                     const int64_t* __restrict__ mask_len_per_row, int64_t mask_len, int64_t L,
                                     int64_t mask_token_id, bool last_step, int64_t* __restrict__ out) {
  extern __shared__ float c[];
  const int64_t b = blockIdx.x;
  for (int64_t l = threadIdx.x; l < L; l += blockDim.x) c[l] = conf[b * L + l];
  __syncthreads();
  int64_t n = last_step ? 0 : (mask_len_per_row ? mask_len_per_row[b] : mask_len);
  n = n < 0 ? 0 : (n > L ? L : n);
  for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
    const float v = c[l];
    int64_t smaller = 0;
    for (int64_t j = 0; j < L; ++j) smaller += c[j] < v;
    out[b * L + l] = smaller < n ? mask_token_id : sampled[b * L + l];
  }
}

// One block per row: scatter the first mask_len positions of the order, then mask_to_pred.
__global__ void mask_by_order_kernel(const int64_t* __restrict__ orders, const bool* __restrict__ mask, int64_t L,
                                     int64_t mask_len, bool last_step, bool* __restrict__ next,
                                     bool* __restrict__ to_pred) {
  const int64_t b = blockIdx.x;
  for (int64_t j = threadIdx.x; j < mask_len; j += blockDim.x) {
    const int64_t pos = orders[b * L + j];
    if (pos >= 0 && pos < L) next[b * L + pos] = true;  // out-of-range orders are ignored on CUDA
  }
  __syncthreads();
  for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
    const bool m = mask[b * L + l];
    to_pred[b * L + l] = last_step ? m : (m != next[b * L + l]);
  }
}

}  // namespace

cudaError_t launch_unmask_step(Dtype dtype, const void* logits, const void* uncond, float cfg, const int64_t* ids,
                               int64_t mask_token_id, int64_t B, int64_t L, int64_t K, float inv_temp, float t_sample,
                               float t_conf, const float* sample_noise, const float* conf_noise,
                               at::PhiloxCudaState rng, const int64_t* mask_len_per_row, int64_t mask_len,
                               bool last_step, int64_t* sampled, float* conf, int64_t* out, unsigned sample_blocks,
                               unsigned rows, int select_threads, cudaStream_t stream) {
  const cudaError_t err = dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    unmask_sample_kernel<scalar_t><<<sample_blocks, kSampleThreads, 0, stream>>>(
        static_cast<const scalar_t*>(logits), static_cast<const scalar_t*>(uncond), cfg, ids, mask_token_id, K,
        inv_temp, t_sample, t_conf, sample_noise, conf_noise, rng, sampled, conf);
  });
  if (err != cudaSuccess) return err;
  unmask_select_kernel<<<rows, select_threads, L * sizeof(float), stream>>>(conf, sampled, mask_len_per_row, mask_len,
                                                                             L, mask_token_id, last_step, out);
  return cudaGetLastError();
}

cudaError_t launch_mask_by_order(const int64_t* orders, const bool* mask, int64_t L, int64_t mask_len, bool last_step,
                                 bool* next, bool* to_pred, unsigned rows, int threads, cudaStream_t stream) {
  mask_by_order_kernel<<<rows, threads, 0, stream>>>(orders, mask, L, mask_len, last_step, next, to_pred);
  return cudaGetLastError();
}

}  // namespace tatitok_fast::cuda
