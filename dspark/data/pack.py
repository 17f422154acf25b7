"""Packing: tokenized documents into fixed-length training sequences (the nano recipe's data stage)."""

from __future__ import annotations

import torch


def pack_documents(documents: list[tuple[str, torch.Tensor]],
                   seq_len: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Concatenate tokenized documents (one domain's, each ending in eos) in the given order and cut
    the stream into chunks of exactly `seq_len` tokens; the shorter tail is dropped.

    Returns (sequences, loss_masks) for `dspark.train.data.SequenceData(sequences, seq_len, loss_masks)`.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    stream = torch.cat([ids for _, ids in documents]) if documents else torch.zeros(0, dtype=torch.int32)
    if len(stream) < seq_len:
        raise ValueError(f"{len(documents)} documents hold {len(stream)} tokens, fewer than one sequence of {seq_len}")
    chunks = list(stream[:len(stream) // seq_len * seq_len].view(-1, seq_len).unbind(0))
    return chunks, [torch.ones(seq_len) for _ in chunks]
