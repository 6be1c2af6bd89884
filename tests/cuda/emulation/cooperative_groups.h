// Host stand-in for cooperative_groups.h (tests/cuda/emulation): the thread-block cluster calls
// that csrc/ uses, over the clusters of reft_emu::launch_cluster (see cuda_runtime.h here).
//   this_cluster().sync()            barrier over every thread of every CTA of the cluster
//   block_rank(), num_blocks()       this CTA's rank in the cluster, the cluster's CTA count
//   dim_blocks(), block_index()      the cluster's shape (C, 1, 1) and this CTA's place in it
//   map_shared_rank(ptr, rank)       ptr points into this CTA's dynamic shared memory: the same
//                                    offset in CTA `rank`'s buffer (distributed shared memory)
// Outside a cluster launch (a plain launch) the cluster is the block itself, as on the GPU.
#pragma once

#include <cuda_runtime.h>

namespace cooperative_groups {

class cluster_group {
 public:
  void sync() const {
    if (::reft_emu::cluster != nullptr) {
      ::reft_emu::cluster->all.wait();
    } else {
      ::reft_emu::current->block.wait();
    }
  }
  unsigned block_rank() const { return ::reft_emu::cluster_rank; }
  unsigned num_blocks() const { return ::reft_emu::cluster_dim; }
  dim3 dim_blocks() const { return dim3(::reft_emu::cluster_dim, 1, 1); }
  dim3 block_index() const { return dim3(::reft_emu::cluster_rank, 0, 0); }

  template <typename T>
  T* map_shared_rank(T* addr, unsigned rank) const {
    auto* cl = ::reft_emu::cluster;
    if (cl == nullptr) {
      if (rank != 0) ::reft_emu::fail("map_shared_rank: rank past the cluster");
      return addr;
    }
    if (rank >= cl->smem.size()) ::reft_emu::fail("map_shared_rank: rank past the cluster");
    const auto* p = reinterpret_cast<const unsigned char*>(addr);
    const unsigned char* mine = cl->smem[::reft_emu::cluster_rank];
    if (p < mine || p >= mine + cl->smem_bytes)
      ::reft_emu::fail("map_shared_rank: the pointer is not inside this CTA's dynamic shared memory");
    return reinterpret_cast<T*>(cl->smem[rank] + (p - mine));
  }
};

inline cluster_group this_cluster() { return {}; }

}  // namespace cooperative_groups
