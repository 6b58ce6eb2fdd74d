// Host-side helpers of the CUDA ops (cuda/*.cpp): torch's CUDA generator, grid sizes, the
// dtype the kernels are dispatched on.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <mutex>
#include <optional>

#include "cuda/launch.h"

namespace tatitok_fast {

// Reserve `counters` Philox counters (4 x 32-bit values each) per stream from torch's CUDA
// generator. Under CUDA-graph capture the offset is read on device at replay.
inline at::PhiloxCudaState reserve_philox(std::optional<at::Generator> generator, uint64_t counters) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(generator,
                                                                    at::cuda::detail::getDefaultCUDAGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->philox_cuda_state(4 * counters);
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

// A floating tensor's dtype for the launchers (the op checks have refused any other dtype).
inline cuda::Dtype kernel_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kDouble: return cuda::Dtype::kFloat64;
    case at::kFloat: return cuda::Dtype::kFloat32;
    case at::kHalf: return cuda::Dtype::kFloat16;
    case at::kBFloat16: return cuda::Dtype::kBFloat16;
    default: TORCH_CHECK(false, op, ": expected a floating tensor (float64, float32, float16 or bfloat16), got ",
                         t.scalar_type());
  }
}

}  // namespace tatitok_fast
