// The gradient of kl_sample for one (b, w) column of parameters (B, 2C, H, W), shared by the
// CPU and CUDA kernels. For logvar clamped to [-30, 20] (the clamp passes gradient only
// inside), std = exp(lv / 2), sample = mean + std * eps, kl = 0.5 * sum(mean^2 + var - 1 - lv):
//   d/dmean   = g_sample + g_mean + g_kl * mean
//   d/dlogvar = g_sample * 0.5 * (sample - mean) + g_std * 0.5 * std + g_kl * 0.5 * (var - 1)
// (sample - mean = std * eps, so the noise need not be kept). Null grads count as zero.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace tatitok_fast {

struct KLGrads {
  const float* sample;
  const float* mean;
  const float* std;
  const float* kl;  // (B, W)
};

TF_HD void kl_backward_column(const float* p, const float* sample, const KLGrads& g, int64_t b, int64_t w, int64_t C,
                              int64_t H, int64_t W, bool deterministic, float* grad) {
  const float gkl = (g.kl != nullptr && !deterministic) ? g.kl[b * W + w] : 0.f;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t out = ((b * C + c) * H + h) * W + w;
      const int64_t im = ((b * 2 * C + c) * H + h) * W + w;
      const int64_t il = ((b * 2 * C + C + c) * H + h) * W + w;
      const float mu = p[im], lv_raw = p[il];
      float dmu = (g.sample ? g.sample[out] : 0.f) + (g.mean ? g.mean[out] : 0.f);
      float dlv = 0.f;
      if (!deterministic) {
        const float lv = fminf(fmaxf(lv_raw, -30.f), 20.f);
        const float sdev = expf(0.5f * lv);
        dmu += gkl * mu;
        if (g.sample) dlv += g.sample[out] * 0.5f * (sample[out] - mu);
        if (g.std) dlv += g.std[out] * 0.5f * sdev;
        dlv += gkl * 0.5f * (sdev * sdev - 1.0f);
        if (lv_raw < -30.f || lv_raw > 20.f) dlv = 0.f;
      }
      grad[im] = dmu;
      grad[il] = dlv;
    }
  }
}

}  // namespace tatitok_fast
