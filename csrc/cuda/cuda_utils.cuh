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

// The kernels have no grid-stride loops: one thread (or warp, or block) per work item, so
// the grid must cover all the work. gridDim.x is at most 2^31 - 1: refuse a launch that
// would need more blocks (a clear error instead of silently skipped items).
inline unsigned grid_blocks(int64_t blocks, const char* op) {
  constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;
  TORCH_CHECK(blocks <= kMaxGridX, op, ": the input needs ", blocks, " thread blocks, more than the ",
              kMaxGridX, " a CUDA grid holds; split the input into smaller calls");
  return static_cast<unsigned>(blocks);
}

// Blocks of `threads` work items covering `work` items.
inline unsigned num_blocks(int64_t work, int threads, const char* op) {
  return grid_blocks((work + threads - 1) / threads, op);
}

}  // namespace tatitok_fast
