// Shared argument handling of the GEMM ops' torch glue (grouped_gemm.cpp, gemm.cpp,
// grouped_oproj.cpp): weight formats, alignment checks, activation quantisation.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <utility>
#include <optional>
#include <string>

#include "dsv4/grouped_gemm.h"

namespace dsv4 {
namespace gemm_glue {

inline bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// bf16 activations [rows, cols] the kernels read in place: unit last stride, 16-byte aligned
// rows (else an aligned contiguous copy: clone, since .contiguous() returns a misaligned view,
// or a one-row view with any row stride, unchanged).
inline at::Tensor readable_rows(const at::Tensor& t) {
  const bool ok = (t.stride(-1) == 1 || t.size(-1) <= 1) && aligned16(t) &&
                  (t.dim() < 2 || t.stride(0) % 8 == 0);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// The row stride the kernels get for a [rows, cols] tensor: 0 when it has at most one row
// (torch leaves the stride of a size-1 dim arbitrary, and the kernels only multiply it by 0).
inline int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? 0 : t.stride(0); }

inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                         const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, name, " must be on ", ref.device(), ", got ",
              t.device());
}

inline void check_out_rows(const at::Tensor& out, const at::Tensor& ref, int64_t rows,
                           int64_t cols, const char* op, const char* name) {
  check_device(out, ref, op, name);
  TORCH_CHECK(out.scalar_type() == at::kBFloat16, op, name, " must be bfloat16, got ",
              out.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == rows && out.size(1) == cols, op, name,
              " must be [", rows, ", ", cols, "], got ", out.sizes());
  TORCH_CHECK(rows == 0 || ((out.stride(1) == 1 || cols <= 1) && aligned16(out) &&
                            (rows <= 1 || out.stride(0) % 8 == 0)),
              op, name, " must have a unit last stride, a row stride that is a multiple of 8 "
              "and a 16-byte aligned data pointer (e.g. a contiguous tensor); got strides ",
              out.strides());
}

// The weight format from the dtype, with the logical input width `k` and the expected shape of
// the scale checked. `w` has `lead` leading (expert / gate-up) dims, then [rows, k or k / 2].
inline GemmWeightFormat weight_format(const at::Tensor& w, const std::optional<at::Tensor>& scale,
                                      int64_t k, const char* op, const char* name) {
  GemmWeightFormat fmt;
  int64_t k_stored = k;
  const auto dt = w.scalar_type();
  if (dt == at::kBFloat16) {
    fmt = GemmWeightFormat::kBF16;
  } else if (dt == at::kFloat8_e4m3fn) {
    fmt = GemmWeightFormat::kFP8;
  } else if (dt == at::kChar || dt == at::kByte) {
    fmt = GemmWeightFormat::kFP4;
    k_stored = k / 2;
  } else {
    TORCH_CHECK(false, op, name, " must be bfloat16, float8_e4m3fn (128x128 block scales) or "
                "int8 packed FP4 (1x32 scales) on CUDA, got ", dt);
  }
  TORCH_CHECK(w.size(-1) == k_stored, op, name, ": last dim must be ", k_stored,
              " for an input width of ", k, ", got ", w.sizes());
  const int64_t rows = w.size(-2);
  const int64_t k_align = fmt == GemmWeightFormat::kBF16 ? 8 : (fmt == GemmWeightFormat::kFP8 ? 16 : 32);
  TORCH_CHECK(k % k_align == 0, op, "the CUDA kernel needs the input width to be a multiple of ",
              k_align, " for ", dt, " weights, got ", k);
  TORCH_CHECK(rows % 8 == 0, op, "the CUDA kernel needs the output width to be a multiple of 8, "
              "got ", rows);
  TORCH_CHECK(w.is_contiguous(), op, name, " must be contiguous (make it so once at load time), "
              "got strides ", w.strides());
  TORCH_CHECK(aligned16(w), op, name, " must be 16-byte aligned");
  if (fmt == GemmWeightFormat::kBF16) {
    TORCH_CHECK(!scale.has_value(), op, name, "_scale must be None for bfloat16 weights");
    return fmt;
  }
  TORCH_CHECK(scale.has_value(), op, name, "_scale is required for ", dt, " weights");
  const at::Tensor& s = *scale;
  check_device(s, w, op, "scale");
  TORCH_CHECK(s.scalar_type() == at::kFloat8_e8m0fnu || s.scalar_type() == at::kFloat, op, name,
              "_scale must be float8_e8m0fnu or float32, got ", s.scalar_type());
  TORCH_CHECK(s.dim() == w.dim(), op, name, "_scale must have ", w.dim(), " dims, got ",
              s.sizes());
  for (int64_t d = 0; d + 2 < w.dim(); ++d)
    TORCH_CHECK(s.size(d) == w.size(d), op, name, "_scale ", s.sizes(), " does not match ",
                name, " ", w.sizes());
  const int64_t want_r = fmt == GemmWeightFormat::kFP8 ? (rows + 127) / 128 : rows;
  const int64_t want_c = fmt == GemmWeightFormat::kFP8 ? (k + 127) / 128 : k / 32;
  TORCH_CHECK(s.size(-2) == want_r && s.size(-1) == want_c, op, name, "_scale must end in [",
              want_r, ", ", want_c, "], got ", s.sizes());
  TORCH_CHECK(s.stride(-1) == 1 || want_c == 1, op, name, "_scale must have a unit last stride");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(s.data_ptr()) % 4 == 0, op, name,
              "_scale must be 4-byte aligned");
  return fmt;
}

// Fills the weight / scale fields of `a` for a weight with leading dims [E] or [E, 2].
inline void set_weight(GroupedGemmArgs& a, const at::Tensor& w,
                       const std::optional<at::Tensor>& scale, GemmWeightFormat fmt) {
  const int64_t es = w.element_size();
  a.w = w.data_ptr();
  a.w_format = fmt;
  a.w_expert_stride = w.stride(0) * es;
  a.w_mat_stride = w.dim() == 4 ? w.stride(1) * es : 0;
  a.w_row_stride = w.stride(-2) * es;
  if (scale.has_value()) {
    const at::Tensor& s = *scale;
    a.w_scale = s.data_ptr();
    a.scale_fp32 = s.scalar_type() == at::kFloat;
    // readable bytes: from the first scale to the end of the tensor's storage
    a.w_scale_bytes = static_cast<int64_t>(s.storage().nbytes()) -
                      s.storage_offset() * static_cast<int64_t>(s.element_size());
    a.s_expert_stride = s.stride(0);
    a.s_mat_stride = s.dim() == 4 ? s.stride(1) : 0;
    a.s_row_stride = s.stride(-2);
  }
}

// fp8_e4m3_sim(x, 128) of bf16 rows into a new contiguous tensor (act_quant).
inline at::Tensor act_quant(const at::Tensor& x, cudaStream_t stream, const char* op) {
  TORCH_CHECK(x.size(1) % 128 == 0, op, "act_quant needs an input width divisible by 128, got ",
              x.size(1));
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  C10_CUDA_CHECK(fp8_act_quant_sim(x.data_ptr(), row_stride(x), y.data_ptr(), row_stride(y),
                                   x.size(0), x.size(1), stream));
  return y;
}

// fp8_e4m3_quantize(x, 128) of bf16 rows: (codes float8_e4m3fn [rows, cols], scales float32
// [rows, cols / 128]), both new contiguous tensors.
inline std::pair<at::Tensor, at::Tensor> fp8_quant(const at::Tensor& x, cudaStream_t stream,
                                                   const char* op) {
  TORCH_CHECK(x.size(1) % 128 == 0, op, "FP8 activation quantisation needs an input width "
              "divisible by 128, got ", x.size(1));
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kFloat8_e4m3fn)
                                          .memory_format(at::MemoryFormat::Contiguous));
  at::Tensor s = at::empty({x.size(0), x.size(1) / 128}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(fp8_act_quant(x.data_ptr(), row_stride(x), q.data_ptr(), row_stride(q),
                               s.data_ptr<float>(), s.size(0) <= 1 ? 0 : s.stride(0), x.size(0),
                               x.size(1), stream));
  return {q, s};
}

// Whether act_quant runs on FP8 tensor cores (FP8 x FP8, grouped_gemm_qmma.cuh) instead of the
// quantisation simulation + bf16 MMAs: opt-in (DSV4_MOE_FP8_MMA=1) until it has run on the
// H200, for FP8 weights and for FP4 weights with e8m0 scales (float32 FP4 scales need not be
// powers of two and cannot be folded exactly: they stay on the bf16 path).
inline bool use_fp8_mma(bool act_quant, GemmWeightFormat fmt, const GroupedGemmArgs& a) {
  if (!act_quant || fmt == GemmWeightFormat::kBF16) return false;
  const char* v = std::getenv("DSV4_MOE_FP8_MMA");
  if (v == nullptr || std::string(v) != "1") return false;
  if (fmt == GemmWeightFormat::kFP4) {
    return !a.scale_fp32 && a.s_expert_stride % 4 == 0 && a.s_mat_stride % 4 == 0 &&
           a.s_row_stride % 4 == 0;
  }
  return true;
}

inline void run(const GroupedGemmArgs& a, cudaStream_t stream, const char* op) {
  const cudaError_t err = grouped_gemm(a, stream);
  TORCH_CHECK(err == cudaSuccess, op, "grouped GEMM launch failed: ", cudaGetErrorString(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace gemm_glue
}  // namespace dsv4
