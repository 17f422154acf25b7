"""DSpark training: anchor sampling, supervision masks, the loss and its logged metrics (dspark.md §4.2–§4.4).

Per sequence b (length S), block k (anchor p, keep flag), slot i (γ slots):

    label index   n = min(p+i+1, S−1), 0 for dummy blocks (`block_label_index`); label y = input_ids[n]
    eval mask     M = keep ∧ (p+i+1 < S) ∧ loss_mask[n], then a cumulative product over i
    weights       W = M · exp(−i / loss_decay_gamma)
    target        T = lm_head(target_last_hidden[max(n−1, 0)]): the target's distribution at p+i
    terms         ce = CE(Ũ, y);  l1 = ‖softmax(Ũ) − softmax(T)‖₁ (fp32, T = 1);
                  accept = clamp(1 − l1/2, 0, 1);  conf = BCEWithLogits(z, accept) (target detached)
    loss          Σ_k α_k · num_k / (den_k + 1e−6),  num_k = Σ W·term_k,  den_k = Σ W

The l1 term is computed only when its alpha is positive and the confidence term only with a
confidence head; otherwise both num and den are 0. Under data parallelism the denominators are
summed across ranks and the loss multiplied by the world size (`combine_terms`), so DDP's gradient
average yields the global weighted mean. Metrics are DeepSpec's `train/*` scalars as (num, den)
pairs, so micro-steps and ranks aggregate by summing both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from dspark.draft.protocol import TrainOutput, block_label_index

LOSS_EPS = 1e-6
_TERMS = ("ce", "l1", "confidence")


@dataclass(frozen=True)
class LossConfig:
    loss_decay_gamma: float | None = 4.0  # slot weight exp(−i/γ_decay); None = uniform
    ce_loss_alpha: float = 0.1
    l1_loss_alpha: float = 0.9  # L1 between draft and target distributions (= 2·TV)
    confidence_head_alpha: float = 1.0

    def __post_init__(self):
        for name in ("ce_loss_alpha", "l1_loss_alpha", "confidence_head_alpha"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.loss_decay_gamma is not None and not self.loss_decay_gamma > 0:
            raise ValueError(f"loss_decay_gamma must be positive or None, got {self.loss_decay_gamma!r}")

    @classmethod
    def dspark(cls) -> "LossConfig":
        """DeepSpec's DSpark configs: 0.1·CE + 0.9·L1 + 1.0·confidence BCE, decay 4."""
        return cls()

    @classmethod
    def dflash(cls) -> "LossConfig":
        """DeepSpec's DFlash baseline: CE only, decay 4."""
        return cls(ce_loss_alpha=1.0, l1_loss_alpha=0.0, confidence_head_alpha=0.0)


class Metric(NamedTuple):
    """A logged scalar as num / den (0-dim fp32 tensors); aggregate by summing both."""

    num: torch.Tensor
    den: torch.Tensor

    @property
    def value(self) -> torch.Tensor:
        return self.num / self.den


@dataclass
class LossOutput:
    loss: torch.Tensor  # 0-dim, differentiable (local denominators, world size 1)
    terms: dict[str, torch.Tensor]  # {ce,l1,confidence}_loss_{num,den}, 0-dim
    metrics: dict[str, Metric]  # DeepSpec's names: "train/accept_rate@0", "train/tau_probabilistic", ...


# ============================================================================ anchors and masks
def anchor_candidates(loss_mask: torch.Tensor) -> torch.Tensor:
    """loss_mask [..., S] → [..., S−1] bool: p is a valid anchor iff loss_mask[p] = loss_mask[p+1] = 1."""
    return (loss_mask[..., :-1] > 0.5) & (loss_mask[..., 1:] > 0.5)


def sample_anchors(loss_mask: torch.Tensor, num_anchors: int, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw min(n_valid, num_anchors) valid anchors per sequence, uniformly without replacement.

    loss_mask [..., S] → (anchors [..., K] int64, keep [..., K] bool), K = num_anchors: kept anchors
    ascending first, then dummy blocks at position 0 with keep = False. `generator` must live on
    loss_mask's device.
    """
    if num_anchors < 1:
        raise ValueError(f"num_anchors must be >= 1, got {num_anchors}")
    s = loss_mask.shape[-1]
    device = loss_mask.device
    valid = anchor_candidates(loss_mask.reshape(-1, s))  # [B, S−1]
    # Random keys with invalid positions pushed last: the first n_valid of the key order are a
    # uniform random subset of the valid ones.
    keys = torch.rand(valid.shape, generator=generator, device=device).masked_fill(~valid, 2.0)
    order = keys.argsort(dim=1)[:, :num_anchors]  # [B, min(S−1, K)]
    order = F.pad(order, (0, num_anchors - order.shape[1]), value=s)  # index s sorts after every real position
    keep = torch.arange(num_anchors, device=device) < valid.sum(1, keepdim=True).clamp(max=num_anchors)
    anchors = torch.where(keep, order, s).sort(dim=1).values  # kept (ascending) first
    out_shape = (*loss_mask.shape[:-1], num_anchors)
    return torch.where(keep, anchors, 0).view(out_shape), keep.view(out_shape)


def build_eval_mask(anchors: torch.Tensor, keep: torch.Tensor, loss_mask: torch.Tensor, block_size: int
                    ) -> torch.Tensor:
    """Supervised slots [B, K, γ] bool: keep ∧ (p+i+1 < S) ∧ loss_mask[p+i+1], cut at the first failure."""
    s = loss_mask.shape[1]
    label = anchors.unsqueeze(-1) + torch.arange(1, block_size + 1, device=anchors.device)  # [B, K, γ]
    index = block_label_index(anchors, keep, s, block_size)
    on = loss_mask.gather(1, index.flatten(1)).view(index.shape) > 0.5
    ok = on & (label < s) & keep.bool().unsqueeze(-1)
    return ok.long().cumprod(dim=-1).bool()


def slot_weights(eval_mask: torch.Tensor, loss_decay_gamma: float | None) -> torch.Tensor:
    """W [B, K, γ] fp32 = eval_mask · exp(−i / loss_decay_gamma)."""
    w = eval_mask.float()
    if loss_decay_gamma is None:
        return w
    slots = torch.arange(eval_mask.shape[-1], device=eval_mask.device, dtype=torch.float32)
    return w * torch.exp(-slots / float(loss_decay_gamma))


def aligned_target_logits(lm_head: Callable[[torch.Tensor], torch.Tensor], target_last_hidden: torch.Tensor,
                          anchors: torch.Tensor, keep: torch.Tensor, block_size: int) -> torch.Tensor:
    """The target's logits for each slot, from its cached final-normed hidden states.

    lm_head: the draft's frozen head (e.g. `DraftModel.base_logits`); target_last_hidden [B, S, d]
    → [B, K, γ, V] fp32, row (k, i) = lm_head(target_last_hidden[max(n−1, 0)]), n the label index
    (p+i inside the sequence, S−2 past its end, 0 for dummy blocks). Constant: no gradient.
    """
    b, s, d = target_last_hidden.shape
    j = (block_label_index(anchors, keep, s, block_size) - 1).clamp(min=0)  # [B, K, γ]
    rows = target_last_hidden.gather(1, j.flatten(1).unsqueeze(-1).expand(-1, -1, d)).view(*j.shape, d)
    with torch.no_grad():
        return lm_head(rows).float()


# ============================================================================ loss
def combine_terms(terms: dict[str, torch.Tensor], config: LossConfig,
                  denominators: dict[str, torch.Tensor] | None = None, world_size: int = 1) -> torch.Tensor:
    """Σ_k α_k · num_k / (den_k + 1e−6) · world_size.

    `denominators` (default: the local ones) are the all-reduced sums under data parallelism.
    """
    dens = denominators if denominators is not None else {f"{t}_loss_den": terms[f"{t}_loss_den"] for t in _TERMS}
    alphas = dict(ce=config.ce_loss_alpha, l1=config.l1_loss_alpha, confidence=config.confidence_head_alpha)
    loss = sum(alphas[t] * terms[f"{t}_loss_num"] / (dens[f"{t}_loss_den"] + LOSS_EPS) for t in _TERMS)
    return loss * world_size


def dspark_loss(out: TrainOutput, target_logits: torch.Tensor, loss_mask: torch.Tensor, anchors: torch.Tensor,
                keep: torch.Tensor, config: LossConfig) -> LossOutput:
    """The DSpark / DFlash training loss of one micro-step, its six terms and DeepSpec's metrics.

    out: `DraftModel.forward_train`'s output for (anchors [B, K], keep [B, K]); target_logits
    [B, K, γ, V] from `aligned_target_logits`; loss_mask [B, S].
    """
    if config.confidence_head_alpha > 0 and out.confidence_logits is None:
        raise ValueError("confidence_head_alpha > 0 but the draft has no confidence head")
    logits = out.draft_logits
    b, k, g, v = logits.shape
    eval_mask = build_eval_mask(anchors, keep, loss_mask, g)  # [B, K, γ]
    w = slot_weights(eval_mask, config.loss_decay_gamma)
    den = w.sum()
    zero = den.new_zeros(())

    ce = F.cross_entropy(logits.reshape(-1, v).float(), out.labels.reshape(-1), reduction="none").view(b, k, g)
    # L1 keeps its graph only when it is a loss term; accept (its detached form) feeds metrics and BCE.
    with torch.set_grad_enabled(torch.is_grad_enabled() and config.l1_loss_alpha > 0):
        l1 = (logits.float().softmax(-1) - target_logits.float().softmax(-1)).abs().sum(-1)  # [B, K, γ]
    accept = (1 - 0.5 * l1.detach()).clamp(0, 1)
    terms = {"ce_loss_num": (w * ce).sum(), "ce_loss_den": den}
    if config.l1_loss_alpha > 0:
        terms.update(l1_loss_num=(w * l1).sum(), l1_loss_den=den)
    else:
        terms.update(l1_loss_num=zero, l1_loss_den=zero)
    z = out.confidence_logits
    if z is not None:
        bce = F.binary_cross_entropy_with_logits(z.float(), accept, reduction="none")
        terms.update(confidence_loss_num=(w * bce).sum(), confidence_loss_den=den)
    else:
        terms.update(confidence_loss_num=zero, confidence_loss_den=zero)
    loss = combine_terms(terms, config)

    with torch.no_grad():
        metrics = _metrics(terms, loss, accept, eval_mask, w, z, anchors, keep, loss_mask,
                           l1_logged=config.l1_loss_alpha > 0)
    return LossOutput(loss=loss, terms=terms, metrics=metrics)


def _metrics(terms, loss, accept, eval_mask, w, z, anchors, keep, loss_mask, *, l1_logged: bool
             ) -> dict[str, Metric]:
    """DeepSpec's logged `train/*` scalars (see the fixture README for each definition)."""
    keep = keep.bool()
    b, s = loss_mask.shape
    num_anchors, g = anchors.shape[1], eval_mask.shape[-1]
    m = eval_mask.float()
    one = torch.ones((), device=m.device)
    samples = one * b

    out: dict[str, Metric] = {}
    accept_sum, slot_count = (accept * m).sum((0, 1)), m.sum((0, 1))  # [γ]
    for i in range(g):
        out[f"train/accept_rate@{i}"] = Metric(accept_sum[i], slot_count[i])
    valid_blocks = (keep & eval_mask.any(-1)).float()  # [B, K]
    tau = 1 + (accept * m).cumprod(-1).sum(-1)  # expected accepted length with the bonus token
    out["train/tau_probabilistic"] = Metric((tau * valid_blocks).sum(), valid_blocks.sum())

    for t in ("ce", "l1", "confidence"):
        if t == "ce" or (t == "l1" and l1_logged) or (t == "confidence" and z is not None):
            out[f"train/{t}_loss"] = Metric(terms[f"{t}_loss_num"].detach(), terms[f"{t}_loss_den"])
    if z is not None:
        c = z.float().sigmoid()
        den = terms["confidence_loss_den"]
        out["train/confidence_abs_error"] = Metric(((c - accept).abs() * w).sum(), den)
        out["train/confidence_bias"] = Metric(((c - accept) * w).sum(), den)
        out["train/confidence_cumprod_bias"] = Metric((((c * m).cumprod(-1) - (accept * m).cumprod(-1)) * w).sum(),
                                                      den)
    out["train/loss"] = Metric(loss.detach(), one)

    valid = anchor_candidates(loss_mask).float().sum(1)  # [B]
    kept = keep.float().sum(1)  # [B]
    supervised = m.sum((1, 2)) / kept.clamp(min=1)  # [B] supervised slots per kept block
    out["train/valid_anchors_abs"] = Metric(valid.sum(), samples)
    out["train/valid_anchors_ratio"] = Metric((valid / max(s, 1)).sum(), samples)
    out["train/sampled_anchors_abs"] = Metric(kept.sum(), samples)
    out["train/sampled_anchors_ratio"] = Metric((kept / num_anchors).sum(), samples)
    out["train/block_supervised_tokens_abs"] = Metric(supervised.sum(), samples)
    out["train/block_supervised_tokens_ratio"] = Metric((supervised / g).sum(), samples)
    return out


__all__ = ["LOSS_EPS", "LossConfig", "Metric", "LossOutput", "anchor_candidates", "sample_anchors",
           "build_eval_mask", "slot_weights", "aligned_target_logits", "combine_terms", "dspark_loss"]
