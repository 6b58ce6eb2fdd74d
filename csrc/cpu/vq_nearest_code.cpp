// CPU kernel of vq_nearest_code: argmin_k ||z_n - e_k||^2 without the (N, K) matrix.
//
// argmin_k ||z - e_k||^2 = argmin_k (||e_k||^2 - 2 z.e_k). Two paths, both scanning codes
// in index order with a strict `<` per lane, so the lowest index wins ties as torch.argmin
// (equal codes get bit-equal dot products: every one is summed in the same order):
// - D >= kGemmMinD (TA-TiTok's 64, the VQGAN's 256): rows go kGemmRows at a time and the
//   codebook in tiles of ~kTileBytes (~L2); each (rows x tile) block of dot products is one
//   at::mm_out (MKL/BLAS sgemm) into a per-thread buffer that stays in cache, and the argmin
//   of en - 2 * dot is fused right after, tile by tile. The BLAS runs single-threaded inside
//   the parallel region (nested MKL threads oversubscribe the cores: 50x slower on 2 cores).
//   Extra memory: one (kGemmRows x tile) buffer per thread, never the (N, K) matrix.
// - small D (TiTok's 12): a register micro-kernel, 8 rows x 16 codes, on eT (D, Kp); the
//   dot products never leave registers (there a GEMM would be bound by writing its block).
// The reported distance is recomputed exactly as sum_d (z_d - e_d)^2 for the chosen code.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/cpu_vec.h"
#include "op_checks.h"
#include "ops.h"


namespace tatitok_fast {
namespace {

constexpr int64_t kRows = 8;         // rows per micro-tile
constexpr int64_t kLanes = 16;       // codes per micro-tile (one AVX-512 register)
constexpr int64_t kCodeChunk = 1024;  // codes per cache chunk: D*1024*4 bytes of eT
constexpr int64_t kRowChunk = 128;    // rows that reuse one code chunk
constexpr int64_t kGemmMinD = 32;     // from this D on, the BLAS path is faster
constexpr int64_t kGemmRows = 64;     // rows per sgemm block
constexpr int64_t kTileBytes = 256 * 1024;  // codebook tile bytes (~L2)

// 16 fp32 / int32 lanes; GCC/Clang lower these to one zmm, two ymm or four xmm registers
// depending on the clone chosen at run time.
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

// Best (value, index) so far, per row and lane; lanes are reduced at the end.
struct RowBest {
  v16f val;
  v16i idx;
};

void reset(RowBest* best, int64_t rows) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int j = 0; j < kLanes; ++j) {
      best[i].val[j] = std::numeric_limits<float>::infinity();
      best[i].idx[j] = 0;
    }
  }
}

// MKL_Set_Num_Threads_Local (MKL's C entry; the lowercase symbol is the Fortran one, taking
// int*), looked up at run time in the library that holds ATen (torch
// wheels link MKL statically into libtorch_cpu); nullptr on builds without MKL.
using SetThreadsLocal = int (*)(int);
SetThreadsLocal mkl_set_threads_local_fn() {
  static const SetThreadsLocal fn = []() -> SetThreadsLocal {
    Dl_info info;
    if (dladdr(reinterpret_cast<void*>(&at::get_num_threads), &info) == 0 || info.dli_fname == nullptr) {
      return nullptr;
    }
    void* lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    return lib == nullptr ? nullptr : reinterpret_cast<SetThreadsLocal>(dlsym(lib, "MKL_Set_Num_Threads_Local"));
  }();
  return fn;
}

// One BLAS thread in this scope (this thread only), restored on exit.
struct SerialBlas {
  SetThreadsLocal set = mkl_set_threads_local_fn();
  int previous = 0;
  SerialBlas() {
    if (set != nullptr) previous = set(1);
  }
  ~SerialBlas() {
    if (set != nullptr) set(previous);
  }
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

// Fused argmin over one sgemm block: dot (rows, ld) holds z.e for codes [k0, k0 + width)
// (width a multiple of kLanes; e_norm is +inf past K, so padded columns never win).
TF_MULTIVERSION
void scan_block(const float* dot, int64_t rows, int64_t ld, int64_t width, const float* e_norm, int64_t k0,
                RowBest* best) {
  v16i lane;
  for (int j = 0; j < kLanes; ++j) lane[j] = j;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = dot + r * ld;
    v16f bv = best[r].val;
    v16i bi = best[r].idx;
    for (int64_t j = 0; j < width; j += kLanes) {
      v16f s, en;
      std::memcpy(&s, row + j, sizeof(s));
      std::memcpy(&en, e_norm + k0 + j, sizeof(en));
      const v16f v = en - 2.0f * s;
      const v16i better = v < bv;  // strict: earlier codes win ties within a lane
      bv = better ? v : bv;
      bi = better ? (lane + static_cast<int32_t>(k0 + j)) : bi;
    }
    best[r].val = bv;
    best[r].idx = bi;
  }
}

// Lanes -> index (lowest index among equal values) and the exact distance of that code.
void finish_row(const RowBest& b, const float* zn, const float* ef, int64_t D, int64_t* index, float* distance) {
  float bv = b.val[0];
  int64_t bi = b.idx[0];
  for (int64_t j = 1; j < kLanes; ++j) {
    if (b.val[j] < bv || (b.val[j] == bv && b.idx[j] < bi)) {
      bv = b.val[j];
      bi = b.idx[j];
    }
  }
  *index = bi;  // a row of NaNs keeps index 0, as torch.argmin does
  const float* e = ef + bi * D;
  float s = 0.f;
  for (int64_t d = 0; d < D; ++d) {
    const float diff = zn[d] - e[d];
    s += diff * diff;
  }
  *distance = s;
}

void search_gemm(const at::Tensor& zf, const at::Tensor& ef, const float* np, int64_t* ip, float* dp) {
  const int64_t N = zf.size(0), D = zf.size(1), K = ef.size(0);
  const float* zp = zf.data_ptr<float>();
  const float* ep = ef.data_ptr<float>();
  // codes per tile: ~kTileBytes of codebook, a multiple of kLanes, at most K rounded up
  const int64_t Kp = (K + kLanes - 1) / kLanes * kLanes;
  const int64_t tile = std::min(Kp, std::max<int64_t>(kLanes, kTileBytes / (4 * D) / kLanes * kLanes));
  const int64_t row_blocks = (N + kGemmRows - 1) / kGemmRows;
  at::parallel_for(0, row_blocks, 1, [&](int64_t blk_begin, int64_t blk_end) {
    const SerialBlas serial;  // the parallelism is over row blocks
    // (rows, tile) block of z.e, stays in cache; zeroed once so that columns past K are finite
    at::Tensor dot = at::zeros({kGemmRows, tile}, zf.options());
    const float* dotp = dot.data_ptr<float>();
    RowBest best[kGemmRows];
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      const int64_t r0 = blk * kGemmRows, rows = std::min(kGemmRows, N - r0);
      const at::Tensor z_rows = zf.narrow(0, r0, rows);  // (rows, D)
      reset(best, rows);
      for (int64_t k0 = 0; k0 < K; k0 += tile) {
        const int64_t codes = std::min(tile, K - k0);
        at::Tensor out = dot.narrow(0, 0, rows).narrow(1, 0, codes);  // row stride `tile`
        at::mm_out(out, z_rows, ef.narrow(0, k0, codes).t());  // dot[r][c] = z_{r0+r} . e_{k0+c}
        const int64_t width = (codes + kLanes - 1) / kLanes * kLanes;  // stale columns meet +inf norms
        scan_block(dotp, rows, tile, width, np, k0, best);
      }
      for (int64_t r = 0; r < rows; ++r) finish_row(best[r], zp + (r0 + r) * D, ep, D, ip + r0 + r, dp + r0 + r);
    }
  });
}

void search_micro(const float* zp, int64_t N, int64_t D, const float* ep, int64_t K, const at::Tensor& ef,
                  const float* np, int64_t* ip, float* dp) {
  const int64_t Kp = (K + kLanes - 1) / kLanes * kLanes;
  // eT (D, Kp): padded codes are zero with +inf norm, so they never win.
  at::Tensor eT = at::zeros({D, Kp}, ef.options());
  eT.narrow(1, 0, K).copy_(ef.t());
  const float* eTp = eT.data_ptr<float>();
  // Each task owns a contiguous run of rows and all codes; rows go kRowChunk at a time so
  // that one chunk of eT is reused by many rows while it sits in cache.
  const int64_t row_blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, row_blocks, 1, [&](int64_t blk_begin, int64_t blk_end) {
    RowBest best[kRowChunk];
    for (int64_t c0 = blk_begin * kRows; c0 < std::min(blk_end * kRows, N); c0 += kRowChunk) {
      const int64_t c1 = std::min({c0 + kRowChunk, blk_end * kRows, N});
      reset(best, c1 - c0);
      for (int64_t k0 = 0; k0 < Kp; k0 += kCodeChunk) {
        scan_chunk(zp, N, D, eTp, Kp, np, c0, c1, k0, std::min(k0 + kCodeChunk, Kp), best);
      }
      for (int64_t n = c0; n < c1; ++n) finish_row(best[n - c0], zp + n * D, ep, D, ip + n, dp + n);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> vq_nearest_code_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                       bool l2_normalize) {
  check_vq_args(z, codebook);
  const int64_t N = z.size(0), D = z.size(1), K = codebook.size(0);
  auto indices = at::empty({N}, z.options().dtype(at::kLong));
  auto distances = at::empty({N}, z.options().dtype(at::kFloat));
  if (N == 0) return {indices, distances};

  // detached: the search is not differentiable, and the BLAS path calls at::mm_out on worker
  // threads, where grad mode is on whatever the caller's (a Parameter there would be refused)
  at::Tensor zf = z.detach().to(at::kFloat).contiguous();
  at::Tensor ef = codebook.detach().to(at::kFloat).contiguous();
  if (l2_normalize) {  // as torch.nn.functional.normalize(x, dim=-1): x / max(||x||, 1e-12)
    zf = zf / zf.norm(2, 1, true).clamp_min(1e-12);
    ef = ef / ef.norm(2, 1, true).clamp_min(1e-12);
  }
  const int64_t Kp = (K + kLanes - 1) / kLanes * kLanes;
  // ||e_k||^2, padded to Kp with +inf so that padded codes never win
  at::Tensor e_norm = at::full({Kp}, std::numeric_limits<float>::infinity(), zf.options());
  e_norm.narrow(0, 0, K).copy_((ef * ef).sum(1));

  const float* zp = zf.data_ptr<float>();
  const float* ep = ef.data_ptr<float>();
  const float* np = e_norm.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  float* dp = distances.data_ptr<float>();
  if (D >= kGemmMinD) {
    search_gemm(zf, ef, np, ip, dp);
  } else {
    search_micro(zp, N, D, ep, K, ef, np, ip, dp);
  }
  return {indices, distances};
}

}  // namespace tatitok_fast
