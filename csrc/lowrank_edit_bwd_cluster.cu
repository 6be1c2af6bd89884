// Low-rank edit backward in one HBM pass with thread-block clusters (sm_90; opt-in, see
// reft_kernels/ops/lowrank_edit/cuda_impl.py). The scheme and the shared-memory layout are
// described in lowrank_edit_bwd_cluster.h. Per row block of kClusterRows rows, CTA c of a cluster:
//   0. has its slice of g (rows through the index) and of x (dense saved rows) in shared memory:
//      16-byte cp.async copies issued one row block ahead (double buffer), masked tails and
//      padding rows written as zeros;
//   1. forms its partial gz_c = g_slice B_slice^T (kClusterRows x r, fp32): warp w takes row group
//      w % 4 over column part w / 4, lanes accumulate 4 rows x 8 ranks and reduce-scatter them
//      (as the split kernels do), into slot (block parity) of its `part` buffer;
//   2. cluster barrier; every CTA sums the partials of CTAs 0 .. C-1 (then column parts 0, 1) in
//      that order through distributed shared memory: all hold the same gz bits. ga = gz act'(u);
//      CTA 0 writes gz, ga (n, r) like the split kernels (the bias kernel sums them for da, dc);
//   3. each thread, for its 2 columns: dh = g + ga A - gz C for the block's 16 rows (ranks outer,
//      so each weight is loaded once per block) written straight to HBM; then row by row the fp32
//      register accumulators dA += ga x, dB += z g, gx += gz x, kept across all the cluster's row
//      blocks (tied: dB = z^T g - gz^T x is formed at the end).
// HBM traffic per element: g read once, x read once, dh written once (6 bytes in bf16), plus the
// (n, r) latents and the (Q, r, d) partials; the split kernels read g twice (8 bytes). Estimated
// for N = 16384, d = 4096, r = 8, bf16 on an H100 (not measured): 403 MB of rows, ~2 MB of
// latents, 16 clusters of 8 CTAs -> (16, 8, 4096) fp32 partials, 2 MiB per matrix written and read
// once more by the finish: about 6.2 bytes per element against about 8.2 for the split kernels;
// launches: 1 + one partial sum per parameter matrix against 2 + one per matrix (both then add the
// bias kernel and one sum per bias gradient).
// Limits, estimated: registers allow one 256-thread CTA per SM (154-254 registers, see
// tools/cuda_compile_check.py), so the double-buffered copies (32 KiB per SM in flight at d = 4096
// bf16) are what hides HBM latency; one cluster barrier per 16-row block (~1.9 us of HBM time per
// block at d = 4096 bf16) is overlapped only by those copies; and the products are fp32 FMAs:
// ~6 per rank and element (LoReFT r = 8: 48), about 80% of the H100's FP32 issue rate at the
// 6-byte roofline for r = 8 and above it for r = 16, the same FMA count as the split kernels.
// Tensor-core MMAs for the latent and parameter products are the next step if a GPU run shows
// the FMA pipe as the limit.
// The kernel body exists for sm_90 and newer only (clusters); the sm_80 build keeps an empty
// body that the host never launches (lowrank_bwd_cluster_device_ok).
#include <c10/cuda/CUDAException.h>
#include <cooperative_groups.h>

#include <cstring>

#include "lowrank_edit_bwd_cluster.h"
#include "lowrank_edit_common.cuh"
#include "static_switch.h"

#if defined(REFT_CPU_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
#define REFT_CLUSTER_BODY 1
#else
#define REFT_CLUSTER_BODY 0
#endif

// A CTA's dynamic shared memory as `unsigned char* name`: `extern __shared__` under nvcc; the
// emulation (tests/cuda/emulation) hands each CTA of a cluster its own buffer.
#ifdef REFT_CPU_EMULATION
#define REFT_DYNAMIC_SHARED(name) unsigned char* name = ::reft_emu::dynamic_smem
#else
#define REFT_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace reft {

namespace cg = cooperative_groups;

// 16 bytes global -> shared without passing through registers (cp.async.cg: cached in L2 only, the
// rows are read once); completion is awaited with async_wait_all before a CTA barrier.
__device__ __forceinline__ void async_copy16(void* smem_dst, const void* gmem_src) {
#ifdef REFT_CPU_EMULATION
  std::memcpy(smem_dst, gmem_src, 16);
#elif defined(__CUDA_ARCH__)
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
#endif
}

__device__ __forceinline__ void async_commit() {
#if !defined(REFT_CPU_EMULATION) && defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void async_wait_all() {
#if !defined(REFT_CPU_EMULATION) && defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}

// Stages rows m0 .. m0 + kClusterRows - 1, columns [c0, c0 + cols) of a row tensor into a
// (kClusterRows, slice) tile: 16-byte async copies where `vec` allows, elementwise otherwise;
// zeros for padding rows, rows past n and columns past `cols`, so that the tile holds no stale
// or NaN values that a zero latent would still turn into NaN. Row i is row idx[m0 + i] of `base`
// when `through_idx` (g), row m0 + i otherwise (x: the dense saved rows; padding rows zeroed).
template <typename T>
__device__ __forceinline__ void stage_tile(T* tile, const T* base, const int64_t* idx, bool through_idx, int64_t m0,
                                           int64_t n, int64_t row_stride, int64_t col_stride, bool vec, int64_t c0,
                                           int64_t cols, int64_t slice, int tid, int nt) {
  constexpr int V = vec_of<T>();
  const int64_t per_row = slice / V;
  const T zero = from_f32<T>(0.f);
  for (int64_t e = tid; e < kClusterRows * per_row; e += nt) {
    const int i = static_cast<int>(e / per_row);
    const int64_t lc = (e % per_row) * V;
    const int64_t m = m0 + i;
    int64_t src;
    const bool ok = row_source(idx, m, n, src);
    if (!through_idx) src = m;
    T* dst = tile + i * slice + lc;
    const T* row = base + src * row_stride;
    if (ok && vec && lc + V <= cols) {
      async_copy16(dst, row + c0 + lc);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) dst[v] = (ok && lc + v < cols) ? row[(c0 + lc + v) * col_stride] : zero;
    }
  }
}

// N consecutive elements of a shared-memory tile as fp32 (one 2N-byte or 4N-byte load).
template <typename T, int N>
__device__ __forceinline__ void tile_load(const T* src, float (&out)[N]) {
  const Pack<T, N> p = *reinterpret_cast<const Pack<T, N>*>(src);
#pragma unroll
  for (int v = 0; v < N; ++v) out[v] = to_f32(p.v[v]);
}

// Partial latent gradient of one warp: rows 4 grp .. 4 grp + 3 of the tile, local columns
// [col_begin, col_end), all ranks in chunks of 8, into part[row][rank] (fp32, rank_chunk RK).
template <typename T, typename W, int RK>
__device__ __forceinline__ void warp_partial_gz(const T* tile, int64_t slice, int grp, int64_t col_begin,
                                                int64_t col_end, const W* B, int64_t c0, int64_t d, int64_t r,
                                                bool wvec, int lane, float* part) {
  constexpr int V = vec_of<T>();
  const T* rows = tile + static_cast<int64_t>(grp) * kRowsPerWarp * slice;
  for (int64_t k0 = 0; k0 < r; k0 += kRankChunk) {
    float acc[32];
#pragma unroll
    for (int j = 0; j < 32; ++j) acc[j] = 0.f;
    // Lanes may run different numbers of iterations: no shuffle inside the loop.
    for (int64_t lc = col_begin + static_cast<int64_t>(lane) * V; lc < col_end; lc += 32 * V) {
      float x[kRowsPerWarp][V];
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) tile_load<T, V>(rows + i * slice + lc, x[i]);
#pragma unroll
      for (int kk = 0; kk < kRankChunk; ++kk) {
        const int64_t k = k0 + kk;
        if (k < r) dot_rank_term<W, V>(acc, x, kk, B + k * d, c0 + lc, d, wvec);  // uniform over the warp
      }
    }
    warp_reduce_scatter32(acc, lane);
    const int li = lane / kRankChunk;
    const int64_t k = k0 + lane % kRankChunk;
    if (k < RK) part[(grp * kRowsPerWarp + li) * RK + k] = acc[0];
  }
}

// __launch_bounds__(256, 1): one CTA per SM is the design point (the registers hold the
// accumulators of 2 columns x up to 16 ranks x 3 matrices for the whole kernel, beside the 4-row
// x 8-rank latent tile of phase 1 or the 16-row dh tile of phase 3).
template <typename T, typename W, int RK>
__global__ void __launch_bounds__(kClusterMaxThreads, 1)
    lowrank_edit_bwd_cluster_kernel(const LowrankBwdClusterParams cp) {
#if REFT_CLUSTER_BODY
  constexpr int CPT = kClusterColsPerThread;
  REFT_DYNAMIC_SHARED(smem);
  const cg::cluster_group cluster = cg::this_cluster();
  const LowrankBwdParams& p = cp.b;
  const int tid = threadIdx.x, nt = blockDim.x, warp = tid / 32, lane = tid % 32;
  const int csize = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t q = blockIdx.x / csize, n_clusters = gridDim.x / csize;
  const int64_t n = p.n_rows, d = p.d, r = p.r, slice = cp.slice;
  const int64_t c0 = rank * slice;
  const int64_t cols = c0 < d ? min64(slice, d - c0) : 0;  // this CTA's columns: [c0, c0 + cols)

  const bool need_a = p.dA_part != nullptr, need_b = p.dB_part != nullptr, need_c = p.dC_part != nullptr;
  const bool acc_gx = need_c || (p.tied && need_b);  // gz^T x: dC, and the tied dB's second term
  const bool stage_x = cluster_stages_x(need_a, need_b, need_c, p.tied);
  const bool has_a = p.A != nullptr, has_p = p.P != nullptr, want_dh = p.dh != nullptr;
  const ClusterSmemLayout lay = cluster_smem_layout(slice, sizeof(T), RK, stage_x);
  // Tiles of buffer b (no pointer arrays: a runtime index into one would live in local memory).
  auto tile_g = [&](int b) { return reinterpret_cast<T*>(smem + (b ? lay.g[1] : lay.g[0])); };
  auto tile_x = [&](int b) { return reinterpret_cast<T*>(smem + (b ? lay.x[1] : lay.x[0])); };
  float* s_part = reinterpret_cast<float*>(smem + lay.part);
  float* s_gz = reinterpret_cast<float*>(smem + lay.gz);
  float* s_ga = reinterpret_cast<float*>(smem + lay.ga);
  float* s_z = reinterpret_cast<float*>(smem + lay.z);
  int* s_ok = reinterpret_cast<int*>(smem + lay.ok);

  const T* g = static_cast<const T*>(p.g);
  const T* x = static_cast<const T*>(p.x);
  T* dh = static_cast<T*>(p.dh);
  const W* A = static_cast<const W*>(p.A);
  const W* B = static_cast<const W*>(p.B);
  const W* P = static_cast<const W*>(p.P);

  // Phase 3 columns of this thread: local lc3, lc3 + 1; their parameter-gradient accumulators
  // live in registers for the whole kernel.
  const int64_t lc3 = static_cast<int64_t>(tid) * CPT;
  const bool has_cols = lc3 < cols;
  float acc_a[RK][CPT], acc_b[RK][CPT], acc_c[RK][CPT];
#pragma unroll
  for (int k = 0; k < RK; ++k)
#pragma unroll
    for (int j = 0; j < CPT; ++j) acc_a[k][j] = acc_b[k][j] = acc_c[k][j] = 0.f;

  // Phase 1 work split: four row groups, over one or two column parts (8-warp CTAs).
  const int parts = nt / (32 * kClusterRowGroups);
  const int grp = warp % kClusterRowGroups, part = warp / kClusterRowGroups;
  const int64_t part_w = slice / parts;  // a multiple of 8 (slice is of 16)
  const int64_t pb = part * part_w, pe = min64(cols, pb + part_w);
  constexpr int64_t kLat = static_cast<int64_t>(kClusterRows) * RK;

  auto stage = [&](int64_t t, int buf) {
    const int64_t m0 = t * kClusterRows;
    stage_tile<T>(tile_g(buf), g, p.idx, true, m0, n, p.g_row_stride, p.g_col_stride, p.vec_ok, c0, cols, slice, tid,
                  nt);
    if (stage_x)
      stage_tile<T>(tile_x(buf), x, p.idx, false, m0, n, p.x_row_stride, p.x_col_stride, cp.x_vec_ok, c0, cols, slice,
                    tid, nt);
    async_commit();
  };

  int it = 0;
  if (q < cp.n_row_blocks) stage(q, 0);
  for (int64_t t = q; t < cp.n_row_blocks; t += n_clusters, ++it) {
    const int buf = it & 1;
    const int64_t m0 = t * kClusterRows;
    async_wait_all();
    // This block's tiles are complete, and every thread is past the previous block's phase 3:
    // the other buffer and the latent arrays are free.
    __syncthreads();
    if (t + n_clusters < cp.n_row_blocks) stage(t + n_clusters, buf ^ 1);

    // Phase 1: this CTA's partial latent gradient.
    float* my_part = s_part + static_cast<int64_t>(buf) * 2 * kLat;
    warp_partial_gz<T, W, RK>(tile_g(buf), slice, grp, pb, pe, B, c0, d, r, p.wvec_ok, lane, my_part + part * kLat);
    cluster.sync();

    // Phase 2: cluster-wide sums in rank order, then part order: the same bits in every CTA.
    for (int e = tid; e < kLat; e += nt) {
      const int i = e / RK, k = e % RK;
      float s = 0.f;
      for (int c = 0; c < csize; ++c) {
        const float* theirs = cluster.map_shared_rank(my_part, static_cast<unsigned>(c));
        for (int pp = 0; pp < parts; ++pp) s += theirs[pp * kLat + e];
      }
      const int64_t m = m0 + i;
      int64_t src;
      const bool ok = row_source(p.idx, m, n, src);
      const bool real = ok && k < r;
      const float gz = real ? s : 0.f;
      float ga = gz;
      if (p.u != nullptr && real) ga = gz * act_grad(p.u[m * r + k], p.act);
      s_gz[e] = gz;
      s_ga[e] = ga;
      s_z[e] = (real && need_b) ? p.z[m * r + k] : 0.f;
      if (k == 0) s_ok[i] = ok ? 1 : 0;
      if (rank == 0 && m < n && k < r) {
        p.gz[m * r + k] = gz;
        if (p.ga != nullptr) p.ga[m * r + k] = ga;
      }
    }
    __syncthreads();

    // Phase 3, 2 columns per thread. (a) dh = g + ga A - gz C for the block's rows, ranks outer:
    // the weights of 4 ranks are loaded (from L1: a CTA's slices of A and C are 16-64 KiB) once per
    // row block and used for all its rows, rather than held in registers beside the accumulators.
    if (has_cols) {
      const T* gt = tile_g(buf) + lc3;
      const T* xt = tile_x(buf) + lc3;
      const int64_t col = c0 + lc3, c_end = c0 + cols;
      if (want_dh) {
        float dv[kClusterRows][CPT];
#pragma unroll
        for (int i = 0; i < kClusterRows; ++i) tile_load<T, CPT>(gt + i * slice, dv[i]);
        if (has_a || has_p) {
#pragma unroll
          for (int k4 = 0; k4 < RK; k4 += 4) {
            if (k4 >= r) break;  // uniform
            float wa[4][CPT], wp[4][CPT];
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
              const int64_t k = k4 + kk;
              load_f32<W, CPT>(A + k * d, col, c_end, 1, p.wvec_ok, has_a && k < r, wa[kk]);
              load_f32<W, CPT>(P + k * d, col, c_end, 1, p.wvec_ok, has_p && k < r, wp[kk]);
            }
#pragma unroll
            for (int i = 0; i < kClusterRows; ++i) {
              const Pack<float, 4> va = *reinterpret_cast<const Pack<float, 4>*>(s_ga + i * RK + k4);
              const Pack<float, 4> vz = *reinterpret_cast<const Pack<float, 4>*>(s_gz + i * RK + k4);
#pragma unroll
              for (int kk = 0; kk < 4; ++kk)
#pragma unroll
                for (int j = 0; j < CPT; ++j) {
                  dv[i][j] = fmaf(va.v[kk], wa[kk][j], dv[i][j]);
                  dv[i][j] = fmaf(-vz.v[kk], wp[kk][j], dv[i][j]);
                }
            }
          }
        }
#pragma unroll
        for (int i = 0; i < kClusterRows; ++i) {
          int64_t src;
          if (s_ok[i] && row_source(p.idx, m0 + i, n, src))
            store_f32<T, CPT>(dh + src * p.dh_row_stride, col, c_end, p.dh_col_stride, p.vec_ok, true, dv[i]);
        }
      }
      // (b) the accumulators, row by row: dA += ga x, dB += z g, gx += gz x.
      for (int i = 0; i < kClusterRows; ++i) {
        if (!s_ok[i]) continue;  // uniform across the CTA
        float gv[CPT], xv[CPT];
        tile_load<T, CPT>(gt + i * slice, gv);
        if (stage_x) {
          tile_load<T, CPT>(xt + i * slice, xv);
        } else {
#pragma unroll
          for (int j = 0; j < CPT; ++j) xv[j] = 0.f;
        }
        // Ranks in fours: one 16-byte shared load per latent array, then their FMAs.
#pragma unroll
        for (int k4 = 0; k4 < RK; k4 += 4) {
          if (need_a || acc_gx) {
            const Pack<float, 4> va = *reinterpret_cast<const Pack<float, 4>*>(s_ga + i * RK + k4);
            const Pack<float, 4> vz = *reinterpret_cast<const Pack<float, 4>*>(s_gz + i * RK + k4);
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
#pragma unroll
              for (int j = 0; j < CPT; ++j) {
                if (need_a) acc_a[k4 + kk][j] = fmaf(va.v[kk], xv[j], acc_a[k4 + kk][j]);
                if (acc_gx) acc_c[k4 + kk][j] = fmaf(vz.v[kk], xv[j], acc_c[k4 + kk][j]);
              }
          }
          if (need_b) {
            const Pack<float, 4> vzz = *reinterpret_cast<const Pack<float, 4>*>(s_z + i * RK + k4);
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
#pragma unroll
              for (int j = 0; j < CPT; ++j) acc_b[k4 + kk][j] = fmaf(vzz.v[kk], gv[j], acc_b[k4 + kk][j]);
          }
        }
      }
    }
  }

  // Row q of the (Q, r, d) partials, this CTA's columns.
  if (has_cols) {
#pragma unroll
    for (int k = 0; k < RK; ++k)
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        if (k < r && lc3 + j < cols) {
          const int64_t o = (q * r + k) * d + c0 + lc3 + j;
          if (need_a) p.dA_part[o] = acc_a[k][j];
          if (need_b) p.dB_part[o] = p.tied ? acc_b[k][j] - acc_c[k][j] : acc_b[k][j];
          if (need_c) p.dC_part[o] = acc_c[k][j];
        }
      }
  }
  // No CTA leaves while another may still read its partials (distributed shared memory).
  cluster.sync();
#endif  // REFT_CLUSTER_BODY
}

bool lowrank_bwd_cluster_device_ok(int device) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 9) return false;
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, lowrank_edit_bwd_cluster_kernel<float, float, 8>));
  return attr.binaryVersion >= 90 && attr.ptxVersion >= 90;
}

namespace {

// The launch configuration of one instance; raises the kernel's dynamic shared-memory limit
// first where it needs more than the default 48 KiB (at most 135 KiB: fp32, slice 512, x staged).
template <typename K>
cudaLaunchConfig_t cluster_config(K* kernel, const LowrankBwdClusterPlan& plan, int64_t smem_bytes, int64_t n_clusters,
                                  cudaLaunchAttribute* attr, cudaStream_t stream) {
  if (smem_bytes > 48 * 1024)
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)));
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(n_clusters * plan.cluster_size), 1, 1);
  config.blockDim = dim3(static_cast<unsigned>(plan.threads), 1, 1);
  config.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
  config.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(plan.cluster_size);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return config;
}

}  // namespace

template <typename T, typename W>
int64_t lowrank_bwd_cluster_count(const LowrankBwdClusterPlan& plan, int64_t n_row_blocks, bool stage_x,
                                  int64_t max_clusters) {
  const int64_t blocks = n_row_blocks;
  if (max_clusters > 0) return std::max<int64_t>(1, std::min(blocks, max_clusters));
  int active = 0;
  REFT_RANK_CHUNK_SWITCH(plan.rank_chunk, RK, [&] {
    const auto kernel = lowrank_edit_bwd_cluster_kernel<T, W, RK>;
    const int64_t smem = cluster_smem_layout(plan.slice, sizeof(T), RK, stage_x).total;
    cudaLaunchAttribute attr[1];
    const cudaLaunchConfig_t config = cluster_config(kernel, plan, smem, 1, attr, nullptr);
    C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&active, kernel, &config));
  });
  return std::max<int64_t>(1, std::min<int64_t>(blocks, active));
}

template <typename T, typename W>
void launch_lowrank_edit_bwd_cluster(const LowrankBwdClusterParams& p, const LowrankBwdClusterPlan& plan,
                                     int64_t n_clusters, cudaStream_t stream) {
  if (p.b.n_rows == 0 || n_clusters < 1) return;
  REFT_RANK_CHUNK_SWITCH(plan.rank_chunk, RK, [&] {
    const auto kernel = lowrank_edit_bwd_cluster_kernel<T, W, RK>;
    const LowrankBwdParams& b = p.b;
    const bool stage_x = cluster_stages_x(b.dA_part != nullptr, b.dB_part != nullptr, b.dC_part != nullptr, b.tied);
    const int64_t smem = cluster_smem_layout(plan.slice, sizeof(T), RK, stage_x).total;
    cudaLaunchAttribute attr[1];
    const cudaLaunchConfig_t config = cluster_config(kernel, plan, smem, n_clusters, attr, stream);
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

#define REFT_CLUSTER_INSTANCES(T, W)                                                                                \
  template int64_t lowrank_bwd_cluster_count<T, W>(const LowrankBwdClusterPlan&, int64_t, bool, int64_t);         \
  template void launch_lowrank_edit_bwd_cluster<T, W>(const LowrankBwdClusterParams&, const LowrankBwdClusterPlan&, \
                                                      int64_t, cudaStream_t);
REFT_CLUSTER_INSTANCES(float, float)
REFT_CLUSTER_INSTANCES(__half, __half)
REFT_CLUSTER_INSTANCES(__half, float)
REFT_CLUSTER_INSTANCES(__nv_bfloat16, __nv_bfloat16)
REFT_CLUSTER_INSTANCES(__nv_bfloat16, float)
#undef REFT_CLUSTER_INSTANCES

}  // namespace reft
