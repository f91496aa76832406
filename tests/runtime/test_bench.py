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
    args = argparse.Namespace(chunk=64, head="bf16", no_graphs=True, seed=0, steps=2)
    rows = [bench.bench_prefill(m, args, 2, 40), bench.bench_decode(m, args, 2, 100)]
    rows += bench.bench_1m(m, args, context=150)
    assert [r["kind"] for r in rows] == ["prefill", "decode", "prefill-1m", "decode-1m"]
    assert all(r["tok_s"] > 0 for r in rows)
    assert rows[1]["floor_ms"] > 0 and not rows[1]["graphs"]
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
