// Device helpers shared by the kernels: dtype conversion, masked 16-byte vector loads/stores,
// warp reductions and the activations (same codes and formulas as reft_kernels/_activations.py).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "launch.h"

namespace reft {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T> __device__ __forceinline__ float to_f32(T x);
template <> __device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }


__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Blocks of `threads` threads of `kernel` that one SM holds at once, as the compiled kernel's
// registers and static shared memory allow (at least 1): the grid planners multiply it by the
// SM count for one full wave. A host call without a device synchronisation. The answer depends
// only on (kernel, threads, device), so it is asked once and kept: the small-n calls are
// launch-bound and should not pay the occupancy query (about a microsecond) on every launch.
template <typename K>
inline int resident_blocks_per_sm(K kernel, int threads) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int>, int> cache;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), threads, device);
  std::lock_guard<std::mutex> lock(mu);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0));
  return cache[key] = (blocks > 0 ? blocks : 1);
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// out[i] = row[(col + i) * stride] as fp32 for col + i < d, else 0; zero everywhere when !ok.
// One vector load when `vec` (stride 1, aligned start: checked by the host) and the pack is whole.
template <typename T, int N>
__device__ __forceinline__ void load_f32(const T* row, int64_t col, int64_t d, int64_t stride,
                                         bool vec, bool ok, float (&out)[N]) {
  if (ok && vec && col + N <= d) {
    const Pack<T, N> p = *reinterpret_cast<const Pack<T, N>*>(row + col);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_f32(p.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = (ok && col + i < d) ? to_f32(row[(col + i) * stride]) : 0.f;
  }
}

// The N elements row[(col + i) * stride] as stored (no conversion yet), zero for col + i >= d and
// everywhere when !ok: one 16-byte load under the same conditions as load_f32. Keeping packs
// unconverted until their FMAs holds N / 2 registers per fp16/bf16 pack instead of N, so a kernel
// can have several rows' loads in flight at once (lowrank_edit_bwd_params_vec_kernel).
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* row, int64_t col, int64_t d, int64_t stride, bool vec,
                                                bool ok) {
  Pack<T, N> p;
  if (ok && vec && col + N <= d) {
    p = *reinterpret_cast<const Pack<T, N>*>(row + col);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p.v[i] = (ok && col + i < d) ? row[(col + i) * stride] : from_f32<T>(0.f);
  }
  return p;
}

// row[(col + i) * stride] = val[i] rounded to T, for col + i < d; nothing when !ok.
template <typename T, int N>
__device__ __forceinline__ void store_f32(T* row, int64_t col, int64_t d, int64_t stride, bool vec,
                                          bool ok, const float (&val)[N]) {
  if (!ok) return;
  if (vec && col + N <= d) {
    Pack<T, N> p;
#pragma unroll
    for (int i = 0; i < N; ++i) p.v[i] = from_f32<T>(val[i]);
    *reinterpret_cast<Pack<T, N>*>(row + col) = p;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (col + i < d) row[(col + i) * stride] = from_f32<T>(val[i]);
  }
}

// Copies N elements unchanged (the saved rows of the in-place forward).
template <typename T, int N>
__device__ __forceinline__ void copy_elems(const T* src, int64_t src_stride, T* dst, int64_t col,
                                           int64_t d, bool vec, bool ok) {
  if (!ok) return;
  if (vec && col + N <= d) {
    *reinterpret_cast<Pack<T, N>*>(dst + col) = *reinterpret_cast<const Pack<T, N>*>(src + col);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (col + i < d) dst[col + i] = src[(col + i) * src_stride];
  }
}

// One halving step of warp_reduce_scatter32: lanes with bit O set keep (and receive their
// partner's half of) values O..2O-1, the others values 0..O-1; the kept half moves to 0..O-1.
template <int O>
__device__ __forceinline__ void reduce_scatter_step(float (&v)[32], int lane) {
  const bool upper = (lane & O) != 0;
#pragma unroll
  for (int j = 0; j < O; ++j) {
    const float send = upper ? v[j] : v[j + O];
    const float keep = upper ? v[j + O] : v[j];
    v[j] = keep + __shfl_xor_sync(kFullMask, send, O);
  }
}

// Reduce-scatter of 32 per-lane values over a warp: on return v[0] of lane L holds the sum over
// all lanes of their original v[L]. 31 shuffles instead of 32 x 5 for 32 separate reductions.
// Each sum is formed by one lane in a fixed order, so results are bitwise reproducible. The
// steps are spelled out (not a loop over O) so that every index is a compile-time constant:
// a runtime index would put v in local memory.
__device__ __forceinline__ void warp_reduce_scatter32(float (&v)[32], int lane) {
  reduce_scatter_step<16>(v, lane);
  reduce_scatter_step<8>(v, lane);
  reduce_scatter_step<4>(v, lane);
  reduce_scatter_step<2>(v, lane);
  reduce_scatter_step<1>(v, lane);
}

// sigmoid through tanhf: an IEEE fp32 division compiles to a subroutine call on its slow path,
// and the registers saved around that call showed up as spills in the low-rank kernels.
__device__ __forceinline__ float sigmoidf_(float x) { return fmaf(0.5f, tanhf(0.5f * x), 0.5f); }

__device__ __forceinline__ float act_fwd(float u, int act) {
  switch (act) {
    case kRelu: return fmaxf(u, 0.f);
    case kGelu: return 0.5f * u * (1.f + erff(u * 0.7071067811865476f));
    case kGeluTanh: return 0.5f * u * (1.f + tanhf(0.7978845608028654f * (u + 0.044715f * u * u * u)));
    case kSilu: return u * sigmoidf_(u);
    case kTanh: return tanhf(u);
    case kSigmoid: return sigmoidf_(u);
    default: return u;
  }
}

__device__ __forceinline__ float act_grad(float u, int act) {
  switch (act) {
    case kRelu: return u > 0.f ? 1.f : 0.f;
    case kGelu:
      return 0.5f * (1.f + erff(u * 0.7071067811865476f)) + u * expf(-0.5f * u * u) * 0.3989422804014327f;
    case kGeluTanh: {
      const float t = tanhf(0.7978845608028654f * (u + 0.044715f * u * u * u));
      return 0.5f * (1.f + t) + 0.5f * u * (1.f - t * t) * 0.7978845608028654f * (1.f + 0.134145f * u * u);
    }
    case kSilu: {
      const float s = sigmoidf_(u);
      return s * (1.f + u * (1.f - s));
    }
    case kTanh: {
      const float t = tanhf(u);
      return 1.f - t * t;
    }
    case kSigmoid: {
      const float s = sigmoidf_(u);
      return s * (1.f - s);
    }
    default: return 1.f;
  }
}

}  // namespace reft
