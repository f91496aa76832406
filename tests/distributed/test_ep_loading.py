"""Loading an expert-parallel model (gloo, 2 ranks) from a release-format checkpoint (FP8
linears, FP4 experts, two shards) and from ``dsv4 convert`` rank files (MP = 2, and MP = 1:
a rank reads its experts out of another layout): each rank reads its own experts and never the
others', holds exactly the single-process model's tensors for them, and gives the
single-process logits; the rank-file loads give bit-identical logits to the shard load.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from dsv4.checkpoint import CheckpointError
from dsv4.checkpoint_io import SafetensorsFile
from dsv4.config import ModelConfig
from dsv4.convert import convert
from dsv4.distributed import ExpertParallelGroup, RankFiles, from_pretrained, is_rank_directory
from dsv4.model import Model
from dsv4.synthetic import make_checkpoint

from _ep_harness import run_ranks

CFG = ModelConfig.tiny(vocab_size=512)
E = CFG.n_routed_experts
ATOL = 5e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep_ckpt")
    release = root / "release"
    make_checkpoint(CFG, str(release), fmt="fp8", n_shards=2, seed=3, tokenizer=False)
    dirs = {"release": str(release)}
    for mp in (2, 1):
        out = root / f"mp{mp}"
        convert(str(release), str(out), mp, progress=False)
        dirs[f"mp{mp}"] = str(out)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, CFG.vocab_size, (4, 11), generator=g)
    ref = {}
    for weights in ("dequant", "native"):
        model = Model.from_pretrained(str(release), device="cpu", dtype=torch.float32,
                                      weights=weights, progress=False)
        ref[weights] = {k: v for k, v in model.state_dict().items() if ".ffn.experts." in k}
    with torch.no_grad():     # native FP8/FP4 dequantised at use = dequantised at load, bit for bit
        logits = model(ids)
    return dirs, ids, logits, ref


def _expert(name: str):
    parts = name.split(".")
    return int(parts[parts.index("experts") + 1]) if "experts" in parts else None


def _load_cases(rank, world, dirs, ids, want_logits, ref):
    group = ExpertParallelGroup.current()
    local = set(group.expert_range(E))
    reads = []
    plain_read = SafetensorsFile.read
    SafetensorsFile.read = lambda self, name: (reads.append(name), plain_read(self, name))[1]
    rows = slice(rank, None, world)
    logits = {}
    for src, weights in (("release", "dequant"), ("release", "native"), ("mp2", "dequant"),
                         ("mp1", "dequant")):
        reads.clear()
        model = from_pretrained(dirs[src], group, dtype=torch.float32, weights=weights,
                                progress=False)
        read_experts = {_expert(n) for n in reads} - {None}
        assert read_experts == local, (src, sorted(read_experts), sorted(local))
        sd = model.state_dict()
        mine = {k: v for k, v in sd.items() if ".ffn.experts." in k}
        want_experts = ref[weights]
        assert {_expert(k) for k in mine} == local
        assert set(mine) == {k for k in want_experts if _expert(k) in local}
        for k, v in mine.items():
            assert v.dtype == want_experts[k].dtype and torch.equal(v, want_experts[k]), (src, k)
        with torch.no_grad():
            got = model(ids[rows])
        err = (got - want_logits[rows]).abs().max().item()
        assert err <= ATOL, f"{src} {weights}: max |EP - single| = {err:.3g}"
        logits[src, weights] = got
    for key in (("mp2", "dequant"), ("mp1", "dequant"), ("release", "native")):
        assert torch.equal(logits[key], logits["release", "dequant"]), key


def test_ranks_load_their_experts_only(checkpoints):
    run_ranks(2, _load_cases, *checkpoints)


def test_world_size_not_dividing_the_experts_is_refused_before_reading(checkpoints):
    dirs = checkpoints[0]
    with pytest.raises(ValueError, match=r"over 3 processes needs a world size that divides "
                                         r"n_routed_experts \(8\)"):
        from_pretrained(dirs["release"], ExpertParallelGroup(rank=0, world_size=3, device="cpu"),
                        progress=False)


def test_incomplete_rank_files_are_named(checkpoints, tmp_path):
    dirs = checkpoints[0]
    broken = tmp_path / "mp2"
    shutil.copytree(dirs["mp2"], broken)
    os.remove(broken / "model1-mp2.safetensors")
    assert is_rank_directory(str(broken)) and not is_rank_directory(dirs["release"])
    with pytest.raises(CheckpointError, match=r"MP 2 conversion lacks rank files \[1\]"):
        RankFiles(str(broken))
    with pytest.raises(CheckpointError, match=r"lacks rank files \[1\]"):
        from_pretrained(str(broken), ExpertParallelGroup(rank=0, world_size=2, device="cpu"),
                        progress=False)


def test_rank_files_present_one_checkpoint(checkpoints):
    dirs = checkpoints[0]
    with RankFiles(dirs["mp2"], prefer_rank=1) as files:
        head = files.tensors["head.weight"]
        assert head[1] == (CFG.vocab_size, CFG.dim)                   # split along dim 0
        assert files.read("head.weight").shape == (CFG.vocab_size, CFG.dim)
        wo_b = files.tensors["layers.0.attn.wo_b.weight"]
        assert wo_b[0] == "F8_E4M3" and wo_b[1] == (CFG.dim, CFG.o_groups * CFG.o_lora_rank)
        assert files.tensors["layers.0.ffn.experts.5.w1.weight"][0] == "F4"
        with SafetensorsFile(os.path.join(dirs["mp2"], "model0-mp2.safetensors")) as r0:
            assert torch.equal(files.read("layers.1.attn.wq_a.weight").view(torch.uint8),
                               r0.read("layers.1.attn.wq_a.weight").view(torch.uint8))
