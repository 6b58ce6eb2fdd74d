// Helpers for CPU kernels whose inner loops GCC/Clang vectorise: run-time dispatch to an
// AVX-512 / AVX2+FMA clone of a function, and an exp that vectorises (glibc's expf does not).
#pragma once

#include <bit>
#include <cstdint>

// Clones for x86-64-v4 (AVX-512) and -v3 (AVX2, FMA), picked at load time by CPU features.
// (arch=<cpu name> clones would test the CPU model, which VMs often hide: use feature levels.)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TF_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TF_MULTIVERSION
#endif

namespace tatitok_fast {

// e^x for x in [-87, 88], within 2 ulp: x = n ln2 + r (Cody-Waite), e^r by a degree-7
// Taylor polynomial on |r| <= ln2/2, times 2^n built in the exponent bits. Branch-free.
inline float exp_vec(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  return p * std::bit_cast<float>(e);
}

}  // namespace tatitok_fast
