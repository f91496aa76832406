// dsv4 mHC (manifold-constrained hyper-connections) kernels: torch-free C++ API.
// Semantics (the reference): python/dsv4/layers/mhc.py (hc_pre, hc_post, hc_head);
// architecture.md §8, training.md §1.4 (test vectors §7.1-7.2). hc_mult = 4 streams.
//
// pre   x [tokens, 4, dim] bf16 → mixes = (fn · x̂) · rsqrt(mean(x̂²) + norm_eps) (x̂ = the token's
//       4·dim values in fp32; fn [24, 4·dim] fp32), pre = sigmoid(scale0·m + base) + eps,
//       post = 2·sigmoid(scale1·m + base), comb = Sinkhorn(scale2·m + base) with `iters` column
//       normalisations, u = Σ_i pre_i x_i → bf16.
// post  out[t, k] = post[t, k] · f[t] + Σ_j comb[t, j, k] · x[t, j] (combᵀ applied) → bf16.
// head  pre = sigmoid(scale·m + base) + eps with fn [4, 4·dim]; y = Σ_i pre_i x_i → bf16.
//
// The projection runs on tensor cores (mma.sync bf16, fp32 accumulation) with fn split into
// three bf16 terms (hi + mid + lo carry fn's 24 mantissa bits), so its products are those of
// an fp32 GEMM; the epilogue uses explicitly rounded multiplies and adds in the reference's
// order of operations. No host synchronisation; the workspace depends only on the shapes.
// Decode (tokens <= kMhcPreDecodeTokens / kMhcHeadDecodeTokens, below) runs the projection as a
// split GEMV on CUDA cores (fp32 FMAs; the product of a bf16 x value and an fp32 fn value is
// exact), one launch whose last-arriving CTA per token group finishes that group.
// Up to 64 tokens above that, and above 64 when DSV4_MHC_ONE_PASS=0 (read at each call) or the
// dim is not 1024 / 2048 / 4096, the chunked path runs the projection, then re-reads x from L2
// for the collapse, per chunk of 512 tokens. By default prefill above 64 tokens at dim 1024,
// 2048 or 4096 runs ONE launch that reads x once: a cluster of 16 CTAs keeps a tile's x slices
// in shared memory and reduces the projection through distributed shared memory (sm_90
// clusters); a device where such a cluster cannot run keeps the chunked path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

namespace dsv4 {

constexpr int64_t kMhcStreams = 4;         // hc_mult supported by the kernels
constexpr int64_t kMhcMaxFusedTokens = 8;  // DSV4_MHC_DECODE=old: up to this many, one launch
// The decode kernel (one launch after zeroing its arrival counters) serves mhc_pre up to
// kMhcPreDecodeTokens and mhc_head up to kMhcHeadDecodeTokens tokens, where it measured fastest
// (H100, 2026-12-06: above them the chunked two-phase path wins up to 64 tokens). Above
// kMhcDecodeMaxTokens the one-pass prefill kernel runs. DSV4_MHC_DECODE (read at each call, so a
// CUDA graph keeps the path it was captured with): unset = this rule; "all" = the decode kernel
// up to kMhcDecodeMaxTokens for both ops; "old" = never (the fused mix kernel up to
// kMhcMaxFusedTokens, then the chunked path).
constexpr int64_t kMhcPreDecodeTokens = 16;
constexpr int64_t kMhcHeadDecodeTokens = 8;
constexpr int64_t kMhcDecodeMaxTokens = 64;

// Bytes of device scratch dsv4::mhc_pre / dsv4::mhc_head need for these sizes on `device`.
size_t mhc_pre_workspace_bytes(int64_t tokens, int64_t dim, int device);

// Byte offset in the workspace of the decode kernel's phase stamps (16 x u64, written by v2 when
// DSV4_MHC_DECODE_STAMPS=1; for check_mhc), for these sizes (0 when tokens or dim <= 0).
size_t mhc_decode_stamp_offset(int64_t tokens, int64_t dim);

// Clusters of 16 CTAs the one-pass prefill kernel of mhc_pre (head = false) or mhc_head
// (head = true) runs with for this dim on the current device (unless DSV4_MHC_ONE_PASS=0): 0 when
// it cannot run (dim not 1024 / 2048 / 4096, or no such cluster fits the device), and 0 without
// caching it when the device query failed or an error was pending (asked again at the next
// call). Diagnostics and tests.
int mhc_prefill_clusters(int64_t dim, bool head);

// x:      [tokens, 4, dim] bf16; token t at x + t * x_token_stride, its 4 streams contiguous
//         (stream stride dim); x_token_stride a multiple of 8 elements, x 16-byte aligned
// fn:     [24, 4·dim] fp32 contiguous, 16-byte aligned; scale [3] fp32; base [24] fp32
// u:      [tokens, dim] bf16 output, row stride u_stride (multiple of 8; 16-byte aligned)
// post:   [tokens, 4] fp32 output (contiguous); comb: [tokens, 4, 4] fp32 output (contiguous,
//         comb[t, j, k] row-major)
// workspace: at least mhc_pre_workspace_bytes(tokens, dim, device) bytes, 16-byte aligned (the
//         kernels read and write it as float4)
// Requires dim % 8 == 0, iters >= 1. Returns cudaSuccess, cudaErrorInvalidValue (bad sizes,
// null pointers, alignment of x / u / fn / workspace, workspace too small) or the launch
// error. tokens == 0: no-op.
cudaError_t mhc_pre(const void* x, int64_t x_token_stride, const float* fn, const float* scale,
                    const float* base, float norm_eps, int iters, float eps, void* u,
                    int64_t u_stride, float* post, float* comb, int64_t tokens, int64_t dim,
                    void* workspace, size_t workspace_bytes, cudaStream_t stream);

// The final collapse: fn [4, 4·dim] fp32, scale [1], base [4]; y [tokens, dim] bf16 (row stride
// y_stride). Same layout rules and workspace as mhc_pre.
cudaError_t mhc_head(const void* x, int64_t x_token_stride, const float* fn, const float* scale,
                     const float* base, float norm_eps, float eps, void* y, int64_t y_stride,
                     int64_t tokens, int64_t dim, void* workspace, size_t workspace_bytes,
                     cudaStream_t stream);

// f:        [tokens, dim] bf16, row stride f_stride
// residual: [tokens, 4, dim] bf16, token stride res_token_stride (streams contiguous)
// post:     [tokens, 4] fp32 contiguous; comb: [tokens, 4, 4] fp32 contiguous
// out:      [tokens, 4, dim] bf16, token stride out_token_stride (streams contiguous); must not
//           overlap the inputs
// One launch; 16-byte vectors when dim, strides and pointers allow, scalar code otherwise.
// Returns cudaSuccess, cudaErrorInvalidValue or the launch error.
cudaError_t mhc_post(const void* f, int64_t f_stride, const void* residual,
                     int64_t res_token_stride, const float* post, const float* comb, void* out,
                     int64_t out_token_stride, int64_t tokens, int64_t dim, cudaStream_t stream);

}  // namespace dsv4
