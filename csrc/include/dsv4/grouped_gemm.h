// dsv4 grouped GEMM: torch-free C++ API of the kernels behind the routed-expert GEMMs
// (moe_up / moe_down), the FP8 block-scaled linear (fp8_linear) and the grouped output
// projection (grouped_oproj). Semantics: python/dsv4/ops/grouped_gemm.py, ops/gemm.py,
// ops/grouped_oproj.py; design: csrc/kernels/grouped_gemm.cuh.
//
// One problem = E "experts" (groups), each a weight matrix W_e [rows, k] (two, gate and up, for
// the SwiGLU epilogue) and a list of activation rows; for activation row i of expert e:
//
//   p      = (expert_offsets ? expert_offsets[e] : 0) + i          (the pair / token index)
//   xrow   = row_ids ? row_ids[p] : p                               (the input row)
//   a      = x[e * x_expert_stride + xrow * x_row_stride + (0 .. k)]     (bf16)
//            (inverse RoPE on the last 64 dims of every head_dim-wide head when `positions`)
//   kStore:  out[e * out_expert_stride + p * out_row_stride + r] = bf16(a . W_e[r])
//   kSwiGLU: g = bf16(a . W_e,0[f]), u = bf16(a . W_e,1[f]);
//            out[... + f] = bf16(route_weight[p] * silu(min(g, L)) * clamp(u, -L, L))
//
// with i < count_e = expert_offsets[e + 1] - expert_offsets[e] (offsets clamped to [0, pairs];
// a decreasing pair gives 0) or, without offsets, count_e = pairs for every expert. Products
// are fp32 on bf16 tensor cores (wgmma, sm_90a); FP8 / FP4 weights are dequantised exactly to
// bf16 in shared memory. Rows outside [0, x_rows) read as zero rows.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace dsv4 {

enum class GemmWeightFormat : int32_t {
  kBF16 = 0,  // bf16 [rows, k]
  kFP8 = 1,   // float8_e4m3fn [rows, k], scale [ceil(rows/128), ceil(k/128)]
  kFP4 = 2,   // packed e2m1 [rows, k/2] (low nibble = even k), scale [rows, k/32]
};

enum class GemmEpilogue : int32_t { kStore = 0, kSwiGLU = 1 };

// Tile configurations (weight rows per CTA x activation rows per tile):
//   kDecode 64 x 16 (3 CTAs per SM; weight-streaming, a few rows per expert),
//   kDecodeDeep 64 x 16 with one CTA per SM and a deep pipeline (few units: e.g. the output
//     projection at T = 1 has 128 units of 64 weight rows),
//   kMedium 128 x 64, kLarge 128 x 128, kHuge 128 x 256 (tensor-core bound).
//   kSkinny: no tensor cores, a weight stream (csrc/kernels/grouped_gemm_skinny.cuh): each
//     CTA reads 4 x (8 / WG) weight rows once with 16-byte loads and dots them with 1, 2, 4 or 8
//     activation rows on CUDA cores (fp32); for a few rows per weight matrix. BF16 activations
//     only: with x_scale (FP8 x FP8) kSkinny runs the FP8 path's 16-row tile.
//   kGemv: no tensor cores, a weight stream for dense weights (no expert offsets) and 1-2
//     activation rows (csrc/kernels/grouped_gemm_gemv.cuh): each warp owns whole weight rows
//     (16 loads of 16 bytes in flight per lane), the CTA's activation rows (RoPE applied) sit
//     in shared memory. bf16 / FP8 weights, bf16 activations, the store epilogue, pairs * k
//     * 2 <= 96 KB; forced (tile or DSV4_GEMM_TILE=gemv) on other arguments it runs kSkinny
//     (FP8 activations, x_scale: the FP8 path's 16-row tile).
// kAuto picks from the average rows per expert (pairs / min(E, pairs)) and the unit count; the
// environment variable DSV4_GEMM_TILE (decode, decode_deep, medium, large, huge, skinny, gemv)
// overrides it. kAuto picks kGemv wherever it applies (dense, pairs <= 2, bf16 / FP8 weights,
// store epilogue; DSV4_GEMM_GEMV=0: never, read per call), then kSkinny for FP8 weights without
// expert offsets at pairs == 1 (where it was measured faster than the 16-row tile);
// DSV4_GEMM_SKINNY=1: also without offsets at pairs <= 2 and with them (MoE) at pairs <= E,
// any format; DSV4_GEMM_SKINNY=0: never.
enum class GemmTile : int32_t {
  kAuto = 0, kDecode = 1, kMedium = 2, kLarge = 3, kHuge = 4, kDecodeDeep = 5, kSkinny = 6,
  kGemv = 7
};

enum class GemmPipeline : int32_t { kAuto = 0, kSerial = 1, kOverlap = 2 };

// Mainloop of the bf16-weight tensor-core tiles (kLarge, kHuge): every thread loads and issues
// MMAs with one barrier per k step (kClassic, grouped_gemm.cuh), or a producer warpgroup fills
// an mbarrier ring for two consumer warpgroups (kWarpSpecialized, grouped_gemm_ws.cuh). kAuto:
// DSV4_GEMM_MAINLOOP (classic | ws), else classic. Other formats and tiles: classic.
enum class GemmMainloop : int32_t { kAuto = 0, kClassic = 1, kWarpSpecialized = 2 };

struct GroupedGemmArgs {
  // Weights. All strides in BYTES. Row r of matrix m of expert e starts at
  //   w + e * w_expert_stride + m * w_mat_stride + r * w_row_stride.
  const void* w = nullptr;
  int64_t w_expert_stride = 0, w_mat_stride = 0, w_row_stride = 0;
  GemmWeightFormat w_format = GemmWeightFormat::kBF16;
  // Scales (FP8 / FP4): element (e, m, sr, sc) at scale + e*s_expert_stride + m*s_mat_stride +
  // sr*s_row_stride + sc (strides in ELEMENTS); FP8: sr = r / 128, sc = k / 128; FP4: sr = r,
  // sc = k / 32. e8m0 bytes, or float32 when scale_fp32.
  const void* w_scale = nullptr;
  bool scale_fp32 = false;
  // Bytes readable from w_scale (to the end of its allocation or tensor storage): the kernel
  // reads no scale byte at or past it. Required (> 0) with w_scale.
  int64_t w_scale_bytes = 0;
  int64_t s_expert_stride = 0, s_mat_stride = 0, s_row_stride = 0;
  int32_t n_experts = 0;
  int32_t rows = 0;  // output features per expert (N for SwiGLU: features, not 2N)
  int32_t k = 0;     // reduction length (bf16: % 8, FP8: % 16, FP4: % 32)

  // Activations (bf16). Strides in ELEMENTS; rows 16-byte aligned.
  const void* x = nullptr;
  int64_t x_expert_stride = 0, x_row_stride = 0;
  int64_t x_rows = 0;  // valid xrow range [0, x_rows)
  const int32_t* row_ids = nullptr;         // [pairs] or nullptr (xrow = p)
  const int32_t* expert_offsets = nullptr;  // [E + 1] or nullptr (every expert: all pairs)
  int64_t pairs = 0;

  // Inverse RoPE of the activations (grouped output projection): pair (2j, 2j+1) of the last
  // 64 dims of every head_dim-wide head of row p is rotated by -positions[p] * freqs[j].
  const int32_t* positions = nullptr;  // [pairs] or nullptr (no RoPE)
  const float* freqs = nullptr;        // [32]
  int32_t head_dim = 0;                // multiple of 64

  // Output (bf16). Strides in ELEMENTS; 16-byte aligned rows.
  GemmEpilogue epilogue = GemmEpilogue::kStore;
  const float* route_weight = nullptr;  // [pairs] (kSwiGLU)
  float swiglu_limit = 0.f;             // 0 = no clamp
  void* out = nullptr;
  int64_t out_expert_stride = 0, out_row_stride = 0;

  // FP8 activations (the FP8 x FP8 path, csrc/kernels/grouped_gemm_qmma.cuh): when x_scale is
  // set, x holds float8_e4m3fn codes (strides in elements = bytes, 16-byte aligned rows) and
  // x_scale their 1x128 block scales, float32 [x_rows, k / 128] with row stride
  // x_scale_row_stride (elements); a = codes * scale per block (fp8_act_quant). The products
  // run on FP8 tensor cores: sum over k blocks of (codes_x . codes_w) * s_x * s_w in fp32.
  // Needs FP8 weights (e8m0 or float32 scales) or FP4 weights with e8m0 scales whose strides
  // (s_expert_stride, s_mat_stride, s_row_stride) are multiples of 4; k % 128 == 0; no RoPE.
  // FP4: each row's four 1x32 scales of a 128-wide k block are folded into one power of two
  // (exact while they span <= 14 octaves; grouped_gemm_fp4.cuh). Tiles: 128 weight rows x 16,
  // 64 or 128 activation rows (from the average rows per expert; `tile` kDecode / kMedium /
  // kLarge force 16 / 64 / 128).
  const float* x_scale = nullptr;
  int64_t x_scale_row_stride = 0;

  GemmTile tile = GemmTile::kAuto;
  // Pipeline of the two-warpgroup tiles (kMedium, kLarge, kHuge): the MMAs of a k step finish
  // before the next barrier (kSerial) or stay in flight across it (kOverlap: one stage less of
  // prefetch). kAuto: DSV4_GEMM_PIPE (serial | overlap), else serial.
  GemmPipeline pipeline = GemmPipeline::kAuto;
  GemmMainloop mainloop = GemmMainloop::kAuto;
  int32_t num_sms = 0;  // 0: read from the current device
};

// Runs the grouped GEMM. Returns cudaErrorInvalidValue for arguments outside the contract
// above (null pointers, k / rows not multiples of 8 (FP8 k: 16, FP4 k: 32), misaligned rows,
// more than 1024 experts, RoPE with head_dim not a multiple of 64 or a SwiGLU epilogue),
// cudaErrorNotSupported when built without sm_90a code, or the launch error. No host sync. An
// error the caller left pending (an earlier failed runtime call on this thread) is returned when
// the call itself succeeds.
cudaError_t grouped_gemm(const GroupedGemmArgs& args, cudaStream_t stream);

// The tile kAuto resolves to for these arguments (what grouped_gemm will run).
GemmTile grouped_gemm_resolve_tile(const GroupedGemmArgs& args);

// y = fp8_e4m3_sim(x, 128) (dsv4.ops.quant): per 1x128 block along a row, amax = max(|x|,
// 1e-4), s = 2^ceil(log2(amax / 448)), y = bf16(e4m3(x / s) * s). x, y bf16 [rows, cols]
// (row strides in elements, 16-byte aligned rows), cols % 128 == 0. y may not overlap x.
cudaError_t fp8_act_quant_sim(const void* x, int64_t x_row_stride, void* y, int64_t y_row_stride,
                              int64_t rows, int64_t cols, cudaStream_t stream);

// FP8 activation quantisation for the FP8 x FP8 path, bit for bit dsv4.ops.quant.
// fp8_e4m3_quantize(x, 128): per 1x128 block along a row, amax = max(|x|, 1e-4),
// s = 2^ceil(log2(amax / 448)) (1 for a block holding inf / NaN), q = e4m3(clamp(x / s, +-448)).
// x bf16 [rows, cols] (row stride in elements, 8-byte aligned), cols % 128 == 0; q
// float8_e4m3fn [rows, cols] (row stride in elements, 4-byte aligned), s float32
// [rows, cols / 128] (row stride in elements).
cudaError_t fp8_act_quant(const void* x, int64_t x_row_stride, void* q, int64_t q_row_stride,
                          float* s, int64_t s_row_stride, int64_t rows, int64_t cols,
                          cudaStream_t stream);

// Zeroes rows [clamp(expert_offsets[n_experts], 0, rows), rows) of the bf16 matrix out
// [rows, cols] (row stride in elements; cols % 8 == 0, 16-byte aligned rows).
cudaError_t zero_rows_past_offsets(void* out, int64_t out_row_stride, int64_t rows, int64_t cols,
                                   const int32_t* expert_offsets, int32_t n_experts,
                                   cudaStream_t stream);

}  // namespace dsv4
