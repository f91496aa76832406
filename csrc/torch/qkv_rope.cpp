// torch.ops.dsv4.q_norm_rope / kv_norm_rope (+ _out): schemas and CUDA implementation (checks,
// device guard, current stream, the call into csrc/kernels/qkv_rope.cu). Semantics:
// python/dsv4/ops/qkv_rope.py.
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

#include "dsv4/qkv_rope.h"
#include "glue_checks.h"
#include "scalar_checks.h"

namespace dsv4 {
namespace {

constexpr const char* kQ = "dsv4::q_norm_rope (CUDA): ";
constexpr const char* kKV = "dsv4::kv_norm_rope (CUDA): ";

bool is_pow2_head_dim(int64_t d) { return d == 64 || d == 128 || d == 256 || d == 512; }

// bf16 rows read / written in pieces of 2 (D <= 128) or 8 (D >= 256) elements.
bool rows_ok(const at::Tensor& t, int64_t D) {
  const int64_t a = D >= 256 ? 8 : 2;
  if (t.stride(-1) != 1) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) % a != 0) return false;
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % (2 * a) == 0;
}

void check_common(const char* op, const at::Tensor& x, const at::Tensor& positions,
                  const at::Tensor& freqs, int64_t quant, int64_t D) {
  TORCH_CHECK(x.is_cuda(), op, "x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, op, "x must be bfloat16 (the reference takes "
              "other dtypes), got ", x.scalar_type());
  TORCH_CHECK(is_pow2_head_dim(D), op, "head_dim must be 64, 128, 256 or 512, got ", D);
  TORCH_CHECK(positions.device() == x.device() && freqs.device() == x.device(), op,
              "positions and freqs must be on x's device");
  TORCH_CHECK((positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong) &&
                  positions.dim() == 1 && positions.size(0) == x.size(0),
              op, "positions must be int32 / int64 [", x.size(0), "], got ",
              positions.scalar_type(), " ", positions.sizes());
  const int64_t rd = 2 * freqs.numel();
  TORCH_CHECK(freqs.scalar_type() == at::kFloat && freqs.dim() == 1 && rd >= 2 && rd <= D, op,
              "freqs must be float32 [rope_dim / 2] with 2 <= rope_dim <= ", D, ", got ",
              freqs.scalar_type(), " ", freqs.sizes());
  TORCH_CHECK(quant >= 0 && quant <= 2, op,
              "quant must be 0 (none), 1 (FP8) or 2 (Hadamard + FP4), got ", quant);
  TORCH_CHECK(quant != 1 || (D - rd) % 64 == 0, op,
              "quant=1 (FP8 blocks of 64) needs head_dim - rope_dim to be a multiple of 64, got ",
              D, " - ", rd);
}

void check_out(const char* op, const at::Tensor& out, const at::Tensor& x) {
  TORCH_CHECK(out.device() == x.device() && out.scalar_type() == at::kBFloat16 &&
                  out.sizes() == x.sizes(),
              op, "out must be bfloat16 ", x.sizes(), " on x's device, got ", out.scalar_type(),
              " ", out.sizes());
  check_not_broadcast(out, op, "out");
  TORCH_CHECK(x.numel() == 0 || rows_ok(out, x.size(-1)), op,
              "out must have a unit last stride and aligned rows (e.g. contiguous), got strides ",
              out.strides());
}

void run_q(const at::Tensor& x_in, const at::Tensor& positions, const at::Tensor& freqs,
           double eps, bool norm, int64_t quant, const at::Tensor& out) {
  // eps is read only by the norm (norm = false: the model passes 0 there)
  if (norm) check_positive_f32(eps, kQ, "eps");
  TORCH_CHECK(x_in.dim() == 3, kQ, "x must be [tokens, heads, head_dim], got ", x_in.sizes());
  const int64_t T = x_in.size(0), H = x_in.size(1), D = x_in.size(2);
  check_common(kQ, x_in, positions, freqs, quant, D);
  check_out(kQ, out, x_in);
  TORCH_CHECK(H >= 1, kQ, "x must have at least one head");
  c10::cuda::CUDAGuard guard(x_in.device());
  if (T == 0) return;
  // clone, not contiguous(): a misaligned view may already be contiguous
  const at::Tensor x = rows_ok(x_in, D) ? x_in : x_in.clone(at::MemoryFormat::Contiguous);
  const at::Tensor pos = positions.contiguous();
  const at::Tensor fr = freqs.contiguous();
  QkvRopeParams p;
  p.x = x.data_ptr();
  p.x_stride_t = T > 1 ? x.stride(0) : 0;
  p.x_stride_h = H > 1 ? x.stride(1) : 0;
  p.out = out.data_ptr();
  p.out_stride_t = T > 1 ? out.stride(0) : 0;
  p.out_stride_h = H > 1 ? out.stride(1) : 0;
  p.positions = pos.data_ptr();
  p.positions_int64 = pos.scalar_type() == at::kLong;
  p.freqs = fr.data_ptr<float>();
  p.rope_dim = static_cast<int>(2 * fr.numel());
  p.norm = norm;
  p.eps = static_cast<float>(eps);
  p.quant = static_cast<int>(quant);
  p.tokens = T;
  p.heads = H;
  p.head_dim = static_cast<int>(D);
  C10_CUDA_CHECK(qkv_rope(p, c10::cuda::getCurrentCUDAStream(x.device().index()).stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor q_norm_rope_cuda(const at::Tensor& x, const at::Tensor& positions,
                            const at::Tensor& freqs, double eps, bool norm, int64_t quant) {
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  run_q(x, positions, freqs, eps, norm, quant, out);
  return out;
}

void q_norm_rope_out_cuda(const at::Tensor& x, const at::Tensor& positions,
                          const at::Tensor& freqs, double eps, bool norm, int64_t quant,
                          at::Tensor& out) {
  run_q(x, positions, freqs, eps, norm, quant, out);
}

// One kv cache destination: bf16 [rows, D] / [nb, bs, D] or an FP8 MODEL1 pool.
void set_dst(KvCacheDst& d, const std::optional<at::Tensor>& cache,
             const std::optional<at::Tensor>& rows, const at::Tensor& x, int64_t D, int64_t rd,
             const char* name) {
  if (!cache.has_value()) {
    TORCH_CHECK(!rows.has_value(), kKV, name, "_rows given without ", name);
    return;
  }
  const at::Tensor& c = *cache;
  TORCH_CHECK(c.device() == x.device(), kKV, name, " must be on x's device");
  check_not_broadcast(c, kKV, name);
  TORCH_CHECK(rows.has_value() && rows->device() == x.device() &&
                  rows->scalar_type() == at::kInt && rows->dim() == 1 &&
                  rows->size(0) == x.size(0) && rows->is_contiguous(),
              kKV, name, "_rows must be a contiguous int32 [", x.size(0),
              "] tensor (a flat cache row per token, -1 = not written)");
  d.rows = rows->data_ptr<int32_t>();
  if (c.scalar_type() == at::kByte) {
    TORCH_CHECK(c.dim() == 3 && c.size(2) == kModel1EntryBytes && D == kModel1HeadDim &&
                    rd == kModel1Rope,
                kKV, "a uint8 ", name, " must be a MODEL1 FP8 pool [num_blocks, block_size, "
                "584] (head_dim 512, rope_dim 64), got ", c.sizes());
    const int64_t nb = c.size(0), bs = c.size(1);
    TORCH_CHECK((bs <= 1 || c.stride(1) == kModel1EntryBytes) && c.stride(2) == 1 &&
                    (nb <= 1 || (c.stride(0) % 16 == 0 && c.stride(0) >= bs * kModel1EntryBytes)) &&
                    (nb * bs == 0 || reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0),
                kKV, name, " must be a dsv4.ops.kv_cache.allocate pool, got strides ",
                c.strides());
    d.format = CacheFormat::kFp8Model1;
    d.data = nb * bs > 0 ? c.data_ptr() : nullptr;
    d.block_stride = nb > 1 ? c.stride(0) : (bs * kModel1EntryBytes + 15) / 16 * 16;
    d.block_size = std::max<int64_t>(bs, 1);
    d.num_rows = nb * bs;
    return;
  }
  TORCH_CHECK(c.scalar_type() == at::kBFloat16 && (c.dim() == 2 || c.dim() == 3) &&
                  c.size(-1) == D,
              kKV, name, " must be bfloat16 [rows, ", D, "] or [num_blocks, block_size, ", D,
              "] (or an FP8 MODEL1 pool), got ", c.scalar_type(), " ", c.sizes());
  TORCH_CHECK(c.numel() == 0 || rows_ok(c, D), kKV, name,
              " must have a unit last stride and aligned rows, got strides ", c.strides());
  d.format = CacheFormat::kPlain;
  d.data = c.numel() > 0 ? c.data_ptr() : nullptr;
  if (c.dim() == 2) {
    d.block_size = 1;
    d.block_stride = c.size(0) > 1 ? c.stride(0) : 0;
    d.row_stride = 0;
    d.num_rows = c.size(0);
  } else {
    d.block_size = std::max<int64_t>(c.size(1), 1);
    d.block_stride = c.size(0) > 1 ? c.stride(0) : 0;
    d.row_stride = c.size(1) > 1 ? c.stride(1) : 0;
    d.num_rows = c.size(0) * c.size(1);
  }
}

void run_kv(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& positions,
            const at::Tensor& freqs, double eps, int64_t quant,
            const std::optional<at::Tensor>& cache, const std::optional<at::Tensor>& cache_rows,
            const std::optional<at::Tensor>& cache2,
            const std::optional<at::Tensor>& cache2_rows, const at::Tensor& out) {
  check_positive_f32(eps, kKV, "eps");
  TORCH_CHECK(x_in.dim() == 2, kKV, "x must be [tokens, head_dim], got ", x_in.sizes());
  const int64_t T = x_in.size(0), D = x_in.size(1);
  check_common(kKV, x_in, positions, freqs, quant, D);
  TORCH_CHECK(quant != 2, kKV, "quant must be 0 (none) or 1 (FP8); 2 is a query-only mode");
  TORCH_CHECK(weight.device() == x_in.device() && weight.scalar_type() == at::kFloat &&
                  weight.dim() == 1 && weight.size(0) == D,
              kKV, "weight must be float32 [", D, "] on x's device, got ", weight.scalar_type(),
              " ", weight.sizes());
  check_out(kKV, out, x_in);
  QkvRopeParams p;
  const int64_t rd = 2 * freqs.numel();
  set_dst(p.dst[0], cache, cache_rows, x_in, D, rd, "cache");
  set_dst(p.dst[1], cache2, cache2_rows, x_in, D, rd, "cache2");
  c10::cuda::CUDAGuard guard(x_in.device());
  if (T == 0) return;
  // clone, not contiguous(): a misaligned view may already be contiguous
  const at::Tensor x = rows_ok(x_in, D) ? x_in : x_in.clone(at::MemoryFormat::Contiguous);
  const at::Tensor pos = positions.contiguous();
  const at::Tensor fr = freqs.contiguous();
  const at::Tensor w = weight.contiguous();
  p.x = x.data_ptr();
  p.x_stride_t = T > 1 ? x.stride(0) : 0;
  p.out = out.data_ptr();
  p.out_stride_t = T > 1 ? out.stride(0) : 0;
  p.positions = pos.data_ptr();
  p.positions_int64 = pos.scalar_type() == at::kLong;
  p.freqs = fr.data_ptr<float>();
  p.rope_dim = static_cast<int>(rd);
  p.weight = w.data_ptr<float>();
  p.norm = true;
  p.eps = static_cast<float>(eps);
  p.quant = static_cast<int>(quant);
  p.tokens = T;
  p.heads = 1;
  p.head_dim = static_cast<int>(D);
  C10_CUDA_CHECK(qkv_rope(p, c10::cuda::getCurrentCUDAStream(x.device().index()).stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor kv_norm_rope_cuda(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& positions, const at::Tensor& freqs, double eps,
                             int64_t quant, const std::optional<at::Tensor>& cache,
                             const std::optional<at::Tensor>& cache_rows,
                             const std::optional<at::Tensor>& cache2,
                             const std::optional<at::Tensor>& cache2_rows) {
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  run_kv(x, weight, positions, freqs, eps, quant, cache, cache_rows, cache2, cache2_rows, out);
  return out;
}

void kv_norm_rope_out_cuda(const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& positions, const at::Tensor& freqs, double eps,
                           int64_t quant, const std::optional<at::Tensor>& cache,
                           const std::optional<at::Tensor>& cache_rows,
                           const std::optional<at::Tensor>& cache2,
                           const std::optional<at::Tensor>& cache2_rows, at::Tensor& out) {
  run_kv(x, weight, positions, freqs, eps, quant, cache, cache_rows, cache2, cache2_rows, out);
}

}  // namespace
}  // namespace dsv4

TORCH_LIBRARY_FRAGMENT(dsv4, m) {
  // Fused query path (architecture.md §3.2 / §5): [weight-free RMSNorm] -> RoPE -> [quant].
  m.def("q_norm_rope(Tensor x, Tensor positions, Tensor freqs, float eps, bool norm, int quant) "
        "-> Tensor");
  m.def("q_norm_rope_out(Tensor x, Tensor positions, Tensor freqs, float eps, bool norm, "
        "int quant, *, Tensor(a!) out) -> ()");
  // Fused key-value path (§3.3): kv_norm -> RoPE -> [FP8 simulation] -> output + cache writes.
  m.def("kv_norm_rope(Tensor x, Tensor weight, Tensor positions, Tensor freqs, float eps, "
        "int quant, Tensor(a!)? cache=None, Tensor? cache_rows=None, Tensor(b!)? cache2=None, "
        "Tensor? cache2_rows=None) -> Tensor");
  m.def("kv_norm_rope_out(Tensor x, Tensor weight, Tensor positions, Tensor freqs, float eps, "
        "int quant, Tensor(a!)? cache=None, Tensor? cache_rows=None, Tensor(b!)? cache2=None, "
        "Tensor? cache2_rows=None, *, Tensor(c!) out) -> ()");
}

TORCH_LIBRARY_IMPL(dsv4, CUDA, m) {
  m.impl("q_norm_rope", &dsv4::q_norm_rope_cuda);
  m.impl("q_norm_rope_out", &dsv4::q_norm_rope_out_cuda);
  m.impl("kv_norm_rope", &dsv4::kv_norm_rope_cuda);
  m.impl("kv_norm_rope_out", &dsv4::kv_norm_rope_out_cuda);
}
