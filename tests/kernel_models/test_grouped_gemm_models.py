"""Host models of the grouped GEMM kernel's index logic (csrc/kernels/grouped_gemm*.cuh), CPU.

Transcriptions of: the shared-memory plan of every tile variant (Cfg), the per-expert unit
schedule (prefix sum, binary search, weight block / row block of a unit) and the host's grid
bound, the 128-byte swizzle written by the loaders and the FP8/FP4 converters against the
address the wgmma descriptor reads, the gate/up row interleave of the SwiGLU epilogue against
the wgmma accumulator layout, the e2m1 byte-permutation decoder, the e8m0 scale-word read, and
the activation quantisation's power-of-two scale. Each is compared with an independent
statement of what it must compute. If the kernel's index logic changes, change its model here.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dsv4.ops.quant import ue8m0_scale

BF16, FP8, FP4 = 0, 1, 2
STORE, SWIGLU = 0, 1
K_BK = 64
SMEM_LIMIT, SMEM_3 = 232448, 76800
MAX_EXPERTS, ROPE_PAIRS = 1024, 32


def round_up(v, m):
    return (v + m - 1) // m * m


def cfg(fmt, epi, rope, nwg, bn, smem_limit, ovl):
    """struct Cfg (grouped_gemm.cuh)."""
    c = {}
    c["threads"] = 128 * nwg
    c["rows_a"] = 64 * nwg
    c["raw_row"] = {BF16: 128, FP8: 64, FP4: 32}[fmt]
    c["raw_chunks"] = c["raw_row"] // 16
    c["elems_per_chunk"] = {BF16: 8, FP8: 16, FP4: 32}[fmt]
    c["a_chunks"] = c["rows_a"] * c["raw_chunks"] // c["threads"]
    c["b_chunks"] = bn * 8 // c["threads"]
    c["b_bytes"] = bn * 128
    c["a_raw_bytes"] = c["rows_a"] * c["raw_row"]
    c["scale_bytes"] = 0 if fmt == BF16 else c["threads"] * c["a_chunks"] * 4
    c["stage_stride"] = round_up(c["b_bytes"] + c["a_raw_bytes"] + c["scale_bytes"], 1024)
    c["abf16_bytes"] = 0 if fmt == BF16 else c["rows_a"] * 128
    c["abufs"] = 3 if ovl else 2
    c["rope_bytes"] = bn * ROPE_PAIRS * 8 if rope else 0
    c["rw_bytes"] = bn * 4 if epi == SWIGLU else 0
    c["prefix_bytes"] = (MAX_EXPERTS + 1) * 4
    fixed = c["abufs"] * c["abf16_bytes"] + c["rope_bytes"] + c["rw_bytes"] + c["prefix_bytes"] + 1024
    max_stages = 32 if (nwg == 1 and smem_limit == SMEM_LIMIT) else (12 if fmt == FP4 else 8)
    c["stages"] = min((smem_limit - fixed) // c["stage_stride"], max_stages)
    c["off_abf16"] = c["stages"] * c["stage_stride"]
    c["off_rope"] = c["off_abf16"] + c["abufs"] * c["abf16_bytes"]
    c["off_rw"] = c["off_rope"] + c["rope_bytes"]
    c["off_prefix"] = c["off_rw"] + c["rw_bytes"]
    c["smem"] = c["off_prefix"] + c["prefix_bytes"] + 1024
    c["feat"] = c["rows_a"] // 2 if epi == SWIGLU else c["rows_a"]
    c["epi_stride"] = c["feat"] * 2 + 16
    c["prefetch"] = c["stages"] - 2 if ovl else c["stages"] - 1
    return c


def variants():
    """Every kernel variant launch_tile (grouped_gemm.cuh) instantiates."""
    out = []
    for fmt, epi, rope in [(f, e, r) for f in (BF16, FP8, FP4) for e in (STORE, SWIGLU)
                           for r in (False, True)]:
        if rope and (epi == SWIGLU or fmt == FP4):
            continue
        out += [(fmt, epi, rope, 1, 16, SMEM_3, False), (fmt, epi, rope, 1, 16, SMEM_LIMIT, False)]
        for bn in (64, 128, 256):
            out.append((fmt, epi, rope, 2, bn, SMEM_LIMIT, False))
            if not (bn == 256 and rope and fmt != BF16):
                out.append((fmt, epi, rope, 2, bn, SMEM_LIMIT, True))
    return out


@pytest.mark.parametrize("v", variants())
def test_smem_plan_regions_disjoint_and_aligned(v):
    fmt, epi, rope, nwg, bn, lim, ovl = v
    c = cfg(*v)
    assert c["stages"] >= (3 if ovl else 2)
    assert c["smem"] <= lim
    if lim == SMEM_3:  # three CTAs per SM: 3 x (smem + 1 KB reserved) <= 228 KB
        assert 3 * (c["smem"] + 1024) <= 228 * 1024
    assert c["a_chunks"] * c["threads"] == c["rows_a"] * c["raw_chunks"]
    assert c["b_chunks"] * c["threads"] == bn * 8
    assert c["threads"] % c["raw_chunks"] == 0 and c["threads"] % 8 == 0  # fixed chunk columns
    # wgmma operands need 1024-byte aligned tiles (the swizzle atom); the base is aligned in
    # the kernel ((raw + 1023) & ~1023, covered by the 1024 bytes of slack in smem)
    for off in (0, c["b_bytes"], c["stage_stride"], c["off_abf16"], c["abf16_bytes"]):
        assert off % 1024 == 0
    # regions in order and disjoint: stages | bf16 A buffers | rope | rw | prefix
    assert c["b_bytes"] + c["a_raw_bytes"] + c["scale_bytes"] <= c["stage_stride"]
    assert c["off_rope"] % 8 == 0 and c["off_rw"] % 4 == 0 and c["off_prefix"] % 4 == 0
    # the epilogue's staged tile overlays the stages only
    assert bn * c["epi_stride"] <= c["stages"] * c["stage_stride"]
    assert c["epi_stride"] % 16 == 0  # 16-byte reads of the staged rows
    assert c["prefetch"] >= 1


# ---------------------------------------------------------------------------- unit schedule
def mma_width(rows):
    for w in (8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256):
        if rows <= w:
            return w
    return 256


def expert_rows(offsets, pairs, e):
    if offsets is None:
        return 0, pairs
    lo, hi = int(offsets[e]), int(offsets[e + 1])
    lo = 0 if lo < 0 else min(lo, pairs)
    hi = lo if hi < lo else min(hi, pairs)
    return lo, hi - lo


def host_unit_bound(offsets, pairs, E, rows, feat, bn):
    """launch_variant (grouped_gemm.cuh): the grid's upper bound of the unit count."""
    n_fb = (rows + feat - 1) // feat
    if offsets is None:
        tiles = E * ((pairs + bn - 1) // bn)
    else:
        tiles = min(pairs, E) + (pairs + bn - 1) // bn
    return n_fb * tiles


def model_units(offsets, pairs, E, rows, feat, bn):
    """The kernel's prefix sum and per-unit decode: [(e, fb, pt, rows_t, nsel)] for u < total."""
    n_fb = (rows + feat - 1) // feat
    upre = [0] * (E + 1)
    for e in range(E):
        _, cnt = expert_rows(offsets, pairs, e)
        upre[e + 1] = n_fb * ((cnt + bn - 1) // bn)
    for e in range(E):
        upre[e + 1] += upre[e]
    total = upre[E]
    units = []
    for u in range(total):
        lo, hi = 0, E
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            if upre[mid] <= u:
                lo = mid
            else:
                hi = mid
        e = lo
        p0, cnt = expert_rows(offsets, pairs, e)
        n_tb = (cnt + bn - 1) // bn
        local = u - upre[e]
        fb, tb = local // n_tb, local % n_tb
        pt = p0 + tb * bn
        rows_t = min(cnt - tb * bn, bn)
        units.append((e, fb, pt, rows_t, mma_width(rows_t)))
    return total, units


def _offsets_cases():
    rng = np.random.default_rng(3)
    cases = [("no offsets, 1 expert", None, 300, 1), ("no offsets, 8 groups", None, 70, 8),
             ("one pair", np.array([0, 1], dtype=np.int64), 1, 1)]
    for E, P in [(6, 300), (256, 1536), (256, 24), (1024, 5000), (3, 0)]:
        cuts = np.sort(rng.integers(0, P + 1, size=E - 1))
        off = np.concatenate([[0], cuts, [max(P - 3, 0)]])
        off[1:-1] = np.minimum(off[1:-1], off[-1])
        cases.append((f"random E{E} P{P}", off, P, E))
    cases.append(("all pairs on one expert", np.array([0, 0, 0, 600, 600]), 600, 4))
    cases.append(("all on the last expert", np.array([0] * 256 + [700]), 700, 256))
    cases.append(("offsets past pairs and negative", np.array([-5, 3, 3, 900]), 40, 3))
    cases.append(("decreasing pair", np.array([0, 30, 10, 40]), 40, 3))
    return cases


@pytest.mark.parametrize("bn,feat", [(16, 64), (16, 32), (64, 128), (128, 64), (256, 128)])
@pytest.mark.parametrize("name,offsets,pairs,E", _offsets_cases(),
                         ids=[c[0] for c in _offsets_cases()])
def test_unit_schedule_covers_each_output_once(name, offsets, pairs, E, bn, feat):
    rows = 136  # not a multiple of the tile: the last weight block is partial
    total, units = model_units(offsets, pairs, E, rows, feat, bn)
    seen = {}
    for e, fb, pt, rows_t, nsel in units:
        assert 1 <= rows_t <= bn and rows_t <= nsel <= bn  # nsel is one of the instantiated widths
        assert 0 <= fb * feat < rows
        for p in range(pt, pt + rows_t):
            key = (e, fb, p)
            assert key not in seen, f"output block {key} computed twice"
            seen[key] = True
    want = set()
    n_fb = (rows + feat - 1) // feat
    for e in range(E):
        p0, cnt = expert_rows(offsets, pairs, e)
        assert 0 <= p0 and p0 + cnt <= pairs  # rows of a unit never leave [0, pairs)
        want |= {(e, fb, p) for fb in range(n_fb) for p in range(p0, p0 + cnt)}
    assert set(seen) == want
    monotone = offsets is None or all(
        expert_rows(offsets, pairs, e)[0] + expert_rows(offsets, pairs, e)[1]
        <= expert_rows(offsets, pairs, e + 1)[0] or expert_rows(offsets, pairs, e + 1)[1] == 0
        for e in range(E - 1))
    if monotone:  # the grid bound holds for dispatch's (non-decreasing) offsets
        assert total <= host_unit_bound(offsets, pairs, E, rows, feat, bn)


# ------------------------------------------------------------------------------- swizzle
def consumer_addr(tile_row, k):
    """Byte offset, in a 1024-aligned K-major tile, that wgmma reads for (row, k) with the
    descriptor start at tile + ks * 32 (ks = k // 16) and SBO 1024: the logical address, then
    the 128-byte swizzle (address bits 4-6 XOR bits 7-9)."""
    ks, kk = divmod(k, 16)
    logical = ks * 32 + (tile_row // 8) * 1024 + (tile_row % 8) * 128 + kk * 2
    return logical ^ (((logical >> 7) & 7) << 4)


def producer_addrs(fmt, nwg, bn):
    """{(operand, tile_row, k): byte offset} written by the kernel for one k step."""
    c = cfg(fmt, STORE, False, nwg, bn, SMEM_LIMIT, False)
    T = c["threads"]
    out = {}
    for tid in range(T):
        a_col = tid % c["raw_chunks"]
        for j in range(c["a_chunks"]):
            r = (tid + j * T) // c["raw_chunks"]
            if fmt == BF16:  # cp.async straight into the swizzled tile
                dst = r * 128 + (((a_col ^ r) & 7) << 4)
                for q in range(8):
                    out[("A", r, a_col * 8 + q)] = dst + 2 * q
            elif fmt == FP8:  # 16 values -> bf16 chunks 2 a_col, 2 a_col + 1
                for h in range(2):
                    dst = r * 128 + ((((2 * a_col + h) ^ r) & 7) << 4)
                    for q in range(8):
                        out[("A", r, a_col * 16 + h * 8 + q)] = dst + 2 * q
            else:  # 32 values -> bf16 chunks 4 a_col .. 4 a_col + 3 (word w = values 8w .. 8w+7)
                for w in range(4):
                    dst = r * 128 + ((((4 * a_col + w) ^ r) & 7) << 4)
                    for q in range(8):
                        out[("A", r, a_col * 32 + w * 8 + q)] = dst + 2 * q
        b_col = tid & 7
        for j in range(c["b_chunks"]):
            br = (tid + j * T) >> 3
            dst = br * 128 + (((b_col ^ br) & 7) << 4)
            for q in range(8):
                out[("B", br, b_col * 8 + q)] = dst + 2 * q
    return out


@pytest.mark.parametrize("fmt", [BF16, FP8, FP4])
@pytest.mark.parametrize("nwg,bn", [(1, 16), (2, 64), (2, 256)])
def test_swizzle_written_where_wgmma_reads(fmt, nwg, bn):
    prod = producer_addrs(fmt, nwg, bn)
    rows = {"A": 64 * nwg, "B": bn}
    for op, n in rows.items():
        addrs = set()
        for r in range(n):
            for k in range(K_BK):
                got = prod[(op, r, k)]
                # warpgroup wg's A slab starts at wg * 64 * 128 (a 1024-aligned descriptor base)
                base, row = ((r // 64) * 64 * 128, r % 64) if op == "A" else (0, r)
                assert got == base + consumer_addr(row, k), (op, r, k)
                addrs.add(got)
        assert len(addrs) == n * K_BK and max(addrs) < n * 128  # a bijection onto the tile


def test_swiglu_interleave_matches_accumulator_rows():
    """Tile row r holds gate (m = 0) / up (m = 1) of weight row wr; a thread's wgmma fragment
    rows (w4 * 16 + g and + 8 of its warpgroup's m64 slab) must be gate and up of the same
    feature f = wg * 32 + w4 * 8 + g that the epilogue writes."""
    for nwg in (1, 2):
        feat = 32 * nwg
        for fb in (0, 3):
            def loader(r):  # grouped_gemm.cuh, weight rows this thread loads (kSwiGLU)
                return fb * feat + (r >> 4) * 8 + (r & 7), (r >> 3) & 1
            seen = set()
            for r in range(64 * nwg):
                seen.add(loader(r))
            assert seen == {(fb * feat + f, m) for f in range(feat) for m in (0, 1)}
            for wg in range(nwg):
                for w4 in range(4):
                    for g in range(8):
                        r0 = wg * 64 + w4 * 16 + g
                        f = wg * 32 + w4 * 8 + g
                        assert loader(r0) == (fb * feat + f, 0)
                        assert loader(r0 + 8) == (fb * feat + f, 1)


def test_store_epilogue_accumulator_layout():
    """wgmma m64nN f32 accumulator: d[i] of lane l in warp w4 is row 16 w4 + l/4 + 8 ((i>>1)&1),
    column 8 (i>>2) + 2 (l&3) + (i&1). The store epilogue's (row r0 / r0 + 8, column c + h)
    for acc[i*4 + h] / acc[i*4 + 2 + h] must be exactly that, each (row, column) once."""
    for bn in (16, 64):
        seen = set()
        for w4 in range(4):
            for lane in range(32):
                g, tg = lane >> 2, lane & 3
                for i in range(bn // 8):
                    c = i * 8 + 2 * tg
                    for h in range(2):
                        for up in range(2):
                            idx = i * 4 + up * 2 + h
                            row = 16 * w4 + (lane >> 2) + 8 * ((idx >> 1) & 1)
                            col = 8 * (idx >> 2) + 2 * (lane & 3) + (idx & 1)
                            assert (row, col) == (w4 * 16 + g + 8 * up, c + h)
                            seen.add((row, col))
        assert len(seen) == 64 * bn


# ------------------------------------------------------------------------------ FP4 decode
def byte_perm(a, b, sel):
    src = (int(b) << 32) | int(a)
    r = 0
    for i in range(4):
        idx = (sel >> (4 * i)) & 7
        r |= ((src >> (8 * idx)) & 0xFF) << (8 * i)
    return r


def e2m1x8_to_bf16x8(w):
    """grouped_gemm_fp4.cuh, transcribed."""
    kHi0, kHi1, kLo0, kLo1 = 0x3F3F3F00, 0x40404040, 0xC0800000, 0xC0804000
    m = w & 0x77777777
    hi_a, lo_a = byte_perm(kHi0, kHi1, m), byte_perm(kLo0, kLo1, m)
    mb = m >> 16
    hi_b, lo_b = byte_perm(kHi0, kHi1, mb), byte_perm(kLo0, kLo1, mb)
    out = [byte_perm(lo_a, hi_a, 0x5140), byte_perm(lo_a, hi_a, 0x7362),
           byte_perm(lo_b, hi_b, 0x5140), byte_perm(lo_b, hi_b, 0x7362)]
    ev, od = (w << 4) & 0x80808080, w & 0x80808080
    for k, sel in enumerate((0x4000, 0x5111, 0x6222, 0x7333)):
        out[k] |= byte_perm(ev & 0xFFFFFFFF, od, sel) & 0x80008000
    return out


def bf16_bits_to_float(b):
    return float(np.array([b << 16], dtype=np.uint32).view(np.float32)[0])


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_e2m1_decoder_every_code_in_every_position():
    rng = np.random.default_rng(11)
    words = [int(x) for x in rng.integers(0, 2**32, size=64, dtype=np.uint64)]
    for pos in range(8):
        for code in range(16):
            for w0 in words[:8]:
                w = (w0 & ~(0xF << (4 * pos))) | (code << (4 * pos))
                out = e2m1x8_to_bf16x8(w)
                for j in range(8):
                    c = (w >> (4 * j)) & 0xF
                    bits = (out[j // 2] >> (16 * (j % 2))) & 0xFFFF
                    want = -E2M1[c & 7] if c & 8 else E2M1[c & 7]
                    got = bf16_bits_to_float(bits)
                    assert got == want and np.signbit(got) == bool(c & 8), (hex(w), j)


def test_fp4_fast_scale_range_is_exact():
    """The bf16x2 multiply path is taken for s in [2^-118, 2^118]: every e2m1 value times such
    a power of two is a normal bf16 (exact, no subnormal flush, no overflow)."""
    for e in (-118, -100, 0, 100, 118):
        s = 2.0 ** e
        for v in E2M1[1:]:
            p = v * s
            assert 2.0 ** -126 <= p < 2.0 ** 128
            assert torch.tensor(p, dtype=torch.float32).to(torch.bfloat16).double().item() == p


# ----------------------------------------------------------------------------- e8m0 scales
@pytest.mark.parametrize("n", [1, 2, 3, 5, 9, 4095])
def test_e8m0_word_read_stays_inside_the_scale_tensor(n):
    """load_step reads the 4-byte-aligned word holding scale byte si, only its first
    (si & 3) + 1 bytes (cp.async src-size; the rest zero-filled), and the converter takes byte
    si & 3 of the little-endian word: never a byte past scale[n - 1], always scale[si]."""
    rng = np.random.default_rng(n)
    scale = rng.integers(0, 256, size=n, dtype=np.uint8)
    for si in range(n):
        word_start, src_bytes = si & ~3, (si & 3) + 1
        assert 0 <= word_start and word_start + src_bytes <= n
        word = bytearray(4)
        word[:src_bytes] = scale[word_start:word_start + src_bytes].tobytes()
        w = int.from_bytes(bytes(word), "little")
        assert (w >> (8 * (si & 3))) & 0xFF == scale[si]


# ------------------------------------------------------------------------ act_quant scale
def test_act_quant_scale_bits_match_ue8m0_scale():
    """fp8_act_quant_sim_kernel: s from the bits of amax / 448 (exponent, + 1 unless the
    mantissa is 0) equals dsv4.ops.quant.ue8m0_scale for every amax class (powers of two,
    their neighbours, random), amax >= 1e-4 as the kernel clamps it."""
    rng = np.random.default_rng(5)
    vals = [1e-4, 448.0, 448.0 * 2, 448.0 * 0.5, 3e38 / 2, 1.0, 0.0001234]
    for e in range(-13, 120):
        p = np.float32(448.0) * np.float32(2.0) ** e
        vals += [p, np.nextafter(p, np.float32(0)), np.nextafter(p, np.float32(np.inf))]
    vals += list(np.exp(rng.uniform(np.log(1e-4), np.log(1e38), size=2000)))
    amax = np.maximum(np.array(vals, dtype=np.float32), np.float32(1e-4))
    amax = amax[np.isfinite(amax)]
    rb = (amax / np.float32(448.0)).astype(np.float32).view(np.uint32)
    ex = (rb >> 23) & 0xFF
    ex = np.where((rb & 0x7FFFFF) != 0, ex + 1, ex)
    s_kernel = (ex.astype(np.uint32) << 23).view(np.float32)
    s_ref = ue8m0_scale(torch.from_numpy(amax), 448.0).numpy()
    np.testing.assert_array_equal(s_kernel, s_ref)
