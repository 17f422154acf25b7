"""Mixture of experts: routing and the SwiGLU expert computation.

Layouts: N tokens, D hidden, E experts, K experts per token, I expert width.

    x        [N, D]        router / expert input (post_attention_layernorm output)
    gate_w   [E, D]        router weight
    bias     [E]           fp32 correction bias, used for SELECTION only (score routing)
    tid2eid  [V, K]        hash routing table (hash layers), int
    indices  [N, K] int64  chosen experts; -1 marks a slot that routes nowhere (padding)
    weights  [N, K] fp32   routing weights, renormalised then × routed_scaling_factor
    gate_up  [E, 2I, D]    rows [:I] gate (w1), rows [I:] up (w3);  down [E, D, I] (w2)

Scores: s = sqrt(softplus(x·gate_wᵀ)) ("sqrtsoftplus") or sigmoid; weights = s[idx] / (Σ s[idx] + 1e-20)
× scaling. Ties in the top-k selection are broken by the lowest expert index (architecture.md §9).
SwiGLU with V4's clamp: gate ≤ limit (max only), up ∈ [−limit, limit]; y = (silu(g)·u)·downᵀ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def router_scores_ref(x: torch.Tensor, gate_w: torch.Tensor, scoring_func: str) -> torch.Tensor:
    logits = F.linear(x, gate_w)  # [N, E], model dtype as in HF
    if scoring_func == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if scoring_func == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"unknown scoring_func {scoring_func!r}")


def topk_lowest_index(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim; ties go to the lower index."""
    # A stable descending sort keeps equal values in index order.
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def route_ref(scores: torch.Tensor, indices: torch.Tensor, scaling: float) -> torch.Tensor:
    """Routing weights for chosen `indices` [N, K] (-1 = nowhere, weight 0) → fp32 [N, K]."""
    picked = scores.float().gather(-1, indices.clamp(min=0)) * (indices >= 0)
    return picked / (picked.sum(-1, keepdim=True) + 1e-20) * scaling


def score_route_ref(x, gate_w, bias, k: int, scoring_func: str, scaling: float):
    """Score routing → (weights fp32 [N, K], indices int64 [N, K])."""
    scores = router_scores_ref(x, gate_w, scoring_func)
    indices = topk_lowest_index(scores.float() + bias.float(), k)
    return route_ref(scores, indices, scaling), indices


def hash_route_ref(x, gate_w, tid2eid, input_ids, scoring_func: str, scaling: float):
    """Hash routing: experts from tid2eid[input_ids], weights from the learned scores."""
    scores = router_scores_ref(x, gate_w, scoring_func)
    indices = tid2eid[input_ids].long()
    return route_ref(scores, indices, scaling), indices


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


def experts_ref(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, limit: float, token_chunk: int = 64) -> torch.Tensor:
    """Σ_k weights[:, k] · expert_{indices[:, k]}(x) → [N, D] in x's dtype (fp32 accumulation).

    Each (token, slot) gathers its own expert's weights, so the reference has no host syncs; a
    slot with index -1 contributes exactly zero (the kernel will skip it outright). Tokens go in
    fixed-size chunks to bound the gathered-weight memory.
    """
    n, k = indices.shape
    inter = gate_up.shape[1] // 2
    out = torch.zeros(n, down.shape[1], dtype=torch.float32, device=x.device)
    for start in range(0, n, token_chunk):
        rows = slice(start, start + token_chunk)
        xc, idx, w = x[rows], indices[rows], weights[rows]
        live = idx >= 0
        safe = idx.clamp(min=0)
        for slot in range(k):
            h = torch.einsum("nd,nid->ni", xc, gate_up[safe[:, slot]])  # [n, 2I]
            y = torch.einsum("ni,ndi->nd", swiglu_ref(h[:, :inter], h[:, inter:], limit), down[safe[:, slot]])
            out[rows] += torch.where(live[:, slot, None], y.float() * w[:, slot, None], 0.0)
    return out.to(x.dtype)


def experts_sorted(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor, limit: float) -> torch.Tensor:
    """`experts_ref`'s result with tokens grouped per expert: one matmul per expert that has tokens.

    For training and long prefills, where gathering one weight matrix per (token, slot) costs far
    more memory than the activations; it reads the group sizes back to the host, so it never runs
    inside a sync-free step.
    """
    k, num_experts = indices.shape[1], gate_up.shape[0]
    inter = gate_up.shape[1] // 2
    flat = indices.flatten()  # [N·K]
    order = torch.argsort(flat, stable=True)  # slots routed nowhere (−1) first, then expert 0, 1, ...
    sizes = torch.bincount(flat + 1, minlength=num_experts + 1).tolist()  # host read: group sizes
    out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float32, device=x.device)
    start = sizes[0]
    for e in range(num_experts):
        count = sizes[e + 1]
        if count:
            slots = order[start:start + count]
            token = slots // k
            h = x[token] @ gate_up[e].t()  # [count, 2I]
            y = swiglu_ref(h[:, :inter], h[:, inter:], limit) @ down[e].t()  # [count, D]
            out = out.index_add(0, token, y.float() * weights.flatten()[slots, None])
        start += count
    return out.to(x.dtype)


def experts_dense(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, gate_up: torch.Tensor,
                  down: torch.Tensor, limit: float) -> torch.Tensor:
    """`experts_ref`'s result with every expert run on every token, then weighted by the token's
    routing weight for it (exactly zero where it does not route there).

    E/K times the FLOPs, but E plain GEMMs instead of a weight copy per (token, slot), and no host
    reads: the fast sync-free path on CPU while E/K is small.
    """
    n, num_experts = indices.shape[0], gate_up.shape[0]
    inter = gate_up.shape[1] // 2
    live = indices >= 0
    safe = indices.clamp(min=0)
    # per (token, expert): summed routing weight, and whether any slot routes there at all
    w = torch.zeros(n, num_experts, dtype=torch.float32, device=x.device).scatter_add_(
        1, safe, torch.where(live, weights.float(), 0.0))
    routed = torch.zeros(n, num_experts, dtype=torch.long, device=x.device).scatter_add_(1, safe, live.long()) > 0
    out = torch.zeros(n, down.shape[1], dtype=torch.float32, device=x.device)
    for e in range(num_experts):
        h = x @ gate_up[e].t()  # [N, 2I]
        y = swiglu_ref(h[:, :inter], h[:, inter:], limit) @ down[e].t()  # [N, D]
        out += torch.where(routed[:, e, None], y.float() * w[:, e, None], 0.0)
    return out.to(x.dtype)


# On CPU, computing every expert beats gathering a weight copy per (token, slot) once there are
# enough tokens to amortise the E/K-fold FLOPs: tools/bench_experts.py (1 thread, nano's widths)
# measured 1.5× at E/K = 4, N = 8 and 2.6× at E/K = 8, N = 64; a loss at E/K = 32 for every N.
DENSE_MAX_RATIO = 16
DENSE_MIN_TOKENS_PER_RATIO = 2


def experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, gate_up: torch.Tensor,
            down: torch.Tensor, limit: float) -> torch.Tensor:
    """Sync-free routed experts for inference: `experts_dense` on CPU where it is faster (decided from
    static shapes), else the reference.

    TODO(#7): sync-free permutation + grouped GEMM kernel for CUDA."""
    ratio = gate_up.shape[0] / indices.shape[1]
    if x.device.type == "cpu" and ratio <= DENSE_MAX_RATIO and x.shape[0] >= DENSE_MIN_TOKENS_PER_RATIO * ratio:
        return experts_dense(x, weights, indices, gate_up, down, limit)
    return experts_ref(x, weights, indices, gate_up, down, limit)
