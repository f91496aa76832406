// dsv4 RMSNorm kernel: torch-free C++ API (raw device pointers + cudaStream_t).
//
//   y[r, j] = weight[j] * (x[r, j] * rsqrt(mean_j(x[r, :]^2) + eps))
//
// computed in fp32 whatever the storage dtype of x/y (architecture.md §10.1), then cast to
// y's dtype once. weight is fp32. One CUDA block per row (grid.x = rows, so rows up to
// 2^31 - 1 are fine).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace dsv4 {

// Storage dtype of activations in the torch-free kernel API.
enum class DType : int32_t {
  kFloat32 = 0,
  kBFloat16 = 1,
};

// x:      [rows, cols] of `dtype`, element (r, j) at x + r * x_row_stride + j (stride in
//         elements; the last dimension is contiguous)
// weight: [cols] fp32, contiguous
// y:      [rows, cols] of `dtype`, element (r, j) at y + r * y_row_stride + j; must not
//         overlap x
// Returns cudaSuccess, cudaErrorInvalidValue for bad arguments (negative sizes, rows >
// 2^31 - 1, unknown dtype, null pointers with non-empty sizes), or the launch error.
// Does not synchronise. rows == 0 or cols == 0 is a no-op.
cudaError_t rms_norm(const void* x, const float* weight, void* y, int64_t rows, int64_t cols,
                     int64_t x_row_stride, int64_t y_row_stride, float eps, DType dtype,
                     cudaStream_t stream);

}  // namespace dsv4
