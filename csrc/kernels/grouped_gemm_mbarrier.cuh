// mbarrier and named-barrier wrappers of the warp-specialised grouped-GEMM kernels
// (grouped_gemm_qmma.cuh, grouped_gemm_ws.cuh): one producer warpgroup filling a shared-memory
// ring, two consumer warpgroups (256 threads) synchronising among themselves on barrier 1.
#pragma once

#include <cstdint>

namespace dsv4 {
namespace gg {

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar)
               : "memory");
}
// arrives on the barrier once every cp.async this thread issued so far has landed (counts as
// one of the barrier's expected arrivals)
__device__ __forceinline__ void mbar_arrive_cp_async(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
__device__ __forceinline__ void consumer_sync() {  // the 256 consumer threads only
  asm volatile("bar.sync 1, 256;\n" ::: "memory");
}

}  // namespace gg
}  // namespace dsv4
