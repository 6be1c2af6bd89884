// Launchers of reft_kernels._C, defined in the .cu files with explicit instantiations for
// (T, W) = activation and parameter dtypes: (float, float), (__half, __half), (__half, float),
// (__nv_bfloat16, __nv_bfloat16), (__nv_bfloat16, float). Other parameter dtypes are passed as
// fp32 copies by the Python side. Also the tile constants and host-side grid arithmetic that
// the binding needs to size the fp32 partial buffers.
//
// Kernel choices (which parameter-gradient kernel, which finish) arrive in the parameter structs
// of reft_params.h, set by the binding from its arguments; nothing here reads the environment.
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

// RED backward: row tiles no wider than kRedBwdMaxX vectors (512 columns of fp16/bf16, 256 of
// fp32), so that wide rows still give ty >= 4 thread rows per block. A block then covers more
// rows for the same grid, which divides the (row blocks, d) fp32 partials and the finish's reads
// by up to 4 against full-width tiles (estimated for d = 4096 bf16 on 132 SMs: 264 -> 66 row
// blocks, ds + dt partials 8.6 -> 2.2 MB written and read again, beside 403 MB of g, h, dh), for
// a fixed-order sum over the 4 thread rows at the end of each block.
constexpr int kRedBwdMaxX = 64;

inline int red_bwd_block_x(int64_t d, int vec) { return std::min(red_block_x(d, vec), kRedBwdMaxX); }

// Row blocks of a backward that reduces over rows: about 4 blocks per SM in all, each covering
// a multiple of `row_quantum` rows. Returns rows per block; the block count is cdiv(n, that).
// (The scalar parameter-gradient kernel's plan, kept as it was; the other reductions plan from
// the occupancy of their compiled kernel: rows_per_block_for_wave.)
inline int64_t rows_per_block(int64_t n_rows, int64_t row_quantum, int64_t col_blocks, int sm_count) {
  const int64_t target = std::max<int64_t>(1, cdiv(4LL * sm_count, col_blocks));
  const int64_t quanta = cdiv(n_rows, row_quantum);
  const int64_t blocks = std::min(quanta, target);
  return cdiv(quanta, blocks) * row_quantum;
}

// Rows per block such that the grid (row blocks x col_tiles) is at most one wave of `wave`
// resident blocks (blocks per SM from cudaOccupancyMaxActiveBlocksPerMultiprocessor x SMs), each
// row block a multiple of `row_quantum` rows. One wave: every block does the same work and none
// waits for a second round; more row blocks would only grow the fp32 partials.
inline int64_t rows_per_block_for_wave(int64_t n_rows, int64_t row_quantum, int64_t col_tiles, int64_t wave) {
  const int64_t target = std::max<int64_t>(1, std::max<int64_t>(1, wave) / std::max<int64_t>(1, col_tiles));
  const int64_t quanta = std::max<int64_t>(1, cdiv(n_rows, row_quantum));
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

// Low-rank edit, parameter-gradient kernel (LowrankBwdParams::params_vector false, the default):
// each block owns kParamCols columns (one per thread), up to 16 ranks (grid z) and a range of
// rows, staged kParamRows at a time.
constexpr int kParamCols = 128;
constexpr int kParamRows = 32;
constexpr int kParamMaxRankChunk = 16;

// Ranks per block of the parameter-gradient kernel: the smallest of 4, 8, 16 covering min(r, 16).
inline int param_rank_chunk(int64_t r) { return r <= 4 ? 4 : (r <= 8 ? 8 : kParamMaxRankChunk); }

// Parameter-gradient kernel with 16-byte loads (LowrankBwdParams::params_vector): kParamVecWarps
// warps per block; lane l owns the V = vec_of<T>() columns from (column block * 32 + l) * V, so a
// block covers 32 V columns (256 for fp16/bf16, 128 for fp32), and RK ranks (grid x: the rank
// chunks of one tile are launched next to each other and share its g and x rows through L2).
// Latents of kParamVecRows rows are staged in shared memory at a time; warp w takes rows 16 w to
// 16 w + 15 of a stage, kParamVecUnroll rows per step with all their loads issued before their
// FMAs. The warps' accumulators are added in the fixed order
// w = 0, 1, 2, 3 through shared memory at the end. The rank chunk RK keeps RK x V accumulators
// per matrix in registers (lowrank_edit_bwd.cu: params_vec_max_chunk).
constexpr int kParamVecWarps = 4;
constexpr int kParamVecRows = 64;
constexpr int kParamVecUnroll = 4;
// Row blocks are multiples of this many rows (one unrolled step of every warp).
constexpr int kParamVecQuantum = kParamVecWarps * kParamVecUnroll;

template <typename T, typename W> void launch_red_fwd(const RedFwdParams& p, cudaStream_t stream);
template <typename T, typename W> void launch_red_bwd(const RedBwdParams& p, cudaStream_t stream);
template <typename T, typename W> void launch_lowrank_edit_fwd(const LowrankFwdParams& p, cudaStream_t stream);
template <typename T, typename W> void launch_lowrank_edit_bwd_dh(const LowrankBwdParams& p, cudaStream_t stream);
template <typename T> void launch_lowrank_edit_bwd_params(const LowrankBwdParams& p, cudaStream_t stream);
// The bias partials da_part, dc_part over p.rows_per_block row blocks (either may be nullptr).
void launch_lowrank_edit_bwd_bias(const LowrankBwdParams& p, cudaStream_t stream);

// Grid planning that reads the compiled kernels' occupancy (cudaOccupancyMaxActiveBlocksPerMultiprocessor):
// rows per block of the RED backward and of the parameter-gradient kernel that p.params_vector
// selects (from p's n_rows, d, r, tied). The caller sizes the fp32 partial buffers as
// cdiv(n_rows, that) rows.
template <typename T, typename W> int64_t red_bwd_rows_per_block(int64_t n_rows, int64_t d, int sm_count);
template <typename T> int64_t lowrank_edit_bwd_params_rows_per_block(const LowrankBwdParams& p, int sm_count);

// out[j] = sign * sum_{b < n_blocks} parts[b * width + j], in an order fixed by (n_blocks, width)
// and p.split (b = 0, 1, ... without it; partial_sum.cu).
void launch_partial_sum(const PartialSumParams& p, cudaStream_t stream);

}  // namespace reft
