// torch.ops.dsv4.mhc_pre / mhc_post / mhc_head (+ _out variants): schemas and CUDA
// implementations (argument checks, device guard, current stream, workspace from the caching
// allocator, and the calls into the torch-free kernels csrc/kernels/mhc.cu).
// Semantics: python/dsv4/layers/mhc.py (hc_pre, hc_post, hc_head), via python/dsv4/ops/mhc.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <tuple>
#include <vector>

#include "dsv4/mhc.h"
#include "glue_checks.h"
#include "scalar_checks.h"

namespace dsv4 {
namespace {

constexpr int64_t kHc = kMhcStreams;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* op) {
  TORCH_CHECK(t.device() == ref.device(), op, name, " must be on ", ref.device(), ", got ",
              t.device());
}

void check_fp32(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& x,
                const char* op) {
  check_same_device(t, name, x, op);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.sizes() == shape, op, name, " must be float32 ",
              shape, ", got ", t.scalar_type(), " ", t.sizes());
}

// x [..., 4, dim] bf16 -> a [T, 4, dim] view (or copy) with unit stream/column strides, a token
// stride that is a multiple of 8 and a 16-byte aligned start.
at::Tensor streams_2d(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.is_cuda(), op, name, " must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() >= 2 && x.size(-2) == kHc, op, name, " must be [..., ", kHc,
              ", dim] (the kernels take hc_mult = ", kHc, "), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, op, name, " must be bfloat16, got ",
              x.scalar_type());
  const int64_t d = x.size(-1);
  TORCH_CHECK(d >= 8 && d % 8 == 0, op, "dim must be a positive multiple of 8, got ", d);
  const int64_t T = x.numel() / (kHc * d);
  TORCH_CHECK(T <= INT_MAX, op, "at most ", INT_MAX, " tokens, got ", T);
  at::Tensor v = x.reshape({T, kHc, d});
  if (T > 0 && (v.stride(2) != 1 || v.stride(1) != d || v.stride(0) % 8 != 0 ||
                v.stride(0) < kHc * d || !aligned16(v.data_ptr()))) {
    v = v.clone(at::MemoryFormat::Contiguous);
  }
  return v;
}

std::vector<int64_t> lead_shape(const at::Tensor& x, std::initializer_list<int64_t> tail) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end() - 2);
  s.insert(s.end(), tail.begin(), tail.end());
  return s;
}

// ---------------------------------------------------------------------------------------------
// pre / head
// ---------------------------------------------------------------------------------------------
constexpr const char* kPre = "dsv4::mhc_pre (CUDA): ";
constexpr const char* kHead = "dsv4::mhc_head (CUDA): ";

void check_mix_params(const at::Tensor& x, const at::Tensor& fn, const at::Tensor& scale,
                      const at::Tensor& base, int64_t rows, int64_t n_scale, const char* op) {
  const int64_t d = x.size(-1);
  check_same_device(fn, "fn", x, op);
  TORCH_CHECK(fn.scalar_type() == at::kFloat && fn.dim() == 2 && fn.size(0) == rows &&
                  fn.size(1) == kHc * d,
              op, "fn must be float32 [", rows, ", ", kHc * d, "], got ", fn.scalar_type(), " ",
              fn.sizes());
  check_fp32(scale, "scale", {n_scale}, x, op);
  check_fp32(base, "base", {rows}, x, op);
}

at::Tensor contiguous_aligned(const at::Tensor& t) {
  if (t.is_contiguous() && aligned16(t.data_ptr())) return t;
  return t.clone(at::MemoryFormat::Contiguous);
}

at::Tensor mix_workspace(const at::Tensor& x, int64_t T, int64_t d, const char* op) {
  const size_t bytes = mhc_pre_workspace_bytes(T, d, x.device().index());
  at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
  // the caching allocator's blocks are 512-byte aligned; the C API rejects anything less
  // than 16 (float4 accesses)
  TORCH_CHECK(aligned16(ws.data_ptr()), op, "the workspace must be 16-byte aligned, got address ",
              ws.data_ptr());
  return ws;
}

// out rows [T, dim] with a unit column stride, row stride % 8 == 0, 16-byte aligned.
void check_rows_out(const at::Tensor& t, const char* name, const std::vector<int64_t>& shape,
                    const at::Tensor& x, const char* op) {
  check_same_device(t, name, x, op);
  check_not_broadcast(t, op, name);
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.sizes() == at::IntArrayRef(shape) &&
                  t.is_contiguous() && aligned16(t.data_ptr()),
              op, name, " must be a contiguous, 16-byte aligned bfloat16 ", at::IntArrayRef(shape),
              ", got ", t.scalar_type(), " ", t.sizes());
}

void run_pre(const at::Tensor& x_in, const at::Tensor& fn_in, const at::Tensor& scale,
             const at::Tensor& base, double norm_eps, int64_t iters, double eps,
             const at::Tensor& u, const at::Tensor& post, const at::Tensor& comb) {
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = streams_2d(x_in, kPre, "x");
  const int64_t T = x.size(0), d = x.size(2);
  if (T == 0) return;
  const at::Tensor fn = contiguous_aligned(fn_in);
  const at::Tensor s = scale.contiguous(), b = base.contiguous();
  at::Tensor ws = mix_workspace(x, T, d, kPre);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  C10_CUDA_CHECK(mhc_pre(x.data_ptr(), x.stride(0), fn.data_ptr<float>(), s.data_ptr<float>(),
                         b.data_ptr<float>(), static_cast<float>(norm_eps),
                         static_cast<int>(iters), static_cast<float>(eps), u.data_ptr(), d,
                         post.data_ptr<float>(), comb.data_ptr<float>(), T, d, ws.data_ptr(),
                         static_cast<size_t>(ws.numel()), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_pre_args(const at::Tensor& x, const at::Tensor& fn, const at::Tensor& scale,
                    const at::Tensor& base, double norm_eps, int64_t iters, double eps) {
  // norm_eps: added to the mean square before the square root; eps: added to pre and to every
  // Sinkhorn entry and sum before it divides (eps = 0 divides by a column sum that can be 0)
  check_positive_f32(norm_eps, kPre, "norm_eps");
  check_positive_f32(eps, kPre, "eps");
  TORCH_CHECK(x.is_cuda(), kPre, "x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() >= 2 && x.size(-2) == kHc, kPre, "x must be [..., ", kHc,
              ", dim] (the kernels take hc_mult = ", kHc, "), got ", x.sizes());
  TORCH_CHECK(iters >= 1 && iters <= INT_MAX, kPre, "iters must be >= 1, got ", iters);
  check_mix_params(x, fn, scale, base, (2 + kHc) * kHc, 3, kPre);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mhc_pre_cuda(const at::Tensor& x,
                                                            const at::Tensor& fn,
                                                            const at::Tensor& scale,
                                                            const at::Tensor& base,
                                                            double norm_eps, int64_t iters,
                                                            double eps) {
  check_pre_args(x, fn, scale, base, norm_eps, iters, eps);
  c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t d = x.size(-1);
  at::Tensor u = at::empty(lead_shape(x, {d}), x.options());
  at::Tensor post = at::empty(lead_shape(x, {kHc}), x.options().dtype(at::kFloat));
  at::Tensor comb = at::empty(lead_shape(x, {kHc, kHc}), x.options().dtype(at::kFloat));
  run_pre(x, fn, scale, base, norm_eps, iters, eps, u, post, comb);
  return {u, post, comb};
}

void mhc_pre_out_cuda(const at::Tensor& x, const at::Tensor& fn, const at::Tensor& scale,
                      const at::Tensor& base, double norm_eps, int64_t iters, double eps,
                      at::Tensor& u, at::Tensor& post, at::Tensor& comb) {
  check_pre_args(x, fn, scale, base, norm_eps, iters, eps);
  const int64_t d = x.size(-1);
  check_rows_out(u, "u", lead_shape(x, {d}), x, kPre);
  for (auto [t, name, shape] : {std::make_tuple(&post, "post", lead_shape(x, {kHc})),
                                std::make_tuple(&comb, "comb", lead_shape(x, {kHc, kHc}))}) {
    check_same_device(*t, name, x, kPre);
    check_not_broadcast(*t, kPre, name);
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->sizes() == at::IntArrayRef(shape) &&
                    t->is_contiguous(),
                kPre, name, " must be a contiguous float32 ", at::IntArrayRef(shape), ", got ",
                t->scalar_type(), " ", t->sizes());
  }
  run_pre(x, fn, scale, base, norm_eps, iters, eps, u, post, comb);
}

void run_head(const at::Tensor& x_in, const at::Tensor& fn_in, const at::Tensor& scale,
              const at::Tensor& base, double norm_eps, double eps, const at::Tensor& y) {
  c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = streams_2d(x_in, kHead, "x");
  const int64_t T = x.size(0), d = x.size(2);
  if (T == 0) return;
  const at::Tensor fn = contiguous_aligned(fn_in);
  const at::Tensor s = scale.contiguous(), b = base.contiguous();
  at::Tensor ws = mix_workspace(x, T, d, kHead);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  C10_CUDA_CHECK(mhc_head(x.data_ptr(), x.stride(0), fn.data_ptr<float>(), s.data_ptr<float>(),
                          b.data_ptr<float>(), static_cast<float>(norm_eps),
                          static_cast<float>(eps), y.data_ptr(), d, T, d, ws.data_ptr(),
                          static_cast<size_t>(ws.numel()), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_head_args(const at::Tensor& x, const at::Tensor& fn, const at::Tensor& scale,
                     const at::Tensor& base, double norm_eps, double eps) {
  // norm_eps as mhc_pre's; eps is only added to the collapse weights (no division): any finite
  check_positive_f32(norm_eps, kHead, "norm_eps");
  check_finite_f32(eps, kHead, "eps");
  TORCH_CHECK(x.is_cuda(), kHead, "x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() >= 2 && x.size(-2) == kHc, kHead, "x must be [..., ", kHc,
              ", dim] (the kernels take hc_mult = ", kHc, "), got ", x.sizes());
  check_mix_params(x, fn, scale, base, kHc, 1, kHead);
}

at::Tensor mhc_head_cuda(const at::Tensor& x, const at::Tensor& fn, const at::Tensor& scale,
                         const at::Tensor& base, double norm_eps, double eps) {
  check_head_args(x, fn, scale, base, norm_eps, eps);
  c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor y = at::empty(lead_shape(x, {x.size(-1)}), x.options());
  run_head(x, fn, scale, base, norm_eps, eps, y);
  return y;
}

void mhc_head_out_cuda(const at::Tensor& x, const at::Tensor& fn, const at::Tensor& scale,
                       const at::Tensor& base, double norm_eps, double eps, at::Tensor& y) {
  check_head_args(x, fn, scale, base, norm_eps, eps);
  check_rows_out(y, "y", lead_shape(x, {x.size(-1)}), x, kHead);
  run_head(x, fn, scale, base, norm_eps, eps, y);
}

// ---------------------------------------------------------------------------------------------
// post
// ---------------------------------------------------------------------------------------------
constexpr const char* kPost = "dsv4::mhc_post (CUDA): ";

void check_post_args(const at::Tensor& f, const at::Tensor& residual, const at::Tensor& post,
                     const at::Tensor& comb) {
  TORCH_CHECK(residual.is_cuda(), kPost, "residual must be a CUDA tensor, got device ",
              residual.device());
  TORCH_CHECK(residual.dim() >= 2 && residual.size(-2) == kHc, kPost, "residual must be [..., ",
              kHc, ", dim] (the kernels take hc_mult = ", kHc, "), got ", residual.sizes());
  TORCH_CHECK(residual.scalar_type() == at::kBFloat16, kPost, "residual must be bfloat16, got ",
              residual.scalar_type());
  const int64_t d = residual.size(-1);
  check_same_device(f, "f", residual, kPost);
  TORCH_CHECK(f.scalar_type() == at::kBFloat16 && f.sizes() == at::IntArrayRef(lead_shape(residual, {d})),
              kPost, "f must be bfloat16 ", at::IntArrayRef(lead_shape(residual, {d})), ", got ",
              f.scalar_type(), " ", f.sizes());
  check_fp32(post, "post", lead_shape(residual, {kHc}), residual, kPost);
  check_fp32(comb, "comb", lead_shape(residual, {kHc, kHc}), residual, kPost);
  TORCH_CHECK(residual.numel() / (kHc * std::max<int64_t>(d, 1)) <= INT_MAX, kPost, "at most ",
              INT_MAX, " tokens");
}

void run_post(const at::Tensor& f_in, const at::Tensor& residual_in, const at::Tensor& post_in,
              const at::Tensor& comb_in, const at::Tensor& out) {
  c10::cuda::CUDAGuard device_guard(residual_in.device());
  const int64_t d = residual_in.size(-1);
  if (d == 0 || residual_in.numel() == 0) return;
  const int64_t T = residual_in.numel() / (kHc * d);
  // clone, not .contiguous(): a one-token view may count as contiguous with any token stride,
  // which the kernel rejects (stride < 4 * dim)
  at::Tensor res = residual_in.reshape({T, kHc, d});
  if (res.stride(2) != 1 || res.stride(1) != d || res.stride(0) < kHc * d)
    res = res.clone(at::MemoryFormat::Contiguous);
  at::Tensor f = f_in.reshape({T, d});
  if (f.stride(1) != 1 || f.stride(0) < d) f = f.clone(at::MemoryFormat::Contiguous);
  const at::Tensor post = post_in.contiguous(), comb = comb_in.contiguous();
  const at::Tensor o = out.view({T, kHc, d});  // out is contiguous (checked / allocated)
  const cudaStream_t stream =
      c10::cuda::getCurrentCUDAStream(residual_in.device().index()).stream();
  C10_CUDA_CHECK(mhc_post(f.data_ptr(), f.stride(0), res.data_ptr(), res.stride(0),
                          post.data_ptr<float>(), comb.data_ptr<float>(), o.data_ptr(),
                          o.stride(0), T, d, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor mhc_post_cuda(const at::Tensor& f, const at::Tensor& residual, const at::Tensor& post,
                         const at::Tensor& comb) {
  check_post_args(f, residual, post, comb);
  c10::cuda::CUDAGuard device_guard(residual.device());
  at::Tensor out = at::empty(residual.sizes(), residual.options());
  run_post(f, residual, post, comb, out);
  return out;
}

void mhc_post_out_cuda(const at::Tensor& f, const at::Tensor& residual, const at::Tensor& post,
                       const at::Tensor& comb, at::Tensor& out) {
  check_post_args(f, residual, post, comb);
  check_same_device(out, "out", residual, kPost);
  check_not_broadcast(out, kPost, "out");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.sizes() == residual.sizes() &&
                  out.is_contiguous(),
              kPost, "out must be a contiguous bfloat16 ", residual.sizes(), ", got ",
              out.scalar_type(), " ", out.sizes());
  TORCH_CHECK(!out.is_same(residual) && !out.is_same(f), kPost,
              "out must not alias residual or f");
  run_post(f, residual, post, comb, out);
}

}  // namespace
}  // namespace dsv4

TORCH_LIBRARY_FRAGMENT(dsv4, m) {
  // mHC collapse of one sub-layer site (architecture.md §8): (u, post, comb).
  m.def(
      "mhc_pre(Tensor x, Tensor fn, Tensor scale, Tensor base, float norm_eps, int iters, "
      "float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "mhc_pre_out(Tensor x, Tensor fn, Tensor scale, Tensor base, float norm_eps, int iters, "
      "float eps, *, Tensor(a!) u, Tensor(b!) post, Tensor(c!) comb) -> ()");
  // out[k] = post[k] * f + sum_j comb[j, k] * residual[j].
  m.def("mhc_post(Tensor f, Tensor residual, Tensor post, Tensor comb) -> Tensor");
  m.def(
      "mhc_post_out(Tensor f, Tensor residual, Tensor post, Tensor comb, *, Tensor(a!) out) -> ()");
  // Final stream collapse before the head.
  m.def(
      "mhc_head(Tensor x, Tensor fn, Tensor scale, Tensor base, float norm_eps, float eps) -> "
      "Tensor");
  m.def(
      "mhc_head_out(Tensor x, Tensor fn, Tensor scale, Tensor base, float norm_eps, float eps, *, "
      "Tensor(a!) y) -> ()");
}

TORCH_LIBRARY_IMPL(dsv4, CUDA, m) {
  m.impl("mhc_pre", &dsv4::mhc_pre_cuda);
  m.impl("mhc_pre_out", &dsv4::mhc_pre_out_cuda);
  m.impl("mhc_post", &dsv4::mhc_post_cuda);
  m.impl("mhc_post_out", &dsv4::mhc_post_out_cuda);
  m.impl("mhc_head", &dsv4::mhc_head_cuda);
  m.impl("mhc_head_out", &dsv4::mhc_head_out_cuda);
}
