// FP8 x FP8 grouped GEMM on Hopper's FP8 tensor cores (wgmma m64nNk32 e4m3): the path of
// moe_up / moe_down when the activations are FP8-quantised (quant_sim, architecture.md §12.3)
// and the experts are FP8 or FP4. Torch-free; the contract is GroupedGemmArgs with x_scale set
// (include/dsv4/grouped_gemm.h). The bf16-MMA kernel (grouped_gemm.cuh) stays the path for
// everything else.
//
// Design (same "swap AB" orientation, unit walk and epilogue as grouped_gemm.cuh):
//   * Operands: A = 128 weight rows (64 per consumer warpgroup) as e4m3, B = up to BN
//     activation rows as e4m3 codes, both K-major, 128-byte swizzle; one pipeline stage = one
//     128-wide k block = one activation scale block and one weight scale block.
//   * Warp specialisation: warpgroups 0 and 1 are the consumers (MMAs, scale promotion,
//     epilogue), warpgroup 2 the producer (cp.async fills; FP4: the e2m1 -> e4m3 conversion).
//     Both walk the same units (grouped_gemm.cuh: unit_prefix / find_unit) in the same order
//     and number the k blocks they handle 0, 1, 2, ... across units ("steps"); step i uses
//     stage i % S. The producer runs ahead across unit boundaries (the next unit's first
//     stages load during this unit's epilogue).
//
// Pipeline protocol (S stages; three mbarriers per stage, initialised by thread 0 before the
// first __syncthreads; a barrier's k-th phase (k = 0, 1, ...) completes on the k-th use of its
// stage, i.e. for step i = s + k S, and a wait for that phase passes parity k & 1):
//   full[s]     expected 128: one arrival per producer thread per step.
//               FP8: cp.async.mbarrier.arrive.noinc, issued after the thread's copies of the
//               step; .noinc: the asynchronous arrival is one of the 128 expected (not an
//               extra pending count), and it happens once every cp.async the thread issued
//               before it has landed. FP4: a plain arrive after the thread's conversion
//               writes and its fence.proxy.async.
//   raw_full[s] (FP4) expected 128: the noinc cp.async arrivals of the raw copies.
//   empty[s]    expected 256: one arrive per consumer thread per step, issued after its
//               wgmma.wait_group 0 (the wgmmas that read stage s are complete) and after its
//               generic reads of the stage's scales; mbarrier.arrive has release semantics.
//   Producer, step i: if i >= S, wait empty[s] parity (i / S - 1) & 1 (the consumers released
//   step i - S); issue the copies; arrive (FP8 full / FP4 raw_full). FP4: after issuing step
//   i, convert step j = i - L (L = S / 2, 1 <= L <= S - 1): wait raw_full[j % S] parity
//   (j / S) & 1, convert, fence.proxy.async, arrive full[j % S]; after the last step convert
//   the rest in order.
//   Consumer, step i: wait full[s] parity (i / S) & 1; fence.proxy.async; wgmmas; wait_group 0;
//   promote; arrive empty[s].
//   Why every phase is matched (no hang): every stage is used by both sides for the same
//   steps, every arrival count is met by exactly the threads that always arrive (all 128
//   producer threads arrive for every step, none conditionally; all 256 consumer threads
//   likewise), and the waits never alias a phase: the producer cannot issue step i before the
//   consumers released step i - S, and the consumers cannot consume step i before the
//   producer published it, so the two sides are never more than S steps apart and a parity
//   wait always refers to the newest or the next phase. FP4: when the producer waits empty
//   for step i - S it has converted every step <= i - 1 - L >= i - S (L <= S - 1), so the
//   consumers can reach step i - S; raw_full of step j only needs copies already issued.
//   Nothing waits on a step that is never issued: both sides iterate the same units x KT.
// Proxies: cp.async (non-bulk) and st.shared write shared memory through the generic proxy;
// wgmma reads its operands through the async proxy. The converted FP4 tile is written by
// st.shared: the writing threads fence.proxy.async after their writes and before arriving on
// full (the writer-side pattern). The cp.async data's writes complete asynchronously, so the
// issuing thread cannot fence after them; the consumer orders them instead: the mbarrier wait
// (acquire) makes the landed data visible to the consumer thread, and its
// fence.proxy.async.shared::cta right after the wait, before its first wgmma, orders that view
// with its async-proxy reads. (The consumer fence runs for FP4 steps too: harmless.)
//   * Scales: FP8 weights, the 128 x 128 block's scale (e8m0 byte or float32) of the gate and
//     up matrices (SwiGLU: a thread's accumulator rows r and r + 8 are the gate and up rows of
//     one feature) — every tile row lies in one 128-row block; FP4, one folded power of two per
//     (row, k block). Activation scale: float32 per (row, k block), from fp8_act_quant.
//   * Promotion: acc += tmp * (s_w * s_a) per k block, in fp32 (DeepGEMM's sm90 FP8 GEMM
//     does the same with the roles of rows and columns swapped).
#pragma once

#include <cuda_fp8.h>

#include "grouped_gemm.cuh"
#include "grouped_gemm_fp4.cuh"
#include "grouped_gemm_mbarrier.cuh"
#include "grouped_gemm_qmma_wgmma.cuh"

namespace dsv4 {
namespace gg {

constexpr int kQBK = 128;  // k per stage: one scale block, one 128-byte e4m3 row

// ------------------------------ shared-memory helpers (mbarriers: grouped_gemm_mbarrier.cuh)
// cp.async of 4 bytes of which the first src_bytes (0..4) are read, the rest zero-filled
__device__ __forceinline__ void cp_async4_part(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ float2 lds64f(uint32_t addr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr));
  return v;
}
__device__ __forceinline__ float ldsf(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr));
  return v;
}

template <int WFMT, int EPI, int BN>
struct QCfg {
  static constexpr int kConsumers = 256;
  static constexpr int kThreads = kConsumers + 128;  // + one producer warpgroup
  static constexpr int kRowsA = 128;
  static constexpr int kABytes = kRowsA * 128;                 // e4m3 tile
  static constexpr int kBBytes = BN * 128;                     // e4m3 activation tile
  static constexpr int kRawBytes = WFMT == kFmtFP4 ? kRowsA * 64 : 0;  // packed e2m1 rows
  static constexpr int kOffB = kABytes;
  static constexpr int kOffRaw = kOffB + kBBytes;
  static constexpr int kOffSa = kOffRaw + kRawBytes;           // BN float32 activation scales
  static constexpr int kOffSw = kOffSa + BN * 4;               // FP8: 2 raw words; FP4: 128 f32
  static constexpr int kOffSraw = kOffSw + kRowsA * 4;         // FP4: 128 raw scale words
  static constexpr int kStageBytes = kOffSraw + (WFMT == kFmtFP4 ? kRowsA * 4 : 0);
  static constexpr int kStageStride = round_up(kStageBytes, 1024);
  static constexpr int kFeat = EPI == kEpiSwiGLU ? kRowsA / 2 : kRowsA;
  static constexpr int kEpiStride = kFeat * 2 + 16;
  static constexpr int kEpiBytes = round_up(BN * kEpiStride, 1024);
  static constexpr int kPrefixBytes = (kMaxExperts + 1) * 4;
  static constexpr int kBarBytes = 3 * 32 * 8;  // full / empty / raw_full, <= 32 stages
  static constexpr int kFixed = kEpiBytes + kPrefixBytes + kBarBytes + 1024;
  static constexpr int kFit = (kSmemLimit - kFixed) / kStageStride;
  static constexpr int kStages = kFit < 16 ? kFit : 16;
  static constexpr int kOffEpi = kStages * kStageStride;
  static constexpr int kOffBar = kOffEpi + kEpiBytes;
  static constexpr int kOffPrefix = kOffBar + kBarBytes;
  static constexpr int kSmem = kOffPrefix + kPrefixBytes + 1024;  // + slack to align to 1024
  static constexpr int kAcc = BN / 2;
  static constexpr int kBChunks = BN * 8 / 128;  // 16-byte activation chunks per producer thread

  static_assert(WFMT == kFmtFP8 || WFMT == kFmtFP4, "FP8 or FP4 weights");
  static_assert(BN == 16 || BN == 64 || BN == 128, "tile rows");
  static_assert(kBChunks >= 1 && kBChunks * 128 == BN * 8, "B chunk split");
  static_assert(kStages >= 3 && kStages <= 32, "pipeline depth");
  static_assert(kSmem <= kSmemLimit, "shared memory budget");
  static_assert(kBBytes % 1024 == 0 && kOffB % 1024 == 0, "1024-byte aligned tiles");
  static_assert(kOffPrefix % 16 == 0 && kOffBar % 8 == 0, "alignment");
};

// One 128-wide k block of MMAs (four k32 slices; the first overwrites tmp).
template <int N, int M>
__device__ __forceinline__ void qmma_block(float (&tmp)[M], uint32_t a_tile, uint32_t b_tile) {
  const uint64_t da = smem_desc(a_tile), db = smem_desc(b_tile);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < kQBK / 32; ++ks) {
    WgmmaE4m3<N>::mma(tmp, da + 2 * ks, db + 2 * ks, ks > 0 ? 1 : 0);
  }
  wgmma_commit();
}
template <class C, int WFMT, int EPI, int BN>
__global__ void __launch_bounds__(C::kThreads, 1)
    grouped_gemm_qmma_kernel(const GroupedGemmArgs a) {
#if !DSV4_GG_WGMMA
  __trap();
#else
  constexpr int S = C::kStages;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base - raw);
  int* upre = reinterpret_cast<int*>(smem + C::kOffPrefix);
  // full[s]: stage s holds its step (FP8: the producer threads' copies landed, one noinc
  // cp.async arrive each; FP4: converted, one arrive per producer thread); empty[s]: every
  // consumer thread is done with it; raw_full[s] (FP4): the raw copies landed
  const uint32_t full_bar = base + C::kOffBar, empty_bar = full_bar + 32 * 8,
                 raw_full_bar = empty_bar + 32 * 8;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int KT = a.k / kQBK;  // k % 128 == 0 (host check)
  const int n_fb = (a.rows + C::kFeat - 1) / C::kFeat;

  // ---- the barriers (see the protocol above), then the unit prefix sum (grouped_gemm.cuh;
  // its __syncthreads publish the initialised barriers) ----
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(full_bar + s * 8, 128u);           // the producer threads, one arrive each
      mbar_init(empty_bar + s * 8, C::kConsumers);  // the consumer threads, one arrive each
      mbar_init(raw_full_bar + s * 8, 128u);        // FP4: the producer threads' raw copies
    }
  }
  const int total = unit_prefix<BN>(a, n_fb, upre, tid, C::kThreads);

  // tile row r -> weight row of matrix m (SwiGLU: gate / up interleaved by 8, grouped_gemm.cuh)
  auto weight_row = [&](int fb, int r, int& m) { return gg::weight_row<EPI, C::kFeat>(fb, r, m); };
  // element index of the weight scale of (expert e, matrix m, weight row wr, k block kt)
  auto w_scale_idx = [&](int e, int m, int wr, int kt) -> int64_t {
    if constexpr (WFMT == kFmtFP8) {
      return e * a.s_expert_stride + m * a.s_mat_stride +
             static_cast<int64_t>(wr / 128) * a.s_row_stride + kt;
    } else {  // FP4: the first of the block's four 1x32 codes (a 4-byte aligned word)
      return e * a.s_expert_stride + m * a.s_mat_stride +
             static_cast<int64_t>(wr) * a.s_row_stride + kt * 4;
    }
  };

  if (warp >= C::kConsumers / 32) {
    // =================================== producer ===================================
    const int pt_id = tid - C::kConsumers;  // 0 .. 127
    const int pw = pt_id >> 5;              // producer warp 0 .. 3
    const char* dummy = static_cast<const char*>(a.x);
    const char* wbase = static_cast<const char*>(a.w);
    const char* sbase = static_cast<const char*>(a.w_scale);
    int it = 0;        // steps issued
    int converted = 0;  // FP4: steps converted and announced
    // FP4: converts step j (its raw copies landed: raw_full) and announces it. Chunk
    // c = lane + 32 i of warp pw: row 32 pw + c / 4, 16-byte raw piece q = c % 4 = 32 e2m1
    // values = one 1x32 scale block -> e4m3 chunks 2q, 2q + 1 of the row
    auto convert = [&](int j) {
      const int s = j % S;
      const uint32_t sb = base + s * C::kStageStride;
      mbar_wait(raw_full_bar + s * 8, static_cast<uint32_t>((j / S) & 1));
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int c = lane + 32 * i, r = 32 * pw + c / 4, q = c % 4;
        const uint32_t sw = lds32(sb + C::kOffSraw + r * 4);
        uint32_t cmax = 0;
        bool nan = false;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const uint32_t code = (sw >> (8 * b)) & 0xFFu;
          cmax = code > cmax ? code : cmax;
          nan = nan || code == 255u;
        }
        const int t = static_cast<int>((sw >> (8 * q)) & 0xFFu) - static_cast<int>(cmax) + 6;
        uint32_t lut0, lut1;
        e4m3_lut_for_shift(t, lut0, lut1);
        const uint4 v = lds128(sb + C::kOffRaw + r * 64 + q * 16);
        uint32_t o0[2], o1[2], o2[2], o3[2];
        e2m1x8_to_e4m3x8(v.x, lut0, lut1, o0);
        e2m1x8_to_e4m3x8(v.y, lut0, lut1, o1);
        e2m1x8_to_e4m3x8(v.z, lut0, lut1, o2);
        e2m1x8_to_e4m3x8(v.w, lut0, lut1, o3);
        sts128(sb + r * 128 + ((((2 * q) ^ r) & 7) << 4), make_uint4(o0[0], o0[1], o1[0], o1[1]));
        sts128(sb + r * 128 + ((((2 * q + 1) ^ r) & 7) << 4),
               make_uint4(o2[0], o2[1], o3[0], o3[1]));
        if (q == 0) sts32(sb + C::kOffSw + r * 4, __float_as_uint(fp4_folded_scale(cmax, nan)));
      }
      fence_proxy_async();  // this thread's generic-proxy writes -> the async proxy (wgmma)
      mbar_arrive(full_bar + s * 8);
    };
    // FP4: step j is converted once step j + kLag is issued (its raw copies have had kLag steps
    // to land); kLag <= S - 1 keeps the empty[] waits free of deadlock
    constexpr int kLag = S / 2 > 0 ? S / 2 : 1;
    static_assert(kLag <= S - 1, "conversion lag");

    for (int u = blockIdx.x; u < total; u += gridDim.x) {
      const Unit t = find_unit<BN>(a, upre, u);
      const int e = t.e, fb = t.fb, rows_t = t.rows_t;
      const int64_t pt = t.pt;
      // weight chunks of this thread: FP8, c = pt_id + 128 j (j < 8), row c / 8, 16-byte
      // column c % 8 (a warp copies 4 whole 128-byte rows); FP4, c = lane + 32 j (j < 4) of
      // warp pw: row 32 pw + c / 4, 16-byte piece c % 4 (8 whole 64-byte rows per copy)
      constexpr int kAJ = WFMT == kFmtFP8 ? 8 : 4;
      const char* a_src[kAJ];
      uint32_t a_dst[kAJ];
      bool a_ok[kAJ];
#pragma unroll
      for (int j = 0; j < kAJ; ++j) {
        int r, col;
        if constexpr (WFMT == kFmtFP8) {
          const int c = pt_id + 128 * j;
          r = c >> 3;
          col = c & 7;
        } else {
          const int c = lane + 32 * j;
          r = 32 * pw + (c >> 2);
          col = c & 3;
        }
        int m;
        const int wr = weight_row(fb, r, m);
        a_ok[j] = wr < a.rows;
        a_src[j] = wbase + e * a.w_expert_stride + m * a.w_mat_stride +
                   static_cast<int64_t>(a_ok[j] ? wr : 0) * a.w_row_stride + col * 16;
        a_dst[j] = WFMT == kFmtFP8 ? r * 128 + (((col ^ r) & 7) << 4)
                                   : C::kOffRaw + r * 64 + col * 16;
      }
      // FP4: the raw scale word of row pt_id (one per row and k block)
      int64_t fs_idx = 0;
      bool fs_ok = false;
      if constexpr (WFMT == kFmtFP4) {
        int m;
        const int wr = weight_row(fb, pt_id, m);
        fs_ok = wr < a.rows;
        fs_idx = fs_ok ? w_scale_idx(e, m, wr, 0) : 0;
      }
      // FP8: the block scale words of matrix 0 (thread 0) and 1 (thread 1, SwiGLU): every
      // tile row lies in the 128-row block of the tile's first row
      int64_t s8_idx = 0;
      if constexpr (WFMT == kFmtFP8) {
        int m0;
        const int wr0 = weight_row(fb, 0, m0);
        s8_idx = w_scale_idx(e, pt_id & 1, wr0, 0);
      }
      // activation rows: chunk c = pt_id + 128 j, row c / 8, column c % 8
      const char* b_src[C::kBChunks];
      uint32_t b_dst[C::kBChunks];
      bool b_ok[C::kBChunks];
#pragma unroll
      for (int j = 0; j < C::kBChunks; ++j) {
        const int c = pt_id + 128 * j, br = c >> 3, col = c & 7;
        bool ok = br < rows_t;
        int64_t xr = 0;
        if (ok) {
          xr = a.row_ids != nullptr ? static_cast<int64_t>(__ldg(a.row_ids + pt + br)) : pt + br;
          ok = xr >= 0 && xr < a.x_rows;
        }
        b_ok[j] = ok;
        b_src[j] = ok ? dummy + e * a.x_expert_stride + xr * a.x_row_stride + col * 16 : dummy;
        b_dst[j] = C::kOffB + br * 128 + (((col ^ br) & 7) << 4);
      }
      // activation scale of row pt_id (BN <= 128 producer threads)
      const float* sa_src = nullptr;
      if (pt_id < rows_t) {
        const int64_t xr = a.row_ids != nullptr ? static_cast<int64_t>(__ldg(a.row_ids + pt + pt_id))
                                                : pt + pt_id;
        if (xr >= 0 && xr < a.x_rows) sa_src = a.x_scale + xr * a.x_scale_row_stride;
      }

      for (int kt = 0; kt < KT; ++kt, ++it) {
        const int s = it % S;
        if (it >= S) mbar_wait(empty_bar + s * 8, static_cast<uint32_t>((it / S - 1) & 1));
        const uint32_t sb = base + s * C::kStageStride;
#pragma unroll
        for (int j = 0; j < kAJ; ++j) {
          const int64_t step = WFMT == kFmtFP8 ? kt * 128 : kt * 64;
          cp_async16(sb + a_dst[j], a_ok[j] ? a_src[j] + step : dummy, a_ok[j] ? 16 : 0);
        }
#pragma unroll
        for (int j = 0; j < C::kBChunks; ++j) {
          cp_async16(sb + b_dst[j], b_ok[j] ? b_src[j] + kt * 128 : dummy, b_ok[j] ? 16 : 0);
        }
        if (pt_id < BN) {
          cp_async4(sb + C::kOffSa + pt_id * 4, sa_src != nullptr ? sa_src + kt : a.x_scale,
                    sa_src != nullptr ? 4 : 0);
        }
        if constexpr (WFMT == kFmtFP4) {
          cp_async4(sb + C::kOffSraw + pt_id * 4, fs_ok ? sbase + fs_idx + kt * 4 : sbase,
                    fs_ok ? 4 : 0);
        } else {
          if (pt_id < (EPI == kEpiSwiGLU ? 2 : 1)) {
            // the 4-byte word holding the scale (fp32: the scale); the last word of an e8m0
            // tensor whose length is not a multiple of 4 is read in part (zero-filled)
            const int64_t si = s8_idx + kt;
            const int64_t off = a.scale_fp32 ? si * 4 : (si & ~int64_t{3});
            const int64_t left = a.w_scale_bytes - off;
            cp_async4_part(sb + C::kOffSw + pt_id * 4, sbase + off,
                           static_cast<int>(left < 4 ? left : 4));
          }
        }
        if constexpr (WFMT == kFmtFP8) {
          mbar_arrive_cp_async(full_bar + s * 8);
        } else {
          mbar_arrive_cp_async(raw_full_bar + s * 8);
        }
        cp_async_commit();  // (groups only for the final drain)
        if constexpr (WFMT == kFmtFP4) {
          if (it - converted >= kLag) {
            convert(converted);
            ++converted;
          }
        }
      }
    }
    if constexpr (WFMT == kFmtFP4) {
      while (converted < it) {
        convert(converted);
        ++converted;
      }
    }
    cp_async_wait<0>();  // nothing in flight when the thread exits
    return;
  }

  // =================================== consumers ===================================
  const int wg = warp >> 2, w4 = warp & 3, g = lane >> 2, tg = lane & 3;
  const int r0 = wg * 64 + w4 * 16 + g;  // this thread's accumulator rows r0 and r0 + 8
  uint8_t* et = smem + C::kOffEpi;
  float acc[C::kAcc];  // the unit's fp32 result (scaled)
  int it = 0;  // steps consumed (the producer's step numbering)

  for (int u = blockIdx.x; u < total; u += gridDim.x) {
    const Unit t = find_unit<BN>(a, upre, u);
    // FP8 e8m0: the producer copies the aligned word holding element si = idx_m + kt of matrix
    // m's scale; its byte is (idx_m + kt) & 3
    int b0 = 0, b1 = 0;
    if constexpr (WFMT == kFmtFP8) {
      int m0;
      const int wr0 = weight_row(t.fb, 0, m0);
      b0 = static_cast<int>(w_scale_idx(t.e, 0, wr0, 0) & 3);
      b1 = EPI == kEpiSwiGLU ? static_cast<int>(w_scale_idx(t.e, 1, wr0, 0) & 3) : b0;
    }
#pragma unroll
    for (int i = 0; i < C::kAcc; ++i) acc[i] = 0.f;

    // The k loop with the unit's MMA width N as a compile-time constant: every wgmma of the
    // loop has the same fragment (tmp[0 .. N/2)), which ptxas needs to pipeline them (a
    // runtime choice of N per k block made it serialise them: warning C7511).
    with_mma_width<BN>(mma_width(t.rows_t), [&](auto w) {
      constexpr int N = decltype(w)::value;
      // one k block's unscaled MMA result: the m64nN fragment of this width alone (each
      // block's first wgmma overwrites it: scale-d = 0; zeroed here only to be defined)
      float tmp[N / 2];
#pragma unroll
      for (int i = 0; i < N / 2; ++i) tmp[i] = 0.f;
      for (int kt = 0; kt < KT; ++kt, ++it) {
        const int s = it % S;
        const uint32_t sb = base + s * C::kStageStride;
        mbar_wait(full_bar + s * 8, static_cast<uint32_t>((it / S) & 1));
        fence_proxy_async();  // the landed cp.async data -> wgmma's async proxy (see above)
        qmma_block<N>(tmp, sb + wg * 64 * 128, sb + C::kOffB);
        // weight scales of rows r0 / r0 + 8 (read while the MMAs run)
        float sw_lo, sw_hi;
        if constexpr (WFMT == kFmtFP8) {
          const uint32_t w0 = lds32(sb + C::kOffSw);
          const uint32_t w1 = EPI == kEpiSwiGLU ? lds32(sb + C::kOffSw + 4) : w0;
          if (a.scale_fp32) {
            sw_lo = __uint_as_float(w0);
            sw_hi = __uint_as_float(w1);
          } else {
            sw_lo = e8m0_to_f32((w0 >> (8 * ((b0 + kt) & 3))) & 0xFFu);
            sw_hi = e8m0_to_f32((w1 >> (8 * ((b1 + kt) & 3))) & 0xFFu);
          }
        } else {
          sw_lo = ldsf(sb + C::kOffSw + r0 * 4);
          sw_hi = ldsf(sb + C::kOffSw + (r0 + 8) * 4);
        }
        // promotion after wait_group 0: tmp is complete and stage s is no longer read
        wgmma_wait_all();
        fence_regs(tmp);
#pragma unroll
        for (int i = 0; i < N / 8; ++i) {
          const float2 sa = lds64f(sb + C::kOffSa + (i * 8 + 2 * tg) * 4);
          acc[i * 4 + 0] = fmaf(tmp[i * 4 + 0], sw_lo * sa.x, acc[i * 4 + 0]);
          acc[i * 4 + 1] = fmaf(tmp[i * 4 + 1], sw_lo * sa.y, acc[i * 4 + 1]);
          acc[i * 4 + 2] = fmaf(tmp[i * 4 + 2], sw_hi * sa.x, acc[i * 4 + 2]);
          acc[i * 4 + 3] = fmaf(tmp[i * 4 + 3], sw_hi * sa.y, acc[i * 4 + 3]);
        }
        mbar_arrive(empty_bar + s * 8);  // this thread is done with stage s (release)
      }
    });

    // ---- epilogue: registers -> shared tile [BN rows][kFeat] bf16 -> global ----
    epi_stage<EPI, BN, C::kEpiStride>(acc, et, wg, w4, g, tg, a.swiglu_limit, [&](int c) {
      return c < t.rows_t ? __ldg(a.route_weight + t.pt + c) : 0.f;
    });
    consumer_sync();
    epi_store<C::kFeat, C::kEpiStride>(a, et, t, tid, C::kConsumers);
    consumer_sync();  // the next unit's epilogue overwrites the staged tile
  }
#endif  // DSV4_GG_WGMMA
}

// Runs one variant: grid = min(upper bound of the unit count, SMs).
template <int WFMT, int EPI, int BN>
cudaError_t launch_qmma_variant(const GroupedGemmArgs& a, int num_sms, cudaStream_t stream) {
  using C = QCfg<WFMT, EPI, BN>;
  const int64_t n_fb = (a.rows + C::kFeat - 1) / C::kFeat;
  const int64_t units = unit_bound(a, n_fb, BN);
  if (units > INT_MAX) return cudaErrorInvalidValue;
  if (units == 0) return cudaSuccess;
  const int grid = static_cast<int>(units < num_sms ? units : num_sms);
  auto* fn = &grouped_gemm_qmma_kernel<C, WFMT, EPI, BN>;
  cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem);
  if (err != cudaSuccess) return err;
  fn<<<grid, C::kThreads, C::kSmem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace gg
}  // namespace dsv4
