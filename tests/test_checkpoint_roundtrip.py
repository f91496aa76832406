"""save_pretrained -> from_pretrained keeps what the model computes; strict safetensors headers
and indexes; NaN FP8 weight codes (dsv4.checkpoint, dsv4.checkpoint_io)."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dsv4
from dsv4.checkpoint import CheckpointError
from dsv4.checkpoint_io import SafetensorsFile
from dsv4.layers.linear import Linear
from dsv4.quant import fp4_unpack, fp8_block_dequantize
from dsv4.synthetic import make_checkpoint

VOCAB = 4096
SHARD2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    """A tiny FP8/FP4 release-format checkpoint in 2 shards + index."""
    d = str(tmp_path_factory.mktemp("rt") / "fp8")
    make_checkpoint(dsv4.ModelConfig.tiny(vocab_size=VOCAB), d, n_shards=2, tokenizer=False)
    return d


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))


def _load(path, **kw):
    kw.setdefault("dtype", torch.float32)
    return dsv4.Model.from_pretrained(path, progress=False, **kw)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


def _copy(src, dst):
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        os.link(os.path.join(src, f), os.path.join(dst, f))
    return str(dst)


def _header(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(path, header_text, data):
    blob = header_text.encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


# ------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("weights, dtype", [("dequant", torch.float32),
                                            ("dequant", torch.bfloat16),
                                            ("native", torch.float32)])
def test_save_reload_computes_the_same(fp8, ids, tmp_path, weights, dtype):
    m = _load(fp8, weights=weights, dtype=dtype)
    m.save_pretrained(tmp_path)
    again = _load(tmp_path, weights=weights, dtype=dtype)
    assert torch.equal(_logits(again, ids), _logits(m, ids))
    assert again.config == m.config
    for name, lin in m.named_modules():
        if isinstance(lin, Linear):
            other = again.get_submodule(name)
            assert (other.stored_format, other.act_quant) == (lin.stored_format, lin.act_quant)
    assert m.layers[1].attn.wq_a.act_quant and m.layers[0].ffn.experts[0].w1.stored_format == "fp4"
    # the file holds the release format and config.json says so
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
        assert f.get_slice("layers.1.attn.wq_a.weight").get_dtype() == "F8_E4M3"
        assert f.get_slice("layers.1.attn.wq_a.scale").get_dtype() == "F8_E8M0"
        assert f.get_slice("layers.0.ffn.experts.0.w1.weight").get_dtype() == "I8"
        assert f.get_slice("layers.1.attn.compressor.wkv.weight").get_dtype() != "F8_E4M3"
    d = json.load(open(os.path.join(tmp_path, "config.json")))
    assert d["quantization_config"]["quant_method"] == "fp8" and d["expert_dtype"] == "fp4"
    assert d["torch_dtype"] == str(dtype).replace("torch.", "")
    # native: the bytes it was loaded from; dequant: quantised again to the same values
    # (the scales may differ: a block's codes can be re-scaled by a power of two exactly)
    with safe_open(os.path.join(fp8, SHARD2), "pt") as src, \
            safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as out:
        for mod, unpack in (("layers.2.attn.wq_a", fp8_block_dequantize),
                            ("layers.2.ffn.experts.3.w2", fp4_unpack)):
            a = [src.get_tensor(f"{mod}.{k}") for k in ("weight", "scale")]
            b = [out.get_tensor(f"{mod}.{k}") for k in ("weight", "scale")]
            assert torch.equal(unpack(*a, torch.float32), unpack(*b, torch.float32)), mod
            if weights == "native":
                assert all(torch.equal(x.view(torch.uint8), y.view(torch.uint8))
                           for x, y in zip(a, b)), mod


def test_plain_model_saves_bf16_config(ids, tmp_path):
    torch.manual_seed(0)
    m = dsv4.Model(dsv4.ModelConfig.tiny(vocab_size=VOCAB))
    m.save_pretrained(tmp_path)
    d = json.load(open(os.path.join(tmp_path, "config.json")))
    assert "quantization_config" not in d and d["torch_dtype"] == "float32"
    again = _load(tmp_path)
    assert again.config.dtype == "bf16" and again.layers[1].attn.wq_a.stored_format is None
    assert torch.equal(_logits(again, ids), _logits(m, ids))


def test_save_refuses_what_would_reload_differently(fp8, tmp_path):
    m = _load(fp8, num_layers=2)
    with torch.no_grad():
        m.layers[1].attn.wq_b.weight.add_(1e-3)          # no longer an FP8 value
    with pytest.raises(ValueError, match=r"layers\.1\.attn\.wq_b \(fp8\).*set_quantized.*"
                       r"changed='plain'"):
        m.save_pretrained(tmp_path / "a")
    assert not os.path.exists(tmp_path / "a")           # nothing written
    with pytest.raises(ValueError, match="changed must be 'refuse' or 'plain'"):
        m.save_pretrained(tmp_path / "a", changed="yes")
    with pytest.warns(UserWarning, match=r"written as plain weights.*layers\.1\.attn\.wq_b"):
        m.save_pretrained(tmp_path / "a", changed="plain")   # a fine-tuned model: plain
    again = _load(tmp_path / "a")
    assert again.layers[1].attn.wq_b.stored_format is None
    assert not again.layers[1].attn.wq_b.act_quant
    assert torch.equal(again.layers[1].attn.wq_b.weight, m.layers[1].attn.wq_b.weight)
    assert again.layers[1].attn.wq_a.stored_format == "fp8"
    lin = m.layers[1].attn.wq_b
    lin.stored_format, lin.act_quant = None, False       # the same by hand: no warning
    m.save_pretrained(tmp_path / "a2")
    m.layers[0].attn.wo_a.act_quant = True               # the loader would not give it that
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.wo_a \(act_quant=True"):
        m.save_pretrained(tmp_path / "b")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_scales_save_back_exactly(fp8, ids, tmp_path, dtype):
    """The "-Base" checkpoints' FP8 scales are float32 and no power of two: a dequantised
    load keeps them, so save_pretrained writes the same codes under the same scales."""
    d = _copy(fp8, tmp_path / "ck")
    for f in sorted(os.listdir(d)):
        if not f.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(d, f), "pt") as g:
            t = {k: g.get_tensor(k) for k in g.keys()}
        for k in list(t):
            w = t.get(k[:-len(".scale")] + ".weight") if k.endswith(".scale") else None
            if w is not None and w.dtype == torch.float8_e4m3fn:
                t[k] = t[k].float() * 0.75
        os.unlink(os.path.join(d, f))
        save_file(t, os.path.join(d, f), metadata={"format": "pt"})
    m = _load(d, dtype=dtype)
    m.save_pretrained(tmp_path / "out")
    again = _load(tmp_path / "out", dtype=dtype)
    assert torch.equal(_logits(again, ids), _logits(m, ids))
    with safe_open(os.path.join(tmp_path / "out", "model.safetensors"), "pt") as g:
        assert g.get_tensor("layers.0.attn.wq_b.scale").dtype == torch.float32


def test_save_over_a_sharded_checkpoint_replaces_it(fp8, ids, tmp_path):
    d = _copy(fp8, tmp_path / "ck")
    open(os.path.join(d, "notes.txt"), "w").write("kept")
    m = _load(d)
    with torch.no_grad():
        m.norm.weight.mul_(2.0)
    m.save_pretrained(d)
    assert sorted(os.listdir(d)) == ["config.json", "generation_config.json",
                                     "model.safetensors", "notes.txt"]
    again = _load(d)
    assert torch.equal(again.norm.weight, m.norm.weight)
    assert torch.equal(_logits(again, ids), _logits(m, ids))


# ------------------------------------------------------------------------------ headers
def test_header_duplicates_holes_and_trailing_bytes_are_refused(tmp_path):
    f = str(tmp_path / "x.safetensors")
    save_file({"a": torch.ones(2), "b": torch.zeros(2)}, f)
    header, data = _header(f)
    text = json.dumps(header)
    a0, a1 = header["a"]["data_offsets"]
    b0, b1 = header["b"]["data_offsets"]
    second = "b" if b0 > a0 else "a"
    s0, s1 = header[second]["data_offsets"]
    cases = {
        "twice": (text.replace('"b"', '"a"'), data, r"header lists 'a' twice"),
        "hole": (json.dumps(dict(header, **{second: dict(header[second],
                                                        data_offsets=[s0 + 8, s1 + 8])})),
                 data + b"\0" * 8, rf"hole in the data: '{second}' starts at data byte {s0 + 8}"),
        "trailing": (text, data + b"\0" * 3, r"3 trailing byte\(s\) after the last tensor"),
    }
    for what, (hdr, body, msg) in cases.items():
        _write_header(f, hdr, body)
        with pytest.raises(Exception):                    # safetensors refuses it too
            with safe_open(f, "pt") as g:
                [g.get_tensor(k) for k in g.keys()]
        with pytest.raises(CheckpointError, match=f"x.safetensors: {msg}"):
            SafetensorsFile(f, CheckpointError)
    save_file({"a": torch.ones(2), "e": torch.zeros(0), "b": torch.zeros(2)}, f)
    with SafetensorsFile(f, CheckpointError) as g:        # a 0-byte tensor is no hole
        assert set(g.tensors) == {"a", "e", "b"}


def test_index_that_omits_tensors_is_refused(fp8, tmp_path):
    d = _copy(fp8, tmp_path / "ck")
    idx = json.load(open(os.path.join(fp8, INDEX)))
    del idx["weight_map"]["layers.2.attn_norm.weight"]
    os.unlink(os.path.join(d, INDEX))
    json.dump(idx, open(os.path.join(d, INDEX), "w"))
    with pytest.raises(CheckpointError, match="does not list tensors its shards hold: "
                       r"layers\.2\.attn_norm\.weight \(in model-0000"):
        _load(d)


def test_index_may_omit_tensors_the_loader_ignores(fp8, tmp_path):
    """A shard may hold tensors the loader skips (the MTP block's own embedding and head
    copies) without the index listing them."""
    d = _copy(fp8, tmp_path / "ck")
    idx = json.load(open(os.path.join(fp8, INDEX)))
    shard = os.path.join(d, SHARD2)
    with safe_open(shard, "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    t["mtp.0.emb.tok_emb.weight"] = torch.zeros(4, 4)
    from dsv4.checkpoint import official_name
    assert official_name("mtp.0.emb.tok_emb.weight") is None
    os.unlink(shard)
    save_file(t, shard, metadata={"format": "pt"})
    _load(d)                                               # loads: the tensor is ignored
    idx["weight_map"]["mtp.0.emb.tok_emb.weight"] = SHARD2  # listed or not, alike
    os.unlink(os.path.join(d, INDEX))
    json.dump(idx, open(os.path.join(d, INDEX), "w"))
    _load(d)


@pytest.mark.parametrize("code", [0x7F, 0xFF])
def test_nan_fp8_weight_codes_are_refused(fp8, tmp_path, code):
    d = _copy(fp8, tmp_path / "ck")
    shard = json.load(open(os.path.join(d, INDEX)))["weight_map"]["layers.0.attn.wq_b.weight"]
    with safe_open(os.path.join(d, shard), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    w = t["layers.0.attn.wq_b.weight"].view(torch.uint8).clone()
    w[3, 5] = code
    t["layers.0.attn.wq_b.weight"] = w.view(torch.float8_e4m3fn)
    os.unlink(os.path.join(d, shard))
    save_file(t, os.path.join(d, shard), metadata={"format": "pt"})
    for weights in ("dequant", "native"):
        with pytest.raises(CheckpointError, match=rf"layers\.0\.attn\.wq_b\.weight in {shard}: 1 "
                           r"NaN code\(s\).*at \[3, 5\]"):
            _load(d, weights=weights, num_layers=1)
