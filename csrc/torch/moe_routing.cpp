// torch.ops.dsv4.moe_gate / moe_dispatch / moe_combine (+ _out variants): schemas and CUDA
// implementations (argument checks, device guard, current stream, workspace from the caching
// allocator, and the calls into the torch-free kernels csrc/kernels/moe_{gate,dispatch,combine}.cu).
// Semantics: python/dsv4/ops/moe.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <optional>
#include <tuple>

#include "dsv4/moe_routing.h"
#include "glue_checks.h"
#include "scalar_checks.h"

namespace dsv4 {
namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* op) {
  TORCH_CHECK(t.device() == ref.device(), op, name, " must be on ", ref.device(), ", got ",
              t.device());
}

// ---------------------------------------------------------------------------------------------
// gate
// ---------------------------------------------------------------------------------------------
constexpr const char* kGate = "dsv4::moe_gate (CUDA): ";

void run_gate(const at::Tensor& x_in, const at::Tensor& weight_in,
              const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& tid2eid_in,
              const std::optional<at::Tensor>& ids_in, int64_t topk, double route_scale,
              const at::Tensor& weights, const at::Tensor& indices) {
  // any finite float32 (0 and negative factors are well defined)
  check_finite_f32(route_scale, kGate, "route_scale");
  TORCH_CHECK(x_in.is_cuda(), kGate, "x must be a CUDA tensor, got device ", x_in.device());
  TORCH_CHECK(x_in.dim() == 2, kGate, "x must be [tokens, dim], got ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16, kGate, "x must be bfloat16, got ",
              x_in.scalar_type());
  check_device(weight_in, "weight", x_in, kGate);
  const int64_t T = x_in.size(0), D = x_in.size(1);
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(1) == D, kGate, "weight must be [experts, ",
              D, "] ([experts, dim]), got ", weight_in.sizes());
  TORCH_CHECK(weight_in.scalar_type() == at::kBFloat16, kGate, "weight must be bfloat16, got ",
              weight_in.scalar_type());
  const int64_t E = weight_in.size(0);
  TORCH_CHECK(E >= 1 && E <= kMoeGateMaxExperts, kGate, "experts must be in [1, ",
              kMoeGateMaxExperts, "], got ", E);
  TORCH_CHECK(topk >= 1 && topk <= E && topk <= kMoeMaxTopk, kGate,
              "topk must be in [1, min(experts=", E, ", ", kMoeMaxTopk, ")], got ", topk);
  TORCH_CHECK(D >= 8 && D % 8 == 0, kGate, "dim must be a positive multiple of 8, got ", D);
  TORCH_CHECK(T <= INT_MAX / 2, kGate, "at most ", INT_MAX / 2, " tokens, got ", T);
  const bool hash = tid2eid_in.has_value();
  at::Tensor bias, tid2eid, ids;
  if (bias_in.has_value()) {
    TORCH_CHECK(!hash, kGate, "hash routing (tid2eid) takes no bias");
    check_device(*bias_in, "bias", x_in, kGate);
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == E &&
                    bias_in->scalar_type() == at::kFloat,
                kGate, "bias must be float32 [", E, "], got ", bias_in->scalar_type(), " ",
                bias_in->sizes());
    bias = bias_in->contiguous();
  }
  if (hash) {
    TORCH_CHECK(ids_in.has_value(), kGate, "hash routing (tid2eid) needs input_ids");
    check_device(*tid2eid_in, "tid2eid", x_in, kGate);
    check_device(*ids_in, "input_ids", x_in, kGate);
    const auto tt = tid2eid_in->scalar_type(), it = ids_in->scalar_type();
    TORCH_CHECK(tid2eid_in->dim() == 2 && tid2eid_in->size(1) == topk &&
                    (tt == at::kInt || tt == at::kLong),
                kGate, "tid2eid must be int32/int64 [vocab, ", topk, "], got ", tt, " ",
                tid2eid_in->sizes());
    TORCH_CHECK(ids_in->dim() == 1 && ids_in->size(0) == T && (it == at::kInt || it == at::kLong),
                kGate, "input_ids must be int32/int64 [", T, "], got ", it, " ", ids_in->sizes());
    tid2eid = tid2eid_in->contiguous();
    ids = ids_in->contiguous();
  }
  c10::cuda::CUDAGuard device_guard(x_in.device());
  if (T == 0) return;
  at::Tensor x = x_in;
  if (x.stride(1) != 1 || x.stride(0) % 8 != 0 || x.stride(0) < D || !aligned16(x.data_ptr())) {
    x = x.clone(at::MemoryFormat::Contiguous);  // clone: a misaligned view may be contiguous
  }
  at::Tensor weight = weight_in;
  if (!weight.is_contiguous() || !aligned16(weight.data_ptr())) {
    weight = weight.clone(at::MemoryFormat::Contiguous);
  }
  const int device = x.device().index();
  const size_t ws_bytes = moe_gate_workspace_bytes(T, E, D, device);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  C10_CUDA_CHECK(moe_gate(x.data_ptr(), x.stride(0), weight.data_ptr(),
                          bias.defined() ? bias.data_ptr<float>() : nullptr,
                          hash ? tid2eid.data_ptr() : nullptr,
                          hash && tid2eid.scalar_type() == at::kLong, hash ? tid2eid.size(0) : 0,
                          hash ? ids.data_ptr() : nullptr, hash && ids.scalar_type() == at::kLong,
                          weights.data_ptr<float>(), indices.data_ptr<int32_t>(), T, E, D, topk,
                          static_cast<float>(route_scale), ws.data_ptr(), ws_bytes, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> moe_gate_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias,
                                                 const std::optional<at::Tensor>& tid2eid,
                                                 const std::optional<at::Tensor>& input_ids,
                                                 int64_t topk, double route_scale) {
  TORCH_CHECK(x.dim() == 2, kGate, "x must be [tokens, dim], got ", x.sizes());
  TORCH_CHECK(topk >= 1 && topk <= kMoeMaxTopk, kGate, "topk must be in [1, ", kMoeMaxTopk,
              "], got ", topk);
  c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor weights = at::empty({x.size(0), topk}, x.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({x.size(0), topk}, x.options().dtype(at::kInt));
  run_gate(x, weight, bias, tid2eid, input_ids, topk, route_scale, weights, indices);
  return {weights, indices};
}

void moe_gate_out_cuda(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& tid2eid,
                       const std::optional<at::Tensor>& input_ids, int64_t topk,
                       double route_scale, at::Tensor& weights, at::Tensor& indices) {
  TORCH_CHECK(x.dim() == 2, kGate, "x must be [tokens, dim], got ", x.sizes());
  check_device(weights, "weights", x, kGate);
  check_device(indices, "indices", x, kGate);
  check_not_broadcast(weights, kGate, "weights");
  check_not_broadcast(indices, kGate, "indices");
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.dim() == 2 &&
                  weights.size(0) == x.size(0) && weights.size(1) == topk &&
                  weights.is_contiguous(),
              kGate, "weights must be a contiguous float32 [", x.size(0), ", ", topk, "], got ",
              weights.scalar_type(), " ", weights.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kInt && indices.dim() == 2 &&
                  indices.size(0) == x.size(0) && indices.size(1) == topk &&
                  indices.is_contiguous(),
              kGate, "indices must be a contiguous int32 [", x.size(0), ", ", topk, "], got ",
              indices.scalar_type(), " ", indices.sizes());
  run_gate(x, weight, bias, tid2eid, input_ids, topk, route_scale, weights, indices);
}

// ---------------------------------------------------------------------------------------------
// dispatch
// ---------------------------------------------------------------------------------------------
constexpr const char* kDispatch = "dsv4::moe_dispatch (CUDA): ";

void check_dispatch_inputs(const at::Tensor& indices, const at::Tensor& weights,
                           int64_t n_experts) {
  TORCH_CHECK(indices.is_cuda(), kDispatch, "indices must be a CUDA tensor, got device ",
              indices.device());
  check_device(weights, "weights", indices, kDispatch);
  TORCH_CHECK(indices.dim() == 2 && indices.size(1) >= 1 && indices.scalar_type() == at::kInt,
              kDispatch, "indices must be int32 [tokens, topk], got ", indices.scalar_type(), " ",
              indices.sizes());
  TORCH_CHECK(weights.sizes() == indices.sizes() && weights.scalar_type() == at::kFloat,
              kDispatch, "weights must be float32 ", indices.sizes(), " (as indices), got ",
              weights.scalar_type(), " ", weights.sizes());
  TORCH_CHECK(n_experts >= 1 && n_experts <= kMoeDispatchMaxExperts, kDispatch,
              "n_experts must be in [1, ", kMoeDispatchMaxExperts, "], got ", n_experts);
  TORCH_CHECK(indices.numel() < INT_MAX, kDispatch, "at most ", INT_MAX - 1, " pairs, got ",
              indices.numel());
}

void run_dispatch(const at::Tensor& indices_in, const at::Tensor& weights_in, int64_t n_experts,
                  const at::Tensor& row_ids, const at::Tensor& offsets,
                  const at::Tensor& route_weight, const at::Tensor& pair_pos) {
  c10::cuda::CUDAGuard device_guard(indices_in.device());
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  const int64_t P = indices.numel();
  const size_t ws_bytes = moe_dispatch_workspace_bytes(P, n_experts);
  at::Tensor ws;
  if (ws_bytes > 0) {
    ws = at::empty({static_cast<int64_t>(ws_bytes)}, indices.options().dtype(at::kByte));
  }
  const cudaStream_t stream =
      c10::cuda::getCurrentCUDAStream(indices.device().index()).stream();
  C10_CUDA_CHECK(moe_dispatch(indices.data_ptr<int32_t>(), weights.data_ptr<float>(),
                              row_ids.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(),
                              route_weight.data_ptr<float>(), pair_pos.data_ptr<int32_t>(), P,
                              indices.size(1), n_experts, ws_bytes > 0 ? ws.data_ptr() : nullptr,
                              ws_bytes, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_dispatch_cuda(
    const at::Tensor& indices, const at::Tensor& weights, int64_t n_experts) {
  check_dispatch_inputs(indices, weights, n_experts);
  c10::cuda::CUDAGuard device_guard(indices.device());
  const int64_t P = indices.numel();
  const auto i32 = indices.options().dtype(at::kInt);
  at::Tensor row_ids = at::empty({P}, i32);
  at::Tensor offsets = at::empty({n_experts + 1}, i32);
  at::Tensor route_weight = at::empty({P}, indices.options().dtype(at::kFloat));
  at::Tensor pair_pos = at::empty(indices.sizes(), i32);
  run_dispatch(indices, weights, n_experts, row_ids, offsets, route_weight, pair_pos);
  return {row_ids, offsets, route_weight, pair_pos};
}

void check_out(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype,
               const at::Tensor& ref, const char* op) {
  check_device(t, name, ref, op);
  check_not_broadcast(t, op, name);
  TORCH_CHECK(t.sizes() == shape && t.scalar_type() == dtype && t.is_contiguous(), op, name,
              " must be a contiguous ", dtype, " ", shape, ", got ", t.scalar_type(), " ",
              t.sizes());
}

void moe_dispatch_out_cuda(const at::Tensor& indices, const at::Tensor& weights,
                           int64_t n_experts, at::Tensor& row_ids, at::Tensor& expert_offsets,
                           at::Tensor& route_weight, at::Tensor& pair_pos) {
  check_dispatch_inputs(indices, weights, n_experts);
  const int64_t P = indices.numel();
  check_out(row_ids, "row_ids", {P}, at::kInt, indices, kDispatch);
  check_out(expert_offsets, "expert_offsets", {n_experts + 1}, at::kInt, indices, kDispatch);
  check_out(route_weight, "route_weight", {P}, at::kFloat, indices, kDispatch);
  check_out(pair_pos, "pair_pos", indices.sizes(), at::kInt, indices, kDispatch);
  run_dispatch(indices, weights, n_experts, row_ids, expert_offsets, route_weight, pair_pos);
}

// ---------------------------------------------------------------------------------------------
// combine
// ---------------------------------------------------------------------------------------------
constexpr const char* kCombine = "dsv4::moe_combine (CUDA): ";

void check_combine_inputs(const at::Tensor& y_pair, const at::Tensor& pair_pos,
                          const std::optional<at::Tensor>& shared) {
  TORCH_CHECK(y_pair.is_cuda(), kCombine, "y_pair must be a CUDA tensor, got device ",
              y_pair.device());
  check_device(pair_pos, "pair_pos", y_pair, kCombine);
  TORCH_CHECK(y_pair.dim() == 2 && y_pair.scalar_type() == at::kBFloat16, kCombine,
              "y_pair must be bfloat16 [pairs, dim], got ", y_pair.scalar_type(), " ",
              y_pair.sizes());
  TORCH_CHECK(pair_pos.dim() == 2 && pair_pos.scalar_type() == at::kInt, kCombine,
              "pair_pos must be int32 [tokens, topk], got ", pair_pos.scalar_type(), " ",
              pair_pos.sizes());
  TORCH_CHECK(pair_pos.size(1) >= 1 && pair_pos.size(1) <= kMoeMaxTopk, kCombine,
              "topk must be in [1, ", kMoeMaxTopk, "], got ", pair_pos.size(1));
  TORCH_CHECK(pair_pos.size(0) <= INT_MAX, kCombine, "at most ", INT_MAX, " tokens");
  if (shared.has_value()) {
    check_device(*shared, "shared", y_pair, kCombine);
    TORCH_CHECK(shared->dim() == 2 && shared->size(0) == pair_pos.size(0) &&
                    shared->size(1) == y_pair.size(1) &&
                    shared->scalar_type() == at::kBFloat16,
                kCombine, "shared must be bfloat16 [", pair_pos.size(0), ", ", y_pair.size(1),
                "] ([tokens, dim]), got ", shared->scalar_type(), " ", shared->sizes());
  }
}

void run_combine(const at::Tensor& y_pair_in, const at::Tensor& pair_pos_in,
                 const std::optional<at::Tensor>& shared_in, const at::Tensor& y) {
  c10::cuda::CUDAGuard device_guard(y_pair_in.device());
  const int64_t T = pair_pos_in.size(0), D = y_pair_in.size(1);
  if (T == 0 || D == 0) return;
  const at::Tensor y_pair = y_pair_in.stride(1) == 1 ? y_pair_in : y_pair_in.contiguous();
  const at::Tensor pair_pos = pair_pos_in.contiguous();
  at::Tensor shared;
  if (shared_in.has_value()) {
    shared = shared_in->stride(1) == 1 ? *shared_in : shared_in->contiguous();
  }
  const cudaStream_t stream =
      c10::cuda::getCurrentCUDAStream(y_pair.device().index()).stream();
  C10_CUDA_CHECK(moe_combine(y_pair.numel() ? y_pair.data_ptr() : nullptr, y_pair.stride(0),
                             y_pair.size(0), pair_pos.data_ptr<int32_t>(),
                             shared.defined() ? shared.data_ptr() : nullptr,
                             shared.defined() ? shared.stride(0) : 0, y.data_ptr(), y.stride(0),
                             T, pair_pos.size(1), D, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor moe_combine_cuda(const at::Tensor& y_pair, const at::Tensor& pair_pos,
                            const std::optional<at::Tensor>& shared) {
  check_combine_inputs(y_pair, pair_pos, shared);
  c10::cuda::CUDAGuard device_guard(y_pair.device());
  at::Tensor y = at::empty({pair_pos.size(0), y_pair.size(1)}, y_pair.options());
  run_combine(y_pair, pair_pos, shared, y);
  return y;
}

void moe_combine_out_cuda(const at::Tensor& y_pair, const at::Tensor& pair_pos,
                          const std::optional<at::Tensor>& shared, at::Tensor& y) {
  check_combine_inputs(y_pair, pair_pos, shared);
  check_device(y, "y", y_pair, kCombine);
  check_not_broadcast(y, kCombine, "y");
  TORCH_CHECK(y.dim() == 2 && y.size(0) == pair_pos.size(0) && y.size(1) == y_pair.size(1) &&
                  y.scalar_type() == at::kBFloat16 && (y.stride(1) == 1 || y.size(1) <= 1),
              kCombine, "y must be bfloat16 [", pair_pos.size(0), ", ", y_pair.size(1),
              "] with a unit last stride, got ", y.scalar_type(), " ", y.sizes(), " strides ",
              y.strides());
  run_combine(y_pair, pair_pos, shared, y);
}

}  // namespace
}  // namespace dsv4

TORCH_LIBRARY_FRAGMENT(dsv4, m) {
  // MoE router (architecture.md §9): (weights fp32 [T, topk], indices int32 [T, topk]).
  m.def(
      "moe_gate(Tensor x, Tensor weight, Tensor? bias, Tensor? tid2eid, Tensor? input_ids, "
      "int topk, float route_scale) -> (Tensor, Tensor)");
  m.def(
      "moe_gate_out(Tensor x, Tensor weight, Tensor? bias, Tensor? tid2eid, Tensor? input_ids, "
      "int topk, float route_scale, *, Tensor(a!) weights, Tensor(b!) indices) -> ()");
  // Expert-major stable order of the (token, slot) pairs (contracts.md §B).
  m.def(
      "moe_dispatch(Tensor indices, Tensor weights, int n_experts) -> (Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def(
      "moe_dispatch_out(Tensor indices, Tensor weights, int n_experts, *, Tensor(a!) row_ids, "
      "Tensor(b!) expert_offsets, Tensor(c!) route_weight, Tensor(d!) pair_pos) -> ()");
  // y[t] = sum of the token's expert outputs (ascending position) + shared[t].
  m.def("moe_combine(Tensor y_pair, Tensor pair_pos, Tensor? shared) -> Tensor");
  m.def("moe_combine_out(Tensor y_pair, Tensor pair_pos, Tensor? shared, *, Tensor(a!) y) -> ()");
}

TORCH_LIBRARY_IMPL(dsv4, CUDA, m) {
  m.impl("moe_gate", &dsv4::moe_gate_cuda);
  m.impl("moe_gate_out", &dsv4::moe_gate_out_cuda);
  m.impl("moe_dispatch", &dsv4::moe_dispatch_cuda);
  m.impl("moe_dispatch_out", &dsv4::moe_dispatch_out_cuda);
  m.impl("moe_combine", &dsv4::moe_combine_cuda);
  m.impl("moe_combine_out", &dsv4::moe_combine_out_cuda);
}
