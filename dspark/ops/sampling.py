"""Sampling distributions and inverse-CDF sampling with explicit uniforms.

Layouts: N rows, V vocabulary.

    logits       [N, V] fp32      raw logits (target rows or the draft's corrected logits)
    temperature  [N] fp32         0 = greedy: a one-hot at the argmax (lowest index on ties)
    top_k        [N] int64        0 = off; keeps every token tied with the k-th largest
    top_p        [N] fp32         1 = off; keeps the smallest top set whose mass reaches top_p,
                                  the crossing token and every token tied with it included
    probs        [N, V] fp32      the filtered, renormalised distribution

Order: temperature, then top-k, then top-p on the top-k-renormalised distribution (HF's warper
order). Both rules are tie-symmetric: token x survives top-k iff fewer than k tokens are strictly
more likely, and top-p iff the mass of tokens strictly more likely than x is below top_p. The same
function shapes target and draft rows, so acceptance, residual and bonus use one distribution.
"""

from __future__ import annotations

import torch


def _keep_from(sorted_desc: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Threshold value at `index` [N] of each descending row → [N, 1]."""
    return sorted_desc.gather(-1, index.unsqueeze(-1))


def probs_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
              top_p: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    v = logits.shape[-1]
    greedy = temperature <= 0
    t = torch.where(greedy, 1.0, temperature).unsqueeze(-1)
    p = torch.softmax(logits / t, dim=-1)  # [N, V]

    # top-k: keep p ≥ the k-th largest probability.
    sorted_p = p.sort(dim=-1, descending=True).values
    k = torch.where(top_k > 0, top_k.clamp(max=v), v) - 1
    p = torch.where(p >= _keep_from(sorted_p, k), p, 0.0)
    p = p / p.sum(-1, keepdim=True)

    # top-p: the crossing token c is the first whose inclusive cumulative mass reaches top_p; keep p ≥ p_c.
    sorted_p = p.sort(dim=-1, descending=True).values
    reached = sorted_p.cumsum(-1) >= top_p.unsqueeze(-1)
    c = torch.where(reached.any(-1) & (top_p < 1), reached.float().argmax(-1), v - 1)
    p = torch.where(p >= _keep_from(sorted_p, c), p, 0.0)
    p = p / p.sum(-1, keepdim=True)

    # scatter, not F.one_hot: one_hot validates its input on the host (a sync).
    onehot = torch.zeros_like(p).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy.unsqueeze(-1), onehot, p)


def sample_ref(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: the first token whose cumulative mass exceeds u·total → [N] int64.

    With u on a stratified grid the induced distribution is exactly `probs` up to grid resolution;
    a token of zero probability is never returned.
    """
    cdf = probs.float().cumsum(-1)
    target = u.float().unsqueeze(-1) * cdf[..., -1:]
    idx = (cdf > target).float().argmax(-1)
    # u·total can round up to the total: fall back to the last token with mass.
    last = (probs > 0).float().cumsum(-1).argmax(-1)
    return torch.where((cdf > target).any(-1), idx, last)


def argmax_ref(logits: torch.Tensor) -> torch.Tensor:
    """Greedy token, lowest index among ties (torch.argmax returns the first maximum)."""
    return logits.argmax(-1)


# TODO(#7): fused filter + sample kernel with a threshold search instead of a sort.
probs = probs_ref
sample = sample_ref
