// TF_HD marks small inline functions compiled for both the CPU and the CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define TF_HD __host__ __device__ __forceinline__
#else
#define TF_HD inline
#endif
