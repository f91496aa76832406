"""bench/profile_kernels.py on CPU: the case list, that every case reaches its bench module's
builder (the kernels themselves need the GPU), the capture of a bench's timed callable, and
the warm-up / profiled-launch order that ``ncu --profile-from-start off`` relies on."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import types

import pytest
import torch

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")
sys.path.insert(0, BENCH)
import profile_kernels as pk  # noqa: E402

WANTED = ["sparse_prefill_h64_8k", "sparse_prefill_h128_64k", "fp8_decode_h64_b64",
          "fp8_decode_h128_b64", "hca_decode_h64_b128_fp8", "hca_decode_h128_b128_fp8",
          "hca_decode_h64_b128_bf16", "hca_decode_h64_b1_1m_fp8", "indexer_decode_b1_1m_fp8",
          "indexer_decode_b2_1m_fp8", "oproj_t1_fp8", "oproj_t8192_bf16",
          "moe_prefill_t4096_bf16", "moe_prefill_t4096_fp8", "moe_decode_t1_fp8",
          "fp8_linear_m1_wqb", "moe_gate_t4096", "mhc_pre_t4096", "mhc_pre_t1", "mhc_pre_t8",
          "mhc_head_t4096"]


def test_list_prints_every_case():
    r = subprocess.run([sys.executable, os.path.join(BENCH, "profile_kernels.py"), "--list"],
                       capture_output=True, text=True, check=True)
    assert r.stdout.split() == WANTED == list(pk.CASES)


@pytest.mark.parametrize("name", WANTED)
def test_every_case_reaches_its_bench_builder(name, monkeypatch):
    """make() patches / calls attributes of the bench module (a renamed builder or timer fails
    here with AttributeError); without a GPU it stops at the first CUDA allocation."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_gpu():
        raise RuntimeError("no GPU in this test")
    monkeypatch.setattr(pk, "_gen", no_gpu)
    mod, make = pk.resolve(name)
    assert mod.__name__ == pk.CASES[name][0]
    try:
        fn = make(mod)
    except (LookupError, RuntimeError) as e:   # the bench returned [] / CUDA is not there
        assert isinstance(e, RuntimeError) or "GPU" in str(e)
    else:                                      # a bench that builds on a GPU regardless
        assert callable(fn)


def test_unknown_case_names_the_accepted_ones(capsys):
    with pytest.raises(ValueError, match="unknown case 'nope'.*mhc_head_t4096"):
        pk.resolve("nope")
    with pytest.raises(SystemExit) as e:
        pk.main(["oproj_t1_fp8", "nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown case 'nope'" in err and all(c in err for c in WANTED)


def _stand_in_bench():
    """A bench module in miniature: an inline loop, a baseline and the timed `ours`, which it
    times under `except Exception` (as gemm_oproj does) and with an env variable set."""
    m = types.ModuleType("stand_in_bench")
    m.calls = []

    def _time_us(fn, reps=20):
        m.calls.append(fn.__name__)
        return 5.0
    m._time_us = _time_us

    def run():
        for T in (1, 8):
            for fmt in ("bf16", "fp8"):
                def ours():
                    return (T, fmt)

                def base():
                    return None
                m._time_us(base)
                os.environ["DSV4_GEMM_PIPE"] = "overlap"
                try:
                    m._time_us(ours)
                except Exception:  # noqa: BLE001
                    pass
                print("row", T, fmt)
    m.run = run
    return m


def test_capture_takes_the_matching_timed_callable(monkeypatch, capsys):
    m = _stand_in_bench()
    monkeypatch.delenv("DSV4_GEMM_PIPE", raising=False)
    fn = pk._capture(m, "_time_us", m.run, "ours", fmt="fp8", T=8)
    assert fn() == (8, "fp8")
    assert "DSV4_GEMM_PIPE" not in os.environ            # the bench's env changes undone
    assert capsys.readouterr().out == ""                 # its rows silenced
    assert m._time_us.__name__ == "_time_us" and m.calls == []   # timer restored, none ran
    wrapped = pk._capture(m, "_time_us", m.run, None, lambda f: lambda: ("k", f()))
    assert wrapped() == ("k", None)                      # the first timed call: a baseline
    with pytest.raises(LookupError, match="never called for ours with {'T': 3}"):
        pk._capture(m, "_time_us", m.run, "ours", T=3)


def test_profile_case_warms_up_then_brackets_one_call(monkeypatch, capsys):
    log = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: log.append("sync"))
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: log.append("start"))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: log.append("stop"))

    @contextlib.contextmanager
    def rng(name):
        log.append(f"range {name}")
        yield
        log.append("end")
    monkeypatch.setattr(torch.cuda.nvtx, "range", rng)
    monkeypatch.setenv("CUDA_INJECTION64_PATH", "/ncu/injection.so")   # as under ncu
    pk.profile_case("case_x", lambda: log.append("op"))
    assert log == ["op"] * 3 + ["sync", "start", "range case_x", "op", "end", "sync", "stop"]
    assert capsys.readouterr().out == "case_x: kernel names in the ncu report\n"


def test_capture_keys_exist_in_the_bench_sources():
    """What a case captures must exist in its bench module: the timer (a module function), the
    timed function's name (a def) and each matched variable (a loop target or an assigned
    name) with a value the bench can take (checked on the literals of its loops)."""
    import ast
    import importlib
    checked = 0
    for name, (module, make) in pk.CASES.items():
        if not hasattr(make, "capture"):
            continue                               # a builder function is called directly
        timer, fn_name, where = make.capture
        mod = importlib.import_module(module)
        tree = ast.parse(open(mod.__file__).read())
        defs = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        targets = {t.id for n in ast.walk(tree) if isinstance(n, (ast.For, ast.comprehension))
                   for t in ast.walk(n.target) if isinstance(t, ast.Name)}
        assert callable(getattr(mod, timer, None)), (name, timer)   # patched on the module
        assert fn_name is None or fn_name in defs, (name, fn_name)
        assert set(where) <= targets, (name, set(where) - targets)
        checked += 1
    assert checked >= 10
