// Launchers of reft_kernels._C, defined in the .cu files with explicit instantiations for
// (T, W) = activation and parameter dtypes: (float, float), (__half, __half), (__half, float),
// (__nv_bfloat16, __nv_bfloat16), (__nv_bfloat16, float). Other parameter dtypes are passed as
// fp32 copies by the Python side. Also the tile constants and host-side grid arithmetic that
// the binding needs to size the fp32 partial buffers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "reft_params.h"

// Kernel launch. REFT_CPU_EMULATION builds (tests/cuda/emulation) run each CUDA thread as a host
// thread instead; `kernel` is a plain name (assign a template instance to a variable first).
#ifdef REFT_CPU_EMULATION
#define REFT_LAUNCH(kernel, grid, block, stream, ...) ::reft_emu::launch(kernel, dim3(grid), dim3(block), __VA_ARGS__)
#else
#define REFT_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

namespace reft {

// Activation codes: the values of reft_kernels/_constants.py (the extension exports
// kNumActivations and Python refuses a build whose count differs).
enum ActCode : int { kIdentity = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4, kTanh = 5, kSigmoid = 6 };
constexpr int kNumActivations = 7;

// Elements of T per 16-byte vector: the unit every row kernel loads and stores.
template <typename T> __host__ __device__ constexpr int vec_of() { return 16 / static_cast<int>(sizeof(T)); }

__host__ __device__ inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// RED: 256-thread blocks shaped (tx, ty): tx threads cover a row in 16-byte vectors (up to 256
// of them), ty = 256 / tx rows are processed side by side (small d keeps every thread busy).
constexpr int kRedThreads = 256;

inline int red_block_x(int64_t d, int vec) {
  const int64_t n_vec = cdiv(d, vec);
  int tx = 1;
  while (tx < n_vec && tx < kRedThreads) tx *= 2;
  return tx;
}

// Row blocks of a backward that reduces over rows: about 4 blocks per SM in all, each covering
// a multiple of `row_quantum` rows. Returns rows per block; the block count is cdiv(n, that).
inline int64_t rows_per_block(int64_t n_rows, int64_t row_quantum, int64_t col_blocks, int sm_count) {
  const int64_t target = std::max<int64_t>(1, cdiv(4LL * sm_count, col_blocks));
  const int64_t quanta = cdiv(n_rows, row_quantum);
  const int64_t blocks = std::min(quanta, target);
  return cdiv(quanta, blocks) * row_quantum;
}

// Low-rank edit, row-group kernels (forward; backward dh): each warp owns kRowsPerWarp rows and
// computes their latents kRankChunk ranks at a time (kRowsPerWarp * kRankChunk = 32, one value
// per lane after the reduce-scatter); kWarps warps per block.
// ptxas guards the warp shuffles with re-convergence subroutine calls; with a plain
// __launch_bounds__(128) it aimed at 168 registers and spilled around those calls in some
// instantiations (tools/cuda_compile_check.py, sm_80 and sm_90). __launch_bounds__(128, 1)
// lets it use up to 255: the kernels then take 92-200 registers with no spills.
constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kRankChunk = 8;
// Also reft_kernels/_constants.py CUDA_MAX_RANK (the extension exports it; Python checks on load).
constexpr int kMaxRank = 64;

// Low-rank edit, parameter-gradient kernel: each block owns kParamCols columns (one per thread),
// up to 16 ranks (grid z) and a range of rows, staged kParamRows at a time.
constexpr int kParamCols = 128;
constexpr int kParamRows = 32;
constexpr int kParamMaxRankChunk = 16;

// Ranks per block of the parameter-gradient kernel: the smallest of 4, 8, 16 covering min(r, 16).
inline int param_rank_chunk(int64_t r) { return r <= 4 ? 4 : (r <= 8 ? 8 : kParamMaxRankChunk); }

template <typename T, typename W> void launch_red_fwd(const RedFwdParams& p, cudaStream_t stream);
template <typename T, typename W> void launch_red_bwd(const RedBwdParams& p, cudaStream_t stream);
template <typename T, typename W> void launch_lowrank_edit_fwd(const LowrankFwdParams& p, cudaStream_t stream);
template <typename T, typename W> void launch_lowrank_edit_bwd_dh(const LowrankBwdParams& p, cudaStream_t stream);
template <typename T> void launch_lowrank_edit_bwd_params(const LowrankBwdParams& p, cudaStream_t stream);

// out[j] = sign * sum_{b < n_blocks} parts[b * width + j], summed in order b = 0, 1, ...
void launch_partial_sum(const float* parts, int64_t n_blocks, int64_t width, float sign, float* out,
                        cudaStream_t stream);

}  // namespace reft
