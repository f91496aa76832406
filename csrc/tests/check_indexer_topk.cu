// Standalone check of dsv4::indexer_topk (no torch): random inputs on the GPU, compared with a
// CPU loop in double precision. Prints PASS / FAIL (exit 1) or "SKIP: no CUDA device" (exit 0).
//
// Exact cases use integer-valued q / keys and power-of-two weights: every score is exact in
// fp32 whatever the summation order, so the kernel must reproduce the reference bit for bit,
// including the order of equal scores (lowest index first), NaN exclusion and -1 padding.
// Float cases (random normal data) check the selected SET with a tolerance: every selected
// score >= every unselected score - tol, descending order within tol, exact -1 counts.
// With an argument "--bench" it also times the benchmark shapes (decode and causal prefill)
// with cold L2, and the scan alone (indexer_topk_scan_only). "--refusal" (alone in its process)
// checks the fallbacks of refused cluster queries and programmatic launches (DSV4_TEST_REFUSE=
// query / launch, test only): the same indices, no error left pending, an error the caller left
// pending never cleared.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "dsv4/indexer_topk.h"

#include "check_common.h"

namespace {

using dsv4_check::bf16_to_float;
using dsv4_check::float_to_bf16;
using dsv4_check::leave_error_pending;
using dsv4_check::pending_error_kept;

struct Problem {
  std::string name;
  int T = 0, B = 0, C = 0, H = 0, D = 0, k = 0;
  int64_t c_store = 0;  // key rows allocated per batch row (>= C): row stride = c_store * D
  std::vector<uint16_t> q;     // [T, H, D]
  std::vector<float> w;        // [T, H]
  std::vector<uint16_t> keys;  // [B, c_store, D]
  std::vector<int32_t> rows, nv;
  bool exact = true;
};

Problem make_problem(const std::string& name, int T, int B, int C, int H, int D, int k,
                     bool exact, std::mt19937& rng) {
  Problem p;
  p.name = name;
  p.T = T, p.B = B, p.C = C, p.H = H, p.D = D, p.k = k;
  p.c_store = C + 8;  // a row stride that is not C * D
  p.exact = exact;
  p.q.resize(static_cast<size_t>(T) * H * D);
  p.w.resize(static_cast<size_t>(T) * H);
  p.keys.resize(static_cast<size_t>(std::max(B, 1)) * p.c_store * D);
  p.rows.assign(T, 0);
  p.nv.assign(T, 0);
  if (exact) {
    std::uniform_int_distribution<int> small(-3, 3);
    const float wv[] = {0.25f, 0.5f, 1.f, 2.f, -0.5f, -1.f};
    std::uniform_int_distribution<int> wi(0, 5);
    for (auto& v : p.q) v = float_to_bf16(static_cast<float>(small(rng)));
    for (auto& v : p.keys) v = float_to_bf16(static_cast<float>(small(rng)));
    for (auto& v : p.w) v = wv[wi(rng)];
  } else {
    std::normal_distribution<float> nd(0.f, 1.f);
    std::uniform_real_distribution<float> ud(-1.f, 1.f);
    for (auto& v : p.q) v = float_to_bf16(nd(rng));
    for (auto& v : p.keys) v = float_to_bf16(nd(rng));
    for (auto& v : p.w) v = ud(rng) * 0.125f;
  }
  return p;
}

// Two decode queries (one head, D = 128, topk 1024) over n keys whose scores differ only in
// their low mantissa bits (tilelang #1351, sglang #37591): score = k0 + k1 / 256 + k2 / 65536
// with k1 in [0, 16), k2 in [0, 256); query t sees n - 7 t keys.
Problem make_low_mantissa_problem(const std::string& name, int n, std::mt19937& rng) {
  Problem p = make_problem(name, 2, 1, n, 1, 128, 1024, true, rng);
  std::fill(p.q.begin(), p.q.end(), float_to_bf16(0.f));
  for (int t = 0; t < 2; ++t) {
    p.q[static_cast<size_t>(t) * 128 + 0] = float_to_bf16(1.f);
    p.q[static_cast<size_t>(t) * 128 + 1] = float_to_bf16(1.f / 256);
    p.q[static_cast<size_t>(t) * 128 + 2] = float_to_bf16(1.f / 65536);
    p.w[t] = 1.f;
    p.nv[t] = n - 7 * t;
  }
  std::uniform_int_distribution<int> a(0, 15), b(0, 255);
  std::fill(p.keys.begin(), p.keys.end(), float_to_bf16(0.f));
  for (int s = 0; s < n; ++s) {
    p.keys[static_cast<size_t>(s) * 128 + 0] = float_to_bf16(1.f);
    p.keys[static_cast<size_t>(s) * 128 + 1] = float_to_bf16(static_cast<float>(a(rng)));
    p.keys[static_cast<size_t>(s) * 128 + 2] = float_to_bf16(static_cast<float>(b(rng)));
  }
  return p;
}

// Reference scores of query t in double (NaN kept); entries [0, nv) of its row.
std::vector<double> ref_scores(const Problem& p, int t, double* abs_bound) {
  std::vector<double> out;
  const int r = p.rows[t];
  int nv = std::min(std::max(p.nv[t], 0), p.C);
  if (r < 0 || r >= p.B) nv = 0;
  out.resize(nv);
  std::vector<double> qd(static_cast<size_t>(p.H) * p.D);
  for (size_t i = 0; i < qd.size(); ++i) qd[i] = bf16_to_float(p.q[static_cast<size_t>(t) * p.H * p.D + i]);
  double bound = 0;
  std::vector<double> kd(p.D);
  for (int s = 0; s < nv; ++s) {
    const uint16_t* kr = p.keys.data() + (static_cast<size_t>(r) * p.c_store + s) * p.D;
    for (int d = 0; d < p.D; ++d) kd[d] = bf16_to_float(kr[d]);
    double sc = 0, ab = 0;
    for (int h = 0; h < p.H; ++h) {
      double dot = 0, adot = 0;
      const double* qh = qd.data() + static_cast<size_t>(h) * p.D;
      for (int d = 0; d < p.D; ++d) {
        dot += qh[d] * kd[d];
        adot += std::fabs(qh[d] * kd[d]);
      }
      const double relu = dot < 0 ? 0.0 : dot;  // keeps NaN
      const double wv = p.w[static_cast<size_t>(t) * p.H + h];
      sc += wv * relu;
      ab += std::fabs(wv) * adot;
    }
    out[s] = sc;
    if (ab > bound && std::isfinite(ab)) bound = ab;
  }
  if (abs_bound) *abs_bound = bound;
  return out;
}

struct DeviceBufs {
  void *q = nullptr, *keys = nullptr, *ws = nullptr;
  float* w = nullptr;
  int32_t *rows = nullptr, *nv = nullptr, *out = nullptr;
  size_t ws_bytes = 0;
  void free_all() {
    cudaFree(q), cudaFree(keys), cudaFree(ws), cudaFree(w), cudaFree(rows), cudaFree(nv),
        cudaFree(out);
  }
};

// The query side of a problem on the device (q, w, rows, n_valid, out); keys and workspace
// are the caller's.
DeviceBufs upload_queries(const Problem& p) {
  DeviceBufs d;
  CHECK_CUDA(cudaMalloc(&d.q, std::max<size_t>(p.q.size(), 1) * 2));
  CHECK_CUDA(cudaMalloc(&d.w, std::max<size_t>(p.w.size(), 1) * 4));
  CHECK_CUDA(cudaMalloc(&d.rows, std::max<size_t>(p.T, 1) * 4));
  CHECK_CUDA(cudaMalloc(&d.nv, std::max<size_t>(p.T, 1) * 4));
  CHECK_CUDA(cudaMalloc(&d.out, std::max<size_t>(static_cast<size_t>(p.T) * p.k, 1) * 4));
  CHECK_CUDA(cudaMemcpy(d.q, p.q.data(), p.q.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d.w, p.w.data(), p.w.size() * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d.rows, p.rows.data(), p.T * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d.nv, p.nv.data(), p.T * 4, cudaMemcpyHostToDevice));
  return d;
}

DeviceBufs upload(const Problem& p) {
  DeviceBufs d = upload_queries(p);
  CHECK_CUDA(cudaMalloc(&d.keys, std::max<size_t>(p.keys.size(), 1) * 2));
  CHECK_CUDA(cudaMemcpy(d.keys, p.keys.data(), p.keys.size() * 2, cudaMemcpyHostToDevice));
  int dev = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  d.ws_bytes = dsv4::indexer_topk_workspace_bytes(p.T, p.B, p.C, p.H, p.D, p.k, dev);
  if (d.ws_bytes) CHECK_CUDA(cudaMalloc(&d.ws, d.ws_bytes));
  return d;
}

cudaError_t launch(const Problem& p, const DeviceBufs& d, cudaStream_t stream = nullptr) {
  return dsv4::indexer_topk(d.q, static_cast<int64_t>(p.H) * p.D, p.D, d.w, p.H, d.keys,
                            p.c_store * p.D, p.D, d.rows, d.nv, d.out, p.k, p.T, p.H, p.D, p.B,
                            p.C, p.k, d.ws, d.ws_bytes, stream);
}

// Checks query t's output row against the reference. Returns an empty string on success.
std::string check_row(const Problem& p, int t, const int32_t* got) {
  double bound = 0;
  const std::vector<double> sc = ref_scores(p, t, &bound);
  std::vector<int> order;
  for (int s = 0; s < static_cast<int>(sc.size()); ++s)
    if (!std::isnan(sc[s])) order.push_back(s);
  const int n_ok = static_cast<int>(order.size());
  const int m = std::min(n_ok, p.k);
  char buf[512];
  // -1 padding and count
  for (int i = 0; i < p.k; ++i) {
    if ((i < m) != (got[i] >= 0)) {
      std::snprintf(buf, sizeof(buf), "t=%d slot %d: got %d, expected %s (m=%d of %d visible)",
                    t, i, got[i], i < m ? "an index" : "-1", m, static_cast<int>(sc.size()));
      return buf;
    }
    if (i >= m && got[i] != -1) {
      std::snprintf(buf, sizeof(buf), "t=%d slot %d: got %d, expected -1", t, i, got[i]);
      return buf;
    }
  }
  if (p.exact) {
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return sc[a] > sc[b]; });
    for (int i = 0; i < m; ++i) {
      if (got[i] != order[i]) {
        std::snprintf(buf, sizeof(buf),
                      "t=%d slot %d: got %d (score %.9g), expected %d (score %.9g)", t, i,
                      got[i], got[i] >= 0 && got[i] < (int)sc.size() ? sc[got[i]] : NAN,
                      order[i], sc[order[i]]);
        return buf;
      }
    }
    return "";
  }
  const double tol = 4.0 * (p.D + p.H) * std::ldexp(1.0, -24) * bound + 1e-30;
  std::vector<char> chosen(sc.size(), 0);
  double min_sel = INFINITY;
  for (int i = 0; i < m; ++i) {
    const int s = got[i];
    if (s < 0 || s >= static_cast<int>(sc.size()) || std::isnan(sc[s]) || chosen[s]) {
      std::snprintf(buf, sizeof(buf), "t=%d slot %d: invalid / NaN / repeated index %d", t, i, s);
      return buf;
    }
    chosen[s] = 1;
    min_sel = std::min(min_sel, sc[s]);
    if (i > 0 && sc[s] > sc[got[i - 1]] + tol) {
      std::snprintf(buf, sizeof(buf), "t=%d slot %d: order (%.9g after %.9g, tol %.3g)", t, i,
                    sc[s], sc[got[i - 1]], tol);
      return buf;
    }
  }
  for (int s : order) {
    if (!chosen[s] && sc[s] > min_sel + tol) {
      std::snprintf(buf, sizeof(buf), "t=%d: unselected %d scores %.9g > min selected %.9g + %.3g",
                    t, s, sc[s], min_sel, tol);
      return buf;
    }
  }
  return "";
}

// Checks every row of got (the launch's output, d_out on the device) against the reference:
// the number of bad rows (ok cleared and msg set to the first one's message when nonzero);
// with det also that three relaunches (outputs poisoned first) give the same bits.
template <class Launch>
int check_rows(const Problem& p, const std::vector<int32_t>& got, int32_t* d_out, bool det,
               Launch&& relaunch, bool& ok, std::string& msg) {
  int bad = 0;
  for (int t = 0; t < p.T; ++t) {
    std::string e = check_row(p, t, got.data() + static_cast<size_t>(t) * p.k);
    if (!e.empty()) {
      if (bad == 0) msg = e;
      ++bad;
      ok = false;
    }
  }
  if (det) {
    std::vector<int32_t> again(got.size());
    for (int rep = 0; rep < 3 && ok; ++rep) {
      CHECK_CUDA(cudaMemset(d_out, 0x7f, got.size() * 4));
      CHECK_CUDA(relaunch());
      CHECK_CUDA(cudaMemcpy(again.data(), d_out, got.size() * 4, cudaMemcpyDeviceToHost));
      if (again != got) {
        ok = false;
        msg = "relaunch gave a different result";
      }
    }
  }
  return bad;
}

bool run_problem(const Problem& p, bool check_determinism = false) {
  DeviceBufs d = upload(p);
  CHECK_CUDA(cudaMemset(d.out, 0x7f, static_cast<size_t>(p.T) * p.k * 4));  // poison
  CHECK_CUDA(launch(p, d));
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<int32_t> got(static_cast<size_t>(p.T) * p.k);
  CHECK_CUDA(cudaMemcpy(got.data(), d.out, got.size() * 4, cudaMemcpyDeviceToHost));
  bool ok = true;
  std::string msg;
  const int bad = check_rows(p, got, d.out, check_determinism, [&] { return launch(p, d); },
                             ok, msg);
  const cudaError_t pend = cudaGetLastError();  // the op must leave no error pending
  if (pend != cudaSuccess) {
    ok = false;
    msg = std::string("error left pending: ") + cudaGetErrorName(pend) + "; " + msg;
  }
  dsv4::IndexerKeys kk;  // (dense keys: only rows and capacity matter for the plan)
  kk.rows = p.B;
  kk.capacity = p.C;
  const bool wg = dsv4::indexer_topk_uses_wgmma(p.T, kk, p.H, p.D, p.k);
  std::printf("%s %-44s T=%-6d B=%-3d C=%-6d H=%-3d D=%-3d k=%-4d ws=%zu%s%s%s\n",
              ok ? "ok  " : "FAIL", p.name.c_str(), p.T, p.B, p.C, p.H, p.D, p.k, d.ws_bytes,
              wg ? " [wgmma]" : "", ok ? "" : "  ",
              ok ? "" : (msg + " (" + std::to_string(bad) + " bad rows)").c_str());
  d.free_all();
  return ok;
}

// ---------------------------------------------------------------------------------------------
// benchmark shapes: device-generated data (hash), cold-L2 timing, sampled CPU checks
// ---------------------------------------------------------------------------------------------
__device__ __host__ inline uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

__global__ void fill_bf16(__nv_bfloat16* x, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint64_t h = mix64(seed ^ (i * 0x2545f4914f6cdd1dull));
    // sum of 3 uniforms in [-1, 1): roughly normal, unit-ish scale
    float v = 0.f;
    for (int j = 0; j < 3; ++j) v += static_cast<float>((h >> (j * 21)) & 0x1fffff) / 1048576.f - 1.f;
    x[i] = __float2bfloat16_rn(v);
  }
}

__global__ void fill_f32(float* x, size_t n, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint64_t h = mix64(seed ^ (i * 0x2545f4914f6cdd1dull));
    x[i] = (static_cast<float>(h & 0xffffff) / 8388608.f - 1.f) * scale;
  }
}

struct Timing {
  double med_us = 0, min_us = 0;
};

template <typename F>
Timing time_cold(F&& fn, int reps, void* flush, size_t flush_bytes) {
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  fn();  // warm-up
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<double> v;
  for (int r = 0; r < reps; ++r) {
    CHECK_CUDA(cudaMemsetAsync(flush, r & 0xff, flush_bytes));  // evict L2
    CHECK_CUDA(cudaEventRecord(a));
    fn();
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
    v.push_back(ms * 1e3);
  }
  std::sort(v.begin(), v.end());
  CHECK_CUDA(cudaEventDestroy(a));
  CHECK_CUDA(cudaEventDestroy(b));
  return {v[v.size() / 2], v[0]};
}

// cap: the key rows' capacity (0: N); decode rows see N entries of it.
bool bench_case(const char* kind, int T, int B, int N, int k, bool causal, int reps,
                std::vector<int> check_ts, void* flush, size_t flush_bytes, int cap = 0,
                double* med_us = nullptr, double* scan_us = nullptr) {
  const int H = 64, D = 128;
  const int C = cap > 0 ? cap : N;
  const size_t nq = static_cast<size_t>(T) * H * D, nk = static_cast<size_t>(B) * C * D;
  Problem p;  // host mirror for the sampled checks (keys of the checked rows only)
  p.name = kind;
  p.T = T, p.B = B, p.C = C, p.H = H, p.D = D, p.k = k, p.c_store = C, p.exact = false;
  p.rows.resize(T), p.nv.resize(T);
  for (int t = 0; t < T; ++t) {
    p.rows[t] = causal ? 0 : t % B;
    p.nv[t] = causal ? (t + 1) / 4 : N;
  }
  DeviceBufs d;
  CHECK_CUDA(cudaMalloc(&d.q, nq * 2));
  CHECK_CUDA(cudaMalloc(&d.keys, nk * 2));
  CHECK_CUDA(cudaMalloc(&d.w, static_cast<size_t>(T) * H * 4));
  CHECK_CUDA(cudaMalloc(&d.rows, T * 4));
  CHECK_CUDA(cudaMalloc(&d.nv, T * 4));
  CHECK_CUDA(cudaMalloc(&d.out, static_cast<size_t>(T) * k * 4));
  fill_bf16<<<1024, 256>>>(static_cast<__nv_bfloat16*>(d.q), nq, 1);
  fill_bf16<<<4096, 256>>>(static_cast<__nv_bfloat16*>(d.keys), nk, 2);
  fill_f32<<<256, 256>>>(d.w, static_cast<size_t>(T) * H, 3, 0.0156f);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaMemcpy(d.rows, p.rows.data(), T * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d.nv, p.nv.data(), T * 4, cudaMemcpyHostToDevice));
  int dev = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  d.ws_bytes = dsv4::indexer_topk_workspace_bytes(T, B, C, H, D, k, dev);
  if (d.ws_bytes) CHECK_CUDA(cudaMalloc(&d.ws, d.ws_bytes));
  float* sums = nullptr;
  CHECK_CUDA(cudaMalloc(&sums, T * 4));
  CHECK_CUDA(cudaMemset(sums, 0, T * 4));

  CHECK_CUDA(cudaMemset(d.out, 0x7f, static_cast<size_t>(T) * k * 4));
  const Timing full = time_cold([&] { CHECK_CUDA(launch(p, d)); }, reps, flush, flush_bytes);
  const Timing scan = time_cold(
      [&] {
        CHECK_CUDA(dsv4::indexer_topk_scan_only(d.q, H * D, D, d.w, H, d.keys,
                                                static_cast<int64_t>(C) * D, D, d.rows, d.nv,
                                                sums, T, H, D, B, C, k, nullptr));
      },
      reps, flush, flush_bytes);

  // sampled correctness check of the (last) full run: one-row sub-problem per checked query
  bool ok = true;
  std::string msg;
  {
    std::vector<int32_t> got(static_cast<size_t>(T) * k);
    CHECK_CUDA(cudaMemcpy(got.data(), d.out, got.size() * 4, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < got.size() && ok; ++i)
      if (got[i] == 0x7f7f7f7f) {
        ok = false;
        msg = "unwritten output slot";
      }
    for (int t : check_ts) {
      Problem one;
      one.name = kind;
      one.T = 1, one.B = 1, one.C = N, one.H = H, one.D = D, one.k = k, one.c_store = N;
      one.exact = false;
      one.rows = {0};
      one.nv = {p.nv[t]};
      one.q.resize(static_cast<size_t>(H) * D);
      one.w.resize(H);
      one.keys.resize(static_cast<size_t>(N) * D);
      CHECK_CUDA(cudaMemcpy(one.q.data(), static_cast<const char*>(d.q) + static_cast<size_t>(t) * H * D * 2,
                            one.q.size() * 2, cudaMemcpyDeviceToHost));
      CHECK_CUDA(cudaMemcpy(one.w.data(), d.w + static_cast<size_t>(t) * H, H * 4, cudaMemcpyDeviceToHost));
      CHECK_CUDA(cudaMemcpy(one.keys.data(),
                            static_cast<const char*>(d.keys) + static_cast<size_t>(p.rows[t]) * C * D * 2,
                            one.keys.size() * 2, cudaMemcpyDeviceToHost));
      std::string e = check_row(one, 0, got.data() + static_cast<size_t>(t) * k);
      if (!e.empty()) {
        ok = false;
        msg = "t=" + std::to_string(t) + ": " + e;
      }
    }
  }
  double key_bytes = 0, flops = 0;
  for (int t = 0; t < T; ++t) flops += 2.0 * H * D * p.nv[t];
  key_bytes = causal ? static_cast<double>(N) * D * 2 : static_cast<double>(T) * N * D * 2;
  if (med_us) *med_us = full.med_us;
  if (scan_us) *scan_us = scan.med_us;
  std::printf(
      "TIME %-8s T=%-6d N=%-7d C=%-6d k=%-5d full %9.1f us (min %9.1f)  scan-only %9.1f us  ratio %.3f  "
      "key-bytes %7.0f GB/s (%5.1f%% of 4.22 TB/s)  %6.1f TFLOP/s  splits-ws=%zuB  %s%s\n",
      kind, T, N, C, k, full.med_us, full.min_us, scan.med_us, full.med_us / scan.med_us,
      key_bytes / full.med_us * 1e-3, key_bytes / full.med_us * 1e-3 / 4220 * 100,
      flops / full.med_us * 1e-6, d.ws_bytes, ok ? "check ok" : "CHECK FAIL: ", ok ? "" : msg.c_str());
  CHECK_CUDA(cudaFree(sums));
  d.free_all();
  return ok;
}

bool correctness_suite(std::mt19937& rng) {
  bool ok = true;

  // ---- exact (integer-valued) cases -----------------------------------------------------
  {  // decode-like varlen: one query per row, lengths around tile / chunk boundaries
    const int lens[] = {0, 1, 3, 4, 5, 127, 128, 129, 1000, 3000, 5000, 7000};
    for (int k : {1, 8, 512, 2048}) {
      Problem p = make_problem("varlen decode lengths", 12, 12, 6000, 64, 128, k, true, rng);
      for (int t = 0; t < 12; ++t) p.rows[t] = 11 - t, p.nv[t] = lens[t];
      ok &= run_problem(p, k == 512);
    }
  }
  {  // one long query: many splits + the two-level merge tree
    Problem p = make_problem("decode T=1 long (merge tree)", 1, 1, 65536, 64, 128, 512, true, rng);
    p.nv[0] = 65536;
    ok &= run_problem(p, true);
    Problem p2 = make_problem("decode T=2 long, ragged", 2, 2, 65536, 64, 128, 1024, true, rng);
    p2.rows = {1, 0};
    p2.nv = {40001, 65536};
    ok &= run_problem(p2);
  }
  {  // causal prefill, two sequences; a query group straddles the row boundary (515 % 8 != 0)
    for (int k : {8, 64}) {
      const int S = 515;
      Problem p = make_problem("prefill causal 2 rows", 2 * S, 2, S / 4, 64, 128, k, true, rng);
      for (int t = 0; t < 2 * S; ++t) p.rows[t] = t / S, p.nv[t] = (t % S + 1) / 4;
      ok &= run_problem(p);
    }
  }
  {  // prefill-like (8 queries / CTA) with key-range splits + merges by single warps
    Problem p = make_problem("prefill T=64 split", 64, 1, 4096, 64, 128, 64, true, rng);
    for (int t = 0; t < 64; ++t) p.nv[t] = 4096 - 63 + t;
    ok &= run_problem(p);
  }
  {  // tiny configs: D = 64, H = 8 / 16, topk 4 / 8 (prefill and decode)
    Problem p = make_problem("tiny prefill D64 H8", 300, 1, 75, 8, 64, 4, true, rng);
    for (int t = 0; t < 300; ++t) p.nv[t] = (t + 1) / 4;
    ok &= run_problem(p);
    Problem p2 = make_problem("tiny decode D64 H16", 5, 5, 300, 16, 64, 8, true, rng);
    for (int t = 0; t < 5; ++t) p2.rows[t] = t, p2.nv[t] = 60 * t + 7;
    ok &= run_problem(p2);
  }
  {  // head counts that are not 64: masking and several head blocks
    for (int H : {1, 100, 128}) {
      Problem p = make_problem("heads != 64 decode", 3, 3, 3000, H, 128, 256, true, rng);
      for (int t = 0; t < 3; ++t) p.rows[t] = t, p.nv[t] = 1000 * t + 999;
      ok &= run_problem(p);
      Problem p2 = make_problem("heads != 64 prefill", 200, 1, 50, H, 128, 16, true, rng);
      for (int t = 0; t < 200; ++t) p2.nv[t] = (t + 1) / 4;
      ok &= run_problem(p2);
    }
  }
  {  // invalid rows and n_valid out of range: -1 rows / clamping
    Problem p = make_problem("bad rows, clamped n_valid", 6, 3, 500, 64, 128, 32, true, rng);
    p.rows = {-1, 3, 0, 1, 2, 100};
    p.nv = {10, 10, -5, 100000, 17, 10};
    ok &= run_problem(p);
  }
  {  // all n_valid = 0, batch 32 (DeepGEMM #353)
    Problem p = make_problem("all n_valid = 0, batch 32", 32, 32, 128, 64, 128, 512, true, rng);
    for (int t = 0; t < 32; ++t) p.rows[t] = t, p.nv[t] = 0;
    ok &= run_problem(p);
  }
  {  // all-zero keys: every score is +-0 (negative weights give -0): lowest indices first
    for (int T : {3, 64}) {
      Problem p = make_problem(T == 3 ? "all-zero keys decode" : "all-zero keys prefill", T, 1,
                               3000, 64, 128, 512, true, rng);
      std::fill(p.keys.begin(), p.keys.end(), float_to_bf16(0.f));
      for (int t = 0; t < T; ++t) p.nv[t] = 3000 - t;
      ok &= run_problem(p, true);
    }
  }
  {  // ties at the threshold (sglang #30645): 100 distinct winners + 8220 exact zeros
    for (int T : {1, 64}) {
      Problem p = make_problem(T == 1 ? "100 winners + 8220 zeros, decode" : "100 winners + 8220 zeros, prefill",
                               T, 1, 8320, 64, 128, 2048, true, rng);
      std::fill(p.keys.begin(), p.keys.end(), float_to_bf16(0.f));
      for (auto& v : p.q) v = float_to_bf16(1.f);
      for (auto& v : p.w) v = 0.5f;
      std::vector<int> pos(8320);
      std::iota(pos.begin(), pos.end(), 0);
      std::shuffle(pos.begin(), pos.end(), rng);
      for (int i = 0; i < 100; ++i)  // winner i: key = (i+1) in dim i % D -> score 32 (i+1)
        p.keys[static_cast<size_t>(pos[i]) * p.D + (i % p.D)] = float_to_bf16(static_cast<float>(i + 1));
      for (int t = 0; t < T; ++t) p.nv[t] = 8320;
      ok &= run_problem(p, true);
    }
  }
  {  // scores differing only in the low 16 mantissa bits (tilelang #1351, sglang #37591)
    Problem p = make_low_mantissa_problem("low mantissa bits", 20000, rng);
    ok &= run_problem(p, true);
  }
  {  // NaN keys are never selected (vllm #49896); decode + prefill
    for (int T : {2, 128}) {
      Problem p = make_problem(T == 2 ? "NaN keys decode" : "NaN keys prefill", T, 1, 4000, 64,
                               128, 512, true, rng);
      std::uniform_int_distribution<int> u(0, 9);
      for (int s = 0; s < 4000; ++s)
        if (u(rng) == 0) p.keys[static_cast<size_t>(s) * 128 + u(rng)] = 0x7fc0;  // NaN
      for (int t = 0; t < T; ++t) p.nv[t] = T == 2 ? 4000 - 2000 * t : 31 * t;
      ok &= run_problem(p);
    }
    // only NaN visible: all -1
    Problem p = make_problem("all-NaN row", 2, 1, 300, 64, 128, 16, true, rng);
    std::fill(p.keys.begin(), p.keys.end(), static_cast<uint16_t>(0x7fc0));
    p.nv = {300, 5};
    ok &= run_problem(p);
  }
  {  // +-inf in keys: scores +-inf or NaN (inf * 0); -inf is a value, NaN never selected
    Problem p = make_problem("inf keys", 2, 1, 2000, 64, 128, 256, true, rng);
    std::uniform_int_distribution<int> u(0, 19);
    for (int s = 0; s < 2000; ++s)
      if (u(rng) == 0) p.keys[static_cast<size_t>(s) * 128 + u(rng)] = (u(rng) & 1) ? 0x7f80 : 0xff80;
    p.nv = {2000, 1500};
    ok &= run_problem(p);
  }
  {  // 70000 queries (grid limits; FlashMLA #182), varlen rows
    Problem p = make_problem("T=70000 varlen", 70000, 4, 64, 8, 64, 8, true, rng);
    std::uniform_int_distribution<int> r(0, 3), n(0, 70);
    for (int t = 0; t < 70000; ++t) p.rows[t] = r(rng), p.nv[t] = n(rng);
    ok &= run_problem(p);
  }
  // ---- float (tolerance) cases -------------------------------------------------------------
  {
    Problem p = make_problem("float decode", 3, 3, 20000, 64, 128, 512, false, rng);
    for (int t = 0; t < 3; ++t) p.rows[t] = t, p.nv[t] = 20000 - 5000 * t;
    ok &= run_problem(p, true);
    Problem p2 = make_problem("float prefill causal", 2048, 1, 512, 64, 128, 128, false, rng);
    for (int t = 0; t < 2048; ++t) p2.nv[t] = (t + 1) / 4;
    ok &= run_problem(p2);
    Problem p3 = make_problem("float decode D64 k=1024", 4, 2, 9000, 64, 64, 1024, false, rng);
    for (int t = 0; t < 4; ++t) p3.rows[t] = t % 2, p3.nv[t] = 9000 - 1000 * t;
    ok &= run_problem(p3);
  }
  // ---- argument validation ----------------------------------------------------------------
  {
    int x = 0;
    ok &= dsv4::indexer_topk(&x, 0, 0, nullptr, 0, nullptr, 0, 0, nullptr, nullptr, nullptr, 0, 4,
                             64, 96, 1, 1, 8, nullptr, 0, nullptr) == cudaErrorInvalidValue;  // D
    ok &= dsv4::indexer_topk(nullptr, 0, 0, nullptr, 0, nullptr, 0, 0, nullptr, nullptr, nullptr,
                             0, 0, 64, 128, 1, 1, 8, nullptr, 0, nullptr) == cudaSuccess;  // T=0
    ok &= dsv4::indexer_topk(nullptr, 0, 0, nullptr, 0, nullptr, 0, 0, nullptr, nullptr, nullptr,
                             0, 0, 64, 128, 1, 1, 2049, nullptr, 0, nullptr) == cudaErrorInvalidValue;
    std::printf("%s argument validation\n", ok ? "ok  " : "FAIL");
  }
  return ok;
}

// Long decode queries: many key-range splits, so that the default (auto) merge takes the
// histogram select; run under every merge mode. 1M-token context = 262144 entries.
bool long_decode_suite(std::mt19937& rng) {
  bool ok = true;
  {  // 1M context, batch 1, integer-valued scores (many exact ties), V4-Flash shapes
    Problem p = make_problem("1M decode T=1 k=512 (exact, ties)", 1, 1, 262144, 64, 128, 512,
                             true, rng);
    p.nv[0] = 262144;
    ok &= run_problem(p, true);
  }
  {  // all scores equal (+-0): the boundary bin holds every entry (> 8192: full-scan fallback)
    Problem p = make_problem("1M decode all-equal scores", 2, 1, 262144, 8, 128, 512, true, rng);
    std::fill(p.keys.begin(), p.keys.end(), float_to_bf16(0.f));
    p.nv = {262144, 200001};
    ok &= run_problem(p, true);
  }
  {  // 100 winners + 99900 exact zeros, k = 2048 > winners: ties at the threshold, fallback
    Problem p = make_problem("100 winners + 99900 zeros, T=2", 2, 1, 100000, 8, 128, 2048, true,
                             rng);
    std::fill(p.keys.begin(), p.keys.end(), float_to_bf16(0.f));
    for (auto& v : p.q) v = float_to_bf16(1.f);
    for (auto& v : p.w) v = 0.5f;
    std::vector<int> pos(100000);
    std::iota(pos.begin(), pos.end(), 0);
    std::shuffle(pos.begin(), pos.end(), rng);
    for (int i = 0; i < 100; ++i)
      p.keys[static_cast<size_t>(pos[i]) * p.D + (i % p.D)] = float_to_bf16(static_cast<float>(i + 1));
    p.nv = {100000, 99999};
    ok &= run_problem(p, true);
  }
  {  // 3000 winners + zeros, k = 512: the boundary bin is a bin of winners (no fallback)
    Problem p = make_problem("3000 winners + zeros, k=512", 1, 1, 120000, 8, 128, 512, true,
                             rng);
    std::fill(p.keys.begin(), p.keys.end(), float_to_bf16(0.f));
    std::uniform_int_distribution<int> val(1, 64);
    for (int i = 0; i < 3000; ++i)
      p.keys[static_cast<size_t>(i * 40 + 7) * p.D + (i % p.D)] = float_to_bf16(static_cast<float>(val(rng)));
    p.nv = {120000};
    ok &= run_problem(p, true);
  }
  {  // fewer visible entries than topk in a long row; an empty scope; a bad row; NaN-only
    Problem p = make_problem("long rows: k > visible, empty, bad row", 4, 2, 131072, 64, 128,
                             512, true, rng);
    p.rows = {0, 1, -1, 0};
    p.nv = {300, 0, 131072, 131072};
    // row 0 has NaN keys at every entry >= 1000 (query 3 sees 1000 non-NaN entries)
    for (int sidx = 1000; sidx < 131072; ++sidx) p.keys[static_cast<size_t>(sidx) * p.D] = 0x7fc0;
    ok &= run_problem(p);
  }
  {  // contexts crossing split / chunk boundaries, float scores, D 64 and 128, k 1024
    Problem p = make_problem("float long decode ragged", 3, 3, 70000, 16, 128, 1024, false, rng);
    p.rows = {2, 0, 1};
    p.nv = {70000, 65537, 40961};
    ok &= run_problem(p, true);
    Problem p2 = make_problem("float long decode D64", 2, 1, 50000, 16, 64, 512, false, rng);
    p2.nv = {50000, 4097};
    ok &= run_problem(p2);
  }
  return ok;
}

// Short and medium decode rows (the latency cases: a few thousand entries, batch 1 .. 64):
// since a decode split may be 128 keys (less than a tile), these cross tile / split / topk
// boundaries with one query per row, exact integer scores (bit-for-bit against the reference,
// order of ties included), plus empty scopes, a bad row, NaN keys and an all-zero plateau.
// Run under every merge mode, including "legacy" (the previous split size and selection
// tail).
bool short_decode_suite(std::mt19937& rng) {
  bool ok = true;
  {  // batch 1: N < k, N == k, N = k + 1, tile boundaries, 2 k and a few thousand
    const int lens[] = {1, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 2047, 4097, 8191};
    for (int n : lens) {
      Problem p = make_problem("short decode T=1 N=" + std::to_string(n), 1, 1, 8192, 64, 128,
                               512, true, rng);
      p.nv[0] = n;
      ok &= run_problem(p, n == 1025);
    }
    // capacity much larger than the visible row (the runtime's cache): idle splits
    Problem p = make_problem("short decode T=1 N=1024 in C=65536", 1, 1, 65536, 64, 128, 512,
                             true, rng);
    p.nv[0] = 1024;
    ok &= run_problem(p, true);
  }
  {  // batch 8 and 64 (rows reversed), mixed lengths incl. 0, k - 1 .. k + 1, 2048
    for (int T : {8, 64}) {
      Problem p = make_problem("short decode T=" + std::to_string(T), T, T, 2304, 64, 128, 512,
                               true, rng);
      const int lens[] = {0, 511, 512, 513, 1024, 2048, 2304, 300};
      for (int t = 0; t < T; ++t) p.rows[t] = T - 1 - t, p.nv[t] = lens[t % 8] - (t / 8) % 3;
      ok &= run_problem(p, T == 8);
    }
  }
  {  // bad row, clamped n_valid, NaN keys from entry 600 on (query sees 600 non-NaN entries)
    Problem p = make_problem("short decode bad row / NaN tail", 4, 2, 3000, 64, 128, 512, true,
                             rng);
    p.rows = {0, -1, 1, 0};
    p.nv = {3000, 100, 100000, 700};
    for (int sidx = 600; sidx < 3000; ++sidx) p.keys[static_cast<size_t>(sidx) * p.D] = 0x7fc0;
    ok &= run_problem(p);
  }
  {  // all-zero keys (every score +-0): the lowest indices, in order, across split boundaries
    Problem p = make_problem("short decode all-zero keys", 2, 1, 4096, 64, 128, 512, true, rng);
    std::fill(p.keys.begin(), p.keys.end(), float_to_bf16(0.f));
    p.nv = {4096, 1500};
    ok &= run_problem(p, true);
  }
  {  // float scores (set check with tolerance), k 2048 > N and k 1024 < N, D 64
    Problem p = make_problem("short decode float T=3", 3, 3, 6000, 64, 128, 1024, false, rng);
    p.rows = {1, 2, 0};
    p.nv = {6000, 1025, 2000};
    ok &= run_problem(p);
    Problem p2 = make_problem("short decode float k=2048", 2, 2, 3000, 64, 128, 2048, false, rng);
    p2.nv = {3000, 2049};
    p2.rows = {0, 1};
    ok &= run_problem(p2);
    Problem p3 = make_problem("short decode float D64", 2, 1, 5000, 16, 64, 512, false, rng);
    p3.nv = {5000, 700};
    ok &= run_problem(p3);
  }
  return ok;
}


// ---------------------------------------------------------------------------------------------
// key stores (paged / FP8) and the short-row decode path (one thread-block cluster per query)
// ---------------------------------------------------------------------------------------------
// How the keys of a Problem are stored for the kernel: dense or paged through a block table
// (hide_every > 0: every hide_every-th logical block of each row gets a block id outside
// [0, num_blocks), alternately -1 and num_blocks + 7: its keys must never be read or selected),
// bf16 or the FP8 indexer layout (e4m3 rows then fp32 scales per block).
struct StoreSpec {
  bool paged = false;
  bool fp8 = false;
  int bs = 64;  // block size (paged)
  int hide_every = 0;
};

std::string spec_name(const StoreSpec& sp) {
  std::string n = sp.fp8 ? "fp8" : "bf16";
  n += sp.paged ? " paged bs=" + std::to_string(sp.bs) : " dense";
  if (sp.hide_every) n += " hide 1/" + std::to_string(sp.hide_every);
  return n;
}

// e4m3 code of a value that e4m3 represents exactly (integers in [-3, 3], the subnormals
// m 2^-9, ...), or NaN (0x7f)
uint8_t e4m3_of(float v) {
  if (std::isnan(v)) return 0x7f;
  const float a = std::fabs(v);
  uint8_t m = 0x00;
  if (a > 0.f && a < 0x1p-6f) {
    m = static_cast<uint8_t>(a * 512.f);  // subnormal: exponent field 0, mantissa a / 2^-9
  } else if (a > 0.f) {
    const int e = static_cast<int>(std::floor(std::log2(a)));
    m = static_cast<uint8_t>(((e + 7) << 3) | static_cast<int>((a / std::ldexp(1.f, e) - 1.f) * 8.f));
  }
  return static_cast<uint8_t>(m | (std::signbit(v) ? 0x80 : 0x00));
}

// An exact problem whose keys use e4m3 subnormals (m 2^-9), the smallest normals, +-0 and
// integers up to 3 (FP8 stores only: build_store encodes them exactly), 8 heads with weights 1
// or 2: every score is a multiple of 2^-9 below 2^14, exact in fp32 in any summation order.
Problem make_fp8_codes_problem(const std::string& name, int T, int B, int C, std::mt19937& rng) {
  Problem p = make_problem(name, T, B, C, 8, 128, 512, true, rng);
  const float vals[] = {0.f, -0.f, 0x1p-9f, -0x1p-9f, 0x3p-9f, 0x7p-9f, -0x5p-9f, 0x1p-6f,
                        -0x1.2p-6f, 0x1.ep-5f, 1.f, -1.f, 2.f, 3.f, -3.f, 0.5f};
  std::uniform_int_distribution<int> vi(0, 15), wi(1, 2);
  for (auto& v : p.keys) v = float_to_bf16(vals[vi(rng)]);
  for (auto& v : p.w) v = static_cast<float>(wi(rng));
  return p;
}

struct StoreBufs {
  void* data = nullptr;
  int32_t* bt = nullptr;
  dsv4::IndexerKeys keys;
};

// Entry `src` of the FP8 keys (D e4m3 bytes in e4, one fp32 scale) as entry e of a block of
// `entries` entries in the indexer layout: every entry's D bytes, then every entry's scale.
void put_fp8_entry(uint8_t* block, int entries, int e, const std::vector<uint8_t>& e4,
                   const std::vector<float>& scale, size_t src, int D) {
  std::memcpy(block + static_cast<int64_t>(e) * D, e4.data() + src * D, D);
  std::memcpy(block + static_cast<int64_t>(entries) * D + static_cast<int64_t>(e) * 4,
              &scale[src], 4);
}

// Builds the device store of p's keys under sp and rewrites p's keys into the reference's view:
// FP8 keys become e4m3 integer value x a per-key power-of-two scale (exact in bf16; p must be
// an exact problem with integer keys in [-3, 3] or NaN), hidden keys become NaN (never
// selected, as the kernel's hidden keys). Paged stores need p.C % sp.bs == 0.
StoreBufs build_store(Problem& p, const StoreSpec& sp, std::mt19937& rng) {
  StoreBufs sb;
  const int D = p.D, B = std::max(p.B, 1), C = p.C;
  std::vector<float> scale(static_cast<size_t>(B) * C, 1.f);
  std::vector<uint8_t> e4(static_cast<size_t>(B) * C * D, 0);
  if (sp.fp8) {
    const float sv[] = {0.5f, 1.f, 2.f};
    std::uniform_int_distribution<int> si(0, 2);
    for (int b = 0; b < B; ++b) {
      for (int s = 0; s < C; ++s) {
        const float sc = sv[si(rng)];
        scale[static_cast<size_t>(b) * C + s] = sc;
        for (int d = 0; d < D; ++d) {
          uint16_t& k = p.keys[(static_cast<size_t>(b) * p.c_store + s) * D + d];
          const float v = bf16_to_float(k);
          e4[(static_cast<size_t>(b) * C + s) * D + d] = e4m3_of(v);
          if (!std::isnan(v)) k = float_to_bf16(v * sc);
        }
      }
    }
  }
  auto put_bf16 = [&](std::vector<uint16_t>& dst, size_t at, int b, int s) {
    std::memcpy(dst.data() + at, p.keys.data() + (static_cast<size_t>(b) * p.c_store + s) * D,
                static_cast<size_t>(D) * 2);
  };
  if (!sp.paged) {
    if (!sp.fp8) {
      CHECK_CUDA(cudaMalloc(&sb.data, p.keys.size() * 2));
      CHECK_CUDA(cudaMemcpy(sb.data, p.keys.data(), p.keys.size() * 2, cudaMemcpyHostToDevice));
      sb.keys.stride_block = p.c_store * D;
      sb.keys.stride_entry = D;
    } else {
      const int64_t stride = (static_cast<int64_t>(C) * (D + 4) + 15) / 16 * 16;
      std::vector<uint8_t> buf(static_cast<size_t>(B) * stride, 0);
      for (int b = 0; b < B; ++b) {
        for (int s = 0; s < C; ++s) {
          put_fp8_entry(buf.data() + b * stride, C, s, e4, scale,
                        static_cast<size_t>(b) * C + s, D);
        }
      }
      CHECK_CUDA(cudaMalloc(&sb.data, buf.size()));
      CHECK_CUDA(cudaMemcpy(sb.data, buf.data(), buf.size(), cudaMemcpyHostToDevice));
      sb.keys.format = dsv4::CacheFormat::kFp8Indexer;
      sb.keys.stride_block = stride;
    }
    sb.keys.data = sb.data;
    sb.keys.rows = p.B;
    sb.keys.capacity = C;
    return sb;
  }
  const int bs = sp.bs, mb = C / bs;
  if (mb * bs != C) {
    std::fprintf(stderr, "FAIL: check bug: paged store with C %% block size != 0\n");
    std::exit(1);
  }
  const int nblk = B * mb + 3;
  std::vector<int> ids(nblk);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  const int bt_st = mb + 1;
  std::vector<int32_t> bt(static_cast<size_t>(B) * bt_st, 12345);
  int hidden = 0;
  for (int b = 0; b < B; ++b) {
    for (int c = 0; c < mb; ++c) {
      int id = ids[b * mb + c];
      if (sp.hide_every > 0 && (b + c) % sp.hide_every == sp.hide_every - 1) {
        id = (hidden++ & 1) ? nblk + 7 : -1;
        for (int e = 0; e < bs; ++e)  // the reference: NaN (never selected)
          p.keys[(static_cast<size_t>(b) * p.c_store + c * bs + e) * D] = 0x7fc0;
      }
      bt[static_cast<size_t>(b) * bt_st + c] = id;
    }
  }
  if (!sp.fp8) {
    std::vector<uint16_t> pool(static_cast<size_t>(nblk) * bs * D, float_to_bf16(1.f));
    for (int b = 0; b < B; ++b)
      for (int c = 0; c < mb; ++c) {
        const int id = bt[static_cast<size_t>(b) * bt_st + c];
        if (id < 0 || id >= nblk) continue;
        for (int e = 0; e < bs; ++e) put_bf16(pool, (static_cast<size_t>(id) * bs + e) * D, b, c * bs + e);
      }
    CHECK_CUDA(cudaMalloc(&sb.data, pool.size() * 2));
    CHECK_CUDA(cudaMemcpy(sb.data, pool.data(), pool.size() * 2, cudaMemcpyHostToDevice));
    sb.keys.stride_block = static_cast<int64_t>(bs) * D;
    sb.keys.stride_entry = D;
  } else {
    const int64_t stride = (static_cast<int64_t>(bs) * (D + 4) + 15) / 16 * 16;
    std::vector<uint8_t> pool(static_cast<size_t>(nblk) * stride, 0x38);
    for (int b = 0; b < B; ++b)
      for (int c = 0; c < mb; ++c) {
        const int id = bt[static_cast<size_t>(b) * bt_st + c];
        if (id < 0 || id >= nblk) continue;
        for (int e = 0; e < bs; ++e) {
          const int s = c * bs + e;
          put_fp8_entry(pool.data() + id * stride, bs, e, e4, scale,
                        static_cast<size_t>(b) * C + s, D);
        }
      }
    CHECK_CUDA(cudaMalloc(&sb.data, pool.size()));
    CHECK_CUDA(cudaMemcpy(sb.data, pool.data(), pool.size(), cudaMemcpyHostToDevice));
    sb.keys.format = dsv4::CacheFormat::kFp8Indexer;
    sb.keys.stride_block = stride;
  }
  CHECK_CUDA(cudaMalloc(&sb.bt, bt.size() * 4));
  CHECK_CUDA(cudaMemcpy(sb.bt, bt.data(), bt.size() * 4, cudaMemcpyHostToDevice));
  sb.keys.data = sb.data;
  sb.keys.rows = p.B;
  sb.keys.block_table = sb.bt;
  sb.keys.block_table_stride = bt_st;
  sb.keys.max_blocks = mb;
  sb.keys.block_size = bs;
  sb.keys.num_blocks = nblk;
  return sb;
}

// "cs=N" (the short path with clusters of N CTAs) or "split" (the split / merge path; "split
// wgmma" when its scan runs on wgmma: the default where eligible, DSV4_INDEXER_WGMMA=0 off)
std::string path_name(const Problem& p, const dsv4::IndexerKeys& keys) {
  const int cs = dsv4::indexer_topk_short_cluster(p.T, keys, p.H, p.D, p.k);
  if (cs > 0) return "short cs=" + std::to_string(cs);
  return dsv4::indexer_topk_uses_wgmma(p.T, keys, p.H, p.D, p.k) ? "split wgmma" : "split";
}

// Runs p (already rewritten by build_store) on the store; checks every row against the
// reference. expect_short: 1 the short path must run, 0 the split path, -1 either.
bool run_store(const Problem& p, const StoreBufs& sb, bool det, int expect_short) {
  DeviceBufs d = upload_queries(p);
  int dev = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  d.ws_bytes = dsv4::indexer_topk_workspace_bytes(p.T, sb.keys, p.H, p.D, p.k, dev);
  if (d.ws_bytes) CHECK_CUDA(cudaMalloc(&d.ws, d.ws_bytes));
  const std::string path = path_name(p, sb.keys);
  auto go = [&]() {
    return dsv4::indexer_topk(d.q, static_cast<int64_t>(p.H) * p.D, p.D, d.w, p.H, sb.keys,
                              d.rows, d.nv, d.out, p.k, p.T, p.H, p.D, p.k, d.ws, d.ws_bytes,
                              nullptr);
  };
  const size_t n_out = static_cast<size_t>(p.T) * p.k;
  CHECK_CUDA(cudaMemset(d.out, 0x7f, n_out * 4));
  CHECK_CUDA(go());
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<int32_t> got(n_out);
  CHECK_CUDA(cudaMemcpy(got.data(), d.out, n_out * 4, cudaMemcpyDeviceToHost));
  bool ok = true;
  std::string msg;
  if (expect_short >= 0 && (path.rfind("short", 0) == 0) != (expect_short == 1)) {
    ok = false;
    msg = "unexpected path " + path;
  }
  const int bad = check_rows(p, got, d.out, det, go, ok, msg);
  const cudaError_t pend = cudaGetLastError();  // the op must leave no error pending
  if (pend != cudaSuccess) {
    ok = false;
    msg = std::string("error left pending: ") + cudaGetErrorName(pend) + "; " + msg;
  }
  std::printf("%s %-52s T=%-3d B=%-3d C=%-6d H=%-3d D=%-3d k=%-4d [%s]%s%s\n",
              ok ? "ok  " : "FAIL", p.name.c_str(), p.T, p.B, p.C, p.H, p.D, p.k, path.c_str(),
              ok ? "" : "  ", ok ? "" : (msg + " (" + std::to_string(bad) + " bad rows)").c_str());
  d.free_all();
  return ok;
}

bool run_spec(Problem p, const StoreSpec& sp, std::mt19937& rng, bool det = false,
              int expect_short = -1) {
  p.name += " [" + spec_name(sp) + "]";
  StoreBufs sb = build_store(p, sp, rng);
  const bool ok = run_store(p, sb, det, expect_short);
  cudaFree(sb.data);
  cudaFree(sb.bt);
  return ok;
}

// The short-row decode path's cases (run with the path on and off: the same indices).
// expect: 1 where the short path must run (DSV4_INDEXER_TOPK_SHORT unset / 1), -1 otherwise.
bool short_path_suite(std::mt19937& rng, int expect) {
  bool ok = true;
  const int lens[] = {1, 127, 128, 129, 511, 512, 513, 1024, 2047, 4096, 8192};
  const StoreSpec dense;
  for (int k : {512, 1024}) {
    // batch 1: C = N (cluster of ceil(N / 128) CTAs, 1 .. 16)
    for (int n : lens) {
      Problem p = make_problem("short path b=1 N=" + std::to_string(n), 1, 1, n, 64, 128, k,
                               true, rng);
      p.nv[0] = n;
      ok &= run_spec(p, dense, rng, n == 1024 || n == 129, expect);
    }
    // batch 2 in a larger capacity (idle CTAs, ranges balanced on n_valid): N and N / 2
    for (int n : lens) {
      const int C = std::max(n, 2048);
      Problem p = make_problem("short path b=2 N=" + std::to_string(n), 2, 2, C, 64, 128, k,
                               true, rng);
      p.rows = {1, 0};
      p.nv = {n, n / 2};
      ok &= run_spec(p, dense, rng, false, expect);
    }
    // batch 8: every length once per k (rows reversed, lengths - 0 / 1 / 2)
    {
      Problem p = make_problem("short path b=8 mixed N", 8, 8, 8192, 64, 128, k, true, rng);
      const int l8[] = {8192, 1, 127, 129, 513, 1024, 2047, 4096};
      for (int t = 0; t < 8; ++t) p.rows[t] = 7 - t, p.nv[t] = l8[t] - (t % 3 == 2 ? 1 : 0);
      ok &= run_spec(p, dense, rng, true, expect);
      Problem p2 = make_problem("short path b=8 N=1024 C=2048", 8, 8, 2048, 64, 128, k, true,
                                rng);
      for (int t = 0; t < 8; ++t) p2.rows[t] = t, p2.nv[t] = 1024 + 7 * t;
      ok &= run_spec(p2, dense, rng, false, expect);
    }
  }
  {  // empty rows, a bad row, clamped n_valid
    Problem p = make_problem("short path empty / bad rows", 4, 2, 1024, 64, 128, 512, true, rng);
    p.rows = {0, -1, 1, 5};
    p.nv = {0, 100, 100000, 50};
    ok &= run_spec(p, dense, rng, false, expect);
  }
  {  // NaN scores: NaN keys scattered, and a row that is NaN from entry 600 on
    Problem p = make_problem("short path NaN keys", 2, 1, 3000, 64, 128, 512, true, rng);
    std::uniform_int_distribution<int> u(0, 9);
    for (int sidx = 0; sidx < 3000; ++sidx)
      if (u(rng) == 0 || sidx >= 2600) p.keys[static_cast<size_t>(sidx) * 128 + u(rng)] = 0x7fc0;
    p.nv = {3000, 700};
    ok &= run_spec(p, dense, rng, true, expect);
    Problem p2 = make_problem("short path all-NaN row", 1, 1, 600, 64, 128, 512, true, rng);
    std::fill(p2.keys.begin(), p2.keys.end(), static_cast<uint16_t>(0x7fc0));
    p2.nv = {600};
    ok &= run_spec(p2, dense, rng, false, expect);
  }
  {  // ties: all scores +-0 (negative weights: -0.0 == +0.0), and 100 winners + zeros with
     // k above and below the number of distinct values
    for (int k : {512, 1024}) {
      Problem p = make_problem("short path all-zero keys", 2, 1, 4096, 64, 128, k, true, rng);
      std::fill(p.keys.begin(), p.keys.end(), float_to_bf16(0.f));
      p.nv = {4096, 1500};
      ok &= run_spec(p, dense, rng, true, expect);
    }
    for (int k : {64, 512}) {
      Problem p = make_problem("short path 100 winners + zeros k=" + std::to_string(k), 1, 1,
                               8192, 64, 128, k, true, rng);
      std::fill(p.keys.begin(), p.keys.end(), float_to_bf16(0.f));
      for (auto& v : p.q) v = float_to_bf16(1.f);
      for (auto& v : p.w) v = 0.5f;
      std::vector<int> pos(8192);
      std::iota(pos.begin(), pos.end(), 0);
      std::shuffle(pos.begin(), pos.end(), rng);
      for (int i = 0; i < 100; ++i)  // two winners per value: ties among winners too
        p.keys[static_cast<size_t>(pos[i]) * p.D + (i % p.D)] = float_to_bf16(static_cast<float>(i / 2 + 1));
      p.nv = {8192};
      ok &= run_spec(p, dense, rng, true, expect);
    }
    // scores differing only in low mantissa bits (one bin per round until the last)
    Problem p = make_low_mantissa_problem("short path low mantissa bits", 8192, rng);
    ok &= run_spec(p, dense, rng, true, expect);
  }
  {  // paged (hidden blocks, block sizes 64 and 37), FP8 dense and paged, D 64, heads 1 / 100
    StoreSpec pg;
    pg.paged = true;
    pg.hide_every = 3;
    for (int bs : {64, 37}) {
      pg.bs = bs;
      const int C = bs * (4096 / bs);
      Problem p = make_problem("short path paged b=2", 2, 2, C, 64, 128, 512, true, rng);
      p.rows = {1, 0};
      p.nv = {C, 1000};
      ok &= run_spec(p, pg, rng, true, expect);
    }
    StoreSpec f8;
    f8.fp8 = true;
    for (int n : {129, 1024, 8192}) {
      Problem p = make_problem("short path fp8 dense b=1 N=" + std::to_string(n), 1, 1, 8192, 64,
                               128, 512, true, rng);
      p.nv = {n};
      ok &= run_spec(p, f8, rng, n == 1024, expect);
    }
    f8.paged = true;
    f8.hide_every = 4;
    Problem p = make_problem("short path fp8 paged b=8", 8, 8, 2048, 64, 128, 1024, true, rng);
    for (int t = 0; t < 8; ++t) p.rows[t] = (t * 3) % 8, p.nv[t] = 2048 - 200 * t;
    ok &= run_spec(p, f8, rng, true, expect);
    Problem p2 = make_problem("short path fp8 paged NaN", 2, 1, 1024, 64, 128, 512, true, rng);
    for (int sidx = 0; sidx < 1024; sidx += 5) p2.keys[static_cast<size_t>(sidx) * 128 + 3] = 0x7fc0;
    p2.nv = {1024, 333};
    ok &= run_spec(p2, f8, rng, false, expect);
    // e4m3 subnormal / small codes (exact scores), NaN keys too; the long row (C = 40000)
    // takes the split path whatever the short-path switch
    Problem p5 = make_fp8_codes_problem("fp8 subnormal codes paged", 2, 2, 4096, rng);
    for (int sidx = 0; sidx < 4096; sidx += 7) p5.keys[static_cast<size_t>(sidx) * 128 + 5] = 0x7fc0;
    p5.nv = {4096, 2900};
    ok &= run_spec(p5, f8, rng, true, expect);
    StoreSpec f8d;
    f8d.fp8 = true;
    Problem p6 = make_fp8_codes_problem("fp8 subnormal codes dense b=1", 1, 1, 3000, rng);
    p6.nv = {3000};
    ok &= run_spec(p6, f8d, rng, false, expect);
    Problem p7 = make_fp8_codes_problem("fp8 subnormal codes dense long", 2, 2, 40000, rng);
    for (int sidx = 100; sidx < 40000; sidx += 97) p7.keys[static_cast<size_t>(sidx) * 128 + 64] = 0x7fc0;
    p7.nv = {40000, 39001};
    ok &= run_spec(p7, f8d, rng, false, expect == 1 ? 0 : -1);
    pg.bs = 64;
    Problem p3 = make_problem("short path D64 paged", 3, 3, 1536, 16, 64, 512, true, rng);
    p3.nv = {1536, 700, 0};
    ok &= run_spec(p3, pg, rng, false, expect);
    for (int H : {1, 100}) {
      Problem p4 = make_problem("short path heads=" + std::to_string(H), 2, 2, 3000, H, 128, 256,
                                true, rng);
      p4.nv = {3000, 1999};
      ok &= run_spec(p4, dense, rng, false, expect);
    }
  }
  {  // float scores (set check with tolerance)
    Problem p = make_problem("short path float b=2", 2, 2, 6000, 64, 128, 1024, false, rng);
    p.nv = {6000, 1500};
    ok &= run_spec(p, dense, rng, true, expect);
  }
  {  // not eligible (batch 64 / capacity 64K): the split path, same results
    Problem p = make_problem("short path off: T=20", 20, 20, 1024, 64, 128, 512, true, rng);
    for (int t = 0; t < 20; ++t) p.rows[t] = t, p.nv[t] = 1024 - t;
    ok &= run_spec(p, dense, rng, false, expect == 1 ? 0 : -1);
  }
  return ok;
}

// ---------------------------------------------------------------------------------------------
// --refusal: the fallback paths of refused queries and launches (DSV4_TEST_REFUSE, test only,
// csrc/kernels/own_error.cuh), in a fresh process (the cluster queries must not be cached yet)
// ---------------------------------------------------------------------------------------------

// One call of p into d.out, poisoned first: the call's return, the error left pending after it
// (read and cleared), the output. pend_first: leave cudaErrorInvalidValue pending before the
// call, as an unrelated earlier launch of the caller could (DSV4_TEST_REFUSE's code too).
struct IdxRun {
  cudaError_t ret = cudaSuccess, pending = cudaSuccess;
  bool injected = true;
  std::vector<int32_t> out;
};
IdxRun poisoned_run(const Problem& p, const DeviceBufs& d, bool pend_first) {
  const size_t n = static_cast<size_t>(p.T) * p.k;
  CHECK_CUDA(cudaMemset(d.out, 0x7f, n * 4));
  CHECK_CUDA(cudaDeviceSynchronize());
  IdxRun r;
  if (pend_first) r.injected = leave_error_pending();
  r.ret = launch(p, d);
  r.pending = cudaGetLastError();
  CHECK_CUDA(cudaDeviceSynchronize());
  r.out.resize(n);
  CHECK_CUDA(cudaMemcpy(r.out.data(), d.out, n * 4, cudaMemcpyDeviceToHost));
  return r;
}

// "short cs=N" or "split" for p on its dense keys, as indexer_topk would choose now
std::string dense_path(const Problem& p) {
  dsv4::IndexerKeys kk;
  kk.rows = p.B;
  kk.capacity = p.C;
  return path_name(p, kk);
}

// One refusal-suite call: no error returned or left pending, the expected path ("short" /
// "split" prefix; empty: any), every row right against the reference (check_ref), and
// (ref != nullptr) the same indices as ref.
bool refusal_call(const Problem& p, const DeviceBufs& d, const char* phase, const char* expect,
                  bool check_ref, const IdxRun* ref, IdxRun* keep) {
  const std::string path = dense_path(p);
  IdxRun r = poisoned_run(p, d, false);
  bool ok = r.ret == cudaSuccess && r.pending == cudaSuccess;
  std::string msg;
  if (expect[0] != '\0' && path.rfind(expect, 0) != 0) {
    ok = false;
    msg = " UNEXPECTED PATH";
  }
  int bad = 0;
  if (check_ref && r.ret == cudaSuccess)
    for (int t = 0; t < p.T; ++t)
      if (!check_row(p, t, r.out.data() + static_cast<size_t>(t) * p.k).empty()) ++bad;
  if (bad > 0) {
    ok = false;
    msg += " " + std::to_string(bad) + " BAD ROWS";
  }
  if (ref != nullptr) msg += r.out == ref->out ? ", same indices as the default path" : " INDICES DIFFER";
  if (ref != nullptr && r.out != ref->out) ok = false;
  std::printf("%s refusal: %-30s %-34s T=%-2d C=%-6d k=%-4d [%s] returned %s, pending after %s%s\n",
              ok ? "ok  " : "FAIL", phase, p.name.c_str(), p.T, p.C, p.k, path.c_str(),
              cudaGetErrorName(r.ret), cudaGetErrorName(r.pending), msg.c_str());
  if (keep != nullptr) *keep = std::move(r);
  return ok;
}

// A call made with an error already pending: it must reach the caller (returned by the call or
// still pending after it); the launcher may not clear it.
bool pending_kept(const Problem& p, const DeviceBufs& d, const char* phase) {
  const IdxRun r = poisoned_run(p, d, true);
  const bool ok = pending_error_kept(r.injected, r.ret, r.pending);
  std::printf("%s refusal: %-30s error pending before the call kept (%s): returned %s, pending "
              "after %s%s\n",
              ok ? "ok  " : "FAIL", phase, p.name.c_str(), cudaGetErrorName(r.ret),
              cudaGetErrorName(r.pending), r.injected ? "" : " (COULD NOT LEAVE AN ERROR PENDING)");
  return ok;
}

// dsv4_check::refusal_happened for the call of `p` in `phase` since `before`.
bool refusal_happened(long long before, const char* phase, const Problem& p) {
  char label[96];
  std::snprintf(label, sizeof(label), "refusal: %-30s %-34s during the call:", phase,
                p.name.c_str());
  return dsv4_check::refusal_happened(before, label);
}

bool refusal_suite(std::mt19937& rng) {
  bool ok = true;
  unsetenv("DSV4_INDEXER_TOPK_SHORT");
  unsetenv("DSV4_INDEXER_TOPK_PDL");
  dsv4::indexer_topk_set_merge(0);
  // short-path eligible decode rows (exact scores: one right answer, order of ties included)
  std::vector<Problem> sp;
  sp.push_back(make_problem("short b=1 N=1024", 1, 1, 1024, 64, 128, 512, true, rng));
  sp.back().nv = {1024};
  sp.push_back(make_problem("short b=2 N=4096/2000", 2, 2, 4096, 64, 128, 1024, true, rng));
  sp.back().rows = {1, 0};
  sp.back().nv = {4096, 2000};
  sp.push_back(make_problem("short b=8 C=2048", 8, 8, 2048, 64, 128, 512, true, rng));
  for (int t = 0; t < 8; ++t) sp.back().rows[t] = 7 - t, sp.back().nv[t] = 2048 - 129 * t;
  sp.push_back(make_problem("short D64 b=3", 3, 3, 1536, 16, 64, 512, true, rng));
  sp.back().nv = {1536, 700, 0};
  std::vector<DeviceBufs> sd;
  for (const Problem& p : sp) sd.push_back(upload(p));
  std::vector<IdxRun> q(sp.size()), n(sp.size());

  // A: DSV4_TEST_REFUSE=query before any cluster query is cached: every query fails (not
  // cached), the split path runs
  setenv("DSV4_TEST_REFUSE", "query", 1);
  std::printf("-- DSV4_TEST_REFUSE=query (no cluster query cached yet)\n");
  ok &= pending_kept(sp[0], sd[0], "query refused:");
  for (size_t i = 0; i < sp.size(); ++i)
    ok &= refusal_call(sp[i], sd[i], "query refused:", "split", true, nullptr, &q[i]);

  // B: unset: the queries succeed now (the failed ones were not cached): the short path, the
  // same indices
  unsetenv("DSV4_TEST_REFUSE");
  std::printf("-- DSV4_TEST_REFUSE unset (default paths)\n");
  for (size_t i = 0; i < sp.size(); ++i)
    ok &= refusal_call(sp[i], sd[i], "default:", "short", true, &q[i], &n[i]);
  for (auto& d : sd) d.free_all();

  // C: the programmatic launch of the selection (histogram-select plans: merge mode "hist",
  // short path off) refused (DSV4_TEST_REFUSE=launch): the plain launch runs, same indices
  setenv("DSV4_INDEXER_TOPK_SHORT", "0", 1);
  dsv4::indexer_topk_set_merge(2);
  std::vector<Problem> hp;
  hp.push_back(make_problem("hist T=1 N=4097", 1, 1, 8192, 64, 128, 512, true, rng));
  hp.back().nv = {4097};
  hp.push_back(make_problem("hist T=4 N=8192..", 4, 4, 8192, 16, 128, 1024, true, rng));
  for (int t = 0; t < 4; ++t) hp.back().rows[t] = t, hp.back().nv[t] = 8192 - 1000 * t;
  hp.push_back(make_problem("hist T=2 C=40000 float", 2, 2, 40000, 16, 128, 512, false, rng));
  hp.back().nv = {40000, 33333};
  std::printf("-- DSV4_TEST_REFUSE=launch (the selection's programmatic launch refused), merge "
              "hist, short path off\n");
  for (Problem& p : hp) {
    DeviceBufs d = upload(p);
    unsetenv("DSV4_TEST_REFUSE");
    IdxRun def;
    ok &= refusal_call(p, d, "default (PDL):", "split", true, nullptr, &def);
    setenv("DSV4_TEST_REFUSE", "launch", 1);
    const long long r0 = dsv4::refusals_for_test().load();
    ok &= refusal_call(p, d, "launch refused:", "split", false, &def, nullptr);
    ok &= refusal_happened(r0, "launch refused:", p);
    ok &= pending_kept(p, d, "launch refused:");
    d.free_all();
  }
  unsetenv("DSV4_TEST_REFUSE");

  // D: merge mode "coop" (short path off): the cooperative launch's occupancy query refused
  // (nothing cached yet: the two launches run), then the default (the cooperative launch runs),
  // then the cooperative launch refused (DSV4_TEST_REFUSE=launch: the two launches run): the
  // same indices each time, and the counters say which path ran.
  dsv4::indexer_topk_set_merge(4);
  std::printf("-- merge coop, short path off: DSV4_TEST_REFUSE=query (no cooperative query cached "
              "yet), then unset, then launch\n");
  auto counts = [] {
    long long l = 0, dcl = 0;
    dsv4::indexer_topk_coop_counts(&l, &dcl);
    return std::make_pair(l, dcl);
  };
  auto expect_path = [&](const Problem& p, const char* phase, std::pair<long long, long long> before,
                         bool coop) {
    const auto after = counts();
    const bool good = coop ? (after.first > before.first && after.second == before.second)
                           : (after.first == before.first && after.second > before.second);
    std::printf("%s coop counters: %-30s %-34s launched +%lld, declined +%lld (expected %s)\n",
                good ? "ok  " : "FAIL", phase, p.name.c_str(), after.first - before.first,
                after.second - before.second, good ? "so" : coop ? "the cooperative launch" : "two launches");
    return good;
  };
  std::vector<DeviceBufs> hd;
  std::vector<IdxRun> qref(hp.size());
  for (const Problem& p : hp) hd.push_back(upload(p));
  setenv("DSV4_TEST_REFUSE", "query", 1);
  for (size_t i = 0; i < hp.size(); ++i) {
    const auto c0 = counts();
    ok &= refusal_call(hp[i], hd[i], "coop query refused:", "split", true, nullptr, &qref[i]);
    ok &= expect_path(hp[i], "coop query refused:", c0, false);
  }
  for (size_t i = 0; i < hp.size(); ++i) {
    unsetenv("DSV4_TEST_REFUSE");
    auto c0 = counts();
    IdxRun def;
    ok &= refusal_call(hp[i], hd[i], "coop default:", "split", true, &qref[i], &def);
    ok &= expect_path(hp[i], "coop default:", c0, true);
    setenv("DSV4_TEST_REFUSE", "launch", 1);
    c0 = counts();
    const long long r0 = dsv4::refusals_for_test().load();
    ok &= refusal_call(hp[i], hd[i], "coop launch refused:", "split", false, &def, nullptr);
    ok &= refusal_happened(r0, "coop launch refused:", hp[i]);
    ok &= expect_path(hp[i], "coop launch refused:", c0, false);
    ok &= pending_kept(hp[i], hd[i], "coop launch refused:");
  }
  unsetenv("DSV4_TEST_REFUSE");
  for (auto& d : hd) d.free_all();
  unsetenv("DSV4_INDEXER_TOPK_SHORT");
  dsv4::indexer_topk_set_merge(0);
  return ok;
}

// ---------------------------------------------------------------------------------------------
// --decode-suites / --bench-wgmma: the decode scan on wgmma (the default) and on mma.sync
// (DSV4_INDEXER_WGMMA=0)
// ---------------------------------------------------------------------------------------------
// Every decode case of the suites above under the current environment (run it once as is and
// once with DSV4_INDEXER_WGMMA=0; ctest does both): auto merge (tree below 17 splits, histogram select above:
// both scan kernels), the tree for the long rows, and the short-row cases on the split path
// (DSV4_INDEXER_TOPK_SHORT=0: paged with hidden blocks, FP8 dense / paged, heads 1 / 100, D 64).
// (The full run's "histogram select for every split plan" pass is left out: same kernels, and
// its prefill cases cost most of the CPU reference time.)
bool decode_suites(std::mt19937& rng) {
  dsv4::IndexerKeys kk;
  kk.rows = 1;
  kk.capacity = 262144;
  const char* e = std::getenv("DSV4_INDEXER_WGMMA");
  std::printf("-- decode suites, DSV4_INDEXER_WGMMA=%s (a 1M bf16 decode call takes the wgmma "
              "scan: %s)\n",
              e != nullptr ? e : "(unset)",
              dsv4::indexer_topk_uses_wgmma(1, kk, 64, 128, 512) ? "yes" : "no");
  // the wgmma scan asked for (DSV4_INDEXER_WGMMA unset or not "0") but the plan does not take
  // it: every case below would pass on the mma.sync scan, so say so instead of passing
  // vacuously; and the converse for DSV4_INDEXER_WGMMA=0
  const bool want_wg = e == nullptr || std::strcmp(e, "0") != 0;
  bool ok = true;
  if (want_wg != dsv4::indexer_topk_uses_wgmma(1, kk, 64, 128, 512)) {
    std::printf("FAIL DSV4_INDEXER_WGMMA=%s but a 1M bf16 decode call %s the wgmma scan\n",
                e != nullptr ? e : "(unset)", want_wg ? "does not take" : "takes");
    ok = false;
  }
  dsv4::indexer_topk_set_merge(0);
  std::printf("-- merge: auto\n");
  ok &= correctness_suite(rng);
  ok &= long_decode_suite(rng);
  std::printf("-- merge: tree\n");
  dsv4::indexer_topk_set_merge(1);
  ok &= long_decode_suite(rng);
  dsv4::indexer_topk_set_merge(0);
  setenv("DSV4_INDEXER_TOPK_SHORT", "0", 1);
  // FP8 keys with more than 64 heads (two head blocks of the permuted q), dense and paged
  auto fp8_two_head_blocks = [&rng] {
    bool r = true;
    StoreSpec f8;
    f8.fp8 = true;
    Problem p = make_problem("fp8 dense heads=100 split", 3, 3, 5000, 100, 128, 512, true, rng);
    p.rows = {2, 0, 1};
    p.nv = {5000, 2345, 129};
    r &= run_spec(p, f8, rng, false, 0);
    f8.paged = true;
    f8.hide_every = 5;
    Problem p2 = make_problem("fp8 paged heads=128 split", 2, 2, 4096, 128, 128, 256, true, rng);
    p2.nv = {4096, 3001};
    r &= run_spec(p2, f8, rng, false, 0);
    return r;
  };
  std::printf("-- short-row cases on the split path (DSV4_INDEXER_TOPK_SHORT=0), merge auto\n");
  ok &= short_decode_suite(rng);
  ok &= short_path_suite(rng, 0);
  ok &= fp8_two_head_blocks();
  // the same cases with the selection inside a cooperative scan grid (merge coop; under
  // DSV4_INDEXER_WGMMA=1 its candidates reuse the key tiles while q stays in shared memory)
  std::printf("-- short-row cases on the split path, merge coop\n");
  long long l0 = 0, l1 = 0;
  dsv4::indexer_topk_coop_counts(&l0, nullptr);
  dsv4::indexer_topk_set_merge(4);
  ok &= short_path_suite(rng, 0);
  ok &= fp8_two_head_blocks();
  dsv4::indexer_topk_set_merge(0);
  dsv4::indexer_topk_coop_counts(&l1, nullptr);
  std::printf("%s merge coop: %lld cooperative launches\n", l1 > l0 ? "ok  " : "FAIL", l1 - l0);
  ok &= l1 > l0;
  unsetenv("DSV4_INDEXER_TOPK_SHORT");
  return ok;
}

// Exact fp32 value of an e4m3 code (no NaN codes here).
float e4m3_value(uint8_t b) {
  const int e = (b >> 3) & 15, m = b & 7;
  const float mag = e == 0 ? std::ldexp(static_cast<float>(m), -9)
                           : std::ldexp(1.f + static_cast<float>(m) / 8.f, e - 7);
  return (b & 0x80) ? -mag : mag;
}

// FP8 indexer blocks for the bench: values like fill_bf16's (x 16, e4m3, saturating), scale
// 1/16 per entry (a power of two, as the cache's).
__global__ void fill_fp8_blocks(uint8_t* pool, int64_t n_blocks, int bs, int D, int64_t stride,
                                uint64_t seed) {
  const int64_t per = static_cast<int64_t>(bs) * D;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < n_blocks * per; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t h = mix64(seed ^ (static_cast<uint64_t>(i) * 0x2545f4914f6cdd1dull));
    float v = 0.f;
    for (int j = 0; j < 3; ++j) v += static_cast<float>((h >> (j * 21)) & 0x1fffff) / 1048576.f - 1.f;
    pool[(i / per) * stride + i % per] =
        static_cast<uint8_t>(__nv_cvt_float_to_fp8(v * 16.f, __NV_SATFINITE, __NV_E4M3));
  }
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n_blocks * bs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    *reinterpret_cast<float*>(pool + (i / bs) * stride + per + (i % bs) * 4) = 0.0625f;
  }
}

// One decode bench case on FP8 paged keys (block size 64; row b owns blocks [b mb, b mb + mb)),
// T queries over N entries each, H 64, D 128: cold-L2 time of the full call, and (check) query
// 0 checked against the CPU reference on the decoded keys.
bool bench_fp8_case(int T, int N, int k, int reps, bool check, void* flush, size_t flush_bytes,
                    double* med_us) {
  const int H = 64, D = 128, bs = 64;
  const int mb = (N + bs - 1) / bs;
  const int64_t stride = (static_cast<int64_t>(bs) * (D + 4) + 15) / 16 * 16;
  const int64_t nblk = static_cast<int64_t>(T) * mb;
  uint8_t* pool = nullptr;
  int32_t* bt = nullptr;
  CHECK_CUDA(cudaMalloc(&pool, nblk * stride));
  CHECK_CUDA(cudaMalloc(&bt, nblk * 4));
  std::vector<int32_t> bth(nblk);
  std::iota(bth.begin(), bth.end(), 0);
  CHECK_CUDA(cudaMemcpy(bt, bth.data(), nblk * 4, cudaMemcpyHostToDevice));
  fill_fp8_blocks<<<4096, 256>>>(pool, nblk, bs, D, stride, 7);
  CHECK_CUDA(cudaGetLastError());
  dsv4::IndexerKeys keys;
  keys.data = pool;
  keys.format = dsv4::CacheFormat::kFp8Indexer;
  keys.stride_block = stride;
  keys.rows = T;
  keys.block_table = bt;
  keys.block_table_stride = mb;
  keys.max_blocks = mb;
  keys.block_size = bs;
  keys.num_blocks = nblk;
  DeviceBufs d;
  const size_t nq = static_cast<size_t>(T) * H * D;
  CHECK_CUDA(cudaMalloc(&d.q, nq * 2));
  CHECK_CUDA(cudaMalloc(&d.w, static_cast<size_t>(T) * H * 4));
  CHECK_CUDA(cudaMalloc(&d.rows, T * 4));
  CHECK_CUDA(cudaMalloc(&d.nv, T * 4));
  CHECK_CUDA(cudaMalloc(&d.out, static_cast<size_t>(T) * k * 4));
  fill_bf16<<<1024, 256>>>(static_cast<__nv_bfloat16*>(d.q), nq, 1);
  fill_f32<<<256, 256>>>(d.w, static_cast<size_t>(T) * H, 3, 0.0156f);
  CHECK_CUDA(cudaGetLastError());
  std::vector<int32_t> rows(T), nv(T, N);
  std::iota(rows.begin(), rows.end(), 0);
  CHECK_CUDA(cudaMemcpy(d.rows, rows.data(), T * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d.nv, nv.data(), T * 4, cudaMemcpyHostToDevice));
  int dev = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  d.ws_bytes = dsv4::indexer_topk_workspace_bytes(T, keys, H, D, k, dev);
  if (d.ws_bytes) CHECK_CUDA(cudaMalloc(&d.ws, d.ws_bytes));
  CHECK_CUDA(cudaMemset(d.out, 0x7f, static_cast<size_t>(T) * k * 4));
  auto go = [&] {
    return dsv4::indexer_topk(d.q, static_cast<int64_t>(H) * D, D, d.w, H, keys, d.rows, d.nv,
                              d.out, k, T, H, D, k, d.ws, d.ws_bytes, nullptr);
  };
  const Timing full = time_cold([&] { CHECK_CUDA(go()); }, reps, flush, flush_bytes);
  bool ok = true;
  std::string msg;
  std::vector<int32_t> got(static_cast<size_t>(T) * k);
  CHECK_CUDA(cudaMemcpy(got.data(), d.out, got.size() * 4, cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < got.size() && ok; ++i)
    if (got[i] == 0x7f7f7f7f) ok = false, msg = "unwritten output slot";
  if (check && ok) {  // query 0 (row 0: blocks [0, mb))
    Problem one;
    one.name = "fp8 paged";
    one.T = 1, one.B = 1, one.C = N, one.H = H, one.D = D, one.k = k, one.c_store = N;
    one.exact = false;
    one.rows = {0};
    one.nv = {N};
    one.q.resize(static_cast<size_t>(H) * D);
    one.w.resize(H);
    CHECK_CUDA(cudaMemcpy(one.q.data(), d.q, one.q.size() * 2, cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(one.w.data(), d.w, H * 4, cudaMemcpyDeviceToHost));
    std::vector<uint8_t> raw(static_cast<size_t>(mb) * stride);
    CHECK_CUDA(cudaMemcpy(raw.data(), pool, raw.size(), cudaMemcpyDeviceToHost));
    one.keys.resize(static_cast<size_t>(N) * D);
    for (int sidx = 0; sidx < N; ++sidx) {
      const uint8_t* blk = raw.data() + static_cast<size_t>(sidx / bs) * stride;
      const int e = sidx % bs;
      float sc;
      std::memcpy(&sc, blk + static_cast<size_t>(bs) * D + e * 4, 4);
      for (int dd = 0; dd < D; ++dd)
        one.keys[static_cast<size_t>(sidx) * D + dd] =
            float_to_bf16(e4m3_value(blk[static_cast<size_t>(e) * D + dd]) * sc);
    }
    const std::string e = check_row(one, 0, got.data());
    if (!e.empty()) ok = false, msg = "t=0: " + e;
  }
  const bool wg = dsv4::indexer_topk_uses_wgmma(T, keys, H, D, k);
  const double key_bytes = static_cast<double>(T) * N * (D + 4);
  if (med_us) *med_us = full.med_us;
  std::printf("TIME fp8pg    T=%-6d N=%-7d k=%-5d full %9.1f us (min %9.1f)  key-bytes %7.0f GB/s  "
              "[%s]  %s%s\n",
              T, N, k, full.med_us, full.min_us, key_bytes / full.med_us * 1e-3,
              wg ? "wgmma" : "mma.sync", ok ? "check ok" : "CHECK FAIL: ", ok ? "" : msg.c_str());
  d.free_all();
  CHECK_CUDA(cudaFree(pool));
  CHECK_CUDA(cudaFree(bt));
  return ok;
}

// The wgmma scan against the mma.sync one, same process, cold L2: bf16 dense (full call and
// scan only) and FP8 paged (full call), decode batch 1 / 32 / 128 at 1M context (262144
// entries) and batch 1 at 32K (8192 entries: the short path, the same code either way).
bool bench_wgmma() {
  void* flush = nullptr;
  const size_t flush_bytes = 256ull << 20;
  CHECK_CUDA(cudaMalloc(&flush, flush_bytes));
  dsv4::indexer_topk_set_merge(0);
  dsv4::indexer_topk_set_tuning(0, 0);
  struct Case {
    bool fp8;
    int b, n;
  };
  const Case cases[] = {{false, 1, 262144}, {false, 32, 262144}, {false, 128, 262144},
                        {false, 1, 8192},   {true, 1, 262144},   {true, 32, 262144},
                        {true, 128, 262144}, {true, 1, 8192}};
  bool ok = true;
  std::vector<std::string> summary;
  for (const Case& c : cases) {
    double full[2] = {0, 0}, scan[2] = {0, 0};
    const int reps = c.b == 1 ? 15 : (c.b == 32 ? 7 : 5);
    for (int v = 0; v < 2; ++v) {
      setenv("DSV4_INDEXER_WGMMA", v == 0 ? "0" : "1", 1);  // mma.sync, then wgmma
      if (c.fp8) {
        ok &= bench_fp8_case(c.b, c.n, 512, reps, c.b == 1, flush, flush_bytes, &full[v]);
      } else {
        ok &= bench_case(v == 0 ? "mma.sync" : "wgmma", c.b, c.b, c.n, 512, false, reps,
                         c.b == 1 ? std::vector<int>{0} : std::vector<int>{}, flush, flush_bytes,
                         0, &full[v], &scan[v]);
      }
    }
    char buf[320];
    if (c.fp8) {
      std::snprintf(buf, sizeof(buf),
                    "WGMMA fp8 paged  b=%-3d N=%-6d k=512  full: mma.sync %8.1f us  wgmma %8.1f us  "
                    "x%.2f",
                    c.b, c.n, full[0], full[1], full[0] / full[1]);
    } else {
      std::snprintf(buf, sizeof(buf),
                    "WGMMA bf16 dense b=%-3d N=%-6d k=512  full: mma.sync %8.1f us  wgmma %8.1f us  "
                    "x%.2f   scan-only: mma.sync %8.1f us  wgmma %8.1f us  x%.2f",
                    c.b, c.n, full[0], full[1], full[0] / full[1], scan[0], scan[1],
                    scan[0] / scan[1]);
    }
    summary.push_back(buf);
  }
  unsetenv("DSV4_INDEXER_WGMMA");
  for (const auto& l : summary) std::printf("%s\n", l.c_str());
  CHECK_CUDA(cudaFree(flush));
  return ok;
}

// --suites M: every correctness suite under merge mode M alone (0 auto: the short path where
// eligible; other modes: the split path), with the number of cooperative launches made and
// declined (mode 4).
bool merge_suites(int mode, std::mt19937& rng) {
  static const char* const names[] = {"auto", "tree", "hist", "legacy", "coop"};
  dsv4::indexer_topk_set_merge(mode);
  long long l0 = 0, d0 = 0;
  dsv4::indexer_topk_coop_counts(&l0, &d0);
  std::printf("-- merge %s: correctness suite\n", names[mode]);
  bool ok = correctness_suite(rng);
  std::printf("-- merge %s: long decode\n", names[mode]);
  ok &= long_decode_suite(rng);
  std::printf("-- merge %s: short decode\n", names[mode]);
  ok &= short_decode_suite(rng);
  std::printf("-- merge %s: short-row path cases (dense / paged / FP8)\n", names[mode]);
  ok &= short_path_suite(rng, mode == 0 ? 1 : 0);
  long long l1 = 0, d1 = 0;
  dsv4::indexer_topk_coop_counts(&l1, &d1);
  std::printf("COOP counters (merge %s): %lld cooperative launches, %lld declined\n", names[mode],
              l1 - l0, d1 - d0);
  if (mode == 4 && l1 == l0) {
    std::printf("FAIL merge coop: no cooperative launch ran\n");
    ok = false;
  }
  dsv4::indexer_topk_set_merge(0);
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  int n_dev = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
    std::printf("SKIP: no CUDA device\n");
    return 0;
  }
  const bool bench = argc > 1 && std::string(argv[1]) == "--bench";
  const bool bench_short = argc > 1 && std::string(argv[1]) == "--bench-short";
  std::mt19937 rng(12345);
  // --refusal: the fallbacks of refused cluster queries and programmatic launches
  // (DSV4_TEST_REFUSE=query / launch; must run first in its process, before any query is cached)
  if (argc > 1 && std::string(argv[1]) == "--refusal") {
    const bool rok = refusal_suite(rng);
    std::printf("%s\n", rok ? "PASS" : "FAIL");
    return rok ? 0 : 1;
  }
  // --suites M: the correctness suites under merge mode M (0-4) alone
  if (argc > 2 && std::string(argv[1]) == "--suites") {
    const int mode = std::atoi(argv[2]);
    if (mode < 0 || mode > 4) {
      std::printf("usage: --suites M, merge mode M in 0-4\n");
      return 2;
    }
    const bool sok = merge_suites(mode, rng);
    std::printf("%s\n", sok ? "PASS" : "FAIL");
    return sok ? 0 : 1;
  }
  // --bench-coop: merge coop vs hist vs tree, same process, cold L2 (decode, topk 512)
  if (argc > 1 && std::string(argv[1]) == "--bench-coop") {
    void* flush = nullptr;
    const size_t flush_bytes = 256ull << 20;
    CHECK_CUDA(cudaMalloc(&flush, flush_bytes));
    bool bok = true;
    const int cases[][2] = {{1, 262144}, {2, 262144}, {4, 262144}, {7, 262144}, {1, 32768}};
    std::vector<std::string> summary;
    for (const auto& c : cases) {
      const int b = c[0], n = c[1];
      double full[3] = {0, 0, 0}, scan[3] = {0, 0, 0};
      const int modes[3] = {4, 2, 1};
      long long l0 = 0, l1 = 0;
      for (int m = 0; m < 3; ++m) {
        dsv4::indexer_topk_set_merge(modes[m]);
        if (m == 0) dsv4::indexer_topk_coop_counts(&l0, nullptr);
        // CPU checks cost ~1 s per 1M row: query 0 under coop (and b = 1 rows everywhere)
        std::vector<int> ts;
        if (m == 0 || n < 262144) ts = {0};
        if (m == 0 && b > 1 && n < 262144) ts.push_back(b - 1);
        bok &= bench_case(m == 0 ? "coop" : m == 1 ? "hist" : "tree", b, b, n, 512, false, 20, ts,
                          flush, flush_bytes, 0, &full[m], &scan[m]);
        if (m == 0) dsv4::indexer_topk_coop_counts(&l1, nullptr);
      }
      char buf[320];
      std::snprintf(buf, sizeof(buf),
                    "COOP b=%d N=%-6d k=512  coop %6.1f us  hist %6.1f us  tree %6.1f us  "
                    "scan-only %5.1f us  coop/hist %.2f  after-scan: coop %5.1f hist %5.1f us  "
                    "[%s]",
                    b, n, full[0], full[1], full[2], scan[1], full[0] / full[1],
                    full[0] - scan[1], full[1] - scan[1],
                    l1 > l0 ? "cooperative launch" : "COOP NOT LAUNCHED");
      if (l1 == l0) bok = false;
      summary.push_back(buf);
    }
    dsv4::indexer_topk_set_merge(0);
    for (const auto& l : summary) std::printf("%s\n", l.c_str());
    CHECK_CUDA(cudaFree(flush));
    std::printf("%s\n", bok ? "PASS" : "FAIL");
    return bok ? 0 : 1;
  }
  // --decode-suites: every decode case under the current environment (DSV4_INDEXER_WGMMA=0:
  // the mma.sync scan; else the wgmma scan where eligible); --bench-wgmma: the wgmma scan
  // against the mma.sync one, same process
  if (argc > 1 && std::string(argv[1]) == "--decode-suites") {
    const bool dok = decode_suites(rng);
    std::printf("%s (decode suites)\n", dok ? "PASS" : "FAIL");
    return dok ? 0 : 1;
  }
  if (argc > 1 && std::string(argv[1]) == "--bench-wgmma") {
    const bool bok = bench_wgmma();
    std::printf("%s (wgmma bench checks)\n", bok ? "PASS" : "FAIL");
    return bok ? 0 : 1;
  }
  // --bench-one T N k [merge]: one decode bench case alone (a profiler's target, e.g.
  // ncu -k regex:indexer); merge 0 auto (default), 1 tree, 2 histogram select, 3 legacy, 4 coop.
  // The wgmma scan where eligible, unless DSV4_INDEXER_WGMMA=0 in the environment (the TIME
  // line's kind says "wgmma" when it runs).
  if (argc > 4 && std::string(argv[1]) == "--bench-one") {
    const int T = std::atoi(argv[2]), N = std::atoi(argv[3]), k = std::atoi(argv[4]);
    if (T < 1 || N < 1 || k < 1) {
      std::printf("usage: --bench-one T N k [merge 0-4], each of T, N, k >= 1\n");
      return 2;
    }
    dsv4::indexer_topk_set_merge(argc > 5 ? std::atoi(argv[5]) : 0);
    void* flush = nullptr;
    CHECK_CUDA(cudaMalloc(&flush, 256ull << 20));
    dsv4::IndexerKeys kk;
    kk.rows = T;
    kk.capacity = N;
    const bool wg = dsv4::indexer_topk_uses_wgmma(T, kk, 64, 128, k);
    const bool bok = bench_case(wg ? "wgmma" : "decode", T, T, N, k, false, 5, {0}, flush,
                                256ull << 20);
    CHECK_CUDA(cudaFree(flush));
    std::printf("%s\n", bok ? "PASS" : "FAIL");
    return bok ? 0 : 1;
  }
  // --bench-fp8 T N k [stages]: the runtime's 1M layout, FP8 indexer keys (132 B) in a paged
  // pool of 256-entry blocks with shuffled block ids, T decode queries of N keys each (N a
  // multiple of 256), 64 heads; cold L2, default merge; query 0 and T - 1 checked exactly
  // (integer keys x power-of-two scales). stages 2-4: the pipeline depth (0: the default).
  if (argc > 4 && std::string(argv[1]) == "--bench-fp8") {
    const int T = std::atoi(argv[2]), N = std::atoi(argv[3]), k = std::atoi(argv[4]);
    const int stages = argc > 5 ? std::atoi(argv[5]) : 0;
    if (T < 1 || N < 256 || N % 256 != 0 || k < 1 || stages < 0 || stages > 4) {
      std::printf("usage: --bench-fp8 T N k [stages], T >= 1, N a multiple of 256, k >= 1, "
                  "stages 0 (default) or 2-4\n");
      return 2;
    }
    dsv4::indexer_topk_set_merge(0);
    dsv4::indexer_topk_set_tuning(0, stages);
    Problem p = make_problem("fp8 paged bench", T, T, N, 64, 128, k, true, rng);
    for (int t = 0; t < T; ++t) p.rows[t] = t, p.nv[t] = N;
    StoreSpec sp;
    sp.fp8 = true;
    sp.paged = true;
    sp.bs = 256;
    StoreBufs sb = build_store(p, sp, rng);
    DeviceBufs d = upload_queries(p);
    int dev = 0;
    CHECK_CUDA(cudaGetDevice(&dev));
    d.ws_bytes = dsv4::indexer_topk_workspace_bytes(p.T, sb.keys, p.H, p.D, p.k, dev);
    if (d.ws_bytes) CHECK_CUDA(cudaMalloc(&d.ws, d.ws_bytes));
    void* flush = nullptr;
    const size_t flush_bytes = 256ull << 20;
    CHECK_CUDA(cudaMalloc(&flush, flush_bytes));
    auto go = [&]() {
      return dsv4::indexer_topk(d.q, static_cast<int64_t>(p.H) * p.D, p.D, d.w, p.H, sb.keys,
                                d.rows, d.nv, d.out, p.k, p.T, p.H, p.D, p.k, d.ws, d.ws_bytes,
                                nullptr);
    };
    const size_t n_out = static_cast<size_t>(T) * k;
    CHECK_CUDA(cudaMemset(d.out, 0x7f, n_out * 4));
    const Timing tm = time_cold([&] { CHECK_CUDA(go()); }, 20, flush, flush_bytes);
    std::vector<int32_t> got(n_out);
    CHECK_CUDA(cudaMemcpy(got.data(), d.out, n_out * 4, cudaMemcpyDeviceToHost));
    std::string msg;
    for (int t : {0, T - 1}) {
      const std::string e = check_row(p, t, got.data() + static_cast<size_t>(t) * k);
      if (!e.empty() && msg.empty()) msg = "t=" + std::to_string(t) + ": " + e;
    }
    const double bytes = static_cast<double>(T) * N * (128 + 4);
    std::printf("TIME fp8-paged [%s] T=%-3d N=%-7d k=%-5d stages=%s  full %8.1f us (min %8.1f)  "
                "key-bytes %6.0f GB/s  %s%s\n",
                path_name(p, sb.keys).c_str(), T, N, k, stages ? argv[5] : "default", tm.med_us,
                tm.min_us, bytes / tm.med_us * 1e-3, msg.empty() ? "check ok" : "CHECK FAIL: ",
                msg.c_str());
    dsv4::indexer_topk_set_tuning(0, 0);
    CHECK_CUDA(cudaFree(flush));
    cudaFree(sb.data);
    cudaFree(sb.bt);
    d.free_all();
    std::printf("%s\n", msg.empty() ? "PASS" : "FAIL");
    return msg.empty() ? 0 : 1;
  }
  // Merge modes (indexer_topk_set_merge): the default (auto: histogram select for > 16
  // splits), the candidate-list tree always, the histogram select whenever there are splits.
  dsv4::indexer_topk_set_merge(0);
  std::printf("-- merge: auto (default)\n");
  bool ok = correctness_suite(rng);
  ok &= long_decode_suite(rng);
  std::printf("-- merge: tree (the previous path; its short cases are the auto ones)\n");
  dsv4::indexer_topk_set_merge(1);
  ok &= long_decode_suite(rng);
  std::printf("-- merge: histogram select for every split decode plan\n");
  dsv4::indexer_topk_set_merge(2);
  ok &= correctness_suite(rng);
  std::printf("-- merge: coop (histogram select inside a cooperative scan grid)\n");
  dsv4::indexer_topk_set_merge(4);
  ok &= correctness_suite(rng);
  ok &= long_decode_suite(rng);
  // The same cases with the alternative decode tile (128 keys per stage, 4 stages).
  std::printf("-- decode tile 128 (tuning variant), merge: histogram select\n");
  dsv4::indexer_topk_set_tuning(128, 0);
  ok &= correctness_suite(rng);
  dsv4::indexer_topk_set_tuning(0, 0);
  for (int mode : {0, 1, 2, 3, 4}) {
    static const char* const names[] = {"auto", "tree", "hist", "legacy", "coop"};
    std::printf("-- short decode, merge: %s\n", names[mode]);
    dsv4::indexer_topk_set_merge(mode);
    ok &= short_decode_suite(rng);
  }
  dsv4::indexer_topk_set_merge(0);
  // The short-row decode path (auto merge mode): on (must run where eligible), then off (the
  // split path on the same cases), and the older short cases with the path off.
  unsetenv("DSV4_INDEXER_TOPK_SHORT");
  std::printf("-- short-row path (cluster per query): on\n");
  bool sok = short_path_suite(rng, 1);
  setenv("DSV4_INDEXER_TOPK_SHORT", "0", 1);
  std::printf("-- short-row path: off (DSV4_INDEXER_TOPK_SHORT=0), same cases on the split path\n");
  sok &= short_path_suite(rng, 0);
  std::printf("-- short decode, merge: auto, short-row path off\n");
  sok &= short_decode_suite(rng);
  unsetenv("DSV4_INDEXER_TOPK_SHORT");
  std::printf("%s (short-row path cases)\n", sok ? "PASS" : "FAIL");
  ok &= sok;
  std::printf("%s\n", ok ? "PASS" : "FAIL");

  if (bench_short) {  // the decode latency cases: legacy split size vs the default, same process
    void* flush = nullptr;
    const size_t flush_bytes = 256ull << 20;
    CHECK_CUDA(cudaMalloc(&flush, flush_bytes));
    bool bok = true;
    {  // the short-row path against the split path (DSV4_INDEXER_TOPK_SHORT=0), auto merge
      struct Row {
        int b, n, c, k;
      };
      std::vector<Row> rows;
      for (int k : {512, 1024})
        for (int b : {1, 2, 8})
          for (int n : {512, 1024, 2048, 4096, 8192}) rows.push_back({b, n, n, k});
      rows.push_back({1, 1024, 2048, 512});   // the e2e decode step's shape (C ~ 1-2K)
      rows.push_back({1, 1024, 16384, 512});  // n_valid << C
      rows.push_back({4, 2048, 4096, 512});
      rows.push_back({16, 1024, 1024, 512});
      std::printf("-- short-row path vs split path (old = DSV4_INDEXER_TOPK_SHORT=0), cold L2\n");
      std::vector<std::string> summary;
      for (const Row& r : rows) {
        double t_old = 0, t_new = 0;
        setenv("DSV4_INDEXER_TOPK_SHORT", "0", 1);
        bok &= bench_case("old", r.b, r.b, r.n, r.k, false, 30, {0, r.b - 1}, flush, flush_bytes,
                          r.c, &t_old);
        unsetenv("DSV4_INDEXER_TOPK_SHORT");
        Problem probe;
        probe.T = r.b, probe.H = 64, probe.D = 128, probe.k = r.k;
        dsv4::IndexerKeys kk;
        kk.rows = r.b, kk.capacity = r.c;
        const std::string path = path_name(probe, kk);
        bok &= bench_case("short", r.b, r.b, r.n, r.k, false, 30, {0, r.b - 1}, flush,
                          flush_bytes, r.c, &t_new);
        char buf[256];
        std::snprintf(buf, sizeof(buf),
                      "SHORT b=%-2d N=%-5d C=%-5d k=%-4d old %7.1f us  new %7.1f us  x%.2f  [%s]",
                      r.b, r.n, r.c, r.k, t_old, t_new, t_old / t_new, path.c_str());
        summary.push_back(buf);
      }
      for (const auto& l : summary) std::printf("%s\n", l.c_str());
    }
    const int cases[][2] = {{1, 1024}, {1, 2048}, {1, 8192}, {1, 32768}, {8, 1024},
                            {32, 2048}, {64, 1024}, {32, 32768}};
    for (int mode : {3, 0, 1, 2}) {
      static const char* const names[] = {"auto (default)", "tree", "hist", "legacy"};
      dsv4::indexer_topk_set_merge(mode);
      std::printf("-- short decode bench, merge %s\n", names[mode]);
      for (const auto& c : cases) {
        bok &= bench_case("decode", c[0], c[0], c[1], 512, false, 30, {0, c[0] - 1}, flush,
                          flush_bytes);
      }
    }
    dsv4::indexer_topk_set_merge(0);
    dsv4::indexer_topk_set_tuning(128, 0);  // the 128-key decode tile (4 stages), default merge
    std::printf("-- short decode bench, decode tile 128, merge auto\n");
    for (const auto& c : cases) {
      bok &= bench_case("decode", c[0], c[0], c[1], 512, false, 30, {0}, flush, flush_bytes);
    }
    dsv4::indexer_topk_set_tuning(0, 0);
    std::printf("%s (short bench checks)\n", bok ? "PASS" : "FAIL");
    ok &= bok;
    CHECK_CUDA(cudaFree(flush));
  }

  if (bench) {
    void* flush0 = nullptr;
    CHECK_CUDA(cudaMalloc(&flush0, 256ull << 20));
    const int cfg[][2] = {{256, 0}, {256, 2}, {128, 4}, {128, 3}};
    for (const auto& c : cfg) {
      dsv4::indexer_topk_set_tuning(c[0], c[1]);
      std::printf("-- tuning: decode tile %d, stages %d (0 = default)\n", c[0], c[1]);
      bench_case("decode", 1, 1, 262144, 512, false, 15, {}, flush0, 256ull << 20);
      bench_case("decode", 32, 32, 262144, 512, false, 7, {}, flush0, 256ull << 20);
      bench_case("decode", 128, 128, 262144, 512, false, 5, {}, flush0, 256ull << 20);
    }
    dsv4::indexer_topk_set_tuning(0, 0);
    for (int mode : {1, 0}) {  // batch 1 / 4 at 1M: the tree, then the histogram select
      dsv4::indexer_topk_set_merge(mode);
      std::printf("-- merge %s\n", mode == 1 ? "tree" : "auto (histogram select)");
      bench_case("decode", 1, 1, 262144, 512, false, 15, {0}, flush0, 256ull << 20);
      bench_case("decode", 4, 4, 262144, 512, false, 15, {0}, flush0, 256ull << 20);
    }
    dsv4::indexer_topk_set_merge(0);
    CHECK_CUDA(cudaFree(flush0));
    std::printf("-- default configuration\n");
    void* flush = nullptr;
    const size_t flush_bytes = 256ull << 20;
    CHECK_CUDA(cudaMalloc(&flush, flush_bytes));
    bool bok = true;
    for (int ctx : {8192, 131072, 1048576}) {
      for (int b : {1, 32, 128}) {
        for (int k : {512, 1024}) {
          const int N = ctx / 4;
          std::vector<int> ts;  // CPU checks cost ~1 s per query at 1M
          if (ctx < 1048576) ts = {0, b - 1};
          else if (b == 1 || (b == 32 && k == 512)) ts = {0};
          if (ts.size() == 2 && ts[1] == 0) ts.pop_back();
          bok &= bench_case("decode", b, b, N, k, false, ctx == 1048576 && b == 128 ? 5 : 15, ts,
                            flush, flush_bytes);
        }
      }
    }
    for (int T : {4096, 16384, 65536}) {
      for (int k : {512, 1024}) {
        bok &= bench_case("prefill", T, 1, T / 4, k, true, T == 65536 ? 3 : 7,
                          {T - 1, T / 2, 7, T - 9}, flush, flush_bytes);
      }
    }
    std::printf("%s (bench checks)\n", bok ? "PASS" : "FAIL");
    ok &= bok;
    CHECK_CUDA(cudaFree(flush));
  }
  return ok ? 0 : 1;
}
