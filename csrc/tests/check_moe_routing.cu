// Standalone check of dsv4::moe_gate / moe_dispatch / moe_combine (no torch): random inputs on
// the GPU against CPU loops. dispatch and combine must match exactly (integers; the same fp32
// additions in the same order); the gate uses inputs whose logits are exact in fp32 (small
// multiples of 1/8), so the selection must match exactly and the weights to fp32 rounding.
// Prints PASS / FAIL (exit 1) or "SKIP: no CUDA device" (exit 0).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "dsv4/moe_routing.h"

#include "check_common.h"

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

struct Dispatch {
  std::vector<int32_t> row_ids, offsets, pair_pos;
  std::vector<float> route_weight;
};

Dispatch dispatch_cpu(const std::vector<int32_t>& idx, const std::vector<float>& w, int k, int E) {
  const int P = static_cast<int>(idx.size());
  Dispatch d;
  d.row_ids.resize(P);
  d.route_weight.resize(P);
  d.pair_pos.assign(P, -1);
  d.offsets.assign(E + 1, 0);
  std::vector<int> order;
  for (int b = 0; b <= E; ++b)
    for (int p = 0; p < P; ++p) {
      const bool valid = idx[p] >= 0 && idx[p] < E;
      if ((valid ? idx[p] : E) == b) order.push_back(p);
    }
  for (int i = 0; i < P; ++i) {
    const int p = order[i];
    const bool valid = idx[p] >= 0 && idx[p] < E;
    d.row_ids[i] = p / k;
    d.route_weight[i] = valid ? w[p] : 0.f;
    if (valid) {
      d.pair_pos[p] = i;
      for (int e = idx[p] + 1; e <= E; ++e) ++d.offsets[e];
    }
  }
  return d;
}

bool check_dispatch(int T, int k, int E, bool with_invalid, std::mt19937& rng) {
  const int P = T * k;
  std::vector<int32_t> idx(P);
  std::vector<float> w(P);
  std::uniform_int_distribution<int> ue(with_invalid ? -1 : 0, with_invalid ? E + 1 : E - 1);
  std::uniform_real_distribution<float> uw(0.f, 1.f);
  for (int p = 0; p < P; ++p) {
    idx[p] = ue(rng);
    w[p] = uw(rng);
  }
  const Dispatch ref = dispatch_cpu(idx, w, k, E);
  int32_t* didx = to_device(idx);
  float* dw = to_device(w);
  int32_t* rows = to_device(std::vector<int32_t>(P, -7));
  int32_t* offs = to_device(std::vector<int32_t>(E + 1, -7));
  int32_t* pos = to_device(std::vector<int32_t>(P, -7));
  float* rw = to_device(std::vector<float>(P, NAN));
  const size_t ws_bytes = dsv4::moe_dispatch_workspace_bytes(P, E);
  void* ws = nullptr;
  if (ws_bytes) CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
  CHECK_CUDA(dsv4::moe_dispatch(didx, dw, rows, offs, rw, pos, P, k, E, ws, ws_bytes, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  const bool ok = to_host(rows, P) == ref.row_ids && to_host(offs, E + 1) == ref.offsets &&
                  to_host(pos, P) == ref.pair_pos && to_host(rw, P) == ref.route_weight;
  std::printf("%s dispatch T=%-6d k=%-2d E=%-4d invalid=%d\n", ok ? "ok  " : "FAIL", T, k, E,
              with_invalid);
  for (void* p : {static_cast<void*>(didx), static_cast<void*>(dw), static_cast<void*>(rows),
                  static_cast<void*>(offs), static_cast<void*>(pos), static_cast<void*>(rw), ws})
    if (p) CHECK_CUDA(cudaFree(p));
  return ok;
}

bool check_combine(int T, int k, int D, bool shared, std::mt19937& rng) {
  const int E = 16;
  std::vector<int32_t> idx(T * k);
  std::uniform_int_distribution<int> ue(-1, E);
  for (auto& v : idx) v = ue(rng);
  const Dispatch d = dispatch_cpu(idx, std::vector<float>(T * k, 1.f), k, E);
  std::normal_distribution<float> nd(0.f, 10.f);
  std::vector<uint16_t> yp(static_cast<size_t>(T) * k * D), sh(static_cast<size_t>(T) * D);
  for (auto& v : yp) v = float_to_bf16(nd(rng));
  for (auto& v : sh) v = float_to_bf16(nd(rng));
  std::vector<uint16_t> ref(static_cast<size_t>(T) * D);
  for (int t = 0; t < T; ++t) {
    std::vector<int> ps;
    for (int j = 0; j < k; ++j)
      if (d.pair_pos[t * k + j] >= 0) ps.push_back(d.pair_pos[t * k + j]);
    std::sort(ps.begin(), ps.end());
    for (int c = 0; c < D; ++c) {
      float acc = 0.f;
      for (int p : ps) acc += bf16_to_float(yp[static_cast<size_t>(p) * D + c]);
      if (shared) acc += bf16_to_float(sh[static_cast<size_t>(t) * D + c]);
      ref[static_cast<size_t>(t) * D + c] = float_to_bf16(acc);
    }
  }
  uint16_t* dyp = to_device(yp);
  uint16_t* dsh = to_device(sh);
  int32_t* dpos = to_device(d.pair_pos);
  uint16_t* dy = to_device(std::vector<uint16_t>(static_cast<size_t>(T) * D, 0xFFFF));
  CHECK_CUDA(dsv4::moe_combine(dyp, D, static_cast<int64_t>(T) * k, dpos, shared ? dsh : nullptr, D,
                               dy, D, T, k, D, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  const bool ok = to_host(dy, ref.size()) == ref;
  std::printf("%s combine T=%-5d k=%-2d D=%-5d shared=%d\n", ok ? "ok  " : "FAIL", T, k, D, shared);
  for (void* p : {static_cast<void*>(dyp), static_cast<void*>(dsh), static_cast<void*>(dpos),
                  static_cast<void*>(dy)})
    CHECK_CUDA(cudaFree(p));
  return ok;
}

float softplus(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }

bool check_gate(int T, int D, int E, int k, bool hash, std::mt19937& rng) {
  std::uniform_int_distribution<int> small(-2, 2);
  std::vector<uint16_t> x(static_cast<size_t>(T) * D), w(static_cast<size_t>(E) * D);
  for (auto& v : x) v = float_to_bf16(small(rng) / 8.f);
  for (auto& v : w) v = float_to_bf16(small(rng) / 8.f);
  std::vector<float> bias(E);
  for (auto& v : bias) v = small(rng) / 16.f;
  const int V = 97;
  std::vector<int64_t> tid2eid(static_cast<size_t>(V) * k);
  std::vector<int32_t> ids(T);
  for (int v = 0; v < V; ++v) {
    std::vector<int> perm(E);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < k; ++j) tid2eid[static_cast<size_t>(v) * k + j] = perm[j];
  }
  std::uniform_int_distribution<int> uid(0, V - 1);
  for (auto& v : ids) v = uid(rng);
  // CPU reference
  std::vector<float> ref_w(static_cast<size_t>(T) * k);
  std::vector<int32_t> ref_i(static_cast<size_t>(T) * k);
  std::vector<float> key(static_cast<size_t>(T) * E);
  for (int t = 0; t < T; ++t) {
    std::vector<float> s(E);
    for (int e = 0; e < E; ++e) {
      double l = 0;  // exact: every product and partial sum is a multiple of 1/64
      for (int c = 0; c < D; ++c)
        l += double(bf16_to_float(x[static_cast<size_t>(t) * D + c])) *
             bf16_to_float(w[static_cast<size_t>(e) * D + c]);
      s[e] = std::sqrt(softplus(static_cast<float>(l)));
    }
    for (int e = 0; e < E; ++e) key[static_cast<size_t>(t) * E + e] = s[e] + bias[e];
    std::vector<int> sel(k);
    if (hash) {
      for (int j = 0; j < k; ++j) sel[j] = static_cast<int>(tid2eid[static_cast<size_t>(ids[t]) * k + j]);
    } else {
      std::vector<int> order(E);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int a, int b) { return s[a] + bias[a] > s[b] + bias[b]; });
      for (int j = 0; j < k; ++j) sel[j] = order[j];
    }
    float denom = 0.f;
    for (int j = 0; j < k; ++j) denom += s[sel[j]];
    for (int j = 0; j < k; ++j) {
      ref_i[static_cast<size_t>(t) * k + j] = sel[j];
      ref_w[static_cast<size_t>(t) * k + j] = (s[sel[j]] / (denom == 0.f ? 1.f : denom)) * 1.5f;
    }
  }
  uint16_t* dx = to_device(x);
  uint16_t* dwt = to_device(w);
  float* db = to_device(bias);
  int64_t* dt = to_device(tid2eid);
  int32_t* did = to_device(ids);
  float* ow = to_device(std::vector<float>(static_cast<size_t>(T) * k, NAN));
  int32_t* oi = to_device(std::vector<int32_t>(static_cast<size_t>(T) * k, -7));
  int dev = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  const size_t ws_bytes = dsv4::moe_gate_workspace_bytes(T, E, D, dev);
  void* ws = nullptr;
  CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
  CHECK_CUDA(dsv4::moe_gate(dx, D, dwt, hash ? nullptr : db, hash ? dt : nullptr, true, V,
                            hash ? did : nullptr, false, ow, oi, T, E, D, k, 1.5f, ws, ws_bytes,
                            nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  const auto gw = to_host(ow, ref_w.size());
  const auto gi = to_host(oi, ref_i.size());
  // Scores on the CPU and the GPU may differ by an ulp (log1p/exp), so a selection may differ
  // only where two keys are within 1e-5; weights are compared on tokens with the same selection.
  bool ok = true;
  int differ = 0;
  double max_rel = 0;
  for (int t = 0; t < T; ++t) {
    bool same = true;
    for (int j = 0; j < k; ++j) same &= gi[static_cast<size_t>(t) * k + j] == ref_i[static_cast<size_t>(t) * k + j];
    if (!same) {
      ++differ;
      if (hash) ok = false;  // a table lookup has no ties
      for (int j = 0; j < k && !hash; ++j) {
        const int a = gi[static_cast<size_t>(t) * k + j], b = ref_i[static_cast<size_t>(t) * k + j];
        if (a < 0 || a >= E || std::fabs(key[static_cast<size_t>(t) * E + a] - key[static_cast<size_t>(t) * E + b]) > 1e-5)
          ok = false;
      }
      continue;
    }
    for (int j = 0; j < k; ++j) {
      const size_t i = static_cast<size_t>(t) * k + j;
      const double rel = std::fabs(double(gw[i]) - ref_w[i]) / std::max(double(ref_w[i]), 1e-30);
      if (!(rel <= 4e-6)) ok = false;
      max_rel = std::max(max_rel, rel);
    }
  }
  if (differ * 100 > T + 100) ok = false;
  std::printf("%s gate T=%-5d D=%-5d E=%-4d k=%-2d hash=%d max_rel_w=%.3g near_tie_swaps=%d\n",
              ok ? "ok  " : "FAIL", T, D, E, k, hash, max_rel, differ);
  for (void* p : {static_cast<void*>(dx), static_cast<void*>(dwt), static_cast<void*>(db),
                  static_cast<void*>(dt), static_cast<void*>(did), static_cast<void*>(ow),
                  static_cast<void*>(oi), ws})
    CHECK_CUDA(cudaFree(p));
  return ok;
}

}  // namespace

int main() {
  int n_dev = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
    std::printf("SKIP: no CUDA device\n");
    return 0;
  }
  std::mt19937 rng(1234);
  bool ok = true;
  const int dcases[][3] = {{1, 6, 256}, {170, 6, 256}, {171, 6, 256}, {4096, 6, 256},
                           {3000, 16, 1023}, {500, 2, 1}, {20000, 6, 384}};
  for (auto& c : dcases)
    for (bool inv : {false, true}) ok &= check_dispatch(c[0], c[1], c[2], inv, rng);
  const int ccases[][3] = {{1, 6, 4096}, {37, 6, 136}, {9, 3, 13}, {300, 16, 64}};
  for (auto& c : ccases)
    for (bool sh : {false, true}) ok &= check_combine(c[0], c[1], c[2], sh, rng);
  const int gcases[][4] = {{1, 4096, 256, 6}, {65, 136, 72, 8}, {300, 512, 384, 6},
                           {70, 256, 512, 16}, {2, 64, 8, 2}};
  for (auto& c : gcases)
    for (bool hash : {false, true}) ok &= check_gate(c[0], c[1], c[2], c[3], hash, rng);
  // argument validation
  ok &= dsv4::moe_dispatch(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 6, 4, 8, nullptr,
                           0, nullptr) == cudaErrorInvalidValue;  // pairs % topk != 0
  ok &= dsv4::moe_gate(nullptr, 8, nullptr, nullptr, nullptr, false, 0, nullptr, false, nullptr,
                       nullptr, 0, 8, 8, 2, 1.f, nullptr, 0, nullptr) == cudaSuccess;  // empty
  std::printf("%s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
