// Small helpers shared by the CUDA kernels: the current stream, Philox state from torch's
// CUDA generator (CUDA-graph safe), and warp reductions.
#pragma once

#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <mutex>
#include <optional>

namespace tatitok_fast {

// Reserve `counters` Philox counters (4 x 32-bit values each) per stream from torch's CUDA
// generator. Under CUDA-graph capture the offset is read on device at replay.
inline at::PhiloxCudaState reserve_philox(std::optional<at::Generator> generator, uint64_t counters) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(generator,
                                                                    at::cuda::detail::getDefaultCUDAGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->philox_cuda_state(4 * counters);
}

// (seed, first counter) of this call; torch offsets count 32-bit values, our counters 128-bit.
__device__ __forceinline__ void philox_seed_counter(const at::PhiloxCudaState& state, uint64_t* seed,
                                                    uint64_t* counter) {
  const auto unpacked = at::cuda::philox::unpack(state);
  *seed = std::get<0>(unpacked);
  *counter = std::get<1>(unpacked) / 4;
}

inline int num_blocks(int64_t work, int threads) {
  return static_cast<int>(std::min<int64_t>((work + threads - 1) / threads, 1 << 30));
}

}  // namespace tatitok_fast
