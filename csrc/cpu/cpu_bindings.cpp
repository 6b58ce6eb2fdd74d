// CPU kernels of every op declared in ../torch_bindings.cpp.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(tatitok_fast, CPU, m) {
  m.impl("vq_nearest_code", &tatitok_fast::vq_nearest_code_cpu);
  m.impl("kl_sample", &tatitok_fast::kl_sample_cpu);
  m.impl("kl_sample_backward", &tatitok_fast::kl_sample_backward_cpu);
  m.impl("maskgen_unmask_step", &tatitok_fast::maskgen_unmask_step_cpu);
  m.impl("mask_by_order", &tatitok_fast::mask_by_order_cpu);
}
