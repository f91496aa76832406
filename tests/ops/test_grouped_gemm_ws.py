"""The warp-specialised mainloop of the grouped GEMM (csrc/kernels/grouped_gemm_ws.cuh, selected
by DSV4_GEMM_MAINLOOP=ws for bf16 weights at the kLarge / kHuge tiles): moe_up / moe_down and
grouped_oproj through it against the fp32 reference (2x bf16 rule, NaN-poisoned outputs), and
bit for bit against the classic mainloop of the same tile (the same wgmmas in the same k order);
FP8 weights and fp8_linear are unaffected by the switch (GPU)."""

from __future__ import annotations

import pytest
import torch

import dsv4.ops  # noqa: F401  (registers every op)
from dsv4.ops.gemm import fp8_linear
from dsv4.ops.grouped_gemm import moe_down, moe_up
from dsv4.ops.grouped_oproj import grouped_oproj, grouped_oproj_reference
from dsv4.quant import fp8_block_quantize

from _profiling import cuda_kernel_names  # (tests/_profiling.py)
from gemm_cases import moe_case
from test_grouped_gemm import LIMIT, _check_case_cuda
from test_grouped_oproj import _assert_2x_bf16_rule, _truth, make

WS_TILES = ("large", "huge")


def _set(monkeypatch, tile, mainloop):
    """Force the tile (DSV4_GEMM_TILE) and the mainloop (DSV4_GEMM_MAINLOOP: classic | ws)."""
    monkeypatch.setenv("DSV4_GEMM_TILE", tile)
    monkeypatch.setenv("DSV4_GEMM_PIPE", "serial")
    monkeypatch.setenv("DSV4_GEMM_MAINLOOP", mainloop)


def _same_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.view(torch.int16), b.view(torch.int16)), \
        f"{what}: the ws mainloop differs from the classic one (max diff " \
        f"{(a.float() - b.float()).abs().nan_to_num(0.0).max().item():.3g})"


def _moe_both(monkeypatch, c, tile):
    """moe_up then moe_down (input: the classic h) under each mainloop of `tile`, on NaN-poisoned
    out buffers: {mainloop: (h, y)}."""
    cc = c.to("cuda")
    P, N = c.row_ids.shape[0], c.w_up.shape[2]
    D = c.w_down.shape[1]
    res = {}
    for ml in ("classic", "ws"):
        _set(monkeypatch, tile, ml)
        h = torch.full((P, N), float("nan"), dtype=torch.bfloat16, device="cuda")
        moe_up(cc.x, cc.row_ids, cc.expert_offsets, cc.w_up, cc.w_up_scale, cc.route_weight,
               LIMIT, False, out=h)
        hin = res["classic"][0] if ml == "ws" else h
        y = torch.full((P, D), float("nan"), dtype=torch.bfloat16, device="cuda")
        moe_down(hin, cc.expert_offsets, cc.w_down, cc.w_down_scale, False, out=y)
        res[ml] = (h, y)
    return res


# (T, K, N, E, topk, skew): tiny experts; K / N not multiples of 64 (a partial last k step);
# every pair on one expert (600 rows: several row tiles; 7 experts empty) / half the experts
# empty; k of 17 steps (the stage ring wraps inside a unit) with ~500 rows per expert; more
# units than SMs (each block walks several; the producer runs ahead across unit boundaries)
MOE_CASES = [
    (37, 128, 64, 8, 2, None),
    (29, 72, 40, 5, 2, None),
    (300, 128, 64, 8, 2, "one"),
    (300, 128, 64, 8, 2, "half"),
    (1000, 1088, 320, 4, 2, None),
    (2048, 512, 512, 8, 2, None),
]


@pytest.mark.cuda
@pytest.mark.parametrize("tile", WS_TILES)
@pytest.mark.parametrize("T,K,N,E,topk,skew", MOE_CASES)
def test_cuda_ws_moe_matches_reference(monkeypatch, tile, T, K, N, E, topk, skew):
    _set(monkeypatch, tile, "ws")
    _check_case_cuda(moe_case(T=T, K=K, N=N, E=E, topk=topk, fmt="bf16", seed=T + K, skew=skew))


@pytest.mark.cuda
@pytest.mark.parametrize("tile", WS_TILES)
@pytest.mark.parametrize("T,K,N,E,topk,skew", MOE_CASES)
def test_cuda_ws_moe_equals_classic_bits(monkeypatch, tile, T, K, N, E, topk, skew):
    c = moe_case(T=T, K=K, N=N, E=E, topk=topk, fmt="bf16", seed=T + K + 1, skew=skew)
    res = _moe_both(monkeypatch, c, tile)
    _same_bits(res["ws"][0], res["classic"][0], "moe_up")
    _same_bits(res["ws"][1], res["classic"][1], "moe_down")


@pytest.mark.cuda
@pytest.mark.parametrize("tile", WS_TILES)
def test_cuda_ws_moe_v4_flash_prefill(monkeypatch, tile):
    """V4-Flash expert shapes (4096 -> 2048, top-6) with 32 experts, 2048 tokens (~384 rows per
    expert), reference on the GPU."""
    from test_grouped_gemm import check_v4_flash_shapes
    _set(monkeypatch, tile, "ws")
    check_v4_flash_shapes("bf16", 2048, 7, "V4 ws")


# (T, H, hd, G, R): head_dim 128 / 512 / 64 (RoPE steps every 2 / 8 / 1 k steps), T not a
# multiple of the tile, 600 rows with k 2048 (several row tiles, 32 k steps)
OPROJ_CASES = [(37, 4, 128, 2, 128), (5, 8, 512, 2, 256), (300, 16, 64, 4, 128),
               (600, 8, 512, 2, 256)]


@pytest.mark.cuda
@pytest.mark.parametrize("tile", WS_TILES)
@pytest.mark.parametrize("T,H,hd,G,R", OPROJ_CASES)
def test_cuda_ws_oproj_matches_reference_and_classic(monkeypatch, tile, T, H, hd, G, R):
    o, pos, freqs, wo_a, scale = make(T, H, hd, G, R, "bf16", seed=T + H + G + 3, device="cuda",
                                      max_pos=1 << 20)
    outs = {}
    for ml in ("classic", "ws"):
        _set(monkeypatch, tile, ml)
        out = torch.full((T, G, R), float("nan"), dtype=torch.bfloat16, device="cuda")
        grouped_oproj(o, pos, freqs, wo_a, scale, out=out)
        outs[ml] = out
    ref = grouped_oproj_reference(o, pos, freqs, wo_a, scale)
    _assert_2x_bf16_rule(outs["ws"], ref, _truth(o, pos, freqs, wo_a, scale), "grouped_oproj ws")
    _same_bits(outs["ws"], outs["classic"], "grouped_oproj")


@pytest.mark.cuda
def test_cuda_ws_oproj_v4_flash_prefill(monkeypatch):
    # 64 heads x 512, 8 groups, o_lora_rank 1024, T 2048; the automatic tile (kHuge)
    monkeypatch.delenv("DSV4_GEMM_TILE", raising=False)
    monkeypatch.setenv("DSV4_GEMM_MAINLOOP", "ws")
    o, pos, freqs, wo_a, scale = make(2048, 64, 512, 8, 1024, "bf16", seed=9, device="cuda",
                                      max_pos=1 << 20)
    z = grouped_oproj(o, pos, freqs, wo_a, scale)
    ref = grouped_oproj_reference(o, pos, freqs, wo_a, scale)
    _assert_2x_bf16_rule(z, ref, _truth(o, pos, freqs, wo_a, scale), "grouped_oproj V4 ws")


@pytest.mark.cuda
@pytest.mark.parametrize("tile", WS_TILES)
def test_cuda_ws_switch_leaves_fp8_weights_alone(monkeypatch, tile):
    """FP8 weights keep the classic path under the switch: moe_up, grouped_oproj and fp8_linear
    give the same bits with DSV4_GEMM_MAINLOOP=ws and =classic."""
    c = moe_case(T=300, K=256, N=128, E=4, topk=2, fmt="fp8", seed=21).to("cuda")
    o, pos, freqs, wo_a, scale = make(300, 4, 128, 2, 128, "fp8", seed=22, device="cuda")
    g = torch.Generator().manual_seed(23)
    wl, sl = fp8_block_quantize(torch.randn(384, 256, generator=g) * 0.06)
    xl = torch.randn(300, 256, generator=g).bfloat16().cuda()
    got = {}
    for ml in ("classic", "ws"):
        _set(monkeypatch, tile, ml)
        got[ml] = (moe_up(c.x, c.row_ids, c.expert_offsets, c.w_up, c.w_up_scale,
                          c.route_weight, LIMIT),
                   grouped_oproj(o, pos, freqs, wo_a, scale),
                   fp8_linear(xl, wl.cuda(), sl.cuda(), False))
    for a, b, what in zip(got["ws"], got["classic"], ("moe_up", "grouped_oproj", "fp8_linear")):
        _same_bits(a, b, what + " fp8")


@pytest.mark.cuda
@pytest.mark.parametrize("tile", WS_TILES)
def test_cuda_ws_kernel_is_the_one_that_runs(monkeypatch, tile):
    """The switch really launches grouped_gemm_ws_kernel (the profiler's kernel names), so the
    bit-equality tests above cannot pass by running the classic kernel twice (a stale build,
    a dispatch that falls back); =classic launches the classic kernel only."""
    c = moe_case(T=300, K=256, N=128, E=4, topk=2, fmt="bf16", seed=41).to("cuda")
    o, pos, freqs, wo_a, scale = make(300, 4, 128, 2, 128, "bf16", seed=42, device="cuda")
    names = {}
    for ml in ("classic", "ws"):
        _set(monkeypatch, tile, ml)
        h = moe_up(c.x, c.row_ids, c.expert_offsets, c.w_up, None, c.route_weight, LIMIT)
        grouped_oproj(o, pos, freqs, wo_a, scale)

        def calls():
            moe_up(c.x, c.row_ids, c.expert_offsets, c.w_up, None, c.route_weight, LIMIT)
            moe_down(h, c.expert_offsets, c.w_down, None)
            grouped_oproj(o, pos, freqs, wo_a, scale)
        names[ml] = cuda_kernel_names(calls, "grouped_gemm")
    if not names["classic"]:
        pytest.skip("the profiler recorded no CUDA kernels here (no CUPTI)")
    ws = [n for n in names["ws"] if "grouped_gemm_ws_kernel" in n]
    assert not [n for n in names["classic"] if "grouped_gemm_ws_kernel" in n]
    # moe_up (SwiGLU), moe_down (store), grouped_oproj (store + RoPE): three ws variants
    assert len(set(ws)) == 3, names["ws"]
    assert not [n for n in names["ws"] if "grouped_gemm_kernel" in n], names["ws"]


@pytest.mark.cuda
def test_cuda_ws_in_cuda_graph(monkeypatch):
    """The ws kernel captured in a CUDA graph and replayed on new inputs (no host sync; the
    unit counts come from expert_offsets on the device)."""
    _set(monkeypatch, "large", "ws")
    c = moe_case(T=300, K=256, N=128, E=4, topk=2, fmt="bf16", seed=31).to("cuda")
    P, N = c.row_ids.shape[0], c.w_up.shape[2]
    h = torch.empty(P, N, dtype=torch.bfloat16, device="cuda")
    x = c.x.clone()
    moe_up(x, c.row_ids, c.expert_offsets, c.w_up, None, c.route_weight, LIMIT, False, out=h)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moe_up(x, c.row_ids, c.expert_offsets, c.w_up, None, c.route_weight, LIMIT, False, out=h)
    x.copy_(torch.randn(x.shape, device="cuda", generator=torch.Generator(device="cuda")
                        .manual_seed(5)).bfloat16())
    h.fill_(float("nan"))
    graph.replay()
    want = moe_up(x, c.row_ids, c.expert_offsets, c.w_up, None, c.route_weight, LIMIT)
    _same_bits(h[: int(c.expert_offsets[-1])], want[: int(c.expert_offsets[-1])], "graph replay")
