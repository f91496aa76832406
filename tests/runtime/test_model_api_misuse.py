"""dsv4.Model's argument checks (issue 13 item 4) for the MTP entry point: a bad ``hidden``
is an error naming it and leaves the cache as it was (the rows stay usable)."""

from __future__ import annotations

import pytest
import torch

import dsv4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return dsv4.Model(dsv4.ModelConfig.tiny(quant_sim=False)).eval()


@pytest.mark.parametrize("bad", ["complex", "int", "meta"])
def test_forward_mtp_bad_hidden_leaves_the_rows_usable(model, bad):
    c = model.config
    ids = torch.randint(0, 1000, (2, 5), generator=torch.Generator().manual_seed(1))
    nxt = torch.randint(0, 1000, (2, 5), generator=torch.Generator().manual_seed(2))
    shape = (2, 5, c.hc_mult, c.dim)
    hidden = {"complex": torch.zeros(shape, dtype=torch.complex64),
              "int": torch.zeros(shape, dtype=torch.int64),
              "meta": torch.zeros(shape, device="meta")}[bad]
    with torch.no_grad():
        cache = model.make_cache(2)
        _, h = model(ids, cache=cache, return_hidden=True)
        with pytest.raises(ValueError, match="hidden must be a floating-point tensor on cpu"):
            model.forward_mtp(hidden, nxt, cache)
        assert not cache.broken and cache.mtp_lengths == [0, 0]
        got = model.forward_mtp(h, nxt, cache)
        fresh = model.make_cache(2)
        model(ids, cache=fresh)
        want = model.forward_mtp(h, nxt, fresh)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
