// dsv4 KV compressor kernel: torch-free C++ API (raw device pointers + cudaStream_t).
//
// Everything the DeepSeek-V4 compressor does after its two projections (architecture.md §4),
// for a batch of sequences that each receive a span of new tokens ("varlen", flash-attn's
// convention): gate = score + ape, per-feature softmax over the slots of each completed block,
// weighted sum of kv, cast to the entry dtype, RMSNorm (learned weight, fp32 inside), RoPE at
// the block's first position on the last rope_dim dims, the optional quantisation simulation,
// and the store of the entry; then the partial-block state is rewritten so that the next call
// (or the next decode step) continues seamlessly. The semantics are those of
// python/dsv4/layers/compressor.py Compressor.forward, applied to every row of the batch:
// the result is the same as feeding the tokens one at a time (§4.5).
//
// Notation: B rows, T new tokens in all, m = compress_ratio, d = head_dim, coff = 2 if m == 4
// (overlapping windows, §4.3) else 1 (§4.2); w = coff * d (width of kv / score / ape / state
// rows); rd = rope_dim.
//
// Row b receives the tokens kv[cu_seqlens[b] : cu_seqlens[b+1]] at positions starts[b],
// starts[b] + 1, ...; it holds (starts[b] + n_b) / m complete entries afterwards. Block k of a
// row (tokens k*m ... k*m + m - 1) is emitted into entries[b, k] by the call that receives its
// last token. A row with no new token is untouched. Per-row reset of the state (a new request
// in a batch slot) is the caller's job (architecture.md §15).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "dsv4/kv_cache.h"  // dsv4::CacheFormat
#include "dsv4/rms_norm.h"  // dsv4::DType (storage dtype of activations)

namespace dsv4 {

// What compress_kv does to each entry after RoPE (the model's quant_sim, architecture.md §4.4).
enum class CompressQuant : int32_t {
  kNone = 0,
  // FP8 e4m3 quant-dequant of the first d - rd ("nope") dims in blocks of 64 with power-of-two
  // (UE8M0) scales, round to nearest even; the RoPE dims are kept (main CSA / HCA entries).
  kFp8 = 1,
  // Normalised Walsh-Hadamard rotation of the whole d-vector (Sylvester order, scale d^-0.5,
  // result cast to the entry dtype), then FP4 e2m1 quant-dequant in blocks of 32 with UE8M0
  // scales, ties to even (the indexer's keys).
  kFp4Hadamard = 2,
};

struct CompressKVParams {
  // New tokens, fp32, grouped by row: kv = wkv(x), score = wgate(x) (before ape).
  // Element (t, c) at kv + t * kv_row_stride + c; the last dim is contiguous.
  const float* kv = nullptr;        // [T, w]
  const float* score = nullptr;     // [T, w]
  int64_t kv_row_stride = 0;        // elements, multiple of 4
  int64_t score_row_stride = 0;     // elements, multiple of 4
  int64_t num_tokens = 0;           // T
  const float* ape = nullptr;       // [m, w] fp32 contiguous: added to score of slot pos % m
  const float* norm_weight = nullptr;  // [d] fp32 contiguous (RMSNorm weight)
  const float* freqs = nullptr;     // [rd / 2] fp32 contiguous (RoPE frequency per pair)
  int rope_dim = 0;                 // rd: even, 2 <= rd <= d
  const int32_t* cu_seqlens = nullptr;  // [B + 1] token offsets of the rows (device)
  const int32_t* starts = nullptr;      // [B] position of each row's first new token (device)
  int64_t batch = 0;                // B
  // Partial-block state, fp32, contiguous [B, coff * m, w], updated in place.
  // m == 4: rows 0..3 = the previous complete block (A halves used by the next entry), rows
  // 4..7 = the partial current block. Other m: rows 0..m-1 = the partial current block. The
  // score rows hold score + ape (initialise them to -inf, kv to 0).
  float* state_kv = nullptr;
  float* state_score = nullptr;
  // Compressed entries of `entries_dtype` (kFloat32 or kBFloat16): entry j of row b at
  // entries + b * entries_batch_stride + j * entries_row_stride (elements; last dim
  // contiguous). Entries j >= capacity are not written (the caller reserves capacity).
  void* entries = nullptr;
  int64_t entries_batch_stride = 0;
  int64_t entries_row_stride = 0;
  int64_t capacity = 0;             // C
  DType entries_dtype = DType::kBFloat16;
  // Slotted state (contracts.md A.1), optional: step row b uses state row slots[b] of
  // state_kv / state_score ([num_slots, coff * m, w]); a row whose slot is outside
  // [0, num_slots) is skipped. Null: row b (then num_slots is ignored and the state has B
  // rows). Without a block table, entries row slots[b] (< entry_rows, else not written).
  const int32_t* slots = nullptr;   // [B] (device)
  int64_t num_slots = 0;
  int64_t entry_rows = 0;           // rows of the dense entries (used only with slots)
  // Paged entries (contracts.md A.1), optional: entries is a pool [num_blocks, block_size, d]
  // (entries_batch_stride = block stride, entries_row_stride = row stride; capacity unused)
  // and entry k of step row b is stored at block block_table[b * block_table_stride +
  // k / block_size], row k % block_size. Entries whose block id is < 0 or >= num_blocks, or
  // with k / block_size >= max_blocks_per_row, are not written. block_size is any size >= 1.
  const int32_t* block_table = nullptr;  // [B, max_blocks_per_row] (device)
  int64_t block_table_stride = 0;   // elements between rows of block_table
  int64_t max_blocks_per_row = 0;
  int64_t block_size = 0;
  int64_t num_blocks = 0;
  // Entry format (dsv4/kv_cache.h). kPlain: entries_dtype elements. kFp8Model1 (head_dim 512,
  // rope_dim 64, quant kNone or kFp8: the stored values are the FP8 simulation either way) and
  // kFp8Indexer (head_dim 64 / 128, quant kNone or kFp4Hadamard): `entries` is bytes, the
  // entry is computed as a bf16 entry and then packed; entries_batch_stride is the BYTE stride
  // of a block (paged) or of a row of `capacity` entries (dense; that row is laid out as one
  // block of `capacity` entries), a multiple of 16, entries 16-byte aligned;
  // entries_row_stride is unused.
  CacheFormat entries_format = CacheFormat::kPlain;
  int head_dim = 0;                 // d: multiple of 4, 4 <= d <= 1024
  int compress_ratio = 0;           // m >= 1 (4 = overlapping)
  // Max new tokens of any row (host-known). Only sizes the grid (and picks the one-launch
  // decode path when <= 4): rows with more tokens are still processed correctly, slower.
  int64_t max_seqlen = 0;
  float eps = 1e-6f;                // RMSNorm epsilon
  CompressQuant quant = CompressQuant::kNone;
};

// Runs the compressor on the stream: one kernel launch when max_seqlen <= 4 (decode, MTP),
// else two (every completed entry, then the state rewrite). No host synchronisation, no
// allocation: CUDA-graph capturable. Uses thread block clusters (sm_90+) for m >= 64 in
// decode and for prefill with few entries (at most half as many as SMs) at m >= 64.
//
// Requirements (else cudaErrorInvalidValue, nothing launched): B >= 0, T >= 0, m >= 1,
// d % 4 == 0 and 4 <= d <= 1024, rd even with 2 <= rd <= d, max_seqlen >= 0,
// kv / score / ape / state pointers 16-byte aligned and row strides multiples of 4,
// kFp8: (d - rd) % 64 == 0; kFp4Hadamard: d a power of two, d >= 32; non-null pointers when
// B > 0 and T > 0. B == 0 or T == 0 is a no-op. Outputs must not overlap the inputs.
//
// Rows whose cu_seqlens / starts are inconsistent (cu_seqlens[b] < 0, cu_seqlens[b+1] <
// cu_seqlens[b], cu_seqlens[b+1] > T, or starts[b] < 0) are skipped: their state and entries
// are left untouched (the device cannot report an error without a host sync).
//
// Numerics: every step in fp32 with IEEE exp / sqrt / division (no fast math), the casts to
// the entry dtype where the reference casts (pooled, after RMSNorm, after RoPE, after the
// Hadamard rotation and after quantisation); the softmax is an online (streaming) softmax,
// so pooled values differ from the PyTorch reference by fp32 rounding only. The state update
// is exact (copies and the fp32 addition score + ape). Entries computed by the same kernel are
// bitwise independent of how the tokens are split into calls; the decode (fused), prefill
// (per-CTA) and few-entry HCA prefill (cluster) kernels group the slots differently and may
// differ in the last fp32 bit of the pooled value (then one bf16 rounding step of an entry
// element, rarely one FP8 / FP4 step).
//
// H200 (one run, CUDA events): prefill 64K tokens 343 us (CSA d512), 123 us (HCA d512 m128),
// 116 us (indexer d128), i.e. 28-52% of 4.22 TB/s on the kv + score bytes; decode 4-13 us.
cudaError_t compress_kv(const CompressKVParams& params, cudaStream_t stream);

namespace detail {
// For tests / benchmarks. max_seqlen <= 4 always runs the fused kernel (cluster > 0 forces its
// cluster size, 1..8). Otherwise variant 1 forces the per-CTA entry kernel, variant 2 the
// persistent cluster entry kernel (cluster > 0 forces its cluster size, default 2 for m >= 64
// else 1), and variant 0 is compress_kv's own choice.
cudaError_t compress_kv_variant(const CompressKVParams& params, int variant, int cluster,
                                cudaStream_t stream);
}  // namespace detail

}  // namespace dsv4
