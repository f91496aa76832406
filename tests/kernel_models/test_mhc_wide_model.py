"""Host model of the index logic of mhc.cu's one-pass prefill kernel (mhc_wide_kernel, the
pipelined version). CPU only.

The kernel runs a cluster of 16 CTAs per 32-token tile. CTA `rank` owns the dims
[rank·W, rank·W + W) of the 4 streams (W = dim / 16). This file transcribes from the kernel:
- the tile loads (thread -> token, stream, 16-byte chunk) and the rotation of the three x
  buffers (which buffer each tile loads into, is multiplied from and collapsed from);
- each warp's columns and its fn B fragments, and the ldmatrix / mma fragment maps;
- the staging per m16 half: stage[warp][16 tokens][25], with the mixes in columns [0, n) and
  Σx² in column 24, also for the head;
- the CTA-sum threads (tid -> token, sent column) and their st.async destination: finalising
  rank ti / 2, receive slot [parity][sender rank][ti % 2][25];
- the finalise by warp 15 (half h -> token 2·rank + h, lane -> sent column(s), sent column ->
  32-column row) and its pre broadcast (lane l of each half -> CTA l);
- the collapse items of u;
- the post/comb tail's token enumeration;
- the shared-memory carve-up, its bank behaviour and its 232,448-byte limit.

The PTX fragment layouts (ldmatrix x4, mma m16n8k16 A / B / C) are stated here independently,
from the PTX ISA. The projection computed through them, staged, summed per CTA, sent,
received and finalised is compared with x̂ · fnᵀ and Σx̂².

The constants that the kernel also states are read from csrc/kernels/mhc.cu and compared with
the model's: tile size, warps, buffers, row width, the smem offsets and total, the byte counts
of the mbarriers, the dims of the wide path. So a change of the kernel fails here until the
model follows it. Keep both in step.

The ORDER of the cross-CTA steps is not modelled here: the mbarrier phases, the parities of the
double-buffered slots, and which tile's data a wait may see. That is
tests/ops/test_mhc_wide_protocol.py, which runs the loop's schedule with random delivery.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

# The model's constants (each is checked against the kernel source below).
HC, CLUSTER, TM, THREADS, WARPS, FIN_WARP = 4, 16, 32, 512, 16, 15
MAX_KS, PARTS, XBUFS, BARS = 4, 3, 3, 4
RP, ROW_SUMSQ = 25, 24          # staged / sent row: floats, and the column of Σx² in it
PART_COLS, SUMSQ_COL = 32, 31   # the finalised row (rows output, tot)
SMEM_LIMIT = 232448
WIDE_DIMS = (1024, 2048, 4096)

ROOT = Path(__file__).resolve().parents[2]
KERNEL_FILE = ROOT / "csrc" / "kernels" / "mhc.cu"
HEADER_FILE = ROOT / "csrc" / "include" / "dsv4" / "mhc.h"


def wide_dim_ok(dim):
    return dim in (CLUSTER * 64, CLUSTER * 128, CLUSTER * 256)


def pitch(W):
    """bf16 elements per token row of an x buffer: the 4·W slice columns and 8 of padding."""
    return HC * W + 8


def n_real_of(head):
    return 4 if head else 24


# ---------------------------------------------------------------------------------------------
# the kernel source: constants, constexpr functions, the smem carve-up (parsed, not compiled)
# ---------------------------------------------------------------------------------------------
def _strip_comments(text):
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))


def _c_to_py(expr):
    """An integer C++ constant expression (names, + - * /, casts, sizeof, ==, ||) as Python."""
    e = re.sub(r"static_cast<\w+>", "", expr)
    e = e.replace("sizeof(float)", "4").replace("sizeof(uint64_t)", "8")
    e = e.replace("||", " or ").replace("/", "//")
    e = " ".join(e.split())
    if not re.fullmatch(r"[\w\s+\-*/()=]*", e):
        raise ValueError(f"not a simple constant expression: {expr!r}")
    return e


class KernelSource:
    """Reads constants out of mhc.cu (and mhc.h) by their definitions' text."""

    def __init__(self):
        self.text = _strip_comments(KERNEL_FILE.read_text())
        both = self.text + _strip_comments(HEADER_FILE.read_text())
        self.defs = {}
        for m in re.finditer(r"constexpr\s+(?:int|int64_t|uint32_t|size_t)\s+(k\w+)\s*=\s*([^;]+);",
                             both):
            self.defs.setdefault(m.group(1), set()).add(" ".join(m.group(2).split()))
        self.funcs = {m.group(1): m.group(2) for m in re.finditer(
            r"constexpr\s+\w+\s+(wide_\w+)\(int W\)\s*\{\s*return\s+([^;]+);", self.text)}

    def _ns(self, py, extra):
        names = set(re.findall(r"[A-Za-z_]\w*", py)) - {"or"}
        ns = {}
        for n in names:
            if n in extra:
                ns[n] = extra[n]
            elif n in self.funcs:
                ns[n] = self.func(n)
            else:
                ns[n] = self.const(n, **extra)
        return ns

    def const(self, name, **extra):
        if name in extra:
            return extra[name]
        exprs = self.defs.get(name)
        assert exprs is not None, f"{name} is not defined in mhc.cu / mhc.h"
        assert len(exprs) == 1, f"{name} has several definitions: {exprs}"
        py = _c_to_py(next(iter(exprs)))
        return eval(py, {"__builtins__": {}}, self._ns(py, extra))  # noqa: S307 (own source)

    def func(self, name):
        py = _c_to_py(self.funcs[name])

        def f(W):
            return eval(py, {"__builtins__": {}}, self._ns(py, {"W": W}))  # noqa: S307
        return f

    def wide_dim_ok(self, dim):
        m = re.search(r"bool\s+wide_dim_ok\(int64_t dim\)\s*\{\s*return\s+([^;]+);", self.text)
        py = _c_to_py(m.group(1))
        return eval(py, {"__builtins__": {}}, self._ns(py, {"dim": dim}))  # noqa: S307

    def smem_limit(self):
        m = re.search(r"static_assert\(\s*wide_smem_bytes\(64 \* kWideMaxKs\)\s*<=\s*(\d+)",
                      self.text)
        return int(m.group(1))

    def smem_carve_up(self, W):
        """Byte offsets of the kernel's pointers into its dynamic shared memory."""
        start = self.text.index("mhc_wide_kernel(const WideArgs a) {")
        body = self.text[start:self.text.index("cg::cluster_group", start)]
        assert re.search(r"\bsX\s*=\s*reinterpret_cast<__nv_bfloat16\s*\*>\(smem\)", body)
        out = {"x": 0}
        m = re.search(r"float\s*\*\s*(\w+)\s*=\s*reinterpret_cast<float\s*\*>\("
                      r"smem\s*\+\s*wide_x_bytes\(W\)\)", body)
        out[m.group(1)] = self.func("wide_x_bytes")(W)
        for m in re.finditer(r"float\s*\*\s*(\w+)\s*=\s*(\w+)\s*(?:\+\s*([^;]+))?;", body):
            name, base, off = m.groups()
            out[name] = out[base] + 4 * (self.const_expr(off) if off else 0)
        m = re.search(r"(\w+)\s*=\s*reinterpret_cast<uint64_t\s*\*>\((\w+)\s*\+\s*([^)]+)\)", body)
        out[m.group(1)] = out[m.group(2)] + 4 * self.const_expr(m.group(3))
        return out

    def const_expr(self, expr, **extra):
        py = _c_to_py(expr)
        return eval(py, {"__builtins__": {}}, self._ns(py, extra))  # noqa: S307


@lru_cache(maxsize=1)
def kernel():
    return KernelSource()


def test_model_constants_are_the_kernels():
    k = kernel()
    assert k.const("kHc") == HC
    assert k.const("kCluster") == CLUSTER
    assert k.const("kWideTM") == TM
    assert k.const("kWideThreads") == THREADS
    assert k.const("kWideWarps") == WARPS
    assert k.const("kFinWarp") == FIN_WARP
    assert k.const("kWideMaxKs") == MAX_KS
    assert k.const("kParts") == PARTS
    assert k.const("kXBufs") == XBUFS
    assert k.const("kRP") == RP
    assert k.const("kRowSumsq") == ROW_SUMSQ
    assert k.const("kPartCols") == PART_COLS
    assert k.const("kSumsqCol") == SUMSQ_COL
    assert k.const("kWideBars") == BARS
    assert k.smem_limit() == SMEM_LIMIT
    for W in (64, 128, 256):
        assert k.func("wide_pitch")(W) == pitch(W)
    for head in (False, True):     # the expect-tx byte counts of one tile
        n = n_real_of(head)
        assert k.const("kRecvBytes", kNReal=n) == CLUSTER * 2 * (n + 1) * 4
        assert k.const("kPreBytes", kNReal=n) == CLUSTER * 2 * HC * 4


def test_wide_path_dims():
    want = [d for d in range(8, 8200, 8) if wide_dim_ok(d)]
    assert want == list(WIDE_DIMS)
    assert [d for d in range(8, 8200, 8) if kernel().wide_dim_ok(d)] == want


# ---------------------------------------------------------------------------------------------
# shared memory
# ---------------------------------------------------------------------------------------------
def smem_layout(W):
    """Byte offsets of the dynamic shared memory: x [3][TM][pitch] bf16, then in floats stage
    [warps][16][RP], recv [2][ranks][2][RP], spre [2][TM][4], tot [2][32], pre_loc [2][4], then
    4 mbarriers (recv[2], pre[2]). The tail's scratch [32][4] and zero row [32] lie over stage."""
    off, out = XBUFS * TM * pitch(W) * 2, {"x": 0}
    for name, floats in (("stage", WARPS * 16 * RP), ("recv", 2 * CLUSTER * 2 * RP),
                         ("spre", 2 * TM * HC), ("tot", 2 * PART_COLS), ("pre_loc", 2 * HC)):
        out[name] = off
        off += 4 * floats
    out["bars"] = off
    out["end"] = off + 8 * BARS
    out["scratch"] = out["stage"]
    out["zero_row"] = out["stage"] + 4 * 32 * HC
    return out


@pytest.mark.parametrize("dim", WIDE_DIMS)
def test_smem_layout_is_the_kernels_fits_and_is_aligned(dim):
    W = dim // CLUSTER
    lay = smem_layout(W)
    k = kernel()
    carve = k.smem_carve_up(W)
    assert carve == {n: v for n, v in lay.items() if n != "end"}
    assert k.func("wide_smem_bytes")(W) == lay["end"]
    assert lay["end"] <= SMEM_LIMIT
    # the launch asks for the largest W's bytes (wide_clusters); that is W = 64 · MAX_KS
    assert max(smem_layout(64 * ks)["end"] for ks in (1, 2, 4)) == smem_layout(64 * MAX_KS)["end"]
    # cp.async / ldmatrix: every x buffer and every token row starts on 16 bytes
    assert (TM * pitch(W) * 2) % 16 == 0 and (pitch(W) * 2) % 16 == 0
    # float4 accesses: spre (st.async.v4, the collapse), pre_loc (the finaliser's float4 read)
    for name in ("spre", "pre_loc"):
        assert lay[name] % 16 == 0, name
    assert lay["bars"] % 8 == 0
    # the tail's scratch [32][4] and zero row [32] fit in stage, side by side
    assert lay["zero_row"] == lay["scratch"] + 4 * 32 * HC
    assert lay["zero_row"] + 4 * PART_COLS <= lay["recv"]


def bank_ways(word_addrs):
    """Shared-memory wavefronts of one warp access of 4-byte words (distinct words in the same
    bank conflict; one word read by several lanes is a broadcast)."""
    banks = {}
    for a in set(word_addrs):
        banks.setdefault(a % 32, set()).add(a)
    return max(len(v) for v in banks.values())


def stage_store_ways(rp, n_real, nt_count):
    """Worst bank conflict of the stage stores (warp w, rows g + 8 h, columns nt·8 + c2 + e;
    Σx² in column ROW_SUMSQ by the lanes with lane % 4 == 0)."""
    worst = 0
    for h in range(2):
        for nt in range(nt_count):
            for e in range(2):
                addrs = [(lane // 4 + 8 * h) * rp + nt * 8 + (lane % 4) * 2 + e
                         for lane in range(32) if nt * 8 + (lane % 4) * 2 + e < n_real]
                if addrs:
                    worst = max(worst, bank_ways(addrs))
        worst = max(worst, bank_ways([(lane // 4 + 8 * h) * rp + ROW_SUMSQ
                                      for lane in range(0, 32, 4)]))
    return worst


def test_bank_behaviour():
    # ldmatrix: the 8 row addresses of one 8x8 matrix (row pitch 2·pitch bytes) hit 8 distinct
    # 16-byte bank groups
    for W in (64, 128, 256):
        assert len({(r * pitch(W) * 2 // 16) % 8 for r in range(8)}) == 8
    # stage stores: 2-way at the 25-float rows for hc_pre (8-way at the former 32-float rows),
    # conflict-free for the head (lanes with c2 < 4 only)
    assert stage_store_ways(RP, 24, 3) == 2 and stage_store_ways(RP, 4, 1) == 1
    assert stage_store_ways(32, 24, 3) == 8
    # the CTA sums' stage reads (thread tid: token tid / n_send, staged column of tid % n_send;
    # one read per warp w, at the same offset for every lane): conflict-free for hc_pre,
    # 2-way for the head
    for n_real, want in ((24, 1), (4, 2)):
        n_send, worst = n_real + 1, 0
        for w0 in range(0, 16 * n_send, 32):
            addrs = []
            for tid in range(w0, min(w0 + 32, 16 * n_send)):
                i, c = divmod(tid, n_send)
                addrs.append(i * RP + (ROW_SUMSQ if c == n_real else c))
            worst = max(worst, bank_ways(addrs))
        assert worst == want


# ---------------------------------------------------------------------------------------------
# x tiles: the loads and the three buffers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", WIDE_DIMS)
@pytest.mark.parametrize("tokens", [9, 40, 64, 100])
def test_tile_loads_cover_the_slice_once(dim, tokens):
    W = dim // CLUSTER
    per_token = HC * (W // 8)
    ld_tokens = THREADS // per_token
    assert THREADS % per_token == 0
    for rank in (0, 7, 15):
        slice0 = rank * W
        for tile in range((tokens + TM - 1) // TM):
            buf = tile % XBUFS                    # one cluster: the n-th tile is tile n
            smem_hits = np.zeros(XBUFS * TM * pitch(W), np.int64)
            global_hits = set()
            for tid in range(THREADS):
                i0 = tid // per_token
                s, ch = (tid % per_token) // (W // 8), tid % (W // 8)
                soff, goff = s * W + ch * 8, s * dim + slice0 + ch * 8
                for i in range(i0, TM, ld_tokens):
                    dst = buf * TM * pitch(W) + i * pitch(W) + soff
                    assert dst % 8 == 0 and dst + 8 <= buf * TM * pitch(W) + i * pitch(W) + HC * W
                    smem_hits[dst:dst + 8] += 1
                    t = tile * TM + i
                    if t < tokens:               # else zero-filled, source not read
                        assert 0 <= goff and goff + 8 <= HC * dim
                        global_hits.add((t, goff))
            # every element of the buffer's token rows' 4·W slice columns written once, pads and
            # the other buffers never
            rows = smem_hits.reshape(XBUFS, TM, pitch(W))
            assert (rows[buf, :, :HC * W] == 1).all() and (rows[buf, :, HC * W:] == 0).all()
            assert (np.delete(rows, buf, axis=0) == 0).all()
            n_valid = min(TM, tokens - tile * TM)
            assert len(global_hits) == n_valid * HC * (W // 8)


@pytest.mark.parametrize("my_tiles", [0, 1, 2, 3, 4, 7])
def test_x_buffers_rotation(my_tiles):
    """One CTA's loop `for it in 0..my_tiles` (it: the CTA's n-th tile): at the top, cp.async
    wait and __syncthreads; then load tile it + 1 into `next`, multiply tile it from `cur`,
    collapse u of tile it - 1 from `prev`, and cur = next. Tile 0 goes into buffer 0 before the
    loop. Each buffer must be loaded in an earlier iteration than its reads, and it must not be
    reloaded before the last read of its tile. A read in iteration j comes before the top
    barrier of j + 1. A load in iteration j comes after the top barrier of j."""
    events = []                                   # (iteration, order in it, kind, buf, tile)
    if my_tiles > 0:
        events.append((-1, 0, "load", 0, 0))
    cur = 0
    for it in range(my_tiles + 1):
        prev = XBUFS - 1 if cur == 0 else cur - 1
        nxt = 0 if cur == XBUFS - 1 else cur + 1
        assert (cur, prev, nxt) == (it % 3, (it - 1) % 3, (it + 1) % 3)
        if it + 1 < my_tiles:
            events.append((it, 1, "load", nxt, it + 1))
        if it < my_tiles:
            events.append((it, 2, "mma", cur, it))
        if it >= 1:
            events.append((it, 3, "u", prev, it - 1))
        cur = nxt
    events.sort()
    holds = {}                                    # buf -> its tile, load iteration, reads
    for it, _, kind, buf, tile in events:
        if kind == "load":
            if buf in holds:                      # the buffer's previous tile is done with
                old = holds[buf]
                assert set(old["reads"]) == {"mma", "u"}, (buf, old)
                assert max(old["reads"].values()) < it, f"buffer {buf} reloaded too early"
            holds[buf] = {"tile": tile, "loaded": it, "reads": {}}
        else:
            h = holds[buf]
            assert h["tile"] == tile, f"{kind} of tile {tile} from buffer {buf} ({h})"
            assert h["loaded"] < it               # landed: cp.async wait at a later loop top
            assert kind not in h["reads"]
            h["reads"][kind] = it
    for buf, h in holds.items():
        assert set(h["reads"]) == {"mma", "u"}, (buf, h)
    loaded = sorted(e[4] for e in events if e[2] == "load")
    assert loaded == list(range(my_tiles))


# ---------------------------------------------------------------------------------------------
# fragments: PTX layouts stated independently, the kernel's choices transcribed
# ---------------------------------------------------------------------------------------------
def ptx_ldmatrix_x4(rows_addr_of_lane, read8):
    """ldmatrix.x4: matrix m takes its 8 row addresses from lanes 8m..8m+7; thread t receives
    row t // 4, elements 2 (t % 4), +1 of each matrix m as register m."""
    regs = np.zeros((32, 4, 2))
    for m in range(4):
        for t in range(32):
            row = read8(rows_addr_of_lane(8 * m + t // 4))
            regs[t, m] = row[2 * (t % 4):2 * (t % 4) + 2]
    return regs


def ptx_mma_16816(a_regs, b_regs):
    """mma.m16n8k16 row.col: A [16, 16] from a0 (g, 2q..), a1 (g + 8, 2q..), a2 (g, 8 + 2q..),
    a3 (g + 8, 8 + 2q..); B [16, 8] from b0 (k 2q.., n g), b1 (k 8 + 2q.., n g); returns
    D = A·B as the C fragments c0, c1 (g, 2q..), c2, c3 (g + 8, 2q..); g = lane / 4,
    q = lane % 4."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, q = lane // 4, lane % 4
        A[g, 2 * q:2 * q + 2] = a_regs[lane, 0]
        A[g + 8, 2 * q:2 * q + 2] = a_regs[lane, 1]
        A[g, 8 + 2 * q:8 + 2 * q + 2] = a_regs[lane, 2]
        A[g + 8, 8 + 2 * q:8 + 2 * q + 2] = a_regs[lane, 3]
        B[2 * q:2 * q + 2, g] = b_regs[lane, 0]
        B[8 + 2 * q:8 + 2 * q + 2, g] = b_regs[lane, 1]
    D = A @ B
    c = np.zeros((32, 4))
    for lane in range(32):
        g, q = lane // 4, lane % 4
        c[lane] = [D[g, 2 * q], D[g, 2 * q + 1], D[g + 8, 2 * q], D[g + 8, 2 * q + 1]]
    return c


def model_stage(sx, fn, rank, dim, mt, n_real, nt_count):
    """Half mt of a tile on CTA `rank`: stage[warp][16][RP] as the 16 warps write it for tokens
    mt·16 .. mt·16 + 15: the projection through the fragment maps, Σx² from the A registers
    (sumsq_frag: a0, a2 -> row g; a1, a3 -> g + 8; xor 1, 2 shuffles sum a row's 4 lanes).
    NaN: not written in this half."""
    W, ks = dim // CLUSTER, dim // CLUSTER // 64
    slice0 = rank * W
    stage = np.full((WARPS, 16, RP), np.nan)
    for warp in range(WARPS):                    # warp 15 too: it only skips the CTA sums
        wcol = (warp >> 2) * W + (warp & 3) * (W // 4)
        kcol = (warp >> 2) * dim + slice0 + (warp & 3) * (W // 4)
        acc = np.zeros((nt_count, 32, 4))
        sq = np.zeros((32, 2))
        for j in range(ks):
            def addr(lane):
                return (mt * 16 + (lane & 15), wcol + j * 16 + (lane >> 4) * 8)

            a = ptx_ldmatrix_x4(addr, lambda rc: sx[rc[0], rc[1]:rc[1] + 8])
            for lane in range(32):
                sq[lane, 0] += (a[lane, 0] ** 2).sum() + (a[lane, 2] ** 2).sum()
                sq[lane, 1] += (a[lane, 1] ** 2).sum() + (a[lane, 3] ** 2).sum()
            for nt in range(nt_count):
                b = np.zeros((32, 2, 2))
                for lane in range(32):
                    n, c2 = nt * 8 + lane // 4, (lane % 4) * 2
                    if n < n_real:
                        k = kcol + j * 16 + c2
                        b[lane, 0] = fn[n, k:k + 2]
                        b[lane, 1] = fn[n, k + 8:k + 10]
                acc[nt] += ptx_mma_16816(a, b)   # the 3 bf16 parts sum to fn (exact split)
        for lane in range(32):
            quad = lane & ~3
            sq_row = sq[quad:quad + 4].sum(0)
            g, c2 = lane // 4, (lane % 4) * 2
            for h in range(2):
                row = stage[warp, g + 8 * h]
                for nt in range(nt_count):
                    n = nt * 8 + c2
                    if n < n_real:
                        row[n] = acc[nt, lane, 2 * h]
                    if n + 1 < n_real:
                        row[n + 1] = acc[nt, lane, 2 * h + 1]
                if lane & 3 == 0:
                    row[ROW_SUMSQ] = sq_row[h]
    return stage


def cta_sum_items(n_real):
    """The CTA-sum threads of one half: tid < 16·n_send -> (token i of the half, sent column c,
    its staged column). n_send = n_real + 1: the mixes, then Σx²."""
    n_send = n_real + 1
    for tid in range(16 * n_send):
        i, c = divmod(tid, n_send)
        yield tid, i, c, (ROW_SUMSQ if c == n_real else c)


def recv_offset(par, sender, slot, c):
    """Float offset in the finaliser's recv [2][ranks][2][RP] of sender's row `slot`, column c."""
    return ((par * CLUSTER + sender) * 2 + slot) * RP + c


@pytest.mark.parametrize("dim,head,k,n_valid", [(1024, False, 0, 32), (1024, True, 3, 9),
                                                (2048, False, 1, 20), (2048, True, 2, 32)])
def test_projection_through_fragments_stage_send_and_finalise(dim, head, k, n_valid):
    """One tile k (parity k & 1) of a cluster, n_valid real tokens (the rest zero-filled):
    stage, CTA sums, st.async into the finalisers' recv slots, finalise by warp 15, rows. The
    finalised rows must be x̂ · fnᵀ and Σx̂², and every slot written once with the bytes the
    mbarrier expects."""
    rng = np.random.default_rng(dim + 10 * head + k)
    n_real = n_real_of(head)
    nt_count = 1 if head else 3
    n_send = n_real + 1
    par = k & 1
    W = dim // CLUSTER
    x = rng.standard_normal((TM, HC, dim))
    x[n_valid:] = 0.0
    fn = rng.standard_normal((n_real, HC * dim))
    recv_floats = 2 * CLUSTER * 2 * RP
    recv = np.full((CLUSTER, recv_floats), np.nan)
    recv_bytes = np.zeros(CLUSTER, np.int64)
    for rank in range(CLUSTER):
        sx = np.zeros((TM, pitch(W)))             # the tile as the loads lay it out
        for s in range(HC):
            sx[:, s * W:(s + 1) * W] = x[:, s, rank * W:rank * W + W]
        for mt in range(TM // 16):
            stage = model_stage(sx, fn, rank, dim, mt, n_real, nt_count)
            for tid, i, c, sc in cta_sum_items(n_real):
                assert tid < THREADS and tid // 32 != FIN_WARP  # warp 15 finalises meanwhile
                col = stage[:, i, sc]
                assert not np.isnan(col).any()    # written in this half, by every warp
                v = col[0]
                for w in range(1, WARPS):         # warp order
                    v += col[w]
                ti = mt * 16 + i
                fr, off = ti >> 1, recv_offset(par, rank, ti & 1, c)
                assert 0 <= off < recv_floats and np.isnan(recv[fr, off])
                recv[fr, off] = v
                recv_bytes[fr] += 4
    assert (recv_bytes == kernel().const("kRecvBytes", kNReal=n_real)).all()
    # every slot the finaliser reads was written in this tile, and only those
    written = ~np.isnan(recv).reshape(CLUSTER, 2, CLUSTER, 2, RP)
    assert written[:, par, :, :, :n_send].all() and not written[:, 1 - par].any()
    assert not written[:, :, :, :, n_send:].any()

    rows = np.full((TM, PART_COLS), np.nan)     # the finalised rows (hc_pre: also global)
    for r in range(CLUSTER):                      # warp 15 of CTA r
        for lane in range(32):
            h, l = lane >> 4, lane & 15
            i = 2 * r + h
            src = (par * CLUSTER * 2 + h) * RP
            for q in range(2):
                c = l + 16 * q
                if c < n_send:
                    v = [recv[r, src + s * 2 * RP + c] for s in range(CLUSTER)]
                    assert [src + s * 2 * RP + c for s in range(CLUSTER)] == \
                        [recv_offset(par, s, h, c) for s in range(CLUSTER)]
                    tot = v[0]
                    for s in range(1, CLUSTER):   # rank order
                        tot += v[s]
                    oc = SUMSQ_COL if c == n_real else c
                    assert np.isnan(rows[i, oc])
                    rows[i, oc] = tot
    xf = x.reshape(TM, HC * dim)
    np.testing.assert_allclose(rows[:, :n_real], xf @ fn.T, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(rows[:, SUMSQ_COL], (xf ** 2).sum(1), rtol=1e-12)
    assert np.isnan(rows[:, n_real:SUMSQ_COL]).all()


def test_warp_columns_cover_the_slice_once():
    for dim in WIDE_DIMS:
        W, ks = dim // CLUSTER, dim // CLUSTER // 64
        assert ks <= MAX_KS and 16 * ks == W // 4
        for rank in range(CLUSTER):
            cols = []
            for warp in range(WARPS):
                kcol = (warp >> 2) * dim + rank * W + (warp & 3) * (W // 4)
                cols += [kcol + 16 * j + k for j in range(ks) for k in range(16)]
            want = [s * dim + rank * W + d for s in range(HC) for d in range(W)]
            assert sorted(cols) == want


@pytest.mark.parametrize("head", [False, True])
def test_send_finalise_and_pre_broadcast_maps(head):
    """Index maps alone: the CTA sums of each half cover (token, sent column) once, in threads
    of warps 0-14; token ti goes to rank ti / 2, slot ti % 2; warp 15 of rank r finalises
    tokens 2r + h (h = lane / 16), lane l the sent columns l and l + 16 below n_send, each
    once, onto distinct columns of the 32-column row; lane l of each half pushes the token's pre
    (16 bytes, float4) to CTA l's spre[par][token], so each CTA gets each token's pre once,
    the bytes its pre mbarrier expects."""
    n_real = n_real_of(head)
    n_send = n_real + 1
    assert 16 * RP <= 32 * FIN_WARP                # the kernel's static_assert, for both heads
    items = [(i, c) for _, i, c, _ in cta_sum_items(n_real)]
    assert sorted(items) == [(i, c) for i in range(16) for c in range(n_send)]
    by_finaliser = {}
    for mt in range(2):
        for i, c in items:
            ti = mt * 16 + i
            by_finaliser.setdefault(ti >> 1, set()).add((ti & 1, c))
    assert sorted(by_finaliser) == list(range(CLUSTER))
    assert all(v == {(h, c) for h in range(2) for c in range(n_send)}
               for v in by_finaliser.values())
    for par in range(2):
        spre_hits = np.zeros((CLUSTER, 2 * TM * HC), np.int64)
        for r in range(CLUSTER):
            for h in range(2):
                lanes = range(16 * h, 16 * h + 16)
                cols = [l + 16 * q for l in (x & 15 for x in lanes) for q in range(2)
                        if l + 16 * q < n_send]
                assert sorted(cols) == list(range(n_send))
                out_cols = {SUMSQ_COL if c == n_real else c for c in cols}
                assert out_cols == set(range(n_real)) | {SUMSQ_COL}
                i = 2 * r + h
                for lane in lanes:
                    dst_cta, off = lane & 15, (par * TM + i) * HC
                    assert off % 4 == 0                # float4, on 16 bytes (spre is aligned)
                    spre_hits[dst_cta, off:off + HC] += 1
        want = np.zeros(2 * TM * HC, np.int64)
        want[par * TM * HC:(par + 1) * TM * HC] = 1
        assert (spre_hits == want).all()
        assert 4 * spre_hits[0].sum() == kernel().const("kPreBytes", kNReal=n_real)


@pytest.mark.parametrize("dim", WIDE_DIMS)
@pytest.mark.parametrize("tokens", [9, 32, 70])
def test_collapse_items_cover_u_once(dim, tokens):
    """Step 5 for tile k: thread tid takes chunk tid % (W / 8) of tokens tid / (W / 8), + 512 /
    (W / 8), ... of its CTA's dims; the x it reads (4 streams of the chunk) is in the token's
    row of the buffer, its pre at spre[par][i]."""
    W = dim // CLUSTER
    chunks = W // 8
    assert THREADS % chunks == 0
    for tile in range((tokens + TM - 1) // TM):
        t0 = tile * TM
        u_hits = np.zeros((TM, dim), np.int64)
        for rank in range(CLUSTER):
            for tid in range(THREADS):
                ch = tid % chunks
                for i in range(tid // chunks, TM, THREADS // chunks):
                    if t0 + i >= tokens:
                        break
                    for s in range(HC):
                        assert s * W + ch * 8 + 8 <= HC * W   # x: inside the token's slice
                    col = rank * W + ch * 8
                    assert col + 8 <= dim
                    u_hits[i, col:col + 8] += 1
        n_valid = min(TM, tokens - t0)
        assert (u_hits[:n_valid] == 1).all() and (u_hits[n_valid:] == 0).all()


@pytest.mark.parametrize("tokens,clusters", [(9, 8), (40, 8), (4096, 8), (4100, 7), (1000, 6),
                                             (33, 1), (64, 7)])
def test_tiles_and_tail_tokens_cover_every_token_once(tokens, clusters):
    """Grid = min(clusters, tiles) clusters. Cluster c runs tiles c, c + ncl, ... (its n-th tile
    is k = n). The loop's iteration it finalises tile it - 1 (warp 15 of rank r: tokens 2r, 2r +
    1) and writes u of tile it - 1, for it = 1 .. my_tiles: every tile once, the last one in
    the extra iteration. The tail of CTA rank r handles k = 2·(its n-th tile) + half, warp w
    taking k0 = 2w, 2w + 32, ...: every token's post/comb exactly once, by the CTA that
    finalised (and stored) its row, into its own scratch [2w + h][4]."""
    n_tiles = (tokens + TM - 1) // TM
    ncl = min(clusters, n_tiles)
    finalised_by, tail_by, u_tiles = {}, {}, []
    for cid in range(ncl):
        my_tiles = (n_tiles - cid + ncl - 1) // ncl if cid < n_tiles else 0
        assert my_tiles == len(range(cid, n_tiles, ncl))
        loaded = [cid] if my_tiles > 0 else []
        for it in range(my_tiles + 1):
            if it + 1 < my_tiles:
                loaded.append(cid + (it + 1) * ncl)
            if it >= 1:
                k = it - 1
                u_tiles.append(cid + k * ncl)
                for rank in range(CLUSTER):
                    for h in range(2):
                        t = (cid + k * ncl) * TM + 2 * rank + h
                        if t < tokens:
                            assert t not in finalised_by
                            finalised_by[t] = (cid, rank)
        assert loaded == list(range(cid, n_tiles, ncl))
        for rank in range(CLUSTER):
            scratch = set()
            for warp in range(WARPS):
                for k0 in range(2 * warp, 2 * my_tiles, 2 * WARPS):
                    for h in range(2):
                        k = k0 + h
                        t = (cid + (k >> 1) * ncl) * TM + 2 * rank + (k & 1)
                        scratch.add(2 * warp + h)
                        if k < 2 * my_tiles and t < tokens:
                            assert t not in tail_by
                            tail_by[t] = (cid, rank)
            assert scratch <= set(range(32))      # scratch [32][4]
    assert sorted(u_tiles) == list(range(n_tiles))
    assert sorted(finalised_by) == list(range(tokens))
    assert tail_by == finalised_by
