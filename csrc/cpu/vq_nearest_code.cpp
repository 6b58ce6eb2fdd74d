// CPU kernel of vq_nearest_code: argmin_k ||z_n - e_k||^2 without the (N, K) matrix.
//
// argmin_k ||z - e_k||^2 = argmin_k (||e_k||^2 - 2 z.e_k). The codebook is transposed once
// to eT (D, Kp) so that a micro-kernel computes an 8-row x 16-code tile of dot products
// with the 16 codes in vector lanes (no horizontal sums), in the same order for every
// element, so identical codes give identical scores and the lowest index wins, as
// torch.argmin does. Codes are walked in L2-sized chunks; rows are split across threads.
// The reported distance is recomputed exactly as sum_d (z_d - e_d)^2 for the chosen code.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "cpu/cpu_vec.h"
#include "op_checks.h"
#include "ops.h"


namespace tatitok_fast {
namespace {

constexpr int64_t kRows = 8;         // rows per micro-tile
constexpr int64_t kLanes = 16;       // codes per micro-tile (one AVX-512 register)
constexpr int64_t kCodeChunk = 1024;  // codes per cache chunk: D*1024*4 bytes of eT
constexpr int64_t kRowChunk = 128;    // rows that reuse one code chunk

// 16 fp32 / int32 lanes; GCC/Clang lower these to one zmm, two ymm or four xmm registers
// depending on the clone chosen at run time.
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

// Best (value, index) so far, per row and lane; lanes are reduced at the end.
struct RowBest {
  v16f val;
  v16i idx;
};

// Rows [row_begin, row_end) against codes [k_begin, k_end) (multiples of kLanes, within Kp).
TF_MULTIVERSION
void scan_chunk(const float* z, int64_t N, int64_t D, const float* eT, int64_t Kp, const float* e_norm,
                int64_t row_begin, int64_t row_end, int64_t k_begin, int64_t k_end, RowBest* best) {
  v16i lane;
  for (int j = 0; j < kLanes; ++j) lane[j] = j;
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kRows) {
    const float* zr[kRows];
    for (int64_t r = 0; r < kRows; ++r) zr[r] = z + std::min(r0 + r, N - 1) * D;  // tail rows repeat the last
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kLanes) {
      v16f acc[kRows];
#pragma GCC unroll 8
      for (int64_t r = 0; r < kRows; ++r) acc[r] = v16f{} ;
      for (int64_t d = 0; d < D; ++d) {
        v16f e;
        std::memcpy(&e, eT + d * Kp + k0, sizeof(e));
#pragma GCC unroll 8
        for (int64_t r = 0; r < kRows; ++r) acc[r] += zr[r][d] * e;
      }
      v16f en;
      std::memcpy(&en, e_norm + k0, sizeof(en));
      const v16i kv = lane + static_cast<int32_t>(k0);
#pragma GCC unroll 8
      for (int64_t r = 0; r < kRows; ++r) {
        if (r0 + r >= row_end) break;
        RowBest& b = best[r0 + r - row_begin];
        const v16f v = en - 2.0f * acc[r];
        const v16i better = v < b.val;  // strict: earlier codes win ties within a lane
        b.val = better ? v : b.val;
        b.idx = better ? kv : b.idx;
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> vq_nearest_code_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                       bool l2_normalize) {
  check_vq_args(z, codebook);
  const int64_t N = z.size(0), D = z.size(1), K = codebook.size(0);
  auto indices = at::empty({N}, z.options().dtype(at::kLong));
  auto distances = at::empty({N}, z.options().dtype(at::kFloat));
  if (N == 0) return {indices, distances};

  at::Tensor zf = z.to(at::kFloat).contiguous();
  at::Tensor ef = codebook.to(at::kFloat).contiguous();
  if (l2_normalize) {  // as torch.nn.functional.normalize(x, dim=-1): x / max(||x||, 1e-12)
    zf = zf / zf.norm(2, 1, true).clamp_min(1e-12);
    ef = ef / ef.norm(2, 1, true).clamp_min(1e-12);
  }
  const int64_t Kp = (K + kLanes - 1) / kLanes * kLanes;
  // eT (D, Kp): padded codes are zero with +inf norm, so they never win.
  at::Tensor eT = at::zeros({D, Kp}, zf.options());
  eT.narrow(1, 0, K).copy_(ef.t());
  at::Tensor e_norm = at::full({Kp}, std::numeric_limits<float>::infinity(), zf.options());
  e_norm.narrow(0, 0, K).copy_((ef * ef).sum(1));

  const float* zp = zf.data_ptr<float>();
  const float* ep = ef.data_ptr<float>();
  const float* eTp = eT.data_ptr<float>();
  const float* np = e_norm.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  float* dp = distances.data_ptr<float>();

  // Each task owns a contiguous run of rows and all codes; rows go kRowChunk at a time so
  // that one chunk of eT is reused by many rows while it sits in cache.
  const int64_t row_blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, row_blocks, 1, [&](int64_t blk_begin, int64_t blk_end) {
    RowBest best[kRowChunk];
    for (int64_t c0 = blk_begin * kRows; c0 < std::min(blk_end * kRows, N); c0 += kRowChunk) {
      const int64_t c1 = std::min({c0 + kRowChunk, blk_end * kRows, N});
      for (int64_t i = 0; i < c1 - c0; ++i) {
        for (int j = 0; j < kLanes; ++j) {
          best[i].val[j] = std::numeric_limits<float>::infinity();
          best[i].idx[j] = 0;
        }
      }
      for (int64_t k0 = 0; k0 < Kp; k0 += kCodeChunk) {
        scan_chunk(zp, N, D, eTp, Kp, np, c0, c1, k0, std::min(k0 + kCodeChunk, Kp), best);
      }
      for (int64_t n = c0; n < c1; ++n) {
        const RowBest& b = best[n - c0];
        float bv = b.val[0];
        int64_t bi = b.idx[0];
        for (int64_t j = 1; j < kLanes; ++j) {
          if (b.val[j] < bv || (b.val[j] == bv && b.idx[j] < bi)) {
            bv = b.val[j];
            bi = b.idx[j];
          }
        }
        ip[n] = bi;  // a row of NaNs keeps index 0, as torch.argmin does
        const float* zn = zp + n * D;
        const float* e = ep + bi * D;
        float s = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          const float diff = zn[d] - e[d];
          s += diff * diff;
        }
        dp[n] = s;
      }
    }
  });
  return {indices, distances};
}

}  // namespace tatitok_fast
