"""Prompt-lookup (n-gram) drafting: propose what followed the latest earlier occurrence of the
context's last n tokens (n from `max_n` down to `min_n`), on device, with no model.

State: each slot's committed tokens plus its anchor, in a history buffer [R+1, M] (row R takes
padding writes). The proposal is deterministic given the history, so it is reported as one-hot
logits (lossless at any temperature); confidence is 1 where a match was found and 0 elsewhere.
"""

from __future__ import annotations

from typing import Callable

import torch

from dspark.decode.buffers import SlotState
from dspark.decode.drafter import Drafter, Proposal, TargetView, one_hot_logits


class NgramDrafter(Drafter):
    has_confidence = True  # 1 where a match was found, 0 elsewhere

    def __init__(self, vocab_size: int, num_draft_tokens: int, max_batch: int, max_seq_len: int,
                 max_n: int = 4, min_n: int = 1, device="cpu"):
        super().__init__(vocab_size, num_draft_tokens)
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.history = torch.zeros(max_batch + 1, max_seq_len + 1, dtype=torch.long, device=device)
        self.length = torch.zeros(max_batch + 1, dtype=torch.long, device=device)

    @classmethod
    def build(cls, target, cache, draft, num_draft_tokens, max_batch, max_seq_len):
        return cls(target.config.vocab_size, num_draft_tokens, max_batch, max_seq_len, device=cache.device)

    def admit(self, slot, prompt):
        self.length[slot] = 0

    def observe(self, out, batch, next_ids, last_row, ready):
        r = self.history.shape[0] - 1
        slot = torch.where(batch.valid, batch.slot[batch.token_row], r)
        self.history[slot, batch.positions] = batch.input_ids
        self.history[slot, batch.positions + 1] = next_ids
        last_pos = batch.positions[last_row]  # [R]
        self.length[:r] = torch.where(ready, last_pos + 2, self.length[:r])

    def propose(self, slots: SlotState, u: torch.Tensor) -> Proposal:
        r, gamma = slots.anchor.shape[0], self.num_draft_tokens
        # A decoding slot's known tokens sit below the round's context bound; idle slots may hold longer
        # stale histories, clamped into range (their proposals are never used).
        cols = min(self.history.shape[1], slots.context + 1) if slots.context else self.history.shape[1]
        hist, length = self.history[:r, :cols], self.length[:r].clamp(max=cols - 1)  # [R, M], [R]
        tokens, found = _lookup(hist, length, slots.anchor, gamma, self.max_n, self.min_n)
        confidence = found.float().unsqueeze(-1).expand(r, gamma)
        return Proposal(tokens=tokens, logits=one_hot_logits(tokens, self.vocab_size), confidence=confidence)

    def teacher_forced(self, view: TargetView) -> Callable[[torch.Tensor], torch.Tensor]:
        """Prompt lookup over the true prefix y_0..y_p of each anchor p (one-hot logits)."""

        def propose(anchors: torch.Tensor) -> torch.Tensor:
            hist = view.ids.expand(len(anchors), -1)  # [A, L]: lookups read only positions < p + 1
            tokens, _ = _lookup(hist, anchors + 1, view.ids[anchors], self.num_draft_tokens, self.max_n, self.min_n)
            return one_hot_logits(tokens, self.vocab_size)

        return propose


def _lookup(hist: torch.Tensor, length: torch.Tensor, anchor: torch.Tensor, gamma: int, max_n: int,
            min_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The matching rule. hist [R, M] holds each row's known tokens at positions < length [R] (the
    last one is the anchor [R]) → (γ proposed tokens [R, γ], found [R]): what followed the latest
    earlier occurrence of the last n tokens, longest n first; the anchor repeated where nothing matched."""
    r, m = hist.shape
    best = torch.full((r,), -1, dtype=torch.long, device=hist.device)  # start of the continuation
    for n in range(max_n, min_n - 1, -1):
        if n >= m:
            continue
        tail_pos = (length.unsqueeze(-1) - n + torch.arange(n, device=hist.device)).clamp(min=0)
        tail = hist.gather(1, tail_pos)  # [R, n]
        windows = hist.unfold(1, n, 1)  # [R, M−n+1, n]
        start = torch.arange(windows.shape[1], device=hist.device)
        # A match must end before the tail starts and have at least one token after it.
        hit = (windows == tail.unsqueeze(1)).all(-1) & (start + n < length.unsqueeze(-1)) & (length >= n + 1).unsqueeze(-1)
        latest = torch.where(hit, start, -1).max(-1).values  # [R]
        best = torch.where((best < 0) & (latest >= 0), latest + n, best)
    found = best >= 0
    pos = best.clamp(min=0).unsqueeze(-1) + torch.arange(gamma, device=hist.device)  # [R, γ]
    # Positions at or past the end are unknown: repeat the last known token there.
    pos = torch.minimum(pos, (length - 1).clamp(min=0).unsqueeze(-1))
    tokens = torch.where(found.unsqueeze(-1), hist.gather(1, pos), anchor.unsqueeze(-1))
    return tokens, found
