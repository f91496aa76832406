"""torch.ops.dsv4.paged_rows: logical compressed entries to flat rows of a paged store through
block tables (the CSA layers' indexer picks). CPU: the reference is kv_cache.paged_rows in
int32, rows outside the table give -1, bad input (flat rows past int32 included) raises
ValueError naming what is accepted.
CUDA (runs on the H200): the kernel gives the reference's values on fresh random tables and
picks with missing blocks, picks past the table, -1 picks and rows outside the table; strided,
broadcast and transposed inputs, empty shapes, a large grid, -1 for a row past int32 (outside
the contract); opcheck."""

from __future__ import annotations

import pytest
import torch

import dsv4.ops  # noqa: F401  (registers the ops)
from dsv4.ops.kv_cache import paged_rows as paged_rows_int64
from dsv4.ops.paged import paged_rows, paged_rows_reference

cuda = pytest.mark.cuda


def _inputs(R, MB, T, K, bs, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, 5000, (R, MB), generator=g, dtype=torch.int32)
    table[torch.rand(R, MB, generator=g) < 0.2] = -1                 # missing blocks
    rows = torch.randint(0, max(R, 1), (T,), generator=g, dtype=torch.int32)
    if T > 2:
        rows[0], rows[1] = -1, R                                     # not rows of the table
    sel = torch.randint(-1, MB * bs + 2 * bs, (T, K), generator=g, dtype=torch.int32)
    return table.to(device), rows.to(device), sel.to(device)


def test_reference_is_kv_cache_paged_rows():
    table, rows, sel = _inputs(6, 9, 40, 17, 64, 1)
    got = paged_rows_reference(table, rows, sel, 64)
    assert got.dtype == torch.int32 and got.shape == sel.shape
    ok = (rows >= 0) & (rows < 6)
    want = paged_rows_int64(table, rows.clamp(0, 5).long()[:, None], sel, 64)
    assert torch.equal(got[ok], want[ok].int())
    assert (got[~ok] == -1).all()
    # by hand: entry s of row r is table[r, s // bs] * bs + s % bs
    t = torch.tensor([[3, -1, 5]], dtype=torch.int32)
    s = torch.tensor([[0, 5, 9, 12, -1, 11]], dtype=torch.int32)
    assert paged_rows(t, torch.zeros(1, dtype=torch.int32), s, 4).tolist() == [
        [12, -1, 21, -1, -1, 23]]


def test_table_without_rows():
    sel = torch.zeros(3, 2, dtype=torch.int32)
    out = paged_rows_reference(torch.zeros(0, 4, dtype=torch.int32),
                               torch.zeros(3, dtype=torch.int32), sel, 8)
    assert out.tolist() == [[-1, -1]] * 3


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(2, 3), torch.zeros(4, dtype=torch.int32), torch.zeros(4, 2, dtype=torch.int32),
      8), "int32"),
    ((torch.zeros(3, dtype=torch.int32), torch.zeros(4, dtype=torch.int32),
      torch.zeros(4, 2, dtype=torch.int32), 8), r"\[num_rows, max_blocks\]"),
    ((torch.zeros(2, 3, dtype=torch.int32), torch.zeros(5, dtype=torch.int32),
      torch.zeros(4, 2, dtype=torch.int32), 8), "one table row per token"),
    ((torch.zeros(2, 3, dtype=torch.int32), torch.zeros(4, dtype=torch.int32),
      torch.zeros(4, dtype=torch.int32), 8), r"\[tokens, k\]"),
    ((torch.zeros(2, 3, dtype=torch.int32), torch.zeros(4, dtype=torch.int32),
      torch.zeros(4, 2, dtype=torch.int32), 0), "block_size"),
])
def test_bad_input_is_rejected(args, match):
    with pytest.raises(ValueError, match=match):
        paged_rows_reference(*args)


def test_flat_rows_past_int32_are_rejected():
    """The op's precondition: selected flat rows fit in int32. Past it the reference raises
    instead of wrapping to a valid-looking row (2**30 * 8 + 1 would wrap to 1)."""
    t = torch.tensor([[2 ** 30]], dtype=torch.int32)
    r = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"fit in int32 \(at most 2147483647\); got 8589934593"):
        paged_rows_reference(t, r, torch.tensor([[1]], dtype=torch.int32), 8)
    # the largest row that fits is returned; a row past it only where selected raises
    t = torch.tensor([[2 ** 28 - 1, 2 ** 28]], dtype=torch.int32)
    assert paged_rows_reference(t, r, torch.tensor([[7, -1]], dtype=torch.int32),
                                8).tolist() == [[2 ** 31 - 1, -1]]
    # rows that are not rows of the table give -1, whatever their picks would address
    assert paged_rows_reference(t, torch.tensor([1], dtype=torch.int32),
                                torch.tensor([[8]], dtype=torch.int32), 8).tolist() == [[-1]]
    with pytest.raises(ValueError, match="fit in int32"):
        paged_rows_reference(t, r, torch.tensor([[8]], dtype=torch.int32), 8)


@cuda
@pytest.mark.parametrize("R,MB,T,K,bs", [(1, 1, 1, 1, 64), (4, 17, 4, 512, 64),
                                         (64, 1024, 64, 512, 256), (3, 5, 7, 1024, 1),
                                         (2, 0, 3, 4, 64), (0, 4, 3, 4, 64), (5, 6, 0, 4, 8),
                                         (5, 6, 3, 0, 8), (8, 40, 70000, 3, 16)])
def test_cuda_kernel_gives_the_reference_values(R, MB, T, K, bs):
    table, rows, sel = _inputs(R, MB, T, K, bs, R * 7 + T)
    got = paged_rows(table.cuda(), rows.cuda(), sel.cuda(), bs)
    assert got.dtype == torch.int32 and got.shape == (T, K)
    assert torch.equal(got.cpu(), paged_rows_reference(table, rows, sel, bs))


@cuda
def test_cuda_kernel_strided_inputs():
    """sel and table as column slices of wider buffers, rows a strided view."""
    table, rows, sel = _inputs(5, 12, 30, 64, 32, 3)
    tw = torch.full((5, 20), 77, dtype=torch.int32)
    tw[:, :12] = table
    sw = torch.full((30, 70), 5, dtype=torch.int32)
    sw[:, 3:67] = sel
    rw = torch.stack([rows, rows], 1)
    got = paged_rows(tw.cuda()[:, :12], rw.cuda()[:, 0], sw.cuda()[:, 3:67], 32)
    assert torch.equal(got.cpu(), paged_rows_reference(table, rows, sel, 32))


@cuda
def test_cuda_kernel_broadcast_and_transposed_inputs():
    """A table row broadcast to every sequence (row stride 0) and a transposed sel: the glue
    copies them into rows (the kernel addresses rows one after another)."""
    table, rows, sel = _inputs(1, 12, 30, 64, 32, 4)
    rows = rows.clamp(0, 5)
    wide = table.expand(6, 12)
    got = paged_rows(wide.cuda(), rows.cuda(), sel.t().contiguous().cuda().t(), 32)
    assert torch.equal(got.cpu(), paged_rows_reference(wide.contiguous(), rows, sel, 32))
    # a broadcast sel row (every token the same picks)
    one = sel[:1].expand(30, 64)
    got = paged_rows(wide.cuda(), rows.cuda(), one.cuda(), 32)
    assert torch.equal(got.cpu(), paged_rows_reference(wide.contiguous(), rows,
                                                       one.contiguous(), 32))


@cuda
def test_cuda_kernel_row_past_int32_is_none():
    """Outside the op's contract (the reference raises): the kernel writes -1 for a row past
    int32, never the wrapped value (2**30 * 8 + 1 would wrap to 1), and the largest row that
    fits as it is."""
    t = torch.tensor([[2 ** 28 - 1, 2 ** 28, 2 ** 30]], dtype=torch.int32, device="cuda")
    r = torch.zeros(1, dtype=torch.int32, device="cuda")
    s = torch.tensor([[7, 8, 9, 17, 0]], dtype=torch.int32, device="cuda")
    assert paged_rows(t, r, s, 8).tolist() == [[2 ** 31 - 1, -1, -1, -1, 2 ** 31 - 8]]


@cuda
def test_cuda_bad_input_is_rejected():
    t = torch.zeros(2, 3, dtype=torch.int32, device="cuda")
    r = torch.zeros(4, dtype=torch.int32, device="cuda")
    s = torch.zeros(4, 2, dtype=torch.int32, device="cuda")
    with pytest.raises((RuntimeError, ValueError), match="int32"):
        paged_rows(t.long(), r, s, 8)
    with pytest.raises((RuntimeError, ValueError), match="one table row per token"):
        paged_rows(t, r[:3], s, 8)
    with pytest.raises((RuntimeError, ValueError), match="block_size"):
        paged_rows(t, r, s, 0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_opcheck(device):
    table, rows, sel = _inputs(4, 6, 9, 5, 16, 2)
    rows = rows.clamp(0, 3)
    torch.library.opcheck(torch.ops.dsv4.paged_rows.default,
                          (table.to(device), rows.to(device), sel.to(device), 16))
