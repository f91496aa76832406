// dsv4 argmax + finiteness of each row (the greedy draw). Contract: include/dsv4/argmax_finite.h.
// One thread-block cluster of kSlices CTAs per row, each CTA a contiguous slice of it: each
// thread scans its elements in increasing index order (16-byte loads, kUnroll in flight, when
// the row allows), keeping the first maximum it meets (the first NaN once it meets one) and
// whether all were finite; the CTA, then the cluster's first CTA over its peers' results
// (distributed shared memory), keep of two candidates the NaN, else the larger value, else the
// lower index: torch.argmax's order (first index of the maximum, NaN above every number). A
// row of 129,280 logits (a decode step's vocabulary) is 517 KB, read from L2 where the LM head
// just wrote it; one SM alone would stream it at ~0.1 TB/s (~5 us), the cluster in ~1 us.
#include "dsv4/argmax_finite.h"

#include <cooperative_groups.h>

#include <cstdint>

namespace dsv4 {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kSlices = 8;   // CTAs per row (one cluster)
constexpr int kUnroll = 4;   // 16-byte loads in flight per thread

struct Best {
  float v;
  int64_t i;  // -1 / n: no element yet
};

// Whether candidate a ranks before b (both from disjoint index sets; i >= n: none).
__device__ __forceinline__ bool before(const Best& a, const Best& b, int64_t n) {
  if (a.i >= n) return false;
  if (b.i >= n) return true;
  const bool an = a.v != a.v, bn = b.v != b.v;
  if (an != bn) return an;                      // NaN first
  if (!an && a.v != b.v) return a.v > b.v;      // then the larger value
  return a.i < b.i;                             // then the lower index
}

// One element at index i, met after every element of this thread with a lower index.
__device__ __forceinline__ void take(Best& b, float v, int64_t i, bool& finite) {
  finite &= (v - v) == 0.f;                     // false for NaN and +-inf
  if (b.v != b.v) return;                       // the thread's first NaN stays
  if (b.i < 0 || v != v || v > b.v) {           // first element, first NaN or a new maximum
    b.v = v;
    b.i = i;
  }
}

// The CTA's best of its threads' candidates and the AND of their flags (result in thread 0).
__device__ __forceinline__ void cta_reduce(Best& b, bool& finite, int64_t n, float* sv,
                                           int64_t* si, int* sf) {
  for (int off = 16; off > 0; off >>= 1) {
    Best o{__shfl_xor_sync(0xffffffffu, b.v, off), __shfl_xor_sync(0xffffffffu, b.i, off)};
    if (before(o, b, n)) b = o;
  }
  finite = __all_sync(0xffffffffu, finite);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sv[warp] = b.v;
    si[warp] = b.i;
    sf[warp] = finite ? 1 : 0;
  }
  __syncthreads();
  if (warp == 0) {
    b = lane < kWarps ? Best{sv[lane], si[lane]} : Best{0.f, n};
    int f = lane < kWarps ? sf[lane] : 1;
    for (int off = 16; off > 0; off >>= 1) {
      Best o{__shfl_xor_sync(0xffffffffu, b.v, off), __shfl_xor_sync(0xffffffffu, b.i, off)};
      if (before(o, b, n)) b = o;
      f &= __shfl_xor_sync(0xffffffffu, f, off);
    }
    finite = f != 0;
  }
}

// grid (kSlices, rows), cluster (kSlices, 1, 1): CTA c of row r scans [c·chunk, (c+1)·chunk).
__global__ void __cluster_dims__(kSlices, 1, 1) __launch_bounds__(kThreads)
    argmax_finite_kernel(const float* __restrict__ x, int64_t n, int64_t row_stride,
                         int64_t* __restrict__ ids, int64_t* __restrict__ finite_out) {
  namespace cg = cooperative_groups;
  __shared__ float sv[kWarps];
  __shared__ int64_t si[kWarps];
  __shared__ int sf[kWarps];
  __shared__ Best cta_best;
  __shared__ int cta_finite;
  const int64_t r = blockIdx.y;
  const float* row = x + r * row_stride;
  const bool vec = (reinterpret_cast<uintptr_t>(row) & 15) == 0;
  // slices of a multiple of 4 elements (16-byte aligned starts on the vector path)
  const int64_t chunk = ((n + kSlices - 1) / kSlices + 3) / 4 * 4;
  const int64_t lo = blockIdx.x * chunk, hi = lo + chunk < n ? lo + chunk : n;
  Best b{0.f, -1};
  bool finite = true;
  if (vec && lo < hi) {
    const float4* v4 = reinterpret_cast<const float4*>(row + lo);
    const int64_t n4 = (hi - lo) / 4;
    int64_t k = threadIdx.x;
    for (; k + (kUnroll - 1) * kThreads < n4; k += kUnroll * kThreads) {
      float4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = __ldg(v4 + k + u * kThreads);
      // (thread order: its vectors k, k + kThreads, ...: increasing indices)
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = lo + 4 * (k + u * kThreads);
        take(b, v[u].x, i, finite);
        take(b, v[u].y, i + 1, finite);
        take(b, v[u].z, i + 2, finite);
        take(b, v[u].w, i + 3, finite);
      }
    }
    for (; k < n4; k += kThreads) {
      const float4 v = __ldg(v4 + k);
      const int64_t i = lo + 4 * k;
      take(b, v.x, i, finite);
      take(b, v.y, i + 1, finite);
      take(b, v.z, i + 2, finite);
      take(b, v.w, i + 3, finite);
    }
    for (int64_t j = lo + 4 * n4 + threadIdx.x; j < hi; j += kThreads)
      take(b, __ldg(row + j), j, finite);
  } else {
    for (int64_t j = lo + threadIdx.x; j < hi; j += kThreads) take(b, __ldg(row + j), j, finite);
  }
  if (b.i < 0) b.i = n;
  cta_reduce(b, finite, n, sv, si, sf);
  if (threadIdx.x == 0) {
    cta_best = b;
    cta_finite = finite ? 1 : 0;
  }
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();                               // every CTA's result in its shared memory
  if (blockIdx.x == 0 && threadIdx.x < 32) {
    const int lane = threadIdx.x;
    Best c{0.f, n};
    int f = 1;
    if (lane < kSlices) {
      const Best* peer = cluster.map_shared_rank(&cta_best, lane);
      c = *peer;
      f = *cluster.map_shared_rank(&cta_finite, lane);
    }
    for (int off = 16; off > 0; off >>= 1) {
      Best o{__shfl_xor_sync(0xffffffffu, c.v, off), __shfl_xor_sync(0xffffffffu, c.i, off)};
      if (before(o, c, n)) c = o;
      f &= __shfl_xor_sync(0xffffffffu, f, off);
    }
    if (lane == 0) {
      ids[r] = c.i;
      finite_out[r] = f;
    }
  }
  cluster.sync();                               // peers' shared memory read: then exit
}

}  // namespace

cudaError_t argmax_finite(const float* x, int64_t rows, int64_t n, int64_t row_stride,
                          int64_t* out, cudaStream_t stream) {
  if (rows < 0 || n < 1 || row_stride < n || rows > 0x7fffffffLL) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (x == nullptr || out == nullptr) return cudaErrorInvalidValue;
  constexpr int64_t kMaxGridY = 65535;
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxGridY) {
    const int64_t m = rows - r0 < kMaxGridY ? rows - r0 : kMaxGridY;
    argmax_finite_kernel<<<dim3(kSlices, static_cast<unsigned>(m)), kThreads, 0, stream>>>(
        x + r0 * row_stride, n, row_stride, out + r0, out + rows + r0);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace dsv4
