// CUDA kernels of kl_sample / kl_sample_backward (see ../cpu/kl_sample.cpp for the math).
// One thread per (b, w) column walks C x H; neighbouring threads read neighbouring w, so
// every load is coalesced. In-kernel noise: Philox keyed by torch's CUDA generator (CUDA-graph
// safe), stream = element index. (The CPU kernel takes torch's vectorised normal sampler.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "cuda/cuda_utils.cuh"
#include "kl_backward_inputs.h"
#include "op_checks.h"
#include "ops.h"
#include "philox.h"

namespace tatitok_fast {
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_sample_cuda(const at::Tensor& parameters,
                                                                          const std::optional<at::Tensor>& noise,
                                                                          bool deterministic,
                                                                          std::optional<at::Generator> generator) {
  check_kl_args(parameters, noise);
  const c10::cuda::CUDAGuard guard(parameters.device());
  const int64_t B = parameters.size(0), C = parameters.size(1) / 2, H = parameters.size(2), W = parameters.size(3);
  const auto f32 = parameters.options().dtype(at::kFloat);
  auto sample = at::empty({B, C, H, W}, f32);
  auto mean = at::empty({B, C, H, W}, f32);
  auto std_out = at::empty({B, C, H, W}, f32);
  auto kl = at::zeros({B, W}, f32);
  if (sample.numel() == 0) return {sample, mean, std_out, kl};
  const at::Tensor params = parameters.contiguous();
  const at::Tensor noise_c = noise.has_value() ? noise->contiguous() : at::Tensor();
  at::PhiloxCudaState rng;
  if (!deterministic && !noise.has_value()) rng = reserve_philox(generator, 1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 128;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params.scalar_type(), "kl_sample_cuda", [&] {
    kl_sample_kernel<scalar_t><<<num_blocks(B * W, kThreads, "kl_sample"), kThreads, 0, stream>>>(
        params.data_ptr<scalar_t>(), noise_c.defined() ? noise_c.data_ptr<float>() : nullptr, B, C, H, W,
        deterministic, rng, sample.data_ptr<float>(), mean.data_ptr<float>(), std_out.data_ptr<float>(),
        kl.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sample, mean, std_out, kl};
}

at::Tensor kl_sample_backward_cuda(const std::optional<at::Tensor>& grad_sample,
                                   const std::optional<at::Tensor>& grad_mean,
                                   const std::optional<at::Tensor>& grad_std,
                                   const std::optional<at::Tensor>& grad_kl, const at::Tensor& parameters,
                                   const at::Tensor& sample, bool deterministic) {
  const c10::cuda::CUDAGuard guard(parameters.device());
  const KLBackwardInputs in = prepare_kl_backward(grad_sample, grad_mean, grad_std, grad_kl, parameters, sample);
  if (in.grad.numel() > 0) {
    constexpr int kThreads = 128;
    const unsigned blocks = num_blocks(in.B * in.W, kThreads, "kl_sample_backward");
    kl_backward_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        in.params.data_ptr<float>(), in.sample.data_ptr<float>(), in.grads(), in.B, in.C, in.H, in.W, deterministic,
        in.grad.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return in.grad.to(parameters.scalar_type());
}

}  // namespace tatitok_fast
