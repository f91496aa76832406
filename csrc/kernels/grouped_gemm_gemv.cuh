// The weight-streaming GEMV tile of the grouped GEMM (GemmTile::kGemv): dense weights (no
// expert offsets), one or two activation rows, bf16 or FP8 weights, the store epilogue (with
// or without the inverse RoPE of the grouped output projection). The decode shapes of
// grouped_oproj (8 groups x 1024 x 4096) and fp8_linear at M = 1-2, where the 16-row
// tensor-core tile and the skinny tile (grouped_gemm_skinny.cuh) stay far from the byte floor.
// Same contract as the other tiles (include/dsv4/grouped_gemm.h), CUDA cores only.
//
// Design:
//   * Work unit = (expert e, block of unit_rows consecutive weight rows of e), sized on the
//     host so that the units about fill the resident CTAs (2 per SM, 8 warps each): usually one
//     unit per CTA. A CTA first copies its expert's 1-2 activation rows into shared memory
//     (inverse RoPE applied there, once per CTA, with rope_inv_bf16x2; bf16 values, rounded as
//     the reference rounds the rotated o), then one barrier; a CTA that walks several units
//     restages (two barriers) only when the expert changes. No barrier in the row loop.
//   * Each warp owns RW whole weight rows at a time (RW = 16 / CPL: 2 rows for k >= 4096 FP8
//     or bf16, 4 or 8 for shorter rows) and walks their k in batches: lane l loads chunks
//     l + 32 j (j < CPL) of each of its RW rows, all 16 loads of 16 bytes
//     (ld.global.nc.L1::no_allocate, skinny::ld_stream16) issued before the first use: 8 KB per
//     warp, 128 KB per SM in flight.
//   * No L2 prefetch and no software pipelining across batches: both were built and measured
//     (ninth session, H100 / H200, bench/README.md "GEMV tile, with the prefetch real"): the
//     bulk L2 prefetch 2-8 us slower or no faster, a walk with the next half-batch's loads
//     issued before the current FMAs 0-4 us slower; the 16 loads per lane of rows_dot keep as
//     many bytes in flight. Both were removed.
//   * Activations in shared memory as 16-byte pieces of 8 bf16 values, laid out [row][piece of
//     the chunk][chunk], so that the 32 lanes' reads of one piece index are consecutive 16-byte
//     words (no bank conflicts); each piece is read once per batch and used for all RW rows.
//   * Dequantisation in registers with the skinny tile's decode8 (fp8x2_to_f32x2 / bf16 bit
//     shifts, exact) and e8m0_to_f32; FP8: the chunk's 128 x 128 block scale multiplies the 8
//     activation values of a piece once (fp32) for all RW rows, and the products are
//     fma(w, x s, acc): for e8m0 (power-of-two) scales exactly the product (w s) x of the
//     other tiles, barring fp32 under/overflow of x s; for float32 scales one rounding of x s
//     (2^-24 relative) where the skinny tile rounds w s and the tensor-core tiles round w s to
//     bf16 (2^-9).
//   * Summation order (fp32 throughout, deterministic): per lane one fma chain over its chunks
//     in k order (l, l + 32, l + 64, ...), value by value within a chunk; then the 32 lane sums
//     by the skinny tile's warp reduce-scatter (a fixed butterfly). The 16-row tensor-core tile
//     accumulates in the MMA's order instead (per 64-wide k step, k16 slices into fp32
//     accumulators in hardware order). Both are fp32 sums of the same products, so the checks'
//     tolerances (C++: 0.02 |ref| + 0.01 max |ref| against a double reference; Python: the
//     2x bf16 rule against the fp32 reference) apply unchanged.
//   * Direct store: lane i of the warp holds the total of (row r0 + i / RT, activation row
//     i % RT) and writes its bf16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "dsv4/grouped_gemm.h"
#include "grouped_gemm.cuh"
#include "grouped_gemm_skinny.cuh"

namespace dsv4 {
namespace gg {
namespace gemv {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBlocksPerSm = 2;
constexpr int kLoads = 16;               // 16-byte weight loads in flight per lane (RW x CPL)
constexpr int kMaxXBytes = 96 * 1024;    // shared memory for the activation rows (RT k 2 bytes)

// Whether the tile takes these arguments (host): dense weights, 1-2 activation rows, bf16 or
// FP8 weights with bf16 activations, the store epilogue, the activation rows within kMaxXBytes.
inline bool supports(const GroupedGemmArgs& a) {
  if (a.expert_offsets != nullptr || a.x_scale != nullptr) return false;
  if (a.epilogue != GemmEpilogue::kStore) return false;
  if (a.w_format != GemmWeightFormat::kBF16 && a.w_format != GemmWeightFormat::kFP8) return false;
  if (a.pairs < 1 || a.pairs > 2) return false;
  return a.pairs * static_cast<int64_t>(a.k) * 2 <= kMaxXBytes;
}

// The expert's RT activation rows -> shared memory xs [RT][SP][nchunks] of 16-byte pieces
// (8 bf16 values), inverse RoPE applied; rows past `pairs` or outside [0, x_rows) are zero.
template <int FMT, bool ROPE, int RT>
__device__ __forceinline__ void stage_x(const GroupedGemmArgs& a, int e, uint4* xs) {
  constexpr int EPC = skinny::elems_per_chunk<FMT>();
  constexpr int SP = EPC / 8;
  const int nchunks = a.k / EPC, npieces = a.k / 8;
  const __nv_bfloat16* xbase = static_cast<const __nv_bfloat16*>(a.x);
  // the inverse RoPE's (cos, sin) depend on the row's position and the pair only: one table of
  // kRopePairs per row (rows past `pairs`: angle 0), not one sincosf per head and pair
  __shared__ float2 rope_cs[ROPE ? RT : 1][kRopePairs];
  if constexpr (ROPE) {
    for (int t = threadIdx.x; t < RT * kRopePairs; t += kThreads) {
      const int i = t / kRopePairs, j = t % kRopePairs;
      const float pos = i < a.pairs ? static_cast<float>(__ldg(a.positions + i)) : 0.f;
      float sn, cs;
      sincosf(pos * __ldg(a.freqs + j), &sn, &cs);
      rope_cs[i][j] = make_float2(cs, sn);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < RT; ++i) {
    bool ok = i < a.pairs;
    int64_t xr = 0;
    if (ok) {
      xr = a.row_ids != nullptr ? static_cast<int64_t>(__ldg(a.row_ids + i)) : i;
      ok = xr >= 0 && xr < a.x_rows;
    }
    const __nv_bfloat16* xrow = xbase + (ok ? e * a.x_expert_stride + xr * a.x_row_stride : 0);
    for (int q = threadIdx.x; q < npieces; q += kThreads) {
      const int k0 = q * 8;
      uint4 v = ok ? __ldg(reinterpret_cast<const uint4*>(xrow + k0)) : make_uint4(0u, 0u, 0u, 0u);
      if constexpr (ROPE) {
        const int dh = k0 % a.head_dim;
        if (dh >= a.head_dim - 2 * kRopePairs) {
          const int j0 = (dh - (a.head_dim - 2 * kRopePairs)) / 2;
          uint32_t* w = reinterpret_cast<uint32_t*>(&v);
#pragma unroll
          for (int p = 0; p < 4; ++p) w[p] = rope_inv_bf16x2(w[p], rope_cs[i][j0 + p]);
        }
      }
      const int c = k0 / EPC, sp = (k0 % EPC) / 8;
      xs[(i * SP + sp) * nchunks + c] = v;
    }
  }
}

// Row r0 of expert e: its first weight byte; FP8: the first scale of its 128-row block.
__device__ __forceinline__ const char* row_ptr(const GroupedGemmArgs& a, int e, int r0) {
  return static_cast<const char*>(a.w) + e * a.w_expert_stride +
         static_cast<int64_t>(r0) * a.w_row_stride;
}
__device__ __forceinline__ const char* scale_ptr(const GroupedGemmArgs& a, int e, int r0) {
  return static_cast<const char*>(a.w_scale) +
         (e * a.s_expert_stride + static_cast<int64_t>(r0 / 128) * a.s_row_stride) *
             (a.scale_fp32 ? 4 : 1);
}

// One 16-byte chunk c (< nchunks) of RW weight rows (q[rr]) against the staged activation rows:
// acc[rr][i] += w x (x s), value by value in k order (the per-lane fma chain).
template <int FMT, int RT, int RW>
__device__ __forceinline__ void chunk_fma(const uint4 (&q)[RW], int c, int nchunks,
                                          const uint4* xs, const char* sbase, bool s32,
                                          float (&acc)[RW][RT]) {
  constexpr int EPC = skinny::elems_per_chunk<FMT>();
  constexpr int SP = EPC / 8;
  // FP8: the chunk's block scale (a few hundred bytes per CTA: L1 hits after the first)
  float sj = 1.f;
  if constexpr (FMT == kFmtFP8) {
    const int blk = (c * EPC) / 128;
    sj = s32 ? __ldg(reinterpret_cast<const float*>(sbase) + blk)
             : e8m0_to_f32(__ldg(reinterpret_cast<const unsigned char*>(sbase) + blk));
  }
#pragma unroll
  for (int sp = 0; sp < SP; ++sp) {
    float x[RT][8];
#pragma unroll
    for (int i = 0; i < RT; ++i) {
      const uint4 xv = xs[(i * SP + sp) * nchunks + c];
      const uint32_t xw[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        x[i][2 * p] = bf16_lo(xw[p]);
        x[i][2 * p + 1] = bf16_hi(xw[p]);
      }
      if constexpr (FMT == kFmtFP8) {  // the scale on the activation: once for RW rows
#pragma unroll
        for (int v = 0; v < 8; ++v) x[i][v] *= sj;
      }
    }
#pragma unroll
    for (int rr = 0; rr < RW; ++rr) {
      float w[8];
      skinny::decode8<FMT>(q[rr], sp, 1.f, w);
#pragma unroll
      for (int i = 0; i < RT; ++i) {
#pragma unroll
        for (int v = 0; v < 8; ++v) acc[rr][i] = fmaf(w[v], x[i][v], acc[rr][i]);
      }
    }
  }
}

// Deterministic warp reduction of acc and the store of rows r0 .. r0 + RW - 1: lane v < RW RT
// holds (row r0 + v / RT, activation row v % RT).
template <int RT, int RW>
__device__ __forceinline__ void reduce_store(const GroupedGemmArgs& a, int e, int r0,
                                             const float (&acc)[RW][RT], int lane) {
  float v[RW * RT];
#pragma unroll
  for (int rr = 0; rr < RW; ++rr) {
#pragma unroll
    for (int i = 0; i < RT; ++i) v[rr * RT + i] = acc[rr][i];
  }
  const float tot = skinny::warp_reduce_scatter<RW * RT>(v, lane);
  const int rr = lane / RT, i = lane % RT;
  if (lane < RW * RT && i < a.pairs) {
    static_cast<__nv_bfloat16*>(a.out)[e * a.out_expert_stride + i * a.out_row_stride + r0 + rr] =
        __float2bfloat16_rn(tot);
  }
}

// RW weight rows r0 .. r0 + RW - 1 of expert e (all < a.rows) against the staged activation
// rows: one warp, no barrier.
template <int FMT, int RT, int CPL>
__device__ __forceinline__ void rows_dot(const GroupedGemmArgs& a, int e, int r0,
                                         const uint4* xs, int lane) {
  constexpr int EPC = skinny::elems_per_chunk<FMT>();
  constexpr int RW = kLoads / CPL;
  const int nchunks = a.k / EPC;
  const char* wrow = row_ptr(a, e, r0);
  // FP8: the RW rows (r0 a multiple of RW, RW | 128) share one 128-row scale block, whose
  // scales (e8m0 bytes or float32) start at sbase
  const bool s32 = a.scale_fp32;
  const char* sbase = FMT == kFmtFP8 ? scale_ptr(a, e, r0) : nullptr;

  float acc[RW][RT];
#pragma unroll
  for (int rr = 0; rr < RW; ++rr) {
#pragma unroll
    for (int i = 0; i < RT; ++i) acc[rr][i] = 0.f;
  }

#pragma unroll 1
  for (int b = 0; b < nchunks; b += 32 * CPL) {  // warp-uniform batches of 32 CPL chunks
    const int c0 = b + lane;
    uint4 q[RW][CPL];
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      const int c = c0 + 32 * j;
      const bool ok = c < nchunks;
#pragma unroll
      for (int rr = 0; rr < RW; ++rr) {
        q[rr][j] = ok ? skinny::ld_stream16(wrow + rr * a.w_row_stride + static_cast<int64_t>(c) * 16)
                      : make_uint4(0u, 0u, 0u, 0u);
      }
    }
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      const int c = c0 + 32 * j;
      if (c < nchunks) {
        uint4 qj[RW];
#pragma unroll
        for (int rr = 0; rr < RW; ++rr) qj[rr] = q[rr][j];
        chunk_fma<FMT, RT, RW>(qj, c, nchunks, xs, sbase, s32, acc);
      }
    }
  }
  reduce_store<RT, RW>(a, e, r0, acc, lane);
}

// One CTA walks its work units (expert, block of unit_rows rows); each warp its row groups of RW
// rows, RW kWarps apart.
template <int FMT, bool ROPE, int RT, int CPL>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    gemv_kernel(const GroupedGemmArgs a, int unit_rows, int n_ub) {
  extern __shared__ __align__(16) uint4 xs[];
  constexpr int RW = kLoads / CPL;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int units = a.n_experts * n_ub;  // <= INT_MAX (host)
  int staged = -1;                       // block-uniform
  for (int u = blockIdx.x; u < units; u += gridDim.x) {
    const int e = u / n_ub, ub = u % n_ub;
    const int r_end = min(a.rows, (ub + 1) * unit_rows);
    const int r_first = ub * unit_rows + warp * RW;
    if (e != staged) {
      if (staged >= 0) __syncthreads();  // every warp done with the previous expert's rows
      stage_x<FMT, ROPE, RT>(a, e, xs);
      __syncthreads();
      staged = e;
    }
    for (int r0 = r_first; r0 < r_end; r0 += kWarps * RW) {
      rows_dot<FMT, RT, CPL>(a, e, r0, xs, lane);
    }
  }
}

template <int FMT, bool ROPE, int RT, int CPL>
cudaError_t launch_v(const GroupedGemmArgs& a, int num_sms, cudaStream_t stream) {
  constexpr int RW = kLoads / CPL;
  // rows % 8 == 0 (check_args) and RW | 8: every warp's RW rows are real rows
  static_assert(8 % RW == 0 && 128 % RW == 0, "row groups inside the rows and scale blocks");
  const int64_t resident = static_cast<int64_t>(num_sms) * kBlocksPerSm;
  const int64_t total = static_cast<int64_t>(a.n_experts) * a.rows;
  int64_t ur = (total + resident - 1) / resident;
  ur = (ur + RW * kWarps - 1) / (RW * kWarps) * (RW * kWarps);  // whole rounds of the 8 warps
  const int64_t rows_up = (a.rows + RW - 1) / RW * RW;
  if (ur > rows_up) ur = rows_up;
  const int64_t n_ub = (a.rows + ur - 1) / ur;
  const int64_t units = a.n_experts * n_ub;
  if (units > INT_MAX) return cudaErrorInvalidValue;
  const int grid = static_cast<int>(units < resident ? units : resident);
  const int smem = RT * a.k * 2;
  auto* fn = &gemv_kernel<FMT, ROPE, RT, CPL>;
  cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxXBytes);
  if (err != cudaSuccess) return err;
  fn<<<grid, kThreads, smem, stream>>>(a, static_cast<int>(ur), static_cast<int>(n_ub));
  return cudaGetLastError();
}

// Chunks per lane and row per batch: 8 when a row has >= 256 chunks (k >= 4096 FP8, 2048
// bf16), else 4 (>= 128 chunks) or 2; the rows per warp grow as the chunks shrink (16 loads).
// FP8 with two activation rows: always 8 (2 rows per warp; fewer loads in flight for short
// rows): the 4- and 8-row variants spill 4-16 bytes at 128 registers.
template <int FMT, bool ROPE, int RT>
cudaError_t launch_cpl(const GroupedGemmArgs& a, int num_sms, cudaStream_t stream) {
  if constexpr (FMT == kFmtFP8 && RT == 2) {
    return launch_v<FMT, ROPE, RT, 8>(a, num_sms, stream);
  } else {
    const int per_lane = (a.k / skinny::elems_per_chunk<FMT>() + 31) / 32;
    if (per_lane >= 8) return launch_v<FMT, ROPE, RT, 8>(a, num_sms, stream);
    if (per_lane >= 4) return launch_v<FMT, ROPE, RT, 4>(a, num_sms, stream);
    return launch_v<FMT, ROPE, RT, 2>(a, num_sms, stream);
  }
}

template <int FMT, bool ROPE>
cudaError_t launch(const GroupedGemmArgs& a, int num_sms, cudaStream_t stream) {
  return a.pairs == 1 ? launch_cpl<FMT, ROPE, 1>(a, num_sms, stream)
                      : launch_cpl<FMT, ROPE, 2>(a, num_sms, stream);
}

}  // namespace gemv
}  // namespace gg
}  // namespace dsv4
