// torch.ops.dsv4.rms_norm: schema and CUDA implementation (argument checks, device guard, current
// stream, and the call into the torch-free kernel csrc/kernels/rms_norm.cu).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>

#include "dsv4/rms_norm.h"
#include "scalar_checks.h"

namespace dsv4 {
namespace {

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  constexpr const char* kOp = "dsv4::rms_norm (CUDA): ";
  TORCH_CHECK(x.is_cuda(), kOp, "x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(weight.device() == x.device(), kOp, "weight must be on x's device (", x.device(),
              "), got ", weight.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, kOp,
              "x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, kOp, "x must have at least 1 dimension, got a 0-d tensor");
  const int64_t cols = x.size(-1);
  TORCH_CHECK(x.stride(-1) == 1 || cols <= 1, kOp,
              "x must have a contiguous last dimension (stride 1), got stride ", x.stride(-1),
              " for shape ", x.sizes(), "; call .contiguous() first");
  TORCH_CHECK(weight.scalar_type() == at::kFloat, kOp,
              "weight must be float32 (RMSNorm weights are kept in fp32), got ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == cols, kOp, "weight must have shape [",
              cols, "] (x.size(-1)), got ", weight.sizes());
  TORCH_CHECK(weight.stride(0) == 1 || cols <= 1, kOp, "weight must be contiguous, got stride ",
              weight.stride(0));
  check_positive_f32(eps, kOp, "eps");

  c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options());  // contiguous, like the fake impl
  if (y.numel() == 0) return y;
  const int64_t rows = y.numel() / cols;
  TORCH_CHECK(rows <= INT_MAX, kOp, "at most ", INT_MAX, " rows are supported, got ", rows);
  TORCH_CHECK(cols <= INT_MAX, kOp, "at most ", INT_MAX, " columns are supported, got ", cols);

  // A view when the leading dims collapse (any 2-D x with a unit last stride), else a copy.
  const at::Tensor x2 = x.reshape({rows, cols});
  const DType dtype = x.scalar_type() == at::kFloat ? DType::kFloat32 : DType::kBFloat16;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  C10_CUDA_CHECK(dsv4::rms_norm(x2.data_ptr(), weight.data_ptr<float>(), y.data_ptr(), rows,
                                cols, x2.stride(0), cols, static_cast<float>(eps), dtype,
                                stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace
}  // namespace dsv4

TORCH_LIBRARY_FRAGMENT(dsv4, m) {
  // y = weight * (x * rsqrt(mean(x^2, -1) + eps)), fp32 math; architecture.md §10.1.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv4, CUDA, m) { m.impl("rms_norm", &dsv4::rms_norm_cuda); }
