"""Test-only drafters: an oracle that knows the continuation, a deliberately wrong one, and an
untrained DSpark draft for the tiny preset with a toy SPS table (engine-level tests)."""

from __future__ import annotations

import torch

from dspark import ops
from dspark.decode.drafter import Drafter, Proposal, one_hot_logits
from dspark.config import DraftConfig
from dspark.draft.deepspec import DraftModel

# Steps/s per verify batch size that fall gently with B: every hardware / async decision stays live.
TOY_SPS = [0.0] + [1 / (1 + 0.01 * b) for b in range(1, 200)]


def tiny_dspark_draft(vocab_size: int) -> DraftModel:
    """An untrained DSpark draft over the tiny preset's layers 1 and 2 (hidden size 56)."""
    return DraftModel.random(DraftConfig.tiny(vocab_size=vocab_size, mask_token_id=500, target_layer_ids=(1, 2),
                                              target_hidden_size=56), seed=2).eval()


class _PositionTracking(Drafter):
    """Keeps each slot's anchor position (the committed length) from `observe`."""

    def __init__(self, vocab_size: int, num_draft_tokens: int, max_batch: int):
        super().__init__(vocab_size, num_draft_tokens)
        self.anchor_pos = torch.zeros(max_batch, dtype=torch.long)

    def observe(self, out, batch, next_ids, last_row, ready):
        self.anchor_pos = torch.where(ready, batch.positions[last_row] + 1, self.anchor_pos)


class OracleDrafter(_PositionTracking):
    """Proposes the true continuation, each slot replaced by a uniform random token with
    probability rho. `truths` maps a prompt (tuple) to its full true sequence (prompt + continuation).
    The choice is deterministic given the draft uniforms, so it is reported as a one-hot."""

    name = "oracle"

    def __init__(self, vocab_size: int, num_draft_tokens: int, max_batch: int, truths: dict, rho: float,
                 max_len: int = 512):
        super().__init__(vocab_size, num_draft_tokens, max_batch)
        self.truths, self.rho = truths, rho
        self.truth = torch.zeros(max_batch, max_len, dtype=torch.long)

    def admit(self, slot, prompt):
        seq = self.truths[tuple(prompt)]
        self.truth[slot] = 0
        self.truth[slot, : len(seq)] = torch.tensor(seq)

    def propose(self, slots, u):
        gamma = self.num_draft_tokens
        pos = (self.anchor_pos.unsqueeze(-1) + 1 + torch.arange(gamma)).clamp(max=self.truth.shape[1] - 1)
        true = self.truth.gather(1, pos)
        corrupt = u < self.rho
        noise = (u / max(self.rho, 1e-12) * self.vocab_size).long().clamp(max=self.vocab_size - 1)
        tokens = torch.where(corrupt, noise, true)
        return Proposal(tokens=tokens, logits=one_hot_logits(tokens, self.vocab_size),
                        confidence=torch.full(tokens.shape, 1 - self.rho))


class FixedDistributionDrafter(_PositionTracking):
    """Ignores the context: every slot is sampled from one fixed distribution (a wrong drafter with a
    genuinely soft q, so rejection must use the residual correctly)."""

    name = "wrong"

    def __init__(self, vocab_size: int, num_draft_tokens: int, max_batch: int, logits: torch.Tensor):
        super().__init__(vocab_size, num_draft_tokens, max_batch)
        self.fixed = logits.float()

    def propose(self, slots, u):
        r, gamma = slots.anchor.shape[0], self.num_draft_tokens
        logits = self.fixed.expand(r, gamma, -1)
        q = ops.probs(logits.reshape(r * gamma, -1), *(p if p is None else p.repeat_interleave(gamma)
                                                             for p in slots.sampling()))
        tokens = ops.sample(q, u.reshape(-1)).view(r, gamma)
        return Proposal(tokens=tokens, logits=logits.clone())
