"""EAGLE-3 drafting in the engine: the draft (dspark.draft.eagle3) chains γ tokens per round.

Context rule (as the block drafter's, dspark.decode.block): the draft layer's K/V rows exist for
COMMITTED positions only, one row per position up to max_seq_len, written in `observe` from the target's
tapped features of that very forward, each row paired with the committed token that follows it
(`next_ids`). The chain's own rows (step 0 at p−1, then p, p+1, ...) are provisional and live only
inside one `propose`, so nothing is ever rolled back. Step 0 recomputes row p−1 from its stored
projected features g = fc(f_{p−1}) and the anchor, because its output (not only its K/V) starts the
chain; the cached copy of row p−1 is masked out for that round.

The draft's vocabulary is the target's (DeepSpec's EAGLE-3 has no draft-vocabulary maps), so
`Proposal.logits` are the draft's logits and each token is sampled from them with `ops` at the slot's
temperature / top-k / top-p, consuming the round's uniforms u[:, k].
"""

from __future__ import annotations

from typing import Callable

import torch

from dspark import ops
from dspark.decode.buffers import SlotState
from dspark.decode.drafter import Drafter, Proposal, TargetView


class Eagle3Drafter(Drafter):
    def __init__(self, draft, *, max_batch: int, max_seq_len: int):
        super().__init__(draft.vocab_size, draft.block_size)
        self.draft = draft
        self.tap_layers = tuple(draft.tap_layers)
        self.capacity, self.max_batch = max_seq_len, max_batch
        cfg, dev = draft.config, draft.device
        dtype = draft.embed_tokens.weight.dtype
        # [slots + 1, capacity, H_kv, hd]: the extra slot takes padding writes.
        shape = (max_batch + 1, self.capacity, cfg.num_kv_heads, cfg.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=dev)
        self.values = torch.zeros(shape, dtype=dtype, device=dev)
        self.last_g = torch.zeros(max_batch, cfg.hidden_size, dtype=dtype, device=dev)  # fc(f_{p−1}) per slot
        self.anchor_pos = torch.zeros(max_batch, dtype=torch.long, device=dev)

    @classmethod
    def build(cls, target, cache, draft, num_draft_tokens, max_batch, max_seq_len):
        if not hasattr(draft, "chain"):  # the engine has refused a missing draft already
            raise ValueError(f"method 'eagle3' needs an EAGLE-3 draft, got a {type(draft).__name__}")
        draft.check_target(target.config)
        return cls(draft.eval(), max_batch=max_batch, max_seq_len=max_seq_len)

    def observe(self, out, batch, next_ids, last_row, ready):
        features = torch.cat([out.taps[layer] for layer in self.tap_layers], dim=-1)  # [T, taps·d]
        g = self.draft.project_context(features.to(self.keys.dtype))  # [T, d]
        # Rows that are not committed carry no next token (−1): any id serves, their writes go to the pad slot.
        k, v = self.draft.context_rows(g, next_ids.clamp(min=0), batch.positions)
        slot = torch.where(batch.valid, batch.slot[batch.token_row], self.max_batch)
        index = batch.positions.clamp(max=self.capacity - 1)  # padding rows may sit anywhere; they go to the pad slot
        self.keys[slot, index] = k
        self.values[slot, index] = v
        # In place: a CUDA graph replays the addresses it captured.
        self.last_g.copy_(torch.where(ready.unsqueeze(-1), g[last_row], self.last_g))
        self.anchor_pos.copy_(torch.where(ready, batch.positions[last_row] + 1, self.anchor_pos))

    def propose(self, slots: SlotState, u: torch.Tensor) -> Proposal:
        r, dev = slots.anchor.shape[0], slots.anchor.device
        p = self.anchor_pos[:r]
        # Row j holds position j (capacity = max_seq_len: nothing wraps). Rows below p−1 are read; row p−1
        # is the chain's step 0; no anchor reaches past the round's context bound.
        rows = min(self.capacity, slots.context) if slots.context else self.capacity
        valid = torch.arange(rows, device=dev) < (p - 1).unsqueeze(-1)  # [R, rows]
        sampling = slots.sampling()

        def sample(k: int, logits: torch.Tensor) -> torch.Tensor:
            return ops.sample_logits(logits, *sampling, u[:, k])

        tokens, logits = self.draft.chain(self.last_g[:r], slots.anchor, p, self.keys[:r, :rows],
                                          self.values[:r, :rows], valid, self.num_draft_tokens, sample)
        return Proposal(tokens=tokens, logits=logits)

    def teacher_forced(self, view: TargetView) -> Callable[[torch.Tensor], torch.Tensor]:
        """The chain at anchor p sees the true committed rows of positions < p−1 and is fed the true
        token y_{p+k} at step k (TTT: its own hidden states, the file's tokens)."""
        draft, ids, gamma = self.draft, view.ids, self.num_draft_tokens
        features = torch.cat([view.taps[layer] for layer in self.tap_layers], dim=-1)  # [L, F]
        positions = torch.arange(len(ids) - 1, device=ids.device)
        with torch.no_grad():
            g = draft.project_context(features[:-1].to(draft.embed_tokens.weight.dtype))  # [L−1, d]
            keys, values = draft.context_rows(g, ids[1:], positions)  # row i pairs f_i with y_{i+1}

        @torch.no_grad()
        def propose(anchors: torch.Tensor) -> torch.Tensor:
            span, a = max(int(anchors.max()) - 1, 1), len(anchors)
            ctx_k = keys[:span].unsqueeze(0).expand(a, *keys[:span].shape)
            ctx_v = values[:span].unsqueeze(0).expand(a, *values[:span].shape)
            valid = positions[:span] < (anchors - 1).unsqueeze(-1)  # [A, span]
            _, logits = draft.chain(g[anchors - 1], ids[anchors], anchors, ctx_k, ctx_v, valid, gamma,
                                    lambda k, _: ids[anchors + k + 1])
            return logits

        return propose


__all__ = ["Eagle3Drafter"]
