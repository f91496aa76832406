// torch.ops.dsv4.moe_swiglu: schema and CUDA implementation (argument checks, device guard,
// current stream, and the call into the torch-free kernel csrc/kernels/moe_swiglu.cu).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dsv4/moe_swiglu.h"
#include "scalar_checks.h"

namespace dsv4 {
namespace {

at::Tensor moe_swiglu_cuda(const at::Tensor& gu, const at::Tensor& weight, double limit) {
  constexpr const char* kOp = "dsv4::moe_swiglu (CUDA): ";
  TORCH_CHECK(gu.is_cuda(), kOp, "gu must be a CUDA tensor, got device ", gu.device());
  TORCH_CHECK(weight.device() == gu.device(), kOp, "weight must be on gu's device (",
              gu.device(), "), got ", weight.device());
  TORCH_CHECK(gu.scalar_type() == at::kBFloat16, kOp, "gu must be bfloat16, got ",
              gu.scalar_type());
  TORCH_CHECK(gu.dim() == 2 && gu.size(1) % 2 == 0, kOp,
              "gu must be [pairs, 2 * n] (the gate half, then the up half), got ", gu.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat, kOp, "weight must be float32, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == gu.size(0), kOp, "weight must be [",
              gu.size(0), "] (one routing weight per pair), got ", weight.sizes());
  check_clamp_limit_f32(limit, kOp, "limit");
  c10::cuda::CUDAGuard device_guard(gu.device());
  const int64_t pairs = gu.size(0), n = gu.size(1) / 2;
  at::Tensor h = at::empty({pairs, n}, gu.options());
  if (h.numel() == 0) return h;
  // The kernel reads rows of 2n elements with a unit last stride at a row stride >= 2n; any
  // other layout (a broadcast row, a transposed view) is copied into that form first.
  const at::Tensor g = (gu.stride(1) == 1 && (pairs == 1 || gu.stride(0) >= 2 * n))
                           ? gu : gu.contiguous();
  const int64_t g_stride = pairs == 1 ? 2 * n : g.stride(0);
  const at::Tensor w = weight.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(gu.device().index()).stream();
  C10_CUDA_CHECK(dsv4::moe_swiglu(g.data_ptr(), g_stride, w.data_ptr<float>(), h.data_ptr(), n,
                                  pairs, n, static_cast<float>(limit), stream));
  return h;
}

}  // namespace
}  // namespace dsv4

TORCH_LIBRARY_FRAGMENT(dsv4, m) {
  // h = bf16(silu(min(g, L)) * clamp(u, -L, L) * weight) over gu = [g | u]; architecture.md §9.
  m.def("moe_swiglu(Tensor gu, Tensor weight, float limit) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv4, CUDA, m) { m.impl("moe_swiglu", &dsv4::moe_swiglu_cuda); }
