// Host-visible pieces of the one-pass low-rank backward with thread-block clusters
// (lowrank_edit_bwd_cluster.cu): tile constants, the plan (cluster size, CTA width, threads) for
// a (d, r), the dynamic shared-memory layout that host and kernel both compute, the launchers.
//
// Scheme: a cluster of C CTAs (C in 1, 2, 4, 8) splits d, CTA c owning a contiguous slice of
// columns; a persistent grid of Q clusters walks the row blocks of kClusterRows rows (cluster q
// takes blocks q, q + Q, ...). Per row block each CTA stages its g (and x) slice in shared
// memory from HBM once, forms its partial latent gradient, the cluster sums the C partials in
// rank order through distributed shared memory (every CTA gets the same bits), and each CTA then
// writes dh for its columns and accumulates its parameter-gradient partials in registers over all
// its row blocks; at the end CTA c writes its columns of row q of the (Q, r, d) partial buffers,
// summed in order q = 0 .. Q-1 by launch_partial_sum.
#pragma once

#include <cstdint>

#include "launch.h"

namespace reft {

// Rows per row block: four warp row groups of kRowsPerWarp (the latent reduce-scatter's shape).
constexpr int kClusterRows = 16;
constexpr int kClusterRowGroups = kClusterRows / kRowsPerWarp;
// Thread-block clusters of up to 8 CTAs: the portable maximum (16 needs a non-portable opt-in).
constexpr int kClusterMaxSize = 8;
// Ranks up to 16: each thread keeps 3 fp32 accumulators (dA, z^T g, gz^T x) per rank and column
// in registers for the whole kernel, 3 * 16 * 2 = 96 at the limit, and ptxas then reports 238-254
// registers with no spills (tools/cuda_compile_check.py). Larger ranks keep the split kernels.
constexpr int kClusterMaxRank = 16;
// Each thread owns 2 adjacent columns of its CTA's slice in the dh/parameter phase; CTAs have 128
// or 256 threads (4 or 8 warps: the four row groups once or twice over the columns).
constexpr int kClusterColsPerThread = 2;
constexpr int kClusterMaxThreads = 256;
constexpr int64_t kClusterMaxSlice = static_cast<int64_t>(kClusterMaxThreads) * kClusterColsPerThread;
constexpr int64_t kClusterMaxWidth = kClusterMaxSize * kClusterMaxSlice;  // d up to 4096

// cluster_size 0: the cluster kernel does not take this shape.
struct LowrankBwdClusterPlan {
  int cluster_size;
  int threads;
  int rank_chunk;  // 4, 8 or 16: the rank dimension of the register accumulators
  int64_t slice;   // columns per CTA, a multiple of 16
};

// Cluster size: `requested` when given (1, 2, 4 or 8, and d / requested <= 512 columns per CTA),
// otherwise the smallest that gives each CTA at most 512 columns (so at least 256 when C > 1:
// fewer CTAs per cluster mean a shorter latent reduction and more clusters to spread rows over).
inline LowrankBwdClusterPlan lowrank_bwd_cluster_plan(int64_t d, int64_t r, int64_t requested) {
  LowrankBwdClusterPlan plan{0, 0, 0, 0};
  if (d < 1 || r < 1 || r > kClusterMaxRank) return plan;
  int64_t c = 1;
  if (requested > 0) {
    if (requested > kClusterMaxSize || (requested & (requested - 1)) != 0) return plan;
    c = requested;
  } else {
    while (c < kClusterMaxSize && cdiv(d, c) > kClusterMaxSlice) c *= 2;
  }
  if (cdiv(d, c) > kClusterMaxSlice) return plan;
  plan.cluster_size = static_cast<int>(c);
  plan.slice = cdiv(cdiv(d, c), 16) * 16;
  plan.threads = plan.slice > (kClusterMaxThreads / 2) * kClusterColsPerThread ? kClusterMaxThreads
                                                                                 : kClusterMaxThreads / 2;
  plan.rank_chunk = r <= 4 ? 4 : (r <= 8 ? 8 : 16);
  return plan;
}

// Whether the input rows x are staged: some parameter gradient reads them.
__host__ __device__ inline bool cluster_stages_x(bool need_dA, bool need_dB, bool need_dC, bool tied) {
  return need_dA || need_dC || (tied && need_dB);
}

// Byte offsets into a CTA's dynamic shared memory, every region 16-byte aligned:
//   g[2], x[2]  double-buffered (kClusterRows, slice) tiles of the activation dtype (x only when
//               staged); the next row block's tiles load while this one is computed
//   part        fp32 [2 slots][2 column parts][kClusterRows][rank_chunk]: this CTA's partial latent
//               gradient, read by the whole cluster; two slots, alternating per row block, so one
//               cluster barrier per row block is enough (a slot is rewritten two blocks later,
//               after a barrier that every reader of its previous contents has passed)
//   gz, ga, z   fp32 [kClusterRows][rank_chunk]: the row block's latents, cluster-wide sums
//   ok          int [kClusterRows]: the row is real (inside n, index entry not -1)
struct ClusterSmemLayout {
  int64_t g[2], x[2], part, gz, ga, z, ok, total;
};

__host__ __device__ inline ClusterSmemLayout cluster_smem_layout(int64_t slice, int64_t elem_bytes, int rank_chunk,
                                                                 bool stage_x) {
  ClusterSmemLayout l{};
  const int64_t tile = kClusterRows * slice * elem_bytes;  // a multiple of 16 * 16 bytes
  int64_t off = 0;
  for (int b = 0; b < 2; ++b) {
    l.g[b] = off;
    off += tile;
  }
  for (int b = 0; b < 2; ++b) {
    l.x[b] = stage_x ? off : l.g[b];
    if (stage_x) off += tile;
  }
  const int64_t lat = static_cast<int64_t>(kClusterRows) * rank_chunk * 4;
  l.part = off;
  off += 4 * lat;
  l.gz = off;
  off += lat;
  l.ga = off;
  off += lat;
  l.z = off;
  off += lat;
  l.ok = off;
  off += kClusterRows * 4;
  l.total = off;
  return l;
}

// The device can run the cluster kernel: compute capability 9.0 or newer and this build holds the
// kernel's sm_90 code (a build for sm_80 only has an empty body there).
bool lowrank_bwd_cluster_device_ok(int device);

// Clusters of the persistent grid: `max_clusters` when given (> 0; tests and tuning), else as many
// as are co-resident (cudaOccupancyMaxActiveClusters, from the compiled kernel's registers and
// this shared memory); never more than the row blocks.
template <typename T, typename W>
int64_t lowrank_bwd_cluster_count(const LowrankBwdClusterPlan& plan, int64_t n_row_blocks, bool stage_x,
                                  int64_t max_clusters);

template <typename T, typename W>
void launch_lowrank_edit_bwd_cluster(const LowrankBwdClusterParams& p, const LowrankBwdClusterPlan& plan,
                                     int64_t n_clusters, cudaStream_t stream);

}  // namespace reft
