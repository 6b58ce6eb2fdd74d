// Host side of the CUDA MaskGen sampling ops: checks, outputs, torch's generator; the kernels
// are in maskgen_sampling_kernels.cu.
#include <ATen/ATen.h>

#include <algorithm>

#include "cuda/host_utils.h"
#include "op_checks.h"
#include "ops.h"

namespace tatitok_fast {

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
  // torch's CUDA division by a host scalar multiplies by the fp32 reciprocal; so do we.
  const float inv_temp = 1.0f / static_cast<float>(softmax_temperature);
  const int threads = static_cast<int>(std::min<int64_t>(1024, (L + 31) / 32 * 32));
  C10_CUDA_CHECK(cuda::launch_unmask_step(
      kernel_dtype(lg, "maskgen_unmask_step"), lg.data_ptr(), ul.defined() ? ul.data_ptr() : nullptr,
      static_cast<float>(guidance_scale), id_c.data_ptr<int64_t>(), mask_token_id, B, L, K, inv_temp,
      static_cast<float>(sample_temperature), static_cast<float>(confidence_temperature),
      sn.defined() ? sn.data_ptr<float>() : nullptr, cn.defined() ? cn.data_ptr<float>() : nullptr, rng,
      ml.defined() ? ml.data_ptr<int64_t>() : nullptr, mask_len, last_step, sampled.data_ptr<int64_t>(),
      conf.data_ptr<float>(), out.data_ptr<int64_t>(), grid_blocks(B * L, "maskgen_unmask_step"),
      grid_blocks(B, "maskgen_unmask_step"), threads, c10::cuda::getCurrentCUDAStream()));
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
  C10_CUDA_CHECK(cuda::launch_mask_by_order(ord.data_ptr<int64_t>(), cur.data_ptr<bool>(), L, mask_len, last_step,
                                            next.data_ptr<bool>(), to_pred.data_ptr<bool>(),
                                            grid_blocks(B, "mask_by_order"), threads,
                                            c10::cuda::getCurrentCUDAStream()));
  return {next, to_pred};
}

}  // namespace tatitok_fast
