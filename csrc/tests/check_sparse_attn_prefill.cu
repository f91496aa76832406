// Standalone check of dsv4::sparse_attn_prefill_sm90 (no torch): random bf16 inputs on the GPU,
// every (token, head) row of small cases (sampled rows of large ones) compared with a CPU loop
// in double precision, and the whole output compared with dsv4::sparse_attn (the old kernel) on
// the same inputs. Corner cases: two key scopes, topk lengths with garbage tail lanes (clamped
// at 0 and at k), -1 at the front of a row (a whole first block), indices >= n and < -1, all-
// invalid rows, sinks +-inf, odd block counts, partial head tiles, padded strides, a running max
// that moves in every block, 70,000 query tokens. NaN-poisoned outputs. Then times old vs new
// at FlashMLA's four V4 prefill cases. Prints PASS / FAIL (exit 1), or SKIP (exit 0) without a
// compute-capability-9.0 GPU.
//
// Every correctness case runs twice: one CTA per tile, then as the persistent grid
// (DSV4_SPARSE_PREFILL_PERSISTENT=1), which adds two cases with ~5 tiles per CTA.
//
//   check_sparse_attn_prefill          correctness, then timing
//   check_sparse_attn_prefill quick    small correctness cases (for compute-sanitizer)
//   check_sparse_attn_prefill time     timing only
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "check_common.h"
#include "dsv4/sparse_attn.h"
#include "dsv4/sparse_attn_prefill.h"

namespace {

using dsv4_check::bf16_to_float;
using dsv4_check::float_to_bf16;

constexpr int D = 512;
const double kInf = std::numeric_limits<double>::infinity();

struct Case {
  const char* name;
  int64_t T;
  int H;
  int64_t N1;
  int K1;
  int64_t N2;  // extra scope rows; the scope exists when K2 > 0
  int K2;
  bool lengths;    // topk_length / extra_topk_length with garbage tails
  double invalid;  // fraction of invalid lanes
  bool sink_inf;   // first head +inf, last head -inf
  int pad;         // extra elements in the q / kv / out row strides (multiple of 8)
  bool ramp;       // logits that grow along each row's key list (the max moves every block)
};

template <typename T>
T* to_device(const std::vector<T>& h) {
  T* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, std::max<size_t>(h.size(), 1) * sizeof(T)));
  if (!h.empty()) CHECK_CUDA(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

struct Scope {
  int64_t n = 0, stride = 0;
  int k = 0;
  std::vector<uint16_t> kv;
  std::vector<int32_t> idx, len;
};

void make_scope(Scope& s, const Case& c, int64_t n, int k, const std::vector<float>& dir,
                std::mt19937& rng) {
  s.n = n;
  s.k = k;
  s.stride = D + c.pad;
  s.kv.assign(static_cast<size_t>(std::max<int64_t>(n, 0) * s.stride), 0);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (int64_t r = 0; r < n; ++r) {
    // ramp: row r carries (r / n) * 20 along dir, so later rows give larger logits
    const float w = c.ramp ? 20.f * static_cast<float>(r) / static_cast<float>(n) : 0.f;
    for (int x = 0; x < D; ++x)
      s.kv[r * s.stride + x] = float_to_bf16(w * dir[x] + (c.ramp ? 0.3f : 1.f) * normal(rng));
  }
  const int64_t T = c.T;
  s.idx.resize(static_cast<size_t>(T) * k);
  std::uniform_int_distribution<int64_t> row(0, std::max<int64_t>(n - 1, 0));
  std::uniform_real_distribution<double> u(0, 1);
  for (int64_t t = 0; t < T; ++t) {
    int32_t* r = s.idx.data() + t * k;
    for (int i = 0; i < k; ++i) {
      const double x = u(rng);
      int32_t v = n > 0 ? static_cast<int32_t>(row(rng)) : -1;
      if (x < c.invalid * 0.5) v = -1;
      else if (x < c.invalid * 0.7) v = static_cast<int32_t>(n + (rng() % 1000));  // >= n
      else if (x < c.invalid * 0.85) v = -2 - static_cast<int32_t>(rng() % 1000);  // < -1
      else if (x < c.invalid) v = std::numeric_limits<int32_t>::min();
      r[i] = v;
    }
    if (c.ramp) std::sort(r, r + k);  // ascending rows: ascending logits along the list
    switch (t % 7) {
      case 1:  // a whole first block (and a bit) of -1
        for (int i = 0; i < std::min(k, 70); ++i) r[i] = -1;
        break;
      case 3:  // all invalid in this scope
        for (int i = 0; i < k; ++i) r[i] = (i & 1) ? -1 : static_cast<int32_t>(n + i);
        break;
      case 5:  // duplicates
        for (int i = 1; i < k; i += 3) r[i] = r[0];
        break;
    }
  }
  if (!c.lengths) return;
  s.len.resize(T);
  for (int64_t t = 0; t < T; ++t) {
    int v;
    switch (t % 5) {
      case 0: v = k; break;
      case 1: v = -3; break;       // clamps to 0
      case 2: v = k + 100; break;  // clamps to k
      default: v = static_cast<int>(rng() % (k + 1));
    }
    s.len[t] = v;
    for (int i = std::max(v, 0); i < k; ++i)  // garbage past the length
      s.idx[t * k + i] = (i & 1) ? static_cast<int32_t>(rng() % 5) : static_cast<int32_t>(rng());
  }
}

// Reference for one (t, h) in double; returns lse (+inf without a valid key). oabs[x] =
// sum_j w_j |k_j[x]|: the scale of the error from rounding the probabilities to bf16.
double reference(const Case& c, const std::vector<uint16_t>& q, int64_t q_st, int64_t q_sh,
                 const Scope& s1, const Scope& s2, const std::vector<float>& sink, int64_t t,
                 int h, std::vector<double>& o, std::vector<double>& oabs) {
  std::vector<const uint16_t*> keys;
  for (const Scope* s : {&s1, &s2}) {
    if (s->k == 0) continue;
    const int k = s->len.empty() ? s->k : std::min(std::max(s->len[t], 0), s->k);
    for (int i = 0; i < k; ++i) {
      const int32_t v = s->idx[t * s->k + i];
      if (v >= 0 && v < s->n) keys.push_back(s->kv.data() + v * s->stride);
    }
  }
  o.assign(D, 0.0);
  oabs.assign(D, 0.0);
  if (keys.empty()) return kInf;
  const uint16_t* qr = q.data() + t * q_st + h * q_sh;
  std::vector<double> qd(D), sj(keys.size());
  for (int x = 0; x < D; ++x) qd[x] = bf16_to_float(qr[x]);
  const double scale = 1.0 / std::sqrt(double(D));
  double m = -kInf;
  for (size_t j = 0; j < keys.size(); ++j) {
    double d = 0;
    for (int x = 0; x < D; ++x) d += qd[x] * bf16_to_float(keys[j][x]);
    sj[j] = d * static_cast<double>(static_cast<float>(scale));
    m = std::max(m, sj[j]);
  }
  double sum = 0;
  for (size_t j = 0; j < keys.size(); ++j) {
    const double e = std::exp(sj[j] - m);
    sum += e;
    for (int x = 0; x < D; ++x) {
      const double kx = bf16_to_float(keys[j][x]);
      o[x] += e * kx;
      oabs[x] += e * std::fabs(kx);
    }
  }
  const double denom = sum + std::exp(double(sink[h]) - m);
  for (int x = 0; x < D; ++x) {
    o[x] /= denom;
    oabs[x] /= denom;
  }
  return m + std::log(sum);
}

bool run_case(const Case& c, std::mt19937& rng) {
  const int64_t T = c.T;
  const int H = c.H;
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> dir(D);
  double nrm = 0;
  for (auto& v : dir) {
    v = normal(rng);
    nrm += double(v) * v;
  }
  for (auto& v : dir) v = static_cast<float>(v / std::sqrt(nrm));
  const int64_t q_sh = D + c.pad, q_st = H * q_sh + c.pad;
  std::vector<uint16_t> q(static_cast<size_t>(T * q_st), 0);
  for (int64_t t = 0; t < T; ++t)
    for (int h = 0; h < H; ++h)
      for (int x = 0; x < D; ++x)
        q[t * q_st + h * q_sh + x] =
            float_to_bf16(c.ramp ? std::sqrt(float(D)) * (dir[x] + 0.05f * normal(rng))
                                 : 1.5f * normal(rng));
  Scope s1, s2;
  make_scope(s1, c, c.N1, c.K1, dir, rng);
  if (c.K2 > 0) make_scope(s2, c, c.N2, c.K2, dir, rng);
  std::vector<float> sink(H);
  for (int h = 0; h < H; ++h) sink[h] = 1.f + 2.f * normal(rng);
  if (c.sink_inf && H >= 2) {
    sink[0] = INFINITY;
    sink[H - 1] = -INFINITY;
  }

  dsv4::SparseAttnParams p;
  p.q = to_device(q);
  p.q_stride_token = q_st;
  p.q_stride_head = q_sh;
  p.kv = to_device(s1.kv);
  p.kv_stride = s1.stride;
  p.n_kv = s1.n;
  p.indices = to_device(s1.idx);
  p.indices_stride = s1.k;
  p.topk = s1.k;
  p.topk_length = c.lengths ? to_device(s1.len) : nullptr;
  if (c.K2 > 0) {
    p.extra_kv = to_device(s2.kv);
    p.extra_kv_stride = s2.stride;
    p.n_extra_kv = s2.n;
    p.extra_indices = to_device(s2.idx);
    p.extra_indices_stride = s2.k;
    p.extra_topk = s2.k;
    p.extra_topk_length = c.lengths ? to_device(s2.len) : nullptr;
  }
  p.attn_sink = to_device(sink);
  p.softmax_scale = 1.f / std::sqrt(float(D));
  const int64_t o_sh = D + c.pad, o_st = H * o_sh + 8 * (c.pad != 0);
  const int64_t lse_st = H + 3;  // strided lse
  const size_t out_n = static_cast<size_t>(T * o_st);
  p.out_stride_token = o_st;
  p.out_stride_head = o_sh;
  p.lse_stride_token = lse_st;
  p.lse_stride_head = 1;
  p.num_tokens = T;
  p.num_heads = H;
  p.head_dim = D;
  p.num_splits = 1;

  // New kernel, then the old one (dsv4::sparse_attn, unsplit) on the same inputs.
  std::vector<uint16_t> out_new(out_n), out_old(out_n);
  std::vector<float> lse_new(T * lse_st), lse_old(T * lse_st);
  for (int k = 0; k < 2; ++k) {
    void* d_out = nullptr;
    float* d_lse = nullptr;
    CHECK_CUDA(cudaMalloc(&d_out, out_n * 2));
    CHECK_CUDA(cudaMemset(d_out, 0xff, out_n * 2));  // NaN poison
    CHECK_CUDA(cudaMalloc(&d_lse, T * lse_st * 4));
    CHECK_CUDA(cudaMemset(d_lse, 0xff, T * lse_st * 4));
    p.out = d_out;
    p.lse = d_lse;
    CHECK_CUDA(k == 0 ? dsv4::sparse_attn_prefill_sm90(p, nullptr) : dsv4::sparse_attn(p, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    CHECK_CUDA(cudaMemcpy((k == 0 ? out_new : out_old).data(), d_out, out_n * 2,
                          cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy((k == 0 ? lse_new : lse_old).data(), d_lse, T * lse_st * 4,
                          cudaMemcpyDeviceToHost));
    cudaFree(d_out);
    cudaFree(d_lse);
  }

  // Rows checked against the double reference: all of a small case, a sample of a large one.
  const int64_t step = T * H <= 40000 ? 1 : std::max<int64_t>(1, (T * H) / 20000) | 1;
  std::vector<double> o, oabs;
  int64_t bad = 0, bad_lse = 0, bad_old = 0, n_empty = 0, rows = 0, n_bitwise = 0, n_el = 0;
  double max_err = 0, max_old_diff = 0;
  int printed = 0;
  for (int64_t r = 0; r < T * H; r += step) {
    const int64_t t = r / H;
    const int h = static_cast<int>(r % H);
    ++rows;
    const double lr = reference(c, q, q_st, q_sh, s1, s2, sink, t, h, o, oabs);
    const float lk = lse_new[t * lse_st + h];
    bool lse_ok;
    if (std::isinf(lr)) {
      ++n_empty;
      lse_ok = std::isinf(lk) && lk > 0;
    } else {
      lse_ok = std::fabs(double(lk) - lr) <= 1e-3 + 1e-4 * std::fabs(lr);
    }
    if (!lse_ok) {
      ++bad_lse;
      if (printed++ < 8)
        std::printf("    lse t=%lld h=%d kernel=%.6g ref=%.6g\n", (long long)t, h, lk, lr);
    }
    const uint16_t* kn = out_new.data() + t * o_st + h * o_sh;
    const uint16_t* ko = out_old.data() + t * o_st + h * o_sh;
    for (int x = 0; x < D; ++x) {
      const double k = bf16_to_float(kn[x]);
      const double e = std::fabs(k - o[x]);
      // bf16 probabilities (<= 2^-8 relative each) and bf16 output rounding, 2x margin, plus a
      // floor for the fp32 accumulation (the rule of check_sparse_attn).
      const double tol = std::ldexp(oabs[x] + std::fabs(o[x]), -7) + 1e-4;
      if (!(e <= tol)) {
        ++bad;
        if (printed++ < 8)
          std::printf("    out t=%lld h=%d d=%d kernel=%.6g ref=%.6g\n", (long long)t, h, x, k,
                      o[x]);
      }
      max_err = std::isfinite(e) ? std::max(max_err, e) : kInf;
      const double dk = std::fabs(k - bf16_to_float(ko[x]));
      if (!(dk <= tol)) ++bad_old;
      max_old_diff = std::isfinite(dk) ? std::max(max_old_diff, dk) : kInf;
      n_bitwise += kn[x] == ko[x];
      ++n_el;
    }
  }
  // Every lse of the whole output: inf exactly where the old kernel has it.
  int64_t inf_mismatch = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int h = 0; h < H; ++h)
      inf_mismatch += std::isinf(lse_new[t * lse_st + h]) != std::isinf(lse_old[t * lse_st + h]);
  const bool ok = bad == 0 && bad_lse == 0 && bad_old == 0 && inf_mismatch == 0;
  std::printf("%s %-30s T=%-6lld H=%-3d K1=%-4d K2=%-4d rows=%-6lld empty=%-5lld max_err=%.3g "
              "vs_old=%.3g bitwise_equal=%.1f%%\n",
              ok ? "ok  " : "FAIL", c.name, (long long)T, H, c.K1, c.K2, (long long)rows,
              (long long)n_empty, max_err, max_old_diff, 100.0 * n_bitwise / std::max<int64_t>(n_el, 1));
  if (!ok)
    std::printf("    bad out=%lld lse=%lld vs_old=%lld inf_mismatch=%lld\n", (long long)bad,
                (long long)bad_lse, (long long)bad_old, (long long)inf_mismatch);
  cudaFree(const_cast<void*>(p.q));
  cudaFree(const_cast<void*>(p.kv));
  cudaFree(const_cast<int32_t*>(p.indices));
  if (p.topk_length) cudaFree(const_cast<int32_t*>(p.topk_length));
  if (c.K2 > 0) {
    cudaFree(const_cast<void*>(p.extra_kv));
    cudaFree(const_cast<int32_t*>(p.extra_indices));
    if (p.extra_topk_length) cudaFree(const_cast<int32_t*>(p.extra_topk_length));
  }
  cudaFree(const_cast<float*>(p.attn_sink));
  CHECK_CUDA(cudaGetLastError());
  return ok;
}

// ---------------------------------------------------------------------------------------------
// Timing: old vs new, medians of CUDA events, the two kernels alternating.
// ---------------------------------------------------------------------------------------------
__global__ void init_bf16_kernel(__nv_bfloat16* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
    p[i] = __float2bfloat16((static_cast<float>(x & 0xffffff) / 16777216.f - 0.5f) * 4.f);
  }
}

__global__ void init_idx_kernel(int32_t* p, int64_t n, uint32_t range, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 2246822519u ^ seed;
    x ^= x >> 13; x *= 0x5bd1e995u; x ^= x >> 15;
    p[i] = static_cast<int32_t>(x % range);
  }
}

void time_case(const char* name, int H, int K, int64_t N, double flashmla_us) {
  const int64_t T = 4096;
  __nv_bfloat16 *q, *kv, *out;
  int32_t* idx;
  float *lse, *sink;
  CHECK_CUDA(cudaMalloc(&q, T * H * D * 2));
  CHECK_CUDA(cudaMalloc(&out, T * H * D * 2));
  CHECK_CUDA(cudaMalloc(&lse, T * H * 4));
  CHECK_CUDA(cudaMalloc(&sink, H * 4));
  CHECK_CUDA(cudaMemset(sink, 0, H * 4));
  CHECK_CUDA(cudaMalloc(&kv, N * D * 2));
  CHECK_CUDA(cudaMalloc(&idx, T * K * 4));
  init_bf16_kernel<<<1024, 256>>>(q, T * H * D, 1u);
  init_bf16_kernel<<<1024, 256>>>(kv, N * D, 2u);
  init_idx_kernel<<<1024, 256>>>(idx, T * K, static_cast<uint32_t>(N), 3u);
  CHECK_CUDA(cudaGetLastError());
  dsv4::SparseAttnParams p;
  p.q = q; p.q_stride_token = H * D; p.q_stride_head = D;
  p.kv = kv; p.kv_stride = D; p.n_kv = N;
  p.indices = idx; p.indices_stride = K; p.topk = K;
  p.attn_sink = sink; p.softmax_scale = 1.f / std::sqrt(float(D));
  p.out = out; p.out_stride_token = H * D; p.out_stride_head = D;
  p.lse = lse; p.lse_stride_token = H; p.lse_stride_head = 1;
  p.num_tokens = T; p.num_heads = H; p.head_dim = D; p.num_splits = 1;
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  std::vector<float> t_old, t_new, t_per;  // old kernel, new (one CTA per tile), persistent grid
  for (int i = 0; i < 13; ++i) {
    for (int k = 0; k < 3; ++k) {
      if (k == 2) setenv("DSV4_SPARSE_PREFILL_PERSISTENT", "1", 1);
      CHECK_CUDA(cudaEventRecord(a));
      CHECK_CUDA(k == 0 ? dsv4::sparse_attn(p, nullptr) : dsv4::sparse_attn_prefill_sm90(p, nullptr));
      CHECK_CUDA(cudaEventRecord(b));
      CHECK_CUDA(cudaEventSynchronize(b));
      if (k == 2) unsetenv("DSV4_SPARSE_PREFILL_PERSISTENT");
      float ms;
      CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
      if (i >= 2) (k == 0 ? t_old : k == 1 ? t_new : t_per).push_back(ms * 1000.f);  // 2 warm-up
    }
  }
  std::sort(t_old.begin(), t_old.end());
  std::sort(t_new.begin(), t_new.end());
  std::sort(t_per.begin(), t_per.end());
  const float mo = t_old[t_old.size() / 2], mn = t_new[t_new.size() / 2];
  const float mp = t_per[t_per.size() / 2];
  const double flops = 2.0 * K * H * (D + D) * T;
  std::printf("TIME %-32s old %7.1f us %5.1f TF | new %7.1f us %5.1f TF | new/old %.2f | "
              "persistent %7.1f us, persistent/new %.2f | FlashMLA %6.1f us, new/FlashMLA %.2f, "
              "persistent/FlashMLA %.2f\n",
              name, mo, flops / mo * 1e-6, mn, flops / mn * 1e-6, mn / mo, mp, mp / mn,
              flashmla_us, mn / flashmla_us, mp / flashmla_us);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaFree(q); cudaFree(out); cudaFree(lse); cudaFree(sink); cudaFree(kv); cudaFree(idx);
  CHECK_CUDA(cudaGetLastError());
}

}  // namespace

int main(int argc, char** argv) {
  int n_dev = 0, major = 0, minor = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
    std::printf("SKIP: no CUDA device\n");
    return 0;
  }
  CHECK_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
  CHECK_CUDA(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0));
  if (major != 9 || minor != 0) {
    std::printf("SKIP: the prefill kernel needs a compute-capability-9.0 GPU (got %d.%d)\n", major,
                minor);
    return 0;
  }
  const std::string mode = argc > 1 ? argv[1] : "all";
  std::mt19937 rng(12345);
  bool ok = true;
  if (mode != "time") {
    // name, T, H, N1, K1, N2, K2, lengths, invalid, sink_inf, pad, ramp
    std::vector<Case> cases = {
        {"h64 main", 37, 64, 700, 200, 0, 0, true, 0.2, true, 0, false},
        {"h128 two scopes", 23, 128, 300, 130, 900, 77, true, 0.2, true, 0, false},
        {"h1 one block", 9, 1, 90, 64, 0, 0, false, 0.1, false, 0, false},
        {"h96 (two tiles) three blocks", 11, 96, 400, 192, 0, 0, false, 0.1, true, 0, false},
        {"h64 K=1 + extra K=1", 15, 64, 10, 1, 10, 1, false, 0.3, true, 0, false},
        {"h64 no main rows + extra", 13, 64, 0, 64, 300, 100, true, 0.1, true, 0, false},
        {"h64 padded strides", 19, 64, 200, 150, 100, 70, true, 0.2, true, 8, false},
        {"h128 ramp (max moves)", 13, 128, 2048, 1024, 0, 0, false, 0.0, false, 0, true},
        {"h64 ramp two scopes", 17, 64, 1000, 320, 800, 130, true, 0.05, false, 0, true},
    };
    if (mode != "quick") {
      cases.push_back({"h64 top512 (V4-Flash)", 66, 64, 8192, 512, 0, 0, false, 0.0, false, 0,
                       false});
      cases.push_back({"h2 T=70000", 70000, 2, 3000, 64, 2000, 40, true, 0.1, false, 0, false});
    }
    for (const auto& c : cases) ok &= run_case(c, rng);
    // The same cases through the persistent grid (DSV4_SPARSE_PREFILL_PERSISTENT=1: one CTA per
    // SM looping over tiles), plus cases with ~5 tiles per CTA whose neighbouring tiles have
    // different iteration counts (lengths), none included (lengths clamped at 0).
    setenv("DSV4_SPARSE_PREFILL_PERSISTENT", "1", 1);
    std::printf("persistent grid:\n");
    cases.push_back({"h64 main, ~5 tiles per CTA", 661, 64, 700, 200, 0, 0, true, 0.2, true, 0,
                     false});
    cases.push_back({"h128 two scopes, ~5 tiles per CTA", 661, 128, 300, 130, 900, 77, true,
                     0.2, true, 0, false});
    for (const auto& c : cases) ok &= run_case(c, rng);
    unsetenv("DSV4_SPARSE_PREFILL_PERSISTENT");
    // Argument validation.
    dsv4::SparseAttnParams bad;
    bad.num_tokens = 1; bad.num_heads = 64; bad.head_dim = 256;
    ok &= dsv4::sparse_attn_prefill_sm90(bad, nullptr) == cudaErrorInvalidValue;  // head_dim
    bad.head_dim = 512;
    ok &= dsv4::sparse_attn_prefill_sm90(bad, nullptr) == cudaErrorInvalidValue;  // null pointers
    bad.num_splits = 2;
    bad.num_tokens = 0;
    ok &= dsv4::sparse_attn_prefill_sm90(bad, nullptr) == cudaErrorInvalidValue;  // split
    bad.num_splits = 1;
    ok &= dsv4::sparse_attn_prefill_sm90(bad, nullptr) == cudaSuccess;  // empty is a no-op
    {
      // An FP8 cache or the HCA block-table mode is rejected (this kernel would read them as
      // bf16 rows); the same call without them runs (no key: out 0).
      void* buf = nullptr;
      const size_t tile = 64 * 512 * 2;
      CHECK_CUDA(cudaMalloc(&buf, 2 * tile + 2 * 64 * 4));
      CHECK_CUDA(cudaMemset(buf, 0, 2 * tile + 2 * 64 * 4));
      dsv4::SparseAttnParams f;
      f.num_tokens = 1; f.num_heads = 64; f.head_dim = 512;
      f.q = buf; f.q_stride_head = 512;
      f.out = static_cast<char*>(buf) + tile; f.out_stride_head = 512;
      f.lse = reinterpret_cast<float*>(static_cast<char*>(buf) + 2 * tile); f.lse_stride_head = 1;
      f.attn_sink = f.lse + 64;
      f.kv_format = dsv4::CacheFormat::kFp8Model1;
      ok &= dsv4::sparse_attn_prefill_sm90(f, nullptr) == cudaErrorInvalidValue;  // FP8 kv
      f.kv_format = dsv4::CacheFormat::kPlain;
      f.extra_block_table = static_cast<const int32_t*>(buf);
      f.extra_rows = static_cast<const int32_t*>(buf);
      ok &= dsv4::sparse_attn_prefill_sm90(f, nullptr) == cudaErrorInvalidValue;  // HCA mode
      f.extra_block_table = nullptr;
      f.extra_rows = nullptr;
      ok &= dsv4::sparse_attn_prefill_sm90(f, nullptr) == cudaSuccess;
      CHECK_CUDA(cudaDeviceSynchronize());
      // An error the caller left pending reaches the caller (returned, or still pending): the
      // launch sets the kernel's shared-memory size, which clears the thread's last error.
      const bool injected = dsv4_check::leave_error_pending();
      const cudaError_t ret = dsv4::sparse_attn_prefill_sm90(f, nullptr);
      const cudaError_t pend = cudaGetLastError();
      const bool kept = dsv4_check::pending_error_kept(injected, ret, pend);
      std::printf("%s error pending before a call kept: returned %s, pending after %s\n",
                  kept ? "ok  " : "FAIL", cudaGetErrorName(ret), cudaGetErrorName(pend));
      ok &= kept;
      CHECK_CUDA(cudaDeviceSynchronize());
      CHECK_CUDA(cudaFree(buf));
    }
    std::printf("%s\n", ok ? "PASS" : "FAIL");
  }
  if (mode == "all" || mode == "time") {
    // FlashMLA on the same H200 side by side (kernels.md §4.1, 2026-12-05): 593 / 661 us
    // (h64 top-512, 8K / 64K keys), 1848 / 2057 us (h128 top-1024).
    time_case("prefill T4096 h64 top512 N8K", 64, 512, 8192, 593);
    time_case("prefill T4096 h64 top512 N64K", 64, 512, 65536, 661);
    time_case("prefill T4096 h128 top1024 N8K", 128, 1024, 8192, 1848);
    time_case("prefill T4096 h128 top1024 N64K", 128, 1024, 65536, 2057);
  }
  return ok ? 0 : 1;
}
