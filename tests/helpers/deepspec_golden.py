"""What the DeepSpec golden-fixture tests (Qwen3 and Gemma 4 layouts) share: the draft's context cache
for a run of positions, DeepSpec's greedy block sampler and its evaluator's proposal-length rule."""

from __future__ import annotations

import torch

from dspark.draft.deepspec import DraftModel


def context_cache(model: DraftModel, features: torch.Tensor, start: int):
    """Per-layer (k, v) [1, N, H_kv, hd] for context rows at positions start..start+N−1."""
    kv = model.context_kv(model.project_context(features), torch.arange(start, start + features.shape[0]))
    return [(k[None], v[None]) for k, v in kv]


def greedy_block(model: DraftModel, U: torch.Tensor, h: torch.Tensor, anchor: torch.Tensor):
    """The block sampler at T = 0 (greedy; the uniforms are never read)."""
    r, gamma = U.shape[0], model.block_size
    return model.sample_block(U, h, anchor, torch.zeros(r), torch.zeros(r, dtype=torch.long), torch.ones(r),
                              torch.full((r, gamma), 0.5))


def proposal_length(conf_logits: torch.Tensor | None, tau: float, gamma: int) -> int:
    """DeepSpec's evaluator: the first slot with σ(z_i) < τ (per slot, not cumulative); γ if none or τ ≤ 0."""
    if conf_logits is None or tau <= 0:
        return gamma
    below = [i for i, c in enumerate(torch.sigmoid(conf_logits).tolist()) if c < tau]
    return below[0] if below else gamma
