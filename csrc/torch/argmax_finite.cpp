// torch.ops.dsv4.argmax_finite: schema and CUDA implementation (argument checks, device guard,
// current stream, and the call into the torch-free kernel csrc/kernels/argmax_finite.cu).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dsv4/argmax_finite.h"

namespace dsv4 {
namespace {

at::Tensor argmax_finite_cuda(const at::Tensor& logits) {
  constexpr const char* kOp = "dsv4::argmax_finite (CUDA): ";
  TORCH_CHECK(logits.is_cuda(), kOp, "logits must be a CUDA tensor, got device ",
              logits.device());
  TORCH_CHECK(logits.scalar_type() == at::kFloat, kOp, "logits must be float32, got ",
              logits.scalar_type());
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) >= 1, kOp,
              "logits must be [rows, n] with n >= 1, got ", logits.sizes());
  c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t rows = logits.size(0), n = logits.size(1);
  at::Tensor out = at::empty({2, rows}, logits.options().dtype(at::kLong));
  if (rows == 0) return out;
  // rows of n values with a unit last stride (any other layout is copied into that form)
  const at::Tensor x = (logits.stride(1) == 1 && (rows == 1 || logits.stride(0) >= n))
                           ? logits : logits.contiguous();
  const int64_t stride = rows == 1 ? n : x.stride(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  C10_CUDA_CHECK(dsv4::argmax_finite(x.data_ptr<float>(), rows, n, stride,
                                     out.data_ptr<int64_t>(), stream));
  return out;
}

}  // namespace
}  // namespace dsv4

TORCH_LIBRARY_FRAGMENT(dsv4, m) {
  // [argmax(logits, -1); isfinite(logits).all(-1)] as int64 [2, rows]: the greedy draw.
  m.def("argmax_finite(Tensor logits) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv4, CUDA, m) { m.impl("argmax_finite", &dsv4::argmax_finite_cuda); }
