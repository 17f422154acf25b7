"""A DeepSeek-V4 target that is exactly a bigram model, for tests whose answers must be known.

Every layer's output projections are zeroed, so the mHC residual streams stay the token embedding
(comb is doubly stochastic and every stream equal); with one-hot embeddings the logits are then a
function of the current token only, and the LM head can encode any table of log-probabilities:
logits[next | prev] = table[prev, next].
"""

from __future__ import annotations

import torch

from dspark.config import ModelConfig
from dspark.model.target import DeepseekV4


@torch.no_grad()
def bigram_target(log_probs: torch.Tensor, seed: int = 0, **config) -> DeepseekV4:
    """log_probs [V, V]: row prev, column next (any finite scale; −inf is clamped to −30)."""
    v = log_probs.shape[0]
    cfg = ModelConfig.tiny(vocab_size=v, **config)
    if v > cfg.hidden_size:
        raise ValueError(f"a bigram target needs vocab ({v}) <= hidden size ({cfg.hidden_size})")
    model = DeepseekV4.random(cfg, seed=seed).eval()
    for layer in list(model.model.layers) + list(getattr(model, "mtp", [])):
        layer.self_attn.o_b_proj.weight.zero_()
        layer.mlp.experts.down_proj.zero_()
        layer.mlp.shared_experts.down_proj.weight.zero_()
    d = cfg.hidden_size
    model.model.embed_tokens.weight.zero_()
    model.model.embed_tokens.weight[:, :v] = torch.eye(v)
    model.model.norm.weight.fill_(1.0)
    # h = norm(Σ_n pre_n · e_prev) = sqrt(D) · e_prev, so lm_head[next, prev] = table / sqrt(D).
    model.lm_head.weight.zero_()
    model.lm_head.weight[:, :v] = log_probs.clamp(min=-30).t() / d ** 0.5
    return model


def chain_table(v: int, branching: int, seed: int, sharpness: float = 3.0) -> torch.Tensor:
    """A random bigram table: each token has `branching` likely successors."""
    g = torch.Generator().manual_seed(seed)
    table = torch.full((v, v), -8.0)
    for prev in range(v):
        nxt = torch.randperm(v, generator=g)[:branching]
        table[prev, nxt] = sharpness * torch.rand(branching, generator=g)
    return table.log_softmax(-1)
