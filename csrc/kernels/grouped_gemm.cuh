// Grouped GEMM on Hopper tensor cores (sm_90a wgmma): the kernel behind moe_up / moe_down,
// fp8_linear and grouped_oproj. Torch-free; the C++ API and the exact semantics are in
// include/dsv4/grouped_gemm.h.
//
// Design ("swap AB"): the weights are the MMA's M side and the activation rows its N side.
//   * A CTA works on units (expert e, weight-row block fb, activation-row block tb): 64 x NWG
//     weight rows (one m64 slab per warpgroup) times up to BN activation rows. The MMA's N
//     (8 .. 256, mma_width) is picked per unit from the rows the unit really has, so an
//     expert with 3 tokens issues m64n8 MMAs and streams its weights once: decode is a weight
//     stream, prefill a tensor-core GEMM, same code.
//   * Units are ordered expert -> weight block -> row block and a persistent grid walks them
//     round-robin. Per-expert unit counts come from expert_offsets on the device (a prefix sum
//     in shared memory at kernel start): no host sync, CUDA-graph safe.
//   * Pipeline: STAGES shared-memory stages filled with cp.async (16-byte chunks; weight rows,
//     activation rows gathered through row_ids, zero-filled past the unit's rows or past k),
//     one __syncthreads per 64-wide k step; the MMAs of step k run asynchronously while the
//     threads prepare step k + 1 and the loads of step k + STAGES - 1 are in flight. The
//     two-warpgroup tiles also come with an overlapped pipeline (OVL): the MMAs of step k are
//     still running when those of step k + 1 are issued (wgmma.wait_group 1), at the price of
//     one stage less of prefetch; GemmPipeline / DSV4_GEMM_PIPE selects it.
//   * FP8 / FP4 weights land raw and each warp converts the rows it loaded itself to bf16
//     (e4m3 or e2m1 times the scale, rounded once: exact for the power-of-two e8m0 scales;
//     e2m1 by byte permutation, grouped_gemm_fp4.cuh) into a double-buffered bf16 tile:
//     cp.async.wait_group and a __syncwarp, no extra block barrier. The raw weights come two
//     k steps per fill (a row's 128 (FP8) / 64 (FP4) contiguous bytes per copy instead of
//     64 / 32: a cp.async copy costs a shared-memory wavefront per global line it touches, so
//     64-byte row pieces cost twice the ideal), the rows of the odd step stored pairwise
//     swapped (row r at r ^ 1) so that a line's two halves land in different banks. FP8
//     scales: one word per warp and pair of steps (all the rows a warp converts share one
//     128 x 128 block), copied by lane 0 (a 4-byte copy of one global word by all 32 lanes
//     costs 32 wavefronts); FP4: one word per thread and chunk, every step.
//   * Inverse RoPE (grouped output projection): on the k steps that hold a head's last 64 dims
//     each thread rotates the activation chunks it loaded, in place, with a per-unit
//     [rows x 32] (cos, sin) table (fp32 angles pos * freq, as layers/rope.apply_rope), and
//     rounds to bf16 as the reference does before its einsum.
//   * Operands: K-major bf16 tiles in the canonical 128-byte swizzle (row r's 16-byte chunk c
//     at r * 128 + ((c ^ (r & 7)) << 4), 1024-byte aligned), the layout sparse_attn's wgmma
//     kernel uses (verified on the H200).
//   * SwiGLU: the A tile interleaves gate and up rows in groups of 8 (tile rows 16j .. 16j+7 =
//     gate of features 8j .. 8j+7, rows 16j+8 .. 16j+15 = up of the same features), so each
//     thread's m64nN fragment (rows r and r + 8) holds g and u of the same (feature, row) pair
//     and the clamped SwiGLU and the routing weight are applied in registers.
//   * Epilogue: the bf16 tile is staged in shared memory (rows padded by 16 bytes: conflict-
//     free), then written with 16-byte coalesced stores, only for the unit's real rows.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "dsv4/grouped_gemm.h"
#include "grouped_gemm_fp4.cuh"
#include "grouped_gemm_wgmma.cuh"

namespace dsv4 {
namespace gg {

__host__ __device__ constexpr int round_up(int v, int m) { return (v + m - 1) / m * m; }

// Compile-time shape of one kernel variant. OVL: the overlapped pipeline (the MMAs of step k
// stay in flight across the barrier of step k + 1; prefetch distance STAGES - 2, three bf16
// buffers for converted FP8/FP4 weights) instead of the serial one (MMAs of step k done
// before the barrier of step k + 1; prefetch distance STAGES - 1, two buffers).
template <int FMT, int EPI, bool ROPE, int NWG, int BN, int SMEM_LIMIT, bool OVL>
struct Cfg {
  static constexpr int kThreads = 128 * NWG;
  static constexpr int kMinBlocks = SMEM_LIMIT == kSmem3PerSm ? 3 : 1;
  static constexpr int kRowsA = 64 * NWG;                             // weight rows per tile
  static constexpr int kRawRow = FMT == kFmtBF16 ? 128 : (FMT == kFmtFP8 ? 64 : 32);  // B/step
  static constexpr int kRawChunks = kRawRow / 16;                     // 16-byte chunks per row
  static constexpr int kElemsPerChunk = FMT == kFmtBF16 ? 8 : (FMT == kFmtFP8 ? 16 : 32);
  static constexpr int kAChunks = kRowsA * kRawChunks / kThreads;     // per thread per step
  // FP8 / FP4: the weights are filled two k steps at a time (see "pair fill" in the kernel):
  // a row's 2 * kRawRow contiguous bytes (FP8: one 128-byte line) per fill, split over the
  // stages of the two steps
  static constexpr int kPairChunks = 2 * kRawChunks;  // 16-byte chunks of a row per pair fill
  static constexpr int kFillRows = 32 / kPairChunks;  // rows of one warp-wide pair-fill copy
  static constexpr int kConvRows = 32 / kRawChunks;   // rows of one warp-wide conversion chunk
  static constexpr int kBChunks = BN * 8 / kThreads;                  // per thread per step
  static constexpr int kBBytes = BN * 128;
  static constexpr int kARawBytes = kRowsA * kRawRow;
  // scale words per stage: FP8, one per warp (every row a warp converts lies in the same
  // matrix and 128 x 128 scale block: one word, copied by lane 0); FP4, one per thread and
  // chunk (every chunk has its own 1 x 32 block)
  static constexpr int kScaleWords = FMT == kFmtBF16 ? 0
                                   : (FMT == kFmtFP8 ? kThreads / 32 : kThreads * kAChunks);
  static constexpr int kScaleBytes = kScaleWords * 4;
  static constexpr int kStageStride = round_up(kBBytes + kARawBytes + kScaleBytes, 1024);
  static constexpr int kABf16Bytes = FMT == kFmtBF16 ? 0 : kRowsA * 128;  // per buffer
  static constexpr int kABufs = OVL ? 3 : 2;
  static constexpr int kRopeBytes = ROPE ? BN * kRopePairs * 8 : 0;
  static constexpr int kRwBytes = EPI == kEpiSwiGLU ? BN * 4 : 0;
  static constexpr int kPrefixBytes = (kMaxExperts + 1) * 4;
  static constexpr int kFixed =
      kABufs * kABf16Bytes + kRopeBytes + kRwBytes + kPrefixBytes + 1024;
  // one warpgroup alone on an SM (kDecodeDeep) needs a deep pipeline to keep enough weight
  // bytes in flight; otherwise a few stages per block suffice
  static constexpr int kMaxStages =
      (NWG == 1 && SMEM_LIMIT == kSmemLimit) ? 32 : (FMT == kFmtFP4 ? 12 : 8);
  static constexpr int kFitStages = (SMEM_LIMIT - kFixed) / kStageStride;
  static constexpr int kStages = kFitStages < kMaxStages ? kFitStages : kMaxStages;
  static constexpr int kOffABf16 = kStages * kStageStride;
  static constexpr int kOffRope = kOffABf16 + kABufs * kABf16Bytes;
  static constexpr int kPrefetch = OVL ? kStages - 2 : kStages - 1;  // steps loaded ahead
  static constexpr int kOffRw = kOffRope + kRopeBytes;
  static constexpr int kOffPrefix = kOffRw + kRwBytes;
  static constexpr int kSmem = kOffPrefix + kPrefixBytes + 1024;  // + slack to align to 1024
  static constexpr int kFeat = EPI == kEpiSwiGLU ? kRowsA / 2 : kRowsA;  // outputs per tile
  static constexpr int kEpiStride = kFeat * 2 + 16;                       // bytes per staged row
  static constexpr int kAcc = BN / 2;

  static_assert(NWG == 1 || NWG == 2, "one or two consumer warpgroups");
  static_assert(BN == 16 || BN == 32 || BN == 64 || BN == 128 || BN == 256, "tile rows");
  static_assert(kAChunks >= 1 && kAChunks * kThreads == kRowsA * kRawChunks, "A chunk split");
  // FP8: a warp's chunk j = 8 rows 8 (w + j T / 32) + [0, 8): one SwiGLU group of matrix
  // (w + j T / 32) & 1 = w & 1 for every j (T / 32 even); the tile's rows (64 or 128 from a
  // multiple of their count) lie in one 128-row scale block: one scale word per warp and step
  static_assert(FMT != kFmtFP8 || (kConvRows == 8 && (kThreads / 32) % 2 == 0 &&
                                   128 % kRowsA == 0 && 128 % kFeat == 0),
                "FP8: one scale word per warp");
  static_assert(FMT == kFmtBF16 || (kConvRows == 2 * kFillRows && kFillRows % 4 == 0),
                "pair fill: a warp's conversion rows are its two fill copies' rows");
  static_assert(kBChunks >= 1 && kBChunks * kThreads == BN * 8, "B chunk split");
  static_assert(kStages >= (OVL ? 3 : 2), "not enough shared memory for the pipeline");
  static_assert(kSmem <= SMEM_LIMIT, "shared memory budget");
  static_assert(BN * kEpiStride <= kStages * kStageStride, "epilogue tile overlays the stages");
  static_assert(kBBytes % 1024 == 0 && kARawBytes % 1024 == 0, "1024-byte aligned tiles");
};

// (first pair, pair count) of expert e; offsets clamped to [0, pairs], a decreasing pair -> 0.
__device__ __forceinline__ int64_t expert_rows(const GroupedGemmArgs& a, int e, int64_t* p0) {
  if (a.expert_offsets == nullptr) {
    *p0 = 0;
    return a.pairs;
  }
  int64_t lo = __ldg(a.expert_offsets + e), hi = __ldg(a.expert_offsets + e + 1);
  lo = lo < 0 ? 0 : (lo > a.pairs ? a.pairs : lo);
  hi = hi < lo ? lo : (hi > a.pairs ? a.pairs : hi);
  *p0 = lo;
  return hi - lo;
}

__device__ __forceinline__ float e8m0_to_f32(uint32_t code) {
  return code == 255u ? __uint_as_float(0x7FC00000u)
                      : (code == 0u ? __uint_as_float(0x00400000u) : __uint_as_float(code << 23));
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ float bf16_lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t v) { return __uint_as_float(v & 0xFFFF0000u); }

// The inverse RoPE of one interleaved pair (x0 = low bf16 of w, x1 = high) by the angle whose
// (cos, sin) is cs: (x0 + i x1) * conj(cos + i sin) in fp32, rounded to bf16 as the reference
// rounds the rotated o. The one definition every grouped-GEMM kernel's RoPE path uses.
__device__ __forceinline__ uint32_t rope_inv_bf16x2(uint32_t w, float2 cs) {
  const float x0 = bf16_lo(w), x1 = bf16_hi(w);
  return pack_bf16x2(x0 * cs.x + x1 * cs.y, x1 * cs.x - x0 * cs.y);
}

// s is +-2^e with lo <= |s| <= hi (then s is exact in bf16 and a bf16 product by it is exact
// while it stays normal).
__device__ __forceinline__ bool pow2_in(float s, float lo, float hi) {
  const float m = fabsf(s);
  return (__float_as_uint(s) & 0x007FFFFFu) == 0u && m >= lo && m <= hi;
}

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// Two e4m3 values (low byte first) -> float2 (exact).
__device__ __forceinline__ float2 fp8x2_to_f32x2(uint32_t two) {
  uint32_t h2;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(h2) : "h"(static_cast<unsigned short>(two)));
  return __half22float2(*reinterpret_cast<const __half2*>(&h2));
}
// Two e4m3 values times the scale s -> bf16x2, rounded once. `fast` (s = +-2^e with |s| in
// [2^-117, 2^118]: e4m3 magnitudes lie in [2^-9, 448], so every nonzero product is a normal
// bf16, exact): the pair as bf16 (exact: 4 significant bits) times s2 = (s, s), one bf16x2
// multiply; otherwise two fp32 multiplies. (The caller branches on a warp-uniform `fast`.)
__device__ __forceinline__ uint32_t fp8x2_to_bf16x2(uint32_t two, float s, uint32_t s2,
                                                    bool fast) {
  const float2 f = fp8x2_to_f32x2(two);
  return fast ? bf16x2_mul(pack_bf16x2(f.x, f.y), s2) : pack_bf16x2(f.x * s, f.y * s);
}
// Sixteen e4m3 values (one 16-byte chunk) -> two uint4 of bf16x2 (lo: values 0-7).
__device__ __forceinline__ void fp8x16_to_bf16x16(uint4 q, float s, uint32_t s2, bool fast,
                                                  uint4& lo, uint4& hi) {
  lo = make_uint4(fp8x2_to_bf16x2(q.x, s, s2, fast), fp8x2_to_bf16x2(q.x >> 16, s, s2, fast),
                  fp8x2_to_bf16x2(q.y, s, s2, fast), fp8x2_to_bf16x2(q.y >> 16, s, s2, fast));
  hi = make_uint4(fp8x2_to_bf16x2(q.z, s, s2, fast), fp8x2_to_bf16x2(q.z >> 16, s, s2, fast),
                  fp8x2_to_bf16x2(q.w, s, s2, fast), fp8x2_to_bf16x2(q.w >> 16, s, s2, fast));
}

// Eight e2m1 codes of one 32-bit word (element 2j in the low nibble of byte j) times the
// scale s -> four bf16x2 words, rounded once. `fast` (s = +-2^e with |s| in [2^-118, 2^118],
// so every product is a normal bf16, exact): one bf16x2 multiply by s2 = (s, s) per pair;
// otherwise fp32 (a float32 scale need not be a power of two).
__device__ __forceinline__ uint4 fp4x8_to_bf16x8(uint32_t w, float s, uint32_t s2, bool fast) {
  uint32_t v[4];
  e2m1x8_to_bf16x8(w, v);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    v[k] = fast ? bf16x2_mul(v[k], s2) : pack_bf16x2(bf16_lo(v[k]) * s, bf16_hi(v[k]) * s);
  }
  return make_uint4(v[0], v[1], v[2], v[3]);
}

// One 64-wide k step of MMAs for the warpgroup: A rows [64] at a_tile, B rows [N] at b_tile.
// The k16 slices of a 128-byte-swizzled tile start 32 bytes apart: descriptor + 2 in the
// address field (bits 0-13, address >> 4; shared addresses < 2^18 leave no carry out of it).
template <int N, int M>
__device__ __forceinline__ void mma_step(float (&acc)[M], uint32_t a_tile, uint32_t b_tile) {
  const uint64_t da = smem_desc(a_tile), db = smem_desc(b_tile);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < kBK / 16; ++ks) {
    Wgmma<N>::mma(acc, da + 2 * ks, db + 2 * ks);
  }
  wgmma_commit();
}

// The MMA widths a unit may use: the smallest one >= its rows is taken (padding <= 1/7 above
// 32 rows; an expert with 96 rows runs n = 96, not 128).
__host__ __device__ constexpr int mma_width(int rows) {
  return rows <= 8 ? 8 : rows <= 16 ? 16 : rows <= 24 ? 24 : rows <= 32 ? 32 : rows <= 48 ? 48
       : rows <= 64 ? 64 : rows <= 80 ? 80 : rows <= 96 ? 96 : rows <= 112 ? 112
       : rows <= 128 ? 128 : rows <= 160 ? 160 : rows <= 192 ? 192 : rows <= 224 ? 224 : 256;
}

// The i-th MMA width (i = 0 .. kNumWidths - 1): 8, 16, 24, 32, 48, ..., 128, 160, ..., 256.
constexpr int kNumWidths = 14;
__host__ __device__ constexpr int mma_width_at(int i) {
  return i < 4 ? 8 * (i + 1) : (i < 10 ? 48 + 16 * (i - 4) : 160 + 32 * (i - 10));
}
static_assert(mma_width_at(9) == 128 && mma_width_at(13) == 256, "width table");

// Calls f(std::integral_constant<int, n>{}) for the MMA width n (one of mma_width_at(i) <= BN;
// uniform across the block), so that f sees n as a compile-time constant.
template <int BN, int I = 0, class F>
__device__ __forceinline__ void with_mma_width(int n, F&& f) {
  if constexpr (I < kNumWidths && mma_width_at(I) <= BN) {
    if (n == mma_width_at(I)) {
      f(std::integral_constant<int, mma_width_at(I)>{});
      return;
    }
    with_mma_width<BN, I + 1>(n, f);
  }
}

// One k step with MMA width n = mma_width(rows of the unit) (uniform across the block).
template <int BN, int M>
__device__ __forceinline__ void mma_step_n(int n, float (&acc)[M], uint32_t a_tile,
                                           uint32_t b_tile) {
  with_mma_width<BN>(n, [&](auto w) { mma_step<decltype(w)::value>(acc, a_tile, b_tile); });
}

// ------------------------------------------------------------------ the unit walk (shared)
// A unit is (expert e, block fb of kFeat output features, tile of BN rows of the expert);
// units are numbered expert by expert, feature block by block within an expert. Both kernels
// (this file's and grouped_gemm_qmma.cuh's) walk them with a grid stride.

// upre[e] = first unit of expert e, upre[E] = the total (returned). Run by all nthreads threads
// of the block (warp 0 scans); contains two __syncthreads. The host bounds the total by INT_MAX
// (unit_bound).
template <int BN>
__device__ __forceinline__ int unit_prefix(const GroupedGemmArgs& a, int n_fb, int* upre, int tid,
                                           int nthreads) {
  const int E = a.n_experts, lane = tid & 31;
  for (int e = tid; e < E; e += nthreads) {
    int64_t p0;
    const int64_t cnt = expert_rows(a, e, &p0);
    upre[e + 1] = n_fb * static_cast<int>((cnt + BN - 1) / BN);
  }
  if (tid == 0) upre[0] = 0;
  __syncthreads();
  if (tid < 32) {
    int carry = 0;
    for (int b0 = 0; b0 < E; b0 += 32) {
      const int i = b0 + lane;
      int v = i < E ? upre[i + 1] : 0;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int o = __shfl_up_sync(0xffffffffu, v, d);
        if (lane >= d) v += o;
      }
      v += carry;
      if (i < E) upre[i + 1] = v;
      carry = __shfl_sync(0xffffffffu, v, 31);
    }
  }
  __syncthreads();
  return upre[E];
}

struct Unit {
  int e;        // expert
  int fb;       // feature block
  int64_t pt;   // first pair (row of x / out) of the tile
  int rows_t;   // rows of the tile, 1 .. BN
};

// Unit u (< upre[E]) of the walk. Within an expert: feature block by feature block (the
// expert's row tiles of one feature block are consecutive units), or with tb_major row tile by
// row tile (the feature blocks of one row tile are consecutive: concurrent blocks then share
// the activation tile, for problems whose activations outweigh their weights).
template <int BN>
__device__ __forceinline__ Unit find_unit(const GroupedGemmArgs& a, const int* upre, int u,
                                          bool tb_major = false) {
  int lo = 0, hi = a.n_experts;  // upre[lo] <= u < upre[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (upre[mid] <= u) lo = mid; else hi = mid;
  }
  Unit t;
  t.e = lo;
  int64_t p0;
  const int64_t cnt = expert_rows(a, lo, &p0);
  const int n_tb = static_cast<int>((cnt + BN - 1) / BN);
  const int local = u - upre[lo];
  const int n_fb = (upre[lo + 1] - upre[lo]) / n_tb;  // u < upre[E]: expert lo has units
  t.fb = tb_major ? local % n_fb : local / n_tb;
  const int tb = tb_major ? local / n_fb : local % n_tb;
  t.pt = p0 + static_cast<int64_t>(tb) * BN;
  const int64_t left = cnt - static_cast<int64_t>(tb) * BN;
  t.rows_t = static_cast<int>(left < BN ? left : BN);
  return t;
}

// An upper bound of the unit count (host; the launch's grid): n_fb x (>= sum over experts of
// ceil(rows_e / BN)).
inline int64_t unit_bound(const GroupedGemmArgs& a, int64_t n_fb, int bn) {
  int64_t tiles;
  if (a.expert_offsets == nullptr) {
    tiles = static_cast<int64_t>(a.n_experts) * ((a.pairs + bn - 1) / bn);
  } else {
    tiles = (a.pairs < a.n_experts ? a.pairs : a.n_experts) + (a.pairs + bn - 1) / bn;
  }
  return n_fb * tiles;
}

// Tile row r of feature block fb -> weight row of matrix m. SwiGLU: the gate (m = 0) and up
// (m = 1) rows of a feature are interleaved by 8 (rows 16 j + [0, 8) gate, + [8, 16) up, of
// features 8 j + [0, 8)), so a thread's accumulator rows r and r + 8 are one feature's gate
// and up. kFeat: features per block (= tile rows for the store epilogue).
template <int EPI, int kFeat>
__device__ __forceinline__ int weight_row(int fb, int r, int& m) {
  if constexpr (EPI == kEpiSwiGLU) {
    m = (r >> 3) & 1;
    return fb * kFeat + (r >> 4) * 8 + (r & 7);
  } else {
    m = 0;
    return fb * kFeat + r;
  }
}

// ---------------------------------------------------------------- the epilogue (shared)
// The SwiGLU output of one (feature, row) from the fp32 gate / up sums: both rounded to bf16
// (as the reference's bf16 GEMM outputs), clamped at limit (> 0; 0 = no clamp), then
// rw * silu(g) * u in fp32 (the caller rounds). Shared by every kernel's epilogue.
__device__ __forceinline__ float swiglu_out(float g, float u, float limit, float rw) {
  float gq = __bfloat162float(__float2bfloat16_rn(g));
  float uq = __bfloat162float(__float2bfloat16_rn(u));
  if (limit > 0.f) {
    gq = gq > limit ? limit : gq;
    uq = uq > limit ? limit : (uq < -limit ? -limit : uq);
  }
  return rw * (gq / (1.f + expf(-gq)) * uq);
}

// Registers -> shared tile et [BN rows][kFeat] bf16 (row stride kEpiStride bytes). The
// accumulator of the warpgroup wg (64 tile rows, the m64nN fragment: thread (w4, g, tg) holds
// rows wg 64 + w4 16 + g (+ 8) x columns 8 i + 2 tg (+ 1)). SwiGLU: bf16-rounded gate / up,
// clamped at limit (> 0), silu(gate) x up x rw(column) (rw: the routing weight of a tile
// column, 0 past the tile's rows); store: the bf16 accumulator.
template <int EPI, int BN, int kEpiStride, int M, class RW>
__device__ __forceinline__ void epi_stage(const float (&acc)[M], uint8_t* et, int wg, int w4,
                                          int g, int tg, float limit, RW&& rw) {
#pragma unroll
  for (int i = 0; i < BN / 8; ++i) {
    const int c = i * 8 + 2 * tg;
    if constexpr (EPI == kEpiSwiGLU) {
      const int f = wg * 32 + w4 * 8 + g;
      const float L = limit;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        *reinterpret_cast<__nv_bfloat16*>(et + (c + h) * kEpiStride + f * 2) =
            __float2bfloat16_rn(swiglu_out(acc[i * 4 + h], acc[i * 4 + 2 + h], L, rw(c + h)));
      }
    } else {
      const int r0 = wg * 64 + w4 * 16 + g;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // one paired conversion (two scalar ones make ptxas serialise the wgmma pipeline,
        // warning C7514)
        const uint32_t pr = pack_bf16x2(acc[i * 4 + h], acc[i * 4 + 2 + h]);
        uint16_t* row = reinterpret_cast<uint16_t*>(et + (c + h) * kEpiStride);
        row[r0] = static_cast<uint16_t>(pr & 0xFFFFu);
        row[r0 + 8] = static_cast<uint16_t>(pr >> 16);
      }
    }
  }
}

// The staged tile -> out rows pt .. pt + rows_t - 1, features fb kFeat .. (< a.rows), 16-byte
// stores by nthreads threads (tid among them).
template <int kFeat, int kEpiStride>
__device__ __forceinline__ void epi_store(const GroupedGemmArgs& a, const uint8_t* et,
                                          const Unit& t, int tid, int nthreads) {
  constexpr int kCpr = kFeat / 8;  // 16-byte chunks per output row
  char* out = static_cast<char*>(a.out);
  for (int idx = tid; idx < t.rows_t * kCpr; idx += nthreads) {
    const int i = idx / kCpr, ch = idx % kCpr;
    const int f = t.fb * kFeat + ch * 8;
    if (f < a.rows) {
      const uint4 v = *reinterpret_cast<const uint4*>(et + i * kEpiStride + ch * 16);
      *reinterpret_cast<uint4*>(out + (t.e * a.out_expert_stride +
                                       (t.pt + i) * a.out_row_stride + f) * 2) = v;
    }
  }
}

template <class C, int FMT, int EPI, bool ROPE, int NWG, int BN, bool OVL>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks)
    grouped_gemm_kernel(const GroupedGemmArgs a) {
#if !DSV4_GG_WGMMA
  __trap();
#else
  constexpr int T = C::kThreads;
  constexpr int S = C::kStages;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base - raw);
  int* upre = reinterpret_cast<int*>(smem + C::kOffPrefix);
  float2* rope_tab = reinterpret_cast<float2*>(smem + C::kOffRope);
  float* rw_s = reinterpret_cast<float*>(smem + C::kOffRw);
  const uint32_t abf_base = base + C::kOffABf16;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, w4 = warp & 3, g = lane >> 2, tg = lane & 3;
  const int K = a.k;
  const int KT = (K + kBK - 1) / kBK;
  const int n_fb = (a.rows + C::kFeat - 1) / C::kFeat;
  const char* dummy = static_cast<const char*>(a.x);  // a valid address for zero-size copies

  // ---- units per expert, prefix sum (upre[e] = first unit of expert e, upre[n_experts] = total) ----
  const int total = unit_prefix<BN>(a, n_fb, upre, tid, T);

  // Per-thread chunk coordinates (fixed for the whole kernel: T is a multiple of 8 and of
  // the raw chunks per row, so the column of every chunk a thread handles is the same).
  const int a_col = tid % C::kRawChunks;
  const int b_col = tid & 7;

  float acc[C::kAcc];

  for (int u = blockIdx.x; u < total; u += gridDim.x) {
    // ---- which unit ----
    const Unit unit = find_unit<BN>(a, upre, u);
    const int e = unit.e, fb = unit.fb, rows_t = unit.rows_t;
    const int64_t pt = unit.pt;  // first pair of the tile

    // ---- weight rows ----
    // tile row r -> weight row wr of matrix m (SwiGLU: gate / up interleaved by 8)
    auto weight_row = [&](int r, int& m) { return gg::weight_row<EPI, C::kFeat>(fb, r, m); };
    auto weight_src = [&](int wr, int m, bool ok, int col) {
      return static_cast<const char*>(a.w) + e * a.w_expert_stride + m * a.w_mat_stride +
             static_cast<int64_t>(ok ? wr : 0) * a.w_row_stride + col * 16;
    };
    // the rows this thread converts (FP8 / FP4) or loads (bf16): chunk j = row
    // (tid + j T) / kRawChunks, 16-byte column a_col; a warp's chunk j = kConvRows whole rows
    const char* a_src[C::kAChunks];  // bf16
    uint32_t a_dst[C::kAChunks];     // bf16
    int64_t s_idx[C::kAChunks];
    bool a_ok[C::kAChunks];
#pragma unroll
    for (int j = 0; j < C::kAChunks; ++j) {
      const int r = (tid + j * T) / C::kRawChunks;  // tile row
      int m;
      const int wr = weight_row(r, m);
      a_ok[j] = wr < a.rows;
      a_src[j] = weight_src(wr, m, a_ok[j], a_col);
      s_idx[j] = e * a.s_expert_stride + m * a.s_mat_stride +
                 static_cast<int64_t>(FMT == kFmtFP8 ? wr / 128 : wr) * a.s_row_stride;
      a_dst[j] = r * 128 + (((a_col ^ r) & 7) << 4);
    }
    // FP8 / FP4 pair fill: the rows this thread copies. Copy (j, h) of warp w covers the
    // kFillRows rows kConvRows (w + j T / 32) + h kFillRows + [0, kFillRows), kPairChunks
    // lanes per row; lane chunk f_c of the row's two-step segment belongs to step f_g of the
    // pair, 16-byte column f_rc of that step's row. Both copies of (w, j) are the rows that
    // warp w converts as its chunk j.
    const int f_c = lane % C::kPairChunks, f_g = f_c / C::kRawChunks, f_rc = f_c % C::kRawChunks;
    const char* f_src[C::kAChunks][2];
    bool f_ok[C::kAChunks][2];
#pragma unroll
    for (int j = 0; j < C::kAChunks; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = C::kConvRows * (warp + j * (T / 32)) + h * C::kFillRows +
                      lane / C::kPairChunks;
        int m;
        const int wr = weight_row(r, m);
        f_ok[j][h] = wr < a.rows;
        f_src[j][h] = weight_src(wr, m, f_ok[j][h], f_c);
      }
    }
    // shared offset of copy (0, 0) in its step's raw tile (odd step: row r stored at r ^ 1)
    const uint32_t f_dst = (C::kConvRows * warp + ((lane / C::kPairChunks) ^ f_g)) * C::kRawRow +
                           f_rc * 16;
    // ---- activation rows this thread loads ----
    const char* b_src[C::kBChunks];
    uint32_t b_dst[C::kBChunks];
    bool b_ok[C::kBChunks];
#pragma unroll
    for (int j = 0; j < C::kBChunks; ++j) {
      const int br = (tid + j * T) >> 3;
      bool ok = br < rows_t;
      int64_t xr = 0;
      if (ok) {
        xr = a.row_ids != nullptr ? static_cast<int64_t>(__ldg(a.row_ids + pt + br)) : pt + br;
        ok = xr >= 0 && xr < a.x_rows;
      }
      b_ok[j] = ok;
      b_src[j] = ok ? static_cast<const char*>(a.x) +
                          (e * a.x_expert_stride + xr * a.x_row_stride) * 2 + b_col * 16
                    : dummy;
      b_dst[j] = br * 128 + (((b_col ^ br) & 7) << 4);
    }
    // ---- per-unit tables: (cos, sin) of the inverse RoPE, routing weights ----
    if constexpr (ROPE) {
      for (int idx = tid; idx < BN * kRopePairs; idx += T) {
        const int i = idx / kRopePairs, jp = idx % kRopePairs;
        float sn = 0.f, cs = 1.f;
        if (i < rows_t) {
          const float ang = static_cast<float>(__ldg(a.positions + pt + i)) * __ldg(a.freqs + jp);
          sincosf(ang, &sn, &cs);
        }
        rope_tab[idx] = make_float2(cs, sn);
      }
    }
    if constexpr (EPI == kEpiSwiGLU) {
      for (int i = tid; i < BN; i += T) rw_s[i] = i < rows_t ? __ldg(a.route_weight + pt + i) : 0.f;
    }
    __syncthreads();

    const int nsel = mma_width(rows_t);  // <= BN (BN is one of the widths)

#pragma unroll
    for (int i = 0; i < C::kAcc; ++i) acc[i] = 0.f;

    // the stage's scale word of this thread's chunk j (FP8: the warp's, FP4: the thread's)
    auto scale_slot = [&](int j) { return FMT == kFmtFP8 ? warp : j * T + tid; };
    // copies the scale word holding element si of the scale tensor (zeros if !ok). fp32: the
    // scale itself. e8m0: the 4-byte aligned word holding byte si (the consumer picks byte
    // si & 3); the last word of a scale tensor whose length is not a multiple of 4 is read
    // byte by byte: no read reaches past w_scale_bytes.
    auto copy_scale = [&](int64_t si, bool ok, uint32_t s_dst) {
      const char* s_base = static_cast<const char*>(a.w_scale);
      const int64_t s_off = a.scale_fp32 ? si * 4 : (si & ~int64_t{3});
      if (!ok || s_off + 4 <= a.w_scale_bytes) {
        cp_async4(s_dst, ok ? s_base + s_off : dummy, ok ? 4 : 0);
      } else {
        const auto byte = static_cast<uint32_t>(
            __ldg(reinterpret_cast<const unsigned char*>(s_base) + si));
        sts32(s_dst, byte << (8 * static_cast<int>(si & 3)));
      }
    };
    auto load_step = [&](int kt, int stage) {
      const uint32_t sb = base + stage * C::kStageStride;
      const bool bk_ok = kt * kBK + b_col * 8 < K;
#pragma unroll
      for (int j = 0; j < C::kBChunks; ++j) {
        const bool ok = b_ok[j] && bk_ok;
        cp_async16(sb + b_dst[j], ok ? b_src[j] + kt * 128 : dummy, ok ? 16 : 0);
      }
      if constexpr (FMT != kFmtBF16) {
        // pair fill on even steps: k steps kt and kt + 1 (zero-filled past K) into the raw
        // tiles of `stage` and the next stage. The next stage's raw tile last held step
        // kt + 1 - S, converted before the barrier of step kt - D at the latest (D <= S - 1),
        // and this fill is issued after that barrier.
        if ((kt & 1) == 0) {
          const int st1 = stage + 1 == S ? 0 : stage + 1;
          const int st = f_g == 0 ? stage : st1;
          const uint32_t dst = base + st * C::kStageStride + C::kBBytes + f_dst;
          if constexpr (FMT == kFmtFP8) {
            // the warp's scale word of both steps (one 128-wide k block), lane 0 alone into
            // each stage's slot: a 4-byte copy of one global word by all 32 lanes costs 32
            // shared-memory wavefronts (ncu: ~88% of the FP8 kernel's excess wavefronts).
            // Lane 0's rows are the warp's first: none valid if they are not.
            if (lane == 0) {
              const int64_t si = s_idx[0] + kt * kBK / 128;
              const uint32_t slot = C::kBBytes + C::kARawBytes + scale_slot(0) * 4;
              copy_scale(si, a_ok[0], base + stage * C::kStageStride + slot);
              copy_scale(si, a_ok[0], base + st1 * C::kStageStride + slot);
            }
          }
          const bool k_ok = kt * kBK + f_c * C::kElemsPerChunk < K;
#pragma unroll
          for (int j = 0; j < C::kAChunks; ++j) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const bool ok = f_ok[j][h] && k_ok;
              cp_async16(dst + j * T * 16 + h * C::kFillRows * C::kRawRow,
                         ok ? f_src[j][h] + kt * C::kRawRow : dummy, ok ? 16 : 0);
            }
          }
        }
      }
      const int kel = kt * kBK + a_col * C::kElemsPerChunk;
#pragma unroll
      for (int j = 0; j < C::kAChunks; ++j) {
        const bool ok = a_ok[j] && kel < K;
        if constexpr (FMT == kFmtBF16) {
          cp_async16(sb + C::kBBytes + a_dst[j], ok ? a_src[j] + kt * C::kRawRow : dummy,
                     ok ? 16 : 0);
        }
        // FP4: every thread the scale word of its own chunk, every step
        if constexpr (FMT == kFmtFP4) {
          copy_scale(s_idx[j] + kel / 32, ok, sb + C::kBBytes + C::kARawBytes + scale_slot(j) * 4);
        }
      }
    };

    // ---- pipeline ----
    constexpr int D = C::kPrefetch;
#pragma unroll 1
    for (int s = 0; s < D; ++s) {
      if (s < KT) load_step(s, s);
      cp_async_commit();
    }
#pragma unroll 1
    for (int kt = 0; kt < KT; ++kt) {
      const uint32_t sb = base + (kt % S) * C::kStageStride;
      const uint32_t abf = abf_base + (kt % C::kABufs) * C::kABf16Bytes;
      cp_async_wait<D - 1>();  // this thread's chunks of step kt have landed
      // FP8 / FP4: the raw rows of step kt came from the warp's pair fill (any lane) and the
      // FP8 scale words from lane 0; all landed (every lane waited above): __syncwarp makes
      // them visible across the warp
      if constexpr (FMT != kFmtBF16) __syncwarp();
      if constexpr (FMT != kFmtBF16) {
        const int kel = kt * kBK + a_col * C::kElemsPerChunk;
        // the scale of a stage word: fp32 as is, e8m0 the byte of element si
        auto decode_scale = [&](uint32_t sw, int64_t si) {
          return a.scale_fp32 ? __uint_as_float(sw)
                              : e8m0_to_f32((sw >> (8 * static_cast<int>(si & 3))) & 0xFFu);
        };
        float s_warp = 0.f;  // FP8: the warp's scale of step kt
        if constexpr (FMT == kFmtFP8) {
          s_warp = decode_scale(lds32(sb + C::kBBytes + C::kARawBytes + scale_slot(0) * 4),
                                s_idx[0] + kt * kBK / 128);
        }
        // FP8 fast conversion (bf16x2 multiply; warp-uniform): a power of two (every e8m0
        // scale; a float32 scale may be any value) in range; false for NaN, inf, 0
        const bool fp8_fast = pow2_in(s_warp, 0x1p-117f, 0x1p118f);
        const uint32_t s2_warp = pack_bf16x2(s_warp, s_warp);  // exact where fp8_fast
#pragma unroll
        for (int j = 0; j < C::kAChunks; ++j) {
          const int r = (tid + j * T) / C::kRawChunks;
          // (pair fill: an odd step's row r sits at r ^ 1)
          const uint4 q = lds128(sb + C::kBBytes + (r ^ (kt & 1)) * C::kRawRow + a_col * 16);
          float s;
          if constexpr (FMT == kFmtFP8) {
            // a zero-filled chunk (row past `rows` or k past K) gets 0, not the warp's scale:
            // exactly zero even where that scale is inf or NaN
            s = a_ok[j] && kel < K ? s_warp : 0.f;
          } else {
            // FP4: the chunk's own word (zero-filled with its chunk)
            s = decode_scale(lds32(sb + C::kBBytes + C::kARawBytes + scale_slot(j) * 4),
                             s_idx[j] + kel / 32);
          }
          if constexpr (FMT == kFmtFP8) {
            // 16 values -> bf16 chunks 2 * a_col and 2 * a_col + 1 of row r. Fast path: a
            // zero-filled chunk is 0 x s2 = 0 (s2 finite there)
            uint4 lo, hi;
            if (fp8_fast) {
              fp8x16_to_bf16x16(q, s_warp, s2_warp, true, lo, hi);
            } else {
              fp8x16_to_bf16x16(q, s, s2_warp, false, lo, hi);
            }
            sts128(abf + r * 128 + ((((2 * a_col) ^ r) & 7) << 4), lo);
            sts128(abf + r * 128 + ((((2 * a_col + 1) ^ r) & 7) << 4), hi);
          } else {
            // 32 values -> bf16 chunks 4 * a_col .. 4 * a_col + 3 of row r
            // a power of two in range (float32 scales need not be): false for NaN, inf, 0
            const bool fast = pow2_in(s, 0x1p-118f, 0x1p118f);
            const uint32_t s2 = pack_bf16x2(s, s);  // exact where fast
            sts128(abf + r * 128 + ((((4 * a_col) ^ r) & 7) << 4), fp4x8_to_bf16x8(q.x, s, s2, fast));
            sts128(abf + r * 128 + ((((4 * a_col + 1) ^ r) & 7) << 4), fp4x8_to_bf16x8(q.y, s, s2, fast));
            sts128(abf + r * 128 + ((((4 * a_col + 2) ^ r) & 7) << 4), fp4x8_to_bf16x8(q.z, s, s2, fast));
            sts128(abf + r * 128 + ((((4 * a_col + 3) ^ r) & 7) << 4), fp4x8_to_bf16x8(q.w, s, s2, fast));
          }
        }
      }
      if constexpr (ROPE) {
        if ((kt * kBK) % a.head_dim == a.head_dim - kBK) {
#pragma unroll
          for (int j = 0; j < C::kBChunks; ++j) {
            const int br = (tid + j * T) >> 3;
            const uint32_t addr = sb + b_dst[j];
            uint4 v = lds128(addr);
            uint32_t* w = reinterpret_cast<uint32_t*>(&v);
#pragma unroll
            for (int q = 0; q < 4; ++q) {  // pairs 4 * b_col + q of the 32 rope pairs
              w[q] = rope_inv_bf16x2(w[q], rope_tab[br * kRopePairs + b_col * 4 + q]);
            }
            sts128(addr, v);
          }
        }
      }
      fence_proxy_async();
      if constexpr (!OVL) {
        wgmma_wait_all();  // MMAs of step kt - 1 done (this warpgroup)
        fence_regs(acc);
      }
      // serial: step kt's tiles complete and every warpgroup's MMAs of step kt - 1 done;
      // overlapped: every warpgroup's MMAs of step kt - 2 done (wait_group 1 below)
      __syncthreads();
      const uint32_t a_tile = (FMT == kFmtBF16 ? sb + C::kBBytes : abf) + wg * 64 * 128;
      mma_step_n<BN>(nsel, acc, a_tile, sb);
      if constexpr (OVL) wgmma_wait_1();  // step kt - 1 done; step kt may still run
      const int nk = kt + D;  // refills the stage of step kt - 1 (serial) / kt - 2 (overlapped)
      if (nk < KT) load_step(nk, nk % S);
      cp_async_commit();
    }
    wgmma_wait_all();
    fence_regs(acc);
    cp_async_wait<0>();
    __syncthreads();

    // ---- epilogue: registers -> shared tile [BN rows][kFeat] bf16 -> global ----
    uint8_t* et = smem;
    epi_stage<EPI, BN, C::kEpiStride>(acc, et, wg, w4, g, tg, a.swiglu_limit,
                                      [&](int c) { return rw_s[c]; });
    __syncthreads();
    epi_store<C::kFeat, C::kEpiStride>(a, et, unit, tid, T);
    __syncthreads();  // the next unit's loads overwrite the staged tile
  }
#endif  // DSV4_GG_WGMMA
}

// Runs one variant: grid = min(upper bound of the unit count, blocks resident at once).
template <int FMT, int EPI, bool ROPE, int NWG, int BN, int SMEM_LIMIT, bool OVL>
cudaError_t launch_variant(const GroupedGemmArgs& a, int num_sms, cudaStream_t stream) {
  using C = Cfg<FMT, EPI, ROPE, NWG, BN, SMEM_LIMIT, OVL>;
  const int64_t n_fb = (a.rows + C::kFeat - 1) / C::kFeat;
  const int64_t units = unit_bound(a, n_fb, BN);
  if (units > INT_MAX) return cudaErrorInvalidValue;
  if (units == 0) return cudaSuccess;
  const int64_t resident = static_cast<int64_t>(num_sms) * C::kMinBlocks;
  const int grid = static_cast<int>(units < resident ? units : resident);
  auto* fn = &grouped_gemm_kernel<C, FMT, EPI, ROPE, NWG, BN, OVL>;
  cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem);
  if (err != cudaSuccess) return err;
  // all of the SM's shared memory as shared memory (three decode blocks need 3 x 76 KB)
  err = cudaFuncSetAttribute(fn, cudaFuncAttributePreferredSharedMemoryCarveout,
                             cudaSharedmemCarveoutMaxShared);
  if (err != cudaSuccess) return err;
  fn<<<grid, C::kThreads, C::kSmem, stream>>>(a);
  return cudaGetLastError();
}

// The tile variants of one (format, epilogue, RoPE) combination; the overlapped pipeline
// exists for the two-warpgroup (tensor-core bound) tiles.
template <int FMT, int EPI, bool ROPE>
cudaError_t launch_tile(const GroupedGemmArgs& a, GemmTile tile, bool overlap, int num_sms,
                        cudaStream_t stream) {
  switch (tile) {
    case GemmTile::kDecode:
      return launch_variant<FMT, EPI, ROPE, 1, 16, kSmem3PerSm, false>(a, num_sms, stream);
    case GemmTile::kDecodeDeep:
      return launch_variant<FMT, EPI, ROPE, 1, 16, kSmemLimit, false>(a, num_sms, stream);
    case GemmTile::kMedium:
      return overlap ? launch_variant<FMT, EPI, ROPE, 2, 64, kSmemLimit, true>(a, num_sms, stream)
                     : launch_variant<FMT, EPI, ROPE, 2, 64, kSmemLimit, false>(a, num_sms, stream);
    case GemmTile::kLarge:
      return overlap ? launch_variant<FMT, EPI, ROPE, 2, 128, kSmemLimit, true>(a, num_sms, stream)
                     : launch_variant<FMT, EPI, ROPE, 2, 128, kSmemLimit, false>(a, num_sms, stream);
    case GemmTile::kHuge:
      // FP8 weights + the 64 KB RoPE table leave room for two stages only: serial there
      if constexpr (!(ROPE && FMT != kFmtBF16)) {
        if (overlap) return launch_variant<FMT, EPI, ROPE, 2, 256, kSmemLimit, true>(a, num_sms, stream);
      }
      return launch_variant<FMT, EPI, ROPE, 2, 256, kSmemLimit, false>(a, num_sms, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// Per-format entry points (one .cu file each, compiled in parallel).
cudaError_t launch_bf16(const GroupedGemmArgs& a, GemmTile tile, bool overlap, int num_sms,
                        cudaStream_t s);
cudaError_t launch_fp8(const GroupedGemmArgs& a, GemmTile tile, bool overlap, int num_sms,
                       cudaStream_t s);
cudaError_t launch_fp4(const GroupedGemmArgs& a, GemmTile tile, bool overlap, int num_sms,
                       cudaStream_t s);
// FP8 activations x FP8 / FP4 weights on FP8 tensor cores (grouped_gemm_qmma.cu)
cudaError_t launch_qmma(const GroupedGemmArgs& a, GemmTile tile, int num_sms, cudaStream_t s);

}  // namespace gg
}  // namespace dsv4
