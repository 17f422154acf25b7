"""The V4 MoE block (dspark.model.moe) against a per-token loop written from the definition: score
routing picks the top k of scores + correction bias, hash routing takes tid2eid[token]; weights are
the chosen scores (sqrt-softplus of the router logits) renormalised and scaled; each chosen expert
and the shared expert are clamped SwiGLU MLPs. Padding routes nowhere and counts toward no expert's
load; the training path (grouped per expert) gives the inference path's result and gradients."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from dspark.config import ModelConfig
from dspark.model.moe import MoE
from dspark.model.target import DeepseekV4
from tests.compare import assert_close

LAYERS = {"hash": 0, "score": 2}  # ModelConfig.tiny's MLP types
LIMIT = 0.4  # a SwiGLU clamp the random activations really hit


@functools.lru_cache(maxsize=None)
def model() -> DeepseekV4:
    return DeepseekV4.random(ModelConfig.tiny(swiglu_limit=LIMIT), seed=0).eval()


def moe(kind: str) -> MoE:
    block = model().model.layers[LAYERS[kind]].mlp
    assert block.gate.kind == kind
    return block


def tokens(n: int = 13, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = model().config
    return 2 * torch.randn(n, cfg.hidden_size, generator=g), torch.randint(0, cfg.vocab_size, (n,), generator=g)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate.clamp(max=LIMIT)) * up.clamp(-LIMIT, LIMIT)


def chosen_experts(block: MoE, x: torch.Tensor, token: int) -> list[int]:
    if block.gate.kind == "hash":
        return block.gate.tid2eid[token].tolist()
    scores = F.softplus(block.gate.weight @ x).sqrt() + block.gate.e_score_correction_bias
    return scores.argsort(descending=True)[: block.gate.top_k].tolist()


def per_token(block: MoE, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    e = block.experts
    inter = e.gate_up_proj.shape[1] // 2
    sh = block.shared_experts
    out = []
    for xt, token in zip(x, ids.tolist()):
        experts = chosen_experts(block, xt, token)
        score = F.softplus(block.gate.weight @ xt).sqrt()[experts]
        weights = score / score.sum() * block.gate.scaling
        y = sh.down_proj.weight @ swiglu(sh.gate_proj.weight @ xt, sh.up_proj.weight @ xt)
        for w, ex in zip(weights, experts):
            h = e.gate_up_proj[ex] @ xt
            y = y + w * (e.down_proj[ex] @ swiglu(h[:inter], h[inter:]))
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["score", "hash"])
def test_forward_equals_a_per_token_loop(kind):
    block, (x, ids) = moe(kind), tokens()
    with torch.no_grad():
        _, indices = block.gate(x, ids)
        for t in range(x.shape[0]):
            assert sorted(indices[t].tolist()) == sorted(chosen_experts(block, x[t], int(ids[t])))
        assert_close(block(x, ids), per_token(block, x, ids))
        # Leading dims are kept: [B, S, D] in, [B, S, D] out, token by token the same.
        assert_close(block(x[:12].view(3, 4, -1), ids[:12].view(3, 4)).view(12, -1), block(x[:12], ids[:12]))


def test_the_swiglu_clamp_is_exercised():
    block, (x, _) = moe("score"), tokens()
    with torch.no_grad():
        h = torch.einsum("nd,eid->nei", x, block.experts.gate_up_proj)
    assert (h.abs() > LIMIT).float().mean() > 0.2


@pytest.mark.parametrize("kind", ["score", "hash"])
def test_padding_routes_nowhere_and_loads_count_live_assignments(kind):
    block, (x, ids) = moe(kind), tokens()
    valid = torch.arange(x.shape[0]) % 3 != 1
    load = torch.zeros(model().config.n_routed_experts)
    with torch.no_grad():
        out = block(x, ids, valid=valid, expert_load=load)
        assert_close(out[valid], block(x[valid], ids[valid]))
        assert_close(out[~valid], block.shared_experts(x[~valid]))  # the shared expert only
    want = torch.zeros_like(load)
    for t in valid.nonzero().flatten().tolist():
        for ex in chosen_experts(block, x[t], int(ids[t])):
            want[ex] += 1
    assert torch.equal(load, want)


def test_training_path_matches_inference_and_trains_the_experts():
    block, (x, ids) = moe("score"), tokens()
    with torch.no_grad():
        eager = block(x, ids)
    xg = x.clone().requires_grad_()
    out = block(xg, ids)  # grad enabled, expert weights require grad: the grouped path
    assert_close(out, eager)
    out.square().sum().backward()
    try:
        ref_x = x.clone().requires_grad_()
        per_token(block, ref_x, ids).square().sum().backward()
        assert_close(xg.grad, ref_x.grad, rtol=1e-5)  # two summation orders of the same fp32 sums
        assert block.experts.gate_up_proj.grad is not None and block.experts.gate_up_proj.grad.abs().sum() > 0
    finally:
        block.zero_grad(set_to_none=True)
