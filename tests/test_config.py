"""ModelConfig presets and official config.json parsing (architecture.md §1)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dsv4.config import ConfigError, ModelConfig


def test_flash_and_pro_presets():
    f, p = ModelConfig.flash(), ModelConfig.pro()
    assert (f.dim, f.n_layers, f.n_heads, f.index_topk, f.o_groups, f.route_scale) == (4096, 43, 64, 512, 8, 1.5)
    assert (p.dim, p.n_layers, p.n_heads, p.index_topk, p.o_groups, p.route_scale) == (7168, 61, 128, 1024, 16, 2.5)
    assert [f.layer_kind(i) for i in range(4)] == ["swa", "swa", "csa", "hca"]
    assert [p.layer_kind(i) for i in range(4)] == ["hca", "hca", "csa", "hca"]
    assert f.layer_kind(43) == "swa" and p.layer_kind(61) == "swa"   # MTP layers
    assert sum(f.layer_kind(i) == "csa" for i in range(43)) == 21
    assert sum(p.layer_kind(i) == "csa" for i in range(61)) == 30
    assert f.compress_rope_theta == 160000 and f.original_seq_len == 65536 and f.rope_factor == 16


def test_tiny_has_every_layer_type():
    t = ModelConfig.tiny()
    kinds = {t.layer_kind(i) for i in range(t.n_layers)}
    assert kinds == {"swa", "csa", "hca"} and t.vocab_size == 129280
    assert 0 < t.n_hash_layers < t.n_layers and t.n_mtp_layers >= 1 and t.quant_sim


HF_FLASH = {
    "vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64,
    "num_key_value_heads": 1, "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024,
    "o_groups": 8, "o_lora_rank": 1024, "sliding_window": 128,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4] + [0], "compress_rope_theta": 160000,
    "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 16,
                                          "original_max_position_embeddings": 65536,
                                          "beta_fast": 32, "beta_slow": 1},
    "max_position_embeddings": 1048576, "index_n_heads": 64, "index_head_dim": 128,
    "index_topk": 512, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 6,
    "moe_intermediate_size": 2048, "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc",
    "norm_topk_prob": True, "routed_scaling_factor": 1.5, "num_hash_layers": 3,
    "swiglu_limit": 10.0, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6, "num_nextn_predict_layers": 1,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                            "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
}


def test_hf_config_equals_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF_FLASH))
    assert ModelConfig.from_json(tmp_path) == ModelConfig.flash()


def test_inference_names():
    d = {k: getattr(ModelConfig.flash(), k) for k in (
        "vocab_size", "dim", "moe_inter_dim", "n_layers", "n_hash_layers", "n_mtp_layers",
        "n_heads", "n_routed_experts", "n_shared_experts", "n_activated_experts", "score_func",
        "route_scale", "swiglu_limit", "q_lora_rank", "head_dim", "rope_head_dim", "norm_eps",
        "o_groups", "o_lora_rank", "window_size", "compress_ratios", "compress_rope_theta",
        "rope_theta", "original_seq_len", "rope_factor", "beta_fast", "beta_slow",
        "index_n_heads", "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters", "hc_eps")}
    d["compress_ratios"] = list(d["compress_ratios"])
    d.update(dtype="fp8", scale_fmt="ue8m0", expert_dtype="fp4")
    assert ModelConfig.from_dict(d) == ModelConfig.flash()


@pytest.mark.parametrize("key", ["compress_rope_theta", "routed_scaling_factor", "swiglu_limit",
                                 "num_hash_layers", "rope_scaling"])
def test_missing_trap_keys_are_errors(key):
    d = dict(HF_FLASH)
    del d[key]
    with pytest.raises(ConfigError, match="missing required keys"):
        ModelConfig.from_dict(d)


def test_wrong_compress_ratio_count_is_rejected():
    d = dict(HF_FLASH, compress_ratios=[0, 0] + [4, 128] * 21 + [0, 0])   # a later revision's 46
    with pytest.raises(ConfigError, match="April-2026"):
        ModelConfig.from_dict(d)


def test_quant_sim_rejects_unfit_dims():
    with pytest.raises(ConfigError, match="multiple of 64"):
        ModelConfig.tiny(head_dim=64, rope_head_dim=16)
    with pytest.raises(ConfigError, match="power of two"):
        ModelConfig.tiny(index_head_dim=96)
    ModelConfig.tiny(head_dim=64, rope_head_dim=16, index_head_dim=96, quant_sim=False)


def test_json_round_trip(tmp_path):
    c = ModelConfig.tiny(window_size=32)
    c.to_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path / "config.json") == c


@pytest.mark.parametrize("change,match", [
    ({"rope_scaling": None}, "YaRN"),
    ({"num_key_value_heads": 8}, "num_key_value_heads"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"norm_topk_prob": False}, "norm_topk_prob"),
    ({"topk_method": "greedy"}, "topk_method"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"n_group": 8, "topk_group": 4}, "group-limited"),
    ({"n_shared_experts": 2}, "n_shared_experts"),
    ({"hc_sinkhorn_iters": 0}, "hc_sinkhorn_iters"),
    ({"hidden_size": "4096x"}, r"must be of type int \(an integer JSON number, an integral "
                               r"float or a string holding an integer\), got '4096x'"),
    ({"rms_norm_eps": "tiny"}, r"must be of type float \(a JSON number or a string holding "
                               r"one\), got 'tiny'"),
    ({"num_attention_heads": 0}, "n_heads"),
])
def test_unsupported_values_are_rejected(change, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(dict(HF_FLASH, **change))


@pytest.mark.parametrize("quant, match", [
    ({"scale_fmt": None}, r"scale_fmt"),
    ({"scale_fmt": "fp32"}, r"scale_fmt='fp32' is not supported \(V4 uses 'ue8m0'"),
    ({"fmt": "e5m2"}, r"quantization_config.fmt='e5m2' is not supported \(V4 uses 'e4m3'"),
    ({"weight_block_size": [64, 64]},
     r"quantization_config.weight_block_size=\[64, 64\] is not supported \(V4 uses \[128, 128\]"),
])
def test_quantization_formats_dsv4_does_not_implement_are_rejected(quant, match):
    """dsv4 implements the release's FP8 format only (e4m3 values, 128x128 weight blocks,
    power-of-two ue8m0 activation scales): another value was ignored, and the model computed
    the release's format for a file that says otherwise."""
    q = dict(HF_FLASH["quantization_config"], **quant)
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(dict(HF_FLASH, quantization_config=q))
    with pytest.raises(ConfigError, match="scale_fmt='fp32' is not supported"):
        dataclasses.replace(ModelConfig.tiny(), scale_fmt="fp32")


def test_numeric_strings_are_coerced():
    assert ModelConfig.from_dict(dict(HF_FLASH, hidden_size="4096")).dim == 4096


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="JSON"):
        ModelConfig.from_json(tmp_path)
