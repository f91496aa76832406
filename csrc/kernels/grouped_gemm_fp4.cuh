// e2m1 (FP4) -> bf16 decoding of the grouped GEMM kernel, by byte permutation (PRMT): about 3
// ALU instructions per value instead of ~5.5 for the fp32 bit construction, which matters when
// FP4 weights stream at several TB/s (each SM would otherwise be issue-bound). Host-callable so
// that csrc/tests/check_grouped_gemm.cu checks it exhaustively without a GPU.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DSV4_HD __host__ __device__ __forceinline__
#else
#define DSV4_HD inline
#endif

namespace dsv4 {
namespace gg {

// PRMT / __byte_perm: byte i of the result is byte (sel >> 4i) & 7 of {b:a} (a = bytes 0-3).
DSV4_HD uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, sel);
#else
  const uint64_t src = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t idx = (sel >> (4 * i)) & 7u;
    r |= static_cast<uint32_t>((src >> (8 * idx)) & 0xFFu) << (8 * i);
  }
  return r;
#endif
}

// Eight e2m1 codes of one word (element 2j in the low nibble of byte j, as the release packs
// them) -> four bf16x2 words (element 2k in the low half of word k) holding the exact values
// {0, ±.5, ±1, ±1.5, ±2, ±3, ±4, ±6} (code 8 = -0).
DSV4_HD void e2m1x8_to_bf16x8(uint32_t w, uint32_t (&out)[4]) {
  // bf16 bit patterns of the magnitudes 0, .5, 1, 1.5 | 2, 3, 4, 6: high bytes and low bytes,
  // magnitude code m in byte m of the pair (lo word = codes 0..3, hi word = codes 4..7)
  constexpr uint32_t kHi0 = 0x3F3F3F00u, kHi1 = 0x40404040u;
  constexpr uint32_t kLo0 = 0xC0800000u, kLo1 = 0xC0804000u;
  const uint32_t m = w & 0x77777777u;  // magnitude codes (3-bit selectors)
  const uint32_t hi_a = byte_perm(kHi0, kHi1, m), lo_a = byte_perm(kLo0, kLo1, m);  // 0..3
  const uint32_t mb = m >> 16;
  const uint32_t hi_b = byte_perm(kHi0, kHi1, mb), lo_b = byte_perm(kLo0, kLo1, mb);  // 4..7
  // word k = [lo(2k), hi(2k), lo(2k+1), hi(2k+1)]
  out[0] = byte_perm(lo_a, hi_a, 0x5140u);
  out[1] = byte_perm(lo_a, hi_a, 0x7362u);
  out[2] = byte_perm(lo_b, hi_b, 0x5140u);
  out[3] = byte_perm(lo_b, hi_b, 0x7362u);
  // signs: bit 7 of byte k of ev / od = the sign of element 2k / 2k + 1 (code bit 3)
  const uint32_t ev = (w << 4) & 0x80808080u, od = w & 0x80808080u;
  out[0] |= byte_perm(ev, od, 0x4000u) & 0x80008000u;  // ev byte 0 -> byte 1, od byte 0 -> 3
  out[1] |= byte_perm(ev, od, 0x5111u) & 0x80008000u;
  out[2] |= byte_perm(ev, od, 0x6222u) & 0x80008000u;
  out[3] |= byte_perm(ev, od, 0x7333u) & 0x80008000u;
}


// ---- e2m1 (FP4) -> e4m3 (FP8), for the FP8 x FP8 path (grouped_gemm_qmma.cuh) ----
// The 1x32 block scales of a weight row's 128-wide k block (four e8m0 codes c0..c3) are folded
// into one power of two per (row, k block), S = 2^(max c - 133), and each sub-block's codes are
// rewritten as e4m3 values of e2m1 * 2^t with t = c_q - max c + 6 <= 6 (so 6 * 2^t <= 384 <
// 448: no overflow): e2m1 * 2^(c_q - 127) = (e2m1 * 2^t) * S. Every e2m1 value has at most two
// significant bits, so e2m1 * 2^t is an e4m3 value (normal or subnormal, grid 2^-9) exactly
// when t >= -8, i.e. when the row's four scales span at most 14 octaves; below that the value
// is rounded to nearest even on e4m3's subnormal grid (values < 2^-9 * S: far below the bf16
// rounding of the block's largest products).

// The e4m3 bytes of the eight magnitude codes 0..7 (0, .5, 1, 1.5, 2, 3, 4, 6) times 2^t, as
// two PRMT tables (lut0 = codes 0..3, lut1 = codes 4..7). t <= 6.
DSV4_HD void e4m3_lut_for_shift(int t, uint32_t& lut0, uint32_t& lut1) {
  constexpr uint32_t kBase0 = 0x3C383000u, kBase1 = 0x4C484440u;  // t = 0
  if (t >= -5) {
    // every nonzero entry stays normal (exponent fields 6 + t .. 9 + t in [1, 15]): add t to
    // the exponent field of entries 1..7 (no byte borrows or carries: bytes >= 0x30, <= 0x4C)
    const uint32_t d = static_cast<uint32_t>(t * 8);
    lut0 = kBase0 + d * 0x01010100u;
    lut1 = kBase1 + d * 0x01010101u;
    return;
  }
  // some entries subnormal: e4m3 subnormal = round_half_even(value / 2^-9) (codes 0..8; 8 is
  // the smallest normal, 2^-6, byte 0x08), normal entries as above
  constexpr int kExp[8] = {0, 6, 7, 7, 8, 8, 9, 9};
  constexpr float kVal[8] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
  uint32_t b[8];
  b[0] = 0u;
  for (int v = 1; v < 8; ++v) {
    const uint32_t base = ((v < 4 ? kBase0 : kBase1) >> (8 * (v & 3))) & 0xFFu;
    if (kExp[v] + t >= 1) {
      b[v] = base + static_cast<uint32_t>(t * 8);
    } else {
      // value * 2^9 = kVal[v] * 2^(t + 9), t + 9 < 4: exact in float; rintf rounds half to even
      const float q = ldexpf(kVal[v], t + 9);
      b[v] = static_cast<uint32_t>(rintf(q));
    }
  }
  lut0 = b[0] | (b[1] << 8) | (b[2] << 16) | (b[3] << 24);
  lut1 = b[4] | (b[5] << 8) | (b[6] << 16) | (b[7] << 24);
}

// Eight e2m1 codes of one word (element 2j in the low nibble of byte j) -> eight e4m3 bytes in
// element order (out[0] = elements 0..3, byte i = element i), magnitudes from the tables of
// e4m3_lut_for_shift, the sign copied (code 8, -0, gives e4m3 -0).
DSV4_HD void e2m1x8_to_e4m3x8(uint32_t w, uint32_t lut0, uint32_t lut1, uint32_t (&out)[2]) {
  const uint32_t m = w & 0x77777777u;  // magnitude codes as 3-bit PRMT selectors
  const uint32_t mag0 = byte_perm(lut0, lut1, m), mag1 = byte_perm(lut0, lut1, m >> 16);
  // bit 7 of byte k of ev / od = the sign of element 2k / 2k + 1
  const uint32_t ev = (w << 4) & 0x80808080u, od = w & 0x80808080u;
  out[0] = mag0 | byte_perm(ev, od, 0x5140u);
  out[1] = mag1 | byte_perm(ev, od, 0x7362u);
}

// The folded power of two S = 2^(cmax - 133) of a row's k block (cmax = the largest of its four
// e8m0 codes; a code 255 (NaN) anywhere gives NaN: the reference's NaN scale poisons the row's
// products). Exact in float32 (2^-133 is a subnormal).
DSV4_HD float fp4_folded_scale(uint32_t cmax, bool has_nan) {
  if (has_nan) {
    union { uint32_t u; float f; } nan_bits = {0x7FC00000u};
    return nan_bits.f;
  }
  union { uint32_t u; float f; } r;
  r.u = cmax >= 7u ? (cmax - 6u) << 23 : (1u << (cmax + 16u));
  return r.f;
}

}  // namespace gg
}  // namespace dsv4
