// Thread-block cluster helpers (sm_90): rank, distributed shared memory addresses, loads,
// stores and reductions on a peer CTA's shared memory, and the split cluster barrier. Shared
// by the kernels that exchange data inside a cluster (indexer_topk's short-row path, mHC's
// one-pass prefill kernel). Device code for sm_90+ only (callers guard their bodies).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dsv4 {
namespace {

__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t cluster_nctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(r));
  return r;
}
// The address of the same shared-memory location in CTA `rank` of the cluster.
__device__ __forceinline__ uint32_t cluster_map(uint32_t addr, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}
__device__ __forceinline__ void cluster_red_add(uint32_t addr, uint32_t v) {
  asm volatile("red.relaxed.cluster.shared::cluster.add.u32 [%0], %1;\n" ::"r"(addr), "r"(v)
               : "memory");
}
__device__ __forceinline__ void cluster_st_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared::cluster.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
// The loads carry a "memory" clobber like the stores above: the compiler must not move them
// across plain shared-memory accesses of this thread (or cache their value), whose order the
// cluster barriers rely on.
__device__ __forceinline__ uint32_t cluster_ld_u32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared::cluster.u32 %0, [%1];\n" : "=r"(v) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ unsigned long long cluster_ld_u64(uint32_t addr) {
  unsigned long long v;
  asm volatile("ld.shared::cluster.u64 %0, [%1];\n" : "=l"(v) : "r"(addr) : "memory");
  return v;
}
// Split cluster barrier: arrive (release: this thread's shared-memory writes, local and
// remote, become visible to the peers' matching wait) ... wait (acquire).
__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

}  // namespace
}  // namespace dsv4
