// Device-side helpers of the CUDA kernels (cuda/*_kernels.cu): Philox state from torch's
// generator, and the dispatch of a launcher over the input dtype. Light headers only (see
// launch.h for why): c10's Half / BFloat16 convert with static_cast<float> on the device.
#pragma once

#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include "cuda/launch.h"

namespace tatitok_fast::cuda {

// (seed, first counter) of this call; torch offsets count 32-bit values, our counters 128-bit.
__device__ __forceinline__ void philox_seed_counter(const at::PhiloxCudaState& state, uint64_t* seed,
                                                    uint64_t* counter) {
  const auto unpacked = at::cuda::philox::unpack(state);
  *seed = std::get<0>(unpacked);
  *counter = std::get<1>(unpacked) / 4;
}

// fn(scalar_t{}) with scalar_t the C++ type of `dtype`; then the launch error, if any.
template <typename Fn>
cudaError_t dispatch_dtype(Dtype dtype, Fn&& fn) {
  switch (dtype) {
    case Dtype::kFloat64: fn(double{}); break;
    case Dtype::kFloat32: fn(float{}); break;
    case Dtype::kFloat16: fn(c10::Half{}); break;
    case Dtype::kBFloat16: fn(c10::BFloat16{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace tatitok_fast::cuda
