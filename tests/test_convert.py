"""Model-parallel conversion (dsv4.convert, `dsv4 convert`; architecture.md §12.4)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from dsv4 import cli
from dsv4.config import ModelConfig
from dsv4.convert import (ConvertError, check_model_parallel, convert, load_model_parallel,
                          official_name, read_checkpoint_index, split_rule, unshard)
from dsv4.model import Model
from dsv4.quant import fp4_unpack, fp8_block_dequantize
from dsv4.synthetic import make_checkpoint

from _testdata import GOLDEN_FP8, checkpoint_tensors as _tensors, needs_golden_fp8  # noqa: E402
# ModelConfig.tiny() with low-rank dims of 128, so that wo_b (in = o_groups x o_lora_rank = 256)
# splits over 2 ranks on whole 128-wide FP8 scale blocks (plain tiny has 128: see the error test).
TINY_MP = dict(q_lora_rank=128, o_lora_rank=128)  # the tiny preset's own values


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _rank(path, r, mp) -> dict[str, torch.Tensor]:
    with safe_open(str(path / f"model{r}-mp{mp}.safetensors"), framework="pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    make_checkpoint(ModelConfig.tiny(**TINY_MP), d, n_shards=2, seed=21)
    return d


@pytest.fixture(scope="module")
def mp2(src, tmp_path_factory):
    d = tmp_path_factory.mktemp("mp2") / "out"
    files = convert(src, d, 2)
    return d, files


# ------------------------------------------------------------------------------ rules


@pytest.mark.parametrize("name, rule", [
    ("embed.weight", ("split", 0)),
    ("head.weight", ("split", 0)),
    ("layers.3.attn.wq_b.weight", ("split", 0)),
    ("layers.3.attn.wq_b.scale", ("split", 0)),
    ("layers.3.attn.indexer.wq_b.scale", ("split", 0)),
    ("layers.3.attn.wo_a.weight", ("split", 0)),
    ("layers.3.attn.attn_sink", ("split", 0)),
    ("layers.3.attn.indexer.weights_proj.weight", ("split", 0)),
    ("layers.3.attn.wo_b.weight", ("split", 1)),
    ("layers.3.attn.wo_b.scale", ("split", 1)),
    ("layers.3.ffn.experts.17.w2.scale", ("expert", 17)),
    ("mtp.0.ffn.experts.5.w1.weight", ("expert", 5)),
    ("layers.3.ffn.shared_experts.w1.weight", ("replicate", -1)),
    ("layers.3.attn.wq_a.weight", ("replicate", -1)),
    ("layers.3.attn.wkv.scale", ("replicate", -1)),
    ("layers.3.attn.compressor.ape", ("replicate", -1)),
    ("layers.3.attn.indexer.compressor.wkv.weight", ("replicate", -1)),
    ("layers.1.ffn.gate.tid2eid", ("replicate", -1)),
    ("layers.3.ffn.gate.bias", ("replicate", -1)),
    ("layers.3.hc_attn_fn", ("replicate", -1)),
    ("mtp.0.e_proj.weight", ("replicate", -1)),
    ("norm.weight", ("replicate", -1)),
])
def test_split_rule(name, rule):
    assert split_rule(name) == rule


def test_official_name():
    assert official_name("model.layers.0.self_attn.q_a_proj.weight_scale_inv") == "layers.0.attn.wq_a.scale"
    assert official_name("model.layers.0.mlp.gate.e_score_correction_bias") == "layers.0.ffn.gate.bias"
    assert official_name("model.embed_tokens.weight") == "embed.weight"
    assert official_name("mtp.0.emb.weight") is None and official_name("mtp.0.head.weight") is None
    assert official_name("layers.2.attn.wo_b.scale") == "layers.2.attn.wo_b.scale"


# ------------------------------------------------------------------------------ MP = 2


def test_rank_files_follow_the_official_rules(src, mp2):
    out, files = mp2
    assert files == ["model0-mp2.safetensors", "model1-mp2.safetensors"]
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(os.listdir(out))
    cfg = ModelConfig.tiny(**TINY_MP)
    orig = _tensors(src)
    ranks = [_rank(out, r, 2) for r in range(2)]
    E = cfg.n_routed_experts
    for r, t in enumerate(ranks):
        experts = {int(n.split(".")[4]) for n in t if ".ffn.experts." in n}
        assert experts == set(range(r * E // 2, (r + 1) * E // 2))
        # Names are the official ones, unchanged; wo_a lost its scale.
        assert not any(n.endswith("wo_a.scale") for n in t)
        assert set(t) == {n for n in orig if not n.endswith("wo_a.scale") and
                          (split_rule(n)[0] != "expert" or split_rule(n)[1] in experts)}
        h = cfg.n_heads * cfg.head_dim // 2
        assert torch.equal(_bits(t["layers.1.attn.wq_b.weight"]),
                           _bits(orig["layers.1.attn.wq_b.weight"][r * h:(r + 1) * h]))
        assert torch.equal(_bits(t["layers.1.attn.wq_b.scale"]),
                           _bits(orig["layers.1.attn.wq_b.scale"][r * h // 128:(r + 1) * h // 128]))
        assert torch.equal(_bits(t["layers.2.attn.wo_b.weight"]),
                           _bits(orig["layers.2.attn.wo_b.weight"][:, r * 128:(r + 1) * 128]))
        assert t["layers.2.attn.wo_b.scale"].shape == (1, 1)
        v = cfg.vocab_size // 2
        assert torch.equal(t["embed.weight"], orig["embed.weight"][r * v:(r + 1) * v])
        assert torch.equal(t["head.weight"], orig["head.weight"][r * v:(r + 1) * v])
        assert torch.equal(t["layers.3.attn.attn_sink"], orig["layers.3.attn.attn_sink"][r * 2:(r + 1) * 2])
        k = cfg.index_n_heads // 2
        assert torch.equal(t["layers.3.attn.indexer.weights_proj.weight"],
                           orig["layers.3.attn.indexer.weights_proj.weight"][r * k:(r + 1) * k])
        assert torch.equal(t["layers.1.ffn.gate.tid2eid"], orig["layers.1.ffn.gate.tid2eid"])
        assert torch.equal(_bits(t["layers.3.ffn.shared_experts.w2.weight"]),
                           _bits(orig["layers.3.ffn.shared_experts.w2.weight"]))
        # wo_a: de-quantised to bf16, then split along dim 0.
        wo_a = fp8_block_dequantize(orig["mtp.0.attn.wo_a.weight"], orig["mtp.0.attn.wo_a.scale"],
                                    torch.bfloat16)
        n = wo_a.shape[0] // 2
        assert t["mtp.0.attn.wo_a.weight"].dtype == torch.bfloat16
        assert torch.equal(t["mtp.0.attn.wo_a.weight"], wo_a[r * n:(r + 1) * n])
        # FP4 experts stored as float4_e2m1fn_x2 (same bytes), scales unchanged.
        e = r * E // 2 + 1
        w = t[f"layers.0.ffn.experts.{e}.w1.weight"]
        assert w.dtype == torch.float4_e2m1fn_x2
        assert torch.equal(w.view(torch.int8), orig[f"layers.0.ffn.experts.{e}.w1.weight"])
    with safe_open(str(out / "model0-mp2.safetensors"), framework="pt") as f:
        assert f.get_slice("layers.0.ffn.experts.0.w1.weight").get_dtype() == "F4"


def test_round_trip_is_exact(src, mp2):
    out, _ = mp2
    orig, back = _tensors(src), load_model_parallel(out)
    assert set(back) == {n for n in orig if not n.endswith("wo_a.scale")}
    for name, t in orig.items():
        if name.endswith("wo_a.scale"):
            continue
        if name.endswith("wo_a.weight"):
            ref = fp8_block_dequantize(t, orig[name[:-6] + "scale"], torch.bfloat16)
            assert torch.equal(back[name], ref), name
            continue
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(_bits(back[name]), _bits(t)), name


def test_expert_fp8_round_trip(src, tmp_path):
    convert(src, tmp_path / "o", 2, expert_fp8=True)
    orig, back = _tensors(src), load_model_parallel(tmp_path / "o")
    n_fp8 = 0
    for name, t in orig.items():
        if split_rule(name)[0] == "expert" and name.endswith(".weight"):
            s = name[:-6] + "scale"
            q, qs = back[name], back[s]
            assert q.dtype == torch.float8_e4m3fn and q.shape == (t.shape[0], 2 * t.shape[1])
            assert qs.dtype == torch.float8_e8m0fnu
            assert qs.shape == (-(-q.shape[0] // 128), -(-q.shape[1] // 128))
            # Lossless re-encoding of these random weights (§12.4).
            assert torch.equal(fp8_block_dequantize(q, qs, torch.float32),
                               fp4_unpack(t, orig[s], torch.float32)), name
            n_fp8 += 1
        elif split_rule(name)[0] != "expert" and "wo_a" not in name:
            assert torch.equal(_bits(back[name]), _bits(t)), name
    assert n_fp8 == 3 * 8 * 5                             # 3 projections x 8 experts x 5 blocks


def test_unsharded_checkpoint_loads_to_identical_logits(src, mp2, tmp_path):
    """unshard(MP dir) -> Model.from_pretrained gives bit-identical logits: wo_a in bf16 is its
    exact de-quantisation, everything else is the original bytes."""
    out, _ = mp2
    unshard(out, tmp_path / "u", n_shards=2)
    assert (tmp_path / "u" / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 129280, (2, 20))
    logits = []
    for d in (src, tmp_path / "u"):
        m = Model.from_pretrained(d, device="cpu", dtype=torch.float32, quant_sim=False,
                                  progress=False)
        with torch.no_grad():
            logits.append(m(ids))
    assert torch.equal(logits[0], logits[1])


@needs_golden_fp8
def test_golden_fp8_mp1_round_trip(tmp_path, capsys):
    convert(GOLDEN_FP8, tmp_path / "o", 1, progress=True)
    assert "rank 0/1" in capsys.readouterr().err
    assert sorted(f for f in os.listdir(tmp_path / "o") if f.endswith(".safetensors")) == [
        "model0-mp1.safetensors"]
    orig, back = _tensors(GOLDEN_FP8), load_model_parallel(tmp_path / "o")
    for name, t in orig.items():
        if "wo_a" not in name:
            assert torch.equal(_bits(back[name]), _bits(t)), name


# ------------------------------------------------------------------------------ errors


def test_bad_model_parallel_is_a_clear_error(src, tmp_path):
    with pytest.raises(ConvertError) as e:
        convert(src, tmp_path / "o", 3)
    msg = str(e.value)
    assert "--model-parallel 3 must divide" in msg
    assert "n_routed_experts (8)" in msg and "n_heads (4)" in msg and "o_groups (2)" in msg
    with pytest.raises(ConvertError, match=r"must divide o_groups \(2\)"):
        convert(src, tmp_path / "o", 4)
    with pytest.raises(ConvertError, match="integer >= 1"):
        convert(src, tmp_path / "o", 0)
    assert not (tmp_path / "o").exists()


def test_unaligned_fp8_split_is_a_clear_error(tmp_path):
    """o_lora_rank 64: wo_b has in_features 2·64 = 128, so 2 ranks would cut a 128-wide scale
    block."""
    make_checkpoint(ModelConfig.tiny(o_lora_rank=64, quant_sim=False), tmp_path / "s",
                    tokenizer=False)
    with pytest.raises(ConvertError, match=r"wo_b\.weight \[128, 128\]: 64 per rank along dim 1 "
                                           r"is not a multiple of the 128-wide FP8 scale blocks"):
        convert(tmp_path / "s", tmp_path / "o", 2)
    assert not (tmp_path / "o").exists()


def test_check_model_parallel_names_every_failure():
    check_model_parallel(8, {"n_routed_experts": 256, "num_attention_heads": 64, "o_groups": 8,
                             "index_n_heads": 64, "vocab_size": 129280})
    with pytest.raises(ConvertError, match=r"o_groups \(8\)") as e:
        check_model_parallel(16, {"n_routed_experts": 256, "num_attention_heads": 64,
                                  "o_groups": 8, "vocab_size": 129280})
    assert "n_heads" not in str(e.value)
    with pytest.raises(ConvertError, match=r"vocab_size \(129280\)"):
        check_model_parallel(512, {"vocab_size": 129280})


def test_output_directory_checks(src, mp2, tmp_path):
    with pytest.raises(ConvertError, match="differ"):
        convert(src, src, 1)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ConvertError, match="not empty"):
        convert(src, tmp_path, 2)
    convert(src, tmp_path, 2, overwrite=True)
    assert (tmp_path / "model1-mp2.safetensors").is_file()
    with pytest.raises(ConvertError, match="not empty"):
        unshard(mp2[0], tmp_path, 1)


def test_output_through_a_link_to_the_input_is_refused(src, mp2, tmp_path):
    """--out naming --in through a symbolic link (or with ``..``) is the same directory: refused
    before anything is written, even with overwrite."""
    def listing(d):
        return sorted((p.name, p.stat().st_size) for p in d.iterdir())

    for d in (src, mp2[0]):
        link = tmp_path / f"link-{d.name}"
        link.symlink_to(d, target_is_directory=True)
        before = listing(d)
        with pytest.raises(ConvertError, match="differ"):
            convert(d, link, 2, overwrite=True)
        with pytest.raises(ConvertError, match="differ"):
            unshard(d, link, 1, overwrite=True)
        with pytest.raises(ConvertError, match="differ"):
            unshard(d, tmp_path / ".." / tmp_path.name / link.name, 1, overwrite=True)
        assert listing(d) == before


def test_reassembly_detects_missing_ranks_and_bad_replicas(mp2, tmp_path):
    import shutil

    from safetensors.torch import save_file

    out, _ = mp2
    d = tmp_path / "d"
    shutil.copytree(out, d)
    os.remove(d / "model1-mp2.safetensors")
    with pytest.raises(ConvertError, match=r"lacks rank files \[1\]"):
        load_model_parallel(d)
    t = _rank(out, 1, 2)
    t["norm.weight"] = t["norm.weight"] + 1
    save_file(t, str(d / "model1-mp2.safetensors"))
    with pytest.raises(ConvertError, match="replicated tensor norm.weight differs"):
        load_model_parallel(d)
    with pytest.raises(ConvertError, match="no model-parallel files"):
        load_model_parallel(tmp_path)


def test_missing_input(tmp_path):
    with pytest.raises(ConvertError, match="not found"):
        convert(tmp_path / "nope", tmp_path / "o", 1)
    with pytest.raises(ConvertError, match="no \\*.safetensors"):
        convert(tmp_path, tmp_path / "o", 1)


# ------------------------------------------------------------------------------ CLI


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_cli_convert(src, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(["convert", "--in", str(src), "--out", str(out), "--model-parallel", "2",
                     "--expert-fp8"]) == 0
    assert "model0-mp2.safetensors, model1-mp2.safetensors" in capsys.readouterr().out
    with safe_open(str(out / "model1-mp2.safetensors"), framework="pt") as f:
        assert f.get_slice("layers.0.ffn.experts.7.w1.weight").get_dtype() == "F8_E4M3"
        assert "layers.0.ffn.experts.0.w1.weight" not in f.keys()


@pytest.mark.parametrize("extra, message", [
    (["--model-parallel", "0"], "expected an integer >= 1"),
    (["--model-parallel", "two"], "expected an integer >= 1"),
    ([], "the following arguments are required: --model-parallel"),
])
def test_cli_convert_usage_errors(src, tmp_path, capsys, extra, message):
    err = _usage_error(capsys, ["convert", "--in", str(src), "--out", str(tmp_path / "o"), *extra])
    assert message in err and "usage: dsv4 convert" in err


def test_cli_convert_errors(src, tmp_path, capsys):
    err = _usage_error(capsys, ["convert", "--in", str(tmp_path / "nope"), "--out",
                                str(tmp_path / "o"), "--model-parallel", "2"])
    assert "argument --in: not a directory" in err
    assert cli.main(["convert", "--in", str(src), "--out", str(tmp_path / "o"),
                     "--model-parallel", "3"]) == 1
    err = capsys.readouterr().err
    assert "dsv4 convert: error: --model-parallel 3 must divide" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_plan_rank_tensors_reassembles_and_reports_every_inconsistency():
    """The rank-file plan shared by `dsv4 convert --unshard` and the expert-parallel loader."""
    import copy

    from dsv4.convert import RankTensor, plan_rank_tensors
    e0, e1 = "layers.0.ffn.experts.0.w1.weight", "layers.0.ffn.experts.1.w1.weight"
    good = [{"embed.weight": ("BF16", [5, 8]), e0: ("F8_E4M3", [4, 8]), "norm.weight": ("F32", [8]),
             "layers.0.attn.wo_b.weight": ("BF16", [8, 3])},
            {"embed.weight": ("BF16", [6, 8]), e1: ("F8_E4M3", [4, 8]), "norm.weight": ("F32", [8]),
             "layers.0.attn.wo_b.weight": ("BF16", [8, 2])}]
    plan, problems = plan_rank_tensors(good)
    assert problems == []
    assert list(plan) == ["embed.weight", e0, "norm.weight", "layers.0.attn.wo_b.weight", e1]
    assert plan["embed.weight"] == RankTensor("split", 0, [0, 1], "BF16", [11, 8])
    assert plan["layers.0.attn.wo_b.weight"] == RankTensor("split", 1, [0, 1], "BF16", [8, 5])
    assert plan[e1] == RankTensor("expert", -1, [1], "F8_E4M3", [4, 8])
    assert plan["norm.weight"] == RankTensor("replicate", -1, [0, 1], "F32", [8])
    bad = copy.deepcopy(good)
    bad[1][e0] = ("F8_E4M3", [4, 8])                        # an expert on two ranks
    del bad[1]["norm.weight"]                               # a replica missing on rank 1
    bad[1]["embed.weight"] = ("BF16", [6, 9])               # a split slice differing off-dim
    bad[0]["layers.0.attn.wo_b.weight"] = ("F32", [8, 3])   # dtypes differing
    bad[0]["final.weight"], bad[1]["final.weight"] = ("F32", [8]), ("F32", [9])  # replicas
    bad[0]["head.weight"] = bad[1]["head.weight"] = ("BF16", [])                 # no dim 0
    plan, problems = plan_rank_tensors(bad)
    assert set(plan) == {e1} and len(problems) == 6
    text = "\n".join(problems)
    for want in (f"{e0} is on ranks [0, 1]", "norm.weight is on ranks [0] only",
                 "embed.weight: rank slices differ in dims other than 0",
                 "layers.0.attn.wo_b.weight has different dtypes",
                 "final.weight: a replicated tensor with different shapes",
                 "head.weight has 0 dims; it is split along dim 0"):
        assert want in text


# ------------------------------------------------------------------------------ bad inputs


def _altered(src, dst, change):
    """A copy of checkpoint ``src`` in ``dst`` whose shards are rewritten by ``change(t)``
    (``t``: one shard's tensors, changed in place)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for f in sorted(os.listdir(dst)):
        if f.endswith(".safetensors"):
            t = load_file(str(dst / f))
            change(t)
            save_file(t, str(dst / f), metadata={"format": "pt"})
    return dst


def _set(name, fn):
    def change(t):
        if name in t:
            t[name] = fn(t[name]).contiguous()
    return change


@pytest.mark.parametrize("change, message", [
    (_set("layers.0.attn.wq_a.scale", lambda s: torch.ones(3, 5).to(s.dtype)),
     r"layers.0.attn.wq_a.scale in \S+model-0000\d-of-00002.safetensors: shape \[3, 5\], the "
     r"F8_E4M3 weight \[128, 128\] needs \[1, 1\]"),
    (_set("layers.0.attn.wq_b.scale", lambda s: s[:2]),
     r"layers.0.attn.wq_b.scale in \S+: shape \[2, 1\], the F8_E4M3 weight \[\d+, 128\] needs "
     r"\[\d+, 1\]"),
    (_set("layers.0.attn.wo_a.scale", lambda s: s[:1]), r"layers.0.attn.wo_a.scale in \S+: "),
    (_set("layers.0.ffn.experts.1.w2.scale", lambda s: s[:, :1]),
     r"layers.0.ffn.experts.1.w2.scale in \S+: shape \[128, 1\], the I8 weight \[128, 64\] "
     r"needs \[128, 4\]"),
    (_set("layers.0.attn.wkv.scale", lambda s: s.float().to(torch.bfloat16)),
     r"layers.0.attn.wkv.scale in \S+: dtype BF16 \(accepted: F8_E8M0, F32\)"),
    (lambda t: t.pop("layers.0.attn.wkv.scale", None), r"layers.0.attn.wkv.scale: missing"),
])
def test_malformed_scales_are_refused_before_anything_is_written(src, tmp_path, capsys, change,
                                                                 message):
    """They were split into the rank files as they were (or failed mid-write, naming neither
    tensor nor file, with an empty --out left behind)."""
    bad = _altered(src, tmp_path / "bad", change)
    with pytest.raises(ConvertError, match=message):
        convert(bad, tmp_path / "o", 2)
    assert not (tmp_path / "o").exists()
    assert cli.main(["convert", "--in", str(bad), "--out", str(tmp_path / "o"),
                     "--model-parallel", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dsv4 convert: error: malformed quantisation scales") and \
        "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_u8_packed_fp4_experts_convert_like_i8(src, tmp_path):
    """--expert-fp8 left uint8-packed FP4 experts as they were (only int8 was recognised)."""
    def to_u8(t):
        for n in t:
            if split_rule(n)[0] == "expert" and t[n].dtype == torch.int8:
                t[n] = t[n].view(torch.uint8)
    u8 = _altered(src, tmp_path / "u8", to_u8)
    convert(u8, tmp_path / "fp8", 2, expert_fp8=True)
    convert(src, tmp_path / "ref", 2, expert_fp8=True)
    got, want = load_model_parallel(tmp_path / "fp8"), load_model_parallel(tmp_path / "ref")
    assert got["layers.0.ffn.experts.1.w2.weight"].dtype == torch.float8_e4m3fn
    assert got.keys() == want.keys()
    assert all(torch.equal(_bits(got[n]), _bits(want[n])) for n in want)
    if hasattr(torch, "float4_e2m1fn_x2"):
        convert(u8, tmp_path / "fp4", 2)
        with safe_open(str(tmp_path / "fp4" / "model0-mp2.safetensors"), framework="pt") as f:
            assert f.get_slice("layers.0.ffn.experts.1.w2.weight").get_dtype() == "F4"


def test_overwrite_removes_the_ranks_of_another_model_parallel_size(src, mp2, tmp_path):
    """They were left behind, and unshard / load_model_parallel then failed ("mixes
    conversions")."""
    import shutil

    d = tmp_path / "o"
    shutil.copytree(mp2[0], d)
    assert convert(src, d, 1, overwrite=True) == ["model0-mp1.safetensors"]
    assert sorted(f for f in os.listdir(d) if f.startswith("model")) == ["model0-mp1.safetensors"]
    orig, back = _tensors(src), load_model_parallel(d)
    assert torch.equal(_bits(back["norm.weight"]), _bits(orig["norm.weight"]))


def test_unreadable_rank_file_names_the_file(tmp_path):
    """safe_open's SafetensorError came out as a raw traceback."""
    (tmp_path / "model0-mp1.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConvertError, match=r"cannot read \S+model0-mp1.safetensors as "
                                           r"safetensors: "):
        load_model_parallel(tmp_path)


def test_expert_fp8_refuses_float_scales_with_no_e8m0_form(src, tmp_path, capsys):
    """FP4 experts with float (F32) 1x32 scales: powers of two convert as their e8m0 codes do;
    others were rounded to their exponent by --expert-fp8 (a scale of 1.5 s written as s, a
    silent change of the weight): refused before anything is written, naming the tensor.
    Without --expert-fp8 they are kept as they are."""
    from dsv4.quant import e8m0_to_float

    name = "layers.0.ffn.experts.1.w2.scale"

    def as_f32(factor):
        def change(t):
            for n in t:
                if split_rule(n)[0] == "expert" and n.endswith(".scale"):
                    t[n] = e8m0_to_float(t[n]) * (factor if n == name else 1.0)
        return change

    pow2 = _altered(src, tmp_path / "pow2", as_f32(1.0))
    convert(pow2, tmp_path / "f32", 2, expert_fp8=True)
    convert(src, tmp_path / "ref", 2, expert_fp8=True)
    got, want = load_model_parallel(tmp_path / "f32"), load_model_parallel(tmp_path / "ref")
    assert got.keys() == want.keys()
    assert all(torch.equal(_bits(got[n]), _bits(want[n])) for n in want)
    bad = _altered(src, tmp_path / "bad", as_f32(1.5))
    with pytest.raises(ConvertError, match=r"--expert-fp8: these FP4 experts' float scales are "
                                           r"not powers of two(.|\n)*" + name.replace(".", r"\.")):
        convert(bad, tmp_path / "o", 2, expert_fp8=True)
    assert not (tmp_path / "o").exists()
    assert cli.main(["convert", "--in", str(bad), "--out", str(tmp_path / "o"),
                     "--model-parallel", "2", "--expert-fp8"]) == 1
    assert "Traceback" not in capsys.readouterr().err and not (tmp_path / "o").exists()
    convert(bad, tmp_path / "fp4", 2)           # kept as FP4 with its scales: no refusal


def test_without_an_index_convert_reads_model_safetensors_as_the_loader_does(tmp_path):
    """No index: model.safetensors is the checkpoint (checkpoint_files' order). convert read
    every *.safetensors beside it too, so a stray copy failed with "tensor ... is in both",
    and one holding other names would have been converted with the checkpoint."""
    import shutil

    from dsv4.checkpoint import checkpoint_files

    d = tmp_path / "ck"
    make_checkpoint(ModelConfig.tiny(**TINY_MP), d, seed=3, tokenizer=False)
    shutil.copyfile(d / "model.safetensors", d / "old-copy.safetensors")
    def names(files):
        return {os.path.basename(f) for f in files}

    assert names(checkpoint_files(str(d))) == {"model.safetensors"}
    assert names(f for f, _, _ in read_checkpoint_index(str(d)).values()) == {"model.safetensors"}
    convert(d, tmp_path / "o", 1)
    os.remove(d / "model.safetensors")            # then every *.safetensors, as before
    assert names(f for f, _, _ in read_checkpoint_index(str(d)).values()) == {
        "old-copy.safetensors"}
