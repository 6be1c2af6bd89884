// A host-thread emulation of the small part of the CUDA programming model that csrc/ uses, for
// testing the kernels on a machine without a GPU (build: tests/cuda/emulation/build.py).
//
// Every CUDA thread of a block runs as one std::thread; blocks run one after another, so a
// kernel's `__shared__` variables (emulated as function statics) belong to the running block.
// Thread-block clusters (cudaLaunchKernelEx with a cluster dimension, see launch_cluster): the
// CTAs of one cluster run together (all their threads at once), each with its own dynamic
// shared memory buffer, and clusters run one after another; cooperative_groups.h here gives
// cluster.sync() (a barrier over every thread of the cluster) and map_shared_rank (distributed
// shared memory: the same offset in another CTA's buffer). A cluster kernel keeps all its shared
// state in dynamic shared memory (REFT_DYNAMIC_SHARED in csrc/lowrank_edit_bwd_cluster.cu): the
// static `__shared__` stand-in would be one variable for all the CTAs running at once.
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
#include <utility>
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
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrComputeCapabilityMajor = 75 };

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

// The CTAs of a cluster: one barrier over all their threads and each CTA's dynamic shared memory.
struct Cluster {
  Cluster(int n_threads, int n_blocks) : all(n_threads), smem(n_blocks) {}
  Barrier all;
  std::vector<unsigned char*> smem;
  size_t smem_bytes = 0;
};

inline thread_local dim3 thread_idx, block_idx;
inline thread_local int linear_id = 0;
inline dim3 block_dim, grid_dim;
// Per thread: several blocks run at once inside a cluster.
inline thread_local Block* current = nullptr;
inline thread_local Cluster* cluster = nullptr;  // nullptr outside a cluster launch
inline thread_local unsigned cluster_rank = 0;
inline thread_local unsigned char* dynamic_smem = nullptr;
inline unsigned cluster_dim = 1;

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
  cluster_dim = 1;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block state(n);
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (int t = 0; t < n; ++t) {
          threads.emplace_back([&, t] {
            current = &state;
            linear_id = t;
            thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            block_idx = dim3(bx, by, bz);
            kernel(static_cast<KArgs>(args)...);
          });
        }
        for (auto& th : threads) th.join();
      }
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what);
  std::abort();
}

// Dynamic shared memory a kernel may use: 48 KiB unless cudaFuncSetAttribute raised it, at most
// 227 KiB (sm_90's opt-in limit per block), as on the GPU.
constexpr size_t kDefaultDynamicSmem = 48 * 1024;
constexpr size_t kMaxDynamicSmem = 227 * 1024;
inline std::mutex attr_mutex;
inline std::vector<std::pair<const void*, size_t>> smem_limits;

inline size_t smem_limit(const void* kernel) {
  std::lock_guard<std::mutex> lock(attr_mutex);
  for (auto& e : smem_limits)
    if (e.first == kernel) return e.second;
  return kDefaultDynamicSmem;
}

// A 1-D grid of clusters of `cdim` CTAs (grid.x a multiple of cdim; grid.y = grid.z = 1): the
// threads of all CTAs of a cluster run at once; clusters run one after another. Each CTA gets
// `smem_bytes` of dynamic shared memory filled with 0xff bytes (NaN in every float type), so a
// kernel that reads shared memory it never wrote sees NaNs in its results.
template <typename... KArgs, typename... Args>
void launch_cluster(void (*kernel)(KArgs...), dim3 grid, dim3 block, unsigned cdim, size_t smem_bytes,
                    Args... args) {
  if (cdim < 1 || cdim > 8 || grid.x % cdim != 0 || grid.y != 1 || grid.z != 1)
    fail("launch_cluster: a 1-D grid whose size is a multiple of a cluster size of 1 to 8");
  if (smem_bytes > smem_limit(reinterpret_cast<const void*>(kernel)))
    fail("dynamic shared memory above the kernel's limit (cudaFuncAttributeMaxDynamicSharedMemorySize)");
  grid_dim = grid;
  block_dim = block;
  cluster_dim = cdim;
  const int n = static_cast<int>(block.x * block.y * block.z);
  const size_t alloc = (smem_bytes + 127) / 128 * 128 + 128;
  for (unsigned c0 = 0; c0 < grid.x; c0 += cdim) {
    Cluster cl(n * static_cast<int>(cdim), static_cast<int>(cdim));
    cl.smem_bytes = smem_bytes;
    std::vector<std::unique_ptr<Block>> blocks;
    for (unsigned b = 0; b < cdim; ++b) {
      blocks.emplace_back(std::make_unique<Block>(n));
      cl.smem[b] = static_cast<unsigned char*>(std::aligned_alloc(128, alloc));
      std::memset(cl.smem[b], 0xff, alloc);
    }
    std::vector<std::thread> threads;
    threads.reserve(static_cast<size_t>(n) * cdim);
    for (unsigned b = 0; b < cdim; ++b)
      for (int t = 0; t < n; ++t) {
        threads.emplace_back([&, b, t] {
          current = blocks[b].get();
          cluster = &cl;
          cluster_rank = b;
          dynamic_smem = cl.smem[b];
          linear_id = t;
          thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
          block_idx = dim3(c0 + b, 0, 0);
          kernel(static_cast<KArgs>(args)...);
        });
      }
    for (auto& th : threads) th.join();
    for (auto* m : cl.smem) std::free(m);
  }
  cluster_dim = 1;
}

}  // namespace reft_emu

#define threadIdx (::reft_emu::thread_idx)
#define blockIdx (::reft_emu::block_idx)
// Plain references, not macros: cudaLaunchConfig_t has members of these names.
inline const dim3& blockDim = ::reft_emu::block_dim;
inline const dim3& gridDim = ::reft_emu::grid_dim;
#define __syncthreads() (::reft_emu::current->block.wait())
#define __syncwarp(...) (::reft_emu::syncwarp())

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) { return ::reft_emu::shfl_xor(v, lane_mask); }

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  // an sm_90 device (thread-block clusters), with few multiprocessors
  *value = attr == cudaDevAttrComputeCapabilityMajor ? 9 : ::reft_emu::kEmulatedSMs;
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }

// One emulated device.
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

// ---- the runtime calls of a cluster launch (cudaLaunchKernelEx and what goes with it)

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };

struct cudaLaunchAttributeValue {
  struct {
    unsigned x, y, z;
  } clusterDim;
};

struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};

struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};

// What the host code reads to know that the kernel was compiled for sm_90 (a body with clusters).
struct cudaFuncAttributes {
  int binaryVersion = 90;
  int ptxVersion = 90;
};

template <typename K>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, K*) {
  *attr = cudaFuncAttributes{};
  return cudaSuccess;
}

template <typename K>
cudaError_t cudaFuncSetAttribute(K* kernel, cudaFuncAttribute, int value) {
  if (value < 0 || static_cast<size_t>(value) > ::reft_emu::kMaxDynamicSmem)
    ::reft_emu::fail("cudaFuncSetAttribute: dynamic shared memory above 227 KiB");
  std::lock_guard<std::mutex> lock(::reft_emu::attr_mutex);
  for (auto& e : ::reft_emu::smem_limits)
    if (e.first == reinterpret_cast<const void*>(kernel)) {
      e.second = static_cast<size_t>(value);
      return cudaSuccess;
    }
  ::reft_emu::smem_limits.emplace_back(reinterpret_cast<const void*>(kernel), static_cast<size_t>(value));
  return cudaSuccess;
}

inline unsigned emulated_cluster_dim(const cudaLaunchConfig_t* config) {
  for (unsigned i = 0; i < config->numAttrs; ++i)
    if (config->attrs[i].id == cudaLaunchAttributeClusterDimension) {
      const auto& c = config->attrs[i].val.clusterDim;
      if (c.y != 1 || c.z != 1) ::reft_emu::fail("cluster dimensions other than (C, 1, 1) are not emulated");
      return c.x;
    }
  return 1;
}

// One cluster per kEmulatedSMs / C multiprocessors (at least one), like one resident CTA per SM.
template <typename K>
cudaError_t cudaOccupancyMaxActiveClusters(int* n, K*, const cudaLaunchConfig_t* config) {
  const int c = static_cast<int>(emulated_cluster_dim(config));
  *n = ::reft_emu::kEmulatedSMs / c > 0 ? ::reft_emu::kEmulatedSMs / c : 1;
  return cudaSuccess;
}

template <typename... KArgs, typename... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(KArgs...), Args&&... args) {
  ::reft_emu::launch_cluster(kernel, config->gridDim, config->blockDim, emulated_cluster_dim(config),
                             config->dynamicSmemBytes, std::forward<Args>(args)...);
  return cudaSuccess;
}

// ---- occupancy query of the grid planners (csrc/reft_device.cuh: resident_blocks_per_sm)

namespace reft_emu {
// Blocks per SM the emulated device reports: the thread limit of an sm_80/sm_90 SM (2048) over
// the block size, at most 16; registers and shared memory are unknown here. A fixed rule, so the
// tests' grids (and the row blocks of the reductions) do not depend on the machine.
constexpr int kEmulatedMaxBlocksPerSM = 16;
}  // namespace reft_emu

template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K*, int block_size, size_t) {
  const int by_threads = block_size > 0 ? 2048 / block_size : 1;
  *n = by_threads < 1 ? 1 : (by_threads > ::reft_emu::kEmulatedMaxBlocksPerSM ? ::reft_emu::kEmulatedMaxBlocksPerSM
                                                                                : by_threads);
  return cudaSuccess;
}
