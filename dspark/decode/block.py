"""Block drafting in the engine (DSpark, DFlash, either layout): a parallel draft block conditioned
on target features, from a draft model as `dspark.draft.protocol` describes it (DeepSpec's
Qwen3-style `dspark.draft.deepspec.DraftModel` or the V4 release's `dspark.draft.v4.V4DSparkDraft`).

Context rule (dspark.md §11.1, §11.14; dspark_v4.md §3.4): the cache holds rows of COMMITTED
positions only, keyed by position mod capacity, written in `observe` for every newly committed row
(prefill chunks and each round's accepted rows) from the target's tapped features of that very
forward. A block at anchor position p sees the rows of positions [p − capacity, p) and itself;
block K/V are never stored, so nothing needs rolling back.
"""

from __future__ import annotations

from typing import Callable

import torch

from dspark.decode.buffers import SlotState
from dspark.decode.drafter import Drafter, Proposal, TargetView


class BlockDrafter(Drafter):
    """`sts_temperatures` [γ] (Sequential Temperature Scaling, dspark.train.calibrate) calibrate the
    confidences: c_k = σ(z_k / T_k); default: the draft's `sts_temperatures` attribute, else none."""

    def __init__(self, draft, *, max_batch: int, max_seq_len: int, sts_temperatures=None):
        vocab = draft.vocab_size
        super().__init__(vocab, draft.block_size)
        self.draft = draft
        self.has_confidence = getattr(draft, "confidence_head", None) is not None
        self.tap_layers = tuple(draft.tap_layers)
        self.capacity = min(draft.context_window or max_seq_len, max_seq_len)
        self.max_batch = max_batch
        self.cache: list[tuple[torch.Tensor, ...]] | None = None  # allocated on the first observe
        self.anchor_pos = torch.zeros(max_batch, dtype=torch.long, device=draft.device)
        temps = sts_temperatures if sts_temperatures is not None else getattr(draft, "sts_temperatures", None)
        if temps is not None:
            temps = torch.as_tensor(temps, dtype=torch.float32, device=draft.device)
            if temps.shape != (self.num_draft_tokens,) or not (temps > 0).all():
                raise ValueError(f"STS temperatures must be {self.num_draft_tokens} positive values, got {temps.tolist()}")
        self.sts = temps

    @classmethod
    def build(cls, target, cache, draft, num_draft_tokens, max_batch, max_seq_len):
        if draft is None:
            raise ValueError("a block drafter needs a trained draft model")
        if draft.vocab_size != target.config.vocab_size:
            raise ValueError(f"the draft's vocabulary ({draft.vocab_size}) is not the target's "
                             f"({target.config.vocab_size})")
        depth = target.config.num_layers
        if any(t >= depth for t in draft.tap_layers):
            raise ValueError(f"the draft taps target layers {list(draft.tap_layers)}; the target has {depth}")
        return cls(draft.eval(), max_batch=max_batch, max_seq_len=max_seq_len)

    def _allocate(self, rows: list[tuple[torch.Tensor, ...]]) -> None:
        # Row shapes are only known from the draft's first output: one buffer per layer and tensor,
        # [slots + 1, capacity, ...] (the extra slot takes padding writes).
        self.cache = [tuple(torch.zeros(self.max_batch + 1, self.capacity, *t.shape[1:], dtype=t.dtype,
                                        device=t.device) for t in layer) for layer in rows]

    def observe(self, out, batch, next_ids, last_row, ready):
        features = torch.cat([out.taps[layer] for layer in self.tap_layers], dim=-1)  # [T, taps·D]
        rows = self.draft.context_rows(self.draft.project_context(features), batch.positions)
        if self.cache is None:
            self._allocate(rows)
        slot = torch.where(batch.valid, batch.slot[batch.token_row], self.max_batch)
        index = batch.positions % self.capacity
        for cached, new in zip(self.cache, rows):
            for buf, t in zip(cached, new):
                buf[slot, index] = t.to(buf.dtype)
        self.anchor_pos.copy_(torch.where(ready, batch.positions[last_row] + 1, self.anchor_pos))  # in place: graphs

    def propose(self, slots: SlotState, u: torch.Tensor) -> Proposal:
        r, gamma = slots.anchor.shape[0], self.num_draft_tokens
        dev = slots.anchor.device
        p = self.anchor_pos  # [R]
        block_pos = p.unsqueeze(-1) + torch.arange(gamma, device=dev)
        block_ids = torch.full((r, gamma), self.draft.block_input_token, dtype=torch.long, device=dev)
        block_ids[:, 0] = slots.anchor
        # Ring row j holds the latest committed position ≡ j (mod capacity) below p. While every anchor
        # is below the round's context bound (≤ capacity), rows at and past it hold nothing yet.
        rows = min(self.capacity, slots.context) if slots.context else self.capacity
        j = torch.arange(rows, device=dev)
        held = p.unsqueeze(-1) - 1 - (p.unsqueeze(-1) - 1 - j) % self.capacity  # [R, rows]
        valid = held >= 0
        context = [tuple(buf[:r, :rows] for buf in layer) for layer in self.cache]
        tokens, logits, conf = self.draft.draft_block(block_ids, block_pos, context, valid, slots.anchor,
                                                      *slots.sampling(), u)
        if conf is None:
            return Proposal(tokens=tokens, logits=logits)
        calibrated = torch.sigmoid(conf if self.sts is None else conf / self.sts)
        return Proposal(tokens=tokens, logits=logits, confidence=calibrated, confidence_logits=conf)

    def teacher_forced(self, view: TargetView) -> Callable[[torch.Tensor], torch.Tensor]:
        """The block at anchor p sees the context rows of positions [p − window, p) of the file (the
        draft's own window, not the engine's capacity: the file may be longer than max_seq_len) and the
        Markov head is fed the true previous token y_{p+i} at slot i."""
        draft, ids, gamma = self.draft, view.ids, self.num_draft_tokens
        features = torch.cat([view.taps[layer] for layer in self.tap_layers], dim=-1)  # [L, F]
        positions = torch.arange(len(ids), device=ids.device)
        with torch.no_grad():
            rows = draft.context_rows(draft.project_context(features), positions)  # per layer, [L, ...] each
        window = draft.context_window or len(ids)

        @torch.no_grad()
        def propose(anchors: torch.Tensor) -> torch.Tensor:
            span = int(anchors.max())  # context rows any anchor reads: positions < p
            r = len(anchors)
            context = [tuple(t[:span].unsqueeze(0).expand(r, span, *t.shape[1:]) for t in layer) for layer in rows]
            p = anchors.unsqueeze(-1)
            valid = (positions[:span] < p) & (positions[:span] >= p - window)  # [A, span], as the engine's ring
            block_pos = p + torch.arange(gamma, device=ids.device)  # [A, γ]
            block_ids = torch.full_like(block_pos, draft.block_input_token)
            block_ids[:, 0] = ids[anchors]
            h = draft.block_hidden(block_ids, block_pos, context, valid)
            h = h[1] if isinstance(h, tuple) else h  # the V4 layout returns (h_pre, h)
            return draft.corrected_logits_tf(draft.base_logits(h), ids[block_pos], h)  # prev_i = y_{p+i}

        return propose
