// Warp-specialised mainloop of the bf16-weight grouped GEMM for the tensor-core-bound tiles
// (kLarge: 128 weight rows x 128 activation rows, kHuge: 128 x 256). Torch-free; contract in
// include/dsv4/grouped_gemm.h; selected by GroupedGemmArgs::mainloop / DSV4_GEMM_MAINLOOP=ws.
//
// Same "swap AB" orientation, unit walk (unit_prefix / find_unit), SwiGLU row interleave,
// inverse-RoPE arithmetic and epilogue (epi_stage / epi_store) as grouped_gemm.cuh; what
// differs is who does what:
//   * warpgroups 0 and 1 are the consumers: each issues the m64nNk16 wgmmas of its 64 weight
//     rows against the stage's activation tile, keeping one k step's MMAs in flight while the
//     next step's are issued (wgmma.wait_group 1), and runs the epilogue;
//   * warpgroup 2 is the producer: it fills a ring of S stages (weight tile 128 x 64 bf16 +
//     activation tile BN x 64 bf16, K-major, 128-byte swizzle) with cp.async, the activation
//     rows gathered through row_ids (a per-warp table of row byte offsets, computed once per
//     unit), zero-filled past the unit's rows, past `rows` or past K;
//   * setmaxnreg moves registers from the producer (56) to the consumers (224).
//   Both sides walk the same units in the same order and number the k steps they handle 0, 1,
//   2, ... across units; step i uses stage i % S. The producer runs ahead across unit
//   boundaries (the next unit's first stages load during this unit's epilogue).
//
// Pipeline protocol (the one of grouped_gemm_qmma.cuh, which passed its tests and memcheck on an
// H100, with lane-0-per-warp empty arrivals instead of one per thread; a barrier's
// k-th phase completes on the k-th use of its stage, i.e. for step i = s + k S, and a wait for
// it passes parity k & 1):
//   full[s]   expected 128: one cp.async.mbarrier.arrive.noinc per producer thread per step,
//             issued after the thread's copies of the step (.noinc: the asynchronous arrival is
//             one of the 128 expected; it happens once every cp.async the thread issued before
//             it has landed).
//   empty[s]  expected 8: lane 0 of every consumer warp, once the wgmmas that read stage s are
//             complete (wgmma.wait_group: 1 for the previous step while the current one runs,
//             0 at the end of a unit) and after the warp's generic accesses of the stage (RoPE
//             steps; __syncwarp orders the lanes' accesses before lane 0's release arrive).
//   Producer, step i: if i >= S, wait empty[s] parity (i / S - 1) & 1; issue; arrive full[s].
//   Consumer, step i: wait full[s] parity (i / S) & 1; fence.proxy.async (the landed cp.async
//   data, written through the generic proxy, ordered before this thread's async-proxy wgmma
//   reads); RoPE step: rotate the activation tile in place, fence.proxy.async, bar.sync of the
//   256 consumer threads (both warpgroups read the whole activation tile); wgmmas of step i;
//   wait_group 1 (step i - 1 complete); release step i - 1. End of a unit: wait_group 0,
//   release its last step.
//   No hang: every arrival count is met by threads that always arrive (all 128 producer threads
//   for every step; the 8 consumer warps for every step, exactly once), both sides iterate the
//   same units x KT steps, and the two sides are never more than S steps apart, so a parity
//   wait refers to the newest or the next phase.
// Shared memory (227 KB): S stages of 16 KB (weights) + BN x 128 B (activations), the epilogue
// tile BN x (2 kFeat + 16) B, the row-offset table, barriers, the unit prefix sum. Stages: BN 128
// -> 5 (store, RoPE) / 6 (SwiGLU); BN 256 -> 3 (all three; store / RoPE: a 68 KB epilogue
// tile). Registers (ptxas, sm_90a): 168 at launch; producer code <= 56 after setmaxnreg.dec,
// consumer code <= 224 after setmaxnreg.inc; no spills except one word around setmaxnreg.
// Unit order: row tile by row tile (find_unit's tb_major) when every expert's activation rows
// outweigh its weights (the output projection at prefill), feature block by feature block
// otherwise.
// Consumer-owned shared memory (the epilogue tile, overlaid by the per-unit RoPE (cos, sin)
// table: the table is used during the k loop, the tile after it) is ordered by bar.sync 1, 256
// among the consumers; the producer's row-offset table is per warp (a warp's rows are its own)
// and ordered by __syncwarp.
#pragma once

#include "grouped_gemm.cuh"
#include "grouped_gemm_mbarrier.cuh"

namespace dsv4 {
namespace gg {

// ------------------------------ shared-memory helpers (mbarriers: grouped_gemm_mbarrier.cuh)
__device__ __forceinline__ int64_t lds64s(uint32_t addr) {
  int64_t v;
  asm volatile("ld.shared.s64 %0, [%1];\n" : "=l"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ void sts64s(uint32_t addr, int64_t v) {
  asm volatile("st.shared.s64 [%0], %1;\n" ::"r"(addr), "l"(v) : "memory");
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
#if DSV4_GG_WGMMA
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
#if DSV4_GG_WGMMA
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

template <int EPI, bool ROPE, int BN>
struct WsCfg {
  static constexpr int kConsumers = 256;
  static constexpr int kThreads = kConsumers + 128;  // + one producer warpgroup
  static constexpr int kProducerRegs = 56;           // 128 x 56 + 256 x 224 <= 65536
  static constexpr int kConsumerRegs = 224;
  static constexpr int kRowsA = 128;                  // weight rows per tile (64 per consumer wg)
  static constexpr int kABytes = kRowsA * 128;        // bf16 weight tile of one k step
  static constexpr int kBBytes = BN * 128;            // bf16 activation tile of one k step
  static constexpr int kOffB = kABytes;
  static constexpr int kStageStride = kABytes + kBBytes;
  static constexpr int kFeat = EPI == kEpiSwiGLU ? kRowsA / 2 : kRowsA;
  static constexpr int kEpiStride = kFeat * 2 + 16;
  static constexpr int kRopeBytes = ROPE ? BN * kRopePairs * 8 : 0;
  // the epilogue tile and the RoPE table share one region (used at different times)
  static constexpr int kEpiBytes =
      round_up(BN * kEpiStride > kRopeBytes ? BN * kEpiStride : kRopeBytes, 1024);
  static constexpr int kXoffBytes = BN * 8;   // producer: byte offset of each activation row
  static constexpr int kBarBytes = 2 * 16 * 8;  // full / empty, <= 16 stages
  static constexpr int kPrefixBytes = (kMaxExperts + 1) * 4;
  static constexpr int kFixed = kEpiBytes + kXoffBytes + kBarBytes + kPrefixBytes + 1024;
  static constexpr int kFit = (kSmemLimit - kFixed) / kStageStride;
  static constexpr int kStages = kFit < 8 ? kFit : 8;
  static constexpr int kOffEpi = kStages * kStageStride;
  static constexpr int kOffXoff = kOffEpi + kEpiBytes;
  static constexpr int kOffBar = kOffXoff + kXoffBytes;
  static constexpr int kOffPrefix = kOffBar + kBarBytes;
  static constexpr int kSmem = kOffPrefix + kPrefixBytes + 1024;  // + slack to align to 1024
  static constexpr int kAcc = BN / 2;
  static constexpr int kAJ = kRowsA * 8 / 128;     // weight chunks per producer thread per step
  static constexpr int kBJ = BN * 8 / 128;         // activation chunks per producer thread
  static constexpr int kRopeJ = BN * 8 / kConsumers;  // activation chunks per consumer (RoPE)

  static_assert(BN == 128 || BN == 256, "tensor-core tiles");
  static_assert(kStages >= 3 && kStages <= 16, "pipeline depth");
  static_assert(kSmem <= kSmemLimit, "shared memory budget");
  static_assert(kABytes % 1024 == 0 && kStageStride % 1024 == 0, "1024-byte aligned tiles");
  static_assert(kOffXoff % 16 == 0 && kOffBar % 8 == 0 && kOffPrefix % 16 == 0, "alignment");
  static_assert(kProducerRegs * 128 + kConsumerRegs * kConsumers <= 65536, "register file");
};

template <class C, int EPI, bool ROPE, int BN>
__global__ void __launch_bounds__(C::kThreads, 1)
    grouped_gemm_ws_kernel(const GroupedGemmArgs a, bool tb_major) {
#if !DSV4_GG_WGMMA
  __trap();
#else
  constexpr int S = C::kStages;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base - raw);
  int* upre = reinterpret_cast<int*>(smem + C::kOffPrefix);
  const uint32_t full_bar = base + C::kOffBar, empty_bar = full_bar + 16 * 8;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int K = a.k;
  const int KT = (K + kBK - 1) / kBK;
  const int n_fb = (a.rows + C::kFeat - 1) / C::kFeat;

  // ---- the barriers (protocol above), then the unit prefix sum (its __syncthreads publish
  // the initialised barriers) ----
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(full_bar + s * 8, 128u);  // the producer threads, one noinc arrive each
      mbar_init(empty_bar + s * 8, C::kConsumers / 32);  // lane 0 of each consumer warp
    }
  }
  const int total = unit_prefix<BN>(a, n_fb, upre, tid, C::kThreads);

  if (warp >= C::kConsumers / 32) {
    // =================================== producer ===================================
    setmaxnreg_dec<C::kProducerRegs>();
    const int pt_id = tid - C::kConsumers;  // 0 .. 127
    const int pw = pt_id >> 5;              // producer warp 0 .. 3
    // chunk j of this thread (weights and activations alike): tile row r0 + 16 j, 16-byte
    // column col. A warp's rows are 4 pw + [0, 4) + 16 j: no two warps share a row.
    const int col = pt_id & 7, r0 = pt_id >> 3;
    const uint32_t swz = static_cast<uint32_t>(((col ^ r0) & 7) << 4);  // (r0 + 16 j) & 7 = r0 & 7
    const char* dummy = static_cast<const char*>(a.x);
    const char* xbase = static_cast<const char*>(a.x);
    const uint32_t xoff = base + C::kOffXoff;
    int it = 0;  // steps issued
    for (int u = blockIdx.x; u < total; u += gridDim.x) {
      const Unit t = find_unit<BN>(a, upre, u, tb_major);
      const int e = t.e, fb = t.fb, rows_t = t.rows_t;
      const int64_t pt = t.pt;
      // the warp's activation rows 4 pw + q + 16 j (q < 4, j < kBJ): byte offset from x of
      // each, -1 for a row past the unit's rows or outside [0, x_rows). The warp's previous
      // unit's copies read the table: every lane has issued them (__syncwarp) before it changes.
      __syncwarp();
      for (int i = lane; i < 4 * C::kBJ; i += 32) {
        const int br = 4 * pw + (i & 3) + 16 * (i >> 2);
        int64_t off = -1;
        if (br < rows_t) {
          const int64_t xr =
              a.row_ids != nullptr ? static_cast<int64_t>(__ldg(a.row_ids + pt + br)) : pt + br;
          if (xr >= 0 && xr < a.x_rows) off = (e * a.x_expert_stride + xr * a.x_row_stride) * 2;
        }
        sts64s(xoff + br * 8, off);
      }
      __syncwarp();
      const char* wexp = static_cast<const char*>(a.w) + e * a.w_expert_stride;

      for (int kt = 0; kt < KT; ++kt, ++it) {
        const int s = it % S;
        if (it >= S) mbar_wait(empty_bar + s * 8, static_cast<uint32_t>((it / S - 1) & 1));
        const uint32_t sb = base + s * C::kStageStride;
        const bool k_ok = kt * kBK + col * 8 < K;
        // weights: tile row r = r0 + 16 j -> weight row of matrix m (SwiGLU interleave)
#pragma unroll
        for (int j = 0; j < C::kAJ; ++j) {
          const int r = r0 + 16 * j;
          int m;
          const int wr = weight_row<EPI, C::kFeat>(fb, r, m);
          const bool ok = k_ok && wr < a.rows;
          const char* src = wexp + m * a.w_mat_stride + static_cast<int64_t>(wr) * a.w_row_stride +
                            col * 16 + kt * 128;
          cp_async16(sb + r * 128 + swz, ok ? src : dummy, ok ? 16 : 0);
        }
        // activations: tile row br = r0 + 16 j through the row-offset table
#pragma unroll
        for (int j = 0; j < C::kBJ; ++j) {
          const int br = r0 + 16 * j;
          const int64_t off = lds64s(xoff + br * 8);
          const bool ok = k_ok && off >= 0;
          cp_async16(sb + C::kOffB + br * 128 + swz, ok ? xbase + off + col * 16 + kt * 128 : dummy,
                     ok ? 16 : 0);
        }
        mbar_arrive_cp_async(full_bar + s * 8);
        cp_async_commit();  // (groups only for the final drain)
      }
    }
    cp_async_wait<0>();  // nothing in flight when the thread exits
    return;
  }

  // =================================== consumers ===================================
  setmaxnreg_inc<C::kConsumerRegs>();
  const int wg = warp >> 2, w4 = warp & 3, g = lane >> 2, tg = lane & 3;
  uint8_t* et = smem + C::kOffEpi;
  float2* rope_tab = reinterpret_cast<float2*>(smem + C::kOffEpi);  // overlays et (see above)
  int it = 0;  // steps consumed (the producer's step numbering)

  // lane 0 of each consumer warp releases stage s (the warp's wgmmas reading it are complete)
  auto release = [&](int step) {
    __syncwarp();
    if (lane == 0) mbar_arrive(empty_bar + (step % S) * 8);
  };

  for (int u = blockIdx.x; u < total; u += gridDim.x) {
    const Unit t = find_unit<BN>(a, upre, u, tb_major);
    if constexpr (ROPE) {
      // (cos, sin) of -positions[p] * freqs[j] per tile row (as grouped_gemm.cuh); the previous
      // unit's epilogue is done with the region (the consumer_sync that ends it)
      for (int idx = tid; idx < BN * kRopePairs; idx += C::kConsumers) {
        const int i = idx / kRopePairs, jp = idx % kRopePairs;
        float sn = 0.f, cs = 1.f;
        if (i < t.rows_t) {
          const float ang =
              static_cast<float>(__ldg(a.positions + t.pt + i)) * __ldg(a.freqs + jp);
          sincosf(ang, &sn, &cs);
        }
        rope_tab[idx] = make_float2(cs, sn);
      }
      consumer_sync();
    }
    // The unit with its MMA width N as a compile-time constant: the k loop and the epilogue
    // use this width's fragment acc[0 .. N/2) alone (one fragment for every wgmma of the
    // loop, defined by nothing else while they run: ptxas pipelines them, C7515 otherwise)
    with_mma_width<BN>(mma_width(t.rows_t), [&](auto w) {
      constexpr int N = decltype(w)::value;
      float acc[N / 2];
#pragma unroll
      for (int i = 0; i < N / 2; ++i) acc[i] = 0.f;
#pragma unroll 1
      for (int kt = 0; kt < KT; ++kt, ++it) {
        const int s = it % S;
        const uint32_t sb = base + s * C::kStageStride;
        mbar_wait(full_bar + s * 8, static_cast<uint32_t>((it / S) & 1));
        fence_proxy_async();  // the landed cp.async data -> wgmma's async proxy
        if constexpr (ROPE) {
          if ((kt * kBK) % a.head_dim == a.head_dim - kBK) {
            // the head's last 64 dims: rotate the activation tile in place (both warpgroups
            // read all of it: each thread rotates 1/256 of the chunks, then the consumers sync)
#pragma unroll
            for (int j = 0; j < C::kRopeJ; ++j) {
              const int c = tid + C::kConsumers * j, br = c >> 3, bc = c & 7;
              const uint32_t addr = sb + C::kOffB + br * 128 + (((bc ^ br) & 7) << 4);
              uint4 v = lds128(addr);
              uint32_t* wv = reinterpret_cast<uint32_t*>(&v);
#pragma unroll
              for (int q = 0; q < 4; ++q) {  // pairs 4 bc + q of the 32 rope pairs
                wv[q] = rope_inv_bf16x2(wv[q], rope_tab[br * kRopePairs + bc * 4 + q]);
              }
              sts128(addr, v);
            }
            fence_proxy_async();  // this thread's rotated chunks -> the async proxy
            consumer_sync();
          }
        }
        mma_step<N>(acc, sb + wg * 64 * 128, sb + C::kOffB);
        wgmma_wait_1();  // step kt - 1 complete; step kt may still run
        fence_regs(acc);
        if (kt > 0) release(it - 1);
      }
      wgmma_wait_all();
      fence_regs(acc);
      release(it - 1);  // KT >= 1: the unit's last step

      // ---- epilogue: registers -> shared tile [rows][kFeat] bf16 -> global (columns
      // >= N are not staged: the unit has rows_t <= N rows) ----
      if constexpr (ROPE) consumer_sync();  // every consumer is done with the RoPE table
      epi_stage<EPI, N, C::kEpiStride>(acc, et, wg, w4, g, tg, a.swiglu_limit, [&](int c) {
        return c < t.rows_t ? __ldg(a.route_weight + t.pt + c) : 0.f;
      });
    });
    consumer_sync();
    epi_store<C::kFeat, C::kEpiStride>(a, et, t, tid, C::kConsumers);
    consumer_sync();  // the next unit's epilogue (or RoPE table) overwrites the region
  }
#endif  // DSV4_GG_WGMMA
}

// Runs one variant: grid = min(upper bound of the unit count, SMs).
template <int EPI, bool ROPE, int BN>
cudaError_t launch_ws_variant(const GroupedGemmArgs& a, int num_sms, cudaStream_t stream) {
  using C = WsCfg<EPI, ROPE, BN>;
  const int64_t n_fb = (a.rows + C::kFeat - 1) / C::kFeat;
  const int64_t units = unit_bound(a, n_fb, BN);
  if (units > INT_MAX) return cudaErrorInvalidValue;
  if (units == 0) return cudaSuccess;
  const int grid = static_cast<int>(units < num_sms ? units : num_sms);
  auto* fn = &grouped_gemm_ws_kernel<C, EPI, ROPE, BN>;
  cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem);
  if (err != cudaSuccess) return err;
  // unit order: row tile by row tile where every expert's activation rows outweigh its weights
  // (the output projection at prefill: concurrent blocks share the activation tile, and the
  // group's weights stay in L2), feature block by feature block otherwise (routed experts)
  const bool tb_major = a.expert_offsets == nullptr && a.pairs > n_fb * C::kRowsA;
  fn<<<grid, C::kThreads, C::kSmem, stream>>>(a, tb_major);
  return cudaGetLastError();
}

// bf16 weights, tile kLarge (BN 128) or kHuge (BN 256) (grouped_gemm_ws.cu).
cudaError_t launch_ws_bf16(const GroupedGemmArgs& a, GemmTile tile, int num_sms, cudaStream_t s);

}  // namespace gg
}  // namespace dsv4
