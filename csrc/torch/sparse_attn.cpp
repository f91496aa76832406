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

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <optional>
#include <tuple>

#include "dsv4/sparse_attn.h"
#include "dsv4/sparse_attn_prefill.h"
#include "glue_checks.h"
#include "scalar_checks.h"

namespace dsv4 {
namespace {

// Error prefixes: the helpers below take the calling op's, so hca_attn's errors name hca_attn.
constexpr const char* kSparseOp = "dsv4::sparse_attn (CUDA): ";
constexpr const char* kHcaOp = "dsv4::hca_attn (CUDA): ";

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

void check_device(const char* op, const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.device() == q.device(), op, name, " must be on q's device (", q.device(),
              "), got ", t.device());
}

void check_lengths(const char* op, const std::optional<at::Tensor>& len, const at::Tensor& q,
                   int64_t T, const char* name) {
  if (!len.has_value()) return;
  check_device(op, *len, q, name);
  TORCH_CHECK(len->scalar_type() == at::kInt, op, name, " must be int32, got ",
              len->scalar_type());
  TORCH_CHECK(len->dim() == 1 && len->size(0) == T, op, name, " must have shape [", T,
              "] (q.size(0)), got ", len->sizes());
}

void check_indices(const char* op, const at::Tensor& idx, const at::Tensor& q, int64_t T,
                   const char* name) {
  check_device(op, idx, q, name);
  TORCH_CHECK(idx.scalar_type() == at::kInt, op, name,
              " must be int32 (rows of the key array, -1 = unused), got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == T, op, name, " must have shape [", T,
              ", k] (q.size(0) tokens), got ", idx.sizes());
  TORCH_CHECK(idx.size(1) <= INT_MAX - 64, op, name, " has too many lanes (", idx.size(1), ")");
}

// A key scope: bf16 [n, D] rows, or (FP8) a MODEL1 pool uint8 [num_blocks, block_size, 584].
// `pool3d`: a bf16 scope given as a pool [num_blocks, block_size, D] (hca_attn's extra_kv).
void check_kv(const char* op, const at::Tensor& kv, const at::Tensor& q, int64_t D,
              const char* name, bool pool3d = false) {
  check_device(op, kv, q, name);
  if (kv.scalar_type() == at::kByte) {
    TORCH_CHECK(kv.dim() == 3 && kv.size(2) == kModel1EntryBytes && D == kModel1HeadDim, op,
                name, ": a uint8 scope must be a MODEL1 FP8 pool [num_blocks, block_size, 584] "
                "with head_dim 512 (dsv4.ops.kv_cache), got ", kv.sizes(), " for head_dim ", D);
    TORCH_CHECK(sparse_attn_supports_fp8_cache(D), op, name,
                ": FP8 (MODEL1) caches are read by the sm_90 kernel only (head_dim 512 on an "
                "H100 / H200); dequantise with dsv4.ops.kv_cache.read_pool elsewhere");
    const int64_t nb = kv.size(0), bs = kv.size(1);
    TORCH_CHECK(kv.stride(2) == 1 && (bs <= 1 || kv.stride(1) == kModel1EntryBytes) &&
                    (nb <= 1 || (kv.stride(0) >= bs * kModel1EntryBytes &&
                                 kv.stride(0) % 16 == 0)) &&
                    (nb * bs == 0 || reinterpret_cast<uintptr_t>(kv.data_ptr()) % 16 == 0),
                op, name, ": an FP8 pool must come from dsv4.ops.kv_cache.allocate (row stride "
                "584, block stride >= block bytes and a multiple of 16, 16-byte aligned), got "
                "strides ", kv.strides());
    TORCH_CHECK(nb * bs <= INT_MAX, op, name, ": at most 2^31 - 1 entries, got ", nb * bs);
    return;
  }
  TORCH_CHECK(kv.scalar_type() == at::kBFloat16, op, name,
              " must be bfloat16 (the CUDA kernel reads bf16 keys; call the reference "
              "dsv4.ops.attention.sparse_attn_reference for float32), got ",
              kv.scalar_type());
  if (pool3d) {
    TORCH_CHECK(kv.dim() == 3 && kv.size(2) == D, op, name,
                " must be a pool [num_blocks, block_size, ", D, "], got ", kv.sizes());
    TORCH_CHECK(kv.size(0) * kv.size(1) <= INT_MAX, op, name,
                ": at most 2^31 - 1 entries, got ", kv.size(0) * kv.size(1));
  } else {
    TORCH_CHECK(kv.dim() == 2 && kv.size(1) == D, op, name, " must have shape [n, ", D,
                "] (head_dim of q), got ", kv.sizes());
  }
}

// A bf16 pool [nb, bs, D] as rows [nb * bs, D] (a view when the rows are evenly spaced, else
// a contiguous copy).
at::Tensor pool_rows(const at::Tensor& pool) {
  const int64_t nb = pool.size(0), bs = pool.size(1);
  if (nb <= 1 || bs <= 1 || pool.stride(0) == bs * pool.stride(1)) {
    return pool.reshape({nb * bs, pool.size(2)});
  }
  return pool.contiguous().view({nb * bs, pool.size(2)});
}

// The compressed scope of hca_attn: extra_kv read through a block table (no index list); the
// entry counts travel as extra_topk_length.
struct HcaScope {
  const at::Tensor* block_table;
  const at::Tensor* rows;
};

// Fills the scope fields of p for `kv` (bf16 rows or an FP8 pool); returns the tensor whose
// memory the kernel reads (kept alive by the caller).
at::Tensor set_scope(const at::Tensor& kv_in, bool extra, SparseAttnParams& p) {
  if (kv_in.scalar_type() == at::kByte) {
    const int64_t nb = kv_in.size(0), bs = kv_in.size(1);
    const int64_t stride = nb > 1 ? kv_in.stride(0) : bs * kModel1EntryBytes;
    const void* ptr = nb * bs > 0 ? kv_in.data_ptr() : nullptr;
    if (extra) {
      p.extra_kv = ptr;
      p.extra_kv_stride = (stride + 15) / 16 * 16;
      p.n_extra_kv = nb * bs;
      p.extra_kv_format = CacheFormat::kFp8Model1;
      p.extra_block_size = std::max<int64_t>(bs, 1);
    } else {
      p.kv = ptr;
      p.kv_stride = (stride + 15) / 16 * 16;
      p.n_kv = nb * bs;
      p.kv_format = CacheFormat::kFp8Model1;
      p.kv_block_size = std::max<int64_t>(bs, 1);
    }
    return kv_in;
  }
  const at::Tensor rows2d = kv_in.dim() == 3 ? pool_rows(kv_in) : kv_in;
  const at::Tensor kv = rows2d.size(0) > 0 ? readable_rows(rows2d) : rows2d;
  if (extra) {
    p.extra_kv = kv.data_ptr();
    p.extra_kv_stride = kv.size(0) > 1 ? kv.stride(0) : 0;
    p.n_extra_kv = kv.size(0);
  } else {
    p.kv = kv.data_ptr();
    p.kv_stride = kv.size(0) > 1 ? kv.stride(0) : 0;
    p.n_kv = kv.size(0);
  }
  return kv;
}

// Checks every input and runs the kernel (sparse_attn: extra_indices; hca_attn: `hca`).
void run(const char* op, const at::Tensor& q_in, const at::Tensor& kv_in,
         const at::Tensor& indices_in,
         const at::Tensor& attn_sink_in, double softmax_scale,
         const std::optional<at::Tensor>& topk_length,
         const std::optional<at::Tensor>& extra_kv,
         const std::optional<at::Tensor>& extra_indices,
         const std::optional<at::Tensor>& extra_topk_length, const at::Tensor& out,
         const at::Tensor& lse, const HcaScope* hca = nullptr) {
  // any finite float32 (0 and negative scales are well defined: the kernels scale the scores
  // before taking their maximum)
  check_finite_f32(softmax_scale, op, "softmax_scale");
  TORCH_CHECK(q_in.is_cuda(), op, "q must be a CUDA tensor, got device ", q_in.device());
  // q's device from here on: check_kv asks whether it can read FP8 pools (compute capability).
  c10::cuda::CUDAGuard device_guard(q_in.device());
  TORCH_CHECK(q_in.scalar_type() == at::kBFloat16, op,
              "q must be bfloat16 (use dsv4.ops.attention.sparse_attn_reference for float32), "
              "got ",
              q_in.scalar_type());
  TORCH_CHECK(q_in.dim() == 3, op, "q must be [tokens, heads, head_dim], got ", q_in.sizes());
  const int64_t T = q_in.size(0), H = q_in.size(1), D = q_in.size(2);
  TORCH_CHECK(sparse_attn_supports_head_dim(D), op,
              "head_dim must be 64, 128, 256 or 512, got ", D);
  TORCH_CHECK(H >= 1 && H <= INT_MAX, op, "q must have at least one head, got ", H);
  check_kv(op, kv_in, q_in, D, "kv");
  check_indices(op, indices_in, q_in, T, "indices");
  check_lengths(op, topk_length, q_in, T, "topk_length");
  if (hca == nullptr) {
    TORCH_CHECK(extra_kv.has_value() == extra_indices.has_value(), op,
                "extra_kv and extra_indices must be given together");
    TORCH_CHECK(!extra_topk_length.has_value() || extra_indices.has_value(), op,
                "extra_topk_length needs extra_kv and extra_indices");
    if (extra_kv.has_value()) {
      check_kv(op, *extra_kv, q_in, D, "extra_kv");
      check_indices(op, *extra_indices, q_in, T, "extra_indices");
    }
  } else {
    check_kv(op, *extra_kv, q_in, D, "extra_kv", /*pool3d=*/true);
    const at::Tensor& bt = *hca->block_table;
    check_device(op, bt, q_in, "extra_block_table");
    TORCH_CHECK(bt.scalar_type() == at::kInt && bt.dim() == 2, op,
                "extra_block_table must be int32 [rows, max_blocks], got ", bt.scalar_type(),
                " ", bt.sizes());
    const int64_t cap = bt.size(1) * std::max<int64_t>(extra_kv->size(1), 1);
    TORCH_CHECK(cap <= INT_MAX - 64 && bt.size(0) <= INT_MAX, op,
                "extra_block_table x block_size must stay below 2^31 - 64 lanes, got ",
                bt.sizes(), " x ", extra_kv->size(1));
    std::optional<at::Tensor> rows_opt(*hca->rows);
    check_lengths(op, rows_opt, q_in, T, "extra_rows");
  }
  const bool any_fp8 = kv_in.scalar_type() == at::kByte ||
                       (extra_kv.has_value() && extra_kv->scalar_type() == at::kByte);
  TORCH_CHECK(!any_fp8 || ((kv_in.scalar_type() == at::kByte) &&
                           (!extra_kv.has_value() || extra_kv->scalar_type() == at::kByte)),
              op, "kv and extra_kv must both be FP8 pools or both bfloat16");
  // FP8 caches: DSV4_SPARSE_FP8 picks the kernel (read per call; "new" = warp-specialised,
  // "new2" = the same with the whole-sector producer mapping; unset = "auto", by grid size).
  TORCH_CHECK(!any_fp8 || sparse_attn_fp8_kernel_env() >= 0, op,
              "DSV4_SPARSE_FP8 must be 'auto', 'old', 'new' or 'new2' (unset: auto), got '",
              std::getenv("DSV4_SPARSE_FP8"), "'");
  check_lengths(op, extra_topk_length, q_in, T, "extra_topk_length");
  check_device(op, attn_sink_in, q_in, "attn_sink");
  TORCH_CHECK(attn_sink_in.scalar_type() == at::kFloat, op, "attn_sink must be float32, got ",
              attn_sink_in.scalar_type());
  TORCH_CHECK(attn_sink_in.dim() == 1 && attn_sink_in.size(0) == H, op,
              "attn_sink must have shape [", H, "] (q.size(1) heads), got ", attn_sink_in.sizes());
  check_device(op, out, q_in, "out");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16, op, "out must be bfloat16, got ",
              out.scalar_type());
  TORCH_CHECK(out.dim() == 3 && out.size(0) == T && out.size(1) == H && out.size(2) == D, op,
              "out must have shape [", T, ", ", H, ", ", D, "], got ", out.sizes());
  check_not_broadcast(out, op, "out");
  TORCH_CHECK(T == 0 || rows_aligned(out), op,
              "out must have a unit last stride, other strides multiples of 8 and a 16-byte "
              "aligned data pointer (e.g. a contiguous tensor); got strides ",
              out.strides());
  check_device(op, lse, q_in, "lse");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, op, "lse must be float32, got ",
              lse.scalar_type());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == T && lse.size(1) == H, op,
              "lse must have shape [", T, ", ", H, "], got ", lse.sizes());
  check_not_broadcast(lse, op, "lse");

  if (T == 0) return;

  SparseAttnParams p;
  const at::Tensor q = readable_rows(q_in);
  const at::Tensor kv = set_scope(kv_in, false, p);
  const at::Tensor indices = indices_in.stride(1) == 1 ? indices_in : indices_in.contiguous();
  const at::Tensor attn_sink = attn_sink_in.contiguous();
  const std::optional<at::Tensor> len1 =
      topk_length ? std::optional<at::Tensor>(topk_length->contiguous()) : std::nullopt;
  std::optional<at::Tensor> kv2, idx2, len2, bt, rows2;
  if (extra_kv) {
    kv2 = set_scope(*extra_kv, true, p);
    if (extra_topk_length) len2 = extra_topk_length->contiguous();
    if (hca == nullptr) {
      idx2 = extra_indices->stride(1) == 1 ? *extra_indices : extra_indices->contiguous();
      p.extra_indices = idx2->data_ptr<int32_t>();
      p.extra_indices_stride = idx2->stride(0);
      p.extra_topk = idx2->size(1);
    } else {
      bt = hca->block_table->stride(1) == 1 ? *hca->block_table : hca->block_table->contiguous();
      rows2 = hca->rows->contiguous();
      const int64_t bs = std::max<int64_t>(extra_kv->size(1), 1);
      p.extra_block_size = bs;  // (also set by set_scope for an FP8 pool: the same value)
      p.extra_max_blocks = bt->size(1);
      p.extra_block_table_rows = bt->size(0);
      p.extra_block_table_stride = bt->size(0) > 1 ? bt->stride(0) : 0;
      // A non-null table marks the HCA mode even when it has no element.
      p.extra_block_table = bt->numel() > 0 ? bt->data_ptr<int32_t>() : rows2->data_ptr<int32_t>();
      if (bt->numel() == 0) p.extra_block_table_rows = 0;  // every row "outside": no entry
      p.extra_rows = rows2->data_ptr<int32_t>();
      p.extra_topk = bt->size(1) * bs;
    }
    p.extra_topk_length = len2 ? len2->data_ptr<int32_t>() : nullptr;
  }
  p.q = q.data_ptr();
  p.q_stride_token = q.stride(0);
  p.q_stride_head = q.stride(1);
  p.indices = indices.data_ptr<int32_t>();
  p.indices_stride = indices.stride(0);
  p.topk = indices.size(1);
  p.topk_length = len1 ? len1->data_ptr<int32_t>() : nullptr;
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
  TORCH_CHECK(prefill >= 0, op, "DSV4_SPARSE_PREFILL must be 'new' or 'old' (unset: new), got '",
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
  const char* op = kSparseOp;
  TORCH_CHECK(q.dim() == 3, op, "q must be [tokens, heads, head_dim], got ", q.sizes());
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous, like the fake impl
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  run(op, q, kv, indices, attn_sink, softmax_scale, topk_length, extra_kv, extra_indices,
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
  const char* op = kSparseOp;
  run(op, q, kv, indices, attn_sink, softmax_scale, topk_length, extra_kv, extra_indices,
      extra_topk_length, out, lse);
}

std::tuple<at::Tensor, at::Tensor> hca_attn_cuda(
    const at::Tensor& q, const at::Tensor& kv, const at::Tensor& indices,
    const at::Tensor& attn_sink, double softmax_scale,
    const std::optional<at::Tensor>& topk_length, const at::Tensor& extra_kv,
    const at::Tensor& extra_block_table, const at::Tensor& extra_rows,
    const at::Tensor& extra_lengths) {
  const char* op = kHcaOp;
  TORCH_CHECK(q.dim() == 3, op, "q must be [tokens, heads, head_dim], got ", q.sizes());
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  const HcaScope hca{&extra_block_table, &extra_rows};
  run(op, q, kv, indices, attn_sink, softmax_scale, topk_length, extra_kv, std::nullopt,
      extra_lengths, out, lse, &hca);
  return {out, lse};
}

void hca_attn_out_cuda(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& indices,
                       const at::Tensor& attn_sink, double softmax_scale,
                       const std::optional<at::Tensor>& topk_length, const at::Tensor& extra_kv,
                       const at::Tensor& extra_block_table, const at::Tensor& extra_rows,
                       const at::Tensor& extra_lengths, at::Tensor& out, at::Tensor& lse) {
  const char* op = kHcaOp;
  const HcaScope hca{&extra_block_table, &extra_rows};
  run(op, q, kv, indices, attn_sink, softmax_scale, topk_length, extra_kv, std::nullopt,
      extra_lengths, out, lse, &hca);
}

}  // namespace
}  // namespace dsv4

TORCH_LIBRARY_FRAGMENT(dsv4, m) {
  // HCA dense attention (architecture.md §6, contracts.md A.4): the window scope as in
  // sparse_attn, the compressed scope = the first extra_lengths[t] entries of block-table row
  // extra_rows[t] of the pool extra_kv (no index list). Semantics: python/dsv4/ops/hca_attn.py.
  m.def(
      "hca_attn(Tensor q, Tensor kv, Tensor indices, Tensor attn_sink, float softmax_scale, "
      "Tensor? topk_length, Tensor extra_kv, Tensor extra_block_table, Tensor extra_rows, "
      "Tensor extra_lengths) -> (Tensor, Tensor)");
  m.def(
      "hca_attn_out(Tensor q, Tensor kv, Tensor indices, Tensor attn_sink, float softmax_scale, "
      "Tensor? topk_length, Tensor extra_kv, Tensor extra_block_table, Tensor extra_rows, "
      "Tensor extra_lengths, *, Tensor(a!) out, Tensor(b!) lse) -> ()");
}

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
  m.impl("hca_attn", &dsv4::hca_attn_cuda);
  m.impl("hca_attn_out", &dsv4::hca_attn_out_cuda);
}
