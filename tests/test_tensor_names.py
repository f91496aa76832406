"""Official tensor names and shapes (architecture.md §12) versus the Model's parameters.

Every tensor of the release layout (``tensor_specs(config, "fp8")``: weights and ``.scale``
tensors) must map onto exactly one parameter/buffer of ``Model(config)`` built on the meta
device, and every parameter/buffer must be covered: scales map to their weight, FP4 expert
weights [out, in/2] to [out, in].
"""

from __future__ import annotations

import json

import pytest
import torch

from dsv4.checkpoint import tensor_specs
from dsv4.config import ModelConfig
from dsv4.convert import read_checkpoint_index
from dsv4.model_info import meta_model
from dsv4.synthetic import official_order

from _testdata import GOLDEN_FP8, needs_golden_fp8  # noqa: E402
E4M3, E8M0 = torch.float8_e4m3fn, torch.float8_e8m0fnu


@pytest.fixture(scope="module", params=["flash", "pro"])
def built(request):
    cfg = getattr(ModelConfig, request.param)()
    model = meta_model(cfg)
    targets = {n: t for n, t in model.named_parameters()}
    targets.update(model.named_buffers())
    return request.param, cfg, targets, tensor_specs(cfg, "fp8")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def test_every_official_tensor_maps_onto_one_parameter_and_back(built):
    _, cfg, targets, specs = built
    claimed: set[str] = set()             # parameters already matched by a spec name
    problems = []
    for name, (shape, dtype) in specs.items():
        if name.endswith(".scale"):
            weight = name[: -len(".scale")] + ".weight"
            if weight not in specs or weight not in targets:
                problems.append(f"{name}: no weight {weight}")
                continue
            out_f, in_f = targets[weight].shape
            w_shape, w_dtype = specs[weight]
            if w_dtype == torch.int8:      # FP4: one scale per 1x32 block
                want = (out_f, in_f // 32)
            else:                          # FP8: one scale per 128x128 block (ceil grid)
                want = (_cdiv(out_f, 128), _cdiv(in_f, 128))
            if tuple(shape) != want or dtype != E8M0:
                problems.append(f"{name}: {dtype} {shape}, expected e8m0 {want}")
            continue
        if name not in targets:
            problems.append(f"{name}: no such parameter")
            continue
        if name in claimed:
            problems.append(f"{name} listed twice")
        t = targets[name]
        logical = tuple(shape)
        if dtype == torch.int8:            # packed FP4 [out, in/2] -> [out, in]
            logical = (shape[0], 2 * shape[1])
            if (name[: -len(".weight")] + ".scale") not in specs:
                problems.append(f"{name}: int8 weight without a scale")
        elif dtype == E4M3 and (name[: -len(".weight")] + ".scale") not in specs:
            problems.append(f"{name}: FP8 weight without a scale")
        if logical != tuple(t.shape):
            problems.append(f"{name}: spec {tuple(shape)} ({dtype}) vs parameter {tuple(t.shape)}")
        if t.is_floating_point() != (dtype not in (torch.int64,)):
            problems.append(f"{name}: spec dtype {dtype} vs parameter {t.dtype}")
        claimed.add(name)
    uncovered = sorted(set(targets) - set(claimed))
    assert not problems, problems[:10]
    assert not uncovered, uncovered[:10]


def test_tensor_counts_and_sizes_match_the_release(built):
    """§1.1: Flash 69,187 tensors, index total_size 159,609,485,896 B; Pro 145,116 tensors."""
    which, _, _, specs = built
    size = sum(torch.Size(s).numel() * torch.empty(0, dtype=d).element_size()
               for s, d in specs.values())
    if which == "flash":
        assert len(specs) == 69187 and size == 159_609_485_896
    else:
        assert len(specs) == 145116 and abs(size / 2 ** 30 - 805) < 1   # "≈805 GB" (GiB)


# §12.2, one layer, Flash shapes [Pro shapes].
SHAPES = [
    ("layers.5.attn_norm.weight", (4096,), (7168,), torch.bfloat16),
    ("layers.5.hc_attn_fn", (24, 16384), (24, 28672), torch.float32),
    ("layers.5.hc_ffn_base", (24,), (24,), torch.float32),
    ("layers.5.hc_attn_scale", (3,), (3,), torch.float32),
    ("layers.5.attn.wq_a.weight", (1024, 4096), (1536, 7168), E4M3),
    ("layers.5.attn.wq_a.scale", (8, 32), (12, 56), E8M0),
    ("layers.5.attn.q_norm.weight", (1024,), (1536,), torch.bfloat16),
    ("layers.5.attn.wq_b.weight", (32768, 1024), (65536, 1536), E4M3),
    ("layers.5.attn.wq_b.scale", (256, 8), (512, 12), E8M0),
    ("layers.5.attn.wkv.scale", (4, 32), (4, 56), E8M0),
    ("layers.5.attn.kv_norm.weight", (512,), (512,), torch.bfloat16),
    ("layers.5.attn.wo_a.weight", (8192, 4096), (16384, 4096), E4M3),
    ("layers.5.attn.wo_a.scale", (64, 32), (128, 32), E8M0),
    ("layers.5.attn.wo_b.weight", (4096, 8192), (7168, 16384), E4M3),
    ("layers.5.attn.wo_b.scale", (32, 64), (56, 128), E8M0),
    ("layers.5.attn.attn_sink", (64,), (128,), torch.float32),
    ("layers.5.ffn.gate.weight", (256, 4096), (384, 7168), torch.bfloat16),
    ("layers.5.ffn.gate.bias", (256,), (384,), torch.float32),
    ("layers.1.ffn.gate.tid2eid", (129280, 6), (129280, 6), torch.int64),
    ("layers.5.ffn.experts.7.w1.weight", (2048, 2048), (3072, 3584), torch.int8),
    ("layers.5.ffn.experts.7.w3.scale", (2048, 128), (3072, 224), E8M0),
    ("layers.5.ffn.experts.7.w2.weight", (4096, 1024), (7168, 1536), torch.int8),
    ("layers.5.ffn.experts.7.w2.scale", (4096, 64), (7168, 96), E8M0),
    ("layers.5.ffn.shared_experts.w1.weight", (2048, 4096), (3072, 7168), E4M3),
    ("layers.5.ffn.shared_experts.w1.scale", (16, 32), (24, 56), E8M0),
    ("layers.5.ffn.shared_experts.w2.weight", (4096, 2048), (7168, 3072), E4M3),
    ("layers.5.ffn.shared_experts.w2.scale", (32, 16), (56, 24), E8M0),
    ("layers.4.attn.compressor.wkv.weight", (1024, 4096), (1024, 7168), torch.bfloat16),
    ("layers.4.attn.compressor.ape", (4, 1024), (4, 1024), torch.float32),
    ("layers.4.attn.compressor.norm.weight", (512,), (512,), torch.bfloat16),
    ("layers.4.attn.indexer.wq_b.weight", (8192, 1024), (8192, 1536), E4M3),
    ("layers.4.attn.indexer.wq_b.scale", (64, 8), (64, 12), E8M0),
    ("layers.4.attn.indexer.weights_proj.weight", (64, 4096), (64, 7168), torch.bfloat16),
    ("layers.4.attn.indexer.compressor.wgate.weight", (256, 4096), (256, 7168), torch.bfloat16),
    ("layers.4.attn.indexer.compressor.ape", (4, 256), (4, 256), torch.float32),
    ("layers.4.attn.indexer.compressor.norm.weight", (128,), (128,), torch.bfloat16),
    ("layers.5.attn.compressor.wkv.weight", (512, 4096), (512, 7168), torch.bfloat16),
    ("layers.5.attn.compressor.ape", (128, 512), (128, 512), torch.float32),
    ("embed.weight", (129280, 4096), (129280, 7168), torch.bfloat16),
    ("head.weight", (129280, 4096), (129280, 7168), torch.bfloat16),
    ("hc_head_fn", (4, 16384), (4, 28672), torch.float32),
    ("hc_head_scale", (1,), (1,), torch.float32),
]


@pytest.mark.parametrize("name, flash, pro, dtype", SHAPES)
def test_spec_shapes_of_section_12_2(built, name, flash, pro, dtype):
    which, _, _, specs = built
    assert specs[name] == ((flash if which == "flash" else pro), dtype)


def test_layer_type_specific_tensors(built):
    which, cfg, _, specs = built
    for i in range(cfg.n_layers):
        kind = cfg.layer_kind(i)
        assert (f"layers.{i}.attn.indexer.wq_b.weight" in specs) == (kind == "csa")
        assert (f"layers.{i}.attn.compressor.ape" in specs) == (kind != "swa")
        assert (f"layers.{i}.ffn.gate.tid2eid" in specs) == (i < 3)
        assert (f"layers.{i}.ffn.gate.bias" in specs) == (i >= 3)
    m = f"mtp.0"
    d = 4096 if which == "flash" else 7168
    assert specs[f"{m}.e_proj.weight"] == ((d, d), E4M3)
    assert specs[f"{m}.h_proj.scale"] == ((d // 128, d // 128), E8M0)
    assert f"{m}.ffn.gate.bias" in specs and f"{m}.ffn.gate.tid2eid" not in specs
    assert f"{m}.attn.compressor.ape" not in specs and f"{m}.attn.attn_sink" in specs
    assert not any(n.startswith("mtp.") and ("emb" in n or n.endswith(".head.weight"))
                   for n in specs)


@needs_golden_fp8
def test_golden_fp8_files_match_tensor_specs_and_order():
    """The release-format golden: names, dtypes, shapes, and the index order."""
    cfg = ModelConfig.from_json(GOLDEN_FP8)
    specs = tensor_specs(cfg, "fp8")
    files = read_checkpoint_index(GOLDEN_FP8)
    names = {"BF16": torch.bfloat16, "F32": torch.float32, "F8_E4M3": E4M3, "F8_E8M0": E8M0,
             "I8": torch.int8, "I64": torch.int64}
    got = {n: (tuple(shape), names[dt]) for n, (_, dt, shape) in files.items()}
    assert got == specs
    with open(f"{GOLDEN_FP8}/model.safetensors.index.json") as f:
        assert list(json.load(f)["weight_map"]) == official_order(specs)
