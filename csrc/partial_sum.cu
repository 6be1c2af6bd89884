// Second stage of the deterministic backward reductions: out[j] = sign * sum_b parts[b, j],
// one thread per column adding the row blocks in order b = 0, 1, ... (coalesced across threads).
#include <c10/cuda/CUDAException.h>

#include "launch.h"

namespace reft {

__global__ void __launch_bounds__(256) partial_sum_kernel(const float* __restrict__ parts, int64_t n_blocks,
                                                          int64_t width, float sign, float* __restrict__ out) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < width; j += step) {
    float acc = 0.f;
    for (int64_t b = 0; b < n_blocks; ++b) acc += parts[b * width + j];
    out[j] = sign * acc;
  }
}

void launch_partial_sum(const float* parts, int64_t n_blocks, int64_t width, float sign, float* out,
                        cudaStream_t stream) {
  if (width == 0) return;
  const int64_t blocks = std::min<int64_t>(cdiv(width, 256), 65535);
  REFT_LAUNCH(partial_sum_kernel, static_cast<unsigned>(blocks), 256, stream, parts, n_blocks, width, sign, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace reft
