// dsv4 clamped SwiGLU over grouped-GEMM outputs. Contract: include/dsv4/moe_swiglu.h; semantics:
// python/dsv4/layers/moe.py swiglu_clamped. One elementwise pass: each thread owns 8 columns of
// a pair (16-byte loads of the gate and up halves, one 16-byte store) when n % 8 == 0 and the
// rows are 16-byte aligned, one column otherwise. Every multiply and add is an explicitly
// rounded __fmul_rn / __fadd_rn and the division an IEEE __fdiv_rn, as PyTorch's fp32 kernels
// compute them (bit-identical to the reference on the same inputs).
#include "dsv4/moe_swiglu.h"

#include <cuda_bf16.h>

#include <cstdint>

namespace dsv4 {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xFFFF0000u); }

// One element. torch's clamp(max=L) / clamp(-L, L) keep NaN (a comparison with NaN is false).
__device__ __forceinline__ float swiglu_one(float g, float u, float w, float limit) {
  if (limit > 0.f) {
    g = g > limit ? limit : g;
    u = u > limit ? limit : (u < -limit ? -limit : u);
  }
  const float s = __fdiv_rn(g, __fadd_rn(1.f, expf(-g)));  // F.silu: v / (1 + exp(-v))
  return __fmul_rn(__fmul_rn(s, u), w);
}

__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

__global__ void __launch_bounds__(kThreads)
    moe_swiglu_vec8_kernel(const uint16_t* gu, int64_t gu_stride, const float* weight,
                           uint16_t* h, int64_t h_stride, int64_t n, float limit) {
  const int64_t p = blockIdx.y;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * 8;
  if (c >= n) return;
  const uint16_t* row = gu + p * gu_stride;
  const uint4 gv = *reinterpret_cast<const uint4*>(row + c);
  const uint4 uv = *reinterpret_cast<const uint4*>(row + n + c);
  const float w = __ldg(weight + p);
  const uint32_t gw[4] = {gv.x, gv.y, gv.z, gv.w};
  const uint32_t uw[4] = {uv.x, uv.y, uv.z, uv.w};
  uint32_t o[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    o[i] = pack2(swiglu_one(bf16_lo(gw[i]), bf16_lo(uw[i]), w, limit),
                 swiglu_one(bf16_hi(gw[i]), bf16_hi(uw[i]), w, limit));
  *reinterpret_cast<uint4*>(h + p * h_stride + c) = make_uint4(o[0], o[1], o[2], o[3]);
}

__global__ void __launch_bounds__(kThreads)
    moe_swiglu_scalar_kernel(const uint16_t* gu, int64_t gu_stride, const float* weight,
                             uint16_t* h, int64_t h_stride, int64_t n, float limit) {
  const int64_t p = blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= n) return;
  const uint16_t* row = gu + p * gu_stride;
  const float v = swiglu_one(bf16_lo(row[c]), bf16_lo(row[n + c]), __ldg(weight + p), limit);
  h[p * h_stride + c] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

}  // namespace

cudaError_t moe_swiglu(const void* gu, int64_t gu_stride, const float* weight, void* h,
                       int64_t h_stride, int64_t pairs, int64_t n, float limit,
                       cudaStream_t stream) {
  if (pairs < 0 || n < 0 || !(limit >= 0.f)) return cudaErrorInvalidValue;
  if (pairs == 0 || n == 0) return cudaSuccess;
  if (gu == nullptr || weight == nullptr || h == nullptr || gu_stride < 2 * n || h_stride < n)
    return cudaErrorInvalidValue;
  if (pairs > 65535) {  // grid.y: pairs in slices of 65535 rows
    for (int64_t p0 = 0; p0 < pairs; p0 += 65535) {
      const int64_t m = pairs - p0 < 65535 ? pairs - p0 : 65535;
      const cudaError_t err =
          moe_swiglu(static_cast<const uint16_t*>(gu) + p0 * gu_stride, gu_stride, weight + p0,
                     static_cast<uint16_t*>(h) + p0 * h_stride, h_stride, m, n, limit, stream);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  const auto* g = static_cast<const uint16_t*>(gu);
  auto* o = static_cast<uint16_t*>(h);
  const bool vec = n % 8 == 0 && gu_stride % 8 == 0 && h_stride % 8 == 0 &&
                   reinterpret_cast<uintptr_t>(gu) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(h) % 16 == 0;
  const int64_t per_block = vec ? kThreads * 8 : kThreads;
  const dim3 grid(static_cast<unsigned>((n + per_block - 1) / per_block),
                  static_cast<unsigned>(pairs));
  if (vec)
    moe_swiglu_vec8_kernel<<<grid, kThreads, 0, stream>>>(g, gu_stride, weight, o, h_stride, n,
                                                          limit);
  else
    moe_swiglu_scalar_kernel<<<grid, kThreads, 0, stream>>>(g, gu_stride, weight, o, h_stride, n,
                                                            limit);
  return cudaGetLastError();
}

}  // namespace dsv4
