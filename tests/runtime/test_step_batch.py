"""The step batch (dsv4.layers.varlen.StepBatch): packed metadata of a mixed step, built once
and viewed on the device, against values written out by hand."""

from __future__ import annotations

import pytest
import torch

from dsv4.layers.varlen import StepBatch


def test_mixed_step_metadata_by_hand():
    # Row 0: a prefill chunk of 3 tokens at 5..7 (slot 4, blocks [7, 2]); row 1: a decode
    # token at 40 (slot 0, blocks [1]); row 2: idle (slot 2, no blocks).
    b = StepBatch.build(starts=[5, 40, 9], lens=[3, 1, 0], slots=[4, 0, 2],
                        block_tables=[[7, 2], [1], []], logits_index=[2, 3], device="cpu")
    assert (b.num_tokens, b.num_rows, b.max_blocks, b.num_logits) == (4, 3, 2, 2)
    assert (b.max_seqlen, b.max_end, b.decode) == (3, 41, False)
    assert b.pos.tolist() == [5, 6, 7, 40]
    assert b.rows.tolist() == [0, 0, 0, 1]
    assert b.cu_seqlens.tolist() == [0, 3, 4, 4]
    assert b.starts.tolist() == [5, 40, 9] and b.lens.tolist() == [3, 1, 0]
    assert b.slots.tolist() == [4, 0, 2]
    assert b.block_table.tolist() == [[7, 2], [1, -1], [-1, -1]]
    assert b.logits_index.tolist() == [2, 3]
    assert all(t.dtype == torch.int32 for t in (b.pos, b.rows, b.cu_seqlens, b.block_table))
    # every field is a view of the one buffer that was copied to the device
    assert all(t.untyped_storage().data_ptr() == b.buffer.untyped_storage().data_ptr()
               for t in (b.pos, b.rows, b.cu_seqlens, b.starts, b.slots, b.block_table,
                         b.logits_index))
    assert b.buffer.numel() == StepBatch.buffer_size(4, 3, 2, 2)
    assert b.host.block_tables == [[7, 2], [1], []]


def test_decode_flag_and_repacking_into_a_static_buffer():
    b = StepBatch.build([10, 0], [1, 1], [3, 1], [[0], [5]], [0, 1], "cpu", max_blocks=4)
    assert b.decode and b.max_blocks == 4 and b.block_table.tolist() == [[0, -1, -1, -1],
                                                                         [5, -1, -1, -1]]
    # A CUDA-graph runner re-packs the next step into the same buffer and keeps the views.
    StepBatch.pack([11, 1], [1, 1], [3, 1], [[0], [5, 6]], [0, 1], 4, out=b.buffer)
    assert b.pos.tolist() == [11, 1] and b.block_table.tolist()[1] == [5, 6, -1, -1]


def test_bad_lists_are_rejected():
    with pytest.raises(ValueError, match="must all have 2 entries"):
        StepBatch.build([0, 0], [1, 1], [0], [[0], [1]], [], "cpu")
    with pytest.raises(ValueError, match="more than max_blocks"):
        StepBatch.build([0], [1], [0], [[0, 1, 2]], [], "cpu", max_blocks=2)
    with pytest.raises(ValueError, match="int32 with"):
        StepBatch.pack([0], [1], [0], [[0]], [0], 1, out=torch.zeros(3, dtype=torch.int32))


def test_a_graph_step_has_no_host_lists():
    b = StepBatch.build([0], [1], [0], [[0]], [0], "cpu")
    g = StepBatch.from_buffer(b.buffer, 1, 1, 1, 1, 1, 1, True)
    with pytest.raises(RuntimeError, match="no host lists"):
        g.require_host()


def test_host_pack_puts_the_token_ids_before_the_metadata_of_build():
    # The runner's one host-to-device copy: [ids | metadata], viewed by from_buffer.
    lists = ([5, 40], [3, 1], [4, 0], [[7, 2], [1]], [2, 3])
    buf, sizes = StepBatch.host_pack(*lists, max_blocks=3, prefix=[11, 12, 13, 14])
    assert buf[:4].tolist() == [11, 12, 13, 14]
    b = StepBatch.from_buffer(buf[4:], **sizes)
    ref = StepBatch.build(*lists, device="cpu", max_blocks=3)
    assert torch.equal(b.buffer, ref.buffer)
    assert (b.num_tokens, b.max_seqlen, b.max_end, b.decode) == (4, 3, 41, False)
    assert b.host == ref.host


def test_numpy_pack_equals_a_loop_over_rows():
    # Ragged tables, idle rows, long prompts: the vectorised fill against a plain loop.
    g = torch.Generator().manual_seed(0)
    for B in (0, 1, 3, 17):
        lens = torch.randint(0, 5, (B,), generator=g).tolist()
        starts = torch.randint(0, 100, (B,), generator=g).tolist()
        slots = torch.randperm(max(B, 1), generator=g)[:B].tolist()
        tables = [torch.randint(0, 50, (int(w),), generator=g).tolist()
                  for w in torch.randint(0, 4, (B,), generator=g)]
        T = sum(lens)
        index = list(range(0, T, 2))
        buf = StepBatch.pack(starts, lens, slots, tables, index, 4)
        want = []
        for b in range(B):
            want += [starts[b] + j for j in range(lens[b])]
        for b in range(B):
            want += [b] * lens[b]
        want += [sum(lens[:b]) for b in range(B + 1)] + starts + lens + slots
        for t in tables:
            want += t + [-1] * (4 - len(t))
        assert buf.tolist() == want + index


def test_negative_lengths_are_rejected():
    with pytest.raises(ValueError, match="lens must be >= 0"):
        StepBatch.pack([0, 0], [1, -1], [0, 1], [[], []], [], 1)
