"""Paged-cache layouts for tests (docs/contracts.md §A): scattered block tables over one shared
pool, and gathering / scattering a dense store through them."""

from __future__ import annotations

import torch


def scattered_tables(n_entries: list[int], block_size: int, max_blocks: int, seed: int,
                     spare: int = 3) -> tuple[torch.Tensor, int]:
    """A block table [rows, max_blocks] int32 giving every row the blocks its ``n_entries``
    need, ids drawn from one shared pool in a random (out of order) permutation; unused
    entries are -1. Returns (table, num_blocks); the pool has ``spare`` never-used blocks."""
    g = torch.Generator().manual_seed(seed)
    need = [(n + block_size - 1) // block_size for n in n_entries]
    assert max(need, default=0) <= max_blocks
    num_blocks = sum(need) + spare
    perm = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.full((len(n_entries), max_blocks), -1, dtype=torch.int32)
    k = 0
    for r, nb in enumerate(need):
        table[r, :nb] = torch.tensor(perm[k:k + nb], dtype=torch.int32)
        k += nb
    return table, num_blocks


def gather_rows(pool: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
    """[rows, n, d]: logical entries 0..n-1 of each row of a pool [num_blocks, bs, d]."""
    bs = pool.shape[1]
    s = torch.arange(n)
    blk = table.long().cpu()[:, s // bs]
    return pool[blk.to(pool.device), (s % bs).to(pool.device)]


def scatter_rows(dense: torch.Tensor, table: torch.Tensor, pool: torch.Tensor) -> None:
    """Write dense [rows, C, d] into a pool through the table (every entry with a block)."""
    bs = pool.shape[1]
    for r in range(dense.shape[0]):
        for k in range(dense.shape[1]):
            blk = int(table[r, k // bs]) if k // bs < table.shape[1] else -1
            if blk >= 0:
                pool[blk, k % bs] = dense[r, k]


