#!/usr/bin/env bash
# On the GPU machine (H200; python3 3.12, torch 2.11+cu130, nvcc 13.0, no internet): build the
# extension, generate with both backends (scripts/compare_backends.py), run the CUDA tests, the
# C++ checks (CMake + ctest) and every bench/bench_*.py. All logs go to
# ${OUT:-/tmp/dsv4_out}. Exits non-zero if any step failed (later steps still run, except that
# nothing runs after a failed build).
#
#   bash scripts/gpu_check.sh            # everything
#   QUICK=1 bash scripts/gpu_check.sh    # build, CUDA tests, bench_csa --quick (no CMake, no model bench)
#   (QUICK also runs bench_attn --quick; the full run adds FlashMLA side by side when ./peers exists)
#   (QUICK also runs bench_gemm --quick)
#   (QUICK also runs bench_moe / bench_mhc --quick)
#   PYTEST_ARGS="-x -k sparse" ...       # extra pytest arguments
#   ONLY=build,info,pytest_cuda ...      # run only the steps named (the others print "skipped")
#   PREBUILT=DIR ...                     # install DIR's _C*.so[.xz] + _build_config.py, no build
#   RUNTIME_1M=1 / NCU_PROFILE=1 ...     # also the 1M-context mode / ncu of the missed targets
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/gpu_common.sh   # PY, OUT, status, step(), CUDA_HOME, the .whl/ wheels
nvidia-smi > "$OUT/nvidia-smi.log" 2>&1

export DSV4_EXPECT_C=1
# This harness is what verifies kernels on hardware: the model may call all of them here
# (dsv4.ops.backend.HARDWARE_VERIFIED lists those that passed; the model calls only those by default).
export DSV4_UNVERIFIED_KERNELS=1
if [[ -n "${PREBUILT:-}" ]]; then
  # PREBUILT=DIR: a dsv4/_C*.so (or .so.xz) and its _build_config.py built elsewhere for this
  # machine's python and torch; the package then runs from python/ (saves the build's minutes)
  step build bash -c 'set -e; for f in "$0"/_C*.so*; do case "$f" in
      *.xz) xz -dc "$f" > "python/dsv4/$(basename "${f%.xz}")" ;; *) cp "$f" python/dsv4/ ;; esac
    done; cp "$0/_build_config.py" python/dsv4/' "$PREBUILT" || exit 1
  export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
else
  MAX_JOBS=${MAX_JOBS:-16} step build "$PY" -m pip install --no-build-isolation --no-deps -e . \
    || exit 1
fi
step info "$PY" -c "import dsv4.ops._ext as e; print(e.format_info())
from dsv4.ops.backend import kernel_source_digest as d, VERIFIED_SOURCE_DIGEST as v
print('kernel source digest', d(), '(= the verified one)' if d() == v else '(NOT the verified '
      'one: when every step below passes, record it in dsv4.ops.backend)')"
# per op: the ops whose sources are not the verified ones (what this run has to verify)
step op_digests "$PY" -c "from dsv4.ops.backend import op_source_digests as d, VERIFIED_OP_DIGESTS as v
c = d(); print('ops not verified at these sources:', [o for o in c if c[o] != v.get(o)]); print(c)"
# dsv4 generate on the GPU with both backends, then the two greedy continuations side by side.
step generate_cuda "$PY" -m dsv4.cli generate --model tiny --device cuda --backend cuda \
  --prompt "def fibonacci(n):" --max-new-tokens 32
step compare_backends "$PY" scripts/compare_backends.py
# shellcheck disable=SC2086
step pytest_cuda "$PY" -m pytest -q -m cuda -rfE ${PYTEST_ARGS:-} tests
if [[ -n "${QUICK:-}" ]]; then
  step bench_csa "$PY" bench/bench_csa.py --quick
  step bench_attn "$PY" bench/bench_attn.py --quick
  step bench_gemm "$PY" bench/bench_gemm.py --quick
  step bench_moe "$PY" bench/bench_moe.py --quick
  step bench_mhc "$PY" bench/bench_mhc.py --quick
  step bench_e2e "$PY" bench/bench_e2e.py --quick
  echo "gpu_check (quick): $([[ $status -eq 0 ]] && echo OK || echo FAILED); logs in $OUT"
  exit "$status"
fi
if command -v cmake >/dev/null; then
  step cmake_build bash -c 'cmake -S . -B build/cmake -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" \
    && cmake --build build/cmake -j "$(nproc)"' && step ctest ctest --test-dir build/cmake --output-on-failure
fi
# The MoE / mHC / GEMM C++ checks under compute-sanitizer memcheck (exact-size buffers: any read
# or write past a tensor is reported; gemm-review)
if command -v compute-sanitizer >/dev/null && [[ -x build/cmake/dsv4_check_grouped_gemm ]]; then
  for c in grouped_gemm moe_routing mhc; do
    step "memcheck_$c" compute-sanitizer --tool memcheck --error-exitcode 1 "build/cmake/dsv4_check_$c"
  done
fi
for bench in bench/bench_*.py; do
  [[ -e "$bench" ]] || continue
  step "$(basename "$bench" .py)" "$PY" "$bench"
done
# FlashMLA beside dsv4 in one process (issue 9): needs ../shared/peers carried as ./peers
# (../shared/peers/README.md); FlashMLA is built here from the tarball, never committed.
if [[ -f peers/build_flashmla.sh ]]; then
  step build_flashmla bash peers/build_flashmla.sh /tmp/flashmla \
    && FMLA_DIR=/tmp/flashmla step side_by_side_flashmla "$PY" bench/side_by_side_flashmla.py
fi
# Runtime engine (issue 8): the engine's CUDA tests run in pytest_cuda above and bench_e2e.py in
# the loop above; the 1M-context mode is opt-in (several minutes): RUNTIME_1M=1.
if [[ -n "${RUNTIME_1M:-}" ]]; then
  step bench_1m "$PY" -m dsv4.cli bench --mode 1m --layers "${RUNTIME_1M_LAYERS:-2}" \
    --json "$OUT/bench_1m.json"
fi
# Host side of a decode step (host-step, issue 8): the host µs of each operation of an
# overlapped decode step, the CUDA API calls per step and the GPU kernel time (~30 s)
step profile_host_step "$PY" bench/profile_host_step.py --device cuda --steps 32
# FP8 caches (rt-fp8kv): the quick engine bench with the attention KV (584-byte MODEL1) and the
# indexer keys in the release's FP8 layouts, beside bench_e2e's bf16 rows; with RUNTIME_1M=1
# also the 1M mode (bytes per token vs dsv4 info's FP8 arithmetic).
step bench_e2e_fp8 "$PY" -m dsv4.cli bench --quick --kv-cache fp8 --indexer-cache fp8 \
  --json "$OUT/bench_e2e_fp8.json"
if [[ -n "${RUNTIME_1M:-}" ]]; then
  step bench_1m_fp8 "$PY" -m dsv4.cli bench --mode 1m --layers "${RUNTIME_1M_LAYERS:-2}" \
    --kv-cache fp8 --indexer-cache fp8 --json "$OUT/bench_1m_fp8.json"
fi
# 1M context on one GPU (mem-1m, issue 8 item 5): as many V4-Flash layers as fit (--layers
# auto: measured layer bytes, the 1M pool, one chunk's transient, a margin), native FP8/FP4
# weights, FP8 caches; the last 16K-token chunk prefilled over a random 1M pool, decode and the
# attention stack's decode time at 1M (~1-2 minutes): RUNTIME_1M_AUTO=1
# (RUNTIME_1M_PREFILL=full prefills the whole 1M prompt instead: ~7-8 minutes at ~36 layers).
if [[ -n "${RUNTIME_1M_AUTO:-}" ]]; then
  step bench_1m_auto "$PY" -m dsv4.cli bench --mode 1m --layers auto --experts 0 --weights fp8 \
    --kv-cache fp8 --indexer-cache fp8 --prefill-1m "${RUNTIME_1M_PREFILL:-last}" --steps 16 \
    --json "$OUT/bench_1m_auto.json"
fi
# Nsight Compute profile of one launch of each missed-target case (issues 9, 10; opt-in, ~30 s
# a case): NCU_PROFILE=1, NCU_CASES="case ..." (default: every case of bench/profile_kernels.py)
if [[ -n "${NCU_PROFILE:-}" ]] && command -v ncu >/dev/null; then
  # shellcheck disable=SC2046  # the case list splits on whitespace
  PY="$PY" NCU_TIMEOUT=${NCU_TIMEOUT:-120} step ncu_profile bash scripts/ncu_profile.sh "$OUT/ncu" \
    ${NCU_CASES:-$("$PY" bench/profile_kernels.py --list)}
fi
echo "gpu_check: $([[ $status -eq 0 ]] && echo OK || echo FAILED); logs in $OUT"
exit "$status"
