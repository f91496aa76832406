// dsv4 greedy draw of a decode step: each row's argmax and whether the row is all finite, in one
// pass over the logits. Torch-free C++ API. Semantics (the reference):
// python/dsv4/ops/sampling.py argmax_finite_reference = torch.argmax(x, -1) and
// torch.isfinite(x).all(-1):
//
//   ids[r]    = the first index of the row's maximum; a row holding NaN gives its first NaN
//               (NaN counts as above every number, as torch.argmax orders it);
//   finite[r] = 1 when every value of row r is finite, else 0.
//
// For the runtime's sampler (dsv4.runtime.sampler.sample_greedy), where the same result took
// nine small PyTorch kernels per step.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace dsv4 {

// x:      [rows, n] fp32, row r at x + r * row_stride (row_stride >= n), unit last stride; any
//         alignment (16-byte vector loads where a row's start and n allow, scalar otherwise)
// out:    int64 [2, rows] contiguous: out[r] = ids[r], out[rows + r] = finite[r]
// Returns cudaSuccess, cudaErrorInvalidValue (rows < 0 or > INT32_MAX, n < 1, row_stride < n,
// null pointers) or the launch error. rows == 0: no-op.
cudaError_t argmax_finite(const float* x, int64_t rows, int64_t n, int64_t row_stride,
                          int64_t* out, cudaStream_t stream);

}  // namespace dsv4
