// Zeroing a kernel's workspace counters with a kernel instead of cudaMemsetAsync.
//
// Why: inside a CUDA graph a memset node is followed by a long idle stretch before the next
// kernel node starts. Measured on an H200 in a replayed decode step (bench/profile_decode.py
// --timeline, 2026-12-06): ~1.4 us of memset, then 5-8 us before the kernel that reads the
// zeroed counters, where a kernel followed by a kernel leaves ~0.4 us; a step of the 2-layer
// bench had six such memsets (mhc_pre x 4 and mhc_head decode, indexer_topk). A one-CTA
// kernel does the same work as a kernel node. Eager launches are unaffected either way.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

// Internal linkage throughout: each translation unit that includes this header gets its own
// copy of the kernel (a __global__ function defined in a header may not be shared).
namespace dsv4 {
namespace {
namespace zero_fill_detail {

// Threads of the zeroing kernel; one CTA stores up to 4 KB per pass (16-byte stores).
constexpr int kThreads = 256;
// Bytes one launch of zero_bytes_async zeroes with one CTA; above this it uses more.
constexpr size_t kBytesPerCta = 64 * 1024;

// Zero [p, p + bytes): 16-byte stores where p and bytes allow, single bytes otherwise.
__global__ void __launch_bounds__(kThreads) zero_bytes_kernel(unsigned char* p, size_t bytes) {
  const size_t stride = static_cast<size_t>(gridDim.x) * kThreads;
  const size_t first = static_cast<size_t>(blockIdx.x) * kThreads + threadIdx.x;
  if ((reinterpret_cast<uintptr_t>(p) & 15) == 0) {
    uint4* v = reinterpret_cast<uint4*>(p);
    const size_t n16 = bytes / 16;
    for (size_t i = first; i < n16; i += stride) v[i] = make_uint4(0, 0, 0, 0);
    for (size_t i = n16 * 16 + first; i < bytes; i += stride) p[i] = 0;
  } else {
    for (size_t i = first; i < bytes; i += stride) p[i] = 0;
  }
}

}  // namespace zero_fill_detail

// cudaMemsetAsync(p, 0, bytes, stream) as a kernel launch (see above). bytes == 0: nothing.
cudaError_t zero_bytes_async(void* p, size_t bytes, cudaStream_t stream) {
  using namespace zero_fill_detail;
  if (bytes == 0) return cudaSuccess;
  if (p == nullptr) return cudaErrorInvalidValue;
  size_t ctas = (bytes + kBytesPerCta - 1) / kBytesPerCta;
  if (ctas > 1024) ctas = 1024;
  zero_bytes_kernel<<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(
      static_cast<unsigned char*>(p), bytes);
  return cudaGetLastError();
}

}  // namespace
}  // namespace dsv4
