// torch.ops.dsv4.compress_kv: schema and CUDA implementation (argument checks, device guard,
// current stream, and the call into the torch-free kernels csrc/kernels/compress_kv.cu).
// The pure-PyTorch reference and the fake are registered from python/dsv4/ops/compressor.py
// with the same schema.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <optional>
#include <string>

#include "dsv4/compress_kv.h"
#include "glue_checks.h"
#include "scalar_checks.h"

namespace dsv4 {
namespace {

constexpr const char* kOp = "dsv4::compress_kv (CUDA): ";

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

void check_on(const at::Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, kOp, name, " must be on ", dev, " (kv's device), got ",
              t.device());
}

void compress_kv_cuda(const at::Tensor& kv, const at::Tensor& score, const at::Tensor& ape,
                      const at::Tensor& norm_weight, const at::Tensor& freqs,
                      const at::Tensor& cu_seqlens, const at::Tensor& starts,
                      at::Tensor& state_kv, at::Tensor& state_score, at::Tensor& entries,
                      int64_t compress_ratio, int64_t max_seqlen, double eps, int64_t quant,
                      const std::optional<at::Tensor>& slots,
                      const std::optional<at::Tensor>& block_table) {
  // the RMSNorm's epsilon: a positive finite float32 (0 gives inf / NaN for an all-zero entry)
  check_positive_f32(eps, kOp, "eps");
  TORCH_CHECK(kv.is_cuda(), kOp, "kv must be a CUDA tensor, got device ", kv.device());
  const at::Device dev = kv.device();
  check_on(score, "score", dev);
  check_on(ape, "ape", dev);
  check_on(norm_weight, "norm_weight", dev);
  check_on(freqs, "freqs", dev);
  check_on(cu_seqlens, "cu_seqlens", dev);
  check_on(starts, "starts", dev);
  check_on(state_kv, "state_kv", dev);
  check_on(state_score, "state_score", dev);
  check_on(entries, "entries", dev);
  if (slots.has_value()) check_on(*slots, "slots", dev);
  if (block_table.has_value()) check_on(*block_table, "block_table", dev);
  // written in place (state rows, entries by row / slot): checked before anything is written
  check_not_broadcast(state_kv, kOp, "state_kv");
  check_not_broadcast(state_score, kOp, "state_score");
  check_not_broadcast(entries, kOp, "entries");

  const int64_t m = compress_ratio;
  TORCH_CHECK(m >= 1 && m <= INT_MAX, kOp, "compress_ratio must be >= 1, got ", m);
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 &&
                  cu_seqlens.size(0) >= 1 && cu_seqlens.is_contiguous(),
              kOp, "cu_seqlens must be a contiguous int32 [batch + 1] tensor, got ",
              cu_seqlens.scalar_type(), " ", cu_seqlens.sizes());
  const int64_t B = cu_seqlens.size(0) - 1;
  const bool paged = block_table.has_value();
  TORCH_CHECK(entries.dim() == 3, kOp, "entries must be ",
              paged ? "[num_blocks, block_size, head_dim]" : "[batch, capacity, head_dim]",
              " (uint8 FP8 caches: [..., entry_bytes]), got shape ", entries.sizes());
  const bool fp8 = entries.scalar_type() == at::kByte;
  TORCH_CHECK(entries.scalar_type() == at::kBFloat16 || entries.scalar_type() == at::kFloat || fp8,
              kOp, "entries must be bfloat16 or float32 (or a uint8 FP8 cache of "
              "dsv4.ops.kv_cache), got ", entries.scalar_type());
  TORCH_CHECK(norm_weight.dim() == 1, kOp, "norm_weight must be [head_dim], got ",
              norm_weight.sizes());
  const int64_t d = fp8 ? norm_weight.size(0) : entries.size(2);
  const int64_t R = entries.size(0), C = entries.size(1);
  CacheFormat fmt = CacheFormat::kPlain;
  if (fp8) {
    if (d == kModel1HeadDim && entries.size(2) == kModel1EntryBytes) {
      fmt = CacheFormat::kFp8Model1;
    } else if ((d == 64 || d == 128) && entries.size(2) == fp8_indexer_entry_bytes(d)) {
      fmt = CacheFormat::kFp8Indexer;
    } else {
      TORCH_CHECK(false, kOp, "a uint8 entries cache must be MODEL1 [..., 584] (head_dim 512) "
                  "or FP8 indexer keys [..., head_dim + 4] (head_dim 64 / 128); got last dim ",
                  entries.size(2), " for head_dim ", d);
    }
    TORCH_CHECK(entries.stride(2) == 1 && (C <= 1 || entries.stride(1) == entries.size(2)) &&
                    (R <= 1 || (entries.stride(0) >= C * entries.size(2) &&
                                entries.stride(0) % 16 == 0)) &&
                    aligned16(entries),
                kOp, "an FP8 cache must be a dsv4.ops.kv_cache.allocate pool (row stride = entry "
                "bytes, block stride >= block bytes and a multiple of 16, 16-byte aligned), got "
                "strides ", entries.strides());
  } else {
    TORCH_CHECK(entries.stride(2) == 1, kOp,
                "entries must have a contiguous last dimension, got strides ", entries.strides());
  }
  TORCH_CHECK(d % 4 == 0 && d >= 4 && d <= 1024, kOp,
              "head_dim (entries.size(-1)) must be a multiple of 4 in [4, 1024], got ", d);
  if (slots.has_value()) {
    TORCH_CHECK(slots->scalar_type() == at::kInt && slots->dim() == 1 && slots->size(0) == B &&
                    slots->is_contiguous(),
                kOp, "slots must be a contiguous int32 [", B, "] tensor (one state row per step "
                "row), got ", slots->scalar_type(), " ", slots->sizes());
  } else if (!paged) {
    TORCH_CHECK(R == B, kOp, "entries must be [", B, ", capacity, head_dim] (one row per step "
                "row; pass slots or block_table otherwise), got ", entries.sizes());
  }
  if (paged) {
    TORCH_CHECK(block_table->scalar_type() == at::kInt && block_table->dim() == 2 &&
                    block_table->size(0) == B && block_table->stride(1) == 1,
                kOp, "block_table must be int32 [", B, ", max_blocks] (indexed by step row) "
                "with a unit last stride, got ", block_table->scalar_type(), " ",
                block_table->sizes());
  }
  const int64_t coff = m == 4 ? 2 : 1, w = coff * d;
  for (const auto* p : {&kv, &score}) {
    const char* name = p == &kv ? "kv" : "score";
    TORCH_CHECK(p->scalar_type() == at::kFloat && p->dim() == 2 && p->size(1) == w, kOp, name,
                " must be float32 [tokens, ", w, "] (coff * head_dim, coff = ", coff,
                " for compress_ratio ", m, "), got ", p->scalar_type(), " ", p->sizes());
    TORCH_CHECK(p->stride(1) == 1 || w == 1, kOp, name,
                " must have a contiguous last dimension, got strides ", p->strides());
    TORCH_CHECK(p->size(0) <= 1 || p->stride(0) % 4 == 0, kOp, name,
                " row stride must be a multiple of 4 elements (16-byte rows), got ",
                p->stride(0));
    TORCH_CHECK(p->numel() == 0 || aligned16(*p), kOp, name,
                " must be 16-byte aligned (float4 loads); call .clone() on an offset view");
  }
  TORCH_CHECK(score.size(0) == kv.size(0), kOp,
              "kv and score must have the same number of tokens, got ", kv.size(0), " and ",
              score.size(0));
  TORCH_CHECK(ape.scalar_type() == at::kFloat && ape.dim() == 2 && ape.size(0) == m &&
                  ape.size(1) == w && ape.is_contiguous() && aligned16(ape),
              kOp, "ape must be a contiguous float32 [", m, ", ", w, "] tensor, got ",
              ape.scalar_type(), " ", ape.sizes());
  TORCH_CHECK(norm_weight.scalar_type() == at::kFloat && norm_weight.dim() == 1 &&
                  norm_weight.size(0) == d && norm_weight.is_contiguous(),
              kOp, "norm_weight must be a contiguous float32 [", d, "] tensor, got ",
              norm_weight.scalar_type(), " ", norm_weight.sizes());
  const int64_t rd = 2 * freqs.numel();
  TORCH_CHECK(freqs.scalar_type() == at::kFloat && freqs.dim() == 1 && freqs.is_contiguous() &&
                  rd >= 2 && rd <= d,
              kOp, "freqs must be a contiguous float32 [rope_dim / 2] tensor with 2 <= "
              "rope_dim <= ", d, ", got ", freqs.scalar_type(), " ", freqs.sizes());
  TORCH_CHECK(starts.scalar_type() == at::kInt && starts.dim() == 1 && starts.size(0) == B &&
                  starts.is_contiguous(),
              kOp, "starts must be a contiguous int32 [", B, "] tensor, got ",
              starts.scalar_type(), " ", starts.sizes());
  for (const auto* p : {&state_kv, &state_score}) {
    const char* name = p == &state_kv ? "state_kv" : "state_score";
    TORCH_CHECK(p->scalar_type() == at::kFloat && p->dim() == 3 &&
                    (slots.has_value() || p->size(0) == B) && p->size(0) == state_kv.size(0) &&
                    p->size(1) == coff * m && p->size(2) == w && p->is_contiguous(),
                kOp, name, " must be a contiguous float32 [",
                slots.has_value() ? "n_slots" : std::to_string(B), ", ", coff * m, ", ", w,
                "] tensor, got ", p->scalar_type(), " ", p->sizes());
    TORCH_CHECK(p->numel() == 0 || aligned16(*p), kOp, name, " must be 16-byte aligned");
  }
  TORCH_CHECK(max_seqlen >= 0, kOp, "max_seqlen must be >= 0, got ", max_seqlen);
  TORCH_CHECK(quant >= 0 && quant <= 2, kOp,
              "quant must be 0 (none), 1 (FP8) or 2 (Hadamard + FP4), got ", quant);
  TORCH_CHECK(quant != 1 || (d - rd) % 64 == 0, kOp,
              "quant=1 (FP8 blocks of 64) needs head_dim - rope_dim to be a multiple of 64, got ",
              d, " - ", rd);
  TORCH_CHECK(quant != 2 || (d >= 32 && (d & (d - 1)) == 0), kOp,
              "quant=2 (Hadamard + FP4 blocks of 32) needs head_dim a power of two >= 32, got ",
              d);
  TORCH_CHECK(fmt != CacheFormat::kFp8Model1 || (rd == kModel1Rope && quant != 2), kOp,
              "a MODEL1 FP8 cache takes rope_dim 64 and quant 0 or 1, got rope_dim ", rd,
              ", quant ", quant);
  TORCH_CHECK(fmt != CacheFormat::kFp8Indexer || quant != 1, kOp,
              "an FP8 indexer-key cache takes quant 0 or 2, got 1");
  TORCH_CHECK(B <= INT_MAX, kOp, "at most ", INT_MAX, " rows are supported, got ", B);

  c10::cuda::CUDAGuard device_guard(dev);
  if (B == 0 || kv.size(0) == 0) return;
  CompressKVParams p;
  p.kv = kv.data_ptr<float>();
  p.score = score.data_ptr<float>();
  p.kv_row_stride = kv.stride(0);
  p.score_row_stride = score.stride(0);
  p.num_tokens = kv.size(0);
  p.ape = ape.data_ptr<float>();
  p.norm_weight = norm_weight.data_ptr<float>();
  p.freqs = freqs.data_ptr<float>();
  p.rope_dim = static_cast<int>(rd);
  p.cu_seqlens = cu_seqlens.data_ptr<int32_t>();
  p.starts = starts.data_ptr<int32_t>();
  p.batch = B;
  p.state_kv = state_kv.data_ptr<float>();
  p.state_score = state_score.data_ptr<float>();
  p.entries = (R > 0 && C > 0) ? entries.data_ptr() : nullptr;
  // (a single block / row: its stride is never stepped; FP8 needs a multiple of 16 anyway)
  p.entries_batch_stride =
      R > 1 ? entries.stride(0) : (fp8 ? (C * entries.size(2) + 15) / 16 * 16 : entries.stride(0));
  p.entries_row_stride = entries.stride(1);
  p.capacity = (paged || p.entries == nullptr) ? 0 : C;  // no entries row: nothing written
  p.entries_dtype = entries.scalar_type() == at::kFloat ? DType::kFloat32 : DType::kBFloat16;
  p.entries_format = fmt;
  if (slots.has_value()) {
    p.slots = slots->data_ptr<int32_t>();
    p.num_slots = state_kv.size(0);
    p.entry_rows = R;
  }
  if (paged) {
    p.block_table = block_table->data_ptr<int32_t>();
    p.block_table_stride = block_table->stride(0);
    p.max_blocks_per_row = block_table->size(1);
    p.block_size = C;
    p.num_blocks = (C > 0) ? R : 0;
    if (C == 0) p.block_size = 1;  // an empty pool: nothing is written
  }
  p.head_dim = static_cast<int>(d);
  p.compress_ratio = static_cast<int>(m);
  p.max_seqlen = max_seqlen;
  p.eps = static_cast<float>(eps);
  p.quant = static_cast<CompressQuant>(quant);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  C10_CUDA_CHECK(dsv4::compress_kv(p, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace dsv4

TORCH_LIBRARY_FRAGMENT(dsv4, m) {
  // DeepSeek-V4 KV compressor after the wkv / wgate projections (architecture.md §4): emits
  // every entry completed by the new tokens into `entries` and rewrites the partial-block
  // state in place. Semantics: python/dsv4/ops/compressor.py compress_kv_reference.
  m.def(
      "compress_kv(Tensor kv, Tensor score, Tensor ape, Tensor norm_weight, Tensor freqs, "
      "Tensor cu_seqlens, Tensor starts, Tensor(a!) state_kv, Tensor(b!) state_score, "
      "Tensor(c!) entries, int compress_ratio, int max_seqlen, float eps, int quant, "
      "Tensor? slots=None, Tensor? block_table=None) -> ()");
}

TORCH_LIBRARY_IMPL(dsv4, CUDA, m) { m.impl("compress_kv", &dsv4::compress_kv_cuda); }
