"""Random inputs of the GEMM ops (grouped expert GEMMs, FP8 linear, grouped output projection)
shared by tests/ops/test_grouped_gemm.py, test_fp8_linear.py, test_grouped_oproj.py and the
benchmarks in bench/ (which put this directory on sys.path)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from dsv4.quant import fp4_pack, fp8_block_quantize

FORMATS = ("bf16", "fp8", "fp4")


def _gen(seed: int, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def route(T: int, E: int, topk: int, seed: int, skew: Optional[str] = None,
          device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert-major (token, slot) pairs as the MoE dispatch produces them (docs/contracts.md §B).

    Each token picks ``topk`` distinct experts uniformly at random. ``skew="one"``: every slot
    of every token goes to expert E // 2 (the other experts get 0 pairs); ``skew="half"``: only
    the first half of the experts receive pairs. Pairs are ordered by expert, then token, then
    slot. Returns ``(row_ids int32 [P], expert_offsets int32 [E + 1],
    route_weight float32 [P])`` with P = T * topk.
    """
    g = _gen(seed)
    if skew == "one":
        idx = torch.full((T, topk), E // 2, dtype=torch.long)
    else:
        span = max(1, E // 2) if skew == "half" else E
        if topk > span:
            raise ValueError(f"topk {topk} > {span} experts to choose from")
        idx = torch.rand(T, span, generator=g).argsort(-1)[:, :topk]
    weights = torch.rand(T, topk, generator=g) + 0.25
    expert = idx.flatten()
    token = torch.arange(T).repeat_interleave(topk)
    order = torch.sort(expert * (T * topk) + torch.arange(T * topk), stable=True).indices
    row_ids = token[order].to(torch.int32)
    counts = torch.bincount(expert, minlength=E)
    offsets = torch.zeros(E + 1, dtype=torch.int32)
    offsets[1:] = counts.cumsum(0).to(torch.int32)
    rw = weights.flatten()[order].float()
    return row_ids.to(device), offsets.to(device), rw.to(device)


def quantize_stack(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Stacked float weights [..., out, in] -> (weight, scale) in ``fmt`` ("bf16", "fp8",
    "fp4"; scales e8m0), quantised matrix by matrix with :mod:`dsv4.quant`."""
    if fmt == "bf16":
        return w.bfloat16(), None
    lead = w.shape[:-2]
    flat = w.reshape(-1, *w.shape[-2:])
    fn = fp8_block_quantize if fmt == "fp8" else fp4_pack
    pairs = [fn(m) for m in flat]
    q = torch.stack([p[0] for p in pairs])
    s = torch.stack([p[1] for p in pairs])
    return q.view(*lead, *q.shape[1:]), s.view(*lead, *s.shape[1:])


@dataclass
class MoECase:
    x: torch.Tensor
    row_ids: torch.Tensor
    expert_offsets: torch.Tensor
    route_weight: torch.Tensor
    w_up: torch.Tensor
    w_up_scale: Optional[torch.Tensor]
    w_down: torch.Tensor
    w_down_scale: Optional[torch.Tensor]
    h: torch.Tensor  # a random moe_up-shaped input of moe_down (bf16)

    def to(self, device) -> "MoECase":
        return MoECase(*[None if v is None else v.to(device) for v in self.__dict__.values()])


def moe_case(T: int, K: int, N: int, E: int, topk: int, fmt: str, seed: int,
             skew: Optional[str] = None, x_dtype=torch.bfloat16) -> MoECase:
    """A random MoE GEMM problem: x [T, K], w_up [E, 2, N, K], w_down [E, K, N] in ``fmt``."""
    g = _gen(seed + 1)
    row_ids, offsets, rw = route(T, E, topk, seed, skew)
    x = (torch.randn(T, K, generator=g) * 2.0).to(x_dtype)
    w_up = torch.randn(E, 2, N, K, generator=g) * K ** -0.5 * 2.0
    w_down = torch.randn(E, K, N, generator=g) * N ** -0.5
    wq_up, s_up = quantize_stack(w_up, fmt)
    wq_down, s_down = quantize_stack(w_down, fmt)
    h = torch.randn(row_ids.shape[0], N, generator=g).to(x_dtype)
    return MoECase(x, row_ids, offsets, rw, wq_up, s_up, wq_down, s_down, h)
