"""Causality with cuts that are not multiples of the compression ratios or the window
(issue 13 item 7): a query must not see a token after it, even one inside the block that is
still being compressed. Changing the tokens from position p on must leave every logit before p
unchanged and change the logits at p. With p a multiple of every ratio (the old test's 80), a
compressed entry that looked one block ahead would pass; cuts inside blocks catch it."""

from __future__ import annotations

import pytest
import torch

import dsv4

VOCAB = 129280


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    # tiny: window 16, CSA ratio 4 (layers 1, 3), HCA ratio 16 (layer 2), index_topk 8.
    model = dsv4.Model(dsv4.ModelConfig.tiny(quant_sim=False)).eval()
    ids = torch.randint(0, VOCAB, (1, 72), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids)
    return model, ids, ref


# Inside CSA blocks (p % 4 != 0), inside HCA blocks (p % 16 != 0), not on the window edge.
@pytest.mark.parametrize("p", [5, 13, 18, 30, 37, 47, 50, 67])
def test_changing_tokens_from_p_leaves_earlier_logits_unchanged(setup, p):
    model, ids, ref = setup
    assert p % 4 and p % 16 and p % model.config.window_size
    changed = ids.clone()
    changed[:, p:] = (changed[:, p:] + 4321) % VOCAB
    with torch.no_grad():
        out = model(changed)
    before = (out[:, :p] - ref[:, :p]).abs().max() / ref[:, :p].abs().max()
    assert before < 1e-5, (p, before.item())
    assert (out[:, p] - ref[:, p]).abs().max() > 1e-2          # the change is visible at p
