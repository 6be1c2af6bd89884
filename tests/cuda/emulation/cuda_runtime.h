// A host-thread emulation of the small part of the CUDA programming model that csrc/ uses, for
// testing the kernels on a machine without a GPU (build: tests/cuda/emulation/build.py).
//
// Every CUDA thread of a block runs as one std::thread; blocks run one after another, so a
// kernel's `__shared__` variables (emulated as function statics) belong to the running block.
// __syncthreads, __syncwarp and __shfl_xor_sync are barriers over the block or the warp (lanes
// 32 w .. 32 w + 31 of the linear thread index, as on the GPU): a lane that does not reach a
// shuffle its warp-mates reach deadlocks here, which the tests turn into a timeout. What this
// checks: indexing, masking, tails, the vector and scalar paths, the reduce-scatter, the index
// handling and the reductions' arithmetic. What it cannot check: timing, occupancy, real
// memory-model races (compute-sanitizer on the GPU does that).
#pragma once

#include <math.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

namespace reft_emu {

// Multiprocessors the emulated device reports: few, so that the row-block reductions still use
// several blocks on the tests' small inputs.
constexpr int kEmulatedSMs = 2;

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    const unsigned gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    // A lane that never arrives (it skipped a shuffle, __syncwarp or __syncthreads that others
    // reached) would hang the test run: fail loudly instead.
    if (!cv_.wait_for(lock, std::chrono::seconds(120), [&] { return gen != gen_; })) {
      std::fprintf(stderr, "cuda emulation: a barrier waited 120 s for %d of %d threads: some thread missed a "
                   "__shfl_xor_sync/__syncwarp/__syncthreads that the others reached\n", n_ - count_, n_);
      std::abort();
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  unsigned gen_ = 0;
};

struct Block {
  explicit Block(int n) : block(n), xchg(n) {
    for (int w = 0; w * 32 < n; ++w) warps.emplace_back(std::make_unique<Barrier>(n - 32 * w < 32 ? n - 32 * w : 32));
  }
  Barrier block;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<float> xchg;
};

inline thread_local dim3 thread_idx, block_idx;
inline thread_local int linear_id = 0;
inline dim3 block_dim, grid_dim;
inline Block* current = nullptr;

inline void syncwarp() { current->warps[linear_id / 32]->wait(); }

inline float shfl_xor(float v, int lane_mask) {
  const int lane = linear_id % 32, base = linear_id - lane;
  current->xchg[linear_id] = v;
  syncwarp();
  const float r = current->xchg[base + (lane ^ lane_mask)];
  syncwarp();
  return r;
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, Args... args) {
  grid_dim = grid;
  block_dim = block;
  const int n = static_cast<int>(block.x * block.y * block.z);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block state(n);
        current = &state;
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (int t = 0; t < n; ++t) {
          threads.emplace_back([&, t] {
            linear_id = t;
            thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            block_idx = dim3(bx, by, bz);
            kernel(static_cast<KArgs>(args)...);
          });
        }
        for (auto& th : threads) th.join();
      }
  current = nullptr;
}

}  // namespace reft_emu

#define threadIdx (::reft_emu::thread_idx)
#define blockIdx (::reft_emu::block_idx)
#define blockDim (::reft_emu::block_dim)
#define gridDim (::reft_emu::grid_dim)
#define __syncthreads() (::reft_emu::current->block.wait())
#define __syncwarp(...) (::reft_emu::syncwarp())

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) { return ::reft_emu::shfl_xor(v, lane_mask); }

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = ::reft_emu::kEmulatedSMs;
  return cudaSuccess;
}
