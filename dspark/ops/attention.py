"""Attention over V4's single shared latent K=V head, with per-head sinks.

Layouts (named dims, style.md §3): B batch, T query tokens, S key rows, H heads, D head dim.

    q       [B, T, H, D]   queries (already normed and roped)
    kv      [B, S, D]      key rows; the same tensor is the value (MQA with K = V)
    allowed [B, T, S]      bool, True where query t may read key row s
    sinks   [H]            one extra logit per head, fp32, unscaled and never masked
    out     [B, T, H, D]   in q's dtype

Semantics: p = softmax over [q·k · scale for allowed keys ; sink]; the sink's probability is
dropped, so kept probabilities sum to < 1. A query that may read no key row attends to the sink
only and returns exactly zero (never NaN). Scores and softmax run in fp32.
"""

from __future__ import annotations

import torch


def sink_attention_ref(q: torch.Tensor, kv: torch.Tensor, allowed: torch.Tensor, sinks: torch.Tensor,
                       scale: float) -> torch.Tensor:
    qf, kvf = q.float(), kv.float()
    logits = torch.einsum("bthd,bsd->bhts", qf, kvf) * scale  # [B, H, T, S]
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    sink = sinks.float().view(1, -1, 1, 1).expand(*logits.shape[:3], 1)  # [B, H, T, 1]
    probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]  # [B, H, T, S]
    out = torch.einsum("bhts,bsd->bthd", probs, kvf)  # [B, T, H, D]
    return out.to(q.dtype)


def sink_attention(q, kv, allowed, sinks, scale):
    """Shapes as in the module docstring; meaning defined by `sink_attention_ref`."""
    # TODO(#7): Triton kernel over the paged latent cache; the reference serves every path now.
    return sink_attention_ref(q, kv, allowed, sinks, scale)
