// dsv4 sparse attention with a per-head sink: argument validation and dispatch (torch-free).
// The kernels are in sparse_attn.cuh; the contract in include/dsv4/sparse_attn.h.
#include "sparse_attn.cuh"
#include "sparse_attn_fp8_sm90.cuh"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace dsv4 {
namespace {

using sparse_attn_detail::kBlockM;
using sparse_attn_detail::kBlockN;

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// A bf16 [rows, D] operand: 16-byte aligned base, strides in multiples of 8 elements.
inline bool rows_ok(const void* ptr, int64_t stride_a, int64_t stride_b = 0) {
  return ptr != nullptr && aligned16(ptr) && stride_a % 8 == 0 && stride_b % 8 == 0;
}

// An FP8 (MODEL1) pool: 16-byte aligned, block stride a multiple of 16 that holds a block.
inline bool fp8_pool_ok(const void* ptr, int64_t block_stride, int64_t block_size, int64_t n) {
  if (block_size < 1 || n % block_size != 0 || n > INT_MAX) return false;
  if (n == 0) return true;
  const int64_t blocks = n / block_size;
  const int64_t need = block_size * kModel1EntryBytes;
  return ptr != nullptr && aligned16(ptr) && block_stride % 16 == 0 &&
         (blocks == 1 || block_stride >= need);
}

inline bool valid_params(const SparseAttnParams& p) {
  if (p.num_tokens < 0 || p.num_heads < 1 || p.num_heads > INT_MAX) return false;
  if (!sparse_attn_supports_head_dim(p.head_dim)) return false;
  constexpr int64_t kMaxTopk = INT_MAX - kBlockN;
  if (p.topk < 0 || p.topk > kMaxTopk || p.n_kv < 0) return false;
  if (p.num_splits < 1 || p.num_splits > kSparseAttnMaxSplits) return false;
  if (!rows_ok(p.q, p.q_stride_token, p.q_stride_head)) return false;
  if (!rows_ok(p.out, p.out_stride_token, p.out_stride_head)) return false;
  if (p.lse == nullptr || p.attn_sink == nullptr) return false;
  if (p.topk > 0 && p.indices == nullptr) return false;
  const bool hca = p.extra_block_table != nullptr;
  const bool has_extra = p.extra_indices != nullptr || hca;
  const bool fp8 = p.kv_format != CacheFormat::kPlain;
  if (p.kv_format != CacheFormat::kPlain && p.kv_format != CacheFormat::kFp8Model1) return false;
  if (has_extra && p.extra_kv_format != p.kv_format) return false;  // one format for both
  if (fp8) {
    if (p.head_dim != kModel1HeadDim) return false;
    if (!fp8_pool_ok(p.kv, p.kv_stride, p.kv_block_size, p.n_kv)) return false;
  } else if (p.n_kv > 0 && !rows_ok(p.kv, p.kv_stride)) {
    return false;
  }
  if (has_extra) {
    if (p.extra_topk < 0 || p.extra_topk > kMaxTopk || p.n_extra_kv < 0) return false;
    if (fp8) {
      if (!fp8_pool_ok(p.extra_kv, p.extra_kv_stride, p.extra_block_size, p.n_extra_kv))
        return false;
    } else if (p.n_extra_kv > 0 && !rows_ok(p.extra_kv, p.extra_kv_stride)) {
      return false;
    }
  }
  if (hca) {
    if (p.extra_indices != nullptr || p.extra_rows == nullptr) return false;
    if (p.extra_block_size < 1 || p.extra_block_size > INT_MAX || p.extra_max_blocks < 0 ||
        p.extra_max_blocks > INT_MAX || p.extra_block_table_rows < 0 ||
        p.extra_block_table_stride < 0 || p.n_extra_kv > INT_MAX)
      return false;
  }
  if (p.num_splits > 1) {
    const size_t need =
        sparse_attn_workspace_bytes(p.num_tokens, p.num_heads, p.head_dim, p.num_splits);
    if (p.workspace == nullptr || p.workspace_bytes < need || !aligned16(p.workspace))
      return false;
  }
  return true;
}

// Whether the current device is a Hopper (compute capability 9.0), where the sm_90a wgmma
// kernel runs. Host attribute queries only (no stream work, fine under graph capture).
bool current_device_is_sm90() {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
    return false;
  return major == 9 && minor == 0;
}

// SMs of the current device (132 when the query fails; host attribute queries only).
int sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0)
    return 132;
  return n;
}

// CTAs of the FP8 kernels' grid before any key split: one per (token, 64-head tile).
int64_t fp8_ctas(const SparseAttnParams& p) {
  return p.num_tokens * ((p.num_heads + kBlockM - 1) / kBlockM);
}

// Most 64-key blocks a token can have (host bound: the scopes' lane counts; HCA tokens have up to
// extra_topk entries, fewer at run time).
int64_t fp8_max_blocks(const SparseAttnParams& p) {
  int64_t blocks = (p.topk + kBlockN - 1) / kBlockN;
  if (p.extra_indices != nullptr || p.extra_block_table != nullptr)
    blocks += (p.extra_topk + kBlockN - 1) / kBlockN;
  return blocks;
}

// "auto": "new" when the grid has more (token, head-tile) CTAs than SMs, or more than half as
// many and a token may have >= 14 key blocks; else "old". Measured (H100, 132 SMs, beside
// FlashMLA, L2 flushed; bench/README.md "Session of 2026-12-06, third"; old / new us, the one not
// chosen then derived from its ratio to FlashMLA (+-0.5%); blocks = the host bound, window 128 +
// top-k or + up to 1024 HCA entries):
//   CTAs  blocks  case                   old     new
//      4      10  CSA h64 b2            21.6    24.7   (key splits: 1-2 blocks per CTA)
//      8      18  CSA h128 b2           28.5    30.4
//      4      18  HCA h64 b2            27.3    43.4
//      8      18  HCA h128 b2           23.8    34.0
//    128      10  CSA h64 b64           67.7    69.4   (one wave, every CTA 10 blocks)
//    128      18  HCA h64 b64          119.9    91.2   (one wave, the longest CTA 18 blocks)
//    256      10  CSA h64 b128         128.8   119.7
//    256      18  CSA h128 b64         209.1   180.2   (and HCA h64 b128 195.3 / 148.4,
//    512      18  CSA h128 b128        418.1   345.4    HCA h128 b64 190.9 / 142.7,
//                                                       HCA h128 b128 297.8 / 226.0)
// Per block of its longest CTA (one wave), old costs ~6.7 us at both 10 and 18 blocks, new ~6.9
// at 10 (scattered CSA rows) and ~5.1 at 18 (HCA's contiguous entries), so the crossover in one
// wave lies between 10 and 18 blocks; 14 splits it (no measurement in between, nor of CSA at
// 67-132 CTAs with >= 14 blocks, e.g. h128 b32, which the rule gives to "new"). Small grids
// (<= 66 CTAs) are split into 1-2 blocks per CTA, where new's pipeline start is not amortised.
// Checked after the change (H100, 2026-12-06 eighth session, check_hca_fp8's timing): HCA h64
// b64 old 122.8 / new 83.9 / auto 82.6 us; every other case's auto equal to the kernel chosen
// before.
int fp8_auto_kernel(const SparseAttnParams& p) {
  const int64_t ctas = fp8_ctas(p), sms = sm_count();
  if (ctas > sms) return 1;
  return 2 * ctas > sms && fp8_max_blocks(p) >= 14 ? 1 : 0;
}

// head_dim 512 (the V4 models) on Hopper: the wgmma kernel (294-335 TFLOP/s at the V4 prefill
// shapes on the H200 against 201-232 for the mma.sync kernel, which serves the other head dims
// and other GPUs).
template <int D>
cudaError_t dispatch(const SparseAttnParams& p, cudaStream_t stream) {
  if (p.kv_format == CacheFormat::kFp8Model1) {  // FP8 caches: the sm_90a kernels only
    if (D != 512 || !current_device_is_sm90()) return cudaErrorInvalidValue;
    int which = sparse_attn_fp8_kernel_env();
    if (which < 0) return cudaErrorInvalidValue;
    // "new": the warp-specialised kernel (producer warps dequantise into two bf16 stages);
    // "new2": the same with the whole-sector producer mapping; "old": the wgmma kernel that
    // dequantises between its GEMMs. Unset ("auto"): fp8_auto_kernel.
    if (which == kSparseFp8Auto) which = fp8_auto_kernel(p);
    if (which == 1) return sparse_attn_detail::fp8_ws::launch_fp8_ws<false>(p, stream);
    if (which == 2) return sparse_attn_detail::fp8_ws::launch_fp8_ws<true>(p, stream);
    return sparse_attn_detail::launch_wgmma<512, true>(p, stream);
  }
  if (D == 512 && current_device_is_sm90()) {
    return sparse_attn_detail::launch_wgmma<512, false>(p, stream);
  } else {
    // mma.sync kernel, 8 warps: 2 row groups of 32 heads x 4 key/column groups.
    return sparse_attn_detail::launch<D, 2, 4>(p, stream);
  }
}

}  // namespace

bool sparse_attn_supports_head_dim(int64_t head_dim) {
  return head_dim == 64 || head_dim == 128 || head_dim == 256 || head_dim == 512;
}

int sparse_attn_fp8_kernel_env() {
  const char* v = std::getenv("DSV4_SPARSE_FP8");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "auto") == 0) return kSparseFp8Auto;
  if (std::strcmp(v, "old") == 0) return 0;
  if (std::strcmp(v, "new") == 0) return 1;
  if (std::strcmp(v, "new2") == 0) return 2;
  return -1;
}

bool sparse_attn_supports_fp8_cache(int64_t head_dim) {
  return head_dim == kModel1HeadDim && current_device_is_sm90();
}

int sparse_attn_num_splits(int64_t num_tokens, int64_t num_heads, int64_t topk, int64_t extra_topk,
                           int num_sms) {
  if (num_tokens <= 0 || num_heads <= 0 || num_sms <= 0 || topk < 0 || extra_topk < 0) return 1;
  const int64_t ctas = num_tokens * ((num_heads + kBlockM - 1) / kBlockM);
  const int64_t blocks = (topk + kBlockN - 1) / kBlockN + (extra_topk + kBlockN - 1) / kBlockN;
  if (blocks <= 1 || 2 * ctas > num_sms) return 1;
  int64_t s = std::min<int64_t>({blocks, num_sms / ctas, kSparseAttnMaxSplits});
  // No split without a block: with `per` blocks each, ceil(blocks / per) splits suffice.
  const int64_t per = (blocks + s - 1) / s;
  s = (blocks + per - 1) / per;
  return static_cast<int>(std::max<int64_t>(s, 1));
}

size_t sparse_attn_workspace_bytes(int64_t num_tokens, int64_t num_heads, int64_t head_dim,
                                   int num_splits) {
  if (num_splits <= 1 || num_tokens <= 0 || num_heads <= 0 || head_dim <= 0) return 0;
  const int64_t n_ht = (num_heads + kBlockM - 1) / kBlockM;
  const int64_t floats = static_cast<int64_t>(num_splits) * num_tokens *
                         (num_heads * head_dim + num_heads + n_ht);
  return static_cast<size_t>(floats) * sizeof(float);
}

namespace {

cudaError_t run(const SparseAttnParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 && p.num_heads >= 1 && sparse_attn_supports_head_dim(p.head_dim))
    return cudaSuccess;
  if (!valid_params(p)) return cudaErrorInvalidValue;
  switch (p.head_dim) {
    case 64:
      return dispatch<64>(p, stream);
    case 128:
      return dispatch<128>(p, stream);
    case 256:
      return dispatch<256>(p, stream);
    case 512:
      return dispatch<512>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

// An error the caller left pending reaches the caller (own_error.cuh keep_pending: the
// launchers' per-call cudaFuncSetAttribute clears it; csrc/tests/check_hca_fp8.cu --refusal).
cudaError_t sparse_attn(const SparseAttnParams& p, cudaStream_t stream) {
  const cudaError_t pending = cudaPeekAtLastError();
  return keep_pending(pending, run(p, stream));
}

}  // namespace dsv4
