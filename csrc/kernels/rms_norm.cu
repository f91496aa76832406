// dsv4 RMSNorm CUDA kernel (torch-free; see include/dsv4/rms_norm.h for the contract).
//
// One block per row; each thread walks the row in strides of blockDim.x "packs" (16-byte
// vectors when the pointers and strides allow it, single elements otherwise). Pass 1 sums x^2
// in fp32 (warp shuffle + shared-memory block reduction), pass 2 re-reads the row (L1/L2 hit)
// and writes y = w * (x * rstd), rounded once to the output dtype (round-to-nearest-even for
// bf16, as torch's .to(torch.bfloat16)). No fast-math: rstd = 1 / sqrtf(mean + eps) with IEEE
// sqrt and division, so the only difference from the PyTorch reference is the summation order.
#include "dsv4/rms_norm.h"

#include <climits>
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace dsv4 {
namespace {

constexpr int kMaxThreads = 1024;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; blockDim.x must be a multiple of 32. Every thread gets the total.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kMaxThreads / 32];
  __shared__ float total;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int n_warps = blockDim.x >> 5;
    float s = lane < n_warps ? warp_sums[lane] : 0.f;
    s = warp_sum(s);
    if (lane == 0) total = s;
  }
  __syncthreads();
  return total;
}

// VEC elements per pack; cols % VEC == 0 and all pointers/strides VEC-aligned (host checks).
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    rms_norm_kernel(const T* __restrict__ x, const float* __restrict__ weight, T* __restrict__ y,
                    int cols, int64_t x_row_stride, int64_t y_row_stride, float eps) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * x_row_stride;
  T* yr = y + row * y_row_stride;
  const int n_packs = cols / VEC;

  float ss = 0.f;
  for (int p = threadIdx.x; p < n_packs; p += blockDim.x) {
    const Pack<T, VEC> xv = reinterpret_cast<const Pack<T, VEC>*>(xr)[p];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float f = to_float(xv.v[k]);
      ss += f * f;
    }
  }
  ss = block_sum(ss);
  const float rstd = 1.0f / sqrtf(ss / static_cast<float>(cols) + eps);

  for (int p = threadIdx.x; p < n_packs; p += blockDim.x) {
    const Pack<T, VEC> xv = reinterpret_cast<const Pack<T, VEC>*>(xr)[p];
    const Pack<float, VEC> wv = reinterpret_cast<const Pack<float, VEC>*>(weight)[p];
    Pack<T, VEC> yv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) yv.v[k] = from_float<T>(wv.v[k] * (to_float(xv.v[k]) * rstd));
    reinterpret_cast<Pack<T, VEC>*>(yr)[p] = yv;
  }
}

inline bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename T, int VEC>
cudaError_t launch(const void* x, const float* weight, void* y, int64_t rows, int64_t cols,
                   int64_t x_row_stride, int64_t y_row_stride, float eps, cudaStream_t stream) {
  const int64_t n_packs = cols / VEC;
  int threads = 32;
  while (threads < kMaxThreads && threads < n_packs) threads *= 2;
  rms_norm_kernel<T, VEC><<<dim3(static_cast<unsigned>(rows)), dim3(threads), 0, stream>>>(
      static_cast<const T*>(x), weight, static_cast<T*>(y), static_cast<int>(cols), x_row_stride,
      y_row_stride, eps);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_vec(const void* x, const float* weight, void* y, int64_t rows, int64_t cols,
                         int64_t x_row_stride, int64_t y_row_stride, float eps,
                         cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);  // 16-byte loads/stores of x and y
  const bool can_vec = cols % kVec == 0 && x_row_stride % kVec == 0 &&
                       y_row_stride % kVec == 0 && aligned(x, 16) && aligned(y, 16) &&
                       aligned(weight, sizeof(float) * kVec);
  if (can_vec) {
    return launch<T, kVec>(x, weight, y, rows, cols, x_row_stride, y_row_stride, eps, stream);
  }
  return launch<T, 1>(x, weight, y, rows, cols, x_row_stride, y_row_stride, eps, stream);
}

}  // namespace

cudaError_t rms_norm(const void* x, const float* weight, void* y, int64_t rows, int64_t cols,
                     int64_t x_row_stride, int64_t y_row_stride, float eps, DType dtype,
                     cudaStream_t stream) {
  if (rows < 0 || cols < 0) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (rows > INT_MAX || cols > INT_MAX) return cudaErrorInvalidValue;  // grid.x / int index
  if (x == nullptr || weight == nullptr || y == nullptr) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return dispatch_vec<float>(x, weight, y, rows, cols, x_row_stride, y_row_stride, eps,
                                 stream);
    case DType::kBFloat16:
      return dispatch_vec<__nv_bfloat16>(x, weight, y, rows, cols, x_row_stride, y_row_stride,
                                         eps, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dsv4
