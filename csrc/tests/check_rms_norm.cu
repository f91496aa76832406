// Standalone check of dsv4::rms_norm (no torch): random inputs on the GPU, compared with a
// CPU loop in double precision. Prints PASS / FAIL (exit 1) or "SKIP: no CUDA device" (exit 0).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "dsv4/rms_norm.h"

#include "check_common.h"

namespace {

using dsv4_check::bf16_to_float;
using dsv4_check::float_to_bf16;

// One case: rows x cols with row stride `stride` (>= cols) and element `offset` from the start
// of the allocation (offset 1 exercises the unaligned path). Returns true on success.
bool run_case(dsv4::DType dtype, int64_t rows, int64_t cols, int64_t stride, int64_t offset,
              std::mt19937& rng) {
  const bool bf16 = dtype == dsv4::DType::kBFloat16;
  const size_t elem = bf16 ? 2 : 4;
  const int64_t n = offset + rows * stride;
  const float eps = 1e-6f;
  std::normal_distribution<float> normal(0.5f, 3.0f);
  std::uniform_real_distribution<float> uniform(0.1f, 2.1f);

  std::vector<float> x(n), w(cols);
  for (auto& v : x) v = normal(rng);
  for (auto& v : w) v = uniform(rng);
  std::vector<uint16_t> x16(n);
  if (bf16) {
    for (int64_t i = 0; i < n; ++i) {
      x16[i] = float_to_bf16(x[i]);
      x[i] = bf16_to_float(x16[i]);  // the reference sees the rounded input
    }
  }

  void *dx = nullptr, *dy = nullptr;
  float* dw = nullptr;
  CHECK_CUDA(cudaMalloc(&dx, n * elem));
  CHECK_CUDA(cudaMalloc(&dy, n * elem));
  CHECK_CUDA(cudaMalloc(&dw, cols * sizeof(float)));
  CHECK_CUDA(cudaMemcpy(dx, bf16 ? static_cast<const void*>(x16.data()) : x.data(), n * elem,
                        cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(dw, w.data(), cols * sizeof(float), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemset(dy, 0xff, n * elem));  // poison: NaN in fp32 and bf16

  char* xp = static_cast<char*>(dx) + offset * elem;
  char* yp = static_cast<char*>(dy) + offset * elem;
  CHECK_CUDA(dsv4::rms_norm(xp, dw, yp, rows, cols, stride, stride, eps, dtype, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());

  std::vector<float> y(n);
  std::vector<uint16_t> y16(n);
  if (bf16) {
    CHECK_CUDA(cudaMemcpy(y16.data(), dy, n * elem, cudaMemcpyDeviceToHost));
    for (int64_t i = 0; i < n; ++i) y[i] = bf16_to_float(y16[i]);
  } else {
    CHECK_CUDA(cudaMemcpy(y.data(), dy, n * elem, cudaMemcpyDeviceToHost));
  }
  CHECK_CUDA(cudaFree(dx));
  CHECK_CUDA(cudaFree(dy));
  CHECK_CUDA(cudaFree(dw));

  // fp32 output: within 1e-5 relative; bf16: within one bf16 rounding (2^-8 relative) + fp32.
  const double rtol = bf16 ? (1.0 / 256 + 1e-5) : 1e-5;
  double max_rel = 0;
  int64_t bad = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x.data() + offset + r * stride;
    const float* yr = y.data() + offset + r * stride;
    double ss = 0;
    for (int64_t j = 0; j < cols; ++j) ss += double(xr[j]) * xr[j];
    const double rstd = 1.0 / std::sqrt(ss / cols + eps);
    for (int64_t j = 0; j < cols; ++j) {
      const double ref = double(w[j]) * (double(xr[j]) * rstd);
      const double err = std::fabs(double(yr[j]) - ref);
      const double rel = err / std::max(std::fabs(ref), 1e-30);
      if (!(err <= rtol * std::fabs(ref) + 1e-6)) ++bad;  // NaN (unwritten) counts as bad
      if (rel > max_rel || std::isnan(rel)) max_rel = rel;
    }
  }
  std::printf("%s %-5s rows=%-6lld cols=%-5lld stride=%-5lld offset=%lld max_rel_err=%.3g\n",
              bad ? "FAIL" : "ok  ", bf16 ? "bf16" : "fp32", (long long)rows, (long long)cols,
              (long long)stride, (long long)offset, max_rel);
  return bad == 0;
}

}  // namespace

int main() {
  int n_dev = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
    std::printf("SKIP: no CUDA device\n");
    return 0;
  }
  std::mt19937 rng(std::random_device{}());
  bool ok = true;
  const int64_t shapes[][2] = {{1, 64}, {3, 512}, {129, 4096}, {70000, 64}, {5, 127}, {7, 1}};
  for (auto dtype : {dsv4::DType::kFloat32, dsv4::DType::kBFloat16}) {
    for (auto& s : shapes) {
      ok &= run_case(dtype, s[0], s[1], s[1], 0, rng);        // contiguous
      ok &= run_case(dtype, s[0], s[1], s[1] + 8, 1, rng);    // row stride, unaligned base
    }
  }
  // Argument validation: negative sizes are rejected, empty is a no-op.
  ok &= dsv4::rms_norm(nullptr, nullptr, nullptr, -1, 4, 4, 4, 1e-6f, dsv4::DType::kFloat32,
                       nullptr) == cudaErrorInvalidValue;
  ok &= dsv4::rms_norm(nullptr, nullptr, nullptr, 0, 4, 4, 4, 1e-6f, dsv4::DType::kFloat32,
                       nullptr) == cudaSuccess;
  std::printf("%s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
