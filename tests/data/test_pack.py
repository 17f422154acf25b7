"""Packing tokenized documents into fixed-length sequences: order kept, tail dropped, full masks."""

from __future__ import annotations

import pytest
import torch

from dspark.data.pack import pack_documents
from dspark.train.data import SequenceData


def documents(lengths: list[int]) -> list[tuple[str, torch.Tensor]]:
    """Documents of the given lengths with distinct ids, each ending in eos (1)."""
    out, start = [], 10
    for i, n in enumerate(lengths):
        ids = torch.arange(start, start + n, dtype=torch.int32)
        ids[-1] = 1
        out.append((f"doc/{i}", ids))
        start += n
    return out


def test_pack_cuts_the_stream_in_order_and_drops_the_tail():
    docs = documents([5, 30, 1, 12, 9])
    seq_len = 17
    seqs, masks = pack_documents(docs, seq_len)
    stream = torch.cat([ids for _, ids in docs])
    assert len(seqs) == len(stream) // seq_len
    assert torch.equal(torch.cat(seqs), stream[:len(seqs) * seq_len])
    assert all(s.dtype == torch.int32 for s in seqs)
    assert all(m.shape == (seq_len,) and bool((m == 1).all()) for m in masks)
    assert all(torch.equal(x, y) for x, y in zip(seqs, pack_documents(docs, seq_len)[0]))
    SequenceData(seqs, seq_len, masks)  # what the training recipe builds from them


def test_pack_refuses_too_little_text():
    docs = documents([4, 6])
    assert len(pack_documents(docs, 10)[0]) == 1
    with pytest.raises(ValueError, match="fewer than one sequence"):
        pack_documents(docs, 11)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        pack_documents([], 1)
    with pytest.raises(ValueError, match="seq_len"):
        pack_documents(docs, 0)
