"""dsv4.model_info (parameter counts, layer schedule, KV-cache bytes) and `dsv4 info` (architecture.md
§1.2, §1.4, §11; kernels.md §3)."""

from __future__ import annotations

import re

import pytest
import torch

from dsv4 import cli
from dsv4.config import ModelConfig
from dsv4.model_info import (ONE_M, gqa_baseline_bytes, indexer_key_bytes, kv_bytes_per_token,
                       kv_cache_bytes, kv_entry_bytes, layer_schedule, meta_model, param_counts)
from dsv4.model import Model

from _testdata import GOLDEN_FP8, needs_golden_fp8  # noqa: E402


@pytest.fixture(scope="module")
def counts():
    return {name: param_counts(getattr(ModelConfig, name)()) for name in ("flash", "pro")}


# ------------------------------------------------------------------------------ parameters


def test_flash_param_counts_match_spec(counts):
    """§1.4: Flash 284.33B total, ~13.8B active, ~12.7B active without embed/head."""
    c, f = counts["flash"], ModelConfig.flash()
    assert round(c.total / 1e9, 2) == 284.33
    assert abs(c.active / 1e9 - 13.8) < 0.05
    assert abs(c.active_without_embed / 1e9 - 12.7) < 0.05
    assert c.embed_head == 2 * 129280 * 4096
    assert c.total_without_embed == c.total - c.embed_head
    # Routed experts: 256 x 3 x 2048 x 4096 = 6.44B per layer (§1.4), 43 layers.
    assert c.routed_experts == 43 * 256 * 3 * 2048 * 4096
    # Active = total minus the (256 - 6) idle experts of every layer.
    assert c.active == c.total - 43 * (256 - 6) * 3 * f.moe_inter_dim * f.dim
    assert 0 < c.mtp_active < c.mtp < c.total / 40


def test_pro_param_counts_match_spec(counts):
    """§1.4: Pro 1573B total (about 1.6T), ~49.8B active."""
    c = counts["pro"]
    assert round(c.total / 1e9) == 1573
    assert abs(c.active / 1e9 - 49.8) < 0.05
    assert c.routed_experts == 61 * 384 * 3 * 3072 * 7168


def test_param_counts_of_a_real_model_equal_meta_counts():
    cfg = ModelConfig.tiny()
    torch.manual_seed(0)
    real = Model(cfg)
    by_meta, by_real = param_counts(cfg), param_counts(cfg, model=real)
    assert by_meta == by_real
    main = sum(p.numel() for n, p in real.named_parameters() if not n.startswith("mtp."))
    mtp = sum(p.numel() for n, p in real.named_parameters() if n.startswith("mtp."))
    assert by_real.total == main and by_real.mtp == mtp
    per_expert = 3 * cfg.dim * cfg.moe_inter_dim
    idle = cfg.n_routed_experts - cfg.n_activated_experts
    assert by_real.active == main - cfg.n_layers * idle * per_expert
    assert by_real.mtp_active == mtp - cfg.n_mtp_layers * idle * per_expert


def test_param_counts_follow_the_routing_config():
    a = param_counts(ModelConfig.tiny())
    b = param_counts(ModelConfig.tiny(n_activated_experts=3))
    cfg = ModelConfig.tiny()
    assert b.total == a.total
    assert b.active - a.active == cfg.n_layers * 3 * cfg.dim * cfg.moe_inter_dim


def test_meta_model_allocates_nothing():
    m = meta_model(ModelConfig.tiny())
    assert all(p.is_meta for p in m.parameters())
    # The init patch is undone: a real tensor is still initialised.
    w = torch.zeros(64, 64)
    torch.nn.init.normal_(w)
    assert w.std() > 0.5


# ------------------------------------------------------------------------------ schedule


def test_layer_schedule_matches_spec():
    f = layer_schedule(ModelConfig.flash())
    assert f["swa"] == [0, 1]
    assert f["csa"] == list(range(2, 43, 2)) and len(f["csa"]) == 21
    assert f["hca"] == list(range(3, 42, 2)) and len(f["hca"]) == 20
    assert f["hash"] == [0, 1, 2] and f["mtp"] == [43]
    p = layer_schedule(ModelConfig.pro())
    assert p["swa"] == [] and p["csa"] == list(range(2, 61, 2))
    assert p["hca"] == [0, 1] + list(range(3, 60, 2)) and len(p["hca"]) == 31
    assert p["hash"] == [0, 1, 2] and p["mtp"] == [61]


# ------------------------------------------------------------------------------ KV cache


def test_entry_and_key_bytes():
    """kernels.md §3: 584 B attention entries, 132 B FP8 / 68 B FP4 indexer keys."""
    f = ModelConfig.flash()
    assert kv_entry_bytes(f) == 448 + 128 + 7 + 1 == 584
    assert indexer_key_bytes(f, "fp8") == 132 and indexer_key_bytes(f, "fp4") == 68
    assert kv_entry_bytes(f, "bf16") == 1024 and indexer_key_bytes(f, "bf16") == 256


@pytest.mark.parametrize("name, fp8, fp4, bf16", [("flash", 3850, 3514, 6880),
                                                   ("pro", 5511, 5031, 9848)])
def test_bytes_per_token_match_spec_table(name, fp8, fp4, bf16):
    """§11.3 table (B/token)."""
    c = getattr(ModelConfig, name)()
    assert int(kv_bytes_per_token(c, "fp8")) == fp8
    assert int(kv_bytes_per_token(c, "fp4")) == fp4
    assert kv_bytes_per_token(c, "bf16", "bf16") == bf16


def test_totals_at_1m_and_window():
    f, p = ModelConfig.flash(), ModelConfig.pro()
    win_f = 43 * 128 * 584                      # §11.3: ~3.2 MB per sequence
    for L in (128, 4096, 131072, ONE_M):        # multiples of every ratio: exact per-token rate
        assert kv_cache_bytes(f, L) == win_f + kv_bytes_per_token(f) * L
    assert 4.0e9 < kv_cache_bytes(f, ONE_M) < 4.1e9          # "about 4.0 GB at 1M"
    assert 5.75e9 < kv_cache_bytes(p, ONE_M) < 5.85e9        # "about 5.8 GB at 1M"
    # kernels.md §3 capacity: 21 x 153 MB main CSA KV + 21 x 34.6 MB keys + 20 x 4.8 MB HCA.
    csa_main = 21 * (ONE_M // 4) * 584
    assert abs(csa_main / 21 / 1e6 - 153) < 0.5


def test_short_contexts():
    f = ModelConfig.flash()
    assert kv_cache_bytes(f, 0) == 0
    assert kv_cache_bytes(f, 1) == 43 * 584
    assert kv_cache_bytes(f, 3) == 43 * 3 * 584
    assert kv_cache_bytes(f, 4) == 43 * 4 * 584 + 21 * (584 + 132)
    assert kv_cache_bytes(f, 4, "fp4") == 43 * 4 * 584 + 21 * (584 + 68)
    # Past the window the SWA part stops growing; HCA adds one entry per 128 tokens.
    assert kv_cache_bytes(f, 256) - kv_cache_bytes(f, 252) == 21 * (584 + 132) + 20 * 584


def test_gqa_baseline_and_ratio():
    f, p = ModelConfig.flash(), ModelConfig.pro()
    assert gqa_baseline_bytes(43, 1) == 43 * 2 * 8 * 128 * 2 == 176128
    assert gqa_baseline_bytes(f, ONE_M) == 176128 * ONE_M
    for c in (f, p):
        base = gqa_baseline_bytes(c, ONE_M)
        r8, r4 = kv_cache_bytes(c, ONE_M, "fp8") / base, kv_cache_bytes(c, ONE_M, "fp4") / base
        assert 0.015 < r4 < r8 < 0.025               # "near 2 %" of BF16 GQA-8 at 1M
    assert gqa_baseline_bytes(4, 10, n_kv_heads=2, head_dim=64, bytes_per_value=1) == 4 * 10 * 2 * 2 * 64


@pytest.mark.parametrize("call, match", [
    (lambda c: kv_cache_bytes(c, -1), "context"),
    (lambda c: kv_cache_bytes(c, 1.5), "context"),
    (lambda c: kv_cache_bytes(c, 10, indexer="int4"), "indexer"),
    (lambda c: kv_cache_bytes(c, 10, kv_dtype="fp16"), "kv_dtype"),
    (lambda c: kv_entry_bytes(c, "fp4"), "kv_dtype"),
    (lambda c: indexer_key_bytes(c, "e5m2"), "indexer"),
    (lambda c: gqa_baseline_bytes(c, -5), "context"),
    (lambda c: gqa_baseline_bytes(0, 5), "n_layers"),
    (lambda c: gqa_baseline_bytes(c, 5, n_kv_heads=0), "n_kv_heads"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(ModelConfig.flash())


# ------------------------------------------------------------------------------ CLI


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_cli_info_flash(capsys):
    assert cli.main(["info", "--model", "flash"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out                          # kernel section kept
    assert "model config (flash):" in out
    assert re.search(r"total:\s+284\.33B\s+without embed/head 283\.27B", out), out
    assert re.search(r"active per token:\s+13\.80B\s+without embed/head 12\.74B", out), out
    assert re.search(r"SWA \(window only\):\s+0,1 \(2\)", out)
    assert re.search(r"CSA \(ratio 4 \+ indexer\):\s+2,4,\.\.\.,42 \(21\)", out)
    assert re.search(r"HCA \(ratio 128\):\s+3,5,\.\.\.,41 \(20\)", out)
    assert re.search(r"hash-routed MoE:\s+0,1,2 \(3\)", out)
    assert re.search(r"FP8 KV \+ FP8 indexer \(132 B\)\s+3,850\.2\s+4\.04 GB\s+2\.19%", out), out
    assert re.search(r"FP8 KV \+ FP4 indexer \(68 B\)\s+3,514\.2\s+3\.69 GB\s+2\.00%", out), out
    assert re.search(r"BF16 GQA-8 .*176,128\.0\s+184\.68 GB\s+100\.00%", out), out


@needs_golden_fp8
def test_cli_info_directory_and_context(capsys):
    assert cli.main(["info", GOLDEN_FP8, "--context", "4096"]) == 0
    out = capsys.readouterr().out
    assert f"model config ({GOLDEN_FP8}):" in out and "at 4,096 tokens" in out
    assert re.search(r"HCA \(ratio 8\):\s+2,4 \(2\)", out)
    # 5 layers x 16 window x 200 B + CSA (1024 entries x (200 + 132)) x 2 + HCA 512 x 200 x 2
    cfg = ModelConfig.from_json(GOLDEN_FP8)
    assert kv_cache_bytes(cfg, 4096) == 5 * 16 * 200 + 2 * 1024 * 332 + 2 * 512 * 200


@needs_golden_fp8
def test_cli_info_without_model_is_unchanged(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out and "parameters" not in out


@pytest.mark.parametrize("argv, message", [
    (["info", "/nonexistent/dir"], "argument DIR: expected tiny, flash, pro or an existing"),
    (["info", "--model", "huge"], "argument --model: expected tiny, flash, pro"),
    (["info", GOLDEN_FP8, "--model", "tiny"], "either as DIR or as --model"),
    (["info", "--model", "tiny", "--context", "0"], "expected a positive token count, got '0'"),
    (["info", "--model", "tiny", "--context", "1.5M"],
     "expected a token count like 4096, 64K or 1M, got '1.5M'"),
])
def test_cli_info_errors(capsys, argv, message):
    assert message in _usage_error(capsys, argv)


def test_cli_info_bad_config_dir(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert cli.main(["info", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "dsv4 info: error: cannot load the config" in err and "Traceback" not in err
