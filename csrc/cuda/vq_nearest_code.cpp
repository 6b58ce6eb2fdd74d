// Host side of the CUDA vq_nearest_code: checks, the optional l2 normalisation, the choice of
// path (tensor cores when the loaded kernel image has them) and the grids; the kernels are in
// vq_nearest_code_kernels.cu.
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

#include "cuda/host_utils.h"
#include "op_checks.h"
#include "ops.h"

namespace tatitok_fast {
namespace {

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// The tensor-core kernel needs an sm_80+ GPU and a loaded image compiled for compute_80+.
bool mma_kernel_usable(cuda::Dtype dtype, int device) {
  if (device_attribute(cudaDevAttrComputeCapabilityMajor, device) < 8) return false;
  int ptx_version = 0;
  C10_CUDA_CHECK(cuda::vq_mma_ptx_version(dtype, &ptx_version));
  return ptx_version >= 80;
}

// Split the codes so that about two blocks per SM run even when N is small:
// (codes per split, splits used).
std::pair<int64_t, int64_t> code_splits(int64_t N, int64_t K, int rows, int codes, int64_t want) {
  const int64_t row_blocks = (N + rows - 1) / rows, code_tiles = (K + codes - 1) / codes;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(code_tiles, (want + row_blocks - 1) / row_blocks));
  const int64_t codes_per_split = (code_tiles + splits - 1) / splits * codes;
  return {codes_per_split, (K + codes_per_split - 1) / codes_per_split};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> vq_nearest_code_cuda(const at::Tensor& z, const at::Tensor& codebook,
                                                        bool l2_normalize) {
  check_vq_args(z, codebook);
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t N = z.size(0), D = z.size(1), K = codebook.size(0);
  auto indices = at::empty({N}, z.options().dtype(at::kLong));
  auto distances = at::empty({N}, z.options().dtype(at::kFloat));
  if (N == 0) return {indices, distances};

  at::Tensor zc = z.contiguous(), ec = codebook.contiguous();
  if (l2_normalize) {  // as torch.nn.functional.normalize(x, dim=-1), in fp32
    zc = zc.to(at::kFloat);
    ec = ec.to(at::kFloat);
    zc = zc / zc.norm(2, 1, true).clamp_min(1e-12);
    ec = ec / ec.norm(2, 1, true).clamp_min(1e-12);
  }
  const at::Tensor e_norm = ec.to(at::kFloat).pow(2).sum(1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int device = z.get_device();
  const int64_t want = 2 * static_cast<int64_t>(device_attribute(cudaDevAttrMultiProcessorCount, device));
  const cuda::Dtype dtype = kernel_dtype(zc, "vq_nearest_code");
  const auto f32 = z.options().dtype(at::kFloat);

  if (mma_kernel_usable(dtype, device) && K <= std::numeric_limits<int32_t>::max() - cuda::kVqMmaCodes) {
    const auto [codes_per_split, splits] = code_splits(N, K, cuda::kVqMmaRows, cuda::kVqMmaCodes, want);
    auto part_v = at::empty({splits, N, cuda::kVqCand}, f32);
    auto part_k = at::empty({splits, N, cuda::kVqCand}, z.options().dtype(at::kInt));
    auto part_t = at::empty({splits, N}, f32);
    const at::Tensor e_norm_max_sq = e_norm.max();  // 0-d, stays on the device
    // fp32 inputs are rounded to TF32 (2^-10 covers nearest and truncation); bf16/fp16 are exact
    const double u_in = zc.scalar_type() == at::kFloat ? 9.765625e-04 : 0.0;
    C10_CUDA_CHECK(cuda::launch_vq_mma(
        dtype, zc.data_ptr(), ec.data_ptr(), e_norm.data_ptr<float>(), e_norm_max_sq.data_ptr<float>(), N, K, D,
        codes_per_split, grid_blocks((N + cuda::kVqMmaRows - 1) / cuda::kVqMmaRows, "vq_nearest_code"),
        static_cast<unsigned>(splits), num_blocks(N, cuda::kVqThreads / 32, "vq_nearest_code"),
        grid_blocks(N, "vq_nearest_code"), u_in, part_v.data_ptr<float>(), part_k.data_ptr<int32_t>(),
        part_t.data_ptr<float>(), indices.data_ptr<int64_t>(), distances.data_ptr<float>(), stream));
    return {indices, distances};
  }

  const auto [codes_per_split, splits] = code_splits(N, K, cuda::kVqSimtRows, cuda::kVqSimtCodes, want);
  auto part_v = at::empty({splits, N}, f32);
  auto part_k = at::empty({splits, N}, z.options().dtype(at::kLong));
  C10_CUDA_CHECK(cuda::launch_vq_simt(
      dtype, zc.data_ptr(), ec.data_ptr(), e_norm.data_ptr<float>(), N, K, D, codes_per_split,
      grid_blocks((N + cuda::kVqSimtRows - 1) / cuda::kVqSimtRows, "vq_nearest_code"), static_cast<unsigned>(splits),
      num_blocks(N, cuda::kVqThreads / 16, "vq_nearest_code"), part_v.data_ptr<float>(),
      part_k.data_ptr<int64_t>(), indices.data_ptr<int64_t>(), distances.data_ptr<float>(), stream));
  return {indices, distances};
}

}  // namespace tatitok_fast
