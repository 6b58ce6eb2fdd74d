// CPU kernels of kl_sample / kl_sample_backward: the reference DiagonalGaussianDistribution
// (split on dim 1, logvar clamped to [-30, 20], std = exp(logvar/2), sample = mean + std*eps,
// kl = 0.5 * sum_{C,H}(mean^2 + var - 1 - logvar)) in one pass over memory, one task per image.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "cpu/cpu_vec.h"
#include "kl_host.h"
#include "op_checks.h"
#include "ops.h"

namespace tatitok_fast {
namespace {

// One image: `rows` rows of W elements; kl_row (W,) gets 0.5 * the sum over rows.
TF_MULTIVERSION
void kl_image(const float* __restrict__ mu, const float* __restrict__ lv_in, const float* __restrict__ eps,
              int64_t rows, int64_t W, bool deterministic,
              float* __restrict__ sample, float* __restrict__ mean, float* __restrict__ std_out,
              float* __restrict__ kl_row) {
  for (int64_t i = 0; i < rows * W; ++i) mean[i] = mu[i];
  if (deterministic) {
    for (int64_t i = 0; i < rows * W; ++i) {
      sample[i] = mu[i];
      std_out[i] = 0.f;
    }
    return;  // kl stays 0
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * W;
    for (int64_t w = 0; w < W; ++w) {
      float lv = lv_in[o + w];
      lv = lv < -30.f ? -30.f : (lv > 20.f ? 20.f : lv);
      const float sdev = exp_vec(0.5f * lv);
      std_out[o + w] = sdev;
      sample[o + w] = mu[o + w] + sdev * eps[o + w];
      kl_row[w] += mu[o + w] * mu[o + w] + sdev * sdev - 1.0f - lv;  // var = std^2
    }
  }
  for (int64_t w = 0; w < W; ++w) kl_row[w] *= 0.5f;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_sample_cpu(const at::Tensor& parameters,
                                                                         const std::optional<at::Tensor>& noise,
                                                                         bool deterministic,
                                                                         std::optional<at::Generator> generator) {
  check_kl_args(parameters, noise);
  auto [B, C, H, W, sample, mean, std_out, kl] = allocate_kl_outputs(parameters);
  if (sample.numel() == 0) return {sample, mean, std_out, kl};
  const at::Tensor params = parameters.to(at::kFloat).contiguous();
  // In-kernel noise on CPU comes from torch's own vectorised normal sampler (the CPU
  // generator's stream, so torch.manual_seed / `generator` apply); the pass below is fused.
  at::Tensor eps_t;
  if (noise.has_value()) {
    eps_t = noise->contiguous();
  } else if (!deterministic) {
    eps_t = at::empty_like(sample);  // fp32 (B, C, H, W)
    eps_t.normal_(0.0, 1.0, generator);
  }

  const float* p = params.data_ptr<float>();
  const float* eps = eps_t.defined() ? eps_t.data_ptr<float>() : nullptr;
  float* s = sample.data_ptr<float>();
  float* m = mean.data_ptr<float>();
  float* sd = std_out.data_ptr<float>();
  float* k = kl.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t rows = C * H;  // rows of W contiguous elements; mean rows, then logvar rows
      kl_image(p + b * 2 * rows * W, p + (b * 2 * rows + rows) * W, eps ? eps + b * rows * W : nullptr, rows, W,
               deterministic, s + b * rows * W, m + b * rows * W, sd + b * rows * W, k + b * W);
    }
  });
  return {sample, mean, std_out, kl};
}

at::Tensor kl_sample_backward_cpu(const std::optional<at::Tensor>& grad_sample,
                                  const std::optional<at::Tensor>& grad_mean,
                                  const std::optional<at::Tensor>& grad_std, const std::optional<at::Tensor>& grad_kl,
                                  const at::Tensor& parameters, const at::Tensor& sample, bool deterministic) {
  const KLBackwardInputs in = prepare_kl_backward(grad_sample, grad_mean, grad_std, grad_kl, parameters, sample);
  const KLGrads g = in.grads();
  const int64_t C = in.C, H = in.H, W = in.W;
  const float* p = in.params.data_ptr<float>();
  const float* sp = in.sample.data_ptr<float>();
  float* out = in.grad.data_ptr<float>();
  at::parallel_for(0, in.B * W, 64, [&](int64_t begin, int64_t end) {
    for (int64_t col = begin; col < end; ++col) kl_backward_column(p, sp, g, col / W, col % W, C, H, W, deterministic, out);
  });
  return in.grad.to(parameters.scalar_type());
}

}  // namespace tatitok_fast
