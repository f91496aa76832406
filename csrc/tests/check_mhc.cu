// Standalone check of dsv4::mhc_pre / mhc_post / mhc_head (no torch): random inputs on the GPU
// against CPU loops. hc_post uses the same rounded fp32 operations in the same order, so it
// must match bit for bit; hc_pre / head compute the projection in double on the CPU, so
// post / comb must agree to 2e-5 and u / y to one bf16 rounding. Covers decode (the default
// rule: the decode kernel up to 16 tokens for pre, 8 for head, then the chunked path; the
// decode kernel at every T <= 64 with DSV4_MHC_DECODE=all; the previous path,
// DSV4_MHC_DECODE=old; the decode timings of the two at T = 1, 8, 16, 32, 64), the two-kernel path and chunked prefill (> 512 tokens), dims that
// are no multiple of the 64-wide k tile; every pre / head case runs twice, the second time with
// DSV4_MHC_ONE_PASS=1 (the one-pass cluster kernel at dim 1024 / 2048 / 4096, T > 64). Then
// times both prefill paths at T = 4096 and 16384, dim 4096 (pre and head), with the cluster
// count, and checks that the one-pass kernel is deterministic run to run. The decode kernel v2
// (default: cooperative launch, grid barrier, no zeroing launch) must give v1's bytes
// (DSV4_MHC_DECODE_IMPL=v1) at T = 1..8, dim 4096 / 7168, inputs scaled by 2^0, 2^+-16,
// 2^+-40; both are timed per call (stream and CUDA graph) with v2's phase stamps.
// `--decode-v2` runs only that (plus v2 against the CPU reference), `--decode-only` the decode
// kernel's cases, `--refusal` (alone in its process) the fallbacks of refused path queries and
// cooperative launches (DSV4_TEST_REFUSE=query / launch, test only: v1 instead of v2 with the
// same bytes, the chunked path instead of the one-pass kernel, no error left pending, an error
// the caller left pending never cleared), `--refusal-nofit` (alone in its process) the
// one-pass query's caching: refused (DSV4_TEST_REFUSE=query) it is asked again, answered "no"
// (=nofit: as on a device with too little shared memory) it is not. Build without CMake: nvcc -std=c++17 -O3 -arch=sm_90a -Icsrc/include -Icsrc
// csrc/tests/check_mhc.cu csrc/kernels/mhc.cu -o check_mhc. Prints
// PASS / FAIL (exit 1) or "SKIP: no CUDA device".
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "dsv4/mhc.h"

#include "check_common.h"
#include "../kernels/own_error.cuh"

namespace {

using dsv4_check::bf16_to_float;
using dsv4_check::float_to_bf16;

template <typename T>
T* to_device(const std::vector<T>& v) {
  T* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, std::max<size_t>(v.size(), 1) * sizeof(T)));
  if (!v.empty()) CHECK_CUDA(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
template <typename T>
std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> v(n);
  if (n) CHECK_CUDA(cudaMemcpy(v.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

bool check_post(int T, int d, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 2.f);
  std::uniform_real_distribution<float> ud(0.f, 1.f);
  std::vector<uint16_t> f(static_cast<size_t>(T) * d), x(static_cast<size_t>(T) * 4 * d);
  std::vector<float> post(T * 4), comb(T * 16);
  for (auto& v : f) v = float_to_bf16(nd(rng));
  for (auto& v : x) v = float_to_bf16(nd(rng));
  for (auto& v : post) v = 2 * ud(rng);
  for (auto& v : comb) v = ud(rng);
  std::vector<uint16_t> ref(x.size());
  for (int t = 0; t < T; ++t)
    for (int k = 0; k < 4; ++k)
      for (int c = 0; c < d; ++c) {
        const size_t tx = static_cast<size_t>(t) * 4 * d;
        volatile float s = comb[t * 16 + k] * bf16_to_float(x[tx + c]);  // no contraction
        for (int j = 1; j < 4; ++j) {
          volatile float p = comb[t * 16 + j * 4 + k] * bf16_to_float(x[tx + j * d + c]);
          s = s + p;
        }
        volatile float a = post[t * 4 + k] * bf16_to_float(f[static_cast<size_t>(t) * d + c]);
        ref[tx + k * d + c] = float_to_bf16(a + s);
      }
  uint16_t* df = to_device(f);
  uint16_t* dx = to_device(x);
  float* dp = to_device(post);
  float* dc = to_device(comb);
  uint16_t* dout = to_device(std::vector<uint16_t>(x.size(), 0xFFFF));
  CHECK_CUDA(dsv4::mhc_post(df, d, dx, 4 * d, dp, dc, dout, 4 * d, T, d, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  const bool ok = to_host(dout, x.size()) == ref;
  std::printf("%s post T=%-5d d=%-5d\n", ok ? "ok  " : "FAIL", T, d);
  for (void* p : {static_cast<void*>(df), static_cast<void*>(dx), static_cast<void*>(dp),
                  static_cast<void*>(dc), static_cast<void*>(dout)})
    CHECK_CUDA(cudaFree(p));
  return ok;
}

float sigmoid(float z) { return 1.f / (1.f + std::exp(-z)); }

// hc_pre (head = false) or the head collapse (head = true).
bool check_pre(int T, int d, bool head, std::mt19937& rng) {
  const int K = 4 * d, rows = head ? 4 : 24, iters = 20;
  const float eps = 1e-6f, norm_eps = 1e-6f;
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<uint16_t> x(static_cast<size_t>(T) * K);
  std::vector<float> fn(static_cast<size_t>(rows) * K), scale(head ? 1 : 3), base(rows);
  for (auto& v : x) v = float_to_bf16(2 * nd(rng));
  for (auto& v : fn) v = nd(rng) * 3.f / std::sqrt(float(K));
  for (auto& v : scale) v = 0.5f + std::fabs(nd(rng)) * 0.5f;
  for (auto& v : base) v = 0.5f * nd(rng);
  std::vector<float> ref_u(static_cast<size_t>(T) * d), ref_post(T * 4), ref_comb(T * 16);
  for (int t = 0; t < T; ++t) {
    const uint16_t* xt = x.data() + static_cast<size_t>(t) * K;
    double ss = 0;
    std::vector<double> acc(rows, 0.0);
    for (int c = 0; c < K; ++c) {
      const double v = bf16_to_float(xt[c]);
      ss += v * v;
      for (int r = 0; r < rows; ++r) acc[r] += double(fn[static_cast<size_t>(r) * K + c]) * v;
    }
    const float rr = 1.f / std::sqrt(static_cast<float>(ss / K) + norm_eps);
    float m[24];
    for (int r = 0; r < rows; ++r) m[r] = static_cast<float>(acc[r]) * rr;
    float pre[4];
    for (int i = 0; i < 4; ++i) pre[i] = sigmoid(m[i] * scale[0] + base[i]) + eps;
    if (!head) {
      for (int i = 0; i < 4; ++i) ref_post[t * 4 + i] = 2.f * sigmoid(m[4 + i] * scale[1] + base[4 + i]);
      float c[4][4];
      for (int j = 0; j < 4; ++j) {
        float L[4], mx = -INFINITY, s = 0;
        for (int k = 0; k < 4; ++k) mx = std::max(mx, L[k] = m[8 + 4 * j + k] * scale[2] + base[8 + 4 * j + k]);
        for (int k = 0; k < 4; ++k) s += (c[j][k] = std::exp(L[k] - mx));
        for (int k = 0; k < 4; ++k) c[j][k] = c[j][k] / s + eps;
      }
      auto colnorm = [&]() {
        for (int k = 0; k < 4; ++k) {
          const float s = c[0][k] + c[1][k] + c[2][k] + c[3][k] + eps;
          for (int j = 0; j < 4; ++j) c[j][k] /= s;
        }
      };
      colnorm();
      for (int it = 1; it < iters; ++it) {
        for (int j = 0; j < 4; ++j) {
          const float s = c[j][0] + c[j][1] + c[j][2] + c[j][3] + eps;
          for (int k = 0; k < 4; ++k) c[j][k] /= s;
        }
        colnorm();
      }
      for (int j = 0; j < 4; ++j)
        for (int k = 0; k < 4; ++k) ref_comb[t * 16 + j * 4 + k] = c[j][k];
    }
    for (int c = 0; c < d; ++c) {
      float u = 0;
      for (int i = 0; i < 4; ++i) u += pre[i] * bf16_to_float(xt[i * d + c]);
      ref_u[static_cast<size_t>(t) * d + c] = u;
    }
  }
  uint16_t* dx = to_device(x);
  float* dfn = to_device(fn);
  float* ds = to_device(scale);
  float* db = to_device(base);
  uint16_t* du = to_device(std::vector<uint16_t>(static_cast<size_t>(T) * d, 0xFFFF));
  float* dp = to_device(std::vector<float>(T * 4, NAN));
  float* dc = to_device(std::vector<float>(T * 16, NAN));
  int dev = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  const size_t ws_bytes = dsv4::mhc_pre_workspace_bytes(T, d, dev);
  void* ws = nullptr;
  CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
  if (head) {
    CHECK_CUDA(dsv4::mhc_head(dx, K, dfn, ds, db, norm_eps, eps, du, d, T, d, ws, ws_bytes, nullptr));
  } else {
    CHECK_CUDA(dsv4::mhc_pre(dx, K, dfn, ds, db, norm_eps, iters, eps, du, d, dp, dc, T, d, ws,
                             ws_bytes, nullptr));
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  const auto gu = to_host(du, ref_u.size());
  bool ok = true;
  double max_u = 0, max_pc = 0;
  for (size_t i = 0; i < gu.size(); ++i) {
    const double err = std::fabs(double(bf16_to_float(gu[i])) - ref_u[i]);
    const double tol = std::fabs(ref_u[i]) * (1.0 / 256) * 1.01 + 1e-5;  // one bf16 rounding
    if (!(err <= tol)) ok = false;
    max_u = std::max(max_u, err / (std::fabs(ref_u[i]) + 1e-3));
  }
  if (!head) {
    const auto gp = to_host(dp, ref_post.size());
    const auto gc = to_host(dc, ref_comb.size());
    for (size_t i = 0; i < gp.size(); ++i) {
      const double e = std::fabs(double(gp[i]) - ref_post[i]);
      if (!(e <= 2e-5)) ok = false;
      max_pc = std::max(max_pc, e);
    }
    for (size_t i = 0; i < gc.size(); ++i) {
      const double e = std::fabs(double(gc[i]) - ref_comb[i]);
      if (!(e <= 2e-5)) ok = false;
      max_pc = std::max(max_pc, e);
    }
  }
  const cudaError_t pend = cudaGetLastError();  // the op must leave no error pending
  if (pend != cudaSuccess) ok = false;
  std::printf("%s %s T=%-5d d=%-5d max_rel_u=%.3g max_abs_post_comb=%.3g%s%s\n",
              ok ? "ok  " : "FAIL", head ? "head" : "pre ", T, d, max_u, max_pc,
              pend == cudaSuccess ? "" : " error left pending: ",
              pend == cudaSuccess ? "" : cudaGetErrorName(pend));
  for (void* p : {static_cast<void*>(dx), static_cast<void*>(dfn), static_cast<void*>(ds),
                  static_cast<void*>(db), static_cast<void*>(du), static_cast<void*>(dp),
                  static_cast<void*>(dc), ws})
    CHECK_CUDA(cudaFree(p));
  return ok;
}

// A workspace that is large enough but not 16-byte aligned is refused (cudaErrorInvalidValue)
// by mhc_pre and mhc_head on every path (decode, chunked, one-pass), and nothing is written.
bool check_misaligned_workspace() {
  bool ok = true;
  const int cases[][2] = {{4, 4096}, {100, 128}, {100, 4096}};  // decode, chunked, one-pass
  for (auto& c : cases) {
    const int T = c[0], d = c[1], K = 4 * d;
    uint16_t* dx = to_device(std::vector<uint16_t>(static_cast<size_t>(T) * K, 0x3F80));  // 1.0
    float* dfn = to_device(std::vector<float>(static_cast<size_t>(24) * K, 0.01f));
    float* ds = to_device(std::vector<float>(3, 1.f));
    float* db = to_device(std::vector<float>(24, 0.f));
    uint16_t* du = to_device(std::vector<uint16_t>(static_cast<size_t>(T) * d, 0xFFFF));
    float* dp = to_device(std::vector<float>(T * 4, NAN));
    float* dc = to_device(std::vector<float>(T * 16, NAN));
    int dev = 0;
    CHECK_CUDA(cudaGetDevice(&dev));
    const size_t ws_bytes = dsv4::mhc_pre_workspace_bytes(T, d, dev);
    char* ws = nullptr;
    CHECK_CUDA(cudaMalloc(&ws, ws_bytes + 16));
    const cudaError_t e_pre = dsv4::mhc_pre(dx, K, dfn, ds, db, 1e-6f, 20, 1e-6f, du, d, dp, dc,
                                            T, d, ws + 4, ws_bytes, nullptr);
    const cudaError_t e_head = dsv4::mhc_head(dx, K, dfn, ds, db, 1e-6f, 1e-6f, du, d, T, d,
                                              ws + 8, ws_bytes, nullptr);
    const cudaError_t e_ok = dsv4::mhc_pre(dx, K, dfn, ds, db, 1e-6f, 20, 1e-6f, du, d, dp, dc,
                                           T, d, ws + 16, ws_bytes, nullptr);  // aligned: runs
    CHECK_CUDA(cudaDeviceSynchronize());
    const bool this_ok = e_pre == cudaErrorInvalidValue && e_head == cudaErrorInvalidValue &&
                         e_ok == cudaSuccess;
    std::printf("%s misaligned workspace refused T=%-5d d=%-5d (pre %d, head %d, aligned %d)\n",
                this_ok ? "ok  " : "FAIL", T, d, static_cast<int>(e_pre),
                static_cast<int>(e_head), static_cast<int>(e_ok));
    ok &= this_ok;
    for (void* p : {static_cast<void*>(dx), static_cast<void*>(dfn), static_cast<void*>(ds),
                    static_cast<void*>(db), static_cast<void*>(du), static_cast<void*>(dp),
                    static_cast<void*>(dc), static_cast<void*>(ws)})
      CHECK_CUDA(cudaFree(p));
  }
  return ok;
}

// Deterministic pseudo-random bf16 in about [-4, 4) (device fill: the timing cases are too
// large for a host generator).
__global__ void fill_bf16(uint16_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    const float v = (static_cast<float>(h & 0xFFFF) / 65536.f - 0.5f) * 8.f;
    uint32_t b;
    std::memcpy(&b, &v, 4);
    p[i] = static_cast<uint16_t>(b >> 16);
  }
}

// Inputs, two output buffers and the workspace of one mhc_pre / mhc_head timing case at (T, d)
// (random bf16 x from `x_seed`, random fn / base from `rng_seed`), freed on destruction. The
// timing checks below share it.
struct TimedCase {
  int T, d;
  bool head;
  size_t K, ws_bytes = 0;
  uint16_t* dx = nullptr;
  float *dfn = nullptr, *ds = nullptr, *db = nullptr;
  uint16_t* du[2] = {nullptr, nullptr};
  float *dp[2] = {nullptr, nullptr}, *dc[2] = {nullptr, nullptr};
  void* ws = nullptr;
  cudaEvent_t e0 = nullptr, e1 = nullptr;

  TimedCase(int T_, int d_, bool head_, uint32_t x_seed, int x_blocks, unsigned rng_seed)
      : T(T_), d(d_), head(head_), K(4 * size_t(d_)) {
    CHECK_CUDA(cudaMalloc(&dx, size_t(T) * K * 2));
    fill_bf16<<<x_blocks, 256>>>(dx, size_t(T) * K, x_seed);
    std::vector<float> fn(24 * K), scale = {0.7f, 0.9f, 1.1f}, base(24);
    std::mt19937 rng(rng_seed);
    std::normal_distribution<float> nd(0.f, 0.02f);
    for (auto& v : fn) v = nd(rng);
    for (auto& v : base) v = 10 * nd(rng);
    dfn = to_device(fn);
    ds = to_device(scale);
    db = to_device(base);
    for (int r = 0; r < 2; ++r) {
      CHECK_CUDA(cudaMalloc(&du[r], size_t(T) * d * 2));
      CHECK_CUDA(cudaMalloc(&dp[r], size_t(T) * 4 * 4));
      CHECK_CUDA(cudaMalloc(&dc[r], size_t(T) * 16 * 4));
    }
    int dev = 0;
    CHECK_CUDA(cudaGetDevice(&dev));
    ws_bytes = dsv4::mhc_pre_workspace_bytes(T, d, dev);
    CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
    CHECK_CUDA(cudaEventCreate(&e0));
    CHECK_CUDA(cudaEventCreate(&e1));
  }
  TimedCase(const TimedCase&) = delete;
  TimedCase& operator=(const TimedCase&) = delete;
  ~TimedCase() {
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    for (void* p : {static_cast<void*>(dx), static_cast<void*>(dfn), static_cast<void*>(ds),
                    static_cast<void*>(db), static_cast<void*>(du[0]), static_cast<void*>(du[1]),
                    static_cast<void*>(dp[0]), static_cast<void*>(dp[1]),
                    static_cast<void*>(dc[0]), static_cast<void*>(dc[1]), ws})
      cudaFree(p);
  }

  // One call of the op into output buffer r.
  cudaError_t run(int r) const {
    return head ? dsv4::mhc_head(dx, K, dfn, ds, db, 1e-6f, 1e-6f, du[r], d, T, d, ws, ws_bytes,
                                 nullptr)
                : dsv4::mhc_pre(dx, K, dfn, ds, db, 1e-6f, 20, 1e-6f, du[r], d, dp[r], dc[r], T,
                                d, ws, ws_bytes, nullptr);
  }

  // Mean µs of `reps` back-to-back calls into buffer 0 after 3 warm-up calls (the path the
  // environment selects now); `ok` false on a launch error.
  float time_us(int reps, bool& ok) const {
    for (int w = 0; w < 3; ++w) ok &= run(0) == cudaSuccess;
    CHECK_CUDA(cudaEventRecord(e0));
    for (int i = 0; i < reps; ++i) ok &= run(0) == cudaSuccess;
    CHECK_CUDA(cudaEventRecord(e1));
    CHECK_CUDA(cudaEventSynchronize(e1));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    return ms * 1000.f / reps;
  }

  // Run-to-run determinism: a fresh call into the poisoned buffer 1 must give the same bytes
  // of u (and post / comb) as the last call into buffer 0.
  bool rerun_matches(bool& ok) const {
    CHECK_CUDA(cudaMemset(du[1], 0xFF, size_t(T) * d * 2));
    CHECK_CUDA(cudaMemset(dp[1], 0xFF, size_t(T) * 4 * 4));
    CHECK_CUDA(cudaMemset(dc[1], 0xFF, size_t(T) * 16 * 4));
    ok &= run(1) == cudaSuccess;
    CHECK_CUDA(cudaDeviceSynchronize());
    bool same = to_host(du[0], size_t(T) * d) == to_host(du[1], size_t(T) * d);
    if (!head)
      same = same && to_host(dp[0], size_t(T) * 4) == to_host(dp[1], size_t(T) * 4) &&
             to_host(dc[0], size_t(T) * 16) == to_host(dc[1], size_t(T) * 16);
    ok &= same;
    return same;
  }
};

// Prefill timing of mhc_pre / mhc_head at (T, d), the chunked path and then the one-pass kernel
// (DSV4_MHC_ONE_PASS=0 / 1, the same inputs), and the one-pass result's run-to-run
// determinism: a second run must give the same bytes of u, post and comb. Informational times
// (HBM floor: x read once + u written); the check fails only on an error or a nondeterminism.
bool time_prefill(int T, int d, bool head, bool check_determinism) {
  const TimedCase c(T, d, head, 77u, 1024, 99);
  bool ok = true;
  float us[2] = {0, 0};
  for (int one_pass = 0; one_pass < 2; ++one_pass) {
    setenv("DSV4_MHC_ONE_PASS", one_pass ? "1" : "0", 1);
    us[one_pass] = c.time_us(20, ok);
  }
  // DSV4_MHC_ONE_PASS is still 1: run 0's outputs vs a fresh run 1
  const bool same = check_determinism ? c.rerun_matches(ok) : true;
  CHECK_CUDA(cudaDeviceSynchronize());
  const double bytes =
      double(T) * c.K * 2 + double(T) * d * 2 + (head ? 0.0 : double(T) * 20 * 4);
  std::printf("%s time %s T=%-5d d=%-5d chunked %.1f us, one-pass %.1f us = %.2f TB/s (x read "
              "once + u%s; floor at 3.35 TB/s H100 / 4.22 TB/s H200: %.1f / %.1f us), %d "
              "clusters of 16%s\n",
              ok ? "ok  " : "FAIL", head ? "head" : "pre ", T, d, us[0], us[1],
              bytes / (us[1] * 1e-6) / 1e12, head ? "" : " + post/comb", bytes / 3.35e6,
              bytes / 4.22e6, dsv4::mhc_prefill_clusters(d, head),
              check_determinism ? (same ? ", one-pass deterministic run to run"
                                        : ", ONE-PASS NOT DETERMINISTIC")
                                : "");
  return ok;
}

// Decode timing of mhc_pre / mhc_head at (T, d): the decode kernel (DSV4_MHC_DECODE=all), then
// the previous path (DSV4_MHC_DECODE=old: the fused mix kernel or the chunked path; the default
// rule picks one of the two), back-to-back stream launches on the same inputs (fn stays in L2, so
// these are below a model's, where each layer's fn comes from HBM; bench_mhc rotates fn), and
// the decode kernel's run-to-run determinism. Informational times; fails only on an error or a
// nondeterminism.
bool time_decode(int T, int d, bool head) {
  const TimedCase c(T, d, head, 55u, 64, 7);
  bool ok = true;
  float us[2] = {0, 0};
  for (int old = 0; old < 2; ++old) {
    setenv("DSV4_MHC_DECODE", old ? "old" : "all", 1);
    us[old] = c.time_us(100, ok);
  }
  setenv("DSV4_MHC_DECODE", "all", 1);
  // the decode kernel with each group size (DSV4_MHC_DECODE_GROUP; the default picks one)
  char group_times[160] = "";
  for (int g = 1; g <= 8 && g <= T; g *= 2) {
    char gv[2] = {static_cast<char>('0' + g), '\0'};
    setenv("DSV4_MHC_DECODE_GROUP", gv, 1);
    const float t = c.time_us(100, ok);
    const size_t len = std::strlen(group_times);
    std::snprintf(group_times + len, sizeof(group_times) - len, " %d: %.2f", g, t);
  }
  unsetenv("DSV4_MHC_DECODE_GROUP");
  ok &= c.run(0) == cudaSuccess;  // the decode kernel's outputs in buffer 0, then a fresh run
  const bool same = c.rerun_matches(ok);
  unsetenv("DSV4_MHC_DECODE");
  std::printf("%s time %s T=%-3d d=%-5d decode kernel %.2f us, previous path (DSV4_MHC_DECODE=old)"
              " %.2f us (stream launches, fn L2-resident); tokens per group (us):%s%s\n",
              ok ? "ok  " : "FAIL", head ? "head" : "pre ", T, d, us[0], us[1], group_times,
              same ? "; deterministic run to run" : "; DECODE KERNEL NOT DETERMINISTIC");
  return ok;
}

// Decode kernel v2 (the default: cooperative launch, grid barrier, no zeroing launch) against
// v1 (DSV4_MHC_DECODE_IMPL=v1: arrival counters zeroed by a separate launch) on the same inputs:
// u, post and comb must be the same bytes. `mag` scales x by 2^mag per token (large / small
// magnitudes: the rsqrt normalises them away, but Σx̂² and the mixes' rounding see them), fn by
// 2^-mag (so the mixes stay in the range where the Sinkhorn is not one-hot for every token).
bool check_decode_v1_v2(int T, int d, bool head, int mag, std::mt19937& rng) {
  const int K = 4 * d, rows = head ? 4 : 24;
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<uint16_t> x(static_cast<size_t>(T) * K);
  std::vector<float> fn(static_cast<size_t>(rows) * K), scale(head ? 1 : 3), base(rows);
  for (int t = 0; t < T; ++t) {
    const float s = std::ldexp(1.f, (t % 2 == 0 ? mag : -mag));  // alternate big / small tokens
    for (int c = 0; c < K; ++c) x[static_cast<size_t>(t) * K + c] = float_to_bf16(s * 2 * nd(rng));
  }
  for (auto& v : fn) v = std::ldexp(nd(rng) * 3.f / std::sqrt(float(K)), -mag / 4);
  for (auto& v : scale) v = 0.5f + std::fabs(nd(rng)) * 0.5f;
  for (auto& v : base) v = 0.5f * nd(rng);
  uint16_t* dx = to_device(x);
  float* dfn = to_device(fn);
  float* ds = to_device(scale);
  float* db = to_device(base);
  int dev = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  const size_t ws_bytes = dsv4::mhc_pre_workspace_bytes(T, d, dev);
  void* ws = nullptr;
  CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
  std::vector<uint16_t> u[2];
  std::vector<float> post[2], comb[2];
  for (int v = 0; v < 2; ++v) {  // 0: v1, 1: v2
    if (v == 0) setenv("DSV4_MHC_DECODE_IMPL", "v1", 1);
    else unsetenv("DSV4_MHC_DECODE_IMPL");
    CHECK_CUDA(cudaMemset(ws, 0x5A, ws_bytes));  // garbage counters: v1 zeroes them, v2 needs none
    uint16_t* du = to_device(std::vector<uint16_t>(static_cast<size_t>(T) * d, 0xFFFF));
    float* dp = to_device(std::vector<float>(T * 4, NAN));
    float* dc = to_device(std::vector<float>(T * 16, NAN));
    if (head)
      CHECK_CUDA(dsv4::mhc_head(dx, K, dfn, ds, db, 1e-6f, 1e-6f, du, d, T, d, ws, ws_bytes,
                                nullptr));
    else
      CHECK_CUDA(dsv4::mhc_pre(dx, K, dfn, ds, db, 1e-6f, 20, 1e-6f, du, d, dp, dc, T, d, ws,
                               ws_bytes, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    u[v] = to_host(du, static_cast<size_t>(T) * d);
    post[v] = to_host(dp, T * 4);
    comb[v] = to_host(dc, T * 16);
    for (void* q : {static_cast<void*>(du), static_cast<void*>(dp), static_cast<void*>(dc)})
      CHECK_CUDA(cudaFree(q));
  }
  unsetenv("DSV4_MHC_DECODE_IMPL");
  const auto bytes_eq = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
  };
  const bool ok = u[0] == u[1] && bytes_eq(post[0], post[1]) && bytes_eq(comb[0], comb[1]);
  std::printf("%s decode v2 == v1 bit for bit %s T=%-2d d=%-5d x scale 2^+-%d\n", ok ? "ok  " : "FAIL",
              head ? "head" : "pre ", T, d, mag);
  for (void* q : {static_cast<void*>(dx), static_cast<void*>(dfn), static_cast<void*>(ds),
                  static_cast<void*>(db), ws})
    CHECK_CUDA(cudaFree(q));
  return ok;
}

// Per-call µs of v1 and v2 of the decode kernel at (T, d): back-to-back launches on a stream
// (cudaEvent over `reps` calls) and the same calls captured in a CUDA graph (one graph of
// `reps` calls, replayed; the environment is read at capture, so each graph keeps its kernel).
// fn stays in L2 here (a model's layers read it from HBM). Then v2's phase stamps
// (DSV4_MHC_DECODE_STAMPS=1), averaged over 50 calls: the finisher CTA's %globaltimer (ns)
// and clock64 (cycles) deltas from its start. Informational; fails only on an error.
bool bench_decode_impl(int T, int d, bool head) {
  const TimedCase c(T, d, head, 31u, 64, 5);
  bool ok = true;
  cudaStream_t s = nullptr;
  CHECK_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  const auto call = [&]() {
    return head ? dsv4::mhc_head(c.dx, c.K, c.dfn, c.ds, c.db, 1e-6f, 1e-6f, c.du[0], d, T, d,
                                 c.ws, c.ws_bytes, s)
                : dsv4::mhc_pre(c.dx, c.K, c.dfn, c.ds, c.db, 1e-6f, 20, 1e-6f, c.du[0], d,
                                c.dp[0], c.dc[0], T, d, c.ws, c.ws_bytes, s);
  };
  constexpr int reps = 200;
  float us[2][2] = {{0, 0}, {0, 0}};  // [v1, v2][stream, graph]
  for (int v = 0; v < 2; ++v) {
    if (v == 0) setenv("DSV4_MHC_DECODE_IMPL", "v1", 1);
    else unsetenv("DSV4_MHC_DECODE_IMPL");
    for (int w = 0; w < 10; ++w) ok &= call() == cudaSuccess;
    CHECK_CUDA(cudaEventRecord(c.e0, s));
    for (int i = 0; i < reps; ++i) ok &= call() == cudaSuccess;
    CHECK_CUDA(cudaEventRecord(c.e1, s));
    CHECK_CUDA(cudaEventSynchronize(c.e1));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, c.e0, c.e1));
    us[v][0] = ms * 1000.f / reps;
    cudaGraph_t g = nullptr;
    cudaGraphExec_t ge = nullptr;
    CHECK_CUDA(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < reps; ++i) ok &= call() == cudaSuccess;
    CHECK_CUDA(cudaStreamEndCapture(s, &g));
    CHECK_CUDA(cudaGraphInstantiate(&ge, g, 0));
    CHECK_CUDA(cudaGraphLaunch(ge, s));  // warm-up replay
    CHECK_CUDA(cudaEventRecord(c.e0, s));
    for (int r = 0; r < 3; ++r) CHECK_CUDA(cudaGraphLaunch(ge, s));
    CHECK_CUDA(cudaEventRecord(c.e1, s));
    CHECK_CUDA(cudaEventSynchronize(c.e1));
    CHECK_CUDA(cudaEventElapsedTime(&ms, c.e0, c.e1));
    us[v][1] = ms * 1000.f / (3 * reps);
    CHECK_CUDA(cudaGraphExecDestroy(ge));
    CHECK_CUDA(cudaGraphDestroy(g));
  }
  // v2's phase stamps
  setenv("DSV4_MHC_DECODE_STAMPS", "1", 1);
  const size_t off = dsv4::mhc_decode_stamp_offset(T, d);  // the kernel file's own formula
  double ns[8] = {0}, cyc[8] = {0};
  constexpr int kStampRuns = 50;
  for (int r = 0; r < kStampRuns; ++r) {
    ok &= call() == cudaSuccess;
    CHECK_CUDA(cudaStreamSynchronize(s));
    unsigned long long st[16];
    CHECK_CUDA(cudaMemcpy(st, static_cast<char*>(c.ws) + off, sizeof(st), cudaMemcpyDeviceToHost));
    for (int i = 1; i < 7; ++i) {
      ns[i] += (st[i] >= st[0] ? double(st[i] - st[0]) : 0.0) / kStampRuns;
      if (i != 6) cyc[i] += (st[8 + i] >= st[8] ? double(st[8 + i] - st[8]) : 0.0) / kStampRuns;
    }
  }
  unsetenv("DSV4_MHC_DECODE_STAMPS");
  CHECK_CUDA(cudaStreamSynchronize(s));
  CHECK_CUDA(cudaStreamDestroy(s));
  std::printf("%s bench decode %s T=%-2d d=%-5d per call: v1 (zeroing launch + counters) %.2f us "
              "stream / %.2f us graph; v2 (cooperative, grid barrier) %.2f us stream / %.2f us "
              "graph (fn L2-resident)\n",
              ok ? "ok  " : "FAIL", head ? "head" : "pre ", T, d, us[0][0], us[0][1], us[1][0],
              us[1][1]);
  std::printf("     v2 phases of CTA 0 from its start, ns (cycles): partials stored %.0f (%.0f), "
              "past grid barrier %.0f (%.0f), split sums %.0f (%.0f), pre %.0f (%.0f), Sinkhorn "
              "done %.0f (%.0f), collapse done %.0f\n",
              ns[1], cyc[1], ns[2], cyc[2], ns[3], cyc[3], ns[4], cyc[4], ns[5], cyc[5], ns[6]);
  return ok;
}

// ---------------------------------------------------------------------------------------------
// --refusal: the fallback paths of refused queries and launches (DSV4_TEST_REFUSE, test only,
// csrc/kernels/own_error.cuh), in a fresh process (the queries must not be cached yet)
// ---------------------------------------------------------------------------------------------

// One call into buffer r of a TimedCase, its outputs poisoned (0xFF: NaN post / comb) and its
// workspace filled with 0x5A first, v2's phase stamps on: the call's return, the error left
// pending after it (read and cleared), whether v2 ran (its first stamp was written) and the
// outputs' bytes. pend_first: leave cudaErrorInvalidValue pending before the call, as an
// unrelated earlier launch of the caller could (the code DSV4_TEST_REFUSE's failures have too).
struct CallResult {
  cudaError_t ret = cudaSuccess, pending = cudaSuccess;
  bool injected = true, v2 = false;
  std::vector<uint16_t> u;
  std::vector<float> post, comb;
};
CallResult poisoned_call(const TimedCase& c, int r, bool pend_first) {
  const size_t T = c.T;
  CHECK_CUDA(cudaMemset(c.du[r], 0xFF, T * c.d * 2));
  CHECK_CUDA(cudaMemset(c.dp[r], 0xFF, T * 4 * 4));
  CHECK_CUDA(cudaMemset(c.dc[r], 0xFF, T * 16 * 4));
  CHECK_CUDA(cudaMemset(c.ws, 0x5A, c.ws_bytes));
  CHECK_CUDA(cudaDeviceSynchronize());
  setenv("DSV4_MHC_DECODE_STAMPS", "1", 1);
  CallResult o;
  if (pend_first) {
    (void)dsv4::refused_for_test();  // the failing call DSV4_TEST_REFUSE uses
    o.injected = cudaPeekAtLastError() == cudaErrorInvalidValue;
  }
  o.ret = c.run(r);
  o.pending = cudaGetLastError();
  unsetenv("DSV4_MHC_DECODE_STAMPS");
  CHECK_CUDA(cudaDeviceSynchronize());
  const size_t off = dsv4::mhc_decode_stamp_offset(c.T, c.d);
  if (off + 8 <= c.ws_bytes) {
    unsigned long long st0 = 0;
    CHECK_CUDA(cudaMemcpy(&st0, static_cast<char*>(c.ws) + off, 8, cudaMemcpyDeviceToHost));
    o.v2 = st0 != 0x5A5A5A5A5A5A5A5Aull;
  }
  o.u = to_host(c.du[r], T * c.d);
  if (!c.head) {
    o.post = to_host(c.dp[r], T * 4);
    o.comb = to_host(c.dc[r], T * 16);
  }
  return o;
}

bool same_bytes(const CallResult& a, const CallResult& b) {
  const auto eq = [](const std::vector<float>& x, const std::vector<float>& y) {
    return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * 4) == 0;
  };
  return a.u == b.u && eq(a.post, b.post) && eq(a.comb, b.comb);
}

// A call made with an error already pending (pend_first): that error must reach the caller,
// returned by the call or still pending after it; the launcher may not clear it.
bool check_pending_kept(const TimedCase& c, const char* what) {
  const CallResult r = poisoned_call(c, 1, true);
  const bool ok = r.injected && (r.ret == cudaErrorInvalidValue ||
                                 r.pending == cudaErrorInvalidValue);
  std::printf("%s refusal: error pending before the call kept (%s %s T=%-2d d=%d): returned %s, "
              "pending after %s%s\n",
              ok ? "ok  " : "FAIL", what, c.head ? "head" : "pre ", c.T, c.d,
              cudaGetErrorName(r.ret), cudaGetErrorName(r.pending),
              r.injected ? "" : " (COULD NOT LEAVE AN ERROR PENDING)");
  return ok;
}

// One decode case's call in a phase: no error returned or left pending, v2 ran or not as
// expected, and (ref != nullptr) the same bytes as ref.
bool check_decode_call(const TimedCase& c, const char* phase, bool expect_v2,
                       const CallResult* ref, CallResult* keep) {
  CallResult r = poisoned_call(c, 0, false);
  const bool same = ref == nullptr || same_bytes(r, *ref);
  const bool ok = r.ret == cudaSuccess && r.pending == cudaSuccess && r.v2 == expect_v2 && same;
  std::printf("%s refusal: %-34s decode %s T=%-2d d=%-5d returned %s, pending after %s, ran %s "
              "(expected %s)%s\n",
              ok ? "ok  " : "FAIL", phase, c.head ? "head" : "pre ", c.T, c.d,
              cudaGetErrorName(r.ret), cudaGetErrorName(r.pending), r.v2 ? "v2" : "v1",
              expect_v2 ? "v2" : "v1",
              ref == nullptr ? "" : same ? ", same bytes as the default path" : ", BYTES DIFFER");
  if (keep != nullptr) *keep = std::move(r);
  return ok;
}

bool refusal_suite(std::mt19937& rng) {
  bool ok = true;
  unsetenv("DSV4_MHC_ONE_PASS");  // the defaults: one-pass prefill, decode v2
  unsetenv("DSV4_MHC_DECODE");
  unsetenv("DSV4_MHC_DECODE_IMPL");
  unsetenv("DSV4_MHC_DECODE_GROUP");
  // decode cases (T <= 16 pre, <= 8 head: the decode kernel; groups of 1, 4 and 8 CTAs' worth)
  const int dec[][3] = {{1, 4096, 0}, {4, 4096, 1}, {8, 7168, 0}, {16, 4096, 0}, {8, 4096, 1}};
  constexpr int kDec = sizeof(dec) / sizeof(dec[0]);
  std::vector<std::unique_ptr<TimedCase>> cs;
  for (auto& c : dec)
    cs.emplace_back(new TimedCase(c[0], c[1], c[2] != 0, 1000u + c[0], 64, 7u + c[0]));
  const TimedCase prefill(100, 4096, false, 555u, 256, 3u);  // one-pass eligible (T > 64)
  CHECK_CUDA(cudaDeviceSynchronize());
  const auto prefill_cases = [&](const char* phase) {
    std::printf("  %s: prefill (the one-pass kernel, or the chunked path when its query "
                "failed) and decode against the CPU reference\n", phase);
    bool k = true;
    for (bool head : {false, true}) {
      k &= check_pre(100, 4096, head, rng);
      k &= check_pre(1000, 2048, head, rng);
      k &= check_pre(4, 4096, head, rng);
    }
    return k;
  };
  CallResult q[kDec], n[kDec];

  // A: DSV4_TEST_REFUSE=query before any query is cached: every path query fails (not cached),
  // so the decode calls run v1 and the prefill calls the chunked path
  setenv("DSV4_TEST_REFUSE", "query", 1);
  std::printf("-- DSV4_TEST_REFUSE=query (no query cached yet)\n");
  ok &= check_pending_kept(*cs[0], "query refused,");
  ok &= check_pending_kept(prefill, "query refused,");
  const int c0[2] = {dsv4::mhc_prefill_clusters(4096, false), dsv4::mhc_prefill_clusters(4096, true)};
  const bool c0_ok = c0[0] == 0 && c0[1] == 0 && cudaGetLastError() == cudaSuccess;
  std::printf("%s refusal: query refused: mhc_prefill_clusters pre %d head %d (expected 0 0, "
              "nothing pending)\n", c0_ok ? "ok  " : "FAIL", c0[0], c0[1]);
  ok &= c0_ok;
  for (int i = 0; i < kDec; ++i)
    ok &= check_decode_call(*cs[i], "query refused:", false, nullptr, &q[i]);
  ok &= prefill_cases("query refused");

  // B: unset: the queries succeed now (the failed ones were not cached): v2, one-pass; the
  // decode outputs are v1's bytes under A (v2 == v1 bit for bit, check_decode_v1_v2)
  unsetenv("DSV4_TEST_REFUSE");
  std::printf("-- DSV4_TEST_REFUSE unset (default paths)\n");
  const int c1[2] = {dsv4::mhc_prefill_clusters(4096, false), dsv4::mhc_prefill_clusters(4096, true)};
  const bool c1_ok = c1[0] > 0 && c1[1] > 0 && cudaGetLastError() == cudaSuccess;
  std::printf("%s refusal: default: mhc_prefill_clusters pre %d head %d (expected > 0: the "
              "failed query was asked again)\n", c1_ok ? "ok  " : "FAIL", c1[0], c1[1]);
  ok &= c1_ok;
  for (int i = 0; i < kDec; ++i)
    ok &= check_decode_call(*cs[i], "default:", true, &q[i], &n[i]);
  ok &= prefill_cases("default");

  // C: DSV4_TEST_REFUSE=launch: the cooperative launch is refused by the runtime
  // (cudaErrorCooperativeLaunchTooLarge), the call runs v1 and marks the device refused
  setenv("DSV4_TEST_REFUSE", "launch", 1);
  std::printf("-- DSV4_TEST_REFUSE=launch (the cooperative decode launch refused)\n");
  // with an error pending the launcher does not try the cooperative launch (it runs v1 and
  // leaves the caller's error); this does not mark the device
  ok &= check_pending_kept(*cs[1], "launch refused,");
  // the first case meets the forced refusal and marks the device; the others then run v1
  // without trying (same bytes either way)
  for (int i = 0; i < kDec; ++i)
    ok &= check_decode_call(*cs[i], i == 0 ? "launch refused:" : "marked refused:", false,
                            &n[i], nullptr);

  // D: unset again: the device stays marked refused for the process, so v1 runs directly
  unsetenv("DSV4_TEST_REFUSE");
  std::printf("-- DSV4_TEST_REFUSE unset after a refusal (v1 for the rest of the process)\n");
  for (int i = 0; i < kDec; ++i)
    ok &= check_decode_call(*cs[i], "after a refusal:", false, &n[i], nullptr);
  ok &= prefill_cases("after a refusal");
  return ok;
}

// --refusal-nofit: a failed one-pass query is asked again at the next call, a successful "no"
// is cached (not asked again). mhc_pre's query (wide_clusters<3>) goes through the three
// phases; mhc_head's (wide_clusters<1>) is first asked in the last one. Each phase also runs
// prefill cases against the CPU reference (the chunked path while the answer is 0).
bool nofit_suite(std::mt19937& rng) {
  bool ok = true;
  unsetenv("DSV4_MHC_ONE_PASS");
  const auto phase = [&](const char* env, const char* what, bool pre_yes, bool ask_head) {
    if (env != nullptr) setenv("DSV4_TEST_REFUSE", env, 1);
    else unsetenv("DSV4_TEST_REFUSE");
    std::printf("-- DSV4_TEST_REFUSE=%s\n", env != nullptr ? env : "(unset)");
    const int pre = dsv4::mhc_prefill_clusters(4096, false);
    const int head = ask_head ? dsv4::mhc_prefill_clusters(4096, true) : -1;
    const cudaError_t pend = cudaGetLastError();
    const bool k = (pre_yes ? pre > 0 : pre == 0) && (!ask_head || head > 0) && pend == cudaSuccess;
    std::printf("%s nofit: %s: mhc_prefill_clusters pre %d (expected %s)", k ? "ok  " : "FAIL",
                what, pre, pre_yes ? "> 0" : "0");
    if (ask_head) std::printf(", head %d (expected > 0)", head);
    std::printf(", pending after %s\n", cudaGetErrorName(pend));
    ok &= k;
    ok &= check_pre(100, 4096, false, rng);  // one-pass eligible: chunked while pre is 0
    ok &= check_pre(1000, 2048, false, rng);
  };
  phase("query", "query refused (not cached)", false, false);
  phase("nofit", "answered no (cached)", false, false);
  phase(nullptr, "unset: pre keeps the cached no, head asked now", false, true);
  phase("query", "query refused again: both cached, no query made", false, true);
  unsetenv("DSV4_TEST_REFUSE");
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  int n_dev = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
    std::printf("SKIP: no CUDA device\n");
    return 0;
  }
  std::mt19937 rng(4321);
  bool ok = true;
  // --decode-only: the decode kernel's cases and group sizes, no timing (short enough for
  // compute-sanitizer)
  // --decode-v2: the decode kernel v2 against v1 bit for bit and against the CPU reference at
  // T = 1..8, dim 4096 / 7168, then v1 vs v2 timings and v2's phase stamps (a minute or less)
  if (argc > 1 && std::strcmp(argv[1], "--decode-v2") == 0) {
    for (int d : {4096, 7168})
      for (int T : {1, 2, 3, 4, 7, 8})
        for (bool head : {false, true}) {
          for (int mag : {0, 16, 40}) ok &= check_decode_v1_v2(T, d, head, mag, rng);
          ok &= check_pre(T, d, head, rng);  // v2 (the default) vs the CPU reference
        }
    for (int d : {4096, 7168})
      for (int T : {1, 2, 4, 8})
        for (bool head : {false, true}) ok &= bench_decode_impl(T, d, head);
    std::printf("%s\n", ok ? "PASS" : "FAIL");
    return ok ? 0 : 1;
  }
  // --refusal: the fallbacks of refused path queries and cooperative launches
  // (DSV4_TEST_REFUSE=query / launch; must run first in its process, before any query is cached)
  if (argc > 1 && std::strcmp(argv[1], "--refusal") == 0) {
    ok = refusal_suite(rng);
    std::printf("%s\n", ok ? "PASS" : "FAIL");
    return ok ? 0 : 1;
  }
  // --refusal-nofit: the one-pass query's caching (refused: asked again; "no": cached)
  if (argc > 1 && std::strcmp(argv[1], "--refusal-nofit") == 0) {
    ok = nofit_suite(rng);
    std::printf("%s\n", ok ? "PASS" : "FAIL");
    return ok ? 0 : 1;
  }
  if (argc > 1 && std::strcmp(argv[1], "--decode-only") == 0) {
    const int dec_cases[][2] = {{1, 4096}, {2, 4096}, {8, 4096}, {13, 4096}, {63, 4096},
                                {64, 4096}, {64, 136}, {3, 8}, {1, 7168}};
    setenv("DSV4_MHC_DECODE", "all", 1);  // the decode kernel at every T here, both ops
    for (const char* g : {"", "1", "3", "8"}) {
      if (g[0] != '\0') setenv("DSV4_MHC_DECODE_GROUP", g, 1);
      std::printf("DSV4_MHC_DECODE_GROUP=%s\n", g[0] != '\0' ? g : "(default)");
      for (auto& c : dec_cases)
        for (bool head : {false, true}) ok &= check_pre(c[0], c[1], head, rng);
    }
    unsetenv("DSV4_MHC_DECODE_GROUP");
    unsetenv("DSV4_MHC_DECODE");
    std::printf("%s\n", ok ? "PASS" : "FAIL");
    return ok ? 0 : 1;
  }
  const int post_cases[][2] = {{1, 4096}, {5, 4096}, {300, 136}, {3, 13}};
  for (auto& c : post_cases) ok &= check_post(c[0], c[1], rng);
  std::printf("one-pass prefill kernel (DSV4_MHC_ONE_PASS=1), clusters of 16 CTAs it runs with "
              "(0 = the chunked path runs): pre dim 4096: %d, head dim 4096: %d, dim 1024: %d, "
              "dim 128: %d\n",
              dsv4::mhc_prefill_clusters(4096, false), dsv4::mhc_prefill_clusters(4096, true),
              dsv4::mhc_prefill_clusters(1024, false), dsv4::mhc_prefill_clusters(128, false));
  // T <= 16 (pre) / 8 (head): the decode kernel (groups of min(T, 4) with a short last one: 7,
  // 13); up to 64 the chunked path; T > 64: the chunked two-phase path, or with
  // DSV4_MHC_ONE_PASS=1 at dim 1024 / 2048 / 4096 the one-pass (cluster) kernel, with partial
  // last tiles (T % 32 != 0), one tile per cluster and several, through both mbarrier parities
  // many times (T = 1000, 2000, 4100).
  const int pre_cases[][2] = {{1, 4096}, {8, 4096}, {9, 128}, {70, 136}, {600, 256},
                              {9, 4096}, {77, 1024}, {100, 2048}, {1000, 4096}, {4100, 1024},
                              {65, 4096}, {2000, 2048}, {2, 4096}, {7, 4096}, {13, 4096},
                              {63, 4096}, {64, 4096}, {64, 136}, {3, 8}, {1, 7168}};
  for (const char* one_pass : {"0", "1"}) {
    setenv("DSV4_MHC_ONE_PASS", one_pass, 1);
    std::printf("DSV4_MHC_ONE_PASS=%s\n", one_pass);
    for (auto& c : pre_cases)
      for (bool head : {false, true}) ok &= check_pre(c[0], c[1], head, rng);
    ok &= check_misaligned_workspace();
  }
  // the previous decode path (DSV4_MHC_DECODE=old: the fused mix kernel at T <= 8, the chunked
  // path above) and the decode kernel at every T <= 64 (DSV4_MHC_DECODE=all: groups of
  // min(T, 4) up to T = 32, then of ceil(T / 8), with a short last one: 63) stay selectable:
  // their cases again
  for (const char* mode : {"old", "all"}) {
    setenv("DSV4_MHC_DECODE", mode, 1);
    std::printf("DSV4_MHC_DECODE=%s\n", mode);
    for (auto& c : pre_cases)
      if (c[0] <= 64)
        for (bool head : {false, true}) ok &= check_pre(c[0], c[1], head, rng);
  }
  // the decode kernel (DSV4_MHC_DECODE is still all) with the group sizes the default does not
  // pick at these T
  for (const char* g : {"1", "3", "8"}) {
    setenv("DSV4_MHC_DECODE_GROUP", g, 1);
    std::printf("DSV4_MHC_DECODE_GROUP=%s\n", g);
    for (int T : {8, 13, 64})
      for (bool head : {false, true}) ok &= check_pre(T, 4096, head, rng);
  }
  unsetenv("DSV4_MHC_DECODE_GROUP");
  unsetenv("DSV4_MHC_DECODE");
  // decode kernel v2 (default) vs v1 (DSV4_MHC_DECODE_IMPL=v1), bit for bit, then their times
  for (int d : {4096, 7168})
    for (int T : {1, 2, 3, 4, 7, 8})
      for (bool head : {false, true})
        for (int mag : {0, 16, 40}) ok &= check_decode_v1_v2(T, d, head, mag, rng);
  for (bool head : {false, true})
    for (int T : {1, 8}) ok &= bench_decode_impl(T, 4096, head);
  for (bool head : {false, true})
    for (int T : {1, 8, 16, 32, 64}) ok &= time_decode(T, 4096, head);
  // times (and the one-pass kernel's run-to-run determinism) at the sizes of issue 10's target
  for (bool head : {false, true}) {
    ok &= time_prefill(4096, 4096, head, true);
    ok &= time_prefill(16384, 4096, head, false);
  }
  unsetenv("DSV4_MHC_ONE_PASS");
  ok &= dsv4::mhc_pre(nullptr, 0, nullptr, nullptr, nullptr, 1e-6f, 20, 1e-6f, nullptr, 0, nullptr,
                      nullptr, 4, 12, nullptr, 0, nullptr) == cudaErrorInvalidValue;  // dim % 8
  std::printf("%s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
