// Host entry points of the grouped GEMM (include/dsv4/grouped_gemm.h): argument checks, tile
// choice, dispatch to the per-format variants (grouped_gemm_{bf16,fp8,fp4}.cu), and two small
// kernels used around it: the FP8 activation quantisation simulation and the zeroing of rows
// past the last expert.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "dsv4/grouped_gemm.h"
#include "grouped_gemm.cuh"
#include "grouped_gemm_ws.cuh"
#include "own_error.cuh"

namespace dsv4 {
namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

cudaError_t check_args(const GroupedGemmArgs& a) {
  if (a.w == nullptr || a.x == nullptr || a.out == nullptr) return cudaErrorInvalidValue;
  if (a.n_experts < 1 || a.n_experts > gg::kMaxExperts) return cudaErrorInvalidValue;
  if (a.rows < 1 || a.k < 1 || a.pairs < 0 || a.pairs > INT_MAX || a.x_rows < 0)
    return cudaErrorInvalidValue;
  if (a.rows % 8 != 0) return cudaErrorInvalidValue;  // 16-byte output chunks
  const int k_align = a.w_format == GemmWeightFormat::kBF16 ? 8
                      : a.w_format == GemmWeightFormat::kFP8 ? 16 : 32;
  if (a.k % k_align != 0) return cudaErrorInvalidValue;
  if (a.w_format != GemmWeightFormat::kBF16) {
    if (a.w_scale == nullptr) return cudaErrorInvalidValue;
    if (reinterpret_cast<uintptr_t>(a.w_scale) % 4 != 0) return cudaErrorInvalidValue;
    if (a.w_scale_bytes < (a.scale_fp32 ? 4 : 1)) return cudaErrorInvalidValue;
  }
  // 16-byte rows: weights (byte strides), activations and outputs (element strides)
  if (!aligned16(a.w) || a.w_row_stride % 16 || a.w_expert_stride % 16 || a.w_mat_stride % 16)
    return cudaErrorInvalidValue;
  if (!aligned16(a.x) || a.x_row_stride % 8 || a.x_expert_stride % 8) return cudaErrorInvalidValue;
  if (!aligned16(a.out) || a.out_row_stride % 8 || a.out_expert_stride % 8)
    return cudaErrorInvalidValue;
  if (a.epilogue == GemmEpilogue::kSwiGLU && a.route_weight == nullptr) return cudaErrorInvalidValue;
  if (a.positions != nullptr) {
    if (a.freqs == nullptr || a.epilogue != GemmEpilogue::kStore) return cudaErrorInvalidValue;
    if (a.head_dim < gg::kBK || a.head_dim % gg::kBK != 0 || a.k % a.head_dim != 0)
      return cudaErrorInvalidValue;
    if (a.w_format == GemmWeightFormat::kFP4) return cudaErrorInvalidValue;
  }
  if (a.x_scale != nullptr) {  // FP8 activations: the FP8 x FP8 path (grouped_gemm_qmma.cuh)
    if (a.w_format == GemmWeightFormat::kBF16 || a.positions != nullptr) return cudaErrorInvalidValue;
    if (a.k % 128 != 0 || a.x_row_stride % 16 || a.x_expert_stride % 16 || a.x_scale_row_stride < 0)
      return cudaErrorInvalidValue;
    if (reinterpret_cast<uintptr_t>(a.x_scale) % 4 != 0) return cudaErrorInvalidValue;
    if (a.w_format == GemmWeightFormat::kFP4 &&
        (a.scale_fp32 || a.s_expert_stride % 4 || a.s_mat_stride % 4 || a.s_row_stride % 4))
      return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

GemmTile tile_from_env() {
  const char* v = std::getenv("DSV4_GEMM_TILE");
  if (v == nullptr) return GemmTile::kAuto;
  if (!std::strcmp(v, "decode")) return GemmTile::kDecode;
  if (!std::strcmp(v, "decode_deep")) return GemmTile::kDecodeDeep;
  if (!std::strcmp(v, "medium")) return GemmTile::kMedium;
  if (!std::strcmp(v, "large")) return GemmTile::kLarge;
  if (!std::strcmp(v, "huge")) return GemmTile::kHuge;
  if (!std::strcmp(v, "skinny")) return GemmTile::kSkinny;
  if (!std::strcmp(v, "gemv")) return GemmTile::kGemv;
  return GemmTile::kAuto;
}

// One lane's 4 values of a 1x128 activation block at p (bf16, 8-byte aligned) into v, and the
// block's scale, warp-collective: s = 2^ceil(log2(max(amax, 1e-4) / 448)), exactly
// (dsv4.ops.quant.ue8m0_scale); a block holding inf or NaN gets s = 1 there (frexp of a
// non-finite value has exponent 0), and so here. Shared by both activation quantisers below.
__device__ __forceinline__ float act_block_scale(const __nv_bfloat16* p, float (&v)[4]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  v[0] = __uint_as_float(raw.x << 16);
  v[1] = __uint_as_float(raw.x & 0xFFFF0000u);
  v[2] = __uint_as_float(raw.y << 16);
  v[3] = __uint_as_float(raw.y & 0xFFFF0000u);
  float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, d));
  amax = fmaxf(amax, 1e-4f);
  const bool finite = __all_sync(0xffffffffu, isfinite(v[0]) && isfinite(v[1]) &&
                                                  isfinite(v[2]) && isfinite(v[3]));
  const uint32_t rb = __float_as_uint(amax / 448.0f);
  const uint32_t ex = (rb >> 23) & 0xFFu;
  return finite ? __uint_as_float(((rb & 0x7FFFFFu) != 0u ? ex + 1u : ex) << 23) : 1.f;
}

// The activation quantisation simulation of dsv4.ops.quant.fp8_e4m3_sim (block 128), bit for
// bit: one warp per 1x128 block, 4 values per lane.
__global__ void fp8_act_quant_sim_kernel(const __nv_bfloat16* __restrict__ x, int64_t xs,
                                         __nv_bfloat16* __restrict__ y, int64_t ys, int64_t rows,
                                         int64_t blocks_per_row) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
       b < rows * blocks_per_row; b += warps) {
    const int64_t r = b / blocks_per_row, c0 = (b % blocks_per_row) * 128 + lane * 4;
    float v[4];
    const float s = act_block_scale(x + r * xs + c0, v);
    const float inv = 1.0f / s;  // exact: a power of two
    uint32_t out[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float q[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float t = v[2 * i + h] * inv;
        t = t > 448.f ? 448.f : (t < -448.f ? -448.f : t);  // NaN stays NaN (as torch.clamp)
        const __nv_fp8_storage_t f8 = __nv_cvt_float_to_fp8(t, __NV_SATFINITE, __NV_E4M3);
        const __half_raw hr = __nv_cvt_fp8_to_halfraw(f8, __NV_E4M3);
        q[h] = __half2float(__half(hr)) * s;
      }
      out[i] = gg::pack_bf16x2(q[0], q[1]);
    }
    *reinterpret_cast<uint2*>(y + r * ys + c0) = make_uint2(out[0], out[1]);
  }
}

// dsv4.ops.quant.fp8_e4m3_quantize(x, 128), bit for bit: one warp per 1x128 block, 4 values
// per lane; the scale as in fp8_act_quant_sim_kernel above (the same rule, the codes and the
// scale stored instead of their product).
__global__ void fp8_act_quant_kernel(const __nv_bfloat16* __restrict__ x, int64_t xs,
                                     uint8_t* __restrict__ q, int64_t qs, float* __restrict__ sc,
                                     int64_t ss, int64_t rows, int64_t blocks_per_row) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
       b < rows * blocks_per_row; b += warps) {
    const int64_t r = b / blocks_per_row, kb = b % blocks_per_row, c0 = kb * 128 + lane * 4;
    float v[4];
    const float s = act_block_scale(x + r * xs + c0, v);
    const float inv = 1.0f / s;  // exact: a power of two
    uint32_t packed = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float t = v[i] * inv;
      t = t > 448.f ? 448.f : (t < -448.f ? -448.f : t);  // NaN stays NaN (as torch.clamp)
      const __nv_fp8_storage_t f8 = __nv_cvt_float_to_fp8(t, __NV_SATFINITE, __NV_E4M3);
      packed |= static_cast<uint32_t>(f8) << (8 * i);
    }
    *reinterpret_cast<uint32_t*>(q + r * qs + c0) = packed;
    if (lane == 0) sc[r * ss + kb] = s;
  }
}

__global__ void zero_rows_kernel(uint4* __restrict__ out, int64_t rs16, int64_t rows,
                                 int64_t cols16, const int32_t* __restrict__ offsets, int32_t E) {
  int64_t first = __ldg(offsets + E);
  first = first < 0 ? 0 : (first > rows ? rows : first);
  const int64_t n = (rows - first) * cols16;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[(first + i / cols16) * rs16 + i % cols16] = make_uint4(0u, 0u, 0u, 0u);
  }
}

// The warp-specialised mainloop (GemmMainloop; DSV4_GEMM_MAINLOOP=ws when kAuto).
bool ws_mainloop(const GroupedGemmArgs& a) {
  if (a.mainloop != GemmMainloop::kAuto) return a.mainloop == GemmMainloop::kWarpSpecialized;
  const char* v = std::getenv("DSV4_GEMM_MAINLOOP");
  return v != nullptr && !std::strcmp(v, "ws");
}

int device_sms() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 132;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 132;
  return sms > 0 ? sms : 132;
}

// kAuto's use of the skinny tile (grouped_gemm_skinny.cuh). Measured on an H100 (bench/README,
// 2026-12-05 late night): it beats the 16-row tensor-core tile on FP8 weights without expert
// offsets at one activation row (fp8_linear wq_a 2.8x, wq_b 1.28x, grouped_oproj FP8 wo_a
// 1.55x) and loses on bf16 weights, on the MoE and at two or more rows per unit. So by
// default: FP8 weights, BF16 activations, no expert offsets, pairs == 1.
// DSV4_GEMM_SKINNY=1 widens it to the earlier candidate (any format; without offsets
// pairs <= 2, with them pairs <= E); DSV4_GEMM_SKINNY=0 never picks it.
bool skinny_fits(const GroupedGemmArgs& a) {
  if (a.x_scale != nullptr) return false;
  const char* v = std::getenv("DSV4_GEMM_SKINNY");
  if (v != nullptr && !std::strcmp(v, "0")) return false;
  if (v != nullptr && !std::strcmp(v, "1"))
    return a.expert_offsets == nullptr ? a.pairs <= 2 : a.pairs <= a.n_experts;
  return a.w_format == GemmWeightFormat::kFP8 && a.expert_offsets == nullptr && a.pairs == 1;
}

}  // namespace

namespace gg {
// the skinny tile (grouped_gemm_skinny.cu)
cudaError_t launch_skinny(const GroupedGemmArgs& a, int num_sms, cudaStream_t s);
// the GEMV tile (grouped_gemm_gemv.cu): whether it takes these arguments; its launch
bool gemv_supports(const GroupedGemmArgs& a);
cudaError_t launch_gemv(const GroupedGemmArgs& a, int num_sms, cudaStream_t s);
}  // namespace gg

namespace {
// kAuto's use of the GEMV tile (grouped_gemm_gemv.cuh): every problem it takes (dense weights,
// pairs <= 2, bf16 / FP8 weights, store epilogue); DSV4_GEMM_GEMV=0 never picks it.
bool gemv_fits(const GroupedGemmArgs& a) {
  const char* v = std::getenv("DSV4_GEMM_GEMV");
  if (v != nullptr && !std::strcmp(v, "0")) return false;
  return gg::gemv_supports(a);
}
}  // namespace

GemmTile grouped_gemm_resolve_tile(const GroupedGemmArgs& a) {
  GemmTile t = a.tile != GemmTile::kAuto ? a.tile : tile_from_env();
  // forced outside its contract (MoE, 3+ rows, FP4, SwiGLU, FP8 activations): the skinny tile
  if (t == GemmTile::kGemv && !gg::gemv_supports(a)) t = GemmTile::kSkinny;
  if (t != GemmTile::kAuto) return t;
  if (gemv_fits(a)) return GemmTile::kGemv;
  if (skinny_fits(a)) return GemmTile::kSkinny;
  // average activation rows per expert that has any
  int64_t per = a.pairs;
  if (a.expert_offsets != nullptr) {
    const int64_t busy = a.pairs < a.n_experts ? a.pairs : a.n_experts;
    per = busy > 0 ? (a.pairs + busy - 1) / busy : 0;
  }
  if (per <= 16) {
    // units of 64 weight rows x 16 activation rows (an upper bound with expert offsets):
    // fewer than two per SM -> one deep-pipelined block per SM
    const int64_t n_fb = (a.rows + (a.epilogue == GemmEpilogue::kSwiGLU ? 31 : 63)) /
                         (a.epilogue == GemmEpilogue::kSwiGLU ? 32 : 64);
    const int sms = a.num_sms > 0 ? a.num_sms : device_sms();
    return gg::unit_bound(a, n_fb, 16) < 2 * static_cast<int64_t>(sms) ? GemmTile::kDecodeDeep
                                                                       : GemmTile::kDecode;
  }
  if (per <= 64) return GemmTile::kMedium;
  // the RoPE table takes 64 KB at 256 rows: FP8 weights then have too few stages left
  if (per <= 128 || (a.positions != nullptr && a.w_format != GemmWeightFormat::kBF16))
    return GemmTile::kLarge;
  return GemmTile::kHuge;
}

namespace {

cudaError_t run(const GroupedGemmArgs& a, cudaStream_t stream) {
  cudaError_t err = check_args(a);
  if (err != cudaSuccess) return err;
  if (a.pairs == 0) return cudaSuccess;
  const GemmTile tile = grouped_gemm_resolve_tile(a);
  bool overlap = a.pipeline == GemmPipeline::kOverlap;
  if (a.pipeline == GemmPipeline::kAuto) {
    const char* v = std::getenv("DSV4_GEMM_PIPE");
    overlap = v != nullptr && !std::strcmp(v, "overlap");
  }
  const int sms = a.num_sms > 0 ? a.num_sms : device_sms();
  if (a.x_scale != nullptr) {  // FP8 activations: no skinny variant; its 16-row tile instead
    return gg::launch_qmma(a, tile == GemmTile::kSkinny ? GemmTile::kDecode : tile, sms, stream);
  }
  if (tile == GemmTile::kGemv) return gg::launch_gemv(a, sms, stream);
  if (tile == GemmTile::kSkinny) return gg::launch_skinny(a, sms, stream);
  if (a.w_format == GemmWeightFormat::kBF16 &&
      (tile == GemmTile::kLarge || tile == GemmTile::kHuge) && ws_mainloop(a))
    return gg::launch_ws_bf16(a, tile, sms, stream);
  switch (a.w_format) {
    case GemmWeightFormat::kBF16: return gg::launch_bf16(a, tile, overlap, sms, stream);
    case GemmWeightFormat::kFP8: return gg::launch_fp8(a, tile, overlap, sms, stream);
    case GemmWeightFormat::kFP4: return gg::launch_fp4(a, tile, overlap, sms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

// An error the caller left pending reaches the caller (own_error.cuh keep_pending: the tiles'
// launchers set their shared-memory size on every call; check_grouped_gemm --refusal).
cudaError_t grouped_gemm(const GroupedGemmArgs& a, cudaStream_t stream) {
  const cudaError_t pending = cudaPeekAtLastError();
  return keep_pending(pending, run(a, stream));
}

cudaError_t fp8_act_quant_sim(const void* x, int64_t x_row_stride, void* y, int64_t y_row_stride,
                              int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows < 0 || cols < 0 || cols % 128 != 0) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (x == nullptr || y == nullptr || reinterpret_cast<uintptr_t>(x) % 8 ||
      reinterpret_cast<uintptr_t>(y) % 8 || x_row_stride % 4 || y_row_stride % 4)
    return cudaErrorInvalidValue;
  const int64_t blocks = rows * (cols / 128);
  const int64_t ctas64 = (blocks + 7) / 8;
  const int ctas = static_cast<int>(ctas64 < 4096 ? ctas64 : 4096);
  fp8_act_quant_sim_kernel<<<ctas, 256, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(x), x_row_stride, static_cast<__nv_bfloat16*>(y),
      y_row_stride, rows, cols / 128);
  return cudaGetLastError();
}

cudaError_t fp8_act_quant(const void* x, int64_t x_row_stride, void* q, int64_t q_row_stride,
                          float* s, int64_t s_row_stride, int64_t rows, int64_t cols,
                          cudaStream_t stream) {
  if (rows < 0 || cols < 0 || cols % 128 != 0) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (x == nullptr || q == nullptr || s == nullptr || reinterpret_cast<uintptr_t>(x) % 8 ||
      reinterpret_cast<uintptr_t>(q) % 4 || reinterpret_cast<uintptr_t>(s) % 4 ||
      x_row_stride % 4 || q_row_stride % 4)
    return cudaErrorInvalidValue;
  const int64_t blocks = rows * (cols / 128);
  const int64_t ctas64 = (blocks + 7) / 8;
  const int ctas = static_cast<int>(ctas64 < 4096 ? ctas64 : 4096);
  fp8_act_quant_kernel<<<ctas, 256, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(x), x_row_stride, static_cast<uint8_t*>(q), q_row_stride,
      s, s_row_stride, rows, cols / 128);
  return cudaGetLastError();
}

cudaError_t zero_rows_past_offsets(void* out, int64_t out_row_stride, int64_t rows, int64_t cols,
                                   const int32_t* expert_offsets, int32_t n_experts,
                                   cudaStream_t stream) {
  if (rows < 0 || cols < 0 || cols % 8 != 0 || n_experts < 0) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (out == nullptr || expert_offsets == nullptr || !aligned16(out) || out_row_stride % 8)
    return cudaErrorInvalidValue;
  const int64_t n16 = rows * (cols / 8);
  const int64_t ctas64 = (n16 + 255) / 256;
  const int ctas = static_cast<int>(ctas64 < 1024 ? ctas64 : 1024);
  zero_rows_kernel<<<ctas, 256, 0, stream>>>(static_cast<uint4*>(out), out_row_stride / 8, rows,
                                             cols / 8, expert_offsets, n_experts);
  return cudaGetLastError();
}

}  // namespace dsv4
