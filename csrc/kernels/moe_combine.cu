// dsv4 MoE combine: y[t] = Σ y_pair[pos] over the token's valid pair positions in ascending
// order, + shared[t], in fp32, rounded once to bf16. Contract: include/dsv4/moe_routing.h;
// semantics: python/dsv4/ops/moe.py (moe_combine_reference).
//
// Ascending pair position = ascending expert (dispatch is expert-major), which is the order in
// which the reference MoE accumulates its experts, so given the same expert outputs the result
// is bit-identical to the reference (and to itself run to run: no atomics, fixed order).
//
// Grid (tokens, column blocks); the first topk threads of a CTA sort the token's positions
// (rank by counting, ties by slot) into shared memory, then every thread sums one 16-byte
// column chunk (8 bf16) over them.
#include "dsv4/moe_routing.h"

#include <climits>
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace dsv4 {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxK = static_cast<int>(kMoeMaxTopk);

template <int VEC>
struct Vec;
template <>
struct Vec<8> {
  using T = uint4;
};
template <>
struct Vec<1> {
  using T = uint16_t;
};

__device__ __forceinline__ void add_bf16(float* acc, uint4 v) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc[2 * i] += __uint_as_float(w[i] << 16);
    acc[2 * i + 1] += __uint_as_float(w[i] & 0xFFFF0000u);
  }
}
__device__ __forceinline__ void add_bf16(float* acc, uint16_t v) {
  acc[0] += __uint_as_float(static_cast<uint32_t>(v) << 16);
}

__device__ __forceinline__ uint16_t to_bf16_bits(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}
__device__ __forceinline__ void store(uint4* p, const float* acc) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    w[i] = static_cast<uint32_t>(to_bf16_bits(acc[2 * i])) |
           (static_cast<uint32_t>(to_bf16_bits(acc[2 * i + 1])) << 16);
  *p = make_uint4(w[0], w[1], w[2], w[3]);
}
__device__ __forceinline__ void store(uint16_t* p, const float* acc) { *p = to_bf16_bits(acc[0]); }

template <int VEC>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const uint16_t* y_pair, int64_t yp_stride, int64_t n_rows,
                   const int32_t* pair_pos, const uint16_t* shared, int64_t sh_stride,
                   uint16_t* y, int64_t y_stride, int topk, int64_t n_chunks) {
  using V = typename Vec<VEC>::T;
  __shared__ int64_t sorted[kMaxK];
  __shared__ int n_valid;
  const int64_t t = blockIdx.x;
  if (threadIdx.x < topk) {
    // Rank of slot i among the valid positions (ties, which dispatch never produces, by slot).
    const int32_t* row = pair_pos + t * topk;
    const int i = threadIdx.x;
    const int32_t v = row[i];
    if (v >= 0 && v < n_rows) {
      int r = 0;
      for (int j = 0; j < topk; ++j) {
        const int32_t u = row[j];
        if (u >= 0 && u < n_rows && (u < v || (u == v && j < i))) ++r;
      }
      sorted[r] = v;
    }
    int cnt = 0;
    for (int j = 0; j < topk; ++j) cnt += (row[j] >= 0 && row[j] < n_rows) ? 1 : 0;
    if (i == 0) n_valid = cnt;
  }
  __syncthreads();
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (c >= n_chunks) return;
  float acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
  const int n = n_valid;
  V v[kMaxK];  // all loads first (in flight together), then the adds in order
#pragma unroll
  for (int i = 0; i < kMaxK; ++i)
    if (i < n) v[i] = *reinterpret_cast<const V*>(y_pair + sorted[i] * yp_stride + c * VEC);
#pragma unroll
  for (int i = 0; i < kMaxK; ++i)
    if (i < n) add_bf16(acc, v[i]);
  if (shared != nullptr) add_bf16(acc, *reinterpret_cast<const V*>(shared + t * sh_stride + c * VEC));
  store(reinterpret_cast<V*>(y + t * y_stride + c * VEC), acc);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

cudaError_t moe_combine(const void* y_pair, int64_t y_pair_row_stride, int64_t n_pair_rows,
                        const int32_t* pair_pos, const void* shared, int64_t shared_row_stride,
                        void* y, int64_t y_row_stride, int64_t tokens, int64_t topk,
                        int64_t dim, cudaStream_t stream) {
  if (tokens < 0 || dim < 0 || n_pair_rows < 0 || topk < 1 || topk > kMoeMaxTopk)
    return cudaErrorInvalidValue;
  if (tokens == 0 || dim == 0) return cudaSuccess;
  if (tokens > INT_MAX || pair_pos == nullptr || y == nullptr ||
      (y_pair == nullptr && n_pair_rows > 0))
    return cudaErrorInvalidValue;
  const bool vec = dim % 8 == 0 && y_pair_row_stride % 8 == 0 && y_row_stride % 8 == 0 &&
                   (shared == nullptr || (shared_row_stride % 8 == 0 && aligned16(shared))) &&
                   (y_pair == nullptr || aligned16(y_pair)) && aligned16(y);
  const int64_t n_chunks = vec ? dim / 8 : dim;
  const int64_t col_blocks = (n_chunks + kThreads - 1) / kThreads;
  if (col_blocks > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(col_blocks));
  const auto* yp = static_cast<const uint16_t*>(y_pair);
  const auto* sh = static_cast<const uint16_t*>(shared);
  auto* out = static_cast<uint16_t*>(y);
  if (vec) {
    combine_kernel<8><<<grid, kThreads, 0, stream>>>(yp, y_pair_row_stride, n_pair_rows, pair_pos,
                                                     sh, shared_row_stride, out, y_row_stride,
                                                     static_cast<int>(topk), n_chunks);
  } else {
    combine_kernel<1><<<grid, kThreads, 0, stream>>>(yp, y_pair_row_stride, n_pair_rows, pair_pos,
                                                     sh, shared_row_stride, out, y_row_stride,
                                                     static_cast<int>(topk), n_chunks);
  }
  return cudaGetLastError();
}

}  // namespace dsv4
