// torch.ops.dsv4.grouped_oproj / grouped_oproj_out: schemas and CUDA implementation (the grouped
// GEMM kernel with one "expert" per output group and the inverse RoPE applied while loading o).
// Semantics: python/dsv4/ops/grouped_oproj.py (architecture.md §3.7, §7).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <optional>

#include "dsv4/grouped_gemm.h"
#include "gemm_utils.h"
#include "glue_checks.h"

namespace dsv4 {
namespace {

using namespace gemm_glue;

constexpr const char* kOp = "dsv4::grouped_oproj (CUDA): ";

void run_oproj(const at::Tensor& o_in, const at::Tensor& positions, const at::Tensor& freqs,
               const at::Tensor& wo_a, const std::optional<at::Tensor>& scale,
               const at::Tensor& out) {
  TORCH_CHECK(o_in.is_cuda(), kOp, "o must be a CUDA tensor, got ", o_in.device());
  TORCH_CHECK(o_in.scalar_type() == at::kBFloat16 && o_in.dim() == 3, kOp,
              "o must be bfloat16 [tokens, n_heads, head_dim] (the fp32 reference runs on CPU), "
              "got ", o_in.scalar_type(), " ", o_in.sizes());
  const int64_t T = o_in.size(0), H = o_in.size(1), hd = o_in.size(2);
  check_device(wo_a, o_in, kOp, "wo_a");
  TORCH_CHECK(wo_a.dim() == 3, kOp, "wo_a must be [groups, o_lora_rank, features per group], "
              "got ", wo_a.sizes());
  const int64_t G = wo_a.size(0), R = wo_a.size(1);
  TORCH_CHECK(hd >= 1, kOp, "o's head_dim must be >= 1, got ", o_in.sizes());
  TORCH_CHECK(G >= 1 && G <= 1024 && (H * hd) % G == 0 && ((H * hd) / G) % hd == 0, kOp, H,
              " heads x ", hd, " must split into ", G, " groups of whole heads (G <= 1024)");
  const int64_t Dg = H * hd / G;
  const GemmWeightFormat fmt = weight_format(wo_a, scale, Dg, kOp, "wo_a");
  TORCH_CHECK(fmt != GemmWeightFormat::kFP4, kOp, "wo_a must be bfloat16 or float8_e4m3fn");
  TORCH_CHECK(hd % 64 == 0, kOp, "the CUDA kernel needs head_dim % 64 == 0, got ", hd);
  check_device(freqs, o_in, kOp, "freqs");
  TORCH_CHECK(freqs.scalar_type() == at::kFloat && freqs.dim() == 1 && freqs.size(0) == 32, kOp,
              "the CUDA kernel takes rope_dim 64: freqs must be float32 [32], got ",
              freqs.scalar_type(), " ", freqs.sizes());
  check_device(positions, o_in, kOp, "positions");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == T &&
                  (positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong),
              kOp, "positions must be int32 or int64 [", T, "], got ", positions.scalar_type(),
              " ", positions.sizes());
  TORCH_CHECK(T <= INT_MAX, kOp, "at most ", INT_MAX, " tokens, got ", T);
  check_device(out, o_in, kOp, "out");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.dim() == 3 && out.size(0) == T &&
                  out.size(1) == G && out.size(2) == R,
              kOp, "out must be bfloat16 [", T, ", ", G, ", ", R, "], got ", out.scalar_type(),
              " ", out.sizes());
  check_not_broadcast(out, kOp, "out");
  TORCH_CHECK(T == 0 || ((out.stride(2) == 1 || R <= 1) && out.stride(1) % 8 == 0 &&
                         (T <= 1 || out.stride(0) % 8 == 0) && aligned16(out)),
              kOp, "out must have a unit last stride, other strides multiples of 8 and a 16-byte "
              "aligned data pointer (e.g. contiguous), got strides ", out.strides());
  if (T == 0) return;
  // o rows of n_heads * head_dim contiguous features, 16-byte aligned
  at::Tensor o = o_in;
  if (!(o.stride(2) == 1 && o.stride(1) == hd && o.stride(0) % 8 == 0 && aligned16(o)))
    o = o.clone(at::MemoryFormat::Contiguous);  // .contiguous() may return a misaligned view
  const at::Tensor pos = positions.scalar_type() == at::kInt ? positions.contiguous()
                                                              : positions.to(at::kInt);
  const at::Tensor fr = freqs.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(o_in.device().index()).stream();

  GroupedGemmArgs a;
  set_weight(a, wo_a, scale, fmt);
  a.n_experts = static_cast<int32_t>(G);
  a.rows = static_cast<int32_t>(R);
  a.k = static_cast<int32_t>(Dg);
  a.x = o.data_ptr();
  a.x_expert_stride = Dg;
  a.x_row_stride = row_stride(o);
  a.x_rows = T;
  a.pairs = T;
  a.positions = pos.data_ptr<int32_t>();
  a.freqs = fr.data_ptr<float>();
  a.head_dim = static_cast<int32_t>(hd);
  a.epilogue = GemmEpilogue::kStore;
  a.out = out.data_ptr();
  a.out_expert_stride = out.stride(1);
  a.out_row_stride = row_stride(out);
  run(a, stream, kOp);
}

at::Tensor grouped_oproj_cuda(const at::Tensor& o, const at::Tensor& positions,
                              const at::Tensor& freqs, const at::Tensor& wo_a,
                              const std::optional<at::Tensor>& wo_a_scale) {
  TORCH_CHECK(o.is_cuda() && o.dim() == 3 && wo_a.dim() == 3, kOp,
              "o must be a CUDA tensor [tokens, n_heads, head_dim] and wo_a [groups, "
              "o_lora_rank, features]; got ", o.device(), " ", o.sizes(), ", ", wo_a.sizes());
  c10::cuda::CUDAGuard guard(o.device());
  at::Tensor z = at::empty({o.size(0), wo_a.size(0), wo_a.size(1)}, o.options());
  run_oproj(o, positions, freqs, wo_a, wo_a_scale, z);
  return z;
}

void grouped_oproj_out_cuda(const at::Tensor& o, const at::Tensor& positions,
                            const at::Tensor& freqs, const at::Tensor& wo_a,
                            const std::optional<at::Tensor>& wo_a_scale, at::Tensor& out) {
  TORCH_CHECK(o.is_cuda(), kOp, "o must be a CUDA tensor, got ", o.device());
  c10::cuda::CUDAGuard guard(o.device());
  run_oproj(o, positions, freqs, wo_a, wo_a_scale, out);
}

}  // namespace
}  // namespace dsv4

TORCH_LIBRARY_FRAGMENT(dsv4, m) {
  // z[t, g] = wo_a[g] . rope^-1(o)[t, group g] (architecture.md §3.7, §7).
  m.def(
      "grouped_oproj(Tensor o, Tensor positions, Tensor freqs, Tensor wo_a, Tensor? wo_a_scale) "
      "-> Tensor");
  m.def(
      "grouped_oproj_out(Tensor o, Tensor positions, Tensor freqs, Tensor wo_a, "
      "Tensor? wo_a_scale, *, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(dsv4, CUDA, m) {
  m.impl("grouped_oproj", &dsv4::grouped_oproj_cuda);
  m.impl("grouped_oproj_out", &dsv4::grouped_oproj_out_cuda);
}
