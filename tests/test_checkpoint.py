"""Release-format checkpoints: FP8/FP4 weights, shards + index, HF names, errors (§12)."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dsv4
from dsv4.checkpoint import CheckpointError, linear_formats, official_name, tensor_specs
from dsv4.config import ConfigError
from dsv4.quant import fp4_pack, fp4_unpack, fp8_block_dequantize, fp8_block_quantize

VOCAB = 4096
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


def _config(**over):
    """Tiny config whose FP8/FP4-stored linears all have in_features % 128 == 0 (quant_sim)."""
    base = dict(vocab_size=VOCAB, q_lora_rank=128, expert_dtype="fp4", dtype="fp8")
    base.update(over)
    return dsv4.ModelConfig.tiny(**base)


def _release_tensors(model, fmt_config):
    """(release-format tensors, their dequantised bf16 twin) of ``model``'s weights."""
    sd = model.state_dict()
    formats = linear_formats(fmt_config)
    rel, twin = {}, {}
    for name, (shape, dtype) in tensor_specs(fmt_config).items():
        if name.endswith(".scale"):
            continue
        mod = name[:-len(".weight")] if name.endswith(".weight") else None
        f = formats.get(mod)
        if f == "fp8":
            q, s = fp8_block_quantize(sd[name])
            rel[name], rel[f"{mod}.scale"] = q, s
            twin[name] = fp8_block_dequantize(q, s, torch.bfloat16)
        elif f == "fp4":
            p, s = fp4_pack(sd[name])
            rel[name], rel[f"{mod}.scale"] = p, s
            twin[name] = fp4_unpack(p, s, torch.bfloat16)
        else:
            rel[name] = twin[name] = sd[name].to(dtype).contiguous()
    return rel, twin


def _write(path, config, tensors, shards=True, config_edit=None):
    """Write config.json and ``tensors`` as 2 shards + index (or one model.safetensors)."""
    os.makedirs(path, exist_ok=True)
    d = config.to_hf_dict()
    d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    if config_edit:
        config_edit(d)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)
    if not shards:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    first = {k: v for k, v in tensors.items() if k.startswith(("layers.0.", "layers.1.", "embed"))}
    second = {k: v for k, v in tensors.items() if k not in first}
    save_file(first, os.path.join(path, SHARD1), metadata={"format": "pt"})
    save_file(second, os.path.join(path, SHARD2), metadata={"format": "pt"})
    wm = {k: SHARD1 for k in first} | {k: SHARD2 for k in second}
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random tiny model in the release format (2 shards + index) and its bf16 twin."""
    torch.manual_seed(0)
    config = _config()
    model = dsv4.Model(config)
    rel, twin = _release_tensors(model, config)
    root = tmp_path_factory.mktemp("ckpt")
    _write(root / "fp8", config, rel)
    _write(root / "bf16", config, twin, shards=False)
    return {"config": config, "rel": rel, "twin": twin, "fp8": str(root / "fp8"),
            "bf16": str(root / "bf16"), "root": root, "ref": model}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))


def _load(path, **kw):
    kw.setdefault("dtype", torch.float32)
    kw.setdefault("progress", False)
    return dsv4.Model.from_pretrained(path, **kw)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------------------ specs / names
def test_tensor_specs_match_model_and_synthetic_release(ckpt):
    config = ckpt["config"]
    specs = tensor_specs(config)
    got = {}
    for shard in (SHARD1, SHARD2):
        with safe_open(os.path.join(ckpt["fp8"], shard), "pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                got[k] = (tuple(t.shape), t.dtype)
    assert got == specs
    with torch.device("meta"):
        m = dsv4.Model(config)
    bf16 = tensor_specs(config, "bf16")
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {k: v[0] for k, v in bf16.items()}
    assert not any(k.endswith(".scale") for k in bf16)
    # the rule of §12.2: which linears are FP8, FP4, bf16
    assert specs["layers.0.attn.wo_a.weight"][1] == torch.float8_e4m3fn
    assert specs["layers.1.attn.indexer.wq_b.weight"][1] == torch.float8_e4m3fn
    assert specs["layers.0.ffn.experts.3.w2.weight"] == ((128, 64), torch.int8)
    assert specs["layers.0.ffn.experts.3.w2.scale"] == ((128, 4), torch.float8_e8m0fnu)
    assert specs["layers.0.ffn.shared_experts.w1.scale"] == ((1, 1), torch.float8_e8m0fnu)
    assert specs["layers.1.attn.compressor.wkv.weight"][1] == torch.bfloat16
    assert specs["layers.1.attn.indexer.weights_proj.weight"][1] == torch.bfloat16
    assert specs["mtp.0.e_proj.weight"][1] == torch.float8_e4m3fn
    assert specs["head.weight"][1] == torch.bfloat16 and "head.scale" not in specs
    assert specs["layers.0.ffn.gate.tid2eid"] == ((VOCAB, 2), torch.int64)
    assert "layers.0.ffn.gate.bias" not in specs and "layers.2.ffn.gate.tid2eid" not in specs
    # expert_dtype None (the ModelArgs default) means FP8 experts
    fp8e = tensor_specs(_config(expert_dtype=None))
    assert fp8e["layers.0.ffn.experts.0.w1.weight"] == ((128, 128), torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="fmt"):
        tensor_specs(config, "fp4")


def test_flash_spec_shapes():
    """A few shapes of §12.2 for the real V4-Flash config."""
    specs = tensor_specs(dsv4.ModelConfig.flash())
    assert specs["layers.0.attn.wq_a.scale"] == ((8, 32), torch.float8_e8m0fnu)
    assert specs["layers.0.attn.wq_b.scale"][0] == (256, 8)
    assert specs["layers.0.attn.wo_a.weight"][0] == (8192, 4096)
    assert specs["layers.0.attn.wo_b.scale"][0] == (32, 64)
    assert specs["layers.5.ffn.experts.255.w1.weight"] == ((2048, 2048), torch.int8)
    assert specs["layers.5.ffn.experts.255.w1.scale"][0] == (2048, 128)
    assert specs["layers.5.ffn.experts.7.w2.scale"][0] == (4096, 64)
    assert specs["layers.2.attn.indexer.wq_b.scale"][0] == (64, 8)
    assert specs["layers.3.attn.compressor.ape"] == ((128, 512), torch.float32)
    assert specs["mtp.0.e_proj.scale"][0] == (32, 32)
    assert specs["layers.2.ffn.gate.tid2eid"][0] == (129280, 6)
    assert "layers.3.ffn.gate.tid2eid" not in specs and "mtp.0.ffn.gate.bias" in specs


def test_official_name_mapping():
    assert official_name("model.layers.3.self_attn.q_a_proj.weight_scale_inv") == \
        "layers.3.attn.wq_a.scale"
    assert official_name("model.layers.3.mlp.gate.e_score_correction_bias") == "layers.3.ffn.gate.bias"
    assert official_name("model.layers.0.mlp.experts.5.down_proj.weight") == \
        "layers.0.ffn.experts.5.w2.weight"
    assert official_name("model.embed_tokens.weight") == "embed.weight"
    assert official_name("lm_head.weight") == "head.weight"
    assert official_name("model.layers.1.input_layernorm.weight") == "layers.1.attn_norm.weight"
    assert official_name("layers.1.hc_attn_fn") == "layers.1.hc_attn_fn"       # untouched
    assert official_name("model.mtp.0.embed_tokens.weight") is None             # dropped
    assert official_name("mtp.0.head.weight") is None
    assert official_name("mtp.0.hc_head_fn") == "mtp.0.hc_head_fn"


# ------------------------------------------------------------------------------ loading
def test_release_loads_in_both_modes_like_its_bf16_twin(ckpt, ids):
    twin = _load(ckpt["bf16"], quant_sim=False)
    ref = _logits(twin, ids)
    for weights in ("dequant", "native"):
        m = _load(ckpt["fp8"], quant_sim=False, weights=weights)
        out = _logits(m, ids)
        # same dequantised values -> same logits up to fp32 summation order
        assert _rel(out, ref) < 1e-6, weights
    # and close to the unquantised random model (FP8/FP4 weight rounding only)
    orig = _logits(ckpt["ref"].float(), ids)
    a, b = ref.double().flatten(0, 1), orig.double().flatten(0, 1)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    assert cos.min() > 0.75 and cos.median() > 0.95, cos       # random weights, FP4 experts


def test_quant_sim_activation_quantisation_only_for_stored_linears(ckpt, ids):
    deq = _load(ckpt["fp8"], quant_sim=True)
    nat = _load(ckpt["fp8"], quant_sim=True, weights="native")
    twin = _load(ckpt["bf16"], quant_sim=True)
    a, b, t = _logits(deq, ids), _logits(nat, ids), _logits(twin, ids)
    assert _rel(a, b) < 1e-6
    # the twin's linears were not stored FP8: no activation quantisation, so it differs
    assert _rel(a, t) > 1e-4
    for m in (deq, nat):
        attn = m.layers[1].attn
        assert attn.wq_a.stored_format == "fp8" and attn.wq_a.act_quant
        assert attn.wo_a.stored_format == "fp8" and not attn.wo_a.act_quant
        assert m.layers[0].ffn.experts[0].w1.stored_format == "fp4"
        assert m.layers[0].ffn.experts[0].w1.act_quant
        assert attn.compressor.wkv.stored_format is None and m.head.stored_format is None
    assert twin.layers[1].attn.wq_a.stored_format is None
    # the linears read quant_sim from the model's one config, which cannot change under them
    # (it is immutable: a quant_sim flipped at run time would skip the load-time checks)
    for m in (deq, nat):
        held = [mod.config for mod in m.modules() if getattr(mod, "config", None) is not None]
        assert len(held) > 1 and all(c is m.config for c in held)
    with pytest.raises(dataclasses.FrozenInstanceError, match="dataclasses.replace"):
        deq.config.quant_sim = False
    assert deq.config.quant_sim


def test_native_holds_fewer_bytes_and_weight_access(ckpt, ids):
    deq = _load(ckpt["fp8"], dtype=torch.bfloat16, quant_sim=False)
    nat = _load(ckpt["fp8"], dtype=torch.bfloat16, quant_sim=False, weights="native")

    def nbytes(m):
        return sum(t.numel() * t.element_size()
                   for t in list(m.parameters()) + list(m.buffers()))
    assert nbytes(nat) < 0.8 * nbytes(deq)
    e = nat.layers[0].ffn.experts[1].w2
    assert e.weight_format == "fp4" and e.qweight.dtype == torch.int8
    assert e.qweight.nbytes == e.in_features * e.out_features // 2          # a quarter of bf16
    wq = nat.layers[0].attn.wq_b
    assert wq.qweight.dtype == torch.float8_e4m3fn and wq.qweight.nbytes == wq.weight.numel()
    assert "weight" not in dict(wq.named_parameters())
    # .weight gives the dequantised weight, equal to the dequant-mode parameter
    for name in ("layers.0.attn.wo_a", "layers.0.ffn.experts.1.w2", "mtp.0.e_proj"):
        a = nat.get_submodule(name).weight
        b = deq.get_submodule(name).weight
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(nat(ids[:, :12]), deq(ids[:, :12]))
    # the state dict keeps the official names and the stored bytes, and loads back
    sd = nat.state_dict()
    assert sd["layers.0.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert sd["layers.0.attn.wq_b.scale"].dtype == torch.float8_e8m0fnu
    assert "layers.0.attn.wq_b.qweight" not in sd
    other = _load(ckpt["fp8"], dtype=torch.bfloat16, quant_sim=False, weights="native", num_layers=4)
    for b in other.buffers():       # poison, so that load_state_dict must restore everything
        if b.is_floating_point():
            b.view(torch.uint8).zero_()
    other.load_state_dict({k: v for k, v in sd.items() if not k.startswith("mtp.")})
    with torch.no_grad():
        assert torch.equal(other(ids[:, :12]), deq(ids[:, :12]))
    # native linears follow Model.to(dtype): bf16-loaded then .float() == loaded in fp32
    fp32 = _load(ckpt["fp8"], dtype=torch.float32, quant_sim=False, weights="native")
    nat.float()
    assert torch.equal(_logits(nat, ids), _logits(fp32, ids))


def test_native_save_round_trip_writes_release_format(ckpt, ids, tmp_path):
    nat = _load(ckpt["fp8"], quant_sim=False, weights="native")
    nat.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
        w = f.get_tensor("layers.0.ffn.experts.0.w1.weight")
        assert w.dtype == torch.int8 and torch.equal(w, ckpt["rel"]["layers.0.ffn.experts.0.w1.weight"])
        assert f.get_tensor("layers.1.attn.wkv.scale").dtype == torch.float8_e8m0fnu
    again = _load(tmp_path, quant_sim=False, weights="native")
    assert torch.equal(_logits(again, ids), _logits(nat, ids))
    sd_a, sd_b = nat.state_dict(), again.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k].view(torch.uint8) if sd_a[k].element_size() == 1 else sd_a[k],
                           sd_b[k].view(torch.uint8) if sd_b[k].element_size() == 1 else sd_b[k])
               for k in sd_a)


def test_num_layers_loads_a_prefix(ckpt, ids):
    full = _load(ckpt["fp8"], quant_sim=False)
    part = _load(ckpt["fp8"], quant_sim=False, num_layers=2)
    c = part.config
    assert c.n_layers == 2 and c.n_mtp_layers == 0 and len(part.layers) == 2 and len(part.mtp) == 0
    assert c.compress_ratios == ckpt["config"].compress_ratios[:2]
    ref = dsv4.Model(c)
    sd = full.state_dict()
    ref.load_state_dict({k: sd[k] for k in ref.state_dict()})
    assert torch.equal(_logits(part, ids), _logits(ref, ids))
    with_mtp = _load(ckpt["fp8"], quant_sim=False, num_layers=3, n_mtp_layers=1)
    assert len(with_mtp.mtp) == 1 and with_mtp.config.compress_ratios == \
        ckpt["config"].compress_ratios[:3] + ckpt["config"].compress_ratios[-1:]
    assert torch.equal(with_mtp.mtp[0].e_proj.weight, full.mtp[0].e_proj.weight)
    one = _load(ckpt["fp8"], quant_sim=False, num_layers=1)
    assert one.config.n_hash_layers == 1
    no_mtp = _load(ckpt["fp8"], quant_sim=False, n_mtp_layers=0)
    assert len(no_mtp.layers) == 4 and len(no_mtp.mtp) == 0
    for bad in (0, 5, 2.0, True, "2"):
        with pytest.raises(ValueError, match="num_layers"):
            _load(ckpt["fp8"], num_layers=bad)
    # integer-like values count as integers, as elsewhere in the API (operator.index)
    import numpy as np
    two = _load(ckpt["fp8"], quant_sim=False, num_layers=np.int64(2), n_mtp_layers=torch.tensor(0))
    assert two.config.n_layers == 2 and two.config.n_mtp_layers == 0
    with pytest.raises(ValueError, match="n_mtp_layers"):
        _load(ckpt["fp8"], num_layers=2, n_mtp_layers=np.int64(7))


def test_hf_names_load_like_official_names(ckpt, ids, tmp_path):
    seg = {"attn": "self_attn", "ffn": "mlp", "scale": "weight_scale_inv", "embed": "embed_tokens",
           "head": "lm_head", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
           "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
           "kv_norm": "kv_a_layernorm", "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}

    def hf(name):
        parts = [seg.get(p, p) for p in name.split(".")]
        if parts[-2:] == ["gate", "bias"]:
            parts[-1] = "e_score_correction_bias"
        return "model." + ".".join(parts)
    tensors = {hf(k): v for k, v in ckpt["rel"].items()}
    tensors["model.mtp.0.embed_tokens.weight"] = torch.zeros(3)     # dropped like convert.py
    assert "model.layers.0.self_attn.q_a_proj.weight_scale_inv" in tensors
    _write(tmp_path, ckpt["config"], tensors)
    a = _load(tmp_path, quant_sim=False)
    b = _load(ckpt["fp8"], quant_sim=False)
    assert torch.equal(_logits(a, ids), _logits(b, ids))


def test_progress_bar(ckpt, capfd):
    _load(ckpt["fp8"], quant_sim=False, num_layers=1, progress=True)
    assert "loading fp8" in capfd.readouterr().err
    _load(ckpt["fp8"], quant_sim=False, num_layers=1, progress=False)
    assert "loading" not in capfd.readouterr().err


# ------------------------------------------------------------------------------ errors
def test_missing_unexpected_misshaped_listed_together(ckpt, tmp_path):
    t = dict(ckpt["rel"])
    del t["layers.0.attn.attn_sink"]                                # missing plain tensor
    del t["layers.2.attn.wkv.scale"]                                # FP8 weight without scale
    del t["layers.3.ffn.experts.1.w3.weight"]                       # missing weight (scale left)
    t["layers.0.attn.bogus"] = torch.zeros(2)                       # unexpected
    t["layers.1.attn.wq_b.scale"] = t["layers.1.attn.wq_b.scale"][:1].clone()   # wrong grid
    t["layers.1.ffn.experts.0.w1.weight"] = t["layers.1.ffn.experts.0.w1.weight"][:, :8].clone()
    t["norm.weight"] = torch.zeros(3)                               # wrong plain shape
    t["layers.2.attn.wq_a.weight"] = torch.zeros(128, 128, dtype=torch.int32)   # bad dtype
    _write(tmp_path, ckpt["config"], t)
    with pytest.raises(CheckpointError) as e:
        _load(tmp_path)
    msg = str(e.value)
    for s in ("missing: ", "layers.0.attn.attn_sink", "layers.2.attn.wkv.scale",
              "layers.3.ffn.experts.1.w3.weight", "unexpected: ", "layers.0.attn.bogus",
              "layers.3.ffn.experts.1.w3.scale", "layers.1.attn.wq_b.scale",
              "layers.1.ffn.experts.0.w1.weight", "norm.weight", "layers.2.attn.wq_a.weight"):
        assert s in msg, (s, msg)


def test_every_storage_mismatch_is_named(ckpt, tmp_path):
    """The header checks of a linear's weight / scale pair and of plain tensors, each named in
    the one error that lists them all."""
    t = dict(ckpt["rel"])
    bf16 = ckpt["twin"]
    t["layers.0.attn.wkv.weight"] = bf16["layers.0.attn.wkv.weight"]      # scale left beside it
    t["layers.1.attn.wkv.weight"] = bf16["layers.1.attn.wkv.weight"][:, :8].clone()
    del t["layers.1.attn.wkv.scale"]                                      # plain, misshaped
    s = t["layers.2.attn.wkv.scale"]
    t["layers.2.attn.wkv.scale"] = torch.ones(s.shape, dtype=torch.bfloat16)   # scale dtype
    t["layers.0.attn_norm.weight"] = torch.ones(t["layers.0.attn_norm.weight"].shape,
                                                 dtype=torch.int32)     # int for a float
    tid = next(k for k in t if k.endswith("tid2eid"))
    t[tid] = t[tid].float()                                               # float for an int
    _write(tmp_path, ckpt["config"], t)
    with pytest.raises(CheckpointError) as e:
        _load(tmp_path)
    msg = str(e.value)
    for part in ("layers.0.attn.wkv.scale: a scale for a BF16 (unquantised) weight",
                 "layers.1.attn.wkv.weight: file [",
                 "layers.2.attn.wkv.scale: dtype BF16 (accepted: F8_E8M0, F32)",
                 "layers.0.attn_norm.weight: file dtype I32 vs a float tensor",
                 f"{tid}: file dtype F32 vs an integer tensor"):
        assert part in msg, (part, msg)


def test_truncated_and_corrupt_shards_name_the_file(ckpt, tmp_path):
    _write(tmp_path, ckpt["config"], ckpt["rel"])
    f = tmp_path / SHARD2
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=SHARD2):
        _load(tmp_path)
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=SHARD2):
        _load(tmp_path)
    f.unlink()
    with pytest.raises(CheckpointError, match=f"shards that do not exist.*{SHARD2}"):
        _load(tmp_path)


def test_index_must_agree_with_shards(ckpt, tmp_path):
    _write(tmp_path, ckpt["config"], ckpt["rel"])
    idx = tmp_path / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    d["weight_map"]["norm.weight"] = SHARD1          # it is in shard 2
    idx.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="norm.weight"):
        _load(tmp_path)


def test_nan_scale_is_refused(ckpt, tmp_path):
    t = dict(ckpt["rel"])
    s = t["layers.1.attn.wkv.scale"].view(torch.uint8).clone()
    s[0, 0] = 255
    t["layers.1.attn.wkv.scale"] = s.view(torch.float8_e8m0fnu)
    _write(tmp_path, ckpt["config"], t)
    with pytest.raises(CheckpointError, match="layers.1.attn.wkv.scale.*NaN"):
        _load(tmp_path)


@pytest.mark.parametrize("name, stored, value, message", [
    ("norm.weight", torch.float32, float("nan"), "norm.weight in .* non-finite"),
    ("layers.0.attn_norm.weight", torch.bfloat16, float("-inf"),
     "layers.0.attn_norm.weight in .* non-finite"),
    # finite as stored, beyond bf16's range once loaded in bf16
    ("layers.2.ffn_norm.weight", torch.float64, 1e300, "layers.2.ffn_norm.weight in .* overflow"),
])
def test_non_finite_plain_tensors_are_refused(ckpt, tmp_path, name, stored, value, message):
    """A NaN / inf, or a value the load's dtype cannot hold, is refused at load (naming the
    tensor), as NaN FP8 codes and scales are, not found as NaN logits at the first forward."""
    t = dict(ckpt["rel"])
    w = t[name].to(stored).clone()
    w[0] = value
    t[name] = w
    _write(tmp_path, ckpt["config"], t)
    with pytest.raises(CheckpointError, match=message):
        _load(tmp_path, dtype=torch.bfloat16)
    if stored == torch.float64:         # fp32 holds 1e300 neither; a finite value loads
        w[0] = 1e30
        _write(tmp_path, ckpt["config"], t)
        m = _load(tmp_path, dtype=torch.float32, quant_sim=False)
        assert dict(m.named_parameters())[name][0].item() == pytest.approx(1e30, rel=1e-6)


def test_later_revision_compress_ratios_refused(ckpt, tmp_path):
    def edit(d):     # Flash-0731-like: more compress_ratios entries than layers + MTP
        d["compress_ratios"] = d["compress_ratios"] + [0, 0]
        d["num_nextn_predict_layers"] = 1
    _write(tmp_path, ckpt["config"], ckpt["rel"], config_edit=edit)
    with pytest.raises(ConfigError, match="April-2026"):
        _load(tmp_path)

    def dspark(d):   # Flash-0731 keeps a consistent length but adds DSpark draft blocks
        d["dspark_num_layers"] = 3
    _write(tmp_path, ckpt["config"], ckpt["rel"], config_edit=dspark)
    with pytest.raises(ConfigError, match="Flash-0731"):
        _load(tmp_path)


def test_quant_sim_needs_128_multiple_for_stored_linears(tmp_path, ids):
    torch.manual_seed(1)
    config = _config(q_lora_rank=64, n_mtp_layers=0, compress_ratios=(0, 4, 16, 4))
    rel, _ = _release_tensors(dsv4.Model(config), config)
    _write(tmp_path, config, rel, shards=False)
    with pytest.raises(ConfigError, match=r"in_features % 128.*layers.0.attn.wq_b"):
        _load(tmp_path, quant_sim=True)
    m = _load(tmp_path, quant_sim=False)       # fine without the simulation
    assert torch.isfinite(_logits(m, ids[:, :8])).all()


def test_bad_arguments(ckpt):
    with pytest.raises(ValueError, match="weights"):
        _load(ckpt["fp8"], weights="fp8")
    with pytest.raises(ValueError, match="dtype"):
        _load(ckpt["fp8"], dtype=torch.int8)
    with pytest.raises(CheckpointError, match="not found"):
        _load(os.path.join(ckpt["fp8"], "nope"))
    for device in ("meta", "bogus", torch.device("meta"), 3.5):
        with pytest.raises(ValueError, match="device must be a CPU or CUDA device"):
            _load(ckpt["fp8"], device=device)


# ------------------------------------------------------------------------------ confined paths
def _index_path(d):
    return d / "model.safetensors.index.json"


def _edit_index(d, edit):
    idx = _index_path(d)
    data = json.loads(idx.read_text())
    edit(data["weight_map"])
    idx.write_text(json.dumps(data))


@pytest.fixture
def sharded(ckpt, tmp_path):
    """A copy of the release checkpoint (2 shards + index) in tmp_path/ckpt, and a directory
    tmp_path/outside holding a copy of shard 2 (readable, valid: only the path is wrong)."""
    d, out = tmp_path / "ckpt", tmp_path / "outside"
    _write(d, ckpt["config"], ckpt["rel"])
    out.mkdir()
    (out / SHARD2).write_bytes((d / SHARD2).read_bytes())
    return d, out


def test_index_entries_outside_the_directory_are_refused(sharded):
    d, out = sharded
    cases = {
        str(out / SHARD2): "relative to the checkpoint directory",              # absolute
        f"../outside/{SHARD2}": "without '..'",                                  # parent
        f"sub/../../outside/{SHARD2}": "without '..'",
        "": "non-empty string",
    }
    for target, why in cases.items():
        _edit_index(d, lambda wm: wm.__setitem__("norm.weight", target))
        with pytest.raises(CheckpointError) as e:
            _load(d)
        msg = str(e.value)
        assert "weight_map entry 'norm.weight'" in msg and why in msg, msg
        _edit_index(d, lambda wm: wm.__setitem__("norm.weight", SHARD2))
    _load(d, quant_sim=False, num_layers=1)          # restored: loads


def test_symlinks_leaving_the_directory_are_refused(sharded, ckpt):
    d, out = sharded
    (d / SHARD2).unlink()
    (d / SHARD2).symlink_to(out / SHARD2)               # the index names an in-directory file
    with pytest.raises(CheckpointError, match=rf"weight_map entry .*{SHARD2}.*outside the "
                                              r"checkpoint directory .*symlink"):
        _load(d)
    # The same for a single-file checkpoint and for config.json.
    single = d.parent / "single"
    _write(single, ckpt["config"], ckpt["rel"], shards=False)
    (out / "model.safetensors").write_bytes((single / "model.safetensors").read_bytes())
    (single / "model.safetensors").unlink()
    (single / "model.safetensors").symlink_to(out / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors.*outside the checkpoint"):
        _load(single)
    (single / "model.safetensors").unlink()
    (single / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    (out / "config.json").write_text((single / "config.json").read_text())
    (single / "config.json").unlink()
    (single / "config.json").symlink_to(out / "config.json")
    with pytest.raises(CheckpointError, match="config.json.*outside the checkpoint"):
        _load(single)


def test_hugging_face_cache_symlinks_to_blobs_load(ckpt, tmp_path, ids):
    """hub cache layout: snapshots/<rev>/<file> -> ../../blobs/<hash> stays allowed."""
    src = tmp_path / "src"
    _write(src, ckpt["config"], ckpt["rel"])
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(os.listdir(src))):
        (repo / "blobs" / f"blob{i}").write_bytes((src / f).read_bytes())
        (snap / f).symlink_to(f"../../blobs/blob{i}")
    a = _logits(_load(snap, quant_sim=False), ids)
    b = _logits(_load(src, quant_sim=False), ids)
    assert torch.equal(a, b)


def test_deeply_nested_index_is_a_checkpoint_error(sharded):
    d, _ = sharded
    _index_path(d).write_text("{\"weight_map\": " + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(CheckpointError, match="nested too deeply"):
        _load(d)
    _index_path(d).write_text("{\"weight_map\": [1, 2]}")
    with pytest.raises(CheckpointError, match="weight_map"):
        _load(d)


# ------------------------------------------------------------------------------ lazy shards
def _append_sparse_tensor(file, name, nbytes):
    """Add a U8 tensor of ``nbytes`` zero bytes at the end of a safetensors file, as a hole
    (sparse file: no disk blocks, no memory)."""
    import struct
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    header[name] = {"dtype": "U8", "shape": [nbytes], "data_offsets": [len(data), len(data) + nbytes]}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)
        f.truncate(8 + len(blob) + len(data) + nbytes)


def test_a_shard_larger_than_memory_loads(ckpt, tmp_path, ids):
    """A shard bigger than RAM + swap (safetensors' safe_open maps it copy-on-write and fails
    with "Cannot allocate memory"); the loader reads only the tensors it needs."""
    _write(tmp_path, ckpt["config"], ckpt["rel"], shards=False)
    f = tmp_path / "model.safetensors"
    pages = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    big = max(pages * 2, 32 << 30)
    # "mtp.*emb*" tensors are dropped by the official name mapping (MTP shares the embedding).
    _append_sparse_tensor(f, "mtp.0.emb.padding", big)
    if os.stat(f).st_blocks * 512 > 1 << 30:
        pytest.skip("the filesystem does not support sparse files")
    assert os.path.getsize(f) > pages
    a = _logits(_load(tmp_path, quant_sim=False), ids)
    b = _logits(_load(ckpt["fp8"], quant_sim=False), ids)
    assert torch.equal(a, b)


def test_shard_header_is_validated(ckpt, tmp_path):
    import struct
    from dsv4.checkpoint_io import SafetensorsFile

    _write(tmp_path, ckpt["config"], ckpt["rel"], shards=False)
    f = tmp_path / "model.safetensors"
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    good = json.loads(raw[8:8 + n])

    def rewrite(header):
        blob = json.dumps(header).encode()
        f.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])

    name = "norm.weight"
    b, e = good[name]["data_offsets"]
    for change, msg in (({"dtype": "Q7"}, "bad header entry for 'norm.weight'"),
                        ({"shape": [-1]}, "bad header entry"),
                        ({"data_offsets": [b, e + 2]}, "needs 256 bytes"),
                        ({"data_offsets": [0, e - b]}, "overlap"),
                        ({"data_offsets": [10 ** 12, 10 ** 12 + e - b]}, "inside the")):
        rewrite(dict(good, **{name: dict(good[name], **change)}))
        with pytest.raises(CheckpointError, match=msg):
            SafetensorsFile(str(f), CheckpointError)
        with pytest.raises(CheckpointError, match="model.safetensors"):
            _load(tmp_path)
    f.write_bytes((2 ** 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        _load(tmp_path)


@pytest.mark.parametrize("blob, msg", [
    (b"\x05\x00", "shorter than the 8-byte header length"),
    ((100).to_bytes(8, "little") + b"{}", "header of 100 bytes but the file has 10 bytes"),
    ((9).to_bytes(8, "little") + b"{\"a\":1,\"a\":2}"[:9], "header is not JSON"),
    ((17).to_bytes(8, "little") + b'{"a":{},"a":{}}  ', "header lists 'a' twice"),
    ((4).to_bytes(8, "little") + b"\xff\xfe{}", "header is not JSON"),
    ((20002).to_bytes(8, "little") + b"[" * 10001 + b"]" * 10001, "nested too deeply|not a JSON"),
    ((2).to_bytes(8, "little") + b"[]", "header is not a JSON object"),
    ((24).to_bytes(8, "little") + b'{"__metadata__":{"a":1}}', "__metadata__ must be an object"),
])
def test_malformed_headers_are_named_errors(tmp_path, blob, msg):
    """Crafted safetensors headers: each is the constructor's error naming the file (never a
    raw JSON / struct / recursion error)."""
    from dsv4.checkpoint_io import SafetensorsFile
    f = tmp_path / "x.safetensors"
    f.write_bytes(blob)
    with pytest.raises(CheckpointError, match=msg) as e:
        SafetensorsFile(str(f), CheckpointError)
    assert str(f) in str(e.value)


def test_a_file_cut_after_its_header_fails_at_the_read(ckpt, tmp_path):
    """The header is checked against the file's size at open; a file that shrinks later (a
    download being replaced) fails at the read, naming the tensor."""
    from dsv4.checkpoint_io import SafetensorsFile
    _write(tmp_path, ckpt["config"], ckpt["rel"], shards=False)
    f = tmp_path / "model.safetensors"
    st = SafetensorsFile(str(f), CheckpointError)
    name = max(st.tensors, key=lambda k: st.tensors[k][2][1])      # the last tensor's bytes
    with open(f, "r+b") as h:
        h.truncate(f.stat().st_size - 1)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}': the file ends after"):
        st.read(name)


# ------------------------------------------------------------------------------ scales, sizes
@pytest.mark.parametrize("value, shown", [
    (float("nan"), "NaN"), (float("inf"), "inf"), (float("-inf"), "-inf"), (-0.5, "-0.5"),
    (1e30, "1e+30"), (200.0, "200"),
])
def test_bad_f32_scales_are_refused(ckpt, tmp_path, value, shown):
    t = dict(ckpt["rel"])
    s = t["layers.1.attn.wq_b.scale"].float().clone()
    s[2, 0] = value
    t["layers.1.attn.wq_b.scale"] = s                            # F32 scales (accepted dtype)
    _write(tmp_path, ckpt["config"], t)
    with pytest.raises(CheckpointError, match=rf"layers.1.attn.wq_b.scale in {SHARD1}: 1 "
                       rf"scale\(s\) outside the accepted range \[0, 146\.214\].*at \[2, 0\], "
                       rf"is {re.escape(shown)}"):
        _load(tmp_path)
    s[2, 0] = 2.0 ** -7                                          # a sane F32 scale loads
    _write(tmp_path, ckpt["config"], t)
    _load(tmp_path, num_layers=2)


def test_huge_e8m0_and_fp4_scales_are_refused(ckpt, tmp_path):
    t = dict(ckpt["rel"])
    s = t["layers.1.attn.wkv.scale"].view(torch.uint8).clone()
    s[0, 0] = 254                                               # 2^127
    t["layers.1.attn.wkv.scale"] = s.view(torch.float8_e8m0fnu)
    _write(tmp_path, ckpt["config"], t)
    with pytest.raises(CheckpointError, match=r"layers.1.attn.wkv.scale.*\[0, 146.214\].*"
                                              r"is 1\.70141e\+38"):
        _load(tmp_path)
    t = dict(ckpt["rel"])
    name = "layers.0.ffn.experts.3.w2.scale"
    s = t[name].float().clone()
    s[2, 1] = 2e4
    t[name] = s
    _write(tmp_path, ckpt["config"], t)
    with pytest.raises(CheckpointError, match=rf"{name}.*\[0, 10917.3\] \(FP4 weights: scale x 6"):
        _load(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(n_routed_experts=512), r"n_routed_experts=512, but the "
     r"checkpoint files hold layers 0..3, experts 0..7 \(no layers.0.ffn.experts.511"),
    (lambda d: d.update(num_hidden_layers=10 ** 5, num_hash_layers=2,
                        compress_ratios=[0] * (10 ** 5 + 1)),
     r"n_layers=100000.*\(no layers.99999.attn_norm.weight"),
])
def test_oversized_configs_are_refused_before_any_module_is_built(ckpt, tmp_path, edit, message):
    from dsv4.checkpoint import load_checkpoint

    class NotBuilt:
        def __init__(self, config):
            raise AssertionError("a module was built")

    _write(tmp_path, ckpt["config"], ckpt["rel"], config_edit=edit)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(NotBuilt, tmp_path, progress=False)


def test_convert_reads_only_confined_files(sharded):
    from dsv4.convert import ConvertError, read_checkpoint_index

    d, out = sharded
    assert len(read_checkpoint_index(str(d))) == len(json.loads(_index_path(d).read_text())
                                                      ["weight_map"])
    _edit_index(d, lambda wm: wm.__setitem__("norm.weight", str(out / SHARD2)))
    with pytest.raises(ConvertError, match="weight_map entry 'norm.weight'.*relative"):
        read_checkpoint_index(str(d))


# ------------------------------------------------------------------------------ no random init
def test_meta_build_draws_no_linear_weights(monkeypatch):
    """The loader builds on the meta device; Linear must not run nn.init on meta weights
    (~0.7 ms a call through torch's Python decomposition: about a minute for V4-Flash)."""
    from dsv4.layers.linear import Linear

    seen = []
    real = torch.nn.init.normal_

    def normal_(tensor, *a, **k):
        seen.append(tensor)
        return real(tensor, *a, **k)

    monkeypatch.setattr(torch.nn.init, "normal_", normal_)
    with torch.device("meta"):
        m = dsv4.Model(_config())
    linear_weights = {id(mod.weight) for mod in m.modules() if isinstance(mod, Linear)}
    assert len(linear_weights) > 100
    assert not [t for t in seen if id(t) in linear_weights]
    seen.clear()
    m = dsv4.Model(_config())                          # on the CPU: drawn as before
    assert sum(id(t) in {id(mod.weight) for mod in m.modules() if isinstance(mod, Linear)}
               for t in seen) > 100


def test_from_pretrained_draws_no_random_numbers(ckpt):
    state = torch.get_rng_state()
    _load(ckpt["fp8"], quant_sim=False, num_layers=2)
    assert torch.equal(torch.get_rng_state(), state)
