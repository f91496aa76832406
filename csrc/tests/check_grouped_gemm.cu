// Standalone check of dsv4::grouped_gemm (no torch): random weights in the three formats, random
// routing (empty experts included), every tile configuration, the SwiGLU and plain epilogues and
// the inverse-RoPE load path, compared with a CPU loop in double precision. Outputs are
// NaN-poisoned first; rows past expert_offsets[E] must stay poisoned. Also checks
// fp8_act_quant_sim against a CPU transcription of dsv4.ops.quant.fp8_e4m3_sim, and (on the host,
// with or without a GPU) the kernel's byte-permutation e2m1 decoder against the e2m1 table.
// `--refusal` (alone in its process, before the skinny tile's occupancy query is cached): the
// skinny tile with that query refused (DSV4_TEST_REFUSE=query, own_error.cuh: one CTA per SM,
// same results, no error left pending), with an error the caller left pending (reaches the
// caller, never cleared), then with the query asked again (unset).
// Prints PASS / FAIL (exit 1) or "SKIP: ..." (exit 0).
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "dsv4/grouped_gemm.h"

#include "../kernels/grouped_gemm_fp4.cuh"
#include "check_common.h"

namespace {

using dsv4::GemmEpilogue;
using dsv4::GemmTile;
using dsv4::GemmWeightFormat;
using dsv4_check::bf16_to_float;
using dsv4_check::float_to_bf16;
using dsv4_check::leave_error_pending;
using dsv4_check::pending_error_kept;

float e4m3_to_float(uint8_t v) {
  const int s = v >> 7, e = (v >> 3) & 15, m = v & 7;
  if (e == 15 && m == 7) return NAN;
  const float mag = e == 0 ? std::ldexp(static_cast<float>(m), -9)
                           : std::ldexp(1.0f + m / 8.0f, e - 7);
  return s ? -mag : mag;
}
float e2m1_to_float(uint8_t code) {
  static const float kMag[8] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
  return (code & 8) ? -kMag[code & 7] : kMag[code & 7];
}
float e8m0_to_float(uint8_t c) { return c == 255 ? NAN : std::ldexp(1.0f, c - 127); }

// Exact-size allocations (no slack), so that compute-sanitizer reports any read past a buffer.
template <class T>
T* to_device(const std::vector<T>& h) {
  T* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, std::max<size_t>(h.size(), 1) * sizeof(T)));
  if (!h.empty()) CHECK_CUDA(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

// Weights of `mats` matrices [rows, k] in one format; `deq` holds the dequantised values.
struct Weights {
  std::vector<uint8_t> bytes;   // raw storage
  std::vector<uint8_t> scale8;  // e8m0 scales
  std::vector<float> scale32;   // the same scales as float
  std::vector<float> deq;       // [mats, rows, k]
  int64_t row_bytes = 0, s_rows = 0, s_cols = 0;
};

Weights make_weights(GemmWeightFormat fmt, int mats, int rows, int k, std::mt19937& rng) {
  Weights w;
  std::normal_distribution<float> normal(0.f, 1.f / std::sqrt(static_cast<float>(k)));
  std::uniform_int_distribution<int> byte(0, 255), scl(122, 128);
  w.deq.resize(static_cast<size_t>(mats) * rows * k);
  if (fmt == GemmWeightFormat::kBF16) {
    w.row_bytes = 2 * k;
    w.bytes.resize(w.deq.size() * 2);
    for (size_t i = 0; i < w.deq.size(); ++i) {
      const uint16_t b = float_to_bf16(normal(rng));
      std::memcpy(&w.bytes[2 * i], &b, 2);
      w.deq[i] = bf16_to_float(b);
    }
    return w;
  }
  const bool fp8 = fmt == GemmWeightFormat::kFP8;
  w.row_bytes = fp8 ? k : k / 2;
  w.s_rows = fp8 ? (rows + 127) / 128 : rows;
  w.s_cols = fp8 ? (k + 127) / 128 : k / 32;
  w.scale8.resize(static_cast<size_t>(mats) * w.s_rows * w.s_cols);
  w.scale32.resize(w.scale8.size());
  for (size_t i = 0; i < w.scale8.size(); ++i) {
    w.scale8[i] = static_cast<uint8_t>(scl(rng));
    w.scale32[i] = e8m0_to_float(w.scale8[i]);
  }
  w.bytes.resize(static_cast<size_t>(mats) * rows * w.row_bytes);
  for (auto& b : w.bytes) {
    int v = byte(rng);
    if (fp8 && (v & 0x7F) == 0x7F) v &= 0xF7;  // no NaN codes
    b = static_cast<uint8_t>(v);
  }
  for (int m = 0; m < mats; ++m)
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < k; ++c) {
        const size_t bi = (static_cast<size_t>(m) * rows + r) * w.row_bytes;
        float v, s;
        if (fp8) {
          v = e4m3_to_float(w.bytes[bi + c]);
          s = w.scale32[(static_cast<size_t>(m) * w.s_rows + r / 128) * w.s_cols + c / 128];
        } else {
          const uint8_t b = w.bytes[bi + c / 2];
          v = e2m1_to_float((c & 1) ? (b >> 4) : (b & 15));
          s = w.scale32[(static_cast<size_t>(m) * w.s_rows + r) * w.s_cols + c / 32];
        }
        w.deq[(static_cast<size_t>(m) * rows + r) * k + c] = v * s;
      }
  return w;
}

struct Case {
  const char* name;
  GemmWeightFormat fmt;
  GemmEpilogue epi;
  GemmTile tile;
  int E, rows, k, x_rows, pairs;
  bool rope = false;
  bool fp32_scale = false;
  bool overlap = false;
  bool ws = false;  // the warp-specialised mainloop (bf16 weights, kLarge / kHuge)
  int num_sms = 0;  // > 0: a grid of at most this many blocks (each walks several units)
  int head_dim = 128;  // RoPE cases: the head width (the last 64 dims of each head rotate)
  bool dense = false;  // without RoPE: every expert all `pairs` rows (x [pairs, E k]), no offsets
};

float bf16_round(double v) { return bf16_to_float(float_to_bf16(static_cast<float>(v))); }

// Host reference (double accumulation) of one output element: feature f of expert e for the
// input row xr [k], with the dequantised weights deq [matrices][rows][k]. store: the dot with
// matrix e; SwiGLU: gate (matrix 2e) and up (2e + 1) rounded to bf16, clamped at 10 (the up
// also at -10), silu(gate) * up * route weight rw.
double host_expert_out(const float* xr, const std::vector<float>& deq, int rows, int k, int e,
                       int f, bool swiglu, float rw) {
  auto dot = [&](int m) {
    const float* wr = &deq[(static_cast<size_t>(m) * rows + f) * k];
    double acc = 0;
    for (int q = 0; q < k; ++q) acc += static_cast<double>(xr[q]) * wr[q];
    return acc;
  };
  if (!swiglu) return dot(e);
  double g = bf16_round(dot(2 * e)), u = bf16_round(dot(2 * e + 1));
  const double L = 10.0;
  g = std::min(g, L);
  u = std::max(std::min(u, L), -L);
  return rw * (g / (1.0 + std::exp(-g)) * u);
}

struct Routing {
  std::vector<int32_t> offsets, row_ids;  // [E + 1], [pairs]
  std::vector<float> rw;                  // [pairs]
};
// Random routing of `pairs` pairs to E experts: the first `used` pairs are split at random cuts
// (one expert empty for sure when E > 2), the rest belong to no expert; random tokens and
// routing weights in [0.25, 1.25).
Routing make_routing(int E, int pairs, int used, int x_rows, std::mt19937& rng) {
  Routing rt;
  rt.offsets.assign(E + 1, 0);
  rt.row_ids.resize(pairs);
  rt.rw.resize(pairs);
  std::uniform_int_distribution<int> tok(0, x_rows - 1);
  std::uniform_real_distribution<float> unif(0.25f, 1.25f);
  for (auto& r : rt.row_ids) r = tok(rng);
  for (auto& v : rt.rw) v = unif(rng);
  std::vector<int> cuts(E - 1);
  std::uniform_int_distribution<int> cut(0, used);
  for (auto& v : cuts) v = cut(rng);
  if (E > 2) cuts[0] = cuts[1];  // an empty expert for sure
  std::sort(cuts.begin(), cuts.end());
  for (int e = 1; e < E; ++e) rt.offsets[e] = cuts[e - 1];
  rt.offsets[E] = used;
  return rt;
}

// The bf16 output against the double reference (NaN in ref: a row no expert owns, which must
// stay poisoned, 0xffff): |got - ref| <= 0.02 |ref| + 0.01 max |ref|. Prints one line; returns
// whether every element passed.
bool compare_out(const char* name, const std::vector<double>& ref,
                 const std::vector<uint16_t>& out16, int64_t out_cols) {
  double max_ref = 0;
  for (double v : ref)
    if (!std::isnan(v)) max_ref = std::max(max_ref, std::fabs(v));
  int bad = 0;
  double worst = 0;
  for (size_t i = 0; i < out16.size(); ++i) {
    const float got = bf16_to_float(out16[i]);
    if (std::isnan(ref[i])) {  // rows no expert owns: must stay poisoned
      if (out16[i] != 0xffff && bad++ < 3)
        std::fprintf(stderr, "  %s: element %zu written (0x%04x) but owned by no expert\n",
                     name, i, out16[i]);
      continue;
    }
    const double err = std::fabs(got - ref[i]);
    const double tol = 0.02 * std::fabs(ref[i]) + 0.01 * max_ref;
    worst = std::max(worst, err / (max_ref > 0 ? max_ref : 1));
    if (!(err <= tol) && bad++ < 3)
      std::fprintf(stderr, "  %s: element %zu (row %zu col %zu): got %g want %g\n", name, i,
                   i / out_cols, i % out_cols, got, ref[i]);
  }
  std::printf("%-44s %s (max err / max |ref| = %.2e)\n", name, bad ? "FAIL" : "ok", worst);
  return bad == 0;
}

// pend_first (--refusal): leave cudaErrorInvalidValue pending before the call, as an unrelated
// earlier launch of the caller could; the call must return it or leave it pending (never clear
// it). Outputs are not compared then (the op may stop at its first launch check).
bool run_case(const Case& c, std::mt19937& rng, bool pend_first = false) {
  const bool swiglu = c.epi == GemmEpilogue::kSwiGLU;
  // the RoPE case is the output projection: every expert, all rows (also `dense` without RoPE)
  const bool dense = c.rope || c.dense;
  const int mats = c.E * (swiglu ? 2 : 1);
  Weights w = make_weights(c.fmt, mats, c.rows, c.k, rng);
  // activations: for the output projection x is [x_rows, E * k] (group e reads columns e*k ..)
  const int64_t x_cols = dense ? static_cast<int64_t>(c.E) * c.k : c.k;
  std::normal_distribution<float> normal(0.f, 2.f);
  std::vector<uint16_t> x16(static_cast<size_t>(c.x_rows) * x_cols);
  std::vector<float> x(x16.size());
  for (size_t i = 0; i < x.size(); ++i) {
    x16[i] = float_to_bf16(normal(rng));
    x[i] = bf16_to_float(x16[i]);
  }
  // routing: random counts (some experts empty), the last 3 pairs belong to no expert
  const Routing rt = make_routing(c.E, c.pairs, dense ? c.pairs : std::max(0, c.pairs - 3),
                                  c.x_rows, rng);
  const std::vector<int32_t>& offsets = rt.offsets;
  const std::vector<int32_t>& row_ids = rt.row_ids;
  const std::vector<float>& rw = rt.rw;
  std::vector<int32_t> positions(c.x_rows);
  std::vector<float> freqs(32);
  std::uniform_int_distribution<int> posd(0, 1 << 20);
  for (auto& p : positions) p = posd(rng);
  for (int j = 0; j < 32; ++j) freqs[j] = std::pow(10000.0f, -2.0f * j / 64.0f);
  const int head_dim = c.head_dim;

  // ---- CPU reference (double accumulation) ----
  const int64_t out_cols = dense ? static_cast<int64_t>(c.E) * c.rows : c.rows;
  const int64_t out_rows = dense ? c.x_rows : c.pairs;
  std::vector<double> ref(static_cast<size_t>(out_rows) * out_cols, NAN);
  std::vector<float> xr(c.k);
  for (int e = 0; e < c.E; ++e) {
    const int p0 = dense ? 0 : offsets[e], p1 = dense ? c.pairs : offsets[e + 1];
    for (int p = p0; p < p1; ++p) {
      const int row = dense ? p : row_ids[p];
      const float* src = &x[static_cast<size_t>(row) * x_cols + (dense ? static_cast<int64_t>(e) * c.k : 0)];
      for (int q = 0; q < c.k; ++q) xr[q] = src[q];
      if (c.rope) {  // inverse RoPE on the last 64 dims of every head, rounded to bf16
        for (int h0 = 0; h0 < c.k; h0 += head_dim)
          for (int j = 0; j < 32; ++j) {
            const float ang = static_cast<float>(positions[p]) * freqs[j];
            const double cs = std::cos(static_cast<double>(ang)), sn = std::sin(static_cast<double>(ang));
            float& a0 = xr[h0 + head_dim - 64 + 2 * j];
            float& a1 = xr[h0 + head_dim - 64 + 2 * j + 1];
            const double n0 = a0 * cs + a1 * sn, n1 = a1 * cs - a0 * sn;
            a0 = bf16_round(n0);
            a1 = bf16_round(n1);
          }
      }
      for (int f = 0; f < c.rows; ++f)
        ref[static_cast<size_t>(p) * out_cols + (dense ? static_cast<int64_t>(e) * c.rows : 0) + f] =
            host_expert_out(xr.data(), w.deq, c.rows, c.k, e, f, swiglu, rw[p]);
    }
  }

  // ---- GPU ----
  uint8_t* dw = to_device(w.bytes);
  uint8_t* ds8 = to_device(w.scale8);
  float* ds32 = to_device(w.scale32);
  uint16_t* dx = to_device(x16);
  int32_t* doff = to_device(offsets);
  int32_t* drow = to_device(row_ids);
  float* drw = to_device(rw);
  int32_t* dpos = to_device(positions);
  float* dfr = to_device(freqs);
  uint16_t* dout = nullptr;
  const size_t out_n = static_cast<size_t>(out_rows) * out_cols;
  CHECK_CUDA(cudaMalloc(&dout, out_n * 2));
  CHECK_CUDA(cudaMemset(dout, 0xff, out_n * 2));  // NaN poison

  dsv4::GroupedGemmArgs a;
  a.w = dw;
  a.w_format = c.fmt;
  a.w_row_stride = w.row_bytes;
  a.w_mat_stride = swiglu ? c.rows * w.row_bytes : 0;
  a.w_expert_stride = (swiglu ? 2 : 1) * c.rows * w.row_bytes;
  if (c.fmt != GemmWeightFormat::kBF16) {
    a.w_scale = c.fp32_scale ? static_cast<const void*>(ds32) : static_cast<const void*>(ds8);
    a.scale_fp32 = c.fp32_scale;
    a.w_scale_bytes = c.fp32_scale ? static_cast<int64_t>(w.scale32.size() * 4)
                                   : static_cast<int64_t>(w.scale8.size());
    a.s_row_stride = w.s_cols;
    a.s_mat_stride = swiglu ? w.s_rows * w.s_cols : 0;
    a.s_expert_stride = (swiglu ? 2 : 1) * w.s_rows * w.s_cols;
  }
  a.n_experts = c.E;
  a.rows = c.rows;
  a.k = c.k;
  a.x = dx;
  a.x_row_stride = x_cols;
  a.x_expert_stride = dense ? c.k : 0;
  a.x_rows = c.x_rows;
  a.row_ids = dense ? nullptr : drow;
  a.expert_offsets = dense ? nullptr : doff;
  a.pairs = c.pairs;
  if (c.rope) {
    a.positions = dpos;
    a.freqs = dfr;
    a.head_dim = head_dim;
  }
  a.epilogue = c.epi;
  a.route_weight = drw;
  a.swiglu_limit = 10.f;
  a.out = dout;
  a.out_row_stride = out_cols;
  a.out_expert_stride = dense ? c.rows : 0;
  a.tile = c.tile;
  a.pipeline = c.overlap ? dsv4::GemmPipeline::kOverlap : dsv4::GemmPipeline::kSerial;
  if (c.ws) a.mainloop = dsv4::GemmMainloop::kWarpSpecialized;
  a.num_sms = c.num_sms;
  const auto free_all = [&] {
    for (void* p : {static_cast<void*>(dw), static_cast<void*>(ds8), static_cast<void*>(ds32),
                    static_cast<void*>(dx), static_cast<void*>(doff), static_cast<void*>(drow),
                    static_cast<void*>(drw), static_cast<void*>(dpos), static_cast<void*>(dfr),
                    static_cast<void*>(dout)})
      CHECK_CUDA(cudaFree(p));
  };
  if (pend_first) {
    const bool injected = leave_error_pending();
    const cudaError_t ret = dsv4::grouped_gemm(a, nullptr);
    const cudaError_t pend = cudaGetLastError();
    CHECK_CUDA(cudaDeviceSynchronize());
    const bool kept = pending_error_kept(injected, ret, pend);
    std::printf("%-44s %s (error pending before the call: returned %s, pending after %s)\n",
                c.name, kept ? "ok" : "FAIL", cudaGetErrorName(ret), cudaGetErrorName(pend));
    free_all();
    return kept;
  }
  CHECK_CUDA(dsv4::grouped_gemm(a, nullptr));
  const cudaError_t left = cudaGetLastError();  // the op must leave no error pending
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<uint16_t> out16(out_n);
  CHECK_CUDA(cudaMemcpy(out16.data(), dout, out_n * 2, cudaMemcpyDeviceToHost));

  bool pass = compare_out(c.name, ref, out16, out_cols);
  if (left != cudaSuccess) {
    std::printf("%-44s FAIL (error left pending: %s)\n", c.name, cudaGetErrorName(left));
    pass = false;
  }
  if (c.tile == GemmTile::kGemv) {
    // the tile that ran: the GEMV tile inside its contract; the cases named "(skinny)" /
    // "(16-row)" are outside it (else every GEMV case could pass on the fallback tile)
    const bool ran_gemv = dsv4::grouped_gemm_resolve_tile(a) == GemmTile::kGemv;
    const bool want_gemv = std::strstr(c.name, "(skinny)") == nullptr &&
                           std::strstr(c.name, "(16-row)") == nullptr;
    if (ran_gemv != want_gemv) {
      std::printf("%-44s FAIL (resolved to %s, expected %s)\n", c.name,
                  ran_gemv ? "gemv" : "another tile", want_gemv ? "gemv" : "another tile");
      pass = false;
    }
  }
  free_all();
  return pass;
}

// ---- the FP8 x FP8 path (x_scale set: grouped_gemm_qmma.cuh) ----
struct QCase {
  const char* name;
  GemmWeightFormat fmt;  // kFP8 or kFP4 (e8m0 scales; FP8 also float32)
  GemmEpilogue epi;
  GemmTile tile;
  int E, rows, k, x_rows, pairs, unowned;  // the last `unowned` pairs belong to no expert
  bool fp32_scale = false;
};

// Random bf16 activations quantised on the GPU by fp8_act_quant (e4m3 codes + 1x128 float32
// scales); the reference uses the dequantised codes (codes x scale) and the dequantised
// weights, in double. FP4 scales span <= 6 octaves per 128-wide k block (make_weights), where
// the kernel's folded scales are exact.
// Activation magnitude: chosen so that the gate / up products have an rms of ~8 (|g| mostly
// inside the SwiGLU clamp L = 10, some clamped), as in the model. Not N(0, 2): with make_weights'
// random e4m3 bytes that made |g|, |u| ~ 10^2..10^4, so almost every output was clamped and the
// few unclamped ones came from cancellation (|u| << sum |terms|); there the FP8 tensor core's
// accumulation error (~13 fractional bits relative to the running k32 sum, fixed by the
// hardware; DeepGEMM's per-128-k promotion has the same) exceeds compare_out's tolerance, which
// is relative to |out| <= 125: all three "fp8_mma swiglu fp8" cases failed on the H100
// (max err / max |ref| 0.09-0.15) while the kernel was right (a CPU emulation of the
// accumulation reproduces 0.16 on such data and 0.007 on this).
bool run_qmma_case(const QCase& c, std::mt19937& rng) {
  const bool swiglu = c.epi == GemmEpilogue::kSwiGLU;
  const int mats = c.E * (swiglu ? 2 : 1);
  Weights w = make_weights(c.fmt, mats, c.rows, c.k, rng);
  const int kb = c.k / 128;
  double w_ms = 0;  // mean square of the dequantised weights
  for (float v : w.deq) w_ms += static_cast<double>(v) * v;
  w_ms /= static_cast<double>(std::max<size_t>(w.deq.size(), 1));
  const float sigma = static_cast<float>(8.0 / std::sqrt(c.k * std::max(w_ms, 1e-30)));
  std::normal_distribution<float> normal(0.f, sigma);
  std::vector<uint16_t> x16(static_cast<size_t>(c.x_rows) * c.k);
  for (auto& v : x16) v = float_to_bf16(normal(rng));
  uint16_t* dx = to_device(x16);
  uint8_t* dq = nullptr;
  float* dsx = nullptr;
  CHECK_CUDA(cudaMalloc(&dq, x16.size()));
  CHECK_CUDA(cudaMalloc(&dsx, static_cast<size_t>(c.x_rows) * kb * 4));
  CHECK_CUDA(dsv4::fp8_act_quant(dx, c.k, dq, c.k, dsx, kb, c.x_rows, c.k, nullptr));
  std::vector<uint8_t> q(x16.size());
  std::vector<float> sx(static_cast<size_t>(c.x_rows) * kb);
  CHECK_CUDA(cudaMemcpy(q.data(), dq, q.size(), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(sx.data(), dsx, sx.size() * 4, cudaMemcpyDeviceToHost));
  std::vector<float> x(q.size());
  for (size_t i = 0; i < q.size(); ++i) x[i] = e4m3_to_float(q[i]) * sx[i / 128];

  const Routing rt = make_routing(c.E, c.pairs, std::max(0, c.pairs - c.unowned), c.x_rows, rng);
  std::vector<double> ref(static_cast<size_t>(c.pairs) * c.rows, NAN);
  for (int e = 0; e < c.E; ++e)
    for (int p = rt.offsets[e]; p < rt.offsets[e + 1]; ++p) {
      const float* xr = &x[static_cast<size_t>(rt.row_ids[p]) * c.k];
      for (int f = 0; f < c.rows; ++f)
        ref[static_cast<size_t>(p) * c.rows + f] =
            host_expert_out(xr, w.deq, c.rows, c.k, e, f, swiglu, rt.rw[p]);
    }

  uint8_t* dw = to_device(w.bytes);
  uint8_t* ds8 = to_device(w.scale8);
  float* ds32 = to_device(w.scale32);
  int32_t* doff = to_device(rt.offsets);
  int32_t* drow = to_device(rt.row_ids);
  float* drw = to_device(rt.rw);
  uint16_t* dout = nullptr;
  const size_t out_n = static_cast<size_t>(c.pairs) * c.rows;
  CHECK_CUDA(cudaMalloc(&dout, std::max<size_t>(out_n, 1) * 2));
  CHECK_CUDA(cudaMemset(dout, 0xff, out_n * 2));  // NaN poison

  dsv4::GroupedGemmArgs a;
  a.w = dw;
  a.w_format = c.fmt;
  a.w_row_stride = w.row_bytes;
  a.w_mat_stride = swiglu ? c.rows * w.row_bytes : 0;
  a.w_expert_stride = (swiglu ? 2 : 1) * c.rows * w.row_bytes;
  a.w_scale = c.fp32_scale ? static_cast<const void*>(ds32) : static_cast<const void*>(ds8);
  a.scale_fp32 = c.fp32_scale;
  a.w_scale_bytes = c.fp32_scale ? static_cast<int64_t>(w.scale32.size() * 4)
                                 : static_cast<int64_t>(w.scale8.size());
  a.s_row_stride = w.s_cols;
  a.s_mat_stride = swiglu ? w.s_rows * w.s_cols : 0;
  a.s_expert_stride = (swiglu ? 2 : 1) * w.s_rows * w.s_cols;
  a.n_experts = c.E;
  a.rows = c.rows;
  a.k = c.k;
  a.x = dq;
  a.x_row_stride = c.k;
  a.x_rows = c.x_rows;
  a.x_scale = dsx;
  a.x_scale_row_stride = kb;
  a.row_ids = drow;
  a.expert_offsets = doff;
  a.pairs = c.pairs;
  a.epilogue = c.epi;
  a.route_weight = drw;
  a.swiglu_limit = 10.f;
  a.out = dout;
  a.out_row_stride = c.rows;
  a.tile = c.tile;
  CHECK_CUDA(dsv4::grouped_gemm(a, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<uint16_t> out16(out_n);
  CHECK_CUDA(cudaMemcpy(out16.data(), dout, out_n * 2, cudaMemcpyDeviceToHost));
  const bool pass = compare_out(c.name, ref, out16, c.rows);
  for (void* p : {static_cast<void*>(dw), static_cast<void*>(ds8), static_cast<void*>(ds32),
                  static_cast<void*>(dx), static_cast<void*>(dq), static_cast<void*>(dsx),
                  static_cast<void*>(doff), static_cast<void*>(drow), static_cast<void*>(drw),
                  static_cast<void*>(dout)})
    CHECK_CUDA(cudaFree(p));
  return pass;
}

// Deterministic pseudo-random bytes on the device (the timing case's 2-4 GB of weights would
// take minutes to generate on the host): byte i = hash(i, seed) with `mask` cleared bits,
// or (lo + hash % span) where span > 0.
__global__ void fill_hash(uint8_t* p, int64_t n, uint32_t seed, uint32_t clear, int lo, int span) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 0x9E3779B1u ^ static_cast<uint32_t>(i >> 32) ^ seed;
    h ^= h >> 15;
    h *= 0x2C1B3C6Du;
    h ^= h >> 12;
    h *= 0x297A2D39u;
    h ^= h >> 15;
    p[i] = span > 0 ? static_cast<uint8_t>(lo + static_cast<int>(h % span))
                    : static_cast<uint8_t>((h & 0xFFu) & ~clear);
  }
}

// The prefill shape of moe_up (256 experts, T = 4096, top-6: 24576 pairs, balanced; dim 4096 ->
// SwiGLU 2048) on the FP8 x FP8 path, FP8 and FP4 weights with e8m0 scales: prints the time
// (CUDA events, mean of 20 after 3 warm-ups) and TFLOP/s; checks only that the output is finite
// (the values are covered by the cases above). FP8 codes never NaN (bit 3 cleared on 0x7F).
bool time_qmma_prefill() {
  const int E = 256, T = 4096, topk = 6, rows = 2048, k = 4096;
  const int64_t pairs = static_cast<int64_t>(T) * topk;
  bool ok = true;
  for (int f = 0; f < 2; ++f) {
    const bool fp8 = f == 0;
    const int64_t row_bytes = fp8 ? k : k / 2;
    const int64_t w_n = static_cast<int64_t>(E) * 2 * rows * row_bytes;
    const int64_t s_rows = fp8 ? rows / 128 : rows, s_cols = fp8 ? k / 128 : k / 32;
    const int64_t s_n = static_cast<int64_t>(E) * 2 * s_rows * s_cols;
    uint8_t *dw = nullptr, *ds = nullptr, *dq = nullptr;
    float *dsx = nullptr, *drw = nullptr;
    int32_t *doff = nullptr, *drow = nullptr;
    uint16_t* dout = nullptr;
    CHECK_CUDA(cudaMalloc(&dw, w_n));
    CHECK_CUDA(cudaMalloc(&ds, s_n));
    CHECK_CUDA(cudaMalloc(&dq, static_cast<size_t>(T) * k));
    CHECK_CUDA(cudaMalloc(&dsx, static_cast<size_t>(T) * (k / 128) * 4));
    CHECK_CUDA(cudaMalloc(&drw, pairs * 4));
    CHECK_CUDA(cudaMalloc(&doff, (E + 1) * 4));
    CHECK_CUDA(cudaMalloc(&drow, pairs * 4));
    CHECK_CUDA(cudaMalloc(&dout, pairs * rows * 2));
    fill_hash<<<1024, 256>>>(dw, w_n, 1u, fp8 ? 0x08u : 0u, 0, 0);
    // (FP8: clearing bit 3 of every byte removes the NaN codes 0x7F / 0xFF, keeps the rest random)
    fill_hash<<<1024, 256>>>(ds, s_n, 2u, 0u, 122, 7);
    fill_hash<<<1024, 256>>>(dq, static_cast<int64_t>(T) * k, 3u, 0x08u, 0, 0);
    CHECK_CUDA(cudaGetLastError());
    std::vector<float> sx(static_cast<size_t>(T) * (k / 128), 1.f / 64), rwv(pairs, 0.5f);
    std::vector<int32_t> off(E + 1), rid(pairs);
    for (int e = 0; e <= E; ++e) off[e] = static_cast<int32_t>(pairs * e / E);
    std::mt19937 rng(5);
    for (auto& r : rid) r = static_cast<int32_t>(rng() % T);
    CHECK_CUDA(cudaMemcpy(dsx, sx.data(), sx.size() * 4, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(drw, rwv.data(), rwv.size() * 4, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(doff, off.data(), off.size() * 4, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(drow, rid.data(), rid.size() * 4, cudaMemcpyHostToDevice));
    dsv4::GroupedGemmArgs a;
    a.w = dw;
    a.w_format = fp8 ? GemmWeightFormat::kFP8 : GemmWeightFormat::kFP4;
    a.w_row_stride = row_bytes;
    a.w_mat_stride = rows * row_bytes;
    a.w_expert_stride = 2 * rows * row_bytes;
    a.w_scale = ds;
    a.w_scale_bytes = s_n;
    a.s_row_stride = s_cols;
    a.s_mat_stride = s_rows * s_cols;
    a.s_expert_stride = 2 * s_rows * s_cols;
    a.n_experts = E;
    a.rows = rows;
    a.k = k;
    a.x = dq;
    a.x_row_stride = k;
    a.x_rows = T;
    a.x_scale = dsx;
    a.x_scale_row_stride = k / 128;
    a.row_ids = drow;
    a.expert_offsets = doff;
    a.pairs = pairs;
    a.epilogue = GemmEpilogue::kSwiGLU;
    a.route_weight = drw;
    a.swiglu_limit = 10.f;
    a.out = dout;
    a.out_row_stride = rows;
    for (int i = 0; i < 3; ++i) CHECK_CUDA(dsv4::grouped_gemm(a, nullptr));
    cudaEvent_t t0, t1;
    CHECK_CUDA(cudaEventCreate(&t0));
    CHECK_CUDA(cudaEventCreate(&t1));
    const int iters = 20;
    CHECK_CUDA(cudaEventRecord(t0));
    for (int i = 0; i < iters; ++i) CHECK_CUDA(dsv4::grouped_gemm(a, nullptr));
    CHECK_CUDA(cudaEventRecord(t1));
    CHECK_CUDA(cudaEventSynchronize(t1));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, t0, t1));
    ms /= iters;
    std::vector<uint16_t> out(static_cast<size_t>(pairs) * rows);
    CHECK_CUDA(cudaMemcpy(out.data(), dout, out.size() * 2, cudaMemcpyDeviceToHost));
    int64_t nonfinite = 0;
    for (uint16_t v : out) nonfinite += (v & 0x7F80u) == 0x7F80u;
    const double flops = 2.0 * pairs * (2.0 * rows) * k;
    std::printf("%-44s %s (%.3f ms, %.0f TFLOP/s, %lld non-finite)\n",
                fp8 ? "timing moe_up fp8 T=4096 fp8_mma" : "timing moe_up fp4 T=4096 fp8_mma",
                nonfinite ? "FAIL" : "ok", ms, flops / (ms * 1e-3) / 1e12,
                static_cast<long long>(nonfinite));
    ok = ok && nonfinite == 0;
    CHECK_CUDA(cudaEventDestroy(t0));
    CHECK_CUDA(cudaEventDestroy(t1));
    for (void* p : {static_cast<void*>(dw), static_cast<void*>(ds), static_cast<void*>(dq),
                    static_cast<void*>(dsx), static_cast<void*>(drw), static_cast<void*>(doff),
                    static_cast<void*>(drow), static_cast<void*>(dout)})
      CHECK_CUDA(cudaFree(p));
  }
  return ok;
}

// The GEMV tile's cases (grouped_gemm_gemv.cuh; dense weights, 1-2 activation rows).
bool check_gemv_cases(std::mt19937& rng) {
  static char names[64][64];
  int ni = 0;
  const GemmWeightFormat fmts[] = {GemmWeightFormat::kBF16, GemmWeightFormat::kFP8};
  const char* fmt_names[] = {"bf16", "fp8"};
  bool ok = true;
  // the GEMV tile (grouped_gemm_gemv.cuh; dense weights, 1-2 activation rows): the output
  // projection with RoPE (8 groups of 4 heads of 128; 2 groups of 4 heads of 512 as V4), e8m0
  // and float32 scales; dense stores with rows of fewer chunks than lanes (k = 208), a partial
  // last batch (k = 4112 FP8 / 4104 bf16), 4 and 8 rows per warp (k = 1024 / 208), the 2-byte
  // e8m0 scale tensor; grids of 2 blocks walking every unit (restaging per expert); and forced
  // outside its contract (3 rows, MoE, FP4, SwiGLU, FP8 activations: the skinny tile runs)
  for (int T = 1; T <= 2; ++T)
    for (int f = 0; f < 2; ++f) {
      std::snprintf(names[ni], 64, "oproj rope %s gemv T=%d", fmt_names[f], T);
      Case c{names[ni++], fmts[f], GemmEpilogue::kStore, GemmTile::kGemv, 8, 128, 512, T, T, true};
      c.fp32_scale = T == 2;
      ok = run_case(c, rng) && ok;
      std::snprintf(names[ni], 64, "oproj rope %s gemv T=%d head_dim 512", fmt_names[f], T);
      Case d{names[ni++], fmts[f], GemmEpilogue::kStore, GemmTile::kGemv, 2, 256, 2048, T, T, true};
      d.head_dim = 512;
      d.fp32_scale = T == 1;
      ok = run_case(d, rng) && ok;
      std::snprintf(names[ni], 64, "oproj rope %s gemv T=%d grid of 2", fmt_names[f], T);
      Case g{names[ni++], fmts[f], GemmEpilogue::kStore, GemmTile::kGemv, 4, 256, 512, T, T, true};
      g.num_sms = 1;
      ok = run_case(g, rng) && ok;
    }
  {
    struct Shape { int E, rows, k_bf16, k_fp8; const char* what; };
    const Shape shapes[] = {{3, 136, 208, 208, "k=208"},
                            {1, 64, 4104, 4112, "k=4104/4112"},
                            {2, 192, 1024, 1024, "k=1024"}};
    for (const Shape& sh : shapes)
      for (int T = 1; T <= 2; ++T)
        for (int f = 0; f < 2; ++f) {
          std::snprintf(names[ni], 64, "dense store %s gemv %s T=%d", fmt_names[f], sh.what, T);
          Case c{names[ni++], fmts[f], GemmEpilogue::kStore, GemmTile::kGemv, sh.E, sh.rows,
                 f == 0 ? sh.k_bf16 : sh.k_fp8, T, T};
          c.dense = true;
          c.fp32_scale = (T + sh.E) % 2 == 1;
          ok = run_case(c, rng) && ok;
        }
    Case g{"dense store bf16 gemv grid of 2 T=2", GemmWeightFormat::kBF16, GemmEpilogue::kStore,
           GemmTile::kGemv, 5, 64, 320, 2, 2};
    g.dense = true;
    g.num_sms = 1;
    ok = run_case(g, rng) && ok;
    Case s2{"dense store fp8 2-byte e8m0 scales gemv", GemmWeightFormat::kFP8,
            GemmEpilogue::kStore, GemmTile::kGemv, 1, 120, 208, 1, 1};
    s2.dense = true;
    ok = run_case(s2, rng) && ok;
    Case r3{"oproj rope fp8 gemv forced T=3 (skinny)", GemmWeightFormat::kFP8,
            GemmEpilogue::kStore, GemmTile::kGemv, 2, 128, 256, 3, 3, true};
    ok = run_case(r3, rng) && ok;
    Case m{"store fp8 gemv forced MoE (skinny)", GemmWeightFormat::kFP8, GemmEpilogue::kStore,
           GemmTile::kGemv, 6, 136, 208, 45, 12};
    ok = run_case(m, rng) && ok;
    Case f4{"dense store fp4 gemv forced T=1 (skinny)", GemmWeightFormat::kFP4,
            GemmEpilogue::kStore, GemmTile::kGemv, 2, 64, 256, 1, 1};
    f4.dense = true;
    ok = run_case(f4, rng) && ok;
    Case sw{"swiglu bf16 gemv forced (skinny)", GemmWeightFormat::kBF16, GemmEpilogue::kSwiGLU,
            GemmTile::kGemv, 6, 96, 208, 45, 4};
    ok = run_case(sw, rng) && ok;
    QCase c4{"fp8_mma store fp8 T=1 gemv forced (16-row)", GemmWeightFormat::kFP8,
             GemmEpilogue::kStore, GemmTile::kGemv, 1, 128, 256, 1, 1, 0};
    ok = run_qmma_case(c4, rng) && ok;
  }
  return ok;
}

// The read flush of time_gemv: every 16-byte word of buf read once, one xor
// stored only when it matches an impossible value (the loads stay live).
__global__ void read_sum(const uint4* buf, size_t n, unsigned* sink) {
  unsigned acc = 0;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint4 v = __ldcg(buf + i);  // L2 default policy: replaces the dirty lines
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) *sink = acc;
}

// Decode-size weight streams, same process, cold weights (L2 flushed by a 256 MB memset before
// every timed call; CUDA events around the call only): grouped_oproj at V4-Flash shapes (o
// [T, 64 heads, 512], 8 groups of wo_a [1024, 4096], inverse RoPE; bf16 and FP8 wo_a with e8m0
// scales) at T = 1 and 2, and fp8_linear wq_b (32768 x 1024) and wq_a (1024 x 4096) at M = 1
// and 2, through the 16-row tensor-core tiles (decode_deep / decode), the skinny tile, the GEMV
// tile and kAuto, interleaved per repetition (DSV4_CHECK_FLUSH=read: the flush also reads the
// 256 MB, leaving no dirty lines in L2; lines start "time(read flush)"). Prints one line per
// case and tile: mean and
// min µs over 30 repetitions, weight bytes / mean time; then each tile's output against the
// GEMV tile's (max |diff| / max |gemv|; FAIL above 2e-2: the tolerance rule of the cases above).
bool time_gemv() {
  struct Shape { const char* name; bool fp8, rope; int E, rows, k, T; };
  const Shape shapes[] = {
      {"oproj bf16 T=1", false, true, 8, 1024, 4096, 1}, {"oproj bf16 T=2", false, true, 8, 1024, 4096, 2},
      {"oproj fp8 T=1", true, true, 8, 1024, 4096, 1},   {"oproj fp8 T=2", true, true, 8, 1024, 4096, 2},
      {"wq_b fp8 M=1", true, false, 1, 32768, 1024, 1},  {"wq_b fp8 M=2", true, false, 1, 32768, 1024, 2},
      {"wq_a fp8 M=1", true, false, 1, 1024, 4096, 1},
  };
  const GemmTile tiles[] = {GemmTile::kDecodeDeep, GemmTile::kDecode, GemmTile::kSkinny,
                            GemmTile::kGemv, GemmTile::kAuto};
  const char* tnames[] = {"decode_deep", "decode", "skinny", "gemv", "auto"};
  constexpr int NT = 5;
  // flush: the 256 MB memset (as before) leaves up to the L2's size of dirty lines, whose
  // write-back the timed call pays as it evicts them; DSV4_CHECK_FLUSH=read instead reads the
  // 256 MB (a sum kernel) after the memset, so that the L2 holds clean lines only
  const bool read_flush = std::getenv("DSV4_CHECK_FLUSH") != nullptr &&
                          !std::strcmp(std::getenv("DSV4_CHECK_FLUSH"), "read");
  unsigned* flush_sink = nullptr;
  CHECK_CUDA(cudaMalloc(&flush_sink, 4));
  const size_t flush_bytes = 256ull << 20;
  void* flush = nullptr;
  CHECK_CUDA(cudaMalloc(&flush, flush_bytes));
  cudaEvent_t t0, t1;
  CHECK_CUDA(cudaEventCreate(&t0));
  CHECK_CUDA(cudaEventCreate(&t1));
  bool ok = true;
  for (const Shape& sh : shapes) {
    const int64_t row_bytes = sh.fp8 ? sh.k : 2 * sh.k;
    const int64_t w_n = static_cast<int64_t>(sh.E) * sh.rows * row_bytes;
    const int64_t s_rows = sh.rows / 128, s_cols = sh.k / 128;
    const int64_t s_n = static_cast<int64_t>(sh.E) * s_rows * s_cols;
    const int64_t x_cols = static_cast<int64_t>(sh.E) * sh.k;  // x [T, E k] (E = 1: [T, k])
    const int64_t out_cols = static_cast<int64_t>(sh.E) * sh.rows;
    uint8_t *dw = nullptr, *ds = nullptr;
    uint16_t* dx = nullptr;
    int32_t* dpos = nullptr;
    float* dfr = nullptr;
    uint16_t* dout[NT] = {};
    CHECK_CUDA(cudaMalloc(&dw, w_n));
    CHECK_CUDA(cudaMalloc(&ds, std::max<int64_t>(s_n, 1)));
    CHECK_CUDA(cudaMalloc(&dx, sh.T * x_cols * 2));
    CHECK_CUDA(cudaMalloc(&dpos, sh.T * 4));
    CHECK_CUDA(cudaMalloc(&dfr, 32 * 4));
    for (auto& o : dout) CHECK_CUDA(cudaMalloc(&o, sh.T * out_cols * 2));
    // FP8: bit 3 of every byte cleared (no NaN codes); bf16: bit 6 of every byte cleared (the
    // exponent's top bit: |w| < 2, no inf / NaN); scales 2^-7 .. 2^0
    fill_hash<<<1024, 256>>>(dw, w_n, 11u, sh.fp8 ? 0x08u : 0x40u, 0, 0);
    fill_hash<<<64, 256>>>(ds, s_n, 12u, 0u, 120, 8);
    CHECK_CUDA(cudaGetLastError());
    std::mt19937 rng(17);
    std::normal_distribution<float> normal(0.f, 1.f);
    std::vector<uint16_t> x(sh.T * x_cols);
    for (auto& v : x) v = float_to_bf16(normal(rng));
    std::vector<int32_t> pos(sh.T);
    for (int t = 0; t < sh.T; ++t) pos[t] = 1000003 + 7 * t;
    std::vector<float> fr(32);
    for (int j = 0; j < 32; ++j) fr[j] = std::pow(10000.0f, -2.0f * j / 64.0f);
    CHECK_CUDA(cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(dpos, pos.data(), pos.size() * 4, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(dfr, fr.data(), fr.size() * 4, cudaMemcpyHostToDevice));
    dsv4::GroupedGemmArgs a;
    a.w = dw;
    a.w_format = sh.fp8 ? GemmWeightFormat::kFP8 : GemmWeightFormat::kBF16;
    a.w_row_stride = row_bytes;
    a.w_expert_stride = sh.rows * row_bytes;
    if (sh.fp8) {
      a.w_scale = ds;
      a.w_scale_bytes = s_n;
      a.s_row_stride = s_cols;
      a.s_expert_stride = s_rows * s_cols;
    }
    a.n_experts = sh.E;
    a.rows = sh.rows;
    a.k = sh.k;
    a.x = dx;
    a.x_row_stride = x_cols;
    a.x_expert_stride = sh.k;
    a.x_rows = sh.T;
    a.pairs = sh.T;
    if (sh.rope) {
      a.positions = dpos;
      a.freqs = dfr;
      a.head_dim = 512;
    }
    a.out_row_stride = out_cols;
    a.out_expert_stride = sh.rows;
    double sum[NT] = {}, mn[NT];
    for (double& m : mn) m = 1e30;
    const int reps = 30;
    for (int r = -2; r < reps; ++r)  // two warm-up rounds
      for (int t = 0; t < NT; ++t) {
        a.tile = tiles[t];
        a.out = dout[t];
        CHECK_CUDA(cudaMemsetAsync(flush, r & 0xff, flush_bytes));
        if (read_flush) {
          read_sum<<<1024, 256>>>(static_cast<const uint4*>(flush), flush_bytes / 16, flush_sink);
          CHECK_CUDA(cudaGetLastError());
        }
        CHECK_CUDA(cudaEventRecord(t0));
        CHECK_CUDA(dsv4::grouped_gemm(a, nullptr));
        CHECK_CUDA(cudaEventRecord(t1));
        CHECK_CUDA(cudaEventSynchronize(t1));
        float ms = 0;
        CHECK_CUDA(cudaEventElapsedTime(&ms, t0, t1));
        if (r >= 0) {
          sum[t] += ms * 1e3;
          mn[t] = std::min(mn[t], static_cast<double>(ms) * 1e3);
        }
      }
    a.tile = GemmTile::kAuto;
    const GemmTile auto_tile = dsv4::grouped_gemm_resolve_tile(a);
    std::vector<uint16_t> ref(sh.T * out_cols), got(ref.size());
    CHECK_CUDA(cudaMemcpy(ref.data(), dout[3], ref.size() * 2, cudaMemcpyDeviceToHost));
    double max_ref = 0;
    for (uint16_t v : ref) max_ref = std::max(max_ref, static_cast<double>(std::fabs(bf16_to_float(v))));
    for (int t = 0; t < NT; ++t) {
      CHECK_CUDA(cudaMemcpy(got.data(), dout[t], got.size() * 2, cudaMemcpyDeviceToHost));
      double worst = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        const double d = std::fabs(static_cast<double>(bf16_to_float(got[i])) - bf16_to_float(ref[i]));
        worst = std::max(worst, std::isnan(d) ? 1e30 : d);
      }
      const double rel = worst / (max_ref > 0 ? max_ref : 1);
      const bool good = rel <= 2e-2 && std::isfinite(max_ref);
      ok = ok && good;
      const double mean = sum[t] / reps;
      std::printf("time%s %-16s %-12s %8.2f us mean %8.2f us min %6.2f TB/s (%.1f MB)  vs gemv %.1e %s%s\n",
                  read_flush ? "(read flush)" : "", sh.name, tnames[t], mean, mn[t], w_n / (mean * 1e-6) / 1e12, w_n / 1e6, rel,
                  good ? "ok" : "FAIL",
                  t == 4 ? (auto_tile == GemmTile::kGemv ? " (auto = gemv)"
                            : auto_tile == GemmTile::kSkinny ? " (auto = skinny)"
                            : auto_tile == GemmTile::kDecodeDeep ? " (auto = decode_deep)"
                            : " (auto = other)") : "");
    }
    for (void* p : {static_cast<void*>(dw), static_cast<void*>(ds), static_cast<void*>(dx),
                    static_cast<void*>(dpos), static_cast<void*>(dfr)})
      CHECK_CUDA(cudaFree(p));
    for (auto* o : dout) CHECK_CUDA(cudaFree(o));
  }
  CHECK_CUDA(cudaEventDestroy(t0));
  CHECK_CUDA(cudaEventDestroy(t1));
  CHECK_CUDA(cudaFree(flush));
  CHECK_CUDA(cudaFree(flush_sink));
  return ok;
}

// fp8_act_quant_sim against a transcription of dsv4.ops.quant.fp8_e4m3_sim (block 128).
bool check_act_quant(std::mt19937& rng) {
  const int rows = 37, cols = 384;
  std::vector<uint16_t> x16(rows * cols);
  std::normal_distribution<float> normal(0.f, 3.f);
  for (size_t i = 0; i < x16.size(); ++i) {
    float v = normal(rng) * ((i / 128) % 3 == 0 ? 1e-3f : 1.0f);
    if (i % 997 == 5) v = 0.f;
    x16[i] = float_to_bf16(v);
  }
  x16[3 * cols + 7] = 0x7f80;  // +inf: that block gets scale 1
  uint16_t* dx = to_device(x16);
  uint16_t* dy = nullptr;
  CHECK_CUDA(cudaMalloc(&dy, x16.size() * 2));
  CHECK_CUDA(dsv4::fp8_act_quant_sim(dx, cols, dy, cols, rows, cols, nullptr));
  std::vector<uint16_t> y16(x16.size());
  CHECK_CUDA(cudaMemcpy(y16.data(), dy, y16.size() * 2, cudaMemcpyDeviceToHost));
  int bad = 0;
  for (int r = 0; r < rows; ++r)
    for (int b = 0; b < cols / 128; ++b) {
      float amax = 0.f;
      bool finite = true;
      for (int i = 0; i < 128; ++i) {
        const float v = bf16_to_float(x16[r * cols + b * 128 + i]);
        finite = finite && std::isfinite(v);
        amax = std::max(amax, std::fabs(v));
      }
      amax = std::max(amax, 1e-4f);
      int ex;
      const float mant = std::frexp(amax / 448.0f, &ex);
      const float s = finite ? std::ldexp(1.0f, mant == 0.5f ? ex - 1 : ex) : 1.0f;
      for (int i = 0; i < 128; ++i) {
        const size_t idx = r * cols + b * 128 + i;
        const float t = std::min(std::max(bf16_to_float(x16[idx]) / s, -448.f), 448.f);
        const float q = static_cast<float>(__nv_fp8_e4m3(t)) * s;  // RNE, host conversion
        if (float_to_bf16(q) != y16[idx] && bad++ < 3)
          std::fprintf(stderr, "  act_quant: [%d, %d]: got %g want %g\n", r, b * 128 + i,
                       bf16_to_float(y16[idx]), q);
      }
    }
  CHECK_CUDA(cudaFree(dx));
  CHECK_CUDA(cudaFree(dy));
  std::printf("%-44s %s\n", "fp8_act_quant_sim (bit-exact)", bad ? "FAIL" : "ok");
  return bad == 0;
}

// The kernel's e2m1 -> bf16 decoder (grouped_gemm_fp4.cuh, host emulation of PRMT) bit for
// bit against the table: every 16-bit half word in both halves, plus random words.
bool check_e2m1_decoder() {
  std::mt19937 rng(7);
  long bad = 0;
  auto test = [&](uint32_t w) {
    uint32_t o[4];
    dsv4::gg::e2m1x8_to_bf16x8(w, o);
    for (int j = 0; j < 8; ++j) {
      const uint16_t got = static_cast<uint16_t>((o[j / 2] >> (16 * (j & 1))) & 0xFFFFu);
      const uint16_t want = float_to_bf16(e2m1_to_float((w >> (4 * j)) & 15u));
      if (got != want && bad++ < 3)
        std::fprintf(stderr, "  e2m1 decoder: word %08x element %d: got %04x want %04x\n", w,
                     j, got, want);
    }
  };
  for (uint32_t x = 0; x < 65536; ++x) {
    test(x | (static_cast<uint32_t>(rng()) << 16));
    test((x << 16) | (static_cast<uint32_t>(rng()) & 0xFFFFu));
  }
  for (int i = 0; i < 200000; ++i) test(static_cast<uint32_t>(rng()));
  std::printf("%-44s %s\n", "e2m1 byte-permutation decoder (host)", bad ? "FAIL" : "ok");
  return bad == 0;
}

// The FP8 x FP8 path's e2m1 -> e4m3 conversion with a folded scale shift t (grouped_gemm_fp4.cuh,
// host emulation of PRMT): every code word of a random sample for every shift t in [-20, 6];
// exact (e4m3 value == e2m1 value * 2^t) for t >= -8, nearest e4m3 (error <= half the 2^-9
// subnormal step) below; and the folded scale 2^(cmax - 133) for every code.
bool check_e2m1_to_e4m3() {
  std::mt19937 rng(11);
  long bad = 0;
  for (int t = -20; t <= 6; ++t) {
    uint32_t lut0, lut1;
    dsv4::gg::e4m3_lut_for_shift(t, lut0, lut1);
    auto test = [&](uint32_t w) {
      uint32_t o[2];
      dsv4::gg::e2m1x8_to_e4m3x8(w, lut0, lut1, o);
      for (int j = 0; j < 8; ++j) {
        const uint8_t code = static_cast<uint8_t>((w >> (4 * j)) & 15u);
        const float got = e4m3_to_float(static_cast<uint8_t>((o[j / 4] >> (8 * (j & 3))) & 0xFFu));
        const float want = std::ldexp(e2m1_to_float(code), t);
        const float tol = t >= -8 ? 0.f : std::ldexp(1.0f, -10);
        const bool sign_ok = (code & 7) == 0 || std::signbit(got) == std::signbit(want) ||
                             got == 0.f;
        if ((std::fabs(got - want) > tol || !sign_ok) && bad++ < 3)
          std::fprintf(stderr, "  e2m1->e4m3: t %d word %08x element %d: got %g want %g\n", t,
                       w, j, got, want);
      }
    };
    for (uint32_t x = 0; x < 65536; x += 7) test(x | (static_cast<uint32_t>(rng()) << 16));
    for (int i = 0; i < 20000; ++i) test(static_cast<uint32_t>(rng()));
  }
  for (uint32_t c = 0; c < 255; ++c) {
    const float got = dsv4::gg::fp4_folded_scale(c, false);
    if (got != std::ldexp(1.0f, static_cast<int>(c) - 133) && bad++ < 3)
      std::fprintf(stderr, "  folded scale: code %u: got %g\n", c, got);
  }
  if (!std::isnan(dsv4::gg::fp4_folded_scale(7, true)) && bad++ < 3)
    std::fprintf(stderr, "  folded scale: NaN code not NaN\n");
  std::printf("%-44s %s\n", "e2m1 -> e4m3 with folded scales (host)", bad ? "FAIL" : "ok");
  return bad == 0;
}

}  // namespace

// kAuto's choice of the skinny tile (grouped_gemm_resolve_tile, host only): by default FP8
// weights without expert offsets at one row; DSV4_GEMM_SKINNY=1 the wider rule; =0 never.
bool check_skinny_rule() {
  auto args = [](GemmWeightFormat f, int64_t pairs, bool moe) {
    static const int32_t offsets[3] = {0, 0, 0};
    dsv4::GroupedGemmArgs a;
    a.w_format = f;
    a.n_experts = moe ? 2 : 1;
    a.rows = 1024;
    a.k = 4096;
    a.pairs = pairs;
    a.expert_offsets = moe ? offsets : nullptr;
    a.num_sms = 132;
    return a;
  };
  struct Case { const char* env; GemmWeightFormat f; int64_t pairs; bool moe; bool skinny; };
  const GemmWeightFormat bf16 = GemmWeightFormat::kBF16, fp8 = GemmWeightFormat::kFP8,
                         fp4 = GemmWeightFormat::kFP4;
  const Case cases[] = {
      {nullptr, fp8, 1, false, true},   {nullptr, fp8, 2, false, false},
      {nullptr, bf16, 1, false, false}, {nullptr, fp4, 1, false, false},
      {nullptr, fp8, 1, true, false},   {"1", bf16, 2, false, true},
      {"1", fp4, 2, true, true},        {"1", fp8, 3, false, false},
      {"1", bf16, 3, true, false},      {"0", fp8, 1, false, false},
  };
  bool ok = true;
  setenv("DSV4_GEMM_GEMV", "0", 1);  // the GEMV tile precedes the skinny rule (check_gemv_rule)
  for (const Case& c : cases) {
    if (c.env) setenv("DSV4_GEMM_SKINNY", c.env, 1); else unsetenv("DSV4_GEMM_SKINNY");
    const bool got = dsv4::grouped_gemm_resolve_tile(args(c.f, c.pairs, c.moe)) == GemmTile::kSkinny;
    if (got != c.skinny) {
      std::printf("skinny rule: DSV4_GEMM_SKINNY=%s format %d pairs %lld %s: %s, expected %s\n",
                  c.env ? c.env : "(unset)", static_cast<int>(c.f),
                  static_cast<long long>(c.pairs), c.moe ? "MoE" : "dense",
                  got ? "skinny" : "not skinny", c.skinny ? "skinny" : "not skinny");
      ok = false;
    }
  }
  unsetenv("DSV4_GEMM_SKINNY");
  unsetenv("DSV4_GEMM_GEMV");
  std::printf("skinny rule: %s\n", ok ? "ok" : "FAIL");
  return ok;
}

// kAuto's choice of the GEMV tile and DSV4_GEMM_TILE=gemv (grouped_gemm_resolve_tile, host
// only): kAuto takes it for dense bf16 / FP8 weights, pairs 1-2, the store epilogue, bf16
// activations (DSV4_GEMM_GEMV=0: never); forced outside that contract it resolves to kSkinny.
bool check_gemv_rule() {
  struct Case {
    const char* gemv_env;  // DSV4_GEMM_GEMV
    const char* tile_env;  // DSV4_GEMM_TILE
    GemmWeightFormat f;
    int64_t pairs;
    bool moe, swiglu, fp8_act;
    int k;
    GemmTile want;
  };
  const GemmWeightFormat bf16 = GemmWeightFormat::kBF16, fp8 = GemmWeightFormat::kFP8,
                         fp4 = GemmWeightFormat::kFP4;
  const GemmTile gemv = GemmTile::kGemv, skinny = GemmTile::kSkinny,
                 deep = GemmTile::kDecodeDeep, dec = GemmTile::kDecode;
  const Case cases[] = {
      {nullptr, nullptr, fp8, 1, false, false, false, 4096, gemv},
      {nullptr, nullptr, fp8, 2, false, false, false, 4096, gemv},
      {nullptr, nullptr, bf16, 1, false, false, false, 4096, gemv},
      {nullptr, nullptr, bf16, 2, false, false, false, 4096, gemv},
      {nullptr, nullptr, bf16, 2, false, false, false, 24576, gemv},   // 96 KB of activations
      {nullptr, nullptr, bf16, 2, false, false, false, 24592, deep},   // past them
      {nullptr, nullptr, fp8, 3, false, false, false, 4096, deep},
      {nullptr, nullptr, fp4, 1, false, false, false, 4096, deep},
      {nullptr, nullptr, fp8, 1, true, false, false, 4096, deep},
      {nullptr, nullptr, fp8, 1, false, true, false, 4096, skinny},    // SwiGLU: skinny rule
      {nullptr, nullptr, fp8, 1, false, false, true, 4096, deep},      // FP8 x FP8: 16-row tile
      {"0", nullptr, fp8, 1, false, false, false, 4096, skinny},
      {"0", nullptr, bf16, 1, false, false, false, 4096, deep},
      {"1", nullptr, bf16, 2, false, false, false, 4096, gemv},
      {"0", "gemv", bf16, 1, false, false, false, 4096, gemv},         // forced: the env rule is kAuto's
      {nullptr, "gemv", fp8, 3, false, false, false, 4096, skinny},    // forced, outside: skinny
      {nullptr, "gemv", fp8, 1, true, false, false, 4096, skinny},
      {nullptr, "gemv", fp4, 1, false, false, false, 4096, skinny},
      {nullptr, "gemv", bf16, 1, false, true, false, 4096, skinny},
      {nullptr, "decode", fp8, 1, false, false, false, 4096, dec},
  };
  bool ok = true;
  for (const Case& c : cases) {
    if (c.gemv_env) setenv("DSV4_GEMM_GEMV", c.gemv_env, 1); else unsetenv("DSV4_GEMM_GEMV");
    if (c.tile_env) setenv("DSV4_GEMM_TILE", c.tile_env, 1); else unsetenv("DSV4_GEMM_TILE");
    static const int32_t offsets[3] = {0, 0, 0};
    static const float xs = 1.f;
    dsv4::GroupedGemmArgs a;
    a.w_format = c.f;
    a.n_experts = c.moe ? 2 : 1;
    a.rows = 1024;
    a.k = c.k;
    a.pairs = c.pairs;
    a.expert_offsets = c.moe ? offsets : nullptr;
    a.epilogue = c.swiglu ? GemmEpilogue::kSwiGLU : GemmEpilogue::kStore;
    a.x_scale = c.fp8_act ? &xs : nullptr;
    a.num_sms = 132;
    const GemmTile got = dsv4::grouped_gemm_resolve_tile(a);
    if (got != c.want) {
      std::printf("gemv rule: GEMV=%s TILE=%s format %d pairs %lld%s%s%s k %d: tile %d, "
                  "expected %d\n", c.gemv_env ? c.gemv_env : "(unset)",
                  c.tile_env ? c.tile_env : "(unset)", static_cast<int>(c.f),
                  static_cast<long long>(c.pairs), c.moe ? " MoE" : "", c.swiglu ? " swiglu" : "",
                  c.fp8_act ? " fp8-act" : "", c.k, static_cast<int>(got),
                  static_cast<int>(c.want));
      ok = false;
    }
  }
  unsetenv("DSV4_GEMM_GEMV");
  unsetenv("DSV4_GEMM_TILE");
  std::printf("gemv rule: %s\n", ok ? "ok" : "FAIL");
  return ok;
}

// --refusal: the skinny tile's occupancy query refused, then an error pending before the call,
// then the query asked again (own_error.cuh; a fresh process: nothing cached yet). Each phase
// runs FP8 store dense at 1 pair and routed at 12, bf16 SwiGLU and FP8 RoPE (several of the
// tile's instances, each with its own cache).
bool refusal_suite(std::mt19937& rng) {
  const auto cases = [&](const char* phase, bool pend_first) {
    std::printf("-- %s\n", phase);
    bool ok = true;
    Case c1{"store fp8 skinny dense 1 pair", GemmWeightFormat::kFP8, GemmEpilogue::kStore,
            GemmTile::kSkinny, 1, 136, 208, 1, 1};
    c1.dense = true;
    Case c2{"store fp8 skinny 12 pairs", GemmWeightFormat::kFP8, GemmEpilogue::kStore,
            GemmTile::kSkinny, 6, 136, 208, 45, 12};
    Case c3{"swiglu bf16 skinny 4 pairs", GemmWeightFormat::kBF16, GemmEpilogue::kSwiGLU,
            GemmTile::kSkinny, 6, 96, 208, 45, 4};
    Case c4{"oproj rope fp8 skinny T=2", GemmWeightFormat::kFP8, GemmEpilogue::kStore,
            GemmTile::kSkinny, 2, 128, 256, 2, 2, true};
    for (const Case* c : {&c1, &c2, &c3, &c4}) ok = run_case(*c, rng, pend_first) && ok;
    return ok;
  };
  bool ok = true;
  setenv("DSV4_TEST_REFUSE", "query", 1);
  ok = cases("DSV4_TEST_REFUSE=query (the occupancy query fails: 1 CTA per SM)", false) && ok;
  ok = cases("DSV4_TEST_REFUSE=query, an error pending before each call", true) && ok;
  unsetenv("DSV4_TEST_REFUSE");
  ok = cases("an error pending before each call (no query made while it is)", true) && ok;
  ok = cases("DSV4_TEST_REFUSE unset (the query asked again, cached)", false) && ok;
  ok = cases("again (the cached query)", false) && ok;
  // the other tiles, whose launchers set their kernel's shared-memory size on every call
  // (cudaFuncSetAttribute, which clears the thread's last error): the caller's error must
  // still come back
  std::printf("-- an error pending before each call: the GEMV and tensor-core tiles\n");
  const Case others[] = {
      {"oproj rope fp8 gemv T=1", GemmWeightFormat::kFP8, GemmEpilogue::kStore, GemmTile::kGemv,
       8, 128, 512, 1, 1, true},
      {"store bf16 decode", GemmWeightFormat::kBF16, GemmEpilogue::kStore, GemmTile::kDecode, 6,
       136, 208, 45, 300},
      {"store fp8 large", GemmWeightFormat::kFP8, GemmEpilogue::kStore, GemmTile::kLarge, 6, 136,
       208, 45, 300},
      {"swiglu fp4 medium", GemmWeightFormat::kFP4, GemmEpilogue::kSwiGLU, GemmTile::kMedium, 6,
       96, 160, 45, 300},
  };
  for (const Case& c : others) ok = run_case(c, rng, true) && ok;
  return ok;
}

int main(int argc, char** argv) {
  if (!check_e2m1_decoder() || !check_e2m1_to_e4m3() || !check_skinny_rule() ||
      !check_gemv_rule()) {
    std::printf("FAIL\n");
    return 1;
  }
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("SKIP: no CUDA device\n");
    return 0;
  }
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  if (prop.major != 9 || prop.minor != 0) {
    std::printf("SKIP: the grouped GEMM needs sm_90a (found sm_%d%d)\n", prop.major, prop.minor);
    return 0;
  }
  std::mt19937 rng(20261205);
  if (argc > 1 && std::strcmp(argv[1], "--refusal") == 0) {
    const bool ok = refusal_suite(rng);
    std::printf(ok ? "PASS\n" : "FAIL\n");
    return ok ? 0 : 1;
  }
  if (std::getenv("DSV4_CHECK_GEMV_ONLY") != nullptr) {  // the GEMV tile's cases and timing only
    bool ok = check_gemv_cases(rng);
    if (std::getenv("DSV4_CHECK_NO_TIMING") == nullptr) ok = time_gemv() && ok;
    std::printf(ok ? "PASS\n" : "FAIL\n");
    return ok ? 0 : 1;
  }
  const GemmTile tiles[] = {GemmTile::kDecode, GemmTile::kDecodeDeep, GemmTile::kMedium,
                            GemmTile::kLarge, GemmTile::kHuge};
  const char* tile_names[] = {"decode", "decode_deep", "medium", "large", "huge"};
  const GemmWeightFormat fmts[] = {GemmWeightFormat::kBF16, GemmWeightFormat::kFP8,
                                   GemmWeightFormat::kFP4};
  const char* fmt_names[] = {"bf16", "fp8", "fp4"};
  bool ok = check_act_quant(rng);
  static char names[256][64];
  int ni = 0;
  for (int t = 0; t < 5; ++t)
    for (int ov = 0; ov < (t >= 2 ? 2 : 1); ++ov)  // overlapped pipeline: two-warpgroup tiles
      for (int f = 0; f < 3; ++f)
        for (int epi = 0; epi < 2; ++epi) {
          std::snprintf(names[ni], 64, "%s %s %s%s", epi ? "swiglu" : "store", fmt_names[f],
                        tile_names[t], ov ? " overlap" : "");
          Case c{names[ni++], fmts[f], epi ? GemmEpilogue::kSwiGLU : GemmEpilogue::kStore,
                 tiles[t], 6, epi ? 96 : 136, f == 2 ? 160 : 208, 45, 300};
          c.fp32_scale = (t + f) % 2 == 1;
          c.overlap = ov == 1;
          ok = run_case(c, rng) && ok;
        }
  for (int t = 0; t < 5; ++t)
    for (int ov = 0; ov < (t >= 2 ? 2 : 1); ++ov)
      for (int f = 0; f < 2; ++f) {
        std::snprintf(names[ni], 64, "oproj rope %s %s%s", fmt_names[f], tile_names[t],
                      ov ? " overlap" : "");
        Case c{names[ni++], fmts[f], GemmEpilogue::kStore, tiles[t], 2, 128, 256, 70, 70, true};
        c.overlap = ov == 1;
        ok = run_case(c, rng) && ok;
      }
  // the skinny tile (weight stream on CUDA cores): 1 / 2 / 4 / 8 activation rows per unit,
  // routed (few pairs: 2-row units; many: 8-row units over several tiles per expert; the last
  // 3 pairs unowned) and dense with RoPE (T = 1, 2, 3, 8, 70), both scale kinds
  for (int pairs : {4, 12, 40, 300})
    for (int f = 0; f < 3; ++f)
      for (int epi = 0; epi < 2; ++epi) {
        std::snprintf(names[ni], 64, "%s %s skinny %d pairs", epi ? "swiglu" : "store",
                      fmt_names[f], pairs);
        Case c{names[ni++], fmts[f], epi ? GemmEpilogue::kSwiGLU : GemmEpilogue::kStore,
               GemmTile::kSkinny, 6, epi ? 96 : 136, f == 2 ? 160 : 208, 45, pairs};
        c.fp32_scale = (pairs + f) % 2 == 1;
        ok = run_case(c, rng) && ok;
      }
  for (int T : {1, 2, 3, 8, 70})
    for (int f = 0; f < 2; ++f) {
      std::snprintf(names[ni], 64, "oproj rope %s skinny T=%d", fmt_names[f], T);
      Case c{names[ni++], fmts[f], GemmEpilogue::kStore, GemmTile::kSkinny, 2, 128, 256, T, T,
             true};
      c.fp32_scale = T % 2 == 1;
      ok = run_case(c, rng) && ok;
    }
  // a long k (2048: two to four warps per row group, up to two chunks in flight per lane),
  // 2-row units (5 pairs on 6 experts, 2 of them owned)
  for (int f = 0; f < 3; ++f) {
    std::snprintf(names[ni], 64, "store %s skinny k=2048", fmt_names[f]);
    Case c{names[ni++], fmts[f], GemmEpilogue::kStore, GemmTile::kSkinny, 6, 64, 2048, 4, 5};
    ok = run_case(c, rng) && ok;
  }
  // one weight matrix whose e8m0 scale tensor has 2 bytes (not a multiple of 4): the scale
  // word read must stay inside it (run under compute-sanitizer to see an over-read)
  for (int t = 0; t < 2; ++t) {
    std::snprintf(names[ni], 64, "store fp8 2-byte e8m0 scales %s", tile_names[t]);
    Case c{names[ni++], GemmWeightFormat::kFP8, GemmEpilogue::kStore, tiles[t], 1, 120, 208, 9, 9};
    ok = run_case(c, rng) && ok;
  }
  // the warp-specialised mainloop (grouped_gemm_ws.cuh; bf16 weights, kLarge / kHuge): both
  // epilogues and the RoPE load path; a k of 4 steps (fewer than the stages), of 18 steps with
  // a partial last one (the ring wraps inside a unit), and more units than SMs (each block
  // walks several units: a grid of 5 blocks; the producer runs ahead across them); empty
  // experts, unowned pairs
  for (int t = 3; t < 5; ++t) {
    for (int epi = 0; epi < 2; ++epi) {
      std::snprintf(names[ni], 64, "ws %s bf16 %s", epi ? "swiglu" : "store", tile_names[t]);
      Case c{names[ni++], GemmWeightFormat::kBF16, epi ? GemmEpilogue::kSwiGLU : GemmEpilogue::kStore,
             tiles[t], 6, epi ? 96 : 136, 208, 45, 300};
      c.ws = true;
      ok = run_case(c, rng) && ok;
      std::snprintf(names[ni], 64, "ws %s bf16 %s k=1096", epi ? "swiglu" : "store", tile_names[t]);
      Case d{names[ni++], GemmWeightFormat::kBF16, epi ? GemmEpilogue::kSwiGLU : GemmEpilogue::kStore,
             tiles[t], 3, epi ? 200 : 264, 1096, 300, 700};
      d.ws = true;
      ok = run_case(d, rng) && ok;
      std::snprintf(names[ni], 64, "ws %s bf16 %s grid of 5", epi ? "swiglu" : "store",
                    tile_names[t]);
      Case m{names[ni++], GemmWeightFormat::kBF16, epi ? GemmEpilogue::kSwiGLU : GemmEpilogue::kStore,
             tiles[t], 4, 512, 256, 1000, 2000};
      m.ws = true;
      m.num_sms = 5;
      ok = run_case(m, rng) && ok;
    }
    std::snprintf(names[ni], 64, "ws oproj rope bf16 %s", tile_names[t]);
    Case r{names[ni++], GemmWeightFormat::kBF16, GemmEpilogue::kStore, tiles[t], 2, 128, 256, 70, 70,
           true};
    r.ws = true;
    ok = run_case(r, rng) && ok;
    std::snprintf(names[ni], 64, "ws oproj rope bf16 %s 600 rows k=512", tile_names[t]);
    Case r2{names[ni++], GemmWeightFormat::kBF16, GemmEpilogue::kStore, tiles[t], 2, 256, 512, 600,
            600, true};
    r2.ws = true;
    r2.num_sms = 3;  // several units per block: the RoPE table rewritten after each epilogue
    ok = run_case(r2, rng) && ok;
  }
  {
    Case c{"store fp8 2-byte e8m0 scales skinny", GemmWeightFormat::kFP8, GemmEpilogue::kStore,
           GemmTile::kSkinny, 1, 120, 208, 9, 9};
    ok = run_case(c, rng) && ok;
  }
  ok = check_gemv_cases(rng) && ok;
  // the FP8 x FP8 path: FP8 (e8m0 / float32 scales) and FP4 weights, both epilogues, the three
  // tiles (16 / 64 / 128 rows), empty experts, unowned pairs, T = 1, a k of one block
  const GemmTile qtiles[] = {GemmTile::kDecode, GemmTile::kMedium, GemmTile::kLarge};
  for (int t = 0; t < 3; ++t)
    for (int f = 1; f < 3; ++f)
      for (int epi = 0; epi < 2; ++epi) {
        std::snprintf(names[ni], 64, "fp8_mma %s %s %s%s", epi ? "swiglu" : "store", fmt_names[f],
                      tile_names[t == 0 ? 0 : t + 1], f == 1 && t == 1 ? " fp32 scales" : "");
        QCase c{names[ni++], fmts[f], epi ? GemmEpilogue::kSwiGLU : GemmEpilogue::kStore,
                qtiles[t], 6, epi ? 200 : 136, 384, 45, 300, 3};
        c.fp32_scale = f == 1 && t == 1;
        ok = run_qmma_case(c, rng) && ok;
      }
  {
    QCase c1{"fp8_mma swiglu fp8 T=1 (one pair)", GemmWeightFormat::kFP8, GemmEpilogue::kSwiGLU,
             GemmTile::kAuto, 4, 96, 256, 1, 1, 0};
    ok = run_qmma_case(c1, rng) && ok;
    QCase c2{"fp8_mma store fp4 T=1 k=128", GemmWeightFormat::kFP4, GemmEpilogue::kStore,
             GemmTile::kAuto, 3, 72, 128, 1, 2, 0};
    ok = run_qmma_case(c2, rng) && ok;
    QCase c3{"fp8_mma swiglu fp4 300 pairs auto tile", GemmWeightFormat::kFP4,
             GemmEpilogue::kSwiGLU, GemmTile::kAuto, 5, 256, 512, 80, 300, 3};
    ok = run_qmma_case(c3, rng) && ok;
  }
  // (DSV4_CHECK_NO_TIMING=1 skips it, e.g. under compute-sanitizer)
  if (std::getenv("DSV4_CHECK_NO_TIMING") == nullptr) {
    ok = time_qmma_prefill() && ok;
    ok = time_gemv() && ok;
  }
  std::printf(ok ? "PASS\n" : "FAIL\n");
  return ok ? 0 : 1;
}
