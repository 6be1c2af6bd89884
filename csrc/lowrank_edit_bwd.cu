// Low-rank edit backward, two kernels plus the fixed-order partial sums:
//
// lowrank_edit_bwd_dh_kernel (row groups, as the forward): gz = g B^T with warp reductions,
//   ga = gz * act'(u); both stored as (n, r) fp32; then dh = g + ga A - gz P streamed row by
//   row. g and dh rows follow the index when there is one (dh is then a copy of g whose listed
//   rows are overwritten; it never aliases g, whose rows the second kernel still reads).
// lowrank_edit_bwd_params_kernel (kernels(cuda_params="scalar"), the default), grid (row
//   blocks, column blocks, rank chunks): each thread owns one column and up to 16 ranks, stages
//   the latents of 32 rows at a time in shared memory and accumulates ga^T x (dA), z^T g -
//   [tied] gz^T x (dB) and gz^T x (dC) in fp32 registers; each block writes its partials to its
//   row of (row blocks, r, d) buffers. Scalar 2-byte loads of g and x, one row at a time:
//   about 4 KB in flight per SM (estimated 20-30% of HBM bandwidth, issue 11).
// lowrank_edit_bwd_params_vec_kernel (kernels(cuda_params="vector")), grid (rank chunks,
//   column blocks, row blocks): the same partials and the same fixed-order finish, from 16-byte
//   loads: each lane owns V = 8 (fp16/bf16) or 4 (fp32) consecutive columns, the four warps of a
//   block split the staged rows, and each warp issues the loads of 4 rows (4 x 2 x 16 bytes per
//   lane) before their FMAs. Estimated 32-48 KB in flight per SM (2-3 resident blocks of 128
//   threads, from the registers ptxas reports), above the ~18 KB that Little's law asks of an
//   H100 SM (3.35 TB/s / 132 SMs x ~700 ns).
// lowrank_edit_bwd_bias_kernel, grid (row blocks): the bias gradients' partials, sums of the
//   (n, r) latents ga and gz over the same row blocks as the parameter kernel.
// The choice of parameter kernel is LowrankBwdParams::params_vector, made in Python.
#include <c10/cuda/CUDAException.h>

#include <type_traits>

#include "lowrank_edit_common.cuh"
#include "static_switch.h"

namespace reft {

// __launch_bounds__(128, 1): see kWarps in launch.h.
template <typename T, typename W, bool HAS_A, bool HAS_P>
__global__ void __launch_bounds__(kWarps * 32, 1) lowrank_edit_bwd_dh_kernel(const LowrankBwdParams p) {
  __shared__ float s_ga[kWarps][kRowsPerWarp][kMaxRank];
  __shared__ float s_neg_gz[kWarps][kRowsPerWarp][kMaxRank];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* g = static_cast<const T*>(p.g);
  T* dh = static_cast<T*>(p.dh);
  const W* A = static_cast<const W*>(p.A);
  const W* B = static_cast<const W*>(p.B);
  const W* P = static_cast<const W*>(p.P);
  const int64_t n = p.n_rows, d = p.d, r = p.r;
  const int li = lane / kRankChunk, lk = lane % kRankChunk;

  // One row group per warp and no early exit (rows past the end are masked): every lane of every
  // warp reaches the shuffles.
  {
    const int64_t grp = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
    const int64_t m0 = grp * kRowsPerWarp;
    int64_t g_off[kRowsPerWarp], dh_off[kRowsPerWarp];
    bool ok[kRowsPerWarp];
    group_rows(p.idx, m0, n, p.g_row_stride, p.dh_row_stride, g_off, dh_off, ok);
    const int64_t ml = m0 + li;
    int64_t src_l;
    const bool ok_l = row_source(p.idx, ml, n, src_l);

    for (int64_t k0 = 0; k0 < r; k0 += kRankChunk) {
      float acc[32], unused[32];
      group_latent<T, W, true, false>(g, g_off, ok, p.g_col_stride, p.vec_ok, B, static_cast<const W*>(nullptr), d,
                                      r, k0, p.wvec_ok, lane, acc, unused);
      warp_reduce_scatter32(acc, lane);
      const int64_t k = k0 + lk;
      if (k < r) {
        const float gz = ok_l ? acc[0] : 0.f;
        float ga = gz;
        if (p.u != nullptr && ok_l) ga = gz * act_grad(p.u[ml * r + k], p.act);
        s_ga[warp][li][k] = ga;
        s_neg_gz[warp][li][k] = -gz;
        if (ml < n) {
          p.gz[ml * r + k] = gz;
          if (p.ga != nullptr) p.ga[ml * r + k] = ga;
        }
      }
    }
    __syncwarp();
    if (dh != nullptr) {
      group_expand<T, W, HAS_A, HAS_P>(g, g_off, p.g_col_stride, dh, dh_off, p.dh_col_stride, ok, p.vec_ok,
                                       s_ga[warp], s_neg_gz[warp], A, P, d, r, p.wvec_ok, lane,
                                       static_cast<T*>(nullptr), m0);
    }
  }
}

// Stages rows t0 .. t0 + ROWS - 1 (those before row_end) for a parameter-gradient kernel's ranks
// k0 .. k0 + RK - 1: the latents gz, ga (gz for the identity activation) and z (when need_b) in
// fp32, zero on rows past row_end and ranks past r, and with ZERO_PADDING on padding rows (-1 in
// the index) too, for a kernel whose masked rows still run their FMAs (the vector kernel; the
// scalar one skips them, and reading the index per latent there cost 8 registers: 64 -> 72 on
// sm_90, tools/cuda_compile_check.py); and each row's element offset in g and in x, -1 where the
// row is not real. `nt` threads share the work; the caller synchronises before reading the stage.
template <int ROWS, int RK, bool ZERO_PADDING>
__device__ __forceinline__ void stage_param_rows(const LowrankBwdParams& p, int64_t t0, int64_t row_end, int64_t k0,
                                                 bool need_b, int tid, int nt, float (*s_gz)[RK], float (*s_ga)[RK],
                                                 float (*s_z)[RK], int64_t* s_g_off, int64_t* s_x_off) {
  const int64_t n = p.n_rows, r = p.r;
  for (int e = tid; e < ROWS * RK; e += nt) {
    const int i = e / RK, kk = e % RK;
    const int64_t m = t0 + i, k = k0 + kk;
    int64_t src;
    const bool v = m < row_end && k < r && (!ZERO_PADDING || row_source(p.idx, m, n, src));
    const int64_t o = m * r + k;
    const float gz = v ? p.gz[o] : 0.f;
    s_gz[i][kk] = gz;
    s_ga[i][kk] = (v && p.ga != nullptr) ? p.ga[o] : gz;
    s_z[i][kk] = (v && need_b) ? p.z[o] : 0.f;
  }
  if (tid < ROWS) {
    const int64_t m = t0 + tid;
    int64_t src;
    const bool ok = m < row_end && row_source(p.idx, m, n, src);
    s_g_off[tid] = ok ? src * p.g_row_stride : -1;
    s_x_off[tid] = ok ? m * p.x_row_stride : -1;
  }
}

template <typename T, int RK, bool TIED>
__global__ void __launch_bounds__(kParamCols) lowrank_edit_bwd_params_kernel(const LowrankBwdParams p) {
  __shared__ float s_z[kParamRows][RK];
  __shared__ float s_gz[kParamRows][RK];
  __shared__ float s_ga[kParamRows][RK];
  __shared__ int64_t s_g_off[kParamRows];  // -1: not a real row
  __shared__ int64_t s_x_off[kParamRows];
  const T* __restrict__ g = static_cast<const T*>(p.g);
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int tid = threadIdx.x;
  const int64_t n = p.n_rows, d = p.d, r = p.r;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kParamCols + tid;
  const bool col_ok = col < d;
  const int64_t k0 = static_cast<int64_t>(blockIdx.z) * RK;
  const bool need_a = p.dA_part != nullptr, need_b = p.dB_part != nullptr, need_c = p.dC_part != nullptr;
  const bool need_x = need_a || need_c || (TIED && need_b);

  float acc_a[RK], acc_b[RK], acc_c[RK];
#pragma unroll
  for (int kk = 0; kk < RK; ++kk) acc_a[kk] = acc_b[kk] = acc_c[kk] = 0.f;

  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * p.rows_per_block;
  const int64_t row_end = min64(n, row_begin + p.rows_per_block);
  for (int64_t t0 = row_begin; t0 < row_end; t0 += kParamRows) {
    __syncthreads();  // the previous tile is consumed
    stage_param_rows<kParamRows, RK, false>(p, t0, row_end, k0, need_b, tid, kParamCols, s_gz, s_ga, s_z, s_g_off,
                                            s_x_off);
    __syncthreads();
    const int rows = static_cast<int>(min64(kParamRows, row_end - t0));
    if (col_ok) {
#pragma unroll 2
      for (int i = 0; i < rows; ++i) {
        const int64_t go = s_g_off[i];
        if (go < 0) continue;  // padding row: uniform across the block
        const float gv = to_f32(g[go + col * p.g_col_stride]);
        const float xv = need_x ? to_f32(x[s_x_off[i] + col * p.x_col_stride]) : 0.f;
#pragma unroll
        for (int kk = 0; kk < RK; ++kk) {
          if (need_a) acc_a[kk] = fmaf(s_ga[i][kk], xv, acc_a[kk]);
          if (need_b) {
            acc_b[kk] = fmaf(s_z[i][kk], gv, acc_b[kk]);
            if (TIED) acc_b[kk] = fmaf(-s_gz[i][kk], xv, acc_b[kk]);
          }
          if (need_c) acc_c[kk] = fmaf(s_gz[i][kk], xv, acc_c[kk]);
        }
      }
    }
  }
  if (col_ok) {
#pragma unroll
    for (int kk = 0; kk < RK; ++kk) {
      const int64_t k = k0 + kk;
      if (k < r) {
        const int64_t o = (static_cast<int64_t>(blockIdx.x) * r + k) * d + col;
        if (need_a) p.dA_part[o] = acc_a[kk];
        if (need_b) p.dB_part[o] = acc_b[kk];
        if (need_c) p.dC_part[o] = acc_c[kk];
      }
    }
  }
}

template <typename T, typename W>
void launch_lowrank_edit_bwd_dh(const LowrankBwdParams& p, cudaStream_t stream) {
  if (p.n_rows == 0) return;
  const int64_t blocks = cdiv(cdiv(p.n_rows, kRowsPerWarp), kWarps);
  REFT_BOOL_SWITCH(p.A != nullptr, HAS_A, [&] {
    REFT_BOOL_SWITCH(p.P != nullptr, HAS_P, [&] {
      const auto kernel = lowrank_edit_bwd_dh_kernel<T, W, HAS_A, HAS_P>;
      REFT_LAUNCH(kernel, static_cast<unsigned>(blocks), kWarps * 32, stream, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// ------------------------------------------------------------------ 16-byte parameter kernel

// Largest rank chunk of the vector kernel: RK x V accumulators per matrix, at most three matrices
// untied (dA, dB, dC: 3 x 32 = 96 fp32 registers) and two tied (dA, dB: 2 x 64 = 128; dC is never
// asked for when C is B). fp16/bf16 (V = 8): 4 ranks untied, 8 tied; fp32 (V = 4): 8 and 16.
// ptxas fits these with the 4 rows of packs in flight, no spills (tools/cuda_compile_check.py).
template <typename T, bool TIED>
constexpr int params_vec_max_chunk() {
  return (TIED ? 64 : 32) / vec_of<T>();
}

// Calls f(std::integral_constant<int, RK>) with the smallest of max / 4, max / 2, max covering
// min(r, max): small ranks do not pay for the FMAs of a full chunk.
template <typename T, bool TIED, typename F>
void params_vec_chunk_switch(int64_t r, F&& f) {
  constexpr int kMax = params_vec_max_chunk<T, TIED>();
  if (r <= kMax / 4) {
    f(std::integral_constant<int, kMax / 4>{});
  } else if (r <= kMax / 2) {
    f(std::integral_constant<int, kMax / 2>{});
  } else {
    f(std::integral_constant<int, kMax>{});
  }
}

// Host-checked vector permissions of the vector kernel (LowrankBwdParams::vec_ok also covers dh,
// and nothing covers x or the partials).
struct ParamVecFlags {
  bool g_vec;     // g rows: unit column stride, 16-byte aligned starts
  bool x_vec;     // x rows: likewise
  bool part_vec;  // partial rows: d % 4 == 0 and 16-byte aligned buffers (float4 stores)
};

// acc (J = RK x V values per lane) of warps 1 .. kParamVecWarps - 1 added into warp 0's, in the
// order w = 1, 2, 3 (warp 0 holds the sum of its own rows first): the same bits on every run.
// s_red is laid out [warp - 1][j][lane], so the stores and loads are free of bank conflicts.
template <int J>
__device__ __forceinline__ void params_sum_over_warps(float (&acc)[J], float (&s_red)[kParamVecWarps - 1][J][32],
                                                      int warp, int lane) {
  __syncthreads();  // the previous matrix's sum has been read
  if (warp > 0) {
#pragma unroll
    for (int j = 0; j < J; ++j) s_red[warp - 1][j][lane] = acc[j];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int w = 0; w < kParamVecWarps - 1; ++w)
#pragma unroll
      for (int j = 0; j < J; ++j) acc[j] += s_red[w][j][lane];
  }
}

// The V values of rank kk (acc[kk * V .. kk * V + V)) to row[col .. col + V), as 16-byte packs
// where allowed. (The SASS of the fp32 instantiations has 4-byte stores here all the same, the
// fp16/bf16 ones partly 16-byte: once per block, well under 1% of its instructions.)
template <int V, int J>
__device__ __forceinline__ void params_store_rank(float* row, int64_t col, int64_t d, bool vec, const float (&acc)[J],
                                                  int kk) {
#pragma unroll
  for (int h = 0; h < V; h += 4) {
    float v4[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) v4[i] = acc[kk * V + h + i];
    store_f32<float, 4>(row, col + h, d, 1, vec, true, v4);
  }
}

// Rows [i_begin, i_end) of a stage (UU at a time, all their loads before their FMAs) into a
// lane's accumulators. FAST: whole 16-byte packs (checked by the caller); otherwise element loads
// with the column strides and masks past d.
template <typename T, int RK, bool TIED, bool FAST, int UU>
__device__ __forceinline__ void params_vec_rows(const T* __restrict__ g, const T* __restrict__ x, int64_t col,
                                                int64_t d, int64_t g_cs, int64_t x_cs, int i_begin, int i_end,
                                                const int64_t* s_g_off, const int64_t* s_x_off,
                                                const float (*s_ga)[RK], const float (*s_gz)[RK],
                                                const float (*s_z)[RK], bool need_a, bool need_b, bool need_c,
                                                bool need_x, float (&acc_a)[RK * vec_of<T>()],
                                                float (&acc_b)[RK * vec_of<T>()], float (&acc_c)[RK * vec_of<T>()]) {
  constexpr int V = vec_of<T>();
  for (int i0 = i_begin; i0 < i_end; i0 += UU) {
    Pack<T, V> gp[UU], xp[UU];
#pragma unroll
    for (int u = 0; u < UU; ++u) {
      const int64_t go = s_g_off[i0 + u], xo = s_x_off[i0 + u];
      const bool g_ok = need_b && go >= 0, x_ok = need_x && xo >= 0;
      if (FAST) {
        const Pack<T, V> zero{};
        gp[u] = g_ok ? *reinterpret_cast<const Pack<T, V>*>(g + go + col) : zero;
        xp[u] = x_ok ? *reinterpret_cast<const Pack<T, V>*>(x + xo + col) : zero;
      } else {
        gp[u] = load_pack<T, V>(g + (go < 0 ? 0 : go), col, d, g_cs, false, g_ok);
        xp[u] = load_pack<T, V>(x + (xo < 0 ? 0 : xo), col, d, x_cs, false, x_ok);
      }
    }
#pragma unroll
    for (int u = 0; u < UU; ++u) {
      const int i = i0 + u;
      float gv[V], xv[V];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        gv[v] = to_f32(gp[u].v[v]);
        xv[v] = to_f32(xp[u].v[v]);
      }
#pragma unroll
      for (int kk = 0; kk < RK; ++kk) {
        const float ga = s_ga[i][kk], gz = s_gz[i][kk], z = s_z[i][kk];
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const int j = kk * V + v;
          if (need_a) acc_a[j] = fmaf(ga, xv[v], acc_a[j]);
          if (need_b) {
            acc_b[j] = fmaf(z, gv[v], acc_b[j]);
            if (TIED) acc_b[j] = fmaf(-gz, xv[v], acc_b[j]);
          }
          if (need_c) acc_c[j] = fmaf(gz, xv[v], acc_c[j]);
        }
      }
    }
  }
}

// __launch_bounds__(128, 2): up to 255 registers. With a plain (128) ptxas aimed some
// instantiations at 128 registers and spilled (sm_90, RK = 2); with (128, 3) the largest chunks
// spilled at 168. ptxas reports 108-250 registers, no spills: 2 resident blocks (8 warps) per SM
// for the largest chunks, 3 for the smaller (tools/cuda_compile_check.py; occupancy estimated from
// the register file, and read at run time by the grid planner).
template <typename T, int RK, bool TIED>
__global__ void __launch_bounds__(kParamVecWarps * 32, 2)
    lowrank_edit_bwd_params_vec_kernel(const LowrankBwdParams p, const ParamVecFlags f) {
  constexpr int V = vec_of<T>();
  constexpr int J = RK * V;
  constexpr int U = kParamVecUnroll;
  constexpr int kStageRowsPerWarp = kParamVecRows / kParamVecWarps;
  static_assert(kStageRowsPerWarp % U == 0, "a warp's rows of a stage are whole unrolled steps");
  alignas(16) __shared__ float s_z[kParamVecRows][RK];
  alignas(16) __shared__ float s_gz[kParamVecRows][RK];
  alignas(16) __shared__ float s_ga[kParamVecRows][RK];
  __shared__ int64_t s_g_off[kParamVecRows];  // -1: not a real row
  __shared__ int64_t s_x_off[kParamVecRows];
  __shared__ float s_red[kParamVecWarps - 1][J][32];
  const T* __restrict__ g = static_cast<const T*>(p.g);
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t n = p.n_rows, d = p.d, r = p.r;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * RK;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * 32 + lane) * V;
  const bool col_ok = col < d;
  const bool need_a = p.dA_part != nullptr, need_b = p.dB_part != nullptr;
  const bool need_c = !TIED && p.dC_part != nullptr;  // the binding never asks for dC when tied
  const bool need_x = need_a || need_c || (TIED && need_b);
  const bool fast = col + V <= d && (f.g_vec || !need_b) && (f.x_vec || !need_x);

  float acc_a[J], acc_b[J], acc_c[J];
#pragma unroll
  for (int j = 0; j < J; ++j) acc_a[j] = acc_b[j] = acc_c[j] = 0.f;

  const int64_t row_begin = static_cast<int64_t>(blockIdx.z) * p.rows_per_block;
  const int64_t row_end = min64(n, row_begin + p.rows_per_block);
  for (int64_t t0 = row_begin; t0 < row_end; t0 += kParamVecRows) {
    __syncthreads();  // the previous stage is consumed
    // Latents of the stage's rows for this block's ranks; zero on padding rows (-1 in the index),
    // rows past the block's range and ranks past r, so that masked rows add nothing.
    stage_param_rows<kParamVecRows, RK, true>(p, t0, row_end, k0, need_b, tid, kParamVecWarps * 32, s_gz, s_ga, s_z,
                                              s_g_off, s_x_off);
    __syncthreads();
    const int rows = static_cast<int>(min64(kParamVecRows, row_end - t0));
    const int i_begin = warp * kStageRowsPerWarp;
    const int i_end = rows < i_begin + kStageRowsPerWarp ? rows : i_begin + kStageRowsPerWarp;
    // Rows past i_end up to the warp's 16 are staged too (offset -1, zero latents), so a step's
    // rows never leave the stage and masked ones load zeros. Whole packs of 16-byte-capable rows
    // take the unrolled vector loop; the rest (unaligned or strided rows, the ragged column tail)
    // the scalar loop, one row per step: a lane's choice is fixed for the whole kernel.
    if (fast) {
      params_vec_rows<T, RK, TIED, true, U>(g, x, col, d, p.g_col_stride, p.x_col_stride, i_begin, i_end, s_g_off,
                                            s_x_off, s_ga, s_gz, s_z, need_a, need_b, need_c, need_x, acc_a, acc_b,
                                            acc_c);
    } else if (col_ok) {
      params_vec_rows<T, RK, TIED, false, 1>(g, x, col, d, p.g_col_stride, p.x_col_stride, i_begin, i_end, s_g_off,
                                             s_x_off, s_ga, s_gz, s_z, need_a, need_b, need_c, need_x, acc_a, acc_b,
                                             acc_c);
    }
  }

  if (need_a) params_sum_over_warps<J>(acc_a, s_red, warp, lane);
  if (need_b) params_sum_over_warps<J>(acc_b, s_red, warp, lane);
  if (need_c) params_sum_over_warps<J>(acc_c, s_red, warp, lane);
  if (warp == 0 && col_ok) {
    const int64_t base = static_cast<int64_t>(blockIdx.z) * r;
#pragma unroll
    for (int kk = 0; kk < RK; ++kk) {
      const int64_t k = k0 + kk;
      if (k < r) {
        const int64_t o = (base + k) * d;
        if (need_a) params_store_rank<V, J>(p.dA_part + o, col, d, f.part_vec, acc_a, kk);
        if (need_b) params_store_rank<V, J>(p.dB_part + o, col, d, f.part_vec, acc_b, kk);
        if (need_c) params_store_rank<V, J>(p.dC_part + o, col, d, f.part_vec, acc_c, kk);
      }
    }
  }
}

namespace {

bool aligned16(const void* q) { return q == nullptr || reinterpret_cast<uintptr_t>(q) % 16 == 0; }

template <typename T>
void launch_params_scalar(const LowrankBwdParams& p, cudaStream_t stream) {
  REFT_RANK_CHUNK_SWITCH(param_rank_chunk(p.r), RK, [&] {
    REFT_BOOL_SWITCH(p.tied, TIED, [&] {
      const dim3 grid(static_cast<unsigned>(cdiv(p.n_rows, p.rows_per_block)),
                      static_cast<unsigned>(cdiv(p.d, kParamCols)), static_cast<unsigned>(cdiv(p.r, RK)));
      const auto kernel = lowrank_edit_bwd_params_kernel<T, RK, TIED>;
      REFT_LAUNCH(kernel, grid, kParamCols, stream, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

template <typename T>
void launch_params_vec(const LowrankBwdParams& p, cudaStream_t stream) {
  constexpr int V = vec_of<T>();
  ParamVecFlags f;
  f.g_vec = p.g_col_stride == 1 && p.g_row_stride % V == 0 && aligned16(p.g);
  f.x_vec = p.x_col_stride == 1 && p.x_row_stride % V == 0 && aligned16(p.x);
  f.part_vec = p.d % 4 == 0 && aligned16(p.dA_part) && aligned16(p.dB_part) && aligned16(p.dC_part);
  REFT_BOOL_SWITCH(p.tied, TIED, [&] {
    params_vec_chunk_switch<T, TIED>(p.r, [&](auto rk) {
      constexpr int RK = decltype(rk)::value;
      const dim3 grid(static_cast<unsigned>(cdiv(p.r, RK)), static_cast<unsigned>(cdiv(p.d, 32 * V)),
                      static_cast<unsigned>(cdiv(p.n_rows, p.rows_per_block)));
      const auto kernel = lowrank_edit_bwd_params_vec_kernel<T, RK, TIED>;
      REFT_LAUNCH(kernel, grid, kParamVecWarps * 32, stream, p, f);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

template <typename T>
void launch_lowrank_edit_bwd_params(const LowrankBwdParams& p, cudaStream_t stream) {
  if (p.n_rows == 0 || (p.dA_part == nullptr && p.dB_part == nullptr && p.dC_part == nullptr)) return;
  if (p.params_vector) {
    launch_params_vec<T>(p, stream);
  } else {
    launch_params_scalar<T>(p, stream);
  }
}

// Scalar kernel: the previous plan (about 4 blocks per SM, rows in multiples of its 32-row stage).
// Vector kernel: one wave of the compiled kernel's resident blocks over (rank chunks x column
// blocks) tiles, rows in multiples of kParamVecQuantum. Either kernel is correct with any rows per
// block (partial stages are masked); the plan only sets how the rows are shared out.
template <typename T>
int64_t lowrank_edit_bwd_params_rows_per_block(const LowrankBwdParams& p, int sm_count) {
  const int64_t n_rows = p.n_rows, d = p.d, r = p.r;
  if (!p.params_vector)
    return rows_per_block(n_rows, kParamRows, cdiv(d, kParamCols) * cdiv(r, param_rank_chunk(r)), sm_count);
  int64_t rpb = kParamVecQuantum;
  REFT_BOOL_SWITCH(p.tied, TIED, [&] {
    params_vec_chunk_switch<T, TIED>(r, [&](auto rk) {
      constexpr int RK = decltype(rk)::value;
      const auto kernel = lowrank_edit_bwd_params_vec_kernel<T, RK, TIED>;
      const int64_t tiles = cdiv(r, RK) * cdiv(d, 32 * vec_of<T>());
      const int64_t wave = static_cast<int64_t>(resident_blocks_per_sm(kernel, kParamVecWarps * 32)) * sm_count;
      rpb = rows_per_block_for_wave(n_rows, kParamVecQuantum, tiles, wave);
    });
  });
  return rpb;
}

// ------------------------------------------------------------------ bias partials

// The bias gradients' partials, grid (row blocks): block b adds, over its rows [b rpb, (b + 1) rpb)
// of the (n, r) fp32 latents, ga[:, k] (gz for the identity activation) into da_part[b, k] and
// gz[:, k] into dc_part[b, k], stored negated (negation is exact, so the finish's sum of the
// negated partials is exactly -sum gz). Padding rows hold 0 in gz and ga (the dh and cluster
// kernels write them so). Threads (kx, ty): kx, the power of two >= r, side by side over a
// latent row (a warp reads 32 / kx consecutive rows); thread row ty adds rows ty, ty + TY, ... of
// the block's range in order, and the TY sums of a column are added in the order ty = 0, 1, ...
// through shared memory: no atomics, a summation order fixed by (n, r, rpb).
// A kernel of its own (as the Triton backend's _lowrank_bias_partials_kernel) rather than more
// accumulators in the register-bound parameter kernels; it reads n r 4 bytes per bias (0.5 MB at
// n = 16384, r = 8) and is finished by launch_partial_sum like the matrices.
constexpr int kBiasThreads = 256;

inline int bias_block_x(int64_t r) {
  int kx = 1;
  while (kx < r) kx *= 2;
  return kx;  // r <= kMaxRank = 64: kx <= 64, at least 4 thread rows
}

__global__ void __launch_bounds__(kBiasThreads) lowrank_edit_bwd_bias_kernel(const LowrankBwdParams p) {
  __shared__ float s_a[kBiasThreads];
  __shared__ float s_c[kBiasThreads];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int kx = static_cast<int>(blockDim.x), ny = static_cast<int>(blockDim.y);
  const int64_t r = p.r;
  const float* __restrict__ lat = p.ga != nullptr ? p.ga : p.gz;
  const float* __restrict__ gz = p.gz;
  const bool need_a = p.da_part != nullptr, need_c = p.dc_part != nullptr;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * p.rows_per_block;
  const int64_t row_end = min64(p.n_rows, row_begin + p.rows_per_block);
  float acc_a = 0.f, acc_c = 0.f;
  if (tx < r) {
    for (int64_t m = row_begin + ty; m < row_end; m += ny) {
      const int64_t o = m * r + tx;
      if (need_a) acc_a += lat[o];
      if (need_c) acc_c += gz[o];
    }
  }
  const int slot = ty * kx + tx;
  s_a[slot] = acc_a;
  s_c[slot] = acc_c;
  __syncthreads();
  if (ty == 0 && tx < r) {
    for (int j = 1; j < ny; ++j) {
      acc_a += s_a[j * kx + tx];
      acc_c += s_c[j * kx + tx];
    }
    const int64_t o = static_cast<int64_t>(blockIdx.x) * r + tx;
    if (need_a) p.da_part[o] = acc_a;
    if (need_c) p.dc_part[o] = -acc_c;
  }
}

void launch_lowrank_edit_bwd_bias(const LowrankBwdParams& p, cudaStream_t stream) {
  if (p.n_rows == 0 || (p.da_part == nullptr && p.dc_part == nullptr)) return;
  const int kx = bias_block_x(p.r);
  const int64_t blocks = cdiv(p.n_rows, p.rows_per_block);
  REFT_LAUNCH(lowrank_edit_bwd_bias_kernel, static_cast<unsigned>(blocks), dim3(kx, kBiasThreads / kx), stream, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_lowrank_edit_bwd_dh<float, float>(const LowrankBwdParams&, cudaStream_t);
template void launch_lowrank_edit_bwd_dh<__half, __half>(const LowrankBwdParams&, cudaStream_t);
template void launch_lowrank_edit_bwd_dh<__half, float>(const LowrankBwdParams&, cudaStream_t);
template void launch_lowrank_edit_bwd_dh<__nv_bfloat16, __nv_bfloat16>(const LowrankBwdParams&, cudaStream_t);
template void launch_lowrank_edit_bwd_dh<__nv_bfloat16, float>(const LowrankBwdParams&, cudaStream_t);
template void launch_lowrank_edit_bwd_params<float>(const LowrankBwdParams&, cudaStream_t);
template void launch_lowrank_edit_bwd_params<__half>(const LowrankBwdParams&, cudaStream_t);
template void launch_lowrank_edit_bwd_params<__nv_bfloat16>(const LowrankBwdParams&, cudaStream_t);
template int64_t lowrank_edit_bwd_params_rows_per_block<float>(const LowrankBwdParams&, int);
template int64_t lowrank_edit_bwd_params_rows_per_block<__half>(const LowrankBwdParams&, int);
template int64_t lowrank_edit_bwd_params_rows_per_block<__nv_bfloat16>(const LowrankBwdParams&, int);

}  // namespace reft
