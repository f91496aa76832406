// Checks of the float scalar arguments of the torch glue (csrc/torch/*.cpp): a schema `float`
// arrives as a double and reaches the kernels as a float32, so each value must be one the
// kernel's float32 maths takes as the reference does. Every check runs before the op allocates,
// writes or launches anything, so a refused call leaves every buffer as it was. The CPU
// references refuse the same values with the same words (python/dsv4/ops/_ext.py
// check_finite_f32 / check_positive_f32). `op` is the op's message prefix, ending in ": "
// (e.g. "dsv4::rms_norm (CUDA): "); `name` the schema's argument name.
#pragma once

#include <c10/util/Exception.h>

#include <cmath>

namespace dsv4 {

// The largest finite float32 and the smallest positive one (subnormal; the kernels are built
// without fast-math, so it is not flushed to 0), as doubles.
constexpr double kFloat32Max = 3.4028234663852886e+38;
constexpr double kFloat32TrueMin = 1.4012984643248171e-45;

// A finite float32: NaN, +-inf and doubles beyond the float32 range (inf once rounded) are
// refused. 0 and negative values are accepted (a scale or a shift).
inline void check_finite_f32(double value, const char* op, const char* name) {
  TORCH_CHECK(std::isfinite(value) && std::fabs(value) <= kFloat32Max, op, name,
              " must be a finite float32 (|", name, "| <= 3.40282347e+38), got ", value);
}

// A positive finite float32 (an epsilon added before a square root or a division): 0,
// negative values, NaN, inf and positive doubles that round to 0 or inf in float32 are refused.
inline void check_positive_f32(double value, const char* op, const char* name) {
  TORCH_CHECK(value >= kFloat32TrueMin && value <= kFloat32Max, op, name,
              " must be a finite float32 > 0 (1.40129846e-45 <= ", name,
              " <= 3.40282347e+38), got ", value);
}

// A SwiGLU clamp limit (moe_swiglu's `limit`, moe_up's `swiglu_limit`): 0 (no clamp) or a
// finite float32 >= FLT_MIN. A positive double that rounds to float 0 would clamp to 0 in the
// reference and not at all here; a NaN clamps nothing here. Python: _ext.check_clamp_limit_f32.
constexpr double kFloat32MinNormal = 1.1754943508222875e-38;
inline void check_clamp_limit_f32(double value, const char* op, const char* name) {
  TORCH_CHECK(std::isfinite(value) && (value == 0 || value >= kFloat32MinNormal), op, name,
              " must be 0 (no clamp) or a finite float32 >= 1.17549435e-38, got ", value);
}

}  // namespace dsv4
