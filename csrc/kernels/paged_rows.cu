// dsv4 flat rows of logical entries through block tables. Contract: include/dsv4/paged_rows.h.
// One thread per (token, pick): a table lookup and two integer operations.
#include "dsv4/paged_rows.h"

#include <climits>
#include <cstdint>

namespace dsv4 {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    paged_rows_kernel(const int32_t* __restrict__ table, int64_t num_rows, int64_t max_blocks,
                      int64_t table_stride, const int32_t* __restrict__ rows,
                      const int32_t* __restrict__ sel, int64_t sel_stride,
                      int32_t* __restrict__ out, int64_t tokens, int64_t k, int32_t bs) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= tokens * k) return;
  const int64_t t = e / k, j = e - t * k;
  const int32_t s = sel[t * sel_stride + j];
  const int32_t r = rows[t];
  int32_t v = -1;
  if (s >= 0 && r >= 0 && r < num_rows && s / bs < max_blocks) {
    const int32_t id = table[r * table_stride + s / bs];
    // In int64: a row past int32 (outside the contract) gives -1, never a wrapped valid row.
    const int64_t flat = static_cast<int64_t>(id) * bs + s % bs;
    if (id >= 0 && flat <= INT_MAX) v = static_cast<int32_t>(flat);
  }
  out[e] = v;
}

}  // namespace

cudaError_t paged_rows(const int32_t* table, int64_t num_rows, int64_t max_blocks,
                       int64_t table_stride, const int32_t* rows, const int32_t* sel,
                       int64_t sel_stride, int32_t* out, int64_t tokens, int64_t k,
                       int64_t block_size, cudaStream_t stream) {
  if (tokens < 0 || k < 0 || num_rows < 0 || max_blocks < 0 || block_size < 1 ||
      block_size > INT_MAX || table_stride < max_blocks || sel_stride < k)
    return cudaErrorInvalidValue;
  if (tokens == 0 || k == 0) return cudaSuccess;
  if (rows == nullptr || sel == nullptr || out == nullptr ||
      (table == nullptr && num_rows * max_blocks > 0))
    return cudaErrorInvalidValue;
  const int64_t n = tokens * k;
  const int64_t ctas = (n + kThreads - 1) / kThreads;
  if (ctas > INT_MAX) return cudaErrorInvalidValue;
  paged_rows_kernel<<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(
      table, num_rows, max_blocks, table_stride, rows, sel, sel_stride, out, tokens, k,
      static_cast<int32_t>(block_size));
  return cudaGetLastError();
}

}  // namespace dsv4
