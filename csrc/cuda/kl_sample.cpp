// Host side of the CUDA kl_sample / kl_sample_backward: checks, fp32 outputs, torch's
// generator; the kernels are in kl_sample_kernels.cu.
#include <ATen/ATen.h>

#include "cuda/host_utils.h"
#include "kl_host.h"
#include "op_checks.h"
#include "ops.h"

namespace tatitok_fast {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_sample_cuda(const at::Tensor& parameters,
                                                                          const std::optional<at::Tensor>& noise,
                                                                          bool deterministic,
                                                                          std::optional<at::Generator> generator) {
  check_kl_args(parameters, noise);
  const c10::cuda::CUDAGuard guard(parameters.device());
  auto [B, C, H, W, sample, mean, std_out, kl] = allocate_kl_outputs(parameters);
  if (sample.numel() == 0) return {sample, mean, std_out, kl};
  const at::Tensor params = parameters.contiguous();
  const at::Tensor noise_c = noise.has_value() ? noise->contiguous() : at::Tensor();
  at::PhiloxCudaState rng;
  if (!deterministic && !noise.has_value()) rng = reserve_philox(generator, 1);
  C10_CUDA_CHECK(cuda::launch_kl_sample(
      kernel_dtype(params, "kl_sample"), params.data_ptr(), noise_c.defined() ? noise_c.data_ptr<float>() : nullptr,
      B, C, H, W, deterministic, rng, sample.data_ptr<float>(), mean.data_ptr<float>(), std_out.data_ptr<float>(),
      kl.data_ptr<float>(), num_blocks(B * W, cuda::kKlThreads, "kl_sample"), c10::cuda::getCurrentCUDAStream()));
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
    C10_CUDA_CHECK(cuda::launch_kl_backward(
        in.params.data_ptr<float>(), in.sample.data_ptr<float>(), in.grads(), in.B, in.C, in.H, in.W, deterministic,
        in.grad.data_ptr<float>(), num_blocks(in.B * in.W, cuda::kKlThreads, "kl_sample_backward"),
        c10::cuda::getCurrentCUDAStream()));
  }
  return in.grad.to(parameters.scalar_type());
}

}  // namespace tatitok_fast
