// The interface between the host side of the CUDA ops (cuda/*.cpp: argument checks, output
// allocation, streams, torch's generator; compiled once by the C++ compiler) and their kernels
// (cuda/*_kernels.cu: compiled by nvcc once per GPU architecture). Nothing here includes ATen:
// nvcc parses a .cu once per architecture, and ATen.h alone cost 155 s of CPU for the seven
// default architectures (measured on 2 AMD EPYC cores), against 8 s for the kernels' headers.
//
// Every launch_* enqueues its kernels on `stream` and returns cudaGetLastError(); the host
// side turns a failure into a torch error (C10_CUDA_CHECK).
#pragma once

#include <cstdint>

#include <ATen/cuda/PhiloxCudaState.h>
#include <cuda_runtime_api.h>

#include "kl_math.h"

namespace tatitok_fast::cuda {

// The floating dtypes of the ops' inputs (AT_DISPATCH_FLOATING_TYPES_AND2(Half, BFloat16)).
enum class Dtype : int { kFloat64, kFloat32, kFloat16, kBFloat16 };

// ---- vq_nearest_code (vq_nearest_code_kernels.cu) ----------------------------------------
// The tensor-core path's tiles and candidate count: the host sizes part_* with them.
constexpr int kVqMmaRows = 64, kVqMmaCodes = 64, kVqCand = 4;
constexpr int kVqSimtRows = 64, kVqSimtCodes = 64;

// ptxVersion of the image the driver loads for the tensor-core candidates kernel of `dtype`
// on the current device (the kernel has a body only when it is >= 80).
cudaError_t vq_mma_ptx_version(Dtype dtype, int* ptx_version);

// z (N, D), e (K, D) of `dtype`, e_norm (K,) fp32 -> out_idx (N,) int64, out_dist (N,) fp32.
// row_blocks x splits blocks; part_v / part_k / part_t hold (splits, N, kVqCand) / (splits, N).
cudaError_t launch_vq_mma(Dtype dtype, const void* z, const void* e, const float* e_norm,
                          const float* e_norm_max_sq, int64_t N, int64_t K, int64_t D, int64_t codes_per_split,
                          unsigned row_blocks, unsigned splits, unsigned finish_blocks, unsigned exact_blocks,
                          double u_in, float* part_v, int32_t* part_k, float* part_t, int64_t* out_idx,
                          float* out_dist, cudaStream_t stream);
// The SIMT path: part_v / part_k hold (splits, N).
cudaError_t launch_vq_simt(Dtype dtype, const void* z, const void* e, const float* e_norm, int64_t N, int64_t K,
                           int64_t D, int64_t codes_per_split, unsigned row_blocks, unsigned splits,
                           unsigned finish_blocks, float* part_v, int64_t* part_k, int64_t* out_idx, float* out_dist,
                           cudaStream_t stream);
constexpr int kVqThreads = 256;  // finish kernels: 16 (SIMT) or 32 (tensor cores) lanes per row

// ---- kl_sample (kl_sample_kernels.cu) ------------------------------------------------------
constexpr int kKlThreads = 128;  // one thread per (b, w) column
cudaError_t launch_kl_sample(Dtype dtype, const void* p, const float* eps, int64_t B, int64_t C, int64_t H,
                             int64_t W, bool deterministic, at::PhiloxCudaState rng, float* sample, float* mean,
                             float* std_out, float* kl, unsigned blocks, cudaStream_t stream);
cudaError_t launch_kl_backward(const float* p, const float* sample, KLGrads grads, int64_t B, int64_t C, int64_t H,
                               int64_t W, bool deterministic, float* grad, unsigned blocks, cudaStream_t stream);

// ---- MaskGen sampling (maskgen_sampling_kernels.cu) ------------------------------------------
// Pass 1, one block per (b, l): the sampled id and its confidence. Pass 2, one block of
// `select_threads` per row with L floats of shared memory: the re-mask.
cudaError_t launch_unmask_step(Dtype dtype, const void* logits, const void* uncond, float cfg, const int64_t* ids,
                               int64_t mask_token_id, int64_t B, int64_t L, int64_t K, float inv_temp, float t_sample,
                               float t_conf, const float* sample_noise, const float* conf_noise,
                               at::PhiloxCudaState rng, const int64_t* mask_len_per_row, int64_t mask_len,
                               bool last_step, int64_t* sampled, float* conf, int64_t* out, unsigned sample_blocks,
                               unsigned rows, int select_threads, cudaStream_t stream);
cudaError_t launch_mask_by_order(const int64_t* orders, const bool* mask, int64_t L, int64_t mask_len, bool last_step,
                                 bool* next, bool* to_pred, unsigned rows, int threads, cudaStream_t stream);

}  // namespace tatitok_fast::cuda
