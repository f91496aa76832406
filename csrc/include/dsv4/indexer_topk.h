// dsv4 Lightning Indexer scoring + causal top-k (CSA layers): torch-free C++ API.
//
// For each query t (architecture.md §5, steps 6-7):
//
//   I(t, s) = sum_h weights[t, h] * ReLU(q[t, h, :] . keys[rows[t], s, :])     s < n_valid[t]
//
// with bf16 q/keys (products exact in fp32), fp32 weights, fp32 accumulation (mma.sync
// m16n8k16 on tensor cores), and the indices of the `topk` highest scores returned:
//
//   - indices[t, :] lists the selected entries in descending score order; equal scores are
//     ordered by the LOWEST entry index first (the order is a total order on (score, index),
//     so the result does not depend on thread timing: kernels.md §5 #2). -0.0 equals +0.0.
//   - NaN scores rank below -inf and are never returned; -inf scores are ordinary values.
//   - with m = min(topk, number of non-NaN visible entries), slots [0, m) hold entries and
//     slots [m, topk) hold -1.
//   - n_valid[t] is clamped to [0, capacity]. A row index outside [0, batch) is treated as a
//     query that sees no entries (all -1; no memory is read for it): a kernel cannot raise,
//     the PyTorch reference raises ValueError instead.
//
// The score matrix is never materialised: each CTA streams key tiles (256 keys in decode, 128
// in prefill) of one row through shared memory (cp.async pipeline), scores them on tensor cores
// (mma.sync m16n8k16) for up to 8 queries of that
// row (queries in registers), and keeps a per-query candidate buffer in shared memory that an
// exact radix select (64-bit keys: ordered score bits << 32 | ~index) cuts back to `topk`
// whenever it fills. When there are few query groups (decode), each query's key range is split
// over CTAs (at least 128 keys per split, so that short rows use several CTAs too);
// each CTA writes its <= `topk` candidates to `workspace`, and the last CTA to finish
// (an atomic arrival counter, zeroed by a one-CTA kernel in the launch) merges them with the
// same select, through a two-level tree when there are many splits ("tree" merge). When a
// decode query's keys are split over more than 16 CTAs (on 132 SMs: batch <= 7 with a capacity
// above 16 x 128 entries) the default is the "histogram" select instead: the scan writes every
// entry's 32-bit score key and a histogram of their top 12 bits; a second launch (a programmatic
// dependent launch unless DSV4_INDEXER_TOPK_PDL=0) finds the bin holding the topk-th key, gathers
// the keys above it and in it (parallel over the same CTAs), and its last CTA selects exactly among
// them with the same select (falling back to a scan of all the query's keys when that bin holds
// more than 8192 keys). Same result, same order. No host synchronisation; the workspace size
// depends only on the shapes, the device and the merge mode (CUDA-graph capturable).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

#include "dsv4/kv_cache.h"  // dsv4::CacheFormat

namespace dsv4 {

// Where the keys are (the general form; the positional overload below is the dense bf16 case).
//   format kPlain: bf16 keys; key (blk, e) at data + blk*stride_block + e*stride_entry
//     (elements; strides multiples of 8, data 16-byte aligned).
//   format kFp8Indexer (dsv4/kv_cache.h): blocks of e4m3 rows then fp32 scales; block blk at
//     byte offset blk*stride_block (a multiple of 16; data 16-byte aligned); stride_entry
//     unused. Dense FP8 stores have one block of `capacity` keys per row.
//   block_table null (dense): `rows` key rows of `capacity` keys; key s of row b = (b, s).
//   block_table (paged, contracts.md A.2): `rows` block-table rows of max_blocks columns;
//     key s of row b = (block_table[b*block_table_stride + s/block_size], s % block_size);
//     a block id outside [0, num_blocks) hides the key (never selected, not read); the
//     logical capacity of a row is max_blocks * block_size. block_size is any size >= 1.
struct IndexerKeys {
  const void* data = nullptr;
  int64_t stride_block = 0;
  int64_t stride_entry = 0;
  CacheFormat format = CacheFormat::kPlain;
  int64_t rows = 0;
  int64_t capacity = 0;                  // dense only
  const int32_t* block_table = nullptr;  // paged only (device)
  int64_t block_table_stride = 0;
  int64_t max_blocks = 0;
  int64_t block_size = 0;
  int64_t num_blocks = 0;
};

// Largest `topk` the kernel accepts.
constexpr int64_t kIndexerMaxTopk = 2048;

// Bytes of scratch memory dsv4::indexer_topk needs for these shapes on CUDA device `device`
// (0 when no split of the key range is needed, e.g. prefill). Arguments as in indexer_topk.
// Returns 0 as well for arguments indexer_topk would reject.
size_t indexer_topk_workspace_bytes(int64_t tokens, int64_t batch, int64_t capacity,
                                    int64_t heads, int64_t head_dim, int64_t topk, int device,
                                    bool fp8_keys = false);
size_t indexer_topk_workspace_bytes(int64_t tokens, const IndexerKeys& keys, int64_t heads,
                                    int64_t head_dim, int64_t topk, int device);

// q:        [tokens, heads, head_dim] bf16; element (t, h, d) at q + t*q_stride_t +
//           h*q_stride_h + d (strides in elements, even; q 4-byte aligned)
// weights:  [tokens, heads] fp32; element (t, h) at weights + t*w_stride_t + h
// keys:     [batch, capacity, head_dim] bf16; element (b, s, d) at keys + b*k_stride_b +
//           s*k_stride_c + d (strides multiples of 8 elements, keys 16-byte aligned)
// rows:     [tokens] int32, the key row b of each query
// n_valid:  [tokens] int32, query t sees entries 0 .. n_valid[t]-1 of its row (clamped)
// indices:  [tokens, topk] int32 output; row t at indices + t*idx_stride_t (unit last stride)
// head_dim: 64 or 128; heads >= 1 (any; 64 per MMA pass); 1 <= topk <= kIndexerMaxTopk.
// workspace: device memory of at least indexer_topk_workspace_bytes(...) bytes for the
//           current device (may be null when that is 0). Contents need not be initialised.
// Returns cudaSuccess, cudaErrorInvalidValue for bad arguments (sizes, head_dim, topk, null
// pointers, alignment, workspace too small), or the launch error. Does not synchronise.
// tokens == 0 is a no-op.
cudaError_t indexer_topk(const void* q, int64_t q_stride_t, int64_t q_stride_h,
                         const float* weights, int64_t w_stride_t, const void* keys,
                         int64_t k_stride_b, int64_t k_stride_c, const int32_t* rows,
                         const int32_t* n_valid, int32_t* indices, int64_t idx_stride_t,
                         int64_t tokens, int64_t heads, int64_t head_dim, int64_t batch,
                         int64_t capacity, int64_t topk, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream);

// The general form: keys described by `keys` (dense or paged, bf16 or FP8; see IndexerKeys).
// FP8 keys are converted to bf16 in shared memory (exact) and each key's score is multiplied
// by its power-of-two scale (exactly the score of the dequantised key, up to summation order).
// Returned indices are LOGICAL entry indices s in every case.
cudaError_t indexer_topk(const void* q, int64_t q_stride_t, int64_t q_stride_h,
                         const float* weights, int64_t w_stride_t, const IndexerKeys& keys,
                         const int32_t* rows, const int32_t* n_valid, int32_t* indices,
                         int64_t idx_stride_t, int64_t tokens, int64_t heads, int64_t head_dim,
                         int64_t topk, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream);

// Benchmarking aid (not an op): the same key scan and scoring as indexer_topk with the same
// launch plan, but no selection and no merge; score_sum[t] += the sum of query t's visible
// scores (score_sum must be zeroed by the caller). head_dim 128 only. Gives the "scan alone"
// time that the fused top-k is compared with.
cudaError_t indexer_topk_scan_only(const void* q, int64_t q_stride_t, int64_t q_stride_h,
                                   const float* weights, int64_t w_stride_t, const void* keys,
                                   int64_t k_stride_b, int64_t k_stride_c, const int32_t* rows,
                                   const int32_t* n_valid, float* score_sum, int64_t tokens,
                                   int64_t heads, int64_t head_dim, int64_t batch,
                                   int64_t capacity, int64_t topk, cudaStream_t stream);

// Tuning aid for benchmarks (not thread-safe; affects later launches in this process): the
// decode tile (keys per pipeline stage when each CTA serves one query: 128 or 256; 0 = default
// 256, head_dim 128 only) and the pipeline depth (2..4; 0 = default). Settings that do not fit
// in shared memory fall back to fewer stages. Call indexer_topk_workspace_bytes after changing.
void indexer_topk_set_tuning(int decode_tile_keys, int stages);

// Selects how split key ranges are merged (not thread-safe; affects later launches and
// workspace sizes in this process): 0 auto (histogram select when a decode query's keys span
// more than 16 splits, else the tree), 1 the candidate-list tree always, 2 the histogram select
// for every decode plan with splits, 3 "legacy": auto with the previous decode split size (a
// split of a decode query scores at least max(1024, 2 topk) keys instead of 128 keys, so a
// short row is scored by a single CTA) and the previous decode selection tail (in the radix
// histogram one shared atomic per lane unless the whole warp hits one bin, a CTA barrier
// after every bitonic step), 4 "coop": the plans of mode 2, with the scan grid launched
// cooperatively where all of its CTAs can be resident at once (decode, batch <= 7 at 1M on 132
// SMs), finishing the histogram select inside it (two grid barriers, then every CTA ranks a slice
// of the candidates by counting) instead of a second launch; mode 2's two launches where the
// grid cannot be co-resident or the device refuses the launch. -1
// (default) the environment variable
// DSV4_INDEXER_TOPK_MERGE read at each call: "tree", "hist", "legacy", "coop", anything else /
// unset = auto. Every mode returns the same indices (the contract above); this exists for tests and
// benches.
void indexer_topk_set_merge(int mode);

// Test aid for merge mode 4 ("coop"): how many calls in this process so far launched the scan
// grid cooperatively (launched), and how many took the two-launch path instead (declined: the
// grid cannot be co-resident, a query or the launch was refused, or the caller had an error
// pending). Either pointer may be null.
void indexer_topk_coop_counts(long long* launched, long long* declined);

// Short-row decode path: for decode plans (one query per CTA) with at most 16 queries, at most
// 128 heads and a logical capacity C of at most 16 x 1024 entries (8 x 1024 when 16-CTA
// clusters cannot all be resident), on sm_90+, in the default (auto) merge mode, indexer_topk
// runs one thread-block cluster of cs = min(16, ceil(C / 128)) CTAs per query instead of the
// split / merge path: the CTAs score n_valid / cs keys each, select the topk-th score exactly
// with one radix select through distributed shared memory and write the indices (ranked by
// counting), in one launch without workspace use or global atomics. Same indices as every
// other path. DSV4_INDEXER_TOPK_SHORT=0 (read at each call) turns it off.
// This aid returns the cluster size indexer_topk would use for these arguments on the current
// device now, or 0 when the call takes the split / merge path (tests and benches).
int indexer_topk_short_cluster(int64_t tokens, const IndexerKeys& keys, int64_t heads,
                               int64_t head_dim, int64_t topk);

// Decode scan on wgmma (sm_90a warpgroup MMA; q in shared memory, 64 keys per MMA chain):
// the default (DSV4_INDEXER_WGMMA=0, read at each call, turns it off) for split / merge decode
// plans (one query per CTA) with head_dim 128, the default 256-key decode tile and at most 128
// heads, on sm_90; everything else (prefill plans, the short path, other shapes) runs as
// before. Same contract and indices (scores differ only by fp32 summation order). This aid
// returns whether indexer_topk would run the wgmma scan for these arguments now (tests and
// benches).
bool indexer_topk_uses_wgmma(int64_t tokens, const IndexerKeys& keys, int64_t heads,
                             int64_t head_dim, int64_t topk);

}  // namespace dsv4
