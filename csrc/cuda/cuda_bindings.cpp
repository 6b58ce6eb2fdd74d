// CUDA kernels of every op declared in ../torch_bindings.cpp.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(tatitok_fast, CUDA, m) {
  m.impl("vq_nearest_code", &tatitok_fast::vq_nearest_code_cuda);
  m.impl("kl_sample", &tatitok_fast::kl_sample_cuda);
  m.impl("kl_sample_backward", &tatitok_fast::kl_sample_backward_cuda);
  m.impl("maskgen_unmask_step", &tatitok_fast::maskgen_unmask_step_cuda);
  m.impl("mask_by_order", &tatitok_fast::mask_by_order_cuda);
}
