"""bench/bench_ep.py's code path on CPU processes (gloo, ``--smoke``: ModelConfig.tiny through the
synthetic release-format reader, every decode / prefill row at small sizes), so that the
2 x H200 command does not meet a Python error first; and its floors against hand counts."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from dsv4.config import ModelConfig

from _ep_harness import run_ranks

_BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "bench_ep.py")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_ep", _BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _smoke(rank, world, out):
    _bench().main(["--smoke", "--steps", "2", "--json", out])


def test_bench_runs_on_cpu_processes(tmp_path):
    out = str(tmp_path / "bench_ep.json")
    run_ranks(2, _smoke, out)
    rows = json.load(open(out))["rows"]
    ran = [r for r in rows if r["seconds"]]
    assert {(r["kind"], r["batch"]) for r in ran} == {("decode", 1), ("decode", 3),
                                                      ("prefill", 1), ("prefill", 3)}
    assert all(r["tokens_per_s"] > 0 and r["floor_s"] > 0 for r in ran)
    assert [r for r in rows if not r["seconds"]][0]["note"].startswith("8.4M")


def test_floors_count_the_flash_step():
    b = _bench()
    c = ModelConfig.flash()
    dense, expert, embed_row, head, dense_p, expert_p = b._spec_bytes(c)
    # one routed expert: 3 FP4 matrices 2048 x 4096 (half a byte each) + e8m0 1x32 scales
    assert expert == 3 * 2048 * 4096 * (0.5 + 1 / 32)
    assert expert_p == 3 * 2048 * 4096 and head == 129280 * 4096 * 4
    # decode at batch 1: rank 0 reads the dense weights, the head and ~3 of its 128 experts
    f = b.floors(c, "decode", 1, 8192, 2, full_logits=True)
    distinct = 128 * (1 - (1 - 6 / 256))
    assert f["bytes"] == pytest.approx(dense + head + 43 * distinct * expert
                                       + b.kv_read_bytes(c, 8192) + embed_row)
    assert 6e9 < dense < 9e9           # attention, shared experts, fp32 compressors, mHC, gates
