"""One engine step as a pure function of preallocated buffers: no `.item()`, no `nonzero`, no
boolean-mask indexing, no branches on tensor values (a CPU test runs it under a mode that raises
on host syncs). The host builds each step's layout from values it already knows (committed
lengths, verify lengths, prompt chunks) and reads the results back afterwards (engine.py).

    prefill_step       : a chunk of prompt per slot; slots whose prompt ends sample their first token
    draft_and_schedule : draft → schedule (verify lengths, and the flat rows they need)
    verify_round       : verify → rejection sampling → commit → drafter catch-up
    decode_round       : both, with a verify bucket fixed beforehand

Between the halves the host may read `Drafted.rows` to size the verify bucket to what an adaptive
scheduler chose (engine.py); without that read the bucket must cover the largest possible choice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import torch

from dspark import ops
from dspark.decode.adapt import AcceptanceTracker
from dspark.decode.buffers import SlotState
from dspark.decode.drafter import Drafter, Proposal
from dspark.decode.schedule import Scheduler
from dspark.model.batch import Batch
from dspark.model.cache import TargetCache


@dataclass(frozen=True)
class PrefillLayout:
    batch: Batch  # prompt chunks, logits_rows = each slot's last chunk row ([R], idle slots: row 0)
    next_ids: torch.Tensor  # [T] the prompt token after each row (placeholder where the first sample goes)
    sampled_next: torch.Tensor  # [T] bool: this row's next token is the first sampled token
    last_row: torch.Tensor  # [R] flat index of each slot's last chunk row
    completes: torch.Tensor  # [R] bool: the slot's prompt ends in this chunk


@dataclass(frozen=True)
class RoundPlan:
    """What the host knows before a decode round (all [R] over slots; idle slots: room 0)."""

    committed: torch.Tensor  # [R] target cache length of each slot (its anchor's position)
    room: torch.Tensor  # [R] most drafts each slot may verify this round
    bucket: int  # static number of flat verify rows, ≥ Σ over decoding slots of (room + 1)
    scheduler: Scheduler  # its `lengths(confidence [R, γ] | None, room, decoding)` → ℓ [R], device-side
    tracker: AcceptanceTracker | None = None  # online correction of confidences from past rounds


@dataclass(frozen=True)
class VerifyLayout:
    batch: Batch  # ids are filled from [anchor, drafts]; logits for every flat row
    src_col: torch.Tensor  # [T] column of [anchor, drafts] each flat token takes (0 = anchor)
    start: torch.Tensor  # [R] flat row of each slot's anchor
    verify_len: torch.Tensor  # [R] drafts verified per slot (0 for idle slots)


def verify_layout(committed: torch.Tensor, lengths: torch.Tensor, active: torch.Tensor, bucket: int,
                  dummy_slot: int, context: int = 0) -> VerifyLayout:
    """The flat verify batch from device-side lengths, without host syncs: slot r's anchor and
    ℓ_r drafts at positions committed_r .. committed_r + ℓ_r, slots in order, padding at the end."""
    n = torch.where(active, lengths + 1, 0)  # rows per slot
    slots = torch.arange(committed.shape[0], device=committed.device)
    batch, col = Batch.from_lengths(slots, committed, n, bucket, dummy_slot, context)
    return VerifyLayout(batch=batch, src_col=col, start=torch.where(active, batch.new_start[:-1], 0),
                        verify_len=torch.where(active, lengths, 0))


@dataclass
class StepResult:
    tokens: torch.Tensor  # [R, γ+1] emitted tokens, −1 padded
    num_tokens: torch.Tensor  # [R]
    logprobs: torch.Tensor  # [R, γ+1] raw target log-probabilities of the emitted tokens
    accepted: torch.Tensor  # [R]
    stopped: torch.Tensor  # [R] bool: a stop token was emitted
    verify_len: torch.Tensor | None = None  # [R] drafts verified this round
    proposal: torch.Tensor | None = None  # [R, γ] drafted tokens (read back only when recording)
    confidence: torch.Tensor | None = None  # [R, γ]
    confidence_logits: torch.Tensor | None = None  # [R, γ] raw (read back only when recording)


def _logprob(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def prefill_step(target, cache: TargetCache, drafter: Drafter, slots: SlotState, layout: PrefillLayout) -> StepResult:
    batch = layout.batch
    out = target.forward_batch(batch, cache, tap_layers=drafter.tap_layers)
    logits = out.logits  # [R, V]: one row per slot
    u = ops.uniforms(slots.seed, slots.offset, 1)[:, 0]
    first = ops.sample_logits(logits, *slots.sampling(), u, kernels=target.config.kernels)
    done = layout.completes
    slots.anchor.copy_(torch.where(done, first, slots.anchor))
    slots.offset.add_(done.long())
    next_ids = torch.where(layout.sampled_next, first[batch.slot[batch.token_row].clamp(max=first.shape[0] - 1)],
                           layout.next_ids)
    drafter.observe(out, batch, next_ids, layout.last_row, done)
    stopped = (first.unsqueeze(-1) == slots.stop_tokens).any(-1)
    return StepResult(tokens=first.unsqueeze(-1), num_tokens=done.long(), logprobs=_logprob(logits, first).unsqueeze(-1),
                      accepted=torch.zeros_like(first), stopped=stopped & done)


@dataclass(frozen=True)
class Drafted:
    """A round's first half: the drafts and how many of them each slot verifies."""

    u: torch.Tensor  # [R, 2γ+1] the round's uniforms: draft | accept | sample
    proposal: Proposal
    lengths: torch.Tensor  # [R] verify lengths ℓ (≤ room; idle slots: don't care)
    rows: torch.Tensor  # [] flat verify rows the lengths need: Σ over decoding slots of (ℓ + 1)


def draft_and_schedule(drafter: Drafter, slots: SlotState, plan: RoundPlan) -> Drafted:
    gamma = drafter.num_draft_tokens
    active = slots.decoding
    u = ops.uniforms(slots.seed, slots.offset, 2 * gamma + 1)
    proposal: Proposal = drafter.propose(slots, u[:, :gamma])
    confidence = proposal.confidence
    if plan.tracker is not None and confidence is not None:
        confidence = plan.tracker.correct(confidence)
    lengths = torch.minimum(plan.scheduler.lengths(confidence, plan.room, active), plan.room)
    return Drafted(u=u, proposal=proposal, lengths=lengths, rows=torch.where(active, lengths + 1, 0).sum())


def decode_round(target, cache: TargetCache, drafter: Drafter, slots: SlotState, plan: RoundPlan) -> StepResult:
    """Both halves with `plan.bucket` rows, which must cover what any schedule may choose."""
    return verify_round(target, cache, drafter, slots, plan, draft_and_schedule(drafter, slots, plan), plan.bucket)


def verify_round(target, cache: TargetCache, drafter: Drafter, slots: SlotState, plan: RoundPlan, drafted: Drafted,
                 bucket: int) -> StepResult:
    """Verify the scheduled drafts in `bucket` ≥ drafted.rows flat rows; accept, commit, catch up."""
    gamma = drafter.num_draft_tokens
    active = slots.decoding
    u, proposal = drafted.u, drafted.proposal
    layout = verify_layout(plan.committed, drafted.lengths, active, bucket, cache.dummy_slot, slots.context)
    seq = torch.cat([slots.anchor.unsqueeze(-1), proposal.tokens], dim=1)  # [R, γ+1]
    batch = layout.batch
    src_slot = batch.slot[batch.token_row].clamp(max=seq.shape[0] - 1)
    batch = dataclasses.replace(batch, input_ids=seq[src_slot, layout.src_col])
    out = target.forward_batch(batch, cache, tap_layers=drafter.tap_layers)
    accepted, emitted, num, stopped = ops.chain_rejection(
        out.logits, layout.start, layout.verify_len, proposal.logits, proposal.tokens, *slots.sampling(),
        slots.stop_tokens, u[:, gamma:2 * gamma], u[:, 2 * gamma], kernels=target.config.kernels)
    if plan.tracker is not None and proposal.confidence is not None:
        plan.tracker.update(proposal.confidence, layout.verify_len, accepted, active, slots.temperature)
    nxt = emitted.gather(1, accepted.unsqueeze(-1)).squeeze(-1)  # correction / bonus (−1 after a draft stop)
    slots.anchor.copy_(torch.where(active & (nxt >= 0), nxt, slots.anchor))
    slots.offset.add_(active.long() * (2 * gamma + 1))

    # Rows 0..a of each slot are now committed; the token after row j is emitted[j].
    row_col = layout.src_col
    committed = batch.valid & (row_col <= accepted[src_slot])
    next_ids = emitted[src_slot, row_col.clamp(max=gamma)].clamp(min=0)  # −1 only on rows not committed
    last_row = layout.start + accepted
    drafter.observe(out, dataclasses.replace(batch, valid=committed), next_ids, last_row, active & (nxt >= 0))

    rows = (layout.start.unsqueeze(-1) + torch.arange(gamma + 1, device=seq.device)).clamp(max=out.logits.shape[0] - 1)
    logprobs = _logprob(out.logits[rows], emitted)
    return StepResult(tokens=emitted, num_tokens=num, logprobs=logprobs, accepted=accepted, stopped=stopped,
                      verify_len=layout.verify_len, proposal=proposal.tokens, confidence=proposal.confidence,
                      confidence_logits=proposal.confidence_logits)


def prefill_layout(chunks: list[tuple[int, int, list[int], list[int], bool]], *, max_batch: int, dummy_slot: int,
                   pad_to: int | None = None, device="cpu") -> PrefillLayout:
    """Host-side. chunks = [(slot, cache_len, chunk tokens, next tokens, completes)], where `next
    tokens` are the prompt tokens following each chunk token (one shorter when the prompt ends)."""
    batch = Batch.build([(s, c, toks) for s, c, toks, _, _ in chunks], dummy_slot=dummy_slot, pad_to=pad_to,
                        logits=[0], device=device)
    t = batch.num_tokens
    next_ids, sampled, last_row, completes = [0] * t, [False] * t, [0] * max_batch, [False] * max_batch
    start = 0
    for slot, _, toks, nxt, done in chunks:
        for i in range(len(toks)):
            if i < len(nxt):
                next_ids[start + i] = nxt[i]
            else:
                sampled[start + i] = True
        last_row[slot] = start + len(toks) - 1
        completes[slot] = done
        start += len(toks)
    dev = dict(device=device)
    last = torch.tensor(last_row, **dev)
    return PrefillLayout(batch=dataclasses.replace(batch, logits_rows=last), next_ids=torch.tensor(next_ids, **dev),
                         sampled_next=torch.tensor(sampled, **dev), last_row=last,
                         completes=torch.tensor(completes, **dev))
