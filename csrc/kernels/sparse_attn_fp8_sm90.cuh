// dsv4 sparse attention over FP8 (MODEL1) key caches: the warp-specialised Hopper kernel
// (torch-free). Contract: include/dsv4/sparse_attn.h; included by sparse_attn.cu only (the
// helpers it reuses live in sparse_attn.cuh).
//
// Why a second FP8 kernel: sparse_attn_fwd_wgmma_kernel<512, *, true> (the "old" FP8 path) has
// all 256 threads dequantise each 64-key block between its two GEMMs, with the hardware
// conversions e4m3x2 -> f16x2 -> f32 -> bf16x2 (conversion-pipe instructions, ~4x slower than
// plain ALU ones): about 2 us per block per CTA that nothing overlaps (measured: FP8 193.8 us
// against 124.1 us for the same kernel on bf16 keys, h128 b64, H200).
//
// One CTA = one query token x one tile of 64 heads (x one key split), 384 threads:
//   warpgroups 0, 1 (consumers, 200 registers each after setmaxnreg): exactly the math of the
//     old kernel (so the output is bit-equal to it and to the bf16 kernel on the dequantised
//     cache): S [64 heads x 32 keys] per warpgroup with wgmma m64n32k16 (A = Q, B = the bf16 K
//     tile, both from shared memory), masked online softmax in the log2 domain with the row
//     max / sum exchanged through shared memory, P (bf16) to shared memory, O [64 x 256 cols]
//     per warpgroup += P V with wgmma m64n256k16 (V = the same K tile read MN-major).
//   warpgroup 2 (producer, 104 registers): per 64-key block, waits until the consumers are
//     done with the stage (block b-2), reads each key's 448 e4m3 bytes and 8 UE8M0 scales with
//     ld.global.nc straight into registers, copies its 64 bf16 rope dims verbatim into the tile
//     with cp.async (no registers, no ALU work), dequantises the e4m3 bytes with integer and
//     bf16x2 multiply instructions (below) and writes the bf16 K tile (128-byte swizzle, the
//     layout wgmma reads) into one of TWO stages, so the producer prepares block b+1 while the
//     consumers run the GEMMs of block b. Loads are pipelined in register quarters (no load
//     latency exposed per block), rows prefetched to L2 (block b+2 at the end of block b),
//     indices fetched two blocks ahead.
// Producer warps 0-1 take bytes 0-223 of the nope part and rope bytes 0-63 of keys 0..63 (one
// key per thread), warps 2-3 nope bytes 224-447 and rope bytes 64-127 (warp-uniform halves).
//
// Synchronisation (hardware named barriers; ids 1-4 are the consumers' row exchange):
//   5          the 256 consumer threads (P complete; epilogue staging)
//   6 + stage  FULL:  producer bar.arrive (128) -> consumers bar.sync (256), count 384: the
//              stage's bf16 tile and validity bytes are written. Because every consumer
//              thread must arrive, it also keeps one warpgroup from starting block b+1 (and
//              rewriting P) while the other still runs the P V of block b.
//   8 + stage  EMPTY: consumers bar.arrive after the P V of block b (wgmma waited) ->
//              producer bar.sync before writing block b+2 into that stage; only issued when a
//              block b+2 exists, so no barrier is left half-arrived at exit.
// Writers of shared memory that wgmma reads (the producer's tile, the consumers' P and Q) run
// fence.proxy.async before the barrier that publishes it.
//
// Dequantisation, exact: for a byte v = (sign, 4-bit exponent e, 3-bit mantissa m) the bf16
// bit pattern sign<<15 | (v & 0x7f)<<4 is the number e4m3(v) * 2^-120 for every non-NaN v
// (normal: 2^(e-127)(1+m/8); e = 0: the bf16 subnormal 2^-126 * m/8 = 2^-120 * 2^-6 * m/8).
// A bf16x2 multiply by 2^120 (fma.rn.bf16x2 with addend -0) makes it e4m3(v) exactly (every
// e4m3 value is a bf16); a second one by the scale 2^(s-127) (ue8m0_bf16x2: bf16 bits s << 7,
// 2^-127 for s = 0, NaN for s = 255, as dsv4.ops.quant.e8m0_to_float reads the pool's bytes)
// rounds the exact product once to bf16. The reference rounds it twice (fp32 product, then
// bf16), but the exact product has at most 4 significant bits and is 0 or >= 2^-136 in size, so
// its fp32 rounding is exact and both give the same bf16, subnormal results included, for
// every scale byte. NaN scale (byte 255): every product is NaN, as in the reference. (This
// needs bf16 arithmetic that keeps subnormal inputs: the e4m3 subnormals are bf16 subnormals
// before the first multiply. PTX bf16 fma has no .ftz form.)
// NaN: the e4m3 NaN bytes 0x7f / 0xff get the bf16 pattern 0xffff (a NaN; its products are
// NaN), from a per-byte flag: bit 7 of (v & 0x7f) + 1, replicated over the value's 16-bit lane
// by prmt's sign mode and ORed into the lane.
// Cost per 4 values (SASS): 2 prmt + 2 shift + 4 lop3 + 4 HMUL2.BF16 (values), plus 1 lop3 +
// 1 iadd + 2 prmt (NaN flags; the OR folds into a lop3): 16 instructions. The fp32
// formulation this replaces (fp32 lanes, 8 FMUL, repacking) took 28, and the producer loop was
// the critical path (see bench/README.md, "FP8-cache decode: warp-specialised kernel").
#pragma once

#include "own_error.cuh"
#include "sparse_attn.cuh"

namespace dsv4 {
namespace sparse_attn_detail {
// Nested in sparse_attn_detail: the helpers of sparse_attn.cuh (PTX wrappers, the key-list
// walk, the consumer warpgroup's block step wg_*) are in scope as they are for the old kernel.
namespace fp8_ws {

constexpr int kD = 512;
constexpr int kThreads = 384;
constexpr int kConsumerRegs = 200;  // setmaxnreg targets: 2 * 200 + 104 = 3 * 168, the entry
constexpr int kProducerRegs = 104;  // cap of __launch_bounds__(384, 1) (65536 / 384, to 8)
static_assert(2 * kConsumerRegs + kProducerRegs <= 3 * 168, "register file of one CTA");

// Shared memory (offsets from a 1024-byte aligned base). Q and the two K stages are bf16
// [64 rows x 512] tiles as 8 slices of [64 rows x 128 B] (swz128, the SW128 wgmma layout).
constexpr int kTile = kBlockN * kD * 2;                    // 65536
constexpr int kQOff = 0;
constexpr int kKOff = kTile;                               // 2 stages
constexpr int kPOff = kKOff + 2 * kTile;                   // P [64 x 64] bf16 (swz<8>)
constexpr int kRedOff = kPOff + kBlockM * kBlockN * 2;     // red_max, red_sum [2][64] fp32
constexpr int kValidOff = kRedOff + 2 * 2 * kBlockM * 4;   // uint8 [2 stages][64 keys]
constexpr int kAnyOff = kValidOff + 2 * kBlockN;           // int: some key of the CTA is valid
constexpr int kSmemUsed = kAnyOff + 16;
constexpr int kSmem = kSmemUsed + 1024;  // slack to align the base to 1024 bytes
static_assert(kPOff % 1024 == 0, "P is a 128-byte-swizzled wgmma operand");
static_assert(kSmem <= 227 * 1024, "one CTA per SM");

constexpr int kBarConsumers = 5;
constexpr int kBarFull = 6;   // + stage
constexpr int kBarEmpty = 8;  // + stage

// Raw MODEL1 row split between the two producer halves.
constexpr int kNopeHalf = kModel1Nope / 2;  // 224 bytes = 14 x 16
constexpr int kNopeLoads = kNopeHalf / 16;  // 14
constexpr int kRopeHalf = kModel1Rope * 2 / 2;  // 64 bytes = 4 x 16
constexpr int kRopeLoads = kRopeHalf / 16;      // 4
constexpr int kNopeQ = kNopeLoads / 2;          // 7 loads: a quarter (112 bytes) of the nope part
static_assert(kNopeHalf % 16 == 0 && kRopeHalf % 16 == 0, "16-byte loads");
static_assert(kNopeLoads == 2 * kNopeQ, "each producer half is loaded in two quarters");

__device__ __forceinline__ void bar_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
#if DSV4_SPARSE_ATTN_WGMMA
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
#if DSV4_SPARSE_ATTN_WGMMA
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
// Read-only global loads. Each raw row is read once per CTA, but one thread reads its nope
// bytes as consecutive 16-byte loads, two per 32-byte sector: L1::evict_first lets the second
// half find the sector in L1 (no_allocate fetched every sector from L2 twice) while keeping
// these lines first in line for eviction.
__device__ __forceinline__ uint4 ld_nc_v4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::evict_first.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 ld_nc_v2(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];\n"
               : "=r"(v.x), "=r"(v.y)
               : "l"(p));
  return v;
}
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}
__device__ __forceinline__ void st_shared_v4(uint32_t addr, uint32_t a, uint32_t b, uint32_t c,
                                             uint32_t d) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(a), "r"(b), "r"(c),
               "r"(d)
               : "memory");
}

// prmt in its sign mode: byte i of the result is 0xff if the top bit of byte sel_i of `a` is
// set, else 0 (each selector nibble 8..11 = "sign of byte 0..3"; __byte_perm drops that bit).
template <uint32_t kSel>
__device__ __forceinline__ uint32_t prmt_sign(uint32_t a) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %1, %2;" : "=r"(r) : "r"(a), "n"(kSel));
  return r;
}

// d = a * b per bf16 lane, rounded once (fma.rn.bf16x2 with addend -0, which changes no
// product, +0 included). bf16 arithmetic keeps subnormal inputs and results (it has no .ftz).
__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
  return d;
}

// Four e4m3 bytes (byte i of w = dim i) times the UE8M0 scale s2 (the scale's bf16 bits,
// byte << 7, in both lanes): two bf16x2 words (dims 0-1, 2-3). Exact, NaN bytes -> NaN: see the
// header comment. 16 instructions per 4 values (the fp32 formulation took 28).
__device__ __forceinline__ uint2 dequant4(uint32_t w, uint32_t s2) {
  constexpr uint32_t k120 = 0x7B807B80u;  // 2^120 in both bf16 lanes
  // Bit 7 of byte i: byte i of w is 0x7f or 0xff (its low 7 bits + 1 carry into bit 7, never
  // into the next byte). Each flag over its value's 16-bit lane: 0xffff (a bf16 NaN) or 0.
  const uint32_t n = (w & 0x7F7F7F7Fu) + 0x01010101u;
  const uint32_t nan01 = prmt_sign<0x9988>(n);
  const uint32_t nan23 = prmt_sign<0xBBAA>(n);
  // Each byte in the high byte of a 16-bit lane: [0, b0, 0, b1] and [0, b2, 0, b3].
  const uint32_t u01 = __byte_perm(w, 0u, 0x1404);
  const uint32_t u23 = __byte_perm(w, 0u, 0x3424);
  // bf16 bits of e4m3 * 2^-120: sign to bit 15, exponent and mantissa to bits 4..10.
  const uint32_t h01 = (u01 & 0x80008000u) | ((u01 >> 4) & 0x07F007F0u) | nan01;
  const uint32_t h23 = (u23 & 0x80008000u) | ((u23 >> 4) & 0x07F007F0u) | nan23;
  // x 2^120 (exact: every e4m3 value is a bf16), then x the scale (one rounding of the exact
  // product, the reference's fp32 product rounded to bf16).
  return make_uint2(bf16x2_mul(bf16x2_mul(h01, k120), s2), bf16x2_mul(bf16x2_mul(h23, k120), s2));
}

// Where key `idx` of block `b` lives in its FP8 pool (row idx = entry idx % block_size of block
// idx / block_size); valid = idx in [0, rows of the scope).
struct Fp8Row {
  const char* src;   // the 576 value bytes (448 e4m3, 64 bf16)
  const char* ssrc;  // the 8 scale bytes
  bool valid;
};
__device__ __forceinline__ Fp8Row fp8_row(const SparseAttnParams& p, const TokenKeys& tk, int b,
                                          int idx) {
  const bool main_scope = b < tk.nb1;
  const int64_t n = main_scope ? p.n_kv : p.n_extra_kv;
  Fp8Row row{nullptr, nullptr, idx >= 0 && static_cast<int64_t>(idx) < n};
  if (row.valid) {
    // n <= INT_MAX and block_size divides n (host checks): 32-bit unsigned arithmetic is exact.
    const uint32_t bsz =
        static_cast<uint32_t>(main_scope ? p.kv_block_size : p.extra_block_size);
    const uint32_t blk = static_cast<uint32_t>(idx) / bsz;
    const uint32_t e = static_cast<uint32_t>(idx) - blk * bsz;
    const char* base = static_cast<const char*>(main_scope ? p.kv : p.extra_kv) +
                       static_cast<int64_t>(blk) * (main_scope ? p.kv_stride : p.extra_kv_stride);
    row.src = base + static_cast<int64_t>(e) * kModel1TokenBytes;
    row.ssrc = base + static_cast<int64_t>(bsz) * kModel1TokenBytes +
               static_cast<int64_t>(e) * kModel1ScaleBytes;
  }
  return row;
}

// Nope quarter Q (0, 1) of producer half HH (0, 1): the 112 e4m3 bytes at 224 * HH + 112 * Q
// of key `r`, in registers, dequantised into the bf16 tile at sK (16-dim runs never cross a
// 64-dim scale group: every run starts at a multiple of 16). scl: the key's 8 scale bytes.
template <int HH, int Q>
__device__ __forceinline__ void store_quarter(uint32_t sK, int r, const uint4 (&v)[kNopeQ],
                                              uint64_t scl) {
  constexpr int dq = HH * kNopeHalf + Q * (kNopeQ * 16);  // first dim of the quarter
#pragma unroll
  for (int i = 0; i < kNopeQ; ++i) {
    const int d0 = dq + 16 * i;  // compile-time after unrolling
    const uint32_t sb = static_cast<uint32_t>(scl >> (8 * (d0 >> 6))) & 0xffu;
    const uint32_t s2 = ue8m0_bf16x2(sb);  // bf16 bits of 2^(sb - 127), both lanes
    const uint2 a = dequant4(v[i].x, s2), b = dequant4(v[i].y, s2);
    const uint2 c = dequant4(v[i].z, s2), d = dequant4(v[i].w, s2);
    const int chunk = d0 >> 3;  // 16-byte bf16 chunk (8 dims)
    st_shared_v4(sK + swz128(r, chunk), a.x, a.y, b.x, b.y);
    st_shared_v4(sK + swz128(r, chunk + 1), c.x, c.y, d.x, d.y);
  }
}

// The raw bytes of nope quarter Q of half HH of key `row` into registers (zeros for an invalid
// key: its tile row is 0, masked in S and a finite V row for P = 0).
template <int HH, int Q>
__device__ __forceinline__ void load_quarter(const Fp8Row& row, uint4 (&v)[kNopeQ]) {
  if (row.valid) {
    const char* s0 = row.src + HH * kNopeHalf + Q * (kNopeQ * 16);
#pragma unroll
    for (int i = 0; i < kNopeQ; ++i) v[i] = ld_nc_v4(s0 + 16 * i);
  } else {
#pragma unroll
    for (int i = 0; i < kNopeQ; ++i) v[i] = make_uint4(0u, 0u, 0u, 0u);
  }
}

// The 8 scale bytes of key `row` (byte g = the scale of dims 64g .. 64g+63); 0 if invalid.
__device__ __forceinline__ uint64_t load_scales(const Fp8Row& row) {
  if (!row.valid) return 0;
  const uint2 v = ld_nc_v2(row.ssrc);
  return static_cast<uint64_t>(v.x) | (static_cast<uint64_t>(v.y) << 32);
}

// The rope bytes of half HH (bf16 already: copied verbatim) straight into the tile with
// cp.async (zero-filled for an invalid key); no registers, no conversion. `dummy` is a valid
// global address for the zero-fill form (nothing is read from it).
template <int HH>
__device__ __forceinline__ void copy_rope_half(const Fp8Row& row, uint32_t sK, int r,
                                               const char* dummy) {
  const char* s1 = row.valid ? row.src + kModel1Nope + HH * kRopeHalf : dummy;
#pragma unroll
  for (int i = 0; i < kRopeLoads; ++i) {
    const int chunk = kModel1Nope / 8 + HH * kRopeLoads + i;  // 56 + ...
    cp_async16(sK + swz128(r, chunk), s1 + (row.valid ? 16 * i : 0), row.valid ? 16 : 0);
  }
  cp_async_commit();
}

// A producer thread's writes to stage st (its st.shared stores and its cp.async rope copies,
// waited for here) made visible to wgmma's async proxy, then its FULL arrival.
__device__ __forceinline__ void publish_stage(int st) {
  cp_async_wait_all();
  fence_proxy_async();
  bar_arrive(kBarFull + st, kThreads);
}

// L2 prefetch of a key's row (nothing for an invalid one): points 0,128,256 (HH = 0) |
// 384,512,575 (HH = 1) of its 576 value bytes touch every 128-byte line; plus the scales.
template <int HH>
__device__ __forceinline__ void prefetch_row_l2(const Fp8Row& row) {
  if (row.valid) {
    prefetch_l2(row.src + HH * 384);
    prefetch_l2(row.src + HH * 384 + 128);
    prefetch_l2(row.src + (HH ? kModel1TokenBytes - 1 : 256));
    if (HH) prefetch_l2(row.ssrc);
  }
}

// Producer loop of one half HH (warp-uniform: warps 0-1 HH = 0, warps 2-3 HH = 1; compile-time,
// so every shared-memory address is a register plus an immediate). Blocks [b_begin, b_end).
// Register pipeline (quarters of 7 x 16 bytes): while quarter 0 of block b is dequantised,
// quarter 1 of block b is in flight; while quarter 1 is dequantised, quarter 0 (and the scales)
// of block b+1 are. So no load latency is exposed once the loop runs, with the registers of
// two quarters (the previous design held a whole half and waited for it every block). Rows
// are prefetched to L2 at the end of iteration b for block b+2 (half a block before their first
// register load), indices fetched two blocks ahead.
template <int HH>
__device__ __forceinline__ void producer(const SparseAttnParams& p, const TokenKeys& tk,
                                         int b_begin, int b_end, int r, uint32_t sK0,
                                         uint8_t* s_valid, volatile int* s_any) {
  const char* dummy = static_cast<const char*>(p.q);
  int idx_nxt = b_begin + 1 < b_end ? fetch_index(tk, b_begin + 1, r) : -1;
  Fp8Row row = fp8_row(p, tk, b_begin, b_begin < b_end ? fetch_index(tk, b_begin, r) : -1);
  uint4 va[kNopeQ], vb[kNopeQ];
  load_quarter<HH, 0>(row, va);
  uint64_t scl = load_scales(row);
  prefetch_row_l2<HH>(fp8_row(p, tk, b_begin + 1, idx_nxt));
  for (int b = b_begin; b < b_end; ++b) {
    const int st = (b - b_begin) & 1;
    const uint32_t sK = sK0 + st * kTile;
    load_quarter<HH, 1>(row, vb);  // quarter 1 of block b
    const int idx_nn = b + 2 < b_end ? fetch_index(tk, b + 2, r) : -1;
    if (b - b_begin >= 2) bar_sync(kBarEmpty + st, kThreads);  // consumers done with b-2
    copy_rope_half<HH>(row, sK, r, dummy);  // lands while the nope half is dequantised
    store_quarter<HH, 0>(sK, r, va, scl);
    // Block b+1's row (invalid past b_end; prefetched to L2 at the end of the iteration
    // before): its quarter 0 and scales into the free va while quarter 1 of block b is
    // dequantised.
    const Fp8Row nrow = fp8_row(p, tk, b + 1, idx_nxt);
    load_quarter<HH, 0>(nrow, va);
    const uint64_t scl_nxt = load_scales(nrow);
    store_quarter<HH, 1>(sK, r, vb, scl);
    if (HH == 0) s_valid[st * kBlockN + r] = row.valid ? 1 : 0;
    if (row.valid) *s_any = 1;
    // Block b+2's row to L2 (its index, fetched at the top of this iteration, has arrived; half
    // a block before its quarter 0 is loaded in the middle of the next iteration).
    prefetch_row_l2<HH>(fp8_row(p, tk, b + 2, idx_nn));
    publish_stage(st);
    row = nrow;
    scl = scl_nxt;
    idx_nxt = idx_nn;
  }
}

// ---- Whole-sector variant (kPairs, DSV4_SPARSE_FP8=new2): the same work per producer half,
// mapped so that every 16-byte load instruction of a warp reads whole 32-byte sectors. Thread
// q (0..63) of half HH handles keys k0 = q / 2 and k1 = k0 + 32; lane parity e = q % 2 takes the
// 16-byte raw chunks e, e + 2, ..., e + 12 of the half's 14 (so lanes 2j and 2j+1 read the two
// halves of each sector of key j together), and rope chunks e and e + 2 of the half's 4.
// Quarter A = key k0's 7 chunks, quarter B = key k1's; the register pipeline is the same
// (quarter B of block b in flight while A is dequantised, A of block b+1 while B is).

// Shared-memory byte offset of bf16 chunk cb + 2e (+ 1 when kHi) of `key` in a SW128 tile, for
// a compile-time cb with cb % 8 in {0, 4}: no carry into the slice, so the slice is cb / 8 and
// the chunk-in-row bits are (cb % 8) ^ 2e (^ 1) ^ (key % 8) = (cb % 8) (^ 1) ^ xr, xr = 2e ^ key%8.
template <int CB, bool kHi>
__device__ __forceinline__ uint32_t pair_chunk_off(int key, uint32_t xr) {
  static_assert(CB % 8 == 0 || CB % 8 == 4, "2e must not carry into the slice bits");
  return static_cast<uint32_t>((CB >> 3) * (kBlockN * 128) + key * 128) +
         ((((CB & 7) | (kHi ? 1 : 0)) ^ xr) << 4);
}

template <int HH>
__device__ __forceinline__ void store_pair_quarter(uint32_t sK, int key, uint32_t xr,
                                                   const uint4 (&v)[kNopeQ], uint64_t scl) {
#pragma unroll
  for (int i = 0; i < kNopeQ; ++i) {
    // Raw chunk e + 2i: dims HH * 224 + 32 i + 16 e. (HH * 224 + 32 i) % 64 is 0 or 32, so
    // + 16 e stays in the same 64-dim scale group: the group is compile-time.
    constexpr int kD0 = HH * kNopeHalf;
    const int grp = (kD0 + 32 * i) >> 6;
    const uint32_t sb = static_cast<uint32_t>(scl >> (8 * grp)) & 0xffu;
    const uint32_t s2 = ue8m0_bf16x2(sb);
    const uint2 a = dequant4(v[i].x, s2), b = dequant4(v[i].y, s2);
    const uint2 c = dequant4(v[i].z, s2), d = dequant4(v[i].w, s2);
    // bf16 chunk (kD0 + 32 i + 16 e) / 8 = cb + 2e with cb = HH * 28 + 4 i (cb % 8 in {0, 4}).
    switch (i) {  // compile-time after unrolling
#define DSV4_PAIR_STORE(I)                                                              \
  case I:                                                                               \
    st_shared_v4(sK + pair_chunk_off<HH * 28 + 4 * I, false>(key, xr), a.x, a.y, b.x, b.y); \
    st_shared_v4(sK + pair_chunk_off<HH * 28 + 4 * I, true>(key, xr), c.x, c.y, d.x, d.y);  \
    break;
      DSV4_PAIR_STORE(0)
      DSV4_PAIR_STORE(1)
      DSV4_PAIR_STORE(2)
      DSV4_PAIR_STORE(3)
      DSV4_PAIR_STORE(4)
      DSV4_PAIR_STORE(5)
      DSV4_PAIR_STORE(6)
#undef DSV4_PAIR_STORE
    }
  }
}

template <int HH>
__device__ __forceinline__ void load_pair_quarter(const Fp8Row& row, int e, uint4 (&v)[kNopeQ]) {
  if (row.valid) {
    const char* s0 = row.src + HH * kNopeHalf + 16 * e;
#pragma unroll
    for (int i = 0; i < kNopeQ; ++i) v[i] = ld_nc_v4(s0 + 32 * i);
  } else {
#pragma unroll
    for (int i = 0; i < kNopeQ; ++i) v[i] = make_uint4(0u, 0u, 0u, 0u);
  }
}

// Rope chunks e and e + 2 of half HH of `key` into the tile (cp.async, zero-fill if invalid);
// the caller commits.
template <int HH>
__device__ __forceinline__ void copy_pair_rope(const Fp8Row& row, uint32_t sK, int key, int e,
                                               const char* dummy) {
  const char* s1 = row.valid ? row.src + kModel1Nope + HH * kRopeHalf : dummy;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int rc = e + 2 * k;                                // rope chunk of the half (0..3)
    const int chunk = kModel1Nope / 8 + HH * kRopeLoads + rc;  // 56 + ...
    cp_async16(sK + swz128(key, chunk), s1 + (row.valid ? 16 * rc : 0), row.valid ? 16 : 0);
  }
}

template <int HH>
__device__ __forceinline__ void producer_pairs(const SparseAttnParams& p, const TokenKeys& tk,
                                               int b_begin, int b_end, int q, uint32_t sK0,
                                               uint8_t* s_valid, volatile int* s_any) {
  const char* dummy = static_cast<const char*>(p.q);
  const int e = q & 1;
  const int k0 = q >> 1, k1 = k0 + 32;
  const uint32_t xr = static_cast<uint32_t>((2 * e) ^ (k0 & 7));  // k1 % 8 == k0 % 8
  const bool first = b_begin < b_end, second = b_begin + 1 < b_end;
  int ia_nxt = second ? fetch_index(tk, b_begin + 1, k0) : -1;
  int ib_cur = first ? fetch_index(tk, b_begin, k1) : -1;
  int ib_nxt = second ? fetch_index(tk, b_begin + 1, k1) : -1;
  Fp8Row ra = fp8_row(p, tk, b_begin, first ? fetch_index(tk, b_begin, k0) : -1);
  uint4 va[kNopeQ], vb[kNopeQ];
  load_pair_quarter<HH>(ra, e, va);
  uint64_t scla = load_scales(ra);
  prefetch_row_l2<HH>(fp8_row(p, tk, b_begin + 1, e ? ib_nxt : ia_nxt));
  for (int b = b_begin; b < b_end; ++b) {
    const int st = (b - b_begin) & 1;
    const uint32_t sK = sK0 + st * kTile;
    const Fp8Row rb = fp8_row(p, tk, b, ib_cur);
    load_pair_quarter<HH>(rb, e, vb);  // quarter B (key k1) of block b
    const uint64_t sclb = load_scales(rb);
    const int ia_nn = b + 2 < b_end ? fetch_index(tk, b + 2, k0) : -1;
    const int ib_nn = b + 2 < b_end ? fetch_index(tk, b + 2, k1) : -1;
    if (b - b_begin >= 2) bar_sync(kBarEmpty + st, kThreads);  // consumers done with b-2
    copy_pair_rope<HH>(ra, sK, k0, e, dummy);
    copy_pair_rope<HH>(rb, sK, k1, e, dummy);
    cp_async_commit();
    store_pair_quarter<HH>(sK, k0, xr, va, scla);
    const Fp8Row na = fp8_row(p, tk, b + 1, ia_nxt);  // quarter A (key k0) of block b+1
    load_pair_quarter<HH>(na, e, va);
    const uint64_t scla_nxt = load_scales(na);
    store_pair_quarter<HH>(sK, k1, xr, vb, sclb);
    if (HH == 0 && e == 0) {
      s_valid[st * kBlockN + k0] = ra.valid ? 1 : 0;
      s_valid[st * kBlockN + k1] = rb.valid ? 1 : 0;
    }
    if (ra.valid || rb.valid) *s_any = 1;
    // Block b+2's rows to L2: lane e prefetches key k_e's (its half's lines).
    prefetch_row_l2<HH>(fp8_row(p, tk, b + 2, e ? ib_nn : ia_nn));
    publish_stage(st);
    ra = na;
    scla = scla_nxt;
    ia_nxt = ia_nn;
    ib_cur = ib_nxt;
    ib_nxt = ib_nn;
  }
}

// kSplit: fp32 partials to the workspace for sparse_attn_combine_kernel (as the old kernel).
// kPairs: the whole-sector producer mapping (producer_pairs) instead of one key per thread.
template <bool kSplit, bool kPairs>
__global__ void __launch_bounds__(kThreads, 1) sparse_attn_fp8_ws_kernel(const SparseAttnParams p) {
#if !DSV4_SPARSE_ATTN_WGMMA
  __trap();
#else
  constexpr int NO = kD / 2;  // O columns per consumer warpgroup
  constexpr int TPR = 4, CPT = 16;  // Q / O rows: 4 consumer threads per row, 16 chunks each
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base - raw);
  const uint32_t sQ = base + kQOff;
  const uint32_t sK0 = base + kKOff;
  const uint32_t sP = base + kPOff;
  float* red_max = reinterpret_cast<float*>(smem + kRedOff);  // [2][64]
  float* red_sum = red_max + 2 * kBlockM;                      // [2][64]
  uint8_t* s_valid = smem + kValidOff;                         // [2][64]
  volatile int* s_any = reinterpret_cast<volatile int*>(smem + kAnyOff);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, w4 = warp & 3;
  const int g = lane >> 2, tg = lane & 3;

  const int H = static_cast<int>(p.num_heads);
  const CtaWork cw = cta_work<kSplit>(p);
  const int64_t t = cw.t;
  const int h0 = cw.h0, b_begin = cw.b_begin, b_end = cw.b_end;
  const TokenKeys& tk = cw.tk;

  if (tid == 0) *s_any = 0;
  __syncthreads();  // the only CTA-wide barrier: s_any is 0 before any producer write
  // Split grids (at most one wave: splits are only chosen when the grid fills < half the SMs)
  // let the combine grid launch now (programmatic dependent launch); its CTAs wait in
  // griddepcontrol.wait until this grid has completed. Every CTA of this grid is resident by
  // the time the last one signals, so the waiting combine CTAs cannot keep one from starting.
  if (kSplit) asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");

  if (wg == 2) {
    // ================================ producer ================================
    setmaxnreg_dec<kProducerRegs>();
    const int pt = tid - 256;           // 0..127
    const int r = pt & (kBlockN - 1);   // key of the block
    if constexpr (kPairs) {
      if (pt < kBlockN)
        producer_pairs<0>(p, tk, b_begin, b_end, r, sK0, s_valid, s_any);
      else
        producer_pairs<1>(p, tk, b_begin, b_end, r, sK0, s_valid, s_any);
    } else {
      if (pt < kBlockN)
        producer<0>(p, tk, b_begin, b_end, r, sK0, s_valid, s_any);
      else
        producer<1>(p, tk, b_begin, b_end, r, sK0, s_valid, s_any);
    }
    return;  // every arrival it owes was made inside the loop
  }

  // ================================ consumers ================================
  setmaxnreg_inc<kConsumerRegs>();
  const int lrow = tid / TPR, lc0 = tid % TPR;  // Q / O row mapping (tid < 256)
  const char* dummy = static_cast<const char*>(p.q);
  {
    const bool hv = h0 + lrow < H;
    const char* src =
        hv ? reinterpret_cast<const char*>(static_cast<const __nv_bfloat16*>(p.q) +
                                           t * p.q_stride_token +
                                           static_cast<int64_t>(h0 + lrow) * p.q_stride_head)
           : dummy;
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      const int c = lc0 + i * TPR;
      cp_async16(sQ + swz128(lrow, c), src + (hv ? c * 16 : 0), hv ? 16 : 0);
    }
    cp_async_commit();
    cp_async_wait_all();
    fence_proxy_async();
    bar_sync(kBarConsumers, 256);  // Q landed for both warpgroups
  }

  float o[NO / 2];
#pragma unroll
  for (int i = 0; i < NO / 2; ++i) o[i] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  const float sc2 = p.softmax_scale * kLog2e;
  for (int b = b_begin; b < b_end; ++b) {
    const int stage = (b - b_begin) & 1;
    bar_sync(kBarFull + stage, kThreads);  // block b's tile is in `stage`; both WGs done with b-1
    const uint32_t sK = sK0 + stage * kTile;

    // ---- S = Q K^T for keys 32*wg .. +32; masked online softmax; P to shared memory ----
    float s[16];
    wg_scores<kD>(s, sQ, sK, wg);
    float alpha[2];
    wg_softmax_to_p(s, s_valid + stage * kBlockN + wg * 32, sc2, m_run, alpha, red_max, red_sum,
                    sP, wg, w4, g, tg);
    fence_proxy_async();
    bar_sync(kBarConsumers, 256);  // P complete (64 rows x 64 keys) for both warpgroups
    wg_rescale(o, l_run, alpha, red_sum, w4, g);
    // ---- O[:, 256*wg .. +256] += P V ----
    wg_pv<kD>(o, sP, sK, wg);
    if (b + 2 < b_end) bar_arrive(kBarEmpty + stage, kThreads);  // the producer may refill it
  }

  // Every consumer is past its last wgmma on sQ (S of the last block precedes its P barrier);
  // this barrier also orders the epilogue's sQ staging after the other warpgroup's reads.
  bar_sync(kBarConsumers, 256);
  const bool any = *s_any != 0;  // final: the producer wrote it before its last FULL arrive

  if constexpr (!kSplit) {
    wg_stage_output<kD>(p, o, m_run, l_run, any, sQ, t, h0, wg, w4, g, tg);
    bar_sync(kBarConsumers, 256);
    store_staged_rows<TPR, CPT>(p, sQ, t, h0, lrow, lc0);
  } else {
    wg_write_partials<kD>(p, o, m_run, l_run, any, t, cw.split, h0, cw.ht, wg, w4, g, tg, tid);
  }
#endif  // DSV4_SPARSE_ATTN_WGMMA
}

// Launch (sparse_attn() validated p; FP8 MODEL1 pools, head_dim 512, sm_90a).
// kPairs: the whole-sector producer mapping (DSV4_SPARSE_FP8=new2).
template <bool kPairs>
inline cudaError_t launch_fp8_ws(const SparseAttnParams& p, cudaStream_t stream) {
  const int64_t n_ht = (p.num_heads + kBlockM - 1) / kBlockM;
  const int64_t ctas = p.num_tokens * n_ht * p.num_splits;
  const bool split = p.num_splits > 1;
  if (ctas > INT_MAX || (split && p.num_tokens * p.num_heads > INT_MAX)) return cudaErrorInvalidValue;
  const void* fn = split ? reinterpret_cast<const void*>(&sparse_attn_fp8_ws_kernel<true, kPairs>)
                         : reinterpret_cast<const void*>(&sparse_attn_fp8_ws_kernel<false, kPairs>);
  cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err != cudaSuccess) return err;
  if (split) {
    sparse_attn_fp8_ws_kernel<true, kPairs>
        <<<static_cast<unsigned>(ctas), kThreads, kSmem, stream>>>(p);
  } else {
    sparse_attn_fp8_ws_kernel<false, kPairs>
        <<<static_cast<unsigned>(ctas), kThreads, kSmem, stream>>>(p);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess || !split) return err;
  // The merge, as a programmatic dependent launch (its launch overlaps this grid's tail; the
  // kernel starts with griddepcontrol.wait). A plain launch if the runtime refuses it, and
  // without trying while an error is pending (own_error.cuh: a refusal would overwrite it and
  // clearing the refusal would hide it; none is, after the cudaGetLastError() above).
  if (!error_pending()) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(p.num_tokens * p.num_heads));
    cfg.blockDim = dim3(combine_threads(p.num_splits));
    cfg.dynamicSmemBytes = 0;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    // DSV4_TEST_REFUSE=launch (test only, own_error.cuh): refused as by the runtime
    err = test_refusal() == TestRefusal::kLaunch
              ? refused_for_test()
              : cudaLaunchKernelEx(&cfg, sparse_attn_combine_kernel<kD>, p);
    if (err != cudaErrorNotSupported && err != cudaErrorInvalidValue) return err;
    clear_own_error(err);  // this launch's own refusal (nothing was pending before it)
  }
  sparse_attn_combine_kernel<kD>
      <<<static_cast<unsigned>(p.num_tokens * p.num_heads), combine_threads(p.num_splits), 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace fp8_ws
}  // namespace sparse_attn_detail
}  // namespace dsv4
