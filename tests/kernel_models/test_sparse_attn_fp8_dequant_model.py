"""Host model of the FP8 (MODEL1) decode kernel's dequantisation (csrc/kernels/
sparse_attn_fp8_sm90.cuh: dequant4, prmt_sign, bf16x2_mul), CPU.

The kernel turns 4 e4m3 bytes and a UE8M0 scale byte into 4 bf16 values with integer bit
manipulation, prmt and two bf16x2 multiplies (fma.rn.bf16x2 with addend -0: one rounding of
the exact product to bf16, subnormals kept; no conversion instructions). This file transcribes
that arithmetic in numpy / torch (uint32 lanes; each bf16 multiply as the exact fp32 product of
two bf16 values, which always fits fp32 here, rounded to bf16 to nearest even) and compares it,
for EVERY e4m3 byte (NaN codes included) under EVERY scale byte 0..255, with the reference's
dequantisation (dsv4.ops.kv_cache.unpack: float8_e4m3fn -> fp32, times the scale
dsv4.ops.quant.e8m0_to_float gives (2^(byte - 127); byte 0 -> 2^-127, 255 -> NaN), rounded to
bf16 to nearest even). If the kernel's formula changes, change its model here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsv4.ops import kv_cache as kc
from dsv4.ops.quant import fp8_e4m3_quantize

U32 = np.uint32


def prmt(a: np.ndarray, b: np.ndarray, sel: int) -> np.ndarray:
    """PTX prmt.b32 (default mode): byte i of the result is byte (sel_i & 7) of {b, a}
    (a = bytes 0-3, b = bytes 4-7), or, when bit 3 of sel_i is set, that byte's top bit
    replicated over 8 bits."""
    src = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    out = np.zeros(a.shape, dtype=np.uint64)
    for i in range(4):
        nib = (sel >> (4 * i)) & 0xF
        byte = (src >> np.uint64(8 * (nib & 7))) & np.uint64(0xFF)
        if nib & 8:
            byte = np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0))
        out |= byte << np.uint64(8 * i)
    return out.astype(U32)


def to_bf16_rn(x: np.ndarray) -> np.ndarray:
    """fp32 values -> bf16 bit patterns (uint16), round to nearest even, subnormals kept."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(
        torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def bf16x2_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """bf16x2_mul (fma.rn.bf16x2 a, b, -0): per 16-bit lane, the product of the two bf16
    values rounded once to bf16 (the fp32 product of two bf16 values is exact here: at most
    16 significant bits, magnitudes within fp32's range or overflowing to inf in both)."""
    out = np.zeros(a.shape, dtype=U32)
    for sh in (0, 16):
        x = ((a >> U32(sh)) & U32(0xFFFF)) << U32(16)
        y = ((b >> U32(sh)) & U32(0xFFFF)) << U32(16)
        with np.errstate(invalid="ignore", over="ignore"):
            prod = x.view(np.float32) * y.view(np.float32)
        out |= to_bf16_rn(prod).astype(U32) << U32(sh)
    return out


def dequant4(w: np.ndarray, s2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dequant4: uint32 words of 4 e4m3 bytes and the scale pair s2 (byte * 0x00800080) ->
    two uint32 words of bf16 pairs."""
    k120 = np.full(w.shape, 0x7B807B80, dtype=U32)  # 2^120 in both bf16 lanes
    zero = np.zeros_like(w)
    n = (w & U32(0x7F7F7F7F)) + U32(0x01010101)
    nan01, nan23 = prmt(n, n, 0x9988), prmt(n, n, 0xBBAA)
    u01, u23 = prmt(w, zero, 0x1404), prmt(w, zero, 0x3424)
    h01 = (u01 & U32(0x80008000)) | ((u01 >> U32(4)) & U32(0x07F007F0)) | nan01
    h23 = (u23 & U32(0x80008000)) | ((u23 >> U32(4)) & U32(0x07F007F0)) | nan23
    return bf16x2_mul(bf16x2_mul(h01, k120), s2), bf16x2_mul(bf16x2_mul(h23, k120), s2)


def ue8m0_bf16x2(scale_bytes: np.ndarray) -> np.ndarray:
    """ue8m0_bf16x2 (sparse_attn.cuh): the scale's bf16 bits in both lanes: byte << 7, byte 0
    -> 0x0040 (2^-127, a bf16 subnormal), byte 255 -> 0x7FC0 (NaN)."""
    b = scale_bytes.astype(U32)
    h = np.where(b == 0, U32(0x0040), np.where(b == 255, U32(0x7FC0), b << U32(7)))
    return (h * U32(0x00010001)).astype(U32)


def model_values(words: np.ndarray, scale_bytes: np.ndarray) -> np.ndarray:
    """bf16 bit patterns [n, 4] (dims 0..3 of each word) of the kernel."""
    lo, hi = dequant4(words, ue8m0_bf16x2(scale_bytes))
    return np.stack([lo & U32(0xFFFF), lo >> U32(16), hi & U32(0xFFFF), hi >> U32(16)],
                    -1).astype(np.uint16)


def reference_values(codes: np.ndarray, scale_byte: int) -> torch.Tensor:
    """The reference's bf16 values of e4m3 ``codes`` (uint8 [n]) under one scale byte: MODEL1
    entries holding the codes in their nope dims, dequantised by dsv4.ops.kv_cache.unpack."""
    nope = kc.MODEL1_NOPE_DIM
    n = codes.size
    rows = -(-n // nope)
    entries = torch.zeros(rows, kc.MODEL1_TOKEN_BYTES + kc.MODEL1_SCALE_BYTES, dtype=torch.uint8)
    flat = torch.zeros(rows * nope, dtype=torch.uint8)
    flat[:n] = torch.from_numpy(codes)
    entries[:, :nope] = flat.view(rows, nope)
    entries[:, kc.MODEL1_TOKEN_BYTES:kc.MODEL1_TOKEN_BYTES + 7] = scale_byte
    fp32 = kc.unpack(kc.MODEL1, entries, torch.float32)[:, :nope].reshape(-1)[:n]
    return fp32


def bf16_bits(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def is_nan_bf16(bits: np.ndarray) -> np.ndarray:
    return ((bits & 0x7F80) == 0x7F80) & ((bits & 0x7F) != 0)


def _check(words: np.ndarray, s: int) -> None:
    """Kernel model vs reference for ``words`` under scale byte ``s``: the same bf16 bits
    everywhere, NaN exactly where the reference has NaN."""
    got = model_values(words, np.full(words.shape, s, dtype=np.uint8)).reshape(-1)
    codes = words.view(np.uint8).reshape(-1)           # little endian: byte i = dim i
    ref = bf16_bits(reference_values(codes, s))
    nan_ref = is_nan_bf16(ref)
    # NaN exactly where the reference has NaN (NaN codes; every value at scale 255).
    np.testing.assert_array_equal(is_nan_bf16(got), nan_ref)
    np.testing.assert_array_equal(got[~nan_ref], ref[~nan_ref])


def test_prmt_model_sign_mode():
    a = np.array([0x80017F00], dtype=U32)
    assert prmt(a, a, 0x9988)[0] == 0x00000000      # byte 0 = 0x00, byte 1 = 0x7f
    assert prmt(a, a, 0xBBAA)[0] == 0xFFFF0000      # byte 2 = 0x01, byte 3 = 0x80
    assert prmt(a, np.zeros_like(a), 0x1404)[0] == 0x7F000000


@pytest.mark.parametrize("s", range(256))
def test_every_byte_every_scale(s):
    """Every e4m3 byte (4 copies in a word, so each byte position) under scale byte s: equal
    to the reference's bf16 bits everywhere (the bf16-subnormal products at s = 1, 2 included:
    one rounding of the exact product), NaN codes 0x7f / 0xff and 0 * inf at s = 255 give
    NaN."""
    words = (np.arange(256, dtype=U32) * U32(0x01010101))
    _check(words, s)


@pytest.mark.parametrize("s", [0, 1, 3, 105, 127, 200, 247, 254, 255])
def test_every_pair_of_neighbouring_bytes(s):
    """All 65536 ordered byte pairs (a, b) as words [a, b, b, a]: a NaN flag never leaks into
    a neighbouring value (the carry of (v & 0x7f) + 1 stays in its byte)."""
    a = np.repeat(np.arange(256, dtype=U32), 256)
    b = np.tile(np.arange(256, dtype=U32), 256)
    words = a | (b << U32(8)) | (b << U32(16)) | (a << U32(24))
    _check(words, s)


def test_nan_activation_reaches_the_cache_as_nan_codes():
    """The writers' quantiser (the Python pool path) stores +NaN as 0x7f and -NaN as 0xff:
    the bytes the kernel must read as NaN."""
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    x[0, 3], x[1, 60] = float("nan"), -float("nan")
    q, _ = fp8_e4m3_quantize(x, 64)
    codes = q.view(torch.uint8)
    assert int(codes[0, 3]) == 0x7F and int(codes[1, 60]) == 0xFF
