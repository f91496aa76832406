// dsv4 sparse attention with a per-head sink: torch-free C++ API (raw device pointers +
// cudaStream_t). The core attention of DeepSeek-V4's SWA / CSA / HCA layers
// (architecture.md §3.5-§3.6; FlashMLA's sparse prefill/decode contract, kernels.md §4.1).
//
// For each query token t and head h, over the key set
//     J_t = { kv[indices[t, i]]             : i < len1(t), 0 <= indices[t, i] < n_kv }
//         ∪ { extra_kv[extra_indices[t, i]] : i < len2(t), 0 <= extra_indices[t, i] < n_extra_kv }
// (one softmax over both scopes; duplicates count as often as they are listed):
//     s_hj   = softmax_scale * (q[t, h, :] . k_j)                  (k_j is also the value, MQA)
//     out    = sum_j e^{s_hj} k_j / (sum_j e^{s_hj} + e^{attn_sink[h]})
//     lse    = log sum_j e^{s_hj}                                    (valid keys only, no sink)
// len1(t) = topk_length ? clamp(topk_length[t], 0, topk) : topk (lanes past it are never read,
// whatever they hold); len2 likewise with extra_topk_length / extra_topk. An index of -1, or
// any other value outside [0, rows of its scope), is an invalid slot: never read, contributes
// nothing. A token without a valid key gets out = 0 and lse = +inf. attn_sink = +inf gives
// out = 0 (lse unchanged); -inf gives a plain softmax. The softmax runs in fp32 from a finite
// running max (no NaN from (-inf) - (-inf)); S and O accumulate in fp32 on tensor cores, the
// probabilities are rounded to bf16 for the P.V product (as FlashAttention / FlashMLA do).
//
// Kernels (csrc/kernels/sparse_attn.cuh): head_dim 512 on a compute-capability-9.0 GPU runs the
// wgmma kernel (needs the library built for sm_90a, the project default "9.0a"); every other
// case runs the mma.sync kernel (sm_80+). One CTA per (token, 64-head tile[, key split]) on
// grid.x only, so any number of tokens up to 2^31 - 1 CTAs is fine. FP8 caches: the wgmma
// kernel or the warp-specialised kernel of sparse_attn_fp8_sm90.cuh, chosen by the grid's size
// or by DSV4_SPARSE_FP8 (same grid and results; see sparse_attn_fp8_kernel_env).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

#include "dsv4/kv_cache.h"  // dsv4::CacheFormat

namespace dsv4 {

// All element strides are in elements of the pointed-to type. bf16 tensors need a unit last
// stride, a 16-byte aligned base pointer and strides that are multiples of 8 elements
// (cp.async / 16-byte vector access); int32 / fp32 tensors need only natural alignment.
struct SparseAttnParams {
  // q: [num_tokens, num_heads, head_dim] bf16; (t, h, d) at q + t*q_stride_token + h*q_stride_head + d.
  const void* q = nullptr;
  int64_t q_stride_token = 0;
  int64_t q_stride_head = 0;
  // kv: [n_kv, head_dim] bf16 (the main scope, e.g. the SWA window); row r at kv + r*kv_stride.
  const void* kv = nullptr;
  int64_t kv_stride = 0;
  int64_t n_kv = 0;
  // indices: [num_tokens, topk] int32; (t, i) at indices + t*indices_stride + i.
  const int32_t* indices = nullptr;
  int64_t indices_stride = 0;
  int64_t topk = 0;
  // topk_length: [num_tokens] int32 (contiguous) or nullptr (all topk lanes are used).
  const int32_t* topk_length = nullptr;
  // Optional second scope (the compressed store), joined into the same softmax. Absent when
  // extra_indices is nullptr.
  const void* extra_kv = nullptr;
  int64_t extra_kv_stride = 0;
  int64_t n_extra_kv = 0;
  const int32_t* extra_indices = nullptr;
  int64_t extra_indices_stride = 0;
  int64_t extra_topk = 0;
  const int32_t* extra_topk_length = nullptr;
  // HCA dense mode (no extra index list; contracts.md A.4): when extra_block_table is set,
  // extra_indices must be null and lane i < len2(t) of the extra scope is compressed entry i
  // of block-table row r = extra_rows[t], i.e. extra_kv row
  //     extra_block_table[r * extra_block_table_stride + i / extra_block_size] * extra_block_size
  //       + i % extra_block_size
  // (a block id outside [0, n_extra_kv / extra_block_size) or a column >= extra_max_blocks
  // makes the lane an invalid slot; a row r outside [0, extra_block_table_rows) sees no extra
  // key). extra_topk = the lane count (normally extra_max_blocks * extra_block_size) and
  // extra_topk_length = the per-token entry counts (len2 as above).
  const int32_t* extra_block_table = nullptr;
  int64_t extra_block_table_stride = 0;
  int64_t extra_block_table_rows = 0;
  int64_t extra_max_blocks = 0;
  int64_t extra_block_size = 0;
  const int32_t* extra_rows = nullptr;  // [num_tokens] (device)
  // FP8 caches (dsv4/kv_cache.h, kFp8Model1; head_dim 512 on sm_90a only, and then both scopes
  // are FP8): kv / extra_kv point at a pool of blocks of kv_block_size / extra_block_size
  // entries, kv_stride / extra_kv_stride = the BYTE stride of a block (a multiple of 16), and
  // row r of the scope = entry r % block_size of block r / block_size (n_kv = blocks * size).
  // The kernel dequantises each key block into bf16 in shared memory (exact).
  CacheFormat kv_format = CacheFormat::kPlain;
  int64_t kv_block_size = 0;          // FP8 only
  CacheFormat extra_kv_format = CacheFormat::kPlain;
  // attn_sink: [num_heads] fp32 (contiguous), the sink logit of each head.
  const float* attn_sink = nullptr;
  float softmax_scale = 0.f;
  // out: [num_tokens, num_heads, head_dim] bf16; lse: [num_tokens, num_heads] fp32.
  void* out = nullptr;
  int64_t out_stride_token = 0;
  int64_t out_stride_head = 0;
  float* lse = nullptr;
  int64_t lse_stride_token = 0;
  int64_t lse_stride_head = 0;
  int64_t num_tokens = 0;
  int64_t num_heads = 0;  // >= 1 (any value; heads are processed in tiles of 64)
  int64_t head_dim = 0;   // 64, 128, 256 or 512
  // Split of each token's key list over num_splits CTAs (decode with few tokens), merged by a
  // second small kernel. 1 = no split, no workspace. > 1 needs a device workspace of at least
  // sparse_attn_workspace_bytes(...) bytes (fp32 partials; no initialisation needed).
  int num_splits = 1;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// Most splits sparse_attn accepts (and sparse_attn_num_splits chooses: one 64-key block per
// split at batch 1 for up to 256 blocks, e.g. an HCA layer's 8,192 entries at 1M context).
constexpr int kSparseAttnMaxSplits = 256;

// Whether head_dim is one the kernel is compiled for (64, 128, 256, 512).
bool sparse_attn_supports_head_dim(int64_t head_dim);

// Whether FP8 (MODEL1) caches can be read on the current device: head_dim 512 on a compute
// capability 9.0 GPU (the wgmma kernel).
bool sparse_attn_supports_fp8_cache(int64_t head_dim);

// The DSV4_SPARSE_FP8 environment switch, read by sparse_attn at each call with an FP8 cache
// (so one process can time the kernels): 1 for "new" (the warp-specialised kernel of
// csrc/kernels/sparse_attn_fp8_sm90.cuh: producer warps dequantise each key block into one of
// two bf16 stages while the MMA warps run the previous block), 2 for "new2" (the same kernel
// with the whole-sector producer mapping: each 16-byte load instruction of a warp reads whole
// 32-byte sectors), 0 for "old" (the wgmma kernel that dequantises between its GEMMs),
// kSparseFp8Auto when unset, empty or "auto" (per call: "new" when the grid has more
// (token, 64-head tile) CTAs than the GPU has SMs, else "old"; the measured crossover), -1 for
// any other value (sparse_attn then returns cudaErrorInvalidValue; the torch glue reports it).
// All give bit-identical outputs (tests/ops/test_hca_attn.py, tests/ops/test_sparse_attn.py,
// dsv4_check_hca_fp8).
constexpr int kSparseFp8Auto = 3;
int sparse_attn_fp8_kernel_env();

// A split count for this shape on a GPU with num_sms SMs: > 1 only when the token x head-tile
// grid fills less than half of the SMs (decode of a few sequences). Depends on shapes only
// (never on index values), so a CUDA graph can capture it.
int sparse_attn_num_splits(int64_t num_tokens, int64_t num_heads, int64_t topk, int64_t extra_topk,
                           int num_sms);

// Workspace bytes for num_splits > 1 (0 for num_splits <= 1).
size_t sparse_attn_workspace_bytes(int64_t num_tokens, int64_t num_heads, int64_t head_dim,
                                   int num_splits);

// Launches the attention (plus the split merge when num_splits > 1) on `stream`.
// Returns cudaSuccess, cudaErrorInvalidValue for bad arguments (unsupported head_dim,
// num_heads < 1, negative sizes, null or misaligned pointers, bad strides, topk > 2^31 - 65,
// a grid over 2^31 - 1 CTAs, a missing or short workspace), or the launch error.
// num_tokens == 0 is a no-op. Does not synchronise. An error the caller left pending (an
// earlier failed runtime call on this thread) is returned when the call itself succeeds.
cudaError_t sparse_attn(const SparseAttnParams& p, cudaStream_t stream);

}  // namespace dsv4
