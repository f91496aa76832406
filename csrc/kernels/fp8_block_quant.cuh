// FP8 e4m3 block quantisation shared by the KV writers and quantisation simulations of
// qkv_rope.cu and compress_kv.cu (torch-free): bit for bit dsv4.ops.quant.fp8_e4m3_quantize /
// fp8_e4m3_sim, non-finite values included.
//
// * Block maximum: max over the block of the bits of |v| as unsigned integers. For |v| those
//   bits are ordered as the values, with every NaN above +inf: a block holding a NaN has a NaN
//   maximum and one holding an inf (no NaN) an infinite one, as torch's amax. (fmaxf, which
//   drops NaN, would give the finite maximum of the other values instead.)
// * Scale: s = 2^ceil(log2(max(amax, 1e-4) / 448)) for a finite maximum, and s = 1 for an
//   infinite or NaN one: the reference's torch.frexp gives exponent 0 for inf / NaN (on the
//   CPU and in CUDA's frexpf alike), so its 2^exponent is 1 there.
// * Code: e4m3(clamp(v / s, -448, 448)), round to nearest even; +-inf saturate to +-448
//   (0x7e / 0xfe); a NaN gets the e4m3 NaN code with the NaN's sign, 0x7f / 0xff (torch.clamp
//   keeps a NaN and the float -> float8_e4m3fn cast keeps its sign; the hardware conversion and
//   every fp32 arithmetic instruction would give the positive canonical NaN instead).
#pragma once

#include <cuda_fp8.h>

#include <cstdint>

namespace dsv4 {
namespace fp8q {

// 2^ceil(log2(v)) for a positive normal fp32 v, exactly (ops/quant.py ue8m0_scale).
__device__ __forceinline__ float ue8m0_ceil(float v) {
  const uint32_t bits = __float_as_uint(v);
  if ((bits & 0x7fffffu) == 0) return v;
  return __uint_as_float(((bits >> 23) + 1u) << 23);
}

// |v| as ordered bits: combine block maxima with max() of these (umax), not fmaxf.
__device__ __forceinline__ uint32_t abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// Max of abs bits over the `lanes` consecutive lanes (a power of two <= 32, aligned) of the
// lane's group; every lane of the warp must call it.
__device__ __forceinline__ uint32_t group_max_bits(uint32_t b, int lanes) {
  for (int o = 1; o < lanes; o <<= 1) b = max(b, __shfl_xor_sync(0xffffffffu, b, o));
  return b;
}

// The e4m3 block scale of a block whose maximum has abs bits `amax_bits` (see the header).
__device__ __forceinline__ float e4m3_block_scale(uint32_t amax_bits) {
  if (amax_bits >= 0x7f800000u) return 1.0f;  // inf or NaN in the block
  return ue8m0_ceil(fmaxf(__uint_as_float(amax_bits), 1e-4f) / 448.0f);
}

// The e4m3 byte of v in a block of scale s, given inv = 1 / s (exact: s is a power of two, so
// v * inv is v / s correctly rounded).
__device__ __forceinline__ uint8_t e4m3_code(float v, float inv) {
  if (isnan(v)) return static_cast<uint8_t>(((__float_as_uint(v) >> 24) & 0x80u) | 0x7fu);
  return __nv_fp8_e4m3(fminf(fmaxf(v * inv, -448.0f), 448.0f)).__x;  // RNE
}

// The dequantised value e4m3(v / s) * s in fp32 (fp8_e4m3_sim before its cast); NaN stays v.
__device__ __forceinline__ float e4m3_sim(float v, float s, float inv) {
  if (isnan(v)) return v;
  return static_cast<float>(__nv_fp8_e4m3(fminf(fmaxf(v * inv, -448.0f), 448.0f))) * s;
}

}  // namespace fp8q
}  // namespace dsv4
