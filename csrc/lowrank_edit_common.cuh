// Device functions shared by the low-rank edit kernels (forward and backward dh): a warp owns a
// group of kRowsPerWarp rows and
//   group_latent: streams the rows once per chunk of kRankChunk ranks, each lane taking every
//     32nd 16-byte vector of columns, and accumulates the partial dot products with one or two
//     (r, d) weight matrices in fp32 registers (32 per matrix: rows x rank chunk);
//     warp_reduce_scatter32 then leaves lane L with the total for (row L / 8, rank L % 8);
//   group_expand: streams the rows again and writes out = in + lat1 W1 + lat2 W2, the latents
//     read from the warp's slice of shared memory.
// The rows are re-read from L1/L2 rather than HBM: a group is 4 rows (32 KiB at d = 4096 fp16).
#pragma once

#include "launch.h"
#include "reft_device.cuh"

namespace reft {

static_assert(kRowsPerWarp * kRankChunk == 32, "one latent value per lane after the reduce-scatter");

// Launch row m -> row of the tensor: idx[m] when an index is given (-1: not a real row), m
// otherwise. Returns whether the row is real; `src` is 0 when it is not (never a bad address).
__device__ __forceinline__ bool row_source(const int64_t* idx, int64_t m, int64_t n_rows, int64_t& src) {
  src = 0;
  if (m >= n_rows) return false;
  if (idx == nullptr) {
    src = m;
    return true;
  }
  const int64_t s = idx[m];
  if (s < 0) return false;
  src = s;
  return true;
}

// A warp's row group m0 .. m0 + kRowsPerWarp - 1: element offsets of its rows in two row tensors
// addressed through the same index (h and y; g and dh), and whether each row is real.
__device__ __forceinline__ void group_rows(const int64_t* idx, int64_t m0, int64_t n_rows, int64_t stride_a,
                                           int64_t stride_b, int64_t (&off_a)[kRowsPerWarp],
                                           int64_t (&off_b)[kRowsPerWarp], bool (&ok)[kRowsPerWarp]) {
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    int64_t src;
    ok[i] = row_source(idx, m0 + i, n_rows, src);
    off_a[i] = src * stride_a;
    off_b[i] = src * stride_b;
  }
}

// acc[i * kRankChunk + kk] += dot(x[i], w_row[col .. col + V)) for the rows of a group. kk is a
// compile-time constant after inlining into the unrolled rank loop (acc stays in registers).
template <typename W, int V>
__device__ __forceinline__ void dot_rank_term(float (&acc)[32], const float (&x)[kRowsPerWarp][V], int kk,
                                              const W* w_row, int64_t col, int64_t d, bool wvec) {
  float w[V];
  load_f32<W, V>(w_row, col, d, 1, wvec, true, w);
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
    for (int v = 0; v < V; ++v) acc[i * kRankChunk + kk] = fmaf(x[i][v], w[v], acc[i * kRankChunk + kk]);
}

template <typename T, typename W, bool HAS1, bool HAS2>
__device__ __forceinline__ void group_latent(const T* base, const int64_t (&off)[kRowsPerWarp],
                                             const bool (&ok)[kRowsPerWarp], int64_t col_stride, bool vec,
                                             const W* W1, const W* W2, int64_t d, int64_t r, int64_t k0,
                                             bool wvec, int lane, float (&acc1)[32], float (&acc2)[32]) {
  constexpr int V = vec_of<T>();
#pragma unroll
  for (int j = 0; j < 32; ++j) acc1[j] = acc2[j] = 0.f;
  // Every lane runs the same iterations (tails are masked in the loads), so that all 32 reach
  // the shuffles of the reduce-scatter that follows together.
  for (int64_t col0 = 0; col0 < d; col0 += 32 * V) {
    const int64_t col = col0 + static_cast<int64_t>(lane) * V;
    float x[kRowsPerWarp][V];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) load_f32<T, V>(base + off[i], col, d, col_stride, vec, ok[i], x[i]);
#pragma unroll
    for (int kk = 0; kk < kRankChunk; ++kk) {
      const int64_t k = k0 + kk;
      if (k < r) {  // uniform across the warp
        if (HAS1) dot_rank_term<W, V>(acc1, x, kk, W1 + k * d, col, d, wvec);
        if (HAS2) dot_rank_term<W, V>(acc2, x, kk, W2 + k * d, col, d, wvec);
      }
    }
  }
}

// acc[i][v] += lat[i][k] * w_row[col + v] for the rows of a group.
template <typename W, int V>
__device__ __forceinline__ void add_rank_term(float (&acc)[kRowsPerWarp][V], const float (*lat)[kMaxRank], int64_t k,
                                              const W* w_row, int64_t col, int64_t d, bool wvec) {
  float w[V];
  load_f32<W, V>(w_row, col, d, 1, wvec, true, w);
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const float l = lat[i][k];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[i][v] = fmaf(l, w[v], acc[i][v]);
  }
}

// out row i = in row i + sum_k lat1[i][k] W1[k] + lat2[i][k] W2[k], for the real rows; with
// `save`, row i of the input is also copied to save[m0 + i] (dense rows of width d).
template <typename T, typename W, bool HAS1, bool HAS2>
__device__ __forceinline__ void group_expand(const T* in, const int64_t (&in_off)[kRowsPerWarp], int64_t in_cs,
                                             T* out, const int64_t (&out_off)[kRowsPerWarp], int64_t out_cs,
                                             const bool (&ok)[kRowsPerWarp], bool vec,
                                             const float (*lat1)[kMaxRank], const float (*lat2)[kMaxRank],
                                             const W* W1, const W* W2, int64_t d, int64_t r, bool wvec, int lane,
                                             T* save, int64_t m0) {
  constexpr int V = vec_of<T>();
  const bool save_vec = vec && (d % V == 0);
  for (int64_t col = static_cast<int64_t>(lane) * V; col < d; col += 32 * V) {
    float acc[kRowsPerWarp][V];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      load_f32<T, V>(in + in_off[i], col, d, in_cs, vec, ok[i], acc[i]);
      if (save != nullptr) store_f32<T, V>(save + (m0 + i) * d, col, d, 1, save_vec, ok[i], acc[i]);
    }
    if (HAS1 || HAS2) {
#pragma unroll 2
      for (int64_t k = 0; k < r; ++k) {
        if (HAS1) add_rank_term<W, V>(acc, lat1, k, W1 + k * d, col, d, wvec);
        if (HAS2) add_rank_term<W, V>(acc, lat2, k, W2 + k * d, col, d, wvec);
      }
    }
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) store_f32<T, V>(out + out_off[i], col, d, out_cs, vec, ok[i], acc[i]);
  }
}

}  // namespace reft
