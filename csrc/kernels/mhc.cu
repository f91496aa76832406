// dsv4 mHC kernels: hc_pre (RMS + projection + sigmoid/Sinkhorn + collapse), hc_post and the
// head collapse. Contract: include/dsv4/mhc.h; semantics: python/dsv4/layers/mhc.py.
//
// hc_pre / head, two phases:
//  1. "mix": the projection fn · x̂ ([tokens, 4·dim] x [24 or 4, 4·dim]ᵀ) and Σ x̂² as a split-K
//     GEMM on tensor cores. A CTA owns 64 tokens and a range of 4·dim: x tiles (bf16) and fn
//     tiles (fp32) arrive by cp.async (double buffer); each fn tile is split once into three
//     bf16 tiles hi/mid/lo (hi + mid + lo = fn to 24 bits), and every warp runs
//     mma.sync m16n8k16 over its 16 tokens for each of the three, so the products equal fp32
//     products. Σ x̂² comes from the A fragments in registers. Partial sums go to the
//     workspace, [split][token][32] (columns 0..23 mixes, 31 Σ x̂²).
//  2. "finish", one CTA per token: the partials are summed in a fixed split order
//     (deterministic), a half-warp computes r = rsqrt(mean + eps), pre, post and the Sinkhorn
//     projection (one comb entry per lane; row / column sums by xor shuffles), then all threads
//     write u = Σ_i pre_i x_i (16-byte vectors).
//  Prefill runs the two phases on chunks of 512 tokens, so that phase 2 re-reads x from L2.
//  By default (DSV4_MHC_ONE_PASS=0 selects the chunked path), prefill at dim 1024 / 2048 /
//  4096 runs neither: the "wide" kernel below does both phases in one pass over x (a 16-CTA
//  cluster per 32-token tile, x kept in shared memory, the cross-CTA sums pipelined a tile
//  behind through st.async and mbarriers).
//  The one-pass kernel runs above kMhcDecodeMaxTokens = 64 tokens; up to 64, above the decode
//  kernel's range (below), the chunked path runs (one chunk; measured faster there than the
//  one-pass kernel, 2026-12-06).
//  Decode (mhc_pre up to kMhcPreDecodeTokens = 16 tokens, mhc_head up to
//  kMhcHeadDecodeTokens = 8) runs mhc_decode_kernel (below): ONE launch (after zeroing its
//  arrival counters) whose projection is a split GEMV on CUDA cores over ~2 CTAs per SM, and
//  whose tail is spread over up to 8 token groups, the Sinkhorn beside the collapse.
//  Since 2026-12 ("v2", the default): the decode kernel is launched cooperatively and its CTAs
//  meet at the grid barrier of cooperative groups instead of arrival counters, so the separate
//  zeroing launch is gone; its Sinkhorn fetches the three partners of a row / column sum at
//  once (quad_sum): the same operands in the same order, so v2 gives v1's bits.
//  DSV4_MHC_DECODE_IMPL=v1 runs the previous kernel (zeroing launch + counters); so does a call
//  whose grid cannot be co-resident, or on a device that refused a cooperative launch (a green
//  context, MPS with fewer SMs than the device has: run_decode).
//  DSV4_MHC_DECODE=all runs it up to 64 tokens for both ops (for measuring and tests);
//  DSV4_MHC_DECODE=old never: then tokens <= 8 run one mix launch whose last CTA (arrival
//  counter) runs phase 2 for all its tokens at once (split sums spread over the CTA, one
//  token's Sinkhorn per half-warp, the collapse of every token spread over the CTA).
// Every multiply and add of the epilogues is an explicitly rounded __fmul_rn / __fadd_rn (no
// FMA contraction) in the order of the PyTorch reference.
// hc_post: one elementwise pass, 16-byte vectors, one thread per 8 columns of a token.
#include "dsv4/mhc.h"

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cuda_bf16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <atomic>

#include "moe_mma.cuh"
#include "cluster_ptx.cuh"
#include "own_error.cuh"
#include "zero_fill.cuh"

namespace dsv4 {
namespace {

using namespace moe_detail;
namespace cg = cooperative_groups;

constexpr int kHc = static_cast<int>(kMhcStreams);
constexpr int kBM = 64;                 // tokens per mix CTA (4 warps x m16)
constexpr int kBK = 64;                 // 4·dim columns per pipeline stage
constexpr int kXPitch = kBK + 8;        // bf16 elements per smem row (144 B)
constexpr int kFPitch = kBK + 8;        // floats per smem fn row (288 B)
constexpr int kThreads = 128;
constexpr int kPartCols = 32;           // partial row: mixes [0, 24), Σ x̂² at kSumsqCol
constexpr int kSumsqCol = 31;
constexpr int64_t kChunkTokens = 512;   // prefill chunk (x of a chunk stays in L2 for phase 2)
constexpr int64_t kMinTilesPerSplit = 4;

struct MhcPlan {
  bool fused;
  int64_t chunk, m_tiles, k_tiles, splits, tiles_per_split;
};

MhcPlan make_plan(int64_t tokens, int64_t dim, int num_sms) {
  MhcPlan p;
  p.fused = tokens <= kMhcMaxFusedTokens;
  p.chunk = p.fused ? tokens : (tokens < kChunkTokens ? tokens : kChunkTokens);
  p.m_tiles = (p.chunk + kBM - 1) / kBM;
  p.k_tiles = (kHc * dim + kBK - 1) / kBK;
  // ~2 CTAs per SM (a 2-stage pipeline per CTA: more CTAs keep more bytes in flight)
  int64_t s = (2 * static_cast<int64_t>(num_sms) + p.m_tiles - 1) / p.m_tiles;
  const int64_t max_s = p.k_tiles / kMinTilesPerSplit > 0 ? p.k_tiles / kMinTilesPerSplit : 1;
  if (s > max_s) s = max_s;
  if (s < 1) s = 1;
  p.tiles_per_split = (p.k_tiles + s - 1) / s;
  p.splits = (p.k_tiles + p.tiles_per_split - 1) / p.tiles_per_split;
  return p;
}

int sm_count(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0)
    n = 132;
  return n;
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t addr, uint32_t& r0, uint32_t& r1) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(addr));
}

__device__ __forceinline__ float bf16_lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t v) { return __uint_as_float(v & 0xFFFF0000u); }
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(a))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(b))) << 16);
}
// torch's sigmoid: 1 / (1 + exp(-z)).
__device__ __forceinline__ float sigmoid(float z) {
  return __fdiv_rn(1.f, __fadd_rn(1.f, expf(-z)));
}

// fn value -> three bf16 terms, hi + mid + lo == v to 24 bits (the projection's B operand).
__device__ __forceinline__ void split3(float v, __nv_bfloat16& hi, __nv_bfloat16& mid,
                                       __nv_bfloat16& lo) {
  hi = __float2bfloat16_rn(v);
  const float r1 = __fsub_rn(v, __bfloat162float(hi));
  mid = __float2bfloat16_rn(r1);
  const float r2 = __fsub_rn(r1, __bfloat162float(mid));
  lo = __float2bfloat16_rn(r2);
}

// Σ x² of an m16k16 A fragment (ldmatrix x4 order): row g into sq0, row g + 8 into sq1.
__device__ __forceinline__ void sumsq_frag(uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                           float& sq0, float& sq1) {
  const float v[8] = {bf16_lo(a0), bf16_hi(a0), bf16_lo(a2), bf16_hi(a2),
                      bf16_lo(a1), bf16_hi(a1), bf16_lo(a3), bf16_hi(a3)};
#pragma unroll
  for (int i = 0; i < 4; ++i) sq0 = __fmaf_rn(v[i], v[i], sq0);
#pragma unroll
  for (int i = 4; i < 8; ++i) sq1 = __fmaf_rn(v[i], v[i], sq1);
}

// r = rsqrt(mean(x̂²) + norm_eps) from the token's Σ x̂² over its 4·dim values.
__device__ __forceinline__ float mix_rstd(int64_t dim, float norm_eps, float sumsq) {
  const float inv_k = 1.f / static_cast<float>(kHc * dim);
  return 1.f / sqrtf(__fadd_rn(__fmul_rn(sumsq, inv_k), norm_eps));
}

// pre_i = sigmoid(scale0 * (mix_i * r) + base_i) + eps.
__device__ __forceinline__ float pre_value(float mix, float r, float scale0, float base,
                                           float eps) {
  const float m = __fmul_rn(mix, r);
  return __fadd_rn(sigmoid(__fadd_rn(__fmul_rn(m, scale0), base)), eps);
}

// u = Σ_i p_i x_i for 8 columns (16-byte vectors of the 4 streams): products rounded, summed in
// stream order, then rounded to bf16.
__device__ __forceinline__ uint4 collapse8(float p0, float p1, float p2, float p3, const uint4& v0,
                                           const uint4& v1, const uint4& v2, const uint4& v3) {
  const uint32_t w0[4] = {v0.x, v0.y, v0.z, v0.w}, w1[4] = {v1.x, v1.y, v1.z, v1.w};
  const uint32_t w2[4] = {v2.x, v2.y, v2.z, v2.w}, w3[4] = {v3.x, v3.y, v3.z, v3.w};
  uint32_t o[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    float lo = __fmul_rn(p0, bf16_lo(w0[q]));
    lo = __fadd_rn(lo, __fmul_rn(p1, bf16_lo(w1[q])));
    lo = __fadd_rn(lo, __fmul_rn(p2, bf16_lo(w2[q])));
    lo = __fadd_rn(lo, __fmul_rn(p3, bf16_lo(w3[q])));
    float hi = __fmul_rn(p0, bf16_hi(w0[q]));
    hi = __fadd_rn(hi, __fmul_rn(p1, bf16_hi(w1[q])));
    hi = __fadd_rn(hi, __fmul_rn(p2, bf16_hi(w2[q])));
    hi = __fadd_rn(hi, __fmul_rn(p3, bf16_hi(w3[q])));
    o[q] = pack2(lo, hi);
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

// One row h (0: fragment row g, 1: g + 8) of an m16 x (NT x n8) accumulator tile into a partial
// row: this lane's mix columns j·8 + c2, j·8 + c2 + 1 (those < kNReal), and Σx̂² at sumsq_col
// from the lane that holds it.
template <int NT, int kNReal>
__device__ __forceinline__ void store_frag_row(float* row, const float (&acc)[NT][4], int h,
                                               int c2, bool sumsq_lane, float sq, int sumsq_col) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int n = j * 8 + c2;
    if (n < kNReal) row[n] = acc[j][2 * h];
    if (n + 1 < kNReal) row[n + 1] = acc[j][2 * h + 1];
  }
  if (sumsq_lane) row[sumsq_col] = sq;
}

struct MixArgs {
  const __nv_bfloat16* x;  // first token of the chunk
  int64_t x_stride;        // token stride (elements)
  const float* fn;         // [rows, K]
  int64_t K;               // 4 * dim
  int64_t tokens;          // tokens of this launch
  int splits, tiles_per_split;
  int64_t k_tiles;
  float* part;             // [splits, tokens, kPartCols]
};

struct FinishArgs {
  const __nv_bfloat16* x;  // first token of the chunk
  int64_t x_stride, dim, tokens;
  const float* part;
  int splits;
  const float* scale;
  const float* base;
  float norm_eps, eps;
  int iters;
  __nv_bfloat16* u;        // first output row of the chunk
  int64_t u_stride;
  float* post;             // [tokens, 4] (chunk) or null (head)
  float* comb;             // [tokens, 16] (chunk) or null (head)
};

// Phase 2 scratch (3.2 KB): the fused path lays it over the mix kernel's x tiles.
constexpr int kMaxFinish = static_cast<int>(kMhcMaxFusedTokens);
struct FinishSmem {
  float4 red[kThreads];              // one float4 of split sums per thread
  float tot[kMaxFinish][kPartCols];  // the summed partial row of each token
  float pre[kMaxFinish][kHc];
};

// Sum and max over a comb row (m = 1: lanes 4j .. 4j + 3) or column (m = 4: lanes k, k + 4, ..)
// of a half-warp, in the order of the xor tree "v + shfl(v, m), then + shfl(., 2m)": lane q
// gets (v_q + v_q^m) + (v_q^2m + v_q^3m), the partner q ^ 2m having formed the right-hand pair
// in that operand order. The tree waits for two shuffles one after the other; here the three
// partners' values are fetched at once (one shuffle latency, ~25-30 cycles, instead of two
// plus an add), the same operands in the same order, so the same bits on every lane.
__device__ __forceinline__ float quad_sum(float v, int m) {
  const float a = __shfl_xor_sync(0xffffffffu, v, m);
  const float b = __shfl_xor_sync(0xffffffffu, v, 2 * m);
  const float c = __shfl_xor_sync(0xffffffffu, v, 3 * m);
  return __fadd_rn(__fadd_rn(v, a), __fadd_rn(b, c));
}
__device__ __forceinline__ float quad_max(float v, int m) {
  const float a = __shfl_xor_sync(0xffffffffu, v, m);
  const float b = __shfl_xor_sync(0xffffffffu, v, 2 * m);
  const float c = __shfl_xor_sync(0xffffffffu, v, 3 * m);
  return fmaxf(fmaxf(v, a), fmaxf(b, c));
}

// The coefficients of one token, by a half-warp (l = lane & 15; every lane of the warp must
// call it: the shuffles are full-warp, xor 1..12 stays in the half). `store` false: a lane of
// a half without a token (its results are dropped). `pre` null: pre is not stored (the decode
// finisher computes it before, for every token at once). kQuad: the row / column sums and the
// row max by quad_sum / quad_max (one shuffle latency per sum; the decode kernel's default,
// whose tail this Sinkhorn is); false: the xor tree (two dependent shuffles per sum; the other
// paths and DSV4_MHC_DECODE_IMPL=v1). Both give the same bits.
template <int NT, bool kQuad = false>
__device__ __forceinline__ void token_coefficients(const FinishArgs& a, const float* tot,
                                                   float* pre, int64_t t, int l, bool store) {
  const float r = mix_rstd(a.dim, a.norm_eps, tot[kSumsqCol]);
  if (store && pre != nullptr && l < kHc)
    pre[l] = pre_value(tot[l], r, a.scale[0], a.base[l], a.eps);
  if constexpr (NT == 3) {
    if (store && l >= kHc && l < 2 * kHc) {  // post_i = 2 sigmoid(scale1 * m + base)
      const float m = __fmul_rn(tot[l], r);
      a.post[t * kHc + (l - kHc)] =
          __fmul_rn(2.f, sigmoid(__fadd_rn(__fmul_rn(m, a.scale[1]), a.base[l])));
    }
    // comb[j][k], l = 4 j + k; row = lanes xor 1, 2; column = lanes xor 4, 8.
    const float m = __fmul_rn(tot[2 * kHc + l], r);
    const float L = __fadd_rn(__fmul_rn(m, a.scale[2]), a.base[2 * kHc + l]);
    if constexpr (kQuad) {
      const float ex = expf(__fsub_rn(L, quad_max(L, 1)));
      float c = __fadd_rn(__fdiv_rn(ex, quad_sum(ex, 1)), a.eps);
      c = __fdiv_rn(c, __fadd_rn(quad_sum(c, 4), a.eps));
      for (int it = 1; it < a.iters; ++it) {
        c = __fdiv_rn(c, __fadd_rn(quad_sum(c, 1), a.eps));
        c = __fdiv_rn(c, __fadd_rn(quad_sum(c, 4), a.eps));
      }
      if (store) a.comb[t * kHc * kHc + l] = c;
      return;
    }
    float mx = fmaxf(L, __shfl_xor_sync(0xffffffffu, L, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float ex = expf(__fsub_rn(L, mx));
    float rs = __fadd_rn(ex, __shfl_xor_sync(0xffffffffu, ex, 1));
    rs = __fadd_rn(rs, __shfl_xor_sync(0xffffffffu, rs, 2));
    float c = __fadd_rn(__fdiv_rn(ex, rs), a.eps);
    float cs = __fadd_rn(c, __shfl_xor_sync(0xffffffffu, c, 4));
    cs = __fadd_rn(cs, __shfl_xor_sync(0xffffffffu, cs, 8));
    c = __fdiv_rn(c, __fadd_rn(cs, a.eps));
    for (int it = 1; it < a.iters; ++it) {
      rs = __fadd_rn(c, __shfl_xor_sync(0xffffffffu, c, 1));
      rs = __fadd_rn(rs, __shfl_xor_sync(0xffffffffu, rs, 2));
      c = __fdiv_rn(c, __fadd_rn(rs, a.eps));
      cs = __fadd_rn(c, __shfl_xor_sync(0xffffffffu, c, 4));
      cs = __fadd_rn(cs, __shfl_xor_sync(0xffffffffu, cs, 8));
      c = __fdiv_rn(c, __fadd_rn(cs, a.eps));
    }
    if (store) a.comb[t * kHc * kHc + l] = c;
  }
}

// Phase 2, step 1: tot[i][c] = Σ over the splits of the partial (token t0 + i, column c), for
// the n <= kMaxFinish tokens, by the whole CTA (kT threads; ends with __syncthreads). Pair =
// (token, 4 columns); the kT / pairs groups take consecutive split ranges, each summed in split
// order (float4 loads, 8 in flight), then the group sums are added in group order: a fixed
// order, so the result is deterministic.
template <int kT>
__device__ void sum_split_partials(const FinishArgs& a, float4* red, float (*tot)[kPartCols],
                                   int64_t t0, int n) {
  static_assert(kT % (kPartCols / 4 * kMaxFinish) == 0, "whole groups of (token, 4-column) pairs");
  const int tid = threadIdx.x;
  const int pairs = n * (kPartCols / 4);
  const int groups = kT / pairs;
  const int per = (a.splits + groups - 1) / groups;
  const int64_t stride = a.tokens * (kPartCols / 4);  // float4s per split
  if (tid < groups * pairs) {
    const int g = tid / pairs, pr = tid % pairs;
    const int s_lo = g * per, s_hi = min(a.splits, s_lo + per);
    const float4* src = reinterpret_cast<const float4*>(a.part) + t0 * (kPartCols / 4) + pr;
    float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
    int sp = s_lo;
    for (; sp + 8 <= s_hi; sp += 8) {
      float4 v[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = __ldcg(src + (sp + i) * stride);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        s.x = __fadd_rn(s.x, v[i].x);
        s.y = __fadd_rn(s.y, v[i].y);
        s.z = __fadd_rn(s.z, v[i].z);
        s.w = __fadd_rn(s.w, v[i].w);
      }
    }
    if (sp < s_hi) {  // the last < 8 splits: loads issued together, the adds in split order
      float4 v[7];
#pragma unroll
      for (int i = 0; i < 7; ++i)
        v[i] = sp + i < s_hi ? __ldcg(src + (sp + i) * stride) : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int i = 0; i < 7; ++i) {
        if (sp + i < s_hi) {
          s.x = __fadd_rn(s.x, v[i].x);
          s.y = __fadd_rn(s.y, v[i].y);
          s.z = __fadd_rn(s.z, v[i].z);
          s.w = __fadd_rn(s.w, v[i].w);
        }
      }
    }
    red[tid] = s;
  }
  __syncthreads();
  for (int e = tid; e < n * kPartCols; e += kT) {
    const int i = e / kPartCols, c = e % kPartCols;
    const float* r = reinterpret_cast<const float*>(red);
    float v = r[i * kPartCols + c];  // group 0: pair i * 8 + c / 4, component c % 4
    for (int g = 1; g < groups; ++g) v = __fadd_rn(v, r[(g * pairs) * 4 + i * kPartCols + c]);
    tot[i][c] = v;
  }
  __syncthreads();
}

// Phase 2, last step: u = Σ_i pre_i x_i of tokens [t0, t0 + n) (products rounded, summed in
// stream order), 8 columns per item, the items spread over `nthreads` threads (this one is
// `tid` of them). Items go in batches of kCollapseBatch per thread, every load of a batch
// issued before its first store (the compiler cannot move x loads above u stores that might
// alias them, so a plain loop waits one memory round trip per item).
constexpr int kCollapseBatch = 4;
template <typename Index>  // int when the item count fits (fast division), else int64_t
__device__ __forceinline__ void collapse_items(const FinishArgs& a, const float (*pre)[kHc],
                                               int64_t t0, Index n_chunks, Index items, int tid,
                                               int nthreads) {
  const Index step = static_cast<Index>(nthreads);
  for (Index e0 = tid; e0 < items; e0 += kCollapseBatch * step) {
    uint4 v[kCollapseBatch][kHc];
    int tok[kCollapseBatch];
    Index chunk[kCollapseBatch];
#pragma unroll
    for (int q = 0; q < kCollapseBatch; ++q) {
      const Index e = e0 + q * step;
      tok[q] = static_cast<int>(e / n_chunks);
      chunk[q] = e - static_cast<Index>(tok[q]) * n_chunks;
      if (e < items) {
        const __nv_bfloat16* xt =
            a.x + (t0 + tok[q]) * a.x_stride + static_cast<int64_t>(chunk[q]) * 8;
#pragma unroll
        for (int s = 0; s < kHc; ++s) v[q][s] = *reinterpret_cast<const uint4*>(xt + s * a.dim);
      }
    }
#pragma unroll
    for (int q = 0; q < kCollapseBatch; ++q) {
      if (e0 + q * step < items) {
        const int i = tok[q];
        __nv_bfloat16* ut = a.u + (t0 + i) * a.u_stride + static_cast<int64_t>(chunk[q]) * 8;
        *reinterpret_cast<uint4*>(ut) =
            collapse8(pre[i][0], pre[i][1], pre[i][2], pre[i][3], v[q][0], v[q][1], v[q][2],
                      v[q][3]);
      }
    }
  }
}

__device__ __forceinline__ void collapse_tokens(const FinishArgs& a, const float (*pre)[kHc],
                                                int64_t t0, int n, int tid, int nthreads) {
  const int64_t n_chunks = a.dim / 8;
  const int64_t items = n * n_chunks;
  if (items + static_cast<int64_t>(kCollapseBatch) * nthreads <= INT_MAX)
    collapse_items<int>(a, pre, t0, static_cast<int>(n_chunks), static_cast<int>(items), tid,
                        nthreads);
  else
    collapse_items<int64_t>(a, pre, t0, n_chunks, items, tid, nthreads);
}

// Phase 2 for tokens [t0, t0 + n), 1 <= n <= kMaxFinish, by the whole CTA (kThreads threads;
// contains __syncthreads). NT = 3: hc_pre (24 mixes: pre, post, comb); NT = 1: head (4 mixes:
// pre only). All n tokens advance together, so the fused decode path costs about one token's
// latency, not n.
template <int NT>
__device__ void finish_tokens(const FinishArgs& a, FinishSmem& sm, int64_t t0, int n) {
  const int tid = threadIdx.x, lane = tid & 31, grp = tid >> 5;
  // 1. Sum the split partials (deterministic order).
  sum_split_partials<kThreads>(a, sm.red, sm.tot, t0, n);

  // 2. Coefficients: token 2 w + h on half h of warp w (up to 8 tokens at once).
  {
    const int i = 2 * grp + (lane >> 4);
    const bool have = i < n;
    const int ii = have ? i : 0;
    token_coefficients<NT>(a, sm.tot[ii], sm.pre[ii], t0 + ii, lane & 15, have);
  }
  __syncthreads();

  // 3. Collapse, all tokens' items spread over the CTA.
  collapse_tokens(a, sm.pre, t0, n, tid, kThreads);
}

// Phase 1 (and, when kFused, phase 2 of every token in the last CTA). grid = m_tiles * splits.
static_assert(kBM == 16 * (kThreads / 32), "one m16 tile per warp");
static_assert(kThreads % (kPartCols / 4 * kMaxFinish) == 0 && kMaxFinish <= 2 * kThreads / 32,
              "finish_tokens: whole groups of (token, 4-column) pairs; two tokens per warp");

template <int NT, bool kFused>
__global__ void __launch_bounds__(kThreads)
    mhc_mix_kernel(const MixArgs a, const FinishArgs f, int* counter) {
  constexpr int kRows = NT * 8;              // fn rows as n8 tiles (head: 4 real + 4 zero)
  constexpr int kNReal = NT == 3 ? 24 : 4;
  __shared__ __align__(16) __nv_bfloat16 sX[2][kBM][kXPitch];
  __shared__ __align__(16) float sF[2][kRows][kFPitch];
  __shared__ __align__(16) __nv_bfloat16 sB[3][kRows][kXPitch];

  const int split = static_cast<int>(blockIdx.x % a.splits);
  const int64_t m_tile = blockIdx.x / a.splits;
  const int64_t t0 = m_tile * kBM;
  const int64_t kt_begin = static_cast<int64_t>(split) * a.tiles_per_split;
  int64_t kt_end = kt_begin + a.tiles_per_split;
  if (kt_end > a.k_tiles) kt_end = a.k_tiles;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  auto load_stage = [&](int buf, int64_t kt) {
    const int64_t k0 = kt * kBK;
#pragma unroll
    for (int i = 0; i < (kBM * kBK / 8) / kThreads; ++i) {  // x: 64 rows x 8 chunks
      const int c = tid + i * kThreads;
      const int row = c >> 3, ch = c & 7;
      const int64_t t = t0 + row, k = k0 + ch * 8;
      const bool ok = t < a.tokens && k < a.K;
      cp_async16_zfill(smem_addr(&sX[buf][row][ch * 8]), ok ? a.x + t * a.x_stride + k : a.x, ok);
    }
#pragma unroll
    for (int i = 0; i < (kRows * kBK / 4) / kThreads; ++i) {  // fn: kRows x 16 chunks
      const int c = tid + i * kThreads;
      const int row = c >> 4, ch = c & 15;
      const int64_t k = k0 + ch * 4;
      const bool ok = row < kNReal && k < a.K;
      cp_async16_zfill(smem_addr(&sF[buf][row][ch * 4]), ok ? a.fn + row * a.K + k : a.fn, ok);
    }
    cp_async_commit();
  };

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[j][q] = 0.f;
  float sq0 = 0.f, sq1 = 0.f;  // Σ x² of rows g and g + 8 (partial over this lane's columns)

  if (kt_begin < kt_end) load_stage(0, kt_begin);
  for (int64_t kt = kt_begin; kt < kt_end; ++kt) {
    const int buf = static_cast<int>((kt - kt_begin) & 1);
    if (kt + 1 < kt_end) {
      load_stage(buf ^ 1, kt + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    // fn tile -> three bf16 tiles (hi + mid + lo == fn to 24 bits)
#pragma unroll
    for (int i = 0; i < kRows * kBK / kThreads; ++i) {
      const int e = tid + i * kThreads;
      const int n = e / kBK, k = e % kBK;
      split3(sF[buf][n][k], sB[0][n][k], sB[1][n][k], sB[2][n][k]);
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {
      uint32_t a0, a1, a2, a3;
      ldmatrix_x4(smem_addr(&sX[buf][warp * 16 + (lane & 15)][ks * 16 + (lane >> 4) * 8]), a0, a1,
                  a2, a3);
      sumsq_frag(a0, a1, a2, a3, sq0, sq1);
#pragma unroll
      for (int part = 0; part < 3; ++part) {
        uint32_t b[NT][2];
        if constexpr (NT >= 2) {  // n-tiles 0 and 1
          const int q = lane >> 3;
          ldmatrix_x4(smem_addr(&sB[part][(q >> 1) * 8 + (lane & 7)][ks * 16 + (q & 1) * 8]),
                      b[0][0], b[0][1], b[1][0], b[1][1]);
        }
        if constexpr (NT % 2 == 1) {  // the last (odd) n-tile
          constexpr int nt = NT - 1;
          ldmatrix_x2(smem_addr(&sB[part][nt * 8 + (lane & 7)][ks * 16 + ((lane >> 3) & 1) * 8]),
                      b[nt][0], b[nt][1]);
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_bf16_16816(acc[j], a0, a1, a2, a3, b[j][0], b[j][1]);
      }
    }
    __syncthreads();
  }

  sq0 += __shfl_xor_sync(0xffffffffu, sq0, 1);
  sq0 += __shfl_xor_sync(0xffffffffu, sq0, 2);
  sq1 += __shfl_xor_sync(0xffffffffu, sq1, 1);
  sq1 += __shfl_xor_sync(0xffffffffu, sq1, 2);
  const int g = lane >> 2, c2 = (lane & 3) * 2;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t t = t0 + warp * 16 + g + h * 8;
    if (t >= a.tokens) continue;
    float* row = a.part + (static_cast<int64_t>(split) * a.tokens + t) * kPartCols;
    store_frag_row<NT, kNReal>(row, acc, h, c2, (lane & 3) == 0, h == 0 ? sq0 : sq1, kSumsqCol);
  }

  if constexpr (kFused) {
    if (!arrive_last(counter, static_cast<int>(gridDim.x))) return;
    static_assert(sizeof(FinishSmem) <= sizeof(sX), "the finish scratch fits over sX");
    // sX is free: the last k-tile loop iteration ended with __syncthreads
    finish_tokens<NT>(f, *reinterpret_cast<FinishSmem*>(&sX[0][0][0]), 0,
                      static_cast<int>(a.tokens));
  }
}

template <int NT>
__global__ void __launch_bounds__(kThreads) mhc_finish_kernel(const FinishArgs f) {
  __shared__ FinishSmem sm;
  finish_tokens<NT>(f, sm, blockIdx.x, 1);
}

// ---------------------------------------------------------------------------------------------
// hc_pre / head at decode (1 <= tokens <= kMhcDecodeMaxTokens): ONE launch, short critical path
// ---------------------------------------------------------------------------------------------
// grid = groups x splits. The tokens form `groups` groups of `group` (<= 8) consecutive tokens
// (decode_group: T <= 4 one group, up to T = 32 groups of 4, then 8 groups). CTA (g, s)
// computes, for the tokens of group g, the projection and Σx̂² over the 4·dim columns
// [s·passes·128, (s + 1)·passes·128) on CUDA cores:
// warp w owns fn rows [NT·w, NT·w + NT) (head: row w; warps 4..7 have none), lane l the columns
// 4l .. 4l + 3 of each 128-column pass; fp32 FMAs (the product of a bf16 and an fp32 value is
// exact; the sums are fp32, like the fp32 reference's). The warp sums its 32 lanes by xor
// shuffles (the same tree on every lane, so a fixed order) and lane 0 stores the partial row
// [split][token][32] (mixes in columns 0..23, Σx̂² from warp 7 in column 31). Every CTA then
// takes a ticket on its group's counter (threadfence + atomicAdd, arrive_last); the last one of
// the group runs phase 2 for the group's tokens: the split sums in a fixed order
// (sum_split_partials), pre of every token, then at the same time the post / Sinkhorn
// coefficients (token_coefficients, one token per half-warp, on the first ceil(n / 2) warps)
// and the collapse u = Σ_i pre_i x_i (the other warps; x was just read, so it comes from L2).
// The 20 serial Sinkhorn iterations thus overlap the collapse instead of preceding it, and the
// tail of a launch is one group's, spread over `groups` SMs.
constexpr int kDecThreads = 256;
constexpr int kDecWarps = kDecThreads / 32;
constexpr int kDecCols = 128;                 // columns of one pass of a CTA (32 lanes x 4)
constexpr int kDecSumsqWarp = kDecWarps - 1;  // the warp that also sums x̂²

struct DecArgs {
  const __nv_bfloat16* x;  // [tokens] rows of 4·dim, token stride x_stride
  int64_t x_stride, K, tokens;
  const float* fn;         // [rows, K]
  int group, splits, passes;
  float* part;             // [splits][tokens][32] (f.part: the same, read by the finisher)
  int* counters;           // [groups], zero at launch (kGridSync false only)
  unsigned long long* stamps;  // null, or kDecStamps phase stamps (kGridSync true only)
  FinishArgs f;            // f.part [splits][tokens][32], f.splits = splits, f.tokens = tokens
};

// Phase stamps of the decode kernel (DSV4_MHC_DECODE_STAMPS=1, for measuring where its time
// goes; check_mhc prints them): the finisher of group 0 (CTA 0) writes %globaltimer (ns) into
// stamps[0..7] and clock64 into stamps[8..15] at: 0 its start, 1 its partials stored, 2 past
// the grid barrier, 3 the split sums done, 4 pre done, 5 the Sinkhorn done (lane 0 of warp 0),
// 6 the last collapse warp done (atomicMax), 7 unused (0).
constexpr int kDecStamps = 16;
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ void stamp(unsigned long long* s, int i) {
  s[i] = global_ns();
  s[8 + i] = static_cast<unsigned long long>(clock64());
}

struct DecSmem {
  float4 red[kDecThreads];           // split sums, one float4 per thread
  float tot[kMaxFinish][kPartCols];  // the summed partial row of each token of the group
  float pre[kMaxFinish][kHc];
};

// G: the largest group this instance takes (1, 4 or 8; a.group <= G): the accumulators
// [G][NT] live in registers and the loops over the group's tokens are unrolled to G.
// kGridSync (the default, "v2"): launched cooperatively (all CTAs co-resident); instead of the
// arrival counters, which a separate launch had to zero first (the workspace comes from the
// caching allocator, so nothing is zero at launch), every CTA meets the grid barrier of
// cooperative groups (driver-owned, self-resetting memory: no zeroing, graph-replay safe) and
// split 0 of each group finishes it; its Sinkhorn sums by quad_sum. The values are those of
// kGridSync false ("v1", DSV4_MHC_DECODE_IMPL=v1): the same partials, the same sums in the
// same order.
template <int NT, int G, bool kGridSync>
__global__ void __launch_bounds__(kDecThreads, 2) mhc_decode_kernel(const DecArgs a) {
  constexpr int kNReal = NT == 3 ? 24 : 4;
  static_assert(NT * kDecWarps >= kNReal, "every fn row has a warp");
  static_assert(G >= 1 && G <= kMaxFinish, "at most kMaxFinish tokens per group");
  __shared__ DecSmem sm;
  const int g = static_cast<int>(blockIdx.x / a.splits);
  const int split = static_cast<int>(blockIdx.x % a.splits);
  const int64_t t0 = static_cast<int64_t>(g) * a.group;
  const int n = static_cast<int>(a.tokens - t0 < a.group ? a.tokens - t0 : a.group);  // >= 1
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int r0 = warp * NT;  // this warp's first fn row
  unsigned long long* const st = kGridSync && blockIdx.x == 0 ? a.stamps : nullptr;
  if (st != nullptr && tid == 0) stamp(st, 0);

  float acc[G][NT], sq[G];
#pragma unroll
  for (int i = 0; i < G; ++i) {
    sq[i] = 0.f;
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[i][j] = 0.f;
  }
  // Branch-free body (predicated loads of zeros for absent rows, tokens and columns; the FMAs
  // of absent tokens are never stored) so that the loads of a pass, and of the next pass, are
  // all in flight before the first FMA waits.
  const int64_t k_begin = static_cast<int64_t>(split) * a.passes * kDecCols + lane * 4;
#pragma unroll 2
  for (int p = 0; p < a.passes; ++p) {
    const int64_t k = k_begin + static_cast<int64_t>(p) * kDecCols;
    const bool in = k < a.K;  // K % 32 == 0: a lane's 4 columns are all in range or all out
    float4 w[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j)
      w[j] = in && r0 + j < kNReal
                 ? __ldg(reinterpret_cast<const float4*>(a.fn + (r0 + j) * a.K + k))
                 : make_float4(0.f, 0.f, 0.f, 0.f);
    uint2 xv[G];
#pragma unroll
    for (int i = 0; i < G; ++i)
      xv[i] = in && i < n
                  ? __ldg(reinterpret_cast<const uint2*>(a.x + (t0 + i) * a.x_stride + k))
                  : make_uint2(0u, 0u);
#pragma unroll
    for (int i = 0; i < G; ++i) {
      const float x0 = bf16_lo(xv[i].x), x1 = bf16_hi(xv[i].x);
      const float x2 = bf16_lo(xv[i].y), x3 = bf16_hi(xv[i].y);
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        float v = __fmaf_rn(x0, w[j].x, acc[i][j]);
        v = __fmaf_rn(x1, w[j].y, v);
        v = __fmaf_rn(x2, w[j].z, v);
        acc[i][j] = __fmaf_rn(x3, w[j].w, v);
      }
      float v = __fmaf_rn(x0, x0, sq[i]);  // every warp (cheaper than a branch); warp 7 stores
      v = __fmaf_rn(x1, x1, v);
      v = __fmaf_rn(x2, x2, v);
      sq[i] = __fmaf_rn(x3, x3, v);
    }
  }
  // The warp's sums over its lanes (xor tree: the same order on every lane and run), all G
  // tokens' trees interleaved (absent tokens sum zeros and are not stored).
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
    for (int i = 0; i < G; ++i) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
        acc[i][j] = __fadd_rn(acc[i][j], __shfl_xor_sync(0xffffffffu, acc[i][j], o));
      sq[i] = __fadd_rn(sq[i], __shfl_xor_sync(0xffffffffu, sq[i], o));  // warp 7's is stored
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < G; ++i) {
      if (i < n) {
        float* row = a.part + (static_cast<int64_t>(split) * a.tokens + t0 + i) * kPartCols;
#pragma unroll
        for (int j = 0; j < NT; ++j)
          if (r0 + j < kNReal) row[r0 + j] = acc[i][j];
        if (warp == kDecSumsqWarp) row[kSumsqCol] = sq[i];
      }
    }
  }

  if constexpr (kGridSync) {
    if (st != nullptr && tid == 0) stamp(st, 1);
    cg::this_grid().sync();  // fences included: every CTA's partials are visible past it
    if (split != 0) return;
    if (st != nullptr && tid == 0) {
      stamp(st, 2);
      st[5] = 0;  // stays 0 for the head (no Sinkhorn)
      st[6] = 0;  // atomicMax'ed by the collapse warps below (ordered by the __syncthreads)
      st[7] = 0;
    }
  } else {
    if (!arrive_last(a.counters + g, a.splits)) return;
  }

  // Phase 2 for the group's n tokens.
  const FinishArgs& f = a.f;
  sum_split_partials<kDecThreads>(f, sm.red, sm.tot, t0, n);
  if (st != nullptr && tid == 0) stamp(st, 3);
  if (tid < n * kHc) {  // pre of every token first: the collapse needs nothing else
    const int i = tid / kHc, l = tid % kHc;
    const float r = mix_rstd(f.dim, f.norm_eps, sm.tot[i][kSumsqCol]);
    sm.pre[i][l] = pre_value(sm.tot[i][l], r, f.scale[0], f.base[l], f.eps);
  }
  __syncthreads();
  if (st != nullptr && tid == 0) stamp(st, 4);
  const int sink_warps = NT == 3 ? (n + 1) / 2 : 0;  // <= 4 of the 8 warps
  if (warp < sink_warps) {  // post and comb: token 2 w + h on half h of warp w
    const int i = 2 * warp + (lane >> 4);
    const bool have = i < n;
    const int ii = have ? i : 0;
    token_coefficients<NT, kGridSync>(f, sm.tot[ii], nullptr, t0 + ii, lane & 15, have);
    if (st != nullptr && tid == 0) stamp(st, 5);
  } else {
    collapse_tokens(f, sm.pre, t0, n, tid - sink_warps * 32, kDecThreads - sink_warps * 32);
    if (st != nullptr) {
      __syncwarp();
      if (lane == 0) atomicMax(st + 6, global_ns());
    }
  }
}

// ---------------------------------------------------------------------------------------------
// hc_pre / head for prefill in ONE pass over x ("wide" path: tokens > 8, dim = 1024·n <= 4096)
// ---------------------------------------------------------------------------------------------
// A cluster of 16 CTAs (one per SM, 16 warps each) owns a tile of 32 tokens at a time; CTA
// `rank` owns the dims [rank·W, rank·W + W) of all 4 streams (W = dim / 16), i.e. a 4·W-column
// slice of the projection's K, which stays in its shared memory until its u is written.
// Per tile k (a software pipeline: the cross-CTA steps of tile k overlap the work of tile k+1):
//  1. x tile -> smem by cp.async, three buffers: tile k+1 loads while tile k is multiplied and
//     tile k-1 still waits for its pre to write u.
//  2. Warp w owns 4·W/16 columns of the slice (stream w / 4); its fn columns live in registers
//     for the whole kernel as the three bf16 terms of mma B fragments. Per m16 half of the tile
//     every warp runs mma m16n8k16 over its columns and Σx² from the A fragments, stages its
//     partial rows ([warp][16 tokens][25]: 24 mixes or 4, Σx² in column 24), and the CTA sums
//     the 16 warps in warp order.
//  3. Each sum is pushed at once, by st.async, into the receive slot of the CTA that finalises
//     the token (rank t / 2 of the tile); st.async counts its bytes on that CTA's mbarrier, so
//     no fence or cluster barrier is needed.
//  4. During tile k+1, warp 15 of CTA r waits for tile k's 16 x 2 rows (long arrived), sums
//     them in rank order, computes pre of tokens 2r, 2r + 1 and pushes it (st.async) into every
//     CTA of the cluster; hc_pre also stores the summed row for step 6.
//  5. At the end of tile k+1 every CTA waits for tile k's pre (long arrived) and writes u for
//     its dims of tile k from smem.
//  6. (hc_pre) After the last tile, each CTA computes post and comb (the Sinkhorn,
//     token_coefficients) of the tokens it finalised, a half-warp per token, from the stored
//     rows: off the per-tile path, which needs only pre.
// x is read from HBM once; fn once per CTA (1/16 of it); the sums are in fixed orders
// (deterministic run to run). Ordering, all through mbarriers (phase k >> 1 of barrier k & 1):
//  - recv[k & 1] of CTA r: its slot of tile k is rewritten by tile k + 2's rows, which a CTA
//    sends only after it has received tile k's pre from r, which r computed from the slot.
//  - spre[k & 1] of CTA s: rewritten by tile k + 2's pre, which needs s's rows of tile k + 2,
//    sent after s wrote u of tile k (its last read of spre[k & 1]).
//  - an mbarrier phase never receives the next phase's bytes early (the same chains), and bytes
//    that arrive before the local arrive.expect_tx only make tx-count negative for a while.
constexpr int kCluster = 16;              // CTAs per cluster (a non-portable size: one GPC)
constexpr int kWideTM = 32;               // tokens per tile
constexpr int kWideThreads = 512;         // 16 warps
constexpr int kWideWarps = kWideThreads / 32;
constexpr int kWideMaxKs = 4;             // k16 steps per warp (W / 64); 4 at dim 4096
constexpr int kParts = 3;                 // bf16 terms of fn
constexpr int kXBufs = 3;                 // x tiles in smem: loading, multiplying, awaiting pre
constexpr int kRP = 25;                   // floats per staged / sent row: mixes, then Σx̂²
constexpr int kRowSumsq = 24;             // Σx̂²'s column in a staged / sent row (head too)
constexpr int kFinWarp = kWideWarps - 1;  // the finalising warp
static_assert(kWideTM == 2 * kCluster, "finalise: two tokens per CTA, one per half-warp");
static_assert(kWideWarps == 4 * kHc, "four warps per stream");
static_assert(kWideTM == 32, "two m16 halves per tile");
static_assert(16 * kRP <= 32 * kFinWarp,
              "a half's CTA sums (16 tokens x at most kRP columns) skip the finalising warp");

// W = dim / 16 in {64, 128, 256}: a power of two, so that a thread's (stream, chunk) of the
// tile loads and its chunk of the collapse are the same in every pass (kWideThreads is a
// multiple of 4·W/8 and of W/8).
bool wide_dim_ok(int64_t dim) {
  return dim == kCluster * 64 || dim == kCluster * 128 || dim == kCluster * 256;
}

// Dynamic shared memory of the wide kernel for slice width W: the x buffers, then in floats
// stage [warps][16][kRP], recv [2][ranks][2][kRP], spre [2][TM][4], tot [2][32], pre_loc [2][4],
// then the 4 mbarriers (recv[2], pre[2]). The tail's scratch [32][4] and zero row [32] lie over
// stage once the tiles are done.
__host__ __device__ constexpr int wide_pitch(int W) { return kHc * W + 8; }  // bf16 per token row
constexpr int kStageFloats = kWideWarps * 16 * kRP;
constexpr int kRecvFloats = 2 * kCluster * 2 * kRP;
constexpr int kWideFloats =
    kStageFloats + kRecvFloats + 2 * kWideTM * kHc + 2 * kPartCols + 2 * kHc;
constexpr int kWideBars = 4;
__host__ __device__ constexpr size_t wide_x_bytes(int W) {
  return static_cast<size_t>(kXBufs * kWideTM * wide_pitch(W)) * 2;
}
__host__ __device__ constexpr size_t wide_smem_bytes(int W) {
  return wide_x_bytes(W) + kWideFloats * sizeof(float) + kWideBars * sizeof(uint64_t);
}
static_assert(wide_smem_bytes(64 * kWideMaxKs) <= 232448, "fits the 227 KB of an sm_90 CTA");
static_assert(wide_x_bytes(64) % 16 == 0 && (kStageFloats + kRecvFloats) % 4 == 0 &&
                  (kWideFloats * sizeof(float)) % 8 == 0,
              "spre is 16-byte aligned, the mbarriers 8-byte aligned");
static_assert(32 * kHc + kPartCols <= kStageFloats, "the tail's scratch fits over stage");

struct WideArgs {
  const __nv_bfloat16* x;
  int64_t x_stride;      // token stride (elements)
  const float* fn;       // [rows, K]
  int64_t K;             // 4 * dim
  int64_t tokens, n_tiles;
  int W, ks;             // slice width (dim / 16) and k16 steps per warp (W / 64)
  __nv_bfloat16* u;
  int64_t u_stride;
  float* rows;           // [tokens, 32] summed rows (hc_pre only)
  FinishArgs f;          // dim, scale, base, norm_eps, eps, iters, post, comb
};

// --- mbarrier / distributed shared memory helpers (sm_90) ---
__device__ __forceinline__ void wide_mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void wide_fence_mbar_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// The local arrival of a phase (the barriers count 1) and the bytes the phase waits for.
__device__ __forceinline__ void wide_mbar_expect(uint32_t bar, uint32_t bytes) {
  asm volatile(
      "{\n.reg .b64 st;\n"
      "mbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar),
      "r"(bytes)
      : "memory");
}
// Waits for the phase of parity `parity`, with acquire at cluster scope: the st.async bytes
// of other CTAs that completed the phase are visible afterwards. Every phase's bytes are sent
// unconditionally by the cluster's CTAs (see the ordering notes above), so a real wait takes
// microseconds; a phase that has not completed after 2^24 polls (seconds) can only come from
// a protocol bug: the wait then gives up and returns false (`alive` becomes false, and later
// waits of the thread return at once), the kernel writes NaN where the missing data was used
// and ends instead of hanging the GPU.
__device__ __forceinline__ void wide_mbar_wait(uint32_t bar, uint32_t parity, bool& alive) {
  for (uint32_t n = 0; alive; ++n) {
    uint32_t done;
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    if (done) return;
    if (n == (1u << 24)) alive = false;
  }
}
// Stores into another CTA's shared memory; the bytes complete on that CTA's mbarrier `rbar`.
__device__ __forceinline__ void wide_st_async(uint32_t raddr, float v, uint32_t rbar) {
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];\n" ::"r"(raddr),
      "r"(__float_as_uint(v)), "r"(rbar)
      : "memory");
}
__device__ __forceinline__ void wide_st_async4(uint32_t raddr, float4 v, uint32_t rbar) {
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, "
      "[%5];\n" ::"r"(raddr),
      "r"(__float_as_uint(v.x)), "r"(__float_as_uint(v.y)), "r"(__float_as_uint(v.z)),
      "r"(__float_as_uint(v.w)), "r"(rbar)
      : "memory");
}

template <int NT>
__global__ void __launch_bounds__(kWideThreads, 1) mhc_wide_kernel(const WideArgs a) {
  constexpr int kNReal = NT == 3 ? 24 : 4;
  constexpr int kSend = kNReal + 1;  // columns sent per token: mixes, Σx̂²
  constexpr uint32_t kRecvBytes = kCluster * 2 * kSend * sizeof(float);  // per tile, finaliser
  constexpr uint32_t kPreBytes = kCluster * 2 * kHc * sizeof(float);     // per tile, every CTA
  extern __shared__ __align__(16) unsigned char smem[];
  const int W = a.W, ks = a.ks, pitch = wide_pitch(W);
  auto* sX = reinterpret_cast<__nv_bfloat16*>(smem);  // [3][TM][pitch]
  float* stage = reinterpret_cast<float*>(smem + wide_x_bytes(W));  // [warps][16][kRP]
  float* recv = stage + kStageFloats;            // [2][ranks][2][kRP] rows sent to this CTA
  float* spre = recv + kRecvFloats;              // [2][TM][4] pre of a tile's tokens
  float* tot = spre + 2 * kWideTM * kHc;         // [2][32] (finalising warp)
  float* pre_loc = tot + 2 * kPartCols;          // [2][4] (finalising warp)
  auto* bars = reinterpret_cast<uint64_t*>(pre_loc + 2 * kHc);  // recv[2], pre[2]
  float* scratch = stage;                        // [32][4] (tail, after the tiles)
  float* zero_row = stage + 32 * kHc;            // [32] (tail)

  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t cid = blockIdx.x / kCluster, ncl = gridDim.x / kCluster;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c2 = (lane & 3) * 2;
  const int64_t dim = a.f.dim;
  const int64_t slice0 = static_cast<int64_t>(rank) * W;  // first dim of this CTA's slice
  const int64_t my_tiles = cid < a.n_tiles ? (a.n_tiles - cid + ncl - 1) / ncl : 0;
  const uint32_t recv_bar0 = smem_addr(bars), pre_bar0 = smem_addr(bars + 2);

  // This warp's columns: stream warp / 4, W / 4 dims from (warp % 4) * W / 4 of the slice.
  const int wcol = (warp >> 2) * W + (warp & 3) * (W / 4);                // in a smem row
  const int64_t kcol = (warp >> 2) * dim + slice0 + (warp & 3) * (W / 4);  // in fn / x rows

  // The tile's x slice: token i, stream s, 16-byte chunk ch -> sX[buf][i][s * W + ch * 8];
  // tokens past the end are zero-filled.
  // Chunk c = tid + pass * kWideThreads: token c / (4 W / 8), and (stream, chunk) from
  // c % (4 W / 8) = tid % (4 W / 8), the same in every pass.
  const int ld_per_token = kHc * (W / 8);               // 16-byte chunks per token
  const int ld_tokens = kWideThreads / ld_per_token;    // tokens per pass (4, 8 or 16)
  const int ld_i0 = tid / ld_per_token;
  const int ld_s = (tid % ld_per_token) / (W / 8), ld_ch = tid % (W / 8);
  const int ld_soff = ld_s * W + ld_ch * 8;                       // in a smem row
  const int64_t ld_goff = ld_s * dim + slice0 + ld_ch * 8;        // in an x row
  auto load_tile = [&](int buf, int64_t tile) {
    const uint32_t dst = smem_addr(sX + buf * kWideTM * pitch + ld_soff);
    for (int i = ld_i0; i < kWideTM; i += ld_tokens) {
      const int64_t t = tile * kWideTM + i;
      const bool ok = t < a.tokens;
      cp_async16_zfill(dst + static_cast<uint32_t>(i * pitch * 2),
                       ok ? a.x + t * a.x_stride + ld_goff : a.x, ok);
    }
    cp_async_commit();
  };

  if (tid == 0) {
#pragma unroll
    for (int b = 0; b < kWideBars; ++b) wide_mbar_init(smem_addr(bars + b), 1);
    wide_fence_mbar_init();
  }
  if (my_tiles > 0) load_tile(0, cid);  // in flight while fn fills the registers

  // fn -> B fragments: b[j][p][nt] = part p of fn rows nt·8 + g, columns kcol + 16 j + c2 + {0,
  // 1} (reg 0) and + {8, 9} (reg 1); rows past kNReal (head: 4..7) and steps j >= ks are 0.
  uint32_t b[kWideMaxKs][kParts][NT][2];
#pragma unroll
  for (int j = 0; j < kWideMaxKs; ++j) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int n = nt * 8 + g;
      float v[4] = {0.f, 0.f, 0.f, 0.f};
      if (j < ks && n < kNReal) {
        const float* src = a.fn + n * a.K + kcol + j * 16 + c2;
        const float2 lo = __ldg(reinterpret_cast<const float2*>(src));
        const float2 hi = __ldg(reinterpret_cast<const float2*>(src + 8));
        v[0] = lo.x;
        v[1] = lo.y;
        v[2] = hi.x;
        v[3] = hi.y;
      }
      __nv_bfloat16 s[4][kParts];
#pragma unroll
      for (int q = 0; q < 4; ++q) split3(v[q], s[q][0], s[q][1], s[q][2]);
#pragma unroll
      for (int p = 0; p < kParts; ++p) {
        b[j][p][nt][0] = pack_bf16(s[0][p], s[1][p]);
        b[j][p][nt][1] = pack_bf16(s[2][p], s[3][p]);
      }
    }
  }
  cluster.sync();  // every CTA's mbarriers are initialised before any st.async reaches them

  bool alive = true;  // false once a wait of this thread gave up (a protocol bug; see wait)

  // Step 4 for tile k (finalising warp): tokens 2 rank + h of the tile, h = lane / 16.
  auto finalise = [&](int64_t k) {
    const int par = static_cast<int>(k & 1);
    const uint32_t rbar = recv_bar0 + 8 * par;
    if (lane == 0) wide_mbar_expect(rbar, kRecvBytes);
    wide_mbar_wait(rbar, static_cast<uint32_t>((k >> 1) & 1), alive);
    const int h = lane >> 4, l = lane & 15, i = 2 * rank + h;
    const int64_t t = (cid + k * ncl) * kWideTM + i;
    const float* src = recv + (par * kCluster * 2 + h) * kRP;  // + r * 2 kRP: rank r's row
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int c = l + 16 * q;
      if (c < kSend) {
        float v[kCluster];
#pragma unroll
        for (int r = 0; r < kCluster; ++r) v[r] = src[r * 2 * kRP + c];
        float s = v[0];
#pragma unroll
        for (int r = 1; r < kCluster; ++r) s = __fadd_rn(s, v[r]);
        if (!alive) s = __int_as_float(0x7fc00000);  // the rows never came: NaN, not garbage
        const int oc = c == kNReal ? kSumsqCol : c;  // the 32-column row layout
        tot[h * kPartCols + oc] = s;
        if (NT == 3 && t < a.tokens) a.rows[t * kPartCols + oc] = s;
      }
    }
    __syncwarp();
    if (l < kHc) {
      const float r = mix_rstd(dim, a.f.norm_eps, tot[h * kPartCols + kSumsqCol]);
      pre_loc[h * kHc + l] =
          pre_value(tot[h * kPartCols + l], r, a.f.scale[0], a.f.base[l], a.f.eps);
    }
    __syncwarp();
    const float4 pv = *reinterpret_cast<const float4*>(pre_loc + h * kHc);
    const uint32_t dst = smem_addr(spre + (par * kWideTM + i) * kHc);
    wide_st_async4(cluster_map(dst, l), pv, cluster_map(pre_bar0 + 8 * par, l));  // -> CTA rank l
  };

  int cur = 0;  // x buffer of tile it (it % 3)
  for (int64_t it = 0; it <= my_tiles; ++it) {
    const int prev = cur == 0 ? kXBufs - 1 : cur - 1;  // tile it - 1's buffer
    const int next = cur == kXBufs - 1 ? 0 : cur + 1;  // tile it + 1's (= tile it - 2's)
    cp_async_wait<0>();  // tile it's x (the only group in flight)
    __syncthreads();     // x(it) visible; u of tile it - 2 written (its buffer is free)
    if (it + 1 < my_tiles) load_tile(next, cid + (it + 1) * ncl);
    const bool fin = it >= 1 && warp == kFinWarp;

    if (it < my_tiles) {  // (the same branch in every thread of the cluster)
      const int par = static_cast<int>(it & 1);
      const __nv_bfloat16* xb = sX + cur * kWideTM * pitch;
#pragma unroll 1
      for (int mt = 0; mt < kWideTM / 16; ++mt) {
        // 2. partial rows of this warp's columns for tokens mt·16 .. mt·16 + 15
        float acc[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[nt][q] = 0.f;
        float sq0 = 0.f, sq1 = 0.f;
#pragma unroll
        for (int j = 0; j < kWideMaxKs; ++j) {
          if (j < ks) {
            uint32_t a0, a1, a2, a3;
            ldmatrix_x4(
                smem_addr(xb + (mt * 16 + (lane & 15)) * pitch + wcol + j * 16 + (lane >> 4) * 8),
                a0, a1, a2, a3);
            sumsq_frag(a0, a1, a2, a3, sq0, sq1);
#pragma unroll
            for (int p = 0; p < kParts; ++p)
#pragma unroll
              for (int nt = 0; nt < NT; ++nt)
                mma_bf16_16816(acc[nt], a0, a1, a2, a3, b[j][p][nt][0], b[j][p][nt][1]);
          }
        }
        sq0 += __shfl_xor_sync(0xffffffffu, sq0, 1);
        sq0 += __shfl_xor_sync(0xffffffffu, sq0, 2);
        sq1 += __shfl_xor_sync(0xffffffffu, sq1, 1);
        sq1 += __shfl_xor_sync(0xffffffffu, sq1, 2);
        if (mt > 0) __syncthreads();  // every CTA sum of the first half has read stage
        float* rw = stage + warp * 16 * kRP;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          store_frag_row<NT, kNReal>(rw + (g + 8 * h) * kRP, acc, h, c2, (lane & 3) == 0,
                                     h == 0 ? sq0 : sq1, kRowSumsq);
        }
        __syncthreads();  // stage complete
        if (mt == 0 && fin) {
          finalise(it - 1);  // 4. tile it - 1 (the finalising warp takes no part in the sums)
        } else if (tid < 16 * kSend) {
          // 3. the CTA's sum of (token mt·16 + i, column c), in warp order -> its finaliser
          const int i = tid / kSend, c = tid % kSend;   // c = kNReal: Σx̂²
          const int sc = c == kNReal ? kRowSumsq : c;  // its staged column (head: 24, not 4)
          float v = stage[i * kRP + sc];
#pragma unroll
          for (int w = 1; w < kWideWarps; ++w) v = __fadd_rn(v, stage[(w * 16 + i) * kRP + sc]);
          const int ti = mt * 16 + i;  // token in the tile: finalised by rank ti / 2, half ti % 2
          const uint32_t dst =
              smem_addr(recv + ((par * kCluster + rank) * 2 + (ti & 1)) * kRP + c);
          const uint32_t fr = static_cast<uint32_t>(ti >> 1);
          wide_st_async(cluster_map(dst, fr), v, cluster_map(recv_bar0 + 8 * par, fr));
        }
      }
    } else if (fin) {
      finalise(it - 1);  // the last tile's
    }

    // 5. u of tile it - 1 for this CTA's dims, once its pre has arrived from the 16 finalisers
    if (it >= 1) {
      const int64_t k = it - 1;
      const int par = static_cast<int>(k & 1);
      const uint32_t pbar = pre_bar0 + 8 * par;
      if (tid == 0) wide_mbar_expect(pbar, kPreBytes);
      wide_mbar_wait(pbar, static_cast<uint32_t>((k >> 1) & 1), alive);
      const int64_t t0 = (cid + k * ncl) * kWideTM;
      const __nv_bfloat16* xb = sX + prev * kWideTM * pitch;
      const float* sp = spre + par * kWideTM * kHc;
      const int chunks = W / 8, ch = tid % chunks;
      for (int i = tid / chunks; i < kWideTM; i += kWideThreads / chunks) {
        const int64_t t = t0 + i;
        if (t >= a.tokens) break;  // i only grows
        float4 p = *reinterpret_cast<const float4*>(sp + i * kHc);
        if (!alive) p.x = __int_as_float(0x7fc00000);  // pre never came: u is NaN
        const __nv_bfloat16* xr = xb + i * pitch + ch * 8;
        *reinterpret_cast<uint4*>(a.u + t * a.u_stride + slice0 + ch * 8) =
            collapse8(p.x, p.y, p.z, p.w, *reinterpret_cast<const uint4*>(xr),
                      *reinterpret_cast<const uint4*>(xr + W),
                      *reinterpret_cast<const uint4*>(xr + 2 * W),
                      *reinterpret_cast<const uint4*>(xr + 3 * W));
      }
    }
    cur = next;
  }

  // 6. post and comb of the tokens this CTA finalised: k = 2 · (its n-th tile) + half.
  if constexpr (NT == 3) {
    __syncthreads();  // the last stage reads are done (scratch and zero_row lie over stage)
    if (tid < kPartCols) zero_row[tid] = 0.f;
    __syncthreads();  // the finalising warp's rows (global) and zero_row are visible to all
    const int h = lane >> 4, l = lane & 15;
    for (int64_t k0 = 2 * warp; k0 < 2 * my_tiles; k0 += 2 * kWideWarps) {  // warp-uniform
      const int64_t k = k0 + h;
      const int64_t t = (cid + (k >> 1) * ncl) * kWideTM + 2 * rank + (k & 1);
      const bool have = k < 2 * my_tiles && t < a.tokens;
      token_coefficients<3>(a.f, have ? a.rows + t * kPartCols : zero_row,
                            scratch + (2 * warp + h) * kHc, t, l, have);
    }
  }
  cluster.sync();  // no CTA leaves while a peer could still address its shared memory
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The one-pass path is the default since it passed its tests on an H100 at half the chunked
// path's time (2026-12-05); DSV4_MHC_ONE_PASS=0 selects the chunked path (read at each call, so
// a CUDA graph keeps the path it was captured with).
bool one_pass_enabled() {
  const char* v = std::getenv("DSV4_MHC_ONE_PASS");
  return !(v != nullptr && v[0] == '0' && v[1] == '\0');
}

// Clusters of the wide kernel that can be resident at once on `device` (the current device):
// 0 when a 16-CTA cluster of it cannot run there (then the chunked two-phase path runs). The
// query also sets the attributes every launch needs. Cached per device and kernel, successful
// queries only (DeviceQueryCache, own_error.cuh): after a failed one (its own error cleared) or
// while the caller has an error pending (no query made, that error left alone) the chunked path
// runs and the next call asks again. A device without clusters or with less shared memory per
// block than the kernel needs gets a successful "no" (0), cached like any answer, so eager
// prefill calls do not ask again (the attribute call below would fail there each time).
template <int NT>
int wide_clusters(int device) {
  static DeviceQueryCache cache;
  return cache.get(device, 0, [device](int& n) {
    const size_t smem = wide_smem_bytes(64 * kWideMaxKs);
    int has_clusters = 0, smem_optin = 0;
    cudaError_t err = cudaDeviceGetAttribute(&has_clusters, cudaDevAttrClusterLaunch, device);
    if (err == cudaSuccess)
      err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) return err;
    // DSV4_TEST_REFUSE=nofit (test only, own_error.cuh): as a device with too little shared
    // memory per block
    if (test_refusal() == TestRefusal::kNoFit) smem_optin = 0;
    if (has_clusters == 0 || static_cast<size_t>(smem_optin) < smem) {
      n = 0;
      return cudaSuccess;
    }
    err = cudaFuncSetAttribute(
        mhc_wide_kernel<NT>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err == cudaSuccess)
      err = cudaFuncSetAttribute(mhc_wide_kernel<NT>,
                                 cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (err != cudaSuccess) return err;
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = kCluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.gridDim = dim3(kCluster);
    cfg.blockDim = dim3(kWideThreads);
    cfg.dynamicSmemBytes = smem;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaOccupancyMaxActiveClusters(&n, mhc_wide_kernel<NT>, &cfg);
  });
}

template <int NT>
cudaError_t run_wide(const __nv_bfloat16* x, int64_t x_token_stride, const float* fn,
                     const FinishArgs& f, __nv_bfloat16* u, int64_t u_stride, int64_t tokens,
                     float* rows, int max_clusters, cudaStream_t stream) {
  WideArgs a;
  a.x = x;
  a.x_stride = x_token_stride;
  a.fn = fn;
  a.K = kHc * f.dim;
  a.tokens = tokens;
  a.n_tiles = (tokens + kWideTM - 1) / kWideTM;
  a.W = static_cast<int>(f.dim / kCluster);
  a.ks = a.W / 64;
  a.u = u;
  a.u_stride = u_stride;
  a.rows = rows;
  a.f = f;
  const int64_t clusters = a.n_tiles < max_clusters ? a.n_tiles : max_clusters;
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = kCluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.gridDim = dim3(static_cast<unsigned>(clusters * kCluster));
  cfg.blockDim = dim3(kWideThreads);
  cfg.dynamicSmemBytes = wide_smem_bytes(a.W);
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, mhc_wide_kernel<NT>, a);
}

// The most tokens the decode kernel runs for (mhc_pre: NT = 3, mhc_head: NT = 1). By default
// kMhcPreDecodeTokens / kMhcHeadDecodeTokens, where it measured fastest (H100, bench_mhc,
// 2026-12-06: mhc_pre 12.9 µs at T = 16 vs the chunked path's 13.3, 22.6 vs 14.2 at T = 64;
// mhc_head 11.1 vs 16.1 at T = 8, 9.65 vs 6.94 at T = 16). DSV4_MHC_DECODE (read at each call,
// so a CUDA graph keeps the path it was captured with): "all" = kMhcDecodeMaxTokens for both
// ops, "old" = 0 (tokens <= 8: mhc_mix_kernel<NT, true>, one launch whose last CTA finishes
// every token; more: the chunked path up to 64).
template <int NT>
int64_t decode_kernel_max_tokens() {
  const char* v = std::getenv("DSV4_MHC_DECODE");
  if (v != nullptr && std::strcmp(v, "old") == 0) return 0;
  if (v != nullptr && std::strcmp(v, "all") == 0) return kMhcDecodeMaxTokens;
  return NT == 3 ? kMhcPreDecodeTokens : kMhcHeadDecodeTokens;
}

struct DecPlan {
  int64_t group, groups, splits, passes;
};

// Tokens per group: DSV4_MHC_DECODE_GROUP = 1..8 if set (read at each call; for measuring),
// else min(T, 4) up to T = 32 (groups of 4: fn is read from L2 T / 4 times, and a finisher's
// collapse of 4 tokens by 6 warps takes about the Sinkhorn's time), then ceil(T / 8) (at most 8
// groups: 8 finishers, fn read 8 times).
int64_t decode_group(int64_t tokens) {
  const char* v = std::getenv("DSV4_MHC_DECODE_GROUP");
  if (v != nullptr && v[0] >= '1' && v[0] <= '0' + kMaxFinish && v[1] == '\0') return v[0] - '0';
  if (tokens <= 32) return tokens < 4 ? tokens : 4;
  return (tokens + kMaxFinish - 1) / kMaxFinish;
}

// Splits so that groups x splits is ~2 CTAs per SM, at least one 128-column pass each.
DecPlan make_decode_plan(int64_t tokens, int64_t dim, int num_sms) {
  DecPlan p;
  p.group = decode_group(tokens);
  p.groups = (tokens + p.group - 1) / p.group;
  const int64_t cols = (kHc * dim + kDecCols - 1) / kDecCols;
  int64_t s = (2 * static_cast<int64_t>(num_sms) + p.groups - 1) / p.groups;
  if (s > cols) s = cols;
  if (s < 1) s = 1;
  p.passes = (cols + s - 1) / s;
  p.splits = (cols + p.passes - 1) / p.passes;
  return p;
}

// Byte offset of the arrival counters in the workspace, after the largest partials any plan
// makes ([splits <= 128-column blocks][tokens][32] fp32): independent of the plan, so that the
// workspace size depends only on the shapes.
size_t decode_counter_offset(int64_t tokens, int64_t dim) {
  const int64_t cols = (kHc * dim + kDecCols - 1) / kDecCols;
  return static_cast<size_t>(cols * tokens * kPartCols) * sizeof(float);
}
// Byte offset of v2's phase stamps (DSV4_MHC_DECODE_STAMPS=1): after the counters, 8-byte
// aligned. Exported as mhc_decode_stamp_offset, which check_mhc reads them at (one formula).
size_t decode_stamp_offset(int64_t tokens, int64_t dim) {
  return (decode_counter_offset(tokens, dim) + static_cast<size_t>(tokens) * sizeof(int) + 7) &
         ~static_cast<size_t>(7);
}

// DSV4_MHC_DECODE_IMPL (read at each call, so a CUDA graph keeps the kernel it was captured
// with): "v1" = the decode kernel with arrival counters, zeroed by a separate launch (the
// previous default; for comparing); unset or anything else = v2, the cooperative launch with a
// grid barrier (mhc_decode_kernel<NT, G, true>), where the grid can be co-resident (else v1:
// decode_coop_capacity), and v1 after the device refused a cooperative launch
// (decode_coop_refused).
bool decode_v1_forced() {
  const char* v = std::getenv("DSV4_MHC_DECODE_IMPL");
  return v != nullptr && std::strcmp(v, "v1") == 0;
}
// DSV4_MHC_DECODE_STAMPS=1: v2 writes its phase stamps (kDecStamps) into the workspace at
// decode_stamp_offset (for check_mhc; read at each call).
bool decode_stamps_on() {
  const char* v = std::getenv("DSV4_MHC_DECODE_STAMPS");
  return v != nullptr && v[0] == '1' && v[1] == '\0';
}

// Devices where a cooperative launch of the decode kernel was refused with
// cudaErrorCooperativeLaunchTooLarge although decode_coop_capacity allowed the grid: the device
// attributes and the occupancy query describe the whole GPU, but the context may own fewer SMs
// (a green context; MPS with a reduced active-thread percentage). From then on v1 runs there for
// every instance (the capacity of the others is as wrong as the one that was refused). Set once,
// never cleared; relaxed is enough since the flag carries no other data.
constexpr int kDecMaxDevices = 64;
std::atomic<bool> g_decode_coop_refused[kDecMaxDevices];  // static storage: false at start
// The cooperative grid of DSV4_TEST_REFUSE=launch: more CTAs than any device holds at once (an
// SM holds at most 32 CTAs), so the runtime refuses the launch.
constexpr unsigned kTestRefusedGrid = 1u << 20;

// (true too for a device beyond the table: no capacity is cached for it either)
bool decode_coop_refused(int device) {
  return device < 0 || device >= kDecMaxDevices ||
         g_decode_coop_refused[device].load(std::memory_order_relaxed);
}

// CTAs of mhc_decode_kernel<NT, G, true> that can be resident at once on `device` (blocks per
// SM x SMs): a cooperative launch must not exceed it; 0 = do not use v2 (no cooperative launch
// on the device, or a query failed). The SM count is the one the query returns, never the
// planning default of sm_count (132): a guessed count could allow a grid that is not
// co-resident. Only successful queries are cached (once per device and instance,
// DeviceQueryCache); a failed one is asked again at the next call (its own error is cleared, v1
// runs meanwhile). While the caller has an error pending, no query is made (v1 runs;
// own_error.cuh says why).
template <int NT, int G>
int64_t decode_coop_capacity(int device) {
  static DeviceQueryCache cache;
  if (decode_coop_refused(device)) return 0;
  return cache.get(device, 0, [device](int& cap) {
    int coop = 0, sms = 0, per_sm = 0;
    cudaError_t err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device);
    if (err != cudaSuccess || coop == 0) return err;  // no cooperative launch: cap 0, cached
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess)
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, mhc_decode_kernel<NT, G, true>,
                                                          kDecThreads, 0);
    if (err != cudaSuccess) return err;
    // no usable SM count: as a failed query, not cached (an error of this query's own making;
    // no runtime call failed, so nothing is pending and nothing is cleared)
    if (sms <= 0) return cudaErrorInvalidValue;
    cap = per_sm > 0 ? per_sm * sms : 0;
    return cudaSuccess;
  });
}

template <int NT, int G>
cudaError_t launch_decode(const DecArgs& a, unsigned grid, bool coop, cudaStream_t stream) {
  if (!coop) {
    mhc_decode_kernel<NT, G, false><<<grid, kDecThreads, 0, stream>>>(a);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(kDecThreads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, mhc_decode_kernel<NT, G, true>, a);
}

// Workspace: the partials [splits][tokens][32] fp32, then the groups' arrival counters (v1:
// zeroed here by a one-CTA kernel before the kernel, zero_fill.cuh says why not a memset; v2
// does not use them), then (8-byte aligned) kDecStamps stamps.
template <int NT>
cudaError_t run_decode(const __nv_bfloat16* x, int64_t x_token_stride, const float* fn,
                       FinishArgs f, int64_t tokens, void* workspace, int device,
                       cudaStream_t stream) {
  const DecPlan p = make_decode_plan(tokens, f.dim, sm_count(device));
  f.part = static_cast<float*>(workspace);
  f.splits = static_cast<int>(p.splits);
  f.tokens = tokens;
  f.x = x;
  f.x_stride = x_token_stride;
  DecArgs a;
  a.x = x;
  a.x_stride = x_token_stride;
  a.K = kHc * f.dim;
  a.tokens = tokens;
  a.fn = fn;
  a.group = static_cast<int>(p.group);
  a.splits = static_cast<int>(p.splits);
  a.passes = static_cast<int>(p.passes);
  a.part = static_cast<float*>(workspace);
  a.counters =
      reinterpret_cast<int*>(static_cast<char*>(workspace) + decode_counter_offset(tokens, f.dim));
  a.f = f;
  a.stamps = nullptr;
  const int64_t ctas = p.groups * p.splits;
  const unsigned grid = static_cast<unsigned>(ctas);
  const int gi = p.group == 1 ? 0 : p.group <= 4 ? 1 : 2;  // the instance: G = 1, 4, 8
  const int64_t cap = decode_v1_forced() ? 0
                      : gi == 0         ? decode_coop_capacity<NT, 1>(device)
                      : gi == 1         ? decode_coop_capacity<NT, 4>(device)
                                        : decode_coop_capacity<NT, kMaxFinish>(device);
  // No cooperative launch while the caller has an error pending (v1 runs, and its launch check
  // reports that error): a refusal would overwrite it, and clearing the refusal would hide it.
  if (ctas <= cap && !error_pending()) {
    if (decode_stamps_on())
      a.stamps = reinterpret_cast<unsigned long long*>(static_cast<char*>(workspace) +
                                                       decode_stamp_offset(tokens, f.dim));
    // DSV4_TEST_REFUSE=launch (test only, own_error.cuh): a grid no device holds at once, which
    // the runtime refuses with cudaErrorCooperativeLaunchTooLarge before launching anything
    const unsigned coop_grid = test_refusal() == TestRefusal::kLaunch ? kTestRefusedGrid : grid;
    const cudaError_t err = gi == 0   ? launch_decode<NT, 1>(a, coop_grid, true, stream)
                            : gi == 1 ? launch_decode<NT, 4>(a, coop_grid, true, stream)
                                      : launch_decode<NT, kMaxFinish>(a, coop_grid, true, stream);
    if (err != cudaErrorCooperativeLaunchTooLarge) return err;
    // The context holds fewer SMs than the queries said (decode_coop_refused): nothing was
    // launched, so this call runs v1 instead, and so do the later ones on this device. Only
    // this error is cleared (nothing was pending before the launch). Under stream capture the
    // refusal may come only when the graph is instantiated or launched, out of reach here; an
    // eager call before the capture (a warm-up) records it, and the capture then takes v1.
    clear_own_error(err);
    if (device >= 0 && device < kDecMaxDevices)
      g_decode_coop_refused[device].store(true, std::memory_order_relaxed);
    a.stamps = nullptr;
  }
  const cudaError_t err =
      zero_bytes_async(a.counters, static_cast<size_t>(p.groups) * sizeof(int), stream);
  if (err != cudaSuccess) return err;
  if (gi == 0) return launch_decode<NT, 1>(a, grid, false, stream);
  if (gi == 1) return launch_decode<NT, 4>(a, grid, false, stream);
  return launch_decode<NT, kMaxFinish>(a, grid, false, stream);
}

// Shared driver of mhc_pre (NT = 3) and mhc_head (NT = 1).
template <int NT>
cudaError_t run_mix(const void* x, int64_t x_token_stride, const float* fn, const float* scale,
                    const float* base, float norm_eps, int iters, float eps, void* u,
                    int64_t u_stride, float* post, float* comb, int64_t tokens, int64_t dim,
                    void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (tokens < 0 || dim <= 0 || dim % 8 != 0 || iters < 1) return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  if (x == nullptr || fn == nullptr || scale == nullptr || base == nullptr || u == nullptr ||
      workspace == nullptr || (NT == 3 && (post == nullptr || comb == nullptr)))
    return cudaErrorInvalidValue;
  if (x_token_stride < kHc * dim || x_token_stride % 8 != 0 || u_stride < dim ||
      u_stride % 8 != 0 || !aligned16(x) || !aligned16(u) || !aligned16(fn) ||
      !aligned16(workspace))
    return cudaErrorInvalidValue;
  if (tokens > INT_MAX) return cudaErrorInvalidValue;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (workspace_bytes < mhc_pre_workspace_bytes(tokens, dim, device)) return cudaErrorInvalidValue;
  if (tokens <= decode_kernel_max_tokens<NT>()) {
    FinishArgs fa = {};
    fa.dim = dim;
    fa.scale = scale;
    fa.base = base;
    fa.norm_eps = norm_eps;
    fa.eps = eps;
    fa.iters = iters;
    fa.u = static_cast<__nv_bfloat16*>(u);
    fa.u_stride = u_stride;
    fa.post = post;
    fa.comb = comb;
    return run_decode<NT>(static_cast<const __nv_bfloat16*>(x), x_token_stride, fn, fa, tokens,
                          workspace, device, stream);
  }
  if (tokens > kMhcDecodeMaxTokens && wide_dim_ok(dim) && one_pass_enabled()) {
    const int clusters = wide_clusters<NT>(device);
    if (clusters > 0) {
      FinishArgs fa = {};
      fa.dim = dim;
      fa.scale = scale;
      fa.base = base;
      fa.norm_eps = norm_eps;
      fa.eps = eps;
      fa.iters = iters;
      fa.post = post;
      fa.comb = comb;
      return run_wide<NT>(static_cast<const __nv_bfloat16*>(x), x_token_stride, fn, fa,
                          static_cast<__nv_bfloat16*>(u), u_stride, tokens,
                          static_cast<float*>(workspace), clusters, stream);
    }
  }
  const MhcPlan p = make_plan(tokens, dim, sm_count(device));
  float* part = static_cast<float*>(workspace);
  int* counter = reinterpret_cast<int*>(
      static_cast<char*>(workspace) +
      static_cast<size_t>(p.splits * p.chunk * kPartCols) * sizeof(float));
  if (p.fused) {
    err = zero_bytes_async(counter, sizeof(int), stream);
    if (err != cudaSuccess) return err;
  }
  const auto* xb = static_cast<const __nv_bfloat16*>(x);
  auto* ub = static_cast<__nv_bfloat16*>(u);
  for (int64_t c0 = 0; c0 < tokens; c0 += p.chunk) {
    const int64_t n = tokens - c0 < p.chunk ? tokens - c0 : p.chunk;
    MixArgs ma;
    ma.x = xb + c0 * x_token_stride;
    ma.x_stride = x_token_stride;
    ma.fn = fn;
    ma.K = kHc * dim;
    ma.tokens = n;
    ma.splits = static_cast<int>(p.splits);
    ma.tiles_per_split = static_cast<int>(p.tiles_per_split);
    ma.k_tiles = p.k_tiles;
    ma.part = part;
    FinishArgs fa;
    fa.x = ma.x;
    fa.x_stride = x_token_stride;
    fa.dim = dim;
    fa.tokens = n;
    fa.part = part;
    fa.splits = ma.splits;
    fa.scale = scale;
    fa.base = base;
    fa.norm_eps = norm_eps;
    fa.eps = eps;
    fa.iters = iters;
    fa.u = ub + c0 * u_stride;
    fa.u_stride = u_stride;
    fa.post = NT == 3 ? post + c0 * kHc : nullptr;
    fa.comb = NT == 3 ? comb + c0 * kHc * kHc : nullptr;
    const int64_t ctas = ((n + kBM - 1) / kBM) * p.splits;
    if (p.fused)
      mhc_mix_kernel<NT, true><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(ma, fa,
                                                                                    counter);
    else
      mhc_mix_kernel<NT, false><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(ma, fa,
                                                                                     counter);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    if (!p.fused) {
      mhc_finish_kernel<NT><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(fa);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// hc_post
// ---------------------------------------------------------------------------------------------
template <int VEC>
struct PostVec;
template <>
struct PostVec<8> {
  using T = uint4;
  static __device__ __forceinline__ void unpack(const T& v, float* f) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = bf16_lo(w[i]);
      f[2 * i + 1] = bf16_hi(w[i]);
    }
  }
  static __device__ __forceinline__ T pack(const float* f) {
    return make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
  }
};
template <>
struct PostVec<1> {
  using T = uint16_t;
  static __device__ __forceinline__ void unpack(const T& v, float* f) {
    f[0] = __uint_as_float(static_cast<uint32_t>(v) << 16);
  }
  static __device__ __forceinline__ T pack(const float* f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f[0]));
  }
};

template <int VEC>
__global__ void __launch_bounds__(kThreads)
    mhc_post_kernel(const uint16_t* f, int64_t f_stride, const uint16_t* res, int64_t res_stride,
                    const float* post, const float* comb, uint16_t* out, int64_t out_stride,
                    int64_t dim, int64_t n_chunks) {
  using P = PostVec<VEC>;
  using V = typename P::T;
  const int64_t t = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (c >= n_chunks) return;
  float cm[kHc][kHc], pk[kHc];
#pragma unroll
  for (int j = 0; j < kHc; ++j) {
    pk[j] = __ldg(post + t * kHc + j);
#pragma unroll
    for (int k = 0; k < kHc; ++k) cm[j][k] = __ldg(comb + t * kHc * kHc + j * kHc + k);
  }
  float fv[VEC], xv[kHc][VEC];
  P::unpack(*reinterpret_cast<const V*>(f + t * f_stride + c * VEC), fv);
#pragma unroll
  for (int j = 0; j < kHc; ++j)
    P::unpack(*reinterpret_cast<const V*>(res + t * res_stride + j * dim + c * VEC), xv[j]);
#pragma unroll
  for (int k = 0; k < kHc; ++k) {
    float o[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      float s = __fmul_rn(cm[0][k], xv[0][e]);
#pragma unroll
      for (int j = 1; j < kHc; ++j) s = __fadd_rn(s, __fmul_rn(cm[j][k], xv[j][e]));
      o[e] = __fadd_rn(__fmul_rn(pk[k], fv[e]), s);
    }
    *reinterpret_cast<V*>(out + t * out_stride + k * dim + c * VEC) = P::pack(o);
  }
}

}  // namespace

size_t mhc_pre_workspace_bytes(int64_t tokens, int64_t dim, int device) {
  if (tokens <= 0 || dim <= 0) return 0;
  const MhcPlan p = make_plan(tokens, dim, sm_count(device));
  const size_t chunked = static_cast<size_t>(p.splits * p.chunk * kPartCols) * sizeof(float) + 16;
  // the wide path's summed rows [tokens, 32] (whichever path run_mix takes, the size fits)
  const size_t wide = tokens > kMhcDecodeMaxTokens
                          ? static_cast<size_t>(tokens) * kPartCols * sizeof(float)
                          : 0;
  size_t need = chunked > wide ? chunked : wide;
  if (tokens <= kMhcDecodeMaxTokens) {  // the decode kernel's partials and counters
    const size_t dec =  // partials, counters, v2's phase stamps (128 bytes)
        decode_stamp_offset(tokens, dim) + kDecStamps * sizeof(unsigned long long);
    if (dec > need) need = dec;
  }
  return need;
}

size_t mhc_decode_stamp_offset(int64_t tokens, int64_t dim) {
  if (tokens <= 0 || dim <= 0) return 0;
  return decode_stamp_offset(tokens, dim);
}

int mhc_prefill_clusters(int64_t dim, bool head) {
  if (!wide_dim_ok(dim)) return 0;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  return head ? wide_clusters<1>(device) : wide_clusters<3>(device);
}

cudaError_t mhc_pre(const void* x, int64_t x_token_stride, const float* fn, const float* scale,
                    const float* base, float norm_eps, int iters, float eps, void* u,
                    int64_t u_stride, float* post, float* comb, int64_t tokens, int64_t dim,
                    void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  return run_mix<3>(x, x_token_stride, fn, scale, base, norm_eps, iters, eps, u, u_stride, post,
                    comb, tokens, dim, workspace, workspace_bytes, stream);
}

cudaError_t mhc_head(const void* x, int64_t x_token_stride, const float* fn, const float* scale,
                     const float* base, float norm_eps, float eps, void* y, int64_t y_stride,
                     int64_t tokens, int64_t dim, void* workspace, size_t workspace_bytes,
                     cudaStream_t stream) {
  return run_mix<1>(x, x_token_stride, fn, scale, base, norm_eps, 1, eps, y, y_stride, nullptr,
                    nullptr, tokens, dim, workspace, workspace_bytes, stream);
}

cudaError_t mhc_post(const void* f, int64_t f_stride, const void* residual,
                     int64_t res_token_stride, const float* post, const float* comb, void* out,
                     int64_t out_token_stride, int64_t tokens, int64_t dim, cudaStream_t stream) {
  if (tokens < 0 || dim < 0) return cudaErrorInvalidValue;
  if (tokens == 0 || dim == 0) return cudaSuccess;
  if (f == nullptr || residual == nullptr || post == nullptr || comb == nullptr || out == nullptr)
    return cudaErrorInvalidValue;
  if (tokens > INT_MAX || res_token_stride < kHc * dim || out_token_stride < kHc * dim ||
      f_stride < dim)
    return cudaErrorInvalidValue;
  const bool vec = dim % 8 == 0 && f_stride % 8 == 0 && res_token_stride % 8 == 0 &&
                   out_token_stride % 8 == 0 && aligned16(f) && aligned16(residual) &&
                   aligned16(out);
  const int64_t n_chunks = vec ? dim / 8 : dim;
  const int64_t col_blocks = (n_chunks + kThreads - 1) / kThreads;
  if (col_blocks > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(col_blocks));
  const auto* fb = static_cast<const uint16_t*>(f);
  const auto* rb = static_cast<const uint16_t*>(residual);
  auto* ob = static_cast<uint16_t*>(out);
  if (vec) {
    mhc_post_kernel<8><<<grid, kThreads, 0, stream>>>(fb, f_stride, rb, res_token_stride, post,
                                                      comb, ob, out_token_stride, dim, n_chunks);
  } else {
    mhc_post_kernel<1><<<grid, kThreads, 0, stream>>>(fb, f_stride, rb, res_token_stride, post,
                                                      comb, ob, out_token_stride, dim, n_chunks);
  }
  return cudaGetLastError();
}

}  // namespace dsv4
