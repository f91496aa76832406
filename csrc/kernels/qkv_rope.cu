// dsv4 fused q / kv paths (torch-free; contract in include/dsv4/qkv_rope.h).
//
// One warp per row (q: a (token, head) pair; kv: a token); each lane holds V = D / 32
// consecutive elements, so a RoPE pair (2i, 2i + 1) and a quantisation block (64 or 32
// elements = 64 / V or 32 / V lanes) never straddle what the shuffles reach. The row is read
// once (16-byte loads), normalised, rotated, quantised and written (output and caches).
#include "dsv4/qkv_rope.h"

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "fp8_block_quant.cuh"

namespace dsv4 {
namespace {

constexpr int kWarpsPerCta = 8;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float bf16_round(float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}

using fp8q::ue8m0_ceil;

// e2m1 grid {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to the even code, sign kept (fp4_e2m1_round).
__device__ __forceinline__ float e2m1_round(float y) {
  const float a = fabsf(y);
  const float v = a <= 0.25f ? 0.f
                  : a < 0.75f ? 0.5f
                  : a <= 1.25f ? 1.f
                  : a < 1.75f ? 1.5f
                  : a <= 2.5f ? 2.f
                  : a < 3.5f ? 3.f
                  : a <= 5.f ? 4.f
                  : 6.f;
  return copysignf(v, y);
}

// Max of v over the `lanes` consecutive lanes (a power of two) of the lane's group.
__device__ __forceinline__ float group_max(float v, int lanes) {
  for (int o = 1; o < lanes; o <<= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

template <int V>
__device__ __forceinline__ void load_row(const __nv_bfloat16* src, float (&v)[V]) {
  if constexpr (V % 8 == 0) {
#pragma unroll
    for (int c = 0; c < V / 8; ++c) {
      const uint4 u = *reinterpret_cast<const uint4*>(src + 8 * c);
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162*>(&w[k]);
        v[8 * c + 2 * k] = __bfloat162float(b.x);
        v[8 * c + 2 * k + 1] = __bfloat162float(b.y);
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < V / 2; ++k) {
      const __nv_bfloat162 b = reinterpret_cast<const __nv_bfloat162*>(src)[k];
      v[2 * k] = __bfloat162float(b.x);
      v[2 * k + 1] = __bfloat162float(b.y);
    }
  }
}

template <int V>
__device__ __forceinline__ void store_row(__nv_bfloat16* dst, const float (&v)[V]) {
  if constexpr (V % 8 == 0) {
#pragma unroll
    for (int c = 0; c < V / 8; ++c) {
      uint32_t w[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const __nv_bfloat162 b = __floats2bfloat162_rn(v[8 * c + 2 * k], v[8 * c + 2 * k + 1]);
        w[k] = *reinterpret_cast<const uint32_t*>(&b);
      }
      *reinterpret_cast<uint4*>(dst + 8 * c) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < V / 2; ++k) {
      reinterpret_cast<__nv_bfloat162*>(dst)[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
    }
  }
}

// Writes the finished row to one destination (row r = d.rows[t]), or nothing if r is out of
// range. v: the bf16 values (after the FP8 simulation when quant 1); pre / scale: the values
// before the simulation and this lane's 64-block scale (an FP8 pool stores e4m3(pre / scale),
// whose dequantised value is exactly the simulation).
template <int V>
__device__ __forceinline__ void write_dst(const KvCacheDst& d, int64_t t, int lane,
                                          const float (&v)[V], const float (&pre)[V],
                                          float scale) {
  if (d.data == nullptr) return;
  const int64_t r = d.rows[t];
  if (r < 0 || r >= d.num_rows) return;
  const int64_t blk = r / d.block_size, e = r - blk * d.block_size;
  if (d.format == CacheFormat::kPlain) {
    __nv_bfloat16* row = static_cast<__nv_bfloat16*>(d.data) + blk * d.block_stride +
                         e * d.row_stride;
    store_row<V>(row + lane * V, v);
    return;
  }
  // MODEL1 (D = 512, V = 16): lanes 0..27 hold the 448 nope dims, 28..31 the 64 rope dims.
  if constexpr (V == 16) {
    const float inv = 1.0f / scale;  // exact: a power of two
    uint8_t* base = static_cast<uint8_t*>(d.data) + blk * d.block_stride;
    uint8_t* tok = base + e * kModel1TokenBytes;
    const int c0 = lane * V;
    if (c0 < kModel1Nope) {
      uint32_t w[V / 4];
#pragma unroll
      for (int k = 0; k < V / 4; ++k) {
        uint32_t word = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          word |= static_cast<uint32_t>(fp8q::e4m3_code(pre[4 * k + j], inv)) << (8 * j);
        }
        w[k] = word;
      }
#pragma unroll
      for (int k = 0; k < V / 16; ++k) {
        *reinterpret_cast<uint4*>(tok + c0 + 16 * k) =
            make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]);
      }
      // One lane per 64-block writes its scale byte (lanes 0, 4, ..., 24); lane 0 the pad byte.
      if ((c0 & 63) == 0) {
        uint8_t* sc = base + d.block_size * kModel1TokenBytes + e * kModel1ScaleBytes;
        sc[c0 >> 6] = static_cast<uint8_t>((__float_as_uint(scale) >> 23) & 0xffu);
        if (c0 == 0) sc[7] = 0;
      }
    } else {
      store_row<V>(reinterpret_cast<__nv_bfloat16*>(tok + kModel1Nope) + (c0 - kModel1Nope), v);
    }
  }  // (the host allows FP8 destinations for D = 512 only)
}

// hadamard_scale: D^-0.5 rounded to fp32 (the reference's y * n ** -0.5).
template <int V>
__global__ void __launch_bounds__(kWarpsPerCta * 32)
    qkv_rope_kernel(const QkvRopeParams p, float hadamard_scale) {
  constexpr int D = 32 * V;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  if (row >= p.tokens * p.heads) return;  // warp-uniform
  const int64_t t = row / p.heads, h = row - t * p.heads;

  float v[V];
  load_row<V>(static_cast<const __nv_bfloat16*>(p.x) + t * p.x_stride_t + h * p.x_stride_h +
                  lane * V,
              v);

  // 1. RMSNorm (weight-free for q, kv_norm's fp32 weight for kv): y = w * (x * rstd), bf16.
  if (p.norm) {
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < V; ++k) ss = fmaf(v[k], v[k], ss);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(kFull, ss, o);
    const float rstd = 1.0f / sqrtf(ss / static_cast<float>(D) + p.eps);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float y = v[k] * rstd;
      v[k] = bf16_round(p.weight != nullptr ? p.weight[lane * V + k] * y : y);
    }
  }

  // 2. RoPE on the last rope_dim dims: pair i = (c - (D - rd)) / 2 of element c, angle
  // pos * freqs[i] (fp32), (x0 + i x1)(cos + i sin) without FMA contraction, bf16.
  const int nope = D - p.rope_dim;
  const float pos = static_cast<float>(
      p.positions_int64 ? static_cast<const int64_t*>(p.positions)[t]
                        : static_cast<int64_t>(static_cast<const int32_t*>(p.positions)[t]));
#pragma unroll
  for (int k = 0; k < V; k += 2) {
    const int c = lane * V + k;
    if (c >= nope) {
      const float ang = pos * p.freqs[(c - nope) >> 1];
      float sn, cs;
      sincosf(ang, &sn, &cs);
      const float x0 = v[k], x1 = v[k + 1];
      v[k] = bf16_round(__fsub_rn(__fmul_rn(x0, cs), __fmul_rn(x1, sn)));
      v[k + 1] = bf16_round(__fadd_rn(__fmul_rn(x0, sn), __fmul_rn(x1, cs)));
    }
  }

  // 3. Quantisation simulation. pre[] keeps the values an FP8 cache quantises.
  float pre[V];
#pragma unroll
  for (int k = 0; k < V; ++k) pre[k] = v[k];
  const bool fp8_dst = (p.dst[0].data != nullptr && p.dst[0].format != CacheFormat::kPlain) ||
                       (p.dst[1].data != nullptr && p.dst[1].format != CacheFormat::kPlain);
  float scale = 1.f;  // this lane's 64-block scale (nope lanes; quant 1 or an FP8 cache)
  if (p.quant == 1 || fp8_dst) {
    // Block maximum and scale as fp8_block_quant.cuh (a NaN / inf in the block: scale 1).
    uint32_t amax = 0u;
#pragma unroll
    for (int k = 0; k < V; ++k) amax = max(amax, fp8q::abs_bits(v[k]));
    amax = fp8q::group_max_bits(amax, 64 / V);  // every lane takes part (uniform shuffles)
    scale = fp8q::e4m3_block_scale(amax);
    if (p.quant == 1 && lane * V < nope) {
      const float inv = 1.0f / scale;  // exact: a power of two
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = bf16_round(fp8q::e4m3_sim(v[k], scale, inv));
    }
  } else if (p.quant == 2) {
    // Normalised Walsh-Hadamard (Sylvester order, stage h = 1, 2, ..., D/2, fp32), then bf16.
#pragma unroll
    for (int hs = 1; hs < V; hs <<= 1) {  // partners inside the lane
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if ((k & hs) == 0) {
          const float a = v[k], b = v[k + hs];
          v[k] = a + b;
          v[k + hs] = a - b;
        }
      }
    }
    for (int lm = 1; lm < 32; lm <<= 1) {  // partners in lane ^ lm (stage h = lm * V)
      const bool upper = (lane & lm) != 0;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float other = __shfl_xor_sync(kFull, v[k], lm);
        v[k] = upper ? other - v[k] : v[k] + other;  // lower: a + b; upper: a - b (a = lower)
      }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = bf16_round(v[k] * hadamard_scale);
    float amax = 0.f;
#pragma unroll
    for (int k = 0; k < V; ++k) amax = fmaxf(amax, fabsf(v[k]));
    amax = group_max(amax, 32 / V);
    const float s = ue8m0_ceil(fmaxf(amax, 6.0f * 0x1p-126f) / 6.0f);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      v[k] = bf16_round(e2m1_round(fminf(fmaxf(v[k] / s, -6.0f), 6.0f)) * s);
    }
  }

  // 4. Output and caches.
  store_row<V>(static_cast<__nv_bfloat16*>(p.out) + t * p.out_stride_t + h * p.out_stride_h +
                   lane * V,
               v);
  write_dst<V>(p.dst[0], t, lane, v, pre, scale);
  write_dst<V>(p.dst[1], t, lane, v, pre, scale);
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <int V>
cudaError_t launch(const QkvRopeParams& p, cudaStream_t stream) {
  const int64_t rows = p.tokens * p.heads;
  const int64_t grid = (rows + kWarpsPerCta - 1) / kWarpsPerCta;
  if (grid > INT_MAX) return cudaErrorInvalidValue;
  const float hs = static_cast<float>(std::pow(static_cast<double>(32 * V), -0.5));
  qkv_rope_kernel<V><<<static_cast<unsigned>(grid), kWarpsPerCta * 32, 0, stream>>>(p, hs);
  return cudaGetLastError();
}

}  // namespace

cudaError_t qkv_rope(const QkvRopeParams& p, cudaStream_t stream) {
  const int D = p.head_dim;
  if (D != 64 && D != 128 && D != 256 && D != 512) return cudaErrorInvalidValue;
  if (p.tokens < 0 || p.heads < 1) return cudaErrorInvalidValue;
  if (p.rope_dim < 2 || p.rope_dim % 2 != 0 || p.rope_dim > D) return cudaErrorInvalidValue;
  if (p.quant < 0 || p.quant > 2) return cudaErrorInvalidValue;
  if (p.quant == 1 && (D - p.rope_dim) % 64 != 0) return cudaErrorInvalidValue;
  if (p.tokens == 0) return cudaSuccess;
  if (p.x == nullptr || p.out == nullptr || p.positions == nullptr || p.freqs == nullptr)
    return cudaErrorInvalidValue;
  // Rows are read / written in 16-byte pieces when V >= 8, 4-byte pieces otherwise.
  const int64_t align_elems = D >= 256 ? 8 : 2;
  const uintptr_t align_bytes = static_cast<uintptr_t>(2 * align_elems);
  if (reinterpret_cast<uintptr_t>(p.x) % align_bytes || reinterpret_cast<uintptr_t>(p.out) % align_bytes ||
      p.x_stride_t % align_elems || p.x_stride_h % align_elems || p.out_stride_t % align_elems ||
      p.out_stride_h % align_elems)
    return cudaErrorInvalidValue;
  for (const KvCacheDst& d : p.dst) {
    if (d.data == nullptr) continue;
    if (p.quant == 2 || p.heads != 1 || d.rows == nullptr || d.block_size < 1 || d.num_rows < 0)
      return cudaErrorInvalidValue;
    if (d.format == CacheFormat::kFp8Model1) {
      if (D != kModel1HeadDim || p.rope_dim != kModel1Rope || !aligned16(d.data) ||
          d.block_stride % 16 != 0)
        return cudaErrorInvalidValue;
    } else if (d.format == CacheFormat::kPlain) {
      if (reinterpret_cast<uintptr_t>(d.data) % align_bytes || d.block_stride % align_elems ||
          d.row_stride % align_elems)
        return cudaErrorInvalidValue;
    } else {
      return cudaErrorInvalidValue;
    }
  }
  switch (D) {
    case 64:
      return launch<2>(p, stream);
    case 128:
      return launch<4>(p, stream);
    case 256:
      return launch<8>(p, stream);
    default:
      return launch<16>(p, stream);
  }
}

}  // namespace dsv4
