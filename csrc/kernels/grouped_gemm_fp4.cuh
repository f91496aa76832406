// e2m1 (FP4) -> bf16 decoding of the grouped GEMM kernel, by byte permutation (PRMT): about 3
// ALU instructions per value instead of ~5.5 for the fp32 bit construction, which matters when
// FP4 weights stream at several TB/s (each SM would otherwise be issue-bound). Host-callable so
// that csrc/tests/check_grouped_gemm.cu checks it exhaustively without a GPU.
#pragma once

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

}  // namespace gg
}  // namespace dsv4
