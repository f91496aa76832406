// dsv4 sparse attention, prefill kernel for Hopper (sm_90a, head_dim 512): warp-specialised
// producer / consumer warpgroups. Contract: include/dsv4/sparse_attn.h (same operation as
// dsv4::sparse_attn); API: include/dsv4/sparse_attn_prefill.h. The key-list walk (scopes,
// lengths, 64-key blocks), the shared-memory swizzle, the wgmma descriptors and wrappers come
// from sparse_attn.cuh, so both kernels read one definition of the key set.
//
// One tile = one query token x 64 heads. 384 threads per CTA (grid.x only), one CTA per tile,
// or (DSV4_SPARSE_PREFILL_PERSISTENT=1, kPersist) at most one CTA per SM looping over tiles
// tile = blockIdx.x + k gridDim.x; everything below is per tile, and the barrier phases run on
// from tile to tile (the iteration count i below counts this CTA's earlier tiles' too):
//   WG2 (producer, 56 registers): gathers key rows with cp.async (16 B per thread, zero-filled
//       for invalid slots) into two key buffers B0, B1 (64 keys x 512 bf16 each), each in two
//       halves L (columns 0-255) and R (256-511) with their own "ready" / "free" mbarriers, and
//       writes one validity byte per key row. The raw indices of an iteration's two blocks are
//       loaded one iteration ahead, all 8 loads of a thread in flight at once. (The first
//       version loaded them one by one, each used before the next was issued: 8 dependent
//       global round trips per iteration on the producer's path; it measured 994 us on the
//       H100 at T4096 h64 top-512 against a 490-600 us prediction.)
//   WG0, WG1 (consumers, 224 registers): iteration i covers blocks 2i (in B0, "WG0's block")
//       and 2i+1 (in B1, "WG1's block"). WG0 owns output columns 0-255, WG1 columns 256-511.
//       Each consumer computes S = Q K^T of its own block (64 heads x 64 keys, wgmma m64n64k16
//       from shared memory), its softmax, and O_half += P V for BOTH blocks: its own P from
//       registers (wgmma RS) and the other consumer's P from shared memory (wgmma SS).
//
// The two blocks of an iteration share one running row maximum, agreed in a chain (FlashMLA's
// sm90 sparse prefill; all logits in the log2 domain, s = q.k * scale * log2 e):
//   WG0: M0 = max(M, rowmax S0); P0 = 2^(S0 - M0); O0 = O0 * 2^(M - M0) + P0 V0[:, L]   (RS)
//   WG1: M1 = max(M0, rowmax S1); P1 = 2^(S1 - M1); O1 = O1 * 2^(M - M1) + P1 V1[:, R]  (RS)
//        O1 += (P0 2^(M0 - M1)) V0[:, R]                                               (SS)
//   WG0: O0 = O0 * 2^(M0 - M1) + P1 V1[:, L]                                             (SS)
//   both: M = M1.
// so WG0's softmax overlaps WG1's S GEMM and WG1's softmax overlaps WG0's first P V GEMM;
// WG0 waits for its first P V GEMM and frees B0's left half before it waits for M1, and issues
// the next block's S GEMM right behind its second P V GEMM. Each consumer keeps the
// row sum of its own blocks' fp32 probabilities; the two are added in the epilogue.
// A row max of -inf (no valid key yet) is never subtracted: exponents use U(M) = (M == -inf ?
// 0 : M), and rescale factors 2^(M_old - U(M_new)) with the raw old max, so (-inf) - (-inf)
// and 0 * inf never occur; a token without a valid key ends with l = 0: out 0, lse +inf.
//
// Synchronisation (each line: who signals -> who waits, and what it orders):
//   mbarrier q          (128 cp.async arrivals)  producer -> consumers: Q tile landed.
//   mbarrier q_free     (256 arrivals) both consumers -> producer: the tile's Q is read no more
//       (each after its last S GEMM of the tile; at once for a tile without keys). The producer
//       waits for it before loading the next tile's Q (tile k + 1 waits for phase k).
//   mbarrier ready[b][h] (128 cp.async + 128 plain arrivals) producer -> consumers: half h of
//       buffer b landed, and (with ready[0][L], ready[1][R]) the validity bytes of buffer b.
//   mbarrier free[b][h]  (128 arrivals) the last consumer reading that half -> producer:
//       free[0][L] WG0 after P0 V0[:, L];   free[0][R] WG1 after P0 V0[:, R];
//       free[1][R] WG1 after P1 V1[:, R];   free[1][L] WG0 after P1 V1[:, L].
//       (Each consumer's own S GEMM on the buffer completed before its softmax, which precedes
//       the named-barrier signal the other consumer waits on before its last read.)
//   named barriers (256 = WG0 + WG1; one bar.arrive side, one bar.sync side per iteration):
//       M0: WG0 wrote sM[0] (M0)    -> WG1 reads it.
//       M1: WG1 wrote sM[1] (M1)    -> WG0 reads it.
//       P0: WG0 wrote sP[0] (P0 at M1 scale, + fence.proxy.async) -> WG1's SS GEMM.
//       P1: WG1 wrote sP[1] (P1, + fence.proxy.async)             -> WG0's SS GEMM.
//     No side can pass the same barrier twice before the other side's matching wait: WG0's next
//     M0 arrive follows its M1 wait (which follows WG1's M0 wait); WG1's next M1 arrive follows
//     its M0 wait (after WG0's M1 wait); WG0's next P0 arrive follows its next M1 wait (after
//     WG1 finished this iteration, P0 wait and SS GEMM included); WG1's next P1 arrive follows
//     its next M0 wait (after WG0's P1 wait and its SS GEMM). The same orderings make every
//     rewrite of sM, sP and the validity bytes happen after the previous reader is done.
//       L: both wrote their row sums (sL[k & 1]) -> both read them (bar.sync on both sides, once
//     per tile: across tiles it orders the rewrites above like an iteration's barriers do; the
//     row sums alternate between two buffers, as one consumer may start the next tile, and
//     write its sums if that tile has no keys, while the other still reads the last ones).
//   Consumers run fence.proxy.async after each mbarrier wait, before wgmma reads the gathered
//   rows; writers of sP run it before their bar.arrive.
// Phases: consumers wait ready with parity (i & 1); the producer waits free with parity
// ((i & 1) ^ 1) (the CTA's first iteration passes at once: the buffers start free); consumers
// wait q with parity (k & 1) for the CTA's k-th tile.
// Output: one CTA per tile stages bf16 O through the Q buffer (16-byte stores); the persistent
// grid writes it straight from registers (4-byte stores), as the producer is already loading the
// next tile's Q there.
#include "sparse_attn.cuh"

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "dsv4/sparse_attn_prefill.h"
#include "own_error.cuh"

namespace dsv4 {
namespace sparse_prefill_detail {

using sparse_attn_detail::kBlockM;
using sparse_attn_detail::kBlockN;
using sparse_attn_detail::kLn2;
using sparse_attn_detail::kLog2e;

constexpr int kD = 512;
constexpr int kThreads = 384;        // WG0, WG1 consumers; WG2 producer
constexpr int kConsumerRegs = 224;   // setmaxnreg targets; 2 * 224 + 56 = 3 * 168 (the entry cap
constexpr int kProducerRegs = 56;    // of __launch_bounds__(384, 1): 65536 / 384 rounded to 8)
static_assert(2 * kConsumerRegs + kProducerRegs <= 3 * 168, "register file of one SM");
static_assert(kBlockM == 64 && kBlockN == 64, "64 heads x 64 keys per tile");

// Shared memory (offsets from a 1024-byte aligned base): Q at 0, B0 at kTile, B1 at 2 kTile, then
// sP, sM / sL, the validity bytes and the mbarriers. Q, B0, B1: [64 rows x 512] bf16 as 8
// slices of [64 rows x 128 B] (8 KB each), 16-byte chunk c of row r at chunk (c ^ (r & 7))
// (sparse_attn_detail::swz128, the SW128 layout of the wgmma descriptors). sP[w]: one slice.
constexpr uint32_t kSlice = 64 * 128;
constexpr uint32_t kTile = 8 * kSlice;
constexpr uint32_t kPOff = 3 * kTile;               // sP[0] (WG0's P), sP[1] (WG1's P)
constexpr uint32_t kMOff = kPOff + 2 * kSlice;  // f32 sM[2][64] row maxima, sL[2][2][64] row sums
constexpr uint32_t kFlagOff = kMOff + 6 * 64 * 4;   // u8 [2][64]: key row of buffer b is valid
constexpr uint32_t kBarOff = kFlagOff + 2 * 64;  // 10 mbarriers: q, ready[2][2], free[2][2], q_free
constexpr uint32_t kSmemUsed = kBarOff + 10 * 8;
constexpr uint32_t kSmem = kSmemUsed + 1024;        // slack to align the base
static_assert(kBarOff % 8 == 0, "mbarriers are 8-byte aligned");
static_assert(kSmem <= 227 * 1024, "shared memory of one SM");

#if DSV4_SPARSE_ATTN_WGMMA
constexpr uint32_t kQOff = 0;      // Q, then the bf16 O staging
constexpr uint32_t kKOff = kTile;  // B0, B1 (kPOff = kKOff + 2 * kTile)
static_assert(kPOff == kKOff + 2 * kTile, "layout");
// Named barrier ids (0 is __syncthreads).
constexpr int kBarM0 = 1, kBarM1 = 2, kBarP0 = 3, kBarP1 = 4, kBarL = 5, kBarStage = 6;  // +wg

using sparse_attn_detail::cp_async16;
using sparse_attn_detail::cp_async_wait_all;
using sparse_attn_detail::exp2_approx;
using sparse_attn_detail::fence_proxy_async;
using sparse_attn_detail::fence_regs;
using sparse_attn_detail::ld_shared_v4;
using sparse_attn_detail::named_barrier;
using sparse_attn_detail::pack_bf16x2;
using sparse_attn_detail::smem_desc;
using sparse_attn_detail::smem_u32;
using sparse_attn_detail::st_shared_u32;
using sparse_attn_detail::swz;
using sparse_attn_detail::swz128;
using sparse_attn_detail::token_keys;
using sparse_attn_detail::TokenKeys;
using sparse_attn_detail::wgmma_commit;
using sparse_attn_detail::wgmma_fence;
using sparse_attn_detail::wgmma_m64n256k16_ss_tb;

// ---------------------------------------------------------------------------------------------
// PTX helpers (sm_90a)
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the initialised barriers visible to the other threads and the asynchronous units.
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// Plain arrival (release semantics: the thread's earlier shared-memory writes are visible to a
// thread that then observes the phase completion).
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile(
      "{\n.reg .b64 st;\n"
      "mbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar)
      : "memory");
}
// Arrival that fires when every cp.async this thread issued so far has landed (.noinc: the
// barrier's expected count includes it).
__device__ __forceinline__ void mbar_arrive_cp_async(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the phase of parity `parity` has completed; true when it did. A phase that does
// not complete within 2^26 polls (seconds; a real wait takes microseconds) can only come from a
// protocol bug: the wait gives up and returns false, so the kernel ends (its consumers then write
// NaN) instead of hanging the GPU. (A trap here makes ptxas spill the consumers' registers.)
__device__ __forceinline__ bool mbar_wait(uint32_t bar, uint32_t parity) {
  for (uint32_t n = 0; n < (1u << 26); ++n) {
    uint32_t done;
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    if (done) return true;
  }
  return false;
}
// Named barrier: signal without waiting (the other side waits with named_barrier = bar.sync).
__device__ __forceinline__ void named_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
// Keeps registers that an in-flight wgmma reads (the A fragments) alive and untouched until
// after the wgmma.wait_group that this follows.
template <int N>
__device__ __forceinline__ void fence_regs_u32(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}
// Raw index at `slot` (ld.global.nc), or -1 where slot is nullptr (nothing read). A predicated
// load, no branch: the producer issues all of an iteration's index loads before it uses one.
__device__ __forceinline__ int ld_index_or_minus1(const int32_t* slot) {
  int v;
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.u64 p, %1, 0;\n"
      "mov.b32 %0, -1;\n"
      "@p ld.global.nc.b32 %0, [%1];\n}\n"
      : "=r"(v)
      : "l"(slot));
  return v;
}
// Global stores of the output, streaming (st.global.cs: written once, evicted first), so it
// does not push gathered key rows out of L2. (__stcs, not inline PTX: the compiler folds the
// constant parts of the addresses into the instructions.)
__device__ __forceinline__ void st_global_cs_u32(void* dst, uint32_t v) {
  __stcs(static_cast<unsigned int*>(dst), v);
}
__device__ __forceinline__ void st_global_cs_v4(void* dst, uint4 v) {
  __stcs(static_cast<uint4*>(dst), v);
}
// 16-byte cp.async (src_bytes = 0 zero-fills, nothing read) with a 256-byte L2 prefetch (the
// next 128-byte slice of the same key row). No L2 cache-policy operand: with one
// (`.L2::cache_hint`, the policy from createpolicy or as a constant) ptxas 13.0 gave this
// kernel's cp.async a 64-bit policy descriptor whose low word is the uniform register that also
// holds the shared-memory base (SASS: `UMOV UR40, 0x0; UMOV UR41, 0x14f00000; UMOV UR40, UR13`
// before the LDGSTS), an "illegal instruction" on the GPU (H100, 2026-12-05).
__device__ __forceinline__ void cp_async16_prefetch(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

// d (+)= A B, 64 x 64 x 16, A and B K-major in shared memory (SW128). scale_d = 0: d = A B.
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], uint64_t desc_a,
                                                   uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
        "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
        "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// d += A B, 64 x 256 x 16, A (bf16) from registers in the accumulator-fragment layout of a
// 64 x 16 tile (a0: row g, k 2t..2t+1; a1: row g+8; a2: row g, k+8; a3: row g+8, k+8; g =
// lane / 4, t = lane % 4, rows offset by 16 per warp), B MN-major (transposed) in shared memory.
__device__ __forceinline__ void wgmma_m64n256k16_rs_tb(float (&d)[128], uint32_t a0, uint32_t a1,
                                                       uint32_t a2, uint32_t a3,
                                                       uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, {%128, %129, %130, %131}, %132, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(1));
}

// A row maximum usable as an exponent offset: -inf (no valid key yet) -> 0.
__device__ __forceinline__ float finite_or_zero(float m) { return m == -INFINITY ? 0.f : m; }

// ---------------------------------------------------------------------------------------------
// Producer warpgroup: Q once, then per iteration the two key blocks, half by half in the order
// the consumers free them. Thread pt (0..127) copies 16-byte chunk c8 = pt % 8 of every 128-byte
// slice of rows r0 + 16 j (r0 = pt / 8, j = 0..3): 8 consecutive threads read 128 contiguous
// bytes of one key row. The 8 raw indices a thread needs per iteration (4 rows x 2 blocks) are
// loaded one iteration ahead, all 8 issued before any is used: one global round trip per
// iteration, hidden behind the previous iteration's waits (iteration 0's behind the Q copies).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void producer(const SparseAttnParams& p, uint32_t n_ht,
                                         uint32_t n_tiles, uint32_t stride, int pt, uint32_t sQ,
                                         uint32_t sK, uint8_t* flags, uint32_t bars) {
  const int H = static_cast<int>(p.num_heads);
  const int c8 = pt & 7, r0 = pt >> 3;
  // Chunk c8 of row r0 + 16 j in slice s of a tile is at my_chunk + j kRow16 + s kSlice
  // (= swz128(r0 + 16 j, 8 s + c8): rows 16 apart share their swizzle phase r0 & 7), and its
  // source at row + c8 * 16 + s * 128: immediate offsets from two per-row bases.
  const uint32_t my_chunk = swz128(r0, c8);
  constexpr uint32_t kRow16 = 16 * 128;
  const char* dummy = static_cast<const char*>(p.q);  // never read (src-size 0)
  const uint32_t bar_q = bars, bar_q_free = bars + 8u * 9;
  auto bar_ready = [&](int b, int h) { return bars + 8u * (1 + 2 * b + h); };
  auto bar_free = [&](int b, int h) { return bars + 8u * (5 + 2 * b + h); };

  // raw[4 * buf + j]: raw index of key row r0 + 16 j of block 2 it + buf (-1 past the scope's
  // length; a block >= tk.nb, the empty second block of an odd count or the blocks of iteration
  // n_iter, has no slot and reads nothing).
  auto load_raw = [&](const TokenKeys& tk, int it, int (&raw)[8]) {
#pragma unroll
    for (int buf = 0; buf < 2; ++buf) {
      const sparse_attn_detail::BlockSlots bs = sparse_attn_detail::block_slots(tk, 2 * it + buf);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        raw[4 * buf + j] =
            ld_index_or_minus1(r0 + 16 * j < bs.lanes ? bs.slots + r0 + 16 * j : nullptr);
    }
  };
  const __nv_bfloat16* kv1 = static_cast<const __nv_bfloat16*>(p.kv);
  const __nv_bfloat16* kv2 = static_cast<const __nv_bfloat16*>(p.extra_kv);
  uint32_t gi = 0;  // iterations of this CTA's earlier tiles (barrier phases run on across tiles)
  uint32_t k = 0;   // this CTA's earlier tiles
  for (uint32_t tile = blockIdx.x; tile < n_tiles; tile += stride, ++k) {
    const int64_t t = tile / n_ht;
    const int h0 = static_cast<int>(tile % n_ht) * kBlockM;
    const TokenKeys tk = token_keys(p, t);
    const int n_iter = (tk.nb + 1) >> 1;  // two 64-key blocks per iteration (the last may be empty)
    int raw_next[8];
    load_raw(tk, 0, raw_next);  // in flight during the Q copies
    // Both consumers are done with the previous tile's Q (its last S GEMMs) before it is replaced.
    if (k > 0) mbar_wait(bar_q_free, (k - 1) & 1u);

#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int row = r0 + 16 * j;
      const bool hv = h0 + row < H;
      const char* src =
          hv ? reinterpret_cast<const char*>(static_cast<const __nv_bfloat16*>(p.q) +
                                             t * p.q_stride_token +
                                             static_cast<int64_t>(h0 + row) * p.q_stride_head)
             : dummy;
#pragma unroll
      for (int s = 0; s < 8; ++s)
        cp_async16(sQ + my_chunk + j * kRow16 + s * kSlice, src + c8 * 16 + s * 128, hv ? 16 : 0);
    }
    mbar_arrive_cp_async(bar_q);

    for (int it = 0; it < n_iter; ++it) {
      const uint32_t free_parity = ((gi + it) & 1u) ^ 1u;
      int raw[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) raw[i] = raw_next[i];
      load_raw(tk, it + 1, raw_next);  // next iteration's indices (none past the last block)
      // Raw index -> key row, or -1: the row is not a valid key (zero-filled, masked).
#pragma unroll
      for (int buf = 0; buf < 2; ++buf) {
        const int b = 2 * it + buf;  // >= tk.nb: an all-invalid block (raw index -1)
        const int64_t n = b < tk.nb1 ? p.n_kv : p.n_extra_kv;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int idx = raw[4 * buf + j];
          raw[4 * buf + j] = idx >= 0 && static_cast<int64_t>(idx) < n ? idx : -1;
        }
      }
      // Half `s0 / 4` (slices s0 .. s0 + 3) of buffer `buf`, then its ready barrier. The row
      // addresses are formed here from the raw indices (fewer live registers than 8 pointers).
      auto fill = [&](int buf, int s0) {
        const uint32_t dst = sK + buf * kTile;
        const bool main_scope = 2 * it + buf < tk.nb1;
        const __nv_bfloat16* kv = main_scope ? kv1 : kv2;
        const int64_t row_stride = main_scope ? p.kv_stride : p.extra_kv_stride;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const bool valid = raw[4 * buf + j] >= 0;
          // An invalid row reads nothing (src-size 0) at dummy + < 1 KB: inside q's first row.
          const char* src = (valid ? reinterpret_cast<const char*>(
                                         kv + static_cast<int64_t>(raw[4 * buf + j]) * row_stride)
                                   : dummy) + c8 * 16;
#pragma unroll
          for (int s = s0; s < s0 + 4; ++s)
            cp_async16_prefetch(dst + my_chunk + j * kRow16 + s * kSlice, src + s * 128,
                                valid ? 16 : 0);
        }
        const uint32_t bar = bar_ready(buf, s0 / 4);
        mbar_arrive_cp_async(bar);  // fires when the copies have landed
        mbar_arrive(bar);           // releases the validity bytes written before
      };
      auto write_flags = [&](int buf) {
        if (c8 == 0) {
#pragma unroll
          for (int j = 0; j < 4; ++j) flags[buf * 64 + r0 + 16 * j] = raw[4 * buf + j] >= 0;
        }
      };
      mbar_wait(bar_free(0, 0), free_parity);  // WG0 done with B0 (its S, P0 V0[:, L], mask)
      write_flags(0);
      fill(0, 0);
      mbar_wait(bar_free(1, 1), free_parity);  // WG1 done with B1 (its S, P1 V1[:, R], mask)
      write_flags(1);
      fill(1, 4);
      mbar_wait(bar_free(0, 1), free_parity);  // WG1 done with P0 V0[:, R]
      fill(0, 4);
      mbar_wait(bar_free(1, 0), free_parity);  // WG0 done with P1 V1[:, L]
      fill(1, 0);
    }
    gi += n_iter;
  }
  cp_async_wait_all();
}

// ---------------------------------------------------------------------------------------------
// Consumer warpgroups. Thread layout of a 64-row accumulator (wgmma): warp w4 of the warpgroup
// holds rows 16 w4 + g and 16 w4 + g + 8 (g = lane / 4); element 4 j + e is column
// 8 j + 2 t + (e & 1) (t = lane % 4) of row (e < 2 ? first : second).
// ---------------------------------------------------------------------------------------------
template <bool kPersist>
__device__ __forceinline__ void consumer(const SparseAttnParams& p, uint32_t n_ht,
                                         uint32_t n_tiles, uint32_t stride, int wg, int tid,
                                         uint32_t sQ, uint32_t sK, uint32_t sP, float* sM,
                                         float* sL2, const uint8_t* flags, uint32_t bars) {
  const int H = static_cast<int>(p.num_heads);
  const int lane = tid & 31, w4 = (tid >> 5) & 3;
  const int g = lane >> 2, tg = lane & 3;
  const int row0 = 16 * w4 + g;  // this thread's rows: row0 (hf = 0) and row0 + 8 (hf = 1)
  const float sc2 = p.softmax_scale * kLog2e;
  auto bar_ready = [&](int b, int h) { return bars + 8u * (1 + 2 * b + h); };
  auto bar_free = [&](int b, int h) { return bars + 8u * (5 + 2 * b + h); };
  const uint32_t bar_q_free = bars + 8u * 9;

  float o[128];       // O[:, 256 wg .. 256 wg + 255]
  float s[32];        // S, then P (fp32) of this warpgroup's block
  uint32_t pa[16];    // P as bf16 A fragments: pa[4 ks + i] for keys 16 ks .. 16 ks + 15
  float l[2];         // row sums of this warpgroup's blocks (thread partial)
  float m_run[2];     // the max O and l are scaled to
  bool waits_ok = true;  // false: a wait gave up (see mbar_wait)

  // S (+)= Q K^T over head-dim half `half` of buffer `buf` (16 k16 steps); zero_first: S = ...
  auto qk_half = [&](int buf, int half, uint32_t parity, bool zero_first) {
    waits_ok &= mbar_wait(bar_ready(buf, half), parity);
    fence_proxy_async();
    wgmma_fence();
    const uint32_t kb = sK + buf * kTile;
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      const int kk = 16 * half + k;
      const uint32_t off = (kk >> 2) * kSlice + (kk & 3) * 32;
      wgmma_m64n64k16_ss(s, smem_desc(sQ + off, 16, 1024), smem_desc(kb + off, 16, 1024),
                         (zero_first && k == 0) ? 0 : 1);
    }
  };
  // Invalid keys -> -inf, valid ones scaled to the log2 domain; mx = row maxima (-inf if none).
  auto mask_scale_max = [&](int buf, float (&mx)[2]) {
    const uint8_t* f = flags + buf * 64;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t v = *reinterpret_cast<const uint16_t*>(f + 8 * j + 2 * tg);
      const bool ok0 = (v & 0xffu) != 0, ok1 = (v >> 8) != 0;
      s[4 * j + 0] = ok0 ? s[4 * j + 0] * sc2 : -INFINITY;
      s[4 * j + 1] = ok1 ? s[4 * j + 1] * sc2 : -INFINITY;
      s[4 * j + 2] = ok0 ? s[4 * j + 2] * sc2 : -INFINITY;
      s[4 * j + 3] = ok1 ? s[4 * j + 3] * sc2 : -INFINITY;
    }
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float m = -INFINITY;
#pragma unroll
      for (int j = 0; j < 8; ++j) m = fmaxf(m, fmaxf(s[4 * j + 2 * hf], s[4 * j + 2 * hf + 1]));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
      mx[hf] = m;
    }
  };
  // P = 2^(S - mu) in place; l = l * alpha + row sums of P; O *= alpha; pa = bf16(P).
  auto softmax = [&](const float (&mu)[2], const float (&alpha)[2]) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pv = exp2_approx(s[4 * j + 2 * hf + e] - mu[hf]);
          s[4 * j + 2 * hf + e] = pv;
          sum += pv;
        }
      }
      l[hf] = l[hf] * alpha[hf] + sum;
    }
    // alpha == 1 (the max did not move) for every row of the warp: nothing to rescale.
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        o[4 * j + 0] *= alpha[0];
        o[4 * j + 1] *= alpha[0];
        o[4 * j + 2] *= alpha[1];
        o[4 * j + 3] *= alpha[1];
      }
    }
#pragma unroll
    for (int q = 0; q < 16; ++q) pa[q] = pack_bf16x2(s[2 * q], s[2 * q + 1]);
  };
  // O += P V[:, 256 half ..] with P from registers (pa) / from sP[pbuf]; V = buffer `buf`.
  auto pv_rs = [&](int buf, int half) {
    const uint32_t vb = sK + buf * kTile + half * 4 * kSlice;
#pragma unroll
    for (int ks = 0; ks < 4; ++ks)
      wgmma_m64n256k16_rs_tb(o, pa[4 * ks], pa[4 * ks + 1], pa[4 * ks + 2], pa[4 * ks + 3],
                             smem_desc(vb + ks * 16 * 128, kSlice, 1024));
  };
  auto pv_ss = [&](int pbuf, int buf, int half) {
    const uint32_t vb = sK + buf * kTile + half * 4 * kSlice;
    const uint32_t pb = sP + pbuf * kSlice;
#pragma unroll
    for (int ks = 0; ks < 4; ++ks)
      wgmma_m64n256k16_ss_tb(o, smem_desc(pb + ks * 32, 16, 1024),
                             smem_desc(vb + ks * 16 * 128, kSlice, 1024));
  };

  uint32_t gi = 0;  // iterations of this CTA's earlier tiles (barrier phases run on across tiles)
  uint32_t k = 0;   // this CTA's earlier tiles
  for (uint32_t tile = blockIdx.x; tile < n_tiles; tile += stride, ++k) {
    const int64_t t = tile / n_ht;
    const int h0 = static_cast<int>(tile % n_ht) * kBlockM;
    const int n_iter = (token_keys(p, t).nb + 1) >> 1;  // as the producer counts them
    // Row sums: alternate buffers per tile (the other warpgroup may still read the last one).
    float* sL = sL2 + 128 * (k & 1u);
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;  // no wgmma in flight: all waited last tile
    l[0] = l[1] = 0.f;
    m_run[0] = m_run[1] = -INFINITY;
    waits_ok &= mbar_wait(bars, k & 1u);  // this tile's Q landed
    if (n_iter == 0) mbar_arrive(bar_q_free);  // Q not read: free for the next tile at once
    if (wg == 0) {
      if (n_iter > 0) {  // S of block 0; later blocks' S are issued at the end of each iteration
        qk_half(0, 0, gi & 1u, true);
        qk_half(0, 1, gi & 1u, false);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(s);
      }
      for (int it = 0; it < n_iter; ++it) {
        const uint32_t ph = (gi + it) & 1u;
        // The tile's last S is in registers: WG0 reads Q no more (the producer may replace it).
        if (it == n_iter - 1) mbar_arrive(bar_q_free);
        float mx[2], m0[2], mu[2], alpha[2], c[2];
        mask_scale_max(0, mx);
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          m0[hf] = fmaxf(m_run[hf], mx[hf]);
          mu[hf] = finite_or_zero(m0[hf]);
          alpha[hf] = exp2_approx(m_run[hf] - mu[hf]);
        }
        if (tg == 0) {
          sM[row0] = m0[0];
          sM[row0 + 8] = m0[1];
        }
        named_arrive(kBarM0, 256);  // -> WG1: M0
        softmax(mu, alpha);
        wgmma_fence();
        pv_rs(0, 0);  // O0 += P0 V0[:, L]
        wgmma_commit();
        // Free B0's left half as soon as its last reader is done, before waiting on WG1: its
        // refill is the first the producer issues for the next iteration. (P0 reaches WG1 at
        // most this GEMM's duration later, while the tensor cores run WG1's own RS GEMM.)
        wgmma_wait<0>();  // P0 V0[:, L] done
        fence_regs(o);
        fence_regs_u32(pa);
        mbar_arrive(bar_free(0, 0));
        named_barrier(kBarM1, 256);  // <- WG1: M1
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const float m1 = sM[64 + row0 + 8 * hf];
          c[hf] = exp2_approx(m0[hf] - finite_or_zero(m1));
          m_run[hf] = m1;
        }
        // P0 rescaled to M1 -> sP[0] for WG1 (bank-conflict free: chunk j ^ g per row).
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf)
            st_shared_u32(sP + swz<8>(row0 + 8 * hf, j) + 4 * tg,
                          pack_bf16x2(s[4 * j + 2 * hf] * c[hf], s[4 * j + 2 * hf + 1] * c[hf]));
        fence_proxy_async();
        named_arrive(kBarP0, 256);  // -> WG1: sP[0]
        if (__any_sync(0xffffffffu, c[0] != 1.f || c[1] != 1.f)) {
#pragma unroll
          for (int j = 0; j < 32; ++j) {
            o[4 * j + 0] *= c[0];
            o[4 * j + 1] *= c[0];
            o[4 * j + 2] *= c[1];
            o[4 * j + 3] *= c[1];
          }
        }
        l[0] *= c[0];
        l[1] *= c[1];
        named_barrier(kBarP1, 256);  // <- WG1: sP[1]
        wgmma_fence();
        pv_ss(1, 1, 0);  // O0 += P1 V1[:, L]
        wgmma_commit();
        if (it + 1 < n_iter) {  // next block's S behind the P V GEMM
          qk_half(0, 0, ph ^ 1u, true);
          wgmma_commit();
          wgmma_wait<1>();  // P1 V1[:, L] done
          fence_regs(o);
          mbar_arrive(bar_free(1, 0));
          qk_half(0, 1, ph ^ 1u, false);
          wgmma_commit();
          wgmma_wait<0>();
          fence_regs(s);
        } else {
          wgmma_wait<0>();
          fence_regs(o);
          mbar_arrive(bar_free(1, 0));
        }
      }
    } else {
      for (int it = 0; it < n_iter; ++it) {
        const uint32_t ph = (gi + it) & 1u;
        qk_half(1, 1, ph, true);  // the producer fills B1's right half first
        qk_half(1, 0, ph, false);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(s);
        if (it == n_iter - 1) mbar_arrive(bar_q_free);  // WG1's last read of this tile's Q done
        float mx[2], m1[2], mu[2], alpha[2];
        mask_scale_max(1, mx);
        named_barrier(kBarM0, 256);  // <- WG0: M0
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) m1[hf] = fmaxf(sM[row0 + 8 * hf], mx[hf]);
        if (tg == 0) {
          sM[64 + row0] = m1[0];
          sM[64 + row0 + 8] = m1[1];
        }
        named_arrive(kBarM1, 256);  // -> WG0: M1
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          mu[hf] = finite_or_zero(m1[hf]);
          alpha[hf] = exp2_approx(m_run[hf] - mu[hf]);
          m_run[hf] = m1[hf];
        }
        softmax(mu, alpha);
        // P1 -> sP[1] for WG0 (the same bf16 values as the A fragments), before the RS GEMM
        // that reads them (PTX leaves reading an in-flight A fragment undefined).
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf)
            st_shared_u32(sP + kSlice + swz<8>(row0 + 8 * hf, j) + 4 * tg, pa[2 * j + hf]);
        fence_proxy_async();
        named_arrive(kBarP1, 256);  // -> WG0: sP[1]
        wgmma_fence();
        pv_rs(1, 1);  // O1 += P1 V1[:, R]
        wgmma_commit();
        named_barrier(kBarP0, 256);  // <- WG0: sP[0]
        wgmma_fence();
        pv_ss(0, 0, 1);  // O1 += P0 V0[:, R]
        wgmma_commit();
        wgmma_wait<1>();  // P1 V1[:, R] done
        fence_regs_u32(pa);
        mbar_arrive(bar_free(1, 1));
        wgmma_wait<0>();  // P0 V0[:, R] done
        fence_regs(o);
        mbar_arrive(bar_free(0, 1));
      }
    }

    // ---- epilogue: l of both warpgroups, out = O / (l + 2^(sink - M)), lse without the sink ----
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      l[hf] += __shfl_xor_sync(0xffffffffu, l[hf], 1);
      l[hf] += __shfl_xor_sync(0xffffffffu, l[hf], 2);
    }
    if (tg == 0) {
      sL[wg * 64 + row0] = l[0];
      sL[wg * 64 + row0 + 8] = l[1];
    }
    named_barrier(kBarL, 256);  // both row sums written; every GEMM of both warpgroups is done
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int row = row0 + 8 * hf;
      const int h = h0 + row;
      const float lt = sL[row] + sL[64 + row];
      // A valid key contributes 2^0 = 1 at the final max, so lt == 0 exactly when there is none;
      // a NaN score (NaN in q or a key) makes lt NaN and must reach out and lse as in sparse_attn.
      const bool any = lt != 0.f;
      const float mu = finite_or_zero(m_run[hf]);
      const float sink2 = h < H ? __ldg(p.attn_sink + h) * kLog2e : 0.f;
      float inv = any ? 1.f / (lt + exp2_approx(sink2 - mu)) : 0.f;
      float lse = any ? (mu + log2f(lt)) * kLn2 : INFINITY;
      if (!waits_ok) inv = lse = __int_as_float(0x7fffffff);  // a given-up wait: NaN, not a hang
      if (wg == 0 && tg == 0 && h < H)
        p.lse[t * p.lse_stride_token + static_cast<int64_t>(h) * p.lse_stride_head] = lse;
      if constexpr (kPersist) {
        // Straight from registers (4-byte stores; a quad writes 16 contiguous bytes of the row):
        // the Q tile is already being refilled with the next tile's Q.
        if (h < H) {
          char* dst = reinterpret_cast<char*>(static_cast<__nv_bfloat16*>(p.out) +
                                              t * p.out_stride_token +
                                              static_cast<int64_t>(h) * p.out_stride_head);
#pragma unroll
          for (int j = 0; j < 32; ++j) {
            const int col = 256 * wg + 8 * j + 2 * tg;
            st_global_cs_u32(dst + 2 * col,
                             pack_bf16x2(o[4 * j + 2 * hf] * inv, o[4 * j + 2 * hf + 1] * inv));
          }
        }
      } else {
        // Stage bf16 O into this warpgroup's half of the Q tile (Q is no longer read).
#pragma unroll
        for (int j = 0; j < 32; ++j) {
          const int col = 256 * wg + 8 * j + 2 * tg;
          st_shared_u32(sQ + swz128(row, col >> 3) + (col & 7) * 2,
                        pack_bf16x2(o[4 * j + 2 * hf] * inv, o[4 * j + 2 * hf + 1] * inv));
        }
      }
    }
    if constexpr (!kPersist) {
      named_barrier(kBarStage + wg, 128);
      // 16-byte coalesced stores: a warp writes 512 contiguous bytes (one row's half) per step.
      const int q = tid & 127;
      __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
#pragma unroll
      for (int r = 0; r < 16; ++r) {
        const int row = (q >> 5) + 4 * r;
        const int chunk = 32 * wg + (q & 31);
        if (h0 + row < H) {
          char* dst = reinterpret_cast<char*>(out + t * p.out_stride_token +
                                              static_cast<int64_t>(h0 + row) * p.out_stride_head);
          st_global_cs_v4(dst + chunk * 16, ld_shared_v4(sQ + swz128(row, chunk)));
        }
      }
    }
    gi += n_iter;
  }
}

// kPersist: a grid of at most one CTA per SM, each looping over tiles (token, head tile) with
// stride gridDim.x; otherwise one CTA per tile (the grid must then have exactly n_tiles CTAs).
template <bool kPersist>
__global__ void __launch_bounds__(kThreads, 1)
    sparse_attn_prefill_sm90_kernel(const SparseAttnParams p) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base - raw);
  const uint32_t bars = base + kBarOff;

  const int tid = threadIdx.x;
  const int wg = tid >> 7;
  const int H = static_cast<int>(p.num_heads);
  // Tiles (token, 64-head tile) in 32 bits: the host checks num_tokens * n_ht <= INT_MAX, so
  // tile + stride < 2^32 (stride = gridDim.x, or n_tiles: one tile per CTA).
  const uint32_t n_ht = static_cast<uint32_t>((H + kBlockM - 1) / kBlockM);
  const uint32_t n_tiles = static_cast<uint32_t>(p.num_tokens) * n_ht;
  const uint32_t stride = kPersist ? gridDim.x : n_tiles;

  if (tid == 0) {
    mbar_init(bars, 128);  // q: the producer's 128 cp.async arrivals
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      mbar_init(bars + 8u * (1 + i), 256);  // ready: 128 cp.async + 128 plain arrivals
      mbar_init(bars + 8u * (5 + i), 128);  // free: one consumer warpgroup
    }
    mbar_init(bars + 8u * 9, 256);  // q_free: both consumer warpgroups
    fence_mbarrier_init();
  }
  __syncthreads();

  if (wg == 2) {
    setmaxnreg_dec<kProducerRegs>();
    producer(p, n_ht, n_tiles, stride, tid - 256, base + kQOff, base + kKOff, smem + kFlagOff,
             bars);
  } else {
    setmaxnreg_inc<kConsumerRegs>();
    float* sM = reinterpret_cast<float*>(smem + kMOff);
    consumer<kPersist>(p, n_ht, n_tiles, stride, wg, tid, base + kQOff, base + kKOff,
                       base + kPOff, sM, sM + 128, smem + kFlagOff, bars);
  }
}
#else   // not sm_90a device code: never launched (sparse_attn_prefill_sm90_takes needs cc 9.0)
template <bool kPersist>
__global__ void __launch_bounds__(kThreads, 1)
    sparse_attn_prefill_sm90_kernel(const SparseAttnParams p) {
  __trap();
}
#endif  // DSV4_SPARSE_ATTN_WGMMA

}  // namespace sparse_prefill_detail

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
namespace {

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// A bf16 [rows, 512] operand: 16-byte aligned base, strides in multiples of 8 elements.
inline bool rows_ok(const void* ptr, int64_t stride_a, int64_t stride_b = 0) {
  return ptr != nullptr && aligned16(ptr) && stride_a % 8 == 0 && stride_b % 8 == 0;
}

bool prefill_params_ok(const SparseAttnParams& p) {
  constexpr int64_t kMaxTopk = INT_MAX - sparse_attn_detail::kBlockN;
  if (p.num_tokens < 0 || p.num_tokens > INT_MAX) return false;
  if (p.num_heads < 1 || p.num_heads > INT_MAX) return false;
  if (p.head_dim != sparse_prefill_detail::kD || p.num_splits != 1) return false;
  if (p.topk < 0 || p.topk > kMaxTopk || p.n_kv < 0) return false;
  if (!rows_ok(p.q, p.q_stride_token, p.q_stride_head)) return false;
  if (!rows_ok(p.out, p.out_stride_token, p.out_stride_head)) return false;
  if (p.lse == nullptr || p.attn_sink == nullptr) return false;
  if (p.topk > 0 && p.indices == nullptr) return false;
  // bf16 rows at kv + index * kv_stride only: an FP8 pool (kv_stride = block bytes) or the HCA
  // block-table mode would be read out of bounds.
  if (p.kv_format != CacheFormat::kPlain || p.extra_kv_format != CacheFormat::kPlain ||
      p.extra_block_table != nullptr)
    return false;
  if (p.n_kv > 0 && !rows_ok(p.kv, p.kv_stride)) return false;
  if (p.extra_indices != nullptr) {
    if (p.extra_topk < 0 || p.extra_topk > kMaxTopk || p.n_extra_kv < 0) return false;
    if (p.n_extra_kv > 0 && !rows_ok(p.extra_kv, p.extra_kv_stride)) return false;
  }
  return true;
}

bool current_device_is_sm90() {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
    return false;
  return major == 9 && minor == 0;
}

}  // namespace

// This kernel reads bf16 key rows addressed as kv + index * kv_stride: a SparseAttnParams field
// that changes that (an FP8 cache, a paged layout) must make this return false.
bool sparse_attn_prefill_sm90_takes(const SparseAttnParams& p) {
  return p.head_dim == sparse_prefill_detail::kD && p.num_splits == 1 &&
         p.kv_format == CacheFormat::kPlain && p.extra_kv_format == CacheFormat::kPlain &&
         p.extra_block_table == nullptr && current_device_is_sm90();
}

int sparse_attn_prefill_env() {
  const char* v = std::getenv("DSV4_SPARSE_PREFILL");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "new") == 0) return 1;
  if (std::strcmp(v, "old") == 0) return 0;
  return -1;
}

bool sparse_attn_prefill_persistent_env() {
  const char* v = std::getenv("DSV4_SPARSE_PREFILL_PERSISTENT");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

namespace {

cudaError_t run_prefill(const SparseAttnParams& p, cudaStream_t stream) {
  using namespace sparse_prefill_detail;
  if (p.num_tokens == 0 && p.num_heads >= 1 && p.head_dim == kD && p.num_splits == 1)
    return cudaSuccess;
  if (!prefill_params_ok(p)) return cudaErrorInvalidValue;
  const int64_t ctas = p.num_tokens * ((p.num_heads + kBlockM - 1) / kBlockM);
  if (ctas > INT_MAX) return cudaErrorInvalidValue;
  const bool persist = sparse_attn_prefill_persistent_env();
  int64_t grid = ctas;
  if (persist) {  // one CTA per SM (the kernel's shared memory allows no more), looping over tiles
    int dev = 0, sms = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (e != cudaSuccess) return e;
    grid = ctas < sms ? ctas : sms;
  }
  void (*kernel)(SparseAttnParams) =
      persist ? sparse_attn_prefill_sm90_kernel<true> : sparse_attn_prefill_sm90_kernel<false>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(grid), kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

// An error the caller left pending reaches the caller (own_error.cuh keep_pending: the launch
// sets the kernel's shared-memory size on every call).
cudaError_t sparse_attn_prefill_sm90(const SparseAttnParams& p, cudaStream_t stream) {
  const cudaError_t pending = cudaPeekAtLastError();
  return keep_pending(pending, run_prefill(p, stream));
}

}  // namespace dsv4
