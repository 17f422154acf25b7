"""Per-request decoding statistics (dspark.md §5.4: τ counts the bonus token)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    prefill_forwards: int = 0
    rounds: int = 0  # decode rounds (one verify forward each)
    proposal_lens: list[int] = field(default_factory=list)  # ℓ verified per round
    accepted: list[int] = field(default_factory=list)  # drafts accepted per round
    emitted: list[int] = field(default_factory=list)  # tokens emitted per round (a+1, or a at a draft stop)
    proposals: list[list[int]] = field(default_factory=list)  # drafted tokens per round, when recorded
    confidence_logits: list[list[float]] = field(default_factory=list)  # raw confidences per round, when recorded

    def record(self, proposal_len: int, accepted: int, emitted: int) -> None:
        self.rounds += 1
        self.proposal_lens.append(proposal_len)
        self.accepted.append(accepted)
        self.emitted.append(emitted)

    @property
    def target_forwards(self) -> int:
        return self.prefill_forwards + self.rounds

    @property
    def generated_tokens(self) -> int:
        return sum(self.emitted) + (1 if self.prefill_forwards else 0)

    @property
    def tau(self) -> float:
        """Mean tokens emitted per decode round, bonus included (0 without rounds)."""
        return sum(self.emitted) / self.rounds if self.rounds else 0.0

    def prefix_survival(self) -> list[float]:
        """DeepSpec's accept_rate@i: #rounds with accepted > i / #rounds with ℓ > i."""
        top = max(self.proposal_lens, default=0)
        out = []
        for i in range(top):
            proposed = sum(1 for p in self.proposal_lens if p > i)
            out.append(sum(1 for a in self.accepted if a > i) / proposed if proposed else 0.0)
        return out

    def conditional_acceptance(self) -> list[float]:
        """The paper's Fig. 2: #rounds with accepted > i / #rounds with accepted > i−1 and ℓ > i."""
        top = max(self.proposal_lens, default=0)
        out = []
        for i in range(top):
            reached = sum(1 for p, a in zip(self.proposal_lens, self.accepted) if p > i and a > i - 1)
            out.append(sum(1 for a in self.accepted if a > i) / reached if reached else 0.0)
        return out

    def merge(self, other: "RequestStats") -> "RequestStats":
        return RequestStats(self.prompt_tokens + other.prompt_tokens, self.prefill_forwards + other.prefill_forwards,
                            self.rounds + other.rounds, self.proposal_lens + other.proposal_lens,
                            self.accepted + other.accepted, self.emitted + other.emitted,
                            self.proposals + other.proposals, self.confidence_logits + other.confidence_logits)

    def summary(self) -> str:
        return (f"rounds {self.rounds}, target forwards {self.target_forwards}, tokens {self.generated_tokens}, "
                f"tau {self.tau:.2f}")
