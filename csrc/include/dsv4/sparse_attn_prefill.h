// dsv4 sparse attention, prefill kernel for Hopper: torch-free C++ API.
//
// The same operation as dsv4::sparse_attn (include/dsv4/sparse_attn.h: two key scopes joined in
// one softmax, per-head sink, -1 / out-of-range indices and lanes past topk_length skipped,
// out = 0 and lse = +inf for a token without a valid key, lse without the sink), computed by a
// warp-specialised kernel (csrc/kernels/sparse_attn_prefill_sm90.cu) for the shapes where the
// token x head-tile grid fills the GPU (prefill, large-batch decode):
//   - head_dim 512 (the DeepSeek-V4 models), bf16 q / kv / out, any number of heads (tiles of 64);
//   - no key split (SparseAttnParams::num_splits == 1);
//   - a compute-capability-9.0 GPU with the library built for sm_90a (the project default).
// One CTA of 384 threads per (token, 64-head tile) on grid.x (or, with
// DSV4_SPARSE_PREFILL_PERSISTENT=1, at most one CTA per SM looping over those tiles): a producer
// warpgroup gathers key rows with cp.async into two double-half buffers tracked by mbarriers;
// two consumer warpgroups each own one half of the output columns and one of every two 64-key
// blocks (S = Q K^T, online softmax, P V), FlashMLA's sm90 sparse-prefill design.
#pragma once

#include <cuda_runtime.h>

#include "dsv4/sparse_attn.h"

namespace dsv4 {

// Whether sparse_attn_prefill_sm90 takes these parameters on the current device: head_dim 512,
// num_splits == 1 and a compute-capability-9.0 device. Host attribute queries only (no stream
// work; fine under CUDA-graph capture). Says nothing about the other fields:
// sparse_attn_prefill_sm90 checks them. Keys must be bf16 rows at kv + index * kv_stride: a
// future field selecting another key format (FP8 cache, paged layout) must make this false.
bool sparse_attn_prefill_sm90_takes(const SparseAttnParams& p);

// The DSV4_SPARSE_PREFILL environment switch, read at each call (so one process can time both
// kernels): 1 when unset, empty or "new" (use sparse_attn_prefill_sm90 where it applies: the
// default since it passed the CUDA suite, 0.62-0.82x the previous kernel's time on the H100), 0
// for "old" (always dsv4::sparse_attn's wgmma kernel), -1 for any other value (the caller
// reports the error).
int sparse_attn_prefill_env();

// The DSV4_SPARSE_PREFILL_PERSISTENT environment switch, read by sparse_attn_prefill_sm90 at each
// call: "1" launches the kernel as a persistent grid (at most one CTA per SM, each looping over
// (token, head tile) tiles; its producer loads the next tile's Q and first key blocks while the
// consumers finish the current one); anything else (or unset) one CTA per tile. Opt-in until the
// persistent grid has passed its first GPU run (tests/ops/test_sparse_attn_prefill.py).
bool sparse_attn_prefill_persistent_env();

// Launches the prefill kernel on `stream`. Returns cudaSuccess, cudaErrorInvalidValue for bad
// arguments (head_dim other than 512, num_splits other than 1, num_heads < 1, negative sizes,
// null or misaligned pointers, strides that are not multiples of 8 elements, topk or
// extra_topk > 2^31 - 65, a grid over 2^31 - 1 CTAs), or the launch error. num_tokens == 0 is a
// no-op. Does not synchronise. Alignment rules and strides as in SparseAttnParams. An error the
// caller left pending is returned when the call itself succeeds.
cudaError_t sparse_attn_prefill_sm90(const SparseAttnParams& p, cudaStream_t stream);

}  // namespace dsv4
