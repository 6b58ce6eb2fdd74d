// Argument checks shared by the CPU and CUDA implementations of every op. The Python wrappers
// in tatitok_fast/ops check the same things first, with friendlier messages; these guard
// direct torch.ops.tatitok_fast.* calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace tatitok_fast {

inline bool is_float_kind(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

inline void check_vq_args(const at::Tensor& z, const at::Tensor& codebook) {
  TORCH_CHECK(z.dim() == 2, "vq_nearest_code: z must be (N, D), got ", z.sizes());
  TORCH_CHECK(codebook.dim() == 2, "vq_nearest_code: codebook must be (K, D), got ", codebook.sizes());
  TORCH_CHECK(z.size(1) == codebook.size(1), "vq_nearest_code: z has D=", z.size(1), " but codebook has D=",
              codebook.size(1));
  TORCH_CHECK(codebook.size(0) > 0, "vq_nearest_code: codebook is empty (K=0)");
  TORCH_CHECK(z.size(1) > 0, "vq_nearest_code: D must be > 0");
  TORCH_CHECK(is_float_kind(z) && z.scalar_type() == codebook.scalar_type(),
              "vq_nearest_code: z and codebook must share a dtype among float32/bfloat16/float16, got ",
              z.scalar_type(), " and ", codebook.scalar_type());
  TORCH_CHECK(z.device() == codebook.device(), "vq_nearest_code: z on ", z.device(), " but codebook on ",
              codebook.device());
}

inline void check_kl_args(const at::Tensor& parameters, const std::optional<at::Tensor>& noise) {
  TORCH_CHECK(parameters.dim() == 4, "kl_sample: parameters must be (B, 2C, H, W), got ", parameters.sizes());
  TORCH_CHECK(parameters.size(1) % 2 == 0 && parameters.size(1) > 0,
              "kl_sample: parameters dim 1 must be even (mean and logvar), got ", parameters.size(1));
  TORCH_CHECK(is_float_kind(parameters), "kl_sample: parameters must be float32/bfloat16/float16, got ",
              parameters.scalar_type());
  if (noise.has_value()) {
    const auto& n = *noise;
    TORCH_CHECK(n.dim() == 4 && n.size(0) == parameters.size(0) && n.size(1) == parameters.size(1) / 2 &&
                    n.size(2) == parameters.size(2) && n.size(3) == parameters.size(3),
                "kl_sample: noise must be (B, C, H, W) = half of parameters' dim 1, got ", n.sizes());
    TORCH_CHECK(n.scalar_type() == at::kFloat, "kl_sample: noise must be float32, got ", n.scalar_type());
    TORCH_CHECK(n.device() == parameters.device(), "kl_sample: noise on ", n.device(), " but parameters on ",
                parameters.device());
  }
}

inline void check_unmask_args(const at::Tensor& logits, const std::optional<at::Tensor>& uncond_logits,
                              const at::Tensor& ids, int64_t mask_token_id,
                              const std::optional<at::Tensor>& mask_len_per_row, int64_t mask_len,
                              const std::optional<at::Tensor>& sample_noise,
                              const std::optional<at::Tensor>& confidence_noise) {
  TORCH_CHECK(logits.dim() == 3, "maskgen_unmask_step: logits must be (B, L, K), got ", logits.sizes());
  TORCH_CHECK(is_float_kind(logits), "maskgen_unmask_step: logits must be float32/bfloat16/float16, got ",
              logits.scalar_type());
  const int64_t B = logits.size(0), L = logits.size(1), K = logits.size(2);
  TORCH_CHECK(K > 0 && L > 0, "maskgen_unmask_step: logits must have L > 0 and K > 0, got ", logits.sizes());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == B && ids.size(1) == L, "maskgen_unmask_step: ids must be (B, L) = (",
              B, ", ", L, "), got ", ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong, "maskgen_unmask_step: ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.device() == logits.device(), "maskgen_unmask_step: ids on ", ids.device(), " but logits on ",
              logits.device());
  TORCH_CHECK(mask_token_id >= 0, "maskgen_unmask_step: mask_token_id must be >= 0, got ", mask_token_id);
  if (uncond_logits.has_value()) {
    TORCH_CHECK(uncond_logits->sizes() == logits.sizes() && uncond_logits->scalar_type() == logits.scalar_type() &&
                    uncond_logits->device() == logits.device(),
                "maskgen_unmask_step: uncond_logits must match logits in shape, dtype and device");
  }
  if (mask_len_per_row.has_value()) {
    const auto& m = *mask_len_per_row;
    TORCH_CHECK(m.dim() == 1 && m.size(0) == B && m.scalar_type() == at::kLong && m.device() == logits.device(),
                "maskgen_unmask_step: mask_len_per_row must be int64 (B,) on the logits' device, got ", m.sizes(),
                " ", m.scalar_type(), " on ", m.device());
  } else {
    TORCH_CHECK(mask_len >= 0 && mask_len <= L, "maskgen_unmask_step: mask_len must be in [0, L=", L, "], got ",
                mask_len);
  }
  if (sample_noise.has_value()) {
    TORCH_CHECK(sample_noise->sizes() == logits.sizes() && sample_noise->scalar_type() == at::kFloat &&
                    sample_noise->device() == logits.device(),
                "maskgen_unmask_step: sample_noise must be float32 shaped like logits (B, L, K)");
  }
  if (confidence_noise.has_value()) {
    TORCH_CHECK(confidence_noise->sizes() == ids.sizes() && confidence_noise->scalar_type() == at::kFloat &&
                    confidence_noise->device() == logits.device(),
                "maskgen_unmask_step: confidence_noise must be float32 (B, L)");
  }
}

inline void check_mask_by_order_args(const at::Tensor& orders, const at::Tensor& mask, int64_t mask_len) {
  TORCH_CHECK(orders.dim() == 2 && orders.scalar_type() == at::kLong,
              "mask_by_order: orders must be int64 (B, L), got ", orders.scalar_type(), " ", orders.sizes());
  TORCH_CHECK(mask.sizes() == orders.sizes(), "mask_by_order: mask must be shaped like orders ", orders.sizes(),
              ", got ", mask.sizes());
  TORCH_CHECK(mask.device() == orders.device(), "mask_by_order: mask on ", mask.device(), " but orders on ",
              orders.device());
  TORCH_CHECK(mask_len >= 0 && mask_len <= orders.size(1), "mask_by_order: mask_len must be in [0, L=",
              orders.size(1), "], got ", mask_len);
}

}  // namespace tatitok_fast
