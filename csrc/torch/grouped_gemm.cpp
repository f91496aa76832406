// torch.ops.dsv4.moe_up / moe_up_out / moe_down / moe_down_out: schemas and CUDA implementation
// (argument checks, device guard, current stream). Semantics: python/dsv4/ops/grouped_gemm.py
// (contracts.md §B, architecture.md §9).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

namespace dsv4 {
namespace {

constexpr const char* kNotYet =
    " (CUDA): not implemented on CUDA yet; the grouped expert GEMM kernel lands in a later "
    "commit of the gemm-kernels branch. Call the op on CPU tensors (the reference) meanwhile.";

at::Tensor moe_up_cuda(const at::Tensor& x, const at::Tensor& row_ids,
                       const at::Tensor& expert_offsets, const at::Tensor& w_up,
                       const std::optional<at::Tensor>& w_up_scale, const at::Tensor& route_weight,
                       double swiglu_limit, bool act_quant) {
  TORCH_CHECK(false, "dsv4::moe_up", kNotYet);
}

void moe_up_out_cuda(const at::Tensor& x, const at::Tensor& row_ids,
                     const at::Tensor& expert_offsets, const at::Tensor& w_up,
                     const std::optional<at::Tensor>& w_up_scale, const at::Tensor& route_weight,
                     double swiglu_limit, bool act_quant, at::Tensor& h) {
  TORCH_CHECK(false, "dsv4::moe_up_out", kNotYet);
}

at::Tensor moe_down_cuda(const at::Tensor& h, const at::Tensor& expert_offsets,
                         const at::Tensor& w_down, const std::optional<at::Tensor>& w_down_scale,
                         bool act_quant) {
  TORCH_CHECK(false, "dsv4::moe_down", kNotYet);
}

void moe_down_out_cuda(const at::Tensor& h, const at::Tensor& expert_offsets,
                       const at::Tensor& w_down, const std::optional<at::Tensor>& w_down_scale,
                       bool act_quant, at::Tensor& y) {
  TORCH_CHECK(false, "dsv4::moe_down_out", kNotYet);
}

}  // namespace
}  // namespace dsv4

TORCH_LIBRARY_FRAGMENT(dsv4, m) {
  // Routed-expert GEMMs (contracts.md §B): h[p] = route_weight[p] * silu(min(g, L)) *
  // clamp(u, -L, L) with g/u = x[row_ids[p]] . w_up[e, 0/1]^T; y[p] = h[p] . w_down[e]^T.
  m.def(
      "moe_up(Tensor x, Tensor row_ids, Tensor expert_offsets, Tensor w_up, Tensor? w_up_scale, "
      "Tensor route_weight, float swiglu_limit, bool act_quant) -> Tensor");
  m.def(
      "moe_up_out(Tensor x, Tensor row_ids, Tensor expert_offsets, Tensor w_up, "
      "Tensor? w_up_scale, Tensor route_weight, float swiglu_limit, bool act_quant, *, "
      "Tensor(a!) h) -> ()");
  m.def(
      "moe_down(Tensor h, Tensor expert_offsets, Tensor w_down, Tensor? w_down_scale, "
      "bool act_quant) -> Tensor");
  m.def(
      "moe_down_out(Tensor h, Tensor expert_offsets, Tensor w_down, Tensor? w_down_scale, "
      "bool act_quant, *, Tensor(a!) y) -> ()");
}

TORCH_LIBRARY_IMPL(dsv4, CUDA, m) {
  m.impl("moe_up", &dsv4::moe_up_cuda);
  m.impl("moe_up_out", &dsv4::moe_up_out_cuda);
  m.impl("moe_down", &dsv4::moe_down_cuda);
  m.impl("moe_down_out", &dsv4::moe_down_out_cuda);
}
