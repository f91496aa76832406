"""dsv4 bench on CPU: the floors against hand counts, the measurement functions on the tiny
model (the GPU numbers come from the H200 run), the CLI arguments and the plot."""

from __future__ import annotations

import argparse

import pytest
import torch

import dsv4
from dsv4 import cli
from dsv4.runtime import bench
from dsv4.runtime.floors import decode_floor, kv_read_bytes, prefill_floor, weight_bytes


def _meta_model(cfg):
    with torch.device("meta"):
        m = dsv4.Model(cfg)
    return m.to(torch.bfloat16)


def test_floors_of_the_issue_case_by_hand():
    """2 layers at V4-Flash width (CSA + HCA), 64 experts, bf16, bf16 head: ~0.54 ms decode at
    batch 1 (issue 8), ~1.9 ms at 64, ~600K tok/s prefill."""
    cfg = bench.build_config("flash", 2, 64)
    assert cfg.compress_ratios == (4, 128) and cfg.n_routed_experts == 64
    m = _meta_model(cfg)
    d, q, H, hd, G, o = cfg.dim, cfg.q_lora_rank, cfg.n_heads, cfg.head_dim, cfg.o_groups, \
        cfg.o_lora_rank
    attn = d * q + q * H * hd + d * hd + (H * hd // G) * G * o + G * o * d
    comp = {4: 2 * (2 * hd) * d + 2 * (2 * cfg.index_head_dim) * d
            + q * cfg.index_n_heads * cfg.index_head_dim + d * cfg.index_n_heads,
            128: 2 * hd * d}
    expert = 3 * d * cfg.moe_inter_dim
    gate = cfg.n_routed_experts * d
    active = sum(attn + comp[r] + gate + (cfg.n_activated_experts + 1) * expert
                 for r in cfg.compress_ratios)
    w = weight_bytes(m)
    # + norms, attention sinks, gate biases, mHC and compressor ape (a few MB at most)
    assert active <= w.active_params <= active * 1.01
    assert w.expert == [2 * expert] * 2
    f1 = decode_floor(m, 1, 4096, head_bytes_per_param=2)
    assert 0.52e-3 < f1["seconds"] < 0.56e-3
    f64 = decode_floor(m, 64, 4096, head_bytes_per_param=2)
    assert 1.85e-3 < f64["seconds"] < 2.0e-3
    assert f64["weight_bytes"] > 2 * 63 * 2 * expert      # ~all 64 experts of each layer
    p = prefill_floor(m, 1, 2048)
    assert 5.5e5 < 2048 / p["seconds"] < 6.5e5


def test_kv_read_bytes_by_hand():
    cfg = dsv4.ModelConfig.tiny(compress_ratios=(0, 4, 16, 4, 0))   # W 16, topk 8
    # context 100: every layer 16 window keys of 128; CSA: min(8, 25) entries + 25 keys of
    # 64; HCA: 6 entries
    want = 4 * 16 * 128 + 2 * (8 * 128 + 25 * 64) + 6 * 128
    assert kv_read_bytes(cfg, 100, 2) == 2 * want


def test_cli_registers_bench_and_parses_sizes():
    p = cli.build_parser()
    a = p.parse_args(["bench", "--context", "4096,64K,1M", "--prefill", "1x2K,64x512",
                      "--batch", "1,256"])
    assert a.context == [4096, 65536, 1 << 20] and a.prefill == [(1, 2048), (64, 512)]
    assert a.batch == [1, 256] and a.func is bench._cmd_bench
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "--batch", "0"])


def test_measurements_run_on_the_tiny_model(tmp_path):
    torch.manual_seed(0)
    cfg = bench.build_config("tiny", 2, 0)
    assert cfg.compress_ratios == (4, 16)
    m = bench.build_model(cfg, "bf16", "cpu")
    args = argparse.Namespace(chunk=64, head="bf16", no_graphs=True, seed=0, steps=2, repeats=3)
    rows = [bench.bench_prefill(m, args, 2, 40), bench.bench_decode(m, args, 2, 100)]
    rows += bench.bench_1m(m, args, context=150)
    assert [r["kind"] for r in rows] == ["prefill", "decode", "prefill-1m", "decode-1m"]
    assert all(r["tok_s"] > 0 for r in rows)
    assert rows[1]["floor_ms"] > 0 and not rows[1]["graphs"]
    # prefill: the median of --repeats runs
    runs = rows[0]["seconds_runs"]
    assert len(runs) == 3 and rows[0]["seconds"] == sorted(runs)[1]
    # measured cache bytes per token: blocks of the sequence + its slot, over 150 tokens
    assert rows[3]["kv_bytes_per_token"] > rows[3]["info_kv_bytes_per_token_bf16"]
    out = tmp_path / "p.png"
    bench.plot([dict(r, impl="dsv4") for r in rows[:2]], str(out), "tiny")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_fp8_native_weights():
    torch.manual_seed(0)
    cfg = bench.build_config("tiny", 2, 0)
    m = bench.build_model(cfg, "fp8", "cpu")
    assert m.layers[0].attn.wq_a.weight_format == "fp8"
    assert m.layers[0].ffn.experts[0].w1.weight_format == "fp8"     # tiny: expert_dtype None
    assert weight_bytes(m).dense < weight_bytes(bench.build_model(cfg, "bf16", "cpu")).dense


def test_kv_read_bytes_with_fp8_entries_by_hand():
    """--kv-cache fp8: every window key and compressed entry counts 584 bytes (MODEL1),
    indexer keys their own size."""
    cfg = dsv4.ModelConfig.tiny(head_dim=512, compress_ratios=(0, 4, 16, 4, 0))
    want = 4 * 16 * 584 + 2 * (8 * 584 + 25 * 68) + 6 * 584
    assert kv_read_bytes(cfg, 100, 2, key_bytes=68, entry_bytes=584) == want
    m = _meta_model(cfg)
    bf16 = decode_floor(m, 4, 100, 2)
    fp8 = decode_floor(m, 4, 100, 2, key_bytes=68, entry_bytes=584)
    assert fp8["kv_bytes"] == 4 * want and bf16["kv_bytes"] == 4 * kv_read_bytes(cfg, 100, 2)
    assert bf16["weight_bytes"] == fp8["weight_bytes"]


def test_1m_mode_bytes_per_token_with_fp8_caches():
    """bench --mode 1m with --kv-cache fp8 --indexer-cache fp8 on a head_dim-512 tiny model: the
    pool's bytes per token (its blocks; MODEL1 blocks padded to 576 bytes) match dsv4 info's
    arithmetic for the release's FP8 layout within the padding (< 1%), and the floor counts
    584-byte entries."""
    import dataclasses

    from dsv4.model_info import kv_bytes_per_token
    torch.manual_seed(0)
    cfg = dataclasses.replace(bench.build_config("tiny", 2, 0), head_dim=512)
    m = bench.build_model(cfg, "bf16", "cpu")
    args = argparse.Namespace(chunk=64, head="bf16", no_graphs=True, seed=0, steps=2, repeats=1,
                              kv_cache="fp8", indexer_cache="fp8")
    pre, dec = bench.bench_1m(m, args, context=150)
    info = kv_bytes_per_token(cfg)                  # what `dsv4 info` prints (FP8 layouts)
    # CSA: 256 entries x 584 -> 149,760 padded + 256 keys x 68; HCA: 64 x 584 -> 37,440
    assert dec["kv_block_bytes_per_token"] == (149760 + 256 * 68 + 37440) / 1024
    assert dec["info_kv_bytes_per_token"] == info == (584 + 68) / 4 + 584 / 16
    assert info <= dec["kv_block_bytes_per_token"] < 1.01 * info
    assert dec["kv_bytes_per_token"] > dec["kv_block_bytes_per_token"]   # + window and state
    assert dec["info_kv_bytes_per_token_bf16"] == (1024 + 68) / 4 + 1024 / 16
    fl = decode_floor(m, 1, 150, 2, 68, 584)
    assert dec["floor_ms"] == pytest.approx(1e3 * fl["seconds"])
    assert bench.bench_decode(m, args, 2, 40)["tok_s"] > 0
    from dsv4.ops import kv_cache
    e = bench._engine(m, args, 2, 64)
    bench._fill_pool(e, 0)                          # random FP8 bytes: finite, not all zero
    for lc in e.cache.layers:
        for t, d in [(lc.window, 512)] + [(st.entries, st.head_dim)
                                          for st in (lc.compressor, lc.indexer) if st]:
            v = kv_cache.read_pool(t, d, torch.float32)
            assert t.dtype == torch.uint8 and torch.isfinite(v).all() and v.abs().max() > 0


def test_cli_parses_kv_cache():
    p = cli.build_parser()
    assert p.parse_args(["bench", "--kv-cache", "fp8"]).kv_cache == "fp8"
    assert p.parse_args(["bench"]).kv_cache == "bf16"
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "--kv-cache", "fp4"])


def test_attention_flops_by_hand():
    """floors.attention_flops (the prefill / decode floors and bench_ep) against a per-query
    count: window keys + CSA top-k picks or HCA entries, and the indexer's scored entries."""
    from dsv4.runtime.floors import attention_flops
    cfg = dsv4.ModelConfig.tiny(compress_ratios=(0, 4, 16, 4, 0))

    def one(t):
        f = 0
        for r in cfg.compress_ratios[:cfg.n_layers]:      # main layers (the MTP one excluded)
            keys, m = min(t + 1, cfg.window_size), ((t + 1) // r if r else 0)
            if r == 4:
                keys += min(m, cfg.index_topk)
                f += 2 * cfg.index_n_heads * cfg.index_head_dim * m
            elif r:
                keys += m
            f += 4 * cfg.n_heads * cfg.head_dim * keys
        return f

    for start, n in ((0, 1), (0, 300), (1000, 77), (5 << 16, 3)):
        assert attention_flops(cfg, start, n) == sum(one(t) for t in range(start, start + n))


def test_decode_row_is_the_median_step(monkeypatch):
    """One slow step moves the mean, not the row (ms_step); the JSON keeps mean and max."""
    torch.manual_seed(0)
    m = bench.build_model(bench.build_config("tiny", 2, 0), "bf16", "cpu")
    args = argparse.Namespace(chunk=64, head="bf16", no_graphs=True, seed=0, steps=3, repeats=1)
    monkeypatch.setattr(bench, "_loop_step_times", lambda step, n: [0.002, 0.020, 0.001][:n])
    r = bench.bench_decode(m, args, 2, 40)
    assert (r["ms_step"], r["ms_step_max"]) == (2.0, 20.0)
    assert r["ms_step_mean"] == pytest.approx(23.0 / 3) and r["tok_s"] == pytest.approx(1000.0)


def test_profile_decode_script_runs_on_cpu(capsys):
    """bench/profile_decode.py (the decode-step breakdown of bench/README.md) end to end on the
    reference path: step times per batch, then the profiler table."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "profile_decode.py")
    spec = importlib.util.spec_from_file_location("profile_decode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--device", "cpu", "--model", "tiny", "--layers", "2", "--experts", "0",
                     "--batch", "1", "--context", "40", "--steps", "1", "--profile-batch",
                     "1"]) == 0
    out = capsys.readouterr().out
    assert "b=1 @ 40 graphs=False: median" in out and "=== b=1 graphs=False: 3 steps by CPU" in out


def test_profile_host_step_script_runs_on_cpu(capsys, tmp_path, monkeypatch):
    """bench/profile_host_step.py (the host-side table of bench/README.md) on the CPU: every
    host operation of a steady decode step timed, no upload at steady state, and only the
    copy of the sampled ids (and views of it) outside the graph body."""
    import importlib.util
    import json
    import os
    monkeypatch.setenv("OUT", str(tmp_path))
    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "profile_host_step.py")
    spec = importlib.util.spec_from_file_location("profile_host_step", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--batch", "2", "--steps", "6", "--vocab", "64"]) == 0
    out = capsys.readouterr().out
    assert "batch 2: host" in out and "0.00 uploads/step" in out
    (row,) = json.loads((tmp_path / "profile_host_step.json").read_text())
    assert set(row["phases_us"]) >= {label for _, label in mod.PHASES}
    assert row["ops_per_step"].get("aten::copy_", 0) <= 2
    assert "aten::index_select" not in row["ops_per_step"]


def test_kernel_state_says_what_the_rows_time(monkeypatch):
    from dsv4.ops import _ext, backend
    monkeypatch.setattr(_ext, "_COMPILED_CUDA_OPS", [])
    monkeypatch.setattr(_ext, "_IMPORT_ERROR", "ImportError: truncated _C.so")
    k = bench.kernel_state()
    assert (k["kernels_compiled"], k["kernels_called"]) == (0, 0)
    assert "truncated _C.so" in k["kernel_note"] and "reference" in k["kernel_note"]
    monkeypatch.setattr(_ext, "_COMPILED_CUDA_OPS", ["moe_gate", "moe_gate_out", "mhc_pre"])
    monkeypatch.setattr(backend, "_allow_unverified", False)
    monkeypatch.setattr(backend, "HARDWARE_VERIFIED", {"moe_gate": "test"})
    monkeypatch.setattr(backend, "built_source_mismatch", lambda ops=None: None)
    k = bench.kernel_state()
    assert (k["kernels_compiled"], k["kernels_called"]) == (2, 1)
    assert "1 of 2" in k["kernel_note"] and "DSV4_UNVERIFIED_KERNELS=1" in k["kernel_note"]


def test_1m_mode_reports_where_the_memory_peaks(monkeypatch):
    """The 1M rows separate the resident bytes, the first prefill chunk's peak, the whole
    prefill's and the decode's (peak counters reset before the prefill and before decode)."""
    cfg = bench.build_config("tiny", 2, 0)
    m = bench.build_model(cfg, "bf16", "cpu")
    args = argparse.Namespace(chunk=64, head="bf16", no_graphs=True, seed=0, steps=2, repeats=1,
                              kv_cache="bf16", indexer_cache="bf16")
    log = []
    monkeypatch.setattr(bench, "_allocated_gb", lambda: 1.0)
    monkeypatch.setattr(bench, "_reset_peak", lambda: log.append("reset"))
    monkeypatch.setattr(bench, "_peak_gb", lambda: float(len(log)))   # grows as the run goes
    from dsv4.runtime.engine import Engine
    real_step = Engine.step
    monkeypatch.setattr(Engine, "step",
                        lambda self, *a, **k: (log.append("step"), real_step(self, *a, **k))[1])
    pre, dec = bench.bench_1m(m, args, context=150)
    assert pre["resident_gb"] == 1.0
    assert pre["first_chunk_peak_gb"] == 2.0            # read after "reset", "step"
    n_pre = -(-150 // 64)                               # prefill steps: chunks of 64
    assert log[:1 + n_pre + 2] == ["reset"] + ["step"] * (n_pre + 1) + ["reset"]
    assert pre["peak_gb"] == 1 + n_pre                  # read when the prefill ended
    assert dec["peak_gb"] == len(log)                   # after the decode reset
