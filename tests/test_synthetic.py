"""Random official-format checkpoints (dsv4.synthetic, `dsv4 make-checkpoint`) and the streaming
safetensors writer they use (dsv4.convert.write_safetensors / write_sharded)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dsv4 import cli
from dsv4.checkpoint import tensor_specs
from dsv4.config import ModelConfig
from dsv4.convert import ConvertError, _Entry, read_checkpoint_index, write_safetensors
from dsv4.model import Model
from dsv4.quant import fp4_pack, fp4_unpack, fp8_block_quantize
from dsv4.synthetic import checkpoint_config, make_checkpoint, official_order, synthetic_tensor
from dsv4.tokenizer import default_tokenizer_path

from _testdata import GOLDEN_FP8, checkpoint_tensors as _tensors, needs_golden_fp8  # noqa: E402


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture(scope="module")
def golden_like(tmp_path_factory):
    """A 2-shard random checkpoint of the golden_fp8 config."""
    if not os.path.isdir(GOLDEN_FP8):
        pytest.skip(f"golden_fp8 not found at {GOLDEN_FP8}")
    out = tmp_path_factory.mktemp("golden_like")
    files = make_checkpoint(ModelConfig.from_json(GOLDEN_FP8), out, n_shards=2, seed=11)
    return out, files


# ------------------------------------------------------------------------------ layout


@needs_golden_fp8
def test_layout_matches_golden_fp8(golden_like):
    out, files = golden_like
    assert set(files) == {"config.json", "generation_config.json", "tokenizer.json",
                          "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                          "model.safetensors.index.json"}
    assert sorted(os.listdir(out)) == sorted(files)
    ours, gold = read_checkpoint_index(str(out)), read_checkpoint_index(GOLDEN_FP8)
    assert {n: m[1:] for n, m in ours.items()} == {n: m[1:] for n, m in gold.items()}
    with open(out / "model.safetensors.index.json") as f:
        idx = json.load(f)
    with open(f"{GOLDEN_FP8}/model.safetensors.index.json") as f:
        gidx = json.load(f)
    assert list(idx["weight_map"]) == list(gidx["weight_map"])       # release order
    assert idx["metadata"]["total_size"] == gidx["metadata"]["total_size"]
    assert set(idx["weight_map"].values()) == {"model-00001-of-00002.safetensors",
                                               "model-00002-of-00002.safetensors"}
    for name, file in idx["weight_map"].items():
        assert ours[name][0].endswith(file)
    with safe_open(str(out / "model-00001-of-00002.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


@needs_golden_fp8
def test_config_json_matches_golden(golden_like):
    out, _ = golden_like
    with open(out / "config.json") as f:
        ours = json.load(f)
    with open(f"{GOLDEN_FP8}/config.json") as f:
        gold = json.load(f)
    assert ModelConfig.from_json(out) == ModelConfig.from_json(GOLDEN_FP8)
    assert ours["quantization_config"] == gold["quantization_config"]
    assert ours["expert_dtype"] == "fp4" and "quant_sim" not in ours
    for key in ("architectures", "model_type", "compress_ratios", "rope_scaling",
                "num_nextn_predict_layers", "num_hash_layers", "torch_dtype"):
        assert ours[key] == gold[key], key
    with open(out / "generation_config.json") as f:
        assert json.load(f)["eos_token_id"] == 1


def test_tokenizer_is_copied(golden_like):
    out, _ = golden_like
    assert (out / "tokenizer.json").read_bytes() == default_tokenizer_path().read_bytes()


# ------------------------------------------------------------------------------ values


@needs_golden_fp8
def test_values_follow_the_rules_and_the_seed(golden_like):
    out, _ = golden_like
    cfg = ModelConfig.from_json(GOLDEN_FP8)
    t = _tensors(out)
    specs = tensor_specs(cfg, "fp8")
    # FP8 linear: exactly the block quantisation of the drawn weight.
    w = synthetic_tensor(cfg, "layers.1.attn.wq_b.weight", (512, 128), seed=11)
    q, s = fp8_block_quantize(w)
    assert torch.equal(_bits(t["layers.1.attn.wq_b.weight"]), _bits(q))
    assert torch.equal(_bits(t["layers.1.attn.wq_b.scale"]), _bits(s))
    assert abs(w.std().item() - 128 ** -0.5) < 0.01          # N(0, 1/in_features)
    # FP4 expert: exactly fp4_pack of the drawn [out, in] weight.
    w = synthetic_tensor(cfg, "layers.2.ffn.experts.5.w2.weight", (128, 128), seed=11)
    q, s = fp4_pack(w)
    assert torch.equal(t["layers.2.ffn.experts.5.w2.weight"], q)
    assert torch.equal(_bits(t["layers.2.ffn.experts.5.w2.scale"]), _bits(s))
    assert torch.allclose(fp4_unpack(q, s, torch.float32), w, atol=0.2 * w.abs().max().item())
    # Norms near 1 but not constant; mHC scales 1; tid2eid rows = distinct valid experts.
    for n in ("layers.0.attn_norm.weight", "layers.3.attn.kv_norm.weight", "mtp.0.enorm.weight",
              "norm.weight", "layers.1.attn.indexer.compressor.norm.weight"):
        v = t[n].float()
        assert (v - 1).abs().max() < 0.15 and v.std() > 0.005, n
    assert torch.equal(t["layers.4.hc_ffn_scale"], torch.ones(3))
    tid = t["layers.1.ffn.gate.tid2eid"]
    assert tid.dtype == torch.int64 and tid.shape == (cfg.vocab_size, cfg.n_activated_experts)
    assert int(tid.min()) >= 0 and int(tid.max()) < cfg.n_routed_experts
    assert bool((tid[:, 0] != tid[:, 1]).all())
    assert len({tuple(r) for r in tid[:200].tolist()}) > 20   # not one fixed routing
    assert t["layers.2.ffn.gate.bias"].abs().max() < 0.1 and t["layers.2.ffn.gate.bias"].std() > 0
    assert t["layers.0.attn.attn_sink"].std() > 0
    assert all(t[n].dtype == d for n, (_, d) in specs.items())
    assert all(bool(torch.isfinite(v.float()).all()) for v in t.values() if v.dtype != torch.int8)


def test_tensors_do_not_depend_on_shards_but_on_seed(tmp_path):
    cfg = ModelConfig.tiny()
    make_checkpoint(cfg, tmp_path / "a", n_shards=1, seed=3, tokenizer=False)
    make_checkpoint(cfg, tmp_path / "b", n_shards=4, seed=3, tokenizer=False)
    make_checkpoint(cfg, tmp_path / "c", n_shards=1, seed=4, tokenizer=False)
    a, b, c = (_tensors(tmp_path / x) for x in "abc")
    assert sorted(os.listdir(tmp_path / "a")) == ["config.json", "generation_config.json",
                                                  "model.safetensors"]
    assert len([f for f in os.listdir(tmp_path / "b") if f.endswith(".safetensors")]) == 4
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(_bits(a[n]), _bits(b[n])) for n in a)
    differ = [n for n in a if not torch.equal(_bits(a[n]), _bits(c[n]))]
    assert "embed.weight" in differ and "layers.1.ffn.experts.3.w1.weight" in differ


def test_bf16_format(tmp_path):
    cfg = ModelConfig.tiny()
    make_checkpoint(cfg, tmp_path, fmt="bf16", seed=2, tokenizer=False)
    t = _tensors(tmp_path)
    assert t.keys() == tensor_specs(cfg, "bf16").keys()
    assert not any(n.endswith(".scale") for n in t)
    w = t["layers.1.ffn.experts.2.w3.weight"]
    assert w.dtype == torch.bfloat16 and w.shape == (cfg.moe_inter_dim, cfg.dim)
    ref = synthetic_tensor(cfg, "layers.1.ffn.experts.2.w3.weight", w.shape, seed=2)
    assert torch.equal(w, ref.bfloat16())
    with open(tmp_path / "config.json") as f:
        d = json.load(f)
    assert "quantization_config" not in d and "expert_dtype" not in d
    assert ModelConfig.from_json(tmp_path).dtype == "bf16"


def test_fp8_experts_option(tmp_path):
    cfg = ModelConfig.tiny()
    make_checkpoint(cfg, tmp_path, expert_dtype="fp8", tokenizer=False)
    specs = read_checkpoint_index(str(tmp_path))
    assert specs["layers.0.ffn.experts.0.w1.weight"][1:] == ("F8_E4M3", [128, 128])
    assert specs["layers.0.ffn.experts.0.w1.scale"][1:] == ("F8_E8M0", [1, 1])
    assert ModelConfig.from_json(tmp_path).expert_dtype == "fp8"
    x = _logits(tmp_path, torch.randint(0, cfg.vocab_size, (1, 8)), quant_sim=False)
    assert bool(torch.isfinite(x).all())


@needs_golden_fp8
def test_official_order_on_golden_names():
    with open(f"{GOLDEN_FP8}/model.safetensors.index.json") as f:
        names = list(json.load(f)["weight_map"])
    shuffled = [names[i] for i in torch.randperm(len(names)).tolist()]
    cfg_order = list(tensor_specs(ModelConfig.from_json(GOLDEN_FP8)))
    assert official_order(cfg_order) == names
    # The rule is a sort on names given the spec order: the spec order is what matters.
    assert sorted(official_order(shuffled)) == sorted(names)


# ------------------------------------------------------------------------------ a sane model


def _logits(path, ids, **over):
    m = Model.from_pretrained(path, device="cpu", dtype=torch.float32, progress=False, **over)
    with torch.no_grad():
        return m(ids)


def test_random_checkpoint_gives_a_sane_model(tmp_path):
    """Loaded logits are finite with O(1) spread, like Model's own init; FP8/FP4 storage
    stays close to the bf16 twin of the same seed."""
    cfg = ModelConfig.tiny()
    make_checkpoint(cfg, tmp_path / "fp8", seed=7, n_shards=2, tokenizer=False)
    make_checkpoint(cfg, tmp_path / "bf16", fmt="bf16", seed=7, tokenizer=False)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    # tiny's q_lora_rank 64 does not fit the 1x128 FP8 activation blocks: quant_sim off.
    a = _logits(tmp_path / "fp8", ids, quant_sim=False)
    b = _logits(tmp_path / "bf16", ids, quant_sim=False)
    for x in (a, b):
        assert bool(torch.isfinite(x).all()) and 0.3 < x.std().item() < 3.0
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0).item()
    assert cos > 0.9, cos
    torch.manual_seed(0)
    with torch.no_grad():
        ref = Model(cfg)(ids)
    assert 0.3 < ref.std().item() / a.std().item() < 3.0


def test_golden_like_checkpoint_runs_with_quant_sim(golden_like):
    out, _ = golden_like
    ids = torch.randint(0, 4096, (1, 40))
    x = _logits(out, ids)                  # quant_sim on (dims fit the 128-blocks)
    y = _logits(out, ids, quant_sim=False)
    assert bool(torch.isfinite(x).all()) and 0.3 < x.std().item() < 3.0
    assert 0 < (x - y).abs().max().item() < 0.5 * y.abs().max().item()


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"fmt": "fp16"}, ValueError, "fmt must be"),
    ({"expert_dtype": "int4"}, ValueError, "expert_dtype"),
    ({"n_shards": 0}, ValueError, "shards"),
    ({"n_shards": 10 ** 6}, ValueError, "exceeds"),
    ({"seed": -1}, ValueError, "seed"),
    ({"tokenizer": "/nonexistent/tokenizer.json"}, FileNotFoundError, "tokenizer"),
])
def test_bad_arguments(tmp_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make_checkpoint(ModelConfig.tiny(), tmp_path / "x", **{"tokenizer": False, **kwargs})
    assert not (tmp_path / "x").exists() or not os.listdir(tmp_path / "x")


def test_refuses_a_tokenizer_that_generate_could_not_use(tmp_path):
    """A file that is not a tokenizers tokenizer.json, or one with fewer tokens than the model's
    vocab_size, is refused before anything is written (dsv4 generate would fail on it)."""
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        make_checkpoint(ModelConfig.tiny(), tmp_path / "x", tokenizer=bad)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match=r"129280 tokens .* vocab_size 129281"):
        make_checkpoint(ModelConfig.tiny(vocab_size=129281), tmp_path / "y",
                        tokenizer=default_tokenizer_path())
    assert not (tmp_path / "y").exists()


def test_overwrite_without_tokenizer_removes_the_old_one(tmp_path):
    """Overwriting a checkpoint with tokenizer=False (--no-tokenizer) leaves no tokenizer.json
    of the old checkpoint behind (dsv4 generate would load it with the new weights)."""
    make_checkpoint(ModelConfig.tiny(), tmp_path, tokenizer=default_tokenizer_path())
    assert (tmp_path / "tokenizer.json").exists()
    files = make_checkpoint(ModelConfig.tiny(), tmp_path, tokenizer=False, overwrite=True)
    assert "tokenizer.json" not in files and not (tmp_path / "tokenizer.json").exists()
    assert sorted(os.listdir(tmp_path)) == sorted(files)


@pytest.mark.parametrize("before, after", [(3, 1), (3, 2), (1, 3)])
def test_overwrite_with_another_shard_count_leaves_no_old_weights(tmp_path, before, after):
    """Overwriting with fewer shards, one file or shards over one file leaves none of the old
    weight files behind (the new index does not list them: they would only hold the disk),
    as save_pretrained replaces a checkpoint; other files stay."""
    make_checkpoint(ModelConfig.tiny(), tmp_path, tokenizer=False, n_shards=before)
    (tmp_path / "notes.txt").write_text("kept")
    files = make_checkpoint(ModelConfig.tiny(), tmp_path, tokenizer=False, n_shards=after,
                            overwrite=True)
    assert sorted(os.listdir(tmp_path)) == sorted(files + ["notes.txt"])
    assert len([f for f in files if f.endswith(".safetensors")]) == after


def test_refuses_non_empty_dir_and_fp4_misfit(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        make_checkpoint(ModelConfig.tiny(), tmp_path, tokenizer=False)
    assert os.listdir(tmp_path) == ["keep.txt"]
    with pytest.raises(ValueError, match="in_features % 32 == 0"):
        make_checkpoint(ModelConfig.tiny(moe_inter_dim=48), tmp_path / "y", tokenizer=False)


def test_checkpoint_config_rejects_unknown_format():
    with pytest.raises(ValueError, match="fmt"):
        checkpoint_config(ModelConfig.tiny(), "int8")


def test_synthetic_tensor_unknown_name():
    with pytest.raises(ValueError, match="no synthetic rule"):
        synthetic_tensor(ModelConfig.tiny(), "layers.0.attn.mystery", (3,))


# ------------------------------------------------------------------------------ writer


def test_streaming_writer_round_trip(tmp_path):
    ts = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).bfloat16(),
        "c": torch.randint(-5, 5, (2, 3), dtype=torch.int64),
        "d": fp8_block_quantize(torch.randn(130, 3))[0],
        "e": torch.randint(0, 255, (4, 6), dtype=torch.uint8).view(torch.float8_e8m0fnu),
        "f": torch.randint(-128, 127, (4, 6), dtype=torch.int8).view(torch.float4_e2m1fn_x2),
        "g": torch.tensor(2.5),
    }
    from dsv4.convert import DTYPE_NAMES, _file_shape
    entries = [_Entry(n, DTYPE_NAMES[t.dtype], _file_shape(t), (lambda t=t: t)) for n, t in ts.items()]
    path = str(tmp_path / "x.safetensors")
    write_safetensors(path, entries, {"format": "pt"})
    back = load_file(path)
    assert back.keys() == ts.keys()
    for n, t in ts.items():
        assert back[n].dtype == t.dtype and back[n].shape == t.shape, n
        assert torch.equal(_bits(back[n]), _bits(t)), n
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    assert header_len % 8 == 0


def test_streaming_writer_rejects_mismatch(tmp_path):
    path = str(tmp_path / "x.safetensors")
    bad = [_Entry("a", "F32", [2, 2], lambda: torch.zeros(2, 3))]
    with pytest.raises(ConvertError, match="declared F32"):
        write_safetensors(path, bad)
    assert not os.listdir(tmp_path)                      # no partial file left
    with pytest.raises(ConvertError, match="duplicate"):
        write_safetensors(path, [_Entry("a", "F32", [1], lambda: torch.ones(1))] * 2)


# ------------------------------------------------------------------------------ CLI


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_cli_make_checkpoint(tmp_path, capsys):
    out = tmp_path / "ck"
    assert cli.main(["make-checkpoint", "--config", "tiny", "--out", str(out), "--shards", "3",
                     "--seed", "5"]) == 0
    msg = capsys.readouterr().out
    assert f"wrote {out}: fp8 format, 3 shard(s), seed 5" in msg
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors.index.json").is_file()
    assert ModelConfig.from_json(out, quant_sim=False) == ModelConfig.tiny(
        dtype="fp8", expert_dtype="fp4", quant_sim=False)
    ref = tmp_path / "ref"
    make_checkpoint(ModelConfig.tiny(), ref, seed=5, tokenizer=False)
    a, b = _tensors(out), _tensors(ref)
    assert a.keys() == b.keys() and all(torch.equal(_bits(a[n]), _bits(b[n])) for n in a)


@needs_golden_fp8
def test_cli_make_checkpoint_json_config_bf16(tmp_path, capsys):
    out = tmp_path / "ck"
    assert cli.main(["make-checkpoint", "--config", f"{GOLDEN_FP8}/config.json", "--out",
                     str(out), "--format", "bf16", "--no-tokenizer"]) == 0
    assert not (out / "tokenizer.json").exists() and (out / "model.safetensors").is_file()
    assert read_checkpoint_index(str(out))["layers.0.attn.wq_a.weight"][1] == "BF16"


@pytest.mark.parametrize("extra, message", [
    (["--shards", "0"], "expected an integer >= 1"),
    (["--shards", "two"], "expected an integer >= 1"),
    (["--format", "fp16"], "invalid choice: 'fp16'"),
    (["--seed", "-3"], "must be in [0, 2**63)"),
    (["--seed", str(2 ** 63)], "must be in [0, 2**63)"),
    (["--no-tokenizer", "--tokenizer", "x.json"], "not allowed with --tokenizer"),
])
def test_cli_make_checkpoint_usage_errors(tmp_path, capsys, extra, message):
    err = _usage_error(capsys, ["make-checkpoint", "--config", "tiny", "--out",
                                str(tmp_path / "o"), *extra])
    assert message in err and "usage: dsv4 make-checkpoint" in err
    assert not (tmp_path / "o").exists()


def test_cli_make_checkpoint_errors(tmp_path, capsys):
    assert "--out" in _usage_error(capsys, ["make-checkpoint", "--config", "tiny"])
    err = _usage_error(capsys, ["make-checkpoint", "--config", "/nope.json", "--out", str(tmp_path)])
    assert "argument --config: expected tiny, flash, pro or a config.json" in err
    (tmp_path / "f.txt").write_text("x")
    assert cli.main(["make-checkpoint", "--config", "tiny", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "dsv4 make-checkpoint: error:" in err and "not empty" in err
    (tmp_path / "bad.json").write_text("{}")
    assert cli.main(["make-checkpoint", "--config", str(tmp_path / "bad.json"), "--out",
                     str(tmp_path / "o")]) == 1
    assert "missing required keys" in capsys.readouterr().err


# ------------------------------------------------------------------------------ size, space, atomic
def _data_bytes(out) -> int:
    from dsv4.checkpoint_io import SafetensorsFile

    total = 0
    for f in os.listdir(out):
        if f.endswith(".safetensors"):
            with SafetensorsFile(str(out / f)) as s:
                total += sum(e - b for _, _, (b, e) in s.tensors.values())
    return total


def test_cli_prints_the_size_before_writing(tmp_path, capsys):
    out = tmp_path / "ck"
    assert cli.main(["make-checkpoint", "--config", "tiny", "--out", str(out), "--shards", "2",
                     "--no-tokenizer"]) == 0
    lines = capsys.readouterr().out.splitlines()
    import re
    m = re.fullmatch(rf"writing {out}: ([\d,]+) tensors, [\d.]+ MB \(([\d,]+) bytes\) of weights "
                     r"in 2 shard\(s\); [\d.]+ [MG]B free on .*", lines[0])
    assert m, lines
    assert int(m.group(2).replace(",", "")) == _data_bytes(out)
    assert int(m.group(1).replace(",", "")) == len(tensor_specs(ModelConfig.tiny()))
    assert lines[-1].startswith(f"wrote {out}")


def test_free_space_is_checked_before_writing(tmp_path, monkeypatch):
    from collections import namedtuple

    from dsv4 import synthetic

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(synthetic.shutil, "disk_usage", lambda p: usage(10 ** 9, 0, 10 ** 6))
    out = tmp_path / "ck"
    with pytest.raises(ValueError, match=r"not enough free space for the checkpoint: it needs "
                                         r"[\d.]+ MB \([\d,]+ bytes\) plus 0.27 GB of margin, "
                                         r"but .* has 1.0 MB free"):
        make_checkpoint(ModelConfig.tiny(), out, tokenizer=False)
    assert not out.exists()


@pytest.mark.parametrize("tmpfile", [True, False])
@pytest.mark.parametrize("n_shards", [1, 3])
def test_an_interrupted_write_leaves_nothing(tmp_path, monkeypatch, tmpfile, n_shards):
    """Ctrl-C (or SIGTERM, turned into the same unwinding) in the middle of a shard: no
    partial file and none of the files of this call remain; with O_TMPFILE (Linux) and without
    (the .partial fallback)."""
    from dsv4 import synthetic

    if not tmpfile:
        monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    real = synthetic._entries
    count = {"n": 0}

    def entries(*a, **k):
        out = real(*a, **k)
        e = out[len(out) * 2 // 3]
        produce = e.produce

        def boom():
            count["n"] += 1
            if count["n"] == 1:
                raise KeyboardInterrupt
            return produce()
        e.produce = boom
        return out

    monkeypatch.setattr(synthetic, "_entries", entries)
    out = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        make_checkpoint(ModelConfig.tiny(), out, n_shards=n_shards)
    assert not out.exists()
    # Into an existing directory holding a user's file: only that file is left.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    count["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        make_checkpoint(ModelConfig.tiny(), out, n_shards=n_shards, overwrite=True)
    assert os.listdir(out) == ["notes.txt"]
    # Overwriting a checkpoint: the old config.json goes first, so a half-replaced directory
    # never loads as a checkpoint.
    count["n"] = 1                                  # no interruption
    make_checkpoint(ModelConfig.tiny(), out, n_shards=n_shards, overwrite=True)
    count["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        make_checkpoint(ModelConfig.tiny(), out, n_shards=n_shards, seed=3, overwrite=True)
    assert not (out / "config.json").exists()
    assert not [f for f in os.listdir(out) if "partial" in f or f.endswith(".tmp")]


def _writing_into(pid: int, out: str) -> bool:
    """Whether process ``pid`` holds a file of directory ``out`` open (an O_TMPFILE shows as
    ``out/#inode (deleted)``, a fallback file under its name)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(out + os.sep):
                return True
        except OSError:
            pass
    return False


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_killed_make_checkpoint_leaves_no_partial_file(tmp_path, sig):
    import signal
    import subprocess
    import sys
    import time

    import dsv4

    cfg = tmp_path / "config.json"
    c, d = checkpoint_config(ModelConfig.tiny(dim=512, n_routed_experts=16), "fp8")
    cfg.write_text(json.dumps(d))
    out = str(tmp_path / "ck")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(dsv4.__file__)))
    p = subprocess.Popen([sys.executable, "-m", "dsv4.cli", "make-checkpoint", "--config",
                          str(cfg), "--out", out, "--shards", "2", "--no-tokenizer"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not _writing_into(p.pid, out) and p.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    if p.poll() is not None:
        pytest.skip(f"make-checkpoint finished before it could be interrupted: {p.stderr.read()}")
    os.kill(p.pid, getattr(signal, sig))
    p.communicate(timeout=120)
    left = os.listdir(out) if os.path.isdir(out) else []
    assert not [f for f in left if "partial" in f or f.endswith(".tmp")], left
    assert "config.json" not in left
    if sig == "SIGTERM":
        assert p.returncode == 130 and left == [], (p.returncode, left)
    for f in left:                                   # whatever SIGKILL left is complete
        assert f.endswith(".safetensors"), left
        read_checkpoint_index(os.path.join(out))     # headers and sizes consistent
