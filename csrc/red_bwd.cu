// RED backward in one pass over (g, h): dh = g * scale and fp32 partial column sums of g * h
// (for d scale) and g (for d bias).
//
// Grid (row blocks, column blocks). A block owns tx * 8 (or tx * 4 for fp32) columns of a
// contiguous range of rows; its ty thread rows walk that range with a stride of ty, each thread
// accumulating its columns in fp32 registers over the whole range (no synchronisation in the row
// loop: the column sums are formed once per block, not per row step); the ty partial sums are
// then added in a fixed order through shared memory and written to the block's row of the
// (row blocks, d) buffers. launch_partial_sum finishes the sum over row blocks, also in a fixed
// order: no atomics, the same bits on every run.
//
// Grid size: one wave of the compiled kernel's resident blocks (red_bwd_rows_per_block, from
// cudaOccupancyMaxActiveBlocksPerMultiprocessor) instead of a fixed 4 per SM, and tiles of at
// most kRedBwdMaxX vectors so that wide rows give ty = 4 thread rows per block: 4x fewer row
// blocks than full-width tiles for the same grid, so 4x smaller fp32 partials and finish, for 3
// shared-memory steps at the end of each block. Registers, shared memory and so occupancy are
// unchanged: 4 blocks of 256 threads per SM at 59-60 registers for fp16/bf16, 6 at 40 for fp32
// (tools/cuda_compile_check.py; blocks per SM estimated from the register file). A tree over the
// thread rows instead of the serial fixed-order sum was tried: 68-71 registers (3 blocks per SM)
// and 37-44 for fp32 (5), an occupancy drop for a few shared-memory steps saved, so not kept.
#include <c10/cuda/CUDAException.h>

#include "launch.h"
#include "reft_device.cuh"

namespace reft {

template <typename T, typename W>
__global__ void __launch_bounds__(kRedThreads) red_bwd_kernel(const RedBwdParams p) {
  constexpr int V = vec_of<T>();
  __shared__ float s_ds[kRedThreads * V];
  __shared__ float s_dt[kRedThreads * V];
  const T* __restrict__ g = static_cast<const T*>(p.g);
  const T* __restrict__ h = static_cast<const T*>(p.h);
  const W* __restrict__ scale = static_cast<const W*>(p.scale);
  T* __restrict__ dh = static_cast<T*>(p.dh);
  const bool need_ds = p.ds_part != nullptr, need_dt = p.dt_part != nullptr;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t d = p.d;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * blockDim.x + tx) * V;
  const bool col_ok = col < d;

  float s[V];
  load_f32<W, V>(scale, col, d, 1, p.vec_ok, col_ok && scale != nullptr, s);
  float acc_s[V], acc_t[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc_s[i] = acc_t[i] = 0.f;

  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * p.rows_per_block;
  const int64_t row_end = min64(p.n_rows, row_begin + p.rows_per_block);
  if (col_ok) {
#pragma unroll 2
    for (int64_t row = row_begin + ty; row < row_end; row += blockDim.y) {
      float gv[V];
      load_f32<T, V>(g + row * p.g_row_stride, col, d, 1, p.vec_ok, true, gv);
      if (need_ds) {
        float hv[V];
        load_f32<T, V>(h + row * p.h_row_stride, col, d, 1, p.vec_ok, true, hv);
#pragma unroll
        for (int i = 0; i < V; ++i) acc_s[i] = fmaf(gv[i], hv[i], acc_s[i]);
      }
      if (need_dt) {
#pragma unroll
        for (int i = 0; i < V; ++i) acc_t[i] += gv[i];
      }
      if (dh != nullptr) {
        if (scale != nullptr) {
#pragma unroll
          for (int i = 0; i < V; ++i) gv[i] *= s[i];
        }
        store_f32<T, V>(dh + row * p.dh_row_stride, col, d, 1, p.vec_ok, true, gv);
      }
    }
  }

  if (blockDim.y > 1) {  // fixed-order sum of the ty partials of each column
    const int slot = (ty * blockDim.x + tx) * V;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      s_ds[slot + i] = acc_s[i];
      s_dt[slot + i] = acc_t[i];
    }
    __syncthreads();
    if (ty == 0) {
      for (int j = 1; j < static_cast<int>(blockDim.y); ++j) {
        const int other = (j * blockDim.x + tx) * V;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          acc_s[i] += s_ds[other + i];
          acc_t[i] += s_dt[other + i];
        }
      }
    }
  }
  if (ty == 0 && col_ok) {
    const int64_t base = static_cast<int64_t>(blockIdx.x) * d;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (col + i < d) {
        if (need_ds) p.ds_part[base + col + i] = acc_s[i];
        if (need_dt) p.dt_part[base + col + i] = acc_t[i];
      }
    }
  }
}

// Rows per block: a multiple of the block's ty thread rows, the grid one wave of resident blocks.
template <typename T, typename W>
int64_t red_bwd_rows_per_block(int64_t n_rows, int64_t d, int sm_count) {
  const int tx = red_bwd_block_x(d, vec_of<T>());
  const int64_t col_blocks = cdiv(cdiv(d, vec_of<T>()), tx);
  const auto kernel = red_bwd_kernel<T, W>;
  const int64_t wave = static_cast<int64_t>(resident_blocks_per_sm(kernel, kRedThreads)) * sm_count;
  return rows_per_block_for_wave(n_rows, kRedThreads / tx, col_blocks, wave);
}

template <typename T, typename W>
void launch_red_bwd(const RedBwdParams& p, cudaStream_t stream) {
  if (p.n_rows == 0 || p.d == 0) return;
  const int tx = red_bwd_block_x(p.d, vec_of<T>());
  const int ty = kRedThreads / tx;
  const int64_t col_blocks = cdiv(cdiv(p.d, vec_of<T>()), tx);
  const int64_t row_blocks = cdiv(p.n_rows, p.rows_per_block);
  const auto kernel = red_bwd_kernel<T, W>;
  REFT_LAUNCH(kernel, dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(col_blocks)), dim3(tx, ty),
              stream, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_red_bwd<float, float>(const RedBwdParams&, cudaStream_t);
template void launch_red_bwd<__half, __half>(const RedBwdParams&, cudaStream_t);
template void launch_red_bwd<__half, float>(const RedBwdParams&, cudaStream_t);
template void launch_red_bwd<__nv_bfloat16, __nv_bfloat16>(const RedBwdParams&, cudaStream_t);
template void launch_red_bwd<__nv_bfloat16, float>(const RedBwdParams&, cudaStream_t);
template int64_t red_bwd_rows_per_block<float, float>(int64_t, int64_t, int);
template int64_t red_bwd_rows_per_block<__half, __half>(int64_t, int64_t, int);
template int64_t red_bwd_rows_per_block<__half, float>(int64_t, int64_t, int);
template int64_t red_bwd_rows_per_block<__nv_bfloat16, __nv_bfloat16>(int64_t, int64_t, int);
template int64_t red_bwd_rows_per_block<__nv_bfloat16, float>(int64_t, int64_t, int);

}  // namespace reft
