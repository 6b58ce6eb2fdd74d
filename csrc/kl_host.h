// Host-side preparation shared by the CPU and CUDA kl_sample and kl_sample_backward: the
// forward's fp32 outputs; for the backward, fp32 contiguous copies of everything the
// per-column gradient (kl_math.h) reads, and the fp32 output.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "kl_math.h"
#include "op_checks.h"

namespace tatitok_fast {

// kl_sample's outputs for parameters (B, 2C, H, W): sample, mean, std (B, C, H, W) and kl
// (B, W, zero-filled: the kernels accumulate into it), all fp32 on parameters' device.
struct KLOutputs {
  int64_t B, C, H, W;
  at::Tensor sample, mean, std_out, kl;
};

inline KLOutputs allocate_kl_outputs(const at::Tensor& parameters) {
  const int64_t B = parameters.size(0), C = parameters.size(1) / 2, H = parameters.size(2), W = parameters.size(3);
  const auto f32 = parameters.options().dtype(at::kFloat);
  return KLOutputs{B, C, H, W, at::empty({B, C, H, W}, f32), at::empty({B, C, H, W}, f32),
                   at::empty({B, C, H, W}, f32), at::zeros({B, W}, f32)};
}

struct KLBackwardInputs {
  int64_t B, C, H, W;
  at::Tensor params, sample, grad_sample, grad_mean, grad_std, grad_kl;
  at::Tensor grad;  // (B, 2C, H, W) fp32

  KLGrads grads() const {
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
    return KLGrads{ptr(grad_sample), ptr(grad_mean), ptr(grad_std), ptr(grad_kl)};
  }
};

inline KLBackwardInputs prepare_kl_backward(const std::optional<at::Tensor>& grad_sample,
                                            const std::optional<at::Tensor>& grad_mean,
                                            const std::optional<at::Tensor>& grad_std,
                                            const std::optional<at::Tensor>& grad_kl, const at::Tensor& parameters,
                                            const at::Tensor& sample) {
  check_kl_args(parameters, std::nullopt);
  auto f32 = [](const std::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() ? t->to(at::kFloat).contiguous() : at::Tensor();
  };
  const int64_t B = parameters.size(0), C = parameters.size(1) / 2, H = parameters.size(2), W = parameters.size(3);
  return KLBackwardInputs{B, C, H, W,
                          parameters.to(at::kFloat).contiguous(), sample.to(at::kFloat).contiguous(),
                          f32(grad_sample), f32(grad_mean), f32(grad_std), f32(grad_kl),
                          at::empty({B, 2 * C, H, W}, parameters.options().dtype(at::kFloat))};
}

}  // namespace tatitok_fast
