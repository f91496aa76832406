// dsv4 MoE routing, dispatch and combine kernels: torch-free C++ API (raw device pointers +
// cudaStream_t). Semantics (the reference): python/dsv4/ops/moe.py; architecture.md §9,
// training.md §3.2, §3.5, §3.8.
//
// gate      logits = x · Wᵀ (bf16 inputs, fp32 accumulation on tensor cores), scores
//           s = sqrt(softplus(logits)) with torch's softplus (x > 20 ? x : log1p(exp(x))),
//           selection = the `topk` largest s + bias (lowest expert index first among equal keys;
//           NaN keys rank above everything, as torch.sort does) or tid2eid[input_ids] (hash
//           layers), weights = s[selected] / Σ s[selected] · route_scale (0 when the sum is 0).
// dispatch  the P = tokens · topk (token, slot) pairs in expert-major order, stable (within an
//           expert: ascending token, then slot), with per-expert offsets (contracts.md §B).
// combine   y[t] = Σ y_pair[pos(t, slot)] over the token's valid pairs in ascending pair position
//           (= ascending expert, the reference's accumulation order), fp32, + shared[t], rounded
//           once to bf16.
//
// None of these synchronises with the host; workspace sizes depend only on the shapes, so every
// launch can be captured in a CUDA graph.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

namespace dsv4 {

// Limits of the kernels (the torch glue checks them and names them in its errors).
constexpr int64_t kMoeGateMaxExperts = 512;    // experts scored per token (16 per warp lane)
constexpr int64_t kMoeMaxTopk = 16;            // slots per token (gate and combine)
constexpr int64_t kMoeDispatchMaxExperts = 1023;  // + 1 bucket for invalid pairs = 1024

// ---------------------------------------------------------------------------------------------
// gate
// ---------------------------------------------------------------------------------------------
// Bytes of device scratch dsv4::moe_gate needs (fp32 partial logits [splits, tokens, experts])
// for these sizes on `device` (it depends on the SM count through the split-K plan).
size_t moe_gate_workspace_bytes(int64_t tokens, int64_t experts, int64_t dim, int device);

// x:          [tokens, dim] bf16, row t at x + t * x_row_stride (elements; multiple of 8;
//             x 16-byte aligned)
// weight:     [experts, dim] bf16, contiguous, 16-byte aligned
// bias:       [experts] fp32 or null (null = 0); must be null when tid2eid is given
// tid2eid:    [n_ids, topk] int32 (tid2eid_is_int64 = false) or int64, contiguous, or null
//             (learned routing)
// input_ids:  [tokens] int32 (ids_are_int64 = false) or int64; read only with tid2eid.
//             An id outside [0, n_ids) is not looked up: that token gets indices -1 and weights
//             0 (the model checks ids before the step; a kernel cannot raise). A tid2eid entry
//             outside [0, experts) likewise gives that slot index -1, weight 0.
// weights:    [tokens, topk] fp32 output, contiguous
// indices:    [tokens, topk] int32 output, contiguous
// Requires dim % 8 == 0, 1 <= experts <= kMoeGateMaxExperts, 1 <= topk <= min(experts,
// kMoeMaxTopk). Returns cudaSuccess, cudaErrorInvalidValue for bad arguments (sizes, null
// pointers, alignment, workspace too small) or the launch error. tokens == 0 is a no-op.
cudaError_t moe_gate(const void* x, int64_t x_row_stride, const void* weight, const float* bias,
                     const void* tid2eid, bool tid2eid_is_int64, int64_t n_ids,
                     const void* input_ids, bool ids_are_int64, float* weights,
                     int32_t* indices, int64_t tokens, int64_t experts, int64_t dim,
                     int64_t topk, float route_scale, void* workspace, size_t workspace_bytes,
                     cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// dispatch
// ---------------------------------------------------------------------------------------------
// Bytes of device scratch dsv4::moe_dispatch needs (0 when the pairs fit one tile).
size_t moe_dispatch_workspace_bytes(int64_t pairs, int64_t experts);

// indices:        [pairs] int32 = the [tokens, topk] selection flattened row-major
//                 (pair p = token p / topk, slot p % topk); an index outside [0, experts) marks
//                 an invalid pair
// weights:        [pairs] fp32 routing weights (same layout)
// row_ids:        [pairs] int32 output: the token of the pair at each position
// expert_offsets: [experts + 1] int32 output: the pairs of expert e are at positions
//                 [offsets[e], offsets[e + 1]); offsets[experts] = number of valid pairs;
//                 invalid pairs follow at [offsets[experts], pairs) in pair order
// route_weight:   [pairs] fp32 output: weights of the pair at each position (0 if invalid)
// pair_pos:       [pairs] int32 output: the position of pair p, or -1 if it is invalid
// Requires 1 <= experts <= kMoeDispatchMaxExperts, 1 <= topk, pairs % topk == 0,
// pairs < 2^31. pairs == 0 writes expert_offsets = 0. Deterministic (no order-dependent
// atomics). Returns cudaSuccess, cudaErrorInvalidValue or the launch error.
cudaError_t moe_dispatch(const int32_t* indices, const float* weights, int32_t* row_ids,
                         int32_t* expert_offsets, float* route_weight, int32_t* pair_pos,
                         int64_t pairs, int64_t topk, int64_t experts, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// combine
// ---------------------------------------------------------------------------------------------
// y_pair:   [n_pairs_rows, dim] bf16, row r at y_pair + r * y_pair_row_stride (any rows; only
//           rows named by pair_pos are read)
// pair_pos: [tokens, topk] int32, contiguous; a value outside [0, n_pair_rows) (-1 = no pair)
//           is skipped (never read); equal values would be summed once per slot
// shared:   [tokens, dim] bf16 (row stride shared_row_stride) or null
// y:        [tokens, dim] bf16 output, row stride y_row_stride; must not overlap the inputs
// Requires 1 <= topk <= kMoeMaxTopk. Vectorised (16 bytes) when dim, the strides and pointers
// allow it. Returns cudaSuccess, cudaErrorInvalidValue or the launch error.
cudaError_t moe_combine(const void* y_pair, int64_t y_pair_row_stride, int64_t n_pair_rows,
                        const int32_t* pair_pos, const void* shared, int64_t shared_row_stride,
                        void* y, int64_t y_row_stride, int64_t tokens, int64_t topk,
                        int64_t dim, cudaStream_t stream);

}  // namespace dsv4
