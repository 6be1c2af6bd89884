// Low-rank edit forward: y = h + (act(h A^T + a) - h P^T - c) B, P = C or (tied) B.
//
// A warp owns one group of 4 rows (the grid covers every group): group_latent streams them once
// per chunk of 8 ranks to form u = h A^T and p = h P^T in fp32 (products as fp32 FMAs, not
// TF32), lane L finishes latent (row L / 8, rank L % 8), writes it to z (and u, for the
// backward of a non-identity act) and to shared memory; group_expand then streams the rows
// again and writes y, rounding once. With an index, launch row i is row idx[i] (-1 skipped)
// and y may be h itself: every element is read before the same lane overwrites it, and with
// `hsave` the original rows are first copied to the dense (n, d) buffer for the backward.
#include <c10/cuda/CUDAException.h>

#include "lowrank_edit_common.cuh"
#include "static_switch.h"

namespace reft {

// __launch_bounds__(128, 1): see kWarps in launch.h.
template <typename T, typename W, bool HAS_A, bool HAS_P>
__global__ void __launch_bounds__(kWarps * 32, 1) lowrank_edit_fwd_kernel(const LowrankFwdParams p) {
  __shared__ float s_z[kWarps][kRowsPerWarp][kMaxRank];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* h = static_cast<const T*>(p.h);
  T* y = static_cast<T*>(p.y);
  const W* A = static_cast<const W*>(p.A);
  const W* a = static_cast<const W*>(p.a);
  const W* B = static_cast<const W*>(p.B);
  const W* P = static_cast<const W*>(p.P);
  const W* c = static_cast<const W*>(p.c);
  const int64_t n = p.n_rows, d = p.d, r = p.r;
  const int li = lane / kRankChunk, lk = lane % kRankChunk;  // this lane's latent: row li, rank k0 + lk

  // One row group per warp and no early exit (rows past the end are masked): every lane of every
  // warp reaches the shuffles.
  {
    const int64_t grp = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
    const int64_t m0 = grp * kRowsPerWarp;
    int64_t h_off[kRowsPerWarp], y_off[kRowsPerWarp];
    bool ok[kRowsPerWarp];
    group_rows(p.idx, m0, n, p.h_row_stride, p.y_row_stride, h_off, y_off, ok);
    const int64_t ml = m0 + li;
    int64_t src_l;
    const bool ok_l = row_source(p.idx, ml, n, src_l);

    for (int64_t k0 = 0; k0 < r; k0 += kRankChunk) {
      float acc_u[32], acc_p[32];
      if (HAS_A || HAS_P) {
        group_latent<T, W, HAS_A, HAS_P>(h, h_off, ok, p.h_col_stride, p.vec_ok, A, P, d, r, k0, p.wvec_ok, lane,
                                         acc_u, acc_p);
        if (HAS_A) warp_reduce_scatter32(acc_u, lane);
        if (HAS_P) warp_reduce_scatter32(acc_p, lane);
      }
      const int64_t k = k0 + lk;
      if (k < r) {
        float u = HAS_A ? acc_u[0] : 0.f;
        if (a != nullptr) u += to_f32(a[k]);
        float zv = act_fwd(u, p.act);
        if (HAS_P) zv -= acc_p[0];
        if (c != nullptr) zv -= to_f32(c[k]);
        if (!ok_l) zv = 0.f;
        s_z[warp][li][k] = zv;
        if (ml < n) {
          p.z[ml * r + k] = zv;
          if (p.u != nullptr) p.u[ml * r + k] = u;
        }
      }
    }
    __syncwarp();
    group_expand<T, W, true, false>(h, h_off, p.h_col_stride, y, y_off, p.y_col_stride, ok, p.vec_ok, s_z[warp],
                                    nullptr, B, static_cast<const W*>(nullptr), d, r, p.wvec_ok, lane,
                                    static_cast<T*>(p.hsave), m0);
  }
}

template <typename T, typename W>
void launch_lowrank_edit_fwd(const LowrankFwdParams& p, cudaStream_t stream) {
  if (p.n_rows == 0) return;
  const int64_t blocks = cdiv(cdiv(p.n_rows, kRowsPerWarp), kWarps);
  REFT_BOOL_SWITCH(p.A != nullptr, HAS_A, [&] {
    REFT_BOOL_SWITCH(p.P != nullptr, HAS_P, [&] {
      const auto kernel = lowrank_edit_fwd_kernel<T, W, HAS_A, HAS_P>;
      REFT_LAUNCH(kernel, static_cast<unsigned>(blocks), kWarps * 32, stream, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

template void launch_lowrank_edit_fwd<float, float>(const LowrankFwdParams&, cudaStream_t);
template void launch_lowrank_edit_fwd<__half, __half>(const LowrankFwdParams&, cudaStream_t);
template void launch_lowrank_edit_fwd<__half, float>(const LowrankFwdParams&, cudaStream_t);
template void launch_lowrank_edit_fwd<__nv_bfloat16, __nv_bfloat16>(const LowrankFwdParams&, cudaStream_t);
template void launch_lowrank_edit_fwd<__nv_bfloat16, float>(const LowrankFwdParams&, cudaStream_t);

}  // namespace reft
