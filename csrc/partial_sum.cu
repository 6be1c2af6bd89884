// Second stage of the deterministic backward reductions: out[j] = sign * sum_b parts[b, j] over
// the row blocks b of a (n_blocks, width) fp32 buffer. Two kernels, each bitwise deterministic
// for a given (n_blocks, width) (no atomics, a fixed summation order):
//
// partial_sum_kernel (PartialSumParams::split false, the default: kernels(cuda_finish="serial");
//   and wherever the split does not pay): one thread per column adds the row blocks in order
//   b = 0, 1, ... (coalesced across threads). With few columns this leaves most of the GPU idle
//   while each thread walks every row block: e.g. RED's ds at d = 4096 is 4096 threads (16
//   blocks on 132 SMs) adding 264 row blocks each, one dependent add per load (estimated tens of
//   microseconds, beside ~130 us for the RED backward itself at 16384 x 4096 bf16).
// partial_sum_split_kernel (PartialSumParams::split: kernels(cuda_finish="split"), where
//   partial_sum_split says it pays):
//   S threads per column (S a power of two, a function of n_blocks and width only), thread s
//   adding the contiguous range of row blocks [s L, (s + 1) L), L = cdiv(n_blocks, S), in order;
//   the S sums are then combined by a fixed tree in shared memory (s += s + S/2, then S/4, ...).
//   Blocks of kFinishThreads threads shaped (256 / S columns, S ranges).
#include <c10/cuda/CUDAException.h>

#include "launch.h"

namespace reft {

constexpr int kFinishThreads = 256;
// At most this many ranges per column, each at least kFinishMinRange row blocks long.
constexpr int kFinishMaxSplit = 32;
constexpr int kFinishMinRange = 2;
// Split only while width x S stays under this many threads: about one resident wave of an H100
// (132 SMs x 2048 threads); a finish wider than that already fills the GPU one thread per column.
constexpr int64_t kFinishFillThreads = 1 << 18;

// Ranges per column of the split finish for (n_blocks, width): 1 means the serial kernel. Depends
// on nothing else (not the GPU), so the summation order is fixed by the shapes.
inline int partial_sum_split(int64_t n_blocks, int64_t width) {
  int s = 1;
  while (s * 2 <= kFinishMaxSplit && static_cast<int64_t>(s) * 2 * kFinishMinRange <= n_blocks &&
         width * s * 2 <= kFinishFillThreads)
    s *= 2;
  return s;
}

__global__ void __launch_bounds__(kFinishThreads)
    partial_sum_kernel(const float* __restrict__ parts, int64_t n_blocks, int64_t width, float sign,
                       float* __restrict__ out) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < width; j += step) {
    float acc = 0.f;
    for (int64_t b = 0; b < n_blocks; ++b) acc += parts[b * width + j];
    out[j] = sign * acc;
  }
}

// blockDim = (kFinishThreads / S, S). The loop over column groups is uniform across the block
// (every thread reaches every __syncthreads).
__global__ void __launch_bounds__(kFinishThreads)
    partial_sum_split_kernel(const float* __restrict__ parts, int64_t n_blocks, int64_t width, int64_t range,
                             float sign, float* __restrict__ out) {
  __shared__ float s_sum[kFinishThreads];
  const int cx = static_cast<int>(blockDim.x), sy = static_cast<int>(blockDim.y);
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int slot = ty * cx + tx;
  const int64_t b0 = static_cast<int64_t>(ty) * range;
  const int64_t b1 = b0 + range < n_blocks ? b0 + range : n_blocks;
  for (int64_t c0 = static_cast<int64_t>(blockIdx.x) * cx; c0 < width; c0 += static_cast<int64_t>(gridDim.x) * cx) {
    const int64_t j = c0 + tx;
    float acc = 0.f;
    if (j < width) {
      // The loads are independent (several in flight), the adds stay in order b0, b0 + 1, ...
#pragma unroll 4
      for (int64_t b = b0; b < b1; ++b) acc += parts[b * width + j];
    }
    s_sum[slot] = acc;
    __syncthreads();
    for (int half = sy / 2; half > 0; half /= 2) {
      if (ty < half) s_sum[slot] += s_sum[slot + half * cx];
      __syncthreads();
    }
    if (ty == 0 && j < width) out[j] = sign * s_sum[tx];
    __syncthreads();  // s_sum is rewritten by the next column group
  }
}

void launch_partial_sum(const PartialSumParams& p, cudaStream_t stream) {
  if (p.width == 0) return;
  const int split = p.split ? partial_sum_split(p.n_blocks, p.width) : 1;
  if (split == 1) {
    const int64_t blocks = std::min<int64_t>(cdiv(p.width, kFinishThreads), 65535);
    REFT_LAUNCH(partial_sum_kernel, static_cast<unsigned>(blocks), kFinishThreads, stream, p.parts, p.n_blocks,
                p.width, p.sign, p.out);
  } else {
    const int cx = kFinishThreads / split;
    const int64_t blocks = std::min<int64_t>(cdiv(p.width, cx), 65535);
    REFT_LAUNCH(partial_sum_split_kernel, static_cast<unsigned>(blocks), dim3(cx, split), stream, p.parts,
                p.n_blocks, p.width, cdiv(p.n_blocks, split), p.sign, p.out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace reft
