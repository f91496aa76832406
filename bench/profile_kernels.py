"""One launch of the dsv4 kernel of each benchmark case that missed its target, for Nsight
Compute: the case's inputs are built by the bench module that times it (imported, not copied),
the op runs 3 times as warm-up, then once more inside ``torch.cuda.nvtx.range(CASE)`` between
``torch.cuda.profiler.start()`` / ``stop()``, so that ``ncu --profile-from-start off`` captures
that launch set only (every kernel of the one op call, e.g. moe_up + moe_down).

    python bench/profile_kernels.py --list
    python bench/profile_kernels.py CASE [CASE...]          # runs, prints the kernel names
    ncu --profile-from-start off --set full -o OUT/CASE python3 bench/profile_kernels.py CASE
    bash scripts/ncu_profile.sh OUTDIR CASE...                # the above + CSV / text summaries

How a case's inputs are reused: where the bench module has a builder function (attn_fp8_decode
``_inputs``, attn_hca ``_decode``) it is called; where the inputs are built inline in the bench's
loop, the bench's own code runs with its timer replaced, and the first callable it would time
for the case (matched on the loop variables of the calling frame, e.g. ``fmt``/``T``) is taken
and the bench stopped there. So a case is exactly what the bench times, its first variant
(automatic tile, serial pipeline).

Environment read per call, as set when this script starts: ``DSV4_SPARSE_PREFILL=new`` profiles
the warp-specialised sparse_attn prefill kernel (default: the old one); ``DSV4_GEMM_TILE`` /
``DSV4_GEMM_PIPE`` force a grouped-GEMM variant. Nsight Compute flushes the L2 before each
replayed kernel (``--cache-control all``) and locks clocks to base (``--clock-control base``),
so durations in the report are cold-L2, base-clock numbers (pass ``--clock-control none`` via
NCU_ARGS to scripts/ncu_profile.sh for bench-like clocks).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys
from unittest import mock

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)                                   # the bench modules import each other
sys.path.insert(0, os.path.join(HERE, "..", "python"))


class _Found(BaseException):
    """Carries the captured callable out of a bench (BaseException: the benches catch Exception)."""

    def __init__(self, fn):
        self.fn = fn


def _capture(mod, timer: str, run, fn_name=None, take=lambda f: f, **where):
    """Run ``run()`` (bench code of ``mod``) with ``mod.<timer>`` replaced; return ``take(fn)``
    for the first ``fn`` it would time whose name is ``fn_name`` (if given) and whose caller's
    locals match ``where``. Other timed callables are not run (the fake timer returns 1 µs)."""
    def fake(fn, *args, **kwargs):
        loc = sys._getframe(1).f_locals
        if ((fn_name is None or getattr(fn, "__name__", None) == fn_name)
                and all(loc.get(k) == v for k, v in where.items())):
            raise _Found(take(fn))
        return 1.0

    log = io.StringIO()
    with mock.patch.object(mod, timer, fake), mock.patch.dict(os.environ), \
            contextlib.redirect_stdout(log):
        try:
            run()
        except _Found as f:
            return f.fn
    raise LookupError(f"{mod.__name__}.{timer} was never called for {fn_name or 'any'} "
                      f"with {where} (a GPU with the kernels is needed); bench output:\n"
                      f"{log.getvalue()}")


def _k0(fn):
    return lambda: fn(0)            # moe_routing / bench_mhc time fn(k) over rotated inputs


def _gen():
    return torch.Generator(device="cuda").manual_seed(0)


def _keyed(make, timer, fn_name=None, **where):
    """Attach what ``make`` captures (the bench's timer, the timed function's name, the loop
    variables it matches) so that a CPU test can check them against the bench's source."""
    make.capture = (timer, fn_name, where)
    return make


def _sparse_prefill(H, K, N):
    def make(m):
        with mock.patch.object(m, "PREFILL", [(H, K, N)]), mock.patch.object(m, "DECODE", []), \
                mock.patch.object(m, "_flashmla", lambda build: None):
            # fns = {"old": (setup, call), "new": ...}: the same call; the mode is the env's
            return _capture(m, "_time", lambda: m.run(quick=False),
                            take=lambda fns: fns["old"][1], H=H, K=K, N=N)
    return "bench_sparse_prefill", _keyed(make, "_time", H=H, K=K, N=N)


def _fp8_decode(H, B):
    def make(m):
        fp8 = m._inputs(B, H, _gen())[0]
        return lambda: torch.ops.dsv4.sparse_attn(*fp8)
    return "attn_fp8_decode", make


def _hca_decode(H, B, fp8, n_entries=1024):
    def make(m):
        a = m._decode(B, H, n_entries, fp8, _gen())[0]
        return lambda: torch.ops.dsv4.hca_attn(*a)
    return "attn_hca", make


def _indexer_1m(T):
    """indexer_topk decode at 1M in the runtime's layout (paged FP8 keys): csa_indexer's inputs
    (the bench's merge rows), T queries, topk 512: the zero fill, scan and select launches."""
    def make(m):
        g = _gen()
        _, pool, table = m.keys_1m(g)
        q, w, rows, nv = m.queries_1m(T, g)
        out = torch.empty(T, 512, dtype=torch.int32, device="cuda")
        return lambda: torch.ops.dsv4.indexer_topk_out(q, w, pool, rows, nv, 512, out, table)
    return "csa_indexer", make


def _gemm(module, **where):
    def make(m):
        return _capture(m, "_time_us", lambda: m.run(quick=True), "ours", **where)
    return module, _keyed(make, "_time_us", "ours", **where)


def _cases(module, timer, T, fn_name=None):
    def make(m):
        with torch.no_grad():
            return _capture(m, timer, lambda: m._cases(T), fn_name, _k0)
    return module, _keyed(make, timer, fn_name)


def _routing_gate(T):   # the first timed call of moe_routing._cases: the learned gate
    def make(m):
        return _capture(m, "_time_us", lambda: m._cases(T, with_ref=False), None, _k0)
    return "moe_routing", _keyed(make, "_time_us")


#: name -> (bench module, make(module) -> zero-argument callable that launches the op)
CASES = {
    "sparse_prefill_h64_8k": _sparse_prefill(64, 512, 8192),
    "sparse_prefill_h128_64k": _sparse_prefill(128, 1024, 65536),
    "fp8_decode_h64_b64": _fp8_decode(64, 64),
    "fp8_decode_h128_b64": _fp8_decode(128, 64),
    "hca_decode_h64_b128_fp8": _hca_decode(64, 128, True),
    "hca_decode_h128_b128_fp8": _hca_decode(128, 128, True),
    "hca_decode_h64_b128_bf16": _hca_decode(64, 128, False),
    "hca_decode_h64_b1_1m_fp8": _hca_decode(64, 1, True, 8192),
    "indexer_decode_b1_1m_fp8": _indexer_1m(1),
    "indexer_decode_b2_1m_fp8": _indexer_1m(2),
    "oproj_t1_fp8": _gemm("gemm_oproj", fmt="fp8", T=1),
    "oproj_t8192_bf16": _gemm("gemm_oproj", fmt="bf16", T=8192),
    "moe_prefill_t4096_bf16": _gemm("gemm_moe", fmt="bf16", kind="prefill", T=4096),
    "moe_prefill_t4096_fp8": _gemm("gemm_moe", fmt="fp8", kind="prefill", T=4096),
    "moe_decode_t1_fp8": _gemm("gemm_moe", fmt="fp8", kind="decode", T=1),
    "fp8_linear_m1_wqb": _gemm("gemm_linear", name="wq_b", M=1),
    "moe_gate_t4096": _routing_gate(4096),
    "mhc_pre_t4096": _cases("bench_mhc", "_graph_time_us", 4096, "pre"),
    "mhc_pre_t1": _cases("bench_mhc", "_graph_time_us", 1, "pre"),
    "mhc_pre_t8": _cases("bench_mhc", "_graph_time_us", 8, "pre"),
    "mhc_head_t4096": _cases("bench_mhc", "_graph_time_us", 4096, "head"),
}


def resolve(name: str):
    """(bench module, make) of a case; ValueError naming the accepted cases otherwise."""
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; accepted: {', '.join(CASES)}")
    module, make = CASES[name]
    return importlib.import_module(module), make


def kernel_names(fn) -> list[str]:
    """GPU activities of one more call (torch.profiler); [] under ncu / nsys (which inject
    themselves through CUDA_INJECTION64_PATH and report the names anyway)."""
    if os.environ.get("CUDA_INJECTION64_PATH"):
        return []
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    return list(dict.fromkeys(e.name for e in prof.events() if e.device_type == cuda))


def profile_case(name: str, fn, warmup: int = 3) -> None:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    with torch.cuda.nvtx.range(name):
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    try:
        names = kernel_names(fn)
    except Exception as e:  # noqa: BLE001  (names are a convenience)
        names = [f"(unavailable: {e})"]
    print(f"{name}: " + ("; ".join(names) if names else "kernel names in the ncu report"),
          flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="cases: " + ", ".join(CASES))
    ap.add_argument("cases", nargs="*", metavar="CASE")
    ap.add_argument("--list", action="store_true", help="print the case names")
    a = ap.parse_args(argv)
    if a.list:
        print("\n".join(CASES))
        return 0
    if not a.cases:
        ap.error("give at least one CASE (or --list)")
    try:
        todo = [(c, *resolve(c)) for c in a.cases]
    except ValueError as e:
        ap.error(str(e))
    if not torch.cuda.is_available():
        print("profile_kernels: no CUDA device", file=sys.stderr)
        return 1
    import dsv4.ops  # noqa: F401  (registers torch.ops.dsv4)
    from dsv4.ops import _ext

    if not _ext.HAS_C:      # the references would serve the CUDA tensors: nothing to profile
        print(f"profile_kernels: dsv4._C is not loaded from {os.path.dirname(dsv4.ops.__file__)} "
              f"({_ext._IMPORT_ERROR}): the ops would run their PyTorch references; build the "
              "extension in this checkout (pip install -e .)", file=sys.stderr)
        return 1

    torch.manual_seed(0)
    for name, mod, make in todo:
        fn = make(mod)
        profile_case(name, fn)
        del fn
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
