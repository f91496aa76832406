"""Config values are checked when loaded: every error names the field, the value and what is
accepted (issue 13 item 3), and every required key is required on its own (item 7)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re

import pytest

from dsv4 import Model
from dsv4.config import GATE_MAX_EXPERTS, GATE_MAX_TOPK, ConfigError, ModelConfig
from dsv4.ops import moe

from test_config import HF_FLASH  # noqa: E402  (tests/ is on sys.path)

# The architectural keys of architecture.md §1.3 (ModelArgs names), written out here rather
# than imported so that a key dropped from dsv4.config._REQUIRED fails this test.
REQUIRED = (
    "vocab_size", "dim", "moe_inter_dim", "n_layers", "n_hash_layers", "n_heads",
    "n_routed_experts", "n_shared_experts", "n_activated_experts", "score_func", "route_scale",
    "swiglu_limit", "q_lora_rank", "head_dim", "rope_head_dim", "norm_eps", "o_groups",
    "o_lora_rank", "window_size", "compress_ratios", "compress_rope_theta", "rope_theta",
    "original_seq_len", "rope_factor", "beta_fast", "beta_slow", "index_n_heads",
    "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters", "hc_eps",
)
# Where each lives in an HF config.json (architecture.md §1.3 mapping).
HF_KEY = {
    "dim": "hidden_size", "moe_inter_dim": "moe_intermediate_size",
    "n_layers": "num_hidden_layers", "n_hash_layers": "num_hash_layers",
    "n_heads": "num_attention_heads", "n_activated_experts": "num_experts_per_tok",
    "score_func": "scoring_func", "route_scale": "routed_scaling_factor",
    "rope_head_dim": "qk_rope_head_dim", "norm_eps": "rms_norm_eps",
    "window_size": "sliding_window",
    "original_seq_len": ("rope_scaling", "original_max_position_embeddings"),
    "rope_factor": ("rope_scaling", "factor"), "beta_fast": ("rope_scaling", "beta_fast"),
    "beta_slow": ("rope_scaling", "beta_slow"),
}


def _inference_dict() -> dict:
    f = ModelConfig.flash()
    d = {k: getattr(f, k) for k in REQUIRED}
    d["compress_ratios"] = list(d["compress_ratios"])
    return dict(d, dtype="fp8", scale_fmt="ue8m0", expert_dtype="fp4")


def test_required_key_list_is_the_spec_list():
    assert len(REQUIRED) == len(set(REQUIRED)) == 32


@pytest.mark.parametrize("key", REQUIRED)
def test_each_required_key_missing_from_an_hf_config(key):
    d = copy.deepcopy(HF_FLASH)
    where = HF_KEY.get(key, key)
    if isinstance(where, tuple):
        del d[where[0]][where[1]]
    else:
        del d[where]
    ModelConfig.from_dict(HF_FLASH)      # the intact dict loads
    with pytest.raises(ConfigError, match=rf"missing required keys {key}\b"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("key", REQUIRED)
def test_each_required_key_missing_from_an_inference_config(key):
    d = _inference_dict()
    assert ModelConfig.from_dict(d) == ModelConfig.flash()
    del d[key]
    with pytest.raises(ConfigError, match=rf"missing required keys {key}\b"):
        ModelConfig.from_dict(d)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("change, message", [
    ({"rope_theta": 0}, r"rope_theta=0\.0: expected a finite number > 1"),
    ({"rope_theta": -10000}, r"rope_theta=-10000\.0: expected a finite number > 1"),
    ({"compress_rope_theta": 1}, r"compress_rope_theta=1\.0: expected a finite number > 1"),
    ({"rms_norm_eps": NAN}, r"norm_eps \(rms_norm_eps\)=nan: expected a finite number in \(0, 1\]"),
    ({"rms_norm_eps": -1e-6}, r"norm_eps \(rms_norm_eps\)=-1e-06: expected a finite number in"),
    ({"hc_eps": INF}, r"hc_eps=inf: expected a finite number in \(0, 1\]"),
    ({"swiglu_limit": NAN}, r"swiglu_limit=nan: expected a finite number >= 0"),
    ({"swiglu_limit": -1}, r"swiglu_limit=-1\.0: expected a finite number >= 0"),
    ({"routed_scaling_factor": INF},
     r"route_scale \(routed_scaling_factor\)=inf: expected a finite number > 0"),
    ({"routed_scaling_factor": 0}, r"route_scale \(routed_scaling_factor\)=0\.0: expected"),
    ({"index_topk": 10 ** 9}, r"index_topk=1000000000: expected an int in \[1, 262144\]"),
    ({"index_topk": 1e9}, r"index_topk=1000000000: expected an int in \[1, 262144\]"),
    ({"sliding_window": 2 ** 21}, r"window_size=2097152: expected an int in \[1, "
                                  r"max_position_embeddings=1048576\]"),
    ({"n_routed_experts": 2 ** 40}, r"n_routed_experts=1099511627776: expected an int in "
                                    r"\[1, 2147483647\]"),
    ({"rope_scaling": {"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 65536,
                       "beta_fast": 32, "beta_slow": 1}},
     r"rope_factor \(rope_scaling.factor\)=0\.5: expected a finite number >= 1"),
    ({"rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                       "beta_fast": 1, "beta_slow": 32}}, r"beta_fast=1\.0 < beta_slow=32\.0"),
    ({"eos_token_id": 129280}, r"eos_token_id=129280: expected an int in \[0, vocab_size=129280\)"),
    ({"max_position_embeddings": -1}, r"max_position_embeddings=-1: expected an int in \[1,"),
])
def test_bad_values_name_field_value_and_range(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(dict(HF_FLASH, **change))


@pytest.mark.parametrize("key, value, field, kind", [
    ("hidden_size", True, "dim (hidden_size)", "int"),
    ("num_hidden_layers", False, "n_layers (num_hidden_layers)", "int"),
    ("rope_theta", True, "rope_theta", "float"),
    ("hidden_size", [4096], "dim (hidden_size)", "int"),
    ("rms_norm_eps", {"v": 1}, "norm_eps (rms_norm_eps)", "float"),
    ("hidden_size", 4096.5, "dim (hidden_size)", "int"),
    ("hidden_size", NAN, "dim (hidden_size)", "int"),
    ("norm_topk_prob", 1, "norm_topk_prob", "bool"),
    ("scoring_func", 3, "score_func (scoring_func)", "str"),
])
def test_wrong_json_types_are_config_errors(key, value, field, kind):
    with pytest.raises(ConfigError, match=rf"config field {re.escape(field)} must be of type "
                                          rf"{kind}\b.*got {re.escape(repr(value))}"):
        ModelConfig.from_dict(dict(HF_FLASH, **{key: value}))


def test_compress_ratios_must_be_a_list_of_ints():
    for value in (4, "0,4", [0, 4.5] + [4] * 42, [True] * 44, [-4] + [4] * 43):
        with pytest.raises(ConfigError, match="compress_ratios"):
            ModelConfig.from_dict(dict(HF_FLASH, compress_ratios=value))


def test_overrides_are_validated_too():
    with pytest.raises(ConfigError, match="rope_theta=-1.0"):
        ModelConfig.tiny(rope_theta=-1)
    with pytest.raises(ConfigError, match="quant_sim"):
        ModelConfig.tiny(quant_sim="yes")


def test_config_is_immutable():
    """A field assigned after the config was made skipped validate() (head_dim=3 built a
    model) and changed a built model under it (window_size): configs are frozen, changed
    copies come from dataclasses.replace, which validates them."""
    c = ModelConfig.tiny()
    for name, value in (("head_dim", 3), ("window_size", 4), ("quant_sim", False)):
        with pytest.raises(dataclasses.FrozenInstanceError,
                           match=rf"immutable.*cannot assign {name}; make a changed copy with "
                                 rf"dataclasses\.replace\(config, {name}=\.\.\.\)"):
            setattr(c, name, value)
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot delete window_size"):
        del c.window_size
    assert c == ModelConfig.tiny()
    m = Model(ModelConfig.tiny(n_layers=1, compress_ratios=(0, 0), n_hash_layers=1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.config.window_size = 4
    assert m.config.window_size == 16
    assert dataclasses.replace(c, window_size=4).window_size == 4
    with pytest.raises(ConfigError, match="rope_head_dim must be even and <= head_dim"):
        dataclasses.replace(c, head_dim=3)


@pytest.mark.parametrize("change, message", [
    ({"n_routed_experts": 513}, r"n_routed_experts=513: expected an int in \[1, 512\] \(the "
                                r"experts the router, moe_gate, takes\)"),
    ({"n_routed_experts": 32, "n_activated_experts": 17},
     r"n_activated_experts \(num_experts_per_tok\)=17: expected an int in \[1, 16\] \(the "
     r"experts per token"),
    ({"head_dim": 130, "quant_sim": False},
     r"head_dim=130: expected a multiple of 4 in \[4, 1024\] \(the entries compress_kv"),
    ({"head_dim": 1088, "quant_sim": False}, r"head_dim=1088: expected a multiple of 4 in "
                                             r"\[4, 1024\]"),
    ({"index_head_dim": 66, "quant_sim": False},
     r"index_head_dim=66: expected a multiple of 4 in \[4, 1024\]"),
])
def test_op_limits_are_config_errors(change, message):
    """Shapes the ops refuse at the first forward on every backend (moe_gate's experts,
    compress_kv's entry head dim) are refused when the config is made, naming the field."""
    with pytest.raises(ConfigError, match=message):
        ModelConfig.tiny(**change)


def test_op_limits_match_the_ops_and_apply_where_the_ops_run():
    assert (GATE_MAX_EXPERTS, GATE_MAX_TOPK) == (moe.GATE_MAX_EXPERTS, moe.MAX_TOPK)
    ModelConfig.tiny(n_routed_experts=512, n_activated_experts=16)
    ModelConfig.tiny(head_dim=1024, index_head_dim=68, quant_sim=False)
    # compress_kv runs only in compressed layers (head_dim) and CSA indexers (index_head_dim)
    assert ModelConfig.tiny(head_dim=130, quant_sim=False,
                            compress_ratios=(0, 0, 0, 0, 0)).head_dim == 130
    assert ModelConfig.tiny(index_head_dim=66, quant_sim=False,
                            compress_ratios=(0, 16, 16, 0, 0)).index_head_dim == 66


def test_valid_edge_values_are_accepted():
    c = ModelConfig.from_dict(dict(HF_FLASH, swiglu_limit=0, index_topk=262144))
    assert c.swiglu_limit == 0.0 and c.index_topk == 262144
    assert math.isclose(ModelConfig.tiny(norm_eps=1.0).norm_eps, 1.0)


def test_deeply_nested_config_json(tmp_path):
    (tmp_path / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        ModelConfig.from_json(tmp_path)
    # An unknown key nested deeply inside an otherwise valid config.
    text = json.dumps(HF_FLASH)[:-1] + ', "extra": ' + '{"x": ' * 100_000 + "{}" + "}" * 100_000 + "}"
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="nested too deeply"):
        ModelConfig.from_json(tmp_path)
