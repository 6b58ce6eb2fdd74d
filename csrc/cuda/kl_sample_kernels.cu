// CUDA kernels of kl_sample / kl_sample_backward (see ../cpu/kl_sample.cpp for the math; the
// host side, with the checks and outputs, is kl_sample.cpp beside this file).
// One thread per (b, w) column walks C x H; neighbouring threads read neighbouring w, so
// every load is coalesced. In-kernel noise: Philox keyed by torch's CUDA generator (CUDA-graph
// safe), stream = element index. (The CPU kernel takes torch's vectorised normal sampler.)
#include "cuda/device_utils.cuh"
#include "kl_math.h"
#include "philox.h"

namespace tatitok_fast::cuda {
namespace {

template <typename scalar_t>
__global__ void kl_sample_kernel(const scalar_t* __restrict__ p, const float* __restrict__ eps_in, int64_t B,
                                 int64_t C, int64_t H, int64_t W, bool deterministic, at::PhiloxCudaState rng,
                                 float* __restrict__ sample, float* __restrict__ mean, float* __restrict__ std_out,
                                 float* __restrict__ kl) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= B * W) return;
  uint64_t seed = 0, counter = 0;
  if (!deterministic && eps_in == nullptr) philox_seed_counter(rng, &seed, &counter);
  const int64_t b = col / W, w = col % W;
  float acc = 0.f;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t out = ((b * C + c) * H + h) * W + w;
      const float mu = static_cast<float>(p[((b * 2 * C + c) * H + h) * W + w]);
      const float lv = fminf(fmaxf(static_cast<float>(p[((b * 2 * C + C + c) * H + h) * W + w]), -30.f), 20.f);
      mean[out] = mu;
      if (deterministic) {
        sample[out] = mu;
        std_out[out] = 0.f;
        continue;
      }
      const float sdev = expf(__fmul_rn(0.5f, lv));
      const float var = expf(lv);
      float eps;
      if (eps_in != nullptr) {
        eps = eps_in[out];
      } else {
        const Philox4 r = philox4x32_10(seed, counter, static_cast<uint64_t>(out));
        eps = normal_from_uniforms(uniform01(r.x[0]), uniform01(r.x[1]));
      }
      std_out[out] = sdev;
      sample[out] = __fadd_rn(mu, __fmul_rn(sdev, eps));
      acc += mu * mu + var - 1.0f - lv;
    }
  }
  kl[col] = deterministic ? 0.f : 0.5f * acc;
}

__global__ void kl_backward_kernel(const float* __restrict__ p, const float* __restrict__ smp, KLGrads g, int64_t B,
                                   int64_t C, int64_t H, int64_t W, bool deterministic, float* __restrict__ grad) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col < B * W) kl_backward_column(p, smp, g, col / W, col % W, C, H, W, deterministic, grad);
}

}  // namespace

cudaError_t launch_kl_sample(Dtype dtype, const void* p, const float* eps, int64_t B, int64_t C, int64_t H,
                             int64_t W, bool deterministic, at::PhiloxCudaState rng, float* sample, float* mean,
                             float* std_out, float* kl, unsigned blocks, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    kl_sample_kernel<scalar_t><<<blocks, kKlThreads, 0, stream>>>(static_cast<const scalar_t*>(p), eps, B, C, H, W,
                                                                  deterministic, rng, sample, mean, std_out, kl);
  });
}

cudaError_t launch_kl_backward(const float* p, const float* sample, KLGrads grads, int64_t B, int64_t C, int64_t H,
                               int64_t W, bool deterministic, float* grad, unsigned blocks, cudaStream_t stream) {
  kl_backward_kernel<<<blocks, kKlThreads, 0, stream>>>(p, sample, grads, B, C, H, W, deterministic, grad);
  return cudaGetLastError();
}

}  // namespace tatitok_fast::cuda
