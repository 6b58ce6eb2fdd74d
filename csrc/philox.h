// Philox4x32-10 counter-based RNG (Salmon et al., "Parallel random numbers: as easy as
// 1, 2, 3", SC'11), written once for host and device so that the CPU and CUDA kernels of the
// MaskGen step draw the same numbers for the same (seed, counter). Every random element owns
// its counter:
//   counter = (offset + j, 0, stream_lo, stream_hi)   with stream = element/position index.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace tatitok_fast {

struct Philox4 {
  uint32_t x[4];
};

TF_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

TF_HD Philox4 philox4x32_10(uint64_t seed, uint64_t counter, uint64_t stream) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = static_cast<uint32_t>(stream), c3 = static_cast<uint32_t>(stream >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(0xD2511F53u, c0, &hi0);
    const uint32_t lo1 = mulhilo32(0xCD9E8D57u, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// 24 random bits -> [0, 1), exactly representable in fp32.
TF_HD float uniform01(uint32_t bits) { return static_cast<float>(bits >> 8) * (1.0f / 16777216.0f); }

// Standard Gumbel from a uniform, with the reference's clamping: -log(-log(u)), log(max(.,1e-20)).
TF_HD float gumbel_from_uniform(float u) {
  const float inner = -logf(fmaxf(u, 1e-20f));
  return -logf(fmaxf(inner, 1e-20f));
}

// Standard normal by Box-Muller from two uniforms (u1 taken in (0, 1]).
TF_HD float normal_from_uniforms(float u1, float u2) {
  const float r = sqrtf(-2.0f * logf(1.0f - u1));
  return r * cosf(6.2831853071795864f * u2);
}

}  // namespace tatitok_fast
