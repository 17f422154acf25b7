"""The lightning indexer of CSA layers: score compressed entries per query, keep the top k.

Layouts: B batch, T queries, Hi indexer heads, di indexer head dim, W compressed entries.

    q        [B, T, Hi, di]   indexer queries (roped with the compress table)
    keys     [B, W, di]       the indexer's own compressed keys
    w        [B, T, Hi]       per-head weights (x·weights_projᵀ · Hi^-1/2)
    visible  [B, T]           int, number of entries query t may use (causal: floor((t+1)/m))
    scores   [B, T, W] fp32   Σ_h w[t,h] · ReLU(q[t,h]·keys[w]) · di^-1/2
    topk     [B, T, k] int64  chosen entries, -1 where fewer than k entries are visible

Selection: the k = min(index_topk, W) highest scores among visible entries; ties go to the lower
entry index (deepseek_v4.md §9.4: this rule is ours and must be shared by kernel and reference).
"""

from __future__ import annotations

import torch

from dspark.ops.moe import topk_lowest_index


def indexer_scores_ref(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    dots = torch.einsum("bthd,bwd->bthw", q.float(), keys.float())  # [B, T, Hi, W]
    return (torch.relu(dots) * scale * w.float().unsqueeze(-1)).sum(dim=2)  # [B, T, W]


def indexer_topk_ref(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    n = scores.shape[-1]
    k = min(k, n)
    entry = torch.arange(n, device=scores.device)
    hidden = entry >= visible.unsqueeze(-1)  # [B, T, W]
    idx = topk_lowest_index(scores.masked_fill(hidden, float("-inf")), k)
    return torch.where(idx >= visible.unsqueeze(-1), torch.full_like(idx, -1), idx)


# TODO(#7): fused scoring + top-k kernel.
indexer_scores = indexer_scores_ref
indexer_topk = indexer_topk_ref
