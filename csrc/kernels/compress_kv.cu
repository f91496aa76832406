// dsv4 KV compressor CUDA kernels (torch-free; the contract is in include/dsv4/compress_kv.h).
//
// Kernels (the dispatcher at the bottom picks them; choices measured on H200, see the header):
// * per-CTA entry kernel (prefill): one CUDA block per (row, completed block) pair, grid.x =
//   B * max_blocks (max_blocks = ceil(max_seqlen / m); a row with more blocks loops with that
//   stride). Threads: FT = d/4 "feature threads" (4 features each, float4 loads) times S slot
//   groups; each thread runs an online per-feature softmax over its slots, the S partials are
//   merged in shared memory, then the whole block does the post-processing (cast, RMSNorm,
//   RoPE, quantisation simulation) on the d-vector in shared memory and stores the entry.
// * persistent cluster entry kernel (prefill with few HCA entries): a thread block cluster of
//   `cluster` CTAs shares each entry's slots; the partial (max, sum, acc) vectors are merged
//   by CTA rank 0 through distributed shared memory, which post-processes; clusters walk the
//   entries with a grid stride and prefetch their next entry's first slot chunk.
// * state kernel (same stream, after the entry kernel, which reads the old state): rewrites
//   the partial-block rows (and, for m == 4, the previous-block rows) of every row.
// * fused kernel (max_seqlen <= 4: decode / MTP): one cluster (usually one CTA) per row does
//   the entry and then, after a barrier, the state rewrite. One launch.
//
// Slots of entry i of a row whose chunk starts at block-offset r0 = start % m ("stream" =
// the r0 partial rows held in the state, then the new tokens): slot r of the block is stream
// index t = i*m + r; t < r0 reads state row (m==4 ? 4 : 0) + t, else token t - r0 with
// ape[r] added to its score. For m == 4 the first 4 slots are the A halves (cols 0..d) of the
// previous block: state rows 0..3 for i == 0, else stream (i-1)*4 + r; the last 4 slots are
// the B halves (cols d..2d) of the block itself.
#include "dsv4/compress_kv.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include "fp8_block_quant.cuh"
#include "own_error.cuh"

namespace dsv4 {
namespace {

constexpr int kMaxThreads = 512;    // threads of the entry / fused kernels
constexpr int kMaxHeadDim = 1024;
constexpr int kUnroll = 8;          // slots loaded per online-softmax step (16 float4 in flight)
constexpr int kChunk = 4;           // cluster kernels: slots per chunk (prefetched in registers)
constexpr int kFusedMaxTokens = 4;  // max_seqlen up to which one fused launch is used
constexpr int kStateThreads = 128;
constexpr int kMaxStateBlocksPerRow = 256;

struct Args {
  const float* kv;
  const float* score;
  int64_t kv_stride, score_stride, num_tokens;
  const float* ape;
  const float* weight;
  const float* freqs;
  int rope_pairs;
  const int32_t* cu;
  const int32_t* starts;
  float* skv;
  float* ssc;
  void* entries;
  int64_t e_bstride, e_rstride, capacity;
  // Paged / slotted layout (contracts.md A.1): slot_ids null = state row b; else state row
  // slot_ids[b] (rows with a slot outside [0, n_slots) are skipped). Dense entries: row
  // (slot_ids ? slot_ids[b] : b) < entry_rows, index j < capacity. Paged entries (bt != null):
  // entry j of step row b at block bt[b * bt_stride + j / block_size] (skipped if outside
  // [0, num_blocks) or j / block_size >= bt_cols), row j % block_size.
  const int32_t* slot_ids;
  int64_t n_slots, entry_rows;
  const int32_t* bt;
  int64_t bt_stride, bt_cols, block_size, num_blocks;
  // Entry format (CacheFormat): 0 plain OutT elements; 1 FP8 MODEL1 (584 bytes per entry,
  // d 512, rope 64), 2 FP8 indexer keys (d e4m3 bytes + fp32 scale). FP8: e_bstride is the
  // byte stride of a block (dense: of a row of `capacity` entries) and fp8_rows the entries
  // per block (block_size, or capacity when dense).
  int fmt;
  int64_t fp8_rows;
  int d, m, coff;
  int slots;       // coff * m: pooling slots of an entry = state rows of a batch row
  int groups;      // S: slot groups per entry
  int64_t max_blocks;    // entry kernel: blocks per batch row (grid.x = B * max_blocks)
  int64_t state_blocks;  // state kernel: blocks per batch row
  float eps;
  int quant;
  float hadamard_scale;  // d^-0.5 rounded to fp32 (the reference's x * n ** -0.5)
  int64_t batch;
  int cluster;           // cluster kernels: CTAs that share one entry's slots
};

// Token span of one batch row and its block arithmetic.
struct Row {
  bool valid;
  int64_t slot;         // state row (and dense entries row) of this step row
  int64_t tok0;         // first token of the row in kv / score
  int64_t n;            // new tokens
  int64_t r0;           // start % m: partial rows already held in the state
  int64_t first_block;  // start / m: entry index of the row's first completed block
  int64_t nb;           // blocks completed by this call
  int64_t rem;          // r0 + n - nb * m: rows of the partial block afterwards
};

__device__ __forceinline__ Row load_row(const Args& a, int64_t b) {
  Row r{};
  const int64_t c0 = a.cu[b], c1 = a.cu[b + 1], s = a.starts[b];
  r.slot = a.slot_ids != nullptr ? static_cast<int64_t>(a.slot_ids[b]) : b;
  r.valid = c0 >= 0 && c1 >= c0 && c1 <= a.num_tokens && s >= 0 && r.slot >= 0 &&
            r.slot < a.n_slots;
  if (!r.valid) return r;
  r.tok0 = c0;
  r.n = c1 - c0;
  r.r0 = s % a.m;
  r.first_block = s / a.m;
  r.nb = (r.r0 + r.n) / a.m;
  r.rem = r.r0 + r.n - r.nb * a.m;
  return r;
}

struct Src {
  const float* kv;
  const float* sc;
  const float* ape;  // nullptr when the score comes from the state (ape already added)
};

// Where slot s of entry i (row-relative block index) of row b reads its kv / score.
__device__ __forceinline__ Src slot_src(const Args& a, const Row& r, int64_t b, int64_t i,
                                        int s) {
  const int64_t w = static_cast<int64_t>(a.coff) * a.d;
  const float* skv = a.skv + r.slot * a.slots * w;
  const float* ssc = a.ssc + r.slot * a.slots * w;
  int64_t t;
  int64_t col = 0;
  if (a.coff == 2 && s < a.m) {  // A halves of the previous block
    if (i == 0) return {skv + s * w, ssc + s * w, nullptr};
    t = (i - 1) * a.m + s;
  } else if (a.coff == 2) {      // B halves of this block
    t = i * a.m + (s - a.m);
    col = a.d;
  } else {
    t = i * a.m + s;
  }
  if (t < r.r0) {
    const int64_t off = ((a.coff == 2 ? a.m : 0) + t) * w + col;
    return {skv + off, ssc + off, nullptr};
  }
  const int64_t tok = r.tok0 + t - r.r0;
  return {a.kv + tok * a.kv_stride + col, a.score + tok * a.score_stride + col,
          a.ape + (t % a.m) * w + col};
}

__device__ __forceinline__ float4 load4(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}

__device__ __forceinline__ float comp(const float4& v, int c) {
  return c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w;
}

// One online-softmax step for one feature over N slots (padding slots: score -inf).
template <int N>
__device__ __forceinline__ void online_step(float& M, float& L, float& A, const float (&sc)[N],
                                            const float (&kv)[N]) {
  float cm = sc[0];
#pragma unroll
  for (int u = 1; u < N; ++u) cm = fmaxf(cm, sc[u]);
  const float mn = fmaxf(M, cm);
  if (mn == -INFINITY) return;  // every slot so far has weight 0
  const float alpha = expf(M - mn);  // 0 when M == -inf, 1 when unchanged
  L *= alpha;
  A *= alpha;
#pragma unroll
  for (int u = 0; u < N; ++u) {
    const float e = expf(sc[u] - mn);
    L += e;
    A = fmaf(kv[u], e, A);
  }
  M = mn;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32); every thread gets the total.
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float s = lane < static_cast<int>(blockDim.x >> 5) ? red[lane] : 0.f;
    s = warp_sum(s);
    if (lane == 0) red[32] = s;
  }
  __syncthreads();
  const float total = red[32];
  __syncthreads();  // red may be reused right after
  return total;
}

template <typename OutT>
__device__ __forceinline__ float round_out(float v);
template <>
__device__ __forceinline__ float round_out<float>(float v) { return v; }
template <>
__device__ __forceinline__ float round_out<__nv_bfloat16>(float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}

template <typename OutT>
__device__ __forceinline__ OutT store_cast(float v);
template <>
__device__ __forceinline__ float store_cast<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 store_cast<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

using fp8q::ue8m0_ceil;

// Max of abs bits over the warp (fp8_block_quant.cuh: NaN > inf > finite values).
__device__ __forceinline__ uint32_t warp_max_bits(uint32_t b) {
  return fp8q::group_max_bits(b, 32);
}

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

struct Smem {
  float* part_m;  // [S, d] per-group running max
  float* part_l;  // [S, d] per-group sum of exp
  float* part_a;  // [S, d] per-group sum of exp * kv
  float* y;       // [d] the entry being built
  float* scales;  // [d / 32] quantisation scales
  float* red;     // [33] block reduction scratch
};

__device__ __forceinline__ Smem carve_smem(float* base, const Args& a) {
  Smem s;
  const int sd = a.groups * a.d;
  s.part_m = base;
  s.part_l = base + sd;
  s.part_a = base + 2 * sd;
  s.y = base + 3 * sd;
  s.scales = s.y + a.d;
  s.red = s.scales + (a.d + 31) / 32;
  return s;
}

// Where entry j of step row b goes: `base` = offset of its block (dense: of its entries row)
// in elements (plain) or bytes (FP8), `row` = its index inside the block. False when it has
// no place (dense: beyond the capacity or the entries rows; paged: no valid block). Uniform
// over a block (depends on block-uniform arguments only).
__device__ __forceinline__ bool entry_place(const Args& a, const Row& r, int64_t b, int64_t j,
                                            int64_t& base, int64_t& row) {
  if (a.bt == nullptr) {
    if (j >= a.capacity || r.slot >= a.entry_rows) return false;
    base = r.slot * a.e_bstride;
    row = j;
    return true;
  }
  const int64_t col = j / a.block_size;
  if (col >= a.bt_cols) return false;
  const int64_t blk = a.bt[b * a.bt_stride + col];
  if (blk < 0 || blk >= a.num_blocks) return false;
  base = blk * a.e_bstride;
  row = j - col * a.block_size;
  return true;
}

// Biased exponent byte (UE8M0 / float8_e8m0fnu) of a power-of-two fp32 scale.
__device__ __forceinline__ uint8_t e8m0_byte(float s) {
  return static_cast<uint8_t>((__float_as_uint(s) >> 23) & 0xffu);
}

// Stores the finished entry y[0, d) (values already rounded as the reference rounds them) at
// (base, row) in the entry format. FP8 formats quantise here (include/dsv4/kv_cache.h):
// MODEL1: e4m3 of y / s per 64-block of the 448 nope dims with s = 2^ceil(log2(max(amax,
// 1e-4) / 448)) (exactly ops.quant.fp8_e4m3_sim, NaN / inf as fp8_block_quant.cuh), rope dims
// as bf16; indexer: the same with one block of d and an fp32 scale. Called by every thread of
// the block; `scales` holds at least d / 32 floats. Contains __syncthreads (block-uniform call).
template <typename OutT>
__device__ void store_entry(const Args& a, int64_t base, int64_t row, const float* y,
                            float* scales) {
  const int d = a.d, tid = threadIdx.x, nt = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, n_warps = nt >> 5;
  if (a.fmt == 0) {
    OutT* out = static_cast<OutT*>(a.entries) + base + row * a.e_rstride;
    for (int f = tid; f < d; f += nt) out[f] = store_cast<OutT>(y[f]);
    return;
  }
  uint8_t* blk = static_cast<uint8_t*>(a.entries) + base;
  if (a.fmt == 1) {  // MODEL1: [rows x (448 e4m3 | 64 bf16)] then [rows x (7 e8m0 | pad)]
    constexpr int kNope = 448, kTok = 576;
    for (int g = warp; g < kNope / 64; g += n_warps) {
      const uint32_t amax = warp_max_bits(
          max(fp8q::abs_bits(y[g * 64 + lane]), fp8q::abs_bits(y[g * 64 + 32 + lane])));
      if (lane == 0) scales[g] = fp8q::e4m3_block_scale(amax);
    }
    __syncthreads();
    uint8_t* tok = blk + row * kTok;
    for (int f = tid; f < kNope; f += nt) tok[f] = fp8q::e4m3_code(y[f], 1.0f / scales[f >> 6]);
    __nv_bfloat16* rope = reinterpret_cast<__nv_bfloat16*>(tok + kNope);
    for (int f = kNope + tid; f < d; f += nt) rope[f - kNope] = __float2bfloat16_rn(y[f]);
    uint8_t* sc = blk + a.fp8_rows * kTok + row * 8;
    if (tid < 8) sc[tid] = tid < 7 ? e8m0_byte(scales[tid]) : uint8_t{0};
    return;
  }
  // Indexer keys: [rows x d e4m3] then [rows x fp32 scale].
  // (the maxima of the 32-groups are kept as their abs bits in `scales`)
  for (int g = warp; g < d / 32; g += n_warps) {
    const uint32_t amax = warp_max_bits(fp8q::abs_bits(y[g * 32 + lane]));
    if (lane == 0) scales[g] = __uint_as_float(amax);
  }
  __syncthreads();
  uint32_t amax = 0u;
  for (int g = 0; g < d / 32; ++g) amax = max(amax, __float_as_uint(scales[g]));
  const float s = fp8q::e4m3_block_scale(amax), inv = 1.0f / s;
  uint8_t* vals = blk + row * d;
  for (int f = tid; f < d; f += nt) vals[f] = fp8q::e4m3_code(y[f], inv);
  if (tid == 0) *reinterpret_cast<float*>(blk + a.fp8_rows * d + row * 4) = s;
  __syncthreads();  // scales may be reused by the caller
}

// Computes entry i of row b and stores it at its place in `entries` (entry_place; nothing
// when it has none). Called by every thread of the block (block-uniform arguments); ends with a
// __syncthreads, so shared memory may be reused right after.
template <typename OutT>
__device__ void compute_entry(const Args& a, const Row& r, int64_t b, int64_t i,
                              const Smem& sm) {
  const int64_t j = r.first_block + i;
  int64_t base = 0, row = 0;
  if (!entry_place(a, r, b, j, base, row)) return;  // not written (documented); block-uniform
  const int d = a.d, ft_count = d / 4, tid = threadIdx.x, nt = blockDim.x;

  // 1. Per-feature online softmax over this thread's slots, partials to shared memory.
  if (tid < ft_count * a.groups) {
    const int ft = tid % ft_count, sg = tid / ft_count;
    const int per = (a.slots + a.groups - 1) / a.groups;
    const int s_begin = sg * per;
    const int s_end = min(a.slots, s_begin + per);
    float M[4], L[4], A[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      M[c] = -INFINITY;
      L[c] = 0.f;
      A[c] = 0.f;
    }
    for (int s0 = s_begin; s0 < s_end; s0 += kUnroll) {
      float4 kvv[kUnroll], scv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (s0 + u < s_end) {
          const Src src = slot_src(a, r, b, i, s0 + u);
          kvv[u] = load4(src.kv + 4 * ft);
          scv[u] = load4(src.sc + 4 * ft);
          if (src.ape != nullptr) {
            const float4 ap = load4(src.ape + 4 * ft);
            scv[u].x += ap.x;
            scv[u].y += ap.y;
            scv[u].z += ap.z;
            scv[u].w += ap.w;
          }
        } else {
          kvv[u] = make_float4(0.f, 0.f, 0.f, 0.f);
          scv[u] = make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
        }
      }
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float sc[kUnroll], kv[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          sc[u] = comp(scv[u], c);
          kv[u] = comp(kvv[u], c);
        }
        online_step(M[c], L[c], A[c], sc, kv);
      }
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int idx = sg * d + 4 * ft + c;
      sm.part_m[idx] = M[c];
      sm.part_l[idx] = L[c];
      sm.part_a[idx] = A[c];
    }
  }
  __syncthreads();

  // 2. Merge the slot groups: pooled = sum(e * kv) / sum(e). All slots -inf gives 0/0 = NaN,
  // as the reference's softmax does.
  float ss = 0.f;
  for (int f = tid; f < d; f += nt) {
    float mx = -INFINITY;
    for (int g = 0; g < a.groups; ++g) mx = fmaxf(mx, sm.part_m[g * d + f]);
    float l = 0.f, acc = 0.f;
    for (int g = 0; g < a.groups; ++g) {
      const float mg = sm.part_m[g * d + f];
      if (mg == -INFINITY) continue;
      const float e = expf(mg - mx);
      l = fmaf(sm.part_l[g * d + f], e, l);
      acc = fmaf(sm.part_a[g * d + f], e, acc);
    }
    // pooled.to(entry dtype)
    const float x = round_out<OutT>(acc / l);
    sm.y[f] = x;
    ss = fmaf(x, x, ss);
  }

  // 3. RMSNorm: y = w * (x * rsqrt(mean(x^2) + eps)), cast.
  ss = block_sum(ss, sm.red);
  const float rstd = 1.0f / sqrtf(ss / static_cast<float>(d) + a.eps);
  for (int f = tid; f < d; f += nt) {
    sm.y[f] = round_out<OutT>(a.weight[f] * (sm.y[f] * rstd));
  }
  __syncthreads();

  // 4. RoPE at the block's first position on the last rd dims (interleaved pairs), cast.
  const int nope = d - 2 * a.rope_pairs;
  const float pos = static_cast<float>(j * a.m);
  for (int p = tid; p < a.rope_pairs; p += nt) {
    const float ang = pos * a.freqs[p];
    float sn, cs;
    sincosf(ang, &sn, &cs);
    const float x0 = sm.y[nope + 2 * p], x1 = sm.y[nope + 2 * p + 1];
    // (x0 + i x1) * (cs + i sn), without FMA contraction (as the reference's complex product)
    const float re = __fsub_rn(__fmul_rn(x0, cs), __fmul_rn(x1, sn));
    const float im = __fadd_rn(__fmul_rn(x0, sn), __fmul_rn(x1, cs));
    sm.y[nope + 2 * p] = round_out<OutT>(re);
    sm.y[nope + 2 * p + 1] = round_out<OutT>(im);
  }
  __syncthreads();

  // 5. Quantisation simulation (block scales: one warp per block, amax by shuffles).
  const int lane = tid & 31, warp = tid >> 5, n_warps = nt >> 5;
  if (a.quant == static_cast<int>(CompressQuant::kFp8)) {
    const int n_groups = nope / 64;
    for (int g = warp; g < n_groups; g += n_warps) {  // one warp per 64-block
      const uint32_t amax = warp_max_bits(
          max(fp8q::abs_bits(sm.y[g * 64 + lane]), fp8q::abs_bits(sm.y[g * 64 + 32 + lane])));
      if (lane == 0) sm.scales[g] = fp8q::e4m3_block_scale(amax);
    }
    __syncthreads();
    for (int f = tid; f < nope; f += nt) {
      const float s = sm.scales[f / 64];
      sm.y[f] = round_out<OutT>(fp8q::e4m3_sim(sm.y[f], s, 1.0f / s));
    }
    __syncthreads();
  } else if (a.quant == static_cast<int>(CompressQuant::kFp4Hadamard)) {
    for (int h = 1; h < d; h <<= 1) {  // Sylvester butterflies, fp32
      for (int q = tid; q < d / 2; q += nt) {
        const int i0 = (q / h) * 2 * h + (q % h);
        const float x0 = sm.y[i0], x1 = sm.y[i0 + h];
        sm.y[i0] = x0 + x1;
        sm.y[i0 + h] = x0 - x1;
      }
      __syncthreads();
    }
    for (int f = tid; f < d; f += nt) sm.y[f] = round_out<OutT>(sm.y[f] * a.hadamard_scale);
    __syncthreads();
    const int n_groups = d / 32;
    for (int g = warp; g < n_groups; g += n_warps) {  // one warp per 32-block
      const float amax = warp_max(fabsf(sm.y[g * 32 + lane]));
      if (lane == 0) sm.scales[g] = ue8m0_ceil(fmaxf(amax, 6.0f * 0x1p-126f) / 6.0f);
    }
    __syncthreads();
    for (int f = tid; f < d; f += nt) {
      const float s = sm.scales[f / 32];
      const float v = fminf(fmaxf(sm.y[f] / s, -6.0f), 6.0f);
      sm.y[f] = round_out<OutT>(e2m1_round(v) * s);
    }
    __syncthreads();
  }

  // 6. Store.
  store_entry<OutT>(a, base, row, sm.y, sm.scales);
  __syncthreads();
}

// Copies one state element quad: kv as is, score + ape (new tokens only).
__device__ __forceinline__ void put_token(const Args& a, const Row& r, int64_t t, int64_t col,
                                          float* dkv, float* dsc) {
  const int64_t w = static_cast<int64_t>(a.coff) * a.d;
  const int64_t tok = r.tok0 + t - r.r0;
  const float4 kv = load4(a.kv + tok * a.kv_stride + col);
  float4 sc = load4(a.score + tok * a.score_stride + col);
  const float4 ap = load4(a.ape + (t % a.m) * w + col);
  sc.x += ap.x;
  sc.y += ap.y;
  sc.z += ap.z;
  sc.w += ap.w;
  *reinterpret_cast<float4*>(dkv) = kv;
  *reinterpret_cast<float4*>(dsc) = sc;
}

// Rewrites the state of row b (Compressor.forward's state update). Work items are indexed
// [first, limit) with stride `step`; for m == 4 one item is a column quad over all state rows
// (the same thread reads the old partial rows before it overwrites them, so no other thread
// may touch that quad); for other m an item is (tail row, column quad): no old state is read.
__device__ void update_state(const Args& a, const Row& r, int64_t b, int64_t first,
                             int64_t step) {
  const int64_t w = static_cast<int64_t>(a.coff) * a.d;
  const int64_t quads = w / 4;
  float* skv = a.skv + r.slot * a.slots * w;
  float* ssc = a.ssc + r.slot * a.slots * w;
  // Rows 0..k_lo-1 of the partial block already hold their values (nb == 0: the old rows).
  const int64_t k_lo = r.nb == 0 ? r.r0 : 0;
  const int64_t n_tail = r.rem - k_lo;
  if (a.coff == 2) {
    const int64_t m = a.m;  // == 4
    for (int64_t q = first; q < quads; q += step) {
      const int64_t col = 4 * q;
      if (r.nb > 0) {  // rows 0..3 <- the last completed block (stream (nb-1)*4 + rr)
        for (int64_t rr = 0; rr < m; ++rr) {
          const int64_t t = (r.nb - 1) * m + rr;
          if (t < r.r0) {  // still in the old partial rows (rows 4 + t, read before written)
            const float4 kv = load4(skv + (m + t) * w + col);
            const float4 sc = load4(ssc + (m + t) * w + col);
            *reinterpret_cast<float4*>(skv + rr * w + col) = kv;
            *reinterpret_cast<float4*>(ssc + rr * w + col) = sc;
          } else {
            put_token(a, r, t, col, skv + rr * w + col, ssc + rr * w + col);
          }
        }
      }
      for (int64_t k = k_lo; k < r.rem; ++k) {  // partial rows 4 + k <- stream nb*4 + k
        put_token(a, r, r.nb * m + k, col, skv + (m + k) * w + col, ssc + (m + k) * w + col);
      }
    }
  } else {
    for (int64_t it = first; it < n_tail * quads; it += step) {
      const int64_t k = k_lo + it / quads, col = 4 * (it % quads);
      put_token(a, r, r.nb * a.m + k, col, skv + k * w + col, ssc + k * w + col);
    }
  }
}

template <typename OutT>
__global__ void __launch_bounds__(kMaxThreads) compress_entries_per_cta_kernel(const Args a) {
  extern __shared__ float smem_raw[];
  const Smem sm = carve_smem(smem_raw, a);
  const int64_t b = blockIdx.x / a.max_blocks;
  const int64_t i0 = blockIdx.x % a.max_blocks;
  const Row r = load_row(a, b);
  if (!r.valid) return;
  for (int64_t i = i0; i < r.nb; i += a.max_blocks) compute_entry<OutT>(a, r, b, i, sm);
}

__global__ void __launch_bounds__(kStateThreads) compress_state_kernel(const Args a) {
  const int64_t b = blockIdx.x / a.state_blocks;
  const int64_t blk = blockIdx.x % a.state_blocks;
  const Row r = load_row(a, b);
  if (!r.valid || r.n == 0) return;
  update_state(a, r, b, blk * blockDim.x + threadIdx.x, a.state_blocks * blockDim.x);
}

// =============================================================================================
// Cluster kernels (fused decode kernel and persistent entry kernel): the same arithmetic as
// compute_entry, with the slots of an entry split over `cluster` CTAs (cluster == 1: one CTA).
// Post-processing reads the RMSNorm weight / RoPE frequencies from shared memory, scales by
// exact power-of-two reciprocals instead of dividing (bitwise the same), and indexes the
// Hadamard butterflies with bit operations.
// =============================================================================================
namespace cg = cooperative_groups;

struct ClusterSmem {
  float* part_m;  // [S, d]
  float* part_l;  // [S, d]
  float* part_a;  // [S, d]
  float* y;       // [d]
  float* w;       // [d] RMSNorm weight
  float* freqs;   // [rope_pairs]
  float* scales;  // [d / 32 + 1]
  float* inv;     // [d / 32 + 1]
  float* red;     // [33]
};

__host__ __device__ inline size_t cluster_smem_floats(int groups, int d, int rope_pairs) {
  return 3 * static_cast<size_t>(groups) * d + 2 * static_cast<size_t>(d) + rope_pairs +
         2 * (d / 32 + 1) + 33;
}

__device__ __forceinline__ ClusterSmem carve_cluster_smem(float* base, const Args& a) {
  ClusterSmem s;
  const int sd = a.groups * a.d;
  s.part_m = base;
  s.part_l = base + sd;
  s.part_a = base + 2 * sd;
  s.y = base + 3 * sd;
  s.w = s.y + a.d;
  s.freqs = s.w + a.d;
  s.scales = s.freqs + a.rope_pairs;
  s.inv = s.scales + (a.d / 32 + 1);
  s.red = s.inv + (a.d / 32 + 1);
  return s;
}

__device__ __forceinline__ void load_constants(const Args& a, const ClusterSmem& sm) {
  for (int f = threadIdx.x; f < a.d; f += blockDim.x) sm.w[f] = a.weight[f];
  for (int p = threadIdx.x; p < a.rope_pairs; p += blockDim.x) sm.freqs[p] = a.freqs[p];
  // visible after the next __syncthreads (there is one before any use)
}

struct Chunk {
  float4 kv[kChunk];
  float4 sc[kChunk];
};

// Slot range of slot group sg of CTA `rank` (cluster * groups groups over the slots).
__device__ __forceinline__ void group_range(const Args& a, int rank, int sg, int& s_begin,
                                            int& s_end) {
  const int ng = a.cluster * a.groups;
  const int per = (a.slots + ng - 1) / ng;
  s_begin = min(a.slots, (rank * a.groups + sg) * per);
  s_end = min(a.slots, s_begin + per);
}

__device__ __forceinline__ void load_chunk(const Args& a, const Row& r, int64_t b, int64_t i,
                                           int s0, int s_end, int ft, Chunk& ch) {
#pragma unroll
  for (int u = 0; u < kChunk; ++u) {
    if (s0 + u < s_end) {
      const Src src = slot_src(a, r, b, i, s0 + u);
      ch.kv[u] = load4(src.kv + 4 * ft);
      ch.sc[u] = load4(src.sc + 4 * ft);
    }
  }
}

// Adds ape to the new tokens' scores (in place), pads, and runs the online softmax step.
__device__ __forceinline__ void consume_chunk(const Args& a, const Row& r, int64_t b, int64_t i,
                                              int s0, int s_end, int ft, Chunk& ch,
                                              float (&M)[4], float (&L)[4], float (&A)[4]) {
#pragma unroll
  for (int u = 0; u < kChunk; ++u) {
    if (s0 + u < s_end) {
      const Src src = slot_src(a, r, b, i, s0 + u);
      if (src.ape != nullptr) {
        const float4 ap = load4(src.ape + 4 * ft);
        ch.sc[u].x += ap.x;
        ch.sc[u].y += ap.y;
        ch.sc[u].z += ap.z;
        ch.sc[u].w += ap.w;
      }
    } else {
      ch.kv[u] = make_float4(0.f, 0.f, 0.f, 0.f);
      ch.sc[u] = make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
    }
  }
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    float sc[kChunk], kv[kChunk];
#pragma unroll
    for (int u = 0; u < kChunk; ++u) {
      sc[u] = comp(ch.sc[u], c);
      kv[u] = comp(ch.kv[u], c);
    }
    online_step(M[c], L[c], A[c], sc, kv);
  }
}

// Issues the loads of the first slot chunk of item (b, i) of this thread (if it pools).
__device__ __forceinline__ void prefetch_first_chunk(const Args& a, const Row& r, int64_t b,
                                                     int64_t i, int rank, Chunk& ch) {
  const int ft_count = a.d / 4;
  if (static_cast<int>(threadIdx.x) < ft_count * a.groups) {
    const int ft = threadIdx.x % ft_count, sg = threadIdx.x / ft_count;
    int s_begin, s_end;
    group_range(a, rank, sg, s_begin, s_end);
    if (s_begin < s_end) load_chunk(a, r, b, i, s_begin, s_end, ft, ch);
  }
}

// Pools this CTA's slots of item (b, i) (first chunk already in `ch`) and leaves the CTA's
// merged partials (max, sum of exp, sum of exp * kv) in part_m/l/a[0 .. d). Ends with a
// __syncthreads.
__device__ __forceinline__ void pool_cluster(const Args& a, const Row& r, int64_t b, int64_t i,
                                             int rank, Chunk& ch, const ClusterSmem& sm) {
  const int d = a.d, ft_count = d / 4, tid = threadIdx.x, nt = blockDim.x;
  if (tid < ft_count * a.groups) {
    const int ft = tid % ft_count, sg = tid / ft_count;
    int s_begin, s_end;
    group_range(a, rank, sg, s_begin, s_end);
    float M[4], L[4], A[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      M[c] = -INFINITY;
      L[c] = 0.f;
      A[c] = 0.f;
    }
    for (int s0 = s_begin; s0 < s_end; s0 += kChunk) {
      if (s0 != s_begin) load_chunk(a, r, b, i, s0, s_end, ft, ch);
      consume_chunk(a, r, b, i, s0, s_end, ft, ch, M, L, A);
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int idx = sg * d + 4 * ft + c;
      sm.part_m[idx] = M[c];
      sm.part_l[idx] = L[c];
      sm.part_a[idx] = A[c];
    }
  }
  __syncthreads();
  if (a.groups > 1) {
    for (int f = tid; f < d; f += nt) {
      float mx = -INFINITY;
      for (int g = 0; g < a.groups; ++g) mx = fmaxf(mx, sm.part_m[g * d + f]);
      float l = 0.f, acc = 0.f;
      for (int g = 0; g < a.groups; ++g) {
        const float mg = sm.part_m[g * d + f];
        if (mg == -INFINITY) continue;
        const float e = expf(mg - mx);
        l = fmaf(sm.part_l[g * d + f], e, l);
        acc = fmaf(sm.part_a[g * d + f], e, acc);
      }
      sm.part_m[f] = mx;  // this thread owns feature f: row 0 was read above
      sm.part_l[f] = l;
      sm.part_a[f] = acc;
    }
    __syncthreads();
  }
}

// Thread block clusters exist from sm_90 on; the host never asks for cluster > 1 on an older
// device (device_has_clusters), so the pre-sm_90 builds of these branches are unreachable.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define DSV4_NO_CLUSTERS 1
#endif

__device__ __forceinline__ void cluster_or_cta_sync(const Args& a) {
  if (a.cluster > 1) {
#ifdef DSV4_NO_CLUSTERS
    __trap();
#else
    cg::this_cluster().sync();
#endif
  } else {
    __syncthreads();
  }
}

// CTA rank 0: merges the partials of the cluster's CTAs and builds entry j (RoPE position
// j * m), stored at (base, row) (entry_place).
template <typename OutT>
__device__ void finish_cluster(const Args& a, int64_t j, int64_t base, int64_t row,
                               const ClusterSmem& sm) {
  const int d = a.d, tid = threadIdx.x, nt = blockDim.x;
  float ss = 0.f;
  for (int f = tid; f < d; f += nt) {
    float l, acc;
    if (a.cluster == 1) {
      // One partial: e = exp(0) = 1 (exactly the general formula's value).
      l = sm.part_m[f] == -INFINITY ? 0.f : sm.part_l[f];
      acc = sm.part_m[f] == -INFINITY ? 0.f : sm.part_a[f];
    } else {
#ifdef DSV4_NO_CLUSTERS
      __trap();
#else
      cg::cluster_group cl = cg::this_cluster();
      float mx = -INFINITY;
      for (int k = 0; k < a.cluster; ++k) mx = fmaxf(mx, *cl.map_shared_rank(sm.part_m + f, k));
      l = 0.f;
      acc = 0.f;
      for (int k = 0; k < a.cluster; ++k) {
        const float mk = *cl.map_shared_rank(sm.part_m + f, k);
        if (mk == -INFINITY) continue;
        const float e = expf(mk - mx);
        l = fmaf(*cl.map_shared_rank(sm.part_l + f, k), e, l);
        acc = fmaf(*cl.map_shared_rank(sm.part_a + f, k), e, acc);
      }
#endif
    }
    const float x = round_out<OutT>(acc / l);  // pooled.to(entry dtype); 0/0 = NaN if no slot
    sm.y[f] = x;
    ss = fmaf(x, x, ss);
  }
  ss = block_sum(ss, sm.red);  // also makes sm.w / sm.freqs visible
  const float rstd = 1.0f / sqrtf(ss / static_cast<float>(d) + a.eps);
  for (int f = tid; f < d; f += nt) sm.y[f] = round_out<OutT>(sm.w[f] * (sm.y[f] * rstd));
  __syncthreads();

  const int nope = d - 2 * a.rope_pairs;
  const float pos = static_cast<float>(j * a.m);
  for (int p = tid; p < a.rope_pairs; p += nt) {
    const float ang = pos * sm.freqs[p];
    float sn, cs;
    sincosf(ang, &sn, &cs);
    const float x0 = sm.y[nope + 2 * p], x1 = sm.y[nope + 2 * p + 1];
    const float re = __fsub_rn(__fmul_rn(x0, cs), __fmul_rn(x1, sn));
    const float im = __fadd_rn(__fmul_rn(x0, sn), __fmul_rn(x1, cs));
    sm.y[nope + 2 * p] = round_out<OutT>(re);
    sm.y[nope + 2 * p + 1] = round_out<OutT>(im);
  }
  __syncthreads();

  const int lane = tid & 31, warp = tid >> 5, n_warps = nt >> 5;
  if (a.quant == static_cast<int>(CompressQuant::kFp8)) {
    const int n_groups = nope / 64;
    for (int g = warp; g < n_groups; g += n_warps) {
      const uint32_t amax = warp_max_bits(
          max(fp8q::abs_bits(sm.y[g * 64 + lane]), fp8q::abs_bits(sm.y[g * 64 + 32 + lane])));
      if (lane == 0) {
        const float s = fp8q::e4m3_block_scale(amax);
        sm.scales[g] = s;
        sm.inv[g] = 1.0f / s;  // exact: s is a power of two
      }
    }
    __syncthreads();
    for (int f = tid; f < nope; f += nt) {
      const int g = f >> 6;
      sm.y[f] = round_out<OutT>(fp8q::e4m3_sim(sm.y[f], sm.scales[g], sm.inv[g]));
    }
    __syncthreads();
  } else if (a.quant == static_cast<int>(CompressQuant::kFp4Hadamard)) {
    for (int h = 1; h < d; h <<= 1) {
      for (int q = tid; q < d / 2; q += nt) {
        const int i0 = ((q & ~(h - 1)) << 1) | (q & (h - 1));
        const float x0 = sm.y[i0], x1 = sm.y[i0 + h];
        sm.y[i0] = x0 + x1;
        sm.y[i0 + h] = x0 - x1;
      }
      __syncthreads();
    }
    for (int f = tid; f < d; f += nt) sm.y[f] = round_out<OutT>(sm.y[f] * a.hadamard_scale);
    __syncthreads();
    const int n_groups = d / 32;
    for (int g = warp; g < n_groups; g += n_warps) {
      const float amax = warp_max(fabsf(sm.y[g * 32 + lane]));
      if (lane == 0) {
        const float s = ue8m0_ceil(fmaxf(amax, 6.0f * 0x1p-126f) / 6.0f);
        sm.scales[g] = s;
        sm.inv[g] = 1.0f / s;
      }
    }
    __syncthreads();
    for (int f = tid; f < d; f += nt) {
      const int g = f >> 5;
      const float v = fminf(fmaxf(sm.y[f] * sm.inv[g], -6.0f), 6.0f);
      sm.y[f] = round_out<OutT>(e2m1_round(v) * sm.scales[g]);
    }
    __syncthreads();
  }

  store_entry<OutT>(a, base, row, sm.y, sm.scales);
}

// Work items: item `it` in [0, B * max_blocks) is (row it / max_blocks, ii = it % max_blocks)
// and covers that row's entries ii, ii + max_blocks, ... (repetition k) so that a row with
// more blocks than max_blocks is still complete. Advances (it, k) to the next entry this call
// must emit (it += stride, k = 0 when a row's item is exhausted); false when none is left.
// `b` / `r` cache the last row loaded.
__device__ __forceinline__ bool find_item(const Args& a, int64_t stride, int64_t& it, int64_t& k,
                                          int64_t& b, Row& r, int64_t& i) {
  const int64_t total = a.batch * a.max_blocks;
  for (; it < total; it += stride, k = 0) {
    const int64_t bb = it / a.max_blocks, ii = it % a.max_blocks;
    if (bb != b) {
      r = load_row(a, bb);
      b = bb;
    }
    if (!r.valid) continue;
    const int64_t cand = ii + k * a.max_blocks;
    int64_t base, row;
    if (cand < r.nb && entry_place(a, r, bb, r.first_block + cand, base, row)) {
      i = cand;
      return true;
    }
  }
  return false;
}

template <typename OutT>
__global__ void __launch_bounds__(kMaxThreads) compress_entries_persistent_kernel(const Args a) {
  extern __shared__ float smem_raw[];
  const ClusterSmem sm = carve_cluster_smem(smem_raw, a);
  load_constants(a, sm);
  const int rank = static_cast<int>(blockIdx.x % a.cluster);
  const int64_t cid = blockIdx.x / a.cluster, n_clusters = gridDim.x / a.cluster;
  int64_t it = cid, k = 0, b = -1, i = 0;
  Row r{};
  bool have = find_item(a, n_clusters, it, k, b, r, i);
  Chunk ch;
  if (have) prefetch_first_chunk(a, r, b, i, rank, ch);
  while (have) {
    pool_cluster(a, r, b, i, rank, ch, sm);
    int64_t nit = it, nk = k + 1, nb_ = b, ni = 0;
    Row nr = r;
    const bool have_next = find_item(a, n_clusters, nit, nk, nb_, nr, ni);
    // The next entry's first chunk is in flight while this one is post-processed.
    if (have_next) prefetch_first_chunk(a, nr, nb_, ni, rank, ch);
    cluster_or_cta_sync(a);  // every CTA's partials are ready
    if (rank == 0) {
      int64_t base = 0, row = 0;
      entry_place(a, r, b, r.first_block + i, base, row);  // true: find_item checked it
      finish_cluster<OutT>(a, r.first_block + i, base, row, sm);
    }
    cluster_or_cta_sync(a);  // partials (local and remote) and y may be overwritten
    have = have_next;
    it = nit;
    k = nk;
    b = nb_;
    i = ni;
    r = nr;
  }
}

template <typename OutT>
__global__ void __launch_bounds__(kMaxThreads) compress_fused_kernel(const Args a) {
  extern __shared__ float smem_raw[];
  const ClusterSmem sm = carve_cluster_smem(smem_raw, a);
  load_constants(a, sm);
  const int rank = static_cast<int>(blockIdx.x % a.cluster);
  const int64_t b = blockIdx.x / a.cluster;
  const Row r = load_row(a, b);
  if (!r.valid || r.n == 0) return;  // uniform over the cluster (same row)
  Chunk ch;
  for (int64_t i = 0; i < r.nb; ++i) {
    const int64_t j = r.first_block + i;
    int64_t base = 0, row = 0;
    if (!entry_place(a, r, b, j, base, row)) continue;  // uniform over the cluster (same row)
    prefetch_first_chunk(a, r, b, i, rank, ch);
    pool_cluster(a, r, b, i, rank, ch, sm);
    cluster_or_cta_sync(a);
    if (rank == 0) finish_cluster<OutT>(a, j, base, row, sm);
    cluster_or_cta_sync(a);  // also: every read of the old state is done
  }
  __syncthreads();
  update_state(a, r, b, static_cast<int64_t>(rank) * blockDim.x + threadIdx.x,
               static_cast<int64_t>(a.cluster) * blockDim.x);
}

// SMs of the current device, 132 (the planning default) while unknown. Cached per device,
// successful queries only (DeviceQueryCache, own_error.cuh): a failed query (its own error
// cleared) or a call while the caller has an error pending (no query made) gets 132 this time,
// and the next call asks again.
int device_sm_count() {
  static DeviceQueryCache cache;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 132;
  const int n = cache.get(dev, 0, [dev](int& v) {
    return cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev);
  });
  return n > 0 ? n : 132;
}

// Whether the current device supports thread block clusters (compute capability >= 9.0).
// Cached as device_sm_count; no clusters (a cluster size of 1) while unknown.
bool device_has_clusters() {
  static DeviceQueryCache cache;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  return cache.get(dev, 0, [dev](int& yes) {
    int major = 0;
    const cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    yes = major >= 9 ? 1 : 0;
    return err;
  }) != 0;
}

template <typename Kernel>
cudaError_t launch_maybe_cluster(Kernel kernel, unsigned grid, int threads, size_t smem,
                                 int cluster, cudaStream_t stream, const Args& a) {
  if (cluster <= 1) {
    kernel<<<grid, threads, smem, stream>>>(a);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, a);
}

// Slot groups per CTA for a cluster of `cluster` CTAs per entry (one 4-slot chunk per thread
// where possible); returns the block size and sets a.groups / a.cluster.
int config_cluster(Args& a, int cluster, size_t& smem) {
  const int ft_count = a.d / 4;
  a.cluster = device_has_clusters() ? std::max(1, cluster) : 1;
  const int per_cta = (a.slots + a.cluster - 1) / a.cluster;
  const int want = (per_cta + kChunk - 1) / kChunk;
  a.groups = std::max(1, std::min(kMaxThreads / ft_count, want));
  smem = cluster_smem_floats(a.groups, a.d, a.rope_pairs) * sizeof(float);
  return (ft_count * a.groups + 31) / 32 * 32;
}

// Decode / MTP (max_seqlen <= kFusedMaxTokens): one launch, one cluster per batch row.
template <typename OutT>
cudaError_t launch_fused(Args a, int64_t batch, int cluster, cudaStream_t stream) {
  if (batch * cluster > INT_MAX) cluster = 1;
  size_t smem = 0;
  const int threads = config_cluster(a, cluster, smem);
  return launch_maybe_cluster(compress_fused_kernel<OutT>,
                              static_cast<unsigned>(batch * a.cluster), threads, smem,
                              a.cluster, stream, a);
}

// Prefill, persistent entry kernel (clusters of `cluster` CTAs per entry).
template <typename OutT>
cudaError_t launch_entries_persistent(Args a, int64_t batch, int cluster, cudaStream_t stream) {
  size_t smem = 0;
  const int threads = config_cluster(a, cluster, smem);
  int per_sm = 0;
  cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, compress_entries_persistent_kernel<OutT>, threads, smem);
  if (err != cudaSuccess) return err;
  const int64_t items = batch * a.max_blocks;
  const int64_t resident =
      std::max<int64_t>(1, int64_t(device_sm_count()) * std::max(1, per_sm) / a.cluster);
  const int64_t n_clusters = std::max<int64_t>(1, std::min(items, resident));
  return launch_maybe_cluster(compress_entries_persistent_kernel<OutT>,
                              static_cast<unsigned>(n_clusters * a.cluster), threads, smem,
                              a.cluster, stream, a);
}

// Prefill, one CTA per (row, entry) (grid.x = B * max_blocks).
template <typename OutT>
cudaError_t launch_entries_per_cta(const Args& a, int64_t batch, int threads, size_t smem,
                                   cudaStream_t stream) {
  compress_entries_per_cta_kernel<OutT>
      <<<static_cast<unsigned>(batch * a.max_blocks), threads, smem, stream>>>(a);
  return cudaGetLastError();
}

// Picks the kernels (the choices measured fastest on H200, see compress_kv.h) and launches.
template <typename OutT>
cudaError_t dispatch(const Args& a, int64_t batch, int64_t max_seqlen, int threads, size_t smem,
                     int variant, int cluster, cudaStream_t stream) {
  if (max_seqlen <= kFusedMaxTokens) {
    const int c = cluster > 0 ? std::min(cluster, 8) : (a.slots >= 64 ? 4 : 1);
    return launch_fused<OutT>(a, batch, c, stream);
  }
  bool persistent = variant == 2;
  int c = cluster > 0 ? std::min(cluster, 8) : (a.slots >= 64 ? 2 : 1);
  if (variant == 0) {  // few HCA entries: split each over 2 CTAs; else one CTA per entry
    persistent = a.slots >= 64 && 2 * batch * a.max_blocks <= device_sm_count();
    c = 2;
  }
  cudaError_t err = persistent ? launch_entries_persistent<OutT>(a, batch, c, stream)
                               : launch_entries_per_cta<OutT>(a, batch, threads, smem, stream);
  if (err != cudaSuccess) return err;
  compress_state_kernel<<<static_cast<unsigned>(batch * a.state_blocks), kStateThreads, 0,
                          stream>>>(a);
  return cudaGetLastError();
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

namespace detail {
cudaError_t compress_kv_variant(const CompressKVParams& p, int variant, int cluster,
                                cudaStream_t stream) {
  const int64_t d = p.head_dim, m = p.compress_ratio, rd = p.rope_dim;
  if (p.batch < 0 || p.num_tokens < 0 || p.max_seqlen < 0 || p.capacity < 0) {
    return cudaErrorInvalidValue;
  }
  const bool paged = p.block_table != nullptr;
  if (p.slots != nullptr && p.num_slots < 0) return cudaErrorInvalidValue;
  if (paged && (p.block_size < 1 || p.num_blocks < 0 || p.max_blocks_per_row < 0 ||
                p.block_table_stride < 0)) {
    return cudaErrorInvalidValue;
  }
  if (m < 1 || d < 4 || d > kMaxHeadDim || d % 4 != 0) return cudaErrorInvalidValue;
  if (rd < 2 || rd % 2 != 0 || rd > d) return cudaErrorInvalidValue;
  if (p.quant == CompressQuant::kFp8) {
    if ((d - rd) % 64 != 0) return cudaErrorInvalidValue;
  } else if (p.quant == CompressQuant::kFp4Hadamard) {
    if (d < 32 || (d & (d - 1)) != 0) return cudaErrorInvalidValue;
  } else if (p.quant != CompressQuant::kNone) {
    return cudaErrorInvalidValue;
  }
  if (p.entries_dtype != DType::kFloat32 && p.entries_dtype != DType::kBFloat16) {
    return cudaErrorInvalidValue;
  }
  const int fmt = static_cast<int>(p.entries_format);
  if (fmt == static_cast<int>(CacheFormat::kFp8Model1)) {
    if (d != 512 || rd != 64 || p.quant == CompressQuant::kFp4Hadamard) return cudaErrorInvalidValue;
  } else if (fmt == static_cast<int>(CacheFormat::kFp8Indexer)) {
    if ((d != 64 && d != 128) || p.quant == CompressQuant::kFp8) return cudaErrorInvalidValue;
  } else if (fmt != static_cast<int>(CacheFormat::kPlain)) {
    return cudaErrorInvalidValue;
  }
  if (fmt != 0 && (p.entries_batch_stride % 16 != 0 ||
                   (p.entries != nullptr && !aligned16(p.entries)))) {
    return cudaErrorInvalidValue;
  }
  if (p.batch > INT_MAX) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.num_tokens == 0) return cudaSuccess;
  if (p.kv == nullptr || p.score == nullptr || p.ape == nullptr || p.norm_weight == nullptr ||
      p.freqs == nullptr || p.cu_seqlens == nullptr || p.starts == nullptr ||
      p.state_kv == nullptr || p.state_score == nullptr ||
      (p.entries == nullptr && (paged ? p.num_blocks > 0 : p.capacity > 0))) {
    return cudaErrorInvalidValue;
  }
  if (!aligned16(p.kv) || !aligned16(p.score) || !aligned16(p.ape) || !aligned16(p.state_kv) ||
      !aligned16(p.state_score) || p.kv_row_stride % 4 != 0 || p.score_row_stride % 4 != 0) {
    return cudaErrorInvalidValue;
  }

  Args a{};
  a.kv = p.kv;
  a.score = p.score;
  a.kv_stride = p.kv_row_stride;
  a.score_stride = p.score_row_stride;
  a.num_tokens = p.num_tokens;
  a.ape = p.ape;
  a.weight = p.norm_weight;
  a.freqs = p.freqs;
  a.rope_pairs = static_cast<int>(rd / 2);
  a.cu = p.cu_seqlens;
  a.starts = p.starts;
  a.skv = p.state_kv;
  a.ssc = p.state_score;
  a.entries = p.entries;
  a.e_bstride = p.entries_batch_stride;
  a.e_rstride = p.entries_row_stride;
  a.capacity = p.entries == nullptr ? 0 : p.capacity;
  a.slot_ids = p.slots;
  a.n_slots = p.slots != nullptr ? p.num_slots : p.batch;
  a.entry_rows = p.slots != nullptr ? p.entry_rows : p.batch;
  a.bt = paged && p.entries != nullptr ? p.block_table : nullptr;
  a.bt_stride = p.block_table_stride;
  a.bt_cols = p.max_blocks_per_row;
  a.block_size = paged ? p.block_size : 1;
  a.num_blocks = p.num_blocks;
  if (paged && p.entries == nullptr) a.capacity = 0;  // nothing to write (empty pool)
  a.fmt = fmt;
  a.fp8_rows = paged ? p.block_size : p.capacity;
  a.d = static_cast<int>(d);
  a.m = static_cast<int>(m);
  a.coff = m == 4 ? 2 : 1;
  a.slots = a.coff * a.m;
  a.eps = p.eps;
  // MODEL1 FP8 entries: the store quantises (the same values as the FP8 simulation).
  a.quant = fmt == static_cast<int>(CacheFormat::kFp8Model1) ? 0 : static_cast<int>(p.quant);
  a.hadamard_scale = static_cast<float>(std::pow(static_cast<double>(d), -0.5));
  a.batch = p.batch;
  a.cluster = 1;

  // Slot groups: enough to keep kUnroll slots per thread busy, at most kMaxThreads threads.
  const int ft_count = a.d / 4;
  const int want = (a.slots + kUnroll - 1) / kUnroll;
  a.groups = std::max(1, std::min(kMaxThreads / ft_count, want));
  const int threads = (ft_count * a.groups + 31) / 32 * 32;
  const size_t smem_floats = 3 * static_cast<size_t>(a.groups) * a.d + a.d + (a.d + 31) / 32 + 33;
  const size_t smem_bytes = smem_floats * sizeof(float);

  // Entry kernel grid: B * max_blocks <= INT_MAX (rows with more blocks loop).
  int64_t max_blocks = (p.max_seqlen + m - 1) / m;
  max_blocks = std::max<int64_t>(1, std::min<int64_t>(max_blocks, INT_MAX / p.batch));
  a.max_blocks = max_blocks;
  // State kernel grid: m == 4: one item per column quad; else (tail row, column quad) items,
  // at most min(m - 1, max_seqlen) tail rows hold new tokens.
  const int64_t quads = static_cast<int64_t>(a.coff) * d / 4;
  const int64_t items =
      a.coff == 2 ? quads : std::max<int64_t>(1, std::min<int64_t>(m - 1, p.max_seqlen)) * quads;
  int64_t state_blocks = (items + kStateThreads - 1) / kStateThreads;
  state_blocks = std::max<int64_t>(
      1, std::min<int64_t>({state_blocks, kMaxStateBlocksPerRow, INT_MAX / p.batch}));
  a.state_blocks = state_blocks;

  if (p.entries_dtype == DType::kFloat32 && fmt == 0) {
    return dispatch<float>(a, p.batch, p.max_seqlen, threads, smem_bytes, variant, cluster,
                           stream);
  }
  return dispatch<__nv_bfloat16>(a, p.batch, p.max_seqlen, threads, smem_bytes, variant, cluster,
                                 stream);
}
}  // namespace detail

cudaError_t compress_kv(const CompressKVParams& p, cudaStream_t stream) {
  return detail::compress_kv_variant(p, 0, 0, stream);
}

}  // namespace dsv4
