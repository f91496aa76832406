// torch.ops.dsv4.indexer_topk / indexer_topk_out: schemas and CUDA implementation (argument
// checks, device guard, current stream, workspace from the caching allocator, and the call into
// the torch-free kernel csrc/kernels/indexer_topk.cu). Semantics: python/dsv4/ops/indexer.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>

#include "dsv4/indexer_topk.h"
#include "glue_checks.h"

namespace dsv4 {
namespace {

constexpr const char* kOp = "dsv4::indexer_topk (CUDA): ";

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), kOp, name, " must be on q's device (", q.device(),
              "), got ", t.device());
}

bool aligned(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Checks the inputs, makes the layouts the kernel needs (copies only when the caller's layout
// is unusable), and runs the kernel into `out` ([T, topk] int32, unit last stride).
void run_indexer_topk(const at::Tensor& q_in, const at::Tensor& weights_in,
                      const at::Tensor& keys_in, const at::Tensor& rows_in,
                      const at::Tensor& n_valid_in, int64_t topk, const at::Tensor& out,
                      const std::optional<at::Tensor>& block_table_in) {
  TORCH_CHECK(q_in.is_cuda(), kOp, "q must be a CUDA tensor, got device ", q_in.device());
  check_same_device(weights_in, "weights", q_in);
  check_same_device(keys_in, "keys", q_in);
  check_same_device(rows_in, "rows", q_in);
  check_same_device(n_valid_in, "n_valid", q_in);
  const bool paged = block_table_in.has_value();
  if (paged) check_same_device(*block_table_in, "block_table", q_in);
  TORCH_CHECK(q_in.dim() == 3, kOp, "q must be [tokens, heads, head_dim], got ", q_in.sizes());
  TORCH_CHECK(keys_in.dim() == 3, kOp, "keys must be ",
              paged ? "a paged pool [num_blocks, block_size, head_dim]"
                    : "[batch, capacity, head_dim]",
              " (uint8 FP8 keys: [..., head_dim + 4]), got ", keys_in.sizes());
  const int64_t T = q_in.size(0), H = q_in.size(1), D = q_in.size(2);
  const bool fp8 = keys_in.scalar_type() == at::kByte;
  TORCH_CHECK(q_in.scalar_type() == at::kBFloat16, kOp, "q must be bfloat16, got ",
              q_in.scalar_type());
  TORCH_CHECK(keys_in.scalar_type() == at::kBFloat16 || fp8, kOp,
              "keys must be bfloat16 (or uint8 FP8 keys of dsv4.ops.kv_cache), got ",
              keys_in.scalar_type());
  TORCH_CHECK(weights_in.scalar_type() == at::kFloat, kOp, "weights must be float32, got ",
              weights_in.scalar_type());
  TORCH_CHECK(rows_in.scalar_type() == at::kInt && n_valid_in.scalar_type() == at::kInt, kOp,
              "rows and n_valid must be int32, got ", rows_in.scalar_type(), " and ",
              n_valid_in.scalar_type());
  TORCH_CHECK(D == 64 || D == 128, kOp, "head_dim must be 64 or 128, got ", D);
  TORCH_CHECK(H >= 1, kOp, "heads must be >= 1, got ", H);
  TORCH_CHECK(topk >= 1 && topk <= kIndexerMaxTopk, kOp, "topk must be in [1, ",
              kIndexerMaxTopk, "], got ", topk);
  TORCH_CHECK(keys_in.size(2) == (fp8 ? fp8_indexer_entry_bytes(D) : D), kOp,
              fp8 ? "FP8 keys last dim " : "keys head_dim ", keys_in.size(2),
              fp8 ? " != head_dim + 4 = " : " != q head_dim ", fp8 ? D + 4 : D);
  TORCH_CHECK(weights_in.dim() == 2 && weights_in.size(0) == T && weights_in.size(1) == H, kOp,
              "weights must be [", T, ", ", H, "] ([tokens, heads]), got ", weights_in.sizes());
  TORCH_CHECK(rows_in.dim() == 1 && rows_in.size(0) == T, kOp, "rows must be [", T,
              "] ([tokens]), got ", rows_in.sizes());
  TORCH_CHECK(n_valid_in.dim() == 1 && n_valid_in.size(0) == T, kOp, "n_valid must be [", T,
              "] ([tokens]), got ", n_valid_in.sizes());
  const int64_t NB = keys_in.size(0), BS = keys_in.size(1);
  if (paged) {
    const at::Tensor& bt = *block_table_in;
    TORCH_CHECK(bt.scalar_type() == at::kInt && bt.dim() == 2, kOp,
                "block_table must be int32 [rows, max_blocks], got ", bt.scalar_type(), " ",
                bt.sizes());
    TORCH_CHECK(bt.size(0) <= INT_MAX && bt.size(1) <= INT_MAX / std::max<int64_t>(BS, 1) &&
                    NB <= INT_MAX && BS <= INT_MAX,
                kOp, "paged sizes must fit in int32 (rows x max_blocks x block_size)");
  }
  TORCH_CHECK(T <= INT_MAX && NB <= INT_MAX && BS <= INT_MAX && H <= INT_MAX / 2, kOp,
              "sizes must fit in int32 (tokens ", T, ", keys ", keys_in.sizes(), ")");

  c10::cuda::CUDAGuard device_guard(q_in.device());
  if (T == 0) return;

  // q: unit last stride, even strides, 4-byte aligned (the kernel reads bf16 pairs).
  at::Tensor q = q_in;
  if (q.stride(2) != 1 || q.stride(0) % 2 != 0 || q.stride(1) % 2 != 0 ||
      !aligned(q.data_ptr(), 4)) {
    q = q.clone(at::MemoryFormat::Contiguous);  // clone: a misaligned view may already be contiguous
  }
  at::Tensor weights = weights_in.stride(1) == 1 || H == 1 ? weights_in : weights_in.contiguous();
  const int64_t w_st = weights.stride(0);
  at::Tensor keys = keys_in;
  if (fp8) {
    // An FP8 pool must keep its block layout: it cannot be re-laid out here.
    TORCH_CHECK(NB == 0 || BS == 0 ||
                    (keys.stride(2) == 1 && (BS == 1 || keys.stride(1) == D + 4) &&
                     (NB == 1 || (keys.stride(0) >= BS * (D + 4) && keys.stride(0) % 16 == 0)) &&
                     aligned(keys.data_ptr(), 16)),
                kOp, "FP8 keys must be a dsv4.ops.kv_cache.allocate pool (row stride = head_dim "
                "+ 4 bytes, block stride >= block bytes and a multiple of 16, 16-byte aligned), "
                "got strides ", keys.strides());
  } else if (NB > 0 && BS > 0 &&
             (keys.stride(2) != 1 || keys.stride(0) % 8 != 0 || keys.stride(1) % 8 != 0 ||
              !aligned(keys.data_ptr(), 16))) {
    // keys: unit last stride, other strides multiples of 8 elements, 16-byte aligned
    // (cp.async). A key store sliced out of a larger buffer keeps its strides.
    keys = keys.clone(at::MemoryFormat::Contiguous);  // clone: a misaligned view may already be contiguous
  }
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor n_valid = n_valid_in.contiguous();
  at::Tensor bt;
  if (paged) bt = block_table_in->stride(1) == 1 ? *block_table_in : block_table_in->contiguous();

  IndexerKeys k;
  k.data = (NB > 0 && BS > 0) ? keys.data_ptr() : nullptr;
  k.stride_block = NB > 1 ? keys.stride(0) : (fp8 ? (BS * (D + 4) + 15) / 16 * 16 : keys.stride(0));
  k.stride_entry = keys.stride(1);
  k.format = fp8 ? CacheFormat::kFp8Indexer : CacheFormat::kPlain;
  if (paged) {
    k.rows = bt.size(0);
    k.block_table = bt.numel() > 0 ? bt.data_ptr<int32_t>() : nullptr;
    k.block_table_stride = bt.stride(0);
    k.max_blocks = bt.size(1);
    k.block_size = std::max<int64_t>(BS, 1);
    k.num_blocks = BS > 0 ? NB : 0;
  } else {
    k.rows = NB;
    k.capacity = BS;
  }

  const int device = q.device().index();
  const size_t ws_bytes = dsv4::indexer_topk_workspace_bytes(T, k, H, D, topk, device);
  at::Tensor workspace;
  if (ws_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  C10_CUDA_CHECK(dsv4::indexer_topk(
      q.data_ptr(), q.stride(0), q.stride(1), weights.data_ptr<float>(), w_st, k,
      rows.data_ptr<int32_t>(), n_valid.data_ptr<int32_t>(), out.data_ptr<int32_t>(),
      out.stride(0), T, H, D, topk, ws_bytes > 0 ? workspace.data_ptr() : nullptr, ws_bytes,
      stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor indexer_topk_cuda(const at::Tensor& q, const at::Tensor& weights,
                             const at::Tensor& keys, const at::Tensor& rows,
                             const at::Tensor& n_valid, int64_t topk,
                             const std::optional<at::Tensor>& block_table) {
  TORCH_CHECK(q.dim() == 3, kOp, "q must be [tokens, heads, head_dim], got ", q.sizes());
  TORCH_CHECK(topk >= 1 && topk <= kIndexerMaxTopk, kOp, "topk must be in [1, ",
              kIndexerMaxTopk, "], got ", topk);
  c10::cuda::CUDAGuard device_guard(q.device());
  at::Tensor out = at::empty({q.size(0), topk}, q.options().dtype(at::kInt));
  run_indexer_topk(q, weights, keys, rows, n_valid, topk, out, block_table);
  return out;
}

void indexer_topk_out_cuda(const at::Tensor& q, const at::Tensor& weights,
                           const at::Tensor& keys, const at::Tensor& rows,
                           const at::Tensor& n_valid, int64_t topk, at::Tensor& indices,
                           const std::optional<at::Tensor>& block_table) {
  TORCH_CHECK(q.dim() == 3, kOp, "q must be [tokens, heads, head_dim], got ", q.sizes());
  check_same_device(indices, "indices", q);
  TORCH_CHECK(indices.scalar_type() == at::kInt, kOp, "indices must be int32, got ",
              indices.scalar_type());
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == q.size(0) && indices.size(1) == topk,
              kOp, "indices must be [", q.size(0), ", ", topk, "] ([tokens, topk]), got ",
              indices.sizes());
  check_not_broadcast(indices, kOp, "indices");
  TORCH_CHECK(indices.stride(1) == 1 || topk == 1, kOp,
              "indices must have a unit last stride, got strides ", indices.strides());
  run_indexer_topk(q, weights, keys, rows, n_valid, topk, indices, block_table);
}

}  // namespace
}  // namespace dsv4

TORCH_LIBRARY_FRAGMENT(dsv4, m) {
  // Lightning Indexer top-k (architecture.md §5): int32 [tokens, topk], descending score,
  // lowest index first among equal scores, NaN never selected, -1 padding.
  m.def(
      "indexer_topk(Tensor q, Tensor weights, Tensor keys, Tensor rows, Tensor n_valid, int topk, "
      "Tensor? block_table=None) -> Tensor");
  m.def(
      "indexer_topk_out(Tensor q, Tensor weights, Tensor keys, Tensor rows, Tensor n_valid, "
      "int topk, Tensor(a!) indices, Tensor? block_table=None) -> ()");
}

TORCH_LIBRARY_IMPL(dsv4, CUDA, m) {
  m.impl("indexer_topk", &dsv4::indexer_topk_cuda);
  m.impl("indexer_topk_out", &dsv4::indexer_topk_out_cuda);
}
