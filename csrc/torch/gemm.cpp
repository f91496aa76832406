// torch.ops.dsv4.fp8_linear / fp8_linear_out: schemas and CUDA implementation (the grouped GEMM
// kernel with one expert and no gather). Semantics: python/dsv4/ops/gemm.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <optional>
#include <vector>

#include "dsv4/grouped_gemm.h"
#include "gemm_utils.h"
#include "glue_checks.h"

namespace dsv4 {
namespace {

using namespace gemm_glue;

constexpr const char* kOp = "dsv4::fp8_linear (CUDA): ";

// out: [M, N] bf16 rows (a view of the caller's [..., N] output).
// Rows of x [..., K] (the product of the leading dims; also when K == 0).
int64_t lead_rows(const at::Tensor& x) {
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  return m;
}

void run_fp8_linear(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scale,
                    bool act_quant, const at::Tensor& out2) {
  const int64_t K = x_in.size(-1), N = weight.size(0);
  const int64_t M = lead_rows(x_in);
  TORCH_CHECK(M <= INT_MAX, kOp, "at most ", INT_MAX, " rows, got ", M);
  if (M == 0 || N == 0) return;
  if (K == 0) {  // an empty sum: y = 0 (the kernel needs k >= 1)
    out2.zero_();
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x_in.device().index()).stream();
  at::Tensor x = readable_rows(x_in.reshape({M, K}));
  if (act_quant) x = gemm_glue::act_quant(x, stream, kOp);
  GroupedGemmArgs a;
  set_weight(a, weight, scale, GemmWeightFormat::kFP8);
  a.n_experts = 1;
  a.rows = static_cast<int32_t>(N);
  a.k = static_cast<int32_t>(K);
  a.x = x.data_ptr();
  a.x_row_stride = row_stride(x);
  a.x_rows = M;
  a.pairs = M;
  a.epilogue = GemmEpilogue::kStore;
  a.out = out2.data_ptr();
  a.out_row_stride = row_stride(out2);
  run(a, stream, kOp);
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                  bool act_quant) {
  TORCH_CHECK(x.is_cuda(), kOp, "x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() >= 1, kOp,
              "x must be bfloat16 [..., in_features] (the fp32 reference runs on CPU), got ",
              x.scalar_type(), " ", x.sizes());
  check_device(weight, x, kOp, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat8_e4m3fn, kOp,
              "weight must be float8_e4m3fn [out_features, in_features], got ",
              weight.scalar_type(), " ", weight.sizes());
  const int64_t K = x.size(-1);
  weight_format(weight, scale, K, kOp, "weight");
  TORCH_CHECK(!act_quant || K % 128 == 0, kOp,
              "act_quant needs in_features divisible by 128, got ", K);
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = N;
  return s;
}

at::Tensor fp8_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                           bool act_quant) {
  check_inputs(x, weight, scale, act_quant);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = weight.size(0);
  at::Tensor y = at::empty(out_shape(x, N), x.options());
  run_fp8_linear(x, weight, scale, act_quant, y.view({lead_rows(x), N}));
  return y;
}

void fp8_linear_out_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                         bool act_quant, at::Tensor& out) {
  check_inputs(x, weight, scale, act_quant);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = weight.size(0);
  TORCH_CHECK(out.sizes() == at::IntArrayRef(out_shape(x, N)), kOp, "out must be ",
              at::IntArrayRef(out_shape(x, N)), ", got ", out.sizes());
  check_not_broadcast(out, kOp, "out");
  const int64_t M = lead_rows(x);
  TORCH_CHECK(out.is_contiguous() || out.dim() == 2, kOp,
              "out must be contiguous (or 2-D with a unit last stride), got strides ",
              out.strides());
  const at::Tensor out2 = out.dim() == 2 ? out : out.view({M, N});
  check_out_rows(out2, x, M, N, kOp, "out");
  run_fp8_linear(x, weight, scale, act_quant, out2);
}

}  // namespace
}  // namespace dsv4

TORCH_LIBRARY_FRAGMENT(dsv4, m) {
  // y = x . W^T with W the FP8 128x128 block-scaled weight (architecture.md §12.3).
  m.def("fp8_linear(Tensor x, Tensor weight, Tensor scale, bool act_quant) -> Tensor");
  m.def(
      "fp8_linear_out(Tensor x, Tensor weight, Tensor scale, bool act_quant, *, Tensor(a!) out) "
      "-> ()");
}

TORCH_LIBRARY_IMPL(dsv4, CUDA, m) {
  m.impl("fp8_linear", &dsv4::fp8_linear_cuda);
  m.impl("fp8_linear_out", &dsv4::fp8_linear_out_cuda);
}
