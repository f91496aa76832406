// dsv4 MoE gate (router) kernel: logits on tensor cores, sqrt-softplus scores, top-k or hash
// selection, normalised weights. Contract: include/dsv4/moe_routing.h; semantics:
// python/dsv4/ops/moe.py (moe_gate_reference).
//
// Two launches. moe_gate_logits_kernel: the logits GEMM [tokens, dim] x [experts, dim]^T tiled
// 64 tokens x 64 experts per CTA (4 warps of 32 x 32, mma.sync m16n8k16 bf16 -> fp32, cp.async
// double buffer, 64-wide k steps), split along dim when there are too few tiles to fill the GPU
// (decode); each CTA writes its fp32 partial logits to the workspace [splits, tokens, experts].
// moe_gate_select_kernel: one warp per token sums the partials of each of its logits in split
// order (so the result does not depend on timing) and selects: scores, top-k by repeated warp
// arg-max on (score + bias, lowest index), or the tid2eid lookup, then the normalised weights.
// (Until 2026-12-06 one launch did both, the last CTA of a token tile summing the whole tile's
// partials and selecting its 64 tokens with 4 warps: 254 us at 64 tokens x 256 experts on an
// H100, latency-bound on one SM; spread over a warp per token the same work runs on many SMs.)
#include "dsv4/moe_routing.h"

#include <climits>
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "moe_mma.cuh"

namespace dsv4 {
namespace {

using namespace moe_detail;

constexpr int kBM = 64;              // tokens per tile
constexpr int kBN = 64;              // experts per tile
constexpr int kBK = 64;              // dim per pipeline stage
constexpr int kPitch = kBK + 8;      // smem row pitch in bf16 (144 B: ldmatrix conflict-free)
constexpr int kThreads = 128;        // 4 warps: 2 (tokens) x 2 (experts), 32 x 32 each
constexpr int kMaxSplits = 32;
constexpr int kExpertsPerLane = static_cast<int>(kMoeGateMaxExperts / 32);  // 16

struct GatePlan {
  int64_t m_tiles, n_tiles, k_tiles, splits, tiles_per_split;
};

GatePlan make_plan(int64_t tokens, int64_t experts, int64_t dim, int num_sms) {
  GatePlan p;
  p.m_tiles = (tokens + kBM - 1) / kBM;
  p.n_tiles = (experts + kBN - 1) / kBN;
  p.k_tiles = (dim + kBK - 1) / kBK;
  const int64_t base = p.m_tiles * p.n_tiles;
  // ~4 CTAs per SM (2-stage pipelines: more CTAs keep more bytes in flight)
  int64_t splits = (4 * static_cast<int64_t>(num_sms) + base - 1) / base;
  if (splits < 1) splits = 1;
  if (splits > kMaxSplits) splits = kMaxSplits;
  if (splits > p.k_tiles) splits = p.k_tiles;
  if (splits < 1) splits = 1;
  p.tiles_per_split = (p.k_tiles + splits - 1) / splits;
  p.splits = (p.k_tiles + p.tiles_per_split - 1) / p.tiles_per_split;  // no empty split
  return p;
}

// torch's softplus (beta 1, threshold 20): exact for large logits (no exp overflow) and
// log1p keeps very negative logits away from 0 (log(1 + e^x) would round to 0 below -16.6).
__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }

// Total order for the selection: larger is better. High word: the float key made monotone
// (-0 folded into +0; NaN above +inf, as torch.sort ranks it); low word: ~expert, so equal
// keys prefer the lower expert. 0 means "nothing" (below every real key).
__device__ __forceinline__ uint64_t select_key(float key, int expert) {
  uint32_t ord;
  if (key != key) {
    ord = 0xFFFFFFFFu;
  } else {
    const uint32_t bits = __float_as_uint(key + 0.0f);
    ord = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  }
  return (static_cast<uint64_t>(ord) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(expert));
}

__device__ __forceinline__ uint64_t warp_max_u64(uint64_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const uint64_t o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

// The split sums of kU logits p[u * ustride] (u < n_ok; the others give 0): each logit's
// partials p[u * ustride + s * stride] added in split order (the result does not depend on
// timing), the loads of 8 splits x kU logits in flight at a time (the sums are bound by L2
// latency, not bandwidth).
template <int kU>
__device__ __forceinline__ void sum_splits(const float* p, int64_t ustride, int n_ok,
                                           int64_t stride, int splits, float (&l)[kU]) {
#pragma unroll
  for (int u = 0; u < kU; ++u) l[u] = 0.f;
  int s = 0;
  for (; s + 8 <= splits; s += 8) {
    float v[kU][8];
#pragma unroll
    for (int u = 0; u < kU; ++u)
#pragma unroll
      for (int i = 0; i < 8; ++i)
        v[u][i] = u < n_ok ? __ldcg(p + u * ustride + (s + i) * stride) : 0.f;
#pragma unroll
    for (int u = 0; u < kU; ++u)
#pragma unroll
      for (int i = 0; i < 8; ++i) l[u] += v[u][i];
  }
  for (; s < splits; ++s) {
#pragma unroll
    for (int u = 0; u < kU; ++u)
      if (u < n_ok) l[u] += __ldcg(p + u * ustride + s * stride);
  }
}

__device__ __forceinline__ int64_t load_index(const void* p, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(p)[i] : static_cast<const int32_t*>(p)[i];
}

struct GateArgs {
  const __nv_bfloat16* x;
  int64_t x_row_stride;
  const __nv_bfloat16* w;
  const float* bias;
  const void* tid2eid;
  bool tid2eid_is_int64;
  int64_t n_ids;
  const void* ids;
  bool ids_are_int64;
  float* weights;
  int32_t* indices;
  float* part;     // [splits, tokens, experts]
  int64_t tokens, experts, dim;
  int topk;
  float route_scale;
  int n_tiles, splits, tiles_per_split;
  int64_t k_tiles;
};

constexpr int kSelWarps = 4;  // tokens per CTA of the selection kernel (one warp each)
constexpr int kSelU = 4;      // logits a lane sums at a time (8 splits of each in flight)

// One warp per token: the token's logits (each the sum of its split partials, in split order),
// then the selection.
__global__ void __launch_bounds__(kSelWarps * 32) moe_gate_select_kernel(const GateArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kSelWarps + (threadIdx.x >> 5);
  if (t >= a.tokens) return;  // the whole warp leaves together
  const int E = static_cast<int>(a.experts);
  const int64_t stride = a.tokens * a.experts;  // between splits
  const float* row = a.part + t * a.experts;
  float my_w = 0.f;
  int my_e = -1;
  if (a.tid2eid != nullptr) {
    // Hash routing: slot j of token t is tid2eid[id, j]; the id is checked, never trusted.
    const int64_t id = load_index(a.ids, a.ids_are_int64, t);
    const bool id_ok = id >= 0 && id < a.n_ids;
    float s = 0.f;
    if (lane < a.topk && id_ok) {
      const int64_t e = load_index(a.tid2eid, a.tid2eid_is_int64, id * a.topk + lane);
      if (e >= 0 && e < E) {
        my_e = static_cast<int>(e);
        float l[1];
        sum_splits<1>(row + my_e, 0, 1, stride, a.splits, l);
        s = sqrtf(softplus(l[0]));
      }
    }
    float denom = 0.f;  // slot order, as the reference's sum
    for (int j = 0; j < a.topk; ++j) denom += __shfl_sync(0xffffffffu, s, j);
    if (my_e >= 0) my_w = (s / (denom == 0.f ? 1.f : denom)) * a.route_scale;
  } else {
    // Learned routing: lane holds experts lane, lane + 32, ...
    float score[kExpertsPerLane];
    uint64_t key[kExpertsPerLane];
#pragma unroll
    for (int j0 = 0; j0 < kExpertsPerLane; j0 += kSelU) {
      const int first = lane + 32 * j0;
      int n_ok = first < E ? (E - first + 31) / 32 : 0;  // experts first, first + 32, ... < E
      if (n_ok > kSelU) n_ok = kSelU;
      float l[kSelU];
      sum_splits<kSelU>(row + first, 32, n_ok, stride, a.splits, l);
#pragma unroll
      for (int u = 0; u < kSelU; ++u) {
        const int e = first + 32 * u;
        score[j0 + u] = 0.f;
        key[j0 + u] = 0;
        if (u < n_ok) {
          score[j0 + u] = sqrtf(softplus(l[u]));
          const float b = a.bias != nullptr ? a.bias[e] : 0.f;
          key[j0 + u] = select_key(score[j0 + u] + b, e);
        }
      }
    }
    float denom = 0.f;
    for (int slot = 0; slot < a.topk; ++slot) {
      uint64_t best = 0;
      float best_s = 0.f;
#pragma unroll
      for (int j = 0; j < kExpertsPerLane; ++j) {
        if (key[j] > best) {
          best = key[j];
          best_s = score[j];
        }
      }
      const uint64_t win = warp_max_u64(best);
      // win != 0: at least topk <= experts real keys exist.
      const int e = static_cast<int>(0xFFFFFFFFu - static_cast<uint32_t>(win & 0xFFFFFFFFu));
      const float s = __shfl_sync(0xffffffffu, best_s, e & 31);
      if ((e & 31) == lane) {
#pragma unroll
        for (int j = 0; j < kExpertsPerLane; ++j)
          if (lane + 32 * j == e) key[j] = 0;
      }
      denom += s;
      if (lane == slot) {
        my_e = e;
        my_w = s;
      }
    }
    // As the reference: a zero sum gives zero weights (not 0/0); NaN propagates.
    my_w = (my_w / (denom == 0.f ? 1.f : denom)) * a.route_scale;
  }
  if (lane < a.topk) {
    a.weights[t * a.topk + lane] = my_w;
    a.indices[t * a.topk + lane] = my_e;
  }
}

__global__ void __launch_bounds__(kThreads) moe_gate_logits_kernel(const GateArgs a) {
  __shared__ __align__(16) __nv_bfloat16 sA[2][kBM][kPitch];
  __shared__ __align__(16) __nv_bfloat16 sB[2][kBN][kPitch];

  const int64_t cta = blockIdx.x;
  const int split = static_cast<int>(cta % a.splits);
  const int64_t rest = cta / a.splits;
  const int n_tile = static_cast<int>(rest % a.n_tiles);
  const int64_t m_tile = rest / a.n_tiles;
  const int64_t t0 = m_tile * kBM;
  const int e0 = n_tile * kBN;
  const int64_t kt_begin = static_cast<int64_t>(split) * a.tiles_per_split;
  int64_t kt_end = kt_begin + a.tiles_per_split;
  if (kt_end > a.k_tiles) kt_end = a.k_tiles;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp & 1;   // token half of the tile
  const int wn = warp >> 1;  // expert half of the tile

  // Stage loader: 64 rows x 8 chunks of 16 B for A and for B; 4 + 4 chunks per thread.
  auto load_stage = [&](int buf, int64_t kt) {
    const int64_t k0 = kt * kBK;
#pragma unroll
    for (int i = 0; i < (kBM * kBK / 8) / kThreads; ++i) {
      const int c = tid + i * kThreads;
      const int row = c >> 3, ch = c & 7;
      const int64_t k = k0 + ch * 8;
      const int64_t t = t0 + row;
      const bool ok = t < a.tokens && k < a.dim;
      const __nv_bfloat16* src = ok ? a.x + t * a.x_row_stride + k : a.x;
      cp_async16_zfill(smem_addr(&sA[buf][row][ch * 8]), src, ok);
    }
#pragma unroll
    for (int i = 0; i < (kBN * kBK / 8) / kThreads; ++i) {
      const int c = tid + i * kThreads;
      const int row = c >> 3, ch = c & 7;
      const int64_t k = k0 + ch * 8;
      const int e = e0 + row;
      const bool ok = e < a.experts && k < a.dim;
      const __nv_bfloat16* src = ok ? a.w + static_cast<int64_t>(e) * a.dim + k : a.w;
      cp_async16_zfill(smem_addr(&sB[buf][row][ch * 8]), src, ok);
    }
    cp_async_commit();
  };

  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

  if (kt_begin < kt_end) load_stage(0, kt_begin);
  for (int64_t kt = kt_begin; kt < kt_end; ++kt) {
    const int buf = static_cast<int>((kt - kt_begin) & 1);
    if (kt + 1 < kt_end) {
      load_stage(buf ^ 1, kt + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {
      uint32_t af[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = wm * 32 + i * 16 + (lane & 15);
        const int col = ks * 16 + (lane >> 4) * 8;
        ldmatrix_x4(smem_addr(&sA[buf][row][col]), af[i][0], af[i][1], af[i][2], af[i][3]);
      }
      uint32_t bf[4][2];
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {  // two n8 tiles per ldmatrix.x4
        const int q = lane >> 3;
        const int row = wn * 32 + jj * 16 + (q >> 1) * 8 + (lane & 7);
        const int col = ks * 16 + (q & 1) * 8;
        ldmatrix_x4(smem_addr(&sB[buf][row][col]), bf[2 * jj][0], bf[2 * jj][1],
                    bf[2 * jj + 1][0], bf[2 * jj + 1][1]);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          mma_bf16_16816(acc[i][j], af[i][0], af[i][1], af[i][2], af[i][3], bf[j][0], bf[j][1]);
    }
    __syncthreads();  // the next iteration's load overwrites the buffer just read
  }

  // Partial logits of this split -> workspace [splits, tokens, experts].
  float* part = a.part + static_cast<int64_t>(split) * a.tokens * a.experts;
  const int g = lane >> 2, c2 = (lane & 3) * 2;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t t = t0 + wm * 32 + i * 16 + g + h * 8;
        const int e = e0 + wn * 32 + j * 8 + c2;
        if (t < a.tokens) {
          if (e < a.experts) part[t * a.experts + e] = acc[i][j][2 * h];
          if (e + 1 < a.experts) part[t * a.experts + e + 1] = acc[i][j][2 * h + 1];
        }
      }
}

}  // namespace

size_t moe_gate_workspace_bytes(int64_t tokens, int64_t experts, int64_t dim, int device) {
  if (tokens <= 0 || experts <= 0 || dim <= 0) return 0;
  int num_sms = 0;
  if (cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      num_sms <= 0) {
    num_sms = 132;
  }
  const GatePlan p = make_plan(tokens, experts, dim, num_sms);
  return static_cast<size_t>(p.splits * tokens * experts) * sizeof(float);
}

cudaError_t moe_gate(const void* x, int64_t x_row_stride, const void* weight, const float* bias,
                     const void* tid2eid, bool tid2eid_is_int64, int64_t n_ids,
                     const void* input_ids, bool ids_are_int64, float* weights,
                     int32_t* indices, int64_t tokens, int64_t experts, int64_t dim,
                     int64_t topk, float route_scale, void* workspace, size_t workspace_bytes,
                     cudaStream_t stream) {
  if (tokens < 0 || dim <= 0 || dim % 8 != 0) return cudaErrorInvalidValue;
  if (experts < 1 || experts > kMoeGateMaxExperts) return cudaErrorInvalidValue;
  if (topk < 1 || topk > kMoeMaxTopk || topk > experts) return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  if (x == nullptr || weight == nullptr || weights == nullptr || indices == nullptr ||
      workspace == nullptr)
    return cudaErrorInvalidValue;
  if (tid2eid != nullptr && (input_ids == nullptr || bias != nullptr || n_ids < 0))
    return cudaErrorInvalidValue;
  if (x_row_stride < dim || x_row_stride % 8 != 0) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0 || reinterpret_cast<uintptr_t>(weight) % 16 != 0)
    return cudaErrorInvalidValue;
  if (tokens > INT_MAX / 2) return cudaErrorInvalidValue;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (workspace_bytes < moe_gate_workspace_bytes(tokens, experts, dim, device))
    return cudaErrorInvalidValue;
  int num_sms = 0;
  if (cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      num_sms <= 0) {
    num_sms = 132;
  }
  const GatePlan p = make_plan(tokens, experts, dim, num_sms);
  GateArgs a;
  a.x = static_cast<const __nv_bfloat16*>(x);
  a.x_row_stride = x_row_stride;
  a.w = static_cast<const __nv_bfloat16*>(weight);
  a.bias = bias;
  a.tid2eid = tid2eid;
  a.tid2eid_is_int64 = tid2eid_is_int64;
  a.n_ids = n_ids;
  a.ids = input_ids;
  a.ids_are_int64 = ids_are_int64;
  a.weights = weights;
  a.indices = indices;
  a.part = static_cast<float*>(workspace);
  a.tokens = tokens;
  a.experts = experts;
  a.dim = dim;
  a.topk = static_cast<int>(topk);
  a.route_scale = route_scale;
  a.n_tiles = static_cast<int>(p.n_tiles);
  a.splits = static_cast<int>(p.splits);
  a.tiles_per_split = static_cast<int>(p.tiles_per_split);
  a.k_tiles = p.k_tiles;
  const int64_t ctas = p.m_tiles * p.n_tiles * p.splits;
  if (ctas > INT_MAX) return cudaErrorInvalidValue;
  moe_gate_logits_kernel<<<dim3(static_cast<unsigned>(ctas)), dim3(kThreads), 0, stream>>>(a);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t sel_ctas = (tokens + kSelWarps - 1) / kSelWarps;
  moe_gate_select_kernel<<<dim3(static_cast<unsigned>(sel_ctas)), dim3(kSelWarps * 32), 0,
                           stream>>>(a);
  return cudaGetLastError();
}

}  // namespace dsv4
