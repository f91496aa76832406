// dsv4 flat rows of logical compressed entries through block tables (the CSA layers' indexer
// picks -> the rows sparse_attn reads): torch-free C++ API. Semantics (the reference):
// python/dsv4/ops/kv_cache.py paged_rows, in int32:
//
//   out[t, k] = table[rows[t], s / bs] * bs + s % bs    with s = sel[t, k], bs = block_size,
//   out[t, k] = -1 where s < 0, s / bs >= max_blocks, the block id is < 0, or rows[t] is not
//               a row of the table.
//
// One launch where its PyTorch form (block_starts + paged_rows_from) runs about fifteen small
// kernels per CSA layer of a decode step.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace dsv4 {

// table: int32 [num_rows, max_blocks], row r at table + r * table_stride (>= max_blocks)
// rows:  int32 [tokens] (the table row of each token)
// sel:   int32 [tokens, k], row t at sel + t * sel_stride (>= k)
// out:   int32 [tokens, k] contiguous
// block_size >= 1; block ids must satisfy id * block_size + block_size - 1 <= INT32_MAX (the
// store's rows fit int32, as the kernels that read them require). A selected row past INT32_MAX
// (outside that contract) comes out as -1 (no entry), never as a wrapped row; the reference
// raises ValueError for it instead.
// Returns cudaSuccess, cudaErrorInvalidValue (bad sizes / null pointers) or the launch error.
// tokens == 0 or k == 0: no-op.
cudaError_t paged_rows(const int32_t* table, int64_t num_rows, int64_t max_blocks,
                       int64_t table_stride, const int32_t* rows, const int32_t* sel,
                       int64_t sel_stride, int32_t* out, int64_t tokens, int64_t k,
                       int64_t block_size, cudaStream_t stream);

}  // namespace dsv4
