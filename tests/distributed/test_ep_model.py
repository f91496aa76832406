"""The whole model with expert parallelism on CPU processes (gloo) against the single-process
model: each rank runs its own sequences (prefill, decode, a prefill joining decodes in the same
call, a rank with no sequence for a while, a rank that finishes early, an MTP call), and its
logits equal those of the single-process model running all the sequences in one batch on the
same schedule, to fp32 rounding.

Why not bit-exact here: the single-process model itself gives a sequence slightly different
logits in a different batch (CPU GEMMs pick other kernels for other row counts, ~1e-6 on
logits of size ~4); the MoE layer alone is bit-exact (test_ep_moe.py). A wrong expert, weight
or order gives differences of 1e-2 and more. The model runs with ``quant_sim=False``: under the
quantisation simulation such a 1e-6 batch effect can move a value across an FP8 / FP4 rounding
boundary, and the single-process model alone then differs by up to ~5e-4 between two batch
compositions (measured on a 2-core Xeon with torch 2.14.1: S1's decode logits alone vs in the
six-sequence batch), past ATOL; without it the same comparison stays under 4e-6. The MoE
layer's exchange under quant_sim is covered bit-exactly by test_ep_moe.py.
"""

from __future__ import annotations

import pytest
import torch

from dsv4.config import ModelConfig
from dsv4.distributed import ExpertParallelGroup, expert_parallel, serve, serve_step
from dsv4.model import Model

from _ep_harness import run_ranks

CFG = ModelConfig.tiny(vocab_size=512, quant_sim=False)
SEED = 7
LENS = [9, 5, 12, 7, 3, 10]          # prompt lengths of sequences S0..S5
N_DECODE = 3
STEPS = 1 + N_DECODE                 # a sequence joining at step 1 ends at step 3
ATOL = 5e-5                          # logits are O(1..5); fp32 batch effects are ~3e-6

# sequence -> (step it joins, decode tokens); S2 ends early, S5's prompt joins decodes
SCHEDULE = {0: (0, 3), 1: (0, 3), 2: (0, 1), 3: (0, 3), 4: (0, 3), 5: (1, 2)}
# world -> rank -> its sequences (rank 0 also runs MTP after step 0)
PLANS = {
    2: {0: [0, 1, 2], 1: [3, 4, 5]},
    4: {0: [0, 1], 1: [2], 2: [5], 3: [3, 4]},   # rank 1 serves steps 2, 3; rank 2 step 0
}


def _inputs():
    g = torch.Generator().manual_seed(SEED)
    prompts = [torch.randint(0, CFG.vocab_size, (n,), generator=g) for n in LENS]
    decodes = [torch.randint(0, CFG.vocab_size, (N_DECODE,), generator=g) for _ in LENS]
    return prompts, decodes


def _feed(seqs, step, prompts, decodes):
    """(tokens [len(seqs), max len], lens) of ``seqs`` at ``step`` (SCHEDULE)."""
    feed = []
    for seq in seqs:
        join, n_dec = SCHEDULE[seq]
        k = step - join                    # 0: the prompt; j > 0: decode token j - 1
        feed.append(prompts[seq] if k == 0 else
                    decodes[seq][k - 1:k] if 0 < k <= n_dec else prompts[seq][:0])
    lens = [len(f) for f in feed]
    ids = torch.zeros(len(seqs), max(max(lens), 1), dtype=torch.long)
    for b, f in enumerate(feed):
        ids[b, :len(f)] = f
    return ids, lens


def _mtp_next(seqs, lens, prompts, decodes):
    nxt = torch.zeros(len(seqs), max(lens), dtype=torch.long)
    for b, seq in enumerate(seqs):
        if lens[b]:
            nxt[b, :lens[b]] = torch.cat([prompts[seq][1:], decodes[seq][:1]])
    return nxt


@pytest.fixture(scope="module")
def reference():
    """The single-process model on all sequences in one batch, same schedule: logits per step
    (and MTP logits after step 0)."""
    torch.manual_seed(SEED)
    model = Model(CFG)
    prompts, decodes = _inputs()
    seqs = list(range(len(LENS)))
    cache = model.make_cache(len(seqs))
    steps = []
    with torch.no_grad():
        for step in range(STEPS):
            ids, lens = _feed(seqs, step, prompts, decodes)
            logits, hidden = model(ids, cache=cache, seq_lens=lens, return_hidden=True)
            steps.append(logits)
            if step == 0:
                mtp = model.forward_mtp(hidden, _mtp_next(seqs, lens, prompts, decodes), cache,
                                        seq_lens=lens)
    return steps, mtp


def _close(got, want, what):
    err = (got - want).abs().max().item()
    assert err <= ATOL, f"{what}: max |EP - single process| = {err:.3g} > {ATOL}"


def _run_plan(rank, world, ref):
    steps, ref_mtp = ref
    group = ExpertParallelGroup.current()
    torch.manual_seed(SEED)
    model = expert_parallel(Model(CFG), group)
    prompts, decodes = _inputs()
    seqs = PLANS[world][rank]
    cache = model.make_cache(len(seqs))
    with torch.no_grad():
        for step in range(STEPS):
            ids, lens = _feed(seqs, step, prompts, decodes)
            if not any(lens):
                assert serve_step(model) is True          # the others are running
                if step == 0:
                    assert serve_step(model) is True      # rank 0's MTP call
                continue
            logits, hidden = model(ids, cache=cache, seq_lens=lens, return_hidden=True)
            for b, seq in enumerate(seqs):
                if lens[b]:
                    _close(logits[b, :lens[b]], steps[step][seq, :lens[b]],
                           f"rank {rank} S{seq} step {step} ({lens[b]} tokens)")
            if step == 0:         # MTP after the prefill: rank 0 runs it, the others serve it
                if rank == 0:
                    mtp = model.forward_mtp(hidden, _mtp_next(seqs, lens, prompts, decodes),
                                            cache, seq_lens=lens)
                    for b, seq in enumerate(seqs):
                        _close(mtp[b, :lens[b]], ref_mtp[seq, :lens[b]], f"rank 0 S{seq} MTP")
                else:
                    assert serve_step(model) is True
        assert serve(model) == 0          # everyone is done: all leave together


@pytest.mark.parametrize("world", [2, 4])
def test_model_equals_single_process(world, reference):
    run_ranks(world, _run_plan, reference)


def _one_rank_is_the_model(rank, world):
    """A group of one: the exchange sends every pair to itself, each expert sees the same rows
    in the same order, so the logits are bit-identical to the plain model's."""
    torch.manual_seed(SEED)
    plain = Model(CFG)
    torch.manual_seed(SEED)
    ep = expert_parallel(Model(CFG), ExpertParallelGroup.current())
    prompts, decodes = _inputs()
    seqs = [0, 1, 5]
    caches = [plain.make_cache(3), ep.make_cache(3)]
    with torch.no_grad():
        for step in range(STEPS):
            ids, lens = _feed(seqs, step, prompts, decodes)
            a, b = (m(ids, cache=c, seq_lens=lens) for m, c in zip((plain, ep), caches))
            assert torch.equal(a, b), (step, (a - b).abs().max().item())


def test_group_of_one_is_bit_exact():
    run_ranks(1, _one_rank_is_the_model)
