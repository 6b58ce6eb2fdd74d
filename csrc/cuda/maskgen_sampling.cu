// CUDA kernels of the MaskGen sampling ops (semantics in ../cpu/maskgen_sampling.cpp).
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
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "cuda/cuda_utils.cuh"
#include "op_checks.h"
#include "ops.h"
#include "philox.h"

namespace tatitok_fast {
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

at::Tensor maskgen_unmask_step_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& uncond_logits,
                                    double guidance_scale, const at::Tensor& ids, int64_t mask_token_id,
                                    const std::optional<at::Tensor>& mask_len_per_row, int64_t mask_len,
                                    double softmax_temperature, double sample_temperature,
                                    double confidence_temperature, bool last_step,
                                    const std::optional<at::Tensor>& sample_noise,
                                    const std::optional<at::Tensor>& confidence_noise,
                                    std::optional<at::Generator> generator) {
  check_unmask_args(logits, uncond_logits, ids, mask_token_id, mask_len_per_row, mask_len, sample_noise,
                    confidence_noise);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), L = logits.size(1), K = logits.size(2);
  TORCH_CHECK(L <= 12288, "maskgen_unmask_step: the CUDA kernel stages a row's L confidences in 48 KiB of shared "
              "memory, so L must be <= 12288, got ", L);
  auto out = at::empty({B, L}, ids.options());
  if (B == 0) return out;
  const at::Tensor lg = logits.contiguous();
  const at::Tensor ul = uncond_logits.has_value() ? uncond_logits->contiguous() : at::Tensor();
  const at::Tensor id_c = ids.contiguous();
  const at::Tensor sn = sample_noise.has_value() ? sample_noise->contiguous() : at::Tensor();
  const at::Tensor cn = confidence_noise.has_value() ? confidence_noise->contiguous() : at::Tensor();
  const at::Tensor ml = mask_len_per_row.has_value() ? mask_len_per_row->contiguous() : at::Tensor();
  at::PhiloxCudaState rng;
  if (!sn.defined() || !cn.defined()) rng = reserve_philox(generator, static_cast<uint64_t>((K + 3) / 4 + 1));

  auto sampled = at::empty({B * L}, ids.options());
  auto conf = at::empty({B * L}, logits.options().dtype(at::kFloat));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // torch's CUDA division by a host scalar multiplies by the fp32 reciprocal; so do we.
  const float inv_temp = 1.0f / static_cast<float>(softmax_temperature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lg.scalar_type(), "maskgen_unmask_step_cuda", [&] {
    unmask_sample_kernel<scalar_t><<<grid_blocks(B * L, "maskgen_unmask_step"), kSampleThreads, 0, stream>>>(
        lg.data_ptr<scalar_t>(), ul.defined() ? ul.data_ptr<scalar_t>() : nullptr,
        static_cast<float>(guidance_scale), id_c.data_ptr<int64_t>(), mask_token_id, K, inv_temp,
        static_cast<float>(sample_temperature), static_cast<float>(confidence_temperature),
        sn.defined() ? sn.data_ptr<float>() : nullptr, cn.defined() ? cn.data_ptr<float>() : nullptr, rng,
        sampled.data_ptr<int64_t>(), conf.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int threads = static_cast<int>(std::min<int64_t>(1024, (L + 31) / 32 * 32));
  unmask_select_kernel<<<grid_blocks(B, "maskgen_unmask_step"), threads, L * sizeof(float), stream>>>(
      conf.data_ptr<float>(), sampled.data_ptr<int64_t>(), ml.defined() ? ml.data_ptr<int64_t>() : nullptr, mask_len,
      L, mask_token_id, last_step, out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> mask_by_order_cuda(const at::Tensor& orders, const at::Tensor& mask,
                                                      int64_t mask_len, bool last_step) {
  check_mask_by_order_args(orders, mask, mask_len);
  const c10::cuda::CUDAGuard guard(orders.device());
  const int64_t B = orders.size(0), L = orders.size(1);
  auto next = at::zeros({B, L}, orders.options().dtype(at::kBool));
  auto to_pred = at::empty({B, L}, orders.options().dtype(at::kBool));
  if (B == 0 || L == 0) return {next, to_pred};
  const at::Tensor ord = orders.contiguous();
  const at::Tensor cur = mask.to(at::kBool).contiguous();
  const int threads = static_cast<int>(std::min<int64_t>(1024, (L + 31) / 32 * 32));
  const unsigned blocks = grid_blocks(B, "mask_by_order");
  mask_by_order_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      ord.data_ptr<int64_t>(), cur.data_ptr<bool>(), L, mask_len, last_step, next.data_ptr<bool>(),
      to_pred.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {next, to_pred};
}

}  // namespace tatitok_fast
