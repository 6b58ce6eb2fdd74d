// Declarations of tatitok_fast's native ops. Schemas live in torch_bindings.cpp; kernels in
// cpu/ and cuda/, registered per backend in cpu/cpu_bindings.cpp and cuda/cuda_bindings.cpp.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace tatitok_fast {

// ---- VQ: nearest codebook entry -------------------------------------------------------
// z (N, D), codebook (K, D) -> indices int64 (N,), squared L2 distances fp32 (N,).
std::tuple<at::Tensor, at::Tensor> vq_nearest_code_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                       bool l2_normalize);
std::tuple<at::Tensor, at::Tensor> vq_nearest_code_cuda(const at::Tensor& z, const at::Tensor& codebook,
                                                        bool l2_normalize);

// ---- KL: diagonal Gaussian posterior ----------------------------------------------------
// parameters (B, 2C, H, W) -> sample, mean, std (B, C, H, W) fp32 and kl (B, W) fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_sample_cpu(
    const at::Tensor& parameters, const std::optional<at::Tensor>& noise, bool deterministic,
    std::optional<at::Generator> generator);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_sample_cuda(
    const at::Tensor& parameters, const std::optional<at::Tensor>& noise, bool deterministic,
    std::optional<at::Generator> generator);
// Gradient w.r.t. parameters (B, 2C, H, W), in parameters' dtype.
at::Tensor kl_sample_backward_cpu(const std::optional<at::Tensor>& grad_sample,
                                  const std::optional<at::Tensor>& grad_mean,
                                  const std::optional<at::Tensor>& grad_std,
                                  const std::optional<at::Tensor>& grad_kl, const at::Tensor& parameters,
                                  const at::Tensor& sample, bool deterministic);
at::Tensor kl_sample_backward_cuda(const std::optional<at::Tensor>& grad_sample,
                                   const std::optional<at::Tensor>& grad_mean,
                                   const std::optional<at::Tensor>& grad_std,
                                   const std::optional<at::Tensor>& grad_kl, const at::Tensor& parameters,
                                   const at::Tensor& sample, bool deterministic);

// ---- MaskGen sampling -------------------------------------------------------------------
// One MaskGen-VQ unmask/re-mask step: logits (B, L, K), ids (B, L) -> next ids (B, L).
at::Tensor maskgen_unmask_step_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& uncond_logits,
                                   double guidance_scale, const at::Tensor& ids, int64_t mask_token_id,
                                   const std::optional<at::Tensor>& mask_len_per_row, int64_t mask_len,
                                   double softmax_temperature, double sample_temperature,
                                   double confidence_temperature, bool last_step,
                                   const std::optional<at::Tensor>& sample_noise,
                                   const std::optional<at::Tensor>& confidence_noise,
                                   std::optional<at::Generator> generator);
at::Tensor maskgen_unmask_step_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& uncond_logits,
                                    double guidance_scale, const at::Tensor& ids, int64_t mask_token_id,
                                    const std::optional<at::Tensor>& mask_len_per_row, int64_t mask_len,
                                    double softmax_temperature, double sample_temperature,
                                    double confidence_temperature, bool last_step,
                                    const std::optional<at::Tensor>& sample_noise,
                                    const std::optional<at::Tensor>& confidence_noise,
                                    std::optional<at::Generator> generator);
// MaskGen-KL: orders (B, L), mask (B, L) -> (mask_next, mask_to_pred), both bool (B, L).
std::tuple<at::Tensor, at::Tensor> mask_by_order_cpu(const at::Tensor& orders, const at::Tensor& mask,
                                                     int64_t mask_len, bool last_step);
std::tuple<at::Tensor, at::Tensor> mask_by_order_cuda(const at::Tensor& orders, const at::Tensor& mask,
                                                      int64_t mask_len, bool last_step);

}  // namespace tatitok_fast
