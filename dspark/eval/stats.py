"""The arithmetic of both measurements (definitions in dspark.eval.harness): teacher-forced anchors
and exact acceptance, survival, the file bootstrap, ratios of sums, the repetition count."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dspark.decode.drafter import TargetView
from dspark.decode.stats import RequestStats

# Teacher-forced anchors start here: no served prompt is a handful of tokens long, yet each such
# near-empty-context anchor would weigh as much as any other.
TF_WARMUP = 16
NGRAM = 4  # n of the repetition measure


def tf_anchors(length: int, max_gamma: int) -> torch.Tensor:
    """Anchors TF_WARMUP .. L−1−γmax: every slot's true next token lies inside the span."""
    return torch.arange(TF_WARMUP, max(TF_WARMUP, length - max_gamma))


def target_rows(view: TargetView, anchors: torch.Tensor, gamma: int) -> torch.Tensor:
    """The target's logits for slot i of the block at p: row p+i → [A, γ, V]."""
    return view.logits[anchors.unsqueeze(-1) + torch.arange(gamma)]


def _distribution(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T), or the one-hot argmax (lowest index on ties) at T = 0: what `ops.probs`
    gives with top-k / top-p off. NOTE: not `ops.probs` itself: its bit-exact CPU reference costs
    ~0.3 µs per element, minutes per file at V = 8k, and agrees with this to ~1e-7."""
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return (logits.float() / temperature).softmax(-1)


def acceptance_tf(target_logits: torch.Tensor, draft_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Exact per-slot acceptance α_i = Σ_x min(p_i(x), q_i(x)) at `temperature` (0: argmax match).

    target_logits, draft_logits [A, γ, V] → [A, γ] fp32.
    """
    return torch.minimum(_distribution(target_logits, temperature), _distribution(draft_logits, temperature)).sum(-1)


def survival(alpha: torch.Tensor) -> torch.Tensor:
    """P(accepted > i) of the teacher-forced chain: Π_{j≤i} α_j → [A, γ]."""
    return alpha.cumprod(-1)


def bootstrap_ci(num, den, *, seed: int, resamples: int = 1000, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of Σ num / Σ den with whole files resampled (num, den [F]); NaN without data."""
    num, den = torch.as_tensor(num, dtype=torch.float64), torch.as_tensor(den, dtype=torch.float64)
    if len(num) == 0:
        return float("nan"), float("nan")
    pick = torch.randint(len(num), (resamples, len(num)), generator=torch.Generator().manual_seed(seed))
    d = den[pick].sum(1)
    ratios = (num[pick].sum(1) / d)[d > 0]  # a resample of files without rounds has no τ
    if len(ratios) == 0:
        return float("nan"), float("nan")
    lo, hi = torch.quantile(ratios, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


def ratio(num, den) -> float:
    """Σ num / Σ den, NaN when Σ den is 0."""
    return float(sum(num) / sum(den)) if sum(den) else float("nan")


def conditional(surv: list[float]) -> list[float | None]:
    """Conditional acceptance S_i / S_{i−1} from survival (S_{−1} = 1); None where no anchor survives."""
    return [s / prev if prev > 0 else None for s, prev in zip(surv, [1.0] + surv[:-1])]


def reaching(stats: RequestStats) -> list[int]:
    """Rounds that reach slot i (accepted > i−1 and ℓ > i): the conditional acceptance's denominators."""
    return [sum(1 for ell, a in zip(stats.proposal_lens, stats.accepted) if ell > i and a >= i)
            for i in range(max(stats.proposal_lens, default=0))]


def repeated_ngrams(tokens: list[int], n: int = NGRAM) -> tuple[int, int]:
    """(#n-grams − #distinct n-grams, #n-grams) of one token sequence."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams)), len(grams)
