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
//
// Argmax semantics on every path (as the CUDA kernel): the first maximum wins, NaN scores are
// ignored, and a row without any non-NaN score answers 0.
//
// In-kernel noise, per masked position ("row" of K logits), in groups of 128 k (32 Philox
// counters):
//  1. Pass 1 stores the combined logits x (cfg applied, not yet divided by T) in an L1/L2
//     scratch row, with the max of x per group. Correctly rounded division by T > 0 is
//     monotone, so maxima and bounds can work on x; only the few candidates divide.
//  2. Exact pruning: the noise is counter-based, so skipping a k changes nothing else. For a
//     24-bit uniform u with v = 1 - u >= 2^-n: g = -log(-log u) <= -log v <= n*ln2 (as
//     -log u >= 1 - u), and rounding is monotone, so with G >= g and ub >= s:
//     fl(s + fl(t*g)) <= fl(ub + fl(t*G)). A k whose bound is below the best score so far
//     cannot win. The best starts at the argmax of s with its noise, close to the final
//     maximum. Groups whose max cannot win even with the largest Gumbel skip Philox; the
//     others run Philox on vectors of counters, and only the k that pass the per-element
//     bound (a fraction of a percent) compute the exact score with the scalar transform.
//  The next masked row is prefetched into L2 during the compute-bound pass 2, so that the
//  memory-bound pass 1 of that row finds it there.
// The row kernel is written once over a vector width W (GCC vector extensions) and compiled
// for AVX-512 (W = 16), AVX2 (W = 8) and the baseline (W = 4), chosen once at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/cpu_rng.h"
#include "op_checks.h"
#include "ops.h"
#include "philox.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TF_X86_DISPATCH 1
#include <immintrin.h>
#define TF_V4 __attribute__((target("arch=x86-64-v4")))
#define TF_V3 __attribute__((target("arch=x86-64-v3")))
#endif
#if defined(__GNUC__) && !defined(__clang__)
// The vector helpers have internal linkage and are inlined: no vector ABI to keep.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace tatitok_fast {
namespace {

constexpr int64_t kBlock = 128;  // k per group: 32 Philox counters x 4 outputs
constexpr int64_t kAlign = 16;   // floats: scratch rows start on a 64-byte line
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// G(n) >= the computed Gumbel whenever -log v <= n*ln2: the margin is far above the few-ulp
// error of the two logf calls (computed g <= n*ln2 + ~3e-6).
inline float gumbel_bound(int n) { return static_cast<float>(n * 0.6931471805599453 + 1e-3); }

struct RowParams {
  int64_t K;
  float cfg, temp, t_sample;
  float r_lo, r_hi;  // r_lo <= 1/temp <= r_hi, see ub_scaled
  bool fast_scale;   // temp > 0 with 1/temp comfortably normal: the bounds on x hold
  bool has_uncond;
  uint64_t seed;
  alignas(64) float tab[32];  // [a] = fl(t * G(min(a + 1, 24))), the AVX-512 bound table
};

struct RowResult {
  int64_t k;
  float s;  // the scaled logit at k
};

template <int W>
struct Lanes {
  typedef float F __attribute__((vector_size(4 * W)));
  typedef int32_t I __attribute__((vector_size(4 * W)));
  typedef uint32_t U __attribute__((vector_size(4 * W)));
  typedef uint64_t Q __attribute__((vector_size(4 * W)));  // W/2 lanes
};

// ISA primitives over W lanes; everything else is written with GCC vector extensions.
template <int W>
struct IsaGeneric {
  static constexpr int kW = W;
  static constexpr int kChains = 2;  // independent Philox chains of W/2 counters in flight
  using F = typename Lanes<W>::F;
  using I = typename Lanes<W>::I;
  using U = typename Lanes<W>::U;
  using Q = typename Lanes<W>::Q;

  // r = (low 32 bits of each 64-bit lane of a) * m, the full 64-bit product
  static inline void mul32(Q& r, const Q& a, uint32_t m) { r = (a & 0xffffffffull) * m; }

  static inline uint32_t mask_ge(const F& a, const F& b) {
    const I m = a >= b;
    uint32_t r = 0;
    for (int j = 0; j < W; ++j) r |= static_cast<uint32_t>(m[j] & 1) << j;
    return r;
  }

  // tg >= fl(t * g) for the Gumbel g of these uniform bits: v24 = 2^24 - u24 in [1, 2^24] is
  // exact in fp32 with biased exponent 151 - n, so v >= 2^-n.
  struct Bound {
    float t;
    explicit Bound(const RowParams& c) : t(c.t_sample) {}
    inline void operator()(F& tg, const U& bits) const {
      const F v = __builtin_convertvector((I)(0x1000000u - (bits >> 8)), F);
      const I n = 151 - ((I)v >> 23);
      tg = t * (__builtin_convertvector(n, F) * 0.6931472f + 1e-3f);
    }
  };
};

#ifdef TF_X86_DISPATCH
struct IsaSse2 : IsaGeneric<4> {  // x86-64 baseline
  static inline void mul32(Q& r, const Q& a, uint32_t m) { r = (Q)_mm_mul_epu32((__m128i)a, _mm_set1_epi64x(m)); }
  static inline uint32_t mask_ge(const F& a, const F& b) {
    return static_cast<uint32_t>(_mm_movemask_ps(_mm_cmpge_ps((__m128)a, (__m128)b)));
  }
};

struct IsaAvx2 : IsaGeneric<8> {
  // GCC emulates the generic 64-bit product with three vpmuludq
  TF_V3 static inline void mul32(Q& r, const Q& a, uint32_t m) {
    r = (Q)_mm256_mul_epu32((__m256i)a, _mm256_set1_epi64x(m));
  }
  TF_V3 static inline uint32_t mask_ge(const F& a, const F& b) {
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps((__m256)a, (__m256)b, _CMP_GE_OQ)));
  }
};

struct IsaAvx512 : IsaGeneric<16> {
  static constexpr int kChains = 4;
  // GCC 12 lowers the generic form to vpmullq (3 uops). The zero-masked intrinsic: the plain
  // one reads an "undefined" source that GCC 12 warns about.
  TF_V4 static inline void mul32(Q& r, const Q& a, uint32_t m) {
    r = (Q)_mm512_maskz_mul_epu32(0xFF, (__m512i)a, _mm512_set1_epi64(m));
  }
  TF_V4 static inline uint32_t mask_ge(const F& a, const F& b) {
    return _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_GE_OQ);
  }
  // a = leading one bits of the word (lzcnt of ~bits | 1, < 32): u < 1 - 2^-(a+1) unless
  // a >= 24, so v > 2^-min(a+1, 24); then one vpermt2ps from the 32-entry table.
  struct Bound {
    __m512 lo, hi;
    TF_V4 explicit Bound(const RowParams& c) : lo(_mm512_load_ps(c.tab)), hi(_mm512_load_ps(c.tab + 16)) {}
    TF_V4 inline void operator()(F& tg, const U& bits) const {
      tg = (F)_mm512_permutex2var_ps(lo, _mm512_lzcnt_epi32((__m512i)(~bits | 1u)), hi);
    }
  };
};
#endif

// ---- lane constants and shuffles for any W (shuffle indices must be constants) ----
// (built whole: GCC 12 warns "may be used uninitialized" on lane-by-lane initialisation)
template <class V, class T, std::size_t... J>
inline V iota_impl(T base, std::index_sequence<J...>) {
  return V{static_cast<T>(base + J)...};
}
template <class V, class T, std::size_t... J>
inline V splat_impl(T x, std::index_sequence<J...>) {
  return V{((void)J, x)...};
}

template <std::size_t S, class V, std::size_t... J>
inline V rotate_impl(const V& v, std::index_sequence<J...>) {
  return __builtin_shufflevector(v, v, ((J + S) % sizeof...(J))...);
}
template <int W, int S>
inline void hmax_steps(typename Lanes<W>::F& m) {  // m holds no NaN
  if constexpr (S >= 1) {
    const typename Lanes<W>::F t = rotate_impl<S>(m, std::make_index_sequence<W>{});
    m = t > m ? t : m;
    hmax_steps<W, S / 2>(m);
  }
}
template <int W>
inline float hmax(typename Lanes<W>::F m) {
  hmax_steps<W, W / 2>(m);
  return m[0];
}

// The high 32 bits of each 64-bit lane copied to its low half (the high half is don't-care):
// a vpshufd, which runs on port 5 while the 512-bit multiplies use port 0.
template <class U, std::size_t... J>
inline U high_to_low_impl(const U& x, std::index_sequence<J...>) {
  return __builtin_shufflevector(x, x, (J | 1)...);
}
// lanes (2j, 2j+1) = low halves of 64-bit lane j of a and of b
template <class U, std::size_t... J>
inline U pair_low_halves(const U& a, const U& b, std::index_sequence<J...>) {
  constexpr std::size_t W = sizeof...(J);
  return __builtin_shufflevector(a, b, (J % 2 == 0 ? J : W + J - 1)...);
}
// lanes 4j + r: output r of counter j + H*W/4, from t01 (outputs 0, 1) and t23 (outputs 2, 3)
template <std::size_t H, class U, std::size_t... J>
inline U counter_outputs(const U& t01, const U& t23, std::index_sequence<J...>) {
  constexpr std::size_t W = sizeof...(J);
  return __builtin_shufflevector(
      t01, t23, ((J % 4 < 2 ? 0 : W) + 2 * (J / 4) + (J % 2) + H * W / 2)...);
}

// Philox4x32-10 of the counters 32*grp + j, j < 32, stream p, as independent chains of W/2
// counters. Each 32-bit word lives in the low half of a 64-bit lane (vpmuludq reads only the
// low half, the xors keep halves apart), so a round is 2 multiplies, 2 shuffles and 2
// three-way xors per W/2 counters. out[q] lane m holds the uniform bits of
// k = 128*grp + W*q + m (output m%4 of counter W/4*q + m/4). Same rounds as philox4x32_10.
template <class Isa>
inline void philox_group(uint64_t seed, int64_t p, int64_t grp, typename Isa::U* out) {
  constexpr int W = Isa::kW, C = W / 2, kSets = 32 / C;
  using U = typename Isa::U;
  using Q = typename Isa::Q;
  const auto seq = std::make_index_sequence<W>{}, half = std::make_index_sequence<C>{};
  const Q p_lo = splat_impl<Q, uint64_t>(static_cast<uint32_t>(p), half);
  const Q p_hi = splat_impl<Q, uint64_t>(static_cast<uint64_t>(p) >> 32, half);
#pragma GCC unroll 16
  for (int h0 = 0; h0 < kSets; h0 += Isa::kChains) {
    Q c0[Isa::kChains], c1[Isa::kChains], c2[Isa::kChains], c3[Isa::kChains];
#pragma GCC unroll 4
    for (int h = 0; h < Isa::kChains; ++h) {
      c0[h] = iota_impl<Q, uint64_t>(static_cast<uint64_t>(grp) * 32 + (h0 + h) * C, half);  // < 2^31: high word 0
      c1[h] = Q{};
      c2[h] = p_lo;
      c3[h] = p_hi;
    }
    uint64_t k0 = static_cast<uint32_t>(seed), k1 = seed >> 32;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
#pragma GCC unroll 4
      for (int h = 0; h < Isa::kChains; ++h) {
        Q p0, p1;
        Isa::mul32(p0, c0[h], 0xD2511F53u);
        Isa::mul32(p1, c2[h], 0xCD9E8D57u);
        c0[h] = (Q)high_to_low_impl((U)p1, seq) ^ c1[h] ^ k0;
        c1[h] = p1;
        c2[h] = (Q)high_to_low_impl((U)p0, seq) ^ c3[h] ^ k1;
        c3[h] = p0;
      }
      k0 = static_cast<uint32_t>(k0 + 0x9E3779B9u);
      k1 = static_cast<uint32_t>(k1 + 0xBB67AE85u);
    }
#pragma GCC unroll 4
    for (int h = 0; h < Isa::kChains; ++h) {
      const U t01 = pair_low_halves((U)c0[h], (U)c1[h], seq), t23 = pair_low_halves((U)c2[h], (U)c3[h], seq);
      out[2 * (h0 + h)] = counter_outputs<0>(t01, t23, seq);
      out[2 * (h0 + h) + 1] = counter_outputs<1>(t01, t23, seq);
    }
  }
}

// ---- loads and the reference's arithmetic ----
template <class F>
inline void load_full(F& v, const float* p) {
  std::memcpy(&v, p, sizeof(v));
}
template <class F>
inline void load_tail(F& v, const float* p, int64_t n, float pad) {  // n < W valid lanes
  constexpr int W = sizeof(F) / sizeof(float);
  float tmp[W];
  for (int j = 0; j < W; ++j) tmp[j] = j < n ? p[j] : pad;
  std::memcpy(&v, tmp, sizeof(v));
}

// x = cond + (cond - uncond) * cfg, fp32 in the reference's order; NaN past K in the tail form
template <bool kTail, class F>
inline void combined(F& x, const RowParams& c, const float* row, const float* urow, int64_t k0) {
  if (kTail) load_tail(x, row + k0, c.K - k0, kNaN); else load_full(x, row + k0);
  if (c.has_uncond) {
    F u;
    if (kTail) load_tail(u, urow + k0, c.K - k0, kNaN); else load_full(u, urow + k0);
    x = x + (x - u) * c.cfg;
  }
}

inline float scaled1(const RowParams& c, const float* row, const float* urow, int64_t k) {
  float x = row[k];
  if (c.has_uncond) x = x + (x - urow[k]) * c.cfg;
  return x / c.temp;
}

// With r_lo <= 1/T <= r_hi and T > 0, rounding being monotone: fl(x/T) <= fl(x*r_hi) for
// x >= 0 and <= fl(x*r_lo) for x < 0, so fl(x/T) <= ub(x) = max(fl(x*r_hi), fl(x*r_lo)),
// which is non-decreasing in x (NaN stays NaN). Two multiplies instead of a division.
inline float ub_scaled(float x, const RowParams& c) { return std::max(x * c.r_hi, x * c.r_lo); }

// ---- explicit noise: one pass, per-lane argmax of s + t*g ----
// Lanes hold strided k, so a strict > keeps each lane's first maximum and the lane reduction
// takes the lowest k among equal maxima. (One compare + select per step: GCC scalarises the
// compound mask logic of these generic helpers.) A row whose best score is -inf or NaN is
// redone in scalar code, where "NaN ignored, else first maximum" is spelled out.
template <class Isa>
inline RowResult sample_row_explicit(const RowParams& c, const float* row, const float* urow, const float* noise) {
  constexpr int W = Isa::kW;
  using F = typename Isa::F;
  using I = typename Isa::I;
  const I lane = iota_impl<I, int32_t>(0, std::make_index_sequence<W>{});
  F bv = F{} - kInf, s, g;
  I bi = lane;
  int64_t k0 = 0;
  for (; k0 + W <= c.K; k0 += W) {
    combined<false>(s, c, row, urow, k0);
    load_full(g, noise + k0);
    const F score = s / c.temp + c.t_sample * g;  // true division, as torch's CPU kernel
    const I take = score > bv;
    bv = take ? score : bv;
    bi = take ? lane + static_cast<int32_t>(k0) : bi;
  }
  if (k0 < c.K) {
    combined<true>(s, c, row, urow, k0);
    load_tail(g, noise + k0, c.K - k0, 0.f);
    const F score = s / c.temp + c.t_sample * g;
    const I take = score > bv;
    bv = take ? score : bv;
    bi = take ? lane + static_cast<int32_t>(k0) : bi;
  }
  float best = bv[0];
  int64_t bk = bi[0];
  for (int j = 1; j < W; ++j) {
    if (bv[j] > best || (bv[j] == best && bi[j] < bk)) {
      best = bv[j];
      bk = bi[j];
    }
  }
  if (best == -kInf) {  // only -inf and NaN scores: the lanes' initial indices may be wrong
    bk = 0;
    for (int64_t k = 0; k < c.K; ++k) {
      if (scaled1(c, row, urow, k) + c.t_sample * noise[k] == -kInf) {
        bk = k;
        break;
      }
    }
  }
  return {bk, scaled1(c, row, urow, bk)};
}

// ---- in-kernel noise; x_buf holds ceil(K/128)*128 floats, grp_max ceil(K/128) ----
template <class Isa>
inline RowResult sample_row_philox(const RowParams& c, const float* row, const float* urow, int64_t p, float* x_buf,
                                   float* grp_max, const float* next, const float* unext) {
  constexpr int W = Isa::kW, kVec = kBlock / W;
  using F = typename Isa::F;
  using U = typename Isa::U;
  const int64_t K = c.K, ngrp = (K + kBlock - 1) / kBlock;

  // pass 1: x and its max per group (NaN never taken)
  float gmax = -kInf;
  for (int64_t g = 0; g < ngrp; ++g) {
    F m = F{} - kInf, xv[kVec];
    if ((g + 1) * kBlock <= K) {
#pragma GCC unroll 8
      for (int q = 0; q < kVec; ++q) combined<false>(xv[q], c, row, urow, g * kBlock + q * W);
    } else {
      for (int q = 0; q < kVec; ++q) {
        const int64_t k0 = g * kBlock + q * W;
        if (k0 < K) combined<true>(xv[q], c, row, urow, k0); else xv[q] = F{} + kNaN;
      }
    }
#pragma GCC unroll 8
    for (int q = 0; q < kVec; ++q) {
      std::memcpy(x_buf + g * kBlock + q * W, &xv[q], sizeof(F));
      m = xv[q] > m ? xv[q] : m;
    }
    grp_max[g] = hmax<W>(m);
    gmax = std::max(gmax, grp_max[g]);
  }

  const float t = c.t_sample;
  if (!(c.fast_scale && t >= 0.f && t < kInf)) {
    // T or t outside the bounds' assumptions (the wrapper rejects T <= 0): every k, scalar
    float best = kNaN;
    int64_t bk = 0;
    Philox4 r{};
    for (int64_t k = 0; k < K; ++k) {
      if ((k & 3) == 0) r = philox4x32_10(c.seed, static_cast<uint64_t>(k >> 2), static_cast<uint64_t>(p));
      const float score = x_buf[k] / c.temp + t * gumbel_from_uniform(uniform01(r.x[k & 3]));
      if (score > best || (best != best && score == score)) {
        best = score;
        bk = k;
      }
    }
    return {bk, x_buf[bk] / c.temp};
  }

  // ks = first k with s == max s (all NaN: 0). s_k == s_top iff x_k maps to it, and only the
  // groups whose max maps to s_top can hold such a k.
  const float s_top = gmax / c.temp;
  int64_t ks = 0;
  for (int64_t g = 0, found = 0; g < ngrp && !found; ++g) {
    if (grp_max[g] / c.temp != s_top) continue;
    for (int64_t k = g * kBlock; k < std::min(K, (g + 1) * kBlock); ++k) {
      const float x = x_buf[k];
      if (x == gmax || (ub_scaled(x, c) >= s_top && x / c.temp == s_top)) {
        ks = k;
        found = 1;
        break;
      }
    }
  }
  if (t == 0.f) return {ks, x_buf[ks] / c.temp};  // s + 0 * g == s: no noise needed (NaN row: s[0])

  // pass 2
  float best = s_top + t * gumbel_from_uniform(uniform01(
                               philox4x32_10(c.seed, static_cast<uint64_t>(ks >> 2), static_cast<uint64_t>(p)).x[ks & 3]));
  int64_t bk = ks;
  const float t_top = t * gumbel_bound(24);
  const typename Isa::Bound bound(c);
  for (int64_t g = 0; g < ngrp; ++g) {
    // this group's share of the next row: 128 floats = 8 lines, spread over the loop below
    const int64_t pf_off = std::min(g * kBlock, std::max<int64_t>(K - kBlock, 0));
    const float* pf = next ? next + pf_off : nullptr;
    const float* upf = unext ? unext + pf_off : nullptr;
    if (!(ub_scaled(grp_max[g], c) + t_top >= best)) {  // no k here can reach the best score
      for (int l = 0; pf && l < kBlock; l += 16) __builtin_prefetch(pf + l, 0, 2);
      for (int l = 0; upf && l < kBlock; l += 16) __builtin_prefetch(upf + l, 0, 2);
      continue;
    }
    U bits[kVec];
    philox_group<Isa>(c.seed, p, g, bits);
#pragma GCC unroll 8
    for (int q = 0; q < kVec; ++q) {
      const int64_t k0 = g * kBlock + q * W;
      if ((q * W) % 16 == 0) {
        if (pf) __builtin_prefetch(pf + q * W, 0, 2);
        if (upf) __builtin_prefetch(upf + q * W, 0, 2);
      }
      F x, tg;
      load_full(x, x_buf + k0);
      const F a = x * c.r_hi, b = x * c.r_lo;
      bound(tg, bits[q]);
      uint32_t cand = Isa::mask_ge((a > b ? a : b) + tg, F{} + best);  // ub(x) + tg >= best
      while (cand) {  // rare: the exact score, in the reference's expression
        const int j = __builtin_ctz(cand);
        cand &= cand - 1;
        const int64_t k = k0 + j;
        const float score = x_buf[k] / c.temp + t * gumbel_from_uniform(uniform01(bits[q][j]));
        if (score > best || (score == best && k < bk)) {
          best = score;
          bk = k;
        }
      }
    }
  }
  return {bk, x_buf[bk] / c.temp};
}

template <class Isa>
inline RowResult sample_row(const RowParams& c, const float* row, const float* urow, const float* noise, int64_t p,
                            float* x_buf, float* grp_max, const float* next, const float* unext) {
  if (noise) return sample_row_explicit<Isa>(c, row, urow, noise);
  return sample_row_philox<Isa>(c, row, urow, p, x_buf, grp_max, next, unext);
}

using RowKernel = RowResult (*)(const RowParams&, const float*, const float*, const float*, int64_t, float*, float*,
                                const float*, const float*);

// One copy per ISA level; flatten inlines the generic helpers into the target's code.
RowResult sample_row_base(const RowParams& c, const float* row, const float* urow, const float* noise, int64_t p,
                          float* x_buf, float* grp_max, const float* next, const float* unext) {
#ifdef TF_X86_DISPATCH
  return sample_row<IsaSse2>(c, row, urow, noise, p, x_buf, grp_max, next, unext);
#else
  return sample_row<IsaGeneric<4>>(c, row, urow, noise, p, x_buf, grp_max, next, unext);
#endif
}
#ifdef TF_X86_DISPATCH
TF_V3 __attribute__((flatten)) RowResult sample_row_v3(const RowParams& c, const float* row, const float* urow,
                                                       const float* noise, int64_t p, float* x_buf, float* grp_max,
                                                       const float* next, const float* unext) {
  return sample_row<IsaAvx2>(c, row, urow, noise, p, x_buf, grp_max, next, unext);
}
TF_V4 __attribute__((flatten)) RowResult sample_row_v4(const RowParams& c, const float* row, const float* urow,
                                                       const float* noise, int64_t p, float* x_buf, float* grp_max,
                                                       const float* next, const float* unext) {
  return sample_row<IsaAvx512>(c, row, urow, noise, p, x_buf, grp_max, next, unext);
}
#endif

RowKernel pick_row_kernel() {
#ifdef TF_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return sample_row_v4;
  if (__builtin_cpu_supports("x86-64-v3")) return sample_row_v3;
#endif
  return sample_row_base;
}

}  // namespace

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
  // int32 lane indices and 32-bit Philox counters inside the row kernel
  TORCH_CHECK(K <= std::numeric_limits<int32_t>::max() - kBlock, "maskgen_unmask_step: K = ", K, " is too large");
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

  RowParams prm;
  prm.K = K;
  prm.cfg = static_cast<float>(guidance_scale);
  prm.temp = static_cast<float>(softmax_temperature);
  prm.t_sample = static_cast<float>(sample_temperature);
  const double inv_temp = 1.0 / static_cast<double>(prm.temp);
  prm.fast_scale = prm.temp > 0.f && inv_temp > 1e-30 && inv_temp < 1e30;
  // one ulp either side of the rounded reciprocal brackets the exact 1/T
  prm.r_hi = std::nextafter(static_cast<float>(inv_temp), kInf);
  prm.r_lo = std::nextafter(static_cast<float>(inv_temp), 0.f);
  for (int a = 0; a < 32; ++a) prm.tab[a] = prm.t_sample * gumbel_bound(std::min(a + 1, 24));
  prm.seed = seed;
  prm.has_uncond = ul.defined();
  const float t_conf = static_cast<float>(confidence_temperature);
  static const RowKernel row_kernel = pick_row_kernel();

  auto sampled = at::empty({B * L}, ids.options());
  auto conf = at::empty({B * L}, logits.options().dtype(at::kFloat));
  const int64_t* idp = id_c.data_ptr<int64_t>();
  int64_t* sp = sampled.data_ptr<int64_t>();
  float* cp = conf.data_ptr<float>();
  const float* snp = sn.defined() ? sn.data_ptr<float>() : nullptr;
  const float* cnp = cn.defined() ? cn.data_ptr<float>() : nullptr;
  const int64_t ngrp = (K + kBlock - 1) / kBlock;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lg.scalar_type(), "maskgen_unmask_step_cpu", [&] {
    constexpr bool kFloat = std::is_same_v<scalar_t, float>;
    const scalar_t* lp = lg.data_ptr<scalar_t>();
    const scalar_t* up = ul.defined() ? ul.data_ptr<scalar_t>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, 32768 / K);
    at::parallel_for(0, B * L, grain, [&](int64_t begin, int64_t end) {
      // per-task scratch, 64-byte aligned so that the row's vectors never straddle lines
      std::vector<float> scratch(ngrp * kBlock + ngrp + (kFloat ? 0 : 2 * K) + kAlign);
      float* x_buf = scratch.data() + (-reinterpret_cast<uintptr_t>(scratch.data()) / sizeof(float)) % kAlign;
      float* grp_max = x_buf + ngrp * kBlock;
      float* conv = grp_max + ngrp;  // fp32 copies of a half/bf16 row (and its uncond row)
      int64_t next_p = begin;        // the next masked position at or after p
      for (int64_t p = begin; p < end; ++p) {
        if (idp[p] != mask_token_id) {  // already decoded: keep the id, never re-mask it
          sp[p] = idp[p];
          cp[p] = kInf;
          continue;
        }
        const float* row;
        const float* urow = nullptr;
        const float* next = nullptr;  // prefetched during this row's noise pass (fp32 only)
        const float* unext = nullptr;
        if (kFloat) {
          const float* lpf = reinterpret_cast<const float*>(lp);
          const float* upf = reinterpret_cast<const float*>(up);
          row = lpf + p * K;
          if (up) urow = upf + p * K;
          for (next_p = std::max(next_p, p + 1); next_p < end && idp[next_p] != mask_token_id; ++next_p) {
          }
          if (next_p < end) {
            next = lpf + next_p * K;
            if (up) unext = upf + next_p * K;
          }
        } else {  // upcast first: the kernel's arithmetic is fp32, as the reference on .float()
          for (int64_t k = 0; k < K; ++k) conv[k] = static_cast<float>(lp[p * K + k]);
          if (up) {
            for (int64_t k = 0; k < K; ++k) conv[K + k] = static_cast<float>(up[p * K + k]);
            urow = conv + K;
          }
          row = conv;
        }
        const RowResult r =
            row_kernel(prm, row, urow, snp ? snp + p * K : nullptr, p, x_buf, grp_max, next, unext);
        const float g2 =
            cnp ? cnp[p]
                : gumbel_from_uniform(uniform01(philox4x32_10(seed, conf_counter, static_cast<uint64_t>(p)).x[0]));
        sp[p] = r.k;
        cp[p] = r.s + t_conf * g2;
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
