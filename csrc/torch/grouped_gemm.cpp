// torch.ops.dsv4.moe_up / moe_up_out / moe_down / moe_down_out: schemas and CUDA implementation
// (argument checks, device guard, current stream). Semantics: python/dsv4/ops/grouped_gemm.py
// (contracts.md §B, architecture.md §9).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <optional>
#include <tuple>

#include "dsv4/grouped_gemm.h"
#include "gemm_utils.h"
#include "glue_checks.h"
#include "scalar_checks.h"

namespace dsv4 {
namespace {

using namespace gemm_glue;

constexpr const char* kUp = "dsv4::moe_up (CUDA): ";
constexpr const char* kDown = "dsv4::moe_down (CUDA): ";

void check_routing(const at::Tensor& offsets, const at::Tensor& ref, int64_t E, const char* op) {
  check_device(offsets, ref, op, "expert_offsets");
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.dim() == 1 && offsets.size(0) == E + 1,
              op, "expert_offsets must be int32 [E + 1] = [", E + 1, "], got ",
              offsets.scalar_type(), " ", offsets.sizes());
  TORCH_CHECK(E >= 1 && E <= 1024, op, "the CUDA kernel takes 1 .. 1024 experts, got ", E);
}

// h [P, N] = SwiGLU(x[row_ids] . w_up^T) * route_weight; rows past offsets[E] untouched.
void run_up(const at::Tensor& x_in, const at::Tensor& row_ids_in, const at::Tensor& offsets_in,
            const at::Tensor& w_up, const std::optional<at::Tensor>& w_up_scale,
            const at::Tensor& route_weight_in, double swiglu_limit, bool act_quant,
            const at::Tensor& h) {
  TORCH_CHECK(x_in.is_cuda(), kUp, "x must be a CUDA tensor, got ", x_in.device());
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && x_in.dim() == 2, kUp,
              "x must be bfloat16 [tokens, dim] (the fp32 reference runs on CPU), got ",
              x_in.scalar_type(), " ", x_in.sizes());
  TORCH_CHECK(w_up.dim() == 4 && w_up.size(1) == 2, kUp,
              "w_up must be [E, 2, N, K] (FP4: [E, 2, N, K/2]), got ", w_up.sizes());
  check_device(w_up, x_in, kUp, "w_up");
  const int64_t T = x_in.size(0), K = x_in.size(1), E = w_up.size(0), N = w_up.size(2);
  const GemmWeightFormat fmt = weight_format(w_up, w_up_scale, K, kUp, "w_up");
  check_device(row_ids_in, x_in, kUp, "row_ids");
  TORCH_CHECK(row_ids_in.scalar_type() == at::kInt && row_ids_in.dim() == 1, kUp,
              "row_ids must be int32 [P], got ", row_ids_in.scalar_type(), " ",
              row_ids_in.sizes());
  const int64_t P = row_ids_in.size(0);
  TORCH_CHECK(P <= INT_MAX, kUp, "at most ", INT_MAX, " pairs, got ", P);
  check_device(route_weight_in, x_in, kUp, "route_weight");
  TORCH_CHECK(route_weight_in.scalar_type() == at::kFloat && route_weight_in.dim() == 1 &&
                  route_weight_in.size(0) == P,
              kUp, "route_weight must be float32 [P] = [", P, "], got ",
              route_weight_in.scalar_type(), " ", route_weight_in.sizes());
  check_routing(offsets_in, x_in, E, kUp);
  check_clamp_limit_f32(swiglu_limit, kUp, "swiglu_limit");
  check_not_broadcast(h, kUp, "h");
  check_out_rows(h, x_in, P, N, kUp, "h");
  TORCH_CHECK(!act_quant || K % 128 == 0, kUp, "act_quant needs dim divisible by 128, got ", K);
  if (P == 0 || T == 0) {
    TORCH_CHECK(T > 0 || P == 0, kUp, "pairs need tokens: x has 0 rows but P = ", P);
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x_in.device().index()).stream();
  at::Tensor x = readable_rows(x_in);
  GroupedGemmArgs a;
  set_weight(a, w_up, w_up_scale, fmt);
  at::Tensor x_scale;  // FP8 x FP8 path: the tokens quantised once, before the gather
  if (use_fp8_mma(act_quant, fmt, a)) {
    std::tie(x, x_scale) = fp8_quant(x, stream, kUp);
    a.x_scale = x_scale.data_ptr<float>();
    a.x_scale_row_stride = row_stride(x_scale);
  } else if (act_quant) {
    x = gemm_glue::act_quant(x, stream, kUp);
  }
  const at::Tensor row_ids = row_ids_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const at::Tensor rw = route_weight_in.contiguous();

  a.n_experts = static_cast<int32_t>(E);
  a.rows = static_cast<int32_t>(N);
  a.k = static_cast<int32_t>(K);
  a.x = x.data_ptr();
  a.x_row_stride = row_stride(x);
  a.x_rows = T;
  a.row_ids = row_ids.data_ptr<int32_t>();
  a.expert_offsets = offsets.data_ptr<int32_t>();
  a.pairs = P;
  a.epilogue = GemmEpilogue::kSwiGLU;
  a.route_weight = rw.data_ptr<float>();
  a.swiglu_limit = static_cast<float>(swiglu_limit);
  a.out = h.data_ptr();
  a.out_row_stride = row_stride(h);
  run(a, stream, kUp);
}

// y [P, D] = h . w_down^T per expert; rows past offsets[E] untouched.
void run_down(const at::Tensor& h_in, const at::Tensor& offsets_in, const at::Tensor& w_down,
              const std::optional<at::Tensor>& w_down_scale, bool act_quant, const at::Tensor& y) {
  TORCH_CHECK(h_in.is_cuda(), kDown, "h must be a CUDA tensor, got ", h_in.device());
  TORCH_CHECK(h_in.scalar_type() == at::kBFloat16 && h_in.dim() == 2, kDown,
              "h must be bfloat16 [P, moe_inter_dim] (the fp32 reference runs on CPU), got ",
              h_in.scalar_type(), " ", h_in.sizes());
  TORCH_CHECK(w_down.dim() == 3, kDown, "w_down must be [E, dim, N] (FP4: [E, dim, N/2]), got ",
              w_down.sizes());
  check_device(w_down, h_in, kDown, "w_down");
  const int64_t P = h_in.size(0), N = h_in.size(1), E = w_down.size(0), D = w_down.size(1);
  const GemmWeightFormat fmt = weight_format(w_down, w_down_scale, N, kDown, "w_down");
  TORCH_CHECK(P <= INT_MAX, kDown, "at most ", INT_MAX, " pairs, got ", P);
  check_routing(offsets_in, h_in, E, kDown);
  check_not_broadcast(y, kDown, "y");
  check_out_rows(y, h_in, P, D, kDown, "y");
  TORCH_CHECK(!act_quant || N % 128 == 0, kDown,
              "act_quant needs moe_inter_dim divisible by 128, got ", N);
  if (P == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(h_in.device().index()).stream();
  at::Tensor h = readable_rows(h_in);
  GroupedGemmArgs a;
  set_weight(a, w_down, w_down_scale, fmt);
  at::Tensor h_scale;  // FP8 x FP8 path
  if (use_fp8_mma(act_quant, fmt, a)) {
    std::tie(h, h_scale) = fp8_quant(h, stream, kDown);
    a.x_scale = h_scale.data_ptr<float>();
    a.x_scale_row_stride = row_stride(h_scale);
  } else if (act_quant) {
    h = gemm_glue::act_quant(h, stream, kDown);
  }
  const at::Tensor offsets = offsets_in.contiguous();

  a.n_experts = static_cast<int32_t>(E);
  a.rows = static_cast<int32_t>(D);
  a.k = static_cast<int32_t>(N);
  a.x = h.data_ptr();
  a.x_row_stride = row_stride(h);
  a.x_rows = P;
  a.expert_offsets = offsets.data_ptr<int32_t>();
  a.pairs = P;
  a.epilogue = GemmEpilogue::kStore;
  a.out = y.data_ptr();
  a.out_row_stride = row_stride(y);
  run(a, stream, kDown);
}

void zero_tail(const at::Tensor& out, const at::Tensor& offsets, const char* op) {
  if (out.size(0) == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.device().index()).stream();
  const at::Tensor offs = offsets.contiguous();
  const cudaError_t err = zero_rows_past_offsets(out.data_ptr(), row_stride(out), out.size(0),
                                                 out.size(1), offs.data_ptr<int32_t>(),
                                                 static_cast<int32_t>(offs.size(0) - 1), stream);
  TORCH_CHECK(err == cudaSuccess, op, "zeroing the rows past expert_offsets[E] failed: ",
              cudaGetErrorString(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor moe_up_cuda(const at::Tensor& x, const at::Tensor& row_ids,
                       const at::Tensor& expert_offsets, const at::Tensor& w_up,
                       const std::optional<at::Tensor>& w_up_scale, const at::Tensor& route_weight,
                       double swiglu_limit, bool act_quant) {
  TORCH_CHECK(x.is_cuda() && row_ids.dim() == 1 && w_up.dim() == 4, kUp,
              "x must be a CUDA tensor, row_ids [P] and w_up [E, 2, N, K]; got ", x.device(),
              ", ", row_ids.sizes(), ", ", w_up.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor h = at::empty({row_ids.size(0), w_up.size(2)}, x.options());
  run_up(x, row_ids, expert_offsets, w_up, w_up_scale, route_weight, swiglu_limit, act_quant, h);
  zero_tail(h, expert_offsets, kUp);
  return h;
}

void moe_up_out_cuda(const at::Tensor& x, const at::Tensor& row_ids,
                     const at::Tensor& expert_offsets, const at::Tensor& w_up,
                     const std::optional<at::Tensor>& w_up_scale, const at::Tensor& route_weight,
                     double swiglu_limit, bool act_quant, at::Tensor& h) {
  TORCH_CHECK(x.is_cuda(), kUp, "x must be a CUDA tensor, got ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  run_up(x, row_ids, expert_offsets, w_up, w_up_scale, route_weight, swiglu_limit, act_quant, h);
}

at::Tensor moe_down_cuda(const at::Tensor& h, const at::Tensor& expert_offsets,
                         const at::Tensor& w_down, const std::optional<at::Tensor>& w_down_scale,
                         bool act_quant) {
  TORCH_CHECK(h.is_cuda() && h.dim() == 2 && w_down.dim() == 3, kDown,
              "h must be a CUDA tensor [P, N] and w_down [E, dim, N]; got ", h.device(), ", ",
              h.sizes(), ", ", w_down.sizes());
  c10::cuda::CUDAGuard guard(h.device());
  at::Tensor y = at::empty({h.size(0), w_down.size(1)}, h.options());
  run_down(h, expert_offsets, w_down, w_down_scale, act_quant, y);
  zero_tail(y, expert_offsets, kDown);
  return y;
}

void moe_down_out_cuda(const at::Tensor& h, const at::Tensor& expert_offsets,
                       const at::Tensor& w_down, const std::optional<at::Tensor>& w_down_scale,
                       bool act_quant, at::Tensor& y) {
  TORCH_CHECK(h.is_cuda(), kDown, "h must be a CUDA tensor, got ", h.device());
  c10::cuda::CUDAGuard guard(h.device());
  run_down(h, expert_offsets, w_down, w_down_scale, act_quant, y);
}

// (codes, scales) = fp8_e4m3_quantize(x, 128): the quantiser of the FP8 x FP8 path.
std::tuple<at::Tensor, at::Tensor> fp8_act_quant_cuda(const at::Tensor& x_in) {
  constexpr const char* kQ = "dsv4::fp8_act_quant (CUDA): ";
  TORCH_CHECK(x_in.is_cuda(), kQ, "x must be a CUDA tensor, got ", x_in.device());
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && x_in.dim() == 2, kQ,
              "x must be bfloat16 [rows, cols], got ", x_in.scalar_type(), " ", x_in.sizes());
  TORCH_CHECK(x_in.size(1) % 128 == 0, kQ, "cols must be a multiple of 128, got ", x_in.size(1));
  c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x_in.device().index()).stream();
  if (x_in.size(0) == 0) {
    return {at::empty(x_in.sizes(), x_in.options().dtype(at::kFloat8_e4m3fn)),
            at::empty({0, x_in.size(1) / 128}, x_in.options().dtype(at::kFloat))};
  }
  auto [q, s] = fp8_quant(readable_rows(x_in), stream, kQ);
  return {q, s};
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
  // FP8 activation quantisation of the FP8 x FP8 expert path (= ops.quant.fp8_e4m3_quantize
  // with block 128): codes float8_e4m3fn [rows, cols], scales float32 [rows, cols / 128].
  m.def("fp8_act_quant(Tensor x) -> (Tensor, Tensor)");
  m.def(
      "moe_down_out(Tensor h, Tensor expert_offsets, Tensor w_down, Tensor? w_down_scale, "
      "bool act_quant, *, Tensor(a!) y) -> ()");
}

TORCH_LIBRARY_IMPL(dsv4, CUDA, m) {
  m.impl("moe_up", &dsv4::moe_up_cuda);
  m.impl("moe_up_out", &dsv4::moe_up_out_cuda);
  m.impl("moe_down", &dsv4::moe_down_cuda);
  m.impl("moe_down_out", &dsv4::moe_down_out_cuda);
  m.impl("fp8_act_quant", &dsv4::fp8_act_quant_cuda);
}
