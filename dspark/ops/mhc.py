"""Manifold-constrained hyper-connections (mHC): V4's N residual streams per token.

Layouts: `...` any leading token dims, N streams, D hidden.

    streams [..., N, D]           the residual streams (model dtype)
    fn      [(2+N)·N, N·D]        projection to (pre, post, comb) logits, fp32
    base    [(2+N)·N], scale [3]  fp32

`hc_weights_ref` returns pre [..., N], post [..., N], comb [..., N, N] in fp32 (deepseek_v4.md §4.2):
pre = σ(s_pre·μ_pre + b) + eps, post = 2σ(...), comb = Sinkhorn(softmax_rows(...) + eps) starting and
ending on a column normalisation, eps in every denominator. `hc_collapse_ref` is Σ_n pre[n]·X[n];
`hc_expand_ref` is the block's residual update X'[n] = post[n]·y + Σ_j comb[j, n]·X[j] (note the
contraction over comb's FIRST index).
"""

from __future__ import annotations

import torch


def _unweighted_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def hc_weights_ref(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                   sinkhorn_iters: int, hc_eps: float, rms_eps: float):
    n = streams.shape[-2]
    flat = _unweighted_rms(streams.flatten(-2).float(), rms_eps)  # [..., N·D]
    mu = flat @ fn.float().t()  # [..., (2+N)·N]
    mu_pre, mu_post, mu_comb = mu.split([n, n, n * n], dim=-1)
    b_pre, b_post, b_comb = base.float().split([n, n, n * n])
    s_pre, s_post, s_comb = scale.float().unbind(0)
    pre = torch.sigmoid(mu_pre * s_pre + b_pre) + hc_eps
    post = 2 * torch.sigmoid(mu_post * s_post + b_post)
    comb = torch.softmax((mu_comb * s_comb + b_comb).unflatten(-1, (n, n)), dim=-1) + hc_eps  # [..., N, N]
    comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    for _ in range(sinkhorn_iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    return pre, post, comb


def hc_collapse_ref(pre: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """[..., N] fp32 weights × [..., N, D] streams → [..., D] in the streams' dtype."""
    return (pre.unsqueeze(-1) * streams.float()).sum(dim=-2).to(streams.dtype)


def hc_expand_ref(post: torch.Tensor, comb: torch.Tensor, block_out: torch.Tensor,
                  streams: torch.Tensor) -> torch.Tensor:
    """X'[n] = post[n]·y + Σ_j comb[j, n]·X[j], computed in fp32, returned in the streams' dtype."""
    mixed = torch.einsum("...jn,...jd->...nd", comb, streams.float())
    return (post.unsqueeze(-1) * block_out.float().unsqueeze(-2) + mixed).to(streams.dtype)


def hc_head_ref(streams: torch.Tensor, hc_fn: torch.Tensor, hc_base: torch.Tensor, hc_scale: torch.Tensor,
                hc_eps: float, rms_eps: float) -> torch.Tensor:
    """Final collapse of the N streams: σ(scale·μ + base) + eps weights, no Sinkhorn. → [..., D]."""
    flat = _unweighted_rms(streams.flatten(-2).float(), rms_eps)
    pre = torch.sigmoid((flat @ hc_fn.float().t()) * hc_scale.float() + hc_base.float()) + hc_eps
    return hc_collapse_ref(pre, streams)


# TODO(#7): one fused Triton kernel for weights + Sinkhorn + collapse; references serve now.
hc_weights = hc_weights_ref
hc_collapse = hc_collapse_ref
hc_expand = hc_expand_ref
hc_head = hc_head_ref
