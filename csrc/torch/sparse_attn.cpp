// torch.ops.dsv4.sparse_attn / sparse_attn_out: schemas and CUDA implementation (argument checks,
// device guard, current stream, split workspace, and the call into the torch-free kernel
// csrc/kernels/sparse_attn.cu). Semantics: include/dsv4/sparse_attn.h, architecture.md §3.6.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdlib>
#include <optional>
#include <tuple>

#include "dsv4/sparse_attn.h"
#include "dsv4/sparse_attn_prefill.h"

namespace dsv4 {
namespace {

constexpr const char* kOp = "dsv4::sparse_attn (CUDA): ";

bool rows_aligned(const at::Tensor& t) {
  // bf16 rows read/written 16 bytes at a time: unit last stride, other strides multiples of 8
  // elements, 16-byte aligned data pointer.
  if (t.stride(-1) != 1 && t.size(-1) > 1) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.stride(d) % 8 != 0 && t.size(d) > 1) return false;
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// The tensor itself when the kernel can read it in place, else an aligned contiguous copy.
at::Tensor readable_rows(const at::Tensor& t) {
  return rows_aligned(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

void check_device(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.device() == q.device(), kOp, name, " must be on q's device (", q.device(),
              "), got ", t.device());
}

void check_lengths(const std::optional<at::Tensor>& len, const at::Tensor& q, int64_t T,
                   const char* name) {
  if (!len.has_value()) return;
  check_device(*len, q, name);
  TORCH_CHECK(len->scalar_type() == at::kInt, kOp, name, " must be int32, got ",
              len->scalar_type());
  TORCH_CHECK(len->dim() == 1 && len->size(0) == T, kOp, name, " must have shape [", T,
              "] (q.size(0)), got ", len->sizes());
}

void check_indices(const at::Tensor& idx, const at::Tensor& q, int64_t T, const char* name) {
  check_device(idx, q, name);
  TORCH_CHECK(idx.scalar_type() == at::kInt, kOp, name,
              " must be int32 (rows of the key array, -1 = unused), got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == T, kOp, name, " must have shape [", T,
              ", k] (q.size(0) tokens), got ", idx.sizes());
  TORCH_CHECK(idx.size(1) <= INT_MAX - 64, kOp, name, " has too many lanes (", idx.size(1), ")");
}

void check_kv(const at::Tensor& kv, const at::Tensor& q, int64_t D, const char* name) {
  check_device(kv, q, name);
  TORCH_CHECK(kv.scalar_type() == at::kBFloat16, kOp, name,
              " must be bfloat16 (the CUDA kernel reads bf16 keys; call the reference "
              "dsv4.ops.attention.sparse_attn_reference for float32), got ",
              kv.scalar_type());
  TORCH_CHECK(kv.dim() == 2 && kv.size(1) == D, kOp, name, " must have shape [n, ", D,
              "] (head_dim of q), got ", kv.sizes());
}

// Checks every input; returns the kernel-ready (possibly copied) tensors through the arguments.
void run(const at::Tensor& q_in, const at::Tensor& kv_in, const at::Tensor& indices_in,
         const at::Tensor& attn_sink_in, double softmax_scale,
         const std::optional<at::Tensor>& topk_length,
         const std::optional<at::Tensor>& extra_kv,
         const std::optional<at::Tensor>& extra_indices,
         const std::optional<at::Tensor>& extra_topk_length, const at::Tensor& out,
         const at::Tensor& lse) {
  TORCH_CHECK(q_in.is_cuda(), kOp, "q must be a CUDA tensor, got device ", q_in.device());
  TORCH_CHECK(q_in.scalar_type() == at::kBFloat16, kOp,
              "q must be bfloat16 (use dsv4.ops.attention.sparse_attn_reference for float32), "
              "got ",
              q_in.scalar_type());
  TORCH_CHECK(q_in.dim() == 3, kOp, "q must be [tokens, heads, head_dim], got ", q_in.sizes());
  const int64_t T = q_in.size(0), H = q_in.size(1), D = q_in.size(2);
  TORCH_CHECK(sparse_attn_supports_head_dim(D), kOp,
              "head_dim must be 64, 128, 256 or 512, got ", D);
  TORCH_CHECK(H >= 1 && H <= INT_MAX, kOp, "q must have at least one head, got ", H);
  check_kv(kv_in, q_in, D, "kv");
  check_indices(indices_in, q_in, T, "indices");
  check_lengths(topk_length, q_in, T, "topk_length");
  TORCH_CHECK(extra_kv.has_value() == extra_indices.has_value(), kOp,
              "extra_kv and extra_indices must be given together");
  TORCH_CHECK(!extra_topk_length.has_value() || extra_indices.has_value(), kOp,
              "extra_topk_length needs extra_kv and extra_indices");
  if (extra_kv.has_value()) {
    check_kv(*extra_kv, q_in, D, "extra_kv");
    check_indices(*extra_indices, q_in, T, "extra_indices");
  }
  check_lengths(extra_topk_length, q_in, T, "extra_topk_length");
  check_device(attn_sink_in, q_in, "attn_sink");
  TORCH_CHECK(attn_sink_in.scalar_type() == at::kFloat, kOp, "attn_sink must be float32, got ",
              attn_sink_in.scalar_type());
  TORCH_CHECK(attn_sink_in.dim() == 1 && attn_sink_in.size(0) == H, kOp,
              "attn_sink must have shape [", H, "] (q.size(1) heads), got ", attn_sink_in.sizes());
  check_device(out, q_in, "out");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16, kOp, "out must be bfloat16, got ",
              out.scalar_type());
  TORCH_CHECK(out.dim() == 3 && out.size(0) == T && out.size(1) == H && out.size(2) == D, kOp,
              "out must have shape [", T, ", ", H, ", ", D, "], got ", out.sizes());
  TORCH_CHECK(T == 0 || rows_aligned(out), kOp,
              "out must have a unit last stride, other strides multiples of 8 and a 16-byte "
              "aligned data pointer (e.g. a contiguous tensor); got strides ",
              out.strides());
  check_device(lse, q_in, "lse");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, kOp, "lse must be float32, got ",
              lse.scalar_type());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == T && lse.size(1) == H, kOp,
              "lse must have shape [", T, ", ", H, "], got ", lse.sizes());

  c10::cuda::CUDAGuard device_guard(q_in.device());
  if (T == 0) return;

  const at::Tensor q = readable_rows(q_in);
  const at::Tensor kv = kv_in.size(0) > 0 ? readable_rows(kv_in) : kv_in;
  const at::Tensor indices = indices_in.stride(1) == 1 ? indices_in : indices_in.contiguous();
  const at::Tensor attn_sink = attn_sink_in.contiguous();
  const std::optional<at::Tensor> len1 =
      topk_length ? std::optional<at::Tensor>(topk_length->contiguous()) : std::nullopt;
  std::optional<at::Tensor> kv2, idx2, len2;
  if (extra_kv) {
    kv2 = extra_kv->size(0) > 0 ? readable_rows(*extra_kv) : *extra_kv;
    idx2 = extra_indices->stride(1) == 1 ? *extra_indices : extra_indices->contiguous();
    if (extra_topk_length) len2 = extra_topk_length->contiguous();
  }

  SparseAttnParams p;
  p.q = q.data_ptr();
  p.q_stride_token = q.stride(0);
  p.q_stride_head = q.stride(1);
  p.kv = kv.data_ptr();
  p.kv_stride = kv.stride(0);
  p.n_kv = kv.size(0);
  p.indices = indices.data_ptr<int32_t>();
  p.indices_stride = indices.stride(0);
  p.topk = indices.size(1);
  p.topk_length = len1 ? len1->data_ptr<int32_t>() : nullptr;
  if (kv2) {
    p.extra_kv = kv2->data_ptr();
    p.extra_kv_stride = kv2->stride(0);
    p.n_extra_kv = kv2->size(0);
    p.extra_indices = idx2->data_ptr<int32_t>();
    p.extra_indices_stride = idx2->stride(0);
    p.extra_topk = idx2->size(1);
    p.extra_topk_length = len2 ? len2->data_ptr<int32_t>() : nullptr;
  }
  p.attn_sink = attn_sink.data_ptr<float>();
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.out = out.data_ptr();
  p.out_stride_token = out.stride(0);
  p.out_stride_head = out.stride(1);
  p.lse = lse.data_ptr<float>();
  p.lse_stride_token = lse.stride(0);
  p.lse_stride_head = lse.stride(1);
  p.num_tokens = T;
  p.num_heads = H;
  p.head_dim = D;
  // A stride of a size-1 dimension is never stepped; torch may report any value for it.
  if (T == 1) p.q_stride_token = p.out_stride_token = 0;
  if (H == 1) p.q_stride_head = p.out_stride_head = 0;
  if (p.n_kv <= 1) p.kv_stride = 0;
  if (p.n_extra_kv <= 1) p.extra_kv_stride = 0;

  // Split over keys when the token x head-tile grid leaves most SMs idle (decode). Shapes only,
  // so the choice is fixed under CUDA-graph capture; the workspace comes from the caching
  // allocator on the current stream.
  const int num_sms = at::cuda::getDeviceProperties(q.device().index())->multiProcessorCount;
  p.num_splits = sparse_attn_num_splits(T, H, p.topk, kv2 ? p.extra_topk : 0, num_sms);
  at::Tensor workspace;
  if (p.num_splits > 1) {
    p.workspace_bytes = sparse_attn_workspace_bytes(T, H, D, p.num_splits);
    workspace = at::empty({static_cast<int64_t>(p.workspace_bytes / sizeof(float))},
                          q.options().dtype(at::kFloat));
    p.workspace = workspace.data_ptr();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  // Unsplit head_dim-512 calls on Hopper take the warp-specialised prefill kernel unless
  // DSV4_SPARSE_PREFILL=old (read per call, so one process can time both kernels).
  const int prefill = sparse_attn_prefill_env();
  TORCH_CHECK(prefill >= 0, kOp, "DSV4_SPARSE_PREFILL must be 'new' or 'old' (unset: new), got '",
              std::getenv("DSV4_SPARSE_PREFILL"), "'");
  if (prefill == 1 && sparse_attn_prefill_sm90_takes(p))
    C10_CUDA_CHECK(dsv4::sparse_attn_prefill_sm90(p, stream));
  else
    C10_CUDA_CHECK(dsv4::sparse_attn(p, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> sparse_attn_cuda(
    const at::Tensor& q, const at::Tensor& kv, const at::Tensor& indices,
    const at::Tensor& attn_sink, double softmax_scale,
    const std::optional<at::Tensor>& topk_length, const std::optional<at::Tensor>& extra_kv,
    const std::optional<at::Tensor>& extra_indices,
    const std::optional<at::Tensor>& extra_topk_length) {
  TORCH_CHECK(q.dim() == 3, kOp, "q must be [tokens, heads, head_dim], got ", q.sizes());
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous, like the fake impl
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  run(q, kv, indices, attn_sink, softmax_scale, topk_length, extra_kv, extra_indices,
      extra_topk_length, out, lse);
  return {out, lse};
}

void sparse_attn_out_cuda(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& indices,
                          const at::Tensor& attn_sink, double softmax_scale,
                          const std::optional<at::Tensor>& topk_length,
                          const std::optional<at::Tensor>& extra_kv,
                          const std::optional<at::Tensor>& extra_indices,
                          const std::optional<at::Tensor>& extra_topk_length,
                          at::Tensor& out, at::Tensor& lse) {
  run(q, kv, indices, attn_sink, softmax_scale, topk_length, extra_kv, extra_indices,
      extra_topk_length, out, lse);
}

}  // namespace
}  // namespace dsv4

TORCH_LIBRARY_FRAGMENT(dsv4, m) {
  // Sparse MQA attention with a per-head sink over one or two gathered key scopes
  // (architecture.md §3.6; FlashMLA's sparse contract, kernels.md §4.1). Returns (out, lse).
  m.def(
      "sparse_attn(Tensor q, Tensor kv, Tensor indices, Tensor attn_sink, float softmax_scale, "
      "Tensor? topk_length=None, Tensor? extra_kv=None, Tensor? extra_indices=None, "
      "Tensor? extra_topk_length=None) -> (Tensor, Tensor)");
  // Out-variant for CUDA graphs: writes out [T, H, D] and lse [T, H] in place.
  m.def(
      "sparse_attn_out(Tensor q, Tensor kv, Tensor indices, Tensor attn_sink, "
      "float softmax_scale, Tensor? topk_length=None, Tensor? extra_kv=None, "
      "Tensor? extra_indices=None, Tensor? extra_topk_length=None, *, Tensor(a!) out, "
      "Tensor(b!) lse) -> ()");
}

TORCH_LIBRARY_IMPL(dsv4, CUDA, m) {
  m.impl("sparse_attn", &dsv4::sparse_attn_cuda);
  m.impl("sparse_attn_out", &dsv4::sparse_attn_out_cuda);
}
