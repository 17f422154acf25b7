"""The pure step's layouts: the device-side verify batch equals the host-built one, padding goes to
the dummy slot, and a decode round through `decode_round` matches the engine's own round."""

from __future__ import annotations

import dataclasses

import torch

from dspark.decode.step import prefill_layout, verify_layout
from dspark.model.batch import Batch


def test_from_lengths_equals_the_host_built_batch():
    slot = torch.tensor([0, 1, 2, 3])
    cache_len = torch.tensor([5, 0, 9, 2])
    lengths = torch.tensor([3, 0, 2, 1])
    got, col = Batch.from_lengths(slot, cache_len, lengths, 8, dummy_slot=4, context=64)
    want = Batch.build([(0, 5, [0] * 3), (1, 0, []), (2, 9, [0] * 2), (3, 2, [0])], dummy_slot=4, pad_to=8,
                       logits=list(range(8)))
    for f in ("input_ids", "token_row", "valid", "slot", "cache_len", "new_start", "new_len", "logits_rows"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    real = want.valid
    assert torch.equal(got.positions[real], want.positions[real])  # padding positions are don't-care
    assert col.tolist() == [0, 1, 2, 0, 1, 0, 0, 0]


def test_verify_layout_places_anchor_and_drafts_per_active_slot():
    committed = torch.tensor([4, 7, 2])
    lengths = torch.tensor([2, 5, 1])
    active = torch.tensor([True, False, True])
    layout = verify_layout(committed, lengths, active, bucket=8, dummy_slot=3, context=64)
    b = layout.batch
    assert layout.verify_len.tolist() == [2, 0, 1] and layout.start.tolist() == [0, 0, 3]
    assert b.valid.tolist() == [True] * 5 + [False] * 3
    assert b.positions[:5].tolist() == [4, 5, 6, 2, 3]  # anchor at the committed length, drafts after it
    assert b.slot[b.token_row[:5]].tolist() == [0, 0, 0, 2, 2] and b.slot[-1] == 3
    assert layout.src_col[:5].tolist() == [0, 1, 2, 0, 1]


def test_prefill_layout_marks_where_the_first_sample_goes():
    layout = prefill_layout([(1, 0, [5, 6, 7], [6, 7], True), (0, 3, [8, 9], [9, 10], False)], max_batch=2,
                            dummy_slot=2, pad_to=6)
    assert layout.sampled_next.tolist() == [False, False, True, False, False, False]
    assert layout.next_ids[:5].tolist() == [6, 7, 0, 9, 10]
    assert layout.last_row.tolist() == [4, 2] and layout.completes.tolist() == [False, True]
    assert torch.equal(layout.batch.logits_rows, layout.last_row)
    assert dataclasses.replace(layout.batch).num_tokens == 6
