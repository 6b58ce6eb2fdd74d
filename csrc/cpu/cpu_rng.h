// Philox keys for the CPU kernels: one fresh 64-bit key per call, drawn from torch's CPU
// generator, so torch.manual_seed / torch.Generator make the kernels reproducible.
#pragma once

#include <ATen/CPUGeneratorImpl.h>

#include <mutex>
#include <optional>

namespace tatitok_fast {

inline uint64_t draw_cpu_philox_seed(std::optional<at::Generator> generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->random64();
}

}  // namespace tatitok_fast
