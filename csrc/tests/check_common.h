// Shared helpers of the torch-free C++ checks (csrc/tests/check_*.cu): the CUDA error check that
// fails the check, bf16 <-> float conversion on the host (bf16 is stored as uint16_t), and the
// caller's-error-pending probe of the --refusal modes.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "../kernels/own_error.cuh"

#define CHECK_CUDA(expr)                                                               \
  do {                                                                                 \
    cudaError_t err_ = (expr);                                                         \
    if (err_ != cudaSuccess) {                                                         \
      std::fprintf(stderr, "FAIL: %s: %s (%s:%d)\n", #expr, cudaGetErrorString(err_),  \
                   __FILE__, __LINE__);                                                \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)

namespace dsv4_check {

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to nearest even; infinities keep their sign, a NaN stays a (quiet) NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7f800000u) == 0x7f800000u) {
    return static_cast<uint16_t>((bits >> 16) | ((bits & 0xffffu) ? 0x40u : 0u));
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// --refusal modes (own_error.cuh's protocol): an op called while its caller has an error pending
// must hand that error back (returned, or still pending after the call), never clear it.
// leave_error_pending() leaves cudaErrorInvalidValue pending, as an unrelated earlier launch of
// the caller could, with the failing call DSV4_TEST_REFUSE uses (made here, not through
// dsv4::refused_for_test, so that dsv4::refusals_for_test counts the launchers' refusals only);
// false if none is pending then.
inline bool leave_error_pending() {
  (void)cudaDeviceGetAttribute(nullptr, cudaDevAttrMultiProcessorCount, 0);
  return cudaPeekAtLastError() == cudaErrorInvalidValue;
}
// Whether that error reached the caller: `ret` is the call's return, `pending_after` what
// cudaGetLastError() read after it.
inline bool pending_error_kept(bool injected, cudaError_t ret, cudaError_t pending_after) {
  return injected && (ret == cudaErrorInvalidValue || pending_after == cudaErrorInvalidValue);
}

// --refusal phases that force a refusal (DSV4_TEST_REFUSE): whether the calls since `before` (a
// dsv4::refusals_for_test() reading) met at least one, so the fallback they checked did run.
// Prints an ok / FAIL line after `label`.
inline bool refusal_happened(long long before, const char* label) {
  const long long n = dsv4::refusals_for_test().load() - before;
  std::printf("%s %s %lld forced refusal(s)%s\n", n > 0 ? "ok  " : "FAIL", label, n,
              n > 0 ? "" : " (THE FALLBACK WAS NOT EXERCISED)");
  return n > 0;
}

}  // namespace dsv4_check
