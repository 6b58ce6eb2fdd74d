// CPU kernels of kl_sample / kl_sample_backward: the reference DiagonalGaussianDistribution
// (split on dim 1, logvar clamped to [-30, 20], std = exp(logvar/2), sample = mean + std*eps,
// kl = 0.5 * sum_{C,H}(mean^2 + var - 1 - logvar)) in one pass, one task per (b, w) column.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "cpu/cpu_rng.h"
#include "op_checks.h"
#include "ops.h"
#include "philox.h"

namespace tatitok_fast {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_sample_cpu(const at::Tensor& parameters,
                                                                         const std::optional<at::Tensor>& noise,
                                                                         bool deterministic,
                                                                         std::optional<at::Generator> generator) {
  check_kl_args(parameters, noise);
  const int64_t B = parameters.size(0), C = parameters.size(1) / 2, H = parameters.size(2), W = parameters.size(3);
  const auto f32 = parameters.options().dtype(at::kFloat);
  auto sample = at::empty({B, C, H, W}, f32);
  auto mean = at::empty({B, C, H, W}, f32);
  auto std_out = at::empty({B, C, H, W}, f32);
  auto kl = at::empty({B, W}, f32);
  if (sample.numel() == 0) {
    kl.zero_();
    return {sample, mean, std_out, kl};
  }
  const at::Tensor params = parameters.contiguous();
  at::Tensor noise_c;
  if (noise.has_value()) noise_c = noise->contiguous();
  const bool own_noise = !deterministic && !noise.has_value();
  const uint64_t seed = own_noise ? draw_cpu_philox_seed(generator) : 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params.scalar_type(), "kl_sample_cpu", [&] {
    const scalar_t* p = params.data_ptr<scalar_t>();
    const float* eps_in = noise.has_value() ? noise_c.data_ptr<float>() : nullptr;
    float* s = sample.data_ptr<float>();
    float* m = mean.data_ptr<float>();
    float* sd = std_out.data_ptr<float>();
    float* k = kl.data_ptr<float>();
    at::parallel_for(0, B * W, 64, [&](int64_t begin, int64_t end) {
      for (int64_t col = begin; col < end; ++col) {
        const int64_t b = col / W, w = col % W;
        float acc = 0.f;
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t h = 0; h < H; ++h) {
            const int64_t out = ((b * C + c) * H + h) * W + w;  // index in (B, C, H, W)
            const float mu = static_cast<float>(p[((b * 2 * C + c) * H + h) * W + w]);
            float lv = static_cast<float>(p[((b * 2 * C + C + c) * H + h) * W + w]);
            lv = std::fmin(std::fmax(lv, -30.f), 20.f);
            m[out] = mu;
            if (deterministic) {
              s[out] = mu;
              sd[out] = 0.f;
              continue;
            }
            const float sdev = std::exp(0.5f * lv);
            const float var = std::exp(lv);
            float eps;
            if (eps_in != nullptr) {
              eps = eps_in[out];
            } else {
              const Philox4 r = philox4x32_10(seed, 0, static_cast<uint64_t>(out));
              eps = normal_from_uniforms(uniform01(r.x[0]), uniform01(r.x[1]));
            }
            sd[out] = sdev;
            s[out] = mu + sdev * eps;
            acc += mu * mu + var - 1.0f - lv;
          }
        }
        k[col] = deterministic ? 0.f : 0.5f * acc;
      }
    });
  });
  return {sample, mean, std_out, kl};
}

at::Tensor kl_sample_backward_cpu(const std::optional<at::Tensor>& grad_sample,
                                  const std::optional<at::Tensor>& grad_mean,
                                  const std::optional<at::Tensor>& grad_std, const std::optional<at::Tensor>& grad_kl,
                                  const at::Tensor& parameters, const at::Tensor& sample, bool deterministic) {
  check_kl_args(parameters, std::nullopt);
  const int64_t B = parameters.size(0), C = parameters.size(1) / 2, H = parameters.size(2), W = parameters.size(3);
  auto grad = at::empty({B, 2 * C, H, W}, parameters.options().dtype(at::kFloat));
  if (grad.numel() == 0) return grad.to(parameters.scalar_type());
  const at::Tensor params = parameters.to(at::kFloat).contiguous();
  const at::Tensor smp = sample.to(at::kFloat).contiguous();
  auto opt = [](const std::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() ? t->to(at::kFloat).contiguous() : at::Tensor();
  };
  const at::Tensor gs = opt(grad_sample), gm = opt(grad_mean), gsd = opt(grad_std), gk = opt(grad_kl);
  const float* p = params.data_ptr<float>();
  const float* sp = smp.data_ptr<float>();
  const float* gsp = gs.defined() ? gs.data_ptr<float>() : nullptr;
  const float* gmp = gm.defined() ? gm.data_ptr<float>() : nullptr;
  const float* gsdp = gsd.defined() ? gsd.data_ptr<float>() : nullptr;
  const float* gkp = gk.defined() ? gk.data_ptr<float>() : nullptr;
  float* g = grad.data_ptr<float>();
  at::parallel_for(0, B * W, 64, [&](int64_t begin, int64_t end) {
    for (int64_t col = begin; col < end; ++col) {
      const int64_t b = col / W, w = col % W;
      const float gkl = (gkp != nullptr && !deterministic) ? gkp[col] : 0.f;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t h = 0; h < H; ++h) {
          const int64_t out = ((b * C + c) * H + h) * W + w;
          const int64_t im = ((b * 2 * C + c) * H + h) * W + w;
          const int64_t il = ((b * 2 * C + C + c) * H + h) * W + w;
          const float mu = p[im], lv_raw = p[il];
          float dmu = (gsp ? gsp[out] : 0.f) + (gmp ? gmp[out] : 0.f);
          float dlv = 0.f;
          if (!deterministic) {
            const float lv = std::fmin(std::fmax(lv_raw, -30.f), 20.f);
            const float sdev = std::exp(0.5f * lv);
            dmu += gkl * mu;
            // d sample / d logvar = 0.5 * std * eps = 0.5 * (sample - mean)
            if (gsp) dlv += gsp[out] * 0.5f * (sp[out] - mu);
            if (gsdp) dlv += gsdp[out] * 0.5f * sdev;
            dlv += gkl * 0.5f * (std::exp(lv) - 1.0f);
            if (lv_raw < -30.f || lv_raw > 20.f) dlv = 0.f;  // clamp passes gradient only inside
          }
          g[im] = dmu;
          g[il] = dlv;
        }
      }
    }
  });
  return grad.to(parameters.scalar_type());
}

}  // namespace tatitok_fast
