// Host helpers for the runtime calls a launcher makes only to choose its path and handles itself
// when they fail: an occupancy query, a cooperative or programmatic launch the device refuses.
// The launcher then takes a path that needs none of them, so the failure is not the caller's.
// Shared by mhc.cu, indexer_topk.cu, compress_kv.cu, grouped_gemm_skinny.cuh and
// sparse_attn_fp8_sm90.cuh; host code, no torch.
//
// The runtime keeps one last error per host thread. A failing call overwrites it (the earlier
// value is lost); cudaGetLastError() returns it and resets it to cudaSuccess;
// cudaPeekAtLastError() returns it and leaves it. Hence the protocol of these launchers:
//   1. error_pending(): if the caller left an error pending (an unrelated earlier launch), make
//      no call that could fail and take the fallback path; the error stays for the caller (a
//      failing query would overwrite it, and clearing the query's error would then hide it).
//   2. the query or launch; on a failure the launcher handles, clear_own_error(err): the error
//      is the one this call produced (nothing was pending before it), so clearing it hides
//      nothing of the caller's.
// Only a successful query is cached: a failed one is asked again at the next call.
// DeviceQueryCache (below) does all of it for a query with an int result.
//
// The helpers are inline functions in a named namespace (dsv4::own_error), not in an unnamed
// one: several translation units include this header, and templates with external linkage use
// the helpers, so every TU must see the same entities (one definition rule). The
// using-declarations at the end keep the short names (dsv4::error_pending, ...) the files above
// use.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>

namespace dsv4 {
namespace own_error {

// True when the calling thread has an error pending (read without clearing it).
inline bool error_pending() { return cudaPeekAtLastError() != cudaSuccess; }

// Clears the calling thread's last error if it is `err`, an error that the launcher's own
// query or launch just returned and that the launcher handles by falling back. Call it only
// after error_pending() was false before that query or launch.
inline void clear_own_error(cudaError_t err) {
  if (err != cudaSuccess && cudaPeekAtLastError() == err) (void)cudaGetLastError();
}

// DSV4_TEST_REFUSE: test only (csrc/tests/check_mhc.cu, check_indexer_topk.cu,
// check_grouped_gemm.cu, check_compress_kv.cu and check_hca_fp8.cu: --refusal; check_mhc.cu also
// --refusal-nofit); never set it in production. Read at each call where it applies:
//   "query":  each path query that is not cached yet fails as if the device refused (through
//             refused_for_test, a real failing call), so the launcher takes its fallback path;
//             a failed query is not cached, so unsetting the variable restores the default.
//   "launch": the launches that have a fallback for a refusal are refused (mhc: the
//             cooperative decode launch, by a grid no device can hold; indexer_topk: the
//             programmatic launch of the selection; sparse_attn's FP8 kernel: the programmatic
//             launch of the split-K merge; both through refused_for_test); for eager calls
//             (under stream capture a cooperative refusal may come only at instantiation).
//   "nofit":  mhc's one-pass (wide cluster) query answers as on a device with too little shared
//             memory per block for the kernel: a successful "no", cached like any successful
//             answer (so it outlives the variable in the process).
// Unset or anything else: no effect.
enum class TestRefusal { kNone, kQuery, kLaunch, kNoFit };
inline TestRefusal test_refusal() {
  const char* v = std::getenv("DSV4_TEST_REFUSE");
  if (v == nullptr) return TestRefusal::kNone;
  if (std::strcmp(v, "query") == 0) return TestRefusal::kQuery;
  if (std::strcmp(v, "launch") == 0) return TestRefusal::kLaunch;
  if (std::strcmp(v, "nofit") == 0) return TestRefusal::kNoFit;
  return TestRefusal::kNone;
}

// The result of a public entry point that hands back an error its caller left pending: `pending`
// is cudaPeekAtLastError() read on entry (not cleared), `own` what the call itself returned.
// Needed where a launcher sets its kernel's shared-memory size on every call:
// cudaFuncSetAttribute clears the thread's last error (measured on an H100, CUDA 13.0,
// bench/README.md "Session of 2026-12-07, thirteenth"), so the caller's error would vanish.
inline cudaError_t keep_pending(cudaError_t pending, cudaError_t own) {
  return own == cudaSuccess ? pending : own;
}

// How many times refused_for_test() has run in this process. Test only: a --refusal check reads
// it around a call to confirm that the refusal it asked for happened (else a fallback check
// could pass without its fallback running). One counter for the whole program: a static local
// of an inline function is one object in every translation unit that uses it.
inline std::atomic<long long>& refusals_for_test() {
  static std::atomic<long long> n{0};
  return n;
}

// For DSV4_TEST_REFUSE: a runtime call that fails (cudaErrorInvalidValue: no output pointer) and
// leaves its error as the thread's last error, as a refused query or launch does; it runs
// nothing. Counted in refusals_for_test().
inline cudaError_t refused_for_test() {
  refusals_for_test().fetch_add(1, std::memory_order_relaxed);
  return cudaDeviceGetAttribute(nullptr, cudaDevAttrMultiProcessorCount, 0);
}

// The result of one path query (an int >= 0), per device ordinal (0 .. kMaxDevices - 1),
// following the protocol above: get() returns the cached result if there is one; else, while
// the caller has an error pending, `fallback` (no query made); else it runs the query
// (DSV4_TEST_REFUSE=query: refused_for_test instead), caches its result if it succeeded and
// returns it, or clears the query's own error and returns `fallback` (nothing cached: the next
// call asks again). A device outside the table gets `fallback` without a query.
// `query` is a callable cudaError_t(int& result). It may also return an error of its own making
// (no runtime call failed) for a result it cannot use: that is not cached either, and since
// nothing is pending then, nothing is cleared.
// Declare one per query and kernel instance, with static storage (zero-initialised: nothing
// known), e.g. `static DeviceQueryCache cache;` in the launcher (a function template gives each
// instantiation its own). Relaxed atomics: a slot carries no other data, and two threads that
// race on an empty slot both query and store the same value.
class DeviceQueryCache {
 public:
  static constexpr int kMaxDevices = 64;

  template <typename Query>
  int get(int device, int fallback, Query&& query) {
    if (device < 0 || device >= kMaxDevices) return fallback;
    const int known = slot_[device].load(std::memory_order_relaxed);
    if (known > 0) return known - 1;
    if (error_pending()) return fallback;
    int result = 0;
    const cudaError_t err =
        test_refusal() == TestRefusal::kQuery ? refused_for_test() : query(result);
    if (err != cudaSuccess) {
      clear_own_error(err);  // the query's own error (nothing was pending): the fallback runs
      return fallback;
    }
    if (result < 0) result = 0;
    if (result == INT_MAX) result = INT_MAX - 1;  // kept as result + 1
    slot_[device].store(result + 1, std::memory_order_relaxed);
    return result;
  }

 private:
  std::atomic<int> slot_[kMaxDevices];  // 0: nothing cached; else the result + 1
};

}  // namespace own_error

using own_error::clear_own_error;
using own_error::DeviceQueryCache;
using own_error::error_pending;
using own_error::keep_pending;
using own_error::refused_for_test;
using own_error::refusals_for_test;
using own_error::test_refusal;
using own_error::TestRefusal;

}  // namespace dsv4
