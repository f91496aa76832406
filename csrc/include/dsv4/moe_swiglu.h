// dsv4 clamped SwiGLU of the routed experts over grouped-GEMM outputs: torch-free C++ API.
// Semantics (the reference): python/dsv4/layers/moe.py swiglu_clamped (architecture.md §9).
//
//   h[p, j] = bf16( (silu(min(g, L)) · clamp(u, -L, L)) · weight[p] ),  g = gu[p, j],
//   u = gu[p, N + j], silu(v) = v / (1 + exp(-v)), every operation in fp32 and rounded as the
//   reference rounds it (no FMA contraction; NaN propagates through the clamps); L = 0: no clamp.
//
// For the MoE's prefill path that runs the expert GEMMs as torch._grouped_mm calls (bf16 [w1; w3]
// outputs, as F.linear rounds them), in one pass instead of the reference's six.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace dsv4 {

// gu:     [pairs, 2 * n] bf16, row p at gu + p * gu_stride (gu_stride >= 2 * n), any
//         alignment (16-byte vectors when n, gu_stride and h_stride are multiples of 8 and gu,
//         h are 16-byte aligned; else a scalar path)
// weight: [pairs] fp32 (the routing weight of each pair), contiguous
// h:      [pairs, n] bf16 output, row stride h_stride (>= n)
// Returns cudaSuccess, cudaErrorInvalidValue (bad sizes or null pointers) or the launch error.
// pairs == 0 or n == 0: no-op.
cudaError_t moe_swiglu(const void* gu, int64_t gu_stride, const float* weight, void* h,
                       int64_t h_stride, int64_t pairs, int64_t n, float limit,
                       cudaStream_t stream);

}  // namespace dsv4
