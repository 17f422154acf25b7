"""The drafter interface every method plugs into, and the no-draft `ar` drafter.

A drafter proposes γ tokens per slot from its own context, then observes what the target
committed after every forward so that its context grows and rolls back with the target's.

    propose(slots, u [R, γ]) → Proposal     tokens [R, γ], logits [R, γ, V], confidence [R, γ] | None
    observe(out, batch, next_ids, last_row, ready)

`Proposal.logits` define the draft distribution: the tokens must have been drawn from
`ops.probs(logits, *slots.sampling())` — the slot's temperature / top-k / top-p, None where no slot
samples / filters — (or be a deterministic choice reported as a one-hot, which is equally lossless),
because rejection sampling recomputes q from them.
Drafters are built by the engine (`build`, with the engine's sizes) from the method registry
(dspark.decode.methods); nothing else constructs them.
`observe` gets the target forward's output and batch with `valid` narrowed to the rows that are
now committed; `next_ids` [T] is the token that follows each row (the anchor for the last row),
`last_row` [R] the flat index of each slot's last committed row, `ready` [R] the slots whose anchor
was just set. Both run inside the sync-free step.

Teacher forcing (the eval harness, dspark.eval): `teacher_forced(view)` → propose(anchors [A]) →
logits [A, γ, V], the draft distributions the drafter would propose at each anchor p of one file
had the context up to p been the file's TRUE tokens, with every token a proposal conditions on after
p (a Markov head's previous token, MTP's chained input) the true one y_{p+i}. `view` is one dense
target forward over the file (`target_view`); per-file work runs once in `teacher_forced`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dspark.decode.buffers import SlotState
from dspark.model.batch import Batch
from dspark.model.protocol import TargetOutput


@dataclass
class Proposal:
    tokens: torch.Tensor  # [R, γ] int64
    logits: torch.Tensor  # [R, γ, V] fp32
    confidence: torch.Tensor | None = None  # [R, γ] fp32, P(slot accepted | earlier slots accepted)
    confidence_logits: torch.Tensor | None = None  # [R, γ] raw head logits (calibration rollouts)


class Drafter:
    """Base class: the `ar` method (γ = 0: every round is one plain target step)."""

    tap_layers: tuple[int, ...] = ()
    has_confidence = False  # proposals carry confidences (what the adaptive schedulers read)

    def __init__(self, vocab_size: int, num_draft_tokens: int = 0):
        self.vocab_size = vocab_size
        self.num_draft_tokens = num_draft_tokens

    @classmethod
    def build(cls, target, cache, draft, num_draft_tokens: int, max_batch: int, max_seq_len: int) -> "Drafter":
        """The drafter an engine of these sizes uses (a `dspark.decode.methods.Method`'s `build`)."""
        return cls(target.config.vocab_size, num_draft_tokens)

    def admit(self, slot: int, prompt: list[int]) -> None:
        """Host-side, before the request's first forward."""

    def release(self, slot: int) -> None:
        """Host-side, when the request leaves its slot."""

    def propose(self, slots: SlotState, u: torch.Tensor) -> Proposal:
        r = slots.anchor.shape[0]
        return Proposal(tokens=slots.anchor.new_zeros(r, 0),
                        logits=torch.zeros(r, 0, self.vocab_size, device=slots.anchor.device))

    def observe(self, out: TargetOutput, batch: Batch, next_ids: torch.Tensor, last_row: torch.Tensor,
                ready: torch.Tensor) -> None:
        pass

    def teacher_forced(self, view: TargetView) -> Callable[[torch.Tensor], torch.Tensor]:
        """Drafts on one file from its true prefix: anchors [A] (each ≥ 1, ≤ L−1−γ) → logits [A, γ, V]."""
        raise ValueError(f"{type(self).__name__} drafts nothing: no teacher-forced proposal")


def one_hot_logits(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits of a deterministic proposal: 0 at the token, −inf elsewhere → [..., V]."""
    logits = torch.full((*tokens.shape, vocab_size), float("-inf"), device=tokens.device)
    return logits.scatter_(-1, tokens.unsqueeze(-1), 0.0)


@dataclass
class TargetView:
    """One dense target forward over a file's tokens (no cache): what teacher-forced drafters read."""

    ids: torch.Tensor  # [L] int64
    logits: torch.Tensor  # [L, V] fp32: row t is the target's distribution for token t+1
    streams: torch.Tensor  # [L, N, D] last-layer streams (the MTP's input)
    taps: dict[int, torch.Tensor]  # layer → stream mean [L, D]


@torch.no_grad()
def target_view(target, ids: torch.Tensor, tap_layers) -> TargetView:
    """The target's view of `ids` [L], tapping `tap_layers` (any order, repeats allowed)."""
    out = target.run(ids.unsqueeze(0), tap_layers=tuple(sorted(set(tap_layers))))
    return TargetView(ids, out.logits[0], out.streams[0], {layer: t[0] for layer, t in out.taps.items()})
