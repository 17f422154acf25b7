"""What every block draft model (DeepSpec layout, V4 release layout) offers the engine's block
drafter (dspark.decode.block) and the trainer, and the training output they share.

Vocabulary: R requests, N committed positions, γ block size, V vocabulary.

    tap_layers, block_size, block_input_token, context_window (None = the whole prefix), vocab_size
    project_context(features [N, F]) → C [N, d]                 once per committed position
    context_rows(C, positions) → per layer a tuple of row tensors [N, ...]   (what the engine caches)
    block_hidden(block_ids, block_pos, context, context_valid) → h (or (h_pre, h))
    base_logits(h) → [R, γ, V];  corrected_logits_tf(logits, prev, h): Markov-corrected, teacher-forced
    draft_block(block_ids, block_pos, context, context_valid, anchor, temperature, top_k, top_p, u)
        → tokens [R, γ], corrected logits [R, γ, V], confidence logits [R, γ] | None
    forward_train(...) → TrainOutput
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TrainOutput:
    """What `forward_train` returns: slot i of block k sits at positions[b, k, i] = p + i."""

    draft_logits: torch.Tensor  # [B, K, γ, V] fp32, Markov-corrected with teacher forcing
    confidence_logits: torch.Tensor | None  # [B, K, γ] fp32; None without a confidence head
    labels: torch.Tensor  # [B, K, γ] int64: input_ids[min(p+i+1, S−1)], input_ids[0] for dummy blocks
    positions: torch.Tensor  # [B, K, γ] int64 RoPE positions of the block rows


def block_label_index(anchors: torch.Tensor, keep: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """Sequence index of each slot's label: min(p+i+1, S−1) for kept blocks, 0 for dummy ones.

    anchors [B, K] int64, keep [B, K] → [B, K, γ] int64.
    """
    offsets = torch.arange(1, block_size + 1, device=anchors.device)
    index = (anchors.unsqueeze(-1) + offsets).clamp(max=seq_len - 1)
    return torch.where(keep.bool().unsqueeze(-1), index, 0)
