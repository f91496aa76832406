// dsv4 fused query / key-value paths of the attention block (torch-free C++ API).
//
// q path (architecture.md §3.2; also the indexer query path of §5): for every row (token t,
// head h) of x [T, H, D] bf16
//     y = norm ? x * rsqrt(mean(x^2) + eps) : x              (weight-free RMSNorm, fp32, -> bf16)
//     y = RoPE(y, positions[t]) on the last rope_dim dims     (interleaved pairs, fp32, -> bf16)
//     quant 1: y[:D-rd] = FP8 e4m3 round trip in blocks of 64  (ops.quant.fp8_e4m3_sim)
//     quant 2: y = FP4 e2m1 round trip in blocks of 32 of hadamard(y)  (the indexer query)
// kv path (§3.3): for every token t of x [T, D] bf16 (wkv output)
//     y = weight * (x * rsqrt(mean(x^2) + eps))  (kv_norm, fp32 weight, -> bf16)
//     y = RoPE(y, positions[t]); quant 1: FP8 round trip of the nope dims (quant_sim)
//     out[t] = y; and for each of up to two caches with rows[t] in range: cache row rows[t] = y
//     (a bf16 pool, or an FP8 MODEL1 pool that stores exactly the FP8 simulation of y,
//     dsv4/kv_cache.h). One warp per row, one pass, no intermediate in global memory.
//
// Numerics follow the references (python/dsv4/ops/qkv_rope.py: ops.norm.rms_norm_reference,
// layers.rope.apply_rope, ops.quant): fp32 math with the same casts to bf16, IEEE sqrt /
// division, sincosf, a complex product without FMA contraction. The sum of squares is reduced
// in another order than PyTorch's, so an element may differ by one bf16 rounding step (and
// then, with quantisation, by one FP8 / FP4 step) where the fp32 result lands on a tie.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "dsv4/kv_cache.h"

namespace dsv4 {

// A destination of the kv path: row r of a bf16 pool (element (r / block_size, r % block_size,
// c) at data + (r / block_size) * block_stride + (r % block_size) * row_stride + c, elements)
// or of an FP8 MODEL1 pool (block_stride in bytes, a multiple of 16). rows[t] outside
// [0, num_rows) is not written.
struct KvCacheDst {
  void* data = nullptr;
  CacheFormat format = CacheFormat::kPlain;
  int64_t block_stride = 0;
  int64_t row_stride = 0;      // plain only
  int64_t block_size = 1;
  int64_t num_rows = 0;        // blocks * block_size
  const int32_t* rows = nullptr;  // [T] (device)
};

struct QkvRopeParams {
  const void* x = nullptr;       // bf16: q [T, H, D] (strides below) or kv [T, D]
  int64_t x_stride_t = 0, x_stride_h = 0;
  void* out = nullptr;           // bf16, same shape
  int64_t out_stride_t = 0, out_stride_h = 0;
  const void* positions = nullptr;  // [T] int32 or int64 (device)
  bool positions_int64 = false;
  const float* freqs = nullptr;  // [rope_dim / 2] fp32
  int rope_dim = 0;              // even, 2 <= rope_dim <= D
  const float* weight = nullptr; // [D] fp32: kv path RMSNorm weight; null: weight-free
  bool norm = true;              // q path: apply the weight-free RMSNorm
  float eps = 1e-6f;
  int quant = 0;                 // 0 none, 1 FP8 nope dims, 2 Hadamard + FP4 (q path only)
  int64_t tokens = 0, heads = 1; // kv path: heads = 1
  int head_dim = 0;              // 64, 128, 256 or 512
  KvCacheDst dst[2];             // kv path caches (data null = none)
};

// Runs the q path (heads >= 1, no destinations) or the kv path (heads == 1, weight set,
// optional destinations). Requirements (else cudaErrorInvalidValue): head_dim in
// {64, 128, 256, 512}; bf16 pointers 16-byte aligned with strides multiples of 8 elements;
// rope_dim even in [2, D]; quant 1: (D - rope_dim) % 64 == 0; quant 2: no destination;
// FP8 destinations: D == 512, rope_dim == 64. tokens == 0 is a no-op. Does not synchronise.
cudaError_t qkv_rope(const QkvRopeParams& params, cudaStream_t stream);

}  // namespace dsv4
