// Device helpers shared by the MoE gate and mHC kernels (moe_gate.cu, mhc.cu): cp.async with
// zero fill, ldmatrix, mma.sync m16n8k16 (bf16 in, fp32 accumulate), bf16 packing, and the
// "last CTA of a group finishes the work" arrival counter. sm_80+ instructions only.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace dsv4 {
namespace moe_detail {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; `valid` false fills the 16 bytes with zeros (src not read).
__device__ __forceinline__ void cp_async16_zfill(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1,
                                            uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// d += a · b for one m16n8k16 tile: a = 4 regs (8 bf16), b = 2 regs (4 bf16), d = 4 fp32.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], uint32_t a0, uint32_t a1,
                                               uint32_t a2, uint32_t a3, uint32_t b0,
                                               uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Two bf16 (lo = first element in memory) in one 32-bit register.
__device__ __forceinline__ uint32_t pack_bf16(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(lo)) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(hi)) << 16);
}

// Arrival counter of the "last CTA finishes" pattern. Every thread of the CTA must call it
// after its last global write of the partial results; returns true (in every thread) in the
// CTA that arrived last, after which that CTA may read every other CTA's partials (with
// __ldcg, i.e. not through a possibly stale L1).
__device__ __forceinline__ bool arrive_last(int* counter, int arrivals) {
  __shared__ int is_last;
  __threadfence();  // make this thread's partials visible device-wide before the arrival
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(counter, 1) == arrivals - 1;
  __syncthreads();
  if (is_last) __threadfence();  // order the reads below after the other CTAs' writes
  return is_last != 0;
}

}  // namespace moe_detail
}  // namespace dsv4
