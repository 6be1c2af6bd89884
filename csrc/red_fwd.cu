// RED forward: y = h * scale + bias, fp32 math (one fma), one rounding to h's dtype.
//
// Each thread moves 16-byte vectors (8 fp16/bf16 or 4 fp32 elements) when the host has checked
// the alignment (`vec_ok`), masked scalar accesses otherwise and on a row's ragged tail. Blocks
// of 256 threads are shaped (tx, ty) so that narrow rows still fill them; the grid strides over
// the rows and holds at most one wave: the blocks per SM that the compiled instantiation's
// registers allow (cudaOccupancyMaxActiveBlocksPerMultiprocessor) x SMs. The previous fixed 8
// blocks per SM overshot: at 40 registers (fp16/bf16 with scale and bias, tools/
// cuda_compile_check.py) 6 blocks of 256 threads fit, so 2 of every 8 ran as a second, mostly
// idle wave doing a full block's share of the rows (estimated up to ~1.3x the one-wave time).
#include <c10/cuda/CUDAException.h>

#include "launch.h"
#include "reft_device.cuh"
#include "static_switch.h"

namespace reft {

template <typename T, typename W, bool HAS_SCALE, bool HAS_BIAS>
__global__ void __launch_bounds__(kRedThreads) red_fwd_kernel(const RedFwdParams p) {
  constexpr int V = vec_of<T>();
  const T* __restrict__ h = static_cast<const T*>(p.h);
  const W* __restrict__ scale = static_cast<const W*>(p.scale);
  const W* __restrict__ bias = static_cast<const W*>(p.bias);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int64_t d = p.d;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < p.n_rows;
       row += row_step) {
    const T* hr = h + row * p.h_row_stride;
    T* yr = y + row * p.y_row_stride;
    for (int64_t col = static_cast<int64_t>(threadIdx.x) * V; col < d;
         col += static_cast<int64_t>(blockDim.x) * V) {
      float x[V], s[V], t[V];
      load_f32<T, V>(hr, col, d, 1, p.vec_ok, true, x);
      if (HAS_SCALE) load_f32<W, V>(scale, col, d, 1, p.vec_ok, true, s);
      if (HAS_BIAS) load_f32<W, V>(bias, col, d, 1, p.vec_ok, true, t);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        if (HAS_SCALE && HAS_BIAS) x[i] = fmaf(x[i], s[i], t[i]);
        else if (HAS_SCALE) x[i] *= s[i];
        else if (HAS_BIAS) x[i] += t[i];
      }
      store_f32<T, V>(yr, col, d, 1, p.vec_ok, true, x);
    }
  }
}

template <typename T, typename W>
void launch_red_fwd(const RedFwdParams& p, cudaStream_t stream) {
  if (p.n_rows == 0 || p.d == 0) return;
  const int tx = red_block_x(p.d, vec_of<T>());
  const int ty = kRedThreads / tx;
  REFT_BOOL_SWITCH(p.scale != nullptr, HAS_SCALE, [&] {
    REFT_BOOL_SWITCH(p.bias != nullptr, HAS_BIAS, [&] {
      const auto kernel = red_fwd_kernel<T, W, HAS_SCALE, HAS_BIAS>;
      const int64_t wave = static_cast<int64_t>(resident_blocks_per_sm(kernel, kRedThreads)) * p.sm_count;
      const int64_t blocks = std::min<int64_t>(cdiv(p.n_rows, ty), wave);
      REFT_LAUNCH(kernel, static_cast<unsigned>(blocks), dim3(tx, ty), stream, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

template void launch_red_fwd<float, float>(const RedFwdParams&, cudaStream_t);
template void launch_red_fwd<__half, __half>(const RedFwdParams&, cudaStream_t);
template void launch_red_fwd<__half, float>(const RedFwdParams&, cudaStream_t);
template void launch_red_fwd<__nv_bfloat16, __nv_bfloat16>(const RedFwdParams&, cudaStream_t);
template void launch_red_fwd<__nv_bfloat16, float>(const RedFwdParams&, cudaStream_t);

}  // namespace reft
