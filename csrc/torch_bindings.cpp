// Schemas of every tatitok_fast op (one TORCH_LIBRARY), and the Python module init.
// Kernels are registered per backend: cpu/cpu_bindings.cpp, cuda/cuda_bindings.cpp.
// Fake (meta) implementations and autograd live in tatitok_fast/ops/_library.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(tatitok_fast, m) {
  // Nearest codebook entry per row of z, never materialising the (N, K) distance matrix.
  m.def("vq_nearest_code(Tensor z, Tensor codebook, bool l2_normalize) -> (Tensor indices, Tensor distances)");
  // Diagonal Gaussian posterior in one pass: split, clamp, exp, reparameterised sample, KL.
  m.def(
      "kl_sample(Tensor parameters, Tensor? noise, bool deterministic, Generator? generator) "
      "-> (Tensor sample, Tensor mean, Tensor std, Tensor kl)");
  // Gradient of kl_sample w.r.t. parameters.
  m.def(
      "kl_sample_backward(Tensor? grad_sample, Tensor? grad_mean, Tensor? grad_std, Tensor? grad_kl, "
      "Tensor parameters, Tensor sample, bool deterministic) -> Tensor");
  // One MaskGen-VQ sampling step: CFG, temperature, gumbel-max sample, confidence, re-mask.
  m.def(
      "maskgen_unmask_step(Tensor logits, Tensor? uncond_logits, float guidance_scale, Tensor ids, "
      "int mask_token_id, Tensor? mask_len_per_row, int mask_len, float softmax_temperature, "
      "float sample_temperature, float confidence_temperature, bool last_step, Tensor? sample_noise, "
      "Tensor? confidence_noise, Generator? generator) -> Tensor");
  // MaskGen-KL: next mask from random orders, and the positions to predict this step.
  m.def("mask_by_order(Tensor orders, Tensor mask, int mask_len, bool last_step) -> (Tensor, Tensor)");
}

// `import tatitok_fast._C` runs the static registrations above; the module itself is empty.
static struct PyModuleDef tatitok_fast_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, 0, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&tatitok_fast_module); }
