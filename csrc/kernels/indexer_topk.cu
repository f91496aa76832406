// dsv4 Lightning Indexer scoring + causal top-k (torch-free; contract in
// include/dsv4/indexer_topk.h, semantics in python/dsv4/ops/indexer.py).
//
// One CTA = 8 warps = a "work item": a group of QPC queries (QPC = 8 for prefill-like calls,
// where consecutive queries share a key row, 1 for decode) and one split of the key range.
//
//   scoring    keys stream through shared memory in tiles of 256 keys (decode) or 128 keys
//              (prefill) (cp.async, `stages`-deep pipeline, 16-byte chunks XOR-swizzled so
//              that ldmatrix is conflict-free). Each query's q block [64 heads, D] lives in
//              registers as the B operand of mma.sync.m16n8k16 (row.col, bf16 -> fp32); keys
//              are the A operand (16 keys per m-tile), so one accumulator row = one key, its
//              64 head scores spread over the 4
//              lanes of a quad: ReLU, * weight and the head sum stay in registers (2 quad
//              shuffles). With QPC = 8 each warp owns a query and scores all 8 m-tiles of a
//              tile; with QPC = 1 the 8 warps split the tile (2 m-tiles each). heads > 64:
//              several head blocks, q reloaded from L1/L2 per m-tile.
//              Decode plans (head_dim 128, <= 128 heads, sm_90a; DSV4_INDEXER_WGMMA=0: off):
//              the same scan on wgmma instead, q in shared memory, 64 keys per MMA chain per
//              warpgroup; FP8 keys go from shared memory through registers into wgmma's A
//              operand, with no bf16 tile (section "wgmma scan" below).
//   selection  each query has a candidate buffer of `cap` 64-bit ranks in shared memory,
//              rank = ordered(score) << 32 | ~index (NaN is never inserted, -0.0 -> +0.0), so
//              "higher rank" = higher score, then lower index: a total order. A candidate is
//              appended (warp ballot + one shared atomic per warp) iff rank >= thr. When the
//              buffer could overflow on the next tile, an exact radix select (8-bit digits
//              below the highest bit where min and max differ; one atomic per warp when a
//              whole warp hits one bin) finds the k-th largest rank's prefix, compacts the
//              buffer in place to exactly k entries and raises thr to that prefix (<= the
//              k-th rank, so nothing that can still win is ever dropped). At the end:
//              select to k, bitonic sort, write indices with -1 padding.
//   splits     (decode) each CTA writes its <= k candidates to the workspace; the last CTA of
//              a node (atomic arrival counter) merges its children with the same buffer and
//              select (all children's candidates loaded as one flat array): leaves ->
//              [level 1, fan-in ~sqrt(splits), when splits > 16] -> root -> output.
//   histogram  (decode with > 16 splits by default: batch <= 7 on 132 SMs; "merge modes" in the
//   select     header) instead of candidate buffers, the scan writes each entry's 32-bit score
//              key (4 B per entry: 1 MB at 1M context) and counts it in a 4096-bin histogram of
//              the key's top 12 bits; a second launch over the same CTAs finds the bin b* of
//              the topk-th key, gathers the keys above b* (< topk) and in b* (usually a few
//              hundred), and the query's last CTA sorts them in registers (select + sort as
//              above when there are more than 2,048). A 64-bin coarse histogram beside the
//              4,096 bins lets each select CTA find b* from 2 x 64 counts.
//              Serial work after the scan: one launch, a pass over 8 KB of keys per CTA, one
//              sort of ~topk + |b*| candidates, instead of three selects over 2K-6K
//              candidates each in the tree.
//
// Measured on H200 (csrc/tests/check_indexer_topk.cu --bench): the decode scan is bound by the
// CTA's mma.sync/latency chain (~2.8 TB/s of key bytes scan-only at batch 128, 1M context),
// not by HBM; the split merge costs ~70 us at batch 1 (select passes are barrier-heavy).
//
// No fast-math. Scores use fp32 FMA accumulation (bf16 products are exact in fp32), so they
// differ from the fp32 PyTorch reference only by summation order.
#include "dsv4/indexer_topk.h"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cluster_ptx.cuh"
#include "grouped_gemm_wgmma.cuh"
#include "own_error.cuh"
#include "zero_fill.cuh"

namespace dsv4 {
namespace {

using u64 = unsigned long long;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kHeadBlock = 64;   // heads per MMA pass (8 n-tiles of 8)
constexpr int kMergePairs = 4;   // 16-byte loads (2 candidates) per thread per merge round
constexpr int kUnroll = 4;       // elements per thread in flight in the select loops
constexpr int kMaxChildren = 32; // merge fan-in bound (splits <= 1024, fan-in ~sqrt)
constexpr unsigned kFull = 0xffffffffu;
// Histogram select (batch-1-like decode; see the header comment): bins of the top 12 bits of
// the 32-bit score key, the boundary-bin candidates gathered before falling back to a scan of
// all keys, and the keys each thread has in flight in the select kernel's loops.
constexpr int kHistBins = 4096;
constexpr int kHistShift = 20;
// Coarse histogram beside it: 64 bins of 64 fine bins each (the top 6 bits of the score key),
// so that finding the boundary bin reads 2 x 64 counts instead of all 4,096.
constexpr int kCoarseBins = 64;
constexpr int kFinePerCoarse = kHistBins / kCoarseBins;
constexpr int kBoundaryCap = 8192;
constexpr int kSelUnroll = 8;
// Smallest key range of a decode split (QPC 1): 8 warps x one 16-key m-tile.
constexpr int kDecodeMinChunk = kWarps * 16;
// Short-row decode path (indexer_short_kernel, "short path" below): keys per pipeline stage (one
// 16-key m-tile per warp), pipeline depth, the largest cluster (CTAs per query; 16 needs the
// non-portable cluster size), the most keys one CTA of a cluster scores (sizes its score-key
// array and candidate lists), the most heads (q of two head blocks in shared memory), the most
// queries per launch, and the radix rounds of the select (8-bit digits of a 32-bit score key).
// The query limit is a latency heuristic: the path exists for batch 1-8 latency, where all T
// clusters run at once (one wave); no cluster ever waits for another (the only barriers are
// within a cluster), so clusters that do not fit at once just run in a later wave, and
// correctness never depends on co-residency.
constexpr int kShortTile = 128;
constexpr int kShortStages = 4;
constexpr int kShortMaxCluster = 16;
constexpr int kShortMaxKeys = 1024;
constexpr int kShortMaxHeads = 2 * 64;
constexpr int kShortMaxT = 16;
constexpr int kShortRounds = 4;

// Split merge: 0 auto (histogram select when a query's keys are split over more than 16 CTAs,
// else the candidate-list tree), 1 tree always, 2 histogram select whenever there are splits
// (decode plans only), 3 "legacy": auto with the previous decode split size (make_plan) and
// the previous decode selection tail (Params::fast_tail), 4 "coop": the plans of mode 2, with
// the scan grid launched cooperatively where it can be co-resident and the selection finished
// inside it (coop_select; else, or when the launch is refused, mode 2's two launches).
// g_merge < 0: from DSV4_INDEXER_TOPK_MERGE (indexer_topk_set_merge).
constexpr int kMergeAuto = 0, kMergeTree = 1, kMergeHist = 2, kMergeLegacy = 3, kMergeCoop = 4;
int g_merge = -1;
int merge_mode() {
  if (g_merge >= 0) return g_merge;
  const char* e = std::getenv("DSV4_INDEXER_TOPK_MERGE");
  if (e == nullptr) return kMergeAuto;
  if (std::strcmp(e, "tree") == 0) return kMergeTree;
  if (std::strcmp(e, "hist") == 0) return kMergeHist;
  if (std::strcmp(e, "legacy") == 0) return kMergeLegacy;
  if (std::strcmp(e, "coop") == 0) return kMergeCoop;
  return kMergeAuto;
}

// Decode scan on wgmma (kWg instances of indexer_topk_kernel): on by default, read at each
// call; DSV4_INDEXER_WGMMA=0: the mma.sync scan. Taken only where the plan allows it (make_plan:
// sm_90, one query per CTA, head_dim 128, the 256-key decode tile, <= 128 heads). In the 1M
// decode step on an H100 it took 20-80 us off a step at batch 1-4 (bench/README.md, thirteenth
// session).
bool wgmma_requested() {
  const char* e = std::getenv("DSV4_INDEXER_WGMMA");
  return e == nullptr || std::strcmp(e, "0") != 0;
}

// Programmatic dependent launch of the histogram select kernel (see launch_kernel): on unless
// DSV4_INDEXER_TOPK_PDL=0 or the merge mode is "legacy" (the previous code path).
bool pdl_enabled() {
  if (merge_mode() == kMergeLegacy) return false;
  const char* e = std::getenv("DSV4_INDEXER_TOPK_PDL");
  return e == nullptr || std::strcmp(e, "0") != 0;
}

// The select kernel's final sort: sort_merge_write unless DSV4_INDEXER_SORT=bitonic (the
// previous sort_small_desc), read at each call.
bool merge_sort_enabled() {
  const char* e = std::getenv("DSV4_INDEXER_SORT");
  return e == nullptr || std::strcmp(e, "bitonic") != 0;
}

// Keys per pipeline stage: decode (QPC 1) 256 by default, so that each warp scores 2 m-tiles
// between barriers; prefill (QPC 8) 128 (each warp already scores 8 m-tiles per stage).
// g_decode_tile / g_stages: tuning overrides (indexer_topk_set_tuning), 0 = default.
int g_decode_tile = 0;
int g_stages = 0;
int tile_keys(int qpc, int64_t head_dim) {
  if (qpc != 1) return 128;
  return (g_decode_tile == 128 && head_dim == 128) ? 128 : 256;
}

// Per-query selection state in shared memory.
struct alignas(16) QState {
  u64 thr;                        // append a candidate iff rank >= thr
  u64 red[2][kWarps];             // min / max partials (select)
  int count;                      // candidates in the buffer
  int sel_digit, sel_gt, sel_in;
  int wcnt[2][kUnroll][kWarps];   // per-warp kept counts (compaction), double-buffered
  int ccnt[kMaxChildren];         // candidate counts of the children being merged
};

struct Params {
  const __nv_bfloat16* q;
  int64_t q_st, q_sh;
  const float* w;
  int64_t w_st;
  const __nv_bfloat16* keys;  // bf16 keys (elements), or the FP8 key bytes (kFp8)
  int64_t k_sb, k_sc;         // block (dense: row) / entry strides; FP8: k_sb in bytes
  // Paged keys (contracts.md A.2): key s of row b at block bt[b * bt_st + s / bs], entry
  // s % bs (a block id outside [0, n_blocks) hides the key). Dense: block b, entry s.
  const int32_t* bt;
  int64_t bt_st;
  int bt_cols, bs, n_blocks;
  int fp8_rows;               // FP8 keys: entries per block (the scales follow them)
  const int32_t* rows;
  const int32_t* n_valid;
  int32_t* out;
  int64_t out_st;
  float* scan_sum;
  u64* ws_rank0;        // [T_pad][n_splits][slot_stride]
  int32_t* ws_count0;   // [T_pad][n_splits]
  u64* ws_rank1;        // [T_pad][n_l1][slot_stride]
  int32_t* ws_count1;   // [T_pad][n_l1]
  int32_t* arrive1;     // [n_groups][n_l1]
  int32_t* arrive_root; // [n_groups]
  // Histogram select (decode, QPC 1: query t = group t). Zeroed before the launch:
  uint32_t* hs_hist;    // [T][kHistBins] counts of the non-NaN visible keys per top-12-bit bin
  uint32_t* hs_coarse;  // [T][kCoarseBins] the same counts per top-6-bit bin
  int32_t* hs_arrive;   // [T] select CTAs done
  int32_t* hs_nwin;     // [T] winners appended
  int32_t* hs_nbnd;     // [T] boundary-bin keys appended (may exceed kBoundaryCap)
  // Written before being read:
  int32_t* hs_nv;       // [T] the query's clamped n_valid (0 for a bad row)
  uint32_t* hs_keys;    // [T][hs_key_stride] score key of entry s (0: NaN / hidden)
  int64_t hs_key_stride;
  u64* hs_win;          // [T][slot_stride] ranks of the keys above the boundary bin
  u64* hs_bnd;          // [T][kBoundaryCap] ranks of the boundary bin's keys
  int sel_cap;          // candidate buffer of the select kernel (entries)
  // Set only in the copy of a cooperative launch (merge mode "coop"): the scan kernel of a
  // kHist plan finishes the selection itself (coop_select) and no select kernel follows.
  int coop;
  int T, H, B, C, topk;
  int n_groups, n_splits, fan1, n_l1;
  int slot_stride, cap, stages, min_chunk;
  // Decode selection tail (select_topk / sort_desc with QPC 1): warp-aggregated histogram
  // atomics and warp-synchronised sort steps; false in "legacy" mode (the previous code).
  bool fast_tail;
  // The fast tail's final sort (indexer_select_kernel): sort_merge_write (warp runs merged by
  // binary search) unless DSV4_INDEXER_SORT=bitonic (sort_small_desc + write_indices).
  bool merge_sort;
  // Short-row decode path (indexer_short_kernel): q may be copied with 16-byte cp.async (q
  // 16-byte aligned, strides multiples of 8 elements); else 4-byte copies.
  bool q_vec16;
};

// ------------------------------------------------------------------------------------------
// PTX helpers
// ------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void cp_async_wait_dyn(int n) {
  if (n <= 0) cp_async_wait<0>();
  else if (n == 1) cp_async_wait<1>();
  else cp_async_wait<2>();
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& a0, uint32_t& a1,
                                            uint32_t& a2, uint32_t& a3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(a0), "=r"(a1), "=r"(a2), "=r"(a3)
               : "r"(addr));
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// ------------------------------------------------------------------------------------------
// ranks and group synchronisation
// ------------------------------------------------------------------------------------------
// rank = ordered(score) << 32 | ~index; false for NaN (never a candidate). Valid ranks are > 0
// (-inf maps to 0x007FFFFF), so 0 can pad the sort.
// score_key: the rank's upper 32 bits, monotone in the score; 0 for NaN (no other score maps
// to 0: -inf gives 0x007FFFFF).
__device__ __forceinline__ uint32_t score_key(float s) {
  if (s != s) return 0u;
  s = __fadd_rn(s, 0.0f);  // -0.0 -> +0.0 (equal scores tie on the index)
  const uint32_t b = __float_as_uint(s);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ u64 key_rank(uint32_t key, int idx) {
  return (static_cast<u64>(key) << 32) | static_cast<u64>(~static_cast<uint32_t>(idx));
}

__device__ __forceinline__ bool make_rank(float s, int idx, u64& r) {
  const uint32_t key = score_key(s);
  if (key == 0u) return false;
  r = key_rank(key, idx);
  return true;
}

__device__ __forceinline__ int32_t rank_index(u64 r) {
  return static_cast<int32_t>(~static_cast<uint32_t>(r));
}

// Barrier over the threads that serve one query: the CTA (QPC 1), a warp (QPC 8), or a named
// barrier (QPC 2, 4).
template <int QPC>
__device__ __forceinline__ void gsync(int qi) {
  if constexpr (QPC == 1) {
    __syncthreads();
  } else if constexpr (QPC == kWarps) {
    __syncwarp();
  } else {
    asm volatile("bar.sync %0, %1;\n" ::"r"(qi + 1), "n"(kThreads / QPC) : "memory");
  }
}

// Appends the lanes' ranks with ok set (whole warp calls).
__device__ __forceinline__ void warp_append(bool ok, u64 rank, u64* cand, QState* st) {
  const unsigned ball = __ballot_sync(kFull, ok);
  if (ball == 0) return;
  const int lane = threadIdx.x & 31;
  int base = 0;
  if (lane == 0) base = atomicAdd(&st->count, __popc(ball));
  base = __shfl_sync(kFull, base, 0);
  if (ok) cand[base + __popc(ball & ((1u << lane) - 1u))] = rank;
}

// Cuts the buffer down to the k highest ranks (exact; ranks are distinct) and raises thr.
// Called by all NT threads of the query's group, after a group barrier; st->count > k.
template <int QPC>
__device__ void select_topk(u64* cand, QState* st, int* hist, int k, int gtid, int qi,
                            bool fast) {
  constexpr int NT = kThreads / QPC;
  constexpr int NW = NT / 32;
  const int lane = gtid & 31, wq = gtid >> 5;
  const int n = st->count;
  if (n <= k) return;

  // Min / max: the bits above the highest differing bit are common to all candidates.
  u64 mn = ~0ull, mx = 0ull;
  for (int base = 0; base < n; base += NT * kUnroll) {
    u64 r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * NT + gtid;
      r[u] = i < n ? cand[i] : cand[0];  // cand[0] is a real candidate: neutral for min / max
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      mn = r[u] < mn ? r[u] : mn;
      mx = r[u] > mx ? r[u] : mx;
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const u64 a = __shfl_xor_sync(kFull, mn, off);
    const u64 b = __shfl_xor_sync(kFull, mx, off);
    mn = a < mn ? a : mn;
    mx = b > mx ? b : mx;
  }
  if constexpr (NW > 1) {
    if (lane == 0) {
      st->red[0][wq] = mn;
      st->red[1][wq] = mx;
    }
    gsync<QPC>(qi);
    mn = st->red[0][0];
    mx = st->red[1][0];
#pragma unroll
    for (int w = 1; w < NW; ++w) {
      const u64 a = st->red[0][w], b = st->red[1][w];
      mn = a < mn ? a : mn;
      mx = b > mx ? b : mx;
    }
  }
  // n >= 2 distinct ranks, so mn != mx.
  int top = 64 - __clzll(static_cast<long long>(mn ^ mx));  // undecided bits: [0, top)
  u64 prefix = top >= 64 ? 0ull : (mx & (~0ull << top));
  int needed = k;
  u64 thr;
  for (;;) {
    const int width = top < 8 ? top : 8;
    const int lo = top - width;
    const u64 himask = top >= 64 ? 0ull : (~0ull << top);
    const uint32_t dmask = (1u << width) - 1u;
    for (int b = gtid; b < 256; b += NT) hist[b] = 0;
    gsync<QPC>(qi);
    for (int base = 0; base < n; base += NT * kUnroll) {
      int bin[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * NT + gtid;
        const u64 r = i < n ? cand[i] : 0ull;
        bin[u] = (i < n && (r & himask) == prefix)
                     ? static_cast<int>(static_cast<uint32_t>(r >> lo) & dmask)
                     : -1;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (QPC == 1 && fast) {
          // Decode (the selects of a merge and of the histogram select, 256 threads on one
          // buffer): real scores put a warp's 32 ranks into a few bins in the first rounds
          // (sign and exponent bits), i.e. 8-32-way serialised shared atomics on the same
          // few words from all 8 warps. One atomic per distinct bin of the warp instead
          // (the lowest lane of each group of equal bins adds the group's size): same counts.
          // (fast = false: the previous code below.)
          const unsigned peers = __match_any_sync(kFull, bin[u]);
          if (bin[u] >= 0 && lane == __ffs(peers) - 1) atomicAdd(&hist[bin[u]], __popc(peers));
        } else {
          // Plateaus put a whole warp into one bin: one atomic instead of 32 serialised ones.
          const int b0 = __shfl_sync(kFull, bin[u], 0);
          if (__all_sync(kFull, bin[u] == b0)) {
            if (lane == 0 && b0 >= 0) atomicAdd(&hist[b0], 32);
          } else if (bin[u] >= 0) {
            atomicAdd(&hist[bin[u]], 1);
          }
        }
      }
    }
    gsync<QPC>(qi);
    if (wq == 0) {  // the bin holding the needed-th largest: lane l scans bins [8l, 8l+8)
      int c[8];
      int tot = 0;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        c[e] = hist[lane * 8 + e];
        tot += c[e];
      }
      int incl = tot;  // sum over lanes >= lane
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int v = __shfl_down_sync(kFull, incl, off);
        if (lane + off < 32) incl += v;
      }
      const int above = incl - tot;
      if (above < needed && incl >= needed) {
        int cum = above;
#pragma unroll
        for (int e = 7; e >= 0; --e) {
          if (cum + c[e] >= needed) {
            st->sel_digit = lane * 8 + e;
            st->sel_gt = cum;
            st->sel_in = c[e];
            break;
          }
          cum += c[e];
        }
      }
    }
    gsync<QPC>(qi);
    const int d = st->sel_digit, gt = st->sel_gt, in = st->sel_in;
    prefix |= static_cast<u64>(d) << lo;
    needed -= gt;
    top = lo;
    if (in == needed || top == 0) {
      thr = prefix;  // keep exactly the ranks >= prefix (all of bin d is kept)
      break;
    }
  }

  // In-place compaction of the kept ranks to [0, k), kUnroll * NT elements per step: all of a
  // step's elements are read before any is written, and every write goes to a position <= the
  // element's own (kept elements keep their order).
  const unsigned lt = (1u << lane) - 1u;
  int out = 0, parity = 0;
  for (int base = 0; base < n; base += NT * kUnroll) {
    u64 r[kUnroll];
    unsigned ball[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * NT + gtid;
      r[u] = i < n ? cand[i] : 0ull;
      ball[u] = __ballot_sync(kFull, i < n && r[u] >= thr);
    }
    if constexpr (NW == 1) {
      __syncwarp();
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if ((ball[u] >> lane) & 1u) cand[out + __popc(ball[u] & lt)] = r[u];
        out += __popc(ball[u]);
      }
    } else {
      if (lane == 0) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) st->wcnt[parity][u][wq] = __popc(ball[u]);
      }
      gsync<QPC>(qi);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        int before = 0, total = 0;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
          const int c = st->wcnt[parity][u][w];
          total += c;
          before += w < wq ? c : 0;
        }
        if ((ball[u] >> lane) & 1u) cand[out + before + __popc(ball[u] & lt)] = r[u];
        out += total;
      }
      parity ^= 1;
    }
  }
  gsync<QPC>(qi);
  if (gtid == 0) {
    st->count = k;
    st->thr = thr;
  }
  gsync<QPC>(qi);
}

// Bitonic sort of cand[0, n) in descending order (pads to a power of two with 0 < any rank).
// Pair i of a step compares elements lo = 2i - (i mod stride) and lo + stride. With one query
// per CTA (QPC 1) the pairs of warp w (i in [32w, 32w + 32) + m * NT) touch only the 64
// elements [64w, 64w + 64) + 2 m NT when stride <= 32: between two such steps the warp's own
// __syncwarp orders its shared-memory writes and reads, and a CTA barrier is needed only
// around the steps with stride >= 64 (6 of the 45 steps at n = 512). Same network, same
// comparisons: only the barrier between steps changes (fast = false: a group barrier after
// every step, the previous code).
template <int QPC>
__device__ void sort_desc(u64* cand, int n, int gtid, int qi, bool fast) {
  constexpr int NT = kThreads / QPC;
  int P = 1;
  while (P < n) P <<= 1;
  for (int i = n + gtid; i < P; i += NT) cand[i] = 0;
  gsync<QPC>(qi);
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = gtid; i < (P >> 1); i += NT) {
        const int lo = 2 * i - (i & (stride - 1));
        const int hi = lo + stride;
        const bool desc = (lo & size) == 0;
        const u64 a = cand[lo], b = cand[hi];
        if ((a < b) == desc) {
          cand[lo] = b;
          cand[hi] = a;
        }
      }
      // the next step's stride (0: this was the last step)
      const int next = stride > 1 ? stride >> 1 : (size < P ? size : 0);
      if (QPC == 1 && fast && next != 0 && stride <= 32 && next <= 32) {
        __syncwarp();
      } else {
        gsync<QPC>(qi);
      }
    }
  }
}

// Bitonic sort of cand[0, n) in descending order by one CTA (n <= kThreads * EPT; pads with 0 <
// any rank), the same network as sort_desc but held in registers: thread i holds the EPT
// consecutive elements [EPT i, EPT i + EPT), so the steps of stride < EPT are register swaps,
// those of stride < 32 EPT warp shuffles (the partner element is in lane ^ stride / EPT), and
// only the steps of stride >= 32 EPT go through shared memory (6 of the 55 steps at EPT 4, one
// barrier pair each). The loops over sizes and strides stay rolled: the network unrolled is
// thousands of instructions run once, and fetching them cost more than the sort (~17 us). For
// a few hundred to 2,048 candidates it replaces the select_topk + sort_desc pair, whose ~50
// barrier-separated steps over shared memory cost ~13 us at the end of a batch-1 select
// (globaltimer probe, H100). Whole CTA calls (QPC 1); cand[0, n) holds the sorted ranks on
// return (and cand[n, kThreads * EPT) the padding).
template <int EPT>
__device__ void sort_small_desc(u64* cand, int n) {
  static_assert(EPT == 4 || EPT == 8, "sort_small_desc: 4 or 8 elements per thread");
  constexpr int P = kThreads * EPT;
  const int tid = threadIdx.x;
  u64 v[EPT];
#pragma unroll
  for (int m = 0; m < EPT; ++m) {
    const int i = tid * EPT + m;
    v[m] = i < n ? cand[i] : 0ull;
  }
  __syncthreads();  // every read of cand is done before the first shared-memory step writes it
#pragma unroll 1
  for (int size = 2; size <= P; size <<= 1) {
    // strides >= EPT: the partner is another thread's element m (same m)
#pragma unroll 1
    for (int stride = size >> 1; stride >= EPT; stride >>= 1) {
      const bool via_smem = stride >= 32 * EPT;  // CTA-uniform
      if (via_smem) {
#pragma unroll
        for (int m = 0; m < EPT; ++m) cand[tid * EPT + m] = v[m];
        __syncthreads();
      }
#pragma unroll
      for (int m = 0; m < EPT; ++m) {
        // element i keeps the larger of (i, i ^ stride) iff it is the lower one of a
        // descending pair or the upper one of an ascending pair
        const int i = tid * EPT + m;
        const u64 o = via_smem ? cand[i ^ stride] : __shfl_xor_sync(kFull, v[m], stride / EPT);
        const bool keep_big = ((i & stride) == 0) == ((i & size) == 0);
        v[m] = keep_big ? (v[m] > o ? v[m] : o) : (v[m] < o ? v[m] : o);
      }
      if (via_smem) __syncthreads();
    }
    // strides < EPT: both elements are this thread's (compile-time register indices)
#pragma unroll
    for (int stride = EPT / 2; stride > 0; stride >>= 1) {
      if (stride < size) {
#pragma unroll
        for (int m = 0; m < EPT; ++m) {
          if ((m & stride) == 0) {
            const bool desc = ((tid * EPT + m) & size) == 0;
            const u64 a = v[m], b = v[m | stride];
            if ((a < b) == desc) {
              v[m] = b;
              v[m | stride] = a;
            }
          }
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < EPT; ++m) cand[tid * EPT + m] = v[m];
  __syncthreads();
}

// Sorts cand[0, n) (n <= kThreads * EPT distinct nonzero ranks) in descending order and writes
// query t's first min(n, topk) indices, then -1 up to topk: the output of sort_small_desc +
// write_indices, with a shorter dependency chain. Stage 1: warp w sorts its run of R = 32 EPT
// elements [w R, w R + R) in registers (the bitonic network of sort_small_desc up to size R:
// register swaps and shuffles, no barrier; 28 steps at EPT 4 where the whole network has 55).
// Stage 2: the 8 sorted runs are merged pairwise in 3 rounds through shared memory. An
// element keeps its registers; its place in the merge of runs a and a ^ 1 is its place in run a
// plus the number of elements of run a ^ 1 ranked above it (a branch-free binary search,
// log2(L) + 1 loads; the searches of a thread's EPT elements interleaved). Real ranks are
// distinct; the padding zeros tie, and a tie counts as "above" only for the odd run, so the
// places of a round are a permutation. The last round writes the indices, with no store back.
// Whole CTA calls; cand[0, kThreads * EPT) is overwritten.
template <int EPT>
__device__ void sort_merge_write(const Params& p, u64* cand, int n, int t) {
  static_assert(EPT == 4 || EPT == 8, "sort_merge_write: 4 or 8 elements per thread");
  constexpr int R = 32 * EPT;
  constexpr int P = kThreads * EPT;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  u64 v[EPT];
#pragma unroll
  for (int m = 0; m < EPT; ++m) {
    const int i = tid * EPT + m;
    v[m] = i < n ? cand[i] : 0ull;
  }
  // Stage 1: position j = lane * EPT + m of the warp's run; every size's blocks descending
  // except those whose bit `size` is set (bitonic), so size R ends all descending.
#pragma unroll 1
  for (int size = 2; size <= R; size <<= 1) {
#pragma unroll 1
    for (int stride = size >> 1; stride >= EPT; stride >>= 1) {
#pragma unroll
      for (int m = 0; m < EPT; ++m) {
        const int j = lane * EPT + m;
        const u64 o = __shfl_xor_sync(kFull, v[m], stride / EPT);
        const bool keep_big = ((j & stride) == 0) == ((j & size) == 0);
        v[m] = keep_big ? (v[m] > o ? v[m] : o) : (v[m] < o ? v[m] : o);
      }
    }
#pragma unroll
    for (int stride = EPT / 2; stride > 0; stride >>= 1) {
      if (stride < size) {
#pragma unroll
        for (int m = 0; m < EPT; ++m) {
          if ((m & stride) == 0) {
            const bool desc = ((lane * EPT + m) & size) == 0;
            const u64 a = v[m], b = v[m | stride];
            if ((a < b) == desc) {
              v[m] = b;
              v[m | stride] = a;
            }
          }
        }
      }
    }
  }
  // The thread's elements sit at cand[tid * EPT + m]: the slots it read (no barrier before).
  int at[EPT];
#pragma unroll
  for (int m = 0; m < EPT; ++m) {
    at[m] = tid * EPT + m;
    cand[at[m]] = v[m];
  }
  // Stage 2: rounds over run lengths L = R, 2R, 4R (the last one writes the output).
  int32_t* o = p.out + static_cast<int64_t>(t) * p.out_st;
  const int k = p.topk;
#pragma unroll 1
  for (int L = R; L < P; L <<= 1) {
    __syncthreads();  // the runs of length L are in cand
    int base[EPT];
#pragma unroll
    for (int m = 0; m < EPT; ++m) base[m] = (at[m] & ~(L - 1)) ^ L;  // start of the other run
#pragma unroll 1
    for (int half = L >> 1; half >= 1; half >>= 1) {
#pragma unroll
      for (int m = 0; m < EPT; ++m) {
        const u64 y = cand[base[m] + half - 1];
        const bool upper = (at[m] & L) != 0;
        base[m] += (y > v[m] || (upper && y == v[m])) ? half : 0;
      }
    }
    int place[EPT];
#pragma unroll
    for (int m = 0; m < EPT; ++m) {
      const u64 y = cand[base[m]];
      const bool upper = (at[m] & L) != 0;
      const int other = (at[m] & ~(L - 1)) ^ L;
      const int above = base[m] - other + ((y > v[m] || (upper && y == v[m])) ? 1 : 0);
      // merged run starts at the lower run's start; own place + the other run's count above
      place[m] = (at[m] & ~(2 * L - 1)) + (at[m] & (L - 1)) + above;
    }
    if (2 * L < P) {
      __syncthreads();  // every search of this round has read cand
#pragma unroll
      for (int m = 0; m < EPT; ++m) {
        at[m] = place[m];
        cand[at[m]] = v[m];
      }
    } else {
#pragma unroll
      for (int m = 0; m < EPT; ++m) {
        if (place[m] < k && v[m] != 0ull) o[place[m]] = rank_index(v[m]);
      }
    }
  }
  for (int i = n + tid; i < k; i += kThreads) o[i] = -1;
}

template <int QPC>
__device__ void write_indices(const Params& p, const u64* cand, int n, int t, int gtid) {
  constexpr int NT = kThreads / QPC;
  int32_t* o = p.out + static_cast<int64_t>(t) * p.out_st;
  for (int i = gtid; i < p.topk; i += NT) o[i] = i < n ? rank_index(cand[i]) : -1;
}

// Final step for one query's buffer: select to k, then either sort + write the indices, or
// store the (unsorted) candidates in a workspace slot.
template <int QPC>
__device__ void finish_query(const Params& p, u64* cand, QState* st, int* hist, int t, int gtid,
                             int qi, bool to_output, u64* slot_rank, int32_t* slot_count) {
  constexpr int NT = kThreads / QPC;
  if (st->count > p.topk) select_topk<QPC>(cand, st, hist, p.topk, gtid, qi, p.fast_tail);
  const int n = st->count < p.topk ? st->count : p.topk;
  if (to_output) {
    sort_desc<QPC>(cand, n, gtid, qi, p.fast_tail);
    write_indices<QPC>(p, cand, n, t, gtid);
  } else {
    for (int i = gtid; i < n; i += NT) slot_rank[i] = cand[i];
    if (gtid == 0) *slot_count = n;
  }
}

// Merges the candidate slots [c0, c1) of query t (slots of `n_children` per query; the slots of
// one query are contiguous, so the children form one flat array of (c1 - c0) * slot_stride
// entries, read in rounds of kRound with every load of a round in flight at once).
template <int QPC>
__device__ void merge_slots(const Params& p, u64* cand, QState* st, int* hist, int t, int gtid,
                            int qi, const u64* ranks, const int32_t* counts, int n_children,
                            int c0, int c1, bool to_output, u64* dst_rank, int32_t* dst_count) {
  constexpr int NT = kThreads / QPC;
  constexpr int kRound = NT * 2 * kMergePairs;
  const int nch = c1 - c0;  // <= kMaxChildren (host plan)
  const int64_t first = static_cast<int64_t>(t) * n_children + c0;
  if (gtid == 0) {
    st->count = 0;
    st->thr = 0;
  }
  if (gtid < nch) st->ccnt[gtid] = __ldcg(counts + first + gtid);
  gsync<QPC>(qi);
  const u64* src = ranks + first * p.slot_stride;
  const int span = nch * p.slot_stride;
  for (int base = 0; base < span; base += kRound) {
    const u64 thr = st->thr;
    uint4 v[kMergePairs];
    int lim[kMergePairs];  // valid candidates in the pair: 0, 1 or 2
#pragma unroll
    for (int u = 0; u < kMergePairs; ++u) {
      const int e = base + (u * NT + gtid) * 2;  // even; slot_stride is a multiple of 16
      lim[u] = 0;
      if (e < span) {
        const int c = e / p.slot_stride;
        const int cnt = st->ccnt[c] - (e - c * p.slot_stride);
        lim[u] = cnt < 0 ? 0 : (cnt > 2 ? 2 : cnt);
      }
      v[u] = lim[u] > 0 ? __ldcg(reinterpret_cast<const uint4*>(src + e)) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kMergePairs; ++u) {
      const u64 r0 = (static_cast<u64>(v[u].y) << 32) | v[u].x;
      const u64 r1 = (static_cast<u64>(v[u].w) << 32) | v[u].z;
      warp_append(lim[u] > 0 && r0 >= thr, r0, cand, st);
      warp_append(lim[u] > 1 && r1 >= thr, r1, cand, st);
    }
    gsync<QPC>(qi);
    const int now = st->count;
    gsync<QPC>(qi);
    if (now > p.cap - kRound) select_topk<QPC>(cand, st, hist, p.topk, gtid, qi, p.fast_tail);
  }
  gsync<QPC>(qi);
  finish_query<QPC>(p, cand, st, hist, t, gtid, qi, to_output, dst_rank, dst_count);
}

// ------------------------------------------------------------------------------------------
// scoring
// ------------------------------------------------------------------------------------------
// Block id and entry of key s of row `row` (the row's block-table row when paged); false
// when the key's block does not exist.
__device__ __forceinline__ bool key_place(const Params& p, int row, int s, int64_t& blk,
                                          int& e) {
  if (p.bt == nullptr) {
    blk = row;
    e = s;
    return true;
  }
  const int col = s / p.bs;
  const int64_t id = col < p.bt_cols ? p.bt[static_cast<int64_t>(row) * p.bt_st + col] : -1;
  blk = id;
  e = s - col * p.bs;
  return id >= 0 && id < p.n_blocks;
}

// Byte offset of bf16 16-byte chunk c of key row r in a tile of TILE rows. kWgL false: rows of
// 2D bytes, chunk c ^ (r & 7) (ldmatrix, conflict-free). kWgL true (the wgmma scan): wgmma's
// K-major 128-byte-swizzle layout, the row's 64-column slices stored as separate [TILE][128 B]
// arrays (slice c / 8), chunk (c % 8) ^ (r & 7) within the slice's 128-byte row; the tile must
// start at a multiple of 1024 bytes (the swizzle follows address bits 4-6 ^ 7-9).
template <int D, int TILE, bool kWgL>
__device__ __forceinline__ int tile_chunk(int r, int c) {
  if constexpr (kWgL) {
    return (c >> 3) * (TILE * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4);
  } else {
    return r * (D * 2) + ((c ^ (r & 7)) << 4);
  }
}

// Loads keys [s_first, min(s_first + TILE, s_end)) of row `row` into a pipeline stage.
// bf16: the swizzled bf16 tile itself (tile_chunk). FP8: the raw e4m3 rows [TILE][D] followed
// by the scales [TILE] (converted by convert_fp8_tile; kWgL: 16-byte chunks swizzled within
// each row, read into registers by score_wg_fp8). Missing keys are not loaded.
// Warp w copies the rows [w RPW, w RPW + RPW) of the tile; lane j < RPW finds the place of row
// w RPW + j once (key_place: a division and a block-table read when paged) and hands its byte
// offset to the lanes copying that row's chunks by shuffle, so each key is placed once per tile
// instead of once per 16-byte chunk (which made this loader the scan's largest cost: ~150
// instructions per chunk, Nsight Compute, batch-1 1M FP8 paged). Each warp instruction copies
// 32 / NCH whole rows (contiguous bytes within a block). valid (optional): word w gets the
// mask of warp w's rows that were loaded (bit j: row w RPW + j is < s_end and its block
// exists), so that the scan's epilogue need not place each key again. Every lane of each warp
// calls it (warp shuffles); the CTA's 8 warps together cover the tile.
template <int D, int TILE, bool kFp8, bool kWgL = false>
__device__ __forceinline__ void load_tile(uint32_t stage, const Params& p, int row,
                                          int s_first, int s_end, unsigned* valid = nullptr) {
  constexpr int RPW = TILE / kWarps;                // rows per warp (16 or 32)
  constexpr int NCH = kFp8 ? D / 16 : D / 8;        // 16-byte chunks per key row
  constexpr int RPI = 32 / NCH;                     // rows per warp instruction
  static_assert(RPW <= 32 && RPW % RPI == 0, "load_tile: tile / warp shape");
  static_assert(!(kFp8 && kWgL) || NCH == 8, "the swizzled FP8 rows are 128 bytes");
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int r0 = warp * RPW;
  const unsigned char* base = reinterpret_cast<const unsigned char*>(p.keys);
  // this lane's row (lanes < RPW): loaded or not (bit `lane` of `rows_ok`), and its byte offset
  // (which may be negative: strides are not required to be positive)
  int64_t off = 0;
  bool ok = false;
  {
    const int s = s_first + r0 + lane;
    int64_t blk;
    int e;
    if (lane < RPW && s < s_end && key_place(p, row, s, blk, e)) {
      ok = true;
      off = kFp8 ? blk * p.k_sb + static_cast<int64_t>(e) * D
                 : (blk * p.k_sb + static_cast<int64_t>(e) * p.k_sc) * 2;
      if constexpr (kFp8) {  // the key's scale
        cp_async4(stage + TILE * D + (r0 + lane) * 4,
                  base + blk * p.k_sb + static_cast<int64_t>(p.fp8_rows) * D +
                      static_cast<int64_t>(e) * 4);
      }
    }
  }
  const unsigned rows_ok = __ballot_sync(kFull, ok);
  if (valid != nullptr && lane == 0) valid[warp] = rows_ok;
  const int c = lane % NCH;
#pragma unroll
  for (int u = 0; u < RPW / RPI; ++u) {
    const int rw = u * RPI + lane / NCH;  // row within the warp's rows
    const int64_t o = __shfl_sync(kFull, off, rw);
    if ((rows_ok >> rw) & 1u) {
      const int r = r0 + rw;
      if constexpr (kFp8) {
        // kWgL: chunk c ^ (r & 7) of the row, so that score_wg_fp8's register loads (the 8
        // rows g of a warp, 2 chunks each) hit 8 different 16-byte bank groups
        const int cs = kWgL ? (c ^ (r & 7)) : c;
        cp_async16(stage + r * D + cs * 16, base + o + c * 16);
      } else {
        cp_async16(stage + tile_chunk<D, TILE, kWgL>(r, c), base + o + c * 16);
      }
    }
  }
}

// fp32 value of an e4m3 byte (exact; NaN codes give NaN): the byte's exponent / mantissa
// placed in an fp32 with bias 127 (a subnormal code becomes an fp32 subnormal), then scaled
// by 2^120 to rebias to 7.
__device__ __forceinline__ float e4m3_to_float(uint32_t b) {
  const uint32_t mag = b & 0x7fu;
  const uint32_t bits = (mag << 20) | ((b & 0x80u) << 24);
  return mag == 0x7fu ? __uint_as_float(0x7fc00000u) : __uint_as_float(bits) * 0x1p120f;
}

// FP8 keys: converts the e4m3 rows of a stage into the swizzled bf16 tile (unscaled values:
// the per-key scale multiplies the key's score instead, exactly, being a power of two).
template <int D, int TILE>
__device__ __forceinline__ void convert_fp8_tile(const unsigned char* src,
                                                 unsigned char* dst_tile) {
  constexpr int NCH = D / 16, RB = D * 2;
  for (int i = threadIdx.x; i < TILE * NCH; i += kThreads) {
    const int r = i / NCH, c = i % NCH;
    const uint4 v = *reinterpret_cast<const uint4*>(src + r * D + c * 16);
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
    uint32_t o[8];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float f0 = e4m3_to_float(w[k] & 0xffu), f1 = e4m3_to_float((w[k] >> 8) & 0xffu);
      const float f2 = e4m3_to_float((w[k] >> 16) & 0xffu), f3 = e4m3_to_float(w[k] >> 24);
      const __nv_bfloat162 lo = __floats2bfloat162_rn(f0, f1);
      const __nv_bfloat162 hi = __floats2bfloat162_rn(f2, f3);
      o[2 * k] = *reinterpret_cast<const uint32_t*>(&lo);
      o[2 * k + 1] = *reinterpret_cast<const uint32_t*>(&hi);
    }
    // 16 e4m3 values = bf16 chunks 2c and 2c + 1 of row r (8 values each).
    const int c0 = 2 * c, c1 = 2 * c + 1;
    *reinterpret_cast<uint4*>(dst_tile + r * RB + ((c0 ^ (r & 7)) << 4)) =
        make_uint4(o[0], o[1], o[2], o[3]);
    *reinterpret_cast<uint4*>(dst_tile + r * RB + ((c1 ^ (r & 7)) << 4)) =
        make_uint4(o[4], o[5], o[6], o[7]);
  }
}

// q block of heads [hb*64, hb*64+64) of query t as mma B fragments (0 for heads >= H), and
// the block's weights in the warp's shared-memory row w_s[64] (whole warp calls).
template <int D>
__device__ __forceinline__ void load_q(const Params& p, int t, int hb, int lane,
                                       uint32_t (&qf)[D / 16][8][2], float* w_s) {
  const int g = lane >> 2, tq = lane & 3;
  const __nv_bfloat16* qt = p.q + static_cast<int64_t>(t) * p.q_st;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    const int h = hb * kHeadBlock + nt * 8 + g;
    const bool ok = h < p.H;
    const __nv_bfloat16* qh = qt + static_cast<int64_t>(ok ? h : 0) * p.q_sh + 2 * tq;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      qf[ks][nt][0] = ok ? __ldg(reinterpret_cast<const unsigned int*>(qh + ks * 16)) : 0u;
      qf[ks][nt][1] = ok ? __ldg(reinterpret_cast<const unsigned int*>(qh + ks * 16 + 8)) : 0u;
    }
  }
  const float* wt = p.w + static_cast<int64_t>(t) * p.w_st + hb * kHeadBlock;
  const int hlim = p.H - hb * kHeadBlock;
  __syncwarp();  // earlier readers of w_s are done
  w_s[lane] = lane < hlim ? __ldg(wt + lane) : 0.f;
  w_s[lane + 32] = lane + 32 < hlim ? __ldg(wt + lane + 32) : 0.f;
  __syncwarp();
}

// Scores of the 16 keys of m-tile m (rows g and g+8 of the lane), summed over this lane's 16
// heads of the head block into p0 / p1. kMasked: skip heads >= hlim (their padded q is 0,
// but 0 * inf would turn into NaN).
template <int D, bool kMasked>
__device__ __forceinline__ void score_mtile(uint32_t stage, int m, int lane,
                                            const uint32_t (&qf)[D / 16][8][2],
                                            const float* w_s, int hlim, float& p0, float& p1) {
  constexpr int RB = D * 2;
  const int mat = lane >> 3, rr = lane & 7, tq = lane & 3;
  const uint32_t row_addr = stage + (m * 16 + rr + ((mat & 1) << 3)) * RB;
  float acc[8][4];
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[nt][c] = 0.f;
  }
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const int chunk = ks * 2 + (mat >> 1);
    uint32_t a0, a1, a2, a3;
    ldmatrix_x4(row_addr + ((chunk ^ rr) << 4), a0, a1, a2, a3);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) mma_bf16(acc[nt], a0, a1, a2, a3, qf[ks][nt][0], qf[ks][nt][1]);
  }
  float e0[2] = {0.f, 0.f}, e1[2] = {0.f, 0.f};  // two FMA chains per row (latency)
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    const float2 w2 = *reinterpret_cast<const float2*>(w_s + nt * 8 + 2 * tq);
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const float wv = c ? w2.y : w2.x;
      float x0 = acc[nt][c], x1 = acc[nt][2 + c];
      x0 = x0 < 0.f ? 0.f : x0;  // ReLU that keeps NaN (as torch.relu)
      x1 = x1 < 0.f ? 0.f : x1;
      if (!kMasked || nt * 8 + 2 * tq + c < hlim) {
        e0[c] = fmaf(wv, x0, e0[c]);
        e1[c] = fmaf(wv, x1, e1[c]);
      }
    }
  }
  p0 += e0[0] + e0[1];
  p1 += e1[0] + e1[1];
}

// ------------------------------------------------------------------------------------------
// wgmma scan (kWg instances; the default, DSV4_INDEXER_WGMMA=0 turns it off): decode plans,
// one query per CTA
// ------------------------------------------------------------------------------------------
// The query's q (all head blocks, [64 heads][D] bf16 each) sits in shared memory once per CTA
// as wgmma's operand B (N = 64 heads, K-major, 128-byte swizzle); each warpgroup (4 warps)
// scores 64 keys per wgmma chain (operand A = the key tile in the same layout, M = 64 keys,
// D / 16 k16 steps) into a 64 x 64 fp32 accumulator: 32 registers per thread holding the same
// rows and heads as the 8 n-tiles of the mma.sync path (warp w4 of the warpgroup: rows
// 16 w4 + g and + 8), so the epilogue (ReLU, weight, head sum, quad shuffles) is the same.
// FP8 keys: operand A comes from registers instead (score_wg_fp8), converted from the raw
// e4m3 rows of the stage. The PTX helpers (descriptor, fences, m64n64k16 with both operands
// in shared memory) are grouped_gemm_wgmma.cuh's; the register-A form is below. wgmma is
// sm_90a-only device code (DSV4_GG_WGMMA), so other targets compile the kWg kernels as a trap
// and the host plans them on compute capability 9.0 only.

// Shared-memory bytes of one head block of q in the kWg scan (a multiple of 1024).
constexpr int wg_q_block_bytes(int D) { return kHeadBlock * D * 2; }

// FP8 keys (kWg): the key dimension behind column 16 ks + col (col < 16) of k step ks, i.e.
// the order in which score_wg_fp8 hands a key row to wgmma as register fragments. Lane tq of
// a quad holds the row's bytes [32 tq, 32 tq + 32) (two 16-byte shared-memory loads); k step
// ks takes its word ks (bytes 32 tq + 4 ks + 0..3): bytes 0 and 2 become the fragment's
// columns 2 tq and 2 tq + 1, bytes 1 and 3 the columns 2 tq + 8 and 2 tq + 9 (the A fragment
// layout of mma.m16n8k16, which wgmma's register operand shares), so that each bf16x2 comes
// from one word by bit moves alone. q is stored in the same order (load_q_wg<D, true>): the
// dot product over D does not depend on the order of its terms, only the fp32 summation
// order inside the MMA does.
__host__ __device__ constexpr int fp8_k_dim(int ks, int col) {
  return 32 * ((col & 7) >> 1) + 4 * ks + (col >> 3) + 2 * (col & 1);
}

// q of query t (n_hb head blocks; heads >= H are 0) into q_s (1024-byte aligned) in the wgmma
// layout (tile_chunk with 64 rows per head block), and its weights into w_all[n_hb * 64] (0 for
// heads >= H). Whole CTA; 4-byte global loads (q's alignment contract). kFp8: column c of the
// MMA's K holds dimension fp8_k_dim(c / 16, c % 16) (the FP8 keys' register order).
template <int D, bool kFp8>
__device__ __forceinline__ void load_q_wg(const Params& p, int t, int n_hb, unsigned char* q_s,
                                          float* w_all) {
  constexpr int NCH = D / 8;
  static_assert(!kFp8 || D == 128, "fp8_k_dim: 128-byte key rows");
  const __nv_bfloat16* qt = p.q + static_cast<int64_t>(t) * p.q_st;
  for (int i = threadIdx.x; i < n_hb * kHeadBlock * NCH; i += kThreads) {
    const int h = i / NCH, c = i % NCH;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (h < p.H) {
      const unsigned int* src =
          reinterpret_cast<const unsigned int*>(qt + static_cast<int64_t>(h) * p.q_sh);
      if constexpr (kFp8) {
        // chunk c = columns 8 c .. 8 c + 7 of the K order: 4 pairs (dimension d0, d0 + 2)
        uint32_t o[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int d0 = fp8_k_dim(c >> 1, (c & 1) * 8 + 2 * j);
          const uint32_t x = __ldg(src + (d0 >> 1)), y = __ldg(src + ((d0 + 2) >> 1));
          o[j] = __byte_perm(x, y, (d0 & 1) ? 0x7632 : 0x5410);
        }
        v = make_uint4(o[0], o[1], o[2], o[3]);
      } else {
        v.x = __ldg(src + c * 4);
        v.y = __ldg(src + c * 4 + 1);
        v.z = __ldg(src + c * 4 + 2);
        v.w = __ldg(src + c * 4 + 3);
      }
    }
    const int hb = h / kHeadBlock, hr = h % kHeadBlock;
    *reinterpret_cast<uint4*>(q_s + hb * wg_q_block_bytes(D) +
                              tile_chunk<D, kHeadBlock, true>(hr, c)) = v;
  }
  const float* wt = p.w + static_cast<int64_t>(t) * p.w_st;
  for (int h = threadIdx.x; h < n_hb * kHeadBlock; h += kThreads) {
    w_all[h] = h < p.H ? __ldg(wt + h) : 0.f;
  }
}

// Two e4m3 values as a bf16x2, exactly: e holds the bytes in bits 8-15 (low lane) and 24-31
// (high lane). For an e4m3 byte v, (v & 0x80) << 8 | (v & 0x7f) << 4 is the bf16 of
// e4m3(v) * 2^-120 for every non-NaN v (e4m3 subnormals become bf16 subnormals); one bf16x2
// multiply by 2^120 (exact: a power of two, no overflow; PTX mul.bf16x2 keeps subnormals)
// restores the value. The NaN codes 0x7f / 0xff come out as 480 (finite): score_wg_fp8 flags
// them separately.
__device__ __forceinline__ uint32_t e4m3x2_to_bf16x2(uint32_t e) {
  const uint32_t h = (e & 0x80008000u) | ((e & 0x7f007f00u) >> 4);
  uint32_t o;
  asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(o) : "r"(h), "r"(0x7b807b80u));
  return o;
}

// Keeps a register fragment live (its registers not reused) up to this point: called after
// the wgmma.wait_group that retires the MMAs reading it.
template <int N>
__device__ __forceinline__ void keep_frag(const uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" ::"r"(r[i]) : "memory");
}

// wgmma.mma_async m64n64k16, f32 += bf16 x bf16, with A (64 keys x 16 columns) from registers:
// a = the warp's mma.m16n8k16-style A fragment of its 16 rows; B (q, 64 heads, K-major,
// 128-byte swizzle) from shared memory. accumulate 0: d = A B (scale-d 0: no zeroing needed).
__device__ __forceinline__ void wgmma_rs_m64n64(float (&d)[32], const uint32_t (&a)[4],
                                                uint64_t db, int accumulate) {
#if DSV4_GG_WGMMA
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "
      "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
        "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
        "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate));
#endif
}

// ReLU, weight and sum over this lane's 16 heads of a wgmma accumulator [64 keys][64 heads]
// (acc[4 j + c]: head 8 j + 2 tq + (c & 1), row g for c < 2, g + 8 else), added to p0 / p1.
// Heads >= hlim (padding: q = 0, weight 0) contribute exactly 0 even where 0 * inf gave NaN:
// ReLU and the mask are one select (no branch: a branch here, between the wait for one wgmma
// chain and the next chain's completion, makes ptxas serialise the wgmmas). For the real
// heads the same operations in the same order as score_mtile's epilogue.
__device__ __forceinline__ void head_sum_wg(const float (&acc)[32], const float* w_s, int tq,
                                            int hlim, float& p0, float& p1) {
  float e0[2] = {0.f, 0.f}, e1[2] = {0.f, 0.f};
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    const float2 w2 = *reinterpret_cast<const float2*>(w_s + nt * 8 + 2 * tq);
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const float wv = c ? w2.y : w2.x;
      const bool pad = nt * 8 + 2 * tq + c >= hlim;
      float x0 = acc[nt * 4 + c], x1 = acc[nt * 4 + 2 + c];
      x0 = (x0 < 0.f || pad) ? 0.f : x0;  // ReLU that keeps NaN (as torch.relu)
      x1 = (x1 < 0.f || pad) ? 0.f : x1;
      e0[c] = fmaf(wv, x0, e0[c]);
      e1[c] = fmaf(wv, x1, e1[c]);
    }
  }
  p0 += e0[0] + e0[1];
  p1 += e1[0] + e1[1];
}

// This warpgroup's (wg) m64 blocks wg + 2 i (i < MBW) of the key tile at `stage` (wgmma
// layout): a[i] / b[i] = the lane's partial head sums of rows g / g + 8 of its warp's 16 rows
// (before the quad shuffles), over all head blocks. The MBW wgmma chains of a head block are
// issued back to back, one commit group each, so block 0's epilogue overlaps block 1's MMAs.
// Blocks past the keys are scored too (stale rows; the caller drops their results): every
// wgmma is issued by the whole warpgroup unconditionally.
template <int D, int TILE>
__device__ __forceinline__ void score_wg(uint32_t stage, uint32_t q_s, const float* w_all,
                                         int n_hb, int H, int wg, int tq,
                                         float (&a)[TILE / 128], float (&b)[TILE / 128]) {
  constexpr int MBW = TILE / 128;  // 64-key blocks per warpgroup and tile (2 warpgroups)
  constexpr int KS = D / 16;
  static_assert(MBW == 1 || MBW == 2, "wait_group depths below assume <= 2 chains");
#pragma unroll
  for (int i = 0; i < MBW; ++i) a[i] = b[i] = 0.f;
#pragma unroll 1
  for (int hb = 0; hb < n_hb; ++hb) {
    float acc[MBW][32];
#pragma unroll
    for (int i = 0; i < MBW; ++i) {
#pragma unroll
      for (int j = 0; j < 32; ++j) acc[i][j] = 0.f;
    }
    const uint32_t qb = q_s + hb * wg_q_block_bytes(D);
    gg::wgmma_fence();
#pragma unroll
    for (int i = 0; i < MBW; ++i) {
      const uint32_t ab = stage + (wg + 2 * i) * 64 * 128;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        gg::Wgmma<64>::mma(acc[i], gg::smem_desc(ab + (ks >> 2) * (TILE * 128) + (ks & 3) * 32),
                           gg::smem_desc(qb + (ks >> 2) * (kHeadBlock * 128) + (ks & 3) * 32));
      }
      gg::wgmma_commit();
    }
    const int hlim = H - hb * kHeadBlock;
    const float* w_s = w_all + hb * kHeadBlock;
#pragma unroll
    for (int i = 0; i < MBW; ++i) {
      if (i + 1 < MBW) {
        gg::wgmma_wait_1();
      } else {
        gg::wgmma_wait_all();
      }
      gg::fence_regs(acc[i]);
      head_sum_wg(acc[i], w_s, tq, hlim, a[i], b[i]);
    }
  }
}

// score_wg for FP8 keys (TILE 256, D 128): the raw e4m3 rows of the stage (load_tile<.., true>:
// 16-byte chunks swizzled within each 128-byte row) go into registers and straight into wgmma
// as its A operand, instead of through a bf16 tile in shared memory (convert, store, fence,
// CTA barrier, then wgmma reading it back: 64 KB written and read per tile, and the MMAs
// waited for the whole tile's conversion). Lane (g, tq) of warp w4 loads bytes
// [32 tq, 32 tq + 32) of its rows g and g + 8 of each 16-row slice (fp8_k_dim: the K order,
// q stored to match), converts them with bit moves (e4m3x2_to_bf16x2) and issues the chain;
// block 1 is converted while block 0's chain runs. A key with an e4m3 NaN byte scores NaN (its
// bf16 NaN made every head's dot product NaN in the tile path): the lane's NaN flag of each row
// turns its partial sum into NaN, which the quad sum passes on. Padding heads (>= H) and the
// order of the epilogue are head_sum_wg's, as in score_wg.
template <int D, int TILE>
__device__ __forceinline__ void score_wg_fp8(const unsigned char* raw, uint32_t q_s,
                                             const float* w_all, int n_hb, int H, int wg,
                                             int lane, float (&a)[TILE / 128],
                                             float (&b)[TILE / 128]) {
  static_assert(D == 128 && TILE == 256, "score_wg_fp8: 128-byte rows, two 64-key blocks");
  constexpr int MBW = 2, KS = D / 16;
  const int g = lane >> 2, tq = lane & 3, w4 = (static_cast<int>(threadIdx.x) >> 5) & 3;
  uint32_t fa[MBW][KS][4];  // [block][k step]: rows g / g + 8, columns 2 tq / 2 tq + 8
  uint32_t nan_row[MBW][2];
  auto convert = [&](int i) {
    const int r0 = (wg + 2 * i) * 64 + w4 * 16 + g;  // rows r0 and r0 + 8: both = g mod 8
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const unsigned char* row = raw + (r0 + 8 * h) * D;
      const uint4 v0 = *reinterpret_cast<const uint4*>(row + (((2 * tq) ^ g) << 4));
      const uint4 v1 = *reinterpret_cast<const uint4*>(row + (((2 * tq + 1) ^ g) << 4));
      const uint32_t w[KS] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
      uint32_t carry = 0u;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        // a byte is a NaN code iff its low 7 bits are all ones: the + 1 carries into bit 7
        carry |= (w[ks] & 0x7f7f7f7fu) + 0x01010101u;
        fa[i][ks][h] = e4m3x2_to_bf16x2(w[ks] << 8);  // bytes 0, 2: columns 2 tq, 2 tq + 1
        fa[i][ks][2 + h] = e4m3x2_to_bf16x2(w[ks]);   // bytes 1, 3: columns 2 tq + 8, + 9
      }
      nan_row[i][h] = carry & 0x80808080u;
    }
  };
  float acc[MBW][32];
  auto chain = [&](int i, uint32_t qb) {
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      wgmma_rs_m64n64(acc[i], fa[i][ks],
                      gg::smem_desc(qb + (ks >> 2) * (kHeadBlock * 128) + (ks & 3) * 32), ks);
    }
    gg::wgmma_commit();
  };
  auto finish = [&](int hb) {
    const int hlim = H - hb * kHeadBlock;
    const float* w_s = w_all + hb * kHeadBlock;
    gg::wgmma_wait_1();
    gg::fence_regs(acc[0]);
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) keep_frag(fa[0][ks]);
    head_sum_wg(acc[0], w_s, tq, hlim, a[0], b[0]);
    gg::wgmma_wait_all();
    gg::fence_regs(acc[1]);
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) keep_frag(fa[1][ks]);
    head_sum_wg(acc[1], w_s, tq, hlim, a[1], b[1]);
  };
#pragma unroll
  for (int i = 0; i < MBW; ++i) a[i] = b[i] = 0.f;
  convert(0);
  gg::wgmma_fence();  // the fragments (and the accumulators, re-used) written above
  chain(0, q_s);
  convert(1);  // overlaps block 0's MMAs
  gg::wgmma_fence();
  chain(1, q_s);
  finish(0);
#pragma unroll 1
  for (int hb = 1; hb < n_hb; ++hb) {  // heads 64-127: the same fragments, q's second block
    gg::wgmma_fence();
    chain(0, q_s + hb * wg_q_block_bytes(D));
    chain(1, q_s + hb * wg_q_block_bytes(D));
    finish(hb);
  }
  const float qnan = __int_as_float(0x7fc00000);
#pragma unroll
  for (int i = 0; i < MBW; ++i) {
    a[i] = nan_row[i][0] != 0u ? qnan : a[i];
    b[i] = nan_row[i][1] != 0u ? qnan : b[i];
  }
}

// ------------------------------------------------------------------------------------------
// the kernel
// ------------------------------------------------------------------------------------------
// Merge mode "coop" (Params::coop, a cooperative launch of a kHist plan): the selection after
// the scan, inside the scan grid; defined with the histogram select below.
__device__ void coop_select(const Params& p, int t, int j, int nv, u64* big, int big_cap,
                            u64* cand, QState* st, int* hist);

// kHist (decode, QPC 1): no candidate buffer; every visible entry's score key goes to
// p.hs_keys and is counted in the query's histogram p.hs_hist (shared-memory bins first, then
// one global atomic per non-empty bin); indexer_select_kernel does the selection.
// kWg (decode, QPC 1): the scan on wgmma (section above); shared memory gains a pad to 1024
// bytes at the start and q (n_hb head blocks) after the key tiles.
template <int D, int QPC, int TILE, bool kScanOnly, bool kFp8, bool kHist, bool kWg = false>
__global__ void __launch_bounds__(kThreads, 1) indexer_topk_kernel(const Params p) {
  static_assert(!kHist || (QPC == 1 && !kScanOnly), "the histogram select serves decode plans");
  static_assert(!kWg || (QPC == 1 && TILE % 128 == 0), "the wgmma scan serves decode plans");
#if defined(__CUDA_ARCH__) && !DSV4_GG_WGMMA
  if constexpr (kWg) {
    __trap();  // not sm_90a device code: no wgmma (the host plans kWg on sm_90 only)
  }
#endif
  constexpr int WPQ = kWarps / QPC;          // warps per query
  constexpr int NT = kThreads / QPC;         // threads per query
  constexpr int MT = TILE / 16 / WPQ;         // m-tiles per warp per stage
  constexpr int TILE_BYTES = TILE * D * 2;   // a bf16 tile
  // A pipeline stage: the bf16 tile, or (FP8) e4m3 rows + fp32 scales; FP8 on mma.sync adds
  // one bf16 tile that each stage is converted into before scoring (the wgmma scan converts
  // into registers: score_wg_fp8).
  constexpr int STAGE_BYTES = kFp8 ? TILE * D + TILE * 4 : TILE_BYTES;
  constexpr int EXTRA_BYTES = kFp8 && !kWg ? TILE_BYTES : 0;
  constexpr unsigned kAllDone = (1u << QPC) - 1u;

  extern __shared__ __align__(128) unsigned char smem_dyn[];
  __shared__ int s_row[QPC], s_nv[QPC];
  __shared__ int s_flag;
  __shared__ __align__(16) float s_w[kWarps][kHeadBlock];  // each warp's copy of its weights
  // per pipeline stage: which of its rows were loaded (load_tile; TILE / kWarps rows per word)
  __shared__ unsigned s_valid[4][kWarps];
  constexpr int RPW = TILE / kWarps;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int qi = warp / WPQ, kw = warp % WPQ;
  const int gtid = tid - qi * NT;
  const int g_lane = lane >> 2, tq = lane & 3;
  const int n_hb = (p.H + kHeadBlock - 1) / kHeadBlock;

  // Shared memory: [kWg: pad to 1024 B][stages key tiles][FP8, not kWg: bf16 tile][kWg: q,
  // n_hb head blocks][QState x QPC][hist 256 x QPC][cand cap x QPC]. (kWg: the stage sizes
  // are multiples of 1024 at TILE 256.)
  unsigned char* const smem =
      kWg ? smem_dyn + ((1024u - (smem_u32(smem_dyn) & 1023u)) & 1023u) : smem_dyn;
  unsigned char* const q_wg = smem + p.stages * STAGE_BYTES + EXTRA_BYTES;
  const int Q_BYTES = kWg ? n_hb * wg_q_block_bytes(D) : 0;
  QState* const states = reinterpret_cast<QState*>(q_wg + Q_BYTES);
  int* const hists = reinterpret_cast<int*>(states + QPC);
  u64* const cands = reinterpret_cast<u64*>(hists + QPC * 256);
  QState* const st = states + qi;
  int* const hist = hists + qi * 256;
  u64* const cand = cands + static_cast<int64_t>(qi) * p.cap;
  // kHist: the bins live where the candidate buffer would (cap >= 2048 entries = 16 KB).
  unsigned* const hbins = reinterpret_cast<unsigned*>(cands);
  const uint32_t tiles = smem_u32(smem);

  const int work = blockIdx.x;
  const int g = p.n_groups - 1 - work / p.n_splits;  // heaviest (causal) groups first
  const int j = work % p.n_splits;
  const int t = g * QPC + qi;

  if (tid < QPC) {
    const int tt = g * QPC + tid;
    int r = -2, nv = 0;  // -2: no query in this slot
    if (tt < p.T) {
      r = p.rows[tt];
      nv = p.n_valid[tt];
      nv = nv < 0 ? 0 : (nv > p.C ? p.C : nv);
      if (r < 0 || r >= p.B) {
        r = -1;
        nv = 0;
      }
    }
    s_row[tid] = r;
    s_nv[tid] = nv;
  }
  if constexpr (kHist) {
    for (int i = tid; i < kHistBins; i += kThreads) hbins[i] = 0u;
  }
  __syncthreads();
  if constexpr (kHist) {
    if (j == 0 && tid == 0) p.hs_nv[t] = s_nv[0];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // The select grid may launch now (programmatic dependent launch, launch_kernel): its CTAs
    // wait in griddepcontrol.wait until this grid has completed and its writes are visible.
    // The signal takes effect once every CTA of this grid has given it or exited, i.e. all of
    // them are resident (at most one wave: n_splits = SMs / queries), so the waiting select
    // CTAs cannot keep a CTA of this grid from starting. A no-op for a plain launch.
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  }

  unsigned done = 0;
#pragma unroll
  for (int i = 0; i < QPC; ++i) done |= s_row[i] == -2 ? (1u << i) : 0u;
  // kWg: values read from shared memory that steer the control flow around the wgmmas are
  // taken through a shuffle, so that ptxas sees them warp-uniform (else it serialises the
  // wgmmas: "divergent path"); they are CTA-uniform anyway (QPC 1: one query per CTA).
  if constexpr (kWg) done = __shfl_sync(kFull, done, 0);

  uint32_t qf[D / 16][8][2];
  float* const w_s = s_w[warp];
  float* const w_all = &s_w[0][0];  // kWg: the weights of all head blocks (<= 2, host)

  // Queries of the group that share a row are scored together (normally all of them).
  while (done != kAllDone) {
    const int lead = __ffs(~done) - 1;
    const int lead_row = s_row[lead];
    unsigned active = 0;
    int nv_max = 0;
#pragma unroll
    for (int i = 0; i < QPC; ++i) {
      if (!((done >> i) & 1u) && s_row[i] == lead_row) {
        active |= 1u << i;
        nv_max = s_nv[i] > nv_max ? s_nv[i] : nv_max;
      }
    }
    if constexpr (kWg) {
      active = __shfl_sync(kFull, active, 0);
      nv_max = __shfl_sync(kFull, nv_max, 0);
    }
    done |= active;
    const bool me = (active >> qi) & 1u;

    // This split's key range [s_begin, s_end) of the row.
    // (whole tiles, except that a range shorter than a tile is a multiple of one m-tile: a
    // short decode row is spread over CTAs at 128 keys = one m-tile per warp)
    int64_t L = (static_cast<int64_t>(nv_max) + p.n_splits - 1) / p.n_splits;
    L = L >= TILE ? (L + TILE - 1) / TILE * TILE : (L + 15) / 16 * 16;
    L = L > p.min_chunk ? L : p.min_chunk;
    const int64_t sb = static_cast<int64_t>(j) * L;
    const int s_begin = sb < nv_max ? static_cast<int>(sb) : nv_max;
    const int s_end = sb + L < nv_max ? static_cast<int>(sb + L) : nv_max;
    const int n_tiles = (s_end - s_begin + TILE - 1) / TILE;
    const int my_nv = kWg ? __shfl_sync(kFull, s_nv[qi], 0) : s_nv[qi];
    const int hi = s_end < my_nv ? s_end : my_nv;  // this query's keys: [s_begin, hi)

    if (me && gtid == 0) {
      st->count = 0;
      st->thr = 0;
    }
    if constexpr (kWg) {
      if (me) load_q_wg<D, kFp8>(p, t, n_hb, q_wg, w_all);
      gg::fence_proxy_async();  // q visible to wgmma after the barrier
    } else {
      if (me && n_hb == 1) load_q<D>(p, t, 0, lane, qf, w_s);
    }
    float scan_acc = 0.f;
    __syncthreads();

    // (lead_row is -1 only with nv_max == 0: no tile is loaded for it.)
    for (int s = 0; s < p.stages - 1; ++s) {
      if (s < n_tiles) {
        load_tile<D, TILE, kFp8, kWg>(tiles + s * STAGE_BYTES, p, lead_row, s_begin + s * TILE,
                                      s_end, s_valid[s]);
      }
      cp_async_commit();
    }
    for (int it = 0; it < n_tiles; ++it) {
      cp_async_wait_dyn(p.stages - 2);
      if constexpr (kWg && !kFp8) gg::fence_proxy_async();  // this thread's copies -> wgmma
      __syncthreads();  // tile `it` visible; stage (it-1) % stages free
      {
        const int nx = it + p.stages - 1;
        if (nx < n_tiles) {
          load_tile<D, TILE, kFp8, kWg>(tiles + (nx % p.stages) * STAGE_BYTES, p, lead_row,
                                        s_begin + nx * TILE, s_end, s_valid[nx % p.stages]);
        }
        cp_async_commit();
      }
      const unsigned char* raw = smem + (it % p.stages) * STAGE_BYTES;
      const float* key_scale = reinterpret_cast<const float*>(raw + TILE * D);  // FP8 only
      if constexpr (kFp8 && !kWg) {
        convert_fp8_tile<D, TILE>(raw, smem + p.stages * STAGE_BYTES);
        __syncthreads();  // the bf16 tile is complete (the next top barrier frees it again)
      }
      if (kWg || me) {  // (QPC 1: me)
        const uint32_t stage =
            kFp8 ? tiles + p.stages * STAGE_BYTES : tiles + (it % p.stages) * STAGE_BYTES;
        const int tile_s0 = s_begin + it * TILE;
        const u64 thr = kScanOnly ? 0ull : st->thr;
        // The 16 keys [s0, s0 + 16) of a warp: a / b = the lane's partial head sums of rows g /
        // g + 8 (whole warp calls).
        auto emit = [&](int s0, float a, float b) {
          a += __shfl_xor_sync(kFull, a, 1);
          a += __shfl_xor_sync(kFull, a, 2);
          b += __shfl_xor_sync(kFull, b, 1);
          b += __shfl_xor_sync(kFull, b, 2);
          const int s = s0 + g_lane + (tq & 1) * 8;  // lane tq 0: row g, tq 1: row g + 8
          float sc = (tq & 1) ? b : a;
          bool in_range = tq < 2 && s < hi;
          if (p.bt != nullptr && in_range) {  // a missing block hides the key
            const int r = s - tile_s0;                 // (load_tile found the blocks)
            in_range = (s_valid[it % p.stages][r / RPW] >> (r % RPW)) & 1u;
          }
          if constexpr (kFp8) {
            // score(k * scale) = scale * score(k) exactly (power-of-two scale > 0)
            if (in_range) sc *= key_scale[s - tile_s0];
          }
          if constexpr (kScanOnly) {
            if (in_range) scan_acc += sc;
          } else if constexpr (kHist) {
            // every entry of [s_begin, hi) gets its key (0: NaN or a missing block)
            if (tq < 2 && s < hi) {
              const uint32_t key = in_range ? score_key(sc) : 0u;
              p.hs_keys[static_cast<int64_t>(t) * p.hs_key_stride + s] = key;
              if (key != 0u) atomicAdd(hbins + (key >> kHistShift), 1u);
            }
          } else {
            u64 r = 0;
            const bool ok = in_range && make_rank(sc, s, r) && r >= thr;
            warp_append(ok, r, cand, st);
          }
        };
        if constexpr (kWg) {
          // warpgroup wg scores the tile's 64-key blocks wg, wg + 2 (TILE 256); warp w4 of
          // it owns rows [16 w4, 16 w4 + 16) of each block
          constexpr int MBW = TILE / 128;
          const int wg = warp >> 2, w4 = warp & 3;
          float a[MBW], b[MBW];
          if constexpr (kFp8) {
            score_wg_fp8<D, TILE>(raw, smem_u32(q_wg), w_all, n_hb, p.H, wg, lane, a, b);
          } else {
            score_wg<D, TILE>(stage, smem_u32(q_wg), w_all, n_hb, p.H, wg, tq, a, b);
          }
#pragma unroll
          for (int i = 0; i < MBW; ++i) {
            const int s0 = tile_s0 + (wg + 2 * i) * 64 + w4 * 16;
            if (s0 < hi) emit(s0, a[i], b[i]);  // warp-uniform
          }
        } else {
#pragma unroll 1
          for (int mi = 0; mi < MT; ++mi) {
            const int m = kw + WPQ * mi;
            const int s0 = tile_s0 + m * 16;
            if (s0 >= hi) break;  // warp-uniform; later m-tiles start even further
            float a = 0.f, b = 0.f;
#pragma unroll 1
            for (int hb = 0; hb < n_hb; ++hb) {
              if (n_hb > 1) load_q<D>(p, t, hb, lane, qf, w_s);
              const int hlim = p.H - hb * kHeadBlock;
              if (hlim >= kHeadBlock) score_mtile<D, false>(stage, m, lane, qf, w_s, hlim, a, b);
              else score_mtile<D, true>(stage, m, lane, qf, w_s, hlim, a, b);
            }
            emit(s0, a, b);
          }
        }
      }
      if constexpr (!kScanOnly && !kHist) {
        gsync<QPC>(qi);  // this tile's appends are done
        if (me && st->count > p.cap - TILE) {
          select_topk<QPC>(cand, st, hist, p.topk, gtid, qi, p.fast_tail);
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();

    if constexpr (kScanOnly) {
      if (me) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) scan_acc += __shfl_xor_sync(kFull, scan_acc, off);
        if (lane == 0) atomicAdd(p.scan_sum + t, scan_acc);
      }
    } else if (me && !kHist) {
      const int64_t slot = static_cast<int64_t>(t) * p.n_splits + j;
      finish_query<QPC>(p, cand, st, hist, t, gtid, qi, p.n_splits == 1,
                        p.ws_rank0 + slot * p.slot_stride, p.ws_count0 + slot);
    }
    __syncthreads();
  }

  if constexpr (kHist) {
    // (the loop ended with a barrier: every shared-memory count is in)
    // thread i flushes the fine bins [16 i, 16 i + 16); the 4 threads of a coarse bin add
    // their sums to it
    static_assert(kHistBins == kThreads * 16 && kFinePerCoarse == 4 * 16, "flush layout");
    uint32_t* const gh = p.hs_hist + static_cast<int64_t>(t) * kHistBins;
    unsigned part = 0u;
#pragma unroll
    for (int e4 = 0; e4 < 4; ++e4) {
      const uint4 c4 = reinterpret_cast<const uint4*>(hbins)[tid * 4 + e4];
      const unsigned c[4] = {c4.x, c4.y, c4.z, c4.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        part += c[e];
        if (c[e] != 0u) atomicAdd(gh + tid * 16 + e4 * 4 + e, c[e]);
      }
    }
    part += __shfl_xor_sync(kFull, part, 1);
    part += __shfl_xor_sync(kFull, part, 2);
    if ((tid & 3) == 0 && part != 0u) {
      atomicAdd(p.hs_coarse + static_cast<int64_t>(t) * kCoarseBins + tid / 4, part);
    }
    // Cooperative launch: the key tiles are free now (every cp.async waited for) and hold the
    // candidates of the final ranking; the candidate buffer (where hbins lived) serves the
    // fallback select.
    if (p.coop) {
      coop_select(p, t, j, s_nv[0], reinterpret_cast<u64*>(smem),
                  (p.stages * STAGE_BYTES + EXTRA_BYTES) / 8, cand, st, hist);
    }
    return;
  }
  if constexpr (!kScanOnly) {
    if (p.n_splits == 1) return;
    // Split-K style merge: the last CTA to arrive at a node merges its children.
    __threadfence();
    __syncthreads();
    const int node = j / p.fan1;
    if (tid == 0) {
      bool last;
      if (p.n_l1 > 1) {
        const int rest = p.n_splits - node * p.fan1;
        const int nch = rest < p.fan1 ? rest : p.fan1;
        last = atomicAdd(p.arrive1 + static_cast<int64_t>(g) * p.n_l1 + node, 1) == nch - 1;
      } else {
        last = atomicAdd(p.arrive_root + g, 1) == p.n_splits - 1;
      }
      s_flag = last ? 1 : 0;
    }
    __syncthreads();
    if (!s_flag) return;
    __threadfence();
    const bool my_q = t < p.T;
    if (p.n_l1 > 1) {
      const int c0 = node * p.fan1;
      const int c1 = c0 + p.fan1 < p.n_splits ? c0 + p.fan1 : p.n_splits;
      const int64_t slot1 = static_cast<int64_t>(t) * p.n_l1 + node;
      if (my_q) {
        merge_slots<QPC>(p, cand, st, hist, t, gtid, qi, p.ws_rank0, p.ws_count0, p.n_splits, c0,
                         c1, false, p.ws_rank1 + slot1 * p.slot_stride, p.ws_count1 + slot1);
      }
      __threadfence();
      __syncthreads();
      if (tid == 0) s_flag = atomicAdd(p.arrive_root + g, 1) == p.n_l1 - 1 ? 1 : 0;
      __syncthreads();
      if (!s_flag) return;
      __threadfence();
      if (my_q) {
        merge_slots<QPC>(p, cand, st, hist, t, gtid, qi, p.ws_rank1, p.ws_count1, p.n_l1, 0,
                         p.n_l1, true, nullptr, nullptr);
      }
    } else if (my_q) {
      merge_slots<QPC>(p, cand, st, hist, t, gtid, qi, p.ws_rank0, p.ws_count0, p.n_splits, 0,
                       p.n_splits, true, nullptr, nullptr);
    }
  }
}

// ------------------------------------------------------------------------------------------
// histogram select (second launch of a kHist plan)
// ------------------------------------------------------------------------------------------
// Appends the lanes' ranks with ok set to a global list (whole warp calls): one atomic per warp
// on *counter; positions >= limit are counted but not stored.
__device__ __forceinline__ void warp_append_global(bool ok, u64 rank, u64* list, int32_t* counter,
                                                   int limit) {
  const unsigned ball = __ballot_sync(kFull, ok);
  if (ball == 0) return;
  const int lane = threadIdx.x & 31;
  int base = 0;
  if (lane == 0) base = atomicAdd(counter, __popc(ball));
  base = __shfl_sync(kFull, base, 0);
  const int pos = base + __popc(ball & ((1u << lane) - 1u));
  if (ok && pos < limit) list[pos] = rank;
}

// Step 1 of the histogram select (whole CTA): the boundary bin b* of query t from its histogram
// (exact counts of its non-NaN visible keys per top-12-bit bin), the bin holding the topk-th
// largest key; fewer than topk keys lie in bins above it. With at most topk keys in all, -1
// (every key is kept). Warp 0 finds the coarse bin of the topk-th key from the 64 coarse
// counts, then b* among that coarse bin's 64 fine counts (two dependent reads of 256 bytes;
// reading all 4,096 fine counts in each of the ~132 CTAs took 4.5-7.5 us, globaltimer probe,
// H100). s_bstar: shared scratch.
__device__ int hist_boundary(const Params& p, int t, int* s_bstar) {
  const int tid = threadIdx.x, lane = tid & 31;
  const int k = p.topk;
  if (tid < 32) {
    // Lane l holds bins 2 l and 2 l + 1 of a 64-bin level; `above` = the keys in the bins of
    // higher lanes (higher scores), cum = the keys above the level's first bin. Returns (the
    // bin holding the k-th key or -1, the keys above that bin, the level's total).
    auto find = [&](const uint32_t* bins, int cum) {
      const int h0 = static_cast<int>(__ldcg(bins + 2 * lane));
      const int h1 = static_cast<int>(__ldcg(bins + 2 * lane + 1));
      const int tot = h0 + h1;
      int incl = tot;  // sum over lanes >= lane
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int v = __shfl_down_sync(kFull, incl, off);
        if (lane + off < 32) incl += v;
      }
      const int total = __shfl_sync(kFull, incl, 0);
      const int above = cum + incl - tot;
      const bool mine = above < k && above + tot >= k;  // one lane when cum < k <= cum + total
      const unsigned who = __ballot_sync(kFull, mine);
      int bin = -1, bin_above = 0;
      if (mine) {
        const bool hi = above + h1 >= k;
        bin = 2 * lane + (hi ? 1 : 0);
        bin_above = hi ? above : above + h1;
      }
      const int src = who != 0u ? __ffs(who) - 1 : 0;
      return make_int3(__shfl_sync(kFull, bin, src), __shfl_sync(kFull, bin_above, src), total);
    };
    const int3 coarse = find(p.hs_coarse + static_cast<int64_t>(t) * kCoarseBins, 0);
    int b = -1;
    if (coarse.z > k && coarse.x >= 0) {
      const int3 fine = find(p.hs_hist + static_cast<int64_t>(t) * kHistBins +
                                 coarse.x * kFinePerCoarse,
                             coarse.y);
      b = fine.x >= 0 ? coarse.x * kFinePerCoarse + fine.x : -1;
    }
    if (lane == 0) *s_bstar = b;
  }
  __syncthreads();
  return *s_bstar;
}

// Step 2 (whole CTA): chunk c of the n_splits chunks of query t's nv keys; keys in bins above
// bstar go to the winners (fewer than topk in all: the list hs_win), keys in bin bstar to the
// boundary candidates (hs_bnd, up to kBoundaryCap of them; hs_nbnd counts them all).
__device__ void hist_gather(const Params& p, int t, int c, int nv, int bstar) {
  const int tid = threadIdx.x;
  const int64_t chunk = (static_cast<int64_t>(nv) + p.n_splits - 1) / p.n_splits;
  const int64_t s0 = std::min<int64_t>(static_cast<int64_t>(c) * chunk, nv);
  const int64_t s1 = std::min<int64_t>(s0 + chunk, nv);
  const uint32_t* keys = p.hs_keys + static_cast<int64_t>(t) * p.hs_key_stride;
  u64* const win = p.hs_win + static_cast<int64_t>(t) * p.slot_stride;
  u64* const bnd = p.hs_bnd + static_cast<int64_t>(t) * kBoundaryCap;
  for (int64_t base = s0; base < s1; base += kThreads * kSelUnroll) {
    uint32_t v[kSelUnroll];
#pragma unroll
    for (int u = 0; u < kSelUnroll; ++u) {
      const int64_t s = base + u * kThreads + tid;
      v[u] = s < s1 ? __ldcg(keys + s) : 0u;
    }
#pragma unroll
    for (int u = 0; u < kSelUnroll; ++u) {
      const int s = static_cast<int>(base + u * kThreads + tid);  // < nv when v[u] != 0
      const int bin = static_cast<int>(v[u] >> kHistShift);
      const u64 r = key_rank(v[u], s);
      warp_append_global(v[u] != 0u && bin > bstar, r, win, p.hs_nwin + t, p.slot_stride);
      warp_append_global(v[u] != 0u && bin == bstar, r, bnd, p.hs_nbnd + t, kBoundaryCap);
    }
  }
}

// Grid: T x n_splits CTAs (query t = blockIdx.x / n_splits, chunk c = blockIdx.x % n_splits).
//  1. From the query's histogram every CTA finds the boundary bin b* (hist_boundary).
//  2. Each CTA reads its chunk of the query's keys: winners and boundary candidates
//     (hist_gather); keys below b* cannot be selected.
//  3. The last CTA of the query (arrival counter) loads the winners and the boundary
//     candidates into its buffer and sorts them (sort_small_desc, up to 2,048 of them; beyond
//     that, or in "legacy" mode, the tree path's exact select, sort_desc) and writes. If bin
//     b* held more than kBoundaryCap keys (heavy ties, e.g. a ReLU plateau of exact zeros),
//     it streams all of the query's keys instead, keeping those of bin b* with the same select
//     (exact as well, one CTA reading 4 B per entry).
// Ranks are the tree path's (score key << 32 | ~index), so the order contract is the same.
__global__ void __launch_bounds__(kThreads, 1) indexer_select_kernel(const Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int s_bstar, s_flag, s_nwin, s_nbnd;
  QState* const st = reinterpret_cast<QState*>(smem);
  int* const hist = reinterpret_cast<int*>(st + 1);
  u64* const cand = reinterpret_cast<u64*>(hist + 256);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Launched as a programmatic dependent of the scan grid: wait until that grid has completed
  // and its histogram / keys are visible (returns at once for a plain launch).
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif

  const int tid = threadIdx.x;
  const int t = static_cast<int>(blockIdx.x / p.n_splits);
  const int c = static_cast<int>(blockIdx.x % p.n_splits);
  const int k = p.topk;

  // 1. the boundary bin
  const int bstar = hist_boundary(p, t, &s_bstar);

  // 2. this CTA's chunk of the query's keys
  const int nv = __ldcg(p.hs_nv + t);
  hist_gather(p, t, c, nv, bstar);
  const uint32_t* keys = p.hs_keys + static_cast<int64_t>(t) * p.hs_key_stride;
  u64* const win = p.hs_win + static_cast<int64_t>(t) * p.slot_stride;
  u64* const bnd = p.hs_bnd + static_cast<int64_t>(t) * kBoundaryCap;

  // 3. the last CTA of the query selects
  __threadfence();
  __syncthreads();
  if (tid == 0) s_flag = atomicAdd(p.hs_arrive + t, 1) == p.n_splits - 1 ? 1 : 0;
  __syncthreads();
  if (!s_flag) return;
  __threadfence();
  if (tid == 0) {
    const int nw = atomicAdd(p.hs_nwin + t, 0);
    s_nwin = nw < p.slot_stride ? nw : p.slot_stride;  // (nw < topk by construction)
    s_nbnd = atomicAdd(p.hs_nbnd + t, 0);
    st->count = 0;
    st->thr = 0;
  }
  __syncthreads();
  const int n_win = s_nwin, n_bnd = s_nbnd;
  for (int i = tid; i < n_win; i += kThreads) cand[i] = __ldcg(win + i);
  if (n_bnd <= kBoundaryCap) {
    for (int i = tid; i < n_bnd; i += kThreads) cand[n_win + i] = __ldcg(bnd + i);
    if (tid == 0) st->count = n_win + n_bnd;
    __syncthreads();
  } else {
    if (tid == 0) st->count = n_win;
    __syncthreads();
    constexpr int kRound = kThreads * kSelUnroll;
    for (int64_t base = 0; base < nv; base += kRound) {
      const u64 thr = st->thr;
      uint32_t v[kSelUnroll];
#pragma unroll
      for (int u = 0; u < kSelUnroll; ++u) {
        const int64_t s = base + u * kThreads + tid;
        v[u] = s < nv ? __ldcg(keys + s) : 0u;
      }
#pragma unroll
      for (int u = 0; u < kSelUnroll; ++u) {
        const int s = static_cast<int>(base + u * kThreads + tid);
        const u64 r = key_rank(v[u], s);
        const bool ok = v[u] != 0u && static_cast<int>(v[u] >> kHistShift) == bstar && r >= thr;
        warp_append(ok, r, cand, st);
      }
      __syncthreads();
      const int now = st->count;
      __syncthreads();
      if (now > p.sel_cap - kRound) select_topk<1>(cand, st, hist, k, tid, 0, p.fast_tail);
    }
  }
  const int count = st->count;  // (the last write to it was followed by a barrier)
  if (p.fast_tail && count <= kThreads * 8) {
    // The usual case (the winners and bin b*: a few hundred to ~1,000 candidates): sort them
    // all in registers; the first min(count, topk) are the selection, in order.
    if (p.merge_sort) {
      if (count <= kThreads * 4) {
        sort_merge_write<4>(p, cand, count, t);
      } else {
        sort_merge_write<8>(p, cand, count, t);
      }
      return;
    }
    if (count <= kThreads * 4) {
      sort_small_desc<4>(cand, count);
    } else {
      sort_small_desc<8>(cand, count);
    }
    write_indices<1>(p, cand, count < k ? count : k, t, tid);
    return;
  }
  if (count > k) select_topk<1>(cand, st, hist, k, tid, 0, p.fast_tail);
  const int n = st->count < k ? st->count : k;
  sort_desc<1>(cand, n, tid, 0, p.fast_tail);
  write_indices<1>(p, cand, n, t, tid);
}

// Merge mode "coop": the selection of a kHist plan inside the scan grid, launched
// cooperatively (all T x n_splits CTAs co-resident; query t, chunk j = this CTA's split). After
// the scan every CTA has added its histogram to the query's (and written its score keys):
//   1. grid barrier; every CTA finds b* (hist_boundary) and gathers the winners and boundary
//      candidates of its chunk (hist_gather), as the select kernel's CTAs do;
//   2. grid barrier; every CTA loads all n = n_win + n_bnd candidates (n_win < topk, plus bin b*:
//      typically topk + a few hundred) into `big` (the free key tiles, big_cap entries) and
//      ranks its 1/n_splits slice of them: position = the number of larger ranks (ranks are
//      distinct, so the positions of the n candidates are a permutation of [0, n)); a candidate
//      at position < topk writes its index there, and the CTAs pad [min(n, topk), topk) with -1.
//      The output equals the sorted top-k of the two-launch path exactly (same ranks, same
//      total order), with no select, no sort and no last-CTA step.
//   3. Bin b* too full (more than kBoundaryCap keys, or n > big_cap): the query's CTA j = 0 runs
//      the select kernel's fallback on its own candidate buffer `cand` (p.cap entries, >= topk +
//      kThreads * kSelUnroll): the winners, then the boundary list or (overflow) a scan of all
//      of the query's keys for bin b*, compacted with select_topk whenever the buffer could
//      overflow, then sort_desc and write_indices.
// The grid barriers are cooperative groups' (no workspace counters; the launch guarantees
// co-residency, and every CTA of the grid reaches both barriers).
__device__ void coop_select(const Params& p, int t, int j, int nv, u64* big, int big_cap,
                            u64* cand, QState* st, int* hist) {
  namespace cg = cooperative_groups;
  __shared__ int s_bstar, s_nwin, s_nbnd;
  const int tid = threadIdx.x;
  const int k = p.topk;
  cg::grid_group grid = cg::this_grid();
  grid.sync();  // every CTA's histogram counts and score keys are in
  const int bstar = hist_boundary(p, t, &s_bstar);
  hist_gather(p, t, j, nv, bstar);
  grid.sync();  // every CTA's winners and boundary candidates are in
  if (tid == 0) {
    const int nw = __ldcg(p.hs_nwin + t);
    s_nwin = nw < p.slot_stride ? nw : p.slot_stride;  // (nw < topk by construction)
    s_nbnd = __ldcg(p.hs_nbnd + t);
  }
  __syncthreads();
  const int n_win = s_nwin, n_bnd = s_nbnd;
  const u64* const win = p.hs_win + static_cast<int64_t>(t) * p.slot_stride;
  const u64* const bnd = p.hs_bnd + static_cast<int64_t>(t) * kBoundaryCap;
  int32_t* const o = p.out + static_cast<int64_t>(t) * p.out_st;

  if (n_bnd <= kBoundaryCap && n_win + n_bnd <= big_cap) {
    const int n = n_win + n_bnd;
    for (int i = tid; i < n; i += kThreads) {
      big[i] = i < n_win ? __ldcg(win + i) : __ldcg(bnd + (i - n_win));
    }
    __syncthreads();
    // this CTA's slice [i0, i0 + n_my); tpi threads per candidate (a power of two <= 32, each
    // scans n / tpi ranks; consecutive lanes of a group read consecutive ranks)
    const int per = (n + p.n_splits - 1) / p.n_splits;
    const int i0 = j * per < n ? j * per : n;
    const int n_my = (i0 + per < n ? i0 + per : n) - i0;
    int tpi = 32;
    while (tpi > 1 && tpi * n_my > kThreads) tpi >>= 1;
    const int groups = kThreads / tpi;
    const int part = tid & (tpi - 1), grp = tid / tpi;
    for (int base = 0; base < n_my; base += groups) {  // CTA-uniform trip count
      const int item = base + grp;
      const u64 mine = item < n_my ? big[i0 + item] : ~0ull;
      int cnt = 0;
#pragma unroll 4
      for (int m = part; m < n; m += tpi) cnt += big[m] > mine ? 1 : 0;
      for (int off = 1; off < tpi; off <<= 1) cnt += __shfl_xor_sync(kFull, cnt, off);
      if (item < n_my && part == 0 && cnt < k) o[cnt] = rank_index(mine);
    }
    const int n_out = n < k ? n : k;
    for (int i = n_out + j * kThreads + tid; i < k; i += p.n_splits * kThreads) o[i] = -1;
    return;
  }

  // Fallback: one CTA per query selects as the select kernel's last CTA does.
  if (j != 0) return;
  if (tid == 0) {
    st->count = n_win;
    st->thr = 0;
  }
  for (int i = tid; i < n_win; i += kThreads) cand[i] = __ldcg(win + i);
  __syncthreads();
  const bool all_keys = n_bnd > kBoundaryCap;  // the list is incomplete: scan every key
  const int64_t n_src = all_keys ? nv : n_bnd;
  const uint32_t* const keys = p.hs_keys + static_cast<int64_t>(t) * p.hs_key_stride;
  constexpr int kRound = kThreads * kSelUnroll;
  for (int64_t base = 0; base < n_src; base += kRound) {
    const u64 thr = st->thr;
    u64 r[kSelUnroll];
    bool ok[kSelUnroll];
#pragma unroll
    for (int u = 0; u < kSelUnroll; ++u) {
      const int64_t s = base + u * kThreads + tid;
      if (all_keys) {
        const uint32_t v = s < n_src ? __ldcg(keys + s) : 0u;
        r[u] = key_rank(v, static_cast<int>(s));
        ok[u] = v != 0u && static_cast<int>(v >> kHistShift) == bstar && r[u] >= thr;
      } else {
        r[u] = s < n_src ? __ldcg(bnd + s) : 0ull;
        ok[u] = s < n_src && r[u] >= thr;
      }
    }
#pragma unroll
    for (int u = 0; u < kSelUnroll; ++u) warp_append(ok[u], r[u], cand, st);
    __syncthreads();
    const int now = st->count;
    __syncthreads();
    if (now > p.cap - kRound) select_topk<1>(cand, st, hist, k, tid, 0, p.fast_tail);
  }
  if (st->count > k) select_topk<1>(cand, st, hist, k, tid, 0, p.fast_tail);
  const int n = st->count < k ? st->count : k;
  sort_desc<1>(cand, n, tid, 0, p.fast_tail);
  write_indices<1>(p, cand, n, t, tid);
}

// ------------------------------------------------------------------------------------------
// short-row decode path: one thread-block cluster per query
// ------------------------------------------------------------------------------------------
// Why: with a few thousand entries per query (batch 1-8 decode) the split / merge path above
// spends ~25 us in parts that do not scale with the keys: the memset launch, the per-split
// candidate lists in global memory, the arrival counter, and the last CTA's merge (a 64-bit
// radix select over all children's candidates, a bitonic sort of topk ranks with CTA
// barriers, then the index writes), plus ~128 uncoalesced 4-byte q loads per thread. Here the
// cs CTAs of one query form a cluster (sm_90) and exchange everything through distributed
// shared memory; one launch, no workspace, no global atomics:
//
//   1. q (all heads) is copied to shared memory with cp.async next to the first key tiles and
//      each warp takes its mma B fragments from there with ldmatrix (32 ldmatrix.x4 per warp
//      instead of 128 scattered global loads). CTA r of the cluster scores keys
//      [r L, r L + L) of the query's row, L = ceil(n_valid / cs) rounded up to 16 (balanced
//      on n_valid, which the host cannot see: the cluster size follows the capacity C), with
//      the scoring code of the main kernel (128-key tiles, one m-tile per warp), and keeps
//      each key's 32-bit score key (score_key: monotone in the score, 0 for NaN / hidden) in
//      shared memory.
//   2. One exact radix select of the topk-th largest score key over the whole cluster, 8-bit
//      digits from the top: each CTA counts its keys that match the prefix so far in a local
//      256-bin histogram, adds the non-zero bins into every CTA's histogram of that round
//      (red.shared::cluster), one cluster barrier, and every warp of every CTA reads the same
//      summed bins and takes the same decision (no broadcast step). It stops as soon as the
//      digit's bin holds exactly the ranks still needed (typically after 2-3 rounds with real
//      scores); after 4 rounds the key T is exact and the keys equal to T are ties.
//   3. Winners: keys > T' (T' = the prefix, or T + 1 for ties) go to a list of 64-bit ranks
//      (the main kernel's rank: score key << 32 | ~index); keys == T (ties only) to a list of
//      indices, both in index order. Each CTA publishes its two counts to every CTA (one
//      cluster barrier); a CTA's share of the ties is what is left of the needed count after
//      the CTAs of lower ranges (lower indices), so "lowest index first among equal scores"
//      holds exactly.
//   4. Every CTA copies all winners (W = min(topk, non-NaN visible keys) ranks) into its own
//      shared memory, ranks its 1/cs slice of them by counting the larger ranks (ranks are
//      distinct, so the positions are a permutation of [0, W)), and writes index i to slot
//      position(i) directly: no sort and no barriers; slots [W, topk) get -1.
//
// Exactly the contract of the main path: descending score, lowest index first on ties, NaN
// and hidden keys never selected, -0.0 == +0.0 (score_key), -1 padding, rows outside range give
// n_valid 0 (nothing read). The host takes this path for decode plans (one query per CTA) with
// T <= 16 queries, H <= 128 heads and C <= cs x 1024 (auto merge mode; DSV4_INDEXER_TOPK_SHORT=0
// turns it off). Cluster barriers: one at the start (overlapped with the loads), one per radix
// round, one for the counts, one before exit (no CTA may leave while peers read its shared
// memory; overlapped with the ranking).
// Shared-memory layout of indexer_short_kernel (bytes; the same on the host). The key tiles
// are dead after the scoring, so the winner lists and the gathered winners reuse them.
template <int D, bool kFp8>
struct ShortLayout {
  static constexpr int kTileBytes = kShortTile * D * 2;
  static constexpr int kStageBytes = kFp8 ? kShortTile * D + kShortTile * 4 : kTileBytes;
  static constexpr int kTiles = kShortStages * kStageBytes + (kFp8 ? kTileBytes : 0);
  // [ranks of keys > T': kShortMaxKeys u64][indices of ties: kShortMaxKeys int][all winners]
  static constexpr int kElist = kShortMaxKeys * 8;
  static constexpr int kGather = kShortMaxKeys * 12;
  static constexpr int kLists = kGather + static_cast<int>(kIndexerMaxTopk) * 8;
  static constexpr int kRegion = kTiles > kLists ? kTiles : kLists;
  static constexpr int kQ = (kRegion + 127) / 128 * 128;     // q: [128 heads][D] bf16, swizzled
  static constexpr int kW = kQ + kShortMaxHeads * D * 2;     // weights: [128] fp32
  static constexpr int kKeys = kW + kShortMaxHeads * 4;      // score keys: [kShortMaxKeys] u32
  static constexpr int kHl = kKeys + kShortMaxKeys * 4;      // local histogram [256]
  static constexpr int kRh = kHl + 256 * 4;                  // cluster sums [rounds][256]
  static constexpr int kPub = kRh + kShortRounds * 256 * 4;  // counts [cluster][2]
  static constexpr int kBytes = kPub + kShortMaxCluster * 2 * 4;
};

// q fragments of head block hb (64 heads) from the swizzled shared-memory copy: ldmatrix.x4
// matrix m of lane group m = rows h = nt * 8 + (lane & 7), 16-byte chunk 2 ks + m, so the four
// result registers are qf[ks][nt][0..1] and qf[ks + 1][nt][0..1] (the layout load_q builds from
// global memory).
template <int D>
__device__ __forceinline__ void q_frags_smem(uint32_t q_block, int lane,
                                             uint32_t (&qf)[D / 16][8][2]) {
  constexpr int RB = D * 2;
  const int mat = lane >> 3, r = lane & 7;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    const uint32_t row = q_block + (nt * 8 + r) * RB;
#pragma unroll
    for (int ks = 0; ks < D / 16; ks += 2) {
      const int chunk = ks * 2 + mat;
      ldmatrix_x4(row + ((chunk ^ r) << 4), qf[ks][nt][0], qf[ks][nt][1], qf[ks + 1][nt][0],
                  qf[ks + 1][nt][1]);
    }
  }
}

// The radix digit of one round, from the cluster-summed 256-bin histogram h (whole warp; every
// warp computes the same): the digit d whose bin holds the needed-th largest key, gt = keys in
// higher bins, in = keys in bin d, total = keys in all bins. needed > total: d = gt = in = 0.
__device__ __forceinline__ void short_digit(const uint32_t* h, int needed, int lane, int& d,
                                            int& gt, int& in, int& total) {
  const uint4 v0 = *reinterpret_cast<const uint4*>(h + lane * 8);
  const uint4 v1 = *reinterpret_cast<const uint4*>(h + lane * 8 + 4);
  const int c[8] = {static_cast<int>(v0.x), static_cast<int>(v0.y), static_cast<int>(v0.z),
                    static_cast<int>(v0.w), static_cast<int>(v1.x), static_cast<int>(v1.y),
                    static_cast<int>(v1.z), static_cast<int>(v1.w)};
  int tot = 0;
#pragma unroll
  for (int e = 0; e < 8; ++e) tot += c[e];
  int incl = tot;  // keys in the bins of lanes >= lane
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int v = __shfl_down_sync(kFull, incl, off);
    if (lane + off < 32) incl += v;
  }
  total = __shfl_sync(kFull, incl, 0);
  const int above = incl - tot;
  const bool mine = above < needed && incl >= needed;
  int dd = 0, g = 0, n = 0;
  if (mine) {
    int cum = above;
#pragma unroll
    for (int e = 7; e >= 0; --e) {
      if (cum + c[e] >= needed) {
        dd = lane * 8 + e;
        g = cum;
        n = c[e];
        break;
      }
      cum += c[e];
    }
  }
  const unsigned bal = __ballot_sync(kFull, mine);
  const int src = bal != 0u ? __ffs(bal) - 1 : 0;
  d = __shfl_sync(kFull, dd, src);
  gt = __shfl_sync(kFull, g, src);
  in = __shfl_sync(kFull, n, src);
}

// Grid: T clusters of cs CTAs (cluster dimension cs along x, set at launch); query t =
// blockIdx.x / cs. See the section comment.
template <int D, bool kFp8>
__global__ void __launch_bounds__(kThreads, 1) indexer_short_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using Ly = ShortLayout<D, kFp8>;
  constexpr int TILE = kShortTile;
  constexpr int S = kShortStages;
  constexpr int RB = D * 2;
  static_assert(TILE == kWarps * 16, "one m-tile per warp and stage");
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int s_row, s_nv;
  __shared__ int s_wcnt[kWarps][2];
  __shared__ int s_off[kShortMaxCluster + 1], s_gtc[kShortMaxCluster];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g_lane = lane >> 2, tq = lane & 3;
  const int cs = static_cast<int>(cluster_nctarank());
  const int crank = static_cast<int>(cluster_ctarank());
  const int t = static_cast<int>(blockIdx.x) / cs;
  const uint32_t sbase = smem_u32(smem);
  const uint32_t q_s = sbase + Ly::kQ;
  float* const w_s = reinterpret_cast<float*>(smem + Ly::kW);
  uint32_t* const skeys = reinterpret_cast<uint32_t*>(smem + Ly::kKeys);
  uint32_t* const hl = reinterpret_cast<uint32_t*>(smem + Ly::kHl);
  uint32_t* const rh = reinterpret_cast<uint32_t*>(smem + Ly::kRh);
  int* const pub = reinterpret_cast<int*>(smem + Ly::kPub);
  const int n_hb = (p.H + kHeadBlock - 1) / kHeadBlock;  // 1 or 2 (host)

  // ---- 1. prologue: q copy first (cp.async group 0), then the row, then the key tiles ----
  {
    constexpr int NCH = D / 8;  // 16-byte chunks per q row
    const __nv_bfloat16* qt = p.q + static_cast<int64_t>(t) * p.q_st;
    for (int i = tid; i < n_hb * kHeadBlock * NCH; i += kThreads) {
      const int h = i / NCH, c = i % NCH;
      const uint32_t dst = q_s + h * RB + ((c ^ (h & 7)) << 4);
      if (h < p.H) {
        const __nv_bfloat16* src = qt + static_cast<int64_t>(h) * p.q_sh + c * 8;
        if (p.q_vec16) {
          cp_async16(dst, src);
        } else {
#pragma unroll
          for (int u = 0; u < 4; ++u) cp_async4(dst + 4 * u, src + 2 * u);
        }
      } else {  // padded heads: q = 0 (their weight is 0 and score_mtile masks them)
        *reinterpret_cast<uint4*>(smem + (dst - sbase)) = make_uint4(0, 0, 0, 0);
      }
    }
    cp_async_commit();
  }
  if (tid < kShortMaxHeads) {
    w_s[tid] = tid < p.H ? __ldg(p.w + static_cast<int64_t>(t) * p.w_st + tid) : 0.f;
  }
  for (int i = tid; i < kShortRounds * 256; i += kThreads) rh[i] = 0u;
  hl[tid] = 0u;  // (256 threads = 256 bins)
  if (tid == 0) {
    int r = p.rows[t];
    int nv = p.n_valid[t];
    nv = nv < 0 ? 0 : (nv > p.C ? p.C : nv);
    if (r < 0 || r >= p.B) {
      r = -1;
      nv = 0;
    }
    s_row = r;
    s_nv = nv;
  }
  // Start barrier, first half: this CTA's histograms are zeroed (the peers add into them only
  // after the matching wait, just before the first radix round).
  cluster_arrive();
  __syncthreads();
  const int row = s_row, nv = s_nv;
  int L = (nv + cs - 1) / cs;
  L = (L + 15) / 16 * 16;
  const int s_begin = crank * L < nv ? crank * L : nv;
  const int s_end = s_begin + L < nv ? s_begin + L : nv;
  const int len = s_end - s_begin;  // <= kShortMaxKeys (host: C <= cs * kShortMaxKeys)
  const int n_tiles = (len + TILE - 1) / TILE;
  for (int s = 0; s < S - 1; ++s) {
    if (s < n_tiles) {
      load_tile<D, TILE, kFp8>(sbase + s * Ly::kStageBytes, p, row, s_begin + s * TILE, s_end);
    }
    cp_async_commit();
  }
  cp_async_wait<S - 1>();  // group 0 (q) has landed; the key tiles are still in flight
  __syncthreads();
  uint32_t qf[D / 16][8][2];
  if (n_hb == 1) q_frags_smem<D>(q_s, lane, qf);

  // ---- scoring: warp w scores m-tile w of each 128-key tile ----
  for (int it = 0; it < n_tiles; ++it) {
    cp_async_wait<S - 2>();
    __syncthreads();  // tile `it` visible; stage (it - 1) % S free
    {
      const int nx = it + S - 1;
      if (nx < n_tiles) {
        load_tile<D, TILE, kFp8>(sbase + (nx % S) * Ly::kStageBytes, p, row, s_begin + nx * TILE,
                                 s_end);
      }
      cp_async_commit();
    }
    const unsigned char* raw = smem + (it % S) * Ly::kStageBytes;
    const float* key_scale = reinterpret_cast<const float*>(raw + TILE * D);  // FP8 only
    if constexpr (kFp8) {
      convert_fp8_tile<D, TILE>(raw, smem + S * Ly::kStageBytes);
      __syncthreads();
    }
    const uint32_t stage = kFp8 ? sbase + S * Ly::kStageBytes : sbase + (it % S) * Ly::kStageBytes;
    const int tile_s0 = s_begin + it * TILE;
    const int s0 = tile_s0 + warp * 16;
    if (s0 < s_end) {  // warp-uniform
      float a = 0.f, b = 0.f;
#pragma unroll 1
      for (int hb = 0; hb < n_hb; ++hb) {
        if (n_hb > 1) q_frags_smem<D>(q_s + hb * kHeadBlock * RB, lane, qf);
        const int hlim = p.H - hb * kHeadBlock;
        if (hlim >= kHeadBlock) {
          score_mtile<D, false>(stage, warp, lane, qf, w_s + hb * kHeadBlock, hlim, a, b);
        } else {
          score_mtile<D, true>(stage, warp, lane, qf, w_s + hb * kHeadBlock, hlim, a, b);
        }
      }
      a += __shfl_xor_sync(kFull, a, 1);
      a += __shfl_xor_sync(kFull, a, 2);
      b += __shfl_xor_sync(kFull, b, 1);
      b += __shfl_xor_sync(kFull, b, 2);
      const int s = s0 + g_lane + (tq & 1) * 8;  // lane tq 0: row g, tq 1: row g + 8
      if (tq < 2 && s < s_end) {
        float sc = (tq & 1) ? b : a;
        bool vis = true;
        if (p.bt != nullptr) {
          int64_t blk;
          int e;
          vis = key_place(p, row, s, blk, e);  // a missing block hides the key
        }
        if constexpr (kFp8) {
          if (vis) sc *= key_scale[s - tile_s0];
        }
        skeys[s - s_begin] = vis ? score_key(sc) : 0u;
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // skeys complete; the tile region is free

  // ---- 2. cluster radix select of the topk-th largest score key ----
  uint32_t prefix = 0u, thr = 1u, eq_key = 0u;  // winners: key >= thr, plus ties key == eq_key
  int needed = p.topk, needed_eq = 0;
  cluster_wait();  // start barrier: every CTA of the cluster runs and has zeroed rh
#pragma unroll 1
  for (int r = 0; r < kShortRounds; ++r) {
    const int lo = 24 - 8 * r;
    const uint32_t himask = r == 0 ? 0u : (~0u << (lo + 8));
    for (int base = 0; base < len; base += kThreads) {
      const int i = base + tid;
      const uint32_t key = i < len ? skeys[i] : 0u;
      const int bin =
          (key != 0u && (key & himask) == prefix) ? static_cast<int>((key >> lo) & 0xffu) : -1;
      // one shared atomic per distinct bin of the warp (the first rounds put a warp's keys
      // into a few bins: sign and exponent)
      const unsigned peers = __match_any_sync(kFull, bin);
      if (bin >= 0 && lane == __ffs(peers) - 1) atomicAdd(hl + bin, __popc(peers));
    }
    __syncthreads();
    {
      const uint32_t v = hl[tid];
      if (v != 0u) {
        hl[tid] = 0u;  // (the next round's atomics come after the cluster barrier below)
        const uint32_t a = smem_u32(rh + r * 256 + tid);
        for (int c = 0; c < cs; ++c) cluster_red_add(cluster_map(a, c), v);
      }
    }
    cluster_arrive();
    cluster_wait();  // every CTA's bins are in every CTA's rh[r]
    int d, gt, in, total;
    short_digit(rh + r * 256, needed, lane, d, gt, in, total);
    if (r == 0 && total <= p.topk) break;  // every non-NaN visible key wins (thr = 1)
    prefix |= static_cast<uint32_t>(d) << lo;
    needed -= gt;
    if (in == needed) {  // all of bin d wins: exactly the keys >= prefix
      thr = prefix;
      break;
    }
    if (lo == 0) {  // T = prefix exactly, more keys equal to T than still needed: ties
      thr = prefix + 1u;
      eq_key = prefix;
      needed_eq = needed;
      break;
    }
  }

  // ---- 3. this CTA's winners in index order: ranks of keys >= thr, indices of ties ----
  u64* const glist = reinterpret_cast<u64*>(smem);
  int* const elist = reinterpret_cast<int*>(smem + Ly::kElist);
  {
    const int lw = ((len + kWarps - 1) / kWarps + 31) / 32 * 32;  // warp w: [w lw, w lw + lw)
    const int w0 = warp * lw < len ? warp * lw : len;
    const int w1 = w0 + lw < len ? w0 + lw : len;
    int cg = 0, ce = 0;
    for (int i0 = w0; i0 < w1; i0 += 32) {
      const uint32_t key = i0 + lane < w1 ? skeys[i0 + lane] : 0u;
      cg += __popc(__ballot_sync(kFull, key >= thr));  // (thr >= 1: key 0 never counts)
      ce += __popc(__ballot_sync(kFull, eq_key != 0u && key == eq_key));
    }
    if (lane == 0) {
      s_wcnt[warp][0] = cg;
      s_wcnt[warp][1] = ce;
    }
    __syncthreads();
    int og = 0, oe = 0, ng = 0, ne = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      ng += s_wcnt[w][0];
      ne += s_wcnt[w][1];
      og += w < warp ? s_wcnt[w][0] : 0;
      oe += w < warp ? s_wcnt[w][1] : 0;
    }
    const unsigned lt = (1u << lane) - 1u;
    for (int i0 = w0; i0 < w1; i0 += 32) {
      const int i = i0 + lane;
      const uint32_t key = i < w1 ? skeys[i] : 0u;
      const bool isg = key >= thr, ise = eq_key != 0u && key == eq_key;
      const unsigned bg = __ballot_sync(kFull, isg), be = __ballot_sync(kFull, ise);
      if (isg) glist[og + __popc(bg & lt)] = key_rank(key, s_begin + i);
      if (ise) elist[oe + __popc(be & lt)] = s_begin + i;
      og += __popc(bg);
      oe += __popc(be);
    }
    if (tid < cs) {  // publish this CTA's counts in slot crank of CTA tid
      const uint32_t a = cluster_map(smem_u32(pub + 2 * crank), tid);
      cluster_st_u32(a, static_cast<uint32_t>(ng));
      cluster_st_u32(a + 4, static_cast<uint32_t>(ne));
    }
  }
  cluster_arrive();
  cluster_wait();  // every CTA's counts and lists are complete

  // Offsets of each CTA's winners in the gathered array: its ranks, then its share of the ties
  // (what the lower ranges left of needed_eq: lowest indices first).
  if (warp == 0) {
    const int g = lane < cs ? pub[2 * lane] : 0, e = lane < cs ? pub[2 * lane + 1] : 0;
    int ie = e;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int v = __shfl_up_sync(kFull, ie, off);
      if (lane >= off) ie += v;
    }
    int allow = needed_eq - (ie - e);
    allow = allow < 0 ? 0 : (allow > e ? e : allow);
    const int n = g + allow;
    int in = n;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int v = __shfl_up_sync(kFull, in, off);
      if (lane >= off) in += v;
    }
    if (lane < cs) {
      s_off[lane] = in - n;
      s_gtc[lane] = g;
    }
    if (lane == cs - 1) s_off[cs] = in;
  }
  __syncthreads();
  const int W = s_off[cs];  // = min(topk, non-NaN visible keys)

  // ---- 4. gather all winners, rank this CTA's slice, write ----
  u64* const G = reinterpret_cast<u64*>(smem + Ly::kGather);
  {
    constexpr int kU = 4;
    for (int base = 0; base < W; base += kThreads * kU) {
      u64 v[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int i = base + u * kThreads + tid;
        v[u] = 0ull;
        if (i < W) {
          int c = 0;
          while (s_off[c + 1] <= i) ++c;
          const int j = i - s_off[c];
          if (j < s_gtc[c]) {
            v[u] = cluster_ld_u64(cluster_map(sbase + j * 8, c));
          } else {
            const uint32_t a = cluster_map(sbase + Ly::kElist + (j - s_gtc[c]) * 4, c);
            v[u] = key_rank(eq_key, static_cast<int>(cluster_ld_u32(a)));
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int i = base + u * kThreads + tid;
        if (i < W) G[i] = v[u];
      }
    }
  }
  // Exit barrier, first half: this CTA reads no peer memory any more (a CTA may exit only
  // when no peer reads its shared memory: the wait is at the end).
  cluster_arrive();
  __syncthreads();
  {
    // Position of winner i = number of larger ranks (distinct). CTA crank ranks winners
    // [crank per, crank per + per), tpi threads per winner (each scans W / tpi ranks,
    // consecutive lanes read consecutive ranks: conflict-free).
    const int per = (W + cs - 1) / cs;
    const int i0 = crank * per < W ? crank * per : W;
    const int n_my = (i0 + per < W ? i0 + per : W) - i0;
    int tpi = 32;
    while (tpi > 1 && tpi * n_my > kThreads) tpi >>= 1;
    const int groups = kThreads / tpi;
    const int part = tid & (tpi - 1), grp = tid / tpi;
    int32_t* const o = p.out + static_cast<int64_t>(t) * p.out_st;
    for (int base = 0; base < n_my; base += groups) {
      const int item = base + grp;
      const u64 mine = item < n_my ? G[i0 + item] : ~0ull;
      int cnt = 0;
#pragma unroll 4
      for (int j = part; j < W; j += tpi) cnt += G[j] > mine ? 1 : 0;
      for (int off = 1; off < tpi; off <<= 1) cnt += __shfl_xor_sync(kFull, cnt, off);
      if (item < n_my && part == 0) o[cnt] = rank_index(mine);
    }
    for (int i = W + crank * kThreads + tid; i < p.topk; i += cs * kThreads) o[i] = -1;
  }
  cluster_wait();
#else
  // Compiled for an architecture without clusters (e.g. PTX of compute_80 JIT-compiled on an
  // H100): the host never selects this kernel then (short_max_clusters checks the function's
  // PTX version), but should it run, it must fail loudly rather than return without writing
  // the indices.
  __trap();
#endif
}

// ------------------------------------------------------------------------------------------
// host side: launch plan
// ------------------------------------------------------------------------------------------
struct DevInfo {
  int sms = 0;
  int max_smem = 0;
  int cc_major = 0;
};

// Cached per device (successful queries only). A slot is filled by the one thread that claims
// it (state 0 -> 1) and published by a release store of 2, which a reader's acquire load pairs
// with: a reader that sees 2 sees all three fields, never a half-written entry. Threads that
// lose the claim use their own query's result.
cudaError_t device_info(int device, DevInfo& di) {
  static DevInfo cache[64];
  static std::atomic<int> state[64];  // 0 empty, 1 being filled, 2 filled
  const bool slot = device >= 0 && device < 64;
  if (slot && state[device].load(std::memory_order_acquire) == 2) {
    di = cache[device];
    return cudaSuccess;
  }
  DevInfo q;
  cudaError_t e = cudaDeviceGetAttribute(&q.sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&q.max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&q.cc_major, cudaDevAttrComputeCapabilityMajor, device);
  if (e != cudaSuccess) return e;
  di = q;
  int empty = 0;
  if (slot && state[device].compare_exchange_strong(empty, 1, std::memory_order_relaxed)) {
    cache[device] = q;
    state[device].store(2, std::memory_order_release);
  }
  return cudaSuccess;
}

struct Plan {
  bool ok = false;
  int qpc = 1, n_groups = 0, n_splits = 1, fan1 = 1, n_l1 = 1;
  int slot_stride = 0, cap = 0, stages = 0, min_chunk = 0, tile = 128;
  size_t smem = 0;
  size_t off_arrive1 = 0, off_root = 0, memset_bytes = 0;
  size_t off_count0 = 0, off_count1 = 0, off_rank0 = 0, off_rank1 = 0, ws_bytes = 0;
  // Histogram select (hist): the zeroed region [0, memset_bytes) holds the bins and counters.
  bool hist = false;
  // wgmma scan (kWg kernels): chosen per call (where eligible unless DSV4_INDEXER_WGMMA=0); its
  // shared memory (q + alignment pad) is in smem, so it may have fewer stages / a smaller cap.
  // Nothing of the workspace layout depends on it.
  bool wg = false;
  int sel_cap = 0;
  size_t sel_smem = 0;
  size_t off_hs_hist = 0, off_hs_arrive = 0, off_hs_nwin = 0, off_hs_nbnd = 0, off_hs_coarse = 0;
  size_t off_hs_nv = 0, off_hs_keys = 0, off_hs_win = 0, off_hs_bnd = 0;
};

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

bool args_ok(int64_t T, int64_t B, int64_t C, int64_t H, int64_t D, int64_t topk) {
  return T >= 0 && T <= INT_MAX && B >= 0 && B <= INT_MAX && C >= 0 && C <= INT_MAX && H >= 1 &&
         H <= INT_MAX / 2 && (D == 64 || D == 128) && topk >= 1 && topk <= kIndexerMaxTopk;
}

Plan make_plan(int64_t T, int64_t B, int64_t C, int64_t H, int64_t D, int64_t topk,
               const DevInfo& di, bool fp8) {
  Plan pl;
  if (T <= 0) return pl;
  // Prefill-like calls (many queries per key row, consecutive in t): 8 queries per CTA share
  // each key tile. Decode: one query per CTA, its key range split over CTAs.
  pl.qpc = (T >= 8 * std::max<int64_t>(B, 1) && T >= 64) ? 8 : 1;
  pl.n_groups = static_cast<int>((T + pl.qpc - 1) / pl.qpc);
  const int nt = kThreads / pl.qpc;
  const int tile = tile_keys(pl.qpc, D);
  pl.tile = tile;
  const int64_t round = std::max<int64_t>(tile, static_cast<int64_t>(nt) * 2 * kMergePairs);
  int64_t pow2 = 1;
  while (pow2 < topk) pow2 <<= 1;
  const int64_t need = std::max<int64_t>(topk + round, pow2);
  // Per stage: a bf16 tile, or FP8 rows + scales (plus, on mma.sync, one bf16 conversion tile,
  // in `fixed`; the wgmma scan converts into registers).
  const int64_t tile_bytes =
      fp8 ? static_cast<int64_t>(tile) * (D + 4) : static_cast<int64_t>(tile) * D * 2;
  // wgmma scan: decode (QPC 1) with the 256-key tile at head_dim 128, <= 128 heads (q of
  // both head blocks stays in shared memory), sm_90 (wgmma is sm_90a code).
  pl.wg = wgmma_requested() && pl.qpc == 1 && tile == 256 && D == 128 && H <= 2 * kHeadBlock &&
          di.cc_major == 9;
  const int64_t wg_bytes =
      pl.wg ? ((H + kHeadBlock - 1) / kHeadBlock) * static_cast<int64_t>(wg_q_block_bytes(128)) +
                  1024
            : 0;  // q + the pad that aligns the tiles to 1024 bytes
  const int64_t fixed = pl.qpc * static_cast<int64_t>(sizeof(QState) + 256 * sizeof(int)) +
                        (fp8 && !pl.wg ? static_cast<int64_t>(tile) * D * 2 : 0) + wg_bytes;
  const int64_t margin = 3072;  // static shared memory of the kernel (up to ~2.3 KB) + slack
  // Decode (QPC 1, 64 KB stages at D = 128): 3 stages for topk <= 512, else 2 so that the
  // candidate buffer is large (fewer selects in the merges). Prefill: 3, fewer if needed.
  int stages = D == 64 ? 4 : (pl.qpc == 1 && tile == 256 && topk > 512 ? 2 : 3);
  if (tile == 128 && pl.qpc == 1) stages = 4;
  // FP8 keys on the wgmma scan: 33 KB stages and no conversion tile, so 4 fit beside a full
  // candidate buffer (3 keys tiles in flight per CTA while one is scored).
  if (pl.wg && fp8) stages = 4;
  if (g_stages >= 2 && g_stages <= 4) stages = g_stages;
  for (; stages >= 2; --stages) {
    const int64_t avail = di.max_smem - stages * tile_bytes - fixed - margin;
    int64_t cap = avail / (pl.qpc * 8);
    cap = std::min<int64_t>(cap, topk + 8192);
    cap = cap / 64 * 64;
    if (cap >= need) {
      pl.cap = static_cast<int>(cap);
      pl.stages = stages;
      break;
    }
  }
  if (pl.cap == 0) return pl;
  pl.smem = static_cast<size_t>(pl.stages * tile_bytes + fixed) +
            static_cast<size_t>(pl.qpc) * pl.cap * sizeof(u64);
  // Smallest key range of a split. Decode (QPC 1): 128 keys (one m-tile per warp), so that a
  // short row (a few thousand entries at batch 1) is scored by several CTAs instead of one:
  // a CTA scans ~20-45 ns per key on H100 (the measured 1M scan and the short-row calls), so
  // one CTA scoring 1024 keys alone was most of the ~55 us per call. Splits of fewer than
  // topk keys are fine: each leaf hands its (<= topk) candidates to the merge unselected.
  // "legacy" keeps the previous minimum (max(1024, 2 topk)) for comparison; prefill (QPC 8)
  // is unchanged. The host cannot see n_valid, so the split count follows the capacity C and
  // the kernel gives each split max(ceil(n_valid / n_splits), min_chunk) keys (whole tiles
  // above a tile): rows much shorter than C use ceil(n_valid / min_chunk) CTAs, the others
  // stay idle. Rows of at least n_splits x 1024 keys get the same split count and ranges as
  // before (1M at batch 1 / 2, 128K at batch 32: unchanged).
  const int mode = merge_mode();
  pl.min_chunk = pl.qpc == 1 && mode != kMergeLegacy
                     ? kDecodeMinChunk
                     : static_cast<int>(std::max<int64_t>(1024, 2 * round_up(topk, tile)));

  int64_t splits = std::max<int64_t>(1, di.sms / pl.n_groups);
  const int64_t by_capacity = std::max<int64_t>(1, (C + pl.min_chunk - 1) / pl.min_chunk);
  splits = std::min<int64_t>(std::min<int64_t>(splits, by_capacity), 1024);
  pl.n_splits = static_cast<int>(splits);
  if (pl.n_splits > 16) {
    pl.fan1 = static_cast<int>(std::ceil(std::sqrt(static_cast<double>(pl.n_splits))));
    pl.n_l1 = (pl.n_splits + pl.fan1 - 1) / pl.fan1;
  } else {
    pl.fan1 = pl.n_splits;
    pl.n_l1 = 1;
  }
  if (pl.fan1 > kMaxChildren || pl.n_l1 > kMaxChildren) return pl;  // not ok (cannot happen)
  pl.slot_stride = static_cast<int>(round_up(topk, 16));
  pl.hist = pl.qpc == 1 && pl.n_splits > 1 && C > 0 && pl.cap >= kHistBins / 2 &&
            (mode == kMergeHist || mode == kMergeCoop ||
             ((mode == kMergeAuto || mode == kMergeLegacy) && pl.n_splits > 16));
  if (pl.hist) {
    // [bins T x 4096][arrive T][nwin T][nbnd T][coarse bins T x 64] (zeroed per launch), then
    // nv, keys, lists.
    const int64_t T1 = pl.n_groups;
    pl.off_hs_hist = 0;
    pl.off_hs_arrive = static_cast<size_t>(T1) * kHistBins * sizeof(uint32_t);
    pl.off_hs_nwin = pl.off_hs_arrive + static_cast<size_t>(T1) * sizeof(int32_t);
    pl.off_hs_nbnd = pl.off_hs_nwin + static_cast<size_t>(T1) * sizeof(int32_t);
    pl.off_hs_coarse = pl.off_hs_nbnd + static_cast<size_t>(T1) * sizeof(int32_t);
    pl.memset_bytes = pl.off_hs_coarse + static_cast<size_t>(T1) * kCoarseBins * sizeof(uint32_t);
    size_t off = static_cast<size_t>(round_up(static_cast<int64_t>(pl.memset_bytes), 256));
    auto take = [&off](size_t bytes) {
      const size_t at = off;
      off += static_cast<size_t>(round_up(static_cast<int64_t>(bytes), 256));
      return at;
    };
    pl.off_hs_nv = take(static_cast<size_t>(T1) * sizeof(int32_t));
    pl.off_hs_keys = take(static_cast<size_t>(T1) * static_cast<size_t>(C) * sizeof(uint32_t));
    pl.off_hs_win = take(static_cast<size_t>(T1) * pl.slot_stride * sizeof(u64));
    pl.off_hs_bnd = take(static_cast<size_t>(T1) * kBoundaryCap * sizeof(u64));
    pl.ws_bytes = off;
    pl.sel_cap = pl.slot_stride + kBoundaryCap + kThreads * kSelUnroll;
    pl.sel_smem = sizeof(QState) + 256 * sizeof(int) + static_cast<size_t>(pl.sel_cap) * sizeof(u64);
    if (pl.sel_smem + 1024 > static_cast<size_t>(di.max_smem)) return pl;  // not ok (cannot happen)
  } else if (pl.n_splits > 1) {
    const int64_t t_pad = static_cast<int64_t>(pl.n_groups) * pl.qpc;
    size_t off = 0;
    auto take = [&off](size_t bytes) {
      const size_t at = off;
      off += static_cast<size_t>(round_up(static_cast<int64_t>(bytes), 256));
      return at;
    };
    const size_t n1 = pl.n_l1 > 1 ? static_cast<size_t>(pl.n_l1) : 0;
    pl.off_arrive1 = off;
    const size_t counter_ints = static_cast<size_t>(pl.n_groups) * (n1 + 1);
    pl.off_root = pl.off_arrive1 + static_cast<size_t>(pl.n_groups) * n1 * sizeof(int32_t);
    pl.memset_bytes = counter_ints * sizeof(int32_t);
    take(pl.memset_bytes);
    pl.off_count0 = take(static_cast<size_t>(t_pad) * pl.n_splits * sizeof(int32_t));
    pl.off_count1 = take(static_cast<size_t>(t_pad) * n1 * sizeof(int32_t));
    pl.off_rank0 = take(static_cast<size_t>(t_pad) * pl.n_splits * pl.slot_stride * sizeof(u64));
    pl.off_rank1 = take(static_cast<size_t>(t_pad) * n1 * pl.slot_stride * sizeof(u64));
    pl.ws_bytes = off;
  }
  pl.ok = true;
  return pl;
}

// Merge mode "coop": devices where a cooperative launch of a scan kernel was refused with
// cudaErrorCooperativeLaunchTooLarge although the occupancy query allowed its grid (the context
// may own fewer SMs than the device, e.g. under MPS or a green context): later calls take the
// two-launch path at once.
std::atomic<bool> g_coop_refused[64];  // static storage: false at start
// Merge mode "coop" calls that launched cooperatively / took the two launches instead
// (indexer_topk_coop_counts, a test aid).
std::atomic<long long> g_coop_launched{0}, g_coop_declined{0};

// CTAs of kernel `kern` with `smem` bytes of dynamic shared memory that `device` holds at once
// (0: no cooperative launch there, or a query failed). Per kernel instance (Tag) and device,
// the last successful answer is cached with its smem (a plan of another topk may use another
// size): (smem << 20 | count + 1), 0 = not known. A failed query clears its own error
// (own_error.cuh) and is asked again at the next call; none is made while the caller has an
// error pending.
template <class Tag>
int coop_capacity(const void* kern, int device, size_t smem, int sms) {
  static std::atomic<long long> cache[64];
  if (device < 0 || device >= 64 || g_coop_refused[device].load(std::memory_order_relaxed))
    return 0;
  const long long known = cache[device].load(std::memory_order_relaxed);
  if (known != 0 && static_cast<size_t>(known >> 20) == smem) {
    return static_cast<int>((known & 0xfffff) - 1);
  }
  if (error_pending()) return 0;
  int coop = 0, per_sm = 0;
  cudaError_t e = test_refusal() == TestRefusal::kQuery
                      ? refused_for_test()
                      : cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device);
  if (e == cudaSuccess && coop != 0) {
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, kThreads, smem);
  }
  if (e != cudaSuccess) {
    clear_own_error(e);
    return 0;
  }
  long long n = coop != 0 && per_sm > 0 ? static_cast<long long>(per_sm) * sms : 0;
  n = n < 0xffffe ? n : 0xffffe;
  cache[device].store((static_cast<long long>(smem) << 20) | (n + 1), std::memory_order_relaxed);
  return static_cast<int>(n);
}

// The cooperative launch of a kHist scan kernel that finishes its own selection (Params::coop,
// coop_select), when the grid fits on the device at once. launched = false: no launch was
// made or it was refused (its own error cleared): the caller takes the two-launch path;
// launched = true: the launch's result is returned (an error is the caller's).
template <class Tag, class Kern>
cudaError_t launch_coop(Kern kern, const Params& prm, const Plan& pl, int64_t grid,
                        cudaStream_t stream, bool& launched) {
  launched = false;
  g_coop_declined.fetch_add(1, std::memory_order_relaxed);  // (taken back below if launched)
  if (error_pending()) return cudaSuccess;  // the caller's error stays; no call that can fail
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  DevInfo di;
  if (e == cudaSuccess) e = device_info(device, di);
  if (e != cudaSuccess) {
    clear_own_error(e);
    return cudaSuccess;
  }
  const int cap = coop_capacity<Tag>(reinterpret_cast<const void*>(kern), device, pl.smem, di.sms);
  if (grid > cap) return cudaSuccess;
  Params cp = prm;
  cp.coop = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(grid));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = pl.smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  // DSV4_TEST_REFUSE=launch (test only, own_error.cuh): refused as by the runtime
  e = test_refusal() == TestRefusal::kLaunch ? refused_for_test()
                                             : cudaLaunchKernelEx(&cfg, kern, cp);
  if (e == cudaErrorCooperativeLaunchTooLarge || e == cudaErrorNotSupported ||
      e == cudaErrorInvalidValue) {
    // nothing ran; its own error (nothing was pending before it)
    clear_own_error(e);
    if (e == cudaErrorCooperativeLaunchTooLarge && device >= 0 && device < 64)
      g_coop_refused[device].store(true, std::memory_order_relaxed);
    return cudaSuccess;
  }
  launched = true;
  if (e == cudaSuccess) {
    g_coop_declined.fetch_sub(1, std::memory_order_relaxed);
    g_coop_launched.fetch_add(1, std::memory_order_relaxed);
  }
  return e;
}

template <int D, int QPC, int TILE, bool kScanOnly, bool kFp8, bool kHist, bool kWg = false>
cudaError_t launch_kernel(const Params& prm, const Plan& pl, cudaStream_t stream) {
  if (pl.tile != TILE || pl.wg != kWg) return cudaErrorInvalidValue;
  auto kern = indexer_topk_kernel<D, QPC, TILE, kScanOnly, kFp8, kHist, kWg>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(pl.smem));
  if (e != cudaSuccess) return e;
  const int64_t grid = static_cast<int64_t>(pl.n_groups) * pl.n_splits;
  if (grid > INT_MAX) return cudaErrorInvalidValue;
  if constexpr (kHist) {
    if (merge_mode() == kMergeCoop) {  // one cooperative launch, else the two launches below
      struct Tag {};
      bool launched = false;
      e = launch_coop<Tag>(kern, prm, pl, grid, stream, launched);
      if (launched) return e;
    }
  }
  kern<<<dim3(static_cast<unsigned>(grid)), dim3(kThreads), pl.smem, stream>>>(prm);
  e = cudaGetLastError();
  if (e != cudaSuccess || !kHist) return e;
  // The selection: the same T x n_splits grid, after the scan (stream order), as a
  // programmatic dependent launch (its launch overlaps the scan's tail; the kernel starts with
  // griddepcontrol.wait) unless DSV4_INDEXER_TOPK_PDL=0 or "legacy"; a plain launch if the
  // runtime refuses it.
  e = cudaFuncSetAttribute(indexer_select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(pl.sel_smem));
  if (e != cudaSuccess) return e;
  if (pdl_enabled()) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(grid));
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = pl.sel_smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    // DSV4_TEST_REFUSE=launch (test only, own_error.cuh): refused as by the runtime
    e = test_refusal() == TestRefusal::kLaunch
            ? refused_for_test()
            : cudaLaunchKernelEx(&cfg, indexer_select_kernel, prm);
    if (e != cudaErrorNotSupported && e != cudaErrorInvalidValue) return e;
    // its own error: the cudaGetLastError() after the scan's launch left none pending before it
    clear_own_error(e);
  }
  indexer_select_kernel<<<dim3(static_cast<unsigned>(grid)), dim3(kThreads), pl.sel_smem,
                          stream>>>(prm);
  return cudaGetLastError();
}

bool aligned(const void* ptr, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Shared argument checks and Params setup of indexer_topk / indexer_topk_scan_only.
cudaError_t prepare(const void* q, int64_t q_st, int64_t q_sh, const float* w, int64_t w_st,
                    const IndexerKeys& k, const int32_t* rows, const int32_t* n_valid, int64_t T,
                    int64_t H, int64_t D, int64_t topk, Params& prm, Plan& pl) {
  const bool paged = k.block_table != nullptr;
  const bool fp8 = k.format == CacheFormat::kFp8Indexer;
  if (k.format != CacheFormat::kPlain && !fp8) return cudaErrorInvalidValue;
  if (paged && (k.block_size < 1 || k.block_size > INT_MAX || k.max_blocks < 0 ||
                k.num_blocks < 0 || k.num_blocks > INT_MAX || k.block_table_stride < 0 ||
                k.max_blocks > INT_MAX / k.block_size)) {
    return cudaErrorInvalidValue;
  }
  // Logical capacity of a row, and the number of key rows (dense: keys rows; paged: rows of
  // the block table).
  const int64_t B = k.rows;
  const int64_t C = paged ? k.max_blocks * k.block_size : k.capacity;
  if (!args_ok(T, B, C, H, D, topk)) return cudaErrorInvalidValue;
  if (T == 0) return cudaSuccess;
  if (q == nullptr || w == nullptr || rows == nullptr || n_valid == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (!aligned(q, 4) || q_st % 2 != 0 || q_sh % 2 != 0) return cudaErrorInvalidValue;
  const bool any_keys = paged ? (k.num_blocks > 0 && k.block_size > 0) : (B > 0 && C > 0);
  if (any_keys) {
    if (k.data == nullptr || !aligned(k.data, 16)) return cudaErrorInvalidValue;
    if (fp8) {
      if (k.stride_block % 16 != 0) return cudaErrorInvalidValue;
    } else if (k.stride_block % 8 != 0 || k.stride_entry % 8 != 0) {
      return cudaErrorInvalidValue;
    }
  }
  if (paged && k.max_blocks > 0 && B > 0 && k.block_table == nullptr) return cudaErrorInvalidValue;
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  DevInfo di;
  e = device_info(device, di);
  if (e != cudaSuccess) return e;
  pl = make_plan(T, B, C, H, D, topk, di, fp8);
  if (!pl.ok) return cudaErrorInvalidValue;
  prm = Params{};
  prm.q = static_cast<const __nv_bfloat16*>(q);
  prm.q_st = q_st;
  prm.q_sh = q_sh;
  prm.w = w;
  prm.w_st = w_st;
  prm.keys = static_cast<const __nv_bfloat16*>(k.data);
  prm.k_sb = k.stride_block;
  prm.k_sc = k.stride_entry;
  prm.bt = paged ? k.block_table : nullptr;
  prm.bt_st = k.block_table_stride;
  prm.bt_cols = paged ? static_cast<int>(k.max_blocks) : 0;
  prm.bs = paged ? static_cast<int>(k.block_size) : 1;
  prm.n_blocks = paged && any_keys ? static_cast<int>(k.num_blocks) : 0;
  prm.fp8_rows = static_cast<int>(paged ? k.block_size : C);
  prm.rows = rows;
  prm.n_valid = n_valid;
  prm.T = static_cast<int>(T);
  prm.H = static_cast<int>(H);
  prm.B = static_cast<int>(B);
  prm.C = (B > 0 && any_keys) ? static_cast<int>(C) : 0;
  prm.topk = static_cast<int>(topk);
  prm.n_groups = pl.n_groups;
  prm.n_splits = pl.n_splits;
  prm.fan1 = pl.fan1;
  prm.n_l1 = pl.n_l1;
  prm.slot_stride = pl.slot_stride;
  prm.cap = pl.cap;
  prm.stages = pl.stages;
  prm.min_chunk = pl.min_chunk;
  prm.fast_tail = merge_mode() != kMergeLegacy;
  prm.merge_sort = merge_sort_enabled();
  return cudaSuccess;
}

IndexerKeys dense_keys(const void* keys, int64_t k_sb, int64_t k_sc, int64_t batch,
                       int64_t capacity) {
  IndexerKeys k;
  k.data = keys;
  k.stride_block = k_sb;
  k.stride_entry = k_sc;
  k.rows = batch;
  k.capacity = capacity;
  return k;
}

template <bool kScanOnly, bool kFp8, bool kHist = false>
cudaError_t launch_for(const Params& prm, const Plan& pl, int64_t head_dim, cudaStream_t stream) {
  if (kHist && pl.qpc != 1) return cudaErrorInvalidValue;  // (the plan never asks for it)
  if (head_dim == 128) {
    if constexpr (!kHist) {
      if (pl.qpc == 8) return launch_kernel<128, 8, 128, kScanOnly, kFp8, false>(prm, pl, stream);
    }
    if (pl.wg) return launch_kernel<128, 1, 256, kScanOnly, kFp8, kHist, true>(prm, pl, stream);
    return pl.tile == 128 ? launch_kernel<128, 1, 128, kScanOnly, kFp8, kHist>(prm, pl, stream)
                          : launch_kernel<128, 1, 256, kScanOnly, kFp8, kHist>(prm, pl, stream);
  }
  if constexpr (kScanOnly) {
    return cudaErrorInvalidValue;  // the scan-only aid exists for head_dim 128
  } else {
    if constexpr (!kHist) {
      if (pl.qpc == 8) return launch_kernel<64, 8, 128, false, kFp8, false>(prm, pl, stream);
    }
    return launch_kernel<64, 1, 256, false, kFp8, kHist>(prm, pl, stream);
  }
}


// ------------------------------------------------------------------------------------------
// host side: short-row decode path (indexer_short_kernel)
// ------------------------------------------------------------------------------------------
// DSV4_INDEXER_TOPK_SHORT=0 turns the path off (the split / merge path runs instead; read at
// each call, so a process can time both); anything else or unset: on where eligible.
bool short_enabled() {
  const char* e = std::getenv("DSV4_INDEXER_TOPK_SHORT");
  return e == nullptr || std::strcmp(e, "0") != 0;
}

// The attributes every launch of indexer_short_kernel<D, kFp8> needs on the current device
// (`device`): set once per device and instance (cudaFuncSetAttribute applies to the current
// device's context). The flag is set only after both succeeded; two threads that both see it
// unset both set the same values, which is harmless.
template <int D, bool kFp8>
cudaError_t short_func_setup(int device) {
  static std::atomic<bool> done[64];
  const bool slot = device >= 0 && device < 64;
  if (slot && done[device].load(std::memory_order_acquire)) return cudaSuccess;
  auto kern = indexer_short_kernel<D, kFp8>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       ShortLayout<D, kFp8>::kBytes);
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  if (e == cudaSuccess && slot) done[device].store(true, std::memory_order_release);
  return e;
}

template <int D, bool kFp8>
void short_launch_config(cudaLaunchConfig_t& cfg, cudaLaunchAttribute (&attr)[1], int grid,
                         int cs, cudaStream_t stream) {
  cfg = cudaLaunchConfig_t{};
  cfg.gridDim = dim3(static_cast<unsigned>(grid));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = ShortLayout<D, kFp8>::kBytes;
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(cs);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
}

// Clusters of cs CTAs of this kernel that the device can hold at once (0: none, e.g. 16-CTA
// clusters on a device whose GPCs do not have 16 SMs each; the occupancy query describes the
// idle device: at run time, kernels of other streams occupying SMs may delay a 16-CTA cluster
// until a GPC has 16 free SMs, which costs time, never correctness), also 0 when the kernel
// was compiled for an architecture below sm_90 (its body is empty there: a PTX-JIT build) or a
// query failed. Cached per device and cluster size (count + 1; 0 = not known yet), successful
// queries only (own_error.cuh): a failed one (its own error cleared, the split path runs) is
// asked again at the next call; while the caller has an error pending none is made.
template <int D, bool kFp8>
int short_max_clusters(int device, int cs) {
  static std::atomic<int> cache[64][kShortMaxCluster + 1];
  if (device < 0 || device >= 64 || cs < 1 || cs > kShortMaxCluster) return 0;
  std::atomic<int>& c = cache[device][cs];
  const int known = c.load(std::memory_order_relaxed);
  if (known > 0) return known - 1;
  if (error_pending()) return 0;
  int n = 0;
  // ptxVersion: the __CUDA_ARCH__ the body was compiled for (a PTX of compute_80 JIT-compiled
  // for sm_90 reports 80 here and 90 as binaryVersion); 0 = not recorded, trusted.
  cudaFuncAttributes fa;
  cudaError_t e = test_refusal() == TestRefusal::kQuery
                      ? refused_for_test()
                      : cudaFuncGetAttributes(&fa, indexer_short_kernel<D, kFp8>);
  const bool arch_ok =
      e == cudaSuccess && fa.binaryVersion >= 90 && (fa.ptxVersion == 0 || fa.ptxVersion >= 90);
  if (e == cudaSuccess && arch_ok) e = short_func_setup<D, kFp8>(device);
  if (e == cudaSuccess && arch_ok) {
    cudaLaunchConfig_t cfg;
    cudaLaunchAttribute attr[1];
    short_launch_config<D, kFp8>(cfg, attr, cs, cs, nullptr);
    e = cudaOccupancyMaxActiveClusters(&n, indexer_short_kernel<D, kFp8>, &cfg);
  }
  if (e != cudaSuccess) {
    clear_own_error(e);
    return 0;
  }
  if (!arch_ok || n < 0) n = 0;
  c.store(n + 1, std::memory_order_relaxed);
  return n;
}

// Cluster size for T queries over a logical capacity C, or 0 when the path does not fit: one
// CTA per 128 keys of C, at most 16 (8 when T clusters of 16 cannot be resident at once), and at
// most kShortMaxKeys keys per CTA.
template <int D, bool kFp8>
int short_cluster_size(int64_t T, int64_t C, int device) {
  int cs = static_cast<int>(std::min<int64_t>(
      kShortMaxCluster, std::max<int64_t>(1, (C + kShortTile - 1) / kShortTile)));
  for (;;) {
    const int64_t L = round_up((C + cs - 1) / cs, 16);
    if (L <= kShortMaxKeys && short_max_clusters<D, kFp8>(device, cs) >= T) return cs;
    if (cs <= 8) return 0;
    cs = 8;
  }
}

// The short path's cluster size for a call, or 0 (the split / merge path). It serves decode
// plans (one query per CTA) of at most kShortMaxT queries and kShortMaxHeads heads on sm_90+,
// in the default (auto) merge mode: the other modes keep selecting the paths they name.
int short_cluster_for(int64_t T, int64_t C, int64_t H, int64_t D, bool fp8, int qpc,
                      const DevInfo& di, int device) {
  if (!short_enabled() || merge_mode() != kMergeAuto) return 0;
  if (qpc != 1 || T < 1 || T > kShortMaxT || H > kShortMaxHeads || di.cc_major < 9) return 0;
  if (C > static_cast<int64_t>(kShortMaxCluster) * kShortMaxKeys) return 0;
  if (D == 128) {
    return fp8 ? short_cluster_size<128, true>(T, C, device)
               : short_cluster_size<128, false>(T, C, device);
  }
  return fp8 ? short_cluster_size<64, true>(T, C, device)
             : short_cluster_size<64, false>(T, C, device);
}

template <int D, bool kFp8>
cudaError_t launch_short_kernel(const Params& prm, int cs, int device, cudaStream_t stream) {
  cudaError_t e = short_func_setup<D, kFp8>(device);  // done once per device: a flag test
  if (e != cudaSuccess) return e;
  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr[1];
  short_launch_config<D, kFp8>(cfg, attr, prm.T * cs, cs, stream);
  return cudaLaunchKernelEx(&cfg, indexer_short_kernel<D, kFp8>, prm);
}

cudaError_t launch_short(const Params& prm, int cs, int64_t head_dim, bool fp8, int device,
                         cudaStream_t stream) {
  if (head_dim == 128) {
    return fp8 ? launch_short_kernel<128, true>(prm, cs, device, stream)
               : launch_short_kernel<128, false>(prm, cs, device, stream);
  }
  return fp8 ? launch_short_kernel<64, true>(prm, cs, device, stream)
             : launch_short_kernel<64, false>(prm, cs, device, stream);
}

}  // namespace

void indexer_topk_set_tuning(int decode_tile_keys, int stages) {
  g_decode_tile = decode_tile_keys;
  g_stages = stages;
}

void indexer_topk_set_merge(int mode) { g_merge = mode >= 0 && mode <= 4 ? mode : -1; }

void indexer_topk_coop_counts(long long* launched, long long* declined) {
  if (launched != nullptr) *launched = g_coop_launched.load(std::memory_order_relaxed);
  if (declined != nullptr) *declined = g_coop_declined.load(std::memory_order_relaxed);
}

size_t indexer_topk_workspace_bytes(int64_t tokens, int64_t batch, int64_t capacity,
                                    int64_t heads, int64_t head_dim, int64_t topk, int device,
                                    bool fp8_keys) {
  if (!args_ok(tokens, batch, capacity, heads, head_dim, topk) || tokens == 0) return 0;
  DevInfo di;
  if (device_info(device, di) != cudaSuccess) return 0;
  const Plan pl = make_plan(tokens, batch, capacity, heads, head_dim, topk, di, fp8_keys);
  return pl.ok ? pl.ws_bytes : 0;
}

size_t indexer_topk_workspace_bytes(int64_t tokens, const IndexerKeys& keys, int64_t heads,
                                    int64_t head_dim, int64_t topk, int device) {
  const int64_t C = keys.block_table != nullptr ? keys.max_blocks * keys.block_size
                                                : keys.capacity;
  return indexer_topk_workspace_bytes(tokens, keys.rows, C, heads, head_dim, topk, device,
                                      keys.format == CacheFormat::kFp8Indexer);
}

cudaError_t indexer_topk(const void* q, int64_t q_stride_t, int64_t q_stride_h,
                         const float* weights, int64_t w_stride_t, const IndexerKeys& keys,
                         const int32_t* rows, const int32_t* n_valid, int32_t* indices,
                         int64_t idx_stride_t, int64_t tokens, int64_t heads, int64_t head_dim,
                         int64_t topk, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream) {
  Params prm;
  Plan pl;
  cudaError_t e = prepare(q, q_stride_t, q_stride_h, weights, w_stride_t, keys, rows, n_valid,
                          tokens, heads, head_dim, topk, prm, pl);
  if (e != cudaSuccess || tokens == 0) return e;
  if (indices == nullptr) return cudaErrorInvalidValue;
  if (workspace_bytes < pl.ws_bytes || (pl.ws_bytes > 0 && workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (pl.ws_bytes > 0 && !aligned(workspace, 256)) return cudaErrorInvalidValue;
  prm.out = indices;
  prm.out_st = idx_stride_t;
  {
    // Short rows at small batch: one cluster per query, no workspace (the workspace size stays
    // the split path's, so that callers need not know which path runs).
    int device = 0;
    DevInfo di;
    e = cudaGetDevice(&device);
    if (e == cudaSuccess) e = device_info(device, di);
    if (e != cudaSuccess) return e;
    const bool fp8 = keys.format == CacheFormat::kFp8Indexer;
    const int cs = short_cluster_for(tokens, prm.C, heads, head_dim, fp8, pl.qpc, di, device);
    if (cs > 0) {
      prm.q_vec16 = aligned(q, 16) && q_stride_t % 8 == 0 && q_stride_h % 8 == 0;
      return launch_short(prm, cs, head_dim, fp8, device, stream);
    }
  }
  if (pl.hist) {
    char* ws = static_cast<char*>(workspace);
    prm.hs_hist = reinterpret_cast<uint32_t*>(ws + pl.off_hs_hist);
    prm.hs_coarse = reinterpret_cast<uint32_t*>(ws + pl.off_hs_coarse);
    prm.hs_arrive = reinterpret_cast<int32_t*>(ws + pl.off_hs_arrive);
    prm.hs_nwin = reinterpret_cast<int32_t*>(ws + pl.off_hs_nwin);
    prm.hs_nbnd = reinterpret_cast<int32_t*>(ws + pl.off_hs_nbnd);
    prm.hs_nv = reinterpret_cast<int32_t*>(ws + pl.off_hs_nv);
    prm.hs_keys = reinterpret_cast<uint32_t*>(ws + pl.off_hs_keys);
    prm.hs_key_stride = prm.C;
    prm.hs_win = reinterpret_cast<u64*>(ws + pl.off_hs_win);
    prm.hs_bnd = reinterpret_cast<u64*>(ws + pl.off_hs_bnd);
    prm.sel_cap = pl.sel_cap;
    e = zero_bytes_async(ws, pl.memset_bytes, stream);
    if (e != cudaSuccess) return e;
    if (keys.format == CacheFormat::kFp8Indexer) {
      return launch_for<false, true, true>(prm, pl, head_dim, stream);
    }
    return launch_for<false, false, true>(prm, pl, head_dim, stream);
  }
  if (pl.n_splits > 1) {
    char* ws = static_cast<char*>(workspace);
    prm.arrive1 = reinterpret_cast<int32_t*>(ws + pl.off_arrive1);
    prm.arrive_root = reinterpret_cast<int32_t*>(ws + pl.off_root);
    prm.ws_count0 = reinterpret_cast<int32_t*>(ws + pl.off_count0);
    prm.ws_count1 = reinterpret_cast<int32_t*>(ws + pl.off_count1);
    prm.ws_rank0 = reinterpret_cast<u64*>(ws + pl.off_rank0);
    prm.ws_rank1 = reinterpret_cast<u64*>(ws + pl.off_rank1);
    e = zero_bytes_async(ws + pl.off_arrive1, pl.memset_bytes, stream);
    if (e != cudaSuccess) return e;
  }
  if (keys.format == CacheFormat::kFp8Indexer) return launch_for<false, true>(prm, pl, head_dim, stream);
  return launch_for<false, false>(prm, pl, head_dim, stream);
}

cudaError_t indexer_topk(const void* q, int64_t q_stride_t, int64_t q_stride_h,
                         const float* weights, int64_t w_stride_t, const void* keys,
                         int64_t k_stride_b, int64_t k_stride_c, const int32_t* rows,
                         const int32_t* n_valid, int32_t* indices, int64_t idx_stride_t,
                         int64_t tokens, int64_t heads, int64_t head_dim, int64_t batch,
                         int64_t capacity, int64_t topk, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream) {
  return indexer_topk(q, q_stride_t, q_stride_h, weights, w_stride_t,
                      dense_keys(keys, k_stride_b, k_stride_c, batch, capacity), rows, n_valid,
                      indices, idx_stride_t, tokens, heads, head_dim, topk, workspace,
                      workspace_bytes, stream);
}

int indexer_topk_short_cluster(int64_t tokens, const IndexerKeys& keys, int64_t heads,
                               int64_t head_dim, int64_t topk) {
  const bool paged = keys.block_table != nullptr;
  const int64_t C = paged ? keys.max_blocks * keys.block_size : keys.capacity;
  if (!args_ok(tokens, keys.rows, C, heads, head_dim, topk) || tokens == 0) return 0;
  int device = 0;
  DevInfo di;
  if (cudaGetDevice(&device) != cudaSuccess || device_info(device, di) != cudaSuccess) return 0;
  const bool fp8 = keys.format == CacheFormat::kFp8Indexer;
  const Plan pl = make_plan(tokens, keys.rows, C, heads, head_dim, topk, di, fp8);
  if (!pl.ok) return 0;
  const bool any_keys = paged ? (keys.num_blocks > 0 && keys.block_size > 0)
                              : (keys.rows > 0 && C > 0);
  const int64_t c_eff = (keys.rows > 0 && any_keys) ? C : 0;
  return short_cluster_for(tokens, c_eff, heads, head_dim, fp8, pl.qpc, di, device);
}

bool indexer_topk_uses_wgmma(int64_t tokens, const IndexerKeys& keys, int64_t heads,
                             int64_t head_dim, int64_t topk) {
  const bool paged = keys.block_table != nullptr;
  const int64_t C = paged ? keys.max_blocks * keys.block_size : keys.capacity;
  if (!args_ok(tokens, keys.rows, C, heads, head_dim, topk) || tokens == 0) return false;
  int device = 0;
  DevInfo di;
  if (cudaGetDevice(&device) != cudaSuccess || device_info(device, di) != cudaSuccess) return false;
  const bool fp8 = keys.format == CacheFormat::kFp8Indexer;
  const Plan pl = make_plan(tokens, keys.rows, C, heads, head_dim, topk, di, fp8);
  return pl.ok && pl.wg && indexer_topk_short_cluster(tokens, keys, heads, head_dim, topk) == 0;
}

cudaError_t indexer_topk_scan_only(const void* q, int64_t q_stride_t, int64_t q_stride_h,
                                   const float* weights, int64_t w_stride_t, const void* keys,
                                   int64_t k_stride_b, int64_t k_stride_c, const int32_t* rows,
                                   const int32_t* n_valid, float* score_sum, int64_t tokens,
                                   int64_t heads, int64_t head_dim, int64_t batch,
                                   int64_t capacity, int64_t topk, cudaStream_t stream) {
  if (head_dim != 128) return cudaErrorInvalidValue;
  Params prm;
  Plan pl;
  cudaError_t e = prepare(q, q_stride_t, q_stride_h, weights, w_stride_t,
                          dense_keys(keys, k_stride_b, k_stride_c, batch, capacity), rows,
                          n_valid, tokens, heads, head_dim, topk, prm, pl);
  if (e != cudaSuccess || tokens == 0) return e;
  if (score_sum == nullptr) return cudaErrorInvalidValue;
  prm.scan_sum = score_sum;
  return launch_for<true, false>(prm, pl, head_dim, stream);
}

}  // namespace dsv4
