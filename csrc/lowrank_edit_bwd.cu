// Low-rank edit backward, two kernels plus the fixed-order partial sums:
//
// lowrank_edit_bwd_dh_kernel (row groups, as the forward): gz = g B^T with warp reductions,
//   ga = gz * act'(u); both stored as (n, r) fp32; then dh = g + ga A - gz P streamed row by
//   row. g and dh rows follow the index when there is one (dh is then a copy of g whose listed
//   rows are overwritten; it never aliases g, whose rows the second kernel still reads).
// lowrank_edit_bwd_params_kernel, grid (row blocks, column blocks, rank chunks): each thread
//   owns one column and up to 16 ranks, stages the latents of 32 rows at a time in shared
//   memory and accumulates ga^T x (dA), z^T g - [tied] gz^T x (dB) and gz^T x (dC) in fp32
//   registers; each block writes its partials to its row of (row blocks, r, d) buffers.
#include <c10/cuda/CUDAException.h>

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
    for (int e = tid; e < kParamRows * RK; e += kParamCols) {
      const int i = e / RK, kk = e % RK;
      const int64_t m = t0 + i, k = k0 + kk;
      const bool v = m < row_end && k < r;
      const int64_t o = m * r + k;
      const float gz = v ? p.gz[o] : 0.f;
      s_gz[i][kk] = gz;
      s_ga[i][kk] = (v && p.ga != nullptr) ? p.ga[o] : gz;
      s_z[i][kk] = (v && need_b) ? p.z[o] : 0.f;
    }
    if (tid < kParamRows) {
      const int64_t m = t0 + tid;
      int64_t src;
      const bool ok = m < row_end && row_source(p.idx, m, n, src);
      s_g_off[tid] = ok ? src * p.g_row_stride : -1;
      s_x_off[tid] = ok ? m * p.x_row_stride : -1;
    }
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

template <typename T>
void launch_lowrank_edit_bwd_params(const LowrankBwdParams& p, cudaStream_t stream) {
  if (p.n_rows == 0 || (p.dA_part == nullptr && p.dB_part == nullptr && p.dC_part == nullptr)) return;
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

template void launch_lowrank_edit_bwd_dh<float, float>(const LowrankBwdParams&, cudaStream_t);
template void launch_lowrank_edit_bwd_dh<__half, __half>(const LowrankBwdParams&, cudaStream_t);
template void launch_lowrank_edit_bwd_dh<__half, float>(const LowrankBwdParams&, cudaStream_t);
template void launch_lowrank_edit_bwd_dh<__nv_bfloat16, __nv_bfloat16>(const LowrankBwdParams&, cudaStream_t);
template void launch_lowrank_edit_bwd_dh<__nv_bfloat16, float>(const LowrankBwdParams&, cudaStream_t);
template void launch_lowrank_edit_bwd_params<float>(const LowrankBwdParams&, cudaStream_t);
template void launch_lowrank_edit_bwd_params<__half>(const LowrankBwdParams&, cudaStream_t);
template void launch_lowrank_edit_bwd_params<__nv_bfloat16>(const LowrankBwdParams&, cudaStream_t);

}  // namespace reft
