"""Verify lengths from draft confidences (dspark.md §7, architecture.md §5).

Layouts: R requests, γ draft slots.

    confidence [R, γ]   c_{r,j}: P(slot j accepted | slots < j accepted), calibrated (STS)
    survival   [R, γ]   a_{r,j} = Π_{i≤j} c_{r,i}, non-increasing in j
    room       [R]      most drafts a request may verify (0 for idle slots)
    active     [R] bool the request takes part in the round (it verifies at least its anchor)
    lengths    [R]      ℓ_r ∈ [0, min(γ, room_r)]

Every scheduler is non-anticipating: whether slot j is verified depends on c_{r,0..j} (hence on
draft tokens 1..j, never on token j+1, which c_{r,j+1} reads through the Markov embedding) and
on other requests' values ranked above it, never on (r, j+1...). Drafting always produces the
full block; only verification is truncated. All functions are sync-free tensor code.

    fixed               ℓ = min(γ, room)
    threshold_slot      DeepSpec: ℓ = index of the first slot with c < τ (per slot, not cumulative)
    threshold_survival  ℓ = index of the first slot with a < τ
    hardware            Algorithm 1: greedy admission by survival, maximising τ·SPS(B), with the
                        early stop that keeps it non-anticipating
    async               top-K admission by current survival; K from two rounds before (`capacity`)

Each rule is wrapped in a `Scheduler` object (`make_scheduler`) that the engine and the pure step
talk to: `lengths` is the device function the step calls; `sized_before_drafting` says whether the
verify bucket is known before the drafts (fixed, async) or read back after scheduling (the
synchronous adaptive ones); `cap_rows` and `observe` are the async scheduler's two-round history.
"""

from __future__ import annotations

import torch

SCHEDULERS = ("fixed", "threshold-slot", "threshold-survival", "hardware", "async")
# Schedulers that read draft confidences (a drafter with a confidence head: dspark, ngram).
NEEDS_CONFIDENCE = ("threshold-slot", "threshold-survival", "hardware", "async")


def survival(confidence: torch.Tensor) -> torch.Tensor:
    return confidence.float().cumprod(-1)


def _cap(lengths: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    return torch.minimum(lengths, room.clamp(min=0))


def fixed(confidence: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    return _cap(torch.full_like(room, confidence.shape[-1]), room)


def threshold_slot(confidence: torch.Tensor, room: torch.Tensor, tau: float) -> torch.Tensor:
    keep = (confidence >= tau).long().cumprod(-1)  # stops at the first slot below τ
    return _cap(keep.sum(-1), room)


def threshold_survival(confidence: torch.Tensor, room: torch.Tensor, tau: float) -> torch.Tensor:
    return _cap((survival(confidence) >= tau).long().sum(-1), room)


def _ranked(confidence: torch.Tensor, room: torch.Tensor):
    """Candidates (r, j) with j < room_r and a > 0, sorted by survival descending; ties: smaller j
    first, then smaller r (so (r, j) always precedes (r, j+1)). → (a, r, admissible) flat [R·γ]."""
    r, gamma = confidence.shape
    a = survival(confidence)
    j = torch.arange(gamma, device=a.device).expand(r, gamma)
    rows = torch.arange(r, device=a.device).unsqueeze(-1).expand(r, gamma)
    ok = (j < room.unsqueeze(-1)) & (a > 0)
    a, j, rows, ok = a.flatten(), j.flatten(), rows.flatten(), ok.flatten()
    # Lexicographic sort by (admissible first, −a, j, r): stable sorts from the least significant key.
    order = torch.argsort(rows, stable=True)
    order = order[torch.argsort(j[order], stable=True)]
    order = order[torch.argsort(-a[order], stable=True)]
    order = order[torch.argsort((~ok[order]).long(), stable=True)]
    return a[order], rows[order], ok[order]


def _lengths_from(rows: torch.Tensor, admitted: torch.Tensor, r: int) -> torch.Tensor:
    """Per-request count of admitted candidates (an admitted set is a prefix of each request)."""
    return torch.zeros(r, dtype=torch.long, device=rows.device).scatter_add_(0, rows, admitted.long())


def _objective(a_sorted: torch.Tensor, ok: torch.Tensor, active: torch.Tensor, sps: torch.Tensor):
    """Θ after admitting the first k candidates, k = 0..N → [N+1] (Θ_0 = R·SPS(R))."""
    n_active = active.long().sum()
    taken = torch.cumsum(torch.where(ok, a_sorted, 0.0), 0)
    tau = torch.cat([n_active.new_zeros(1).float(), taken]) + n_active.float()
    batch = n_active + torch.arange(a_sorted.numel() + 1, device=a_sorted.device)
    return tau * sps[batch.clamp(max=sps.numel() - 1)]


def hardware(confidence: torch.Tensor, room: torch.Tensor, active: torch.Tensor, sps: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 (causal): admit candidates in survival order while Θ = τ·SPS(B) strictly improves;
    stop at the first candidate that does not improve it. `sps` [Bmax+1]: steps/s at B tokens.

    The break is what makes it lossless: (r, j)'s admission depends only on candidates ranked above
    it, never on (r, j+1), whose survival reveals draft token j+1 (dspark.md §7.3)."""
    a_sorted, rows, ok = _ranked(confidence, torch.where(active, room, 0))
    theta = _objective(a_sorted, ok, active, sps)
    improving = (theta[1:] > theta[:-1]) & ok
    admitted = improving.long().cumprod(0).bool()
    return _lengths_from(rows, admitted, confidence.shape[0])


def capacity(confidence: torch.Tensor, room: torch.Tensor, active: torch.Tensor, sps: torch.Tensor) -> torch.Tensor:
    """Async capacity K: the greedy path's global argmax of Θ, no early stop (it copes with jagged
    SPS cliffs). Used for the round two steps later, so it never sees that round's tokens."""
    a_sorted, _, ok = _ranked(confidence, torch.where(active, room, 0))
    theta = _objective(a_sorted, ok, active, sps)
    theta = torch.where(torch.cat([ok.new_ones(1), ok]), theta, float("-inf"))
    return theta.argmax()  # lowest k among ties


def async_topk(confidence: torch.Tensor, room: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Admit the K highest-survival candidates of this round (same ranking and tie rule)."""
    _, rows, ok = _ranked(confidence, room)
    admitted = (torch.arange(rows.numel(), device=rows.device) < k) & ok
    return _lengths_from(rows, admitted, confidence.shape[0])


# ------------------------------------------------------------------------------- scheduler objects
class Scheduler:
    """`fixed`: verify every drafted slot the request has room for."""

    name = "fixed"
    sized_before_drafting = True  # the verify bucket is known before drafting (no host read in between)

    def __init__(self, num_draft_tokens: int):
        self.num_draft_tokens = num_draft_tokens

    def lengths(self, confidence: torch.Tensor | None, room: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Device-side verify lengths ℓ [R] (≤ room) from confidences [R, γ] (None without a head)."""
        return fixed(room.new_zeros(1, self.num_draft_tokens), room)

    def cap_rows(self, rows: int, requests: int) -> int:
        """Host-side: the flat verify rows this round may use, given `rows` for full blocks."""
        return rows

    def observe(self, confidence: torch.Tensor | None, room: torch.Tensor, active: torch.Tensor) -> None:
        """Host-side, after a round: what the scheduler keeps of it."""


class _Threshold(Scheduler):
    sized_before_drafting = False

    def __init__(self, num_draft_tokens: int, threshold: float, rule):
        super().__init__(num_draft_tokens)
        self.threshold, self.rule = threshold, rule

    def lengths(self, confidence, room, active):
        return self.rule(confidence, room, self.threshold)


class _Hardware(Scheduler):
    name = "hardware"
    sized_before_drafting = False

    def __init__(self, num_draft_tokens: int, sps: torch.Tensor):
        super().__init__(num_draft_tokens)
        self.sps = sps

    def lengths(self, confidence, room, active):
        return hardware(confidence, room, active, self.sps)


class _Async(Scheduler):
    """Capacity K from two rounds before: the bucket size is known before this round's drafts."""

    name = "async"

    def __init__(self, num_draft_tokens: int, sps: torch.Tensor):
        super().__init__(num_draft_tokens)
        self.sps = sps
        self.k = torch.zeros((), dtype=torch.long, device=sps.device)  # updated in place (graphs)
        self.capacities: list[int] = []

    def lengths(self, confidence, room, active):
        return async_topk(confidence, room, self.k)

    def cap_rows(self, rows, requests):
        k = self.capacities[-2] if len(self.capacities) >= 2 else rows - requests
        self.k.fill_(k)
        return min(rows, requests + k)

    def observe(self, confidence, room, active):
        # Host read: the capacity this round implies, for the round two steps later.
        self.capacities.append(int(capacity(confidence, room, active, self.sps)))


def make_scheduler(name: str, num_draft_tokens: int, *, has_confidence: bool, threshold: float = 0.0,
                   sps=None, device="cpu") -> Scheduler:
    """The scheduler `name` for a drafter of `num_draft_tokens` slots; bad combinations are refused here."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {SCHEDULERS}")
    if name == "fixed":
        return Scheduler(num_draft_tokens)
    if num_draft_tokens == 0:
        raise ValueError(f"scheduler {name!r} needs draft tokens; this method drafts none")
    if not has_confidence:
        raise ValueError(f"scheduler {name!r} needs a drafter with confidences (dspark, ngram)")
    if name.startswith("threshold"):
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        s = _Threshold(num_draft_tokens, threshold, threshold_slot if name == "threshold-slot" else threshold_survival)
        s.name = name
        return s
    if sps is None or len(sps) < 2:
        raise ValueError(f"scheduler {name!r} needs an SPS table (steps/s per verify batch size; measure it with "
                         f"`dspark sps` or dspark.decode.sps.engine_sps), got {sps!r}")
    table = torch.as_tensor(sps, dtype=torch.float32, device=device)
    if not torch.isfinite(table).all() or (table[1:] <= 0).any():
        raise ValueError("the SPS table must hold positive, finite steps/s for every batch size >= 1")
    s = _Hardware(num_draft_tokens, table) if name == "hardware" else _Async(num_draft_tokens, table)
    s.name = name
    return s
