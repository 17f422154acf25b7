"""The flat ragged batch and its per-step index maps (dspark.model.batch) on a tiny hand-made batch:
`Batch.build`'s layout, and StepIndex's per-token fields, gathers, key rows and ring writes against
loops over the definition (a position at or past the row's cache length comes from this forward's
rows, an earlier one from the row's ring slot at position mod capacity)."""

from __future__ import annotations

import pytest
import torch

from dspark.model.batch import Batch, StepIndex, context_bucket

DUMMY = 7
CAP = 6  # ring capacity
# (slot, cache_len, new tokens): a decode step, a fresh prefill, a row with nothing new, a verify chunk
REQUESTS = [(3, 9, [11, 12]), (0, 0, [21, 22, 23]), (5, 4, []), (1, 2, [41, 42, 43, 44, 45, 46, 47, 48])]


def build(**kw) -> Batch:
    return Batch.build(REQUESTS, dummy_slot=DUMMY, **kw)


def test_build_lays_rows_out_in_order_with_padding():
    b = build(pad_to=16)
    assert b.input_ids.tolist() == [11, 12, 21, 22, 23, 41, 42, 43, 44, 45, 46, 47, 48, 0, 0, 0]
    assert b.positions.tolist()[:13] == [9, 10, 0, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9]
    assert b.token_row.tolist() == [0, 0, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4]  # padding: dummy row 4
    assert b.valid.tolist() == [True] * 13 + [False] * 3
    assert b.slot.tolist() == [3, 0, 5, 1, DUMMY]
    assert b.cache_len.tolist() == [9, 0, 4, 2, 0]
    assert b.new_start.tolist() == [0, 2, 5, 5, 13] and b.new_len.tolist() == [2, 3, 0, 8, 3]
    assert b.logits_rows.tolist() == [1, 4, 12]  # each row's last new token; the empty row has none
    assert b.num_tokens == 16 and b.causal
    assert b.context == context_bucket(11) == 64


def test_build_logits_choices_and_refusals():
    assert build(logits="all").logits_rows.tolist() == list(range(13))
    assert build(logits=[0, 5]).logits_rows.tolist() == [0, 5]
    assert not build(causal=False).causal
    assert build().num_tokens == 13  # no padding asked
    with pytest.raises(ValueError, match="pad_to"):
        build(pad_to=12)


def test_context_bucket_is_a_power_of_two_bound():
    for n in (1, 63, 64, 65, 100, 129, 1000):
        c = context_bucket(n)
        assert c >= max(n, 64) and c & (c - 1) == 0 and (c == 64 or c // 2 < n)


def test_step_index_per_token_fields():
    b = build(pad_to=16)
    idx = StepIndex(b)
    rows = b.token_row.tolist()
    assert idx.slot.tolist() == [b.slot[r].item() for r in rows]
    assert idx.cache_len.tolist() == [b.cache_len[r].item() for r in rows]
    assert idx.new_start.tolist() == [b.new_start[r].item() for r in rows]
    assert idx.chunk_end.tolist() == [b.cache_len[r].item() + b.new_len[r].item() for r in rows]
    assert idx.memo("k", lambda: torch.zeros(1)) is idx.memo("k", lambda: torch.ones(1))
    order = torch.tensor([12, 0, 3])
    sub = idx.select(order)
    for name in ("positions", "valid", "slot", "cache_len", "new_start", "chunk_end"):
        assert torch.equal(getattr(sub, name), getattr(idx, name)[order]), name
    assert sub.batch is b and sub.causal == idx.causal and sub.context == idx.context


def ring_and_rows(b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """A ring [slots, CAP, 2] holding (slot, ring row) and batch rows [T, 2] holding (-1, flat index)."""
    slots = DUMMY + 1
    ring = torch.stack(torch.meshgrid(torch.arange(slots), torch.arange(CAP), indexing="ij"), -1).float()
    rows = torch.stack([torch.full((b.num_tokens,), -1), torch.arange(b.num_tokens)], -1).float()
    return ring, rows


def expected_read(b: Batch, token: int, p: int) -> list[float]:
    r = int(b.token_row[token])
    if p >= int(b.cache_len[r]):  # the request's own new token, from this forward
        return [-1.0, float(int(b.new_start[r]) + p - int(b.cache_len[r]))]
    return [float(b.slot[r]), float(p % CAP)]


def test_gather_and_key_rows_read_batch_or_ring():
    b = build(pad_to=16)
    idx = StepIndex(b)
    ring, rows = ring_and_rows(b)
    real = b.valid.nonzero().flatten().tolist()
    # Every committed or new position of each token's request, up to the token itself.
    pos = torch.stack([torch.clamp(b.positions - d, min=0) for d in range(5)], dim=-1)  # [T, 5]
    got = idx.gather(rows, ring, pos)
    pool = torch.cat([ring.flatten(0, 1), rows])
    by_key = pool[idx.key_rows(pos, ring)]
    for t in real:
        for j, p in enumerate(pos[t].tolist()):
            assert got[t, j].tolist() == expected_read(b, t, p), (t, p)
            assert by_key[t, j].tolist() == expected_read(b, t, p), (t, p)


def test_ring_write_keeps_each_requests_last_capacity_tokens():
    b = build(pad_to=16)
    idx = StepIndex(b)
    ring = torch.full((DUMMY + 1, CAP), -1.0)
    idx.ring_write(ring, torch.arange(16.0), DUMMY)
    want = torch.full_like(ring, -1.0)
    for t in b.valid.nonzero().flatten().tolist():
        r = int(b.token_row[t])
        end = int(b.cache_len[r] + b.new_len[r])
        if int(b.positions[t]) >= end - CAP:  # earlier tokens would be overwritten in the same forward
            want[int(b.slot[r]), int(b.positions[t]) % CAP] = t
    assert torch.equal(ring[:DUMMY], want[:DUMMY])  # padding wrote only the dummy slot
