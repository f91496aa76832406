// dsv4 sparse attention kernels (torch-free). Contract: include/dsv4/sparse_attn.h.
//
// One CTA = one query token x one tile of 64 heads (x one key split in decode). The token's
// key list (main scope lanes, then extra scope lanes) is walked in blocks of 64 gathered rows:
//
//   prologue : cp.async Q tile [64 heads x D] and key block 0 into shared memory
//   block b  : wait; __syncthreads; cp.async key block b+1 into the other stage (overlaps);
//              S = Q K^T  (mma.sync m16n8k16 bf16, fp32 accumulate; warp tile 32|16 rows x 16 keys)
//              mask invalid slots to -inf, online softmax in the log2 domain
//              (row max/sum shared by the 4 warps of a row group through shared memory and a
//              named barrier), P rounded to bf16 into shared memory
//              O += P V   (V = the same K tile, ldmatrix.trans; warp tile rows x D/4 columns)
//   epilogue : O / (l + 2^(sink*log2e - m)), staged as bf16 through shared memory, 16-byte
//              coalesced stores; lse = (m + log2 l) * ln 2.
//
// Invalid slots are zero-filled (cp.async src-size 0) and masked; the running max starts at
// -inf but every exponent uses m_use = (m == -inf ? 0 : m), so (-inf) - (-inf) never occurs.
// Shared-memory tiles use a 16-byte-chunk XOR swizzle (chunk ^ (row & 7)), so every ldmatrix
// and the P / O stores are bank-conflict free.
//
// Two implementations of this design:
//   sparse_attn_fwd_kernel        mma.sync m16n8k16 + ldmatrix (any sm_80+ GPU; every head_dim)
//   sparse_attn_fwd_wgmma_kernel  Hopper wgmma, operands straight from shared memory
//                                 (head_dim 512 on sm_90a: ~1.4x faster at the V4 shapes)
// plus sparse_attn_combine_kernel, the merge of the key splits (decode).
//
// mma.sync template parameters: D = head_dim; WM x WN warps (WN = 4 always: 4 key groups of 16
// in S and 4 column groups of D/4 in O; WM = 2 gives 32-row warp tiles, WM = 4 16-row tiles).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "dsv4/sparse_attn.h"

namespace dsv4 {
namespace sparse_attn_detail {

constexpr int kBlockM = 64;  // heads per CTA tile
constexpr int kBlockN = 64;  // keys per block
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int D, int WM, int WN>
struct Cfg {
  static_assert(WN == 4, "S warp tiles are 16 keys wide: 4 key groups cover a 64-key block");
  static_assert(kBlockM % (16 * WM) == 0, "row groups must be multiples of 16 rows");
  static_assert(D % 64 == 0 && D >= 64 && D <= 512, "head_dim must be a multiple of 64 <= 512");
  static constexpr int kWarps = WM * WN;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsW = kBlockM / WM;  // rows (heads) per warp
  static constexpr int kMT = kRowsW / 16;      // m16 tiles per warp
  static constexpr int kColsW = D / WN;        // O columns per warp
  static constexpr int kNTO = kColsW / 8;      // n8 tiles of O per warp
  static constexpr int kChunks = D / 8;        // 16-byte chunks per row
  static constexpr int kTPR = kThreads / kBlockN;  // loader threads per row
  static constexpr int kCPT = kChunks / kTPR;      // chunks per loader thread
  static_assert(kChunks % kTPR == 0, "loader mapping");
  static constexpr int kTileBytes = kBlockN * D * 2;  // also the Q tile (kBlockM == kBlockN)
  static constexpr int kQOff = 0;
  static constexpr int kKOff = kTileBytes;  // 2 stages
  static constexpr int kPOff = kKOff + 2 * kTileBytes;
  static constexpr int kRedOff = kPOff + kBlockM * kBlockN * 2;  // red_max, red_sum [WN][64] f32
  static constexpr int kValidOff = kRedOff + 2 * WN * kBlockM * 4;  // uint8 [2][64]
  static constexpr int kSmem = kValidOff + 2 * kBlockN;
};

// ---------------------------------------------------------------------------------------------
// PTX helpers
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; src_bytes = 0 zero-fills the destination (nothing read).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// d += a * b, m16n8k16, bf16 inputs, fp32 accumulate.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}

// 2^x (ex2.approx: ~2 ulp; 2^-inf = +0, 2^+inf = +inf, NaN stays NaN).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo (lower address)
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Named barrier for the `count` threads of one row group (ids 1..WM; 0 is __syncthreads).
__device__ __forceinline__ void named_barrier(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile whose rows hold
// ROW_CHUNKS chunks (>= 8).
template <int ROW_CHUNKS>
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  return static_cast<uint32_t>(row * (ROW_CHUNKS * 16) + ((chunk ^ (row & 7)) << 4));
}

// Per-token key list: main lanes [0, k1) then extra lanes [0, k2), in 64-key blocks. In the
// HCA dense mode (bt_row != nullptr) extra lane i is computed from the block table instead of
// read from an index list.
struct TokenKeys {
  const int32_t* idx1;
  const int32_t* idx2;
  const int32_t* bt_row;  // HCA: this token's block-table row
  int bs, bt_cols;        // HCA: entries per block, columns of the table
  int64_t n_blk;          // HCA: blocks in the extra pool
  int k1, k2, nb1, nb;
};

__device__ __forceinline__ TokenKeys token_keys(const SparseAttnParams& p, int64_t t) {
  TokenKeys tk;
  int k1 = static_cast<int>(p.topk);
  if (p.topk_length != nullptr) k1 = min(max(__ldg(p.topk_length + t), 0), k1);
  int k2 = 0;
  tk.idx2 = nullptr;
  tk.bt_row = nullptr;
  tk.bs = 1;
  tk.bt_cols = 0;
  tk.n_blk = 0;
  if (p.extra_indices != nullptr || p.extra_block_table != nullptr) {
    k2 = static_cast<int>(p.extra_topk);
    if (p.extra_topk_length != nullptr) k2 = min(max(__ldg(p.extra_topk_length + t), 0), k2);
    if (p.extra_indices != nullptr) {
      tk.idx2 = p.extra_indices + t * p.extra_indices_stride;
    } else {
      const int row = __ldg(p.extra_rows + t);
      if (row < 0 || static_cast<int64_t>(row) >= p.extra_block_table_rows) {
        k2 = 0;  // no such row: no extra key
      } else {
        tk.bt_row = p.extra_block_table + static_cast<int64_t>(row) * p.extra_block_table_stride;
        tk.bs = static_cast<int>(p.extra_block_size);
        tk.bt_cols = static_cast<int>(p.extra_max_blocks);
        tk.n_blk = p.n_extra_kv / p.extra_block_size;
      }
    }
  }
  tk.idx1 = p.indices + t * p.indices_stride;
  tk.k1 = k1;
  tk.k2 = k2;
  tk.nb1 = (k1 + kBlockN - 1) / kBlockN;
  tk.nb = tk.nb1 + (k2 + kBlockN - 1) / kBlockN;
  return tk;
}

// Where the raw indices of block `b` are stored, for the index-list modes (not the HCA
// block-table mode, whose extra lanes fetch_index computes): key r of the block at slots + r for
// r < lanes, none past the scope's length (lanes <= 0 for a block >= nb; those lanes are never
// read). Lets a caller issue the loads of several keys before using any.
struct BlockSlots {
  const int32_t* slots;
  int lanes;
};
__device__ __forceinline__ BlockSlots block_slots(const TokenKeys& tk, int b) {
  if (b >= tk.nb) return {tk.idx1, 0};
  if (b < tk.nb1) return {tk.idx1 + b * kBlockN, tk.k1 - b * kBlockN};
  if (tk.idx2 == nullptr) return {tk.idx1, 0};
  const int lane0 = (b - tk.nb1) * kBlockN;
  return {tk.idx2 + lane0, tk.k2 - lane0};
}
// The slot of key `r` of block `b` (block_slots), nullptr past the scope's length.
__device__ __forceinline__ const int32_t* index_slot(const TokenKeys& tk, int b, int r) {
  const BlockSlots bs = block_slots(tk, b);
  return r < bs.lanes ? bs.slots + r : nullptr;
}

// Raw index of key `r` of block `b` (-1 past the scope's length; never reads those lanes).
__device__ __forceinline__ int fetch_index(const TokenKeys& tk, int b, int r) {
  if (tk.bt_row == nullptr || b < tk.nb1) {
    const int32_t* slot = index_slot(tk, b, r);
    return slot != nullptr ? __ldg(slot) : -1;
  }
  if (b >= tk.nb) return -1;
  const int lane_k = (b - tk.nb1) * kBlockN + r;
  if (lane_k >= tk.k2) return -1;
  // HCA: compressed entry lane_k of the token's block-table row.
  const int col = lane_k / tk.bs;
  if (col >= tk.bt_cols) return -1;
  const int blk = __ldg(tk.bt_row + col);
  if (blk < 0 || static_cast<int64_t>(blk) >= tk.n_blk) return -1;
  return blk * tk.bs + (lane_k - col * tk.bs);  // < n_extra_kv <= INT_MAX (host check)
}

// The work of one CTA of the sparse_attn grids: blockIdx.x = (t * n_ht + ht) * num_splits +
// split (num_splits = 1 without a split) for token t and 64-head tile ht (heads h0 .. h0+63),
// and the key blocks [b_begin, b_end) of the split (ceil(nb / num_splits) blocks each; empty
// past the end of the token's key list).
struct CtaWork {
  int64_t t;
  int ht, h0, split;
  TokenKeys tk;
  int b_begin, b_end;
};
template <bool kSplit>
__device__ __forceinline__ CtaWork cta_work(const SparseAttnParams& p) {
  const int n_ht = (static_cast<int>(p.num_heads) + kBlockM - 1) / kBlockM;
  CtaWork w;
  int64_t bid = blockIdx.x;
  w.split = 0;
  if (kSplit) {
    w.split = static_cast<int>(bid % p.num_splits);
    bid /= p.num_splits;
  }
  w.ht = static_cast<int>(bid % n_ht);
  w.t = bid / n_ht;
  w.h0 = w.ht * kBlockM;
  w.tk = token_keys(p, w.t);
  w.b_begin = 0;
  w.b_end = w.tk.nb;
  if (kSplit) {
    const int per = (w.tk.nb + p.num_splits - 1) / p.num_splits;
    w.b_begin = min(w.tk.nb, w.split * per);
    w.b_end = min(w.tk.nb, w.b_begin + per);
  }
  return w;
}

// ---------------------------------------------------------------------------------------------
// Main kernel. kSplit: write fp32 partials (O / l, log2-sum-exp, any-valid flag) to the
// workspace for sparse_attn_combine_kernel instead of the final output.
// ---------------------------------------------------------------------------------------------
template <int D, int WM, int WN, bool kSplit>
__global__ void __launch_bounds__(WM * WN * 32, 1)
    sparse_attn_fwd_kernel(const SparseAttnParams p) {
  using C = Cfg<D, WM, WN>;
  constexpr int RW = C::kRowsW, MT = C::kMT, NTO = C::kNTO, TPR = C::kTPR, CPT = C::kCPT;
  constexpr int RC = C::kChunks;  // chunks per row of the Q / K / O tiles
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t sQ = smem_u32(smem + C::kQOff);
  const uint32_t sK0 = smem_u32(smem + C::kKOff);
  const uint32_t sP = smem_u32(smem + C::kPOff);
  float* red_max = reinterpret_cast<float*>(smem + C::kRedOff);  // [WN][64]
  float* red_sum = red_max + WN * kBlockM;                         // [WN][64]
  uint8_t* s_valid = smem + C::kValidOff;                          // [2][64]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WN, wn = warp % WN;
  const int g = lane >> 2, tg = lane & 3;

  const int H = static_cast<int>(p.num_heads);
  const CtaWork cw = cta_work<kSplit>(p);
  const int64_t t = cw.t;
  const int h0 = cw.h0, b_begin = cw.b_begin, b_end = cw.b_end;
  const TokenKeys& tk = cw.tk;

  // Loader mapping (Q, K blocks, O store): row lrow, chunks lc0 + i*TPR.
  const int lrow = tid / TPR, lc0 = tid % TPR;
  const char* dummy = static_cast<const char*>(p.q);  // a valid global address (never read)
  const __nv_bfloat16* kv1 = static_cast<const __nv_bfloat16*>(p.kv);
  const __nv_bfloat16* kv2 = static_cast<const __nv_bfloat16*>(p.extra_kv);
  bool any_valid = false;

  auto issue_kv = [&](int b, int idx, int stage) {
    const bool main_scope = b < tk.nb1;
    const int64_t n = main_scope ? p.n_kv : p.n_extra_kv;
    const bool valid = idx >= 0 && static_cast<int64_t>(idx) < n;
    any_valid |= valid;
    const char* src = dummy;
    if (valid) {
      src = main_scope ? reinterpret_cast<const char*>(kv1 + static_cast<int64_t>(idx) * p.kv_stride)
                       : reinterpret_cast<const char*>(kv2 + static_cast<int64_t>(idx) *
                                                                 p.extra_kv_stride);
    }
    const uint32_t dst = sK0 + stage * C::kTileBytes;
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      const int c = lc0 + i * TPR;
      cp_async16(dst + swz<RC>(lrow, c), src + (valid ? c * 16 : 0), valid ? 16 : 0);
    }
    if (lc0 == 0) s_valid[stage * kBlockN + lrow] = valid ? 1 : 0;
  };

  // ---- prologue: Q tile + first key block ----
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
      cp_async16(sQ + swz<RC>(lrow, c), src + (hv ? c * 16 : 0), hv ? 16 : 0);
    }
  }
  if (b_begin < b_end) issue_kv(b_begin, fetch_index(tk, b_begin, lrow), 0);
  cp_async_commit();
  int next_idx = b_begin + 1 < b_end ? fetch_index(tk, b_begin + 1, lrow) : -1;

  float o[MT][NTO][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NTO; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][nt][e] = 0.f;
  float m_run[MT][2], l_run[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    m_run[mt][0] = m_run[mt][1] = -INFINITY;
    l_run[mt][0] = l_run[mt][1] = 0.f;
  }
  const float sc2 = p.softmax_scale * kLog2e;

  for (int b = b_begin; b < b_end; ++b) {
    const int stage = (b - b_begin) & 1;
    cp_async_wait_all();
    __syncthreads();  // block b visible to all; everyone is done with block b-1's stage
    if (b + 1 < b_end) issue_kv(b + 1, next_idx, stage ^ 1);
    cp_async_commit();
    next_idx = b + 2 < b_end ? fetch_index(tk, b + 2, lrow) : -1;  // consumed next iteration

    const uint32_t sK = sK0 + stage * C::kTileBytes;

    // ---- S = Q K^T: rows wm*RW .. +RW, keys wn*16 .. +16 ----
    float s[MT][2][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
    const int a_row = wm * RW + (lane & 15);
    const int a_hi = lane >> 4;
    const int b_row = wn * 16 + (lane & 7) + ((lane >> 4) << 3);
    const int b_hi = (lane >> 3) & 1;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) ldsm_x4(a[mt], sQ + swz<RC>(a_row + mt * 16, kk * 2 + a_hi));
      uint32_t bb[4];
      ldsm_x4(bb, sK + swz<RC>(b_row, kk * 2 + b_hi));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_bf16(s[mt][0], a[mt], bb[0], bb[1]);
        mma_bf16(s[mt][1], a[mt], bb[2], bb[3]);
      }
    }

    // ---- mask + scale (log2 domain), row max over this warp's 16 keys ----
    const uint8_t* vflag = s_valid + stage * kBlockN + wn * 16;
    bool key_ok[2][2];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) key_ok[nt][e] = vflag[nt * 8 + 2 * tg + e] != 0;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          s[mt][nt][e] = key_ok[nt][e & 1] ? s[mt][nt][e] * sc2 : -INFINITY;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = fmaxf(fmaxf(s[mt][0][2 * hf], s[mt][0][2 * hf + 1]),
                         fmaxf(s[mt][1][2 * hf], s[mt][1][2 * hf + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        if (tg == 0) red_max[wn * kBlockM + wm * RW + mt * 16 + hf * 8 + g] = mx;
      }
    named_barrier(1 + wm, WN * 32);

    // ---- new running max, P = 2^(s - m), partial row sums ----
    float alpha[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int row = wm * RW + mt * 16 + hf * 8 + g;
        float bm = red_max[row];
#pragma unroll
        for (int w = 1; w < WN; ++w) bm = fmaxf(bm, red_max[w * kBlockM + row]);
        const float m_new = fmaxf(m_run[mt][hf], bm);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        alpha[mt][hf] = exp2_approx(m_run[mt][hf] - m_use);  // 0 while nothing was valid
        m_run[mt][hf] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pv = exp2_approx(s[mt][nt][2 * hf + e] - m_use);
            s[mt][nt][2 * hf + e] = pv;
            sum += pv;
          }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        if (tg == 0) red_sum[wn * kBlockM + row] = sum;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const int col = wn * 16 + nt * 8 + 2 * tg;  // key within the block
          st_shared_u32(sP + swz<8>(row, col >> 3) + (col & 7) * 2,
                        pack_bf16x2(s[mt][nt][2 * hf], s[mt][nt][2 * hf + 1]));
        }
      }
    named_barrier(1 + wm, WN * 32);

    // ---- rescale O and l ----
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int row = wm * RW + mt * 16 + hf * 8 + g;
        float bs = 0.f;
#pragma unroll
        for (int w = 0; w < WN; ++w) bs += red_sum[w * kBlockM + row];
        l_run[mt][hf] = l_run[mt][hf] * alpha[mt][hf] + bs;
#pragma unroll
        for (int nt = 0; nt < NTO; ++nt) {
          o[mt][nt][2 * hf] *= alpha[mt][hf];
          o[mt][nt][2 * hf + 1] *= alpha[mt][hf];
        }
      }

    // ---- O += P V: rows wm*RW .. +RW, columns wn*(D/4) .. +D/4 ----
    const int v_row = (lane & 7) + (((lane >> 3) & 1) << 3);
    const int v_hi = lane >> 4;
#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks) {
      uint32_t pa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) ldsm_x4(pa[mt], sP + swz<8>(a_row + mt * 16, ks * 2 + a_hi));
#pragma unroll
      for (int j = 0; j < NTO / 2; ++j) {
        uint32_t vb[4];
        ldsm_x4_trans(vb, sK + swz<RC>(ks * 16 + v_row, wn * (C::kColsW / 8) + j * 2 + v_hi));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_bf16(o[mt][2 * j], pa[mt], vb[0], vb[1]);
          mma_bf16(o[mt][2 * j + 1], pa[mt], vb[2], vb[3]);
        }
      }
    }
  }

  cp_async_wait_all();  // the Q tile when this CTA had no block
  // Every warp is past its last read of Q / K / P: the Q tile may now stage the output.
  const bool any = __syncthreads_or(any_valid ? 1 : 0) != 0;

  if constexpr (!kSplit) {
    __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int row = wm * RW + mt * 16 + hf * 8 + g;
        const int h = h0 + row;
        const float m_use = m_run[mt][hf] == -INFINITY ? 0.f : m_run[mt][hf];
        const float sink2 = h < H ? __ldg(p.attn_sink + h) * kLog2e : 0.f;
        const float denom = l_run[mt][hf] + exp2_approx(sink2 - m_use);
        const float inv = any ? 1.f / denom : 0.f;
        if (wn == 0 && tg == 0 && h < H) {
          p.lse[t * p.lse_stride_token + static_cast<int64_t>(h) * p.lse_stride_head] =
              any ? (m_use + log2f(l_run[mt][hf])) * kLn2 : INFINITY;
        }
#pragma unroll
        for (int nt = 0; nt < NTO; ++nt) {
          const int col = wn * C::kColsW + nt * 8 + 2 * tg;
          st_shared_u32(sQ + swz<RC>(row, col >> 3) + (col & 7) * 2,
                        pack_bf16x2(o[mt][nt][2 * hf] * inv, o[mt][nt][2 * hf + 1] * inv));
        }
      }
    __syncthreads();
    if (h0 + lrow < H) {
      char* dst = reinterpret_cast<char*>(out + t * p.out_stride_token +
                                          static_cast<int64_t>(h0 + lrow) * p.out_stride_head);
#pragma unroll
      for (int i = 0; i < CPT; ++i) {
        const int c = lc0 + i * TPR;
        *reinterpret_cast<uint4*>(dst + c * 16) = ld_shared_v4(sQ + swz<RC>(lrow, c));
      }
    }
  } else {
    // Partials: ws_o [splits][T][H][D] = O / l, ws_lse [splits][T][H] = m + log2 l (log2
    // domain; -inf when l == 0), ws_flag [splits][T][n_ht] = any valid key.
    const int64_t T = p.num_tokens;
    float* ws_o = static_cast<float*>(p.workspace);
    float* ws_lse = ws_o + static_cast<int64_t>(p.num_splits) * T * H * D;
    float* ws_flag = ws_lse + static_cast<int64_t>(p.num_splits) * T * H;
    const int64_t st = static_cast<int64_t>(cw.split) * T + t;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int row = wm * RW + mt * 16 + hf * 8 + g;
        const int h = h0 + row;
        if (h >= H) continue;
        const float l = l_run[mt][hf];
        const float m_use = m_run[mt][hf] == -INFINITY ? 0.f : m_run[mt][hf];
        const float inv_l = l == 0.f ? 0.f : 1.f / l;
        float* orow = ws_o + (st * H + h) * D;
#pragma unroll
        for (int nt = 0; nt < NTO; ++nt) {
          const int col = wn * C::kColsW + nt * 8 + 2 * tg;
          *reinterpret_cast<float2*>(orow + col) =
              make_float2(o[mt][nt][2 * hf] * inv_l, o[mt][nt][2 * hf + 1] * inv_l);
        }
        if (wn == 0 && tg == 0) ws_lse[st * H + h] = l == 0.f ? -INFINITY : m_use + log2f(l);
      }
    if (tid == 0) ws_flag[st * ((H + kBlockM - 1) / kBlockM) + cw.ht] = any ? 1.f : 0.f;
  }
}

// Merge of the split partials: one CTA per (token, head), kCombineThreads threads (any block
// size up to that works). A decode call at batch 1 splits a long key list over up to 132 CTAs,
// so the merge reads ~130 partials of D floats per head: a thread that walked every split of
// its columns one after another waited on ~130 dependent L2 round trips (the previous merge,
// 64 threads x 8 columns: most of an HCA call at 1M context). Here the splits are cut into G
// contiguous groups (G = threads / (D / 4), each thread one float4 column of one group, 8
// loads in flight), the groups' sums are added in group order through shared memory, and the
// log-sum-exp's max is reduced over all threads. Deterministic: a given split count always
// adds in the same order (groups in order, each group's splits in order); L is the serial sum
// in split order as before.
constexpr int kCombineThreads = 512;
// Threads of a merge CTA for `ns` splits: the groups pay only when there are many splits (a
// 512-thread CTA per (token, head) measured 5-10 us slower than the 64-thread merge at 9-18
// splits on an H100, bench/README.md "Session of 2026-12-06, tenth"); up to 32 splits one group
// of 64 threads walks them (8 loads in flight per thread).
inline int combine_threads(int ns) { return ns > 32 ? kCombineThreads : 64; }

template <int D>
__global__ void __launch_bounds__(kCombineThreads) sparse_attn_combine_kernel(const SparseAttnParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // The FP8 decode kernel (sparse_attn_fp8_sm90.cuh) launches this grid with programmatic
  // dependent launch: wait until the main grid has completed and its partials are visible.
  // Returns at once for an ordinary launch.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  constexpr int C4 = D / 4;  // float4 columns of a partial
  __shared__ float w_s[kSparseAttnMaxSplits];
  __shared__ float4 part[kCombineThreads];  // [group][column]
  __shared__ float red_m[kCombineThreads / 32];
  __shared__ int red_any[kCombineThreads / 32];
  __shared__ float s_inv;
  const int H = static_cast<int>(p.num_heads);
  const int n_ht = (H + kBlockM - 1) / kBlockM;
  const int ns = p.num_splits;
  const int64_t T = p.num_tokens;
  const int h = static_cast<int>(blockIdx.x % H);
  const int64_t t = blockIdx.x / H;
  const int tid = threadIdx.x, nthr = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, n_warps = (nthr + 31) >> 5;
  const float* ws_o = static_cast<const float*>(p.workspace);
  const float* ws_lse = ws_o + static_cast<int64_t>(ns) * T * H * D;
  const float* ws_flag = ws_lse + static_cast<int64_t>(ns) * T * H;
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out) + t * p.out_stride_token +
                       static_cast<int64_t>(h) * p.out_stride_head;

  // max of the splits' lse (a NaN wins and stays) and whether any split saw a valid key
  auto nan_max = [](float a, float b) { return (b > a || b != b) ? b : a; };
  float m = -INFINITY;
  bool any = false;
  for (int s = tid; s < ns; s += nthr) {
    any |= ws_flag[(static_cast<int64_t>(s) * T + t) * n_ht + h / kBlockM] != 0.f;
    m = nan_max(m, ws_lse[(static_cast<int64_t>(s) * T + t) * H + h]);
  }
  for (int o = 16; o > 0; o >>= 1) {
    m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, o));
    any = __any_sync(0xffffffffu, any);
  }
  if (lane == 0) red_m[warp] = m, red_any[warp] = any ? 1 : 0;
  __syncthreads();
  float M = -INFINITY;
  int any_all = 0;
  for (int w = 0; w < n_warps; ++w) M = nan_max(M, red_m[w]), any_all |= red_any[w];
  const float M_use = M == -INFINITY ? 0.f : M;
  for (int s = tid; s < ns; s += nthr)
    w_s[s] = any_all ? exp2_approx(ws_lse[(static_cast<int64_t>(s) * T + t) * H + h] - M_use) : 0.f;
  __syncthreads();
  if (tid == 0) {
    float L = 0.f;
    for (int s = 0; s < ns; ++s) L += w_s[s];
    const float denom = L + exp2_approx(__ldg(p.attn_sink + h) * kLog2e - M_use);
    s_inv = any_all ? 1.f / denom : 0.f;
    p.lse[t * p.lse_stride_token + static_cast<int64_t>(h) * p.lse_stride_head] =
        any_all ? (M_use + log2f(L)) * kLn2 : INFINITY;
  }

  // each (group, column) item: the sum over the group's splits, in split order
  const int G = nthr >= C4 ? nthr / C4 : 1;
  const int per = (ns + G - 1) / G;
  for (int item = tid; item < G * C4; item += nthr) {
    const int g = item / C4, c4 = item % C4;
    const int s0 = g * per, s1 = min(ns, s0 + per);
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    const float4* src = reinterpret_cast<const float4*>(ws_o) + (t * H + h) * C4 + c4;
    const int64_t split_stride = T * H * C4;  // float4s between splits
    for (int s = s0; s < s1; s += 8) {
      float4 x[8];
      float w[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        w[u] = s + u < s1 ? w_s[s + u] : 0.f;
        // an empty split (partial 0) or no valid key at all: not read, not added
        if (w[u] != 0.f) x[u] = src[static_cast<int64_t>(s + u) * split_stride];
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        if (w[u] == 0.f) continue;
        acc.x += w[u] * x[u].x; acc.y += w[u] * x[u].y;
        acc.z += w[u] * x[u].z; acc.w += w[u] * x[u].w;
      }
    }
    part[item] = acc;
  }
  __syncthreads();
  const float inv = s_inv;
  for (int c4 = tid; c4 < C4; c4 += nthr) {
    float4 a = part[c4];
    for (int g = 1; g < G; ++g) {
      const float4 b = part[g * C4 + c4];
      a.x += b.x; a.y += b.y; a.z += b.z; a.w += b.w;
    }
    uint2 v;
    v.x = pack_bf16x2(a.x * inv, a.y * inv);
    v.y = pack_bf16x2(a.z * inv, a.w * inv);
    *reinterpret_cast<uint2*>(out + c4 * 4) = v;
  }
}

// Launch of one configuration (the public sparse_attn() validates p first).
template <int D, int WM, int WN>
cudaError_t launch(const SparseAttnParams& p, cudaStream_t stream) {
  using C = Cfg<D, WM, WN>;
  const int64_t n_ht = (p.num_heads + kBlockM - 1) / kBlockM;
  const int64_t ctas = p.num_tokens * n_ht * p.num_splits;
  const bool split = p.num_splits > 1;
  if (ctas > INT_MAX || (split && p.num_tokens * p.num_heads > INT_MAX)) return cudaErrorInvalidValue;
  const void* fn = split ? reinterpret_cast<const void*>(&sparse_attn_fwd_kernel<D, WM, WN, true>)
                         : reinterpret_cast<const void*>(&sparse_attn_fwd_kernel<D, WM, WN, false>);
  cudaError_t err =
      cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem);
  if (err != cudaSuccess) return err;
  if (split) {
    sparse_attn_fwd_kernel<D, WM, WN, true>
        <<<static_cast<unsigned>(ctas), C::kThreads, C::kSmem, stream>>>(p);
  } else {
    sparse_attn_fwd_kernel<D, WM, WN, false>
        <<<static_cast<unsigned>(ctas), C::kThreads, C::kSmem, stream>>>(p);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess || !split) return err;
  sparse_attn_combine_kernel<D>
      <<<static_cast<unsigned>(p.num_tokens * p.num_heads), combine_threads(p.num_splits), 0, stream>>>(p);
  return cudaGetLastError();
}

// =============================================================================================
// Hopper wgmma kernel (head_dim 512; 2 warpgroups = 8 warps, 64 heads per CTA).
//
// Same pipeline, masking, online softmax and epilogue as sparse_attn_fwd_kernel, but both
// products run as warpgroup MMAs with operands read straight from shared memory:
//   S  [64 heads x 32 keys] per warpgroup (keys 32*wg ..): wgmma m64n32k16, A = Q, B = K tile,
//      both K-major with the 128-byte swizzle (descriptor start advanced 32 B per k16 step);
//   O  [64 heads x 256 cols] per warpgroup (cols 256*wg ..): wgmma m64n256k16, A = P (bf16,
//      shared, K-major), B = the same K tile read MN-major (transposed: V = K).
// Tiles are stored as 64-column slices [64 rows x 128 B] (8 KB, 1024-byte aligned), chunk
// ^ (row & 7) inside each 128-byte row: the canonical SW128 layout wgmma expects.
// The row max / row sum of each 16-row slab is exchanged between the two warpgroups through
// shared memory; P is complete for both warpgroups after one __syncthreads.
// =============================================================================================
// wgmma exists only in sm_90a device code. Other targets of a multi-arch build compile the
// kernel as a trap, and the host never launches it there (dispatch: compute capability 9.0 only).
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DSV4_SPARSE_ATTN_WGMMA 0
#else
#define DSV4_SPARSE_ATTN_WGMMA 1
#endif

__device__ __forceinline__ uint32_t swz128(int row, int chunk) {
  return static_cast<uint32_t>((chunk >> 3) * (kBlockN * 128) + row * 128 +
                               (((chunk & 7) ^ (row & 7)) << 4));
}

// Shared-memory matrix descriptor, 128-byte swizzle (layout type 1 in bits 62-63).
__device__ __forceinline__ uint64_t smem_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((saddr & 0x3FFFFu) >> 4) |
         (static_cast<uint64_t>((lbo >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFFu) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() {
#if DSV4_SPARSE_ATTN_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if DSV4_SPARSE_ATTN_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_wait_all() {
#if DSV4_SPARSE_ATTN_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}
// Generic-proxy shared-memory writes (cp.async, st.shared) made visible to wgmma's async proxy.
__device__ __forceinline__ void fence_proxy_async() {
#if DSV4_SPARSE_ATTN_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Keeps the compiler from touching an accumulator across wgmma.wait_group.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

__device__ __forceinline__ void wgmma_m64n32k16_ss(float (&d)[16], uint64_t desc_a, uint64_t desc_b) {
#if DSV4_SPARSE_ATTN_WGMMA
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
      "}, %16, %17, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(desc_a), "l"(desc_b), "r"(1));
#endif
}

__device__ __forceinline__ void wgmma_m64n256k16_ss_tb(float (&d)[128], uint64_t desc_a, uint64_t desc_b) {
#if DSV4_SPARSE_ATTN_WGMMA
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, p, 1, 1, 0, 1;\n}\n"
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
      : "l"(desc_a), "l"(desc_b), "r"(1));
#endif
}

// 8-byte async copy (src_bytes = 0 zero-fills).
__device__ __forceinline__ void cp_async8(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

// fp32 value of a UE8M0 scale byte: 2^(byte - 127), byte 0 = 2^-127 (a subnormal), byte 255 =
// NaN (OCP MX e8m0, as dsv4.ops.quant.e8m0_to_float; no writer produces 0 or 255).
__device__ __forceinline__ float ue8m0_value(uint32_t byte) {
  return byte == 0     ? __uint_as_float(0x00400000u)
         : byte == 255 ? __uint_as_float(0x7FC00000u)
                       : __uint_as_float(byte << 23);
}

// The same scale as bf16 bits in both 16-bit lanes: byte 0 = 2^-127 (the bf16 subnormal
// 0x0040), byte 255 = NaN (0x7FC0), else byte << 7; exact (every 2^e, e >= -133, is a bf16).
__device__ __forceinline__ uint32_t ue8m0_bf16x2(uint32_t byte) {
  const uint32_t h = byte == 0 ? 0x0040u : byte == 255 ? 0x7FC0u : byte << 7;
  return h * 0x00010001u;
}

// Dequantises a raw MODEL1 stage ([64 x 576 B] rows then [64 x 8 B] scales) into the bf16 K
// tile at shared address sK (SW128 layout, swz128): nope dim c = e4m3 * 2^(scale[c/64] - 127),
// exact in bf16 for the scales the writers produce (>= 2^-22); rope dims copied. Every thread
// of the CTA calls it (256 threads, 16 chunks of 8 values each).
__device__ __forceinline__ void dequant_model1_tile(const uint8_t* raw, uint32_t sK) {
  constexpr int kRow = kModel1TokenBytes;
  const uint8_t* scales = raw + kBlockN * kRow;
  for (int item = threadIdx.x; item < kBlockN * 64; item += blockDim.x) {
    const int row = item >> 6, c = item & 63;  // c: 16-byte bf16 chunk (8 dims) of the row
    uint4 v;
    if (c < kModel1Nope / 8) {
      const uint2 q = *reinterpret_cast<const uint2*>(raw + row * kRow + c * 8);
      const float sc = ue8m0_value(scales[row * kModel1ScaleBytes + (c >> 3)]);
      uint32_t w[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint32_t word = k < 2 ? q.x : q.y;
        const __nv_fp8x2_storage_t pair =
            static_cast<__nv_fp8x2_storage_t>((word >> (16 * (k & 1))) & 0xffffu);
        const __half2 h = __half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3));
        const float2 f = __half22float2(h);
        w[k] = pack_bf16x2(f.x * sc, f.y * sc);
      }
      v = make_uint4(w[0], w[1], w[2], w[3]);
    } else {
      v = *reinterpret_cast<const uint4*>(raw + row * kRow + kModel1Nope + (c - 56) * 16);
    }
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(sK + swz128(row, c)),
                 "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
  }
}

// ---------------------------------------------------------------------------------------------
// One consumer warpgroup's work on one 64-key block, shared by the two head_dim-512 wgmma
// kernels (sparse_attn_fwd_wgmma_kernel below and the warp-specialised FP8 kernel of
// sparse_attn_fp8_sm90.cuh), so both compute the same numbers in the same order. Two
// warpgroups split a 64-head tile: warpgroup wg takes keys 32*wg .. +32 of S and output columns
// (D/2)*wg .. +D/2 of O. Thread mapping of the wgmma accumulators: warp w4 (0..3) of the
// warpgroup owns rows 16*w4 .. +16; lane = 4*g + tg holds rows 16*w4 + g and +8 (hf = 0, 1).
// Q, K: bf16 [64 x D] SW128 tiles (swz128); P: bf16 [64 x 64] (swz<8>).
// ---------------------------------------------------------------------------------------------
constexpr uint32_t kWgSlice = kBlockN * 128;  // bytes of one 64-column slice of a SW128 tile

// s = Q K^T [64 heads x 32 keys: keys 32*wg .. +32 of the K tile at sK], fp32.
template <int D>
__device__ __forceinline__ void wg_scores(float (&s)[16], uint32_t sQ, uint32_t sK, int wg) {
#pragma unroll
  for (int i = 0; i < 16; ++i) s[i] = 0.f;
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t koff = (kk >> 2) * kWgSlice + (kk & 3) * 32;
    wgmma_m64n32k16_ss(s, smem_desc(sQ + koff, 16, 1024),
                       smem_desc(sK + koff + wg * 32 * 128, 16, 1024));
  }
  wgmma_commit();
  wgmma_wait_all();
  fence_regs(s);
}

// Masked online softmax of one block in the log2 domain: s * sc2 (sc2 = softmax scale * log2 e)
// where vflag[key] != 0 (vflag: this warpgroup's 32 validity bytes), -inf elsewhere; the row
// max of the 64 keys through red_max [2][64] and named barrier 1 + w4 (warps w4 and 4 + w4
// share these rows); m_run updated, alpha = 2^(m_old - m_new) (every exponent uses
// m_use = (m == -inf ? 0 : m)); this warpgroup's row sums to red_sum [2][64]; P = 2^(s - m_use)
// rounded to bf16 into sP. The caller publishes P (fence.proxy.async, then a barrier over both
// warpgroups) before wg_rescale and wg_pv.
__device__ __forceinline__ void wg_softmax_to_p(float (&s)[16], const uint8_t* vflag, float sc2,
                                                float (&m_run)[2], float (&alpha)[2],
                                                float* red_max, float* red_sum, uint32_t sP,
                                                int wg, int w4, int g, int tg) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const bool ok = vflag[i * 8 + 2 * tg + (e & 1)] != 0;
      s[i * 4 + e] = ok ? s[i * 4 + e] * sc2 : -INFINITY;
    }
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < 4; ++i) mx = fmaxf(mx, fmaxf(s[i * 4 + 2 * hf], s[i * 4 + 2 * hf + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    if (tg == 0) red_max[wg * kBlockM + w4 * 16 + hf * 8 + g] = mx;
  }
  named_barrier(1 + w4, 64);  // warps w4 and 4 + w4 share these 16 rows
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int row = w4 * 16 + hf * 8 + g;
    const float bm = fmaxf(red_max[row], red_max[kBlockM + row]);
    const float m_new = fmaxf(m_run[hf], bm);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    alpha[hf] = exp2_approx(m_run[hf] - m_use);
    m_run[hf] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float pv = exp2_approx(s[i * 4 + 2 * hf + e] - m_use);
        s[i * 4 + 2 * hf + e] = pv;
        sum += pv;
      }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (tg == 0) red_sum[wg * kBlockM + row] = sum;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int key = wg * 32 + i * 8 + 2 * tg;
      st_shared_u32(sP + swz<8>(row, key >> 3) + (key & 7) * 2,
                    pack_bf16x2(s[i * 4 + 2 * hf], s[i * 4 + 2 * hf + 1]));
    }
  }
}

// After P is published: l_run = l_run * alpha + both warpgroups' row sums; O *= alpha.
// o: this warpgroup's accumulator [64 rows x N/2 columns] in wgmma fragment order.
template <int N>
__device__ __forceinline__ void wg_rescale(float (&o)[N], float (&l_run)[2],
                                           const float (&alpha)[2], const float* red_sum, int w4,
                                           int g) {
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int row = w4 * 16 + hf * 8 + g;
    l_run[hf] = l_run[hf] * alpha[hf] + red_sum[row] + red_sum[kBlockM + row];
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      o[i * 4 + 2 * hf] *= alpha[hf];
      o[i * 4 + 2 * hf + 1] *= alpha[hf];
    }
  }
}

// O[:, (D/2)*wg .. +D/2] += P V (V = the K tile at sK read MN-major: LBO = the 64-column slice
// stride, SBO = the 8-key-row stride; verified on the H200 by check_sparse_attn, the swapped
// assignment gives wrong results). Returns with the wgmma waited.
template <int D>
__device__ __forceinline__ void wg_pv(float (&o)[D / 4], uint32_t sP, uint32_t sK, int wg) {
  static_assert(D == 512, "one m64n256k16 wgmma per 16 keys: D / 2 = 256 output columns");
  fence_regs(o);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < kBlockN / 16; ++ks) {
    wgmma_m64n256k16_ss_tb(o, smem_desc(sP + ks * 32, 16, 1024),
                           smem_desc(sK + wg * (D / 2 / 64) * kWgSlice + ks * 16 * 128, kWgSlice,
                                     1024u));
  }
  wgmma_commit();
  wgmma_wait_all();
  fence_regs(o);
}

// Epilogue without a split: O / (l + 2^(sink * log2 e - m)) (0 when no key of the CTA is
// valid) rounded to bf16 and staged into the Q tile at sQ (the caller makes sure no wgmma still
// reads it), lse = (m + log2 l) * ln 2 (+inf when no key is valid). The caller then publishes
// the staging to both warpgroups (a barrier) and calls store_staged_rows.
template <int D>
__device__ __forceinline__ void wg_stage_output(const SparseAttnParams& p, const float (&o)[D / 4],
                                                const float (&m_run)[2], const float (&l_run)[2],
                                                bool any, uint32_t sQ, int64_t t, int h0, int wg,
                                                int w4, int g, int tg) {
  constexpr int NO = D / 2;
  const int H = static_cast<int>(p.num_heads);
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int row = w4 * 16 + hf * 8 + g;
    const int h = h0 + row;
    const float m_use = m_run[hf] == -INFINITY ? 0.f : m_run[hf];
    const float sink2 = h < H ? __ldg(p.attn_sink + h) * kLog2e : 0.f;
    const float denom = l_run[hf] + exp2_approx(sink2 - m_use);
    const float inv = any ? 1.f / denom : 0.f;
    if (wg == 0 && tg == 0 && h < H) {
      p.lse[t * p.lse_stride_token + static_cast<int64_t>(h) * p.lse_stride_head] =
          any ? (m_use + log2f(l_run[hf])) * kLn2 : INFINITY;
    }
#pragma unroll
    for (int i = 0; i < NO / 8; ++i) {
      const int col = wg * NO + i * 8 + 2 * tg;
      st_shared_u32(sQ + swz128(row, col >> 3) + (col & 7) * 2,
                    pack_bf16x2(o[i * 4 + 2 * hf] * inv, o[i * 4 + 2 * hf + 1] * inv));
    }
  }
}

// The staged bf16 output rows to p.out with 16-byte coalesced stores: row lrow of the tile,
// chunks lc0 + i * TPR (i < CPT), as the Q tile was loaded.
template <int TPR, int CPT>
__device__ __forceinline__ void store_staged_rows(const SparseAttnParams& p, uint32_t sQ,
                                                  int64_t t, int h0, int lrow, int lc0) {
  if (h0 + lrow < static_cast<int>(p.num_heads)) {
    __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
    char* dst = reinterpret_cast<char*>(out + t * p.out_stride_token +
                                        static_cast<int64_t>(h0 + lrow) * p.out_stride_head);
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      const int c = lc0 + i * TPR;
      *reinterpret_cast<uint4*>(dst + c * 16) = ld_shared_v4(sQ + swz128(lrow, c));
    }
  }
}

// Epilogue of a key split: fp32 partials for sparse_attn_combine_kernel (O / l, the log2-sum-exp
// m + log2 l or -inf, and one any-valid flag per (split, token, head tile)).
template <int D>
__device__ __forceinline__ void wg_write_partials(const SparseAttnParams& p,
                                                  const float (&o)[D / 4],
                                                  const float (&m_run)[2],
                                                  const float (&l_run)[2], bool any, int64_t t,
                                                  int split, int h0, int ht, int wg, int w4,
                                                  int g, int tg, int tid) {
  constexpr int NO = D / 2;
  const int H = static_cast<int>(p.num_heads);
  const int n_ht = (H + kBlockM - 1) / kBlockM;
  const int64_t T = p.num_tokens;
  float* ws_o = static_cast<float*>(p.workspace);
  float* ws_lse = ws_o + static_cast<int64_t>(p.num_splits) * T * H * D;
  float* ws_flag = ws_lse + static_cast<int64_t>(p.num_splits) * T * H;
  const int64_t st = static_cast<int64_t>(split) * T + t;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int row = w4 * 16 + hf * 8 + g;
    const int h = h0 + row;
    if (h >= H) continue;
    const float l = l_run[hf];
    const float m_use = m_run[hf] == -INFINITY ? 0.f : m_run[hf];
    const float inv_l = l == 0.f ? 0.f : 1.f / l;
    float* orow = ws_o + (st * H + h) * D;
#pragma unroll
    for (int i = 0; i < NO / 8; ++i) {
      const int col = wg * NO + i * 8 + 2 * tg;
      *reinterpret_cast<float2*>(orow + col) =
          make_float2(o[i * 4 + 2 * hf] * inv_l, o[i * 4 + 2 * hf + 1] * inv_l);
    }
    if (wg == 0 && tg == 0) ws_lse[st * H + h] = l == 0.f ? -INFINITY : m_use + log2f(l);
  }
  if (tid == 0) ws_flag[st * n_ht + ht] = any ? 1.f : 0.f;
}

template <int D, bool kFp8 = false>
struct WgCfg {
  static_assert(D == 512, "the wgmma kernel is instantiated for head_dim 512");
  static constexpr int kThreads = 256;
  static constexpr int kChunks = D / 8;
  static constexpr int kTPR = kThreads / kBlockN;  // 4
  static constexpr int kCPT = kChunks / kTPR;      // 16
  static constexpr int kNO = D / 2;                // O columns per warpgroup
  static constexpr int kTileBytes = kBlockN * D * 2;
  static constexpr int kQOff = 0;
  static constexpr int kKOff = kTileBytes;
  // FP8 (MODEL1) keys: one bf16 K tile, fed from two raw stages of
  // [64 x 576 B (448 e4m3 | 64 bf16)][64 x 8 B scales] (the cache's own row layout).
  static constexpr int kRawRow = kModel1TokenBytes;                     // 576
  static constexpr int kRawStage = kBlockN * (kRawRow + kModel1ScaleBytes);  // 37376
  static constexpr int kRawChunks = kRawRow / 16;                       // 36
  static constexpr int kRawOff = kKOff + (kFp8 ? 1 : 2) * kTileBytes;
  static constexpr int kPOff = kFp8 ? kRawOff + 2 * kRawStage : kKOff + 2 * kTileBytes;
  static_assert(kPOff % 1024 == 0, "P is a 128-byte-swizzled wgmma operand");
  static constexpr int kRedOff = kPOff + kBlockM * kBlockN * 2;  // red_max, red_sum [2][64] f32
  static constexpr int kValidOff = kRedOff + 2 * 2 * kBlockM * 4;
  static constexpr int kSmemUsed = kValidOff + 2 * kBlockN;
  static constexpr int kSmem = kSmemUsed + 1024;  // slack to align the base to 1024 bytes
};

// V is read MN-major (transposed) with LBO = the 64-column slice stride (8 KB) and SBO = the
// 8-key-row stride (1 KB); verified on the H200 by check_sparse_attn (the swapped assignment
// gives wrong results).
template <int D, bool kSplit, bool kFp8>
__global__ void __launch_bounds__(256, 1) sparse_attn_fwd_wgmma_kernel(const SparseAttnParams p) {
#if !DSV4_SPARSE_ATTN_WGMMA
  __trap();
#else
  using C = WgCfg<D, kFp8>;
  constexpr int TPR = C::kTPR, CPT = C::kCPT, NO = C::kNO;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base - raw);
  const uint32_t sQ = base + C::kQOff;
  const uint32_t sK0 = base + C::kKOff;
  const uint32_t sP = base + C::kPOff;
  float* red_max = reinterpret_cast<float*>(smem + C::kRedOff);  // [2][64]
  float* red_sum = red_max + 2 * kBlockM;                         // [2][64]
  uint8_t* s_valid = smem + C::kValidOff;                         // [2][64]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, w4 = warp & 3;
  const int g = lane >> 2, tg = lane & 3;

  const int H = static_cast<int>(p.num_heads);
  const CtaWork cw = cta_work<kSplit>(p);
  const int64_t t = cw.t;
  const int h0 = cw.h0, b_begin = cw.b_begin, b_end = cw.b_end;
  const TokenKeys& tk = cw.tk;

  const int lrow = tid / TPR, lc0 = tid % TPR;
  const char* dummy = static_cast<const char*>(p.q);
  const __nv_bfloat16* kv1 = static_cast<const __nv_bfloat16*>(p.kv);
  const __nv_bfloat16* kv2 = static_cast<const __nv_bfloat16*>(p.extra_kv);
  bool any_valid = false;

  auto issue_kv = [&](int b, int idx, int stage) {
    const bool main_scope = b < tk.nb1;
    const int64_t n = main_scope ? p.n_kv : p.n_extra_kv;
    const bool valid = idx >= 0 && static_cast<int64_t>(idx) < n;
    any_valid |= valid;
    if constexpr (kFp8) {
      // Row idx of an FP8 pool: entry idx % bs of block idx / bs (kv_stride = block bytes).
      const char* src = dummy;
      const char* ssrc = dummy;
      if (valid) {
        const int64_t bsz = main_scope ? p.kv_block_size : p.extra_block_size;
        const int64_t blk = idx / bsz, e = idx - blk * bsz;
        const char* pool = main_scope ? reinterpret_cast<const char*>(p.kv)
                                      : reinterpret_cast<const char*>(p.extra_kv);
        const char* bbase = pool + blk * (main_scope ? p.kv_stride : p.extra_kv_stride);
        src = bbase + e * C::kRawRow;
        ssrc = bbase + bsz * C::kRawRow + e * kModel1ScaleBytes;
      }
      const uint32_t dst = base + C::kRawOff + stage * C::kRawStage;
#pragma unroll
      for (int i = 0; i < C::kRawChunks / TPR; ++i) {
        const int c = lc0 + i * TPR;
        cp_async16(dst + lrow * C::kRawRow + c * 16, src + (valid ? c * 16 : 0), valid ? 16 : 0);
      }
      if (lc0 == 0) {
        cp_async8(dst + kBlockN * C::kRawRow + lrow * kModel1ScaleBytes, ssrc, valid ? 8 : 0);
      }
    } else {
      const char* src = dummy;
      if (valid) {
        src = main_scope ? reinterpret_cast<const char*>(kv1 + static_cast<int64_t>(idx) * p.kv_stride)
                         : reinterpret_cast<const char*>(kv2 + static_cast<int64_t>(idx) *
                                                                   p.extra_kv_stride);
      }
      const uint32_t dst = sK0 + stage * C::kTileBytes;
#pragma unroll
      for (int i = 0; i < CPT; ++i) {
        const int c = lc0 + i * TPR;
        cp_async16(dst + swz128(lrow, c), src + (valid ? c * 16 : 0), valid ? 16 : 0);
      }
    }
    if (lc0 == 0) s_valid[stage * kBlockN + lrow] = valid ? 1 : 0;
  };

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
  }
  if (b_begin < b_end) issue_kv(b_begin, fetch_index(tk, b_begin, lrow), 0);
  cp_async_commit();
  int next_idx = b_begin + 1 < b_end ? fetch_index(tk, b_begin + 1, lrow) : -1;

  float o[NO / 2];
#pragma unroll
  for (int i = 0; i < NO / 2; ++i) o[i] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  const float sc2 = p.softmax_scale * kLog2e;
  for (int b = b_begin; b < b_end; ++b) {
    const int stage = (b - b_begin) & 1;
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();  // block b landed; every warp is done with block b-1 (its wgmmas waited)
    if (b + 1 < b_end) issue_kv(b + 1, next_idx, stage ^ 1);
    cp_async_commit();
    next_idx = b + 2 < b_end ? fetch_index(tk, b + 2, lrow) : -1;
    uint32_t sK = sK0 + stage * C::kTileBytes;
    if constexpr (kFp8) {
      sK = sK0;  // the single bf16 tile
      dequant_model1_tile(smem + C::kRawOff + stage * C::kRawStage, sK);
      fence_proxy_async();
      __syncthreads();  // the bf16 tile is complete for both warpgroups
    }

    // ---- S = Q K^T for keys 32*wg .. +32; masked online softmax; P to shared memory ----
    float s[16];
    wg_scores<D>(s, sQ, sK, wg);
    float alpha[2];
    wg_softmax_to_p(s, s_valid + stage * kBlockN + wg * 32, sc2, m_run, alpha, red_max, red_sum,
                    sP, wg, w4, g, tg);
    fence_proxy_async();
    __syncthreads();  // P complete (all 64 rows x 64 keys) for both warpgroups
    wg_rescale(o, l_run, alpha, red_sum, w4, g);
    // ---- O[:, 256*wg .. +256] += P V ----
    wg_pv<D>(o, sP, sK, wg);
  }

  cp_async_wait_all();
  const bool any = __syncthreads_or(any_valid ? 1 : 0) != 0;

  if constexpr (!kSplit) {
    wg_stage_output<D>(p, o, m_run, l_run, any, sQ, t, h0, wg, w4, g, tg);
    __syncthreads();
    store_staged_rows<TPR, CPT>(p, sQ, t, h0, lrow, lc0);
  } else {
    wg_write_partials<D>(p, o, m_run, l_run, any, t, cw.split, h0, cw.ht, wg, w4, g, tg, tid);
  }
#endif  // DSV4_SPARSE_ATTN_WGMMA
}

template <int D, bool kFp8 = false>
cudaError_t launch_wgmma(const SparseAttnParams& p, cudaStream_t stream) {
  using C = WgCfg<D, kFp8>;
  const int64_t n_ht = (p.num_heads + kBlockM - 1) / kBlockM;
  const int64_t ctas = p.num_tokens * n_ht * p.num_splits;
  const bool split = p.num_splits > 1;
  if (ctas > INT_MAX || (split && p.num_tokens * p.num_heads > INT_MAX)) return cudaErrorInvalidValue;
  const void* fn =
      split ? reinterpret_cast<const void*>(&sparse_attn_fwd_wgmma_kernel<D, true, kFp8>)
            : reinterpret_cast<const void*>(&sparse_attn_fwd_wgmma_kernel<D, false, kFp8>);
  cudaError_t err =
      cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem);
  if (err != cudaSuccess) return err;
  if (split) {
    sparse_attn_fwd_wgmma_kernel<D, true, kFp8>
        <<<static_cast<unsigned>(ctas), C::kThreads, C::kSmem, stream>>>(p);
  } else {
    sparse_attn_fwd_wgmma_kernel<D, false, kFp8>
        <<<static_cast<unsigned>(ctas), C::kThreads, C::kSmem, stream>>>(p);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess || !split) return err;
  sparse_attn_combine_kernel<D>
      <<<static_cast<unsigned>(p.num_tokens * p.num_heads), combine_threads(p.num_splits), 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sparse_attn_detail
}  // namespace dsv4
