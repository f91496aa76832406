// Standalone check (no torch) of the HCA dense mode and the FP8 MODEL1 cache read of
// dsv4::sparse_attn, by equivalence with paths check_sparse_attn already verifies against a
// double-precision loop:
//   1. HCA mode (extra lanes computed from a block table, scattered blocks, block sizes 1 / 2 /
//      61 / 64, per-token entry counts incl. 0 and > capacity, missing blocks, bad rows) gives
//      BIT-IDENTICAL out / lse to the same kernel fed the equivalent explicit index list (a
//      token without a row: length 0 in the list), also split (up to 130 splits; b = 4 at 3
//      and 33). The split workspace is poisoned with NaN before every call.
//   2. FP8 MODEL1 pools (packed here on the host: e4m3 + UE8M0 scales, FlashMLA's block layout)
//      give BIT-IDENTICAL results to bf16 pools holding the dequantised values (sm_90 only), in
//      sparse mode and in HCA mode, with and without the split-K path, through EVERY FP8 kernel
//      (DSV4_SPARSE_FP8=old: dequantisation between the GEMMs; =new: the warp-specialised
//      kernel of sparse_attn_fp8_sm90.cuh; =new2: the same with the whole-sector producer
//      mapping). "raw" cases fill the pools with random bytes (every
//      e4m3 value but the NaNs 0x7f / 0xff, scale bytes 3..127) and dequantise them on the host
//      with the reference formula (float(e4m3) * 2^(s-127), rounded to bf16): the exactness of
//      the new kernel's bit-level dequantisation over the whole byte range. "NaN" cases then
//      write the e4m3 NaN codes 0x7f / 0xff into one key of each pool and a scale byte 255
//      (NaN) into a third key: every FP8 kernel must give NaN exactly where the bf16 kernel
//      on the dequantised pools does (NaN = NaN whatever its bits; every other value
//      bit-identical), and some outputs must be NaN and some not.
//   3. (sm_90) Times the old, new and new2 FP8 kernels at FlashMLA's decode shapes (printed, not
//      checked; DSV4_CHECK_NO_TIMING=1 skips it, e.g. under compute-sanitizer).
// `--refusal` (sm_90): the split-K cases with the merge's programmatic launch refused
// (DSV4_TEST_REFUSE=launch, own_error.cuh: the plain launch instead, same bytes, no error left
// pending), each FP8 kernel also called with an error the caller left pending (it must reach the
// caller, never cleared), then with the variable unset.
// Prints PASS / FAIL (exit 1) or SKIP.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "dsv4/kv_cache.h"
#include "dsv4/sparse_attn.h"

#include "../kernels/own_error.cuh"
#include "check_common.h"

namespace {

using dsv4_check::bf16_to_float;
using dsv4_check::float_to_bf16;

constexpr int D = 512;

template <typename T>
T* dev(const std::vector<T>& h) {
  T* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, std::max<size_t>(h.size(), 1) * sizeof(T)));
  if (!h.empty()) CHECK_CUDA(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

// 2^ceil(log2(v)) for positive normal v (ops/quant.py ue8m0_scale).
float ue8m0(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  if ((b & 0x7fffffu) == 0) return v;
  b = ((b >> 23) + 1u) << 23;
  float r;
  std::memcpy(&r, &b, 4);
  return r;
}

// A MODEL1 pool of nb blocks x bs entries from bf16 entries [nb * bs, 512]; returns the bytes
// (block stride = bs * 584 rounded up to 576) and, in deq, the dequantised bf16 entries.
std::vector<uint8_t> pack_model1(const std::vector<uint16_t>& x, int64_t nb, int64_t bs,
                                 int64_t& block_stride, std::vector<uint16_t>& deq) {
  block_stride = (bs * dsv4::kModel1EntryBytes + 575) / 576 * 576;
  std::vector<uint8_t> pool(static_cast<size_t>(nb * block_stride), 0);
  deq.assign(x.size(), 0);
  for (int64_t r = 0; r < nb * bs; ++r) {
    const int64_t blk = r / bs, e = r % bs;
    uint8_t* base = pool.data() + blk * block_stride;
    uint8_t* tok = base + e * dsv4::kModel1TokenBytes;
    uint8_t* sc = base + bs * dsv4::kModel1TokenBytes + e * dsv4::kModel1ScaleBytes;
    for (int g = 0; g < 7; ++g) {
      float amax = 0.f;
      for (int c = 64 * g; c < 64 * g + 64; ++c) amax = std::max(amax, std::fabs(bf16_to_float(x[r * D + c])));
      const float s = ue8m0(std::max(amax, 1e-4f) / 448.f);
      uint32_t sb;
      std::memcpy(&sb, &s, 4);
      sc[g] = static_cast<uint8_t>((sb >> 23) & 0xff);
      for (int c = 64 * g; c < 64 * g + 64; ++c) {
        const float v = std::min(std::max(bf16_to_float(x[r * D + c]) / s, -448.f), 448.f);
        const __nv_fp8_e4m3 q(v);
        tok[c] = q.__x;
        deq[r * D + c] = float_to_bf16(static_cast<float>(q) * s);
      }
    }
    sc[7] = 0;
    for (int c = 448; c < D; ++c) {
      std::memcpy(tok + 448 + 2 * (c - 448), &x[r * D + c], 2);
      deq[r * D + c] = x[r * D + c];
    }
  }
  return pool;
}

// A MODEL1 pool of random bytes (nope bytes: any e4m3 but the NaNs; scale bytes 3..127; rope:
// random bf16) and, in deq, its entries dequantised by the reference formula.
std::vector<uint8_t> pack_raw_model1(int64_t nb, int64_t bs, std::mt19937& rng,
                                     int64_t& block_stride, std::vector<uint16_t>& deq) {
  block_stride = (bs * dsv4::kModel1EntryBytes + 575) / 576 * 576;
  std::vector<uint8_t> pool(static_cast<size_t>(nb * block_stride), 0);
  deq.assign(static_cast<size_t>(nb * bs * D), 0);
  std::uniform_int_distribution<int> byte(0, 255), sbyte(3, 127);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t r = 0; r < nb * bs; ++r) {
    const int64_t blk = r / bs, e = r % bs;
    uint8_t* base = pool.data() + blk * block_stride;
    uint8_t* tok = base + e * dsv4::kModel1TokenBytes;
    uint8_t* sc = base + bs * dsv4::kModel1TokenBytes + e * dsv4::kModel1ScaleBytes;
    for (int g = 0; g < 7; ++g) sc[g] = static_cast<uint8_t>(sbyte(rng));
    sc[7] = static_cast<uint8_t>(byte(rng));  // the pad byte: never read as a scale
    for (int c = 0; c < 448; ++c) {
      int v = byte(rng);
      if ((v & 0x7f) == 0x7f) v &= 0xfe;  // no NaN byte
      tok[c] = static_cast<uint8_t>(v);
      __nv_fp8_e4m3 q;
      q.__x = static_cast<__nv_fp8_storage_t>(v);
      deq[r * D + c] = float_to_bf16(static_cast<float>(q) * std::ldexp(1.f, sc[c / 64] - 127));
    }
    for (int c = 448; c < D; ++c) {
      const uint16_t x = float_to_bf16(nd(rng));
      std::memcpy(tok + 448 + 2 * (c - 448), &x, 2);
      deq[r * D + c] = x;
    }
  }
  return pool;
}

// Makes nope dim c of pool row r the e4m3 byte `code` (deq: its value under the row's scale,
// NaN for 0x7f / 0xff).
void set_code(std::vector<uint8_t>& pool, std::vector<uint16_t>& deq, int64_t bs,
              int64_t block_stride, int64_t r, int c, uint8_t code) {
  uint8_t* base = pool.data() + (r / bs) * block_stride;
  uint8_t* tok = base + (r % bs) * dsv4::kModel1TokenBytes;
  const uint8_t s = base[bs * dsv4::kModel1TokenBytes + (r % bs) * dsv4::kModel1ScaleBytes +
                         c / 64];
  tok[c] = code;
  __nv_fp8_e4m3 q;
  q.__x = static_cast<__nv_fp8_storage_t>(code);
  deq[r * D + c] = float_to_bf16(static_cast<float>(q) * std::ldexp(1.f, s - 127));
}

// Makes scale byte g of pool row r the byte `s` (deq of its 64 dims recomputed; 255 = NaN, the
// OCP e8m0 NaN, as the reference reads the pool: every value of the group NaN).
void set_scale(std::vector<uint8_t>& pool, std::vector<uint16_t>& deq, int64_t bs,
               int64_t block_stride, int64_t r, int g, uint8_t s) {
  uint8_t* base = pool.data() + (r / bs) * block_stride;
  const uint8_t* tok = base + (r % bs) * dsv4::kModel1TokenBytes;
  base[bs * dsv4::kModel1TokenBytes + (r % bs) * dsv4::kModel1ScaleBytes + g] = s;
  const float k = s == 255 ? NAN : std::ldexp(1.f, s - 127);
  for (int c = 64 * g; c < 64 * g + 64; ++c) {
    __nv_fp8_e4m3 q;
    q.__x = static_cast<__nv_fp8_storage_t>(tok[c]);
    deq[r * D + c] = float_to_bf16(static_cast<float>(q) * k);
  }
}

struct Result {
  std::vector<uint16_t> out;
  std::vector<float> lse;
};

// --refusal: also make each FP8 kernel's call with an error pending before it (pending_kept)
bool g_refusal = false;

// kept != nullptr (--refusal): leave cudaErrorInvalidValue pending before the call, as an
// unrelated earlier launch of the caller could; *kept = whether the call returned it or left it
// pending (never cleared). The outputs are then whatever ran (the op may stop at its first
// launch check).
Result launch(dsv4::SparseAttnParams p, int64_t T, int H, int splits, bool* kept = nullptr) {
  uint16_t* d_out;
  float* d_lse;
  CHECK_CUDA(cudaMalloc(&d_out, T * H * D * 2));
  CHECK_CUDA(cudaMemset(d_out, 0xff, T * H * D * 2));
  CHECK_CUDA(cudaMalloc(&d_lse, T * H * 4));
  CHECK_CUDA(cudaMemset(d_lse, 0xff, T * H * 4));
  p.out = d_out;
  p.out_stride_token = H * D;
  p.out_stride_head = D;
  p.lse = d_lse;
  p.lse_stride_token = H;
  p.lse_stride_head = 1;
  p.num_tokens = T;
  p.num_heads = H;
  p.head_dim = D;
  p.num_splits = splits;
  void* ws = nullptr;
  if (splits > 1) {
    p.workspace_bytes = dsv4::sparse_attn_workspace_bytes(T, H, D, splits);
    CHECK_CUDA(cudaMalloc(&ws, p.workspace_bytes));
    // poisoned (NaN): a partial the merge reads but no CTA wrote shows as NaN
    CHECK_CUDA(cudaMemset(ws, 0xff, p.workspace_bytes));
    p.workspace = ws;
  }
  if (kept != nullptr) {
    const bool injected = dsv4_check::leave_error_pending();
    const cudaError_t ret = dsv4::sparse_attn(p, nullptr);
    const cudaError_t pend = cudaGetLastError();
    *kept = dsv4_check::pending_error_kept(injected, ret, pend);
    if (!*kept)
      std::printf("     pending probe: injected %d, returned %s, pending after %s\n", injected ? 1 : 0,
                  cudaGetErrorName(ret), cudaGetErrorName(pend));
  } else {
    CHECK_CUDA(dsv4::sparse_attn(p, nullptr));
    CHECK_CUDA(cudaGetLastError());  // the op leaves no error pending
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  Result r;
  r.out.resize(T * H * D);
  r.lse.resize(T * H);
  CHECK_CUDA(cudaMemcpy(r.out.data(), d_out, r.out.size() * 2, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(r.lse.data(), d_lse, r.lse.size() * 4, cudaMemcpyDeviceToHost));
  cudaFree(d_out);
  cudaFree(d_lse);
  if (ws) cudaFree(ws);
  return r;
}

bool bf16_nan(uint16_t v) { return (v & 0x7f80) == 0x7f80 && (v & 0x7f); }

// a == b bit for bit, except that a NaN equals any NaN. nan_expected: some (not all) outputs
// must be NaN; otherwise none may be.
bool same(const Result& a, const Result& b, const char* what, bool nan_expected = false) {
  bool ok = a.out.size() == b.out.size() && a.lse.size() == b.lse.size();
  size_t nan = 0;
  for (size_t i = 0; ok && i < a.out.size(); ++i) {
    const bool na = bf16_nan(a.out[i]), nb = bf16_nan(b.out[i]);
    ok = na == nb && (na || a.out[i] == b.out[i]);
    nan += na ? 1 : 0;
  }
  for (size_t i = 0; ok && i < a.lse.size(); ++i) {
    const bool na = std::isnan(a.lse[i]), nb = std::isnan(b.lse[i]);
    ok = na == nb && (na || std::memcmp(&a.lse[i], &b.lse[i], 4) == 0);
  }
  const bool nan_ok = nan_expected ? nan > 0 && nan < a.out.size() : nan == 0;
  std::printf("%s %s (NaN outputs: %zu)\n", ok && nan_ok ? "ok  " : "FAIL", what, nan);
  return ok && nan_ok;
}

// One problem: T tokens (2 per sequence), B = T / 2 sequences, window W per token (rows of a
// window pool of bs_w entries per block), compressed pool of nb blocks x bs, each sequence
// owning blocks scattered over the pool.
bool run(int H, int64_t B, int64_t bs, int max_entries, int splits, bool fp8, std::mt19937& rng,
         bool raw = false, bool nan = false) {
  const int64_t T = 2 * B, W = 128, bs_w = 64;
  const int64_t nbw = (B * W + bs_w - 1) / bs_w;
  const int64_t max_blocks = (max_entries + bs - 1) / bs + 1;
  const int64_t nb = B * max_blocks + 3;
  std::normal_distribution<float> nd(0.f, 1.f);
  auto rnd_bf16 = [&](size_t n, float s) {
    std::vector<uint16_t> v(n);
    for (auto& x : v) x = float_to_bf16(nd(rng) * s);
    return v;
  };
  std::vector<uint16_t> q = rnd_bf16(T * H * D, 1.5f);
  std::vector<uint16_t> win = rnd_bf16(nbw * bs_w * D, 1.f);
  std::vector<uint16_t> comp = rnd_bf16(nb * bs * D, 1.f);
  std::vector<float> sink(H);
  for (auto& s : sink) s = nd(rng);
  if (H >= 2) sink[0] = INFINITY;

  // window indices: the sequence's 128 rows, a few -1 at the front of token 0
  std::vector<int32_t> idx(T * W);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < W; ++k) idx[t * W + k] = static_cast<int32_t>((t / 2) * W + k);
  for (int k = 0; k < 70 && k < W; ++k) idx[k] = -1;
  // block table: scattered permutation; some -1 / out-of-range blocks
  std::vector<int32_t> perm(nb);
  for (int64_t i = 0; i < nb; ++i) perm[i] = static_cast<int32_t>(i);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> table(B * max_blocks);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < max_blocks; ++j) table[b * max_blocks + j] = perm[b * max_blocks + j];
  if (B > 1) table[1 * max_blocks + 0] = -1;
  if (B > 2) table[2 * max_blocks + 1] = static_cast<int32_t>(nb + 5);
  std::vector<int32_t> rows(T), lengths(T);
  std::uniform_int_distribution<int> ld(0, max_entries);
  for (int64_t t = 0; t < T; ++t) {
    rows[t] = static_cast<int32_t>(t / 2);
    lengths[t] = ld(rng);
  }
  lengths[0] = 0;
  if (T > 3) lengths[3] = static_cast<int32_t>(max_blocks * bs + 50);  // clamps to capacity
  if (T > 5) rows[5] = -3;                                            // no compressed key
  // the equivalent explicit list; a token without a block-table row has no compressed key in
  // the HCA mode, so its list has length 0 (a length of -1 entries is the same attention, but
  // the split partition counts those blocks, and the fp32 summation order would differ)
  const int64_t cap = max_blocks * bs;
  std::vector<int32_t> eidx(T * cap, -1), list_len(lengths);
  for (int64_t t = 0; t < T; ++t) {
    if (rows[t] < 0) list_len[t] = 0;
    if (rows[t] < 0) continue;
    const int64_t n = std::min<int64_t>(std::max(lengths[t], 0), cap);
    for (int64_t i = 0; i < n; ++i) {
      const int32_t blk = table[rows[t] * max_blocks + i / bs];
      if (blk >= 0 && blk < nb) eidx[t * cap + i] = static_cast<int32_t>(blk * bs + i % bs);
    }
  }

  std::vector<uint16_t> win_deq, comp_deq;
  int64_t wstride = 0, cstride = 0;
  std::vector<uint8_t> wpool, cpool;
  if (fp8 && raw) {
    wpool = pack_raw_model1(nbw, bs_w, rng, wstride, win_deq);
    cpool = pack_raw_model1(nb, bs, rng, cstride, comp_deq);
    if (nan) {  // needs B >= 3: tokens 2, 3 (window row W + 5) and 4, 5 (row 2W + 9) get NaN
      set_code(wpool, win_deq, bs_w, wstride, W + 5, 5, 0x7f);          // +NaN, first half
      set_scale(wpool, win_deq, bs_w, wstride, 2 * W + 9, 3, 255);      // scale NaN
      // -NaN in the last nope dim (second producer half) of the first entry of sequence 0's
      // first block (its second if the first is block 0: row 0 stays finite): token 1 if its
      // entry count reaches it.
      const int32_t blk = table[0] > 0 ? table[0] : table[1];
      set_code(cpool, comp_deq, bs, cstride, static_cast<int64_t>(blk) * bs, 447, 0xff);
    }
  } else if (fp8) {
    wpool = pack_model1(win, nbw, bs_w, wstride, win_deq);
    cpool = pack_model1(comp, nb, bs, cstride, comp_deq);
  } else {
    win_deq = win;
    comp_deq = comp;
  }
  dsv4::SparseAttnParams base;
  base.q = dev(q);
  base.q_stride_token = H * D;
  base.q_stride_head = D;
  base.indices = dev(idx);
  base.indices_stride = W;
  base.topk = W;
  base.attn_sink = dev(sink);
  base.softmax_scale = 1.f / std::sqrt(float(D));
  int32_t* d_len = dev(lengths);
  int32_t* d_list_len = dev(list_len);
  base.extra_topk_length = d_len;

  // bf16 explicit list (the verified path)
  dsv4::SparseAttnParams a = base;
  a.kv = dev(win_deq);
  a.kv_stride = D;
  a.n_kv = nbw * bs_w;
  a.extra_kv = dev(comp_deq);
  a.extra_kv_stride = D;
  a.n_extra_kv = nb * bs;
  a.extra_indices = dev(eidx);
  a.extra_indices_stride = cap;
  a.extra_topk = cap;
  a.extra_topk_length = d_list_len;
  const Result ra = launch(a, T, H, splits);

  // bf16 HCA mode
  dsv4::SparseAttnParams h = a;
  h.extra_indices = nullptr;
  h.extra_indices_stride = 0;
  h.extra_block_table = dev(table);
  h.extra_block_table_stride = max_blocks;
  h.extra_block_table_rows = B;
  h.extra_max_blocks = max_blocks;
  h.extra_block_size = bs;
  h.extra_rows = dev(rows);
  h.extra_topk_length = d_len;
  char name[160];
  std::snprintf(name, sizeof(name), "HCA == list   H=%d B=%lld bs=%lld entries<=%d splits=%d",
                H, (long long)B, (long long)bs, max_entries, splits);
  bool ok = same(launch(h, T, H, splits), ra, name, nan);

  if (fp8) {
    dsv4::SparseAttnParams f = a;  // FP8 pools, explicit list
    f.kv = dev(wpool);
    f.kv_stride = wstride;
    f.kv_format = dsv4::CacheFormat::kFp8Model1;
    f.kv_block_size = bs_w;
    f.extra_kv = dev(cpool);
    f.extra_kv_stride = cstride;
    f.extra_kv_format = dsv4::CacheFormat::kFp8Model1;
    f.extra_block_size = bs;
    dsv4::SparseAttnParams fh = f;  // FP8 pools, HCA mode
    fh.extra_indices = nullptr;
    fh.extra_block_table = h.extra_block_table;
    fh.extra_block_table_stride = max_blocks;
    fh.extra_block_table_rows = B;
    fh.extra_max_blocks = max_blocks;
    fh.extra_rows = h.extra_rows;
    fh.extra_topk_length = d_len;
    const char* kind = nan ? " raw bytes + NaN" : raw ? " raw bytes" : "";
    for (const char* kernel : {"old", "new", "new2"}) {
      setenv("DSV4_SPARSE_FP8", kernel, 1);
      std::snprintf(name, sizeof(name), "FP8 %s == bf16  H=%d B=%lld bs=%lld splits=%d%s (list)",
                    kernel, H, (long long)B, (long long)bs, splits, kind);
      ok &= same(launch(f, T, H, splits), ra, name, nan);
      std::snprintf(name, sizeof(name), "FP8 %s == bf16  H=%d B=%lld bs=%lld splits=%d%s (HCA)",
                    kernel, H, (long long)B, (long long)bs, splits, kind);
      ok &= same(launch(fh, T, H, splits), ra, name, nan);
      if (g_refusal) {
        bool kept = false;
        (void)launch(f, T, H, splits, &kept);
        std::printf("%-4s FP8 %s H=%d B=%lld splits=%d: error pending before the call kept\n",
                    kept ? "ok" : "FAIL", kernel, H, (long long)B, splits);
        ok &= kept;
      }
    }
    unsetenv("DSV4_SPARSE_FP8");
    cudaFree(const_cast<void*>(f.kv));
    cudaFree(const_cast<void*>(f.extra_kv));
  }
  cudaFree(const_cast<void*>(base.q));
  cudaFree(const_cast<int32_t*>(base.indices));
  cudaFree(const_cast<float*>(base.attn_sink));
  cudaFree(d_len);
  cudaFree(d_list_len);
  cudaFree(const_cast<void*>(a.kv));
  cudaFree(const_cast<void*>(a.extra_kv));
  cudaFree(const_cast<int32_t*>(a.extra_indices));
  cudaFree(const_cast<int32_t*>(h.extra_block_table));
  cudaFree(const_cast<int32_t*>(h.extra_rows));
  CHECK_CUDA(cudaGetLastError());
  return ok;
}

// Median time (us) of sparse_attn(p) under DSV4_SPARSE_FP8=old, =new and =new2, alternating, 20
// calls each after 3 warm-ups (L2 not flushed). Pools hold a constant byte pattern (timing only).
// splits > 0: that split count instead of sparse_attn_num_splits' (--time-splits).
void time_pair(dsv4::SparseAttnParams p, int64_t T, int H, const char* what, int splits = 0) {
  int dev_id = 0, sms = 0;
  CHECK_CUDA(cudaGetDevice(&dev_id));
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev_id));
  p.num_tokens = T;
  p.num_heads = H;
  p.head_dim = D;
  p.num_splits =
      splits > 0 ? splits : dsv4::sparse_attn_num_splits(T, H, p.topk, p.extra_topk, sms);
  void *out, *lse, *ws = nullptr;
  CHECK_CUDA(cudaMalloc(&out, T * H * D * 2));
  CHECK_CUDA(cudaMalloc(&lse, T * H * 4));
  p.out = out;
  p.out_stride_token = H * D;
  p.out_stride_head = D;
  p.lse = static_cast<float*>(lse);
  p.lse_stride_token = H;
  p.lse_stride_head = 1;
  if (p.num_splits > 1) {
    p.workspace_bytes = dsv4::sparse_attn_workspace_bytes(T, H, D, p.num_splits);
    CHECK_CUDA(cudaMalloc(&ws, p.workspace_bytes));
    p.workspace = ws;
  }
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  const char* kernels[3] = {"old", "new", "new2"};
  std::vector<float> t[3];
  for (int it = 0; it < 23; ++it) {
    for (int k = 0; k < 3; ++k) {
      setenv("DSV4_SPARSE_FP8", kernels[k], 1);
      CHECK_CUDA(cudaEventRecord(e0));
      CHECK_CUDA(dsv4::sparse_attn(p, nullptr));
      CHECK_CUDA(cudaEventRecord(e1));
      CHECK_CUDA(cudaEventSynchronize(e1));
      float ms = 0.f;
      CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
      if (it >= 3) t[k].push_back(ms * 1e3f);
    }
  }
  unsetenv("DSV4_SPARSE_FP8");
  float med[3];
  for (int k = 0; k < 3; ++k) {
    std::sort(t[k].begin(), t[k].end());
    med[k] = t[k][t[k].size() / 2];
  }
  std::printf("time %-44s splits %2d: old %8.1f us, new %8.1f us, new2 %8.1f us "
              "(new / old %.2f, new2 / old %.2f)\n",
              what, p.num_splits, med[0], med[1], med[2], med[1] / med[0], med[2] / med[0]);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFree(out);
  cudaFree(lse);
  if (ws) cudaFree(ws);
}

// A timing case's FP8 MODEL1 pool of n entries in blocks of bs (whole blocks), every byte 0x31
// (finite codes: the timing reads the bytes, the values do not matter).
void* timing_pool(int64_t n, int64_t bs) {
  void* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, (n / bs) * bs * dsv4::kModel1EntryBytes));
  CHECK_CUDA(cudaMemset(d, 0x31, (n / bs) * bs * dsv4::kModel1EntryBytes));
  return d;
}

// Frees the device buffers a timing case allocated for p (q, both pools, the index lists, the
// sink and the HCA block table, rows and lengths when present).
void free_timing_params(const dsv4::SparseAttnParams& p) {
  cudaFree(const_cast<void*>(p.q));
  cudaFree(const_cast<void*>(p.kv));
  cudaFree(const_cast<void*>(p.extra_kv));
  cudaFree(const_cast<int32_t*>(p.indices));
  cudaFree(const_cast<float*>(p.attn_sink));
  if (p.extra_indices) cudaFree(const_cast<int32_t*>(p.extra_indices));
  if (p.extra_block_table) cudaFree(const_cast<int32_t*>(p.extra_block_table));
  if (p.extra_rows) cudaFree(const_cast<int32_t*>(p.extra_rows));
  if (p.extra_topk_length) cudaFree(const_cast<int32_t*>(p.extra_topk_length));
  CHECK_CUDA(cudaGetLastError());
}

// Decode at 1M context, one query per sequence (the runtime's step): HCA window 128 + 8,192
// entries through a block table of 8 entries per block (1,024 tokens), and CSA window 128 +
// top-512; the split count is sparse_attn_num_splits' (e.g. 130 for HCA at batch 1) unless
// splits > 0.
void time_1m(int H, int64_t B, bool hca, int splits = 0) {
  const int64_t T = B, W = 128, s_k = 8192, bs_w = 128, bs_c = hca ? 8 : 64;
  std::vector<uint16_t> q(T * H * D, float_to_bf16(0.01f));
  std::vector<float> sink(H, 0.f);
  std::vector<int32_t> win(T * W);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < W; ++k) win[t * W + k] = static_cast<int32_t>(t * W + k);
  dsv4::SparseAttnParams p;
  p.q = dev(q);
  p.q_stride_token = H * D;
  p.q_stride_head = D;
  p.kv = timing_pool(B * W, bs_w);
  p.kv_stride = bs_w * dsv4::kModel1EntryBytes;
  p.n_kv = B * W;
  p.kv_format = dsv4::CacheFormat::kFp8Model1;
  p.kv_block_size = bs_w;
  p.indices = dev(win);
  p.indices_stride = W;
  p.topk = W;
  p.attn_sink = dev(sink);
  p.softmax_scale = 1.f / std::sqrt(float(D));
  const int64_t n_c = B * s_k;
  p.extra_kv = timing_pool(n_c, bs_c);
  p.extra_kv_stride = bs_c * dsv4::kModel1EntryBytes;
  p.n_extra_kv = n_c;
  p.extra_kv_format = dsv4::CacheFormat::kFp8Model1;
  p.extra_block_size = bs_c;
  std::vector<int32_t> eidx, table, rows, lens;
  if (!hca) {
    std::mt19937 r(7);
    std::uniform_int_distribution<int> pick(0, static_cast<int>(s_k) - 1);
    eidx.resize(T * 512);
    for (int64_t t = 0; t < T; ++t)
      for (int i = 0; i < 512; ++i) eidx[t * 512 + i] = static_cast<int32_t>(t * s_k + pick(r));
    p.extra_indices = dev(eidx);
    p.extra_indices_stride = 512;
    p.extra_topk = 512;
  } else {
    const int64_t mb = s_k / bs_c;
    table.resize(B * mb);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < mb; ++j) table[b * mb + j] = static_cast<int32_t>(b * mb + (j * 37) % mb);
    rows.resize(T);
    lens.assign(T, static_cast<int32_t>(s_k));
    for (int64_t t = 0; t < T; ++t) rows[t] = static_cast<int32_t>(t);
    p.extra_block_table = dev(table);
    p.extra_block_table_stride = mb;
    p.extra_block_table_rows = B;
    p.extra_max_blocks = static_cast<int>(mb);
    p.extra_rows = dev(rows);
    p.extra_topk = static_cast<int>(s_k);
    p.extra_topk_length = dev(lens);
  }
  char what[96];
  std::snprintf(what, sizeof(what), "1M %s h%d b%lld x1 (window 128 + %s)", hca ? "HCA" : "CSA", H,
                (long long)B, hca ? "8192 entries" : "top-512");
  time_pair(p, T, H, what, splits);
  free_timing_params(p);
}

// FlashMLA's decode shapes: B sequences x 2 queries, window 128 (pages of 256), and either a
// top-`etopk` list over the sequence's 16384 compressed entries (pages of 64) or (hca) the
// sequence's first n_b <= 1024 compressed entries through a block table (pages of 2).
void time_decode(int H, int64_t B, int etopk, bool hca, std::mt19937& rng) {
  const int64_t T = 2 * B, W = 128, s_k = 16384, bs_w = 256, bs_c = hca ? 2 : 64;
  const int64_t n_w = B * s_k, n_c = B * s_k;
  std::vector<uint16_t> q(T * H * D, float_to_bf16(0.01f));
  std::vector<float> sink(H, 0.f);
  std::vector<int32_t> win(T * W);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < W; ++k) win[t * W + k] = static_cast<int32_t>((t / 2) * s_k + s_k - W + k);
  dsv4::SparseAttnParams p;
  p.q = dev(q);
  p.q_stride_token = H * D;
  p.q_stride_head = D;
  p.kv = timing_pool(n_w, bs_w);
  p.kv_stride = bs_w * dsv4::kModel1EntryBytes;
  p.n_kv = n_w;
  p.kv_format = dsv4::CacheFormat::kFp8Model1;
  p.kv_block_size = bs_w;
  p.indices = dev(win);
  p.indices_stride = W;
  p.topk = W;
  p.attn_sink = dev(sink);
  p.softmax_scale = 1.f / std::sqrt(float(D));
  p.extra_kv = timing_pool(n_c, bs_c);
  p.extra_kv_stride = bs_c * dsv4::kModel1EntryBytes;
  p.n_extra_kv = n_c;
  p.extra_kv_format = dsv4::CacheFormat::kFp8Model1;
  p.extra_block_size = bs_c;
  std::vector<int32_t> eidx, table, rows, lens;
  if (!hca) {
    eidx.resize(T * etopk);
    std::uniform_int_distribution<int> pick(0, static_cast<int>(s_k / 4) - 1);
    for (int64_t t = 0; t < T; ++t)
      for (int i = 0; i < etopk; ++i) eidx[t * etopk + i] = static_cast<int32_t>((t / 2) * s_k + pick(rng));
    p.extra_indices = dev(eidx);
    p.extra_indices_stride = etopk;
    p.extra_topk = etopk;
  } else {
    const int64_t mb = s_k / bs_c;
    table.resize(B * mb);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < mb; ++j) table[b * mb + j] = static_cast<int32_t>(b * mb + j);
    std::uniform_int_distribution<int> nd(0, 1024);
    rows.resize(T);
    lens.resize(T);
    for (int64_t b = 0; b < B; ++b) {
      const int n = nd(rng);
      for (int s = 0; s < 2; ++s) {
        rows[2 * b + s] = static_cast<int32_t>(b);
        lens[2 * b + s] = n;
      }
    }
    p.extra_block_table = dev(table);
    p.extra_block_table_stride = mb;
    p.extra_block_table_rows = B;
    p.extra_max_blocks = 1024 / bs_c;  // lanes = 1024 (FlashMLA's extra_topk)
    p.extra_rows = dev(rows);
    p.extra_topk = 1024;
    p.extra_topk_length = dev(lens);
  }
  char what[96];
  std::snprintf(what, sizeof(what), "%s h%d b%lld (window 128 + %s)", hca ? "HCA decode" : "FP8 decode",
                H, (long long)B, hca ? "<= 1024 entries" : (etopk == 512 ? "top-512" : "top-1024"));
  time_pair(p, T, H, what);
  free_timing_params(p);
}

}  // namespace

int main(int argc, char** argv) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("SKIP: no CUDA device\n");
    return 0;
  }
  std::mt19937 rng(1234);
  const bool fp8 = dsv4::sparse_attn_supports_fp8_cache(D);
  if (argc > 1 && std::strcmp(argv[1], "--refusal") == 0) {
    if (!fp8) {
      std::printf("SKIP: the FP8 kernels need sm_90 (head_dim 512)\n");
      return 0;
    }
    g_refusal = true;
    bool ok = true;
    setenv("DSV4_TEST_REFUSE", "launch", 1);
    std::printf("-- DSV4_TEST_REFUSE=launch (the merge's programmatic launch refused)\n");
    // each run must meet forced refusals (else its fallback checks checked nothing)
    auto refused = [](long long before) {
      return dsv4_check::refusal_happened(before, "the run above:");
    };
    long long r0 = dsv4::refusals_for_test().load();
    ok &= run(64, 1, 1, 200, 4, fp8, rng);              // split-K path
    ok &= refused(r0);
    r0 = dsv4::refusals_for_test().load();
    ok &= run(128, 2, 64, 1024, 8, fp8, rng);           // split-K, 2 head tiles
    ok &= refused(r0);
    r0 = dsv4::refusals_for_test().load();
    ok &= run(128, 2, 2, 600, 6, fp8, rng, /*raw=*/true);
    ok &= refused(r0);
    unsetenv("DSV4_TEST_REFUSE");
    std::printf("-- DSV4_TEST_REFUSE unset (the programmatic launch)\n");
    ok &= run(64, 1, 1, 200, 4, fp8, rng);
    ok &= run(128, 2, 64, 1024, 8, fp8, rng);
    std::printf("%s\n", ok ? "PASS" : "FAIL");
    return ok ? 0 : 1;
  }
  if (!fp8) std::printf("note: FP8 caches need sm_90 (head_dim 512): checking HCA mode only\n");
  const bool time_only = argc > 1 && std::strcmp(argv[1], "--time-only") == 0;
  const bool time_splits = argc > 1 && std::strcmp(argv[1], "--time-splits") == 0;
  if ((time_only || time_splits) && !fp8) {
    std::printf("SKIP: the FP8 kernels need sm_90 (head_dim 512)\n");
    return 0;
  }
  // --time-only: the timing tables alone (e.g. this check built against another build of the
  // kernels, for a same-GPU comparison)
  if (time_only) {
    time_decode(64, 2, 512, false, rng);
    time_decode(128, 2, 1024, false, rng);
    for (int64_t b : {1, 2, 4}) {
      time_1m(64, b, true);
      time_1m(64, b, false);
    }
    return 0;
  }
  // --time-splits: the 1M HCA decode rows (b = 1, 2, 4) at other split counts than
  // sparse_attn_num_splits' (the first row of each batch), e.g. to choose that rule; grids of
  // at most 264 CTAs (two waves on 132 SMs)
  if (time_splits) {
    for (int64_t b : {1, 2, 4})
      for (int splits : {0, 16, 24, 33, 44, 65, 98, 130})
        if (splits * b <= 264) time_1m(64, b, true, splits);
    return 0;
  }
  bool ok = true;
  ok &= run(64, 3, 64, 1024, 1, fp8, rng);
  ok &= run(64, 2, 61, 700, 1, fp8, rng);
  ok &= run(128, 4, 2, 300, 1, fp8, rng);
  ok &= run(64, 1, 1, 200, 4, fp8, rng);      // split-K path
  ok &= run(128, 2, 64, 1024, 8, fp8, rng);   // split-K path, 2 head tiles
  ok &= run(3, 5, 7, 150, 1, fp8, rng);       // 3 heads (a partial head tile)
  ok &= run(64, 1, 8, 8192, 130, fp8, rng);   // 1M-context HCA shape: 130 splits of one block
  ok &= run(3, 1, 8, 3000, 77, fp8, rng);     // many splits, 3 heads, a ragged last group
  for (int splits : {3, 33})                  // b = 4 (a row-less token, a bad block) split
    ok &= run(64, 4, 8, 2048, splits, fp8, rng);
  if (fp8) {
    ok &= run(64, 3, 64, 1024, 1, fp8, rng, /*raw=*/true);
    ok &= run(128, 2, 2, 600, 6, fp8, rng, /*raw=*/true);  // split-K, HCA pages of 2
    ok &= run(64, 64, 64, 1024, 1, fp8, rng);              // b64: grid of 128 CTAs
    ok &= run(64, 3, 64, 1024, 1, fp8, rng, true, /*nan=*/true);
    ok &= run(128, 4, 2, 600, 6, fp8, rng, true, /*nan=*/true);  // split-K, pages of 2
  }
  const char* no_timing = std::getenv("DSV4_CHECK_NO_TIMING");  // e.g. under compute-sanitizer
  if (fp8 && ok && (no_timing == nullptr || std::strcmp(no_timing, "1") != 0)) {
    time_decode(64, 2, 512, false, rng);
    time_decode(64, 64, 512, false, rng);
    time_decode(128, 2, 1024, false, rng);
    time_decode(128, 64, 1024, false, rng);
    time_decode(64, 128, 0, true, rng);
    time_decode(128, 128, 0, true, rng);
    for (int64_t b : {1, 2, 4}) {
      time_1m(64, b, true);
      time_1m(64, b, false);
    }
  }
  std::printf("%s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
