// The weight-streaming small-M path of the grouped GEMM (GemmTile::kSkinny): a few activation
// rows per weight matrix (decode), where the wgmma tiles (64 weight rows x >= 8 activation
// rows, weights staged through shared memory) are issue-bound far from the weight-byte floor.
// Same contract as the other tiles (include/dsv4/grouped_gemm.h), CUDA cores only.
//
// Design:
//   * A unit is (expert e, block of kFeat output features, tile of up to RT activation rows of
//     the expert): the unit walk of grouped_gemm.cuh (unit_prefix / find_unit, with BN = RT),
//     expert counts read from expert_offsets on the device; a persistent grid walks the units.
//   * The CTA's 8 warps form G = 8 / WG row groups of WG warps. A row group owns kRB = 4
//     weight rows (SwiGLU: the gate and up rows of 2 features) and splits k over its 32 WG
//     lanes in 16-byte chunks (bf16: 8 values, FP8: 16, FP4: 32 per chunk): lane l of the group
//     takes chunks l, l + 32 WG, ... of each of its 4 rows, `unroll` chunks per row in flight:
//     2 (8 independent 16-byte loads per lane, 32 KB per CTA, two CTAs per SM) for bf16 / FP8
//     with 1-2 activation rows per unit, else 1 (4-8 rows: one CTA per SM, its registers go to
//     activations and accumulators; FP4: its decoding). WG (1, 2, 4, 8) is chosen on the host
//     so that a lane has about `unroll` chunks per row (short k: more row groups per CTA).
//   * Weights are read once, with ld.global.nc.L1::no_allocate; activations (a few KB, read by
//     every CTA) through the read-only path with L1 allocation; no shared-memory staging.
//     Before a unit runs, its CTA asks L2 for the next unit's weight rows (bulk prefetch, one
//     thread per row; DSV4_SKINNY_PREFETCH=0: off), so HBM keeps streaming while the unit
//     computes, reduces and stores.
//   * Dequantisation with the definitions of grouped_gemm.cuh / grouped_gemm_fp4.cuh
//     (fp8x2_to_f32x2, e2m1x8_to_bf16x8, e8m0_to_f32): each weight value is decoded to fp32,
//     multiplied by its scale in fp32 (exact for e8m0 scales; the same value the tensor-core
//     path feeds its MMA, except that a float32 scale that is not a power of two is not
//     rounded to bf16 first) and multiplied into fp32 accumulators acc[row][activation row].
//   * Inverse RoPE (grouped output projection): the activation values of a head's last 64 dims
//     are rotated with a per-unit (cos, sin) table in shared memory and rounded to bf16, as the
//     tensor-core kernel does.
//   * Deterministic reduction, no atomics: each warp reduce-scatters its 4 x RT sums over its
//     lanes (butterfly: lane l ends with the warp's total of value l % (4 RT)), the warps of a
//     group add their partials from shared memory in a fixed order, then the epilogue (store
//     or clamped SwiGLU with the routing weight, swiglu_out) writes bf16 outputs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "dsv4/grouped_gemm.h"
#include "grouped_gemm.cuh"
#include "own_error.cuh"

namespace dsv4 {
namespace gg {
namespace skinny {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRB = 4;      // weight rows per row group (SwiGLU: 2 features x gate / up)
// chunks per row in flight per lane: 2 (8 loads of 16 bytes) for bf16 / FP8 weights and 1-2
// activation rows per unit; 1 for 4-8 rows, whose activations and accumulators need the
// registers, and for FP4 (its decoding does: 2 spills at 128 registers)
template <int FMT, int RT>
constexpr int unroll() { return RT <= 2 && FMT != kFmtFP4 ? 2 : 1; }

// values per 16-byte weight chunk
template <int FMT>
constexpr int elems_per_chunk() { return FMT == kFmtBF16 ? 8 : (FMT == kFmtFP8 ? 16 : 32); }

// Warps per row group (1, 2, 4, 8): the largest that leaves each lane at least `unroll`
// chunks per row (short k: more row groups per CTA).
inline int warps_per_group(int k, int fmt, int unroll) {
  const int epc = fmt == kFmtBF16 ? 8 : (fmt == kFmtFP8 ? 16 : 32);
  const int chunks = k / epc;
  int wg = 1;
  while (wg < kWarps && chunks >= 2 * wg * 32 * unroll) wg *= 2;
  return wg;
}

// output features per CTA for WG warps per group
__host__ __device__ constexpr int feats_per_cta(int wg, int epi) {
  return (kWarps / wg) * (epi == kEpiSwiGLU ? kRB / 2 : kRB);
}

// 16-byte streaming load that does not allocate in L1 (weights are read exactly once).
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Eight weight values (sub-piece sp of a 16-byte chunk) -> fp32, times the scale s (FP8 /
// FP4; bf16 ignores s).
template <int FMT>
__device__ __forceinline__ void decode8(const uint4& q, int sp, float s, float (&w)[8]) {
  if constexpr (FMT == kFmtBF16) {
    const uint32_t v[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[2 * i] = bf16_lo(v[i]);
      w[2 * i + 1] = bf16_hi(v[i]);
    }
  } else if constexpr (FMT == kFmtFP8) {
    const uint32_t v0 = sp == 0 ? q.x : q.z, v1 = sp == 0 ? q.y : q.w;
    const uint32_t v[2] = {v0, v1};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float2 lo = fp8x2_to_f32x2(v[i]), hi = fp8x2_to_f32x2(v[i] >> 16);
      w[4 * i] = lo.x * s;
      w[4 * i + 1] = lo.y * s;
      w[4 * i + 2] = hi.x * s;
      w[4 * i + 3] = hi.y * s;
    }
  } else {
    const uint32_t word = sp == 0 ? q.x : (sp == 1 ? q.y : (sp == 2 ? q.z : q.w));
    uint32_t v[4];
    e2m1x8_to_bf16x8(word, v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[2 * i] = bf16_lo(v[i]) * s;
      w[2 * i + 1] = bf16_hi(v[i]) * s;
    }
  }
}

// One level of the reduce-scatter below (lanes exchange halves across lane bit H), then the
// next. A compile-time recursion: a `for (h = NV / 2; h >= 1; h /= 2)` loop is not unrolled
// by nvcc at NV = 16 / 32 and then keeps v[] in local memory (64 / 128-byte stack frames).
template <int H, int NV>
__device__ __forceinline__ void reduce_scatter_level(float (&v)[NV], int lane) {
  if constexpr (H >= 1) {
    const bool upper = (lane & H) != 0;
#pragma unroll
    for (int i = 0; i < H; ++i) {
      const float send = upper ? v[i] : v[i + H];
      const float keep = upper ? v[i + H] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, H);
    }
    reduce_scatter_level<H / 2, NV>(v, lane);
  }
}

// Warp reduce-scatter of NV (power of two <= 32) values: afterwards v[0] of lane l is the sum
// over the warp of value l % NV. Fixed order: deterministic.
template <int NV>
__device__ __forceinline__ float warp_reduce_scatter(float (&v)[NV], int lane) {
  reduce_scatter_level<NV / 2, NV>(v, lane);
  float r = v[0];
#pragma unroll
  for (int d = NV; d < 32; d *= 2) r += __shfl_xor_sync(0xffffffffu, r, d);
  return r;
}

struct Smem {
  int upre[kMaxExperts + 1];
  float red[kWarps][32];          // per-warp partial sums (value index < 4 RT)
  float fin[kWarps][32];          // per-group totals [group][value]
  float2 rope[8][kRopePairs];     // (cos, sin) per activation row of the unit and pair
};

// One unit with RT activation rows per tile (rows_t <= RT). Block-uniform; contains barriers.
template <int FMT, int EPI, bool ROPE, int RT>
__device__ __forceinline__ void run_unit(const GroupedGemmArgs& a, const Unit& t, int wg,
                                         Smem& sm) {
  constexpr int EPC = elems_per_chunk<FMT>();
  constexpr int NV = kRB * RT;
  constexpr int kUnroll = unroll<FMT, RT>();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int grp = warp / wg, gl = (warp % wg) * 32 + lane;  // row group, lane within it
  const int stride = 32 * wg;
  const int kFeat = feats_per_cta(wg, EPI);
  const int nchunks = a.k / EPC;

  // ---- per-unit tables ----
  if constexpr (ROPE) {
    for (int idx = tid; idx < RT * kRopePairs; idx += kThreads) {
      const int i = idx / kRopePairs, jp = idx % kRopePairs;
      float sn = 0.f, cs = 1.f;
      if (i < t.rows_t) {
        const float ang = static_cast<float>(__ldg(a.positions + t.pt + i)) * __ldg(a.freqs + jp);
        sincosf(ang, &sn, &cs);
      }
      sm.rope[i][jp] = make_float2(cs, sn);
    }
    __syncthreads();
  }

  // ---- this lane's weight rows and activation rows ----
  const char* wrow[kRB];
  int64_t srow[kRB];  // scale index of the row's first k (FP8 / FP4)
  bool wok[kRB];
#pragma unroll
  for (int rr = 0; rr < kRB; ++rr) {
    int m, row;
    if constexpr (EPI == kEpiSwiGLU) {
      m = rr & 1;
      row = t.fb * kFeat + grp * (kRB / 2) + (rr >> 1);
    } else {
      m = 0;
      row = t.fb * kFeat + grp * kRB + rr;
    }
    wok[rr] = row < a.rows;
    const int rs = wok[rr] ? row : 0;
    wrow[rr] = static_cast<const char*>(a.w) + t.e * a.w_expert_stride + m * a.w_mat_stride +
               static_cast<int64_t>(rs) * a.w_row_stride;
    srow[rr] = t.e * a.s_expert_stride + m * a.s_mat_stride +
               static_cast<int64_t>(FMT == kFmtFP8 ? rs / 128 : rs) * a.s_row_stride;
  }
  const __nv_bfloat16* xbase = static_cast<const __nv_bfloat16*>(a.x);
  const __nv_bfloat16* xrow[RT];
  bool xok[RT];
#pragma unroll
  for (int i = 0; i < RT; ++i) {
    bool ok = i < t.rows_t;
    int64_t xr = 0;
    if (ok) {
      xr = a.row_ids != nullptr ? static_cast<int64_t>(__ldg(a.row_ids + t.pt + i)) : t.pt + i;
      ok = xr >= 0 && xr < a.x_rows;
    }
    xok[i] = ok;
    xrow[i] = xbase + (ok ? t.e * a.x_expert_stride + xr * a.x_row_stride : 0);
  }
  auto load_scale = [&](int64_t si) -> float {
    if (a.scale_fp32) return __ldg(static_cast<const float*>(a.w_scale) + si);
    return e8m0_to_f32(__ldg(static_cast<const unsigned char*>(a.w_scale) + si));
  };

  float acc[kRB][RT];
#pragma unroll
  for (int rr = 0; rr < kRB; ++rr) {
#pragma unroll
    for (int i = 0; i < RT; ++i) acc[rr][i] = 0.f;
  }

  // ---- k loop: kUnroll chunks of each of the kRB rows per iteration ----
#pragma unroll 1
  for (int c0 = gl; c0 < nchunks; c0 += stride * kUnroll) {
    uint4 q[kUnroll][kRB];
    float s[kUnroll][kRB];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * stride;
#pragma unroll
      for (int rr = 0; rr < kRB; ++rr) {
        const bool ok = wok[rr] && c < nchunks;
        q[u][rr] = ok ? ld_stream16(wrow[rr] + static_cast<int64_t>(c) * 16)
                      : make_uint4(0u, 0u, 0u, 0u);
        if constexpr (FMT == kFmtFP8) {
          s[u][rr] = ok ? load_scale(srow[rr] + (c * EPC) / 128) : 0.f;
        } else if constexpr (FMT == kFmtFP4) {
          s[u][rr] = ok ? load_scale(srow[rr] + c) : 0.f;  // one 1x32 block per chunk
        } else {
          s[u][rr] = 1.f;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * stride;
      if (c >= nchunks) break;  // lane-uniform within the chunk loop; no barrier inside
#pragma unroll
      for (int sp = 0; sp < EPC / 8; ++sp) {
        const int k0 = c * EPC + sp * 8;  // first of the 8 values
        // activations of the RT rows (8 values each), inverse RoPE, -> fp32
        float x[RT][8];
#pragma unroll
        for (int i = 0; i < RT; ++i) {
          const uint4 xv = xok[i] ? __ldg(reinterpret_cast<const uint4*>(xrow[i] + k0))
                                  : make_uint4(0u, 0u, 0u, 0u);
          uint32_t xw[4] = {xv.x, xv.y, xv.z, xv.w};
          if constexpr (ROPE) {
            const int dh = k0 % a.head_dim;
            if (dh >= a.head_dim - 2 * kRopePairs) {
              const int j0 = (dh - (a.head_dim - 2 * kRopePairs)) / 2;
#pragma unroll
              for (int p = 0; p < 4; ++p) {
                xw[p] = rope_inv_bf16x2(xw[p], sm.rope[i][j0 + p]);
              }
            }
          }
#pragma unroll
          for (int p = 0; p < 4; ++p) {
            x[i][2 * p] = bf16_lo(xw[p]);
            x[i][2 * p + 1] = bf16_hi(xw[p]);
          }
        }
#pragma unroll
        for (int rr = 0; rr < kRB; ++rr) {
          float w[8];
          decode8<FMT>(q[u][rr], sp, s[u][rr], w);
#pragma unroll
          for (int i = 0; i < RT; ++i) {
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[rr][i] = fmaf(w[j], x[i][j], acc[rr][i]);
          }
        }
      }
    }
  }

  // ---- deterministic reduction: warp reduce-scatter, then the group's warps in order ----
  float v[NV];
#pragma unroll
  for (int rr = 0; rr < kRB; ++rr) {
#pragma unroll
    for (int i = 0; i < RT; ++i) v[rr * RT + i] = acc[rr][i];
  }
  const float mine = warp_reduce_scatter<NV>(v, lane);
  if (lane < NV) sm.red[warp][lane] = mine;
  __syncthreads();
  const int G = kWarps / wg;
  if (tid < G * NV) {
    const int g = tid / NV, vi = tid % NV;
    float sum = 0.f;
    for (int w = 0; w < wg; ++w) sum += sm.red[g * wg + w][vi];
    sm.fin[g][vi] = sum;
  }
  __syncthreads();

  // ---- epilogue ----
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(a.out);
  constexpr int kFeatPerGroup = EPI == kEpiSwiGLU ? kRB / 2 : kRB;
  for (int idx = tid; idx < G * kFeatPerGroup * RT; idx += kThreads) {
    const int i = idx % RT, fg = idx / RT;  // activation row, feature of the CTA
    const int g = fg / kFeatPerGroup, fl = fg % kFeatPerGroup;
    const int f = t.fb * kFeat + fg;
    if (i >= t.rows_t || f >= a.rows) continue;
    float val;
    if constexpr (EPI == kEpiSwiGLU) {
      const float gate = sm.fin[g][(2 * fl) * RT + i], up = sm.fin[g][(2 * fl + 1) * RT + i];
      val = swiglu_out(gate, up, a.swiglu_limit, __ldg(a.route_weight + t.pt + i));
    } else {
      val = sm.fin[g][fl * RT + i];
    }
    out[t.e * a.out_expert_stride + (t.pt + i) * a.out_row_stride + f] = __float2bfloat16_rn(val);
  }
  __syncthreads();  // sm.fin / sm.rope are rewritten by the next unit
}

// Asks L2 for `bytes` (a multiple of 16) from the 16-byte aligned global address p.
__device__ __forceinline__ void prefetch_l2_bulk(const void* p, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
}

// The weight rows of unit t into L2 (cp.async.bulk.prefetch, one thread per row: a row's k
// values are contiguous, 16-byte aligned, a multiple of 16 bytes): issued before the current
// unit runs, so the next unit's loads find them in L2 while this one computes and reduces.
template <int FMT, int EPI>
__device__ __forceinline__ void prefetch_unit_rows(const GroupedGemmArgs& a, const Unit& t,
                                                   int wg) {
  const int tid = threadIdx.x, G = kWarps / wg, kFeat = feats_per_cta(wg, EPI);
  if (tid >= G * kRB) return;
  const int grp = tid / kRB, rr = tid % kRB;
  const int m = EPI == kEpiSwiGLU ? (rr & 1) : 0;
  const int row = EPI == kEpiSwiGLU ? t.fb * kFeat + grp * (kRB / 2) + (rr >> 1)
                                    : t.fb * kFeat + grp * kRB + rr;
  if (row >= a.rows) return;
  const char* p = static_cast<const char*>(a.w) + t.e * a.w_expert_stride + m * a.w_mat_stride +
                  static_cast<int64_t>(row) * a.w_row_stride;
  const uint32_t bytes = static_cast<uint32_t>(
      FMT == kFmtBF16 ? 2 * a.k : (FMT == kFmtFP8 ? a.k : a.k / 2));
  prefetch_l2_bulk(p, bytes);
}

template <int FMT, int EPI, bool ROPE, int RT>
__global__ void __launch_bounds__(kThreads, RT >= 4 ? 1 : 2)
    skinny_kernel(const GroupedGemmArgs a, int wg, bool prefetch) {
  __shared__ Smem sm;
  const int n_fb = (a.rows + feats_per_cta(wg, EPI) - 1) / feats_per_cta(wg, EPI);
  const int total = unit_prefix<RT>(a, n_fb, sm.upre, threadIdx.x, kThreads);
  for (int u = blockIdx.x; u < total; u += gridDim.x) {
    const Unit t = find_unit<RT>(a, sm.upre, u);
    // u + gridDim.x < total <= INT_MAX: no overflow
    if (prefetch && u + static_cast<int>(gridDim.x) < total) {
      prefetch_unit_rows<FMT, EPI>(a, find_unit<RT>(a, sm.upre, u + gridDim.x), wg);
    }
    run_unit<FMT, EPI, ROPE, RT>(a, t, wg, sm);
  }
}

// DSV4_SKINNY_PREFETCH=0 turns the next-unit L2 prefetch off (for comparison); default on.
inline bool prefetch_enabled() {
  const char* v = std::getenv("DSV4_SKINNY_PREFETCH");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

template <int FMT, int EPI, bool ROPE, int RT>
cudaError_t launch_rt(const GroupedGemmArgs& a, int num_sms, cudaStream_t stream) {
  const int wg = warps_per_group(a.k, FMT, unroll<FMT, RT>());
  const int feat = feats_per_cta(wg, EPI);
  const int64_t n_fb = (a.rows + feat - 1) / feat;
  const int64_t units = unit_bound(a, n_fb, RT);
  if (units > INT_MAX) return cudaErrorInvalidValue;
  if (units == 0) return cudaSuccess;
  auto* fn = &skinny_kernel<FMT, EPI, ROPE, RT>;
  // resident CTAs per SM (registers decide: 2 at <= 128 per thread, else 1), per device: asked
  // until a query succeeds, 1 meanwhile; a failed query's own error cleared, never a caller's
  // (DeviceQueryCache, own_error.cuh)
  static DeviceQueryCache cache;
  // (cudaGetDevice fails only without a usable device, and then so does the launch below)
  int device = -1;
  if (cudaGetDevice(&device) != cudaSuccess) device = -1;  // the fallback, no query
  const int v = cache.get(device, 1, [fn](int& n) {
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, fn, kThreads, 0);
  });
  const int per_sm = v >= 1 ? v : 1;
  const int64_t resident = static_cast<int64_t>(num_sms) * per_sm;
  const int grid = static_cast<int>(units < resident ? units : resident);
  fn<<<grid, kThreads, 0, stream>>>(a, wg, prefetch_enabled());
  return cudaGetLastError();
}

// Activation rows per unit (1, 2, 4, 8). Without expert offsets every expert has `pairs` rows:
// the smallest power of two >= pairs (<= 8). With offsets (MoE) the host knows only the
// average: one more than it, rounded up to a power of two, so that an expert with a row above
// the average still streams its weights once.
inline int rows_per_unit(const GroupedGemmArgs& a) {
  int64_t per = a.pairs;
  if (a.expert_offsets != nullptr) {
    const int64_t busy = a.pairs < a.n_experts ? a.pairs : a.n_experts;
    per = (busy > 0 ? (a.pairs + busy - 1) / busy : 0) + 1;
  }
  return per <= 1 ? 1 : per <= 2 ? 2 : per <= 4 ? 4 : 8;
}

template <int FMT, int EPI, bool ROPE>
cudaError_t launch(const GroupedGemmArgs& a, int num_sms, cudaStream_t stream) {
  switch (rows_per_unit(a)) {
    case 1: return launch_rt<FMT, EPI, ROPE, 1>(a, num_sms, stream);
    case 2: return launch_rt<FMT, EPI, ROPE, 2>(a, num_sms, stream);
    case 4: return launch_rt<FMT, EPI, ROPE, 4>(a, num_sms, stream);
    default: return launch_rt<FMT, EPI, ROPE, 8>(a, num_sms, stream);
  }
}

}  // namespace skinny
}  // namespace gg
}  // namespace dsv4
