// CPU kernels of the MaskGen sampling ops.
//
// maskgen_unmask_step replaces the reference's per-step sequence (MaskGen_VQ.generate):
//   logits = cond + (cond - uncond) * cfg           (when uncond is given)
//   s      = logits / softmax_temperature
//   id     = argmax_k(s + sample_temperature * g)   g ~ Gumbel, first max wins
//   conf   = masked ? s[id] + confidence_temperature * g' : +inf ; decoded ids are kept
//   re-mask every position with conf <= (mask_len-th smallest conf), unless last_step
// The arithmetic is done in fp32 in the reference's order (this file is compiled without FMA
// contraction) so that explicit noise reproduces the reference's ids exactly. The cut-off
// test uses "fewer than mask_len confidences are strictly smaller", which equals
// conf <= sorted(conf)[mask_len - 1], ties included, without sorting.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "cpu/cpu_rng.h"
#include "op_checks.h"
#include "ops.h"
#include "philox.h"

namespace tatitok_fast {

at::Tensor maskgen_unmask_step_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& uncond_logits,
                                   double guidance_scale, const at::Tensor& ids, int64_t mask_token_id,
                                   const std::optional<at::Tensor>& mask_len_per_row, int64_t mask_len,
                                   double softmax_temperature, double sample_temperature,
                                   double confidence_temperature, bool last_step,
                                   const std::optional<at::Tensor>& sample_noise,
                                   const std::optional<at::Tensor>& confidence_noise,
                                   std::optional<at::Generator> generator) {
  check_unmask_args(logits, uncond_logits, ids, mask_token_id, mask_len_per_row, mask_len, sample_noise,
                    confidence_noise);
  const int64_t B = logits.size(0), L = logits.size(1), K = logits.size(2);
  auto out = at::empty({B, L}, ids.options());
  if (B == 0) return out;

  const at::Tensor lg = logits.contiguous();
  const at::Tensor ul = uncond_logits.has_value() ? uncond_logits->contiguous() : at::Tensor();
  const at::Tensor id_c = ids.contiguous();
  const at::Tensor sn = sample_noise.has_value() ? sample_noise->contiguous() : at::Tensor();
  const at::Tensor cn = confidence_noise.has_value() ? confidence_noise->contiguous() : at::Tensor();
  at::Tensor ml;
  if (mask_len_per_row.has_value()) {
    ml = mask_len_per_row->contiguous();
    const int64_t lo = ml.min().item<int64_t>(), hi = ml.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi <= L, "maskgen_unmask_step: mask_len_per_row values must be in [0, L=", L,
                "], got [", lo, ", ", hi, "]");
  }
  const bool need_rng = !sn.defined() || !cn.defined();
  const uint64_t seed = need_rng ? draw_cpu_philox_seed(generator) : 0;
  const uint64_t conf_counter = static_cast<uint64_t>((K + 3) / 4);  // after the K sample draws

  const float cfg = static_cast<float>(guidance_scale);
  const float temp = static_cast<float>(softmax_temperature);
  const float t_sample = static_cast<float>(sample_temperature);
  const float t_conf = static_cast<float>(confidence_temperature);
  const float kInf = std::numeric_limits<float>::infinity();

  auto sampled = at::empty({B * L}, ids.options());
  auto conf = at::empty({B * L}, logits.options().dtype(at::kFloat));
  const int64_t* idp = id_c.data_ptr<int64_t>();
  int64_t* sp = sampled.data_ptr<int64_t>();
  float* cp = conf.data_ptr<float>();
  const float* snp = sn.defined() ? sn.data_ptr<float>() : nullptr;
  const float* cnp = cn.defined() ? cn.data_ptr<float>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lg.scalar_type(), "maskgen_unmask_step_cpu", [&] {
    const scalar_t* lp = lg.data_ptr<scalar_t>();
    const scalar_t* up = ul.defined() ? ul.data_ptr<scalar_t>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, 32768 / K);
    at::parallel_for(0, B * L, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        if (idp[p] != mask_token_id) {  // already decoded: keep the id, never re-mask it
          sp[p] = idp[p];
          cp[p] = kInf;
          continue;
        }
        const scalar_t* row = lp + p * K;
        const scalar_t* urow = up ? up + p * K : nullptr;
        float best_score = -kInf, best_s = -kInf;
        int64_t best_k = 0;
        Philox4 r{};
        for (int64_t k = 0; k < K; ++k) {
          float x = static_cast<float>(row[k]);
          if (urow) x = x + (x - static_cast<float>(urow[k])) * cfg;
          const float s = x / temp;
          float g;
          if (snp) {
            g = snp[p * K + k];
          } else {
            if ((k & 3) == 0) r = philox4x32_10(seed, static_cast<uint64_t>(k >> 2), static_cast<uint64_t>(p));
            g = gumbel_from_uniform(uniform01(r.x[k & 3]));
          }
          const float score = s + t_sample * g;
          if (k == 0 || score > best_score) {  // strict: the first maximum wins, as torch.argmax
            best_score = score;
            best_s = s;
            best_k = k;
          }
        }
        float g2;
        if (cnp) {
          g2 = cnp[p];
        } else {
          g2 = gumbel_from_uniform(uniform01(philox4x32_10(seed, conf_counter, static_cast<uint64_t>(p)).x[0]));
        }
        sp[p] = best_k;
        cp[p] = best_s + t_conf * g2;
      }
    });
  });

  const int64_t* mlp = ml.defined() ? ml.data_ptr<int64_t>() : nullptr;
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n_remask = last_step ? 0 : (mlp ? mlp[b] : mask_len);
      const float* c = cp + b * L;
      for (int64_t l = 0; l < L; ++l) {
        int64_t smaller = 0;
        for (int64_t j = 0; j < L; ++j) smaller += c[j] < c[l];
        op[b * L + l] = smaller < n_remask ? mask_token_id : sp[b * L + l];
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mask_by_order_cpu(const at::Tensor& orders, const at::Tensor& mask,
                                                     int64_t mask_len, bool last_step) {
  check_mask_by_order_args(orders, mask, mask_len);
  const int64_t B = orders.size(0), L = orders.size(1);
  const at::Tensor ord = orders.contiguous();
  const at::Tensor cur = mask.to(at::kBool).contiguous();
  auto next = at::zeros({B, L}, orders.options().dtype(at::kBool));
  auto to_pred = at::empty({B, L}, orders.options().dtype(at::kBool));
  const int64_t* o = ord.data_ptr<int64_t>();
  const bool* m = cur.data_ptr<bool>();
  bool* nx = next.data_ptr<bool>();
  bool* tp = to_pred.data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < mask_len; ++j) {
      const int64_t pos = o[b * L + j];
      TORCH_CHECK(pos >= 0 && pos < L, "mask_by_order: orders[", b, ", ", j, "] = ", pos, " is not in [0, L=", L,
                  ")");
      nx[b * L + pos] = true;
    }
    for (int64_t l = 0; l < L; ++l) {
      // the reference: mask_to_pred = mask on the last step, else mask xor mask_next
      tp[b * L + l] = last_step ? m[b * L + l] : (m[b * L + l] != nx[b * L + l]);
    }
  }
  return {next, to_pred};
}

}  // namespace tatitok_fast
