// torch.ops.dsv4.paged_rows: schema and CUDA implementation (argument checks, device guard,
// current stream, and the call into the torch-free kernel csrc/kernels/paged_rows.cu).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>

#include "dsv4/paged_rows.h"

namespace dsv4 {
namespace {

at::Tensor paged_rows_cuda(const at::Tensor& table, const at::Tensor& rows,
                           const at::Tensor& sel, int64_t block_size) {
  constexpr const char* kOp = "dsv4::paged_rows (CUDA): ";
  TORCH_CHECK(sel.is_cuda(), kOp, "sel must be a CUDA tensor, got device ", sel.device());
  TORCH_CHECK(table.device() == sel.device() && rows.device() == sel.device(), kOp,
              "table and rows must be on sel's device (", sel.device(), "), got ",
              table.device(), " and ", rows.device());
  TORCH_CHECK(table.scalar_type() == at::kInt && rows.scalar_type() == at::kInt &&
                  sel.scalar_type() == at::kInt,
              kOp, "table, rows and sel must be int32, got ", table.scalar_type(), ", ",
              rows.scalar_type(), " and ", sel.scalar_type());
  TORCH_CHECK(table.dim() == 2, kOp, "table must be [num_rows, max_blocks], got ",
              table.sizes());
  TORCH_CHECK(sel.dim() == 2, kOp, "sel must be [tokens, k], got ", sel.sizes());
  TORCH_CHECK(rows.dim() == 1 && rows.size(0) == sel.size(0), kOp, "rows must be [",
              sel.size(0), "] (one table row per token), got ", rows.sizes());
  TORCH_CHECK(block_size >= 1 && block_size <= INT_MAX, kOp,
              "block_size must be in [1, 2147483647], got ", block_size);
  c10::cuda::CUDAGuard device_guard(sel.device());
  const int64_t tokens = sel.size(0), k = sel.size(1);
  at::Tensor out = at::empty({tokens, k}, sel.options());
  if (out.numel() == 0) return out;
  // Rows must be laid out one after another (unit column stride, row stride >= the row's
  // length): a broadcast (expanded) or transposed input is copied first.
  const auto rows_apart = [](const at::Tensor& x) {
    return x.stride(1) == 1 && (x.size(0) <= 1 || x.stride(0) >= x.size(1));
  };
  const at::Tensor t = rows_apart(table) ? table : table.contiguous();
  const at::Tensor s = rows_apart(sel) ? sel : sel.contiguous();
  const at::Tensor r = rows.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(sel.device().index()).stream();
  C10_CUDA_CHECK(dsv4::paged_rows(t.data_ptr<int32_t>(), t.size(0), t.size(1),
                                  t.size(0) > 1 ? t.stride(0) : t.size(1), r.data_ptr<int32_t>(),
                                  s.data_ptr<int32_t>(), tokens > 1 ? s.stride(0) : k,
                                  out.data_ptr<int32_t>(), tokens, k, block_size, stream));
  return out;
}

}  // namespace
}  // namespace dsv4

TORCH_LIBRARY_FRAGMENT(dsv4, m) {
  // out[t, k] = table[rows[t], sel // bs] * bs + sel % bs, -1 where there is none (int32).
  m.def("paged_rows(Tensor table, Tensor rows, Tensor sel, int block_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv4, CUDA, m) { m.impl("paged_rows", &dsv4::paged_rows_cuda); }
