"""Per-slot device state one decoding step reads and writes (allocated once at max_batch rows).

Row r belongs to cache slot r. Rows of idle slots hold stale values that no step commits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dspark.config import SamplingParams


@dataclass
class SlotState:
    anchor: torch.Tensor  # [R] int64: the next token to verify (sampled, not yet in the cache)
    temperature: torch.Tensor  # [R] fp32
    top_k: torch.Tensor  # [R] int64
    top_p: torch.Tensor  # [R] fp32
    seed: torch.Tensor  # [R] int64
    offset: torch.Tensor  # [R] int64: uniforms drawn so far (see dspark.ops.rng)
    stop_tokens: torch.Tensor  # [R, S] int64, padded with −1
    decoding: torch.Tensor  # [R] bool: the slot takes part in this round (set by the host loop)
    # Host-side, per slot: whether its request samples (temperature > 0) and uses top-k / top-p. When
    # no slot does, `sampling()` passes None there and the CPU reference skips the work: the integer
    # weights when every request is greedy, the vocabulary sort when no request filters.
    samples: list[bool] = field(default_factory=list)
    uses_top_k: list[bool] = field(default_factory=list)
    uses_top_p: list[bool] = field(default_factory=list)
    # Whether any slot samples / uses top-k / top-p, kept up to date by assign and release: what
    # `sampling()` reads, so a compiled round depends on these three flags, not on every slot's.
    any_used: tuple[bool, bool, bool] = (False, False, False)
    # Host-side, per round: every position the round touches is below it (0 = unknown); see
    # `dspark.model.batch.context_bucket`. The verify batch and the drafters bound their reads by it.
    context: int = 0

    @classmethod
    def allocate(cls, max_batch: int, max_stop_tokens: int, device) -> "SlotState":
        def zeros(dtype, *shape):
            return torch.zeros(max_batch, *shape, dtype=dtype, device=device)

        return cls(anchor=zeros(torch.long), temperature=zeros(torch.float32), top_k=zeros(torch.long),
                   top_p=torch.ones(max_batch, device=device), seed=zeros(torch.long), offset=zeros(torch.long),
                   stop_tokens=torch.full((max_batch, max_stop_tokens), -1, dtype=torch.long, device=device),
                   decoding=zeros(torch.bool), samples=[False] * max_batch, uses_top_k=[False] * max_batch,
                   uses_top_p=[False] * max_batch)

    def assign(self, slot: int, params: SamplingParams, seed: int, stop_tokens: tuple[int, ...]) -> None:
        """Host-side: load a request's parameters into its row (before its first step)."""
        if len(stop_tokens) > self.stop_tokens.shape[1]:
            raise ValueError(f"at most {self.stop_tokens.shape[1]} stop token ids per request, got {len(stop_tokens)}")
        self.temperature[slot] = params.temperature
        self.top_k[slot] = params.top_k
        self.top_p[slot] = params.top_p
        self.samples[slot] = params.temperature > 0
        self.uses_top_k[slot], self.uses_top_p[slot] = params.top_k > 0, params.top_p < 1
        self._update_any_used()
        self.seed[slot] = seed
        self.offset[slot] = 0
        self.stop_tokens[slot] = -1
        if stop_tokens:
            self.stop_tokens[slot, : len(stop_tokens)] = torch.tensor(stop_tokens, device=self.stop_tokens.device)

    def release(self, slot: int) -> None:
        """Host-side: the slot's request is done; its parameters no longer count."""
        self.samples[slot] = self.uses_top_k[slot] = self.uses_top_p[slot] = False
        self._update_any_used()

    def _update_any_used(self) -> None:
        self.any_used = (any(self.samples), any(self.uses_top_k), any(self.uses_top_p))

    def sampling(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(temperature, top_k, top_p) rows for the sampling ops; None: every slot greedy / a filter no slot uses."""
        samples, uses_top_k, uses_top_p = self.any_used
        return (self.temperature if samples else None, self.top_k if uses_top_k else None,
                self.top_p if uses_top_p else None)
